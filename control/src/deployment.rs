//! Whether ferry's own DaemonSet is still there (setup side, asked once as the agent stops).
//!
//! A DaemonSet's pods are stopped the same way (SIGTERM) when the DaemonSet is updated and when it
//! is deleted. On an update the node must keep its wiring, so that the next agent takes over
//! without the pods noticing; on a deletion (`kubectl delete -f deploy/ferry.yaml`) it should be
//! left clean. The agent tells them apart by asking the API about its DaemonSet:
//!
//! - it exists and is not being deleted: an update or a restart ([`Deployment::Present`]);
//! - it is gone (404) or carries a deletion timestamp, or the server no longer knows the agent's
//!   service account (401) or its role (403), which `kubectl delete -f` removes with the rest:
//!   ferry is being removed ([`Deployment::Removed`]);
//! - anything else (the API unreachable, a timeout): [`Deployment::Unknown`], and the agent
//!   keeps the node wired, the safe side: a later agent or `ferry uninstall` can still clean up.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

use crate::config::KubeAuth;
use crate::source::kube::client;

/// What the API says about the agent's DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployment {
    /// It is there: keep the node wired.
    Present,
    /// It is being removed (why, for the log): clean the node.
    Removed(String),
    /// No answer (why): keep the node wired.
    Unknown(String),
}

/// Asks the API, within `timeout`, about DaemonSet `namespace/name`.
pub async fn own_daemonset(auth: &KubeAuth, namespace: &str, name: &str, timeout: Duration) -> Deployment {
    let ask = async {
        let c = match client(auth).await {
            Ok(c) => c,
            Err(e) => return Deployment::Unknown(e.to_string()),
        };
        match Api::<DaemonSet>::namespaced(c, namespace).get(name).await {
            Ok(ds) if ds.metadata.deletion_timestamp.is_some() => {
                Deployment::Removed(format!("DaemonSet {namespace}/{name} is being deleted"))
            }
            Ok(_) => Deployment::Present,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Deployment::Removed(format!("DaemonSet {namespace}/{name} no longer exists"))
            }
            Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => Deployment::Removed(format!(
                "the API refuses the agent's credentials ({} {}): its service account or role was deleted",
                e.code, e.reason
            )),
            Err(e) => Deployment::Unknown(e.to_string()),
        }
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(d) => d,
        Err(_) => Deployment::Unknown(format!("no answer from the API within {timeout:?}")),
    }
}

/// [`own_daemonset`] from synchronous code (the agent's main thread), on a runtime of its own.
pub fn own_daemonset_blocking(auth: &KubeAuth, namespace: &str, name: &str, timeout: Duration) -> Deployment {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(own_daemonset(auth, namespace, name, timeout)),
        Err(e) => Deployment::Unknown(format!("cannot start a runtime: {e}")),
    }
}

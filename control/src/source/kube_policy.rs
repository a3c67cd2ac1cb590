//! The Kubernetes source's NetworkPolicy objects (control side): list+watch Namespaces, Pods and
//! `networking.k8s.io/v1` NetworkPolicies, turn each into a [`PolicyObject`] and send them to the
//! policy store ([`crate::policy::PolicyStore`]) as [`Update::ObjectResync`] (each list),
//! [`Update::ObjectUpsert`] and [`Update::ObjectDelete`] (each watch event).
//!
//! - Sessions as for Nodes: a list, then a watch; any error ends the session, the watcher waits
//!   with [`Backoff`] and lists again (the resync removes what was deleted meanwhile). Each kind has
//!   its own watcher, so one kind's failure (RBAC, a server without the resource) does not stop
//!   the others.
//! - Bad data (an address that is not one, a port out of range, an unknown protocol; a policy that
//!   [`Policy::from_spec`] refuses) is sent as a [`Rejection`] naming the object's key and the
//!   field: the store keeps the object's last good state, warns once and counts it.
//! - Pods: `status.podIPs` (else `status.podIP`), `spec.nodeName`, the named ports of its
//!   containers. A host-network pod is not reported (its addresses are its node's); a finished pod
//!   (`Succeeded`, `Failed`) is reported without addresses (they are released).
//! - NetworkPolicies: `endPort` is read when the server sends it (1.25+); the 1.20 test server
//!   drops it silently, so it is tested from a fixture.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_tables::policy::{
    IpBlockSpec, LabelSelectorSpec, NamedPort, NamespaceSpec, NetworkPolicySpec, PeerSpec, PodSpec, Policy,
    PolicyProtocol, PortSpec, PortValue, RequirementSpec, RuleSpec,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::{Backoff, EventTx};
use crate::metrics::Metrics;
use crate::model::{ObjectKind, PolicyObject, Rejection, SourceKind, Update};
use crate::shutdown::{sleep_or_shutdown, stopped};

/// A Namespace as the policy store wants it.
pub fn namespace_object(ns: &Namespace) -> Result<PolicyObject, Rejection> {
    Ok(PolicyObject::Namespace(NamespaceSpec {
        name: ns.metadata.name.clone().unwrap_or_default(),
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    }))
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A Pod as the policy store wants it; `None` for a host-network pod (not reported).
pub fn pod_object(p: &Pod) -> Option<Result<PolicyObject, Rejection>> {
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let key = pod_key(p);
    let reject = |field: String, reason: String| Rejection::new(key.clone(), field, reason);
    Some((|| {
        let status = p.status.as_ref();
        let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let raw: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()).filter(|v| !v.is_empty()) {
            Some(list) => list.iter().map(|a| a.ip.as_str()).collect(),
            None => status.and_then(|s| s.pod_ip.as_deref()).into_iter().collect(),
        };
        let mut ips = Vec::with_capacity(raw.len());
        if !finished {
            for a in raw {
                ips.push(
                    a.trim()
                        .parse::<IpAddr>()
                        .map_err(|_| reject("status.podIPs".into(), format!("{a:?} is not an IP address")))?,
                );
            }
        }
        let mut ports = Vec::new();
        for (i, c) in spec.map(|s| s.containers.as_slice()).unwrap_or_default().iter().enumerate() {
            for (j, cp) in c.ports.iter().flatten().enumerate() {
                let Some(name) = cp.name.clone().filter(|n| !n.is_empty()) else { continue };
                let field = |f: &str| format!("spec.containers[{i}].ports[{j}].{f}");
                let protocol = match cp.protocol.as_deref() {
                    None => PolicyProtocol::Tcp,
                    Some(s) => PolicyProtocol::parse(s).map_err(|r| reject(field("protocol"), r))?,
                };
                let port = u16::try_from(cp.container_port).ok().filter(|p| *p != 0).ok_or_else(|| {
                    reject(field("containerPort"), format!("{} is not in 1-65535", cp.container_port))
                })?;
                ports.push(NamedPort { name, protocol, port });
            }
        }
        Ok(PolicyObject::Pod(PodSpec {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ports,
        }))
    })())
}

fn selector(s: &LabelSelector) -> LabelSelectorSpec {
    LabelSelectorSpec {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| RequirementSpec {
                key: e.key.clone(),
                operator: e.operator.clone(),
                values: e.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn peer(p: &NetworkPolicyPeer) -> PeerSpec {
    PeerSpec {
        pod_selector: p.pod_selector.as_ref().map(selector),
        namespace_selector: p.namespace_selector.as_ref().map(selector),
        ip_block: p
            .ip_block
            .as_ref()
            .map(|b| IpBlockSpec { cidr: b.cidr.clone(), except: b.except.clone().unwrap_or_default() }),
    }
}

fn port(p: &NetworkPolicyPort) -> PortSpec {
    PortSpec {
        protocol: p.protocol.clone(),
        port: p.port.as_ref().map(|v| match v {
            IntOrString::Int(n) => PortValue::Number(i64::from(*n)),
            IntOrString::String(s) => PortValue::Name(s.clone()),
        }),
        end_port: p.end_port.map(i64::from),
    }
}

/// A NetworkPolicy as the policy store wants it, checked with [`Policy::from_spec`] so that the
/// rejection names the field as the API does (`spec.ingress[0].ports[1].endPort`).
pub fn policy_object(np: &NetworkPolicy) -> Result<PolicyObject, Rejection> {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let spec = np.spec.as_ref();
    let rules_in = spec.and_then(|s| s.ingress.as_ref()).into_iter().flatten().map(|r| RuleSpec {
        ports: r.ports.iter().flatten().map(port).collect(),
        peers: r.from.iter().flatten().map(peer).collect(),
    });
    let rules_out = spec.and_then(|s| s.egress.as_ref()).into_iter().flatten().map(|r| RuleSpec {
        ports: r.ports.iter().flatten().map(port).collect(),
        peers: r.to.iter().flatten().map(peer).collect(),
    });
    let s = NetworkPolicySpec {
        namespace,
        name,
        pod_selector: spec.and_then(|s| s.pod_selector.as_ref()).map(selector).unwrap_or_default(),
        policy_types: spec.and_then(|s| s.policy_types.clone()),
        ingress: rules_in.collect(),
        egress: rules_out.collect(),
    };
    Policy::from_spec(&s).map_err(|e| Rejection::new(s.key(), e.field, e.reason))?;
    Ok(PolicyObject::NetworkPolicy(s))
}

/// One kind's watcher.
pub(crate) struct KindWatcher<K> {
    pub(crate) api: Api<K>,
    pub(crate) kind: ObjectKind,
    /// The object's key (as [`PolicyObject::key`] would give it).
    pub(crate) key: fn(&K) -> String,
    /// `None`: not reported (treated as absent).
    pub(crate) convert: fn(&K) -> Option<Result<PolicyObject, Rejection>>,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl<K> std::fmt::Debug for KindWatcher<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KindWatcher").field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// Key functions for the three kinds.
pub(crate) fn namespace_key(n: &Namespace) -> String {
    n.metadata.name.clone().unwrap_or_default()
}
pub(crate) fn pod_key_of(p: &Pod) -> String {
    pod_key(p)
}
pub(crate) fn policy_key(p: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}
pub(crate) fn namespace_convert(n: &Namespace) -> Option<Result<PolicyObject, Rejection>> {
    Some(namespace_object(n))
}
pub(crate) fn policy_convert(p: &NetworkPolicy) -> Option<Result<PolicyObject, Rejection>> {
    Some(policy_object(p))
}

impl<K> KindWatcher<K>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let ended = self.session(&mut backoff).await;
            let Some(e) = ended else { return };
            let delay = backoff.next_delay();
            tracing::warn!(kind = %self.kind, error = %e, retry_in = ?delay, "kubernetes watch disconnected; policy continues on the last objects");
            if sleep_or_shutdown(delay, &mut self.shutdown).await {
                return;
            }
        }
    }

    /// One session; `None` when the control plane is stopping.
    async fn session(&mut self, backoff: &mut Backoff) -> Option<String> {
        let stream = kube::runtime::watcher(self.api.clone(), watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        let mut listed = Vec::new();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = stopped(&mut self.shutdown) => return None,
            };
            let seen = Instant::now();
            let event = match next {
                None => return Some("watch stream ended".into()),
                Some(Err(e)) => return Some(e.to_string()),
                Some(Ok(e)) => e,
            };
            let update = match event {
                Event::Init => {
                    listed.clear();
                    continue;
                }
                Event::InitApply(o) => {
                    if let Some(r) = (self.convert)(&o) {
                        listed.push(r);
                    }
                    continue;
                }
                Event::InitDone => {
                    backoff.reset();
                    tracing::info!(kind = %self.kind, objects = listed.len(), "kubernetes objects listed");
                    Update::ObjectResync(SourceKind::Kube, self.kind, std::mem::take(&mut listed))
                }
                Event::Apply(o) => match (self.convert)(&o) {
                    Some(r) => Update::ObjectUpsert(SourceKind::Kube, self.kind, r),
                    None => Update::ObjectDelete(SourceKind::Kube, self.kind, (self.key)(&o)),
                },
                Event::Delete(o) => Update::ObjectDelete(SourceKind::Kube, self.kind, (self.key)(&o)),
            };
            self.metrics.source_event(SourceKind::Kube);
            if self.tx.send(seen, update).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A `networking.k8s.io/v1` NetworkPolicy as a 1.25+ server returns it, with `endPort` (which
    /// the 1.20 test server drops) and every kind of peer.
    const POLICY: &str = include_str!("../../tests/fixtures/networkpolicy-v1.json");

    #[test]
    fn a_policy_with_end_port_from_a_newer_server() {
        let np: NetworkPolicy = serde_json::from_str(POLICY).expect("fixture");
        let Ok(PolicyObject::NetworkPolicy(s)) = policy_object(&np) else { panic!("valid policy") };
        assert_eq!(s.key(), "shop/db-access");
        assert_eq!(s.policy_types.as_deref(), Some(&["Ingress".to_owned(), "Egress".to_owned()][..]));
        let p = &s.ingress[0].ports;
        assert_eq!(
            (p[0].protocol.as_deref(), &p[0].port, p[0].end_port),
            (Some("TCP"), &Some(PortValue::Number(5432)), Some(5440))
        );
        assert_eq!(p[1].port, Some(PortValue::Name("metrics".into())));
        let peers = &s.ingress[0].peers;
        assert_eq!(peers.len(), 3);
        assert!(peers[0].pod_selector.is_some() && peers[0].namespace_selector.is_some(), "AND in one peer");
        assert_eq!(peers[1].namespace_selector.as_ref().map(|n| n.match_expressions[0].operator.as_str()), Some("In"));
        assert_eq!(peers[2].ip_block.as_ref().map(|b| (b.cidr.as_str(), b.except.len())), Some(("10.0.0.0/8", 1)));
        assert_eq!(s.egress[0].peers[0].ip_block.as_ref().map(|b| b.cidr.as_str()), Some("0.0.0.0/0"));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let mut v: serde_json::Value = serde_json::from_str(POLICY).expect("fixture");
        v["spec"]["ingress"][0]["ports"][0]["endPort"] = json!(10);
        let e = policy_object(&serde_json::from_value(v.clone()).expect("policy")).expect_err("endPort < port");
        assert_eq!((e.node.as_str(), e.field.as_str()), ("shop/db-access", "spec.ingress[0].ports[0].endPort"));
        v["spec"]["ingress"][0]["ports"][0]["endPort"] = json!(5440);
        v["spec"]["ingress"][0]["from"][2]["ipBlock"]["cidr"] = json!("10.0.0.300/8");
        let e = policy_object(&serde_json::from_value(v).expect("policy")).expect_err("bad cidr");
        assert_eq!(e.field, "spec.ingress[0].from[2].ipBlock.cidr");
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn pods_with_ips_node_and_named_ports() {
        let p = pod(json!({
            "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "c", "ports": [{"name": "serve-80", "containerPort": 80},
                                        {"containerPort": 81},
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}]}
        }));
        let Some(Ok(PolicyObject::Pod(s))) = pod_object(&p) else { panic!("valid pod") };
        assert_eq!((s.key().as_str(), s.node.as_str(), s.labels["pod"].as_str()), ("x/a", "n1", "a"));
        assert_eq!(s.ips.len(), 2);
        assert_eq!(
            s.ports,
            [
                NamedPort { name: "serve-80".into(), protocol: PolicyProtocol::Tcp, port: 80 },
                NamedPort { name: "dns".into(), protocol: PolicyProtocol::Udp, port: 53 },
            ]
        );
        // Not scheduled yet: no node, no address.
        let Some(Ok(PolicyObject::Pod(s))) = pod_object(&pod(json!({"metadata": {"namespace": "x", "name": "b"}})))
        else {
            panic!("valid pod")
        };
        assert!(s.ips.is_empty() && s.node.is_empty());
        // Host network: not reported. Finished: no addresses.
        assert!(
            pod_object(&pod(json!({"metadata": {"namespace": "x", "name": "h"},
            "spec": {"hostNetwork": true, "containers": []}})))
            .is_none()
        );
        let Some(Ok(PolicyObject::Pod(s))) = pod_object(&pod(json!({"metadata": {"namespace": "x", "name": "d"},
            "status": {"phase": "Succeeded", "podIP": "10.244.1.6"}})))
        else {
            panic!("valid pod")
        };
        assert!(s.ips.is_empty());
    }

    #[test]
    fn bad_pods_name_the_field() {
        let e = pod_object(&pod(json!({"metadata": {"namespace": "x", "name": "a"},
            "status": {"podIP": "10.244.1.300"}})))
        .expect("reported")
        .expect_err("bad ip");
        assert_eq!((e.node.as_str(), e.field.as_str()), ("x/a", "status.podIPs"));
        let e = pod_object(&pod(json!({"metadata": {"namespace": "x", "name": "a"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "p", "containerPort": 70000}]}]}})))
        .expect("reported")
        .expect_err("bad port");
        assert_eq!(e.field, "spec.containers[0].ports[0].containerPort");
    }
}

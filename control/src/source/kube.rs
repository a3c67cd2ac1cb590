//! The Kubernetes source (control side): list+watch Node objects, turn each into a [`NodeSpec`],
//! and announce this node through Flannel-compatible annotations.
//!
//! - Each session is a fresh list-then-watch ([`kube::runtime::watcher`] in its default mode, which
//!   1.20 servers support). The list becomes one [`Update::Resync`], so a reconnect removes routes
//!   of nodes deleted while we were away; watch events become upserts and deletes.
//! - Any error ends the session: the source is marked down, waits with [`Backoff`] and starts a new
//!   session (a full resync). Tables stay as they were meanwhile.
//! - Per node: `spec.podCIDRs` (else `spec.podCIDR`); the underlay address from Flannel's
//!   `public-ip` annotation, else the first InternalIP (IPv4 preferred); tunnel type, VNI and VTEP
//!   MAC from Flannel's `backend-type` / `backend-data` when present, else the configured defaults.
//! - Announcing: when this node's Node object lacks ferry's view of its annotations, a merge patch
//!   writes them (and again whenever someone changes them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_encap::TunnelKind;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::watch;

use super::{Backoff, EventTx};
use crate::config::{ControlConfig, KubeAuth};
use crate::flannel::{self, BackendData};
use crate::metrics::Metrics;
use crate::model::Update;
use crate::model::{NodeSpec, Rejection, Seniority, SourceKind, parse_cidr, parse_tunnel};
use crate::shutdown::{sleep_or_shutdown, stopped};

/// Credentials could not be turned into a client.
#[derive(Debug, thiserror::Error)]
#[error("kubernetes client configuration ({what}): {source}")]
pub struct KubeClientError {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl KubeClientError {
    fn new(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        KubeClientError { what: what.into(), source: source.into() }
    }
}

/// Builds a client from the configured credentials. Does not contact the server.
///
/// # Errors
/// [`KubeClientError`] when the kubeconfig, token file or URL is unusable.
pub async fn client(auth: &KubeAuth) -> Result<kube::Client, KubeClientError> {
    let config = match auth {
        KubeAuth::Infer => kube::Config::infer().await.map_err(|e| KubeClientError::new("inferred", e))?,
        KubeAuth::Kubeconfig(path) => {
            let what = format!("kubeconfig {}", path.display());
            let kc = Kubeconfig::read_from(path).map_err(|e| KubeClientError::new(&what, e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeClientError::new(&what, e))?
        }
        KubeAuth::Token { server, token_file, ca_file, insecure } => {
            if !token_file.is_file() {
                return Err(KubeClientError::new(
                    format!("token file {}", token_file.display()),
                    "not a readable file",
                ));
            }
            let mut cluster = json!({ "server": server, "insecure-skip-tls-verify": insecure });
            if let Some(ca) = ca_file {
                cluster["certificate-authority"] = json!(ca.display().to_string());
            }
            let kc: Kubeconfig = serde_json::from_value(json!({
                "clusters": [{ "name": "ferry", "cluster": cluster }],
                "users": [{ "name": "ferry", "user": { "tokenFile": token_file.display().to_string() } }],
                "contexts": [{ "name": "ferry", "context": { "cluster": "ferry", "user": "ferry" } }],
                "current-context": "ferry",
            }))
            .map_err(|e| KubeClientError::new("token", e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeClientError::new(format!("server {server}"), e))?
        }
    };
    kube::Client::try_from(config).map_err(|e| KubeClientError::new("client", e))
}

/// What the parser needs besides the Node.
#[derive(Debug, Clone)]
pub struct ParseCtx {
    /// This node's name: its CIDRs are local.
    pub own_name: String,
    /// Tunnel type for nodes without a `backend-type` annotation.
    pub tunnel: TunnelKind,
    /// VNI for nodes without one in `backend-data`.
    pub vni: u32,
    /// Tunnel port.
    pub port: u16,
}

impl ParseCtx {
    /// From the control plane's configuration.
    pub fn from_config(c: &ControlConfig) -> Self {
        ParseCtx { own_name: c.node_name.clone(), tunnel: c.tunnel, vni: c.vni, port: c.default_port() }
    }
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

/// Turns a Node into a spec.
///
/// # Errors
/// A [`Rejection`] naming the node and the offending field.
pub fn node_spec(node: &Node, ctx: &ParseCtx) -> Result<NodeSpec, Rejection> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let reject = |field: &str, reason: String| Rejection::new(name.clone(), field, reason);
    let spec = node.spec.as_ref();
    let (field, raw): (&str, Vec<&str>) = match spec.and_then(|s| s.pod_cidrs.as_ref()).filter(|v| !v.is_empty()) {
        Some(list) => ("spec.podCIDRs", list.iter().map(String::as_str).collect()),
        None => ("spec.podCIDR", spec.and_then(|s| s.pod_cidr.as_deref()).into_iter().collect()),
    };
    let pod_cidrs = raw.iter().map(|c| parse_cidr(c)).collect::<Result<Vec<_>, _>>().map_err(|e| reject(field, e))?;

    let annotations = node.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);

    // The announced address (with its IPv6 partner), else the InternalIPs: the first of each
    // family, IPv4 first.
    let (underlay, other_underlay) = match annotation(flannel::PUBLIC_IP) {
        Some(ip) => {
            let ip = ip
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| reject(&annotation_field(flannel::PUBLIC_IP), format!("{ip:?} is not an IP address")))?;
            let six = match annotation(flannel::PUBLIC_IPV6) {
                Some(six) => Some(six.trim().parse::<Ipv6Addr>().map_err(|_| {
                    reject(&annotation_field(flannel::PUBLIC_IPV6), format!("{six:?} is not an IPv6 address"))
                })?),
                None => None,
            };
            (ip, six.filter(|_| ip.is_ipv4()).map(IpAddr::V6))
        }
        None => match internal_ips(node) {
            Ok(Some(pair)) => pair,
            Ok(None) if pod_cidrs.is_empty() => (IpAddr::from([0, 0, 0, 0]), None),
            Ok(None) => {
                return Err(reject(
                    "status.addresses",
                    format!("no InternalIP address and no {} annotation", flannel::PUBLIC_IP),
                ));
            }
            Err(bad) => return Err(reject("status.addresses", format!("InternalIP {bad:?} is not an IP address"))),
        },
    };
    let tunnel = match annotation(flannel::BACKEND_TYPE) {
        Some(t) => parse_tunnel(t).map_err(|e| reject(&annotation_field(flannel::BACKEND_TYPE), e))?,
        None => ctx.tunnel,
    };
    let data = match annotation(flannel::BACKEND_DATA) {
        Some(d) => BackendData::from_annotation(d).map_err(|e| reject(&annotation_field(flannel::BACKEND_DATA), e))?,
        None => BackendData::default(),
    };
    let seniority = Seniority {
        created: node.metadata.creation_timestamp.as_ref().map_or(i64::MAX, |t| t.0.as_second()),
        uid: node.metadata.uid.clone().unwrap_or_default(),
    };
    Ok(NodeSpec {
        local: name == ctx.own_name,
        seniority,
        name,
        pod_cidrs,
        underlay,
        other_underlay,
        vtep_mac: data.vtep_mac,
        vni: data.vni.unwrap_or(ctx.vni),
        tunnel,
        port: ctx.port,
    }
    .normalized())
}

/// The first InternalIP, IPv4 preferred. `Err` carries an unparsable one.
fn internal_ips(node: &Node) -> Result<Option<(IpAddr, Option<IpAddr>)>, String> {
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let mut parsed = Vec::new();
    for a in addrs.into_iter().flatten().filter(|a| a.type_ == "InternalIP") {
        parsed.push(a.address.trim().parse::<IpAddr>().map_err(|_| a.address.clone())?);
    }
    let v4 = parsed.iter().copied().find(IpAddr::is_ipv4);
    let v6 = parsed.iter().copied().find(IpAddr::is_ipv6);
    Ok(match (v4, v6) {
        (Some(a), b) => Some((a, b)),
        (None, Some(b)) => Some((b, None)),
        (None, None) => None,
    })
}

/// The annotations this node announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    public_ip: IpAddr,
    public_ipv6: Option<Ipv6Addr>,
    tunnel: TunnelKind,
    data: BackendData,
}

impl Announcement {
    /// From the configuration; `None` without a public IP.
    pub fn from_config(c: &ControlConfig) -> Option<Self> {
        Some(Announcement {
            public_ip: c.public_ip?,
            public_ipv6: c.public_ipv6,
            tunnel: c.tunnel,
            data: BackendData { vni: Some(c.vni), vtep_mac: c.vtep_mac },
        })
    }

    /// Whether `node` already carries these annotations (compared as values, not strings).
    pub fn is_current(&self, node: &Node) -> bool {
        let Some(a) = node.metadata.annotations.as_ref() else { return false };
        let ip_ok = a.get(flannel::PUBLIC_IP).and_then(|s| s.trim().parse::<IpAddr>().ok()) == Some(self.public_ip);
        let type_ok = a.get(flannel::BACKEND_TYPE).and_then(|s| parse_tunnel(s).ok()) == Some(self.tunnel);
        let data_ok =
            a.get(flannel::BACKEND_DATA).and_then(|s| BackendData::from_annotation(s).ok()) == Some(self.data);
        let ip6_ok = a.get(flannel::PUBLIC_IPV6).and_then(|s| s.trim().parse::<Ipv6Addr>().ok()) == self.public_ipv6;
        ip_ok && ip6_ok && type_ok && data_ok
    }

    /// The merge patch that writes them.
    pub fn patch(&self) -> serde_json::Value {
        let mut annotations = BTreeMap::new();
        annotations.insert(flannel::PUBLIC_IP, json!(self.public_ip.to_string()));
        // null removes one a previous configuration wrote (a merge patch).
        annotations.insert(flannel::PUBLIC_IPV6, json!(self.public_ipv6.map(|a| a.to_string())));
        annotations.insert(flannel::BACKEND_TYPE, json!(self.tunnel.name()));
        annotations.insert(flannel::BACKEND_DATA, json!(self.data.to_value().to_string()));
        json!({ "metadata": { "annotations": annotations } })
    }
}

/// Pause after a refused announcement before the next attempt.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(30);

/// The Kubernetes source task.
#[derive(Debug)]
pub(crate) struct KubeSource {
    pub(crate) api: Api<Node>,
    pub(crate) ctx: ParseCtx,
    pub(crate) announce: Option<Announcement>,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    EngineGone(#[from] super::EngineGone),
    #[error("watch failed: {0}")]
    Watch(#[from] watcher::Error),
    #[error("watch stream ended")]
    StreamEnded,
}

impl KubeSource {
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let announcing = Arc::new(AtomicBool::new(false));
        loop {
            match self.session(&mut backoff, &announcing).await {
                SessionEnd::Shutdown | SessionEnd::EngineGone(_) => return,
                e => {
                    self.metrics.set_source_up(SourceKind::Kube, false);
                    self.metrics.source_reconnect(SourceKind::Kube);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e, retry_in = ?delay,
                        "kubernetes source disconnected; forwarding continues on the last tables"
                    );
                    if sleep_or_shutdown(delay, &mut self.shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// One list-then-watch session; returns why it ended.
    async fn session(&mut self, backoff: &mut Backoff, announcing: &Arc<AtomicBool>) -> SessionEnd {
        let stream = watcher(self.api.clone(), watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        let mut listed = Vec::new();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = stopped(&mut self.shutdown) => return SessionEnd::Shutdown,
            };
            let seen = Instant::now();
            let event = match next {
                None => return SessionEnd::StreamEnded,
                Some(Err(e)) => return SessionEnd::Watch(e),
                Some(Ok(e)) => e,
            };
            let result = match event {
                Event::Init => {
                    listed.clear();
                    Ok(())
                }
                Event::InitApply(node) => {
                    self.maybe_announce(&node, announcing);
                    listed.push(node_spec(&node, &self.ctx));
                    Ok(())
                }
                Event::InitDone => {
                    let n = listed.len();
                    let r = self.tx.send(seen, Update::Resync(SourceKind::Kube, std::mem::take(&mut listed))).await;
                    self.metrics.source_event(SourceKind::Kube);
                    self.metrics.set_source_up(SourceKind::Kube, true);
                    backoff.reset();
                    tracing::info!(nodes = n, "kubernetes source synced");
                    r
                }
                Event::Apply(node) => {
                    self.maybe_announce(&node, announcing);
                    self.metrics.source_event(SourceKind::Kube);
                    self.tx.send(seen, Update::Upsert(SourceKind::Kube, node_spec(&node, &self.ctx))).await
                }
                Event::Delete(node) => {
                    self.metrics.source_event(SourceKind::Kube);
                    let name = node.metadata.name.unwrap_or_default();
                    self.tx.send(seen, Update::Delete(SourceKind::Kube, name)).await
                }
            };
            if let Err(e) = result {
                return SessionEnd::EngineGone(e);
            }
        }
    }

    /// Patches this node's annotations when they differ from what it should announce. Runs in
    /// the background; at most one patch in flight (the watch event it causes settles it).
    fn maybe_announce(&self, node: &Node, announcing: &Arc<AtomicBool>) {
        let Some(announce) = &self.announce else { return };
        if node.metadata.name.as_deref() != Some(self.ctx.own_name.as_str()) || announce.is_current(node) {
            return;
        }
        if announcing.swap(true, Ordering::AcqRel) {
            return;
        }
        let api = self.api.clone();
        let name = self.ctx.own_name.clone();
        let patch = announce.patch();
        let flag = announcing.clone();
        tokio::spawn(async move {
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => tracing::info!(node = %name, annotations = %patch, "announced this node"),
                Err(e) => {
                    tracing::warn!(
                        node = %name, error = %e, retry_after = ?ANNOUNCE_RETRY,
                        "cannot announce this node; retrying on its next update"
                    );
                    // The kubelet updates its Node every few seconds: without a pause a refused
                    // patch (RBAC, a webhook) would be retried, and logged, on each of them.
                    tokio::time::sleep(ANNOUNCE_RETRY).await;
                }
            }
            flag.store(false, Ordering::Release);
        });
    }
}

fn watcher(api: Api<Node>, config: watcher::Config) -> impl futures_util::Stream<Item = watcher::Result<Event<Node>>> {
    kube::runtime::watcher(api, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ParseCtx {
        ParseCtx { own_name: "me".into(), tunnel: TunnelKind::Vxlan, vni: 1, port: 4789 }
    }

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).expect("node json")
    }

    /// RECORDED from the real kube-apiserver (1.20, built by scripts/build-kube-apiserver.sh):
    /// a Node created with podCIDRs `["10.244.7.0/24", "fd00:10:244:7::/64"]` and an InternalIP,
    /// then annotated the way Flannel does; `GET` output with managedFields removed. Without the
    /// IPv6DualStack feature gate (alpha in 1.20) the server kept only the first pod CIDR, and it
    /// added the not-ready taint and empty nodeInfo: real-server behaviour a hand-written fixture
    /// would miss.
    const RECORDED_NODE: &str = include_str!("../../tests/fixtures/node-recorded.json");

    #[test]
    fn recorded_node_from_the_real_server() {
        let n: Node = serde_json::from_str(RECORDED_NODE).expect("recorded node");
        let s = node_spec(&n, &ctx()).expect("valid");
        assert_eq!(s.name, "recorded-1");
        assert_eq!(s.pod_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(), ["10.244.7.0/24"]);
        assert_eq!(s.underlay, "192.0.2.70".parse::<IpAddr>().expect("ip"));
        assert_eq!(s.vtep_mac.map(|m| m.to_string()).as_deref(), Some("02:42:c0:00:02:46"));
        assert_eq!(s.vni, 1);
        assert!(!s.local);
        // Seniority from the server's own record: creationTimestamp 2026-11-21T14:05:54Z, the UID.
        assert_eq!(s.seniority.created, 1_795_269_954);
        assert_eq!(s.seniority.uid, "9a1227fb-8e0b-4d3c-82b8-e27ddc736c1f");
    }

    #[test]
    fn pod_cidr_fallback_internal_ip_and_defaults() {
        let n = node(json!({
            "metadata": {"name": "a"},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "a"},
                {"type": "InternalIP", "address": "fd00::a"},
                {"type": "InternalIP", "address": "192.0.2.1"}
            ]}
        }));
        let s = node_spec(&n, &ctx()).expect("valid");
        assert_eq!(s.pod_cidrs, ["10.244.1.0/24".parse::<ipnet::IpNet>().expect("net")]);
        // One InternalIP of each family: both underlay addresses, IPv4 first.
        assert_eq!(s.underlay, "192.0.2.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(s.other_underlay, Some("fd00::a".parse::<IpAddr>().expect("ip")));
        assert_eq!((s.vtep_mac, s.vni, s.tunnel, s.port), (None, 1, TunnelKind::Vxlan, 4789));
        // No CIDR yet and no address: fine, nothing to route.
        assert!(node_spec(&node(json!({"metadata": {"name": "b"}})), &ctx()).is_ok_and(|s| s.pod_cidrs.is_empty()));
        let me = node_spec(
            &node(json!({"metadata": {"name": "me"}, "spec": {"podCIDR": "10.244.9.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.9"}]}})),
            &ctx(),
        );
        assert!(me.is_ok_and(|s| s.local));
    }

    #[test]
    fn flannel_annotations_override() {
        let n = node(json!({
            "metadata": {"name": "f", "annotations": {
                "flannel.alpha.coreos.com/public-ip": "198.51.100.7",
                "flannel.alpha.coreos.com/backend-type": "geneve",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":42,\"VtepMAC\":\"02:00:00:00:00:07\"}"
            }},
            "spec": {"podCIDRs": ["10.244.2.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}]}
        }));
        let s = node_spec(&n, &ctx()).expect("valid");
        assert_eq!((s.underlay, s.other_underlay), ("198.51.100.7".parse::<IpAddr>().expect("ip"), None));
        assert_eq!((s.vni, s.tunnel), (42, TunnelKind::Geneve));
        let mut dual = n.clone();
        if let Some(a) = dual.metadata.annotations.as_mut() {
            a.insert("flannel.alpha.coreos.com/public-ipv6".into(), "2001:db8::7".into());
        }
        let s = node_spec(&dual, &ctx()).expect("valid");
        assert_eq!(s.other_underlay, Some("2001:db8::7".parse::<IpAddr>().expect("ip")));
        assert!(s.vtep_mac.is_some());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!({"spec": {"podCIDRs": ["10.244.3.1/24"]}}), "spec.podCIDRs"),
            (json!({"spec": {"podCIDR": "banana"}}), "spec.podCIDR"),
            (json!({"spec": {"podCIDR": "10.244.3.0/24"}}), "status.addresses"),
            (
                json!({"spec": {"podCIDR": "10.244.3.0/24"}, "status": {"addresses": [{"type": "InternalIP", "address": "x"}]}}),
                "status.addresses",
            ),
            (
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "1.2.3"}}, "spec": {"podCIDR": "10.244.3.0/24"}}),
                "metadata.annotations[flannel.alpha.coreos.com/public-ip]",
            ),
            (
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.0.2.3",
                    "flannel.alpha.coreos.com/public-ipv6": "192.0.2.4"}}, "spec": {"podCIDR": "10.244.3.0/24"}}),
                "metadata.annotations[flannel.alpha.coreos.com/public-ipv6]",
            ),
            (
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.0.2.3",
                    "flannel.alpha.coreos.com/backend-data": "{\"VtepMAC\": 5}"}}, "spec": {"podCIDR": "10.244.3.0/24"}}),
                "metadata.annotations[flannel.alpha.coreos.com/backend-data]",
            ),
            (
                json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.0.2.3",
                    "flannel.alpha.coreos.com/backend-type": "host-gw"}}, "spec": {"podCIDR": "10.244.3.0/24"}}),
                "metadata.annotations[flannel.alpha.coreos.com/backend-type]",
            ),
        ];
        for (mut v, field) in cases {
            v["metadata"]["name"] = json!("bad");
            let e = node_spec(&node(v.clone()), &ctx()).expect_err(field);
            assert_eq!((e.node.as_str(), e.field.as_str()), ("bad", field), "{v}");
        }
    }

    #[test]
    fn announcement_round_trips_through_the_parser() {
        let mut c = ControlConfig::new("me");
        c.public_ip = Some("192.0.2.9".parse().expect("ip"));
        c.vtep_mac = Some("02:00:00:00:00:09".parse().expect("mac"));
        c.vni = 5;
        // What a merge patch leaves: the non-null values (null deletes).
        let applied = |a: &Announcement| {
            let mut v = a.patch()["metadata"]["annotations"].clone();
            v.as_object_mut().expect("object").retain(|_, v| !v.is_null());
            serde_json::from_value(v).expect("map")
        };
        let a = Announcement::from_config(&c).expect("announce");
        let mut n = node(json!({"metadata": {"name": "me"}, "spec": {"podCIDR": "10.244.9.0/24"}}));
        assert!(!a.is_current(&n));
        n.metadata.annotations = applied(&a);
        assert!(a.is_current(&n));
        let other = ParseCtx { own_name: "other".into(), ..ctx() };
        let s = node_spec(&n, &other).expect("valid");
        assert_eq!((s.underlay, s.vni, s.vtep_mac, s.other_underlay), (c.public_ip.expect("ip"), 5, c.vtep_mac, None));
        // Both families: the IPv6 address announced as Flannel's public-ipv6.
        c.public_ipv6 = Some("2001:db8::9".parse().expect("ip"));
        let a6 = Announcement::from_config(&c).expect("announce");
        assert!(!a6.is_current(&n), "the IPv6 address is not announced yet");
        n.metadata.annotations = applied(&a6);
        assert!(a6.is_current(&n) && !a.is_current(&n));
        let s = node_spec(&n, &other).expect("valid");
        assert_eq!(s.other_underlay, Some("2001:db8::9".parse::<IpAddr>().expect("ip")));
    }
}

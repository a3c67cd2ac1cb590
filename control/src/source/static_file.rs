//! The static file source (control side), for labs and tests: a TOML file of nodes, reloaded when
//! it changes (inotify on its directory, so editors' rename-over-the-file is seen, plus a slow poll
//! as a safety net).
//!
//! ```toml
//! cluster_cidrs = ["10.244.0.0/16"]      # optional: every pod CIDR must lie in one of these
//!
//! [[node]]
//! name = "node-a"
//! pod_cidrs = ["10.244.1.0/24", "fd00:10:244:1::/64"]
//! underlay = "192.168.0.10"
//! vtep_mac = "02:00:c0:a8:00:0a"         # optional
//! vni = 1                                 # optional (default: --vni)
//! tunnel = "vxlan"                        # optional (default: --tunnel)
//! port = 4789                             # optional (default: --tunnel-port)
//!
//! [[service]]                             # a ClusterIP service (the data plane translates it)
//! name = "default/web"
//! vip = "10.244.255.10"
//! port = 80
//! protocol = "TCP"                        # optional: TCP (default) | UDP
//! endpoints = ["10.244.1.2:8080"]         # ready endpoints
//! terminating = ["10.244.1.3:8080"]       # optional: serving and terminating
//! session_affinity_seconds = 10800        # optional: sessionAffinity ClientIP
//! ```
//!
//! Each load is a full resync. A file that does not parse as a whole keeps the last good routes
//! (one warning, counted under field `file`); a bad node entry is rejected on its own, naming the
//! node and the field.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_encap::TunnelKind;
use ferry_tables::{EndpointSpec, Protocol, ServiceSpec};
use ipnet::IpNet;
use notify::Watcher;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use super::EventTx;
use crate::config::ControlConfig;
use crate::metrics::Metrics;
use crate::model::Update;
use crate::model::{NodeSpec, Rejection, Seniority, SourceKind, check_vni, parse_cidr, parse_tunnel, parse_vtep_mac};

/// How often the file is checked even without an inotify event. Short, because a missed event
/// was seen with agents started under `ip netns exec` (the end-to-end lab): a peer that has not
/// reloaded drops a new node's traffic as from an unknown node until it does. Reading a small
/// file and comparing its bytes four times a second costs nothing.
const POLL: Duration = Duration::from_millis(250);
/// How long the file must be quiet after a change before it is read.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    cluster_cidrs: Vec<String>,
    #[serde(default, rename = "node")]
    nodes: Vec<Entry>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    vip: String,
    port: u16,
    protocol: Option<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    terminating: Vec<String>,
    session_affinity_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    pod_cidrs: Vec<String>,
    underlay: Option<String>,
    vtep_mac: Option<String>,
    vni: Option<u64>,
    tunnel: Option<String>,
    port: Option<u16>,
}

/// Defaults for fields a node entry leaves out.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// This node's name: its entry is local.
    pub own_name: String,
    /// Tunnel type.
    pub tunnel: TunnelKind,
    /// VNI.
    pub vni: u32,
    /// Port, when configured.
    pub port: Option<u16>,
}

impl Defaults {
    /// From the control plane's configuration.
    pub fn from_config(c: &ControlConfig) -> Self {
        Defaults { own_name: c.node_name.clone(), tunnel: c.tunnel, vni: c.vni, port: c.tunnel_port }
    }
}

/// A parsed file: the cluster networks, one result per node entry, one per service entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// `cluster_cidrs`.
    pub networks: Vec<IpNet>,
    /// One per `[[node]]`.
    pub nodes: Vec<Result<NodeSpec, Rejection>>,
    /// One per `[[service]]` (a rejection names the service in its `node` field).
    pub services: Vec<Result<ServiceSpec, Rejection>>,
}

/// Parses the file's text.
///
/// # Errors
/// A reason (with TOML's line and column) when the file as a whole is unusable.
pub fn parse(text: &str, d: &Defaults) -> Result<Parsed, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let networks = file
        .cluster_cidrs
        .iter()
        .map(|c| parse_cidr(c).map_err(|e| format!("cluster_cidrs: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = BTreeSet::new();
    let nodes = file
        .nodes
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if !seen.insert(e.name.clone()) {
                return Err(Rejection::new(e.name, "name", "appears twice in the file"));
            }
            // The entry's position ranks overlapping claims: the earlier entry keeps the CIDR.
            entry_spec(e, d).map(|s| NodeSpec { seniority: Seniority { created: i as i64, uid: String::new() }, ..s })
        })
        .collect();
    let mut seen = BTreeSet::new();
    let services = file
        .services
        .into_iter()
        .map(|e| {
            if !seen.insert(e.name.clone()) {
                return Err(Rejection::new(e.name, "name", "appears twice in the file"));
            }
            service_spec(e)
        })
        .collect();
    Ok(Parsed { networks, nodes, services })
}

/// `ADDRESS:PORT` or `[V6]:PORT`.
fn endpoint(s: &str) -> Result<(IpAddr, u16), String> {
    let a: std::net::SocketAddr = s.trim().parse().map_err(|_| format!("{s:?} is not ADDRESS:PORT"))?;
    Ok((a.ip(), a.port()))
}

fn service_spec(e: ServiceEntry) -> Result<ServiceSpec, Rejection> {
    let reject = |field: &str, reason: String| Rejection::new(e.name.clone(), field, reason);
    let vip = e.vip.trim().parse::<IpAddr>().map_err(|_| reject("vip", format!("{:?} is not an IP address", e.vip)))?;
    let protocol = match e.protocol.as_deref().map(str::trim) {
        None | Some("TCP" | "tcp") => Protocol::Tcp,
        Some("UDP" | "udp") => Protocol::Udp,
        Some(other) => return Err(reject("protocol", format!("`{other}` is not one of TCP, UDP"))),
    };
    if e.port == 0 {
        return Err(reject("port", "0 is not a port".into()));
    }
    let mut endpoints = Vec::with_capacity(e.endpoints.len() + e.terminating.len());
    for (field, list, ready) in [("endpoints", &e.endpoints, true), ("terminating", &e.terminating, false)] {
        for s in list {
            let (addr, port) = endpoint(s).map_err(|r| reject(field, r))?;
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err(reject(field, format!("{s} is not in the VIP's address family")));
            }
            if port == 0 {
                return Err(reject(field, format!("{s}: 0 is not a port")));
            }
            endpoints.push(EndpointSpec { addr, port, ready, serving: true, terminating: !ready });
        }
    }
    Ok(ServiceSpec {
        name: e.name,
        vip,
        port: e.port,
        protocol,
        endpoints,
        affinity: e.session_affinity_seconds.map(Duration::from_secs),
    })
}

fn entry_spec(e: Entry, d: &Defaults) -> Result<NodeSpec, Rejection> {
    let reject = |field: &str, reason: String| Rejection::new(e.name.clone(), field, reason);
    let pod_cidrs =
        e.pod_cidrs.iter().map(|c| parse_cidr(c)).collect::<Result<Vec<_>, _>>().map_err(|r| reject("pod_cidrs", r))?;
    let underlay = match &e.underlay {
        Some(u) => u.trim().parse::<IpAddr>().map_err(|_| reject("underlay", format!("{u:?} is not an IP address")))?,
        None if pod_cidrs.is_empty() || e.name == d.own_name => IpAddr::from([0, 0, 0, 0]),
        None => return Err(reject("underlay", "missing".into())),
    };
    let vtep_mac = e.vtep_mac.as_deref().map(parse_vtep_mac).transpose().map_err(|r| reject("vtep_mac", r))?;
    let vni = e.vni.map(check_vni).transpose().map_err(|r| reject("vni", r))?.unwrap_or(d.vni);
    let tunnel =
        e.tunnel.as_deref().map(parse_tunnel).transpose().map_err(|r| reject("tunnel", r))?.unwrap_or(d.tunnel);
    Ok(NodeSpec {
        local: e.name == d.own_name,
        name: e.name,
        pod_cidrs,
        underlay,
        vtep_mac,
        vni,
        tunnel,
        port: e.port.or(d.port).unwrap_or(tunnel.default_port()),
        seniority: Seniority::default(),
    }
    .normalized())
}

/// The static file source task.
#[derive(Debug)]
pub(crate) struct StaticSource {
    pub(crate) path: PathBuf,
    pub(crate) defaults: Defaults,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl StaticSource {
    pub(crate) async fn run(mut self) {
        let (ntx, mut nrx) = mpsc::unbounded_channel::<()>();
        let file_name = self.path.file_name().map(ToOwned::to_owned);
        let handler = move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| ev.paths.iter().any(|p| p.file_name() == file_name.as_deref())) {
                let _ = ntx.send(());
            }
        };
        // Keep the watcher alive for the task's lifetime; without it the poll still works.
        let _watcher = match notify::recommended_watcher(handler) {
            Ok(mut w) => {
                let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the static routes' directory; polling");
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file notifications; polling the static routes file");
                None
            }
        };
        let mut last: Option<Vec<u8>> = None;
        let mut warned: Option<String> = None;
        let mut poll = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut self.shutdown) => return,
                _ = poll.tick() => {}
                Some(()) = nrx.recv() => {
                    // Read once the file has been quiet for SETTLE: an in-place rewrite (truncate,
                    // then write) caught half-way would otherwise publish a truncated table.
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let mut more = false;
                        while nrx.try_recv().is_ok() {
                            more = true;
                        }
                        if !more {
                            break;
                        }
                    }
                }
            }
            let seen = Instant::now();
            // A small file: reading it inline is cheaper than a blocking-pool round trip.
            let text = match std::fs::read(&self.path) {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", self.path.display());
                    if warned.as_deref() != Some(msg.as_str()) {
                        tracing::warn!("{msg}; keeping the last good routes");
                        self.metrics.set_source_up(SourceKind::Static, false);
                        warned = Some(msg);
                    }
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_slice()) {
                continue;
            }
            let parsed = std::str::from_utf8(&text).map_err(|e| e.to_string()).and_then(|t| parse(t, &self.defaults));
            last = Some(text);
            match parsed {
                Ok(p) => {
                    warned = None;
                    self.metrics.set_source_up(SourceKind::Static, true);
                    self.metrics.source_event(SourceKind::Static);
                    tracing::info!(file = %self.path.display(), nodes = p.nodes.len(), services = p.services.len(), "static routes loaded");
                    let mut services = Vec::with_capacity(p.services.len());
                    for s in p.services {
                        match s {
                            Ok(s) => services.push(s),
                            Err(r) => {
                                tracing::warn!(service = %r.node, field = %r.field, reason = %r.reason, "service entry rejected");
                                self.metrics.rejected(SourceKind::Static, &r.field);
                            }
                        }
                    }
                    let net = self.tx.send(seen, Update::Network(SourceKind::Static, p.networks)).await;
                    if net.is_err()
                        || self.tx.send(seen, Update::Resync(SourceKind::Static, p.nodes)).await.is_err()
                        || self.tx.send(seen, Update::Services(SourceKind::Static, services)).await.is_err()
                    {
                        return;
                    }
                }
                Err(reason) => {
                    let msg = format!("{}: {reason}", self.path.display());
                    if warned.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(node = "*", field = "file", reason = %msg, "static routes file rejected; keeping the last good routes");
                        self.metrics.rejected(SourceKind::Static, "file");
                        self.metrics.set_source_up(SourceKind::Static, false);
                        warned = Some(msg);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults { own_name: "me".into(), tunnel: TunnelKind::Vxlan, vni: 1, port: None }
    }

    #[test]
    fn parses_nodes_with_defaults_and_names_bad_fields() {
        let text = r#"
            cluster_cidrs = ["10.244.0.0/16"]
            [[node]]
            name = "me"
            pod_cidrs = ["10.244.9.0/24"]
            [[node]]
            name = "a"
            pod_cidrs = ["10.244.1.0/24", "fd00:1::/64"]
            underlay = "192.0.2.1"
            tunnel = "geneve"
            [[node]]
            name = "b"
            pod_cidrs = ["10.244.2.0/24"]
            underlay = "192.0.2.2"
            vtep_mac = "ff:ff:ff:ff:ff:ff"
            [[node]]
            name = "a"
            pod_cidrs = []
        "#;
        let p = parse(text, &defaults()).expect("parses");
        assert_eq!(p.networks, ["10.244.0.0/16".parse::<IpNet>().expect("net")]);
        let me = p.nodes[0].as_ref().expect("me");
        assert!(me.local);
        let a = p.nodes[1].as_ref().expect("a");
        assert_eq!((a.tunnel, a.port, a.pod_cidrs.len()), (TunnelKind::Geneve, 6081, 2));
        assert_eq!(p.nodes[2].as_ref().map_err(|e| e.field.as_str()), Err("vtep_mac"));
        assert_eq!(p.nodes[3].as_ref().map_err(|e| e.field.as_str()), Err("name"));
        // The entry's position ranks overlapping claims.
        assert_eq!((me.seniority.created, a.seniority.created), (0, 1));
    }

    #[test]
    fn parses_services_and_names_bad_fields() {
        let text = r#"
            [[service]]
            name = "default/web"
            vip = "10.244.255.10"
            port = 80
            endpoints = ["10.244.1.2:8080", "10.244.2.2:8080"]
            terminating = ["10.244.1.3:8080"]
            session_affinity_seconds = 60
            [[service]]
            name = "default/dns"
            vip = "10.244.255.53"
            port = 53
            protocol = "UDP"
            [[service]]
            name = "bad/proto"
            vip = "10.244.255.54"
            port = 53
            protocol = "SCTP"
            [[service]]
            name = "bad/endpoint"
            vip = "10.244.255.55"
            port = 80
            endpoints = ["10.244.1.2"]
            [[service]]
            name = "bad/family"
            vip = "10.244.255.56"
            port = 80
            endpoints = ["[fd00::1]:80"]
        "#;
        let p = parse(text, &defaults()).expect("parses");
        let web = p.services[0].as_ref().expect("web");
        assert_eq!((web.protocol, web.port, web.endpoints.len()), (Protocol::Tcp, 80, 3));
        assert!(web.endpoints[2].terminating && !web.endpoints[2].ready);
        assert_eq!(web.affinity, Some(Duration::from_secs(60)));
        let dns = p.services[1].as_ref().expect("dns");
        assert!(dns.endpoints.is_empty() && dns.protocol == Protocol::Udp);
        let field = |i: usize| p.services[i].as_ref().map_err(|e| (e.node.as_str(), e.field.as_str())).err();
        assert_eq!(field(2), Some(("bad/proto", "protocol")));
        assert_eq!(field(3), Some(("bad/endpoint", "endpoints")));
        assert_eq!(field(4), Some(("bad/family", "endpoints")));
    }

    #[test]
    fn whole_file_errors_carry_a_position() {
        let e = parse("[[node]]\nname = 3\n", &defaults()).expect_err("type error");
        assert!(e.contains("line 2"), "{e}");
        assert!(parse("nodes = []", &defaults()).is_err(), "unknown keys are refused");
    }
}

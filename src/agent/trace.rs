//! `ferry trace`, the agent's side (setup side): names resolved from the agent's own model, a
//! synthetic packet run through this node's pipeline in trace mode
//! ([`ferry_dataplane::trace`]), and each stage's decision put into words.
//!
//! The source node's half ([`source_half`]) builds the packet as the sending pod (or the node's
//! host port) would send it and traces it; when it leaves encapsulated, the half names the node
//! it goes to and carries the encapsulated frame, which the CLI hands to that node's agent
//! ([`deliver_half`]: decap checks, ingress policy, delivery). A trace runs on a pipeline of its
//! own (its own connection table, scratch counters) over the published snapshot: nothing live
//! changes, nothing is sent.
//!
//! `ferry trace --inject` sends one real packet, the simulated one with a trace mark
//! ([`trace::TraceMark`]): [`watch`] arms this node's workers to record the marked packet when
//! their uplink receives it, [`inject_half`] hands it to a worker as if the source's port had
//! received it (forwarded for real, recorded), and [`collect`] gives the watching worker's record.
//! Each record is put into words as a simulated half is, so that the CLI can compare them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::flows::Stage;
use ferry_dataplane::pipeline::{Pipeline, PortId, PortRole};
use ferry_dataplane::trace::{self, Note, Pick, Probe, ProbeProto, RouteNote, TraceMark, Traced};
use ferry_encap::Verdict;
use ferry_tables::policy::{Explanation, PolicyProtocol, PolicyVerdict, SideExplanation};
use ferry_tables::{DesiredState, Snapshot};
use ipnet::IpNet;

use super::{HOST_PORT, Shared, lock};
use crate::admin::proto::{
    PolicyRuleEntry, TraceEndpoint, TraceHalf, TracePolicy, TracePolicySide, TraceProto, TraceService, TraceStage,
};

/// The default destination port of a TCP or UDP trace.
const DEFAULT_PORT: u16 = 80;

/// What the agent knows, for one request.
struct Model<'a> {
    s: &'a Shared,
    snap: Arc<Snapshot>,
    desired: DesiredState,
}

impl<'a> Model<'a> {
    fn new(s: &'a Shared) -> Self {
        let t = lock(&s.tables);
        Model { s, snap: t.current(), desired: t.desired().clone() }
    }

    fn own(&self) -> &str {
        &self.s.resolved.node_name
    }

    /// The node whose pod CIDRs hold `addr` (or whose underlay address it is).
    fn node_of(&self, addr: IpAddr) -> Option<String> {
        if self.s.resolved.pod_cidrs.iter().any(|n| n.contains(&addr)) || addr == self.s.resolved.underlay_addr {
            return Some(self.own().to_owned());
        }
        self.desired
            .nodes
            .iter()
            .find(|n| n.underlay == addr || n.pod_cidrs.iter().any(|c| c.contains(&addr)))
            .map(|n| n.name.clone())
    }

    /// A node's overlay address (its first IPv4 pod CIDR's network address: the host port's).
    fn node_addr(&self, name: &str) -> Option<IpAddr> {
        let cidrs: &[IpNet] = if name == self.own() {
            &self.s.resolved.pod_cidrs
        } else {
            &self.desired.nodes.iter().find(|n| n.name == name)?.pod_cidrs
        };
        cidrs.iter().find(|c| c.addr().is_ipv4()).or(cidrs.first()).map(IpNet::network)
    }

    /// A name for an address: the pod's `namespace/name`, a node's overlay address, or itself.
    fn name_of(&self, addr: IpAddr) -> String {
        if let Some((k, _)) = self.s.directory.by_addr(addr) {
            return k;
        }
        for (p, _) in lock(&self.s.pods).list() {
            if p.addrs.contains(&addr)
                && let (Some(ns), Some(n)) = (&p.namespace, &p.name)
            {
                return format!("{ns}/{n}");
            }
        }
        if let Some(node) = self.node_of(addr).filter(|n| self.node_addr(n) == Some(addr)) {
            return format!("node {node}");
        }
        addr.to_string()
    }

    fn port_name(&self, port: PortId) -> String {
        match lock(&self.s.ports).get(&port.0) {
            Some(i) => format!("port {} ({} {})", port.0, i.kind, i.ifname),
            None => format!("port {}", port.0),
        }
    }

    /// Resolve a name given to `ferry trace`: an address, a pod (`namespace/name`, or a name
    /// that is unique among the pods), a Service (`namespace/name`, its port by `port`), a node.
    fn resolve(&self, input: &str, proto: TraceProto, port: Option<u16>) -> Result<TraceEndpoint, String> {
        let ep = |kind: &str, name: Option<String>, addr: IpAddr, port: Option<u16>| TraceEndpoint {
            input: input.to_owned(),
            kind: kind.into(),
            name,
            addr,
            port,
            node: self.node_of(addr),
        };
        if let Ok(addr) = input.parse::<IpAddr>() {
            let name = Some(self.name_of(addr)).filter(|n| *n != input);
            return Ok(ep("address", name, addr, None));
        }
        let first = |ips: &[IpAddr]| ips.iter().find(|a| a.is_ipv4()).or(ips.first()).copied();
        // Pods: the route source's Pod objects (or static entries), then the pods this node wired.
        let keys = if input.contains('/') { vec![input.to_owned()] } else { self.s.directory.named(input) };
        if let [key] = keys.as_slice()
            && let Some((ips, node)) = self.s.directory.get(key)
            && let Some(addr) = first(&ips)
        {
            return Ok(TraceEndpoint { node: Some(node), ..ep("pod", Some(key.clone()), addr, None) });
        }
        for (p, _) in lock(&self.s.pods).list() {
            let (Some(ns), Some(n)) = (&p.namespace, &p.name) else { continue };
            let key = format!("{ns}/{n}");
            if (key == input || *n == input)
                && let Some(addr) = first(&p.addrs)
            {
                return Ok(ep("pod", Some(key), addr, None));
            }
        }
        // Services: `namespace/name` is the start of every port's name (`namespace/name:port`).
        let wanted = proto_number(proto);
        let mut ports = Vec::new();
        for svc in self.snap.services().iter() {
            let name = svc.name();
            let base = name.split([':', '@']).next().unwrap_or(name);
            if name == input || base == input {
                ports.push((svc.name().to_owned(), svc.vip(), svc.port(), svc.protocol().number()));
            }
        }
        if !ports.is_empty() {
            let pick = ports
                .iter()
                .find(|(_, _, p, pr)| *pr == wanted && port.is_none_or(|want| want == *p))
                .ok_or_else(|| {
                    let list: Vec<String> =
                        ports.iter().map(|(n, v, p, pr)| format!("{n} ({v} {}/{p})", proto_name(*pr))).collect();
                    format!(
                        "Service {input} has no {} port{}: it has {}",
                        proto.name(),
                        port.map(|p| format!(" {p}")).unwrap_or_default(),
                        list.join(", ")
                    )
                })?;
            return Ok(TraceEndpoint { node: None, ..ep("service", Some(pick.0.clone()), pick.1, Some(pick.2)) });
        }
        if let Some(addr) = self.node_addr(input) {
            return Ok(ep("node", Some(input.to_owned()), addr, None));
        }
        if keys.len() > 1 {
            return Err(format!("`{input}` names more than one pod: {}; give namespace/name", keys.join(", ")));
        }
        Err(format!(
            "`{input}` is not a pod, Service, node or address this agent knows (pods come from the route source's \
             Pod objects or static [[pod]] entries, and from the pods this node wired)"
        ))
    }
}

fn proto_number(p: TraceProto) -> u8 {
    match p {
        TraceProto::Tcp => 6,
        TraceProto::Udp => 17,
        TraceProto::Icmp => 1,
    }
}

fn proto_name(n: u8) -> String {
    match n {
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        _ => PolicyProtocol::from_number(n).map_or_else(|| format!("protocol {n}"), |p| p.name().to_owned()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || s.len() > 2 * 4096 {
        return Err("frame: not an even number of hex digits up to 8192".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("frame: {e}"))).collect()
}

/// A trace pipeline over this node's configuration.
fn pipeline(s: &Shared) -> Pipeline {
    let mut p = Pipeline::for_trace(s.node_cfg.clone());
    p.set_time(u64::try_from(s.started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    p
}

/// What `name` resolves to in this agent's model.
pub(super) fn resolve(s: &Shared, name: &str, proto: TraceProto, port: Option<u16>) -> Result<TraceEndpoint, String> {
    Model::new(s).resolve(name, proto, port)
}

/// How long a worker may take to take a marked packet or a watch.
const WORKER_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a destination watches for a marked packet (`TraceWatch`'s `timeout_ms` is capped
/// to it).
const MAX_WATCH: Duration = Duration::from_secs(10);

/// A marked packet's source port (or echo identifier): from the ephemeral range, by the nonce,
/// so that each injected packet starts a connection of its own (the live connection table has
/// not seen it, as the simulation's has not) and the simulation of it uses the same one.
fn marked_sport(nonce: u32) -> u16 {
    32768 + (nonce % 28232) as u16
}

/// A watch for a marked packet on this node's workers, awaiting its record.
#[derive(Debug)]
pub(super) struct Watching {
    rx: crossbeam::channel::Receiver<Traced>,
    until: Instant,
}

/// Where a source half runs: elsewhere (the half says which node), or here, with the packet.
enum SourcePacket {
    Elsewhere(TraceHalf),
    Here { half: TraceHalf, in_port: PortId, frame: Vec<u8> },
}

/// Resolves the endpoints and builds the packet the source sends (see the module doc); with a
/// nonce, the marked one.
fn source_packet(
    m: &Model<'_>,
    src: &str,
    dst: &str,
    proto: TraceProto,
    port: Option<u16>,
    nonce: Option<u32>,
) -> Result<SourcePacket, String> {
    let src_ep = m.resolve(src, proto, None)?;
    let dst_ep = m.resolve(dst, proto, port)?;
    if src_ep.kind == "service" {
        return Err(format!("the source {src} is a Service: trace from a pod, a node or an address"));
    }
    if src_ep.addr.is_ipv4() != dst_ep.addr.is_ipv4() {
        return Err(format!("{} and {} are of different address families", src_ep.addr, dst_ep.addr));
    }
    let Some(src_node) = src_ep.node.clone() else {
        return Err(format!("no node owns the source address {}", src_ep.addr));
    };
    let mut half = empty_half(m);
    half.src = Some(src_ep.clone());
    half.dst = Some(dst_ep.clone());
    if src_node != m.own() {
        half.summary = format!("{} is on node {src_node}: its agent runs the trace", src_ep.addr);
        half.source_on = Some(src_node);
        return Ok(SourcePacket::Elsewhere(half));
    }
    let (in_port, src_mac) = if src_ep.kind == "node" || m.node_addr(m.own()) == Some(src_ep.addr) {
        let mac = m.snap.port_mac(HOST_PORT).ok_or("this node has no host port to send from")?;
        (HOST_PORT, mac)
    } else {
        m.snap.local_pod(src_ep.addr).ok_or_else(|| format!("no pod on this node has the address {}", src_ep.addr))?
    };
    let dport = match proto {
        TraceProto::Icmp => 0,
        _ => dst_ep.port.or(port).unwrap_or(DEFAULT_PORT),
    };
    let probe = Probe {
        src_mac,
        dst_mac: m.s.node_cfg.gateway_mac,
        src: src_ep.addr,
        dst: dst_ep.addr,
        proto: match proto {
            TraceProto::Tcp => ProbeProto::Tcp,
            TraceProto::Udp => ProbeProto::Udp,
            TraceProto::Icmp => ProbeProto::Icmp,
        },
        // A port from the ephemeral range, fixed so that a trace is repeatable; a marked packet's
        // comes from its nonce.
        sport: nonce.map_or(40000, marked_sport),
        dport,
        nonce,
    };
    let frame = probe.frame().ok_or("the source and destination are of different address families")?;
    Ok(SourcePacket::Here { half, in_port, frame })
}

fn empty_half(m: &Model<'_>) -> TraceHalf {
    TraceHalf {
        node: m.own().to_owned(),
        src: None,
        dst: None,
        source_on: None,
        stages: Vec::new(),
        verdict: String::new(),
        reason: None,
        stage: String::new(),
        summary: String::new(),
        next_node: None,
        frame: None,
    }
}

/// The source node's half (see the module doc); with a nonce, of the marked packet
/// `ferry trace --inject` sends.
pub(super) fn source_half(
    s: &Shared,
    src: &str,
    dst: &str,
    proto: TraceProto,
    port: Option<u16>,
    nonce: Option<u32>,
) -> Result<TraceHalf, String> {
    let m = Model::new(s);
    match source_packet(&m, src, dst, proto, port, nonce)? {
        SourcePacket::Elsewhere(half) => Ok(half),
        SourcePacket::Here { mut half, in_port, frame } => {
            let traced = trace::run(&mut pipeline(s), &*m.snap, in_port, PortRole::Pod, &frame)?;
            describe(&m, &traced, false, &mut half);
            Ok(half)
        }
    }
}

/// `ferry trace --inject`, the source's real half: the marked packet handed to a worker as if
/// the source's port had received it, forwarded for real, and the worker's record of its stages
/// put into words as a simulated half is.
pub(super) fn inject_half(
    s: &Shared,
    src: &str,
    dst: &str,
    proto: TraceProto,
    port: Option<u16>,
    nonce: u32,
) -> Result<TraceHalf, String> {
    let m = Model::new(s);
    match source_packet(&m, src, dst, proto, port, Some(nonce))? {
        SourcePacket::Elsewhere(half) => Ok(half),
        SourcePacket::Here { mut half, in_port, frame } => {
            // Every worker serves every port; the first takes it.
            let w = s.workers.first().ok_or("this agent runs no worker")?;
            let traced = w.inject(in_port, frame, WORKER_TIMEOUT).map_err(|e| format!("injecting the packet: {e}"))?;
            describe(&m, &traced, false, &mut half);
            Ok(half)
        }
    }
}

/// `ferry trace --inject`, arming the destination: every worker watches its uplink for the packet
/// marked with `nonce` for `timeout_ms` (at most [`MAX_WATCH`]).
pub(super) fn watch(s: &Shared, nonce: u32, timeout_ms: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_millis(timeout_ms).min(MAX_WATCH);
    let (tx, rx) = crossbeam::channel::bounded(1);
    {
        let mut w = lock(&s.watches);
        let now = Instant::now();
        w.retain(|_, v| v.until > now);
        if w.contains_key(&nonce) {
            return Err(format!("a watch for mark {nonce:#010x} is already armed"));
        }
        w.insert(nonce, Watching { rx, until });
    }
    let mark = TraceMark::new(nonce);
    for (i, w) in s.workers.iter().enumerate() {
        if let Err(e) = w.watch(mark, until, tx.clone(), WORKER_TIMEOUT) {
            lock(&s.watches).remove(&nonce);
            return Err(format!("arming worker {i}: {e}"));
        }
    }
    Ok(())
}

/// `ferry trace --inject`, the destination's real half: the record of the packet marked with
/// `nonce`, once a worker has forwarded it, waiting up to `timeout_ms` (and no longer than the
/// watch lasts).
pub(super) fn collect(s: &Shared, nonce: u32, timeout_ms: u64) -> Result<TraceHalf, String> {
    let Some(w) = lock(&s.watches).remove(&nonce) else {
        return Err(format!("no watch for mark {nonce:#010x} on {}: arm one first", s.resolved.node_name));
    };
    let wait = Duration::from_millis(timeout_ms).min(w.until.saturating_duration_since(Instant::now()));
    let traced = w.rx.recv_timeout(wait).map_err(|_| {
        format!(
            "no record of the marked packet from {} within {} ms: it did not reach this node's workers (lost on \
             the underlay, or sent elsewhere)",
            s.resolved.node_name,
            wait.as_millis()
        )
    })?;
    let m = Model::new(s);
    let mut half = empty_half(&m);
    describe(&m, &traced, true, &mut half);
    Ok(half)
}

/// The destination node's half (see the module doc).
pub(super) fn deliver_half(s: &Shared, frame_hex: &str) -> Result<TraceHalf, String> {
    let m = Model::new(s);
    let frame = unhex(frame_hex)?;
    let traced = trace::run(&mut pipeline(s), &*m.snap, s.node_cfg.uplink, PortRole::Uplink, &frame)?;
    let mut half = empty_half(&m);
    describe(&m, &traced, true, &mut half);
    Ok(half)
}

fn stage(name: &str, result: &str, detail: String) -> TraceStage {
    TraceStage { stage: name.into(), result: result.into(), detail, policy: None, service: None }
}

/// Puts a traced packet's notes and verdict into words.
fn describe(m: &Model<'_>, t: &Traced, from_uplink: bool, half: &mut TraceHalf) {
    let mut dst_addr = None;
    let mut policy: Option<&Explanation> = None;
    for n in &t.trace.notes {
        let st = match n {
            Note::Decapsulated { outer_src, vni } => stage(
                "decap",
                "ok",
                format!(
                    "a valid tunnel packet from {outer_src} ({}), VNI {vni}",
                    m.node_of(*outer_src).map_or_else(|| "an unknown node".to_owned(), |n| format!("node {n}"))
                ),
            ),
            Note::KnownNode { outer_src, known } => stage(
                "decap_checks",
                if *known { "ok" } else { "dropped" },
                format!("{outer_src} is {}a known node", if *known { "" } else { "not " }),
            ),
            Note::AccessPort { port, src_mac } => stage(
                "access_port",
                "ok",
                format!("from {}: untagged, source MAC {src_mac} is the sender's", m.port_name(*port)),
            ),
            Note::Classified { src, dst, protocol, ports, ttl, hash } => {
                dst_addr = Some(*dst);
                let p = proto_name(*protocol);
                let l4 = if matches!(*protocol, 6 | 17) {
                    format!("{p} {src}:{} -> {dst}:{}", ports.0, ports.1)
                } else {
                    format!("{p} {src} -> {dst}")
                };
                stage("classify", "ok", format!("{l4}, TTL {ttl}, flow hash {hash:#010x}"))
            }
            Note::SourceAllowed { port, src } => stage(
                "ip_checks",
                "ok",
                format!("header checksum, gateway MAC, and source {src} allowed on {}", m.port_name(*port)),
            ),
            Note::SenderChecked { outer_src } => stage(
                "decap_checks",
                "ok",
                format!("the inner source belongs to the sending node {outer_src}; TTL not 0"),
            ),
            Note::Service(sn) => {
                if let Some((b, _)) = sn.backend {
                    dst_addr = Some(b);
                }
                let why = match sn.pick {
                    Pick::Maglev { slot, slots } => format!("Maglev: the flow hash falls in slot {slot} of {slots}"),
                    Pick::Affinity { timeout_s } => {
                        format!("sessionAffinity ClientIP ({timeout_s} s): Maglev over the client's address")
                    }
                    Pick::Tracked => "an existing connection keeps its backend".to_owned(),
                };
                let why = if sn.terminating_fallback {
                    format!("{why}; no ready endpoint, so among the serving-and-terminating ones")
                } else {
                    why
                };
                let (result, detail) = match (sn.backend, sn.refused) {
                    (Some((b, p)), _) => (
                        "translated",
                        format!(
                            "{}:{} is Service {}: backend {b}:{p} ({}), one of {} ({why})",
                            sn.vip,
                            sn.port,
                            sn.service,
                            m.name_of(b),
                            sn.backends
                        ),
                    ),
                    (None, r) => (
                        "refused",
                        format!(
                            "{}:{} is Service {}: {} (rejected as kube-proxy does)",
                            sn.vip,
                            sn.port,
                            sn.service,
                            r.map_or("no backend", |r| r.description())
                        ),
                    ),
                };
                let pick = match sn.pick {
                    Pick::Maglev { .. } => "maglev",
                    Pick::Affinity { .. } => "affinity",
                    Pick::Tracked => "tracked",
                };
                TraceStage {
                    service: Some(TraceService {
                        service: sn.service.clone(),
                        vip: sn.vip,
                        port: sn.port,
                        backend: sn.backend.map(|b| b.0),
                        backend_port: sn.backend.map(|b| b.1),
                        pick: pick.into(),
                        why,
                    }),
                    ..stage("service", result, detail)
                }
            }
            Note::Policy(e) => {
                policy = Some(e);
                let result = if e.verdict == PolicyVerdict::Allow { "allowed" } else { "denied" };
                TraceStage { policy: Some(policy_json(e)), ..stage("policy", result, policy_words(m, e)) }
            }
            Note::ServiceReply { vip, port } => {
                stage("service", "reply", format!("a backend's reply: its source becomes the VIP {vip}:{port}"))
            }
            Note::Route(r) => match r {
                RouteNote::Local { port, mac } => {
                    stage("route", "ok", format!("a local destination: {} (MAC {mac})", m.port_name(*port)))
                }
                RouteNote::Remote { underlay, next_hop_mac, vtep_mac } => stage(
                    "route",
                    "ok",
                    format!(
                        "to node {} at {underlay} over the underlay, next hop MAC {next_hop_mac}, VTEP MAC {vtep_mac}",
                        m.node_of(*underlay).unwrap_or_else(|| "?".into())
                    ),
                ),
                RouteNote::Unresolved { underlay } => stage(
                    "route",
                    "dropped",
                    format!("to the node at {underlay}, whose underlay next hop has no MAC yet (no neighbour entry)"),
                ),
                RouteNote::Blackhole => {
                    stage("route", "dropped", "a blackhole: this node's pod CIDR where no pod is".into())
                }
                RouteNote::NoRoute => stage(
                    "route",
                    "no route",
                    format!("no route to {}", dst_addr.map_or_else(|| "the destination".into(), |d| d.to_string())),
                ),
            },
            Note::Encap { kind, vni, udp_port, remote, outer_len } => {
                half.next_node = m.node_of(*remote);
                stage(
                    "encap",
                    "ok",
                    format!(
                        "{} VNI {vni} to {remote} UDP {udp_port} (node {}'s template), {outer_len} bytes",
                        format!("{kind:?}").to_uppercase(),
                        half.next_node.as_deref().unwrap_or("?")
                    ),
                )
            }
            Note::Deliver { port, mac } => {
                stage("deliver", "ok", format!("to {} with destination MAC {mac}", m.port_name(*port)))
            }
            Note::HostExit { port } => stage(
                "host_exit",
                "ok",
                format!("out of the cluster through the node's kernel ({})", m.port_name(*port)),
            ),
        };
        half.stages.push(st);
    }
    let dst_name = dst_addr.map(|d| m.name_of(d));
    match t.verdict {
        Verdict::Drop(r) => {
            let at = Stage::of_drop(r, from_uplink).name();
            half.verdict = "dropped".into();
            half.reason = Some(r.name().into());
            half.stage = at.into();
            if half.stages.last().is_none_or(|s| s.stage != at || s.result == "ok") {
                half.stages.push(stage(at, "dropped", format!("{}: {}", r.name(), r.description())));
            } else if let Some(last) = half.stages.last_mut() {
                last.result = "dropped".into();
            }
            half.summary = match policy.filter(|e| e.verdict != PolicyVerdict::Allow) {
                Some(e) => policy_sentence(m, e),
                None => format!("dropped at {at} on {}: {} ({})", m.own(), r.name(), r.description()),
            };
        }
        Verdict::Reply => {
            half.verdict = "replied".into();
            half.stage = "reply".into();
            half.summary = format!("answered by ferry on {} (an ICMP error or a TCP reset to the sender)", m.own());
        }
        Verdict::Forward(p) if from_uplink || p != m.s.node_cfg.uplink => {
            let exit = t.trace.notes.iter().any(|n| matches!(n, Note::HostExit { .. }));
            half.verdict = if exit { "left" } else { "delivered" }.into();
            half.stage = if exit { "host_exit" } else { "deliver" }.into();
            half.summary = if exit {
                format!("left the cluster through node {}'s kernel", m.own())
            } else {
                format!(
                    "delivered to {} on {} ({})",
                    dst_name.unwrap_or_else(|| "the destination".into()),
                    m.own(),
                    m.port_name(p)
                )
            };
        }
        Verdict::Forward(_) => {
            half.verdict = "forwarded".into();
            half.stage = "encap".into();
            half.frame = Some(hex(&t.frame));
            half.summary =
                format!("encapsulated on {} toward node {}", m.own(), half.next_node.as_deref().unwrap_or("(unknown)"));
        }
    }
}

fn side_json(s: &SideExplanation) -> TracePolicySide {
    TracePolicySide {
        pod: s.pod.clone(),
        allowed: s.allowed,
        rules: s.rules.iter().map(PolicyRuleEntry::from).collect(),
    }
}

fn policy_json(e: &Explanation) -> TracePolicy {
    TracePolicy {
        verdict: match e.verdict {
            PolicyVerdict::Allow => "allow",
            PolicyVerdict::DenyEgress => "deny_egress",
            PolicyVerdict::DenyIngress => "deny_ingress",
        }
        .into(),
        exempt: e.exempt.map(str::to_owned),
        egress: e.egress.as_ref().map(side_json),
        ingress: e.ingress.as_ref().map(side_json),
    }
}

/// `TCP/81`, `UDP/53`, `ICMP`.
fn what(e: &Explanation) -> String {
    let p = proto_name(e.protocol);
    if e.port == 0 { p } else { format!("{p}/{}", e.port) }
}

fn rules_words(s: &SideExplanation) -> String {
    let rules: Vec<String> = s
        .rules
        .iter()
        .map(|o| match o.rule {
            Some(i) => format!("{} rule {i} ({}; {})", o.policy, o.peers, o.ports),
            None => format!("{} (no rules: allows nothing)", o.policy),
        })
        .collect();
    rules.join(", ")
}

fn policy_words(m: &Model<'_>, e: &Explanation) -> String {
    if let Some(x) = e.exempt {
        return x.to_string();
    }
    let mut parts = Vec::new();
    for (dir, side, peer, to) in
        [("egress", &e.egress, e.dst, "to"), ("ingress", &e.ingress, e.src, "from")].into_iter()
    {
        let Some(s) = side else { continue };
        let verb = if s.allowed { "allowed" } else { "refused" };
        let by = if s.rules.len() == 1 { "by" } else { "by the union of" };
        parts.push(format!("{dir} of {}: {} {to} {} {verb} {by} {}", s.pod, what(e), m.name_of(peer), rules_words(s)));
    }
    if parts.is_empty() {
        return format!(
            "no policy isolates {} for egress or {} for ingress on this node",
            m.name_of(e.src),
            m.name_of(e.dst)
        );
    }
    parts.join("; ")
}

/// "dropped at ingress of y/b: no policy selecting y/b allows TCP/81 from x/a".
fn policy_sentence(m: &Model<'_>, e: &Explanation) -> String {
    let (dir, side, to, peer) = match e.verdict {
        PolicyVerdict::DenyEgress => ("egress", &e.egress, "to", e.dst),
        _ => ("ingress", &e.ingress, "from", e.src),
    };
    let Some(s) = side else { return format!("dropped by policy at {dir}") };
    format!(
        "dropped at {dir} of {}: no policy selecting {} allows {} {to} {} (policies: {})",
        s.pod,
        s.pod,
        what(e),
        m.name_of(peer),
        Explanation::policies(s).join(", ")
    )
}

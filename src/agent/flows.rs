//! The agent's side of flow records (setup side, off the hot path): a thread drains every worker's
//! export rings ([`ferry_dataplane::flows`]) every [`DRAIN_EVERY`], names the pods at both ends
//! (the pods this agent wired, by address: `namespace/name` from the CNI's `CNI_ARGS`) and the
//! ports, and keeps:
//!
//! - a window of the last [`WINDOW`] events for `ferry flows` (`--follow` asks for the events
//!   after the last sequence number it saw). A flow's record becomes an event when it is new, when
//!   its verdict or drop reason changes, and at most once per [`UPDATE_EVERY`] while it is active;
//!   every exported drop event is one;
//! - per-flow totals (bounded to [`MAX_FLOWS`], the least recently seen forgotten first);
//! - counters for Prometheus: flows by source namespace and verdict, dropped packets by namespace
//!   and reason, and the lost-record counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_dataplane::flows::{DropEvent, FlowExport, FlowKey, FlowRecord, FlowVerdict, NO_PORT, Stage};
use ferry_encap::DropReason;
use ferry_tables::policy::{Direction, PolicyTables};

use crate::admin::proto::{FlowEvent, FlowFilter, FlowList, PortInfo, ServiceHit};

/// How often the rings are drained, and the pods and policies named again.
pub(super) const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// How often the rings are drained while one is busy (a drain took more than
/// [`BUSY_SHARE`] of its capacity): a worker whose flows churn (every packet a new flow in its
/// slot) exports a record per packet, more than a ring holds in [`DRAIN_EVERY`] at its peak rate.
pub(super) const DRAIN_BUSY: Duration = Duration::from_millis(10);
/// A drain that took more than this share (1/n) of a ring's capacity finds it busy.
const BUSY_SHARE: usize = 16;
/// Events kept for `ferry flows`.
pub(super) const WINDOW: usize = 8192;
/// A flow still active becomes an event again after this long.
pub(super) const UPDATE_EVERY: Duration = Duration::from_secs(1);
/// Flows whose totals are kept.
pub(super) const MAX_FLOWS: usize = 65536;

/// A flow's totals as the agent keeps them.
#[derive(Debug, Clone, Copy)]
struct Totals {
    /// The worker's record's first-seen: a new value means the flow lost its slot and came back,
    /// its record counting from zero again.
    first_ns: u64,
    /// What the worker's record counted when last exported.
    rec_packets: u64,
    rec_bytes: u64,
    /// Totals over every residency.
    packets: u64,
    bytes: u64,
    first_unix: f64,
    verdict: FlowVerdict,
    reason: u8,
    last_event_ns: u64,
    last_ns: u64,
}

/// Counters served to Prometheus.
#[derive(Debug, Default, Clone)]
pub(super) struct FlowCounts {
    /// New flows by (source namespace, verdict).
    pub(super) flows: BTreeMap<(String, &'static str), u64>,
    /// Dropped packets by (namespace, reason), the namespace of the pod at either end that is on
    /// this node (the source's first).
    pub(super) drops: BTreeMap<(String, &'static str), u64>,
    /// Flow records taken from the workers' export rings.
    pub(super) records: u64,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    events: VecDeque<FlowEvent>,
    aged_out: u64,
    flows: HashMap<(u16, FlowKey, u16), Totals>,
    counts: FlowCounts,
    /// Address -> `namespace/name` (or the pod's id).
    pods: HashMap<IpAddr, String>,
    ports: BTreeMap<u16, PortInfo>,
    /// The policy tables last published (names the policies of a record's policy reference).
    policy: Option<Arc<PolicyTables>>,
}

/// The flow log: what `ferry flows` and the metrics read.
#[derive(Debug)]
pub(super) struct FlowLog {
    node: String,
    exports: Vec<Arc<FlowExport>>,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `SYN,ACK,...` for TCP flags.
pub(super) fn tcp_flags(f: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    NAMES.iter().enumerate().filter(|(i, _)| f & (1 << i) != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

fn unix(epoch_unix_ns: u64, ns: u64) -> f64 {
    (epoch_unix_ns.saturating_add(ns)) as f64 / 1e9
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

impl FlowLog {
    /// A log over these workers' exports.
    pub(super) fn new(node: String, exports: Vec<Arc<FlowExport>>) -> Self {
        FlowLog { node, exports, state: Mutex::new(State::default()) }
    }

    /// Whether any worker records flows.
    pub(super) fn enabled(&self) -> bool {
        !self.exports.is_empty()
    }

    /// Replace the names of pods and ports (called before each drain).
    pub(super) fn set_names(&self, pods: HashMap<IpAddr, String>, ports: BTreeMap<u16, PortInfo>) {
        let mut s = lock(&self.state);
        s.pods = pods;
        s.ports = ports;
    }

    /// The policy tables to name records' policies with (called before each drain).
    pub(super) fn set_policy(&self, policy: Arc<PolicyTables>) {
        lock(&self.state).policy = Some(policy);
    }

    /// What a record's policy reference names: for each side whose rules were looked at (the
    /// source pod's egress, the destination pod's ingress), the pod and the policies that select
    /// it in that direction. The reference indexes the tables of the generation that decided;
    /// under another generation the names are not given (the generation is).
    fn policy_text(s: &State, policy: u32, generation: u64) -> Option<String> {
        if policy == 0 {
            return None;
        }
        let Some(t) = &s.policy else { return Some(format!("generation {generation}")) };
        if t.generation() != generation {
            return Some(format!("decided under generation {generation}, since replaced by {}", t.generation()));
        }
        let side = |local: u32, dir: Direction| {
            let rules = t.rules_at(local)?;
            let mut names: Vec<&str> = Vec::new();
            for o in rules.origins.iter().filter(|o| o.direction == dir) {
                if !names.contains(&o.policy.as_str()) {
                    names.push(&o.policy);
                }
            }
            Some(format!("{} of {}: {}", dir.name().to_lowercase(), rules.pod, names.join(", ")))
        };
        let parts: Vec<String> = [side(policy >> 16, Direction::Egress), side(policy & 0xffff, Direction::Ingress)]
            .into_iter()
            .flatten()
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Take everything the workers exported. Returns whether a ring was busy (this drain took
    /// more than 1/[`BUSY_SHARE`] of its capacity).
    pub(super) fn drain(&self) -> bool {
        let mut s = lock(&self.state);
        let mut busy = false;
        for e in &self.exports {
            let mut n = 0;
            while let Some(r) = e.records.pop() {
                n += 1;
                self.flow_record(&mut s, e.epoch_unix_ns, &r);
            }
            s.counts.records += n as u64;
            busy |= n > e.records.capacity() / BUSY_SHARE;
            while let Some(d) = e.drops.pop() {
                self.drop_event(&mut s, e.epoch_unix_ns, &d);
            }
        }
        if s.flows.len() > MAX_FLOWS {
            // Forget the least recently seen quarter.
            let mut last: Vec<u64> = s.flows.values().map(|t| t.last_ns).collect();
            let cut = last.len() / 4;
            let (_, nth, _) = last.select_nth_unstable(cut);
            let nth = *nth;
            s.flows.retain(|_, t| t.last_ns > nth);
        }
        busy
    }

    fn push(&self, s: &mut State, mut e: FlowEvent) {
        s.seq += 1;
        e.seq = s.seq;
        if s.events.len() == WINDOW {
            s.events.pop_front();
            s.aged_out += 1;
        }
        s.events.push_back(e);
    }

    fn names(s: &State, key: Option<&FlowKey>, backend: Option<IpAddr>) -> (Option<String>, Option<String>) {
        let Some(k) = key else { return (None, None) };
        let src = s.pods.get(&k.src_ip()).cloned();
        let dst = backend.and_then(|b| s.pods.get(&b)).or_else(|| s.pods.get(&k.dst_ip())).cloned();
        (src, dst)
    }

    fn namespace(pod: Option<&String>) -> Option<String> {
        pod.and_then(|p| p.split_once('/')).map(|(ns, _)| ns.to_owned())
    }

    fn flow_record(&self, s: &mut State, epoch: u64, r: &FlowRecord) {
        let id = (r.worker, r.key, r.in_port);
        let prev = s.flows.get(&id).copied();
        let mut t = match prev {
            Some(t) if t.first_ns == r.first_ns => t,
            // New, or back in its slot after an eviction: its record counts from zero again.
            Some(t) => Totals { first_ns: r.first_ns, rec_packets: 0, rec_bytes: 0, ..t },
            None => Totals {
                first_ns: r.first_ns,
                rec_packets: 0,
                rec_bytes: 0,
                packets: 0,
                bytes: 0,
                first_unix: unix(epoch, r.first_ns),
                verdict: r.verdict,
                reason: r.reason,
                last_event_ns: 0,
                last_ns: 0,
            },
        };
        let (dp, db) = (r.packets.saturating_sub(t.rec_packets), r.bytes.saturating_sub(t.rec_bytes));
        t.rec_packets = r.packets;
        t.rec_bytes = r.bytes;
        t.packets += dp;
        t.bytes += db;
        t.last_ns = r.last_ns;
        let backend = r.backend_ip();
        let (src_pod, dst_pod) = Self::names(s, Some(&r.key), backend);
        let reason =
            (r.verdict == FlowVerdict::Dropped).then(|| DropReason::from_index(usize::from(r.reason))).flatten();
        if prev.is_none() {
            let ns = Self::namespace(src_pod.as_ref()).unwrap_or_default();
            *s.counts.flows.entry((ns, r.verdict.name())).or_default() += 1;
        }
        if let Some(reason) = reason {
            let ns =
                Self::namespace(src_pod.as_ref()).or_else(|| Self::namespace(dst_pod.as_ref())).unwrap_or_default();
            *s.counts.drops.entry((ns, reason.name())).or_default() += dp;
        }
        let changed = prev.is_none_or(|p| p.verdict != r.verdict || p.reason != r.reason);
        let due = r.last_ns.saturating_sub(t.last_event_ns) >= UPDATE_EVERY.as_nanos() as u64;
        t.verdict = r.verdict;
        t.reason = r.reason;
        if changed || due {
            t.last_event_ns = r.last_ns;
        }
        s.flows.insert(id, t);
        if !(changed || due) {
            return;
        }
        let port_if = |p: u16| s.ports.get(&p).map(|i| i.ifname.clone());
        let out = (r.out_port != NO_PORT).then_some(r.out_port);
        let e = FlowEvent {
            seq: 0,
            kind: "flow".into(),
            time: unix(epoch, r.last_ns),
            first_seen: t.first_unix,
            node: self.node.clone(),
            proto: Some(r.key.proto),
            src: Some(r.key.src_ip()),
            sport: Some(r.key.sport),
            dst: Some(r.key.dst_ip()),
            dport: Some(r.key.dport),
            src_pod,
            dst_pod,
            in_port: r.in_port,
            in_if: port_if(r.in_port),
            out_port: out,
            out_if: out.and_then(port_if),
            verdict: r.verdict.name().into(),
            reason: reason.map(|r| r.name().to_owned()),
            stage: Stage::from_index(r.stage).map_or("unknown", Stage::name).into(),
            packets: t.packets,
            bytes: t.bytes,
            tcp_flags: tcp_flags(r.tcp_flags),
            service: backend.map(|b| ServiceHit {
                vip: r.key.dst_ip(),
                port: r.key.dport,
                backend: b,
                backend_port: r.backend_port,
            }),
            policy: Self::policy_text(s, r.policy, r.policy_generation),
            packet: None,
            worker: r.worker,
        };
        self.push(s, e);
    }

    fn drop_event(&self, s: &mut State, epoch: u64, d: &DropEvent) {
        let (src_pod, dst_pod) = Self::names(s, d.key.as_ref(), None);
        let from_uplink = s.ports.get(&d.in_port).is_some_and(|p| p.kind == "uplink");
        let e = FlowEvent {
            seq: 0,
            kind: "drop".into(),
            time: unix(epoch, d.time_ns),
            first_seen: unix(epoch, d.time_ns),
            node: self.node.clone(),
            proto: d.key.map(|k| k.proto),
            src: d.key.map(|k| k.src_ip()),
            sport: d.key.map(|k| k.sport),
            dst: d.key.map(|k| k.dst_ip()),
            dport: d.key.map(|k| k.dport),
            src_pod,
            dst_pod,
            in_port: d.in_port,
            in_if: s.ports.get(&d.in_port).map(|i| i.ifname.clone()),
            out_port: None,
            out_if: None,
            verdict: FlowVerdict::Dropped.name().into(),
            reason: Some(d.reason.name().into()),
            stage: Stage::of_drop(d.reason, from_uplink).name().into(),
            packets: 1,
            bytes: u64::from(d.len),
            tcp_flags: String::new(),
            service: None,
            policy: None,
            packet: Some(hex(&d.bytes[..usize::from(d.caplen)])),
            worker: 0,
        };
        self.push(s, e);
    }

    /// The answer to `ferry flows`.
    pub(super) fn list(&self, filter: &FlowFilter, after: Option<u64>, limit: usize) -> FlowList {
        let s = lock(&self.state);
        let mut events: Vec<FlowEvent> = s
            .events
            .iter()
            .rev()
            .take_while(|e| after.is_none_or(|a| e.seq > a))
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        events.reverse();
        let sum = |f: fn(&FlowExport) -> u64| self.exports.iter().map(|e| f(e)).sum::<u64>();
        FlowList {
            enabled: self.enabled(),
            events,
            last_seq: s.seq,
            lost_records: sum(FlowExport::lost),
            lost_drop_events: sum(|e| e.drops_lost.load(Ordering::Relaxed)),
            rate_limited_drop_events: sum(|e| e.drops_limited.load(Ordering::Relaxed)),
            aged_out: s.aged_out,
        }
    }

    /// The counters for Prometheus, and the lost records and drop events.
    pub(super) fn counts(&self) -> (FlowCounts, u64, u64) {
        let c = lock(&self.state).counts.clone();
        let lost = self.exports.iter().map(|e| e.lost()).sum();
        let drops_lost = self.exports.iter().map(|e| e.drops_lost.load(Ordering::Relaxed)).sum();
        (c, lost, drops_lost)
    }
}

/// Drains `log` every [`DRAIN_EVERY`] (every [`DRAIN_BUSY`] while a ring is busy) until `stop`,
/// naming pods and ports with `names` first (at most every [`DRAIN_EVERY`]).
pub(super) fn spawn(
    log: Arc<FlowLog>,
    stop: Arc<AtomicBool>,
    names: impl Fn() -> (HashMap<IpAddr, String>, BTreeMap<u16, PortInfo>, Arc<PolicyTables>) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("ferry-flows".into()).spawn(move || {
        let mut named: Option<std::time::Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            if named.is_none_or(|t| t.elapsed() >= DRAIN_EVERY) {
                let (pods, ports, policy) = names();
                log.set_names(pods, ports);
                log.set_policy(policy);
                named = Some(std::time::Instant::now());
            }
            let busy = log.drain();
            std::thread::sleep(if busy { DRAIN_BUSY } else { DRAIN_EVERY });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::flows::{FlowOutcome, FlowTable};

    fn key(src: [u8; 4], dst: [u8; 4], dport: u16) -> FlowKey {
        let mapped = |a: [u8; 4]| u128::from(std::net::Ipv4Addr::from(a).to_ipv6_mapped());
        FlowKey { src: mapped(src), dst: mapped(dst), sport: 40000, dport, proto: 6, v6: false }
    }

    #[test]
    fn records_become_named_events_totals_and_counts() {
        let mut t = FlowTable::new(64, 64, std::time::Instant::now(), 0);
        let log = FlowLog::new("n1".into(), vec![t.export()]);
        let mut pods = HashMap::new();
        pods.insert(IpAddr::from([10, 0, 1, 2]), "web/a".to_owned());
        pods.insert(IpAddr::from([10, 0, 2, 3]), "db/b".to_owned());
        log.set_names(pods, BTreeMap::new());
        let k = key([10, 0, 1, 2], [10, 0, 2, 3], 5432);
        t.record(&k, u32::from(k.dport), 2, FlowOutcome::new(0, FlowVerdict::Forwarded, 0, Stage::Encap), 100, 10);
        t.sweep(64);
        log.drain();
        t.record(&k, u32::from(k.dport), 2, FlowOutcome::new(0, FlowVerdict::Forwarded, 0, Stage::Encap), 100, 20);
        t.sweep(64);
        log.drain();
        // Same verdict, not yet a second later: no second event.
        let l = log.list(&FlowFilter::default(), None, 100);
        assert_eq!(l.events.len(), 1, "{l:?}");
        let e = &l.events[0];
        assert_eq!((e.src_pod.as_deref(), e.dst_pod.as_deref()), (Some("web/a"), Some("db/b")));
        assert_eq!((e.verdict.as_str(), e.stage.as_str(), e.dport), ("forwarded", "encap", Some(5432)));
        // Now dropped: an event at once, and counted by namespace and reason.
        t.record(
            &k,
            u32::from(k.dport),
            2,
            FlowOutcome::new(NO_PORT, FlowVerdict::Dropped, DropReason::NoRoute as u8, Stage::Route),
            100,
            30,
        );
        t.sweep(64);
        log.drain();
        let l = log.list(&FlowFilter { verdict: Some("dropped".into()), ..FlowFilter::default() }, None, 100);
        assert_eq!(l.events.len(), 1, "{l:?}");
        assert_eq!((l.events[0].packets, l.events[0].reason.as_deref()), (3, Some("no_route")));
        let (c, lost, _) = log.counts();
        assert_eq!(c.flows.get(&("web".to_owned(), "forwarded")), Some(&1));
        assert_eq!(c.drops.get(&("web".to_owned(), "no_route")), Some(&1));
        assert_eq!(lost, 0);
        // Filters: a namespace at the other end, a pod by name, a port; --follow's `after`.
        let by = |f: FlowFilter| log.list(&f, None, 100).events.len();
        assert_eq!(by(FlowFilter { namespace: Some("db".into()), ..FlowFilter::default() }), 2);
        assert_eq!(by(FlowFilter { pod: Some("a".into()), ..FlowFilter::default() }), 2);
        assert_eq!(by(FlowFilter { pod: Some("x/a".into()), ..FlowFilter::default() }), 0);
        assert_eq!(by(FlowFilter { port: Some(5433), ..FlowFilter::default() }), 0);
        assert_eq!(log.list(&FlowFilter::default(), Some(l.last_seq), 100).events.len(), 0);
    }

    #[test]
    fn flag_names() {
        assert_eq!(tcp_flags(0x12), "SYN,ACK");
        assert_eq!(tcp_flags(0), "");
    }
}

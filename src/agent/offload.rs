//! Flow offload's upkeep (setup side, off the hot path): entries whose decision no longer holds,
//! and idle ones, go back to ferry's own path.
//!
//! A worker writes an entry on a connection's handshake ([`Offload::offer`]); the TC programs then
//! move the connection without ferry. ferry takes it back by removing the entry:
//! - **NetworkPolicy changes**: every entry, at once, from the publication's hook (see
//!   `super::run`): the next packet of each connection is judged under the new rules.
//! - **Route changes** (a node or pod added, moved or removed): at each new table generation,
//!   every entry is checked against the new tables ([`Sweep::run`]): an encapsulated flow's
//!   destination must still be behind the same node, a delivered one behind the same pod's veth,
//!   a decapsulated one's sender still a known node. Entries that fail are removed.
//! - **Idle entries** (no packet for [`IDLE`], [`IDLE_UDP`] for UDP flows): removed, so that a
//!   closed connection's entry does not wait for a port reuse. A flow idle that long goes on
//!   through ferry.
//! - **Closed connections**: the programs mark an entry that a TCP FIN or RST went through. An
//!   entry whose side sent a FIN, or whose connection saw a RST in either direction, goes once it
//!   has been quiet for [`CLOSED_QUIET`] (the connection table's `tcp_closed`), not [`IDLE`]: a
//!   node opening many short connections would otherwise fill the map with the closed ones (at
//!   about 550 a second, measured: 2 entries each, 120 s). A packet after that (a late ACK, a
//!   retransmitted FIN) goes through ferry, which forwards it as any other.
//!
//! - **Service changes**: a service's connection (its entry translates one end) also goes when
//!   its backend no longer serves the service, at the same check: its next packet reaches ferry,
//!   which drops it as its service stage drops a connection whose backend is gone.
//!
//! While the kernel moves a flow, ferry's workers see none of its packets; each scan refreshes the
//! flow's NetworkPolicy records in the connection table for them (both directions), and a
//! service's connection's two translation entries, so that a flow given back to ferry is still
//! known as allowed, and keeps its backend.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::conntrack::{Conntrack, Tuple, flags};
use ferry_dataplane::pipeline::Fib;
use ferry_dataplane::xdp::offload::{FlowKey4, Offload, OffloadedFlow, Rewrite, monotonic_ns};
use ferry_tables::{Backend, Route, Services, Snapshot};

/// An entry whose counters did not move for this long is removed.
pub(super) const IDLE: Duration = Duration::from_secs(120);

/// The same for a UDP flow (the connection table's UDP timeout: a UDP flow has no end to see).
pub(super) const IDLE_UDP: Duration = Duration::from_secs(60);

/// An entry of a closed connection (see the module doc) goes after this long without a packet.
pub(super) const CLOSED_QUIET: Duration = Duration::from_secs(10);

/// How often idle entries are looked for.
const IDLE_SCAN: Duration = Duration::from_secs(10);

/// The sweep's memory between runs.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    generation: Option<u64>,
    last_scan: Option<Instant>,
    /// Per entry: its packet count when last seen to change, and since when it has not.
    quiet: HashMap<FlowKey4, (u64, Instant)>,
}

impl Sweep {
    /// Remove what no longer holds under `snap` (when its generation is new) and what went
    /// idle (every [`IDLE_SCAN`]); how many entries went.
    pub(super) fn run(&mut self, offload: &Offload, ct: &Conntrack, snap: &Arc<Snapshot>, now: Instant) -> usize {
        let new_tables = self.generation != Some(snap.generation());
        let scan = self.last_scan.is_none_or(|t| now.duration_since(t) >= IDLE_SCAN);
        if !new_tables && !scan {
            return 0;
        }
        self.generation = Some(snap.generation());
        if scan {
            self.last_scan = Some(now);
        }
        let flows = offload.list();
        let mut gone = 0;
        let mut seen = HashMap::with_capacity(flows.len());
        let ct_now = ct.now();
        // The entries of connections a RST ended: the RST's own, and its other direction's.
        let reset: HashSet<FlowKey4> = flows.iter().filter(|f| f.rst).flat_map(|f| [f.key, partner(f)]).collect();
        let mono = monotonic_ns();
        for f in &flows {
            let (packets, since) = match self.quiet.get(&f.key) {
                Some(&(p, t)) if p == f.packets => (p, t),
                _ => {
                    if scan {
                        keep_alive(ct, ct_now, f);
                    }
                    (f.packets, now)
                }
            };
            let limit = if f.key.proto == 17 { IDLE_UDP } else { IDLE };
            let idle = now.duration_since(since) >= limit;
            let closed = closed_and_quiet(f, &reset, mono);
            if (new_tables && !still_holds(offload, snap.as_ref(), f)) || (scan && (idle || closed)) {
                gone += usize::from(offload.remove(&f.key));
            } else {
                seen.insert(f.key, (packets, since));
            }
        }
        self.quiet = seen;
        if gone > 0 {
            tracing::debug!(removed = gone, new_tables, "offloaded flows back to ferry");
        }
        gone
    }
}

/// Refresh what ferry's connection table knows of flow `f`, which the kernel moves: its
/// NetworkPolicy records (on the pods' real addresses), and a service connection's translation.
fn keep_alive(ct: &Conntrack, now: u32, f: &OffloadedFlow) {
    let real = match f.rewrite {
        Some(r @ Rewrite::Dst { .. }) => r.apply(&f.key),
        _ => f.key,
    };
    let (src, dst) = (IpAddr::V4(real.src), IpAddr::V4(real.dst));
    // What the kernel saw of the connection's end: this direction's FIN, a RST for both.
    let rst = if f.rst { flags::RST } else { 0 };
    let own = rst | if f.fin { flags::FIN } else { 0 };
    ferry_dataplane::policy::keep_alive(ct, now, (src, dst), (real.sport, real.dport), real.proto, [own, rst]);
    if let Some(r) = f.rewrite {
        let (forward, backend) = service_connection(&f.key, r);
        // A client's packets are the service entry's forward direction, a backend's its reply.
        let set = if matches!(r, Rewrite::Dst { .. }) { [own, rst] } else { [rst, own] };
        ferry_dataplane::service::keep_alive(ct, now, &forward, backend, set);
    }
}

/// Whether `f` carries a closed connection (its side sent a FIN, or its key is among the `reset`
/// connections' entries) and has had no packet for [`CLOSED_QUIET`] by the programs' clock `mono`.
fn closed_and_quiet(f: &OffloadedFlow, reset: &HashSet<FlowKey4>, mono: u64) -> bool {
    (f.fin || reset.contains(&f.key)) && Duration::from_nanos(mono.saturating_sub(f.last_ns)) >= CLOSED_QUIET
}

/// The key of the entry that carries `f`'s connection the other way: the reply's, as the
/// programs see it (a service's client's packets are answered from the backend, its backend's
/// go to the client from the service).
fn partner(f: &OffloadedFlow) -> FlowKey4 {
    let k = f.key;
    let (src, sport, dst, dport) = match f.rewrite {
        None => (k.dst, k.dport, k.src, k.sport),
        Some(Rewrite::Dst { addr, port }) => (addr, port, k.src, k.sport),
        Some(Rewrite::Src { addr, port }) => (k.dst, k.dport, addr, port),
    };
    FlowKey4 { src, dst, sport, dport, proto: k.proto }
}

/// A service connection's client tuple (client -> service) and backend, from an entry's key and
/// translation: a client's packets (`Dst`) or its backend's replies (`Src`).
fn service_connection(key: &FlowKey4, r: Rewrite) -> (Tuple, Backend) {
    let v4 = IpAddr::V4;
    let (client, sport, vip, vport, backend) = match r {
        Rewrite::Dst { addr, port } => (key.src, key.sport, key.dst, key.dport, Backend { addr: v4(addr), port }),
        Rewrite::Src { addr, port } => (key.dst, key.dport, addr, port, Backend { addr: v4(key.src), port: key.sport }),
    };
    (Tuple { src: v4(client), dst: v4(vip), sport, dport: vport, proto: key.proto }, backend)
}

/// Whether a service connection's backend still serves its service.
fn service_holds(services: &Services, key: &FlowKey4, r: Rewrite) -> bool {
    let (forward, backend) = service_connection(key, r);
    services.lookup(forward.dst, forward.dport, forward.proto).is_some_and(|s| s.is_alive(backend))
}

/// Whether `f`'s decision is still what the tables in `fib` say.
fn still_holds<F: Fib>(offload: &Offload, fib: &F, f: &OffloadedFlow) -> bool {
    if let Some(r) = f.rewrite
        && !service_holds(fib.services(), &f.key, r)
    {
        return false;
    }
    // Routed as translated: a client's packets to a service go to its backend.
    let dst = IpAddr::V4(f.rewrite.map_or(f.key, |r| r.apply(&f.key)).dst);
    match (f.action, fib.route(dst)) {
        ("encap", Route::Remote { template, .. }) => f.remote.is_some_and(|r| template.remote() == IpAddr::V4(r)),
        ("local", Route::Local { port, .. }) => offload.veth(port) == Some(f.out_ifindex),
        ("decap", Route::Local { port, .. }) => {
            offload.veth(port) == Some(f.out_ifindex) && f.remote.is_some_and(|r| fib.is_known_node(IpAddr::V4(r)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn both_entries_of_a_service_connection_name_the_same_connection() {
        let (client, vip, backend) =
            (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 96, 0, 20), Ipv4Addr::new(10, 244, 2, 2));
        // The client's packets, and the backend's replies, as the programs see them.
        let out = FlowKey4 { src: client, dst: vip, sport: 40000, dport: 80, proto: 6 };
        let back = FlowKey4 { src: backend, dst: client, sport: 8080, dport: 40000, proto: 6 };
        let a = service_connection(&out, Rewrite::Dst { addr: backend, port: 8080 });
        let b = service_connection(&back, Rewrite::Src { addr: vip, port: 80 });
        assert_eq!(a, b);
        let (forward, be) = a;
        assert_eq!(
            forward,
            Tuple { src: IpAddr::V4(client), dst: IpAddr::V4(vip), sport: 40000, dport: 80, proto: 6 },
            "the client's tuple to the service"
        );
        assert_eq!(be, Backend { addr: IpAddr::V4(backend), port: 8080 });
    }

    fn flow(key: FlowKey4, rewrite: Option<Rewrite>) -> OffloadedFlow {
        OffloadedFlow {
            key,
            action: "encap",
            in_ifindex: 1,
            out_ifindex: 2,
            packets: 10,
            bytes: 1000,
            last_ns: 0,
            remote: None,
            rewrite,
            fin: false,
            rst: false,
        }
    }

    #[test]
    fn an_entrys_partner_is_the_entry_of_its_replies() {
        let (client, vip, backend) =
            (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 96, 0, 20), Ipv4Addr::new(10, 244, 2, 2));
        let out = FlowKey4 { src: client, dst: backend, sport: 40000, dport: 8080, proto: 6 };
        let back = FlowKey4 { src: backend, dst: client, sport: 8080, dport: 40000, proto: 6 };
        assert_eq!(partner(&flow(out, None)), back);
        assert_eq!(partner(&flow(back, None)), out);
        // A service's connection: the client's entry names the service, the reply's the backend.
        let to_vip = FlowKey4 { dst: vip, dport: 80, ..out };
        let dst = Rewrite::Dst { addr: backend, port: 8080 };
        let src = Rewrite::Src { addr: vip, port: 80 };
        assert_eq!(partner(&flow(to_vip, Some(dst))), back);
        assert_eq!(partner(&flow(back, Some(src))), to_vip);
    }

    #[test]
    fn a_closed_connections_entries_go_once_quiet_and_others_wait_for_the_idle_timeout() {
        let key = FlowKey4 {
            src: Ipv4Addr::new(10, 244, 1, 2),
            dst: Ipv4Addr::new(10, 244, 2, 2),
            sport: 40000,
            dport: 8080,
            proto: 6,
        };
        let s = Duration::from_secs(1).as_nanos() as u64;
        let now = 1_000 * s;
        let quiet =
            |secs: u64, fin: bool, rst: bool| OffloadedFlow { last_ns: now - secs * s, fin, rst, ..flow(key, None) };
        let none = HashSet::new();
        assert!(!closed_and_quiet(&quiet(60, false, false), &none, now), "open: the idle timeout's");
        assert!(!closed_and_quiet(&quiet(5, true, false), &none, now), "a FIN, quiet 5 s");
        assert!(closed_and_quiet(&quiet(10, true, false), &none, now), "a FIN, quiet 10 s");
        assert!(closed_and_quiet(&quiet(10, false, true), &[key].into(), now), "a RST");
        // The other direction of a connection a RST ended goes too, though no RST went its way.
        let reply = quiet(12, false, false);
        let rst = OffloadedFlow { key: partner(&reply), ..quiet(12, false, true) };
        let reset: HashSet<FlowKey4> = [rst.key, partner(&rst)].into();
        assert!(closed_and_quiet(&reply, &reset, now));
    }
}

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
//!
//! While the kernel moves a flow, ferry's workers see none of its packets; each scan refreshes the
//! flow's NetworkPolicy records in the connection table for them (both directions), so that a flow
//! given back to ferry is still known as allowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::conntrack::Conntrack;
use ferry_dataplane::pipeline::Fib;
use ferry_dataplane::xdp::offload::{FlowKey4, Offload, OffloadedFlow};
use ferry_tables::{Route, Snapshot};

/// An entry whose counters did not move for this long is removed.
pub(super) const IDLE: Duration = Duration::from_secs(120);

/// The same for a UDP flow (the connection table's UDP timeout: a UDP flow has no end to see).
pub(super) const IDLE_UDP: Duration = Duration::from_secs(60);

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
        for f in &flows {
            let (packets, since) = match self.quiet.get(&f.key) {
                Some(&(p, t)) if p == f.packets => (p, t),
                _ => {
                    if scan {
                        let k = &f.key;
                        let (src, dst) = (IpAddr::V4(k.src), IpAddr::V4(k.dst));
                        ferry_dataplane::policy::keep_alive(ct, ct_now, src, dst, k.sport, k.dport, k.proto);
                    }
                    (f.packets, now)
                }
            };
            let limit = if f.key.proto == 17 { IDLE_UDP } else { IDLE };
            let idle = now.duration_since(since) >= limit;
            if (new_tables && !still_holds(offload, snap.as_ref(), f)) || (scan && idle) {
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

/// Whether `f`'s decision is still what the tables in `fib` say.
fn still_holds<F: Fib>(offload: &Offload, fib: &F, f: &OffloadedFlow) -> bool {
    let dst = IpAddr::V4(f.key.dst);
    match (f.action, fib.route(dst)) {
        ("encap", Route::Remote { template, .. }) => f.remote.is_some_and(|r| template.remote() == IpAddr::V4(r)),
        ("local", Route::Local { port, .. }) => offload.veth(port) == Some(f.out_ifindex),
        ("decap", Route::Local { port, .. }) => {
            offload.veth(port) == Some(f.out_ifindex) && f.remote.is_some_and(|r| fib.is_known_node(IpAddr::V4(r)))
        }
        _ => false,
    }
}

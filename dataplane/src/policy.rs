//! The policy stage (hot path): NetworkPolicy verdicts from the published
//! [`PolicyTables`], cached per connection in the shared [`Conntrack`].
//!
//! # Where it runs, and on which addresses
//!
//! Kubernetes evaluates NetworkPolicy on the pod's real addresses: after a Service's translation,
//! on the backend's address and port. The stage therefore runs on the [`Ctx`] *between* the two
//! halves of the service stage: after the forward translation (a packet to a VIP already carries
//! its backend as destination) and before the reverse translation of a reply (a backend's reply
//! still carries the backend as source). So the policy always sees pod-to-pod addresses, and the
//! pipeline keeps its classify -> policy -> service -> route -> encap shape in the sense that
//! matters: policy decides on the packet as it travels between pods, service translation wraps
//! around it.
//!
//! - From a pod (or the host port), before routing: the source pod's egress rules, and, when the
//!   destination is a pod on this node too, its ingress rules (one evaluation for same-node
//!   traffic).
//! - On delivery of a decapsulated packet: the destination pod's ingress rules.
//!
//! A pod reaching itself, and traffic between a pod and its own node (its host port's overlay
//! address, the pod gateway, the node's underlay address), are always allowed.
//!
//! # Stateful
//!
//! The first packet of a TCP, UDP or SCTP connection is evaluated; if allowed, two *policy
//! records* go into the shared connection table: one for the connection's tuple and one, flagged
//! [`flags::REPLY`], for the reply's. Each remembers the policy generation it was decided under.
//! A packet whose record carries the current generation costs that one lookup (and its answer,
//! allow or deny, stands). Records are keyed with the real protocol mapped to a number no packet
//! with ports carries ([`record_proto`]: 253/254/252, experimental and unassigned; as the service
//! stage's affinity records use 255), so they never collide with a service's translation entries.
//!
//! A denied first packet leaves no record (a scan cannot fill the table). Other protocols (ICMP)
//! are evaluated on every packet without state: only a rule without `ports` lets them through,
//! and an ICMP echo reply is judged as a packet of its own. An ICMP error (destination
//! unreachable, time exceeded, fragmentation needed / packet too big, parameter problem) that
//! the rules refuse is allowed when the packet it quotes belongs to a connection they allowed
//! (`related`: its tuple has an allowing record), as Linux conntrack's `RELATED`.
//!
//! # A connection seen in mid-stream
//!
//! A packet without a record is not always its connection's first: the connection may have opened
//! while no local pod was isolated (the stage does not run then, and keeps no records: it costs
//! such a node nothing), or before the agent started (the table starts empty). Judged in its own
//! direction only, a server's reply to an opener that a new policy refuses would open an allowing
//! pair of records for the server's direction, and the refused connection would go on: the
//! conformance test's update while traffic runs saw it when the server's reply was the first
//! packet after x turned to default deny. So a packet that does not open its connection (anything
//! but a TCP SYN without ACK), whose own direction is allowed, and that goes from a server's port
//! to an opener's ([`peer_likely_opened`]: below 32768 to 32768 and up, Linux's ephemeral range;
//! Zeek orients connections whose start it missed by their ports the same way) is judged as its
//! peer's connection too: it passes only if that is allowed as well, and its records then name the
//! peer as the opener. The guess can only refuse more than the packet's own direction would, never
//! let more through: a crafted packet from a low port gains nothing. Where the ports do not tell
//! (both below 32768, or both at or above), the packet's own direction decides, as Linux
//! conntrack picks up a connection in mid-stream.
//!
//! # A new policy and existing connections
//!
//! Every policy publication has a new generation. A record decided under an older generation is
//! decided again on its connection's next packet, as the connection's first packet would be (a
//! reply record: its connection's original direction), and rewritten with the new generation and
//! the new answer. So a policy that newly denies a connection stops it at its next packet in either
//! direction, on every node, within one publication (Calico's choice for its eBPF data plane;
//! Cilium keeps established connections until their conntrack entry expires). A policy that
//! newly allows one lets it through likewise. The cost is one evaluation per live connection after
//! each policy change, spread over the connections' next packets.

use std::net::{IpAddr, Ipv6Addr};

use ferry_encap::DropReason;
use ferry_tables::policy::{PolicyRef, PolicyTables, PolicyVerdict};

use crate::conntrack::{Conntrack, Nat, Tuple, flags};
use crate::nat::{self, tcp};
use crate::pipeline::Ctx;
use crate::service::seen_flags;

/// The key protocol of a policy record for a connection of protocol `proto`, if policy tracks
/// it: TCP -> 253, UDP -> 254 (RFC 3692's experimental numbers), SCTP -> 252 (unassigned).
#[inline]
pub const fn record_proto(proto: u8) -> Option<u8> {
    match proto {
        6 => Some(253),
        17 => Some(254),
        132 => Some(252),
        _ => None,
    }
}

/// The real protocol of a policy record's key protocol.
pub const fn record_real_proto(key_proto: u8) -> Option<u8> {
    match key_proto {
        253 => Some(6),
        254 => Some(17),
        252 => Some(132),
        _ => None,
    }
}

/// A record's answer, in its translation's port field.
const DENIED_EGRESS: u16 = 1;
const DENIED_INGRESS: u16 = 2;

/// A record's generation (low 64 bits) and [`PolicyRef`] (the next 32) in its translation's
/// address; its answer in the port.
#[inline]
fn encode(generation: u64, v: PolicyVerdict, by: PolicyRef) -> Nat {
    let port = match v {
        PolicyVerdict::Allow => 0,
        PolicyVerdict::DenyEgress => DENIED_EGRESS,
        PolicyVerdict::DenyIngress => DENIED_INGRESS,
    };
    let bits = (u128::from(by) << 64) | u128::from(generation);
    Nat { addr: IpAddr::V6(Ipv6Addr::from_bits(bits)), port }
}

#[inline]
fn decode(n: &Nat) -> (u64, PolicyVerdict, PolicyRef) {
    let bits = match n.addr {
        IpAddr::V6(a) => a.to_bits(),
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
    };
    let v = match n.port {
        DENIED_EGRESS => PolicyVerdict::DenyEgress,
        DENIED_INGRESS => PolicyVerdict::DenyIngress,
        _ => PolicyVerdict::Allow,
    };
    (bits as u64, v, (bits >> 64) as u32)
}

/// A packet the policy refused: its drop reason, and which rules refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// `policy_denied_egress` or `policy_denied_ingress`.
    pub reason: DropReason,
    /// The rules looked at (the refusing side's among them).
    pub by: PolicyRef,
}

#[inline]
fn result(v: PolicyVerdict, by: PolicyRef) -> Result<PolicyRef, Denied> {
    match v {
        PolicyVerdict::Allow => Ok(by),
        PolicyVerdict::DenyEgress => Err(Denied { reason: DropReason::PolicyDeniedEgress, by }),
        PolicyVerdict::DenyIngress => Err(Denied { reason: DropReason::PolicyDeniedIngress, by }),
    }
}

/// The policy stage on a packet whose addresses are the pods' real ones (see the module doc).
/// The caller skips it when `tables` is empty (no local pod is isolated). An allowed packet's
/// answer is the rules that were looked at (for its flow record): for a tracked connection, those
/// of its first packet, kept in its record.
///
/// # Errors
/// [`Denied`]: the drop reason of a denied packet, and the rules.
#[inline(never)]
pub fn check(ct: &Conntrack, now: u32, tables: &PolicyTables, ctx: &Ctx, frame: &[u8]) -> Result<PolicyRef, Denied> {
    let (src, dst) = (ctx.src(), ctx.dst());
    let proto = ctx.flow.protocol;
    let key_proto = match (record_proto(proto), ctx.flow.l4) {
        (Some(p), Some(_)) => p,
        _ => {
            let (v, by) = tables.decide(src, dst, proto, 0);
            if v != PolicyVerdict::Allow
                && let Some(by) = related_allowed(ct, tables, ctx, frame)
            {
                return Ok(by);
            }
            return result(v, by);
        }
    };
    let (sport, dport) = ctx.flow.ports;
    let key = Tuple { src, dst, sport, dport, proto: key_proto };
    let generation = tables.generation();
    let tcp_flags = nat::tcp_flags(frame, ctx);
    if let Some(hit) = ct.lookup(&key) {
        let (decided, v, by) = decode(&hit.nat);
        if decided == generation {
            ct.touch(&hit, now, seen_flags(tcp_flags));
            return result(v, by);
        }
        // Decided under another generation: decide again, as for the connection's first packet.
        let (v, by) = if hit.flags & flags::REPLY != 0 {
            tables.decide(dst, src, proto, sport)
        } else {
            tables.decide(src, dst, proto, dport)
        };
        ct.insert(&key, encode(generation, v, by), hit.flags | seen_flags(tcp_flags), now);
        return result(v, by);
    }
    // No record: the connection's first packet, or one of a connection seen in mid-stream.
    let (mut v, mut by) = tables.decide(src, dst, proto, dport);
    let syn_only = tcp::syn_only(proto, tcp_flags);
    let peer_opened = v == PolicyVerdict::Allow && !syn_only && peer_likely_opened(sport, dport);
    if peer_opened {
        (v, by) = tables.decide(dst, src, proto, sport);
    }
    if v == PolicyVerdict::Allow {
        // The reply's record first: the packet goes out only after both are in.
        let back = Tuple { src: dst, dst: src, sport: dport, dport: sport, proto: key_proto };
        let (key_flags, back_flags) = match (peer_opened, syn_only) {
            (true, _) => (flags::REPLY, flags::SEEN),
            (false, true) => (flags::SYN, flags::REPLY),
            (false, false) => (flags::SEEN, flags::REPLY),
        };
        ct.insert(&back, encode(generation, v, by), back_flags, now);
        ct.insert(&key, encode(generation, v, by), key_flags, now);
    }
    result(v, by)
}

/// Where Linux's default `ip_local_port_range` starts (IANA's dynamic ports, 49152 up, lie
/// within): a connection's opener usually holds a port at or above it, its server one below.
pub const EPHEMERAL_PORTS_FROM: u16 = 32768;

/// Whether a packet from `sport` to `dport` of a connection seen in mid-stream most likely goes
/// from the connection's server back to its opener: from a port below [`EPHEMERAL_PORTS_FROM`]
/// to one at or above it.
#[inline]
pub const fn peer_likely_opened(sport: u16, dport: u16) -> bool {
    sport < EPHEMERAL_PORTS_FROM && dport >= EPHEMERAL_PORTS_FROM
}

/// Keep the policy records of the connection whose packets go `src`:`sport` -> `dst`:`dport`
/// alive at `now`, both directions, without a packet through the pipeline: flow offload's sweep
/// calls this for entries whose packets the kernel moved, so that a flow given back to ferry
/// after a quiet minute in the kernel finds its records (a UDP reply would otherwise be judged
/// as a connection of its own). `set`: state flags the kernel saw go by ([`flags::FIN`],
/// [`flags::RST`]), for the packets' direction and the reverse's record, so that a closed
/// connection's records expire as if ferry had seen its end. Whether a record was there.
pub fn keep_alive(
    ct: &Conntrack,
    now: u32,
    (src, dst): (IpAddr, IpAddr),
    (sport, dport): (u16, u16),
    proto: u8,
    set: [u8; 2],
) -> bool {
    let Some(key_proto) = record_proto(proto) else { return false };
    let mut found = false;
    for (key, set) in [
        (Tuple { src, dst, sport, dport, proto: key_proto }, set[0]),
        (Tuple { src: dst, dst: src, sport: dport, dport: sport, proto: key_proto }, set[1]),
    ] {
        if let Some(hit) = ct.lookup(&key) {
            ct.touch(&hit, now, set);
            found = true;
        }
    }
    found
}

/// Whether `ctx` is an ICMP error about a connection the policy allowed (its quoted packet's
/// tuple has an allowing record: Linux conntrack's `RELATED`). A record of an older generation
/// counts as the connection's next packet would: judged again (not rewritten: the connection's
/// own next packet does that).
#[cold]
#[inline(never)]
fn related_allowed(ct: &Conntrack, tables: &PolicyTables, ctx: &Ctx, frame: &[u8]) -> Option<PolicyRef> {
    let q = crate::related::quoted(frame, ctx)?;
    let key = Tuple { src: q.src, dst: q.dst, sport: q.sport, dport: q.dport, proto: record_proto(q.proto)? };
    let hit = ct.lookup(&key)?;
    let (decided, v, by) = decode(&hit.nat);
    let (v, by) = if decided == tables.generation() {
        (v, by)
    } else if hit.flags & flags::REPLY != 0 {
        tables.decide(q.dst, q.src, q.proto, q.sport)
    } else {
        tables.decide(q.src, q.dst, q.proto, q.dport)
    };
    (v == PolicyVerdict::Allow).then_some(by)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for g in [0u64, 1, 7, u64::from(u32::MAX) + 5] {
            for v in [PolicyVerdict::Allow, PolicyVerdict::DenyEgress, PolicyVerdict::DenyIngress] {
                for by in [0, 1, 0x0003_0002, u32::MAX] {
                    assert_eq!(decode(&encode(g, v, by)), (g, v, by));
                }
            }
        }
        for p in [6, 17, 132] {
            assert_eq!(record_proto(p).and_then(record_real_proto), Some(p));
        }
        assert_eq!(record_proto(1), None);
    }
}

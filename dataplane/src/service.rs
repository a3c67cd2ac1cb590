//! The service stage (hot path): ClusterIP translation at the client's node.
//!
//! - **Forward** ([`forward`], on a pod's packet before routing): a packet to a service's VIP and
//!   port is translated to a backend. An established connection keeps the backend its connection
//!   tracking entry names, as long as that endpoint still serves (else the packet is dropped and
//!   the entry marked: its connection is never moved to another backend). A new one gets the
//!   backend Maglev picks from the flow hash (or, with `sessionAffinity: ClientIP`, the one this
//!   client had within the affinity timeout, else Maglev over the client's address alone), and two
//!   entries: the original direction (translate the destination) and the reply direction (translate
//!   the source back to the VIP).
//! - **Hairpin**: a pod that reaches itself through its service would see a packet from itself and
//!   answer itself inside its own namespace; its source is translated to the pod gateway's address
//!   too, so the answer comes back through ferry, where the reply entry restores both ends.
//! - **Reply** ([`reply`], on delivery to a local pod, and on a pod's packet before routing): a
//!   packet from a backend that matches a reply entry gets the VIP and service port back as its
//!   source (and, for hairpin, the pod's own address as its destination). An ICMP error about
//!   such a connection gets the VIP and service port back in the packet it quotes (and as its
//!   source, when the backend sent it), as Linux conntrack's NAT does for related errors.
//!
//! - **From outside** ([`external`], on a plain packet from the uplink to a node port, an external
//!   IP or a load-balancer IP): translated to a backend as above, with the service's
//!   `externalTrafficPolicy`:
//!   - `Local`: only this node's endpoints (none: dropped), the client's address kept. Two
//!     entries, as for a ClusterIP: the reply entry restores the frontend as the source.
//!   - `Cluster`: any endpoint, and the source translated to the node's own address in the pod
//!     network (its host port's overlay address, as Flannel's node address), so that a remote
//!     backend's replies come back through this node. The source port stays the client's unless
//!     another connection to the same backend holds it (then one is picked from 32768-60999).
//!     A slot holds one translation, so the connection takes four entries: the original direction
//!     (-> backend), its source translation ([`snat_record_proto`], keyed by the reverse of the
//!     original tuple), the reply direction (-> the client) and the reply's source (-> the
//!     frontend, keyed by the translated reply tuple). The two records use key protocols no
//!     packet carries, so they never match a packet.
//!
//! Connection tracking lives in the shared [`Conntrack`]; the services in the published snapshot.

use std::net::IpAddr;

use ferry_encap::wire::ipv4::protocol;
use ferry_tables::{Backend, Services};

use crate::conntrack::{Conntrack, Nat, Tuple, flags};
use crate::nat::{self, End, tcp};
use crate::pipeline::Ctx;

/// The protocol number of affinity records' keys: reserved (RFC 5237), never a packet's.
const AFFINITY_PROTO: u8 = 255;

/// What the forward stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not addressed to a service.
    NotService,
    /// Translated to a backend.
    Translated,
    /// The service has no usable endpoint: reject.
    NoEndpoint,
    /// The connection's backend is gone: drop (it is never moved to another backend).
    BackendGone,
}

/// What the external stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalOutcome {
    /// No service is reached from outside at this address, port and protocol.
    NotService,
    /// Translated to a backend (and, for `Cluster`, from the node's address).
    Translated,
    /// The service has no usable endpoint: reject.
    NoEndpoint,
    /// `externalTrafficPolicy: Local` and no endpoint on this node: drop.
    NoLocalEndpoint,
    /// The connection's backend is gone (or its source translation): drop.
    BackendGone,
    /// No source port (or no node address of the family) to translate a `Cluster` connection to.
    NoSnat,
}

/// What the reverse translation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Not a service reply.
    NotReply,
    /// A reply to a client inside the cluster (a pod, or the pod itself for hairpin).
    Translated,
    /// A reply to a client outside the cluster (its destination may have changed: route again).
    External,
}

/// The key protocol of a `Cluster` connection's source-translation records: TCP -> 250 (the
/// original direction's) and 249 (the reply's), SCTP -> 246 and 245, UDP (and the rest) -> 248
/// and 247. Unassigned numbers, as the policy records' and affinity records' (see
/// [`crate::policy::record_proto`]).
#[inline]
pub const fn snat_record_proto(proto: u8, reply: bool) -> u8 {
    match (proto, reply) {
        (6, false) => 250,
        (6, true) => 249,
        (nat::SCTP, false) => 246,
        (nat::SCTP, true) => 245,
        (_, false) => 248,
        (_, true) => 247,
    }
}

/// The real protocol of a source-translation record's key protocol.
pub const fn snat_record_real_proto(key_proto: u8) -> Option<u8> {
    match key_proto {
        250 | 249 => Some(6),
        248 | 247 => Some(17),
        246 | 245 => Some(nat::SCTP),
        _ => None,
    }
}

/// The first and last source port picked when the client's own is taken (Linux's default
/// ephemeral range).
const SNAT_PORTS: (u16, u16) = (32_768, 60_999);
/// Ports tried (the client's, then pseudo-random ones) before giving up.
const SNAT_TRIES: u32 = 8;

/// Translation of a plain packet that arrived from outside the cluster on the uplink (see the
/// module doc). `node_addr`: the destination is one of this node's addresses (node ports apply);
/// `snat`: the node's address in the pod network, of the packet's family (`Cluster` policy).
#[inline(never)]
pub fn external(
    ct: &Conntrack,
    now: u32,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    node_addr: bool,
    snat: Option<IpAddr>,
) -> ExternalOutcome {
    if ctx.flow.l4.is_none() {
        return ExternalOutcome::NotService;
    }
    let (cport, fport) = ctx.flow.ports;
    let proto = ctx.flow.protocol;
    let (client, front) = (ctx.src(), ctx.dst());
    let Some(svc) = services.lookup_external(front, fport, proto, node_addr) else {
        return ExternalOutcome::NotService;
    };
    let t = Tuple { src: client, dst: front, sport: cport, dport: fport, proto };
    let snat_key =
        Tuple { src: front, dst: client, sport: fport, dport: cport, proto: snat_record_proto(proto, false) };
    let tcp_flags = nat::tcp_flags(frame, ctx);
    let syn_only = tcp::syn_only(proto, tcp_flags);
    if let Some(hit) = ct.lookup(&t)
        && !(syn_only && hit.flags & (flags::FIN | flags::RST | flags::DEAD) != 0)
    {
        let b = Backend { addr: hit.nat.addr, port: hit.nat.port };
        if hit.flags & flags::DEAD != 0 || !svc.is_alive(b) {
            ct.touch(&hit, now, flags::DEAD);
            return ExternalOutcome::BackendGone;
        }
        let seen = seen_flags(tcp_flags);
        ct.touch(&hit, now, seen);
        // A `Local` connection has no source translation; a `Cluster` one must still have its own.
        let src_to = match ct.lookup(&snat_key) {
            Some(h) => {
                ct.touch(&h, now, seen);
                Some(h.nat)
            }
            None if svc.external().local => None,
            None => {
                ct.touch(&hit, now, flags::DEAD);
                return ExternalOutcome::BackendGone;
            }
        };
        return translate_external(ctx, frame, b, src_to);
    }
    let Some(b) = svc.pick_external(ctx.flow.hash) else {
        return if svc.external().local && !svc.backends().is_empty() {
            ExternalOutcome::NoLocalEndpoint
        } else {
            ExternalOutcome::NoEndpoint
        };
    };
    let first = if syn_only { flags::SYN } else { 0 };
    let to_backend = Nat { addr: b.addr, port: b.port };
    if svc.external().local {
        // As a ClusterIP connection: the reply entry first, then the original direction.
        let back = Tuple { src: b.addr, dst: client, sport: b.port, dport: cport, proto };
        ct.insert(&back, Nat { addr: front, port: fport }, flags::REPLY, now);
        ct.insert(&t, to_backend, first, now);
        return translate_external(ctx, frame, b, None);
    }
    let Some(snat) = snat.filter(|a| a.is_ipv4() == client.is_ipv4()) else { return ExternalOutcome::NoSnat };
    let Some(port) = snat_port(ct, ctx.flow.hash, b, snat, client, cport, front, fport, proto) else {
        return ExternalOutcome::NoSnat;
    };
    // The reply's two entries first, then the original direction's two: a reply finds its own.
    let back = Tuple { src: b.addr, dst: snat, sport: b.port, dport: port, proto };
    ct.insert(&back, Nat { addr: client, port: cport }, flags::REPLY, now);
    let back_src = Tuple { src: snat, dst: client, sport: port, dport: cport, proto: snat_record_proto(proto, true) };
    ct.insert(&back_src, Nat { addr: front, port: fport }, flags::REPLY, now);
    let src_to = Nat { addr: snat, port };
    ct.insert(&snat_key, src_to, first, now);
    ct.insert(&t, to_backend, first, now);
    translate_external(ctx, frame, b, Some(src_to))
}

/// A source port on `snat` for a new `Cluster` connection from `client:cport` to backend `b`:
/// the client's own when no other client's connection to `b` holds it, else one of a few
/// pseudo-random ones. A port is free when neither of the reply's entries exists, or they belong
/// to an earlier connection of this same client port (to the same frontend).
#[expect(clippy::too_many_arguments, reason = "the connection's whole tuple, each part used once")]
fn snat_port(
    ct: &Conntrack,
    hash: u32,
    b: Backend,
    snat: IpAddr,
    client: IpAddr,
    cport: u16,
    front: IpAddr,
    fport: u16,
    proto: u8,
) -> Option<u16> {
    let span = u32::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    (0..SNAT_TRIES).find_map(|k| {
        let port = if k == 0 {
            cport
        } else {
            let x = hash.wrapping_add(k.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            SNAT_PORTS.0 + ((x >> 8) % span) as u16
        };
        let back = Tuple { src: b.addr, dst: snat, sport: b.port, dport: port, proto };
        let back_src =
            Tuple { src: snat, dst: client, sport: port, dport: cport, proto: snat_record_proto(proto, true) };
        let free_back = ct.lookup(&back).is_none_or(|h| h.nat == Nat { addr: client, port: cport });
        let free_src = ct.lookup(&back_src).is_none_or(|h| h.nat == Nat { addr: front, port: fport });
        (free_back && free_src).then_some(port)
    })
}

#[inline]
fn translate_external(ctx: &mut Ctx, frame: &mut [u8], b: Backend, src_to: Option<Nat>) -> ExternalOutcome {
    if nat::rewrite(frame, ctx, End::Dst, b.addr, b.port).is_err() {
        return ExternalOutcome::NoEndpoint;
    }
    if let Some(n) = src_to
        && nat::rewrite(frame, ctx, End::Src, n.addr, n.port).is_err()
    {
        return ExternalOutcome::NoSnat;
    }
    ExternalOutcome::Translated
}

/// The connection-tracking flags a packet's TCP flags set (the policy stage's records too).
#[inline]
pub(crate) fn seen_flags(tcp_flags: u8) -> u8 {
    let mut f = flags::SEEN;
    if tcp_flags & tcp::FIN != 0 {
        f |= flags::FIN;
    }
    if tcp_flags & tcp::RST != 0 {
        f |= flags::RST;
    }
    f
}

/// Forward translation of a pod's packet (see the module doc). `hairpin_src` is the address a pod
/// reaching itself sees as the source (the gateway's, in the packet's family).
#[inline]
pub fn forward(
    ct: &Conntrack,
    now: u32,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    hairpin_src: Option<IpAddr>,
) -> Outcome {
    if services.is_empty() || ctx.flow.l4.is_none() {
        return Outcome::NotService;
    }
    forward_lookup(ct, now, services, ctx, frame, hairpin_src)
}

/// The body of [`forward`], out of line: a node without services pays only the check above.
#[inline(never)]
fn forward_lookup(
    ct: &Conntrack,
    now: u32,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    hairpin_src: Option<IpAddr>,
) -> Outcome {
    let (sport, dport) = ctx.flow.ports;
    let proto = ctx.flow.protocol;
    let (client, vip) = (ctx.src(), ctx.dst());
    let Some(svc) = services.lookup(vip, dport, proto) else { return Outcome::NotService };
    let t = Tuple { src: client, dst: vip, sport, dport, proto };
    let tcp_flags = nat::tcp_flags(frame, ctx);
    let syn_only = tcp::syn_only(proto, tcp_flags);
    if let Some(hit) = ct.lookup(&t)
        // A new SYN on the tuple of a closed connection is a new connection.
        && !(syn_only && hit.flags & (flags::FIN | flags::RST | flags::DEAD) != 0)
    {
        let b = Backend { addr: hit.nat.addr, port: hit.nat.port };
        if hit.flags & flags::DEAD != 0 || !svc.is_alive(b) {
            ct.touch(&hit, now, flags::DEAD);
            return Outcome::BackendGone;
        }
        ct.touch(&hit, now, seen_flags(tcp_flags));
        return translate(ctx, frame, b, hit.flags & flags::HAIRPIN != 0, hairpin_src);
    }
    let picked = match svc.affinity() {
        None => svc.pick(ctx.flow.hash),
        Some(timeout) => {
            let at = Tuple { src: client, dst: vip, sport: u16::from(proto), dport, proto: AFFINITY_PROTO };
            let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
            let kept = ct.lookup(&at).and_then(|h| {
                let b = Backend { addr: h.nat.addr, port: h.nat.port };
                (crate::conntrack::idle_ms(now, h.last_seen) < timeout_ms && svc.backends().contains(&b))
                    .then_some((h, b))
            });
            match kept {
                Some((h, b)) => {
                    ct.touch(&h, now, 0);
                    Some(b)
                }
                None => {
                    let b = svc.pick(client_hash(client));
                    if let Some(b) = b {
                        ct.insert(&at, Nat { addr: b.addr, port: b.port }, flags::AFFINITY, now);
                    }
                    b
                }
            }
        }
    };
    let Some(b) = picked else { return Outcome::NoEndpoint };
    let hairpin = b.addr == client;
    let reply_dst = match (hairpin, hairpin_src) {
        (false, _) => client,
        (true, Some(a)) => a,
        // No gateway address in this family: the pod could not be answered.
        (true, None) => return Outcome::NoEndpoint,
    };
    let hp = if hairpin { flags::HAIRPIN } else { 0 };
    // The reply entry first: the original packet goes out only after both are in.
    let back = Tuple { src: b.addr, dst: reply_dst, sport: b.port, dport: sport, proto };
    ct.insert(&back, Nat { addr: vip, port: dport }, flags::REPLY | hp, now);
    let first = if syn_only { flags::SYN } else { 0 };
    ct.insert(&t, Nat { addr: b.addr, port: b.port }, first | hp, now);
    translate(ctx, frame, b, hairpin, hairpin_src)
}

#[inline]
fn translate(ctx: &mut Ctx, frame: &mut [u8], b: Backend, hairpin: bool, hairpin_src: Option<IpAddr>) -> Outcome {
    if nat::rewrite(frame, ctx, End::Dst, b.addr, b.port).is_err() {
        return Outcome::NoEndpoint;
    }
    if hairpin {
        let sport = ctx.flow.ports.0;
        match hairpin_src {
            Some(a) if nat::rewrite(frame, ctx, End::Src, a, sport).is_ok() => {}
            _ => return Outcome::NoEndpoint,
        }
    }
    Outcome::Translated
}

/// Keep a ClusterIP connection's two entries alive at `now` without a packet through the
/// pipeline: flow offload's sweep calls this for connections the kernel moves, so that one given
/// back to ferry still has its backend. `forward` is the client's tuple to the service, `backend`
/// what it was translated to; `set`, state flags the kernel saw go by ([`flags::FIN`],
/// [`flags::RST`]) for the forward and the reply entry. Whether both entries were there.
pub fn keep_alive(ct: &Conntrack, now: u32, forward: &Tuple, backend: Backend, set: [u8; 2]) -> bool {
    let reply = Tuple { src: backend.addr, dst: forward.src, sport: backend.port, dport: forward.sport, ..*forward };
    let mut found = 0;
    for (t, set) in [(forward, set[0]), (&reply, set[1])] {
        if let Some(hit) = ct.lookup(t) {
            ct.touch(&hit, now, set);
            found += 1;
        }
    }
    found == 2
}

/// A hash of the client address alone (for `sessionAffinity: ClientIP`).
fn client_hash(a: IpAddr) -> u32 {
    let x = match a {
        IpAddr::V4(a) => u64::from(a.to_bits()),
        IpAddr::V6(a) => {
            let b = a.to_bits();
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    let h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32 ^ h as u32
}

/// Reverse translation of a packet from a backend to its client (see the module doc). `snat` is
/// the node's address in the pod network of the packet's family: a reply to it is one of a
/// `Cluster` connection from outside.
#[inline]
pub fn reply(
    ct: &Conntrack,
    now: u32,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    snat: Option<IpAddr>,
) -> ReplyOutcome {
    if services.is_empty() || ctx.flow.l4.is_none() {
        return ReplyOutcome::NotReply;
    }
    if matches!(ctx.flow.protocol, protocol::ICMP | protocol::ICMPV6) {
        return related_reply(ct, services, ctx, frame, snat);
    }
    reply_lookup(ct, now, services, ctx, frame, snat)
}

/// An ICMP error about a connection to a service, on its way to the client: the packet it quotes
/// (client -> backend) gets the service's address and port back as its destination, and an error
/// the backend sent itself gets the service's address as its source (see [`crate::related`]).
/// Not done for hairpin connections and for `Cluster` connections from outside (their quoted
/// source is translated too): those errors pass untranslated.
#[cold]
#[inline(never)]
fn related_reply(
    ct: &Conntrack,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    snat: Option<IpAddr>,
) -> ReplyOutcome {
    let Some(q) = crate::related::quoted(frame, ctx) else { return ReplyOutcome::NotReply };
    if snat == Some(q.src) || !services.is_backend(q.dst, q.dport, q.proto) {
        return ReplyOutcome::NotReply;
    }
    let t = Tuple { src: q.dst, dst: q.src, sport: q.dport, dport: q.sport, proto: q.proto };
    let Some(hit) = ct.lookup(&t) else { return ReplyOutcome::NotReply };
    if hit.flags & flags::REPLY == 0 || hit.flags & flags::HAIRPIN != 0 {
        return ReplyOutcome::NotReply;
    }
    let outer = (ctx.src() == q.dst).then_some(hit.nat.addr);
    if crate::related::rewrite_quoted_dst(frame, ctx, &q, hit.nat.addr, hit.nat.port, outer) {
        ReplyOutcome::Translated
    } else {
        ReplyOutcome::NotReply
    }
}

/// The body of [`reply`], out of line (as [`forward_lookup`]).
#[inline(never)]
fn reply_lookup(
    ct: &Conntrack,
    now: u32,
    services: &Services,
    ctx: &mut Ctx,
    frame: &mut [u8],
    snat: Option<IpAddr>,
) -> ReplyOutcome {
    let (sport, dport) = ctx.flow.ports;
    let proto = ctx.flow.protocol;
    let (src, dst) = (ctx.src(), ctx.dst());
    if !services.is_backend(src, sport, proto) {
        return ReplyOutcome::NotReply;
    }
    let t = Tuple { src, dst, sport, dport, proto };
    let Some(hit) = ct.lookup(&t) else { return ReplyOutcome::NotReply };
    if hit.flags & flags::REPLY == 0 {
        return ReplyOutcome::NotReply;
    }
    let seen = seen_flags(nat::tcp_flags(frame, ctx));
    ct.touch(&hit, now, seen);
    // To the node's own overlay address: a `Cluster` connection from outside (its entry names
    // the client), or the node's own connection to a ClusterIP (its entry names the service).
    if snat == Some(dst) && services.lookup(hit.nat.addr, hit.nat.port, proto).is_none() {
        // A `Cluster` connection from outside: the client back as the destination, the frontend
        // as the source.
        let client = hit.nat;
        let src_key = Tuple {
            src: dst,
            dst: client.addr,
            sport: dport,
            dport: client.port,
            proto: snat_record_proto(proto, true),
        };
        let Some(front) = ct.lookup(&src_key) else { return ReplyOutcome::NotReply };
        ct.touch(&front, now, seen);
        if nat::rewrite(frame, ctx, End::Dst, client.addr, client.port).is_err()
            || nat::rewrite(frame, ctx, End::Src, front.nat.addr, front.nat.port).is_err()
        {
            return ReplyOutcome::NotReply;
        }
        return ReplyOutcome::External;
    }
    if hit.flags & flags::HAIRPIN != 0 && nat::rewrite(frame, ctx, End::Dst, src, dport).is_err() {
        return ReplyOutcome::NotReply;
    }
    if nat::rewrite(frame, ctx, End::Src, hit.nat.addr, hit.nat.port).is_err() {
        return ReplyOutcome::NotReply;
    }
    ReplyOutcome::Translated
}

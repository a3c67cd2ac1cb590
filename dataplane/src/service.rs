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
//!   source (and, for hairpin, the pod's own address as its destination).
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
    let syn_only = proto == protocol::TCP && tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN;
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
                (now.wrapping_sub(h.last_seen) < timeout_ms && svc.backends().contains(&b)).then_some((h, b))
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

/// Reverse translation of a packet from a backend to its client (see the module doc); returns
/// whether it was one.
#[inline]
pub fn reply(ct: &Conntrack, now: u32, services: &Services, ctx: &mut Ctx, frame: &mut [u8]) -> bool {
    if services.is_empty() || ctx.flow.l4.is_none() {
        return false;
    }
    reply_lookup(ct, now, services, ctx, frame)
}

/// The body of [`reply`], out of line (as [`forward_lookup`]).
#[inline(never)]
fn reply_lookup(ct: &Conntrack, now: u32, services: &Services, ctx: &mut Ctx, frame: &mut [u8]) -> bool {
    let (sport, dport) = ctx.flow.ports;
    let proto = ctx.flow.protocol;
    let src = ctx.src();
    if !services.is_backend(src, sport, proto) {
        return false;
    }
    let t = Tuple { src, dst: ctx.dst(), sport, dport, proto };
    let Some(hit) = ct.lookup(&t) else { return false };
    if hit.flags & flags::REPLY == 0 {
        return false;
    }
    ct.touch(&hit, now, seen_flags(nat::tcp_flags(frame, ctx)));
    if hit.flags & flags::HAIRPIN != 0 && nat::rewrite(frame, ctx, End::Dst, src, dport).is_err() {
        return false;
    }
    nat::rewrite(frame, ctx, End::Src, hit.nat.addr, hit.nat.port).is_ok()
}

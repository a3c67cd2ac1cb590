//! The rtnetlink messages of the neighbour sync (control side; pure, no I/O): the three requests
//! it makes (dump the uplink's neighbours, ask the kernel's route to an address, make the kernel
//! resolve an address) and the reading of the kernel's answers and notifications. Encoding and
//! decoding are `netlink-packet-route`'s; this file only says which fields ferry sets and reads.

use std::fmt;
use std::io;
use std::net::IpAddr;

use ferry_encap::MacAddr;
use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// Length of a netlink message header (`struct nlmsghdr`).
const HEADER_LEN: usize = 16;

/// A kernel neighbour state (`NUD_*` from `<linux/neighbour.h>`; stable UAPI values). A bit set,
/// though the kernel reports one state at a time.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NudState(pub u16);

impl NudState {
    /// Resolution in progress, no MAC yet.
    pub const INCOMPLETE: NudState = NudState(0x01);
    /// Confirmed recently.
    pub const REACHABLE: NudState = NudState(0x02);
    /// Not confirmed recently; the kernel would re-verify it on its next use.
    pub const STALE: NudState = NudState(0x04);
    /// Used while stale; waiting for an upper-layer confirmation before probing.
    pub const DELAY: NudState = NudState(0x08);
    /// Being re-verified with unicast probes.
    pub const PROBE: NudState = NudState(0x10);
    /// Resolution failed.
    pub const FAILED: NudState = NudState(0x20);
    /// No resolution needed (the MAC is derived).
    pub const NOARP: NudState = NudState(0x40);
    /// Configured (`ip neigh add ... permanent`).
    pub const PERMANENT: NudState = NudState(0x80);

    /// The states the kernel itself transmits with (its `NUD_VALID`): an entry in one of them with
    /// a MAC is a MAC ferry may use.
    pub fn is_valid(self) -> bool {
        self.0 & (Self::REACHABLE.0 | Self::STALE.0 | Self::DELAY.0 | Self::PROBE.0 | Self::PERMANENT.0 | Self::NOARP.0)
            != 0
    }

    /// Whether the entry is STALE: valid, but the kernel will not re-verify it until something
    /// uses it, and ferry's traffic does not pass through the kernel.
    pub fn is_stale(self) -> bool {
        self.0 & Self::STALE.0 != 0
    }

    /// Whether the kernel is resolving or re-verifying the address right now.
    pub fn is_in_progress(self) -> bool {
        self.0 & (Self::INCOMPLETE.0 | Self::DELAY.0 | Self::PROBE.0) != 0
    }
}

impl fmt::Display for NudState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["INCOMPLETE", "REACHABLE", "STALE", "DELAY", "PROBE", "FAILED", "NOARP", "PERMANENT"];
        if self.0 == 0 {
            return f.write_str("NONE");
        }
        let mut first = true;
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if self.0 & !0xff != 0 {
            write!(f, "{}{:#x}", if first { "" } else { "|" }, self.0 & !0xff)?;
        }
        Ok(())
    }
}

impl fmt::Debug for NudState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A kernel neighbour entry on the uplink, as ferry reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelNeighbour {
    /// The neighbour's address.
    pub addr: IpAddr,
    /// Its state.
    pub state: NudState,
    /// Its MAC, when the kernel has one (not while INCOMPLETE, often not once FAILED).
    pub mac: Option<MacAddr>,
}

impl KernelNeighbour {
    /// The MAC, when the entry is in a state the kernel transmits with.
    pub fn usable_mac(&self) -> Option<MacAddr> {
        self.mac.filter(|_| self.state.is_valid())
    }
}

/// How the kernel routes an address out of the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Path {
    /// Directly: the address is a neighbour on the uplink's link.
    OnLink,
    /// Through this router.
    Via(IpAddr),
    /// Not at all out of the uplink: why, in words.
    NoRoute(String),
}

/// One decoded message of a reply or notification stream.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A neighbour entry (`RTM_NEWNEIGH`) on the uplink.
    Neighbour(KernelNeighbour),
    /// A route (`RTM_NEWROUTE`), answering a route query.
    Route(Path),
    /// An interface (`RTM_NEWLINK`): its index.
    Link(u32),
    /// The end of a dump (`NLMSG_DONE`).
    Done,
    /// An acknowledgement (`NLMSG_ERROR` with code 0).
    Ack,
    /// A refusal (`NLMSG_ERROR` with an errno).
    Error(io::Error),
    /// Something ferry does not use: another interface's entry, a deletion, an unknown type.
    Ignored,
    /// A message `netlink-packet-route` could not decode; counted and skipped, so that one odd
    /// entry never hides the others.
    Undecodable,
}

fn request(seq: u32, flags: u16, message: RouteNetlinkMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// `ip link show NAME`: the interface's index, asked of the sockets' own namespace (an
/// `if_nametoindex` would ask the calling thread's, which may be another).
pub(crate) fn get_link(seq: u32, name: &str) -> Vec<u8> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    request(seq, NLM_F_REQUEST, RouteNetlinkMessage::GetLink(m))
}

/// `ip neigh show dev UPLINK` for both families: a dump filtered by the kernel on `ifindex`
/// (`NDA_IFINDEX`, honoured with or without strict checking).
pub(crate) fn dump_neighbours(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut m = NeighbourMessage::default();
    m.attributes.push(NeighbourAttribute::IfIndex(ifindex));
    request(seq, NLM_F_REQUEST | NLM_F_DUMP, RouteNetlinkMessage::GetNeighbour(m))
}

/// `ip route get ADDR`: the route the kernel would use to send to `addr`. Deliberately without
/// an output interface: given one, IPv4 answers "on-link" for an address it has no route to at
/// all, and a node routed out of another interface is a misconfiguration to report.
pub(crate) fn get_route(seq: u32, addr: IpAddr) -> Vec<u8> {
    let mut m = RouteMessage::default();
    m.header.address_family = family(addr);
    m.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    m.attributes.push(RouteAttribute::Destination(RouteAddress::from(addr)));
    request(seq, NLM_F_REQUEST, RouteNetlinkMessage::GetRoute(m))
}

/// `RTM_NEWNEIGH` with `NTF_USE` for `addr` on the uplink: the kernel treats the neighbour as
/// used, exactly as when it has a packet for it. A missing entry is created and resolved (ARP
/// request or neighbour solicitation), a FAILED one resolved again, a STALE one re-verified
/// (DELAY, then PROBE); a REACHABLE one is left alone. No MAC or state is written.
pub(crate) fn use_neighbour(seq: u32, addr: IpAddr, ifindex: u32) -> Vec<u8> {
    let mut m = NeighbourMessage::default();
    m.header.family = family(addr);
    m.header.ifindex = ifindex;
    m.header.flags = NeighbourFlags::Use;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::from(addr)));
    request(seq, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, RouteNetlinkMessage::NewNeighbour(m))
}

pub(crate) use crate::kernel::netlink_messages as split;

/// Decode one message; neighbour entries are kept only for interface `ifindex`.
pub(crate) fn decode(message: &[u8], ifindex: u32) -> Reply {
    // An interface is read from its fixed header alone (`struct ifinfomsg`, index at offset 4):
    // the dozens of attributes after it are of no use here, and a kernel newer than the crate may
    // add some it cannot decode.
    if message.len() >= HEADER_LEN + 16 && u16::from_ne_bytes([message[4], message[5]]) == libc::RTM_NEWLINK {
        let at = HEADER_LEN + 4;
        return Reply::Link(u32::from_ne_bytes([message[at], message[at + 1], message[at + 2], message[at + 3]]));
    }
    let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) else {
        return Reply::Undecodable;
    };
    match m.payload {
        NetlinkPayload::Done(_) => Reply::Done,
        NetlinkPayload::Error(e) => match e.code {
            None => Reply::Ack,
            Some(_) => Reply::Error(e.to_io()),
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
            neighbour(&n, ifindex).map_or(Reply::Ignored, Reply::Neighbour)
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => Reply::Route(path(&r, ifindex)),
        _ => Reply::Ignored,
    }
}

fn neighbour(n: &NeighbourMessage, ifindex: u32) -> Option<KernelNeighbour> {
    if n.header.ifindex != ifindex || n.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => addr = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => addr = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(ll) => mac = <[u8; 6]>::try_from(ll.as_slice()).ok().map(MacAddr),
            _ => {}
        }
    }
    Some(KernelNeighbour { addr: addr?, state: NudState(u16::from(n.header.state)), mac })
}

fn path(r: &RouteMessage, ifindex: u32) -> Path {
    if r.header.kind != RouteType::Unicast {
        return Path::NoRoute(format!("the kernel's route is of type {:?}, not unicast", r.header.kind));
    }
    let mut via = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) | RouteAttribute::Via(RouteVia::Inet(v4)) => {
                via = Some(IpAddr::V4(*v4));
            }
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) | RouteAttribute::Via(RouteVia::Inet6(v6)) => {
                via = Some(IpAddr::V6(*v6));
            }
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    match (oif, via) {
        (Some(o), _) if o != ifindex => Path::NoRoute(format!("the kernel routes it out of interface index {o}")),
        (None, _) => Path::NoRoute("the kernel's route names no output interface".to_owned()),
        (Some(_), Some(gw)) => Path::Via(gw),
        (Some(_), None) => Path::OnLink,
    }
}

/// Decode a whole stream (a dump's replies, or queued notifications), appending what it says to
/// `out` and returning how many messages could not be decoded.
///
/// # Errors
/// The stream cannot be framed, or the kernel refused the request (`NLMSG_ERROR`).
pub(crate) fn decode_all(bytes: &[u8], ifindex: u32, out: &mut Vec<KernelNeighbour>) -> Result<usize, StreamError> {
    let mut undecodable = 0;
    for (_, m) in split(bytes).map_err(StreamError::Decode)? {
        match decode(m, ifindex) {
            Reply::Neighbour(n) => out.push(n),
            Reply::Error(e) => return Err(StreamError::Refused(e)),
            Reply::Undecodable => undecodable += 1,
            Reply::Route(_) | Reply::Link(_) | Reply::Done | Reply::Ack | Reply::Ignored => {}
        }
    }
    Ok(undecodable)
}

/// Why a reply stream could not be read.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// Framing broken.
    Decode(DecodeError),
    /// The kernel answered with an errno.
    Refused(io::Error),
}

//! Link operations over rtnetlink and the ethtool ioctl (setup side; nothing here runs per
//! packet): what `ferry-cni` needs to wire a pod and the agent needs to create its host port.
//!
//! A [`Netlink`] handle owns an rtnetlink socket and an ioctl socket, both bound to the network
//! namespace they were opened in, whatever thread uses them later. [`Netlink::open_in_netns`]
//! opens them on a short-lived thread that enters the target namespace and exits right after, so
//! no caller thread ever leaves its own namespace.
//!
//! Messages are built and parsed with `netlink-packet-route`; each request asks for an
//! acknowledgement, so every operation either completes or returns a [`LinkError`] naming the
//! interface and the operation. The request/reply exchange and the ioctl itself are
//! `ferry_dataplane::kernel`'s, shared with the data plane's neighbour sync and XDP setup.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_dataplane::kernel;
use ferry_encap::MacAddr;
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// How long one `recv` from the kernel may take.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take in all (a dump spans several datagrams).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `ETHTOOL_GTXCSUM` / `ETHTOOL_STXCSUM` from `<linux/ethtool.h>` (legacy commands the kernel maps
/// onto the `tx-checksum-*` features, exactly what `ethtool -K dev tx off` changes).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
/// `ETHTOOL_SGRO` (`ethtool -K dev gro on|off`).
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The netlink or ioctl socket could not be opened.
    #[error("opening {what}: {source}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The network namespace could not be entered.
    #[error("entering network namespace {path}: {source}")]
    Netns {
        /// The namespace's path (`/var/run/netns/x`, `/proc/PID/ns/net`).
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The interface does not exist.
    #[error("{op} {ifname}: no such interface")]
    NoSuchLink {
        /// The operation.
        op: &'static str,
        /// The interface.
        ifname: String,
    },
    /// The kernel refused or the exchange failed.
    #[error("{op} {ifname}: {source}")]
    Op {
        /// The operation (`"create veth"`, `"add address 10.0.0.1/32 to"`, ...).
        op: String,
        /// The interface.
        ifname: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

impl LinkError {
    fn op(op: impl Into<String>, ifname: &str, source: io::Error) -> Self {
        LinkError::Op { op: op.into(), ifname: ifname.to_owned(), source }
    }
}

/// A veth pair to create.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    /// The end that stays in the handle's namespace.
    pub name: &'a str,
    /// The other end's name (in `peer_netns` when given).
    pub peer_name: &'a str,
    /// This end's MAC (kernel-chosen random one if `None`).
    pub mac: Option<MacAddr>,
    /// The peer's MAC (kernel-chosen random one if `None`).
    pub peer_mac: Option<MacAddr>,
    /// MTU of both ends (kernel default if `None`).
    pub mtu: Option<u32>,
    /// TX and RX queues of both ends (one per AF_XDP socket bound to the end); at least 1.
    pub queues: u32,
    /// Create the peer directly in this namespace (an open `/var/run/netns/x`), not beside this end.
    pub peer_netns: Option<&'a File>,
}

/// What [`Netlink::link`] reads of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address, when the link has a 6-byte one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// TX queues.
    pub tx_queues: u32,
    /// RX queues.
    pub rx_queues: u32,
    /// The link's kind (`veth`, `tun`, ...), if it has one.
    pub kind: Option<String>,
}

/// A route to install or as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination (`0.0.0.0/0` for a default route).
    pub dst: IpNet,
    /// Next hop; `None` for a directly connected (scope link) destination.
    pub via: Option<IpAddr>,
    /// Treat `via` as on-link even though no address of the interface covers it.
    pub onlink: bool,
    /// Preferred source address.
    pub src: Option<IpAddr>,
}

/// An rtnetlink socket and an ethtool ioctl socket in one network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    ioctl: OwnedFd,
    /// The last request's sequence number (a `Cell`: every method takes `&self`).
    seq: Cell<u32>,
}

fn family(addr: &IpAddr) -> AddressFamily {
    if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

impl Netlink {
    /// Opens the sockets in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`LinkError::Socket`] when a socket cannot be opened.
    pub fn open() -> Result<Self, LinkError> {
        let sock_err = |source| LinkError::Socket { what: "an rtnetlink socket", source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err)?;
        socket.bind_auto().map_err(sock_err)?;
        kernel::set_recv_timeout(socket.as_fd(), RECV_TIMEOUT).map_err(sock_err)?;
        // SAFETY: plain socket(2) call; the result is checked before it is wrapped.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(LinkError::Socket { what: "the ethtool ioctl socket", source: io::Error::last_os_error() });
        }
        // SAFETY: `fd` is a freshly opened descriptor nobody else owns.
        let ioctl = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { socket, ioctl, seq: Cell::new(0) })
    }

    /// Opens the sockets in the network namespace at `netns` (a bind-mounted namespace file or
    /// `/proc/PID/ns/net`). The namespace is entered on a helper thread that ends right after;
    /// the calling thread stays where it is.
    ///
    /// # Errors
    /// [`LinkError::Netns`] when the namespace cannot be opened or entered, [`LinkError::Socket`]
    /// when a socket cannot be opened there.
    pub fn open_in_netns(netns: &Path) -> Result<Self, LinkError> {
        let ns_err = |source| LinkError::Netns { path: netns.to_owned(), source };
        let file = File::open(netns).map_err(ns_err)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open namespace descriptor; it only affects this helper
                // thread, which ends when the closure returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(ns_err(io::Error::last_os_error()));
                }
                Netlink::open()
            })
            .join()
            .unwrap_or_else(|_| Err(ns_err(io::Error::other("the namespace helper thread panicked"))))
        })
    }

    /// The interface `ifname`, or `None` if it does not exist.
    ///
    /// # Errors
    /// [`LinkError::Op`] when the kernel cannot be asked.
    pub fn link(&self, ifname: &str) -> Result<Option<Link>, LinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(ifname.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(read_link(&l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(LinkError::op("read link", ifname, e)),
        }
    }

    /// Whether the interface `ifname` exists.
    ///
    /// # Errors
    /// As [`Netlink::link`].
    pub fn link_exists(&self, ifname: &str) -> Result<bool, LinkError> {
        Ok(self.link(ifname)?.is_some())
    }

    fn existing(&self, op: &'static str, ifname: &str) -> Result<Link, LinkError> {
        self.link(ifname)?.ok_or_else(|| LinkError::NoSuchLink { op, ifname: ifname.to_owned() })
    }

    /// Creates a veth pair as `spec` says (both ends down).
    ///
    /// # Errors
    /// [`LinkError::Op`] naming `spec.name`, e.g. when a link of that name exists already.
    pub fn create_veth(&self, spec: &VethSpec<'_>) -> Result<(), LinkError> {
        let queues = spec.queues.max(1);
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(spec.peer_name.to_owned()));
        peer.attributes.push(LinkAttribute::NumTxQueues(queues));
        peer.attributes.push(LinkAttribute::NumRxQueues(queues));
        if let Some(mac) = spec.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        if let Some(mtu) = spec.mtu {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(ns) = spec.peer_netns {
            peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.name.to_owned()));
        msg.attributes.push(LinkAttribute::NumTxQueues(queues));
        msg.attributes.push(LinkAttribute::NumRxQueues(queues));
        if let Some(mac) = spec.mac {
            msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        if let Some(mtu) = spec.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .map_err(|e| LinkError::op(format!("create veth (peer {})", spec.peer_name), spec.name, e))
    }

    /// Deletes `ifname` (with a veth, its peer goes too). `Ok(false)` if it did not exist.
    ///
    /// # Errors
    /// [`LinkError::Op`] when the kernel refuses.
    pub fn delete_link(&self, ifname: &str) -> Result<bool, LinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(ifname.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(LinkError::op("delete link", ifname, e)),
        }
    }

    fn set_link(&self, op: &'static str, ifname: &str, edit: impl FnOnce(&mut LinkMessage)) -> Result<(), LinkError> {
        let link = self.existing(op, ifname)?;
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        edit(&mut msg);
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop).map_err(|e| LinkError::op(op, ifname, e))
    }

    /// Sets the MAC of `ifname`.
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn set_mac(&self, ifname: &str, mac: MacAddr) -> Result<(), LinkError> {
        self.set_link("set MAC of", ifname, |m| m.attributes.push(LinkAttribute::Address(mac.0.to_vec())))
    }

    /// Sets the MTU of `ifname`.
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), LinkError> {
        self.set_link("set MTU of", ifname, |m| m.attributes.push(LinkAttribute::Mtu(mtu)))
    }

    /// Brings `ifname` up.
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn set_up(&self, ifname: &str) -> Result<(), LinkError> {
        self.set_link("set up", ifname, |m| {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        })
    }

    /// Adds `addr` (with its prefix length) to `ifname`; an address already there is replaced,
    /// not an error. IPv6 addresses skip duplicate address detection.
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn add_address(&self, ifname: &str, addr: IpNet) -> Result<(), LinkError> {
        let op = format!("add address {addr} to");
        let link = self.existing("add address to", ifname)?;
        let mut msg = AddressMessage::default();
        msg.header.family = family(&addr.addr());
        msg.header.prefix_len = addr.prefix_len();
        msg.header.index = link.index;
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if addr.addr().is_ipv6() {
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_REPLACE)
            .map(drop)
            .map_err(|e| LinkError::op(op, ifname, e))
    }

    /// The addresses of `ifname` (both families).
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn addresses(&self, ifname: &str) -> Result<Vec<IpNet>, LinkError> {
        let link = self.existing("list addresses of", ifname)?;
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
            .map_err(|e| LinkError::op("list addresses of", ifname, e))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
            if a.header.index != link.index {
                continue;
            }
            let addr = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(net) = addr.and_then(|ip| IpNet::new(ip, a.header.prefix_len).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Installs `route` out of `ifname` in the main table (replacing one to the same destination).
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn add_route(&self, ifname: &str, route: &Route) -> Result<(), LinkError> {
        let op = match route.via {
            Some(via) => format!("add route {} via {via} dev", route.dst),
            None => format!("add route {} dev", route.dst),
        };
        let link = self.existing("add route dev", ifname)?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(&route.dst.addr());
        msg.header.destination_prefix_length = route.dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = if route.via.is_some() { RouteScope::Universe } else { RouteScope::Link };
        msg.header.kind = RouteType::Unicast;
        if route.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if route.dst.prefix_len() > 0 {
            msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(route.dst.addr())));
        }
        if let Some(via) = route.via {
            msg.attributes.push(RouteAttribute::Gateway(RouteAddress::from(via)));
        }
        if let Some(src) = route.src {
            msg.attributes.push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        msg.attributes.push(RouteAttribute::Oif(link.index));
        self.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_REPLACE)
            .map(drop)
            .map_err(|e| LinkError::op(op, ifname, e))
    }

    /// The main table's routes out of `ifname` (both families).
    ///
    /// # Errors
    /// [`LinkError::NoSuchLink`], [`LinkError::Op`].
    pub fn routes(&self, ifname: &str) -> Result<Vec<Route>, LinkError> {
        let link = self.existing("list routes of", ifname)?;
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = fam;
            let replies = self
                .request(RouteNetlinkMessage::GetRoute(req), NLM_F_DUMP)
                .map_err(|e| LinkError::op("list routes of", ifname, e))?;
            for m in replies {
                let RouteNetlinkMessage::NewRoute(r) = m else { continue };
                if let Some(route) = read_route(&r, link.index) {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// Whether transmit checksum offload is on for `ifname`.
    ///
    /// # Errors
    /// [`LinkError::Op`] when the ioctl fails (ENODEV for a missing interface).
    pub fn tx_checksum(&self, ifname: &str) -> Result<bool, LinkError> {
        let mut value = EthtoolValue { cmd: ETHTOOL_GTXCSUM, data: 0 };
        self.ethtool(ifname, &mut value).map_err(|e| LinkError::op("read tx checksumming of", ifname, e))?;
        Ok(value.data != 0)
    }

    /// Turns transmit checksum offload of `ifname` on or off (`ethtool -K ifname tx on|off`).
    /// Off on a pod's veth makes the kernel finish L4 checksums before a frame reaches an
    /// AF_XDP socket, which cannot tell a frame with a partial checksum from a finished one.
    ///
    /// # Errors
    /// [`LinkError::Op`] when the ioctl fails.
    pub fn set_tx_checksum(&self, ifname: &str, on: bool) -> Result<(), LinkError> {
        let mut value = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: u32::from(on) };
        let op = if on { "turn tx checksumming on for" } else { "turn tx checksumming off for" };
        self.ethtool(ifname, &mut value).map_err(|e| LinkError::op(op, ifname, e))
    }

    /// Turns generic receive offload of `ifname` on or off (`ethtool -K ifname gro on|off`). On
    /// a veth, on also gives its receive side a NAPI queue: what the other end sends is taken in
    /// the order it was sent, whichever CPU sent it.
    ///
    /// # Errors
    /// [`LinkError::Op`] when the ioctl fails.
    pub fn set_gro(&self, ifname: &str, on: bool) -> Result<(), LinkError> {
        let mut value = EthtoolValue { cmd: ETHTOOL_SGRO, data: u32::from(on) };
        let op = if on { "turn GRO on for" } else { "turn GRO off for" };
        self.ethtool(ifname, &mut value).map_err(|e| LinkError::op(op, ifname, e))
    }

    fn ethtool(&self, ifname: &str, value: &mut EthtoolValue) -> io::Result<()> {
        // SAFETY: `EthtoolValue` is the whole `struct ethtool_value` of ETHTOOL_GTXCSUM/STXCSUM.
        unsafe { kernel::ethtool(self.ioctl.as_fd(), ifname, value) }
    }

    /// Sends `msg` with `flags` (plus REQUEST|ACK) and collects the replies until the ack or the
    /// end of the dump. A kernel error comes back as its errno.
    fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut bytes);
        let replies = kernel::netlink_request(&self.socket, &bytes, seq, REQUEST_TIMEOUT, &mut Vec::new())?;
        let invalid = |e: netlink_packet_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
        let mut out = Vec::new();
        for (_, m) in kernel::netlink_messages(&replies).map_err(invalid)? {
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m).map_err(invalid)?.payload {
                NetlinkPayload::Error(err) if err.code.is_some() => return Err(err.to_io()),
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            }
        }
        Ok(out)
    }
}

fn read_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        tx_queues: 0,
        rx_queues: 0,
        kind: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::NumTxQueues(q) => link.tx_queues = *q,
            LinkAttribute::NumRxQueues(q) => link.rx_queues = *q,
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A main-table unicast route out of interface `index`, as a [`Route`].
fn read_route(msg: &RouteMessage, index: u32) -> Option<Route> {
    if msg.header.table != RouteHeader::RT_TABLE_MAIN || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let (mut dst, mut via, mut src, mut oif) = (None, None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => via = route_ip(a),
            RouteAttribute::PrefSource(a) => src = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let dst = match dst {
        Some(ip) => ip,
        None if msg.header.address_family == AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
    Some(Route { dst, via, onlink: msg.header.flags.contains(RouteFlags::Onlink), src })
}

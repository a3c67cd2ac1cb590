//! Unit tests of the neighbour sync (no privileges): a fake kernel answers every request with
//! netlink messages, some captured from a real kernel (6.18, two namespaces joined by a veth),
//! others emitted with `netlink-packet-route`, and records what it was asked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_encap::{MacAddr, TunnelKind};
use ferry_tables::{DesiredState, RemoteNode, Route, Tables, Underlay};
use netlink_packet_core::{
    ErrorMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::netlink::{self, KernelNeighbour, NudState, Path};
use super::sys::NeighbourSys;
use super::*;

const IFINDEX: u32 = 2;
const UPLINK: &str = "eth0";

/// `ip neigh` dump of a veth (index 2) from a 6.18 kernel, through `NLMSG_DONE`: 10.77.0.7
/// PERMANENT 02:fe:00:00:00:07, 10.77.0.9 FAILED (no MAC), 10.77.0.2 REACHABLE 02:fe:00:00:00:02,
/// three IPv6 multicast NOARP entries, fd77::2 REACHABLE 02:fe:00:00:00:02.
const KERNEL_DUMP: &str = "4c0000001c00220001000000bb3c0000020000000200000080000001080001000a4d00070a00020002fe00000007000008000400000000001400030061010000610100006101000000000000400000001c00220001000000bb3c0000020000000200000020000001080001000a4d000908000400060000001400030037190000c701000093000000000000004c0000001c00220001000000bb3c0000020000000200000002000001080001000a4d00020a00020002fe000000020000080004000400000014000300c8010000c8010000c801000001000000580000001c00220001000000bb3c00000a000000020000004000000514000100ff0200000000000000000000000000020a00020033330000000200000800040000000000140003003c190000cc010000cc01000000000000580000001c00220001000000bb3c00000a000000020000004000000514000100ff0200000000000000000001ff0000020a0002003333ff000002000008000400000000001400030038190000c8010000c801000000000000580000001c00220001000000bb3c00000a000000020000000200000114000100fd7700000000000000000000000000020a00020002fe000000020000080004000400000014000300c8010000c8010000c801000001000000580000001c00220001000000bb3c00000a000000020000004000000514000100ff0200000000000000000000000000160a00020033330000001600000800040000000000140003003c190000cc010000cc01000000000000140000000300020001000000bb3c000000000000";
/// `ip route get 10.99.0.5` with `10.99.0.0/24 via 10.77.0.2 dev veth` (index 2).
const KERNEL_ROUTE_VIA4: &str = "70000000180000000a000000bb3c000002200000fe0000010002000008000f00fe000000080001000a6300050800040002000000080007000a4d0001080005000a4d0002080019000000000024000c000200000000000000000000000000000000000000000000000000000000000000";
/// `ip route get 10.77.0.2`: on-link out of index 2.
const KERNEL_ROUTE_ONLINK4: &str = "68000000180000000b000000bb3c000002200000fe0000010002000008000f00fe000000080001000a4d00020800040002000000080007000a4d0001080019000000000024000c000200000000000000000000000000000000000000000000000000000000000000";
/// `ip route get 203.0.113.9` without a route: `NLMSG_ERROR` -101 (ENETUNREACH).
const KERNEL_ROUTE_UNREACHABLE: &str =
    "38000000020000000c000000bb3c00009bffffff240000001a0001000c0000000000000002200000000000000000000008000100cb007109";
/// `ip route get fd99::5` with `fd99::/64 via fd77::2 dev veth`.
const KERNEL_ROUTE_VIA6: &str = "b0000000180000000d000000bb3c00000a808000fe0300010000000008000f00fe00000014000100fd990000000000000000000000000005140002000000000000000000000000000000000014000700fd770000000000000000000000000001080006000004000014000500fd770000000000000000000000000002080004000200000024000c0002000000000000000000000000000000000000000000000000000000000000000500140000000000";
/// `ip route get fd77::2`: on-link out of index 2.
const KERNEL_ROUTE_ONLINK6: &str = "9c000000180000000e000000bb3c00000a808000fe0200010000000008000f00fe00000014000100fd770000000000000000000000000002140002000000000000000000000000000000000014000700fd7700000000000000000000000000010800060000010000080004000200000024000c0002000000000000000000000000000000000000000000000000000000000000000500140000000000";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0xfe, 0, 0, 0, last])
}

fn secs(t0: Instant, s: f64) -> Instant {
    t0 + Duration::from_secs_f64(s)
}

fn emit(flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut m = NetlinkMessage::new(header, payload);
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// An `RTM_NEWNEIGH` as the kernel sends it in a dump or a notification.
fn neigh_on(ifindex: u32, addr: &str, state: NudState, lladdr: Option<MacAddr>) -> Vec<u8> {
    let addr = ip(addr);
    let mut m = NeighbourMessage::default();
    m.header.family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    m.header.ifindex = ifindex;
    m.header.state = state.0.into();
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::from(addr)));
    if let Some(l) = lladdr {
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(l.0.to_vec()));
    }
    emit(NLM_F_MULTIPART, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)))
}

fn neigh(addr: &str, state: NudState, lladdr: Option<MacAddr>) -> Vec<u8> {
    neigh_on(IFINDEX, addr, state, lladdr)
}

/// The real dump's last message, `NLMSG_DONE`.
fn done() -> Vec<u8> {
    let b = unhex(&KERNEL_DUMP[KERNEL_DUMP.len() - 40..]);
    assert_eq!((b[0], b[4]), (20, 3), "the fixture ends with NLMSG_DONE");
    b
}

fn errno(code: i32) -> Vec<u8> {
    let mut e = ErrorMessage::default();
    e.code = std::num::NonZeroI32::new(-code);
    e.header = vec![0; 16];
    emit(0, NetlinkPayload::Error(e))
}

fn route(dst: &str, via: Option<&str>, oif: u32) -> Vec<u8> {
    let dst = ip(dst);
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(gw) = via {
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(ip(gw))));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    emit(0, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)))
}

/// `bytes` with every message's sequence number set to `seq`.
fn with_seq(bytes: &[u8], seq: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = 0;
    while at + 16 <= out.len() {
        let len = u32::from_ne_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]) as usize;
        out[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
        at += len.next_multiple_of(4).max(16);
    }
    out
}

/// What the fake kernel holds and what it was asked.
#[derive(Debug, Default)]
struct Kernel {
    /// The uplink's index; `None`: no such interface.
    ifindex: Option<u32>,
    /// The dump's messages (without `NLMSG_DONE`, which is appended).
    entries: Vec<u8>,
    /// Refuse dumps with this errno.
    dump_errno: Option<i32>,
    /// Answers to route queries; an address missing here is unreachable.
    routes: HashMap<IpAddr, Vec<u8>>,
    /// Queued notifications.
    notifications: Vec<u8>,
    /// Report lost notifications once.
    overflow: bool,
    /// Refuse probes with this errno.
    probe_errno: Option<i32>,
    dumps: usize,
    route_queries: Vec<IpAddr>,
    /// `NTF_USE` requests.
    uses: Vec<IpAddr>,
    datagrams: Vec<IpAddr>,
}

impl Kernel {
    fn set_entries(&mut self, entries: &[Vec<u8>]) {
        self.entries = entries.concat();
    }

    /// Every probe (either method) so far, and forget them.
    fn take_probes(&mut self) -> Vec<IpAddr> {
        let mut p = std::mem::take(&mut self.uses);
        p.append(&mut self.datagrams);
        p
    }
}

#[derive(Debug, Clone, Default)]
struct Fake(Arc<Mutex<Kernel>>);

impl Fake {
    fn new() -> Self {
        let f = Fake::default();
        f.k().ifindex = Some(IFINDEX);
        f
    }

    fn k(&self) -> MutexGuard<'_, Kernel> {
        self.0.lock().expect("fake kernel")
    }
}

impl NeighbourSys for Fake {
    fn request(&mut self, request: &[u8], seq: u32) -> io::Result<Vec<u8>> {
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(request).expect("ferry's request decodes");
        assert_eq!(m.header.sequence_number, seq);
        assert_ne!(m.header.flags & NLM_F_REQUEST, 0);
        let mut k = self.k();
        let NetlinkPayload::InnerMessage(inner) = m.payload else { panic!("not a request: {m:?}") };
        let reply = match inner {
            RouteNetlinkMessage::GetLink(l) => {
                assert_eq!(l.attributes, vec![LinkAttribute::IfName(UPLINK.to_owned())]);
                match k.ifindex {
                    Some(index) => {
                        let mut l = LinkMessage::default();
                        l.header.index = index;
                        l.attributes.push(LinkAttribute::IfName(UPLINK.to_owned()));
                        emit(0, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)))
                    }
                    None => errno(libc::ENODEV),
                }
            }
            RouteNetlinkMessage::GetNeighbour(n) => {
                assert_eq!(m.header.flags & NLM_F_DUMP, NLM_F_DUMP);
                assert_eq!(n.attributes, vec![NeighbourAttribute::IfIndex(IFINDEX)], "filtered on the uplink");
                k.dumps += 1;
                match k.dump_errno {
                    Some(e) => errno(e),
                    None => [k.entries.clone(), done()].concat(),
                }
            }
            RouteNetlinkMessage::GetRoute(r) => {
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                let dst = dst.expect("a destination");
                assert_eq!(r.header.destination_prefix_length, if dst.is_ipv4() { 32 } else { 128 });
                k.route_queries.push(dst);
                k.routes.get(&dst).cloned().unwrap_or_else(|| errno(libc::ENETUNREACH))
            }
            RouteNetlinkMessage::NewNeighbour(n) => {
                assert_eq!(n.header.flags, NeighbourFlags::Use, "only NTF_USE, nothing written");
                assert_eq!(n.header.ifindex, IFINDEX);
                assert_eq!(n.header.state, Default::default(), "no state written");
                assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
                let dst = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                assert!(!n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(_))));
                k.uses.push(dst.expect("a destination"));
                k.probe_errno.map_or_else(|| errno(0), errno)
            }
            other => panic!("unexpected request {other:?}"),
        };
        Ok(with_seq(&reply, seq))
    }

    fn notifications(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let mut k = self.k();
        out.append(&mut k.notifications);
        if std::mem::take(&mut k.overflow) { Err(io::Error::from_raw_os_error(libc::ENOBUFS)) } else { Ok(()) }
    }

    fn send_datagram(&mut self, to: IpAddr) -> io::Result<()> {
        let mut k = self.k();
        k.datagrams.push(to);
        k.probe_errno.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
    }

    fn notification_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

fn node(name: &str, underlay: &str, cidr: &str) -> RemoteNode {
    RemoteNode {
        name: name.to_owned(),
        pod_cidrs: vec![cidr.parse().expect("cidr")],
        underlay: ip(underlay),
        other_underlays: Vec::new(),
        vtep_mac: MacAddr([0x02, 0xee, 0, 0, 0, 1]),
        vni: 1,
        tunnel: TunnelKind::Vxlan,
        port: 4789,
    }
}

fn underlay(gateway_v4: Option<&str>, gateway_v6: Option<&str>) -> Underlay {
    let mut u = Underlay::new(mac(1), Some("10.77.0.1".parse().expect("v4")), Some("fd77::1".parse().expect("v6")));
    u.gateway_v4 = gateway_v4.map(|g| g.parse().expect("v4"));
    u.gateway_v6 = gateway_v6.map(|g| g.parse().expect("v6"));
    u
}

/// Tables with `nodes`, neighbours valid 30 s; and a sync over `fake`.
fn setup(
    u: &Underlay,
    nodes: Vec<RemoteNode>,
    config: SyncConfig,
    fake: &Fake,
    t0: Instant,
) -> (Tables, NeighbourSync) {
    let mut tables = Tables::new(u.clone(), Duration::from_secs(30));
    tables.set_desired(DesiredState { nodes, ..DesiredState::default() }, t0).expect("valid state");
    let sync = NeighbourSync::with_sys(UPLINK, u, config, Box::new(fake.clone())).expect("sync");
    (tables, sync)
}

/// The next-hop MAC of the template toward `dst`, or why there is none.
fn template_mac(tables: &Tables, dst: &str) -> Result<MacAddr, String> {
    match tables.current().route(ip(dst)) {
        Route::Remote { template, .. } => Ok(template.next_hop_mac()),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn the_sync_can_move_to_the_control_thread() {
    fn send<T: Send>() {}
    send::<NeighbourSync>();
    send::<SyncReport>();
}

#[test]
fn a_real_kernel_dump_decodes_to_its_entries() {
    let bytes = unhex(KERNEL_DUMP);
    let mut entries = Vec::new();
    assert_eq!(netlink::decode_all(&bytes, IFINDEX, &mut entries).expect("frames"), 0, "nothing undecodable");
    let multicast =
        |a: &str, m: [u8; 6]| KernelNeighbour { addr: ip(a), state: NudState::NOARP, mac: Some(MacAddr(m)) };
    assert_eq!(
        entries,
        vec![
            KernelNeighbour { addr: ip("10.77.0.7"), state: NudState::PERMANENT, mac: Some(mac(7)) },
            KernelNeighbour { addr: ip("10.77.0.9"), state: NudState::FAILED, mac: None },
            KernelNeighbour { addr: ip("10.77.0.2"), state: NudState::REACHABLE, mac: Some(mac(2)) },
            multicast("ff02::2", [0x33, 0x33, 0, 0, 0, 2]),
            multicast("ff02::1:ff00:2", [0x33, 0x33, 0xff, 0, 0, 2]),
            KernelNeighbour { addr: ip("fd77::2"), state: NudState::REACHABLE, mac: Some(mac(2)) },
            multicast("ff02::16", [0x33, 0x33, 0, 0, 0, 0x16]),
        ]
    );
    assert_eq!(entries[1].usable_mac(), None);
    assert_eq!(entries[2].usable_mac(), Some(mac(2)));

    // Another interface's dump says nothing about the uplink.
    let mut other = Vec::new();
    netlink::decode_all(&bytes, IFINDEX + 1, &mut other).expect("frames");
    assert!(other.is_empty());
}

#[test]
fn states_are_classified_as_the_kernel_uses_them() {
    let usable = [NudState::REACHABLE, NudState::STALE, NudState::DELAY, NudState::PROBE, NudState::PERMANENT];
    for s in usable {
        assert!(s.is_valid(), "{s}");
    }
    for s in [NudState::INCOMPLETE, NudState::FAILED, NudState(0)] {
        assert!(!s.is_valid(), "{s}");
    }
    assert!(NudState::STALE.is_stale() && !NudState::DELAY.is_stale());
    assert!(NudState::INCOMPLETE.is_in_progress() && NudState::PROBE.is_in_progress());
    assert!(!NudState::FAILED.is_in_progress());
    assert_eq!(NudState(0).to_string(), "NONE");
    assert_eq!(NudState(0x24).to_string(), "STALE|FAILED");
    assert_eq!(NudState(0x102).to_string(), "REACHABLE|0x100");
}

#[test]
fn real_route_answers_decode_to_paths() {
    let path = |hex: &str| match netlink::decode(&unhex(hex), IFINDEX) {
        netlink::Reply::Route(p) => p,
        netlink::Reply::Error(e) => Path::NoRoute(e.to_string()),
        other => panic!("{other:?}"),
    };
    assert_eq!(path(KERNEL_ROUTE_VIA4), Path::Via(ip("10.77.0.2")));
    assert_eq!(path(KERNEL_ROUTE_ONLINK4), Path::OnLink);
    assert_eq!(path(KERNEL_ROUTE_VIA6), Path::Via(ip("fd77::2")));
    assert_eq!(path(KERNEL_ROUTE_ONLINK6), Path::OnLink);
    assert!(matches!(path(KERNEL_ROUTE_UNREACHABLE), Path::NoRoute(r) if r.contains("unreachable")));
    // The same on-link route, seen from a sync on another interface: not out of the uplink.
    match netlink::decode(&unhex(KERNEL_ROUTE_ONLINK4), IFINDEX + 5) {
        netlink::Reply::Route(Path::NoRoute(r)) => assert!(r.contains("interface index 2"), "{r}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn requests_carry_the_kernel_structures_fields() {
    // Offsets into the message after the 16-byte nlmsghdr, from <linux/neighbour.h>'s struct
    // ndmsg { u8 family; u8 pad1; u16 pad2; s32 ifindex; u16 state; u8 flags; u8 type; }.
    let r = netlink::use_neighbour(7, ip("10.77.0.2"), 9);
    assert_eq!(u16::from_ne_bytes([r[4], r[5]]), libc::RTM_NEWNEIGH);
    assert_eq!(u16::from_ne_bytes([r[6], r[7]]), (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE) as u16);
    assert_eq!(u32::from_ne_bytes([r[8], r[9], r[10], r[11]]), 7);
    assert_eq!(r[16], libc::AF_INET as u8);
    assert_eq!(i32::from_ne_bytes([r[20], r[21], r[22], r[23]]), 9);
    assert_eq!(u16::from_ne_bytes([r[24], r[25]]), 0, "no state written");
    assert_eq!(r[26], libc::NTF_USE);
    // NDA_DST (1), 4 bytes of address.
    assert_eq!(&r[28..36], &[8, 0, 1, 0, 10, 77, 0, 2]);
    assert_eq!(r.len(), 36);

    let d = netlink::dump_neighbours(8, 9);
    assert!(crate::kernel::is_dump(&d));
    assert_eq!(u16::from_ne_bytes([d[4], d[5]]), libc::RTM_GETNEIGH);
    // NDA_IFINDEX (8) = 9 after the 12-byte ndmsg.
    assert_eq!(&d[28..36], &[8, 0, 8, 0, 9, 0, 0, 0]);

    let g = netlink::get_route(9, ip("fd99::5"));
    assert!(!crate::kernel::is_dump(&g));
    assert_eq!(u16::from_ne_bytes([g[4], g[5]]), libc::RTM_GETROUTE);
    assert_eq!((g[16], g[17]), (libc::AF_INET6 as u8, 128), "family, destination length");
}

#[test]
fn broken_framing_is_an_error_and_odd_messages_are_skipped() {
    // A message claiming more bytes than there are.
    let mut truncated = neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)));
    truncated.truncate(truncated.len() - 4);
    assert!(netlink::split(&truncated).is_err());

    // A neighbour whose address attribute has 3 bytes: skipped and counted; the others stand.
    let mut odd = neigh("10.77.0.3", NudState::REACHABLE, Some(mac(3)));
    let at = odd.windows(4).position(|w| w == [8, 0, 1, 0]).expect("NDA_DST");
    odd[at] = 7;
    let stream = [neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2))), odd].concat();
    let mut entries = Vec::new();
    assert_eq!(netlink::decode_all(&stream, IFINDEX, &mut entries).expect("frames"), 1);
    assert_eq!(entries.len(), 1);
}

#[test]
fn a_dump_is_learned_and_the_templates_carry_the_macs() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().entries = unhex(&KERNEL_DUMP[..KERNEL_DUMP.len() - 40]);
    fake.k().routes.insert(ip("10.77.0.9"), unhex(KERNEL_ROUTE_ONLINK4));
    let nodes = vec![
        node("b", "10.77.0.2", "10.244.2.0/24"),
        node("b6", "fd77::2", "fd00:244:2::/64"),
        node("p", "10.77.0.7", "10.244.7.0/24"),
        node("dead", "10.77.0.9", "10.244.9.0/24"),
    ];
    let (mut tables, mut sync) = setup(&underlay(None, None), nodes, SyncConfig::default(), &fake, t0);
    assert_eq!(sync.ifindex(), IFINDEX);
    assert_eq!(sync.uplink(), UPLINK);

    let r = sync.sync(&mut tables, t0).expect("sync");
    assert!(r.dumped);
    let mut added = r.added.clone();
    added.sort_by_key(|(a, _)| *a);
    assert_eq!(added, vec![(ip("10.77.0.2"), mac(2)), (ip("10.77.0.7"), mac(7)), (ip("fd77::2"), mac(2))]);
    assert!(r.changed.is_empty() && r.issues.is_empty() && r.probe_failures.is_empty());
    // Three learns that change templates, one batch: the tables publish once per sync.
    assert_eq!(r.publications.len(), 1);
    assert_eq!(r.publications.last().map(|p| p.unresolved), Some(1), "only the FAILED node is left");
    assert_eq!(tables.current().generation(), r.publications.last().map_or(0, |p| p.generation));

    assert_eq!(template_mac(&tables, "10.244.2.9"), Ok(mac(2)));
    assert_eq!(template_mac(&tables, "fd00:244:2::9"), Ok(mac(2)));
    assert_eq!(template_mac(&tables, "10.244.7.9"), Ok(mac(7)), "a PERMANENT kernel entry is used");
    assert!(template_mac(&tables, "10.244.9.9").is_err_and(|e| e.contains("Unresolved")));
    // The FAILED on-link node is asked for again; the resolved ones are not.
    assert_eq!(r.probed, vec![ip("10.77.0.9")]);
    assert_eq!(fake.k().take_probes(), vec![ip("10.77.0.9")]);
    assert_eq!(fake.k().route_queries, vec![ip("10.77.0.9")], "routes asked only for unresolved nodes");

    // A second dump of the same entries confirms them: nothing to publish.
    let r = sync.sync(&mut tables, secs(t0, 1.0)).expect("sync");
    assert_eq!((r.confirmed, r.added.len(), r.publications.len()), (3, 0, 0));
}

#[test]
fn a_mac_change_reaches_the_templates() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)))]);
    let nodes = vec![node("b", "10.77.0.2", "10.244.2.0/24"), node("c", "10.77.0.2", "10.244.3.0/24")];
    let (mut tables, mut sync) = setup(&underlay(None, None), nodes, SyncConfig::default(), &fake, t0);
    sync.sync(&mut tables, t0).expect("sync");
    assert_eq!(template_mac(&tables, "10.244.2.1"), Ok(mac(2)));
    let before = tables.current().generation();

    // The node's NIC was replaced; the kernel learned the new MAC.
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(0x99)))]);
    let r = sync.sync(&mut tables, secs(t0, 1.0)).expect("sync");
    assert_eq!(r.changed, vec![MacChange { addr: ip("10.77.0.2"), old: mac(2), new: mac(0x99) }]);
    assert_eq!(r.publications.len(), 1, "one snapshot for the change");
    assert!(tables.current().generation() > before);
    assert_eq!(template_mac(&tables, "10.244.2.1"), Ok(mac(0x99)));
    assert_eq!(template_mac(&tables, "10.244.3.1"), Ok(mac(0x99)), "every node behind the neighbour");
    assert_eq!(tables.neighbours().mac(ip("10.77.0.2"), secs(t0, 1.0)), Some(mac(0x99)));
}

#[test]
fn stale_entries_are_learned_and_reverified_at_most_once_per_interval() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().set_entries(&[neigh("fd77::2", NudState::STALE, Some(mac(2)))]);
    let config = SyncConfig { dump_interval: Duration::from_millis(100), ..SyncConfig::default() };
    let (mut tables, mut sync) =
        setup(&underlay(None, None), vec![node("b", "fd77::2", "fd00::/64")], config, &fake, t0);

    let r = sync.sync(&mut tables, t0).expect("sync");
    assert_eq!(r.added, vec![(ip("fd77::2"), mac(2))], "a STALE MAC is still the kernel's MAC");
    assert_eq!(r.probed, vec![ip("fd77::2")], "and the kernel is made to re-verify it");
    for at in [0.2, 0.5, 0.9] {
        let r = sync.sync(&mut tables, secs(t0, at)).expect("sync");
        assert!(r.dumped && r.probed.is_empty(), "at {at} s: {r:?}");
    }
    assert_eq!(sync.sync(&mut tables, secs(t0, 1.0)).expect("sync").probed, vec![ip("fd77::2")]);
    assert!(fake.k().route_queries.is_empty(), "a node with an entry is on-link; no route asked");

    // The kernel re-verifies (DELAY, PROBE): nothing more to do; it stays learned meanwhile.
    for (state, at) in [(NudState::DELAY, 5.0), (NudState::PROBE, 5.2), (NudState::REACHABLE, 5.4)] {
        fake.k().set_entries(&[neigh("fd77::2", state, Some(mac(2)))]);
        let r = sync.sync(&mut tables, secs(t0, at)).expect("sync");
        assert_eq!((r.probed.len(), r.confirmed), (0, 1), "{state}");
    }
}

#[test]
fn missing_addresses_are_probed_with_backoff_and_routes_cached() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().routes.insert(ip("10.77.0.2"), unhex(KERNEL_ROUTE_ONLINK4));
    let (mut tables, mut sync) =
        setup(&underlay(None, None), vec![node("b", "10.77.0.2", "10.244.2.0/24")], SyncConfig::default(), &fake, t0);

    // Dumps every second; probes at 0, 1, 3, 7, 15, 31, then every 30 s.
    let mut probed_at = Vec::new();
    for s in 0..=50 {
        let r = sync.sync(&mut tables, secs(t0, f64::from(s))).expect("sync");
        assert!(r.dumped && r.added.is_empty());
        if !r.probed.is_empty() {
            probed_at.push(s);
        }
    }
    assert_eq!(probed_at, vec![0, 1, 3, 7, 15, 31]);
    assert_eq!(fake.k().take_probes().len(), 6);
    // Asked at 0 and again once the cached answer was 30 s old.
    assert_eq!(fake.k().route_queries.len(), 2);

    // INCOMPLETE: the kernel is at it already.
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::INCOMPLETE, None)]);
    assert!(sync.sync(&mut tables, secs(t0, 80.0)).expect("sync").probed.is_empty());
    // Resolved: learned, and the backoff starts over.
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)))]);
    let r = sync.sync(&mut tables, secs(t0, 81.0)).expect("sync");
    assert_eq!((r.added.len(), r.probed.len()), (1, 0));
    // The neighbour goes away (FAILED): probed again at once, then after 1 s.
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::FAILED, None)]);
    assert_eq!(sync.sync(&mut tables, secs(t0, 82.0)).expect("sync").probed.len(), 1);
    assert_eq!(sync.sync(&mut tables, secs(t0, 83.0)).expect("sync").probed.len(), 1);
    assert_eq!(sync.sync(&mut tables, secs(t0, 84.0)).expect("sync").probed.len(), 0);
}

#[test]
fn nodes_behind_routers_use_the_gateway_and_problems_are_reported_once() {
    let t0 = Instant::now();
    let fake = Fake::new();
    {
        let mut k = fake.k();
        k.routes.insert(ip("10.99.0.5"), unhex(KERNEL_ROUTE_VIA4));
        k.routes.insert(ip("10.98.0.7"), route("10.98.0.7", Some("10.77.0.3"), IFINDEX));
        k.routes.insert(ip("fd99::5"), unhex(KERNEL_ROUTE_VIA6));
        k.routes.insert(ip("10.97.0.1"), route("10.97.0.1", None, IFINDEX + 1));
        k.set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)))]);
    }
    let nodes = vec![
        node("c", "10.99.0.5", "10.244.3.0/24"),
        node("d", "10.98.0.7", "10.244.4.0/24"),
        node("e", "203.0.113.9", "10.244.5.0/24"),
        node("f", "fd99::5", "fd00:6::/64"),
        node("g", "10.97.0.1", "10.244.8.0/24"),
    ];
    let (mut tables, mut sync) = setup(&underlay(Some("10.77.0.2"), None), nodes, SyncConfig::default(), &fake, t0);
    let r = sync.sync(&mut tables, t0).expect("sync");
    assert_eq!(r.added, vec![(ip("10.77.0.2"), mac(2))], "the gateway");
    assert!(r.probed.is_empty(), "no node is on-link: {:?}", r.probed);
    assert_eq!(template_mac(&tables, "10.244.3.1"), Ok(mac(2)), "C through the gateway");

    let mut issues = r.issues.clone();
    issues.sort_by_key(|i| format!("{i:?}"));
    let expected = vec![
        PathIssue::NoGateway { node: ip("fd99::5"), via: ip("fd77::2") },
        PathIssue::NoRoute { node: ip("10.97.0.1"), reason: "the kernel routes it out of interface index 3".into() },
        PathIssue::NoRoute {
            node: ip("203.0.113.9"),
            reason: io::Error::from_raw_os_error(libc::ENETUNREACH).to_string(),
        },
        PathIssue::OtherGateway { node: ip("10.98.0.7"), via: ip("10.77.0.3"), configured: ip("10.77.0.2") },
    ];
    assert_eq!(issues, expected);
    let text = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    for needle in ["configure fd77::2 as the gateway", "add a route to it through the uplink", "make the two agree"] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }

    // Within route_ttl the answers are cached: not asked, not reported again.
    let asked = fake.k().route_queries.len();
    for s in 1..30 {
        let r = sync.sync(&mut tables, secs(t0, f64::from(s))).expect("sync");
        assert!(r.issues.is_empty() && r.probed.is_empty());
    }
    assert_eq!(fake.k().route_queries.len(), asked);
    assert_eq!(sync.sync(&mut tables, secs(t0, 30.0)).expect("sync").issues.len(), 4, "asked again");
}

#[test]
fn the_gateway_is_probed_only_for_a_family_with_nodes() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().routes.insert(ip("10.99.0.5"), unhex(KERNEL_ROUTE_VIA4));
    let (mut tables, mut sync) = setup(
        &underlay(Some("10.77.0.2"), Some("fd77::2")),
        vec![node("c", "10.99.0.5", "10.244.3.0/24")],
        SyncConfig::default(),
        &fake,
        t0,
    );
    let r = sync.sync(&mut tables, t0).expect("sync");
    assert_eq!(r.probed, vec![ip("10.77.0.2")], "the IPv4 gateway, not the IPv6 one, not the node");
    assert!(fake.k().routes.contains_key(&ip("10.99.0.5")));
    assert_eq!(fake.k().route_queries, vec![ip("10.99.0.5")]);

    // The configuration changes: no gateway any more, so nothing to probe; the node is reported.
    sync.set_underlay(&underlay(None, None));
    let r = sync.sync(&mut tables, secs(t0, 31.0)).expect("sync");
    assert!(r.probed.is_empty());
    assert_eq!(r.issues, vec![PathIssue::NoGateway { node: ip("10.99.0.5"), via: ip("10.77.0.2") }]);
}

#[test]
fn static_entries_are_left_alone() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::STALE, Some(mac(0x99)))]);
    let nodes = vec![node("b", "10.77.0.2", "10.244.2.0/24"), node("c", "10.77.0.3", "10.244.3.0/24")];
    let (mut tables, mut sync) = setup(&underlay(None, None), nodes, SyncConfig::default(), &fake, t0);
    tables.set_static_neighbour(ip("10.77.0.2"), mac(2), t0);
    tables.set_static_neighbour(ip("10.77.0.3"), mac(3), t0);
    let r = sync.sync(&mut tables, t0).expect("sync");
    assert!(r.added.is_empty() && r.changed.is_empty() && r.probed.is_empty() && r.publications.is_empty(), "{r:?}");
    assert_eq!(template_mac(&tables, "10.244.2.1"), Ok(mac(2)), "configuration wins over the kernel");
    assert!(fake.k().route_queries.is_empty());
}

#[test]
fn entries_the_kernel_keeps_are_refreshed_and_those_it_drops_age_out() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)))]);
    let (mut tables, mut sync) =
        setup(&underlay(None, None), vec![node("b", "10.77.0.2", "10.244.2.0/24")], SyncConfig::default(), &fake, t0);
    // Kept by the kernel for 40 s: refreshed by every dump, valid throughout.
    for s in 0..=40 {
        sync.sync(&mut tables, secs(t0, f64::from(s))).expect("sync");
    }
    assert_eq!(tables.next_neighbour_expiry(), Some(secs(t0, 70.0)));
    assert_eq!(sync.next_sync(&tables, secs(t0, 40.0)), secs(t0, 41.0), "the next dump comes first");

    // The kernel drops it (and cannot resolve it again): ferry's entry ages out 30 s after the last
    // confirmation, and the route falls back to Unresolved.
    fake.k().set_entries(&[]);
    fake.k().routes.insert(ip("10.77.0.2"), unhex(KERNEL_ROUTE_ONLINK4));
    for s in 41..70 {
        let r = sync.sync(&mut tables, secs(t0, f64::from(s))).expect("sync");
        assert!(r.publications.is_empty(), "still valid at {s} s");
    }
    assert_eq!(template_mac(&tables, "10.244.2.1"), Ok(mac(2)));
    let r = sync.sync(&mut tables, secs(t0, 70.0)).expect("sync");
    assert_eq!(r.publications.len(), 1, "expired and republished");
    assert!(template_mac(&tables, "10.244.2.1").is_err_and(|e| e.contains("Unresolved")));
    assert_eq!(tables.next_neighbour_expiry(), None);
}

#[test]
fn notifications_are_applied_between_dumps() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().set_entries(&[neigh("10.77.0.2", NudState::REACHABLE, Some(mac(2)))]);
    let (mut tables, mut sync) =
        setup(&underlay(None, None), vec![node("b", "10.77.0.2", "10.244.2.0/24")], SyncConfig::default(), &fake, t0);
    sync.sync(&mut tables, t0).expect("sync");
    assert!(sync.notification_fd().is_none(), "the fake has none");

    // 100 ms later the kernel announces a new MAC (and an entry on another interface, and one
    // it does not know the MAC of yet): applied without a dump.
    fake.k().notifications = [
        neigh_on(IFINDEX + 1, "10.77.0.2", NudState::REACHABLE, Some(mac(0x55))),
        neigh("10.77.0.2", NudState::INCOMPLETE, None),
        neigh("10.77.0.2", NudState::REACHABLE, Some(mac(0x99))),
    ]
    .concat();
    let r = sync.sync(&mut tables, secs(t0, 0.1)).expect("sync");
    assert!(!r.dumped);
    assert_eq!(r.notifications, 2, "the uplink's entries only");
    assert_eq!(r.changed, vec![MacChange { addr: ip("10.77.0.2"), old: mac(2), new: mac(0x99) }]);
    assert_eq!(template_mac(&tables, "10.244.2.1"), Ok(mac(0x99)));
    assert_eq!(fake.k().dumps, 1);

    // Notifications were lost: the next sync dumps at once, though no dump is due; the dump is
    // the newer word.
    fake.k().overflow = true;
    let r = sync.sync(&mut tables, secs(t0, 0.2)).expect("sync");
    assert!(r.dumped);
    assert_eq!(r.changed, vec![MacChange { addr: ip("10.77.0.2"), old: mac(0x99), new: mac(2) }]);
    assert_eq!(fake.k().dumps, 2);
}

#[test]
fn datagram_probes_go_through_the_socket() {
    let t0 = Instant::now();
    let fake = Fake::new();
    fake.k().routes.insert(ip("10.77.0.2"), unhex(KERNEL_ROUTE_ONLINK4));
    let config = SyncConfig { probe: ProbeMethod::Datagram, ..SyncConfig::default() };
    let (mut tables, mut sync) =
        setup(&underlay(None, None), vec![node("b", "10.77.0.2", "10.244.2.0/24")], config, &fake, t0);
    assert_eq!(sync.sync(&mut tables, t0).expect("sync").probed, vec![ip("10.77.0.2")]);
    let k = fake.k();
    assert_eq!((k.datagrams.clone(), k.uses.len()), (vec![ip("10.77.0.2")], 0));
}

#[test]
fn failures_name_the_interface_and_the_fix() {
    let t0 = Instant::now();
    let u = underlay(None, None);

    let fake = Fake::new();
    fake.k().ifindex = None;
    let e = NeighbourSync::with_sys(UPLINK, &u, SyncConfig::default(), Box::new(fake)).expect_err("no uplink");
    assert!(matches!(e, NeighbourError::NoInterface { .. }));
    assert!(e.to_string().starts_with("uplink eth0: no such interface") && e.to_string().contains("ip link"), "{e}");

    // A probe refused for lack of privilege stops the sync with the fix; another failure is
    // reported and retried.
    let fake = Fake::new();
    fake.k().routes.insert(ip("10.77.0.2"), unhex(KERNEL_ROUTE_ONLINK4));
    fake.k().probe_errno = Some(libc::EPERM);
    let (mut tables, mut sync) =
        setup(&u, vec![node("b", "10.77.0.2", "10.244.2.0/24")], SyncConfig::default(), &fake, t0);
    let e = sync.sync(&mut tables, t0).expect_err("denied");
    assert!(matches!(e, NeighbourError::ProbeDenied { .. }));
    assert!(e.to_string().contains("CAP_NET_ADMIN") && e.to_string().contains("10.77.0.2"), "{e}");
    fake.k().probe_errno = Some(libc::ENOBUFS);
    let r = sync.sync(&mut tables, secs(t0, 1.0)).expect("a failed probe is not fatal");
    assert_eq!(r.probe_failures.len(), 1);
    assert!(r.probed.is_empty());

    // A refused dump.
    fake.k().dump_errno = Some(libc::EINVAL);
    let e = sync.sync(&mut tables, secs(t0, 2.0)).expect_err("refused");
    assert!(e.to_string().starts_with("uplink eth0: dumping the neighbour entries failed"), "{e}");
    fake.k().dump_errno = None;

    // The uplink re-created under the same name, then gone.
    fake.k().ifindex = Some(IFINDEX + 10);
    let e = sync.sync(&mut tables, secs(t0, 3.0)).expect_err("replaced");
    assert!(e.to_string().contains("replaced by a new one (index 12)") && e.to_string().contains("restarted"), "{e}");
    fake.k().ifindex = None;
    let e = sync.sync(&mut tables, secs(t0, 4.0)).expect_err("gone");
    assert!(matches!(e, NeighbourError::InterfaceChanged { now: None, .. }), "{e}");
    assert!(e.to_string().contains("is gone"), "{e}");
}

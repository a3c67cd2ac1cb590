//! Helpers for the privileged AF_XDP tests (`xsk_*.rs`; test side): the root check (the shared
//! one, `ferry_testsupport`), network namespaces and veth pairs behind a guard that deletes them even when a test panics, entering a
//! namespace from the test thread, raw frames in and out through AF_PACKET, and frame builders.
//!
//! Everything a test creates is named with the process id and a per-process counter, so tests in
//! parallel threads and concurrent test processes never collide. All traffic stays inside the
//! test's own namespaces.

#![allow(dead_code, unreachable_pub, reason = "each test file uses a different subset")]

use std::fs::File;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

pub use ferry_testsupport::run;

/// Root present: true. Otherwise fail when `CI` is set (privileged tests must run there), or skip
/// (printed, and recorded for `scripts/test.sh`) and return false.
pub fn privileged(test: &str) -> bool {
    ferry_testsupport::privileged(test, "network namespaces, XDP, AF_XDP", &[])
}

/// Run a command inside namespace `ns` (`ip netns exec`).
pub fn run_in(ns: &str, cmd: &[&str]) -> String {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    run(&v)
}

/// A unique short tag for this process and call: `{pid}{n}` (link names stay under 15 bytes).
pub fn tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Network namespaces owned by a test; dropping deletes them and every link in them.
#[derive(Debug, Default)]
pub struct Netns {
    names: Vec<String>,
}

impl Netns {
    /// Create namespace `ferry-xsk-{name}` (with its loopback up) and return its full name.
    pub fn add(&mut self, name: &str) -> String {
        let full = format!("ferry-xsk-{name}");
        run(&["ip", "netns", "add", &full]);
        self.names.push(full.clone());
        run(&["ip", "-n", &full, "link", "set", "lo", "up"]);
        full
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).stdin(Stdio::null()).output();
        }
    }
}

/// One end of a veth pair: namespace, name, MAC.
#[derive(Debug, Clone)]
pub struct End {
    pub ns: String,
    pub name: String,
    pub mac: [u8; 6],
}

/// Create a veth pair `a` (in `ns_a`) <-> `b` (in `ns_b`) with `queues` queues each, fixed MACs
/// (last byte `mac_a` / `mac_b`), both up, IPv6 DAD off.
pub fn veth(ns_a: &str, a: &str, mac_a: u8, ns_b: &str, b: &str, mac_b: u8, queues: u32) -> (End, End) {
    let q = queues.to_string();
    let (ma, mb) = ([0x02, 0xfe, 0, 0, 0, mac_a], [0x02, 0xfe, 0, 0, 0, mac_b]);
    run(&[
        "ip",
        "-n",
        ns_a,
        "link",
        "add",
        a,
        "address",
        &mac_str(ma),
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "address",
        &mac_str(mb),
        "netns",
        ns_b,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ]);
    for (ns, dev) in [(ns_a, a), (ns_b, b)] {
        run(&["ip", "netns", "exec", ns, "sysctl", "-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    (End { ns: ns_a.to_owned(), name: a.to_owned(), mac: ma }, End { ns: ns_b.to_owned(), name: b.to_owned(), mac: mb })
}

/// Add an address (`10.0.0.1/24`, `fd00::1/64`) to `end`.
pub fn addr(end: &End, cidr: &str) {
    let mut cmd = vec!["ip", "-n", &end.ns, "addr", "add", cidr, "dev", &end.name];
    if cidr.contains(':') {
        cmd.push("nodad");
    }
    run(&cmd);
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Whether `ip link show` lists an XDP program on `end`.
pub fn has_xdp(end: &End) -> bool {
    run(&["ip", "-n", &end.ns, "link", "show", "dev", &end.name]).contains("xdp")
}

/// While alive, the current thread is in network namespace `ns`; dropping returns it to where it
/// was. Sockets and interface lookups made meanwhile belong to `ns`.
#[derive(Debug)]
pub struct InNetns {
    home: File,
}

impl InNetns {
    pub fn enter(ns: &str) -> InNetns {
        let home = File::open("/proc/thread-self/ns/net").expect("open own network namespace");
        let target = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
        setns(&target).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        InNetns { home }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home) {
            // The thread would stay in a namespace about to be deleted: later tests on it would fail
            // in confusing ways, so stop here.
            panic!("returning to the original network namespace failed: {e}");
        }
    }
}

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: `f` is an open namespace file; setns(2) changes only this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An AF_PACKET socket on one interface: raw frames out, every received frame in. Create it inside
/// the interface's namespace ([`InNetns`]).
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    pub fn bind(ifname: &str) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).expect("no NUL");
        // SAFETY: valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no interface {ifname} here");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
        let ret = unsafe {
            libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t)
        };
        assert!(ret == 0, "bind AF_PACKET to {ifname}: {}", io::Error::last_os_error());
        PacketSocket { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for its length; the socket is bound to one interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "AF_PACKET send: {}", io::Error::last_os_error());
    }

    /// Frames received (not sent) on the interface until `deadline`, for which `keep` is true, up
    /// to `max`.
    pub fn recv_until(&self, deadline: Instant, max: usize, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while out.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, left.as_millis().clamp(1, 1000) as i32) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if keep(frame) {
                out.push(frame.to_vec());
            }
        }
        out
    }
}

/// An Ethernet/IPv4/UDP frame.
pub fn udp4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("frame builds");
    v
}

/// An Ethernet/IPv6/UDP frame.
pub fn udp6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv6(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("frame builds");
    v
}

/// An ARP request from `sha`/`spa` for `tpa` (broadcast).
pub fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f
}

/// An ARP reply to a request (`request` as from [`arp_request`] or the kernel), answering with
/// `mac` for the address asked about.
pub fn arp_reply(request: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let (sha, spa, tpa) = (&request[22..28], &request[28..32], &request[38..42]);
    let mut f = sha.to_vec();
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(tpa);
    f.extend_from_slice(sha);
    f.extend_from_slice(spa);
    f
}

/// Whether `frame` is an ARP packet asking for (or answering about) `tpa`.
pub fn is_arp_for(frame: &[u8], tpa: Ipv4Addr) -> bool {
    frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[38..42] == tpa.octets()
}

/// The UDP destination port and payload of an Ethernet/IPv4-or-IPv6/UDP frame.
pub fn udp_of(frame: &[u8]) -> Option<(u16, Vec<u8>)> {
    let p = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    match p.transport? {
        etherparse::TransportSlice::Udp(u) => Some((u.destination_port(), u.payload().to_vec())),
        _ => None,
    }
}

/// A deadline `secs` from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Node A's addresses in [`pair`] topologies, and peer B's.
pub const A4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const B4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const A6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
pub const B6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

/// Two namespaces joined by one veth pair: `a` (10.77.0.1/24, fd77::1/64) in namespace A, `b`
/// (10.77.0.2/24, fd77::2/64) in namespace B. Dropping it deletes both namespaces.
#[derive(Debug)]
pub struct Pair {
    pub a: End,
    pub b: End,
    pub ns: Netns,
}

pub fn pair(queues: u32) -> Pair {
    let t = tag();
    let mut ns = Netns::default();
    let (na, nb) = (ns.add(&format!("{t}-a")), ns.add(&format!("{t}-b")));
    let (a, b) = veth(&na, &format!("fxa{t}"), 1, &nb, &format!("fxb{t}"), 2, queues);
    addr(&a, "10.77.0.1/24");
    addr(&a, "fd77::1/64");
    addr(&b, "10.77.0.2/24");
    addr(&b, "fd77::2/64");
    Pair { a, b, ns }
}

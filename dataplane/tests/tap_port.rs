//! Privileged tests of the tap port (test side): two network namespaces, each with a persistent
//! multi-queue tap as its only interface, joined by a forwarding loop over two `TapPort`s sharing
//! one `HeapMem` (a wire, no pipeline). A real TCP transfer between the namespaces must arrive
//! byte for byte, as super-packets read from one tap (segmented) and coalesced into the other,
//! with every frame accounted for at the end; then, as after an agent restart, the queues are
//! closed and attached again and an IPv6 transfer must arrive the same way. A third test puts two
//! pods wired as the CNI wires them (a /32, the default route via the gateway) on taps of a real
//! worker with its pipeline, and moves TCP between them.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything
//! runs in namespaces the tests create; guards delete the taps and the namespaces even when a test
//! panics. Every wait is bounded.

mod xsk_util;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, HeapMem, Pkt};
use ferry_dataplane::pipeline::Pipeline;
use ferry_dataplane::port::Port;
use ferry_dataplane::port::tap::{self, TapConfig, TapPort};
use ferry_dataplane::worker::Worker;
use ferry_encap::MacAddr;
use ferry_testsupport::node;
use xsk_util::*;

/// Taps created by a test, deleted (in their namespaces) when dropped.
struct Taps(Vec<(PathBuf, String)>);

impl Drop for Taps {
    fn drop(&mut self) {
        for (ns, name) in &self.0 {
            let _ = tap::delete(Some(ns), name);
        }
    }
}

fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{ns}"))
}

/// Create tap `name` in `ns` with `cidr`, MTU 1450 (a pod's), up; return one queue's port.
fn pod_tap(taps: &mut Taps, ns: &str, name: &str, mac: u8, cidr: &str) -> TapPort<HeapMem> {
    let path = ns_path(ns);
    tap::create_persistent(Some(&path), name, Some(MacAddr([0x02, 0xfa, 0, 0, 0, mac])), 1).expect("create tap");
    taps.0.push((path.clone(), name.to_owned()));
    let fd = tap::open_queue(Some(&path), name).expect("open queue");
    run(&["ip", "-n", ns, "addr", "add", cidr, "dev", name]);
    run(&["ip", "-n", ns, "link", "set", name, "mtu", "1450", "up"]);
    TapPort::new(fd, name, TapConfig::default())
}

/// Two ports, the memory they share and its free frames: what the wire runs on.
type Rig = (TapPort<HeapMem>, TapPort<HeapMem>, HeapMem, FreeFrames);

/// The wire: everything one port receives goes out of the other. Runs until `stop`, then hands
/// back the ports, the memory and the free frames.
fn wire(rig: Rig, stop: Arc<AtomicBool>) -> thread::JoinHandle<Rig> {
    thread::spawn(move || {
        let (mut a, mut b, mut mem, mut free) = rig;
        let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
        while !stop.load(Ordering::Relaxed) {
            let mut moved = 0;
            for dir in 0..2 {
                let (from, to) = if dir == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
                from.reclaim(&mut free);
                from.refill(&mut free);
                let n = from.recv(&mut mem, &mut batch);
                moved += n;
                to.send(&mut mem, &batch[..n]);
            }
            for p in [&mut a, &mut b] {
                p.flush().expect("flush");
            }
            if moved == 0 && !a.has_pending() && !b.has_pending() {
                let mut fds = [a.fd(), b.fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                // SAFETY: a live array of pollfd and its length.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 10) };
            }
        }
        for p in [&mut a, &mut b] {
            p.reclaim(&mut free);
        }
        (a, b, mem, free)
    })
}

/// Byte `i` of the stream: a pseudo-random pattern with a prime period, so a lost, repeated or
/// reordered segment never lines up with the expected bytes.
const PERIOD: usize = 1_000_003;

fn pattern() -> Vec<u8> {
    let mut x = 0x9e37_79b9u32;
    (0..PERIOD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Run `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        let _in = InNetns::enter(&ns);
        f()
    })
}

const DEADLINE: Duration = Duration::from_secs(60);

/// [`tcp`] through `rig`'s wire. Returns the rig (wire stopped) and how many bytes arrived intact.
fn transfer(rig: Rig, from: &str, into: &str, to: SocketAddr, total: usize, pat: &Arc<Vec<u8>>) -> (Rig, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let wire = wire(rig, Arc::clone(&stop));
    let started = Instant::now();
    let received = tcp(from, into, to, total, pat);
    stop.store(true, Ordering::Relaxed);
    let rig = wire.join().expect("wire thread");
    eprintln!(
        "{total} bytes to {to} in {:?}\nA: {:?}\nB: {:?}",
        started.elapsed(),
        rig.0.tap_stats(),
        rig.1.tap_stats()
    );
    (rig, received)
}

/// Send `total` bytes of the pattern over TCP from namespace `from` to a listener at `to` in
/// namespace `into` (something must forward between them); the receiver checks every byte in
/// order. Returns how many bytes arrived intact.
fn tcp(from: &str, into: &str, to: SocketAddr, total: usize, pat: &Arc<Vec<u8>>) -> usize {
    let listener = in_ns(into, move || TcpListener::bind(to)).join().expect("thread").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let check = Arc::clone(pat);
    let receiver = thread::spawn(move || -> io::Result<usize> {
        let deadline = Instant::now() + DEADLINE;
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut pos = 0usize;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(pos);
            }
            let mut got = &buf[..n];
            while !got.is_empty() {
                let at = pos % PERIOD;
                let k = got.len().min(PERIOD - at);
                if got[..k] != check[at..at + k] {
                    return Err(io::Error::other(format!("bytes {pos}..{} differ", pos + k)));
                }
                got = &got[k..];
                pos += k;
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("only {pos} bytes within {DEADLINE:?}")));
            }
        }
    });
    let send = Arc::clone(pat);
    let sender = in_ns(from, move || -> io::Result<()> {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        c.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut sent = 0;
        while sent < total {
            let at = sent % PERIOD;
            let n = (total - sent).min(PERIOD - at).min(256 * 1024);
            c.write_all(&send[at..at + n])?;
            sent += n;
        }
        c.shutdown(std::net::Shutdown::Write)
    });
    let sent = sender.join().expect("sender thread");
    let received = receiver.join().expect("receiver thread");
    sent.expect("send");
    received.expect("receive")
}

/// Every frame free or held by a port.
fn conserved(rig: &Rig) {
    let (a, b, mem, free) = rig;
    assert_eq!(free.len() + a.frames_held() + b.frames_held(), mem.frame_count() as usize, "frames conserved");
}

#[test]
fn tcp_between_two_namespaces_moves_super_packets_through_tap_ports_and_conserves_frames() {
    if !privileged("tcp_between_two_namespaces_moves_super_packets_through_tap_ports_and_conserves_frames") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let (na, nb) = (ns.add(&format!("{tg}-ta")), ns.add(&format!("{tg}-tb")));
    let mut taps = Taps(Vec::new());
    let a = pod_tap(&mut taps, &na, &format!("fta{tg}"), 1, "10.77.0.1/24");
    let b = pod_tap(&mut taps, &nb, &format!("ftb{tg}"), 2, "10.77.0.2/24");
    run(&["ip", "-n", &na, "addr", "add", "fd77::1/64", "dev", &format!("fta{tg}"), "nodad"]);
    run(&["ip", "-n", &nb, "addr", "add", "fd77::2/64", "dev", &format!("ftb{tg}"), "nodad"]);
    let mem = HeapMem::new(1024, 2048);
    let free = FreeFrames::all(mem.frame_count());
    let pat = Arc::new(pattern());

    let total = 64 << 20;
    let to = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 2), 5001));
    let (rig, received) = transfer((a, b, mem, free), &na, &nb, to, total, &pat);
    assert_eq!(received, total, "every byte, in order (IPv4)");
    let (sa, sb) = (rig.0.tap_stats(), rig.1.tap_stats());
    assert!(sa.gso_reads > 0, "the sender's tap handed over super-packets: {sa:?}");
    assert!(sb.gso_writes > 0, "segments were coalesced into the receiver's tap: {sb:?}");
    assert!(sb.gro.merged > sb.gro.super_packets, "runs of several segments: {sb:?}");
    conserved(&rig);

    // An agent restart: the queues close (the taps persist, with their addresses), and new ones
    // are attached in the pods' namespaces; traffic flows again, here over IPv6.
    let (a, b, mem, mut free) = rig;
    a.release(&mut free);
    b.release(&mut free);
    assert_eq!((free.len(), free.refused()), (mem.frame_count() as usize, 0), "every frame back, none twice");
    let reopen = |ns: &str, name: String| {
        let fd = tap::open_queue(Some(&ns_path(ns)), &name).expect("re-attach a queue");
        TapPort::new(fd, &name, TapConfig::default())
    };
    let (a, b) = (reopen(&na, format!("fta{tg}")), reopen(&nb, format!("ftb{tg}")));
    let total6 = 16 << 20;
    let to6 = SocketAddr::from((Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2), 5001));
    let (rig, received) = transfer((a, b, mem, free), &na, &nb, to6, total6, &pat);
    assert_eq!(received, total6, "every byte, in order (IPv6, re-attached queues)");
    let (sa6, sb6) = (rig.0.tap_stats(), rig.1.tap_stats());
    assert!(sa6.gso_reads > 0, "TSO6 super-packets read: {sa6:?}");
    assert!(sb6.gso_writes > 0, "IPv6 segments coalesced: {sb6:?}");
    assert_eq!((sa.rx_dropped(), sb.rx_dropped(), sa.tx_errors, sb.tx_errors), (0, 0, 0, 0));
    assert_eq!((sa6.rx_dropped(), sb6.rx_dropped(), sa6.tx_errors, sb6.tx_errors), (0, 0, 0, 0));
    conserved(&rig);
    let (a, b, mem, mut free) = rig;
    a.release(&mut free);
    b.release(&mut free);
    assert_eq!((free.len(), free.refused()), (mem.frame_count() as usize, 0), "every frame back, none twice");
}

#[test]
fn set_up_is_idempotent_refuses_missing_taps_and_deletes() {
    if !privileged("set_up_is_idempotent_refuses_missing_taps_and_deletes") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let n = ns.add(&format!("{tg}-tq"));
    let path = ns_path(&n);
    let name = format!("ftq{tg}");
    let mut taps = Taps(Vec::new());
    let err = tap::open_queue(Some(&path), &name).expect_err("no such tap yet");
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(!run(&["ip", "-n", &n, "link"]).contains(&name), "open_queue created nothing");
    let mac = MacAddr([0x02, 0xfa, 0, 0, 0, 9]);
    tap::create_persistent(Some(&path), &name, Some(mac), 2).expect("create");
    taps.0.push((path.clone(), name.clone()));
    tap::create_persistent(Some(&path), &name, Some(mac), 2).expect("create again");
    let q1 = tap::open_queue(Some(&path), &name).expect("queue 1");
    let q2 = tap::open_queue(Some(&path), &name).expect("queue 2");
    assert_ne!(q1.as_raw_fd(), q2.as_raw_fd());
    let link = run(&["ip", "-d", "-n", &n, "link", "show", &name]);
    assert!(link.contains("02:fa:00:00:00:09"), "MAC set: {link}");
    assert!(link.contains("tap") && link.contains("multi_queue") && link.contains("vnet_hdr"), "{link}");
    assert!(link.contains("persist"), "{link}");
    // Not in the caller's namespace: the name is looked up in the pod's only.
    assert!(!run(&["ip", "link"]).contains(&name));
    let features = run(&["ip", "netns", "exec", &n, "ethtool", "-k", &name]);
    assert!(features.contains("tcp-segmentation-offload: on"), "TSO on: {features}");
    drop((q1, q2));
    // Persistent: the tap outlives its queues.
    assert!(run(&["ip", "-n", &n, "link"]).contains(&name));
    tap::delete(Some(&path), &name).expect("delete");
    assert!(!run(&["ip", "-n", &n, "link"]).contains(&name));
    tap::delete(Some(&path), &name).expect("deleting again is not an error");
    let bad = tap::create_persistent(Some(&path), "x", None, 0).expect_err("0 queues");
    assert_eq!(bad.kind(), io::ErrorKind::InvalidInput);
    let bad = tap::open_queue(Some(&path), "sixteen-bytes-xx").expect_err("name too long");
    assert_eq!(bad.kind(), io::ErrorKind::InvalidInput);
}

/// A pod as the CNI wires one: tap `name` in `ns` with the fixture's MAC for port `port` of node 1,
/// its address as /32, an on-link route to the gateway and the default route via it.
fn wired_pod(taps: &mut Taps, ns: &str, name: &str, port: u8) -> TapPort<HeapMem> {
    let path = ns_path(ns);
    tap::create_persistent(Some(&path), name, Some(node::pod_mac(1, port)), 1).expect("create tap");
    taps.0.push((path.clone(), name.to_owned()));
    let fd = tap::open_queue(Some(&path), name).expect("open queue");
    let gw = node::gateway_ip(1).to_string();
    run(&["ip", "-n", ns, "addr", "add", &format!("{}/32", node::pod_ip(1, port)), "dev", name]);
    run(&["ip", "-n", ns, "link", "set", name, "mtu", "1450", "up"]);
    run(&["ip", "-n", ns, "route", "add", &gw, "dev", name]);
    run(&["ip", "-n", ns, "route", "add", "default", "via", &gw]);
    TapPort::new(fd, name, TapConfig::default())
}

#[test]
fn tcp_between_two_pods_on_taps_through_a_real_worker() {
    if !privileged("tcp_between_two_pods_on_taps_through_a_real_worker") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let (nu, n1, n2) = (ns.add(&format!("{tg}-wu")), ns.add(&format!("{tg}-w1")), ns.add(&format!("{tg}-w2")));
    let mut taps = Taps(Vec::new());
    // Node 1 of the fixture with two pods on ports 1 and 2; its uplink (port 0) is a tap that is
    // never up: this traffic stays on the node.
    let fixture = node::TestNode { pods: 2, frames: 1024, ..node::TestNode::new(1) };
    let uplink = {
        let path = ns_path(&nu);
        tap::create_persistent(Some(&path), &format!("fwu{tg}"), None, 1).expect("create uplink tap");
        taps.0.push((path.clone(), format!("fwu{tg}")));
        TapPort::new(tap::open_queue(Some(&path), &format!("fwu{tg}")).expect("queue"), "uplink", TapConfig::default())
    };
    let ports = vec![
        uplink,
        wired_pod(&mut taps, &n1, &format!("fw1{tg}"), 1),
        wired_pod(&mut taps, &n2, &format!("fw2{tg}"), 2),
    ];
    let frames = fixture.frames;
    let mut worker = Worker::new(
        ports,
        fixture.roles(),
        HeapMem::new(frames, 2048),
        FreeFrames::all(frames),
        Pipeline::new(fixture.config()),
    );
    let fib = fixture.tables().current();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let running = thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            if worker.poll_once(&*fib) == 0 {
                let mut fds: Vec<_> = worker
                    .ports()
                    .iter()
                    .filter_map(|p| p.poll_fd())
                    .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                    .collect();
                // SAFETY: a live array of pollfd and its length.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
            }
        }
        worker
    });
    let pat = Arc::new(pattern());
    let total = 32 << 20;
    let to = SocketAddr::from((node::pod_ip(1, 2), 5001));
    let received = tcp(&n1, &n2, to, total, &pat);
    stop.store(true, Ordering::Relaxed);
    let worker = running.join().expect("worker thread");
    let c = worker.counters();
    let (s1, s2) = (worker.ports()[1].tap_stats(), worker.ports()[2].tap_stats());
    let drops: Vec<_> =
        ferry_encap::DropReason::ALL.iter().filter(|r| c.drops(**r) > 0).map(|r| (r.name(), c.drops(*r))).collect();
    eprintln!("pod 1: {s1:?}\npod 2: {s2:?}\nrx {:?} tx {:?} drops {drops:?}", c.rx, c.tx);
    assert_eq!(received, total, "every byte, in order, through the pipeline");
    assert!(s1.gso_reads > 0, "pod 1's TSO super-packets were read and cut: {s1:?}");
    assert!(s2.gso_writes > 0, "and coalesced again into pod 2's tap: {s2:?}");
    assert!(c.rx[1].packets > s1.reads, "the worker forwarded segments, not super-packets");
    assert_eq!(c.drops(ferry_encap::DropReason::TxRingFull), 0);
    assert_eq!((s1.rx_dropped(), s2.rx_dropped(), s1.tx_errors, s2.tx_errors), (0, 0, 0, 0));
    assert_eq!(worker.frames_accounted(), frames as usize, "every frame free or held by a port");
    assert_eq!(c.double_frees, 0);
}

//! What ferry's tap port moves: TCP between two namespaces joined only by two `TapPort`s and a
//! plain forwarding loop (no pipeline, no encapsulation). A measurement for `docs/throughput.md`
//! (needs root and `iperf3`).
//!
//! Two namespaces this program creates (and removes), each with a persistent multi-queue tap as its
//! only interface (MTU 1450, a pod's), opened with virtio-net headers and TSO. One thread runs the
//! loop a worker would: reclaim, refill, `recv` from one port (super-packets cut into frames with
//! completed checksums), `send` to the other (coalesced again into super-packets), `flush`; it
//! sleeps in `poll` on both taps when idle. `iperf3 -c` runs in A against `iperf3 -s` in B; the
//! program prints iperf3's summary and what the ports counted (reads, super-packets, bytes per
//! read, coalescing), so the figures can be put beside the kernel-only ones in
//! `shared/notes/tun-offloads.md`.
//!
//! `--raw` replaces the ports by the reference the note measured from Python: each frame read from
//! one tap, virtio-net header and all, is written unchanged to the other (no segmentation, no
//! coalescing, no frames), in the same loop, for a same-run ceiling.
//!
//! `--worker` puts the two taps on a real worker instead, as two pods of one node (the test
//! fixture's node 1: pipeline, tables, the pods wired as the CNI wires them, a /32 and the default
//! route via the gateway), in the agent's adaptive poll loop: same-node pod-to-pod TCP through
//! ferry, every segment through the pipeline.
//!
//! Run (defaults 5 seconds, 1 stream, unpinned, ports):
//! `sudo cargo run --release -p ferry-dataplane --example tap_wire -- [SECONDS] [STREAMS] [--pin CORE] [--raw | --worker]`

#[path = "../tests/xsk_util/mod.rs"]
mod xsk_util;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, HeapMem, Pkt};
use ferry_dataplane::pipeline::Pipeline;
use ferry_dataplane::port::Port;
use ferry_dataplane::port::tap::{self, TapConfig, TapPort, TapStats};
use ferry_dataplane::worker::Worker;
use ferry_encap::MacAddr;
use ferry_testsupport::node;
use xsk_util::{Netns, privileged, run, tag};

struct Taps(Vec<(PathBuf, String)>);

impl Drop for Taps {
    fn drop(&mut self) {
        for (ns, name) in &self.0 {
            if let Err(e) = tap::delete(Some(ns), name) {
                eprintln!("delete tap {name}: {e}");
            }
        }
    }
}

/// The iperf3 server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tap `name` in `ns`, MTU 1450 (a pod's), up; with `pod_ip`, wired as the CNI wires a pod: the
/// address as /32, an on-link route to the fixture's gateway, the default route via it.
fn pod_tap(taps: &mut Taps, ns: &str, name: &str, mac: Option<MacAddr>, pod_ip: Option<Ipv4Addr>) -> OwnedFd {
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    tap::create_persistent(Some(&path), name, mac, 1).expect("create tap");
    taps.0.push((path.clone(), name.to_owned()));
    let fd = tap::open_queue(Some(&path), name).expect("open queue");
    run(&["ip", "-n", ns, "link", "set", name, "mtu", "1450", "up"]);
    if let Some(ip) = pod_ip {
        let gw = node::gateway_ip(1).to_string();
        run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/32"), "dev", name]);
        run(&["ip", "-n", ns, "route", "add", &gw, "dev", name]);
        run(&["ip", "-n", ns, "route", "add", "default", "via", &gw]);
    }
    fd
}

/// The fixture's node 1 with the uplink and two pods on these taps, run as the agent runs a
/// worker (spin 200 us after the last packet, yielding, then sleep in `poll`).
fn on_a_worker(
    fds: [OwnedFd; 3],
    stop: Arc<AtomicBool>,
    pin: Option<usize>,
) -> thread::JoinHandle<(TapStats, TapStats, Loops, bool, u64)> {
    thread::spawn(move || {
        if let Some(core) = pin {
            assert!(core_affinity::set_for_current(core_affinity::CoreId { id: core }), "cannot pin to core {core}");
        }
        let fixture = node::TestNode { pods: 2, frames: 4096, ..node::TestNode::new(1) };
        let ports: Vec<_> = fds.into_iter().map(|fd| TapPort::new(fd, "pod", TapConfig::default())).collect();
        let mut w = Worker::new(
            ports,
            fixture.roles(),
            HeapMem::new(fixture.frames, 2048),
            FreeFrames::all(fixture.frames),
            Pipeline::new(fixture.config()),
        );
        let fib = fixture.tables().current();
        let mut loops = Loops::default();
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            loops.iterations += 1;
            if w.poll_once(&*fib) > 0 {
                last = Instant::now();
            } else if last.elapsed() > Duration::from_micros(200) {
                loops.sleeps += 1;
                let mut fds: Vec<_> = w
                    .ports()
                    .iter()
                    .filter_map(|p| p.poll_fd())
                    .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                    .collect();
                // SAFETY: a live array of pollfd and its length.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
            } else {
                thread::yield_now();
            }
        }
        loops.cpu = thread_cpu();
        let conserved = w.frames_accounted() == fixture.frames as usize;
        let drops = w.counters().total_drops();
        (w.ports()[1].tap_stats(), w.ports()[2].tap_stats(), loops, conserved, drops)
    })
}

/// The reference: copy every read from one tap to the other, unchanged.
fn raw_wire(
    a: OwnedFd,
    b: OwnedFd,
    stop: Arc<AtomicBool>,
    pin: Option<usize>,
) -> thread::JoinHandle<(u64, u64, Loops)> {
    thread::spawn(move || {
        if let Some(core) = pin {
            assert!(core_affinity::set_for_current(core_affinity::CoreId { id: core }), "cannot pin to core {core}");
        }
        let mut buf = vec![0u8; 128 * 1024];
        let (mut frames, mut bytes, mut loops) = (0u64, 0u64, Loops::default());
        while !stop.load(Ordering::Relaxed) {
            loops.iterations += 1;
            let mut moved = 0;
            for (from, to) in [(a.as_raw_fd(), b.as_raw_fd()), (b.as_raw_fd(), a.as_raw_fd())] {
                for _ in 0..64 {
                    // SAFETY: reads into a live buffer of that length.
                    let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 {
                        break;
                    }
                    // SAFETY: writes `n` bytes of the live buffer.
                    unsafe { libc::write(to, buf.as_ptr().cast(), n as usize) };
                    moved += 1;
                    frames += 1;
                    bytes += n as u64;
                }
            }
            if moved == 0 {
                loops.sleeps += 1;
                let mut fds =
                    [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                // SAFETY: a live array of pollfd and its length.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
            }
        }
        loops.cpu = thread_cpu();
        (frames, bytes, loops)
    })
}

/// Loop counts: iterations, and how many found nothing and slept.
#[derive(Debug, Default, Clone, Copy)]
struct Loops {
    iterations: u64,
    sleeps: u64,
    /// The loop thread's CPU time.
    cpu: Duration,
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn wire(
    mut a: TapPort<HeapMem>,
    mut b: TapPort<HeapMem>,
    stop: Arc<AtomicBool>,
    pin: Option<usize>,
) -> thread::JoinHandle<(TapStats, TapStats, Loops, bool)> {
    thread::spawn(move || {
        if let Some(core) = pin {
            let ok = core_affinity::set_for_current(core_affinity::CoreId { id: core });
            assert!(ok, "cannot pin to core {core}");
        }
        // A worker's memory: the AF_XDP default (4096 frames of 2048 bytes).
        let mut mem = HeapMem::new(4096, 2048);
        let mut free = FreeFrames::all(mem.frame_count());
        let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
        let mut loops = Loops::default();
        while !stop.load(Ordering::Relaxed) {
            loops.iterations += 1;
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
                let _ = p.flush();
            }
            if moved == 0 && !a.has_pending() && !b.has_pending() {
                loops.sleeps += 1;
                let mut fds = [a.fd(), b.fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                // SAFETY: a live array of pollfd and its length.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
            }
        }
        loops.cpu = thread_cpu();
        for p in [&mut a, &mut b] {
            p.reclaim(&mut free);
        }
        let (sa, sb) = (a.tap_stats(), b.tap_stats());
        let count = mem.frame_count() as usize;
        a.release(&mut free);
        b.release(&mut free);
        (sa, sb, loops, free.len() == count && free.refused() == 0)
    })
}

fn show(name: &str, s: &TapStats) {
    let per_read = s.read_bytes.checked_div(s.reads).unwrap_or(0);
    let per_write = s.write_bytes.checked_div(s.writes).unwrap_or(0);
    println!(
        "  {name}: read {} frames ({} super-packets, {per_read} B per read) -> {} packets; \
         wrote {} frames ({} super-packets, {per_write} B per write); drops rx {} tx {} errors {}; \
         gro {} in, {} merged, {} evicted",
        s.reads,
        s.gso_reads,
        s.rx_packets,
        s.writes,
        s.gso_writes,
        s.rx_dropped(),
        s.tx_dropped,
        s.tx_errors,
        s.gro.frames_in,
        s.gro.merged,
        s.gro.evicted,
    );
}

fn main() {
    if !privileged("tap_wire") {
        return;
    }
    let mut args = std::env::args().skip(1);
    let mut secs = 5u32;
    let mut streams = 1u32;
    let mut pin = None;
    let mut raw = false;
    let mut on_worker = false;
    let mut pos = 0;
    while let Some(a) = args.next() {
        if a == "--raw" {
            raw = true;
        } else if a == "--worker" {
            on_worker = true;
        } else if a == "--pin" {
            pin = Some(args.next().and_then(|c| c.parse().ok()).expect("--pin CORE"));
        } else {
            let v = a.parse().expect("SECONDS and STREAMS are numbers");
            if pos == 0 {
                secs = v
            } else {
                streams = v
            }
            pos += 1;
        }
    }
    let tg = tag();
    let mut ns = Netns::default();
    let (na, nb) = (ns.add(&format!("{tg}-wa")), ns.add(&format!("{tg}-wb")));
    let mut taps = Taps(Vec::new());
    let stop = Arc::new(AtomicBool::new(false));
    let (mut ports, mut reference, mut worker) = (None, None, None);
    let server_ip;
    if on_worker {
        let nu = ns.add(&format!("{tg}-wu"));
        let uplink = pod_tap(&mut taps, &nu, &format!("fwu{tg}"), None, None);
        let a = pod_tap(&mut taps, &na, &format!("fwa{tg}"), Some(node::pod_mac(1, 1)), Some(node::pod_ip(1, 1)));
        let b = pod_tap(&mut taps, &nb, &format!("fwb{tg}"), Some(node::pod_mac(1, 2)), Some(node::pod_ip(1, 2)));
        server_ip = node::pod_ip(1, 2).to_string();
        worker = Some(on_a_worker([uplink, a, b], Arc::clone(&stop), pin));
    } else {
        let a = pod_tap(&mut taps, &na, &format!("fwa{tg}"), Some(MacAddr([2, 0xfa, 0, 0, 0, 1])), None);
        let b = pod_tap(&mut taps, &nb, &format!("fwb{tg}"), Some(MacAddr([2, 0xfa, 0, 0, 0, 2])), None);
        run(&["ip", "-n", &na, "addr", "add", "10.78.0.1/24", "dev", &format!("fwa{tg}")]);
        run(&["ip", "-n", &nb, "addr", "add", "10.78.0.2/24", "dev", &format!("fwb{tg}")]);
        server_ip = "10.78.0.2".to_owned();
        if raw {
            reference = Some(raw_wire(a, b, Arc::clone(&stop), pin));
        } else {
            let (a, b) = (TapPort::new(a, "a", TapConfig::default()), TapPort::new(b, "b", TapConfig::default()));
            ports = Some(wire(a, b, Arc::clone(&stop), pin));
        }
    }

    let server = Server(
        Command::new("ip")
            .args(["netns", "exec", &nb, "iperf3", "-s", "-1", "-B", &server_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s"),
    );
    // The server is up when the client connects: retry for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &na, "iperf3", "-c", &server_ip, "-t", &secs.to_string()])
            .args(["-P", &streams.to_string()])
            .output()
            .expect("run iperf3 -c");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() || Instant::now() > deadline {
            break text + &String::from_utf8_lossy(&out.stderr);
        }
        thread::sleep(Duration::from_millis(100));
    };
    drop(server);
    stop.store(true, Ordering::Relaxed);
    let how = match (raw, on_worker) {
        (true, _) => "a raw copy loop (reference)",
        (_, true) => "two pods' tap ports on a worker (pipeline)",
        _ => "two tap ports",
    };
    println!("iperf3 -c -t {secs} -P {streams}, TCP A -> B through {how}:");
    for line in out.lines().filter(|l| l.contains("sender") || l.contains("receiver") || l.contains("error")) {
        println!("  {line}");
    }
    if let Some(r) = reference {
        let (frames, bytes, loops) = r.join().expect("wire thread");
        println!(
            "  copied {frames} frames, {} B per read; loop: {} iterations, {} slept, {:.2} s CPU, {:.2} s CPU per GB",
            bytes / frames.max(1),
            loops.iterations,
            loops.sleeps,
            loops.cpu.as_secs_f64(),
            loops.cpu.as_secs_f64() / (bytes as f64 / 1e9),
        );
        return;
    }
    if let Some(w) = worker {
        let (sa, sb, loops, conserved, drops) = w.join().expect("worker thread");
        show("A (sender's tap)", &sa);
        show("B (receiver's tap)", &sb);
        let moved = (sa.read_bytes + sb.read_bytes) as f64;
        println!(
            "  worker: {} iterations, {} slept, {:.2} s CPU, {:.2} s CPU per GB; pipeline drops {drops}; \
             frames conserved: {conserved}",
            loops.iterations,
            loops.sleeps,
            loops.cpu.as_secs_f64(),
            loops.cpu.as_secs_f64() / (moved / 1e9),
        );
        return;
    }
    let Some(ports) = ports else { return };
    let (sa, sb, loops, conserved) = ports.join().expect("wire thread");
    show("A (sender's tap)", &sa);
    show("B (receiver's tap)", &sb);
    let moved = (sa.read_bytes + sb.read_bytes) as f64;
    println!(
        "  loop: {} iterations, {} slept, {:.2} s CPU, {:.2} s CPU per GB; frames conserved: {conserved}",
        loops.iterations,
        loops.sleeps,
        loops.cpu.as_secs_f64(),
        loops.cpu.as_secs_f64() / (moved / 1e9),
    );
}

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
//! Run: `sudo cargo run --release -p ferry-dataplane --example tap_wire -- [SECONDS] [STREAMS] [--pin CORE] [--raw]`
//! (defaults 5 seconds, 1 stream, unpinned, ports).

#[path = "../tests/xsk_util/mod.rs"]
mod xsk_util;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, HeapMem, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::tap::{self, TapConfig, TapPort, TapStats};
use ferry_encap::MacAddr;
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

fn pod_tap(taps: &mut Taps, ns: &str, name: &str, mac: u8, cidr: &str) -> OwnedFd {
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    tap::create_persistent(Some(&path), name, Some(MacAddr([0x02, 0xfa, 0, 0, 0, mac])), 1).expect("create tap");
    taps.0.push((path.clone(), name.to_owned()));
    let fd = tap::open_queue(Some(&path), name).expect("open queue");
    run(&["ip", "-n", ns, "addr", "add", cidr, "dev", name]);
    run(&["ip", "-n", ns, "link", "set", name, "mtu", "1450", "up"]);
    fd
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
    let mut pos = 0;
    while let Some(a) = args.next() {
        if a == "--raw" {
            raw = true;
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
    let a = pod_tap(&mut taps, &na, &format!("fwa{tg}"), 1, "10.78.0.1/24");
    let b = pod_tap(&mut taps, &nb, &format!("fwb{tg}"), 2, "10.78.0.2/24");
    let stop = Arc::new(AtomicBool::new(false));
    let (mut ports, mut reference) = (None, None);
    if raw {
        reference = Some(raw_wire(a, b, Arc::clone(&stop), pin));
    } else {
        let (a, b) = (TapPort::new(a, "a", TapConfig::default()), TapPort::new(b, "b", TapConfig::default()));
        ports = Some(wire(a, b, Arc::clone(&stop), pin));
    }

    let server = Server(
        Command::new("ip")
            .args(["netns", "exec", &nb, "iperf3", "-s", "-1", "-B", "10.78.0.2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s"),
    );
    // The server is up when the client connects: retry for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &na, "iperf3", "-c", "10.78.0.2", "-t", &secs.to_string()])
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
    let how = if raw { "a raw copy loop (reference)" } else { "two tap ports" };
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

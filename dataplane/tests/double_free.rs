//! A port that hands a frame back twice does not make two owners of it: the worker's free list
//! refuses the second free, in every build, and the worker counts it where `ferry stats` and the
//! metrics read it (`double_frees`).

use std::io;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FreeFrames, HeapMem, Pkt};
use ferry_dataplane::pipeline::Pipeline;
use ferry_dataplane::port::Port;
use ferry_dataplane::port::mem::{MemPort, MemPortConfig};
use ferry_dataplane::worker::Worker;
use ferry_tables::Snapshot;
use ferry_testsupport::node::{TestNode, gateway_ip, pod_ip, pod_mac};

const FRAMES: u32 = 64;

/// An in-memory port with a bug: after reclaiming completed frames, it frees one of them again.
#[derive(Debug)]
struct FreesTwice(MemPort);

impl Port for FreesTwice {
    type Mem = HeapMem;

    fn name(&self) -> &str {
        self.0.name()
    }

    fn recv(&mut self, mem: &mut HeapMem, out: &mut [Pkt]) -> usize {
        self.0.recv(mem, out)
    }

    fn send(&mut self, mem: &mut HeapMem, pkts: &[Pkt]) -> usize {
        self.0.send(mem, pkts)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        let n = self.0.reclaim(free);
        if n > 0
            && let Some(f) = free.pop()
        {
            free.push(f);
            free.push(f);
        }
        n
    }

    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        self.0.refill(free)
    }

    fn frames_held(&self) -> usize {
        self.0.frames_held()
    }

    fn release(self, free: &mut FreeFrames) {
        self.0.release(free);
    }
}

/// A pod asking for its gateway's MAC: the worker answers on the same port.
fn arp_for_gateway() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&pod_mac(1, 1).0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&pod_mac(1, 1).0);
    f.extend_from_slice(&pod_ip(1, 1).octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&gateway_ip(1).octets());
    f
}

#[test]
fn a_frame_freed_twice_is_refused_and_counted() {
    // Node 1 of the shared fixture, on ports with the bug.
    let spec = TestNode::new(1);
    let ring = MemPortConfig { rx_ring: 8, tx_ring: 8, rx_offset: 0 };
    let ports = vec![FreesTwice(MemPort::new("uplink", ring)), FreesTwice(MemPort::new("pod", ring))];
    let mut w = Worker::new(
        ports,
        spec.roles(),
        HeapMem::new(FRAMES, 2048),
        FreeFrames::all(FRAMES),
        Pipeline::new(spec.config()),
    );
    let fib = Snapshot::empty();
    let shared = w.shared_counters();

    // The reply is sent, completed, and reclaimed by the next iteration, which frees it twice.
    w.poll_once(&fib);
    let (mem, ports) = w.mem_and_ports();
    assert!(ports[1].0.inject(mem, &arp_for_gateway()), "the pod port took the request");
    w.poll_once(&fib);
    let (mem, ports) = w.mem_and_ports();
    assert_eq!(ports[1].0.take_sent(mem, usize::MAX, |_| {}), 1, "the gateway answered");
    w.poll_once(&fib);

    assert_eq!(w.counters().double_frees, 1, "the second free was refused and counted");
    assert_eq!(w.frames_accounted(), FRAMES as usize, "no frame is in two places");
    // What `ferry stats` reads: the published counters, within a few publication intervals.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.read().double_frees != 1 {
        assert!(Instant::now() < deadline, "the double free was not published within 5 s");
        w.poll_once(&fib);
        std::thread::yield_now();
    }
}

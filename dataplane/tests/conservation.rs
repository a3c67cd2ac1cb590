//! Frames are conserved: after millions of packets through two wired nodes, with forwarding,
//! replies, drops of every kind the traffic can cause, full receive rings and full transmit rings,
//! every frame of each worker is back on its free list or held by a port. Nothing leaks, nothing is
//! freed twice (the free list refuses and counts that, in every build).

use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use ferry_dataplane::counters::Counters;
use ferry_dataplane::pipeline::{PortId, PortRole};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::mem::{MemPort, MemPortConfig, wire};
use ferry_dataplane::port::xsk::RX_HEADROOM;
use ferry_dataplane::worker::{self, PollMode, Worker};
use ferry_tables::{Publisher, Snapshot};
use ferry_testsupport::node::{TestNode, gateway_mac, pod_mac};

/// Few frames, small rings: the worker runs short of frames and ring space all the time.
const FRAMES: u32 = 96;
const PACKETS: u64 = 2_000_000;

/// Node `n` (1 or 2) of `ferry_testsupport::node`: one pod on port 1, the other node behind the
/// uplink, few frames and small rings. Node 1 receives where AF_XDP does, with headroom; node 2 at
/// offset 0, so its encapsulation takes the fallback that moves each packet.
fn node(n: u8) -> (Worker<MemPort>, Arc<Snapshot>) {
    let rx_offset = if n == 1 { RX_HEADROOM } else { 0 };
    TestNode {
        frames: FRAMES,
        ring: MemPortConfig { rx_ring: 32, tx_ring: 16, rx_offset },
        icmp_rate: (1_000_000, 64),
        ..TestNode::new(n)
    }
    .build()
}

/// A mix of what pods send: good traffic across, good traffic to itself, spoofed, unroutable,
/// TTL 1 (ICMP reply), ARP for the gateway (reply), and junk.
fn traffic(n: u8) -> Vec<Vec<u8>> {
    let udp = |src: [u8; 4], dst: [u8; 4], ttl: u8, len: usize| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(pod_mac(n, 1).0, gateway_mac(n).0)
            .ipv4(src, dst, ttl)
            .udp(1000, 2000)
            .write(&mut out, &vec![7u8; len])
            .expect("build");
        out
    };
    let me = [10, 244, n, 2];
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&pod_mac(n, 1).0);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&pod_mac(n, 1).0);
    arp.extend_from_slice(&me);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 244, n, 1]);
    vec![
        udp(me, [10, 244, 3 - n, 2], 64, 18),
        udp(me, [10, 244, 3 - n, 2], 64, 1400),
        udp(me, me, 64, 100),
        udp([10, 244, n, 99], [10, 244, 3 - n, 2], 64, 18),
        udp(me, [8, 8, 8, 8], 64, 18),
        udp(me, [10, 244, 3 - n, 2], 1, 18),
        udp(me, [10, 244, 3 - n, 2], 64, 1470),
        arp,
        vec![0u8; 9],
    ]
}

#[test]
fn no_frame_leaks_after_millions_of_packets() {
    let (mut a, fa) = node(1);
    let (mut b, fb) = node(2);
    let (ta, tb) = (traffic(1), traffic(2));
    let mut injected = 0u64;
    let mut i = 0usize;
    let started = std::time::Instant::now();
    // Bounded in count and in time.
    while injected < PACKETS && started.elapsed() < std::time::Duration::from_secs(120) {
        for (w, t) in [(&mut a, &ta), (&mut b, &tb)] {
            let (mem, ports) = w.mem_and_ports();
            for k in 0..24 {
                if ports[1].inject(mem, &t[(i + k) % t.len()]) {
                    injected += 1;
                }
            }
        }
        i += 1;
        a.poll_once(&*fa);
        b.poll_once(&*fb);
        // The pods consume what reaches them (and the replies to themselves).
        for w in [&mut a, &mut b] {
            let (mem, ports) = w.mem_and_ports();
            ports[1].take_sent(mem, usize::MAX, |_| {});
        }
        // The underlay carries at most 20 packets each way per round: the rest wait in tx rings.
        {
            let (amem, aports) = a.mem_and_ports();
            let (bmem, bports) = b.mem_and_ports();
            wire(&mut aports[0], amem, &mut bports[0], bmem, 20);
            wire(&mut bports[0], bmem, &mut aports[0], amem, 20);
        }
    }
    assert!(injected >= PACKETS, "only {injected} packets in the time bound");
    // Drain: keep polling and consuming until nothing moves.
    for _ in 0..100 {
        a.poll_once(&*fa);
        b.poll_once(&*fb);
        for w in [&mut a, &mut b] {
            let (mem, ports) = w.mem_and_ports();
            for p in ports.iter_mut() {
                p.take_sent(mem, usize::MAX, |_| {});
            }
        }
    }
    a.poll_once(&*fa);
    b.poll_once(&*fb);
    for (name, w) in [("a", &a), ("b", &b)] {
        assert_eq!(w.frames_accounted(), FRAMES as usize, "node {name}: every frame accounted for");
        let c = w.counters();
        assert_eq!(c.double_frees, 0, "node {name}: no frame freed twice");
        let rx: u64 = c.rx.iter().map(|f| f.packets).sum();
        let tx: u64 = c.tx.iter().map(|f| f.packets).sum();
        // Each received packet was forwarded, answered or dropped, exactly once; an ICMP error counts
        // both as a drop (the packet was not forwarded) and as a transmit (the error).
        assert_eq!(rx + c.pipeline.icmp_errors, tx + c.total_drops(), "node {name}: rx = tx + drops - icmp errors");
        assert!(c.pipeline.icmp_errors > 0, "node {name}: the mix drew ICMP errors");
        assert!(c.total_drops() > 0 && tx > 0, "node {name}: the mix exercised both");
    }
    assert_eq!(a.counters().pipeline.headroom_moves, 0, "node a receives with headroom: nothing moved");
    assert!(b.counters().pipeline.headroom_moves > 0, "node b receives at offset 0: encapsulation moved packets");
}

/// Runs `f` on another thread while this one applies `w`'s port commands, as a running worker does
/// between iterations.
fn while_applying<T: Send>(w: &mut Worker<MemPort>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(f);
        while !h.is_finished() {
            w.apply_commands();
            std::thread::yield_now();
        }
        w.apply_commands();
        h.join().expect("command thread")
    })
}

#[test]
fn ports_removed_and_added_while_running_keep_every_frame() {
    let (a, fa) = node(1);
    let mut a = a.with_capacity(8);
    let control = a.control();
    let cross = traffic(1)[0].clone();
    // The pod port holds frames everywhere: lent for receiving, received and not yet polled, and
    // queued for transmission (its transmit ring is never drained here).
    for _ in 0..4 {
        let (mem, ports) = a.mem_and_ports();
        for _ in 0..8 {
            ports[1].inject(mem, &cross);
        }
        let self_bound = traffic(1)[2].clone();
        ports[1].inject(mem, &self_bound);
        a.poll_once(&*fa);
    }
    let (mem, ports) = a.mem_and_ports();
    ports[1].inject(mem, &cross);
    assert!(a.ports()[1].frames_held() > 0, "the pod port holds frames");

    let c = control.clone();
    let removed = while_applying(&mut a, move || c.remove(PortId(1), Duration::from_secs(5)));
    assert_eq!(removed, Ok(true));
    assert_eq!(a.ports().len(), 1);
    a.poll_once(&*fa);
    assert_eq!(a.frames_accounted(), FRAMES as usize, "the removed port's frames came back");
    let c = control.clone();
    assert_eq!(while_applying(&mut a, move || c.remove(PortId(1), Duration::from_secs(5))), Ok(false));

    // Traffic from the remote node to the removed pod is now a counted drop, not a crash.
    let before = a.counters().drops(ferry_encap::DropReason::NoRoute);
    let c = control.clone();
    let pod = MemPort::new("pod-again", MemPortConfig { rx_ring: 32, tx_ring: 16, rx_offset: 0 });
    let added = while_applying(&mut a, move || c.add(PortId(1), pod, PortRole::Pod, Duration::from_secs(5)));
    assert_eq!(added, Ok(()));
    let c = control.clone();
    let too_far = MemPort::new("too-far", MemPortConfig::default());
    let refused = while_applying(&mut a, move || c.add(PortId(8), too_far, PortRole::Pod, Duration::from_secs(5)));
    assert!(matches!(refused, Err(ferry_dataplane::worker::PortCommandError::Capacity { id: 8, capacity: 8 })));
    let (mem, ports) = a.mem_and_ports();
    ports[0].take_sent(mem, usize::MAX, |_| {});
    a.poll_once(&*fa);
    let uplink_before = a.counters().tx[0].packets;
    let (mem, ports) = a.mem_and_ports();
    assert!(ports[1].inject(mem, &cross), "the new port was lent frames");
    a.poll_once(&*fa);
    assert_eq!(a.counters().tx[0].packets, uplink_before + 1, "the new port's packet went out the uplink");
    assert_eq!(a.counters().rx[1].packets, 1, "the new port's counters started from zero");
    assert_eq!(a.counters().drops(ferry_encap::DropReason::NoRoute), before);
    assert_eq!(a.frames_accounted(), FRAMES as usize);
}

/// Received packets, and what became of them: transmitted, dropped, ICMP errors sent.
fn totals(c: &Counters) -> (u64, u64, u64, u64) {
    let rx = c.rx.iter().map(|f| f.packets).sum();
    let tx = c.tx.iter().map(|f| f.packets).sum();
    (rx, tx, c.total_drops(), c.pipeline.icmp_errors)
}

#[test]
fn published_counters_are_exact_once_the_worker_is_idle_and_when_it_stops() {
    let (w, fib) = node(1);
    // Sized like the agent's workers: the worker publishes its 2 live ports, not 256.
    let mut w = w.with_capacity(256);
    let shared = w.shared_counters();
    w.poll_once(&*fib);
    let t = traffic(1);
    let mut injected = 0u64;
    let (mem, ports) = w.mem_and_ports();
    for k in 0..32 {
        if ports[1].inject(mem, &t[k % t.len()]) {
            injected += 1;
        }
    }
    assert!(injected > 0, "the pod port was lent frames");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mode = PollMode::Adaptive { spin: Duration::from_millis(1), sleep: Duration::from_millis(20) };
    let reader = Publisher::new(fib).reader();
    let handle = worker::spawn("conservation".into(), w, None, reader, Arc::clone(&stop), mode).expect("spawn");
    // Every packet received, and each forwarded, answered or dropped, as readers see it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let c = shared.read();
        let (rx, tx, drops, icmp) = totals(&c);
        if (rx == injected && rx + icmp == tx + drops) || Instant::now() > deadline {
            break (rx, tx, drops, icmp);
        }
        std::thread::yield_now();
    };
    let (rx, tx, drops, icmp) = seen;
    assert_eq!(rx, injected, "readers see every received packet once the worker is idle");
    assert_eq!(rx + icmp, tx + drops, "readers see every packet's fate: {seen:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let w = handle.join().expect("worker thread");
    let (exact, published) = (w.counters(), shared.read());
    assert_eq!(totals(&published), totals(exact), "published totals are the worker's own after it stops");
    assert_eq!(published.rx[..2], exact.rx[..2]);
    assert_eq!(published.tx[..2], exact.tx[..2]);
    assert_eq!(published.pipeline, exact.pipeline);
}

//! Privileged tests of `XskPort` on veth pairs in private network namespaces (test side): frames
//! in through `recv` byte for byte, frames out through `send`/`flush` (including batches larger
//! than one copy-mode kick, sent from any offset in their frame), forwarding between two interfaces by
//! descriptor passing on one shared UMEM, multi-queue binding, busy-poll options, the errors for a
//! missing interface, a queue out of range and a busy queue, and a pcap tap over the port.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything
//! runs in namespaces the tests create; a guard deletes them even when a test panics. Every wait
//! is bounded.

mod xsk_util;

use std::thread;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::pcap::{PcapTap, TapDirection};
use ferry_dataplane::port::xsk::{
    BusyPoll, RX_HEADROOM, XskError, XskMem, XskMemConfig, XskMode, XskPort, XskPortConfig,
};
use ferry_dataplane::xdp::{AttachMode, UplinkConfig, XdpAttachment, XdpMode, XdpProgram};
use xsk_util::*;

const TUNNEL_PORT: u16 = 4789;

/// Receive until `want` packets arrived or `deadline`; returns them with their bytes.
fn recv_n(port: &mut XskPort, mem: &mut XskMem, want: usize, deadline: Instant) -> Vec<(Pkt, Vec<u8>)> {
    let mut got = Vec::new();
    let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    while got.len() < want && Instant::now() < deadline {
        let n = port.recv(mem, &mut batch);
        for p in &batch[..n] {
            got.push((*p, mem.bytes(*p).to_vec()));
        }
        if n == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    got
}

/// Reclaim until `want` frames came back, or `deadline`; returns how many did.
fn reclaim_n(port: &mut XskPort, free: &mut FreeFrames, want: usize, deadline: Instant) -> usize {
    let mut back = 0;
    while back < want && Instant::now() < deadline {
        let n = port.reclaim(free);
        back += n;
        if n == 0 {
            let _ = port.flush();
            thread::sleep(Duration::from_millis(2));
        }
    }
    back
}

fn uplink(port: &XskPort, ifname: &str) -> XdpAttachment {
    let cfg = UplinkConfig { tunnel_port: TUNNEL_PORT, local_v4: Some(A4), local_v6: Some(A6) };
    let prog = XdpProgram::uplink(&cfg, 1).expect("uplink program loads");
    prog.add_port(port).expect("socket goes into the socket map");
    prog.attach(ifname, XdpMode::Auto).expect("program attaches")
}

#[test]
fn frames_arrive_byte_for_byte_and_leave_in_batches() {
    if !privileged("frames_arrive_byte_for_byte_and_leave_in_batches") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let count = mem.frame_count() as usize;
    let mut free = FreeFrames::all(mem.frame_count());
    let mut port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    assert_eq!(port.mode(), XskMode::Copy, "veth has no zero-copy, so automatic mode must bind in copy mode");
    let att = uplink(&port, &t.a.name);
    assert_eq!(att.mode(), AttachMode::Native, "veth supports native XDP");
    let peer = {
        let _in_b = InNetns::enter(&t.b.ns);
        PacketSocket::bind(&t.b.name)
    };
    let filled = port.refill(&mut free);
    assert_eq!(filled, XskMemConfig::default().fill_ring as usize, "the fill ring is filled completely");

    // In: five tunnel frames from B, byte for byte, in order.
    let sent: Vec<Vec<u8>> = (0..5u16)
        .map(|i| udp4(t.b.mac, t.a.mac, B4, A4, 40000 + i, TUNNEL_PORT, format!("ferry-rx-{i}").as_bytes()))
        .collect();
    for f in &sent {
        peer.send(f);
    }
    let got = recv_n(&mut port, &mut mem, sent.len(), deadline(5));
    let bytes: Vec<Vec<u8>> = got.iter().map(|g| g.1.clone()).collect();
    assert_eq!(bytes, sent, "received frames differ from those sent");
    assert!(got.iter().all(|g| g.0.offset == RX_HEADROOM), "AF_XDP delivers after the XDP headroom");
    for (p, _) in &got {
        free.push(p.frame);
    }

    // Out: 100 frames in one batch (more than the 32 a copy-mode kick sends), at the start of their
    // frame, where decapsulation leaves them (the headroom plus a 50-byte outer header), and ending
    // on the frame's last byte: each is sent from where it lies.
    let mut pkts = Vec::new();
    let mut expect = Vec::new();
    for i in 0..100u16 {
        let f = udp4(t.a.mac, t.b.mac, A4, B4, 5000, 6000, format!("ferry-tx-{i:03}").as_bytes());
        let id = free.pop().expect("free frame");
        let offset = match i % 3 {
            0 => 0,
            1 => usize::from(RX_HEADROOM) + 50,
            _ => mem.frame_size() - f.len(),
        };
        mem.frame_mut(id)[offset..offset + f.len()].copy_from_slice(&f);
        pkts.push(Pkt { frame: id, offset: offset as u16, len: f.len() as u16 });
        expect.push(f);
    }
    assert_eq!(port.send(&mut mem, &pkts), 100, "the transmit ring takes the whole batch");
    port.flush().expect("kick");
    let seen = peer.recv_until(deadline(5), 100, |f| udp_of(f).is_some_and(|(p, _)| p == 6000));
    assert_eq!(seen.len(), 100, "one flush sends the whole batch, not only the first kick's 32");
    assert_eq!(seen, expect, "transmitted frames differ (or arrive out of order)");

    // Every frame comes back: nothing leaks.
    assert_eq!(reclaim_n(&mut port, &mut free, 100, deadline(5)), 100, "every transmitted frame completes");
    assert_eq!(free.len() + port.frames_held(), count, "frames leaked");
    let stats = port.stats();
    assert_eq!((stats.invalid_descs, stats.rx_dropped), (0, 0), "{stats:?}");

    att.detach().expect("detach");
    assert!(!has_xdp(&t.a), "detach leaves no XDP program");
}

#[test]
fn shared_umem_forwards_by_descriptor() {
    if !privileged("shared_umem_forwards_by_descriptor") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let (na, nb) = (ns.add(&format!("{tg}-a")), ns.add(&format!("{tg}-b")));
    let (a1, b1) = veth(&na, &format!("fxa{tg}"), 1, &nb, &format!("fxb{tg}"), 2, 1);
    let (a2, b2) = veth(&na, &format!("fxc{tg}"), 3, &nb, &format!("fxd{tg}"), 4, 1);
    addr(&a1, "10.77.0.1/24");

    let _in_a = InNetns::enter(&na);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let cfg = XskPortConfig::default();
    let mut p1 = XskPort::open(&mem, &a1.name, 0, &cfg).expect("bind first port");
    let mut p2 = XskPort::open(&mem, &a2.name, 0, &cfg).expect("bind second port on the same UMEM");
    let _att = uplink(&p1, &a1.name);
    let (in1, out2) = {
        let _in_b = InNetns::enter(&nb);
        (PacketSocket::bind(&b1.name), PacketSocket::bind(&b2.name))
    };
    p1.refill(&mut free);
    p2.refill(&mut free);

    let sent: Vec<Vec<u8>> = (0..64u16)
        .map(|i| udp4(b1.mac, a1.mac, B4, A4, 30000 + i, TUNNEL_PORT, format!("ferry-fwd-{i:02}").as_bytes()))
        .collect();
    for f in &sent {
        in1.send(f);
    }
    // A minimal worker: whatever arrives on port 1 leaves by port 2, descriptor unchanged.
    let mut forwarded = Vec::new();
    let mut batch = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; 64];
    let end = deadline(5);
    while forwarded.len() < sent.len() && Instant::now() < end {
        let n = p1.recv(&mut mem, &mut batch);
        if n == 0 {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        assert_eq!(p2.send(&mut mem, &batch[..n]), n);
        p2.flush().expect("kick");
        forwarded.extend(batch[..n].iter().map(|p| p.frame));
    }
    assert_eq!(forwarded.len(), sent.len(), "not everything arrived on the first port");
    let seen = out2.recv_until(deadline(5), sent.len(), |f| udp_of(f).is_some_and(|(p, _)| p == TUNNEL_PORT));
    assert_eq!(seen, sent, "frames left the second interface changed, or some are missing");

    // The frames that completed on port 2 are the very frames received on port 1: no copy.
    let mut back = FreeFrames::empty(mem.frame_count());
    reclaim_n(&mut p2, &mut back, forwarded.len(), deadline(5));
    let mut completed: Vec<FrameId> = std::iter::from_fn(|| back.pop()).collect();
    completed.sort();
    forwarded.sort();
    assert_eq!(completed, forwarded, "port 2 completed other frames than port 1 received");
}

#[test]
fn multi_queue_binding_and_queue_errors() {
    if !privileged("multi_queue_binding_and_queue_errors") {
        return;
    }
    let t = pair(2);
    let _in_a = InNetns::enter(&t.a.ns);
    let mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let cfg = XskPortConfig::default();
    let q0 = XskPort::open(&mem, &t.a.name, 0, &cfg).expect("queue 0 of 2");
    let q1 = XskPort::open(&mem, &t.a.name, 1, &cfg).expect("queue 1 of 2");
    let prog = XdpProgram::uplink(&UplinkConfig { tunnel_port: TUNNEL_PORT, local_v4: Some(A4), local_v6: None }, 2)
        .expect("program for 2 queues");
    prog.add_port(&q0).expect("socket for queue 0");
    prog.add_port(&q1).expect("socket for queue 1");

    let err = XskPort::open(&mem, &t.a.name, 2, &cfg).expect_err("queue 2 of 2");
    assert!(matches!(err, XskError::QueueOutOfRange { queue: 2, queues: 2, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("has 2 queue(s)") && msg.contains("use a queue below 2"), "{msg}");

    let err = XskPort::open(&mem, "fxnosuch0", 0, &cfg).expect_err("no such interface");
    assert!(matches!(err, XskError::NoSuchInterface { .. }), "{err:?}");
    assert!(err.to_string().contains("`fxnosuch0` does not exist"), "{err}");

    let err = prog.attach("fxnosuch0", XdpMode::Auto).expect_err("no such interface");
    assert!(err.to_string().contains("`fxnosuch0` does not exist"), "{err}");
}

#[test]
fn busy_queue_is_retried_then_reported() {
    if !privileged("busy_queue_is_retried_then_reported") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let cfg = XskPortConfig::default();
    let mem1 = XskMem::new(XskMemConfig::default()).expect("UMEM 1");
    let first = XskPort::open(&mem1, &t.a.name, 0, &cfg).expect("bind");

    // Another UMEM (another process's, say) cannot take the queue while the first socket holds it.
    let mem2 = XskMem::new(XskMemConfig::default()).expect("UMEM 2");
    let started = Instant::now();
    let err = XskPort::open(&mem2, &t.a.name, 0, &cfg).expect_err("queue is taken");
    assert!(matches!(err, XskError::Busy { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_secs(1), "EBUSY is retried before giving up");
    assert!(err.to_string().contains("another AF_XDP socket is bound to it"), "{err}");

    // When the holder goes away during the retries, binding succeeds.
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        drop(first);
        drop(mem1);
    });
    let second = XskPort::open(&mem2, &t.a.name, 0, &cfg).expect("bind once the queue is free");
    releaser.join().expect("releaser thread");
    assert_eq!(second.queue(), 0);
}

#[test]
fn busy_poll_options_reach_the_socket() {
    if !privileged("busy_poll_options_reach_the_socket") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let cfg = XskPortConfig {
        busy_poll: Some(BusyPoll { usecs: 30, budget: 16, ..BusyPoll::default() }),
        ..Default::default()
    };
    let mut port = XskPort::open(&mem, &t.a.name, 0, &cfg).expect("bind with busy polling");
    let get = |opt: libc::c_int| {
        let mut v = 0u32;
        let mut len = 4 as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for the call.
        let ret = unsafe { libc::getsockopt(port.fd(), libc::SOL_SOCKET, opt, (&raw mut v).cast(), &raw mut len) };
        assert_eq!(ret, 0, "getsockopt {opt}: {}", std::io::Error::last_os_error());
        v
    };
    // SO_BUSY_POLL_BUDGET (70) cannot be read back (getsockopt gives ENOPROTOOPT); a refused set
    // would have failed `open`.
    assert_eq!((get(46), get(69)), (30, 1), "SO_BUSY_POLL, SO_PREFER_BUSY_POLL");

    // Receiving still works with the busy-poll kick in the loop.
    let _att = uplink(&port, &t.a.name);
    let peer = {
        let _in_b = InNetns::enter(&t.b.ns);
        PacketSocket::bind(&t.b.name)
    };
    port.refill(&mut free);
    let f = udp4(t.b.mac, t.a.mac, B4, A4, 1234, TUNNEL_PORT, b"busy");
    peer.send(&f);
    let got = recv_n(&mut port, &mut mem, 1, deadline(5));
    assert_eq!(got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), vec![f]);
}

#[test]
fn transmits_without_need_wakeup() {
    if !privileged("transmits_without_need_wakeup") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig { need_wakeup: false, ..Default::default() }).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let mut port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let peer = {
        let _in_b = InNetns::enter(&t.b.ns);
        PacketSocket::bind(&t.b.name)
    };
    let mut pkts = Vec::new();
    for i in 0..40u16 {
        let f = udp4(t.a.mac, t.b.mac, A4, B4, 5000, 6001, format!("no-wakeup-{i:02}").as_bytes());
        let id = free.pop().expect("free frame");
        mem.frame_mut(id)[..f.len()].copy_from_slice(&f);
        pkts.push(Pkt { frame: id, offset: 0, len: f.len() as u16 });
    }
    assert_eq!(port.send(&mut mem, &pkts), pkts.len());
    port.flush().expect("kick");
    let seen = peer.recv_until(deadline(5), pkts.len(), |f| udp_of(f).is_some_and(|(p, _)| p == 6001));
    assert_eq!(seen.len(), pkts.len(), "copy mode without need_wakeup transmits (flush kicks unconditionally then)");
    assert_eq!(reclaim_n(&mut port, &mut free, pkts.len(), deadline(5)), pkts.len());
}

#[test]
fn a_closed_port_hands_back_every_frame_it_held() {
    if !privileged("a_closed_port_hands_back_every_frame_it_held") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let count = mem.frame_count() as usize;
    let mut free = FreeFrames::all(mem.frame_count());
    // Opened through the shared handle, as the agent opens pod ports for running workers.
    let mut port = XskPort::open_shared(mem.handle(), &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let _att = uplink(&port, &t.a.name);
    let peer = {
        let _in_b = InNetns::enter(&t.b.ns);
        PacketSocket::bind(&t.b.name)
    };
    port.refill(&mut free);
    for i in 0..8u16 {
        peer.send(&udp4(t.b.mac, t.a.mac, B4, A4, 41000 + i, TUNNEL_PORT, b"held"));
    }
    let got = recv_n(&mut port, &mut mem, 8, deadline(5));
    assert_eq!(got.len(), 8);
    // Half go back out (lent to the transmit ring, maybe completed, never reclaimed); the other half
    // stay with the caller, as a worker's in-flight batch would.
    let out: Vec<Pkt> = got[..4].iter().map(|g| g.0).collect();
    assert_eq!(port.send(&mut mem, &out), 4);
    let _ = port.flush();
    for g in &got[4..] {
        free.push(g.0.frame);
    }
    assert!(port.frames_held() > 0);
    port.release(&mut free);
    assert_eq!(free.len(), count, "every frame is free again once the socket is closed");
    let mut seen: Vec<u32> = std::iter::from_fn(|| free.pop()).map(|f| f.0).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), count, "no frame came back twice");
}

#[test]
fn a_fill_target_keeps_only_that_many_frames_lent() {
    if !privileged("a_fill_target_keeps_only_that_many_frames_lent") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let cfg = XskPortConfig { fill_target: Some(64), ..XskPortConfig::default() };
    let mut port = XskPort::open(&mem, &t.a.name, 0, &cfg).expect("bind");
    assert_eq!(port.refill(&mut free), 64);
    assert_eq!(port.refill(&mut free), 0, "topped up already");
    assert_eq!(port.frames_held(), 64);
    assert_eq!(free.len(), mem.frame_count() as usize - 64);
}

#[test]
fn a_pcap_tap_records_decapsulated_packets_as_sent() {
    if !privileged("a_pcap_tap_records_decapsulated_packets_as_sent") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    let mut mem = XskMem::new(XskMemConfig::default()).expect("UMEM");
    let mut free = FreeFrames::all(mem.frame_count());
    let port = XskPort::open(&mem, &t.a.name, 0, &XskPortConfig::default()).expect("bind");
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tap.pcap");
    let mut tap = PcapTap::new(port, &path, TapDirection::Tx).expect("pcap file");
    let peer = {
        let _in_b = InNetns::enter(&t.b.ns);
        PacketSocket::bind(&t.b.name)
    };

    // A tunnel frame as the uplink received it, and the inner frame decapsulation leaves in place:
    // 50 bytes in (outer Ethernet, IPv4, UDP, VXLAN). `send` transmits it from there.
    let mut inner = Vec::new();
    for i in 0..3u16 {
        inner.push(udp4(t.a.mac, t.b.mac, A4, B4, 5000, 6002, format!("decapsulated-{i}").as_bytes()));
    }
    let mut pkts = Vec::new();
    for f in &inner {
        let mut payload = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
        payload.extend_from_slice(f);
        let outer = udp4(t.b.mac, t.a.mac, B4, A4, 40000, TUNNEL_PORT, &payload);
        assert_eq!(outer.len(), 50 + f.len());
        let id = free.pop().expect("free frame");
        mem.frame_mut(id)[..outer.len()].copy_from_slice(&outer);
        pkts.push(Pkt { frame: id, offset: 50, len: f.len() as u16 });
    }
    assert_eq!(tap.send(&mut mem, &pkts), pkts.len());
    tap.flush().expect("kick");
    let seen = peer.recv_until(deadline(5), inner.len(), |f| udp_of(f).is_some_and(|(p, _)| p == 6002));
    assert_eq!(seen, inner, "the port sent other bytes than the inner frames");

    assert_eq!(tap.write_errors(), 0);
    tap.finish().expect("pcap file flushed");
    let file = std::fs::File::open(&path).expect("pcap file");
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap header");
    let mut recorded = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        recorded.push(pkt.expect("pcap record").data.into_owned());
    }
    assert_eq!(recorded, inner, "the tap recorded other bytes than the port sent");
}

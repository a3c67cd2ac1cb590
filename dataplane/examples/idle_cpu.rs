//! Measure a worker's CPU use with no traffic, on real AF_XDP ports (needs root).
//!
//! Two veth pairs in namespaces this program creates (removed when it ends), one worker with both
//! XDP programs attached, no packets: the worker thread's CPU time (its `pthread_getcpuclockid`
//! clock, nanosecond resolution) over the idle period, as a share of one core, for the adaptive
//! poll mode and, for contrast, the busy one.
//!
//! Run: `sudo cargo run --release -p ferry-dataplane --example idle_cpu [-- SECONDS]` (default 5).

#[path = "../tests/xsk_util/mod.rs"]
mod xsk_util;

use std::net::Ipv4Addr;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameMem, FreeFrames};
use ferry_dataplane::pipeline::{NodeConfig, Pipeline, PortId, PortRole};
use ferry_dataplane::port::xsk::{XskMem, XskMemConfig, XskPort, XskPortConfig};
use ferry_dataplane::worker::{PollMode, Worker};
use ferry_dataplane::xdp::{PodConfig, UplinkConfig, XdpMode, XdpProgram};
use ferry_encap::{DecapConfig, MacAddr, TunnelKind};
use ferry_tables::{Tables, Underlay};
use xsk_util::*;

/// CPU time consumed so far by the thread behind `clock` (a thread CPU-time clock).
fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-parameter and `clock` came from pthread_getcpuclockid.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime on the worker's CPU clock");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn measure(mode: PollMode, seconds: u64) -> f64 {
    let t = tag();
    let mut nets = Netns::default();
    let n1 = nets.add(&format!("idle{t}"));
    let peer = nets.add(&format!("peer{t}"));
    let (pv, _pod) = veth(&n1, &format!("pv{t}"), 0x06, &peer, "eth0", 0x05, 1);
    let (up, _upb) = veth(&n1, &format!("up{t}"), 0x11, &peer, &format!("ub{t}"), 0x12, 1);
    addr(&up, "192.168.61.1/24");
    let (ports, attachments, mem) = {
        let _inside = InNetns::enter(&n1);
        let mem = XskMem::new(XskMemConfig { frame_count: 2048, ..XskMemConfig::default() }).expect("UMEM");
        let pcfg = XskPortConfig::default();
        let uplink = XskPort::open(&mem, &up.name, 0, &pcfg).expect("uplink socket");
        let pod = XskPort::open(&mem, &pv.name, 0, &pcfg).expect("pod socket");
        let node = Ipv4Addr::new(192, 168, 61, 1);
        let up_prog = XdpProgram::uplink(&UplinkConfig { tunnel_port: 4789, local_v4: Some(node), local_v6: None }, 1)
            .expect("prog");
        up_prog.add_port(&uplink).expect("map");
        let pod_prog = XdpProgram::pod(
            &PodConfig {
                nets_v4: vec!["10.244.0.0/16".parse().expect("net")],
                gateway_v4: Some(Ipv4Addr::new(10, 244, 1, 1)),
                ..Default::default()
            },
            1,
        )
        .expect("prog");
        pod_prog.add_port(&pod).expect("map");
        let a = up_prog.attach(&up.name, XdpMode::Auto).expect("attach");
        let b = pod_prog.attach(&pv.name, XdpMode::Auto).expect("attach");
        (vec![uplink, pod], (a, b), mem)
    };
    let cfg = NodeConfig {
        gateway_mac: MacAddr(pv.mac),
        gateway_v4: Some(Ipv4Addr::new(10, 244, 1, 1)),
        gateway_v6: None,
        vtep_mac: MacAddr(pv.mac),
        decap: DecapConfig::new(TunnelKind::Vxlan, 1, Ipv4Addr::new(192, 168, 61, 1).into()),
        uplink: PortId(0),
        underlay_mtu: 1500,
        icmp_rate: (100, 10),
        host_exit: None,
        snat_v4: None,
        snat_v6: None,
    };
    let tables = Tables::new(
        Underlay::new(MacAddr(up.mac), Some(Ipv4Addr::new(192, 168, 61, 1)), None),
        Duration::from_secs(60),
    );
    let free = FreeFrames::all(mem.frame_count());
    let mut w = Worker::new(ports, vec![PortRole::Uplink, PortRole::Pod], mem, free, Pipeline::new(cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let mut reader = tables.reader();
    let s = Arc::clone(&stop);
    let h = std::thread::spawn(move || w.run(&mut reader, &s, mode));
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is alive until joined below; `clock` is a valid out-parameter.
    let rc = unsafe { libc::pthread_getcpuclockid(h.as_pthread_t() as libc::pthread_t, &mut clock) };
    assert_eq!(rc, 0, "pthread_getcpuclockid");
    // Let it settle into its idle state, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let (t0, c0) = (Instant::now(), cpu_time(clock));
    std::thread::sleep(Duration::from_secs(seconds));
    let (t1, c1) = (Instant::now(), cpu_time(clock));
    stop.store(true, Ordering::Relaxed);
    h.join().expect("worker");
    drop(attachments);
    drop(nets);
    100.0 * (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64()
}

fn main() {
    if !privileged("idle_cpu") {
        std::process::exit(1);
    }
    let seconds = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let adaptive = measure(PollMode::default(), seconds);
    let busy = measure(PollMode::Busy, seconds);
    println!("idle worker CPU over {seconds} s: adaptive {adaptive:.3}% of a core, busy-poll {busy:.1}% of a core");
}

//! End to end on real AF_XDP sockets (test side): a pod namespace behind ferry's worker, and a
//! second node running the kernel's own VXLAN device configured the way Flannel configures it.
//!
//! ```text
//!  [pod ns] eth0 10.244.1.2 ──veth── pv (node1 ns, pod XDP program, AF_XDP)
//!                                    ferry worker: real tables, pipeline, ports
//!  [node1 ns] up 192.168.60.1 (uplink XDP program, AF_XDP) ──veth── [node2 ns] upb 192.168.60.2
//!                                                                     vx0 (kernel VXLAN, VNI 1)
//!                                                                     lo 10.244.2.2 ("remote pod")
//! ```
//!
//! The pod pings the remote pod: ferry answers the pod's ARP for its gateway, encapsulates toward
//! the kernel VXLAN node, and decapsulates the replies. Then a TCP transfer from the pod, whose MTU
//! is left at 1500 on purpose: full-size segments do not fit the tunnel, ferry answers them with
//! ICMP "fragmentation needed", and the transfer completes through path MTU discovery.
//!
//! Needs root; without it the test fails when `CI` is set and prints SKIP otherwise. Everything runs
//! in namespaces the test creates; guards delete them and stop the worker even when it panics.

mod xsk_util;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FrameMem, FreeFrames};
use ferry_dataplane::pipeline::{NodeConfig, Pipeline, PortId, PortRole};
use ferry_dataplane::port::xsk::{XskMem, XskMemConfig, XskPort, XskPortConfig};
use ferry_dataplane::worker::{self, PollMode, Worker};
use ferry_dataplane::xdp::{PodConfig, UplinkConfig, XdpMode, XdpProgram};
use ferry_encap::{DecapConfig, DropReason, MacAddr, TunnelKind};
use ferry_tables::{DesiredState, LocalPod, RemoteNode, Tables, Underlay};
use xsk_util::*;

const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const REMOTE_POD: &str = "10.244.2.2";
const VTEP1: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0xa1];
const VTEP2: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0xa2];

/// Stops the worker thread on drop (before the namespaces go) and hands its counters back.
struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Worker<XskPort>>>,
}

impl Running {
    fn finish(mut self) -> Worker<XskPort> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().expect("running").join().expect("worker thread")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn pod_reaches_a_kernel_vxlan_node_through_ferry() {
    if !privileged("pod_reaches_a_kernel_vxlan_node_through_ferry") {
        return;
    }
    let t = tag();
    let mut nets = Netns::default();
    let pod_ns = nets.add(&format!("pod{t}"));
    let n1 = nets.add(&format!("n1{t}"));
    let n2 = nets.add(&format!("n2{t}"));
    let (eth0, pv) = veth(&pod_ns, "eth0", 0x05, &n1, &format!("pv{t}"), 0x06, 1);
    let (up, upb) = veth(&n1, &format!("up{t}"), 0x11, &n2, &format!("ub{t}"), 0x12, 1);
    addr(&up, "192.168.60.1/24");
    addr(&upb, "192.168.60.2/24");

    // The pod, wired as ferry's CNI plugin wires it: a /32, the gateway on-link, tx checksum
    // offload off (see shared/notes/afxdp-on-veth.md). Its MTU stays 1500 to exercise PMTUD.
    addr(&eth0, "10.244.1.2/32");
    run_in(&pod_ns, &["ip", "route", "add", "default", "via", "10.244.1.1", "dev", "eth0", "onlink"]);
    run_in(&pod_ns, &["ethtool", "-K", "eth0", "tx", "off"]);

    // Node 2: the kernel's VXLAN, Flannel style (static FDB and neighbour entries, no learning).
    let vx = ["ip", "-n", &n2];
    run(&[vx[0], vx[1], vx[2], "link", "add", "vx0", "address", &mac_str(VTEP2), "type", "vxlan", "id", "1"]
        .into_iter()
        .chain(["local", "192.168.60.2", "dstport", "4789", "nolearning", "dev", &upb.name])
        .collect::<Vec<_>>());
    run(&["ip", "-n", &n2, "addr", "add", "10.244.2.0/32", "dev", "vx0"]);
    run(&["ip", "-n", &n2, "link", "set", "vx0", "up"]);
    // The "remote pod" is an address of node 2 itself (this kernel has no dummy device).
    run(&["ip", "-n", &n2, "addr", "add", "10.244.2.2/32", "dev", "lo"]);
    run(&[
        "ip",
        "-n",
        &n2,
        "neigh",
        "replace",
        "10.244.1.0",
        "lladdr",
        &mac_str(VTEP1),
        "dev",
        "vx0",
        "nud",
        "permanent",
    ]);
    run_in(&n2, &["bridge", "fdb", "append", &mac_str(VTEP1), "dev", "vx0", "dst", "192.168.60.1"]);
    // advmss 1460: node 2 invites full-size segments, as a peer behind a bigger MTU would, so the
    // pod's first segments exceed the tunnel and path MTU discovery has to happen.
    run(&[
        "ip",
        "-n",
        &n2,
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "10.244.1.0",
        "dev",
        "vx0",
        "onlink",
        "advmss",
        "1460",
    ]);

    // Node 1: ferry. Sockets and programs are made inside node 1's namespace.
    let (ports, attachments, mem) = {
        let _inside = InNetns::enter(&n1);
        let mem = XskMem::new(XskMemConfig { frame_count: 2048, ..XskMemConfig::default() }).expect("UMEM");
        let pcfg = XskPortConfig { rx_ring: 512, tx_ring: 512, busy_poll: None, fill_target: None };
        let uplink = XskPort::open(&mem, &up.name, 0, &pcfg).expect("uplink socket");
        let pod = XskPort::open(&mem, &pv.name, 0, &pcfg).expect("pod socket");
        let up_prog = XdpProgram::uplink(&UplinkConfig { tunnel_port: 4789, local_v4: Some(NODE1), local_v6: None }, 1)
            .expect("uplink program");
        up_prog.add_port(&uplink).expect("uplink socket in map");
        let pod_prog = XdpProgram::pod(
            &PodConfig {
                nets_v4: vec!["10.244.0.0/16".parse().expect("net")],
                nets_v6: vec![],
                gateway_v4: Some(GW),
                gateway_v6: None,
            },
            1,
        )
        .expect("pod program");
        pod_prog.add_port(&pod).expect("pod socket in map");
        let a = up_prog.attach(&up.name, XdpMode::Auto).expect("attach uplink");
        let b = pod_prog.attach(&pv.name, XdpMode::Auto).expect("attach pod");
        (vec![uplink, pod], (a, b), mem)
    };

    let now = Instant::now();
    let mut tables = Tables::new(Underlay::new(MacAddr(up.mac), Some(NODE1), None), Duration::from_secs(60));
    let _ = tables.set_static_neighbour(NODE2.into(), MacAddr(upb.mac), now);
    tables
        .set_desired(
            DesiredState {
                nodes: vec![RemoteNode {
                    name: "node2".into(),
                    pod_cidrs: vec!["10.244.2.0/24".parse().expect("cidr")],
                    underlay: NODE2.into(),
                    other_underlays: Vec::new(),
                    vtep_mac: MacAddr(VTEP2),
                    vni: 1,
                    tunnel: TunnelKind::Vxlan,
                    port: 4789,
                }],
                local_pods: vec![LocalPod {
                    port: PortId(1),
                    mac: MacAddr(eth0.mac),
                    addrs: vec![IpAddr::V4(POD)],
                    source_only: vec![],
                }],
                blackholes: vec!["10.244.1.0/24".parse().expect("cidr")],
            },
            now,
        )
        .expect("desired state");
    let cfg = NodeConfig {
        gateway_mac: MacAddr(pv.mac),
        gateway_v4: Some(GW),
        gateway_v6: None,
        vtep_mac: MacAddr(VTEP1),
        decap: DecapConfig::new(TunnelKind::Vxlan, 1, NODE1.into()),
        uplink: PortId(0),
        underlay_mtu: 1500,
        icmp_rate: (100, 20),
        host_exit: None,
        snat_v4: None,
        snat_v6: None,
    };
    let free = FreeFrames::all(mem.frame_count());
    let w = Worker::new(ports, vec![PortRole::Uplink, PortRole::Pod], mem, free, Pipeline::new(cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = worker::spawn("ferry-e2e".into(), w, None, tables.reader(), Arc::clone(&stop), PollMode::default())
        .expect("worker thread");
    let running = Running { stop, handle: Some(handle) };

    // Ping: ARP for the gateway answered by ferry, encap to the kernel's VXLAN, decap of replies.
    let out = run_in(&pod_ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", REMOTE_POD]);
    assert!(out.contains("3 received"), "ping through ferry: {out}");

    // TCP: 2 MB from the pod to a server on the remote node, MTU discovered through ferry's ICMP.
    // The server says when it listens; `timeout` bounds every read of its output.
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &n2, "timeout", "20", "python3", "-c"])
        .arg(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('10.244.2.2', 5001)); s.listen(1); print('listening', flush=True); c,_=s.accept(); n=0\n\
             while True:\n    b=c.recv(65536)\n    if not b: break\n    n+=len(b)\nprint(n)",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start TCP server");
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("listening"), "the TCP server did not start");
    run_in(
        &pod_ns,
        &[
            "timeout",
            "20",
            "python3",
            "-c",
            "import socket\ns=socket.create_connection(('10.244.2.2', 5001), timeout=15)\ns.sendall(b'x'*2000000)\ns.close()",
        ],
    );
    let got = lines.next().and_then(Result::ok);
    let _ = server.wait();
    assert_eq!(got.as_deref(), Some("2000000"), "every byte arrived");

    let w = running.finish();
    drop(attachments);
    let c = w.counters();
    assert!(c.pipeline.icmp_errors > 0, "ferry told the pod about the tunnel MTU");
    assert!(c.drops(DropReason::TooBig) > 0);
    assert!(c.tx[0].packets >= 3 && c.rx[0].packets >= 3, "traffic crossed the uplink both ways");
    for r in
        [DropReason::UnknownSourceNode, DropReason::VniMismatch, DropReason::SpoofedSource, DropReason::NoNeighbour]
    {
        assert_eq!(c.drops(r), 0, "no {} drops", r.name());
    }
    drop(nets);
}

//! A simulated ferry node for tests and benches (test side): one worker over in-memory ports with
//! the real tables, built from a desired state as the control plane builds it.
//!
//! Node `n` (1 or 2) of a two-node cluster: underlay 192.0.2.n, pod CIDR 10.244.n.0/24 with the
//! gateway 10.244.n.1 (and fd00:0:0:n::1), VXLAN VNI 1 on port 4789. Port 0 is the uplink; the
//! other node, 3 - n, owns 10.244.(3-n).0/24 behind it. Pods sit on ports 1, 2, ... with the
//! addresses 10.244.n.2, 10.244.n.3, ... (the first also fd00:0:0:n::2); the host port, if any,
//! comes after them, as the agent registers it. MACs are `02:00:00:00:00:xx`, a different `xx`
//! for every role, so a frame's MACs say where it is going.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::frame::{FreeFrames, HeapMem};
use ferry_dataplane::pipeline::{HostExit, NodeConfig, Pipeline, PortId, PortRole};
use ferry_dataplane::port::mem::{MemPort, MemPortConfig};
use ferry_dataplane::worker::Worker;
use ferry_encap::{DecapConfig, MacAddr, TunnelKind};
use ferry_tables::{DesiredState, LocalPod, RemoteNode, Snapshot, Tables, Underlay};
use ipnet::IpNet;

/// The uplink's port.
pub const UPLINK: usize = 0;

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

/// Node `n`'s underlay address.
pub fn underlay_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

/// Node `n`'s uplink MAC (the other node's next hop toward it).
pub fn underlay_mac(n: u8) -> MacAddr {
    mac(0x10 + n)
}

/// The MAC node `n` answers for its pods' gateway.
pub fn gateway_mac(n: u8) -> MacAddr {
    mac(0xe0 + n)
}

/// Node `n`'s VTEP MAC (the inner destination MAC of frames tunnelled to it).
pub fn vtep_mac(n: u8) -> MacAddr {
    mac(0xa0 + n)
}

/// Node `n`'s pod gateway address.
pub fn gateway_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 1)
}

/// Node `n`'s IPv6 pod gateway address.
pub fn gateway_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, u16::from(n), 0, 0, 0, 1)
}

/// The IPv4 address of the pod on node `n`'s port `port` (1, 2, ...).
pub fn pod_ip(n: u8, port: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, port + 1)
}

/// The IPv6 address of the pod on node `n`'s port 1.
pub fn pod_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, u16::from(n), 0, 0, 0, 2)
}

/// The MAC of the pod on node `n`'s port `port`.
pub fn pod_mac(n: u8, port: u8) -> MacAddr {
    mac(0x50 + 10 * n + port + 1)
}

/// The MAC of node `n`'s host port (the kernel end of its veth pair).
pub fn host_mac(n: u8) -> MacAddr {
    mac(0x70 + n)
}

/// How to build node `n`; [`TestNode::new`] gives the defaults, the fields change them.
#[derive(Debug, Clone)]
pub struct TestNode {
    /// Which node: 1 or 2.
    pub n: u8,
    /// Pods, on ports 1 to `pods`.
    pub pods: u8,
    /// A host port after the pods: the overlay address 10.244.n.0 routed to it, the underlay
    /// address allowed as its source.
    pub host_port: bool,
    /// Frames in the worker's memory (2048 bytes each).
    pub frames: u32,
    /// Every port's rings and receive offset.
    pub ring: MemPortConfig,
    /// Whether the other node's underlay MAC is known (a static neighbour entry).
    pub neighbour_known: bool,
    /// ICMP error rate limit: (per second, burst).
    pub icmp_rate: (u32, u32),
    /// Prefixes dropped on purpose.
    pub blackholes: Vec<IpNet>,
    /// With a host port: pods' packets for outside 10.244.0.0/16 go to it (as for pods on taps).
    pub host_exit: bool,
}

impl TestNode {
    /// Node `n` with one pod, no host port, 512 frames, 64-slot rings receiving at offset 0, the
    /// other node's MAC known, ICMP errors at up to 1,000 a second, no blackholes.
    pub fn new(n: u8) -> Self {
        TestNode {
            n,
            pods: 1,
            host_port: false,
            frames: 512,
            ring: MemPortConfig { rx_ring: 64, tx_ring: 64, rx_offset: 0 },
            neighbour_known: true,
            icmp_rate: (1000, 1000),
            blackholes: Vec::new(),
            host_exit: false,
        }
    }

    /// The pipeline's configuration.
    pub fn config(&self) -> NodeConfig {
        let n = self.n;
        NodeConfig {
            gateway_mac: gateway_mac(n),
            gateway_v4: Some(gateway_ip(n)),
            gateway_v6: Some(gateway_ip6(n)),
            vtep_mac: vtep_mac(n),
            decap: DecapConfig {
                local_mac: Some(underlay_mac(n)),
                ..DecapConfig::new(TunnelKind::Vxlan, 1, underlay_ip(n).into())
            },
            uplink: PortId(UPLINK as u16),
            underlay_mtu: 1500,
            icmp_rate: self.icmp_rate,
            host_exit: (self.host_exit && self.host_port).then(|| HostExit {
                port: PortId(u16::from(self.pods) + 1),
                mac: host_mac(n),
                cluster_v4: vec![ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("/16")],
                cluster_v6: Vec::new(),
            }),
            // The node's overlay address (10.244.n.0), as the agent's host port carries it.
            snat_v4: self.host_port.then(|| Ipv4Addr::new(10, 244, n, 0)),
            snat_v6: None,
        }
    }

    /// The ports' roles, by port.
    pub fn roles(&self) -> Vec<PortRole> {
        let ports = 1 + usize::from(self.pods) + usize::from(self.host_port);
        let mut roles = vec![PortRole::Pod; ports];
        roles[UPLINK] = PortRole::Uplink;
        roles
    }

    /// The tables, published once.
    ///
    /// # Panics
    /// The desired state does not build (a bug in this fixture).
    pub fn tables(&self) -> Tables {
        let (n, other) = (self.n, 3 - self.n);
        let now = Instant::now();
        let mut tables =
            Tables::new(Underlay::new(underlay_mac(n), Some(underlay_ip(n)), None), Duration::from_secs(60));
        if self.neighbour_known {
            let _ = tables.set_static_neighbour(underlay_ip(other).into(), underlay_mac(other), now);
        }
        let mut local_pods: Vec<LocalPod> = (1..=self.pods)
            .map(|port| {
                let mut addrs = vec![IpAddr::V4(pod_ip(n, port))];
                if port == 1 {
                    addrs.push(IpAddr::V6(pod_ip6(n)));
                }
                LocalPod { port: PortId(u16::from(port)), mac: pod_mac(n, port), addrs, source_only: vec![] }
            })
            .collect();
        if self.host_port {
            local_pods.push(LocalPod {
                port: PortId(u16::from(self.pods) + 1),
                mac: host_mac(n),
                addrs: vec![IpAddr::V4(Ipv4Addr::new(10, 244, n, 0))],
                source_only: vec![underlay_ip(n).into()],
            });
        }
        let desired = DesiredState {
            nodes: vec![RemoteNode {
                name: format!("node{other}"),
                pod_cidrs: vec![IpNet::from(ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, other, 0), 24).expect("/24"))],
                underlay: underlay_ip(other).into(),
                other_underlays: Vec::new(),
                vtep_mac: vtep_mac(other),
                vni: 1,
                tunnel: TunnelKind::Vxlan,
                port: 4789,
            }],
            local_pods,
            blackholes: self.blackholes.clone(),
        };
        tables.set_desired(desired, now).expect("the fixture's desired state builds");
        tables
    }

    /// The worker over in-memory ports (`uplink`, `pod1`, ..., `host`), and the tables' snapshot.
    pub fn build(&self) -> (Worker<MemPort>, Arc<Snapshot>) {
        let roles = self.roles();
        let ports = roles
            .iter()
            .enumerate()
            .map(|(i, r)| match (i, r) {
                (UPLINK, _) => MemPort::new("uplink", self.ring),
                (i, _) if i <= usize::from(self.pods) => MemPort::new(&format!("pod{i}"), self.ring),
                _ => MemPort::new("host", self.ring),
            })
            .collect();
        let worker = Worker::new(
            ports,
            roles,
            HeapMem::new(self.frames, 2048),
            FreeFrames::all(self.frames),
            Pipeline::new(self.config()),
        );
        (worker, self.tables().current())
    }
}

/// Delivers `frame` on `port` of a built node's worker and runs it once more: an iteration first
/// lends the ports frames to receive into, so one runs before the frame goes in.
///
/// # Panics
/// If the port's receive ring has no room for the frame.
pub fn receive(worker: &mut Worker<MemPort>, fib: &Snapshot, port: usize, frame: &[u8]) {
    worker.poll_once(fib);
    let (mem, ports) = worker.mem_and_ports();
    assert!(ports[port].inject(mem, frame), "port {port} accepted the frame");
    worker.poll_once(fib);
}

/// Everything the worker sent on `port` since the last call, one buffer per frame.
pub fn sent(worker: &mut Worker<MemPort>, port: usize) -> Vec<Vec<u8>> {
    let (mem, ports) = worker.mem_and_ports();
    let mut out = Vec::new();
    ports[port].take_sent(mem, usize::MAX, |b| out.push(b.to_vec()));
    out
}

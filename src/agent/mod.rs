//! `ferry run`: the node agent (setup side). It starts the data plane (one pinned worker per
//! configured core, each with its UMEM and a socket on its own queue of every interface), the
//! control plane (routes from the cluster into the shared tables), underlay neighbour resolution,
//! the host port that joins the node itself to the overlay, and the admin socket through which the
//! CNI plugin registers pods and `ferry status|routes|stats` read the agent.
//!
//! ```text
//!  main thread: signals, 1 s counter sampling ── stop ──> workers (ferry-w0..)  <── snapshots ── Tables
//!  ferry-control (routes) ──────────────────────────────────────────────────────── set_desired ─┘ │
//!  ferry-neigh (underlay MACs) ──────────────────────────────────────────────────── learn ────────┤
//!  ferry-admin (socket: pods, status) ── port commands ──> workers;  local pods ──────────────────┘
//! ```

pub mod config;
mod external;
mod flows;
mod metrics;
mod offload;
mod pods;
mod server;
mod trace;
mod web;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_control::{ControlPlane, TablesPublisher};
use ferry_dataplane::conntrack::{Conntrack, Timeouts};
use ferry_dataplane::counters::{Counters, SharedCounters};
use ferry_dataplane::frame::{FrameMem, FreeFrames};
use ferry_dataplane::neighbour::NeighbourSync;
use ferry_dataplane::pipeline::{HostExit, NodeConfig, Pipeline, PortId, PortRole};
use ferry_dataplane::port::any::NodePort;
use ferry_dataplane::port::tap::TapConfig;
use ferry_dataplane::port::udp::{UdpPort, UdpPortConfig};
use ferry_dataplane::port::xsk::{self, XskMem, XskMemConfig, XskPort, XskPortConfig};
use ferry_dataplane::worker::{self, PollMode, Worker};
use ferry_dataplane::xdp::offload::Offload;
use ferry_dataplane::xdp::{PodConfig, UplinkConfig, XdpAttachment, XdpProgram};
use ferry_encap::{DecapConfig, MacAddr, TemplateError, TemplateParams, TunnelKind, TunnelTemplate};
use ferry_tables::{LocalPod, Tables, Underlay};
use ipnet::IpNet;

pub use self::config::AgentConfig;
use self::config::{OffloadChoice, PodPortChoice, Poll, UplinkPort};
use self::pods::{Pods, PortInfo, WorkerHandle};
use crate::admin::PodPort;
use crate::netlink::{Netlink, Route, VethSpec};

/// How long to wait for the route source to name this node's pod CIDRs when the configuration
/// does not.
const POD_CIDR_WAIT: Duration = Duration::from_secs(60);
/// The host port's id on every worker (the uplink is 0; pods take the ids after it).
const HOST_PORT: PortId = PortId(1);

/// The tap through which services' ways in from outside reach ferry on a UDP uplink.
const SERVICES_TAP: &str = "ferrysvc0";
/// Frames each pod port (and the host port) keeps lent for receiving.
const POD_FILL: u32 = 512;
/// Frames the uplink keeps lent for receiving (its whole fill ring).
const UPLINK_FILL: u32 = 1024;

/// How long learned underlay neighbours stay valid without being confirmed.
const NEIGHBOUR_REACHABLE: Duration = Duration::from_secs(60);

/// What a tunnel costs the pods' MTU: the outer headers as the underlay MTU counts them
/// ([`TunnelTemplate::ip_overhead`]: outer IP, UDP, the tunnel header and its Geneve options) plus
/// the inner Ethernet header. Addresses and MACs in `params` do not change the size.
///
/// # Errors
/// The parameters make no valid template.
pub fn tunnel_overhead(params: &TemplateParams<'_>) -> Result<u32, TemplateError> {
    let tpl = TunnelTemplate::new(params)?;
    Ok((tpl.ip_overhead() + ferry_encap::wire::ethernet::HEADER_LEN) as u32)
}

/// What the agent resolved at startup (reported by `ferry status`).
type Resolved = crate::admin::proto::NodeSummary;

/// Counter samples for rates.
#[derive(Debug, Default)]
struct Rates {
    prev: Option<(Instant, Counters)>,
    last: Option<(Instant, Counters)>,
}

/// Entries of the flow offload's map (`dataplane.offload`): 160 bytes each, preallocated.
const OFFLOAD_FLOWS: u32 = 65_536;

/// Everything the admin socket reads.
#[derive(Debug)]
struct Shared {
    resolved: Resolved,
    started: Instant,
    tables: Arc<Mutex<Tables>>,
    pods: Mutex<Pods>,
    ports: Arc<Mutex<BTreeMap<u16, PortInfo>>>,
    counters: Vec<Arc<SharedCounters>>,
    rates: Mutex<Rates>,
    /// Nodes the tables could not build (kept current by the control thread's publisher).
    skipped: ferry_control::SkippedNodes,
    /// The control plane's metrics (its publication count decides readiness).
    control_metrics: ferry_control::Metrics,
    /// Set once the uplink, the host port and the restored pods are attached and the admin socket
    /// listens: the agent can carry traffic once a table is published too.
    running: AtomicBool,
    /// When the main loop last went round (milliseconds since `started`): liveness.
    heartbeat_ms: AtomicU64,
    /// Connection tracking, shared by the workers; collected by the main loop.
    conntrack: Arc<Conntrack>,
    /// Flow records from the workers (empty when `dataplane.flows` is off).
    flows: Arc<flows::FlowLog>,
    /// The workers' pipeline configuration (`ferry trace` runs a pipeline of its own with it).
    node_cfg: NodeConfig,
    /// Every pod the sources describe (`ferry trace` resolves names with it).
    directory: ferry_control::PodDirectory,
    /// Each worker's command channel (`ferry trace --inject` hands them packets and watches).
    workers: Vec<ferry_dataplane::worker::PortControl<NodePort>>,
    /// Marked packets this node's workers watch for, by nonce, with their deadline.
    watches: Mutex<BTreeMap<u32, trace::Watching>>,
    /// Flow offload, when on, and its entries removed so far.
    offload: Option<Arc<Offload>>,
    offload_removed: AtomicU64,
}

/// The main loop goes round every second; this much longer without it and the agent is not live.
const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// Liveness and readiness, for `/healthz`, `/readyz` and `ferry status --ready`.
fn health(s: &Shared) -> ferry_control::metrics::Health {
    let beat = Duration::from_millis(s.heartbeat_ms.load(Ordering::Relaxed));
    let age = s.started.elapsed().saturating_sub(beat);
    let live = age < HEARTBEAT_STALE;
    let running = s.running.load(Ordering::Relaxed);
    let published = s.control_metrics.publications() > 0;
    let detail = if !live {
        format!("the agent's main loop has not run for {age:?}")
    } else if !running {
        "starting: the uplink, host port and pods are not all attached yet".into()
    } else if !published {
        "no forwarding table published by the route source yet".into()
    } else {
        String::new()
    };
    ferry_control::metrics::Health { live, ready: live && running && published, detail }
}

impl Shared {
    fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts, so that the main thread
/// takes them with `sigtimedwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for SIGINT/SIGTERM; true if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> bool {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos().into() };
    // SAFETY: `set` is an initialised signal set; info may be null; `ts` is a valid timespec.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    r == libc::SIGINT || r == libc::SIGTERM
}

/// The uplink's port kind once `auto` is decided (see [`UplinkPort::Auto`] for the rule).
fn uplink_kind(configured: UplinkPort, ifname: &str, addr: IpAddr) -> UplinkPort {
    match configured {
        UplinkPort::Auto => {
            // A NIC has a bus device behind it; a veth or a bridge has none, and AF_XDP runs in
            // copy mode there, where the kernel's UDP GSO/GRO moves 64 KB per packet instead.
            let virtual_dev = !std::path::Path::new(&format!("/sys/class/net/{ifname}/device")).exists();
            if addr.is_ipv4() && virtual_dev { UplinkPort::Udp } else { UplinkPort::AfXdp }
        }
        k => k,
    }
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// Anything that keeps the agent from starting, with what to do about it.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let signals = block_signals();
    let started = Instant::now();
    let nl = Netlink::open().context("opening rtnetlink")?;

    // The underlay.
    let link = nl
        .link(&cfg.underlay_if)?
        .with_context(|| format!("underlay.interface: there is no interface `{}` here", cfg.underlay_if))?;
    let underlay_mac = link.mac.with_context(|| format!("underlay.interface `{}` has no MAC", cfg.underlay_if))?;
    let addrs = nl.addresses(&cfg.underlay_if)?;
    let underlay_addr = match cfg.underlay_addr {
        Some(a) if addrs.iter().any(|n| n.addr() == a) => a,
        Some(a) => bail!("underlay.address {a} is not an address of `{}` (it has {addrs:?})", cfg.underlay_if),
        None => addrs
            .iter()
            .map(IpNet::addr)
            .find(IpAddr::is_ipv4)
            .or_else(|| addrs.iter().map(IpNet::addr).find(|a| !is_link_local(*a)))
            .with_context(|| {
                format!("underlay.interface `{}` has no address; give underlay.address", cfg.underlay_if)
            })?,
    };
    // A second address, IPv6 beside an IPv4 one: tunnels are accepted on both and each remote node
    // is reached over the family chosen for it (`Underlay::choose`).
    let underlay_addr6 = match cfg.underlay_addr6 {
        Some(a) if addrs.iter().any(|n| n.addr() == IpAddr::V6(a)) => Some(a),
        Some(a) => bail!("underlay.address {a} is not an address of `{}` (it has {addrs:?})", cfg.underlay_if),
        None => None,
    };
    let underlay_mtu = cfg.underlay_mtu.unwrap_or(link.mtu);
    let uplink_kind = match (uplink_kind(cfg.uplink_port, &cfg.underlay_if, underlay_addr), underlay_addr6) {
        // The UDP uplink's sockets carry one family.
        (UplinkPort::Udp, Some(_)) if cfg.uplink_port == UplinkPort::Auto => UplinkPort::AfXdp,
        (UplinkPort::Udp, Some(_)) => bail!(
            "dataplane.uplink_port = \"udp\" carries one underlay family, but underlay.address has two: \
             use afxdp (or auto), or give one address"
        ),
        (k, _) => k,
    };
    if cfg.offload == OffloadChoice::Tc && uplink_kind != UplinkPort::Udp {
        bail!(
            "dataplane.offload = \"tc\" needs the UDP uplink, and `{}` gets AF_XDP (uplink_port = auto picks udp only \
             on an IPv4 underlay over a virtual device, with one underlay address): set dataplane.uplink_port = \"udp\"",
            cfg.underlay_if
        );
    }
    let queues = link.rx_queues.min(link.tx_queues).max(1);
    if uplink_kind == UplinkPort::AfXdp && queues < cfg.workers {
        bail!(
            "dataplane.workers = {} but `{}` has only {queues} queue(s): give it one queue per worker \
             (for a veth: numrxqueues/numtxqueues) or lower dataplane.workers",
            cfg.workers,
            cfg.underlay_if
        );
    }
    let vtep_mac = cfg.vtep_mac.unwrap_or_else(|| ferry_control::tables::derived_vtep_mac(underlay_addr));
    let (v4, v6) = match underlay_addr {
        IpAddr::V4(a) => (Some(a), underlay_addr6),
        IpAddr::V6(a) => (None, Some(a)),
    };
    // The tables build every remote node's template with these parameters (their own MACs and
    // addresses, which do not change the size). With both families the pods get the larger
    // (IPv6) overhead's MTU, whichever family a peer is reached over.
    let widest = v6.map_or(underlay_addr, IpAddr::V6);
    let mut tunnel = TemplateParams::new(cfg.tunnel, cfg.vni, underlay_mac, underlay_mac, widest, widest);
    tunnel.dst_port = cfg.tunnel_port;
    let pod_mtu = underlay_mtu.saturating_sub(tunnel_overhead(&tunnel).context("the tunnel's parameters")?);

    // The tables and the control plane that fills them.
    let underlay = Underlay { prefer_ipv6: cfg.prefer_ipv6, ..Underlay::new(underlay_mac, v4, v6) };
    let tables = Arc::new(Mutex::new(Tables::new(underlay, NEIGHBOUR_REACHABLE)));
    let mut control = cfg.control.clone();
    control.public_ip = Some(underlay_addr);
    control.public_ipv6 = v6.filter(|_| v4.is_some());
    control.vtep_mac = Some(vtep_mac);
    let mut sources = Vec::new();
    if control.static_file.is_some() {
        sources.push("static");
    }
    if control.etcd.is_some() {
        sources.push("etcd");
    }
    if control.kube.is_some() {
        sources.push("kube");
    }
    // Each policy publication sets the veth pods' `isolated` flags at once (the pods are known
    // once the agent's shared state exists; until then the main loop's pass covers them).
    let policy_sync: Arc<OnceLock<Weak<Shared>>> = Arc::default();
    let publisher = TablesPublisher::shared(Arc::clone(&tables))
        .for_node(&cfg.node_name, std::iter::once(underlay_addr).chain(underlay_addr6.map(IpAddr::V6)).collect())
        .with_policy_hook({
            let sync = Arc::clone(&policy_sync);
            move |policy| {
                if let Some(shared) = sync.get().and_then(Weak::upgrade) {
                    lock(&shared.pods).sync_isolation(policy);
                    // Offloaded connections were judged under the old rules: back to ferry, which
                    // judges their next packet under the new ones.
                    if let Some(o) = &shared.offload {
                        let n = o.remove_where(|_| true);
                        shared.offload_removed.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        });
    let skipped = publisher.skipped_nodes();
    let directory = publisher.pod_directory();
    let control_plane = ControlPlane::spawn(control, publisher).context("starting the control plane")?;
    let metrics_addr = control_plane.metrics_addr();

    // This node's pod CIDRs: configured, or this node's entry in the route source.
    let pod_cidrs = if cfg.pod_cidrs.is_empty() {
        tracing::info!(sources = ?sources, "waiting for this node's pod CIDRs from the route source");
        let deadline = Instant::now() + POD_CIDR_WAIT;
        loop {
            let mine = lock(&tables).desired().blackholes.clone();
            if !mine.is_empty() {
                break mine;
            }
            if Instant::now() > deadline {
                bail!(
                    "the route source named no pod CIDR for node `{}` within {POD_CIDR_WAIT:?}; \
                     set pods.pod_cidrs or add the node to the source",
                    cfg.node_name
                );
            }
            if wait_signal(&signals, Duration::from_millis(50)) {
                return Ok(());
            }
        }
    } else {
        cfg.pod_cidrs.clone()
    };
    // The gateway is the first host address of the first pod CIDR of each family.
    let gateway_v4 = pod_cidrs.iter().find_map(|n| match n {
        IpNet::V4(n) => Some(Ipv4Addr::from(u32::from(n.network()) + 1)),
        IpNet::V6(_) => None,
    });
    let gateway_v6 = pod_cidrs.iter().find_map(|n| match n {
        IpNet::V6(n) => Some(Ipv6Addr::from(u128::from(n.network()) + 1)),
        IpNet::V4(_) => None,
    });
    let host_addr = pod_cidrs.iter().find_map(|n| match n {
        IpNet::V4(n) => Some(n.network()),
        IpNet::V6(_) => None,
    });
    // IPv6: the pod CIDR's network address is its subnet-router anycast address, so the host port
    // takes the one before the last (host-local is told to stop short of it: `cni::ipam`).
    let host_addr6 = pod_cidrs.iter().find_map(|n| match n {
        IpNet::V6(n) => Some(Ipv6Addr::from(u128::from(n.broadcast()) - 1)),
        IpNet::V4(_) => None,
    });

    // Workers: one UMEM each, the uplink socket on the worker's queue, the uplink program.
    let mut decap = DecapConfig::new(cfg.tunnel, cfg.vni, underlay_addr);
    decap.port = cfg.tunnel_port;
    decap.verify_udp_checksum = cfg.verify_udp_checksum;
    decap.accept_ipv6_zero_udp_checksum = cfg.udp6_zero_checksum_rx;
    decap.local_mac = Some(underlay_mac);
    decap.local_v6 = v6;
    // The host port: the node's own way into the overlay, and (pods on taps) the pods' way out of
    // it. Its veth exists before the workers start, so that they know the kernel end's MAC.
    let (host_v4, host_v6) = (host_addr.zip(gateway_v4), host_addr6.zip(gateway_v6));
    let host_plan = match &cfg.host_if {
        Some(host_if) if host_v4.is_some() || host_v6.is_some() => Some(HostPlan {
            host_if,
            v4: host_v4,
            v6: host_v6,
            // Every address the kernel may answer pods from on the underlay, both families (an
            // IPv6 underlay's node keeps its IPv4 address, and pods reach it there too).
            underlay_addrs: std::iter::once(underlay_addr)
                .chain(addrs.iter().map(IpNet::addr).filter(|a| *a != underlay_addr && !is_link_local(*a)))
                .collect(),
            mtu: pod_mtu,
            underlay_mtu,
        }),
        _ => None,
    };
    let host_mac =
        host_plan.as_ref().map(|p| host_veth(&nl, p, &cfg)).transpose().context("setting up the host port")?;
    let (nets_v4, nets_v6) = split_nets(&cfg.cluster_cidrs);
    let node_cfg = NodeConfig {
        gateway_mac: cfg.gateway_mac,
        gateway_v4,
        gateway_v6,
        vtep_mac,
        decap,
        uplink: PortId(0),
        underlay_mtu: underlay_mtu as u16,
        icmp_rate: (1000, 100),
        host_exit: host_mac.map(|mac| HostExit {
            port: HOST_PORT,
            mac,
            cluster_v4: nets_v4.clone(),
            cluster_v6: nets_v6.clone(),
        }),
        // Connections from outside to a `Cluster` service are translated to the host port's
        // overlay address (without a host port there is no way back out for their replies).
        snat_v4: host_plan.as_ref().and_then(|p| p.v4).map(|(a, _)| a),
        snat_v6: host_plan.as_ref().and_then(|p| p.v6).map(|(a, _)| a),
    };
    let port_cfg = XskPortConfig { rx_ring: 1024, tx_ring: 1024, busy_poll: cfg.busy_poll, fill_target: None };
    // Pods (and the host port) share each worker's frames with the uplink: each keeps half a fill
    // ring lent, so that quiet pods do not hold frames the busy ports need. (A quarter was tried:
    // a TCP burst arriving while the worker slept overflowed it, counted as socket drops.)
    let pod_port_cfg = XskPortConfig { fill_target: Some(POD_FILL), ..port_cfg };
    let mem_cfg =
        XskMemConfig { frame_count: cfg.frames, fill_ring: UPLINK_FILL, comp_ring: 1024, ..XskMemConfig::default() };
    let room = cfg.frames.saturating_sub(UPLINK_FILL + 2 * 1024) / POD_FILL;
    if room < cfg.max_ports {
        tracing::info!(
            frames = cfg.frames,
            ports_with_full_fill = room,
            max_ports = cfg.max_ports,
            "beyond this many pods, ports share frames and quiet ones get fewer (raise dataplane.frames for more)"
        );
    }
    // A UDP uplink leaves the tunnel port to the kernel: no uplink XDP program at all.
    let uplink_prog = match uplink_kind {
        UplinkPort::Udp => None,
        _ => Some(XdpProgram::uplink(
            &UplinkConfig { tunnel_port: cfg.tunnel_port, local_v4: v4, local_v6: v6 },
            cfg.workers,
        )?),
    };
    let mut udp_cfg = UdpPortConfig::new(SocketAddr::new(underlay_addr, cfg.tunnel_port), underlay_mac);
    udp_cfg.rx_frames = UPLINK_FILL as usize;
    // What a kernel VXLAN node's unsegmented super-packets are cut to: the pods' MTU.
    udp_cfg.inner_mtu = u16::try_from(pod_mtu).unwrap_or(u16::MAX);
    // With pods on taps, a run of received tunnel datagrams of one TCP flow is routed once and
    // written to the pod's tap as one super-packet (the super-packet path's receive side).
    // Flow offload where it was asked for, or where `auto` finds it possible (see OffloadChoice).
    let offload_wanted = match cfg.offload {
        OffloadChoice::Off => false,
        OffloadChoice::Tc => true,
        OffloadChoice::Auto => uplink_kind == UplinkPort::Udp && cfg.pod_port != PodPortChoice::Fixed(PodPort::Tap),
    };
    // The UDP uplink's TC programs: the flow offload's (loaded before the workers, whose
    // pipelines offer it flows), and the services' ways in from outside, which the AF_XDP
    // uplink's XDP program hands to ferry. Without offload, a kernel that refuses them only costs
    // those services (said once).
    let uplink_tc = if uplink_kind == UplinkPort::Udp {
        let flows = if offload_wanted { OFFLOAD_FLOWS } else { 1 };
        let v4 = match underlay_addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        };
        match Offload::load(flows, cfg.max_ports as u16, cfg.tunnel_port, v4) {
            Ok(o) => Some(Arc::new(o)),
            Err(e) if cfg.offload == OffloadChoice::Tc => {
                return Err(anyhow::Error::new(e).context("loading the flow offload programs (dataplane.offload)"));
            }
            Err(e) => {
                tracing::warn!(
                    offload = ?cfg.offload,
                    "the UDP uplink's TC programs did not load ({e}): flows are not offloaded, and NodePorts, \
                     external and load-balancer IPs are not served"
                );
                None
            }
        }
    } else {
        None
    };
    let offload = if offload_wanted { uplink_tc.clone() } else { None };
    let offload_on = offload.is_some();
    let pod_port = resolve_pod_port(cfg.pod_port, offload_on)?;
    tracing::info!(configured = ?cfg.offload, on = offload_on, pod_port = ?pod_port, "flow offload");
    udp_cfg.super_packets = pod_port == PodPort::Tap || offload_on;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut threads: Vec<JoinHandle<Worker<NodePort>>> = Vec::new();
    let mut counters = Vec::new();
    let mut flow_exports = Vec::new();
    // One table for every worker: the two directions of a connection reach different workers.
    let conntrack = Arc::new(Conntrack::new(cfg.conntrack_slots, Timeouts::default()));
    for w in 0..cfg.workers {
        let mem = XskMem::new(mem_cfg).context("creating the worker's UMEM (dataplane.frames)")?;
        let uplink = match &uplink_prog {
            Some(prog) => {
                let port = XskPort::open(&mem, &cfg.underlay_if, w, &port_cfg)?;
                prog.add_port(&port)?;
                NodePort::Xsk(port)
            }
            // One socket per worker on the same address (SO_REUSEPORT): the kernel spreads what
            // arrives among them by 4-tuple.
            None => NodePort::Udp(UdpPort::open(&udp_cfg).context("opening the UDP uplink (dataplane.uplink_port)")?),
        };
        let free = FreeFrames::all(mem.frame_count());
        let mem_handle = mem.handle().clone();
        let mut pipeline = Pipeline::with_conntrack(node_cfg.clone(), Arc::clone(&conntrack));
        pipeline.set_offload(offload.clone());
        let mut worker = Worker::new(vec![uplink], vec![PortRole::Uplink], mem, free, pipeline)
            .with_capacity(cfg.max_ports as usize);
        if let Some(slots) = cfg.flow_slots {
            worker = worker.with_flows(slots, ferry_dataplane::flows::DEFAULT_RING, w as u16);
            flow_exports.extend(worker.flow_export());
        }
        let control = worker.control();
        counters.push(worker.shared_counters());
        let mode = match cfg.poll {
            Poll::Adaptive => PollMode::default(),
            Poll::Busy => PollMode::Busy,
        };
        let reader = lock(&tables).reader();
        let t = worker::spawn(
            format!("ferry-w{w}"),
            worker,
            cfg.cores.get(w as usize).copied(),
            reader,
            Arc::clone(&stop),
            mode,
        )?;
        threads.push(t);
        handles.push(WorkerHandle { mem: mem_handle, control, queue: w });
    }
    let uplink_xdp: Option<XdpAttachment> =
        uplink_prog.map(|p| p.attach(&cfg.underlay_if, cfg.xdp_mode)).transpose()?;
    if let (Some(bp), Some(_)) = (&cfg.busy_poll, &uplink_xdp) {
        xsk::defer_interrupts(&cfg.underlay_if, bp)?;
    }
    tracing::info!(uplink_port = ?uplink_kind, configured = ?cfg.uplink_port, "uplink port kind");
    let offload_uplink = match &uplink_tc {
        Some(o) => Some(o.attach_uplink(link.index).context("attaching the UDP uplink's TC program")?),
        None => None,
    };

    let ports = Arc::new(Mutex::new(BTreeMap::new()));
    lock(&ports).insert(
        0,
        PortInfo {
            ifname: cfg.underlay_if.clone(),
            kind: "uplink".into(),
            io: "af_xdp".into(),
            pod: None,
            addrs: std::iter::once(underlay_addr).chain(underlay_addr6.map(IpAddr::V6)).collect(),
            xdp_mode: uplink_xdp
                .as_ref()
                .map_or_else(|| "none (udp socket)".to_owned(), |x| format!("{:?}", x.mode()).to_lowercase()),
        },
    );
    let worker_controls: Vec<_> = handles.iter().map(|h| h.control.clone()).collect();
    let mut pods = Pods::new(
        handles,
        pod_port_cfg,
        // The pod program hands ferry the pod networks and the service networks (for the
        // service stage). The host exit keeps only the pod networks as "inside": a packet to a
        // service address no service matches leaves through the node's kernel, as it would
        // without ferry.
        {
            let all: Vec<IpNet> = cfg.cluster_cidrs.iter().chain(&cfg.service_cidrs).copied().collect();
            let (nets_v4, nets_v6) = split_nets(&all);
            PodConfig { nets_v4, nets_v6, gateway_v4, gateway_v6 }
        },
        cfg.xdp_mode,
        pod_cidrs.clone(),
        Arc::clone(&tables),
        &cfg.state_dir,
        Arc::clone(&ports),
        cfg.max_ports as u16,
    )
    .with_context(|| format!("admin.state_dir {}", cfg.state_dir.display()))?;
    // With the UDP uplink, a pod's TCP super-packet is routed once and its segments go to the
    // socket as one `UDP_SEGMENT` send (the worker's super-packet path).
    pods.set_tap_config(TapConfig { super_packets: uplink_kind == UplinkPort::Udp, ..TapConfig::default() });
    pods.set_offload(offload.clone());
    pods.set_host_exit(node_cfg.host_exit.is_some());

    // The host port's ferry end, on every worker.
    let host_xdp = match (&host_plan, host_mac) {
        (Some(plan), Some(mac)) => Some(host_attach(&pods, plan, mac, HOST_PORT).context("attaching the host port")?),
        _ => None,
    };
    // Services from outside on the UDP uplink: ferry's tap for them, fed by the uplink's TC
    // program (an uplink port to the pipeline, as the AF_XDP uplink is).
    let services_tap = match &uplink_tc {
        Some(t) => match pods.attach_services_tap(SERVICES_TAP) {
            Ok((id, index)) => match t.attach_external(index) {
                Ok(link) => Some(link),
                Err(e) => {
                    pods.detach_port(id);
                    tracing::warn!("NodePorts, external and load-balancer IPs are not served: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("NodePorts, external and load-balancer IPs are not served: {e}");
                None
            }
        },
        None => None,
    };

    let resolved = Resolved {
        node_name: cfg.node_name.clone(),
        underlay_if: cfg.underlay_if.clone(),
        underlay_addr,
        underlay_mac: underlay_mac.to_string(),
        underlay_mtu,
        tunnel: match cfg.tunnel {
            TunnelKind::Vxlan => "vxlan".into(),
            TunnelKind::Geneve => "geneve".into(),
        },
        vni: cfg.vni,
        tunnel_port: cfg.tunnel_port,
        vtep_mac: vtep_mac.to_string(),
        cluster_cidrs: cfg.cluster_cidrs.clone(),
        pod_cidrs,
        gateway_v4,
        gateway_v6,
        gateway_mac: cfg.gateway_mac.to_string(),
        host_if: cfg.host_if.clone(),
        host_addr,
        host_addr6: host_plan.as_ref().and_then(|p| p.v6).map(|(a, _)| a),
        pod_mtu,
        pod_port,
        offload: offload_on,
        workers: cfg.workers,
        poll: format!("{:?}", cfg.poll).to_lowercase(),
        sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        metrics_addr,
        ipam_data_dir: cfg.state_dir.join("ipam").display().to_string(),
    };
    let shared = Arc::new(Shared {
        resolved,
        started,
        tables: Arc::clone(&tables),
        pods: Mutex::new(pods),
        ports,
        counters,
        rates: Mutex::new(Rates::default()),
        skipped,
        control_metrics: control_plane.metrics().clone(),
        running: AtomicBool::new(false),
        heartbeat_ms: AtomicU64::new(0),
        conntrack,
        flows: Arc::new(flows::FlowLog::new(cfg.node_name.clone(), flow_exports)),
        node_cfg: node_cfg.clone(),
        directory,
        workers: worker_controls,
        watches: Mutex::new(BTreeMap::new()),
        offload: offload.clone(),
        offload_removed: AtomicU64::new(0),
    });
    let _ = policy_sync.set(Arc::downgrade(&shared));

    if metrics_addr.is_some() {
        control_plane.metrics().add_collector(Box::new(metrics::DataplaneCollector(Arc::clone(&shared))));
        let s3 = Arc::clone(&shared);
        control_plane.metrics().set_health(Box::new(move || health(&s3)));
    }

    // Pods from before a restart, then the admin socket.
    {
        let nl2 = Netlink::open()?;
        lock(&shared.pods).restore(|pod| match pod.kind {
            PodPort::Veth => nl2.link_exists(&pod.host_ifname).unwrap_or(false),
            PodPort::Tap => pods::tap_exists(std::path::Path::new(&pod.netns), &pod.host_ifname),
        });
    }
    let flows_thread = if shared.flows.enabled() {
        let s2 = Arc::clone(&shared);
        Some(flows::spawn(Arc::clone(&shared.flows), Arc::clone(&stop), move || {
            let (pods, ports) = pod_names(&s2);
            (pods, ports, Arc::clone(lock(&s2.tables).policy()))
        })?)
    } else {
        None
    };
    let server = server::Server::bind(&cfg.socket, Arc::clone(&shared))?;
    let (server_thread, socket_file) = server.spawn(Arc::clone(&stop))?;
    let web_thread = match &cfg.web {
        Some(w) => Some(web::spawn(w, server::Handler::new(Arc::clone(&shared)), Arc::clone(&stop))?),
        None => None,
    };
    let neigh = spawn_neighbours(
        &cfg.underlay_if,
        &Underlay::new(underlay_mac, v4, v6),
        Arc::clone(&tables),
        Arc::clone(&stop),
    )?;
    tracing::info!(
        node = %cfg.node_name,
        underlay = %underlay_addr,
        workers = cfg.workers,
        pods = lock(&shared.pods).list().len(),
        socket = %cfg.socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ferry is running"
    );

    shared.running.store(true, Ordering::Relaxed);

    // Services from outside the cluster: the uplink program's frontends, the health check ports.
    let mut frontends = external::FrontendSync::default();
    let health = external::HealthServer::spawn(underlay_addr, Arc::clone(&stop))?;
    // With the UDP uplink, its TC program hands the frontends to the services' tap.
    let tc_frontends = services_tap.as_ref().and(uplink_tc.clone());
    // Main loop: sample counters every second until a signal comes; the services' frontends every
    // 100 ms.
    let mut last_sample: Option<Instant> = None;
    let mut offload_sweep = offload::Sweep::default();
    loop {
        if last_sample.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_sample = Some(Instant::now());
            shared.beat();
            sample(&shared);
            // Off the hot path: expired connections go once a second (a scan of the table's slots).
            shared.conntrack.gc(shared.conntrack.now());
        }
        if let Some(o) = &shared.offload {
            let n = offload_sweep.run(o, &shared.conntrack, &lock(&tables).current(), Instant::now());
            shared.offload_removed.fetch_add(n as u64, Ordering::Relaxed);
        }
        let services = Arc::clone(lock(&tables).services());
        if let Some(x) = &uplink_xdp {
            frontends.sync(x.program(), &services);
        } else if let Some(t) = &tc_frontends {
            frontends.sync(t.as_ref(), &services);
        }
        health.set(external::health_ports(&services));
        lock(&shared.pods).sync_backends(&services);
        let policy = Arc::clone(lock(&tables).policy());
        lock(&shared.pods).sync_isolation(&policy);
        if wait_signal(&signals, Duration::from_millis(100)) {
            break;
        }
        if threads.iter().any(JoinHandle::is_finished) {
            tracing::error!("a worker thread ended unexpectedly; stopping");
            break;
        }
    }
    tracing::info!("stopping");
    // Pods first, while the workers still run to close their sockets; then everything else.
    drop(host_xdp);
    lock(&shared.pods).detach_all();
    stop.store(true, Ordering::Relaxed);
    let _ = server_thread.join();
    if let Some(t) = web_thread {
        let _ = t.join();
    }
    let _ = neigh.join();
    health.join();
    if let Some(t) = flows_thread {
        let _ = t.join();
    }
    for t in threads {
        let _ = t.join();
    }
    drop(uplink_xdp);
    drop(services_tap);
    drop(offload_uplink);
    control_plane.shutdown();
    drop(socket_file);
    removed_with_its_daemonset(&cfg);
    Ok(())
}

/// After a stop: if the agent runs from a DaemonSet that is being deleted, clean the node (the
/// stop was `kubectl delete`, not an update: see `ferry_control::deployment`).
fn removed_with_its_daemonset(cfg: &AgentConfig) {
    let (Some((ns, name)), Some(kube)) = (&cfg.uninstall.daemonset, &cfg.control.kube) else { return };
    match ferry_control::deployment::own_daemonset_blocking(&kube.auth, ns, name, Duration::from_secs(5)) {
        ferry_control::deployment::Deployment::Present => {
            tracing::info!(daemonset = %format!("{ns}/{name}"), "the DaemonSet remains: the node keeps its wiring");
        }
        ferry_control::deployment::Deployment::Unknown(why) => {
            tracing::warn!(%why, "cannot tell whether ferry is being removed: the node keeps its wiring");
        }
        ferry_control::deployment::Deployment::Removed(why) => {
            tracing::info!(%why, "ferry is being removed from this node");
            match uninstall_node(cfg) {
                Ok(done) => tracing::info!(removed = ?done, "node cleaned"),
                Err(e) => tracing::error!("cleaning the node: {e:#}"),
            }
        }
    }
}

/// Removes what ferry leaves on a node when it stops: the host port (both ends of its veth pair)
/// and the CNI configuration list (`uninstall.cni_conf`). A stopped agent has already detached
/// its XDP programs. Returns what was removed; what is already gone is not an error.
///
/// Pods still running keep their interfaces, but nothing forwards their traffic any more; they
/// need recreating under whatever network replaces ferry.
///
/// # Errors
/// A link or file that exists but cannot be removed.
pub fn uninstall_node(cfg: &AgentConfig) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    if let Some(host) = &cfg.host_if {
        let nl = Netlink::open().context("opening rtnetlink")?;
        if nl.delete_link(host).with_context(|| format!("deleting the host port {host}"))? {
            done.push(format!("link {host}"));
        }
    }
    if let Some(conf) = &cfg.uninstall.cni_conf {
        match std::fs::remove_file(conf) {
            Ok(()) => done.push(conf.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", conf.display())),
        }
    }
    Ok(done)
}

/// `dataplane.pod_port` resolved: `auto` is a veth under flow offload (the TC programs move flows
/// between veths), else a tap when `/dev/net/tun` opens read-write here (the device exists and
/// the agent may use it), else a veth.
///
/// # Errors
/// `tap` was configured but `/dev/net/tun` does not open.
fn resolve_pod_port(choice: PodPortChoice, offload: bool) -> anyhow::Result<PodPort> {
    if offload && choice == PodPortChoice::Auto {
        return Ok(PodPort::Veth);
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).open(TUN_DEVICE);
    match (choice, tun) {
        (PodPortChoice::Fixed(PodPort::Tap), Err(e)) => bail!(
            "dataplane.pod_port = \"tap\" but {TUN_DEVICE} does not open ({e}): load the tun module \
             (modprobe tun) and run the agent as root, or set pod_port = \"veth\""
        ),
        (PodPortChoice::Fixed(kind), _) => Ok(kind),
        (PodPortChoice::Auto, Ok(_)) => Ok(PodPort::Tap),
        (PodPortChoice::Auto, Err(e)) => {
            tracing::info!(error = %e, "pod_port = auto: {TUN_DEVICE} does not open, so pods get veths");
            Ok(PodPort::Veth)
        }
    }
}

/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn split_nets(nets: &[IpNet]) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (v4, v6)
}

/// Creates (or reuses, after a restart) the host port: a veth pair whose kernel end (`host_if`)
/// carries the node's overlay address and the routes to the cluster's pod networks, and whose
/// other end (`<host_if>p`) is a port of every worker, like a pod's.
/// Where the host port goes.
#[derive(Debug)]
struct HostPlan<'a> {
    host_if: &'a str,
    /// The node's IPv4 overlay address (the pod CIDR's network address) and the pods' IPv4
    /// gateway, with an IPv4 pod CIDR.
    v4: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The node's IPv6 overlay address and the pods' IPv6 gateway, with an IPv6 pod CIDR.
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
    /// The node's addresses on the underlay interface, the tunnel's first: the kernel answers pods
    /// that talked to one of them from it.
    underlay_addrs: Vec<IpAddr>,
    /// The kernel end's MTU (the pods').
    mtu: u32,
    /// ferry's end: the underlay's (see `NodeInfo::underlay_mtu`).
    underlay_mtu: u32,
}

/// The host port's veth pair, addresses and routes (made before the workers start, which need the
/// kernel end's MAC for their [`HostExit`]); returns the kernel end's MAC.
fn host_veth(nl: &Netlink, plan: &HostPlan<'_>, cfg: &AgentConfig) -> anyhow::Result<MacAddr> {
    let HostPlan { host_if, v4, v6, mtu, underlay_mtu, .. } = *plan;
    let peer = format!("{host_if}p");
    let usable = match (nl.link(host_if)?, nl.link(&peer)?) {
        (Some(h), Some(p)) => {
            p.mac == Some(cfg.gateway_mac) && h.rx_queues >= cfg.workers && p.rx_queues >= cfg.workers
        }
        _ => false,
    };
    if !usable {
        nl.delete_link(host_if)?;
        nl.delete_link(&peer)?;
        nl.create_veth(&VethSpec {
            name: host_if,
            peer_name: &peer,
            mac: None,
            peer_mac: Some(cfg.gateway_mac),
            mtu: Some(mtu),
            queues: cfg.workers,
            peer_netns: None,
        })?;
    }
    nl.set_mtu(host_if, mtu)?;
    nl.set_mtu(&peer, underlay_mtu.max(mtu))?;
    // The kernel end's transmissions reach the UMEM with unfinished checksums otherwise.
    nl.set_tx_checksum(host_if, false)?;
    if let Some((addr, _)) = v4 {
        let net = IpNet::V4(ipnet::Ipv4Net::new(addr, 32)?);
        if !nl.addresses(host_if)?.contains(&net) {
            nl.add_address(host_if, net)?;
        }
    }
    nl.set_up(&peer)?;
    nl.set_up(host_if)?;
    // Replies to clients outside the cluster (NodePort, external IPs) reach the kernel through
    // this port with the node's own address as their source, to be routed out: accept them.
    let accept_local = format!("/proc/sys/net/ipv4/conf/{host_if}/accept_local");
    if let Err(e) = std::fs::write(&accept_local, "1") {
        tracing::warn!("{accept_local}: {e}: replies to clients outside the cluster would be dropped by the kernel");
    }
    // The pod networks, and the service networks: the node's own connections to a ClusterIP
    // (kubelet, host-network pods) go through ferry's service stage as a pod's do, from the
    // node's overlay address, and the replies come back to it through this port.
    let routed = || cfg.cluster_cidrs.iter().chain(&cfg.service_cidrs);
    if let Some((addr, gateway)) = v4 {
        for c in routed().filter(|c| c.addr().is_ipv4()) {
            let r = Route { dst: *c, via: Some(gateway.into()), onlink: true, src: Some(addr.into()) };
            nl.add_route(host_if, &r)?;
        }
    }
    if let Some((addr6, gateway6)) = v6 {
        let net6 = IpNet::V6(ipnet::Ipv6Net::new(addr6, 128)?);
        if !nl.addresses(host_if)?.contains(&net6) {
            nl.add_address(host_if, net6)?;
        }
        for c in routed().filter(|c| c.addr().is_ipv6()) {
            let r = Route { dst: *c, via: Some(gateway6.into()), onlink: true, src: Some(addr6.into()) };
            nl.add_route(host_if, &r)?;
        }
    }
    nl.link(host_if)?.and_then(|l| l.mac).context("the host port has no MAC")
}

/// Attaches the host port's ferry end to every worker as `port` and registers the node's overlay
/// address behind it.
fn host_attach(pods: &Pods, plan: &HostPlan<'_>, host_mac: MacAddr, port: PortId) -> anyhow::Result<XdpAttachment> {
    let HostPlan { host_if, v4, v6, .. } = *plan;
    let overlay: Vec<IpAddr> = v4.map(|(a, _)| a.into()).into_iter().chain(v6.map(|(a, _)| a.into())).collect();
    let peer = format!("{host_if}p");
    let xdp = pods.attach_port(&peer, port).map_err(|e| anyhow::anyhow!("attaching {peer}: {e}"))?;
    pods.name_port(
        port,
        PortInfo {
            ifname: peer.clone(),
            kind: "host".into(),
            io: "af_xdp".into(),
            pod: None,
            addrs: overlay.iter().chain(&plan.underlay_addrs).copied().collect(),
            xdp_mode: format!("{:?}", xdp.mode()).to_lowercase(),
        },
    );
    // Only the overlay address is routed to the host port: decapsulated traffic reaches the node's
    // kernel there and nowhere else (never at its underlay address, where a tunnel packet nested in
    // a tunnel packet would reach the kernel's own tunnel port). The node's kernel answers pods that
    // talked to its underlay address from that address (the request reached the kernel directly,
    // not through ferry), so those addresses are allowed as sources without being routed.
    pods.register(LocalPod { port, mac: host_mac, addrs: overlay.clone(), source_only: plan.underlay_addrs.clone() })
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(ifname = host_if, addrs = ?overlay, port = port.0, "host port ready");
    Ok(xdp)
}

/// The underlay neighbour resolution thread: keeps the tables' next-hop MACs in step with the
/// kernel's neighbour table on the uplink, and frees retired snapshots.
fn spawn_neighbours(
    uplink: &str,
    underlay: &Underlay,
    tables: Arc<Mutex<Tables>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut sync = NeighbourSync::new(uplink, underlay).context("starting underlay neighbour resolution")?;
    Ok(std::thread::Builder::new().name("ferry-neigh".into()).spawn(move || {
        let mut warned = false;
        while !stop.load(Ordering::Relaxed) {
            let next = {
                let mut t = lock(&tables);
                let now = Instant::now();
                match sync.sync(&mut t, now) {
                    Ok(r) => {
                        warned = false;
                        for c in &r.changed {
                            tracing::info!(change = ?c, "underlay neighbour changed MAC");
                        }
                    }
                    Err(e) if !warned => {
                        tracing::warn!(error = %e, "underlay neighbour resolution failed (retrying)");
                        warned = true;
                    }
                    Err(_) => {}
                }
                t.reclaim();
                sync.next_sync(&t, Instant::now())
            };
            let wait = next
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), Duration::from_millis(200));
            match sync.notification_fd() {
                Some(fd) => {
                    use std::os::fd::AsRawFd;
                    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
                }
                None => std::thread::sleep(wait),
            }
        }
    })?)
}

/// The pods this agent wired, by address (`namespace/name`, or the pod's id when the runtime did
/// not name it), and the ports: what flow records are named with.
fn pod_names(
    shared: &Shared,
) -> (std::collections::HashMap<IpAddr, String>, BTreeMap<u16, crate::admin::proto::PortInfo>) {
    let mut pods = std::collections::HashMap::new();
    for (p, _) in lock(&shared.pods).list() {
        let name = match (&p.namespace, &p.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            _ => p.id.clone(),
        };
        for a in &p.addrs {
            pods.insert(*a, name.clone());
        }
    }
    (pods, lock(&shared.ports).clone())
}

/// Takes a counter sample for rates.
fn sample(shared: &Shared) {
    let Some(c) = ferry_dataplane::counters::sum(shared.counters.iter().map(|a| &**a)) else { return };
    let mut r = lock(&shared.rates);
    r.prev = r.last.take();
    r.last = Some((Instant::now(), c));
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ferry_encap::wire::geneve::GeneveOption;
    use ferry_encap::{FrameBuf, MacAddr, encap_with};

    use super::*;

    /// The largest inner frame the pods' MTU allows, encapsulated with `params`: its outer IP
    /// packet, read back by etherparse, is exactly the underlay MTU.
    fn assert_fills_the_underlay_mtu(params: &TemplateParams<'_>, what: &str) {
        const UNDERLAY_MTU: u32 = 1500;
        let pod_mtu = UNDERLAY_MTU - tunnel_overhead(params).expect("valid parameters");
        let tpl = TunnelTemplate::new(params).expect("valid parameters");
        let inner = 14 + pod_mtu as usize;
        let mut buf = vec![0u8; 256 + inner];
        let mut frame = FrameBuf::new(&mut buf, 256, inner).expect("fits");
        encap_with(&tpl, &mut frame, 0, 0).expect("encapsulates");
        let outer = etherparse::SlicedPacket::from_ethernet(frame.data()).expect("outer headers parse");
        let ip_len = match outer.net.expect("outer IP") {
            etherparse::NetSlice::Ipv4(ip) => u32::from(ip.header().total_len()),
            etherparse::NetSlice::Ipv6(ip) => 40 + u32::from(ip.header().payload_length()),
            other => panic!("{what}: not IP: {other:?}"),
        };
        assert_eq!(ip_len, UNDERLAY_MTU, "{what}: a full-sized pod packet must fill the underlay MTU exactly");
    }

    #[test]
    fn overhead_is_the_templates_as_the_wire_shows() {
        let (mac, v4, v6) =
            (MacAddr([2, 0, 0, 0, 0, 1]), IpAddr::from([192, 0, 2, 1]), IpAddr::from([0xfd00u16, 0, 0, 0, 0, 0, 0, 1]));
        let vxlan4 = TemplateParams::new(TunnelKind::Vxlan, 7, mac, mac, v4, v4);
        let vxlan6 = TemplateParams::new(TunnelKind::Vxlan, 7, mac, mac, v6, v6);
        assert_eq!(tunnel_overhead(&vxlan4), Ok(50));
        assert_eq!(tunnel_overhead(&vxlan6), Ok(70));
        assert_fills_the_underlay_mtu(&vxlan4, "VXLAN over IPv4");
        assert_fills_the_underlay_mtu(&vxlan6, "VXLAN over IPv6");

        // Geneve options cost MTU; an underlay VLAN tag does not (it is outside the IP packet).
        let data = [0u8; 8];
        let options = [GeneveOption { class: 0x0102, kind: 3, data: &data }];
        let mut geneve = TemplateParams::new(TunnelKind::Geneve, 7, mac, mac, v4, v4);
        geneve.geneve_options = &options;
        geneve.vlan = Some(100);
        assert_eq!(tunnel_overhead(&geneve), Ok(50 + 12));
        assert_fills_the_underlay_mtu(&geneve, "Geneve with a 12-byte option over IPv4 on VLAN 100");
    }
}

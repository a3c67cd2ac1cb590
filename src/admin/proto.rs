//! The admin socket's wire protocol (setup side): one JSON request per connection, one JSON
//! response, each on a single line. Shared by the agent (`ferry run`), the CLI (`ferry status`,
//! `routes`, `stats`) and the CNI plugin (`ferry-cni`).
//!
//! ```text
//! -> {"cmd":"info"}
//! <- {"ok":true,"info":{...}}
//! -> {"cmd":"pod_add","pod":{...}}
//! <- {"ok":false,"error":"host interface fy3a9c... does not exist"}
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// What a CNI plugin needs to wire a pod on this node.
    Info,
    /// The agent's health and configuration.
    Status,
    /// The forwarding table the workers use now.
    Routes,
    /// Counters: per port and per drop reason, with rates over the last second.
    Stats,
    /// Tracked connections matching the filter (every field optional).
    Conntrack {
        /// Only entries with this address as source, destination or translation.
        #[serde(default)]
        addr: Option<std::net::IpAddr>,
        /// Only entries with this port as source, destination or translation port.
        #[serde(default)]
        port: Option<u16>,
        /// Only this IP protocol (6 TCP, 17 UDP).
        #[serde(default)]
        proto: Option<u8>,
    },
    /// The NetworkPolicy rules compiled for this node's pods (all, or the pod named
    /// `namespace/name` or `name`).
    Policy {
        /// Only this pod.
        #[serde(default)]
        pod: Option<String>,
    },
    /// Flow and drop events (newest last) matching the filter.
    Flows {
        /// Which events.
        #[serde(default)]
        filter: FlowFilter,
        /// Only events after this sequence number (`--follow` passes the last it got).
        #[serde(default)]
        after: Option<u64>,
        /// At most this many (the newest).
        #[serde(default = "default_flow_limit")]
        limit: usize,
    },
    /// `ferry trace`, the source node's half: resolve `src` and `dst` (pod `namespace/name`,
    /// Service `namespace/name`, node name, or address) and run a synthetic packet through this
    /// node's pipeline in trace mode. Answered with a [`TraceHalf`].
    Trace {
        /// The sender.
        src: String,
        /// The receiver.
        dst: String,
        /// `tcp`, `udp` or `icmp`.
        proto: TraceProto,
        /// The destination port (TCP, UDP; a Service's port when `dst` names a Service).
        #[serde(default)]
        port: Option<u16>,
        /// Simulate the marked packet `ferry trace --inject` sends with this nonce (its payload
        /// and source port), so that the simulation and the real packet are the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u32>,
    },
    /// `ferry trace --inject`, the source node's real half: the packet [`Request::Trace`] with
    /// the same nonce simulates, handed to a worker as if the source's port had received it and
    /// forwarded for real; answered with the worker's record as a [`TraceHalf`].
    TraceInject {
        /// The sender.
        src: String,
        /// The receiver.
        dst: String,
        /// `tcp`, `udp` or `icmp`.
        proto: TraceProto,
        /// The destination port.
        #[serde(default)]
        port: Option<u16>,
        /// The trace mark's nonce.
        nonce: u32,
    },
    /// `ferry trace --inject`: watch this node's uplink for the packet marked with `nonce` for
    /// `timeout_ms` (at most 10 s). Answered once every worker watches.
    TraceWatch {
        /// The trace mark's nonce.
        nonce: u32,
        /// How long to watch.
        timeout_ms: u64,
    },
    /// `ferry trace --inject`, the destination node's real half: the record of the packet
    /// [`Request::TraceWatch`] watched for, waiting up to `timeout_ms` for it. Answered with a
    /// [`TraceHalf`].
    TraceCollect {
        /// The trace mark's nonce.
        nonce: u32,
        /// How long to wait.
        timeout_ms: u64,
    },
    /// `ferry trace`: what a name (pod, Service, node, address) resolves to in this agent's model.
    /// Answered with a [`TraceEndpoint`].
    TraceResolve {
        /// The name.
        name: String,
        /// The transport (picks a Service's port).
        proto: TraceProto,
        /// The port (picks a Service's port).
        #[serde(default)]
        port: Option<u16>,
    },
    /// `ferry trace`, the destination node's half: the encapsulated frame the source node's
    /// trace produced, run through this node's pipeline as if it came in on the uplink.
    TraceDeliver {
        /// The frame, in hex.
        frame: String,
    },
    /// Attach a pod's host-side interface and register the pod (idempotent for the same pod).
    PodAdd {
        /// The pod.
        pod: PodSpec,
    },
    /// Forget a pod and detach its interface (idempotent: an unknown pod is not an error).
    PodDel {
        /// [`PodSpec::id`] of the pod.
        id: String,
    },
    /// Whether the agent has this pod registered and attached, as it was added.
    PodCheck {
        /// The pod as the plugin expects it.
        pod: PodSpec,
    },
}

/// What kind of interface a pod gets: the agent decides (`dataplane.pod_port`), and tells the CNI
/// plugin in [`NodeInfo::pod_port`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodPort {
    /// A veth pair: the pod's end in its namespace, the host end in the node's, where ferry
    /// attaches an AF_XDP socket per worker behind its pod XDP program.
    #[default]
    Veth,
    /// A persistent multi-queue tap inside the pod's namespace (the pod's own interface), one queue
    /// per worker opened by the agent, with virtio-net headers: super-packets cross it whole.
    Tap,
}

impl PodPort {
    /// `veth` or `tap`.
    pub fn name(self) -> &'static str {
        match self {
            PodPort::Veth => "veth",
            PodPort::Tap => "tap",
        }
    }
}

/// A pod as the CNI plugin wired it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Stable identity: `<CNI_CONTAINERID>/<CNI_IFNAME>`.
    pub id: String,
    /// The pod's network namespace path. The agent enters it only for a tap pod, to open the
    /// tap's queues.
    pub netns: String,
    /// A veth pod: the host-side veth, in the agent's namespace. A tap pod: the tap's name inside
    /// the pod's namespace (`netns`).
    pub host_ifname: String,
    /// The kind of interface (absent in records of agents before taps: a veth).
    #[serde(default)]
    pub kind: PodPort,
    /// The pod's own interface MAC (`eth0` inside the pod), `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The pod's addresses (no prefix length).
    pub addrs: Vec<IpAddr>,
    /// The pod's Kubernetes namespace (`K8S_POD_NAMESPACE` in `CNI_ARGS`), when the runtime gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's Kubernetes name (`K8S_POD_NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl NodeInfo {
    /// The MTU of a pod's host-side interface.
    pub fn host_mtu(&self) -> u32 {
        self.underlay_mtu.unwrap_or(self.mtu).max(self.mtu)
    }
}

/// The agent's answer: `{"ok":true, ...payload}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For [`Request::Info`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<NodeInfo>,
    /// The request's answer, one of this module's types: [`Status`], [`Routes`], [`Stats`],
    /// [`ConntrackList`], [`PodRemoved`] (see [`Request`]). Built with
    /// [`Response::with`] and read with [`Response::decode`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    /// A success without payload.
    pub fn ok() -> Self {
        Response { ok: true, error: None, info: None, data: None }
    }

    /// A success carrying `payload` (one of this module's answer types).
    pub fn with<T: Serialize>(payload: &T) -> Self {
        match serde_json::to_value(payload) {
            Ok(v) => Response { data: Some(v), ..Response::ok() },
            Err(e) => Response::err(format!("encoding the answer: {e}")),
        }
    }

    /// The payload as the answer type `T`.
    ///
    /// # Errors
    /// A failed request (its error), a missing payload, or one that is not a `T` (an agent of
    /// another version).
    pub fn decode<T: DeserializeOwned>(self) -> Result<T, String> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| "the agent refused without saying why".into()));
        }
        let data = self.data.ok_or("the agent's answer carries no payload")?;
        serde_json::from_value(data).map_err(|e| format!("the agent's answer is not what this ferry expects: {e}"))
    }

    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Response { ok: false, error: Some(error.into()), info: None, data: None }
    }
}

/// What a CNI plugin needs to wire a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name.
    pub node_name: String,
    /// This node's pod CIDRs (IPAM ranges).
    pub pod_cidrs: Vec<IpNet>,
    /// The pods' IPv4 gateway (answered by ferry; never allocated to a pod).
    pub gateway_v4: Option<IpAddr>,
    /// The pods' IPv6 gateway.
    pub gateway_v6: Option<IpAddr>,
    /// The MAC to give every pod's host-side interface (the gateway's MAC).
    pub gateway_mac: String,
    /// The pods' MTU: the underlay MTU minus the tunnel's overhead.
    pub mtu: u32,
    /// The MTU for a pod's host-side interface: the underlay's, so that a frame from a pod whose
    /// MTU was raised reaches ferry, which answers it with ICMP "fragmentation needed" (a veth
    /// drops frames above the receiving end's MTU silently). `None`: the pods' MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mtu: Option<u32>,
    /// Queues each pod veth or tap needs: one per worker.
    pub queues: u32,
    /// The kind of interface to give pods (an agent before taps answers without it: veth).
    #[serde(default)]
    pub pod_port: PodPort,
    /// Flow offload is on (`dataplane.offload = "tc"`): a veth pod keeps its checksum and
    /// segmentation offloads (no AF_XDP socket reads its frames; they reach ferry with their
    /// metadata through a tap).
    #[serde(default)]
    pub offload: bool,
    /// Where host-local IPAM keeps this node's allocations.
    pub ipam_data_dir: String,
}

/// What the agent resolved at startup (in [`Status::node`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The node's name.
    pub node_name: String,
    /// The underlay interface.
    pub underlay_if: String,
    /// Its address.
    pub underlay_addr: IpAddr,
    /// Its MAC.
    pub underlay_mac: String,
    /// Its MTU.
    pub underlay_mtu: u32,
    /// `vxlan` or `geneve`.
    pub tunnel: String,
    /// The VNI.
    pub vni: u32,
    /// The tunnel's UDP port.
    pub tunnel_port: u16,
    /// This node's VTEP MAC.
    pub vtep_mac: String,
    /// The cluster's pod networks.
    pub cluster_cidrs: Vec<IpNet>,
    /// This node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// The pods' IPv4 gateway.
    pub gateway_v4: Option<std::net::Ipv4Addr>,
    /// The pods' IPv6 gateway.
    pub gateway_v6: Option<std::net::Ipv6Addr>,
    /// The gateway's MAC.
    pub gateway_mac: String,
    /// The host port's kernel end.
    pub host_if: Option<String>,
    /// The node's IPv4 overlay address.
    pub host_addr: Option<std::net::Ipv4Addr>,
    /// The node's IPv6 overlay address.
    pub host_addr6: Option<std::net::Ipv6Addr>,
    /// The pods' MTU.
    pub pod_mtu: u32,
    /// The kind of interface pods get (`auto` resolved).
    pub pod_port: PodPort,
    /// Flow offload to TC programs (`dataplane.offload = "tc"`).
    #[serde(default)]
    pub offload: bool,
    /// Worker threads.
    pub workers: u32,
    /// `adaptive` or `busy`.
    pub poll: String,
    /// Route sources: `static`, `etcd`, `kube`.
    pub sources: Vec<String>,
    /// The Prometheus endpoint, if on.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where host-local IPAM keeps its allocations.
    pub ipam_data_dir: String,
}

/// A port as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// The interface.
    pub ifname: String,
    /// `uplink`, `host` or `pod`.
    pub kind: String,
    /// What ferry moves the port's frames through: `af_xdp` or `tap`.
    pub io: String,
    /// The pod's id, for pod ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The addresses behind the port.
    pub addrs: Vec<IpAddr>,
    /// XDP attach mode.
    pub xdp_mode: String,
}

/// The forwarding tables in brief (in [`Status::tables`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablesSummary {
    /// The snapshot's generation.
    pub generation: u64,
    /// Remote nodes in the desired state.
    pub remote_nodes: usize,
    /// Local pods (and the host port).
    pub local_endpoints: usize,
    /// Distinct underlay next hops.
    pub next_hops: usize,
}

/// A registered pod (in [`Status::pods`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEntry {
    /// [`PodSpec::id`].
    pub id: String,
    /// Its Kubernetes namespace, when the CNI runtime said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its Kubernetes name, when the CNI runtime said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// veth or tap.
    pub kind: PodPort,
    /// The interface.
    pub ifname: String,
    /// Its network namespace.
    pub netns: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Its MAC.
    pub mac: String,
    /// Its port id.
    pub port: u16,
}

/// A node the forwarding tables could not build, left out of them (in [`Status::skipped_nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedNode {
    /// The node.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Ready to carry traffic.
    pub ready: bool,
    /// The agent's main loop goes round.
    pub live: bool,
    /// Why not ready.
    pub not_ready_because: Option<String>,
    /// What the agent resolved at startup.
    pub node: NodeSummary,
    /// Seconds since the agent started.
    pub uptime_seconds: f64,
    /// ferry's version.
    pub version: String,
    /// The tables in brief.
    pub tables: TablesSummary,
    /// Registered pods.
    pub pods: Vec<PodEntry>,
    /// Ports by id.
    pub ports: BTreeMap<u16, PortInfo>,
    /// Nodes left out of the tables, and why.
    pub skipped_nodes: Vec<SkippedNode>,
    /// Flow offload, when on (`dataplane.offload = "tc"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadStatus>,
}

/// Flow offload's state (in [`Status::offload`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadStatus {
    /// What the TC programs did, by name (encap, local, decap, train, error, no_tap, to_pod).
    pub programs: BTreeMap<String, u64>,
    /// Flows offered and written; offers refused (budget spent, map full).
    pub offered: u64,
    /// Offers refused.
    pub refused: u64,
    /// Entries removed because their decision changed (a route or a policy) or they went idle.
    pub removed: u64,
    /// The entries.
    pub flows: Vec<OffloadFlow>,
}

/// One offloaded flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadFlow {
    /// encap, local or decap.
    pub action: String,
    /// tcp or udp.
    #[serde(default)]
    pub proto: String,
    /// Source address.
    pub src: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Packets (super-packets) the kernel moved.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// A service's translation of its packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<OffloadRewrite>,
    /// What the programs saw of the connection's end in this direction: `fin`, `rst` (or both, as
    /// `fin rst`); the entry goes once quiet for 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<String>,
}

/// The translation of one end of an offloaded flow (a service's connection), in [`OffloadFlow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadRewrite {
    /// `dst` (a client's packets: the backend) or `src` (a backend's replies: the service).
    pub end: String,
    /// The new address of that end.
    pub addr: IpAddr,
    /// And its new port.
    pub port: u16,
}

/// A remote node's next hop state (in [`RemoteRoute::next_hop`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHopState {
    /// `resolved`, `unresolved` or `overridden`.
    pub state: String,
    /// The underlay MAC, when resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mac: Option<String>,
}

/// A remote node's route (in [`Routes::remote`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRoute {
    /// The node.
    pub node: String,
    /// Its pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Its underlay address.
    pub underlay: IpAddr,
    /// Its VTEP MAC.
    pub vtep_mac: String,
    /// The VNI.
    pub vni: u32,
    /// `vxlan` or `geneve`.
    pub tunnel: String,
    /// The tunnel's UDP port.
    pub port: u16,
    /// The underlay next hop; `None` for a node without a pod CIDR.
    pub next_hop: Option<NextHopState>,
}

/// A local endpoint (in [`Routes::local`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRoute {
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Its MAC.
    pub mac: String,
    /// Its port.
    pub port: u16,
    /// The port's interface.
    pub ifname: Option<String>,
    /// The pod's id.
    pub pod: Option<String>,
}

/// The answer to [`Request::Routes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// The snapshot's generation.
    pub generation: u64,
    /// Remote nodes.
    pub remote: Vec<RemoteRoute>,
    /// Local endpoints.
    pub local: Vec<LocalRoute>,
    /// This node's own CIDRs (dropped where no pod is).
    pub blackholes: Vec<IpNet>,
}

/// The AF_XDP socket's own drop counters (in [`PortCounters::socket_drops`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketDrops {
    /// Receive ring full.
    pub rx_ring_full: u64,
    /// No free frame (part of `rx_dropped`).
    pub rx_no_frame: u64,
    /// Dropped.
    pub rx_dropped: u64,
    /// Invalid descriptors.
    pub invalid_descs: u64,
}

/// One port's counters and rates (in [`Stats::ports`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortCounters {
    /// The port id.
    pub port: u16,
    /// Its interface.
    pub ifname: String,
    /// `uplink`, `host` or `pod`.
    pub kind: String,
    /// The pod's id.
    #[serde(default)]
    pub pod: Option<String>,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Received per second.
    pub rx_pps: f64,
    /// Sent per second.
    pub tx_pps: f64,
    /// Received bits per second.
    pub rx_bps: f64,
    /// Sent bits per second.
    pub tx_bps: f64,
    /// Frames the kernel dropped before the worker saw them (AF_XDP statistics).
    pub socket_drops: SocketDrops,
    /// Their sum (`rx_no_frame` is part of `rx_dropped`, not added).
    pub socket_drops_total: u64,
}

/// The answer to [`Request::Stats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds between the two samples the rates come from.
    #[serde(default)]
    pub interval_seconds: f64,
    /// Per port.
    pub ports: Vec<PortCounters>,
    /// Drops by reason name.
    pub drops: BTreeMap<String, u64>,
    /// Drops per second by reason name.
    #[serde(default)]
    pub drop_rates: BTreeMap<String, f64>,
    /// All drops.
    #[serde(default)]
    pub total_drops: u64,
    /// ICMP errors sent.
    #[serde(default)]
    pub icmp_errors: u64,
    /// Frames freed twice and refused (a bug if not 0).
    #[serde(default)]
    pub double_frees: u64,
    /// Packets moved to make room for the tunnel headers.
    #[serde(default)]
    pub headroom_moves: u64,
    /// The workers' frames, as of their last publication.
    #[serde(default)]
    pub frames: FrameStats,
}

/// Where the workers' frames are (summed): free, held by ports, and neither (leaked: 0 unless
/// ferry has a bug).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameStats {
    /// All frames of the workers' memory.
    pub total: u64,
    /// On the workers' free lists.
    pub free: u64,
    /// Held by ports: lent to the kernel's rings, queued to send, a tap's or socket's buffers.
    pub held: u64,
    /// Neither free nor held.
    pub unaccounted: u64,
}

/// A tracked connection (in [`ConntrackList::entries`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackEntry {
    /// IP protocol.
    pub proto: u8,
    /// Source.
    pub src: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// `original` or `reply`.
    pub direction: String,
    /// `destination` or `source`: what the translation rewrites.
    pub rewrite: String,
    /// The translation's address.
    pub nat: IpAddr,
    /// The translation's port.
    pub nat_port: u16,
    /// The connection's state.
    pub state: String,
    /// Milliseconds since last seen.
    pub idle_ms: u64,
}

/// The answer to [`Request::Conntrack`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackList {
    /// Slots in the table.
    pub capacity: usize,
    /// Bytes per slot.
    pub entry_bytes: usize,
    /// Entries inserted since start.
    pub inserts: u64,
    /// Entries evicted since start.
    pub evictions: u64,
    /// The matching entries.
    pub entries: Vec<ConntrackEntry>,
}

/// One compiled rule of a pod (in [`PolicyPod::rules`]): where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRuleEntry {
    /// `Ingress` or `Egress`.
    pub direction: String,
    /// The policy, `namespace/name`.
    pub policy: String,
    /// The rule's index in the policy's `ingress` or `egress` list (`None`: the policy has no rule
    /// in that direction: it isolates the pod and allows nothing).
    pub rule: Option<usize>,
    /// The peers, as text.
    pub peers: String,
    /// The ports, as text.
    pub ports: String,
}

impl From<&ferry_tables::policy::RuleOrigin> for PolicyRuleEntry {
    fn from(o: &ferry_tables::policy::RuleOrigin) -> Self {
        PolicyRuleEntry {
            direction: o.direction.name().into(),
            policy: o.policy.clone(),
            rule: o.rule,
            peers: o.peers.clone(),
            ports: o.ports.clone(),
        }
    }
}

/// A local pod some NetworkPolicy selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPod {
    /// `namespace/name`.
    pub pod: String,
    /// Whether a policy selects it for ingress (only its rules' traffic comes in).
    pub ingress_isolated: bool,
    /// Whether a policy selects it for egress.
    pub egress_isolated: bool,
    /// Its rules, policy by policy.
    pub rules: Vec<PolicyRuleEntry>,
}

/// The answer to [`Request::Policy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyList {
    /// The policy tables' generation (0: no policy compiled yet).
    pub generation: u64,
    /// This node's pods that policies select (a pod not listed is open both ways).
    pub pods: Vec<PolicyPod>,
}

/// The answer to [`Request::PodDel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRemoved {
    /// Whether the agent knew the pod.
    pub removed: bool,
}

/// The answer to [`Request::PodCheck`] when the pod is there (a pod that is not is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodChecked {
    /// Whether the agent has the pod registered, attached and routed.
    pub registered: bool,
}

fn default_flow_limit() -> usize {
    20
}

/// Which flow events to return (every field optional; all given must match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// A pod at either end: `namespace/name`, or a name in any namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// A namespace at either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The node that recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `forwarded`, `replied` or `dropped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// A drop reason's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// IP protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    /// A port at either end (or the service's or backend's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Only events last seen at or after this Unix time (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

impl FlowFilter {
    /// Whether `e` passes.
    pub fn matches(&self, e: &FlowEvent) -> bool {
        let pod = |want: &str, p: &Option<String>| {
            p.as_deref().is_some_and(|p| p == want || (!want.contains('/') && p.rsplit('/').next() == Some(want)))
        };
        let ns = |want: &str, p: &Option<String>| p.as_deref().is_some_and(|p| p.split('/').next() == Some(want));
        let svc_ports = e.service.as_ref().map(|s| [s.port, s.backend_port]);
        self.pod.as_deref().is_none_or(|w| pod(w, &e.src_pod) || pod(w, &e.dst_pod))
            && self.namespace.as_deref().is_none_or(|w| ns(w, &e.src_pod) || ns(w, &e.dst_pod))
            && self.node.as_deref().is_none_or(|w| e.node == w)
            && self.verdict.as_deref().is_none_or(|w| e.verdict == w)
            && self.reason.as_deref().is_none_or(|w| e.reason.as_deref() == Some(w))
            && self.proto.is_none_or(|w| e.proto == Some(w))
            && self
                .port
                .is_none_or(|w| e.sport == Some(w) || e.dport == Some(w) || svc_ports.is_some_and(|p| p.contains(&w)))
            && self.since_ms.is_none_or(|w| e.time * 1000.0 >= w as f64)
    }
}

/// The Service a flow was sent to and the backend chosen (in [`FlowEvent::service`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHit {
    /// The VIP.
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The backend chosen.
    pub backend: IpAddr,
    /// Its port.
    pub backend_port: u16,
}

/// One flow record's update, or one dropped packet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// Increasing per agent.
    pub seq: u64,
    /// `flow` (a flow's record) or `drop` (one dropped packet, with its first bytes).
    pub kind: String,
    /// Last seen, Unix seconds.
    pub time: f64,
    /// First seen, Unix seconds.
    pub first_seen: f64,
    /// The node.
    pub node: String,
    /// IP protocol (a drop event of a frame that was not IP has none).
    pub proto: Option<u8>,
    /// Source address.
    pub src: Option<IpAddr>,
    /// Source port.
    pub sport: Option<u16>,
    /// Destination address (a Service's VIP when translated: see `service`).
    pub dst: Option<IpAddr>,
    /// Destination port.
    pub dport: Option<u16>,
    /// The source pod, `namespace/name` (or the pod's id when the runtime did not name it).
    pub src_pod: Option<String>,
    /// The destination pod (the backend's, when translated).
    pub dst_pod: Option<String>,
    /// The port it came in on, and its interface.
    pub in_port: u16,
    /// The interface.
    pub in_if: Option<String>,
    /// The port it went out on.
    pub out_port: Option<u16>,
    /// Its interface.
    pub out_if: Option<String>,
    /// `forwarded`, `replied` or `dropped`.
    pub verdict: String,
    /// The drop reason, when dropped.
    pub reason: Option<String>,
    /// The stage that decided.
    pub stage: String,
    /// Packets so far (1 for a drop event).
    pub packets: u64,
    /// Bytes so far.
    pub bytes: u64,
    /// TCP flags seen, e.g. `SYN,ACK`.
    pub tcp_flags: String,
    /// The Service and backend, when the service stage translated it.
    pub service: Option<ServiceHit>,
    /// The policy that allowed or denied it (none until a policy stage fills it).
    pub policy: Option<String>,
    /// A drop event's first bytes (up to 128), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<String>,
    /// The worker that recorded it.
    pub worker: u16,
}

/// The answer to [`Request::Flows`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    /// Whether flow records are on (`dataplane.flows`).
    pub enabled: bool,
    /// The matching events, oldest first.
    pub events: Vec<FlowEvent>,
    /// The newest sequence number the agent has (pass it as `after` to follow).
    pub last_seq: u64,
    /// Flow records the workers could not export (their ring was full).
    pub lost_records: u64,
    /// Drop events the workers could not export.
    pub lost_drop_events: u64,
    /// Drop events left out by the per-reason rate limit.
    pub rate_limited_drop_events: u64,
    /// Events that fell out of the agent's window before this request.
    pub aged_out: u64,
}

/// The transport of a traced packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceProto {
    /// A TCP SYN.
    #[default]
    Tcp,
    /// A UDP datagram.
    Udp,
    /// An ICMP echo request.
    Icmp,
}

impl TraceProto {
    /// `TCP`, `UDP` or `ICMP`.
    pub fn name(self) -> &'static str {
        match self {
            TraceProto::Tcp => "TCP",
            TraceProto::Udp => "UDP",
            TraceProto::Icmp => "ICMP",
        }
    }
}

/// What a name given to `ferry trace` resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEndpoint {
    /// As given.
    pub input: String,
    /// `pod`, `service`, `node` or `address`.
    pub kind: String,
    /// The pod's, Service's or node's name (`namespace/name` for pods; a Service's port name too).
    pub name: Option<String>,
    /// The address the packet uses (a Service's VIP, a node's overlay address).
    pub addr: IpAddr,
    /// A Service's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The node the address lives on, when known.
    pub node: Option<String>,
}

/// One stage's decision in a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStage {
    /// The stage (`access_port`, `classify`, `ip_checks`, `service`, `policy`, `route`, `encap`,
    /// `decap`, `decap_checks`, `deliver`, `host_exit`, ...).
    pub stage: String,
    /// `ok`, `allowed`, `denied`, `translated`, `dropped`, ...
    pub result: String,
    /// What it saw and why, for people.
    pub detail: String,
    /// The policy verdict's reasons (policy stage only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<TracePolicy>,
    /// The Service's choice (service stage only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<TraceService>,
}

/// The policy stage's reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracePolicy {
    /// `allow`, `deny_egress` or `deny_ingress`.
    pub verdict: String,
    /// Allowed without rules, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt: Option<String>,
    /// The source pod's egress rules, when policies isolate it for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<TracePolicySide>,
    /// The destination pod's ingress rules, when policies isolate it for ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<TracePolicySide>,
}

/// One direction of [`TracePolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracePolicySide {
    /// The pod whose rules these are.
    pub pod: String,
    /// Whether they let the packet through.
    pub allowed: bool,
    /// Its rules in this direction (policy, rule index, peers, ports): every rule of every policy
    /// selecting the pod; with one rule, the one that decided.
    pub rules: Vec<PolicyRuleEntry>,
}

/// The service stage's choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceService {
    /// `namespace/name:port`.
    pub service: String,
    /// The VIP.
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The backend chosen.
    pub backend: Option<IpAddr>,
    /// Its port.
    pub backend_port: Option<u16>,
    /// `maglev`, `affinity` or `tracked`.
    pub pick: String,
    /// Why, for people.
    pub why: String,
}

/// One node's half of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHalf {
    /// The node that ran it.
    pub node: String,
    /// What `src` resolved to (source half only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<TraceEndpoint>,
    /// What `dst` resolved to (source half only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<TraceEndpoint>,
    /// The source lives on another node: ask that node's agent (nothing was traced here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_on: Option<String>,
    /// The stages, in order.
    pub stages: Vec<TraceStage>,
    /// `delivered`, `forwarded` (encapsulated to another node), `left` (out through the node's
    /// kernel), `replied` or `dropped`.
    pub verdict: String,
    /// The drop reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The stage that decided.
    pub stage: String,
    /// The verdict in one sentence.
    pub summary: String,
    /// Encapsulated toward this node (its agent runs the other half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_node: Option<String>,
    /// The encapsulated frame, in hex, for the next node's half.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<String>,
}

/// `ferry trace --inject --json`: the simulation of the marked packet, each node's record of the
/// real one, and whether they agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceInjectReport {
    /// The trace mark's nonce.
    pub nonce: u32,
    /// The simulation (what `ferry trace` says), of the same packet.
    pub simulated: TraceReport,
    /// Each node's record of the real packet, in order (the source's, then the destination's
    /// when the packet was encapsulated and its record came).
    pub real: Vec<TraceHalf>,
    /// Whether the real packet reached its destination.
    pub delivered: bool,
    /// The real packet's fate in one sentence.
    pub verdict: String,
    /// Whether the simulation and the real packet agree: the same nodes, the same stages with the
    /// same results, the same verdict, drop reason and deciding stage, the same next node and
    /// Service backend.
    pub agree: bool,
    /// Where they differ, for people (empty when they agree).
    pub differences: Vec<String>,
}

/// A whole trace as `ferry trace --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    /// The sender.
    pub src: TraceEndpoint,
    /// The receiver.
    pub dst: TraceEndpoint,
    /// The transport.
    pub proto: TraceProto,
    /// The destination port.
    pub port: Option<u16>,
    /// Each node's half, in order.
    pub halves: Vec<TraceHalf>,
    /// Whether the packet reached its destination.
    pub delivered: bool,
    /// The verdict in one sentence.
    pub verdict: String,
}

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
    /// For [`Request::Status`], [`Request::Routes`], [`Request::Stats`], [`Request::PodCheck`]:
    /// free-form JSON documented with each command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    /// A success without payload.
    pub fn ok() -> Self {
        Response { ok: true, error: None, info: None, data: None }
    }

    /// A success carrying `data`.
    pub fn data(data: serde_json::Value) -> Self {
        Response { data: Some(data), ..Response::ok() }
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
    /// Where host-local IPAM keeps this node's allocations.
    pub ipam_data_dir: String,
}

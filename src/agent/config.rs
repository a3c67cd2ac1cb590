//! `ferry run`'s configuration file (setup side): TOML, every key checked before anything starts.
//! An unknown key, a missing one or a bad value is an error naming the key.
//!
//! ```toml
//! node_name = "n1"                 # default: $NODE_NAME (the DaemonSet's downward API)
//! [underlay]
//! interface = "ul0"               # required: the uplink
//! address = "192.168.100.1"       # default: the interface's first IPv4 address; or one of each
//!                                 # family, ["192.168.100.1", "fd00:100::1"]: tunnels accepted on
//!                                 # both, both announced
//! prefer_family = "ipv4"          # ipv4 | ipv6: the family tunnels use to a node that has both
//!                                 # (when this node has both too); else the family they share
//! mtu = 1500                      # default: the interface's MTU
//! [tunnel]
//! kind = "vxlan"                  # vxlan | geneve
//! vni = 1
//! port = 4789                     # default: 4789 (VXLAN) / 6081 (Geneve)
//! vtep_mac = "02:fe:c0:a8:64:01"  # default: 02:fe + the underlay IPv4 address
//! verify_udp_checksum = true      # verify non-zero outer UDP checksums
//! udp6_zero_checksum_rx = false   # accept zero outer UDP checksums over IPv6 (RFC 6935)
//! [pods]
//! cluster_cidrs = ["10.244.0.0/16"]   # required: traffic to these goes through ferry
//! service_cidrs = ["10.96.0.0/12"]    # optional: ClusterIPs; traffic to these goes through ferry too
//! pod_cidrs = ["10.244.1.0/24"]       # default: this node's entry in the route source
//! gateway_mac = "02:fe:ff:ff:ff:ff"
//! [host]
//! interface = "ferry0"            # the node's own port into the overlay ("" for none)
//! [dataplane]
//! workers = 1
//! cores = []                      # pin worker i to cores[i]
//! poll = "adaptive"               # adaptive | busy
//! frames = 32768                  # UMEM frames per worker (2 KiB each)
//! max_ports = 256                 # ports (pods + uplink + host) per worker
//! xdp_mode = "auto"               # auto | native | generic
//! uplink_port = "afxdp"           # afxdp | udp | auto: the uplink as AF_XDP or a UDP socket (UDP_SEGMENT/GRO)
//! pod_port = "auto"               # veth | tap | auto (tap when /dev/net/tun opens)
//! busy_poll = false               # workers run their devices' receive (NAPI) themselves
//! flows = false                   # flow records (`ferry flows`, flow metrics); off: see README "Flows"
//! flow_slots = 4096               # flows each worker's table holds (a power of two, 64..=1048576)
//! conntrack_slots = 262144        # the connection-tracking table shared by the workers (64 bytes a slot;
//!                                 # a translated connection takes two; a power of two, 64..=16777216)
//! offload = "auto"                # off | tc | auto: TCP and UDP flows moved by TC programs (veth pods, UDP
//!                                 # uplink); auto: tc where the uplink resolves to udp and pod_port is not
//!                                 # tap, if the kernel loads the programs (pod_port auto then means veth)
//! busy_poll_budget = 64           # packets per busy-poll round
//! napi_defer_hard_irqs = 2        # set on each port's device while busy polling
//! gro_flush_timeout_us = 200      # likewise (the device's gro_flush_timeout)
//! [admin]
//! socket = "/run/ferry/ferry.sock"
//! state_dir = "/run/ferry"
//! [control]
//! static_file = "/etc/ferry/nodes.toml"   # and/or etcd_endpoints = [...], kube = true
//! metrics_addr = "127.0.0.1:9100"   # also /healthz and /readyz
//! [web]
//! address = "127.0.0.1:9180"        # the live web view and its API (absent: off)
//! token_file = "/etc/ferry/web-token" # required unless address is loopback: a bearer token for
//!                                   # clients other than localhost, and for fetching the other
//!                                   # nodes' views (every node serves on the same port)
//! [uninstall]
//! daemonset = "ferry-system/ferry"  # when stopped while this DaemonSet is being deleted: clean the
//!                                   # node ("" or absent: never)
//! cni_conf = "/host/etc/cni/net.d/10-ferry.conflist"   # removed then, and by `ferry uninstall`
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_control::{ControlConfig, EtcdConfig, KubeAuth, KubeConfig};
use ferry_dataplane::port::xsk::BusyPoll;
use ferry_dataplane::xdp::XdpMode;
use ferry_encap::{MacAddr, TunnelKind};
use ipnet::IpNet;
use serde::Deserialize;

use crate::admin::PodPort;

/// Merges `top` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The environment variable naming the node when the file does not (`node_name`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, missing key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the line and the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`tunnel.vni`).
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node_name: Option<String>,
    underlay: UnderlayFile,
    #[serde(default)]
    tunnel: TunnelFile,
    pods: PodsFile,
    #[serde(default)]
    host: HostFile,
    #[serde(default)]
    dataplane: DataplaneFile,
    #[serde(default)]
    admin: AdminFile,
    control: ControlFile,
    #[serde(default)]
    uninstall: UninstallFile,
    #[serde(default)]
    web: WebFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebFile {
    address: Option<SocketAddr>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UninstallFile {
    daemonset: Option<String>,
    cni_conf: Option<PathBuf>,
}

/// What removing ferry from a node takes away, and when the agent does it by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uninstall {
    /// The agent's own DaemonSet (`namespace`, `name`): when the agent stops and the API says it
    /// is being deleted, the agent cleans the node (see `ferry_control::deployment`).
    pub daemonset: Option<(String, String)>,
    /// The CNI configuration list the DaemonSet's init step installed; removed on uninstall.
    pub cni_conf: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnderlayFile {
    interface: String,
    address: Option<OneOrTwo>,
    #[serde(default = "default_family")]
    prefer_family: String,
    mtu: Option<u32>,
}

fn default_family() -> String {
    "ipv4".into()
}

/// `underlay.address`: one address, or a list of one per family.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrTwo {
    One(IpAddr),
    List(Vec<IpAddr>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelFile {
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default = "default_vni")]
    vni: u32,
    port: Option<u16>,
    vtep_mac: Option<String>,
    #[serde(default = "yes")]
    verify_udp_checksum: bool,
    #[serde(default)]
    udp6_zero_checksum_rx: bool,
}

impl Default for TunnelFile {
    fn default() -> Self {
        TunnelFile {
            kind: default_kind(),
            vni: default_vni(),
            port: None,
            vtep_mac: None,
            verify_udp_checksum: true,
            udp6_zero_checksum_rx: false,
        }
    }
}

fn default_kind() -> String {
    "vxlan".into()
}
fn default_vni() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsFile {
    cluster_cidrs: Vec<String>,
    #[serde(default)]
    service_cidrs: Vec<String>,
    #[serde(default)]
    pod_cidrs: Vec<String>,
    gateway_mac: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    #[serde(default = "default_host_if")]
    interface: String,
}

impl Default for HostFile {
    fn default() -> Self {
        HostFile { interface: default_host_if() }
    }
}

fn default_host_if() -> String {
    "ferry0".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataplaneFile {
    #[serde(default = "one")]
    workers: u32,
    #[serde(default)]
    cores: Vec<usize>,
    #[serde(default = "default_poll")]
    poll: String,
    #[serde(default = "default_frames")]
    frames: u32,
    #[serde(default = "default_max_ports")]
    max_ports: u32,
    #[serde(default = "default_xdp_mode")]
    xdp_mode: String,
    #[serde(default = "default_uplink_port")]
    uplink_port: String,
    #[serde(default = "default_pod_port")]
    pod_port: String,
    #[serde(default)]
    busy_poll: bool,
    #[serde(default = "default_busy_poll_budget")]
    busy_poll_budget: u32,
    #[serde(default = "default_napi_defer_hard_irqs")]
    napi_defer_hard_irqs: u32,
    #[serde(default = "default_gro_flush_timeout_us")]
    gro_flush_timeout_us: u64,
    #[serde(default)]
    flows: bool,
    #[serde(default = "default_flow_slots")]
    flow_slots: u32,
    #[serde(default = "default_conntrack_slots")]
    conntrack_slots: u32,
    #[serde(default = "default_offload")]
    offload: String,
}

impl Default for DataplaneFile {
    fn default() -> Self {
        DataplaneFile {
            workers: 1,
            cores: Vec::new(),
            poll: default_poll(),
            frames: default_frames(),
            max_ports: default_max_ports(),
            xdp_mode: default_xdp_mode(),
            uplink_port: default_uplink_port(),
            pod_port: default_pod_port(),
            busy_poll: false,
            busy_poll_budget: default_busy_poll_budget(),
            napi_defer_hard_irqs: default_napi_defer_hard_irqs(),
            gro_flush_timeout_us: default_gro_flush_timeout_us(),
            flows: false,
            flow_slots: default_flow_slots(),
            conntrack_slots: default_conntrack_slots(),
            offload: default_offload(),
        }
    }
}

fn default_offload() -> String {
    "auto".into()
}

fn one() -> u32 {
    1
}
fn default_poll() -> String {
    "adaptive".into()
}
fn default_frames() -> u32 {
    32768
}
fn default_conntrack_slots() -> u32 {
    ferry_dataplane::conntrack::DEFAULT_SLOTS as u32
}
fn default_flow_slots() -> u32 {
    ferry_dataplane::flows::DEFAULT_SLOTS as u32
}
fn default_max_ports() -> u32 {
    256
}
fn default_xdp_mode() -> String {
    "auto".into()
}
fn default_uplink_port() -> String {
    "afxdp".into()
}
fn default_pod_port() -> String {
    "auto".into()
}
fn default_busy_poll_budget() -> u32 {
    BusyPoll::default().budget
}
fn default_napi_defer_hard_irqs() -> u32 {
    BusyPoll::default().defer_hard_irqs
}
fn default_gro_flush_timeout_us() -> u64 {
    BusyPoll::default().gro_flush_timeout_ns / 1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile { socket: default_socket(), state_dir: default_state_dir() }
    }
}

fn default_socket() -> PathBuf {
    crate::admin::DEFAULT_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    "/run/ferry".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    static_file: Option<PathBuf>,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    etcd_prefix: Option<String>,
    #[serde(default = "yes")]
    etcd_lease: bool,
    #[serde(default = "default_lease_ttl")]
    etcd_lease_ttl: u64,
    #[serde(default)]
    kube: bool,
    kubeconfig: Option<PathBuf>,
    kube_server: Option<String>,
    kube_token_file: Option<PathBuf>,
    kube_ca_file: Option<PathBuf>,
    #[serde(default)]
    kube_insecure: bool,
    #[serde(default = "yes")]
    kube_announce: bool,
    metrics_addr: Option<SocketAddr>,
}

fn yes() -> bool {
    true
}
fn default_lease_ttl() -> u64 {
    86_400
}

/// How workers wait for traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Spin while busy, sleep when idle.
    Adaptive,
    /// Never sleep (benchmarks; burns a core per worker).
    Busy,
}

/// The kind of port the uplink is (`dataplane.uplink_port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkPort {
    /// An AF_XDP socket per worker on the uplink interface, behind ferry's uplink XDP program.
    AfXdp,
    /// A kernel UDP socket per worker bound to the underlay address and the tunnel port, with
    /// `UDP_SEGMENT` and `UDP_GRO`; no XDP program on the uplink (IPv4 underlays only).
    Udp,
    /// `udp` when the underlay address is IPv4 and the uplink is a virtual device (no
    /// `/sys/class/net/IF/device`: veth, bridge), where AF_XDP runs in copy mode only; `afxdp`
    /// otherwise (a NIC, where AF_XDP may run zero-copy; an IPv6 underlay).
    Auto,
}

/// Whether flows are moved to TC programs (`dataplane.offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadChoice {
    /// Never.
    Off,
    /// Always; the agent does not start without it (needs veth pods and the UDP uplink).
    Tc,
    /// Where it can be: the uplink resolves to `udp`, `pod_port` is not `tap`, and the kernel
    /// loads the programs (else off, said once at start). `pod_port = "auto"` then means veth.
    Auto,
}

/// What kind of interface pods get (`dataplane.pod_port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPortChoice {
    /// Always this kind.
    Fixed(PodPort),
    /// A tap when this node can make one (`/dev/net/tun` opens read-write), else a veth.
    Auto,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// This node's name.
    pub node_name: String,
    /// The uplink interface.
    pub underlay_if: String,
    /// The underlay address, if given (else the interface's); IPv4 when two are given.
    pub underlay_addr: Option<IpAddr>,
    /// The IPv6 underlay address given beside an IPv4 `underlay_addr` (a node with both families).
    pub underlay_addr6: Option<Ipv6Addr>,
    /// To a node with both families (when this node has both too), tunnel over IPv6.
    pub prefer_ipv6: bool,
    /// The underlay MTU, if given (else the interface's).
    pub underlay_mtu: Option<u32>,
    /// Tunnel type.
    pub tunnel: TunnelKind,
    /// VNI.
    pub vni: u32,
    /// Tunnel UDP port.
    pub tunnel_port: u16,
    /// This node's VTEP MAC, if given (else derived from the underlay address).
    pub vtep_mac: Option<MacAddr>,
    /// Verify non-zero outer UDP checksums.
    pub verify_udp_checksum: bool,
    /// Accept zero outer UDP checksums over an IPv6 underlay.
    pub udp6_zero_checksum_rx: bool,
    /// Every pod network of the cluster.
    pub cluster_cidrs: Vec<IpNet>,
    /// The Service networks (ClusterIPs), which need not lie in the pod networks: a pod's packets
    /// to them are handed to ferry like packets to other pods, for the service stage.
    pub service_cidrs: Vec<IpNet>,
    /// This node's pod CIDRs, if given (else learned from the source).
    pub pod_cidrs: Vec<IpNet>,
    /// The pods' gateway MAC.
    pub gateway_mac: MacAddr,
    /// The node's own port into the overlay, if any.
    pub host_if: Option<String>,
    /// Worker threads.
    pub workers: u32,
    /// Cores to pin workers to.
    pub cores: Vec<usize>,
    /// Idle behaviour.
    pub poll: Poll,
    /// UMEM frames per worker.
    pub frames: u32,
    /// Port capacity per worker.
    pub max_ports: u32,
    /// Flow records: slots per worker's table, or `None` when off (`dataplane.flows`).
    pub flow_slots: Option<usize>,
    /// Connection-tracking slots (`dataplane.conntrack_slots`).
    pub conntrack_slots: usize,
    /// Flow offload to TC programs (`dataplane.offload`; needs veth pods and the UDP uplink).
    pub offload: OffloadChoice,
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// What kind of port the uplink is.
    pub uplink_port: UplinkPort,
    /// The kind of interface pods get.
    pub pod_port: PodPortChoice,
    /// Preferred busy polling on every port, if on.
    pub busy_poll: Option<BusyPoll>,
    /// What uninstalling removes, and whether the agent checks for its own deletion.
    pub uninstall: Uninstall,
    /// Admin socket path.
    pub socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// The control plane's configuration (node name and tunnel filled in).
    pub control: ControlConfig,
    /// The live web view, if on (`[web]`).
    pub web: Option<WebConfig>,
}

/// The live web view's settings (`[web]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// The bearer token's file (required unless `address` is loopback).
    pub token_file: Option<PathBuf>,
}

impl AgentConfig {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    /// Checks a configuration's text (`path` is for messages).
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(path, text, |k| std::env::var(k).ok())
    }

    /// [`parse`](Self::parse), reading the environment through `env` (`NODE_NAME`, when the file
    /// has no `node_name`: the DaemonSet sets it from the pod's `spec.nodeName`).
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn parse_with_env(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let f: File =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        Self::check(path, f, env)
    }

    /// Loads layered configuration files: each later file's keys replace the earlier ones' (tables
    /// merge key by key), so a node can run the cluster's shared file (the ConfigMap's ferry.toml)
    /// with a small file of its own on top. One file is [`load`](Self::load).
    ///
    /// # Errors
    /// [`ConfigError`]: a file that cannot be read or is not TOML names the file; a bad key in the
    /// merged result names the key and all the files.
    pub fn load_layers(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        match paths {
            [] => Err(ConfigError::Parse { path: PathBuf::new(), message: "no configuration file given".into() }),
            [one] => Self::load(one),
            _ => {
                let mut layers = Vec::new();
                for p in paths {
                    let text =
                        std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
                    layers.push((p.clone(), text));
                }
                Self::parse_layers(&layers, env)
            }
        }
    }

    /// [`load_layers`](Self::load_layers) on texts already read (`(path, text)`, earliest first).
    ///
    /// # Errors
    /// As [`load_layers`](Self::load_layers).
    pub fn parse_layers(
        layers: &[(PathBuf, String)],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut merged = toml::Table::new();
        for (path, text) in layers {
            let t: toml::Table =
                toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
            merge(&mut merged, t);
        }
        let names: Vec<String> = layers.iter().map(|(p, _)| p.display().to_string()).collect();
        let path = PathBuf::from(names.join(" + "));
        let f = File::deserialize(toml::Value::Table(merged))
            .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        Self::check(&path, f, env)
    }

    fn check(path: &Path, mut f: File, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::Invalid { path: path.to_owned(), key, reason };
        let node_name = match f.node_name.take() {
            Some(n) if n.is_empty() => return Err(bad("node_name", "must not be empty".into())),
            Some(n) => n,
            None => env(NODE_NAME_ENV).filter(|n| !n.is_empty()).ok_or_else(|| {
                bad(
                    "node_name",
                    format!("missing, and {NODE_NAME_ENV} is not set (set one: the DaemonSet sets {NODE_NAME_ENV} from spec.nodeName)"),
                )
            })?,
        };
        if f.underlay.interface.is_empty() || f.underlay.interface.len() > 15 {
            return Err(bad("underlay.interface", "must be an interface name of 1 to 15 characters".into()));
        }
        if let Some(m) = f.underlay.mtu
            && !(576..=65535).contains(&m)
        {
            return Err(bad("underlay.mtu", format!("{m} is outside 576..=65535")));
        }
        let tunnel = match f.tunnel.kind.as_str() {
            "vxlan" => TunnelKind::Vxlan,
            "geneve" => TunnelKind::Geneve,
            other => return Err(bad("tunnel.kind", format!("`{other}` is not one of vxlan, geneve"))),
        };
        if f.tunnel.vni >= 1 << 24 {
            return Err(bad("tunnel.vni", format!("{} does not fit in 24 bits", f.tunnel.vni)));
        }
        if f.tunnel.port == Some(0) {
            return Err(bad("tunnel.port", "must not be 0".into()));
        }
        let (underlay_addr, underlay_addr6) = match &f.underlay.address {
            None => (None, None),
            Some(OneOrTwo::One(a)) => (Some(*a), None),
            Some(OneOrTwo::List(l)) => {
                // IPv4 first, whichever order the file gives.
                let (a, b) = ferry_control::model::underlay_pair(l).map_err(|r| bad("underlay.address", r))?;
                let six = match b {
                    Some(IpAddr::V6(six)) => Some(six),
                    _ => None,
                };
                (Some(a), six)
            }
        };
        let prefer_ipv6 = match f.underlay.prefer_family.as_str() {
            "ipv4" => false,
            "ipv6" => true,
            other => return Err(bad("underlay.prefer_family", format!("`{other}` is not one of ipv4, ipv6"))),
        };
        let vtep_mac = match &f.tunnel.vtep_mac {
            None => None,
            Some(s) => Some(parse_unicast_mac(s).map_err(|r| bad("tunnel.vtep_mac", r))?),
        };
        let nets = |key: &'static str, list: &[String]| -> Result<Vec<IpNet>, ConfigError> {
            list.iter()
                .map(|s| s.parse::<IpNet>().map(|n| n.trunc()).map_err(|e| bad(key, format!("`{s}`: {e}"))))
                .collect()
        };
        let cluster_cidrs = nets("pods.cluster_cidrs", &f.pods.cluster_cidrs)?;
        if cluster_cidrs.is_empty() {
            return Err(bad("pods.cluster_cidrs", "give at least one network".into()));
        }
        let service_cidrs = nets("pods.service_cidrs", &f.pods.service_cidrs)?;
        let pod_cidrs = nets("pods.pod_cidrs", &f.pods.pod_cidrs)?;
        for p in &pod_cidrs {
            if let Some(s) = service_cidrs.iter().find(|s| s.contains(p) || p.contains(*s)) {
                return Err(bad("pods.service_cidrs", format!("{s} overlaps this node's pod CIDR {p}")));
            }
            if !cluster_cidrs.iter().any(|c| c.contains(p)) {
                return Err(bad("pods.pod_cidrs", format!("{p} is not inside any of pods.cluster_cidrs")));
            }
            if p.max_prefix_len() - p.prefix_len() < 2 {
                return Err(bad("pods.pod_cidrs", format!("{p} is too small for a gateway and pods")));
            }
        }
        let gateway_mac = match &f.pods.gateway_mac {
            None => MacAddr([0x02, 0xfe, 0xff, 0xff, 0xff, 0xff]),
            Some(s) => parse_unicast_mac(s).map_err(|r| bad("pods.gateway_mac", r))?,
        };
        let host_if = match f.host.interface.as_str() {
            "" => None,
            s if s.len() > 13 => {
                return Err(bad("host.interface", format!("`{s}` is longer than 13 characters")));
            }
            s => Some(s.to_owned()),
        };
        let d = &f.dataplane;
        if !(1..=64).contains(&d.workers) {
            return Err(bad("dataplane.workers", format!("{} is outside 1..=64", d.workers)));
        }
        if !d.cores.is_empty() && d.cores.len() != d.workers as usize {
            return Err(bad("dataplane.cores", format!("gives {} cores for {} workers", d.cores.len(), d.workers)));
        }
        let poll = match d.poll.as_str() {
            "adaptive" => Poll::Adaptive,
            "busy" => Poll::Busy,
            other => return Err(bad("dataplane.poll", format!("`{other}` is not one of adaptive, busy"))),
        };
        if !(4096..=1 << 20).contains(&d.frames) {
            return Err(bad("dataplane.frames", format!("{} is outside 4096..=1048576", d.frames)));
        }
        if !(64..=1 << 20).contains(&d.flow_slots) || !d.flow_slots.is_power_of_two() {
            return Err(bad("dataplane.flow_slots", format!("{} is not a power of two in 64..=1048576", d.flow_slots)));
        }
        if !(64..=1 << 24).contains(&d.conntrack_slots) || !d.conntrack_slots.is_power_of_two() {
            return Err(bad(
                "dataplane.conntrack_slots",
                format!("{} is not a power of two in 64..=16777216", d.conntrack_slots),
            ));
        }
        if !(3..=4096).contains(&d.max_ports) {
            return Err(bad("dataplane.max_ports", format!("{} is outside 3..=4096", d.max_ports)));
        }
        let xdp_mode = match d.xdp_mode.as_str() {
            "auto" => XdpMode::Auto,
            "native" => XdpMode::Native,
            "generic" => XdpMode::Generic,
            other => return Err(bad("dataplane.xdp_mode", format!("`{other}` is not one of auto, native, generic"))),
        };
        let uplink_port = match d.uplink_port.as_str() {
            "afxdp" => UplinkPort::AfXdp,
            "udp" => UplinkPort::Udp,
            "auto" => UplinkPort::Auto,
            other => return Err(bad("dataplane.uplink_port", format!("`{other}` is not one of afxdp, udp, auto"))),
        };
        let pod_port = match d.pod_port.as_str() {
            "veth" => PodPortChoice::Fixed(PodPort::Veth),
            "tap" => PodPortChoice::Fixed(PodPort::Tap),
            "auto" => PodPortChoice::Auto,
            other => return Err(bad("dataplane.pod_port", format!("`{other}` is not one of veth, tap, auto"))),
        };
        let offload = match d.offload.as_str() {
            "off" => OffloadChoice::Off,
            "tc" => OffloadChoice::Tc,
            "auto" => OffloadChoice::Auto,
            other => return Err(bad("dataplane.offload", format!("`{other}` is not one of off, tc, auto"))),
        };
        if offload == OffloadChoice::Tc && pod_port != PodPortChoice::Fixed(PodPort::Veth) {
            return Err(bad(
                "dataplane.offload",
                format!(
                    "\"tc\" moves flows between veths: set dataplane.pod_port = \"veth\" (it is \"{}\")",
                    d.pod_port
                ),
            ));
        }
        if offload == OffloadChoice::Tc && uplink_port == UplinkPort::AfXdp {
            return Err(bad(
                "dataplane.offload",
                "\"tc\" decapsulates ahead of the kernel's UDP socket: set dataplane.uplink_port = \"udp\" or \"auto\""
                    .into(),
            ));
        }
        if !(1..=1024).contains(&d.busy_poll_budget) {
            return Err(bad("dataplane.busy_poll_budget", format!("{} is outside 1..=1024", d.busy_poll_budget)));
        }
        if !(1..=1000).contains(&d.napi_defer_hard_irqs) {
            return Err(bad(
                "dataplane.napi_defer_hard_irqs",
                format!("{} is outside 1..=1000", d.napi_defer_hard_irqs),
            ));
        }
        if !(1..=100_000).contains(&d.gro_flush_timeout_us) {
            return Err(bad(
                "dataplane.gro_flush_timeout_us",
                format!("{} is outside 1..=100000 (microseconds)", d.gro_flush_timeout_us),
            ));
        }
        let busy_poll = d.busy_poll.then(|| BusyPoll {
            budget: d.busy_poll_budget,
            defer_hard_irqs: d.napi_defer_hard_irqs,
            gro_flush_timeout_ns: d.gro_flush_timeout_us * 1000,
            ..BusyPoll::default()
        });
        let tunnel_port = f.tunnel.port.unwrap_or(tunnel.default_port());

        let c = &f.control;
        let mut control = ControlConfig::new(node_name.clone());
        control.public_ip = underlay_addr;
        control.public_ipv6 = underlay_addr6;
        control.vtep_mac = vtep_mac;
        control.vni = f.tunnel.vni;
        control.tunnel = tunnel;
        control.tunnel_port = Some(tunnel_port);
        control.cluster_cidrs = cluster_cidrs.clone();
        control.static_file = c.static_file.clone();
        control.metrics_addr = c.metrics_addr;
        if !c.etcd_endpoints.is_empty() {
            if c.etcd_lease_ttl < 3 {
                return Err(bad("control.etcd_lease_ttl", "must be at least 3 (seconds)".into()));
            }
            control.etcd = Some(EtcdConfig {
                endpoints: c.etcd_endpoints.clone(),
                prefix: c
                    .etcd_prefix
                    .clone()
                    .unwrap_or_else(|| ferry_control::flannel::DEFAULT_PREFIX.to_owned())
                    .trim_end_matches('/')
                    .to_owned(),
                take_lease: c.etcd_lease,
                lease_ttl: Duration::from_secs(c.etcd_lease_ttl),
            });
        }
        if c.kube {
            let auth = match (&c.kubeconfig, &c.kube_server, &c.kube_token_file) {
                (Some(p), None, _) => KubeAuth::Kubeconfig(p.clone()),
                (None, Some(server), Some(token_file)) => KubeAuth::Token {
                    server: server.clone(),
                    token_file: token_file.clone(),
                    ca_file: c.kube_ca_file.clone(),
                    insecure: c.kube_insecure,
                },
                (None, Some(_), None) => {
                    return Err(bad("control.kube_token_file", "is required with control.kube_server".into()));
                }
                (Some(_), Some(_), _) => {
                    return Err(bad("control.kube_server", "conflicts with control.kubeconfig".into()));
                }
                (None, None, _) => KubeAuth::Infer,
            };
            control.kube = Some(KubeConfig { auth, announce: c.kube_announce });
        }
        let daemonset = match &f.uninstall.daemonset {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => match s.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Some((ns.to_owned(), name.to_owned()))
                }
                _ => return Err(bad("uninstall.daemonset", format!("`{s}` is not namespace/name"))),
            },
        };
        if daemonset.is_some() && control.kube.is_none() {
            return Err(bad("uninstall.daemonset", "needs control.kube = true (the agent asks the API)".into()));
        }
        let uninstall = Uninstall { daemonset, cni_conf: f.uninstall.cni_conf.clone() };
        let web = match (f.web.address, &f.web.token_file) {
            (None, Some(_)) => return Err(bad("web.token_file", "needs web.address".into())),
            (None, None) => None,
            (Some(a), None) if !a.ip().is_loopback() => {
                return Err(bad(
                    "web.token_file",
                    format!(
                        "is required when web.address ({a}) is not loopback: clients other than localhost must present a token"
                    ),
                ));
            }
            (Some(address), t) => Some(WebConfig { address, token_file: t.clone() }),
        };
        if control.kube.is_none() && control.etcd.is_none() && control.static_file.is_none() {
            return Err(bad("control", "give a route source: static_file, etcd_endpoints or kube = true".into()));
        }
        Ok(AgentConfig {
            path: path.to_owned(),
            node_name,
            underlay_if: f.underlay.interface,
            underlay_addr,
            underlay_addr6,
            prefer_ipv6,
            underlay_mtu: f.underlay.mtu,
            tunnel,
            vni: f.tunnel.vni,
            tunnel_port,
            vtep_mac,
            verify_udp_checksum: f.tunnel.verify_udp_checksum,
            udp6_zero_checksum_rx: f.tunnel.udp6_zero_checksum_rx,
            cluster_cidrs,
            service_cidrs,
            pod_cidrs,
            gateway_mac,
            host_if,
            workers: d.workers,
            cores: d.cores.clone(),
            poll,
            frames: d.frames,
            max_ports: d.max_ports,
            flow_slots: d.flows.then_some(d.flow_slots as usize),
            conntrack_slots: d.conntrack_slots as usize,
            offload,
            xdp_mode,
            uplink_port,
            pod_port,
            busy_poll,
            uninstall,
            socket: f.admin.socket,
            state_dir: f.admin.state_dir,
            control,
            web,
        })
    }
}

fn parse_unicast_mac(s: &str) -> Result<MacAddr, String> {
    let m: MacAddr = s.parse().map_err(|_| format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    if m.0[0] & 1 != 0 || m.0 == [0; 6] {
        return Err(format!("`{s}` is not a unicast MAC address"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_name = "n1"
[underlay]
interface = "ul0"
[pods]
cluster_cidrs = ["10.244.0.0/16"]
pod_cidrs = ["10.244.1.0/24"]
[control]
static_file = "/etc/ferry/nodes.toml"
"#;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse_with_env(Path::new("ferry.toml"), text, |_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn layers_merge_key_by_key_and_errors_name_the_files() {
        let base = (PathBuf::from("base.toml"), include_str!("../../deploy/ferry.toml").to_owned());
        let node = (
            PathBuf::from("node.toml"),
            "node_name = \"lab-1\"\n[underlay]\ninterface = \"ul0\"\n[control]\nkube = false\nstatic_file = \"/x/nodes.toml\"\n[uninstall]\ndaemonset = \"\"\n"
                .to_owned(),
        );
        let c = AgentConfig::parse_layers(&[base.clone(), node], |_| None).expect("merged");
        assert_eq!((c.node_name.as_str(), c.underlay_if.as_str()), ("lab-1", "ul0"));
        assert!(c.control.kube.is_none() && c.control.static_file.is_some());
        // Kept from the base, which the top layer does not mention.
        assert_eq!(c.cluster_cidrs, vec!["10.244.0.0/16".parse::<IpNet>().expect("net")]);
        assert_eq!(c.socket, Path::new("/run/ferry/ferry.sock"));
        let bad = (PathBuf::from("node.toml"), "[tunnel]\nvni = 16777216\n".to_owned());
        let e = AgentConfig::parse_layers(&[base.clone(), bad], |_| Some("n".into())).expect_err("bad vni").to_string();
        assert!(e.contains("tunnel.vni") && e.contains("base.toml + node.toml"), "{e}");
        let typo = (PathBuf::from("node.toml"), "[tunnel]\nvnii = 3\n".to_owned());
        let e = AgentConfig::parse_layers(&[base, typo], |_| Some("n".into())).expect_err("unknown key").to_string();
        assert!(e.contains("vnii"), "{e}");
    }

    #[test]
    fn underlay_addresses_of_both_families() {
        let with = |v: &str| GOOD.replace("interface = \"ul0\"", &format!("interface = \"ul0\"\n{v}"));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let c = parse(&with("address = [\"fd00:100::1\", \"192.168.100.1\"]\nprefer_family = \"ipv6\"")).expect("dual");
        assert_eq!(
            (c.underlay_addr, c.underlay_addr6),
            (Some(ip("192.168.100.1")), Some("fd00:100::1".parse().expect("ip")))
        );
        assert!(c.prefer_ipv6);
        assert_eq!((c.control.public_ip, c.control.public_ipv6), (c.underlay_addr, c.underlay_addr6));
        let c = parse(&with("address = \"fd00:100::1\"")).expect("one");
        assert_eq!((c.underlay_addr, c.underlay_addr6, c.prefer_ipv6), (Some(ip("fd00:100::1")), None, false));
        for (v, key) in [
            ("address = [\"192.168.100.1\", \"192.168.100.2\"]", "underlay.address"),
            ("address = []", "underlay.address"),
            ("prefer_family = \"ipx\"", "underlay.prefer_family"),
        ] {
            let e = parse(&with(v)).expect_err(v);
            assert!(e.contains(key), "{v}: {e}");
        }
    }

    #[test]
    fn service_cidrs_are_optional_checked_and_named() {
        assert!(parse(GOOD).expect("good").service_cidrs.is_empty());
        let with = GOOD.replace("pod_cidrs =", "service_cidrs = [\"10.96.0.0/12\"]\npod_cidrs =");
        assert_eq!(parse(&with).expect("good").service_cidrs, ["10.96.0.0/12".parse::<IpNet>().expect("net")]);
        let e =
            parse(&GOOD.replace("pod_cidrs =", "service_cidrs = [\"10.96.0.0/40\"]\npod_cidrs =")).expect_err("bad");
        assert!(e.contains("pods.service_cidrs"), "{e}");
        let e = parse(&GOOD.replace("pod_cidrs =", "service_cidrs = [\"10.244.0.0/20\"]\npod_cidrs ="))
            .expect_err("overlap");
        assert!(e.contains("pods.service_cidrs") && e.contains("overlaps"), "{e}");
    }

    #[test]
    fn the_manifests_configuration_is_valid() {
        let text = include_str!("../../deploy/ferry.toml");
        let env = |k: &str| (k == NODE_NAME_ENV).then(|| "node-a".to_owned());
        let c = AgentConfig::parse_with_env(Path::new("deploy/ferry.toml"), text, env).expect("deploy/ferry.toml");
        assert_eq!(c.node_name, "node-a");
        assert!(c.control.kube.is_some(), "the cluster configuration reads Nodes from the API");
    }

    #[test]
    fn node_name_comes_from_the_environment_when_the_file_has_none() {
        let text = GOOD.replace("node_name = \"n1\"", "");
        let env = |k: &str| (k == NODE_NAME_ENV).then(|| "worker-7".to_owned());
        let c = AgentConfig::parse_with_env(Path::new("ferry.toml"), &text, env).expect("from NODE_NAME");
        assert_eq!(c.node_name, "worker-7");
        let c = AgentConfig::parse_with_env(Path::new("ferry.toml"), GOOD, env).expect("the file wins");
        assert_eq!(c.node_name, "n1");
        let e = parse(&text).expect_err("neither");
        assert!(e.contains("node_name") && e.contains(NODE_NAME_ENV), "{e}");
    }

    #[test]
    fn defaults_fill_in() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.tunnel, TunnelKind::Vxlan);
        assert_eq!((c.vni, c.tunnel_port, c.workers), (1, 4789, 1));
        assert_eq!(c.host_if.as_deref(), Some("ferry0"));
        assert_eq!(c.gateway_mac.to_string(), "02:fe:ff:ff:ff:ff");
        assert_eq!(c.busy_poll, None);
        assert_eq!(c.web, None, "the web view is off unless asked for");
        let local = parse(&format!("{GOOD}[web]\naddress = \"127.0.0.1:9180\"\n")).expect("loopback needs no token");
        assert_eq!(local.web.map(|w| (w.address.port(), w.token_file)), Some((9180, None)));
        let t = format!("{GOOD}[web]\naddress = \"0.0.0.0:9180\"\ntoken_file = \"/etc/ferry/web-token\"\n");
        assert!(parse(&t).expect("any address with a token").web.is_some_and(|w| w.token_file.is_some()));
        assert_eq!(c.uplink_port, UplinkPort::AfXdp);
        for (v, want) in [("udp", UplinkPort::Udp), ("auto", UplinkPort::Auto), ("afxdp", UplinkPort::AfXdp)] {
            let t = GOOD.replace("[control]", &format!("[dataplane]\nuplink_port = \"{v}\"\n[control]"));
            assert_eq!(parse(&t).expect("valid").uplink_port, want, "{v}");
        }
        assert_eq!(c.pod_port, PodPortChoice::Auto);
        let tap = parse(&GOOD.replace("[control]", "[dataplane]\npod_port = \"tap\"\n[control]")).expect("tap");
        assert_eq!(tap.pod_port, PodPortChoice::Fixed(PodPort::Tap));
        assert_eq!(c.control.static_file.as_deref(), Some(Path::new("/etc/ferry/nodes.toml")));
        let g = parse(&GOOD.replace("[pods]", "[tunnel]\nkind = \"geneve\"\n[pods]")).expect("geneve");
        assert_eq!(g.tunnel_port, 6081);
        assert!(c.verify_udp_checksum && !c.udp6_zero_checksum_rx, "checksums verified, zero IPv6 ones refused");
        let off = parse(
            &GOOD.replace("[pods]", "[tunnel]\nverify_udp_checksum = false\nudp6_zero_checksum_rx = true\n[pods]"),
        )
        .expect("checksum settings");
        assert!(!off.verify_udp_checksum && off.udp6_zero_checksum_rx);
    }

    #[test]
    fn conntrack_slots_default_set_and_refused_by_name() {
        assert_eq!(parse(GOOD).expect("valid").conntrack_slots, ferry_dataplane::conntrack::DEFAULT_SLOTS);
        let with = |v: &str| GOOD.replace("[control]", &format!("[dataplane]\nconntrack_slots = {v}\n[control]"));
        assert_eq!(parse(&with("1024")).expect("valid").conntrack_slots, 1024);
        for bad in ["1000", "32", "33554432"] {
            let e = parse(&with(bad)).expect_err(bad);
            assert!(e.contains("dataplane.conntrack_slots"), "{e}");
        }
    }

    #[test]
    fn offload_needs_veth_pods_and_the_udp_uplink_and_names_its_field() {
        assert_eq!(parse(GOOD).expect("valid").offload, OffloadChoice::Auto, "auto by default");
        let with = |d: &str| GOOD.replace("[control]", &format!("[dataplane]\n{d}\n[control]"));
        let on = with("offload = \"tc\"\npod_port = \"veth\"\nuplink_port = \"udp\"");
        assert_eq!(parse(&on).expect("valid").offload, OffloadChoice::Tc);
        let tc_auto = with("offload = \"tc\"\npod_port = \"veth\"\nuplink_port = \"auto\"");
        assert_eq!(parse(&tc_auto).expect("auto").offload, OffloadChoice::Tc);
        assert_eq!(parse(&with("offload = \"off\"")).expect("off").offload, OffloadChoice::Off);
        // auto asks nothing of the other settings: it is off where they rule it out.
        for ok in ["offload = \"auto\"\npod_port = \"tap\"", "offload = \"auto\"\nuplink_port = \"afxdp\""] {
            assert_eq!(parse(&with(ok)).expect(ok).offload, OffloadChoice::Auto);
        }
        for bad in [
            "offload = \"xdp\"",
            "offload = \"tc\"\npod_port = \"tap\"\nuplink_port = \"udp\"",
            "offload = \"tc\"\nuplink_port = \"udp\"",
            "offload = \"tc\"\npod_port = \"veth\"\nuplink_port = \"afxdp\"",
        ] {
            let e = parse(&with(bad)).expect_err(bad);
            assert!(e.contains("dataplane.offload"), "{bad}: {e}");
        }
    }

    #[test]
    fn busy_poll_takes_its_device_settings() {
        let text = GOOD.replace(
            "[control]",
            "[dataplane]\nbusy_poll = true\nbusy_poll_budget = 32\ngro_flush_timeout_us = 50\n[control]",
        );
        let bp = parse(&text).expect("valid").busy_poll.expect("busy polling on");
        assert_eq!((bp.budget, bp.defer_hard_irqs, bp.gro_flush_timeout_ns), (32, 2, 50_000));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (GOOD.replace("[pods]", "[pods]\ncolour = 1"), "colour"),
            (GOOD.replace("node_name = \"n1\"", ""), "node_name"),
            (GOOD.replace("[pods]", "[tunnel]\nvni = 16777216\n[pods]"), "tunnel.vni"),
            (GOOD.replace("[pods]", "[tunnel]\nkind = \"gre\"\n[pods]"), "tunnel.kind"),
            (GOOD.replace("10.244.1.0/24", "10.245.1.0/24"), "pods.pod_cidrs"),
            (GOOD.replace("10.244.1.0/24", "10.244.1.0/33"), "pods.pod_cidrs"),
            (GOOD.replace("[control]", "[dataplane]\nworkers = 0\n[control]"), "dataplane.workers"),
            (GOOD.replace("[control]", "[dataplane]\npoll = \"lazy\"\n[control]"), "dataplane.poll"),
            (GOOD.replace("[control]", "[dataplane]\nuplink_port = \"tap\"\n[control]"), "dataplane.uplink_port"),
            (GOOD.replace("[control]", "[dataplane]\npod_port = \"tun\"\n[control]"), "dataplane.pod_port"),
            (GOOD.replace("[control]", "[dataplane]\nbusy_poll_budget = 0\n[control]"), "dataplane.busy_poll_budget"),
            (
                GOOD.replace("[control]", "[dataplane]\nnapi_defer_hard_irqs = 0\n[control]"),
                "dataplane.napi_defer_hard_irqs",
            ),
            (
                GOOD.replace("[control]", "[dataplane]\ngro_flush_timeout_us = 0\n[control]"),
                "dataplane.gro_flush_timeout_us",
            ),
            (GOOD.replace("[pods]", "[tunnel]\nvtep_mac = \"01:00:00:00:00:01\"\n[pods]"), "tunnel.vtep_mac"),
            (GOOD.replace("static_file = \"/etc/ferry/nodes.toml\"", ""), "route source"),
            (GOOD.replace("[underlay]", "[underlay]\nmtu = \"big\""), "mtu"),
            (format!("{GOOD}[uninstall]\ndaemonset = \"ferry\"\n"), "uninstall.daemonset"),
            (format!("{GOOD}[uninstall]\ndaemonset = \"a/b\"\n"), "needs control.kube"),
            (format!("{GOOD}[web]\naddress = \"192.168.100.1:9180\"\n"), "web.token_file"),
            (format!("{GOOD}[web]\ntoken_file = \"/t\"\n"), "web.token_file"),
            (format!("{GOOD}[web]\naddress = \"localhost\"\n"), "address"),
        ];
        for (text, key) in cases {
            let e = parse(&text).expect_err(key);
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}

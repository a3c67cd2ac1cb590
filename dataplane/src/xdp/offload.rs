//! Flow offload (`dataplane.offload = "tc"`): the TC programs of `bpf/offload.c` and their maps
//! (setup side, plus [`Offload::prepare`] and [`Offload::commit`], which a worker calls for the
//! flows it forwards).
//!
//! ferry's pipeline decides every connection's first packets; for a TCP connection it allows and
//! routes without translation, the worker offers the flow here ([`Offload::prepare`], written by
//! [`Offload::commit`] once the packet has left) while the handshake is in flight, and the entry
//! written then moves the rest of the connection in the kernel. A UDP flow is offered on any
//! packet ferry forwards, and its entry takes effect [`UDP_ARM_DELAY`] after it is written. The
//! kernel's path: encapsulated at the pod's host veth with `bpf_skb_adjust_room`, which keeps a TSO
//! super-packet whole, decapsulated at the uplink, or handed to another pod of the node. What is
//! not offloaded reaches ferry through the pod's own tap (its *partner*), with virtio-net headers.
//!
//! Programs are attached through TCX links, so the kernel removes them when ferry dies: a killed
//! agent leaves no program behind.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_encap::MacAddr;
use ferry_encap::template::{Family, TunnelTemplate};
use ferry_tables::PortId;

use super::error::{XdpError, is_permission};
use super::{Aligned, libbpf_log};

static OFFLOAD_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/offload.bpf.o")));

/// `struct flow4_key` (bpf/offload.h).
const KEY_SIZE: usize = 16;
/// `struct offload_entry` (bpf/offload.h).
const ENTRY_SIZE: usize = 168;
/// `OFFLOAD_HDR_MAX`.
const HDR_MAX: usize = 112;
/// Where `hdr` starts in the entry, then `armed_ns` and the counters after it.
const HDR_AT: usize = 24;
const ARMED_AT: usize = HDR_AT + HDR_MAX;
const PACKETS_AT: usize = ARMED_AT + 8;

/// How long after its entry is written a UDP flow's packets still go to ferry: those already
/// queued for ferry (in the pod's tap, the uplink's socket, the worker's batch) leave first, so
/// that the switch to the kernel's path does not reorder the flow. TCP flows are offloaded on
/// their handshake, with nothing queued, and take effect at once.
pub const UDP_ARM_DELAY: Duration = Duration::from_millis(2);

/// `struct offload_config`: be16 tunnel_port, 2 pad, u32 ext_tap, be32 addr4.
const CONFIG_SIZE: usize = 12;

/// Entries [`Offload::list`] reads a system call.
const LIST_BATCH: usize = 256;
/// The most it makes room for when one hash bucket holds more (a bucket is read whole).
const LIST_BATCH_MAX: usize = 16_384;

/// Slots of the recent-offers filter (a power of two).
const RECENT_SLOTS: usize = 4096;

const ACTION_ENCAP4: u8 = 1;
const ACTION_LOCAL: u8 = 2;
const ACTION_DECAP: u8 = 3;
const FLAG_FIXED_TOS: u8 = 1;
const FLAG_ECN_COPY: u8 = 2;
const FLAG_NAT_DST: u8 = 4;
const FLAG_NAT_SRC: u8 = 8;
const FLAG_SEEN_FIN: u8 = 16;
const FLAG_SEEN_RST: u8 = 32;
/// Where the entry holds `flags`, `nat_port` and `nat_addr`.
const FLAGS_AT: usize = 16;
const NAT_PORT_AT: usize = 18;
const NAT_ADDR_AT: usize = 20;

/// What the programs count (`enum offload_stat`), in order.
pub const STAT_NAMES: [&str; 7] = ["encap", "local", "decap", "train", "error", "no_tap", "to_pod"];

/// Most entries written per second, all workers together: a SYN flood costs a bounded number of
/// map updates (one system call each); beyond it connections simply stay on ferry's own path.
pub const OFFERS_PER_SECOND: u32 = 20_000;

/// An IPv4 flow as its packets carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey4 {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
}

impl FlowKey4 {
    fn bytes(&self) -> [u8; KEY_SIZE] {
        let mut b = [0u8; KEY_SIZE];
        b[0..4].copy_from_slice(&self.src.octets());
        b[4..8].copy_from_slice(&self.dst.octets());
        b[8..10].copy_from_slice(&self.sport.to_be_bytes());
        b[10..12].copy_from_slice(&self.dport.to_be_bytes());
        b[12] = self.proto;
        b
    }

    /// A mix of the key's bits (for the recent-offers filter).
    fn hash64(&self) -> u64 {
        let a = u64::from(u32::from(self.src)) << 32 | u64::from(u32::from(self.dst));
        let b = u64::from(self.sport) << 24 | u64::from(self.dport) << 8 | u64::from(self.proto);
        let x = (a ^ b.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 31)
    }

    fn from_bytes(b: &[u8; KEY_SIZE]) -> Self {
        FlowKey4 {
            src: Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            dst: Ipv4Addr::new(b[4], b[5], b[6], b[7]),
            sport: u16::from_be_bytes([b[8], b[9]]),
            dport: u16::from_be_bytes([b[10], b[11]]),
            proto: b[12],
        }
    }
}

/// What the kernel should do with the rest of a flow, as the pipeline decided it.
#[derive(Debug, Clone, Copy)]
pub enum Offer<'a> {
    /// From pod port `from` into the tunnel to another node.
    Encap {
        /// The pod's port.
        from: PortId,
        /// The outer headers toward the node.
        template: &'a TunnelTemplate,
        /// The inner Ethernet header's destination (the node's VTEP MAC) and source (ours).
        inner_dst: MacAddr,
        /// Ours.
        inner_src: MacAddr,
        /// The flow's UDP source port.
        src_port: u16,
        /// The largest frame (Ethernet header included) that fits the tunnel unsegmented.
        max_len: u16,
    },
    /// From pod port `from` to pod port `to` of this node, with the frame's new MACs.
    Local {
        /// The sending pod's port.
        from: PortId,
        /// The receiving pod's port.
        to: PortId,
        /// The receiving pod's MAC.
        dst_mac: MacAddr,
        /// The gateway's.
        src_mac: MacAddr,
    },
    /// From the uplink, sent by the node at `remote`, to pod port `to`.
    Decap {
        /// The sending node's underlay address.
        remote: Ipv4Addr,
        /// The receiving pod's port.
        to: PortId,
        /// The receiving pod's MAC.
        dst_mac: MacAddr,
        /// The gateway's.
        src_mac: MacAddr,
    },
}

/// A service's translation, which the programs apply to every packet of an offloaded flow (before
/// encapsulation or delivery, after decapsulation), as ferry's service stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// The destination becomes `addr`:`port`: a client's packets to a service reach its backend.
    Dst {
        /// The backend's address.
        addr: Ipv4Addr,
        /// The backend's port.
        port: u16,
    },
    /// The source becomes `addr`:`port`: a backend's replies come from the service.
    Src {
        /// The service's address.
        addr: Ipv4Addr,
        /// The service's port.
        port: u16,
    },
}

impl Rewrite {
    /// What took flow `before` to `after` in the pipeline: `Some(None)` nothing, `Some(Some(_))`
    /// a translation of one end the programs can repeat, `None` one they cannot (both ends: a
    /// pod that reaches itself through its service).
    pub fn between(before: &FlowKey4, after: &FlowKey4) -> Option<Option<Rewrite>> {
        if before.proto != after.proto {
            return None;
        }
        let same_src = before.src == after.src && before.sport == after.sport;
        let same_dst = before.dst == after.dst && before.dport == after.dport;
        match (same_src, same_dst) {
            (true, true) => Some(None),
            (true, false) => Some(Some(Rewrite::Dst { addr: after.dst, port: after.dport })),
            (false, true) => Some(Some(Rewrite::Src { addr: after.src, port: after.sport })),
            (false, false) => None,
        }
    }

    /// Which end it rewrites (`"dst"` or `"src"`), to what address and port.
    pub fn parts(&self) -> (&'static str, Ipv4Addr, u16) {
        match *self {
            Rewrite::Dst { addr, port } => ("dst", addr, port),
            Rewrite::Src { addr, port } => ("src", addr, port),
        }
    }

    /// The flow's key once rewritten (what the pipeline's later stages and the routes see).
    pub fn apply(&self, key: &FlowKey4) -> FlowKey4 {
        match *self {
            Rewrite::Dst { addr, port } => FlowKey4 { dst: addr, dport: port, ..*key },
            Rewrite::Src { addr, port } => FlowKey4 { src: addr, sport: port, ..*key },
        }
    }
}

/// One entry, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadedFlow {
    /// The flow.
    pub key: FlowKey4,
    /// "encap", "local" or "decap".
    pub action: &'static str,
    /// Where its packets come in and leave (ifindexes).
    pub in_ifindex: u32,
    /// Where they leave.
    pub out_ifindex: u32,
    /// Packets (super-packets) the kernel moved.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` of the last, in nanoseconds (0: none yet).
    pub last_ns: u64,
    /// The other node's underlay address (encap: the tunnel's destination; decap: the sender).
    pub remote: Option<Ipv4Addr>,
    /// A service's translation of its packets.
    pub rewrite: Option<Rewrite>,
    /// A TCP FIN went through the entry (its side of the connection closed).
    pub fin: bool,
    /// A TCP RST went through the entry (the connection ended).
    pub rst: bool,
}

/// An entry as [`Offload::list`] gives it.
fn offloaded_flow(key: &[u8; KEY_SIZE], v: &[u8; ENTRY_SIZE]) -> OffloadedFlow {
    let u32_at = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    let u64_at = |i: usize| u64::from_ne_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
    OffloadedFlow {
        key: FlowKey4::from_bytes(key),
        action: match v[14] {
            ACTION_ENCAP4 => "encap",
            ACTION_LOCAL => "local",
            ACTION_DECAP => "decap",
            _ => "?",
        },
        in_ifindex: u32_at(0),
        out_ifindex: u32_at(4),
        packets: u64_at(PACKETS_AT),
        bytes: u64_at(PACKETS_AT + 8),
        last_ns: u64_at(PACKETS_AT + 16),
        remote: match v[14] {
            ACTION_ENCAP4 => Some(Ipv4Addr::new(v[HDR_AT + 16], v[HDR_AT + 17], v[HDR_AT + 18], v[HDR_AT + 19])),
            ACTION_DECAP => Some(Ipv4Addr::new(v[8], v[9], v[10], v[11])),
            _ => None,
        },
        rewrite: rewrite_of(v),
        fin: v[FLAGS_AT] & FLAG_SEEN_FIN != 0,
        rst: v[FLAGS_AT] & FLAG_SEEN_RST != 0,
    }
}

/// The translation an entry's flags and NAT fields hold.
fn rewrite_of(v: &[u8; ENTRY_SIZE]) -> Option<Rewrite> {
    let addr = Ipv4Addr::new(v[NAT_ADDR_AT], v[NAT_ADDR_AT + 1], v[NAT_ADDR_AT + 2], v[NAT_ADDR_AT + 3]);
    let port = u16::from_be_bytes([v[NAT_PORT_AT], v[NAT_PORT_AT + 1]]);
    let flags = v[FLAGS_AT];
    if flags & FLAG_NAT_DST != 0 {
        Some(Rewrite::Dst { addr, port })
    } else if flags & FLAG_NAT_SRC != 0 {
        Some(Rewrite::Src { addr, port })
    } else {
        None
    }
}

/// A TCX link: the program stays attached while it lives (and while ferry lives).
#[derive(Debug)]
pub struct TcxLink {
    link: NonNull<libxdp_sys::bpf_link>,
    ifindex: u32,
}

// SAFETY: the link is owned by this value alone; libbpf keeps no thread-affine state in it.
unsafe impl Send for TcxLink {}
// SAFETY: no method reads or writes through `&self` besides the plain ifindex.
unsafe impl Sync for TcxLink {}

impl TcxLink {
    /// The interface it is attached to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

impl Drop for TcxLink {
    fn drop(&mut self) {
        // SAFETY: `link` came from `bpf_program__attach_tcx` and is destroyed exactly once, here.
        unsafe { libxdp_sys::bpf_link__destroy(self.link.as_ptr()) };
    }
}

/// The loaded offload object: its programs, its maps, and which port is which interface.
#[derive(Debug)]
pub struct Offload {
    obj: NonNull<libxdp_sys::bpf_object>,
    flows_fd: i32,
    partner_fd: i32,
    stats_fd: i32,
    config_fd: i32,
    frontends_fd: i32,
    /// What `offload_config` holds: the tunnel port, ferry's tap for services from outside, and
    /// the node's IPv4 address.
    config: Mutex<[u8; CONFIG_SIZE]>,
    uplink_ifindex: AtomicU32,
    /// Port id -> the pod's host veth ifindex (0: not an offloaded pod).
    veths: Box<[AtomicU32]>,
    /// The offer budget of the current second (since `epoch`): (second, offers left).
    budget: Mutex<(u64, u32)>,
    epoch: Instant,
    offered: AtomicU64,
    refused: AtomicU64,
    recent: RecentOffers,
}

/// Flows offered lately. A UDP flow reaches the pipeline packet after packet until its entry is
/// armed; this keeps it to one offer (one map update) in about a second. Each slot holds a key's
/// hash (top 48 bits) and the second it was offered in (low 16), at the hash's low bits; a
/// collision only costs a repeated offer.
#[derive(Debug)]
struct RecentOffers(Box<[AtomicU64]>);

impl RecentOffers {
    fn new() -> Self {
        RecentOffers((0..RECENT_SLOTS).map(|_| AtomicU64::new(0)).collect())
    }

    /// Whether `key` was not offered in second `sec` or the one before (and note it as offered
    /// in `sec`).
    fn first(&self, key: &FlowKey4, sec: u64) -> bool {
        let h = key.hash64();
        let slot = &self.0[(h as usize) & (RECENT_SLOTS - 1)];
        let (tag, sec) = (h & !0xffff, (sec & 0xffff) as u16);
        let seen = slot.load(Ordering::Relaxed);
        if seen != 0 && seen & !0xffff == tag && sec.wrapping_sub(seen as u16) < 2 {
            return false;
        }
        slot.store(tag | u64::from(sec), Ordering::Relaxed);
        true
    }

    /// Forget `key` (its entry went: a new offer is welcome at once).
    fn forget(&self, key: &FlowKey4) {
        let h = key.hash64();
        let slot = &self.0[(h as usize) & (RECENT_SLOTS - 1)];
        if slot.load(Ordering::Relaxed) & !0xffff == h & !0xffff {
            slot.store(0, Ordering::Relaxed);
        }
    }
}

/// An entry made ready by [`Offload::prepare`], written by [`Offload::commit`].
#[derive(Clone)]
pub struct Prepared {
    key: FlowKey4,
    entry: [u8; ENTRY_SIZE],
}

impl Prepared {
    /// Whether it is a UDP flow's (armed [`UDP_ARM_DELAY`] after it is written).
    pub fn is_udp(&self) -> bool {
        self.key.proto == 17
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("key", &self.key).field("action", &self.entry[14]).finish()
    }
}

// SAFETY: the libbpf object is owned by this value alone; after loading, every use is a bpf(2)
// system call on one of its descriptors (map updates, lookups, link creation), safe from any
// thread; the rest is atomics and a mutex.
unsafe impl Send for Offload {}
// SAFETY: as above.
unsafe impl Sync for Offload {}

impl Drop for Offload {
    fn drop(&mut self) {
        // SAFETY: `obj` came from `bpf_object__open_mem` and is closed exactly once, here.
        unsafe { libxdp_sys::bpf_object__close(self.obj.as_ptr()) };
    }
}

const PROGRAM: &str = "ferry_offload";

fn load_error(source: io::Error) -> XdpError {
    if is_permission(&source) {
        XdpError::NotPermitted { action: "loading ferry's offload programs", source }
    } else {
        XdpError::Load { program: PROGRAM, source }
    }
}

fn missing(what: &str) -> XdpError {
    XdpError::Load {
        program: PROGRAM,
        source: io::Error::new(io::ErrorKind::NotFound, format!("{what} is missing from the embedded object")),
    }
}

impl Offload {
    /// Load the programs, with room for `max_flows` entries and `max_ports` ports, for a tunnel
    /// on UDP port `tunnel_port`, on a node whose IPv4 underlay address is `addr4` (node ports).
    ///
    /// # Errors
    /// Missing privileges ([`XdpError::NotPermitted`]); the kernel refusing the object.
    pub fn load(max_flows: u32, max_ports: u16, tunnel_port: u16, addr4: Option<Ipv4Addr>) -> Result<Self, XdpError> {
        libbpf_log::install();
        let bytes = &OFFLOAD_OBJECT.0;
        // SAFETY: `bpf_object_open_opts` is plain data; all-zero is its documented initial state.
        let mut opts: libxdp_sys::bpf_object_open_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_object_open_opts>();
        opts.object_name = c"ferry_offload".as_ptr();
        // SAFETY: `bytes` is a static, 8-byte aligned ELF object that libbpf only reads.
        let obj = unsafe { libxdp_sys::bpf_object__open_mem(bytes.as_ptr().cast(), bytes.len(), &raw const opts) };
        let obj = NonNull::new(obj).ok_or_else(|| load_error(io::Error::last_os_error()))?;
        let mut o = Offload {
            obj,
            flows_fd: -1,
            partner_fd: -1,
            stats_fd: -1,
            config_fd: -1,
            frontends_fd: -1,
            config: Mutex::new([0; CONFIG_SIZE]),
            uplink_ifindex: AtomicU32::new(0),
            veths: (0..max_ports).map(|_| AtomicU32::new(0)).collect(),
            budget: Mutex::new((u64::MAX, 0)),
            epoch: Instant::now(),
            offered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            recent: RecentOffers::new(),
        };
        let flows = o.map(c"offload_flows").ok_or_else(|| missing("map offload_flows"))?;
        // SAFETY: the map belongs to the opened, not yet loaded object.
        let ret = unsafe { libxdp_sys::bpf_map__set_max_entries(flows.as_ptr(), max_flows.max(1)) };
        if ret < 0 {
            return Err(load_error(io::Error::from_raw_os_error(-ret)));
        }
        // SAFETY: `obj` is opened and not loaded.
        let ret = unsafe { libxdp_sys::bpf_object__load(o.obj.as_ptr()) };
        if ret < 0 {
            return Err(load_error(io::Error::from_raw_os_error(-ret)));
        }
        o.flows_fd = o.map_fd(c"offload_flows", "offload_flows", KEY_SIZE, ENTRY_SIZE)?;
        o.partner_fd = o.map_fd(c"partner", "partner", 4, 4)?;
        o.stats_fd = o.map_fd(c"offload_stats", "offload_stats", 4, 8)?;
        o.config_fd = o.map_fd(c"offload_config", "offload_config", 4, CONFIG_SIZE)?;
        o.frontends_fd = o.map_fd(c"frontends", "frontends", super::maps::SERVICE_KEY_SIZE, 1)?;
        {
            let mut config = o.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            config[0..2].copy_from_slice(&tunnel_port.to_be_bytes());
            config[8..12].copy_from_slice(&addr4.map_or([0; 4], |a| a.octets()));
            update(o.config_fd, &0u32.to_ne_bytes(), &*config, "offload_config", "0")?;
        }
        Ok(o)
    }

    fn map(&self, name: &CStr) -> Option<NonNull<libxdp_sys::bpf_map>> {
        // SAFETY: `obj` is a valid object and `name` a valid C string.
        NonNull::new(unsafe { libxdp_sys::bpf_object__find_map_by_name(self.obj.as_ptr(), name.as_ptr()) })
    }

    fn map_fd(&self, name: &'static CStr, map: &'static str, key: usize, value: usize) -> Result<i32, XdpError> {
        let m = self.map(name).ok_or_else(|| missing("a map"))?;
        // SAFETY: `m` belongs to this loaded object.
        let (k, v, fd) = unsafe {
            let m = m.as_ptr();
            (libxdp_sys::bpf_map__key_size(m), libxdp_sys::bpf_map__value_size(m), libxdp_sys::bpf_map__fd(m))
        };
        for (what, found, expected) in [("key", k, key), ("value", v, value)] {
            if found as usize != expected {
                return Err(XdpError::MapLayout { map, what, found, expected: expected as u32 });
            }
        }
        if fd < 0 {
            return Err(missing("a map descriptor"));
        }
        Ok(fd)
    }

    fn attach(&self, program: &CStr, ifindex: u32) -> Result<TcxLink, XdpError> {
        // SAFETY: the object is loaded; the name is a valid C string.
        let p = unsafe { libxdp_sys::bpf_object__find_program_by_name(self.obj.as_ptr(), program.as_ptr()) };
        if p.is_null() {
            return Err(missing("a program"));
        }
        // SAFETY: plain data, all-zero is its initial state; `sz` set as libbpf asks.
        let mut opts: libxdp_sys::bpf_tcx_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_tcx_opts>();
        let index = i32::try_from(ifindex).map_err(|_| missing("a valid ifindex"))?;
        // SAFETY: `p` is a program of the loaded object; `opts` is valid for the call.
        let link = unsafe { libxdp_sys::bpf_program__attach_tcx(p, index, &raw const opts) };
        match NonNull::new(link) {
            Some(link) => Ok(TcxLink { link, ifindex }),
            None => {
                let source = io::Error::last_os_error();
                Err(if is_permission(&source) {
                    XdpError::NotPermitted { action: "attaching ferry's offload program (TCX)", source }
                } else {
                    XdpError::Load { program: PROGRAM, source }
                })
            }
        }
    }

    /// Attach the uplink's program (decapsulation of offloaded flows) to interface `ifindex`.
    ///
    /// # Errors
    /// The kernel refusing the link (TCX needs Linux 6.6).
    pub fn attach_uplink(&self, ifindex: u32) -> Result<TcxLink, XdpError> {
        let link = self.attach(c"ferry_offload_uplink", ifindex)?;
        self.uplink_ifindex.store(ifindex, Ordering::Release);
        Ok(link)
    }

    /// Hand services' ways in from outside (see [`Offload::set_frontend`]) that reach the uplink
    /// to the tap `tap` (ferry reads it as an uplink port), and send what ferry writes to that tap
    /// out of the uplink. The uplink's program must be attached first.
    ///
    /// # Errors
    /// The kernel refusing the link or a map update.
    pub fn attach_external(&self, tap: u32) -> Result<TcxLink, XdpError> {
        let uplink = self.uplink_ifindex.load(Ordering::Acquire);
        if uplink == 0 {
            return Err(XdpError::InvalidConfig {
                problem: "the services' tap needs the uplink's program attached first".into(),
                fix: "attach the uplink before the services' tap",
            });
        }
        update(self.partner_fd, &tap.to_ne_bytes(), &uplink.to_ne_bytes(), "partner", "services' tap")?;
        let link = self.attach(c"ferry_offload_tap", tap)?;
        let mut config = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        config[4..8].copy_from_slice(&tap.to_ne_bytes());
        update(self.config_fd, &0u32.to_ne_bytes(), &*config, "offload_config", "0")?;
        Ok(link)
    }

    /// Hand TCP, UDP or SCTP packets to `addr:port` (`None`: this node's IPv4 address, a node port)
    /// from the uplink to ferry's tap for services (`on`), or stop.
    ///
    /// # Errors
    /// The map is full (65,536 entries) or the kernel refuses ([`XdpError::MapUpdate`]).
    pub fn set_frontend(&self, addr: Option<std::net::IpAddr>, port: u16, proto: u8, on: bool) -> Result<(), XdpError> {
        let key = super::maps::service_key(addr, port, proto);
        if on {
            return update(self.frontends_fd, &key, &[1], "frontends", &format!("{addr:?} port {port} proto {proto}"));
        }
        // SAFETY: `key` is the map's key size; a missing key is not an error here.
        unsafe { libxdp_sys::bpf_map_delete_elem(self.frontends_fd, key.as_ptr().cast()) };
        Ok(())
    }

    /// Attach a pod: its host veth `veth` (the pod's packets come in there) and its tap `tap`
    /// (ferry's way to and from the pod), as port `port`. Both links go when the pod does.
    ///
    /// # Errors
    /// The port beyond `max_ports`; the kernel refusing a link or the partner map.
    pub fn attach_pod(&self, port: PortId, veth: u32, tap: u32) -> Result<[TcxLink; 2], XdpError> {
        let slot = self.veths.get(usize::from(port.0)).ok_or_else(|| XdpError::InvalidConfig {
            problem: format!("port {} is beyond the offload's {} ports", port.0, self.veths.len()),
            fix: "raise dataplane.max_ports",
        })?;
        update(self.partner_fd, &veth.to_ne_bytes(), &tap.to_ne_bytes(), "partner", "veth")?;
        update(self.partner_fd, &tap.to_ne_bytes(), &veth.to_ne_bytes(), "partner", "tap")?;
        let tap_link = self.attach(c"ferry_offload_tap", tap)?;
        let veth_link = self.attach(c"ferry_offload_pod", veth)?;
        slot.store(veth, Ordering::Release);
        Ok([veth_link, tap_link])
    }

    /// Forget a pod's port (its links are dropped by the caller), and every entry through it.
    pub fn detach_pod(&self, port: PortId, veth: u32, tap: u32) {
        if let Some(slot) = self.veths.get(usize::from(port.0)) {
            slot.store(0, Ordering::Release);
        }
        for k in [veth, tap] {
            // SAFETY: a 4-byte key, the map's key size.
            unsafe { libxdp_sys::bpf_map_delete_elem(self.partner_fd, (&raw const k).cast()) };
        }
        self.remove_where(|f| f.in_ifindex == veth || f.out_ifindex == veth);
    }

    /// The host veth of port `port`, when it is an offloaded pod's.
    pub fn veth(&self, port: PortId) -> Option<u32> {
        let v = self.veths.get(usize::from(port.0))?.load(Ordering::Acquire);
        (v != 0).then_some(v)
    }

    /// Take one offer from the budget of this second.
    fn spend(&self) -> bool {
        let now = self.epoch.elapsed().as_secs();
        let mut b = self.budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.0 != now {
            *b = (now, OFFERS_PER_SECOND);
        }
        if b.1 == 0 {
            return false;
        }
        b.1 -= 1;
        true
    }

    /// Offload the rest of flow `key` as `offer` says, now: [`Offload::prepare`] then
    /// [`Offload::commit`]. `false` when it stays ferry's.
    pub fn offer(&self, key: FlowKey4, offer: &Offer<'_>, rewrite: Option<Rewrite>) -> bool {
        self.prepare(key, offer, rewrite).is_some_and(|p| self.commit(&p))
    }

    /// The entry that offloads the rest of flow `key` as `offer` says, to be written by
    /// [`Offload::commit`] once the packet that made the offer has left (the worker commits at
    /// the end of its iteration). `None` when it stays ferry's: a port that is not an offloaded
    /// pod, an outer header that does not fit, or the flow offered within the last second or so
    /// (a UDP flow's packets keep coming through ferry until its entry is armed). `rewrite`: the
    /// service translation ferry applied to the flow's packet, which the programs repeat.
    pub fn prepare(&self, key: FlowKey4, offer: &Offer<'_>, rewrite: Option<Rewrite>) -> Option<Prepared> {
        if !self.recent.first(&key, self.epoch.elapsed().as_secs()) {
            return None;
        }
        let mut entry = self.entry(offer)?;
        if let Some(r) = rewrite {
            let (end, addr, port) = r.parts();
            let flag = if end == "dst" { FLAG_NAT_DST } else { FLAG_NAT_SRC };
            entry[FLAGS_AT] |= flag;
            entry[NAT_PORT_AT..NAT_PORT_AT + 2].copy_from_slice(&port.to_be_bytes());
            entry[NAT_ADDR_AT..NAT_ADDR_AT + 4].copy_from_slice(&addr.octets());
        }
        Some(Prepared { key, entry })
    }

    /// Write a prepared entry. `false` when it stays ferry's: the second's budget spent, or the
    /// map refusing (full).
    pub fn commit(&self, p: &Prepared) -> bool {
        if !self.spend() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut entry = p.entry;
        if p.is_udp() {
            let at = monotonic_ns().saturating_add(UDP_ARM_DELAY.as_nanos() as u64);
            entry[ARMED_AT..ARMED_AT + 8].copy_from_slice(&at.to_ne_bytes());
        }
        let ok = update(self.flows_fd, &p.key.bytes(), &entry, "offload_flows", "flow").is_ok();
        if ok {
            self.offered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn entry(&self, offer: &Offer<'_>) -> Option<[u8; ENTRY_SIZE]> {
        let mut e = [0u8; ENTRY_SIZE];
        let (input, output, action) = match *offer {
            Offer::Encap { from, template, inner_dst, inner_src, src_port, max_len } => {
                let bytes = template.bytes();
                let l3 = bytes.len() - template.ip_overhead();
                // An IPv4 underlay without a VLAN tag: the program writes after a plain Ethernet header.
                if template.family() != Family::V4 || l3 != 14 {
                    return None;
                }
                let outer = &bytes[l3..];
                let len = outer.len() + 14;
                if len > HDR_MAX {
                    return None;
                }
                let hdr = &mut e[HDR_AT..HDR_AT + len];
                hdr[..outer.len()].copy_from_slice(outer);
                hdr[20..22].copy_from_slice(&src_port.to_be_bytes());
                let inner = &mut hdr[outer.len()..];
                inner[0..6].copy_from_slice(&inner_dst.0);
                inner[6..12].copy_from_slice(&inner_src.0);
                inner[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                e[12..14].copy_from_slice(&max_len.to_ne_bytes());
                e[15] = len as u8;
                // The outer TOS: the template's rule (fixed DSCP or the inner one, RFC 6040's ECN).
                let (fixed, ecn) = (template.outer_tos(0), template.outer_tos(0x01) & 0x03 == 0x01);
                let inherits = template.outer_tos(0xfc) & 0xfc == 0xfc && fixed & 0xfc == 0;
                e[FLAGS_AT] = if inherits { 0 } else { FLAG_FIXED_TOS } | if ecn { FLAG_ECN_COPY } else { 0 };
                e[17] = fixed & 0xfc;
                (self.veth(from)?, self.uplink_ifindex.load(Ordering::Acquire), ACTION_ENCAP4)
            }
            Offer::Local { from, to, dst_mac, src_mac } => {
                e[HDR_AT..HDR_AT + 6].copy_from_slice(&dst_mac.0);
                e[HDR_AT + 6..HDR_AT + 12].copy_from_slice(&src_mac.0);
                e[12..14].copy_from_slice(&u16::MAX.to_ne_bytes());
                (self.veth(from)?, self.veth(to)?, ACTION_LOCAL)
            }
            Offer::Decap { remote, to, dst_mac, src_mac } => {
                e[HDR_AT..HDR_AT + 6].copy_from_slice(&dst_mac.0);
                e[HDR_AT + 6..HDR_AT + 12].copy_from_slice(&src_mac.0);
                e[8..12].copy_from_slice(&remote.octets());
                (self.uplink_ifindex.load(Ordering::Acquire), self.veth(to)?, ACTION_DECAP)
            }
        };
        if input == 0 || output == 0 {
            return None;
        }
        e[0..4].copy_from_slice(&input.to_ne_bytes());
        e[4..8].copy_from_slice(&output.to_ne_bytes());
        e[14] = action;
        Some(e)
    }

    /// Every entry (entries may come and go meanwhile). Read [`LIST_BATCH`] entries a system call
    /// (`BPF_MAP_LOOKUP_BATCH`, a walk of the hash map's buckets that entries removed meanwhile do
    /// not restart); a kernel without batch lookups gets a walk by key, two system calls an entry.
    pub fn list(&self) -> Vec<OffloadedFlow> {
        self.list_batched().unwrap_or_else(|| self.list_by_key())
    }

    /// [`list`](Self::list) by batches; `None` when the kernel has no batch lookup for this map.
    fn list_batched(&self) -> Option<Vec<OffloadedFlow>> {
        let mut out = Vec::new();
        let mut room = LIST_BATCH;
        let mut keys = vec![0u8; KEY_SIZE * room];
        let mut values = vec![0u8; ENTRY_SIZE * room];
        // The batch token: the next bucket for a hash map (a u32), a key for other maps.
        let (mut token, mut next) = ([0u64; KEY_SIZE / 8], [0u64; KEY_SIZE / 8]);
        let mut first = true;
        // SAFETY: `bpf_map_batch_opts` is plain data; all-zero is its documented initial state.
        let mut opts: libxdp_sys::bpf_map_batch_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_map_batch_opts>();
        loop {
            let mut count = room as u32;
            let in_batch: *mut [u64; KEY_SIZE / 8] = if first { std::ptr::null_mut() } else { &raw mut token };
            // SAFETY: `keys` and `values` hold `count` keys and values of the map's sizes, and the
            // tokens are the map's key size, as much as the kernel writes for any map.
            let ret = unsafe {
                libxdp_sys::bpf_map_lookup_batch(
                    self.flows_fd,
                    in_batch.cast(),
                    (&raw mut next).cast(),
                    keys.as_mut_ptr().cast(),
                    values.as_mut_ptr().cast(),
                    &raw mut count,
                    &raw const opts,
                )
            };
            // libbpf leaves the error in errno (it also returns it negated, but not in its legacy mode).
            let err = if ret < 0 { io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) } else { 0 };
            if err == libc::ENOSPC && count == 0 {
                // One bucket holds more entries than the buffers: make room and read it again.
                if room >= LIST_BATCH_MAX {
                    return None;
                }
                room *= 4;
                keys.resize(KEY_SIZE * room, 0);
                values.resize(ENTRY_SIZE * room, 0);
                continue;
            }
            if err != 0 && err != libc::ENOENT {
                // EINVAL or ENOTSUPP: no batch lookups here. Any error: walk by key instead (a
                // partial list would restart the idle clocks of the entries it left out).
                return None;
            }
            let n = (count as usize).min(room);
            for (k, v) in keys.chunks_exact(KEY_SIZE).zip(values.chunks_exact(ENTRY_SIZE)).take(n) {
                if let (Ok(k), Ok(v)) = (<&[u8; KEY_SIZE]>::try_from(k), <&[u8; ENTRY_SIZE]>::try_from(v)) {
                    out.push(offloaded_flow(k, v));
                }
            }
            if err == libc::ENOENT {
                return Some(out);
            }
            token = next;
            first = false;
        }
    }

    /// [`list`](Self::list) by key: `get_next_key` and a lookup for each entry.
    fn list_by_key(&self) -> Vec<OffloadedFlow> {
        let mut out = Vec::new();
        let mut prev: Option<[u8; KEY_SIZE]> = None;
        let mut key = [0u8; KEY_SIZE];
        loop {
            let prev_ptr = prev.as_ref().map_or(std::ptr::null(), |p| p.as_ptr().cast());
            // SAFETY: both buffers are the map's key size.
            let ret = unsafe { libxdp_sys::bpf_map_get_next_key(self.flows_fd, prev_ptr, key.as_mut_ptr().cast()) };
            if ret < 0 {
                break;
            }
            let mut v = [0u8; ENTRY_SIZE];
            // SAFETY: `key` and `v` are the map's key and value sizes.
            let ret =
                unsafe { libxdp_sys::bpf_map_lookup_elem(self.flows_fd, key.as_ptr().cast(), v.as_mut_ptr().cast()) };
            if ret == 0 {
                out.push(offloaded_flow(&key, &v));
            }
            prev = Some(key);
        }
        out
    }

    /// Remove the entries `pred` picks; how many went.
    pub fn remove_where(&self, pred: impl Fn(&OffloadedFlow) -> bool) -> usize {
        self.list().iter().filter(|f| pred(f) && self.remove(&f.key)).count()
    }

    /// Remove flow `key`'s entry; whether there was one.
    pub fn remove(&self, key: &FlowKey4) -> bool {
        self.recent.forget(key);
        let k = key.bytes();
        // SAFETY: `k` is the map's key size.
        unsafe { libxdp_sys::bpf_map_delete_elem(self.flows_fd, k.as_ptr().cast()) == 0 }
    }

    /// The programs' counters, summed over CPUs, by [`STAT_NAMES`]; then offers taken and refused.
    pub fn stats(&self) -> (BTreeMap<&'static str, u64>, u64, u64) {
        let cpus = possible_cpus();
        let mut out = BTreeMap::new();
        for (i, name) in STAT_NAMES.iter().enumerate() {
            let mut values = vec![0u64; cpus];
            let key = i as u32;
            // SAFETY: a per-CPU array's lookup writes one 8-byte value per possible CPU.
            let ret = unsafe {
                libxdp_sys::bpf_map_lookup_elem(self.stats_fd, (&raw const key).cast(), values.as_mut_ptr().cast())
            };
            out.insert(*name, if ret == 0 { values.iter().sum() } else { 0 });
        }
        (out, self.offered.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed))
    }
}

fn update(fd: i32, key: &[u8], value: &[u8], map: &'static str, what: &str) -> Result<(), XdpError> {
    // SAFETY: the callers pass exactly the map's key and value sizes (checked at load).
    let ret = unsafe { libxdp_sys::bpf_map_update_elem(fd, key.as_ptr().cast(), value.as_ptr().cast(), 0) };
    if ret < 0 {
        return Err(XdpError::MapUpdate {
            map,
            key: what.to_owned(),
            hint: "the map may be full",
            source: io::Error::from_raw_os_error(-ret),
        });
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: `bpf_ktime_get_ns()`'s clock.
/// `CLOCK_MONOTONIC` in nanoseconds: the programs' clock (`bpf_ktime_get_ns`, an entry's
/// `last_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// The kernel's possible CPUs (a per-CPU map holds a value for each): the highest of
/// `/sys/devices/system/cpu/possible` ("0-3", "0,2-5") plus one.
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let highest = text.trim().split([',', '-']).filter_map(|n| n.parse::<usize>().ok()).max();
    highest.map_or_else(|| std::thread::available_parallelism().map_or(1, usize::from), |h| h + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16, proto: u8) -> FlowKey4 {
        FlowKey4 { src: Ipv4Addr::new(10, 244, 1, 2), dst: Ipv4Addr::new(10, 244, 2, 2), sport, dport: 5201, proto }
    }

    #[test]
    fn a_flow_is_offered_once_in_about_a_second_and_again_once_forgotten() {
        let r = RecentOffers::new();
        let (a, b) = (key(40000, 17), key(40001, 17));
        assert!(r.first(&a, 7), "the first offer");
        assert!(!r.first(&a, 7), "the same second");
        assert!(!r.first(&a, 8), "the next second");
        assert!(r.first(&b, 8), "another flow");
        assert!(r.first(&key(40000, 6), 8), "the same ports over TCP");
        assert!(r.first(&a, 10), "two seconds later");
        r.forget(&a);
        assert!(r.first(&a, 10), "forgotten: its entry went");
        // The second counter wraps at 16 bits.
        let c = key(40002, 17);
        assert!(r.first(&c, 0xffff));
        assert!(!r.first(&c, 0x1_0000), "across the wrap");
        assert!(r.first(&c, 0x1_0002));
    }

    #[test]
    fn a_translation_of_one_end_is_repeatable_and_of_both_is_not() {
        let before = key(40000, 6);
        let (vip, backend) = (Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 244, 3, 7));
        assert_eq!(Rewrite::between(&before, &before), Some(None), "untranslated");
        let to_backend = FlowKey4 { dst: backend, dport: 8080, ..before };
        let r = Rewrite::between(&before, &to_backend);
        assert_eq!(r, Some(Some(Rewrite::Dst { addr: backend, port: 8080 })), "a client's packet to a service");
        assert_eq!(r.flatten().map(|r| r.apply(&before)), Some(to_backend));
        let reply = FlowKey4 { src: backend, dst: before.src, sport: 8080, dport: 40000, proto: 6 };
        let from_vip = FlowKey4 { src: vip, sport: 80, ..reply };
        let r = Rewrite::between(&reply, &from_vip);
        assert_eq!(r, Some(Some(Rewrite::Src { addr: vip, port: 80 })), "a backend's reply");
        assert_eq!(r.flatten().map(|r| r.apply(&reply)), Some(from_vip));
        let hairpin = FlowKey4 { src: Ipv4Addr::new(10, 244, 1, 1), dst: backend, dport: 8080, ..before };
        assert_eq!(Rewrite::between(&before, &hairpin), None, "both ends: a pod reaching itself");
        assert_eq!(Rewrite::between(&before, &FlowKey4 { proto: 17, ..before }), None);
    }

    #[test]
    fn the_map_is_listed_whole_in_batches_as_by_key() {
        if !ferry_testsupport::privileged("the_map_is_listed_whole_in_batches_as_by_key", "BPF maps", &[]) {
            return;
        }
        let o = Offload::load(4096, 4, 4789, None).expect("the offload object loads");
        assert!(o.list().is_empty(), "a new map is empty");
        // More entries than a batch, every third with a FIN, each its own packet count.
        let n = 3 * LIST_BATCH as u16 + 17;
        for i in 0..n {
            let mut v = [0u8; ENTRY_SIZE];
            v[0..4].copy_from_slice(&7u32.to_ne_bytes());
            v[4..8].copy_from_slice(&9u32.to_ne_bytes());
            v[14] = ACTION_ENCAP4;
            v[HDR_AT + 16..HDR_AT + 20].copy_from_slice(&[192, 168, 0, 2]);
            v[PACKETS_AT..PACKETS_AT + 8].copy_from_slice(&u64::from(i).to_ne_bytes());
            if i.is_multiple_of(3) {
                v[FLAGS_AT] = FLAG_SEEN_FIN;
            }
            let k = key(10_000 + i, if i.is_multiple_of(2) { 6 } else { 17 });
            update(o.flows_fd, &k.bytes(), &v, "offload_flows", "a test entry").expect("insert");
        }
        let sorted = |mut l: Vec<OffloadedFlow>| {
            l.sort_by_key(|f| f.packets);
            l
        };
        let batched = sorted(o.list_batched().expect("this kernel has batch lookups"));
        assert_eq!(batched.len(), usize::from(n), "every entry, once");
        assert_eq!(batched, sorted(o.list_by_key()), "the same entries as a walk by key");
        for (i, f) in batched.iter().enumerate() {
            let i = i as u16;
            assert_eq!(f.key, key(10_000 + i, if i.is_multiple_of(2) { 6 } else { 17 }));
            assert_eq!((f.action, f.in_ifindex, f.out_ifindex), ("encap", 7, 9));
            assert_eq!(f.remote, Some(Ipv4Addr::new(192, 168, 0, 2)));
            assert_eq!((f.fin, f.rst), (i.is_multiple_of(3), false));
        }
        // Entries removed between listings are gone from the next.
        let gone = o.remove_where(|f| f.fin);
        assert_eq!(gone, usize::from(n).div_ceil(3));
        let left = o.list();
        assert_eq!(left.len(), usize::from(n) - gone);
        assert!(left.iter().all(|f| !f.fin));
    }

    #[test]
    fn an_entry_keeps_its_translation() {
        let mut v = [0u8; ENTRY_SIZE];
        assert_eq!(rewrite_of(&v), None);
        v[FLAGS_AT] = FLAG_ECN_COPY | FLAG_NAT_DST;
        v[NAT_PORT_AT..NAT_PORT_AT + 2].copy_from_slice(&8080u16.to_be_bytes());
        v[NAT_ADDR_AT..NAT_ADDR_AT + 4].copy_from_slice(&[10, 244, 3, 7]);
        assert_eq!(rewrite_of(&v), Some(Rewrite::Dst { addr: Ipv4Addr::new(10, 244, 3, 7), port: 8080 }));
        v[FLAGS_AT] = FLAG_NAT_SRC;
        assert_eq!(rewrite_of(&v), Some(Rewrite::Src { addr: Ipv4Addr::new(10, 244, 3, 7), port: 8080 }));
    }
}

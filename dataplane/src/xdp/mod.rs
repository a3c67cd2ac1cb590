//! ferry's own XDP programs: load, configure, attach, detach (setup side; the programs run in
//! the kernel for every received frame, this code never does).
//!
//! The programs (BPF C in `dataplane/bpf/`, compiled by clang from `build.rs` and embedded here)
//! decide which frames reach ferry's AF_XDP sockets; everything else goes on to the kernel:
//!
//! - **uplink** ([`XdpProgram::uplink`]), on a node's underlay interface: only tunnel packets for
//!   this node (IPv4/IPv6, one VLAN tag tolerated, UDP to the tunnel port, addressed to the node's
//!   underlay address), the first fragment of a tunnel datagram among them (ferry drops and counts
//!   it). ARP, the node's own traffic, later fragments and malformed IPv4 pass, so taking over the
//!   node's main interface never cuts the node off (see `bpf/uplink.c` for what the kernel counts).
//! - **pod** ([`XdpProgram::pod`]), on the host end of a pod's veth: packets to the pod networks,
//!   ARP for the pod gateway's IPv4 address and neighbour solicitations for its IPv6 address.
//! - **sink** ([`XdpProgram::sink`]), for test tools such as `ferry pktgen`: every frame of a queue
//!   that has a socket. Never for an interface the node depends on.
//!
//! A program is loaded and configured first; [`XdpProgram::set_socket`] (or
//! [`add_port`](XdpProgram::add_port)) puts the AF_XDP socket of each receive queue into its
//! socket map, and [`XdpProgram::attach`] attaches it, returning an [`XdpAttachment`] guard that
//! removes the program when dropped.
//!
//! Attachment goes through a BPF link, so the kernel also removes the program when ferry dies
//! without cleaning up: the interface is left as found even after `kill -9`. A ferry program that
//! is attached *without* a link (an earlier ferry's, or one attached by hand) is stale and gets
//! replaced, with a warning; a program ferry did not write is left alone and reported. Native
//! (driver) mode is tried first, with a logged fallback to generic (skb) mode; one XDP program
//! per interface (no libxdp dispatcher).
//!
//! Interface names and indexes belong to a network namespace: attach from a thread in the
//! namespace the interface lives in.

mod error;
mod libbpf_log;
mod maps;
pub mod offload;
pub(crate) mod sys;

use std::ffi::{CStr, CString};
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{OwnedFd, RawFd};
use std::ptr::NonNull;

use ipnet::{Ipv4Net, Ipv6Net};

pub use self::error::XdpError;
use self::error::is_permission;
use self::sys::{RealSys, Sys, xdp_flags};
use crate::port::xsk::XskPort;

/// A BPF object compiled by `build.rs`, aligned for libelf.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static UPLINK_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/uplink.bpf.o")));
static POD_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/pod.bpf.o")));
static SINK_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/sink.bpf.o")));

/// Which of ferry's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// The underlay interface's program.
    Uplink,
    /// A pod interface's program.
    Pod,
    /// The catch-all program of test tools (`ferry pktgen`'s receiver).
    Sink,
}

impl ProgramKind {
    /// The program's name in the kernel (`bpftool prog`, `ip link`).
    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::Uplink => "ferry_uplink",
            ProgramKind::Pod => "ferry_pod",
            ProgramKind::Sink => "ferry_sink",
        }
    }

    fn c_name(self) -> &'static CStr {
        match self {
            ProgramKind::Uplink => c"ferry_uplink",
            ProgramKind::Pod => c"ferry_pod",
            ProgramKind::Sink => c"ferry_sink",
        }
    }

    fn object(self) -> &'static [u8] {
        match self {
            ProgramKind::Uplink => &UPLINK_OBJECT.0,
            ProgramKind::Pod => &POD_OBJECT.0,
            ProgramKind::Sink => &SINK_OBJECT.0,
        }
    }
}

/// Whether a program attached to an interface is one of ferry's (by its kernel name).
fn is_ferry_program(name: &str) -> bool {
    name == ProgramKind::Uplink.name() || name == ProgramKind::Pod.name() || name == ProgramKind::Sink.name()
}

/// What the uplink program lets through to ferry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// The tunnel's UDP destination port (4789 for VXLAN, 6081 for Geneve).
    pub tunnel_port: u16,
    /// This node's IPv4 underlay address, if it has one.
    pub local_v4: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address, if it has one.
    pub local_v6: Option<Ipv6Addr>,
}

/// What the pod program lets through to ferry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// The cluster's IPv4 pod networks.
    pub nets_v4: Vec<Ipv4Net>,
    /// The cluster's IPv6 pod networks.
    pub nets_v6: Vec<Ipv6Net>,
    /// The pod gateway's IPv4 address (ARP for it goes to ferry).
    pub gateway_v4: Option<Ipv4Addr>,
    /// The pod gateway's IPv6 address (neighbour solicitations for it go to ferry).
    pub gateway_v6: Option<Ipv6Addr>,
}

/// The attach mode asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Native, falling back to generic (logged) when the driver cannot.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only: works on any interface, slower.
    Generic,
}

/// The mode a program got attached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before any socket buffer is allocated.
    Native,
    /// In the generic receive path, after the socket buffer is allocated.
    Generic,
}

impl AttachMode {
    fn flags(self) -> u32 {
        match self {
            AttachMode::Native => xdp_flags::DRV_MODE,
            AttachMode::Generic => xdp_flags::SKB_MODE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// An XDP program's verdict on a frame ([`XdpProgram::test_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    /// `XDP_ABORTED`.
    Aborted,
    /// `XDP_DROP`.
    Drop,
    /// `XDP_PASS`: on to the kernel.
    Pass,
    /// `XDP_TX`.
    Tx,
    /// `XDP_REDIRECT`: to the AF_XDP socket.
    Redirect,
    /// Anything else.
    Other(u32),
}

impl From<u32> for XdpAction {
    fn from(v: u32) -> Self {
        match v {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            v => XdpAction::Other(v),
        }
    }
}

/// One of ferry's XDP programs, loaded into the kernel and configured, not (yet) attached.
///
/// Dropping it unloads it (the kernel keeps it while it is attached).
#[derive(Debug)]
pub struct XdpProgram {
    obj: NonNull<libxdp_sys::bpf_object>,
    kind: ProgramKind,
    prog_fd: RawFd,
    xsks_fd: RawFd,
    queues: u32,
}

// SAFETY: the libbpf object is owned by this value alone and libbpf keeps no thread-affine state in
// it; every use goes through `&self`/`&mut self`, and the calls made through `&self` (map updates,
// test runs) are plain bpf(2) syscalls on descriptors, safe from any thread.
unsafe impl Send for XdpProgram {}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        // SAFETY: `obj` came from `bpf_object__open_mem` and is closed exactly once, here; the
        // descriptors taken from it are not used after this.
        unsafe { libxdp_sys::bpf_object__close(self.obj.as_ptr()) };
    }
}

impl XdpProgram {
    /// Load the uplink program for an interface with `queues` receive queues, configured with
    /// `cfg`.
    ///
    /// # Errors
    /// No local address or a zero port ([`XdpError::InvalidConfig`]); missing privileges
    /// ([`XdpError::NotPermitted`]); the kernel rejecting the program ([`XdpError::Load`]).
    pub fn uplink(cfg: &UplinkConfig, queues: u32) -> Result<Self, XdpError> {
        if cfg.local_v4.is_none() && cfg.local_v6.is_none() {
            return Err(XdpError::InvalidConfig {
                problem: "the uplink program has no local address".to_owned(),
                fix: "give the node's underlay IPv4 and/or IPv6 address",
            });
        }
        if cfg.tunnel_port == 0 {
            return Err(XdpError::InvalidConfig {
                problem: "the tunnel port is 0".to_owned(),
                fix: "use the tunnel's UDP port (4789 for VXLAN, 6081 for Geneve)",
            });
        }
        let prog = Self::load(ProgramKind::Uplink, queues, &[])?;
        let value = maps::uplink_config(cfg.tunnel_port, cfg.local_v4, cfg.local_v6);
        prog.update("uplink_config", &0u32.to_ne_bytes(), &value, "0", "the map is an array of one entry")?;
        Ok(prog)
    }

    /// Hand packets for a service's frontend (an uplink program only) to ferry (`on`), or stop
    /// (`!on`): `addr` is an external or load-balancer IP, or `None` for a node port on this node's
    /// address; `proto` the IP protocol.
    ///
    /// # Errors
    /// The map is full (65,536 frontends) or the kernel refuses ([`XdpError::MapUpdate`]).
    pub fn set_frontend(&self, addr: Option<std::net::IpAddr>, port: u16, proto: u8, on: bool) -> Result<(), XdpError> {
        let text = match addr {
            Some(a) => format!("{a} port {port} proto {proto}"),
            None => format!("node port {port} proto {proto}"),
        };
        self.set_key(
            "frontends",
            maps::service_key(addr, port, proto),
            text,
            on,
            "the map holds at most 65,536 frontends",
        )
    }

    /// Hand a pod's TCP or UDP packets from `addr:port` to ferry (`on`), or stop (a pod program
    /// only): the pod is a local endpoint of an `externalTrafficPolicy: Local` service, whose
    /// replies to clients outside the cluster ferry translates back.
    ///
    /// # Errors
    /// The map is full (1,024 entries) or the kernel refuses ([`XdpError::MapUpdate`]).
    pub fn set_backend(&self, addr: std::net::IpAddr, port: u16, proto: u8, on: bool) -> Result<(), XdpError> {
        let text = format!("{addr} port {port} proto {proto}");
        self.set_key(
            "backends",
            maps::service_key(Some(addr), port, proto),
            text,
            on,
            "the map holds at most 1,024 backends",
        )
    }

    /// Hand ferry every unicast IP packet the pod sends (`on`: NetworkPolicy selects the pod, so
    /// ferry judges its traffic to outside the pod networks and tracks its connections), or only
    /// what is for the pod networks (a pod program only).
    ///
    /// # Errors
    /// The kernel refuses ([`XdpError::MapUpdate`]).
    pub fn set_isolated(&self, on: bool) -> Result<(), XdpError> {
        self.update("isolated", &0u32.to_ne_bytes(), &[u8::from(on)], "0", "the map is an array of one entry")
    }

    fn set_key(
        &self,
        map: &'static str,
        key: [u8; maps::SERVICE_KEY_SIZE],
        text: String,
        on: bool,
        hint: &'static str,
    ) -> Result<(), XdpError> {
        if on {
            return self.update(map, &key, &[1], &text, hint);
        }
        let m = self.map(map).ok_or_else(|| XdpError::Load {
            program: self.kind.name(),
            source: io::Error::new(io::ErrorKind::NotFound, format!("map `{map}` is missing from the embedded object")),
        })?;
        // SAFETY: `m` belongs to this loaded object.
        let fd = unsafe { libxdp_sys::bpf_map__fd(m.as_ptr()) };
        // SAFETY: the key is the map's key size (SERVICE_KEY_SIZE, checked when it was added).
        let ret = unsafe { libxdp_sys::bpf_map_delete_elem(fd, key.as_ptr().cast()) };
        if ret < 0 && -ret != libc::ENOENT {
            return Err(XdpError::MapUpdate {
                map,
                key: text,
                hint: "removing an entry should not fail; check the kernel log",
                source: io::Error::from_raw_os_error(-ret),
            });
        }
        Ok(())
    }

    /// Load the pod program for an interface with `queues` receive queues, configured with `cfg`.
    ///
    /// # Errors
    /// No pod network ([`XdpError::InvalidConfig`]); missing privileges
    /// ([`XdpError::NotPermitted`]); the kernel rejecting the program ([`XdpError::Load`]).
    pub fn pod(cfg: &PodConfig, queues: u32) -> Result<Self, XdpError> {
        if cfg.nets_v4.is_empty() && cfg.nets_v6.is_empty() {
            return Err(XdpError::InvalidConfig {
                problem: "the pod program has no pod network".to_owned(),
                fix: "give the cluster's pod CIDRs",
            });
        }
        // Size the tries to the networks given (at least one entry: the kernel refuses empty maps).
        let sizes = [("pod_nets4", cfg.nets_v4.len()), ("pod_nets6", cfg.nets_v6.len())];
        let prog = Self::load(ProgramKind::Pod, queues, &sizes)?;
        let value = maps::pod_config(cfg.gateway_v4, cfg.gateway_v6);
        prog.update("pod_config", &0u32.to_ne_bytes(), &value, "0", "the map is an array of one entry")?;
        for net in &cfg.nets_v4 {
            let hint = "the trie holds one entry per configured network";
            prog.update("pod_nets4", &maps::lpm4_key(net.trunc()), &[1], &net.to_string(), hint)?;
        }
        for net in &cfg.nets_v6 {
            let hint = "the trie holds one entry per configured network";
            prog.update("pod_nets6", &maps::lpm6_key(net.trunc()), &[1], &net.to_string(), hint)?;
        }
        Ok(prog)
    }

    /// Load the catch-all program for an interface with `queues` receive queues: every frame of a
    /// queue with a socket goes to that socket (test tools; never on an interface the node needs).
    ///
    /// # Errors
    /// Missing privileges ([`XdpError::NotPermitted`]); the kernel rejecting the program
    /// ([`XdpError::Load`]).
    pub fn sink(queues: u32) -> Result<Self, XdpError> {
        Self::load(ProgramKind::Sink, queues, &[])
    }

    /// [`XdpProgram::sink`], loaded as multi-buffer aware (`BPF_F_XDP_HAS_FRAGS`, what libbpf's
    /// `xdp.frags` section sets): the kernel may then hand it a frame larger than one page, in
    /// fragments, and an AF_XDP socket bound with `XDP_USE_SG` receives it as a chain of
    /// descriptors. For measuring what reaches a socket (`examples/veth_gso.rs`).
    ///
    /// # Errors
    /// As [`XdpProgram::sink`].
    pub fn sink_multi_buffer(queues: u32) -> Result<Self, XdpError> {
        Self::load_with(ProgramKind::Sink, queues, &[], libxdp_sys::BPF_F_XDP_HAS_FRAGS)
    }

    fn load(kind: ProgramKind, queues: u32, sizes: &[(&str, usize)]) -> Result<Self, XdpError> {
        Self::load_with(kind, queues, sizes, 0)
    }

    fn load_with(kind: ProgramKind, queues: u32, sizes: &[(&str, usize)], flags: u32) -> Result<Self, XdpError> {
        if queues == 0 {
            return Err(XdpError::InvalidConfig {
                problem: "the program is loaded for 0 queues".to_owned(),
                fix: "give the interface's queue count (at least 1)",
            });
        }
        libbpf_log::install();
        let program = kind.name();
        let bytes = kind.object();
        // SAFETY: `bpf_object_open_opts` is plain data; all-zero is its documented initial state.
        let mut opts: libxdp_sys::bpf_object_open_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_object_open_opts>();
        opts.object_name = kind.c_name().as_ptr();
        // SAFETY: `bytes` is a static, 8-byte aligned ELF object, so whatever libbpf and libelf keep
        // pointing into stays valid (and they only read it); `opts` is valid for the call.
        let obj = unsafe { libxdp_sys::bpf_object__open_mem(bytes.as_ptr().cast(), bytes.len(), &raw const opts) };
        let obj = NonNull::new(obj).ok_or_else(|| XdpError::Load { program, source: io::Error::last_os_error() })?;
        // From here on, dropping `prog` closes the object.
        let mut prog = XdpProgram { obj, kind, prog_fd: -1, xsks_fd: -1, queues };

        let missing = |what: &str| XdpError::Load {
            program,
            source: io::Error::new(io::ErrorKind::NotFound, format!("{what} is missing from the embedded object")),
        };
        let mut resize = vec![("xsks", queues)];
        resize.extend(sizes.iter().map(|&(name, n)| (name, n.max(1).try_into().unwrap_or(u32::MAX))));
        for (name, entries) in resize {
            let map = prog.map(name).ok_or_else(|| missing("a map"))?;
            // SAFETY: `map` belongs to the opened, not yet loaded object.
            let ret = unsafe { libxdp_sys::bpf_map__set_max_entries(map.as_ptr(), entries) };
            if ret < 0 {
                return Err(XdpError::Load { program, source: io::Error::from_raw_os_error(-ret) });
            }
        }

        if flags != 0 {
            // SAFETY: the object is opened, not loaded; the name is a valid C string.
            let p = unsafe { libxdp_sys::bpf_object__find_program_by_name(prog.obj.as_ptr(), kind.c_name().as_ptr()) };
            if p.is_null() {
                return Err(missing("the program"));
            }
            // SAFETY: `p` is a program of the opened object, whose flags may change until it loads.
            let ret = unsafe { libxdp_sys::bpf_program__set_flags(p, libxdp_sys::bpf_program__flags(p) | flags) };
            if ret < 0 {
                return Err(XdpError::Load { program, source: io::Error::from_raw_os_error(-ret) });
            }
        }
        // SAFETY: `obj` is an opened object that has not been loaded yet.
        let ret = unsafe { libxdp_sys::bpf_object__load(prog.obj.as_ptr()) };
        if ret < 0 {
            let source = io::Error::from_raw_os_error(-ret);
            return Err(if is_permission(&source) {
                XdpError::NotPermitted { action: "loading ferry's XDP program", source }
            } else {
                XdpError::Load { program, source }
            });
        }
        // SAFETY: the object is loaded; the name is a valid C string.
        let p = unsafe { libxdp_sys::bpf_object__find_program_by_name(prog.obj.as_ptr(), kind.c_name().as_ptr()) };
        if p.is_null() {
            return Err(missing("the program"));
        }
        // SAFETY: `p` is a program of the loaded object.
        prog.prog_fd = unsafe { libxdp_sys::bpf_program__fd(p) };
        let xsks = prog.map("xsks").ok_or_else(|| missing("the socket map"))?;
        // SAFETY: `xsks` is a map of the loaded object.
        prog.xsks_fd = unsafe { libxdp_sys::bpf_map__fd(xsks.as_ptr()) };
        if prog.prog_fd < 0 || prog.xsks_fd < 0 {
            return Err(missing("a descriptor"));
        }
        Ok(prog)
    }

    fn map(&self, name: &str) -> Option<NonNull<libxdp_sys::bpf_map>> {
        let name = CString::new(name).ok()?;
        // SAFETY: `obj` is a valid object and `name` a valid C string.
        NonNull::new(unsafe { libxdp_sys::bpf_object__find_map_by_name(self.obj.as_ptr(), name.as_ptr()) })
    }

    /// Write one map entry, after checking that the map's key and value sizes are the lengths of
    /// `key` and `value` (the kernel reads exactly those sizes from the pointers).
    fn update(
        &self,
        map: &'static str,
        key: &[u8],
        value: &[u8],
        key_text: &str,
        hint: &'static str,
    ) -> Result<(), XdpError> {
        let m = self.map(map).ok_or_else(|| XdpError::Load {
            program: self.kind.name(),
            source: io::Error::new(io::ErrorKind::NotFound, format!("map `{map}` is missing from the embedded object")),
        })?;
        // SAFETY: `m` belongs to this loaded object.
        let (key_size, value_size, fd) = unsafe {
            let m = m.as_ptr();
            (libxdp_sys::bpf_map__key_size(m), libxdp_sys::bpf_map__value_size(m), libxdp_sys::bpf_map__fd(m))
        };
        for (what, found, expected) in [("key", key_size, key.len()), ("value", value_size, value.len())] {
            if found as usize != expected {
                return Err(XdpError::MapLayout { map, what, found, expected: expected as u32 });
            }
        }
        // SAFETY: `key` and `value` are exactly the map's key and value sizes (checked above), which
        // is all the kernel reads from them.
        let ret = unsafe { libxdp_sys::bpf_map_update_elem(fd, key.as_ptr().cast(), value.as_ptr().cast(), 0) };
        if ret < 0 {
            let source = io::Error::from_raw_os_error(-ret);
            return Err(XdpError::MapUpdate { map, key: key_text.to_owned(), hint, source });
        }
        Ok(())
    }

    /// Which program this is.
    pub fn kind(&self) -> ProgramKind {
        self.kind
    }

    /// The number of receive queues the socket map has slots for.
    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// Send frames the program selects on receive queue `queue` to the AF_XDP socket `fd`.
    ///
    /// # Errors
    /// A queue without a slot ([`XdpError::QueueOutOfRange`]); a descriptor that is not a bound
    /// AF_XDP socket ([`XdpError::MapUpdate`]).
    pub fn set_socket(&self, queue: u32, fd: RawFd) -> Result<(), XdpError> {
        if queue >= self.queues {
            return Err(XdpError::QueueOutOfRange { queue, queues: self.queues });
        }
        let value = u32::try_from(fd).unwrap_or(u32::MAX);
        let hint = "the descriptor must be an AF_XDP socket bound to a queue";
        self.update("xsks", &queue.to_ne_bytes(), &value.to_ne_bytes(), &queue.to_string(), hint)
    }

    /// Send frames the program selects on `port`'s queue to `port`'s socket.
    ///
    /// # Errors
    /// As [`set_socket`](Self::set_socket).
    pub fn add_port(&self, port: &XskPort) -> Result<(), XdpError> {
        self.set_socket(port.queue(), port.fd())
    }

    /// Stop sending frames of receive queue `queue` to a socket (they pass to the kernel).
    ///
    /// # Errors
    /// A queue without a slot ([`XdpError::QueueOutOfRange`]); a kernel error other than "no
    /// socket there" ([`XdpError::MapUpdate`]).
    pub fn clear_socket(&self, queue: u32) -> Result<(), XdpError> {
        if queue >= self.queues {
            return Err(XdpError::QueueOutOfRange { queue, queues: self.queues });
        }
        let key = queue.to_ne_bytes();
        // SAFETY: the key is 4 bytes, the key size of every XSKMAP (the kernel refuses any other).
        let ret = unsafe { libxdp_sys::bpf_map_delete_elem(self.xsks_fd, key.as_ptr().cast()) };
        if ret < 0 && -ret != libc::ENOENT {
            return Err(XdpError::MapUpdate {
                map: "xsks",
                key: queue.to_string(),
                hint: "clearing a socket slot should not fail; check the kernel log",
                source: io::Error::from_raw_os_error(-ret),
            });
        }
        Ok(())
    }

    /// Run the program once on `frame` (as if received on queue 0 of the loopback interface) and
    /// return its verdict, without attaching it anywhere. A frame it would redirect shows as
    /// [`XdpAction::Redirect`] only when a socket is set for queue 0, as on a real interface.
    ///
    /// # Errors
    /// A frame shorter than an Ethernet header or longer than a page, or missing privileges
    /// ([`XdpError::TestRun`]).
    pub fn test_run(&self, frame: &[u8]) -> Result<XdpAction, XdpError> {
        // SAFETY: `bpf_test_run_opts` is plain data; all-zero is its documented initial state.
        let mut opts: libxdp_sys::bpf_test_run_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_test_run_opts>();
        opts.data_in = frame.as_ptr().cast();
        opts.data_size_in = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        opts.repeat = 1;
        // SAFETY: the kernel reads `data_size_in` bytes from `data_in`, which is `frame`; no output
        // buffers are given.
        let ret = unsafe { libxdp_sys::bpf_prog_test_run_opts(self.prog_fd, &raw mut opts) };
        if ret < 0 {
            return Err(XdpError::TestRun { program: self.kind.name(), source: io::Error::from_raw_os_error(-ret) });
        }
        Ok(XdpAction::from(opts.retval))
    }

    /// Attach the program to interface `ifname`.
    ///
    /// Replaces a stale ferry program found there (one attached without a link), with a warning.
    /// With [`XdpMode::Auto`], falls back from native to generic mode with a warning.
    ///
    /// # Errors
    /// The interface is missing ([`XdpError::NoSuchInterface`]); another program is there
    /// ([`XdpError::ForeignProgram`], [`XdpError::InUse`]); missing privileges
    /// ([`XdpError::NotPermitted`]); no mode works ([`XdpError::Unsupported`],
    /// [`XdpError::Attach`]).
    pub fn attach(self, ifname: &str, mode: XdpMode) -> Result<XdpAttachment, XdpError> {
        let (ifindex, link, mode) = attach_with(&RealSys, self.prog_fd, ifname, mode)?;
        tracing::info!(ifname, program = self.kind.name(), mode = mode.label(), "attached XDP program");
        Ok(XdpAttachment { program: self, ifname: ifname.to_owned(), ifindex, mode, link: Some(link) })
    }
}

/// Attach `prog_fd` to `ifname`, replacing a stale ferry program; returns the interface index,
/// the link and the mode.
fn attach_with(
    sys: &impl Sys,
    prog_fd: RawFd,
    ifname: &str,
    mode: XdpMode,
) -> Result<(u32, OwnedFd, AttachMode), XdpError> {
    let ifindex = sys.if_index(ifname).map_err(|_| XdpError::NoSuchInterface { ifname: ifname.to_owned() })?;
    remove_stale(sys, ifindex, ifname)?;
    let link = |m: AttachMode| sys.xdp_link(ifindex, prog_fd, m.flags());
    let only = |m: AttachMode, fix: &'static str| {
        link(m).map(|l| (ifindex, l, m)).map_err(|source| {
            if is_permission(&source) {
                XdpError::NotPermitted { action: "attaching an XDP program", source }
            } else {
                XdpError::Attach { ifname: ifname.to_owned(), mode: m.label(), source, fix }
            }
        })
    };
    match mode {
        XdpMode::Native => only(
            AttachMode::Native,
            "the driver may not support native XDP (use auto or generic mode), or the MTU is too large for it",
        ),
        XdpMode::Generic => only(AttachMode::Generic, "the kernel may lack XDP support (CONFIG_BPF_SYSCALL)"),
        XdpMode::Auto => match link(AttachMode::Native) {
            Ok(l) => Ok((ifindex, l, AttachMode::Native)),
            Err(source) if is_permission(&source) => {
                Err(XdpError::NotPermitted { action: "attaching an XDP program", source })
            }
            Err(native) => {
                tracing::warn!(
                    ifname,
                    error = %native,
                    "native XDP is unavailable on this interface; falling back to generic (skb) mode, which is slower"
                );
                match link(AttachMode::Generic) {
                    Ok(l) => Ok((ifindex, l, AttachMode::Generic)),
                    Err(generic) => Err(XdpError::Unsupported { ifname: ifname.to_owned(), native, generic }),
                }
            }
        },
    }
}

/// Remove stale ferry programs from `ifindex`; refuse if any other program is attached.
fn remove_stale(sys: &impl Sys, ifindex: u32, ifname: &str) -> Result<(), XdpError> {
    let netlink = |action: &'static str, source: io::Error| {
        if is_permission(&source) {
            XdpError::NotPermitted { action, source }
        } else {
            XdpError::Netlink { action, ifname: ifname.to_owned(), source }
        }
    };
    let ids = sys.xdp_query(ifindex).map_err(|e| netlink("asking which XDP programs are attached", e))?;
    let attached =
        [(ids.native, xdp_flags::DRV_MODE), (ids.generic, xdp_flags::SKB_MODE), (ids.offload, xdp_flags::HW_MODE)];
    for (id, flags) in attached {
        if id == 0 {
            continue;
        }
        let name = sys.prog_name(id).map_err(|e| netlink("reading the name of the attached XDP program", e))?;
        if !is_ferry_program(&name) {
            return Err(XdpError::ForeignProgram { ifname: ifname.to_owned(), name, id });
        }
        match sys.xdp_detach_legacy(ifindex, flags) {
            Ok(()) => tracing::warn!(ifname, id, name, "removed a stale ferry XDP program left by an earlier run"),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(XdpError::InUse { ifname: ifname.to_owned(), name, id });
            }
            Err(e) => return Err(netlink("removing a stale ferry XDP program", e)),
        }
    }
    Ok(())
}

/// One of ferry's programs attached to an interface. Dropping it detaches the program (errors are
/// logged); [`detach`](Self::detach) does the same and reports errors.
#[derive(Debug)]
pub struct XdpAttachment {
    program: XdpProgram,
    ifname: String,
    ifindex: u32,
    mode: AttachMode,
    link: Option<OwnedFd>,
}

impl XdpAttachment {
    /// The attached program (to set sockets on, say).
    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    /// The mode the program was attached in.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The interface.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The interface's index (in the namespace it was attached from).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Detach the program, leaving the interface as it was found.
    ///
    /// # Errors
    /// The kernel refused to detach ([`XdpError::Netlink`]); the link is closed anyway, so the
    /// program goes away once no process holds a copy of it.
    pub fn detach(mut self) -> Result<(), XdpError> {
        self.unlink()
    }

    fn unlink(&mut self) -> Result<(), XdpError> {
        let Some(link) = self.link.take() else { return Ok(()) };
        match RealSys.xdp_unlink(link) {
            Ok(()) => {
                tracing::info!(ifname = self.ifname, program = self.program.kind.name(), "detached XDP program");
                Ok(())
            }
            // The interface went away (a deleted pod): nothing is left attached.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) || e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            Err(source) => {
                Err(XdpError::Netlink { action: "detaching ferry's XDP program", ifname: self.ifname.clone(), source })
            }
        }
    }
}

impl Drop for XdpAttachment {
    fn drop(&mut self) {
        if let Err(e) = self.unlink() {
            tracing::warn!(error = %e, "detaching on drop failed");
        }
    }
}

/// The number of receive queues interface `ifname` has (ethtool channels), if its driver says.
///
/// # Errors
/// The interface is missing ([`XdpError::NoSuchInterface`]).
pub fn queue_count(ifname: &str) -> Result<Option<u32>, XdpError> {
    queue_count_with(&RealSys, ifname)
}

fn queue_count_with(sys: &impl Sys, ifname: &str) -> Result<Option<u32>, XdpError> {
    match sys.queue_count(ifname) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            Err(XdpError::NoSuchInterface { ifname: ifname.to_owned() })
        }
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests;

//! The setup syscalls behind ferry's AF_XDP ports and XDP programs, in one place (setup side;
//! nothing here runs per packet).
//!
//! Whatever asks the kernel about an interface, probes for AF_XDP, sets a socket option, or
//! attaches and detaches an XDP program goes through the [`Sys`] trait, so unit tests can put a
//! fake kernel in its place (the idea of aya's `sys/fake.rs`) and check fallbacks and error
//! messages without privileges. [`RealSys`] is the kernel. Loading BPF objects and creating AF_XDP
//! sockets stay with libbpf and xsk-rs; their errors are classified by plain functions that the
//! unit tests feed with errno values instead.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use libc::c_int;

/// `XDP_FLAGS_*` from `<linux/if_link.h>` (stable UAPI values; libxdp-sys does not export them).
pub(crate) mod xdp_flags {
    /// Generic (skb) mode.
    pub(crate) const SKB_MODE: u32 = 1 << 1;
    /// Native (driver) mode.
    pub(crate) const DRV_MODE: u32 = 1 << 2;
    /// Offloaded (hardware) mode.
    pub(crate) const HW_MODE: u32 = 1 << 3;
}

/// The ids of the XDP programs attached to an interface, per mode; 0 means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct XdpProgIds {
    pub(crate) native: u32,
    pub(crate) generic: u32,
    pub(crate) offload: u32,
}

/// The setup syscalls. Every method is one kernel interaction (or a short fixed sequence of them).
pub(crate) trait Sys {
    /// The index of interface `ifname` in the caller's network namespace.
    fn if_index(&self, ifname: &str) -> io::Result<u32>;

    /// How many queues `ifname` has for AF_XDP (ethtool channels: combined plus the larger of rx
    /// and tx); `EOPNOTSUPP` when the driver does not say.
    fn queue_count(&self, ifname: &str) -> io::Result<u32>;

    /// Create and close an AF_XDP socket: `EAFNOSUPPORT` without AF_XDP in the kernel, `EPERM`
    /// without `CAP_NET_RAW`.
    fn probe_af_xdp(&self) -> io::Result<()>;

    /// `setsockopt` with an integer value.
    fn set_sockopt(&self, fd: RawFd, level: c_int, name: c_int, value: u32) -> io::Result<()>;

    /// `getsockopt` of an integer value.
    fn get_sockopt(&self, fd: RawFd, level: c_int, name: c_int) -> io::Result<u32>;

    /// Writes a number to the interface's attribute file `/sys/class/net/<ifname>/<attr>` (the
    /// caller's network namespace must be the one /sys was mounted in, as under `ip netns exec`).
    fn set_net_attr(&self, ifname: &str, attr: &str, value: u64) -> io::Result<()>;

    /// The XDP programs attached to interface `ifindex`.
    fn xdp_query(&self, ifindex: u32) -> io::Result<XdpProgIds>;

    /// The name of BPF program `id` (at most 15 bytes, as the kernel keeps it).
    fn prog_name(&self, id: u32) -> io::Result<String>;

    /// Attach program `prog_fd` to `ifindex` through a BPF link, in the mode `flags` names
    /// (`xdp_flags::SKB_MODE` or `DRV_MODE`). The program stays attached while the returned link
    /// descriptor is open, and the kernel detaches it when the descriptor closes, also when the
    /// process dies.
    fn xdp_link(&self, ifindex: u32, prog_fd: RawFd, flags: u32) -> io::Result<OwnedFd>;

    /// Detach the program held by `link` and close it. Detaching first, rather than only closing,
    /// removes the program even if another process inherited a copy of the descriptor.
    fn xdp_unlink(&self, link: OwnedFd) -> io::Result<()>;

    /// Detach a program attached without a link (netlink) in the mode `flags` names. `EBUSY` when
    /// the program there is held by a link (a live process owns it).
    fn xdp_detach_legacy(&self, ifindex: u32, flags: u32) -> io::Result<()>;
}

/// The kernel.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RealSys;

fn c_name(ifname: &str) -> io::Result<CString> {
    CString::new(ifname).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))
}

/// libbpf returns `-errno`.
fn libbpf_result(ret: c_int) -> io::Result<c_int> {
    if ret < 0 { Err(io::Error::from_raw_os_error(-ret)) } else { Ok(ret) }
}

/// `struct ethtool_channels` from `<linux/ethtool.h>`.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

impl Sys for RealSys {
    fn if_index(&self, ifname: &str) -> io::Result<u32> {
        let name = c_name(ifname)?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 { Err(io::Error::last_os_error()) } else { Ok(index) }
    }

    fn queue_count(&self, ifname: &str) -> io::Result<u32> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut channels = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
        // SAFETY: `channels` is the whole `struct ethtool_channels` that ETHTOOL_GCHANNELS fills.
        unsafe { crate::kernel::ethtool(sock.as_fd(), ifname, &mut channels) }?;
        let count = channels.combined_count + channels.rx_count.max(channels.tx_count);
        if count == 0 { Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)) } else { Ok(count) }
    }

    fn probe_af_xdp(&self) -> io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns; dropping it closes it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    }

    fn set_sockopt(&self, fd: RawFd, level: c_int, name: c_int, value: u32) -> io::Result<()> {
        // SAFETY: the option value is a `u32` on the stack whose size is passed alongside; the kernel
        // only reads it. A bad `fd` is reported as EBADF.
        let ret = unsafe {
            libc::setsockopt(fd, level, name, (&raw const value).cast(), mem::size_of::<u32>() as libc::socklen_t)
        };
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn get_sockopt(&self, fd: RawFd, level: c_int, name: c_int) -> io::Result<u32> {
        let mut value = 0u32;
        let mut len = mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `value` and updates `len`; both are
        // valid for the call.
        let ret = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
    }

    fn set_net_attr(&self, ifname: &str, attr: &str, value: u64) -> io::Result<()> {
        if ifname.is_empty() || ifname.contains(['/', '\0']) || ifname == "." || ifname == ".." {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        std::fs::write(format!("/sys/class/net/{ifname}/{attr}"), value.to_string())
    }

    fn xdp_query(&self, ifindex: u32) -> io::Result<XdpProgIds> {
        // SAFETY: `bpf_xdp_query_opts` is plain data; all-zero is its documented initial state.
        let mut opts: libxdp_sys::bpf_xdp_query_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_xdp_query_opts>();
        // SAFETY: `opts` is valid and its `sz` says how much libbpf may write.
        libbpf_result(unsafe { libxdp_sys::bpf_xdp_query(ifindex as c_int, 0, &raw mut opts) })?;
        Ok(XdpProgIds { native: opts.drv_prog_id, generic: opts.skb_prog_id, offload: opts.hw_prog_id })
    }

    fn prog_name(&self, id: u32) -> io::Result<String> {
        // SAFETY: plain bpf(2) wrapper; the result is checked before use.
        let fd = libbpf_result(unsafe { libxdp_sys::bpf_prog_get_fd_by_id(id) })?;
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `bpf_prog_info` is plain data; all-zero is what the kernel expects on input.
        let mut info: libxdp_sys::bpf_prog_info = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libxdp_sys::bpf_prog_info>() as u32;
        // SAFETY: the kernel writes at most `len` bytes into `info`; every pointer field in it is
        // zero, so it writes nothing else.
        libbpf_result(unsafe { libxdp_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &raw mut info, &raw mut len) })?;
        let bytes: Vec<u8> = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn xdp_link(&self, ifindex: u32, prog_fd: RawFd, flags: u32) -> io::Result<OwnedFd> {
        // SAFETY: `bpf_link_create_opts` is plain data (a union of plain data); all-zero is its
        // documented initial state.
        let mut opts: libxdp_sys::bpf_link_create_opts = unsafe { mem::zeroed() };
        opts.sz = mem::size_of::<libxdp_sys::bpf_link_create_opts>();
        opts.flags = flags;
        // SAFETY: `opts` is valid for the call; the kernel validates `prog_fd` and `ifindex`.
        let fd = libbpf_result(unsafe {
            libxdp_sys::bpf_link_create(prog_fd, ifindex as c_int, libxdp_sys::bpf_attach_type_BPF_XDP, &raw const opts)
        })?;
        // SAFETY: `fd` is the new link's descriptor, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn xdp_unlink(&self, link: OwnedFd) -> io::Result<()> {
        // SAFETY: `link` is an open BPF link descriptor owned by the caller; closing it follows.
        let detached = libbpf_result(unsafe { libxdp_sys::bpf_link_detach(link.as_raw_fd()) }).map(drop);
        drop(link);
        detached
    }

    fn xdp_detach_legacy(&self, ifindex: u32, flags: u32) -> io::Result<()> {
        // SAFETY: no options are passed; the kernel validates `ifindex`.
        libbpf_result(unsafe { libxdp_sys::bpf_xdp_detach(ifindex as c_int, flags, ptr::null()) }).map(drop)
    }
}

/// A fake kernel for unit tests: answers from its fields and records every call.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::fs::File;

    use super::*;

    fn result(r: Result<(), i32>) -> io::Result<()> {
        r.map_err(io::Error::from_raw_os_error)
    }

    /// Each field is what the kernel answers; errors are errno values.
    #[derive(Debug)]
    pub(crate) struct FakeSys {
        /// Existing interfaces: name, index, queue count (or the errno ethtool gives).
        pub(crate) interfaces: Vec<(&'static str, u32, Result<u32, i32>)>,
        pub(crate) probe: Result<(), i32>,
        pub(crate) attached: XdpProgIds,
        pub(crate) names: Vec<(u32, &'static str)>,
        pub(crate) link_native: Result<(), i32>,
        pub(crate) link_generic: Result<(), i32>,
        pub(crate) legacy_detach: Result<(), i32>,
        pub(crate) set_sockopt: Result<(), i32>,
        pub(crate) set_net_attr: Result<(), i32>,
        /// Every call, as text, in order.
        pub(crate) calls: RefCell<Vec<String>>,
    }

    impl Default for FakeSys {
        fn default() -> Self {
            FakeSys {
                interfaces: vec![("eth0", 2, Ok(4))],
                probe: Ok(()),
                attached: XdpProgIds::default(),
                names: Vec::new(),
                link_native: Ok(()),
                link_generic: Ok(()),
                legacy_detach: Ok(()),
                set_sockopt: Ok(()),
                set_net_attr: Ok(()),
                calls: RefCell::new(Vec::new()),
            }
        }
    }

    impl FakeSys {
        fn record(&self, call: String) {
            self.calls.borrow_mut().push(call);
        }

        /// The recorded calls.
        pub(crate) fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    impl Sys for FakeSys {
        fn if_index(&self, ifname: &str) -> io::Result<u32> {
            self.record(format!("if_index {ifname}"));
            self.interfaces
                .iter()
                .find(|i| i.0 == ifname)
                .map(|i| i.1)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
        }

        fn queue_count(&self, ifname: &str) -> io::Result<u32> {
            self.record(format!("queue_count {ifname}"));
            match self.interfaces.iter().find(|i| i.0 == ifname) {
                Some(i) => i.2.map_err(io::Error::from_raw_os_error),
                None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
            }
        }

        fn probe_af_xdp(&self) -> io::Result<()> {
            self.record("probe_af_xdp".to_owned());
            result(self.probe)
        }

        fn set_sockopt(&self, fd: RawFd, level: c_int, name: c_int, value: u32) -> io::Result<()> {
            self.record(format!("set_sockopt {fd} {level} {name} {value}"));
            result(self.set_sockopt)
        }

        fn get_sockopt(&self, fd: RawFd, level: c_int, name: c_int) -> io::Result<u32> {
            self.record(format!("get_sockopt {fd} {level} {name}"));
            Ok(0)
        }

        fn set_net_attr(&self, ifname: &str, attr: &str, value: u64) -> io::Result<()> {
            self.record(format!("set_net_attr {ifname} {attr} {value}"));
            result(self.set_net_attr)
        }

        fn xdp_query(&self, ifindex: u32) -> io::Result<XdpProgIds> {
            self.record(format!("xdp_query {ifindex}"));
            Ok(self.attached)
        }

        fn prog_name(&self, id: u32) -> io::Result<String> {
            self.record(format!("prog_name {id}"));
            self.names
                .iter()
                .find(|n| n.0 == id)
                .map(|n| n.1.to_owned())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }

        fn xdp_link(&self, ifindex: u32, prog_fd: RawFd, flags: u32) -> io::Result<OwnedFd> {
            self.record(format!("xdp_link {ifindex} {prog_fd} {flags}"));
            let r = if flags & xdp_flags::DRV_MODE != 0 { self.link_native } else { self.link_generic };
            result(r)?;
            Ok(File::open("/dev/null")?.into())
        }

        fn xdp_unlink(&self, link: OwnedFd) -> io::Result<()> {
            self.record("xdp_unlink".to_owned());
            drop(link);
            Ok(())
        }

        fn xdp_detach_legacy(&self, ifindex: u32, flags: u32) -> io::Result<()> {
            self.record(format!("xdp_detach_legacy {ifindex} {flags}"));
            result(self.legacy_detach)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_is_enodev() {
        let err = RealSys.if_index("ferry-no-such0").expect_err("interface should not exist");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        let err = RealSys.queue_count("ferry-no-such0").expect_err("interface should not exist");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn nul_in_name_is_rejected() {
        let err = RealSys.if_index("lo\0x").expect_err("NUL must be refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn loopback_exists() {
        assert_eq!(RealSys.if_index("lo").expect("lo exists"), 1);
    }
}

//! Errors from creating AF_XDP frame memory and sockets, and how kernel errors map to them (setup
//! side).
//!
//! Each message is one line naming what is wrong and what to do about it. The `classify_*`
//! functions turn the errno behind a failed step into the error a user can act on; they are plain
//! functions so the unit tests can feed them every errno without a kernel.

use std::io;

/// Why AF_XDP frame memory or a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A configuration value the kernel or xsk-rs cannot take.
    #[error("invalid AF_XDP configuration: {problem}; {fix}")]
    InvalidConfig {
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },

    /// The kernel has no AF_XDP sockets.
    #[error(
        "this kernel has no AF_XDP sockets (socket(AF_XDP) gives EAFNOSUPPORT): run ferry on a kernel built with \
         CONFIG_XDP_SOCKETS=y (Linux 5.10 or later)"
    )]
    NoAfXdp,

    /// Creating a probe AF_XDP socket failed for an unexpected reason.
    #[error("creating an AF_XDP socket failed ({source}): check the kernel log (dmesg) and the process's limits")]
    Probe {
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// Missing privileges for AF_XDP sockets.
    #[error(
        "{action} was refused ({source}): AF_XDP needs CAP_NET_RAW, and ferry's XDP programs CAP_NET_ADMIN and \
         CAP_BPF; run ferry as root or grant it those capabilities"
    )]
    NotPermitted {
        /// What was refused.
        action: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// The kernel refused to register (pin) the UMEM.
    #[error(
        "registering a {mib} MiB UMEM was refused ({source}): the locked-memory limit (RLIMIT_MEMLOCK) is too \
         small for it; run ferry as root (CAP_IPC_LOCK exempts the UMEM), grant it CAP_IPC_LOCK, or configure a \
         smaller UMEM (fewer frames)"
    )]
    UmemRefused {
        /// The UMEM's size in MiB (rounded up).
        mib: usize,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// Allocating or pinning the UMEM's memory failed.
    #[error("allocating a {mib} MiB UMEM failed ({source}): {fix}")]
    UmemMemory {
        /// The UMEM's size in MiB (rounded up).
        mib: usize,
        /// What to do.
        fix: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// The interface does not exist.
    #[error("interface `{ifname}` does not exist in this network namespace: check the name with `ip link show`")]
    NoSuchInterface {
        /// The interface asked for.
        ifname: String,
    },

    /// The queue is not below the interface's queue count.
    #[error(
        "interface `{ifname}` has {queues} queue(s) (0 to {last}), so queue {queue} does not exist: use a queue below \
         {queues}, or add queues with `ethtool -L {ifname} combined <n>`"
    )]
    QueueOutOfRange {
        /// The interface.
        ifname: String,
        /// The queue asked for.
        queue: u32,
        /// The interface's queue count.
        queues: u32,
        /// `queues - 1`.
        last: u32,
    },

    /// The kernel refused the queue, and the driver does not report a queue count.
    #[error(
        "binding to queue {queue} of `{ifname}` was refused (EINVAL): the queue is probably out of range; check the \
         queue count with `ethtool -l {ifname}` and use a lower queue"
    )]
    QueueRefused {
        /// The interface.
        ifname: String,
        /// The queue asked for.
        queue: u32,
    },

    /// Another AF_XDP socket holds the queue.
    #[error(
        "queue {queue} of `{ifname}` is busy (EBUSY after retrying for {waited_ms} ms): another AF_XDP socket is bound \
         to it, e.g. another ferry; stop it, or pick another queue"
    )]
    Busy {
        /// The interface.
        ifname: String,
        /// The queue.
        queue: u32,
        /// How long binding was retried.
        waited_ms: u64,
    },

    /// Zero-copy was forced (or inherited from the UMEM) and the driver cannot do it.
    #[error(
        "`{ifname}` cannot do zero-copy AF_XDP (EOPNOTSUPP), and {why}: use copy or automatic mode, and open the \
         ports of one worker that cannot do zero-copy before those that can"
    )]
    ZeroCopyUnsupported {
        /// The interface.
        ifname: String,
        /// Why zero-copy was asked for.
        why: &'static str,
    },

    /// The socket could not be created or bound for another reason.
    #[error("creating the AF_XDP socket for `{ifname}` queue {queue} failed ({source}): {hint}")]
    Socket {
        /// The interface.
        ifname: String,
        /// The queue.
        queue: u32,
        /// What to check.
        hint: &'static str,
        /// The kernel's (or libxdp's) error.
        #[source]
        source: io::Error,
    },

    /// Setting a socket option (busy polling) failed.
    #[error("setting {option} on the AF_XDP socket of `{ifname}` failed ({source}): {hint}")]
    SocketOption {
        /// The option.
        option: &'static str,
        /// The interface.
        ifname: String,
        /// What to do.
        hint: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// An interface setting that busy polling needs could not be written.
    #[error(
        "setting /sys/class/net/{ifname}/{attr} to {value} for busy polling failed ({source}): it needs \
         CAP_NET_ADMIN and a /sys mounted in ferry's network namespace (`ip netns exec` mounts one); or turn \
         dataplane.busy_poll off"
    )]
    DeviceSetting {
        /// The attribute file.
        attr: &'static str,
        /// The interface.
        ifname: String,
        /// The value.
        value: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The error for a failed AF_XDP probe (`socket(AF_XDP)`).
pub(crate) fn classify_probe(err: io::Error) -> XskError {
    match err.raw_os_error() {
        Some(libc::EAFNOSUPPORT) => XskError::NoAfXdp,
        Some(libc::EPERM | libc::EACCES) => XskError::NotPermitted { action: "creating an AF_XDP socket", source: err },
        _ => XskError::Probe { source: err },
    }
}

/// The error for a failed UMEM creation of `bytes` bytes (after the AF_XDP probe succeeded).
pub(crate) fn classify_umem(err: io::Error, bytes: usize, huge_pages: bool) -> XskError {
    let mib = bytes.div_ceil(1 << 20);
    match err.raw_os_error() {
        Some(libc::ENOBUFS | libc::EPERM) => XskError::UmemRefused { mib, source: err },
        Some(libc::ENOMEM) if huge_pages => XskError::UmemMemory {
            mib,
            fix: "reserve enough huge pages first (sysctl vm.nr_hugepages) or turn huge pages off",
            source: err,
        },
        Some(libc::ENOMEM) => {
            XskError::UmemMemory { mib, fix: "free memory or configure a smaller UMEM (fewer frames)", source: err }
        }
        Some(libc::EINVAL) => XskError::InvalidConfig {
            problem: format!("the kernel refused the UMEM layout ({err})"),
            fix: "use a frame size that is a power of two between 2048 and the page size (4096)",
        },
        _ => XskError::UmemMemory { mib, fix: "check the kernel log", source: err },
    }
}

/// The error for a failed socket creation/bind on `ifname` queue `queue`. `queues` is the
/// interface's queue count if known; `forced_zc` says why zero-copy was required, if it was.
pub(crate) fn classify_bind(
    err: io::Error,
    ifname: &str,
    queue: u32,
    queues: Option<u32>,
    forced_zc: Option<&'static str>,
) -> XskError {
    let ifname = ifname.to_owned();
    match err.raw_os_error() {
        Some(libc::ENODEV) => XskError::NoSuchInterface { ifname },
        Some(libc::EINVAL) => match queues {
            Some(q) if queue >= q => XskError::QueueOutOfRange { ifname, queue, queues: q, last: q.saturating_sub(1) },
            _ => XskError::QueueRefused { ifname, queue },
        },
        Some(libc::EOPNOTSUPP) => match forced_zc {
            Some(why) => XskError::ZeroCopyUnsupported { ifname, why },
            None => XskError::Socket {
                ifname,
                queue,
                hint: "the driver refused AF_XDP on this interface; use copy mode or another interface",
                source: err,
            },
        },
        Some(libc::EPERM | libc::EACCES) => XskError::NotPermitted { action: "binding an AF_XDP socket", source: err },
        Some(libc::EAFNOSUPPORT) => XskError::NoAfXdp,
        Some(libc::ENOBUFS | libc::ENOMEM) => XskError::Socket {
            ifname,
            queue,
            hint: "the kernel could not allocate the socket's rings; use smaller rings or free memory",
            source: err,
        },
        _ => XskError::Socket {
            ifname,
            queue,
            hint: "see the error; the interface may be down or going away",
            source: err,
        },
    }
}

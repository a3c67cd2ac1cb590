//! Errors from loading, configuring, attaching and detaching ferry's XDP programs (setup side).
//!
//! Each message is one line naming what is wrong and what to do about it.

use std::io;

/// Why an XDP program could not be loaded, configured, attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The interface does not exist in this network namespace.
    #[error("interface `{ifname}` does not exist in this network namespace: check the name with `ip link show`")]
    NoSuchInterface {
        /// The interface asked for.
        ifname: String,
    },

    /// Missing privileges for BPF or for attaching XDP programs.
    #[error(
        "{action} was refused ({source}): ferry needs CAP_BPF and CAP_NET_ADMIN (CAP_SYS_ADMIN on kernels before \
         5.8) for its XDP programs; run it as root or grant it those capabilities"
    )]
    NotPermitted {
        /// What was refused.
        action: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// The kernel rejected the program (verifier, BTF, missing BPF support).
    #[error(
        "the kernel rejected ferry's XDP program `{program}` ({source}): the libbpf messages logged just before \
         say why; ferry needs a kernel with BPF and XDP support (CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS; Linux 5.10 \
         or later)"
    )]
    Load {
        /// The program's name.
        program: &'static str,
        /// The error libbpf returned.
        #[source]
        source: io::Error,
    },

    /// The embedded BPF object does not have the map layout this code writes (a build mismatch).
    #[error(
        "BPF map `{map}` of ferry's XDP program has {found}-byte {what}s but ferry writes {expected}: the embedded \
         object and the loader disagree; rebuild ferry (cargo clean -p ferry-dataplane)"
    )]
    MapLayout {
        /// The map.
        map: &'static str,
        /// "key" or "value".
        what: &'static str,
        /// Size in the object.
        found: u32,
        /// Size the loader writes.
        expected: u32,
    },

    /// Writing a configuration or socket map failed.
    #[error("writing entry {key} of BPF map `{map}` failed ({source}): {hint}")]
    MapUpdate {
        /// The map.
        map: &'static str,
        /// The entry, as text.
        key: String,
        /// What to check.
        hint: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// A configuration the program cannot hold.
    #[error("invalid XDP program configuration: {problem}; {fix}")]
    InvalidConfig {
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },

    /// A program ferry did not load is attached to the interface.
    #[error(
        "interface `{ifname}` already has XDP program `{name}` (id {id}) attached, which is not ferry's: remove it \
         with `ip link set dev {ifname} xdp off` (or xdpgeneric off) if nothing needs it, or give ferry another \
         interface"
    )]
    ForeignProgram {
        /// The interface.
        ifname: String,
        /// The attached program's name.
        name: String,
        /// Its id (`bpftool prog show id <id>`).
        id: u32,
    },

    /// Another live process (another ferry) holds the interface through a BPF link.
    #[error(
        "interface `{ifname}` is held by a running ferry (its XDP program `{name}`, id {id}, is attached through a \
         link owned by a live process): stop that ferry first"
    )]
    InUse {
        /// The interface.
        ifname: String,
        /// The attached program's name.
        name: String,
        /// Its id.
        id: u32,
    },

    /// Neither native nor generic XDP could be attached.
    #[error(
        "cannot attach an XDP program to `{ifname}`: native mode failed ({native}), generic mode failed ({generic}): \
         the kernel lacks XDP support or the interface's MTU is too large for XDP; use a kernel with \
         CONFIG_BPF_SYSCALL and XDP (5.10 or later), or lower the MTU"
    )]
    Unsupported {
        /// The interface.
        ifname: String,
        /// The native (driver) attempt's error.
        native: io::Error,
        /// The generic (skb) attempt's error.
        generic: io::Error,
    },

    /// The one mode asked for could not be attached.
    #[error("cannot attach an XDP program to `{ifname}` in {mode} mode ({source}): {fix}")]
    Attach {
        /// The interface.
        ifname: String,
        /// "native" or "generic".
        mode: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
        /// What to do, for this mode.
        fix: &'static str,
    },

    /// The kernel refused to tell which programs are attached, or to remove a stale one.
    #[error("{action} on `{ifname}` failed ({source}): check that the interface still exists and ferry runs as root")]
    Netlink {
        /// What was being done.
        action: &'static str,
        /// The interface.
        ifname: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// A socket was registered for a queue the program's socket map has no slot for.
    #[error(
        "queue {queue} is beyond the {queues} queue(s) this XDP program was loaded for: load it with the \
         interface's queue count"
    )]
    QueueOutOfRange {
        /// The queue.
        queue: u32,
        /// Slots in the socket map.
        queues: u32,
    },

    /// Running the program on a test frame failed.
    #[error("running XDP program `{program}` on a test frame failed ({source}): the frame must be 14 to 4096 bytes")]
    TestRun {
        /// The program's name.
        program: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Whether `err` means a missing privilege.
pub(crate) fn is_permission(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

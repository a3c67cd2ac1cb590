//! AF_XDP ports over xsk-rs: one socket per (interface, queue) on a worker's shared UMEM
//! ([`XskMem`]). Opening a port is the setup side; the [`Port`] methods are the hot path (no
//! allocation, no lock, no log; syscalls only as kicks, at most a few per batch).
//!
//! Frames move by descriptor: the fill ring is topped up from the worker's free frames on every
//! [`Port::refill`] (an empty fill ring makes the kernel drop), received descriptors become
//! [`Pkt`]s at offset [`RX_HEADROOM`] (the room encapsulation prepends into), and [`Port::send`]
//! turns `Pkt`s back into descriptors that start at the packet's own offset. xsk-rs can only
//! transmit from the start of a frame's data segment, so the transmit ring is ferry's own mapping
//! (`txring`) and no packet is moved before it is sent. Completed transmissions come back
//! through [`Port::reclaim`].
//!
//! Sockets are bound with libxdp's default program inhibited: ferry's own XDP program
//! ([`crate::xdp`]) decides what reaches them, and [`crate::xdp::XdpProgram::add_port`] puts a
//! port's socket into that program's socket map.
//!
//! With `need_wakeup` (the default), transmission needs a `sendto` kick; in copy mode every batch
//! does, and each kick sends at most 32 frames, so [`Port::flush`] kicks until the kernel has
//! taken everything or stops making progress. With busy polling, [`Port::recv`] also drives the
//! driver with a non-blocking `recvfrom`.

mod error;
mod mem;
mod txring;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xsk_rs::config::{BindFlags, Interface, LibxdpFlags, QueueSize, SocketConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue};

pub use self::error::XskError;
use self::error::classify_bind;
pub use self::mem::{BindMode, RX_HEADROOM, XskMem, XskMemConfig, XskMemHandle};
use self::txring::TxRing;
use super::{Port, PortStats};
use crate::frame::{FrameId, FreeFrames, Pkt};
use crate::xdp::sys::{RealSys, Sys};

/// `SO_BUSY_POLL`, `SO_PREFER_BUSY_POLL` and `SO_BUSY_POLL_BUDGET` from `<asm-generic/socket.h>`
/// (the values on x86, arm and most other architectures).
const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
/// `XDP_MAX_TX_SKB_BUDGET` from `<linux/if_xdp.h>` (Linux 6.17): frames one copy-mode kick may
/// send (32 by default). Older kernels refuse the option, and keep kicking 32 at a time.
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// How long binding retries while the queue is still held by a socket that was just closed
/// (socket teardown in the kernel is asynchronous).
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Preferred busy polling: the worker runs the device queue's receive (its NAPI poll) in its own
/// loop, on its own core, each time it looks at the socket, instead of the kernel running it in
/// softirq wherever the device's interrupt (or, for veth, the sender) scheduled it.
///
/// The device side is set on the interface ([`defer_interrupts`]): while a socket keeps polling, `napi_defer_hard_irqs`
/// and `gro_flush_timeout` keep the device's interrupts (veth: the sender's wake-ups) off, and the
/// timer only takes over when the worker stops polling for longer than the timeout. These are
/// per-device settings: on an uplink they also delay the host's own traffic by up to the timeout
/// while no worker polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL`: microseconds a blocking receive may busy-poll (the worker's non-blocking
    /// calls poll one round whatever the value; it must be non-zero).
    pub usecs: u32,
    /// `SO_BUSY_POLL_BUDGET`: packets per busy-poll round.
    pub budget: u32,
    /// The device's `napi_defer_hard_irqs`: empty polls before interrupts come back.
    pub defer_hard_irqs: u32,
    /// The device's `gro_flush_timeout`, in nanoseconds: how long interrupts stay off after a poll.
    pub gro_flush_timeout_ns: u64,
}

impl Default for BusyPoll {
    fn default() -> Self {
        BusyPoll { usecs: 20, budget: 64, defer_hard_irqs: 2, gro_flush_timeout_ns: 200_000 }
    }
}

/// One port's socket settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskPortConfig {
    /// Receive ring entries, a power of two.
    pub rx_ring: u32,
    /// Transmit ring entries, a power of two.
    pub tx_ring: u32,
    /// Busy polling (`SO_PREFER_BUSY_POLL` and friends), off by default.
    pub busy_poll: Option<BusyPoll>,
    /// Frames kept lent to the fill ring, at most the UMEM's fill ring size (`None`: all of it).
    /// Every socket of a worker shares its UMEM's frames: a node with many quiet pods gives each a
    /// small share and keeps the rest for the uplink and the busy ones.
    pub fill_target: Option<u32>,
}

impl Default for XskPortConfig {
    fn default() -> Self {
        XskPortConfig { rx_ring: 1024, tx_ring: 1024, busy_poll: None, fill_target: None }
    }
}

/// How a bound socket moves frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskMode {
    /// The kernel copies frames to and from the UMEM.
    Copy,
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
}

/// An AF_XDP socket on one (interface, queue), on a worker's [`XskMem`].
#[derive(Debug)]
pub struct XskPort {
    name: String,
    ifname: String,
    queue: u32,
    mode: XskMode,
    fd: RawFd,
    busy_poll: bool,
    /// Bound with `XDP_USE_NEED_WAKEUP`: kick only when the kernel asks.
    need_wakeup: bool,
    /// The transmit ring, as ferry maps it: descriptors from any offset in a frame.
    txr: TxRing,
    /// xsk-rs's side of the transmit ring: kept for the socket and its kicks, never produced on.
    tx: TxQueue,
    rx: RxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// The UMEM's descriptor table (shared, read-only): frame id -> descriptor.
    descs: Arc<[FrameDesc]>,
    /// log2 of the UMEM chunk size: descriptor address -> frame id.
    shift: u32,
    /// Descriptors of one batch, sized once for the largest ring.
    scratch: Box<[FrameDesc]>,
    /// Frames lent to the kernel (fill or transmit ring), one bit per frame, so that closing the
    /// port can hand them back ([`Port::release`]).
    lent: Box<[u64]>,
    /// Frames given to the fill ring and not yet received.
    fill_held: usize,
    /// Frames given to the transmit ring and not yet completed.
    tx_held: usize,
    tx_ring: usize,
    comp_ring: usize,
    /// Frames to keep in the fill ring.
    fill_target: usize,
}

impl XskPort {
    /// Bind an AF_XDP socket to queue `queue` of `ifname` on `mem` (shared with the worker's other
    /// ports). Retries briefly while the queue is still held by a socket that was just closed.
    ///
    /// # Errors
    /// The interface is missing ([`XskError::NoSuchInterface`]); the queue is out of range
    /// ([`XskError::QueueOutOfRange`], [`XskError::QueueRefused`]); the queue is taken
    /// ([`XskError::Busy`]); zero-copy is impossible ([`XskError::ZeroCopyUnsupported`]);
    /// privileges ([`XskError::NotPermitted`]); busy-poll options refused
    /// ([`XskError::SocketOption`]); anything else ([`XskError::Socket`]).
    pub fn open(mem: &XskMem, ifname: &str, queue: u32, cfg: &XskPortConfig) -> Result<Self, XskError> {
        Self::open_with(&RealSys, mem.handle(), ifname, queue, cfg)
    }

    /// [`XskPort::open`] through a handle on a worker's memory, from another thread while the
    /// worker runs (a port opened this way joins the worker through its port commands).
    ///
    /// # Errors
    /// As [`XskPort::open`].
    pub fn open_shared(mem: &XskMemHandle, ifname: &str, queue: u32, cfg: &XskPortConfig) -> Result<Self, XskError> {
        Self::open_with(&RealSys, mem, ifname, queue, cfg)
    }

    fn open_with(
        sys: &impl Sys,
        mem: &XskMemHandle,
        ifname: &str,
        queue: u32,
        cfg: &XskPortConfig,
    ) -> Result<Self, XskError> {
        let invalid = |problem: String| XskError::InvalidConfig { problem, fix: "use a power of two such as 1024" };
        let rx_size = QueueSize::new(cfg.rx_ring).map_err(|e| invalid(format!("receive ring: {e}")))?;
        let tx_size = QueueSize::new(cfg.tx_ring).map_err(|e| invalid(format!("transmit ring: {e}")))?;

        let queues = check_queue(sys, ifname, queue)?;
        let mcfg = mem.config();
        let mut bind = match mcfg.bind {
            BindMode::Auto => BindFlags::empty(),
            BindMode::Copy => BindFlags::XDP_COPY,
            BindMode::ZeroCopy => BindFlags::XDP_ZEROCOPY,
        };
        if mcfg.need_wakeup {
            bind |= BindFlags::XDP_USE_NEED_WAKEUP;
        }
        let socket_cfg = SocketConfig::builder()
            .rx_queue_size(rx_size)
            .tx_queue_size(tx_size)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build();
        let if_name: Interface = ifname.parse().map_err(|_| XskError::NoSuchInterface { ifname: ifname.to_owned() })?;

        let started = Instant::now();
        let (tx, rx, rings) = loop {
            // SAFETY: libxdp's program loading is inhibited, which is what xsk-rs requires when the
            // (interface, queue) pair may already be bound on this UMEM.
            match unsafe { Socket::new(socket_cfg, mem.umem(), &if_name, queue) } {
                Ok(r) => break r,
                Err(e) => {
                    let errno = std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<io::Error>())
                        .and_then(io::Error::raw_os_error);
                    if errno == Some(libc::EBUSY) && started.elapsed() < BUSY_RETRY {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    if errno == Some(libc::EBUSY) {
                        let waited_ms = started.elapsed().as_millis() as u64;
                        return Err(XskError::Busy { ifname: ifname.to_owned(), queue, waited_ms });
                    }
                    let source = errno.map_or_else(|| io::Error::other(e.to_string()), io::Error::from_raw_os_error);
                    let forced_zc = match mcfg.bind {
                        BindMode::ZeroCopy => Some("zero-copy mode is configured"),
                        // A socket that joins a UMEM takes the mode of the UMEM's first socket.
                        BindMode::Auto => Some("this worker's UMEM is zero-copy (its first port could do it)"),
                        BindMode::Copy => None,
                    };
                    return Err(classify_bind(source, ifname, queue, queues, forced_zc));
                }
            }
        };
        let Some((fill, comp)) = rings else {
            return Err(XskError::Socket {
                ifname: ifname.to_owned(),
                queue,
                hint: "this worker already has a socket on that queue; open one port per (interface, queue)",
                source: io::Error::from_raw_os_error(libc::EEXIST),
            });
        };
        let fd = rx.fd().as_raw_fd();
        let txr = TxRing::map(fd, cfg.tx_ring).map_err(|source| XskError::Socket {
            ifname: ifname.to_owned(),
            queue,
            hint: "mapping the transmit ring failed (AF_XDP with need_wakeup needs Linux 5.4 or later)",
            source,
        })?;

        let options = sys.get_sockopt(fd, libc::SOL_XDP, libc::XDP_OPTIONS).unwrap_or(0);
        let mode = if options & libc::XDP_OPTIONS_ZEROCOPY != 0 { XskMode::ZeroCopy } else { XskMode::Copy };
        if let Some(bp) = cfg.busy_poll {
            set_busy_poll(sys, fd, ifname, bp)?;
        }
        // One kick per batch instead of one per 32 frames, where the kernel allows it.
        let budget_raised = sys.set_sockopt(fd, libc::SOL_XDP, XDP_MAX_TX_SKB_BUDGET, cfg.tx_ring).is_ok();
        tracing::info!(
            ifname,
            queue,
            ?mode,
            busy_poll = cfg.busy_poll.is_some(),
            tx_budget = if budget_raised { cfg.tx_ring } else { 32 },
            "bound AF_XDP socket"
        );

        let scratch_len = [cfg.rx_ring, cfg.tx_ring, mcfg.fill_ring, mcfg.comp_ring].into_iter().max().unwrap_or(1024);
        Ok(XskPort {
            name: format!("{ifname}/{queue}"),
            ifname: ifname.to_owned(),
            queue,
            mode,
            fd,
            busy_poll: cfg.busy_poll.is_some(),
            need_wakeup: mcfg.need_wakeup,
            txr,
            tx,
            rx,
            fill,
            comp,
            descs: mem.descs(),
            shift: mem.shift(),
            scratch: vec![FrameDesc::default(); scratch_len as usize].into_boxed_slice(),
            lent: vec![0; mem.descs().len().div_ceil(64)].into_boxed_slice(),
            fill_held: 0,
            tx_held: 0,
            tx_ring: cfg.tx_ring as usize,
            comp_ring: mcfg.comp_ring as usize,
            fill_target: cfg.fill_target.map_or(mcfg.fill_ring, |t| t.clamp(1, mcfg.fill_ring)) as usize,
        })
    }

    /// The interface.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The queue.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The socket's descriptor (for the XDP program's socket map).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Copy or zero-copy, as the kernel bound it.
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// A non-blocking `recvfrom`: makes the kernel process the receive side (busy polling, or a
    /// fill ring that asked for a wakeup).
    #[inline]
    fn kick_rx(&self) {
        // SAFETY: a zero-length receive into no buffer on our own socket; the kernel only runs the
        // driver's poll. Errors (EAGAIN) are expected and carry no information.
        unsafe {
            libc::recvfrom(
                self.fd,
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }

    #[inline]
    fn frame_of(&self, addr: usize) -> usize {
        addr >> self.shift
    }

    #[inline]
    fn lend(&mut self, id: usize) {
        if let Some(w) = self.lent.get_mut(id / 64) {
            *w |= 1 << (id % 64);
        }
    }

    #[inline]
    fn returned(&mut self, id: usize) {
        if let Some(w) = self.lent.get_mut(id / 64) {
            *w &= !(1 << (id % 64));
        }
    }
}

/// The interface's queue count (if its driver reports one), after checking that `queue` is below
/// it.
fn check_queue(sys: &impl Sys, ifname: &str, queue: u32) -> Result<Option<u32>, XskError> {
    sys.if_index(ifname).map_err(|_| XskError::NoSuchInterface { ifname: ifname.to_owned() })?;
    let queues = match sys.queue_count(ifname) {
        Ok(n) => Some(n),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            return Err(XskError::NoSuchInterface { ifname: ifname.to_owned() });
        }
        Err(_) => None,
    };
    if let Some(n) = queues
        && queue >= n
    {
        return Err(XskError::QueueOutOfRange { ifname: ifname.to_owned(), queue, queues: n, last: n - 1 });
    }
    Ok(queues)
}

fn set_busy_poll(sys: &impl Sys, fd: RawFd, ifname: &str, bp: BusyPoll) -> Result<(), XskError> {
    let opts = [
        ("SO_PREFER_BUSY_POLL", SO_PREFER_BUSY_POLL, 1, "needs Linux 5.11 or later"),
        ("SO_BUSY_POLL", SO_BUSY_POLL, bp.usecs, "raising it above net.core.busy_poll needs CAP_NET_ADMIN"),
        ("SO_BUSY_POLL_BUDGET", SO_BUSY_POLL_BUDGET, bp.budget, "raising it above 8 needs CAP_NET_ADMIN"),
    ];
    for (option, name, value, hint) in opts {
        sys.set_sockopt(fd, libc::SOL_SOCKET, name, value).map_err(|source| XskError::SocketOption {
            option,
            ifname: ifname.to_owned(),
            hint,
            source,
        })?;
    }
    Ok(())
}

/// Sets the device side of busy polling on `ifname` (see [`BusyPoll`]): its
/// `napi_defer_hard_irqs` and `gro_flush_timeout`. Without them busy polling still works, but the
/// device keeps raising its interrupts (veth: the sender keeps scheduling the receive NAPI on its
/// own core) besides the worker's polls.
///
/// # Errors
/// [`XskError::DeviceSetting`]: the attribute could not be written (no CAP_NET_ADMIN, or a /sys
/// that belongs to another network namespace).
pub fn defer_interrupts(ifname: &str, bp: &BusyPoll) -> Result<(), XskError> {
    defer_interrupts_with(&RealSys, ifname, bp)
}

fn defer_interrupts_with(sys: &impl Sys, ifname: &str, bp: &BusyPoll) -> Result<(), XskError> {
    let attrs =
        [("napi_defer_hard_irqs", u64::from(bp.defer_hard_irqs)), ("gro_flush_timeout", bp.gro_flush_timeout_ns)];
    for (attr, value) in attrs {
        sys.set_net_attr(ifname, attr, value).map_err(|source| XskError::DeviceSetting {
            attr,
            ifname: ifname.to_owned(),
            value,
            source,
        })?;
    }
    Ok(())
}

impl Port for XskPort {
    type Mem = XskMem;

    fn name(&self) -> &str {
        &self.name
    }

    fn recv(&mut self, _mem: &mut XskMem, out: &mut [Pkt]) -> usize {
        let max = out.len().min(self.scratch.len());
        // What is already in the ring first: a busy-poll kick adds up to two NAPI budgets, so
        // kicking on every call while frames wait would let the ring grow until the kernel drops.
        // SAFETY: every descriptor the receive ring hands back names a frame this port put on its
        // fill ring, which is now ours; the descriptors are only copied out below.
        let mut n = unsafe { self.rx.consume(&mut self.scratch[..max]) };
        if n < max && (self.busy_poll || self.fill.needs_wakeup()) {
            self.kick_rx();
            // SAFETY: as above.
            n += unsafe { self.rx.consume(&mut self.scratch[n..max]) };
        }
        self.fill_held -= n;
        for (i, slot) in out[..n].iter_mut().enumerate() {
            let d = self.scratch[i];
            // The packet starts wherever the kernel (or an XDP program that moved its head) put it
            // in the chunk; a length past the chunk's end is the worker's to catch and count.
            let (frame, offset) = XskMem::locate(self.shift, d.addr() as u64);
            self.returned(frame.0 as usize);
            *slot = Pkt { frame, offset, len: d.lengths().data() as u16 };
        }
        n
    }

    fn send(&mut self, mem: &mut XskMem, pkts: &[Pkt]) -> usize {
        // Frames completed but not reclaimed occupy the completion ring; never overfill it.
        let room = self.comp_ring.saturating_sub(self.tx_held).min(self.scratch.len());
        let want = pkts.len().min(room);
        // The frames belong to the caller, who hands them over here; they come back through the
        // completion ring (`reclaim`).
        let sent = self.txr.produce(pkts[..want].iter().map(|p| (mem.addr(*p), u32::from(p.len))));
        self.tx_held += sent;
        for p in &pkts[..sent] {
            self.lend(p.frame.0 as usize);
        }
        sent
    }

    fn flush(&mut self) -> io::Result<()> {
        // Without need_wakeup the kernel never asks, and copy mode transmits only when kicked.
        if self.need_wakeup && !self.txr.needs_wakeup() {
            return Ok(());
        }
        // In copy mode each kick transmits at most 32 frames synchronously: kick until the ring is
        // empty or a kick makes no progress (device busy, completion ring full).
        let mut pending = self.txr.pending();
        let mut kicks = 0;
        while pending > 0 && kicks <= self.tx_ring / 32 {
            self.tx.wakeup()?;
            kicks += 1;
            let now = self.txr.pending();
            if now >= pending {
                break;
            }
            pending = now;
        }
        Ok(())
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        // SAFETY: completion descriptors name frames this port transmitted; they are ours again.
        let n = unsafe { self.comp.consume(&mut self.scratch) };
        for i in 0..n {
            let id = self.frame_of(self.scratch[i].addr());
            self.returned(id);
            free.push(FrameId(id as u32));
        }
        self.tx_held -= n;
        n
    }

    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        let want = free.len().min(self.scratch.len()).min(self.fill_target.saturating_sub(self.fill_held));
        if want == 0 {
            return 0;
        }
        let room = (self.fill.nb_free(want as u32) as usize).min(want);
        let mut n = 0;
        while n < room
            && let Some(id) = free.pop()
        {
            self.scratch[n] = self.descs[id.0 as usize];
            self.lend(id.0 as usize);
            n += 1;
        }
        // SAFETY: the frames come from the worker's free list, so nothing else uses them until they
        // come back through the receive ring. `n` slots are free, so all are taken.
        let given = unsafe { self.fill.produce(&self.scratch[..n]) };
        self.fill_held += given;
        given
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd)
    }

    fn frames_held(&self) -> usize {
        self.fill_held + self.tx_held
    }

    fn release(self, free: &mut FreeFrames) {
        let XskPort { name, txr, tx, rx, fill, comp, lent, .. } = self;
        // Closing the socket first: once its rings are gone the kernel no longer touches a frame
        // it was lent, and every lent frame is the worker's again.
        drop((txr, tx, rx, fill, comp));
        let mut n = 0;
        for (w, word) in lent.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                free.push(FrameId((w * 64) as u32 + bits.trailing_zeros()));
                bits &= bits - 1;
                n += 1;
            }
        }
        tracing::debug!(port = %name, frames = n, "closed AF_XDP socket, frames returned");
    }

    fn stats(&self) -> PortStats {
        let s = match self.rx.fd().xdp_statistics() {
            Ok(s) => s,
            Err(_) => return PortStats::default(),
        };
        PortStats {
            rx_no_frame: s.rx_fill_ring_empty_descs(),
            rx_dropped: s.rx_dropped(),
            rx_ring_full: s.rx_ring_full(),
            invalid_descs: s.rx_invalid_descs() + s.tx_invalid_descs(),
        }
    }
}

#[cfg(test)]
mod tests;

//! A poll-mode worker: one thread, its ports, its frame memory, the pipeline (hot path), and the
//! setup to start it pinned to a core.
//!
//! Each loop iteration reclaims completed transmissions, refills receive rings, then takes up to
//! [`BATCH`] packets from each port (again, up to [`RECV_ROUNDS`] times, while it keeps filling the
//! batch or handing over super-packets), runs each through the [`Pipeline`], and queues it for its
//! egress port; full egress batches go out immediately and the rest at the end of the iteration,
//! with one kick per port. The forwarding tables are loaded once per iteration. The counters are
//! published for readers on other threads every [`PUBLISH_INTERVAL`] while busy (not every
//! iteration: a publish is a few dozen atomic stores per port), and whenever the worker goes idle,
//! changes its ports or stops, so readers see exact totals once traffic stops.
//!
//! Ports come and go while the worker runs (pods are created and deleted): a [`PortControl`] sends
//! [`PortCommand`]s that the worker applies between iterations, waking it if it sleeps. A port keeps
//! its [`PortId`] (what the forwarding tables name) for its lifetime; a removed port hands every
//! frame it held back to the worker ([`Port::release`]).
//!
//! The same channel carries `ferry trace --inject`'s commands: a frame to forward as if a port
//! had received it, recorded with a [`Marked`] recorder ([`PortCommand::Inject`]), and a watch for
//! a marked packet on the uplink ([`PortCommand::Watch`]). Only while a watch is armed does the
//! uplink's receive loop look at each packet (one test per batch otherwise).
//!
//! Idle handling ([`PollMode::Adaptive`]): the worker spins while packets flow and for a short
//! time after the last one (yielding the core on each empty round, so that a kernel thread or
//! another worker sharing it is not kept waiting), then sleeps in `poll(2)` on its ports' descriptors (or briefly, for
//! ports without one) until traffic or a timeout wakes it. A wakeup that finds nothing goes straight
//! back to sleep: the spin budget restarts only when a packet arrives. [`PollMode::Busy`] never
//! sleeps, for benchmarks.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};

use ferry_tables::Reader;

use ferry_encap::{DropReason, FrameBuf, Verdict};

use crate::counters::{Counters, SharedCounters};
use crate::flows::{FlowExport, FlowOutcome, FlowTable, FlowVerdict, NO_PORT as FLOW_NO_PORT, Stage};
use crate::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use crate::pipeline::{Fib, Pipeline, PortId, PortRole};
use crate::port::{Port, SuperHead};
use crate::trace::{Marked, NoTrace, Recorder, TraceMark, Traced};

/// Packets taken from a port per receive call, and the size of an egress batch.
pub const BATCH: usize = 64;

/// Receive calls per port in one iteration, at most, while the port keeps returning full batches
/// or super-packets.
pub const RECV_ROUNDS: usize = 8;

/// Flow table slots a busy worker looks at for changes each time it publishes: two per packet
/// received since the last publish, at most this many (an idle one looks at all of them). Export
/// work so stays a small, bounded share of forwarding work however fast the worker goes.
const BUSY_SWEEP: usize = 512;

/// How often a busy worker publishes its counters ([`SharedCounters`]); an idle or stopping worker
/// publishes at once.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(5);

/// How a worker waits when there is no traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin while busy and for `spin` after the last packet, then sleep on the ports for up to
    /// `sleep` at a time.
    Adaptive {
        /// How long to keep spinning after the last packet.
        spin: Duration,
        /// Longest sleep (the stop flag and timers are checked at least this often).
        sleep: Duration,
    },
    /// Never sleep.
    Busy,
}

impl Default for PollMode {
    fn default() -> Self {
        PollMode::Adaptive { spin: Duration::from_micros(200), sleep: Duration::from_millis(100) }
    }
}

/// A change to a running worker's ports.
#[derive(Debug)]
pub enum PortCommand<P> {
    /// Start serving `port` as `id` (replacing, and releasing, a port already there).
    Add {
        /// The port's identity in the forwarding tables.
        id: PortId,
        /// The port, opened on this worker's frame memory.
        port: P,
        /// What traffic it carries.
        role: PortRole,
        /// Told the outcome once the worker has applied it.
        done: Sender<Result<(), PortCommandError>>,
    },
    /// Stop serving `id`: close the port and take its frames back. Removing an absent port is not
    /// an error.
    Remove {
        /// The port.
        id: PortId,
        /// Told once the port is closed (`true` if there was one).
        done: Sender<bool>,
    },
    /// `ferry trace --inject`, the source's half: take `frame` as if port `id` had received it and
    /// forward it for real, recording its stages (the next iteration does it, with the tables it
    /// loads).
    Inject {
        /// The port it comes in on.
        id: PortId,
        /// The frame.
        frame: Vec<u8>,
        /// Told the record of it, once forwarded (or why it could not be injected).
        done: Sender<Result<Traced, PortCommandError>>,
    },
    /// `ferry trace --inject`, the destination's half: record the stages of the first packet the
    /// uplink receives that ends with `mark`, until `until`.
    Watch {
        /// What to watch for.
        mark: TraceMark,
        /// When to give up.
        until: Instant,
        /// Told the record of the packet (each worker watching gets a clone).
        record: Sender<Traced>,
        /// Told once the watch is armed (or why not).
        armed: Sender<Result<(), PortCommandError>>,
    },
}

/// Watches a worker keeps at most (each is a trace in progress).
pub const MAX_WATCHES: usize = 64;

/// The headroom an injected frame gets in its frame (what AF_XDP gives a received one).
const INJECT_HEADROOM: usize = 256;

/// [`NoTrace`] under another name, for the unmarked packets of a watched batch: a copy of
/// `Worker::forward` of their own, so that the forwarding loop's `forward::<NoTrace>` keeps its
/// single call site and the compiler inlines it (and the stages in it) as it did before.
struct Unmarked;

impl Recorder for Unmarked {
    const ON: bool = false;

    #[inline(always)]
    fn note(&mut self, _note: crate::trace::Note) {}
}

/// A watch for a marked packet ([`PortCommand::Watch`]).
#[derive(Debug)]
struct Watch {
    mark: TraceMark,
    until: Instant,
    record: Sender<Traced>,
}

/// A frame waiting to be injected ([`PortCommand::Inject`]).
#[derive(Debug)]
struct Inject {
    id: PortId,
    frame: Vec<u8>,
    done: Sender<Result<Traced, PortCommandError>>,
}

/// Why a port command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PortCommandError {
    /// The id is beyond the worker's port capacity.
    #[error("port id {id} is beyond this worker's capacity of {capacity} ports")]
    Capacity {
        /// The id asked for.
        id: u16,
        /// Ports the worker was sized for.
        capacity: usize,
    },
    /// The worker did not apply the command in time.
    #[error("the worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker has stopped.
    #[error("the worker has stopped")]
    Stopped,
    /// No port has this id on the worker.
    #[error("no port {id} on this worker")]
    NoSuchPort {
        /// The id asked for.
        id: u16,
    },
    /// No free frame to inject a packet in (the worker is short of memory: try again).
    #[error("no free frame to inject the packet in")]
    NoFreeFrame,
    /// The frame does not fit in one of the worker's frames.
    #[error("a frame of {len} bytes does not fit in the worker's {size}-byte frames")]
    FrameTooLong {
        /// Its length.
        len: usize,
        /// The worker's frame size.
        size: usize,
    },
    /// The worker watches for as many marked packets as it will.
    #[error("the worker already watches for {max} marked packets")]
    TooManyWatches {
        /// [`MAX_WATCHES`].
        max: usize,
    },
}

/// Sends [`PortCommand`]s to a running worker and waits for them to take effect (setup side).
#[derive(Debug)]
pub struct PortControl<P> {
    tx: Sender<PortCommand<P>>,
    wake: Arc<WakeFd>,
}

impl<P> Clone for PortControl<P> {
    fn clone(&self) -> Self {
        PortControl { tx: self.tx.clone(), wake: Arc::clone(&self.wake) }
    }
}

impl<P> PortControl<P> {
    /// Add `port` as `id` and wait until the worker serves it.
    ///
    /// # Errors
    /// [`PortCommandError`]: capacity, timeout, or a stopped worker.
    pub fn add(&self, id: PortId, port: P, role: PortRole, timeout: Duration) -> Result<(), PortCommandError> {
        let (done, rx) = channel::bounded(1);
        self.tx.send(PortCommand::Add { id, port, role, done }).map_err(|_| PortCommandError::Stopped)?;
        self.wake.wake();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(channel::RecvTimeoutError::Timeout) => Err(PortCommandError::Timeout(timeout)),
            Err(channel::RecvTimeoutError::Disconnected) => Err(PortCommandError::Stopped),
        }
    }

    /// Inject `frame` as if port `id` had received it: the worker forwards it for real (it is
    /// sent, delivered or dropped, and counted, like any packet from that port) and records its
    /// stages as [`crate::pipeline::Pipeline::trace`] does. Waits for the record.
    ///
    /// # Errors
    /// [`PortCommandError`]: no such port, no free frame, a frame too long, timeout, stopped.
    pub fn inject(&self, id: PortId, frame: Vec<u8>, timeout: Duration) -> Result<Traced, PortCommandError> {
        let (done, rx) = channel::bounded(1);
        self.tx.send(PortCommand::Inject { id, frame, done }).map_err(|_| PortCommandError::Stopped)?;
        self.wake.wake();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(channel::RecvTimeoutError::Timeout) => Err(PortCommandError::Timeout(timeout)),
            Err(channel::RecvTimeoutError::Disconnected) => Err(PortCommandError::Stopped),
        }
    }

    /// Watch the uplink for the first packet ending with `mark` until `until`, and send its record
    /// to `record`. Returns once the watch is armed.
    ///
    /// # Errors
    /// [`PortCommandError::TooManyWatches`], timeout, stopped.
    pub fn watch(
        &self,
        mark: TraceMark,
        until: Instant,
        record: Sender<Traced>,
        timeout: Duration,
    ) -> Result<(), PortCommandError> {
        let (armed, rx) = channel::bounded(1);
        self.tx.send(PortCommand::Watch { mark, until, record, armed }).map_err(|_| PortCommandError::Stopped)?;
        self.wake.wake();
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(channel::RecvTimeoutError::Timeout) => Err(PortCommandError::Timeout(timeout)),
            Err(channel::RecvTimeoutError::Disconnected) => Err(PortCommandError::Stopped),
        }
    }

    /// Remove port `id` and wait until it is closed; `Ok(false)` if there was none.
    ///
    /// # Errors
    /// [`PortCommandError::Timeout`] or [`PortCommandError::Stopped`].
    pub fn remove(&self, id: PortId, timeout: Duration) -> Result<bool, PortCommandError> {
        let (done, rx) = channel::bounded(1);
        self.tx.send(PortCommand::Remove { id, done }).map_err(|_| PortCommandError::Stopped)?;
        self.wake.wake();
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(channel::RecvTimeoutError::Timeout) => Err(PortCommandError::Timeout(timeout)),
            Err(channel::RecvTimeoutError::Disconnected) => Err(PortCommandError::Stopped),
        }
    }
}

/// An eventfd that wakes a sleeping worker.
#[derive(Debug)]
struct WakeFd(Option<OwnedFd>);

impl WakeFd {
    fn new() -> Self {
        // SAFETY: plain syscall; a negative result is handled (the worker then never sleeps long
        // enough to need waking: see `Worker::sleep`).
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        WakeFd((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        if let Some(fd) = &self.0 {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd; failure (counter full) still
            // leaves it readable, which is all a wakeup needs.
            unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    fn clear(&self) {
        if let Some(fd) = &self.0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
            unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
        }
    }

    fn raw(&self) -> Option<RawFd> {
        self.0.as_ref().map(AsRawFd::as_raw_fd)
    }
}

/// No port at this id.
const NO_PORT: u32 = u32::MAX;

/// The longest repeated headers of a super-packet the worker carries over (Ethernet, IPv6 or IPv4
/// with options, TCP with options).
const MAX_SUPER_HEADERS: usize = 256;

/// Two distinct elements of `v`, both writable.
///
/// # Panics
/// If `a == b` (the callers check).
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two distinct ports");
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// A worker over ports of type `P`.
#[derive(Debug)]
pub struct Worker<P: Port> {
    /// Ports, densely packed (the order is not their id's).
    ports: Vec<P>,
    roles: Vec<PortRole>,
    /// Dense index -> id.
    ids: Vec<PortId>,
    /// Id -> dense index, or [`NO_PORT`]; its length is the port capacity.
    index: Vec<u32>,
    commands: Option<(Receiver<PortCommand<P>>, Arc<WakeFd>)>,
    control_tx: Option<Sender<PortCommand<P>>>,
    mem: P::Mem,
    free: FreeFrames,
    pipeline: Pipeline,
    counters: Counters,
    shared: Arc<SharedCounters>,
    rx: Box<[Pkt]>,
    out: Vec<Vec<Pkt>>,
    epoch: Instant,
    /// When counters were last published, in nanoseconds since `epoch`.
    last_publish_ns: u64,
    /// This batch's time, nanoseconds since `epoch`.
    now_ns: u64,
    /// Packets received since the counters were last published.
    since_publish: usize,
    last_port_stats: Instant,
    /// Frames to inject at the next iteration (`ferry trace --inject`).
    injects: Vec<Inject>,
    /// Marked packets the uplink watches for (`ferry trace --inject`); while there are none, the
    /// receive loop does not look.
    watches: Vec<Watch>,
}

impl<P: Port> Worker<P> {
    /// A worker owning `ports` (with their roles, same order; port `i` is `PortId(i)`), the frame
    /// memory they share, and the free frames of that memory. It has room for these ports only;
    /// [`Worker::with_capacity`] makes room for ports added later.
    ///
    /// # Panics
    /// If `ports` and `roles` differ in length or there are more than 65536 ports.
    pub fn new(ports: Vec<P>, roles: Vec<PortRole>, mem: P::Mem, free: FreeFrames, pipeline: Pipeline) -> Self {
        assert_eq!(ports.len(), roles.len(), "one role per port");
        assert!(ports.len() <= usize::from(u16::MAX) + 1, "too many ports");
        let n = ports.len();
        let blank = Pkt { frame: FrameId(0), offset: 0, len: 0 };
        Worker {
            ids: (0..n).map(|i| PortId(i as u16)).collect(),
            index: (0..n as u32).collect(),
            ports,
            roles,
            commands: None,
            control_tx: None,
            mem,
            free,
            pipeline,
            counters: Counters::new(n),
            shared: Arc::new(SharedCounters::new(n)),
            rx: vec![blank; BATCH].into_boxed_slice(),
            out: (0..n).map(|_| Vec::with_capacity(BATCH)).collect(),
            epoch: Instant::now(),
            last_publish_ns: 0,
            now_ns: 0,
            since_publish: 0,
            last_port_stats: Instant::now(),
            injects: Vec::new(),
            watches: Vec::new(),
        }
    }

    /// Make room for port ids below `capacity` (at most 65536), for ports added while running.
    /// Call it before [`Worker::shared_counters`]: the published counters are sized here.
    #[must_use]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        let capacity = capacity.clamp(self.index.len(), usize::from(u16::MAX) + 1);
        self.index.resize(capacity, NO_PORT);
        self.counters.rx.resize(capacity, Default::default());
        self.counters.tx.resize(capacity, Default::default());
        self.counters.port.resize(capacity, Default::default());
        self.shared = Arc::new(SharedCounters::new(capacity));
        self
    }

    /// Keep flow records: a table of `slots` flows exporting into a ring of `ring` records (see
    /// [`crate::flows`]); `worker` names this worker in them. The pipeline notes what it sees.
    #[must_use]
    pub fn with_flows(mut self, slots: usize, ring: usize, worker: u16) -> Self {
        self.pipeline.set_flows(Some(FlowTable::new(slots, ring, self.epoch, worker)));
        self
    }

    /// The flow records' export handle, when flows are on.
    pub fn flow_export(&self) -> Option<Arc<FlowExport>> {
        self.pipeline.flows().map(FlowTable::export)
    }

    /// A handle that adds and removes ports while the worker runs ([`Worker::run`] applies its
    /// commands). Every call returns a handle on the same channel.
    pub fn control(&mut self) -> PortControl<P> {
        if self.commands.is_none() {
            let (tx, rx) = channel::unbounded();
            let wake = Arc::new(WakeFd::new());
            self.commands = Some((rx, Arc::clone(&wake)));
            self.control_tx = Some(tx);
        }
        let (_, wake) = self.commands.as_ref().expect("just set");
        PortControl { tx: self.control_tx.clone().expect("just set"), wake: Arc::clone(wake) }
    }

    /// The id of each port, in the order of [`Worker::ports`].
    pub fn port_ids(&self) -> &[PortId] {
        &self.ids
    }

    /// Apply pending port commands (between iterations).
    pub fn apply_commands(&mut self) {
        while let Some(cmd) = self.commands.as_ref().and_then(|(rx, _)| rx.try_recv().ok()) {
            match cmd {
                PortCommand::Add { id, port, role, done } => {
                    let r = self.add_port(id, port, role);
                    let _ = done.send(r);
                }
                PortCommand::Remove { id, done } => {
                    let was = self.remove_port(id);
                    let _ = done.send(was);
                }
                // Injected at the next iteration, which has the tables.
                PortCommand::Inject { id, frame, done } => self.injects.push(Inject { id, frame, done }),
                PortCommand::Watch { mark, until, record, armed } => {
                    let now = Instant::now();
                    self.watches.retain(|w| w.until > now);
                    let r = if self.watches.len() >= MAX_WATCHES {
                        Err(PortCommandError::TooManyWatches { max: MAX_WATCHES })
                    } else {
                        self.watches.push(Watch { mark, until, record });
                        Ok(())
                    };
                    let _ = armed.send(r);
                }
            }
        }
    }

    fn add_port(&mut self, id: PortId, port: P, role: PortRole) -> Result<(), PortCommandError> {
        let i = usize::from(id.0);
        if i >= self.index.len() {
            port.release(&mut self.free);
            return Err(PortCommandError::Capacity { id: id.0, capacity: self.index.len() });
        }
        self.remove_port(id);
        self.index[i] = self.ports.len() as u32;
        self.ports.push(port);
        self.roles.push(role);
        self.ids.push(id);
        self.out.push(Vec::with_capacity(BATCH));
        // A new port starts its counters from zero (the id may have served another port before).
        self.counters.rx[i] = Default::default();
        self.counters.tx[i] = Default::default();
        self.counters.port[i] = Default::default();
        self.shared.publish_port(&self.counters, id);
        Ok(())
    }

    fn remove_port(&mut self, id: PortId) -> bool {
        let Some(&d) = self.index.get(usize::from(id.0)) else { return false };
        if d == NO_PORT {
            return false;
        }
        let d = d as usize;
        self.flush_port(d);
        let port = self.ports.swap_remove(d);
        self.roles.swap_remove(d);
        self.ids.swap_remove(d);
        for pkt in self.out.swap_remove(d) {
            self.free.push(pkt.frame);
        }
        self.index[usize::from(id.0)] = NO_PORT;
        if let Some(moved) = self.ids.get(d) {
            self.index[usize::from(moved.0)] = d as u32;
        }
        // Its last counts: later publishes cover live ports only.
        if let Some(stats) = self.counters.port.get_mut(usize::from(id.0)) {
            *stats = port.stats();
        }
        self.shared.publish_port(&self.counters, id);
        port.release(&mut self.free);
        true
    }

    /// The published counters, for readers on other threads.
    pub fn shared_counters(&self) -> Arc<SharedCounters> {
        Arc::clone(&self.shared)
    }

    /// The pipeline's connection-tracking table.
    pub fn conntrack(&self) -> &std::sync::Arc<crate::conntrack::Conntrack> {
        self.pipeline.conntrack()
    }

    /// The worker's own counters (exact, for tests and benches on the worker's thread).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The ports.
    pub fn ports(&self) -> &[P] {
        &self.ports
    }

    /// The ports, writable (tests inject and collect traffic through them).
    pub fn ports_mut(&mut self) -> &mut [P] {
        &mut self.ports
    }

    /// The frame memory and the ports together.
    pub fn mem_and_ports(&mut self) -> (&mut P::Mem, &mut [P]) {
        (&mut self.mem, &mut self.ports)
    }

    /// Free frames now.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Frames accounted for: free plus held by ports. Equal to the frame count whenever the worker
    /// is between iterations, if no frame leaked.
    pub fn frames_accounted(&self) -> usize {
        self.free.len() + self.ports.iter().map(Port::frames_held).sum::<usize>()
    }

    /// One iteration over every port; returns the number of packets received.
    pub fn poll_once<F: Fib>(&mut self, fib: &F) -> usize {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.now_ns = now;
        self.pipeline.set_time(now);
        for p in &mut self.ports {
            p.reclaim(&mut self.free);
            p.refill(&mut self.free);
        }
        if !self.injects.is_empty() {
            self.inject_pending(fib);
        }
        if !self.watches.is_empty() {
            self.expire_watches();
        }
        let mut received = 0;
        // Whether every port's queue was emptied (its last batch short): flow offload's UDP
        // entries wait for that (see `Pipeline::commit_offers`).
        let mut drained = true;
        for i in 0..self.ports.len() {
            // A port that filled the batch, or ended it early at a super-packet, likely has more
            // ready: take it now, up to RECV_ROUNDS batches, rather than after a round of every
            // other port. A UDP uplink so drains its socket buffer in bursts instead of one
            // `UDP_GRO` buffer per iteration; the bound keeps the other ports from waiting long.
            for round in 0..RECV_ROUNDS {
                let n = self.ports[i].recv(&mut self.mem, &mut self.rx);
                received += n;
                let mut last = None;
                // One test per batch: only while a marked packet is awaited does the uplink's loop
                // look at each packet.
                if self.watches.is_empty() || self.roles[i] != PortRole::Uplink {
                    for k in 0..n {
                        let pkt = self.rx[k];
                        last = self.forward(fib, i, pkt, &mut NoTrace);
                    }
                } else {
                    last = self.forward_watched(fib, i, n);
                }
                let mut more = n == self.rx.len();
                if n > 0
                    && let Some(head) = self.ports[i].super_head()
                {
                    let sent = last.map_or(0, |(out, pkt)| self.super_forward(i, out, pkt, head));
                    self.ports[i].super_done(sent);
                    more = true;
                } else if n > 0 && self.ports[i].super_run().is_some() {
                    let rx_len = self.rx[n - 1].len;
                    let sent = last.map_or(0, |(out, pkt)| self.super_deliver(i, out, pkt, rx_len));
                    self.ports[i].super_done(sent);
                    more = true;
                }
                if !more {
                    break;
                }
                if round + 1 == RECV_ROUNDS {
                    drained = false;
                }
            }
        }
        for p in 0..self.ports.len() {
            self.flush_port(p);
        }
        // Flow offload's entries, now that the packets that made them are out.
        self.pipeline.commit_offers(drained);
        self.counters.double_frees = self.free.refused();
        self.since_publish += received;
        if now.saturating_sub(self.last_publish_ns) >= PUBLISH_INTERVAL.as_nanos() as u64 {
            self.publish_at(now, (2 * self.since_publish).min(BUSY_SWEEP));
        }
        received
    }

    /// Inject the frames [`PortCommand::Inject`] queued: each is forwarded like a packet received
    /// on its port (the end of the iteration sends it), with a [`Marked`] recorder.
    // Kept out of `poll_once`: inlined there, it made the compiler stop inlining the stages into the
    // forwarding loop (+90-115 instructions a packet under callgrind).
    #[cold]
    #[inline(never)]
    fn inject_pending<F: Fib>(&mut self, fib: &F) {
        for Inject { id, frame, done } in std::mem::take(&mut self.injects) {
            let _ = done.send(self.inject(fib, id, &frame));
        }
    }

    fn inject<F: Fib>(&mut self, fib: &F, id: PortId, bytes: &[u8]) -> Result<Traced, PortCommandError> {
        let d = match self.index.get(usize::from(id.0)) {
            Some(&d) if d != NO_PORT => d as usize,
            _ => return Err(PortCommandError::NoSuchPort { id: id.0 }),
        };
        let size = self.mem.frame_size().min(usize::from(u16::MAX));
        if bytes.len() > size {
            return Err(PortCommandError::FrameTooLong { len: bytes.len(), size });
        }
        let frame = self.free.pop().ok_or(PortCommandError::NoFreeFrame)?;
        let offset = INJECT_HEADROOM.min(size - bytes.len());
        self.mem.frame_mut(frame)[offset..offset + bytes.len()].copy_from_slice(bytes);
        // Both fit in u16: the frame size is at most 65535.
        let pkt = Pkt { frame, offset: offset as u16, len: bytes.len() as u16 };
        let mut rec = Marked::default();
        self.forward(fib, d, pkt, &mut rec);
        rec.into_traced().ok_or(PortCommandError::FrameTooLong { len: bytes.len(), size })
    }

    /// Drops the watches past their deadline.
    #[cold]
    #[inline(never)]
    fn expire_watches(&mut self) {
        let now = Instant::now();
        self.watches.retain(|w| w.until > now);
    }

    /// [`Self::forward`] for the `n` packets just received from the uplink while marked packets
    /// are awaited: the first packet with a watch's mark is forwarded with a [`Marked`] recorder
    /// and its record sent. Returns what the last packet's `forward` returned.
    // Kept out of `poll_once`: inlined there, it made the compiler stop inlining the stages into the
    // forwarding loop (+90-115 instructions a packet under callgrind).
    #[cold]
    #[inline(never)]
    fn forward_watched<F: Fib>(&mut self, fib: &F, in_port: usize, n: usize) -> Option<(usize, Pkt)> {
        let mut last = None;
        for k in 0..n {
            let pkt = self.rx[k];
            last = self.forward_one_watched(fib, in_port, pkt);
        }
        last
    }

    fn forward_one_watched<F: Fib>(&mut self, fib: &F, in_port: usize, pkt: Pkt) -> Option<(usize, Pkt)> {
        let start = usize::from(pkt.offset);
        let data = self.mem.frame(pkt.frame).get(start..start + usize::from(pkt.len)).unwrap_or_default();
        let Some(w) = self.watches.iter().position(|w| w.mark.matches(data)) else {
            return self.forward(fib, in_port, pkt, &mut Unmarked);
        };
        let w = self.watches.swap_remove(w);
        let mut rec = Marked::default();
        let out = self.forward(fib, in_port, pkt, &mut rec);
        if let Some(t) = rec.into_traced() {
            let _ = w.record.send(t);
        }
        out
    }

    /// One packet through the pipeline and onto its egress batch; returns the egress port and the
    /// packet as queued there. `rec` is [`NoTrace`] but for a marked packet (`ferry trace
    /// --inject`), which it records; the forwarding is the same.
    fn forward<F: Fib, R: Recorder>(&mut self, fib: &F, in_port: usize, pkt: Pkt, rec: &mut R) -> Option<(usize, Pkt)> {
        let in_id = self.ids[in_port];
        let rx = &mut self.counters.rx[usize::from(in_id.0)];
        rx.packets += 1;
        rx.bytes += u64::from(pkt.len);
        let buf = self.mem.frame_mut(pkt.frame);
        let Some(mut frame) = FrameBuf::new(buf, usize::from(pkt.offset), usize::from(pkt.len)) else {
            // A port handed over a descriptor outside its frame: count it and recycle the frame.
            self.counters.pipeline.drops[DropReason::Truncated as usize] += 1;
            self.free.push(pkt.frame);
            return None;
        };
        let role = self.roles[in_port];
        // The forwarding path calls `process`, as it did before marks existed; only a marked
        // packet's recorder goes through `process_with`.
        let v = if R::ON {
            let v = self.pipeline.process_with(fib, in_id, role, &mut frame, &mut self.counters.pipeline, rec);
            rec.outcome(v, frame.data());
            v
        } else {
            self.pipeline.process(fib, in_id, role, &mut frame, &mut self.counters.pipeline)
        };
        if let Some((flows, slot, uplink)) = self.pipeline.flow_slot() {
            let outcome = match v {
                Verdict::Forward(p) => {
                    let stage = if p == uplink { Stage::Encap } else { Stage::Deliver };
                    FlowOutcome::new(p.0, FlowVerdict::Forwarded, 0, stage)
                }
                Verdict::Reply => FlowOutcome::new(in_id.0, FlowVerdict::Replied, 0, Stage::Reply),
                Verdict::Drop(r) => {
                    flows.drop_event(slot, r, in_id.0, frame.data(), self.now_ns);
                    let uplink = role == PortRole::Uplink;
                    FlowOutcome::new(FLOW_NO_PORT, FlowVerdict::Dropped, r as u8, Stage::of_drop(r, uplink))
                }
            };
            flows.outcome(slot, outcome);
        }
        let out = match v {
            Verdict::Forward(PortId(p)) => match self.index.get(usize::from(p)) {
                Some(&d) if d != NO_PORT => d as usize,
                // The tables name a port this worker does not (or no longer) serve.
                _ => {
                    self.counters.pipeline.drops[DropReason::NoRoute as usize] += 1;
                    self.free.push(pkt.frame);
                    return None;
                }
            },
            Verdict::Reply => in_port,
            Verdict::Drop(_) => {
                self.free.push(pkt.frame);
                return None;
            }
        };
        // Frame sizes are at most 65535 (checked when the memory was made), so these fit.
        let sent = Pkt { frame: pkt.frame, offset: frame.start() as u16, len: frame.len() as u16 };
        self.out[out].push(sent);
        if self.out[out].len() == BATCH {
            self.flush_port(out);
        }
        Some((out, sent))
    }

    /// The super-packet path (send side). Port `in_port` ended its batch with the first segment of
    /// a super-packet whose other segments it holds (`head`), and the pipeline sent that segment to
    /// `out` as `pkt`. When `out` can take the other segments (the UDP uplink), they follow it
    /// without a pipeline pass each: the first segment is sent, its headers as the pipeline left
    /// them (MACs, TTL, any translation) go back into the held super-packet, and the egress port
    /// writes every other segment behind the same tunnel header. Returns how many segments went
    /// this way (0: declined, and the port delivers them as ordinary packets).
    ///
    /// Why one pass stands for all: the segments of one TSO packet share every header field a stage
    /// reads (addresses, ports, protocol, TTL, TOS); they differ only in length, IPv4 ID, sequence
    /// number, checksums and the PSH/CWR flags, and the port offers only super-packets without
    /// FIN/SYN/RST/URG. Each segment is counted as a packet received and sent, as if it had been
    /// forwarded alone (the kernel's interface counters count wire packets the same way).
    fn super_forward(&mut self, in_port: usize, out: usize, pkt: Pkt, head: SuperHead) -> usize {
        if out == in_port || usize::from(pkt.len) < head.first_len {
            return 0;
        }
        self.send_queued(out);
        let (src, dst) = two_mut(&mut self.ports, in_port, out);
        let Some(payload) = dst.last_sent_payload() else { return 0 };
        // The tunnel payload is the tunnel header and then the first segment, as long as it was.
        let Some(tunnel_header) = payload.len().checked_sub(head.first_len) else { return 0 };
        let mut headers = [0u8; MAX_SUPER_HEADERS];
        let Some(headers) = headers.get_mut(..head.header_len) else { return 0 };
        let Some(h) = payload.get(tunnel_header..tunnel_header + head.header_len) else { return 0 };
        headers.copy_from_slice(h);
        let Some(seg) = src.super_rest(headers) else { return 0 };
        let sent = dst.send_segments(&seg, tunnel_header, 1);
        // The batch went out of `out` above, so the end-of-iteration kick skips it: kick now.
        let _ = dst.flush();
        let (mut rx_bytes, mut tx_bytes) = (0, 0);
        let outer = u64::from(pkt.len) - head.first_len as u64;
        for i in 1..=sent {
            let l = seg.segment_len(i) as u64;
            rx_bytes += l;
            tx_bytes += l + outer;
        }
        let rx = &mut self.counters.rx[usize::from(self.ids[in_port].0)];
        rx.packets += sent as u64;
        rx.bytes += rx_bytes;
        let tx = &mut self.counters.tx[usize::from(self.ids[out].0)];
        tx.packets += sent as u64;
        tx.bytes += tx_bytes;
        sent
    }

    /// The super-packet path, receive side. Port `in_port` (the UDP uplink) ended its batch with
    /// the first datagram of a run of tunnel datagrams carrying consecutive segments of one inner
    /// TCP flow ([`Port::super_run`]), and the pipeline sent that first segment, decapsulated, to
    /// `out` as `pkt` (received as `rx_len` bytes). When `out` takes the run (a pod's tap), the
    /// first segment's headers as the pipeline left them become the super-packet's and every
    /// other segment's payload is written behind them in one write, without a frame or a pipeline
    /// pass each (the same argument as [`Self::super_forward`]: the segments share every field a
    /// stage reads, and the port offers no run with FIN/SYN/RST/URG). Returns the segments after
    /// the first that went (0: declined, and the port delivers them as ordinary packets). Each
    /// segment is counted as a packet received and sent, with its own bytes.
    fn super_deliver(&mut self, in_port: usize, out: usize, pkt: Pkt, rx_len: u16) -> usize {
        // The first segment must still be queued: a full batch may have gone out with it.
        if out == in_port || self.out[out].last() != Some(&pkt) {
            return 0;
        }
        self.out[out].pop();
        // What was queued before it goes first.
        self.send_queued(out);
        let (src, dst) = two_mut(&mut self.ports, in_port, out);
        let Some(run) = src.super_run() else {
            self.out[out].push(pkt);
            return 0;
        };
        if !dst.send_run(&mut self.mem, pkt, &run) {
            self.out[out].push(pkt);
            return 0;
        }
        let (head_rx, head_tx) = (u64::from(rx_len), u64::from(pkt.len));
        let mss = run.mss as u64;
        let (mut rx_bytes, mut tx_bytes) = (0, head_tx);
        for i in 0..run.count {
            let l = run.payload(i).len() as u64;
            rx_bytes += (head_rx + l).saturating_sub(mss);
            tx_bytes += (head_tx + l).saturating_sub(mss);
        }
        let k = run.count;
        let rx = &mut self.counters.rx[usize::from(self.ids[in_port].0)];
        rx.packets += k as u64;
        rx.bytes += rx_bytes;
        let tx = &mut self.counters.tx[usize::from(self.ids[out].0)];
        tx.packets += 1 + k as u64;
        tx.bytes += tx_bytes;
        k
    }

    fn flush_port(&mut self, p: usize) {
        if self.out[p].is_empty() {
            return;
        }
        self.send_queued(p);
        // A failed kick leaves the packets queued in the ring; the next kick sends them.
        let _ = self.ports[p].flush();
    }

    /// Hand port `p` its queued packets, without the kick.
    fn send_queued(&mut self, p: usize) {
        let batch = &self.out[p];
        let taken = self.ports[p].send(&mut self.mem, batch);
        let tx = &mut self.counters.tx[usize::from(self.ids[p].0)];
        for pkt in &batch[..taken] {
            tx.packets += 1;
            tx.bytes += u64::from(pkt.len);
        }
        for pkt in &batch[taken..] {
            self.counters.pipeline.drops[DropReason::TxRingFull as usize] += 1;
            self.free.push(pkt.frame);
        }
        self.out[p].clear();
    }

    /// Publish the counters now (the worker does on its own: on a timer while busy, when idle, on
    /// port changes and when stopping).
    pub fn publish(&mut self) {
        self.publish_at(self.epoch.elapsed().as_nanos() as u64, usize::MAX);
    }

    /// Publish the counters, and export up to `sweep` flow slots' changes.
    fn publish_at(&mut self, now_ns: u64, sweep: usize) {
        if let Some(f) = self.pipeline.flows_mut() {
            f.sweep(sweep);
        }
        self.since_publish = 0;
        // The ports' own statistics cost a system call each: about once a second is enough.
        if self.last_port_stats.elapsed() >= Duration::from_secs(1) {
            for (p, id) in self.ports.iter().zip(&self.ids) {
                self.counters.port[usize::from(id.0)] = p.stats();
            }
            self.last_port_stats = Instant::now();
        }
        self.counters.frames = crate::counters::FrameAccount {
            total: u64::from(self.mem.frame_count()),
            free: self.free.len() as u64,
            held: self.ports.iter().map(Port::frames_held).sum::<usize>() as u64,
        };
        self.shared.publish(&self.counters, &self.ids);
        self.last_publish_ns = now_ns;
    }

    /// Run until `stop` is set, loading the current tables from `tables` once per iteration.
    pub fn run<F: Fib>(&mut self, tables: &mut Reader<F>, stop: &AtomicBool, mode: PollMode) {
        let mut last_packet = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            self.apply_commands();
            let n = self.poll_once(&**tables.load());
            if let PollMode::Adaptive { spin, sleep } = mode {
                if n > 0 {
                    last_packet = Instant::now();
                } else if last_packet.elapsed() >= spin {
                    self.publish();
                    self.sleep(sleep);
                } else {
                    // Spinning on empty rings: let whatever else is runnable on this core go first
                    // (the kernel thread filling these rings, another node's worker in a lab).
                    std::thread::yield_now();
                }
            }
        }
        self.publish();
    }

    /// Sleep until a port has something to receive, a port command arrives, or `max` passes.
    fn sleep(&self, max: Duration) {
        let wake = self.commands.as_ref().and_then(|(_, w)| w.raw());
        let mut fds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .filter_map(|p| p.poll_fd())
            .chain(wake)
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        let commands_only = self.commands.as_ref().is_some_and(|(_, w)| w.raw().is_none());
        if fds.is_empty() || commands_only {
            std::thread::sleep(max.min(Duration::from_millis(1)));
            return;
        }
        let ms = i32::try_from(max.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd` whose length is passed
        // alongside; the kernel writes only their `revents`. An error (EINTR) just ends the wait.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
        }
        if let Some((_, w)) = &self.commands {
            w.clear();
        }
    }
}

/// Errors starting a worker thread.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The requested core does not exist or is not in this process's CPU set.
    #[error("core {core} is not available to this process (available: {available:?}); pick one of those in `cores`")]
    NoSuchCore {
        /// The core asked for.
        core: usize,
        /// The cores this process may use.
        available: Vec<usize>,
    },
    /// The thread could not be spawned.
    #[error("could not start worker thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Start `worker` on its own thread, pinned to `core` when given, running until `stop` is set. The
/// thread hands the worker back when it ends.
///
/// # Errors
/// [`StartError`] when the core is not available or the thread cannot be created.
pub fn spawn<P, F>(
    name: String,
    mut worker: Worker<P>,
    core: Option<usize>,
    mut tables: Reader<F>,
    stop: Arc<AtomicBool>,
    mode: PollMode,
) -> Result<std::thread::JoinHandle<Worker<P>>, StartError>
where
    P: Port + Send + 'static,
    P::Mem: Send,
    F: Fib + Send + Sync + 'static,
{
    let pin = match core {
        None => None,
        Some(c) => {
            let ids = core_affinity::get_core_ids().unwrap_or_default();
            match ids.iter().find(|id| id.id == c) {
                Some(id) => Some(*id),
                None => return Err(StartError::NoSuchCore { core: c, available: ids.iter().map(|i| i.id).collect() }),
            }
        }
    };
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Some(id) = pin
                && !core_affinity::set_for_current(id)
            {
                tracing::warn!(core = id.id, "could not pin worker thread; running unpinned");
            }
            worker.run(&mut tables, &stop, mode);
            worker
        })
        .map_err(|source| StartError::Spawn { name, source })
}

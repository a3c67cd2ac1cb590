//! A poll-mode worker: one thread, its ports, its frame memory, the pipeline (hot path), and the
//! setup to start it pinned to a core.
//!
//! Each loop iteration reclaims completed transmissions, refills receive rings, then takes up to
//! [`BATCH`] packets from each port, runs each through the [`Pipeline`], and queues it for its
//! egress port; full egress batches go out immediately and the rest at the end of the iteration,
//! with one kick per port. The forwarding tables are loaded once per iteration.
//!
//! Idle handling ([`PollMode::Adaptive`]): the worker spins while packets flow and for a short
//! time after the last one, then sleeps in `poll(2)` on its ports' descriptors (or briefly, for
//! ports without one) until traffic or a timeout wakes it. A wakeup that finds nothing goes straight
//! back to sleep: the spin budget restarts only when a packet arrives. [`PollMode::Busy`] never
//! sleeps, for benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_tables::Reader;

use ferry_encap::{DropReason, FrameBuf, Verdict};

use crate::counters::{Counters, SharedCounters};
use crate::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use crate::pipeline::{Fib, Pipeline, PortId, PortRole};
use crate::port::Port;

/// Packets taken from a port per receive call, and the size of an egress batch.
pub const BATCH: usize = 64;

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

/// A worker over ports of type `P`.
#[derive(Debug)]
pub struct Worker<P: Port> {
    ports: Vec<P>,
    roles: Vec<PortRole>,
    mem: P::Mem,
    free: FreeFrames,
    pipeline: Pipeline,
    counters: Counters,
    shared: Arc<SharedCounters>,
    rx: Box<[Pkt]>,
    out: Vec<Vec<Pkt>>,
    epoch: Instant,
    last_publish: Instant,
}

impl<P: Port> Worker<P> {
    /// A worker owning `ports` (with their roles, same order), the frame memory they share, and
    /// the free frames of that memory.
    ///
    /// # Panics
    /// If `ports` and `roles` differ in length or there are more than 65536 ports.
    pub fn new(ports: Vec<P>, roles: Vec<PortRole>, mem: P::Mem, free: FreeFrames, pipeline: Pipeline) -> Self {
        assert_eq!(ports.len(), roles.len(), "one role per port");
        assert!(ports.len() <= usize::from(u16::MAX) + 1, "too many ports");
        let n = ports.len();
        let blank = Pkt { frame: FrameId(0), offset: 0, len: 0 };
        Worker {
            ports,
            roles,
            mem,
            free,
            pipeline,
            counters: Counters::new(n),
            shared: Arc::new(SharedCounters::new(n)),
            rx: vec![blank; BATCH].into_boxed_slice(),
            out: (0..n).map(|_| Vec::with_capacity(BATCH)).collect(),
            epoch: Instant::now(),
            last_publish: Instant::now(),
        }
    }

    /// The published counters, for readers on other threads.
    pub fn shared_counters(&self) -> Arc<SharedCounters> {
        Arc::clone(&self.shared)
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
        self.pipeline.set_time(self.epoch.elapsed().as_nanos() as u64);
        for p in &mut self.ports {
            p.reclaim(&mut self.free);
            p.refill(&mut self.free);
        }
        let mut received = 0;
        for i in 0..self.ports.len() {
            let n = self.ports[i].recv(&mut self.mem, &mut self.rx);
            received += n;
            for k in 0..n {
                let pkt = self.rx[k];
                self.forward(fib, i, pkt);
            }
        }
        for p in 0..self.ports.len() {
            self.flush_port(p);
        }
        if received > 0 || self.last_publish.elapsed() >= Duration::from_millis(1) {
            self.publish();
        }
        received
    }

    fn forward<F: Fib>(&mut self, fib: &F, in_port: usize, pkt: Pkt) {
        let rx = &mut self.counters.rx[in_port];
        rx.packets += 1;
        rx.bytes += u64::from(pkt.len);
        let buf = self.mem.frame_mut(pkt.frame);
        let Some(mut frame) = FrameBuf::new(buf, usize::from(pkt.offset), usize::from(pkt.len)) else {
            // A port handed over a descriptor outside its frame: count it and recycle the frame.
            self.counters.pipeline.drops[DropReason::Truncated as usize] += 1;
            self.free.push(pkt.frame);
            return;
        };
        let v = self.pipeline.process(
            fib,
            PortId(in_port as u16),
            self.roles[in_port],
            &mut frame,
            &mut self.counters.pipeline,
        );
        let out = match v {
            Verdict::Forward(PortId(p)) if usize::from(p) < self.ports.len() => usize::from(p),
            Verdict::Forward(_) => {
                self.counters.pipeline.drops[DropReason::NoRoute as usize] += 1;
                self.free.push(pkt.frame);
                return;
            }
            Verdict::Reply => in_port,
            Verdict::Drop(_) => {
                self.free.push(pkt.frame);
                return;
            }
        };
        // Frame sizes are at most 65535 (checked when the memory was made), so these fit.
        let sent = Pkt { frame: pkt.frame, offset: frame.start() as u16, len: frame.len() as u16 };
        self.out[out].push(sent);
        if self.out[out].len() == BATCH {
            self.flush_port(out);
        }
    }

    fn flush_port(&mut self, p: usize) {
        if self.out[p].is_empty() {
            return;
        }
        let batch = &self.out[p];
        let taken = self.ports[p].send(&mut self.mem, batch);
        let tx = &mut self.counters.tx[p];
        for pkt in &batch[..taken] {
            tx.packets += 1;
            tx.bytes += u64::from(pkt.len);
        }
        for pkt in &batch[taken..] {
            self.counters.pipeline.drops[DropReason::TxRingFull as usize] += 1;
            self.free.push(pkt.frame);
        }
        self.out[p].clear();
        // A failed kick leaves the packets queued in the ring; the next kick sends them.
        let _ = self.ports[p].flush();
    }

    fn publish(&mut self) {
        self.shared.publish(&self.counters);
        self.last_publish = Instant::now();
    }

    /// Run until `stop` is set, loading the current tables from `tables` once per iteration.
    pub fn run<F: Fib>(&mut self, tables: &mut Reader<F>, stop: &AtomicBool, mode: PollMode) {
        let mut last_packet = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let n = self.poll_once(&**tables.load());
            if let PollMode::Adaptive { spin, sleep } = mode {
                if n > 0 {
                    last_packet = Instant::now();
                } else if last_packet.elapsed() >= spin {
                    self.publish();
                    self.sleep(sleep);
                }
            }
        }
        self.publish();
    }

    /// Sleep until a port has something to receive or `max` passes.
    fn sleep(&self, max: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .filter_map(|p| p.poll_fd())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(max.min(Duration::from_millis(1)));
            return;
        }
        let ms = i32::try_from(max.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd` whose length is passed
        // alongside; the kernel writes only their `revents`. An error (EINTR) just ends the wait.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
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

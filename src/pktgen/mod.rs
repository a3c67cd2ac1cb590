//! `ferry pktgen`: an AF_XDP traffic generator and sink for measuring ferry (and anything else) on
//! one interface queue. Argument checking and socket setup here are the setup side; the loop in
//! [`run`] is hot path (batches, no allocation, syscalls only as kicks and idle waits).
//!
//! - **tx**: frames are prebuilt in the UMEM ([`tx::TxPool`]); per packet only the probe's
//!   sequence number and time and the UDP checksum are patched ([`wire::patch`]). Batches are
//!   paced by a token bucket ([`tx::TokenBucket`]), kicked once per batch, and completed frames go
//!   back to the pool. `--encap` sends ready-made VXLAN/Geneve packets (outer headers from
//!   [`ferry_encap::TunnelTemplate`]) at a node's uplink, so decapsulation can be measured alone.
//! - **rx**: ferry's catch-all XDP program ([`ferry_dataplane::xdp::XdpProgram::sink`]) sends the
//!   queue's frames to the socket; each frame's probe is found in the innermost UDP payload, through
//!   tunnels ([`wire::find_probe`]), and accounted per flow ([`track::SinkStats`]): rates, loss,
//!   reordering, duplicates, one-way latency (CLOCK_MONOTONIC, shared by the processes of one
//!   machine).
//! - **txrx**: both on one socket, for traffic that comes back to the same queue.
//!
//! A live line goes to stderr every second; `--json` prints a [`report::Summary`] on stdout at
//! the end. The run ends after `--duration` seconds or `--count` packets, whichever comes first
//! (10 seconds when neither is given), or on Ctrl-C.

pub mod report;
pub mod track;
pub mod tx;
pub mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use ferry_dataplane::frame::{FrameId, FrameMem, FreeFrames, Pkt};
use ferry_dataplane::port::Port;
use ferry_dataplane::port::xsk::{BindMode, XskError, XskMem, XskMemConfig, XskMode, XskPort, XskPortConfig};
use ferry_dataplane::xdp::{self, AttachMode, XdpAttachment, XdpError, XdpMode, XdpProgram};
use ferry_encap::{MacAddr, TemplateError, TemplateParams, TunnelKind, TunnelTemplate};

use self::report::{Latency, RxSummary, Summary, TxSummary};
use self::track::SinkStats;
use self::tx::{IMIX, TokenBucket, TxPool};
use self::wire::{BuildError, FlowAddrs};
use crate::netlink::{LinkError, Netlink};

/// Largest batch (descriptors per send or receive call).
const MAX_BATCH: usize = 256;
/// Ring sizes of the socket and the UMEM.
const RING: u32 = 2048;
/// Frames prebuilt at least (more when flows or the size pattern need a multiple).
const POOL_MIN: u32 = 4096;
/// Frames prebuilt at most for exact flow and size proportions.
const POOL_MAX: u32 = 65536;
/// How long the end of a transmit run waits for outstanding completions.
const DRAIN: Duration = Duration::from_secs(1);

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Generate.
    Tx,
    /// Receive and account.
    Rx,
    /// Both, on one socket.
    Txrx,
}

impl Mode {
    fn tx(self) -> bool {
        self != Mode::Rx
    }

    fn rx(self) -> bool {
        self != Mode::Tx
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Tx => "tx",
            Mode::Rx => "rx",
            Mode::Txrx => "txrx",
        }
    }
}

/// Tunnel for `--encap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Encap {
    /// VXLAN (RFC 7348).
    Vxlan,
    /// Geneve (RFC 8926).
    Geneve,
}

/// Copy or zero-copy (`--bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bind {
    /// Zero-copy where the driver can, copy otherwise.
    Auto,
    /// Always copy.
    Copy,
    /// Zero-copy or fail.
    Zerocopy,
}

/// A transmit rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// As fast as possible.
    Max,
    /// Packets per second.
    Pps(u64),
}

/// Parse `max`, `500000`, `500k`, `1.5M`.
///
/// # Errors
/// Anything else, with what to write instead.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("bad rate `{s}`: give packets per second (500000, 500k, 1.5M) or `max`");
    let t = s.trim();
    if t.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'g' | 'G')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let pps = v * mult;
    if !(1.0..=1e12).contains(&pps) {
        return Err(bad());
    }
    Ok(Rate::Pps(pps as u64))
}

/// `ferry pktgen` options.
#[derive(Debug, Clone, clap::Args)]
pub struct PktgenArgs {
    /// Interface to send on and/or receive from.
    #[arg(long)]
    pub iface: String,
    /// Queue of the interface.
    #[arg(long, default_value_t = 0)]
    pub queue: u32,
    /// Generate (tx), receive and account (rx), or both on one socket (txrx).
    #[arg(long, value_enum, default_value_t = Mode::Tx)]
    pub mode: Mode,
    /// Packets per second (500000, 500k, 1.5M) or `max`.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Frame size in bytes (no FCS), from 60 (110 with a tunnel) to the UMEM frame size. Default 60,
    /// or the smallest frame the tunnel allows.
    #[arg(long, conflicts_with = "imix")]
    pub size: Option<usize>,
    /// IMIX sizes instead of one size: 7:4:1 of 64/576/1500 bytes (64 raised to the tunnel's
    /// smallest frame with --encap).
    #[arg(long)]
    pub imix: bool,
    /// Flows: the source port, then the source address, vary by flow (1 to 65536).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub flows: u32,
    /// Stop after this many seconds (default 10 when --count is not given).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many packets (sent for tx and txrx, received for rx and txrx).
    #[arg(long)]
    pub count: Option<u64>,
    /// Inner IPv4 source (the first flow's).
    #[arg(long, default_value_t = Ipv4Addr::new(10, 0, 0, 1))]
    pub src_ip: Ipv4Addr,
    /// Inner IPv4 destination.
    #[arg(long, default_value_t = Ipv4Addr::new(10, 0, 0, 2))]
    pub dst_ip: Ipv4Addr,
    /// Inner Ethernet source (default: the interface's MAC).
    #[arg(long)]
    pub src_mac: Option<MacAddr>,
    /// Inner Ethernet destination.
    #[arg(long, default_value = "ff:ff:ff:ff:ff:ff")]
    pub dst_mac: MacAddr,
    /// UDP source port (the first flow's).
    #[arg(long, default_value_t = 1024)]
    pub src_port: u16,
    /// UDP destination port.
    #[arg(long, default_value_t = 9)]
    pub dst_port: u16,
    /// Send the frames inside this tunnel (then --src-*/--dst-* are the inner headers).
    #[arg(long, value_enum, requires = "outer_dst")]
    pub encap: Option<Encap>,
    /// Tunnel VNI.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// Outer IPv4 source (default: the interface's first IPv4 address).
    #[arg(long)]
    pub outer_src: Option<Ipv4Addr>,
    /// Outer IPv4 destination: the node whose uplink decapsulates.
    #[arg(long)]
    pub outer_dst: Option<Ipv4Addr>,
    /// Outer Ethernet source (default: the interface's MAC).
    #[arg(long)]
    pub outer_src_mac: Option<MacAddr>,
    /// Outer Ethernet destination: the node's uplink MAC.
    #[arg(long, default_value = "ff:ff:ff:ff:ff:ff")]
    pub outer_dst_mac: MacAddr,
    /// Outer UDP destination port (default 4789 for VXLAN, 6081 for Geneve).
    #[arg(long)]
    pub outer_dst_port: Option<u16>,
    /// Send UDP checksums as zero instead of computing them.
    #[arg(long)]
    pub zero_checksum: bool,
    /// Descriptors per batch and per kick (1 to 256; the kernel sends at most 32 frames per kick
    /// before Linux 6.17's XDP_MAX_TX_SKB_BUDGET, which the port raises to its ring size).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch: u16,
    /// Socket binding: auto, copy or zerocopy.
    #[arg(long, value_enum, default_value_t = Bind::Auto)]
    pub bind: Bind,
    /// Pin the process to this CPU.
    #[arg(long)]
    pub core: Option<usize>,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

/// Why `ferry pktgen` could not run.
#[derive(Debug, thiserror::Error)]
pub enum PktgenError {
    /// An option that cannot work.
    #[error("{problem}: {fix}")]
    Config {
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },
    /// The AF_XDP socket or its memory.
    #[error(transparent)]
    Xsk(#[from] XskError),
    /// The receive program.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// Reading the interface.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The tunnel's outer headers.
    #[error("--encap: {0}")]
    Template(#[from] TemplateError),
    /// A frame size.
    #[error("--size: {0}")]
    Build(#[from] BuildError),
    /// Transmission failed.
    #[error("transmitting on `{ifname}` failed ({source}); is the interface up?")]
    Transmit {
        /// Interface.
        ifname: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

fn config(problem: String, fix: &'static str) -> PktgenError {
    PktgenError::Config { problem, fix }
}

/// Set by SIGINT/SIGTERM: finish the run and print the summary.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// What the kernel says about the interface (over netlink).
struct IfaceInfo {
    mac: MacAddr,
    mtu: usize,
    /// Its first IPv4 address (the default outer source).
    ipv4: Option<Ipv4Addr>,
}

fn iface_info(ifname: &str) -> Result<IfaceInfo, PktgenError> {
    let nl = Netlink::open()?;
    let link = nl.link(ifname)?.ok_or_else(|| XskError::NoSuchInterface { ifname: ifname.to_owned() })?;
    let ipv4 = nl.addresses(ifname)?.iter().find_map(|n| match n.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    Ok(IfaceInfo { mac: link.mac.unwrap_or(MacAddr([0; 6])), mtu: link.mtu as usize, ipv4 })
}

/// Everything the loop needs, checked.
struct Plan {
    sizes: Vec<usize>,
    tunnel: Option<TunnelTemplate>,
    base: FlowAddrs,
    duration_ns: Option<u64>,
    count: Option<u64>,
    rate: Option<u64>,
    batch: usize,
}

fn plan(args: &PktgenArgs, info: &IfaceInfo) -> Result<Plan, PktgenError> {
    let tunnel = match args.encap {
        None => None,
        Some(kind) => {
            let kind = match kind {
                Encap::Vxlan => TunnelKind::Vxlan,
                Encap::Geneve => TunnelKind::Geneve,
            };
            let dst = args
                .outer_dst
                .ok_or_else(|| config("--encap needs --outer-dst".to_owned(), "give the node's underlay address"))?;
            let src = args.outer_src.or(info.ipv4).ok_or_else(|| {
                config(format!("`{}` has no IPv4 address for the outer source", args.iface), "give --outer-src")
            })?;
            let mut p = TemplateParams::new(
                kind,
                args.vni,
                args.outer_src_mac.unwrap_or(info.mac),
                args.outer_dst_mac,
                IpAddr::V4(src),
                IpAddr::V4(dst),
            );
            if let Some(port) = args.outer_dst_port {
                p.dst_port = port;
            }
            Some(TunnelTemplate::new(&p)?)
        }
    };
    let min = wire::min_frame(tunnel.as_ref());
    let sizes = if args.imix { IMIX.iter().map(|&s| s.max(min)).collect() } else { vec![args.size.unwrap_or(min)] };
    // The device takes frames up to its MTU plus the Ethernet header.
    let limit = info.mtu + 14;
    for &s in &sizes {
        if s < min {
            return Err(BuildError::TooShort {
                size: s,
                min,
                tunnel: if tunnel.is_some() { " with the tunnel headers" } else { "" },
            }
            .into());
        }
        if s > limit {
            return Err(config(
                format!("a {s}-byte frame exceeds `{}`'s MTU {} (frames up to {limit} bytes)", args.iface, info.mtu),
                "use a smaller --size or raise the MTU",
            ));
        }
    }
    let duration_ns = match (args.duration, args.count) {
        (Some(d), _) if !(d.is_finite() && d > 0.0) => {
            return Err(config(format!("bad --duration {d}"), "give a positive number of seconds"));
        }
        (Some(d), _) => Some((d * 1e9) as u64),
        (None, None) => Some(10_000_000_000),
        (None, Some(_)) => None,
    };
    if args.count == Some(0) {
        return Err(config("--count 0".to_owned(), "give at least one packet"));
    }
    Ok(Plan {
        sizes,
        tunnel,
        base: FlowAddrs {
            src_mac: args.src_mac.unwrap_or(info.mac),
            dst_mac: args.dst_mac,
            src_ip: args.src_ip,
            dst_ip: args.dst_ip,
            src_port: args.src_port,
            dst_port: args.dst_port,
        },
        duration_ns,
        count: args.count,
        rate: match args.rate {
            Rate::Max => None,
            Rate::Pps(p) => Some(p),
        },
        batch: usize::from(args.batch).min(MAX_BATCH),
    })
}

/// Run `ferry pktgen` with `args`: set up, generate and/or receive until the run ends, print the
/// summary.
///
/// # Errors
/// A bad option, a missing interface, missing privileges, AF_XDP or XDP setup failures (with the
/// data plane's messages), or a transmit error.
pub fn run(args: PktgenArgs) -> Result<(), PktgenError> {
    let info = iface_info(&args.iface)?;
    let plan = plan(&args, &info)?;
    if let Some(core) = args.core {
        let ids = core_affinity::get_core_ids().unwrap_or_default();
        let Some(id) = ids.into_iter().find(|c| c.id == core) else {
            return Err(config(format!("--core {core} is not a CPU this process may run on"), "see `nproc` / taskset"));
        };
        if !core_affinity::set_for_current(id) {
            return Err(config(format!("pinning to CPU {core} failed"), "check the process's CPU affinity"));
        }
    }
    install_signals();

    let pattern = plan.sizes.len();
    let pool = if args.mode.tx() { tx::pool_size(args.flows, pattern, POOL_MIN, POOL_MAX) } else { 0 };
    let rx_frames = if args.mode.rx() { 2 * RING } else { 0 };
    let biggest = plan.sizes.iter().copied().max().unwrap_or(0);
    // Received packets start 256 bytes into a UMEM chunk (the XDP headroom): size for those.
    let frame_size = if biggest + 256 > 2048 { 4096 } else { 2048 };
    let mut mem = XskMem::new(XskMemConfig {
        frame_count: pool + rx_frames,
        frame_size,
        fill_ring: RING,
        comp_ring: RING,
        bind: match args.bind {
            Bind::Auto => BindMode::Auto,
            Bind::Copy => BindMode::Copy,
            Bind::Zerocopy => BindMode::ZeroCopy,
        },
        need_wakeup: true,
        huge_pages: false,
    })?;
    let mut port = XskPort::open(
        &mem,
        &args.iface,
        args.queue,
        &XskPortConfig { rx_ring: RING, tx_ring: RING, busy_poll: None, fill_target: None },
    )?;

    let attachment = if args.mode.rx() {
        let queues = xdp::queue_count(&args.iface)?.unwrap_or(args.queue + 1).max(args.queue + 1);
        let prog = XdpProgram::sink(queues)?;
        prog.add_port(&port)?;
        Some(prog.attach(&args.iface, XdpMode::Auto)?)
    } else {
        None
    };

    let mut pool = if args.mode.tx() {
        Some(TxPool::build(
            &mut mem,
            pool,
            &plan.base,
            args.flows,
            &plan.sizes,
            plan.tunnel.as_ref(),
            !args.zero_checksum,
        )?)
    } else {
        None
    };
    let mut free = FreeFrames::empty(mem.frame_count());
    for id in pool.as_ref().map_or(0, TxPool::len) as u32..mem.frame_count() {
        free.push(FrameId(id));
    }

    eprintln!(
        "pktgen: ready on {}/{} ({}, {} mode{})",
        args.iface,
        args.queue,
        args.mode.name(),
        match port.mode() {
            XskMode::Copy => "copy",
            XskMode::ZeroCopy => "zero-copy",
        },
        attachment.as_ref().map_or(String::new(), |a| format!(", XDP {}", attach_label(a.mode())))
    );
    let summary = run_loop(&args, &plan, &mut mem, &mut port, pool.as_mut(), &mut free, attachment.as_ref())?;
    drop(attachment);
    if args.json {
        match serde_json::to_string_pretty(&summary) {
            Ok(s) => println!("{s}"),
            Err(e) => return Err(config(format!("encoding the summary failed: {e}"), "report this as a bug")),
        }
    }
    Ok(())
}

fn attach_label(m: AttachMode) -> &'static str {
    match m {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
    }
}

/// Transmit-side state of the loop.
#[derive(Debug, Default)]
struct TxState {
    queued: u64,
    packets: u64,
    bytes: u64,
    busy: u64,
    first_ns: u64,
    last_ns: u64,
}

/// Whether a kick error means "try again later".
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS))
}

#[expect(clippy::too_many_lines, reason = "one loop over both directions reads best in one place")]
fn run_loop(
    args: &PktgenArgs,
    plan: &Plan,
    mem: &mut XskMem,
    port: &mut XskPort,
    mut pool: Option<&mut TxPool>,
    free: &mut FreeFrames,
    attachment: Option<&XdpAttachment>,
) -> Result<Summary, PktgenError> {
    let mut pkts = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; MAX_BATCH];
    let mut rx_pkts = [Pkt { frame: FrameId(0), offset: 0, len: 0 }; MAX_BATCH];
    let mut stats = SinkStats::new();
    let mut txs = TxState::default();
    let (mut rx_first, mut rx_last) = (0u64, 0u64);
    let start = wire::now_ns();
    let end = plan.duration_ns.map(|d| start + d);
    let mut bucket = plan.rate.map(|r| TokenBucket::new(r, plan.batch, start));
    let mut tx_active = pool.is_some();
    let mut drain_until: Option<u64> = None;
    let rx_on = args.mode.rx();
    let mut idle = 0u32;
    let mut next_report = start + 1_000_000_000;
    let (mut rep_tx, mut rep_txb, mut rep_rx, mut rep_rxb, mut rep_t) = (0u64, 0u64, 0u64, 0u64, start);

    loop {
        let now = wire::now_ns();
        if STOP.load(Ordering::Relaxed) || end.is_some_and(|e| now >= e) {
            break;
        }
        let mut worked = false;
        if let Some(pool) = pool.as_deref_mut() {
            if port.reclaim(pool.done_mut()) > 0 {
                let (n, b) = pool.completed();
                txs.packets += n;
                txs.bytes += b;
                txs.last_ns = now;
                worked = true;
            }
            if tx_active {
                let mut n = plan.batch.min(pool.ready());
                if let Some(c) = plan.count {
                    n = n.min((c - txs.queued) as usize);
                }
                if let Some(b) = bucket.as_mut() {
                    n = n.min(b.available(now));
                }
                if n > 0 {
                    let k = pool.take(mem, &mut pkts, n, now);
                    let sent = port.send(mem, &pkts[..k]);
                    pool.untake(&pkts[sent..k]);
                    if sent > 0 {
                        if txs.queued == 0 {
                            txs.first_ns = now;
                        }
                        txs.queued += sent as u64;
                        if let Some(b) = bucket.as_mut() {
                            b.spend(sent);
                        }
                        worked = true;
                    }
                }
                if plan.count.is_some_and(|c| txs.queued >= c) {
                    tx_active = false;
                    drain_until = Some(now + DRAIN.as_nanos() as u64);
                }
            }
            if txs.queued > txs.packets {
                match port.flush() {
                    Ok(()) => {}
                    Err(e) if transient(&e) => txs.busy += 1,
                    Err(source) => return Err(PktgenError::Transmit { ifname: args.iface.clone(), source }),
                }
            }
            if !tx_active && (txs.packets >= txs.queued || drain_until.is_some_and(|d| now >= d)) && !rx_on {
                break;
            }
        }
        if rx_on {
            port.refill(free);
            let n = port.recv(mem, &mut rx_pkts[..plan.batch]);
            if n > 0 {
                let t = wire::now_ns();
                let before = stats.probes;
                for p in &rx_pkts[..n] {
                    stats.frame(mem.bytes(*p), t);
                    free.push(p.frame);
                }
                if stats.probes > before {
                    if rx_first == 0 {
                        rx_first = t;
                    }
                    rx_last = t;
                }
                worked = true;
            }
            if plan.count.is_some_and(|c| stats.probes >= c) {
                break;
            }
        }

        if now >= next_report {
            let dt = (now - rep_t) as f64 / 1e9;
            let mut line = format!("[{:6.1}s]", (now - start) as f64 / 1e9);
            if pool.is_some() {
                let (p, b) = (txs.packets - rep_tx, txs.bytes - rep_txb);
                line += &format!(
                    " tx {} {} (total {})",
                    report::rate(p as f64 / dt, "pps"),
                    report::rate(b as f64 * 8.0 / dt, "bit/s"),
                    txs.packets
                );
                (rep_tx, rep_txb) = (txs.packets, txs.bytes);
            }
            if rx_on {
                let (p, b) = (stats.probes - rep_rx, stats.probe_bytes - rep_rxb);
                let l = Latency::of(&stats);
                line += &format!(
                    " rx {} {} (total {}) lost {} reord {} dup {} lat p50 {} p99 {} max {}",
                    report::rate(p as f64 / dt, "pps"),
                    report::rate(b as f64 * 8.0 / dt, "bit/s"),
                    stats.probes,
                    stats.lost(),
                    stats.reordered,
                    stats.duplicates,
                    report::ns(l.p50),
                    report::ns(l.p99),
                    report::ns(l.max)
                );
                (rep_rx, rep_rxb) = (stats.probes, stats.probe_bytes);
            }
            eprintln!("{line}");
            rep_t = now;
            next_report += 1_000_000_000;
        }

        if worked {
            idle = 0;
            continue;
        }
        idle = idle.saturating_add(1);
        if let Some(b) = bucket.as_ref().filter(|_| tx_active) {
            // Pacing: sleep through long waits; through short ones, yield the CPU, so that a sink
            // sharing it (the benchmarks pin both to one CPU) runs as soon as its frames arrive
            // instead of after the generator's time slice: spinning there made a latency run's
            // p99 the scheduler's slices (4-90 ms at 20,000 packets a second), whatever the path.
            let w = b.wait_ns();
            if w > 200_000 {
                std::thread::sleep(Duration::from_nanos(w - 100_000));
            } else if w > 5_000 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        } else if !tx_active && rx_on && idle > 1000 {
            // Receive only and nothing arriving: sleep in poll(2) until frames come (1 ms at most,
            // so the end of the run and the live line stay on time).
            let mut pfd = libc::pollfd { fd: port.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&raw mut pfd, 1, 1) };
        }
    }
    let stop = wire::now_ns();
    // Frames still in flight on a timed run: give the kernel a moment to complete them.
    if let Some(pool) = pool.as_deref_mut() {
        let deadline = stop + DRAIN.as_nanos() as u64;
        while txs.packets < txs.queued && wire::now_ns() < deadline {
            let _ = port.flush();
            if port.reclaim(pool.done_mut()) > 0 {
                let (n, b) = pool.completed();
                txs.packets += n;
                txs.bytes += b;
                txs.last_ns = wire::now_ns();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    let secs = |a: u64, b: u64| if b > a { (b - a) as f64 / 1e9 } else { 0.0 };
    let per = |v: u64, s: f64| if s > 0.0 { v as f64 / s } else { 0.0 };
    let tx = pool.as_deref().map(|pool| {
        let s = secs(txs.first_ns, txs.last_ns.max(txs.first_ns));
        TxSummary {
            packets: txs.packets,
            bytes: txs.bytes,
            pps: per(txs.packets, s),
            bps: per(txs.bytes * 8, s),
            seconds: s,
            unfinished: txs.queued - txs.packets,
            busy_kicks: txs.busy,
            flows: args.flows,
            frames: pool.len() as u32,
            encap: plan.tunnel.as_ref().map(|t| t.kind().name()),
        }
    });
    let rx = rx_on.then(|| {
        let s = secs(rx_first, rx_last);
        let ps = port.stats();
        RxSummary {
            packets: stats.probes,
            bytes: stats.probe_bytes,
            pps: per(stats.probes, s),
            bps: per(stats.probe_bytes * 8, s),
            seconds: s,
            foreign: stats.frames - stats.probes,
            tunnelled: stats.tunnelled,
            lost: stats.lost(),
            reordered: stats.reordered,
            duplicates: stats.duplicates,
            flows: stats.flows_seen(),
            dropped_no_frame: ps.rx_no_frame,
            dropped_kernel: ps.rx_dropped,
            dropped_ring_full: ps.rx_ring_full,
            latency_ns: Latency::of(&stats),
        }
    });
    let summary = Summary {
        mode: args.mode.name(),
        iface: args.iface.clone(),
        queue: args.queue,
        xsk_mode: match port.mode() {
            XskMode::Copy => "copy",
            XskMode::ZeroCopy => "zerocopy",
        },
        xdp_mode: attachment.map(|a| attach_label(a.mode())),
        elapsed_s: secs(start, stop),
        tx,
        rx,
    };
    eprintln!("{}", final_line(&summary));
    Ok(summary)
}

fn final_line(s: &Summary) -> String {
    let mut line = format!("pktgen: done after {:.2}s", s.elapsed_s);
    if let Some(t) = &s.tx {
        line += &format!("; tx {} packets, {} {}", t.packets, report::rate(t.pps, "pps"), report::rate(t.bps, "bit/s"));
    }
    if let Some(r) = &s.rx {
        line += &format!(
            "; rx {} packets, {} {}, lost {}, reordered {}, duplicates {}, latency p50 {} p99 {} p99.9 {} max {}",
            r.packets,
            report::rate(r.pps, "pps"),
            report::rate(r.bps, "bit/s"),
            r.lost,
            r.reordered,
            r.duplicates,
            report::ns(r.latency_ns.p50),
            report::ns(r.latency_ns.p99),
            report::ns(r.latency_ns.p999),
            report::ns(r.latency_ns.max)
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: PktgenArgs,
    }

    fn parse(extra: &[&str]) -> Result<PktgenArgs, clap::Error> {
        let mut v = vec!["pktgen", "--iface", "veth0"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).map(|c| c.args)
    }

    fn info() -> IfaceInfo {
        IfaceInfo { mac: MacAddr([2, 0, 0, 0, 0, 9]), mtu: 1500, ipv4: Some(Ipv4Addr::new(192, 0, 2, 9)) }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("500000"), Ok(Rate::Pps(500_000)));
        assert_eq!(parse_rate("500k"), Ok(Rate::Pps(500_000)));
        assert_eq!(parse_rate("1.5M"), Ok(Rate::Pps(1_500_000)));
        for bad in ["", "fast", "0", "-5", "1.5X", "nan", "0.1"] {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains("give packets per second"), "{e}");
        }
        let e = parse(&["--rate", "lots"]).expect_err("bad rate");
        assert!(e.to_string().contains("bad rate `lots`"), "{e}");
    }

    #[test]
    fn defaults_bound_the_run() {
        let a = parse(&[]).expect("parses");
        let p = plan(&a, &info()).expect("plan");
        assert_eq!((p.duration_ns, p.count, p.rate, p.sizes.clone()), (Some(10_000_000_000), None, None, vec![60]));
        assert_eq!(p.base.src_mac, MacAddr([2, 0, 0, 0, 0, 9]));
        let p = plan(&parse(&["--count", "5"]).expect("parses"), &info()).expect("plan");
        assert_eq!((p.duration_ns, p.count), (None, Some(5)));
        let p = plan(&parse(&["--count", "5", "--duration", "2"]).expect("parses"), &info()).expect("plan");
        assert_eq!((p.duration_ns, p.count), (Some(2_000_000_000), Some(5)));
    }

    #[test]
    fn sizes_are_checked() {
        let e = plan(&parse(&["--size", "59"]).expect("parses"), &info()).err().expect("too small");
        assert!(e.to_string().contains("smallest is 60 bytes"), "{e}");
        let e = plan(&parse(&["--size", "1515"]).expect("parses"), &info()).err().expect("over MTU");
        assert!(e.to_string().contains("MTU 1500"), "{e}");
        plan(&parse(&["--size", "1514"]).expect("parses"), &info()).expect("MTU-sized frame");
        assert!(parse(&["--size", "100", "--imix"]).is_err(), "size and imix conflict");
        let p = plan(&parse(&["--imix"]).expect("parses"), &info()).expect("plan");
        assert_eq!(p.sizes, IMIX.to_vec());
    }

    #[test]
    fn encap_needs_an_outer_destination_and_raises_the_minimum() {
        assert!(parse(&["--encap", "vxlan"]).is_err(), "--outer-dst is required");
        let a = parse(&[
            "--encap",
            "vxlan",
            "--vni",
            "7",
            "--outer-src",
            "192.168.0.1",
            "--outer-dst",
            "192.168.0.2",
            "--imix",
        ])
        .expect("parses");
        let p = plan(&a, &info()).expect("plan");
        let t = p.tunnel.as_ref().expect("tunnel");
        assert_eq!((t.vni(), t.kind()), (7, TunnelKind::Vxlan));
        assert_eq!(p.sizes.iter().min(), Some(&110));
        let a = parse(&["--encap", "vxlan", "--vni", "16777216", "--outer-src", "1.1.1.1", "--outer-dst", "2.2.2.2"])
            .expect("parses");
        let e = plan(&a, &info()).err().expect("vni too wide");
        assert!(e.to_string().contains("24 bits"), "{e}");
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = iface_info("ferry-no-such0").err().expect("missing");
        assert!(e.to_string().contains("`ferry-no-such0` does not exist"), "{e}");
        assert!(iface_info("../etc").is_err());
    }

    #[test]
    fn bad_duration_and_count() {
        let e = plan(&parse(&["--duration", "0"]).expect("parses"), &info()).err().expect("zero");
        assert!(e.to_string().contains("--duration"), "{e}");
        let e = plan(&parse(&["--count", "0"]).expect("parses"), &info()).err().expect("zero");
        assert!(e.to_string().contains("--count 0"), "{e}");
        assert!(parse(&["--flows", "0"]).is_err());
        assert!(parse(&["--flows", "65537"]).is_err());
        assert!(parse(&["--batch", "300"]).is_err());
    }
}

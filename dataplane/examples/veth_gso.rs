//! Do GSO super-packets survive a veth into an AF_XDP socket? A measurement for
//! `docs/throughput.md` (needs root).
//!
//! Two namespaces this program creates (and removes), joined by one veth pair `a` <-> `b`. On `b`,
//! ferry's catch-all XDP program hands every frame to one AF_XDP socket in copy mode, with
//! 4096-byte UMEM frames. In A, a UDP socket with `UDP_SEGMENT` (1,400-byte segments) sends
//! 56,000-byte datagrams to B. Each one leaves A as a single GSO packet, the same kind of
//! super-packet a TCP sender's TSO makes. The program reports what the socket receives: packets (a
//! chain of descriptors when multi-buffer is on), their sizes, and the kernel's drop counters. Four
//! cases:
//!
//! - generic (skb) or native (driver) XDP;
//! - single-buffer (plain program and socket), or multi-buffer: the program loaded with
//!   `BPF_F_XDP_HAS_FRAGS` (`xdp.frags`) and the socket bound with `XDP_USE_SG`.
//!
//! Native cases run twice, with `b`'s GRO off (the default) and on, because veth keeps the peer's
//! segmentation offloads with native XDP only when GRO is on. The peer's offloads (`ethtool -k a`)
//! are printed after the program is attached.
//!
//! Run: `sudo cargo run --release -p ferry-dataplane --example veth_gso`.

#[path = "../tests/xsk_util/mod.rs"]
mod xsk_util;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ferry_dataplane::xdp::{XdpMode, XdpProgram};
use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{FrameDesc, Umem};
use xsk_util::{B4, InNetns, pair, privileged, run, run_in};

/// `UDP_SEGMENT` from `<linux/udp.h>`.
const UDP_SEGMENT: libc::c_int = 103;
const SEGMENT: usize = 1400;
const SEGMENTS: usize = 40;
const DATAGRAMS: usize = 20;
const FRAMES: u32 = 2048;
const FRAME_SIZE: u32 = 4096;

#[derive(Debug, Clone, Copy)]
struct Case {
    mode: XdpMode,
    multi_buffer: bool,
    gro: bool,
}

#[derive(Debug, Default)]
struct Seen {
    packets: u64,
    bytes: u64,
    descriptors: u64,
    /// Packet size -> count.
    sizes: BTreeMap<usize, u64>,
    /// Descriptors per packet -> count.
    chains: BTreeMap<usize, u64>,
    rx_dropped: u64,
    rx_invalid: u64,
    rx_ring_full: u64,
    fill_empty: u64,
    peer_offloads: String,
    /// After asking for TSO on the peer again (`ethtool -K a tso on`): its TSO line.
    tso_again: String,
    b_rx_dropped: String,
    /// The largest packet's IPv4 total length and UDP length fields.
    largest_headers: Option<(u16, u16)>,
}

fn measure(case: Case) -> Result<Seen, String> {
    let t = pair(1);
    let prog = if case.multi_buffer { XdpProgram::sink_multi_buffer(1) } else { XdpProgram::sink(1) }
        .map_err(|e| format!("loading the sink program: {e}"))?;
    let umem_cfg = UmemConfig::builder()
        .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| e.to_string())?)
        .fill_queue_size(QueueSize::new(FRAMES).map_err(|e| e.to_string())?)
        .comp_queue_size(QueueSize::new(64).map_err(|e| e.to_string())?)
        .build()
        .map_err(|e| e.to_string())?;
    let count = NonZeroU32::new(FRAMES).ok_or("no frames")?;
    // The UMEM's socket becomes the first AF_XDP socket, and a socket binds to an interface of the
    // namespace it was created in: create it in B.
    let (umem, descs) = {
        let _in_b = InNetns::enter(&t.b.ns);
        Umem::new(umem_cfg, count, false).map_err(|e| format!("UMEM: {e}"))?
    };
    let mut bind = BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP;
    if case.multi_buffer {
        bind |= BindFlags::XDP_USE_SG;
    }
    let sock_cfg = SocketConfig::builder()
        .rx_queue_size(QueueSize::new(FRAMES).map_err(|e| e.to_string())?)
        .tx_queue_size(QueueSize::new(64).map_err(|e| e.to_string())?)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(bind)
        .build();
    let ifname: Interface = t.b.name.parse().map_err(|_| "interface name")?;
    let (_tx, mut rx, rings, attachment) = {
        let _in_b = InNetns::enter(&t.b.ns);
        // SAFETY: libxdp's program loading is inhibited; ferry's sink program is attached below.
        let (tx, rx, rings) =
            unsafe { xsk_rs::Socket::new(sock_cfg, &umem, &ifname, 0) }.map_err(|e| format!("socket: {e}"))?;
        prog.set_socket(0, rx.fd().as_raw_fd()).map_err(|e| format!("socket map: {e}"))?;
        let att = prog.attach(&t.b.name, case.mode).map_err(|e| format!("attach: {e}"))?;
        (tx, rx, rings, att)
    };
    let (mut fill, _comp) = rings.ok_or("the socket came without fill and completion rings")?;
    if case.gro {
        run_in(&t.b.ns, &["ethtool", "-K", &t.b.name, "gro", "on"]);
    }
    let offloads = |keys: &[&str]| {
        run_in(&t.a.ns, &["ethtool", "-k", &t.a.name])
            .lines()
            .filter(|l| keys.iter().any(|k| l.trim_start().starts_with(k)))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let peer_offloads =
        offloads(&["tcp-segmentation-offload:", "tx-udp-segmentation:", "generic-segmentation-offload:"]);
    // Whether the peer's TSO can be turned back on while the program is attached (ethtool fails, or
    // leaves it off, when the kernel does not allow it).
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", &t.a.ns, "ethtool", "-K", &t.a.name, "tso", "on"])
        .output();
    let tso_again = offloads(&["tcp-segmentation-offload:"]);
    // XDP takes ARP too: A learns B's MAC from a permanent entry.
    let mac = xsk_util::mac_str(t.b.mac);
    run(&[
        "ip",
        "-n",
        &t.a.ns,
        "neigh",
        "replace",
        &B4.to_string(),
        "lladdr",
        &mac,
        "dev",
        &t.a.name,
        "nud",
        "permanent",
    ]);

    // SAFETY: the frames are fresh from `Umem::new`; the kernel owns them until they come back
    // through the receive ring.
    let given = unsafe { fill.produce(&descs) };
    if given != descs.len() {
        return Err(format!("the fill ring took {given} of {} frames", descs.len()));
    }

    {
        let _in_a = InNetns::enter(&t.a.ns);
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("UDP socket: {e}"))?;
        let seg = SEGMENT as libc::c_int;
        // SAFETY: a valid socket and a live c_int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&raw const seg).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(format!("UDP_SEGMENT: {}", std::io::Error::last_os_error()));
        }
        let payload = vec![0x5a; SEGMENT * SEGMENTS];
        let to = SocketAddr::from((B4, 9000));
        for _ in 0..DATAGRAMS {
            sock.send_to(&payload, to).map_err(|e| format!("send: {e}"))?;
        }
    }

    let mut seen = Seen { peer_offloads, tso_again, ..Seen::default() };
    let mut first: Option<(u16, u16)> = None;
    let expected = (DATAGRAMS * SEGMENTS * (SEGMENT + 42)) as u64;
    let mut batch = vec![FrameDesc::default(); 256];
    let mut chain = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut quiet_since = Instant::now();
    // Until every byte is seen, or nothing came for half a second (the rest was dropped), or 3 s.
    while seen.bytes < expected && Instant::now() < deadline && quiet_since.elapsed() < Duration::from_millis(500) {
        // SAFETY: received descriptors name frames of `umem`; only their lengths are read.
        let n = unsafe { rx.poll_and_consume(&mut batch, 10) }.map_err(|e| format!("poll: {e}"))?;
        if n > 0 {
            quiet_since = Instant::now();
        }
        for d in &batch[..n] {
            if chain.0 == 0 {
                // SAFETY: `d` names a frame of `umem` that the kernel handed over; only read.
                let bytes = unsafe { umem.data(d) }.contents().to_vec();
                let field = |o: usize| bytes.get(o..o + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                first = Some((field(16), field(38)));
            }
            seen.descriptors += 1;
            chain = (chain.0 + 1, chain.1 + d.lengths().data());
            if !d.has_more_frames() {
                seen.packets += 1;
                seen.bytes += chain.1 as u64;
                if seen.sizes.keys().next_back().is_none_or(|&max| chain.1 >= max) {
                    seen.largest_headers = first;
                }
                *seen.sizes.entry(chain.1).or_default() += 1;
                *seen.chains.entry(chain.0).or_default() += 1;
                chain = (0, 0);
            }
        }
        // SAFETY: the frames just received are done with (only lengths were read): back to the
        // kernel for more.
        unsafe { fill.produce(&batch[..n]) };
    }
    let stats = rx.fd().xdp_statistics().map_err(|e| format!("statistics: {e}"))?;
    seen.rx_dropped = stats.rx_dropped();
    seen.rx_invalid = stats.rx_invalid_descs();
    seen.rx_ring_full = stats.rx_ring_full();
    seen.fill_empty = stats.rx_fill_ring_empty_descs();
    let link = run(&["ip", "-n", &t.b.ns, "-s", "link", "show", "dev", &t.b.name]);
    seen.b_rx_dropped =
        link.lines().skip_while(|l| !l.trim_start().starts_with("RX:")).nth(1).unwrap_or("").trim().to_owned();
    drop(attachment);
    Ok(seen)
}

fn main() {
    if !privileged("veth_gso") {
        std::process::exit(1);
    }
    println!(
        "sent: {DATAGRAMS} UDP datagrams of {} bytes with UDP_SEGMENT {SEGMENT} (GSO packets of {} bytes on the wire, \
         {SEGMENTS} segments of {} bytes each); AF_XDP copy mode, {FRAME_SIZE}-byte frames",
        SEGMENT * SEGMENTS,
        SEGMENT * SEGMENTS + 42,
        SEGMENT + 42
    );
    let mut failed = false;
    for (mode, gros) in [(XdpMode::Generic, &[false][..]), (XdpMode::Native, &[false, true][..])] {
        for multi_buffer in [false, true] {
            for &gro in gros {
                let case = Case { mode, multi_buffer, gro };
                match measure(case) {
                    Ok(s) => {
                        let sizes: Vec<String> = s.sizes.iter().map(|(k, v)| format!("{k} B x{v}")).collect();
                        let chains: Vec<String> = s.chains.iter().map(|(k, v)| format!("{k} x{v}")).collect();
                        println!(
                            "\n{mode:?} XDP, {}, b GRO {}:\n  peer a: {}\n  packets {} ({} bytes, {} descriptors)\n  \
                             packet sizes: {}\n  descriptors per packet: {}\n  largest packet's IPv4 total length, UDP \
                             length: {:?}\n  socket: rx_dropped {} rx_invalid {} rx_ring_full {} fill_empty {}\n  b rx \
                             (bytes packets errors dropped ...): {}\n  peer a after `ethtool -K tso on`: {}",
                            if multi_buffer { "multi-buffer (xdp.frags + XDP_USE_SG)" } else { "single buffer" },
                            if gro { "on" } else { "off" },
                            s.peer_offloads,
                            s.packets,
                            s.bytes,
                            s.descriptors,
                            sizes.join(", "),
                            chains.join(", "),
                            s.largest_headers,
                            s.rx_dropped,
                            s.rx_invalid,
                            s.rx_ring_full,
                            s.fill_empty,
                            s.b_rx_dropped,
                            s.tso_again,
                        );
                    }
                    Err(e) => {
                        failed = true;
                        println!("\n{case:?}: failed: {e}");
                    }
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

//! What the UDP uplink's synthesized outer header costs on receive, for callgrind (no I/O).
//!
//! `udp_rx_rounds OP ROUNDS [SIZE]` runs ROUNDS rounds of 64 VXLAN datagrams (inner frames of SIZE
//! bytes, default 64) into frames at the receive headroom, each then decapsulated by the
//! pipeline's `decap`:
//! - `synth`: as the UDP port does it: the tunnel payload behind a synthesized Ethernet/IPv4/UDP
//!   header (`port::udp::write_received`);
//! - `copy`: as AF_XDP delivers it: the whole outer frame copied in (what the kernel's copy into
//!   the UMEM does), no header written.
//!
//! The difference per datagram between the two is the synthesized header's cost. Run each at two
//! round counts and divide the difference in instructions by the difference in datagrams:
//!
//! ```text
//! cargo build --profile bench -p ferry-dataplane --example udp_rx_rounds
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/udp_rx_rounds synth 100
//! ```

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use ferry_dataplane::port::udp::{parse_outer, write_received};
use ferry_encap::{DecapConfig, FrameBuf, MacAddr, TemplateParams, TunnelKind, TunnelTemplate, decap, encap_with};

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const HEADROOM: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(op), Some(rounds)) = (args.get(1), args.get(2).and_then(|r| r.parse::<u32>().ok())) else {
        eprintln!("usage: udp_rx_rounds synth|copy ROUNDS [SIZE]");
        std::process::exit(2);
    };
    let size = args.get(3).and_then(|s| s.parse::<usize>().ok()).unwrap_or(64).clamp(60, 1464);
    // One outer frame as a peer sends it: an inner UDP/IPv4 frame of `size` bytes in VXLAN.
    let tpl = TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        42,
        MacAddr([2, 0, 0, 0, 0, 2]),
        MAC,
        IpAddr::V4(PEER),
        IpAddr::V4(LOCAL),
    ))
    .expect("template");
    let mut inner = vec![0u8; size];
    inner[..6].copy_from_slice(&[2, 0, 0, 0, 9, 2]);
    inner[6..12].copy_from_slice(&[2, 0, 0, 0, 9, 1]);
    inner[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = ferry_encap::wire::ipv4::Ipv4Repr {
        src: Ipv4Addr::new(10, 244, 1, 5),
        dst: Ipv4Addr::new(10, 244, 0, 7),
        protocol: 17,
        tos: 0,
        ttl: 63,
        dont_frag: true,
        payload_len: (size - 34) as u16,
    };
    ip.emit(&mut inner[14..]);
    let mut outer_buf = vec![0u8; 2048];
    outer_buf[HEADROOM..HEADROOM + size].copy_from_slice(&inner);
    let mut fb = FrameBuf::new(&mut outer_buf, HEADROOM, size).expect("frame");
    encap_with(&tpl, &mut fb, 0, 7).expect("encap");
    let outer = fb.data().to_vec();
    let o = parse_outer(&outer).expect("outer");
    let payload = &outer[o.start..o.start + o.len];

    let mut cfg = DecapConfig::new(TunnelKind::Vxlan, 42, IpAddr::V4(LOCAL));
    cfg.local_mac = Some(MAC);
    let local = SocketAddrV4::new(LOCAL, 4789);
    let src = SocketAddrV4::new(PEER, 4789);
    let mut frames = vec![vec![0u8; 2048]; 64];
    let mut ok = 0u64;
    for _ in 0..rounds {
        for f in &mut frames {
            let len = if op == "synth" {
                write_received(f, HEADROOM, local, MAC, src, 0, black_box(payload)).expect("fits")
            } else {
                f[HEADROOM..HEADROOM + outer.len()].copy_from_slice(black_box(&outer));
                outer.len()
            };
            let mut fb = FrameBuf::new(f, HEADROOM, len).expect("frame");
            ok += u64::from(decap(&cfg, &mut fb).is_ok());
        }
    }
    println!("{op}: {ok} datagrams decapsulated");
}

//! The super-packet the `gso` bench and the `gso_rounds` example share (test side).

use ferry_encap::checksum;
use ferry_encap::wire::virtio_net::{Gso, VirtioNetHdr};
use ferry_encap::{MacAddr, TemplateParams, TunnelKind, TunnelTemplate};

pub(crate) const MSS: usize = 1398;
/// 46 full segments and one of 1,100 bytes: 65,408 payload bytes, an IP packet of 65,460.
pub(crate) const PAYLOAD: usize = 46 * MSS + 1100;

/// Ethernet + IPv4 + TCP with timestamps (66 bytes of headers), the TCP checksum partial.
pub(crate) fn super_packet() -> (Vec<u8>, VirtioNetHdr) {
    let l4_len = 32 + PAYLOAD;
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00, 0x45, 0];
    f.extend(((20 + l4_len) as u16).to_be_bytes());
    f.extend([0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3]);
    let c = checksum::of(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend([0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x80, 0x18, 0x01, 0xf5, 0, 0, 0, 0]);
    f.extend([1, 1, 8, 10, 0, 1, 0, 0, 0, 2, 0, 0]);
    f.extend((0..PAYLOAD).map(|i| (i * 31) as u8));
    let pseudo = checksum::pseudo_v4([10, 244, 1, 2].into(), [10, 244, 2, 3].into(), 6, l4_len as u16);
    f[50..52].copy_from_slice(&(!checksum::finish_sum(pseudo)).to_be_bytes());
    let vnet = VirtioNetHdr {
        needs_csum: true,
        gso: Gso::TcpV4,
        gso_size: MSS as u16,
        hdr_len: 66,
        csum_start: 34,
        csum_offset: 16,
        ..VirtioNetHdr::NONE
    };
    (f, vnet)
}

/// A VXLAN template over an IPv4 underlay.
pub(crate) fn template() -> TunnelTemplate {
    TunnelTemplate::new(&TemplateParams::new(
        TunnelKind::Vxlan,
        42,
        MacAddr([2, 0, 0, 0, 0, 1]),
        MacAddr([2, 0, 0, 0, 0, 2]),
        "192.0.2.1".parse().expect("ip"),
        "192.0.2.2".parse().expect("ip"),
    ))
    .expect("template")
}

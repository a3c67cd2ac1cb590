//! Fuzz target: `encap` of an inner frame from a pod, then `decap` of the result.
//!
//! Input: two header bytes, then the inner frame. Byte 0 builds the template: bit 0 Geneve (else
//! VXLAN), bit 1 IPv6 underlay, bit 2 an underlay VLAN tag, bit 3 two Geneve options, bit 4 one of
//! them critical, bit 5 ECN compatibility mode, bit 6 zero UDP checksum over IPv6, bit 7 a fixed
//! DSCP. Byte 1 is the headroom in front of the inner frame. The checks are
//! [`ferry_encap_fuzz::check_encap`] (which decapsulates again), shared with
//! `encap/tests/never_panic.rs`.
#![no_main]

use std::net::IpAddr;

use ferry_encap::ecn::EcnMode;
use ferry_encap::wire::geneve::GeneveOption;
use ferry_encap::{Dscp, MacAddr, TemplateParams, TunnelKind, TunnelTemplate};
use ferry_encap_fuzz::{LOCAL_V4, LOCAL_V6, REMOTE_V4, REMOTE_V6, VNI, check_encap};

/// The template byte 0 describes, and whether it carries a critical Geneve option.
fn template(sel: u8) -> (TunnelTemplate, bool) {
    let bit = |n: u8| sel & (1 << n) != 0;
    let kind = if bit(0) { TunnelKind::Geneve } else { TunnelKind::Vxlan };
    let (src, dst) = if bit(1) {
        (IpAddr::V6(REMOTE_V6), IpAddr::V6(LOCAL_V6))
    } else {
        (IpAddr::V4(REMOTE_V4), IpAddr::V4(LOCAL_V4))
    };
    let options = [
        GeneveOption { class: 0x0102, kind: if bit(4) { 0x85 } else { 0x05 }, data: &[1, 2, 3, 4] },
        GeneveOption { class: 0xffff, kind: 0x01, data: &[] },
    ];
    let mut p = TemplateParams::new(kind, VNI, MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), src, dst);
    p.vlan = bit(2).then_some(100);
    p.geneve_options = if bit(3) { &options } else { &[] };
    p.ecn = if bit(5) { EcnMode::Compatibility } else { EcnMode::Normal };
    p.ipv6_zero_udp_checksum = bit(6);
    p.dscp = if bit(7) { Dscp::Fixed(46) } else { Dscp::Inherit };
    let tpl = TunnelTemplate::new(&p).expect("every selector describes valid parameters");
    (tpl, kind == TunnelKind::Geneve && bit(3) && bit(4))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&[sel, headroom], inner)) = data.split_first_chunk::<2>() else { return };
    let (tpl, critical) = template(sel);
    check_encap(&tpl, critical, inner, usize::from(headroom));
});

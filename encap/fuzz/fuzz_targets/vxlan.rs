//! Fuzz target: `VxlanPacket::new_checked` and `VxlanRepr::parse` on wire bytes, then every
//! accessor and `set_vni`.
//!
//! The checks are [`ferry_encap_fuzz::check_vxlan`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_vxlan(data));

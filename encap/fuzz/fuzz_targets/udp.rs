//! Fuzz target: `UdpPacket::new_checked` on wire bytes, then every accessor and the `UdpRepr`
//! round trip.
//!
//! The checks are [`ferry_encap_fuzz::check_udp`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_udp(data));

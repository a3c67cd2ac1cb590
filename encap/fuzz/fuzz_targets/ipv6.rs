//! Fuzz target: `Ipv6Packet::new_checked` on wire bytes, then every accessor, the extension-header
//! walk of `upper_layer` and the `Ipv6Repr` round trip.
//!
//! The checks are [`ferry_encap_fuzz::check_ipv6`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_ipv6(data));

//! Fuzz target: `Ipv4Packet::new_checked` on wire bytes, then every accessor, `verify_checksum`,
//! the incremental checksum updates and the `Ipv4Repr` round trip.
//!
//! The checks are [`ferry_encap_fuzz::check_ipv4`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_ipv4(data));

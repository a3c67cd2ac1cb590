//! Fuzz target: `TcpPorts::new_checked` on wire bytes, then its accessors.
//!
//! The checks are [`ferry_encap_fuzz::check_tcp`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_tcp(data));

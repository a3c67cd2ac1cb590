//! Fuzz target: `gro::Coalescer` on a stream of received frames.
//!
//! Input: frames packed as a 2-byte big-endian length, then that many bytes, repeated. The checks
//! are [`ferry_encap_fuzz::check_coalesce`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_coalesce(data));

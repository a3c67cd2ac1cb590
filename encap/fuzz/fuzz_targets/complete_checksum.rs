//! Fuzz target: `offload::complete_checksum` on a frame, in place.
//!
//! The checks are [`ferry_encap_fuzz::check_complete_checksum`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_complete_checksum(data));

//! Fuzz target: `flow::classify` on an inner frame.
//!
//! The checks are [`ferry_encap_fuzz::check_classify`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_classify(data));

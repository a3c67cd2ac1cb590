//! Fuzz target: `EthernetFrame::new_checked` on wire bytes, then every accessor, setter and the
//! `EthernetRepr` round trip.
//!
//! The checks are [`ferry_encap_fuzz::check_ethernet`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_ethernet(data));

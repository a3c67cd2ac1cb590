//! Fuzz target: `GenevePacket::new_checked` and `GeneveRepr::parse` on wire bytes, then every
//! accessor and the walk over the option TLVs.
//!
//! The checks are [`ferry_encap_fuzz::check_geneve`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_geneve(data));

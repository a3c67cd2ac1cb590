//! Fuzz target: `gso::Segmenter` on a tap's virtio-net header and super-packet, then coalescing
//! the segments back.
//!
//! Input: the 12-byte virtio-net header, then the frame. The checks are
//! [`ferry_encap_fuzz::check_segment`], shared with `encap/tests/never_panic.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_encap_fuzz::check_segment(data));

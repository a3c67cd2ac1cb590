//! Fuzz target: `decap` on a frame from the wire.
//!
//! Input: one selector byte, then the frame. The selector picks one of the twelve configurations of
//! [`ferry_encap_fuzz::decap_configs`] (`selector % 12`: VXLAN or Geneve, a local IPv4, IPv6 or both,
//! UDP checksum verification off or on) and the frame's headroom (`selector / 12 % 8` bytes). The
//! checks are [`ferry_encap_fuzz::check_decap`], shared with `encap/tests/never_panic.rs`.
#![no_main]

use ferry_encap_fuzz::{check_decap, decap_configs};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&selector, frame)) = data.split_first() else { return };
    let configs = decap_configs();
    let cfg = &configs[usize::from(selector) % configs.len()];
    let headroom = usize::from(selector) / configs.len() % 8;
    let _ = check_decap(cfg, frame, headroom, 3);
});

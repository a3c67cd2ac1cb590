//! Fuzz target: `icmp::build_error` about an offending frame from a pod.
//!
//! Input: five header bytes, then the offending frame. Byte 0: bit 0 picks "time exceeded" over
//! "too big", bits 1 and 2 give the gateway an IPv4 and an IPv6 address. Bytes 1-2 (big-endian):
//! the output buffer's length, modulo `MAX_ERROR_FRAME_LEN + 64`. Bytes 3-4: the MTU for "too big".
//! The checks are [`ferry_encap_fuzz::check_build_error`], shared with `encap/tests/never_panic.rs`.
#![no_main]

use ferry_encap::icmp::{IcmpError, MAX_ERROR_FRAME_LEN};
use ferry_encap_fuzz::{check_build_error, error_source};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&[flags, l0, l1, m0, m1], offending)) = data.split_first_chunk::<5>() else { return };
    let error =
        if flags & 1 != 0 { IcmpError::TimeExceeded } else { IcmpError::TooBig { mtu: u16::from_be_bytes([m0, m1]) } };
    let from = error_source(flags & 2 != 0, flags & 4 != 0);
    let out_len = usize::from(u16::from_be_bytes([l0, l1])) % (MAX_ERROR_FRAME_LEN + 64);
    check_build_error(offending, error, &from, out_len);
});

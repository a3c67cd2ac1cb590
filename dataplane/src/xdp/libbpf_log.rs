//! libbpf's messages as `tracing` events (setup side).
//!
//! libbpf prints to stderr unless given a print callback. This one formats each message with
//! `vsnprintf` and logs it under the `libbpf` target (warnings as `warn`, the rest as `debug`), so
//! a verifier rejection or a netlink error message ends up in ferry's log next to the error that
//! it explains.
//!
//! The callback takes a C `va_list`, whose Rust spelling is target-specific; it is wired up on
//! x86_64 and aarch64 Linux, where a `va_list` parameter is passed as a pointer. Elsewhere libbpf
//! keeps printing to stderr.

/// Log one libbpf message; `level` is libbpf's (0 warn, 1 info, 2 debug).
#[cfg_attr(
    not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))),
    expect(dead_code, reason = "no print callback on this target")
)]
fn log(level: i32, msg: &str) {
    let msg = msg.trim_end();
    if level == 0 {
        tracing::warn!(target: "libbpf", "{msg}");
    } else {
        tracing::debug!(target: "libbpf", "{msg}");
    }
}

/// Route libbpf's messages to `tracing` (idempotent).
pub(crate) fn install() {
    imp::install();
}

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod imp {
    use std::ffi::{c_char, c_int, c_void};
    use std::sync::Once;

    /// A C `va_list` as a function parameter: a pointer on these targets.
    type VaList = *mut c_void;
    type PrintFn = unsafe extern "C" fn(c_int, *const c_char, VaList) -> c_int;

    unsafe extern "C" {
        fn libbpf_set_print(f: Option<PrintFn>) -> Option<PrintFn>;
        fn vsnprintf(buf: *mut c_char, n: usize, fmt: *const c_char, ap: VaList) -> c_int;
    }

    unsafe extern "C" fn print(level: c_int, fmt: *const c_char, ap: VaList) -> c_int {
        // Verifier logs arrive as one message; 8 KiB keeps their start, which names the problem.
        let mut buf = [0u8; 8192];
        // SAFETY: libbpf passes a valid format string and the matching argument list; vsnprintf
        // writes at most `buf.len()` bytes, NUL included.
        let n = unsafe { vsnprintf(buf.as_mut_ptr().cast(), buf.len(), fmt, ap) };
        if n < 0 {
            return n;
        }
        let len = (n as usize).min(buf.len() - 1);
        super::log(level, &String::from_utf8_lossy(&buf[..len]));
        n
    }

    pub(super) fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: `print` has the signature libbpf's `libbpf_print_fn_t` has on this target and
            // never unwinds (logging does not panic; a panic would abort at the FFI boundary).
            unsafe {
                libbpf_set_print(Some(print));
            }
        });
    }
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
mod imp {
    pub(super) fn install() {}
}

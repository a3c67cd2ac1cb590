//! Helpers shared by the root package's privileged integration tests (test side): the root check
//! and running a setup command. Each test binary includes this module with `mod support;`.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a different part of this module")]

use std::process::{Command, Stdio};

/// Root: true. Otherwise fail when `CI` is set (privileged tests must run there), or print SKIP
/// and return false. `needs` says what root is for, e.g. "namespaces, AF_XDP".
pub fn privileged(test: &str, needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "FAIL: {test} needs root ({needs}) and CI is set: run as root");
    eprintln!("SKIP: {test} needs root ({needs}); run as root to include it");
    false
}

/// Runs a setup command; any failure is a broken environment or test, so panic naming the command.
/// Its standard output.
pub fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", cmd.join(" ")));
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}",
        cmd.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! Helpers shared by ferry's tests and benches (test side only; no crate depends on this one but
//! as a dev-dependency).
//!
//! - [`privileged`]: the one check a test that needs root or outside tools makes before it runs.
//!   Under CI (`CI` set) a missing prerequisite fails the test, because CI must run everything;
//!   elsewhere the test is skipped ([`skip`]): it prints `SKIP: ...` and appends its name to the
//!   file named by `FERRY_SKIP_LOG`, so that `scripts/test.sh` can say which tests did not run
//!   (the test harness hides what a passing test prints).
//! - [`run`]: a setup command whose failure is a broken environment.
//! - [`node`] (feature `node`): a simulated node, a worker over in-memory ports with real tables.
//! - [`cputime`] (feature `bench`): a criterion measurement of the thread's CPU time, for benches
//!   on a loaded machine.

#[cfg(feature = "node")]
pub mod node;

#[cfg(feature = "bench")]
pub mod cputime;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The environment variable naming the file skipped tests are appended to, one name a line.
pub const SKIP_LOG: &str = "FERRY_SKIP_LOG";

/// Whether test `test` can run: root (for `needs`, e.g. "network namespaces, AF_XDP") and every
/// one of `tools` (a program on `PATH`, or an absolute path). If anything is missing, [`skip`]s
/// naming all of it and returns false (or fails, under CI).
pub fn privileged(test: &str, needs: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(format!("root ({needs})"));
    }
    missing.extend(tools.iter().filter(|t| !have_tool(t)).map(|t| format!("`{t}`")));
    if missing.is_empty() {
        return true;
    }
    skip(test, &format!("needs {}", missing.join(", ")));
    false
}

/// Whether `tool` is there: an absolute path that is a file, or a program on `PATH`.
pub fn have_tool(tool: &str) -> bool {
    let path = Path::new(tool);
    if path.is_absolute() {
        return path.is_file();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Test `test` cannot run because `why` (say what to install or how to run it).
///
/// # Panics
/// When `CI` is set: privileged tests must run there, so a missing prerequisite is a failure.
pub fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "FAIL: {test} {why}, and CI is set: CI must run every test");
    eprintln!("SKIP: {test} {why}");
    if let Some(log) = std::env::var_os(SKIP_LOG) {
        // One short append per skip: lines from tests running in parallel do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{test}\n").as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot record the skip in {}: {e}", Path::new(&log).display());
        }
    }
}

/// Runs a setup command; any failure is a broken environment or test, so panic naming the command.
/// Its standard output.
///
/// # Panics
/// The command cannot be started or fails.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_found_on_path_or_by_absolute_path() {
        assert!(have_tool("sh"), "sh is on PATH");
        assert!(have_tool("/bin/sh"));
        assert!(!have_tool("ferry-no-such-tool"));
        assert!(!have_tool("/nonexistent/ferry"));
    }
}

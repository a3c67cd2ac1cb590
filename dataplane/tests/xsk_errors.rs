//! Privileged tests of the setup errors a user meets, produced by the real kernel (test side):
//! without root (a helper process run as `nobody`), AF_XDP and the XDP programs are refused with a
//! message naming the capabilities and "run as root"; without CAP_IPC_LOCK (a root helper with the
//! capability dropped) a UMEM over the 8 MiB locked-memory limit is refused with a message naming
//! RLIMIT_MEMLOCK and the fixes, while a small one works; on an interface whose driver has no
//! native XDP (a bridge), forcing native mode fails clearly and automatic mode falls back to
//! generic.
//!
//! Needs root (and `setpriv`, from util-linux); without root the tests fail when `CI` is set and
//! print SKIP otherwise. The helpers are this test binary run again with an environment variable
//! naming what to try; they print one line per outcome and exit.

mod xsk_util;

use std::process::{Command, Stdio};

use ferry_dataplane::port::xsk::{XskMem, XskMemConfig};
use ferry_dataplane::xdp::{AttachMode, UplinkConfig, XdpError, XdpMode, XdpProgram};
use xsk_util::*;

const CHILD_ENV: &str = "FERRY_XSK_ERRORS_CHILD";

fn uplink() -> Result<XdpProgram, XdpError> {
    XdpProgram::uplink(&UplinkConfig { tunnel_port: 4789, local_v4: Some(A4), local_v6: None }, 1)
}

fn outcome<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    }
}

/// In a helper process: try what `what` names and print `RESULT <label>: <outcome>` lines.
fn helper(what: &str) {
    match what {
        "unprivileged" => {
            println!("\nRESULT umem: {}", outcome(XskMem::new(XskMemConfig::default())));
            println!("RESULT xdp: {}", outcome(uplink()));
        }
        "no-ipc-lock" => {
            let big = XskMemConfig { frame_count: 8192, ..Default::default() };
            println!("\nRESULT umem16: {}", outcome(XskMem::new(big)));
            let small = XskMemConfig { frame_count: 512, ..Default::default() };
            println!("RESULT umem1: {}", outcome(XskMem::new(small)));
        }
        other => panic!("unknown helper {other}"),
    }
}

/// Run this test again as a helper, behind the command `wrapper` (which runs what follows it), and
/// return the helper's `RESULT` lines.
fn run_helper(test: &str, what: &str, wrapper: &[&str]) -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, what)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (util-linux): {e}", wrapper[0]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helper {what} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter_map(|l| l.strip_prefix("RESULT ")).map(str::to_owned).collect()
}

fn result<'a>(lines: &'a [String], label: &str) -> &'a str {
    let prefix = format!("{label}: ");
    lines.iter().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("no {label} in {lines:?}"))
}

#[test]
fn unprivileged_user_is_told_to_run_as_root() {
    if let Ok(what) = std::env::var(CHILD_ENV) {
        return helper(&what);
    }
    if !privileged("unprivileged_user_is_told_to_run_as_root") {
        return;
    }
    let lines = run_helper(
        "unprivileged_user_is_told_to_run_as_root",
        "unprivileged",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ],
    );
    let umem = result(&lines, "umem");
    assert!(umem.contains("CAP_NET_RAW") && umem.contains("run ferry as root"), "{umem}");
    let xdp = result(&lines, "xdp");
    assert!(xdp.contains("CAP_BPF") && xdp.contains("CAP_NET_ADMIN") && xdp.contains("run it as root"), "{xdp}");
}

#[test]
fn umem_over_the_memlock_limit_names_the_fixes() {
    if let Ok(what) = std::env::var(CHILD_ENV) {
        return helper(&what);
    }
    if !privileged("umem_over_the_memlock_limit_names_the_fixes") {
        return;
    }
    // Root without CAP_IPC_LOCK: the UMEM counts against RLIMIT_MEMLOCK, set to 8 MiB for the helper.
    let lines = run_helper(
        "umem_over_the_memlock_limit_names_the_fixes",
        "no-ipc-lock",
        &["prlimit", "--memlock=8388608", "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"],
    );
    let big = result(&lines, "umem16");
    assert!(big.contains("16 MiB UMEM was refused") && big.contains("RLIMIT_MEMLOCK"), "{big}");
    assert!(big.contains("CAP_IPC_LOCK") && big.contains("as root") && big.contains("smaller UMEM"), "{big}");
    assert_eq!(result(&lines, "umem1"), "ok", "a UMEM under the limit works without CAP_IPC_LOCK");
}

#[test]
fn native_only_fails_clearly_and_auto_falls_back_to_generic() {
    if !privileged("native_only_fails_clearly_and_auto_falls_back_to_generic") {
        return;
    }
    let tg = tag();
    let mut ns = Netns::default();
    let n = ns.add(&format!("{tg}-br"));
    let dev = End { ns: n.clone(), name: format!("fxbr{tg}"), mac: [0; 6] };
    run(&["ip", "-n", &n, "link", "add", &dev.name, "type", "bridge"]);
    run(&["ip", "-n", &n, "link", "set", &dev.name, "up"]);
    let _in = InNetns::enter(&n);

    let err = uplink().expect("load").attach(&dev.name, XdpMode::Native).expect_err("a bridge has no native XDP");
    assert!(matches!(err, XdpError::Attach { mode: "native", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("`{}` in native mode", dev.name)) && msg.contains("auto or generic"), "{msg}");
    assert!(!has_xdp(&dev), "a failed attach leaves nothing");

    let att = uplink().expect("load").attach(&dev.name, XdpMode::Auto).expect("generic fallback");
    assert_eq!(att.mode(), AttachMode::Generic);
    assert!(run(&["ip", "-n", &n, "link", "show", "dev", &dev.name]).contains("xdpgeneric"));
    drop(att);
    assert!(!has_xdp(&dev));
}

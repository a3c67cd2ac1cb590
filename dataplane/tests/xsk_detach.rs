//! Privileged tests of how ferry's XDP programs leave an interface (test side): detaching, and
//! dropping the guard, leave no program (`ip link show` has no `xdp`); a process killed with
//! SIGKILL leaves none either (the kernel releases the BPF link); a stale ferry program attached
//! the old way (netlink, as by `ip link set ... xdp obj`) is replaced; a program held by a live
//! ferry is not.
//!
//! Needs root; without it the tests fail when `CI` is set and print SKIP otherwise. Everything
//! runs in namespaces the tests create; a guard deletes them even when a test panics. Every wait
//! is bounded; the helper process is killed by the test.

mod xsk_util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ferry_dataplane::xdp::{AttachMode, UplinkConfig, XdpError, XdpMode, XdpProgram};
use xsk_util::*;

fn uplink() -> XdpProgram {
    XdpProgram::uplink(&UplinkConfig { tunnel_port: 4789, local_v4: Some(A4), local_v6: None }, 1).expect("load")
}

#[test]
fn detach_and_drop_leave_no_program() {
    if !privileged("detach_and_drop_leave_no_program") {
        return;
    }
    let t = pair(1);
    let _in_a = InNetns::enter(&t.a.ns);
    assert!(!has_xdp(&t.a), "a fresh veth has no XDP program");

    let att = uplink().attach(&t.a.name, XdpMode::Auto).expect("attach");
    assert!(has_xdp(&t.a));
    att.detach().expect("detach");
    assert!(!has_xdp(&t.a), "detach leaves no XDP program");

    for mode in [XdpMode::Native, XdpMode::Generic] {
        let att = uplink().attach(&t.a.name, mode).expect("attach");
        let shown = run(&["ip", "-n", &t.a.ns, "link", "show", "dev", &t.a.name]);
        match att.mode() {
            AttachMode::Native => assert!(shown.contains(" xdp ") && !shown.contains("xdpgeneric"), "{shown}"),
            AttachMode::Generic => assert!(shown.contains("xdpgeneric"), "{shown}"),
        }
        drop(att);
        assert!(!has_xdp(&t.a), "dropping the guard leaves no XDP program ({mode:?})");
    }
}

#[test]
fn stale_program_is_replaced_and_a_live_one_is_not() {
    if !privileged("stale_program_is_replaced_and_a_live_one_is_not") {
        return;
    }
    let t = pair(1);
    // A stale ferry program, attached the old way (without a link), as a crashed ferry of an
    // earlier version or a person would have left it.
    let object = concat!(env!("OUT_DIR"), "/uplink.bpf.o");
    run(&["ip", "-n", &t.a.ns, "link", "set", "dev", &t.a.name, "xdpgeneric", "obj", object, "sec", "xdp"]);
    let before = run(&["ip", "-n", &t.a.ns, "link", "show", "dev", &t.a.name]);
    assert!(before.contains("xdpgeneric") && before.contains("ferry_uplink"), "{before}");

    let _in_a = InNetns::enter(&t.a.ns);
    let att = uplink().attach(&t.a.name, XdpMode::Auto).expect("the stale program is replaced");
    assert_eq!(att.mode(), AttachMode::Native);
    let after = run(&["ip", "-n", &t.a.ns, "link", "show", "dev", &t.a.name]);
    assert!(!after.contains("xdpgeneric"), "the stale generic program is gone: {after}");

    // A second ferry on the same interface must not take it from the first.
    let err = uplink().attach(&t.a.name, XdpMode::Auto).expect_err("held by a live link");
    assert!(matches!(err, XdpError::InUse { .. }), "{err:?}");
    assert!(has_xdp(&t.a), "the live program is still there");

    drop(att);
    assert!(!has_xdp(&t.a));
}

/// Set in the helper process: the namespace and interface to attach to.
const CHILD_ENV: &str = "FERRY_XSK_DETACH_CHILD";

#[test]
fn killed_process_leaves_no_program() {
    if let Ok(target) = std::env::var(CHILD_ENV) {
        // The helper: attach, say so, and wait to be killed.
        let (ns, ifname) = target.split_once(' ').expect("namespace and interface");
        let _in = InNetns::enter(ns);
        let att = uplink().attach(ifname, XdpMode::Auto).expect("helper attaches");
        println!("ATTACHED {:?}", att.mode());
        thread::sleep(Duration::from_secs(30));
        return;
    }
    if !privileged("killed_process_leaves_no_program") {
        return;
    }
    let t = pair(1);
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "killed_process_leaves_no_program", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{} {}", t.a.ns, t.a.name))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("helper stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("ATTACHED") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(20));
    if ready.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the helper process did not attach in time");
    }
    assert!(has_xdp(&t.a), "the helper's program is attached");

    child.kill().expect("SIGKILL the helper");
    child.wait().expect("reap the helper");
    // The kernel releases the link when the process's descriptors close, at exit.
    let end = deadline(5);
    while has_xdp(&t.a) && std::time::Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!has_xdp(&t.a), "a killed ferry must not leave its XDP program behind");
}

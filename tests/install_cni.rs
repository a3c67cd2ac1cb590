//! `ferry install-cni`, the DaemonSet's init step, run as the init container runs it but against
//! scratch directories: it installs `ferry-cni`, `host-local` and the configuration list, running
//! it again changes nothing, a changed configuration replaces the old one, a bad one is refused
//! before anything is written, and the installed `ferry-cni` answers VERSION from where it was put.
//!
//! Needs Debian's `host-local` (containernetworking-plugins) in /usr/lib/cni; without it the test
//! is skipped, or fails when CI is set.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// The configuration list the manifests carry in their ConfigMap: what is deployed is what is
/// tested.
const MANIFEST_CONFLIST: &str = include_str!("../deploy/cni-conf.json");

fn install(bin: &Path, conf: &Path, conflist: &Path) -> Output {
    Command::new(FERRY)
        .args(["install-cni", "--bin-dir"])
        .arg(bin)
        .arg("--conf-dir")
        .arg(conf)
        .arg("--conflist")
        .arg(conflist)
        .output()
        .expect("runs ferry install-cni")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).and_then(|m| m.modified()).expect("mtime")
}

#[test]
fn install_cni_installs_is_idempotent_replaces_and_refuses_bad_config() {
    if !ferry_testsupport::privileged("install_cni", "nothing (host-local only)", &["/usr/lib/cni/host-local"]) {
        return;
    }
    // Started as root, the check above needs root; the test itself does not.
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("opt/cni/bin");
    let conf = dir.path().join("etc/cni/net.d");
    let conflist = dir.path().join("cni-conf.json");
    fs::write(&conflist, MANIFEST_CONFLIST).expect("write");

    // First run: everything installed, executable, and the list as given.
    let o = install(&bin, &conf, &conflist);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert_eq!(out.matches("installed ").count(), 3, "{out}");
    let installed = conf.join("10-ferry.conflist");
    assert_eq!(fs::read_to_string(&installed).expect("conflist"), MANIFEST_CONFLIST);
    for p in ["ferry-cni", "host-local"] {
        let m = fs::metadata(bin.join(p)).expect(p);
        assert!(std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0, "{p} is not executable");
    }

    // The installed plugin works from its new place.
    let mut child = Command::new(bin.join("ferry-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs the installed ferry-cni");
    child.stdin.take().expect("stdin").write_all(b"{}").expect("stdin");
    let v = child.wait_with_output().expect("ferry-cni VERSION");
    assert!(v.status.success());
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).expect("VERSION answers JSON");
    assert!(v["supportedVersions"].as_array().is_some_and(|a| a.iter().any(|s| s == "1.0.0")), "{v}");

    // Second run: nothing rewritten.
    let before: Vec<_> = ["ferry-cni", "host-local"].iter().map(|p| mtime(&bin.join(p))).collect();
    let conf_before = mtime(&installed);
    let o = install(&bin, &conf, &conflist);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("unchanged ").count(), 3, "{}", text(&o));
    let after: Vec<_> = ["ferry-cni", "host-local"].iter().map(|p| mtime(&bin.join(p))).collect();
    assert_eq!(before, after, "binaries rewritten on a second run");
    assert_eq!(conf_before, mtime(&installed), "conflist rewritten on a second run");

    // A changed list replaces the old one.
    let changed = MANIFEST_CONFLIST.replace("\"name\": \"ferry\"", "\"name\": \"ferry2\"");
    assert_ne!(changed, MANIFEST_CONFLIST, "the manifest's conflist names its network \"ferry\"");
    fs::write(&conflist, &changed).expect("write");
    let o = install(&bin, &conf, &conflist);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(fs::read_to_string(&installed).expect("conflist"), changed);

    // A bad list is refused, naming the field, and the installed one stays.
    fs::write(&conflist, r#"{"cniVersion":"1.0.0","name":"ferry","plugins":[{"type":"bridge"}]}"#).expect("write");
    let o = install(&bin, &conf, &conflist);
    assert!(!o.status.success(), "a list without ferry-cni was accepted");
    assert!(text(&o).contains("ferry-cni"), "{}", text(&o));
    assert_eq!(fs::read_to_string(&installed).expect("conflist"), changed);
    let stray: Vec<_> = fs::read_dir(&conf)
        .expect("dir")
        .chain(fs::read_dir(&bin).expect("dir"))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("ferry-tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

/// Deletes the namespace even when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn uninstall_removes_the_host_port_and_the_conflist_and_is_idempotent() {
    if !ferry_testsupport::privileged("uninstall_removes_the_host_port_and_the_conflist", "network namespaces", &["ip"])
    {
        return;
    }
    let ns = Netns(format!("ferry-uninst-{}", std::process::id()));
    ferry_testsupport::run(&["ip", "netns", "add", &ns.0]);
    ferry_testsupport::run(&["ip", "-n", &ns.0, "link", "add", "ferry0", "type", "veth", "peer", "name", "ferry0p"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let conflist = dir.path().join("10-ferry.conflist");
    fs::write(&conflist, MANIFEST_CONFLIST).expect("write");
    // The manifests' configuration with this node's keys on top, as the lab layers it.
    let base = dir.path().join("ferry.toml");
    fs::write(&base, include_str!("../deploy/ferry.toml")).expect("write");
    let node = dir.path().join("node.toml");
    fs::write(
        &node,
        format!(
            "node_name = \"n1\"\n[admin]\nsocket = \"{0}/ferry.sock\"\nstate_dir = \"{0}\"\n[uninstall]\ncni_conf = \"{1}\"\n",
            dir.path().display(),
            conflist.display()
        ),
    )
    .expect("write");
    let uninstall = || {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.0, FERRY, "uninstall", "--config"])
            .arg(&base)
            .arg("--config")
            .arg(&node)
            .output()
            .expect("runs ferry uninstall");
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let out = uninstall();
    assert!(out.contains("removed link ferry0") && out.contains("10-ferry.conflist"), "{out}");
    for link in ["ferry0", "ferry0p"] {
        let o = Command::new("ip").args(["-n", &ns.0, "link", "show", link]).output().expect("ip");
        assert!(!o.status.success(), "{link} is still there");
    }
    assert!(!conflist.exists(), "the conflist is still there");
    assert_eq!(uninstall().trim(), "nothing to remove");
}

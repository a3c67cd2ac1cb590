//! The agent's command line as a user meets it (no privileges needed): a bad configuration names
//! the key at fault and exits non-zero before anything starts; the query commands say clearly when
//! no agent is running.

use std::process::Command;

const GOOD: &str = r#"
node_name = "n1"
[underlay]
interface = "ul0"
[pods]
cluster_cidrs = ["10.244.0.0/16"]
[control]
static_file = "/etc/ferry/nodes.toml"
"#;

fn ferry(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).output().expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn with_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, text).expect("write config");
    let p = path.to_str().expect("utf-8 path");
    ferry(&["run", "--config", p, "--check"])
}

#[test]
fn a_good_configuration_checks_out() {
    let (code, out, err) = with_config(GOOD);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn bad_configurations_name_the_key_and_exit_non_zero() {
    let cases = [
        (GOOD.replace("[pods]", "[pods]\ngatway = \"10.244.1.1\""), "gatway"),
        (GOOD.replace("[pods]", "[tunnel]\nkind = \"gre\"\n[pods]"), "tunnel.kind"),
        (GOOD.replace("[control]", "[dataplane]\nworkers = 100\n[control]"), "dataplane.workers"),
        (GOOD.replace("10.244.0.0/16", "10.244.0.0/40"), "pods.cluster_cidrs"),
        (GOOD.replace("[underlay]\ninterface = \"ul0\"", "[underlay]"), "interface"),
    ];
    for (text, key) in cases {
        let (code, _, err) = with_config(&text);
        assert_eq!(code, 2, "{key}: exit code; stderr: {err}");
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let (code, _, err) = ferry(&["run", "--config", "/nonexistent/ferry.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
}

#[test]
fn queries_without_an_agent_say_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("none.sock");
    let (code, _, err) = ferry(&["status", "--socket", sock.to_str().expect("utf-8")]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the ferry agent") && err.contains("ferry run"), "{err}");
}

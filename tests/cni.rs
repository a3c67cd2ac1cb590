//! `ferry-cni` as a runtime calls it (privileged): the built binary runs inside a "node" network
//! namespace this test creates, with the CNI_* environment and the netconf on stdin, against a
//! fake agent served here on a temporary Unix socket, with Debian's `host-local` from
//! /usr/lib/cni for IPAM. Checks what a user would see: the result JSON, the pod's address,
//! routes, MTU and tx checksumming, the host veth's MAC and queues, the agent's calls, and that
//! DEL (twice, after a failed ADD, without agent or namespace) leaves no veth and no allocation.
//!
//! Needs root, `ip`, `ethtool` and containernetworking-plugins; without root it prints SKIP, or
//! fails when CI is set.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferry::admin::{NodeInfo, PodPort, Request, Response};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_ferry-cni");
const CNI_PATH: &str = "/usr/lib/cni";
const GW_MAC: &str = "02:fe:ff:ff:ff:ff";
const MTU: u32 = 1450;
const QUEUES: u32 = 2;
const NET_NAME: &str = "ferrytest";

fn privileged(test: &str) -> bool {
    let host_local = format!("{CNI_PATH}/host-local");
    ferry_testsupport::privileged(test, "network namespaces", &[&host_local, "ip", "ethtool"])
}

/// Removes the namespaces and the temporary directory it was given, even when a check failed.
struct Guard {
    netns: Vec<String>,
    dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run a command");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json_of(args: &[&str]) -> Value {
    serde_json::from_slice(&sh(args).stdout).expect("JSON from ip -j")
}

/// The fake agent: answers the admin protocol like `ferry run` and records every request.
struct FakeAgent {
    socket: PathBuf,
    calls: Arc<Mutex<Vec<Request>>>,
    fail_pod_add: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: PathBuf, info: NodeInfo) -> Self {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind the fake agent's socket");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fail_pod_add = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, f, s) = (calls.clone(), fail_pod_add.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut registered: HashSet<String> = HashSet::new();
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let resp = match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response::err(format!("bad request: {e}")),
                    Ok(req) => {
                        let resp = match &req {
                            Request::Info => Response { info: Some(info.clone()), ..Response::ok() },
                            Request::PodAdd { pod } if f.load(Ordering::SeqCst) => {
                                Response::err(format!("host interface {} cannot be attached (test)", pod.host_ifname))
                            }
                            Request::PodAdd { pod } => {
                                registered.insert(pod.id.clone());
                                Response::ok()
                            }
                            Request::PodDel { id } => {
                                registered.remove(id);
                                Response::ok()
                            }
                            Request::PodCheck { pod } if registered.contains(&pod.id) => {
                                Response::with(&ferry::admin::proto::PodChecked { registered: true })
                            }
                            Request::PodCheck { pod } => Response::err(format!("pod {} is not registered", pod.id)),
                            _ => Response::err("not implemented by the fake agent"),
                        };
                        c.lock().expect("calls").push(req);
                        resp
                    }
                };
                let mut out = serde_json::to_vec(&resp).expect("encode");
                out.push(b'\n');
                let _ = (&stream).write_all(&out);
            }
        });
        FakeAgent { socket, calls, fail_pod_add, stop, thread: Some(thread) }
    }

    fn take_calls(&self) -> Vec<Request> {
        std::mem::take(&mut *self.calls.lock().expect("calls"))
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            t.join().expect("fake agent thread");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Plugin<'a> {
    node: &'a str,
    netconf: Value,
}

impl Plugin<'_> {
    /// Runs the plugin in the node namespace; (exit success, stdout JSON or Null).
    fn run(&self, command: &str, container: &str, netns: Option<&str>, prev: Option<&Value>) -> (bool, Value) {
        let mut conf = self.netconf.clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.node, PLUGIN])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match netns {
            Some(ns) => cmd.env("CNI_NETNS", format!("/var/run/netns/{ns}")),
            None => cmd.env_remove("CNI_NETNS"),
        };
        let mut child = cmd.spawn().expect("spawn ferry-cni");
        child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("write netconf");
        let out = child.wait_with_output().expect("ferry-cni");
        eprintln!("{command} {container}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        let v = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).expect("stdout is JSON")
        };
        (out.status.success(), v)
    }
}

/// Addresses host-local has handed out (its files named after an address).
/// What a CNI test in namespaces starts from: a node namespace and `pods` pod namespaces named
/// after `prefix` and this process (removed by the guard, with the temporary directory), a fake
/// agent for a node owning 10.244.`net`.0/24 whose pods get `pod_port`, and the plugin's netconf.
struct Rig {
    guard: Guard,
    node: String,
    pods: Vec<String>,
    ipam_dir: PathBuf,
    agent: FakeAgent,
    netconf: Value,
}

impl Rig {
    fn new(prefix: &str, pods: usize, net: u8, pod_port: PodPort) -> Rig {
        let tag = format!("{prefix}{}", std::process::id());
        let node = format!("{tag}-node");
        let pods: Vec<String> = (1..=pods).map(|i| format!("{tag}-p{i}")).collect();
        let dir = std::env::temp_dir().join(&tag);
        let guard =
            Guard { netns: std::iter::once(node.clone()).chain(pods.iter().cloned()).collect(), dir: dir.clone() };
        std::fs::create_dir_all(&dir).expect("temp dir");
        for ns in &guard.netns {
            sh(&["ip", "netns", "add", ns]);
        }
        let ipam_dir = dir.join("ipam");
        let info = NodeInfo {
            node_name: "n1".into(),
            pod_cidrs: vec![format!("10.244.{net}.0/24").parse().expect("net")],
            gateway_v4: Some(format!("10.244.{net}.1").parse().expect("ip")),
            gateway_v6: None,
            gateway_mac: GW_MAC.into(),
            mtu: MTU,
            underlay_mtu: Some(1500),
            queues: QUEUES,
            pod_port,
            offload: false,
            ipam_data_dir: ipam_dir.display().to_string(),
        };
        let agent = FakeAgent::start(dir.join("ferry.sock"), info);
        let netconf = json!({
            "cniVersion": "1.0.0",
            "name": NET_NAME,
            "type": "ferry-cni",
            "adminSocket": agent.socket.display().to_string(),
            "dataDir": dir.join("cni").display().to_string(),
        });
        Rig { guard, node, pods, ipam_dir, agent, netconf }
    }
}

fn allocations(ipam_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(ipam_dir.join(NET_NAME)) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

fn link_exists(netns: &str, ifname: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", ifname])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ip")
        .success()
}

#[test]
fn version_lists_supported_versions() {
    let mut child = Command::new(PLUGIN)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ferry-cni");
    child.stdin.take().expect("stdin").write_all(br#"{"cniVersion":"1.0.0"}"#).expect("write");
    let out = child.wait_with_output().expect("ferry-cni");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        assert!(v["supportedVersions"].as_array().expect("list").contains(&json!(version)), "{v}");
    }
}

#[test]
fn invalid_environment_is_error_4() {
    let out = Command::new(PLUGIN)
        .env("CNI_COMMAND", "ADD")
        .env_remove("CNI_CONTAINERID")
        .stdin(Stdio::null())
        .output()
        .expect("ferry-cni");
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert_eq!(v["code"], 4, "{v}");
    assert!(v["msg"].as_str().expect("msg").contains("CNI_CONTAINERID"), "{v}");
}

#[test]
fn add_check_del_in_namespaces() {
    if !privileged("add_check_del_in_namespaces") {
        return;
    }
    let rig = Rig::new("fcni", 3, 7, PodPort::Veth);
    let (node, ipam_dir, guard) = (rig.node, rig.ipam_dir, rig.guard);
    let (p1, p2, p3) = (rig.pods[0].clone(), rig.pods[1].clone(), rig.pods[2].clone());
    let mut agent = rig.agent;
    let plugin = Plugin { node: &node, netconf: rig.netconf };

    // ADD.
    let (ok, result) = plugin.run("ADD", "ctr1", Some(&p1), None);
    assert!(ok, "ADD failed: {result}");
    let host = ferry::cni::host_ifname("ctr1", "eth0");
    let pod_link = &json_of(&["ip", "-n", &p1, "-j", "-d", "link", "show", "eth0"])[0];
    let pod_mac = pod_link["address"].as_str().expect("pod MAC").to_owned();
    let ip = result["ips"][0]["address"].as_str().expect("address").to_owned();
    let addr = ip.trim_end_matches("/32").to_owned();
    assert!(ip.starts_with("10.244.7.") && ip.ends_with("/32") && addr != "10.244.7.1", "{result}");
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host, "mac": GW_MAC},
                {"name": "eth0", "mac": pod_mac, "sandbox": format!("/var/run/netns/{p1}")}
            ],
            "ips": [{"address": ip, "gateway": "10.244.7.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}],
            "dns": {}
        })
    );

    // The pod's side: address /32, up, MTU, queues, routes, tx checksumming off.
    assert_eq!(pod_link["mtu"], MTU, "{pod_link}");
    assert_eq!(pod_link["num_tx_queues"], QUEUES, "{pod_link}");
    assert_eq!(pod_link["num_rx_queues"], QUEUES, "{pod_link}");
    assert!(pod_link["flags"].as_array().expect("flags").contains(&json!("UP")), "{pod_link}");
    let addrs = json_of(&["ip", "-n", &p1, "-j", "-4", "addr", "show", "eth0"]);
    let info4 = &addrs[0]["addr_info"];
    assert_eq!(info4.as_array().expect("addrs").len(), 1, "{addrs}");
    assert_eq!(info4[0]["local"], addr.as_str());
    assert_eq!(info4[0]["prefixlen"], 32);
    let routes = json_of(&["ip", "-n", &p1, "-j", "-4", "route", "show"]);
    let default = routes.as_array().expect("routes").iter().find(|r| r["dst"] == "default").expect("default route");
    assert_eq!(default["gateway"], "10.244.7.1", "{routes}");
    assert_eq!(default["dev"], "eth0", "{routes}");
    assert!(default["flags"].as_array().expect("flags").contains(&json!("onlink")), "{routes}");
    assert!(routes.as_array().expect("routes").iter().any(|r| r["dst"] == "10.244.7.1" && r["scope"] == "link"));
    let features = String::from_utf8(sh(&["ip", "netns", "exec", &p1, "ethtool", "-k", "eth0"]).stdout).expect("utf8");
    assert!(features.lines().any(|l| l.trim() == "tx-checksumming: off"), "{features}");

    // The host side: gateway MAC, the underlay's MTU (frames too big for the tunnel must reach
    // ferry, which answers them with ICMP), queues, up.
    let host_link = &json_of(&["ip", "-n", &node, "-j", "-d", "link", "show", &host])[0];
    assert_eq!(host_link["address"], GW_MAC, "{host_link}");
    assert_eq!(host_link["mtu"], 1500, "{host_link}");
    assert_eq!(host_link["num_tx_queues"], QUEUES, "{host_link}");
    assert_eq!(host_link["num_rx_queues"], QUEUES, "{host_link}");
    assert!(host_link["flags"].as_array().expect("flags").contains(&json!("UP")), "{host_link}");

    // The agent heard Info then PodAdd with the pod as wired.
    let calls = agent.take_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0], Request::Info);
    let Request::PodAdd { pod } = &calls[1] else { panic!("expected PodAdd, got {calls:?}") };
    assert_eq!(pod.id, "ctr1/eth0");
    assert_eq!(pod.netns, format!("/var/run/netns/{p1}"));
    assert_eq!(pod.host_ifname, host);
    assert_eq!(pod.mac, pod_mac);
    assert_eq!(pod.addrs, vec![addr.parse::<std::net::IpAddr>().expect("ip")]);
    assert_eq!(allocations(&ipam_dir), vec![addr.clone()]);

    // CHECK passes against the ADD result, fails against a result naming another address.
    let (ok, out) = plugin.run("CHECK", "ctr1", Some(&p1), Some(&result));
    assert!(ok, "CHECK failed: {out}");
    assert!(agent.take_calls().iter().any(|c| matches!(c, Request::PodCheck { pod } if pod.id == "ctr1/eth0")));
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("10.244.7.250/32");
    let (ok, out) = plugin.run("CHECK", "ctr1", Some(&p1), Some(&wrong));
    assert!(!ok && out["code"] == 103, "CHECK of a wrong address: {out}");
    assert!(out["msg"].as_str().expect("msg").contains("10.244.7.250"), "{out}");

    // DEL, twice: nothing left.
    for round in 0..2 {
        let (ok, out) = plugin.run("DEL", "ctr1", Some(&p1), Some(&result));
        assert!(ok, "DEL #{round} failed: {out}");
        assert_eq!(out, Value::Null, "DEL prints nothing");
        assert!(!link_exists(&node, &host), "host veth left after DEL #{round}");
        assert!(!link_exists(&p1, "eth0"), "pod eth0 left after DEL #{round}");
        assert!(allocations(&ipam_dir).is_empty(), "IPAM allocation left: {:?}", allocations(&ipam_dir));
    }
    assert!(agent.take_calls().iter().any(|c| *c == Request::PodDel { id: "ctr1/eth0".into() }));

    // ADD the agent refuses: the error JSON, and everything rolled back; DEL after it succeeds.
    agent.fail_pod_add.store(true, Ordering::SeqCst);
    let (ok, out) = plugin.run("ADD", "ctr2", Some(&p2), None);
    assert!(!ok, "ADD must fail when the agent refuses: {out}");
    assert_eq!(out["code"], 100, "{out}");
    assert_eq!(out["cniVersion"], "1.0.0");
    assert!(out["msg"].as_str().expect("msg").contains("cannot be attached (test)"), "{out}");
    let host2 = ferry::cni::host_ifname("ctr2", "eth0");
    assert!(!link_exists(&node, &host2) && !link_exists(&p2, "eth0"), "veth left after a failed ADD");
    assert!(allocations(&ipam_dir).is_empty(), "IPAM allocation left after a failed ADD");
    let (ok, out) = plugin.run("DEL", "ctr2", Some(&p2), None);
    assert!(ok, "DEL after a failed ADD: {out}");
    agent.fail_pod_add.store(false, Ordering::SeqCst);

    // DEL with the agent gone and the pod's namespace gone: still succeeds and cleans up.
    let (ok, out) = plugin.run("ADD", "ctr3", Some(&p3), None);
    assert!(ok, "ADD ctr3: {out}");
    let host3 = ferry::cni::host_ifname("ctr3", "eth0");
    assert!(link_exists(&node, &host3));
    assert_eq!(allocations(&ipam_dir).len(), 1);
    agent.stop();
    sh(&["ip", "netns", "del", &p3]);
    // The pod end went with its namespace, and the host end with it.
    let (ok, out) = plugin.run("DEL", "ctr3", Some(&p3), None);
    assert!(ok, "DEL without agent and netns: {out}");
    assert!(!link_exists(&node, &host3), "host veth left");
    assert!(allocations(&ipam_dir).is_empty(), "IPAM allocation left: {:?}", allocations(&ipam_dir));
    let (ok, out) = plugin.run("DEL", "ctr3", None, None);
    assert!(ok, "second DEL without CNI_NETNS: {out}");

    // ADD without an agent: try again later.
    let (ok, out) = plugin.run("ADD", "ctr4", Some(&p1), None);
    assert!(!ok && out["code"] == 11, "ADD without agent: {out}");
    assert!(!link_exists(&p1, "eth0"));
    drop(guard);
}

/// A tap pod (the agent says `pod_port: tap`): ADD makes a persistent multi-queue tap as the pod's
/// own interface, with the pods' MTU, the address and routes a veth pod gets, and no host
/// interface; CHECK passes and catches a wrong MTU; DEL (twice, and for a pod never added) leaves
/// no tap and no allocation; an ADD the agent refuses leaves nothing either.
#[test]
fn tap_add_check_del_in_namespaces() {
    if !privileged("tap_add_check_del_in_namespaces") {
        return;
    }
    let rig = Rig::new("fctap", 2, 8, PodPort::Tap);
    let (node, ipam_dir, guard) = (rig.node, rig.ipam_dir, rig.guard);
    let (p1, p2) = (rig.pods[0].clone(), rig.pods[1].clone());
    let agent = rig.agent;
    let plugin = Plugin { node: &node, netconf: rig.netconf };

    let (ok, result) = plugin.run("ADD", "tap1", Some(&p1), None);
    assert!(ok, "ADD failed: {result}");
    let pod_link = &json_of(&["ip", "-n", &p1, "-j", "-d", "link", "show", "eth0"])[0];
    let pod_mac = pod_link["address"].as_str().expect("pod MAC").to_owned();
    let ip = result["ips"][0]["address"].as_str().expect("address").to_owned();
    let addr = ip.trim_end_matches("/32").to_owned();
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": pod_mac, "sandbox": format!("/var/run/netns/{p1}")}],
            "ips": [{"address": ip, "gateway": "10.244.8.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.8.1"}],
            "dns": {}
        })
    );
    // A persistent multi-queue tap with the pods' MTU (its queues are the agent's to open).
    let tun = &pod_link["linkinfo"]["info_data"];
    assert_eq!(pod_link["linkinfo"]["info_kind"], "tun", "{pod_link}");
    assert_eq!(tun["type"], "tap", "{pod_link}");
    assert_eq!(tun["persist"], true, "{pod_link}");
    assert_eq!(tun["multi_queue"], true, "{pod_link}");
    assert_eq!(pod_link["mtu"], MTU, "{pod_link}");
    assert!(pod_link["flags"].as_array().expect("flags").contains(&json!("UP")), "{pod_link}");
    let addrs = json_of(&["ip", "-n", &p1, "-j", "-4", "addr", "show", "eth0"]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], addr.as_str(), "{addrs}");
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32, "{addrs}");
    let routes = json_of(&["ip", "-n", &p1, "-j", "-4", "route", "show"]);
    let default = routes.as_array().expect("routes").iter().find(|r| r["dst"] == "default").expect("default route");
    assert_eq!(default["gateway"], "10.244.8.1", "{routes}");
    assert!(default["flags"].as_array().expect("flags").contains(&json!("onlink")), "{routes}");
    let host = ferry::cni::host_ifname("tap1", "eth0");
    assert!(!link_exists(&node, &host), "a tap pod has no host interface");
    let calls = agent.take_calls();
    let Some(Request::PodAdd { pod }) = calls.get(1) else { panic!("expected Info, PodAdd: {calls:?}") };
    assert_eq!((pod.kind, pod.host_ifname.as_str(), pod.mac.as_str()), (PodPort::Tap, "eth0", pod_mac.as_str()));
    assert_eq!(pod.netns, format!("/var/run/netns/{p1}"));

    // CHECK passes, and fails once the tap's MTU is not the pods'.
    let (ok, out) = plugin.run("CHECK", "tap1", Some(&p1), Some(&result));
    assert!(ok, "CHECK failed: {out}");
    sh(&["ip", "-n", &p1, "link", "set", "eth0", "mtu", "1500"]);
    let (ok, out) = plugin.run("CHECK", "tap1", Some(&p1), Some(&result));
    assert!(!ok && out["code"] == 103 && out["msg"].as_str().is_some_and(|m| m.contains("MTU")), "{out}");

    // DEL twice, and DEL of a pod never added: nothing left.
    for (round, ctr) in ["tap1", "tap1", "never"].iter().enumerate() {
        let (ok, out) = plugin.run("DEL", ctr, Some(&p1), Some(&result));
        assert!(ok, "DEL #{round} ({ctr}) failed: {out}");
        assert!(!link_exists(&p1, "eth0"), "tap left after DEL #{round}");
        assert!(allocations(&ipam_dir).is_empty(), "IPAM allocation left: {:?}", allocations(&ipam_dir));
    }

    // ADD the agent refuses: rolled back, tap and allocation gone.
    agent.fail_pod_add.store(true, Ordering::SeqCst);
    let (ok, out) = plugin.run("ADD", "tap2", Some(&p2), None);
    assert!(!ok && out["code"] == 100, "ADD must fail when the agent refuses: {out}");
    assert!(!link_exists(&p2, "eth0"), "tap left after a failed ADD");
    assert!(allocations(&ipam_dir).is_empty(), "IPAM allocation left after a failed ADD");
    // The agent first: its socket is in the directory the guard removes.
    drop(agent);
    drop(guard);
}

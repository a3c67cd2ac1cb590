//! ADD, DEL and CHECK (setup side): the plugin's conversations with the kernel, the IPAM plugin
//! and the agent.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ferry_dataplane::port::tap;
use ferry_encap::MacAddr;
use ipnet::IpNet;
use serde_json::Value;

use super::config::{Command, Env, NetConf, has_check, host_ifname};
use super::error::{CniError, Code};
use super::ipam;
use super::result::{CniResult, Interface, IpConfig, RouteConfig};
use crate::admin::proto::PodChecked;
use crate::admin::{self, CallError, NodeInfo, PodPort, PodSpec, Request, Response};
use crate::netlink::{Netlink, Route, VethSpec};

/// How long the agent may take to answer one request.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `req` to the agent; a refusal (`ok: false`) is an error.
fn agent(conf: &NetConf, req: &Request, what: &str) -> Result<Response, CniError> {
    match admin::call(&conf.admin_socket, req, AGENT_TIMEOUT) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(CniError::new(
            Code::AgentRefused,
            format!("the ferry agent refused {what}: {}", r.error.as_deref().unwrap_or("no reason given")),
        )),
        // Not running yet (node start-up): the runtime retries ADD later.
        // (The call errors' messages already carry their causes.)
        Err(e @ CallError::Connect { .. }) => Err(CniError::new(Code::TryAgainLater, format!("{what}: {e}"))),
        Err(e) => Err(CniError::new(Code::Io, format!("{what}: {e}"))),
    }
}

fn node_info(conf: &NetConf) -> Result<NodeInfo, CniError> {
    agent(conf, &Request::Info, "node info")?
        .info
        .ok_or_else(|| CniError::new(Code::AgentRefused, "the ferry agent answered node info without the info"))
}

fn gateway_mac(info: &NodeInfo) -> Result<MacAddr, CniError> {
    info.gateway_mac.parse().map_err(|e| CniError::with_source(Code::AgentRefused, "the agent's gateway_mac", &e))
}

fn required_netns(env: &Env) -> Result<&Path, CniError> {
    env.netns.as_deref().ok_or_else(|| CniError::new(Code::InvalidEnv, "environment: CNI_NETNS is not set"))
}

fn open_netns(netns: &Path) -> Result<File, CniError> {
    File::open(netns).map_err(|e| {
        CniError::with_source(
            Code::UnknownContainer,
            format!("network namespace {} cannot be opened", netns.display()),
            &e,
        )
    })
}

fn host_route(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn default_route(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    }
}

/// ADD: IPAM, then the wiring; a failure after IPAM undoes both.
pub(crate) fn add(conf: &NetConf, env: &Env) -> Result<CniResult, CniError> {
    let netns = required_netns(env)?;
    let ns_file = open_netns(netns)?;
    let info = node_info(conf)?;
    let mac = gateway_mac(&info)?;
    let host = host_ifname(&env.container_id, &env.ifname);
    let nl = Netlink::open()?;
    // A host end or a tap of that name is a leftover of an earlier ADD of the same container that
    // never finished (the names are the container's): it is ours to remove.
    nl.delete_link(&host)?;
    remove_tap(netns, &env.ifname)?;

    let ipam_conf = conf.ipam.clone().unwrap_or_else(|| ipam::host_local_config(&info));
    // Saved before the allocation: a crash right after it still leaves DEL able to release.
    ipam::save(conf, env, &ipam_conf)?;
    let allocated = match ipam::exec(conf, env, Command::Add, &ipam_conf, None) {
        Ok(r) => r,
        Err(e) => {
            ipam::forget(conf, env);
            return Err(e);
        }
    };
    let mut pod_added = false;
    match wire(conf, env, &info, mac, &host, &ns_file, &allocated, &nl, &mut pod_added) {
        Ok(result) => Ok(result),
        Err(e) => {
            eprintln!("ferry-cni: ADD {} failed, rolling back: {e}", env.pod_id());
            if pod_added {
                let _ = admin::call(&conf.admin_socket, &Request::PodDel { id: env.pod_id() }, AGENT_TIMEOUT);
            }
            if let Err(d) = nl.delete_link(&host) {
                eprintln!("ferry-cni: rollback: {d}");
            }
            if let Err(d) = remove_tap(netns, &env.ifname) {
                eprintln!("ferry-cni: rollback: {d}");
            }
            match ipam::exec(conf, env, Command::Del, &ipam_conf, None) {
                Ok(_) => ipam::forget(conf, env),
                Err(d) => eprintln!("ferry-cni: rollback: {d}"),
            }
            Err(e)
        }
    }
}

/// Removes the tap `ifname` from the pod's namespace, if there is one (only a tap: any other link
/// of that name is not ferry's to remove). A namespace that is gone took its taps with it.
fn remove_tap(netns: &Path, ifname: &str) -> Result<(), CniError> {
    let Ok(pod) = Netlink::open_in_netns(netns) else { return Ok(()) };
    match pod.link(ifname)? {
        Some(l) if l.kind.as_deref() == Some(TUN_KIND) => tap::delete(Some(netns), ifname)
            .map_err(|e| CniError::with_source(Code::Link, format!("removing the tap {ifname} from the pod"), &e)),
        _ => Ok(()),
    }
}

/// The link kind of TUN/TAP devices.
const TUN_KIND: &str = "tun";

#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename the arguments")]
fn wire(
    conf: &NetConf,
    env: &Env,
    info: &NodeInfo,
    mac: MacAddr,
    host: &str,
    ns_file: &File,
    allocated: &CniResult,
    nl: &Netlink,
    pod_added: &mut bool,
) -> Result<CniResult, CniError> {
    let netns = required_netns(env)?;
    let pod = Netlink::open_in_netns(netns).map_err(|e| {
        CniError::with_source(Code::UnknownContainer, format!("network namespace {}", netns.display()), &e)
    })?;
    match info.pod_port {
        PodPort::Veth => {
            nl.create_veth(&VethSpec {
                name: host,
                peer_name: &env.ifname,
                mac: Some(mac),
                peer_mac: None,
                mtu: Some(info.mtu),
                queues: info.queues,
                peer_netns: Some(ns_file),
            })?;
            if info.host_mtu() != info.mtu {
                nl.set_mtu(host, info.host_mtu())?;
            }
            nl.set_up(host)?;
            // Offload off before the link is up: no frame leaves with a partial checksum (an
            // AF_XDP socket would take it as it is). Under flow offload the frames reach ferry
            // through a tap with their checksum state, and the pod keeps TSO.
            if !info.offload {
                pod.set_tx_checksum(&env.ifname, false)?;
            } else {
                // Under flow offload the host end takes the pod's packets through a NAPI ring
                // (GRO on): in the order the pod sent them from either CPU, before the offload's
                // program moves them (docs/throughput.md, "Order").
                nl.set_gro(host, true)?;
            }
        }
        PodPort::Tap => {
            // The pod's own interface is the tap; ferry opens its queues (one per worker). Its
            // offloads stay on: partial checksums and super-packets cross with their metadata.
            tap::create_persistent(Some(netns), &env.ifname, None, info.queues).map_err(|e| {
                CniError::with_source(
                    Code::Link,
                    format!("creating the tap {} ({} queues) in {}", env.ifname, info.queues, netns.display()),
                    &e,
                )
            })?;
            pod.set_mtu(&env.ifname, info.mtu)?;
        }
    }

    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for ip in &allocated.ips {
        let addr = ip.address.addr();
        pod.add_address(&env.ifname, host_route(addr))?;
        ips.push((addr, ipam::gateway_for(addr, Some(info), ip.gateway)));
    }
    pod.set_up(&env.ifname)?;
    for (addr, gateway) in &ips {
        let Some(gw) = *gateway else { continue };
        // The gateway on-link, then the default route through it: the pod's /32 covers no
        // neighbour, so both say the gateway is reachable on this link.
        pod.add_route(&env.ifname, &Route { dst: host_route(gw), via: None, onlink: false, src: None })?;
        let dst = default_route(*addr);
        pod.add_route(&env.ifname, &Route { dst, via: Some(gw), onlink: true, src: None })?;
        routes.push(RouteConfig { dst, gw: Some(gw) });
    }
    let link = pod
        .link(&env.ifname)?
        .ok_or_else(|| CniError::new(Code::Link, format!("{} vanished from the pod after wiring", env.ifname)))?;
    let pod_mac = link.mac.map(|m| m.to_string()).unwrap_or_default();

    let (host_ifname, mut interfaces) = match info.pod_port {
        PodPort::Veth => {
            (host.to_owned(), vec![Interface { name: host.to_owned(), mac: mac.to_string(), sandbox: None }])
        }
        PodPort::Tap => (env.ifname.clone(), Vec::new()),
    };
    let spec = PodSpec {
        id: env.pod_id(),
        netns: netns.display().to_string(),
        host_ifname,
        kind: info.pod_port,
        mac: pod_mac.clone(),
        addrs: ips.iter().map(|(a, _)| *a).collect(),
        namespace: env.arg("K8S_POD_NAMESPACE"),
        name: env.arg("K8S_POD_NAME"),
    };
    *pod_added = true;
    agent(conf, &Request::PodAdd { pod: spec }, &format!("adding pod {}", env.pod_id()))?;

    let pod_index = interfaces.len();
    interfaces.push(Interface { name: env.ifname.clone(), mac: pod_mac, sandbox: Some(netns.display().to_string()) });
    Ok(CniResult {
        interfaces,
        ips: ips
            .iter()
            .map(|(a, gw)| IpConfig { address: host_route(*a), gateway: *gw, interface: Some(pod_index) })
            .collect(),
        routes,
    })
}

/// DEL: removes whatever of the pod exists; succeeds when nothing is left, agent or not.
pub(crate) fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let mut agent_error = None;
    match agent(conf, &Request::PodDel { id: env.pod_id() }, &format!("removing pod {}", env.pod_id())) {
        Ok(_) => {}
        Err(e) if e.code == Code::AgentRefused as u32 => agent_error = Some(e),
        // Not running: nothing to deregister now; the agent drops pods whose veth is gone.
        Err(e) => eprintln!("ferry-cni: DEL {}: {e} (continuing)", env.pod_id()),
    }
    let nl = Netlink::open()?;
    // With a veth, deleting the host end takes the pod's end along, wherever its namespace is. A
    // tap lives in the pod's namespace (and goes with it). Both are looked for: the agent, which
    // knows the pod's kind, may be down.
    nl.delete_link(&host_ifname(&env.container_id, &env.ifname))?;
    if let Some(netns) = env.netns.as_deref() {
        remove_tap(netns, &env.ifname)?;
    }

    let ipam_conf = match conf.ipam.clone().or_else(|| ipam::load(conf, env)) {
        Some(c) => Some(c),
        None => match node_info(conf) {
            Ok(i) => Some(ipam::host_local_config(&i)),
            // Nothing remembered and no agent: ADD never got as far as IPAM for this container.
            Err(e) => {
                eprintln!("ferry-cni: DEL {}: no IPAM configuration to release with ({e})", env.pod_id());
                None
            }
        },
    };
    if let Some(c) = ipam_conf {
        ipam::exec(conf, env, Command::Del, &c, conf.prev_result.as_ref())?;
    }
    ipam::forget(conf, env);
    agent_error.map_or(Ok(()), Err)
}

fn mismatch(msg: String) -> CniError {
    CniError::new(Code::CheckFailed, msg)
}

/// CHECK: the wiring agrees with `prevResult`.
pub(crate) fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !has_check(&conf.cni_version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("CHECK needs cniVersion 0.4.0 or later, not {}", conf.cni_version),
        ));
    }
    let prev_value: &Value = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(Code::InvalidConfig, "network configuration: \"prevResult\" is required for CHECK")
    })?;
    let prev = CniResult::from_value(prev_value, "prevResult")?;
    let netns = required_netns(env)?;
    let info = node_info(conf)?;
    let mac = gateway_mac(&info)?;
    let host = host_ifname(&env.container_id, &env.ifname);

    if info.pod_port == PodPort::Veth {
        let nl = Netlink::open()?;
        let h = nl.link(&host)?.ok_or_else(|| mismatch(format!("host interface {host} does not exist")))?;
        if h.mac != Some(mac) {
            return Err(mismatch(format!("host interface {host} has MAC {:?}, not the gateway MAC {mac}", h.mac)));
        }
        if h.mtu != info.host_mtu() {
            return Err(mismatch(format!("host interface {host} has MTU {}, not {}", h.mtu, info.host_mtu())));
        }
    }

    let pod = Netlink::open_in_netns(netns).map_err(|e| {
        CniError::with_source(Code::UnknownContainer, format!("network namespace {}", netns.display()), &e)
    })?;
    let p = pod
        .link(&env.ifname)?
        .ok_or_else(|| mismatch(format!("{} does not exist in {}", env.ifname, netns.display())))?;
    let index = prev.interfaces.iter().position(|i| i.name == env.ifname && i.sandbox.is_some());
    let expected_mac = index.map(|i| prev.interfaces[i].mac.as_str()).unwrap_or_default();
    let pod_mac = p.mac.map(|m| m.to_string()).unwrap_or_default();
    if !expected_mac.is_empty() && !expected_mac.eq_ignore_ascii_case(&pod_mac) {
        return Err(mismatch(format!("{} has MAC {pod_mac}, the previous result says {expected_mac}", env.ifname)));
    }
    if !p.up {
        return Err(mismatch(format!("{} is down", env.ifname)));
    }
    if info.pod_port == PodPort::Tap {
        if p.kind.as_deref() != Some(TUN_KIND) {
            return Err(mismatch(format!("{} is not a tap (its kind is {:?})", env.ifname, p.kind)));
        }
        if p.mtu != info.mtu {
            return Err(mismatch(format!("{} has MTU {}, not {}", env.ifname, p.mtu, info.mtu)));
        }
    }
    let have = pod.addresses(&env.ifname)?;
    let ours: Vec<&IpConfig> = prev.ips.iter().filter(|ip| ip.interface.is_none() || ip.interface == index).collect();
    for ip in &ours {
        if !have.contains(&ip.address) {
            return Err(mismatch(format!("{} lacks address {}", env.ifname, ip.address)));
        }
    }
    let routes = pod.routes(&env.ifname)?;
    for r in &prev.routes {
        if !routes.iter().any(|k| k.dst == r.dst && (r.gw.is_none() || k.via == r.gw)) {
            let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(mismatch(format!("{} lacks route {}{via}", env.ifname, r.dst)));
        }
    }
    if info.pod_port == PodPort::Veth && !info.offload && pod.tx_checksum(&env.ifname)? {
        return Err(mismatch(format!("{} has tx checksum offload on", env.ifname)));
    }

    let ipam_conf =
        conf.ipam.clone().or_else(|| ipam::load(conf, env)).unwrap_or_else(|| ipam::host_local_config(&info));
    ipam::exec(conf, env, Command::Check, &ipam_conf, Some(prev_value))?;

    let spec = PodSpec {
        id: env.pod_id(),
        netns: netns.display().to_string(),
        host_ifname: if info.pod_port == PodPort::Tap { env.ifname.clone() } else { host },
        kind: info.pod_port,
        mac: pod_mac,
        addrs: ours.iter().map(|ip| ip.address.addr()).collect(),
        namespace: env.arg("K8S_POD_NAMESPACE"),
        name: env.arg("K8S_POD_NAME"),
    };
    let answer =
        agent(conf, &Request::PodCheck { pod: spec }, &format!("checking pod {}", env.pod_id())).map_err(|e| {
            if e.code == Code::AgentRefused as u32 { CniError { code: Code::CheckFailed as u32, ..e } } else { e }
        })?;
    // An agent from before typed answers says nothing but ok.
    let registered = answer.data.is_none() || answer.decode::<PodChecked>().is_ok_and(|c| c.registered);
    if !registered {
        return Err(mismatch(format!("the ferry agent does not have pod {} registered", env.pod_id())));
    }
    Ok(())
}

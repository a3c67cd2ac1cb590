//! IPAM by delegation (setup side): the plugin runs an IPAM plugin (by default the standard
//! `host-local` over the agent's pod CIDRs) from `CNI_PATH` with the same environment and
//! command, as Flannel does, and keeps the configuration it used per container so a DEL can
//! release the address even while the agent is down.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{Value, json};

use super::config::{Command as CniCommand, Env, NetConf};
use super::error::{CniError, Code};
use super::result::CniResult;
use crate::admin::NodeInfo;

/// The default IPAM configuration: host-local with one range set per address family (one address
/// of each family per pod), each pod CIDR a range with the family's gateway, which host-local
/// then never hands out, and the agent's data directory. An IPv6 range stops two short of its
/// last address, which is the host port's.
pub fn host_local_config(info: &NodeInfo) -> Value {
    let range_set = |v4: bool| -> Vec<Value> {
        let gateway = if v4 { info.gateway_v4 } else { info.gateway_v6 };
        info.pod_cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)) == v4)
            .map(|c| {
                let mut r = json!({ "subnet": c.to_string() });
                if let Some(g) = gateway.filter(|g| c.contains(g)) {
                    r["gateway"] = json!(g.to_string());
                }
                // IPv6: the agent's host port takes the address before the last (the network
                // address is the subnet-router anycast address); host-local would hand out the last.
                if let IpNet::V6(n) = c
                    && n.prefix_len() <= 126
                {
                    r["rangeEnd"] = json!(std::net::Ipv6Addr::from(u128::from(n.broadcast()) - 2).to_string());
                }
                r
            })
            .collect()
    };
    let ranges: Vec<Value> =
        [true, false].into_iter().map(range_set).filter(|s| !s.is_empty()).map(Value::from).collect();
    json!({ "type": "host-local", "ranges": ranges, "dataDir": info.ipam_data_dir })
}

/// Where the IPAM configuration used for a container is kept.
pub fn cache_path(conf: &NetConf, env: &Env) -> PathBuf {
    conf.data_dir.join(format!("{}-{}.ipam.json", env.container_id, env.ifname))
}

/// Remembers `ipam` as the configuration used for this container.
///
/// # Errors
/// Code 5 when the file cannot be written.
pub fn save(conf: &NetConf, env: &Env, ipam: &Value) -> Result<(), CniError> {
    let path = cache_path(conf, env);
    let io = |e: &std::io::Error| {
        CniError::with_source(Code::Io, format!("saving the IPAM configuration to {}", path.display()), e)
    };
    std::fs::create_dir_all(&conf.data_dir).map_err(|e| io(&e))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, ipam.to_string()).map_err(|e| io(&e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&e))
}

/// The configuration remembered for this container, if any.
pub fn load(conf: &NetConf, env: &Env) -> Option<Value> {
    let bytes = std::fs::read(cache_path(conf, env)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Forgets the configuration remembered for this container (absent is fine).
pub fn forget(conf: &NetConf, env: &Env) {
    let _ = std::fs::remove_file(cache_path(conf, env));
}

/// Finds the plugin `name` in `CNI_PATH`.
fn find_plugin(env: &Env, name: &str) -> Result<PathBuf, CniError> {
    env.path.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        let dirs: Vec<String> = env.path.iter().map(|d| d.display().to_string()).collect();
        CniError::new(Code::Io, format!("IPAM plugin {name:?} not found in CNI_PATH ({})", dirs.join(":")))
    })
}

/// Runs the IPAM plugin of `ipam` with `command`; for ADD its result, otherwise an empty one.
/// `prev_result` goes along for CHECK (host-local checks the addresses it names).
///
/// # Errors
/// The delegate's own error (its code passed through, its message prefixed with its name), code 5
/// when it cannot be run, 6 when its output does not parse.
pub fn exec(
    conf: &NetConf,
    env: &Env,
    command: CniCommand,
    ipam: &Value,
    prev_result: Option<&Value>,
) -> Result<CniResult, CniError> {
    let name = ipam["type"].as_str().unwrap_or("host-local");
    let plugin = find_plugin(env, name)?;
    let mut netconf = json!({ "cniVersion": conf.cni_version, "name": conf.name, "type": name, "ipam": ipam });
    if let Some(prev) = prev_result {
        netconf["prevResult"] = prev.clone();
    }
    let run = |e: &std::io::Error| CniError::with_source(Code::Io, format!("running {}", plugin.display()), e);
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| run(&e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(netconf.to_string().as_bytes()).map_err(|e| run(&e))?;
    }
    let out = child.wait_with_output().map_err(|e| run(&e))?;
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        let (code, msg, details) = match &parsed {
            Some(v) => (
                v["code"].as_u64().and_then(|c| u32::try_from(c).ok()).unwrap_or(Code::Ipam as u32),
                v["msg"].as_str().unwrap_or("failed").to_owned(),
                v["details"].as_str().unwrap_or_default().to_owned(),
            ),
            None => {
                (Code::Ipam as u32, format!("failed ({})", out.status), String::from_utf8_lossy(&out.stdout).into())
            }
        };
        return Err(CniError { code, msg: format!("IPAM plugin {name} ({}): {msg}", command.as_str()), details });
    }
    if command != CniCommand::Add {
        return Ok(CniResult { interfaces: Vec::new(), ips: Vec::new(), routes: Vec::new() });
    }
    let v = parsed.ok_or_else(|| CniError::new(Code::Decode, format!("IPAM plugin {name} printed no JSON result")))?;
    let result = CniResult::from_value(&v, &format!("IPAM plugin {name}'s output"))?;
    if result.ips.is_empty() {
        return Err(CniError::new(Code::Ipam, format!("IPAM plugin {name} assigned no address")));
    }
    Ok(result)
}

/// The gateway for `addr`'s family: the agent's when known (ferry answers ARP/ND for it),
/// else what IPAM said.
pub fn gateway_for(addr: IpAddr, info: Option<&NodeInfo>, ipam_gateway: Option<IpAddr>) -> Option<IpAddr> {
    let agent = info.and_then(|i| if addr.is_ipv4() { i.gateway_v4 } else { i.gateway_v6 });
    agent.or(ipam_gateway).filter(|g| g.is_ipv4() == addr.is_ipv4())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_host_local_config() {
        let info = NodeInfo {
            node_name: "n1".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("net"), "fd00:1::/64".parse().expect("net")],
            gateway_v4: Some("10.244.1.1".parse().expect("ip")),
            gateway_v6: Some("fd00:1::1".parse().expect("ip")),
            gateway_mac: "02:fe:ff:ff:ff:ff".into(),
            mtu: 1450,
            underlay_mtu: None,
            queues: 1,
            pod_port: crate::admin::PodPort::Veth,
            offload: false,
            ipam_data_dir: "/run/ferry/ipam".into(),
        };
        assert_eq!(
            host_local_config(&info),
            json!({
                "type": "host-local",
                "ranges": [
                    [{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}],
                    [{"subnet": "fd00:1::/64", "gateway": "fd00:1::1", "rangeEnd": "fd00:1::ffff:ffff:ffff:fffd"}]
                ],
                "dataDir": "/run/ferry/ipam"
            })
        );
    }
}

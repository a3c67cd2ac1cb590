//! The ADD result (setup side): built by the plugin, printed in the format of the configuration's
//! `cniVersion`, and read back from `prevResult` by CHECK. IPAM results are read with the same
//! types.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{CniError, Code};

/// An interface of the result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: String,
    /// The netns path for an interface inside the container; absent for the host side.
    #[serde(default)]
    pub sandbox: Option<String>,
}

/// An address of the result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpConfig {
    /// Address and prefix length.
    pub address: IpNet,
    /// The default gateway for this address.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface carrying the address.
    #[serde(default)]
    pub interface: Option<usize>,
}

/// A route of the result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RouteConfig {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

/// A CNI result (spec 1.0.0 "Success"; 0.3.x/0.4.0 differ only in the `version` of each IP).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CniResult {
    /// Interfaces created.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes installed.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl CniResult {
    /// Reads a result (an IPAM plugin's output or `prevResult`).
    ///
    /// # Errors
    /// Code 6 naming `what` when `v` is not a result.
    pub fn from_value(v: &Value, what: &str) -> Result<Self, CniError> {
        CniResult::deserialize(v)
            .map_err(|e| CniError::with_source(Code::Decode, format!("{what} is not a CNI result"), &e))
    }

    /// The result as JSON in the format of `cni_version` (`dns` empty: ferry sets no resolver).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let old = cni_version != "1.0.0";
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({ "name": i.name, "mac": i.mac });
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = json!(s);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({ "address": ip.address.to_string() });
                if old {
                    v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
                }
                if let Some(i) = ip.interface {
                    v["interface"] = json!(i);
                }
                if let Some(g) = ip.gateway {
                    v["gateway"] = json!(g.to_string());
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(g) = r.gw {
                    v["gw"] = json!(g.to_string());
                }
                v
            })
            .collect();
        json!({ "cniVersion": cni_version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": {} })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface { name: "fy0123456789a".into(), mac: "02:fe:ff:ff:ff:ff".into(), sandbox: None },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:f4:01:02".into(),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".parse().expect("net"),
                gateway: Some("10.244.1.1".parse().expect("ip")),
                interface: Some(1),
            }],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: Some("10.244.1.1".parse().expect("ip")),
            }],
        }
    }

    #[test]
    fn result_json_shape_1_0_0() {
        let v = sample().to_json("1.0.0");
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "fy0123456789a", "mac": "02:fe:ff:ff:ff:ff"},
                    {"name": "eth0", "mac": "0a:58:0a:f4:01:02", "sandbox": "/run/netns/p"}
                ],
                "ips": [{"address": "10.244.1.2/32", "gateway": "10.244.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn result_json_shape_0_4_0_has_ip_versions() {
        let v = sample().to_json("0.4.0");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    #[test]
    fn reads_back_its_own_output_and_host_local_output() {
        let s = sample();
        assert_eq!(CniResult::from_value(&s.to_json("1.0.0"), "prevResult").expect("own"), s);
        assert_eq!(CniResult::from_value(&s.to_json("0.3.1"), "prevResult").expect("old"), s);
        let hl = json!({"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1"}],"dns":{}});
        let r = CniResult::from_value(&hl, "host-local's result").expect("host-local");
        assert_eq!(r.ips[0].address, "10.244.1.5/24".parse::<IpNet>().expect("net"));
        assert_eq!(r.ips[0].interface, None);
        let e = CniResult::from_value(&json!({"ips":[{"address":"x"}]}), "host-local's result").expect_err("bad");
        assert_eq!(e.code, 6);
    }
}

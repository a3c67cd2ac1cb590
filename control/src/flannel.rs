//! Flannel's conventions (control side), so that ferry and Flannel nodes can find each other:
//! the Node annotations of Flannel's Kubernetes subnet manager, and the etcd layout of its etcd
//! subnet manager (network config, subnet leases, lease attributes).
//!
//! Only formats live here; the sources do the I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_encap::{MacAddr, TunnelKind};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value, json};

use crate::model::{check_vni, parse_tunnel, parse_vtep_mac};

/// Node annotation: the node's underlay address.
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Node annotation: the node's IPv6 underlay address (a dual-stack Flannel node).
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
/// Node annotation: the backend (`vxlan`, ...).
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// Node annotation: backend data, JSON (`{"VNI":1,"VtepMAC":"..."}` for VXLAN).
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

/// Flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Flannel's VXLAN port (the Linux kernel's historical default), used when an etcd network config
/// names no port.
pub const FLANNEL_VXLAN_PORT: u16 = 8472;

/// What backend data carries for ferry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendData {
    /// `VNI`.
    pub vni: Option<u32>,
    /// `VtepMAC`.
    pub vtep_mac: Option<MacAddr>,
}

impl BackendData {
    /// Parses backend data from its JSON value; `null` or absent fields give `None`s.
    ///
    /// # Errors
    /// A reason naming the sub-field (`VNI: ...`, `VtepMAC: ...`).
    pub fn from_value(v: &Value) -> Result<Self, String> {
        let obj = match v {
            Value::Null => return Ok(BackendData::default()),
            Value::Object(o) => o,
            other => return Err(format!("expected a JSON object, found {other}")),
        };
        let vni = match obj.get("VNI") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .ok_or_else(|| format!("VNI: {n} is not a VNI"))
                    .and_then(|n| check_vni(n).map_err(|e| format!("VNI: {e}")))?,
            ),
            Some(other) => return Err(format!("VNI: expected a number, found {other}")),
        };
        let vtep_mac = match obj.get("VtepMAC") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(parse_vtep_mac(s).map_err(|e| format!("VtepMAC: {e}"))?),
            Some(other) => return Err(format!("VtepMAC: expected a string, found {other}")),
        };
        Ok(BackendData { vni, vtep_mac })
    }

    /// Parses the backend-data annotation's text.
    ///
    /// # Errors
    /// A reason: not JSON, or a bad sub-field.
    pub fn from_annotation(s: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(s).map_err(|e| format!("not JSON ({e})"))?;
        Self::from_value(&v)
    }

    /// The JSON value Flannel writes.
    pub fn to_value(self) -> Value {
        let mut m = Map::new();
        if let Some(vni) = self.vni {
            m.insert("VNI".into(), json!(vni));
        }
        if let Some(mac) = self.vtep_mac {
            m.insert("VtepMAC".into(), json!(mac.to_string()));
        }
        Value::Object(m)
    }
}

/// Flannel's network config (`<prefix>/config`), the fields ferry uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `Network`: the IPv4 cluster network.
    pub network: Ipv4Net,
    /// `SubnetLen`: the per-node subnet length.
    pub subnet_len: u8,
    /// `SubnetMin`: first allocatable subnet.
    pub subnet_min: Ipv4Addr,
    /// `SubnetMax`: last allocatable subnet.
    pub subnet_max: Ipv4Addr,
    /// `IPv6Network`, when set.
    pub ipv6_network: Option<IpNet>,
    /// With `EnableIPv6: true` and `IPv6Network`: the IPv6 network nodes lease subnets of
    /// `IPv6SubnetLen` (default 64) from, beside their IPv4 ones (dual-stack leases).
    pub ipv6_leases: Option<(Ipv6Net, u8)>,
    /// `Backend.Type`.
    pub backend: TunnelKind,
    /// `Backend.VNI` (default 1).
    pub vni: u32,
    /// `Backend.Port`, when set.
    pub port: Option<u16>,
}

impl NetworkConfig {
    /// Parses the config JSON with Flannel's defaults: `SubnetLen` 24 (a quarter of the network
    /// when it is narrower than /22), `SubnetMin` the second subnet, `SubnetMax` the last one,
    /// backend `vxlan`, VNI 1.
    ///
    /// # Errors
    /// A reason naming the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let network: Ipv4Net = v
            .get("Network")
            .and_then(Value::as_str)
            .ok_or("Network: missing")?
            .parse()
            .map_err(|_| "Network: not an IPv4 CIDR".to_owned())?;
        let network = network.trunc();
        let subnet_len = match v.get("SubnetLen").and_then(Value::as_u64) {
            Some(n) => u8::try_from(n).map_err(|_| format!("SubnetLen: {n} is too long"))?,
            // Flannel: a /24 per node when the network is /22 or wider, else a quarter of it.
            None if network.prefix_len() > 22 => network.prefix_len() + 2,
            None => 24,
        };
        if subnet_len > 30 || subnet_len <= network.prefix_len() {
            return Err(format!("SubnetLen: /{subnet_len} does not fit in Network {network}"));
        }
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast()) - (size - 1);
        let addr_field = |name: &str, default: u32| -> Result<Ipv4Addr, String> {
            match v.get(name).and_then(Value::as_str) {
                None => Ok(Ipv4Addr::from(default)),
                Some(s) => {
                    let a: Ipv4Addr = s.parse().map_err(|_| format!("{name}: {s:?} is not an IPv4 address"))?;
                    if !network.contains(&a) || u32::from(a) % size != 0 {
                        return Err(format!("{name}: {a} is not a /{subnet_len} subnet of {network}"));
                    }
                    Ok(a)
                }
            }
        };
        let subnet_min = addr_field("SubnetMin", first + size)?;
        let subnet_max = addr_field("SubnetMax", last)?;
        let ipv6_network = match v.get("IPv6Network").and_then(Value::as_str) {
            None => None,
            Some(s) => Some(s.parse::<IpNet>().map_err(|_| format!("IPv6Network: {s:?} is not a CIDR"))?.trunc()),
        };
        let ipv6_leases = match (v.get("EnableIPv6").and_then(Value::as_bool), ipv6_network) {
            (Some(true), Some(IpNet::V6(net6))) => {
                let len = match v.get("IPv6SubnetLen").and_then(Value::as_u64) {
                    None => 64,
                    Some(n) => u8::try_from(n).map_err(|_| format!("IPv6SubnetLen: {n} is too long"))?,
                };
                if len > 126 || len <= net6.prefix_len() {
                    return Err(format!("IPv6SubnetLen: /{len} does not fit in IPv6Network {net6}"));
                }
                Some((net6, len))
            }
            (Some(true), _) => return Err("IPv6Network: EnableIPv6 needs an IPv6 CIDR here".into()),
            _ => None,
        };
        let backend = v.get("Backend");
        let kind = match backend.and_then(|b| b.get("Type")).and_then(Value::as_str) {
            None => TunnelKind::Vxlan,
            Some(t) => parse_tunnel(t).map_err(|e| format!("Backend.Type: {e}"))?,
        };
        let vni = match backend.and_then(|b| b.get("VNI")) {
            None => 1,
            Some(n) => n
                .as_u64()
                .ok_or_else(|| format!("Backend.VNI: {n} is not a number"))
                .and_then(|n| check_vni(n).map_err(|e| format!("Backend.VNI: {e}")))?,
        };
        let port = match backend.and_then(|b| b.get("Port")) {
            None => None,
            Some(p) => Some(
                p.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("Backend.Port: {p} is not a port"))?,
            ),
        };
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6_network,
            ipv6_leases,
            backend: kind,
            vni,
            port,
        })
    }

    /// The networks pod CIDRs must lie in.
    pub fn networks(&self) -> Vec<IpNet> {
        let mut v = vec![IpNet::V4(self.network)];
        v.extend(self.ipv6_network);
        v
    }

    /// The IPv6 subnet leased with the IPv4 `subnet` on a dual-stack network: the one with the same
    /// index in `IPv6Network` as `subnet` has in `Network`, so that a lease's IPv4 key (taken with a
    /// create-if-absent transaction) makes its IPv6 subnet unique too. `None` on an IPv4-only
    /// network, or where the IPv6 network has too few subnets.
    pub fn ipv6_subnet_for(&self, subnet: Ipv4Net) -> Option<Ipv6Net> {
        let (net6, len6) = self.ipv6_leases?;
        let index = (u32::from(subnet.network()) - u32::from(self.network.network())) >> (32 - self.subnet_len);
        let shift = 128 - u32::from(len6);
        let room = u32::from(len6 - net6.prefix_len());
        if room < 32 && index >> room != 0 {
            return None;
        }
        let base = u128::from(net6.network());
        Ipv6Net::new(Ipv6Addr::from(base + (u128::from(index) << shift)), len6).ok()
    }

    /// Allocatable subnets from `SubnetMin` to `SubnetMax`, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u64 << (32 - self.subnet_len);
        let min = u64::from(u32::from(self.subnet_min));
        let max = u64::from(u32::from(self.subnet_max));
        (min..=max).step_by(usize::try_from(size).unwrap_or(usize::MAX)).filter_map(move |a| {
            let a = u32::try_from(a).ok()?;
            Ipv4Net::new(Ipv4Addr::from(a), self.subnet_len).ok()
        })
    }
}

/// The etcd key suffix of a subnet lease: `10.5.34.0-24`, or with its IPv6 subnet on a dual-stack
/// network `10.5.34.0-24&fc00:0:0:22::-64` (Flannel's `MakeSubnetKey`).
pub fn subnet_key(net: Ipv4Net, net6: Option<Ipv6Net>) -> String {
    match net6 {
        None => format!("{}-{}", net.network(), net.prefix_len()),
        Some(n6) => format!("{}-{}&{}-{}", net.network(), net.prefix_len(), n6.network(), n6.prefix_len()),
    }
}

/// Parses a lease key suffix (`10.5.34.0-24`, or dual stack `10.5.34.0-24&fc00:0:0:22::-64`).
///
/// # Errors
/// A reason when it is not a subnet.
pub fn parse_subnet_key(s: &str) -> Result<(Ipv4Net, Option<Ipv6Net>), String> {
    let four = |s: &str| match parse_subnet(s)? {
        IpNet::V4(n) => Ok(n),
        IpNet::V6(_) => Err(format!("{s:?} is not an IPv4 subnet")),
    };
    let six = |s: &str| match parse_subnet(s)? {
        IpNet::V6(n) => Ok(n),
        IpNet::V4(_) => Err(format!("{s:?} is not an IPv6 subnet")),
    };
    match s.split_once('&') {
        None => Ok((four(s)?, None)),
        Some((v4, v6)) => Ok((four(v4)?, Some(six(v6)?))),
    }
}

/// One `ADDRESS-LENGTH` subnet of a lease key, without host bits.
fn parse_subnet(s: &str) -> Result<IpNet, String> {
    let (addr, len) = s.rsplit_once('-').ok_or_else(|| format!("{s:?} is not ADDRESS-LENGTH"))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
    let net = IpNet::new(addr, len).map_err(|_| format!("{s:?}: /{len} is too long"))?;
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set"));
    }
    Ok(net)
}

/// A lease's attributes (the value under `<prefix>/subnets/<key>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// `PublicIP`.
    pub public_ip: IpAddr,
    /// `BackendType`.
    pub backend: TunnelKind,
    /// `BackendData`.
    pub data: BackendData,
    /// `PublicIPv6` (null or absent: none). ferry tunnels both families to the node's `PublicIP`.
    pub public_ipv6: Option<Ipv6Addr>,
}

/// Why a lease value was refused: the field and the reason.
pub type FieldError = (&'static str, String);

impl LeaseAttrs {
    /// Parses a lease value.
    ///
    /// # Errors
    /// The offending field (`PublicIP`, `BackendType`, `BackendData`, or `value` when it is not
    /// JSON) and a reason.
    pub fn parse(text: &[u8], default_backend: TunnelKind) -> Result<Self, FieldError> {
        let v: Value = serde_json::from_slice(text).map_err(|e| ("value", format!("not JSON ({e})")))?;
        let public_ip = v
            .get("PublicIP")
            .and_then(Value::as_str)
            .ok_or(("PublicIP", "missing".to_owned()))?
            .parse()
            .map_err(|_| ("PublicIP", "not an IP address".to_owned()))?;
        let backend = match v.get("BackendType").and_then(Value::as_str) {
            None | Some("") => default_backend,
            Some(t) => parse_tunnel(t).map_err(|e| ("BackendType", e))?,
        };
        let data =
            BackendData::from_value(v.get("BackendData").unwrap_or(&Value::Null)).map_err(|e| ("BackendData", e))?;
        let public_ipv6 = match v.get("PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(Value::String(a)) => {
                Some(a.parse().map_err(|_| ("PublicIPv6", format!("{a:?} is not an IPv6 address")))?)
            }
            Some(other) => return Err(("PublicIPv6", format!("expected a string or null, found {other}"))),
        };
        Ok(LeaseAttrs { public_ip, backend, data, public_ipv6 })
    }

    /// The JSON value Flannel writes.
    pub fn to_json(&self) -> String {
        json!({
            "PublicIP": self.public_ip.to_string(),
            "PublicIPv6": self.public_ipv6.map(|a| a.to_string()),
            "BackendType": self.backend.name(),
            "BackendData": self.data.to_value(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_data_fields() {
        let d = BackendData::from_annotation(r#"{"VNI":1,"VtepMAC":"6e:3a:52:15:64:80"}"#).expect("parses");
        assert_eq!(d.vni, Some(1));
        assert_eq!(d.vtep_mac.map(|m| m.to_string()).as_deref(), Some("6e:3a:52:15:64:80"));
        assert_eq!(BackendData::from_annotation("null"), Ok(BackendData::default()));
        assert!(BackendData::from_annotation("{").expect_err("not json").starts_with("not JSON"));
        assert!(BackendData::from_annotation(r#"{"VtepMAC":"nope"}"#).expect_err("mac").starts_with("VtepMAC:"));
        assert!(BackendData::from_annotation(r#"{"VNI":16777216}"#).expect_err("vni").starts_with("VNI:"));
        assert_eq!(BackendData::from_value(&d.to_value()), Ok(d));
    }

    #[test]
    fn network_config_defaults_and_errors() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).expect("parses");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 0));
        assert_eq!(c.vni, 1);
        assert_eq!(c.port, None);
        let subnets: Vec<_> = c.subnets().collect();
        assert_eq!(subnets.len(), 255);
        assert_eq!(subnets[0].to_string(), "10.5.1.0/24");
        let c = NetworkConfig::parse(
            r#"{"Network":"10.6.1.0/24","SubnetMin":"10.6.1.64","SubnetMax":"10.6.1.128","Backend":{"Type":"geneve","VNI":7,"Port":6081}}"#,
        )
        .expect("parses");
        assert_eq!((c.subnet_len, c.backend, c.vni, c.port), (26, TunnelKind::Geneve, 7, Some(6081)));
        assert_eq!(c.subnets().map(|n| n.to_string()).collect::<Vec<_>>(), ["10.6.1.64/26", "10.6.1.128/26"]);
        // Dual stack: IPv6 subnets leased beside the IPv4 ones, index for index.
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .expect("parses");
        let four: Ipv4Net = "10.244.3.0/24".parse().expect("net");
        assert_eq!(c.ipv6_subnet_for(four).map(|n| n.to_string()).as_deref(), Some("fd00:10:244:3::/64"));
        let off =
            NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/48"}"#).expect("parses");
        assert_eq!(off.ipv6_subnet_for(four), None, "IPv6 leases only with EnableIPv6");
        let narrow = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/62"}"#)
            .expect("parses");
        assert_eq!(narrow.ipv6_subnet_for(four).map(|n| n.to_string()).as_deref(), Some("fd00:0:0:3::/64"));
        assert_eq!(narrow.ipv6_subnet_for("10.244.4.0/24".parse().expect("net")), None, "no fifth /64 in a /62");
        let c = NetworkConfig::parse(r#"{"Network":"10.7.0.0/22"}"#).expect("parses");
        assert_eq!((c.subnet_len, c.subnets().count()), (24, 3));
        for (bad, field) in [
            ("{}", "Network"),
            (r#"{"Network":"x"}"#, "Network"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":8}"#, "SubnetLen"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#, "SubnetMin"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#, "Backend.Type"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#, "IPv6Network"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/64"}"#, "IPv6SubnetLen"),
        ] {
            let e = NetworkConfig::parse(bad).expect_err(bad);
            assert!(e.starts_with(field), "{bad}: {e}");
        }
    }

    #[test]
    fn lease_keys_and_values() {
        let (n, none) = parse_subnet_key("10.5.34.0-24").expect("key");
        assert_eq!((n.to_string(), none), ("10.5.34.0/24".to_owned(), None));
        assert_eq!(subnet_key(n, None), "10.5.34.0-24");
        assert!(parse_subnet_key("10.5.34.1-24").is_err());
        assert!(parse_subnet_key("garbage").is_err());
        // Dual stack, as Flannel writes it.
        let (n, six) = parse_subnet_key("10.5.34.0-24&fc00:0:0:22::-64").expect("dual-stack key");
        assert_eq!(
            (n.to_string(), six.map(|s| s.to_string())),
            ("10.5.34.0/24".into(), Some("fc00:0:0:22::/64".into()))
        );
        assert_eq!(subnet_key(n, six), "10.5.34.0-24&fc00:0:0:22::-64");
        for bad in [
            "10.5.34.0-24&",
            "10.5.34.0-24&fc00::1-64",
            "10.5.34.0-24&10.0.0.0-8",
            "10.5.34.0-24&fc00::-129",
            "fc00::-64",
        ] {
            assert!(parse_subnet_key(bad).is_err(), "{bad}");
        }
        let a = LeaseAttrs::parse(
            br#"{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:42:c0:00:02:07"}}"#,
            TunnelKind::Vxlan,
        )
        .expect("lease");
        assert_eq!(a.public_ip, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(a.public_ipv6, None);
        let d = LeaseAttrs::parse(br#"{"PublicIP":"192.0.2.7","PublicIPv6":"2001:db8::7"}"#, TunnelKind::Vxlan)
            .expect("dual");
        assert_eq!(d.public_ipv6, Some("2001:db8::7".parse().expect("ip")));
        assert_eq!(LeaseAttrs::parse(d.to_json().as_bytes(), TunnelKind::Vxlan), Ok(d));
        assert_eq!(
            LeaseAttrs::parse(br#"{"PublicIP":"192.0.2.7","PublicIPv6":"nope"}"#, TunnelKind::Vxlan).map_err(|e| e.0),
            Err("PublicIPv6")
        );
        assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes(), TunnelKind::Vxlan), Ok(a));
        assert_eq!(LeaseAttrs::parse(b"{}", TunnelKind::Vxlan).map_err(|e| e.0), Err("PublicIP"));
        assert_eq!(LeaseAttrs::parse(b"nope", TunnelKind::Vxlan).map_err(|e| e.0), Err("value"));
        assert_eq!(
            LeaseAttrs::parse(br#"{"PublicIP":"192.0.2.7","BackendType":"host-gw"}"#, TunnelKind::Vxlan)
                .map_err(|e| e.0),
            Err("BackendType")
        );
    }
}

//! What the runtime hands the plugin (setup side): the network configuration on stdin and the
//! `CNI_*` environment, validated into [`NetConf`] and [`Env`] with the spec's error codes
//! (6 for JSON that does not parse, 7 naming the bad field, 1 for an unsupported version, 4 for
//! the environment).

use std::path::PathBuf;

use serde_json::Value;

use super::error::{CniError, Code};
use crate::admin::DEFAULT_SOCKET;

/// The CNI versions this plugin speaks (results and errors in each one's format).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Where the plugin remembers, per container, the IPAM configuration it delegated with, so a DEL
/// can release the address while the agent is down (Flannel keeps its delegate config the same way).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/ferry";

/// The network configuration (stdin), as far as ferry reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name`: the network's name (host-local keys its allocations by it).
    pub name: String,
    /// `adminSocket`: the agent's admin socket (default [`DEFAULT_SOCKET`]).
    pub admin_socket: PathBuf,
    /// `dataDir`: the plugin's own state (default [`DEFAULT_DATA_DIR`]).
    pub data_dir: PathBuf,
    /// `ipam`: an IPAM configuration to delegate as is, instead of host-local over the agent's
    /// pod CIDRs. An object with a string `type`.
    pub ipam: Option<Value>,
    /// `prevResult`: the result of the previous ADD (CHECK, DEL).
    pub prev_result: Option<Value>,
}

fn invalid(field: &str, what: &str) -> CniError {
    CniError::new(Code::InvalidConfig, format!("network configuration: \"{field}\" {what}"))
}

fn opt_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, CniError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

fn req_str<'a>(v: &'a Value, field: &str) -> Result<&'a str, CniError> {
    match opt_str(v, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(invalid(field, "is required (a non-empty string)")),
    }
}

/// Whether `version` is one this plugin speaks.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Whether `version` is at least 0.4.0 (CHECK exists from 0.4.0 on).
pub fn has_check(version: &str) -> bool {
    matches!(version, "0.4.0" | "1.0.0")
}

impl NetConf {
    /// Parses stdin's bytes.
    ///
    /// # Errors
    /// Code 6 for bytes that are not a JSON object, 1 for an unsupported `cniVersion`, 7 naming
    /// the first missing or malformed field.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::with_source(Code::Decode, "network configuration is not valid JSON", &e))?;
        if !v.is_object() {
            return Err(CniError::new(Code::Decode, "network configuration is not a JSON object"));
        }
        let cni_version = req_str(&v, "cniVersion")?.to_owned();
        if !is_supported(&cni_version) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("CNI version {cni_version} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let name = req_str(&v, "name")?.to_owned();
        req_str(&v, "type")?;
        let admin_socket = PathBuf::from(opt_str(&v, "adminSocket")?.unwrap_or(DEFAULT_SOCKET));
        let data_dir = PathBuf::from(opt_str(&v, "dataDir")?.unwrap_or(DEFAULT_DATA_DIR));
        let ipam = match v.get("ipam") {
            None | Some(Value::Null) => None,
            Some(ipam @ Value::Object(map)) => {
                // An empty object means "no IPAM of your own": the default.
                if map.is_empty() {
                    None
                } else {
                    match map.get("type") {
                        Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => Some(ipam.clone()),
                        _ => return Err(invalid("ipam.type", "is required (the IPAM plugin's name)")),
                    }
                }
            }
            Some(_) => return Err(invalid("ipam", "must be an object")),
        };
        let prev_result = match v.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(_) => return Err(invalid("prevResult", "must be an object")),
        };
        Ok(NetConf { cni_version, name, admin_socket, data_dir, ipam, prev_result })
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Wire a container.
    Add,
    /// Unwire it.
    Del,
    /// Verify the wiring.
    Check,
    /// Report the supported versions.
    Version,
}

impl Command {
    /// The spec's name of the command.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// The validated `CNI_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (optional for DEL, absent for VERSION).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty for VERSION).
    pub ifname: String,
    /// `CNI_ARGS` as `KEY=VALUE` pairs.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`: where to look for the IPAM plugin.
    pub path: Vec<PathBuf>,
}

fn invalid_env(var: &str, what: &str) -> CniError {
    CniError::new(Code::InvalidEnv, format!("environment: {var} {what}"))
}

/// Whether `name` can be an interface name (the kernel's `dev_valid_name`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

impl Env {
    /// Validates the environment given by `get` (`std::env::var` in the binary).
    ///
    /// # Errors
    /// Code 4 naming the first missing or invalid variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(invalid_env("CNI_COMMAND", &format!("is {other:?}: not ADD, DEL, CHECK or VERSION")));
            }
            None => return Err(invalid_env("CNI_COMMAND", "is not set")),
        };
        if command == Command::Version {
            return Ok(Env {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: Vec::new(),
                path: Vec::new(),
            });
        }
        let container_id = get("CNI_CONTAINERID").ok_or_else(|| invalid_env("CNI_CONTAINERID", "is not set"))?;
        if !container_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(invalid_env("CNI_CONTAINERID", "may only hold letters, digits, '_', '.' and '-'"));
        }
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if netns.is_none() && command != Command::Del {
            return Err(invalid_env("CNI_NETNS", "is not set"));
        }
        let ifname = get("CNI_IFNAME").ok_or_else(|| invalid_env("CNI_IFNAME", "is not set"))?;
        if !valid_ifname(&ifname) {
            return Err(invalid_env("CNI_IFNAME", &format!("{ifname:?} is not a valid interface name")));
        }
        let mut args = Vec::new();
        for pair in get("CNI_ARGS").unwrap_or_default().split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(invalid_env("CNI_ARGS", &format!("has {pair:?}, not KEY=VALUE")));
            };
            args.push((k.to_owned(), v.to_owned()));
        }
        let path: Vec<PathBuf> =
            get("CNI_PATH").unwrap_or_default().split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
        if path.is_empty() {
            return Err(invalid_env("CNI_PATH", "is not set (the directories of the IPAM plugin)"));
        }
        Ok(Env { command, container_id, netns, ifname, args, path })
    }

    /// The pod's identity towards the agent: `<CNI_CONTAINERID>/<CNI_IFNAME>`.
    pub fn pod_id(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }

    /// A `CNI_ARGS` value (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`), if given and not empty.
    pub fn arg(&self, key: &str) -> Option<String> {
        self.args.iter().find(|(k, v)| k == key && !v.is_empty()).map(|(_, v)| v.clone())
    }
}

/// The host-side veth's name for a container's interface: `fy` and 11 hex digits of a stable hash
/// of `<container id>/<ifname>` (13 characters; the kernel allows 15). FNV-1a is spelled out here
/// rather than taken from `std`'s hasher, whose output may change between Rust releases: a DEL run
/// by a newer plugin must find the veth an older one created.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fy{:011x}", h >> 20)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/p1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    #[test]
    fn parses_minimal_netconf_with_defaults() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni"}"#).expect("valid");
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.name, "ferry");
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.ipam, None);
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn parses_full_netconf() {
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"ferry-cni","adminSocket":"/tmp/a.sock","dataDir":"/tmp/d",
                "ipam":{"type":"static","addresses":[]},"prevResult":{"ips":[]},"unknownField":1}"#,
        )
        .expect("valid");
        assert_eq!(c.admin_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(c.ipam.as_ref().and_then(|i| i["type"].as_str()), Some("static"));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn bad_netconf_names_the_field() {
        for (input, code, field) in [
            (&br#"{"cniVersion":"1.0.0","type":"ferry-cni"}"#[..], 7, "\"name\""),
            (br#"{"cniVersion":"1.0.0","name":"","type":"ferry-cni"}"#, 7, "\"name\""),
            (br#"{"cniVersion":"1.0.0","name":"n"}"#, 7, "\"type\""),
            (br#"{"name":"n","type":"t"}"#, 7, "\"cniVersion\""),
            (br#"{"cniVersion":1,"name":"n","type":"t"}"#, 7, "\"cniVersion\""),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","adminSocket":5}"#, 7, "\"adminSocket\""),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":[]}"#, 7, "\"ipam\""),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"x"}}"#, 7, "\"ipam.type\""),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":"x"}"#, 7, "\"prevResult\""),
            (br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#, 1, "0.2.0"),
            (br#"{"cniVersion":"#, 6, "JSON"),
            (br#"[1]"#, 6, "object"),
        ] {
            let e = NetConf::parse(input).expect_err(&String::from_utf8_lossy(input));
            assert_eq!(e.code, code, "{e}");
            assert!(e.msg.contains(field), "{:?} should name {field}", e.msg);
        }
    }

    #[test]
    fn valid_env() {
        let e = env(ADD).expect("valid");
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.netns, Some(PathBuf::from("/var/run/netns/p1")));
        assert_eq!(e.path, vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
        assert_eq!(e.args[1], ("K8S_POD_NAME".to_owned(), "web".to_owned()));
        assert_eq!(e.pod_id(), "abc123/eth0");
        // DEL without a netns (the runtime lost it) and VERSION alone are fine.
        let del: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .map(|(k, v)| if k == "CNI_COMMAND" { (k, "DEL") } else { (k, v) })
            .collect();
        assert_eq!(env(&del).expect("DEL without netns").netns, None);
        assert_eq!(env(&[("CNI_COMMAND", "VERSION")]).expect("VERSION").command, Command::Version);
    }

    #[test]
    fn invalid_env_is_code_4_naming_the_variable() {
        let without = |var: &str| ADD.iter().copied().filter(|(k, _)| *k != var).collect::<Vec<_>>();
        let with = |var: &str, val: &'static str| {
            ADD.iter().copied().map(|(k, v)| if k == var { (k, val) } else { (k, v) }).collect::<Vec<_>>()
        };
        for (pairs, var) in [
            (without("CNI_COMMAND"), "CNI_COMMAND"),
            (with("CNI_COMMAND", "FROB"), "CNI_COMMAND"),
            (without("CNI_CONTAINERID"), "CNI_CONTAINERID"),
            (with("CNI_CONTAINERID", "a/b"), "CNI_CONTAINERID"),
            (without("CNI_NETNS"), "CNI_NETNS"),
            (without("CNI_IFNAME"), "CNI_IFNAME"),
            (with("CNI_IFNAME", "averyveryverylongname"), "CNI_IFNAME"),
            (with("CNI_IFNAME", "a/b"), "CNI_IFNAME"),
            (with("CNI_ARGS", "novalue"), "CNI_ARGS"),
            (without("CNI_PATH"), "CNI_PATH"),
        ] {
            let e = env(&pairs).expect_err(var);
            assert_eq!(e.code, 4, "{e}");
            assert!(e.msg.contains(var), "{:?} should name {var}", e.msg);
        }
    }

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = host_ifname("abc123", "eth0");
        assert_eq!(a, host_ifname("abc123", "eth0"));
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("fy") && a[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(valid_ifname(&a));
        assert_ne!(a, host_ifname("abc123", "eth1"));
        assert_ne!(a, host_ifname("abc124", "eth0"));
        // "ab" + "/c" and "a" + "b/c" must not collide through the separator.
        assert_ne!(host_ifname("ab", "c"), host_ifname("a", "bc"));
        // Pinned: a change here renames existing pods' veths and breaks their DEL.
        assert_eq!(host_ifname("abc123", "eth0"), FNV_PINNED);
    }

    const FNV_PINNED: &str = "fy2b5118d26ad";
}

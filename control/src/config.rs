//! The control plane's configuration (control side), and the command-line flags that build it
//! ([`ControlArgs`], meant to be `#[command(flatten)]`ed into the `ferry` binary).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ferry_encap::{MacAddr, TunnelKind};
use ipnet::IpNet;

use crate::flannel;

/// How to reach and authenticate to a Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeAuth {
    /// `$KUBECONFIG` / `~/.kube/config`, else the in-cluster service account.
    Infer,
    /// This kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// A server URL and a bearer token read from a file (re-read when it changes, as projected
    /// service-account tokens do).
    Token {
        /// `https://host:port`.
        server: String,
        /// File holding the token.
        token_file: PathBuf,
        /// CA bundle (PEM) that signed the server's certificate; `None`: system roots.
        ca_file: Option<PathBuf>,
        /// Skip server certificate verification (labs and tests only).
        insecure: bool,
    },
}

/// The Kubernetes source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// Credentials.
    pub auth: KubeAuth,
    /// Write this node's Flannel-compatible annotations (public IP, VTEP MAC, tunnel type) so
    /// that other nodes, ferry or Flannel, can reach it.
    pub announce: bool,
}

/// The Flannel-compatible etcd source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix (Flannel's default `/coreos.com/network`).
    pub prefix: String,
    /// Take (allocate or reuse), renew and release this node's own subnet lease.
    pub take_lease: bool,
    /// The lease's TTL (Flannel uses 24 h); renewed at a third of it.
    pub lease_ttl: Duration,
}

/// Everything the control plane needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// This node's name (a Kubernetes Node name; in a static file, the entry that is local).
    pub node_name: String,
    /// This node's underlay address, announced to other nodes.
    pub public_ip: Option<IpAddr>,
    /// Its IPv6 underlay address besides an IPv4 `public_ip` (a node with both families),
    /// announced too: Flannel's `PublicIPv6` and `public-ipv6` annotation.
    pub public_ipv6: Option<Ipv6Addr>,
    /// This node's VTEP MAC, announced to other nodes.
    pub vtep_mac: Option<MacAddr>,
    /// Default VNI for nodes that do not announce one, and the VNI this node announces.
    pub vni: u32,
    /// Default tunnel type for nodes that do not announce one, and the one this node announces.
    pub tunnel: TunnelKind,
    /// Tunnel UDP port; `None`: the tunnel's IANA port (VXLAN 4789, Geneve 6081). Flannel's
    /// VXLAN nodes listen on 8472.
    pub tunnel_port: Option<u16>,
    /// Networks every pod CIDR must lie in (empty: no check unless a source announces one).
    pub cluster_cidrs: Vec<IpNet>,
    /// Kubernetes source.
    pub kube: Option<KubeConfig>,
    /// etcd source.
    pub etcd: Option<EtcdConfig>,
    /// Static file source.
    pub static_file: Option<PathBuf>,
    /// Prometheus endpoint; off when `None`.
    pub metrics_addr: Option<SocketAddr>,
}

impl ControlConfig {
    /// A configuration with no source: add at least one.
    pub fn new(node_name: impl Into<String>) -> Self {
        ControlConfig {
            node_name: node_name.into(),
            public_ip: None,
            public_ipv6: None,
            vtep_mac: None,
            vni: 1,
            tunnel: TunnelKind::Vxlan,
            tunnel_port: None,
            cluster_cidrs: Vec::new(),
            kube: None,
            etcd: None,
            static_file: None,
            metrics_addr: None,
        }
    }

    /// The port tunnels use when a source does not say.
    pub fn default_port(&self) -> u16 {
        self.tunnel_port.unwrap_or(self.tunnel.default_port())
    }
}

/// A configuration mistake: names the flag and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No source configured.
    #[error("no route source: give --kube, --etcd-endpoints or --static-routes")]
    NoSource,
    /// A flag is missing for what was asked.
    #[error("{flag} is required {why}")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
    /// A flag's value is invalid.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Control-plane flags of the `ferry` binary.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// This node's name (its Kubernetes Node name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// This node's underlay address, announced to other nodes.
    #[arg(long)]
    pub public_ip: Option<IpAddr>,
    /// This node's VTEP MAC, announced to other nodes.
    #[arg(long)]
    pub vtep_mac: Option<MacAddr>,
    /// VNI (announced, and the default for nodes that announce none).
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// Tunnel type: vxlan or geneve.
    #[arg(long, default_value = "vxlan", value_parser = parse_tunnel_arg)]
    pub tunnel: TunnelKind,
    /// Tunnel UDP port (default: 4789 for VXLAN, 6081 for Geneve; Flannel's VXLAN uses 8472).
    #[arg(long)]
    pub tunnel_port: Option<u16>,
    /// A network every pod CIDR must lie in (repeat for IPv4 and IPv6).
    #[arg(long = "cluster-cidr")]
    pub cluster_cidrs: Vec<IpNet>,
    /// Learn routes from Kubernetes Node objects.
    #[arg(long)]
    pub kube: bool,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, with --kube-token-file instead of a kubeconfig.
    #[arg(long, requires_all = ["kube", "kube_token_file"], conflicts_with = "kubeconfig")]
    pub kube_server: Option<String>,
    /// File holding a bearer token for --kube-server.
    #[arg(long, requires = "kube_server")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle (PEM) for --kube-server.
    #[arg(long, requires = "kube_server")]
    pub kube_ca_file: Option<PathBuf>,
    /// Do not verify --kube-server's certificate (labs only).
    #[arg(long, requires = "kube_server")]
    pub kube_insecure: bool,
    /// Do not write this node's annotations.
    #[arg(long, requires = "kube")]
    pub no_announce: bool,
    /// etcd client URLs, comma-separated: learn routes from Flannel-style subnet leases.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix.
    #[arg(long, default_value = flannel::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Do not take a subnet lease for this node in etcd (read-only).
    #[arg(long)]
    pub etcd_no_lease: bool,
    /// TTL of this node's etcd lease, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub etcd_lease_ttl: u64,
    /// A TOML file of routes, reloaded when it changes.
    #[arg(long)]
    pub static_routes: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (off by default).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

fn parse_tunnel_arg(s: &str) -> Result<TunnelKind, String> {
    crate::model::parse_tunnel(s)
}

impl ControlArgs {
    /// Checks the flags and builds the configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag.
    pub fn into_config(self) -> Result<ControlConfig, ConfigError> {
        let mut c = ControlConfig::new(self.node_name);
        c.public_ip = self.public_ip;
        c.vtep_mac = self.vtep_mac;
        c.vni = crate::model::check_vni(u64::from(self.vni))
            .map_err(|reason| ConfigError::Invalid { flag: "--vni", reason })?;
        c.tunnel = self.tunnel;
        c.tunnel_port = self.tunnel_port;
        c.cluster_cidrs = self.cluster_cidrs.iter().map(IpNet::trunc).collect();
        if self.kube {
            let auth = match (self.kubeconfig, self.kube_server, self.kube_token_file) {
                (Some(path), _, _) => KubeAuth::Kubeconfig(path),
                (None, Some(server), Some(token_file)) => {
                    KubeAuth::Token { server, token_file, ca_file: self.kube_ca_file, insecure: self.kube_insecure }
                }
                (None, Some(_), None) => {
                    return Err(ConfigError::Missing { flag: "--kube-token-file", why: "with --kube-server" });
                }
                (None, None, _) => KubeAuth::Infer,
            };
            let announce = !self.no_announce;
            if announce && c.public_ip.is_none() {
                return Err(ConfigError::Missing {
                    flag: "--public-ip",
                    why: "to announce this node (or pass --no-announce)",
                });
            }
            c.kube = Some(KubeConfig { auth, announce });
        }
        if !self.etcd_endpoints.is_empty() {
            let take_lease = !self.etcd_no_lease;
            if take_lease && c.public_ip.is_none() {
                return Err(ConfigError::Missing {
                    flag: "--public-ip",
                    why: "to take an etcd subnet lease (or pass --etcd-no-lease)",
                });
            }
            if self.etcd_lease_ttl < 3 {
                return Err(ConfigError::Invalid { flag: "--etcd-lease-ttl", reason: "must be at least 3 s".into() });
            }
            c.etcd = Some(EtcdConfig {
                endpoints: self.etcd_endpoints,
                prefix: self.etcd_prefix.trim_end_matches('/').to_owned(),
                take_lease,
                lease_ttl: Duration::from_secs(self.etcd_lease_ttl),
            });
        }
        c.static_file = self.static_routes;
        c.metrics_addr = self.metrics_addr;
        if c.kube.is_none() && c.etcd.is_none() && c.static_file.is_none() {
            return Err(ConfigError::NoSource);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        control: ControlArgs,
    }

    fn parse(args: &[&str]) -> Result<ControlConfig, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("ferry").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        cli.control.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn flags_build_configs_and_name_what_is_wrong() {
        let c = parse(&["--node-name", "n1", "--kube", "--public-ip", "192.0.2.1", "--metrics-addr", "127.0.0.1:9100"])
            .expect("valid");
        assert_eq!(c.kube, Some(KubeConfig { auth: KubeAuth::Infer, announce: true }));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9100".parse().expect("addr")));
        let c = parse(&["--node-name", "n1", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-no-lease"])
            .expect("valid");
        assert_eq!(c.etcd.map(|e| e.prefix), Some("/coreos.com/network".to_owned()));
        assert!(parse(&["--node-name", "n1"]).expect_err("no source").contains("no route source"));
        assert!(parse(&["--node-name", "n1", "--kube"]).expect_err("announce").contains("--public-ip"));
        assert!(
            parse(&["--node-name", "n1", "--static-routes", "r.toml", "--tunnel", "udp"])
                .expect_err("tunnel")
                .contains("udp")
        );
        let c = parse(&[
            "--node-name",
            "n1",
            "--kube",
            "--no-announce",
            "--kube-server",
            "https://127.0.0.1:6443",
            "--kube-token-file",
            "/t",
        ])
        .expect("valid");
        assert!(matches!(c.kube.map(|k| k.auth), Some(KubeAuth::Token { insecure: false, .. })));
    }
}

//! The Flannel-compatible etcd source (control side).
//!
//! Layout (Flannel's etcd subnet manager): the network config at `<prefix>/config`; one lease per
//! node at `<prefix>/subnets/10.5.34.0-24` holding `{"PublicIP", "BackendType", "BackendData"}`,
//! attached to an etcd lease so that it disappears when its node stops renewing it.
//!
//! Each session: read the config (announces the cluster network to the engine), take this node's
//! own lease (reuse the one holding our public IP, else allocate the first free subnet with a
//! create-if-absent transaction), list `<prefix>/subnets/` as a full resync, then watch from the
//! list's revision while renewing our lease at a third of its TTL. Any error ends the session:
//! the source is marked down and a new session starts after a backoff (another full resync; our
//! lease is re-taken, keeping its subnet). Clean shutdown deletes our key and revokes the lease.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use ferry_encap::{MacAddr, TunnelKind};
use ipnet::{IpNet, Ipv4Net};
use tokio::sync::watch;

use super::{Backoff, EventTx};
use crate::config::{ControlConfig, EtcdConfig};
use crate::flannel::{self, BackendData, LeaseAttrs, NetworkConfig, parse_subnet_key, subnet_key};
use crate::metrics::Metrics;
use crate::model::Update;
use crate::model::{NodeSpec, Rejection, Seniority, SourceKind};
use crate::shutdown::{sleep_or_shutdown, stopped};

/// Bound on each unary etcd call, so that a hung server ends the session.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    #[error("network config {key} is missing")]
    NoConfig { key: String },
    #[error("network config {key}: {reason}")]
    BadConfig { key: String, reason: String },
    #[error("no free /{len} subnet left in {network}")]
    Exhausted { network: Ipv4Net, len: u8 },
    #[error("this node's lease {key} was lost ({why})")]
    LeaseLost { key: String, why: &'static str },
    #[error("watch ended ({0})")]
    WatchEnded(String),
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    EngineGone(#[from] super::EngineGone),
}

async fn timed<T>(f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, EtcdError> {
    tokio::time::timeout(CALL_TIMEOUT, f).await.map_err(|_| EtcdError::Timeout(CALL_TIMEOUT))?.map_err(EtcdError::from)
}

/// What this node announces in its lease.
#[derive(Debug, Clone)]
pub(crate) struct Own {
    pub(crate) public_ip: IpAddr,
    pub(crate) public_ipv6: Option<Ipv6Addr>,
    pub(crate) vtep_mac: Option<MacAddr>,
}

/// This node's lease while held.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    name: String,
    lease: i64,
}

/// The etcd source task.
#[derive(Debug)]
pub(crate) struct EtcdSource {
    pub(crate) cfg: EtcdConfig,
    pub(crate) own: Option<Own>,
    /// Port when the network config names none.
    pub(crate) port: Option<u16>,
    pub(crate) tx: EventTx,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The network config we last warned about, so a bad config is logged once.
    warned_config: Option<String>,
}

impl EtcdSource {
    pub(crate) fn new(
        c: &ControlConfig,
        cfg: EtcdConfig,
        tx: EventTx,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let own = if cfg.take_lease {
            c.public_ip.map(|public_ip| Own { public_ip, public_ipv6: c.public_ipv6, vtep_mac: c.vtep_mac })
        } else {
            None
        };
        EtcdSource { cfg, own, port: c.tunnel_port, tx, metrics, shutdown, warned_config: None }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.cfg.prefix)
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut held: Option<Held> = None;
        loop {
            let end = self.session(&mut backoff, &mut held).await;
            match end {
                EtcdError::Shutdown => {
                    if let Some(h) = held.take() {
                        self.release(h).await;
                    }
                    return;
                }
                EtcdError::EngineGone(_) => return,
                e => {
                    self.metrics.set_source_up(SourceKind::Etcd, false);
                    self.metrics.source_reconnect(SourceKind::Etcd);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "etcd source disconnected; forwarding continues on the last tables");
                    if sleep_or_shutdown(delay, &mut self.shutdown).await {
                        if let Some(h) = held.take() {
                            self.release(h).await;
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Deletes our key and revokes its lease (best effort, bounded).
    async fn release(&self, held: Held) {
        let result = async {
            let mut client = self.connect().await?;
            timed(client.delete(held.key.clone(), None)).await?;
            timed(client.lease_revoke(held.lease)).await?;
            Ok::<_, EtcdError>(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(key = %held.key, "released this node's subnet lease"),
            Err(e) => {
                tracing::warn!(key = %held.key, error = %e, "cannot release this node's subnet lease; it expires with its TTL")
            }
        }
    }

    async fn connect(&self) -> Result<Client, EtcdError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        timed(Client::connect(&self.cfg.endpoints, Some(opts))).await
    }

    /// One session; returns why it ended.
    async fn session(&mut self, backoff: &mut Backoff, held: &mut Option<Held>) -> EtcdError {
        match self.session_inner(backoff, held).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(
        &mut self,
        backoff: &mut Backoff,
        held: &mut Option<Held>,
    ) -> Result<std::convert::Infallible, EtcdError> {
        let mut shutdown = self.shutdown.clone();
        let mut client = tokio::select! {
            c = self.connect() => c?,
            _ = stopped(&mut shutdown) => return Err(EtcdError::Shutdown),
        };
        let seen = Instant::now();
        let network = self.network_config(&mut client).await?;
        self.tx.send(seen, Update::Network(SourceKind::Etcd, network.networks())).await?;

        if let Some(own) = self.own.clone() {
            *held = Some(self.take_lease(&mut client, &network, &own, held.as_ref()).await?);
        }
        let own_name = held.as_ref().map(|h| h.name.clone());
        let own_ip = self.own.as_ref().map(|o| o.public_ip);
        let own = own_name.as_deref().zip(own_ip);

        let prefix = self.subnets_prefix();
        let seen = Instant::now();
        let list = timed(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = list.header().map_or(0, |h| h.revision());
        let specs: Vec<_> = list
            .kvs()
            .iter()
            .map(|kv| self.lease_spec(kv.key(), kv.value(), kv.create_revision(), &network, own))
            .collect();
        let n = specs.len();
        self.tx.send(seen, Update::Resync(SourceKind::Etcd, specs)).await?;
        self.metrics.source_event(SourceKind::Etcd);

        let mut stream = timed(
            client.watch(prefix.clone(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))),
        )
        .await?;
        self.metrics.set_source_up(SourceKind::Etcd, true);
        backoff.reset();
        tracing::info!(leases = n, revision, own = ?own_name, "etcd source synced");

        let mut keeper = match held.as_ref() {
            Some(h) => Some(timed(client.lease_keep_alive(h.lease)).await?),
            None => None,
        };
        let renew_every = (self.cfg.lease_ttl / 3).max(Duration::from_secs(1));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return Err(EtcdError::Shutdown),
                msg = stream.message() => {
                    let seen = Instant::now();
                    let Some(resp) = msg? else { return Err(EtcdError::WatchEnded("stream closed".into())) };
                    if resp.canceled() {
                        return Err(EtcdError::WatchEnded(format!(
                            "canceled: {} (compacted at {})", resp.cancel_reason(), resp.compact_revision()
                        )));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let name = String::from_utf8_lossy(kv.key().strip_prefix(prefix.as_bytes()).unwrap_or(kv.key())).into_owned();
                        self.metrics.source_event(SourceKind::Etcd);
                        match ev.event_type() {
                            EventType::Put => {
                                let spec = self.lease_spec(kv.key(), kv.value(), kv.create_revision(), &network, own);
                                let taken_over = own_name.as_deref() == Some(name.as_str()) && !spec.as_ref().is_ok_and(|s| s.local);
                                self.tx.send(seen, Update::Upsert(SourceKind::Etcd, spec)).await?;
                                if taken_over {
                                    return Err(EtcdError::LeaseLost { key: name, why: "overwritten by another node" });
                                }
                            }
                            EventType::Delete => {
                                self.tx.send(seen, Update::Delete(SourceKind::Etcd, name.clone())).await?;
                                if own_name.as_deref() == Some(name.as_str()) {
                                    return Err(EtcdError::LeaseLost { key: name, why: "deleted" });
                                }
                            }
                        }
                    }
                }
                _ = renew.tick(), if keeper.is_some() => {
                    if let (Some((k, s)), Some(h)) = (keeper.as_mut(), held.as_ref()) {
                        timed(k.keep_alive()).await?;
                        let ttl = timed(s.message()).await?.map_or(0, |r| r.ttl());
                        if ttl <= 0 {
                            return Err(EtcdError::LeaseLost { key: h.key.clone(), why: "expired" });
                        }
                        tracing::debug!(key = %h.key, ttl, "renewed this node's subnet lease");
                    }
                }
            }
        }
    }

    async fn network_config(&mut self, client: &mut Client) -> Result<NetworkConfig, EtcdError> {
        let key = format!("{}/config", self.cfg.prefix);
        let resp = timed(client.get(key.clone(), None)).await?;
        let kv = resp.kvs().first().ok_or_else(|| EtcdError::NoConfig { key: key.clone() })?;
        let text = String::from_utf8_lossy(kv.value()).into_owned();
        match NetworkConfig::parse(&text) {
            Ok(c) => {
                self.warned_config = None;
                Ok(c)
            }
            Err(reason) => {
                if self.warned_config.as_deref() != Some(text.as_str()) {
                    self.metrics.rejected(SourceKind::Etcd, "config");
                    self.warned_config = Some(text);
                }
                Err(EtcdError::BadConfig { key, reason })
            }
        }
    }

    /// Reuses the lease holding our public IP (or the one we held), else allocates a free subnet.
    async fn take_lease(
        &self,
        client: &mut Client,
        network: &NetworkConfig,
        own: &Own,
        previous: Option<&Held>,
    ) -> Result<Held, EtcdError> {
        let prefix = self.subnets_prefix();
        let ttl = i64::try_from(self.cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let attrs = LeaseAttrs {
            public_ip: own.public_ip,
            backend: network.backend,
            data: BackendData { vni: Some(network.vni), vtep_mac: own.vtep_mac },
            // A node with both underlay families announces its IPv6 one too; the inner and outer
            // families are independent (each peer tunnels to the family it chooses).
            public_ipv6: own.public_ipv6,
        };
        let value = attrs.to_json();
        let list = timed(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut taken = BTreeSet::new();
        let mut mine = None;
        for kv in list.kvs() {
            let Some(name) = kv.key().strip_prefix(prefix.as_bytes()) else { continue };
            let Ok((subnet, six)) = parse_subnet_key(&String::from_utf8_lossy(name)) else { continue };
            taken.insert(subnet);
            let ours = LeaseAttrs::parse(kv.value(), network.backend).is_ok_and(|a| a.public_ip == own.public_ip);
            // A lease of the network's current shape: on a dual-stack network, one with an IPv6 subnet.
            let shaped = six.is_some() == network.ipv6_leases.is_some();
            if ours && shaped && network.network.contains(&subnet) && subnet.prefix_len() == network.subnet_len {
                mine = Some((subnet, six));
            }
        }
        // After losing the lease (etcd restarted without our key), come back to the same subnet
        // when it is still free.
        if mine.is_none() {
            mine = previous.and_then(|p| parse_subnet_key(&p.name).ok()).filter(|(s, six)| {
                !taken.contains(s)
                    && network.network.contains(s)
                    && s.prefix_len() == network.subnet_len
                    && six.is_some() == network.ipv6_leases.is_some()
            });
        }
        let lease = timed(client.lease_grant(ttl, None)).await?.id();
        let put = |key: &str| TxnOp::put(key.to_owned(), value.clone(), Some(PutOptions::new().with_lease(lease)));
        if let Some((subnet, six)) = mine {
            let name = subnet_key(subnet, six);
            let key = format!("{prefix}{name}");
            timed(client.txn(Txn::new().and_then([put(&key)]))).await?;
            // The key now hangs off the new lease; the old one (if it survived) holds nothing.
            if let Some(p) = previous.filter(|p| p.lease != lease) {
                let _ = timed(client.lease_revoke(p.lease)).await;
            }
            tracing::info!(key = %key, ttl, "took this node's existing subnet lease");
            return Ok(Held { key, name, lease });
        }
        for subnet in network.subnets().filter(|s| !taken.contains(s)) {
            let six = network.ipv6_subnet_for(subnet);
            if network.ipv6_leases.is_some() && six.is_none() {
                break; // the IPv6 network has no subnet left to pair with this one or any later
            }
            let name = subnet_key(subnet, six);
            let key = format!("{prefix}{name}");
            let txn =
                Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([put(&key)]);
            if timed(client.txn(txn)).await?.succeeded() {
                tracing::info!(key = %key, subnet = %subnet, ttl, "allocated this node's subnet lease");
                return Ok(Held { key, name, lease });
            }
        }
        let _ = timed(client.lease_revoke(lease)).await;
        Err(EtcdError::Exhausted { network: network.network, len: network.subnet_len })
    }

    fn lease_spec(
        &self,
        key: &[u8],
        value: &[u8],
        create_revision: i64,
        network: &NetworkConfig,
        own: Option<(&str, IpAddr)>,
    ) -> Result<NodeSpec, Rejection> {
        let prefix = self.subnets_prefix();
        let name = String::from_utf8_lossy(key.strip_prefix(prefix.as_bytes()).unwrap_or(key)).into_owned();
        // The key's create_revision ranks overlapping leases: the older lease keeps the subnet.
        lease_spec(&name, value, network, self.port, own)
            .map(|s| NodeSpec { seniority: Seniority { created: create_revision, uid: String::new() }, ..s })
    }
}

/// Turns a lease into a spec. `name` is the key below `<prefix>/subnets/`; `own` is this node's
/// lease name and public IP: that lease is local only while it still carries our address.
///
/// # Errors
/// A [`Rejection`] naming the lease and the field (`key`, `PublicIP`, `BackendType`,
/// `BackendData`, `value`).
pub fn lease_spec(
    name: &str,
    value: &[u8],
    network: &NetworkConfig,
    port: Option<u16>,
    own: Option<(&str, IpAddr)>,
) -> Result<NodeSpec, Rejection> {
    let (subnet, six) = parse_subnet_key(name).map_err(|e| Rejection::new(name, "key", e))?;
    if let (Some(s6), Some(IpNet::V6(net6))) = (six, network.ipv6_network)
        && !net6.contains(&s6)
    {
        return Err(Rejection::new(name, "key", format!("{s6} is outside IPv6Network {net6}")));
    }
    let attrs = LeaseAttrs::parse(value, network.backend).map_err(|(field, e)| Rejection::new(name, field, e))?;
    let default_port = match attrs.backend {
        TunnelKind::Vxlan => flannel::FLANNEL_VXLAN_PORT,
        TunnelKind::Geneve => TunnelKind::Geneve.default_port(),
    };
    Ok(NodeSpec {
        name: name.to_owned(),
        pod_cidrs: std::iter::once(IpNet::V4(subnet)).chain(six.map(IpNet::V6)).collect(),
        underlay: attrs.public_ip,
        // `PublicIPv6` beside an IPv4 `PublicIP` (a node with both underlay families).
        other_underlay: attrs.public_ipv6.filter(|_| attrs.public_ip.is_ipv4()).map(IpAddr::V6),
        vtep_mac: attrs.data.vtep_mac,
        vni: attrs.data.vni.unwrap_or(network.vni),
        tunnel: attrs.backend,
        port: network.port.or(port).unwrap_or(default_port),
        local: own == Some((name, attrs.public_ip)),
        seniority: Seniority::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_specs_and_named_fields() {
        let net =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":3}}"#).expect("config");
        let v = br#"{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:07"}}"#;
        let s = lease_spec("10.5.7.0-24", v, &net, None, None).expect("lease");
        assert_eq!(s.pod_cidrs, [IpNet::V4("10.5.7.0/24".parse().expect("net"))]);
        assert_eq!((s.vni, s.port, s.local), (3, 8472, false));
        let mine: IpAddr = "192.0.2.7".parse().expect("ip");
        assert!(
            lease_spec("10.5.7.0-24", v, &net, Some(4789), Some(("10.5.7.0-24", mine)))
                .is_ok_and(|s| s.local && s.port == 4789)
        );
        let other: IpAddr = "192.0.2.99".parse().expect("ip");
        assert!(
            lease_spec("10.5.7.0-24", v, &net, None, Some(("10.5.7.0-24", other))).is_ok_and(|s| !s.local),
            "taken over"
        );
        assert_eq!(lease_spec("10.5.7.9-24", v, &net, None, None).map_err(|e| e.field), Err("key".to_owned()));
        assert_eq!(
            lease_spec("10.5.8.0-24", br#"{"PublicIP":"x"}"#, &net, None, None).map_err(|e| (e.node, e.field)),
            Err(("10.5.8.0-24".to_owned(), "PublicIP".to_owned()))
        );
        assert_eq!(
            lease_spec("10.5.8.0-24", br#"{"PublicIP":"192.0.2.8","BackendData":{"VtepMAC":1}}"#, &net, None, None)
                .map_err(|e| e.field),
            Err("BackendData".to_owned())
        );
        // A dual-stack lease (Flannel's key with both subnets): both pod CIDRs, tunnelled to PublicIP.
        let dual = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .expect("config");
        let s = lease_spec("10.5.7.0-24&fd00:5:0:7::-64", v, &dual, None, None).expect("dual-stack lease");
        assert_eq!(
            s.pod_cidrs,
            [IpNet::V4("10.5.7.0/24".parse().expect("net")), "fd00:5:0:7::/64".parse().expect("net")]
        );
        assert_eq!(s.underlay, mine);
        assert_eq!(
            lease_spec("10.5.7.0-24&fd00:6::-64", v, &dual, None, None).map_err(|e| e.field),
            Err("key".to_owned()),
            "an IPv6 subnet outside IPv6Network"
        );
    }
}

//! Services: virtual IPs and the backends behind them, with Maglev consistent hashing (compiled on
//! the control side, looked up on the hot path).
//!
//! Control describes every Service as a [`ServiceSpec`] (VIP, port, protocol, endpoints with their
//! conditions); [`Services::build`] compiles them into an immutable table that is published as its
//! own part of the [`crate::Snapshot`] ([`crate::Tables::set_services`]): an endpoint change
//! rebuilds this part only, never the routes.
//!
//! - **Match**: `(VIP, port, protocol)` -> service, an exact-match table (open addressing, one
//!   multiplication to hash).
//! - **Backends**: the ready endpoints; when none is ready, the serving-and-terminating ones (as
//!   kube-proxy does); none at all, and the service has no backend ([`Service::pick`] answers
//!   `None`: the data plane rejects).
//! - **Pick**: Maglev (Eisenbud et al., NSDI 2016). Each backend, identified by its address and
//!   port, has a permutation of the table's `M` slots (`M` prime: 16,381, or 65,537 for services
//!   with more than [`LARGE_BACKENDS`] backends, as Cilium and Katran size theirs); the backends take
//!   turns claiming their next free slot. A flow hash picks a slot. Adding or removing one backend
//!   moves about 1/N of the slots, and only to or from that backend.
//! - **Reverse match**: the set of every backend's `(address, port, protocol)`, so that a packet
//!   from a backend is looked up in connection tracking only if it can be a service reply.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Maglev table size for most services (prime).
pub const MAGLEV_DEFAULT: usize = 16_381;
/// Maglev table size for large services (prime).
pub const MAGLEV_LARGE: usize = 65_537;
/// Services with more backends than this get the large table: `M >= 100 N` keeps every backend's
/// share within about 1% of the others'.
pub const LARGE_BACKENDS: usize = MAGLEV_DEFAULT / 100;
/// Most backends a service may have (table entries are 16-bit backend indices).
pub const MAX_BACKENDS: usize = 32_768;

/// A transport protocol a service listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
    /// SCTP (IP protocol 132).
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol for an IP protocol number, if services carry it.
    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// `TCP`, `UDP` or `SCTP`, as Kubernetes spells them.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// One endpoint of a service, with its conditions (EndpointSlice `ready`, `serving`,
/// `terminating`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The pod's address.
    pub addr: IpAddr,
    /// The target port on it.
    pub port: u16,
    /// Ready: takes new connections.
    pub ready: bool,
    /// Serving: could take connections (true while terminating, until it stops).
    pub serving: bool,
    /// Terminating: its pod is being deleted.
    pub terminating: bool,
    /// On this node (the only endpoints `externalTrafficPolicy: Local` uses).
    pub local: bool,
}

impl EndpointSpec {
    /// A ready endpoint (not on this node).
    pub fn ready(addr: IpAddr, port: u16) -> Self {
        EndpointSpec { addr, port, ready: true, serving: true, terminating: false, local: false }
    }
}

/// How a service is reached from outside the cluster (NodePort, externalIPs, LoadBalancer IPs):
/// the part of a Service that is not its ClusterIP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExternalSpec {
    /// `nodePort`: the service on this port of every node address.
    pub node_port: Option<u16>,
    /// `externalIPs` and `status.loadBalancer.ingress[].ip`: the service on its own port there.
    pub ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`: only this node's endpoints, the client's address kept;
    /// `Cluster` (false): any endpoint, the source translated to the node.
    pub local: bool,
    /// `healthCheckNodePort` (Local only): where the node answers how many local endpoints it has.
    pub health_check_node_port: Option<u16>,
}

impl ExternalSpec {
    /// Whether the service has any way in from outside.
    pub fn is_empty(&self) -> bool {
        self.node_port.is_none() && self.ips.is_empty()
    }
}

/// A service port as control describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `namespace/name:port` (for reports).
    pub name: String,
    /// The virtual IP (ClusterIP).
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its endpoints, whatever their conditions.
    pub endpoints: Vec<EndpointSpec>,
    /// `sessionAffinity: ClientIP` with its timeout; `None` for no affinity.
    pub affinity: Option<Duration>,
    /// NodePort, external and load-balancer IPs, `externalTrafficPolicy`.
    pub external: ExternalSpec,
    /// `internalTrafficPolicy: Local`: traffic from inside the cluster (pods, the node) goes to
    /// this node's endpoints only ([`EndpointSpec::local`]); traffic from outside follows
    /// `external` alone, as kube-proxy does.
    pub internal_local: bool,
}

/// Why a set of services was refused (nothing is published; the previous set stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Two services with the same VIP, port and protocol.
    #[error("services {first} and {second} both claim {vip} port {port}/{}", protocol.name())]
    Duplicate {
        /// The first one listed.
        first: String,
        /// The second.
        second: String,
        /// Their VIP.
        vip: IpAddr,
        /// Their port.
        port: u16,
        /// Their protocol.
        protocol: Protocol,
    },
    /// Two services reachable from outside at the same address (or node port) and protocol.
    #[error("services {first} and {second} both claim {front} from outside, {}", protocol.name())]
    DuplicateExternal {
        /// The first one listed.
        first: String,
        /// The second.
        second: String,
        /// `node port N` or `ADDRESS port N`.
        front: String,
        /// Their protocol.
        protocol: Protocol,
    },
    /// More endpoints than a Maglev table can index.
    #[error("service {name}: {count} endpoints; at most {MAX_BACKENDS} are supported")]
    TooManyEndpoints {
        /// The service.
        name: String,
        /// Its endpoints.
        count: usize,
    },
}

/// A backend in a compiled service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// The pod's address.
    pub addr: IpAddr,
    /// Its target port.
    pub port: u16,
}

/// A compiled service (hot path reads). Its slices are shared (`Arc`), so that an incremental
/// update ([`Services::updated`]) copies the services it keeps for the price of a few reference
/// counts, not their Maglev tables (32 KiB each); reading through an `Arc` slice costs what a
/// `Box` slice does.
#[derive(Debug, Clone)]
pub struct Service {
    name: Arc<str>,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    /// The backends Maglev picks from (ready, else serving-and-terminating).
    backends: Arc<[Backend]>,
    /// Every IPv4 endpoint still serving (ready or terminating), as `address << 16 | port`, sorted:
    /// existing connections to these go on; a connection whose backend left this list is reset.
    alive_v4: Arc<[u64]>,
    /// The same for IPv6 endpoints.
    alive: Arc<[AliveKey]>,
    /// Maglev: slot -> index into `backends`; empty when there is no backend.
    table: Arc<[u16]>,
    /// Every endpoint, whatever its conditions (for the reverse match).
    endpoints: Arc<[Backend]>,
    affinity: Option<Duration>,
    /// How it is reached from outside.
    external: Arc<ExternalSpec>,
    /// The backends new connections from outside go to, when they differ from `backends`, and
    /// their Maglev table: under `externalTrafficPolicy: Local` the local ones; under `Cluster`
    /// with `internalTrafficPolicy: Local` (which narrows `backends`) all of them. Ready ones,
    /// else serving-and-terminating ones. Empty otherwise.
    outside_backends: Arc<[Backend]>,
    outside_table: Arc<[u16]>,
    /// `internalTrafficPolicy: Local`.
    internal_local: bool,
    /// `backends` are serving-and-terminating endpoints: no ready one is left.
    terminating_fallback: bool,
}

impl Service {
    /// `namespace/name:port`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VIP.
    pub fn vip(&self) -> IpAddr {
        self.vip
    }

    /// The service port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The backends new connections go to.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The Maglev table (slot -> backend index).
    pub fn table(&self) -> &[u16] {
        &self.table
    }

    /// `sessionAffinity: ClientIP` timeout, if set.
    pub fn affinity(&self) -> Option<Duration> {
        self.affinity
    }

    /// Whether new connections go to serving-and-terminating endpoints (no ready one is left).
    pub fn terminating_fallback(&self) -> bool {
        self.terminating_fallback
    }

    /// The Maglev slot a flow hash falls in (the table's size when there is no table).
    #[inline]
    pub fn slot(&self, hash: u32) -> usize {
        // Spread the 32-bit hash over the table with a multiply-shift, not a division.
        ((u64::from(hash) * self.table.len() as u64) >> 32) as usize
    }

    /// The backend for a new flow with this hash; `None` when the service has no usable backend.
    #[inline]
    pub fn pick(&self, hash: u32) -> Option<Backend> {
        if self.table.is_empty() {
            return None;
        }
        let slot = self.slot(hash);
        let i = *self.table.get(slot)?;
        self.backends.get(usize::from(i)).copied()
    }

    /// How the service is reached from outside the cluster.
    pub fn external(&self) -> &ExternalSpec {
        &self.external
    }

    /// The backend for a new connection from outside the cluster with this flow hash: any
    /// backend (`externalTrafficPolicy: Cluster`, whatever `internalTrafficPolicy` says), or a
    /// local one (`Local`); `None` when there is none.
    #[inline]
    pub fn pick_external(&self, hash: u32) -> Option<Backend> {
        if !self.external.local && !self.internal_local {
            return self.pick(hash);
        }
        if self.outside_table.is_empty() {
            return None;
        }
        let slot = ((u64::from(hash) * self.outside_table.len() as u64) >> 32) as usize;
        let i = *self.outside_table.get(slot)?;
        self.outside_backends.get(usize::from(i)).copied()
    }

    /// The local backends new connections from outside go to under `externalTrafficPolicy:
    /// Local` (what the health check node port counts); empty under `Cluster`.
    pub fn local_backends(&self) -> &[Backend] {
        if self.external.local { &self.outside_backends } else { &[] }
    }

    /// `internalTrafficPolicy: Local`: new connections from inside the cluster go to this
    /// node's endpoints only.
    pub fn internal_local(&self) -> bool {
        self.internal_local
    }

    /// Whether an existing connection to `backend` may go on (the endpoint still serves).
    #[inline]
    pub fn is_alive(&self, backend: Backend) -> bool {
        // Integer keys: comparing `IpAddr`s (an enum) in the search cost more than the rest of
        // a tracked packet's service work together (a profile of `service_path/hot_64`). IPv4
        // keys are one word each, and a service's few are scanned without branches: the binary
        // search's dependent loads were a quarter of that bench's time.
        match backend.addr {
            IpAddr::V4(a) => {
                let key = alive_v4_key(a, backend.port);
                let keys = &*self.alive_v4;
                if keys.len() <= ALIVE_SCAN {
                    keys.iter().fold(false, |found, k| found | (*k == key))
                } else {
                    keys.binary_search(&key).is_ok()
                }
            }
            IpAddr::V6(_) => self.alive.binary_search(&AliveKey::of(&backend)).is_ok(),
        }
    }
}

/// Services with at most this many IPv4 endpoints serving have them scanned, not searched.
const ALIVE_SCAN: usize = 32;

/// An IPv4 backend as one word: `address << 16 | port`.
#[inline(always)]
fn alive_v4_key(a: std::net::Ipv4Addr, port: u16) -> u64 {
    u64::from(a.to_bits()) << 16 | u64::from(port)
}

/// A backend as one ordered integer pair, for the per-packet [`Service::is_alive`] search: the
/// address's bits, and the port with the family above it (so an IPv4 backend never equals an
/// IPv6 one with the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct AliveKey(u128, u32);

impl AliveKey {
    #[inline(always)]
    fn of(b: &Backend) -> AliveKey {
        match b.addr {
            IpAddr::V4(a) => AliveKey(u128::from(a.to_bits()), u32::from(b.port)),
            IpAddr::V6(a) => AliveKey(a.to_bits(), 1 << 16 | u32::from(b.port)),
        }
    }
}

fn cmp_backend(a: &Backend, b: &Backend) -> std::cmp::Ordering {
    (a.addr, a.port).cmp(&(b.addr, b.port))
}

/// A flow-independent 64-bit hash of a backend (its Maglev offset and skip come from it).
fn backend_hash(b: &Backend, seed: u64) -> u64 {
    let a = match b.addr {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits() ^ (1 << 127),
    };
    let x = (a as u64) ^ ((a >> 64) as u64).rotate_left(23) ^ (u64::from(b.port) << 48) ^ seed;
    fmix64(fmix64(x) ^ seed.rotate_left(31))
}

#[inline]
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Fill a Maglev lookup table of `m` slots (`m` prime) for `backends`: each backend walks its own
/// permutation `(offset + j * skip) mod m` and the backends take turns claiming their next free
/// slot (the paper's Pseudocode 1). Empty for no backends.
///
/// # Panics
/// Never for `backends.len() <= MAX_BACKENDS` and `m >= 2` (indices fit in `u16`).
pub fn maglev_table(backends: &[Backend], m: usize) -> Box<[u16]> {
    if backends.is_empty() || m < 2 {
        return Box::new([]);
    }
    let m64 = m as u64;
    // Each backend's next position in its permutation, and its step. Advancing by a conditional
    // subtraction instead of `(offset + j * skip) % m` keeps divisions out of the loop (a 1,000-
    // backend table took 6.5 ms with them).
    let mut pos: Vec<usize> = Vec::with_capacity(backends.len());
    let mut skip: Vec<usize> = Vec::with_capacity(backends.len());
    for b in backends {
        pos.push((backend_hash(b, 0x5eed_0ff5) % m64) as usize);
        skip.push((backend_hash(b, 0x5eed_5c1b) % (m64 - 1) + 1) as usize);
    }
    let mut table = vec![u16::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..backends.len() {
            // Walk this backend's permutation to its next free slot. Every permutation visits
            // all m slots (skip is in 1..m and m is prime), so this ends while a slot is free.
            let c = loop {
                let c = pos[i];
                pos[i] += skip[i];
                if pos[i] >= m {
                    pos[i] -= m;
                }
                if table[c] == u16::MAX {
                    break c;
                }
            };
            // i < MAX_BACKENDS <= u16::MAX (checked by the caller).
            table[c] = i as u16;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table.into_boxed_slice()
}

/// The packed key of a service or a backend: address (IPv4 mapped into 128 bits), port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    addr: u128,
    port: u16,
    proto: u8,
}

impl Key {
    #[inline]
    fn new(addr: IpAddr, port: u16, proto: u8) -> Key {
        let addr = match addr {
            IpAddr::V4(a) => u128::from(a.to_bits()) | (0xffff << 32),
            IpAddr::V6(a) => a.to_bits(),
        };
        Key { addr, port, proto }
    }

    #[inline]
    fn hash(&self) -> u64 {
        let x = (self.addr as u64) ^ ((self.addr >> 64) as u64).rotate_left(29);
        (x ^ (u64::from(self.port) << 40) ^ (u64::from(self.proto) << 56)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// Exact-match map from [`Key`] to a `u32`, open addressing, at most half full.
#[derive(Debug, Clone)]
struct KeyMap {
    slots: Box<[(Key, u32)]>,
    bits: u32,
}

const EMPTY: u32 = u32::MAX;

impl KeyMap {
    fn new(entries: usize) -> KeyMap {
        let capacity = (entries * 2).next_power_of_two().max(2);
        let empty = (Key { addr: 0, port: 0, proto: 0 }, EMPTY);
        KeyMap { slots: vec![empty; capacity].into_boxed_slice(), bits: capacity.trailing_zeros() }
    }

    #[inline]
    fn home(&self, key: &Key) -> usize {
        (key.hash() >> (64 - self.bits)) as usize
    }

    /// Insert; returns the value already there for `key`, if any (which stays).
    fn insert(&mut self, key: Key, value: u32) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(&key);
        loop {
            let (k, v) = self.slots[i];
            if v == EMPTY {
                self.slots[i] = (key, value);
                return None;
            }
            if k == key {
                return Some(v);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, key: &Key) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        // At most half full, so an empty slot ends every probe.
        loop {
            let (k, v) = self.slots.get(i)?;
            if *v == EMPTY {
                return None;
            }
            if k == key {
                return Some(*v);
            }
            i = (i + 1) & mask;
        }
    }
}

/// Every service, compiled (one part of the snapshot).
#[derive(Debug, Clone)]
pub struct Services {
    services: Box<[Service]>,
    by_vip: KeyMap,
    backends: KeyMap,
    /// The ways in from outside: (external IP, port, protocol), and (`NODE_PORT_ADDR`, node
    /// port, protocol) for a node port on any of the node's addresses.
    by_front: KeyMap,
    has_external: bool,
    generation: u64,
}

/// The key address of a node port (any node address): IPv6's unspecified address, never an
/// external IP.
const NODE_PORT_ADDR: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// One way into a service from outside the cluster (for the uplink's XDP program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The external IP, or `None` for a node port (every node address).
    pub addr: Option<IpAddr>,
    /// The port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            services: Box::new([]),
            by_vip: KeyMap::new(0),
            backends: KeyMap::new(0),
            by_front: KeyMap::new(0),
            has_external: false,
            generation: 0,
        }
    }
}

impl Services {
    /// Compile `specs`; `generation` numbers this build (connection tracking uses it to tell
    /// whether the backends may have changed since it last checked an entry).
    ///
    /// # Errors
    /// [`ServiceError`] naming the services at fault.
    pub fn build(specs: &[ServiceSpec], generation: u64) -> Result<Services, ServiceError> {
        let mut services = Vec::with_capacity(specs.len());
        for s in specs {
            check(s)?;
            services.push(compile(s));
        }
        Services::index(services, generation)
    }

    /// A copy of these services with the ones named in `removed` or in `upserted` taken out and
    /// `upserted` compiled in: only the changed services' Maglev tables are built; the others are
    /// shared with `self`. The exact-match indices are rebuilt (a few milliseconds at 10,000
    /// services and 100,000 endpoints, against a second or more to rebuild every table).
    ///
    /// # Errors
    /// [`ServiceError`] naming the services at fault; `self` is unchanged.
    pub fn updated(
        &self,
        removed: &[String],
        upserted: &[ServiceSpec],
        generation: u64,
    ) -> Result<Services, ServiceError> {
        let gone: HashSet<&str> =
            removed.iter().map(String::as_str).chain(upserted.iter().map(|s| s.name.as_str())).collect();
        let mut services: Vec<Service> = Vec::with_capacity(self.services.len() + upserted.len());
        services.extend(self.services.iter().filter(|s| !gone.contains(&*s.name)).cloned());
        for s in upserted {
            check(s)?;
            services.push(compile(s));
        }
        Services::index(services, generation)
    }

    /// The exact-match indices over compiled services.
    fn index(services: Vec<Service>, generation: u64) -> Result<Services, ServiceError> {
        let mut by_vip = KeyMap::new(services.len());
        let fronts: usize =
            services.iter().map(|s| s.external.ips.len() + usize::from(s.external.node_port.is_some())).sum();
        let mut by_front = KeyMap::new(fronts);
        let backend_count: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let mut backend_set = KeyMap::new(backend_count);
        for (i, s) in services.iter().enumerate() {
            let key = Key::new(s.vip, s.port, s.protocol.number());
            // Fewer than u32::MAX services: a Vec of that many would not fit in memory anyway.
            if let Some(first) = by_vip.insert(key, i as u32) {
                return Err(ServiceError::Duplicate {
                    first: services[first as usize].name.to_string(),
                    second: s.name.to_string(),
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                });
            }
            for b in s.endpoints.iter() {
                backend_set.insert(Key::new(b.addr, b.port, s.protocol.number()), 0);
            }
            let fronts = s
                .external
                .node_port
                .map(|p| (NODE_PORT_ADDR, p))
                .into_iter()
                .chain(s.external.ips.iter().map(|&a| (a, s.port)));
            for (addr, port) in fronts {
                if let Some(first) = by_front.insert(Key::new(addr, port, s.protocol.number()), i as u32) {
                    let front = if addr == NODE_PORT_ADDR {
                        format!("node port {port}")
                    } else {
                        format!("{addr} port {port}")
                    };
                    return Err(ServiceError::DuplicateExternal {
                        first: services[first as usize].name.to_string(),
                        second: s.name.to_string(),
                        front,
                        protocol: s.protocol,
                    });
                }
            }
        }
        Ok(Services {
            services: services.into_boxed_slice(),
            by_vip,
            backends: backend_set,
            by_front,
            has_external: fronts > 0,
            generation,
        })
    }

    /// The service reached from outside at `dst:port` over `proto`: a node port when `dst` is one
    /// of this node's addresses (`node_addr`), else an external or load-balancer IP.
    #[inline]
    pub fn lookup_external(&self, dst: IpAddr, port: u16, proto: u8, node_addr: bool) -> Option<&Service> {
        if self.services.is_empty() {
            return None;
        }
        let i = if node_addr {
            self.by_front
                .get(&Key::new(NODE_PORT_ADDR, port, proto))
                .or_else(|| self.by_front.get(&Key::new(dst, port, proto)))?
        } else {
            self.by_front.get(&Key::new(dst, port, proto))?
        };
        self.services.get(i as usize)
    }

    /// Whether any service is reachable from outside the cluster.
    #[inline]
    pub fn has_external(&self) -> bool {
        self.has_external
    }

    /// Every way in from outside the cluster, sorted.
    pub fn frontends(&self) -> Vec<Frontend> {
        let mut v: Vec<Frontend> = self
            .services
            .iter()
            .flat_map(|s| {
                let np = s.external.node_port.map(|port| Frontend { addr: None, port, protocol: s.protocol });
                np.into_iter().chain(s.external.ips.iter().map(|&a| Frontend {
                    addr: Some(a),
                    port: s.port,
                    protocol: s.protocol,
                }))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The service at `vip:port` for IP protocol `proto`.
    #[inline]
    pub fn lookup(&self, vip: IpAddr, port: u16, proto: u8) -> Option<&Service> {
        if self.services.is_empty() {
            return None;
        }
        let i = self.by_vip.get(&Key::new(vip, port, proto))?;
        self.services.get(i as usize)
    }

    /// Whether `addr:port` over `proto` is some service's endpoint (a packet from it may be a
    /// service reply).
    #[inline]
    pub fn is_backend(&self, addr: IpAddr, port: u16, proto: u8) -> bool {
        !self.services.is_empty() && self.backends.get(&Key::new(addr, port, proto)).is_some()
    }

    /// Every service.
    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.services.iter()
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The build number given to [`Services::build`].
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

fn check(s: &ServiceSpec) -> Result<(), ServiceError> {
    if s.endpoints.len() > MAX_BACKENDS {
        return Err(ServiceError::TooManyEndpoints { name: s.name.clone(), count: s.endpoints.len() });
    }
    Ok(())
}

/// The backends of `s` that take new connections: the ready ones, else the serving-and-terminating
/// ones; and those that keep their existing connections (serving or ready).
fn compile(s: &ServiceSpec) -> Service {
    let to_backend = |e: &EndpointSpec| Backend { addr: e.addr, port: e.port };
    // The ready endpoints among those `take` admits, else the serving-and-terminating ones;
    // sorted (the order must not matter to the table: a reordered slice is the same service);
    // and whether they are the fallback.
    let usable = |take: &dyn Fn(&EndpointSpec) -> bool| -> (Vec<Backend>, bool) {
        let mut v: Vec<Backend> = s.endpoints.iter().filter(|e| take(e) && e.ready).map(to_backend).collect();
        let fallback = v.is_empty();
        if fallback {
            v = s.endpoints.iter().filter(|e| take(e) && e.serving && e.terminating).map(to_backend).collect();
        }
        v.sort_by(cmp_backend);
        v.dedup();
        let fallback = fallback && !v.is_empty();
        (v, fallback)
    };
    // From inside the cluster: this node's endpoints only under `internalTrafficPolicy: Local`.
    let (backends, terminating_fallback) = usable(&|e| !s.internal_local || e.local);
    let serving: Vec<Backend> = s.endpoints.iter().filter(|e| e.ready || e.serving).map(to_backend).collect();
    let mut alive_v4: Vec<u64> = serving
        .iter()
        .filter_map(|b| match b.addr {
            IpAddr::V4(a) => Some(alive_v4_key(a, b.port)),
            IpAddr::V6(_) => None,
        })
        .collect();
    alive_v4.sort_unstable();
    alive_v4.dedup();
    let mut alive: Vec<AliveKey> = serving.iter().filter(|b| b.addr.is_ipv6()).map(AliveKey::of).collect();
    alive.sort_unstable();
    alive.dedup();
    let m = if backends.len() > LARGE_BACKENDS { MAGLEV_LARGE } else { MAGLEV_DEFAULT };
    // From outside: the local endpoints under `externalTrafficPolicy: Local`; every endpoint
    // under `Cluster` when `internalTrafficPolicy: Local` narrowed `backends`.
    let outside_backends = match (s.external.is_empty(), s.external.local, s.internal_local) {
        (true, _, _) | (false, false, false) => Vec::new(),
        (false, true, _) => usable(&|e| e.local).0,
        (false, false, true) => usable(&|_| true).0,
    };
    let outside_m = if outside_backends.len() > LARGE_BACKENDS { MAGLEV_LARGE } else { MAGLEV_DEFAULT };
    Service {
        outside_table: maglev_table(&outside_backends, outside_m).into(),
        outside_backends: outside_backends.into(),
        internal_local: s.internal_local,
        external: Arc::new(s.external.clone()),
        name: s.name.as_str().into(),
        vip: s.vip,
        port: s.port,
        protocol: s.protocol,
        table: maglev_table(&backends, m).into(),
        endpoints: s.endpoints.iter().map(to_backend).collect(),
        backends: backends.into(),
        terminating_fallback,
        alive_v4: alive_v4.into(),
        alive: alive.into(),
        affinity: s.affinity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    fn b(i: u32) -> Backend {
        Backend { addr: IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 + i)), port: 8080 }
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let backends: Vec<Backend> = (0..7).map(b).collect();
        let t = maglev_table(&backends, 251);
        assert_eq!(t.len(), 251);
        let mut counts = [0usize; 7];
        for &i in t.iter() {
            counts[usize::from(i)] += 1;
        }
        // Maglev gives each backend floor(M/N) or ceil(M/N) slots, give or take the turn order.
        assert!(counts.iter().all(|&c| (35..=37).contains(&c)), "{counts:?}");
    }

    #[test]
    fn lookup_and_duplicates() {
        let spec = |name: &str, port| ServiceSpec {
            name: name.into(),
            vip: "10.96.0.10".parse().expect("ip"),
            port,
            protocol: Protocol::Tcp,
            endpoints: vec![EndpointSpec::ready("10.244.1.2".parse().expect("ip"), 8080)],
            affinity: None,
            external: Default::default(),
            internal_local: false,
        };
        let s = Services::build(&[spec("a", 80), spec("b", 443)], 1).expect("valid");
        assert_eq!(s.lookup("10.96.0.10".parse().expect("ip"), 443, 6).map(Service::name), Some("b"));
        assert!(s.lookup("10.96.0.10".parse().expect("ip"), 443, 17).is_none());
        assert!(s.is_backend("10.244.1.2".parse().expect("ip"), 8080, 6));
        assert!(!s.is_backend("10.244.1.2".parse().expect("ip"), 8080, 17));
        let e = Services::build(&[spec("a", 80), spec("c", 80)], 2).expect_err("duplicate");
        assert_eq!(e.to_string(), "services a and c both claim 10.96.0.10 port 80/TCP");
    }

    #[test]
    fn an_update_rebuilds_only_what_changed() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let spec = |name: &str, vip: &str, backend: &str| ServiceSpec {
            name: name.into(),
            vip: ip(vip),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: vec![EndpointSpec::ready(ip(backend), 8080)],
            affinity: None,
            external: Default::default(),
            internal_local: false,
        };
        let s = Services::build(&[spec("a", "10.96.0.1", "10.244.1.1"), spec("b", "10.96.0.2", "10.244.1.2")], 1)
            .expect("valid");
        let a_table = s.lookup(ip("10.96.0.1"), 80, 6).expect("a").table.clone();
        let u = s
            .updated(&["b".into()], &[spec("c", "10.96.0.3", "10.244.1.3"), spec("a", "10.96.0.1", "10.244.1.9")], 2)
            .expect("valid");
        assert_eq!(u.generation(), 2);
        assert_eq!(u.len(), 2);
        assert!(u.lookup(ip("10.96.0.2"), 80, 6).is_none(), "b removed");
        assert!(!u.is_backend(ip("10.244.1.2"), 8080, 6), "and its backend");
        assert_eq!(u.lookup(ip("10.96.0.3"), 80, 6).map(Service::name), Some("c"));
        let a = u.lookup(ip("10.96.0.1"), 80, 6).expect("a replaced, not doubled");
        assert_eq!(a.backends(), &[Backend { addr: ip("10.244.1.9"), port: 8080 }]);
        assert!(u.is_backend(ip("10.244.1.9"), 8080, 6) && !u.is_backend(ip("10.244.1.1"), 8080, 6));
        // An unchanged service shares its table with the previous build.
        let c = s.updated(&[], &[spec("c", "10.96.0.3", "10.244.1.3")], 3).expect("valid");
        assert!(Arc::ptr_eq(&c.lookup(ip("10.96.0.1"), 80, 6).expect("a").table, &a_table));
        // A clash is refused, naming both.
        let e = s.updated(&[], &[spec("d", "10.96.0.1", "10.244.1.4")], 4).expect_err("duplicate");
        assert_eq!(e.to_string(), "services a and d both claim 10.96.0.1 port 80/TCP");
    }

    #[test]
    fn external_frontends_lookup_clashes_and_local_picks() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let spec = |name: &str, vip: &str, node_port, ips: &[&str], local| ServiceSpec {
            name: name.into(),
            vip: ip(vip),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: vec![
                EndpointSpec { local: true, ..EndpointSpec::ready(ip("10.244.1.2"), 8080) },
                EndpointSpec::ready(ip("10.244.2.2"), 8080),
            ],
            affinity: None,
            external: ExternalSpec {
                node_port,
                ips: ips.iter().map(|a| ip(a)).collect(),
                local,
                health_check_node_port: None,
            },
            internal_local: false,
        };
        let s = Services::build(
            &[spec("a", "10.96.0.1", Some(30080), &["203.0.113.1"], true), spec("b", "10.96.0.2", None, &[], false)],
            1,
        )
        .expect("valid");
        assert!(s.has_external());
        let node = ip("192.0.2.1");
        assert_eq!(s.lookup_external(node, 30080, 6, true).map(Service::name), Some("a"));
        assert!(s.lookup_external(node, 30080, 6, false).is_none(), "a node port only on the node's address");
        assert!(s.lookup_external(node, 30080, 17, true).is_none());
        assert_eq!(s.lookup_external(ip("203.0.113.1"), 80, 6, false).map(Service::name), Some("a"));
        assert!(s.lookup_external(ip("203.0.113.1"), 30080, 6, false).is_none());
        // Local: only the local endpoint, whatever the hash.
        let a = s.lookup_external(node, 30080, 6, true).expect("a");
        assert!(
            (0..1000u32)
                .all(|h| a.pick_external(h.wrapping_mul(0x9e37_79b9)).map(|b| b.addr) == Some(ip("10.244.1.2")))
        );
        assert_eq!(s.frontends().len(), 2);
        // Two services on one node port (or one external IP and port) are refused, naming both.
        let e = Services::build(
            &[spec("a", "10.96.0.1", Some(30080), &[], false), spec("c", "10.96.0.3", Some(30080), &[], false)],
            2,
        )
        .expect_err("clash");
        assert_eq!(e.to_string(), "services a and c both claim node port 30080 from outside, TCP");
        assert!(!Services::build(&[spec("b", "10.96.0.2", None, &[], false)], 3).expect("valid").has_external());
    }

    #[test]
    fn liveness_is_exact_scanned_or_searched_and_per_family() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // Up to ALIVE_SCAN IPv4 endpoints are scanned, more are searched; IPv6 ones always searched.
        for n in [1u32, ALIVE_SCAN as u32, ALIVE_SCAN as u32 + 9] {
            let v4 = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from_bits(0x0af4_0100 + 2 * i));
            let mut endpoints: Vec<EndpointSpec> = (0..n).map(|i| EndpointSpec::ready(v4(i), 8080)).collect();
            endpoints.push(EndpointSpec::ready(ip("fd00::2"), 8080));
            let spec = ServiceSpec {
                name: "big".into(),
                vip: ip("10.96.0.9"),
                port: 80,
                protocol: Protocol::Tcp,
                endpoints,
                affinity: None,
                external: Default::default(),
                internal_local: false,
            };
            let s = compile(&spec);
            for i in 0..n {
                assert!(s.is_alive(Backend { addr: v4(i), port: 8080 }), "{n} endpoints: {}", v4(i));
                assert!(!s.is_alive(Backend { addr: v4(i), port: 8081 }), "{n}: another port");
                assert!(!s.is_alive(Backend {
                    addr: IpAddr::V4(std::net::Ipv4Addr::from_bits(0x0af4_0101 + 2 * i)),
                    port: 8080
                }));
            }
            assert!(s.is_alive(Backend { addr: ip("fd00::2"), port: 8080 }));
            assert!(!s.is_alive(Backend { addr: ip("fd00::3"), port: 8080 }));
            assert!(!s.is_alive(Backend { addr: ip("::ffff:10.244.1.0"), port: 8080 }), "{n}: IPv6 with IPv4 bits");
        }
    }

    #[test]
    fn terminating_endpoints_only_when_none_is_ready() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let term = EndpointSpec {
            addr: ip("10.244.1.3"),
            port: 80,
            ready: false,
            serving: true,
            terminating: true,
            local: false,
        };
        let mut spec = ServiceSpec {
            name: "t".into(),
            vip: ip("10.96.0.1"),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: vec![EndpointSpec::ready(ip("10.244.1.2"), 80), term],
            affinity: None,
            external: Default::default(),
            internal_local: false,
        };
        let s = compile(&spec);
        assert_eq!(s.backends(), &[Backend { addr: ip("10.244.1.2"), port: 80 }]);
        assert!(s.is_alive(Backend { addr: ip("10.244.1.3"), port: 80 }), "terminating keeps its connections");
        assert!(s.is_alive(Backend { addr: ip("10.244.1.2"), port: 80 }));
        // The search is exact: another port, another address, the same bits in IPv6 are not alive.
        assert!(!s.is_alive(Backend { addr: ip("10.244.1.2"), port: 81 }));
        assert!(!s.is_alive(Backend { addr: ip("10.244.1.4"), port: 80 }));
        assert!(!s.is_alive(Backend { addr: ip("::a0f4:102"), port: 80 }));
        assert!(!s.is_alive(Backend { addr: ip("::ffff:10.244.1.2"), port: 80 }));
        spec.endpoints.remove(0);
        let s = compile(&spec);
        assert_eq!(s.backends(), &[Backend { addr: ip("10.244.1.3"), port: 80 }]);
        spec.endpoints[0].serving = false;
        let s = compile(&spec);
        assert!(s.backends().is_empty());
        assert_eq!(s.pick(12345), None);
        assert!(!s.is_alive(Backend { addr: ip("10.244.1.3"), port: 80 }));
    }

    #[test]
    fn internal_traffic_policy_local_narrows_inside_traffic_only() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let ep = |a: &str, local: bool| EndpointSpec { local, ..EndpointSpec::ready(ip(a), 80) };
        let mut spec = ServiceSpec {
            name: "t".into(),
            vip: ip("10.96.0.1"),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: vec![ep("10.244.1.2", true), ep("10.244.2.2", false), ep("10.244.3.2", false)],
            affinity: None,
            external: ExternalSpec { node_port: Some(30080), ..Default::default() },
            internal_local: true,
        };
        let picks = |s: &Service, external: bool| -> BTreeSet<IpAddr> {
            (0..2000u32)
                .filter_map(|h| {
                    let h = h.wrapping_mul(0x9e37_79b9);
                    if external { s.pick_external(h) } else { s.pick(h) }
                })
                .map(|b| b.addr)
                .collect()
        };
        let s = compile(&spec);
        assert_eq!(picks(&s, false), BTreeSet::from([ip("10.244.1.2")]), "from inside: the local endpoint only");
        assert_eq!(picks(&s, true).len(), 3, "from outside (Cluster): every endpoint");
        assert!(s.local_backends().is_empty(), "no health-check count under Cluster");
        assert!(s.is_alive(Backend { addr: ip("10.244.3.2"), port: 80 }), "a remote endpoint keeps its connections");
        // externalTrafficPolicy: Local: the local endpoints from outside too.
        spec.external.local = true;
        let s = compile(&spec);
        assert_eq!(picks(&s, true), BTreeSet::from([ip("10.244.1.2")]));
        assert_eq!(s.local_backends().len(), 1);
        // No local endpoint: nothing from inside; Cluster from outside still has all three.
        spec.external.local = false;
        spec.endpoints[0].local = false;
        let s = compile(&spec);
        assert!(picks(&s, false).is_empty());
        assert_eq!(picks(&s, true).len(), 3);
        // Without the policy, both ways use every endpoint.
        spec.internal_local = false;
        let s = compile(&spec);
        assert_eq!(picks(&s, false).len(), 3);
        assert_eq!(picks(&s, true).len(), 3);
    }
}

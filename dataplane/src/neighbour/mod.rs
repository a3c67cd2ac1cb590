//! Underlay neighbour sync (control side; runs on the control thread, never on a worker): keeps
//! ferry's neighbour table in step with the kernel's on the uplink, so that the outer headers
//! toward every remote node carry the right next-hop MAC, and a new one soon after it changes.
//!
//! ferry never sends ARP or ND itself. Its uplink XDP program passes them to the kernel, which
//! goes on resolving neighbours on the uplink exactly as without ferry; this module reads the
//! kernel's answers over rtnetlink and feeds them to [`Tables::learn_neighbour`], which rebuilds
//! the templates of the nodes behind a neighbour whose MAC changed and publishes a new snapshot
//! itself (the [`Publication`]s are in the [`SyncReport`]; the caller has nothing more to do).
//!
//! - **Which addresses.** The tables send to a node through its own neighbour entry, else through
//!   its family's gateway ([`Underlay::gateway_v4`], [`Underlay::gateway_v6`]). So the sync wants
//!   every remote node's underlay address, and the gateway of each family that has nodes. Whether
//!   a node is a neighbour at all is the kernel's routing decision: for a node without a usable
//!   entry the sync asks the kernel's route (`ip route get ADDR`, cached for
//!   [`SyncConfig::route_ttl`]) and makes the kernel resolve the node only when the route is
//!   on-link out of the uplink. A node routed through a router is reached through the configured
//!   gateway; a disagreement between the two is reported ([`PathIssue`]).
//! - **Reading.** A dump of the uplink's ARP and ND entries every [`SyncConfig::dump_interval`],
//!   and in between the kernel's neighbour notifications (`RTNLGRP_NEIGH`): a caller that polls
//!   [`NeighbourSync::notification_fd`] and syncs when it turns readable learns a new MAC within
//!   milliseconds of the kernel. Entries in a state the kernel transmits with (REACHABLE, STALE,
//!   DELAY, PROBE, PERMANENT, NOARP) and with a MAC are learned. Learning an unchanged MAC only
//!   resets its age, so an entry stays valid in ferry's table while the kernel keeps it, and ages
//!   out by ferry's own timer ([`Tables::expire_neighbours`], called from [`NeighbourSync::sync`]
//!   when due) once the kernel drops it. Static entries in ferry's table are left alone.
//! - **Making the kernel resolve.** An address without an entry, or whose entry FAILED, is probed:
//!   by default with `RTM_NEWNEIGH` + `NTF_USE` (the kernel treats the neighbour as used, as when
//!   it has a packet for it, and sends its own ARP request or neighbour solicitation), or with a
//!   one-byte UDP datagram to the discard port from a socket bound to the uplink
//!   ([`ProbeMethod`]). A STALE entry is probed too: ferry's traffic bypasses the kernel, so
//!   nothing else would make the kernel re-verify it, and a node whose MAC changed (a replaced NIC,
//!   a re-created VTEP: the stale entries Flannel is known for) would stay STALE with the old MAC
//!   for as long as the kernel keeps it. At most one probe per address per
//!   [`SyncConfig::probe_interval`], backing off to [`SyncConfig::max_probe_interval`] while an
//!   address stays unresolved (a node that is down is not asked for every second).
//!
//! How fast a MAC change is seen: at once when the new owner announces itself (gratuitous ARP or
//! unsolicited NA, `arp_notify`/`ndisc_notify` on its side); otherwise once the kernel's entry
//! leaves REACHABLE (`base_reachable_time_ms`, 15 to 45 s by default), plus the re-verification
//! this module starts (`delay_first_probe_time`, 5 s, and the unicast probes, 3 s).
//!
//! Everything asked of the kernel goes through one private trait (`sys::NeighbourSys`); unit tests
//! replace the kernel with canned netlink messages. The sync reads no clock: time is passed in
//! (`now`), as to the tables, so tests step it exactly.

mod netlink;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use ferry_encap::MacAddr;
use ferry_tables::neigh::Origin;
use ferry_tables::{Publication, Tables, Underlay};

pub use netlink::{KernelNeighbour, NudState};
use netlink::{Path, Reply, StreamError};
use sys::{KernelSys, NeighbourSys};

/// How ferry makes the kernel resolve an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeMethod {
    /// `RTM_NEWNEIGH` with `NTF_USE` on the uplink. Only the kernel's own ARP or ND goes on the
    /// wire, for exactly that address on exactly that interface. Needs `CAP_NET_ADMIN` (which
    /// ferry has anyway, to attach XDP programs).
    #[default]
    Netlink,
    /// A one-byte UDP datagram to the address's discard port (9) from a socket bound to the
    /// uplink: the kernel resolves the next hop to send it. Needs no privilege, but puts a
    /// datagram on the wire.
    Datagram,
}

/// Timers and choices of the sync; [`SyncConfig::default`] suits a production uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// How ferry makes the kernel resolve an address.
    pub probe: ProbeMethod,
    /// How often the kernel's entries are dumped in full (1 s). Entries are refreshed in ferry's
    /// table and probes decided at this pace, so the tables' neighbour lifetime
    /// (`neighbour_reachable` of [`Tables::new`]) must be several times longer.
    pub dump_interval: Duration,
    /// The least time between two probes of one address (1 s).
    pub probe_interval: Duration,
    /// The most time between two probes of an address that stays unresolved (30 s): the
    /// interval doubles from `probe_interval` up to this.
    pub max_probe_interval: Duration,
    /// How long the kernel's route to a node is trusted before being asked again (30 s).
    pub route_ttl: Duration,
    /// Subscribe to the kernel's neighbour notifications (true); without them changes are seen
    /// at the next dump.
    pub notifications: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            probe: ProbeMethod::Netlink,
            dump_interval: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(30),
            route_ttl: Duration::from_secs(30),
            notifications: true,
        }
    }
}

/// A neighbour whose MAC changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacChange {
    /// Its address.
    pub addr: IpAddr,
    /// The MAC ferry had.
    pub old: MacAddr,
    /// The MAC the kernel has now.
    pub new: MacAddr,
}

/// Something wrong with how the kernel routes a node, reported when the route is read (at most
/// once per [`SyncConfig::route_ttl`] per node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathIssue {
    /// The kernel routes the node through a router, but no gateway of its family is configured:
    /// the node stays unresolved.
    NoGateway {
        /// The node's underlay address.
        node: IpAddr,
        /// The router the kernel would use.
        via: IpAddr,
    },
    /// The kernel routes the node through another router than the configured gateway, whose MAC
    /// the node's template uses.
    OtherGateway {
        /// The node's underlay address.
        node: IpAddr,
        /// The router the kernel would use.
        via: IpAddr,
        /// The configured gateway.
        configured: IpAddr,
    },
    /// The kernel does not route the node out of the uplink (no route, or out of another
    /// interface).
    NoRoute {
        /// The node's underlay address.
        node: IpAddr,
        /// Why, in words.
        reason: String,
    },
}

impl fmt::Display for PathIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathIssue::NoGateway { node, via } => write!(
                f,
                "node {node} is routed via {via}, but no gateway of its family is configured for ferry's underlay: \
                 configure {via} as the gateway, or make the node reachable on-link"
            ),
            PathIssue::OtherGateway { node, via, configured } => write!(
                f,
                "node {node} is routed via {via}, but ferry's underlay gateway is {configured}: ferry sends to \
                 {configured}'s MAC; make the two agree"
            ),
            PathIssue::NoRoute { node, reason } => write!(
                f,
                "node {node} is not routed out of the uplink ({reason}): add a route to it through the uplink"
            ),
        }
    }
}

/// What one [`NeighbourSync::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Whether the kernel's entries were dumped (else only notifications were read).
    pub dumped: bool,
    /// Neighbour entries on the uplink read from notifications.
    pub notifications: usize,
    /// Addresses ferry had no valid MAC for and now has.
    pub added: Vec<(IpAddr, MacAddr)>,
    /// Addresses whose MAC changed.
    pub changed: Vec<MacChange>,
    /// Addresses whose unchanged MAC was confirmed (their age reset).
    pub confirmed: usize,
    /// Addresses the kernel was made to resolve or re-verify.
    pub probed: Vec<IpAddr>,
    /// Probes that failed, with why (retried at the next probe time).
    pub probe_failures: Vec<(IpAddr, io::Error)>,
    /// Routing problems found.
    pub issues: Vec<PathIssue>,
    /// Kernel messages that could not be decoded and were skipped.
    pub undecodable: usize,
    /// The snapshots the tables published because of this sync (learning a new MAC, expiring an
    /// entry some node used). Already current: the caller has nothing to publish.
    pub publications: Vec<Publication>,
}

/// What the kernel was asked when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Looking the uplink up.
    Link,
    /// Dumping the uplink's neighbours.
    Dump,
    /// Reading the neighbour notifications.
    Notifications,
    /// Asking the route to an address.
    Route(IpAddr),
    /// Making the kernel resolve an address.
    Probe(IpAddr),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Link => f.write_str("looking the interface up"),
            Op::Dump => f.write_str("dumping the neighbour entries"),
            Op::Notifications => f.write_str("reading the neighbour notifications"),
            Op::Route(a) => write!(f, "asking the route to {a}"),
            Op::Probe(a) => write!(f, "making the kernel resolve {a}"),
        }
    }
}

/// Why the sync could not be set up or could not run.
#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    /// The uplink does not exist here.
    #[error(
        "uplink {ifname}: no such interface in this network namespace ({source}); pass the uplink's name as `ip link` \
         shows it, and create the sync in the namespace that has it"
    )]
    NoInterface {
        /// The name given.
        ifname: String,
        /// What the lookup said.
        #[source]
        source: io::Error,
    },
    /// The uplink went away, or was deleted and created again, since the sync was created.
    #[error(
        "uplink {ifname}: the interface (index {old}) {}; the data plane must be restarted on the new interface",
        match now { Some(n) => format!("was replaced by a new one (index {n})"), None => "is gone".to_owned() }
    )]
    InterfaceChanged {
        /// The uplink's name.
        ifname: String,
        /// Its index when the sync was created.
        old: u32,
        /// Its index now, if one by that name exists.
        now: Option<u32>,
    },
    /// A socket could not be opened.
    #[error("uplink {ifname}: cannot open {what}: {source}; is netlink available to this process?")]
    Open {
        /// The uplink's name.
        ifname: String,
        /// Which socket.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused or did not answer a request.
    #[error("uplink {ifname}: {op} failed: {source}")]
    Kernel {
        /// The uplink's name.
        ifname: String,
        /// What was asked.
        op: Op,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be framed.
    #[error("uplink {ifname}: {op}: the kernel's answer is malformed: {source}")]
    Decode {
        /// The uplink's name.
        ifname: String,
        /// What was asked.
        op: Op,
        /// What is wrong with it.
        #[source]
        source: netlink_packet_core::DecodeError,
    },
    /// Not allowed to make the kernel resolve an address.
    #[error(
        "uplink {ifname}: not allowed to make the kernel resolve {addr} ({source}); run ferry with CAP_NET_ADMIN, or \
         use ProbeMethod::Datagram"
    )]
    ProbeDenied {
        /// The uplink's name.
        ifname: String,
        /// The address.
        addr: IpAddr,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// Why an address is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A remote node's underlay address: resolved only when the kernel routes it on-link.
    Node,
    /// A configured gateway: on-link by definition.
    Gateway,
}

/// Per wanted address: probe pacing and the kernel's route.
#[derive(Debug, Default)]
struct Target {
    last_probe: Option<Instant>,
    /// The current least time between probes; zero until the first probe of an episode.
    interval: Duration,
    /// The kernel's route and when it was read.
    path: Option<(Path, Instant)>,
}

/// Keeps ferry's neighbour table in step with the kernel's on one uplink. See the module doc.
#[derive(Debug)]
pub struct NeighbourSync {
    ifname: String,
    ifindex: u32,
    gateway_v4: Option<Ipv4Addr>,
    gateway_v6: Option<Ipv6Addr>,
    config: SyncConfig,
    sys: Box<dyn NeighbourSys>,
    seq: u32,
    targets: HashMap<IpAddr, Target>,
    /// When the next full dump is due; `None`: at the next sync.
    next_dump: Option<Instant>,
    scratch: Vec<u8>,
}

impl NeighbourSync {
    /// A sync for interface `uplink` with the default [`SyncConfig`]; `underlay` gives the
    /// gateways the tables fall back to (the same [`Underlay`] the [`Tables`] were made with).
    /// Its sockets belong to the calling thread's network namespace, wherever it is used later.
    ///
    /// # Errors
    /// [`NeighbourError::NoInterface`] when `uplink` does not exist, [`NeighbourError::Open`] when
    /// netlink sockets cannot be opened.
    pub fn new(uplink: &str, underlay: &Underlay) -> Result<Self, NeighbourError> {
        Self::with_config(uplink, underlay, SyncConfig::default())
    }

    /// [`NeighbourSync::new`] with explicit timers and probe method.
    ///
    /// # Errors
    /// As [`NeighbourSync::new`].
    pub fn with_config(uplink: &str, underlay: &Underlay, config: SyncConfig) -> Result<Self, NeighbourError> {
        let datagrams = config.probe == ProbeMethod::Datagram;
        let sys = KernelSys::open(uplink, config.notifications, datagrams).map_err(|e| NeighbourError::Open {
            ifname: uplink.to_owned(),
            what: e.what,
            source: e.source,
        })?;
        Self::with_sys(uplink, underlay, config, Box::new(sys))
    }

    /// A sync talking to `sys` instead of the kernel.
    fn with_sys(
        uplink: &str,
        underlay: &Underlay,
        config: SyncConfig,
        sys: Box<dyn NeighbourSys>,
    ) -> Result<Self, NeighbourError> {
        let mut sync = NeighbourSync {
            ifname: uplink.to_owned(),
            ifindex: 0,
            gateway_v4: underlay.gateway_v4,
            gateway_v6: underlay.gateway_v6,
            config,
            sys,
            seq: 0,
            targets: HashMap::new(),
            next_dump: None,
            scratch: Vec::new(),
        };
        sync.ifindex = sync.lookup_ifindex().map_err(|source| match source.raw_os_error() {
            Some(libc::ENODEV) => NeighbourError::NoInterface { ifname: uplink.to_owned(), source },
            _ => sync.kernel(Op::Link)(source),
        })?;
        Ok(sync)
    }

    /// The uplink's index now, asked of the sockets' namespace; `ENODEV` when it has none.
    fn lookup_ifindex(&mut self) -> io::Result<u32> {
        let seq = self.next_seq();
        let reply = self.sys.request(&netlink::get_link(seq, &self.ifname), seq)?;
        for (_, m) in netlink::split(&reply).map_err(io::Error::other)? {
            match netlink::decode(m, 0) {
                Reply::Link(index) => return Ok(index),
                Reply::Error(e) => return Err(e),
                _ => {}
            }
        }
        Err(io::Error::other("the kernel's answer holds no interface"))
    }

    /// Follow a change of the underlay's gateways (with new [`Tables`] made for a new
    /// [`Underlay`]).
    pub fn set_underlay(&mut self, underlay: &Underlay) {
        self.gateway_v4 = underlay.gateway_v4;
        self.gateway_v6 = underlay.gateway_v6;
    }

    /// The uplink's name.
    pub fn uplink(&self) -> &str {
        &self.ifname
    }

    /// The uplink's interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The descriptor that turns readable when the kernel announces a neighbour change; `None`
    /// without notifications. Poll it with the control loop's other descriptors and call
    /// [`NeighbourSync::sync`] when it is readable.
    pub fn notification_fd(&self) -> Option<BorrowedFd<'_>> {
        self.sys.notification_fd()
    }

    /// When [`NeighbourSync::sync`] should run next, at the latest: the next dump or the next
    /// expiry of a learned entry, whichever comes first (`now` when a dump is already due).
    pub fn next_sync(&self, tables: &Tables, now: Instant) -> Instant {
        let dump = self.next_dump.unwrap_or(now);
        tables.next_neighbour_expiry().map_or(dump, |e| e.min(dump))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn kernel(&self, op: Op) -> impl FnOnce(io::Error) -> NeighbourError {
        let ifname = self.ifname.clone();
        move |source| NeighbourError::Kernel { ifname, op, source }
    }

    fn changed(&self, now: Option<u32>) -> NeighbourError {
        NeighbourError::InterfaceChanged { ifname: self.ifname.clone(), old: self.ifindex, now }
    }

    fn stream(&self, op: Op) -> impl FnOnce(StreamError) -> NeighbourError {
        let ifname = self.ifname.clone();
        move |e| match e {
            StreamError::Decode(source) => NeighbourError::Decode { ifname, op, source },
            StreamError::Refused(source) => NeighbourError::Kernel { ifname, op, source },
        }
    }

    /// Bring ferry's neighbour table in step with the kernel's: read the notifications queued
    /// since the last call, dump the kernel's entries when a dump is due, learn what the wanted
    /// addresses resolve to, make the kernel resolve those that need it, and expire the learned
    /// entries that aged out. Call it at [`NeighbourSync::next_sync`] and whenever
    /// [`NeighbourSync::notification_fd`] is readable.
    ///
    /// # Errors
    /// The uplink is gone or was replaced, the kernel refused or did not answer a dump, a route
    /// query or a probe in a way that no retry fixes (a missing privilege), or its answer could
    /// not be framed. What was learned before the error stays learned (and published).
    pub fn sync(&mut self, tables: &mut Tables, now: Instant) -> Result<SyncReport, NeighbourError> {
        let mut report = SyncReport::default();
        let wanted = self.wanted(tables);

        let mut seen: HashMap<IpAddr, KernelNeighbour> = HashMap::new();
        let overflowed = self.read_notifications(&mut seen, &mut report)?;
        let full = overflowed || self.next_dump.is_none_or(|t| now >= t);
        if full {
            // The dump is newer than every notification read above, so it replaces them.
            seen = self.dump(&mut report)?;
            self.next_dump = Some(now + self.config.dump_interval);
            report.dumped = true;
        }

        // One batch, so the tables publish at most once per sync however many entries changed.
        let learned: Vec<(IpAddr, MacAddr)> = seen
            .iter()
            .filter(|(addr, _)| wanted.contains_key(addr))
            .filter_map(|(_, entry)| learnable(tables, entry, now, &mut report))
            .collect();
        report.publications.extend(tables.learn_neighbours(learned, now));
        if full {
            for (&addr, &role) in &wanted {
                self.maybe_probe(tables, addr, role, seen.get(&addr), now, &mut report)?;
            }
            self.targets.retain(|addr, _| wanted.contains_key(addr));
        }
        if tables.next_neighbour_expiry().is_some_and(|t| t <= now) {
            report.publications.extend(tables.expire_neighbours(now));
        }
        Ok(report)
    }

    /// The addresses whose MACs the tables can use: every node's underlay address, and the
    /// gateway of each family that has nodes (the tables' fallback, [`Tables`]' own rule).
    fn wanted(&self, tables: &Tables) -> HashMap<IpAddr, Role> {
        let nodes = &tables.desired().nodes;
        let mut wanted = HashMap::with_capacity(nodes.len() + 2);
        let (mut v4, mut v6) = (false, false);
        for node in nodes {
            wanted.insert(node.underlay, Role::Node);
            v4 |= node.underlay.is_ipv4();
            v6 |= node.underlay.is_ipv6();
        }
        // A gateway that is also a node is still a gateway: on-link by configuration.
        if let Some(gw) = self.gateway_v4.filter(|_| v4) {
            wanted.insert(IpAddr::V4(gw), Role::Gateway);
        }
        if let Some(gw) = self.gateway_v6.filter(|_| v6) {
            wanted.insert(IpAddr::V6(gw), Role::Gateway);
        }
        wanted
    }

    /// Read the queued notifications into `seen`; true when some were lost (a dump is needed).
    fn read_notifications(
        &mut self,
        seen: &mut HashMap<IpAddr, KernelNeighbour>,
        report: &mut SyncReport,
    ) -> Result<bool, NeighbourError> {
        self.scratch.clear();
        let overflowed = match self.sys.notifications(&mut self.scratch) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
            Err(e) => return Err(self.kernel(Op::Notifications)(e)),
        };
        let mut entries = Vec::new();
        // Notifications are decoded message by message: one the crate cannot read is skipped.
        report.undecodable +=
            netlink::decode_all(&self.scratch, self.ifindex, &mut entries).map_err(self.stream(Op::Notifications))?;
        report.notifications += entries.len();
        // In arrival order: the last word on an address wins.
        seen.extend(entries.into_iter().map(|n| (n.addr, n)));
        Ok(overflowed)
    }

    /// Dump the uplink's entries, after checking that the uplink is still the same interface.
    fn dump(&mut self, report: &mut SyncReport) -> Result<HashMap<IpAddr, KernelNeighbour>, NeighbourError> {
        match self.lookup_ifindex() {
            Ok(i) if i == self.ifindex => {}
            Ok(i) => return Err(self.changed(Some(i))),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Err(self.changed(None)),
            Err(e) => return Err(self.kernel(Op::Link)(e)),
        }
        let seq = self.next_seq();
        let reply =
            self.sys.request(&netlink::dump_neighbours(seq, self.ifindex), seq).map_err(self.kernel(Op::Dump))?;
        let mut entries = Vec::new();
        report.undecodable += netlink::decode_all(&reply, self.ifindex, &mut entries).map_err(self.stream(Op::Dump))?;
        Ok(entries.into_iter().map(|n| (n.addr, n)).collect())
    }

    /// Make the kernel resolve `addr` if its entry is missing, FAILED or STALE and its probe time
    /// has come.
    fn maybe_probe(
        &mut self,
        tables: &Tables,
        addr: IpAddr,
        role: Role,
        entry: Option<&KernelNeighbour>,
        now: Instant,
        report: &mut SyncReport,
    ) -> Result<(), NeighbourError> {
        if tables.neighbours().get(addr).is_some_and(|n| n.origin == Origin::Static) {
            return Ok(());
        }
        let stale = entry.is_some_and(|e| e.usable_mac().is_some() && e.state.is_stale());
        // INCOMPLETE: the kernel is resolving already. A valid state without a MAC cannot be
        // helped by asking again.
        let missing = entry.is_none_or(|e| !e.state.is_valid() && !e.state.is_in_progress());
        if !stale && !missing {
            // Resolved or in progress: the next episode starts from the shortest interval.
            if let Some(t) = self.targets.get_mut(&addr) {
                t.interval = Duration::ZERO;
            }
            return Ok(());
        }
        if missing && role == Role::Node && !self.on_link(addr, now, report)? {
            return Ok(());
        }
        let target = self.targets.entry(addr).or_default();
        if target.last_probe.is_some_and(|last| now < last + target.interval) {
            return Ok(());
        }
        target.last_probe = Some(now);
        target.interval = if stale || target.interval.is_zero() {
            self.config.probe_interval
        } else {
            (target.interval * 2).min(self.config.max_probe_interval)
        };
        match self.probe(addr) {
            Ok(()) => report.probed.push(addr),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                return Err(NeighbourError::ProbeDenied { ifname: self.ifname.clone(), addr, source: e });
            }
            Err(e) => report.probe_failures.push((addr, e)),
        }
        Ok(())
    }

    fn probe(&mut self, addr: IpAddr) -> io::Result<()> {
        match self.config.probe {
            ProbeMethod::Datagram => self.sys.send_datagram(addr),
            ProbeMethod::Netlink => {
                let seq = self.next_seq();
                let reply = self.sys.request(&netlink::use_neighbour(seq, addr, self.ifindex), seq)?;
                expect_ack(&reply)
            }
        }
    }

    /// Whether the kernel routes node `addr` on-link out of the uplink (asking it when the cached
    /// answer is older than `route_ttl`, and reporting what is wrong when it asks).
    fn on_link(&mut self, addr: IpAddr, now: Instant, report: &mut SyncReport) -> Result<bool, NeighbourError> {
        let ttl = self.config.route_ttl;
        let cached = self
            .targets
            .get(&addr)
            .and_then(|t| t.path.as_ref())
            .filter(|(_, asked)| now < *asked + ttl)
            .map(|(p, _)| p.clone());
        let path = match cached {
            Some(p) => p,
            None => {
                let p = self.route(addr)?;
                match &p {
                    Path::OnLink => {}
                    Path::Via(via) => {
                        let configured = match addr {
                            IpAddr::V4(_) => self.gateway_v4.map(IpAddr::V4),
                            IpAddr::V6(_) => self.gateway_v6.map(IpAddr::V6),
                        };
                        match configured {
                            None => report.issues.push(PathIssue::NoGateway { node: addr, via: *via }),
                            Some(c) if c != *via => {
                                report.issues.push(PathIssue::OtherGateway { node: addr, via: *via, configured: c });
                            }
                            Some(_) => {}
                        }
                    }
                    Path::NoRoute(reason) => {
                        report.issues.push(PathIssue::NoRoute { node: addr, reason: reason.clone() });
                    }
                }
                match self.targets.entry(addr) {
                    Entry::Occupied(mut o) => o.get_mut().path = Some((p.clone(), now)),
                    Entry::Vacant(v) => {
                        v.insert(Target { path: Some((p.clone(), now)), ..Target::default() });
                    }
                }
                p
            }
        };
        Ok(path == Path::OnLink)
    }

    /// The kernel's route to `addr`, as the kernel answers `ip route get`.
    fn route(&mut self, addr: IpAddr) -> Result<Path, NeighbourError> {
        let seq = self.next_seq();
        let reply = self.sys.request(&netlink::get_route(seq, addr), seq).map_err(self.kernel(Op::Route(addr)))?;
        let messages = netlink::split(&reply).map_err(|e| self.stream(Op::Route(addr))(StreamError::Decode(e)))?;
        for (_, m) in messages {
            match netlink::decode(m, self.ifindex) {
                Reply::Route(p) => return Ok(p),
                // ENETUNREACH, EHOSTUNREACH...: an answer about the route, not a failure.
                Reply::Error(e) => return Ok(Path::NoRoute(e.to_string())),
                _ => {}
            }
        }
        Err(NeighbourError::Decode {
            ifname: self.ifname.clone(),
            op: Op::Route(addr),
            source: "no route message in the kernel's answer".into(),
        })
    }
}

/// `Ok` when `reply` is an acknowledgement, the kernel's errno otherwise.
fn expect_ack(reply: &[u8]) -> io::Result<()> {
    for (_, m) in netlink::split(reply).map_err(io::Error::other)? {
        match netlink::decode(m, 0) {
            Reply::Ack => return Ok(()),
            Reply::Error(e) => return Err(e),
            _ => {}
        }
    }
    Err(io::Error::other("the kernel's answer holds no acknowledgement"))
}

/// The address and MAC to learn from `entry`, if it has a MAC the kernel would use and ferry's
/// entry is not static; records in `report` what learning it will change.
fn learnable(
    tables: &Tables,
    entry: &KernelNeighbour,
    now: Instant,
    report: &mut SyncReport,
) -> Option<(IpAddr, MacAddr)> {
    let mac = entry.usable_mac()?;
    let addr = entry.addr;
    if tables.neighbours().get(addr).is_some_and(|n| n.origin == Origin::Static) {
        return None;
    }
    match tables.neighbours().mac(addr, now) {
        None => report.added.push((addr, mac)),
        Some(old) if old != mac => report.changed.push(MacChange { addr, old, new: mac }),
        Some(_) => report.confirmed += 1,
    }
    Some((addr, mac))
}

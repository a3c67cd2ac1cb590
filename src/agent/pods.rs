//! Pods on this node (setup side): attaching a pod's interface to every worker, registering its
//! addresses in the forwarding tables, and keeping a record on disk so that a restarted agent
//! re-attaches the pods it had without the pods noticing.
//!
//! - A veth pod: one AF_XDP socket per worker on the host-side veth, on the worker's queue, behind
//!   a pod XDP program.
//! - A tap pod: one queue of the pod's persistent tap per worker, opened inside the pod's network
//!   namespace (where the tap lives), no XDP program. The tap outlives the agent; a restarted
//!   agent opens its queues again.
//! - A veth pod under flow offload (`dataplane.offload = "tc"`): no XDP program (the pod keeps
//!   TSO); the offload's TC program on the host veth moves offloaded flows and hands everything
//!   else to the pod's own persistent tap in the node's namespace (`ft` and a hash of the pod id),
//!   whose queues ferry serves as for a tap pod; what ferry writes there goes into the pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_dataplane::pipeline::{PortId, PortRole};
use ferry_dataplane::port::any::NodePort;
use ferry_dataplane::port::tap::{self, TapConfig, TapPort};
use ferry_dataplane::port::xsk::{self, XskMemHandle, XskPort, XskPortConfig};
use ferry_dataplane::worker::PortControl;
use ferry_dataplane::xdp::offload::{Offload, TcxLink};
use ferry_dataplane::xdp::{PodConfig, XdpAttachment, XdpMode, XdpProgram};
use ferry_encap::MacAddr;
use ferry_tables::{LocalPod, Tables};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::lock;
use crate::admin::{PodPort, PodSpec};
use crate::netlink::Netlink;

/// How long a worker may take to apply a port change.
const PORT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One worker, as seen from the setup side.
#[derive(Debug, Clone)]
pub(super) struct WorkerHandle {
    /// Opens sockets on the worker's UMEM.
    pub(super) mem: XskMemHandle,
    /// Adds and removes the worker's ports.
    pub(super) control: PortControl<NodePort>,
    /// The worker's queue on every interface.
    pub(super) queue: u32,
}

pub(super) use crate::admin::proto::PortInfo;

/// A record on disk: what is needed to attach the pod again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    pod: PodSpec,
}

#[derive(Debug)]
struct Attached {
    spec: PodSpec,
    mac: MacAddr,
    port: PortId,
    /// The pod XDP program of a veth pod (a tap pod has none).
    xdp: Option<XdpAttachment>,
    /// What its program's `backends` map holds (see [`Pods::sync_backends`]), and for which
    /// services generation.
    backends: std::collections::BTreeSet<(std::net::IpAddr, u16, u8)>,
    backends_generation: Option<u64>,
    /// What its program's `isolated` flag says (see [`Pods::sync_isolation`]); `None` before the
    /// first write and after a failed one.
    isolated: Option<bool>,
    /// Under flow offload: its tap and the TC programs' links.
    offloaded: Option<OffloadedPod>,
}

/// A veth pod's wiring under flow offload.
#[derive(Debug)]
struct OffloadedPod {
    /// The host veth's and the tap's TCX links (dropped first: the programs go).
    links: [TcxLink; 2],
    tap: String,
    veth_index: u32,
    tap_index: u32,
}

/// Why a pod could not be attached.
#[derive(Debug, thiserror::Error)]
pub(super) enum PodError {
    /// The request is inconsistent.
    #[error("pod {id}: {reason}")]
    Invalid {
        /// The pod.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The data plane refused.
    #[error("pod {id}: {what}: {reason}")]
    Dataplane {
        /// The pod.
        id: String,
        /// The step.
        what: &'static str,
        /// The error.
        reason: String,
    },
}

/// Every port the agent serves besides the uplink, and the pods behind them.
#[derive(Debug)]
pub(super) struct Pods {
    workers: Vec<WorkerHandle>,
    port_cfg: XskPortConfig,
    xdp: PodConfig,
    xdp_mode: XdpMode,
    pod_cidrs: Vec<IpNet>,
    tables: Arc<Mutex<Tables>>,
    records: PathBuf,
    pods: BTreeMap<String, Attached>,
    /// Port id -> what it is (the uplink and the host port included).
    ports: Arc<Mutex<BTreeMap<u16, PortInfo>>>,
    max_ports: u16,
    /// How pod taps are opened (super-packets handed to the worker whole when the uplink is a UDP
    /// socket).
    tap_cfg: TapConfig,
    /// Whether the workers have a host exit (a host port): the way to the node's kernel for what
    /// an isolated veth pod sends outside the pod networks.
    host_exit: bool,
    /// Warned that veth pods' traffic to outside the pod networks is not judged (no host exit).
    warned_no_exit: bool,
    /// The newest policy generation the `isolated` flags were written for: an older one (the main
    /// loop's pass, which read the policy before a publication's hook ran) must not undo them.
    isolation_generation: u64,
    /// Flow offload, when on: veth pods are wired through it (see the top).
    offload: Option<Arc<Offload>>,
}

impl Pods {
    /// A registry over running workers. `ports` already lists the ports the agent made itself.
    #[expect(clippy::too_many_arguments, reason = "one-time construction from the agent's startup")]
    pub(super) fn new(
        workers: Vec<WorkerHandle>,
        port_cfg: XskPortConfig,
        xdp: PodConfig,
        xdp_mode: XdpMode,
        pod_cidrs: Vec<IpNet>,
        tables: Arc<Mutex<Tables>>,
        state_dir: &Path,
        ports: Arc<Mutex<BTreeMap<u16, PortInfo>>>,
        max_ports: u16,
    ) -> std::io::Result<Self> {
        let records = state_dir.join("pods");
        std::fs::create_dir_all(&records)?;
        Ok(Pods {
            workers,
            port_cfg,
            xdp,
            xdp_mode,
            pod_cidrs,
            tables,
            records,
            pods: BTreeMap::new(),
            ports,
            max_ports,
            tap_cfg: TapConfig::default(),
            host_exit: false,
            warned_no_exit: false,
            isolation_generation: 0,
            offload: None,
        })
    }

    /// Keep each veth pod's program handing ferry its replies as a local endpoint of an
    /// `externalTrafficPolicy: Local` service (its `backends` map): only what changed is written.
    /// A tap pod needs nothing (ferry sees all it sends).
    pub(super) fn sync_backends(&mut self, services: &ferry_tables::Services) {
        let generation = services.generation();
        for a in self.pods.values_mut() {
            let Some(x) = &a.xdp else { continue };
            if a.backends_generation == Some(generation) {
                continue;
            }
            let mut want = std::collections::BTreeSet::new();
            for s in services.iter().filter(|s| s.external().local && !s.external().is_empty()) {
                for b in s.local_backends().iter().filter(|b| a.spec.addrs.contains(&b.addr)) {
                    want.insert((b.addr, b.port, s.protocol().number()));
                }
            }
            let mut ok = true;
            for &(addr, port, proto) in a.backends.difference(&want) {
                ok &= x
                    .program()
                    .set_backend(addr, port, proto, false)
                    .inspect_err(|e| tracing::warn!("pod program: {e}"))
                    .is_ok();
            }
            for &(addr, port, proto) in want.difference(&a.backends) {
                ok &= x
                    .program()
                    .set_backend(addr, port, proto, true)
                    .inspect_err(|e| tracing::warn!("pod program: {e}"))
                    .is_ok();
            }
            a.backends = want;
            // A failed write is tried again with the next generation.
            a.backends_generation = ok.then_some(generation);
        }
    }

    /// Keep each veth pod's program handing ferry everything the pod sends while NetworkPolicy
    /// selects the pod (its `isolated` flag), so that its egress rules judge its traffic to outside
    /// the pod networks too (ferry hands what they allow to the node's kernel through the host
    /// port) and its connections there are tracked (the replies come back through the host port,
    /// where the pod's ingress rules would otherwise judge them as new connections: hence any
    /// direction, not only egress). Pods no policy selects keep the kernel's direct path. Only
    /// what changed is written. Called with each policy publication and from the main loop (new
    /// pods, failed writes), which may hand it tables older than the last ones it wrote: those are
    /// ignored. A tap pod needs nothing (ferry sees all it sends).
    pub(super) fn sync_isolation(&mut self, policy: &ferry_tables::policy::PolicyTables) {
        if policy.generation() < self.isolation_generation {
            return;
        }
        self.isolation_generation = policy.generation();
        let mut unjudged = Vec::new();
        for a in self.pods.values_mut() {
            let Some(x) = &a.xdp else { continue };
            let selected = a.spec.addrs.iter().any(|addr| policy.local(*addr).is_some());
            // Without a host exit ferry could only drop what it took: leave it to the kernel.
            let want = selected && self.host_exit;
            if selected && !self.host_exit {
                unjudged.push(a.spec.id.clone());
            }
            if a.isolated == Some(want) {
                continue;
            }
            a.isolated = x
                .program()
                .set_isolated(want)
                .inspect_err(|e| tracing::warn!(pod = %a.spec.id, "pod program: {e}"))
                .ok()
                .map(|()| want);
            tracing::debug!(pod = %a.spec.id, isolated = want, "pod program: isolation flag");
        }
        if !unjudged.is_empty() && !self.warned_no_exit {
            self.warned_no_exit = true;
            tracing::warn!(
                pods = ?unjudged,
                "NetworkPolicy selects veth pods but this node has no host port (host.interface): \
                 their traffic to outside the pod networks goes to the node's kernel unjudged"
            );
        }
    }

    /// Whether the workers have a host exit (see [`Pods::sync_isolation`]).
    pub(super) fn set_host_exit(&mut self, on: bool) {
        self.host_exit = on;
    }

    /// Open pod taps with `cfg` from now on.
    pub(super) fn set_tap_config(&mut self, cfg: TapConfig) {
        self.tap_cfg = cfg;
    }

    /// Wire veth pods through flow offload from now on.
    pub(super) fn set_offload(&mut self, offload: Option<Arc<Offload>>) {
        self.offload = offload;
    }

    /// Attaches a veth pod under flow offload as port `id`: its tap in this namespace (made if it
    /// is not there yet, as after a restart it is), one tap queue per worker, then the TC programs
    /// on the veth and the tap.
    ///
    /// # Errors
    /// A step that failed, described; nothing stays attached (a tap just made is removed).
    fn attach_offloaded(&self, offload: &Offload, spec: &PodSpec, id: PortId) -> Result<OffloadedPod, String> {
        let nl = Netlink::open().map_err(|e| e.to_string())?;
        let veth = nl
            .link(&spec.host_ifname)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("there is no veth {} in the node's namespace", spec.host_ifname))?;
        let tap_name = offload_tap_name(&spec.id);
        let made = if nl.link(&tap_name).map_err(|e| e.to_string())?.is_none() {
            tap::create_persistent(None, &tap_name, None, self.workers.len() as u32)
                .map_err(|e| format!("making the pod's tap {tap_name}: {e}"))?;
            true
        } else {
            false
        };
        let undo_tap = || {
            if made {
                let _ = tap::delete(None, &tap_name);
            }
        };
        let tap_link = match nl.set_up(&tap_name).map_err(|e| e.to_string()).and_then(|()| {
            nl.link(&tap_name).map_err(|e| e.to_string())?.ok_or_else(|| format!("the tap {tap_name} went away"))
        }) {
            Ok(l) => l,
            Err(e) => {
                undo_tap();
                return Err(e);
            }
        };
        if let Err(e) = self.open_tap_queues(None, &tap_name, &format!("{tap_name}>{}", spec.host_ifname), id) {
            undo_tap();
            return Err(e);
        }
        match offload.attach_pod(id, veth.index, tap_link.index) {
            Ok(links) => Ok(OffloadedPod { links, tap: tap_name, veth_index: veth.index, tap_index: tap_link.index }),
            Err(e) => {
                for w in &self.workers {
                    let _ = w.control.remove(id, PORT_COMMAND_TIMEOUT);
                }
                undo_tap();
                Err(e.to_string())
            }
        }
    }

    /// Attaches an interface as port `id` on every worker (socket per worker on its queue, the pod
    /// XDP program in front).
    ///
    /// # Errors
    /// The first step that failed, described; nothing stays attached.
    pub(super) fn attach_port(&self, ifname: &str, id: PortId) -> Result<XdpAttachment, String> {
        let prog = XdpProgram::pod(&self.xdp, self.workers.len() as u32).map_err(|e| e.to_string())?;
        let mut added = Vec::new();
        let undo = |added: &[&WorkerHandle]| {
            for w in added {
                let _ = w.control.remove(id, PORT_COMMAND_TIMEOUT);
            }
        };
        for w in &self.workers {
            let port = match XskPort::open_shared(&w.mem, ifname, w.queue, &self.port_cfg) {
                Ok(p) => p,
                Err(e) => {
                    undo(&added);
                    return Err(e.to_string());
                }
            };
            if let Err(e) = prog.add_port(&port) {
                undo(&added);
                return Err(e.to_string());
            }
            if let Err(e) = w.control.add(id, NodePort::Xsk(port), PortRole::Pod, PORT_COMMAND_TIMEOUT) {
                undo(&added);
                return Err(e.to_string());
            }
            added.push(w);
        }
        let attached = prog.attach(ifname, self.xdp_mode).map_err(|e| e.to_string()).and_then(|a| {
            // The device's NAPI exists once the program is attached (veth); set its deferral then.
            match &self.port_cfg.busy_poll {
                Some(bp) => xsk::defer_interrupts(ifname, bp).map(|()| a).map_err(|e| e.to_string()),
                None => Ok(a),
            }
        });
        attached.inspect_err(|_| undo(&added))
    }

    /// Attaches a pod's tap as port `id` on every worker: one queue per worker, opened inside the
    /// pod's namespace.
    ///
    /// # Errors
    /// The tap is not there, or a queue could not be opened or added; nothing stays attached.
    fn attach_tap(&self, spec: &PodSpec, id: PortId) -> Result<(), String> {
        let netns = Path::new(&spec.netns);
        // Opening a queue of a tap that is not there would make a new one: look first.
        if !tap_exists(netns, &spec.host_ifname) {
            return Err(format!("there is no tap {} in {}", spec.host_ifname, netns.display()));
        }
        self.open_tap_queues(Some(netns), &spec.host_ifname, &tap_port_name(spec), id)
    }

    /// Opens one queue of tap `ifname` (in `netns`, or this namespace) per worker and adds it as
    /// port `id`, named `label/queue`.
    ///
    /// # Errors
    /// A queue could not be opened or added; nothing stays added.
    fn open_tap_queues(&self, netns: Option<&Path>, ifname: &str, label: &str, id: PortId) -> Result<(), String> {
        self.open_tap_queues_as(netns, ifname, label, id, PortRole::Pod)
    }

    fn open_tap_queues_as(
        &self,
        netns: Option<&Path>,
        ifname: &str,
        label: &str,
        id: PortId,
        role: PortRole,
    ) -> Result<(), String> {
        let mut added: Vec<&WorkerHandle> = Vec::new();
        for w in &self.workers {
            let name = format!("{label}/{}", w.queue);
            let at = netns.map_or_else(|| "the node's namespace".to_owned(), |n| n.display().to_string());
            let r = tap::open_queue(netns, ifname)
                .map_err(|e| format!("opening a queue of the tap {ifname} in {at}: {e}"))
                .and_then(|fd| {
                    let port = NodePort::from(TapPort::new(fd, &name, self.tap_cfg));
                    w.control.add(id, port, role, PORT_COMMAND_TIMEOUT).map_err(|e| e.to_string())
                });
            if let Err(e) = r {
                for w in added {
                    let _ = w.control.remove(id, PORT_COMMAND_TIMEOUT);
                }
                return Err(e);
            }
            added.push(w);
        }
        Ok(())
    }

    /// The tap through which services' ways in from outside reach ferry on a UDP uplink (see
    /// [`Offload::attach_external`]): made (or found) in the node's namespace, without IPv6 (it
    /// sends nothing of its own), opened on every worker as an uplink port. Its port id and
    /// ifindex.
    ///
    /// # Errors
    /// The first step that failed, described; nothing stays attached.
    pub(super) fn attach_services_tap(&self, ifname: &str) -> Result<(PortId, u32), String> {
        let id = self.free_port_id().ok_or("no free port for the services' tap (dataplane.max_ports)")?;
        let nl = Netlink::open().map_err(|e| e.to_string())?;
        if nl.link(ifname).map_err(|e| e.to_string())?.is_none() {
            tap::create_persistent(None, ifname, None, self.workers.len() as u32)
                .map_err(|e| format!("making the services' tap {ifname}: {e}"))?;
        }
        // No link-local address, no router solicitations: ferry would only drop them.
        let sysctl = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
        if std::path::Path::new(&sysctl).exists() {
            std::fs::write(&sysctl, "1").map_err(|e| format!("{sysctl}: {e}"))?;
        }
        nl.set_up(ifname).map_err(|e| e.to_string())?;
        let link = nl.link(ifname).map_err(|e| e.to_string())?.ok_or_else(|| format!("the tap {ifname} went away"))?;
        self.open_tap_queues_as(None, ifname, ifname, id, PortRole::Uplink)?;
        self.name_port(
            id,
            PortInfo {
                ifname: ifname.to_owned(),
                kind: "uplink".into(),
                io: "tap (services from outside)".into(),
                pod: None,
                addrs: Vec::new(),
                xdp_mode: "none (tc)".into(),
            },
        );
        Ok((id, link.index))
    }

    /// Detaches a port from every worker.
    pub(super) fn detach_port(&self, id: PortId) {
        for w in &self.workers {
            if let Err(e) = w.control.remove(id, PORT_COMMAND_TIMEOUT) {
                tracing::warn!(port = id.0, error = %e, "could not remove a port from a worker");
            }
        }
        lock(&self.ports).remove(&id.0);
    }

    pub(super) fn free_port_id(&self) -> Option<PortId> {
        let used = lock(&self.ports);
        (0..self.max_ports).find(|i| !used.contains_key(i)).map(PortId)
    }

    /// Registers a local endpoint (pod or host port) in the tables.
    ///
    /// # Errors
    /// The tables' refusal, as text.
    pub(super) fn register(&self, pod: LocalPod) -> Result<(), String> {
        let mut t = lock(&self.tables);
        let mut d = t.desired().clone();
        d.local_pods.retain(|p| p.port != pod.port);
        d.local_pods.push(pod);
        t.set_desired(d, Instant::now()).map(drop).map_err(|e| e.to_string())
    }

    fn unregister(&self, port: PortId) {
        let mut t = lock(&self.tables);
        let mut d = t.desired().clone();
        d.local_pods.retain(|p| p.port != port);
        if let Err(e) = t.set_desired(d, Instant::now()) {
            tracing::error!(port = port.0, error = %e, "could not remove a pod from the tables");
        }
    }

    /// Records an agent-made port in the port list.
    pub(super) fn name_port(&self, id: PortId, info: PortInfo) {
        lock(&self.ports).insert(id.0, info);
    }

    /// Adds (or confirms) a pod. Idempotent: the same pod again is a success without change; the
    /// same id with different wiring replaces the old.
    ///
    /// # Errors
    /// [`PodError`]; nothing of the pod stays attached.
    pub(super) fn add(&mut self, spec: PodSpec, persist: bool) -> Result<(), PodError> {
        let invalid = |reason: String| PodError::Invalid { id: spec.id.clone(), reason };
        if spec.id.is_empty() || spec.id.len() > 512 {
            return Err(invalid("the id must be 1 to 512 characters".into()));
        }
        let mac: MacAddr = spec.mac.parse().map_err(|_| invalid(format!("`{}` is not a MAC address", spec.mac)))?;
        if spec.addrs.is_empty() {
            return Err(invalid("the pod has no address".into()));
        }
        for a in &spec.addrs {
            if !self.pod_cidrs.iter().any(|c| c.contains(a)) {
                return Err(invalid(format!("{a} is not in this node's pod CIDRs {:?}", self.pod_cidrs)));
            }
            if let Some(other) = self.pods.values().find(|p| p.spec.id != spec.id && p.spec.addrs.contains(a)) {
                return Err(invalid(format!("{a} already belongs to pod {}", other.spec.id)));
            }
        }
        if let Some(old) = self.pods.get(&spec.id) {
            if old.spec == spec {
                return Ok(());
            }
            self.remove(&spec.id.clone());
        }
        let dataplane = |what, reason| PodError::Dataplane { id: spec.id.clone(), what, reason };
        let port = self.free_port_id().ok_or_else(|| {
            dataplane("attaching its interface", format!("no free port: all {} are in use", self.max_ports))
        })?;
        let mut offloaded = None;
        let xdp = match (spec.kind, &self.offload) {
            (PodPort::Veth, Some(offload)) => {
                offloaded = Some(
                    self.attach_offloaded(offload, &spec, port).map_err(|r| dataplane("attaching its interface", r))?,
                );
                None
            }
            (PodPort::Veth, None) => {
                Some(self.attach_port(&spec.host_ifname, port).map_err(|r| dataplane("attaching its interface", r))?)
            }
            (PodPort::Tap, _) => {
                self.attach_tap(&spec, port).map_err(|r| dataplane("attaching its tap", r))?;
                None
            }
        };
        let (ifname, io) = match (spec.kind, &offloaded) {
            (PodPort::Veth, Some(o)) => (format!("{}>{}", o.tap, spec.host_ifname), "tap+tc"),
            (PodPort::Veth, None) => (spec.host_ifname.clone(), "af_xdp"),
            (PodPort::Tap, _) => (tap_port_name(&spec), "tap"),
        };
        self.name_port(
            port,
            PortInfo {
                ifname,
                kind: "pod".into(),
                io: io.into(),
                pod: Some(spec.id.clone()),
                addrs: spec.addrs.clone(),
                xdp_mode: xdp.as_ref().map_or_else(|| "none".to_owned(), |x| format!("{:?}", x.mode()).to_lowercase()),
            },
        );
        if let Err(reason) = self.register(LocalPod { port, mac, addrs: spec.addrs.clone(), source_only: vec![] }) {
            drop(xdp);
            let tap = self.unwire_offloaded(port, offloaded);
            self.detach_port(port);
            delete_offload_tap(tap);
            return Err(PodError::Dataplane { id: spec.id.clone(), what: "registering its addresses", reason });
        }
        if persist && let Err(e) = self.save(&spec) {
            tracing::warn!(pod = %spec.id, error = %e, "could not record the pod; it will not survive a restart");
        }
        tracing::info!(pod = %spec.id, kind = spec.kind.name(), ifname = %spec.host_ifname, port = port.0, addrs = ?spec.addrs, "pod attached");
        self.pods.insert(
            spec.id.clone(),
            Attached {
                spec,
                mac,
                port,
                xdp,
                backends: Default::default(),
                backends_generation: None,
                isolated: None,
                offloaded,
            },
        );
        // Policies that already select the pod: its flag before its first packet.
        let policy = Arc::clone(lock(&self.tables).policy());
        self.sync_isolation(&policy);
        Ok(())
    }

    /// Removes a pod; `false` if it was unknown. Its record goes too.
    pub(super) fn remove(&mut self, id: &str) -> bool {
        let _ = std::fs::remove_file(self.record_path(id));
        let Some(p) = self.pods.remove(id) else { return false };
        self.unregister(p.port);
        // Detach the program first so that nothing is redirected to sockets about to close.
        drop(p.xdp);
        let tap = self.unwire_offloaded(p.port, p.offloaded);
        self.detach_port(p.port);
        delete_offload_tap(tap);
        tracing::info!(pod = %id, port = p.port.0, "pod detached");
        true
    }

    /// Undo [`Pods::attach_offloaded`]'s programs and entries; the pod's tap is returned, for
    /// [`delete_offload_tap`] once the workers have closed its queues when the pod is gone (at
    /// shutdown it stays for the next agent).
    fn unwire_offloaded(&self, port: PortId, offloaded: Option<OffloadedPod>) -> Option<String> {
        let (Some(o), Some(offload)) = (offloaded, &self.offload) else { return None };
        drop(o.links);
        offload.detach_pod(port, o.veth_index, o.tap_index);
        Some(o.tap)
    }

    /// Whether the pod is attached exactly as `spec` says, and why not.
    pub(super) fn check(&self, spec: &PodSpec) -> Result<(), String> {
        match self.pods.get(&spec.id) {
            None => Err(format!("pod {} is not registered", spec.id)),
            Some(p) if p.spec != *spec => Err(format!("pod {} is registered as {:?}", spec.id, p.spec)),
            Some(p) => {
                let snap = lock(&self.tables).current();
                for a in &spec.addrs {
                    if snap.local_pod(*a) != Some((p.port, p.mac)) {
                        return Err(format!("{a} does not lead to pod {}'s port", spec.id));
                    }
                }
                Ok(())
            }
        }
    }

    /// The pods, by id.
    pub(super) fn list(&self) -> Vec<(PodSpec, PortId)> {
        self.pods.values().map(|p| (p.spec.clone(), p.port)).collect()
    }

    /// Re-attaches the pods recorded on disk whose interface still exists (`exists`); forgets the
    /// others.
    pub(super) fn restore(&mut self, mut exists: impl FnMut(&PodSpec) -> bool) {
        let Ok(dir) = std::fs::read_dir(&self.records) else { return };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record: Option<Record> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let Some(record) = record else {
                tracing::warn!(path = %path.display(), "unreadable pod record; removing it");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let id = record.pod.id.clone();
            if !exists(&record.pod) {
                tracing::info!(pod = %id, ifname = %record.pod.host_ifname, "pod interface gone; forgetting the pod");
                let _ = std::fs::remove_file(&path);
                // Deleted while no agent ran: its offload tap (in this namespace) goes too.
                let tap = offload_tap_name(&id);
                if self.offload.is_some() && Netlink::open().ok().and_then(|nl| nl.link(&tap).ok().flatten()).is_some()
                {
                    delete_offload_tap(Some(tap));
                }
                continue;
            }
            match self.add(record.pod, false) {
                Ok(()) => tracing::info!(pod = %id, "pod restored"),
                Err(e) => tracing::warn!(error = %e, "could not restore a pod (its record is kept)"),
            }
        }
    }

    /// Detaches everything (at shutdown; the records and the pods' wiring stay).
    pub(super) fn detach_all(&mut self) {
        for (_, p) in std::mem::take(&mut self.pods) {
            drop(p.xdp);
            self.unwire_offloaded(p.port, p.offloaded);
            self.detach_port(p.port);
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        // Ids are `<container id>/<ifname>`: keep them readable but make them one file name.
        let name: String =
            id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let short: String = name.chars().take(100).collect();
        self.records.join(format!("{short}-{hash:016x}.json"))
    }

    fn save(&self, spec: &PodSpec) -> std::io::Result<()> {
        let path = self.record_path(&spec.id);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&Record { pod: spec.clone() }).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }
}

/// Whether the pod's namespace at `netns` holds a tap named `ifname`.
pub(super) fn tap_exists(netns: &Path, ifname: &str) -> bool {
    Netlink::open_in_netns(netns)
        .ok()
        .and_then(|nl| nl.link(ifname).ok().flatten())
        .is_some_and(|l| l.kind.as_deref() == Some("tun"))
}

/// How a tap pod's port is named in status and statistics: the tap and the namespace it is in
/// (every tap pod's interface has the same name, `eth0`).
fn tap_port_name(spec: &PodSpec) -> String {
    let ns =
        Path::new(&spec.netns).file_name().map_or_else(|| spec.netns.clone(), |n| n.to_string_lossy().into_owned());
    format!("{}@{ns}", spec.host_ifname)
}

/// The node-side tap of a veth pod under flow offload: `ft` and 8 hex digits of a hash of the pod
/// id (an interface name has at most 15 bytes).
fn offload_tap_name(id: &str) -> String {
    let hash = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("ft{hash:08x}")
}

/// Remove a gone pod's tap (see [`Pods::unwire_offloaded`]).
fn delete_offload_tap(tap: Option<String>) {
    if let Some(tap) = tap
        && let Err(e) = tap::delete(None, &tap)
    {
        tracing::warn!(%tap, error = %e, "could not remove a pod's tap");
    }
}

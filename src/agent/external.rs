//! Services reached from outside the cluster, the agent's side (control side, never per packet):
//!
//! - [`FrontendSync`] keeps the uplink program's `frontends` map (the AF_XDP uplink's XDP program,
//!   or the UDP uplink's TC program) equal to the published services' ways in (node ports on this
//!   node's address, external and load-balancer IPs), so that exactly those packets reach ferry and
//!   everything else stays with the kernel. It runs from the
//!   agent's main loop (every 100 ms), and writes only what changed.
//! - [`HealthServer`] answers each `healthCheckNodePort` of an `externalTrafficPolicy: Local`
//!   service as kube-proxy does: plain HTTP on the node's address, `200` with the number of local
//!   endpoints when there is at least one, `503` otherwise, and kube-proxy's JSON body.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_dataplane::xdp::offload::Offload;
use ferry_dataplane::xdp::{XdpError, XdpProgram};
use ferry_tables::{Frontend, Services};

/// What the uplink program's map holds, and the services generation it was written for.
#[derive(Debug, Default)]
pub(crate) struct FrontendSync {
    generation: Option<u64>,
    written: BTreeSet<Frontend>,
    failed: bool,
}

/// A program's map of services' ways in: the AF_XDP uplink's XDP program, or the UDP uplink's TC
/// program.
pub(crate) trait FrontendMap {
    /// Hand packets to `addr:port` (`None`: the node's own address) to ferry, or stop.
    fn set_frontend(&self, addr: Option<IpAddr>, port: u16, proto: u8, on: bool) -> Result<(), XdpError>;
}

impl FrontendMap for XdpProgram {
    fn set_frontend(&self, addr: Option<IpAddr>, port: u16, proto: u8, on: bool) -> Result<(), XdpError> {
        XdpProgram::set_frontend(self, addr, port, proto, on)
    }
}

impl FrontendMap for Offload {
    fn set_frontend(&self, addr: Option<IpAddr>, port: u16, proto: u8, on: bool) -> Result<(), XdpError> {
        Offload::set_frontend(self, addr, port, proto, on)
    }
}

impl FrontendSync {
    /// Bring the program's map in line with `services` (nothing to do when their generation is the
    /// one last written). A failed write is logged once and retried with the next generation.
    pub(crate) fn sync(&mut self, prog: &impl FrontendMap, services: &Services) {
        if self.generation == Some(services.generation()) {
            return;
        }
        self.generation = Some(services.generation());
        let want: BTreeSet<Frontend> = services.frontends().into_iter().collect();
        let mut ok = true;
        for f in self.written.difference(&want) {
            if let Err(e) = prog.set_frontend(f.addr, f.port, f.protocol.number(), false) {
                ok = false;
                if !self.failed {
                    tracing::warn!("uplink program: {e}");
                }
            }
        }
        for f in want.difference(&self.written) {
            if let Err(e) = prog.set_frontend(f.addr, f.port, f.protocol.number(), true) {
                ok = false;
                if !self.failed {
                    tracing::warn!("uplink program: {e}");
                }
            }
        }
        if ok && want != self.written {
            tracing::info!(frontends = want.len(), "services reachable from outside the cluster updated");
        }
        self.failed = !ok;
        self.written = want;
    }
}

/// What the health check node ports answer: port -> (`namespace`, `name`, local endpoints).
pub(crate) type HealthPorts = BTreeMap<u16, (String, String, usize)>;

/// The health check node ports of `services`: for each `externalTrafficPolicy: Local` service with
/// a `healthCheckNodePort`, its local endpoints (addresses, over all its ports).
pub(crate) fn health_ports(services: &Services) -> HealthPorts {
    let mut acc: BTreeMap<u16, (String, String, BTreeSet<IpAddr>)> = BTreeMap::new();
    for s in services.iter() {
        let ext = s.external();
        let Some(port) = ext.health_check_node_port.filter(|_| ext.local) else { continue };
        // `namespace/name:port` (the spec's name): kube-proxy names the Service.
        let base = s.name().split_once(':').map_or(s.name(), |(b, _)| b);
        let (ns, name) = base.split_once('/').unwrap_or(("", base));
        let e = acc.entry(port).or_insert_with(|| (ns.to_owned(), name.to_owned(), BTreeSet::new()));
        e.2.extend(s.local_backends().iter().map(|b| b.addr));
    }
    acc.into_iter().map(|(p, (ns, name, eps))| (p, (ns, name, eps.len()))).collect()
}

/// kube-proxy's answer for a service with `count` local endpoints: status line and body.
pub(crate) fn health_response(ns: &str, name: &str, count: usize) -> String {
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {ns:?},\n\t\t\"name\": {name:?}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": true\n}}"
    );
    let status = if count > 0 { "200 OK" } else { "503 Service Unavailable" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {count}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The health check server: one thread, one listener per port, on the node's address.
pub(crate) struct HealthServer {
    ports: Arc<Mutex<HealthPorts>>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Start serving on `addr` (ports as [`HealthServer::set`] gives them) until `stop`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn spawn(addr: IpAddr, stop: Arc<AtomicBool>) -> std::io::Result<HealthServer> {
        let ports: Arc<Mutex<HealthPorts>> = Arc::default();
        let shared = Arc::clone(&ports);
        let thread =
            std::thread::Builder::new().name("ferry-health".into()).spawn(move || serve(addr, &shared, &stop))?;
        Ok(HealthServer { ports, thread: Some(thread) })
    }

    /// The ports to answer and what to answer on each.
    pub(crate) fn set(&self, ports: HealthPorts) {
        let mut p = self.ports.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *p != ports {
            *p = ports;
        }
    }

    /// Wait for the thread (after `stop` was set).
    pub(crate) fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(addr: IpAddr, ports: &Mutex<HealthPorts>, stop: &AtomicBool) {
    let mut listeners: BTreeMap<u16, TcpListener> = BTreeMap::new();
    let mut refused: BTreeSet<u16> = BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        let want = ports.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        listeners.retain(|p, _| want.contains_key(p));
        refused.retain(|p| want.contains_key(p));
        for &p in want.keys() {
            if listeners.contains_key(&p) {
                continue;
            }
            match TcpListener::bind(SocketAddr::new(addr, p)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => {
                    tracing::info!(port = p, "health check node port listening");
                    refused.remove(&p);
                    listeners.insert(p, l);
                }
                Err(e) => {
                    if refused.insert(p) {
                        tracing::warn!(port = p, "health check node port: {e}");
                    }
                }
            }
        }
        // Wait for a connection on any of them (or 200 ms, to see changes and `stop`).
        let mut fds: Vec<libc::pollfd> =
            listeners.values().map(|l| libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            continue;
        }
        for (&p, l) in &listeners {
            while let Ok((stream, _)) = l.accept() {
                let (ns, name, count) = want.get(&p).cloned().unwrap_or_default();
                answer(stream, &health_response(&ns, &name, count));
            }
        }
    }
}

/// Read the request (what arrives within a short time: the answer does not depend on it) and
/// answer.
fn answer(mut stream: TcpStream, response: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let _ = stream.write_all(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_tables::{EndpointSpec, ExternalSpec, Protocol, ServiceSpec};

    #[test]
    fn health_ports_count_local_endpoints_as_kube_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let local = |a: &str| EndpointSpec { local: true, ..EndpointSpec::ready(ip(a), 8080) };
        let spec = |name: &str, port, eps: Vec<EndpointSpec>| ServiceSpec {
            name: name.into(),
            vip: ip("10.96.0.10"),
            port,
            protocol: Protocol::Tcp,
            endpoints: eps,
            affinity: None,
            external: ExternalSpec {
                node_port: Some(30000 + port),
                ips: Vec::new(),
                local: true,
                health_check_node_port: Some(32000),
            },
            internal_local: false,
        };
        let s = Services::build(
            &[
                spec(
                    "shop/web:http",
                    80,
                    vec![local("10.244.1.2"), local("10.244.1.3"), EndpointSpec::ready(ip("10.244.2.2"), 8080)],
                ),
                spec("shop/web:https", 443, vec![local("10.244.1.2")]),
            ],
            1,
        )
        .expect("valid");
        let h = health_ports(&s);
        assert_eq!(h.get(&32000), Some(&("shop".to_owned(), "web".to_owned(), 2)));
        let r = health_response("shop", "web", 2);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("\"localEndpoints\": 2"));
        assert!(health_response("shop", "web", 0).starts_with("HTTP/1.1 503 "));
    }
}

//! Test harness: starts the real servers (Debian's `etcd`, a `kube-apiserver` built by
//! `scripts/build-kube-apiserver.sh`) on 127.0.0.1 with temporary state, and kills them on drop.
//!
//! A test that needs a server asks for its binary ([`etcd_binary`], [`kube_apiserver_binary`]):
//! when it is missing the test FAILS if `CI` is set and is skipped otherwise
//! (`ferry_testsupport::skip`: printed, and recorded for `scripts/test.sh`).
//!
//! The control plane publishes as the agent wires it: [`TablesPublisher`] into the data plane's
//! real [`Tables`]; tests read what a worker reads, the published [`Snapshot`], through a
//! [`Reader`] ([`tables`]).

#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::{KubeAuth, TablesPublisher};
use ferry_encap::MacAddr;
use ferry_tables::{Reader, Route, Snapshot, Tables, Underlay};
use tempfile::TempDir;

/// The binary, or `None` after skipping `test` ([`ferry_testsupport::skip`]: a failure when `CI`
/// is set).
fn need(test: &str, what: &str, found: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    if found.is_none() {
        ferry_testsupport::skip(test, &format!("needs {what}: {how}"));
    }
    found
}

/// Debian's etcd (`FERRY_ETCD` overrides), for `test`.
pub(crate) fn etcd_binary(test: &str) -> Option<PathBuf> {
    let b = need_path(std::env::var_os("FERRY_ETCD").map(PathBuf::from), "etcd");
    need(test, "etcd", b, "install Debian's etcd-server (sudo scripts/test.sh does)")
}

/// The cached kube-apiserver (`FERRY_KUBE_APISERVER` overrides), for `test`.
pub(crate) fn kube_apiserver_binary(test: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("FERRY_CACHE_DIR").map_or_else(|| PathBuf::from("/var/cache/ferry"), PathBuf::from);
    let cached = std::fs::read_dir(&cache).ok().and_then(|dir| {
        dir.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("kube-apiserver-"))
            .map(|e| e.path().join("kube-apiserver"))
            .find(|p| p.is_file())
    });
    let b = std::env::var_os("FERRY_KUBE_APISERVER").map(PathBuf::from).filter(|p| p.is_file()).or(cached);
    need(test, "kube-apiserver", b, "build it once with: sudo scripts/build-kube-apiserver.sh")
}

fn need_path(explicit: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin").join(name), PathBuf::from("/usr/sbin").join(name)])
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (free when asked; servers bind it right after).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn spawn_logged(bin: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Plain HTTP GET on 127.0.0.1 (etcd's /health, the metrics endpoint): status line and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

/// A real etcd on loopback with a temporary data dir.
#[derive(Debug)]
pub(crate) struct Etcd {
    bin: PathBuf,
    dir: TempDir,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd and waits (bounded) until /health answers.
    pub(crate) fn start(bin: &Path) -> Etcd {
        let mut e =
            Etcd { bin: bin.to_owned(), dir: TempDir::new().expect("temp dir"), client: 0, peer: 0, child: None };
        for attempt in 0..3 {
            e.client = free_port();
            e.peer = free_port();
            match e.launch() {
                Ok(()) => return e,
                Err(msg) if attempt < 2 => eprintln!("etcd did not start ({msg}); retrying on other ports"),
                Err(msg) => panic!("etcd did not start: {msg}"),
            }
        }
        unreachable!()
    }

    fn launch(&mut self) -> Result<(), String> {
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let args = vec![
            "--name".into(),
            "ferry-test".into(),
            "--data-dir".into(),
            self.dir.path().join("data").display().to_string(),
            "--listen-client-urls".into(),
            url(self.client),
            "--advertise-client-urls".into(),
            url(self.client),
            "--listen-peer-urls".into(),
            url(self.peer),
            "--initial-advertise-peer-urls".into(),
            url(self.peer),
            "--initial-cluster".into(),
            format!("ferry-test={}", url(self.peer)),
            "--unsafe-no-fsync".into(),
        ];
        let log = self.dir.path().join("etcd.log");
        self.child = Some(spawn_logged(&self.bin, &args, &log));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", tail(&log)));
            }
            if http_get(addr, "/health").is_ok_and(|(_, body)| body.contains("true")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        kill(&mut self.child);
        Err(format!("/health did not answer within 20 s:\n{}", tail(&log)))
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// SIGKILL, as a crash would.
    pub(crate) fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same ports and data.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.launch().expect("etcd restarts");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real kube-apiserver on loopback (HTTPS, token auth, RBAC) backed by an [`Etcd`].
#[derive(Debug)]
pub(crate) struct KubeApiserver {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    etcd: String,
    child: Option<Child>,
}

/// The bearer token of the `system:masters` user the harness creates.
pub(crate) const ADMIN_TOKEN: &str = "ferry-test-admin-token";

impl KubeApiserver {
    /// Starts it and waits (bounded) until /readyz says ok.
    pub(crate) async fn start(bin: &Path, etcd: &Etcd) -> KubeApiserver {
        let dir = TempDir::new().expect("temp dir");
        let p = dir.path();
        std::fs::write(p.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"))
            .expect("tokens");
        std::fs::write(p.join("token"), ADMIN_TOKEN).expect("token");
        let key = p.join("sa.key");
        let openssl = |args: &[&str]| {
            let st = Command::new("openssl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
            assert!(st.is_ok_and(|s| s.success()), "openssl {args:?} failed (is openssl installed?)");
        };
        openssl(&["genrsa", "-out", &key.display().to_string(), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            &key.display().to_string(),
            "-pubout",
            "-out",
            &p.join("sa.pub").display().to_string(),
        ]);
        let mut k = KubeApiserver { bin: bin.to_owned(), dir, port: free_port(), etcd: etcd.endpoint(), child: None };
        k.launch().await;
        k
    }

    async fn launch(&mut self) {
        let p = self.dir.path();
        let d = |name: &str| p.join(name).display().to_string();
        let args: Vec<String> = vec![
            format!("--etcd-servers={}", self.etcd),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.port),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", d("certs")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--profiling=false".into(),
            // Dual-stack podCIDRs are alpha in 1.20; without the gate the server keeps only the first.
            "--feature-gates=IPv6DualStack=true".into(),
        ];
        let log = p.join("kube-apiserver.log");
        self.child = Some(spawn_logged(&self.bin, &args, &log));
        let client = ferry_control::source::kube::client(&self.auth_insecure()).await.expect("client");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("kube-apiserver exited with {status}:\n{}", tail(&log));
            }
            let req = http::Request::get("/readyz").body(Vec::new()).expect("request");
            if client.request_text(req).await.is_ok_and(|t| t.trim() == "ok") {
                return;
            }
            assert!(Instant::now() < deadline, "kube-apiserver not ready within 120 s:\n{}", tail(&log));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Token credentials verifying the server's self-signed certificate.
    pub(crate) fn auth(&self) -> KubeAuth {
        KubeAuth::Token {
            server: self.url(),
            token_file: self.dir.path().join("token"),
            ca_file: Some(self.dir.path().join("certs").join("apiserver.crt")),
            insecure: false,
        }
    }

    fn auth_insecure(&self) -> KubeAuth {
        KubeAuth::Token { server: self.url(), token_file: self.dir.path().join("token"), ca_file: None, insecure: true }
    }

    /// A client for the test itself.
    pub(crate) async fn client(&self) -> kube::Client {
        ferry_control::source::kube::client(&self.auth()).await.expect("client")
    }

    /// SIGKILL, as a crash would.
    pub(crate) fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port, certificates and etcd.
    pub(crate) async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}

impl Drop for KubeApiserver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// This node's underlay address in the tables, and its router's.
const UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

/// The data plane's tables behind the control plane's production publisher, and a worker's
/// reader of them. The underlay router's MAC is known, so every remote node with an IPv4 underlay
/// address resolves (through it) to a [`Route::Remote`] with its tunnel template.
pub(crate) fn tables() -> (TablesPublisher, Reader<Snapshot>) {
    let underlay =
        Underlay { gateway_v4: Some(ROUTER), ..Underlay::new(MacAddr([2, 0, 0, 0, 0xc8, 1]), Some(UNDERLAY), None) };
    let mut tables = Tables::new(underlay, Duration::from_secs(3600));
    let _ = tables.set_static_neighbour(ROUTER.into(), MacAddr([2, 0, 0, 0, 0xfe, 1]), Instant::now());
    let reader = tables.reader();
    (TablesPublisher::new(tables), reader)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The remote node's underlay address a packet to `dst` is tunnelled to, if it is.
pub(crate) fn underlay(s: &Snapshot, dst: &str) -> Option<IpAddr> {
    match s.route(ip(dst)) {
        Route::Remote { template, .. } => Some(template.remote()),
        _ => None,
    }
}

/// Whether `dst` is in this node's own pod CIDRs (a blackhole under the local pods' host routes).
pub(crate) fn is_own(s: &Snapshot, dst: &str) -> bool {
    matches!(s.route(ip(dst)), Route::Blackhole)
}

/// Whether any route covers `dst`.
pub(crate) fn has(s: &Snapshot, dst: &str) -> bool {
    !matches!(s.route(ip(dst)), Route::NoRoute)
}

/// Waits (bounded) until the published snapshot satisfies `pred`; panics with `what` and the
/// last snapshot's generation otherwise.
pub(crate) async fn wait_for(
    reader: &mut Reader<Snapshot>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = reader.load();
        if pred(s) {
            return Arc::clone(s);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last snapshot: generation {}",
            s.generation()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (bounded) for a condition that is not about the snapshot.
pub(crate) async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Logs to the test's output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

//! The live web view (setup side, issue 16): a read-only page and its JSON and streaming API,
//! served by the agent when `[web] address` is set.
//!
//! ```text
//! GET /                     the page (web/index.html, web/app.js, and preact + htm from npm)
//! GET /api/v1/node          this node: status, counters with rates, routes, flow events
//!                           (?flows_after=SEQ for the events after SEQ, ?limit=N the newest N)
//! GET /api/v1/cluster       every node: this one, and each node of the routing table asked over
//!                           HTTP at its underlay address on this same port (as Hubble Relay
//!                           gathers, without a separate deployment); a node that does not answer
//!                           is listed with the reason
//! GET /api/v1/events        server-sent events: one `cluster` event a second, each node's view
//!                           with only the flow events new since the previous one
//! GET /api/v1/trace         `ferry trace` (?src=&dst=&proto=tcp|udp|icmp&port=): the source half
//!                           here or at the source's node, the destination half at the node the
//!                           packet is encapsulated toward, both asked over this same API
//!                           (/api/v1/trace/source, /api/v1/trace/deliver?frame=HEX); nothing is sent
//! ```
//!
//! Access: clients on loopback are trusted (as the admin socket trusts root); anyone else must
//! present the token of `web.token_file` as `Authorization: Bearer`, as `?access_token=` (RFC 6750
//! 2.3; the page's address can carry it) or as the `ferry_token` cookie the page's answer sets, so
//! the page's own requests carry it. The configuration refuses a non-loopback address without a
//! token file. Only GET is served; nothing the API does changes the agent.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::config::WebConfig;
use super::server::Handler;
use crate::admin::Request as AdminRequest;
use crate::admin::proto::{FlowList, Routes, Stats, Status, TraceHalf, TraceProto};

/// The page and its script, and the one library it uses: `preact/standalone.module.js` of npm's
/// `htm` 3.1.1 (preact, its hooks and htm in one ES module, MIT; see web/vendor/README.md).
const PAGE: &str = include_str!("../../web/index.html");
const APP: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");
const PREACT_HTM: &str = include_str!("../../web/vendor/htm-preact-standalone.module.js");

/// Flow events a view carries at most (the newest).
const FLOW_LIMIT: usize = 500;
/// How long a peer has to answer.
const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Largest answer read from a peer.
const PEER_MAX_BYTES: usize = 16 << 20;
/// Event streams served at once (each asks every peer once a second).
const MAX_STREAMS: usize = 8;
/// How often the accept loop looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// One node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NodeView {
    /// The node's name.
    pub node: String,
    /// Its health and configuration, with its pods.
    pub status: Status,
    /// Its counters, with rates over the last second.
    pub stats: Stats,
    /// Its routing table.
    pub routes: Routes,
    /// Its flow and drop events (the newest, or those after the `flows_after` asked for).
    pub flows: FlowList,
}

/// A node of the cluster view: its view, or why there is none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NodeEntry {
    /// The node's name.
    pub node: String,
    /// Where it was asked (none for the node answering).
    pub address: Option<SocketAddr>,
    /// Its view, when it answered.
    pub view: Option<NodeView>,
    /// Why not.
    pub error: Option<String>,
}

/// The cluster view: the answering node first, then the others in the routing table's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ClusterView {
    /// The node that gathered the view.
    pub from: String,
    /// Every node.
    pub nodes: Vec<NodeEntry>,
}

/// The server's state, shared by its connections.
struct Web {
    handler: Handler,
    token: Option<String>,
    port: u16,
    streams: AtomicUsize,
    stop: Arc<AtomicBool>,
}

/// Starts the web view on its own thread. Binding and reading the token happen here, so a bad
/// address or token file fails the agent's start with the key named.
pub(super) fn spawn(cfg: &WebConfig, handler: Handler, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
    let token = match &cfg.token_file {
        None => None,
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("web.token_file: reading {}", path.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(!t.is_empty(), "web.token_file: {} is empty", path.display());
            Some(t)
        }
    };
    let listener = std::net::TcpListener::bind(cfg.address)
        .with_context(|| format!("web.address: binding {} (in use, or not an address of this node?)", cfg.address))?;
    listener.set_nonblocking(true)?;
    let web = Arc::new(Web { handler, token, port: cfg.address.port(), streams: AtomicUsize::new(0), stop });
    tracing::info!(address = %cfg.address, token = web.token.is_some(), "web view listening");
    Ok(std::thread::Builder::new().name("ferry-web".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "web view: cannot start its runtime");
                return;
            }
        };
        rt.block_on(serve(listener, web));
    })?)
}

async fn serve(listener: std::net::TcpListener, web: Arc<Web>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "web view: cannot use its socket");
            return;
        }
    };
    while !web.stop.load(Ordering::Relaxed) {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tokio::time::sleep(STOP_CHECK) => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "web view: accept failed");
                continue;
            }
        };
        let web = Arc::clone(&web);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let web = Arc::clone(&web);
                async move { Ok::<_, Infallible>(respond(&web, peer, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "web view: connection failed");
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn respond(web: &Arc<Web>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET only\n");
    }
    let query = Query::parse(req.uri().query());
    let presented = query.get("access_token").map(str::to_owned).or_else(|| presented_token(&req));
    if !authorised(web.token.as_deref(), peer.ip(), presented.as_deref()) {
        return plain(StatusCode::UNAUTHORIZED, "a bearer token is required from this address (web.token_file)\n");
    }
    let mut resp = match req.uri().path() {
        "/" | "/index.html" => asset(PAGE, "text/html; charset=utf-8"),
        "/app.js" => asset(APP, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE, "text/css; charset=utf-8"),
        "/vendor/htm-preact-standalone.module.js" => asset(PREACT_HTM, "text/javascript; charset=utf-8"),
        "/api/v1/node" => {
            let after = query.get("flows_after").and_then(|v| v.parse().ok());
            let limit = query.get("limit").and_then(|v| v.parse().ok()).unwrap_or(FLOW_LIMIT);
            json(&web.node_view(after, limit))
        }
        "/api/v1/cluster" => json(&web.cluster(&BTreeMap::new()).await.0),
        "/api/v1/events" => web.events(),
        "/api/v1/trace" => match trace_request(&query) {
            Ok((src, dst, proto, port)) => web.trace(src, dst, proto, port).await,
            Err(e) => full(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", e),
        },
        "/api/v1/trace/source" => match trace_request(&query) {
            Ok((src, dst, proto, port)) => {
                half(web.handler.handle(AdminRequest::Trace { src, dst, proto, port, nonce: None }))
            }
            Err(e) => full(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", e),
        },
        "/api/v1/trace/deliver" => match query.get("frame") {
            Some(f) => half(web.handler.handle(AdminRequest::TraceDeliver { frame: f.to_owned() })),
            None => plain(StatusCode::BAD_REQUEST, "frame is required\n"),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    // A page opened with ?access_token= keeps the token for its own requests (scripts, the API).
    if let (Some(t), Some(token)) = (query.get("access_token"), &web.token)
        && t == token
        && let Ok(v) = HeaderValue::from_str(&format!("ferry_token={token}; HttpOnly; SameSite=Strict; Path=/"))
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    let h = resp.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'"),
    );
    resp
}

/// Whether a client may see the view: loopback always; anyone else with the token.
fn authorised(token: Option<&str>, client: IpAddr, presented: Option<&str>) -> bool {
    let loopback = match client {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback()),
    };
    loopback || matches!((token, presented), (Some(t), Some(p)) if same(t.as_bytes(), p.as_bytes()))
}

/// Compares without stopping at the first difference (the time taken says nothing about the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token in `Authorization: Bearer` or the `ferry_token` cookie.
fn presented_token(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers();
    if let Some(t) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_owned());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("ferry_token=").map(str::to_owned))
}

/// A query string's `key=value` pairs (values percent-decoded).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let pairs = q
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A trace's parameters from the query: `src`, `dst`, `proto` (default tcp), `port`.
fn trace_request(q: &Query) -> Result<(String, String, TraceProto, Option<u16>), String> {
    let (Some(src), Some(dst)) = (q.get("src").filter(|s| !s.is_empty()), q.get("dst").filter(|s| !s.is_empty()))
    else {
        return Err("src and dst are required\n".into());
    };
    let proto = match q.get("proto").unwrap_or("tcp") {
        "tcp" => TraceProto::Tcp,
        "udp" => TraceProto::Udp,
        "icmp" => TraceProto::Icmp,
        other => return Err(format!("proto: {other:?} is not tcp, udp or icmp\n")),
    };
    let port = match q.get("port").filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("port: {p:?} is not a port\n"))?),
    };
    Ok((src.to_owned(), dst.to_owned(), proto, port))
}

/// A trace half as the API answers it: the half, or the agent's reason as a 400.
fn half(r: crate::admin::Response) -> Response<Body> {
    match r.decode::<TraceHalf>() {
        Ok(h) => json(&h),
        Err(e) => full(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", e),
    }
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", text)
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    full(StatusCode::OK, content_type, text)
}

fn json<T: Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(b) => full(StatusCode::OK, "application/json", b),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding the answer failed\n"),
    }
}

impl Web {
    fn node_view(&self, flows_after: Option<u64>, limit: usize) -> NodeView {
        let h = &self.handler;
        let status = h.status();
        NodeView {
            node: status.node.node_name.clone(),
            stats: h.stats(),
            routes: h.routes(),
            flows: h.flows(flows_after, limit.min(FLOW_LIMIT)),
            status,
        }
    }

    /// Every node's view: this one's, then each remote node's, asked concurrently. `after` holds the
    /// last flow event already seen per node; the result holds the new last ones.
    async fn cluster(self: &Arc<Self>, after: &BTreeMap<String, u64>) -> (ClusterView, BTreeMap<String, u64>) {
        let own = self.node_view(after.get(&self.node_name()).copied(), FLOW_LIMIT);
        let from = own.node.clone();
        let mut seen = BTreeMap::new();
        seen.insert(from.clone(), own.flows.last_seq);
        let mut nodes = vec![NodeEntry { node: from.clone(), address: None, view: Some(own), error: None }];
        let mut asks = tokio::task::JoinSet::new();
        for (i, r) in self.handler.routes().remote.into_iter().enumerate() {
            let addr = SocketAddr::new(r.underlay, self.port);
            let (token, last) = (self.token.clone(), after.get(&r.node).copied());
            asks.spawn(async move { (i, r.node, addr, fetch_node(addr, token.as_deref(), last).await) });
        }
        let mut answers = asks.join_all().await;
        answers.sort_by_key(|a| a.0);
        for (_, node, addr, got) in answers {
            match got {
                Ok(v) => {
                    seen.insert(node.clone(), v.flows.last_seq);
                    nodes.push(NodeEntry { node, address: Some(addr), view: Some(v), error: None });
                }
                Err(e) => {
                    if let Some(&a) = after.get(&node) {
                        seen.insert(node.clone(), a);
                    }
                    nodes.push(NodeEntry { node, address: Some(addr), view: None, error: Some(e) });
                }
            }
        }
        (ClusterView { from, nodes }, seen)
    }

    /// A whole trace, its halves asked here or at the nodes that run them (over this API).
    async fn trace(self: &Arc<Self>, src: String, dst: String, proto: TraceProto, port: Option<u16>) -> Response<Body> {
        let own = self.node_name();
        let peers: BTreeMap<String, SocketAddr> = self
            .handler
            .routes()
            .remote
            .into_iter()
            .map(|r| (r.node, SocketAddr::new(r.underlay, self.port)))
            .collect();
        let (web, rt) = (Arc::clone(self), tokio::runtime::Handle::current());
        let run = move || {
            crate::admin::trace_report(&src, &dst, proto, port, None, |node, req| match node {
                Some(n) if n != own => {
                    let addr = *peers.get(n).ok_or_else(|| format!("node {n} is not in this node's routing table"))?;
                    let path = match req {
                        AdminRequest::Trace { src, dst, proto, port, .. } => format!(
                            "/api/v1/trace/source?src={}&dst={}&proto={}{}",
                            percent_encode(src),
                            percent_encode(dst),
                            proto.name().to_lowercase(),
                            port.map(|p| format!("&port={p}")).unwrap_or_default()
                        ),
                        AdminRequest::TraceDeliver { frame } => format!("/api/v1/trace/deliver?frame={frame}"),
                        _ => return Err("not a trace request".into()),
                    };
                    rt.block_on(fetch_json::<TraceHalf>(addr, web.token.as_deref(), &path))
                        .map_err(|e| format!("node {n} ({addr}): {e}"))
                }
                _ => web.handler.handle(req.clone()).decode::<TraceHalf>(),
            })
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(Ok(report)) => json(&report),
            Ok(Err(e)) => full(StatusCode::BAD_GATEWAY, "text/plain; charset=utf-8", e),
            Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the trace failed\n"),
        }
    }

    fn node_name(&self) -> String {
        self.handler.status().node.node_name
    }

    /// A stream of `cluster` events, one a second, each with only the new flow events.
    fn events(self: &Arc<Self>) -> Response<Body> {
        if self.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return plain(StatusCode::SERVICE_UNAVAILABLE, "too many event streams open\n");
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let web = Arc::clone(self);
        tokio::spawn(async move {
            let mut after = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !web.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (view, seen) = web.cluster(&after).await;
                after = seen;
                let Ok(data) = serde_json::to_string(&view) else { break };
                if tx.send(Bytes::from(format!("event: cluster\ndata: {data}\n\n"))).await.is_err() {
                    break; // the client went away
                }
            }
            web.streams.fetch_sub(1, Ordering::Relaxed);
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// A response body fed by a channel: each message one chunk, the end when the sender goes.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// Asks the agent at `addr` for its view (the events after `after`).
async fn fetch_node(addr: SocketAddr, token: Option<&str>, after: Option<u64>) -> Result<NodeView, String> {
    let path = match after {
        Some(a) => format!("/api/v1/node?flows_after={a}&limit={FLOW_LIMIT}"),
        None => format!("/api/v1/node?limit={FLOW_LIMIT}"),
    };
    fetch_json(addr, token, &path).await
}

/// `GET path` at the agent at `addr`, its JSON answer as a `T`.
async fn fetch_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    token: Option<&str>,
    path: &str,
) -> Result<T, String> {
    let ask = async {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("no ferry web view answering: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::get(path).header(header::HOST, addr.to_string());
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), PEER_MAX_BYTES).collect().await.map_err(|e| e.to_string())?;
        let body = body.to_bytes();
        if status != StatusCode::OK {
            return Err(format!("answered {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        serde_json::from_slice::<T>(&body).map_err(|e| format!("not the answer expected: {e}"))
    };
    tokio::time::timeout(PEER_TIMEOUT, ask).await.unwrap_or_else(|_| Err(format!("no answer within {PEER_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_trusted_and_others_need_the_token() {
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let lo6: IpAddr = "::1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        let far: IpAddr = "192.168.100.2".parse().expect("ip");
        assert!(authorised(None, lo, None) && authorised(None, lo6, None) && authorised(None, mapped, None));
        assert!(!authorised(None, far, None), "no token configured: only loopback");
        assert!(!authorised(Some("s3cret"), far, None));
        assert!(!authorised(Some("s3cret"), far, Some("s3cre")));
        assert!(!authorised(Some("s3cret"), far, Some("s3cret!")));
        assert!(authorised(Some("s3cret"), far, Some("s3cret")));
    }

    #[test]
    fn query_pairs_are_decoded() {
        let q = Query::parse(Some("flows_after=12&access_token=a%2Bb%3D&x&limit=3"));
        assert_eq!(q.get("flows_after"), Some("12"));
        assert_eq!(q.get("access_token"), Some("a+b="));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("limit"), Some("3"));
        assert_eq!(q.get("nope"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4", "broken escapes are kept as they are");
    }
}

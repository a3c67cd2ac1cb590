//! The agent's admin socket (setup side): a Unix stream socket, root only (mode 0600), carrying
//! the [`proto`] messages. [`call`] is the client half, used by the CLI and the CNI plugin.

pub mod proto;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use proto::{NodeInfo, PodPort, PodSpec, Request, Response};

/// The admin socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/ferry/ferry.sock";

/// Why a request to the agent failed before the agent could answer it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens on the socket.
    #[error("cannot reach the ferry agent at {path}: {source} (is `ferry run` running with this admin socket?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange broke off.
    #[error("talking to the ferry agent at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a response.
    #[error("the ferry agent at {path} answered something unreadable: {source}")]
    Decode {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

/// Sends one request and reads the response, giving up after `timeout` of silence.
///
/// # Errors
/// [`CallError`] when the agent cannot be reached or answers garbage; an answer with `ok: false`
/// is a successful call.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, CallError> {
    let io = |source| CallError::Io { path: socket.to_owned(), source };
    let stream =
        UnixStream::connect(socket).map_err(|source| CallError::Connect { path: socket.to_owned(), source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|source| CallError::Decode { path: socket.to_owned(), source })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| CallError::Decode { path: socket.to_owned(), source })
}

/// Assembles a whole trace from its halves, as `ferry trace` and the web view both do: the source
/// half at the agent asked first (`ask(None, ..)`), or at the node it names as the source's
/// (`source_on`), then the destination half at the node the packet was encapsulated toward.
/// `ask(Some(node), req)` asks that node's agent, however the caller reaches it. With a nonce, the
/// packet simulated is the marked one `ferry trace --inject` sends with it.
///
/// # Errors
/// What could not be asked, or an answer that names no source or destination.
pub fn trace_report(
    src: &str,
    dst: &str,
    proto: proto::TraceProto,
    port: Option<u16>,
    nonce: Option<u32>,
    mut ask: impl FnMut(Option<&str>, &Request) -> Result<proto::TraceHalf, String>,
) -> Result<proto::TraceReport, String> {
    let req = Request::Trace { src: src.to_owned(), dst: dst.to_owned(), proto, port, nonce };
    let mut first = ask(None, &req)?;
    if let Some(node) = first.source_on.clone() {
        first = ask(Some(&node), &req)?;
        if first.source_on.is_some() {
            return Err(format!("node {node}'s agent says the source is elsewhere too"));
        }
    }
    let (Some(s), Some(d)) = (first.src.clone(), first.dst.clone()) else {
        return Err("the agent's answer names no source or destination".into());
    };
    let mut halves = vec![first];
    if let Some((node, frame)) = halves[0].next_node.clone().zip(halves[0].frame.clone()) {
        match ask(Some(&node), &Request::TraceDeliver { frame }) {
            Ok(h) => halves.push(h),
            Err(e) => return Err(format!("{}; the destination's half could not run: {e}", halves[0].summary)),
        }
    }
    let (delivered, verdict) = outcome(&halves);
    Ok(proto::TraceReport { src: s, dst: d, proto, port, halves, delivered, verdict })
}

/// Whether the last half delivered the packet, and its fate in one sentence.
fn outcome(halves: &[proto::TraceHalf]) -> (bool, String) {
    let last = halves.last().map(|h| (h.verdict.clone(), h.summary.clone())).unwrap_or_default();
    let delivered = last.0 == "delivered" || last.0 == "left";
    let via = halves.first().and_then(|h| h.stages.iter().find_map(|s| s.service.as_ref())).and_then(|svc| {
        Some(format!(" through Service {} (backend {}:{})", svc.service, svc.backend?, svc.backend_port?))
    });
    (delivered, if delivered { format!("{}{}", last.1, via.unwrap_or_default()) } else { last.1 })
}

/// How long the destination's agent watches for the marked packet (`ferry trace --inject`).
pub const INJECT_WATCH: Duration = Duration::from_secs(5);

/// How long `ferry trace --inject` waits for the destination's record of the marked packet once
/// it is sent.
pub const INJECT_WAIT: Duration = Duration::from_secs(3);

/// `ferry trace --inject`: the simulation of the packet marked with `nonce`
/// ([`trace_report`]), then the real packet: the node the simulation encapsulates it toward is
/// told to watch for it, the source's agent sends it (a worker forwards it for real and records
/// its stages), and the watching node's agent gives its worker's record. `ask` as for
/// [`trace_report`], answering with the agent's whole response.
///
/// # Errors
/// What could not be asked (the simulation, the watch, the injection). A destination record that
/// never comes is not an error: the report says so among the differences.
pub fn trace_inject_report(
    src: &str,
    dst: &str,
    proto: proto::TraceProto,
    port: Option<u16>,
    nonce: u32,
    mut ask: impl FnMut(Option<&str>, &Request) -> Result<Response, String>,
) -> Result<proto::TraceInjectReport, String> {
    let simulated = trace_report(src, dst, proto, port, Some(nonce), |n, req| ask(n, req).and_then(Response::decode))?;
    // Armed before the packet is sent: the node the simulation says it goes to.
    let armed = simulated.halves.first().and_then(|h| h.frame.as_ref().and(h.next_node.clone()));
    if let Some(node) = &armed {
        let req = Request::TraceWatch { nonce, timeout_ms: INJECT_WATCH.as_millis() as u64 };
        ask(Some(node), &req)
            .and_then(|r| if r.ok { Ok(()) } else { Err(r.error.unwrap_or_else(|| "refused".into())) })
            .map_err(|e| format!("arming node {node} to watch for the marked packet: {e}"))?;
    }
    let req = Request::TraceInject { src: src.to_owned(), dst: dst.to_owned(), proto, port, nonce };
    let mut first: proto::TraceHalf = ask(None, &req).and_then(Response::decode)?;
    if let Some(node) = first.source_on.clone() {
        first = ask(Some(&node), &req).and_then(Response::decode)?;
        if first.source_on.is_some() {
            return Err(format!("node {node}'s agent says the source is elsewhere too"));
        }
    }
    let mut real = vec![first];
    let mut missing = None;
    if real[0].verdict == "forwarded" {
        let next = real[0].next_node.clone().unwrap_or_else(|| "(unknown)".into());
        if armed.as_deref() == Some(next.as_str()) {
            let req = Request::TraceCollect { nonce, timeout_ms: INJECT_WAIT.as_millis() as u64 };
            match ask(Some(&next), &req).and_then(Response::decode) {
                Ok(h) => real.push(h),
                Err(e) => missing = Some(format!("node {next}: {e}")),
            }
        } else {
            missing = Some(format!(
                "the real packet was encapsulated toward node {next}, which was not watching for it (the \
                 simulation sent it {})",
                armed.as_deref().map_or_else(|| "nowhere".to_owned(), |a| format!("to node {a}"))
            ));
        }
    }
    let mut differences = compare_halves(&simulated.halves, &real);
    differences.extend(missing);
    let (delivered, verdict) = outcome(&real);
    Ok(proto::TraceInjectReport {
        nonce,
        simulated,
        real,
        delivered,
        verdict,
        agree: differences.is_empty(),
        differences,
    })
}

/// Where a simulation's halves and the real packet's records differ, for people.
fn compare_halves(sim: &[proto::TraceHalf], real: &[proto::TraceHalf]) -> Vec<String> {
    let mut d = Vec::new();
    for i in 0..sim.len().max(real.len()) {
        let (s, r) = match (sim.get(i), real.get(i)) {
            (Some(s), Some(r)) => (s, r),
            (Some(s), None) => {
                d.push(format!("the simulation goes on at node {}; the real packet left no record there", s.node));
                continue;
            }
            (None, Some(r)) => {
                d.push(format!("the real packet went on at node {}, where the simulation did not", r.node));
                continue;
            }
            (None, None) => continue,
        };
        if s.node != r.node {
            d.push(format!("simulated at node {}, recorded at node {}", s.node, r.node));
        }
        let n = s.stages.len().max(r.stages.len());
        for k in 0..n {
            let (a, b) = (s.stages.get(k), r.stages.get(k));
            let key = |x: Option<&proto::TraceStage>| x.map(|x| (x.stage.clone(), x.result.clone()));
            if key(a) != key(b) {
                let say = |x: Option<&proto::TraceStage>| {
                    x.map_or("nothing".to_owned(), |x| format!("{} {}", x.stage, x.result))
                };
                d.push(format!("on {}: stage {}: simulated {}, real {}", r.node, k + 1, say(a), say(b)));
                break;
            }
        }
        for (what, a, b) in [
            ("verdict", Some(&s.verdict), Some(&r.verdict)),
            ("drop reason", s.reason.as_ref(), r.reason.as_ref()),
            ("deciding stage", Some(&s.stage), Some(&r.stage)),
            ("next node", s.next_node.as_ref(), r.next_node.as_ref()),
        ] {
            if a != b {
                let say = |x: Option<&String>| x.cloned().unwrap_or_else(|| "none".into());
                d.push(format!("on {}: {what}: simulated {}, real {}", r.node, say(a), say(b)));
            }
        }
        let backend = |h: &proto::TraceHalf| {
            h.stages.iter().find_map(|x| x.service.as_ref()).map(|svc| (svc.backend, svc.backend_port))
        };
        if backend(s) != backend(r) {
            d.push(format!("on {}: Service backend: simulated {:?}, real {:?}", r.node, backend(s), backend(r)));
        }
    }
    d
}

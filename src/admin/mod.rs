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
/// `ask(Some(node), req)` asks that node's agent, however the caller reaches it.
///
/// # Errors
/// What could not be asked, or an answer that names no source or destination.
pub fn trace_report(
    src: &str,
    dst: &str,
    proto: proto::TraceProto,
    port: Option<u16>,
    mut ask: impl FnMut(Option<&str>, &Request) -> Result<proto::TraceHalf, String>,
) -> Result<proto::TraceReport, String> {
    let req = Request::Trace { src: src.to_owned(), dst: dst.to_owned(), proto, port };
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
    let last = halves.last().map(|h| (h.verdict.clone(), h.summary.clone())).unwrap_or_default();
    let delivered = last.0 == "delivered" || last.0 == "left";
    let via = halves[0].stages.iter().find_map(|s| s.service.as_ref()).and_then(|svc| {
        Some(format!(" through Service {} (backend {}:{})", svc.service, svc.backend?, svc.backend_port?))
    });
    let verdict = if delivered { format!("{}{}", last.1, via.unwrap_or_default()) } else { last.1 };
    Ok(proto::TraceReport { src: s, dst: d, proto, port, halves, delivered, verdict })
}

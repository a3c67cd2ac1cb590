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

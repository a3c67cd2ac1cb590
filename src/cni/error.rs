//! The plugin's errors and the CNI error codes they carry (setup side).

use serde_json::json;

/// A CNI error code (CNI spec 1.0.0, "Error"): 1-99 are the spec's well-known codes, 100 and up
/// are this plugin's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// The runtime asked for a CNI version the plugin does not speak.
    IncompatibleVersion = 1,
    /// A field of the network configuration the plugin does not support.
    UnsupportedField = 2,
    /// The container is unknown or does not exist.
    UnknownContainer = 3,
    /// A required `CNI_*` environment variable is missing or invalid.
    InvalidEnv = 4,
    /// Reading stdin, running the IPAM plugin or a similar I/O failed.
    Io = 5,
    /// stdin or a delegate's output is not the JSON it should be.
    Decode = 6,
    /// The network configuration is invalid.
    InvalidConfig = 7,
    /// Try again later: the ferry agent is not reachable (yet).
    TryAgainLater = 11,
    /// The ferry agent refused the request.
    AgentRefused = 100,
    /// A kernel link operation (veth, address, route, ethtool) failed.
    Link = 101,
    /// The IPAM plugin failed without a code of its own.
    Ipam = 102,
    /// CHECK found the pod not wired as the previous result says.
    CheckFailed = 103,
}

/// A failure reported to the runtime as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The error code (a [`Code`] or a delegate's own code, passed through).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// The longer story: the cause chain.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`, no details.
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError { code: code as u32, msg: msg.into(), details: String::new() }
    }

    /// An error with `code` and `msg`, and the cause chain of `source` as its details.
    pub fn with_source(code: Code, msg: impl Into<String>, source: &(dyn std::error::Error + 'static)) -> Self {
        let mut details = source.to_string();
        let mut cause = source.source();
        while let Some(c) = cause {
            details.push_str(": ");
            details.push_str(&c.to_string());
            cause = c.source();
        }
        CniError { code: code as u32, msg: msg.into(), details }
    }

    /// The spec's error object for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl From<crate::netlink::LinkError> for CniError {
    fn from(e: crate::netlink::LinkError) -> Self {
        // The error's message already names the interface, the operation and the kernel's error.
        CniError::new(Code::Link, e.to_string())
    }
}

//! `ferry-cni`, the CNI plugin (CNI spec 1.0.0; setup side, a short-lived process per call) that
//! wires a pod into ferry's network exactly as kubelet/containerd call a plugin: the network
//! configuration on stdin, the `CNI_*` environment, the result or the spec's error JSON on
//! stdout, a non-zero exit on failure. Diagnostics go to stderr.
//!
//! - ADD: IPAM (delegated, [`ipam`]); a veth pair whose host end (named by [`host_ifname`],
//!   MAC = the agent's gateway MAC, one queue per worker) stays in the node namespace and whose
//!   other end becomes `CNI_IFNAME` in the pod with its address as /32 (/128), an on-link route to
//!   the gateway and the default route via it, the agent's MTU, tx checksum offload off; then the
//!   agent registers the pod (`PodAdd`). A failure after IPAM undoes everything.
//! - DEL: idempotent; removes whatever exists, with or without the agent or the namespace.
//! - CHECK: the veth, the pod's addresses and routes, IPAM's and the agent's view agree with the
//!   previous result.
//! - VERSION: the versions in [`config::SUPPORTED_VERSIONS`].

pub mod config;
pub mod error;
pub mod ipam;
mod ops;
pub mod result;

use std::io::{Read, Write};
use std::process::ExitCode;

pub use config::{Command, Env, NetConf, host_ifname};
pub use error::{CniError, Code};
pub use result::CniResult;
use serde_json::{Value, json};

/// Runs one CNI command: `env` and the `stdin` bytes in, the JSON to print out.
///
/// # Errors
/// A [`CniError`] and the CNI version to report it in.
pub fn run(env_lookup: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Value, (CniError, String)> {
    let fallback = "1.0.0".to_owned();
    let env = Env::from_lookup(env_lookup).map_err(|e| (e, fallback.clone()))?;
    if env.command == Command::Version {
        return Ok(version_json());
    }
    let conf = NetConf::parse(stdin).map_err(|e| (e, fallback))?;
    let version = conf.cni_version.clone();
    let out = match env.command {
        Command::Add => ops::add(&conf, &env).map(|r| r.to_json(&version)),
        Command::Del => ops::del(&conf, &env).map(|()| Value::Null),
        Command::Check => ops::check(&conf, &env).map(|()| Value::Null),
        Command::Version => Ok(version_json()),
    };
    out.map_err(|e| (e, version))
}

/// The VERSION answer.
pub fn version_json() -> Value {
    json!({ "cniVersion": "1.0.0", "supportedVersions": config::SUPPORTED_VERSIONS })
}

/// Entry point of `ferry-cni`.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // VERSION may come without stdin; other commands fail on the empty input with code 6.
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = CniError::with_source(Code::Io, "reading the network configuration from stdin", &e);
        return emit(&err.to_json("1.0.0"), ExitCode::FAILURE);
    }
    match run(|k| std::env::var(k).ok(), &stdin) {
        Ok(Value::Null) => ExitCode::SUCCESS,
        Ok(v) => emit(&v, ExitCode::SUCCESS),
        Err((e, version)) => {
            eprintln!("ferry-cni: {e}");
            emit(&e.to_json(&version), ExitCode::FAILURE)
        }
    }
}

fn emit(v: &Value, code: ExitCode) -> ExitCode {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    code
}

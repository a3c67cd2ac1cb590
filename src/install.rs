//! `ferry install-cni` (setup side): what the DaemonSet's init container does on every node, the
//! way Flannel's `install-cni` step does. It copies the CNI plugins ferry needs (`ferry-cni`, and
//! `host-local`, to which ferry-cni delegates addresses) into the node's CNI binary directory and
//! writes the network configuration list into its configuration directory.
//!
//! Every file is written beside its destination and renamed over it, so a container runtime
//! reading the directory sees the old file or the new one, never half of one; a running plugin
//! binary is replaced, not overwritten. A file that is already there with the same bytes is left
//! alone, so running the step again (every pod restart) changes nothing. The configuration list
//! is checked before anything is written: it must parse, carry a name and a supported
//! `cniVersion`, and its ferry-cni entry must be a configuration ferry-cni accepts.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;

use crate::cni::config::NetConf;

/// Where the DaemonSet mounts the node's CNI binary directory.
pub const DEFAULT_BIN_DIR: &str = "/host/opt/cni/bin";
/// Where the DaemonSet mounts the node's CNI configuration directory.
pub const DEFAULT_CONF_DIR: &str = "/host/etc/cni/net.d";
/// The configuration list's file name: sorted first among the usual names, as runtimes take the
/// first file in lexical order.
pub const CONFLIST_NAME: &str = "10-ferry.conflist";
/// Where `host-local` is looked for when `--from` does not have it (Debian's
/// containernetworking-plugins, then the usual CNI directory).
const HOST_LOCAL_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// `ferry install-cni`'s arguments.
#[derive(Debug, Clone, Args)]
pub struct InstallCniArgs {
    /// The node's CNI binary directory (as mounted in the container).
    #[arg(long, default_value = DEFAULT_BIN_DIR)]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory (as mounted in the container).
    #[arg(long, default_value = DEFAULT_CONF_DIR)]
    pub conf_dir: PathBuf,
    /// The CNI configuration list to install (the ConfigMap's `cni-conf.json`).
    #[arg(long, default_value = "/etc/ferry/cni-conf.json")]
    pub conflist: PathBuf,
    /// Where the plugins to install are: `ferry-cni`, and `host-local` unless it is found in
    /// /usr/lib/cni or /opt/cni/bin. Default: the directory of this `ferry` binary.
    #[arg(long)]
    pub from: Option<PathBuf>,
}

/// Why the installation failed; nothing was written unless said.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file to install is missing.
    #[error("{what} not found: looked in {looked}")]
    Missing {
        /// Which file.
        what: &'static str,
        /// Where.
        looked: String,
    },
    /// The configuration list is not usable.
    #[error("{path}: {reason}")]
    BadConflist {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_owned(), source }
}

/// Installs the plugins and the configuration list; returns one line per file saying what was
/// done (`installed` or `unchanged`).
///
/// # Errors
/// [`InstallError`]: a missing plugin, a bad configuration list (checked before anything is
/// written), or an I/O error.
pub fn install_cni(args: &InstallCniArgs) -> Result<String, InstallError> {
    let from = match &args.from {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(io(Path::new("/proc/self/exe")))?
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default(),
    };
    let ferry_cni = from.join("ferry-cni");
    if !ferry_cni.is_file() {
        return Err(InstallError::Missing { what: "ferry-cni", looked: from.display().to_string() });
    }
    let host_local = std::iter::once(from.as_path())
        .chain(HOST_LOCAL_DIRS.iter().map(Path::new))
        .map(|d| d.join("host-local"))
        .find(|p| p.is_file() && !same_file(p, &args.bin_dir.join("host-local")))
        .or_else(|| Some(args.bin_dir.join("host-local")).filter(|p| p.is_file()))
        .ok_or_else(|| InstallError::Missing {
            what: "the host-local IPAM plugin",
            looked: format!("{}, {}", from.display(), HOST_LOCAL_DIRS.join(", ")),
        })?;
    let conflist = fs::read(&args.conflist).map_err(io(&args.conflist))?;
    check_conflist(&conflist).map_err(|reason| InstallError::BadConflist { path: args.conflist.clone(), reason })?;

    fs::create_dir_all(&args.bin_dir).map_err(io(&args.bin_dir))?;
    fs::create_dir_all(&args.conf_dir).map_err(io(&args.conf_dir))?;
    let mut report = String::new();
    for (src, name) in [(&ferry_cni, "ferry-cni"), (&host_local, "host-local")] {
        let bytes = fs::read(src).map_err(io(src))?;
        let dst = args.bin_dir.join(name);
        let done = place(&dst, &bytes, 0o755)?;
        let _ = writeln!(report, "{done} {}", dst.display());
    }
    let dst = args.conf_dir.join(CONFLIST_NAME);
    let done = place(&dst, &conflist, 0o644)?;
    let _ = writeln!(report, "{done} {}", dst.display());
    Ok(report)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes `bytes` to `dst` through a temporary file in the same directory and a rename, unless
/// `dst` already holds exactly these bytes with this mode.
fn place(dst: &Path, bytes: &[u8], mode: u32) -> Result<&'static str, InstallError> {
    if let (Ok(old), Ok(meta)) = (fs::read(dst), fs::metadata(dst))
        && old == bytes
        && meta.permissions().mode() & 0o777 == mode
    {
        return Ok("unchanged");
    }
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.ferry-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, dst)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(InstallError::Io { path: dst.to_owned(), source: e });
    }
    Ok("installed")
}

/// Checks a CNI configuration list as a runtime and ferry-cni would read it.
///
/// # Errors
/// What is wrong, naming the field.
pub fn check_conflist(bytes: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let name =
        v.get("name").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or("\"name\" must be a non-empty string")?;
    let version = v.get("cniVersion").and_then(Value::as_str).ok_or("\"cniVersion\" must be a string")?;
    let plugins = v.get("plugins").and_then(Value::as_array).ok_or("\"plugins\" must be a list")?;
    let mut ferry = 0;
    for (i, p) in plugins.iter().enumerate() {
        let Some(obj) = p.as_object() else { return Err(format!("\"plugins[{i}]\" must be an object")) };
        let ty = obj.get("type").and_then(Value::as_str).ok_or(format!("\"plugins[{i}].type\" must be a string"))?;
        if ty != "ferry-cni" {
            continue;
        }
        ferry += 1;
        // What the runtime hands the plugin: the entry with the list's name and version added.
        let mut conf = obj.clone();
        conf.insert("name".into(), Value::from(name));
        conf.insert("cniVersion".into(), Value::from(version));
        let text = serde_json::to_vec(&conf).map_err(|e| e.to_string())?;
        NetConf::parse(&text).map_err(|e| format!("\"plugins[{i}]\" (ferry-cni): {}", e.msg))?;
    }
    if ferry != 1 {
        return Err(format!("\"plugins\" must have exactly one entry of type ferry-cni, not {ferry}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_conflist_passes_and_each_bad_one_names_its_field() {
        let good = br#"{"cniVersion":"1.0.0","name":"ferry","plugins":[{"type":"ferry-cni","adminSocket":"/run/ferry/ferry.sock"}]}"#;
        check_conflist(good).expect("good");
        for (bad, field) in [
            (&br#"{"cniVersion":"1.0.0","plugins":[{"type":"ferry-cni"}]}"#[..], "\"name\""),
            (br#"{"name":"f","plugins":[{"type":"ferry-cni"}]}"#, "\"cniVersion\""),
            (br#"{"cniVersion":"1.0.0","name":"f"}"#, "\"plugins\""),
            (br#"{"cniVersion":"1.0.0","name":"f","plugins":[{"type":"bridge"}]}"#, "exactly one"),
            (br#"{"cniVersion":"9.9.9","name":"f","plugins":[{"type":"ferry-cni"}]}"#, "plugins[0]"),
            (br#"{"cniVersion":"1.0.0","name":"f","plugins":[{"type":"ferry-cni","adminSocket":7}]}"#, "adminSocket"),
            (b"not json", "not JSON"),
        ] {
            let e = check_conflist(bad).expect_err(std::str::from_utf8(bad).unwrap_or("?"));
            assert!(e.contains(field), "{e:?} should name {field}");
        }
    }
}

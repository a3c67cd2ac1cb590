//! The `ferry` binary: command-line entry point (setup side; no per-packet work here).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry::admin::{self, Request, Response};
use ferry_encap::DropReason;
use serde_json::Value;

/// ferry: userspace AF_XDP overlay data plane for Kubernetes pod networks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: data plane, control plane and admin socket.
    Run {
        /// The configuration file (TOML). Given more than once, later files' keys replace earlier
        /// ones' (the cluster's shared file first, a node's own on top).
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
        /// Check the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// The running agent's configuration and health.
    Status {
        #[command(flatten)]
        query: Query,
        /// Print nothing but whether the agent is ready; exit 0 if it is, 1 if not (or unreachable).
        #[arg(long)]
        ready: bool,
    },
    /// Remove ferry from this node: the host port and the CNI configuration list (`[uninstall]`).
    /// Stop the agent first (it detaches its XDP programs as it stops).
    Uninstall {
        /// The agent's configuration file(s), as given to `ferry run`.
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Install the CNI plugins and the network configuration into a node's CNI directories (the
    /// DaemonSet's init step).
    InstallCni(ferry::install::InstallCniArgs),
    /// The forwarding table the workers use now.
    Routes(Query),
    /// Packets per port (with rates over the last second) and drops by reason.
    Stats(Query),
    /// Tracked connections (services' translations), with filters.
    Conntrack {
        #[command(flatten)]
        query: Query,
        /// Only connections with this address (source, destination or translation).
        #[arg(long)]
        addr: Option<std::net::IpAddr>,
        /// Only connections with this port (source, destination or translation).
        #[arg(long)]
        port: Option<u16>,
        /// Only this protocol: tcp or udp.
        #[arg(long, value_parser = ["tcp", "udp"])]
        proto: Option<String>,
    },
    /// List every drop reason the data plane counts, with its metric name.
    DropReasons,
    /// Generate and/or receive test traffic on an interface queue over AF_XDP.
    Pktgen(ferry::pktgen::PktgenArgs),
}

#[derive(Debug, Args)]
struct Query {
    /// The agent's admin socket.
    #[arg(long, default_value = admin::DEFAULT_SOCKET, env = "FERRY_SOCKET")]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, check } => run(&config, check),
        Command::Status { query: q, ready: false } => query(&q, Request::Status, print_status),
        Command::Status { query: q, ready: true } => ready(&q),
        Command::Uninstall { config } => uninstall(&config),
        Command::InstallCni(args) => match ferry::install::install_cni(&args) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry install-cni: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Routes(q) => query(&q, Request::Routes, print_routes),
        Command::Stats(q) => query(&q, Request::Stats, print_stats),
        Command::Conntrack { query: q, addr, port, proto } => {
            let proto = proto.map(|p| if p == "tcp" { 6 } else { 17 });
            query(&q, Request::Conntrack { addr, port, proto }, print_conntrack)
        }
        Command::DropReasons => {
            for r in DropReason::ALL {
                println!("{:>3}  {:<26} {}", *r as u8, r.name(), r.description());
            }
            ExitCode::SUCCESS
        }
        Command::Pktgen(args) => match ferry::pktgen::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry pktgen: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(paths: &[PathBuf], check: bool) -> ExitCode {
    let cfg = match ferry::agent::AgentConfig::load_layers(paths) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry run: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        println!("{}: ok", names.join(" + "));
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match ferry::agent::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferry run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn uninstall(paths: &[PathBuf]) -> ExitCode {
    let cfg = match ferry::agent::AgentConfig::load_layers(paths) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry uninstall: {e}");
            return ExitCode::from(2);
        }
    };
    if admin::call(&cfg.socket, &Request::Status, Duration::from_secs(2)).is_ok() {
        eprintln!("ferry uninstall: an agent answers on {}: stop it first", cfg.socket.display());
        return ExitCode::FAILURE;
    }
    match ferry::agent::uninstall_node(&cfg) {
        Ok(done) if done.is_empty() => {
            println!("nothing to remove");
            ExitCode::SUCCESS
        }
        Ok(done) => {
            for d in done {
                println!("removed {d}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry uninstall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ferry status --ready`: one line, and the exit code a readiness probe reads.
fn ready(q: &Query) -> ExitCode {
    let resp = match admin::call(&q.socket, &Request::Status, Duration::from_secs(5)) {
        Ok(r) => r,
        Err(e) => {
            println!("not ready: {e}");
            return ExitCode::FAILURE;
        }
    };
    let data = resp.data.unwrap_or(Value::Null);
    if resp.ok && data["ready"].as_bool() == Some(true) {
        println!("ready");
        ExitCode::SUCCESS
    } else {
        let why = resp.error.or_else(|| data["not_ready_because"].as_str().map(str::to_owned)).unwrap_or_default();
        println!("not ready: {why}");
        ExitCode::FAILURE
    }
}

fn query(q: &Query, req: Request, print: fn(&Value)) -> ExitCode {
    let resp: Response = match admin::call(&q.socket, &req, Duration::from_secs(10)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !resp.ok {
        eprintln!("ferry: the agent says: {}", resp.error.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    let data = resp.data.unwrap_or(Value::Null);
    if q.json {
        println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
    } else {
        print(&data);
    }
    ExitCode::SUCCESS
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print_status(d: &Value) {
    let n = &d["node"];
    println!(
        "node        {} (up {:.0} s, ferry {})",
        s(&n["node_name"]),
        d["uptime_seconds"].as_f64().unwrap_or(0.0),
        s(&d["version"])
    );
    println!(
        "underlay    {} {} mac {} mtu {}",
        s(&n["underlay_if"]),
        s(&n["underlay_addr"]),
        s(&n["underlay_mac"]),
        s(&n["underlay_mtu"])
    );
    println!(
        "tunnel      {} vni {} port {} vtep {}",
        s(&n["tunnel"]),
        s(&n["vni"]),
        s(&n["tunnel_port"]),
        s(&n["vtep_mac"])
    );
    println!(
        "pods        cidrs {} gateway {} mtu {}; cluster {}",
        s(&n["pod_cidrs"]),
        s(&n["gateway_v4"]),
        s(&n["pod_mtu"]),
        s(&n["cluster_cidrs"])
    );
    println!("host port   {} {}", s(&n["host_if"]), s(&n["host_addr"]));
    println!("workers     {} ({} polling); sources {}", s(&n["workers"]), s(&n["poll"]), s(&n["sources"]));
    let t = &d["tables"];
    println!(
        "tables      generation {}, {} remote nodes, {} local endpoints",
        s(&t["generation"]),
        s(&t["remote_nodes"]),
        s(&t["local_endpoints"])
    );
    println!("ports");
    if let Some(ports) = d["ports"].as_object() {
        for (id, p) in ports {
            println!(
                "  {id:>4}  {:<16} {:<7} {:<8} {}  {}",
                s(&p["ifname"]),
                s(&p["kind"]),
                s(&p["xdp_mode"]),
                s(&p["addrs"]),
                s(&p["pod"])
            );
        }
    }
}

fn print_routes(d: &Value) {
    println!("generation {}", s(&d["generation"]));
    println!("{:<26} {:<16} {:<18} {:<8} {:<6} next hop", "destination", "node", "underlay", "tunnel", "vni");
    for r in d["remote"].as_array().into_iter().flatten() {
        let nh = &r["next_hop"];
        println!(
            "{:<26} {:<16} {:<18} {:<8} {:<6} {} {}",
            s(&r["pod_cidrs"]),
            s(&r["node"]),
            format!("{}:{}", s(&r["underlay"]), s(&r["port"])),
            s(&r["tunnel"]),
            s(&r["vni"]),
            s(&nh["state"]),
            s(&nh["underlay_mac"])
        );
    }
    for l in d["local"].as_array().into_iter().flatten() {
        println!("{:<26} {:<16} port {} {} {}", s(&l["addrs"]), "local", s(&l["port"]), s(&l["ifname"]), s(&l["pod"]));
    }
    for b in d["blackholes"].as_array().into_iter().flatten() {
        println!("{:<26} {:<16}", s(b), "blackhole (this node's CIDR)");
    }
}

fn print_conntrack(d: &Value) {
    println!(
        "{:<5} {:<40} {:<40} {:<9} {:<28} {:<12} {:>9}",
        "proto", "source", "destination", "direction", "translation", "state", "idle ms"
    );
    for e in d["entries"].as_array().into_iter().flatten() {
        let proto = match e["proto"].as_u64() {
            Some(6) => "tcp".to_owned(),
            Some(17) => "udp".to_owned(),
            Some(255) => "aff".to_owned(),
            other => other.map_or_else(String::new, |p| p.to_string()),
        };
        let ep = |a: &str, p: &str| {
            let (a, p) = (s(&e[a]), s(&e[p]));
            if a.contains(':') { format!("[{a}]:{p}") } else { format!("{a}:{p}") }
        };
        println!(
            "{:<5} {:<40} {:<40} {:<9} {:<28} {:<12} {:>9}",
            proto,
            ep("src", "sport"),
            ep("dst", "dport"),
            s(&e["direction"]),
            format!("{} -> {}", s(&e["rewrite"]), ep("nat", "nat_port")),
            s(&e["state"]),
            s(&e["idle_ms"])
        );
    }
    println!(
        "{} entries shown; table: {} slots of {} bytes, {} inserted, {} evicted",
        d["entries"].as_array().map_or(0, Vec::len),
        s(&d["capacity"]),
        s(&d["entry_bytes"]),
        s(&d["inserts"]),
        s(&d["evictions"])
    );
}

fn print_stats(d: &Value) {
    println!(
        "{:>4}  {:<16} {:<7} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "port", "ifname", "kind", "rx pkts", "tx pkts", "rx pps", "tx pps", "rx Mbit/s", "tx Mbit/s", "socket drops"
    );
    for p in d["ports"].as_array().into_iter().flatten() {
        let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>4}  {:<16} {:<7} {:>12} {:>12} {:>10.0} {:>10.0} {:>10.2} {:>10.2} {:>12}",
            s(&p["port"]),
            s(&p["ifname"]),
            s(&p["kind"]),
            s(&p["rx_packets"]),
            s(&p["tx_packets"]),
            f("rx_pps"),
            f("tx_pps"),
            f("rx_bps") / 1e6,
            f("tx_bps") / 1e6,
            s(&p["socket_drops_total"])
        );
    }
    println!("drops in ferry: {} in all, {} ICMP errors sent", s(&d["total_drops"]), s(&d["icmp_errors"]));
    if d["double_frees"].as_u64().unwrap_or(0) > 0 {
        println!("frames freed twice and refused: {} (a bug in ferry: please report it)", s(&d["double_frees"]));
    }
    if d["headroom_moves"].as_u64().unwrap_or(0) > 0 {
        println!(
            "packets moved to make room for tunnel headers: {} (each a copy of the packet)",
            s(&d["headroom_moves"])
        );
    }
    if let Some(drops) = d["drops"].as_object() {
        for (reason, n) in drops {
            if n.as_u64().unwrap_or(0) > 0 {
                let rate = d["drop_rates"][reason].as_f64().unwrap_or(0.0);
                println!("  {reason:<28} {:>12}  ({rate:.0}/s)", s(n));
            }
        }
    }
    for p in d["ports"].as_array().into_iter().flatten() {
        if p["socket_drops_total"].as_u64().unwrap_or(0) > 0 {
            let x = &p["socket_drops"];
            println!(
                "socket drops on {} (before ferry saw them): receive ring full {}, dropped {} (no free frame {}), invalid descriptors {}",
                s(&p["ifname"]),
                s(&x["rx_ring_full"]),
                s(&x["rx_dropped"]),
                s(&x["rx_no_frame"]),
                s(&x["invalid_descs"])
            );
        }
    }
}

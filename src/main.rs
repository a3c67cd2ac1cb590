//! The `ferry` binary: command-line entry point (setup side; no per-packet work here).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry::admin::proto::{
    ConntrackList, FlowEvent, FlowFilter, FlowList, OffloadStatus, PolicyList, Routes, Stats, Status,
};
use ferry::admin::{self, Request, Response};
use ferry_encap::DropReason;
use serde::Serialize;
use serde::de::DeserializeOwned;

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
    /// The NetworkPolicy rules compiled for this node's pods, and the policy and rule each came
    /// from (a pod not listed is selected by no policy: open both ways).
    Policy {
        #[command(flatten)]
        query: Query,
        /// Only this pod: `namespace/name`, or `name`.
        pod: Option<String>,
    },
    /// Flow records and dropped packets, newest last, in the spirit of `hubble observe`.
    Flows(FlowsArgs),
    /// Why can (or can't) SRC reach DST: a synthetic packet through the live pipeline, stage by
    /// stage, at the source's node and then the destination's. Nothing is sent.
    Trace(TraceArgs),
    /// List every drop reason the data plane counts, with its metric name.
    DropReasons,
    /// Generate and/or receive test traffic on an interface queue over AF_XDP.
    Pktgen(ferry::pktgen::PktgenArgs),
}

#[derive(Debug, Args)]
struct FlowsArgs {
    #[command(flatten)]
    query: Query,
    /// Keep printing new events as they come (until interrupted).
    #[arg(long, short)]
    follow: bool,
    /// How many of the newest matching events to print first.
    #[arg(long, default_value_t = 20)]
    last: usize,
    /// A pod at either end: namespace/name, or a name.
    #[arg(long)]
    pod: Option<String>,
    /// A namespace at either end.
    #[arg(long, short)]
    namespace: Option<String>,
    /// The node that recorded the event.
    #[arg(long)]
    node: Option<String>,
    /// forwarded, replied or dropped.
    #[arg(long, value_parser = ["forwarded", "replied", "dropped"])]
    verdict: Option<String>,
    /// A drop reason (see `ferry drop-reasons`).
    #[arg(long)]
    reason: Option<String>,
    /// tcp, udp, icmp, icmpv6, or a protocol number.
    #[arg(long)]
    protocol: Option<String>,
    /// A port at either end.
    #[arg(long)]
    port: Option<u16>,
    /// Only events seen within this long: 30s, 5m, 2h.
    #[arg(long)]
    since: Option<String>,
}

#[derive(Debug, Args)]
struct TraceArgs {
    #[command(flatten)]
    query: Query,
    /// The sender: a pod (`namespace/name`, or a unique name), a node name, or an address.
    src: String,
    /// The receiver: a pod, a Service (`namespace/name`: its VIP), a node name, or an address.
    dst: String,
    /// The transport.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "icmp"])]
    proto: String,
    /// The destination port (TCP and UDP; default 80, or the Service's port).
    #[arg(long)]
    port: Option<u16>,
    /// Another node's agent socket, `NODE=PATH` (repeatable): the trace goes on there when the
    /// packet does (the source's node, the destination's).
    #[arg(long = "admin", value_name = "NODE=PATH")]
    admin: Vec<String>,
    /// Every node's agent socket, `{node}` standing for the node's name (the lab's:
    /// `/run/ferry-lab/ferrylab/nodes/{node}/ferry.sock`).
    #[arg(long, value_name = "PATTERN", env = "FERRY_ADMIN_PATTERN")]
    admin_pattern: Option<String>,
    /// Also send one real packet, marked, and show each node's record of it next to the
    /// simulation (exit status 3 when they disagree).
    #[arg(long)]
    inject: bool,
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
        Command::Policy { query: q, pod } => query(&q, Request::Policy { pod }, print_policy),
        Command::Flows(args) => flows(&args),
        Command::Trace(args) => trace(&args),
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
    let status = admin::call(&q.socket, &Request::Status, Duration::from_secs(5))
        .map_err(|e| e.to_string())
        .and_then(Response::decode::<Status>);
    match status {
        Ok(st) if st.ready => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok(st) => {
            println!("not ready: {}", st.not_ready_because.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("not ready: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends `req`, decodes its answer as a `T`, and prints it: JSON with `--json`, else `print`.
fn query<T: DeserializeOwned + Serialize>(q: &Query, req: Request, print: fn(&T)) -> ExitCode {
    let resp: Response = match admin::call(&q.socket, &req, Duration::from_secs(10)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = match resp.decode::<T>() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferry: the agent says: {e}");
            return ExitCode::FAILURE;
        }
    };
    if q.json {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
    } else {
        print(&answer);
    }
    ExitCode::SUCCESS
}

/// An optional value, or `-`.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A list, comma-separated.
fn list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn print_status(d: &Status) {
    let n = &d.node;
    println!("node        {} (up {:.0} s, ferry {})", n.node_name, d.uptime_seconds, d.version);
    println!("underlay    {} {} mac {} mtu {}", n.underlay_if, n.underlay_addr, n.underlay_mac, n.underlay_mtu);
    println!("tunnel      {} vni {} port {} vtep {}", n.tunnel, n.vni, n.tunnel_port, n.vtep_mac);
    println!(
        "pods        cidrs {} gateway {} mtu {}; cluster {}",
        list(&n.pod_cidrs),
        opt(n.gateway_v4),
        n.pod_mtu,
        list(&n.cluster_cidrs)
    );
    println!("host port   {} {}", opt(n.host_if.as_deref()), opt(n.host_addr));
    println!("workers     {} ({} polling); sources {}", n.workers, n.poll, n.sources.join(","));
    let t = &d.tables;
    println!(
        "tables      generation {}, {} remote nodes, {} local endpoints",
        t.generation, t.remote_nodes, t.local_endpoints
    );
    if !d.skipped_nodes.is_empty() {
        println!("left out    {} node(s) the tables could not build:", d.skipped_nodes.len());
        for s in &d.skipped_nodes {
            println!("  {:<16} {}", s.node, s.reason);
        }
    }
    println!("ports");
    for (id, p) in &d.ports {
        println!(
            "  {id:>4}  {:<16} {:<7} {:<8} {}  {}",
            p.ifname,
            p.kind,
            p.xdp_mode,
            list(&p.addrs),
            opt(p.pod.as_deref())
        );
    }
    if let Some(o) = &d.offload {
        print_offload(o);
    }
}

/// Flow offload's counters and entries (`ferry status`), the largest entries first.
fn print_offload(o: &OffloadStatus) {
    let programs: Vec<String> = o.programs.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "offload     {} flows; offered {}, refused {}, given back {}; programs: {}",
        o.flows.len(),
        o.offered,
        o.refused,
        o.removed,
        programs.join(", ")
    );
    let mut flows: Vec<_> = o.flows.iter().collect();
    flows.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    for f in flows.iter().take(20) {
        let rewrite = f.rewrite.as_ref().map_or(String::new(), |r| format!("  {} -> {}:{}", r.end, r.addr, r.port));
        let closed = f.closed.as_ref().map_or(String::new(), |c| format!("  closed ({c})"));
        println!(
            "  {:<6} {:<4} {}:{} -> {}:{}  {} packets, {} bytes{rewrite}{closed}",
            f.action, f.proto, f.src, f.sport, f.dst, f.dport, f.packets, f.bytes
        );
    }
    if flows.len() > 20 {
        println!("  ... {} more (ferry status --json lists them all)", flows.len() - 20);
    }
}

fn print_routes(d: &Routes) {
    println!("generation {}", d.generation);
    println!("{:<26} {:<16} {:<18} {:<8} {:<6} next hop", "destination", "node", "underlay", "tunnel", "vni");
    for r in &d.remote {
        let (state, mac) =
            r.next_hop.as_ref().map_or(("-", "-"), |nh| (nh.state.as_str(), nh.underlay_mac.as_deref().unwrap_or("-")));
        println!(
            "{:<26} {:<16} {:<18} {:<8} {:<6} {} {}",
            list(&r.pod_cidrs),
            r.node,
            format!("{}:{}", r.underlay, r.port),
            r.tunnel,
            r.vni,
            state,
            mac
        );
    }
    for l in &d.local {
        println!(
            "{:<26} {:<16} port {} {} {}",
            list(&l.addrs),
            "local",
            l.port,
            opt(l.ifname.as_deref()),
            opt(l.pod.as_deref())
        );
    }
    for b in &d.blackholes {
        println!("{:<26} {:<16}", b.to_string(), "blackhole (this node's CIDR)");
    }
}

/// `addr:port`, bracketed for IPv6.
fn endpoint(a: std::net::IpAddr, p: u16) -> String {
    std::net::SocketAddr::new(a, p).to_string()
}

fn print_policy(d: &PolicyList) {
    println!("policy generation {}; {} pod(s) on this node selected by a policy", d.generation, d.pods.len());
    for p in &d.pods {
        let iso = |on: bool| if on { "isolated" } else { "open" };
        println!("\n{}  ingress: {}  egress: {}", p.pod, iso(p.ingress_isolated), iso(p.egress_isolated));
        for r in &p.rules {
            let rule = r.rule.map_or_else(|| "-".to_owned(), |i| format!("[{i}]"));
            let dir = if r.direction == "Ingress" { "from" } else { "to" };
            println!("  {:<7} {}{rule:<4} {dir} {}  ports {}", r.direction, r.policy, r.peers, r.ports);
        }
    }
}

fn print_conntrack(d: &ConntrackList) {
    println!(
        "{:<5} {:<40} {:<40} {:<9} {:<28} {:<12} {:>9}",
        "proto", "source", "destination", "direction", "translation", "state", "idle ms"
    );
    for e in &d.entries {
        let proto = match e.proto {
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            132 => "sctp".to_owned(),
            255 => "aff".to_owned(),
            p => p.to_string(),
        };
        println!(
            "{:<5} {:<40} {:<40} {:<9} {:<28} {:<12} {:>9}",
            proto,
            endpoint(e.src, e.sport),
            endpoint(e.dst, e.dport),
            e.direction,
            format!("{} -> {}", e.rewrite, endpoint(e.nat, e.nat_port)),
            e.state,
            e.idle_ms
        );
    }
    println!(
        "{} entries shown; table: {} slots of {} bytes, {} inserted, {} evicted",
        d.entries.len(),
        d.capacity,
        d.entry_bytes,
        d.inserts,
        d.evictions
    );
}

fn print_stats(d: &Stats) {
    println!(
        "{:>4}  {:<16} {:<7} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "port", "ifname", "kind", "rx pkts", "tx pkts", "rx pps", "tx pps", "rx Mbit/s", "tx Mbit/s", "socket drops"
    );
    for p in &d.ports {
        println!(
            "{:>4}  {:<16} {:<7} {:>12} {:>12} {:>10.0} {:>10.0} {:>10.2} {:>10.2} {:>12}",
            p.port,
            p.ifname,
            p.kind,
            p.rx_packets,
            p.tx_packets,
            p.rx_pps,
            p.tx_pps,
            p.rx_bps / 1e6,
            p.tx_bps / 1e6,
            p.socket_drops_total
        );
    }
    println!("drops in ferry: {} in all, {} ICMP errors sent", d.total_drops, d.icmp_errors);
    let f = &d.frames;
    println!("frames: {} free, {} held by ports, {} unaccounted, of {}", f.free, f.held, f.unaccounted, f.total);
    if d.double_frees > 0 {
        println!("frames freed twice and refused: {} (a bug in ferry: please report it)", d.double_frees);
    }
    if d.headroom_moves > 0 {
        println!("packets moved to make room for tunnel headers: {} (each a copy of the packet)", d.headroom_moves);
    }
    for (reason, n) in &d.drops {
        if *n > 0 {
            let rate = d.drop_rates.get(reason).copied().unwrap_or(0.0);
            println!("  {reason:<28} {n:>12}  ({rate:.0}/s)");
        }
    }
    for p in &d.ports {
        if p.socket_drops_total > 0 {
            let x = &p.socket_drops;
            println!(
                "socket drops on {} (before ferry saw them): receive ring full {}, dropped {} (no free frame {}), invalid descriptors {}",
                p.ifname, x.rx_ring_full, x.rx_dropped, x.rx_no_frame, x.invalid_descs
            );
        }
    }
}

/// `30s`, `5m`, `2h`, `1d` (a bare number is seconds).
fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

fn protocol_number(p: &str) -> Option<u8> {
    match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmpv6" => Some(58),
        "sctp" => Some(132),
        n => n.parse().ok(),
    }
}

fn protocol_name(p: Option<u8>) -> String {
    match p {
        Some(6) => "tcp".into(),
        Some(17) => "udp".into(),
        Some(1) => "icmp".into(),
        Some(58) => "icmpv6".into(),
        Some(132) => "sctp".into(),
        Some(n) => n.to_string(),
        None => "-".into(),
    }
}

/// `ferry flows`.
fn flows(a: &FlowsArgs) -> ExitCode {
    let since_ms = match a.since.as_deref().map(|s| (s, parse_duration(s))) {
        None => None,
        Some((_, Some(d))) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Some(now.saturating_sub(d).as_millis() as u64)
        }
        Some((s, None)) => {
            eprintln!("ferry flows: --since {s:?} is not a duration like 30s, 5m or 2h");
            return ExitCode::from(2);
        }
    };
    let proto = match a.protocol.as_deref().map(|p| (p, protocol_number(p))) {
        None => None,
        Some((_, Some(n))) => Some(n),
        Some((p, None)) => {
            eprintln!("ferry flows: --protocol {p:?} is not tcp, udp, icmp, icmpv6 or a number");
            return ExitCode::from(2);
        }
    };
    let filter = FlowFilter {
        pod: a.pod.clone(),
        namespace: a.namespace.clone(),
        node: a.node.clone(),
        verdict: a.verdict.clone(),
        reason: a.reason.clone(),
        proto,
        port: a.port,
        since_ms,
    };
    let mut after = None;
    let mut limit = a.last;
    let mut shown_losses = (0, 0, 0);
    let mut header = !a.query.json;
    loop {
        let req = Request::Flows { filter: filter.clone(), after, limit };
        let list = match admin::call(&a.query.socket, &req, Duration::from_secs(10))
            .map_err(|e| e.to_string())
            .and_then(Response::decode::<FlowList>)
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ferry flows: {e}");
                return ExitCode::FAILURE;
            }
        };
        if !list.enabled {
            eprintln!("ferry flows: flow records are off on this node (dataplane.flows = false)");
            return ExitCode::FAILURE;
        }
        if header && !list.events.is_empty() {
            println!(
                "{:<12} {:<8} {:<9} {:<34}    {:<34} {:<6} {:<12} {:>8} {:>10}  stage / reason",
                "time (UTC)", "node", "verdict", "source", "destination", "proto", "tcp flags", "packets", "bytes"
            );
            header = false;
        }
        for e in &list.events {
            if a.query.json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                print_flow(e);
            }
        }
        let losses = (list.lost_records, list.lost_drop_events, list.rate_limited_drop_events);
        if losses != shown_losses && (losses.0 > 0 || losses.1 > 0 || losses.2 > 0) {
            eprintln!(
                "ferry flows: lost {} flow records and {} drop events (export ring full); {} drop events left out by the rate limit",
                losses.0, losses.1, losses.2
            );
            shown_losses = losses;
        }
        if !a.follow {
            return ExitCode::SUCCESS;
        }
        after = Some(list.last_seq);
        limit = 10_000;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `HH:MM:SS.mmm` of a Unix time (UTC).
fn clock(t: f64) -> String {
    let ms = (t * 1000.0) as u64;
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("{:02}:{:02}:{:02}.{ms:03}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn print_flow(e: &FlowEvent) {
    let end = |pod: &Option<String>, a: Option<std::net::IpAddr>, p: Option<u16>| {
        let addr = match (a, p) {
            (Some(a), Some(p)) if p != 0 => endpoint(a, p),
            (Some(a), _) => a.to_string(),
            _ => "-".into(),
        };
        match pod {
            Some(pod) => format!("{pod} ({addr})"),
            None => addr,
        }
    };
    let mut decided = e.stage.clone();
    if let Some(r) = &e.reason {
        decided = format!("{decided}: {r}");
    }
    if let Some(s) = &e.service {
        decided = format!(
            "{decided} (service {} -> backend {})",
            endpoint(s.vip, s.port),
            endpoint(s.backend, s.backend_port)
        );
    }
    if let Some(p) = &e.policy {
        decided = format!("{decided} (policy {p})");
    }
    println!(
        "{:<12} {:<8} {:<9} {:<34} -> {:<34} {:<6} {:<12} {:>8} {:>10}  {decided}",
        clock(e.time),
        e.node,
        if e.kind == "drop" { "DROPPED" } else { e.verdict.as_str() },
        end(&e.src_pod, e.src, e.sport),
        end(&e.dst_pod, e.dst, e.dport),
        protocol_name(e.proto),
        if e.tcp_flags.is_empty() { "-" } else { e.tcp_flags.as_str() },
        e.packets,
        e.bytes,
    );
    if let Some(p) = &e.packet {
        println!("{:<12} first bytes: {p}", "");
    }
}

/// `TCP/80 from pod x/b 10.244.2.2 on n2 to pod x/a 10.244.1.2 on n1`.
fn trace_title(r: &ferry::admin::proto::TraceReport, port: Option<u16>) -> String {
    let ep = |e: &ferry::admin::proto::TraceEndpoint| {
        let name = e.name.as_deref().map(|n| format!("{} {n} ", e.kind)).unwrap_or_default();
        let node = e.node.as_deref().map(|n| format!(" on {n}")).unwrap_or_default();
        format!("{name}{}{node}", e.addr)
    };
    let port = match (r.proto, r.dst.port.or(port)) {
        (ferry::admin::proto::TraceProto::Icmp, _) => String::new(),
        (_, p) => format!("/{}", p.unwrap_or(80)),
    };
    format!("{}{port} from {} to {}", r.proto.name(), ep(&r.src), ep(&r.dst))
}

/// A trace mark's nonce: random (the standard library's randomly keyed hasher over the time and
/// the process id), so that concurrent traces never watch for each other's packets.
fn trace_nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// `ferry trace --inject`'s output: each node's stages, simulated and real side by side, then both
/// verdicts and whether they agree. Exit status 3 when they disagree.
fn print_inject(r: &ferry::admin::proto::TraceInjectReport, json: bool, port: Option<u16>) -> ExitCode {
    let status = if r.agree { ExitCode::SUCCESS } else { ExitCode::from(3) };
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return status;
    }
    println!("trace {} (one real packet, mark {:#010x})", trace_title(&r.simulated, port), r.nonce);
    println!("{:<8} {:<13} {:<10} {:<10} detail (real)", "node", "stage", "simulated", "real");
    for i in 0..r.simulated.halves.len().max(r.real.len()) {
        let (s, re) = (r.simulated.halves.get(i), r.real.get(i));
        let node = re.or(s).map_or("?", |h| h.node.as_str());
        let n = s.map_or(0, |h| h.stages.len()).max(re.map_or(0, |h| h.stages.len()));
        for k in 0..n {
            let (a, b) = (s.and_then(|h| h.stages.get(k)), re.and_then(|h| h.stages.get(k)));
            let stage = b.or(a).map_or("", |x| x.stage.as_str());
            let mark =
                if a.map(|x| (&x.stage, &x.result)) == b.map(|x| (&x.stage, &x.result)) { "" } else { "  <- differs" };
            println!(
                "{:<8} {:<13} {:<10} {:<10} {}{mark}",
                node,
                stage,
                a.map_or("-", |x| x.result.as_str()),
                b.map_or("-", |x| x.result.as_str()),
                b.or(a).map_or("", |x| x.detail.as_str())
            );
        }
    }
    println!("simulated: {}", r.simulated.verdict);
    println!("real:      {}", r.verdict);
    if r.agree {
        println!("agree: yes (the same stages, verdict, node and backend)");
    } else {
        println!("agree: NO");
        for d in &r.differences {
            println!("  {d}");
        }
    }
    status
}

/// `ferry trace`: the source node's half at the agent that has the source, then the destination
/// node's half at the agent the packet was encapsulated toward.
fn trace(a: &TraceArgs) -> ExitCode {
    use ferry::admin::proto::{TraceEndpoint, TraceHalf, TraceProto};
    let proto = match a.proto.as_str() {
        "udp" => TraceProto::Udp,
        "icmp" => TraceProto::Icmp,
        _ => TraceProto::Tcp,
    };
    let mut sockets = std::collections::BTreeMap::new();
    for entry in &a.admin {
        let Some((node, path)) = entry.split_once('=') else {
            eprintln!("ferry trace: --admin {entry}: expected NODE=PATH");
            return ExitCode::from(2);
        };
        sockets.insert(node.to_owned(), PathBuf::from(path));
    }
    let socket_of = |node: &str| -> Result<PathBuf, String> {
        sockets
            .get(node)
            .cloned()
            .or_else(|| a.admin_pattern.as_ref().map(|p| PathBuf::from(p.replace("{node}", node))))
            .ok_or_else(|| {
                format!("the trace goes on at node {node}: give its agent with --admin {node}=PATH or --admin-pattern")
            })
    };
    let ask_raw = |node: Option<&str>, req: &Request| -> Result<(PathBuf, admin::Response), String> {
        let socket = match node {
            None => a.query.socket.clone(),
            Some(n) => socket_of(n)?,
        };
        let r = admin::call(&socket, req, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        Ok((socket, r))
    };
    let ask = |node: Option<&str>, req: &Request| -> Result<TraceHalf, String> {
        let (socket, r) = ask_raw(node, req)?;
        r.decode::<TraceHalf>().map_err(|e| format!("the agent at {} says: {e}", socket.display()))
    };
    // A name is resolved by the first agent that knows it: the one at --socket, then the others
    // (a static route source without [[pod]] entries leaves each agent knowing its own pods only);
    // the halves are then asked by address.
    let resolve = |name: &str| -> Result<TraceEndpoint, String> {
        let req = Request::TraceResolve { name: name.to_owned(), proto, port: a.port };
        let first = admin::call(&a.query.socket, &req, Duration::from_secs(10))
            .map_err(|e| e.to_string())?
            .decode::<TraceEndpoint>();
        let Err(first_err) = first else { return first };
        let mut others: Vec<String> = sockets.keys().cloned().collect();
        if a.admin_pattern.is_some()
            && let Ok(r) = admin::call(&a.query.socket, &Request::Routes, Duration::from_secs(10))
            && let Ok(routes) = r.decode::<Routes>()
        {
            others.extend(routes.remote.into_iter().map(|n| n.node));
        }
        for node in others {
            let Ok(sock) = socket_of(&node) else { continue };
            if sock == a.query.socket {
                continue;
            }
            if let Ok(ep) = admin::call(&sock, &req, Duration::from_secs(10))
                .map_err(|e| e.to_string())
                .and_then(|r| r.decode::<TraceEndpoint>())
            {
                return Ok(ep);
            }
        }
        Err(format!("the agent at {} says: {first_err}", a.query.socket.display()))
    };
    let endpoints = || -> Result<(TraceEndpoint, TraceEndpoint), String> { Ok((resolve(&a.src)?, resolve(&a.dst)?)) };
    // The names as resolved (the halves were asked by address).
    let named = |r: &mut ferry::admin::proto::TraceReport, src_ep: TraceEndpoint, dst_ep: TraceEndpoint| {
        r.src = TraceEndpoint { node: src_ep.node.clone().or(r.src.node.clone()), ..src_ep };
        r.dst = TraceEndpoint { node: dst_ep.node.clone().or(r.dst.node.clone()), ..dst_ep };
    };
    if a.inject {
        let run = || -> Result<ferry::admin::proto::TraceInjectReport, String> {
            let (src_ep, dst_ep) = endpoints()?;
            let port = dst_ep.port.or(a.port);
            let mut r = ferry::admin::trace_inject_report(
                &src_ep.addr.to_string(),
                &dst_ep.addr.to_string(),
                proto,
                port,
                trace_nonce(),
                |node, req| {
                    let (socket, r) = ask_raw(node, req)?;
                    match r.ok {
                        true => Ok(r),
                        false => {
                            Err(format!("the agent at {} says: {}", socket.display(), r.error.unwrap_or_default()))
                        }
                    }
                },
            )?;
            named(&mut r.simulated, src_ep, dst_ep);
            Ok(r)
        };
        return match run() {
            Ok(r) => print_inject(&r, a.query.json, a.port),
            Err(e) => {
                eprintln!("ferry trace --inject: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let run = || -> Result<ferry::admin::proto::TraceReport, String> {
        let (src_ep, dst_ep) = endpoints()?;
        let port = dst_ep.port.or(a.port);
        let mut r =
            ferry::admin::trace_report(&src_ep.addr.to_string(), &dst_ep.addr.to_string(), proto, port, None, ask)?;
        named(&mut r, src_ep, dst_ep);
        Ok(r)
    };
    let report = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry trace: {e}");
            return ExitCode::FAILURE;
        }
    };
    if a.query.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("trace {}", trace_title(&report, a.port));
    println!("{:<8} {:<13} {:<10} detail", "node", "stage", "result");
    for h in &report.halves {
        for s in &h.stages {
            println!("{:<8} {:<13} {:<10} {}", h.node, s.stage, s.result, s.detail);
        }
    }
    println!("verdict: {}", report.verdict);
    ExitCode::SUCCESS
}

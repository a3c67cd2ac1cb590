# shellcheck shell=bash
# scripts/bench.sh's report: medians of the repeats, the side-by-side table with ratios ferry/kernel, the JSON
# file. Source it; it defines functions only.

# rewrite_runs RUNLOG SKIP FILTER [JQ OPTIONS...]: the run records after the first SKIP lines of RUNLOG go through
# the jq FILTER (with the options, e.g. --arg NAME VALUE).
rewrite_runs() {
    local log=$1 skip=$2 filter=$3 tmp
    shift 3
    tmp=$(mktemp)
    { head -n "$skip" "$log"; tail -n +"$((skip + 1))" "$log" | jq -c "$@" "$filter"; } >"$tmp"
    cat "$tmp" >"$log"
    rm -f "$tmp"
}

# relabel_runs RUNLOG SKIP FROM TO: the run records after the first SKIP lines of RUNLOG with side FROM get side TO
# (the flows-off runs are ferry's runs with another configuration).
relabel_runs() {
    rewrite_runs "$1" "$2" 'if .side == $from then .side = $to else . end' --arg from "$3" --arg to "$4"
}

# bench_report RUNLOG JSON_OUT
bench_report() {
    local py=/usr/bin/python3
    [ -x "$py" ] || py=python3
    "$py" - "$1" "$2" <<'PY'
import json, statistics, sys, os, platform

runlog, out = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(runlog) if l.strip()]
env = os.environ
# The peak: per repeat, the highest 64-byte rate forwarded at any offered rate (--rate max and the loss search's
# tries). A forwarder whose receive half preempts its own worker forwards less when overloaded than at its peak.
for side in sorted({r["side"] for r in runs if r.get("side")}):
    for d in ("encap", "decap"):
        reps = {}
        for r in runs:
            if r.get("side") == side and r.get("test") in (f"{d}64_max", f"{d}64_try") and r.get("fwd_pps") is not None:
                reps[r["rep"]] = max(reps.get(r["rep"], 0), r["fwd_pps"])
        runs += [{"side": side, "test": f"{d}64_peak", "rep": rep, "fwd_pps": v} for rep, v in reps.items()]

def med(side, test, key):
    vals = [r[key] for r in runs if r.get("side") == side and r.get("test") == test and r.get(key) is not None]
    return statistics.median(vals) if vals else None

def cpu(side, test):
    c = [r["cpu"] for r in runs if r.get("side") == side and r.get("test") == test and "cpu" in r]
    if not c:
        return None
    return {k: {m: round(statistics.median(x[k][m] for x in c), 1) for m in ("busy", "user", "softirq")}
            for k in ("cpu0", "cpu1")}

def per_mpkt(side, test):
    # CPU 1 (the forwarding core) busy seconds per million forwarded packets, and the ferry agent's own.
    rs = [r for r in runs if r.get("side") == side and r.get("test") == test and r.get("fwd_packets")]
    if not rs:
        return None, None
    core = statistics.median(r["cpu"]["cpu1"]["busy"] / 100 * r["seconds"] / (r["fwd_packets"] / 1e6) for r in rs)
    agent = statistics.median(r["ferry_cpu_s"] / (r["fwd_packets"] / 1e6) for r in rs) if side == "ferry" else None
    return core, agent

mtu = env.get("MTU_FRAME", "1464")
rows = [
    # name, test, key, scale, unit, higher is better, target ratio
    ("encap 64B forwarded at --rate max", "encap64_max", "fwd_pps", 1e-3, "kpps", True, None),
    ("encap 64B peak forwarded", "encap64_peak", "fwd_pps", 1e-3, "kpps", True, 3.0),
    ("encap 64B < 0.1% loss", "encap64_noloss", "rate", 1e-3, "kpps", True, 3.0),
    (f"encap {mtu}B", f"encap{mtu}_max", "fwd_pps", 1e-3, "kpps", True, None),
    (f"encap {mtu}B", f"encap{mtu}_max", "fwd_gbps", 1, "Gbit/s", True, None),
    ("decap 64B forwarded at --rate max", "decap64_max", "fwd_pps", 1e-3, "kpps", True, None),
    ("decap 64B peak forwarded", "decap64_peak", "fwd_pps", 1e-3, "kpps", True, 3.0),
    ("decap 64B < 0.1% loss", "decap64_noloss", "rate", 1e-3, "kpps", True, 3.0),
    (f"decap {mtu}B", f"decap{mtu}_max", "fwd_pps", 1e-3, "kpps", True, None),
    (f"decap {mtu}B", f"decap{mtu}_max", "fwd_gbps", 1, "Gbit/s", True, None),
    ("TCP 1 stream (2 nodes)", "tcp1", "gbps", 1, "Gbit/s", True, 0.5),
    ("TCP 4 streams (2 nodes)", "tcp4", "gbps", 1, "Gbit/s", True, 0.5),
    (f"latency p50 @{env.get('LAT_RATE', '20000')} pps (2 nodes)", "lat", "lat_p50_ns", 1e-3, "us", False, None),
    (f"latency p99 @{env.get('LAT_RATE', '20000')} pps (2 nodes)", "lat", "lat_p99_ns", 1e-3, "us", False, 1.0),
]
table = []
def fmt(v):
    return "-" if v is None else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")
def fcpu(c):
    return "-" if c is None else f"{c['cpu0']['busy']:.0f}/{c['cpu1']['busy']:.0f}"
print(f"{'measure':<34} {'unit':<7} {'ferry':>9} {'kernel':>9} {'ratio':>6} {'target':>8}  cpu0/cpu1 busy% ferry | kernel")
for name, test, key, scale, unit, higher, target in rows:
    f, k = med("ferry", test, key), med("kernel", test, key)
    f = None if f is None else f * scale
    k = None if k is None else k * scale
    ratio = f / k if f is not None and k else None
    tgt = "-" if target is None else (f">= {target}x" if higher else f"<= {target}x")
    ok = None
    if ratio is not None and target is not None:
        ok = ratio >= target if higher else ratio <= target
    cf, ck = cpu("ferry", test), cpu("kernel", test)
    print(f"{name:<34} {unit:<7} {fmt(f):>9} {fmt(k):>9} {fmt(ratio):>6} {tgt:>8}  {fcpu(cf):>9} | {fcpu(ck)}"
          + ("" if ok is None else ("  met" if ok else "  NOT met")))
    table.append({"measure": name, "test": test, "unit": unit, "ferry": f, "kernel": k, "ratio": ratio,
                  "target": target, "lower_is_better": not higher, "met": ok, "cpu_ferry": cf, "cpu_kernel": ck})
fc, fa = per_mpkt("ferry", "encap64_max")
kc, _ = per_mpkt("kernel", "encap64_max")
dfc, dfa = per_mpkt("ferry", "decap64_max")
dkc, _ = per_mpkt("kernel", "decap64_max")
print()
print("CPU-seconds per million packets at the highest 64-byte rate (CPU 1's busy time; the ferry agent's own time):")
print(f"  encap: ferry CPU1 {fmt(fc)}, ferry agent {fmt(fa)}; kernel CPU1 {fmt(kc)}")
print(f"  decap: ferry CPU1 {fmt(dfc)}, ferry agent {fmt(dfa)}; kernel CPU1 {fmt(dkc)}")
# --kinds: ferry's other port kinds (side ferry:KIND) against the same kernel runs.
kinds_table = []
other_kinds = list(dict.fromkeys(r["side"] for r in runs if r.get("side", "").startswith("ferry:")))
if other_kinds:
    kcols = [("TCP 1 Gbit/s", "tcp1", "gbps", 1), ("TCP 4 Gbit/s", "tcp4", "gbps", 1),
             ("lat p50 us", "lat", "lat_p50_ns", 1e-3), ("lat p99 us", "lat", "lat_p99_ns", 1e-3),
             ("encap 64B kpps", "encap64_peak", "fwd_pps", 1e-3), ("decap 64B kpps", "decap64_peak", "fwd_pps", 1e-3),
             (f"encap {mtu}B Gbit/s", f"encap{mtu}_max", "fwd_gbps", 1), (f"decap {mtu}B Gbit/s", f"decap{mtu}_max", "fwd_gbps", 1)]
    print()
    print("port kinds (pod/uplink[/offload]): ferry's median (ratio to the kernel's VXLAN in this run)")
    print(f"{'kind':<13}" + "".join(f"{c[0]:>21}" for c in kcols))
    for side in ["ferry"] + other_kinds:
        kind = env.get("MAIN_KIND", "?") if side == "ferry" else side[len("ferry:"):]
        cells, row = [], {"kind": kind}
        for _, test, key, scale in kcols:
            f, k = med(side, test, key), med("kernel", test, key)
            ratio = f / k if f is not None and k else None
            cells.append("-" if f is None else f"{fmt(f * scale)} ({fmt(ratio)}x)")
            row[test + ":" + key] = {"ferry": None if f is None else f * scale, "ratio": ratio}
        print(f"{kind:<13}" + "".join(f"{c:>21}" for c in cells))
        kinds_table.append(row)
def stolen(r):
    return r.get("steal_ms", 0)
for side in ("ferry", "kernel"):
    redone = [r for r in runs if r.get("side") == side and r.get("test") == "lat_stolen"]
    kept = [r for r in runs if r.get("side") == side and r.get("test") == "lat" and stolen(r) > 0]
    if redone or kept:
        print(f"note: {side} latency: {len(redone)} run(s) made again because the hypervisor stole CPU time during them"
              f" ({', '.join(str(stolen(r)) + ' ms' for r in redone) or 'none'}; their p99 "
              f"{', '.join(fmt(r['lat_p99_ns'] / 1e3) + ' us' for r in redone) or '-'})"
              + (f"; {len(kept)} kept run(s) still lost time ({', '.join(str(stolen(r)) + ' ms' for r in kept)})" if kept else ""))
nl = [r for r in runs if r.get("test", "").endswith("_noloss") and r.get("rate") is None]
if nl:
    print("note: lossy at every rate tried: " + ", ".join(f"{r['side']} {r['test']} rep {r['rep']} (down to {r['lossy_at']} pps)" for r in nl))
gb = [r for r in runs if r.get("generator_bound")]
if gb:
    print("note: " + ", ".join(sorted({f"{r['side']} {r['test']}" for r in gb}))
          + ": no loss even at the generator's highest rate (the figure is the generator's, a lower bound)")
flows_table = []
if any(r.get("side") == "ferry_noflows" for r in runs):
    print()
    print("ferry with flow records on (dataplane.flows = true) against off, the same run (target: on >= 0.95x off):")
    for name, test, key, scale, unit, higher, _ in rows[:10]:
        on, off = med("ferry", test, key), med("ferry_noflows", test, key)
        on = None if on is None else on * scale
        off = None if off is None else off * scale
        ratio = on / off if on is not None and off else None
        print(f"  {name:<34} {unit:<7} on {fmt(on):>9}  off {fmt(off):>9}  on/off {fmt(ratio):>6}")
        flows_table.append({"measure": name, "test": test, "unit": unit, "flows_on": on, "flows_off": off, "ratio": ratio})
export_table = []
exp = [r for r in runs if r.get("side") == "ferry" and r.get("flow_records_exported") is not None and r.get("tx_packets")]
if any(r["flow_records_exported"] or r["flow_records_lost"] for r in exp):
    print()
    print(f"flow-record export on n1 (--pktgen-flows {env.get('PKTGEN_FLOWS', '1')}; records taken by the agent and lost to a full ring):")
    for test in sorted({r["test"] for r in exp}):
        rs = [r for r in exp if r["test"] == test]
        sent = sum(r["tx_packets"] for r in rs)
        exported = sum(r["flow_records_exported"] for r in rs)
        lost = sum(r["flow_records_lost"] for r in rs)
        share = lost / (exported + lost) if exported + lost else 0.0
        fwd = statistics.median(r["fwd_pps"] for r in rs)
        nflows = max(r.get("flows", 1) for r in rs)
        print(f"  {test:<16} {nflows:>6} flows  forwarded {fwd:>10.0f} pps (median)  records exported {exported:>9}  lost {lost:>9} ({share:.2%})  over {sent} packets sent")
        export_table.append({"test": test, "flows": nflows, "fwd_pps_median": fwd, "exported": exported, "lost": lost, "lost_share": share, "packets_sent": sent})
summary = {
    "kinds": kinds_table,
    "flow_export": export_table,
    "flows_on_vs_off": flows_table,
    "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")},
    "settings": {k.lower(): env.get(k) for k in ("REPEATS", "DURATION", "TCP_T", "POLL", "NAPI", "QUICK", "LAT_RATE", "GEN_CPU", "FWD_CPU", "MAIN_KIND", "KINDS")},
    "load_start": env.get("LOAD_START"), "load_end": env.get("LOAD_END"),
    "table": table,
    "cpu_s_per_mpkt": {"encap": {"ferry_cpu1": fc, "ferry_agent": fa, "kernel_cpu1": kc},
                         "decap": {"ferry_cpu1": dfc, "ferry_agent": dfa, "kernel_cpu1": dkc}},
    "runs": runs,
}
with open(out, "w") as fh:
    json.dump(summary, fh, indent=2)
PY
}

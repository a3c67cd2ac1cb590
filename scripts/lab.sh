#!/usr/bin/env bash
# ferry's lab: a whole cluster on one machine, in network namespaces joined by a bridge.
#
#   sudo scripts/lab.sh                   install what is missing, build, up, check, show stats, explain
#   sudo scripts/lab.sh up [--nodes N] [--pods-per-node M] [--encap vxlan|geneve] [--source static|etcd|kube]
#                          [--kernel-nodes K] [--port P] [--ip-family ipv4|dual] [--underlay ipv4|ipv6|dual]
#                          [--uplink-port afxdp|udp|auto] [--pod-port veth|tap|auto] [--offload off|tc]
#                          [--services N] [--name LAB]
#                          [--no-build]
#   sudo scripts/lab.sh check [--json FILE]        the connectivity matrix; non-zero exit on any failure
#   sudo scripts/lab.sh down                        remove everything of the lab (also after a crash)
#   sudo scripts/lab.sh list [--json]               nodes and pods with their addresses
#   sudo scripts/lab.sh stats | status              `ferry stats` / `ferry status` of every ferry node
#   sudo scripts/lab.sh exec NODE|POD|ul CMD...     run a command in a node's, pod's or the underlay's netns
#   sudo scripts/lab.sh kill-agent NODE             kill -9 the node's agent
#   sudo scripts/lab.sh start-agent NODE            start it again with the same config (silent on success)
#   sudo scripts/lab.sh add-node [--kernel] [--pods-per-node M]   a new node, announced; prints its name
#   sudo scripts/lab.sh remove-node NODE            withdraw it from the source, then delete it
#   sudo scripts/lab.sh source-remove NODE          withdraw a node from the route source only (it keeps running)
#   sudo scripts/lab.sh source-add NODE             announce it again
#   sudo scripts/lab.sh add-pod NODE                a new pod through the node's CNI plugin; prints its name
#   sudo scripts/lab.sh del-pod POD                 CNI DEL, then remove its namespace
#   sudo scripts/lab.sh reach FROM TO [--wait S]    ping TO (a pod's IP, a node's underlay IP) from FROM until it
#                                                   answers (give up after S seconds; default one try); exit 0/1
#
# Every command takes --name LAB (default: $FERRY_LAB, else "ferrylab"); labs with different names coexist.
# Nodes: n1..nN run ferry, k<i> run the kernel's VXLAN configured like Flannel. Pods: <node>-p<j>.
# State: /run/ferry-lab/<lab>/. Binaries: $FERRY_BIN_DIR (default target/release of this checkout).
# --uplink-port: the agents' dataplane.uplink_port (default auto: udp on the lab's IPv4 veth underlay, afxdp on
# an IPv6 or dual one; udp: a kernel UDP socket with UDP_SEGMENT/UDP_GRO and no XDP program on the uplink).
# --pod-port: the interface ferry nodes give their pods (the agents' dataplane.pod_port; default auto: a veth
# under flow offload, else a tap when /dev/net/tun opens, else a veth). --offload: the agents'
# dataplane.offload (default auto: on where the uplink is udp and pods are not taps; tc: always, needs
# --pod-port veth --uplink-port udp; off). The default lab therefore moves established TCP and UDP flows in
# TC programs; --uplink-port afxdp --offload off is the AF_XDP path with tap pods.
# Kernel nodes need --encap vxlan (this kernel has no geneve module). Sources: static (one shared file,
# $STATE/nodes.toml), etcd (Debian's etcd on 192.168.100.254:2379 in the underlay namespace, Flannel
# leases; a running agent re-takes its own lease, so source-remove wants kill-agent first), kube (the
# cached kube-apiserver of scripts/build-kube-apiserver.sh on 192.168.100.254:6443, Node objects with
# spec.podCIDRs and Flannel annotations, and a Pod in namespace "lab" for every pod, status.podIPs set).
# check runs $FERRY_LAB_CHECK_JOBS pairs at once (default 6).
# --ip-family ipv6 gives pods only an IPv6 address (the same /64s; no IPv4 pod CIDR anywhere), and check
# runs the IPv6 rows (pods <-> pods, nodes -> pods; pods -> nodes over IPv6 where nodes have IPv6 underlay
# addresses).
# --ip-family dual gives every pod an IPv6 address too (node i: fd00:10:244:<i>::/64, over the IPv4
# underlay), and check adds every pod pair over IPv6; kernel-VXLAN nodes carry it on flannel.1 too (their
# pods on cni0 get both families from the bridge plugin; with --source etcd the leases are
# Flannel's dual-stack ones: EnableIPv6, keys 10.244.<i>.0-24&fd00:10:244:<i>::-64).
# --services N (static or kube source): N Services (VIPs 10.96.x.y in the agents' service_cidrs, port 80
# over TCP and UDP), each with two backend pods on different ferry nodes answering their name; check adds
# every ferry node's pod -> every Service VIP over TCP and UDP, answered by one of its backends.
# --underlay ipv6 carries the tunnels over IPv6: node i's uplink gets fd00:100::<i>/64 as well as its IPv4
# address, and that IPv6 address is the one the source announces and the tunnels use (static or kube
# source; kernel-VXLAN nodes run their vxlan device over IPv6 too; pod MTU 70 bytes under the underlay's).
# --underlay dual: every node's uplink has both (192.168.100.<i>, fd00:100::<i>) and announces both, but
# the last ferry node announces only its IPv6 one; nodes with both reach each other over IPv4 (the agents'
# underlay.prefer_family), and the last node over IPv6 (ferry nodes only, static or kube source).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO/scripts/lab.sh"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

die() { echo "lab.sh: $*" >&2; exit 1; }

# shellcheck source=scripts/lib/lab-net.sh
. "$REPO/scripts/lib/lab-net.sh"
# shellcheck source=scripts/lib/lab-source.sh
. "$REPO/scripts/lib/lab-source.sh"
# shellcheck source=scripts/lib/lab-check.sh
. "$REPO/scripts/lib/lab-check.sh"

LAB=${FERRY_LAB:-ferrylab}
BIN_DIR=${FERRY_BIN_DIR:-$REPO/target/release}
FERRY=$BIN_DIR/ferry
FERRY_CNI=$BIN_DIR/ferry-cni
CNI_DIR=/usr/lib/cni
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || echo python3)

# Defaults of `up` (also recorded in lab.env for the other commands).
NODES=3
PODS=2
ENCAP=vxlan
SOURCE=static
IP_FAMILY=ipv4
UNDERLAY=ipv4
KNODES=0
PORT=
UPLINK_PORT=auto
POD_PORT=auto
OFFLOAD=auto
VNI=1
SERVICES=0
BUILD=1
PODS_ARG=
WAIT=0

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, AF_XDP): run with sudo: sudo $0 $*"
}

check_name() {
    [[ $LAB =~ ^[A-Za-z0-9][A-Za-z0-9_]{0,23}$ ]] ||
        die "bad lab name '$LAB': letters, digits and _ only, at most 24 characters"
    STATE=/run/ferry-lab/$LAB
}

save_settings() {
    printf 'NODES=%q\nPODS=%q\nENCAP=%q\nSOURCE=%q\nKNODES=%q\nPORT=%q\nUPLINK_PORT=%q\nPOD_PORT=%q\nVNI=%q\nBIN_DIR=%q\nIP_FAMILY=%q\nSERVICES=%q\nUNDERLAY=%q\nOFFLOAD=%q\n' \
        "$NODES" "$PODS" "$ENCAP" "$SOURCE" "$KNODES" "$PORT" "$UPLINK_PORT" "$POD_PORT" "$VNI" "$BIN_DIR" "$IP_FAMILY" \
        "$SERVICES" "$UNDERLAY" "$OFFLOAD" >"$STATE/lab.env"
}

load_settings() {
    [ -f "$STATE/lab.env" ] || die "no lab '$LAB' (no $STATE/lab.env); start one with: sudo $0 up --name $LAB"
    # shellcheck disable=SC1091
    . "$STATE/lab.env"
    FERRY=$BIN_DIR/ferry
    FERRY_CNI=$BIN_DIR/ferry-cni
}

# Namespaces that belong to the lab: <lab>-ul, <lab>-<n|k><i>, <lab>-<n|k><i>-p<j>.
lab_netns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${LAB}-(ul|[nk][0-9]+(-p[0-9]+)?)$" || true
}

# --- install and build ----------------------------------------------------------------------------------------
ensure_packages() {
    local pkgs=(iproute2 iputils-ping ethtool containernetworking-plugins python3)
    [ "$SOURCE" = etcd ] && pkgs+=(etcd-server etcd-client)
    [ "$SOURCE" = kube ] && pkgs+=(etcd-server etcd-client curl openssl)
    # Building needs its own packages too (a bare machine has none of them); --no-build skips those.
    if [ "$BUILD" = 1 ] && [ -z "${FERRY_BIN_DIR:-}" ]; then ensure_build_packages "${pkgs[@]}"; else ensure_apt "${pkgs[@]}"; fi
}

build_binaries() {
    [ "$NODES" -gt 0 ] || return 0
    if [ "$BUILD" = 1 ] && [ -z "${FERRY_BIN_DIR:-}" ]; then
        local cargo
        cargo=$(command -v cargo || true)
        if [ -z "$cargo" ] && [ -n "${SUDO_USER:-}" ]; then
            cargo=$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo
        fi
        if [ -z "$cargo" ] || [ ! -x "$cargo" ]; then die "cargo not found; install Rust (rustup) or set FERRY_BIN_DIR"; fi
        step "building ferry (cargo build --release --locked -p ferry)"
        if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
            # Build as the user who owns the checkout, not as root.
            (cd "$REPO" && sudo -u "$SUDO_USER" -- "$cargo" build --release --locked -p ferry)
        else
            (cd "$REPO" && "$cargo" build --release --locked -p ferry)
        fi
    fi
    [ -x "$FERRY" ] || die "no ferry binary at $FERRY (build: cargo build --release --locked -p ferry)"
    [ -x "$FERRY_CNI" ] || die "no ferry-cni binary at $FERRY_CNI (build: cargo build --release --locked -p ferry)"
}

# --- commands -------------------------------------------------------------------------------------------------
cmd_up() {
    [ -z "$PORT" ] && { [ "$ENCAP" = geneve ] && PORT=6081 || PORT=4789; }
    case "$ENCAP" in vxlan | geneve) ;; *) die "--encap: vxlan or geneve, not '$ENCAP'" ;; esac
    case "$UPLINK_PORT" in afxdp | udp | auto) ;; *) die "--uplink-port: afxdp, udp or auto, not '$UPLINK_PORT'" ;; esac
    case "$SOURCE" in static | etcd | kube) ;;
        *) die "--source: static, etcd or kube, not '$SOURCE'" ;; esac
    case "$POD_PORT" in veth | tap | auto) ;; *) die "--pod-port: veth, tap or auto, not '$POD_PORT'" ;; esac
    case "$OFFLOAD" in off | auto) ;; tc)
        [ "$POD_PORT" = veth ] && [ "$UPLINK_PORT" = udp ] || die "--offload tc needs --pod-port veth --uplink-port udp" ;;
        *) die "--offload: off, tc or auto, not '$OFFLOAD'" ;; esac
    [[ $NODES =~ ^[0-9]+$ && $PODS =~ ^[0-9]+$ && $KNODES =~ ^[0-9]+$ && $PORT =~ ^[0-9]+$ ]] ||
        die "--nodes, --pods-per-node, --kernel-nodes and --port take numbers"
    if [ $((NODES + KNODES)) -lt 1 ] || [ $((NODES + KNODES)) -gt 250 ]; then die "between 1 and 250 nodes in all"; fi
    case "$IP_FAMILY" in ipv4 | dual | ipv6) ;; *) die "--ip-family: ipv4, dual or ipv6, not '$IP_FAMILY'" ;; esac
    if [ "$IP_FAMILY" = ipv6 ] && { [ "$SOURCE" = etcd ] || [ "$SERVICES" -gt 0 ]; }; then
        die "--ip-family ipv6: the static or kube source, no --services (Flannel's leases and the lab's services are IPv4)"
    fi
    [[ $SERVICES =~ ^[0-9]+$ ]] && [ "$SERVICES" -le 5000 ] || die "--services takes a number up to 5000, not '$SERVICES'"
    if [ "$SERVICES" -gt 0 ] && [ "$SOURCE" = etcd ]; then die "--services: with the static or kube source (etcd carries no Services)"; fi
    if [ "$IP_FAMILY" = ipv6 ] && [ "$KNODES" -gt 0 ]; then
        die "--ip-family ipv6: ferry nodes only (the lab's kernel-VXLAN nodes have an IPv4 pod CIDR)"
    fi
    case "$UNDERLAY" in ipv4 | ipv6 | dual) ;; *) die "--underlay: ipv4, ipv6 or dual, not '$UNDERLAY'" ;; esac
    if [ "$UNDERLAY" != ipv4 ] && [ "$SOURCE" = etcd ]; then
        die "--underlay $UNDERLAY: the static or kube source (the lab writes Flannel's etcd leases with an IPv4 PublicIP only)"
    fi
    if [ "$UNDERLAY" != ipv4 ] && [ "$UPLINK_PORT" = udp ]; then
        die "--underlay $UNDERLAY needs --uplink-port afxdp or auto: the UDP-socket uplink carries IPv4 underlays only"
    fi
    if [ "$UNDERLAY" = dual ] && [ "$KNODES" -gt 0 ]; then
        die "--underlay dual: ferry nodes only (a kernel vxlan device runs over one family)"
    fi
    if [ "$KNODES" -gt 0 ] && [ "$ENCAP" != vxlan ]; then
        die "--kernel-nodes needs --encap vxlan: kernel nodes run the kernel's VXLAN device (Flannel-style), and this kernel has no geneve module to match ferry's Geneve"
    fi
    if [ -e "$STATE" ] || [ -n "$(lab_netns)" ]; then
        die "lab '$LAB' already exists (state $STATE or namespaces $LAB-*); remove it first: sudo $0 down --name $LAB"
    fi
    ensure_packages
    build_binaries

    step "lab $LAB: $NODES ferry node(s) + $KNODES kernel-VXLAN node(s), $PODS pod(s) each, $ENCAP port $PORT, source $SOURCE, uplink port $UPLINK_PORT, pod port $POD_PORT, offload $OFFLOAD, $UNDERLAY underlay"
    mkdir -p "$STATE/nodes"
    save_settings
    trap 'echo "lab.sh: up failed; what exists is left for inspection; remove it with: sudo $0 down --name $LAB" >&2' ERR
    underlay_up
    source_up
    local i name
    # Every node is created and announced first, then agents start and pods are wired: agents then
    # come up with a full table.
    for ((i = 1; i <= NODES + KNODES; i++)); do
        if [ "$i" -le "$NODES" ]; then name=n$i; node_create "$name" ferry "$i"
        else name=k$i; node_create "$name" kernel "$i"; kernel_node_setup "$name"; fi
        node_set "$name" LISTED 1
        case "$SOURCE" in etcd) etcd_put_lease "$name" ;; kube) kube_put_node "$name" ;; esac
    done
    [ "$SOURCE" = static ] && static_write
    kernel_sync_all
    for name in $(nodes_of_kind ferry); do agent_start "$name"; done
    local j
    for name in $(all_nodes); do
        for ((j = 1; j <= PODS; j++)); do pod_add "$name" "$j"; done
    done
    if [ "$SERVICES" -gt 0 ]; then
        step "$SERVICES service(s) ($SOURCE source)"
        services_up "$SERVICES"
    fi
    wait_converged 15
    trap - ERR
    echo "lab $LAB is up: $(all_nodes | wc -l) node(s), $(all_pods | wc -l) pod(s); state in $STATE"
}

cmd_down() {
    local ns n
    for n in $(all_nodes 2>/dev/null); do agent_stop "$n" 2>/dev/null || true; done
    [ -d "$STATE" ] && source_down
    for ns in $(lab_netns); do kill_netns_procs "$ns"; done
    for ns in $(lab_netns); do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$STATE"
    [ -z "$(lab_netns)" ] || die "could not remove namespaces: $(lab_netns | tr '\n' ' ')"
    echo "lab $LAB removed"
}

json_str() { printf '"%s"' "${1//\"/\\\"}"; }

cmd_list() {
    local json=$1 n p sep=""
    if [ "$json" = 1 ]; then
        printf '{"name":%s,"state_dir":%s,"encap":%s,"port":%s,"pod_port":%s,"vni":%s,"source":%s,"underlay_netns":%s,' \
            "$(json_str "$LAB")" "$(json_str "$STATE")" "$(json_str "$ENCAP")" "$PORT" "$(json_str "$POD_PORT")" "$VNI" \
            "$(json_str "$SOURCE")" "$(json_str "$(ul_ns)")"
        printf '"underlay_gateway":%s,"cluster_cidr":%s,"static_file":%s,\n"nodes":[' "$(json_str "$UL_GW")" \
            "$(json_str "$CLUSTER_CIDR")" "$(json_str "$STATE/$STATIC_FILE_NAME")"
        for n in $(all_nodes); do
            local d pid
            d=$(node_dir "$n")
            pid=$(agent_pid "$n" || echo null)
            local six
            six=$(node_get "$n" TUN_IP6 2>/dev/null || true)
            if [ -n "$six" ]; then six=$(json_str "$six"); else six=null; fi
            printf '%s\n {"name":%s,"kind":%s,"netns":%s,"underlay_ip":%s,"tunnel_ip":%s,"tunnel_ip6":%s,"pod_cidr":%s,"gateway":%s,"vtep_mac":%s,"listed":%s,' \
                "$sep" "$(json_str "$n")" "$(json_str "$(node_get "$n" KIND)")" "$(json_str "$(node_ns "$n")")" \
                "$(json_str "$(node_get "$n" UL_IP)")" "$(json_str "$(node_get "$n" TUN_IP)")" "$six" "$(json_str "$(node_get "$n" POD_CIDR)")" \
                "$(json_str "$(node_get "$n" GW)")" "$(json_str "$(node_get "$n" VTEP_MAC)")" \
                "$([ "$(node_get "$n" LISTED)" = 1 ] && echo true || echo false)"
            if [ "$(node_get "$n" KIND)" = ferry ]; then
                printf '"admin_socket":%s,"config":%s,"log":%s,"agent_pid":%s}' "$(json_str "$d/ferry.sock")" \
                    "$(json_str "$d/config.toml")" "$(json_str "$d/agent.log")" "$pid"
            else
                printf '"admin_socket":null,"config":null,"log":null,"agent_pid":null}'
            fi
            sep=","
        done
        printf '\n],\n"pods":['
        sep=""
        for p in $(all_pods); do
            local ip6
            ip6=$(pod_get "$p" IP6 2>/dev/null || true)
            if [ -n "$ip6" ]; then ip6=$(json_str "$ip6"); else ip6=null; fi
            printf '%s\n {"name":%s,"node":%s,"netns":%s,"ip":%s,"ip6":%s,"ifname":"eth0","container_id":%s}' "$sep" \
                "$(json_str "$p")" "$(json_str "$(pod_node "$p")")" "$(json_str "$(node_ns "$p")")" \
                "$(json_str "$(pod_get "$p" IP)")" "$ip6" "$(json_str "$p")"
            sep=","
        done
        printf '\n]}\n'
        return 0
    fi
    echo "lab $LAB: $ENCAP port $PORT vni $VNI, source $SOURCE, state $STATE"
    printf '%-6s %-7s %-20s %-15s %-15s %-18s %-7s %s\n' NODE KIND NETNS UNDERLAY POD_CIDR VTEP_MAC LISTED AGENT
    for n in $(all_nodes); do
        local a=-
        if [ "$(node_get "$n" KIND)" = ferry ]; then a=$(agent_pid "$n" && true || echo "not running"); fi
        printf '%-6s %-7s %-20s %-15s %-15s %-18s %-7s %s\n' "$n" "$(node_get "$n" KIND)" "$(node_ns "$n")" \
            "$(node_get "$n" UL_IP)" "$(node_get "$n" POD_CIDR)" "$(node_get "$n" VTEP_MAC)" \
            "$([ "$(node_get "$n" LISTED)" = 1 ] && echo yes || echo no)" "$a"
    done
    echo
    printf '%-10s %-6s %-24s %s\n' POD NODE NETNS IP
    for p in $(all_pods); do
        printf '%-10s %-6s %-24s %s\n' "$p" "$(pod_node "$p")" "$(node_ns "$p")" "$(pod_get "$p" IP)"
    done
}

# ferry_each SUBCOMMAND: `ferry SUBCOMMAND --socket` for every ferry node.
ferry_each() {
    local n rc=0
    for n in $(nodes_of_kind ferry); do
        echo "--- $n ($(node_ns "$n")): ferry $1"
        ip netns exec "$(node_ns "$n")" "$FERRY" "$1" --socket "$(node_dir "$n")/ferry.sock" || rc=1
    done
    return $rc
}

resolve_netns() {
    local t=$1
    case "$t" in
        ul) ul_ns ;;
        *-p*) pod_get "$t" NS ;;
        *) node_get "$t" NS ;;
    esac
}

cmd_add_node() {
    local kind=$1 i name
    if [ "$kind" = kernel ] && [ "$ENCAP" != vxlan ]; then die "kernel nodes need a VXLAN lab (this lab: $ENCAP)"; fi
    if [ "$kind" = ferry ]; then [ -x "$FERRY" ] || die "no ferry binary at $FERRY"; fi
    i=$(next_free_index)
    if [ "$kind" = ferry ]; then name=n$i; else name=k$i; fi
    node_bring_up "$name" "$kind" "$i" "$PODS" >&2
    echo "$name"
}

cmd_add_pod() {
    local node=$1 j=1
    node_get "$node" NAME >/dev/null
    while [ -f "$(node_dir "$node")/pods/$node-p$j.env" ]; do j=$((j + 1)); done
    pod_add "$node" "$j" >&2
    echo "$node-p$j"
}

# An endpoint's address: a pod's IP, a node's underlay IP.
target_ip() {
    case "$1" in
        *-p*) pod_get "$1" IP ;;
        *) node_get "$1" UL_IP ;;
    esac
}

cmd_reach() {
    local from to ip deadline start
    from=$(resolve_netns "$1")
    ip=$(target_ip "$2")
    start=$(date +%s.%N)
    deadline=$(($(date +%s) + $3))
    while true; do
        if ip netns exec "$from" ping -n -q -c 1 -W 1 "$ip" >/dev/null 2>&1; then
            echo "$1 -> $2 ($ip): reachable after $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
            return 0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "$1 -> $2 ($ip): unreachable (waited $3 s)"
            return 1
        fi
        sleep 0.2
    done
}

demo() {
    need_root
    step "packages"
    ensure_packages
    build_binaries
    BUILD=0
    if [ -e "$STATE" ] || [ -n "$(lab_netns)" ]; then
        step "removing the previous lab $LAB"
        cmd_down
    fi
    cmd_up
    step "connectivity check"
    local ok=1
    check_run "" || ok=0
    step "ferry stats of every node"
    ferry_each stats || true
    local n1 p1 p2 ferries pods
    mapfile -t ferries < <(nodes_of_kind ferry)
    mapfile -t pods < <(all_pods)
    n1=${ferries[0]:-n1}
    p1=${pods[0]}
    p2=${pods[${#pods[@]} - 1]}
    cat <<EOF

==> the lab $LAB stays up. Go on with:
  sudo $0 list                                     nodes, pods, addresses
  sudo $0 exec $p1 ping $(pod_get "$p2" IP)       ($p1 -> $p2; same as: sudo ip netns exec $(node_ns "$p1") ping ...)
  sudo ip netns exec $(node_ns "$n1") $FERRY status --socket $(node_dir "$n1")/ferry.sock
  sudo $0 status | stats | check
  tear down: sudo $0 down$([ "$LAB" = ferrylab ] || echo " --name $LAB")
EOF
    [ "$ok" = 1 ] || die "the connectivity check failed (table above)"
}

# --- arguments ------------------------------------------------------------------------------------------------
main() {
    local cmd="" args=() json="" list_json=0 kind=ferry
    while [ $# -gt 0 ]; do
        case "$1" in
            --name) LAB=${2:?--name needs a value}; shift 2 ;;
            --nodes) NODES=${2:?}; shift 2 ;;
            --pods-per-node | --pods) PODS=${2:?}; PODS_ARG=$2; shift 2 ;;
            --wait) WAIT=${2:?}; shift 2 ;;
            --encap) ENCAP=${2:?}; shift 2 ;;
            --source) SOURCE=${2:?}; shift 2 ;;
            --ip-family) IP_FAMILY=${2:?}; shift 2 ;;
            --underlay) UNDERLAY=${2:?}; shift 2 ;;
            --kernel-nodes) KNODES=${2:?}; shift 2 ;;
            --port) PORT=${2:?}; shift 2 ;;
            --uplink-port) UPLINK_PORT=${2:?}; shift 2 ;;
            --pod-port) POD_PORT=${2:?}; shift 2 ;;
            --offload) OFFLOAD=${2:?}; shift 2 ;;
            --services) SERVICES=${2:?}; shift 2 ;;
            --no-build) BUILD=0; shift ;;
            --kernel) kind=kernel; shift ;;
            --json)
                if [ "$cmd" = list ]; then list_json=1; shift; else json=${2:?--json needs a file}; shift 2; fi ;;
            -h | --help) usage; exit 0 ;;
            -*) die "unknown option $1 (see: $0 --help)" ;;
            *)
                if [ -z "$cmd" ]; then cmd=$1; shift; continue; fi
                args+=("$1"); shift
                # exec: everything after the target is the command, its options included.
                if [ "$cmd" = exec ]; then args+=("$@"); break; fi ;;
        esac
    done
    cmd=${cmd:-demo}
    check_name
    case "$cmd" in help | -h | --help) usage; exit 0 ;; esac
    need_root "$cmd"
    mkdir -p /run/ferry-lab
    case "$cmd" in
        demo) demo ;;
        up) cmd_up ;;
        down) cmd_down ;;
        *)
            load_settings
            [ -z "$PODS_ARG" ] || PODS=$PODS_ARG
            case "$cmd" in
                check) check_run "$json" ;;
                list) cmd_list "$list_json" ;;
                stats | status) ferry_each "$cmd" ;;
                exec)
                    [ ${#args[@]} -ge 2 ] || die "usage: $0 exec NODE|POD|ul CMD..."
                    local ns
                    ns=$(resolve_netns "${args[0]}")
                    exec ip netns exec "$ns" "${args[@]:1}" ;;
                kill-agent)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 kill-agent NODE"
                    agent_pid "${args[0]}" >/dev/null || die "the agent of ${args[0]} is not running"
                    agent_stop "${args[0]}" KILL ;;
                start-agent)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 start-agent NODE"
                    agent_start "${args[0]}" ;;
                add-node) cmd_add_node "$kind" ;;
                remove-node)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 remove-node NODE"
                    node_get "${args[0]}" NAME >/dev/null
                    source_node_removed "${args[0]}"
                    node_delete "${args[0]}" ;;
                source-remove)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 source-remove NODE"
                    if [ "$SOURCE" = etcd ] && agent_pid "${args[0]}" >/dev/null; then
                        die "with --source etcd a running agent re-takes its own lease at once (as flanneld does); stop it first (kill-agent ${args[0]}) or use remove-node"
                    fi
                    source_node_removed "${args[0]}" ;;
                source-add)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 source-add NODE"
                    source_node_added "${args[0]}" ;;
                add-pod)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 add-pod NODE"
                    cmd_add_pod "${args[0]}" ;;
                del-pod)
                    [ ${#args[@]} -eq 1 ] || die "usage: $0 del-pod POD"
                    pod_get "${args[0]}" POD >/dev/null
                    pod_del "${args[0]}" ;;
                reach)
                    [ ${#args[@]} -eq 2 ] || die "usage: $0 reach FROM TO [--wait SECONDS]"
                    cmd_reach "${args[0]}" "${args[1]}" "$WAIT" ;;
                *) die "unknown command '$cmd' (see: $0 --help)" ;;
            esac
            ;;
    esac
}

main "$@"

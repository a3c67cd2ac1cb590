# shellcheck shell=bash
# scripts/bench.sh's topology: namespaces it creates and always removes. Source it after bench.sh has set
# BN (name prefix), BSTATE (state dir), FERRY, FERRY_CNI, CNI_DIR; it defines functions only.
#
#   $BN-pod1 eth0 10.244.1.2 ──veth── $BN-n1 (ferry or kernel node) <BN>-ul 192.168.100.1
#                                         │ veth uplink
#   $BN-pod2 eth0 10.244.2.2 ──veth── $BN-n2 <BN>-ul 192.168.100.2: a bare sink/generator ("sink" role) or a
#                                     second node of the same kind ("node" role, the 2-node path)
#
# Both kinds get the same addresses, MTUs and CPU steering. Kernel nodes are what flanneld sets up: a vxlan
# device flannel.1 (VNI, dstport 4789, nolearning, its own MAC) with permanent neighbour/FDB entries and an
# onlink route per remote node, pods on Flannel's cni0 bridge (CNI bridge plugin + host-local). ferry nodes
# run `ferry run` with a static route file, pods wired by ferry-cni.

B_UL=192.168.100
B_VNI=1
B_PORT=4789
B_POD_MTU=1450               # underlay 1500 - 50 bytes of VXLAN over IPv4 (Flannel's and ferry's)
B_GW_MAC=02:fe:ff:ff:ff:ff   # ferry's gateway MAC (the agent's default)
B_ULIF=${BN}-ul              # the uplinks (a name of our own, so that NAPI threads can be told apart)

bns() { echo "$BN-$1"; }

b_hex() {
    local IFS=.
    # shellcheck disable=SC2086 # split the address on its dots
    set -- $1
    printf '%02x:%02x:%02x:%02x' "$1" "$2" "$3" "$4"
}
# VTEP MACs: ferry's default 02:fe:<IPv4>; kernel nodes their own fixed one.
b_vtep_mac() {
    if [ "$1" = ferry ]; then echo "02:fe:$(b_hex "$B_UL.$2")"; else echo "02:fa:$(b_hex "$B_UL.$2")"; fi
}

# Removes every namespace of this bench (and what runs in them). Safe to call at any time, twice.
net_down() {
    local n pids pid
    for n in n1 n2; do
        pid=$(cat "$BSTATE/$n/agent.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        fi
        rm -f "$BSTATE/$n/agent.pid"
    done
    for n in pod1 pod2 n1 n2; do
        ip netns list 2>/dev/null | grep -qx "$(bns $n)\( (id: [0-9]*)\)\?" || continue
        pids=$(ip netns pids "$(bns $n)" 2>/dev/null || true)
        # shellcheck disable=SC2086 # only processes inside our own namespaces
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    done
    for n in pod1 pod2 n1 n2; do
        ip netns del "$(bns $n)" 2>/dev/null || true
    done
    rm -rf "${BSTATE:?}/n1" "${BSTATE:?}/n2"
}

b_mkns() {
    local ns
    ns=$(bns "$1")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Before any link exists, so that every interface inherits rp_filter 0.
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
        net.ipv4.conf.default.rp_filter=0 net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

# b_steer KIND NS: receive steering of every veth in a node namespace onto the forwarding CPU. RPS moves the
# kernel's receive work (backlog: IP forwarding, VXLAN, bridge) to CPU $FWD_CPU; without it veth runs the
# peer's receive softirq on the sending CPU (the generator's). ferry's programs in generic mode (--napi rps) run
# in that same backlog, so RPS steers them too. Native XDP runs in the veth's NAPI instead, before RPS:
# --napi forwarder makes that NAPI threaded, pinned to $FWD_CPU. (Not on kernel nodes: their veths have no NAPI,
# and threaded GRO cells on the vxlan device were seen to stop draining after an overload.)
b_steer() {
    local kind=$1 ns=$2 mask d
    mask=$(printf '%x' $((1 << FWD_CPU)))
    for d in $(ip netns exec "$ns" ls /sys/class/net); do
        [ "$d" = lo ] && continue
        for q in $(ip netns exec "$ns" sh -c "ls -d /sys/class/net/$d/queues/rx-* 2>/dev/null"); do
            ip netns exec "$ns" sh -c "echo $mask > $q/rps_cpus" 2>/dev/null || true
        done
        if [ "$STEER_NAPI" = 1 ] && [ "$kind" = ferry ]; then
            ip netns exec "$ns" sh -c "echo 1 > /sys/class/net/$d/threaded" 2>/dev/null || true
        fi
    done
}

# b_pin_napi NS...: pins the threaded-NAPI kthread (napi/<dev>-<id>) of every device in these namespaces to
# the forwarding CPU, at real-time priority like the softirq it replaces. Device names here are our own (the uplink) or derived from our container ids.
b_pin_napi() {
    [ "$STEER_NAPI" = 1 ] || return 0
    local ns d pid comm devs=" " pinned=0
    for ns in "$@"; do
        for d in $(ip netns exec "$ns" ls /sys/class/net); do [ "$d" = lo ] || devs+="$d "; done
    done
    # ps gives a kthread's whole name, in brackets (/proc/PID/comm cuts it at 15 characters).
    while read -r pid comm; do
        comm=${comm#napi/}
        case "$devs" in *" ${comm%-*} "*)
            taskset -pc "$FWD_CPU" "$pid" >/dev/null
            # Softirq work (the kernel's RPS backlog) preempts any task on its CPU; a NAPI thread is an ordinary
            # task unless told otherwise, and its 256-frame veth ring overflows while it waits behind others.
            chrt -f -p 50 "$pid"
            pinned=$((pinned + 1)) ;;
        esac
    done < <(ps -eo pid=,args= | tr -d '[]' | awk '$2 ~ /^napi\// {print $1, $2}')
    # Only namespaces with XDP programs (ferry's) have NAPI threads to pin.
    ip -n "$1" link show | grep -q ' xdp' || return 0
    [ "$pinned" -gt 0 ] || { echo "bench: no NAPI thread of ${*} found to pin to CPU $FWD_CPU" >&2; return 1; }
}

# The uplink: n1's <BN>-ul <-> n2's <BN>-ul.
b_uplink() {
    ip link add "$B_ULIF" netns "$(bns n1)" type veth peer name "$B_ULIF" netns "$(bns n2)"
    ip -n "$(bns n1)" addr add "$B_UL.1/24" dev "$B_ULIF"
    ip -n "$(bns n2)" addr add "$B_UL.2/24" dev "$B_ULIF"
    ip -n "$(bns n1)" link set "$B_ULIF" up
    ip -n "$(bns n2)" link set "$B_ULIF" up
}

# The static route file for ferry nodes. $1: kind of n2 (ferry, or "sink": a VTEP that only counts).
b_static_file() {
    cat <<EOF
cluster_cidrs = ["10.244.0.0/16"]
[[node]]
name = "n1"
pod_cidrs = ["10.244.1.0/24"]
underlay = "$B_UL.1"
[[node]]
name = "n2"
pod_cidrs = ["10.244.2.0/24"]
underlay = "$B_UL.2"
EOF
}

b_ferry_config() {
    local n=$1 idx=$2 dir=$BSTATE/$1
    cat <<EOF
# generated by scripts/bench.sh
node_name = "$n"
[underlay]
interface = "$B_ULIF"
address = "$B_UL.$idx"
[tunnel]
kind = "vxlan"
vni = $B_VNI
port = $B_PORT
[pods]
cluster_cidrs = ["10.244.0.0/16"]
pod_cidrs = ["10.244.$idx.0/24"]
[host]
interface = ""
[dataplane]
workers = 1
cores = [$FWD_CPU]
poll = "$POLL"
xdp_mode = "$XDP_MODE"
uplink_port = "${UPLINK_PORT:-afxdp}"
pod_port = "${POD_PORT:-veth}"
offload = "${OFFLOAD:-off}"
flows = ${FLOWS:-true}
[admin]
socket = "$dir/ferry.sock"
state_dir = "$dir/state"
[control]
static_file = "$BSTATE/nodes.toml"
metrics_addr = "127.0.0.1:9100"
EOF
}

# b_ferry_node N IDX: starts the agent in node N's namespace and waits for its admin socket.
b_ferry_node() {
    local n=$1 idx=$2 dir=$BSTATE/$1 ns
    ns=$(bns "$n")
    mkdir -p "$dir/state"
    b_static_file >"$BSTATE/nodes.toml"
    b_ferry_config "$n" "$idx" >"$dir/config.toml"
    start_ferry_agent "$FERRY" "$ns" "$dir" "bench: the ferry agent of $n"
    # The whole agent on the forwarding CPU: its worker is pinned there by `cores`, and its other threads
    # (the offload sweep, flow export, health, neighbours, admin) are ferry's forwarding budget too, as RPS
    # puts the kernel's forwarding there. Left unpinned they woke on the generator's CPU.
    taskset -a -p -c "$FWD_CPU" "$(cat "$dir/agent.pid")" >/dev/null
}

# b_kernel_node N IDX REMOTE_IDX REMOTE_MAC: flannel.1 with the entries flanneld would write for the remote.
b_kernel_node() {
    local n=$1 idx=$2 ridx=$3 rmac=$4 ns
    ns=$(bns "$n")
    mkdir -p "$BSTATE/$n"
    ip -n "$ns" link add flannel.1 address "$(b_vtep_mac kernel "$idx")" type vxlan id $B_VNI \
        local "$B_UL.$idx" dev "$B_ULIF" dstport $B_PORT nolearning
    ip -n "$ns" link set flannel.1 mtu $B_POD_MTU
    ip -n "$ns" addr add "10.244.$idx.0/32" dev flannel.1
    ip -n "$ns" link set flannel.1 up
    ip -n "$ns" neigh replace "10.244.$ridx.0" lladdr "$rmac" dev flannel.1 nud permanent
    ip netns exec "$ns" bridge fdb replace "$rmac" dev flannel.1 dst "$B_UL.$ridx" self permanent
    ip -n "$ns" route replace "10.244.$ridx.0/24" via "10.244.$ridx.0" dev flannel.1 onlink
}

# b_pod KIND NODE POD IDX: a pod wired by the node's CNI plugin, as a runtime would (in the node's netns).
b_pod() {
    local kind=$1 node=$2 pod=$3 idx=$4 conf plugin out
    b_mkns "$pod"
    if [ "$kind" = ferry ]; then
        plugin=$FERRY_CNI
        conf=$(printf '{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni","adminSocket":"%s"}' \
            "$BSTATE/$node/ferry.sock")
    else
        plugin=$CNI_DIR/bridge
        conf=$(printf '{"cniVersion":"1.0.0","name":"%s-cbr0","type":"bridge","bridge":"cni0","mtu":%d,' "$BN" $B_POD_MTU)
        conf+='"isGateway":true,"isDefaultGateway":true,"ipMasq":false,"hairpinMode":true,'
        conf+=$(printf '"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.%d.0/24"}]],"dataDir":"%s"}}' \
            "$idx" "$BSTATE/$node/ipam")
    fi
    if ! out=$(ip netns exec "$(bns "$node")" env CNI_COMMAND=ADD CNI_CONTAINERID="$BN-$pod" \
        CNI_NETNS="/var/run/netns/$(bns "$pod")" CNI_IFNAME=eth0 CNI_PATH="$CNI_DIR" "$plugin" <<<"$conf" 2>&1); then
        echo "bench: CNI ADD of $pod on $node ($kind) failed: $out" >&2
        return 1
    fi
    local ip
    ip=$(ip -n "$(bns "$pod")" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]; exit}')
    [ "$ip" = "10.244.$idx.2" ] || { echo "bench: $pod got address '$ip', expected 10.244.$idx.2" >&2; return 1; }
}

# MAC of an interface in one of our namespaces.
b_mac() { ip netns exec "$(bns "$1")" cat "/sys/class/net/$2/address"; }

# The pod's gateway MAC (what the pod's frames are addressed to): ferry's gateway MAC, or cni0's.
b_gw_mac() {
    if [ "$1" = ferry ]; then echo "$B_GW_MAC"; else b_mac "$2" cni0; fi
}

# net_up KIND ROLE: the whole topology. ROLE sink: n2 is a bare namespace that generates and counts;
# ROLE node: n2 is a second node of the same KIND with pod2 (the 2-node path).
net_up() {
    local kind=$1 role=$2 pmac
    net_down
    mkdir -p "$BSTATE"
    b_mkns n1
    b_mkns n2
    b_uplink
    if [ "$kind" = ferry ]; then
        b_ferry_node n1 1
        [ "$role" = node ] && b_ferry_node n2 2
    else
        b_kernel_node n1 1 2 "$(b_vtep_mac kernel 2)"
        [ "$role" = node ] && b_kernel_node n2 2 1 "$(b_vtep_mac kernel 1)"
    fi
    b_pod "$kind" n1 pod1 1
    [ "$role" = node ] && b_pod "$kind" n2 pod2 2
    # The sinks attach a catch-all XDP program that also takes ARP: permanent neighbour entries instead.
    pmac=$(b_mac pod1 eth0)
    if [ "$kind" = kernel ]; then
        ip -n "$(bns n1)" neigh replace 10.244.1.2 lladdr "$pmac" dev cni0 nud permanent
        if [ "$role" = node ]; then
            ip -n "$(bns n2)" neigh replace 10.244.2.2 lladdr "$(b_mac pod2 eth0)" dev cni0 nud permanent
        fi
    fi
    ip -n "$(bns n1)" neigh replace "$B_UL.2" lladdr "$(b_mac n2 "$B_ULIF")" dev "$B_ULIF" nud permanent
    ip -n "$(bns n2)" neigh replace "$B_UL.1" lladdr "$(b_mac n1 "$B_ULIF")" dev "$B_ULIF" nud permanent
    b_steer "$kind" "$(bns n1)"
    if [ "$role" = node ]; then
        b_steer "$kind" "$(bns n2)"
        b_pin_napi "$(bns n1)" "$(bns n2)"
    else
        b_pin_napi "$(bns n1)"
    fi
}

# shellcheck shell=bash
# The lab's topology (scripts/lab.sh): underlay, node namespaces, ferry agents, kernel-VXLAN nodes, pods.
# Source it after lab.sh has set LAB, STATE and the lab settings; it defines functions only.
#
# Layout (all names start with the lab name, so labs with different names coexist):
#   <lab>-ul              underlay namespace: bridge br0 192.168.100.254/24 (etcd / apiserver listen here)
#   <lab>-<node>          a node: uplink ul0 192.168.100.<i>/24 (veth, peer <node> on br0)
#   <lab>-<node>-p<j>     a pod of that node, wired by ferry-cni (ferry nodes) or bridge+host-local (kernel nodes)
# ferry nodes are n<i>, kernel-VXLAN (Flannel-style) nodes k<i>; <i> is the node's index for addresses:
# underlay 192.168.100.<i>, pod CIDR 10.244.<i>.0/24 (and fd00:10:244:<i>::/64 with --ip-family dual).
# State: $STATE/nodes/<node>/node.env (settings), config.toml, agent.log, agent.pid, ferry.sock, state/,
#        $STATE/nodes/<node>/pods/<pod>.env, $STATE/nodes.toml (the static route file).

UL_PREFIX=192.168.100
UL_GW=$UL_PREFIX.254
UL6_PREFIX=fd00:100:   # --underlay ipv6: the bridge fd00:100::fe/64, node i fd00:100::<i in hex>
UL6_GW=$UL6_PREFIX:fe
CLUSTER_CIDR=10.244.0.0/16
CLUSTER_CIDR6=fd00:10:244::/48   # --ip-family dual: pod CIDR fd00:10:244:<i>::/64
SERVICE_CIDR=10.96.0.0/16        # ClusterIPs (the kube source's apiserver allocates from it too)
POD_MTU_KERNEL=1450   # Flannel's: underlay 1500 - 50 bytes of VXLAN over IPv4
POD_MTU_KERNEL6=1430  # over an IPv6 underlay: 70 bytes
# The pods' MTU on kernel-VXLAN nodes, by the lab's underlay family.
kernel_pod_mtu() { if [ "${UNDERLAY:-ipv4}" = ipv6 ]; then echo $POD_MTU_KERNEL6; else echo $POD_MTU_KERNEL; fi; }

ul_ns() { echo "$LAB-ul"; }
node_ns() { echo "$LAB-$1"; }
node_dir() { echo "$STATE/nodes/$1"; }

# node_get NODE KEY: a value from the node's node.env.
node_get() {
    local f
    f="$(node_dir "$1")/node.env"
    [ -f "$f" ] || die "no node $1 in lab $LAB (see: $0 list)"
    # shellcheck disable=SC1090
    (. "$f" && printf '%s\n' "${!2}")
}

# node_set NODE KEY VALUE: change one value in node.env.
node_set() {
    local f
    f="$(node_dir "$1")/node.env"
    sed -i "/^$2=/d" "$f"
    printf '%s=%q\n' "$2" "$3" >>"$f"
}

all_nodes() {
    local d
    [ -d "$STATE/nodes" ] || return 0
    for d in "$STATE"/nodes/*/node.env; do
        [ -f "$d" ] || continue
        basename "$(dirname "$d")"
    done | sort -V
}
nodes_of_kind() {
    local n
    for n in $(all_nodes); do
        [ "$(node_get "$n" KIND)" = "$1" ] && echo "$n"
    done
    return 0
}
# Nodes currently announced in the route source (source-remove takes a node out without deleting it).
listed_nodes() {
    local n
    for n in $(all_nodes); do
        [ "$(node_get "$n" LISTED)" = 1 ] && echo "$n"
    done
    return 0
}
all_pods() {
    local n f
    for n in $(all_nodes); do
        for f in "$(node_dir "$n")"/pods/*.env; do
            [ -f "$f" ] && basename "$f" .env
        done
    done | sort -V
    return 0
}
pod_node() { echo "${1%-p*}"; }
pod_get() {
    local f
    f="$(node_dir "$(pod_node "$1")")/pods/$1.env"
    [ -f "$f" ] || die "no pod $1 in lab $LAB (see: $0 list)"
    # shellcheck disable=SC1090
    (. "$f" && printf '%s\n' "${!2}")
}

ip_hex() {
    local IFS=.
    # shellcheck disable=SC2086 # split the address on its dots
    set -- $1
    printf '%02x:%02x:%02x:%02x' "$1" "$2" "$3" "$4"
}
# ferry's default VTEP MAC: 02:fe:<IPv4 bytes>. Kernel nodes get their own, fixed, distinct MAC.
ferry_vtep_mac() { echo "02:fe:$(ip_hex "$1")"; }
kernel_vtep_mac() { echo "02:fa:$(ip_hex "$1")"; }

next_free_index() {
    local i n used=" "
    for n in $(all_nodes); do used+="$(node_get "$n" IDX) "; done
    for ((i = 1; i <= 250; i++)); do
        case "$used" in *" $i "*) ;; *) echo "$i"; return 0 ;; esac
    done
    die "no free node index left (250 nodes)"
}

# --- underlay ---------------------------------------------------------------------------------------------
underlay_up() {
    local ul
    ul=$(ul_ns)
    ip netns add "$ul"
    ip -n "$ul" link set lo up
    ip -n "$ul" link add br0 type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0
    underlay_plain_switch
    ip -n "$ul" addr add "$UL_GW/24" dev br0
    [ "${UNDERLAY:-ipv4}" = ipv4 ] || ip -n "$ul" addr add "$UL6_GW/64" dev br0 nodad
    ip -n "$ul" link set br0 up
}

# The underlay bridge must be a plain switch. With br_netfilter loaded on the host (Docker, Kubernetes
# nodes), each new namespace starts with net.bridge.bridge-nf-call-{iptables,ip6tables,arptables}=1:
# the bridge then runs its frames through the IP stack's checks (dropping bad IPv4 headers) and
# fragments oversize ones before any node sees them, hiding ferry's own handling of such frames.
# Without br_netfilter the keys do not exist and the bridge is plain already.
UL_BRIDGE_NF_KEYS="bridge-nf-call-iptables bridge-nf-call-ip6tables bridge-nf-call-arptables"
underlay_plain_switch() {
    local ul k
    ul=$(ul_ns)
    for k in $UL_BRIDGE_NF_KEYS; do
        if ip netns exec "$ul" test -e "/proc/sys/net/bridge/$k"; then
            ip netns exec "$ul" sysctl -qw "net.bridge.$k=0"
        fi
    done
    underlay_check_plain || die "could not turn bridge netfilter off in the underlay namespace $ul"
}

# underlay_check_plain: true when no bridge-nf-call-* key is on in the underlay namespace (and says which is).
underlay_check_plain() {
    local ul k v ok=0
    ul=$(ul_ns)
    for k in $UL_BRIDGE_NF_KEYS; do
        v=$(ip netns exec "$ul" cat "/proc/sys/net/bridge/$k" 2>/dev/null || echo 0)
        if [ "$v" != 0 ]; then
            echo "underlay $ul: net.bridge.$k=$v (the underlay bridge is not a plain switch)" >&2
            ok=1
        fi
    done
    return $ok
}

# --- nodes ------------------------------------------------------------------------------------------------
# node_create NAME KIND IDX: namespace, sysctls, uplink; records node.env. Listed in the source by default.
node_create() {
    local name=$1 kind=$2 idx=$3 ns ul dir ulip ulip6="" tunip tunip6="" mac
    ns=$(node_ns "$name")
    ul=$(ul_ns)
    dir=$(node_dir "$name")
    ulip=$UL_PREFIX.$idx
    tunip=$ulip
    if [ "${UNDERLAY:-ipv4}" = ipv6 ]; then ulip6=$UL6_PREFIX:$(printf '%x' "$idx"); tunip=$ulip6; fi
    # --underlay dual: every node has both addresses and announces both (tunnels accepted on both,
    # each peer reached over IPv4 when both ends have it), but the last of the first ferry nodes
    # announces only its IPv6 one, so that the others reach it over IPv6.
    if [ "${UNDERLAY:-ipv4}" = dual ]; then
        ulip6=$UL6_PREFIX:$(printf '%x' "$idx")
        if [ "$idx" = "${NODES:-0}" ]; then tunip=$ulip6; else tunip6=$ulip6; fi
    fi
    if [ "$kind" = kernel ]; then mac=$(kernel_vtep_mac "$ulip"); else mac=$(ferry_vtep_mac "$ulip"); fi
    mkdir -p "$dir/pods" "$dir/state"
    {
        printf 'NAME=%q\nKIND=%q\nIDX=%q\nNS=%q\n' "$name" "$kind" "$idx" "$ns"
        printf 'UL_IP6=%q\nTUN_IP=%q\nTUN_IP6=%q\n' "$ulip6" "$tunip" "$tunip6"
        # --ip-family ipv6: no IPv4 pod CIDR at all (POD_CIDR and GW empty).
        if [ "${IP_FAMILY:-ipv4}" = ipv6 ]; then printf 'UL_IP=%q\nPOD_CIDR=\nGW=\nVTEP_MAC=%q\nLISTED=1\n' "$ulip" "$mac"
        else printf 'UL_IP=%q\nPOD_CIDR=%q\nGW=%q\nVTEP_MAC=%q\nLISTED=1\n' "$ulip" "10.244.$idx.0/24" "10.244.$idx.1" "$mac"; fi
        if [ "${IP_FAMILY:-ipv4}" != ipv4 ]; then printf 'POD_CIDR6=%q\n' "fd00:10:244:$idx::/64"; else printf 'POD_CIDR6=\n'; fi
    } >"$dir/node.env"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Before any link exists, so that every interface inherits rp_filter 0 from "default".
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
        net.ipv4.conf.default.rp_filter=0
    # An IPv6 underlay: the node's kernel forwards its pods' IPv6 to other nodes' underlay addresses.
    [ -z "$ulip6" ] || ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1
    ip -n "$ul" link add "$name" type veth peer name ul0 netns "$ns"
    ip -n "$ul" link set "$name" master br0 up
    ip -n "$ns" addr add "$ulip/24" dev ul0
    [ -z "$ulip6" ] || ip -n "$ns" addr add "$ulip6/64" dev ul0 nodad
    ip -n "$ns" link set ul0 up
}

node_delete() {
    local name=$1 ns
    ns=$(node_ns "$name")
    agent_stop "$name" 2>/dev/null || true
    kill_netns_procs "$ns"
    local p
    for p in $(all_pods); do
        [ "$(pod_node "$p")" = "$name" ] || continue
        kill_netns_procs "$(node_ns "$p")"
        ip netns del "$(node_ns "$p")" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
    ip -n "$(ul_ns)" link del "$name" 2>/dev/null || true
    rm -rf "$(node_dir "$name")"
}

# kill -9 every process still running inside a namespace (only the lab's namespaces are ever passed).
kill_netns_procs() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
}

# The cluster's and a node's pod CIDRs as TOML list items ("a", "b"): IPv4, plus IPv6 in a dual lab.
cluster_cidrs_toml() {
    case "${IP_FAMILY:-ipv4}" in
        dual) printf '"%s", "%s"' "$CLUSTER_CIDR" "$CLUSTER_CIDR6" ;;
        ipv6) printf '"%s"' "$CLUSTER_CIDR6" ;;
        *) printf '"%s"' "$CLUSTER_CIDR" ;;
    esac
}
node_cidrs_toml() {
    local six
    local four
    four=$(node_get "$1" POD_CIDR)
    six=$(node_get "$1" POD_CIDR6 2>/dev/null || true)
    [ -z "$four" ] || printf '"%s"' "$four"
    [ -z "$four" ] || [ -z "$six" ] || printf ', '
    [ -z "$six" ] || printf '"%s"' "$six"
}

# A node's announced underlay address(es) as a TOML value: "a", or ["a", "b"] for a node with both
# families (--underlay dual).
node_tun_toml() {
    local six
    six=$(node_get "$1" TUN_IP6 2>/dev/null || true)
    if [ -n "$six" ]; then printf '["%s", "%s"]' "$(node_get "$1" TUN_IP)" "$six"
    else printf '"%s"' "$(node_get "$1" TUN_IP)"; fi
}

# --- ferry agents -----------------------------------------------------------------------------------------
# The agents' web view (README "The web view"): every node on this port, on all its addresses, so a
# browser in a node's namespace reaches it on loopback and the nodes gather each other's views over
# the underlay with the lab's token.
WEB_PORT=9180

# The lab's web token file (created once per lab, root-only); prints its path.
web_token_file() {
    local f="$STATE/web-token"
    [ -s "$f" ] || (umask 077 && head -c 24 /dev/urandom | base64 >"$f")
    printf '%s' "$f"
}

ferry_config() {
    local name=$1 dir
    dir=$(node_dir "$name")
    cat <<EOF
# generated by scripts/lab.sh for lab $LAB
node_name = "$name"

[underlay]
interface = "ul0"
address = $(node_tun_toml "$name")

[tunnel]
kind = "$ENCAP"
vni = $VNI
port = $PORT
vtep_mac = "$(node_get "$name" VTEP_MAC)"

[pods]
cluster_cidrs = [$(cluster_cidrs_toml)]
service_cidrs = ["$SERVICE_CIDR"]
pod_cidrs = [$(node_cidrs_toml "$name")]

[host]
interface = "ferry0"

[dataplane]
workers = 1
uplink_port = "${UPLINK_PORT:-auto}"
pod_port = "${POD_PORT:-auto}"
offload = "${OFFLOAD:-auto}"
flows = true

[admin]
socket = "$dir/ferry.sock"
state_dir = "$dir/state"

[control]
$(source_agent_config "$name")

[uninstall]
daemonset = ""                  # no DaemonSet in the lab: never clean the node on stop

[web]
address = "$(if [ "${UNDERLAY:-ipv4}" != ipv4 ]; then echo "[::]"; else echo 0.0.0.0; fi):$WEB_PORT"
token_file = "$(web_token_file)"
EOF
}

agent_pid() {
    local f
    f="$(node_dir "$1")/agent.pid"
    [ -f "$f" ] || return 1
    local pid
    pid=$(cat "$f")
    alive "$pid" || return 1
    echo "$pid"
}

# agent_start NODE: starts `ferry run` in the node's namespace and waits until its admin socket answers.
agent_start() {
    local name=$1 dir ns pid
    dir=$(node_dir "$name")
    ns=$(node_ns "$name")
    [ "$(node_get "$name" KIND)" = ferry ] || die "$name is a kernel-VXLAN node: it has no agent"
    if pid=$(agent_pid "$name"); then die "the agent of $name already runs (pid $pid)"; fi
    # The agent runs the manifests' configuration (deploy/ferry.toml, the ConfigMap's) with the lab
    # node's own keys on top: what is deployed is what the lab tests.
    [ -f "$dir/base.toml" ] || cp "$REPO/deploy/ferry.toml" "$dir/base.toml"
    [ -f "$dir/config.toml" ] || ferry_config "$name" >"$dir/config.toml"
    rm -f "$dir/ferry.sock"
    start_ferry_agent "$FERRY" "$ns" "$dir" "the agent of $name"
}

# agent_converged NODE: the agent's table holds exactly the other listed nodes, every next hop resolved.
# With the etcd source the table names nodes by their Flannel lease (`10.244.2.0-24`).
agent_converged() {
    local name=$1 want r
    if [ "$SOURCE" = etcd ]; then
        want=$(for n in $(listed_nodes | grep -vx "$name"); do etcd_lease_key "$n" | sed 's|.*/subnets/||'; done |
            LC_ALL=C sort | tr '\n' ' ')
    else
        want=$(listed_nodes | grep -vx "$name" | LC_ALL=C sort | tr '\n' ' ')
    fi
    r=$(ip netns exec "$(node_ns "$name")" "$FERRY" routes --json --socket "$(node_dir "$name")/ferry.sock" 2>/dev/null |
        "$PY" -c 'import json, sys
d = json.load(sys.stdin)
names = sorted(r["node"] for r in d.get("remote", []))
ok = all(r.get("next_hop", {}).get("state") == "resolved" for r in d.get("remote", []))
print(" ".join(names) + " " if names else "", "resolved" if ok else "unresolved", sep="|")') || return 1
    [ "$r" = "$want|resolved" ]
}

# wait_converged [SECONDS]: until every running agent has converged (warns, does not fail, on timeout).
wait_converged() {
    local deadline n pending
    deadline=$(($(date +%s) + ${1:-15}))
    while true; do
        pending=""
        for n in $(nodes_of_kind ferry); do
            agent_pid "$n" >/dev/null || continue
            agent_converged "$n" || pending+=" $n"
        done
        [ -z "$pending" ] && return 0
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "warning: agents not converged after ${1:-15} s (missing routes or unresolved next hops):$pending" >&2
            return 0
        fi
        sleep 0.2
    done
}

# agent_stop NODE [SIGNAL]: signals the agent (default TERM) and waits up to 5 s for it to go.
agent_stop() {
    local name=$1 sig=${2:-TERM} pid i
    pid=$(agent_pid "$name") || { rm -f "$(node_dir "$name")/agent.pid"; return 0; }
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    # A killed agent's main thread turns zombie while its other threads still exit, and its sockets
    # (the metrics port among them) close only with the last: a restart at once could find the port
    # taken. Wait (bounded) until only the zombie leader is left.
    for ((i = 0; i < 50; i++)); do
        [ "$(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" -le 1 ] && break
        sleep 0.1
    done
    rm -f "$(node_dir "$name")/agent.pid"
}

# --- kernel-VXLAN nodes (what flanneld sets up) ------------------------------------------------------------
kernel_node_setup() {
    local name=$1 ns
    ns=$(node_ns "$name")
    ip -n "$ns" link add flannel.1 address "$(node_get "$name" VTEP_MAC)" type vxlan id "$VNI" \
        local "$(node_get "$name" TUN_IP)" dev ul0 dstport "$PORT" nolearning
    ip -n "$ns" link set flannel.1 mtu "$(kernel_pod_mtu)"
    ip -n "$ns" addr add "10.244.$(node_get "$name" IDX).0/32" dev flannel.1
    # Dual-stack pods: IPv6 over the same device (inner and outer families are independent), the
    # IPv6 pod CIDR's network address on it as Flannel puts it on its IPv6 vxlan device.
    if [ -n "$(node_get "$name" POD_CIDR6)" ]; then
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1
        ip -n "$ns" addr add "fd00:10:244:$(node_get "$name" IDX)::/128" dev flannel.1 nodad
    fi
    ip -n "$ns" link set flannel.1 up
}

# kernel_sync NODE: the vxlan device's neighbour, FDB and route entries for exactly the listed remote nodes
# (as flanneld keeps them in step with its subnet leases).
kernel_sync() {
    local name=$1 ns r idx ulip mac want=" "
    ns=$(node_ns "$name")
    for r in $(listed_nodes); do
        [ "$r" = "$name" ] && continue
        idx=$(node_get "$r" IDX)
        ulip=$(node_get "$r" TUN_IP)
        mac=$(node_get "$r" VTEP_MAC)
        want+="10.244.$idx.0 "
        ip -n "$ns" neigh replace "10.244.$idx.0" lladdr "$mac" dev flannel.1 nud permanent
        ip netns exec "$ns" bridge fdb replace "$mac" dev flannel.1 dst "$ulip" self permanent
        ip -n "$ns" route replace "10.244.$idx.0/24" via "10.244.$idx.0" dev flannel.1 onlink
        if [ -n "$(node_get "$name" POD_CIDR6)" ] && [ -n "$(node_get "$r" POD_CIDR6)" ]; then
            want+="fd00:10:244:$idx:: "
            ip -n "$ns" -6 neigh replace "fd00:10:244:$idx::" lladdr "$mac" dev flannel.1 nud permanent
            ip -n "$ns" -6 route replace "$(node_get "$r" POD_CIDR6)" via "fd00:10:244:$idx::" dev flannel.1 onlink
        fi
    done
    # Remove what belongs to nodes no longer listed.
    local dst via
    while read -r dst _ via _; do
        case "$want" in *" $via "*) ;; *) ip -n "$ns" route del "$dst" 2>/dev/null || true ;; esac
    done < <(ip -n "$ns" route show dev flannel.1 | awk '$2 == "via" {print $1, $2, $3}'
        ip -n "$ns" -6 route show dev flannel.1 | awk '$2 == "via" {print $1, $2, $3}')
    local nip nmac
    while read -r nip _ nmac _; do
        case "$want" in *" $nip "*) ;; *)
            ip -n "$ns" neigh del "$nip" dev flannel.1 2>/dev/null || true
            ip netns exec "$ns" bridge fdb del "$nmac" dev flannel.1 self 2>/dev/null || true ;;
        esac
    done < <(ip -n "$ns" -4 neigh show dev flannel.1 | awk '{print $1, $2, $3}'
        ip -n "$ns" -6 neigh show dev flannel.1 nud permanent | awk '{print $1, $2, $3}')
}

kernel_sync_all() {
    local k
    for k in $(nodes_of_kind kernel); do kernel_sync "$k"; done
}

# --- pods ---------------------------------------------------------------------------------------------------
ferry_netconf() {
    printf '{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni","adminSocket":"%s"}\n' \
        "$(node_dir "$1")/ferry.sock"
}
# The conf Flannel hands to the bridge plugin (cni0 as the pods' gateway, host-local IPAM).
bridge_netconf() {
    printf '{"cniVersion":"1.0.0","name":"%s","type":"bridge","bridge":"cni0","mtu":%d,"isGateway":true,' \
        "$LAB-cbr0" "$(kernel_pod_mtu)"
    printf '"isDefaultGateway":true,"ipMasq":false,"hairpinMode":true,'
    local six range6=""
    six=$(node_get "$1" POD_CIDR6 2>/dev/null || true)
    [ -z "$six" ] || range6=$(printf ',[{"subnet":"%s"}]' "$six")
    printf '"ipam":{"type":"host-local","ranges":[[{"subnet":"%s"}]%s],"dataDir":"%s"}}\n' \
        "$(node_get "$1" POD_CIDR)" "$range6" "$(node_dir "$1")/ipam"
}

# cni NODE POD COMMAND: runs the node's CNI plugin for the pod, in the node's namespace, as a runtime would.
cni() {
    local node=$1 pod=$2 cmd=$3 plugin conf
    if [ "$(node_get "$node" KIND)" = ferry ]; then
        plugin=$FERRY_CNI
        conf=$(ferry_netconf "$node")
    else
        plugin=$CNI_DIR/bridge
        conf=$(bridge_netconf "$node")
    fi
    ip netns exec "$(node_ns "$node")" env CNI_COMMAND="$cmd" CNI_CONTAINERID="$pod" \
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$pod" \
        CNI_NETNS="/var/run/netns/$(node_ns "$pod")" CNI_IFNAME=eth0 CNI_PATH="$CNI_DIR" "$plugin" <<<"$conf"
}

# pod_add NODE J: creates pod <node>-p<J> and wires it with the node's CNI plugin.
pod_add() {
    local node=$1 j=$2 pod ns dir out ip ip6
    pod="$node-p$j"
    ns=$(node_ns "$pod")
    dir=$(node_dir "$node")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! out=$(cni "$node" "$pod" ADD 2>&1); then
        echo "CNI ADD of pod $pod on $node failed: $out" >&2
        ip netns del "$ns" 2>/dev/null || true
        return 1
    fi
    printf '%s\n' "$out" >"$dir/pods/$pod.result.json"
    ip=$(ip -n "$ns" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]; exit}')
    if [ -n "$(node_get "$node" POD_CIDR)" ]; then
        [ -n "$ip" ] || { echo "pod $pod has no IPv4 address on eth0 after CNI ADD: $out" >&2; return 1; }
    else
        [ -z "$ip" ] || { echo "pod $pod has IPv4 address $ip in an IPv6-only lab: $out" >&2; return 1; }
    fi
    ip6=
    if [ -n "$(node_get "$node" POD_CIDR6 2>/dev/null || true)" ]; then
        ip6=$(ip -n "$ns" -6 -o addr show dev eth0 scope global | awk '{split($4, a, "/"); print a[1]; exit}')
        [ -n "$ip6" ] || { echo "pod $pod has no IPv6 address on eth0 after CNI ADD ($IP_FAMILY lab): $out" >&2; return 1; }
    fi
    printf 'POD=%q\nNODE=%q\nNS=%q\nIP=%q\nIP6=%q\n' "$pod" "$node" "$ns" "$ip" "$ip6" >"$dir/pods/$pod.env"
    # With the kube source, the Pod object too, as a scheduler and kubelet would (lab-source.sh).
    if [ "$SOURCE" = kube ]; then kube_put_pod "$pod"; fi
}

pod_del() {
    local pod=$1 node ns
    node=$(pod_node "$pod")
    ns=$(node_ns "$pod")
    cni "$node" "$pod" DEL >/dev/null 2>&1 || echo "warning: CNI DEL of $pod failed" >&2
    if [ "$SOURCE" = kube ]; then kube_del_pod "$pod"; fi
    kill_netns_procs "$ns"
    ip netns del "$ns" 2>/dev/null || true
    rm -f "$(node_dir "$node")/pods/$pod".*
}

# node_bring_up NAME KIND IDX PODS: a whole node (namespace, agent or vxlan device, pods).
node_bring_up() {
    local name=$1 kind=$2 idx=$3 pods=$4 j
    node_create "$name" "$kind" "$idx"
    if [ "$kind" = ferry ]; then
        source_node_added "$name"
        agent_start "$name"
    else
        kernel_node_setup "$name"
        source_node_added "$name"
    fi
    for ((j = 1; j <= pods; j++)); do pod_add "$name" "$j"; done
}

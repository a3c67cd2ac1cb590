# shellcheck shell=bash
# The lab's connectivity matrix (scripts/lab.sh check). Source it after lab-net.sh; functions only.
#
# Every pair is tested with ping (2 echoes, 0.2 s apart, 1 s wait) and a 1 MB TCP transfer through a
# one-shot python3 server (both ends bounded by `timeout`). Pairs run in parallel, CHECK_JOBS at a time.

CHECK_JOBS=${FERRY_LAB_CHECK_JOBS:-6}
CHECK_BYTES=1048576

# The one-shot TCP server and client (bounded in time on both sides); the end-to-end tests use it too.
CHECK_TCP=$REPO/scripts/lib/tcp-transfer.py

# check_pair ID FROM_NS TO_NS TO_IP OUTFILE: "ping_ok rtt_ms tcp_ok MB/s detail" into OUTFILE.
check_pair() {
    local id=$1 from=$2 to=$3 ip=$4 out=$5 port=$((20000 + $1)) p rtt="-" pok=fail tok=fail rate="-" detail="" srv
    if p=$(ip netns exec "$from" ping -n -q -c 2 -i 0.2 -W 1 "$ip" 2>&1); then
        pok=ok
        rtt=$(sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' <<<"$p")
    else
        detail="ping: $(grep -m1 -E 'received|unreachable|error' <<<"$p" || true)"
    fi
    timeout 10 ip netns exec "$to" "$PY" "$CHECK_TCP" serve "$port" 8 >"$CHECK_DIR/$id.srv" 2>&1 &
    srv=$!
    if rate=$(timeout 10 ip netns exec "$from" "$PY" "$CHECK_TCP" send "$ip" "$port" "$CHECK_BYTES" 3 6 2>&1); then
        tok=ok
    else
        detail="${detail:+$detail; }tcp: $(tail -n1 <<<"$rate")"
        rate="-"
        kill "$srv" 2>/dev/null || true
    fi
    wait "$srv" 2>/dev/null || true
    printf '%s %s %s %s %s\n' "$pok" "${rtt:--}" "$tok" "$rate" "$detail" >"$out"
}

# The matrix: "category from from_ns to to_ns to_ip" lines.
check_matrix() {
    local a b na nb
    local pods nodes
    pods=$(all_pods)
    nodes=$(all_nodes)
    for a in $pods; do
        na=$(pod_node "$a")
        for b in $pods; do
            [ "$a" = "$b" ] && continue
            nb=$(pod_node "$b")
            # IPv6-only pods (--ip-family ipv6) have no IPv4 row.
            if [ -z "$(pod_get "$b" IP)" ]; then :
            elif [ "$na" = "$nb" ]; then echo "pod-pod(same-node) $a $(node_ns "$a") $b $(node_ns "$b") $(pod_get "$b" IP)"
            else echo "pod-pod(cross-node) $a $(node_ns "$a") $b $(node_ns "$b") $(pod_get "$b" IP)"; fi
            # Dual stack: the same pair over IPv6 (pods only: the node's host port is IPv4).
            local ip6
            ip6=$(pod_get "$b" IP6 2>/dev/null || true)
            [ -z "$ip6" ] && continue
            if [ "$na" = "$nb" ]; then echo "pod-pod6(same-node) $a $(node_ns "$a") $b $(node_ns "$b") $ip6"
            else echo "pod-pod6(cross-node) $a $(node_ns "$a") $b $(node_ns "$b") $ip6"; fi
        done
    done
    for a in $nodes; do
        for b in $pods; do
            if [ -z "$(pod_get "$b" IP)" ]; then :
            elif [ "$(pod_node "$b")" = "$a" ]; then echo "node-pod(local) $a $(node_ns "$a") $b $(node_ns "$b") $(pod_get "$b" IP)"
            else echo "node-pod(remote) $a $(node_ns "$a") $b $(node_ns "$b") $(pod_get "$b" IP)"; fi
            # Dual stack: the node reaches the pod over IPv6 too (from its host port's IPv6 address).
            local ip6
            ip6=$(pod_get "$b" IP6 2>/dev/null || true)
            [ -z "$ip6" ] && continue
            if [ "$(pod_node "$b")" = "$a" ]; then echo "node-pod6(local) $a $(node_ns "$a") $b $(node_ns "$b") $ip6"
            else echo "node-pod6(remote) $a $(node_ns "$a") $b $(node_ns "$b") $ip6"; fi
        done
    done
    # Pods to nodes at the nodes' underlay addresses. A remote node that announces only an IPv6
    # underlay address (--underlay ipv6, the IPv6-only node of --underlay dual) is reached at it, from
    # pods that have IPv6: ferry accepts a tunnelled packet's inner source from a node only inside its
    # pod CIDRs or equal to one of its announced underlay addresses (README, "Dual stack").
    for a in $pods; do
        for b in $nodes; do
            # An IPv6-only pod reaches nodes only at IPv6 underlay addresses (none on an IPv4 underlay).
            if [ -z "$(pod_get "$a" IP)" ]; then
                [ -z "$(node_get "$b" UL_IP6)" ] && continue
                if [ "$(pod_node "$a")" = "$b" ]; then echo "pod-node6(own) $a $(node_ns "$a") $b $(node_ns "$b") $(node_get "$b" UL_IP6)"
                else echo "pod-node6(remote) $a $(node_ns "$a") $b $(node_ns "$b") $(node_get "$b" UL_IP6)"; fi
                continue
            fi
            if [ "$(pod_node "$a")" = "$b" ]; then echo "pod-node(own) $a $(node_ns "$a") $b $(node_ns "$b") $(node_get "$b" UL_IP)"
            elif [[ $(node_get "$b" TUN_IP) != *:* ]]; then echo "pod-node(remote) $a $(node_ns "$a") $b $(node_ns "$b") $(node_get "$b" UL_IP)"
            elif [ -n "$(pod_get "$a" IP6 2>/dev/null || true)" ]; then
                echo "pod-node6(remote) $a $(node_ns "$a") $b $(node_ns "$b") $(node_get "$b" UL_IP6)"
            fi
        done
    done
}

# check_run [JSON_FILE]: runs the matrix, prints the table; returns 1 on any failure.
check_run() {
    local json=${1:-} lines id=0 running=0 start
    start=$(date +%s.%N)
    CHECK_DIR=$(mktemp -d "$STATE/.check.XXXXXX")
    lines=$(check_matrix)
    [ -n "$lines" ] || die "the lab has no pods to check"
    underlay_check_plain || die "the underlay bridge filters frames (bridge netfilter on): run '$0 down' and '$0 up' again"
    local cat from fns to tns ip
    # In a subshell, whose only children are the check's jobs: in `lab.sh` with no arguments the
    # agents are background children of the main shell, and a bare `wait` there would wait for them.
    (
        while read -r cat from fns to tns ip; do
            id=$((id + 1))
            check_pair "$id" "$fns" "$tns" "$ip" "$CHECK_DIR/$id.res" &
            running=$((running + 1))
            if [ "$running" -ge "$CHECK_JOBS" ]; then wait -n || true; running=$((running - 1)); fi
        done <<<"$lines"
        wait || true
    )

    local fails=0 total=0 pok rtt tok rate detail jsep=""
    [ -z "$json" ] || echo "[" >"$json"
    printf '%-20s %-10s %-10s %-15s %-12s %-14s %s\n' CATEGORY FROM TO ADDRESS "PING(avg)" "TCP 1MB" DETAIL
    id=0
    while read -r cat from fns to tns ip; do
        id=$((id + 1))
        total=$((total + 1))
        if [ -s "$CHECK_DIR/$id.res" ]; then
            read -r pok rtt tok rate detail <"$CHECK_DIR/$id.res"
        else
            pok=fail rtt=- tok=fail rate=- detail="no result"
        fi
        [ "$pok" = ok ] && [ "$tok" = ok ] || fails=$((fails + 1))
        local ps ts
        if [ "$pok" = ok ]; then ps="ok ${rtt}ms"; else ps=FAIL; fi
        if [ "$tok" = ok ]; then ts="ok ${rate}MB/s"; else ts=FAIL; fi
        printf '%-20s %-10s %-10s %-15s %-12s %-14s %s\n' "$cat" "$from" "$to" "$ip" "$ps" "$ts" "$detail"
        if [ -n "$json" ]; then
            printf '%s{"category":"%s","from":"%s","to":"%s","address":"%s","ping":%s,"rtt_ms":%s,"tcp":%s,"tcp_MBps":%s,"detail":"%s"}\n' \
                "$jsep" "$cat" "$from" "$to" "$ip" "$([ "$pok" = ok ] && echo true || echo false)" \
                "$([ "$rtt" = - ] && echo null || echo "$rtt")" "$([ "$tok" = ok ] && echo true || echo false)" \
                "$([ "$rate" = - ] && echo null || echo "$rate")" "${detail//\"/\'}" >>"$json"
            jsep=","
        fi
    done <<<"$lines"
    local sfails=0 stotal=0
    local nfails=0 ntotal=0
    if [ -s "$STATE/services.txt" ]; then
        check_services "$json" "$jsep"
        check_node_ports
    fi
    [ -z "$json" ] || echo "]" >>"$json"
    rm -rf "$CHECK_DIR"
    printf '\n%d of %d pairs passed (ping + %d-byte TCP)' "$((total - fails))" "$total" "$CHECK_BYTES"
    [ "$stotal" -eq 0 ] || printf ', %d of %d service probes (pod -> VIP, TCP and UDP)' "$((stotal - sfails))" "$stotal"
    [ "$ntotal" -eq 0 ] || printf ', %d of %d from outside (NodePort, rejects)' "$((ntotal - nfails))" "$ntotal"
    printf ' in %s s\n' "$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')"
    [ "$fails" -eq 0 ] && [ "$sfails" -eq 0 ] && [ "$nfails" -eq 0 ]
}

# check_node_ports: from the underlay's namespace (a host outside the cluster on the underlay bridge), each
# ferry node's NodePorts over TCP and UDP: lab/svc-1 (externalTrafficPolicy Cluster) answered by one of its
# backends, lab/svc-2 (Local) by the node's own backend (a node without one drops it: not probed); and the
# reject case: lab/svc-empty refused from outside (its NodePort) and from a pod (its VIP). Either uplink: the
# AF_XDP uplink's XDP program or the UDP uplink's TC program hands these to ferry. Sets nfails and ntotal.
check_node_ports() {
    local n ip line name backends local_be p got
    echo
    : >"$CHECK_DIR/nodeports.txt"
    for n in $(nodes_of_kind ferry); do
        ip=$(node_get "$n" UL_IP)
        while read -r name _ _ backends; do
            case "$name" in
                lab/svc-1) echo "$name@$n $ip $((NP_BASE + 1)) $backends" ;;
                lab/svc-2)
                    local_be=""
                    for p in ${backends//,/ }; do [ "$(pod_node "$p")" = "$n" ] && local_be+="${local_be:+,}$p"; done
                    [ -z "$local_be" ] || echo "$name@$n $ip $((NP_BASE + 2)) $local_be"
                    ;;
            esac
        done <"$STATE/services.txt"
    done >"$CHECK_DIR/nodeports.txt"
    timeout 120 ip netns exec "$(ul_ns)" "$PY" "$SVC_PROBE" probe-all "$CHECK_DIR/nodeports.txt" >"$CHECK_DIR/nodeports.res" 2>&1
    printf '%-20s %-10s %s\n' CATEGORY FROM "NODEPORTS (TCP + UDP) AND REJECTS"
    while read -r name ip proto res got; do
        [ -n "$name" ] || continue
        ntotal=$((ntotal + 1))
        if [ "$res" = ok ]; then echo "  ok   outside -> $name $ip $proto: $got"; else
            echo "  FAIL outside -> $name $ip $proto: $got"
            nfails=$((nfails + 1))
        fi
    done <"$CHECK_DIR/nodeports.res"
    # The reject case, from outside and from a pod.
    for n in $(nodes_of_kind ferry); do
        ip=$(node_get "$n" UL_IP)
        got=$(timeout 30 ip netns exec "$(ul_ns)" "$PY" "$SVC_PROBE" connect "$ip" "$NP_BASE" 1)
        ntotal=$((ntotal + 1))
        if [ "$got" = refused ]; then echo "  ok   outside -> lab/svc-empty $ip:$NP_BASE tcp: refused"; else
            echo "  FAIL outside -> lab/svc-empty $ip:$NP_BASE tcp: $got (want refused)"
            nfails=$((nfails + 1))
        fi
    done
    p=$(ferry_pods | awk 'NR == 1')
    if [ -n "$p" ]; then
        got=$(timeout 30 ip netns exec "$(node_ns "$p")" "$PY" "$SVC_PROBE" connect "$SVC_EMPTY_VIP" "$SVC_PORT" 1)
        ntotal=$((ntotal + 1))
        if [ "$got" = refused ]; then echo "  ok   $p -> lab/svc-empty $SVC_EMPTY_VIP tcp: refused"; else
            echo "  FAIL $p -> lab/svc-empty $SVC_EMPTY_VIP tcp: $got (want refused)"
            nfails=$((nfails + 1))
        fi
    fi
}

# check_services JSON_FILE JSON_SEPARATOR: every ferry node's pod -> every Service VIP of
# $STATE/services.txt, one TCP connection and one UDP exchange each, answered by one of the service's
# backends (svc-probe.py probe-all; one process per client pod, CHECK_JOBS at a time). Sets sfails and
# stotal; prints a line per client and every failed probe.
check_services() {
    local json=$1 jsep=$2 p running=0 line name vip proto res got n ok
    (
        for p in $(ferry_pods); do
            timeout 120 ip netns exec "$(node_ns "$p")" "$PY" "$SVC_PROBE" probe-all "$STATE/services.txt" \
                >"$CHECK_DIR/svc-$p.res" 2>&1 &
            running=$((running + 1))
            if [ "$running" -ge "$CHECK_JOBS" ]; then wait -n || true; running=$((running - 1)); fi
        done
        wait || true
    )
    echo
    printf '%-20s %-10s %s\n' CATEGORY FROM "SERVICES (every VIP, TCP + UDP)"
    for p in $(ferry_pods); do
        n=0 ok=0
        while read -r name vip proto res got; do
            [ -n "$name" ] || continue
            n=$((n + 1))
            if [ "$res" = ok ]; then ok=$((ok + 1)); else echo "  FAIL $p -> $name $vip $proto: $got"; fi
            if [ -n "$json" ]; then
                printf '%s{"category":"pod-svc(%s)","from":"%s","to":"%s","address":"%s","ok":%s,"answer":"%s"}\n' \
                    "$jsep" "$proto" "$p" "$name" "$vip" "$([ "$res" = ok ] && echo true || echo false)" "${got//\"/\'}" >>"$json"
                jsep=","
            fi
        done <"$CHECK_DIR/svc-$p.res"
        printf '%-20s %-10s %d of %d answered by a backend\n' pod-svc "$p" "$ok" "$n"
        stotal=$((stotal + n))
        sfails=$((sfails + n - ok))
    done
}

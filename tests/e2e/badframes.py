#!/usr/bin/env python3
"""Malformed-frame bursts for ferry's end-to-end tests (tests/e2e.rs), sent with raw AF_PACKET sockets.

  badframes.py uplink IFACE DST_MAC DST_IP KNOWN_SRC PORT VNI INNER_DST COUNT
      from the underlay namespace, out of the bridge port toward a node (IFACE): tunnel frames to
      DST_IP:PORT, each class COUNT times: truncated VXLAN header, wrong VNI, unknown source node,
      IPv4 total length > frame, UDP length > IP payload.
  badframes.py pod IFACE GW_MAC SRC_IP DST_IP COUNT
      from inside a pod, out of its eth0 toward the gateway: IPv4 header shorter than its IHL,
      spoofed source address, IPv4 total length > frame.
  badframes.py refuse-uplink IFACE DST_MAC DST_IP KNOWN_SRC PORT VNI INNER_SRC INNER_DST NODE_IP COUNT
      frames a router must refuse (issue 18), from the underlay toward a node: another host's outer
      destination MAC, a wrong outer UDP checksum, a wrong outer IPv4 header checksum, an outer first
      fragment, inner TTL 0, inner multicast source MAC, an inner source that is not the sender's, an
      inner packet for the node's underlay address (NODE_IP), a truncated VXLAN header, a wrong VNI,
      an unknown source node. Inner packets are UDP to INNER_DST:9999 (NODE_IP:9999) with a
      "ferry-bad" payload; then one good frame ("ferry-good") to INNER_DST:9999.
  badframes.py refuse-pod IFACE GW_MAC SRC_IP DST_IP COUNT
      from inside a pod: another source MAC, a destination MAC that is not the gateway's, a wrong IPv4
      header checksum, an 802.1Q tag, a spoofed source, an IHL beyond the frame; UDP to DST_IP:9999
      with a "ferry-bad" payload.
  badframes.py uplink6 IFACE DST_MAC DST_IP6 KNOWN_SRC6 PORT VNI INNER_SRC6 INNER_DST6 COUNT
      over an IPv6 underlay, from the underlay namespace toward a node: a zero outer UDP checksum,
      an outer IPv6 payload length beyond the frame, an inner IPv6 packet whose extension header
      chain runs past its payload, an inner IPv6 payload length beyond the frame; then one good
      frame whose inner packet carries a hop-by-hop and a destination-options header ("ferry-good"
      to INNER_DST6:9999).
  badframes.py pod6 IFACE GW_MAC SRC_IP6 DST_IP6 COUNT
      from inside a dual-stack pod: an IPv6 payload length beyond the frame, an extension header
      chain that runs past the payload, a spoofed IPv6 source; then one good packet with a
      hop-by-hop and a destination-options header ("ferry-good" to DST_IP6:9999).
  badframes.py flood-uplink IFACE <as refuse-uplink, without COUNT> SECONDS RATE
  badframes.py flood-pod IFACE GW_MAC SRC_IP DST_IP SECONDS RATE
      the same classes round robin at about RATE frames per second for SECONDS (scripts/flood-bad.sh).
  badframes.py listen PORT SECONDS
      counts UDP datagrams on PORT ("ferry-bad" and "ferry-good" payloads) until a "ferry-end" one
      comes or SECONDS pass; prints "listening" first and "bad N good M" at the end.
  badframes.py end IP PORT
      sends "ferry-end" to IP:PORT (three times, 0.2 s apart: the listener stops at the first).

Prints one line per class: "<class> <frames sent>". Bounded: COUNT is capped at 10000.
"""
import socket
import struct
import sys
import time


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(src, dst, proto, payload, total=None, ihl=5, ttl=64, frag=0x4000, bad_csum=False):
    total = 20 + len(payload) if total is None else total
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    c = csum(h) ^ (0x5555 if bad_csum else 0)
    h = h[:10] + struct.pack("!H", c) + h[12:]
    return h + payload


def udp4_csum(src, dst, seg):
    """The UDP checksum of segment `seg` (its checksum field zero) from src to dst."""
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(seg))
    return csum(pseudo + seg) or 0xFFFF


def ipv6(src, dst, nh, payload, plen=None, hlim=64):
    plen = len(payload) if plen is None else plen
    return struct.pack("!IHBB16s16s", 0x60000000, plen, nh, hlim,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def udp6_csum(src, dst, seg):
    """The UDP checksum of segment `seg` (its checksum field zero) from src to dst over IPv6."""
    pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
              + struct.pack("!IxxxB", len(seg), 17))
    return csum(pseudo + seg) or 0xFFFF


def udp6(src, dst, sport, dport, payload, zero_csum=False):
    """A UDP segment over IPv6 with its checksum filled in (or left zero)."""
    seg = udp(sport, dport, payload)
    return seg if zero_csum else seg[:6] + struct.pack("!H", udp6_csum(src, dst, seg)) + seg[8:]


def opts6(nh, ext_len=0):
    """A hop-by-hop or destination-options header (8 bytes: PadN) before `nh`; `ext_len` above 0
    claims more 8-byte units than follow."""
    return struct.pack("!BBBB4x", nh, ext_len, 1, 4)


def ipv6_chain(src, dst, payload):
    """UDP to dst:9999 behind a hop-by-hop (0) and a destination-options (60) header."""
    return ipv6(src, dst, 0, opts6(60) + opts6(17) + udp6(src, dst, 1000, 9999, payload))


def udp(sport, dport, payload, length=None):
    length = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, length, 0) + payload


def eth(dst, src, payload, ethertype=0x0800):
    return dst + src + struct.pack("!H", ethertype) + payload


def vxlan(vni, inner):
    return struct.pack("!BBHI", 0x08, 0, 0, vni << 8) + inner


def burst(sock, name, frame, count):
    sent = 0
    for i in range(count):
        sock.send(frame)
        sent += 1
        if i % 32 == 31:
            time.sleep(0.002)  # let the receiver drain its ring: the test counts drops, not overruns
    print(name, sent, flush=True)
    time.sleep(0.05)


def listen(port, seconds):
    # One socket for both families where IPv6 is on (dual-stack pods); IPv4 only where it is off.
    try:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", port))
    except OSError:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
    u.settimeout(0.5)
    print("listening", flush=True)
    bad = good = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = u.recv(4096)
        except socket.timeout:
            continue
        if data.startswith(b"ferry-end"):
            break
        bad += data.startswith(b"ferry-bad")
        good += data.startswith(b"ferry-good")
    print("bad", bad, "good", good, flush=True)


def end(ip, port):
    u = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(3):
        u.sendto(b"ferry-end", (ip, port))
        time.sleep(0.2)


VTEP = mac("02:fe:ff:ff:ff:ff")
PEER = mac("02:00:00:e2:e0:02")


def uplink_args(args):
    return (mac(args[0]), args[1], args[2], int(args[3]), int(args[4]), args[5], args[6], args[7])


def uplink_inner(inner_src, inner_dst, ttl=63, src_mac=PEER, payload=b"ferry-bad"):
    return eth(VTEP, src_mac, ipv4(inner_src, inner_dst, 17, udp(1000, 9999, payload), ttl=ttl))


def uplink_good(args, me):
    dst_mac, dst_ip, known, port, vni, inner_src, inner_dst, _ = uplink_args(args)
    inner = uplink_inner(inner_src, inner_dst, payload=b"ferry-good")
    return eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40010, port, vxlan(vni, inner))))


def uplink_refusals(args, me):
    """(drop reason, frame) for every class a router must refuse from the underlay. `args`: DST_MAC
    DST_IP KNOWN_SRC PORT VNI INNER_SRC INNER_DST NODE_IP."""
    dst_mac, dst_ip, known, port, vni, inner_src, inner_dst, node_ip = uplink_args(args)

    def inner(**kw):
        return uplink_inner(kw.pop("src", inner_src), kw.pop("dst", inner_dst), **kw)

    def tunnel(inner_frame, to_mac=dst_mac, **ip):
        return eth(to_mac, me, ipv4(known, dst_ip, 17, udp(40010, port, vxlan(vni, inner_frame)), **ip))

    seg = udp(40011, port, vxlan(vni, inner()))
    wrong = udp4_csum(known, dst_ip, seg) ^ 0x5555 or 1
    bad_udp_csum = seg[:6] + struct.pack("!H", wrong) + seg[8:]
    return [
        ("outer_dst_mac_not_ours", tunnel(inner(), to_mac=mac("02:00:00:e2:e0:99"))),
        ("udp_bad_checksum", eth(dst_mac, me, ipv4(known, dst_ip, 17, bad_udp_csum))),
        ("ipv4_bad_checksum", tunnel(inner(), bad_csum=True)),
        ("outer_fragment", tunnel(inner(), frag=0x2000)),
        ("inner_ttl_zero", tunnel(inner(ttl=0))),
        ("inner_src_mac_multicast", tunnel(inner(src_mac=mac("01:00:5e:00:00:01")))),
        ("inner_spoofed_source", tunnel(inner(src="10.244.250.2"))),
        ("not_local_pod", tunnel(inner(dst=node_ip))),
        ("truncated", eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40014, port, vxlan(vni, inner())[:4])))),
        ("vni_mismatch", eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40012, port, vxlan(vni + 76, inner()))))),
        ("unknown_source_node", eth(dst_mac, me, ipv4("192.168.100.199", dst_ip, 17,
                                                       udp(40013, port, vxlan(vni, inner()))))),
    ]


def uplink6_frames(args, me):
    """(drop reason, frame) for the IPv6 classes from an IPv6 underlay, then ("good", frame).
    `args`: DST_MAC DST_IP6 KNOWN_SRC6 PORT VNI INNER_SRC6 INNER_DST6."""
    dst_mac, dst_ip, known = mac(args[0]), args[1], args[2]
    port, vni, isrc, idst = int(args[3]), int(args[4]), args[5], args[6]

    def tunnel(inner_ip, sport, plen_extra=0, zero_csum=False):
        seg = udp6(known, dst_ip, sport, port, vxlan(vni, eth(VTEP, PEER, inner_ip, 0x86DD)), zero_csum)
        return eth(dst_mac, me, ipv6(known, dst_ip, 17, seg, plen=len(seg) + plen_extra), 0x86DD)

    bad = udp6(isrc, idst, 1000, 9999, b"ferry-bad")
    return [
        ("udp6_zero_checksum", tunnel(ipv6(isrc, idst, 17, bad), 40020, zero_csum=True)),
        ("ipv6_bad_payload_length", tunnel(ipv6(isrc, idst, 17, bad), 40021, plen_extra=300)),
        ("ipv6_bad_extension", tunnel(ipv6(isrc, idst, 0, opts6(17, ext_len=200) + bad), 40022)),
        ("ipv6_bad_payload_length", tunnel(ipv6(isrc, idst, 17, bad, plen=len(bad) + 300), 40023)),
        ("good", tunnel(ipv6_chain(isrc, idst, b"ferry-good"), 40024)),
    ]


def pod6_frames(iface, args):
    """(drop reason, frame) for the IPv6 classes from a pod, then ("good", frame). `args`: GW_MAC
    SRC_IP6 DST_IP6."""
    gw, src, dst = mac(args[0]), args[1], args[2]
    with open("/sys/class/net/%s/address" % iface) as f:
        me = mac(f.read().strip())
    bad = udp6(src, dst, 1000, 9999, b"ferry-bad")
    spoof = "fd00:dead::99"
    return [
        ("ipv6_bad_payload_length", eth(gw, me, ipv6(src, dst, 17, bad, plen=len(bad) + 300), 0x86DD)),
        ("ipv6_bad_extension", eth(gw, me, ipv6(src, dst, 0, opts6(17, ext_len=200) + bad), 0x86DD)),
        ("spoofed_source", eth(gw, me, ipv6(spoof, dst, 17, udp6(spoof, dst, 1000, 9999, b"ferry-bad")), 0x86DD)),
        ("good", eth(gw, me, ipv6_chain(src, dst, b"ferry-good"), 0x86DD)),
    ]


def pod_refusals(iface, args):
    """(drop reason, frame) for every class a router must refuse from a pod. `args`: GW_MAC SRC_IP DST_IP."""
    gw, src, dst = mac(args[0]), args[1], args[2]
    with open("/sys/class/net/%s/address" % iface) as f:
        me = mac(f.read().strip())
    packet = ipv4(src, dst, 17, udp(1000, 9999, b"ferry-bad"))
    return [
        ("pod_src_mac_mismatch", eth(gw, mac("02:00:00:e2:e0:77"), packet)),
        ("pod_dst_mac_not_gateway", eth(mac("02:00:00:e2:e0:88"), me, packet)),
        ("pod_ipv4_bad_checksum", eth(gw, me, ipv4(src, dst, 17, udp(1000, 9999, b"ferry-bad"), bad_csum=True))),
        ("pod_vlan_tagged", gw + me + struct.pack("!HH", 0x8100, 5) + struct.pack("!H", 0x0800) + packet),
        ("spoofed_source", eth(gw, me, ipv4("10.244.99.99", dst, 17, udp(1000, 9999, b"ferry-bad")))),
        ("ipv4_bad_ihl", eth(gw, me, ipv4(src, dst, 17, b"x" * 8, ihl=15)[:28])),
    ]


def flood(sock, frames, seconds, rate):
    """Sends `frames` round robin at about `rate` frames per second for `seconds`; prints one
    "<reason> <sent>" line per class."""
    sent = [0] * len(frames)
    start = time.monotonic()
    end = start + seconds
    n = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate)
        while n < due:
            i = n % len(frames)
            try:
                sock.send(frames[i][1])
                sent[i] += 1
            except OSError:
                pass  # a full socket buffer: not sent, not counted
            n += 1
        time.sleep(0.001)
    for (name, _), k in zip(frames, sent):
        print(name, k, flush=True)


def main():
    mode = sys.argv[1]
    if mode == "listen":
        return listen(int(sys.argv[2]), min(float(sys.argv[3]), 300))
    if mode == "end":
        return end(sys.argv[2], int(sys.argv[3]))
    iface = sys.argv[2]
    count = min(int(sys.argv[-1]), 10000)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    me = mac("02:00:00:e2:e0:01")
    if mode == "uplink":
        dst_mac, dst_ip, known, port, vni, inner_dst = (mac(sys.argv[3]), sys.argv[4], sys.argv[5],
                                                        int(sys.argv[6]), int(sys.argv[7]), sys.argv[8])
        inner_ip = ipv4("10.244.250.2", inner_dst, 17, udp(1000, 2000, b"ferry-e2e" * 4))
        inner = eth(mac("02:fe:ff:ff:ff:ff"), mac("02:00:00:e2:e0:02"), inner_ip)
        good = vxlan(vni, inner)
        burst(s, "truncated_vxlan", eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40000, port, good[:4]))), count)
        burst(s, "wrong_vni", eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40001, port, vxlan(vni + 76, inner)))),
              count)
        burst(s, "unknown_source", eth(dst_mac, me, ipv4("192.168.100.199", dst_ip, 17, udp(40002, port, good))),
              count)
        seg = udp(40003, port, good)
        burst(s, "ip_total_length_beyond_frame",
              eth(dst_mac, me, ipv4(known, dst_ip, 17, seg, total=20 + len(seg) + 300)), count)
        burst(s, "udp_length_beyond_ip",
              eth(dst_mac, me, ipv4(known, dst_ip, 17, udp(40004, port, good, length=8 + len(good) + 300))), count)
    elif mode == "refuse-uplink":
        for name, frame in uplink_refusals(sys.argv[3:11], me):
            burst(s, name, frame, count)
        burst(s, "good", uplink_good(sys.argv[3:11], me), 1)
    elif mode in ("uplink6", "pod6"):
        frames = uplink6_frames(sys.argv[3:10], me) if mode == "uplink6" else pod6_frames(iface, sys.argv[3:6])
        for name, frame in frames:
            burst(s, name, frame, 1 if name == "good" else count)
    elif mode == "refuse-pod":
        for name, frame in pod_refusals(iface, sys.argv[3:6]):
            burst(s, name, frame, count)
    elif mode in ("flood-uplink", "flood-pod"):
        seconds, rate = min(float(sys.argv[-2]), 600), float(sys.argv[-1])
        if mode == "flood-uplink":
            frames = uplink_refusals(sys.argv[3:11], me)
        else:
            frames = pod_refusals(iface, sys.argv[3:6])
        flood(s, frames, seconds, rate)
    elif mode == "pod":
        gw, src, dst = mac(sys.argv[3]), sys.argv[4], sys.argv[5]
        with open("/sys/class/net/%s/address" % iface) as f:
            me = mac(f.read().strip())
        payload = udp(1000, 2000, b"ferry-e2e" * 4)
        # IHL says 60 bytes of header; the frame ends after 20 (+ 8 bytes of UDP).
        burst(s, "ip_header_beyond_frame", eth(gw, me, ipv4(src, dst, 17, payload[:8], ihl=15)[:28]), count)
        burst(s, "spoofed_source", eth(gw, me, ipv4("10.244.99.99", dst, 17, payload)), count)
        burst(s, "ip_total_length_beyond_frame", eth(gw, me, ipv4(src, dst, 17, payload, total=1000)), count)
    else:
        sys.exit("usage: see the docstring")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Malformed-frame bursts for ferry's end-to-end tests (tests/e2e.rs), sent with raw AF_PACKET sockets.

  badframes.py uplink IFACE DST_MAC DST_IP KNOWN_SRC PORT VNI INNER_DST COUNT
      from the underlay namespace, out of the bridge port toward a node (IFACE): tunnel frames to
      DST_IP:PORT, each class COUNT times: truncated VXLAN header, wrong VNI, unknown source node,
      IPv4 total length > frame, UDP length > IP payload.
  badframes.py pod IFACE GW_MAC SRC_IP DST_IP COUNT
      from inside a pod, out of its eth0 toward the gateway: IPv4 header shorter than its IHL,
      spoofed source address, IPv4 total length > frame.

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


def ipv4(src, dst, proto, payload, total=None, ihl=5):
    total = 20 + len(payload) if total is None else total
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


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


def main():
    mode = sys.argv[1]
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

#!/usr/bin/env python3
"""What a tap with TUN_F_UDP_TUNNEL_GSO accepts, what reaches the far side, and what it costs.

Run as root: `scripts/probe-udp-tunnel-gso.py [--count N]`. It makes two network namespaces joined
by a veth pair (A: 10.77.0.1, B: 10.77.0.2), removed again on exit, even on failure.

In A, a tap opened like ferry's pod taps (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) with a 24-byte
virtio-net header (`virtio_net_hdr_v1_hash_tunnel`: the classic 12 bytes, hash fields, then
`outer_th_offset` and `inner_nh_offset`, little endian) takes complete VXLAN frames written by
this program: outer Ethernet/IPv4/UDP/VXLAN, inner Ethernet/IPv4/TCP carrying up to 64 KB, the
inner TCP checksum left partial (the pseudo-header sum, NEEDS_CSUM at the inner TCP header), the
GSO type VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | TCPV4 at the inner MSS. A forwards it (IP
forwarding) to B over the veth. In B a UDP socket with UDP_GRO on port 4789 reads what arrives.

1. The acceptance matrix: which headers a write() takes (0) or refuses (errno), with the offloads
   set and not set.
2. What B's socket gets for one tunnel super-packet: datagrams, sizes, `UDP_GRO` message, and
   whether the inner TCP checksum is complete or still the pseudo-header sum.
3. The cost, one thread each: N super-packets written to the tap (one write each), against the
   same payload sent as ferry sends it today (the inner segments with complete checksums behind
   their VXLAN headers, one `sendmsg` with UDP_SEGMENT per 64 KB). Sender CPU per 64 KB, and the
   receiver's CPU per 64 KB, from each thread's CPU clock.
"""

import argparse
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time

A, B = "tgso-a", "tgso-b"
A_IP, B_IP, TAP_IP, TAP_PEER = "10.77.0.1", "10.77.0.2", "10.78.0.1", "10.78.0.2"
TUNSETIFF, TUNSETPERSIST, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454CB, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
TUN_F_UDP_TUNNEL_GSO, TUN_F_UDP_TUNNEL_GSO_CSUM = 0x80, 0x100
F_NEEDS_CSUM, F_UDP_TUNNEL_CSUM = 1, 8
GSO_TCPV4, GSO_UDP_TUNNEL_IPV4, GSO_UDP_TUNNEL_IPV6 = 1, 0x20, 0x40
UDP_SEGMENT, UDP_GRO = 103, 104
MSS = 1398  # the lab's inner MSS (pod MTU 1450, TCP timestamps on: 1450 - 20 - 20 - 12)
PORT = 4789


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def csum16(data, start=0):
    if len(data) % 2:
        data = data + b"\0"
    s = start + sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4(src, dst, proto, payload_len, ident=0):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    c = (~csum16(h)) & 0xFFFF
    return h[:10] + struct.pack("!H", c) + h[12:]


def pseudo(src, dst, proto, length):
    return csum16(socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length))


def tcp_header(seq, csum, flags=0x10):
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, flags, 65535, csum, 0)


INNER_SRC, INNER_DST = "10.244.1.2", "10.244.2.2"
INNER_ETH = bytes.fromhex("02000000bb02" "02000000aa01" "0800")
VXLAN = struct.pack("!II", 0x08000000, 1 << 8)


def inner_tcp(payload, seq, complete):
    """Inner Ethernet/IPv4/TCP; the TCP checksum complete or the pseudo-header sum (partial)."""
    tl = 20 + len(payload)
    ph = pseudo(INNER_SRC, INNER_DST, 6, tl)
    if complete:
        c = (~csum16(tcp_header(seq, 0) + payload, ph)) & 0xFFFF
    else:
        c = ph  # what a NEEDS_CSUM packet carries: the folded pseudo-header sum, not inverted
    return INNER_ETH + ipv4(INNER_SRC, INNER_DST, 6, tl) + tcp_header(seq, c) + payload


def tunnel_frame(tap_mac, inner, src=TAP_PEER):
    """A whole outer frame as ferry would write it into an uplink tap."""
    udp_len = 8 + len(VXLAN) + len(inner)
    udp = struct.pack("!HHHH", 49999, PORT, udp_len, 0)
    eth = tap_mac + bytes.fromhex("020000000077") + b"\x08\x00"
    return eth + ipv4(src, B_IP, 17, udp_len) + udp + VXLAN + inner


OUTER_TH = 14 + 20
INNER_NH = OUTER_TH + 8 + 8 + 14
INNER_TH = INNER_NH + 20


def vnet(flags, gso_type, gso_size, csum_start, csum_offset, hdr_len, outer_th, inner_nh, size=24):
    h = struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
    if size == 12:
        return h
    return h + struct.pack("<HHHH", 0, 0, 0, 0) + struct.pack("<HH", outer_th, inner_nh)


def open_tap(name, offloads, hdr_size=24):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_size))
    fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    # Persistent: closing this descriptor must not destroy the device (and its address, and its
    # up state) between the cases; the namespace's removal deletes it.
    fcntl.ioctl(fd, TUNSETPERSIST, 1)
    return fd


def receiver(seconds, out):
    """In B: read the socket until `seconds` of silence; report datagrams, buffers, CPU."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    s.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    s.bind((B_IP, PORT))
    with open(out + ".ready", "w"):
        pass
    s.settimeout(seconds)
    msgs, nbytes, gro, first, cpu0 = 0, 0, [], None, None
    while True:
        try:
            data, anc, _flags, _addr = s.recvmsg(70000, socket.CMSG_SPACE(4))
        except socket.timeout:
            break
        if cpu0 is None:
            cpu0 = time.thread_time()
        msgs += 1
        nbytes += len(data)
        seg = [struct.unpack("i", d[:4])[0] for lvl, t, d in anc if lvl == socket.SOL_UDP and t == UDP_GRO]
        gro.append(seg[0] if seg else 0)
        if first is None:
            first = data
        s.settimeout(1.0)
    cpu = time.thread_time() - (cpu0 or time.thread_time())
    info = {"messages": msgs, "bytes": nbytes, "gro_sizes": sorted(set(gro)), "cpu": cpu}
    if first is not None and len(first) > 8 + 14 + 20 + 20:
        inner = first[8:]
        ip = inner[14:34]
        tl = struct.unpack("!H", ip[2:4])[0]
        tcp = inner[34:14 + tl]
        ph = pseudo(INNER_SRC, INNER_DST, 6, len(tcp))
        field = struct.unpack("!H", tcp[16:18])[0]
        info["first_len"] = len(first)
        info["inner_ip_len"] = tl
        info["inner_tcp_csum"] = "complete" if csum16(tcp, ph) == 0xFFFF else (
            "pseudo-header sum (partial)" if field == ph else "wrong")
    with open(out, "w") as f:
        f.write(repr(info))


def setup():
    for ns in (A, B):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "va", "netns", A, "type", "veth", "peer", "vb", "netns", B)
    sh("ip", "-n", A, "addr", "add", A_IP + "/24", "dev", "va")
    sh("ip", "-n", B, "addr", "add", B_IP + "/24", "dev", "vb")
    for ns, dev in ((A, "va"), (B, "vb")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", B, "route", "add", "10.78.0.0/24", "via", A_IP)
    sh("ip", "netns", "exec", A, "sysctl", "-qw", "net.ipv4.ip_forward=1",
       "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")


def cleanup():
    for ns in (A, B):
        sh("ip", "netns", "del", ns, check=False)


def in_ns(ns):
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    libc = __import__("ctypes").CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(__import__("ctypes").get_errno(), "setns " + ns)
    os.close(fd)


def start_receiver(tag, seconds=2.0):
    out = "/tmp/tgso-%s-%d" % (tag, os.getpid())
    for f in (out, out + ".ready"):
        if os.path.exists(f):
            os.unlink(f)
    p = subprocess.Popen(["ip", "netns", "exec", B, sys.executable, __file__, "--recv", out, "--quiet", str(seconds)])
    deadline = time.time() + 10
    while not os.path.exists(out + ".ready"):
        if time.time() > deadline or p.poll() is not None:
            raise RuntimeError("receiver did not start")
        time.sleep(0.01)
    return p, out


def finish_receiver(p, out):
    p.wait(timeout=60)
    with open(out) as f:
        info = eval(f.read())  # our own repr of a dict of numbers and strings
    for f in (out, out + ".ready"):
        os.unlink(f)
    return info


def try_write(fd, hdr, frame):
    try:
        os.write(fd, hdr + frame)
        return "accepted"
    except OSError as e:
        return "refused (%s)" % os.strerror(e.errno)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--recv")
    ap.add_argument("--quiet", type=float)
    a = ap.parse_args()
    if a.recv:
        receiver(a.quiet, a.recv)
        return
    cleanup()
    try:
        setup()
        run(a.count)
    finally:
        cleanup()


def run(count):
    in_ns(A)
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    payload = bytes(range(256)) * 250  # 64,000 bytes
    payload = payload[: MSS * 44]       # 61,512 bytes: 44 segments, one UDP_SEGMENT send (<= 65,507 B)
    fd = open_tap("tg0", base | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM)
    sh("ip", "addr", "add", TAP_IP + "/24", "dev", "tg0")
    sh("ip", "link", "set", "tg0", "up")
    sh("sysctl", "-qw", "net.ipv4.conf.tg0.rp_filter=0")
    link = sh("ip", "-o", "link", "show", "tg0").stdout.split()
    mac = bytes.fromhex(link[link.index("link/ether") + 1].replace(":", ""))
    # The tap's peer (the writer) must be reachable for the reverse path check: a neighbour entry.
    sh("ip", "neigh", "replace", TAP_PEER, "lladdr", "02:00:00:00:00:77", "dev", "tg0")
    partial = tunnel_frame(mac, inner_tcp(payload, 1, complete=False))
    hl = INNER_TH + 20
    good = vnet(F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4, MSS, INNER_TH, 16, hl, OUTER_TH, INNER_NH)

    print("1. What a write() takes (tap offloads CSUM|TSO4|TSO6|UDP_TUNNEL_GSO|UDP_TUNNEL_GSO_CSUM, header 24 B)")
    cases = [
        ("tunnel GSO IPv4 + TCPv4, NEEDS_CSUM at the inner TCP header, offsets set", good),
        ("the same without NEEDS_CSUM", vnet(0, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4, MSS, 0, 0, hl, OUTER_TH, INNER_NH)),
        ("both tunnel bits (IPv4 and IPv6)",
         vnet(F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6 | GSO_TCPV4, MSS, INNER_TH, 16, hl, OUTER_TH, INNER_NH)),
        ("tunnel bit with no inner GSO type", vnet(F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4, MSS, INNER_TH, 16, hl, OUTER_TH, INNER_NH)),
        ("inner_nh_offset 0 (not set)", vnet(F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4, MSS, INNER_TH, 16, hl, OUTER_TH, 0)),
        ("csum_start at the outer UDP header", vnet(F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4, MSS, OUTER_TH, 6, hl, OUTER_TH, INNER_NH)),
        ("UDP_TUNNEL_CSUM flag (outer checksum partial too)",
         vnet(F_NEEDS_CSUM | F_UDP_TUNNEL_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4, MSS, INNER_TH, 16, hl, OUTER_TH, INNER_NH)),
    ]
    p, out = start_receiver("matrix", 1.0)
    for name, hdr in cases:
        print("   %-75s %s" % (name, try_write(fd, hdr, partial)))
    os.close(fd)
    fd = open_tap("tg0", base | TUN_F_UDP_TUNNEL_GSO)
    print("   %-75s %s" % ("UDP_TUNNEL_CSUM flag, tap without UDP_TUNNEL_GSO_CSUM",
                           try_write(fd, cases[-1][1], partial)))
    os.close(fd)
    fd = open_tap("tg0", base)
    print("   %-75s %s" % ("tunnel GSO, tap without UDP_TUNNEL_GSO", try_write(fd, good, partial)))
    os.close(fd)
    print("   (on write the kernel parses the tunnel fields whenever the header is 24 bytes or more,\n"
          "    whatever TUNSETOFFLOAD said: the offload flags only decide what the tap hands to a reader)")
    fd12 = open_tap("tg0", base, hdr_size=12)
    print("   %-75s %s" % ("tunnel GSO type in a 12-byte header", try_write(fd12, good[:12], partial)))
    os.close(fd12)
    info = finish_receiver(p, out)
    print("   B's socket got:", info)

    print("2. One tunnel super-packet of %d bytes of TCP payload (%d segments at MSS %d)" % (len(payload), len(payload) // MSS, MSS))
    fd = open_tap("tg0", base | TUN_F_UDP_TUNNEL_GSO)
    p, out = start_receiver("one", 1.0)
    os.write(fd, good + partial)
    print("   B's socket got:", finish_receiver(p, out))

    # The outer source a node would use: its own underlay address, which arrives on the tap.
    own = tunnel_frame(mac, inner_tcp(payload, 1, complete=False), src=A_IP)
    for accept_local in (0, 1):
        sh("sysctl", "-qw", "net.ipv4.conf.tg0.accept_local=%d" % accept_local)
        p, out = start_receiver("own%d" % accept_local, 1.0)
        w = try_write(fd, good, own)
        print("   outer source = the node's own address, accept_local=%d: write %s, B's socket got %s"
              % (accept_local, w, finish_receiver(p, out)))

    print("3. Cost, %d super-packets each way (sender thread CPU / receiver thread CPU per 64 KB)" % count)
    # (a) the tap: one write of the whole tunnel super-packet.
    p, out = start_receiver("tap")
    t0, c0 = time.time(), time.thread_time()
    frame = good + partial
    for _ in range(count):
        os.write(fd, frame)
    ct, wt = time.thread_time() - c0, time.time() - t0
    r = finish_receiver(p, out)
    print("   tap, UDP tunnel GSO : sender %.1f us, receiver %.1f us, %.2f Gbit/s of payload sent, B got %d messages, %d bytes"
          % (ct / count * 1e6, r["cpu"] / count * 1e6, count * len(payload) * 8 / wt / 1e9, r["messages"], r["bytes"]))
    # (b) today: the segments with complete checksums behind VXLAN headers, one UDP_SEGMENT send.
    segs = []
    for i in range(0, len(payload), MSS):
        segs.append(VXLAN + inner_tcp(payload[i:i + MSS], 1 + i, complete=True))
    seg_size = len(segs[0])
    batch = b"".join(segs)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 32, 64 << 20)  # SO_SNDBUFFORCE
    s.bind((A_IP, 0))
    p, out = start_receiver("udp")
    t0, c0 = time.time(), time.thread_time()
    cm = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", seg_size))]
    for _ in range(count):
        while True:
            try:
                s.sendmsg([batch], cm, 0, (B_IP, PORT))
                break
            except BlockingIOError:
                continue
    ct, wt = time.thread_time() - c0, time.time() - t0
    r = finish_receiver(p, out)
    print("   UDP_SEGMENT socket  : sender %.1f us, receiver %.1f us, %.2f Gbit/s of payload sent, B got %d messages, %d bytes"
          % (ct / count * 1e6, r["cpu"] / count * 1e6, count * len(payload) * 8 / wt / 1e9, r["messages"], r["bytes"]))
    print("   (ferry's own work before the send, not in these figures: segmenting with complete checksums, "
          "about 59,000 instructions per 64 KB; with the tap, one header to write)")


if __name__ == "__main__":
    main()

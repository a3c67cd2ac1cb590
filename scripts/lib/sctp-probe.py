#!/usr/bin/env python3
"""SCTP packets through a Service without the kernel's SCTP (this machine's kernel has none): raw
sockets (IPPROTO_SCTP) send and receive hand-made SCTP packets with their CRC32c (RFC 9260). For
tests/e2e.rs.

  sctp-probe.py serve PORT NAME [SECONDS]
      answer every SCTP packet to PORT with one from PORT back to its sender, carrying NAME (until
      SECONDS pass; default 60); a packet whose CRC32c is wrong is counted on stderr, not answered
  sctp-probe.py send IP PORT SPORT [SECONDS]
      send one INIT-like packet from SPORT to IP:PORT, wait (default 3 s) for the answer to SPORT,
      print it as JSON: the address and port it came from, the name, whether its CRC32c held
"""
import json
import select
import socket
import struct
import sys
import time

IPPROTO_SCTP = 132


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def packet(sport, dport, chunk_type, body):
    chunk = struct.pack("!BBH", chunk_type, 0, 4 + len(body)) + body
    chunk += b"\0" * (-len(chunk) % 4)
    p = bytearray(struct.pack("!HHII", sport, dport, 0x1234ABCD, 0) + chunk)
    p[8:12] = struct.pack("<I", crc32c(bytes(p)))
    return bytes(p)


def parse(data):
    """(source address, sctp bytes) of a raw IPv4 socket's datagram (the IP header included)."""
    ihl = (data[0] & 0x0F) * 4
    return socket.inet_ntoa(data[12:16]), data[ihl:]


def crc_ok(sctp):
    stored = struct.unpack("<I", sctp[8:12])[0]
    return stored == crc32c(sctp[:8] + b"\0\0\0\0" + sctp[12:])


def serve(port, name, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    end = time.time() + seconds
    bad = 0
    while time.time() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.time()))
        if not r:
            break
        data, _ = s.recvfrom(65535)
        src, sctp = parse(data)
        if len(sctp) < 12:
            continue
        sport, dport = struct.unpack("!HH", sctp[:4])
        if dport != port or sctp[12:13] == b"\x02":
            continue
        if not crc_ok(sctp):
            bad += 1
            print("bad CRC32c from %s:%d (%d so far)" % (src, sport, bad), file=sys.stderr, flush=True)
            continue
        s.sendto(packet(port, sport, 2, name.encode()), (src, 0))


def send(ip, port, sport, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    s.sendto(packet(sport, port, 1, struct.pack("!IIHHI", 0xCAFEBABE, 65536, 10, 10, 1)), (ip, 0))
    end = time.time() + seconds
    while time.time() < end:
        r, _, _ = select.select([s], [], [], max(0.0, end - time.time()))
        if not r:
            break
        data, _ = s.recvfrom(65535)
        src, sctp = parse(data)
        if len(sctp) < 16:
            continue
        fport, dport = struct.unpack("!HH", sctp[:4])
        if dport != sport or sctp[12] != 2:
            continue
        length = struct.unpack("!H", sctp[14:16])[0]
        print(json.dumps({"from": src, "sport": fport, "name": sctp[16:12 + length].decode(errors="replace"),
                          "crc_ok": crc_ok(sctp)}))
        return
    sys.exit("no answer to %d within %s s" % (sport, seconds))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 60)
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 3)

#!/usr/bin/env python3
"""A one-shot, time-bounded TCP transfer: the lab's check (scripts/lib/lab-check.sh) and the
end-to-end tests (tests/e2e.rs).

  tcp-transfer.py serve PORT [TIMEOUT]
      accept one connection, count what arrives, answer with the count (TIMEOUT s for the
      connection to come and between reads; default 15)
  tcp-transfer.py send IP PORT BYTES [CONNECT_DEADLINE IO_TIMEOUT]
      send BYTES, check the server's count; prints MB/s (retries a refused connection for
      CONNECT_DEADLINE s, default 5; IO_TIMEOUT s per send or receive, default 15)
  tcp-transfer.py serve-checked PORT [TIMEOUT]
  tcp-transfer.py send-checked IP PORT BYTES [CONNECT_DEADLINE IO_TIMEOUT]
      the same with random bytes and a SHA-256 of both ends: the server answers with the count
      and the digest of what arrived; the sender compares them with its own and prints one JSON
      line (bytes, MB/s, the digest, the sender's retransmitted segments from TCP_INFO)
"""
import hashlib
import json
import os
import socket
import struct
import sys
import time

# struct tcp_info (linux/tcp.h): tcpi_total_retrans is the u32 at byte 100.
TCPI_TOTAL_RETRANS = 100


def listen(port, timeout):
    # One socket for both families where IPv6 is on (dual-stack labs); IPv4 only where it is off.
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
    except OSError:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    s.listen(1)
    s.settimeout(timeout)
    c, _ = s.accept()
    c.settimeout(timeout)
    return c


def serve(port, timeout, checked):
    c = listen(port, timeout)
    n = 0
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
        if checked:
            digest.update(view[:k])
    c.sendall(("%d %s" % (n, digest.hexdigest()) if checked else str(n)).encode())
    c.close()


def connect(ip, port, connect_deadline, io_timeout):
    deadline = time.time() + connect_deadline
    while True:
        try:
            c = socket.create_connection((ip, port), timeout=3)
            break
        except ConnectionRefusedError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    c.settimeout(io_timeout)
    return c


def answer(c):
    got = b""
    while True:
        d = c.recv(256)
        if not d:
            break
        got += d
    return got.decode()


def send(ip, port, size, connect_deadline, io_timeout):
    c = connect(ip, port, connect_deadline, io_timeout)
    t0 = time.time()
    buf = b"x" * 65536
    left = size
    while left > 0:
        left -= c.send(buf[: min(left, len(buf))])
    c.shutdown(socket.SHUT_WR)
    got = answer(c)
    if got != str(size):
        sys.exit("server received %s of %d bytes" % (got or "nothing", size))
    print("%.1f" % (size / (time.time() - t0) / 1e6))


def send_checked(ip, port, size, connect_deadline, io_timeout):
    c = connect(ip, port, connect_deadline, io_timeout)
    t0 = time.time()
    digest = hashlib.sha256()
    # 1 MiB chunks cut at a different place of 16 MiB of random bytes each time (os.urandom for all
    # of it would bound the rate): a lost, duplicated or misplaced chunk changes the digest.
    pool = memoryview(os.urandom(16 << 20))
    left, i = size, 0
    while left > 0:
        at = (i * 1000003) % (len(pool) - (1 << 20))
        chunk = pool[at:at + min(left, 1 << 20)]
        digest.update(chunk)
        c.sendall(chunk)
        left -= len(chunk)
        i += 1
    c.shutdown(socket.SHUT_WR)
    got = answer(c)
    secs = time.time() - t0
    retrans = struct.unpack_from("I", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), TCPI_TOTAL_RETRANS)[0]
    want = "%d %s" % (size, digest.hexdigest())
    if got != want:
        sys.exit("server received %r, sent %r" % (got or "nothing", want))
    print(json.dumps({"bytes": size, "mbps": round(size / secs / 1e6, 1), "sha256": digest.hexdigest(),
                      "retransmitted_segments": retrans}))


if __name__ == "__main__":
    if sys.argv[1] in ("serve", "serve-checked"):
        serve(int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 15, sys.argv[1] == "serve-checked")
    else:
        deadlines = (float(sys.argv[5]), float(sys.argv[6])) if len(sys.argv) > 6 else (5, 15)
        f = send_checked if sys.argv[1] == "send-checked" else send
        f(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *deadlines)

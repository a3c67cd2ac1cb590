#!/usr/bin/env python3
"""A one-shot, time-bounded TCP transfer: the lab's check (scripts/lib/lab-check.sh) and the
end-to-end tests (tests/e2e.rs).

  tcp-transfer.py serve PORT [TIMEOUT]
      accept one connection, count what arrives, answer with the count (TIMEOUT s for the
      connection to come and between reads; default 15)
  tcp-transfer.py send IP PORT BYTES [CONNECT_DEADLINE IO_TIMEOUT]
      send BYTES, check the server's count; prints MB/s (retries a refused connection for
      CONNECT_DEADLINE s, default 5; IO_TIMEOUT s per send or receive, default 15)
"""
import socket
import sys
import time


def serve(port, timeout):
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
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    c.sendall(str(n).encode())
    c.close()


def send(ip, port, size, connect_deadline, io_timeout):
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
    t0 = time.time()
    buf = b"x" * 65536
    left = size
    while left > 0:
        left -= c.send(buf[: min(left, len(buf))])
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = c.recv(64)
        if not d:
            break
        got += d
    if got.decode() != str(size):
        sys.exit("server received %s of %d bytes" % (got.decode() or "nothing", size))
    print("%.1f" % (size / (time.time() - t0) / 1e6))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 15)
    else:
        connect, io = (float(sys.argv[5]), float(sys.argv[6])) if len(sys.argv) > 6 else (5, 15)
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), connect, io)

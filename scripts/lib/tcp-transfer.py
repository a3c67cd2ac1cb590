#!/usr/bin/env python3
"""A one-shot, time-bounded TCP transfer for ferry's end-to-end tests (tests/e2e.rs).

  tcp.py serve PORT            accept one connection, count what arrives, answer with the count
  tcp.py send IP PORT BYTES    send BYTES, check the server's count; prints MB/s
"""
import socket
import sys
import time


def serve(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1)
    s.settimeout(15)
    c, _ = s.accept()
    c.settimeout(15)
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    c.sendall(str(n).encode())
    c.close()


def send(ip, port, size):
    deadline = time.time() + 5
    while True:
        try:
            c = socket.create_connection((ip, port), timeout=3)
            break
        except ConnectionRefusedError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    c.settimeout(15)
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
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

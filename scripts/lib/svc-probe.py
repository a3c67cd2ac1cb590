#!/usr/bin/env python3
"""Service probes for the lab and its end-to-end tests (bounded; stdlib only).

  svc-probe.py serve PORT NAME            answer every TCP connection on PORT with NAME (until killed)
  svc-probe.py connect IP PORT COUNT      COUNT TCP connections to IP:PORT, one per source port; prints one
                                           line per connection: the name received, or the error
"""
import socket
import sys


def serve(port, name):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(name.encode() + b"\n")
        finally:
            c.close()


def connect(ip, port, count):
    for _ in range(count):
        try:
            with socket.create_connection((ip, port), timeout=2) as c:
                c.settimeout(2)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = c.recv(256)
                    if not chunk:
                        break
                    data += chunk
                print(data.decode().strip() or "empty")
        except ConnectionRefusedError:
            print("refused")
        except OSError as e:
            print(f"error {e}")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)

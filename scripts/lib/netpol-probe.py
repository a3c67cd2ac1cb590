#!/usr/bin/env python3
"""NetworkPolicy probes for the end-to-end conformance suite (bounded; stdlib only).

  netpol-probe.py serve NAME                 answer TCP and UDP on ports 80 and 81 with NAME, and echo
                                             lines on TCP 82 (until killed)
  netpol-probe.py probe TIMEOUT IP...        probe TCP 80, TCP 81, UDP 80, UDP 81 of every IP, all at
                                             once; prints "IP PROTO PORT ok|no" per probe
  netpol-probe.py stream IP SECONDS          one TCP connection to IP:82, a line echoed every 50 ms;
                                             prints "up" after the first echo, then "stopped AFTER_S"
                                             when an echo does not come back within 0.5 s (or
                                             "lasted" after SECONDS)
"""
import socket
import sys
import threading
import time


def serve(name):
    reply = name.encode() + b"\n"

    def tcp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(256)
        while True:
            c, _ = s.accept()
            try:
                c.sendall(reply)
            except OSError:
                pass
            finally:
                c.close()

    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        while True:
            _, peer = s.recvfrom(256)
            try:
                s.sendto(reply, peer)
            except OSError:
                pass

    def echo_conn(c):
        try:
            while True:
                data = c.recv(256)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def echo():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 82))
        s.listen(16)
        while True:
            c, _ = s.accept()
            threading.Thread(target=echo_conn, args=(c,), daemon=True).start()

    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in
               [(tcp, (80,)), (tcp, (81,)), (udp, (80,)), (udp, (81,)), (echo, ())]]
    for t in threads:
        t.start()
    print("serving", flush=True)
    for t in threads:
        t.join()


def probe_one(ip, proto, port, timeout):
    deadline = time.monotonic() + timeout
    if proto == "tcp":
        try:
            with socket.create_connection((ip, port), timeout=timeout) as c:
                c.settimeout(max(0.05, deadline - time.monotonic()))
                return c.recv(64) != b""
        except OSError:
            return False
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Two datagrams in the window: one lost datagram is not a verdict.
        for i in range(2):
            s.sendto(b"probe", (ip, port))
            s.settimeout(max(0.01, min(timeout / 2, deadline - time.monotonic())))
            try:
                if s.recv(64):
                    return True
            except socket.timeout:
                continue
        return False
    except OSError:
        return False
    finally:
        s.close()


def probe(timeout, ips):
    results = {}

    def run(ip, proto, port):
        results[(ip, proto, port)] = probe_one(ip, proto, port, timeout)

    threads = []
    for ip in ips:
        for proto, port in (("tcp", 80), ("tcp", 81), ("udp", 80), ("udp", 81)):
            t = threading.Thread(target=run, args=(ip, proto, port))
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    for (ip, proto, port), ok in results.items():
        print(f"{ip} {proto} {port} {'ok' if ok else 'no'}")


def stream(ip, seconds):
    start = time.monotonic()
    try:
        c = socket.create_connection((ip, 82), timeout=2)
    except OSError as e:
        print(f"error {e}", flush=True)
        return
    c.settimeout(0.5)
    up = False
    while time.monotonic() - start < seconds:
        try:
            c.sendall(b"line\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(64)
                if not chunk:
                    raise OSError("closed")
                data += chunk
        except OSError:
            print(f"stopped {time.monotonic() - start:.2f}", flush=True)
            return
        if not up:
            print("up", flush=True)
            up = True
        time.sleep(0.05)
    print("lasted", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "probe":
        probe(float(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1] == "stream":
        stream(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(__doc__)

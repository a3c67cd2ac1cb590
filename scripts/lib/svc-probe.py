#!/usr/bin/env python3
"""Service probes for the lab and its end-to-end tests (bounded; stdlib only).

  svc-probe.py serve PORT NAME            answer every TCP connection on PORT with NAME (until killed)
  svc-probe.py serve-both PORT NAME       the same, and every UDP datagram to PORT with NAME
  svc-probe.py serve-peer PORT NAME       TCP and UDP on PORT, both families, answering "NAME PEER" (the client
                                           address it sees)
  svc-probe.py tcp IP PORT                one TCP connection to IP:PORT (2 s); prints the answer, "refused" or the error
  svc-probe.py udp IP PORT                one UDP exchange with IP:PORT (3 tries); prints the answer or "timeout"
  svc-probe.py connect IP PORT COUNT      COUNT TCP connections to IP:PORT, one per source port; prints one
                                           line per connection: the name received, or the error
  svc-probe.py serve-hold PORT NAME       answer every TCP connection on PORT with NAME, then echo its lines
                                           while it stays open (a line "bye" closes it from this end)
  svc-probe.py hold IP PORT COUNT         COUNT connections to IP:PORT; prints the names received as one JSON
                                           list, then for each line on stdin sends a line on every connection
                                           and prints a JSON list of what each did: "ok" (echoed), "reset",
                                           "closed" or "timeout" (3 s for all of them); ends at end of input
  svc-probe.py from-ports IP PORT FIRST COUNT
                                           one connection from each source port FIRST..FIRST+COUNT-1; prints a
                                           JSON object: source port -> name received (or the error)
  svc-probe.py probe-all FILE             for each line "SERVICE VIP PORT BACKEND,BACKEND..." of FILE: one TCP
                                           connection and one UDP exchange (3 tries) to VIP:PORT; prints
                                           "SERVICE VIP tcp|udp ok|FAIL ANSWER" per probe; exit 1 on any FAIL
"""
import json
import socket
import sys
import threading
import time


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


def serve_udp(port, name):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(name.encode() + b"\n", peer)


def serve_peer(port, name):
    # One socket per family (IPv6 ones v6-only), so an IPv4 peer reads as plain IPv4.
    def sock(family, kind, any_addr):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((any_addr, port))
        return s

    def udp(u):
        while True:
            _, peer = u.recvfrom(2048)
            u.sendto(f"{name} {peer[0]}\n".encode(), peer)

    def tcp(s):
        s.listen(128)
        while True:
            c, peer = s.accept()
            try:
                c.sendall(f"{name} {peer[0]}\n".encode())
            finally:
                c.close()

    for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        threading.Thread(target=udp, args=(sock(family, socket.SOCK_DGRAM, any_addr),), daemon=True).start()
        threading.Thread(target=tcp, args=(sock(family, socket.SOCK_STREAM, any_addr),), daemon=True).start()
    threading.Event().wait()


def serve_both(port, name):
    threading.Thread(target=serve_udp, args=(port, name), daemon=True).start()
    serve(port, name)


def read_line(c):
    # One line from the connection, up to its end if no newline comes.
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def tcp_once(ip, port):
    # 5 s, as `connect`: a lost SYN or SYN-ACK costs TCP a 1 s retransmission, and on a loaded
    # machine a 2 s limit read that as a failed translation (CI: two pod -> VIP probes of 72).
    try:
        with socket.create_connection((ip, port), timeout=5) as c:
            c.settimeout(5)
            return read_line(c) or "empty"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"error:{e}".replace(" ", "_")


def udp_once(ip, port):
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        for _ in range(3):
            try:
                s.sendto(b"?", (ip, port))
                data, _ = s.recvfrom(2048)
                return data.decode().strip() or "empty"
            except socket.timeout:
                continue
            except OSError as e:
                return f"error:{e}".replace(" ", "_")
    return "timeout"


def probe_all(path):
    failed = 0
    with open(path) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    for name, vip, port, backends in lines:
        allowed = backends.split(",")
        for proto, probe in (("tcp", tcp_once), ("udp", udp_once)):
            got = probe(vip, int(port))
            ok = got in allowed
            failed += not ok
            print(f"{name} {vip} {proto} {'ok' if ok else 'FAIL'} {got}")
            sys.stdout.flush()
    sys.exit(1 if failed else 0)


def serve_hold(port, name):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)

    def echo(c):
        with c:
            c.sendall(name.encode() + b"\n")
            while True:
                data = c.recv(256)
                # "bye": the server closes first, so the client's port is free again at once.
                if not data or data == b"bye\n":
                    return
                c.sendall(data)

    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def hold(ip, port, count):
    conns, names = [], []
    for _ in range(count):
        c = socket.create_connection((ip, port), timeout=5)
        c.settimeout(5)
        names.append(read_line(c) or "empty")
        conns.append(c)
    # Their source ports on stderr (a failed test names the connections that failed by them).
    print(json.dumps([c.getsockname()[1] for c in conns]), file=sys.stderr, flush=True)
    print(json.dumps(names), flush=True)
    while sys.stdin.readline():
        print(json.dumps(ping_all(conns)), flush=True)


def ping_all(conns):
    # Every connection's line first, then the answers within one 3 s deadline for all of them.
    sent = []
    for c in conns:
        try:
            c.sendall(b"ping\n")
            sent.append(None)
        except OSError as e:
            sent.append("reset" if isinstance(e, ConnectionResetError) else f"error {e}")
    deadline = time.time() + 3
    results = []
    for c, failed in zip(conns, sent):
        if failed:
            results.append(failed)
            continue
        try:
            c.settimeout(max(0.05, deadline - time.time()))
            results.append("ok" if read_line(c) == "ping" else "closed")
        except ConnectionResetError:
            results.append("reset")
        except socket.timeout:
            results.append("timeout")
        except OSError as e:
            results.append(f"error {e}")
    return results


def from_ports(ip, port, first, count):
    got = {}
    for sport in range(first, first + count):
        got[sport] = from_port(ip, port, sport)
        if got[sport].startswith("error"):
            # Once more from the same port: a connection lost on a loaded machine is not a
            # translation that failed (a tuple that fails twice is reported as such).
            got[sport] = from_port(ip, port, sport)
    print(json.dumps(got), flush=True)


def from_port(ip, port, sport):
    # One connection from source port `sport`: the backend's name, or the error.
    try:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.settimeout(5)
        c.bind(("0.0.0.0", sport))
        c.connect((ip, port))
        with c:
            name = read_line(c) or "empty"
            # Let the server close first (no TIME_WAIT here): the same source port again later.
            c.sendall(b"bye\n")
            while c.recv(256):
                pass
            return name
    except OSError as e:
        return f"error {e}"


def connect(ip, port, count):
    # 5 s: room for TCP's own SYN retransmissions (1 s, then 3 s) on a loaded machine, where one
    # lost frame must not read as a failed translation.
    for _ in range(count):
        try:
            with socket.create_connection((ip, port), timeout=5) as c:
                c.settimeout(5)
                print(read_line(c) or "empty")
        except ConnectionRefusedError:
            print("refused")
        except OSError as e:
            print(f"error {e}")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "serve-peer":
        serve_peer(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "tcp":
        print(tcp_once(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "udp":
        print(udp_once(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "serve-both":
        serve_both(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "probe-all":
        probe_all(sys.argv[2])
    elif sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "serve-hold":
        serve_hold(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "from-ports":
        from_ports(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)

#!/usr/bin/env python3
"""A bounded, numbered UDP stream with an echo: the end-to-end tests (tests/e2e.rs) check that a
flow arrives whole and in order in both directions, whichever path (ferry's or the kernel's)
carried each datagram.

  udp-stream.py echo PORT COUNT [TIMEOUT]
      print "ready" once bound, then answer each datagram with its first 8 bytes (its number),
      until COUNT arrived or nothing
      came for 2 s after the first (TIMEOUT s in all, default 30); then print one JSON line:
      received, reordered (arrived after a higher number), duplicates
  udp-stream.py send IP PORT COUNT SIZE RATE [SPORT]
      send COUNT datagrams of SIZE bytes (numbered 0..COUNT-1) at RATE a second, from source
      port SPORT (default: any), reading the echoes as they come and for 2 s after the last;
      print one JSON line: sent, echoed, echo_reordered, echo_duplicates, seconds
"""
import json
import socket
import struct
import sys
import time


class Order:
    """Arrival order of numbered datagrams."""

    def __init__(self):
        self.seen = set()
        self.highest = -1
        self.reordered = 0
        self.duplicates = 0

    def note(self, n):
        if n in self.seen:
            self.duplicates += 1
            return
        self.seen.add(n)
        if n < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, n)


def socket_for(ip):
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    return s


def echo(port, count, timeout):
    s = socket_for("0.0.0.0")
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    order = Order()
    deadline = time.monotonic() + timeout
    s.settimeout(timeout)
    while len(order.seen) < count and time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(65536)
        except socket.timeout:
            break
        if len(data) < 8:
            continue
        order.note(struct.unpack("!Q", data[:8])[0])
        s.sendto(data[:8], peer)
        # Once the stream began, a 2 s silence ends it.
        s.settimeout(2)
    print(json.dumps({"received": len(order.seen), "reordered": order.reordered, "duplicates": order.duplicates}))


def send(ip, port, count, size, rate, sport):
    s = socket_for(ip)
    if sport:
        s.bind(("0.0.0.0", sport))
    s.setblocking(False)
    order = Order()
    pad = bytes(max(0, size - 8))
    start = time.monotonic()

    def drain():
        while True:
            try:
                data = s.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) >= 8:
                order.note(struct.unpack("!Q", data[:8])[0])

    sent = 0
    burst = max(1, rate // 1000)
    while sent < count:
        # Paced in bursts of a millisecond's worth, as the rate allows.
        due = start + sent / rate
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        for _ in range(min(burst, count - sent)):
            try:
                s.sendto(struct.pack("!Q", sent) + pad, (ip, port))
            except BlockingIOError:
                break
            sent += 1
        drain()
    end = time.monotonic() + 2
    while time.monotonic() < end and len(order.seen) < count:
        drain()
        time.sleep(0.01)
    print(
        json.dumps(
            {
                "sent": sent,
                "echoed": len(order.seen),
                "echo_reordered": order.reordered,
                "echo_duplicates": order.duplicates,
                "seconds": round(time.monotonic() - start, 3),
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 30)
    elif sys.argv[1] == "send":
        a = sys.argv
        send(a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]) if len(a) > 7 else 0)
    else:
        sys.exit(__doc__)

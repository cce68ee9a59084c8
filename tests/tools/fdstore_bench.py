#!/usr/bin/env python3
"""What systemd's fd store costs epmd.py: registrations and lookups with it
and without it.

Under the stand-in for systemd (helpers.SystemdStandIn: CI has no systemd
as PID 1), epmd.py -systemd is started with FileDescriptorStoreMax (the
stand-in's limit, announced in $FDSTORE) above the node count, and once
with no store ($FDSTORE unset).  For each node count: the wall time and the
daemon's CPU time (user + system, /proc/PID/stat) to register the nodes one
after the other from this process, and the bytes the daemon wrote
(/proc/PID/io wchar: the store's state memfd and its notify datagrams);
then, with --churn nodes registered, the PORT_PLEASE2 round trip (a new
connection each) p50 and p99 while another thread registers and closes one
more node in a loop.  Standard library and tests/helpers.py only.

    python3 -m tests.tools.fdstore_bench [--nodes 2000,10000] [--churn 2000] [--epmd PATH]
"""

import argparse
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


from tests.helpers import (SystemdStandIn, creation_of, frame, free_port, proc_cpu,
                     read_to_eof, register)

# the registering child's descriptors are its own: 10,000 nodes need 10,000
# there and as many in the stand-in's store, here


def wchar(pid):
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def start(tmp, n, store, epmd):
    sd = SystemdStandIn(Path(tmp), free_port(), (), limit=n + 16 if store else 0)
    if epmd:
        sd.epmd_py = epmd
    sd.start()
    if not sd.wait_ready(1):
        raise RuntimeError(sd.stderr())
    return sd


REGISTER = r"""
import resource, socket, struct, sys
port, n, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for i in range(n):
    name = ("%s%d" % (tag, i)).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack(">HBHBBHHH", 13 + len(name), 120, 10000 + i % 50000, 77, 0, 6, 5,
                          len(name)) + name + b"\0\0")
    reply = s.recv(6)
    assert reply[:2] == b"v\0", reply
    socks.append(s)
print("HELD", flush=True)
sys.stdin.readline()
"""


class register_all:
    """*n* nodes registered by a child process (the descriptors are its),
    held until close()."""

    def __init__(self, port, n, tag):
        import subprocess
        self.p = subprocess.Popen([sys.executable, "-c", REGISTER, str(port), str(n), tag],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.p.stdout.readline() != b"HELD\n":
            raise RuntimeError("registration failed")

    def close(self):
        self.p.stdin.close()
        self.p.wait(60)


def lookups(port, name, seconds):
    times = []
    ask = frame(b"z" + name)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(ask)
            reply = read_to_eof(s)
        times.append(time.perf_counter() - t)
        assert reply[:2] == b"w\x00", reply
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6, len(times)


def churn(port, stop, count):
    while not stop.is_set():
        s, reply = register(port, "churner")
        s.close()
        if creation_of(reply) is not None:
            count[0] += 1
        else:
            time.sleep(0.001)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2000,10000")
    ap.add_argument("--churn", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--epmd", help="another epmd.py to measure instead of this one")
    a = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print("%-32s %10s %10s %12s %12s" % ("registering N nodes", "wall s", "CPU s", "kB written",
                                          "B written/reg"))
    for n in [int(x) for x in a.nodes.split(",")]:
        for store in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                sd = start(tmp, n, store, a.epmd)
                try:
                    cpu0, w0, t0 = proc_cpu(sd.pid), wchar(sd.pid), time.monotonic()
                    socks = register_all(sd.port, n, "n")
                    wall = time.monotonic() - t0
                    cpu, w = proc_cpu(sd.pid) - cpu0, wchar(sd.pid) - w0
                    socks.close()
                finally:
                    sd.close()
            print("%-32s %10.2f %10.2f %12.0f %12.0f" % (
                "%d, %s" % (n, "fd store" if store else "no store"), wall, cpu, w / 1024, w / n),
                flush=True)
    print("\n%-32s %10s %10s %10s %12s %12s" % ("PORT_PLEASE2 during churn", "p50 us", "p99 us",
                                               "lookups", "churn cycles", "CPU us/req"))
    for store in (False, True):
        for churning in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                sd = start(tmp, a.churn + 1, store, a.epmd)
                try:
                    socks = register_all(sd.port, a.churn, "n")
                    stop, count = threading.Event(), [0]
                    t = threading.Thread(target=churn, args=(sd.port, stop, count))
                    cpu0 = proc_cpu(sd.pid)
                    if churning:
                        t.start()
                    p50, p99, k = lookups(sd.port, b"n7", a.seconds)
                    stop.set()
                    cpu = proc_cpu(sd.pid) - cpu0
                    if churning:
                        t.join()
                    socks.close()
                finally:
                    sd.close()
            print("%-32s %10.0f %10.0f %10d %12d %12.0f" % (
                "%d nodes, %s, %s" % (a.churn, "fd store" if store else "no store",
                                      "churn" if churning else "quiet"), p50, p99, k, count[0],
                cpu * 1e6 / (k + count[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

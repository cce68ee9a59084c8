#!/usr/bin/env python3
"""Long-running reliability runs of epmd.py, side by side with OTP's epmd
where the same run makes sense for it.  Prints figures; not part of `make
test` (whose versions of these stay short).

    python3 -m tests.tools.soak [churn] [fuzz] [flood] [emfile] [--cycles N] [--packets N]

churn   N register/unregister cycles with fresh names (default 1,000,000);
        RSS after 10% of them and at the end.
fuzz    N random and mutated packets on fresh connections (default
        1,000,000) against a daemon with 5 registered nodes; checks the nodes
        survive, connections return to baseline, and reports RSS.
flood   idle connections from a network namespace against a daemon limited
        to 200 descriptors, then a local registration (root only).
emfile  the descriptor limit lowered under a daemon holding 10 nodes, then
        60 more connections: does it survive and keep its nodes?
"""

import argparse
import os
import random
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path


from tests.helpers import (
    OTP_EPMD,
    VALID,
    Daemon,
    NetNS,
    alive2,
    base_env,
    connect,
    frame,
    free_port,
    mutate,
    proc_fds,
    proc_rss_kb,
    register,
    registered,
    send_fuzzed,
    wait_until,
)

TMP = Path(tempfile.mkdtemp(prefix="epmd-soak-"))


def start(impl, *args, nofile=None):
    port = free_port()
    d = Daemon(impl, port, ["-port", str(port)] + list(args), base_env(), TMP)
    d.nofile = nofile
    return d.start()


def impls():
    return ["py", "otp"] if OTP_EPMD else ["py"]


def row(*cells):
    print("  ".join("%-22s" % c for c in cells), flush=True)


def churn(cycles):
    row("churn cycles", "impl", "RSS kB @10%", "RSS kB @end", "growth kB", "cycles/s")
    for impl in impls():
        d = start(impl, "-address", "127.0.0.1")
        t0 = time.monotonic()
        rss10 = None
        for i in range(cycles):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(frame(alive2("c%08d" % i)))
            s.recv(6)
            s.close()
            if i + 1 == cycles // 10:
                wait_until(lambda: registered(d.port) == [], 10)
                rss10 = proc_rss_kb(d.pid)
        wait_until(lambda: registered(d.port) == [], 10)
        rss = proc_rss_kb(d.pid)
        row(cycles, impl, rss10, rss, rss - rss10, int(cycles / (time.monotonic() - t0)))
        d.stop()


def fuzz(packets):
    row("fuzz packets", "impl", "alive", "nodes kept", "fds back", "RSS growth kB")
    rng = random.Random(4321)
    for impl in impls():
        d = start(impl, "-address", "127.0.0.1", "-packet_timeout", "1")
        nodes = [register(d.port, "keep%d" % i)[0] for i in range(5)]
        base = proc_fds(d.pid)
        rss0 = proc_rss_kb(d.pid)
        for _ in range(packets):
            send_fuzzed(d.port, mutate(rng, rng.choice(VALID)))
            if not d.alive():
                break
        alive = d.alive()
        kept = alive and sorted(registered(d.port))[:5] == [b"keep%d" % i for i in range(5)]
        back = alive and wait_until(lambda: proc_fds(d.pid) == base, 10)
        row(packets, impl, alive, kept, back, (proc_rss_kb(d.pid) - rss0) if alive else "-")
        for s in nodes:
            s.close()
        d.stop()


def flood():
    if os.geteuid() != 0:
        print("flood: needs root for a network namespace")
        return
    row("remote flood", "impl", "remote held", "daemon alive", "local ALIVE2")
    for impl in impls():
        ns = NetNS().create()
        try:
            d = start(impl, "-address", ns.host4, nofile=(200, 200))
            holder, opened = ns.hold(ns.host4, d.port, 400)
            time.sleep(1)
            held = proc_fds(d.pid) - 7 if d.alive() else 0
            try:
                s, reply = register(d.port, "local")
                ok = reply[:2] == b"v\x00"
                s.close()
            except OSError:
                ok = False
            row(opened, impl, held, d.alive(), ok)
            holder.stdin.close()
            holder.wait(20)
            d.stop()
        finally:
            ns.destroy()


def emfile():
    row("EMFILE", "impl", "daemon alive", "exit status", "nodes kept")
    for impl in impls():
        d = start(impl, "-address", "127.0.0.1")
        nodes = [register(d.port, "keep%d" % i)[0] for i in range(10)]
        fds = proc_fds(d.pid)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (fds + 4, fds + 4))
        idle = []
        for _ in range(60):
            try:
                idle.append(connect(d.port, timeout=2))
            except OSError:
                pass
        time.sleep(2)
        for s in idle:
            s.close()
        alive = d.alive()
        kept = alive and wait_until(lambda: len(registered(d.port)) == 10, 10)
        row("60 extra connections", impl, alive, d.proc.poll(), kept)
        for s in nodes:
            s.close()
        d.stop()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=["churn", "fuzz", "flood", "emfile"])
    ap.add_argument("--cycles", type=int, default=1000000)
    ap.add_argument("--packets", type=int, default=1000000)
    a = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for run in a.runs:
        print("==", run, flush=True)
        if run == "churn":
            churn(a.cycles)
        elif run == "fuzz":
            fuzz(a.packets)
        elif run == "flood":
            flood()
        elif run == "emfile":
            emfile()
        else:
            ap.error("unknown run %r" % run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""How -status and the daemon's D25 line fare with many sockets on the host
(issue 23, item 2): the same measurements on an idle host and with N
established loopback connections (default 50,000) held by this process.

    python3 -m tests.tools.many_sockets [--connections N] [--reps R]

Prints, per case, the median and the worst of R runs of `epmd.py -status`
(wall time of the whole command; with sock_diag, and with the
/proc/net/tcp fallback of a Python without AF_NETLINK) and of a refused
duplicate ALIVE2_REQ (round trip of the refusal, from a fresh connection),
with the D25 line the daemon logged for it.  Needs root for the descriptor
limit when N is large.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import (
    EPMD_PY, ManyConnections, alive2, base_env, connect, established_count, frame, free_port,
    read_to_eof, register)

NO_NETLINK = ("import runpy, socket, sys; del socket.AF_NETLINK; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


def status_time(port, netlink=True):
    cmd = ([sys.executable, str(EPMD_PY)] if netlink
           else [sys.executable, "-c", NO_NETLINK, str(EPMD_PY)])
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["-port", str(port), "-status"], capture_output=True, timeout=120,
                       env=base_env())
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    return took, p.stdout.decode()


def refusal_time(port, name):
    t0 = time.perf_counter()
    s = connect(port)
    s.sendall(frame(alive2(name, port=40001)))
    reply = read_to_eof(s, 30)
    took = time.perf_counter() - t0
    s.close()
    assert reply[:2] == b"v\x01", reply
    return took


def measure(port, errlog, reps, name):
    out = {}
    for netlink in (True, False):
        runs = [status_time(port, netlink)[0] for _ in range(reps)]
        out["status" if netlink else "status /proc"] = runs
    before = len(errlog.read_bytes())
    runs = [refusal_time(port, name) for _ in range(reps)]
    out["refusal"] = runs       # the first one makes the look-up (D25)
    time.sleep(0.3)
    lines = [line for line in errlog.read_bytes()[before:].decode("utf-8", "replace").splitlines()
             if "refused ALIVE2_REQ" in line]
    return out, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=50000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import tempfile
    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    errlog = tmp / "epmd.err"
    with open(errlog, "wb") as err:
        daemon = subprocess.Popen([sys.executable, str(EPMD_PY), "-port", str(port), "-address",
                                   "127.0.0.1"], stdout=err, stderr=err, env=base_env())
    try:
        time.sleep(0.5)
        results = {}
        holder, reply = register(port, "idle", port=40000)
        assert reply[:2] == b"v\x00", reply
        results["idle"] = measure(port, errlog, args.reps, "idle") + (established_count(),)
        holder.close()
        t0 = time.perf_counter()
        with ManyConnections(args.connections):
            made = time.perf_counter() - t0
            # a holder registered now: its first refusal makes the look-up
            holder, reply = register(port, "busy", port=40000)
            assert reply[:2] == b"v\x00", reply
            results["%d connections" % args.connections] = (
                measure(port, errlog, args.reps, "busy") + (established_count(),))
            holder.close()
        print("made %d connections in %.1f s" % (args.connections, made))
        for case, (out, lines, tcp) in results.items():
            print("%s (TCP sockets in use: %d):" % (case, tcp))
            for what, runs in out.items():
                print("  %-13s median %7.1f ms  max %7.1f ms" % (
                    what, statistics.median(runs) * 1000, max(runs) * 1000))
            for line in lines[:1] + lines[-1:]:
                print("  D25 line: %s" % line.split(": ", 2)[-1])
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(5)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How long a SIGUSR2 hand-over keeps epmd.py from serving (issue 22).

    python3 -m tests.tools.handover_pause [--nodes 10000] [--reexecs 7] [--form script|module]
                                          [--epmd FILE]

Starts epmd.py (the script `python3 epmd.py`, or `python3 -m epmd` in the
file's folder, byte-compiled first), pinned to CPU 0, registers --nodes
raw-socket nodes, then runs a probe process on CPU 1 that sends one
PORT_PLEASE2_REQ (on a new connection) every --interval seconds and notes
when each answer came, while SIGUSR2 is sent --reexecs times, one at a time
(each waits for the new image's "connections restored" line).

The time not serving of one hand-over: the longest gap between two answered
lookups in the window from the signal to the end of that hand-over (so to
within one probe interval, 1 ms by default: every lookup sent meanwhile
waits in the listening socket's queue and is answered by the new image).
"signal to serving": from the signal to the first answer after that gap.
Prints each hand-over and the median and spread; --json prints a JSON
object instead.  The same measurement is make bench's figure "handover"
(tests/tools/bench.py, fig_handover).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import helpers

ROOT = helpers.ROOT


def restored(d):
    return d.stderr().count("connections restored")


def start_daemon(form, epmd_py, tmp, nodes):
    """Start epmd.py as *form* on a free port, pinned to CPU 0, with room for
    *nodes* registrations; return the helpers.Daemon, started."""
    port = helpers.free_port()
    d = helpers.Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"],
                       helpers.base_env(), tmp)
    cwd = None
    if form == "module":
        subprocess.run([sys.executable, "-m", "py_compile", str(epmd_py)], check=True)
        d.exe = [sys.executable, "-m", epmd_py.stem]
        cwd = str(epmd_py.parent)
    else:
        d.exe = [sys.executable, str(epmd_py)]
    d.cpu = 0
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    d.nofile = (hard, hard)
    if cwd is not None:
        here = os.getcwd()
        os.chdir(cwd)
        try:
            d.start()
        finally:
            os.chdir(here)
    else:
        d.start()
    return d


def register_many(port, count):
    """*count* raw-socket nodes (names h00000...), their sockets."""
    socks = []
    for i in range(count):
        s, reply = helpers.register(port, "h%05d" % i, port=10000 + i % 50000)
        if reply[:2] != b"v\x00":
            s.close()
            raise RuntimeError("registration %d refused: %r" % (i, reply))
        socks.append(s)
    return socks


def measure(d, interval, after=0.5, timeout=30.0):
    """SIGUSR2 to *d* with the probe running; return {pause, signal_to_serving,
    answers, failed} of that hand-over (seconds)."""
    n = restored(d)
    t_sig = time.monotonic() + 0.3
    spec = {"port": d.port, "name": "h00000", "interval": interval, "stop_at": t_sig + 60}
    p = subprocess.Popen([sys.executable, "-m", "tests.tools.handover_pause", "--probe",
                          json.dumps(spec)], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                         cwd=str(ROOT), preexec_fn=lambda: helpers.pin(1))
    try:
        time.sleep(max(0.0, t_sig - time.monotonic()))
        t_sig = time.monotonic()
        os.kill(d.pid, signal.SIGUSR2)
        ok = helpers.wait_until(lambda: restored(d) > n, timeout, step=0.01)
        time.sleep(after)
        t_end = time.monotonic()
        p.stdin.write(b"%r\n" % t_end)
        p.stdin.close()
        res = json.loads(p.stdout.read())
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    if not ok:
        raise RuntimeError("no hand-over within %g s: %s" % (timeout, d.stderr()[-2000:]))
    done = [a for s, a in res["answers"]]
    before = [a for a in done if a < t_sig]
    if not before:
        raise RuntimeError("no lookup answered before the signal")
    times = [before[-1]] + [a for a in done if a >= t_sig]
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    if not gaps:
        raise RuntimeError("no lookup answered after the signal")
    pause, back = max(gaps)
    return {"pause": pause, "signal_to_serving": back - t_sig, "answers": len(done),
            "failed": res["failed"]}


def run(nodes, reexecs, form, epmd_py, interval=0.001):
    """Start a daemon, register *nodes*, make *reexecs* hand-overs; return
    the list of measure()'s dicts."""
    tmp = Path(tempfile.mkdtemp(prefix="epmd-pause-"))
    d = None
    socks = []
    try:
        d = start_daemon(form, epmd_py, tmp, nodes)
        socks = register_many(d.port, nodes)
        out = []
        for _ in range(reexecs):
            out.append(measure(d, interval))
        if sorted(helpers.registered(d.port)) != sorted(b"h%05d" % i for i in range(nodes)):
            raise RuntimeError("the nodes are not all registered after the hand-overs")
        return out
    finally:
        for s in socks:
            s.close()
        if d is not None:
            d.stop()
        shutil.rmtree(str(tmp), ignore_errors=True)


def probe_main(spec):
    """--probe: run until a line on stdin gives the monotonic end, or stop_at."""
    import threading
    end = [spec["stop_at"]]

    def read_end():
        line = sys.stdin.readline()
        if line.strip():
            end[0] = float(line)
    threading.Thread(target=read_end, daemon=True).start()
    req = helpers.frame(b"z" + spec["name"].encode())
    out, failed = [], 0
    interval = spec["interval"]
    next_at = time.monotonic()
    while time.monotonic() < end[0]:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        next_at += interval
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", spec["port"]), timeout=10) as s:
                s.sendall(req)
                reply = b""
                while True:
                    data = s.recv(4096)
                    if not data:
                        break
                    reply += data
        except OSError:
            reply = b""
        t1 = time.monotonic()
        if reply[:2] == b"w\x00":
            out.append((t0, t1))
        else:
            failed += 1
        if next_at < t1:
            next_at = t1
    print(json.dumps({"answers": out, "failed": failed}))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe_main(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--reexecs", type=int, default=7)
    p.add_argument("--form", choices=("script", "module"), default="script")
    p.add_argument("--epmd", type=Path, default=ROOT / "epmd.py", help="the epmd.py to run")
    p.add_argument("--interval", type=float, default=0.001, help="seconds between lookups")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.nodes, a.reexecs, a.form, a.epmd.resolve(), a.interval)
    pauses = [r["pause"] * 1000 for r in res]
    serving = [r["signal_to_serving"] * 1000 for r in res]
    if a.json:
        print(json.dumps({"runs": res, "pause_ms_median": statistics.median(pauses)}))
        return 0
    for i, r in enumerate(res):
        print("hand-over %d: not serving %.1f ms, signal to serving %.1f ms, %d answered, %d failed"
              % (i + 1, r["pause"] * 1000, r["signal_to_serving"] * 1000, r["answers"],
                 r["failed"]))
    print("%s, %d nodes, %d hand-overs: not serving median %.1f ms (min %.1f, max %.1f); "
          "signal to serving median %.1f ms (min %.1f, max %.1f)"
          % (a.form, a.nodes, len(res), statistics.median(pauses), min(pauses), max(pauses),
             statistics.median(serving), min(serving), max(serving)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

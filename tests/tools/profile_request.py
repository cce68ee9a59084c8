#!/usr/bin/env python3
"""Profile epmd.py's common request: PORT_PLEASE2_REQ, from wake-up to close.

    python3 -m tests.tools.profile_request [--n N] [--conc C] [--top K] [--epmd PATH]
    python3 -m tests.tools.profile_request --callgrind [--n N] [--conc C] [--epmd PATH]

--epmd profiles another copy of epmd.py (an older version, to compare).

Default (cProfile): an Epmd runs in this process, on a free loopback port,
under cProfile, from its first select() to KILL_REQ.  A client process (this
script's --client mode, pinned to the other CPU when there are two) registers
a node, sends N PORT_PLEASE2_REQ for it, C connections at a time, checks every
reply byte for byte, closes its node and sends KILL_REQ.  Printed: every
function called at least N/2 times (the per-request path), with its calls
per request, and its own and cumulative time per request (microseconds,
inflated by the profiler, so compare them only with each other).  Call counts
are deterministic for C=1; for larger C they depend on how many events each
select() returns.

--callgrind: the daemon runs as its own process (python3 epmd.py) under
``valgrind --tool=callgrind``, once with N and once with 2N requests; the
difference of the instructions executed, divided by N, is the daemon's user
space instructions per request, independent of the machine's load (and,
with PYTHONHASHSEED=0, of the interpreter's hash seed).
Standard library and helpers.py only.
"""

import argparse
import cProfile
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import helpers
from tests.helpers import frame, free_port, pin


NODE = "prof"
NODE_PORT = 4242


def expected_reply():
    """The PORT2_RESP of the node the client registers (helpers.alive2 defaults)."""
    name = NODE.encode()
    return (b"w\x00" + helpers.U16.pack(NODE_PORT) + bytes((77, 0))
            + helpers.U16.pack(6) + helpers.U16.pack(5) + helpers.U16.pack(len(name)) + name
            + helpers.U16.pack(0))


CHURN_NAMES = 1000      # names the churn cycles go round (each closed long before it returns)


def churn_client(port, n):
    """*n* register/unregister cycles, one at a time: connect, ALIVE2_REQ,
    read ALIVE2_X_RESP, close; then KILL_REQ once the last is gone."""
    t0 = time.perf_counter()
    ok = 0
    for i in range(n):
        s, reply = helpers.register(port, "churn%d" % (i % CHURN_NAMES), port=NODE_PORT)
        ok += reply[:2] == b"v\x00"
        s.close()
    secs = time.perf_counter() - t0
    helpers.wait_until(lambda: helpers.registered_or_empty(port) == [], 10)
    assert helpers.request(port, b"k") == b"OK"
    return {"ok": ok, "failed": n - ok, "bad": 0, "seconds": secs}


def client(port, n, conc):
    """Register the node, send *n* PORT_PLEASE2_REQ, unregister, KILL_REQ;
    with *conc* 0, churn_client's *n* cycles instead."""
    if conc == 0:
        return churn_client(port, n)
    node, reply = helpers.register(port, NODE, port=NODE_PORT)
    assert reply[:2] == b"v\x00", reply
    want = expected_reply()
    t0 = time.perf_counter()
    res = helpers.run_requests(port, [frame(b"z" + NODE.encode())] * n, conc=conc,
                               check=lambda i, r: r == want)
    secs = time.perf_counter() - t0
    node.close()
    helpers.wait_until(lambda: helpers.registered_or_empty(port) == [], 10)
    assert helpers.request(port, b"k") == b"OK"
    return {"ok": res["ok"], "failed": res["failed"], "bad": res["bad"], "seconds": secs}


def start_client(port, n, conc):
    return subprocess.Popen([sys.executable, "-m", "tests.tools.profile_request", "--client", str(port),
                             str(n), str(conc)], stdout=subprocess.PIPE, preexec_fn=lambda: pin(1),
                            cwd=str(helpers.ROOT))


def check_client(proc, n):
    out = json.loads(proc.communicate(timeout=600)[0])
    if out["ok"] != n:
        sys.exit("client: %r" % out)
    return out


def load_epmd(path):
    """Import the epmd.py at *path* as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("epmd", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile(n, conc, top, path):
    epmd = load_epmd(path)
    port = free_port()
    e = epmd.Epmd(port=port, address="127.0.0.1", log=epmd.DebugLog(0))
    e.bind()
    pin(0)
    proc = start_client(port, n, conc)
    prof = cProfile.Profile()
    prof.enable()
    code = e.run()
    prof.disable()
    out = check_client(proc, n)
    assert code == 0
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():
        if nc >= n / 2:
            where = func if filename == "~" else "%s:%d(%s)" % (Path(filename).name, line, func)
            rows.append((ct, nc, tt, where))
    rows.sort(key=lambda r: (-r[0], r[3]))
    total_tt = sum(v[2] for v in stats.stats.values())
    waited = sum(v[2] for k, v in stats.stats.items() if k[2] == "<method 'poll' of 'select.epoll' objects>")
    print("# cProfile of epmd.py, %d %s, %d at a time, Python %s; %d ok"
          % (n, "register/unregister cycles" if conc == 0 else "PORT_PLEASE2_REQ", max(conc, 1),
             sys.version.split()[0], out["ok"]))
    print("# profiled time per request, without the wait in epoll (inflated by the profiler): %.1f us"
          % ((total_tt - waited) / n * 1e6))
    print("%8s %10s %10s  %s" % ("calls/req", "own us/req", "cum us/req", "function"))
    for ct, nc, tt, where in rows[:top]:
        print("%8.2f %10.2f %10.2f  %s" % (nc / n, tt / n * 1e6, ct / n * 1e6, where))
    calls = sum(nc for _, nc, _, _ in rows)
    print("# function calls per request (functions called >= N/2 times): %.1f" % (calls / n))


def callgrind_run(n, conc, tmp, path=helpers.EPMD_PY):
    port = free_port()
    outfile = os.path.join(tmp, "cg.%d" % n)
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + outfile,
            sys.executable, str(path), "-port", str(port), "-address", "127.0.0.1"]
    d = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=helpers.base_env(PYTHONHASHSEED="0"),
                         preexec_fn=lambda: pin(0))
    try:
        if not helpers.wait_until(lambda: helpers.names_or_none(port) is not None, 60, 0.2):
            sys.exit("the daemon under valgrind did not start")
        proc = start_client(port, n, conc)
        check_client(proc, n)
        if d.wait(120) != 0:
            sys.exit("the daemon exited with %s" % d.returncode)
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
    with open(outfile) as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                return int(m.group(1))
    sys.exit("no totals in " + outfile)


def callgrind(n, conc, path):
    with tempfile.TemporaryDirectory() as tmp:
        i1 = callgrind_run(n, conc, tmp, path)
        i2 = callgrind_run(2 * n, conc, tmp, path)
    print("# callgrind, %s daemon, %s, %d at a time, Python %s"
          % (path, "register/unregister cycles" if conc == 0 else "PORT_PLEASE2_REQ", max(conc, 1),
             sys.version.split()[0]))
    print("instructions: %d requests %d, %d requests %d; per request %.0f"
          % (n, i1, 2 * n, i2, (i2 - i1) / n))


def main(argv):
    if argv[:1] == ["--client"]:
        print(json.dumps(client(int(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--conc", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--epmd", type=Path, default=helpers.EPMD_PY)
    ap.add_argument("--churn", action="store_true",
                    help="register/unregister cycles instead of PORT_PLEASE2_REQ")
    a = ap.parse_args(argv)
    if a.churn:
        a.conc = 0
    if a.callgrind:
        callgrind(a.n, a.conc, a.epmd.resolve())
    else:
        profile(a.n, a.conc, a.top, a.epmd.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

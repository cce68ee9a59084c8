#!/usr/bin/env python3
"""Benchmark epmd.py side by side with OTP's epmd (when installed).

    python3 -m tests.tools.bench [--reps N] [--dur SECONDS] [--only FIGURE,...] [--baseline OLD_EPMD_PY]

Starts each daemon fresh for every run on a free loopback port, pinned to CPU
0 (the load generator to CPU 1 when there are two), interleaving the daemons
run by run, and prints one table: for each figure the median over the runs
for both daemons, their ratio, and the target.  The load generator is this
script's own worker mode: several processes, each a selectors loop of
non-blocking clients.  Every reply is compared with the expected bytes; a
wrong or missing reply fails the run (exit status 1).  Daemon CPU is user +
system time from /proc/PID/stat; memory is VmRSS from /proc/PID/status.
Standard library only.

Figures:
  port     daemon CPU per PORT_PLEASE2 request, 32 concurrent clients, closed loop
  fixed    daemon CPU at a paced 5,000 PORT_PLEASE2 requests/s
  lat      single-client PORT_PLEASE2 round trip, median
  names    NAMES requests/s with 100 nodes registered (achieved, and per
           second of daemon CPU)
  churn    daemon CPU per register/unregister cycle, 32 concurrent clients,
           closed loop, each cycle connect -> ALIVE2_REQ with a fresh name ->
           ALIVE2_X_RESP with result 0 -> close (../shared/bench's loadgen -m
           churn); its user part and the cycles/s achieved; NAMES must then
           list none of the names
  capacity registrations held at RLIMIT_NOFILE 20,000
  memory   daemon RSS growth per registered node, at 10,000 nodes
  startup  process start to accepting connections, median
  burst    500 registrations and 5,000 PORT_PLEASE2 requests started within
           100 ms by BURST_WORKERS processes (not pinned: a burst takes the
           whole machine): seconds until the last reply is in (a SYN the
           kernel drops in the rush adds its 1 s retransmission) and until
           99% are, requests without a (right) reply, and the daemon's peak
           RSS (VmHWM)
  forms    each way of running it (the script `python3 epmd.py`, `python3 -m
           epmd` in its folder, `make install`'s launcher; OTP's binary):
           `-names` wall time per call, start to serving, idle daemon RSS,
           beside the floor (`python3 -c "import socket, selectors"`, start
           to exit; its RSS with the daemon's imports, asleep), medians of
           --form-runs rounds (default 20); with --baseline its script form
           too, in the same rounds
  handover 10,000 nodes through a SIGUSR2 hand-over (re-exec): seconds not
           serving (the longest gap between answered lookups of a 1 ms
           probe), median of 5 hand-overs, as the script and as -m; OTP's
           epmd has none
The port, lat and churn figures also measure tests/tools/floor_server.py,
the least a Python selectors loop does per request (no checks, no log), in
the same run: the rows "the floor" show what Python itself costs beside OTP.

Targets (issue 22; ratios epmd.py / OTP's epmd in the same run): daemon CPU
per PORT_PLEASE2 at 32 clients <= 0.9x, at a paced 5,000 req/s <= 1.0x,
single-client round trip <= 1.0x, per churn cycle <= 1.0x; NAMES per daemon
CPU-second >= 5x; >= 19,000 registrations held, <= 1 kB per node; 10,000
nodes through a hand-over <= 0.2 s not serving.  With --baseline, the
script form's -names and start to serving <= 1.0x the baseline's.  The
table prints every row's target (ROWS).
"""

import argparse
import atexit
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import helpers
from tests.helpers import U16, U32, frame, free_port, proc_cpu_split, proc_hwm_kb, proc_rss_kb

ROOT = helpers.ROOT
NODE_PORT = 4242
BASELINE = None     # --baseline: another epmd.py measured in the same run ("before")
BURST_NODES = 500                   # registrations in the burst
BURST_LOOKUPS = 5000                # PORT_PLEASE2_REQ in the burst
BURST_SPREAD = 0.1                  # seconds over which the burst starts
BURST_WORKERS = 4                   # load processes


def alive2(name, port=NODE_PORT):
    return helpers.alive2(name, port=port)


def port2_reply(name, port=NODE_PORT):
    name = name.encode()
    return b"w\x00" + struct.pack(">HBBHHH", port, 77, 0, 6, 5, len(name)) + name + U16.pack(0)


# -- the load generator (worker processes) ---------------------------------------

def worker(spec):
    """Run one load-generating process; return its counts and latencies.

    spec: port, request (framed, hex), expected reply (hex), conc (clients),
    start_at and stop_at (time.time()), rate (requests/s, 0 = closed loop),
    lat (record latencies); mode "alive2" (the churn figure): see below.
    """
    port, req, expected = spec["port"], bytes.fromhex(spec["request"]), bytes.fromhex(spec["expected"])
    # mode "alive2" (churn, issue 22): every start sends an ALIVE2_REQ with a
    # fresh name (spec["tag"] and a counter) instead of *req*; the reply is
    # complete at 6 bytes, an ALIVE2_X_RESP with result 0 (any creation), and
    # the client then closes, which unregisters the name
    churn = spec.get("mode") == "alive2"
    seq = [0]

    def churn_req():
        seq[0] += 1
        return frame(alive2("%s%d" % (spec["tag"], seq[0])))

    def churn_ok(reply):
        return len(reply) == 6 and reply[:2] == b"v\x00"
    conc, rate = spec["conc"], spec["rate"]
    sel = selectors.DefaultSelector()
    ok = errors = 0
    lats = []
    active = {}
    while time.time() < spec["start_at"]:
        time.sleep(0.001)
    t_end = spec["stop_at"]
    next_start = time.monotonic()
    interval = 1.0 / rate if rate else 0.0
    addr = ("127.0.0.1", port)

    def launch():
        s = socket.socket()
        t0 = time.perf_counter()
        try:
            s.connect(addr)
            s.sendall(churn_req() if churn else req)
        except OSError:
            s.close()
            return False
        s.setblocking(False)
        active[s] = [t0, []]
        sel.register(s, selectors.EVENT_READ)
        return True

    while True:
        now_wall = time.time()
        if now_wall >= t_end and not active:
            break
        if now_wall < t_end:
            if rate:
                now = time.monotonic()
                while next_start <= now and len(active) < conc:
                    if not launch():
                        errors += 1
                    next_start += interval
            else:
                while len(active) < conc:
                    if not launch():
                        errors += 1
                        break
        timeout = 0.05
        if rate and now_wall < t_end:
            timeout = max(0.0, min(timeout, next_start - time.monotonic()))
        for key, _ in sel.select(timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                active[s][1].append(data)
                if not churn or sum(map(len, active[s][1])) < 6:
                    continue
            t0, chunks = active.pop(s)
            sel.unregister(s)
            s.close()
            reply = b"".join(chunks)
            if churn_ok(reply) if churn else reply == expected:
                ok += 1
                if spec["lat"]:
                    lats.append(time.perf_counter() - t0)
            else:
                errors += 1
        if time.time() > t_end + 10:
            errors += len(active)
            break
    return {"ok": ok, "errors": errors, "lats": lats}


# -- daemons ------------------------------------------------------------------------

def otp_epmd():
    """OTP's epmd binary ($EPMD_BENCH_OTP, or as the tests find it), or None."""
    return os.environ.get("EPMD_BENCH_OTP") or helpers.OTP_EPMD


TMP = None          # where the daemons' stderr goes (helpers.Daemon keeps it in a file)


# The floor: tests/tools/floor_server.py, the least a Python selectors loop does
# per request, measured in the same run for these figures (rows "floor:KEY")
FLOOR_SERVER = ROOT / "tests" / "tools" / "floor_server.py"
FLOOR_FIGURES = ("port", "lat", "churn")


def Daemon(impl):
    """A helpers.Daemon of *impl* ("py", "otp", "base" for --baseline, or
    "floor", FLOOR_SERVER) on a
    free loopback port, pinned to CPU 0 with RLIMIT_NOFILE at its hard limit,
    started and polled every 0.5 ms until it answers NAMES_REQ, so that
    d.ready_after (process start to accepting connections) is exact to that."""
    global TMP
    if TMP is None:
        TMP = Path(tempfile.mkdtemp(prefix="epmd-bench-"))
        atexit.register(shutil.rmtree, str(TMP), True)
    port = free_port()
    d = helpers.Daemon("otp" if impl == "otp" else "py", port,
                       ["-port", str(port), "-address", "127.0.0.1"], helpers.base_env(), TMP)
    d.exe = {"py": [sys.executable, str(ROOT / "epmd.py")], "base": [sys.executable, str(BASELINE)],
             "otp": [otp_epmd()], "floor": [sys.executable, str(FLOOR_SERVER)]}[impl]
    d.cpu = 0
    d.nofile = (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2
    t_spawn = time.perf_counter()
    d.start(wait=False)
    deadline = t_spawn + 10
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(frame(b"n"))
                if s.recv(4) == U32.pack(port):
                    d.ready_after = time.perf_counter() - t_spawn
                    return d
        except OSError:
            time.sleep(0.0005)
    d.stop()
    raise RuntimeError("%s did not start" % impl)


class RunError(Exception):
    pass


def register(port, name):
    s, reply = helpers.register(port, name, port=NODE_PORT)
    if reply[:2] != b"v\x00":
        s.close()
        raise RunError("registration of %s failed: %r" % (name, reply))
    s.settimeout(None)
    return s


def load(d, request, expected, conc, dur, rate=0, workers=2, lat=False, mode=None):
    """Run the workers against daemon *d*; return (ok, seconds, daemon cpu s, lats).
    mode "alive2": the workers' churn mode (names CHURN_PREFIX, the worker's
    number, "_", a counter; *request* and *expected* unused)."""
    start_at = time.time() + 0.3
    spec = {"port": d.port, "request": request.hex(), "expected": expected.hex(), "rate": rate,
            "start_at": start_at, "stop_at": start_at + dur, "lat": lat}
    procs = []
    for i in range(workers):
        w = dict(spec, conc=max(1, conc // workers) + (1 if i < conc % workers else 0),
                 rate=rate / workers if rate else 0)
        if mode:
            w.update(mode=mode, tag="%s%d_" % (CHURN_PREFIX, i))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tools.bench", "--worker", json.dumps(w)],
                                      stdout=subprocess.PIPE, preexec_fn=lambda: helpers.pin(1),
                                      cwd=str(ROOT)))
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = proc_cpu_split(d.pid)
    time.sleep(dur)
    cpu1 = proc_cpu_split(d.pid)
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    if errors:
        raise RunError("%d wrong or failed replies from %s" % (errors, d.impl))
    lats = [x for r in results for x in r["lats"]]
    d.user_cpu = cpu1[0] - cpu0[0]
    return ok, dur, sum(cpu1) - sum(cpu0), lats


# -- figures --------------------------------------------------------------------------

def lookups(impl, conc, dur, **kw):
    """PORT_PLEASE2_REQ load (load's keywords *kw*) for *dur* seconds from
    *conc* clients on a fresh daemon of *impl* with the node "bench"
    registered; returns (ok, seconds, daemon CPU s, latencies, daemon user
    CPU s)."""
    d = Daemon(impl)
    try:
        node = register(d.port, "bench")
        ok, dur, cpu, lats = load(d, frame(b"zbench"), port2_reply("bench"), conc, dur, **kw)
        node.close()
        return ok, dur, cpu, lats, d.user_cpu
    finally:
        d.stop()


def fig_port(impl, a):
    ok, dur, cpu, _, user = lookups(impl, 32, a.dur)
    return {"port_us": cpu / ok * 1e6, "port_user_us": user / ok * 1e6, "port_rate": ok / dur}


def fig_fixed(impl, a):
    ok, dur, cpu, _, _ = lookups(impl, 32, a.dur, rate=5000)
    if ok < 0.95 * 5000 * dur:
        raise RunError("%s served %d of %d paced requests" % (impl, ok, 5000 * dur))
    return {"fixed_cpu": cpu / dur * 100}


def fig_lat(impl, a):
    _, _, _, lats, _ = lookups(impl, 1, min(a.dur, 3), workers=1, lat=True)
    return {"lat_us": statistics.median(lats) * 1e6}


def fig_names(impl, a):
    d = Daemon(impl)
    try:
        nodes = [register(d.port, "node%03d" % i) for i in range(100)]
        expected = U32.pack(d.port) + b"".join(b"name node%03d at port %d\n" % (i, NODE_PORT)
                                               for i in reversed(range(100)))
        ok, dur, cpu, _ = load(d, frame(b"n"), expected, 32, a.dur)
        for s in nodes:
            s.close()
        return {"names_rate": ok / dur, "names_cpu_rate": ok / cpu if cpu else float("inf")}
    finally:
        d.stop()


# -- churn: register/unregister cycles (issue 22), as ../shared/bench's loadgen -m churn --

CHURN_PREFIX = "churn"              # the churned names: churn<worker>_<n>
CHURN_CLIENTS = 32                  # concurrent clients, closed loop
CHURN_SETTLE = 10.0                 # seconds NAMES may take to show the last closes


def churned_left(port):
    """How many churned names NAMES still lists, polled every 50 ms for up to
    CHURN_SETTLE seconds until none (the daemon sees the last closes after
    the clients made them)."""
    deadline = time.monotonic() + CHURN_SETTLE
    while True:
        left = sum(1 for n in helpers.registered(port) if n.startswith(CHURN_PREFIX.encode()))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def fig_churn(impl, a):
    """CHURN_CLIENTS clients loop connect -> ALIVE2_REQ with a fresh name ->
    ALIVE2_X_RESP, result 0 -> close (= unregister) for --dur seconds;
    daemon CPU per completed cycle.  NAMES must then list none of the names."""
    d = Daemon(impl)
    try:
        ok, dur, cpu, _ = load(d, b"", b"", CHURN_CLIENTS, a.dur, mode="alive2")
        if not ok:
            raise RunError("no register/unregister cycle completed with %s" % impl)
        left = churned_left(d.port)
        if left:
            raise RunError("%d churned names still listed by %s %g s after the run"
                           % (left, impl, CHURN_SETTLE))
        return {"churn_us": cpu / ok * 1e6, "churn_user_us": d.user_cpu / ok * 1e6,
                "churn_rate": ok / dur}
    finally:
        d.stop()


def fig_capacity(impl, a):
    """Registrations held with the daemon's RLIMIT_NOFILE at 20,000 (or the
    hard limit if lower), and RSS growth per node at 10,000."""
    d = Daemon(impl)
    socks = []
    out = {}
    try:
        rss0 = proc_rss_kb(d.pid)
        limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20000) - 60
        for i in range(limit):
            try:
                s = register(d.port, "cap%05d" % i)
            except (OSError, RunError):
                break
            socks.append(s)
            if len(socks) == 10000:
                time.sleep(0.2)
                out["mem_kb"] = (proc_rss_kb(d.pid) - rss0) / 10000
        out["capacity"] = len(socks)
        if len(socks) < 10000:
            out["mem_kb"] = float("nan")
        return out
    finally:
        for s in socks:
            s.close()
        d.stop()


def fig_startup(impl, a):
    times = []
    for _ in range(10):
        d = Daemon(impl)
        times.append(d.ready_after)
        d.stop()
    return {"startup_ms": statistics.median(times) * 1000}


def burst_requests(worker, workers):
    """Worker *worker*'s share of the burst: its registrations (node names
    b000..b499, every workers-th) spread among its lookups of any of the
    500 names; returns (requests, indices of the registrations)."""
    names = ["b%03d" % i for i in range(worker, BURST_NODES, workers)]
    lookups = BURST_LOOKUPS // workers + (1 if worker < BURST_LOOKUPS % workers else 0)
    every = max(1, (lookups + len(names)) // max(1, len(names)))
    reqs, regs = [], []
    for j in range(lookups):
        if j % every == 0 and len(regs) < len(names):
            regs.append(len(reqs))
            reqs.append(("reg", names[len(regs) - 1]))
        reqs.append(("port", "b%03d" % ((j * 7 + worker) % BURST_NODES)))
    for name in names[len(regs):]:
        regs.append(len(reqs))
        reqs.append(("reg", name))
    return reqs, regs


def burst_worker(spec):
    """One burst process: start its requests over BURST_SPREAD from
    start_at, check every reply (ALIVE2_X_RESP result 0; PORT2_RESP of the
    node, or 'w' 1 if it is not registered yet), hold the registrations
    until its last reply is in; return counts and times."""
    reqs, regs = burst_requests(spec["worker"], spec["workers"])
    framed = [frame(alive2(name)) if kind == "reg" else frame(b"z" + name.encode())
              for kind, name in reqs]

    def check(i, reply):
        kind, name = reqs[i]
        if kind == "reg":
            return len(reply) == 6 and reply[:2] == b"v\x00"
        return reply == b"w\x01" or reply == port2_reply(name)
    res = helpers.run_requests(spec["port"], framed, start_at=spec["start_at"],
                               spread=BURST_SPREAD, check=check, keep=regs, timeout=60)
    for s in res.pop("held"):
        s.close()
    return res


def fig_burst(impl, a):
    d = Daemon(impl)
    try:
        start_at = time.time() + 0.5
        procs = [subprocess.Popen([sys.executable, "-m", "tests.tools.bench", "--burst-worker",
                                   json.dumps({"port": d.port, "worker": i, "workers": BURST_WORKERS,
                                               "start_at": start_at})], stdout=subprocess.PIPE,
                                  cwd=str(ROOT))
                 for i in range(BURST_WORKERS)]
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        hwm = proc_hwm_kb(d.pid)
        answered = sorted(t for r in results for t in r["t_replies"])
        return {"burst_s": answered[-1] - start_at if answered else float("nan"),
                "burst_p99_s": (answered[int(0.99 * (len(answered) - 1))] - start_at
                                if answered else float("nan")),
                "burst_failed": sum(r["failed"] + r["bad"] for r in results),
                "burst_started_s": max(r["t_started"] or start_at for r in results) - start_at,
                "burst_hwm_kb": hwm}
    finally:
        d.stop()


# -- forms: each way epmd.py is run, beside the interpreter's floor (issue 22) --------

FORM_RUNS = 20                      # --form-runs: rounds of the forms figure (>= 10)
FLOOR = "import socket, selectors"  # the floor: the interpreter starting with these, to exit
# the floor's idle process: the daemon's own imports, asleep
FLOOR_IDLE = "import socket, selectors, signal, struct, sys, time; print(flush=True); time.sleep(60)"
FORM_IDLE = 0.5                     # seconds a daemon idles before its RSS is read
# --baseline: the medians of its script form, measured by fig_forms("py") in
# turn with epmd.py's forms (fig_forms("base") returns them)
FORMS_BEFORE = {}


def forms(impl, tmp):
    """The forms of *impl* to measure: {name: (argv before the options, cwd)}.
    "py": the script (`python3 epmd.py`, the copy-one-file form), the
    byte-compiled module (`python3 -m epmd` in the file's folder), and `make
    install`'s launcher (installed into *tmp* for this interpreter, when make
    works); "base": --baseline's script; "otp": OTP's binary."""
    if impl == "otp":
        return {"otp": ([otp_epmd()], None)}
    if impl == "base":
        return {"script": ([sys.executable, str(BASELINE)], None)}
    out = {"script": ([sys.executable, str(ROOT / "epmd.py")], None),
           "module": ([sys.executable, "-m", "epmd"], str(ROOT))}
    # the byte code of -m: its first run writes it, unless PYTHONDONTWRITEBYTECODE
    # is set or the folder is not writable; py_compile writes it in any case
    subprocess.run([sys.executable, "-m", "py_compile", str(ROOT / "epmd.py")], check=True)
    p = subprocess.run(["make", "-s", "-C", str(ROOT), "install", "PREFIX=%s" % tmp,
                        "PYTHON=%s" % sys.executable], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if p.returncode == 0:
        out["launcher"] = ([os.path.join(tmp, "bin", "epmd")], None)
    else:
        print("   forms: no launcher, make install failed: %s" % p.stderr.decode()[-300:],
              file=sys.stderr)
    return out


def on_cpu0():
    """preexec_fn of the forms' daemons and floor: CPU 0 when there are two
    (this section's own, so that it does not depend on the rest of the file)."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})


def form_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith("ERL_EPMD") and k not in ("PYTHONPATH", "EPMD_PY_CLIENT_TIMEOUT")}


def timed_run(argv, cwd=None):
    """Run *argv* to its exit; return the wall seconds (RunError if it fails)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, env=form_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.perf_counter() - t0
    if p.returncode != 0:
        raise RunError("%s exited with %d" % (" ".join(argv), p.returncode))
    return t


def serving(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(frame(b"n"))
            return s.recv(4) == U32.pack(port)
    except OSError:
        return False


def start_form(exe, cwd, otp=False):
    """Start a daemon as *exe* (in *cwd*) on a free port, pinned to CPU 0;
    return (the Popen, its port, seconds from spawn to answering NAMES_REQ).
    OTP's gets no -address: before erts 15.2.7.12 it binds 127.0.0.1 itself
    and then collides with the listed one (D17)."""
    port = free_port()
    args = ["-port", str(port)] + ([] if otp else ["-address", "127.0.0.1"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(exe + args, cwd=cwd, env=form_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=on_cpu0, close_fds=True)
    while not serving(port):
        if proc.poll() is not None or time.perf_counter() - t0 > 10:
            proc.kill()
            proc.wait()
            raise RunError("%s did not start" % " ".join(exe))
        time.sleep(0.0005)
    return proc, port, time.perf_counter() - t0


def fig_forms(impl, a):
    """-names wall time per call, start to serving, and idle RSS of each form
    of *impl*, FORM_RUNS rounds, the forms in turn within a round; with
    "py", the floor too (FLOOR start to exit, spawned as the daemons are,
    and FLOOR_IDLE's RSS). The clients ask one daemon started from the
    script and run on CPU 1 (the bench itself moves there, so that they
    are spawned as the floor is). Medians: client_ms_FORM, start_ms_FORM,
    rss_kb_FORM, floor_ms, floor_start_ms, floor_rss_kb.  With --baseline,
    "py" measures the baseline's script form too, in turn with its own in
    every round, and keeps its medians for "base" (FORMS_BEFORE)."""
    if impl == "base" and FORMS_BEFORE:
        return dict(FORMS_BEFORE)
    import tempfile
    tmp = tempfile.mkdtemp(prefix="epmd-bench-forms-")
    try:
        todo = forms(impl, tmp)
        if impl == "py":
            todo["floor"] = ([sys.executable, "-c", FLOOR], None)
            if BASELINE:
                todo["before"] = ([sys.executable, str(BASELINE)], None)
        d, port, _ = start_form([sys.executable, str(ROOT / "epmd.py")], None)
        mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if mask is not None and os.cpu_count() and os.cpu_count() > 1:
            os.sched_setaffinity(0, {1})
        vals = {}
        try:
            for rnd in range(-1, a.form_runs):      # round -1: warm-up (writes __pycache__)
                for form, (exe, cwd) in todo.items():
                    argv = exe if form == "floor" else exe + ["-port", str(port), "-names"]
                    t = timed_run(argv, cwd)
                    if rnd >= 0:
                        vals.setdefault("client_ms_" + form, []).append(t * 1000)
        finally:
            if mask is not None:
                os.sched_setaffinity(0, mask)
            helpers.stop_process(d)
        for _ in range(a.form_runs):
            for form, (exe, cwd) in todo.items():
                if form == "floor":
                    t0 = time.perf_counter()
                    p = subprocess.Popen(exe, env=form_env(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=on_cpu0, close_fds=True)
                    p.wait()
                    vals.setdefault("floor_start_ms", []).append((time.perf_counter() - t0) * 1000)
                    p = subprocess.Popen([sys.executable, "-c", FLOOR_IDLE], env=form_env(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         preexec_fn=on_cpu0, close_fds=True)
                    p.stdout.readline()
                    time.sleep(FORM_IDLE)
                    vals.setdefault("floor_rss_kb", []).append(proc_rss_kb(p.pid))
                    helpers.stop_process(p)
                    p.stdout.close()
                    continue
                proc, _, t = start_form(exe, cwd, otp=impl == "otp")
                try:
                    time.sleep(FORM_IDLE)
                    vals.setdefault("start_ms_" + form, []).append(t * 1000)
                    vals.setdefault("rss_kb_" + form, []).append(proc_rss_kb(proc.pid))
                finally:
                    helpers.stop_process(proc)
    finally:
        if os.path.exists(os.path.join(tmp, "bin", "epmd")):
            subprocess.run(["make", "-s", "-C", str(ROOT), "uninstall", "PREFIX=%s" % tmp],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    out = {k: statistics.median(v) for k, v in vals.items()}
    out["floor_ms"] = out.pop("client_ms_floor", None)
    if impl == "py" and BASELINE:       # the baseline's script form, for "base"
        FORMS_BEFORE.clear()
        FORMS_BEFORE.update({"%s_script" % what: out.pop("%s_before" % what)
                             for what in ("client_ms", "start_ms", "rss_kb")})
    if impl == "otp":       # OTP's one form, shown in the OTP column of each form's row
        for what in ("client_ms", "start_ms", "rss_kb"):
            v = out.pop(what + "_otp")
            out.update({"%s_%s" % (what, f): v for f in ("script", "module", "launcher")})
    return {k: v for k, v in out.items() if v is not None}


FIGURES = {
    "port": fig_port, "fixed": fig_fixed, "lat": fig_lat, "names": fig_names, "churn": fig_churn,
    "capacity": fig_capacity, "startup": fig_startup, "burst": fig_burst, "forms": fig_forms,
}

# key, label, target: a ratio epmd.py / OTP ("le", "ge"), an absolute value
# ("abs_le", "abs_ge"), a ratio epmd.py / before ("before_le", with --baseline
# only), the burst's rule, or a bound from the floor measured in the same run
# ("floor_plus": at most the floor's figure (its key given) + N; "floor_times":
# at most N times it); ("or_before_le", N, OTHER): "before_le" N with
# --baseline, else the target OTHER (None: none)
ROWS = [
    ("port_us", "daemon CPU us per PORT_PLEASE2 (32 clients, closed loop)", ("le", 0.9)),
    ("port_user_us", "  of which user (interpreter) us", ("before_le", 0.5)),
    ("port_rate", "  PORT_PLEASE2 req/s achieved (closed loop)", None),
    ("floor:port_us", "  the floor: tests/tools/floor_server.py, us", None),
    ("fixed_cpu", "daemon CPU % at 5,000 PORT_PLEASE2 req/s (paced)", ("le", 1.0)),
    ("lat_us", "single-client PORT_PLEASE2 round trip us, median", ("le", 1.0)),
    ("floor:lat_us", "  the floor: tests/tools/floor_server.py, us", None),
    ("names_cpu_rate", "NAMES req per daemon CPU-second, 100 nodes", ("ge", 5.0)),
    ("names_rate", "  NAMES req/s achieved (closed loop, 32 clients)", None),
    ("churn_us", "daemon CPU us per register/unregister cycle (32 clients)", ("le", 1.0)),
    ("churn_user_us", "  of which user (interpreter) us", None),
    ("churn_rate", "  cycles/s achieved", None),
    ("floor:churn_us", "  the floor: tests/tools/floor_server.py, us per cycle", None),
    ("capacity", "registrations held at RLIMIT_NOFILE 20,000", ("abs_ge", 19000)),
    ("mem_kb", "daemon RSS kB per registered node (10,000 nodes)", ("abs_le", 1.0)),
    ("startup_ms", "start-up ms, process start to serving, median", ("abs_le", 60.0)),
    ("burst_s", "burst: s until every reply is in (500 reg + 5,000 PORT_PLEASE2)", ("burst", 1.5)),
    ("burst_p99_s", "  s until 99% of the replies are in", None),
    ("burst_failed", "  requests without a right reply", ("abs_le", 0)),
    ("burst_started_s", "  s over which the load processes started them", None),
    ("burst_hwm_kb", "  daemon peak RSS kB (VmHWM)", None),
    ("floor_ms", "floor: python3 -c 'import socket, selectors' ms, start to exit", None),
    ("client_ms_script", "-names ms per call: python3 epmd.py (copy-one-file)",
     ("or_before_le", 1.0, None)),
    ("client_ms_module", "  python3 -m epmd (byte-compiled)", ("floor_plus", "floor_ms", 10.0)),
    ("client_ms_launcher", "  make install's launcher (byte-compiled)",
     ("floor_plus", "floor_ms", 10.0)),
    ("floor_start_ms", "floor ms, start to exit, spawned as the daemons", None),
    ("start_ms_script", "start to serving ms: python3 epmd.py", ("or_before_le", 1.0, None)),
    ("start_ms_module", "  python3 -m epmd", ("floor_plus", "floor_start_ms", 15.0)),
    ("start_ms_launcher", "  make install's launcher", ("floor_plus", "floor_start_ms", 15.0)),
    ("floor_rss_kb", "floor RSS kB: socket, selectors, signal, struct imported, asleep", None),
    ("rss_kb_script", "idle daemon RSS kB: python3 epmd.py", ("floor_times", "floor_rss_kb", 1.3)),
    ("rss_kb_module", "  python3 -m epmd", ("floor_times", "floor_rss_kb", 1.3)),
    ("rss_kb_launcher", "  make install's launcher", ("floor_times", "floor_rss_kb", 1.3)),
]


# -- handover: 10,000 nodes through a SIGUSR2 hand-over (issue 22) --------------------
# A block of its own (the figure, its rows): tests/tools/handover_pause.py
# measures; OTP's epmd has no hand-over (a restart loses every name), so its
# column stays empty.

HANDOVER_NODES = 10000              # raw-socket nodes registered
HANDOVER_RUNS = 5                   # hand-overs per run (the run's figure: their median)


def fig_handover(impl, a):
    """Time not serving across a SIGUSR2 hand-over with HANDOVER_NODES nodes:
    the longest gap between two answered PORT_PLEASE2_REQs of a 1 ms probe
    (on CPU 1; the daemon on CPU 0), median of HANDOVER_RUNS hand-overs in a
    row, as the script and as `python3 -m epmd`; none for OTP."""
    from tests.tools import handover_pause
    if impl == "otp":
        return {}
    epmd_py = Path(BASELINE).resolve() if impl == "base" else ROOT / "epmd.py"
    out = {}
    for form in ("script", "module"):
        if form == "module" and impl == "base":
            continue
        try:
            runs = handover_pause.run(HANDOVER_NODES, HANDOVER_RUNS, form, epmd_py)
        except RuntimeError as e:
            raise RunError("hand-over (%s): %s" % (form, e)) from None
        pauses = [r["pause"] for r in runs]
        if any(r["failed"] for r in runs):
            raise RunError("hand-over (%s): lookups failed" % form)
        key = "handover_s" if form == "script" else "handover_module_s"
        out[key] = statistics.median(pauses)
        out[key.replace("_s", "_max_s")] = max(pauses)
    return out


FIGURES["handover"] = fig_handover
ROWS += [
    ("handover_s", "hand-over: s not serving, 10,000 nodes, SIGUSR2 (OTP: none)", ("abs_le", 0.2)),
    ("handover_max_s", "  the slowest of %d hand-overs" % HANDOVER_RUNS, None),
    ("handover_module_s", "  s not serving as python3 -m epmd", None),
    ("handover_module_max_s", "  the slowest of %d, python3 -m epmd" % HANDOVER_RUNS, None),
]

def fmt(v):
    if v is None or v != v:
        return "-"
    return "%.0f" % v if abs(v) >= 100 else "%.2f" % v


def main(argv):
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--burst-worker"]:
        print(json.dumps(burst_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dur", type=float, default=5.0)
    ap.add_argument("--only", default=",".join(FIGURES))
    ap.add_argument("--form-runs", type=int, default=FORM_RUNS,
                    help="rounds of the forms figure (default %(default)s; medians want >= 10)")
    ap.add_argument("--baseline", metavar="EPMD_PY",
                    help="also measure this epmd.py (e.g. `git show REV:epmd.py > old.py`) in the same "
                         "run, as the column 'before', with the ratio of epmd.py to it")
    a = ap.parse_args(argv)
    global BASELINE
    BASELINE = a.baseline
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    impls = ["py"] + (["base"] if BASELINE else []) + (["otp"] if otp_epmd() else [])
    results = {impl: {} for impl in impls + ["floor"]}
    failed = False
    for name in a.only.split(","):
        fig = FIGURES[name]
        reps = 1 if name in ("capacity", "startup", "forms") else a.reps
        fig_impls = impls + (["floor"] if name in FLOOR_FIGURES else [])
        for rep in range(reps):
            order = fig_impls if rep % 2 == 0 else fig_impls[::-1]
            for impl in order:
                try:
                    r = fig(impl, a)
                except RunError as e:
                    print("!! %s %s rep %d: %s" % (name, impl, rep + 1, e), file=sys.stderr)
                    failed = True
                    continue
                for k, v in r.items():
                    results[impl].setdefault(k, []).append(v)
                print("   %-8s %-4s rep %d: %s" % (name, impl, rep + 1,
                                                   " ".join("%s=%s" % (k, fmt(v)) for k, v in r.items())),
                      file=sys.stderr, flush=True)
    print()
    print("# %s, %d cpus, Python %s; medians of %d runs (capacity and start-up: one run, start-up: "
          "median of 10 starts)" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(),
                                    sys.version.split()[0], a.reps))
    head = "%-60s %12s %12s %8s" % ("figure", "epmd.py", "OTP epmd", "ratio")
    if BASELINE:
        head += " %12s %8s" % ("before", "/before")
    print(head + "  target")
    all_met = True
    for key, label, target in ROWS:
        if target and target[0] == "or_before_le":
            target = ("before_le", target[1]) if BASELINE else target[2]
        impl = "py"
        if key.startswith("floor:"):        # the floor server's figure, beside OTP's
            impl, key = "floor", key[len("floor:"):]
        py = statistics.median(results[impl][key]) if results[impl].get(key) else None
        otp = (statistics.median(results["otp"][key])
               if "otp" in results and results["otp"].get(key) else None)
        ratio = py / otp if py is not None and otp else None
        tgt, met = "", None
        if target:
            sense, value = target[0], target[-1]
            if sense == "le" and ratio is not None:
                tgt, met = "ratio <= %g" % value, ratio <= value
            elif sense == "ge" and ratio is not None:
                tgt, met = "ratio >= %g" % value, ratio >= value
            elif sense == "abs_ge" and py is not None:
                tgt, met = ">= %g" % value, py >= value
            elif sense == "abs_le" and py is not None:
                tgt, met = "<= %g" % value, py <= value
            elif sense == "burst":
                # epmd.py answers all; the time counts where OTP answered all
                otp_ok = "otp" in results and not any(results["otp"].get("burst_failed", [1]))
                if ratio is not None and otp_ok:
                    tgt, met = "ratio <= %g" % value, ratio <= value
                else:
                    tgt = "OTP did not answer all"
        if target and target[0] in ("floor_plus", "floor_times"):
            sense, floor_key, value = target
            floor = statistics.median(results["py"][floor_key]) if results["py"].get(floor_key) else None
            if py is not None and floor is not None:
                bound = floor + value if sense == "floor_plus" else floor * value
                tgt = "<= floor %s %g = %s" % ("+" if sense == "floor_plus" else "x", value, fmt(bound))
                met = py <= bound
        base = None
        if BASELINE and impl == "py" and results["base"].get(key):
            base = statistics.median(results["base"][key])
        if target and target[0] == "before_le":
            if py is not None and base:
                tgt, met = "/before <= %g" % target[1], py / base <= target[1]
            else:
                tgt = "(--baseline)"
        if met is False:
            all_met = False
        row = "%-60s %12s %12s %8s" % (label, fmt(py), fmt(otp), fmt(ratio))
        if BASELINE:
            row += " %12s %8s" % (fmt(base), fmt(py / base if py is not None and base else None))
        print("%s  %s%s" % (row, tgt, "" if met is None else ("  met" if met else "  MISSED")))
    if failed:
        print("!! some runs failed (wrong or missing replies)")
        return 1
    print("all targets met" if all_met else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

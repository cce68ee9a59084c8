#!/usr/bin/env python3
"""Restarting epmd under load: epmd.py's hand-over beside OTP's epmd.

Standard library and tests/helpers.py only.  Scenarios (issue 11):

  reexec   epmd.py with N raw-socket nodes (mixed node types, extras, 16- and
           32-bit creations) and E real `erl` nodes, a PORT_PLEASE2_REQ load
           of R per second throughout, K re-execs (SIGUSR2) in a row: failed
           lookups, NAMES and DUMP identical, ALIVE2_REQs in the -d log, an
           impostor's ALIVE2_REQ during each re-exec, ping from a fresh node;
  flat     F more re-execs: descriptor count and RSS, first and last;
  kill9    epmd.py -systemd under the stand-in for systemd with the fd store
           (helpers.SystemdStandIn): kill -9 and restart; the gap and what
           came back;
  otp      OTP's epmd with the same nodes and load, killed and restarted (its
           only way to upgrade): how long names are missing, failed lookups,
           whether an impostor takes a live node's name.

    python3 -m tests.tools.handover_bench                      # the issue's figures
    python3 -m tests.tools.handover_bench --nodes 20 --erl 0 --rate 100 --reexecs 3 --flat 5
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path


from tests import helpers
from tests.helpers import (
    Daemon,
    LookupLoad,
    Nodes,
    SystemdStandIn,
    base_env,
    creation_of,
    dump,
    free_port,
    proc_fds,
    proc_rss_kb,
    register,
    register_mixed,
    registered,
    request,
    wait_until,
)


def loads(port, names, rate, threads):
    """*threads* LookupLoads sharing *rate* lookups per second."""
    ls = [LookupLoad(port, names[i::threads] or names, rate / threads) for i in range(threads)]
    for x in ls:
        x.started = time.monotonic()
        x.start()
    return ls


def totals(ls):
    for x in ls:
        x.stop()
    secs = time.monotonic() - min(x.started for x in ls)
    return {"lookups": sum(x.ok + x.failed for x in ls), "secs": secs,
            "missing": sum(x.missing for x in ls), "errors": sum(x.errors for x in ls),
            "slowest_ms": max(x.slowest for x in ls) * 1000,
            "fail_times": sorted(t for x in ls for t in x.fail_times)}


def ping_code(names):
    return ('[_, H] = string:split(atom_to_list(node()), "@"), '
            'io:format("PINGS ~p~n", [[net_adm:ping(list_to_atom(N ++ "@" ++ H)) || N <- %s]]), '
            'halt().' % ("[" + ",".join('"%s"' % n for n in names) + "]"))


def restored(d):
    return d.stderr().count("connections restored")


def start_erl(port, tmp, count):
    nodes = Nodes(port, tmp)
    names = [nodes.name("e%d" % i) for i in range(count)]
    for i in range(count):
        nodes.start("e%d" % i)
    if count and not wait_until(lambda: set(n.encode() for n in names) <= set(registered(port)), 90):
        raise RuntimeError("erl nodes did not register")
    return nodes, names


def run_reexec(args, tmp):
    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1", "-d"], base_env(), tmp)
    d.start()
    nodes = erl = None
    try:
        raw = register_mixed(port, args.nodes)
        erl, erl_names = start_erl(port, tmp, args.erl)
        live = [n["name"] for n in raw] + [n.encode() for n in erl_names]
        names0, dump0 = request(port, b"n"), dump(port)
        alive2 = d.stderr().count("** got ALIVE2_REQ")
        ls = loads(port, live, args.rate, args.threads)
        times, same, refused = [], 0, 0
        for k in range(args.reexecs):
            n = restored(d)
            t0 = time.monotonic()
            os.kill(d.pid, signal.SIGUSR2)
            s, reply = register(port, live[k % len(live)], port=1)
            s.close()
            refused += creation_of(reply) is None
            wait_until(lambda: restored(d) > n, 30, step=0.002)
            times.append(time.monotonic() - t0)
            same += request(port, b"n") == names0 and dump(port) == dump0
            time.sleep(args.pause)
        load = totals(ls)
        alive2_after = d.stderr().count("** got ALIVE2_REQ") - alive2 - args.reexecs
        pings = None
        if erl_names:
            _, out = erl.run("fresh", ping_code(erl_names))
            pings = "PINGS [%s]" % ",".join(["pong"] * len(erl_names)) in out
        fds, rss = [proc_fds(d.pid)], [proc_rss_kb(d.pid)]
        for _ in range(args.flat):
            n = restored(d)
            os.kill(d.pid, signal.SIGUSR2)
            wait_until(lambda: restored(d) > n, 30, step=0.002)
        fds.append(proc_fds(d.pid))
        rss.append(proc_rss_kb(d.pid))
        for n in raw:
            n["sock"].close()
        return {"load": load, "times": times, "same": same, "refused": refused,
                "alive2_again": alive2_after, "pings": pings, "fds": fds, "rss": rss,
                "pid_same": d.alive()}
    finally:
        if erl is not None:
            erl.close()
        d.stop()
        del nodes


def run_kill9(args, tmp):
    sd = SystemdStandIn(tmp, free_port(), ["-d"], limit=args.nodes + 16)
    try:
        sd.start()
        sd.wait_ready(1)
        raw = register_mixed(sd.port, args.nodes)
        live = [n["name"] for n in raw]
        wait_until(lambda: len(sd.stored_names()) == args.nodes + 1, 30)
        names0 = request(sd.port, b"n")
        ls = loads(sd.port, live, args.rate, args.threads)
        time.sleep(0.5)
        t0 = time.monotonic()
        sd.kill9()
        sd.start()
        sd.wait_ready(2, 30)
        gap = sd.messages[-1][0] - t0
        time.sleep(0.5)
        load = totals(ls)
        back = request(sd.port, b"n") == names0
        creations = []
        for n in raw[:2]:
            n["sock"].close()
            wait_until(lambda: n["name"] not in registered(sd.port))
            s, reply = register(sd.port, n["name"], highvsn=n["highvsn"])
            expect = ((n["creation"] + 1) & 0xFFFFFFFF if n["highvsn"] >= 6
                      else n["creation"] % 3 + 1)
            creations.append(creation_of(reply) == expect)
            s.close()
        for n in raw[2:]:
            n["sock"].close()
        return {"load": load, "gap": gap, "same": back, "creations": all(creations)}
    finally:
        sd.close()


def run_otp(args, tmp):
    if helpers.OTP_EPMD is None:
        return None
    port = free_port()
    d = Daemon("otp", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), tmp)
    d.start()
    erl = None
    try:
        raw = register_mixed(port, args.nodes)
        erl, erl_names = start_erl(port, tmp, args.erl)
        live = [n["name"] for n in raw] + [n.encode() for n in erl_names]
        ls = loads(port, live, args.rate, args.threads)
        time.sleep(0.5)
        t0 = time.monotonic()
        d.proc.kill()
        d.proc.wait(5)
        d.start(wait=False)
        d.wait_ready()
        up = time.monotonic() - t0
        s, reply = register(port, raw[0]["name"])
        impostor = creation_of(reply) is not None
        erl_back = None
        if erl_names:
            if wait_until(lambda: set(n.encode() for n in erl_names) <= set(registered(port)), 30):
                erl_back = time.monotonic() - t0
        time.sleep(args.window)
        load = totals(ls)
        s.close()
        back = len(set(registered(port)) & set(live))
        for n in raw:
            n["sock"].close()
        return {"load": load, "up": up, "erl_back": erl_back, "impostor": impostor,
                "back": back, "total": len(live)}
    finally:
        if erl is not None:
            erl.close()
        d.stop()


def report(args, py, k9, otp):
    rows = []

    def row(what, a, b):
        rows.append((what, a, b))
    L = py["load"]
    row("setup", "%d raw + %d erl nodes, %d lookups/s" % (args.nodes, args.erl, args.rate),
        "the same")
    row("how", "%d x SIGUSR2 (re-exec in place)" % args.reexecs, "kill -9, restart")
    row("lookups during / failed", "%d in %.1f s / %d (%d missing, %d errors)"
        % (L["lookups"], L["secs"], L["missing"] + L["errors"], L["missing"], L["errors"]),
        "-" if otp is None else "%d in %.1f s / %d (%d missing, %d errors)"
        % (otp["load"]["lookups"], otp["load"]["secs"],
           otp["load"]["missing"] + otp["load"]["errors"],
           otp["load"]["missing"], otp["load"]["errors"]))
    row("slowest lookup", "%.0f ms" % L["slowest_ms"],
        "-" if otp is None else "%.0f ms" % otp["load"]["slowest_ms"])
    row("signal -> new image serving", "mean %.0f ms, max %.0f ms"
        % (statistics.mean(py["times"]) * 1000, max(py["times"]) * 1000),
        "-" if otp is None else "%.0f ms until the new epmd answers" % (otp["up"] * 1000))
    row("NAMES and DUMP identical after", "%d of %d re-execs" % (py["same"], args.reexecs),
        "-" if otp is None else "%d of %d names back after %.1f s (raw nodes never)"
        % (otp["back"], otp["total"], args.window))
    if args.erl:
        row("erl nodes registered again", "%d ALIVE2_REQs" % py["alive2_again"],
            "-" if otp is None else (
                "after %.1f s" % otp["erl_back"] if otp["erl_back"] else "not within 30 s"))
        row("fresh node pings them", "yes" if py["pings"] else "NO", "-")
    row("impostor ALIVE2_REQ for a live name", "refused %d of %d" % (py["refused"], args.reexecs),
        "-" if otp is None else ("accepted" if otp["impostor"] else "refused"))
    row("fds / RSS over %d more re-execs" % args.flat, "%d -> %d fds, %d -> %d kB"
        % (py["fds"][0], py["fds"][1], py["rss"][0], py["rss"][1]), "-")
    row("kill -9 with systemd's fd store", "gap %.0f ms, %s, creations %s, %d lookups failed"
        % (k9["gap"] * 1000, "all names back" if k9["same"] else "NAMES DIFFER",
           "kept" if k9["creations"] else "CHANGED", k9["load"]["missing"] + k9["load"]["errors"]),
        "(no fd store: as above)")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "epmd.py", "")])
    print("%-*s  %-*s  %s" % (w0, "", w1, "epmd.py", "OTP's epmd"))
    for what, a, b in rows:
        print("%-*s  %-*s  %s" % (w0, what, w1, a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=200, help="raw-socket nodes (200)")
    p.add_argument("--erl", type=int, default=2, help="real erl nodes (2; 0 without erl)")
    p.add_argument("--rate", type=float, default=2000, help="lookups per second (2000)")
    p.add_argument("--threads", type=int, default=4, help="threads sending them (4)")
    p.add_argument("--reexecs", type=int, default=10, help="re-execs in a row (10)")
    p.add_argument("--flat", type=int, default=100, help="more re-execs for fds/RSS (100)")
    p.add_argument("--pause", type=float, default=0.3,
                   help="seconds of load between two re-execs (0.3)")
    p.add_argument("--window", type=float, default=3.0,
                   help="seconds OTP's epmd is watched after its restart (3)")
    args = p.parse_args(argv)
    if args.erl and helpers.ERL is None:
        args.erl = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = run_reexec(args, tmp)
        k9 = run_kill9(args, tmp)
        otp = run_otp(args, tmp)
    report(args, py, k9, otp)
    ok = (py["load"]["missing"] + py["load"]["errors"] == 0 and py["same"] == args.reexecs
          and py["refused"] == args.reexecs and py["alive2_again"] == 0 and k9["same"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

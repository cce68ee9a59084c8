#!/usr/bin/env python3
"""A node's close racing the next request: epmd.py beside OTP's epmd.

Each scenario of helpers.race_cycles is run --cycles times from one client
against a fresh daemon of each kind (epmd.py at level 0 and at -d -d, and
OTP's epmd), then again from --clients client processes at once, each on a
name of its own.  Prints, per daemon, how many ALIVE2_REQs were refused
right after the old registration ended (by FIN, by RST, by a byte then
FIN), how many PORT_PLEASE2_REQs right after a close got the dead node's
port, and how many ALIVE2_REQs for a live holder's name were refused (all
of them is right).  Standard library only.

    python3 -m tests.tools.reregister_race [--cycles 10000] [--clients 32] [--epmd PATH]
"""

import argparse
import multiprocessing
import sys
import tempfile
from pathlib import Path


from tests.helpers import (OTP_EPMD, RACE_SCENARIOS, Daemon, base_env, free_port,
                     race_cycles)

LABELS = {"fin": "re-register after close (FIN): refused",
          "reset": "re-register after reset (RST): refused",
          "byte": "re-register after a byte + close: refused",
          "lookup": "PORT_PLEASE2 right after close: stale",
          "live": "ALIVE2 for a live holder's name: refused"}


def _one(args):
    port, scenario, cycles, k = args
    return race_cycles(port, scenario, cycles, name=b"racer%d" % k, deadline=600)


def run_one(kind, args, scenario, cycles, clients, epmd_path):
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        d = Daemon("otp" if kind == "otp" else "py", port,
                   ["-port", str(port), "-address", "127.0.0.1"] + args, base_env(), Path(tmp))
        if epmd_path and kind != "otp":
            d.exe = [sys.executable, epmd_path]
        d.start()
        try:
            if clients == 1:
                results = [_one((port, scenario, cycles, 0))]
            else:
                with multiprocessing.Pool(clients) as pool:
                    results = pool.map(_one, [(port, scenario, cycles // clients, k)
                                              for k in range(clients)])
        finally:
            d.stop()
    total = {k: sum(r[k] for r in results) for k in results[0]}
    bad = total["stale"] if scenario == "lookup" else total["refused"]
    return bad, total["cycles"]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=10000, help="cycles per scenario")
    ap.add_argument("--live-cycles", type=int, default=1000, help="cycles of the live-holder case")
    ap.add_argument("--clients", type=int, default=32, help="client processes of the parallel run")
    ap.add_argument("--epmd", help="another epmd.py to measure instead of this one")
    a = ap.parse_args(argv)
    kinds = [("epmd.py", []), ("epmd.py -d -d", ["-d", "-d"])]
    if OTP_EPMD:
        kinds.insert(0, ("otp", []))
    print("# %d cycles per scenario (%d for the live holder), one client, then %d clients "
          "on %d names" % (a.cycles, a.live_cycles, a.clients, a.clients))
    header = "%-44s" % "scenario" + "".join("%18s" % ("OTP epmd" if k == "otp" else k)
                                            for k, _ in kinds)
    for clients in (1, a.clients):
        print("\n## %d client%s" % (clients, "s" if clients > 1 else ""))
        print(header)
        for scenario in RACE_SCENARIOS:
            n = a.live_cycles if scenario == "live" else a.cycles
            row = "%-44s" % LABELS[scenario]
            for kind, args in kinds:
                bad, done = run_one(kind, args, scenario, n, clients, a.epmd)
                row += "%18s" % ("%d of %d" % (bad, done))
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

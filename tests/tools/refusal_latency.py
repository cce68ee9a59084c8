#!/usr/bin/env python3
"""PORT_PLEASE2 latency while duplicate registrations are refused at 100/s.

epmd.py logs, after each refused ALIVE2_REQ, who holds the name (D25); the
look-up runs in the daemon's single loop.  This measures what it costs
everyone else: PORT_PLEASE2 round trips (a new connection each, as nodes
make them, 1,000 a second) against a fresh epmd.py, first on a quiet
daemon, then while
another process sends duplicate ALIVE2_REQs for 10 names it holds, at
--rate per second: once with the same 10 registrations throughout (the
daemon looks each holder up once, then remembers it), once registering each
name afresh just before its duplicate (every refusal wants a look-up; the
rate limit allows 4 a second).  Standard library only; prints the
summaries in µs.

    python3 -m tests.tools.refusal_latency [--count 5000] [--rate 100]
"""

import argparse
import sys
import tempfile
from pathlib import Path


from tests.helpers import Daemon, base_env, free_port, measure_refusal_latency, register


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=5000, help="round trips per phase")
    ap.add_argument("--rate", type=float, default=100.0, help="refusals per second")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), Path(tmp))
        d.start()
        try:
            s, _ = register(port, "target", port=40123)
            quiet, flooded, _ = measure_refusal_latency(port, b"target", a.count, a.rate)
            _, fresh, _ = measure_refusal_latency(port, b"target", a.count, a.rate, fresh=True)
            err = d.stderr()
            refusals = err.count("node name already occupied")
            lines = err.count("refused ALIVE2_REQ")
            skipped = err.count("process not looked up")
            s.close()
        finally:
            d.stop()
    print("PORT_PLEASE2 round trip, µs     n     p50     p90     p99     max")
    for label, r in (("no refusals", quiet), ("refusals at %g/s" % a.rate, flooded),
                     ("... fresh holders", fresh)):
        print("%-28s %6d %7.0f %7.0f %7.0f %7.0f" % (label, r["n"], r["p50"], r["p90"],
                                                      r["p99"], r["max"]))
    print("refusals logged: %d, with their extra line: %d, of which the rate limit left "
          "%d without a process look-up" % (refusals, lines, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

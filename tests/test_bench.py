"""tests/tools/bench.py's churn figure (issue 22) in a small run, as
test_handover.py::test_handover_bench_small runs its tool: the script's own
checks, here the figure's, give the verdict."""

import json
import subprocess
import sys
import textwrap

import helpers as h
import pytest
from helpers import EPMD_PY, base_env

# the figure loads both cores for its half second
pytestmark = pytest.mark.alone

CHURN_SMALL = textwrap.dedent("""
    import argparse, json
    from tests.tools import bench
    r = bench.fig_churn("py", argparse.Namespace(dur=0.5))
    d = bench.Daemon("py")
    try:
        s = bench.register(d.port, bench.CHURN_PREFIX + "0_1")
        bench.CHURN_SETTLE = 0.2
        r["held_left"] = bench.churned_left(d.port)
        s.close()
    finally:
        d.stop()
    print(json.dumps(r))
""")


def test_bench_churn_small():
    """The churn figure for 0.5 s against epmd.py alone: cycles complete, every
    ALIVE2_X_RESP checked (a wrong one raises), NAMES then lists none of the
    churned names (else it raises), and a churned name still held is counted
    by that check."""
    p = subprocess.run([sys.executable, "-c", CHURN_SMALL], cwd=str(EPMD_PY.parent),
                       capture_output=True, text=True, timeout=60, env=base_env())
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["churn_rate"] > 100, r
    assert 0 <= r["churn_user_us"] <= r["churn_us"] and r["churn_us"] > 0, r
    assert r["held_left"] == 1, r


def test_floor_server_answers_as_epmd():
    """tests/tools/floor_server.py, make bench's floor, does the wire work of
    an epmd for the requests it is measured with: ALIVE2_REQ, PORT_PLEASE2_REQ
    (known and unknown names) and NAMES_REQ, with the node held and after its
    close, get the same replies (creation aside) as from epmd.py."""
    floor = EPMD_PY.parent / "tests" / "tools" / "floor_server.py"
    replies = {}
    for impl, argv in (("py", [sys.executable, str(EPMD_PY)]), ("floor", [sys.executable, str(floor)])):
        port = h.free_port()
        p = subprocess.Popen(argv + ["-port", str(port), "-address", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base_env())
        try:
            assert h.wait_until(lambda: h.names_or_none(port) is not None, 10)
            node, reply = h.register(port, "flo", port=4242, extra=b"ex")
            got = [reply[:2], h.request(port, b"zflo"), h.request(port, b"zflx"),
                   h.request(port, b"n")[4:]]
            node.close()
            assert h.wait_until(lambda: h.request(port, b"n")[4:] == b"", 10)
            replies[impl] = got
        finally:
            p.kill()
            p.wait()
    assert replies["floor"] == replies["py"]
    assert replies["py"][0] == b"v\x00" and replies["py"][3] == b"name flo at port 4242\n"

"""The interpreter that runs epmd.py in the tests is the one asked for, and one we promise.

``helpers.DAEMON_PYTHON`` is ``$EPMD_TEST_PYTHON`` (``make test-pythons``
sets it to Python 3.8 and to the newest Python 3 it finds) or else the
interpreter running pytest; every daemon and client command of epmd.py in
tests/test_wire.py, test_erlang.py, test_cli.py and test_clients.py runs
under it.  OTP's epmd is a C program, so there is nothing to compare here.
"""

import os
import subprocess

import pytest
from helpers import DAEMON_PYTHON, EPMD_PY, base_env

pytestmark = pytest.mark.timeout(60)


def test_daemon_runs_under_the_chosen_python(start_ours, capsys):
    """The daemon's process is DAEMON_PYTHON (by /proc/PID/exe), version 3.8
    or newer, and epmd.py's client (-names) runs under it too."""
    d = start_ours()
    want = os.path.realpath(DAEMON_PYTHON)
    assert os.path.realpath("/proc/%d/exe" % d.pid) == want
    out = subprocess.run([DAEMON_PYTHON, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                         capture_output=True, text=True, timeout=30)
    version = tuple(int(x) for x in out.stdout.split("."))
    assert version >= (3, 8), version
    names = subprocess.run([DAEMON_PYTHON, str(EPMD_PY), "-port", str(d.port), "-names"],
                           capture_output=True, text=True, timeout=30, env=base_env())
    assert (names.returncode, names.stdout) == (0, "epmd: up and running on port %d with data:\n" % d.port)
    with capsys.disabled():
        print("\nepmd.py ran under Python %s (%s)" % (".".join(map(str, version)), want))

"""Option parsing and behaviours found by running both daemons side by side
(issue 9, "Also"): the DbgExtra values read like OTP's atoi(), -port, the
exit status on SIGTERM/SIGINT, the usage text, and the -d -d hexdump of a
packet that arrives in pieces.  Each test runs both daemons and asserts what
each does.
"""

import signal
import subprocess
import sys
import time

import pytest
from helpers import EPMD_PY, OTP_EPMD, U32, base_env, connect, names, read_to_eof

pytestmark = pytest.mark.timeout(60)


def exe(impl):
    return [sys.executable, str(EPMD_PY)] if impl == "py" else [OTP_EPMD]


@pytest.mark.parametrize("flag,value", [
    ("-packet_timeout", "1.5"), ("-packet_timeout", "5s"), ("-packet_timeout", " +2"),
    ("-delay_accept", "1.5"), ("-delay_write", "1s"),
])
def test_seconds_read_like_atoi(start_epmd, flag, value):
    """OTP reads the leading integer ("1.5" is 1, "5s" is 5): a unit file
    written for OTP's epmd starts ours too; both serve."""
    d = start_epmd(flag, value)
    assert names(d.port)[0] == d.port


@pytest.mark.parametrize("flag", ["-packet_timeout", "-delay_accept", "-delay_write"])
def test_negative_seconds(start_epmd, flag):
    """D21: OTP takes -3 (a negative -packet_timeout closes every request at
    the next tick, a negative delay sleeps for (unsigned) -3 seconds, so OTP
    hangs); epmd.py refuses it: usage, exit 1, naming the value."""
    d = start_epmd(flag, "-3", wait=False)
    if d.impl == "py":
        assert d.wait_exit(10) == 1
        assert "invalid value for %s: '-3' (OTP reads it as -3 seconds" % flag in d.stderr()
    else:
        assert d.wait_exit(1) is None      # still running


@pytest.mark.parametrize("value", ["abc", "0"])
def test_port_flag_not_a_number(impl, value):
    """-port abc and -port 0: usage, exit 1, from both (OTP checks atoi() != 0)."""
    p = subprocess.run(exe(impl) + ["-port", value], env=base_env(), capture_output=True,
                       timeout=30)
    assert p.returncode == 1 and b"usage: epmd" in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exit_status(start_epmd, sig):
    """D22: on SIGTERM/SIGINT epmd.py exits 0 after closing its sockets; OTP's
    epmd dies of the signal."""
    d = start_epmd()
    d.proc.send_signal(sig)
    code = d.wait_exit(10)
    assert code == (0 if d.impl == "py" else -sig)


def test_unknown_option_line(impl):
    """D23: epmd.py names the bad option before its usage text; OTP prints
    only its usage text."""
    p = subprocess.run(exe(impl) + ["-bogus"], env=base_env(), capture_output=True, timeout=30)
    assert p.returncode == 1
    first = p.stderr.splitlines()[0]
    if impl == "py":
        assert first == b"epmd: unknown option '-bogus'"
    else:
        assert first.startswith(b"usage: epmd") and b"unknown" not in p.stderr


def test_hexdump_of_a_packet_in_pieces(start_epmd):
    """D24: a NAMES_REQ sent as 00 01, then 6e.  epmd.py dumps each piece as
    read (00 01, then 6e); OTP dumps the start of its buffer for the second
    read too (00)."""
    d = start_epmd("-d", "-d")
    time.sleep(0.2)
    before = len(d.stderr())
    s = connect(d.port)
    s.sendall(b"\x00\x01")
    time.sleep(0.3)
    s.sendall(b"n")
    assert U32.unpack_from(read_to_eof(s))[0] == d.port
    s.close()
    time.sleep(0.2)
    rows = [line.split("  ")[1] for line in d.stderr()[before:].splitlines() if line.startswith("***** 0000")]
    reads = [r.strip() for r in rows]
    # the dumps of the two reads come before the dump of the reply written
    if d.impl == "py":
        assert reads[:2] == ["00 01", "6e"], rows
    else:
        assert reads[:2] == ["00 01", "00"], rows

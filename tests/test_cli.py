"""The command line as operators and scripts use it.

Client actions are run with both clients, ours and OTP's `epmd` binary,
against the same daemon (ours and OTP's, through the `impl` fixture), and
their stdout, stderr and exit codes are compared byte for byte: OTP's output
is captured live in the test, never pasted in.
"""

import socket
import subprocess
import sys
import threading

import pytest
from helpers import DAEMON_PYTHON, EPMD_PY, OTP_EPMD, OURS, ROOT, base_env, free_port, register, registered

pytestmark = pytest.mark.timeout(60)


def client(which, args, env=None, cwd=None):
    """Run a client (`py` or `otp`); return (rc, stdout, stderr) as bytes."""
    if which == "otp" and OTP_EPMD is None:
        from helpers import need
        need("OTP's epmd binary")
    exe = list(OURS) if which == "py" else [OTP_EPMD]
    p = subprocess.run(exe + list(args), capture_output=True, timeout=30,
                       env=env if env is not None else base_env(), cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def both(args, env=None):
    """Run both clients with *args*; assert identical results; return ours."""
    ours = client("py", args, env)
    theirs = client("otp", args, env)
    assert ours == theirs, "epmd.py %r != OTP %r" % (ours, theirs)
    return ours


# -- against a running daemon ----------------------------------------------------

def test_names(epmd):
    s1, _ = register(epmd.port, "alpha", port=40001)
    s2, _ = register(epmd.port, "beta", port=40002)
    rc, out, err = both(["-port", str(epmd.port), "-names"])
    assert rc == 0 and err == b""
    assert out == (b"epmd: up and running on port %d with data:\n"
                   b"name beta at port 40002\nname alpha at port 40001\n" % epmd.port)
    s1.close()
    s2.close()


def test_names_through_env_port(epmd):
    rc, out, _ = both(["-names"], env=base_env(ERL_EPMD_PORT=str(epmd.port)))
    assert rc == 0 and out == b"epmd: up and running on port %d with data:\n" % epmd.port


def test_dump(epmd):
    s, _ = register(epmd.port, "gamma", port=40004)
    rc, out, err = both(["-port", str(epmd.port), "-dump"])
    assert rc == 0 and err == b""
    assert out.startswith(b"epmd: up and running on port %d with data:\n"
                          b"active name     <gamma> at port 40004, fd = " % epmd.port)
    assert out.endswith(b"\n\0")
    s.close()


def test_started(epmd):
    assert both(["-port", str(epmd.port), "-started"]) == (0, b"", b"")


def test_kill_refused(epmd):
    s, _ = register(epmd.port, "live")
    rc, out, err = both(["-port", str(epmd.port), "-kill"])
    assert (rc, out, err) == (1, b"Killing not allowed - living nodes in database.\n", b"")
    assert epmd.alive()
    s.close()


def test_kill(start_epmd):
    results = []
    for which in ("py", "otp"):
        d = start_epmd()
        results.append(client(which, ["-port", str(d.port), "-kill"]))
        assert d.wait_exit(5) == 0
    assert results[0] == results[1] == (0, b"Killed\n", b"")


def test_stop_relaxed(start_epmd):
    d = start_epmd("-relaxed_command_check")
    for which in ("py", "otp"):
        s, _ = register(d.port, "victim")
        assert client(which, ["-port", str(d.port), "-stop", "victim"]) == (0, b"STOPPED\n", b"")
        assert registered(d.port) == []
        s.close()
    assert both(["-port", str(d.port), "-stop", "nobody"]) == (0, b"NOEXIST\n", b"")


def test_stop_not_relaxed(epmd):
    s, _ = register(epmd.port, "keep")
    assert both(["-port", str(epmd.port), "-stop", "keep"]) == (
        1, b"epmd: local epmd responded with <>\n", b"")
    assert registered(epmd.port) == [b"keep"]
    s.close()


def test_ipv4_only_daemon_is_found(start_epmd):
    """The client tries ::1, then 127.0.0.1."""
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()

    def serve():
        for _ in range(2):
            c, _ = srv.accept()
            c.recv(10)
            c.sendall(b"\x00\x00\x10\x00")
            c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert both(["-port", str(port), "-names"]) == (0, b"epmd: up and running on port 4096 with data:\n", b"")
    srv.close()


# -- no daemon, short answers --------------------------------------------------

@pytest.mark.parametrize("action", [["-names"], ["-dump"], ["-kill"], ["-stop", "x"], ["-started"]])
def test_no_daemon(action):
    rc, out, err = both(["-port", str(free_port())] + action)
    assert rc == 1 and out == b""
    assert err == (b"" if action == ["-started"] else b"epmd: Cannot connect to local epmd\n")


def test_name_too_long():
    assert both(["-port", str(free_port()), "-stop", "n" * 1001]) == (1, b"epmd: Name too long!", b"")


class FakeDaemon:
    """A peer that answers every connection with fixed bytes and closes:
    the short or odd replies a real epmd never sends."""

    def __init__(self, answer):
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen()
        self.answer = answer
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    c.recv(2000)
                    c.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("answer,action,expected", [
    (b"\x00\x00", ["-names"], (1, b"epmd: no response from local epmd\n", b"")),
    (b"", ["-names"], (1, b"epmd: no response from local epmd\n", b"")),
    (b"", ["-started"], (1, b"", b"")),
    (b"O", ["-kill"], (1, b"epmd: local epmd responded with <>\n", b"")),
    (b"XY", ["-kill"], (1, b"Killing not allowed - living nodes in database.\n", b"")),
    (b"STOP", ["-stop", "a"], (1, b"epmd: local epmd responded with <>\n", b"")),
    (b"NOEXISTSTOPPED", ["-stop", "a"], (0, b"NOEXIST\n", b"")),
])
def test_short_or_odd_answers(answer, action, expected):
    fake = FakeDaemon(answer)
    try:
        assert both(["-port", str(fake.port)] + action) == expected
    finally:
        fake.close()


# -- usage ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["-bogus"], ["-port"], ["-port", "0"], ["-port", "abc"], ["-packet_timeout", "0"],
    ["-delay_accept", "0"], ["-delay_write"], ["-stop"], ["-stop", "a", "b"], ["-address"],
])
def test_usage(args):
    """Unknown flags and missing or invalid values: usage on stderr, exit 1."""
    for which in ("py", "otp"):
        rc, out, err = client(which, args)
        assert rc == 1 and out == b"", which
        assert b"usage: epmd" in err, which


def test_usage_error_is_short():
    """D23: a usage error is three lines on stderr: what is wrong, the
    one-line synopsis, and where the help is (OTP: its usage text alone);
    exit 1 as OTP.  The whole text, listing every flag, is -help's."""
    import epmd as mod
    rc, out, err = client("py", ["-bogus"])
    assert (rc, out) == (1, b"")
    assert err.decode().splitlines() == [
        "epmd: unknown option '-bogus'",
        "usage: epmd [options] [-names|-dump|-started|-kill|-stop Name|-status [-json]]",
        "see `epmd -help`"]
    rc, out, _ = client("py", ["-help"])
    assert rc == 0
    for flag in mod.ALL_FLAGS:
        assert flag.encode() in out, flag
    rc, _, err = client("otp", ["-bogus"])
    assert rc == 1 and err.count(b"\n") > 20 and b"-bogus" not in err


@pytest.mark.parametrize("typed,meant", [
    ("--names", "-names"), ("-name", "-names"), ("--dump", "-dump"), ("-stauts", "-status"),
    ("-adress", "-address"), ("--port", "-port"), ("-relaxed", "-relaxed_command_check"),
])
def test_usage_error_suggests_a_close_flag(typed, meant):
    """A mistyped flag gets "did you mean"; OTP's epmd only prints its usage."""
    rc, out, err = client("py", [typed])
    assert (rc, out) == (1, b"")
    assert err.decode().splitlines()[0] == \
        "epmd: unknown option %r (did you mean %s?)" % (typed, meant)
    rc, _, err = client("otp", [typed])
    assert rc == 1 and b"did you mean" not in err


def test_usage_error_suggests_nothing_far():
    for typed in ("-bogus", "-x", "--", "-zzzzzzz"):
        rc, _, err = client("py", [typed])
        assert rc == 1 and b"did you mean" not in err, typed


def test_actions_anywhere(epmd):
    """D11: epmd.py takes client actions anywhere; OTP wants them last."""
    rc, out, _ = client("py", ["-names", "-port", str(epmd.port)])
    assert rc == 0 and out == b"epmd: up and running on port %d with data:\n" % epmd.port
    rc, _, err = client("otp", ["-names", "-port", str(epmd.port)])
    assert rc == 1 and b"usage" in err


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_bad_env_port_is_an_error(value):
    """D7: a bad ERL_EPMD_PORT is reported, exit 1 (OTP uses atoi())."""
    rc, out, err = client("py", ["-names"], env=base_env(ERL_EPMD_PORT=value))
    assert rc == 1 and b"ERL_EPMD_PORT" in err and value.encode() in err


# -- other ways to start it ------------------------------------------------------

def test_python_m_epmd_and_console_script(epmd, tmp_path):
    """`python3 -m epmd` and the `epmd` entry point behave as `python3 epmd.py`."""
    args = ["-port", str(epmd.port), "-names"]
    expected = client("py", args)
    m = subprocess.run([DAEMON_PYTHON, "-m", "epmd"] + args, capture_output=True, cwd=ROOT,
                       env=base_env(), timeout=30)
    assert (m.returncode, m.stdout, m.stderr) == expected
    entry = "import sys, epmd; sys.argv[0] = 'epmd'; epmd.console_main()"
    script = subprocess.run([DAEMON_PYTHON, "-c", entry] + args, capture_output=True, cwd=ROOT,
                            env=base_env(), timeout=30)
    assert (script.returncode, script.stdout, script.stderr) == expected
    bad = subprocess.run([sys.executable, "-m", "epmd", "-bogus"], capture_output=True, cwd=ROOT,
                         env=base_env(), timeout=30)
    assert bad.returncode == 1



# -- an interpreter too old ------------------------------------------------------

def old_python(version):
    """The path of a Python *version* ("3.6") installed here (pyenv's
    versions, then PATH), or a skip."""
    import glob
    import os
    import shutil
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s"
                                                % (version, version))))
    for cand in found + [shutil.which("python" + version) or ""]:
        if cand and subprocess.run([cand, "-c", "pass"], capture_output=True,
                                   timeout=30).returncode == 0:
            return cand
    pytest.skip("no Python %s here" % version)


@pytest.mark.parametrize("version", ["3.6", "3.7"])
def test_old_python_says_what_it_needs(version, tmp_path):
    """Python 3.6 and 3.7 parse the whole file and stop at its version
    check: one line on stderr naming what is needed and what was found,
    exit 2 (no traceback), whatever the arguments."""
    import epmd as mod
    python = old_python(version)
    subprocess.run([python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
                    "cfile=sys.argv[2], doraise=True)", str(EPMD_PY), str(tmp_path / "epmd.pyc")],
                   check=True, timeout=30)
    for args in (["-names"], ["-port", str(free_port()), "-status"], []):
        p = subprocess.run([python, str(EPMD_PY)] + args, capture_output=True, timeout=30,
                           env=base_env())
        err = p.stderr.decode()
        assert (p.returncode, p.stdout) == (mod.OLD_PYTHON_EXIT, b""), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("epmd.py needs Python %d.%d or later; found Python %s."
                              % (mod.MIN_PYTHON + (version,))), err
        assert python in err


def test_python2_syntax_error_shows_what_is_needed():
    """Python 2 cannot parse the file; its SyntaxError shows the line that
    says which Python is needed."""
    python = old_python("2.7")
    p = subprocess.run([python, str(EPMD_PY), "-names"], capture_output=True, timeout=30)
    err = p.stderr.decode()
    assert p.returncode != 0 and "SyntaxError" in err, err
    assert "epmd.py needs Python 3.8 or later" in err, err


# -- D29: client commands give up --------------------------------------------------

CLIENT_ACTIONS = [["-names"], ["-dump"], ["-started"], ["-kill"], ["-stop", "x"]]


class SilentPeer:
    """A listening socket of this test process that never accepts: the
    kernel completes each client's handshake and nothing ever answers (as
    any program on the port that is not an epmd, or a stopped one)."""

    def __init__(self):
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)

    def close(self):
        self.sock.close()


def timed_client(which, args, timeout_env, wait):
    """Run a client with EPMD_PY_CLIENT_TIMEOUT=*timeout_env* (None: unset),
    killed after *wait* seconds; return (rc or "hangs", stdout, stderr,
    seconds)."""
    import time
    env = base_env() if timeout_env is None else base_env(EPMD_PY_CLIENT_TIMEOUT=timeout_env)
    t0 = time.monotonic()
    try:
        rc, out, err = client_within(which, args, env, wait)
    except subprocess.TimeoutExpired:
        return "hangs", None, None, time.monotonic() - t0
    return rc, out, err, time.monotonic() - t0


def client_within(which, args, env, wait):
    if which == "otp" and OTP_EPMD is None:
        from helpers import need
        need("OTP's epmd binary")
    exe = [sys.executable, str(EPMD_PY)] if which == "py" else [OTP_EPMD]
    p = subprocess.run(exe + list(args), capture_output=True, timeout=wait, env=env)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("action", CLIENT_ACTIONS)
def test_client_gives_up_on_a_stopped_daemon(start_epmd, impl, action):
    """D29: against a daemon stopped with SIGSTOP (ours or OTP's), every
    client command of epmd.py gives up after EPMD_PY_CLIENT_TIMEOUT seconds
    with one line on stderr (-started: silently) and exit 1; OTP's client
    waits for ever (killed here after 3 s)."""
    import os
    import signal
    d = start_epmd()
    os.kill(d.pid, signal.SIGSTOP)
    try:
        rc, out, err, took = timed_client("py", ["-port", str(d.port)] + action, "1", 20)
        assert rc == 1 and out == b"" and 0.9 < took < 5, (rc, out, err, took)
        if action == ["-started"]:
            assert err == b""
        else:
            assert err == b"epmd: no answer from local epmd on port %d within 1 s " \
                          b"(EPMD_PY_CLIENT_TIMEOUT sets the time-out)\n" % d.port
        assert timed_client("otp", ["-port", str(d.port)] + action, None, 3)[0] == "hangs"
    finally:
        os.kill(d.pid, signal.SIGCONT)


@pytest.mark.parametrize("action", [["-names"], ["-started"]])
def test_client_gives_up_on_a_silent_program(action):
    """D29: a program on the port that accepts and never answers: the same
    bounded end; EPMD_PY_CLIENT_TIMEOUT=0 waits for ever, as OTP's client
    does."""
    peer = SilentPeer()
    try:
        args = ["-port", str(peer.port)] + action
        rc, out, err, took = timed_client("py", args, "0.5", 20)
        assert (rc, out) == (1, b"") and 0.4 < took < 4, (rc, took)
        assert (err == b"") == (action == ["-started"])
        assert timed_client("py", args, "0", 2.5)[0] == "hangs"
        assert timed_client("otp", args, None, 2.5)[0] == "hangs"
    finally:
        peer.close()


@pytest.mark.slow
def test_client_default_timeout():
    """Without EPMD_PY_CLIENT_TIMEOUT a client gives up after CLIENT_TIMEOUT
    (10 s), and says so."""
    import epmd as mod
    peer = SilentPeer()
    try:
        rc, _, err, took = timed_client("py", ["-port", str(peer.port), "-names"], None, 30)
        assert rc == 1 and mod.CLIENT_TIMEOUT - 0.1 < took < mod.CLIENT_TIMEOUT + 5, took
        assert b"within 10 s" in err
    finally:
        peer.close()


@pytest.mark.parametrize("value", ["-1", "abc", "inf", "nan", ""])
def test_bad_client_timeout_is_a_usage_error(value):
    rc, out, err = client("py", ["-names"], env=base_env(EPMD_PY_CLIENT_TIMEOUT=value))
    assert rc == 1 and out == b""
    assert err.decode().splitlines()[0] == \
        "epmd: invalid EPMD_PY_CLIENT_TIMEOUT: %r (expected seconds >= 0; 0 waits for ever)" % value


def test_client_timeout_leaves_answers_alone(epmd):
    """A daemon that answers is answered as before, time-out set or not."""
    args = ["-port", str(epmd.port), "-names"]
    assert client("py", args, env=base_env(EPMD_PY_CLIENT_TIMEOUT="0.5")) == client("py", args)
    assert client("py", args)[0] == 0

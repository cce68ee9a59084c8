"""How service managers and `erl` start epmd: -daemon, -systemd, signals.

Every process a test starts is found by PID and stopped by that test.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import (
    EPMD_PY,
    ERL,
    OTP_EPMD,
    base_env,
    connect,
    find_pids,
    free_port,
    names,
    names_or_none,
    need,
    register,
    registered,
    registered_or_empty,
    wait_until,
    without_syslog_warning,
)

pytestmark = pytest.mark.timeout(90)


def proc_status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return proc_status(pid).get("State", "").startswith("Z")


@pytest.fixture
def reaper():
    """Collects PIDs to kill at the end of the test."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_epmd(args, env=None, timeout=30):
    p = subprocess.run([sys.executable, str(EPMD_PY)] + args, capture_output=True, timeout=timeout,
                       env=env or base_env())
    return p.returncode, p.stdout, p.stderr


# -- -daemon --------------------------------------------------------------------

def test_daemon_detaches_serves_and_is_killed(reaper):
    """-daemon returns 0 once bound; the daemon is detached (reparented, own
    session but not its leader, cwd /, stdio on /dev/null, SIGHUP ignored),
    serves, and -kill stops it."""
    port = free_port()
    rc, out, err = run_epmd(["-daemon", "-port", str(port), "-address", "127.0.0.1"])
    # D15: without /dev/log (this host may have none) the one line says so
    assert (rc, out, without_syslog_warning(err)) == (0, b"", b"")
    pids = find_pids(str(EPMD_PY), "-daemon", str(port))
    reaper.extend(pids)
    assert len(pids) == 1
    pid = pids[0]
    # serving as soon as the parent returned (D5)
    assert names(port)[0] == port
    st = proc_status(pid)
    assert int(st["PPid"]) != os.getpid()
    assert os.getsid(pid) != os.getsid(0)
    assert os.getsid(pid) != pid
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    assert int(st["SigIgn"], 16) & (1 << (signal.SIGHUP - 1))
    s, reply = register(port, "bg")
    assert reply[:2] == b"v\x00"
    s.close()
    assert wait_until(lambda: registered(port) == [])
    assert run_epmd(["-port", str(port), "-kill"]) == (0, b"Killed\n", b"")
    assert wait_until(lambda: gone(pid), 5)


def test_daemon_port_taken_exits_zero(start_epmd, impl, reaper):
    """-daemon on a port another epmd serves (ours or OTP's): 0, the first
    keeps its nodes, and D5: one line on stderr names the process that
    serves the port (its PID and command), where OTP's -daemon says nothing.
    Started as erl starts it (erlexec's BINDIR, EMU, PROGNAME set), at
    every start of a distributed node, it stays silent."""
    d = start_epmd()
    s, _ = register(d.port, "first")
    args = ["-daemon", "-port", str(d.port), "-address", "127.0.0.1"]
    rc, out, err = run_epmd(args)
    assert (rc, out) == (0, b"")
    cmd = OTP_EPMD if impl == "otp" else str(EPMD_PY)
    assert without_syslog_warning(err).decode().splitlines() == [
        "epmd: an epmd already serves port %d: pid %d (%s%s -port %d -address 127.0.0.1); "
        "this one exits without serving" % (d.port, d.pid, "" if impl == "otp" else
                                            sys.executable + " ", cmd, d.port)], err
    assert wait_until(lambda: find_pids(str(EPMD_PY), "-daemon", str(d.port)) == [], 5)
    assert registered(d.port) == [b"first"]
    erl_env = base_env(BINDIR="/usr/lib/erlang/bin", EMU="beam", PROGNAME="erl")
    rc, out, err = run_epmd(args, env=erl_env)
    assert (rc, out, without_syslog_warning(err)) == (0, b"", b"")
    if OTP_EPMD is not None:
        p = subprocess.run([OTP_EPMD] + args, capture_output=True, timeout=30, env=base_env())
        assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert registered(d.port) == [b"first"]
    s.close()


@pytest.mark.parametrize("impl", ["py", "otp"], indirect=True)
def test_daemon_bind_error(impl, reaper):
    """D5: when binding fails, epmd.py -daemon exits 1 with the error on
    stderr; OTP's returns 0 before even trying."""
    port = free_port()
    args = ["-daemon", "-port", str(port), "-address", "192.0.2.254"]
    if impl == "py":
        rc, _, err = run_epmd(args)
        assert rc == 1
        assert b"failed to bind on ipaddr 192.0.2.254: Cannot assign requested address" in err
    else:
        p = subprocess.run([OTP_EPMD] + args, capture_output=True, timeout=30, env=base_env())
        assert p.returncode == 0
    assert wait_until(lambda: find_pids("-daemon", str(port)) == [], 5)


# -- signals and restarts --------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_cleanly(start_ours, sig):
    """SIGTERM and SIGINT: exit 0, listening sockets closed."""
    d = start_ours()
    s, _ = register(d.port, "n")
    d.proc.send_signal(sig)
    assert d.wait_exit(5) == 0
    with pytest.raises(OSError):
        connect(d.port).close()
    s.close()


def test_peer_reset_before_reply_does_not_kill(start_ours):
    """A peer that resets before its reply is written costs only its own
    connection: the failed write is logged and the daemon serves on."""
    d = start_ours("-delay_write", "1", "-d")
    s = connect(d.port)
    s.sendall(b"\x00\x01n")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    assert wait_until(lambda: "failed to send NAMES_RESP" in d.stderr(), 10)
    assert d.alive()
    assert names(d.port)[0] == d.port


def test_restart_after_kill_9(start_ours):
    """After kill -9, a new daemon binds the same port at once; the node whose
    connection was closed registers again."""
    d = start_ours()
    s, _ = register(d.port, "phoenix")
    others = [connect(d.port) for _ in range(3)]
    d.proc.kill()
    d.wait_exit(5)
    s.settimeout(5)
    assert s.recv(10) == b""          # the node sees its connection close
    d2 = start_ours(port=d.port)
    s2, reply = register(d2.port, "phoenix")
    assert reply[:2] == b"v\x00"
    assert registered(d2.port) == [b"phoenix"]
    for c in others + [s, s2]:
        c.close()


# -- -systemd ---------------------------------------------------------------------

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def notify_socket(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = "epmd-test-%d-%d" % (os.getpid(), time.monotonic_ns())
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    return sock, path


@pytest.mark.parametrize("impl,abstract", [("py", False), ("py", True), ("otp", False)],
                         indirect=["impl"])
def test_systemd_socket_activation(impl, tmp_path, abstract):
    """-systemd serves the IPv4 and IPv6 sockets that systemd-socket-activate
    passes, and sends READY=1 to $NOTIFY_SOCKET (a path or an abstract
    socket).  NAMES reports the sockets' port (D20); OTP's 4369."""
    if SOCKET_ACTIVATE is None:
        need("systemd-socket-activate", "systemd")
    port = free_port()
    nsock, nname = notify_socket(tmp_path, abstract)
    exe = [sys.executable, str(EPMD_PY)] if impl == "py" else [OTP_EPMD]
    cmd = [SOCKET_ACTIVATE, "-l", "127.0.0.1:%d" % port, "-l", "[::1]:%d" % port,
           "-E", "NOTIFY_SOCKET=" + nname] + exe + ["-systemd"]
    p = subprocess.Popen(cmd, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: names_or_none(port, "127.0.0.1") is not None, 10)
        assert names(port, "127.0.0.1")[0] == (port if impl == "py" else 4369)
        s, reply = register(port, "sd", host="::1")
        assert reply[:2] == b"v\x00"
        assert names(port, "::1")[1] == [b"name sd at port 5000\n"]
        s.close()
        nsock.settimeout(5)
        msg = nsock.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        assert "MAINPID=%d" % p.pid in msg
    finally:
        p.terminate()
        p.wait(5)
        nsock.close()


@pytest.mark.parametrize("impl", ["py", "otp"], indirect=True)
def test_systemd_without_sockets(impl):
    """-systemd with no sockets: ``systemd provides no sockets``, exit 1."""
    exe = [sys.executable, str(EPMD_PY)] if impl == "py" else [OTP_EPMD]
    p = subprocess.run(exe + ["-systemd"], capture_output=True, timeout=10, env=base_env())
    assert p.returncode == 1
    assert b"systemd provides no sockets" in p.stderr


# -- erl starts our daemon -------------------------------------------------------

def test_erl_starts_epmd_py(tmp_path, reaper):
    """A node started without -start_epmd false starts epmd itself, with
    `-daemon`.  erl runs "$BINDIR/epmd" (not a PATH lookup), so the test lays
    out a BINDIR whose epmd is epmd.py (and puts it first on PATH too); the
    node's own epmd is then ours, and the node registers with it."""
    if ERL is None:
        need("erl")
    erts_bins = sorted(p for p in __import__("glob").glob("/usr/lib/erlang/erts-*/bin"))
    if not erts_bins:
        need("an OTP installation under /usr/lib/erlang")
    real_bin = erts_bins[-1]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in os.listdir(real_bin):
        if name != "epmd":
            os.symlink(os.path.join(real_bin, name), bindir / name)
    shutil.copy(EPMD_PY, bindir / "epmd")
    os.chmod(bindir / "epmd", 0o755)
    port = free_port()
    env = base_env(ERL_EPMD_PORT=str(port), ROOTDIR="/usr/lib/erlang", BINDIR=str(bindir),
                   EMU="beam", PROGNAME="erl", HOME=str(tmp_path),
                   PATH=str(bindir) + os.pathsep + os.environ.get("PATH", ""))
    node = "auto%d" % os.getpid()
    code = ('{ok, Names} = net_adm:names(), io:format("NAMES ~p~n", [Names]), '
            'receive after 60000 -> ok end.')
    p = subprocess.Popen([str(bindir / "erlexec"), "-sname", node, "-noshell", "-noinput", "-eval", code],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: registered_or_empty(port) == [node.encode()], 30)
        daemon_pids = find_pids(str(bindir / "epmd"), "-daemon")
        reaper.extend(daemon_pids)
        assert len(daemon_pids) == 1
        with open("/proc/%d/cmdline" % daemon_pids[0], "rb") as f:
            assert b"python" in f.read()
    finally:
        p.kill()
        p.wait(10)
    assert wait_until(lambda: registered_or_empty(port) == [], 10)
    assert run_epmd(["-port", str(port), "-kill"]) == (0, b"Killed\n", b"")
    assert wait_until(lambda: all(gone(pid) for pid in daemon_pids), 5)



def test_systemd_bad_descriptor():
    """LISTEN_FDS naming a descriptor that is not open: a clear error, exit 1.
    (A shell sets LISTEN_PID to its own PID and execs epmd.py.)"""
    p = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', sys.executable, str(EPMD_PY),
                        "-systemd"], capture_output=True, timeout=10,
                       env=base_env(LISTEN_FDS="1"), close_fds=True)
    assert p.returncode == 1
    assert b"cannot obtain sockets from systemd: fd 3: Bad file descriptor" in p.stderr
    assert b"Traceback" not in p.stderr


def test_daemon_closes_inherited_descriptors(reaper, tmp_path):
    """-daemon keeps no descriptor of its caller open but 0-2 (on /dev/null)."""
    port = free_port()
    r, w = os.pipe()
    try:
        p = subprocess.run([sys.executable, str(EPMD_PY), "-daemon", "-port", str(port),
                            "-address", "127.0.0.1"], capture_output=True, timeout=30,
                           env=base_env(), pass_fds=(w,))
        assert p.returncode == 0
        pids = find_pids(str(EPMD_PY), "-daemon", str(port))
        reaper.extend(pids)
        assert len(pids) == 1
        os.close(w)
        w = -1
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""            # no copy of the write end left open
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert run_epmd(["-port", str(port), "-kill"]) == (0, b"Killed\n", b"")

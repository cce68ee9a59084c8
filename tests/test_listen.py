"""Where epmd listens, and what it does when its port is taken (issue 9, §2-4).

- The address matrix: every -address form, with IPv6 on and off, each in a
  network namespace of its own (IPv6 off: disable_ipv6 set before loopback
  comes up, so ::1 does not exist), read from /proc/<pid>/net/tcp{,6}.
- A port held by something that is not an epmd: exit 1 naming the holder (D18);
  held by an epmd (ours or OTP's): exit 0, as OTP.
- Debian's dual-stack socket unit (one ``[::]`` socket without IPV6_V6ONLY,
  made by the real `systemd-socket-activate`) and -systemd on a port other
  than 4369, with a real `erl` node.

Every test runs against OTP's epmd too where OTP can run it, and asserts what
each does.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import (
    EPMD_PY,
    ERL,
    OTP_EPMD,
    U32,
    BareNS,
    NetNS,
    alive2,
    base_env,
    connect,
    daemon_pids,
    frame,
    free_port,
    listening_sockets,
    names,
    need,
    read_to_eof,
    register,
    registered,
    request,
    stop_process,
    wait_until,
    without_served_line,
    without_syslog_warning,
)

pytestmark = pytest.mark.timeout(120)

SOCKET_ACTIVATE = __import__("shutil").which("systemd-socket-activate")


def exe(impl):
    return [sys.executable, str(EPMD_PY)] if impl == "py" else [OTP_EPMD]


def need_root_ip():
    if os.geteuid() != 0 or __import__("shutil").which("ip") is None:
        need("root and `ip` (network namespaces)", "iproute2")


# -- §2: the address matrix ----------------------------------------------------

# spec -> {(impl, ipv6): listening addresses, or ("exit", code)}; None: no -address.
A4, A6 = BareNS.ADDR4, BareNS.ADDR6
LOOP = ["127.0.0.1", "::1"]
MATRIX = {
    None:            {True: ["0.0.0.0", "::"],             False: ["0.0.0.0", "::"]},
    "127.0.0.1":     {True: LOOP,                          False: ["127.0.0.1"]},
    "::1":           {True: LOOP,                          False: ["127.0.0.1"]},
    "0.0.0.0":       {True: ["0.0.0.0", "::1"],            False: ["0.0.0.0"]},
    "::":            {True: ["127.0.0.1", "::"],           False: ["127.0.0.1", "::"]},
    "0.0.0.0,::":    {True: ["0.0.0.0", "::"],             False: ["0.0.0.0", "::"]},
    "127.0.0.1,::1": {True: LOOP,                          False: ["127.0.0.1"]},
    A4:              {True: LOOP + [A4],                   False: ["127.0.0.1", A4]},
    A6:              {True: LOOP + [A6],                   False: ("exit", 1)},
}
# OTP 25 always binds 127.0.0.1 and ::1 first, so a listed wildcard of the
# same family collides with them and it exits 0, serving nothing (fixed in
# erts 15.2.7.12 / OTP 27.3.4.16, erlang/otp PR 11409).
OTP25 = {
    "0.0.0.0":    {True: ("exit", 0), False: ("exit", 0)},
    "::":         {True: ("exit", 0)},
    "0.0.0.0,::": {True: ("exit", 0), False: ("exit", 0)},
}


@pytest.fixture(scope="module", params=[True, False], ids=["ipv6-on", "ipv6-off"])
def bare_ns(request):
    need_root_ip()
    ns = BareNS(ipv6=request.param).create()
    yield ns
    ns.destroy()


def start_in(ns, impl, args):
    """Start *impl* with -d -d inside *ns*; return (process, listening
    addresses or ("exit", code), its output) once it entered its loop or
    exited."""
    p = subprocess.Popen(ns.argv(*(exe(impl) + ["-d", "-d"] + list(args))), env=base_env(),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: p.poll() is not None
                          or any(b"entering the main select() loop" in line for line in out), 15)
        if p.poll() is not None:
            reader.join(5)
            return ("exit", p.returncode), b"".join(out).decode("utf-8", "replace")
        got = [a for a, _ in listening_sockets(p.pid)]
        time.sleep(0.1)
        assert p.poll() is None, b"".join(out)
        return sorted(got), b"".join(out).decode("utf-8", "replace")
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(5)
        reader.join(5)


@pytest.mark.parametrize("spec", list(MATRIX), ids=lambda s: "none" if s is None else s)
def test_address_matrix(impl, bare_ns, spec):
    """§2: what listens for each -address form, IPv6 on and off.  No
    implicit 127.0.0.1 when 127.0.0.1 or 0.0.0.0 is listed, no implicit ::1
    when ::1 or :: is listed; a loopback address the host lacks is logged
    ("failed to bind on ipaddr ::1: ...", OTP's line) and skipped.  OTP 25
    exits 0 serving nothing for a listed wildcard (OTP25 table)."""
    port = free_port()
    args = ["-port", port] + ([] if spec is None else ["-address", spec])
    want = MATRIX[spec][bare_ns.ipv6]
    if impl == "otp":
        want = OTP25.get(spec, {}).get(bare_ns.ipv6, want)
    got, out = start_in(bare_ns, impl, args)
    assert got == (want if isinstance(want, tuple) else sorted(want)), out
    if not bare_ns.ipv6 and spec is not None and "::" != spec and "0.0.0.0,::" != spec:
        assert "failed to bind on ipaddr ::1: Cannot assign requested address" in out


@pytest.mark.parametrize("spec,message", [
    ("127.0.0.2,127.0.0.2", 'IP address "127.0.0.2" is listed twice'),
    ("0.0.0.0,127.0.0.2", 'IP address "127.0.0.2" overlaps "0.0.0.0"'),
    ("::1,::", 'IP address "::" overlaps "::1"'),
])
def test_overlapping_addresses(impl, spec, message):
    """D18: an address listed twice, or beside its family's wildcard, is an
    error naming both (exit 1); OTP 25 reports "already running" and exits 0,
    serving nothing."""
    port = free_port()
    p = subprocess.run(exe(impl) + ["-port", str(port), "-address", spec], env=base_env(),
                       capture_output=True, timeout=30)
    if impl == "py":
        assert p.returncode == 1 and message.encode() in p.stderr
    else:
        assert p.returncode == 0 and p.stderr == b""


# -- §3: who holds the port ----------------------------------------------------

class Holder:
    """A socket that is not an epmd's: *mode* "silent" listens and never
    accepts; "talker" accepts and answers every connection with an HTTP
    error; "bound" is bound (without SO_REUSEADDR) but does not listen."""

    def __init__(self, family, addr, port, mode):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((addr, port))
        if mode != "bound":
            self.sock.listen(16)
        self.stop = False
        self.thread = None
        if mode == "talker":
            self.thread = threading.Thread(target=self._talk, daemon=True)
            self.thread.start()

    def _talk(self):
        self.sock.settimeout(0.1)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                c.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    def close(self):
        self.stop = True
        if self.thread:
            self.thread.join(2)
        self.sock.close()


@pytest.fixture
def holders():
    made = []
    yield lambda *a: made.append(Holder(*a)) or made[-1]
    for h in made:
        h.close()


@pytest.mark.parametrize("mode", ["silent", "talker", "bound"])
@pytest.mark.parametrize("where", ["127.0.0.1", "::1"])
def test_port_held_by_non_epmd(impl, holders, where, mode):
    """D18: a listener that is not an epmd holds [where]:port before epmd
    starts with -address 127.0.0.1 (which also takes ::1).  epmd.py exits 1
    naming the address, the port and the uid owning the socket; OTP 25 exits
    0 as if an epmd were running, and nothing serves epmd on the port."""
    port = free_port()
    family = socket.AF_INET6 if ":" in where else socket.AF_INET
    holders(family, where, port, mode)
    p = subprocess.run(exe(impl) + ["-port", str(port), "-address", "127.0.0.1"], env=base_env(),
                       capture_output=True, timeout=30)
    if impl == "py":
        assert p.returncode == 1, p.stderr
        shown = "[%s]:%d" % (where, port) if family == socket.AF_INET6 else "%s:%d" % (where, port)
        if mode == "bound":
            assert ("cannot listen on ipaddr %s port %d: in use by a socket that does not listen"
                    % (where, port)).encode() in p.stderr
        else:
            assert ("cannot listen on ipaddr %s port %d: in use by a listening socket of uid %d on "
                    "%s that does not answer as an epmd" % (where, port, os.getuid(), shown)
                    ).encode() in p.stderr
    else:
        assert (p.returncode, p.stderr) == (0, b"")
    other = "127.0.0.1" if family == socket.AF_INET6 else "::1"
    with pytest.raises(OSError):
        names(port, host=other)


def test_daemon_reports_non_epmd_holder(holders):
    """D5, D18: with -daemon the waiting parent exits 1 with the same error
    on stderr; OTP's -daemon returns 0 before binding."""
    port = free_port()
    holders(socket.AF_INET6, "::1", port, "talker")
    p = subprocess.run(exe("py") + ["-daemon", "-port", str(port), "-address", "127.0.0.1"],
                       env=base_env(), capture_output=True, timeout=30)
    assert p.returncode == 1
    assert (b"epmd: cannot listen on ipaddr ::1 port %d: in use by a listening socket of uid %d"
            % (port, os.getuid())) in p.stderr


@pytest.mark.parametrize("holder", ["py", "otp"])
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_port_held_by_an_epmd(impl, start_epmd, holder, daemon):
    """An epmd (ours or OTP's) serves the port: a second one exits 0, as OTP;
    in the foreground epmd.py prints the "already running" line (D12), with
    -daemon one line naming what serves the port (D5; OTP's says nothing;
    under erl, which runs `epmd -daemon` at every start, nothing).  The
    first keeps its nodes."""
    if holder == "otp" and OTP_EPMD is None:
        need("OTP's epmd binary")
    d = start_epmd(which=holder)
    s, _ = register(d.port, "first")
    args = ["-port", str(d.port), "-address", "127.0.0.1"] + (["-daemon"] if daemon else [])
    p = subprocess.run(exe(impl) + args, env=base_env(), capture_output=True, timeout=30)
    assert p.returncode == 0
    line = b"there is already a epmd running at port %d on ipaddr 127.0.0.1" % d.port
    if impl == "py" and not daemon:
        assert line in p.stderr
    elif impl == "py":
        assert b"epmd: an epmd already serves port %d: " % d.port in p.stderr, p.stderr
        # D15: -daemon on a host without /dev/log (maybe this one) says so
        assert without_served_line(p.stderr) == b""
    else:
        assert without_syslog_warning(p.stderr) == b""
    assert registered(d.port) == [b"first"]
    s.close()


def test_concurrent_daemons_one_serves():
    """Several `epmd -daemon` started at once on one port (as nodes starting
    together do): every one exits 0 and exactly one daemon serves, whoever
    wins the bind and whatever state the winner is in when the others look."""
    port = free_port()
    args = exe("py") + ["-daemon", "-port", str(port), "-address", "127.0.0.1"]
    procs = [subprocess.Popen(args, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    results = [(p.wait(30), without_served_line(p.stderr.read())) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    pids = daemon_pids(port)
    try:
        assert results == [(0, b"")] * 4
        assert len(pids) == 1
        assert names(port)[0] == port
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)



def test_epmd_on_wildcard_counts_as_running(start_ours):
    """A default epmd (0.0.0.0 and ::) holds the port: -address 127.0.0.2 is
    refused by its 0.0.0.0, which answers on 127.0.0.2: exit 0."""
    d = start_ours(loopback=False)
    p = subprocess.run(exe("py") + ["-port", str(d.port), "-address", "127.0.0.2"],
                       env=base_env(), capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert b"there is already a epmd running at port %d" % d.port in p.stderr


# -- §4: -systemd with Debian's dual-stack socket -------------------------------

def activate(impl, listen, port, *extra):
    """Start *impl* -systemd under the real systemd-socket-activate, which
    creates the sockets (for ``[::]:P`` one dual-stack socket: IPV6_V6ONLY
    follows net.ipv6.bindv6only, 0 by default, like BindIPv6Only=both)."""
    if SOCKET_ACTIVATE is None:
        need("systemd-socket-activate", "systemd")
    cmd = [SOCKET_ACTIVATE]
    for addr in listen:
        cmd += ["-l", addr % port]
    p = subprocess.Popen(cmd + exe(impl) + ["-systemd"] + list(extra), env=base_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_until(lambda: _names(port, "::1") is not None or p.poll() is not None, 15)
    assert p.poll() is None, p.stderr.read()
    return p


def _names(port, host):
    try:
        return names(port, host)
    except OSError:
        return None


@pytest.fixture
def stopper():
    procs = []
    yield procs.append
    for p in procs:
        stop_process(p, 5)


def test_systemd_dual_stack_socket(impl, stopper):
    """D19, D20: one ``[::]`` socket without IPV6_V6ONLY (Debian's
    epmd.socket): IPv4 peers arrive as ::ffff:a.b.c.d.  A node connecting
    to 127.0.0.1 registers; one connecting from 127.0.0.2 is local too for
    epmd.py (mapped 127.0.0.0/8 is loopback), remote for OTP (which compares
    a mapped peer only with the socket's own address) and refused.  NAMES
    reports the socket's port for epmd.py, 4369 for OTP."""
    port = free_port()
    p = activate(impl, ["[::]:%d"], port)
    stopper(p)
    assert names(port, "127.0.0.1")[0] == (port if impl == "py" else 4369)
    s, reply = register(port, "mapped", host="127.0.0.1")
    assert reply[:2] == b"v\x00"
    s2 = connect(port, "127.0.0.1", source="127.0.0.2")
    s2.sendall(frame(alive2("other", port=5001)))
    reply2 = read_to_eof(s2, 5) if impl == "otp" else _recv(s2, 6)
    if impl == "py":
        assert reply2[:2] == b"v\x00"
        assert sorted(registered(port)) == [b"mapped", b"other"]
    else:
        assert reply2 == b""
        assert registered(port) == [b"mapped"]
    dump = request(port, b"d", "127.0.0.1")
    assert U32.unpack_from(dump)[0] == (port if impl == "py" else 4369)
    s.close()
    s2.close()


def _recv(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_systemd_dual_stack_remote_ipv4_peer(impl, stopper):
    """A peer in another network namespace, over IPv4 through the dual-stack
    socket (arriving as ::ffff:198.18.N.2): remote, so NAMES is answered and
    ALIVE2 closed without a reply, nothing registered."""
    need_root_ip()
    port = free_port()
    p = activate(impl, ["[::]:%d"], port)
    stopper(p)
    ns = NetNS().create()
    try:
        reply = ns.request(ns.host4, port, b"n")
        assert U32.unpack_from(reply)[0] == (port if impl == "py" else 4369)
        assert ns.request(ns.host4, port, alive2("remote")) == b""
        assert registered(port) == []
    finally:
        ns.destroy()


def test_daemon_beside_socket_unit(impl, stopper):
    """Debian's case: epmd.socket holds [::]:P (dual-stack) and serves it
    with epmd -systemd (*impl*); a node's `epmd -daemon` (ours, as erl runs
    it) finds the port in use on 127.0.0.1 by that IPv6 socket, asks it, and
    exits 0 (OTP's -systemd answers with 4369, also taken as an epmd)."""
    port = free_port()
    stopper(activate(impl, ["[::]:%d"], port))
    p = subprocess.run(exe("py") + ["-daemon", "-port", str(port)], env=base_env(),
                       capture_output=True, timeout=30)
    assert (p.returncode, without_served_line(p.stderr)) == (0, b"")
    assert b"epmd: an epmd already serves port %d: " % port in p.stderr, p.stderr
    assert daemon_pids(port) == []


@pytest.mark.parametrize("impl", ["py", "otp"], indirect=True)
def test_erl_names_through_systemd_on_other_port(impl, stopper, tmp_path):
    """D20: a real `erl` node on ERL_EPMD_PORT=P (not 4369) registers with
    epmd -systemd serving P, and net_adm:names() lists it through epmd.py.
    With OTP's epmd, NAMES says 4369, and net_adm:names() returns
    {error,address} although the node is registered."""
    if ERL is None:
        need("erl")
    port = free_port()
    p = activate(impl, ["127.0.0.1:%d", "[::1]:%d"], port)
    stopper(p)
    code = ('R = net_adm:names(), io:format("NAMES ~p~n", [R]), halt().')
    node = "sd%d" % os.getpid()
    r = subprocess.run([ERL, "-sname", node, "-setcookie", "epmdpytest", "-start_epmd", "false",
                        "-noshell", "-noinput", "-eval", code],
                       env=base_env(ERL_EPMD_PORT=str(port), HOME=str(tmp_path)),
                       capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    if impl == "py":
        assert 'NAMES {ok,[{"%s",' % node in out, out
    else:
        assert "NAMES {error,address}" in out, out


# -- LISTEN_PID ----------------------------------------------------------------

def on_fd3(sock, impl, own_pid=False):
    """A command that moves *sock* to fd 3 (and, if *own_pid*, sets
    LISTEN_PID to its own PID) and execs *impl* -systemd, as a service
    manager does; a stand-in for systemd, which cannot run here as PID 1."""
    code = ("import os, sys; os.dup2(%d, 3); os.close(%d)%s; os.execv(sys.argv[1], sys.argv[1:])"
            % (sock.fileno(), sock.fileno(),
               "; os.environ['LISTEN_PID'] = str(os.getpid())" if own_pid else ""))
    return [sys.executable, "-c", code] + exe(impl) + ["-systemd"]


@pytest.mark.parametrize("pid,message", [
    (None, b"systemd provides no sockets"),
    ("1", b"systemd provides no sockets"),
    ("abc", b"cannot obtain sockets from systemd"),
    ("", b"cannot obtain sockets from systemd"),
])
def test_listen_pid_required(impl, pid, message):
    """As sd_listen_fds(): a LISTEN_FDS without LISTEN_PID naming us (a
    stray one inherited from elsewhere) gives no sockets, even with a
    listening socket on fd 3; an unparsable LISTEN_PID is OTP's error.  Both
    daemons exit 1."""
    stray = socket.socket()
    stray.bind(("127.0.0.1", 0))
    stray.listen()
    env = base_env(LISTEN_FDS="1")
    if pid is not None:
        env["LISTEN_PID"] = pid
    r = subprocess.run(on_fd3(stray, impl), env=env, capture_output=True, timeout=30,
                       pass_fds=(stray.fileno(),))
    stray.close()
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_listen_pid_ours_is_served():
    """LISTEN_PID set to the daemon's own PID (a shell that execs it): the
    socket on fd 3 is served."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    p = subprocess.Popen(on_fd3(srv, "py", own_pid=True), env=base_env(LISTEN_FDS="1"),
                         pass_fds=(srv.fileno(),), stderr=subprocess.PIPE)
    srv.close()
    try:
        assert wait_until(lambda: _names(port, "127.0.0.1") is not None, 15)
        assert names(port, "127.0.0.1")[0] == port
    finally:
        p.terminate()
        p.wait(5)

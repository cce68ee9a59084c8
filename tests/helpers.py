"""Helpers for the black-box tests: start daemons, speak the wire protocol.

Everything here talks to real processes over real sockets on loopback (or on
this host's own non-loopback addresses); nothing is mocked.
"""

import errno
import glob
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPMD_PY = ROOT / "epmd.py"
REQUIRE_ERLANG = os.environ.get("EPMD_TEST_REQUIRE_ERLANG") == "1"
# The interpreter that runs epmd.py, as daemon and as client, in the tests:
# $EPMD_TEST_PYTHON (`make test-pythons` sets it to each Python it finds),
# else the one running the tests.
DAEMON_PYTHON = os.environ.get("EPMD_TEST_PYTHON") or sys.executable
OURS = (DAEMON_PYTHON, str(EPMD_PY))

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")


def need(what, package="erlang-base"):
    """Skip for a missing tool (Erlang/OTP by default), or fail when CI requires it."""
    import pytest  # only tests call this; helpers stays importable without pytest
    msg = "needs %s (install Debian's %s)" % (what, package)
    if REQUIRE_ERLANG:
        pytest.fail(msg + "; EPMD_TEST_REQUIRE_ERLANG=1 makes this a failure")
    pytest.skip(msg)


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_otp_epmd():
    """Return the path of OTP's own epmd binary, or None.

    $EPMD_TEST_OTP_EPMD wins; then the erts directories of an installed OTP;
    then an `epmd` on PATH that is a compiled binary (not our script).
    """
    env = os.environ.get("EPMD_TEST_OTP_EPMD")
    if env:
        return env if os.access(env, os.X_OK) else None
    for cand in sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")) + [shutil.which("epmd") or ""]:
        if cand and os.access(cand, os.X_OK) and _is_elf(cand):
            return cand
    return None


OTP_EPMD = find_otp_epmd()


def base_env(**extra):
    """os.environ without the variables that steer epmd (ERL_EPMD_*, systemd's
    LISTEN_* and NOTIFY_SOCKET), plus *extra*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ERL_EPMD_")
           and k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")}
    env.update(extra)
    return env
ERL = shutil.which("erl")


def _bindable(family, host, port, reuse=False):
    s = socket.socket(family, socket.SOCK_STREAM)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _worker_slice(low, high):
    """The part of [low, high) that is this pytest-xdist worker's own
    ($PYTEST_XDIST_WORKER gwN of $PYTEST_XDIST_WORKER_COUNT), or all of it
    outside xdist: two workers never draw the same value."""
    try:
        i = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
        n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        i, n = 0, 1
    if n <= 1 or not 0 <= i < n:
        return low, high
    width = (high - low) // n
    return low + i * width, low + (i + 1) * width


def free_port():
    """A TCP port free on 127.0.0.1, ::1 and the wildcard addresses, below the
    ephemeral range and never 4369.  Under pytest-xdist each worker draws from
    its own slice of the range, so a port one worker has picked but not yet
    bound is never handed to another."""
    low, high = _worker_slice(20000, 32001)
    for _ in range(500):
        port = random.randint(low, high - 1)
        if port == 4369:
            continue
        if all(_bindable(f, h, port) for f, h in ((socket.AF_INET, "0.0.0.0"),
                                                   (socket.AF_INET6, "::"))):
            return port
    raise RuntimeError("no free port")


def host_addresses(family):
    """Non-loopback addresses of this host in *family* (from `ip`), or []."""
    flag = "-4" if family == socket.AF_INET else "-6"
    try:
        out = subprocess.run(["ip", flag, "-o", "addr", "show", "scope", "global"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    addrs = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts or "inet6" in parts:
            i = parts.index("inet" if family == socket.AF_INET else "inet6")
            addrs.append(parts[i + 1].split("/")[0])
    return addrs


# -- the wire ---------------------------------------------------------------

def frame(payload):
    return U16.pack(len(payload)) + payload


def alive2(name, port=5000, nodetype=77, proto=0, highvsn=6, lowvsn=5, extra=b"", nlen=None, elen=None):
    """An ALIVE2_REQ payload (no length prefix)."""
    if isinstance(name, str):
        name = name.encode()
    return (struct.pack(">BHBBHHH", 120, port, nodetype, proto, highvsn, lowvsn,
                        len(name) if nlen is None else nlen)
            + name + U16.pack(len(extra) if elen is None else elen) + extra)


def connect(port, host="127.0.0.1", source=None, timeout=5.0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def read_to_eof(sock, timeout=5.0):
    """Read until the peer closes; return the bytes.  A reset after (or instead
    of) data counts as the end, as OTP's epmd resets when it closes with unread
    input.  Raises socket.timeout if the peer neither closes nor resets."""
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        if time.monotonic() > deadline:
            raise socket.timeout("no EOF after %.1f s" % timeout)
    return b"".join(chunks)


def is_open(sock, wait=0.5):
    """True if *sock* is still open from the server's side after *wait* seconds
    (nothing to read, no EOF)."""
    sock.settimeout(wait)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        return True
    except ConnectionResetError:
        return False
    return bool(data)


def request(port, payload, host="127.0.0.1", source=None, raw=False, timeout=5.0):
    """Send one request (framed unless *raw*) and return the whole reply."""
    with connect(port, host, source) as s:
        s.sendall(payload if raw else frame(payload))
        return read_to_eof(s, timeout)


def register(epmd_port, name, host="127.0.0.1", **kw):
    """Register *name* (keywords as for alive2); return (socket, reply bytes)."""
    s = connect(epmd_port, host)
    s.sendall(frame(alive2(name, **kw)))
    want = 6 if kw.get("highvsn", 6) >= 6 else 4
    reply = b""
    s.settimeout(5)
    while len(reply) < want:
        data = s.recv(want - len(reply))
        if not data:
            break
        reply += data
    return s, reply


def names(port, host="127.0.0.1"):
    """NAMES_REQ: return (port in the header, list of lines as bytes)."""
    reply = request(port, b"n", host)
    assert len(reply) >= 4, reply
    return U32.unpack_from(reply)[0], reply[4:].splitlines(keepends=True)


def registered(port):
    """Names listed by NAMES_REQ, as bytes, in reply order."""
    _, lines = names(port)
    out = []
    for line in lines:
        assert line.startswith(b"name ") and line.endswith(b"\n"), line
        out.append(line[5:line.rindex(b" at port ")])
    return out


def names_or_none(port, host="127.0.0.1"):
    """names(port, host), or None when no daemon answers."""
    try:
        return names(port, host)
    except OSError:
        return None


def names_port_or_none(port, host="127.0.0.1"):
    """The port in a NAMES reply's header, or None when no daemon answers."""
    got = names_or_none(port, host)
    return None if got is None else got[0]


def registered_or_empty(port):
    """registered(port), or [] when no daemon answers."""
    try:
        return registered(port)
    except OSError:
        return []


def without_served_line(err):
    """*err* less the line -daemon prints when an epmd already serves its
    port (D5; not when erl runs it), and less the D15 syslog warning."""
    lines = without_syslog_warning(err).splitlines(keepends=True)
    return b"".join(line for line in lines if not line.startswith(b"epmd: an epmd already serves port "))


def without_syslog_warning(err):
    """*err* less the D15 warning that -daemon prints when /dev/log is missing."""
    lines = err.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.startswith(b"epmd: warning: no syslog at "))


def wait_until(pred, timeout=5.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# -- daemons ----------------------------------------------------------------

def pin(cpu):
    """Pin the calling process to *cpu* when this machine has more than one
    (benchmarks keep the daemon and its load apart); no-op otherwise.  As a
    Popen's preexec_fn: ``preexec_fn=lambda: pin(1)``."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def stop_process(proc, timeout=3.0):
    """End *proc* (a Popen we started) if it still runs: SIGTERM, then
    SIGKILL after *timeout* seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Daemon:
    """One epmd process (ours or OTP's) started by a test, killed by PID."""

    def __init__(self, impl, port, args, env, tmp):
        self.impl = impl
        self.port = port
        self.args = list(args)
        self.env = env
        self.stderr_path = tmp / ("epmd-%s-%d-%d.err" % (impl, port, random.randint(0, 1 << 30)))
        self.proc = None
        self.nofile = None          # (soft, hard) RLIMIT_NOFILE for the daemon
        self.cpu = None             # the CPU to pin the daemon to (benchmarks), see pin()
        self.exe = None             # interpreter and script to run instead of ours

    @property
    def pid(self):
        return self.proc.pid

    def command(self):
        exe = list(OURS) if self.impl == "py" else [OTP_EPMD]
        if self.exe:
            exe = list(self.exe)
        return exe + self.args

    def start(self, wait=True):
        self._err = open(self.stderr_path, "wb")
        limit, cpu = self.nofile, self.cpu

        def preexec():
            if limit:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            if cpu is not None:
                pin(cpu)
        self.proc = subprocess.Popen(self.command(), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err, close_fds=True,
                                     preexec_fn=preexec)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, host="127.0.0.1", timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s epmd exited with %s: %s"
                                   % (self.impl, self.proc.returncode, self.stderr()))
            try:
                reply = request(self.port, b"n", host, timeout=5)
                if len(reply) >= 4:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("%s epmd not ready on port %d: %s" % (self.impl, self.port, self.stderr()))

    def alive(self):
        return self.proc.poll() is None

    def wait_exit(self, timeout=5.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self):
        try:
            return self.stderr_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        stop_process(self.proc)
        self._err.close()


# -- real Erlang nodes -----------------------------------------------------------

ECHO_LOOP = ("register(echo, self()), "
             "L = fun Loop() -> receive {From, M} -> From ! {echo, M}, Loop() end end, L().")


class Nodes:
    """Erlang nodes (`erl -sname`) registering with the epmd on *epmd_port*,
    started by one test or script, each killed by PID at the end."""

    def __init__(self, epmd_port, tmp_path):
        self.env = base_env(ERL_EPMD_PORT=str(epmd_port), HOME=str(tmp_path))
        self.procs = []
        self.tag = "%06d" % random.randint(0, 999999)

    def name(self, base):
        return "%s_%s" % (base, self.tag)

    def cmd(self, name, code):
        return [ERL, "-sname", name, "-setcookie", "epmdpytest", "-start_epmd", "false",
                "-noshell", "-noinput", "-eval", code]

    def start(self, base, code=ECHO_LOOP):
        p = subprocess.Popen(self.cmd(self.name(base), code), env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def run(self, base, code, timeout=60):
        p = subprocess.Popen(self.cmd(self.name(base), code), env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(p)
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out.decode("utf-8", "replace")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


# -- other clients OTP ships: Java nodes (JInterface), C nodes (ei) ----------------

CLIENTS = Path(__file__).resolve().parent / "clients"


def find_jinterface_jar():
    """OtpErlang.jar of Debian's erlang-jinterface ($EPMD_TEST_OTPERLANG_JAR
    wins), or None."""
    env = os.environ.get("EPMD_TEST_OTPERLANG_JAR")
    if env:
        return env if os.path.isfile(env) else None
    jars = sorted(glob.glob("/usr/lib/erlang/lib/jinterface-*/priv/OtpErlang.jar"))
    return jars[-1] if jars else None


def find_erl_interface():
    """The erl_interface directory of Debian's erlang-dev (include/ei.h and
    lib/libei.a), or None."""
    for d in sorted(glob.glob("/usr/lib/erlang/lib/erl_interface-*"), reverse=True):
        if os.path.isfile(os.path.join(d, "include", "ei.h")) and \
                os.path.isfile(os.path.join(d, "lib", "libei.a")):
            return d
    return None


def lib_version(path):
    """'jinterface-1.13.1' from a path under /usr/lib/erlang/lib/, or ''."""
    m = re.search(r"/lib/([a-z_]+-[0-9][0-9.]*)", str(path))
    return m.group(1) if m else ""


def build_jnode(outdir):
    """Compile tests/clients/JNode.java into *outdir* with javac against
    OtpErlang.jar; return the java command line up to the program's own
    arguments (with JInterface's OtpEpmd trace on, level 4)."""
    jar = find_jinterface_jar()
    subprocess.run(["javac", "-cp", jar, "-d", str(outdir), str(CLIENTS / "JNode.java")],
                   check=True, capture_output=True, timeout=120)
    return ["java", "-DOtpConnection.trace=4", "-cp", "%s:%s" % (jar, outdir), "JNode"]


def build_cnode(outdir):
    """Compile tests/clients/cnode.c into *outdir* with cc against libei.a;
    return the executable's path."""
    ei = find_erl_interface()
    exe = str(Path(outdir) / "cnode")
    subprocess.run(["cc", "-O1", "-Wall", "-D_REENTRANT", "-I", os.path.join(ei, "include"),
                    "-o", exe, str(CLIENTS / "cnode.c"), "-L", os.path.join(ei, "lib"),
                    "-lei", "-lpthread"], check=True, capture_output=True, timeout=120)
    return exe


class LineClient:
    """A client program that takes commands on stdin, one a line, and prints
    lines on stdout (stderr with them), read by a thread; killed by PID at
    the end."""

    def __init__(self, argv, env):
        import queue
        import threading
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines = []
        self._q = queue.Queue()

        def read():
            for line in self.proc.stdout:
                self._q.put(line.rstrip("\n"))
            self._q.put(None)
        threading.Thread(target=read, daemon=True).start()

    def expect(self, prefix, timeout=30.0):
        """The next line starting with *prefix* (lines before it are kept in
        .lines); AssertionError with everything read if none comes."""
        import queue
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError("no line %r from %s; read:\n%s"
                                     % (prefix, self.proc.args[0], "\n".join(self.lines)))
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def ask(self, command, prefix, timeout=30.0):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.expect(prefix, timeout)

    def close(self, timeout=20.0):
        """Close stdin (the program's cue to end) and wait; kill if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        self.drain()
        return rc

    def drain(self, timeout=5.0):
        """Keep in .lines whatever the program printed up to its end."""
        import queue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def port_please(port, name):
    """PORT_PLEASE2_REQ for *name* (str): the node's port, or None."""
    reply = request(port, b"z" + name.encode())
    assert len(reply) >= 2 and reply[0] == 119, reply
    if reply[1] != 0:
        return None
    return U16.unpack_from(reply, 2)[0]


# -- a second host: a network namespace ----------------------------------------

NSCLIENT = Path(__file__).resolve().parent / "nsclient.py"


class NetNS:
    """A network namespace joined to this host by a veth pair, for tests that
    need a peer on another host.  Addresses (benchmarking and documentation
    ranges, reachable only between this host and the namespace): this host
    198.18.N.1 and 2001:db8:N::1, the namespace 198.18.N.2 and 2001:db8:N::2.
    """

    def __init__(self):
        low, high = _worker_slice(1, 251)      # xdist workers: disjoint subnets
        self.n = random.randint(low, high - 1)
        tag = "%d%03d" % (os.getpid() % 1000, self.n)
        self.name = "epmdt" + tag
        self.host_if, self.ns_if = "eph" + tag, "epn" + tag
        self.host4, self.peer4 = "198.18.%d.1" % self.n, "198.18.%d.2" % self.n
        self.host6, self.peer6 = "2001:db8:%x::1" % self.n, "2001:db8:%x::2" % self.n

    def ip(self, *args):
        subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=20)

    def create(self):
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.ip("link", "set", self.ns_if, "netns", self.name)
        self.ip("addr", "add", self.host4 + "/24", "dev", self.host_if)
        self.ip("addr", "add", self.host6 + "/64", "dev", self.host_if, "nodad")
        self.ip("link", "set", self.host_if, "up")
        self.ip("-n", self.name, "addr", "add", self.peer4 + "/24", "dev", self.ns_if)
        self.ip("-n", self.name, "addr", "add", self.peer6 + "/64", "dev", self.ns_if, "nodad")
        self.ip("-n", self.name, "link", "set", self.ns_if, "up")
        self.ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def destroy(self):
        for args in (("netns", "del", self.name), ("link", "del", self.host_if)):
            try:
                self.ip(*args)
            except (subprocess.SubprocessError, OSError):
                pass

    def cmd(self, *args):
        return ["ip", "netns", "exec", self.name, sys.executable, str(NSCLIENT)] + [str(a) for a in args]

    def request(self, host, port, payload):
        """Send one framed request from inside the namespace; return the reply."""
        p = subprocess.run(self.cmd("request", host, port, payload.hex()), capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return bytes.fromhex(p.stdout.strip())

    def hold(self, host, port, n):
        """Open *n* idle connections from the namespace; return (process, how
        many connected).  Closing the process's stdin releases them."""
        p = subprocess.Popen(self.cmd("hold", host, port, n), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        return p, int(p.stdout.readline())


def proc_fds(pid):
    """How many descriptors process *pid* has open."""
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_cpu_split(pid):
    """(user, system) CPU seconds of process *pid*."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def proc_cpu(pid):
    """User + system CPU seconds of process *pid*."""
    return sum(proc_cpu_split(pid))


def proc_status_kb(pid, field):
    """The kB figure of *field* (e.g. "VmRSS", "VmHWM") in /proc/PID/status."""
    prefix = field + ":"
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[1])
    raise RuntimeError("no %s for process %d" % (field, pid))


def proc_rss_kb(pid):
    """Resident set size of process *pid*, in kB."""
    return proc_status_kb(pid, "VmRSS")


def proc_hwm_kb(pid):
    """Peak resident set size (VmHWM) of process *pid*, in kB."""
    return proc_status_kb(pid, "VmHWM")


# -- logs ---------------------------------------------------------------------

def log_shape(log):
    """The log with what legitimately differs between two runs blanked out:
    timestamps, numbers, and the bytes (not the layout) of hexdump rows."""
    out = []
    for line in log.split("\r\n"):
        if line.startswith("***** "):
            m = re.match(r"^(\*\*\*\*\* [0-9a-f]{8})((?:  ?[ 0-9a-f]{2}){16}|.*?)  \|(.*)\|$", line)
            assert m, line
            hexpart = re.sub(r"[0-9a-f]{2}", "xx", m.group(2))
            out.append("%s%s  |%s|" % (m.group(1), hexpart, "." * len(m.group(3))))
        else:
            line = re.sub(r"^epmd: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}: ", "epmd: <time>: ", line)
            out.append(re.sub(r"\d+", "N", line))
    return out


# -- fuzzing ------------------------------------------------------------------

VALID = [alive2("fz", extra=b"e"), b"n", b"d", b"zfz", b"zkeep0", b"sfz", b"k", alive2("keep0")]


def mutate(rng, payload):
    """A valid request with bytes flipped, cut, extended, or framed wrongly."""
    data = bytearray(frame(payload))
    kind = rng.randrange(7)
    if kind == 0 and len(data) > 2:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(2, len(data))] = rng.randrange(256)
    elif kind == 1:
        data = data[:rng.randrange(len(data) + 1)]
    elif kind == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    elif kind == 3:
        data += frame(rng.choice(VALID))
    elif kind == 4:
        data[0:2] = U16.pack(rng.choice([0, 1, 2, 3057, 3058, 0xFFFF, rng.randrange(65536)]))
    elif kind == 5:
        data = bytearray(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
    return bytes(data)


def send_fuzzed(port, data):
    """Send *data* on a new connection, half-close, and read whatever comes."""
    try:
        with connect(port, timeout=3) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            read_to_eof(s, 3)
    except OSError:
        pass


# -- a lookup load, for restarts and hand-overs ----------------------------------

class LookupLoad:
    """PORT_PLEASE2_REQs for *names* (bytes), round robin, at about *rate*
    per second from a thread, until stop().  Counts ``ok`` (PORT2_RESP with
    result 0), ``missing`` (result 1: the name is not registered), ``errors``
    (refused, reset, timed out or a short reply) and keeps the monotonic times
    of the failures (missing or error) and the slowest lookup (seconds)."""

    def __init__(self, port, names, rate=100.0, host="127.0.0.1"):
        import threading
        self.port, self.names, self.rate, self.host = port, list(names), rate, host
        self.ok = self.missing = self.errors = 0
        self.fail_times = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        i = 0
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            name = self.names[i % len(self.names)]
            i += 1
            t0 = time.monotonic()
            try:
                reply = request(self.port, b"z" + name, self.host, timeout=5)
            except OSError:
                reply = None
            t1 = time.monotonic()
            self.slowest = max(self.slowest, t1 - t0)
            if reply is not None and reply[:2] == b"w\x00":
                self.ok += 1
            else:
                if reply is not None and reply[:2] == b"w\x01":
                    self.missing += 1
                else:
                    self.errors += 1
                self.fail_times.append(t1)
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    @property
    def failed(self):
        return self.missing + self.errors

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        return self


def dump(port, host="127.0.0.1"):
    """DUMP_REQ: the whole reply (header and NUL-terminated lines)."""
    return request(port, b"d", host)


def creation_of(reply):
    """The creation in an ALIVE2_X_RESP ('v', result, u32) or ALIVE2_RESP
    ('y', result, u16) reply; None for an error or a short reply."""
    if len(reply) == 6 and reply[:2] == b"v\x00":
        return U32.unpack_from(reply, 2)[0]
    if len(reply) == 4 and reply[:2] == b"y\x00":
        return U16.unpack_from(reply, 2)[0]
    return None


def register_mixed(port, n, tag="n"):
    """Register *n* nodes over raw sockets with mixed fields: node types 77
    (normal) and 72 (hidden), highest version 6 (32-bit creation in
    ALIVE2_X_RESP) and 5 (16-bit, ALIVE2_RESP), extras of arbitrary bytes
    (NULs, 0xff) of several lengths, UTF-8 names.  Returns a list of dicts:
    sock, name (bytes), creation, highvsn."""
    out = []
    for i in range(n):
        name = ("%s%d_\u00f8" % (tag, i)).encode()
        highvsn = 6 if i % 2 == 0 else 5
        extra = bytes((i * 7 + k) % 256 for k in range(i % 5 * 3)) + (b"\0\xff" if i % 3 else b"")
        sock, reply = register(port, name, port=10000 + i, nodetype=77 if i % 4 else 72,
                               highvsn=highvsn, lowvsn=5, extra=extra)
        creation = creation_of(reply)
        if creation is None:
            sock.close()
            raise RuntimeError("registration of %r refused: %r" % (name, reply))
        out.append({"sock": sock, "name": name, "creation": creation, "highvsn": highvsn})
    return out


# -- a stand-in for systemd ------------------------------------------------------

_LAUNCH = """
import fcntl, os, sys
i = sys.argv.index("--")
orig = [int(fd) for fd in sys.argv[1:i]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in orig]
for n, fd in enumerate(high):
    os.dup2(fd, 3 + n)
for fd in orig:                 # as systemd: only 3 .. 3 + LISTEN_FDS - 1 are passed
    if fd >= 3 + len(orig):
        os.close(fd)
env = dict(os.environ, LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[i + 1], sys.argv[i + 1:], env)
"""


class SystemdStandIn:
    """A stand-in for systemd managing ``epmd.py -systemd`` with a socket unit
    and a file descriptor store, for CI where systemd is not PID 1.

    Written from systemd's documentation, not its code:
    - sd_notify(3): the service sends datagrams to the AF_UNIX socket named
      by $NOTIFY_SOCKET, newline-separated VAR=VALUE lines (READY=1,
      RELOADING=1 with MONOTONIC_USEC=, STATUS=, MAINPID=, ERRNO=);
      FDSTORE=1 stores the descriptors attached as SCM_RIGHTS under FDNAME=
      (default "stored"), FDSTOREREMOVE=1 closes and drops all entries named
      FDNAME=.
    - "The File Descriptor Store" (systemd.io): at most FileDescriptorStoreMax
      entries (*limit*, announced to the service in $FDSTORE); an entry that
      shows POLLHUP or POLLERR is closed and dropped; the entries are passed
      back on the next start, after the socket unit's descriptors.
    - sd_listen_fds(3): the descriptors start at 3, $LISTEN_FDS counts them,
      $LISTEN_PID is the service's PID, $LISTEN_FDNAMES names them, ':'
      separated (a socket unit's descriptors by the unit's name).
    *messages* keeps (monotonic time, {VAR: VALUE}) of every datagram.
    """

    def __init__(self, tmp, port, args=(), limit=64, unit="epmd.socket"):
        import threading
        self.tmp, self.port, self.args, self.limit, self.unit = tmp, port, list(args), limit, unit
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(socket.SOMAXCONN)
        self.notify_path = str(tmp / ("notify-%d" % port))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.store = []             # [(name, fd)] in the order stored
        self.named = {}             # name -> [(name, fd)], and fd -> (name, fd)
        self.messages = []
        self.lock = threading.Lock()
        self.proc = None
        self.epmd_py = EPMD_PY          # the epmd.py it runs
        self.err_path = tmp / ("systemd-standin-%d.err" % port)
        self._err = open(self.err_path, "ab")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # the notify socket and the store
    def _serve(self):
        # One epoll for the notify socket and every stored descriptor (each
        # watched for nothing: EPOLLHUP and EPOLLERR are always reported),
        # kept up to date as entries come and go, so a message costs the
        # same however full the store is, as in systemd.
        import select
        self.epoll = select.epoll()
        self.epoll.register(self.notify, select.EPOLLIN)
        while not self._stop.is_set():
            for fd, ev in self.epoll.poll(0.1):
                if fd == self.notify.fileno():
                    self._receive()
                elif ev & (select.EPOLLHUP | select.EPOLLERR):
                    with self.lock:
                        if fd in self.named:
                            self._drop(self.named[fd])
        self.epoll.close()

    def _keep(self, entry):
        self.store.append(entry)
        self.named.setdefault(entry[0], []).append(entry)
        self.named[entry[1]] = entry
        try:
            self.epoll.register(entry[1], 0)
        except (OSError, ValueError):       # the same file twice: watched once
            pass

    def _drop(self, entry):
        self.store.remove(entry)
        self.named[entry[0]].remove(entry)
        del self.named[entry[1]]
        try:
            self.epoll.unregister(entry[1])
        except (OSError, ValueError, KeyError):
            pass
        os.close(entry[1])

    def _receive(self):
        import array
        fds = array.array("i")
        try:
            data, anc, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(253 * fds.itemsize))
        except OSError:
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        with self.lock:
            self.messages.append((time.monotonic(), fields))
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                for fd in fds:
                    if len(self.store) < self.limit:
                        self._keep((name, fd))
                    else:
                        os.close(fd)
                return
            if fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME")
                for entry in list(self.named.get(name, ())):
                    self._drop(entry)
        for fd in fds:                      # not for the store: dropped
            os.close(fd)

    def stored_names(self):
        with self.lock:
            return [name for name, _ in self.store]

    def saw(self, var, value="1"):
        """How many datagrams set *var* to *value*."""
        with self.lock:
            return sum(1 for _, m in self.messages if m.get(var) == value)

    # the service
    def start(self):
        with self.lock:
            entries = [(self.unit, self.listener.fileno())] + list(self.store)
        env = base_env(NOTIFY_SOCKET=self.notify_path, LISTEN_FDS=str(len(entries)),
                       LISTEN_FDNAMES=":".join(name for name, _ in entries),
                       FDSTORE=str(self.limit))
        if not self.limit:
            del env["FDSTORE"]
        fds = [fd for _, fd in entries]
        cmd = ([sys.executable, "-c", _LAUNCH] + [str(fd) for fd in fds] + ["--", sys.executable,
               str(self.epmd_py), "-systemd"] + self.args)
        self.proc = subprocess.Popen(cmd, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, count, timeout=15.0):
        """Wait until READY=1 was received *count* times in all."""
        return wait_until(lambda: self.saw("READY") >= count, timeout)

    def kill9(self):
        self.proc.kill()
        self.proc.wait(5)

    def stderr(self):
        return self.err_path.read_bytes().decode("utf-8", "replace")

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._stop.set()
        self._thread.join(5)
        with self.lock:
            for _, fd in self.store:
                os.close(fd)
            self.store = []
            self.named = {}
        self.notify.close()
        self.listener.close()
        self._err.close()


def listening_on(pid, port):
    """The (address, port) pairs process *pid* listens on at *port*, sorted."""
    return [pair for pair in listening_sockets(pid) if pair[1] == port]


def find_pids(*needles):
    """PIDs whose command line contains every string of *needles*."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if all(n.encode() in argv for n in needles):
            pids.append(int(entry))
    return pids


def daemon_pids(port):
    """PIDs of the epmd.py daemons started with -daemon on *port*."""
    return find_pids(str(EPMD_PY), "-daemon", str(port))


def listening_sockets(pid):
    """The (address, port) pairs process *pid* listens on, sorted, read from
    /proc/<pid>/net/tcp{,6} (so in the process's own network namespace) and
    matched to the process's socket inodes."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table, fam in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "0A" or parts[9] not in inodes:
                    continue
                hexaddr, hexport = parts[1].split(":")
                raw = bytes.fromhex(hexaddr)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(fam, words), int(hexport, 16)))
    return sorted(found)


class BareNS:
    """A network namespace of its own with only loopback (up), IPv6 on or
    off (net.ipv6.conf.{all,default}.disable_ipv6=1 before lo comes up, so
    ::1 does not exist), and extra addresses on lo: 192.0.2.10 and, with
    IPv6, 2001:db8::10.  Commands run inside it through `ip netns exec`,
    which execs them, so a Popen's pid is the command's."""

    ADDR4 = "192.0.2.10"
    ADDR6 = "2001:db8::10"

    def __init__(self, ipv6=True):
        self.ipv6 = ipv6
        self.name = "epmdb%d%s%04d" % (os.getpid() % 100000, "6" if ipv6 else "4",
                                       random.randint(0, 9999))

    def _ip(self, *args):
        subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=20)

    def create(self):
        self._ip("netns", "add", self.name)
        if not self.ipv6:
            for scope in ("all", "default", "lo"):
                self._ip("netns", "exec", self.name, "sysctl", "-q", "-w",
                         "net.ipv6.conf.%s.disable_ipv6=1" % scope)
        self._ip("-n", self.name, "link", "set", "lo", "up")
        self._ip("-n", self.name, "addr", "add", self.ADDR4 + "/32", "dev", "lo")
        if self.ipv6:
            self._ip("-n", self.name, "addr", "add", self.ADDR6 + "/128", "dev", "lo", "nodad")
        return self

    def destroy(self):
        try:
            self._ip("netns", "del", self.name)
        except (subprocess.SubprocessError, OSError):
            pass

    def argv(self, *args):
        return ["ip", "netns", "exec", self.name] + [str(a) for a in args]


# -- diagnostics: Erlang nodes, refusal floods, PORT_PLEASE2 latency -------------

def erl_node(name, epmd_port, home, code="timer:sleep(infinity).", hidden=False):
    """Start a real Erlang node ``-sname name`` registering with the epmd on
    *epmd_port* (never starting one); return its Popen.  `erl` execs
    beam.smp, so the Popen's pid is the node's."""
    cmd = [ERL, "-sname", name, "-setcookie", "epmdpytest", "-start_epmd", "false",
           "-noshell", "-noinput"] + (["-hidden"] if hidden else []) + ["-eval", code]
    return subprocess.Popen(cmd, env=base_env(ERL_EPMD_PORT=str(epmd_port), HOME=str(home)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def port_please_latencies(port, name, count, rate=None):
    """Time *count* PORT_PLEASE2_REQ round trips for *name* (bytes), each on
    a new connection as nodes make them: connect, send, read to EOF; at most
    *rate* a second if given (paced, so that the samples spread over
    count/rate seconds).  Returns the durations in seconds; asserts every
    answer is a PORT2_RESP."""
    payload = frame(b"z" + name)
    out = []
    start = time.monotonic()
    for i in range(count):
        if rate:
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            reply = read_to_eof(s)
        out.append(time.perf_counter() - t0)
        assert reply[:2] == b"w\x00", reply
    return out


def latency_summary(samples):
    """Median, 90th and 99th percentile and maximum of *samples* (seconds), in µs."""
    s = sorted(samples)

    def pct(p):
        return s[min(len(s) - 1, int(p * len(s)))] * 1e6
    return {"n": len(s), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": s[-1] * 1e6}


def refusal_flood(port, rate, duration, names=10, fresh=False):
    """Hold *names* registrations (flood0, flood1, ...) and send duplicate
    ALIVE2_REQs for them round-robin at *rate* per second for *duration*
    seconds, each on a new connection that the daemon refuses (result 1).
    With *fresh*, the name's registration is dropped and made again just
    before each duplicate, so the daemon has never looked up its holder.
    Returns the number of refusals seen.  Meant to run in its own process
    (flood_process) so the measuring client keeps the interpreter to itself."""
    held = [register(port, "flood%d" % i, port=30000 + i)[0] for i in range(names)]
    refused = 0
    start = time.monotonic()
    i = 0
    while True:
        due = start + i / rate
        now = time.monotonic()
        if now - start >= duration:
            break
        if due > now:
            time.sleep(due - now)
        if fresh:
            held[i % names].close()
            held[i % names] = register(port, "flood%d" % (i % names), port=30000 + i % names)[0]
        s, reply = register(port, "flood%d" % (i % names), port=31000)
        if reply[:2] == b"v\x01":
            refused += 1
        s.close()
        i += 1
    for s in held:
        s.close()
    return refused


def flood_process(port, rate, duration, names=10, fresh=False):
    """Run refusal_flood in a child process; return its Popen (stdout: the
    number of refusals).  The registrations it holds name its pid."""
    code = ("from tests import helpers; print(helpers.refusal_flood(%d, %r, %r, %d, %r))"
            % (port, rate, duration, names, fresh))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(ROOT))


def measure_refusal_latency(port, name, count, rate=100.0, settle=0.5, fresh=False,
                            lookup_rate=1000.0):
    """PORT_PLEASE2 latency for *name* on the epmd at *port* (*count*
    lookups paced at *lookup_rate* a second), first without refusals, then
    while flood_process refuses duplicate registrations at *rate* per second
    (*fresh*: see refusal_flood).  Returns (quiet summary, flooded summary, the flood's
    pid); the daemon's log tells how many refusals there were."""
    quiet = latency_summary(port_please_latencies(port, name, count, lookup_rate))
    # long enough for the measurement; the flood ends on its own
    flood = flood_process(port, rate, duration=count / lookup_rate * 2 + 10, names=10,
                          fresh=fresh)
    try:
        time.sleep(settle)
        flooded = latency_summary(port_please_latencies(port, name, count, lookup_rate))
    finally:
        flood.terminate()
        out, _ = flood.communicate(30)
    return quiet, flooded, flood.pid


# -- load ---------------------------------------------------------------------

def run_requests(port, requests, conc=0, start_at=None, spread=0.0, check=None,
                 host="127.0.0.1", timeout=30.0, keep=False):
    """Send each request of *requests* (framed bytes) on a connection of its
    own and read the reply, from one selectors loop of non-blocking clients.

    At most *conc* connections are open at once (0: no limit); the
    connections start at time.time() *start_at* (default now), spread evenly
    over *spread* seconds.  A request is answered when a reply arrives and the
    daemon closes; for the requests whose index is in *keep* (True: all), as
    soon as any reply bytes arrive: for ALIVE2_REQ, whose connection stays
    open; those sockets are returned open.  *check(i, reply)* says whether
    reply i is right (default: any non-empty reply).  Gives up on whatever
    is still open *timeout* seconds after the start.

    Returns a dict: ok, failed (refused, reset, closed without a reply, timed
    out), bad (a reply check() refused), t_last (time.time() of the last
    reply), t_replies (time.time() of every reply, in order), t_started
    (time.time() when the last connection was started), held (the sockets
    kept open).
    """
    import selectors
    sel = selectors.DefaultSelector()
    addr = (host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start_at = time.time() if start_at is None else start_at
    step = spread / len(requests) if requests else 0.0
    out = {"ok": 0, "failed": 0, "bad": 0, "t_last": None, "t_replies": [], "t_started": None,
           "held": []}
    if keep is True:
        keep = range(len(requests))
    keep = frozenset(keep or ())
    pending = 0                     # index of the next request to start
    open_ = 0
    # without a limit on open connections, the sockets are made before the
    # start, so that starting one costs only its connect and send
    ready = [socket.socket(family, socket.SOCK_STREAM) for _ in requests] if not conc else []
    for s in ready:
        s.setblocking(False)
    ready.reverse()
    while time.time() < start_at:
        time.sleep(0.0005)
    deadline = start_at + timeout

    def finish(s, i, reply):
        nonlocal open_
        sel.unregister(s)
        open_ -= 1
        if reply is None:
            out["failed"] += 1
            s.close()
            return
        out["t_last"] = time.time()
        out["t_replies"].append(out["t_last"])
        if check is None or check(i, reply):
            out["ok"] += 1
        else:
            out["bad"] += 1
        if i in keep:
            out["held"].append(s)
        else:
            s.close()

    while pending < len(requests) or open_:
        now = time.time()
        if now > deadline:
            break
        while pending < len(requests) and (not conc or open_ < conc) \
                and start_at + pending * step <= now:
            if ready:
                s = ready.pop()
            else:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                out["failed"] += 1
                pending += 1
                continue
            # an optimistic send, as real clients do: on loopback the
            # handshake is usually over when connect returns
            try:
                sent = s.send(requests[pending]) == len(requests[pending])
            except (BlockingIOError, OSError):
                sent = False
            if sent:
                sel.register(s, selectors.EVENT_READ, [pending, []])
            else:
                sel.register(s, selectors.EVENT_WRITE, [pending, None])
            open_ += 1
            pending += 1
            out["t_started"] = time.time()
        wait = 0.05
        if pending < len(requests) and (not conc or open_ < conc):
            wait = max(0.0, min(wait, start_at + pending * step - time.time()))
        for key, _ in sel.select(wait):
            s, (i, chunks) = key.fileobj, key.data
            if chunks is None:      # connected (or not): send the request
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(s, i, None)
                    continue
                try:
                    s.send(requests[i])
                except OSError:
                    finish(s, i, None)
                    continue
                sel.modify(s, selectors.EVENT_READ, [i, []])
                continue
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:         # a reset: after a reply, it counts as the end
                data = b""
            if data:
                chunks.append(data)
                if i in keep:
                    finish(s, i, b"".join(chunks))
                continue
            finish(s, i, b"".join(chunks) if chunks else None)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        out["failed"] += 1
    for s in ready:
        s.close()
    out["failed"] += len(requests) - pending
    sel.close()
    return out



# -- a node's close racing the next request (issue 19) ----------------------------

RACE_SCENARIOS = ("fin", "reset", "byte", "lookup", "live")


def _alive2_reply(sock):
    """Read an ALIVE2_X_RESP (6 bytes) from *sock*; b"" or less on EOF."""
    reply = b""
    while len(reply) < 6:
        data = sock.recv(6 - len(reply))
        if not data:
            break
        reply += data
    return reply


def _register_raw(port, packet):
    """Connect, send a framed ALIVE2_REQ *packet* at once (as a node does,
    without waiting), return (socket, reply)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(packet)
    return s, _alive2_reply(s)


def _port_please_raw(port, packet):
    """One PORT_PLEASE2_REQ on a new connection, sent at once; the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(packet)
        return read_to_eof(s, 5)


def _end_registration(sock, how):
    """End a registration the way *how* says: "fin" (close), "reset"
    (SO_LINGER 0, so close sends an RST), "byte" (send one byte, then close;
    any byte on a registration's connection ends it)."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "byte":
        sock.send(b"x")
    sock.close()


def race_cycles(port, scenario, cycles, name=b"racer", check_listing=False, deadline=60.0):
    """Run *cycles* cycles of one race *scenario* against the epmd on *port*,
    from one client, with no pause between the steps; return a dict of
    counts: cycles (done before *deadline* seconds), refused (an ALIVE2_REQ
    refused), stale (a PORT_PLEASE2_REQ answered with the port of a node whose
    registration had ended), same_creation (a re-registration given the
    creation its predecessor had), listing_bad (a NAMES reply that did not
    list *name* exactly once, or a DUMP reply that did not list it once as
    active; only with *check_listing*), retries (registrations tried again
    after a refusal, until the name was free).

    Scenarios (each cycle):
      "fin", "reset", "byte": end the registration (see _end_registration),
          then at once register the name again on a new connection;
      "lookup": look the name up (answered: the daemon may cache it), close
          the registration, then at once look it up again: any port in
          that answer is stale; then register again;
      "live": while the name is held, a second ALIVE2_REQ for it on another
          connection: refused is right here (cycles == refused is the pass).
    """
    assert scenario in RACE_SCENARIOS, scenario
    counts = dict(cycles=0, refused=0, stale=0, same_creation=0, listing_bad=0, retries=0)
    ask = frame(b"z" + name)
    stop_at = time.monotonic() + deadline

    def packet(i):
        return frame(alive2(name, port=20000 + i % 7000, nodetype=77, highvsn=6, lowvsn=5))

    def hold(i):
        # Register, trying again (after a short pause) while the old
        # registration has not gone yet; return (socket, creation).
        while True:
            s, reply = _register_raw(port, packet(i))
            got = creation_of(reply)
            if got is not None:
                return s, got
            s.close()
            counts["retries"] += 1
            if time.monotonic() > stop_at:
                raise RuntimeError("%r never registered again: %r" % (name, reply))
            time.sleep(0.002)

    sock, creation = hold(0)
    try:
        for i in range(1, cycles + 1):
            if time.monotonic() > stop_at:
                break
            if scenario == "live":
                s, reply = _register_raw(port, packet(i))
                s.close()
                if creation_of(reply) is None:
                    counts["refused"] += 1
                counts["cycles"] += 1
                continue
            if scenario == "lookup":
                reply = _port_please_raw(port, ask)
                assert reply[:2] == b"w\x00", reply     # registered: found
                _end_registration(sock, "fin")
                reply = _port_please_raw(port, ask)
                if reply[:2] == b"w\x00":
                    counts["stale"] += 1
                sock, new = hold(i)
            else:
                _end_registration(sock, scenario)
                sock, reply = _register_raw(port, packet(i))
                new = creation_of(reply)
                if new is None:
                    counts["refused"] += 1
                    sock.close()
                    sock, new = hold(i)
            if new == creation:
                counts["same_creation"] += 1
            creation = new
            if check_listing:
                _, lines = names(port)
                listed = [ln for ln in lines if ln.startswith(b"name " + name + b" at port ")]
                active = dump(port).count(b"active name     <" + name + b">")
                if len(listed) != 1 or active != 1:
                    counts["listing_bad"] += 1
            counts["cycles"] += 1
    finally:
        sock.close()
    return counts


# -- many sockets on the host -------------------------------------------------------

_HOLD_CONNECTIONS = r"""
import resource, socket, struct, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
linger = struct.pack("ii", 1, 0)
ls = socket.socket()
ls.bind(("127.0.0.1", port))
ls.listen(4096)
socks = []
for _ in range(n):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    socks.append(c)
    c.connect(ls.getsockname())
    a, _ = ls.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    socks.append(a)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
for c in socks:
    c.close()
"""


class ManyConnections:
    """*n* established loopback TCP connections on this host (both ends
    held: 2n descriptors), made by child processes of PER_PROCESS
    connections each (the descriptor limit's hard maximum cannot be raised
    in a container), each to a listening socket of its own on a free port.
    Every socket is closed with SO_LINGER 0, so that no TIME_WAIT entry
    outlives the test; the children end when their stdin closes and are
    killed by PID if they do not.  A context manager; *pids* lists them."""

    PER_PROCESS = 8000

    def __init__(self, n, timeout=120.0):
        self.n = n
        self.timeout = timeout
        self.procs = []

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def __enter__(self):
        try:
            left = self.n
            while left > 0:
                k = min(left, self.PER_PROCESS)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", _HOLD_CONNECTIONS, str(k), str(free_port())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE))
                left -= k
            deadline = time.monotonic() + self.timeout
            for p in self.procs:
                line = p.stdout.readline()
                if line != b"ready\n" or time.monotonic() > deadline:
                    raise RuntimeError("a connection holder failed: %r" % line)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            p.stdout.close()
        self.procs = []
        return False


def established_count():
    """TCP sockets of this network namespace, from /proc/net/sockstat
    ("TCP: inuse N ...")."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                return int(line.split()[2])
    return 0


# -- processes of another user, and many processes (tests/test_bounds.py and
#    tests/tools/bounds_bench.py) ---------------------------------------------

# A process that raises its descriptor limit, opens *count* descriptors, then
# registers each of *names* in turn, printing HELD and holding it until a line
# on stdin, then DONE.  argv: port count name...
HOLDER = r"""
import os, resource, socket, struct, sys, time
port, count, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
count = min(count, hard - 100)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
for name in names:
    n = name.encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack(">H", 13 + len(n)) + struct.pack(">BHBBHHH", 120, 9000, 77, 0, 6, 5, len(n))
              + n + b"\0\0")
    assert s.recv(6)[:2] == b"v\0"
    print("HELD", flush=True)
    sys.stdin.readline()            # hold it until told
    s.close()
print("DONE", flush=True)
"""

# Forks argv[1] children that sleep, prints FORKED, and sleeps (kill its
# process group).
FORKER = r"""
import os, signal, sys
n = int(sys.argv[1])
for _ in range(n):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
print("FORKED", flush=True)
signal.pause()
"""


def become_nobody():
    """preexec_fn: drop to user and group nobody (65534)."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def nobody_command():
    """(interpreter, copy of epmd.py) that user nobody may run, or None."""
    import tempfile
    where = tempfile.mkdtemp(prefix="epmd-nobody-")
    os.chmod(where, 0o755)
    script = os.path.join(where, "epmd.py")
    shutil.copy(EPMD_PY, script)
    os.chmod(script, 0o644)
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            r = subprocess.run([python, "-c", "pass"], preexec_fn=become_nobody, timeout=30,
                               capture_output=True)
        except OSError:
            continue
        if r.returncode == 0:
            return python, script
    return None


def answers_names(port):
    """True if an epmd on 127.0.0.1:*port* answers NAMES_REQ."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(frame(b"n"))
            return len(s.recv(4)) == 4
    except OSError:
        return False

"""What operators meet first: help and version, the process name, syslog,
an inherited SIGINT ignore (issue 12, "The first five minutes" and "Running it
as a service").

Each black-box test runs against epmd.py and OTP's epmd binary alike and
asserts what each does.  The syslog tests need a /dev/log of their own; a
test cannot replace the host's, so it runs the daemon in a private mount
namespace (`unshare --mount`, root) whose /dev is a fresh tmpfs holding only
null, zero, random and urandom bind-mounted from the host, plus, for the
syslog tests, the test's own datagram socket bind-mounted on /dev/log.  The
daemon still shares the host's network, so the test talks to it on loopback.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from helpers import (
    EPMD_PY,
    OTP_EPMD,
    ROOT,
    base_env,
    free_port,
    names,
    need,
    register,
    registered,
    request,
    wait_until,
)

import epmd

pytestmark = pytest.mark.timeout(60)


def exe(impl):
    if impl == "otp" and OTP_EPMD is None:
        need("OTP's epmd binary")
    return [sys.executable, str(EPMD_PY)] if impl == "py" else [OTP_EPMD]


def run(impl, args, env=None, timeout=30):
    p = subprocess.run(exe(impl) + list(args), capture_output=True, timeout=timeout,
                       env=env or base_env())
    return p.returncode, p.stdout, p.stderr


def serving(port):
    try:
        return names(port)[0] == port
    except OSError:
        return False


# -- help and version ----------------------------------------------------------

@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_is_a_request_not_an_error(flag):
    """D14: -h, -help and --help print the usage on stdout and exit 0, with no
    "unknown option"; OTP's epmd knows none of them (usage on stderr, 1)."""
    rc, out, err = run("py", [flag])
    assert (rc, err) == (0, b"")
    assert out.startswith(b"usage: epmd ") and b"unknown option" not in out
    for f in list(epmd.ALL_FLAGS) + list(epmd.INFO_FLAGS):
        assert re.search(rb"(^|[\s\[|,])%s([\s\]|,]|$)" % re.escape(f.encode()), out, re.M), f
    # wherever it stands, and even after a flag with its value
    assert run("py", ["-port", "4370", flag]) == (rc, out, err)
    rc, out, err = run("otp", [flag])
    assert rc == 1 and out == b"" and b"usage: epmd" in err


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version(flag):
    """D14: -version and --version print ``epmd.py <__version__>``, exit 0."""
    assert run("py", [flag]) == (0, b"epmd.py %s\n" % epmd.__version__.encode(), b"")
    rc, out, err = run("otp", [flag])
    assert rc == 1 and out == b"" and b"usage: epmd" in err


def test_version_lives_in_one_place():
    """The version is written once, in epmd.py: pyproject.toml reads it from
    there, man/build.py writes it into the man page, and no other tracked
    file spells it."""
    version = epmd.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True, timeout=30).stdout.split()
    assert "epmd.py" in files
    spelled = [f for f in files if version in (ROOT / f).read_text(errors="replace")]
    assert sorted(spelled) == ["epmd.py", "man/epmd.1"], spelled
    assert 'version = { attr = "epmd.__version__" }' in (ROOT / "pyproject.toml").read_text()
    th = [line for line in (ROOT / "man" / "epmd.1").read_text().splitlines() if line.startswith(".TH")]
    assert th and "epmd.py %s" % version in th[0]


# -- the process name ----------------------------------------------------------

def named_epmd():
    """PIDs `pgrep -x epmd` and `ps -C epmd` report (the process name)."""
    for tool in ("pgrep", "ps"):
        if not shutil.which(tool):
            need(tool, "procps")
    pg = subprocess.run(["pgrep", "-x", "epmd"], capture_output=True, text=True, timeout=10).stdout
    ps = subprocess.run(["ps", "-C", "epmd", "-o", "pid="], capture_output=True, text=True,
                        timeout=10).stdout
    return {int(p) for p in pg.split()}, {int(p) for p in ps.split()}


def test_process_is_named_epmd(start_epmd):
    """`pgrep -x epmd` and `ps -C epmd` find the daemon: epmd.py names its
    process "epmd" as OTP's binary is named (not "python3")."""
    d = start_epmd()
    with open("/proc/%d/comm" % d.pid) as f:
        assert f.read() == "epmd\n"
    by_pgrep, by_ps = named_epmd()
    assert d.pid in by_pgrep and d.pid in by_ps


def _argv(pid):
    """The arguments of process *pid*, or [] if it is gone (other tests'
    daemons come and go)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def test_detached_daemon_is_named_epmd():
    """The -daemon child keeps the name: found by `pgrep -x epmd`."""
    port = free_port()
    assert run("py", ["-daemon", "-port", str(port), "-address", "127.0.0.1"])[0] == 0
    try:
        pids = [pid for pid in named_epmd()[0] if str(port).encode() in _argv(pid)]
        assert len(pids) == 1
    finally:
        assert run("py", ["-port", str(port), "-kill"])[:2] == (0, b"Killed\n")


@pytest.mark.parametrize("proc_ok,ctypes_ok", [(False, True), (False, False), (True, False)])
def test_set_process_name_fallbacks(tmp_path, proc_ok, ctypes_ok):
    """/proc/self/comm first; without it prctl(PR_SET_NAME) through ctypes;
    without either, set_process_name returns False and raises nothing."""
    comm = "/proc/self/comm" if proc_ok else str(tmp_path / "no" / "comm")
    code = ("import sys\n"
            "%s\n"
            "import epmd\n"
            "done = epmd.set_process_name(b'epmd', %r)\n"
            "print(done, open('/proc/self/comm').read().strip())\n"
            % ("" if ctypes_ok else "sys.modules['ctypes'] = None", comm))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    expected = "True epmd" if proc_ok or ctypes_ok else "False %s" % os.path.basename(sys.executable)[:15]
    assert p.stdout.strip() == expected


# -- SIGINT ----------------------------------------------------------------------

def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("inherited", ["ignored", "default"])
def test_inherited_sigint_ignore_is_kept(impl, inherited, tmp_path):
    """A daemon started with SIGINT ignored (a background job of a script)
    keeps ignoring it and serves on, in both daemons.  With SIGINT at its
    default, it ends both: epmd.py exits 0, OTP's dies of the signal."""
    port = free_port()
    p = subprocess.Popen(exe(impl) + ["-port", str(port), "-address", "127.0.0.1"], env=base_env(),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    try:
        assert wait_until(lambda: serving(port), 10)
        s, reply = register(port, "keeper")
        assert reply[:2] == b"v\x00"
        p.send_signal(signal.SIGINT)
        if inherited == "ignored":
            with open("/proc/%d/status" % p.pid) as f:
                ign = int(re.search(r"^SigIgn:\s*(\w+)", f.read(), re.M).group(1), 16)
            assert ign & (1 << (signal.SIGINT - 1))
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(1)
            assert registered(port) == [b"keeper"]
        else:
            assert p.wait(5) == (0 if impl == "py" else -signal.SIGINT)
        s.close()
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(5)


# -- syslog ------------------------------------------------------------------------

class FakeSyslog:
    """Stands in for the syslog module in-process: records openlog and syslog."""
    LOG_USER = 8
    LOG_ERR = 3

    def __init__(self):
        self.calls = []

    def openlog(self, *args, **kw):
        self.calls.append(("openlog", args, kw))

    def syslog(self, *args):
        self.calls.append(("syslog",) + args)


def test_syslog_opened_with_tag_epmd(monkeypatch):
    """Unit: the daemon's log opens syslog as ``epmd`` (no PID, facility
    user) before its first line; Python's default would tag ``epmd.py``."""
    fake = FakeSyslog()
    monkeypatch.setitem(sys.modules, "syslog", fake)
    log = epmd.DebugLog(level=1, is_daemon=True)
    log.dbg_printf(1, "** got %s", "NAMES_REQ")
    log.dbg_tty_printf(1, "not for syslog")
    log.dbg_printf(0, "again")
    assert fake.calls == [("openlog", ("epmd", 0, 8), {}),
                          ("syslog", 3, "epmd: ** got NAMES_REQ"),
                          ("syslog", 3, "epmd: again")]


NS_SETUP = r"""set -e
scratch=$1; log=$2; shift 2
for f in null zero random urandom; do
    touch "$scratch/$f"; mount --bind "/dev/$f" "$scratch/$f"
done
mount -t tmpfs -o mode=755 tmpfs /dev
for f in null zero random urandom; do
    touch "/dev/$f"; mount --bind "$scratch/$f" "/dev/$f"
done
if [ -n "$log" ]; then touch /dev/log; mount --bind "$log" /dev/log; fi
exec "$@"
"""


def in_private_dev(argv, scratch, log_socket=None):
    """*argv* run in a private mount namespace whose /dev has null, zero,
    random, urandom and, if *log_socket* (a path) is given, that socket as
    /dev/log; nothing else.  The host's /dev is untouched."""
    unshare = shutil.which("unshare")
    if not unshare or os.geteuid() != 0:
        need("unshare(1) as root", "util-linux")
    return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", NS_SETUP, "sh",
            str(scratch), str(log_socket or "")] + list(argv)


SYSLOG_LINE = re.compile(rb"^<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (\S+?): (.*)$", re.S)


def test_daemon_syslog_tag_and_levels(impl):
    """With -daemon -d -d, both daemons send the same lines to /dev/log
    (here a stand-in socket, see the module docstring): tag ``epmd`` without
    a PID, priority user.err (11), ``epmd: `` before each message.  Requests
    received reach syslog; replies, registrations, connections and hexdumps
    do not (README, "What reaches syslog")."""
    scratch = tempfile.mkdtemp(prefix="epmdlog")
    logsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logsock.bind(os.path.join(scratch, "log"))
    logsock.settimeout(10)
    port = free_port()
    try:
        p = subprocess.run(in_private_dev(exe(impl) + ["-daemon", "-d", "-d", "-port", str(port),
                                                      "-address", "127.0.0.1"], scratch,
                                          os.path.join(scratch, "log")),
                           capture_output=True, timeout=30, env=base_env())
        assert p.returncode == 0 and p.stderr == b"", p.stderr
        assert wait_until(lambda: serving(port), 10)
        s, reply = register(port, "sys")
        assert reply[:2] == b"v\x00"
        request(port, b"zsys")
        s.close()
        assert wait_until(lambda: registered(port) == [], 5)
        assert run("py", ["-port", str(port), "-kill"])[:2] == (0, b"Killed\n")
        lines = []
        while not lines or b"terminates normal" not in lines[-1]:
            data = logsock.recv(4096)
            m = SYSLOG_LINE.match(data)
            assert m, data
            assert (m.group(1), m.group(2)) == (b"11", b"epmd"), data
            lines.append(m.group(3))
    finally:
        logsock.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if serving(port):
            run("py", ["-port", str(port), "-kill"])
    # the waits above may ask NAMES more than once: one line per run of them
    lines = [line for i, line in enumerate(lines)
             if not (i and line == lines[i - 1] == b"epmd: ** got NAMES_REQ")]
    assert lines == [
        b"epmd: epmd running - daemon = 1",
        b"epmd: try to initiate listening port %d" % port,
        b"epmd: ** got NAMES_REQ",            # the test's serving() check
        b"epmd: ** got ALIVE2_REQ",
        b"epmd: ** got PORT2_REQ",
        b"epmd: ** got NAMES_REQ",
        b"epmd: ** got KILL_REQ",
        b"epmd: got KILL_REQ - terminates normal",
    ]


@pytest.mark.parametrize("dev_log", ["missing", "present"])
def test_daemon_warns_when_syslog_is_missing(impl, dev_log):
    """Where /dev/log is missing (most containers), epmd.py -daemon says on
    stderr, before detaching, that its log lines will be lost, and serves
    all the same; OTP's says nothing.  With a /dev/log, no word."""
    scratch = tempfile.mkdtemp(prefix="epmdlog")
    logsock = None
    if dev_log == "present":
        logsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        logsock.bind(os.path.join(scratch, "log"))
    port = free_port()
    try:
        p = subprocess.run(in_private_dev(exe(impl) + ["-daemon", "-port", str(port),
                                                      "-address", "127.0.0.1"], scratch,
                                          logsock and os.path.join(scratch, "log")),
                           capture_output=True, timeout=30, env=base_env())
        assert wait_until(lambda: serving(port), 10)
        assert (p.returncode, p.stdout) == (0, b"")
        if impl == "py" and dev_log == "missing":
            assert p.stderr == (b"epmd: warning: no syslog at /dev/log (No such file or directory): "
                                b"with -daemon, every log line, errors included, is discarded\n")
        else:
            assert p.stderr == b""
    finally:
        if logsock:
            logsock.close()
        shutil.rmtree(scratch, ignore_errors=True)
        assert run("py", ["-port", str(port), "-kill"])[:2] == (0, b"Killed\n")


def test_syslog_unreachable():
    """Unit: syslog_unreachable() tells a listening socket from a missing one."""
    d = tempfile.mkdtemp(prefix="epmdlog")
    try:
        path = os.path.join(d, "log")
        assert epmd.syslog_unreachable(path) == "No such file or directory"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        assert epmd.syslog_unreachable(path) is None
        s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the man page --------------------------------------------------------------

def man_text():
    """man/epmd.1 as a reader sees it (mandoc's plain-text rendering)."""
    mandoc = shutil.which("mandoc")
    if not mandoc:
        need("mandoc", "mandoc")
    out = subprocess.run([mandoc, "-Tutf8", "-Owidth=1000", str(ROOT / "man" / "epmd.1")],
                         capture_output=True, timeout=30, check=True).stdout.decode()
    text = re.sub(r".\x08", "", out)            # overstrike: bold and underline
    return re.sub(r"[ \t]+", " ", text)


def test_man_page_headings_and_option_tags():
    """The first heading reads NAME; option tags keep their spaces
    (``-d, -debug``) and put arguments in italics, not bold."""
    roff = (ROOT / "man" / "epmd.1").read_text()
    assert re.findall(r"^\.SH (.*)$", roff, re.M)[:2] == ["NAME", "SYNOPSIS"]
    assert "\\fB\\-d\\fP, \\fB\\-debug\\fP" in roff
    assert "\\fB\\-port\\fP \\fIno\\fP" in roff
    text = man_text()
    assert "\nNAME\n" in text
    assert " -d, -debug\n" in text and "-d,-debug" not in text
    assert " -h, -help, --help\n" in text


def test_man_page_says_what_otps_says():
    """What OTP's page tells and ours must too: erl starts epmd itself;
    -relaxed_command_check given to a client has no effect; all nodes of a
    cluster use the same port; -stop's ``<>`` and ``NOEXIST`` explained."""
    text = " ".join(man_text().split())
    assert "erl(1), started with -sname or -name, starts the epmd of its own Erlang installation" in text
    assert "-start_epmd false" in text
    assert "Given to a client (with -kill or -stop) it has no effect" in text
    assert "All the nodes of a cluster must use the same epmd port" in text
    assert "the client prints that answer without its STOPPED: NOEXIST (exit 0)" in text
    assert "epmd: local epmd responded with <>, the empty answer between the brackets (exit 1)" in text


def test_relaxed_check_given_to_a_client_has_no_effect(start_epmd):
    """What the man page says, shown with both clients: -kill and -stop with
    -relaxed_command_check, against a daemon started without it, are
    refused with OTP's texts and exit codes, and the node stays."""
    d = start_epmd()
    s, _ = register(d.port, "stay")
    try:
        for which in ("py", "otp"):
            assert run(which, ["-relaxed_command_check", "-port", str(d.port), "-kill"]) == (
                1, b"Killing not allowed - living nodes in database.\n", b"")
            assert run(which, ["-relaxed_command_check", "-port", str(d.port), "-stop", "stay"]) == (
                1, b"epmd: local epmd responded with <>\n", b"")
            assert run(which, ["-port", str(d.port), "-stop", "stay"],
                       env=base_env(ERL_EPMD_RELAXED_COMMAND_CHECK="")) == (
                1, b"epmd: local epmd responded with <>\n", b"")
            assert registered(d.port) == [b"stay"]
    finally:
        s.close()


# -- README's quick start ------------------------------------------------------------

def readme_section(title):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ %s\n(.*?)(?=^#+ )" % re.escape(title), text, re.S | re.M)
    assert m, title
    return m.group(1)


def sh_blocks(section):
    """The commands of the ```sh blocks of *section*, one per non-comment line."""
    return [line for block in re.findall(r"```sh\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_quick_start(tmp_path):
    """README's quick start, its three commands run as written (through
    sh, in the source directory) with ERL_EPMD_PORT set to a free port, as
    the quick start says to choose another port: the daemon starts and
    prints nothing, the check answers "up and running", the node registers
    (and the check lists it)."""
    if not shutil.which("erl"):
        need("erl")
    daemon_cmd, check_cmd, node_cmd = sh_blocks(readme_section("Quick start"))
    assert "4369" not in daemon_cmd + check_cmd + node_cmd
    port = free_port()
    env = base_env(ERL_EPMD_PORT=str(port), HOME=str(tmp_path))
    out = tmp_path / "daemon.out"
    with open(out, "wb") as f:
        daemon = subprocess.Popen(["sh", "-c", "exec " + daemon_cmd], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    node = None
    try:
        assert wait_until(lambda: serving(port), 10), out.read_bytes()

        def check():
            p = subprocess.run(["sh", "-c", check_cmd], cwd=ROOT, env=env, capture_output=True,
                               timeout=30)
            assert p.returncode == 0 and p.stderr == b"", p
            return p.stdout
        assert check() == b"epmd: up and running on port %d with data:\n" % port
        node = subprocess.Popen(["sh", "-c", "exec " + node_cmd], cwd=tmp_path, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert wait_until(lambda: registered(port) == [b"a"], 30)
        assert re.fullmatch(rb"epmd: up and running on port %d with data:\nname a at port \d+\n" % port,
                            check())
        node.stdin.write(b"halt().\n")
        node.stdin.close()
        assert node.wait(30) == 0
        assert wait_until(lambda: registered(port) == [], 5)
        assert out.read_bytes() == b""          # "It prints nothing while all is well."
    finally:
        for p in (node, daemon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)

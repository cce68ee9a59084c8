"""What packagers get: the man page, `make install`, `pip install .`, and the
systemd units."""

import os
import re
import shutil
import signal
import subprocess
import sys
import venv

import pytest
from helpers import ROOT, base_env, free_port, names, need, wait_until

import epmd

pytestmark = pytest.mark.timeout(300)

MAN_RST = ROOT / "man" / "epmd.rst"
MAN_PAGE = ROOT / "man" / "epmd.1"


def documented_flags():
    """The flags the man page documents: the option-list entries of reST."""
    flags = set()
    for line in MAN_RST.read_text().splitlines():
        m = re.match(r"^(--?[a-z_]+(?:,\s*--?[a-z_]+)*)(?:\s+\w+)?\s*$", line)
        if m:
            flags.update(f.strip() for f in m.group(1).split(","))
    return flags


def test_man_page_is_current():
    """man/epmd.1 is what man/build.py makes of man/epmd.rst."""
    pytest.importorskip("docutils")
    p = subprocess.run([sys.executable, str(ROOT / "man" / "build.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_flag_documented_and_accepted():
    """Every flag epmd.py accepts is in the man page and the usage text, and
    every flag the man page documents is accepted."""
    code_flags = set(epmd.ALL_FLAGS) | set(epmd.INFO_FLAGS)
    man_flags = documented_flags()
    assert man_flags == code_flags
    for flag in man_flags:
        args = [flag] + (["1"] if flag in epmd.ALL_FLAGS and epmd.ALL_FLAGS[flag][1] else [])
        epmd.parse_args(args, {})           # raises UsageError if unknown
    usage = epmd.USAGE
    for flag in code_flags:
        assert re.search(r"(^|[\s\[|,])%s([\s\]|,]|$)" % re.escape(flag), usage, re.M), flag
    roff = MAN_PAGE.read_text()
    for flag in code_flags:
        assert flag.replace("-", "\\-") in roff, flag


def test_man_page_mentions_every_variable_and_difference():
    text = MAN_RST.read_text()
    for var in ("ERL_EPMD_PORT", "ERL_EPMD_ADDRESS", "ERL_EPMD_RELAXED_COMMAND_CHECK",
                "LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "EPMD_PY_CLIENT_TIMEOUT"):
        assert var in text
    for i in range(1, 30):
        assert re.search(r"^D%d$" % i, text, re.M), "D%d" % i
    for section in ("SYNOPSIS", "DESCRIPTION", "ENVIRONMENT", "EXIT STATUS", "FILES", "SEE ALSO",
                    "SYSTEMD", "ACCESS AND SECURITY", "DEBUG OUTPUT", "RESTARTING AND UPGRADING"):
        assert re.search(r"^%s\n=+$" % section, text, re.M), section
    assert "-address 127.0.0.1" in text and "4369" in text


def test_man_page_lints_clean():
    """mandoc -Tlint (warnings and worse) and groff -ww report nothing."""
    mandoc, groff = shutil.which("mandoc"), shutil.which("groff")
    if not mandoc:
        need("mandoc", "mandoc")
    if not groff:
        need("groff", "groff")
    p = subprocess.run([mandoc, "-Tlint", "-W", "warning", str(MAN_PAGE)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
    p = subprocess.run([groff, "-man", "-ww", "-z", str(MAN_PAGE)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_make_install_and_uninstall(tmp_path):
    """`make install` with DESTDIR puts the module and its byte code (for the
    launcher's interpreter) under LIBDIR, and as BINDIR/epmd a short launcher
    naming the real LIBDIR (not DESTDIR); `make uninstall` removes all of it."""
    dest = tmp_path / "dest"
    make = ["make", "-C", str(ROOT), "DESTDIR=%s" % dest, "PREFIX=/usr"]
    subprocess.run(make + ["install"], check=True, capture_output=True, timeout=60)
    exe = dest / "usr" / "bin" / "epmd"
    lib = dest / "usr" / "lib" / "epmd-py"
    page = dest / "usr" / "share" / "man" / "man1" / "epmd.1"
    assert exe.is_file() and os.access(exe, os.X_OK)
    launcher = exe.read_text()
    assert launcher.startswith("#!/usr/bin/python3\n") and len(launcher.splitlines()) < 10
    assert 'sys.path.insert(0, "/usr/lib/epmd-py")' in launcher and str(dest) not in launcher
    assert "console_main()" in launcher
    assert (lib / "epmd.py").read_bytes() == (ROOT / "epmd.py").read_bytes()
    pycs = [p.name for p in (lib / "__pycache__").iterdir()]
    assert len(pycs) == 1 and re.match(r"^epmd\.[\w-]+\.pyc$", pycs[0]), pycs
    # a re-exec refuses files (and directories) others can write
    for f, mode in ((exe, 0o755), (lib, 0o755), (lib / "epmd.py", 0o644),
                    (lib / "__pycache__", 0o755), (lib / "__pycache__" / pycs[0], 0o644)):
        assert f.stat().st_mode & 0o777 == mode, f
    assert page.read_bytes() == MAN_PAGE.read_bytes()
    subprocess.run(make + ["uninstall"], check=True, capture_output=True, timeout=60)
    assert not exe.exists() and not page.exists() and not lib.exists()
    assert sorted(os.listdir(dest / "usr" / "lib")) == ["systemd"]
    assert not list((dest / "usr" / "lib" / "systemd" / "system").iterdir())


def installed_env():
    """base_env() without PYTHONPATH: the launcher must find its own module."""
    return {k: v for k, v in base_env().items() if k != "PYTHONPATH"}


def test_make_install_runs_byte_compiled_and_reexecs(tmp_path):
    """The installed launcher loads the byte-compiled module (no compiling);
    `epmd -names` works; a daemon started from it, in the foreground and
    with -daemon, survives SIGUSR2 with its nodes and its command line."""
    from helpers import Daemon, find_pids, register_mixed, registered

    prefix = tmp_path / "prefix"
    make = ["make", "-C", str(ROOT), "PREFIX=%s" % prefix, "PYTHON=%s" % sys.executable]
    subprocess.run(make + ["install"], check=True, capture_output=True, timeout=60)
    exe = prefix / "bin" / "epmd"
    lib = prefix / "lib" / "epmd-py"
    env = installed_env()
    p = subprocess.run([sys.executable, "-v", str(exe), "-version"], capture_output=True,
                       timeout=30, env=env, cwd=str(tmp_path))
    assert p.stdout == b"epmd.py %s\n" % epmd.__version__.encode()
    pyc = lib / "__pycache__" / ("epmd.%s.pyc" % sys.implementation.cache_tag)
    assert b"code object from '%s'" % str(pyc).encode() in p.stderr

    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], env, tmp_path)
    d.exe = [str(exe)]
    d.start()
    try:
        nodes = register_mixed(port, 3)
        want = sorted(n["name"] for n in nodes)
        p = subprocess.run([str(exe), "-port", str(port), "-names"], capture_output=True, timeout=30,
                           env=env, cwd=str(tmp_path))
        assert p.returncode == 0
        assert p.stdout.startswith(b"epmd: up and running on port %d with data:\n" % port)
        assert p.stdout.count(b"\nname ") == 3
        cmdline = _cmdline(d.pid)
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "connections restored" in d.stderr(), 15), d.stderr()
        assert "refused" not in d.stderr() and d.alive()
        assert wait_until(lambda: sorted(registered(port)) == want, 10)
        assert _cmdline(d.pid) == cmdline
        for n in nodes:
            n["sock"].close()
    finally:
        d.stop()

    port = free_port()
    r = subprocess.run([str(exe), "-port", str(port), "-address", "127.0.0.1", "-daemon"], env=env,
                       timeout=30, cwd=str(tmp_path))
    assert r.returncode == 0
    pids = find_pids(str(exe), "-daemon", str(port))
    assert len(pids) == 1
    pid = pids[0]
    try:
        nodes = register_mixed(port, 3)
        want = sorted(n["name"] for n in nodes)
        os.kill(pid, signal.SIGUSR2)
        assert wait_until(lambda: b"EPMD_PY_HANDOVER=1 state=" in _environ(pid), 15)
        assert wait_until(lambda: sorted(registered(port)) == want, 10)
        assert find_pids(str(exe), "-daemon", str(port)) == [pid]
        for n in nodes:
            n["sock"].close()
    finally:
        os.kill(pid, signal.SIGTERM)
    subprocess.run(make + ["uninstall"], check=True, capture_output=True, timeout=60)
    assert not exe.exists() and not lib.exists()


def _cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read()


def _environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return f.read()


def _names(port, host="127.0.0.1"):
    try:
        return names(port, host)
    except OSError:
        return None


@pytest.mark.slow
def test_pip_install_gives_an_epmd_command(tmp_path):
    """`pip install .` into a fresh virtual environment gives a working `epmd`."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr
    exe = env_dir / "bin" / "epmd"
    assert exe.exists()
    port = free_port()
    d = subprocess.Popen([str(exe), "-port", str(port), "-address", "127.0.0.1"], env=base_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert wait_until(lambda: _names(port) is not None, 10)
        assert names(port)[0] == port
    finally:
        d.terminate()
        d.wait(5)


UNITS = ROOT / "contrib" / "systemd"


def test_systemd_units_verify():
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        need("systemd-analyze", "systemd")
    p = subprocess.run([analyze, "verify", str(UNITS / "epmd.socket"), str(UNITS / "epmd.service")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    service = (UNITS / "epmd.service").read_text()
    assert re.search(r"^ExecStart=\S*epmd -systemd$", service, re.M)


def listen_streams(text):
    return [line.split("=", 1)[1] for line in text.splitlines()
            if line.startswith("ListenStream=") and line.split("=", 1)[1]]


def readme_dropin():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```ini\n(\[Socket\]\n.*?)```", text, re.S)
    assert m, "README has no socket drop-in"
    return m.group(1)


@pytest.mark.parametrize("which", ["unit", "readme-dropin"])
def test_socket_unit_addresses_served(which, tmp_path):
    """The socket unit's addresses (and those of the README's loopback-only
    drop-in) are served by epmd.py -systemd under systemd-socket-activate."""
    activate = shutil.which("systemd-socket-activate")
    if not activate:
        need("systemd-socket-activate", "systemd")
    text = (UNITS / "epmd.socket").read_text() if which == "unit" else readme_dropin()
    streams = listen_streams(text)
    assert streams
    port = free_port()
    args = []
    for s in streams:
        args += ["-l", s.replace("4369", str(port))]
    p = subprocess.Popen([activate] + args + [sys.executable, str(ROOT / "epmd.py"), "-systemd"],
                         env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for host in ("127.0.0.1", "::1"):
            assert wait_until(lambda: _names(port, host) is not None, 10), host
            assert names(port, host)[0] == port      # D20
    finally:
        p.terminate()
        p.wait(5)



# -- imports (issue 22): each action loads what it uses -------------------------------

BASE_IMPORTS = "import collections, errno, os, selectors, signal, socket, struct, sys, time"


def imported(argv, **kw):
    """The modules `python -X importtime` reports for *argv*, run to its end."""
    p = subprocess.run([sys.executable, "-X", "importtime"] + argv, capture_output=True,
                       timeout=30, **kw)
    return _modules(p.stderr)


def _modules(stderr):
    """The module names in -X importtime's lines of *stderr*."""
    return {line.split("|")[-1].strip() for line in stderr.decode("utf-8", "replace").splitlines()
            if line.startswith("import time:") and "|" in line} - {"package"}


def test_imports_only_what_the_action_needs(tmp_path):
    """A client command imports nothing beyond epmd.py's top-level imports
    (none of the daemon's, the hand-over's or -status's); an idle daemon
    adds resource (its RLIMIT_NOFILE) and nothing of json, zlib,
    subprocess, ctypes, syslog until it uses them."""
    base = imported(["-c", BASE_IMPORTS], env=base_env())
    port = free_port()
    err = tmp_path / "daemon.err"
    with open(err, "wb") as f:
        d = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / "epmd.py"), "-port",
                              str(port), "-address", "127.0.0.1"], env=base_env(),
                             stdout=subprocess.DEVNULL, stderr=f)
    try:
        assert wait_until(lambda: _names(port) is not None, 10)
        for action in (["-names"], ["-dump"], ["-started"], ["-stop", "nosuchnode"], ["-status"]):
            extra = imported([str(ROOT / "epmd.py"), "-port", str(port)] + action,
                             env=base_env()) - base
            assert extra == set(), (action, extra)
    finally:
        d.terminate()
        d.wait(5)
    assert _modules(err.read_bytes()) - base == {"resource"}

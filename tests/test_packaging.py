"""What packagers get: the man page, `make install`, `pip install .`, and the
systemd units."""

import os
import re
import shutil
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
    dest = tmp_path / "dest"
    make = ["make", "-C", str(ROOT), "DESTDIR=%s" % dest, "PREFIX=/usr"]
    subprocess.run(make + ["install"], check=True, capture_output=True, timeout=60)
    exe = dest / "usr" / "bin" / "epmd"
    page = dest / "usr" / "share" / "man" / "man1" / "epmd.1"
    assert exe.is_file() and os.access(exe, os.X_OK)
    assert exe.read_bytes().startswith(b"#!/usr/bin/python3\n")
    assert page.read_bytes() == MAN_PAGE.read_bytes()
    port = free_port()
    d = subprocess.Popen([str(exe), "-port", str(port), "-address", "127.0.0.1"], env=base_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _names(port) is not None, 10)
        p = subprocess.run([str(exe), "-port", str(port), "-names"], capture_output=True, timeout=30,
                           env=base_env())
        assert (p.returncode, p.stdout) == (0, b"epmd: up and running on port %d with data:\n" % port)
    finally:
        d.terminate()
        d.wait(5)
    subprocess.run(make + ["uninstall"], check=True, capture_output=True, timeout=60)
    assert not exe.exists() and not page.exists()
    assert not list((dest / "usr" / "lib" / "systemd" / "system").iterdir())


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


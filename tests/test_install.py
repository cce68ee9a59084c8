"""What packagers get (issue 12, "Packaging"): `make install` with the units
and a direct interpreter line, README's steps for installing alongside
Debian's Erlang (run in a scratch root), and the sdist and wheel.

Nothing here touches the host's system directories or its dpkg database:
installs go to a temporary PREFIX or DESTDIR, and `dpkg-divert` runs with
`--root` on a scratch directory.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from helpers import ROOT, base_env, free_port, names, need, wait_until

import epmd

pytestmark = pytest.mark.timeout(300)

UNITS = ROOT / "contrib" / "systemd"


def make(*args, env=None):
    """Run make in the source tree; return the CompletedProcess."""
    return subprocess.run(["make", "-C", str(ROOT)] + list(args), capture_output=True, text=True,
                          timeout=120, env=env or base_env())


def no_python_env():
    """base_env() without PYTHON, so that make's default applies."""
    return {k: v for k, v in base_env().items() if k != "PYTHON"}


def serving(port, host="127.0.0.1"):
    try:
        return names(port, host)[0] is not None
    except OSError:
        return False


# -- make install --------------------------------------------------------------

def test_make_install_units_and_interpreter(tmp_path):
    """`make install` writes #!/usr/bin/python3 (or the absolute PYTHON given)
    as the script's first line, installs both units into SYSTEMDUNITDIR
    (default PREFIX/lib/systemd/system) with ExecStart=BINDIR/epmd, and
    `make uninstall` removes them; a relative PYTHON is refused."""
    prefix = tmp_path / "prefix"
    p = make("install", "PREFIX=%s" % prefix, env=no_python_env())
    assert p.returncode == 0, p.stderr
    exe = prefix / "bin" / "epmd"
    lines = exe.read_text().splitlines(keepends=True)
    assert lines[0] == "#!/usr/bin/python3\n"
    lib = prefix / "lib" / "epmd-py"        # the module, imported by the launcher
    assert 'sys.path.insert(0, "%s")\n' % lib in lines
    assert (lib / "epmd.py").read_bytes() == (ROOT / "epmd.py").read_bytes()
    unitdir = prefix / "lib" / "systemd" / "system"
    assert sorted(os.listdir(unitdir)) == ["epmd.service", "epmd.socket"]
    service = (unitdir / "epmd.service").read_text()
    assert re.findall(r"^ExecStart=.*$", service, re.M) == ["ExecStart=%s -systemd" % exe]
    assert service.replace(str(exe), "/usr/bin/epmd") == (UNITS / "epmd.service").read_text()
    assert (unitdir / "epmd.socket").read_text() == (UNITS / "epmd.socket").read_text()
    for f in (exe, unitdir / "epmd.service", unitdir / "epmd.socket"):
        assert oct(f.stat().st_mode & 0o777) == ("0o755" if f == exe else "0o644"), f

    p = make("install", "PREFIX=%s" % prefix, "PYTHON=%s" % sys.executable,
             "SYSTEMDUNITDIR=%s" % (tmp_path / "units"))
    assert p.returncode == 0, p.stderr
    assert exe.read_text().splitlines()[0] == "#!" + sys.executable
    assert (lib / "__pycache__" / ("epmd.%s.pyc" % sys.implementation.cache_tag)).is_file()
    assert (tmp_path / "units" / "epmd.service").is_file()
    p = make("install", "PREFIX=%s" % prefix, "PYTHON=python3")
    assert p.returncode != 0 and "PYTHON must be an absolute path, not python3" in p.stderr

    p = make("uninstall", "PREFIX=%s" % prefix)
    assert p.returncode == 0, p.stderr
    assert not exe.exists() and not lib.exists() and os.listdir(unitdir) == []


def test_installed_units_verify_and_serve(tmp_path):
    """The installed units pass `systemd-analyze verify` (which checks that
    ExecStart's program exists and is executable), and the installed
    service's ExecStart, run under systemd-socket-activate on the installed
    socket's addresses (port substituted), serves, named epmd.  Stand-in for
    systemd as PID 1, which cannot run here."""
    analyze = shutil.which("systemd-analyze")
    activate = shutil.which("systemd-socket-activate")
    if not analyze or not activate:
        need("systemd-analyze and systemd-socket-activate", "systemd")
    prefix = tmp_path / "prefix"
    p = make("install", "PREFIX=%s" % prefix, "PYTHON=%s" % sys.executable)
    assert p.returncode == 0, p.stderr
    unitdir = prefix / "lib" / "systemd" / "system"
    v = subprocess.run([analyze, "verify", str(unitdir / "epmd.socket"), str(unitdir / "epmd.service")],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr
    execstart = re.search(r"^ExecStart=(.*)$", (unitdir / "epmd.service").read_text(), re.M).group(1)
    port = free_port()
    listen = []
    for line in (unitdir / "epmd.socket").read_text().splitlines():
        if line.startswith("ListenStream=") and line.split("=", 1)[1]:
            listen += ["-l", line.split("=", 1)[1].replace("4369", str(port))]
    d = subprocess.Popen([activate] + listen + execstart.split(), env=base_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: serving(port), 10)
        assert serving(port, "::1")
        with open("/proc/%d/comm" % d.pid) as f:      # activate exec()s the service
            assert f.read() == "epmd\n"
    finally:
        d.terminate()
        d.wait(5)


# -- README: installing alongside Debian's Erlang ---------------------------------------

def readme_blocks(title):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^### %s\n(.*?)(?=^##)" % re.escape(title), text, re.S | re.M)
    assert m, title
    return [[line.split("#")[0].strip() for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
            for block in re.findall(r"```sh\n(.*?)```", m.group(1), re.S)]


def in_scratch_root(line, root):
    """One README command, as run in the scratch root *root*: without
    sudo, dpkg-divert with --root, make in the source tree with DESTDIR."""
    assert line.startswith("sudo "), line
    line = line[len("sudo "):]
    if line.startswith("dpkg-divert "):
        return "dpkg-divert --root=%s %s" % (root, line[len("dpkg-divert "):])
    if line.startswith("make "):
        return "make -C %s DESTDIR=%s %s" % (ROOT, root, line[len("make "):])
    raise AssertionError("unexpected command in README: %s" % line)


def test_readme_dpkg_divert_steps_in_scratch_root(tmp_path):
    """README's "in place of /usr/bin/epmd" steps and their undo, run in a
    scratch root holding copies of erlang-base's /usr/bin/epmd and epmd.1.gz
    (stand-ins when Erlang is not installed), with `dpkg-divert --root` and
    `make install DESTDIR=`: OTP's files are moved aside and come back, ours
    take their place and go, and the host's diversions are untouched."""
    divert = shutil.which("dpkg-divert")
    if not divert:
        need("dpkg-divert", "dpkg")
    blocks = readme_blocks("Installing alongside Debian's or Fedora's Erlang")
    install = [b for b in blocks if any("dpkg-divert" in c and "--add" in c for c in b)]
    undo = [b for b in blocks if any("dpkg-divert" in c and "--remove" in c for c in b)]
    assert len(install) == 1 and len(undo) == 1, blocks
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/share/man/man1", "var/lib/dpkg"):
        (root / d).mkdir(parents=True)
    otp_bin, otp_man = root / "usr/bin/epmd", root / "usr/share/man/man1/epmd.1.gz"
    real_bin, real_man = "/usr/bin/epmd", "/usr/share/man/man1/epmd.1.gz"
    if os.path.exists(real_bin) and os.path.exists(real_man):
        shutil.copy(real_bin, otp_bin)
        shutil.copy(real_man, otp_man)
    else:
        otp_bin.write_bytes(b"\x7fELF stand-in for OTP's epmd")
        otp_man.write_bytes(b"\x1f\x8b stand-in for OTP's epmd.1.gz")
    otp_bin_bytes, otp_man_bytes = otp_bin.read_bytes(), otp_man.read_bytes()
    host_before = subprocess.run([divert, "--list"], capture_output=True, timeout=30).stdout

    def run_block(block):
        for line in block:
            p = subprocess.run(["sh", "-c", in_scratch_root(line, root)], capture_output=True,
                               text=True, timeout=120, env=base_env())
            assert p.returncode == 0, (line, p.stdout, p.stderr)

    def diversions():
        return subprocess.run([divert, "--root=%s" % root, "--list"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.splitlines()

    run_block(install[0])
    assert sorted(diversions()) == [
        "local diversion of /usr/bin/epmd to /usr/bin/epmd.otp",
        "local diversion of /usr/share/man/man1/epmd.1.gz to /usr/share/man/man1/epmd.otp.1.gz"]
    truename = subprocess.run([divert, "--root=%s" % root, "--truename", "/usr/bin/epmd"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    assert truename.strip() == "/usr/bin/epmd.otp"
    assert (root / "usr/bin/epmd.otp").read_bytes() == otp_bin_bytes
    assert (root / "usr/share/man/man1/epmd.otp.1.gz").read_bytes() == otp_man_bytes
    assert not otp_man.exists()
    assert otp_bin.read_text().startswith("#!/usr/bin/python3\n")
    # the launcher imports /usr/lib/epmd-py/epmd.py, here under the scratch root
    lib = root / "usr/lib/epmd-py"
    assert (lib / "epmd.py").read_bytes() == (ROOT / "epmd.py").read_bytes()
    p = subprocess.run([sys.executable, str(otp_bin), "-version"], capture_output=True, timeout=30,
                       env=dict(base_env(), PYTHONPATH=str(lib)))
    assert p.stdout == b"epmd.py %s\n" % epmd.__version__.encode()
    assert (root / "usr/share/man/man1/epmd.1").read_bytes() == (ROOT / "man/epmd.1").read_bytes()
    service = (root / "etc/systemd/system/epmd.service").read_text()
    assert "\nExecStart=/usr/bin/epmd -systemd\n" in service
    assert (root / "etc/systemd/system/epmd.socket").is_file()

    run_block(undo[0])
    assert diversions() == []
    assert otp_bin.read_bytes() == otp_bin_bytes and otp_man.read_bytes() == otp_man_bytes
    assert not (root / "usr/bin/epmd.otp").exists()
    assert not (root / "usr/share/man/man1/epmd.1").exists() and not lib.exists()
    assert os.listdir(root / "etc/systemd/system") == []
    assert subprocess.run([divert, "--list"], capture_output=True, timeout=30).stdout == host_before


# -- sdist and wheel ------------------------------------------------------------------

def test_sdist_and_wheel(tmp_path):
    """`python -m build` (without network: --no-isolation, with the build
    tools of tests/requirements.txt) makes an sdist carrying every tracked
    file but CI's own (the man page, units, tests, LICENSE among them) and a
    wheel with epmd.py, the licence and the `epmd` command; `twine check
    --strict` accepts both.  Built from a copy of the tree, so the source
    directory gets no build/ or egg-info."""
    for mod, pkg in (("build", "build"), ("twine", "twine"), ("wheel", "wheel"),
                     ("setuptools", "setuptools")):
        try:
            __import__(mod)
        except ImportError:
            need("Python's %s (tests/requirements.txt)" % mod, "python3-%s" % pkg)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    dist = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    version = epmd.__version__
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(dist)

    with tarfile.open(sdists[0]) as t:
        members = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for must in ("LICENSE", "README.md", "epmd.py", "pyproject.toml", "Makefile", "man/epmd.1",
                 "man/epmd.rst", "man/build.py", "contrib/systemd/epmd.service",
                 "contrib/systemd/epmd.socket", "tests/requirements.txt", "tests/helpers.py",
                 "tests/conftest.py", "tests/test_install.py"):
        assert must in members, must
    missing = [f for f in files if not f.startswith(".ci/") and f != ".gitignore" and f not in members]
    assert missing == []
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)

    with zipfile.ZipFile(wheels[0]) as z:
        wnames = set(z.namelist())
        info = "epmd_py-%s.dist-info/" % version
        assert "epmd.py" in wnames and info + "licenses/LICENSE" in wnames   # PEP 639
        assert z.read("epmd.py") == (ROOT / "epmd.py").read_bytes()
        assert re.search(r"^epmd = epmd:console_main$", z.read(info + "entry_points.txt").decode(), re.M)
        meta = z.read(info + "METADATA").decode()
        assert re.search(r"^Version: %s$" % re.escape(version), meta, re.M)
        assert re.search(r"^Requires-Python: >=3.8$", meta, re.M)

    t = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdists[0]), str(wheels[0])],
                       capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stdout + t.stderr
    assert t.stdout.count("PASSED") == 2, t.stdout

    # issue 23: no deprecation warning from setuptools (>= 77: an SPDX licence
    # string, no licence classifier), and README names the artefacts right
    out = p.stdout + p.stderr
    assert not re.search(r"deprecat|SetuptoolsWarning|By \d{4}-\w+-\d+", out, re.I), \
        [line for line in out.splitlines() if re.search("deprecat|warn", line, re.I)]
    assert re.search(r"^License-Expression: Apache-2\.0$", meta, re.M), meta[:2000]
    assert "License :: " not in meta
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"python3 -m build +# (.*)$", readme, re.M).group(1)
    assert shown == "dist/epmd_py-X.Y.Z.tar.gz and dist/epmd_py-X.Y.Z-py3-none-any.whl"
    assert sdists[0].name == "epmd_py-%s.tar.gz" % version
    assert wheels[0].name == "epmd_py-%s-py3-none-any.whl" % version


def test_pip_install_leaves_no_build_dir(tmp_path):
    """`pip install .` in a copy of the tree leaves no build/ there (it
    would shadow the `build` tool for `python3 -m build` run in the tree):
    setuptools builds in .build/, which .gitignore and `make clean` cover,
    as they cover the egg-info."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        need("Python's setuptools (tests/requirements.txt)", "python3-setuptools")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--no-index", "--target", str(tmp_path / "target"), "."],
                       capture_output=True, text=True, timeout=240, cwd=src)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "target" / "epmd.py").is_file()
    left = sorted(set(os.listdir(src)) - {f.split("/")[0] for f in files})
    assert "build" not in left, left
    ignored = (ROOT / ".gitignore").read_text().split()
    clean = re.search(r"^clean:\n\trm -rf (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    for name in left:
        pattern = "*.egg-info" if name.endswith(".egg-info") else name
        assert pattern + "/" in ignored and pattern in clean, (name, ignored, clean)

"""`make test-pythons`: epmd.py's wire, `erl`, client-command and Java/C node
tests with the daemon and its client run by the oldest Python promised (3.8)
and by the newest Python 3 on this machine.

Interpreters are looked for as ``python3.N`` on PATH and under pyenv's
versions directory ($PYENV_ROOT, else ~/.pyenv), keeping only those that
run and say they are 3.N (a pyenv shim for a version not selected fails).
pytest itself runs under this interpreter (the venv's); $EPMD_TEST_PYTHON
tells tests/helpers.py which one runs epmd.py, and $EPMD_TEST_IMPLS=py leaves
out the black-box tests' runs against OTP's epmd, which `make test` makes
and which no Python changes (tests that compare both daemons in one run,
such as the -d log against OTP's, still run).  A missing interpreter is
reported as a skip, naming it; the status is non-zero when a run fails.

    python3 -m tests.tools.pythons [pytest arguments; default -m "not slow"]
"""

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLDEST = 8              # Python 3.8, pyproject's requires-python
TESTS = ["tests/test_python.py", "tests/test_wire.py", "tests/test_erlang.py", "tests/test_cli.py",
         "tests/test_clients.py"]


def version_of(python):
    """((major, minor, micro), sys.executable) that *python* reports (the
    interpreter itself, not a shim), or None if it does not run."""
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d %d %d' % sys.version_info[:3]); "
                              "print(sys.executable)"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2:
        return None
    try:
        return tuple(int(x) for x in lines[0].split()), lines[1]
    except ValueError:
        return None


def pyenv_root():
    return os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")


def find(minor):
    """(path, version) of a working python3.<minor>, or None."""
    name = "python3.%d" % minor
    paths = [shutil.which(name) or ""]
    found = glob.glob(os.path.join(pyenv_root(), "versions", "3.%d.*" % minor, "bin", name))
    paths += sorted(found, key=lambda p: [int(x) for x in p.split("/versions/")[1].split("/")[0].split(".")
                                          if x.isdigit()], reverse=True)
    for path in paths:
        if path:
            got = version_of(path)
            if got and got[0][:2] == (3, minor) and got[1]:
                return got[1], got[0]
    return None


def main(args):
    args = args or ["-m", "not slow"]
    found = {m: find(m) for m in range(OLDEST, 40)}
    newest = max((m for m, f in found.items() if f), default=None)
    wanted = [OLDEST] + ([newest] if newest is not None and newest != OLDEST else [])
    results = []
    for minor in wanted:
        if found[minor] is None:
            results.append(("3.%d" % minor, "-", "SKIPPED", "python3.%d not found on PATH nor under %s"
                            % (minor, os.path.join(pyenv_root(), "versions", "3.%d.*" % minor))))
            print("SKIP: python3.%d not found" % minor, flush=True)
            continue
        path, v = found[minor]
        version = "%d.%d.%d" % v
        print("\n=== epmd.py under Python %s (%s) ===" % (version, path), flush=True)
        # OTP's epmd, a C program, ran in `make test`; here only epmd.py changes
        env = dict(os.environ, EPMD_TEST_PYTHON=path, EPMD_TEST_IMPLS="py")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + TESTS + args,
                           cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        sys.stdout.write(p.stdout)
        tail = [line for line in p.stdout.splitlines() if line.strip()]
        summary = tail[-1].strip("= ") if tail else ""
        results.append((version, path, "passed" if p.returncode == 0 else "FAILED",
                        "%s (%.0f s)" % (summary, time.monotonic() - t0)))
    if newest is None or newest == OLDEST:
        results.append(("newest", "-", "SKIPPED", "no Python 3 newer than 3.%d found" % OLDEST))
    print("\n=== test-pythons: which Pythons ran epmd.py ===")
    for r in results:
        print("Python %-8s %-8s %s  %s" % (r[0], r[2], r[3], r[1]))
    return 1 if any(r[2] == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fixtures: daemons of both implementations on free loopback ports."""

import fcntl
import os
import shutil
import subprocess
import tempfile

import pytest
from helpers import OTP_EPMD, Daemon, NetNS, base_env, free_port, need


# -- running in parallel (pytest-xdist, `make test` runs four workers) ----------
#
# Every test starts its own daemons on its own free port (each worker draws
# ports from its own range: helpers.free_port), so tests run side by side.
# A test marked `alone` runs with no other test beside it: it loads the
# whole host (5,000 processes, 100,000 sockets, a holder of 100,000
# descriptors) or compares timings against a quiet host, which a test on the
# other worker would disturb.  Each test holds a lock on a file shared by the
# workers of this run while it runs (setup to teardown): shared for other
# tests, exclusive for `alone`.  A gate taken before it (shared and let go
# at once by other tests, exclusive and kept by `alone`) stops new tests
# from starting while an `alone` test waits, so it is not starved.  Outside
# xdist there is nothing to lock.

_LOCKS = None


def _locks(config):
    global _LOCKS
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return None
    if _LOCKS is None:
        try:
            # the run's base temporary directory, which the workers' own
            # (popen-gwN) sit in and pytest removes in time
            where = str(config._tmp_path_factory.getbasetemp().parent)
        except AttributeError:
            where = tempfile.gettempdir()
        base = os.path.join(where, "epmd-py-tests-%s" % run)
        _LOCKS = tuple(open(base + suffix, "a") for suffix in (".gate", ".run"))
    return _LOCKS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    locks = _locks(item.config)
    if locks is None:
        yield
        return
    gate, run = locks
    alone = item.get_closest_marker("alone") is not None
    if alone:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(run, fcntl.LOCK_EX)
    else:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(run, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(run, fcntl.LOCK_UN)
        if alone:
            fcntl.flock(gate, fcntl.LOCK_UN)


# $EPMD_TEST_IMPLS=py leaves OTP's daemon out: `make test-pythons` runs the
# black-box tests again under other Pythons, where only epmd.py changes.
IMPLS = os.environ.get("EPMD_TEST_IMPLS", "py,otp").split(",")


@pytest.fixture(params=IMPLS)
def impl(request):
    """Which epmd a black-box test runs against: ours, or OTP's binary."""
    if request.param == "otp" and OTP_EPMD is None:
        need("OTP's epmd binary")
    return request.param


def _starter(default_impl, tmp_path):
    started = []

    def start(*args, port=None, env=None, wait=True, loopback=True, which=None, nofile=None):
        port = port or free_port()
        argv = ["-port", str(port)]
        if loopback:
            argv += ["-address", "127.0.0.1"]
        argv += list(args)
        d = Daemon(which or default_impl, port, argv, env if env is not None else base_env(), tmp_path)
        d.nofile = nofile
        started.append(d)
        return d.start(wait=wait)

    return start, started


@pytest.fixture
def start_epmd(impl, tmp_path):
    """start_epmd(*args, port=None, env=None, wait=True, loopback=True,
    which=None, nofile=None) -> Daemon.

    Starts *impl* (or *which*) with ``-port P`` (and ``-address 127.0.0.1``
    unless loopback=False) plus *args*, under the (soft, hard) descriptor
    limit *nofile* if given; every daemon is stopped by PID afterwards.
    """
    start, started = _starter(impl, tmp_path)
    yield start
    for d in started:
        d.stop()


@pytest.fixture
def start_ours(tmp_path):
    """As start_epmd, for tests of epmd.py alone (not run against OTP)."""
    start, started = _starter("py", tmp_path)
    yield start
    for d in started:
        d.stop()


@pytest.fixture
def epmd(start_epmd):
    """A running daemon with default options (loopback only)."""
    return start_epmd()


@pytest.fixture
def netns():
    """A network namespace joined to this host by a veth pair (helpers.NetNS):
    a second host for tests of remote peers."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        need("root and `ip` to make a network namespace", "iproute2")
    ns = NetNS()
    try:
        ns.create()
    except (subprocess.SubprocessError, OSError) as e:
        ns.destroy()
        need("a network namespace (%s)" % getattr(e, "stderr", e), "iproute2")
    yield ns
    ns.destroy()

"""Interoperability with real Erlang/OTP nodes (Debian's erlang-base).

Nodes are started with ``-start_epmd false`` and ``ERL_EPMD_PORT`` set to the
port of an epmd.py started by the test, so OTP's own epmd is never involved.
Skipped without `erl`, unless EPMD_TEST_REQUIRE_ERLANG=1 (CI), where a
missing `erl` is a failure.
"""

import os
import signal
import subprocess

import pytest
from helpers import ERL, OTP_EPMD, Daemon, Nodes, base_env, free_port, log_shape, need, registered, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ours(tmp_path):
    if ERL is None:
        need("erl")
    d = Daemon("py", free_port(), [], base_env(), tmp_path)
    d.args = ["-port", str(d.port), "-address", "127.0.0.1"]
    d.start()
    yield d
    d.stop()


@pytest.fixture
def nodes(ours, tmp_path):
    n = Nodes(ours.port, tmp_path)
    yield n
    n.close()


def test_two_nodes_find_and_talk(ours, nodes):
    """Two nodes register, see each other in net_adm:names(), ping each other
    and exchange messages and an rpc:call through epmd.py."""
    a = nodes.name("a")
    nodes.start("a")
    assert wait_until(lambda: a.encode() in registered(ours.port), 30)
    code = (
        '[_, H] = string:split(atom_to_list(node()), "@"), '
        'A = list_to_atom("%s@" ++ H), '
        '{ok, Names} = net_adm:names(), '
        'io:format("NAMES ~p~n", [lists:sort([N || {N, _} <- Names])]), '
        'io:format("PING ~p~n", [net_adm:ping(A)]), '
        'io:format("RPC ~p~n", [rpc:call(A, erlang, node, [])]), '
        'io:format("BACK ~p~n", [rpc:call(A, net_adm, ping, [node()])]), '
        '{echo, A} ! {self(), hello_through_epmd_py}, '
        'receive {echo, M} -> io:format("ECHO ~p~n", [M]) after 10000 -> io:format("ECHO none~n") end, '
        'halt().' % a)
    rc, out = nodes.run("b", code)
    assert rc == 0, out
    b = nodes.name("b")
    assert 'NAMES ["%s","%s"]' % (a, b) in out, out
    assert "PING pong" in out, out
    assert "RPC %s@" % a in out, out
    assert "BACK pong" in out, out
    assert "ECHO hello_through_epmd_py" in out, out
    assert wait_until(lambda: b.encode() not in registered(ours.port), 10)


def test_duplicate_node_name_fails(ours, nodes):
    """A third node with a name already registered fails to start."""
    a = nodes.name("a")
    nodes.start("a")
    assert wait_until(lambda: a.encode() in registered(ours.port), 30)
    rc, out = nodes.run("a", "io:format(\"STARTED~n\"), halt().")
    assert rc != 0
    assert "STARTED" not in out
    assert registered(ours.port) == [a.encode()]


def test_killed_node_disappears(ours, nodes):
    """A node killed with SIGKILL disappears from NAMES (its connection closes)."""
    a, b = nodes.name("a"), nodes.name("b")
    pa = nodes.start("a")
    nodes.start("b")
    assert wait_until(lambda: set(registered(ours.port)) == {a.encode(), b.encode()}, 30)
    os.kill(pa.pid, signal.SIGKILL)
    assert wait_until(lambda: registered(ours.port) == [b.encode()], 10)


def test_otp_client_lists_our_nodes(ours, nodes):
    """OTP's own `epmd -port P -names` lists the nodes registered with epmd.py."""
    if OTP_EPMD is None:
        need("OTP's epmd binary")
    a = nodes.name("a")
    nodes.start("a")
    assert wait_until(lambda: a.encode() in registered(ours.port), 30)
    out = subprocess.run([OTP_EPMD, "-port", str(ours.port), "-names"], capture_output=True,
                         timeout=10, env=base_env())
    assert out.returncode == 0
    lines = out.stdout.decode().splitlines()
    assert lines[0] == "epmd: up and running on port %d with data:" % ours.port
    assert any(line.startswith("name %s at port " % a) for line in lines[1:]), lines


def test_debug_output_of_a_real_registration(tmp_path):
    """`-d -d` shows a real node's registration as OTP's epmd does: the
    request's hexdump, the registering lines and the reply's hexdump."""
    if ERL is None:
        need("erl")
    d = Daemon("py", free_port(), [], base_env(), tmp_path)
    d.args = ["-port", str(d.port), "-address", "127.0.0.1", "-d", "-d"]
    d.start()
    n = Nodes(d.port, tmp_path)
    try:
        a = n.name("a")
        n.start("a")
        assert wait_until(lambda: '** sent ALIVE2_RESP for "%s"' % a in d.stderr(), 30)
        err = d.stderr()
        assert "** got ALIVE2_REQ" in err
        assert "registering '%s:" % a in err
        assert "type 77 proto 0 highvsn 6 lowvsn 5" in err
        assert "got 6 bytes\r\n***** 00000000  76 00 " in err
    finally:
        n.close()
        d.stop()


def test_debug_log_same_as_otp(tmp_path):
    """The same node registering and leaving, once with OTP's epmd -d -d and
    once with epmd.py -d -d, gives the same log line for line (timestamps,
    numbers and dumped bytes aside)."""
    if ERL is None or OTP_EPMD is None:
        need("erl and OTP's epmd")
    logs = {}
    for which in ("otp", "py"):
        d = Daemon(which, free_port(), [], base_env(), tmp_path)
        d.args = ["-port", str(d.port), "-address", "127.0.0.1", "-d", "-d"]
        d.start()
        n = Nodes(d.port, tmp_path)
        n.tag = "cmp"
        try:
            rc, out = n.run("a", "halt().")
            assert rc == 0, out
            assert wait_until(lambda: "unregistering" in d.stderr(), 10)
            # a client closing while the request is incomplete, then NAMES
            c = __import__("helpers").connect(d.port)
            c.close()
            assert wait_until(lambda: "got partial packet" in d.stderr(), 10)
            registered(d.port)
            assert wait_until(lambda: d.stderr().count("closing connection") >= 4, 10)
        finally:
            n.close()
            d.stop()
        # the readiness probe of the fixture is a NAMES request too; keep from there
        logs[which] = log_shape(d.stderr())
    assert logs["py"] == logs["otp"]

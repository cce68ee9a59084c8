"""Java nodes (JInterface), C nodes (erl_interface's ei) and erl_call against both daemons.

Real programs, compiled by the tests from ``tests/clients/`` once a session:
``JNode.java`` with ``javac`` against Debian's ``erlang-jinterface``
(OtpErlang.jar; JInterface 1.13.1 in OTP 25) and ``cnode.c`` with ``cc``
against ``erlang-dev``'s ``ei.h`` and ``libei.a`` (erl_interface 5.3).  Each
test runs against epmd.py and against OTP's epmd binary (``impl``), on a free
loopback port that the clients find through ``ERL_EPMD_PORT``, with real
`erl` nodes on the other side; every process is killed by PID at the end.

What the clients send, read from both daemons' ``-d -d`` log (and, for
JInterface, from its own trace, ``-DOtpConnection.trace=4``):

- JInterface (``OtpEpmd.publishPort``) registers with ALIVE2_REQ (120) as
  node type 110, versions 6..6, and reads ALIVE2_RESP (121) or
  ALIVE2_X_RESP (118); both daemons answer ALIVE2_X_RESP (6 bytes, 32-bit
  creation).  ``OtpEpmd.lookupPort`` sends PORT_PLEASE2_REQ (122) and reads
  PORT2_RESP (119).  ``OtpNode.close()`` sends STOP_REQ (115, JInterface's
  "UNPUBLISH") for its own name on a new connection, which both daemons
  refuse without ``-relaxed_command_check``; the name goes anyway when the
  registration's connection closes with the process.
- ei (``ei_publish``) registers with ALIVE2_REQ (120) as node type 104
  (hidden), versions 6..6, answered with ALIVE2_X_RESP (118) by both;
  ``ei_connect`` looks the peer up with PORT_PLEASE2_REQ (122).  ei does not
  answer ``net_adm:ping`` by itself: the C node answers net_kernel's
  ``is_auth`` call.
- erl_call (erlang-base, built on ei) does not register; each call is one
  PORT_PLEASE2_REQ.
"""

import shutil
import subprocess

import pytest
from helpers import (ECHO_LOOP, ERL, OTP_EPMD, OURS, LineClient, Nodes, base_env, build_cnode, build_jnode,
                     find_erl_interface, find_jinterface_jar, free_port, need, port_please, registered,
                     wait_until)

pytestmark = pytest.mark.timeout(180)

COOKIE = "epmdpytest"   # the cookie of helpers.Nodes


@pytest.fixture(scope="session")
def jnode(tmp_path_factory):
    """The java command line of tests/clients/JNode.java, compiled once."""
    if find_jinterface_jar() is None:
        need("JInterface's OtpErlang.jar", "erlang-jinterface")
    if shutil.which("javac") is None or shutil.which("java") is None:
        need("javac and java", "default-jdk-headless")
    return build_jnode(tmp_path_factory.mktemp("jnode"))


@pytest.fixture(scope="session")
def cnode(tmp_path_factory):
    """The executable of tests/clients/cnode.c, compiled once."""
    if find_erl_interface() is None:
        need("erl_interface's ei.h and libei.a", "erlang-dev")
    if shutil.which("cc") is None:
        need("a C compiler (cc)", "gcc and libc6-dev")
    return build_cnode(tmp_path_factory.mktemp("cnode"))


@pytest.fixture
def nodes(start_epmd, tmp_path):
    """(daemon, Nodes): *impl* started with ``-d -d`` (its log shows the
    requests), and `erl` nodes registering with it."""
    if ERL is None:
        need("erl")
    d = start_epmd("-d", "-d")
    n = Nodes(d.port, tmp_path)
    yield d, n
    n.close()


@pytest.fixture
def clients():
    """LineClients started by a test, killed by PID at the end."""
    started = []
    yield started
    for c in started:
        c.kill()


def names_lines(impl, port):
    """`epmd -port P -names` of the same implementation as the daemon, as lines."""
    exe = list(OURS) if impl == "py" else [OTP_EPMD]
    out = subprocess.run(exe + ["-port", str(port), "-names"], capture_output=True, text=True,
                         timeout=20, env=base_env())
    assert out.returncode == 0, out
    return out.stdout.splitlines()


def registration_log(log, name):
    """The lines of a -d -d log from the ALIVE2_REQ that registered *name*
    to its reply's hexdump (the reply's first bytes)."""
    start = log.index("registering '%s:" % name)
    i = log.rindex("** got ALIVE2_REQ", 0, start)
    j = log.index("sent ALIVE2_RESP for \"%s\"" % name, start)
    return log[i:j]


def reply_dump(log, name):
    """The hexdump line of the reply to *name*'s ALIVE2_REQ: the line after
    the last 'got N bytes' before the 'sent ALIVE2_RESP' line."""
    j = log.index("sent ALIVE2_RESP for \"%s\"" % name)
    k = log.rindex("got ", 0, j)
    return log[k:j].splitlines()


def start_echo(nodes, d):
    """Start an `erl` node 'a' whose process registered as echo answers
    {From, M} with {echo, M}; return its name once echo is registered (a
    node registers with epmd before its -eval code runs)."""
    p = nodes.start("a", ECHO_LOOP.replace("register(echo, self()), ",
                                            'register(echo, self()), io:format("ECHO READY~n"), '))
    line = p.stdout.readline()
    assert line == b"ECHO READY\n", line + p.stdout.read()
    assert nodes.name("a").encode() in registered(d.port)
    return nodes.name("a")


def erl_side(nodes, peer, mailbox):
    """Run an `erl` node 'b' that lists the names (net_adm:names/0), pings
    *peer* (the client's full name) and sends {self(), hello_from_erl} to
    its *mailbox*; return its output."""
    code = (
        'P = list_to_atom("%s"), '
        '{ok, Names} = net_adm:names(), '
        'io:format("NAMES ~p~n", [lists:sort([N || {N, _} <- Names])]), '
        'io:format("PING ~p~n", [net_adm:ping(P)]), '
        '{%s, P} ! {self(), hello_from_erl}, '
        'receive M -> io:format("GOT ~p~n", [M]) after 10000 -> io:format("GOT none~n") end, '
        'halt().' % (peer, mailbox))
    rc, out = nodes.run("b", code, timeout=90)
    assert rc == 0, out
    return out


def test_java_node(impl, nodes, jnode, clients):
    """A JInterface OtpNode registers with the daemon; `-names` and an erl
    node's net_adm:names() list it; the erl node pings it (pong) and gets its
    message answered; the Java node looks the erl node up
    (OtpEpmd.lookupPort: the port the daemon gives), pings it (true) and
    exchanges a message with it; when the Java process ends, its name is
    gone.  OTP's epmd does the same, and logs the same request (type 110,
    versions 6..6, ALIVE2_X_RESP) and the refused STOP_REQ of
    OtpNode.close()."""
    d, n = nodes
    a = start_echo(n, d)
    j = n.name("j")
    env = dict(n.env)
    c = LineClient(jnode + [j, COOKIE], env)
    clients.append(c)
    full, port = c.expect("NODE ", 60).split()[1:]
    host = full.split("@")[1]
    assert full == "%s@%s" % (j, host)
    assert "-> PUBLISH (r4) %s port=%s" % (full, port) in c.lines
    assert c.lines[c.lines.index("-> PUBLISH (r4) %s port=%s" % (full, port)) + 1] == "<- OK"

    # listed by the daemon's own -names client and by PORT_PLEASE2
    assert "name %s at port %s" % (j, port) in names_lines(impl, d.port)
    assert port_please(d.port, j) == int(port)
    log = registration_log(d.stderr(), j)
    assert "type 110 proto 0 highvsn 6 lowvsn 6" in log, log
    dump = reply_dump(d.stderr(), j)
    assert "got 6 bytes" in dump[0] and " 76 00 " in dump[1], dump   # ALIVE2_X_RESP, result 0

    # the Java node looks up the erl node, connects, pings, exchanges a message
    a_port = port_please(d.port, a)
    assert c.ask("lookup %s@%s" % (a, host), "PORT ") == "PORT %s@%s %d" % (a, host, a_port)
    assert "-> LOOKUP (r4) %s@%s" % (a, host) in c.lines and "<- PORT %d" % a_port in c.lines
    assert c.ask("lookup nosuch_%s@%s" % (n.tag, host), "PORT ").endswith(" 0")
    assert c.ask("ping %s@%s" % (a, host), "PING ") == "PING %s@%s true" % (a, host)
    assert c.ask("echo %s@%s" % (a, host), "ECHO ") == "ECHO {echo,hello_from_java}"

    # an erl node finds it, pings it and talks to it
    out = erl_side(n, full, "jecho")
    assert 'NAMES ["%s","%s","%s"]' % (a, n.name("b"), j) in out, out
    assert "PING pong" in out, out
    assert "GOT {jecho,hello_from_erl}" in out, out

    # the process ends: OtpNode.close() sends STOP_REQ (refused), the name goes
    assert c.close() == 0
    assert "-> UNPUBLISH %s port=%s" % (full, port) in c.lines
    assert wait_until(lambda: j.encode() not in registered(d.port), 10)
    assert registered(d.port) == [a.encode()]
    assert wait_until(lambda: "Disallowed STOP_REQ" in d.stderr(), 10), d.stderr()


@pytest.mark.parametrize("mode", ["listen", "fixed"])
def test_c_node(impl, nodes, cnode, clients, mode):
    """A C node registers with ei_publish (after ei_listen, or, the older
    way of OTP's tutorial, on its own socket at a fixed port): `-names` and
    net_adm:names() list it with that port; an erl node pings it (pong, the
    C node answering net_kernel's is_auth) and gets its message answered;
    the C node connects to the erl node with ei_connect (a PORT_PLEASE2_REQ),
    pings it and exchanges a message with it; when the C node exits, its name
    is gone.  OTP's epmd does the same and logs the same request (type 104,
    hidden, versions 6..6, ALIVE2_X_RESP)."""
    d, n = nodes
    a = start_echo(n, d)
    name = n.name("c")
    argv = [cnode, name, COOKIE, mode]
    fixed = None
    if mode == "fixed":
        fixed = free_port()
        argv.append(str(fixed))
    c = LineClient(argv, dict(n.env))
    clients.append(c)
    full, port = c.expect("NODE ", 30).split()[1:]
    host = full.split("@")[1]
    assert full == "%s@%s" % (name, host)
    if fixed:
        assert int(port) == fixed

    assert "name %s at port %s" % (name, port) in names_lines(impl, d.port)
    assert port_please(d.port, name) == int(port)
    log = registration_log(d.stderr(), name)
    assert "type 104 proto 0 highvsn 6 lowvsn 6" in log, log
    dump = reply_dump(d.stderr(), name)
    assert "got 6 bytes" in dump[0] and " 76 00 " in dump[1], dump   # ALIVE2_X_RESP, result 0

    # the C node connects to the erl node (ei_connect looks it up), pings, talks
    asked = d.stderr().count("** got PORT2_REQ")
    assert c.ask("connect %s@%s" % (a, host), "CONNECT") == "CONNECTED %s@%s" % (a, host)
    assert d.stderr().count("** got PORT2_REQ") == asked + 1
    assert c.ask("ping %s@%s" % (a, host), "PING ") == "PING %s@%s pong" % (a, host)
    assert c.ask("echo %s@%s" % (a, host), "ECHO ") == "ECHO {echo, hello_from_c}"

    # an erl node finds it, pings it and talks to it
    out = erl_side(n, full, "cecho")
    assert 'NAMES ["%s","%s","%s"]' % (a, n.name("b"), name) in out, out
    assert "PING pong" in out, out
    assert "GOT {cecho,hello_from_erl}" in out, out

    assert c.close() == 0
    assert wait_until(lambda: name.encode() not in registered(d.port), 10)
    assert registered(d.port) == [a.encode()]


def test_erl_call(impl, nodes):
    """OTP's erl_call (erlang-base, built on ei) finds an erl node through
    the daemon (a PORT_PLEASE2_REQ for each call), calls a function in it and
    evaluates an expression listing the names; a name not registered is
    "failed to connect", status 1.  erl_call does not register itself.  The
    same with OTP's epmd."""
    erl_call = shutil.which("erl_call")
    if erl_call is None:
        need("erl_call")
    d, n = nodes
    a = start_echo(n, d)
    asked = d.stderr().count("** got PORT2_REQ")
    out = subprocess.run([erl_call, "-c", COOKIE, "-sname", a, "-a", "erlang node []"], env=n.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert out.stdout.startswith(a + "@"), out
    out = subprocess.run([erl_call, "-c", COOKIE, "-sname", a, "-e"], env=n.env, capture_output=True,
                         text=True, timeout=60, input="{ok, N} = net_adm:names(), lists:sort(N).\n")
    assert out.returncode == 0, out
    assert out.stdout == '{ok, [{"%s", %d}]}' % (a, port_please(d.port, a)), out
    out = subprocess.run([erl_call, "-c", COOKIE, "-sname", "nosuch_" + n.tag, "-a", "erlang node []"],
                         env=n.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "failed to connect to node nosuch_" in out.stderr, out
    # one PORT_PLEASE2_REQ for each of the three calls, and port_please()'s
    assert d.stderr().count("** got PORT2_REQ") == asked + 4
    assert registered(d.port) == [a.encode()]

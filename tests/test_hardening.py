"""Hardening beyond OTP: tests that attack a running daemon.

One section per promise of the README's "Reliability" section.  Where OTP's
epmd can run the same test, it does (the `impl` fixture), and the test states
what OTP does instead.  Remote peers live in a network namespace joined to
this host by a veth pair (tests/helpers.py, NetNS); they need root and `ip`.
"""

import random
import resource
import socket
import time

import pytest
from helpers import (
    U16,
    U32,
    VALID,
    alive2,
    connect,
    frame,
    is_open,
    mutate,
    names_or_none,
    proc_cpu,
    proc_fds,
    proc_rss_kb,
    read_to_eof,
    register,
    registered,
    request,
    send_fuzzed,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epmd

pytestmark = pytest.mark.timeout(120)





def figure(name, value):
    """Print a measured figure (seen with `pytest -s`; quoted in the README)."""
    print("\nFIGURE %s: %s" % (name, value))


def raise_own_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip("needs %d descriptors, the hard limit is %d" % (n, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


# -- 1. remote peers are only answered, never obeyed ------------------------------

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_remote_peer_answered_not_obeyed(start_epmd, netns, family):
    """From another host, NAMES and PORT_PLEASE2 are answered; ALIVE2, DUMP,
    KILL and STOP are closed without a reply and change nothing, even on a
    relaxed daemon with no node that -kill would protect."""
    d = start_epmd("-address", "%s,%s" % (netns.host4, netns.host6), "-relaxed_command_check",
                   loopback=False)
    host = netns.host4 if family == "ipv4" else netns.host6
    s, _ = register(d.port, "local1", port=4711)
    assert netns.request(host, d.port, b"n") == U32.pack(d.port) + b"name local1 at port 4711\n"
    assert netns.request(host, d.port, b"zlocal1")[:4] == b"w\x00" + U16.pack(4711)
    for payload in (alive2("remote1"), b"d", b"slocal1", b"k"):
        assert netns.request(host, d.port, payload) == b""
    assert registered(d.port) == [b"local1"]
    assert d.alive()
    s.close()
    assert wait_until(lambda: registered(d.port) == [])
    assert netns.request(host, d.port, b"k") == b""     # no node now, still refused
    assert d.alive()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_own_address_is_local(start_epmd, netns, family):
    """This host talking to the daemon over its own non-loopback address is
    local, as in OTP: it may register."""
    host = netns.host4 if family == "ipv4" else netns.host6
    d = start_epmd("-address", host, loopback=False)
    s, reply = register(d.port, "selfie", host=host)
    assert reply[:2] == b"v\x00"
    assert request(d.port, b"d", host=host)[:4] == U32.pack(d.port)
    s.close()


# -- 2. a remote flood cannot lock out local nodes (D4) --------------------------------

def test_remote_flood_leaves_room_for_local(start_epmd, netns, impl):
    """With the connection table full of idle remote connections, a local
    ALIVE2 succeeds and a local NAMES is answered: the last LOCAL_RESERVE
    slots are for local peers.  OTP, under the same flood and descriptor
    limit, runs out of descriptors and exits (or leaves no slot)."""
    limit = 200
    d = start_epmd("-address", netns.host4, loopback=False, nofile=(limit, limit))
    before = registered(d.port)
    holder, opened = netns.hold(netns.host4, d.port, 400)
    try:
        assert opened > 150
        if impl == "py":
            assert wait_until(lambda: "failed opening connection" in d.stderr(), 10)
            # remote connections stopped short of the reserve
            assert proc_fds(d.pid) <= limit - epmd.FD_RESERVE - epmd.LOCAL_RESERVE + 8
            figure("flood: remote connections opened / descriptors held", (opened, proc_fds(d.pid)))
            s, reply = register(d.port, "local-in-flood")
            assert reply[:2] == b"v\x00"
            assert registered(d.port) == before + [b"local-in-flood"]
            s.close()
        else:
            time.sleep(1)
            try:
                s, reply = register(d.port, "local-in-flood")
                s.close()
            except OSError:
                reply = b""
            assert reply[:2] != b"v\x00" or not d.alive()
    finally:
        holder.stdin.close()
        holder.wait(20)


# -- 3. no FD_SETSIZE cliff (D3) ---------------------------------------------------------

N_NODES = 10000


def test_ten_thousand_nodes(start_ours):
    """10,000 nodes registered at once, all listed by NAMES, all looked up,
    all released when their connections close.  (OTP stops at ~1,019.)"""
    raise_own_nofile(N_NODES + 500)
    d = start_ours()
    socks = []
    t0 = time.monotonic()
    try:
        for i in range(N_NODES):
            s, reply = register(d.port, "n%05d" % i, port=1024 + i)
            assert reply[:2] == b"v\x00", i
            socks.append(s)
        listed = registered(d.port)
        assert len(listed) == N_NODES
        assert set(listed) == {b"n%05d" % i for i in range(N_NODES)}
        for i in range(N_NODES):
            reply = request(d.port, b"zn%05d" % i)
            assert reply[:4] == b"w\x00" + U16.pack(1024 + i), i
        figure("10,000 nodes registered, listed and looked up, seconds", round(time.monotonic() - t0, 2))
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: registered(d.port) == [], 30)


# -- 4. descriptor exhaustion is survived (D2) ----------------------------------------------

def _hold_local(port, n):
    socks = []
    for _ in range(n):
        try:
            socks.append(connect(port, timeout=2))
        except OSError:
            pass
    return socks


def test_low_descriptor_limit(start_ours):
    """Started with 64 descriptors, under more connections than it can hold:
    the extra ones are closed at once, the daemon does not spin, keeps its
    nodes, and serves normally once the connections close."""
    d = start_ours(nofile=(64, 64))
    nodes = [register(d.port, "keep%d" % i)[0] for i in range(10)]
    idle = _hold_local(d.port, 100)
    time.sleep(0.5)
    cpu0 = proc_cpu(d.pid)
    time.sleep(2)
    figure("64 descriptors, 100 connections: daemon CPU s in 2 s", proc_cpu(d.pid) - cpu0)
    assert proc_cpu(d.pid) - cpu0 < 0.5
    assert d.alive()
    for s in idle:
        s.close()
    assert wait_until(lambda: len(registered(d.port)) == 10, 10)
    after, reply = register(d.port, "after")
    assert reply[:2] == b"v\x00"
    for s in nodes + [after]:
        s.close()


def test_emfile_survived(start_epmd, impl):
    """The descriptor limit lowered under a running daemon (prlimit) so that
    accept() fails with EMFILE: epmd.py logs it, sheds waiting connections,
    does not spin, keeps every node and serves again once descriptors free
    up.  OTP exits with status 1 and loses every registration."""
    d = start_epmd()
    nodes = [register(d.port, "keep%d" % i)[0] for i in range(10)]
    fds = proc_fds(d.pid)
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (fds + 4, fds + 4))
    idle = _hold_local(d.port, 60)
    try:
        if impl == "otp":
            assert d.wait_exit(10) == 1
            assert "error in accept: Too many open files" in d.stderr()
            return
        assert wait_until(lambda: "error in accept: Too many open files" in d.stderr(), 10)
        cpu0 = proc_cpu(d.pid)
        time.sleep(2)
        figure("EMFILE: daemon CPU s in 2 s", proc_cpu(d.pid) - cpu0)
        assert proc_cpu(d.pid) - cpu0 < 0.5
        assert d.alive()
    finally:
        for s in idle:
            s.close()
    assert wait_until(lambda: names_or_none(d.port) is not None, 20)
    assert sorted(registered(d.port)) == sorted(b"keep%d" % i for i in range(10))
    for s in nodes[:5]:
        s.close()
    assert wait_until(lambda: len(registered(d.port)) == 5, 10)
    after, reply = register(d.port, "after")
    assert reply[:2] == b"v\x00"
    for s in nodes[5:] + [after]:
        s.close()


# -- 5. slow and silent peers are bounded ------------------------------------------------------

def test_silent_reader_bounded_and_loop_not_stalled(start_ours):
    """A peer that asks for a NAMES reply larger than the kernel's buffers
    (5,000 names of 1,020 bytes: about 5 MB) and never reads it: the rest of
    the reply is buffered, other clients are served meanwhile, and the
    connection is closed once the packet time-out has passed."""
    n = 5000
    raise_own_nofile(n + 500)
    d = start_ours("-packet_timeout", "2")
    stem = "\U0001F600" * 251
    nodes = [register(d.port, "%s%04d" % (stem, i), port=6000)[0] for i in range(n)]
    base = proc_fds(d.pid)
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    silent.connect(("127.0.0.1", d.port))
    silent.sendall(frame(b"n"))
    # its reply is still being written: the connection stays
    assert wait_until(lambda: proc_fds(d.pid) == base + 1, 5)
    time.sleep(0.3)
    assert proc_fds(d.pid) == base + 1
    slowest = 0.0
    for i in (0, n // 2, n - 1):
        t0 = time.monotonic()
        reply = request(d.port, b"z" + ("%s%04d" % (stem, i)).encode())
        assert reply[:4] == b"w\x00" + U16.pack(6000)
        slowest = max(slowest, time.monotonic() - t0)
    figure("lookup while a 5 MB reply is stuck, slowest ms", round(slowest * 1000, 2))
    assert slowest < 0.5
    assert wait_until(lambda: proc_fds(d.pid) == base, 6)
    silent.close()
    # A client that half-closes after asking, then reads late, gets it all:
    # nothing more is read from a connection whose reply is being written.
    late = socket.socket()
    late.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    late.connect(("127.0.0.1", d.port))
    late.sendall(frame(b"n"))
    late.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    expected = 4 + sum(len(("name %s%04d at port 6000\n" % (stem, i)).encode()) for i in range(n))
    got = read_to_eof(late, 10)
    assert len(got) == expected
    late.close()
    for s in nodes:
        s.close()


def test_half_packet_and_trickle_bounded(start_epmd):
    """Half a packet is closed by the packet time-out, by both daemons.  A
    trickle of one byte every 0.7 s (each byte within -packet_timeout 1)
    towards a request that never completes: epmd.py closes it once
    REQUEST_TIME_CAP time-outs have passed since the accept (D13), and says
    why at -d; OTP's keeps it for as long as bytes come, and still answers
    when the rest of the request arrives 9 s later."""
    d = start_epmd("-packet_timeout", "1", "-d")
    half = connect(d.port)
    half.sendall(frame(alive2("half"))[:9])
    trickle = connect(d.port)
    trickle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = frame(b"n" * 3057)           # 3,059 bytes: never complete at this pace
    t0 = time.monotonic()
    closed_after = None
    sent = 0
    while closed_after is None and time.monotonic() - t0 < 9.0:
        try:
            trickle.send(data[sent:sent + 1])
            sent += 1
            if not is_open(trickle, 0.7):
                closed_after = time.monotonic() - t0
        except OSError:
            closed_after = time.monotonic() - t0
    assert read_to_eof(half, 5) == b""
    assert wait_until(lambda: "closing because timed out on receive" in d.stderr())
    if d.impl == "py":
        figure("trickle closed after s (packet_timeout 1, cap %d)" % epmd.REQUEST_TIME_CAP,
               closed_after)
        assert closed_after is not None and 5.0 <= closed_after <= 8.5
        assert wait_until(lambda: "closing because request not complete within 5 seconds"
                          in d.stderr())
    else:
        assert closed_after is None
        trickle.sendall(data[sent:])
        assert read_to_eof(trickle) == U32.pack(d.port)
    half.close()
    trickle.close()


# -- 6. any bytes are safe ----------------------------------------------------------------

class Harness:
    """A real Epmd object with real (socketpair) connections, driven by hand:
    no event loop, so each fuzz input runs do_read directly."""

    def __init__(self):
        import io
        import selectors
        self.e = epmd.Epmd(port=4369, log=epmd.DebugLog(0, out=io.BytesIO()))
        self.e.sel = selectors.DefaultSelector()
        self.e.max_conn, self.e.local_reserve = 10000, 64
        self.keep = []
        for i in range(3):
            conn, peer = self.open(True)
            self.feed(conn, peer, frame(alive2("keep%d" % i, port=7000 + i)))
            assert conn.state is epmd.KEPT and peer.recv(6)[:2] == b"v\x00"
            self.keep.append((conn, peer))

    def open(self, local):
        a, b = socket.socketpair()
        conn = self.e.conn_open(a, None, None)
        assert conn is not None
        conn.local_peer = local
        return conn, b

    def feed(self, conn, peer, data):
        if data:
            peer.sendall(data)
        for _ in range(8):
            if conn.state is epmd.CLOSED:
                return
            if conn.fd in self.e.conns:     # watched: the loop's handle()
                self.e.handle(conn, epmd.EVENT_READ)
            else:                           # new: do_accept's first read
                self.e.first_read(conn)

    def check(self):
        e = self.e
        for i, (conn, _) in enumerate(self.keep):
            node = e.nodes.reg.get(b"keep%d" % i)
            assert node is not None and node.conn is conn and node.port == 7000 + i
        for node in e.nodes.reg.values():
            assert e.conns.get(node.conn.fd) is node.conn and node.conn.node is node
        assert len(e.nodes.unreg) <= e.nodes.max_unreg + 1
        assert set(e.pending) <= set(e.conns)
        for fd, conn in e.conns.items():
            assert conn.fd == fd and conn.state is not epmd.CLOSED
            assert (fd in e.pending) == (conn.state in (epmd.READING, epmd.REPLYING))
            assert (conn.node is not None) == (conn.state is epmd.KEPT)

    def close(self):
        for _, peer in self.keep:
            peer.close()
        self.e.epmd_cleanup_exit()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.one_of(st.sampled_from(VALID).map(lambda p: ("valid", p)),
                                    st.binary(max_size=80).map(lambda p: ("junk", p))),
                          st.randoms(use_true_random=False), st.booleans(), st.booleans()),
                min_size=1, max_size=12))
def test_request_handling_fuzz(inputs):
    """Random and mutated packets (fields flipped, cut, extended, concatenated,
    misframed), from local and remote peers, through do_read and do_request:
    no exception, the other connections' nodes stay registered, and the
    tables stay consistent."""
    h = Harness()
    try:
        for (kind, payload), rng, local, hang_up in inputs:
            data = mutate(rng, payload) if kind == "valid" else payload
            conn, peer = h.open(local)
            h.feed(conn, peer, data)
            if hang_up or h.e.conns.get(conn.fd) is conn:
                peer.close()
                h.feed(conn, peer, b"")
            else:
                peer.close()
            h.check()
        assert len(h.e.conns) == len(h.keep)
    finally:
        h.close()


# do_accept's first read at level 0 (Epmd.read_at_accept) must do what
# conn_open and first_read do, only sooner for a PORT_PLEASE2_REQ answered
# before.  Its peers here are socketpairs, as the Harness's.

ASKED = [frame(b"zkeep0"), frame(b"zkeep1\0"), frame(b"zkeep2")]


class Accepting:
    """A listening socket for do_accept whose one pending connection is
    the socketpair end *sock* (its descriptor is handed over)."""

    def __init__(self, sock):
        self.sock = sock

    def _accept(self):
        return self.sock.detach(), None


def primed_harness():
    """A Harness whose three nodes were each asked for once (NodeTable.asked)."""
    h = Harness()
    for packet in ASKED:
        conn, peer = h.open(True)
        h.feed(conn, peer, packet)
        assert peer.recv(64)[:2] == b"w\x00"
        peer.close()
    assert sorted(h.e.nodes.asked) == sorted(ASKED)
    return h


def log_since(h, start):
    """The log lines written since offset *start*, without their time and
    with descriptor numbers made N (the two paths' sockets differ)."""
    import re
    out = h.e.log.out.getvalue()[start:].decode("latin-1")
    return [re.sub(r"descriptor \d+", "descriptor N", line.split(": ", 2)[-1])
            for line in out.splitlines()]


def new_connection(h, data, hang_up, at_accept):
    """A new peer sends *data* (then hangs up if *hang_up*), and the daemon
    takes it through do_accept (read_at_accept, then conn_open and
    first_read), or through conn_open and first_read alone, then as its
    loop would until it closes.  Returns what the
    peer got and the log lines."""
    e = h.e
    before = set(e.conns)
    start = len(e.log.out.getvalue())
    a, b = socket.socketpair()
    b.settimeout(2)
    if data:
        b.sendall(data)
    if hang_up:
        b.shutdown(socket.SHUT_WR)
    if at_accept:
        e.do_accept(Accepting(a), socket.AF_UNIX)   # read_at_accept, then the general path
    else:
        conn = e.conn_open(a, None, socket.AF_UNIX)
        e.first_read(conn)
    waiting = [c for fd, c in e.conns.items() if fd not in before]
    assert len(waiting) <= 1
    if waiting:
        if not hang_up:
            b.shutdown(socket.SHUT_WR)
        for _ in range(8):
            if waiting[0].state is epmd.CLOSED:
                break
            e.handle(waiting[0], epmd.EVENT_READ)
        assert waiting[0].state is epmd.CLOSED
    got = read_to_eof(b)
    b.close()
    h.check()
    return got, log_since(h, start)


def packets_around_asked():
    """Asked packets as they are, cut, extended, with another length, two in
    one write; and any bytes."""
    asked = st.sampled_from(ASKED)
    return st.one_of(
        asked,
        st.tuples(asked, st.integers(0, 12)).map(lambda t: t[0][:t[1]]),
        st.tuples(asked, st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + t[1]),
        st.tuples(asked, st.integers(0, 0xFFFF)).map(lambda t: U16.pack(t[1]) + t[0][2:]),
        asked.map(lambda p: p + p),
        st.binary(max_size=24).filter(lambda d: d[2:3] != b"x"),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(packets_around_asked(), st.booleans()), min_size=1, max_size=8))
def test_read_at_accept_is_conn_open_and_first_read(inputs):
    """Differential: packets around the ones answered before, each sent by a
    new peer to two daemons with the same table, one taking it through
    read_at_accept and the other through conn_open and first_read: the
    peer gets the same bytes and the log says the same, every time."""
    fast, general = primed_harness(), primed_harness()
    try:
        for data, hang_up in inputs:
            assert (new_connection(fast, data, hang_up, True)
                    == new_connection(general, data, hang_up, False)), data
        assert len(fast.e.conns) == len(general.e.conns) == len(fast.keep)
    finally:
        fast.close()
        general.close()


def test_read_at_accept_answers_asked_without_a_connection(monkeypatch):
    """A PORT_PLEASE2_REQ answered before, arriving whole, is answered from
    NodeTable.asked: no name parsed, no Connection made; one not answered
    before takes the general path and is kept in ``asked`` from then on."""
    h = primed_harness()
    e = h.e
    try:
        want = {}
        for packet in ASKED:
            want[packet] = new_connection(h, packet, False, True)[0]
            assert want[packet][:4] == b"w\x00" + U16.pack(7000 + int(packet[7:8]))

        def no_parse(payload, max_chars=0):
            raise AssertionError("parsed again")

        monkeypatch.setattr(epmd, "parse_port2_req", no_parse)
        monkeypatch.setattr(e, "conn_open", lambda *a: pytest.fail("a Connection made"))
        for packet in ASKED:
            assert new_connection(h, packet, False, True) == (want[packet], [])
        monkeypatch.undo()
        fresh = frame(b"zkeep0\0")
        assert fresh not in e.nodes.asked
        assert new_connection(h, fresh, False, True) == (want[ASKED[0]], [])
        assert e.nodes.asked[fresh] == want[ASKED[0]]
    finally:
        h.close()


class _Flaky(socket.socket):
    """A socketpair end whose recv or send fails, or whose send takes only
    three bytes (as under TCP memory pressure)."""
    recv_error = send_error = None
    short_send = False

    def recv(self, n, flags=0):
        if self.recv_error:
            raise self.recv_error
        return super().recv(n, flags)

    def send(self, data, flags=0):
        if self.send_error:
            raise self.send_error
        return super().send(data[:3] if self.short_send else data, flags)


def flaky_pair(data, **kw):
    a, b = socket.socketpair()
    s = _Flaky(fileno=a.detach())
    for k, v in kw.items():
        setattr(s, k, v)
    b.settimeout(2)
    b.sendall(data)
    return s, b


def test_read_at_accept_errors_and_short_send():
    """read_at_accept's own reads and writes fail as do_read's and reply's
    do: logged the same way and closed; a reply the socket takes only part
    of waits in a REPLYING Connection, whose do_write finishes it."""
    h = primed_harness()
    e = h.e
    try:
        start = len(e.log.out.getvalue())
        s, b = flaky_pair(ASKED[0], recv_error=ConnectionResetError(104, "Connection reset by peer"))
        e.read_at_accept(s, None, socket.AF_UNIX)
        assert s.fileno() == -1 and read_to_eof(b) == b""
        assert log_since(h, start) == ["error in read: Connection reset by peer"]

        start = len(e.log.out.getvalue())
        s, b = flaky_pair(ASKED[0], send_error=BrokenPipeError(32, "Broken pipe"))
        e.read_at_accept(s, None, socket.AF_UNIX)
        assert s.fileno() == -1 and read_to_eof(b) == b""
        assert log_since(h, start) == ["error in write, errno=32: Broken pipe"]

        want = new_connection(h, ASKED[0], False, True)[0]
        s, b = flaky_pair(ASKED[0], short_send=True)
        e.read_at_accept(s, None, socket.AF_UNIX)
        conn = e.conns[s.fileno()]
        assert conn.state is epmd.REPLYING and conn.out == want[3:] and s.fileno() in e.pending
        s.short_send = False
        e.handle(conn, epmd.EVENT_WRITE)
        assert conn.state is epmd.CLOSED and read_to_eof(b) == want
        h.check()
    finally:
        h.close()


@pytest.mark.parametrize("level,delay_write,room,at_accept", [
    (0, 0, True, True),
    (1, 0, True, False),
    (0, 1, True, False),
    (0, 0, False, False),
])
def test_do_accept_reads_at_accept_only_when_quiet_with_room(monkeypatch, level, delay_write,
                                                             room, at_accept):
    """do_accept hands a new connection to read_at_accept only where that
    changes nothing: at level 0, without -delay_write, while any peer may
    still open one (conn_open would neither refuse nor log it)."""
    import io
    import selectors
    e = epmd.Epmd(port=4369, delay_write=delay_write, log=epmd.DebugLog(level, out=io.BytesIO()))
    e.sel = selectors.DefaultSelector()
    e.max_conn, e.local_reserve = 10, 2
    if not room:
        e.conns = {-1 - i: None for i in range(8)}
    taken = []
    monkeypatch.setattr(e, "read_at_accept", lambda sock, addr, family: taken.append(sock) or sock.close())
    monkeypatch.setattr(e, "conn_open", lambda sock, addr, family: sock.close())
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    c = socket.create_connection(lsock.getsockname())
    try:
        e.do_accept(lsock, socket.AF_INET)
        assert bool(taken) is at_accept
    finally:
        c.close()
        lsock.close()
        e.sel.close()


def test_socket_fuzz(start_ours):
    """Thousands of random and mutated packets against a live daemon with
    registered nodes: nothing escapes the loop, the nodes stay registered and
    answerable, connections return to zero, memory stays bounded."""
    d = start_ours("-packet_timeout", "1")
    rng = random.Random(1234)
    nodes = {}
    for i in range(5):
        s, reply = register(d.port, "keep%d" % i, port=7000 + i)
        assert reply[:2] == b"v\x00"
        nodes[i] = s
    base_fds = proc_fds(d.pid)
    for _ in range(200):
        request(d.port, b"n")
    rss0 = proc_rss_kb(d.pid)
    for _ in range(3000):
        send_fuzzed(d.port, mutate(rng, rng.choice(VALID)))
    assert d.alive()
    assert "internal error" not in d.stderr()
    assert sorted(registered(d.port))[:5] == [b"keep%d" % i for i in range(5)]
    for i in range(5):
        assert request(d.port, b"zkeep%d" % i)[:4] == b"w\x00" + U16.pack(7000 + i)
    # on a loaded host too: timed-out ones close within 2-3 s of their last byte
    assert wait_until(lambda: proc_fds(d.pid) == base_fds, 15)
    figure("socket fuzz, 3,000 packets: RSS growth kB", proc_rss_kb(d.pid) - rss0)
    assert proc_rss_kb(d.pid) - rss0 < 2048
    for s in nodes.values():
        s.close()


# -- 7. registration churn does not grow memory (D6) --------------------------------------------

def churn(port, start, count):
    for i in range(start, start + count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(frame(alive2("c%07d" % i)))
        s.recv(6)
        s.close()


def test_churn_memory_bounded(start_ours):
    """100,000 register/unregister cycles with fresh names: RSS after the run
    is within 2 MB of RSS after the first 10,000 cycles."""
    d = start_ours()
    churn(d.port, 0, 10000)
    assert wait_until(lambda: registered(d.port) == [], 10)
    rss_10k = proc_rss_kb(d.pid)
    churn(d.port, 10000, 90000)
    assert wait_until(lambda: registered(d.port) == [], 10)
    rss_100k = proc_rss_kb(d.pid)
    figure("churn: RSS kB after 10,000 / 100,000 cycles", (rss_10k, rss_100k))
    assert rss_100k - rss_10k <= 2048, (rss_10k, rss_100k)
    dump = request(d.port, b"d")
    assert dump.count(b"old/unused name") <= epmd.MAX_UNREG_COUNT + 1


"""Black-box tests of the wire protocol, run against epmd.py and OTP's epmd.

Each test runs once per implementation (the `impl` fixture).  Where epmd.py
deliberately differs from OTP (the D numbers of README's table "Differences
from OTP's epmd"), the test asserts each side's own behaviour, so every test
also shows what OTP does.  Each docstring names the OTP source it checks.
"""

import socket
import struct
import time

import pytest
from helpers import (
    U16,
    U32,
    alive2,
    base_env,
    connect,
    frame,
    is_open,
    listening_on,
    log_shape,
    names,
    names_port_or_none,
    read_to_eof,
    register,
    registered,
    request,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def port2(port, name, raw_tail=b""):
    if isinstance(name, str):
        name = name.encode()
    return request(port, b"z" + name + raw_tail)


# -- NAMES ------------------------------------------------------------------

def test_names_empty(epmd):
    """NAMES with no nodes is exactly the 4-byte port.

    Source: OTP epmd_srv.c, do_request (NAMES_REQ).
    """
    assert request(epmd.port, b"n") == U32.pack(epmd.port)


def test_names_newest_first(epmd):
    """One line per node, newest registration first.

    Source: OTP epmd_srv.c, do_request (NAMES_REQ).
    """
    socks = []
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        s, reply = register(epmd.port, name, port=40001 + i)
        assert reply[:2] == b"v\x00"
        socks.append(s)
    reply = request(epmd.port, b"n")
    assert reply == (U32.pack(epmd.port) + b"name gamma at port 40003\n"
                     b"name beta at port 40002\nname alpha at port 40001\n")
    for s in socks:
        s.close()


def test_names_trailing_junk_and_max_length(epmd):
    """Bytes after the code are ignored, up to L = 3057.

    Source: OTP epmd_srv.c, do_read and do_request.
    """
    s, _ = register(epmd.port, "n1", port=4242)
    expected = U32.pack(epmd.port) + b"name n1 at port 4242\n"
    assert request(epmd.port, b"nXYZ") == expected
    assert request(epmd.port, b"n" + b"j" * 3056) == expected
    s.close()


# -- ALIVE2 -----------------------------------------------------------------

def test_alive2_x_resp_and_kept_open(epmd):
    """Highest version 6 gets ALIVE2_X_RESP with creation = time + 1;
    the connection stays open.
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    before = int(time.time())
    s, reply = register(epmd.port, "xnode", port=40000)
    after = int(time.time())
    assert len(reply) == 6 and reply[:2] == b"v\x00"
    creation = U32.unpack_from(reply, 2)[0]
    # within 1 s: C's time() reads the coarse clock, which may lag time.time()
    assert before <= creation <= after + 1
    assert is_open(s, 0.3)
    assert registered(epmd.port) == [b"xnode"]
    s.close()


@pytest.mark.parametrize("highvsn", [5, 0])
def test_alive2_old_resp(epmd, highvsn):
    """Highest version below 6 gets ALIVE2_RESP with a creation in 1..3.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    s, reply = register(epmd.port, "old%d" % highvsn, highvsn=highvsn, lowvsn=0)
    assert len(reply) == 4 and reply[:2] == b"y\x00"
    assert 1 <= U16.unpack_from(reply, 2)[0] <= 3
    assert is_open(s, 0.2)
    s.close()


def test_alive2_reregister_bumps_creation(epmd):
    """Registering a name again gives the previous creation + 1.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    s, r1 = register(epmd.port, "again")
    s.close()
    assert wait_until(lambda: registered(epmd.port) == [])
    s, r2 = register(epmd.port, "again")
    assert U32.unpack_from(r2, 2)[0] == U32.unpack_from(r1, 2)[0] + 1
    s.close()


@pytest.mark.parametrize("highvsn,expected", [(6, b"v\x01\x00\x00\x00\x63"), (5, b"y\x01\x00\x63")])
def test_alive2_duplicate(epmd, highvsn, expected):
    """A duplicate name gets result 1, creation 99; the first owner stays.
    OTP then holds the rejected connection open forever (even past the packet
    time-out); epmd.py closes it (D9).
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    s1, r1 = register(epmd.port, "dup")
    s2, r2 = register(epmd.port, "dup", highvsn=highvsn)
    assert r2 == expected
    assert registered(epmd.port) == [b"dup"]
    if epmd.impl == "otp":
        assert is_open(s2, 0.5)
    else:
        assert read_to_eof(s2, 2) == b""
    assert port2(epmd.port, "dup")[:2] == b"w\x00"
    s1.close()
    s2.close()


def test_failed_alive2_not_timed_out(start_epmd):
    """OTP keeps a failed ALIVE2's connection open past packet_timeout;
    epmd.py closes it at once (D9).
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    d = start_epmd("-packet_timeout", "1")
    s1, _ = register(d.port, "dup")
    s2, r2 = register(d.port, "dup")
    assert r2[1] == 1
    if d.impl == "otp":
        assert is_open(s2, 3.5)
    else:
        assert read_to_eof(s2, 2) == b""
    s1.close()
    s2.close()


def test_any_byte_on_registered_connection_unregisters(epmd):
    """Data on a registered connection unregisters the node and closes it.

    Source: OTP epmd_srv.c, do_read (a registered connection).
    """
    s, _ = register(epmd.port, "chatty")
    s.sendall(b"hello")
    assert read_to_eof(s) == b""
    assert registered(epmd.port) == []
    s.close()


def test_half_close_unregisters(epmd):
    """Shutdown(SHUT_WR) on a registered connection unregisters the node.

    Source: OTP epmd_srv.c, do_read (a registered connection).
    """
    s, _ = register(epmd.port, "half")
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == b""
    assert wait_until(lambda: registered(epmd.port) == [])
    s.close()


@pytest.mark.parametrize("payload", [
    pytest.param(alive2("")[:13], id="L13-no-elen"),
    pytest.param(alive2("a")[:12], id="L12"),
    pytest.param(alive2("abc", nlen=200), id="nlen-beyond"),
    pytest.param(alive2("abc", elen=50), id="elen-beyond"),
    pytest.param(alive2(b"ab\0cd"), id="nul-in-name"),
    pytest.param(alive2(b"foobar\0"), id="nul-terminated"),
    pytest.param(alive2("")[:11], id="L11-no-elen"),
    pytest.param(alive2("")[:9], id="L9-no-nlen"),
])
def test_alive2_malformed_closed_without_reply(epmd, payload):
    """Malformed ALIVE2 packets (too short, lengths beyond the packet, a NUL
    in or at the end of the name) are closed without a reply.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    assert request(epmd.port, payload) == b""
    assert registered(epmd.port) == []


@pytest.mark.parametrize("name,extra", [
    pytest.param(b"a" * 256, b"", id="256-ascii"),
    pytest.param("\U0001F600".encode() * 256, b"", id="256-4byte-1024-bytes"),
    pytest.param(b"bad\xff", b"", id="invalid-utf8"),
    pytest.param(b"\xc0\x80x", b"", id="overlong"),
    pytest.param(b"\xed\xa0\x80", b"", id="surrogate"),
    pytest.param(b"\xf4\x90\x80\x80", b"", id="above-10ffff"),
    pytest.param(b"okname", b"e" * 1021, id="extra-1021"),
])
def test_alive2_refused_with_error(epmd, name, extra):
    """Too long, badly encoded names and too much extra get result 1.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    s, reply = register(epmd.port, name, extra=extra)
    assert reply == b"v\x01\x00\x00\x00\x63"
    assert registered(epmd.port) == []
    s.close()


@pytest.mark.parametrize("name", [
    pytest.param("a" * 255, id="255-ascii"),
    pytest.param("\U0001F600" * 255, id="255-4byte"),
])
def test_alive2_limits_accepted(epmd, name):
    """255 code points (up to 1020 bytes) and 1020 bytes of extra register,
    in a packet of the maximum size 3057... and are echoed by PORT2.
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    raw = name.encode()
    extra = bytes(range(256)) * 3 + b"x" * (1020 - 768)
    s, reply = register(epmd.port, raw, port=1234, extra=extra)
    assert reply[:2] == b"v\x00"
    assert registered(epmd.port) == [raw]
    s.close()


def test_alive2_max_packet_3057(epmd):
    """An ALIVE2 of exactly L = 3057 (trailing bytes after Extra) works.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2; OTP epmd_srv.c, do_read and do_request.
    """
    name = ("\U0001F600" * 255).encode()
    extra = b"E" * 1020
    payload = alive2(name, extra=extra)
    payload += b"T" * (3057 - len(payload))
    assert len(payload) == 3057
    with connect(epmd.port) as s:
        s.sendall(frame(payload))
        s.settimeout(5)
        assert s.recv(6)[:2] == b"v\x00"
        assert registered(epmd.port) == [name]


def test_alive2_empty_name(epmd):
    """OTP registers an empty name (listed as ``name  at port``);
    epmd.py refuses it with result 1 (D10).
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    s, reply = register(epmd.port, b"", extra=b"x", port=5000)
    if epmd.impl == "otp":
        assert reply == b"v\x00" + reply[2:] and len(reply) == 6
        assert names(epmd.port)[1] == [b"name  at port 5000\n"]
    else:
        assert reply == b"v\x01\x00\x00\x00\x63"
        assert registered(epmd.port) == []
    s.close()


def test_alive2_trailing_bytes_ignored(epmd):
    """Bytes after Extra are ignored.

    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ) and node_reg2.
    """
    with connect(epmd.port) as s:
        s.sendall(frame(alive2("trail", extra=b"ex") + b"JUNKJUNK"))
        s.settimeout(5)
        assert s.recv(6)[:2] == b"v\x00"
        assert port2(epmd.port, "trail").endswith(b"\x00\x02ex")


# -- PORT_PLEASE2 -------------------------------------------------------------

def test_port2_echoes_every_field(epmd):
    """PORT2_RESP echoes port, type, protocol, versions, name, extra;
    one trailing NUL in the request is ignored.
    Source: OTP epmd_srv.c, do_request (PORT_PLEASE2_REQ).
    """
    s, _ = register(epmd.port, "echo", port=0xBEEF, nodetype=72, proto=3, highvsn=7,
                    lowvsn=4, extra=b"\x01\x02\x00x")
    expected = (b"w\x00" + struct.pack(">HBBHHH", 0xBEEF, 72, 3, 7, 4, 4) + b"echo"
                + U16.pack(4) + b"\x01\x02\x00x")
    assert port2(epmd.port, "echo") == expected
    assert port2(epmd.port, "echo", b"\0") == expected
    s.close()


def test_port2_answer_follows_the_table(epmd):
    """The same PORT_PLEASE2_REQ, with and without its trailing NUL, asked
    again and again while its node registers, leaves and registers anew
    with other fields: each answer is the table's at that moment, never an
    earlier one (epmd.py keeps answered packets' replies, NodeTable.asked).
    Source: OTP epmd_srv.c, do_request (PORT_PLEASE2_REQ), node_unreg_sock.
    """
    def lookup(nul):
        return port2(epmd.port, "again", b"\0" if nul else b"")

    for rnd, (port, extra) in enumerate([(4100, b""), (4200, b"x\0y"), (4300, b"")]):
        s, _ = register(epmd.port, "again", port=port, extra=extra)
        want = (b"w\x00" + struct.pack(">HBBHHH", port, 77, 0, 6, 5, 5) + b"again"
                + U16.pack(len(extra)) + extra)
        for nul in (False, True, False, True):
            assert lookup(nul) == want, (rnd, nul)
        s.close()
        assert wait_until(lambda: lookup(rnd % 2 == 0) == b"w\x01")
        assert lookup(False) == b"w\x01" and lookup(True) == b"w\x01"


def test_port2_asked_again_arrives_any_way(epmd):
    """A PORT_PLEASE2_REQ answered before, sent again on new connections:
    whole, byte by byte, after a pause, with a byte too many, and twice in
    one write.  The first three are answered as the first time; the last
    two close without a reply ("got N bytes in packet, expected M").
    epmd.py answers a repeated request that arrives whole in the read after
    its accept before it becomes a connection (Epmd.read_at_accept);
    everything else takes the general path.
    Source: OTP epmd_srv.c, do_read, do_request (PORT_PLEASE2_REQ).
    """
    s, _ = register(epmd.port, "anyway", port=4400)
    packet = frame(b"zanyway")
    want = port2(epmd.port, "anyway")
    assert want[:4] == b"w\x00" + U16.pack(4400)
    assert request(epmd.port, b"zanyway") == want

    def sent(pieces, pause=0.0):
        c = connect(epmd.port)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(pause)
        for piece in pieces:
            c.sendall(piece)
            time.sleep(0.02)
        got = read_to_eof(c)
        c.close()
        return got

    assert sent([packet[i:i + 1] for i in range(len(packet))]) == want
    assert sent([packet], pause=0.3) == want
    assert sent([packet + b"z"]) == b""
    assert sent([packet + packet]) == b""
    assert wait_until(lambda: epmd.stderr().count("got 8 bytes in packet, expected 7") == 1
                      and "got 16 bytes in packet, expected 7" in epmd.stderr())
    assert sent([packet]) == want
    s.close()


def test_port2_unknown(epmd):
    """An unknown name gets exactly ``w`` 1.

    Source: OTP epmd_srv.c, do_request (PORT_PLEASE2_REQ).
    """
    assert port2(epmd.port, "nobody") == b"w\x01"


@pytest.mark.parametrize("payload", [
    pytest.param(b"z", id="empty"),
    pytest.param(b"z\0", id="nul-only"),
    pytest.param(b"zab\0cd", id="interior-nul"),
    pytest.param(b"zab\xffcd", id="invalid-utf8"),
    pytest.param(b"z" + b"a" * 256, id="256-chars"),
])
def test_port2_malformed_closed(epmd, payload):
    """Empty, NUL inside, bad UTF-8, too long: closed without reply.

    Source: OTP epmd_srv.c, do_request (PORT_PLEASE2_REQ).
    """
    assert request(epmd.port, payload) == b""


def test_port2_255_characters(epmd):
    """OTP cannot look up a registered 255-character name (it counts the
    terminator); epmd.py can (D8).  254 works for both.
    Source: OTP epmd_srv.c, do_request (PORT_PLEASE2_REQ).
    """
    for name in ("b" * 254, "c" * 255, "\U0001F600" * 255):
        s, reply = register(epmd.port, name)
        assert reply[:2] == b"v\x00"
        answer = port2(epmd.port, name)
        if epmd.impl == "otp" and len(name) == 255:
            assert answer == b""
        else:
            assert answer[:2] == b"w\x00" and name.encode() in answer
        s.close()


# -- DUMP, KILL, STOP ---------------------------------------------------------

def test_dump_format(start_epmd):
    """DUMP lists active nodes newest first and old ones oldest first,
    NUL-terminated; with -d, a new name takes over the oldest old entry's
    creation once more than 5 are remembered.
    Source: OTP epmd_srv.c, do_request (DUMP_REQ); OTP epmd_srv.c, node_reg2.
    """
    d = start_epmd("-d")
    creations = {}
    for i in range(6):
        s, reply = register(d.port, "old%d" % i, port=41000 + i)
        creations["old%d" % i] = U32.unpack_from(reply, 2)[0]
        s.close()
        assert wait_until(lambda: registered(d.port) == [])
    s1, _ = register(d.port, "act1", port=42001)
    # six names are remembered, more than 5: "act1" took old0's entry as it was
    reply = request(d.port, b"d")
    assert reply[:4] == U32.pack(d.port)
    parts = reply[4:].split(b"\0")
    assert parts[-1] == b""
    lines = parts[:-1]
    assert lines[0].startswith(b"active name     <act1> at port 42001, fd = ")
    assert lines[0].endswith(b"\n")
    olds = lines[1:]
    assert [line.split(b">")[0] for line in olds] == [b"old/unused name <old%d" % i for i in range(1, 6)]
    for i, line in zip(range(1, 6), olds):
        assert line.startswith(b"old/unused name <old%d>, port = %d, fd = " % (i, 41000 + i))
        assert line.endswith(b" \n")
    s1.close()


def test_steal_passes_creation_on(start_epmd):
    """With -d, after 6 unregistered names a new name's creation equals the
    oldest unregistered entry's last creation, and that entry leaves DUMP.
    Source: OTP epmd_srv.c, node_reg2.
    """
    d = start_epmd("-d")
    first = None
    for i in range(6):
        s, reply = register(d.port, "n%d" % i)
        if i == 0:
            first = U32.unpack_from(reply, 2)[0]
        s.close()
        assert wait_until(lambda: registered(d.port) == [])
    s, reply = register(d.port, "fresh")
    assert U32.unpack_from(reply, 2)[0] == first
    assert b"<n0>" not in request(d.port, b"d")
    s.close()


def test_kill_refused_with_live_nodes(epmd):
    """KILL with live nodes and no relaxed mode: ``NO``, daemon lives;
    once the node has gone, KILL is obeyed.

    Source: OTP epmd_srv.c, do_request (KILL_REQ).
    """
    s, _ = register(epmd.port, "live")
    assert request(epmd.port, b"k") == b"NO"
    assert epmd.alive()
    assert registered(epmd.port) == [b"live"]
    s.close()
    # once the node has left, the same request stops the daemon
    assert wait_until(lambda: registered(epmd.port) == [])
    assert request(epmd.port, b"k") == b"OK"
    assert epmd.wait_exit(5) == 0


def test_kill_no_nodes(epmd):
    """KILL with no nodes: ``OK`` and exit 0 (trailing junk ignored).

    Source: OTP epmd_srv.c, do_request (KILL_REQ); OTP epmd_srv.c, do_read and do_request.
    """
    assert request(epmd.port, b"kXYZ") == b"OK"
    assert epmd.wait_exit(5) == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_kill_relaxed(start_epmd, how):
    """Relaxed mode (the flag, or the variable set to an empty string):
    KILL succeeds with live nodes, which see EOF.
    Source: OTP epmd_srv.c, do_request (KILL_REQ).
    """
    if how == "flag":
        d = start_epmd("-relaxed_command_check")
    else:
        d = start_epmd(env=base_env(ERL_EPMD_RELAXED_COMMAND_CHECK=""))
    s, _ = register(d.port, "victim")
    assert request(d.port, b"k") == b"OK"
    assert read_to_eof(s) == b""
    assert d.wait_exit(5) == 0
    s.close()


def test_stop_not_relaxed(epmd):
    """STOP without relaxed mode: closed, no reply, node still there.

    Source: OTP epmd_srv.c, do_request (STOP_REQ) and node_unreg.
    """
    s, _ = register(epmd.port, "keep")
    assert request(epmd.port, b"skeep") == b""
    assert registered(epmd.port) == [b"keep"]
    s.close()


def test_stop_relaxed(start_epmd):
    """STOP of a registered name: ``STOPPED`` and its connection is
    closed; an unknown name: ``NOEXISTSTOPPED``; the name ends at a NUL.
    Source: OTP epmd_srv.c, do_request (STOP_REQ) and node_unreg.
    """
    d = start_epmd("-relaxed_command_check")
    s, _ = register(d.port, "beta")
    assert request(d.port, b"sbeta\0junk") == b"STOPPED"
    assert read_to_eof(s) == b""
    assert registered(d.port) == []
    assert request(d.port, b"sbeta") == b"NOEXISTSTOPPED"
    assert request(d.port, b"s") == b""
    s.close()


# -- framing ----------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    pytest.param(b"\x00\x01Q", id="Q"),
    pytest.param(b"\x00\x01a", id="old-ALIVE_REQ"),
    pytest.param(b"\x00\x03pab", id="old-PORT_REQ"),
    pytest.param(b"\x00\x00", id="L0"),
    pytest.param(b"\x0b\xf2" + b"n" * 3058, id="L3058"),
    pytest.param(b"\xff\xff", id="L65535"),
    pytest.param(b"\x00\x01n\x00\x01n", id="two-requests"),
    pytest.param(frame(alive2("pipe")) + frame(b"n"), id="alive2-then-names"),
])
def test_bad_framing_closed_without_reply(epmd, raw):
    """Unknown codes, bad lengths and pipelined requests are
    closed without a reply (and register nothing).
    Source: OTP epmd_srv.c, do_read and do_request.
    """
    assert request(epmd.port, raw, raw=True) == b""
    assert registered(epmd.port) == []


def test_byte_at_a_time(epmd):
    """A request delivered one byte per write is answered.

    Source: OTP epmd_srv.c, do_read and do_request.
    """
    s0, _ = register(epmd.port, "slow")
    with connect(epmd.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in frame(b"zslow"):
            s.send(bytes((b,)))
            time.sleep(0.05)
        assert read_to_eof(s)[:2] == b"w\x00"
    with connect(epmd.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in frame(alive2("dribble")):
            s.send(bytes((b,)))
            time.sleep(0.02)
        s.settimeout(5)
        assert s.recv(6)[:2] == b"v\x00"
        assert set(registered(epmd.port)) == {b"slow", b"dribble"}
    s0.close()


def test_packet_timeout(start_epmd):
    """With -packet_timeout 1, idle and incomplete connections (nothing
    sent, one byte, the length only, part of the body) are closed without
    reply within 1-3 s; a registered one is not.

    Source: OTP epmd_srv.c, run and do_read (the packet time-out).
    """
    d = start_epmd("-packet_timeout", "1")
    reg, _ = register(d.port, "stays")
    idle = connect(d.port)
    starts = [b"\x00", b"\x00\x03", b"\x00\x05zab"]
    parts = [connect(d.port) for _ in starts]
    for s, start in zip(parts, starts):
        s.sendall(start)
    t0 = time.monotonic()
    for s in [idle] + parts:
        assert read_to_eof(s, 5) == b""
    assert time.monotonic() - t0 <= 3.5
    assert is_open(reg, 1.0)
    assert registered(d.port) == [b"stays"]
    for s in [reg, idle] + parts:
        s.close()


def test_dribble(start_epmd):
    """D13: the packet time-out restarts on every read that brings bytes,
    so a client sending one byte at a time, each within the time-out, is
    answered by both daemons (for epmd.py: as long as the whole request
    comes within REQUEST_TIME_CAP time-outs, see test_hardening).

    Source: OTP epmd_srv.c, do_read (the time-out restarts on every read).
    """
    d = start_epmd("-packet_timeout", "1")
    with connect(d.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = frame(b"nXYZ")
        t0 = time.monotonic()
        for b in data[:-1]:
            s.send(bytes((b,)))
            time.sleep(0.7)
        s.send(data[-1:])
        assert read_to_eof(s) == U32.pack(d.port)
        assert time.monotonic() - t0 >= 3.5     # longer than 3 time-outs in all


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_default_packet_timeout(start_ours):
    """With the default time-out, an incomplete connection is closed 60 to
    66 s after its last byte (OTP measured 61-66 s).  Both daemons are timed
    in the same minute, so the suite waits once.

    Source: OTP epmd_srv.c, run and do_read (the packet time-out).
    """
    from helpers import OTP_EPMD, need
    if OTP_EPMD is None:
        need("OTP's epmd binary")
    daemons = [start_ours(), start_ours(which="otp")]
    socks = []
    for d in daemons:
        s = connect(d.port)
        s.sendall(b"\x00")
        socks.append(s)
    t0 = time.monotonic()
    closed = {}
    for d, s in zip(daemons, socks):
        with s:
            assert read_to_eof(s, 80 - (time.monotonic() - t0)) == b""
            closed[d.impl] = time.monotonic() - t0
    for impl, after in closed.items():
        assert 60 <= after <= 66.5, (impl, after)


# -- access control and listening ----------------------------------------------

def test_ipv6_loopback(epmd):
    """The implicit ::1 listener serves every request, locally."""
    s, reply = register(epmd.port, "six", host="::1")
    assert reply[:2] == b"v\x00"
    assert names(epmd.port, host="::1")[1] == [b"name six at port 5000\n"]
    assert request(epmd.port, b"zsix", host="::1")[:2] == b"w\x00"
    s.close()


def _remote_source(family):
    from helpers import host_addresses
    addrs = host_addresses(family)
    if not addrs:
        pytest.skip("this host has no non-loopback address of that family")
    return addrs[0]


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_remote_peer_only_answered(epmd, family, host):
    """From a non-loopback source address to loopback, NAMES and PORT2
    are answered; ALIVE2, DUMP, KILL and STOP are closed without a reply.
    Source: OTP epmd_srv.c, conn_local_peer_check.
    """
    src = _remote_source(family)
    s, _ = register(epmd.port, "here")
    expected = U32.pack(epmd.port) + b"name here at port 5000\n"
    assert request(epmd.port, b"n", host=host, source=src) == expected
    assert request(epmd.port, b"zhere", host=host, source=src)[:2] == b"w\x00"
    for payload in (alive2("intruder"), b"d", b"k", b"shere"):
        assert request(epmd.port, payload, host=host, source=src) == b""
    assert registered(epmd.port) == [b"here"]
    assert epmd.alive()
    s.close()


def test_same_host_address_is_local(start_epmd):
    """The host talking to itself over its own non-loopback address is local.

    Source: OTP epmd_srv.c, conn_local_peer_check (peer address == own address).
    """
    src = _remote_source(socket.AF_INET)
    d = start_epmd("-address", src)
    s, reply = register(d.port, "selfie", host=src)
    assert reply[:2] == b"v\x00"
    assert request(d.port, b"d", host=src)[:4] == U32.pack(d.port)
    s.close()



def test_address_list(start_epmd):
    """-address adds the listed addresses to 127.0.0.1 and ::1; the
    loopback addresses are not bound twice.
    Source: OTP epmd_srv.c, run (the listening sockets).
    """
    d = start_epmd("-address", "127.0.0.2", loopback=False)
    expected = [("127.0.0.1", d.port), ("::1", d.port), ("127.0.0.2", d.port)]
    assert listening_on(d.pid, d.port) == sorted(expected)
    assert names(d.port, host="127.0.0.2")[0] == d.port
    d2 = start_epmd("-address", "127.0.0.1,::1", loopback=False)
    assert listening_on(d2.pid, d2.port) == sorted([("127.0.0.1", d2.port), ("::1", d2.port)])
    d3 = start_epmd("-address", " 127.0.0.3 , ,127.0.0.4 ", loopback=False)
    assert len(listening_on(d3.pid, d3.port)) == 4


def test_no_address_listens_everywhere(start_epmd):
    """Without -address: 0.0.0.0 and :: (IPv6-only)."""
    d = start_epmd(loopback=False)
    assert listening_on(d.pid, d.port) == sorted([("0.0.0.0", d.port), ("::", d.port)])


def test_address_env_and_override(start_epmd):
    """ERL_EPMD_ADDRESS is honoured with loopback added; -address replaces it.

    Source: OTP epmd_srv.c, run (the listening sockets).
    """
    d = start_epmd(loopback=False, env=base_env(ERL_EPMD_ADDRESS="127.0.0.5"))
    assert ("127.0.0.5", d.port) in listening_on(d.pid, d.port)
    d2 = start_epmd("-address", "127.0.0.6", loopback=False, env=base_env(ERL_EPMD_ADDRESS="127.0.0.5"))
    addrs = [a for a, _ in listening_on(d2.pid, d2.port)]
    assert "127.0.0.6" in addrs and "127.0.0.5" not in addrs


def test_bad_address(start_epmd):
    """An unparsable address: ``cannot parse IP address "bogus"``, exit 1.

    Source: OTP epmd_srv.c, run (the listening sockets).
    """
    d = start_epmd("-address", "bogus", loopback=False, wait=False)
    assert d.wait_exit(5) == 1
    assert 'cannot parse IP address "bogus"' in d.stderr()


def test_too_many_addresses(start_epmd):
    """13 non-loopback addresses work; 14 are refused, exit 1.

    Source: OTP epmd_srv.c, run (the listening sockets).
    """
    ok = ",".join("127.0.1.%d" % i for i in range(1, 14))
    d = start_epmd("-address", ok, loopback=False)
    assert len(listening_on(d.pid, d.port)) == 15
    bad = ",".join("127.0.2.%d" % i for i in range(1, 15))
    d2 = start_epmd("-address", bad, loopback=False, wait=False)
    assert d2.wait_exit(5) == 1
    assert "cannot listen on more than 16 IP addresses" in d2.stderr()


@pytest.mark.parametrize("debug", [False, True])
def test_port_busy_exits_zero(start_epmd, debug):
    """A second daemon on a busy port exits 0 and the first keeps serving.
    OTP prints the "already running" line only with -d; epmd.py always (D12).
    Source: OTP epmd_srv.c, run (the listening sockets).
    """
    d1 = start_epmd()
    s, _ = register(d1.port, "first")
    args = ["-d"] if debug else []
    d2 = start_epmd(*args, port=d1.port, wait=False)
    assert d2.wait_exit(5) == 0
    line = "there is already a epmd running at port %d on ipaddr 127.0.0.1" % d1.port
    if debug or d2.impl == "py":
        assert line in d2.stderr()
    else:
        assert d2.stderr() == ""
    assert registered(d1.port) == [b"first"]
    s.close()


def test_erl_epmd_port_env(start_epmd):
    """ERL_EPMD_PORT sets the daemon's port.

    Source: OTP epmd.c, main.
    """
    from helpers import free_port
    port = free_port()
    d = start_epmd(env=base_env(ERL_EPMD_PORT=str(port)), loopback=False, port=None)
    # -port from the fixture wins over the variable, as in OTP
    assert names(d.port)[0] == d.port
    d.stop()
    import subprocess

    from helpers import OTP_EPMD, OURS
    exe = list(OURS) if d.impl == "py" else [OTP_EPMD]
    p = subprocess.Popen(exe + ["-address", "127.0.0.1"], env=base_env(ERL_EPMD_PORT=str(port)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: names_port_or_none(port) == port, 10)
    finally:
        p.terminate()
        p.wait(5)


def test_port_70000(start_epmd, impl):
    """OTP binds 70000 mod 65536 = 4464 and reports 70000; epmd.py refuses
    a port outside 1..65535 (D7).
    Source: OTP epmd.c, main.
    """
    from helpers import Daemon, free_port
    if impl == "py":
        d = start_epmd(port=70000, wait=False)
        assert d.wait_exit(5) == 1
        assert "70000" in d.stderr()
        return
    from helpers import _bindable
    if not (_bindable(socket.AF_INET, "127.0.0.1", 4464, reuse=True)
            and _bindable(socket.AF_INET6, "::1", 4464, reuse=True)):
        pytest.skip("port 4464 is busy")
    del Daemon, free_port
    d = start_epmd(port=70000, wait=False)
    assert wait_until(lambda: names_port_or_none(4464) == 70000, 10)
    d.stop()


# -- logging ------------------------------------------------------------------

LOG_LINE = r"^epmd: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}: .*\r$"


def test_debug_hexdump_format(start_epmd):
    """-d -d logs every packet read and written as ``got N bytes`` and
    ``***** ``-prefixed hexdump rows, every line ending in CRLF.
    Source: OTP epmd_srv.c, dbg_print_buf; epmd.c, dbg_gen_printf.
    """
    import re
    d = start_epmd("-d", "-d")
    s, _ = register(d.port, "cap", port=40000)
    assert request(d.port, b"n")
    s.close()
    assert wait_until(lambda: "unregistering 'cap:" in d.stderr())
    err = d.stderr()
    lines = err.split("\n")[:-1]
    assert lines and all(line.endswith("\r") for line in lines)
    for line in lines:
        if not line.startswith("***** "):
            assert re.match(LOG_LINE, line), line
    assert ("***** 00000000  00 10 78 9c 40 4d 00 00  06 00 05 00 03 63 61 70  |..x.@M.......cap|\r\n"
            "***** 00000010  00 00                                             |..|\r\n") in err
    assert "***** 00000000  00 01 6e                                          |..n|\r\n" in err
    for text_ in ("** got ALIVE2_REQ", "registering 'cap:", "type 77 proto 0 highvsn 6 lowvsn 5",
                  '** sent ALIVE2_RESP for "cap"', "** got NAMES_REQ", "** sent NAMES_RESP",
                  "Local peer connected", "opening connection on file descriptor",
                  "closing connection on file descriptor", "entering the main select() loop",
                  "got 3 bytes", "got 6 bytes", "got 4 bytes", "got 23 bytes"):
        assert text_ in err, text_


def test_level0_partial_packet_logged(epmd):
    """Level 0 lines are printed without -d: a bare connect-and-close logs
    "got partial packet only"."""
    s = connect(epmd.port)
    s.close()
    assert wait_until(lambda: "got partial packet only on file descriptor" in epmd.stderr())


# -- scale ------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_thousand_registrations(start_epmd, impl):
    """1,000 simultaneous registrations are all listed by NAMES (OTP's limit
    is about 1,019 connections, so 1,000 fits both); when the first one
    leaves, NAMES lists the 999 others."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    d = start_epmd()
    socks = []
    try:
        for i in range(1000):
            s, reply = register(d.port, "node%04d" % i, port=10000 + i)
            assert reply[:2] == b"v\x00", i
            socks.append(s)
        listed = registered(d.port)
        assert sorted(listed) == sorted(b"node%04d" % i for i in range(1000))
        assert listed[0] == b"node0999"
        # the first leaves: a NAMES reply of 999 lines (about 25 kB, more
        # than one read) lists exactly the others
        socks.pop(0).close()
        assert wait_until(lambda: b"node0000" not in registered(d.port))
        assert sorted(registered(d.port)) == sorted(b"node%04d" % i for i in range(1, 1000))
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: registered(d.port) == [], 10)


def _reset(sock):
    """Close *sock* with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_failed_reply_write_keeps_other_node(start_epmd):
    """A duplicate ALIVE2 whose client resets before the (delayed) reply.
    OTP then unregisters the *live* owner of that name; epmd.py only ever
    unregisters what the failing connection registered itself (D1).
    Source: OTP epmd_srv.c, do_request (ALIVE2_REQ); README, D1.
    """
    d = start_epmd("-delay_write", "1")
    owner, reply = register(d.port, "victim")
    assert reply[:2] == b"v\x00"
    dup = connect(d.port)
    dup.sendall(frame(alive2("victim")))
    time.sleep(0.3)
    _reset(dup)
    time.sleep(1.5)
    if d.impl == "otp":
        assert registered(d.port) == []
    else:
        assert registered(d.port) == [b"victim"]
    assert is_open(owner, 0.2)
    owner.close()


def test_failed_reply_write_unregisters_own_node(start_epmd):
    """A registration whose client resets before the reply is not kept."""
    d = start_epmd("-delay_write", "1")
    s = connect(d.port)
    s.sendall(frame(alive2("gone")))
    time.sleep(0.3)
    _reset(s)
    time.sleep(1.5)
    assert registered(d.port) == []


def test_delay_accept(start_epmd):
    """-delay_accept N: the daemon sleeps N s after every wake-up, so even a
    NAMES request takes more than N s."""
    d = start_epmd("-delay_accept", "1")
    t0 = time.monotonic()
    assert request(d.port, b"n", timeout=10) == U32.pack(d.port)
    assert time.monotonic() - t0 >= 1.0


def test_delay_write(start_epmd):
    """-delay_write N: N s before every write; NAMES with k nodes writes k + 1
    times."""
    d = start_epmd("-delay_write", "1")
    s1, _ = register(d.port, "w1")
    s2, _ = register(d.port, "w2")
    t0 = time.monotonic()
    assert len(request(d.port, b"n", timeout=10)) > 4
    assert time.monotonic() - t0 >= 3.0
    s1.close()
    s2.close()


def _session(port, relaxed):
    """A scripted session of requests, each finished before the next starts."""
    def settle():
        time.sleep(0.15)
    s_alpha, _ = register(port, "alpha", port=40001)
    settle()
    if relaxed:
        request(port, b"salpha")
        settle()
        request(port, b"snobody")
        request(port, b"k")
        return
    for payload in (b"n", b"zalpha", b"znobody", b"d", b"k", b"salpha", b"Q",
                    alive2("x")[:12], alive2("abc", nlen=200), alive2(b"a\0b"),
                    b"z", b"za\0b", b"z\xff"):
        request(port, payload)
    for raw in (b"\x00\x00", b"\xff\xff", b"\x00\x01n\x00\x01n"):
        request(port, raw, raw=True)
    s_dup, _ = register(port, "alpha")          # duplicate: error reply
    s_dup.close()
    settle()
    s_alpha.sendall(b"junk")                    # data on a registered connection
    read_to_eof(s_alpha)
    settle()
    s_again, _ = register(port, "alpha")        # the same name again: reusing its slot
    settle()
    s_again.shutdown(socket.SHUT_WR)
    read_to_eof(s_again)
    settle()
    request(port, b"n")
    request(port, b"k")                         # no nodes left: OK, and exit


@pytest.mark.parametrize("relaxed", [False, True])
def test_debug_log_of_a_session_same_as_otp(start_ours, relaxed):
    """-d -d logs of the same scripted session (every request kind, refusals,
    malformed packets, unregistration by data and by close, STOP, KILL) are
    the same line for line for epmd.py and OTP's epmd, once timestamps,
    numbers and dumped bytes are blanked."""
    from helpers import OTP_EPMD, need
    if OTP_EPMD is None:
        need("OTP's epmd binary")
    logs = {}
    for which in ("otp", "py"):
        args = ["-d", "-d"] + (["-relaxed_command_check"] if relaxed else [])
        d = start_ours(*args, which=which)
        _session(d.port, relaxed)
        time.sleep(0.3)
        d.stop()
        logs[which] = log_shape(d.stderr())
    py, otp = logs["py"], logs["otp"]
    assert len(py) > 40
    # D25, D26: epmd.py follows refusals with a line of its own (who holds
    # the name, what is wrong with it, the remote peer); OTP does not
    extra = [i for i, line in enumerate(py) if line.startswith("epmd: <time>: refused ")]
    assert all(py[i - 1] in otp for i in extra), py
    assert extra or relaxed, py
    py = [line for i, line in enumerate(py) if i not in extra]
    if not relaxed:
        # D9: OTP holds the refused duplicate's connection as if registered,
        # so when the client closes it, it looks for that connection's node
        start = otp.index("epmd: <time>: node name already occupied alpha")
        del otp[otp.index("epmd: <time>: trying to unregister node with unknown file descriptor N", start)]
    assert py == otp

"""Counterparts of OTP's own epmd test suite, run against epmd.py and OTP's epmd.

OTP ships a Common Test suite for its daemon, ``erts/epmd/test/epmd_SUITE.erl``
(read at erlang/otp commit 55ac76deff38d20c7cadf892f0b6bce320de80ab), with 33
cases.  Each one has a counterpart here or in another module of ours; none of
OTP's code or text is copied, only what each case checks.  Every counterpart
runs against both daemons (the ``impl`` fixture), like the other black-box
tests.  OTP's suite starts its daemon with ``-packet_timeout 1``; the
counterparts that depend on the time-out do too.  The two cases that need a
second host over ssh use a network namespace as that host (helpers.NetNS).

Case map (OTP case -> our test):

=========================================== =========================================================
OTP's case                                  our counterpart
=========================================== =========================================================
register_name                               test_wire: test_alive2_old_resp[5],
                                            test_alive2_reregister_bumps_creation
register_name_ipv6                          test_wire: test_ipv6_loopback
register_names_1                            test_register_two_close_either_order[first-first]
register_names_2                            test_register_two_close_either_order[last-first]
register_duplicate_name                     test_wire: test_alive2_duplicate
unicode_name                                test_unicode_name_looked_up[1-char]
long_unicode_name                           test_unicode_name_looked_up[201-chars]
get_port_nr                                 test_wire: test_port2_echoes_every_field
slow_get_port_nr                            test_slow_get_port_nr
unregister_others_name_1                    test_wire: test_stop_relaxed
unregister_others_name_2                    test_wire: test_stop_relaxed
register_overflow                           test_register_overflow_repeated
name_with_null_inside                       test_wire: test_alive2_malformed_closed_without_reply[nul-in-name]
name_null_terminated                        test_wire: test_alive2_malformed_closed_without_reply
                                            [nul-terminated]
stupid_names_req                            test_wire: test_thousand_registrations
no_data                                     test_wire: test_packet_timeout
one_byte                                    test_wire: test_packet_timeout
two_bytes                                   test_wire: test_packet_timeout
partial_packet                              test_wire: test_packet_timeout
zero_length                                 test_wire: test_bad_framing_closed_without_reply[L0]
too_large                                   test_wire: test_bad_framing_closed_without_reply[L3058,L65535]
alive_req_too_small_1                       test_wire: test_alive2_malformed_closed_without_reply[L11-no-elen]
alive_req_too_small_2                       test_wire: test_alive2_malformed_closed_without_reply[L9-no-nlen]
alive_req_too_large                         test_wire: test_alive2_refused_with_error[256-ascii]
returns_valid_empty_extra                   test_unicode_name_looked_up (the node has an empty extra)
returns_valid_populated_extra_with_nulls    test_wire: test_port2_echoes_every_field
names_stdout                                test_cli: test_names
buffer_overrun_1                            test_extra_length_beyond_packet
buffer_overrun_2                            test_extra_of_every_length
no_nonlocal_register                        test_hardening: test_remote_peer_answered_not_obeyed[ipv4,ipv6]
no_nonlocal_kill                            test_hardening: test_remote_peer_answered_not_obeyed[ipv4,ipv6]
no_live_killing                             test_wire: test_kill_refused_with_live_nodes,
                                            test_stop_not_relaxed
socket_reset_before_alive2_reply_is_written test_wire: test_failed_reply_write_unregisters_own_node
=========================================== =========================================================
"""

import resource
import socket
import struct
import time

import pytest
from helpers import U16, alive2, connect, frame, read_to_eof, register, registered, request, wait_until

pytestmark = pytest.mark.timeout(120)

OLD = {"highvsn": 5, "lowvsn": 5}   # OTP's suite registers as a version 5 node: ALIVE2_RESP


def port2_resp(port, nodetype, name, extra=b"", proto=0, highvsn=5, lowvsn=5):
    """The PORT2_RESP a node registered with these fields gets looked up with."""
    return (b"w\x00" + struct.pack(">HBBHHH", port, nodetype, proto, highvsn, lowvsn, len(name))
            + name + U16.pack(len(extra)) + extra)


def recv_exactly(sock, n, timeout=5.0):
    """Read *n* bytes, or fewer if the daemon closes (or resets) first."""
    sock.settimeout(timeout)
    got = b""
    while len(got) < n:
        try:
            data = sock.recv(n - len(got))
        except ConnectionResetError:
            break
        if not data:
            break
        got += data
    return got


# -- registering ------------------------------------------------------------

@pytest.mark.parametrize("first", [0, 1], ids=["first-first", "last-first"])
def test_register_two_close_either_order(epmd, first):
    """Two nodes register; closing their connections, in registration order
    or in the reverse order, unregisters each one and only that one."""
    a, ra = register(epmd.port, "foobar", port=1000, **OLD)
    b, rb = register(epmd.port, "foozap", port=1000, **OLD)
    assert ra[:2] == rb[:2] == b"y\x00"
    assert sorted(registered(epmd.port)) == [b"foobar", b"foozap"]
    socks = [(a, b"foobar"), (b, b"foozap")]
    gone, stays = socks[first], socks[1 - first]
    gone[0].close()
    assert wait_until(lambda: registered(epmd.port) == [stays[1]])
    stays[0].close()
    assert wait_until(lambda: registered(epmd.port) == [])


@pytest.mark.parametrize("chars", [1, 201], ids=["1-char", "201-chars"])
def test_unicode_name_looked_up(epmd, chars):
    """A name of 4-byte UTF-8 characters (one, or 201: 804 bytes) registers
    and is found by PORT_PLEASE2, every field echoed; the node's extra is
    empty, and the reply still carries its 2-byte length."""
    name = "".join(chr(0x1F600 + i) for i in range(chars)).encode()
    s, reply = register(epmd.port, name, port=4711, nodetype=72, **OLD)
    assert reply[:2] == b"y\x00"
    got = request(epmd.port, b"z" + name)
    assert got == port2_resp(4711, 72, name)
    assert got.endswith(b"\x00\x00")
    s.close()


@pytest.mark.timeout(60)
def test_register_overflow_repeated(start_epmd):
    """Registering many nodes, releasing them all and doing it again, ten
    times, alternately releasing the oldest or the newest first: every round
    registers as many as the first one, and each round ends with no name
    left.  1,000 per round, as OTP's case (OTP's own limit is about 1,019
    connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    d = start_epmd("-packet_timeout", "1")
    per_round = 1000

    def fill():
        socks = []
        for i in range(per_round):
            s, reply = register(d.port, "foo%d" % i, port=1000 + i, **OLD)
            if reply[:2] != b"y\x00":
                s.close()
                break
            socks.append(s)
        return socks

    first = fill()
    count = len(first)
    assert count == per_round
    for s in first:
        s.close()
    assert wait_until(lambda: registered(d.port) == [], 10)
    for rnd in range(10):
        socks = fill()
        assert len(socks) == count, rnd
        assert len(registered(d.port)) == count
        for s in (socks if rnd % 2 == 0 else socks[::-1]):
            s.close()
        assert wait_until(lambda: registered(d.port) == [], 10), rnd


# -- slow clients: D13 ------------------------------------------------------------

def test_slow_get_port_nr(start_epmd):
    """With -packet_timeout 1, a PORT_PLEASE2_REQ sent in four pieces one
    second apart (the header and the code, then one byte of the name per
    second) is answered: the time-out restarts on every read that brings
    bytes, in epmd.py (D13) as in OTP, and the whole request (about 3 s) is
    well within epmd.py's cap of REQUEST_TIME_CAP time-outs."""
    d = start_epmd("-packet_timeout", "1")
    node, reply = register(d.port, "foo", port=1042, **OLD)
    assert reply[:2] == b"y\x00"
    pieces = [U16.pack(4) + b"z", b"f", b"o", b"o"]
    with connect(d.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(1.0)
            s.sendall(piece)
        got = read_to_eof(s, 5)
        elapsed = time.monotonic() - t0
    assert got == port2_resp(1042, 77, b"foo")
    assert elapsed >= 3.0
    node.close()


# -- hostile lengths -------------------------------------------------------------

def hostile_alive2(elen, extra=b""):
    """An ALIVE2_REQ for "gurka" (version 5) with extra length *elen*."""
    return alive2("gurka", port=4747, elen=elen, extra=extra, **OLD)


def test_extra_length_beyond_packet(epmd):
    """An ALIVE2_REQ whose extra length (every value from 1 to 10,000) points
    beyond the end of the packet is closed without a reply; nothing is
    registered and the daemon serves on."""
    for elen in range(1, 10001):
        with connect(epmd.port) as s:
            s.sendall(frame(hostile_alive2(elen)))
            assert read_to_eof(s) == b"", elen
    assert registered(epmd.port) == []
    assert epmd.alive()


def test_extra_of_every_length(epmd):
    """An ALIVE2_REQ carrying an extra of N bytes of 0xFF, N from 1,020 to
    10,000: 1,020 bytes register (the limit, MAXSYMLEN); 1,021 up to what
    fits in a packet of 3,057 bytes get result 1; longer packets are closed
    without a reply.  Nothing is left registered."""
    fits = 3057 - len(hostile_alive2(0))       # longest extra in a packet: 3039
    seen = {}
    for n in range(1020, 10001):
        with connect(epmd.port) as s:
            try:
                s.sendall(frame(hostile_alive2(n, b"\xff" * n)))
            except (BrokenPipeError, ConnectionResetError):
                pass    # closed on the length alone, before the body was sent
            reply = recv_exactly(s, 4)
        if n == 1020:
            expected = "registered"
            assert reply[:2] == b"y\x00", n
        elif n <= fits:
            expected = "refused"
            assert reply == b"y\x01\x00\x63", n
        else:
            expected = "closed"
            assert reply == b"", n
        seen[expected] = seen.get(expected, 0) + 1
    assert seen == {"registered": 1, "refused": fits - 1020, "closed": 10000 - fits}
    assert wait_until(lambda: registered(epmd.port) == [])
    assert epmd.alive()

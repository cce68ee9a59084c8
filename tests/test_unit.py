"""Unit tests of the pure parts of epmd.py: framing, packets, UTF-8,
creation rules, the node table, address parsing, hexdumps, the command line."""

import io
import os
import socket

import pytest
from helpers import alive2
from hypothesis import given
from hypothesis import strategies as st

import epmd


def quiet_log(level=0):
    return epmd.DebugLog(level, out=io.BytesIO())


# -- framing ------------------------------------------------------------------

def conn():
    return epmd.Connection(None, 7, True, 0)


def test_take_whole_packet():
    c = conn()
    assert c.take(b"\x00\x01n") == epmd.COMPLETE
    assert c.buf[2:] == b"n"


def test_take_byte_at_a_time():
    c = conn()
    data = b"\x00\x03zab"
    for i, b in enumerate(data):
        want = epmd.COMPLETE if i == len(data) - 1 else epmd.INCOMPLETE
        assert c.take(bytes((b,))) == want
        if i >= 1:
            assert c.read_size() == len(data) - i - 1 or want == epmd.COMPLETE


def test_read_size_before_and_after_header():
    c = conn()
    assert c.read_size() == epmd.INBUF_SIZE - 1
    c.take(b"\x00")
    assert c.read_size() == epmd.INBUF_SIZE - 2
    c.take(b"\x05")
    assert c.read_size() == 5


@pytest.mark.parametrize("data,status", [
    (b"\x00\x00", epmd.BAD_SIZE),
    (b"\x0b\xf2", epmd.BAD_SIZE),          # 3058
    (b"\x0b\xf1", epmd.INCOMPLETE),        # 3057
    (b"\xff\xff", epmd.BAD_SIZE),
    (b"\x00\x01nn", epmd.TOO_MUCH),
    (b"\x00\x01n\x00\x01n", epmd.TOO_MUCH),
])
def test_take_limits(data, status):
    assert conn().take(data) == status


@given(st.binary(min_size=1, max_size=40), st.lists(st.integers(1, 5), min_size=1, max_size=50))
def test_take_any_split_equals_whole(payload, cuts):
    """However a packet is cut into reads, framing gives the same result."""
    data = epmd.U16.pack(len(payload)) + payload
    c = conn()
    pos, status, i = 0, epmd.INCOMPLETE, 0
    while pos < len(data):
        assert status == epmd.INCOMPLETE
        chunk = data[pos:pos + min(cuts[i % len(cuts)], c.read_size())]
        pos += len(chunk)
        i += 1
        status = c.take(chunk)
    assert status == epmd.COMPLETE
    assert c.buf[epmd.HEADER_LEN:] == payload


# -- UTF-8 --------------------------------------------------------------------

@pytest.mark.parametrize("raw,count", [
    (b"", 0), (b"abc", 3), ("é".encode(), 1), ("€".encode(), 1), ("\U0001F600".encode(), 1),
    (b"\xc0\x80", -1), (b"\xc1\xbf", -1),          # overlong 2-byte
    (b"\xe0\x80\x80", -1),                          # overlong 3-byte
    (b"\xf0\x80\x80\x80", -1),                      # overlong 4-byte
    (b"\xed\xa0\x80", -1), (b"\xed\xbf\xbf", -1),   # surrogates
    (b"\xf4\x90\x80\x80", -1), (b"\xf5\x80\x80\x80", -1),  # above U+10FFFF
    (b"\xff", -1), (b"\x80", -1), (b"\xe2\x82", -1),  # invalid, truncated
    (b"a\x00b", 3),
])
def test_verify_utf8(raw, count):
    assert epmd.verify_utf8(raw) == count


@given(st.text(max_size=50))
def test_verify_utf8_counts_code_points(s):
    assert epmd.verify_utf8(s.encode("utf-8", "surrogatepass")) == (
        len(s) if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in s) else -1)


# -- packets ------------------------------------------------------------------

def test_parse_alive2_fields():
    req = epmd.parse_alive2_req(alive2("node", port=4242, nodetype=72, proto=1, highvsn=6,
                                       lowvsn=5, extra=b"xy"))
    assert (req.port, req.nodetype, req.protocol, req.highvsn, req.lowvsn, req.name, req.extra) == (
        4242, 72, 1, 6, 5, b"node", b"xy")


@pytest.mark.parametrize("payload,message", [
    (alive2("")[:13], "packet to small"),
    (alive2("abc", nlen=9), "Node name size error"),
    (alive2("abc", elen=3), "Extra info size error"),
    (alive2(b"a\0b"), "ascii 0"),
])
def test_parse_alive2_errors(payload, message):
    with pytest.raises(epmd.PacketError, match=message):
        epmd.parse_alive2_req(payload)


def test_parse_alive2_every_field():
    req = epmd.parse_alive2_req(alive2(b"n", port=99, nodetype=72, proto=1, highvsn=6, lowvsn=5,
                                       extra=b"e"))
    assert req == epmd.Alive2Req(99, 72, 1, 6, 5, b"n", b"e")


def test_pack_alive2_resp():
    assert epmd.pack_alive2_resp(0, 0x12345678, 6) == b"v\x00\x12\x34\x56\x78"
    assert epmd.pack_alive2_resp(1, 99, 5) == b"y\x01\x00\x63"
    assert epmd.pack_alive2_resp(0, 2, 0) == b"y\x00\x00\x02"
    assert epmd.pack_alive2_resp(0, 7, 0xFFFF)[0:1] == b"v"


@pytest.mark.parametrize("payload,name", [
    (b"zabc", b"abc"), (b"zabc\0", b"abc"), (b"z" + b"a" * 255, b"a" * 255),
])
def test_parse_port2(payload, name):
    assert epmd.parse_port2_req(payload) == name


@pytest.mark.parametrize("payload", [b"z", b"z\0", b"za\0b", b"za\0\0", b"z\xff", b"z" + b"a" * 256])
def test_parse_port2_errors(payload):
    with pytest.raises(epmd.PacketError):
        epmd.parse_port2_req(payload)


def test_pack_port2_resp():
    node = epmd.Node(b"nm", 5)
    node.port, node.nodetype, node.protocol, node.highvsn, node.lowvsn = 0x1234, 77, 0, 6, 5
    node.extra = b"\x00x"
    assert epmd.pack_port2_resp(node) == (b"w\x00\x12\x34M\x00\x00\x06\x00\x05\x00\x02nm"
                                          b"\x00\x02\x00x")


@given(st.binary(max_size=200))
def test_parsers_raise_only_packet_error(junk):
    """Any bytes: the parsers either succeed or raise PacketError."""
    for parse in (epmd.parse_alive2_req, epmd.parse_port2_req):
        try:
            parse(b"x" + junk if parse is epmd.parse_alive2_req else b"z" + junk)
        except epmd.PacketError:
            pass


# -- creation and the node table ----------------------------------------------

def test_bump_creation():
    assert epmd.bump_creation(10) == 11
    assert epmd.bump_creation(0xFFFFFFFF) == 4   # wraps to 0, then never below 4
    assert epmd.bump_creation(1) == 4
    assert epmd.bump_creation(3) == 4
    assert epmd.bump_creation(4) == 5


def test_get_creation():
    assert epmd.get_creation(1795244928, 6) == 1795244928
    assert epmd.get_creation(1795244928, 5) == 1795244928 % 3 + 1
    assert epmd.get_creation(9, 0) == 1


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def req(name, highvsn=6, port=1000, extra=b""):
    return epmd.parse_alive2_req(alive2(name, port=port, highvsn=highvsn, extra=extra))


class FakeConn:
    """A stand-in connection object: the table only keeps a reference and fd."""

    def __init__(self, fd):
        self.fd = fd
        self.node = None


def reg(table, name, fd=5, **kw):
    c = FakeConn(fd)
    node = table.node_reg2(req(name, **kw), c)
    assert c.node is node and (node is None or node.conn is c)
    return c, node


def test_first_creation_is_time_plus_one():
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    _, n = reg(t, b"a")
    assert n.creation == 1001
    _, m = reg(t, b"b")
    assert m.creation == 1001          # same second, same creation


def test_reregistration_bumps():
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    c, n = reg(t, b"a")
    t.node_unreg_sock(c)
    _, n2 = reg(t, b"a")
    assert n2.creation == 1002
    assert b"a" not in t.unreg


def test_port2_replies_cached_per_packet_until_a_node_leaves():
    """NodeTable.asked keeps the PORT2_RESP of each answered PORT_PLEASE2_REQ
    of a registered node under its whole packet, length included (at most
    two per node: with and without the trailing NUL), never of an unknown
    name, and is emptied when any node leaves."""
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    ca, a = reg(t, b"a", port=4100)
    reg(t, b"b", port=4200)
    old = t.port2_resp(b"a", b"za")
    assert old == epmd.pack_port2_resp(a)
    assert t.port2_resp(b"a", b"za\0") is t.asked[b"\x00\x02za"]
    assert t.port2_resp(b"b", b"zb") is not None
    assert t.port2_resp(b"nobody", b"znobody") is None
    assert sorted(t.asked) == [b"\x00\x02za", b"\x00\x02zb", b"\x00\x03za\0"]
    t.node_unreg_sock(ca)
    assert t.asked == {}
    _, a2 = reg(t, b"a", fd=6, port=4300)
    assert t.port2_resp(b"a", b"za") == epmd.pack_port2_resp(a2) != old


def test_duplicate_and_refusals():
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    reg(t, b"a")
    assert reg(t, b"a")[1] is None
    assert reg(t, b"", extra=b"x")[1] is None           # D10
    assert reg(t, b"x" * 256)[1] is None
    assert reg(t, b"\xff")[1] is None
    assert reg(t, b"e", extra=b"z" * 1021)[1] is None
    assert reg(t, "\U0001F600".encode() * 255)[1] is not None
    assert list(t.reg) == [b"a", "\U0001F600".encode() * 255]


def test_steal_and_cap():
    """More than max_unreg old names: a new name takes the oldest entry with
    its counter unchanged; the list never exceeds max_unreg + 1 (D6)."""
    clock = Clock(1000)
    t = epmd.NodeTable(quiet_log(), max_unreg=5, clock=clock)
    for i in range(6):
        c, _ = reg(t, b"n%d" % i)
        clock.t += 10
        t.node_unreg_sock(c)
    assert len(t.unreg) == 6
    _, fresh = reg(t, b"fresh")
    assert fresh.cr_counter == 1001          # n0's creation, not bumped
    assert b"n0" not in t.unreg and len(t.unreg) == 5
    for i in range(20):
        c, _ = reg(t, b"m%d" % i)
        t.node_unreg_sock(c)
        assert len(t.unreg) <= 6


def test_unreg_only_own_node():
    """node_unreg_sock never removes a node another connection registered (D1)."""
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    owner, _ = reg(t, b"a", fd=5)
    other = FakeConn(6)
    assert t.node_unreg_sock(other) is None
    assert b"a" in t.reg
    assert t.node_unreg_sock(owner) is not None


def test_names_and_dump_lines():
    t = epmd.NodeTable(quiet_log(), clock=Clock(1000))
    c1, _ = reg(t, b"a", fd=5, port=1)
    reg(t, b"b", fd=6, port=2)
    t.node_unreg_sock(c1)
    assert t.names_lines() == [b"name b at port 2\n"]
    assert t.dump_lines() == [b"active name     <b> at port 2, fd = 6\n\0",
                              b"old/unused name <a>, port = 1, fd = 5 \n\0"]


def test_print_names_level3():
    out = io.BytesIO()
    t = epmd.NodeTable(epmd.DebugLog(3, out=out), clock=Clock(1000))
    reg(t, b"cap", fd=5, port=40000)
    text = out.getvalue().decode()
    assert '*****     active name     "cap#1001" at port 40000, fd = 5\r\n' in text
    assert "*****     reg calculated count  : 1\r\n" in text
    assert "*****     unreg calculated count: 0\r\n" in text


# -- addresses ----------------------------------------------------------------

IN, IN6 = socket.AF_INET, socket.AF_INET6


def test_parse_addresses_default():
    for spec in (None, "", " , ,"):
        assert epmd.parse_addresses(spec) == [(IN, "0.0.0.0", False), (IN6, "::", False)]


def test_parse_addresses_list():
    """Loopback first (listed, or implicit when neither the loopback nor the
    wildcard of its family is listed: OTP PR 11409), then the rest in order."""
    assert epmd.parse_addresses(" 127.0.0.3 , ,::1,127.0.0.1 10.1.2.3") == [
        (IN, "127.0.0.1", False), (IN6, "::1", False),
        (IN, "127.0.0.3", False), (IN, "10.1.2.3", False)]
    assert epmd.parse_addresses("fe80::1") == [
        (IN, "127.0.0.1", True), (IN6, "::1", True), (IN6, "fe80::1", False)]
    assert epmd.parse_addresses("0.0.0.0") == [(IN6, "::1", True), (IN, "0.0.0.0", False)]
    assert epmd.parse_addresses("::") == [(IN, "127.0.0.1", True), (IN6, "::", False)]
    assert epmd.parse_addresses("::,0.0.0.0") == [(IN6, "::", False), (IN, "0.0.0.0", False)]
    a = epmd.parse_addresses("::1")[0]
    assert (a.family, a.address, a.implicit) == (IN, "127.0.0.1", True)


def test_parse_addresses_errors():
    with pytest.raises(epmd.StartupError, match='cannot parse IP address "bogus"'):
        epmd.parse_addresses("127.0.0.2,bogus")
    epmd.parse_addresses(",".join("10.0.0.%d" % i for i in range(1, 14)) + ",127.0.0.1,::1")
    with pytest.raises(epmd.StartupError, match="more than 16"):
        epmd.parse_addresses(",".join("10.0.0.%d" % i for i in range(1, 15)))
    with pytest.raises(epmd.StartupError, match='"127.0.0.2" is listed twice'):
        epmd.parse_addresses("127.0.0.2 127.0.0.2")
    with pytest.raises(epmd.StartupError, match='"::2" is listed twice .as "0::2"'):
        epmd.parse_addresses("0::2,::2")
    with pytest.raises(epmd.StartupError, match='"0.0.0.0" overlaps "127.0.0.1"'):
        epmd.parse_addresses("127.0.0.1,0.0.0.0")


@pytest.mark.parametrize("value,secs", [("1", 1), ("1.5", 1), ("5s", 5), (" +7", 7), ("60", 60)])
def test_parse_seconds_like_atoi(value, secs):
    """As OTP's atoi(): the leading integer counts."""
    assert epmd.parse_seconds("-packet_timeout", value) == secs


@pytest.mark.parametrize("value,message", [
    ("0", "expected whole seconds >= 1"), ("abc", "expected whole seconds >= 1"),
    ("", "expected whole seconds >= 1"), ("-3", "OTP reads it as -3 seconds"),
    ("2147483648", "expected 1..2147483647"),
])
def test_parse_seconds_refused(value, message):
    """0 or no number: usage, as OTP; D21: negative or beyond a C int too."""
    with pytest.raises(epmd.UsageError, match=message):
        epmd.parse_seconds("-delay_write", value)


@pytest.mark.parametrize("peer,local", [
    ("::ffff:127.0.0.1", True), ("::ffff:127.1.2.3", True), ("::1", True),
    ("::ffff:198.18.1.2", False), ("::ffff:128.0.0.1", False), ("2001:db8::2", False),
])
def test_mapped_loopback_is_local(peer, local):
    """D19: an IPv4-mapped 127.0.0.0/8 peer on a dual-stack socket is local."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        assert epmd.conn_local_peer_check(s, (peer, 1, 0, 0), socket.AF_INET6) is local


# -- hexdump ------------------------------------------------------------------

def test_print_buf_hex():
    assert epmd.print_buf_hex(b"\x00\x01n") == (
        "***** 00000000  00 01 6e                                          |..n|\r\n")
    data = bytes.fromhex("0010789c404d0000060005000363617000 00".replace(" ", ""))
    assert epmd.print_buf_hex(data) == (
        "***** 00000000  00 10 78 9c 40 4d 00 00  06 00 05 00 03 63 61 70  |..x.@M.......cap|\r\n"
        "***** 00000010  00 00                                             |..|\r\n")


def test_dbg_print_buf_truncates():
    out = io.BytesIO()
    epmd.DebugLog(2, out=out).dbg_print_buf(b"a" * 1100)
    text = out.getvalue().decode()
    assert "got 1100 bytes\r\n" in text
    assert text.count("***** 0000") == 64
    assert text.endswith("***** ......and more\r\n")


# -- command line -------------------------------------------------------------

def test_parse_args_defaults():
    o = epmd.parse_args([], {})
    assert (o["port"], o["debug"], o["action"], o["relaxed"], o["packet_timeout"]) == (
        4369, 0, None, False, 60)


def test_parse_args_env_and_flags():
    env = {"ERL_EPMD_PORT": "5000", "ERL_EPMD_ADDRESS": "127.0.0.2",
           "ERL_EPMD_RELAXED_COMMAND_CHECK": ""}
    o = epmd.parse_args(["-d", "-debug", "-packet_timeout", "3"], env)
    assert (o["port"], o["address"], o["relaxed"], o["debug"], o["packet_timeout"]) == (
        5000, "127.0.0.2", True, 2, 3)
    assert epmd.parse_args(["-port", "6000"], env)["port"] == 6000
    assert epmd.parse_args(["-address", "::1"], env)["address"] == "::1"


def test_parse_args_actions_anywhere():
    """D11: -names -port N works like -port N -names."""
    o = epmd.parse_args(["-names", "-port", "4370"], {})
    assert (o["action"], o["port"]) == ("names", 4370)
    o = epmd.parse_args(["-stop", "foo", "-port", "4370"], {})
    assert (o["action"], o["stop_name"]) == ("stop", b"foo")


@pytest.mark.parametrize("argv", [
    ["-port"], ["-port", "0"], ["-port", "abc"], ["-port", "70000"], ["-packet_timeout", "0"],
    ["-delay_write", "x"], ["-bogus"], ["-stop"], ["-names", "-kill"],
])
def test_parse_args_usage_errors(argv):
    with pytest.raises(epmd.UsageError):
        epmd.parse_args(argv, {})


@pytest.mark.parametrize("value", ["abc", "0", "70000", ""])
def test_parse_args_bad_env_port(value):
    """D7: a bad ERL_EPMD_PORT is an error (OTP binds random ports)."""
    with pytest.raises(epmd.UsageError, match="ERL_EPMD_PORT"):
        epmd.parse_args([], {"ERL_EPMD_PORT": value})


@pytest.mark.parametrize("env,message", [
    ({}, "systemd provides no sockets"),
    ({"LISTEN_FDS": "0"}, "systemd provides no sockets"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "1"}, "systemd provides no sockets"),
    ({"LISTEN_FDS": "17"}, "systemd provides no sockets"),
    ({"LISTEN_FDS": "17", "LISTEN_PID": "self"}, "more than 16"),
    ({"LISTEN_FDS": "x", "LISTEN_PID": "self"}, "cannot obtain sockets from systemd: LISTEN_FDS='x'"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "x1"}, "cannot obtain sockets from systemd: LISTEN_PID='x1'"),
])
def test_systemd_listen_sockets_errors(env, message):
    """As sd_listen_fds(): LISTEN_PID must be set and be ours."""
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    with pytest.raises(epmd.StartupError, match=message):
        epmd.systemd_listen_sockets(env)


class FakeSyslog:
    """Stands in for the syslog module: records (priority, message)."""

    LOG_ERR = 3

    def __init__(self):
        self.lines = []

    def openlog(self, *args, **kwargs):
        pass

    def syslog(self, priority, message):
        assert isinstance(message, str)
        self.lines.append((priority, message))


def test_daemon_log_takes_any_bytes():
    """In daemon mode, names that are not UTF-8 reach syslog as text (each
    bad byte as U+FFFD), and nothing goes to stderr."""
    out = io.BytesIO()
    log = epmd.DebugLog(0, is_daemon=True, out=out)
    log.syslog = fake = FakeSyslog()
    log.dbg_printf(0, "node name already occupied %s", b"bad\xff\xfe")
    log.dbg_perror(OSError(5, "I/O error"), "error in read %s", b"\xc0")
    log.dbg_printf(1, "not at level 0")
    log.dbg_tty_printf(0, "tty only")
    assert [m for _, m in fake.lines] == ["epmd: node name already occupied bad\ufffd\ufffd",
                                          "epmd: error in read \ufffd: I/O error"]
    assert {p for p, _ in fake.lines} == {FakeSyslog.LOG_ERR}
    assert out.getvalue() == b""


def test_foreground_log_keeps_raw_bytes():
    out = io.BytesIO()
    epmd.DebugLog(0, out=out).dbg_printf(0, "node name already occupied %s", b"bad\xff")
    assert out.getvalue().endswith(b": node name already occupied bad\xff\r\n")

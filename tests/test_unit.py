"""Unit tests of the pure parts of epmd.py: framing, packets, UTF-8,
creation rules, the node table, address parsing, hexdumps, the command line."""

import io
import socket
import threading

import pytest
from helpers import alive2, connect, free_port, read_to_eof, register, registered, request, wait_until
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

def test_parse_addresses_default():
    for spec in (None, "", " , ,"):
        assert epmd.parse_addresses(spec) == [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]


def test_parse_addresses_list():
    assert epmd.parse_addresses(" 127.0.0.3 , ,::1,127.0.0.1 10.1.2.3") == [
        (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
        (socket.AF_INET, "127.0.0.3"), (socket.AF_INET, "10.1.2.3")]
    assert epmd.parse_addresses("fe80::1")[-1] == (socket.AF_INET6, "fe80::1")


def test_parse_addresses_errors():
    with pytest.raises(epmd.StartupError, match='cannot parse IP address "bogus"'):
        epmd.parse_addresses("127.0.0.2,bogus")
    epmd.parse_addresses(",".join("10.0.0.%d" % i for i in range(1, 14)))
    with pytest.raises(epmd.StartupError, match="more than 16"):
        epmd.parse_addresses(",".join("10.0.0.%d" % i for i in range(1, 15)))


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
    ["-delay_write", "x"], ["-bogus"], ["-stop"], ["-names", "-kill"], ["-help"],
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
    ({"LISTEN_FDS": "17"}, "more than 16"),
])
def test_systemd_listen_sockets_errors(env, message):
    with pytest.raises(epmd.StartupError, match=message):
        epmd.systemd_listen_sockets(dict(env))


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


# -- the poller -----------------------------------------------------------------------

@pytest.mark.parametrize("make", [epmd.make_poller, epmd.SelectorPoller])
def test_poller_reports_readable_and_writable(make):
    """The loop's poller (epoll here) and the selectors-based one used where
    there is no epoll report the same events for the same sockets."""
    p = make()
    a, b = socket.socketpair()
    try:
        fd = a.fileno()
        p.register(fd, epmd.READABLE)
        assert p.poll(0) == []
        b.send(b"x")
        assert p.poll(1) == [(fd, epmd.READABLE)]
        p.modify(fd, epmd.WRITABLE)
        assert p.poll(1) == [(fd, epmd.WRITABLE)]
        with pytest.raises(FileExistsError):
            p.register(fd, epmd.READABLE)
        p.unregister(fd)
        assert p.poll(0) == []
        with pytest.raises(FileNotFoundError):
            p.unregister(fd)
        p.register(fd, epmd.READABLE)
        a.recv(1)
        b.close()
        [(got_fd, events)] = p.poll(1)
        assert got_fd == fd and events & (epmd.READABLE | epmd.FAILED)
    finally:
        p.close()
        a.close()
        b.close()


def test_loop_on_selector_poller(monkeypatch):
    """The whole loop runs on SelectorPoller too: a registration held open,
    a lookup answered at once, a request in two writes (watched until its
    rest arrives), the node released when its connection closes, KILL."""
    monkeypatch.setattr(epmd, "make_poller", epmd.SelectorPoller)
    port = free_port()
    e = epmd.Epmd(port=port, addresses="127.0.0.1", log=quiet_log())
    e.bind()
    codes = []
    t = threading.Thread(target=lambda: codes.append(e.run()))
    t.start()
    try:
        node, reply = register(port, "sp", port=4242)
        assert reply[:2] == b"v\x00"
        expected = epmd.pack_port2_resp(e.nodes.reg[b"sp"])
        assert request(port, b"zsp") == expected
        with connect(port) as s:
            s.sendall(b"\x00")
            assert wait_until(lambda: any(c.events for c in list(e.conns.values()) if not c.node))
            s.sendall(b"\x03zsp")
            assert read_to_eof(s) == expected
        node.close()
        assert wait_until(lambda: registered(port) == [])
        assert request(port, b"k") == b"OK"
        t.join(5)
        assert codes == [0]
    finally:
        if t.is_alive():
            request(port, b"k")
            t.join(5)

#!/usr/bin/env python3
"""epmd.py - the Erlang Port Mapper Daemon, in one file of standard-library Python.

epmd is the name server of distributed Erlang.  Every node on a host
registers its node name and the TCP port its distribution listens on with the
epmd of that host (ALIVE2_REQ), and keeps that connection open for as long as
it lives: when the connection closes, the name is released.  Other nodes ask
epmd where a name listens (PORT_PLEASE2_REQ) or which names exist (NAMES_REQ).
This module is a drop-in replacement for OTP's C daemon: same flags, same
environment variables, same bytes on the wire, same client output and exit
codes.  It is meant to be read side by side with OTP's ``erts/epmd/src``
(``epmd_srv.c``, ``epmd.c``, ``epmd_cli.c``); functions with a C counterpart
carry its name.

Packet format (all integers big-endian)::

    request:  +--------+---------------------------+
              | u16 L  | L bytes: code, fields ... |     1 <= L <= 3057
              +--------+---------------------------+
    reply:    raw bytes, no length prefix; then epmd closes the connection,
              except after ALIVE2_X_RESP/ALIVE2_RESP with result 0, where the
              connection stays open for the life of the node.

Requests and replies:

    ALIVE2_REQ       'x' u16 port, u8 node type, u8 protocol,
                     u16 highest version, u16 lowest version,
                     u16 nlen, name, u16 elen, extra        (local peers only)
      ALIVE2_X_RESP  'v' u8 result, u32 creation   (highest version >= 6)
      ALIVE2_RESP    'y' u8 result, u16 creation   (older nodes)
    PORT_PLEASE2_REQ 'z' name
      PORT2_RESP     'w' 0, u16 port, u8 node type, u8 protocol, u16 highest
                     version, u16 lowest version, u16 nlen, name, u16 elen,
                     extra;  or 'w' 1 when the name is unknown
    NAMES_REQ        'n'  -> u32 port, then "name N at port P\\n" per node
    DUMP_REQ         'd'  -> u32 port, then one NUL-terminated line per node
    KILL_REQ         'k'  -> "OK" (and epmd exits 0) or "NO"
    STOP_REQ         's' name -> "STOPPED" or "NOEXISTSTOPPED"

Sections.  They go bottom up, each using only what the sections above it
define, so the file reads from the wire format to the loop; epmd_srv.c goes
top down, from run() to the helpers.  Functions with a counterpart in OTP's
C sources carry its name (epmd_srv.c unless said):

    constants and wire codes   ports, limits, request codes, struct formats
    debug output               DebugLog (dbg_printf, dbg_tty_printf,
                               dbg_perror of epmd.c; dbg_print_buf),
                               print_buf_hex
    packets                    verify_utf8, parse_alive2_req (the ALIVE2
                               checks of do_request), parse_port2_req,
                               pack_alive2_resp, pack_port2_resp
    node table                 Node, NodeTable (node_reg2, node_unreg,
                               node_unreg_sock, print_names, current_time),
                               bump_creation, get_creation
    connections                the states READING/REPLYING/KEPT/CLOSED,
                               Connection (the want/got framing of do_read),
                               conn_local_peer_check
    listening sockets          parse_addresses, open_listen_sockets (the
                               part of run before the loop),
                               systemd_listen_sockets, sd_notify
    readiness                  READABLE/WRITABLE/FAILED, make_poller (epoll),
                               SelectorPoller (the fd_sets of run)
    server                     Epmd: run, handle, check_timeouts, do_accept,
                               conn_open, set_state, epmd_conn_close, do_read,
                               do_request and one do_*_req method per
                               request, reply, do_write, epmd_cleanup_exit
                               (epmd.c); its class docstring indexes them
    client commands            conn_to_epmd, read_fill, epmd_call (-names,
                               -dump, -started), kill_epmd (-kill), stop_cli
                               (-stop), all of epmd_cli.c
    command line               usage, parse_args, run_daemon (epmd.c), main

Our own names, without a C counterpart: Connection.take and set_state (the
state machine that C spreads over its connection fields), handle (the body
of run's loop for one connection), drop (node_unreg_sock followed by
epmd_conn_close), clock (the monotonic clock for time-outs; C's
current_time reads the wall clock), and the D2 helpers shed_connection,
pause_accept, resume_accept and open_spare.

Debug levels (-d given N times), as OTP's epmd:

    0  always printed: malformed packets, refused requests, errors
    1  requests received and replies sent, registrations, time-outs
    2  connections opened and closed, and a hexdump of every packet read and
       written
    3  the clock on every read of it, and the node table after every change

In the foreground every line goes to stderr as ``epmd: <ctime>: <msg>\\r\\n``;
with -daemon, level-gated messages go to syslog and the hexdumps are dropped.

Performance notes.  Most of a request's cost is its system calls, so the
request path makes as few as it can:

  - a connection is read and answered straight after accept(), since its
    request has usually arrived with it; only a connection that must wait
    (for the rest of its request, to write its reply, or as a registered
    node) is registered with the selector;
  - accepted sockets stay blocking and every recv/send passes MSG_DONTWAIT,
    which spares the fcntl() of non-blocking mode; do_accept makes the
    plain C socket type, whose methods need no Python frames;
  - the last reply on a connection is sent with MSG_MORE, so the FIN of the
    close that follows rides in the same segment;
  - the NAMES body is joined once per change of the node table, and each
    node's PORT2_RESP is packed on its first lookup (NodeTable);
  - log arguments are formatted only when the level prints them, and the
    hexdump paths are guarded by the level.

The rest is the interpreter's work, measured in instructions per
PORT_PLEASE2_REQ (tests/profile_request.py --callgrind); what saved a
noticeable part of it is commented where it is done: epoll polled directly
(make_poller), a connection answered at once kept out of the connection
table (see the states), the clock read only while something is timed
(run), the peer check done when it matters (Connection.local_peer), plain
ints for socket flags.

Where this file deliberately differs from OTP's daemon (the D numbers of
README.md's and epmd(1)'s table of differences), the code says so with a
"D<n>" comment.
"""

import collections
import errno
import os
import traceback
import select
import selectors
import signal
import socket
import struct
import sys
import time

__all__ = ["main", "Epmd", "NodeTable", "Node", "Connection", "DebugLog"]
__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# Constants and wire codes (OTP epmd.h, epmd_int.h)
# ---------------------------------------------------------------------------

EPMD_PORT_NO = 4369                 # the well-known port

# Request and reply codes: the first payload byte.
ALIVE2_REQ = 120                    # 'x'
ALIVE2_X_RESP = 118                 # 'v', 32-bit creation
ALIVE2_RESP = 121                   # 'y', 16-bit creation
PORT_PLEASE2_REQ = 122              # 'z'
PORT2_RESP = 119                    # 'w'
NAMES_REQ = 110                     # 'n'
DUMP_REQ = 100                      # 'd'
KILL_REQ = 107                      # 'k'
STOP_REQ = 115                      # 's'

RESULT_OK = 0
RESULT_ERROR = 1
ALIVE2_ERROR_CREATION = 99          # creation sent with result 1
ALIVE2_X_MIN_VERSION = 6            # highest version >= this gets ALIVE2_X_RESP

KILL_OK = b"OK"
KILL_NO = b"NO"
STOP_OK = b"STOPPED"
STOP_NOEXIST = b"NOEXIST"           # always followed by STOP_OK

# Limits.
MAXSYMLEN = 255 * 4                 # bytes of a node name or of its extra
MAX_NAME_CHARS = 255                # code points of a node name
INBUF_SIZE = 3 * MAXSYMLEN          # 3060: the input buffer of a connection
HEADER_LEN = 2                      # bytes of the u16 length L before a request
MAX_PACKET_LEN = INBUF_SIZE - HEADER_LEN - 1  # 3057: largest L (L + 2 < INBUF_SIZE)
FIRST_READ_SIZE = INBUF_SIZE - 1    # bytes asked for while L is unknown
MAX_LISTEN_SOCKETS = 16
CLOSE_TIMEOUT = 60                  # seconds: default -packet_timeout
IDLE_TIMEOUT = 5                    # seconds between idle wake-ups
SHORT_IDLE_TIMEOUT = 1              # ... when packet_timeout < IDLE_TIMEOUT
MAX_UNREG_COUNT = 1000              # old names remembered for their creation
DEBUG_MAX_UNREG_COUNT = 5           # ... with -d
CREATION_MIN = 4                    # 32-bit creations 0..3 are never handed out
CREATION_MASK = 0xFFFFFFFF          # the creation counter is an unsigned 32-bit
OLD_CREATIONS = 3                   # 16-bit creations cycle through 1..3
NAMES_HEADER_LEN = 4                # u32 port before NAMES/DUMP lines
HEXDUMP_MAX = 1024                  # bytes shown of one packet at -d -d
HEXDUMP_ROW = 16                    # bytes per hexdump row
CLIENT_MAX_STOP_NAME = 1000         # bytes: longest name `epmd -stop` sends
CLIENT_READ_SIZE = INBUF_SIZE       # bytes per read in the client
SYSTEMD_FIRST_FD = 3                # SD_LISTEN_FDS_START
MAX_INHERITED_FD = 65536            # -daemon closes inherited fds below this
FD_RESERVE = 16                     # descriptors kept back from connections
LOCAL_RESERVE = 64                  # D4: connection slots only local peers get
                                    # (at most half of the table)
ACCEPT_PAUSE = 0.1                  # seconds listeners rest after EMFILE (D2)
# Accepted sockets stay in blocking mode; every recv and send on them says
# MSG_DONTWAIT instead, which spares a system call per connection.  Plain
# ints: the socket module's flags are IntFlag members, whose | runs Python
# code of the enum module on every reply.
DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
MORE = int(getattr(socket, "MSG_MORE", 0))
DONTWAIT_MORE = DONTWAIT | MORE
SOCK_STREAM = int(socket.SOCK_STREAM)

# struct formats of the fixed parts of packets.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
ALIVE2_FIXED = struct.Struct(">BHBBHHH")    # code port type proto hi lo nlen
ALIVE2_FIXED_LEN = ALIVE2_FIXED.size        # 11
ALIVE2_MIN_LEN = ALIVE2_FIXED_LEN + 2       # 13: OTP wants L > 13
ALIVE2_X_RESP_FMT = struct.Struct(">BBI")   # 'v' result creation
ALIVE2_RESP_FMT = struct.Struct(">BBH")     # 'y' result creation
PORT2_RESP_FIXED = struct.Struct(">BBHBBHHH")  # 'w' 0 port type proto hi lo nlen
PORT2_RESP_ERROR = bytes((PORT2_RESP, RESULT_ERROR))

NAMES_LINE = b"name %s at port %d\n"
DUMP_ACTIVE_LINE = b"active name     <%s> at port %d, fd = %d\n\0"
DUMP_OLD_LINE = b"old/unused name <%s>, port = %d, fd = %d \n\0"

SD_READY = "READY=1\nSTATUS=Processing port mapping requests...\nMAINPID=%d"
SD_EXITED = "STATUS=Exited.\nERRNO=%d"

# ---------------------------------------------------------------------------
# Debug output (OTP epmd.c: dbg_printf, dbg_tty_printf, dbg_perror;
# epmd_srv.c: dbg_print_buf, print_buf_hex)
# ---------------------------------------------------------------------------


def text(raw):
    """Return bytes from the wire as str for log messages.

    Invalid UTF-8 is kept as surrogate escapes, so that DebugLog writes the
    peer's exact bytes back out, as OTP's printf of a C string does.
    """
    return raw.decode("utf-8", "surrogateescape")


def print_buf_hex(buf, prefix="***** "):
    """Return the hexdump rows of *buf* as OTP's print_buf_hex prints them.

    Each row covers 16 bytes: *prefix*, the 8-digit hex offset, the bytes as
    `` xx`` with one extra space before the 1st and 9th, padding, then
    ``  |ascii|`` (bytes 32..126 as themselves, others as '.') and CRLF.
    Source: OTP epmd_srv.c, print_buf_hex.
    """
    rows = []
    for start in range(0, len(buf), HEXDUMP_ROW):
        row = buf[start:start + HEXDUMP_ROW]
        cells = []
        for i in range(HEXDUMP_ROW):
            if i % (HEXDUMP_ROW // 2) == 0:
                cells.append(" ")
            cells.append(" %02x" % row[i] if i < len(row) else "   ")
        ascii_ = "".join(chr(c) if 32 <= c <= 126 else "." for c in row)
        rows.append("%s%08x%s  |%s|\r\n" % (prefix, start, "".join(cells), ascii_))
    return "".join(rows)


class DebugLog:
    """epmd's log: level-gated lines on stderr, or syslog when a daemon.

    Lines are ``epmd: <ctime without newline>: <message>\\r\\n``.  Messages
    are %-format strings formatted only when they will be printed, so a
    daemon at level 0 does no formatting work.  Output errors are ignored:
    a closed stderr never takes the daemon down.
    Source: OTP epmd.c, dbg_gen_printf and friends.
    """

    __slots__ = ("level", "is_daemon", "out", "syslog")

    def __init__(self, level=0, is_daemon=False, out=None):
        self.level = level
        self.is_daemon = is_daemon
        self.out = out
        self.syslog = None

    def _emit(self, msg, to_syslog):
        if self.is_daemon:
            if to_syslog:
                if self.syslog is None:
                    import syslog
                    self.syslog = syslog
                # syslog takes text: bytes that are not UTF-8 become U+FFFD
                line = ("epmd: %s" % msg).encode("utf-8", "surrogateescape")
                self.syslog.syslog(self.syslog.LOG_ERR, line.decode("utf-8", "replace"))
            return
        self.write("epmd: %s: %s\r\n" % (time.ctime(), msg))

    def write(self, s):
        """Write *s* to stderr as raw bytes (surrogate escapes restored)."""
        if self.is_daemon:
            return
        out = self.out
        if out is None:
            out = getattr(sys.stderr, "buffer", None)
            if out is None:
                return
        try:
            out.write(s.encode("utf-8", "surrogateescape"))
            out.flush()
        except (OSError, ValueError):
            pass

    @staticmethod
    def format(fmt, args):
        """``fmt % args``, with bytes arguments (names from the wire) shown
        as the raw bytes they are (see text())."""
        if not args:
            return fmt
        return fmt % tuple(text(a) if isinstance(a, bytes) else a for a in args)

    def dbg_printf(self, level, fmt, *args):
        """Log at *level*: stderr in the foreground, syslog as a daemon."""
        if self.level >= level:
            self._emit(self.format(fmt, args), True)

    def dbg_tty_printf(self, level, fmt, *args):
        """Log at *level* on stderr only (dropped in daemon mode)."""
        if self.level >= level:
            self._emit(self.format(fmt, args), False)

    def dbg_perror(self, err, fmt, *args):
        """Log always, with ``: <strerror>`` of OSError *err* appended."""
        msg = self.format(fmt, args)
        reason = err.strerror or str(err) if isinstance(err, OSError) else str(err)
        self._emit("%s: %s" % (msg, reason), True)

    def dbg_print_buf(self, buf):
        """At level 2 and in the foreground, log ``got N bytes`` and a hexdump.

        The dump stops after HEXDUMP_MAX bytes with ``***** ......and more``.
        The wording is "got" for written data too, as in OTP.
        Source: OTP epmd_srv.c, dbg_print_buf.
        """
        if self.is_daemon or self.level < 2:
            return
        self.dbg_tty_printf(1, "got %d bytes", len(buf))
        shown = bytes(buf[:HEXDUMP_MAX])
        tail = "***** ......and more\r\n" if len(buf) > HEXDUMP_MAX else ""
        self.write(print_buf_hex(shown) + tail)


# ---------------------------------------------------------------------------
# Packets: parsing and packing, pure functions
# ---------------------------------------------------------------------------


def verify_utf8(data):
    """Return the number of code points in *data*, or -1 if it is not UTF-8.

    Strict UTF-8 as OTP checks it: no overlong forms, no surrogates
    (U+D800..U+DFFF), nothing above U+10FFFF, no truncated sequence.  A NUL
    byte counts as a character.
    Source: OTP epmd_srv.c, verify_utf8.
    """
    try:
        return len(data.decode())      # UTF-8, strict: the defaults, which skip parsing arguments
    except UnicodeDecodeError:
        return -1


Alive2Req = collections.namedtuple(
    "Alive2Req", "port nodetype protocol highvsn lowvsn name extra")
Alive2Req.__doc__ = """A parsed ALIVE2_REQ (the payload after the length prefix).

Layout: u8 'x', u16 port, u8 node type, u8 protocol, u16 highest version,
u16 lowest version, u16 nlen, nlen bytes name, u16 elen, elen bytes
extra; trailing bytes are ignored.  Built by parse_alive2_req; name and
extra are bytes.
"""


class PacketError(ValueError):
    """A request that OTP's epmd answers by closing the connection.

    The message is the level-0 log line OTP prints for it.
    """


def parse_alive2_req(payload):
    """Parse an ALIVE2_REQ payload; return an Alive2Req.

    Checks in OTP's order (epmd_srv.c, do_request): L <= 13, nlen beyond the
    packet, elen beyond the packet, a NUL in the name.  Each raises
    PacketError, on which the connection is closed without a reply.  The
    name's length and encoding are checked later, by NodeTable.node_reg2,
    which answers with an error instead.
    """
    size = len(payload)
    if size <= ALIVE2_MIN_LEN:
        raise PacketError("packet to small for request ALIVE2_REQ (%d)" % size)
    _, port, nodetype, protocol, highvsn, lowvsn, nlen = ALIVE2_FIXED.unpack_from(payload)
    if nlen + ALIVE2_MIN_LEN > size:
        raise PacketError("Node name size error in ALIVE2_REQ")
    name_end = ALIVE2_FIXED_LEN + nlen
    (elen,) = U16.unpack_from(payload, name_end)
    if elen + nlen + ALIVE2_MIN_LEN > size:
        raise PacketError("Extra info size error in ALIVE2_REQ")
    name = bytes(payload[ALIVE2_FIXED_LEN:name_end])
    if b"\0" in name:
        raise PacketError("node name contains ascii 0 in ALIVE2_REQ")
    extra = bytes(payload[name_end + 2:name_end + 2 + elen])
    return Alive2Req(port, nodetype, protocol, highvsn, lowvsn, name, extra)


def pack_alive2_resp(result, creation, highvsn):
    """Return ALIVE2_X_RESP ('v', u8 result, u32 creation) if *highvsn* >= 6,
    else ALIVE2_RESP ('y', u8 result, u16 creation).  Source: OTP do_request.
    """
    if highvsn >= ALIVE2_X_MIN_VERSION:
        return ALIVE2_X_RESP_FMT.pack(ALIVE2_X_RESP, result, creation)
    return ALIVE2_RESP_FMT.pack(ALIVE2_RESP, result, creation)


def parse_port2_req(payload, max_chars=MAX_NAME_CHARS):
    """Return the node name asked for by a PORT_PLEASE2_REQ payload (bytes).

    One trailing NUL is dropped.  An empty name, an interior NUL, invalid
    UTF-8 or more than *max_chars* code points raise PacketError (the
    connection is closed without a reply).  OTP counts the terminating NUL
    as a character, so it refuses 255-character names; D8: we accept them.
    """
    # [-1:] == b"\0", not endswith(): a method call that parses its
    # arguments costs more than the rest of this test (1% of a request)
    name = payload[1:-1] if payload[-1:] == b"\0" else payload[1:]
    if not name:
        raise PacketError("packet too small for request PORT2_REQ (%d)" % (len(name) + 1))
    # 0 in name, not b"\0" in name: bytes' "in" tries its operand as an
    # integer first, and a bytes operand costs it a TypeError built and
    # thrown away (2,000 instructions, 4% of a PORT_PLEASE2_REQ).
    if 0 in name:
        raise PacketError("node name contains ascii 0 in PORT2_REQ")
    nchars = verify_utf8(name)
    if nchars < 1 or nchars > max_chars:
        raise PacketError("invalid node name in PORT2_REQ")
    return name


def pack_port2_resp(node):
    """Return the PORT2_RESP for a registered *node*: 'w', result 0, u16 port,
    u8 node type, u8 protocol, u16 highest and u16 lowest version, u16 nlen,
    name, u16 elen, extra.  Source: OTP epmd_srv.c, do_request.
    """
    return b"".join((
        PORT2_RESP_FIXED.pack(PORT2_RESP, RESULT_OK, node.port, node.nodetype, node.protocol,
                              node.highvsn, node.lowvsn, len(node.name)),
        node.name, U16.pack(len(node.extra)), node.extra))


# ---------------------------------------------------------------------------
# Node table (OTP epmd_srv.c: node_reg2, node_unreg, node_unreg_sock)
# ---------------------------------------------------------------------------


def bump_creation(counter):
    """Return the next creation counter: +1 modulo 2**32, and never below 4.

    Source: OTP epmd_srv.c, bump_creation.
    """
    counter = (counter + 1) & CREATION_MASK
    return CREATION_MIN if counter < CREATION_MIN else counter


def get_creation(counter, highvsn):
    """Return the creation sent to a node: the 32-bit counter itself when its
    highest version is >= 6, else ``counter % 3 + 1`` (1..3) for ALIVE2_RESP.
    Source: OTP epmd_srv.c, get_creation.
    """
    if highvsn >= ALIVE2_X_MIN_VERSION:
        return counter
    return counter % OLD_CREATIONS + 1


class Node:
    """One node name, registered or remembered as unregistered.

    Fields as OTP's Node: fd of the registering connection (for DUMP; kept
    when unregistered), port, node type, protocol, highest and lowest
    version, name and extra (bytes, <= MAXSYMLEN each), cr_counter (u32).
    ``conn`` is the Connection holding the registration, or None.
    """

    __slots__ = ("name", "fd", "port", "nodetype", "protocol", "highvsn", "lowvsn",
                 "extra", "cr_counter", "conn", "resp")

    def __init__(self, name, cr_counter):
        self.name = name
        self.cr_counter = cr_counter
        self.fd = -1
        self.port = 0
        self.nodetype = 0
        self.protocol = 0
        self.highvsn = 0
        self.lowvsn = 0
        self.extra = b""
        self.conn = None
        self.resp = None            # its PORT2_RESP, made on the first lookup

    @property
    def creation(self):
        """The creation this node was (or would be) given."""
        return get_creation(self.cr_counter, self.highvsn)


class NodeTable:
    """The registered nodes and the FIFO of unregistered ones.

    ``reg`` maps name -> Node in registration order (NAMES lists it newest
    first); ``unreg`` maps name -> Node, oldest first.  The table owns the
    node side of every link (Node.conn and Connection.node are set and
    cleared here only) and the caches derived from it: the NAMES body
    (``names``) and each node's PORT2_RESP (``Node.resp``).  A name seen before
    gets its old creation counter + 1 when it registers again.  D6: the
    unreg list never holds more than ``max_unreg + 1`` entries, the size at
    which OTP starts recycling its oldest entry for new names; OTP lets it
    grow without bound.  *clock* returns Unix time in seconds.
    """

    __slots__ = ("reg", "unreg", "max_unreg", "log", "clock", "names")

    def __init__(self, log, max_unreg=MAX_UNREG_COUNT, clock=time.time):
        self.names = None           # the NAMES_RESP lines, joined, until the next change
        self.reg = {}
        self.unreg = {}
        self.max_unreg = max_unreg
        self.log = log
        self.clock = clock

    def node_reg2(self, req, conn):
        """Register *req* (an Alive2Req) for connection *conn*; return the
        Node, or None when refused (the error was logged at level 0).  The
        link goes both ways: ``node.conn is conn`` and ``conn.node is node``.

        Refused: name over MAXSYMLEN bytes or 255 code points, name not
        UTF-8, extra over MAXSYMLEN bytes, name already registered, and (D10)
        an empty name.  Creation: a name on the unreg list reuses its entry
        with the counter bumped; a new name takes the oldest unreg entry
        as it is when that list holds more than max_unreg entries (OTP's
        steal), else starts from the clock, bumped.
        Source: OTP epmd_srv.c, node_reg2.
        """
        log = self.log
        name = req.name
        nlen = len(name)
        nchars = verify_utf8(name) if nlen <= MAXSYMLEN else 0
        if nlen > MAXSYMLEN or nchars > MAX_NAME_CHARS:
            log.dbg_printf(0, "node name is too long (%d) %s", nlen, name)
            return None
        if nchars < 0:
            log.dbg_printf(0, "invalid node name encoding")
            return None
        if len(req.extra) > MAXSYMLEN:
            log.dbg_printf(0, "extra data is too long (%d) %s", len(req.extra),
                           req.extra.split(b"\0", 1)[0])
            return None
        if nlen == 0:  # D10: OTP registers "" and can never find it again
            log.dbg_printf(0, "node name is empty in ALIVE2_REQ")
            return None
        if name in self.reg:
            log.dbg_printf(0, "node name already occupied %s", name)
            return None
        node = self.unreg.pop(name, None)
        if node is not None:
            log.dbg_tty_printf(1, "reusing slot with same name '%s'", name)
            node.cr_counter = bump_creation(node.cr_counter)
        elif len(self.unreg) > self.max_unreg:
            oldest = next(iter(self.unreg))
            node = self.unreg.pop(oldest)
            node.name = name
        else:
            node = Node(name, bump_creation(int(self.current_time()) & CREATION_MASK))
        node.fd = conn.fd
        node.conn = conn
        conn.node = node
        node.port = req.port
        node.nodetype = req.nodetype
        node.protocol = req.protocol
        node.highvsn = req.highvsn
        node.lowvsn = req.lowvsn
        node.extra = req.extra
        node.resp = None
        self.reg[name] = node
        self.names = None
        log.dbg_tty_printf(1, "registering '%s:%d', port %d", name, node.creation, node.port)
        if req.highvsn != 0:
            log.dbg_tty_printf(1, "type %d proto %d highvsn %d lowvsn %d",
                               req.nodetype, req.protocol, req.highvsn, req.lowvsn)
        self.print_names()
        return node

    def current_time(self):
        """Return the clock (seconds), logged at level 3.  Source: current_time."""
        t = self.clock()
        self.log.dbg_printf(3, "time in seconds: %d", t)
        return t

    def _unreg(self, node):
        self.log.dbg_tty_printf(1, "unregistering '%s:%d', port %d",
                                node.name, node.creation, node.port)
        del self.reg[node.name]
        self.names = None
        if node.conn is not None:
            node.conn.node = None
        node.conn = None
        node.resp = None
        unreg = self.unreg
        unreg[node.name] = node
        if len(unreg) > self.max_unreg + 1:  # D6
            del unreg[next(iter(unreg))]
        self.print_names()

    def node_unreg(self, name):
        """Unregister *name*; return the Connection that held it (OTP
        returns its fd), or None if the name is not registered.

        Source: OTP epmd_srv.c, node_unreg (used by STOP_REQ).
        """
        node = self.reg.get(name)
        if node is None:
            self.log.dbg_tty_printf(1, "trying to unregister node with unknown name %s", name)
            return None
        owner = node.conn
        self._unreg(node)
        return owner

    def node_unreg_sock(self, conn):
        """Unregister the node registered by *conn*, if any; return it or None.

        Source: OTP epmd_srv.c, node_unreg_sock.
        """
        node = conn.node
        if node is None or self.reg.get(node.name) is not node:
            conn.node = None
            self.log.dbg_tty_printf(
                1, "trying to unregister node with unknown file descriptor %d", conn.fd)
            return None
        self._unreg(node)
        return node

    def print_names(self):
        """At level 3 (foreground), dump the table.  Source: print_names."""
        log = self.log
        if log.is_daemon or log.level < 3:
            return
        lines = []
        for node in reversed(list(self.reg.values())):
            lines.append('*****     active name     "%s#%d" at port %d, fd = %d\r\n'
                         % (text(node.name), node.creation, node.port, node.fd))
        lines.append("*****     reg calculated count  : %d\r\n" % len(self.reg))
        for node in self.unreg.values():
            lines.append('*****     old/unused name "%s#%d"\r\n' % (text(node.name), node.creation))
        lines.append("*****     unreg counter         : %d\r\n" % len(self.unreg))
        lines.append("*****     unreg calculated count: %d\r\n" % len(self.unreg))
        log.write("".join(lines))

    def port2_resp(self, name):
        """Return the PORT2_RESP for *name* ('w' 1 when it is not registered),
        made once per registration and cached on its Node."""
        node = self.reg.get(name)
        if node is None:
            return None
        resp = node.resp
        if resp is None:
            resp = node.resp = pack_port2_resp(node)
        return resp

    def names_lines(self):
        """Return the NAMES_REQ lines, newest registration first."""
        return [NAMES_LINE % (n.name, n.port) for n in reversed(list(self.reg.values()))]

    def names_body(self):
        """Return the NAMES_REQ lines joined (cached until the table changes)."""
        if self.names is None:
            self.names = b"".join(self.names_lines())
        return self.names

    def dump_lines(self):
        """Return the DUMP_REQ lines: active nodes newest first, then old ones
        oldest first, each ending in a NUL byte."""
        lines = [DUMP_ACTIVE_LINE % (n.name, n.port, n.fd) for n in reversed(list(self.reg.values()))]
        lines.extend(DUMP_OLD_LINE % (n.name, n.port, n.fd) for n in self.unreg.values())
        return lines


# ---------------------------------------------------------------------------
# Connections: the states, the input framing (OTP epmd_srv.c: the want/got
# part of do_read), conn_local_peer_check
# ---------------------------------------------------------------------------

# Results of Connection.take, the want/got framing of do_read.
INCOMPLETE, COMPLETE, BAD_SIZE, TOO_MUCH = range(4)

# Connection states.  Epmd.set_state is the one place a state changes; it
# keeps the time-out index (Epmd.pending) and the selector interest in step.
#
#   state      what the connection is doing         timed  selector interest
#   READING    waiting for / reading its request     yes    read (once it waits)
#   REPLYING   writing the rest of its last reply    yes    write only (as OTP,
#                                                           which writes the whole
#                                                           reply before reading)
#   KEPT       holds a registered node (ALIVE2 OK)   no     read (+ write while a
#                                                           reply is left over)
#   CLOSED     closed and forgotten                  -      -
#
# A connection enters the connection table (Epmd.conns) when it first has to
# wait: for the rest of its request (set_state to READING), to write its
# reply (REPLYING), or as a registered node (KEPT).  One answered and closed
# in the wake-up that accepted it, the common case, never does: that spares
# it two table entries and a clock read, 6% of a PORT_PLEASE2_REQ.
READING, REPLYING, KEPT, CLOSED = "reading", "replying", "kept", "closed"


class Connection:
    """One accepted TCP connection: its state, input buffer and output.

    ``state`` is one of READING, REPLYING, KEPT, CLOSED (see the table
    above), changed only by Epmd.set_state.  ``buf`` holds the bytes of
    the packet read so far (at most INBUF_SIZE), ``want`` the packet's
    total size with its HEADER_LEN-byte header once known (0 before).
    ``mod_time`` is when the current time-out began: the first wait (in
    the wake-up of the accept), then the reply (integer seconds of the
    monotonic clock; OTP restarts it on every read, D13).  ``node`` is
    the Node this connection registered, set and cleared by NodeTable
    only.  ``out`` holds reply bytes the socket could not take yet.
    ``one_read`` is true when the request arrived in one read, so that
    read left nothing unread.  ``events`` are the selector
    events it is registered for (0: not registered).  ``peer`` is the
    address accept() returned (or None), and ``local`` the verdict of
    conn_local_peer_check, None until local_peer first asks for it.
    """

    __slots__ = ("sock", "fd", "local", "peer", "state", "want", "buf", "mod_time", "node",
                 "out", "events", "one_read")

    def __init__(self, sock, fd, local_peer, now, peer=None):
        self.sock = sock
        self.fd = fd
        self.local = local_peer
        self.peer = peer
        self.state = READING
        self.want = 0
        self.buf = b""
        self.mod_time = now
        self.node = None
        self.out = b""
        self.events = 0
        self.one_read = False

    @property
    def local_peer(self):
        """Whether the peer is on this host (conn_local_peer_check).

        OTP decides this in conn_open; here it is decided the first time it
        matters (a local-only request, a nearly full table, a level-2 log
        line), as the common request, PORT_PLEASE2_REQ, never needs it:
        that saves 1,600 instructions, 3.5% of a PORT_PLEASE2_REQ.
        """
        local = self.local
        if local is None:
            local = self.local = conn_local_peer_check(self.sock, self.peer)
            self.peer = None        # not kept for the life of a registered node
        return local

    @local_peer.setter
    def local_peer(self, value):
        self.local = value

    def wanted_events(self):
        """The selector events its state wants (see the state table)."""
        if self.state == REPLYING:
            return WRITABLE
        return READABLE | (WRITABLE if self.out else 0)

    @property
    def got(self):
        """Bytes of the current packet read so far, header included."""
        return len(self.buf)

    def read_size(self):
        """How many bytes the next read may take: the rest of the packet once
        its length is known, else FIRST_READ_SIZE.  Source: do_read."""
        return (self.want or FIRST_READ_SIZE) - len(self.buf)

    def take(self, data):
        """Add *data* to the packet; return INCOMPLETE, COMPLETE, BAD_SIZE
        (L is 0 or above MAX_PACKET_LEN) or TOO_MUCH (more bytes than the
        packet, e.g. two requests in one write).  Source: OTP do_read.
        """
        self.buf = self.buf + data if self.buf else data
        got = len(self.buf)
        if self.want == 0 and got >= HEADER_LEN:
            length = U16.unpack_from(self.buf)[0]
            self.want = length + HEADER_LEN
            if not 1 <= length <= MAX_PACKET_LEN:
                return BAD_SIZE
            if got > self.want:
                return TOO_MUCH
        return COMPLETE if got == self.want else INCOMPLETE


def conn_local_peer_check(sock, peer=None, family=None):
    """Decide whether the peer of *sock* is on this host.

    *peer* is the address accept() returned (else getpeername() is asked),
    *family* the socket's address family (else the socket is asked).
    Local: IPv6 ``::1``; IPv4 127.0.0.0/8; or a peer address equal to the
    socket's own address, same family (the host talking to itself over a
    non-loopback address).  Anything else, or an error, is remote.
    Source: OTP epmd_srv.c, conn_local_peer_check.
    """
    try:
        if not peer:
            peer = sock.getpeername()
        if family is None:
            family = sock.family
        if family == socket.AF_INET6:
            if peer[0] == "::1":
                return True
        elif family == socket.AF_INET:
            if peer[0].startswith("127."):
                return True
        else:
            return False
        return peer[0] == sock.getsockname()[0]
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Listening sockets (OTP epmd_srv.c: run, the part before the loop)
# ---------------------------------------------------------------------------


class StartupError(Exception):
    """The daemon cannot start; ``code`` is the exit status (1), the message
    the line OTP logs at level 0 (as of run in epmd_srv.c)."""

    def __init__(self, msg, code=1):
        Exception.__init__(self, msg)
        self.code = code


class AlreadyRunning(Exception):
    """The port is taken (EADDRINUSE): OTP exits 0, assuming another epmd.

    The message names the port and the address."""


def parse_addresses(spec):
    """Return the (family, address) pairs to listen on for -address *spec*.

    *spec* is a list of IPv4/IPv6 addresses separated by commas and/or
    spaces.  None, or a string of separators only, means every address:
    ``0.0.0.0`` and ``::``.  Otherwise 127.0.0.1 and ::1 come first, always,
    then each other address in order (127.0.0.1 and ::1 are not repeated).
    Raises StartupError for an address that is not IPv6 or IPv4 literal text,
    or for more than MAX_LISTEN_SOCKETS sockets in all.
    Source: OTP epmd_srv.c, run.
    """
    tokens = [t for t in (spec or "").replace(",", " ").split(" ") if t]
    if not tokens:
        return [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    result = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    for tok in tokens:
        for family in (socket.AF_INET6, socket.AF_INET):
            try:
                packed = socket.inet_pton(family, tok)
            except (OSError, ValueError):
                continue
            break
        else:
            raise StartupError('cannot parse IP address "%s"' % tok)
        addr = socket.inet_ntop(family, packed)
        if (family, addr) in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            continue
        result.append((family, tok))
        if len(result) >= MAX_LISTEN_SOCKETS:
            raise StartupError("cannot listen on more than %d IP addresses" % MAX_LISTEN_SOCKETS)
    return result


def open_listen_sockets(addresses, port, log):
    """Bind and listen on each (family, address) of *addresses* at *port*.

    Sets SO_REUSEADDR, IPV6_V6ONLY on IPv6 and non-blocking mode; listens
    with the system's SOMAXCONN.  An address family the host lacks is
    skipped.  When an explicit address list was given, the two loopback
    sockets (the first two) may fail to bind without stopping the daemon.
    Returns the listening sockets.  Raises AlreadyRunning on EADDRINUSE and
    StartupError on any other failure.  Source: OTP epmd_srv.c, run.
    """
    socks = []
    nonfatal = 2 if addresses and addresses[0][1] == "127.0.0.1" else 0
    try:
        for i, (family, addr) in enumerate(addresses):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:
                if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                    continue
                raise StartupError("error opening stream socket: %s" % e.strerror) from e
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setblocking(False)
                sock.bind((addr, port))
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE:
                    raise AlreadyRunning("there is already a epmd running at port %d on ipaddr %s"
                                         % (port, addr)) from e
                msg = "failed to bind on ipaddr %s: %s" % (addr, e.strerror)
                if i >= nonfatal:
                    raise StartupError(msg) from e
                log.dbg_printf(0, "%s", msg)
                continue
            try:
                sock.listen(socket.SOMAXCONN)
            except OSError as e:
                sock.close()
                raise StartupError("failed to listen on ipaddr %s: %s" % (addr, e.strerror)) from e
            socks.append(sock)
        if not socks:
            raise StartupError("unable to bind any address")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def systemd_listen_sockets(environ):
    """Return the listening sockets systemd passed (socket activation).

    Reads LISTEN_PID (must be this process, if set) and LISTEN_FDS; the
    sockets are fds 3, 4, ...  Raises StartupError when there are none or
    more than MAX_LISTEN_SOCKETS.  The variables are removed from *environ*
    so that children do not inherit them.  Source: sd_listen_fds(3).
    """
    pid = environ.pop("LISTEN_PID", None)
    fds = environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    count = 0
    if fds is not None and (pid is None or pid.strip() == str(os.getpid())):
        try:
            count = int(fds)
        except ValueError:
            raise StartupError("cannot obtain sockets from systemd: LISTEN_FDS=%r" % fds) from None
    if count <= 0:
        raise StartupError("systemd provides no sockets")
    if count > MAX_LISTEN_SOCKETS:
        raise StartupError("cannot listen on more than %d IP addresses" % MAX_LISTEN_SOCKETS)
    socks = []
    for fd in range(SYSTEMD_FIRST_FD, SYSTEMD_FIRST_FD + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise StartupError("cannot obtain sockets from systemd: fd %d: %s"
                               % (fd, e.strerror)) from e
        sock.setblocking(False)
        socks.append(sock)
    return socks


def sd_notify(state, environ=os.environ):
    """Send *state* (e.g. "READY=1") to the datagram socket $NOTIFY_SOCKET.

    A name starting with '@' is an abstract socket.  Does nothing when the
    variable is unset; errors are ignored.  Returns True if sent.
    Source: sd_notify(3), without libsystemd.
    """
    path = environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    if path[0] == "@":
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), path)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Readiness: the loop's poller (OTP epmd_srv.c: the fd_sets of run)
# ---------------------------------------------------------------------------

# Readiness events, with the bits epoll and poll use.  A failed or hung-up
# socket is reported as FAILED whatever it was registered for, and counts
# as both readable and writable, as the selectors module counts it.
READABLE = 0x001                    # POLLIN, EPOLLIN
WRITABLE = 0x004                    # POLLOUT, EPOLLOUT
FAILED = 0x008 | 0x010              # POLLERR | POLLHUP


class SelectorPoller:
    """select.epoll's interface (register, modify and unregister by fd,
    poll returning (fd, events) pairs, close) on top of the selectors
    module, for systems without epoll.  Events are READABLE and WRITABLE.
    """

    __slots__ = ("sel",)

    def __init__(self):
        self.sel = selectors.DefaultSelector()

    @staticmethod
    def _events(events):
        return ((selectors.EVENT_READ if events & READABLE else 0)
                | (selectors.EVENT_WRITE if events & WRITABLE else 0))

    def register(self, fd, events):
        try:
            self.sel.register(fd, self._events(events))
        except KeyError:
            raise FileExistsError(errno.EEXIST, "already registered") from None

    def modify(self, fd, events):
        self.sel.modify(fd, self._events(events))

    def unregister(self, fd):
        try:
            self.sel.unregister(fd)
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "not registered") from None

    def poll(self, timeout=-1):
        return [(key.fd, (READABLE if mask & selectors.EVENT_READ else 0)
                 | (WRITABLE if mask & selectors.EVENT_WRITE else 0))
                for key, mask in self.sel.select(None if timeout < 0 else timeout)]

    def close(self):
        self.sel.close()


def make_poller():
    """Return the loop's poller: select.epoll where there is one (Linux),
    else a SelectorPoller.

    epoll directly rather than the selectors module: selectors' select()
    builds a list of SelectorKey objects in Python on every wake-up, which
    cost a tenth of a PORT_PLEASE2_REQ (5,500 of 52,500 instructions).
    """
    if hasattr(select, "epoll"):
        return select.epoll()
    return SelectorPoller()


# ---------------------------------------------------------------------------
# Server: the event loop and the requests (OTP epmd_srv.c)
# ---------------------------------------------------------------------------


class EpmdExit(BaseException):
    """Raised inside the loop to end the daemon with exit status ``code``.

    A BaseException, so that the per-connection ``except Exception`` of
    handle() lets it through to run()."""

    def __init__(self, code):
        BaseException.__init__(self, code)
        self.code = code


class Epmd:
    """The daemon: options, the node table, the connections and the loop.

    Options (seconds for times): *port* as configured (reported in NAMES
    and DUMP), *addresses* (the -address list or None), *relaxed*
    (-relaxed_command_check), *packet_timeout*, *delay_accept*,
    *delay_write*, *systemd*, and *log*, a DebugLog that carries the debug
    level and whether we are a daemon.  Mirrors OTP's EpmdVars.

    Methods by role (C counterparts in epmd_srv.c unless said):

    - start-up: bind (the part of run before the loop), conn_limit
    - the loop: run, handle (one connection's events), internal_error
      (what handle does when handling fails), check_timeouts
      (the end of run's loop), clock, epmd_cleanup_exit (epmd.c)
    - accepting: do_accept, conn_open, shed_connection, pause_accept and
      resume_accept (D2), open_spare
    - connection state: set_state (the one place a state changes), watch,
      epmd_conn_close, drop (node_unreg_sock + epmd_conn_close)
    - requests: do_read, do_request and one handler per request code
      (do_alive2_req, do_port2_req, do_names_req, do_dump_req, do_kill_req,
      do_stop_req, in do_request's switch in C), refuse_remote,
      send_listing
    - writing: reply, do_write, flush
    """

    def __init__(self, port=EPMD_PORT_NO, addresses=None, relaxed=False,
                 packet_timeout=CLOSE_TIMEOUT, delay_accept=0, delay_write=0,
                 systemd=False, log=None):
        self.port = port
        self.addresses = addresses
        self.relaxed = relaxed
        self.packet_timeout = packet_timeout
        self.delay_accept = delay_accept
        self.delay_write = delay_write
        self.systemd = systemd
        self.log = log = log if log is not None else DebugLog()
        max_unreg = DEBUG_MAX_UNREG_COUNT if log.level else MAX_UNREG_COUNT
        self.nodes = NodeTable(log, max_unreg)
        self.conns = {}             # fd -> Connection, every open one
        self.pending = {}           # fd -> Connection READING or REPLYING (timed)
        self.listeners = []
        self.listening = {}         # listening fd -> (socket, its address family)
        self.sel = None             # the poller (make_poller), while running
        self.max_conn = 0
        self.local_reserve = 0
        self.spare_fd = -1          # D2: kept open to shed connections on EMFILE
        self.paused_until = 0.0     # D2: listeners rest until this monotonic time
        self.last_tick = 0

    # -- start-up ---------------------------------------------------------

    def bind(self):
        """Open the listening sockets (or take systemd's) and size the
        connection table.  Raises StartupError or AlreadyRunning."""
        log = self.log
        if self.systemd:
            log.dbg_printf(2, "try to obtain sockets from systemd")
            self.listeners = systemd_listen_sockets(os.environ)
        else:
            log.dbg_printf(2, "try to initiate listening port %d", self.port)
            addrs = parse_addresses(self.addresses)
            self.listeners = open_listen_sockets(addrs, self.port, log)
        self.max_conn = self.conn_limit()
        self.local_reserve = min(LOCAL_RESERVE, self.max_conn // 2)

    def conn_limit(self):
        """D3: size the connection table from RLIMIT_NOFILE, not FD_SETSIZE.

        The soft limit is raised to the hard limit when possible; the table
        gets that many descriptors minus FD_RESERVE and the listeners.
        """
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY or hard > soft:
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                    soft = target
                except (OSError, ValueError):
                    pass
        except ImportError:
            soft = 1024
        return max(1, soft - FD_RESERVE - len(self.listeners))

    # -- the loop -----------------------------------------------------------
    #
    # run() waits on the selector for at most IDLE_TIMEOUT seconds (1 second
    # when packet_timeout < IDLE_TIMEOUT), then sleeps -delay_accept if set,
    # and goes through the ready sockets in the order the selector gives:
    #   - a listening socket gets one accept (do_accept); the new connection
    #     is opened by conn_open and, since its request has usually arrived
    #     already, read at once (handle), so most connections are answered
    #     and closed without ever being registered with the selector;
    #   - a connection gets handle(): do_write when its reply waits and the
    #     socket is writable, do_read when readable; do_read frames the
    #     packet and calls do_request once it is complete.
    # After the ready sockets: listeners paused by EMFILE are resumed when
    # their pause is over (D2), and check_timeouts closes, at most once a
    # second, the timed connections (READING, REPLYING) whose time is up.
    # Any exception raised while handling one connection is logged with its
    # traceback and only that connection is closed; the loop never dies of
    # a peer.

    def run(self):
        """Serve until KILL_REQ or a signal; return the exit status.

        Source: OTP epmd_srv.c, run (the select loop).
        """
        log = self.log
        self.sel = sel = make_poller()
        for ls in self.listeners:
            sel.register(ls.fileno(), READABLE)
            self.listening[ls.fileno()] = (ls, int(ls.family))
        self.open_spare()
        if self.systemd:
            sd_notify(SD_READY % os.getpid())
        log.dbg_tty_printf(2, "entering the main select() loop")
        tick = SHORT_IDLE_TIMEOUT if self.packet_timeout < IDLE_TIMEOUT else IDLE_TIMEOUT
        try:
            while True:
                timeout = tick
                if self.paused_until:
                    timeout = max(0.0, min(tick, self.paused_until - time.monotonic()))
                events = sel.poll(timeout)
                if self.delay_accept:
                    time.sleep(self.delay_accept)
                # An event names a descriptor.  One closed earlier in this
                # batch may have been reused by a connection accepted since:
                # the event then reaches the new connection, whose recv or
                # send finds nothing to do (EAGAIN).
                for fd, mask in events:
                    listener = self.listening.get(fd)
                    if listener is not None:
                        # not do_accept(*listener): a call with * takes
                        # the slow call path, 1.5% of a request more
                        lsock, family = listener
                        self.do_accept(lsock, family)
                    else:
                        conn = self.conns.get(fd)
                        if conn is not None:
                            self.handle(conn, mask)
                if self.paused_until and time.monotonic() >= self.paused_until:
                    self.resume_accept()
                # Most wake-ups leave no connection timed (each was answered
                # at once): the clock is then not read, which saves 5% of a
                # PORT_PLEASE2_REQ.  At level 3 every clock read is logged,
                # so there it is read as before.
                if self.pending or log.level >= 3:
                    self.check_timeouts()
        except EpmdExit as e:
            return e.code
        finally:
            self.epmd_cleanup_exit()

    def handle(self, conn, mask):
        """Write and/or read *conn* as *mask* says; a new connection left
        waiting for the rest of its request then starts waiting (set_state
        READING).  Any error closes this connection only, and is logged with
        a traceback."""
        try:
            if mask != READABLE:    # not only readable (rare)
                if mask & FAILED:
                    mask = conn.events
                if mask & WRITABLE and conn.out:
                    self.do_write(conn)
            if mask & READABLE and conn.state is not CLOSED:
                self.do_read(conn)
            if conn.state is READING and not conn.events:
                self.set_state(conn, READING)
        except Exception:  # one bad client never takes us down
            self.internal_error(conn)

    def internal_error(self, conn):
        """Log the exception being handled, with its traceback, and close
        *conn* (only), unregistering its node."""
        self.log.dbg_printf(0, "internal error on file descriptor %d: %s",
                            conn.fd, traceback.format_exc().rstrip())
        self.drop(conn)

    def check_timeouts(self):
        """Close the timed connections (READING, REPLYING) that spent more
        than packet_timeout seconds since they were accepted (or since
        their reply began) without the request (or the reply) being done.
        Runs once per second at most, and run() calls it only while some
        connection is timed.  Source: the end of OTP's run; D13.
        """
        now = self.clock()
        if now == self.last_tick:
            return
        self.last_tick = now
        limit = now - self.packet_timeout
        stale = [c for c in self.pending.values() if c.mod_time < limit]
        for conn in stale:
            self.log.dbg_tty_printf(1, "closing because timed out on receive")
            self.epmd_conn_close(conn)

    def clock(self):
        """Integer seconds of the monotonic clock, for the time-outs.

        OTP's current_time reads the wall clock, which jumps with the
        system time; the monotonic clock does not.  At level 3 the wall
        clock is logged, as OTP logs every current_time call.
        """
        t = int(time.monotonic())
        if self.log.level >= 3:
            self.log.dbg_printf(3, "time in seconds: %d", int(time.time()))
        return t

    def epmd_cleanup_exit(self):
        """Close every connection and listening socket.  Source: OTP epmd.c,
        epmd_cleanup_exit (without its exit: run returns the status)."""
        for conn in list(self.conns.values()):
            self.epmd_conn_close(conn)
        for ls in self.listeners:
            self.unwatch(ls.fileno())
            ls.close()
        self.listeners = []
        self.listening = {}
        if self.spare_fd >= 0:
            os.close(self.spare_fd)
            self.spare_fd = -1
        if self.sel is not None:
            self.sel.close()
            self.sel = None

    # -- accepting ----------------------------------------------------------

    def open_spare(self):
        """D2: hold one spare descriptor, freed to shed a connection on EMFILE."""
        if self.spare_fd < 0:
            try:
                self.spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self.spare_fd = -1

    def do_accept(self, lsock, family):
        """Accept one connection from *lsock* (of address *family*) and, as
        most clients have sent their request by then, answer it at once; the
        connection is only watched by the selector if it stays open.

        One accept per wake-up, as OTP's loop does: the selector reports the
        listener again at once while connections wait, which costs less than
        the failing accept() that ends a batch.  EAGAIN, ECONNABORTED and
        EINTR are ignored.  D2: EMFILE/ENFILE do not stop the daemon (OTP
        exits 1): the spare descriptor is freed to accept and close the
        oldest waiting connection, and the listeners rest for ACCEPT_PAUSE
        seconds so the loop does not spin.
        Source: OTP epmd_srv.c, do_accept.
        """
        try:
            # lsock.accept() minus what costs more CPU than the rest of the
            # accept: the conversions of family and type to enums, and the
            # Python-level socket class.  The socket module's own _accept
            # (there since Python 3.3) gives the descriptor, made into the
            # plain C socket type, whose recv, send and close need no
            # Python frames.
            fd, addr = lsock._accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            self.log.dbg_perror(e, "error in accept")
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self.shed_connection(lsock)
            self.pause_accept()
            return
        conn = self.conn_open(socket.SocketType(family, SOCK_STREAM, 0, fd), addr, family)
        if conn is not None:
            # handle(conn, READABLE) without its tests for the other
            # events, which a new connection cannot have: 3% of a request
            try:
                self.do_read(conn)
                if conn.state is READING:   # the rest of its request is due
                    self.set_state(conn, READING)
            except Exception:  # one bad client never takes us down
                self.internal_error(conn)

    def shed_connection(self, lsock):
        """Accept and close one waiting connection using the spare fd (D2)."""
        if self.spare_fd < 0:
            return
        os.close(self.spare_fd)
        self.spare_fd = -1
        try:
            s, _ = lsock.accept()
            s.close()
        except OSError:
            pass
        self.open_spare()

    def pause_accept(self):
        """Stop watching the listeners for ACCEPT_PAUSE seconds (D2)."""
        if self.paused_until:
            return
        for ls in self.listeners:
            self.unwatch(ls.fileno())
        self.paused_until = time.monotonic() + ACCEPT_PAUSE

    def resume_accept(self):
        """Watch the listeners again after pause_accept."""
        self.paused_until = 0.0
        for ls in self.listeners:
            try:
                self.sel.register(ls.fileno(), READABLE)
            except FileExistsError:  # still registered
                pass

    def conn_open(self, sock, peer, family):
        """Make a READING Connection of an accepted socket (*peer*: the
        address accept() returned, *family*: its address family); return
        it, or None.  It enters the connection table only if it has to wait
        (set_state); its time-out then starts.

        When the table is full the socket is closed at once ("failed
        opening connection").  D4: remote peers may not take the last
        local_reserve slots, so a flood of remote connections cannot keep
        local nodes from registering.  Source: OTP epmd_srv.c, conn_open.
        """
        log = self.log
        fd = sock.fileno()
        local = None                # until it matters (Connection.local_peer)
        active = len(self.conns)
        if active >= self.max_conn - self.local_reserve or log.level >= 2:
            local = conn_local_peer_check(sock, peer, family)
            peer = None             # decided: not kept
            if active >= self.max_conn or (not local and active >= self.max_conn - self.local_reserve):
                log.dbg_tty_printf(0, "failed opening connection on file descriptor %d", fd)
                sock.close()
                return None
        if log.level >= 2:
            log.dbg_tty_printf(2, "Local peer connected" if local else "Non-local peer connected")
        conn = Connection(sock, fd, local, 0, peer)  # mod_time: set at its first wait
        if log.level >= 2:
            log.dbg_tty_printf(2, "opening connection on file descriptor %d", fd)
        return conn

    # -- connection state ---------------------------------------------------

    def set_state(self, conn, state):
        """Move *conn* to *state*: the one place a state changes.

        A connection is READING from conn_open on, outside the connection
        table; set_state(conn, READING) is its first wait for more of its
        request, in the wake-up that accepted it.  It keeps the rest in
        step: the connection table ``conns`` (entered at the first wait,
        left at CLOSED), the time-out index ``pending`` (READING and
        REPLYING are timed; the time-out starts now: at the accept for
        READING, D13, and at the reply for REPLYING), the selector interest
        (Connection.wanted_events), and, for CLOSED, the socket, closed
        here.  Closing a closed connection does nothing.
        """
        if conn.state is CLOSED:
            return
        conn.state = state
        fd = conn.fd
        if state is CLOSED:
            if self.conns.pop(fd, None) is not None:   # it has waited
                self.pending.pop(fd, None)
                if conn.events:
                    self.unwatch(fd)
                    conn.events = 0
                conn.buf = conn.out = b""
            if self.log.level >= 2:
                self.log.dbg_tty_printf(2, "closing connection on file descriptor %d", fd)
            conn.sock.close()
            return
        self.conns[fd] = conn
        if state is KEPT:
            self.pending.pop(fd, None)
        else:
            conn.mod_time = self.clock()
            self.pending[fd] = conn
        self.watch(conn)

    def watch(self, conn):
        """Register *conn* with the poller for its wanted_events(), or
        bring its registration up to date."""
        events = conn.wanted_events()
        if events != conn.events:
            if conn.events:
                self.sel.modify(conn.fd, events)
            else:
                self.sel.register(conn.fd, events)
            conn.events = events

    def unwatch(self, fd):
        """Unregister descriptor *fd* from the poller if it is registered."""
        try:
            self.sel.unregister(fd)
        except (OSError, ValueError, AttributeError):
            pass

    def epmd_conn_close(self, conn):
        """Close *conn* and forget it.  Source: OTP epmd_srv.c, epmd_conn_close."""
        self.set_state(conn, CLOSED)

    def drop(self, conn):
        """Unregister the node of *conn*, if it has one, and close it.
        Source: OTP epmd_srv.c, node_unreg_sock then epmd_conn_close."""
        if conn.node is not None:
            self.nodes.node_unreg_sock(conn)
        self.set_state(conn, CLOSED)

    # -- reading ------------------------------------------------------------

    def do_read(self, conn):
        """Read what *conn* has; run the request once the packet is complete.

        A KEPT connection that becomes readable, whether by EOF, an error
        or any data, unregisters its node and is closed.  Otherwise the
        read is limited to the rest of the packet, and EOF before its end,
        L of 0 or over MAX_PACKET_LEN, and more bytes than the packet all
        close the connection without a reply.  After the request, the
        connection is KEPT (a registered node), REPLYING (its reply is not
        all written) or closed.  Source: OTP epmd_srv.c, do_read.
        """
        log = self.log
        if conn.state is KEPT:
            try:
                data = conn.sock.recv(INBUF_SIZE, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.dbg_tty_printf(1, "error on ALIVE socket %d (%d; errno=0x%x)",
                                   conn.fd, -1, e.errno or 0)
                data = None
            if data:
                log.dbg_tty_printf(1, "got more than expected on ALIVE socket %d (%d)",
                                   conn.fd, len(data))
                log.dbg_print_buf(data)
            self.drop(conn)
            return
        try:
            data = conn.sock.recv(conn.read_size(), DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.dbg_perror(e, "error in read")
            self.epmd_conn_close(conn)
            return
        if not data:
            log.dbg_printf(0, "got partial packet only on file descriptor %d (%d)",
                           conn.fd, conn.got)
            self.epmd_conn_close(conn)
            return
        if log.level >= 2:
            log.dbg_print_buf(data)
        status = conn.take(data)
        if status == COMPLETE:      # the common case first
            conn.one_read = len(data) == conn.want
            payload = conn.buf[HEADER_LEN:]
            conn.buf = b""
            self.do_request(conn, payload)
            if conn.state is READING:
                # D13: the time-out runs from the accept, not from the last
                # read as in OTP, so a trickle cannot hold a slot; the reply
                # gets a packet_timeout of its own (set_state starts it).
                self.set_state(conn, REPLYING if conn.out else CLOSED)
        elif status == BAD_SIZE:
            log.dbg_printf(0, "invalid packet size (%d)", conn.want - HEADER_LEN)
            self.epmd_conn_close(conn)
        elif status == TOO_MUCH:
            log.dbg_printf(0, "got %d bytes in packet, expected %d",
                           conn.got - HEADER_LEN, conn.want - HEADER_LEN)
            self.epmd_conn_close(conn)

    # -- requests -----------------------------------------------------------

    def do_request(self, conn, payload):
        """Dispatch a complete request on its first byte.

        Unknown codes close the connection ("got garbage ").  ALIVE2, DUMP,
        KILL and STOP are for local peers only; remote peers get those
        closed without a reply.  A handler replies with reply(), and leaves
        the connection READING unless it keeps or closes it.
        Source: OTP epmd_srv.c, do_request.
        """
        code = payload[0]
        handler = self.HANDLERS.get(code)
        if handler is None:
            self.log.dbg_printf(0, "got garbage ")
            return
        handler(self, conn, payload)

    def refuse_remote(self, conn, what):
        """Log and return True when *conn* is not local (for local-only requests)."""
        if conn.local_peer:
            return False
        self.log.dbg_printf(0, "%s from non local address", what)
        return True

    def do_alive2_req(self, conn, payload):
        """ALIVE2_REQ: register a node; reply ALIVE2_X_RESP or ALIVE2_RESP.

        On success the connection is KEPT for the life of the node.  D9: on
        an error reply (result 1, creation 99) the connection is closed,
        where OTP holds it open forever.  D1: if the reply cannot be sent,
        only the node this connection registered is unregistered.
        """
        log = self.log
        log.dbg_printf(1, "** got ALIVE2_REQ")
        if self.refuse_remote(conn, "ALIVE2_REQ"):
            return
        try:
            req = parse_alive2_req(payload)
        except PacketError as e:
            log.dbg_printf(0, "%s", e)
            return
        node = self.nodes.node_reg2(req, conn)
        if node is None:
            resp = pack_alive2_resp(RESULT_ERROR, ALIVE2_ERROR_CREATION, req.highvsn)
        else:
            resp = pack_alive2_resp(RESULT_OK, node.creation, req.highvsn)
        sent = self.reply(conn, (resp,), last=node is None)
        log.dbg_tty_printf(1, "** %s ALIVE2_RESP for \"%s\"",
                           "sent" if sent else "failed to send", req.name)
        if not sent:
            if node is not None:
                self.nodes.node_unreg_sock(conn)  # D1: never another connection's node
            return
        if node is not None:
            self.set_state(conn, KEPT)

    def do_port2_req(self, conn, payload):
        """PORT_PLEASE2_REQ: answer PORT2_RESP with the node's fields, or
        'w' 1 when the name is not registered.  Anyone may ask."""
        log = self.log
        # The most frequent request: its level-1 lines are tested for
        # before the call, which costs more than the test.
        if log.level:
            log.dbg_printf(1, "** got PORT2_REQ")
        try:
            name = parse_port2_req(payload)
        except PacketError as e:
            log.dbg_printf(0, "%s", e)
            return
        resp = self.nodes.port2_resp(name)
        sent = self.reply(conn, (resp or PORT2_RESP_ERROR,))
        if log.level:
            log.dbg_tty_printf(1, "** %s PORT2_RESP (%s) for \"%s\"",
                               "sent" if sent else "failed to send", "ok" if resp else "error", name)

    def do_names_req(self, conn, payload):
        """NAMES_REQ: the configured port as u32, then one line per node.
        Anyone may ask."""
        self.log.dbg_printf(1, "** got NAMES_REQ")
        if self.log.level >= 2 or self.delay_write:
            lines = self.nodes.names_lines()      # OTP's writes, one by one
        else:
            lines = [self.nodes.names_body()]
        self.send_listing(conn, lines, "NAMES_RESP")

    def do_dump_req(self, conn, payload):
        """DUMP_REQ: like NAMES, with the old names too; local peers only."""
        self.log.dbg_printf(1, "** got DUMP_REQ")
        if not self.refuse_remote(conn, "DUMP_REQ"):
            self.send_listing(conn, self.nodes.dump_lines(), "DUMP_RESP")

    def send_listing(self, conn, lines, what):
        """Reply the u32 configured port and *lines* (NAMES_RESP, DUMP_RESP)."""
        if self.reply(conn, [U32.pack(self.port)] + lines):
            self.log.dbg_tty_printf(1, "** sent %s", what)
        else:
            self.log.dbg_tty_printf(1, "failed to send %s", what)

    def do_kill_req(self, conn, payload):
        """KILL_REQ: "NO" while nodes are registered (unless relaxed), else
        "OK" and the daemon exits 0; local peers only."""
        log = self.log
        if self.refuse_remote(conn, "KILL_REQ"):
            return
        log.dbg_printf(1, "** got KILL_REQ")
        if not self.relaxed and self.nodes.reg:
            log.dbg_printf(0, "Disallowed KILL_REQ, live nodes")
            if not self.reply(conn, (KILL_NO,)):
                log.dbg_printf(0, "failed to send reply to KILL_REQ")
            return
        if not self.reply(conn, (KILL_OK,)):
            log.dbg_printf(0, "failed to send reply to KILL_REQ")
        log.dbg_tty_printf(1, "epmd killed")
        self.flush(conn)
        self.epmd_conn_close(conn)
        log.dbg_printf(0, "got KILL_REQ - terminates normal")
        raise EpmdExit(0)

    def do_stop_req(self, conn, payload):
        """STOP_REQ: unregister a name and close its node's connection; reply
        "STOPPED", or "NOEXIST" then "STOPPED" for an unknown name.  Only for
        local peers of a relaxed daemon; the name ends at the first NUL."""
        log = self.log
        log.dbg_printf(1, "** got STOP_REQ")
        if self.refuse_remote(conn, "STOP_REQ"):
            return
        if not self.relaxed:
            log.dbg_printf(0, "Disallowed STOP_REQ, no relaxed_command_check")
            return
        if len(payload) <= 1:
            log.dbg_printf(0, "packet too small for request STOP_REQ (%d)", len(payload))
            return
        name = bytes(payload[1:]).split(b"\0", 1)[0]
        owner = self.nodes.node_unreg(name)
        if owner is None:
            if not self.reply(conn, (STOP_NOEXIST,), last=False):
                log.dbg_tty_printf(1, "failed to send STOP_RESP NOEXIST")
                return
            log.dbg_tty_printf(1, "** sent STOP_RESP NOEXIST")
        else:
            self.epmd_conn_close(owner)
            log.dbg_tty_printf(1, "epmd connection stopped")
        if self.reply(conn, (STOP_OK,)):
            log.dbg_tty_printf(1, "** sent STOP_RESP STOPPED")
        else:
            log.dbg_tty_printf(1, "failed to send STOP_RESP STOPPED")

    HANDLERS = {
        ALIVE2_REQ: do_alive2_req,
        PORT_PLEASE2_REQ: do_port2_req,
        NAMES_REQ: do_names_req,
        DUMP_REQ: do_dump_req,
        KILL_REQ: do_kill_req,
        STOP_REQ: do_stop_req,
    }

    # -- writing ------------------------------------------------------------

    def reply(self, conn, chunks, last=True):
        """Send *chunks* (bytes objects, OTP's separate writes) to *conn*;
        *last* says whether the connection closes after this reply (false
        for a successful ALIVE2_REQ, and for STOP's NOEXIST, which STOPPED
        follows).

        Each chunk is logged as its own hexdump and preceded by the
        -delay_write sleep, as OTP writes them one by one; on the wire they
        go out in one send.  What the socket cannot take now is kept in
        ``conn.out``, written by do_write when the socket is writable, so
        one slow peer never stalls the loop.  Returns False if the peer is
        gone.  Source: OTP epmd_srv.c, reply.
        """
        log = self.log
        if self.delay_write or log.level >= 2:
            for chunk in chunks:
                if self.delay_write:
                    time.sleep(self.delay_write)
                log.dbg_print_buf(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if conn.out:
            conn.out += data
            return True
        # When the connection is closed right after this reply, let the FIN
        # ride in the same segment (MSG_MORE).  Only when the request came
        # in one read, as unread input turns the close into an RST that
        # would drop data still held back.
        try:
            sent = conn.sock.send(data, DONTWAIT_MORE if last and conn.one_read else DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            log.dbg_perror(e, "error in write, errno=%d", e.errno or 0)
            return False
        if sent < len(data):
            conn.out = data[sent:]
        return True

    def do_write(self, conn):
        """Write more of ``conn.out``; once all is written a REPLYING
        connection is closed, a KEPT one watched for reading only."""
        try:
            sent = conn.sock.send(conn.out, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.log.dbg_perror(e, "error in write, errno=%d", e.errno or 0)
            self.drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            if conn.state is KEPT:
                self.watch(conn)
            else:
                self.epmd_conn_close(conn)

    def flush(self, conn, timeout=1.0):
        """Try for up to *timeout* seconds to write what *conn* still holds
        (used before exiting on KILL_REQ)."""
        deadline = time.monotonic() + timeout
        while conn.out and time.monotonic() < deadline:
            try:
                sent = conn.sock.send(conn.out, DONTWAIT)
                conn.out = conn.out[sent:]
            except (BlockingIOError, InterruptedError):
                time.sleep(0.01)
            except OSError:
                return


# ---------------------------------------------------------------------------
# Client commands (OTP epmd_cli.c)
# ---------------------------------------------------------------------------


def conn_to_epmd(port, silent=False):
    """Connect to the local epmd on *port*: ``::1`` first, then 127.0.0.1.

    Returns the socket, or None after printing ``epmd: Cannot connect to
    local epmd`` on stderr (nothing when *silent*).
    Source: OTP epmd_cli.c, conn_to_epmd.
    """
    for family, addr in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.connect((addr, port))
            return sock
        except OSError:
            sock.close()
    if not silent:
        sys.stderr.write("epmd: Cannot connect to local epmd\n")
        sys.stderr.flush()
    return None


def read_fill(sock, n):
    """Read exactly *n* bytes; return them, b"" on EOF before that, or None
    on a read error.  Source: OTP epmd_cli.c, read_fill."""
    got = b""
    while len(got) < n:
        try:
            data = sock.recv(n - len(got))
        except OSError:
            return None
        if not data:
            return b""
        got += data
    return got


def _out(data):
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


def send_request(sock, payload):
    """Send *payload* with its u16 length; print OTP's error and return False
    if that fails."""
    try:
        sock.sendall(U16.pack(len(payload)) + payload)
        return True
    except OSError:
        _out(b"epmd: Can't write to epmd\n")
        return False


def epmd_call(port, what, silent=False):
    """-names (NAMES_REQ), -dump (DUMP_REQ) and -started (silent NAMES_REQ).

    Prints ``epmd: up and running on port P with data:`` and the reply as it
    comes, raw; returns 0, or 1 when epmd cannot be reached or answers with
    fewer than 4 bytes in its first read.  Source: OTP epmd_cli.c, epmd_call.
    """
    sock = conn_to_epmd(port, silent)
    if sock is None:
        return 1
    with sock:
        if not send_request(sock, bytes((what,))):
            return 1
        try:
            head = sock.recv(NAMES_HEADER_LEN)
        except OSError:
            head = b""
        if len(head) != NAMES_HEADER_LEN:
            if not silent:
                _out(b"epmd: no response from local epmd\n")
            return 1
        if not silent:
            _out(b"epmd: up and running on port %d with data:\n" % U32.unpack(head)[0])
        while True:
            try:
                data = sock.recv(CLIENT_READ_SIZE)
            except OSError:
                data = b""
            if not data:
                return 0
            if not silent:
                _out(data)


def _answer(data):
    """Print OTP's message for a short (b"") or failed (None) answer; return 1."""
    if data is None:
        _out(b"epmd: failed to read answer from local epmd\n")
    else:
        _out(b"epmd: local epmd responded with <>\n")
    return 1


def kill_epmd(port):
    """-kill: ``Killed`` (0), ``Killing not allowed - living nodes in
    database.`` (1), or OTP's message for no answer (1).
    Source: OTP epmd_cli.c, kill_epmd."""
    sock = conn_to_epmd(port)
    if sock is None:
        return 1
    with sock:
        if not send_request(sock, bytes((KILL_REQ,))):
            return 1
        data = read_fill(sock, len(KILL_OK))
        if not data:
            return _answer(data)
        if data == KILL_OK:
            _out(b"Killed\n")
            return 0
        _out(b"Killing not allowed - living nodes in database.\n")
        return 1


def stop_cli(port, name):
    """-stop NAME: print the 7-byte answer (``STOPPED`` or ``NOEXIST``), 0;
    ``epmd: Name too long!`` (no newline) for names over 1000 bytes, 1.
    Source: OTP epmd_cli.c, stop_cli."""
    if len(name) > CLIENT_MAX_STOP_NAME:
        _out(b"epmd: Name too long!")
        return 1
    sock = conn_to_epmd(port)
    if sock is None:
        return 1
    with sock:
        if not send_request(sock, bytes((STOP_REQ,)) + name):
            return 1
        data = read_fill(sock, len(STOP_OK))
        if not data:
            return _answer(data)
        _out(data + b"\n")
        return 0


# ---------------------------------------------------------------------------
# Command line (OTP epmd.c: main, usage, run_daemon)
# ---------------------------------------------------------------------------

USAGE = """\
usage: epmd [-d|-debug] [DbgExtra...] [-address List]
            [-port No] [-daemon] [-relaxed_command_check] [-systemd]
       epmd [-d|-debug] [-port No] [-names|-dump|-started|-kill|-stop Name]

epmd.py, the Erlang port mapper daemon; see epmd(1).

Daemon options
    -address List
        Listen on these IP addresses (separated by commas or spaces) and
        always on 127.0.0.1 and ::1 too.  Default: every address.
    -port No
        Listen on port No instead of %(port)d (also: ERL_EPMD_PORT).
    -d, -debug
        Log more to stderr, once per -d (levels 1 to 3).  Also shortens
        the list of remembered unregistered names to %(debug_unreg)d.
    -daemon
        Detach and run in the background, logging to syslog.
    -relaxed_command_check
        Let -kill stop the daemon while nodes are registered, and allow
        -stop (also: ERL_EPMD_RELAXED_COMMAND_CHECK set to anything).
    -systemd
        Serve the sockets passed by systemd socket activation.

DbgExtra options
    -packet_timeout Seconds
        Close a connection that sends no complete request for this long
        (default %(timeout)d).
    -delay_accept Seconds
        Sleep this long after every wake-up (simulates a busy daemon).
    -delay_write Seconds
        Sleep this long before every reply write (simulates a busy daemon).

Client options (talk to the epmd on -port)
    -names
        List the names registered with the running epmd.
    -dump
        List registered and remembered names, with descriptors.
    -started
        Exit 0 if an epmd is running, 1 if not; print nothing.
    -kill
        Stop the running epmd (refused while nodes are registered, unless
        it runs with -relaxed_command_check).
    -stop Name
        Unregister Name by force (only with -relaxed_command_check).
"""

# Flags: name -> (option key, takes a value).  Read by usage tests and the man page test.
DAEMON_FLAGS = {
    "-d": ("debug", False),
    "-debug": ("debug", False),
    "-address": ("address", True),
    "-port": ("port", True),
    "-daemon": ("daemon", False),
    "-relaxed_command_check": ("relaxed", False),
    "-systemd": ("systemd", False),
    "-packet_timeout": ("packet_timeout", True),
    "-delay_accept": ("delay_accept", True),
    "-delay_write": ("delay_write", True),
}
CLIENT_FLAGS = {
    "-names": ("names", False),
    "-dump": ("dump", False),
    "-started": ("started", False),
    "-kill": ("kill", False),
    "-stop": ("stop", True),
}
ALL_FLAGS = dict(DAEMON_FLAGS, **CLIENT_FLAGS)


class UsageError(Exception):
    """A bad command line: the message, then the usage text, exit 1."""


def parse_port(value, source):
    """Return *value* as a TCP port 1..65535 or raise UsageError naming
    *source* (D7: OTP takes atoi() of anything, even 0 or 70000)."""
    try:
        port = int(value, 10)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise UsageError("invalid port %s: %r (expected 1..65535)" % (source, value))
    return port


def parse_seconds(flag, value):
    """Return *value* as a whole number of seconds >= 1 or raise UsageError."""
    try:
        secs = int(value, 10)
    except (TypeError, ValueError):
        secs = 0
    if secs < 1:
        raise UsageError("invalid value for %s: %r (expected whole seconds >= 1)" % (flag, value))
    return secs


def parse_args(argv, environ):
    """Parse the command line *argv* (without the program name).

    Returns a dict of options: port, address, debug, daemon, relaxed,
    systemd, packet_timeout, delay_accept, delay_write, and action (None,
    "names", "dump", "started", "kill" or "stop") with stop_name (bytes).
    Environment first (ERL_EPMD_PORT, ERL_EPMD_ADDRESS,
    ERL_EPMD_RELAXED_COMMAND_CHECK), flags override it.  D11: client
    actions may stand anywhere.  Raises UsageError.
    Source: OTP epmd.c, main.
    """
    opts = {
        "port": EPMD_PORT_NO, "address": environ.get("ERL_EPMD_ADDRESS"), "debug": 0,
        "daemon": False, "relaxed": "ERL_EPMD_RELAXED_COMMAND_CHECK" in environ,
        "systemd": False, "packet_timeout": CLOSE_TIMEOUT, "delay_accept": 0,
        "delay_write": 0, "action": None, "stop_name": None, "port_given": False,
    }
    env_port = environ.get("ERL_EPMD_PORT")
    i = 0
    while i < len(argv):
        arg = argv[i]
        spec = ALL_FLAGS.get(arg)
        if spec is None:
            raise UsageError("unknown option %r" % arg)
        key, takes_value = spec
        value = None
        if takes_value:
            if i + 1 >= len(argv):
                raise UsageError("%s needs a value" % arg)
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "debug":
            opts["debug"] += 1
        elif key == "port":
            opts["port"] = parse_port(value, "for -port")
            opts["port_given"] = True
        elif key == "address":
            opts["address"] = value
        elif key in ("packet_timeout", "delay_accept", "delay_write"):
            opts[key] = parse_seconds(arg, value)
        elif key in ("daemon", "relaxed", "systemd"):
            opts[key] = True
        else:
            if opts["action"] is not None:
                raise UsageError("only one of -names, -dump, -started, -kill, -stop may be given")
            opts["action"] = key
            if key == "stop":
                opts["stop_name"] = os.fsencode(value)
    if not opts["port_given"] and env_port is not None:
        opts["port"] = parse_port(env_port, "in ERL_EPMD_PORT")
    return opts


def usage(msg=None):
    """Print *msg* (if any) and the usage text on stderr; return 1."""
    if msg:
        sys.stderr.write("epmd: %s\n" % msg)
    sys.stderr.write(USAGE % {"port": EPMD_PORT_NO, "debug_unreg": DEBUG_MAX_UNREG_COUNT,
                              "timeout": CLOSE_TIMEOUT})
    sys.stderr.flush()
    return 1


def make_daemon(opts):
    """Build the Epmd of the parsed options *opts*."""
    return Epmd(port=opts["port"], addresses=opts["address"],
                relaxed=opts["relaxed"], packet_timeout=opts["packet_timeout"],
                delay_accept=opts["delay_accept"], delay_write=opts["delay_write"],
                systemd=opts["systemd"], log=DebugLog(opts["debug"], opts["daemon"]))


def _terminate(signum, frame):
    raise EpmdExit(0)


def serve(epmd, ready=None):
    """Bind, report readiness through *ready* (a callable taking an exit
    code and a message, for -daemon), then run; return the exit status.

    Port in use: exit 0, as OTP; D12: the "already running" line is printed
    at level 0 in the foreground (OTP prints it only with -d).
    """
    log = epmd.log
    log.dbg_printf(1, "epmd running - daemon = %d", int(log.is_daemon))
    try:
        epmd.bind()
    except AlreadyRunning as e:
        log.dbg_tty_printf(0, "%s", e)
        if ready:
            ready(0, "")
        return 0
    except StartupError as e:
        log.dbg_printf(0, "%s", e)
        if ready:
            ready(e.code, str(e))
        if epmd.systemd:
            sd_notify(SD_EXITED % e.code)
        return e.code
    if ready:
        ready(0, "")
    # A peer that goes away before its reply must not kill us (OTP's run()
    # ignores SIGPIPE too); SIGTERM and SIGINT end the loop cleanly, exit 0.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    code = 0
    try:
        code = epmd.run()
    finally:
        if epmd.systemd:
            sd_notify(SD_EXITED % code)
    return code


def run_daemon(epmd):
    """-daemon: detach, bind, and tell the waiting parent how binding went.

    Double fork with setsid() between, SIGHUP ignored, cwd "/", umask 0,
    standard streams on /dev/null, logging to syslog.  D5: the parent
    returns only once the daemon has bound its sockets: 0 when it serves
    (or another epmd holds the port, as OTP), 1 with the bind error on
    stderr.  Should the child fail in any other way before it is bound, the
    parent prints that error and returns 1; after binding, the traceback
    goes to the log.  Source: OTP epmd.c, run_daemon.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:  # the caller: wait for the verdict
        os.close(wfd)
        os.waitpid(pid, 0)
        chunks = []
        while True:
            data = os.read(rfd, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(rfd)
        verdict = b"".join(chunks)
        if not verdict:
            sys.stderr.write("epmd: the daemon exited before binding\n")
            return 1
        code, _, msg = verdict.partition(b" ")
        if msg:
            sys.stderr.write("epmd: %s\n" % msg.decode("utf-8", "replace"))
        return int(code)
    sent = []

    def ready(code, msg):
        os.write(wfd, ("%d %s" % (code, msg)).encode("utf-8", "replace"))
        os.close(wfd)
        sent.append(True)

    try:
        os.close(rfd)
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        os.umask(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        # nothing inherited stays open but the pipe to the waiting parent
        os.closerange(3, wfd)
        os.closerange(wfd + 1, MAX_INHERITED_FD)
        code = serve(epmd, ready)
        if not sent:
            os.close(wfd)
        os._exit(code)
    except BaseException as e:
        try:
            if sent:
                epmd.log.dbg_printf(0, "internal error: %s", traceback.format_exc().rstrip())
            else:
                ready(1, "internal error in the daemon before it served: %r" % (e,))
        finally:
            os._exit(1)


def main(argv=None):
    """Run epmd with *argv* (default: sys.argv[1:]); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        opts = parse_args(argv, os.environ)
    except UsageError as e:
        return usage(str(e))
    action = opts["action"]
    port = opts["port"]
    if action == "names":
        return epmd_call(port, NAMES_REQ)
    if action == "dump":
        return epmd_call(port, DUMP_REQ)
    if action == "started":
        return epmd_call(port, NAMES_REQ, silent=True)
    if action == "kill":
        return kill_epmd(port)
    if action == "stop":
        return stop_cli(port, opts["stop_name"])
    epmd = make_daemon(opts)
    if opts["daemon"]:
        return run_daemon(epmd)
    return serve(epmd)


def console_main():
    """Entry point of the ``epmd`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

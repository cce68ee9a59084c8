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
    debug output               open_syslog, DebugLog (dbg_printf,
                               dbg_tty_printf, dbg_perror of epmd.c;
                               dbg_print_buf), print_buf_hex
    packets                    verify_utf8, parse_alive2_req (the ALIVE2
                               checks of do_request), parse_port2_req,
                               pack_alive2_resp, pack_port2_resp
    node table                 Node, NodeTable (node_reg2, node_unreg,
                               node_unreg_sock, print_names, current_time),
                               bump_creation, get_creation
    connections                the states READING/REPLYING/KEPT/CLOSED,
                               Connection (the want/got framing of do_read),
                               conn_local_peer_check
    listening sockets          ListenAddress, parse_addresses,
                               open_listen_sockets (the part of run before
                               the loop), sock_diag_dump (the kernel's
                               filtered socket list), iter_proc_tcp_sockets
                               (the /proc/net/tcp{,6} reader, its fallback),
                               find_listeners, check_port_holders (who
                               holds a port in use), is_stored_name,
                               systemd_listen_sockets, systemd_port,
                               sd_notify
    hand-over                  re-exec on SIGUSR2 (D16): pack_state,
                               unpack_state, apply_records, take_handover;
                               open_image, check_image, start_trial,
                               trial_verdict, Trial (what a re-exec checks
                               first, the trial run while the loop serves);
                               node_json, conn_json (the records as text);
                               FdStore (systemd's fd store); the Handover
                               mixin of Epmd (packed_state, reexec,
                               restore_handover, fdstore_sync)
    diagnostics                sock_diag_find, socket_pids, HolderScan,
                               Diagnostics (the refusal lines, D25/D26)
    server                     in_order (the order of one wake-up's events),
                               Epmd: run, handle, check_timeouts, do_accept,
                               read_at_accept, conn_open, set_state,
                               epmd_conn_close, do_read, do_request and one
                               do_*_req method per request, reply, do_write,
                               epmd_cleanup_exit (epmd.c); its class
                               docstring indexes them
    client commands            conn_to_epmd, read_fill, epmd_call (-names,
                               -dump, -started), kill_epmd (-kill), stop_cli
                               (-stop), all of epmd_cli.c, each within a
                               time-out (run_timed, D29); epmd_status and
                               status_cli (-status, D27)
    command line               usage, parse_args, run_daemon (epmd.c), main

Our own names, without a C counterpart: Connection.take and set_state (the
state machine that C spreads over its connection fields), handle (the body
of run's loop for one connection), first_read (handle for a connection
accepted in this wake-up), read_at_accept (do_accept's first read at level
0, which answers a PORT_PLEASE2_REQ asked before without making a
Connection), drop (node_unreg_sock followed by
epmd_conn_close), clock (the monotonic clock for time-outs; C's
current_time reads the wall clock), internal_error (what handle does
when handling fails), and the D2 helpers shed_connection, pause_accept,
resume_accept and open_spare, in_order (the order in which run handles
one wake-up's events: registered nodes first, accepts last) and reclaim
(D28: an ALIVE2_REQ for a taken name reads the holder's connection first;
OTP's fix of the same race probes it with select()).

Debug levels (-d given N times), as OTP's epmd:

    0  always printed: malformed packets, refused requests, errors
    1  requests received and replies sent, registrations, time-outs
    2  connections opened and closed, and a hexdump of every packet read and
       written
    3  the clock on every read of it, and the node table after every change

In the foreground every line goes to stderr as ``epmd: <ctime>: <msg>\\r\\n``;
with -daemon, the dbg_printf and dbg_perror lines go to syslog, while the
dbg_tty_printf lines (most level-1 and level-2 traces) and the hexdumps are
dropped, as in OTP's daemon.

Performance notes.  Most of a request's cost is its system calls, so the
request path makes as few as it can:

  - a connection is read and answered straight after accept(), since its
    request has usually arrived with it; only a connection that must wait
    (for the rest of its request, to write its reply, or as a registered
    node) is registered with the selector;
  - accepted sockets stay blocking and every recv/send passes MSG_DONTWAIT,
    which spares the fcntl() of non-blocking mode; do_accept makes the
    plain C socket type, whose methods need no Python frames;
  - the last reply on a connection whose request came in one read is sent
    with MSG_MORE, so the FIN of the close that follows rides in the same
    segment (with unread input the close would be an RST);
  - the NAMES body is joined once per change of the node table, and each
    node's PORT2_RESP is packed on its first lookup;
  - log arguments are formatted only when the level prints them, and the
    hexdump paths are guarded by the level.

The rest is the interpreter's work, measured in instructions per
PORT_PLEASE2_REQ (tests/tools/profile_request.py --callgrind).  The most of it
goes where a running cluster asks most: at level 0, a PORT_PLEASE2_REQ
packet answered before for a node still registered, arriving whole in the
read after its accept, finds its reply in NodeTable.asked and is answered
and closed before it becomes a Connection (read_at_accept: 35,300 ->
21,500 instructions); the wire and the log are the same as on the general
path, which every other request takes.  On that path, what saved a
noticeable part is commented where it is done: a connection answered at
once kept out of the connection table (see the states), the clock read
only while something is timed (run), the peer check done when it matters
(Connection.local_peer), plain ints for socket flags.  The loop stays on
the selectors module: polling epoll directly would save another 5,700
instructions per request, at the price of the shape this file keeps.
One accept per wake-up, as OTP: accepting every connection that waits
(their number from TCP_INFO) saved 7% of the CPU at 32 clients but cost
17% more instructions per request one at a time.

Python 3.8 or newer runs this file; it must stay parseable by Python 3.6
and 3.7 all the same.  Python compiles a file whole before it runs its
first line, so the version check after the imports (MIN_PYTHON) can only
tell an older interpreter what is needed if that interpreter parses every
line: no syntax newer than 3.6's anywhere (no assignment expressions, no
positional-only parameters, no f-string "="); tests/test_cli.py compiles
the file with 3.6 and 3.7.  Python 2 cannot parse it, and its SyntaxError
shows that check's print() line, which names the version needed.

Where this file deliberately differs from OTP's daemon (the D numbers of
README.md's and epmd(1)'s table of differences), the code says so with a
"D<n>" comment.
"""

# What every action needs, client or daemon (`python3 -X importtime epmd.py
# -names` lists them).  Every other module (json, zlib, subprocess, ctypes,
# syslog, resource, ...) is imported in the function that uses it, so that a
# client command loads nothing of the daemon's, and the daemon nothing of
# -status, the hand-over, ctypes or json until it uses them.
import collections
import errno
import os
import selectors
import signal       # the daemon's; a client's 0.3 ms (socket imports its enum anyway)
import socket
import struct
import sys
import time

# The oldest Python this file runs on.  Python compiles the whole file before
# it runs its first line, so this check can only speak on an interpreter that
# parses every line of the file: 3.6 and 3.7 do (so nothing newer than 3.6's
# syntax may appear anywhere: no assignment expressions, no positional-only
# parameters, no f-string "="; tests/test_cli.py compiles the file with them),
# and stop here, before anything that fails on them at run time (namedtuple's
# defaults=).  Python 2 cannot parse the file: its SyntaxError shows the
# print() line below, which says what is needed.
MIN_PYTHON = (3, 8)
OLD_PYTHON_EXIT = 2
if sys.version_info < MIN_PYTHON:
    found = "Python %s (%s)" % (sys.version.split()[0], sys.executable)
    print("epmd.py needs Python 3.8 or later; found %s" % found, file=sys.stderr)
    sys.exit(OLD_PYTHON_EXIT)

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
REQUEST_TIME_CAP = 5                # D13: a request must be complete within
                                    # this many packet time-outs of its accept
# Why 5: a slow but active client is served as by OTP (its own suite sends a
# PORT_PLEASE2_REQ in four pieces one time-out apart: complete after 3
# time-outs), with two time-outs to spare for the whole-second clock and a
# loaded host; a trickle still leaves after at most 5 time-outs (5 minutes
# at the default 60 s; OTP serves it for ever).
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
# The selector's events, as module globals: one name look-up, not two, on
# the request path.
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

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
SD_RELOADING = "RELOADING=1\nSTATUS=Handing over to a new image...\nMONOTONIC_USEC=%d"

# ---------------------------------------------------------------------------
# Debug output (OTP epmd.c: dbg_printf, dbg_tty_printf, dbg_perror;
# epmd_srv.c: dbg_print_buf, print_buf_hex)
# ---------------------------------------------------------------------------


def format_exc():
    """The traceback of the exception being handled, as text without the
    last newline.  traceback is imported here, on the error path: importing
    it costs every start-up 3 ms (it pulls in linecache and tokenize)."""
    import traceback
    return traceback.format_exc().rstrip()


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


SYSLOG_IDENT = "epmd"


def open_syslog():
    """Open syslog for the daemon's log and return the syslog module: tag
    ``epmd``, no PID, facility user, as OTP's daemon logs (it never calls
    openlog(), so glibc tags its lines with the program name, ``epmd``).
    Without this, Python tags lines with the script's name, ``epmd.py``.
    """
    import syslog
    syslog.openlog(SYSLOG_IDENT, 0, syslog.LOG_USER)
    return syslog


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
                    self.syslog = open_syslog()
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
        The wording is "got" for written data too, as in OTP.  D24: callers
        pass the bytes just read, so a packet that arrives in pieces is
        dumped piece by piece; OTP passes the start of its input buffer
        with the length just read, so it dumps the packet's first bytes again.
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


# NodeTable.changes: what a change did.
REG, UNREG = "reg", "unreg"


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
    ``since`` is when it registered (Unix time, seconds) and ``holder``
    who holds it (D25, Diagnostics): None, (conn, HolderScan) while that is
    searched, or (conn, the verdict: a str) once found; the table drops it
    when the node leaves.
    """

    __slots__ = ("name", "fd", "port", "nodetype", "protocol", "highvsn", "lowvsn",
                 "extra", "cr_counter", "conn", "resp", "since", "holder")

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
        self.since = 0.0            # Unix time of the registration (D25)
        self.holder = None          # (conn, HolderScan or verdict str): who holds it (D25)

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
    (``names``), each node's PORT2_RESP (``Node.resp``) and ``asked``, the
    PORT2_RESP of each PORT_PLEASE2_REQ packet (u16 L and payload) already
    answered for a registered node (a name with and without the trailing
    NUL: at most two entries per node; emptied whenever a node leaves),
    which Epmd.read_at_accept answers from.  A name seen before
    gets its old creation counter + 1 when it registers again.  D6: the
    unreg list never holds more than ``max_unreg + 1`` entries, the size at
    which OTP starts recycling its oldest entry for new names; OTP lets it
    grow without bound.  *clock* returns Unix time in seconds.

    ``changes`` is None, or (while systemd's fd store is used) the list of
    changes since the store last took them (Epmd.fdstore_sync), each
    (REG, node, conn, dropped) or (UNREG, node, conn, dropped): the node,
    the connection that held it, and the names that change dropped from
    the unreg list (a name registered again, the oldest entry stolen or
    cut by D6), so the store can keep its state by appending records.
    """

    __slots__ = ("reg", "unreg", "max_unreg", "log", "clock", "names", "changes", "asked")

    def __init__(self, log, max_unreg=MAX_UNREG_COUNT, clock=time.time):
        self.names = None           # the NAMES_RESP lines, joined, until the next change
        self.changes = None         # [(REG or UNREG, node, conn, dropped names)] for the fd store
        self.asked = {}             # PORT_PLEASE2_REQ packet -> PORT2_RESP
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
        if self.refused(req):
            return None
        node, dropped = self.slot_for(name)
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
        node.since = self.clock()
        self.reg[name] = node
        self.names = None
        if self.changes is not None:
            self.changes.append((REG, node, conn, dropped))
        if log.level:               # the lines' arguments cost more than the test
            log.dbg_tty_printf(1, "registering '%s:%d', port %d", name, node.creation, node.port)
            if req.highvsn != 0:
                log.dbg_tty_printf(1, "type %d proto %d highvsn %d lowvsn %d",
                                   req.nodetype, req.protocol, req.highvsn, req.lowvsn)
            self.print_names()
        return node

    def refused(self, req):
        """node_reg2's checks, in OTP's order: True (the reason logged at
        level 0) when *req* cannot be registered."""
        log = self.log
        name = req.name
        nlen = len(name)
        nchars = verify_utf8(name) if nlen <= MAXSYMLEN else 0
        if nlen > MAXSYMLEN or nchars > MAX_NAME_CHARS:
            log.dbg_printf(0, "node name is too long (%d) %s", nlen, name)
        elif nchars < 0:
            log.dbg_printf(0, "invalid node name encoding")
        elif len(req.extra) > MAXSYMLEN:
            log.dbg_printf(0, "extra data is too long (%d) %s", len(req.extra),
                           req.extra.split(b"\0", 1)[0])
        elif nlen == 0:  # D10: OTP registers "" and can never find it again
            log.dbg_printf(0, "node name is empty in ALIVE2_REQ")
        elif name in self.reg:
            log.dbg_printf(0, "node name already occupied %s", name)
        else:
            return False
        return True

    def slot_for(self, name):
        """node_reg2's choice of a Node for *name*: its entry on the unreg
        list (counter bumped), else the oldest entry when the list is full
        (OTP's steal), else a new one from the clock.  Returns (node, the
        name taken off the unreg list or None)."""
        node = self.unreg.pop(name, None)
        if node is not None:
            self.log.dbg_tty_printf(1, "reusing slot with same name '%s'", name)
            node.cr_counter = bump_creation(node.cr_counter)
            return node, name
        if len(self.unreg) > self.max_unreg:
            dropped = next(iter(self.unreg))
            node = self.unreg.pop(dropped)
            node.name = name
            return node, dropped
        return Node(name, bump_creation(int(self.current_time()) & CREATION_MASK)), None

    def current_time(self):
        """Return the clock (seconds), logged at level 3.  Source: current_time."""
        t = self.clock()
        self.log.dbg_printf(3, "time in seconds: %d", t)
        return t

    def _unreg(self, node):
        log = self.log
        if log.level:               # the line's arguments cost more than the test
            log.dbg_tty_printf(1, "unregistering '%s:%d', port %d",
                               node.name, node.creation, node.port)
        del self.reg[node.name]
        self.names = None
        conn = node.conn
        if conn is not None:
            conn.node = None
        node.conn = None
        node.resp = None
        node.holder = None          # nothing of a search outlives the registration
        self.asked.clear()
        unreg = self.unreg
        unreg[node.name] = node
        dropped = None
        if len(unreg) > self.max_unreg + 1:  # D6
            dropped = next(iter(unreg))
            del unreg[dropped]
        if self.changes is not None:
            self.changes.append((UNREG, node, conn, dropped))
        if log.level >= 3:
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

    def node_restore(self, node, conn):
        """Put *node*, handed over by the previous image (see Hand-over), back
        in the table: registered, linked both ways to *conn*, or with *conn*
        None on the unreg list (appended: the oldest comes first)."""
        if conn is None:
            self.unreg[node.name] = node
            return
        node.conn = conn
        conn.node = node
        self.reg[node.name] = node
        self.names = None

    def port2_resp(self, name, payload=None):
        """Return the PORT2_RESP for *name*, or None when it is not
        registered; made once per registration and cached on its Node, and
        in ``asked`` under the packet of *payload*, the PORT_PLEASE2_REQ
        that asked (its u16 length L, then the payload)."""
        node = self.reg.get(name)
        if node is None:
            return None
        resp = node.resp
        if resp is None:
            resp = node.resp = pack_port2_resp(node)
        if payload is not None:
            self.asked[U16.pack(len(payload)) + payload] = resp
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
# it two table entries and a clock read, 6% of a PORT_PLEASE2_REQ.  At level
# 0, a PORT_PLEASE2_REQ answered before is answered without even becoming a
# Connection (Epmd.read_at_accept).
READING, REPLYING, KEPT, CLOSED = "reading", "replying", "kept", "closed"


class Connection:
    """One accepted TCP connection: its state, input buffer and output.

    ``state`` is one of READING, REPLYING, KEPT, CLOSED (see the table
    above), changed only by Epmd.set_state.  ``buf`` holds the bytes of the
    packet read so far (at most INBUF_SIZE), ``want`` the packet's total
    size with its HEADER_LEN-byte header once known (0 before).  ``mod_time``
    is the last activity: the accept (its first wait, in the wake-up of the
    accept), every read that brought bytes, then the start of the reply (as
    OTP's); ``start_time`` the accept, from which the whole request must
    arrive within REQUEST_TIME_CAP packet time-outs (D13; both in integer
    seconds of the monotonic clock).  ``node`` is the Node this connection
    registered, set and cleared by NodeTable only.  ``out`` holds reply
    bytes the socket could not take yet.  ``one_read`` is true when the
    request arrived in one read, so that read left nothing unread.
    ``events`` are the selector events it is registered for (0: not
    registered).  ``peer`` is the address accept() returned (or None), and
    ``local`` the verdict of conn_local_peer_check, None until local_peer
    first asks for it.
    """

    __slots__ = ("sock", "fd", "local", "peer", "state", "want", "buf", "mod_time", "start_time",
                 "node", "out", "events", "one_read")

    def __init__(self, sock, fd, local_peer, now, peer=None):
        self.sock = sock
        self.fd = fd
        self.local = local_peer
        self.peer = peer
        self.state = READING
        self.want = 0
        self.buf = b""
        self.mod_time = now
        self.start_time = now       # D13: the request's total time counts from here
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
            return EVENT_WRITE
        return EVENT_READ | (EVENT_WRITE if self.out else 0)

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


MAPPED_LOOPBACK = "::ffff:127."      # D19: IPv4-mapped 127.0.0.0/8
LOOPBACK_PREFIXES = ("127.", MAPPED_LOOPBACK)   # 127.0.0.0/8, plain or IPv4-mapped


def conn_local_peer_check(sock, peer=None, family=None):
    """Decide whether the peer of *sock* is on this host.

    *peer* is the address accept() returned (else getpeername() is asked),
    *family* the socket's address family (else the socket is asked).
    Local: IPv6 ``::1``; IPv4 127.0.0.0/8, also as an IPv4-mapped IPv6
    address (``::ffff:127.x.y.z``, how IPv4 peers arrive on a dual-stack
    socket such as Debian's epmd.socket; D19: OTP compares a mapped
    address only with the socket's own); or a peer address equal to the
    socket's own address, same family (the host talking to itself over a
    non-loopback address).  Anything else, or an error, is remote.
    Source: OTP epmd_srv.c, conn_local_peer_check.
    """
    try:
        if not peer:
            peer = sock.getpeername()
        host = peer[0]
        # Loopback first, whatever the family: an IPv4 address never has a
        # colon and an IPv6 one never a dot before its first colon, so
        # neither matches the other's prefixes.
        if host.startswith(LOOPBACK_PREFIXES) or host == "::1":
            return True
        if family is None:
            family = sock.family
        if family != socket.AF_INET and family != socket.AF_INET6:
            return False
        return host == sock.getsockname()[0]
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
    """The port is taken (EADDRINUSE) and every holder answers a NAMES_REQ
    as an epmd: exit 0, as OTP (D12, D18).

    The message names the port and the address."""


ListenAddress = collections.namedtuple("ListenAddress", "family address implicit",
                                       defaults=(False,))
ListenAddress.__doc__ = """One address to listen on: (family, address, implicit).

*address* is the text as listed; *implicit* is True for a loopback address
epmd adds on its own to an -address list (127.0.0.1, ::1); a listed loopback
address is not implicit.  Built by parse_addresses."""


LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
# errno values of a bind that means "this host has no such address or stack"
NO_SUCH_ADDRESS = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


def parse_listed(tokens):
    """parse_addresses' reading of each address *token*: a list of (family,
    canonical text, token).  Raises StartupError for one that is not IPv6
    or IPv4 literal text, or (D18) listed twice or covered by a listed
    wildcard of its family."""
    listed = []
    for tok in tokens:
        for family in (socket.AF_INET6, socket.AF_INET):
            try:
                packed = socket.inet_pton(family, tok)
            except (OSError, ValueError):
                continue
            break
        else:
            raise StartupError('cannot parse IP address "%s"' % tok)
        canon = socket.inet_ntop(family, packed)
        for fam, other, otok in listed:
            if fam == family and (other == canon or WILDCARD[family] in (other, canon)):
                raise StartupError('IP address "%s" is listed twice (as "%s")' % (tok, otok)
                                   if other == canon else
                                   'IP address "%s" overlaps "%s"' % (tok, otok))
        listed.append((family, canon, tok))
    return listed


def parse_addresses(spec):
    """Return the ListenAddress entries to listen on for -address *spec*.

    *spec* is a list of IPv4/IPv6 addresses separated by commas and/or
    spaces.  None, or a string of separators only, means every address:
    ``0.0.0.0`` and ``::`` (not implicit).  Otherwise 127.0.0.1 and ::1
    come first (listed or implicit), then each other listed address in
    order; 127.0.0.1 is implicit (added) when neither it nor 0.0.0.0 is
    listed, ::1 when neither it nor :: is listed.  D17: OTP 25 always adds
    both, so that a listed wildcard collides with them and it exits 0
    serving nothing; this is the rule of erts 15.2.7.12 / OTP 27.3.4.16 and
    later (erlang/otp PR 11409).
    Raises StartupError for an address that is not IPv6 or IPv4 literal
    text, for more than MAX_LISTEN_SOCKETS sockets in all, and (D18) for an
    address listed twice or covered by a listed wildcard of its family,
    which OTP reports as "already running".
    Source: OTP epmd_srv.c, run.
    """
    tokens = [t for t in (spec or "").replace(",", " ").split(" ") if t]
    if not tokens:
        return [ListenAddress(socket.AF_INET, WILDCARD[socket.AF_INET]),
                ListenAddress(socket.AF_INET6, WILDCARD[socket.AF_INET6])]
    listed = parse_listed(tokens)       # (family, canonical text, token)
    # as OTP 25: two loopback sockets and at most 13 other addresses
    others = sum(1 for f, c, _ in listed if c != LOOPBACK[f])
    if others > MAX_LISTEN_SOCKETS - 3:
        raise StartupError("cannot listen on more than %d IP addresses" % MAX_LISTEN_SOCKETS)
    # OTP 25's order: the loopback sockets (implicit or listed) first
    result = []
    for family in (socket.AF_INET, socket.AF_INET6):
        mine = [tok for f, c, tok in listed if f == family and c == LOOPBACK[family]]
        if mine:
            result.append(ListenAddress(family, mine[0]))
        elif not any(f == family and c == WILDCARD[family] for f, c, _ in listed):  # D17
            result.append(ListenAddress(family, LOOPBACK[family], True))
    result.extend(ListenAddress(f, tok) for f, c, tok in listed if c != LOOPBACK[f])
    return result


def open_listen_socket(family, addr, implicit, port, log, socks):
    """open_listen_sockets' socket for one address: bound and listening, or
    None for a loopback address this host lacks (logged); *socks* are the
    ones opened before (ours, when the port turns out to be in use)."""
    optional = implicit or addr == LOOPBACK.get(family)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        if e.errno in NO_SUCH_ADDRESS:
            log.dbg_printf(0, "skipping ipaddr %s: %s", addr, e.strerror)
            return None
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
            # D18: only an epmd on the port is "already running"
            check_port_holders(family, addr, port, socks)
        msg = "failed to bind on ipaddr %s: %s" % (addr, e.strerror)
        if not (optional and e.errno in NO_SUCH_ADDRESS):
            raise StartupError(msg) from e
        log.dbg_printf(0, "%s", msg)     # as OTP's line; the start goes on
        return None
    try:
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise StartupError("failed to listen on ipaddr %s: %s" % (addr, e.strerror)) from e
    return sock


def open_listen_sockets(addresses, port, log):
    """Bind and listen on each ListenAddress of *addresses* at *port*.

    Sets SO_REUSEADDR, IPV6_V6ONLY on IPv6 and non-blocking mode; listens
    with the system's SOMAXCONN.  A loopback address (implicit or listed)
    that this host lacks, or whose family it lacks, is skipped with a
    level-0 log line; any other address that cannot be bound stops the
    start.  An address in use is never skipped: see check_port_holders.
    Returns the listening sockets.  Raises AlreadyRunning when an epmd holds
    the port, StartupError on any other failure.  Source: OTP epmd_srv.c, run.
    """
    socks = []
    try:
        for family, addr, implicit in addresses:
            sock = open_listen_socket(family, addr, implicit, port, log, socks)
            if sock is not None:
                socks.append(sock)
        if not socks:
            raise StartupError("unable to bind any address")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# -- who holds the port (D18) -------------------------------------------------

# sock_diag (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300                  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_HDR = struct.Struct("=IHHII")             # len type flags seq pid
NLMSG_ERRNO = struct.Struct("=i")               # after the header of NLMSG_ERROR: -errno
NLA_HDR = struct.Struct("=HH")                  # nlattr: len type
NLA_ALIGN = 4
INET_DIAG_REQ_V2 = struct.Struct("=BBBxI")      # family protocol ext pad states
INET_DIAG_SOCKID = struct.Struct(">HH16s16s")   # sport dport src dst (network order)
INET_DIAG_SOCKID_TAIL = struct.Struct("=III")   # if, cookie[2] (host order)
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
INET_DIAG_MSG_HEAD = struct.Struct("=BBBB")     # family state timer retrans
INET_DIAG_MSG_QUEUES = struct.Struct("=IIIII")  # expires rqueue wqueue uid inode, at offset 52
INET_DIAG_MSG_QUEUES_OFFSET = INET_DIAG_MSG_HEAD.size + INET_DIAG_SOCKID.size + INET_DIAG_SOCKID_TAIL.size
INET_DIAG_MSG_UID_INODE = struct.Struct("=II")  # uid inode, at offset 64 of inet_diag_msg
INET_DIAG_MSG_UID_OFFSET = 4 + INET_DIAG_SOCKID.size + INET_DIAG_SOCKID_TAIL.size + 12
INET_DIAG_REQ_BYTECODE = 1          # the nlattr type of a filter program
INET_DIAG_BC_OP = struct.Struct("=BBH")         # code yes no (host order)
INET_DIAG_BC_S_GE = 2               # source (local) port >= the next op's "no"
INET_DIAG_BC_S_LE = 3               # source (local) port <= the next op's "no"
NETLINK_READ_SIZE = 8192
NETLINK_DUMP_READ_SIZE = 65536
SOCK_DIAG_TIMEOUT = 1.0             # seconds a dump may take before we fall back to /proc

PROC_NET_TCP = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
TCP_LISTEN = 0x0A                   # the "st" column of a listening socket
TCP_ESTABLISHED = 0x01
PROC_TCP_FIELDS = 10                # sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
SOCKET_LINK = "socket:[%d]"         # readlink of /proc/<pid>/fd/<n> for a socket
IN4_WORD = struct.Struct("=I")      # /proc/net/tcp prints addresses as host-order words
PROBE_TIMEOUT = 2.0                 # seconds the holders have to show up and answer NAMES_REQ
PROBE_MIN = 0.5                     # ... at least this long for the answers (2.5 s in all)
MAX_PROBE_REPLY = 1 << 22           # bytes of a NAMES reply read while probing
PROBE_RETRY = 0.05                  # seconds between looks for a listening holder


def _proc_addr(family, hexaddr):
    """Decode an address of /proc/net/tcp{,6}: 8 or 32 hex digits, one group
    of 8 per 32-bit word, each word printed in host byte order."""
    words = [int(hexaddr[i:i + 8], 16) for i in range(0, len(hexaddr), 8)]
    return socket.inet_ntop(family, b"".join(IN4_WORD.pack(w) for w in words))


def iter_proc_tcp_sockets(families=(socket.AF_INET, socket.AF_INET6)):
    """Yield the TCP sockets of this network namespace, as Linux lists them
    in /proc/net/tcp and /proc/net/tcp6, one tuple per socket:

        (family, local address, local port, remote address, remote port,
         state, uid, inode)

    Addresses are text (``127.0.0.1``, ``::1``); *state* is the kernel's TCP
    state number (TCP_LISTEN = 0x0A, TCP_ESTABLISHED = 1); *uid* the owner
    of the socket; *inode* the number that /proc/<pid>/fd links name as
    ``socket:[inode]`` (0 for sockets no process holds, e.g. TIME_WAIT).  A
    file that is missing or unreadable yields nothing (never an error).
    Lines are read as they come, so a caller may stop at any time.
    Source: the Linux kernel, net/ipv4/tcp_ipv4.c (get_tcp4_sock) and
    net/ipv6/tcp_ipv6.c (get_tcp6_sock).
    """
    for family in families:
        try:
            f = open(PROC_NET_TCP[family], "r", encoding="ascii", errors="replace")
        except (OSError, KeyError):
            continue
        with f:
            try:
                next(f)                 # the header line
                for line in f:
                    fields = line.split()
                    if len(fields) < PROC_TCP_FIELDS:
                        continue
                    try:
                        laddr, lport = fields[1].split(":")
                        raddr, rport = fields[2].split(":")
                        yield (family, _proc_addr(family, laddr), int(lport, 16),
                               _proc_addr(family, raddr), int(rport, 16), int(fields[3], 16),
                               int(fields[7]), int(fields[9]))
                    except (ValueError, OSError):
                        continue
            except (OSError, StopIteration):
                continue


def proc_tcp_sockets(families=(socket.AF_INET, socket.AF_INET6)):
    """Return the list of iter_proc_tcp_sockets(*families*)."""
    return list(iter_proc_tcp_sockets(families))


def sock_diag_port_filter(port):
    """The inet_diag bytecode that keeps the sockets whose own port is
    *port*: ``S_GE port`` then ``S_LE port``, each an op (u8 code, u8 yes,
    u16 no) followed by an op whose u16 "no" holds the port.  "yes" goes to
    the next test; "no" jumps 4 bytes past the end, which rejects.
    Source: linux/inet_diag.h; net/ipv4/inet_diag.c, inet_diag_bc_run."""
    op = INET_DIAG_BC_OP.size
    return (INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_GE, 2 * op, 4 * op + NLA_ALIGN)
            + INET_DIAG_BC_OP.pack(0, 0, port)
            + INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_LE, 2 * op, 2 * op + NLA_ALIGN)
            + INET_DIAG_BC_OP.pack(0, 0, port))


def sock_diag_dump_request(family, states, port=None):
    """The netlink message of sock_diag_dump (see there) for *family*,
    *states* and, if not None, *port*."""
    body = (INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, states)
            + INET_DIAG_SOCKID.pack(0, 0, b"", b"")
            + INET_DIAG_SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    if port is not None:
        bc = sock_diag_port_filter(port)
        body += NLA_HDR.pack(NLA_HDR.size + len(bc), INET_DIAG_REQ_BYTECODE) + bc
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body


def diag_row(data, start, addr_len):
    """sock_diag_dump's tuple for the inet_diag_msg at *start* of *data*
    (addresses of *addr_len* bytes)."""
    fam, state, _, _ = INET_DIAG_MSG_HEAD.unpack_from(data, start)
    sport, dport, src, dst = INET_DIAG_SOCKID.unpack_from(data, start + INET_DIAG_MSG_HEAD.size)
    _, rq, wq, uid, inode = INET_DIAG_MSG_QUEUES.unpack_from(data, start + INET_DIAG_MSG_QUEUES_OFFSET)
    return (fam, socket.inet_ntop(fam, src[:addr_len]), sport,
            socket.inet_ntop(fam, dst[:addr_len]), dport, state, uid, inode, rq, wq)


def sock_diag_dump(family, states, port=None, timeout=SOCK_DIAG_TIMEOUT):
    """Ask the kernel for the TCP sockets of *family* in this network
    namespace whose state is in *states* (a bit mask: 1 << TCP_LISTEN, ...)
    and, if *port* is given, whose own port is *port*: the kernel applies
    both filters, so the cost does not grow with the other sockets of the
    host (a dump of listening sockets walks only the listening hash).

    Request: nlmsghdr (SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP),
    inet_diag_req_v2 (u8 family, u8 protocol, u8 ext, pad, u32 states, a
    zero inet_diag_sockid), then for *port* an nlattr INET_DIAG_REQ_BYTECODE
    holding sock_diag_port_filter(port).  Reply: one inet_diag_msg per
    socket (u8 family, u8 state, u8 timer, u8 retrans, the sockid with be16
    sport, be16 dport, 16-byte src and dst, then u32 expires, rqueue,
    wqueue, uid, inode at offset 52), until NLMSG_DONE.

    Yields (family, local address, local port, remote address, remote port,
    state, uid, inode, rqueue, wqueue); for a listening socket rqueue is
    the number of connections waiting to be accepted, wqueue its backlog.
    Raises OSError where netlink or sock_diag is not available or not
    allowed (not Linux, a seccomp or LSM policy, no inet_diag module) or
    the kernel refuses the request; socket.timeout after *timeout* seconds.
    Source: linux/inet_diag.h; net/ipv4/inet_diag.c, inet_diag_dump_icsk.
    """
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        raise OSError(errno.EAFNOSUPPORT, "no netlink sockets here")
    addr_len = 4 if family == socket.AF_INET else 16
    with socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout)
        nl.sendto(sock_diag_dump_request(family, states, port), (0, 0))
        while True:
            data = nl.recv(NETLINK_DUMP_READ_SIZE)
            if not data:
                return
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, mtype, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
                if length < NLMSG_HDR.size:
                    return
                start = offset + NLMSG_HDR.size
                offset += (length + NLA_ALIGN - 1) & ~(NLA_ALIGN - 1)
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = -NLMSG_ERRNO.unpack_from(data, start)[0]
                    raise OSError(err, "sock_diag: %s" % os.strerror(err))
                if mtype != SOCK_DIAG_BY_FAMILY or length < NLMSG_HDR.size + INET_DIAG_MSG_UID_OFFSET + 8:
                    continue
                yield diag_row(data, start, addr_len)


Listener = collections.namedtuple("Listener", "family address port uid inode queued backlog")
Listener.__doc__ = """A listening TCP socket: *queued* connections wait to
be accepted (None when read from /proc/net/tcp, which does not say),
*backlog* is its listen() backlog (None likewise)."""


def find_listeners(ports, families=(socket.AF_INET, socket.AF_INET6)):
    """Return (listeners, source): the TCP sockets of this network namespace
    listening on any of *ports* (an iterable of ints), as Listener tuples,
    and where they were read: "sock_diag", or "/proc/net/tcp" where netlink
    is not allowed; (None, None) when neither can be read (not Linux, or
    /proc hidden and netlink refused).

    sock_diag_dump asks the kernel for the listening sockets only (with a
    port filter when one port is asked), so an established connection of
    the host costs nothing; /proc/net/tcp{,6} lists every socket and is
    read whole.  A socket bound but not listening is in neither.
    """
    ports = set(ports)
    found = []
    try:
        for family in families:
            only = next(iter(ports)) if len(ports) == 1 else None
            for e in sock_diag_dump(family, 1 << TCP_LISTEN, only):
                if e[2] in ports:
                    found.append(Listener(e[0], e[1], e[2], e[6], e[7], e[8], e[9]))
        return found, "sock_diag"
    except OSError:
        pass
    if not any(os.access(PROC_NET_TCP[f], os.R_OK) for f in families):
        return None, None
    found = [Listener(family, laddr, lport, uid, inode, None, None)
             for family, laddr, lport, _, _, state, uid, inode in iter_proc_tcp_sockets(families)
             if state == TCP_LISTEN and lport in ports]
    return found, "/proc/net/tcp"


def proc_net_listeners(port):
    """Return the TCP sockets listening on *port* in this network namespace,
    as (family, address, uid, inode) tuples, from find_listeners (sock_diag,
    else /proc/net/tcp{,6}); None when neither can be read (other systems,
    or /proc hidden and netlink refused).  A socket bound but not listening
    is not among them."""
    listeners, _ = find_listeners((port,))
    if listeners is None:
        return None
    return [(ls.family, ls.address, ls.uid, ls.inode) for ls in listeners]


def _v4_of(family, addr):
    """The IPv4 text of an IPv4 or IPv4-mapped IPv6 address, else None."""
    if family == socket.AF_INET:
        return addr
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return None


def conflicts(family, addr, hfamily, haddr):
    """True if a socket bound to (*hfamily*, *haddr*) can keep us (IPv6
    sockets being IPv6-only) from binding (*family*, *addr*) on the same
    port: the same family and the same address or a wildcard on either
    side, or for IPv4 an IPv6 wildcard or mapped address (a dual-stack
    socket, which /proc cannot tell from an IPv6-only one)."""
    if hfamily == family:
        return WILDCARD[family] in (addr, haddr) or addr == haddr
    if family == socket.AF_INET:
        v4 = _v4_of(hfamily, haddr)
        if haddr == WILDCARD[hfamily]:
            return True
        return v4 is not None and (v4 == addr or WILDCARD[family] in (v4, addr))
    return False


def answers_as_epmd(family, addr, port, timeout=PROBE_TIMEOUT):
    """Send NAMES_REQ to (*addr*, *port*); True if the reply is an epmd's.

    An epmd's reply is the u32 port (ours, or 4369: OTP's -systemd reports
    it whatever the port) and ``name N at port P\\n`` lines, then EOF, all
    within *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((addr, port))
            s.sendall(U16.pack(1) + bytes((NAMES_REQ,)))
            data = b""
            while len(data) <= MAX_PROBE_REPLY:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return is_names_reply(data, port)


def is_names_reply(data, port):
    """True if *data* is an epmd's whole answer to NAMES_REQ on *port*: the
    u32 port (ours, or 4369: OTP's -systemd reports it whatever the port),
    then ``name N at port P\\n`` lines (the last one may be cut where
    MAX_PROBE_REPLY bytes were read)."""
    if len(data) < NAMES_HEADER_LEN or U32.unpack_from(data)[0] not in (port, EPMD_PORT_NO):
        return False
    lines = data[NAMES_HEADER_LEN:].split(b"\n")
    if len(data) <= MAX_PROBE_REPLY and lines[-1]:
        return False                    # the reply ended inside a line
    return all(line.startswith(b"name ") and b" at port " in line for line in lines[:-1])


def port_holders(family, addr, port, ours, deadline):
    """check_port_holders' list of who holds the port: [(family, address,
    uid or None)] of the listening sockets on *port* whose address
    conflicts with (*family*, *addr*), but for our own sockets *ours*;
    looked for again until *deadline* (time.monotonic()) while there is
    none.  [(family, addr, None)] where no list can be read.  Raises
    StartupError when nothing listens by the deadline."""
    own = set()
    for s in ours:
        try:
            own.add(os.fstat(s.fileno()).st_ino)
        except OSError:
            pass
    while True:
        listeners = proc_net_listeners(port)
        if listeners is None:
            return [(family, addr, None)]
        holders = [(hf, ha, uid) for hf, ha, uid, inode in listeners
                   if inode not in own and conflicts(family, addr, hf, ha)]
        if holders:
            return holders
        if time.monotonic() >= deadline:
            raise StartupError("cannot listen on ipaddr %s port %d: in use by a socket that "
                               "does not listen" % (addr, port))
        time.sleep(PROBE_RETRY)


def check_port_holders(family, addr, port, ours=()):
    """EADDRINUSE on (*family*, *addr*, *port*): find who holds the port and
    raise AlreadyRunning if every holder answers as an epmd, StartupError
    naming the address, the port and the holder's uid otherwise.

    Holders are the listening sockets on *port* (proc_net_listeners:
    sock_diag, else /proc/net/tcp{,6}) whose address conflicts with ours,
    minus our own sockets *ours*.  When none is listed, they are asked
    again for up to PROBE_TIMEOUT seconds (another epmd may be between its
    bind and its listen); then the port is held by a socket that does not
    listen.  Where neither can be read, our address itself is asked.  A
    wildcard holder is asked on our address (or, for a wildcard, on the
    loopback address of our family).  Each address is asked once, however
    many sockets listen on it (SO_REUSEPORT), and all of it runs under one
    deadline: PROBE_TIMEOUT seconds from the start, and at least PROBE_MIN
    for the answers (at most 2.5 s in all).
    D18: OTP exits 0 whoever holds the port.
    """
    where = "ipaddr %s port %d" % (addr, port)
    deadline = time.monotonic() + PROBE_TIMEOUT
    holders = port_holders(family, addr, port, ours, deadline)
    deadline = max(deadline, time.monotonic() + PROBE_MIN)
    asked = {}                          # target address -> it answered as an epmd
    for hfamily, haddr, uid in holders:
        owner = "uid %d" % uid if uid is not None else "an unknown owner"
        shown = "[%s]:%d" % (haddr, port) if hfamily == socket.AF_INET6 else "%s:%d" % (haddr, port)
        v4 = _v4_of(hfamily, haddr)
        if haddr != WILDCARD[hfamily] and v4 != WILDCARD[socket.AF_INET]:
            target = (socket.AF_INET, v4) if v4 else (hfamily, haddr)
        elif addr != WILDCARD[family]:
            target = (family, addr)
        else:
            target = (family, LOOPBACK[family])
        if target not in asked:
            asked[target] = answers_as_epmd(target[0], target[1], port,
                                            max(0.0, deadline - time.monotonic()))
        if not asked[target]:
            raise StartupError("cannot listen on %s: in use by a listening socket of %s on %s "
                               "that does not answer as an epmd" % (where, owner, shown))
    raise AlreadyRunning("there is already a epmd running at port %d on ipaddr %s" % (port, addr))


FDSTORE_STATE = "epmd-state"        # FDNAME of the state memfd
FDSTORE_NODE = "epmd-node-%d"       # FDNAME of a node's connection


def is_stored_name(name):
    """True for the FDNAMEs this daemon gives its fd store entries (so a
    socket unit's listener, named after its unit, is never taken for one)."""
    head, _, num = name.rpartition("-")
    return name == FDSTORE_STATE or (head == "epmd-node" and num.isdigit())


def systemd_listen_sockets(environ, stored=None):
    """Return the listening sockets systemd passed (socket activation).

    As sd_listen_fds(3): LISTEN_PID must be set and name this process, else
    there are no sockets (a LISTEN_FDS inherited from elsewhere names
    descriptors that are not ours); LISTEN_PID or LISTEN_FDS that is not a
    number is an error.  The sockets are fds 3, 4, ...  Raises StartupError
    ("cannot obtain sockets from systemd", as OTP, with the detail) for those
    and when there are none or more than MAX_LISTEN_SOCKETS.  The variables
    are removed from *environ* so that children do not inherit them.
    Descriptors that LISTEN_FDNAMES (names separated by ':') gives our fd
    store names (is_stored_name) come from the fd store: they go into the
    dict *stored* (name -> fd), not among the listeners (see the hand-over
    section).  Source: sd_listen_fds(3); OTP epmd_srv.c, run.
    """
    pid = environ.pop("LISTEN_PID", None)
    fds = environ.pop("LISTEN_FDS", None)
    fdnames = environ.pop("LISTEN_FDNAMES", None)
    fdnames = fdnames.split(":") if fdnames else []
    count = 0
    if pid is not None:
        if not pid.isdigit():
            raise StartupError("cannot obtain sockets from systemd: LISTEN_PID=%r" % pid)
        if int(pid) == os.getpid() and fds is not None:
            try:
                count = int(fds)
            except ValueError:
                raise StartupError("cannot obtain sockets from systemd: LISTEN_FDS=%r"
                                   % fds) from None
    fd_range = range(SYSTEMD_FIRST_FD, SYSTEMD_FIRST_FD + max(count, 0))
    if stored is not None:
        for i, fd in enumerate(fd_range):
            if i < len(fdnames) and is_stored_name(fdnames[i]):
                stored[fdnames[i]] = fd
        fd_range = [fd for fd in fd_range if fd not in stored.values()]
        count = len(fd_range)
    if count <= 0:
        raise StartupError("systemd provides no sockets")
    if count > MAX_LISTEN_SOCKETS:
        raise StartupError("cannot listen on more than %d IP addresses" % MAX_LISTEN_SOCKETS)
    socks = []
    for fd in fd_range:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise StartupError("cannot obtain sockets from systemd: fd %d: %s"
                               % (fd, e.strerror)) from e
        sock.setblocking(False)
        socks.append(sock)
    return socks


def systemd_port(socks, default):
    """D20: the port NAMES and DUMP report under -systemd: that of the first
    passed socket with one (IPv4 or IPv6), else *default*.  OTP reports the
    -port value (4369 by default) whatever port the sockets have, and an
    OTP node's net_adm:names() refuses a reply whose port is not its own
    epmd port."""
    for sock in socks:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                return sock.getsockname()[1]
            except OSError:
                continue
    return default


def sd_notify(state, environ=os.environ, fds=()):
    """Send *state* (e.g. "READY=1") to the datagram socket $NOTIFY_SOCKET,
    with the descriptors *fds* attached (SCM_RIGHTS) if any, as
    sd_pid_notify_with_fds(3) does for FDSTORE=1.

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
            if fds:
                import array
                rights = array.array("i", fds).tobytes()
                s.sendmsg([state.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, path)
            else:
                s.sendto(state.encode(), path)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Hand-over: restart without loss (no OTP counterpart)
# ---------------------------------------------------------------------------
#
# A node's registration is its TCP connection to epmd, so a restart of OTP's
# epmd unregisters every node on the host.  On SIGUSR2 epmd.py re-executes
# itself in place (same PID, the program file read again from disk) and hands
# the new image everything it holds (D16):
#
#   old image                               new image (same PID)
#   ---------                               --------------------
#   SIGUSR2 -> reexec_wanted, wake-up byte
#   end of the wake-up: reexec()
#     the program files must be trusted
#     trial_start(): the new image tried in
#       a child process; the loop serves on,
#       watching its output (trial_wait:
#       killed after 5 s)
#   end of the wake-up of its answer:
#     trial_end(): refused (and the file
#       does not compile?), or
#     [-systemd: RELOADING=1]
#     packed_state(): the walk over
#       the connections
#     state -> memfd; listeners, connections
#       and memfd made inheritable
#     execve(python, script, same argv,       main(): $EPMD_PY_HANDOVER names the
#       $EPMD_PY_HANDOVER)  ------------->      fds; the state is read (or, if it
#     (execve failed: log, keep serving)        cannot be, only the listeners kept)
#                                             bind(): adopt_listeners()
#                                             run(): handover_resume() rebuilds
#                                               nodes and connections, then serves
#                                             [-systemd: READY=1]
#
# The listening sockets are never closed, so the kernel queues connections
# while the new image starts; nothing is refused.  Connections in flight are
# handed over with their buffers (the part of a request read so far, the part
# of a reply not yet written): the new image carries on where the old one
# stopped.  A node whose connection closed meanwhile reads as EOF in the new
# image's first wake-up and is unregistered then.
#
# The state (bytes):
#   HANDOVER_HEADER: 12s magic "EPMDPY-STATE", u16 format version, u32 body
#   length (bytes), u32 CRC-32 of the body; then the body, UTF-8 JSON:
#   {"options": {...}, "listeners": [fd, ...],
#    "conns": [{"fd", "local_peer", "mod_time", "start_time", "want", "buf",
#               "out", "one_read", "state", "fdname"}, ...],
#    "nodes": [NODE, ...] (registration order), "unreg": [NODE, ...] (oldest
#    first), "fdstore": {...} or null}
#   NODE: {"name", "fd", "port", "nodetype", "protocol", "highvsn", "lowvsn",
#          "extra", "cr_counter", "since"}; bytes (names, extras, buffers) as
#          base64; since (Unix time of the registration) a number.
# In systemd's fd store (below), the state is followed by records, each
# STORE_RECORD (u32 body length in bytes, u32 CRC-32 of the body) and a UTF-8
# JSON body, one per change of the node table since the state was written:
#   {"op": "reg", "node": NODE, "conn": CONN, "drop": [name, ...]}
#   {"op": "unreg", "node": NODE, "fd": fd, "drop": [name, ...]}
# ("drop": the names the change took off the unreg list).  A reader applies
# them in order and stops at the first one cut short (a kill during its
# write).  A reader that knows only the state ignores them: the nodes
# registered since come back as after a restart, by registering again.
# $EPMD_PY_HANDOVER: "<version> state=<fd> listen=<fd>,... conns=<fd>,...
# [store=<fd>] [fdnames=<fd>:<FDNAME>,...]", so that even a new image that
# cannot read the state knows which of its descriptors are listeners (kept)
# and which are connections (closed, and removed from systemd's fd store by
# their FDNAME, so that their nodes see the close).

HANDOVER_ENV = "EPMD_PY_HANDOVER"
HANDOVER_VERSION = 1
HANDOVER_MAGIC = b"EPMDPY-STATE"
HANDOVER_HEADER = struct.Struct(">12sHII")  # magic, version, body length, crc32
HANDOVER_OPTIONS = ("port", "address", "relaxed", "packet_timeout", "delay_accept",
                    "delay_write", "systemd")
HANDOVER_NODE_INTS = ("fd", "port", "nodetype", "protocol", "highvsn", "lowvsn", "cr_counter")
STORE_RECORD = struct.Struct(">II")         # body length, crc32 (records after the state)


class HandoverError(ValueError):
    """State handed over by the previous image that cannot be used: wrong
    magic or format version, truncated, corrupt (CRC-32), or malformed."""


def handover_supported(platform=None):
    """True where the re-exec hand-over works: Linux (memfd_create, fds kept
    across execve).  Elsewhere SIGUSR2 is refused with a log line."""
    platform = sys.platform if platform is None else platform
    return platform.startswith("linux") and hasattr(os, "memfd_create")


def _b64(data):
    if not data:                # most buffers and extras: empty
        return ""
    import binascii
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _unb64(text_):
    if text_ == "":
        return b""
    import base64
    import binascii
    try:
        return base64.b64decode(text_.encode("ascii"), validate=True)
    except (AttributeError, UnicodeError, binascii.Error) as e:
        raise HandoverError("bad base64 field: %s" % e) from None


def node_record(node):
    """Return the JSON-able record of a Node (see the state layout above)."""
    # HANDOVER_NODE_INTS, written out: a hand-over makes one per node
    return {"fd": node.fd, "port": node.port, "nodetype": node.nodetype,
            "protocol": node.protocol, "highvsn": node.highvsn, "lowvsn": node.lowvsn,
            "cr_counter": node.cr_counter, "name": _b64(node.name),
            "extra": _b64(node.extra), "since": node.since}


def node_from_record(rec):
    """Return a Node (no connection) from node_record's output; raises
    HandoverError for a missing or ill-typed field."""
    try:
        node = Node(_unb64(rec["name"]), int(rec["cr_counter"]) & CREATION_MASK)
        # HANDOVER_NODE_INTS but the counter, written out (one per node)
        values = (rec["fd"], rec["port"], rec["nodetype"], rec["protocol"], rec["highvsn"],
                  rec["lowvsn"])
        if set(map(type, values)) != {int}:
            for k, value in zip(HANDOVER_NODE_INTS, values):
                if not isinstance(value, int):
                    raise HandoverError("node field %s is not an integer" % k)
        node.fd, node.port, node.nodetype, node.protocol, node.highvsn, node.lowvsn = values
        node.extra = _unb64(rec["extra"])
        node.since = float(rec.get("since", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise HandoverError("bad node record: %r" % e) from None
    return node


def conn_record(conn, fdname=None):
    """Return the JSON-able record of a Connection (CONN in the layout
    above); *fdname* is its name in systemd's fd store, if stored."""
    return {"fd": conn.fd, "local_peer": conn.local_peer,
            "mod_time": conn.mod_time, "want": conn.want,
            "buf": _b64(conn.buf), "out": _b64(conn.out),
            "start_time": conn.start_time, "one_read": conn.one_read,
            "state": conn.state, "fdname": fdname}


# node_record and conn_record as JSON text, key for key in the same order:
# what json.dumps(record, separators=(",", ":")) writes, 3 times faster at
# 10,000 nodes (Handover.packed_state; tests/test_handover.py holds them to
# json.dumps).  Every value is an int, a bool, a float or base64.
NODE_JSON = ('{"fd":%d,"port":%d,"nodetype":%d,"protocol":%d,"highvsn":%d,"lowvsn":%d,'
             '"cr_counter":%d,"name":"%s","extra":"%s","since":%r}')
CONN_JSON = ('{"fd":%d,"local_peer":%s,"mod_time":%d,"want":%d,"buf":"%s","out":"%s",'
             '"start_time":%d,"one_read":%s,"state":"%s","fdname":%s}')
JSON_BOOL = {True: "true", False: "false"}


def node_json(node):
    """node_record(node) as JSON text."""
    return NODE_JSON % (node.fd, node.port, node.nodetype, node.protocol, node.highvsn,
                        node.lowvsn, node.cr_counter, _b64(node.name), _b64(node.extra),
                        node.since)


def conn_json(conn, fdname=None):
    """conn_record(conn, fdname) as JSON text."""
    if fdname is None:
        name = "null"
    else:
        import json
        name = json.dumps(fdname)
    return CONN_JSON % (conn.fd, JSON_BOOL[bool(conn.local_peer)], conn.mod_time, conn.want,
                        _b64(conn.buf), _b64(conn.out), conn.start_time,
                        JSON_BOOL[bool(conn.one_read)], conn.state, name)


def pack_record(rec):
    """Return the bytes of one change record (STORE_RECORD, then JSON)."""
    import json
    import zlib
    body = json.dumps(rec, separators=(",", ":")).encode("utf-8")
    return STORE_RECORD.pack(len(body), zlib.crc32(body)) + body


def apply_records(state, data, offset):
    """Apply the change records in *data* from *offset* on to the state dict
    *state* (in place; see the layout above) and return how many were
    applied; stops at the end, or at a record cut short or corrupt.  Raises
    HandoverError for a record that is whole but malformed."""
    import json
    import zlib
    nodes = {r["name"]: r for r in state["nodes"]}
    unreg = {r["name"]: r for r in state["unreg"]}
    conns = {r["fd"]: r for r in state["conns"]}
    count = 0
    while offset + STORE_RECORD.size <= len(data):
        size, crc = STORE_RECORD.unpack_from(data, offset)
        body = data[offset + STORE_RECORD.size:offset + STORE_RECORD.size + size]
        if len(body) != size or zlib.crc32(body) != crc:
            break
        offset += STORE_RECORD.size + size
        try:
            rec = json.loads(body.decode("utf-8"))
            node = rec["node"]
            if rec["op"] == REG:
                nodes[node["name"]] = node
                conns[rec["conn"]["fd"]] = rec["conn"]
            elif rec["op"] == UNREG:
                nodes.pop(node["name"], None)
                conns.pop(rec["fd"], None)
                unreg.pop(node["name"], None)
                unreg[node["name"]] = node
            for name in rec["drop"]:
                unreg.pop(name, None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HandoverError("bad change record: %r" % e) from None
        count += 1
    state["nodes"], state["unreg"], state["conns"] = (
        list(nodes.values()), list(unreg.values()), list(conns.values()))
    return count


def pack_state(state):
    """Return the bytes of the state dict *state*: HANDOVER_HEADER then the
    JSON body (see the layout above)."""
    import json
    return pack_body(json.dumps(state, separators=(",", ":")).encode("utf-8"))


def pack_body(body):
    """Return the state's bytes for its JSON *body* (bytes): HANDOVER_HEADER,
    then *body*."""
    import zlib
    return HANDOVER_HEADER.pack(HANDOVER_MAGIC, HANDOVER_VERSION, len(body),
                                zlib.crc32(body)) + body


def unpack_state(data, records=False):
    """Return the state dict packed by pack_state; with *records*, with the
    change records that follow it applied (apply_records).  Raises
    HandoverError for another magic or format version, a short or corrupt
    body, bad JSON."""
    import json
    import zlib
    if len(data) < HANDOVER_HEADER.size:
        raise HandoverError("state too short (%d bytes)" % len(data))
    magic, version, size, crc = HANDOVER_HEADER.unpack_from(data)
    if magic != HANDOVER_MAGIC:
        raise HandoverError("not an epmd.py state")
    if version != HANDOVER_VERSION:
        raise HandoverError("state format version %d, this image reads %d"
                            % (version, HANDOVER_VERSION))
    body = data[HANDOVER_HEADER.size:HANDOVER_HEADER.size + size]
    if len(body) != size or zlib.crc32(body) != crc:
        raise HandoverError("state corrupt (length or CRC-32 mismatch)")
    try:
        state = json.loads(body.decode("utf-8"))
    except ValueError as e:
        raise HandoverError("state is not valid JSON: %s" % e) from None
    if not isinstance(state, dict):
        raise HandoverError("state is not a JSON object")
    if records:
        apply_records(state, data, HANDOVER_HEADER.size + size)
    return state


def write_state_fd(data):
    """Return a new memfd (inheritable, offset 0) holding *data*."""
    fd = os.memfd_create("epmd-handover", 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_fd(fd):
    """Return all bytes of descriptor *fd* from offset 0 (the caller closes it)."""
    chunks = []
    offset = 0
    while True:
        data = os.pread(fd, 1 << 20, offset)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        offset += len(data)


def format_handover_env(state_fd, listen_fds, conn_fds, store=None):
    """Return $EPMD_PY_HANDOVER for these descriptors (see above); *store*
    is the FdStore in use, or None."""
    value = "%d state=%d listen=%s conns=%s" % (
        HANDOVER_VERSION, state_fd, ",".join(map(str, listen_fds)), ",".join(map(str, conn_fds)))
    if store is not None:
        value += " store=%d:%d fdnames=%s" % (store.state_fd, store.seq, ",".join(
            "%d:%s" % (fd, name) for fd, (_, name) in sorted(store.names.items())))
    return value


def parse_handover_env(value):
    """Parse $EPMD_PY_HANDOVER; return a dict: "version", "state" (fd),
    "listen" and "conns" (lists of fds), "store" ((state memfd, next FDNAME
    number) of systemd's fd store, or None), "fdnames" ({fd: FDNAME} of the
    connections in that store).  Raises HandoverError when it is
    malformed."""
    try:
        version, *fields = value.split(" ")
        kv = dict(f.split("=", 1) for f in fields)
        fds = [[int(x) for x in kv[k].split(",") if x] for k in ("listen", "conns")]
        store = tuple(int(x) for x in kv["store"].split(":")) if "store" in kv else None
        fdnames = {int(fd): name for fd, name in
                   (x.split(":", 1) for x in kv.get("fdnames", "").split(",") if x)}
        if store is not None and len(store) != 2:
            raise ValueError("store=%s" % kv["store"])
        return {"version": int(version), "state": int(kv["state"]), "listen": fds[0],
                "conns": fds[1], "store": store, "fdnames": fdnames}
    except (ValueError, KeyError) as e:
        raise HandoverError("bad %s=%r: %s" % (HANDOVER_ENV, value, e)) from None


def adopt_socket(fd, blocking):
    """Return the socket object for inherited descriptor *fd*, no longer
    inheritable; accepted sockets are of the plain C socket type, as do_accept
    makes them, and stay in blocking mode (MSG_DONTWAIT on every call)."""
    os.set_inheritable(fd, False)
    if not blocking:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock
    # the C type finds the family, type and protocol of fd itself (one
    # object, no Python layer: a hand-over makes one per connection)
    return socket.SocketType(fileno=fd)


HANDOVER_CHECK_ENV = "EPMD_PY_HANDOVER_CHECK"   # set: main() only says what it reads
HANDOVER_CHECK_REPLY = "epmd.py hand-over check: reads state format %d"
HANDOVER_CHECK_TIMEOUT = 5.0        # seconds the new image has to answer the check
TRIAL_OUTPUT_MAX = 64 * 1024        # bytes of the trial's output kept (its last line says why)
TRIAL_POLL = 0.01                   # seconds between waits for a trial that closed its output
IMAGE_BAD_MODE = 0o022              # group- or other-writable: refused (as sshd's StrictModes)


class ImageError(Exception):
    """The program file a re-exec would run cannot be trusted or used: the
    message says why, and the old image keeps serving."""


def open_image(path, uid=None):
    """Open the program file *path* once and check it as sshd's StrictModes
    checks a key file: a regular file owned by root or by *uid* (default:
    this process's effective uid), writable by nobody else, in a directory
    of which the same holds.  Return (its os.stat_result, its bytes).
    Raises ImageError (or OSError when it cannot be read)."""
    uid = os.geteuid() if uid is None else uid
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        chunks = []
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    import stat as stat_
    if not stat_.S_ISREG(st.st_mode):
        raise ImageError("%s is not a regular file" % path)
    for what, where, info in (("file", path, st),
                              ("directory", os.path.dirname(os.path.abspath(path)),
                               os.stat(os.path.dirname(os.path.abspath(path))))):
        if info.st_uid not in (0, uid):
            raise ImageError("the %s %s is owned by uid %d, not by root or the daemon's uid %d"
                             % (what, where, info.st_uid, uid))
        if info.st_mode & IMAGE_BAD_MODE and not (what == "directory"
                                                   and info.st_mode & stat_.S_ISVTX
                                                   and st.st_uid in (0, uid)):
            raise ImageError("the %s %s is writable by %s (mode %04o)"
                             % (what, where, "others" if info.st_mode & 0o002 else "its group",
                                stat_.S_IMODE(info.st_mode)))
    return st, b"".join(chunks)


def same_file(path, st):
    """True when *path* is still the file that open_image read (device,
    inode, size, modification time): nothing replaced or changed it since."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return ((now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)
            == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def check_image(path, source):
    """Raise ImageError unless *source*, the bytes of the program file
    *path*, compiles; every failure of compile() is caught (a file can make
    it raise SyntaxError, ValueError, MemoryError, RecursionError, ...)."""
    try:
        compile(source, path, "exec", dont_inherit=True)
    except Exception as e:  # anything compile() raises refuses the file
        raise ImageError("%s does not compile: %s: %s" % (path, type(e).__name__, e)) from None


def interpreter_args():
    """The interpreter's own command-line options this process was started
    with (-S, -W ..., -X ..., -O, ...), to start the new image the same way:
    sys.orig_argv up to the program on Python 3.10+, else rebuilt from
    sys.flags, sys.warnoptions and sys._xoptions."""
    orig = getattr(sys, "orig_argv", None)
    if orig and sys.argv:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        for i, arg in enumerate(orig[1:], 1):
            if (spec is not None and arg.startswith("-m")) or arg == sys.argv[0]:
                return list(orig[1:i])
    import subprocess
    return list(getattr(subprocess, "_args_from_interpreter_flags", lambda: [])())


def start_trial(argv, environ, cwd=None):
    """Start the new image as *argv* would run it (interpreter, its options,
    the program, the daemon's command line), in *cwd*, with
    HANDOVER_CHECK_ENV set, its stdout and stderr on one pipe, and return
    its Popen at once: the loop keeps serving while it runs (Trial).
    Raises ImageError when it cannot be started."""
    import subprocess
    env = dict(environ)
    env[HANDOVER_CHECK_ENV] = "1"
    env.pop(HANDOVER_ENV, None)
    try:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True)
    except OSError as e:
        raise ImageError("the new image cannot be started: %s" % e) from None


def trial_verdict(returncode, output):
    """Return the state format the new image said it reads: it must have
    printed HANDOVER_CHECK_REPLY and exited 0 (*returncode*, *output*: its
    stdout and stderr).  Raises ImageError with what went wrong."""
    head, _, tail = HANDOVER_CHECK_REPLY.partition("%d")
    lines = bytes(output).decode("utf-8", "replace").splitlines()
    for line in lines:
        if line.startswith(head) and line.endswith(tail) and returncode == 0:
            try:
                return int(line[len(head):len(line) - len(tail)])
            except ValueError:
                break
    err = [line for line in lines if line.strip()]
    raise ImageError("the new image failed the hand-over check (exit status %d%s)"
                     % (returncode, ": " + err[-1].strip()[:300] if err else ", no answer"))


class Trial:
    """The trial run of a new image (start_trial), under way while the old
    image serves: ``proc`` its Popen (its output pipe watched by the loop
    until end of file, then closed), ``argv`` and ``cwd`` what the re-exec
    will run, ``checked`` the program files as open_image found them
    ((path, stat, bytes) each), ``deadline`` (monotonic) by which it must
    have answered, ``out`` the last TRIAL_OUTPUT_MAX bytes it wrote."""

    __slots__ = ("proc", "argv", "cwd", "checked", "deadline", "out")

    def __init__(self, proc, argv, cwd, checked, deadline):
        self.proc = proc
        self.argv = argv
        self.cwd = cwd
        self.checked = checked
        self.deadline = deadline
        self.out = bytearray()

    def finished(self, now):
        """True once the child has closed its output and exited (then
        reaped), or *now* is past the deadline."""
        return ((self.proc.stdout.closed and self.proc.poll() is not None)
                or now >= self.deadline)


# Option names the state of releases before one name per option used.
OLD_OPTION_NAMES = {"address": "addresses", "daemon": "is_daemon"}


def options_from_state(opts, state):
    """Return *opts* (parse_args' dict) with the options of the image that
    handed *state* over, under the same names (HANDOVER_OPTIONS, debug and
    daemon; a state of an older release, with OLD_OPTION_NAMES, is read
    too); a malformed options record leaves *opts*."""
    try:
        o = dict(state["options"])
        for name, old in OLD_OPTION_NAMES.items():
            if name not in o and old in o:
                o[name] = o[old]
        new = dict(opts)
        new.update(port=int(o["port"]), address=o["address"], debug=int(o["debug"]),
                   relaxed=bool(o["relaxed"]), packet_timeout=int(o["packet_timeout"]),
                   delay_accept=int(o["delay_accept"]), delay_write=int(o["delay_write"]),
                   daemon=bool(o["daemon"]), systemd=bool(o["systemd"]))
        return new
    except (KeyError, TypeError, ValueError):
        return opts


def take_handover(environ, log):
    """In a new image: pop $EPMD_PY_HANDOVER from *environ* and read what the
    previous image passed.  Returns None without the variable, else the dict
    of parse_handover_env with "state" the state dict, or None when it
    could not be read (logged: the image starts with the listeners only,
    and closes the connections, in systemd's fd store too, by the FDNAMEs
    the variable gives).  Raises HandoverError when the variable itself is
    malformed."""
    value = environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    handover = parse_handover_env(value)
    state_fd = handover["state"]
    state = None
    try:
        if handover["version"] != HANDOVER_VERSION:
            raise HandoverError("hand-over version %d, this image reads %d"
                                % (handover["version"], HANDOVER_VERSION))
        state = unpack_state(read_state_fd(state_fd))
    except (HandoverError, OSError) as e:
        log.dbg_printf(0, "cannot read the state handed over (%s): starting with the "
                       "listening sockets only; nodes will register again", e)
    finally:
        try:
            os.close(state_fd)
        except OSError:
            pass
    handover["state"] = state
    return handover


# systemd's file descriptor store (systemd >= 254 announces it in $FDSTORE):
# a kill -9, an OOM kill or `systemctl restart` ends the process, so a
# re-exec cannot help.  With -systemd and $FDSTORE > 0, every registered
# node's socket is pushed to the store as it registers ("FDSTORE=1",
# "FDNAME=epmd-node-<n>", the socket in SCM_RIGHTS) and removed as it
# unregisters ("FDSTOREREMOVE=1"); one memfd, "epmd-state", stored once,
# holds the state above (the nodes and their connections only: a restart
# cannot use a request in flight), followed by one change record per
# registration and unregistration since, appended at the end of the wake-up
# that made them.  So a change costs the same whatever the number of nodes;
# the state is written whole again only once the records outgrow it (and
# FDSTORE_COMPACT_MIN), which spreads that cost over at least as many
# changes as there are nodes.  On the next start LISTEN_FDNAMES tells the socket unit's listeners
# from these; the state is read and each node is matched to its socket by
# name.  Sources: sd_notify(3), sd_listen_fds(3), systemd.io "The File
# Descriptor Store".

FDSTORE_ENV = "FDSTORE"             # set by systemd to FileDescriptorStoreMax=
FDSTORE_COMPACT_MIN = 64 * 1024     # bytes of change records before the state is rewritten


class FdStore:
    """This daemon's entries in systemd's fd store.

    ``state_fd`` is the stored memfd of the state, ``names`` maps the fd of
    each stored node connection to (Connection, FDNAME), ``seq`` numbers the
    next FDNAME, ``restored`` maps FDNAME -> fd for what systemd passed back
    at start (until handover_resume takes it), ``limit`` is $FDSTORE.  In
    the memfd: ``state_size`` bytes of state, then change records up to
    ``end`` (bytes); ``stale`` asks for the state to be written whole.
    """

    __slots__ = ("environ", "log", "state_fd", "names", "seq", "restored", "limit",
                 "warned", "state_size", "end", "stale")

    def __init__(self, environ, log, state_fd, limit):
        self.environ = environ
        self.log = log
        self.state_fd = state_fd
        self.names = {}
        self.seq = 0
        self.restored = {}
        self.limit = limit
        self.warned = False
        self.state_size = 0
        self.end = 0
        self.stale = True

    @staticmethod
    def limit_of(environ):
        try:
            return int(environ.get(FDSTORE_ENV, "0"))
        except ValueError:
            return 0

    @classmethod
    def open(cls, environ, stored, log):
        """At a start under systemd: return the FdStore, or None when the unit
        has no store ($FDSTORE unset or 0; descriptors passed back anyway are
        closed).  *stored* maps FDNAME -> fd of what systemd passed back; the
        state memfd is taken from it, or made and pushed."""
        limit = cls.limit_of(environ)
        if limit <= 0 or not hasattr(os, "memfd_create"):
            for fd in stored.values():
                os.close(fd)
            return None
        state_fd = stored.pop(FDSTORE_STATE, None)
        if state_fd is None:
            state_fd = os.memfd_create(FDSTORE_STATE)
            sd_notify("FDSTORE=1\nFDNAME=%s" % FDSTORE_STATE, environ, [state_fd])
        else:
            os.set_inheritable(state_fd, False)
        store = cls(environ, log, state_fd, limit)
        store.restored = stored
        store.seq = 1 + max([int(n.rsplit("-", 1)[1]) for n in stored
                             if n.rsplit("-", 1)[1].isdigit()] or [-1])
        return store

    @classmethod
    def adopt(cls, environ, record, log):
        """In a re-executed image: the FdStore the old image used (*record*
        from the state), or None."""
        try:
            state_fd, seq = int(record["state_fd"]), int(record["seq"])
            os.set_inheritable(state_fd, False)
        except (KeyError, TypeError, ValueError, OSError):
            return None
        store = cls(environ, log, state_fd, cls.limit_of(environ))
        store.seq = seq
        return store

    def record(self):
        return {"state_fd": self.state_fd, "seq": self.seq}

    def push(self, fd):
        """Store connection *fd*; return its FDNAME, or None if not sent."""
        if len(self.names) + 1 >= self.limit and not self.warned:
            self.warned = True
            self.log.dbg_printf(0, "FileDescriptorStoreMax=%d is reached: more nodes will not "
                                "survive a restart", self.limit)
        name = FDSTORE_NODE % self.seq
        self.seq += 1
        if sd_notify("FDSTORE=1\nFDNAME=%s" % name, self.environ, [fd]):
            return name
        return None

    def remove(self, name):
        """Remove (and have systemd close) the entries named *name*."""
        sd_notify("FDSTOREREMOVE=1\nFDNAME=%s" % name, self.environ)

    def write(self, data):
        """Replace the state in the stored memfd and drop the change records
        (the CRC-32 in the header shows a write that a kill cut short)."""
        os.pwrite(self.state_fd, data, 0)
        os.ftruncate(self.state_fd, len(data))
        self.state_size = self.end = len(data)
        self.stale = False

    def append(self, data):
        """Append change records (pack_record's bytes) after the state."""
        os.pwrite(self.state_fd, data, self.end)
        self.end += len(data)

    def compact_due(self):
        """True when the change records have outgrown the state (and
        FDSTORE_COMPACT_MIN): time to write the state whole again."""
        return self.end - self.state_size > max(FDSTORE_COMPACT_MIN, self.state_size)

    def restart_handover(self):
        """After a restart with stored descriptors: return the hand-over
        dict (as take_handover's) rebuilt from the stored state, each node's
        connection found by its FDNAME; nodes whose socket is missing go to
        the unreg list (their creation kept)."""
        restored, self.restored = self.restored, {}
        handover = {"listen": [], "conns": list(restored.values()), "state": None,
                    "unused": dict(restored)}
        try:
            state = unpack_state(read_state_fd(self.state_fd), records=True)
            moved = {}
            conns = []
            for rec in state["conns"]:
                name = rec.get("fdname")
                if name in restored:
                    moved[rec["fd"]] = restored[name]
                    conns.append(dict(rec, fd=restored[name]))
            lost = [r for r in state["nodes"] if r["fd"] not in moved]
            state["nodes"] = [dict(r, fd=moved[r["fd"]]) for r in state["nodes"]
                              if r["fd"] in moved]
            state["unreg"] = list(state["unreg"]) + lost
            state["conns"] = conns
            handover["state"] = state
        except (HandoverError, OSError, KeyError, TypeError, AttributeError) as e:
            self.log.dbg_printf(0, "cannot read the state in systemd's fd store (%s): starting "
                                "with the listening sockets only; nodes will register again", e)
        return handover


class Handover:
    """The hand-over part of Epmd (a mixin: these are Epmd's methods).

    Its contract with Epmd, all of it (tests/test_map.py checks it against
    the code):

    Reads: log, nodes, conns, listeners, sel, systemd, fdstore, handover,
    wakeup, trial, script, module_name, argv, and the options named by
    HANDOVER_OPTIONS.
    Writes: reexec_wanted, wakeup, trial (its own), handover (taken once).
    Calls: set_state (restore_handover: each connection's one door), unwatch.
    Called by Epmd: adopt_listeners (bind), handover_resume (run, before
    the loop), trial_wait, handover_event, reexec and fdstore_sync (run, in
    the loop), trial_abort (epmd_cleanup_exit).
    """

    def request_reexec(self, signum=None, frame=None):
        """SIGUSR2 handler: only set the flag; the loop acts on it after the
        wake-up (the wake-up socket makes sure there is one)."""
        self.reexec_wanted = True

    def install_reexec_signal(self):
        """Make SIGUSR2 request a re-exec, waking the loop through a socket
        pair given to signal.set_wakeup_fd (main thread only)."""
        if not hasattr(signal, "SIGUSR2"):
            return
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self.wakeup = (rsock, wsock)
        signal.signal(signal.SIGUSR2, self.request_reexec)
        # reexec() blocks SIGUSR2 across execve, so that a second signal
        # cannot kill the new image before this handler is in place
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})

    def drain_wakeup(self):
        """Read the bytes signals wrote to the wake-up socket, so that the
        selector does not report it again."""
        if self.wakeup is not None:
            try:
                while self.wakeup[0].recv(4096):
                    pass
            except OSError:
                pass

    def handover_options(self):
        """The options record of the state (HANDOVER_OPTIONS, debug, daemon)."""
        options = {k: getattr(self, k) for k in HANDOVER_OPTIONS}
        options["debug"] = self.log.level
        options["daemon"] = self.log.is_daemon
        return options

    def packed_state(self, nodes_only=False):
        """The walk over the connections: return (the bytes of the state to
        hand over, the fds of the connections in it, the number of
        registered nodes).

        Every connection goes over as it is (with *nodes_only*, for systemd's
        fd store, only the registered nodes'): a registered node's (kept,
        ``conn.node`` set) with its Node; one in flight with the bytes of its
        request read so far, or of its reply not yet written, and its
        time-out clock (monotonic seconds, the same clock in the new image).
        The node table goes over in registration order, the unreg list
        oldest first, each Node with all its fields and creation counter.
        The bytes are those of pack_state of a dict of node_record and
        conn_record records, but each record is written by its template
        (node_json, conn_json): 20,000 dicts built for json.dumps cost 3
        times as much at 10,000 nodes (tests/test_handover.py holds the two
        equal)."""
        import json
        stored = self.fdstore.names if self.fdstore is not None else {}
        conns, fds = [], []
        for conn in self.conns.values():
            if nodes_only and conn.node is None:
                continue
            entry = stored.get(conn.fd)
            conns.append(conn_json(conn, entry[1] if entry and entry[0] is conn else None))
            fds.append(conn.fd)
        nodes = self.nodes

        def dumps(value):
            return json.dumps(value, separators=(",", ":"))
        body = '{"options":%s,"listeners":%s,"conns":[%s],"nodes":[%s],"unreg":[%s],' \
               '"fdstore":%s}' % (
                   dumps(self.handover_options()), dumps([ls.fileno() for ls in self.listeners]),
                   ",".join(conns), ",".join(map(node_json, nodes.reg.values())),
                   ",".join(map(node_json, nodes.unreg.values())),
                   dumps(self.fdstore.record() if self.fdstore is not None else None))
        return pack_body(body.encode("utf-8")), fds, len(nodes.reg)

    def reexec_command(self):
        """Return (argv, files, cwd) of the re-exec: the same interpreter
        with its own options (interpreter_args), in the same form as this
        image (``python -m epmd``, a script, or the `epmd` console script),
        with the daemon's command line; the program files it will read; the
        directory to run it in (for ``-m``, the one it was found in)."""
        module = os.path.abspath(__file__)
        head = [sys.executable] + interpreter_args()
        if self.module_name:            # started as python -m epmd
            where = os.path.dirname(module)
            cwd = where if sys.path and sys.path[0] == where else None
            return head + ["-m", self.module_name] + list(self.argv), [module], cwd
        files = [self.script] + ([module] if module != self.script else [])
        return head + [self.script] + list(self.argv), files, None

    def reexec(self):
        """Act on SIGUSR2 at the end of a wake-up: start the trial of the new
        image (trial_start), or, once it has answered (or overrun its
        time), go on with the re-exec or refuse it (trial_end).  A SIGUSR2
        while a trial is under way starts no second one (logged).

        Refused, with a log line, and the old image keeps serving: off
        Linux, when the program file is not trusted (owner, mode), does not
        compile, or fails the hand-over check in a child process (does not
        import, refuses the command line, reads another state format), when
        it changed after the check, when execve fails.
        """
        log = self.log
        self.reexec_wanted = False
        self.drain_wakeup()
        trial = self.trial
        if trial is not None:
            if trial.finished(time.monotonic()):
                self.trial_end()
            else:
                log.dbg_printf(0, "SIGUSR2 ignored: the new image is being tried already "
                               "(pid %d)", trial.proc.pid)
            return
        if not handover_supported():
            log.dbg_printf(0, "SIGUSR2 ignored: re-exec with hand-over needs Linux (this is %s)",
                           sys.platform)
            return
        if not (self.script or self.module_name) or not sys.executable:
            log.dbg_printf(0, "SIGUSR2 ignored: the program file or interpreter is unknown")
            return
        try:
            self.trial_start()
        except (ImageError, OSError) as e:
            log.dbg_printf(0, "re-exec refused, the old image keeps serving: %s", e)

    def trial_start(self):
        """The checks a re-exec makes before its trial, and the trial's
        start: each program file is opened once and must be trusted
        (open_image); then the new image is started as the re-exec will
        start it (start_trial), its output watched by the loop, which
        serves on meanwhile.  Raises ImageError or OSError."""
        argv, files, cwd = self.reexec_command()
        checked = [(path,) + open_image(path) for path in files]
        proc = start_trial(argv, os.environ, cwd)
        os.set_blocking(proc.stdout.fileno(), False)
        self.trial = Trial(proc, argv, cwd, checked,
                           time.monotonic() + HANDOVER_CHECK_TIMEOUT)
        self.sel.register(proc.stdout, EVENT_READ, WAKEUP)

    def handover_event(self, fileobj):
        """run()'s handler of the hand-over's own descriptors (selector data
        WAKEUP): the SIGUSR2 wake-up socket is drained; the trial's pipe is
        read, and at its end of file closed (trial_wait then waits for the
        child's exit, reexec for the verdict)."""
        trial = self.trial
        if trial is None or fileobj is not trial.proc.stdout:
            self.drain_wakeup()
            return
        while True:             # to EAGAIN, or to its end: its answer comes with its exit
            try:
                data = os.read(fileobj.fileno(), TRIAL_OUTPUT_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                break
            trial.out += data
            del trial.out[:-TRIAL_OUTPUT_MAX]
        self.unwatch(fileobj)
        fileobj.close()
        if trial.proc.poll() is not None:
            self.reexec_wanted = True   # the verdict, at the end of this wake-up

    def trial_wait(self, timeout):
        """run()'s select() *timeout* while a trial is under way: no later
        than its deadline, and short while its child has closed its output
        but not yet exited; 0 once the verdict is due (reexec_wanted set:
        the next wake-up ends with trial_end)."""
        trial = self.trial
        now = time.monotonic()
        if trial.finished(now):
            self.reexec_wanted = True
            return 0.0
        left = trial.deadline - now
        if trial.proc.stdout.closed:
            left = min(left, TRIAL_POLL)
        return min(timeout, left)

    def trial_end(self):
        """The trial's verdict: the child is killed (by PID) if it overran
        HANDOVER_CHECK_TIMEOUT, and reaped; a child that failed is refused
        with the reason (a program file that does not compile says so,
        check_image), as is one that reads another state format; otherwise
        the re-exec goes on (exec_image), and returns only if execve
        failed."""
        log = self.log
        trial, self.trial = self.trial, None
        proc = trial.proc
        overdue = proc.poll() is None
        if overdue:
            proc.kill()
        proc.wait()
        if not proc.stdout.closed:
            try:
                trial.out += os.read(proc.stdout.fileno(), TRIAL_OUTPUT_MAX)
            except OSError:
                pass
            self.unwatch(proc.stdout)
            proc.stdout.close()
        try:
            if overdue:
                raise ImageError("the new image did not answer the hand-over check within %g s"
                                 % HANDOVER_CHECK_TIMEOUT)
            try:
                version = trial_verdict(proc.returncode, trial.out)
            except ImageError:
                for path, _, source in trial.checked:
                    check_image(path, source)       # the likelier reason, if it is one
                raise
            if version != HANDOVER_VERSION:
                raise ImageError("the new image reads state format %d, this one writes %d"
                                 % (version, HANDOVER_VERSION))
        except ImageError as e:
            log.dbg_printf(0, "re-exec refused, the old image keeps serving: %s", e)
            return
        if self.systemd:
            sd_notify(SD_RELOADING % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        self.exec_image(trial.argv, trial.cwd, [(path, st) for path, st, _ in trial.checked])
        # still here: execve failed (logged); the old image keeps serving
        if self.systemd:
            sd_notify(SD_READY % os.getpid())

    def trial_abort(self):
        """The loop ends (epmd_cleanup_exit): a trial under way is killed
        by PID and reaped."""
        trial, self.trial = self.trial, None
        if trial is not None:
            if trial.proc.poll() is None:
                trial.proc.kill()
            trial.proc.wait()
            if not trial.proc.stdout.closed:
                self.unwatch(trial.proc.stdout)
                trial.proc.stdout.close()

    def exec_image(self, argv, cwd, checked):
        """The point of no return of reexec: the state into a memfd, every
        descriptor to hand over made inheritable, $EPMD_PY_HANDOVER set,
        *checked* files still the same, then execve(*argv*) in *cwd*.
        Returns only when that failed (logged), with every descriptor as it
        was."""
        log = self.log
        data, conn_fds, count = self.packed_state()
        listen = [ls.fileno() for ls in self.listeners]
        passed = listen + conn_fds
        if self.fdstore is not None:
            passed.append(self.fdstore.state_fd)
        state_fd = -1
        try:
            state_fd = write_state_fd(data)
            passed.append(state_fd)
            for fd in passed:
                os.set_inheritable(fd, True)
            env = dict(os.environ)
            env[HANDOVER_ENV] = format_handover_env(state_fd, listen, conn_fds, self.fdstore)
            for path, st in checked:
                if not same_file(path, st):
                    raise OSError(errno.ESTALE, "%s changed after it was checked" % path)
            log.dbg_printf(0, "SIGUSR2: re-executing %s, handing over %d nodes, %d connections",
                           "-m " + self.module_name if self.module_name else self.script,
                           count, len(conn_fds))
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
            back = os.getcwd()
            if cwd is not None:
                os.chdir(cwd)
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os.chdir(back)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
            log.dbg_perror(e, "re-exec failed, the old image keeps serving")
            for fd in passed:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass
            if state_fd >= 0:
                os.close(state_fd)

    def fdstore_sync(self):
        """Bring systemd's fd store up to date with the changes of the node
        table (NodeTable.changes) since the last call: push the socket of
        each node registered and still there, remove (by FDNAME) that of
        each node gone (compared by Connection, as a descriptor number may
        be reused at once), and append one change record per change to the
        state memfd, or write the state whole when it is stale or the
        records have outgrown it.  Runs at the end of a wake-up that
        changed the table; its cost is that of the changes, not of the
        table (but for the rewrite, once per as many changes as nodes)."""
        store = self.fdstore
        nodes = self.nodes
        changes, nodes.changes = nodes.changes, []
        records = []
        for op, node, conn, dropped in changes:
            fd = conn.fd
            drop = [] if dropped is None else [_b64(dropped)]
            if op is REG:
                name = None
                if node.conn is conn and conn.state is not CLOSED and fd not in store.names:
                    name = store.push(fd)
                    if name is not None:
                        store.names[fd] = (conn, name)
                rec = node_record(node)
                rec["fd"] = fd
                records.append({"op": REG, "node": rec, "conn": conn_record(conn, name),
                                "drop": drop})
            else:
                entry = store.names.get(fd)
                if entry is not None and entry[0] is conn:
                    store.remove(entry[1])
                    del store.names[fd]
                records.append({"op": UNREG, "node": node_record(node), "fd": fd, "drop": drop})
        try:
            if store.stale or store.compact_due():
                store.write(self.packed_state(nodes_only=True)[0])
            else:
                store.append(b"".join(map(pack_record, records)))
        except OSError as e:
            self.log.dbg_perror(e, "cannot write the state to systemd's fd store")
            store.stale = True

    def adopt_listeners(self):
        """bind() of a new image: return the listening sockets handed over
        and the FdStore in use (or None).  Raises StartupError without a
        listening socket."""
        listeners = [adopt_socket(fd, blocking=False) for fd in self.handover["listen"]]
        if not listeners:
            raise StartupError("no listening sockets handed over")
        state = self.handover["state"]
        store = self.handover.get("store")
        if store is not None:       # named outside the state: usable without it
            record = {"state_fd": store[0], "seq": store[1]}
        else:                       # an image from before store= (the state's record)
            record = state.get("fdstore") if state is not None else None
        fdstore = FdStore.adopt(os.environ, record, self.log) if record else None
        if fdstore is not None and not self.systemd:
            os.close(fdstore.state_fd)  # not under systemd any more: nothing to keep
            fdstore = None
        return listeners, fdstore

    def handover_resume(self):
        """run() of a new image, before serving: rebuild the connections and
        the node table from the state, and watch each connection.  Without a
        usable state the handed-over connections are closed (their nodes
        register again, as after a restart).  Also watches the wake-up
        socket of SIGUSR2."""
        if self.wakeup is not None:
            self.sel.register(self.wakeup[0], EVENT_READ, WAKEUP)
        handover, self.handover = self.handover, None
        if handover is None and self.fdstore is not None and self.fdstore.restored:
            handover = self.fdstore.restart_handover()
        if handover is None:
            return
        log = self.log
        state = handover["state"]
        restored = {}
        if state is not None:
            try:
                restored = self.restore_handover(state)
            except HandoverError as e:
                log.dbg_printf(0, "cannot use the state handed over (%s): starting with the "
                               "listening sockets only; nodes will register again", e)
                restored = {}
        fdnames = handover.get("fdnames", {})
        for fd in handover["conns"]:
            if fd not in restored:
                try:
                    os.close(fd)
                except OSError:
                    pass
                # systemd's copy too, or the node never sees the close
                if fd in fdnames and self.fdstore is not None:
                    self.fdstore.remove(fdnames[fd])
        for name, fd in handover.get("unused", {}).items():
            if fd not in restored and self.fdstore is not None:
                self.fdstore.remove(name)

    def restore_handover(self, state):
        """Rebuild the node table and the connections from *state* (made by
        packed_state); return {fd: Connection}.  Each connection enters
        its state through set_state, keeping the time-out clocks it had
        (restore=True).  Raises HandoverError, leaving the table empty,
        when the state is malformed."""
        log = self.log
        nodes = self.nodes
        conns, states = self.conns_from_state(state)
        try:
            reg = [node_from_record(r) for r in state["nodes"]]
            unreg = [node_from_record(r) for r in state["unreg"]]
        except (KeyError, TypeError, ValueError) as e:
            raise HandoverError("bad state: %r" % e) from None
        for node in reg:
            conn = conns.get(node.fd)
            if conn is None or states[node.fd] is not KEPT or node.name in nodes.reg:
                log.dbg_printf(0, "hand-over: no connection for node %s, dropped", node.name)
                continue
            nodes.node_restore(node, conn)
        for node in unreg:
            nodes.node_restore(node, None)
        for fd, conn in list(conns.items()):
            if states[fd] is KEPT and conn.node is None:
                del conns[fd]       # its node was dropped: closed by the caller
                continue
            try:
                conn.sock = adopt_socket(fd, blocking=True)
            except OSError as e:
                log.dbg_perror(e, "hand-over: file descriptor %d unusable", fd)
                del conns[fd]
                if self.fdstore is not None:
                    self.fdstore.names.pop(fd, None)
                if conn.node is not None:
                    nodes.node_unreg_sock(conn)
                continue
            self.set_state(conn, states[fd], restore=True)
        log.dbg_printf(0, "hand-over: %d nodes, %d old names, %d connections restored",
                       len(nodes.reg), len(nodes.unreg), len(conns))
        nodes.print_names()
        return conns

    def conns_from_state(self, state):
        """The connections of *state*, not yet in any table: ({fd:
        Connection}, {fd: the state it had}), with their buffers and time-out
        clocks.  Raises HandoverError when a record is malformed."""
        conns, states = {}, {}
        known = {READING: READING, REPLYING: REPLYING, KEPT: KEPT}
        try:
            for rec in state["conns"]:
                fd = rec["fd"]
                conn = Connection(None, fd, bool(rec["local_peer"]), int(rec["mod_time"]))
                conn.start_time = int(rec["start_time"])
                conn.want = int(rec["want"])
                conn.buf = _unb64(rec["buf"])
                conn.out = _unb64(rec["out"])
                conn.one_read = bool(rec["one_read"])
                states[fd] = known[rec["state"]]
                conns[fd] = conn
                if self.fdstore is not None and rec.get("fdname"):
                    self.fdstore.names[fd] = (conn, rec["fdname"])
        except (KeyError, TypeError, ValueError) as e:
            raise HandoverError("bad state: %r" % e) from None
        return conns, states


class _Wakeup:
    """Selector data of the SIGUSR2 wake-up socket: not a connection (its fd
    is never a key of Epmd.conns): the loop only drains it."""

    __slots__ = ()
    fd = -1


WAKEUP = _Wakeup()


# ---------------------------------------------------------------------------
# Diagnostics: who holds a name (epmd.py only; D25, D26; -status uses them too)
#
# OTP's epmd says only "node name already occupied" and lists names and
# ports.  Running on the same host as its nodes, epmd.py can say more, from
# what Linux shows every process: the kernel's sock_diag netlink interface
# (one socket looked up by its addresses, or the sockets of one state and
# port, without reading the whole table; /proc/net/tcp{,6} where netlink is
# not allowed), /proc/<pid>/fd (which process holds which socket inode) and
# /proc/<pid>/cmdline.  Nothing here changes a byte on the wire or of OTP's
# output: the daemon adds log lines after OTP's refusals, and -status is a
# client action of its own.  Where /proc is missing or not readable the
# answer is "?", never an error.
# ---------------------------------------------------------------------------

# Limits of the daemon's look-up of who holds a name (it runs in the loop).
DIAG_LOOKUP_BUDGET = 0.005          # seconds one look-up may take; then it logs what it has
DIAG_LOOKUP_RATE = 4.0              # look-ups per second, on average ...
DIAG_LOOKUP_BURST = 4               # ... and at most this many in a row
DIAG_COMMAND_MAX = 200              # characters of a command line in a log line
STATUS_COMMAND_MAX = 80             # ... in a -status column (-json has it whole)
STATUS_CONNECT_TIMEOUT = 1.0        # seconds -status waits for a node's port to accept
NODE_TYPES = {77: "normal", 72: "hidden"}


def format_addr(family, addr, port):
    """``1.2.3.4:P``, or ``[::1]:P`` for IPv6."""
    return ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % (addr, port)


def sock_diag_find(family, src, dst):
    """Look up one TCP socket by its addresses: *src* = (address, port) of
    the socket itself, *dst* = (address, port) of its peer.  Returns (uid,
    inode), or None when the kernel knows no such socket.

    Asks the kernel's sock_diag netlink interface (SOCK_DIAG_BY_FAMILY,
    inet_diag_req_v2 with the exact socket id, not a dump), which costs one
    hash look-up whatever the number of sockets on the host; no privilege
    is needed.  Request: nlmsghdr (u32 len, u16 type, u16 flags, u32 seq,
    u32 pid), then u8 family, u8 protocol, u8 ext, pad, u32 states, then the
    inet_diag_sockid: be16 sport, be16 dport, 16 bytes src, 16 bytes dst,
    u32 interface, u32 cookie[2].  Reply: nlmsghdr, then inet_diag_msg
    whose u32 uid and u32 inode are at offsets 64 and 68.  Raises OSError
    where netlink or sock_diag is not available (not Linux, no module).
    Source: linux/inet_diag.h; net/ipv4/inet_diag.c, inet_diag_find_one_icsk.
    """
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        raise OSError(errno.EAFNOSUPPORT, "no netlink sockets here")
    sid = INET_DIAG_SOCKID.pack(src[1], dst[1], socket.inet_pton(family, src[0]).ljust(16, b"\0"),
                                socket.inet_pton(family, dst[0]).ljust(16, b"\0"))
    body = (INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sid
            + INET_DIAG_SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    msg = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(DIAG_LOOKUP_BUDGET)
        nl.sendto(msg, (0, 0))
        data = nl.recv(NETLINK_READ_SIZE)
    if len(data) < NLMSG_HDR.size + 4:
        return None
    _, mtype, _, _, _ = NLMSG_HDR.unpack_from(data)
    if mtype == NLMSG_ERROR:
        return None                 # -ENOENT: no such socket
    offset = NLMSG_HDR.size + INET_DIAG_MSG_UID_OFFSET
    if mtype != SOCK_DIAG_BY_FAMILY or len(data) < offset + INET_DIAG_MSG_UID_INODE.size:
        return None
    return INET_DIAG_MSG_UID_INODE.unpack_from(data, offset)


def socket_pids(inodes):
    """Find the processes holding the sockets *inodes* (from /proc/net/tcp
    or sock_diag_find).  Returns (pids, denied): pids maps each inode found
    to the sorted list of process ids whose /proc/<pid>/fd links to
    ``socket:[inode]``; *denied* counts processes whose descriptors this
    process may not read (an unprivileged user sees only its own).  This
    process is left out.  Never raises OSError.  (The daemon searches with
    HolderScan instead, which stops at a deadline and resumes.)
    """
    targets = {SOCKET_LINK % i: i for i in inodes if i}
    pids = {}
    denied = 0
    if not targets:
        return pids, denied
    try:
        entries = sorted(int(d) for d in os.listdir("/proc") if d.isdigit())
    except OSError:
        return pids, denied
    me = os.getpid()
    for pid in entries:
        if pid == me:
            continue
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            denied += 1
            continue
        except OSError:
            continue
        for fd in fds:
            try:
                inode = targets.get(os.readlink("%s/%s" % (fd_dir, fd)))
            except OSError:
                continue
            if inode is not None and pid not in pids.setdefault(inode, []):
                pids[inode].append(pid)
    return pids, denied


def proc_command(pid, limit=None):
    """The command line of process *pid* (arguments joined by spaces), at
    most *limit* characters (``...`` marks a cut), or None if unreadable."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read(limit * 4 + 4 if limit else -1)
    except OSError:
        return None
    cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    if not cmd:
        return None
    if limit and len(cmd) > limit:
        cmd = cmd[:limit - 3] + "..."
    return cmd


def port_servers_text(port):
    """``pid N (command)`` of the processes listening on *port* (the first
    command only; pids joined by commas), or ``pid ? (why)`` where they
    cannot be seen: for the line of a -daemon that finds the port served."""
    listeners, _ = find_listeners((port,))
    if not listeners:
        return "pid ? (its listening socket is not visible here)"
    pids, denied = socket_pids([ls.inode for ls in listeners])
    found = sorted({p for ps in pids.values() for p in ps})
    if not found:
        return "pid ? (%s)" % ("not permitted to read other users' /proc/<pid>/fd" if denied
                               else "no process found holding its listening socket")
    return "pid %s (%s)" % (",".join(map(str, found)),
                            proc_command(found[0], DIAG_COMMAND_MAX) or "?")


def sock_addrs(sock):
    """(family, (peer address, port), (own address, port)) of a connected
    TCP socket, IPv6 flow info dropped; raises OSError (for any other
    socket too)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(errno.EAFNOSUPPORT, "not a TCP/IP socket")
    peer = sock.getpeername()
    own = sock.getsockname()
    return sock.family, (peer[0], peer[1]), (own[0], own[1])


class Diagnostics:
    """The extra level-0 lines the daemon logs after OTP's line for a
    refused ALIVE2_REQ or a request refused to a remote peer (D25, D26):

        refused ALIVE2_REQ from <peer>: <why>

    For a name already registered, *why* names the process holding it (the
    peer of the registration connection: its pid and command), its address,
    since when the name is registered (wall clock) and its distribution
    port.  Finding the process runs in the daemon's single loop, so it is
    bounded by construction: one look-up takes at most DIAG_LOOKUP_BUDGET
    seconds (sock_diag finds the socket's inode in one call; /proc/*/fd is
    then scanned lazily, the socket owner's processes first: HolderScan,
    which tests the deadline at every step), a token bucket allows
    DIAG_LOOKUP_RATE look-ups per second (DIAG_LOOKUP_BURST in a row), and
    one search at a time exists daemon-wide (``searching``: the Node whose
    search is under way; a refusal of another name replaces it).  A look-up
    cut short, or not made, logs what it has; a search cut short resumes at
    the next refusal of the name.  A finished search leaves only its
    verdict on the Node (a line of text), so further refusals of the same
    registration cost no look-up; the node table drops it when the node
    leaves.  *clock* is time.monotonic.
    """

    __slots__ = ("log", "tokens", "refilled", "clock", "searching")

    def __init__(self, log, clock=time.monotonic):
        self.log = log
        self.clock = clock
        self.tokens = float(DIAG_LOOKUP_BURST)
        self.refilled = clock()
        self.searching = None       # the Node whose HolderScan is under way

    def take_token(self):
        """True if the rate allows one more look-up now (and count it)."""
        now = self.clock()
        self.tokens = min(float(DIAG_LOOKUP_BURST),
                          self.tokens + (now - self.refilled) * DIAG_LOOKUP_RATE)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    @staticmethod
    def peer_text(conn):
        """``address:port`` of the peer of *conn*, or ``?``."""
        try:
            family, peer, _ = sock_addrs(conn.sock)
            return format_addr(family, peer[0], peer[1])
        except (OSError, AttributeError):
            return "?"

    def refused(self, conn, what, explain, *args):
        """Log ``refused <what> from <peer>: <explain(*args)>`` at level 0.
        A diagnosis that fails says so: it never costs the request its
        answer or the daemon its loop."""
        try:
            why = explain(*args)
        except Exception as e:  # diagnostics only: never let them break a request
            why = "(no diagnosis: %r)" % (e,)
        self.log.dbg_printf(0, "refused %s from %s: %s", what, self.peer_text(conn), why)

    def remote_refused(self, conn, what):
        """D26: the line after OTP's ``<what> from non local address``."""
        self.refused(conn, what, lambda: "only peers on this host may send it "
                                         "(loopback, or this host's own address)")

    def alive2_malformed(self, conn, payload, err):
        """D25: the line after OTP's line for an ALIVE2_REQ whose packet is
        malformed (parse_alive2_req raised *err*)."""
        self.refused(conn, "ALIVE2_REQ", lambda: alive2_packet_problem(payload) or str(err))

    def alive2_refused(self, conn, req, table):
        """D25: the line after OTP's line for an ALIVE2_REQ that node_reg2
        refused: the name already registered (who holds it, since when) or
        what is wrong with the name or extra."""
        self.refused(conn, "ALIVE2_REQ", self.alive2_why, req, table)

    def alive2_why(self, req, table):
        """The reason part of alive2_refused's line."""
        holder = table.reg.get(req.name)
        if holder is not None:
            return 'name "%s" is %s' % (text(req.name), self.holder_text(holder))
        return alive2_name_problem(req)

    def holder_text(self, node):
        """Describe who holds *node*'s registration, within the limits."""
        since = node.since
        age = max(0, int(time.time() - since))
        when = "registered since %s (%d s ago), distribution port %d" % (
            time.ctime(since), age, node.port)
        conn = node.conn
        cached = node.holder
        if cached is not None and cached[0] is conn and isinstance(cached[1], str):
            return "held by %s, %s" % (cached[1], when)        # the verdict
        if cached is None or cached[0] is not conn:
            try:
                family, peer, own = sock_addrs(conn.sock)
            except (OSError, AttributeError):
                return "held by a connection that is going away, %s" % when
            self.stop_search()
            cached = node.holder = (conn, HolderScan(family, peer, own))
            self.searching = node
        scan = cached[1]
        if not self.take_token():
            return "held by %s, %s" % (scan.describe(
                "process not looked up: more than %g look-ups a second" % DIAG_LOOKUP_RATE),
                when)
        scan.step(time.monotonic() + DIAG_LOOKUP_BUDGET)
        verdict = scan.describe()
        if scan.done:
            node.holder = (conn, verdict)
            self.searching = None
        return "held by %s, %s" % (verdict, when)

    def stop_search(self):
        """End the search under way, if any (one at a time daemon-wide)."""
        node, self.searching = self.searching, None
        if node is not None and node.holder is not None and not isinstance(node.holder[1], str):
            node.holder = None


class HolderScan:
    """The search for the process at the other end of a TCP connection to
    this one (*peer* and *own*: its (address, port) pairs), in steps that
    each stop at a deadline and resume where the last one stopped, so that
    a search needing more than DIAG_LOOKUP_BUDGET seconds completes over a
    few refusals instead of stalling the loop.

    The socket's uid and inode come from sock_diag_find (or /proc/net/tcp
    where sock_diag is missing); then /proc is walked lazily (os.scandir),
    twice at most: first the processes of the socket's owner, then, for
    root only, the others; each process's /proc/<pid>/fd is listed lazily
    and searched for ``socket:[inode]``.  A process this one may not read
    (another user's, unless root) is counted in ``denied`` and skipped
    without a walk.  The deadline is tested before every system call.
    Between steps it holds no descriptor, only where it stopped: the last
    pid taken (/proc lists pids in ascending order) and the last descriptor
    read of that process (its fd directory lists them in ascending order
    too); a step opens the directories again and skips to there.  ``done`` once
    the answer is final.
    """

    __slots__ = ("family", "peer", "own", "uid", "inode", "after", "phase", "current",
                 "pid", "denied", "done", "gone", "euid", "me")

    def __init__(self, family, peer, own):
        self.family = family
        self.peer = peer
        self.own = own
        self.uid = None
        self.inode = None
        self.after = 0              # the last pid taken in this phase of the /proc walk
        self.phase = 0              # 0: the owner's processes; 1: the others (root); 2: done
        self.current = None         # (pid, last descriptor read) of a process cut short
        self.pid = None
        self.denied = 0
        self.done = False
        self.gone = False           # the socket is not in this namespace's tables
        self.euid = os.geteuid()
        self.me = os.getpid()

    def find_socket(self, deadline):
        """Set uid and inode of the peer's socket; False if not found."""
        try:
            found = sock_diag_find(self.family, self.peer, self.own)
        except OSError:
            found = None
            for entry in iter_proc_tcp_sockets((self.family,)):
                if entry[1:5] == (self.peer[0], self.peer[1], self.own[0], self.own[1]):
                    found = entry[6], entry[7]
                    break
                if time.monotonic() > deadline:
                    return False
        if found is None:
            self.gone = self.done = True
            return False
        self.uid, self.inode = found
        return True

    def step(self, deadline):
        """Search until done or *deadline* (a time.monotonic() value)."""
        if self.done or (self.inode is None and not self.find_socket(deadline)):
            return
        procs = [None]              # this step's os.scandir("/proc"), closed at its end
        try:
            self.walk(deadline, procs)
        finally:
            if procs[0] is not None:
                procs[0].close()

    def walk(self, deadline, procs):
        """step's search: the processes from where the last step stopped."""
        link = SOCKET_LINK % self.inode
        while time.monotonic() <= deadline:
            if self.current is None:
                pid = self.next_pid(deadline, procs)
                if pid is None:
                    self.done = True
                    return
                if pid < 0:                 # the deadline, while choosing
                    return
                self.current = (pid, -1)
            pid, last = self.current
            found = self.search_fds(pid, last, link, deadline)
            if found:
                self.pid = pid
                self.done = True
                return
            if found is None:               # the deadline: resume there next time
                return

    def search_fds(self, pid, last, link, deadline):
        """Look through /proc/*pid*/fd, the descriptors after *last*, for
        *link*: True when found, False when not there (or not readable:
        denied, or gone), None at the deadline (``current`` then says how
        far)."""
        try:
            fds = os.scandir("/proc/%d/fd" % pid)
        except PermissionError:
            self.denied += 1
            self.current = None
            return False
        except OSError:                     # gone meanwhile
            self.current = None
            return False
        with fds:
            while True:
                if time.monotonic() > deadline:
                    self.current = (pid, last)
                    return None
                try:
                    entry = next(fds)
                except (StopIteration, OSError):
                    self.current = None
                    return False
                fd = int(entry.name)
                if fd <= last:
                    continue
                last = fd
                try:
                    if os.readlink(entry.path) == link:
                        return True
                except OSError:
                    pass

    def next_pid(self, deadline, procs):
        """The next process to search: the socket owner's, then (root only)
        the others'; None when all were searched, -1 at the deadline.
        *procs* holds this step's iterator over /proc."""
        while True:
            if time.monotonic() > deadline:
                return -1
            if procs[0] is None:
                if self.phase > (1 if self.euid == 0 else 0):
                    return None
                try:
                    procs[0] = os.scandir("/proc")
                except OSError:
                    return None
            try:
                entry = next(procs[0])
            except (StopIteration, OSError):
                procs[0].close()
                procs[0] = None
                self.phase += 1
                self.after = 0
                continue
            name = entry.name
            if not name.isdigit():
                continue
            pid = int(name)
            if pid <= self.after or pid == self.me:
                continue
            self.after = pid
            try:
                uid = entry.stat(follow_symlinks=False).st_uid
            except OSError:                 # gone meanwhile
                continue
            if (uid == self.uid) != (self.phase == 0):
                continue
            if self.euid != 0 and uid != self.euid:
                self.denied += 1            # not readable: skipped without a walk
                continue
            return pid

    def describe(self, why=None):
        """``pid N (command), connected from A`` or what is known instead."""
        addr = format_addr(self.family, self.peer[0], self.peer[1])
        if self.pid is not None:
            who = "pid %d (%s)" % (self.pid, proc_command(self.pid, DIAG_COMMAND_MAX) or "?")
        elif why:
            who = "pid ? (%s)" % why
        elif self.gone:
            who = "pid ? (its socket is not in this network namespace's tables)"
        elif not self.done:
            who = "pid ? (uid %s; not found within %g ms yet, the search goes on at the next " \
                  "refusal)" % ("?" if self.uid is None else self.uid, DIAG_LOOKUP_BUDGET * 1000)
        elif self.denied:
            who = "pid ? (uid %d; not permitted to read other users' /proc/<pid>/fd)" % self.uid
        else:
            who = "pid ? (uid %d; no process holds socket inode %d)" % (self.uid, self.inode)
        return "%s, connected from %s" % (who, addr)


def alive2_name_problem(req):
    """What is wrong with the name (or extra) of an ALIVE2_REQ that
    node_reg2 refused although the name is free, in node_reg2's order."""
    name = req.name
    if len(name) > MAXSYMLEN:
        return "node name is %d bytes, at most %d are allowed" % (len(name), MAXSYMLEN)
    try:
        nchars = len(name.decode("utf-8", "strict"))
    except UnicodeDecodeError as e:
        return "node name is not UTF-8: byte %d (0x%02x) %s" % (e.start, name[e.start], e.reason)
    if nchars > MAX_NAME_CHARS:
        return "node name is %d characters, at most %d are allowed" % (nchars, MAX_NAME_CHARS)
    if len(req.extra) > MAXSYMLEN:
        return "extra is %d bytes, at most %d are allowed" % (len(req.extra), MAXSYMLEN)
    if not name:
        return "node name is empty"
    return "name refused"


def alive2_packet_problem(payload):
    """What is wrong with an ALIVE2_REQ packet that parse_alive2_req
    refused, more precisely than OTP's line, or None."""
    size = len(payload)
    if size <= ALIVE2_MIN_LEN:
        return "the packet is %d bytes, an ALIVE2_REQ needs at least %d" % (
            size, ALIVE2_MIN_LEN + 1)
    nlen = U16.unpack_from(payload, ALIVE2_FIXED_LEN - 2)[0]
    if nlen + ALIVE2_MIN_LEN > size:
        return "the name length says %d bytes, the packet has room for %d" % (
            nlen, size - ALIVE2_MIN_LEN)
    name = bytes(payload[ALIVE2_FIXED_LEN:ALIVE2_FIXED_LEN + nlen])
    elen = U16.unpack_from(payload, ALIVE2_FIXED_LEN + nlen)[0]
    if elen + nlen + ALIVE2_MIN_LEN > size:
        return "the extra length says %d bytes, the packet has room for %d" % (
            elen, size - ALIVE2_MIN_LEN - nlen)
    if b"\0" in name:
        return "node name has a NUL byte at offset %d of %d" % (name.index(b"\0"), nlen)
    return None


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


# read_at_accept's answer for a socket it dealt with itself (answered and
# closed, or closed on an error): nothing is left for conn_open.
ANSWERED = object()
NOTHING_YET = object()      # read_at_accept found nothing to read yet


def in_order(events):
    """Return the (key, mask) pairs of one select() result in the order the
    loop handles them: first the connections of registered nodes (KEPT),
    then the other connections and the SIGUSR2 wake-up, last the listening
    sockets; within each group, as the selector gave them.

    A node ends its registration by closing its connection (EOF, reset, an
    error, or any byte), so its end must be seen before any request that
    came after it: otherwise a PORT_PLEASE2_REQ sent right after the close
    is answered with the dead node's port, and an ALIVE2_REQ for the same
    name is refused (D28).  A connection accepted in this wake-up is
    read in it (read_at_accept, first_read), so the accepts come last.
    OTP's run() gets the same order differently: it accepts in one round
    and reads the new connection only in the next.
    """
    kept, other, listening = [], [], []
    for event in events:
        conn = event[0].data
        if conn is None:
            listening.append(event)
        elif conn is not WAKEUP and conn.state is KEPT:
            kept.append(event)
        else:
            other.append(event)
    return kept + other + listening


class Epmd(Handover):
    """The daemon: options, the node table, the connections and the loop.

    Options (seconds for times): *port* as configured (reported in NAMES
    and DUMP), *address* (the -address list or None), *relaxed*
    (-relaxed_command_check), *packet_timeout*, *delay_accept*,
    *delay_write*, *systemd*, and *log*, a DebugLog that carries the debug
    level and whether we are a daemon.  Mirrors OTP's EpmdVars.

    Methods by role (C counterparts in epmd_srv.c unless said):

    - start-up: bind (the part of run before the loop), conn_limit
    - the loop: run, start_loop (the part of run before its loop), handle
      (one connection's events), first_read (a new
      connection's), internal_error
      (what handle does when handling fails), check_timeouts
      (the end of run's loop), clock, epmd_cleanup_exit (epmd.c)
    - accepting: do_accept, accept_failed, read_at_accept (a guard in
      front of conn_open:
      a new connection's first read at level 0), has_room (the one test of
      room in the connection table), conn_open, shed_connection,
      pause_accept and resume_accept (D2), open_spare
    - connection state: set_state (the one place a state changes), watch,
      unwatch, epmd_conn_close, drop (node_unreg_sock + epmd_conn_close)
    - requests: do_read, read_kept (a registered node's connection),
      do_request and one handler per request code
      (do_alive2_req, do_port2_req, do_names_req, do_dump_req, do_kill_req,
      do_stop_req, in do_request's switch in C), refuse_remote,
      send_listing, reclaim (D28: the part of node_reg2 in OTP's fix of
      erlang/otp#11083)
    - writing: reply, do_write, flush
    - hand-over (the Handover mixin, D16): install_reexec_signal,
      request_reexec (the SIGUSR2 handler), drain_wakeup, handover_event
      (the wake-up socket and the trial's pipe), reexec_command, reexec,
      trial_start, trial_wait (the loop's time-out while the new image is
      tried), trial_end, trial_abort, exec_image, handover_options,
      packed_state (the walk over the connections: the state's bytes),
      adopt_listeners (bind of a new image), handover_resume,
      restore_handover and conns_from_state (run of a new image),
      fdstore_sync (systemd's fd store)
    """

    def __init__(self, port=EPMD_PORT_NO, address=None, relaxed=False,
                 packet_timeout=CLOSE_TIMEOUT, delay_accept=0, delay_write=0,
                 systemd=False, log=None):
        self.port = port
        self.address = address
        self.relaxed = relaxed
        self.packet_timeout = packet_timeout
        self.delay_accept = delay_accept
        self.delay_write = delay_write
        self.systemd = systemd
        self.log = log = log if log is not None else DebugLog()
        max_unreg = DEBUG_MAX_UNREG_COUNT if log.level else MAX_UNREG_COUNT
        self.nodes = NodeTable(log, max_unreg)
        # Nothing of an accepted connection is logged or delayed: do_accept
        # may answer it before it becomes a Connection (read_at_accept).
        self.quiet = not log.level and not delay_write
        self.conns = {}             # fd -> Connection, every open one
        self.pending = {}           # fd -> Connection READING or REPLYING (timed)
        self.listeners = []
        self.families = {}          # listening fd -> its address family
        self.sel = None
        self.max_conn = 0
        self.local_reserve = 0
        self.spare_fd = -1          # D2: kept open to shed connections on EMFILE
        self.paused_until = 0.0     # D2: listeners rest until this monotonic time
        self.last_tick = 0
        self.script = None          # hand-over: the program file a re-exec runs
        self.module_name = None     # hand-over: or the module, when started with python -m
        self.argv = []              # hand-over: the command line it gets again
        self.reexec_wanted = False  # hand-over: set by SIGUSR2, acted on by the loop
        self.trial = None           # hand-over: the new image's trial under way (Trial)
        self.wakeup = None          # hand-over: the signal wake-up socket pair
        self.handover = None        # hand-over: what the previous image passed
        self.fdstore = None         # hand-over: systemd's fd store (FdStore), if used
        self.diag = Diagnostics(self.log)   # D25, D26: refusals say who and why

    # -- start-up ---------------------------------------------------------

    def bind(self):
        """Open the listening sockets (or take systemd's) and size the
        connection table.  Raises StartupError or AlreadyRunning."""
        log = self.log
        if self.handover is not None:
            self.listeners, self.fdstore = self.adopt_listeners()
        elif self.systemd:
            log.dbg_printf(2, "try to obtain sockets from systemd")
            stored = {}
            self.listeners = systemd_listen_sockets(os.environ, stored)
            self.port = systemd_port(self.listeners, self.port)
            self.fdstore = FdStore.open(os.environ, stored, log)
        else:
            log.dbg_printf(2, "try to initiate listening port %d", self.port)
            addrs = parse_addresses(self.address)
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
    # and goes through the ready sockets in_order: the registered nodes'
    # connections first (their close, D28), then the other connections and
    # the SIGUSR2 wake-up, the listening sockets last, each group in the
    # order the selector gives:
    #   - a listening socket gets one accept (do_accept); the new connection
    #     is opened by conn_open and, since its request has usually arrived
    #     already, read at once (first_read), so most connections are answered
    #     and closed without ever being registered with the selector;
    #   - a connection gets handle(): do_write when its reply waits and the
    #     socket is writable, do_read when readable; do_read frames the
    #     packet and calls do_request once it is complete.
    # After the ready sockets: listeners paused by EMFILE are resumed when
    # their pause is over (D2), and check_timeouts closes, at most once a
    # second, the timed connections (READING, REPLYING) that brought no
    # bytes (or took none of their reply) for packet_timeout seconds, or,
    # D13, whose request is not complete REQUEST_TIME_CAP packet time-outs
    # after the accept.  Any exception raised while handling one connection
    # is logged with its traceback and only that connection is closed; the
    # loop never dies of a peer.

    def run(self):
        """Serve until KILL_REQ or a signal; return the exit status.

        Source: OTP epmd_srv.c, run (the select loop).
        """
        log = self.log
        sel = self.start_loop()
        tick = SHORT_IDLE_TIMEOUT if self.packet_timeout < IDLE_TIMEOUT else IDLE_TIMEOUT
        try:
            while True:
                timeout = tick
                if self.paused_until:
                    timeout = max(0.0, min(tick, self.paused_until - time.monotonic()))
                if self.trial is not None:      # a re-exec's trial under way
                    timeout = self.trial_wait(timeout)
                events = sel.select(timeout)
                if self.delay_accept:
                    time.sleep(self.delay_accept)
                if len(events) > 1:     # most wake-ups bring one event
                    events = in_order(events)
                for key, mask in events:
                    conn = key.data
                    if conn is None:
                        self.do_accept(key.fileobj, self.families[key.fd])
                    elif conn is WAKEUP:
                        self.handover_event(key.fileobj)
                    elif conn.state is not CLOSED:
                        self.handle(conn, mask)
                if self.paused_until and time.monotonic() >= self.paused_until:
                    self.resume_accept()
                # Most wake-ups leave no connection timed (each was answered
                # at once): the clock is then not read, which saves 5% of a
                # PORT_PLEASE2_REQ.  At level 3 every clock read is logged,
                # so there it is read as before.
                if self.pending or log.level >= 3:
                    self.check_timeouts()
                if self.reexec_wanted:
                    self.reexec()
                if self.fdstore is not None and (self.nodes.changes or self.fdstore.stale):
                    self.fdstore_sync()
        except EpmdExit as e:
            return e.code
        finally:
            self.epmd_cleanup_exit()

    def start_loop(self):
        """What run does before its loop: the selector with the listeners,
        the spare descriptor (D2), what a previous image handed over, the
        fd store's journal, READY=1 to systemd.  Returns the selector."""
        self.sel = sel = selectors.DefaultSelector()
        for ls in self.listeners:
            sel.register(ls, EVENT_READ, None)
            self.families[ls.fileno()] = int(ls.family)
        self.open_spare()
        self.handover_resume()
        if self.fdstore is not None:
            self.nodes.changes = []     # the store follows the table from now on
            self.fdstore.stale = True   # first, the whole state of this image
        if self.systemd:
            sd_notify(SD_READY % os.getpid())
        self.log.dbg_tty_printf(2, "entering the main select() loop")
        return sel

    def handle(self, conn, mask):
        """Write and/or read *conn*, a connection the selector watches, as
        *mask* says.  Any error closes this connection only, and is logged
        with a traceback."""
        try:
            if mask != EVENT_READ:  # not only readable (rare)
                if mask & EVENT_WRITE and conn.out:
                    self.do_write(conn)
            if mask & EVENT_READ and conn.state is not CLOSED:
                self.do_read(conn)
        except Exception:  # one bad client never takes us down
            self.internal_error(conn)

    def first_read(self, conn, data=None):
        """Read *conn*, accepted in this wake-up, at once (or take *data*,
        the bytes read_at_accept read from it; NOTHING_YET: it found
        nothing to read, so it is not asked again); if the rest of its request
        is still due, it starts waiting (set_state READING).  This is
        handle(conn, EVENT_READ) without its tests for the events a new
        connection cannot have (3% of a request).  Any error closes this
        connection only, and is logged with a traceback."""
        try:
            if data is not NOTHING_YET:
                self.do_read(conn, data)
            if conn.state is READING:
                self.set_state(conn, READING)
        except Exception:  # one bad client never takes us down
            self.internal_error(conn)

    def internal_error(self, conn):
        """Log the exception being handled, with its traceback, and close
        *conn* (only), unregistering its node."""
        self.log.dbg_printf(0, "internal error on file descriptor %d: %s",
                            conn.fd, format_exc())
        self.drop(conn)

    def check_timeouts(self):
        """Close the timed connections (READING, REPLYING) that brought no
        bytes for more than packet_timeout seconds (or took none of their
        reply since it began), as OTP does.  D13: in addition, a request
        not complete more than REQUEST_TIME_CAP * packet_timeout seconds
        after the accept is closed, however steadily its bytes trickle in
        (OTP serves such a trickle for ever).  Runs once per second at
        most, and run() calls it only while some connection is timed.
        Source: the end of OTP's run.
        """
        now = self.clock()
        if now == self.last_tick:
            return
        self.last_tick = now
        limit = now - self.packet_timeout
        cap = now - self.packet_timeout * REQUEST_TIME_CAP
        idle = []
        capped = []
        for c in self.pending.values():
            if c.mod_time < limit:
                idle.append(c)
            elif c.start_time < cap and not c.out:
                capped.append(c)
        for conn in idle:
            self.log.dbg_tty_printf(1, "closing because timed out on receive")
            self.epmd_conn_close(conn)
        for conn in capped:
            self.log.dbg_tty_printf(1, "closing because request not complete within %d seconds",
                                    self.packet_timeout * REQUEST_TIME_CAP)
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
        epmd_cleanup_exit (without its exit: run returns the status); a
        re-exec's trial under way is killed and reaped."""
        self.trial_abort()
        for conn in list(self.conns.values()):
            self.epmd_conn_close(conn)
        for ls in self.listeners:
            self.unwatch(ls)
            ls.close()
        self.listeners = []
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
        seconds so the loop does not spin.  The new connection goes, at
        level 0, through read_at_accept first (it may answer it outright),
        then conn_open and first_read; any error closes it only, and is
        logged with a traceback.

        lsock.accept() costs more CPU than the rest of the accept (the
        conversions of family and type to enums, the Python-level socket
        class): the socket module's own _accept (there since Python 3.3)
        gives the descriptor, made into the plain C socket type, whose
        recv, send and close need no Python frames.
        Source: OTP epmd_srv.c, do_accept.
        """
        try:
            fd, addr = lsock._accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            self.accept_failed(lsock, e)
            return
        sock = socket.SocketType(family, SOCK_STREAM, 0, fd)
        conn = None
        try:
            data = None             # not read yet: first_read reads it
            # has_room(), inline: the call would cost 1.6% of a request
            if self.quiet and len(self.conns) < self.max_conn - self.local_reserve:
                data = self.read_at_accept(sock, addr, family)
                if data is ANSWERED:
                    return
            conn = self.conn_open(sock, addr, family)
            if conn is not None:
                self.first_read(conn, data)
        except Exception:  # one bad client never takes us down
            if conn is not None:
                self.internal_error(conn)
            else:
                self.log.dbg_printf(0, "internal error on a connection accepted from %s: %s",
                                    addr, format_exc())
                sock.close()

    def read_at_accept(self, sock, addr, family):
        """A guard in front of conn_open and first_read (do_accept): the
        first read of *sock* (accepted from *addr*, of address *family*)
        when nothing of the connection is logged: at level 0, without
        -delay_write, and with room in the connection table for any peer
        (has_room), so that conn_open would open it and say nothing.

        A PORT_PLEASE2_REQ that came whole in this read, and was answered
        before for a node still registered, finds its reply in
        NodeTable.asked (keyed by the whole packet): it is sent (with
        MSG_MORE, as reply() does after a request read in one go) and the
        socket closed, without a Connection ever being made; returns
        ANSWERED.  That is the common request of a running cluster, and it
        skips 40% of the interpreter's work per request (callgrind: 35,300
        -> 21,500 instructions): the Connection, conn_open, do_read,
        do_request, do_port2_req, reply and set_state.  Otherwise returns
        the bytes read (b"" at EOF) or NOTHING_YET, for the general path.  A read or write error is logged as
        do_read and reply log it, and the socket closed (ANSWERED).  The
        wire and the log are the same either way.
        """
        try:
            data = sock.recv(FIRST_READ_SIZE, DONTWAIT)
        except (BlockingIOError, InterruptedError):    # nothing yet: it waits
            return NOTHING_YET
        except OSError as e:                            # as do_read
            self.log.dbg_perror(e, "error in read")
            sock.close()
            return ANSWERED
        resp = self.nodes.asked.get(data)
        if resp is None:
            return data
        try:
            sent = sock.send(resp, DONTWAIT_MORE)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:                            # as reply: the peer is gone
            self.log.dbg_perror(e, "error in write, errno=%d", e.errno or 0)
            sock.close()
            return ANSWERED
        if sent == len(resp):
            sock.close()
            return ANSWERED
        # The socket took only part of it (memory pressure): the rest waits
        # in a Connection, as reply() leaves it.
        conn = self.conn_open(sock, addr, family)
        if conn is not None:
            conn.out = resp[sent:]
            self.set_state(conn, REPLYING)
        return ANSWERED

    def accept_failed(self, lsock, err):
        """accept() on *lsock* failed with OSError *err*: log it; D2: on
        EMFILE/ENFILE shed the oldest waiting connection; rest the
        listeners (pause_accept) so the loop does not spin."""
        self.log.dbg_perror(err, "error in accept")
        if err.errno in (errno.EMFILE, errno.ENFILE):
            self.shed_connection(lsock)
        self.pause_accept()

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
            self.unwatch(ls)
        self.paused_until = time.monotonic() + ACCEPT_PAUSE

    def resume_accept(self):
        """Watch the listeners again after pause_accept."""
        self.paused_until = 0.0
        for ls in self.listeners:
            try:
                self.sel.register(ls, EVENT_READ, None)
            except (KeyError, ValueError):  # still registered
                pass

    def has_room(self):
        """True while the connection table has room for any peer; the last
        local_reserve slots are for local peers only (D4, conn_open)."""
        return len(self.conns) < self.max_conn - self.local_reserve

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
        room = self.has_room()
        if not room or log.level >= 2:
            local = conn_local_peer_check(sock, peer, family)
            peer = None             # decided: not kept
            if not room and (not local or len(self.conns) >= self.max_conn):
                log.dbg_tty_printf(0, "failed opening connection on file descriptor %d", fd)
                sock.close()
                return None
        conn = Connection(sock, fd, local, 0, peer)  # mod_time: set at its first wait
        if log.level >= 2:
            log.dbg_tty_printf(2, "Local peer connected" if local else "Non-local peer connected")
            log.dbg_tty_printf(2, "opening connection on file descriptor %d", fd)
        return conn

    # -- connection state ---------------------------------------------------

    def set_state(self, conn, state, restore=False):
        """Move *conn* to *state*: the one place a state changes.

        A connection is READING from conn_open on, outside the connection
        table; set_state(conn, READING) is its first wait for more of its
        request, in the wake-up that accepted it.  It keeps the rest in
        step: the connection table ``conns`` (entered at the first wait,
        left at CLOSED), the time-out index ``pending`` (READING and
        REPLYING are timed; the time-out starts now: at the accept for
        READING, with D13's cap, and at the reply for REPLYING), the
        selector interest (Connection.wanted_events), and, for CLOSED, the
        socket, closed here.  Closing a closed connection does nothing.
        *restore*: a connection handed over by the previous image enters
        *state* with the time-out clocks it had (restore_handover).
        """
        if conn.state is CLOSED:
            return
        conn.state = state
        fd = conn.fd
        if state is CLOSED:
            if self.conns.pop(fd, None) is not None:   # it has waited
                self.pending.pop(fd, None)
                if conn.events:
                    self.unwatch(conn.fd)
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
            if not restore:
                conn.mod_time = self.clock()
                if state is READING:    # its first wait: D13's cap counts from here
                    conn.start_time = conn.mod_time
            self.pending[fd] = conn
        self.watch(conn)

    def watch(self, conn):
        """Register *conn* with the selector for its wanted_events(), or
        bring its registration up to date.  A connection is registered by
        its descriptor, not its socket: the selector then takes the number
        as it is instead of asking the socket (fileno()), a tenth of the
        selector's work per registration."""
        events = conn.wanted_events()
        if events != conn.events:
            if conn.events:
                self.sel.modify(conn.fd, events, conn)
            else:
                self.sel.register(conn.fd, events, conn)
            conn.events = events

    def unwatch(self, fileobj):
        """Unregister *fileobj* from the selector if it is registered."""
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError, AttributeError):
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

    def do_read(self, conn, data=None):
        # Over 50 lines on purpose: every request but an answered-before
        # PORT_PLEASE2_REQ goes through here, and a call more per request
        # costs about 1.5% of it (callgrind).
        """Read what *conn* has (or take *data*, read already: b"" at end of
        file); run the request once the packet is complete.

        A KEPT connection goes to read_kept.  Otherwise the read is limited
        to the rest of the packet, and EOF before its end, L of 0 or over
        MAX_PACKET_LEN, and more bytes than the packet all close the
        connection without a reply.  After the request, the connection is
        KEPT (a registered node), REPLYING (its reply is not all written)
        or closed.  Source: OTP epmd_srv.c, do_read.
        """
        if conn.state is KEPT:
            self.read_kept(conn)
            return
        log = self.log
        if data is None:
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
                self.set_state(conn, REPLYING if conn.out else CLOSED)
        elif status == INCOMPLETE:
            # As OTP, the packet time-out restarts on every read that brings
            # bytes (a complete request's reply gets one of its own from
            # set_state).  D13: the request as a whole stays capped from
            # the accept (start_time, check_timeouts).
            conn.mod_time = self.clock()
        elif status == BAD_SIZE:
            log.dbg_printf(0, "invalid packet size (%d)", conn.want - HEADER_LEN)
            self.epmd_conn_close(conn)
        elif status == TOO_MUCH:
            log.dbg_printf(0, "got %d bytes in packet, expected %d",
                           conn.got - HEADER_LEN, conn.want - HEADER_LEN)
            self.epmd_conn_close(conn)

    def read_kept(self, conn):
        """A registered node's connection (KEPT) became readable: whether by
        EOF, an error or any data, its node is unregistered and it is
        closed; nothing to read yet (EAGAIN) leaves it as it is (reclaim
        relies on that).  Source: OTP epmd_srv.c, do_read (its keep part)."""
        log = self.log
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
        self.diag.remote_refused(conn, what)     # D26
        return True

    def do_alive2_req(self, conn, payload):
        """ALIVE2_REQ: register a node; reply ALIVE2_X_RESP or ALIVE2_RESP.

        On success the connection is KEPT for the life of the node.  D9: on
        an error reply (result 1, creation 99) the connection is closed,
        where OTP holds it open forever.  D1: if the reply cannot be sent,
        only the node this connection registered is unregistered.
        """
        log = self.log
        if log.level:
            log.dbg_printf(1, "** got ALIVE2_REQ")
        if self.refuse_remote(conn, "ALIVE2_REQ"):
            return
        try:
            req = parse_alive2_req(payload)
        except PacketError as e:
            log.dbg_printf(0, "%s", e)
            self.diag.alive2_malformed(conn, payload, e)    # D25
            return
        holder = self.nodes.reg.get(req.name)
        if holder is not None:
            self.reclaim(holder)
        node = self.nodes.node_reg2(req, conn)
        if node is None:
            self.diag.alive2_refused(conn, req, self.nodes)  # D25: who holds it, or why
            resp = pack_alive2_resp(RESULT_ERROR, ALIVE2_ERROR_CREATION, req.highvsn)
        else:
            resp = pack_alive2_resp(RESULT_OK, node.creation, req.highvsn)
        sent = self.reply(conn, (resp,), last=node is None)
        if log.level:
            log.dbg_tty_printf(1, "** %s ALIVE2_RESP for \"%s\"",
                               "sent" if sent else "failed to send", req.name)
        if not sent:
            if node is not None:
                self.nodes.node_unreg_sock(conn)  # D1: never another connection's node
            return
        if node is not None:
            self.set_state(conn, KEPT)

    def reclaim(self, node):
        """D28: an ALIVE2_REQ asks for the name of *node*, a registered
        node: if the connection that holds it is readable (EOF, a reset, an
        error or any bytes, each of which ends a registration) handle that
        now, exactly as the loop would have (read_kept:
        the node is unregistered, its connection closed, the same log
        lines), so the name is free for the request.  A silent, live
        holder is left as it is (the recv finds nothing: EAGAIN), and the
        request is refused as before.  Runs only when the name is taken,
        so a new name pays nothing.  A node that restarts faster than the
        loop sees its old connection close (a FIN that arrived after this
        wake-up's select) is then not refused.  Source: OTP's fix of the
        same race, erlang/otp PR 11085 (node_reg2 probes the holder's fd
        with a non-blocking select() before refusing); OTP 25 refuses.
        """
        conn = node.conn
        if conn is not None and conn.state is KEPT:
            self.read_kept(conn)

    def do_port2_req(self, conn, payload):
        """PORT_PLEASE2_REQ: answer PORT2_RESP with the node's fields, or
        'w' 1 when the name is not registered.  Anyone may ask.  (At level
        0, a request answered before for a registered node is mostly
        answered by read_at_accept, before it gets here.)"""
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
        resp = self.nodes.port2_resp(name, payload)
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
# Client commands (OTP epmd_cli.c), and -status (epmd.py only)
# ---------------------------------------------------------------------------


# D29: OTP's client commands wait for ever on a daemon that accepted but does
# not answer (stopped with SIGSTOP, hung, or not an epmd at all).
CLIENT_TIMEOUT = 10.0               # seconds a client command waits for its answer in all
CLIENT_TIMEOUT_ENV = "EPMD_PY_CLIENT_TIMEOUT"   # seconds instead; 0 waits for ever, as OTP
CLIENT_TIMEOUT_LINE = ("epmd: no answer from local epmd on port %d within %g s "
                       "(%s sets the time-out)\n")


class ClientTimeout(Exception):
    """A client command's time-out ran out (D29): the caller prints
    CLIENT_TIMEOUT_LINE (unless silent) and exits 1."""


def parse_client_timeout(value):
    """EPMD_PY_CLIENT_TIMEOUT: seconds (a decimal number, fractions allowed)
    a client command may take, 0 for no limit; None when *value* is None.
    Raises ValueError for anything else (negative, not a number, inf, nan)."""
    if value is None:
        return None
    secs = float(value)
    if not 0 <= secs < float("inf"):
        raise ValueError(value)
    return secs


def client_deadline(timeout):
    """The time.monotonic() deadline of a client command given *timeout*
    seconds (None when 0: no limit)."""
    return time.monotonic() + timeout if timeout else None


def time_left(deadline):
    """Seconds left until *deadline* (for settimeout: None without one);
    raises ClientTimeout when none are left."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClientTimeout()
    return left


def conn_to_epmd(port, silent=False, deadline=None):
    """Connect to the local epmd on *port*: ``::1`` first, then 127.0.0.1.

    Returns the socket (with a time-out of what is left until *deadline*,
    a time.monotonic() value, if given), or None after printing ``epmd:
    Cannot connect to local epmd`` on stderr (nothing when *silent*).
    Raises ClientTimeout when *deadline* passes while connecting (a daemon
    whose accept queue is full).  Source: OTP epmd_cli.c, conn_to_epmd.
    """
    for family, addr in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.settimeout(time_left(deadline))
            sock.connect((addr, port))
            return sock
        except socket.timeout:
            sock.close()
            raise ClientTimeout() from None
        except OSError:
            sock.close()
        except ClientTimeout:
            sock.close()
            raise
    if not silent:
        sys.stderr.write("epmd: Cannot connect to local epmd\n")
        sys.stderr.flush()
    return None


def client_recv(sock, size, deadline):
    """sock.recv(*size*) within *deadline*: raises ClientTimeout when it
    passes, OSError for any other failure."""
    sock.settimeout(time_left(deadline))
    try:
        return sock.recv(size)
    except socket.timeout:
        raise ClientTimeout() from None


def read_fill(sock, n, deadline=None):
    """Read exactly *n* bytes; return them, b"" on EOF before that, or None
    on a read error; raises ClientTimeout when *deadline* passes.
    Source: OTP epmd_cli.c, read_fill."""
    got = b""
    while len(got) < n:
        try:
            data = client_recv(sock, n - len(got), deadline)
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


def send_request(sock, payload, deadline=None):
    """Send *payload* with its u16 length; print OTP's error and return False
    if that fails; raises ClientTimeout when *deadline* passes."""
    try:
        sock.settimeout(time_left(deadline))
        sock.sendall(U16.pack(len(payload)) + payload)
        return True
    except socket.timeout:
        raise ClientTimeout() from None
    except OSError:
        _out(b"epmd: Can't write to epmd\n")
        return False


def run_timed(command, port, timeout, silent=False):
    """Run ``command(deadline)``, a client command given its deadline
    (None when *timeout* is 0 or None: wait for ever, as OTP), and return
    its exit status.  D29: a ClientTimeout becomes CLIENT_TIMEOUT_LINE on
    stderr (nothing when *silent*) and exit 1."""
    try:
        return command(client_deadline(timeout))
    except ClientTimeout:
        if not silent:
            sys.stderr.write(CLIENT_TIMEOUT_LINE % (port, timeout, CLIENT_TIMEOUT_ENV))
            sys.stderr.flush()
        return 1


def epmd_call(port, what, silent=False, timeout=CLIENT_TIMEOUT):
    """-names (NAMES_REQ), -dump (DUMP_REQ) and -started (silent NAMES_REQ).

    Prints ``epmd: up and running on port P with data:`` and the reply as it
    comes, raw; returns 0, or 1 when epmd cannot be reached or answers with
    fewer than 4 bytes in its first read.  D29: 1 too, with
    CLIENT_TIMEOUT_LINE on stderr (-started: silently), when the whole
    exchange takes more than *timeout* seconds (0: no limit).
    Source: OTP epmd_cli.c, epmd_call.
    """
    def call(deadline):
        sock = conn_to_epmd(port, silent, deadline)
        if sock is None:
            return 1
        with sock:
            if not send_request(sock, bytes((what,)), deadline):
                return 1
            try:
                head = client_recv(sock, NAMES_HEADER_LEN, deadline)
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
                    data = client_recv(sock, CLIENT_READ_SIZE, deadline)
                except OSError:
                    data = b""
                if not data:
                    return 0
                if not silent:
                    _out(data)
    return run_timed(call, port, timeout, silent)


def _answer(data):
    """Print OTP's message for a short (b"") or failed (None) answer; return 1."""
    if data is None:
        _out(b"epmd: failed to read answer from local epmd\n")
    else:
        _out(b"epmd: local epmd responded with <>\n")
    return 1


def kill_epmd(port, timeout=CLIENT_TIMEOUT):
    """-kill: ``Killed`` (0), ``Killing not allowed - living nodes in
    database.`` (1), or OTP's message for no answer (1); D29: the time-out
    line after *timeout* seconds (1).  Source: OTP epmd_cli.c, kill_epmd."""
    def call(deadline):
        sock = conn_to_epmd(port, deadline=deadline)
        if sock is None:
            return 1
        with sock:
            if not send_request(sock, bytes((KILL_REQ,)), deadline):
                return 1
            data = read_fill(sock, len(KILL_OK), deadline)
            if not data:
                return _answer(data)
            if data == KILL_OK:
                _out(b"Killed\n")
                return 0
            _out(b"Killing not allowed - living nodes in database.\n")
            return 1
    return run_timed(call, port, timeout)


def stop_cli(port, name, timeout=CLIENT_TIMEOUT):
    """-stop NAME: print the 7-byte answer (``STOPPED`` or ``NOEXIST``), 0;
    ``epmd: Name too long!`` (no newline) for names over 1000 bytes, 1;
    D29: the time-out line after *timeout* seconds, 1.
    Source: OTP epmd_cli.c, stop_cli."""
    if len(name) > CLIENT_MAX_STOP_NAME:
        _out(b"epmd: Name too long!")
        return 1

    def call(deadline):
        sock = conn_to_epmd(port, deadline=deadline)
        if sock is None:
            return 1
        with sock:
            if not send_request(sock, bytes((STOP_REQ,)) + name, deadline):
                return 1
            data = read_fill(sock, len(STOP_OK), deadline)
            if not data:
                return _answer(data)
            _out(data + b"\n")
            return 0
    return run_timed(call, port, timeout)


# -- -status (D27) ---------------------------------------------------------------

STATUS_ANSWER_TIMEOUT = 2.0         # seconds -status waits for NAMES_REQ's answer
                                    # (EPMD_PY_CLIENT_TIMEOUT instead when set)
# What -status finds on the port, its "state" in -json, and its exit status.
STATE_SERVING = "serving"           # an epmd answers NAMES_REQ
STATE_NOT_LISTENING = "not listening"   # nothing listens: connections are refused
STATE_NOT_ANSWERING = "not answering"   # something listens, but no epmd answer in time
STATUS_EXIT = {STATE_SERVING: 0, STATE_NOT_LISTENING: 1, STATE_NOT_ANSWERING: 3}
# How -status text shows a control character or a lone surrogate (an invalid
# UTF-8 byte of a node name) of a name or command: as JSON writes it (issue 20).
JSON_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
C1_END = 0xA0                       # U+0080..U+009F are control characters too


def escape_controls(s):
    """*s* with every control character (U+0000..U+001F, U+007F..U+009F),
    lone surrogate and backslash escaped as JSON writes them (``\\n``,
    ``\\u001b``, ``\\udcff``, ``\\\\``), so that a node name cannot move the
    cursor or recolour the terminal; everything else is left as it is."""
    out = []
    for c in s:
        o = ord(c)
        if c in JSON_ESCAPES:
            out.append(JSON_ESCAPES[c])
        elif o < 0x20 or 0x7F <= o < C1_END or 0xD800 <= o <= 0xDFFF:
            out.append("\\u%04x" % o)
        else:
            out.append(c)
    return "".join(out)


def _status_procs(pids_by_inode, inodes):
    """The sorted pids holding any of *inodes*, and the first one's command."""
    pids = sorted({p for i in inodes for p in pids_by_inode.get(i, ())})
    return pids, (proc_command(pids[0]) if pids else None)


def port_accepts(port, timeout=STATUS_CONNECT_TIMEOUT):
    """Try to connect to *port* on 127.0.0.1, then ::1; return "accepts",
    or why not ("refused", "timed out", or the error's text)."""
    why = "refused"
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((addr, port))
                return "accepts"
        except socket.timeout:
            why = "timed out"
        except ConnectionRefusedError:
            pass
        except OSError as e:
            if why == "refused":
                why = e.strerror or str(e)
    return why


def _ask(port, payload, timeout):
    """One request to the local epmd on *port* (conn_to_epmd: ::1, then
    127.0.0.1), all within *timeout* seconds (0 or None: no limit).
    Returns (answer, why): the bytes read until the peer closed and None,
    or None and why there is none: "refused" (nothing accepts on ::1 or
    127.0.0.1), "timed out", or the error's text."""
    deadline = client_deadline(timeout)
    chunks = []
    try:
        sock = conn_to_epmd(port, silent=True, deadline=deadline)
        if sock is None:
            return None, "refused"
        with sock:
            sock.settimeout(time_left(deadline))
            sock.sendall(U16.pack(len(payload)) + payload)
            while True:
                data = client_recv(sock, CLIENT_READ_SIZE, deadline)
                if not data:
                    break
                chunks.append(data)
    except (ClientTimeout, socket.timeout):
        return None, "timed out"
    except OSError as e:
        return None, e.strerror or str(e)
    return b"".join(chunks), None


def parse_names_reply(body):
    """(name, port) pairs of the lines of a NAMES_REQ answer (after its u32)."""
    out = []
    for line in body.split(b"\n"):
        if not line.startswith(b"name "):
            continue
        name, sep, port = line[5:].rpartition(b" at port ")
        if sep and port.isdigit():
            out.append((name, int(port)))
    return out


def proc_readable():
    """Why process ids cannot be found here (/proc missing, or its
    per-process directories hidden, as hardened containers do), or None
    when this process can read its own /proc/<pid>/fd."""
    try:
        os.listdir("/proc/%d/fd" % os.getpid())
        return None
    except OSError as e:
        return "process ids unknown: /proc/<pid>/fd cannot be read here (%s): /proc is " \
               "hidden or not mounted" % (e.strerror or e)


def not_answering_why(port, answer, why, timeout, on_loopback):
    """The *error* of a port something listens on without an epmd answer."""
    if not on_loopback:
        return "it listens on port %d, but not on ::1 or 127.0.0.1, where nodes and clients " \
               "ask" % port
    if why == "timed out":
        return "something listens on port %d but did not answer NAMES_REQ within %g s" % (
            port, timeout)
    if why is not None:
        return "something listens on port %d but the connection failed: %s" % (port, why)
    if not answer:
        return "something listens on port %d but closed the connection without an answer" % port
    return "something listens on port %d but its answer to NAMES_REQ (%d bytes) is not an " \
           "epmd's" % (port, len(answer))


def epmd_status(port, timeout=STATUS_ANSWER_TIMEOUT):
    # Over 50 lines by its docstring alone: the JSON that -status -json
    # prints is described where it is made.
    """Gather what -status shows, as the dict -status -json prints:

        port        the port asked (int)
        state       "serving" (an epmd answered NAMES_REQ within *timeout*
                    seconds), "not listening" (nothing listens on the port:
                    ::1 and 127.0.0.1 refuse connections), or "not
                    answering" (something listens, see listeners, but no
                    epmd answered within *timeout*: a stopped or hung
                    daemon, or another program); STATUS_EXIT gives the exit
                    status of each
        running     state == "serving" (bool)
        error       why not (str), or null
        listeners   one object per listening socket on *port* in this
                    network namespace: address, port, family ("ipv4",
                    "ipv6"), pids (list of int, empty when unknown), command
                    (str or null), queued (connections waiting to be
                    accepted; null where only /proc/net/tcp was readable)
        listeners_source  where the listeners were read: "sock_diag" (the
                    kernel's netlink interface), "/proc/net/tcp" (where
                    netlink is not allowed), or null (neither: unknown)
        names       one object per registered name, newest first: name,
                    port (its distribution port), type ("normal", "hidden",
                    or "type N"; null if it left meanwhile), nodetype (int or
                    null), pids and command of the processes listening on
                    the distribution port, connect ("accepts", "refused",
                    "timed out", ...), accepts (bool)
        pids_hidden whether process ids may be missing: some processes'
                    descriptors were not readable (not root), or /proc is
                    not readable at all (bool)
        pids_hidden_why  why (str), or null
    """
    status = {"port": port, "state": STATE_SERVING, "running": False, "error": None,
              "listeners": [], "listeners_source": None, "names": [], "pids_hidden": False,
              "pids_hidden_why": None}
    # the port's own listeners first, so that their queues do not count
    # the connection of this NAMES_REQ
    own, source = find_listeners((port,))
    own = own or []
    status["listeners_source"] = source
    answer, why = _ask(port, bytes((NAMES_REQ,)), timeout)
    names = []
    if answer is not None and is_names_reply(answer, port):
        status["running"] = True
        names = parse_names_reply(answer[NAMES_HEADER_LEN:])
    listening = list(own)
    if names:
        listening += [ls for ls in find_listeners({p for _, p in names} - {port})[0] or ()]
    if not status["running"]:
        if why == "refused" and not own:
            status["state"] = STATE_NOT_LISTENING
            status["error"] = "nothing listens there (::1 and 127.0.0.1 refuse connections)"
        else:
            status["state"] = STATE_NOT_ANSWERING
            status["error"] = not_answering_why(port, answer, why, timeout, why != "refused")
    pids, denied = socket_pids([ls.inode for ls in listening])
    hidden = proc_readable()
    if hidden is None and denied:
        hidden = "other users' processes are not visible without privileges: run as root " \
                 "to see every PID"
    status["pids_hidden"] = hidden is not None
    status["pids_hidden_why"] = hidden
    status["listeners"] = [status_of_listener(port, ls, pids) for ls in own]
    status["names"] = [status_of_name(port, name, nport, timeout, pids, listening)
                       for name, nport in names]
    return status


def status_of_listener(port, ls, pids):
    """epmd_status' object for the listening socket *ls* (a Listener) on
    *port*, its processes found in *pids* ({inode: pids})."""
    p, cmd = _status_procs(pids, (ls.inode,))
    return {"address": ls.address, "port": port, "pids": p, "command": cmd,
            "queued": ls.queued, "family": "ipv6" if ls.family == socket.AF_INET6 else "ipv4"}


def status_of_name(port, name, nport, timeout, pids, listening):
    """epmd_status' object for the registered *name* at distribution port
    *nport* (see there): its node type asked of the epmd on *port*, the
    processes among *pids* ({inode: pids}) listening on *nport* in
    *listening*, and whether that port accepts a connection."""
    nodetype = None
    resp, _ = _ask(port, bytes((PORT_PLEASE2_REQ,)) + name, timeout)
    if resp and len(resp) >= PORT2_RESP_FIXED.size and resp[1] == RESULT_OK:
        nodetype = PORT2_RESP_FIXED.unpack_from(resp)[3]
    p, cmd = _status_procs(pids, [ls.inode for ls in listening if ls.port == nport])
    connect = port_accepts(nport)
    return {"name": text(name), "port": nport, "nodetype": nodetype,
            "type": None if nodetype is None else NODE_TYPES.get(nodetype, "type %d" % nodetype),
            "pids": p, "command": cmd, "connect": connect, "accepts": connect == "accepts"}


def _cut(s, limit=STATUS_COMMAND_MAX):
    """*s* escaped (escape_controls) and cut to *limit* characters, or ``?``."""
    if s is None:
        return "?"
    s = escape_controls(s)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _table(rows):
    """Rows of strings as lines of left-aligned columns (the last unpadded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]


def format_status(status):
    """The text -status prints for *status* (see epmd_status), as lines:
    the verdict, the listening sockets (ADDRESS, PID, COMMAND), the names
    (NAME, PORT, TYPE, PID, CONNECT, COMMAND) when an epmd answers, and why
    PIDs may be missing.  Names and commands are escaped (escape_controls)."""
    port = status["port"]
    state = status["state"]
    if state == STATE_NOT_LISTENING:
        return ["epmd: not running on port %d: %s" % (port, status["error"])]
    if state == STATE_SERVING:
        lines = ["epmd: up and running on port %d" % port]
    else:
        queued = sum(ls["queued"] or 0 for ls in status["listeners"])
        lines = ["epmd: not answering on port %d: %s%s" % (
            port, status["error"], "; %d connection%s wait%s to be accepted" % (
                queued, "" if queued == 1 else "s", "s" if queued == 1 else "")
            if queued else "")]
    rows = [("ADDRESS", "PID", "COMMAND")]
    for ls in status["listeners"]:
        rows.append((format_addr(socket.AF_INET6 if ls["family"] == "ipv6" else socket.AF_INET,
                                 ls["address"], ls["port"]),
                     ",".join(map(str, ls["pids"])) or "?", _cut(ls["command"])))
    if len(rows) > 1:
        lines += _table(rows)
    elif status["listeners_source"] is None:
        lines.append("listening sockets: ? (neither sock_diag nor /proc/net/tcp can be read here)")
    else:
        lines.append("listening sockets: none on port %d in this network namespace (the epmd "
                     "that answers listens in another one, e.g. a container's)" % port)
    if state == STATE_SERVING:
        if not status["names"]:
            lines.append("no names registered")
        else:
            rows = [("NAME", "PORT", "TYPE", "PID", "CONNECT", "COMMAND")]
            for n in status["names"]:
                rows.append((escape_controls(n["name"]), str(n["port"]), n["type"] or "?",
                             ",".join(map(str, n["pids"])) or "?", n["connect"],
                             _cut(n["command"])))
            lines += _table(rows)
    if status["pids_hidden"]:
        lines.append("(%s)" % status["pids_hidden_why"])
    return lines


def status_cli(port, as_json=False, timeout=STATUS_ANSWER_TIMEOUT):
    """-status [-json]: print whether an epmd serves *port*, where it
    listens, and each registered name with who listens on its port.
    Exit status (STATUS_EXIT): 0 when an epmd answers, 1 when nothing
    listens on the port, 3 when something listens but no epmd answers
    within *timeout* seconds."""
    status = epmd_status(port, timeout)
    if as_json:
        import json
        out = json.dumps(status, sort_keys=True) + "\n"
    else:
        out = "".join(line + "\n" for line in format_status(status))
    _out(out.encode("utf-8", "surrogateescape"))
    return STATUS_EXIT[status["state"]]


# ---------------------------------------------------------------------------
# Command line (OTP epmd.c: main, usage, run_daemon)
# ---------------------------------------------------------------------------

USAGE = """\
usage: epmd [-d|-debug] [DbgExtra...] [-address List]
            [-port No] [-daemon] [-relaxed_command_check] [-systemd]
       epmd [-d|-debug] [-port No] [-names|-dump|-started|-kill|-stop Name]
       epmd [-port No] -status [-json]
       epmd -h|-help|--help|-version|--version

epmd.py, the Erlang port mapper daemon; see epmd(1).

Daemon options
    -address List
        Listen on these IP addresses (separated by commas or spaces), and
        on 127.0.0.1 and ::1 unless that address or its family's wildcard
        (0.0.0.0, ::) is listed.  Default: every address.
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
        Serve the sockets passed by systemd socket activation
        (LISTEN_FDS, for the process LISTEN_PID).

DbgExtra options
    -packet_timeout Seconds
        Close a connection that sends nothing for this long before its
        request is complete, or does not take its reply for this long
        (default %(timeout)d), and one whose request is not complete
        %(cap)d times this long after it was accepted.
    -delay_accept Seconds
        Sleep this long after every wake-up (simulates a busy daemon).
    -delay_write Seconds
        Sleep this long before every reply write (simulates a busy daemon).

Client options (talk to the epmd on -port; give up after %(client_timeout)g s
without an answer, or after $%(timeout_env)s seconds, 0 for never)
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
    -status
        Say whether an epmd serves the port, where it listens, and for
        each name its port, node type, the process listening there and
        whether the port accepts a connection.  Exit 0 if an epmd answers,
        1 if not (epmd.py only).
    -json
        With -status: print one JSON object instead (epmd.py only).

Other options
    -h, -help, --help
        Print this text on stdout and exit 0.
    -version, --version
        Print the version of epmd.py and exit 0.
"""

USAGE_SHORT = """\
usage: epmd [options] [-names|-dump|-started|-kill|-stop Name|-status [-json]]
see `epmd -help`
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
    "-status": ("status", False),
    "-json": ("json", False),
}
ALL_FLAGS = dict(DAEMON_FLAGS, **CLIENT_FLAGS)
# D14: requests for help and the version, answered on stdout with exit 0
# (OTP's epmd knows neither: "unknown option", usage on stderr, exit 1).
INFO_FLAGS = {
    "-h": "help",
    "-help": "help",
    "--help": "help",
    "-version": "version",
    "--version": "version",
}

# The process name (/proc/PID/comm, what `pgrep -x`, `ps -C`, `killall` and
# the journal match): "epmd", as OTP's binary, not "python3".
PROCESS_NAME = b"epmd"
PROC_COMM = "/proc/self/comm"
PR_SET_NAME = 15                    # linux/prctl.h
# syslog, with -daemon: the tag of OTP's lines (glibc's default, its program
# name), and the socket glibc's syslog() writes to (_PATH_LOG).
SYSLOG_PATH = "/dev/log"


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


C_SPACE = " \t\n\v\f\r"               # what C's atoi() skips before the number
INT_MAX = 2 ** 31 - 1


def atoi(value):
    """C's atoi(): the leading integer of *value* ("1.5" -> 1, "5s" -> 5,
    " +7" -> 7, "-3" -> -3), or 0 when it has none.  Values beyond a C int
    are returned as they are (atoi's result is undefined there)."""
    rest = value.lstrip(C_SPACE)
    sign = ""
    if rest[:1] in ("+", "-"):
        sign, rest = rest[:1], rest[1:]
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return int(sign + rest[:digits], 10) if digits else 0


def parse_seconds(flag, value):
    """Return the seconds of -packet_timeout, -delay_accept or -delay_write.

    As OTP, the leading integer counts (atoi: "1.5" is 1, "5s" is 5) and 0
    (or no number) is a usage error.  D21: a negative value, which OTP takes
    (a negative -packet_timeout times every request out at once, a negative
    delay sleeps for a century), and one beyond a C int, are usage errors
    too.  Raises UsageError.  Source: OTP epmd.c, main.
    """
    secs = atoi(value)
    if secs == 0:
        raise UsageError("invalid value for %s: %r (expected whole seconds >= 1)" % (flag, value))
    if not 1 <= secs <= INT_MAX:
        raise UsageError("invalid value for %s: %r (OTP reads it as %d seconds; expected "
                         "1..%d)" % (flag, value, secs, INT_MAX))
    return secs


SUGGEST_CUTOFF = 0.75                 # difflib ratio a flag needs to be suggested
SUGGEST_MIN_PREFIX = 3                # characters of a flag's start that suggest it


def did_you_mean(arg):
    """`` (did you mean -names?)`` for an unknown flag *arg* close to a known
    one (``--names``, ``-name``, ``-stauts``, ``-relaxed``), else ``""``.
    In this order: the flag with one dash less; the one flag that *arg*
    (without its dashes, at least SUGGEST_MIN_PREFIX characters) begins;
    the closest flag by difflib's ratio, if at least SUGGEST_CUTOFF."""
    import difflib
    known = list(ALL_FLAGS) + list(INFO_FLAGS)
    body = arg.lstrip("-")
    prefixed = [k for k in known if len(body) >= SUGGEST_MIN_PREFIX and k.lstrip("-").startswith(body)]
    if arg.startswith("--") and arg[1:] in known:
        close = [arg[1:]]
    elif len(prefixed) == 1:
        close = prefixed
    else:
        close = difflib.get_close_matches(arg, known, n=1, cutoff=SUGGEST_CUTOFF)
    return " (did you mean %s?)" % close[0] if close else ""


def client_timeout_of(environ):
    """The seconds $EPMD_PY_CLIENT_TIMEOUT gives (0: no limit), or None
    when unset.  Raises UsageError for anything else."""
    try:
        return parse_client_timeout(environ.get(CLIENT_TIMEOUT_ENV))
    except ValueError:
        raise UsageError("invalid %s: %r (expected seconds >= 0; 0 waits for ever)"
                         % (CLIENT_TIMEOUT_ENV, environ[CLIENT_TIMEOUT_ENV])) from None


def take_flag(opts, flag, key, value):
    """parse_args: set in *opts* what *flag* (its option *key*, with *value*
    or None) says.  Raises UsageError for a bad value or a second client
    action."""
    if key == "debug":
        opts["debug"] += 1
    elif key == "port":
        opts["port"] = parse_port(value, "for -port")
        opts["port_given"] = True
    elif key == "address":
        opts["address"] = value
    elif key in ("packet_timeout", "delay_accept", "delay_write"):
        opts[key] = parse_seconds(flag, value)
    elif key in ("daemon", "relaxed", "systemd", "json"):
        opts[key] = True
    else:
        if opts["action"] is not None:
            raise UsageError("only one of -names, -dump, -started, -kill, -stop, -status "
                             "may be given")
        opts["action"] = key
        if key == "stop":
            opts["stop_name"] = os.fsencode(value)


def parse_args(argv, environ):
    """Parse the command line *argv* (without the program name).

    Returns a dict of options: port, address, debug, daemon, relaxed,
    systemd, packet_timeout, delay_accept, delay_write, and action (None,
    "names", "dump", "started", "kill", "stop" or "status") with stop_name
    (bytes), json (-json, for -status) and client_timeout (seconds a client
    command may take, from EPMD_PY_CLIENT_TIMEOUT; 0: no limit).  A request for help or the
    version (INFO_FLAGS) returns at once with action "help" or "version".
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
        "json": False, "client_timeout": CLIENT_TIMEOUT, "client_timeout_given": False,
    }
    env_port = environ.get("ERL_EPMD_PORT")
    secs = client_timeout_of(environ)
    if secs is not None:
        opts["client_timeout"] = secs
        opts["client_timeout_given"] = True
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in INFO_FLAGS:
            opts["action"] = INFO_FLAGS[arg]     # D14: wins over everything else
            return opts
        spec = ALL_FLAGS.get(arg)
        if spec is None:
            raise UsageError("unknown option %r%s" % (arg, did_you_mean(arg)))
        key, takes_value = spec
        value = None
        if takes_value:
            if i + 1 >= len(argv):
                raise UsageError("%s needs a value" % arg)
            value = argv[i + 1]
            i += 1
        i += 1
        take_flag(opts, arg, key, value)
    if not opts["port_given"] and env_port is not None:
        opts["port"] = parse_port(env_port, "in ERL_EPMD_PORT")
    return opts


def usage(msg=None, out=None):
    """Print *msg* (if any), the one-line synopsis and where the help is, on
    stderr; return 1 (a usage error)::

        epmd: unknown option '--names' (did you mean -names?)
        usage: epmd [options] [-names|-dump|-started|-kill|-stop Name|-status [-json]]
        see `epmd -help`

    D23: OTP prints its whole usage text alone; 63 lines of help would
    scroll the error line away.  With *out* (a text stream), print the
    whole usage text there and return 0: the answer to -h, -help and
    --help (D14).
    """
    if out is not None:
        out.write(USAGE % {"port": EPMD_PORT_NO, "debug_unreg": DEBUG_MAX_UNREG_COUNT,
                           "timeout": CLOSE_TIMEOUT, "cap": REQUEST_TIME_CAP,
                           "client_timeout": CLIENT_TIMEOUT, "timeout_env": CLIENT_TIMEOUT_ENV})
        out.flush()
        return 0
    if msg:
        sys.stderr.write("epmd: %s\n" % msg)
    sys.stderr.write(USAGE_SHORT)
    sys.stderr.flush()
    return 1


def set_process_name(name=PROCESS_NAME, comm_path=PROC_COMM):
    """Name this process *name* (bytes, at most 15) for `pgrep -x`, `ps -C`,
    `killall` and the journal, as OTP's binary is named; return True if done.

    Writes /proc/self/comm; where /proc is not mounted, calls
    prctl(PR_SET_NAME) through ctypes.  Never raises: without /proc, libc,
    prctl or ctypes (not Linux, a minimal Python), the name stays.
    """
    try:
        with open(comm_path, "wb") as f:
            f.write(name)
        return True
    except OSError:
        pass
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) == 0
    except Exception:       # ImportError, OSError, AttributeError: no such call here
        return False


def syslog_unreachable(path=SYSLOG_PATH):
    """Return why syslog(3) cannot deliver to *path* (a str), or None if it can.

    glibc's syslog() sends datagrams to /dev/log (trying a stream socket
    when the datagram connect fails) and silently drops every line when
    neither connects: most containers have no /dev/log.
    """
    reasons = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(path)
            return None
        except OSError as e:
            reasons.append(e.strerror or str(e))
        finally:
            s.close()
    return reasons[0]


def make_daemon(opts):
    """Build the Epmd of the parsed options *opts*."""
    return Epmd(port=opts["port"], address=opts["address"],
                relaxed=opts["relaxed"], packet_timeout=opts["packet_timeout"],
                delay_accept=opts["delay_accept"], delay_write=opts["delay_write"],
                systemd=opts["systemd"], log=DebugLog(opts["debug"], opts["daemon"]))


def _terminate(signum, frame):
    """D22: SIGTERM and SIGINT end the loop and exit 0 (sockets closed,
    systemd told); OTP's epmd dies of the signal."""
    raise EpmdExit(0)


# erl's launcher (erlexec) sets these before it runs `epmd -daemon`, as it
# does every time a distributed node starts.
ERLEXEC_ENV = ("BINDIR", "EMU", "PROGNAME")


def already_served_line(port, environ):
    """The line -daemon prints (without ``epmd: ``) when an epmd already
    serves *port*: which process serves it (D5).  Empty when erl started
    this epmd (every variable of ERLEXEC_ENV set): erl runs ``epmd
    -daemon`` at every start of a distributed node, and the line would
    follow every such start."""
    if all(v in environ for v in ERLEXEC_ENV):
        return ""
    try:
        who = port_servers_text(port)
    except Exception as e:  # diagnostics only: the exit status stays 0
        who = "pid ? (%r)" % (e,)
    return "an epmd already serves port %d: %s; this one exits without serving" % (port, who)


def serve(epmd, ready=None):
    """Bind, report readiness through *ready* (a callable taking an exit
    code and a message, for -daemon), then run; return the exit status.

    Port in use by an epmd: exit 0, as OTP; D12: the "already running" line
    is printed at level 0 in the foreground (OTP prints it only with -d).
    D18: in use by anything else, exit 1 (StartupError, see
    check_port_holders).
    """
    log = epmd.log
    log.dbg_printf(1, "epmd running - daemon = %d", int(log.is_daemon))
    try:
        epmd.bind()
    except AlreadyRunning as e:
        log.dbg_tty_printf(0, "%s", e)
        if ready:
            ready(0, already_served_line(epmd.port, os.environ))
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
    # A SIGINT inherited as ignored (a background job of a script) stays
    # ignored, as in OTP's daemon, which never touches SIGINT.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _terminate)
    epmd.install_reexec_signal()
    code = 0
    try:
        code = epmd.run()
    finally:
        if epmd.systemd:
            sd_notify(SD_EXITED % code)
    return code


def detach(keep):
    """run_daemon's child: a session of its own (setsid), SIGHUP ignored,
    a second fork (the first child exits), cwd "/", umask 0, the standard
    streams on /dev/null, and nothing inherited open but descriptor
    *keep* (the pipe to the waiting caller)."""
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
    os.closerange(3, keep)
    os.closerange(keep + 1, MAX_INHERITED_FD)


def daemon_verdict(pid, rfd):
    """run_daemon's caller side: wait for the first child *pid*, read the
    verdict the daemon writes to pipe *rfd* ("<exit status> <message>"),
    print the message on stderr, return the status (1 if none came)."""
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


def run_daemon(epmd):
    """-daemon: detach, bind, and tell the waiting parent how binding went.

    Double fork with setsid() between, SIGHUP ignored, cwd "/", umask 0,
    standard streams on /dev/null, logging to syslog.  D5: the parent
    returns only once the daemon has bound its sockets: 0 when it serves
    (or another epmd holds the port, as OTP; then with a line on stderr
    naming the process that serves it, already_served_line), 1 with the bind
    error on stderr (D18: also when the port is held by anything but an
    epmd).  Should the child fail in any other way before it is bound, the
    parent prints that error and returns 1; after binding, the traceback
    goes to the log.  Source: OTP epmd.c, run_daemon.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:  # the caller: wait for the verdict
        os.close(wfd)
        return daemon_verdict(pid, rfd)
    sent = []

    def ready(code, msg):
        os.write(wfd, ("%d %s" % (code, msg)).encode("utf-8", "replace"))
        os.close(wfd)
        sent.append(True)

    try:
        os.close(rfd)
        detach(wfd)
        code = serve(epmd, ready)
        if not sent:
            os.close(wfd)
        os._exit(code)
    except BaseException as e:
        try:
            if sent:
                epmd.log.dbg_printf(0, "internal error: %s", format_exc())
            else:
                ready(1, "internal error in the daemon before it served: %r" % (e,))
        finally:
            os._exit(1)


def client_action(action, opts):
    """Run the client action *action* (-names, -dump, -started, -kill,
    -stop, -status) with *opts*; return its exit status."""
    port = opts["port"]
    timeout = opts["client_timeout"]
    if action == "names":
        return epmd_call(port, NAMES_REQ, timeout=timeout)
    if action == "dump":
        return epmd_call(port, DUMP_REQ, timeout=timeout)
    if action == "started":
        return epmd_call(port, NAMES_REQ, silent=True, timeout=timeout)
    if action == "kill":
        return kill_epmd(port, timeout)
    if action == "stop":
        return stop_cli(port, opts["stop_name"], timeout)
    return status_cli(port, opts["json"], timeout if opts["client_timeout_given"]
                      else STATUS_ANSWER_TIMEOUT)


def main(argv=None):
    """Run epmd with *argv* (default: sys.argv[1:]); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        opts = parse_args(argv, os.environ)
    except UsageError as e:
        return usage(str(e))
    action = opts["action"]
    if action == "help":
        return usage(out=sys.stdout)
    if action == "version":
        sys.stdout.write("epmd.py %s\n" % __version__)
        sys.stdout.flush()
        return 0
    set_process_name()
    if opts["json"] and action != "status":
        return usage("-json goes with -status only")
    if action is not None:
        return client_action(action, opts)
    return daemon_main(opts, argv)


def daemon_main(opts, argv):
    """main for the daemon (no client action): a re-exec's trial run
    (HANDOVER_CHECK_ENV), a new image taking a hand-over, -daemon, or the
    foreground; returns the exit status."""
    if os.environ.get(HANDOVER_CHECK_ENV) == "1":
        # a re-exec's trial run (start_trial): this image imports, takes the
        # command line, and reads this state format; nothing else is done
        sys.stdout.write(HANDOVER_CHECK_REPLY % HANDOVER_VERSION + "\n")
        sys.stdout.flush()
        return 0
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    handover = None
    try:
        handover = take_handover(os.environ, DebugLog(opts["debug"], opts["daemon"]))
    except HandoverError as e:
        DebugLog(opts["debug"], opts["daemon"]).dbg_printf(0, "%s", e)
    if handover is not None and handover["state"] is not None:
        opts = options_from_state(opts, handover["state"])
    epmd = make_daemon(opts)
    epmd.script = script if script and os.path.isfile(script) else None
    epmd.module_name = spec.name if spec is not None and spec.name else None
    epmd.argv = list(argv)
    if handover is not None:
        epmd.handover = handover    # a re-exec: same PID, already detached
        if epmd.log.is_daemon:
            os.chdir("/")           # as run_daemon left it (a -m re-exec runs elsewhere)
        return serve(epmd)
    if opts["daemon"]:
        # D15: say before detaching that syslog will swallow every line
        # (OTP's -daemon says nothing).
        why = syslog_unreachable()
        if why is not None:
            sys.stderr.write("epmd: warning: no syslog at %s (%s): with -daemon, every log line, "
                             "errors included, is discarded\n" % (SYSLOG_PATH, why))
            sys.stderr.flush()
        return run_daemon(epmd)
    return serve(epmd)


def console_main():
    """Entry point of the ``epmd`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

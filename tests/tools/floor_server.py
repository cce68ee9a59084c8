#!/usr/bin/env python3
"""The floor of a Python epmd: the least a selectors loop must do per request.

    python3 -m tests.tools.floor_server -port N [ignored options]

Not an epmd: a reference for the benchmarks (make bench's churn floor), as
../shared/bench's limit server is one for C.  One selectors loop on
127.0.0.1:N, the same system calls per request as epmd.py (accept, a
MSG_DONTWAIT read at once or when readable, one send, the connection watched
while a node holds it) and nothing else: no length, name or peer checks, no
time-outs, no log, no table of old names, no limits.  It assumes each
request comes in one read.  Requests:

  ALIVE2_REQ (x)        ALIVE2_X_RESP, result 0, creation counting up; the
                        connection is kept until EOF, which forgets the name
  PORT_PLEASE2_REQ (z)  PORT2_RESP of the name (result 1 if unknown), close
  NAMES_REQ (n)         the port and "name N at port P" lines, close
  anything else         close

Whatever epmd.py costs above this server is the price of being an epmd
(checks, logs, time-outs, creation rules); what this server costs above
OTP's epmd is the price of Python's interpreter and selectors.
Standard library only.
"""

import selectors
import socket
import struct
import sys

DONTWAIT = socket.MSG_DONTWAIT
READ = selectors.EVENT_READ
ALIVE2_REQ, PORT_PLEASE2_REQ, NAMES_REQ = 120, 122, 110    # 'x', 'z', 'n'
ALIVE2_X_RESP = struct.Struct(">BBI")                     # 'v', result, creation
ALIVE2_FIXED = struct.Struct(">xHBBHHH")                  # after the length: port .. nlen
U16, U32 = struct.Struct(">H"), struct.Struct(">I")


class Floor:
    """The loop and its table: name -> (port, ALIVE2_REQ fields and extra)."""

    def __init__(self, port):
        self.port = port
        self.nodes = {}
        self.creation = 0
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, READ, None)

    def request(self, sock, fd, data, watched):
        """Answer *data*, the whole packet (u16 length first) read from *sock*."""
        code = data[2] if len(data) > 2 else -1
        if code == ALIVE2_REQ:
            nlen = ALIVE2_FIXED.unpack_from(data, 2)[-1]
            name = bytes(data[13:13 + nlen])
            self.creation += 1
            self.nodes[name] = data[3:11] + data[13 + nlen:]   # port .. lowest version; elen, extra
            sock.send(ALIVE2_X_RESP.pack(118, 0, self.creation), DONTWAIT)
            if watched:
                self.sel.modify(fd, READ, (sock, name))
            else:
                self.sel.register(fd, READ, (sock, name))
            return
        if code == PORT_PLEASE2_REQ:
            name = bytes(data[3:])
            node = self.nodes.get(name)
            if node is None:
                sock.send(b"w\x01", DONTWAIT)
            else:
                # PORT2_RESP: 'w', 0, port, type, proto, high, low (8 bytes of
                # the request), nlen, name, then elen and extra as sent
                sock.send(b"w\x00" + node[:8] + U16.pack(len(name)) + name + node[8:], DONTWAIT)
        elif code == NAMES_REQ:
            sock.send(U32.pack(self.port) + b"".join(
                b"name %s at port %d\n" % (name, U16.unpack_from(node)[0])
                for name, node in self.nodes.items()), DONTWAIT)
        if watched:
            self.sel.unregister(fd)
        sock.close()

    def run(self):
        """Serve for ever."""
        sel, listener = self.sel, self.listener
        while True:
            for key, _ in sel.select(5.0):
                held = key.data
                if held is None:
                    try:
                        fd, _ = listener._accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
                    try:
                        data = sock.recv(1024, DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        sel.register(fd, READ, (sock, None))    # its request is still due
                        continue
                    self.request(sock, fd, data, False)
                    continue
                sock, name = held
                try:
                    data = sock.recv(1024, DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if name is None and data:
                    self.request(sock, key.fd, data, True)
                    continue
                if name is not None:
                    del self.nodes[name]
                sel.unregister(key.fd)
                sock.close()


def main(argv):
    port = int(argv[argv.index("-port") + 1])
    Floor(port).run()


if __name__ == "__main__":
    main(sys.argv[1:])

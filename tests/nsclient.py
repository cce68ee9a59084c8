"""A client run inside a test network namespace (`ip netns exec NS python3
nsclient.py ...`), so that its connections come from another host.

    nsclient.py request HOST PORT HEXPAYLOAD   print the reply as hex, "" if none
    nsclient.py hold HOST PORT N               open N idle connections, print
                                               how many connected, hold them
                                               until stdin closes
"""

import socket
import sys
import time


def connect(host, port, timeout=5.0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def request(host, port, payload):
    with connect(host, port) as s:
        s.sendall(len(payload).to_bytes(2, "big") + payload)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def hold(host, port, n):
    socks = []
    for _ in range(n):
        try:
            socks.append(connect(host, port, 2.0))
        except OSError:
            pass
    print(len(socks), flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def main(argv):
    cmd, host, port = argv[0], argv[1], int(argv[2])
    if cmd == "request":
        print(request(host, port, bytes.fromhex(argv[3])).hex(), flush=True)
    elif cmd == "hold":
        hold(host, port, int(argv[3]))
    else:
        raise SystemExit("unknown command %r" % cmd)
    time.sleep(0)


if __name__ == "__main__":
    main(sys.argv[1:])

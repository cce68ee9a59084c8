#!/usr/bin/env python3
"""What a refused duplicate's "who holds it" search (D25) costs on a busy
host: epmd.py run as nobody (as the shipped DynamicUser unit runs it).

Phases, each against a fresh daemon: a quiet host; --procs more processes
of root on the host (forked by a small C program when `cc` is there, else
by Python), none of which nobody may read; a holder process owning
--fds descriptors (as many as RLIMIT_NOFILE's hard limit allows).  In each,
a holder registers a fresh name, a duplicate is refused 4 times a second
(each refusal gets its search), and a client asks PORT_PLEASE2_REQ for
another name 200 times a second: the refusal round trip p50 and the
lookup p50 and p99, in ms.  Then --refusals refusals of fresh registrations
as fast as they go (the rate limit leaves most without a search) and the
daemon's RSS before and after.  Needs root.  Standard library and
tests/helpers.py only.

    python3 -m tests.tools.bounds_bench [--procs 30000] [--fds 100000] [--seconds 5] [--refusals 1000]
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


from tests.helpers import (FORKER, HOLDER, answers_names, become_nobody, creation_of, frame, free_port,
                           nobody_command, proc_rss_kb, read_to_eof, register)

FORKER_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) { pause(); _exit(0); }
        if (p < 0) { perror("fork"); break; }
    }
    printf("FORKED\n");
    fflush(stdout);
    pause();
    return 0;
}
"""


def forker(n, tmp):
    cc = shutil.which("cc")
    if cc:
        src, exe = os.path.join(tmp, "forker.c"), os.path.join(tmp, "forker")
        with open(src, "w") as f:
            f.write(FORKER_C)
        subprocess.run([cc, "-O2", "-o", exe, src], check=True)
        cmd = [exe, str(n)]
    else:
        cmd = [sys.executable, "-c", FORKER, str(n)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout.readline() == b"FORKED\n"
    return p


def lookups(port, stop, out):
    ask = frame(b"zother")
    while not stop.is_set():
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(ask)
            read_to_eof(s)
        out.append(time.perf_counter() - t)
        time.sleep(0.005)


def phase(label, port, seconds, holder_cmd=None):
    stop, times = threading.Event(), []
    t = threading.Thread(target=lookups, args=(port, stop, times))
    t.start()
    refusals = []
    end = time.monotonic() + seconds
    i = 0
    holder = None
    if holder_cmd is not None:
        holder = subprocess.Popen(holder_cmd + ["big%d" % k for k in range(int(seconds * 4) + 8)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        while time.monotonic() < end:
            name = "%s%d" % ("big" if holder else "held", i)
            if holder is not None:
                assert holder.stdout.readline() == b"HELD\n"
            else:
                s, reply = register(port, name)
                assert creation_of(reply) is not None
            time.sleep(0.25)
            t0 = time.perf_counter()
            d, reply = register(port, name)
            refusals.append(time.perf_counter() - t0)
            d.close()
            assert creation_of(reply) is None
            if holder is not None:
                holder.stdin.write(b"\n")
                holder.stdin.flush()
            else:
                s.close()
            i += 1
    finally:
        stop.set()
        t.join()
        if holder is not None:
            holder.kill()
            holder.wait()
    times.sort()
    print("%-44s %10.2f %10.2f %10.2f %8d" % (label, statistics.median(refusals) * 1000,
                                               statistics.median(times) * 1000,
                                               times[int(len(times) * 0.99)] * 1000, len(refusals)),
          flush=True)


def start_daemon(tmp):
    port = free_port()
    found = nobody_command()
    if found is None:
        sys.exit("no Python interpreter that user nobody may run")
    python, script = found
    proc = subprocess.Popen([python, script, "-port", str(port), "-address", "127.0.0.1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, "err"), "ab"), preexec_fn=become_nobody)
    deadline = time.monotonic() + 15
    while not answers_names(port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, port


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=30000)
    ap.add_argument("--fds", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--refusals", type=int, default=1000)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("needs root")
    print("%-44s %10s %10s %10s %8s" % ("phase (4 refusals/s, 200 lookups/s)", "refusal ms",
                                         "lookup p50", "p99", "refusals"))
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_daemon(tmp)
        try:
            phase("quiet host", port, a.seconds)
            f = forker(a.procs, tmp)
            try:
                phase("%d more processes (unreadable)" % a.procs, port, a.seconds)
            finally:
                os.killpg(f.pid, signal.SIGKILL)
                f.wait()
            phase("holder with up to %d descriptors" % a.fds, port, a.seconds,
                  [sys.executable, "-c", HOLDER, str(port), str(a.fds)])
            rss0 = proc_rss_kb(proc.pid)
            for i in range(a.refusals):
                s, reply = register(port, "many%d" % i)
                d, reply2 = register(port, "many%d" % i)
                d.close()
                s.close()
                assert creation_of(reply2) is None
            print("daemon RSS before and after %d more refusals: %d -> %d kB"
                  % (a.refusals, rss0, proc_rss_kb(proc.pid)))
        finally:
            proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

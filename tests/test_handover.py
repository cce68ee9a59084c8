"""Restarting and upgrading without losing a registration (issue 11, D16).

epmd.py re-executes itself in place on SIGUSR2 and hands its listening
sockets, its node connections and its whole state to the new image.  These
tests run real daemons over loopback with raw-socket registrations, a
PORT_PLEASE2_REQ load running throughout, and real `erl` nodes; the
side-by-side test shows what OTP's epmd does instead (it has no hand-over: an
upgrade is a kill and a restart).
"""

import os
import shutil
import signal
import sys
import time

import pytest
from helpers import (
    EPMD_PY,
    ERL,
    Daemon,
    LookupLoad,
    Nodes,
    SystemdStandIn,
    base_env,
    connect,
    creation_of,
    daemon_pids,
    dump,
    frame,
    free_port,
    need,
    proc_fds,
    proc_rss_kb,
    register,
    register_mixed,
    registered,
    request,
    wait_until,
)

import epmd

pytestmark = pytest.mark.timeout(180)

RESTORED = "hand-over: "          # start of the new image's "... restored" line


def restored_count(d):
    return sum(1 for line in d.stderr().splitlines() if RESTORED in line and "restored" in line)


def registering_count(d):
    return d.stderr().count("registering '")


def reexec(d, timeout=15.0):
    """SIGUSR2 to daemon *d*; wait until the new image has restored its state."""
    n = restored_count(d)
    os.kill(d.pid, signal.SIGUSR2)
    assert wait_until(lambda: restored_count(d) > n, timeout), d.stderr()[-2000:]


def unregister_some(port, names):
    """Register *names* and close them again, so the unreg list holds them;
    return {name: creation}."""
    created = {}
    for name in names:
        s, reply = register(port, name, highvsn=6)
        created[name] = creation_of(reply)
        s.close()
    assert wait_until(lambda: not set(names) & set(registered(port)))
    return created


def test_reexec_keeps_everything(start_ours):
    """Several re-execs under a lookup load: same PID, 0 failed lookups,
    NAMES and DUMP identical, no node registers again (no "registering" line
    in the -d log), creations continue where they were (checked by
    re-registering), an ALIVE2_REQ for a live name sent during the re-exec is
    refused, descriptor count and RSS flat."""
    d = start_ours("-d", "-relaxed_command_check")
    pid = d.pid
    gone = unregister_some(d.port, [b"gone_a", b"gone_b"])
    nodes = register_mixed(d.port, 40)
    live = [n["name"] for n in nodes]
    before_names, before_dump = request(d.port, b"n"), dump(d.port)
    regs = registering_count(d)
    load = LookupLoad(d.port, live, rate=100).start()
    fds, rss = [], []
    try:
        for k in range(6):
            os.kill(d.pid, signal.SIGUSR2)
            # the impostor: queued behind the re-exec or answered by either image
            s, reply = register(d.port, live[k], port=1)
            s.close()
            assert reply[:2] in (b"v\x01", b"y\x01"), reply
            assert wait_until(lambda: restored_count(d) > k, 15), d.stderr()[-2000:]
            assert d.alive() and d.pid == pid
            assert request(d.port, b"n") == before_names
            assert dump(d.port) == before_dump
    finally:
        load.stop()
    for _ in range(4):      # without the load, whose connections come and go
        reexec(d)
        fds.append(proc_fds(pid))
        rss.append(proc_rss_kb(pid))
    assert load.ok > 0
    assert (load.missing, load.errors) == (0, 0), load.fail_times
    assert registering_count(d) == regs, "a node registered again"
    # every node connection is still open: nothing to read, no EOF
    for n in nodes:
        n["sock"].setblocking(False)
        with pytest.raises(BlockingIOError):
            n["sock"].recv(1)
    # fd count and RSS flat over re-execs
    assert len(set(fds)) == 1, fds
    assert max(rss) - min(rss) < 2048, rss
    # creations: a node re-registering gets its old counter + 1
    for n in nodes[:2]:
        n["sock"].close()
        name = n["name"]
        assert wait_until(lambda: name not in registered(d.port))
        s, reply = register(d.port, name, highvsn=n["highvsn"])
        if n["highvsn"] >= 6:
            assert creation_of(reply) == epmd.bump_creation(n["creation"])
        else:
            assert creation_of(reply) == n["creation"] % 3 + 1
        s.close()
    for name, cr in gone.items():
        s, reply = register(d.port, name)
        assert creation_of(reply) == epmd.bump_creation(cr)
        s.close()
    for n in nodes[2:]:
        n["sock"].close()


def test_upgrade_side_by_side(impl, start_epmd):
    """What an upgrade does to registrations.  epmd.py: SIGUSR2 re-executes in
    place, the nodes stay registered and an impostor is refused.  OTP's epmd
    has no hand-over (SIGUSR2 terminates it): it is killed and restarted, every
    node connection is closed, the names are gone and an impostor takes one."""
    d = start_epmd()
    nodes = register_mixed(d.port, 6)
    live = [n["name"] for n in nodes]
    if impl == "py":
        reexec(d)
        assert sorted(registered(d.port)) == sorted(live)
        s, reply = register(d.port, live[0])
        assert reply == b"v\x01\x00\x00\x00\x63"
        s.close()
    else:
        d.proc.kill()
        d.proc.wait(5)
        d.start()
        assert registered(d.port) == []
        for n in nodes:
            n["sock"].settimeout(5)
            assert n["sock"].recv(1) == b""
        s, reply = register(d.port, live[0])
        assert creation_of(reply) is not None, reply
        assert registered(d.port) == [live[0]]
        s.close()
    for n in nodes:
        n["sock"].close()


def test_reexec_real_nodes(tmp_path):
    """Real `erl` nodes stay registered over re-execs: no ALIVE2_REQ from them
    in the -d log afterwards, and a fresh node pings them (pong)."""
    if ERL is None:
        need("erl")
    d = Daemon("py", free_port(), [], base_env(), tmp_path)
    d.args = ["-port", str(d.port), "-address", "127.0.0.1", "-d"]
    d.start()
    nodes = Nodes(d.port, tmp_path)
    try:
        a, b = nodes.name("a"), nodes.name("b")
        nodes.start("a")
        nodes.start("b")
        assert wait_until(lambda: {a.encode(), b.encode()} <= set(registered(d.port)), 60)
        got = d.stderr().count("** got ALIVE2_REQ")
        load = LookupLoad(d.port, [a.encode(), b.encode()], rate=50).start()
        try:
            for _ in range(3):
                reexec(d)
        finally:
            load.stop()
        assert (load.missing, load.errors) == (0, 0)
        assert d.stderr().count("** got ALIVE2_REQ") == got
        code = ('[_, H] = string:split(atom_to_list(node()), "@"), '
                'io:format("PINGS ~p~n", [[net_adm:ping(list_to_atom(N ++ "@" ++ H)) '
                '|| N <- ["%s", "%s"]]]), halt().' % (a, b))
        rc, out = nodes.run("c", code)
        assert rc == 0 and "PINGS [pong,pong]" in out, out
        # still no re-registration of a or b (c registered and left)
        assert d.stderr().count("** got ALIVE2_REQ") == got + 1
    finally:
        nodes.close()
        d.stop()


# -- failure paths ------------------------------------------------------------


def copy_of_epmd(tmp_path):
    path = tmp_path / "epmd_copy.py"
    shutil.copy(EPMD_PY, path)
    return path


def start_copy(tmp_path):
    """Start a copy of epmd.py (which a test may then break or mend) on a
    free port; return (its path, the port, the Daemon)."""
    script = copy_of_epmd(tmp_path)
    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), tmp_path)
    d.exe = [sys.executable, str(script)]
    d.start()
    return script, port, d


def kept_then_mended(d, port, nodes, mend):
    """After a refused re-exec: the old image serves with every node of
    *nodes* and restored nothing; *mend*() puts the program file right, and
    the next SIGUSR2 re-executes with every node kept."""
    assert d.alive()
    assert sorted(registered(port)) == sorted(n["name"] for n in nodes)
    assert restored_count(d) == 0
    mend()
    reexec(d)
    assert sorted(registered(port)) == sorted(n["name"] for n in nodes)


def test_new_file_that_does_not_compile_is_refused(start_ours, tmp_path):
    """SIGUSR2 after the program file was replaced by one that does not
    compile: logged, and the old image keeps serving with its nodes; once the
    file is fixed, the next SIGUSR2 re-executes."""
    script, port, d = start_copy(tmp_path)
    try:
        good = script.read_bytes()
        nodes = register_mixed(port, 4)
        script.write_bytes(good + b"\ndef broken(:\n")
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "does not compile" in d.stderr(), 10), d.stderr()
        kept_then_mended(d, port, nodes, lambda: script.write_bytes(good))
    finally:
        d.stop()


def test_failed_execve_keeps_the_old_image(tmp_path):
    """The interpreter the daemon runs from disappears (an upgrade of Python
    half done): the trial run of the new image fails (before, execve
    failed), that is logged and the old image keeps serving, nodes and
    all."""
    python = tmp_path / "python3"
    os.symlink(sys.executable, python)
    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), tmp_path)
    d.exe = [str(python), str(EPMD_PY)]
    d.start()
    try:
        nodes = register_mixed(port, 4)
        python.unlink()
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "the old image keeps serving: the new image cannot be started"
                          in d.stderr(), 10), d.stderr()
        assert d.alive()
        assert sorted(registered(port)) == sorted(n["name"] for n in nodes)
        s, reply = register(port, nodes[0]["name"])     # still owned by its node
        assert creation_of(reply) is None
        s.close()
        os.symlink(sys.executable, python)
        reexec(d)
        assert sorted(registered(port)) == sorted(n["name"] for n in nodes)
    finally:
        d.stop()


def git_release(rev):
    """The epmd.py of commit *rev* of this repository's history, or skip."""
    import subprocess
    p = subprocess.run(["git", "-C", str(EPMD_PY.parent), "show", "%s:epmd.py" % rev],
                       capture_output=True, timeout=30)
    if p.returncode != 0:
        pytest.skip("no git history here: %s" % p.stderr.decode(errors="replace").strip())
    return p.stdout


BEFORE_HANDOVER = "5350702^"        # the last release without a hand-over
BEFORE_CHECK = "eb55c79"            # the last release without the hand-over check

BAD_IMAGES = {
    # what the new file is -> what the refusal says
    "import_error": (lambda good: good.replace(
                         b"\nimport collections\n",
                         b"\nimport collections\nraise ImportError('half-installed')\n", 1),
                     "failed the hand-over check (exit status 1: ImportError: half-installed"),
    "format_bump": (lambda good: good.replace(b"HANDOVER_VERSION = 1\n",
                                              b"HANDOVER_VERSION = 99\n"),
                    "the new image reads state format 99, this one writes 1"),
    "memory_error": (lambda good: b"x = " + b"-" * 100000 + b"1\n",
                     "does not compile: "),
    "huge_sum": (lambda good: b"x = " + b"+".join([b"1"] * 200000) + b"\n",
                 "does not compile: "),
    "before_handover": (lambda good: git_release(BEFORE_HANDOVER), "failed the hand-over check"),
    "before_check": (lambda good: git_release(BEFORE_CHECK), "failed the hand-over check"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_reexec_into_a_file_that_cannot_take_over_is_refused(tmp_path, case):
    """SIGUSR2 after the program file was replaced by one that cannot take
    over (raises while importing, reads another state format, makes compile()
    raise MemoryError or RecursionError, an older release without the
    hand-over, or with it but without the check): the new file is tried in a
    child process first, the refusal is logged, the old image keeps serving
    with every node (0 lost), its log shows no second start; once the file
    is mended, the next SIGUSR2 re-executes.  eb55c79 exec'd the first two
    and the older releases and lost every node; the compile() errors ended
    it before any execve."""
    make, says = BAD_IMAGES[case]
    script, port, d = start_copy(tmp_path)
    try:
        good = script.read_bytes()
        nodes = register_mixed(port, 4)
        script.write_bytes(make(good))
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "re-exec refused, the old image keeps serving" in d.stderr(), 20)
        assert says in d.stderr(), d.stderr()[-2000:]
        for n in nodes:                 # no node saw its connection close
            n["sock"].setblocking(False)
            with pytest.raises(BlockingIOError):
                n["sock"].recv(1)
        kept_then_mended(d, port, nodes, lambda: script.write_bytes(good))
    finally:
        d.stop()


def held_trial(good, flag):
    """The bytes of epmd.py (*good*) made into a new image whose trial run
    (and only that: the re-exec itself does not wait) waits on import until
    the file *flag* exists."""
    hold = ("\nwhile os.environ.get(%r) and not os.path.exists(%r):\n    time.sleep(0.005)\n"
            % (epmd.HANDOVER_CHECK_ENV, str(flag))).encode()
    return good.replace(b"\nimport time\n", b"\nimport time\n" + hold, 1)


def start_held_trial(tmp_path, count):
    """A copy of epmd.py serving *count* mixed nodes, sent SIGUSR2 with its
    program file replaced by one whose trial run waits for a flag file;
    returns (port, daemon, the flag's path, the nodes, [the trial's pid])
    once the trial runs.  The caller stops the daemon."""
    script, port, d = start_copy(tmp_path)
    flag = tmp_path / "go"
    try:
        good = script.read_bytes()
        nodes = register_mixed(port, count)
        script.write_bytes(held_trial(good, flag))
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: children_of(d.pid), 10, step=0.005)
    except BaseException:
        d.stop()
        raise
    return port, d, flag, nodes, list(children_of(d.pid))


def test_trial_runs_while_the_loop_serves(tmp_path):
    """While the new image's trial run is under way (held here until the
    test lets it go), the old image serves: a PORT_PLEASE2_REQ is answered
    and a new node registers; then the trial answers, the re-exec goes on,
    and every node, the new one too, is handed over."""
    port, d, flag, nodes, trial = start_held_trial(tmp_path, 4)
    try:
        assert request(port, b"z" + nodes[0]["name"])[:2] == b"w\x00"
        s, reply = register(port, b"during_trial")
        assert creation_of(reply) is not None
        assert list(children_of(d.pid)) == trial        # still being tried
        assert restored_count(d) == 0
        flag.touch()
        assert wait_until(lambda: restored_count(d) == 1, 15), d.stderr()[-2000:]
        assert sorted(registered(port)) == sorted([n["name"] for n in nodes] + [b"during_trial"])
        assert not children_of(d.pid)                   # the trial was reaped
        s.close()
    finally:
        d.stop()


def test_second_sigusr2_during_a_trial_starts_no_second_trial(tmp_path):
    """A SIGUSR2 while the new image is being tried starts no second trial:
    it is logged and ignored; the one trial ends in one re-exec."""
    port, d, flag, nodes, trial = start_held_trial(tmp_path, 2)
    try:
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "SIGUSR2 ignored: the new image is being tried already (pid %d)"
                          % trial[0] in d.stderr(), 10), d.stderr()[-2000:]
        assert list(children_of(d.pid)) == trial
        flag.touch()
        assert wait_until(lambda: restored_count(d) == 1, 15), d.stderr()[-2000:]
        # the new image serves, and nothing of the second signal is left
        assert sorted(registered(port)) == sorted(n["name"] for n in nodes)
        assert not children_of(d.pid)
        assert restored_count(d) == 1
        assert d.stderr().count("SIGUSR2: re-executing") == 1
    finally:
        d.stop()


def test_trial_that_overruns_is_killed_and_reaped(tmp_path):
    """A new image whose trial run does not answer within the check's time
    (HANDOVER_CHECK_TIMEOUT, 1 s in this copy) is killed by its PID and
    reaped (no zombie left), the refusal logged; the old image serves on
    with every node, and re-executes once the file is mended."""
    script = copy_of_epmd(tmp_path)
    good = script.read_bytes().replace(b"\nHANDOVER_CHECK_TIMEOUT = 5.0 ", b"\nHANDOVER_CHECK_TIMEOUT = 1.0 ")
    assert good != script.read_bytes()
    script.write_bytes(good)
    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), tmp_path)
    d.exe = [sys.executable, str(script)]
    d.start()
    try:
        nodes = register_mixed(port, 3)
        script.write_bytes(held_trial(good, tmp_path / "never"))
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: children_of(d.pid), 10, step=0.005)
        trial = list(children_of(d.pid))[0]
        says = "re-exec refused, the old image keeps serving: the new image did not answer " \
               "the hand-over check within 1 s"
        assert wait_until(lambda: says in d.stderr(), 15), d.stderr()[-2000:]
        assert wait_until(lambda: not os.path.exists("/proc/%d" % trial), 5)
        assert not children_of(d.pid)
        kept_then_mended(d, port, nodes, lambda: script.write_bytes(good))
    finally:
        d.stop()


@pytest.mark.parametrize("case", ["file_0666_other_owner", "dir_0777", "file_group_writable"])
def test_reexec_refuses_a_file_others_can_change(tmp_path, case):
    """The program file (or its directory) can be changed by someone other
    than root and the daemon's user: SIGUSR2 is refused, as sshd's
    StrictModes refuses such a key file, and the old image keeps serving.
    eb55c79, running as root, re-executed a file owned by nobody, mode
    0666, in a 0777 directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the file to another user")
    where = tmp_path / "bin"
    where.mkdir()
    script = where / "epmd_copy.py"
    shutil.copy(EPMD_PY, script)
    port = free_port()
    d = Daemon("py", port, ["-port", str(port), "-address", "127.0.0.1"], base_env(), tmp_path)
    d.exe = [sys.executable, str(script)]
    d.start()
    try:
        nodes = register_mixed(port, 2)
        if case == "file_0666_other_owner":
            os.chown(script, 65534, 65534)
            os.chmod(script, 0o666)
            says = "is owned by uid 65534, not by root"
        elif case == "dir_0777":
            os.chmod(where, 0o777)
            says = "is writable by others (mode 0777)"
        else:
            os.chmod(script, 0o664)
            says = "is writable by its group (mode 0664)"
        os.kill(d.pid, signal.SIGUSR2)
        assert wait_until(lambda: "re-exec refused, the old image keeps serving" in d.stderr(), 10)
        assert says in d.stderr(), d.stderr()[-1000:]

        def mend():
            os.chown(script, 0, 0)
            os.chmod(script, 0o644)
            os.chmod(where, 0o755)
        kept_then_mended(d, port, nodes, mend)
    finally:
        d.stop()


def test_unreadable_state_closes_the_nodes_in_the_fd_store_too(standin, tmp_path):
    """kill -9 under the fd store, then a start of an image that cannot read
    the stored state (another format version): it starts with the listening
    sockets only and removes every node's socket from the store
    (FDSTOREREMOVE), so each node sees its connection close and can register
    again; no name of a live node stays taken by a socket nobody reads."""
    sd = standin()
    sd.start()
    assert sd.wait_ready(1)
    nodes = register_mixed(sd.port, 3)
    assert wait_until(lambda: len(sd.stored_names()) == 4)
    sd.kill9()
    bumped = tmp_path / "epmd_v99.py"
    bumped.write_bytes(EPMD_PY.read_bytes().replace(b"HANDOVER_VERSION = 1\n",
                                                    b"HANDOVER_VERSION = 99\n"))
    sd.epmd_py = bumped
    sd.start()
    assert sd.wait_ready(2)
    assert wait_until(lambda: "cannot read the state in systemd's fd store" in sd.stderr(), 10)
    for n in nodes:
        n["sock"].settimeout(5)
        assert n["sock"].recv(1) == b""         # the close reached the node
    assert wait_until(lambda: sd.stored_names() == ["epmd-state"], 10), sd.stored_names()
    assert registered(sd.port) == []
    s, reply = register(sd.port, nodes[0]["name"])
    assert creation_of(reply) is not None
    s.close()


def test_handover_without_a_readable_state_cleans_up(monkeypatch):
    """A new image given a state it cannot read (corrupt) closes every
    handed-over connection and removes each from systemd's fd store by the
    FDNAME that $EPMD_PY_HANDOVER names, outside the state: the nodes see
    the close."""
    import io
    import socket
    pairs = [socket.socketpair() for _ in range(3)]
    state_fd = os.memfd_create("bad-state")
    os.write(state_fd, b"EPMDPY-STATE garbage")
    store_fd = os.memfd_create("store-state")
    names = {a.fileno(): "epmd-node-%d" % i for i, (a, _) in enumerate(pairs)}
    value = "1 state=%d listen= conns=%s store=%d:7 fdnames=%s" % (
        state_fd, ",".join(str(a.fileno()) for a, _ in pairs), store_fd,
        ",".join("%d:%s" % kv for kv in names.items()))
    environ = {epmd.HANDOVER_ENV: value}
    log = epmd.DebugLog(0, out=io.BytesIO())
    handover = epmd.take_handover(environ, log)
    assert handover["state"] is None and handover["store"] == (store_fd, 7)
    assert handover["fdnames"] == names
    removed = []
    monkeypatch.setattr(epmd.FdStore, "remove", lambda self, name: removed.append(name))
    e = epmd.Epmd(port=4369, systemd=True, log=log)
    e.handover = dict(handover, listen=[])
    e.fdstore = epmd.FdStore.adopt({}, {"state_fd": store_fd, "seq": 7}, log)
    import selectors
    e.sel = selectors.DefaultSelector()
    e.handover_resume()
    assert sorted(removed) == sorted(names.values())
    for a, b in pairs:
        b.settimeout(5)
        assert b.recv(1) == b""
        a.detach()                      # closed by handover_resume
        b.close()


def children_of(pid):
    """{pid: state letter} of the processes whose parent is *pid* (a
    re-exec's trial run; "Z" once it has exited, until it is reaped)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out[int(entry)] = fields[0]
    return out


def test_connection_closed_during_handover_is_unregistered_at_once(start_ours):
    """A node that closes its connection while the hand-over is under way
    (here: during the -delay_accept sleep of the wake-up that reads the
    trial run's answer, after which the old image re-executes without
    another look at its connections) is unregistered by the new image
    straight after the hand-over, its creation kept on the unreg list."""
    d = start_ours("-d", "-delay_accept", "2")
    nodes = register_mixed(d.port, 3)
    n = restored_count(d)
    os.kill(d.pid, signal.SIGUSR2)
    # the trial starts after the 2 s sleep of the signal's wake-up; once it
    # has answered and exited (a zombie), the wake-up that reads its answer
    # sleeps 2 s before the re-exec
    assert wait_until(lambda: "Z" in children_of(d.pid).values(), 15, step=0.005)
    time.sleep(0.3)
    nodes[0]["sock"].close()
    assert wait_until(lambda: restored_count(d) > n, 15)
    gone = "unregistering '%s" % nodes[0]["name"].decode()

    def after_handover():
        log = d.stderr()
        return log[log.rindex("connections restored"):]
    # the new image's first wake-up (it, too, sleeps -delay_accept first)
    assert wait_until(lambda: gone in after_handover(), 8), after_handover()
    assert "got ALIVE2_REQ" not in after_handover()
    assert wait_until(lambda: nodes[0]["name"] not in registered(d.port), 5)
    assert b"old/unused name <%s>" % nodes[0]["name"] in dump(d.port)
    for x in nodes[1:]:
        x["sock"].close()


def test_reexec_refused_off_linux(monkeypatch, capsys):
    """Off Linux, SIGUSR2 is refused with a log line and nothing else happens.
    (Run in-process with sys.platform set to another system's name, as CI
    has only Linux.)"""
    e = epmd.Epmd(port=free_port(), address="127.0.0.1")
    e.script = str(EPMD_PY)
    e.reexec_wanted = True
    monkeypatch.setattr(sys, "platform", "freebsd14")
    e.reexec()
    err = capsys.readouterr().err
    assert "SIGUSR2 ignored: re-exec with hand-over needs Linux (this is freebsd14)" in err
    assert e.reexec_wanted is False
    assert epmd.handover_supported("linux") and not epmd.handover_supported("darwin")


# -- the state format -----------------------------------------------------------


def test_state_round_trip_and_corruption():
    """pack_state/unpack_state: arbitrary bytes in names and extras survive;
    another version, another magic, a truncated or altered body are refused
    with HandoverError."""
    node = epmd.Node(b"n\xc3\xb8", 0xFFFFFFFE)
    node.extra = bytes(range(256))
    node.fd, node.port, node.nodetype, node.highvsn, node.lowvsn = 7, 5000, 72, 6, 5
    state = {"nodes": [epmd.node_record(node)], "unreg": []}
    data = epmd.pack_state(state)
    back = epmd.node_from_record(epmd.unpack_state(data)["nodes"][0])
    for k in ("name", "extra", "fd", "port", "nodetype", "protocol", "highvsn", "lowvsn",
              "cr_counter"):
        assert getattr(back, k) == getattr(node, k), k
    bad = [data[:-1], data[:10], data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],
           data.replace(b"EPMDPY-STATE", b"EPMDPY-STATX"),
           data[:12] + b"\x00\x02" + data[14:]]
    for b in bad:
        with pytest.raises(epmd.HandoverError):
            epmd.unpack_state(b)
    with pytest.raises(epmd.HandoverError):
        epmd.parse_handover_env("1 state=x listen=3")
    assert epmd.parse_handover_env(epmd.format_handover_env(9, [3, 4], [])) == {
        "version": 1, "state": 9, "listen": [3, 4], "conns": [], "store": None, "fdnames": {}}
    # fd store names are never confused with a socket unit's listeners
    assert epmd.is_stored_name("epmd-node-12") and epmd.is_stored_name("epmd-state")
    assert not any(epmd.is_stored_name(n) for n in ("epmd.socket", "epmd-node.socket",
                                                     "epmd-local.socket", "epmd-node-x"))


def reference_state(e, nodes_only=False):
    """The state dict packed_state writes, built from the records
    (node_record, conn_record) as the layout in epmd.py describes it."""
    stored = e.fdstore.names if e.fdstore is not None else {}
    conns = []
    for conn in e.conns.values():
        if nodes_only and conn.node is None:
            continue
        entry = stored.get(conn.fd)
        conns.append(epmd.conn_record(conn, entry[1] if entry and entry[0] is conn else None))
    return {"options": e.handover_options(), "listeners": [ls.fileno() for ls in e.listeners],
            "conns": conns, "nodes": [epmd.node_record(n) for n in e.nodes.reg.values()],
            "unreg": [epmd.node_record(n) for n in e.nodes.unreg.values()],
            "fdstore": e.fdstore.record() if e.fdstore is not None else None}


def test_packed_state_is_pack_state_of_the_records():
    """packed_state (each record written by a template) makes the bytes of
    pack_state of the records' dict (json.dumps), byte for byte, whole (for
    exec_image) and with the nodes only (for systemd's fd store):
    registered nodes of both node types and versions, with
    extras of any bytes and UTF-8 names, the unreg list, connections in
    flight with buffers (read and to write) in every state, local and
    remote, one in systemd's fd store by its FDNAME, options with an
    address list."""
    import io
    import socket
    log = epmd.DebugLog(2, out=io.BytesIO())
    e = epmd.Epmd(port=4370, address="127.0.0.1,::1", relaxed=True, log=log)
    e.listeners = [socket.socket()]
    e.fdstore = epmd.FdStore({}, log, 99, 10)
    pairs = []
    try:
        for i, state in enumerate([epmd.KEPT, epmd.KEPT, epmd.READING, epmd.REPLYING, epmd.KEPT]):
            a, b = socket.socketpair()
            pairs.append((a, b))
            conn = epmd.Connection(a, a.fileno(), i % 2 == 0, 1000 + i)
            conn.state, conn.start_time, conn.one_read = state, 990 + i, i == 3
            if state is epmd.READING:
                conn.buf, conn.want = b"\x00\x10z\xff\x00", 18
            elif state is epmd.REPLYING:
                conn.out = bytes(range(200))
            else:
                node = epmd.Node(("n%d_\u00f8\u4e2d" % i).encode(), 0xFFFFFFF0 + i)
                node.fd, node.port, node.nodetype = conn.fd, 5000 + i, 77 if i else 72
                node.highvsn, node.lowvsn = (6, 5) if i else (5, 5)
                node.extra = bytes(range(i * 50)) + b'"\\'
                node.since = 1790000000.123456 + i
                e.nodes.node_restore(node, conn)
            e.conns[conn.fd] = conn
            if i == 1:
                e.fdstore.names[conn.fd] = (conn, "epmd-node-7")
        for i in range(3):
            old = epmd.Node(b"old%d" % i, 17 + i)
            old.since = float(i)
            e.nodes.node_restore(old, None)
        data, fds, count = e.packed_state()
        assert data == epmd.pack_state(reference_state(e))
        assert fds == list(e.conns) and count == 3
        assert epmd.unpack_state(data)["conns"][1]["fdname"] == "epmd-node-7"
        data, fds, count = e.packed_state(nodes_only=True)
        assert data == epmd.pack_state(reference_state(e, nodes_only=True))
        assert len(fds) == 3 and count == 3
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        e.listeners[0].close()


def test_request_in_flight_is_handed_over(start_ours):
    """A request half sent when the re-exec happens is finished by the new
    image: the rest of the packet arrives after it, the reply is right."""
    d = start_ours("-d", "-d")
    s_node, reply = register(d.port, b"flight", port=5001)
    s = connect(d.port)
    pkt = frame(b"z" + b"flight")
    s.sendall(pkt[:4])
    assert wait_until(lambda: "got 4 bytes" in d.stderr())
    reexec(d)
    s.sendall(pkt[4:])
    resp = s.recv(100)
    assert resp[:4] == b"w\x00\x13\x89", resp
    s.close()
    s_node.close()


# -- systemd: notifications and the fd store (against SystemdStandIn) ------------


@pytest.fixture
def standin(tmp_path):
    made = []

    def make(*args, limit=64):
        s = SystemdStandIn(tmp_path, free_port(), args, limit=limit)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_fdstore_survives_kill9(standin):
    """Under a stand-in for systemd (CI has no systemd as PID 1; see
    SystemdStandIn): every registration is pushed to the fd store with the
    state memfd; after kill -9 and the restart (LISTEN_FDS, LISTEN_PID,
    LISTEN_FDNAMES) every node is registered again as it was, same order,
    same creations, its connection never closed; no lookup finds a name
    missing (the socket unit's listener queues them; only a request the
    killed process had already accepted can be lost); an impostor is refused
    afterwards."""
    sd = standin("-d")
    sd.start()
    assert sd.wait_ready(1)
    gone = unregister_some(sd.port, [b"gone_x"])
    nodes = register_mixed(sd.port, 12)
    assert wait_until(lambda: len(sd.stored_names()) == 1 + len(nodes)), sd.stored_names()
    assert "epmd-state" in sd.stored_names()
    before = request(sd.port, b"n")
    load = LookupLoad(sd.port, [n["name"] for n in nodes], rate=100).start()
    try:
        time.sleep(0.2)
        t_kill = time.monotonic()
        sd.kill9()
        sd.start()
        assert sd.wait_ready(2)
        gap = sd.messages[-1][0] - t_kill
        assert request(sd.port, b"n") == before
    finally:
        load.stop()
    print("kill -9 under the fd store: %.0f ms without an accepting listener, "
          "%d lookups, %d failed, slowest %.0f ms"
          % (gap * 1000, load.ok + load.failed, load.failed, load.slowest * 1000))
    # no lookup finds a name missing; the one request the killed process had
    # accepted (the load sends one at a time) may die with it
    assert load.missing == 0 and load.errors <= 1
    assert "got ALIVE2_REQ" not in sd.stderr().split("connections restored")[-1]
    for n in nodes:
        n["sock"].setblocking(False)
        with pytest.raises(BlockingIOError):
            n["sock"].recv(1)
    s, reply = register(sd.port, nodes[3]["name"])
    assert creation_of(reply) is None
    s.close()
    # creations carried over: the node and the old name come back with + 1
    nodes[0]["sock"].close()
    assert wait_until(lambda: nodes[0]["name"] not in registered(sd.port))
    assert wait_until(lambda: len(sd.stored_names()) == len(nodes)), sd.stored_names()
    s, reply = register(sd.port, nodes[0]["name"], highvsn=6)
    assert creation_of(reply) == epmd.bump_creation(nodes[0]["creation"])
    s.close()
    s, reply = register(sd.port, b"gone_x")
    assert creation_of(reply) == epmd.bump_creation(gone[b"gone_x"])
    s.close()
    for n in nodes[1:]:
        n["sock"].close()


def test_fdstore_follows_the_table(standin):
    """A node that unregisters is removed from the store (FDSTOREREMOVE=1,
    by FDNAME), so systemd closes its copy and the node's connection really
    ends; the state memfd is stored once."""
    sd = standin()
    sd.start()
    assert sd.wait_ready(1)
    nodes = register_mixed(sd.port, 3)
    assert wait_until(lambda: len(sd.stored_names()) == 4)
    nodes[1]["sock"].close()
    assert wait_until(lambda: len(sd.stored_names()) == 3)
    assert sd.saw("FDSTOREREMOVE") == 1
    assert sd.stored_names().count("epmd-state") == 1
    for n in (nodes[0], nodes[2]):
        n["sock"].close()
    assert wait_until(lambda: sd.stored_names() == ["epmd-state"])


def test_reexec_under_systemd(standin):
    """SIGUSR2 with -systemd: RELOADING=1 with MONOTONIC_USEC (as
    Type=notify-reload wants), then READY=1 from the new image, same PID;
    the store is not pushed again, and a kill -9 after the re-exec still
    restores every node from it."""
    sd = standin()
    sd.start()
    assert sd.wait_ready(1)
    nodes = register_mixed(sd.port, 4)
    assert wait_until(lambda: len(sd.stored_names()) == 5)
    pushes = sd.saw("FDSTORE")
    os.kill(sd.pid, signal.SIGUSR2)
    assert sd.wait_ready(2)
    reloading = [m for _, m in sd.messages if m.get("RELOADING") == "1"]
    assert len(reloading) == 1 and int(reloading[0]["MONOTONIC_USEC"]) > 0
    assert [m for _, m in sd.messages if m.get("READY") == "1"][-1]["MAINPID"] == str(sd.pid)
    assert sorted(registered(sd.port)) == sorted(n["name"] for n in nodes)
    assert sd.saw("FDSTORE") == pushes
    nodes[0]["sock"].close()        # a change after the re-exec: the new image keeps the store
    assert wait_until(lambda: len(sd.stored_names()) == 4)
    sd.kill9()
    sd.start()
    assert sd.wait_ready(3)
    assert sorted(registered(sd.port)) == sorted(n["name"] for n in nodes[1:])
    for n in nodes[1:]:
        n["sock"].close()


def test_no_fdstore_without_fdstoremax(standin):
    """A unit without FileDescriptorStoreMax= ($FDSTORE unset): nothing is
    pushed, and a kill -9 loses the registrations, as a restart does."""
    sd = standin(limit=0)
    sd.start()
    assert sd.wait_ready(1)
    nodes = register_mixed(sd.port, 2)
    time.sleep(0.3)
    assert sd.saw("FDSTORE") == 0
    sd.kill9()
    sd.start()
    assert sd.wait_ready(2)
    assert registered(sd.port) == []
    for n in nodes:
        n["sock"].close()


def test_handover_bench_small():
    """tests/tools/handover_bench.py with small counts (the script's own checks give
    its exit status: 0 failed lookups, NAMES and DUMP identical, impostors
    refused, no re-registration, all names back after kill -9)."""
    import subprocess
    args = ["--nodes", "20", "--erl", "0", "--rate", "100", "--reexecs", "3", "--flat", "5",
            "--pause", "0.1", "--window", "0.5"]
    p = subprocess.run([sys.executable, "-m", "tests.tools.handover_bench"] + args, cwd=str(EPMD_PY.parent),
                       capture_output=True, text=True, timeout=150, env=base_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "NAMES and DUMP identical after       3 of 3 re-execs" in p.stdout, p.stdout
    assert "kill -9 with systemd's fd store" in p.stdout



def stack_of(pid):
    with open("/proc/%d/maps" % pid) as f:
        return [line.split()[0] for line in f if line.rstrip().endswith("[stack]")]


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return f.read()


HANDOVER_SEEN = b"EPMD_PY_HANDOVER=1 state="


def _one(pids):
    """The only element of *pids*, or None."""
    return pids[0] if len(pids) == 1 else None


def test_reexec_in_daemon_mode():
    """With -daemon the re-exec keeps the detached process (same PID, still a
    child of init in its own session, no second fork) and every node."""
    import subprocess
    port = free_port()
    r = subprocess.run([sys.executable, str(EPMD_PY), "-port", str(port), "-address", "127.0.0.1",
                        "-daemon"], env=base_env(), timeout=30)
    assert r.returncode == 0
    pid = _one(daemon_pids(port))
    assert pid is not None
    try:
        nodes = register_mixed(port, 5)
        sid = os.getsid(pid)
        for _ in range(3):
            image = stack_of(pid)
            os.kill(pid, signal.SIGUSR2)
            # a new image has a new (randomised) stack; then it must answer
            assert wait_until(lambda: stack_of(pid) != image, 10)
            assert wait_until(lambda: HANDOVER_SEEN in environ_of(pid))
            assert wait_until(lambda: sorted(registered(port)) == sorted(n["name"] for n in nodes))
        assert _one(daemon_pids(port)) == pid and os.getsid(pid) == sid
        for n in nodes:
            n["sock"].setblocking(False)
            with pytest.raises(BlockingIOError):
                n["sock"].recv(1)
            n["sock"].close()
    finally:
        os.kill(pid, signal.SIGTERM)


# -- the fd store's cost and records (issue 20, finding 1) ----------------------------

def wchar(pid):
    """Bytes process *pid* has passed to write-like system calls."""
    with open("/proc/%d/io" % pid) as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def test_fdstore_cost_of_a_registration_is_flat(standin):
    """Under the fd store, what the daemon writes per registration does not
    grow with the table: the last 200 of 1,000 registrations write as much
    per registration as the first 200 (within 2x and 4 kB; eb55c79 rewrote
    the whole state after every change: 150 kB each at 1,000 nodes), and a
    kill -9 then restores all 1,000 from the state and its change records."""
    sd = standin(limit=1100)
    sd.start()
    assert sd.wait_ready(1)
    socks, per = [], []
    for chunk in range(5):
        before = wchar(sd.pid)
        for i in range(200):
            s, reply = register(sd.port, "n%d_%d" % (chunk, i), port=20000 + chunk * 200 + i)
            assert creation_of(reply) is not None
            socks.append(s)
        assert wait_until(lambda: len(sd.stored_names()) == len(socks) + 1, 30)
        per.append((wchar(sd.pid) - before) / 200)
    print("\nFIGURE bytes written per registration, by 200s up to 1,000 nodes: %s"
          % ", ".join("%.0f" % x for x in per))
    assert per[-1] < max(2 * per[0], 4096) and per[-1] < 4096, per
    names_before = request(sd.port, b"n")
    sd.kill9()
    sd.start()
    assert sd.wait_ready(2)
    assert request(sd.port, b"n") == names_before
    for s in socks:
        s.close()


class StoreHarness:
    """An Epmd with a real FdStore (its state memfd; no notify socket, so
    nothing is pushed) and socketpair connections, driven without the loop."""

    def __init__(self, max_unreg):
        import io
        import selectors
        self.e = epmd.Epmd(port=4369, log=epmd.DebugLog(0, out=io.BytesIO()))
        self.e.nodes.max_unreg = max_unreg
        self.e.sel = selectors.DefaultSelector()
        self.e.max_conn, self.e.local_reserve = 1000, 10
        self.e.fdstore = epmd.FdStore({}, self.e.log, os.memfd_create("test-state"), 1000)
        self.e.nodes.changes = []
        self.peers = {}

    def register(self, name, port):
        import socket
        a, b = socket.socketpair()
        conn = self.e.conn_open(a, None, None)
        conn.local_peer = True
        b.sendall(frame(epmd_alive2(name, port)))
        self.e.first_read(conn)
        reply = b.recv(6)
        if creation_of(reply) is None:
            b.close()
            return False
        self.peers[name] = (conn, b)
        return True

    def close(self, name):
        conn, b = self.peers.pop(name)
        b.close()
        self.e.handle(conn, epmd.EVENT_READ)

    def stored(self):
        return epmd.unpack_state(epmd.read_state_fd(self.e.fdstore.state_fd), records=True)


def epmd_alive2(name, port):
    from helpers import alive2
    return alive2(name, port=port)


def test_fdstore_records_replay_to_the_table():
    """2,000 random registrations and closes (names from a pool of 40, the
    unreg list capped at 5 so entries are reused, stolen and cut), synced
    after 1 to 6 changes at a time: the state plus its change records always
    read back as the table itself (names, ports, creations, both orders), and
    the state is rewritten whole now and then (it never grows beyond twice
    the state plus FDSTORE_COMPACT_MIN)."""
    import random
    rng = random.Random(20)
    h = StoreHarness(max_unreg=5)
    e = h.e
    rewrites, last_size = 0, 0
    for step in range(2000):
        name = b"n%d" % rng.randrange(40)
        if name in h.peers and rng.random() < 0.6:
            h.close(name)
        elif name not in h.peers:
            assert h.register(name, 1000 + step)
        if rng.random() < 0.3:
            e.fdstore_sync()
            if e.fdstore.state_size != last_size or e.fdstore.end == e.fdstore.state_size:
                rewrites += 1
            last_size = e.fdstore.state_size
            assert e.fdstore.end <= 2 * e.fdstore.state_size + epmd.FDSTORE_COMPACT_MIN + 8192
            st = h.stored()
            assert [(epmd._unb64(r["name"]), r["port"], r["cr_counter"]) for r in st["nodes"]] == \
                [(n.name, n.port, n.cr_counter) for n in e.nodes.reg.values()]
            assert [(epmd._unb64(r["name"]), r["cr_counter"]) for r in st["unreg"]] == \
                [(n.name, n.cr_counter) for n in e.nodes.unreg.values()]
            assert sorted(r["fd"] for r in st["conns"]) == \
                sorted(n.conn.fd for n in e.nodes.reg.values())
    assert rewrites >= 2


def test_fdstore_record_cut_short_is_ignored():
    """A change record cut short by a kill (or corrupt) ends the replay: the
    records before it apply, nothing after it does."""
    h = StoreHarness(max_unreg=5)
    e = h.e
    h.register(b"a", 1)
    e.fdstore_sync()                     # the whole state: a
    h.register(b"b", 2)
    e.fdstore_sync()                     # a record: b
    h.register(b"c", 3)
    e.fdstore_sync()                     # a record: c
    assert [r["port"] for r in h.stored()["nodes"]] == [1, 2, 3]
    os.ftruncate(e.fdstore.state_fd, e.fdstore.end - 3)
    assert [r["port"] for r in h.stored()["nodes"]] == [1, 2]
    os.pwrite(e.fdstore.state_fd, b"\xff", e.fdstore.state_size + 10)
    assert [r["port"] for r in h.stored()["nodes"]] == [1]


# -- the same interpreter, options and form (issue 23, finding 9) --------------------

def helpers_find_pids(*needles):
    from helpers import find_pids
    return find_pids(*needles)


def cmdline_of(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")[:-1]


@pytest.mark.parametrize("form", ["script", "module", "module_daemon"])
def test_reexec_keeps_interpreter_options_and_form(form, tmp_path, monkeypatch):
    """A daemon started with interpreter options (-X, -W) as a script or as
    `python -m epmd` (also with -daemon, which leaves it in "/") comes back
    from SIGUSR2 with the same command line: the same interpreter, options
    and form (eb55c79 dropped the options and turned -m into a script)."""
    import subprocess
    port = free_port()
    flags = ["-X", "faulthandler", "-W", "ignore::DeprecationWarning"]
    prog = [str(EPMD_PY)] if form == "script" else ["-m", "epmd"]
    args = ["-port", str(port), "-address", "127.0.0.1"]
    cmd = [sys.executable] + flags + prog + args
    pid = None
    if form == "module_daemon":
        r = subprocess.run(cmd + ["-daemon"], env=base_env(), cwd=str(EPMD_PY.parent), timeout=30)
        assert r.returncode == 0
        pid = _one(helpers_find_pids("epmd", "-daemon", str(port)))
        assert pid is not None
        d = None
    else:
        d = Daemon("py", port, args, base_env(), tmp_path)
        d.exe = [sys.executable] + flags + prog
        if form == "module":
            monkeypatch.chdir(EPMD_PY.parent)   # -m finds epmd.py in the working directory
        d.start()
        pid = d.pid
    try:
        nodes = register_mixed(port, 2)
        before = cmdline_of(pid)
        image = stack_of(pid)
        os.kill(pid, signal.SIGUSR2)
        assert wait_until(lambda: stack_of(pid) != image, 15)
        assert wait_until(lambda: sorted(registered(port)) == sorted(n["name"] for n in nodes), 10)
        assert cmdline_of(pid) == before, (before, cmdline_of(pid))
        assert cmdline_of(pid)[1:5] == [x.encode() for x in flags]
        if form == "module_daemon":
            assert os.readlink("/proc/%d/cwd" % pid) == "/"
        for n in nodes:
            n["sock"].close()
    finally:
        if d is not None:
            d.stop()
        else:
            os.kill(pid, signal.SIGTERM)


def test_one_name_per_option():
    """Each option has one name from the command line (parse_args) through
    Epmd's attributes to the hand-over state; a state an older release wrote
    (addresses, is_daemon) is read too."""
    opts = epmd.parse_args(["-address", "127.0.0.1", "-port", "4370", "-d", "-relaxed_command_check"],
                           {})
    e = epmd.make_daemon(opts)
    for name in epmd.HANDOVER_OPTIONS:
        assert name in opts, name
        assert getattr(e, name) == opts[name], name
    e.listeners = []
    state = epmd.unpack_state(e.packed_state()[0])
    assert set(state["options"]) == set(epmd.HANDOVER_OPTIONS) | {"debug", "daemon"}
    assert epmd.options_from_state(epmd.parse_args([], {}), state) == dict(
        opts, action=None, stop_name=None, port_given=False)
    old = dict(state["options"])
    old["addresses"], old["is_daemon"] = old.pop("address"), old.pop("daemon")
    back = epmd.options_from_state(epmd.parse_args([], {}), {"options": old})
    assert back["address"] == "127.0.0.1" and back["debug"] == 1 and back["relaxed"]

"""The fault matrix (issue 7): what the installed qmail-smtpd-py does when something
around it misbehaves -- qmail-queue, the client, qmail-spp plugins, SMTPEXTFORK
programs, the environment and the control files. One test per row; each asserts the
bytes the client saw AND what was (or was not) queued.

Every qmail-queue *exit code* is already covered in test_pipes.py
(test_qq_exit_status, test_qq_exit_0_is_accepted, test_qq_exit_82_custom_text_on_fd6);
the rows here are the faults around those codes (signal, exec failures, a queue that
stops reading, a slow queue, an oversized fd-6 text).

Rows that need the server's own resource usage or must not be stalled by a lingering
grandchild holding the log use run_raw() below: stderr goes to a file, stdout is read to
EOF under a deadline (a leaked connection fd would show up as a hang) and the server's
peak RSS is the largest /proc/PID/status VmHWM seen while it runs (sampled at every
output chunk and every 20 ms). Not wait4's ru_maxrss: that one also counts the RSS of
the pytest process the server was forked from (exec keeps signal->maxrss), which is
hundreds of MB after the megabyte rows.

Hang rows have their own bounds: a row that hangs fails through the run deadline, never
by blocking the suite.
"""

import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import helpers
from helpers import (
    ACC,
    BYE,
    GO,
    GREETING,
    HELO250,
    OK,
    crlf,
    make_cdb,
    norm,
    run_smtp,
    server_env,
)

WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"

MAIL = b"MAIL FROM:<a@b.c>"
RCPT = b"RCPT TO:<u@example.com>"
FAULT_RCPT = b"RCPT TO:<fault@example.com>"
ENVELOPE = crlf(MAIL, RCPT)
MESSAGE = crlf(b"DATA", b"Subject: test", b"", b"hello", b".")
CLIENT_MESSAGE = b"Subject: test\n\nhello\n"
# A body far larger than a pipe buffer (64 KiB), so a queue that stops reading makes
# the server's write fail instead of the whole message fitting in the pipe.
BIG_BODY = crlf(b"DATA", b"Subject: big", b"") + crlf(b"x" * 998) * 1100 + b".\r\n"

MB = 1024  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------ runner


class Raw(tuple):
    """(out, status, queued) plus .err (the log), .maxrss_kb (peak RSS of the server
    in KiB, from VmHWM) and .incomplete."""

    def __new__(cls, out, status, queued, err, maxrss_kb, incomplete):
        self = super().__new__(cls, (out, status, queued))
        self.err, self.maxrss_kb, self.incomplete = err, maxrss_kb, incomplete
        return self

    out = property(lambda self: self[0])
    status = property(lambda self: self[1])
    queued = property(lambda self: self[2])


def run_raw(data, home, env=None, timeout=30):
    """Run the installed server like helpers.run_smtp, but with stderr to a file, stdout
    read until EOF within `timeout` seconds (else AssertionError: the session hung, or a
    child still holds the client's stdout) and VmHWM sampled while the server runs."""
    helpers.require_server()
    before = home.queue.runs()
    errpath = os.path.join(home.root, "raw-stderr-%d" % time.monotonic_ns())
    with open(errpath, "wb") as errf:
        p = subprocess.Popen([helpers.SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=errf, env=server_env(home, env), cwd=home.root,
                             start_new_session=True)

    def feed():
        try:
            p.stdin.write(data)
        except OSError:
            pass
        try:
            p.stdin.close()
        except OSError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    chunks = []
    sel = selectors.DefaultSelector()
    sel.register(p.stdout.fileno(), selectors.EVENT_READ)
    hwm = 0
    try:
        while True:
            hwm = max(hwm, vm_hwm_kb(p.pid))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no EOF on the server's stdout after %ss; out so far "
                                     "ends %r" % (timeout, b"".join(chunks)[-300:]))
            if sel.select(min(left, 0.02)):
                chunk = os.read(p.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        while True:
            hwm = max(hwm, vm_hwm_kb(p.pid))
            pid, wstatus, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise AssertionError("server did not exit within %ss" % timeout)
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(wstatus)
    finally:
        sel.close()
        try:
            os.killpg(p.pid, signal.SIGKILL)  # lingering plugins / grandchildren
        except OSError:
            pass
        if p.returncode is None:
            p.wait()
        writer.join(5)
        p.stdout.close()
    with open(errpath, "rb") as f:
        err = f.read()
    return Raw(b"".join(chunks), p.returncode, home.queued(before), err, hwm,
               home.queue.incomplete(before))


def vm_hwm_kb(pid):
    """The peak RSS (VmHWM, KiB) of a running process; 0 once it is gone."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def executable(path, body, mode=0o755):
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, mode)
    return path


def no_traceback(err):
    assert b"Traceback" not in err, err[-3000:]


# ================================================================== qmail-queue


def qq_session(home, env=None, message=MESSAGE, **kw):
    return run_smtp(ENVELOPE + message + crlf(b"NOOP", b"QUIT"), home=home, env=env, **kw)


def qq_final(reply):
    return GREETING + OK + OK + GO + reply + OK + BYE


def test_qq_killed_by_a_signal_before_queueing(home):
    """(SIGKILL after recording is test_pipes.test_qq_killed_by_signal_crashed.)"""
    qq = executable(os.path.join(home.root, "qq-segv"), "#!/bin/sh\nkill -SEGV $$\nexit 0\n")
    res = qq_session(home, env={"QMAILQUEUE": qq})
    assert res.out == qq_final(b"451 qq crashed (#4.3.0)\r\n")
    assert res.status == 0
    assert res.queued == [] and home.queue.runs() == 0
    no_traceback(res.err)


def test_qq_missing_program_in_a_missing_directory(home):
    """(A missing file is test_pipes.test_missing_queue_program.)"""
    res = qq_session(home, env={"QMAILQUEUE": os.path.join(home.root, "nodir", "qq")},
                     message=BIG_BODY)
    assert res.out == qq_final(b"451 unable to exec qq (#4.3.0)\r\n")
    assert res.status == 0
    assert res.queued == [] and home.queue.runs() == 0
    no_traceback(res.err)


def test_qq_not_executable(home):
    qq = executable(os.path.join(home.root, "qq-noexec"),
                    "#!/bin/sh\nexec %s\n" % home.queue.path, mode=0o644)
    res = qq_session(home, env={"QMAILQUEUE": qq})
    assert res.out == qq_final(b"451 unable to exec qq (#4.3.0)\r\n")
    assert res.queued == [] and home.queue.runs() == 0
    no_traceback(res.err)


@pytest.mark.parametrize("reads", ["", "head -c 5000 >/dev/null\n"],
                         ids=["reads nothing", "reads 5000 bytes"])
def test_qq_exits_0_without_reading_is_a_read_error(home, reads):
    """The transfer failed (the queue closed its end), so exit 0 is not success."""
    qq = executable(os.path.join(home.root, "qq-lazy"), "#!/bin/sh\n%sexit 0\n" % reads)
    res = qq_session(home, env={"QMAILQUEUE": qq}, message=BIG_BODY)
    assert res.out == qq_final(b"451 qq read error (#4.3.0)\r\n")
    assert b"250 ok " not in res.out.replace(OK, b"")
    assert res.status == 0
    assert res.queued == []
    no_traceback(res.err)


def test_qq_exits_53_early(home):
    qq = executable(os.path.join(home.root, "qq-53"), "#!/bin/sh\nexit 53\n")
    res = qq_session(home, env={"QMAILQUEUE": qq}, message=BIG_BODY)
    assert res.out == qq_final(b"451 qq write error or disk full (#4.3.0)\r\n")
    assert res.status == 0
    assert res.queued == []
    no_traceback(res.err)


def test_qq_slow_queue_still_accepts(home):
    qq = executable(os.path.join(home.root, "qq-slow"),
                    "#!/bin/sh\nsleep 2\nexec %s\n" % home.queue.path)
    res = qq_session(home, env={"QMAILQUEUE": qq})
    assert norm(res.out) == qq_final(ACC)
    assert res.status == 0
    assert len(res.queued) == 1
    assert res.queued[0].body == CLIENT_MESSAGE
    assert res.queued[0].envelope == b"Fa@b.c\0Tu@example.com\0\0"


def test_qq_huge_fd6_text_with_exit_82_uses_255_bytes(make_home):
    # A queue writing more than a pipe holds to fd 6 must not block the session
    # (the server reads fd 6 while it waits, at most 255 bytes, as notqmail).
    home = make_home(queue_exit=82, queue_errtext=b"D" + b"0123456789" * 100000)
    res = qq_session(home, timeout=10)
    assert res.out == qq_final(b"554 " + (b"0123456789" * 26)[:254] + b"\r\n")
    assert res.status == 0
    # the queue was given the whole message, then refused it
    assert [q.envelope for q in res.queued] == [b"Fa@b.c\0Tu@example.com\0\0"]
    no_traceback(res.err)


# ================================================================== client


EOF_CASES = {
    "after greeting": (b"", GREETING),
    "after HELO": (crlf(b"HELO c.test"), GREETING + HELO250),
    "after MAIL": (crlf(MAIL), GREETING + OK),
    "after RCPT": (ENVELOPE, GREETING + OK + OK),
    "inside header": (ENVELOPE + crlf(b"DATA", b"Subject: x") + b"From: y",
                      GREETING + OK + OK + GO),
    "inside body": (ENVELOPE + crlf(b"DATA", b"Subject: x", b"", b"body line"),
                    GREETING + OK + OK + GO),
}


@pytest.mark.parametrize("case", list(EOF_CASES))
def test_client_eof(home, case):
    data, expected = EOF_CASES[case]
    res = run_smtp(data, home=home)
    assert res.out == expected
    assert res.status == 1
    assert res.queued == []
    no_traceback(res.err)


def test_client_eof_after_the_dot_before_quit_is_queued(home):
    res = run_smtp(ENVELOPE + MESSAGE, home=home)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC
    assert res.status == 1
    assert len(res.queued) == 1 and res.queued[0].body == CLIENT_MESSAGE


def _recv_until(sock, marker, timeout=10):
    sock.settimeout(timeout)
    buf = b""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def test_client_reset_in_the_middle_of_data(servers, home):
    server = servers.start(home)
    sock = socket.create_connection(("127.0.0.1", server.port))
    got = _recv_until(sock, b"220 ")
    sock.sendall(crlf(MAIL, RCPT, b"DATA"))
    got += _recv_until(sock, b"354 ")
    assert got == GREETING + OK + OK + GO
    sock.sendall(crlf(b"Subject: reset", b"", b"half a body") + b"x" * 5000)
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    ends = server.ends(1, timeout=20)
    assert len(ends) == 1, server.log_text()
    assert ends[0][1] == 256  # exit 1
    time.sleep(0.3)
    assert home.queued() == []
    assert b"Traceback" not in server.log_text()


def test_client_idle_past_timeoutsmtpd(servers, make_home):
    home = make_home(control={"timeoutsmtpd": "1\n"})
    server = servers.start(home)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(crlf(b"HELO c.test"))
    got = _recv_until(sock, TIMEOUT, timeout=15)
    got += _recv_until(sock, b"never", timeout=15)  # then EOF
    sock.close()
    assert got == GREETING + HELO250 + TIMEOUT
    assert [s for _, s in server.ends(1)] == [256]
    assert home.queued() == []


def test_client_pipelining_without_reading_replies(servers, make_home):
    """200000 NOOPs in one write, never reading a reply: the server's writes stall and
    its write timeout (timeoutsmtpd=2) ends the session; it must not wait forever."""
    home = make_home(control={"timeoutsmtpd": "2\n"})
    server = servers.start(home)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(90)

    def blast():
        try:
            sock.sendall(b"NOOP\r\n" * 200000)
        except OSError:
            pass

    t = threading.Thread(target=blast, daemon=True)
    t.start()
    try:
        ends = server.ends(1, timeout=60)  # generous; no assertion on the duration
        assert len(ends) == 1, "session still running: %r" % server.log_text()
        assert ends[0][1] == 256
    finally:
        sock.close()
        t.join(10)
    assert home.queued() == []
    assert b"Traceback" not in server.log_text()


# ================================================================== qmail-spp plugins


def failure(entry, reason):
    return b"451 qmail-spp failure: " + entry + b": " + reason + b" (#4.3.0)\r\n"


def plugin(home, name, body, mode=0o755):
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    executable(os.path.join(directory, name), "#!/bin/sh\n" + body + "\n", mode)
    return "plugins/" + name


def rcpt_plugins(home, *entries):
    home.control("smtpplugins", "[rcpt]\n" + "".join(e + "\n" for e in entries))


def on_fault(action):
    """Plugin body running `action` only for RCPT fault@example.com."""
    return 'case "$SMTPRCPTTO" in fault@*) %s;; esac\nexit 0' % action


# the session for plugin rows: the fault recipient, then a good one, then a message
SPP_SESSION = crlf(MAIL, FAULT_RCPT, RCPT) + MESSAGE + crlf(b"QUIT")


def spp_expected(fault_reply):
    return GREETING + OK + fault_reply + OK + GO + ACC + BYE


@pytest.mark.parametrize("kind", ["missing", "not executable"])
def test_spp_unrunnable_plugin(home, kind):
    if kind == "missing":
        entry = "plugins/none"
    else:
        entry = plugin(home, "noexec", "echo N", mode=0o644)
    rcpt_plugins(home, entry)
    res = run_smtp(crlf(MAIL, RCPT, b"DATA", b"QUIT"), home=home)
    # every RCPT is refused, so DATA has no recipient
    assert res.out == (GREETING + OK + failure(entry.encode(), b"can't execute")
                       + WANT_RCPT + BYE)
    assert res.queued == [] and home.queue.runs() == 0
    no_traceback(res.err)


@pytest.mark.parametrize("action, reason", [
    ("kill -SEGV $$", b"child crashed"),
    ("exit 120", b"can't execute"),
])
def test_spp_plugin_crash_or_120(home, action, reason):
    entry = plugin(home, "p", on_fault(action))
    rcpt_plugins(home, entry)
    res = run_smtp(SPP_SESSION, home=home)
    assert norm(res.out) == spp_expected(failure(entry.encode(), reason))
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_spp_plugin_hang_with_SPPTIMEOUT(home):
    entry = plugin(home, "p", on_fault("exec sleep 60"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, env={"SPPTIMEOUT": "1"}, timeout=20)
    assert norm(res.out) == spp_expected(failure(entry.encode(), b"child crashed"))
    assert res.status == 0
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_spp_plugin_prints_megabytes_with_bounded_memory(home):
    entry = plugin(home, "p", on_fault("yes P250-x | head -c 10000003"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=120)
    # 1428571 whole lines and a final unterminated `P250-x` (counted whole, DECISIONS.md);
    # kept as a list of lines they alone would take some 60 MB
    assert norm(res.out) == spp_expected(b"250-x\r\n" * 1428572 + OK)
    assert res.status == 0
    assert [q.recipients for q in res.queued] == [[b"fault@example.com", b"u@example.com"]]
    assert res.maxrss_kb < 50 * MB, "server peak RSS %d KiB" % res.maxrss_kb
    no_traceback(res.err)


def test_spp_plugin_prints_one_endless_line_with_bounded_memory(home):
    """One 30 MB `E550 xxx...` line without LF: the refusal is sent as one reply line
    starting with the text (how much of an endless line is kept is not specified;
    qmail-spp would keep it all), memory stays bounded and the session goes on."""
    entry = plugin(home, "p", on_fault(
        r"printf 'E550 '; head -c 30000000 /dev/zero | tr '\000' x"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=120)
    head = GREETING + OK + b"550 xxxx"
    assert res.out.startswith(head)
    line_end = res.out.index(b"\r\n", len(GREETING + OK))
    assert set(res.out[len(head):line_end]) == {ord("x")}
    assert norm(res.out[line_end + 2:]) == OK + GO + ACC + BYE
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    assert res.maxrss_kb < 100 * MB, "server peak RSS %d KiB" % res.maxrss_kb
    no_traceback(res.err)


def test_spp_plugin_prints_binary_garbage(home):
    # deterministic garbage with NULs and high bytes; then 2 MB of random bytes from
    # which every command letter is removed (so nothing in it can act), no final LF
    entry = plugin(home, "p", on_fault(
        r"printf '\000\000\n\377\376garbage\000\nZ\000\001\n\000P250-never\n'; "
        "head -c 2000000 /dev/urandom | tr -d 'ANOERDPLHCSU'"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=60)
    assert norm(res.out) == spp_expected(OK)
    assert [q.recipients for q in res.queued] == [[b"fault@example.com", b"u@example.com"]]
    assert res.maxrss_kb < 100 * MB, "server peak RSS %d KiB" % res.maxrss_kb
    no_traceback(res.err)


def test_spp_plugin_text_stops_at_a_NUL(home):
    """As in qmail-spp (C strings): a P/E text ends at its first NUL; no NUL ever reaches
    the client; high bytes before it pass."""
    entry = plugin(home, "p", on_fault(r"printf 'P250-\377a\000b\n'"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home)
    assert norm(res.out) == spp_expected(b"250-\xffa\r\n" + OK)
    assert len(res.queued) == 1
    no_traceback(res.err)


def test_spp_plugin_closes_stdout_and_keeps_running(home):
    """No SPPTIMEOUT: the server waits for the plugin to exit (faithful), then goes on."""
    entry = plugin(home, "p", on_fault("exec >&-; sleep 3"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=25)
    assert norm(res.out) == spp_expected(OK)
    assert [q.recipients for q in res.queued] == [[b"fault@example.com", b"u@example.com"]]
    no_traceback(res.err)


def test_spp_plugin_closes_stdout_and_keeps_running_SPPTIMEOUT(home):
    entry = plugin(home, "p", on_fault("exec >&-; sleep 30"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, env={"SPPTIMEOUT": "1"}, timeout=20)
    assert norm(res.out) == spp_expected(failure(entry.encode(), b"child crashed"))
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_spp_grandchild_keeps_the_pipe_open(home):
    """No SPPTIMEOUT: the plugin exits at once, its grandchild holds stdout for 4 s;
    the server reads to EOF (faithful) and the session then goes on."""
    entry = plugin(home, "p", on_fault("(sleep 4 2>/dev/null &); echo P250-x"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=25)
    assert norm(res.out) == spp_expected(b"250-x\r\n" + OK)
    assert [q.recipients for q in res.queued] == [[b"fault@example.com", b"u@example.com"]]
    no_traceback(res.err)


def test_spp_grandchild_keeps_the_pipe_open_SPPTIMEOUT(home):
    entry = plugin(home, "p", on_fault("(sleep 60 2>/dev/null &); echo P250-x"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, env={"SPPTIMEOUT": "1"}, timeout=20)
    assert norm(res.out) == spp_expected(b"250-x\r\n"
                                         + failure(entry.encode(), b"child crashed"))
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_spp_megabytes_to_a_client_that_resets(servers, home):
    """A plugin floods the client with P lines; the client resets the connection: the
    server's write fails, it exits 1 (not spinning on the dead socket, not waiting for
    the plugin's output to end) and nothing is queued."""
    entry = plugin(home, "p", "yes P250-x | head -c 200000000")
    rcpt_plugins(home, entry)
    server = servers.start(home)
    sock = socket.create_connection(("127.0.0.1", server.port))
    got = _recv_until(sock, b"220 ")
    sock.sendall(crlf(MAIL, RCPT))
    got += _recv_until(sock, b"250-x\r\n" * 100)
    assert got.startswith(GREETING + OK + b"250-x\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    ends = server.ends(1, timeout=60)
    assert [s for _, s in ends] == [256], server.log_text()
    assert home.queued() == [] and home.queue.runs() == 0
    assert b"Traceback" not in server.log_text()


# ================================================================== SMTPEXTFORK
# A hanging program: without SMTPEXTFORKTIMEOUT the RCPT waits for it (faithful,
# extfork.md §3); with it, the program is killed, which counts as death by a signal.


def xf_program(home, name, action, mode=0o755):
    return os.path.join(home.path, plugin(home, name, on_fault(action).replace(
        "SMTPRCPTTO", "REMOTERCPT"), mode))


# fault recipient and good recipient both accepted: every fault here means "accept"
XF_EXPECTED = GREETING + OK + OK + OK + GO + ACC + BYE
EXTFORK_554 = b"554 sorry, permanent envelope failure due to local policy (#5.7.1)\r\n"
XF_BOTH = [[b"fault@example.com", b"u@example.com"]]


@pytest.mark.parametrize("kind", ["missing", "not executable", "exit 120"])
def test_extfork_unrunnable_or_120_accepts(home, kind):
    if kind == "missing":
        prog = os.path.join(home.path, "plugins", "none")
    elif kind == "not executable":
        prog = xf_program(home, "noexec", "exit 100", mode=0o644)
    else:
        prog = xf_program(home, "e120", "exit 120")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog})
    assert norm(res.out) == XF_EXPECTED
    assert [q.recipients for q in res.queued] == XF_BOTH
    no_traceback(res.err)


def test_extfork_slow_program_without_time_limit_is_waited_for(home):
    prog = xf_program(home, "slow", "sleep 3; exit 100")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog}, timeout=30)
    assert norm(res.out) == GREETING + OK + EXTFORK_554 + OK + GO + ACC + BYE
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_extfork_hanging_program_is_killed_after_SMTPEXTFORKTIMEOUT(home):
    prog = xf_program(home, "hang", "sleep 60; exit 100")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog, "SMTPEXTFORKTIMEOUT": "1"},
                  timeout=20)
    assert norm(res.out) == XF_EXPECTED  # killed: a signal death accepts, as the patch
    assert [q.recipients for q in res.queued] == XF_BOTH
    assert b"killed after its time limit" in res.err and b"XF (#5c)" in res.err
    no_traceback(res.err)


def test_extfork_crash_accepts(home):
    prog = xf_program(home, "segv", "kill -SEGV $$; exit 100")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog})
    assert norm(res.out) == XF_EXPECTED
    assert [q.recipients for q in res.queued] == XF_BOTH
    assert b"XF (#5c)" in res.err
    no_traceback(res.err)


def test_extfork_prints_megabytes_with_bounded_memory(home):
    prog = xf_program(home, "yes", "yes 250-x | head -c 20000000")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog}, timeout=120)
    assert norm(res.out) == XF_EXPECTED  # program stdout is the log, not the client
    assert [q.recipients for q in res.queued] == XF_BOTH
    assert res.maxrss_kb < 100 * MB, "server peak RSS %d KiB" % res.maxrss_kb
    no_traceback(res.err)


def test_extfork_prints_binary_garbage(home):
    prog = xf_program(home, "garbage",
                      r"printf '\000\000\n\377garbage\000\n'; head -c 2000000 /dev/urandom")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog}, timeout=60)
    assert norm(res.out) == XF_EXPECTED
    assert [q.recipients for q in res.queued] == XF_BOTH
    no_traceback(res.err)


def test_extfork_closes_stdout_and_keeps_running(home):
    prog = xf_program(home, "linger", "exec >&-; sleep 3; exit 100")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog}, timeout=25)
    assert norm(res.out) == (GREETING + OK
                             + b"554 sorry, permanent envelope failure due to local policy "
                               b"(#5.7.1)\r\n" + OK + GO + ACC + BYE)
    assert [q.recipients for q in res.queued] == [[b"u@example.com"]]
    no_traceback(res.err)


def test_extfork_grandchild_keeps_stdout_open(home):
    """The program exits at once; its grandchild keeps the program's stdout (the log)
    and everything else it inherited for 60 s. The session must not wait for it, and
    the client's stdout must reach EOF after QUIT (no inherited connection fd)."""
    prog = xf_program(home, "gc", "(sleep 60 &); exit 0")
    res = run_raw(SPP_SESSION, home, env={"SMTPEXTFORK": prog}, timeout=20)
    assert norm(res.out) == XF_EXPECTED
    assert res.status == 0
    assert [q.recipients for q in res.queued] == XF_BOTH
    no_traceback(res.err)


def test_spp_grandchild_does_not_hold_the_client_connection(home):
    """A plugin's grandchild with stdout redirected away must not keep the client's
    connection (the server's stdout) open after QUIT."""
    entry = plugin(home, "p", on_fault("(sleep 60 >/dev/null 2>&1 &); echo N"))
    rcpt_plugins(home, entry)
    res = run_raw(SPP_SESSION, home, timeout=20)
    assert norm(res.out) == spp_expected(OK)
    assert res.status == 0


# ================================================================== environment, control


def test_unreadable_control_file_is_421(make_home):
    home = make_home()
    path = os.path.join(home.path, "control", "rcpthosts")
    if os.geteuid() == 0:
        # root reads any file: a directory in place of the file is the read error
        os.unlink(path)
        os.mkdir(path)
    else:
        os.chmod(path, 0)
    res = run_smtp(ENVELOPE + MESSAGE + crlf(b"QUIT"), home=home)
    assert res.out == CONTROLS
    assert res.status == 1
    assert res.queued == [] and home.queue.runs() == 0
    no_traceback(res.err)


def test_crlf_damaged_rcpthosts_matches_nothing(make_home):
    home = make_home(control={"rcpthosts": "example.com\r\n.sub.example.net\r\n"})
    res = run_smtp(crlf(MAIL, RCPT, b"RCPT TO:<v@a.sub.example.net>", b"DATA", b"QUIT"),
                   home=home)
    assert res.out == GREETING + OK + NOGATEWAY + NOGATEWAY + WANT_RCPT + BYE
    assert res.status == 0
    assert res.queued == []


def test_empty_me(make_home):
    home = make_home(control={"me": ""})
    res = run_smtp(crlf(b"HELO c.test") + ENVELOPE + MESSAGE + crlf(b"QUIT"), home=home)
    assert norm(res.out) == b"220  ESMTP\r\n250 \r\n" + OK + OK + GO + ACC + b"221 \r\n"
    assert len(res.queued) == 1


@pytest.mark.parametrize("where", ["control", "env"])
@pytest.mark.parametrize("value", ["99999999999999999999", "-5", "abc"])
def test_absurd_databytes(make_home, where, value):
    """None of these is a usable limit below the message size: the message is accepted,
    and nothing crashes. (C wraps 99999999999999999999 to 1661992959 bytes.)"""
    home = make_home(control={"databytes": value + "\n"} if where == "control" else {})
    env = {"DATABYTES": value} if where == "env" else None
    res = run_smtp(ENVELOPE + BIG_BODY + crlf(b"QUIT"), home=home, env=env)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert res.status == 0
    assert len(res.queued) == 1 and len(res.queued[0].body) > 1000000
    no_traceback(res.err)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_broken_morercpthosts_cdb_is_421_at_rcpt(make_home, kind):
    home = make_home(control={"rcpthosts": "example.com\n"})
    path = os.path.join(home.path, "control", "morercpthosts.cdb")
    if kind == "truncated":
        make_cdb(path, [b"other.org", b"more.example"])
        with open(path, "r+b") as f:
            f.truncate(1000)
    elif kind == "garbage":
        with open(path, "wb") as f:
            f.write(b"\xff" * 4096)
    else:
        open(path, "wb").close()
    res = run_smtp(crlf(MAIL, RCPT, b"RCPT TO:<x@other.org>", b"DATA", b"QUIT"), home=home)
    # in rcpthosts: no cdb lookup; not in it: the cdb read fails
    assert res.out == GREETING + OK + OK + CONTROLS
    assert res.status == 1
    assert res.queued == []
    no_traceback(res.err)

"""qmail's flush points (spec qmail-smtpd.md §3.1): replies go out after every
command but MAIL, RCPT and RSET, and before every read that has to wait.
The bytes are the same either way; what a pipelining client sees behind a
slow plugin is not.  Pinned by the segments of the output (one per Send),
never by timings."""

import os
import select
import subprocess

import pytest

from qmail_smtpd_py.core import requests as rq

from helpers import GREETING, OK, SERVER, crlf, script, server_env
from world import BASE_ENV, config, run

EXTFORK = {**BASE_ENV, b"SMTPEXTFORK": b"/slow"}


def test_noop_reply_goes_out_before_a_slow_extfork_program():
    r = run(b"NOOP\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\n", env=EXTFORK,
            programs={b"/slow": 0})
    assert r.segments == [GREETING, OK, OK + OK]
    sent_noop = r.requests.index(rq.Send(OK))
    ran = next(i for i, q in enumerate(r.requests) if type(q) is rq.RunProgram)
    assert sent_noop < ran


@pytest.mark.parametrize("command, reply, flushes", [
    (b"HELO c", b"250 mx.example.org\r\n", True),
    (b"NOOP", OK, True),
    (b"VRFY x", b"252 send some mail, i'll try my best\r\n", True),
    (b"HELP", b"214 qmail-smtpd-py: see qmail-smtpd-py(8)\r\n", True),
    (b"BOGUS", b"502 unimplemented (#5.5.1)\r\n", True),
    (b"RCPT TO:<u@example.com>", b"503 MAIL first (#5.5.1)\r\n", False),
    (b"MAIL FROM:<a@b.c>", OK, False),
    (b"RSET", b"250 flushed\r\n", False),
])
def test_the_verb_table_says_which_replies_wait(command, reply, flushes):
    r = run(crlf(command, b"NOOP"))
    assert r.segments == ([GREETING, reply, OK] if flushes else [GREETING, reply + OK])


def test_pipelined_mail_rcpt_replies_wait_for_the_next_read():
    r = run([crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@example.com>"),
             crlf(b"DATA", b"x", b".", b"QUIT")])
    # the body came with DATA: no read, so the 354 waits for DATA's own flush
    assert r.segments == [GREETING, OK * 3, b"354 go ahead\r\n250 ok 1795311213 qp 4242\r\n",
                          b"221 mx.example.org\r\n"]
    r = run([crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA"), crlf(b"x", b".")])
    assert r.segments == [GREETING, OK * 2 + b"354 go ahead\r\n",
                          b"250 ok 1795311213 qp 4242\r\n"]


def test_a_plugin_refusal_at_rcpt_waits_like_the_rcpt_reply():
    cfg = config(plugins={b"r": [b"p"]})
    r = run(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"NOOP"), cfg=cfg,
            plugins={b"p": (b"E550 no\n", 0)})
    assert r.segments == [GREETING, OK + b"550 no\r\n" + OK]


def test_starttls_ready_goes_out_before_the_handshake():
    r = run(crlf(b"STARTTLS"), cfg=config(tls=True))
    handshake = r.requests.index(rq.HANDSHAKE)
    assert r.requests[handshake - 1] == rq.Send(b"220 ready for tls\r\n")


def test_xf_quitasap_sends_the_refusal_before_its_pause():
    env = {**EXTFORK, b"XF_QUITASAP": b""}
    r = run(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>"), env=env,
            programs={b"/slow": 100})
    pause = r.requests.index(rq.Sleep(2))
    assert type(r.requests[pause - 1]) is rq.Send
    assert r.requests[pause - 1].data.endswith(b"(#5.7.1)\r\n")


def test_auth_failure_pause_comes_before_the_535():
    """As the AUTH patch: sleep, then the reply (nothing is flushed first)."""
    from qmail_smtpd_py.core.auth import parse_mode
    cfg = config(auth_mode=parse_mode(b""), checkpassword=(b"/cp",))
    r = run(crlf(b"RSET", b"AUTH PLAIN AGpvZQB4"), cfg=cfg, checkpassword=lambda data: 1)
    pause = r.requests.index(rq.Sleep(5))
    assert not any(type(q) is rq.Send for q in r.requests[pause - 2:pause])
    assert r.segments[-1] == b"250 flushed\r\n535 authentication failed (#5.7.1)\r\n"


def test_real_process_sends_the_noop_reply_while_the_program_still_runs(home, tmp_path):
    """One write of NOOP MAIL RCPT; the SMTPEXTFORK program waits until the test
    has read the NOOP reply (a FIFO), so the reply must come before it ends."""
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    program = script(home, "slow", 'read released < "%s"\nexit 0\n' % gate)
    p = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=server_env(home, {"SMTPEXTFORK": program}), cwd=home.path)
    try:
        p.stdin.write(crlf(b"NOOP", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>"))
        p.stdin.flush()
        seen = b""
        while not seen.endswith(GREETING + OK):
            ready, _, _ = select.select([p.stdout], [], [], 20)
            assert ready, "no NOOP reply while the program runs: got %r" % seen
            seen += os.read(p.stdout.fileno(), 4096)
        release(gate)
        p.stdin.write(crlf(b"QUIT"))
        p.stdin.close()
        rest = p.stdout.read()
        assert seen + rest == GREETING + OK + OK + OK + b"221 mx.example.org\r\n"
    finally:
        p.kill()
        p.wait(timeout=30)


def release(gate, seconds=30):
    """Let the program waiting on the FIFO end (it may not have opened it yet)."""
    for _ in range(seconds * 10):
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            select.select([], [], [], 0.1)
            continue
        os.write(fd, b"go\n")
        os.close(fd)
        return
    raise AssertionError("the SMTPEXTFORK program never waited on %s" % gate)

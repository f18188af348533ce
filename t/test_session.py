"""The session core from byte transcripts: client bytes in, server bytes out."""

from hypothesis import given, settings, strategies as st

from qmail_smtpd_py.effects import QUEUE_CRASHED, QUEUE_EXEC_FAILED

from transcript import config, run

GREETING = b"220 mx.example.org ESMTP\r\n"
MSG = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
RECEIVED = (b"Received: from unknown (127.0.0.1)\n"
            b"  by mx.test with SMTP; 22 Nov 2026 01:33:33 -0000\n")


def test_a_whole_session():
    r = run(b"HELO c.test\r\n" + MSG + b"QUIT\r\n")
    assert r.output == (GREETING + b"250 mx.example.org\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                        b"250 ok 1795311213 qp 4242\r\n221 mx.example.org\r\n")
    assert r.queued == [(RECEIVED.replace(b"unknown (", b"unknown (HELO c.test) (")
                         + b"Subject: t\n\nhi\n", b"Fa@b.c\0Tu@example.com\0\0")]
    assert r.exit == 0


def test_eof_ends_with_status_1_and_no_reply():
    r = run(b"NOOP\r\nNOO")
    assert r.output == GREETING + b"250 ok\r\n"
    assert r.exit == 1


def test_timeout_replies_451_and_exits_1():
    r = run([b"NOOP\r\n", None])
    assert r.output == GREETING + b"250 ok\r\n451 timeout (#4.4.2)\r\n"
    assert r.exit == 1


def test_eof_inside_data_queues_nothing():
    r = run(MSG[:-3])
    assert r.queued == []
    assert r.offered == []  # qmail-queue never got an envelope
    assert r.exit == 1


def test_over_long_command_line_is_refused_and_the_session_goes_on():
    r = run(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n", cfg=config(max_line=1000))
    assert r.output == GREETING + b"500 line too long (#5.5.2)\r\n250 ok\r\n"
    assert r.exit == 1


def test_queue_exec_failure_reads_the_message_then_451():
    r = run(MSG + b"NOOP\r\n", queue_start=QUEUE_EXEC_FAILED)
    assert r.output.endswith(b"354 go ahead\r\n451 unable to exec qq (#4.3.0)\r\n250 ok\r\n")


def test_no_pipe_or_process_gives_qqt_failure_without_354():
    r = run(MSG + b"NOOP\r\n", queue_start=None)
    assert r.output == GREETING + b"250 ok\r\n250 ok\r\n451 qqt failure (#4.3.0)\r\n502 unimplemented (#5.5.1)\r\n502 unimplemented (#5.5.1)\r\n" \
        b"502 unimplemented (#5.5.1)\r\n502 unimplemented (#5.5.1)\r\n250 ok\r\n"


def test_queue_crash_and_custom_error_text():
    assert run(MSG, queue_status=QUEUE_CRASHED).output.endswith(b"451 qq crashed (#4.3.0)\r\n")
    r = run(MSG, queue_status=82, queue_errtext=b"Dno thanks (#5.7.1)")
    assert r.output.endswith(b"554 no thanks (#5.7.1)\r\n")


def test_looping_message_is_read_to_the_end_then_554():
    body = b"Received: x\r\n" * 100 + b"\r\nbody\r\n.\r\n"
    r = run(MSG.replace(b"Subject: t\r\n\r\nhi\r\n.\r\n", body) + b"NOOP\r\n")
    assert r.output.endswith(b"554 too many hops, this message is looping (#5.4.6)\r\n250 ok\r\n")
    assert r.queued == []


def test_localiphost_rewrites_only_local_literals():
    r = run(b"MAIL FROM:<a@[127.0.0.1]>\r\nRCPT TO:<u@[8.8.8.8]>\r\nRCPT TO:<v@[0.0.0.0]>\r\n"
            b"DATA\r\n.\r\n", cfg=config(rcpthosts=None))
    assert r.queued[0][1] == b"Fa@mx.example.org\0Tu@[8.8.8.8]\0Tv@mx.example.org\0\0"


def test_unknown_ip_addresses_give_421():
    r = run(b"MAIL FROM:<a@[1.2.3.4]>\r\n", local_ips=None)
    assert r.output == GREETING + b"421 unable to figure out my IP addresses (#4.3.0)\r\n"
    assert r.exit == 1
    r = run(b"MAIL FROM:<a@[1.2.3.4]>\r\n", local_ips=frozenset())
    assert r.output == GREETING + b"250 ok\r\n"


def test_badmailfrom_is_reported_at_each_rcpt():
    r = run(b"MAIL FROM:<X@Spam.COM>\r\nRCPT TO:<u@example.com>\r\nMAIL FROM:<ok@b.c>\r\n"
            b"RCPT TO:<u@example.com>\r\n", cfg=config(badmailfrom={b"@spam.com"}))
    assert r.output == GREETING + b"250 ok\r\n553 sorry, your envelope sender is in my " \
        b"badmailfrom list (#5.7.1)\r\n250 ok\r\n250 ok\r\n"


def test_relayclient_suffix_and_rcpthosts():
    r = run(b"MAIL FROM:<>\r\nRCPT TO:<a@other.org>\r\nDATA\r\n.\r\n",
            env={b"RELAYCLIENT": b"+rc"})
    assert r.queued[0][1] == b"F\0Ta@other.org+rc\0\0"
    r = run(b"MAIL FROM:<>\r\nRCPT TO:<a@other.org>\r\nRCPT TO:<a@x.sub.example.net>\r\n")
    assert r.output == GREETING + b"250 ok\r\n553 sorry, that domain isn't in my list of " \
        b"allowed rcpthosts (#5.7.1)\r\n250 ok\r\n"


def test_received_line_without_environment():
    r = run(b"HELO [1.2.3.4] x\r\n" + MSG, env={})
    assert r.queued[0][0].startswith(
        b"Received: from unknown (HELO [1.2.3.4]?x) (unknown)\n  by unknown with SMTP; ")


# ------------------------------------------------------------ splitting

SESSIONS = [
    b"EHLO c\r\n" + MSG + MSG.replace(b"Subject", b"..Received: x\r\nSubject") + b"QUIT\r\n",
    b"HELO c\nMAIL FROM:<a@b.c>\nRCPT TO:<u@example.com>\nDATA\n..x\r\n\r\r\n.\r\nNOOP\nQUIT\n",
    b"MAIL x\r\nRCPT <u@example.com>\r\nDATA\r\nbad\nline\r\n.\r\n",
    b"NOOP\r\nRSET\r\nVRFY\r\nHELP\r\nFOO\r\n\0\r\nDATA\r\nRCPT\r\nMAIL FROM:<\"a b\"@c>\r\n",
]


@settings(max_examples=300)
@given(st.sampled_from(SESSIONS), st.lists(st.integers(min_value=1, max_value=200), max_size=8))
def test_input_split_anywhere_gives_the_same_output(session_bytes, cuts):
    whole = run(session_bytes)
    points = sorted({c % len(session_bytes) for c in cuts} - {0})
    chunks = [session_bytes[a:b] for a, b in zip([0] + points, points + [len(session_bytes)])]
    split = run(chunks)
    assert (split.output, split.queued, split.exit) == (whole.output, whole.queued, whole.exit)

"""SMTP smuggling probes (SEC Consult, December 2023) against the DATA state machine.

Each probe is a first message whose body contains a non-standard "end of data" sequence
followed by a complete second SMTP transaction (MAIL, RCPT, DATA, body), then the
proper CR LF . CR LF and QUIT. A server that took the variant for the end of data
would answer the smuggled MAIL/RCPT/DATA as commands and queue two messages.

qmail's blast() (spec §4.3) ends the data only at CR LF . CR LF and makes any bare LF
fatal, so:

* variants with a bare LF: `451 See https://cr.yp.to/docs/smtplf.html.` right after
  the 354, the session ends (exit 1) and nothing is queued;
* variants with CRs only (and NULs, dots, ...): ordinary body bytes; one message whose
  body holds the smuggled transaction literally, and the smuggled MAIL is never
  answered.

The expected body comes from t/blast_oracle.py (qmail's blast() transcribed byte by
byte), not from the implementation. Every probe runs in-process through the sans-I/O
core (world.run), also split at every byte position; one probe of each fate
(test_real_*) runs over pipes against the installed program (run_smtp) with the real
queue, and both layers must agree.
"""

import pytest

from blast_oracle import blast
from helpers import norm, run_smtp
from world import run

GREETING = b"220 mx.example.org ESMTP\r\n"
OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
ACC = b"250 ok <TIME> qp <PID>\r\n"
BYE = b"221 mx.example.org\r\n"
BARELF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"

PREFIX = b"HELO client.test\r\nMAIL FROM:<alice@client.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
FIRST_BODY = b"From: alice@client.test\r\nSubject: first\r\n\r\nhello"
SMUGGLED = (b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: admin@bank.example\r\nSubject: smuggled\r\n\r\nsend money")
END = b"\r\n.\r\n"
TAIL = b"QUIT\r\n"

# (id, end-of-data variant). The published list (SEC Consult "SMTP Smuggling - Spoofing
# E-Mails Worldwide", 2023, and the Postfix/Sendmail/Exim advisories that followed) plus
# neighbours of it: NULs, doubled CRs, dot-stuffing, whitespace around the dot.
VARIANTS = [
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CR.CR", b"\r.\r"),
    ("CRLF.CR", b"\r\n.\r"),
    ("CRLF.LF", b"\r\n.\n"),
    ("LF.CR", b"\n.\r"),
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n"),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n"),
    ("CR.LF", b"\r.\n"),
    ("CRLF.CR-NUL-LF", b"\r\n.\r\x00\n"),
    ("CRCRLF.CRCRLF", b"\r\r\n.\r\r\n"),
    ("CRLF..CRLF", b"\r\n..\r\n"),
    ("CRLF-SP.CRLF", b"\r\n .\r\n"),
    ("CRLF.SP-CRLF", b"\r\n. \r\n"),
    ("CRLF.TAB-CRLF", b"\r\n.\t\r\n"),
    ("LF-CRLF.CRLF", b"\n\r\n.\r\n"),
    ("CRLF.CRLF-then-LF", b"\r\n.\r\n\n"),  # a real end: the LF then is a command line
    ("CRLF.CRLF", b"\r\n.\r\n"),  # the real end itself
    ("CRLFCRLF.CR", b"\r\n\r\n.\r"),
    ("CRLF.CRCR", b"\r\n.\r\r"),
    ("8bit-CRLF.CRLF", b"\r\n\xc2\xa0.\r\n"),
    ("CRLF.LFCR", b"\r\n.\n\r"),
]
# Variants that are in fact the proper terminator (their probe checks the other side:
# the smuggled commands then *are* commands, which is correct SMTP).
REAL_END = {"CRLF.CRLF-then-LF", "CRLF.CRLF"}


def probe(variant):
    return PREFIX + FIRST_BODY + variant + SMUGGLED + END + TAIL


def expected(variant):
    """(replies, exit status, [body] queued) per the spec's state machine (oracle)."""
    stream = FIRST_BODY + variant + SMUGGLED + END + TAIL
    out, _, _, consumed, fate = blast(stream)
    if fate == "barelf":
        return GREETING + b"250 mx.example.org\r\n" + OK + OK + GO + BARELF, 1, []
    assert fate == "done"
    # The only end of the data is the proper one: nothing but QUIT is left over.
    assert stream[consumed:] == TAIL, stream[consumed:]
    return GREETING + b"250 mx.example.org\r\n" + OK + OK + GO + ACC + BYE, 0, [out]


SMUGGLING = [pytest.param(v, id=i) for i, v in VARIANTS if i not in REAL_END]


@pytest.mark.parametrize("variant", SMUGGLING)
def test_oracle_classification(variant):
    """Bare-LF variants are fatal, all others stay inside the first message."""
    replies, status, bodies = expected(variant)
    if b"\n" in variant.replace(b"\r\n", b""):
        assert replies.endswith(BARELF) and status == 1 and bodies == []
    else:
        assert len(bodies) == 1
        assert b"MAIL FROM:<admin@bank.example>\nRCPT TO:<victim@example.com>\nDATA\n" in bodies[0]


def check_one_message_at_most(r, variant):
    """The probe's outcome per the oracle, and the smuggled commands never answered
    (r: a helpers.Result or the World of an in-process session)."""
    replies, status, bodies = expected(variant)
    assert norm(r.out) == replies
    assert r.status == status
    assert len(r.queued) <= 1
    assert [q.body for q in r.queued] == bodies
    for q in r.queued:
        assert q.sender == b"alice@client.test"
        assert q.recipients == [b"bob@example.com"]
    # never answered as commands: exactly one 354 and at most one acceptance
    assert r.out.count(b"354 ") == 1
    assert r.out.count(b"250 ok ") <= 1
    return bodies


@pytest.mark.parametrize("variant", SMUGGLING)
def test_smuggling_in_process(variant):
    r = run(probe(variant))
    bodies = check_one_message_at_most(r, variant)
    if not bodies:
        assert len(r.offered) <= 1 and r.queued == []
    for _, envelope in r.queued:
        assert envelope == b"Falice@client.test\0Tbob@example.com\0\0"


@pytest.mark.parametrize("variant", SMUGGLING)
def test_smuggling_in_process_every_split(variant):
    """Where the client's segments break does not matter (the pipes layer reads in
    whatever pieces the kernel gives it)."""
    data = probe(variant)
    whole = run(data)
    start = len(PREFIX) + len(FIRST_BODY) - 3
    for cut in range(start, start + len(variant) + 8):
        r = run([data[:cut], data[cut:]])
        assert r.output == whole.output, cut
        assert r.queued == whole.queued, cut
        assert r.exit == whole.exit, cut
    r = run([data[i:i + 1] for i in range(len(data))])  # one byte at a time
    assert (r.output, r.queued, r.exit) == (whole.output, whole.queued, whole.exit)


# One probe of each fate for the real program: a bare LF (fatal, exit 1), and CRs with
# NULs that stay in the body (one message through the real queue).
REAL = [pytest.param(v, id=i) for i, v in VARIANTS if i in ("LF.LF", "CRLF-NUL.CRLF")]


@pytest.mark.parametrize("variant", REAL)
def test_real_smuggling_over_pipes_agrees_with_the_core(home, variant):
    """Real pipes and queue: the oracle's outcome, and the core's bytes in-process."""
    r = run_smtp(probe(variant), home=home)
    bodies = check_one_message_at_most(r, variant)
    if not bodies:
        assert home.queue.runs() <= 1 and home.queued() == []
    core = run(probe(variant))
    assert norm(r.out) == norm(core.out)
    assert r.status == core.status
    assert [q.body for q in r.queued] == [q.body for q in core.queued]


PROPER_END = [pytest.param(v, id=i) for i, v in VARIANTS if i in REAL_END]


@pytest.mark.parametrize("variant", PROPER_END)
def test_proper_end_then_commands_are_commands(variant):
    """Control: with the real CR LF . CR LF the second transaction is a transaction of
    its own (the client asked for two messages; this is not smuggling)."""
    core = run(probe(variant))
    # the LF after a proper end is an empty command line of its own
    empty = b"502 unimplemented (#5.5.1)\r\n" if variant.endswith(b"\n\n") else b""
    assert norm(core.out) == (GREETING + b"250 mx.example.org\r\n" + OK + OK + GO + ACC
                              + empty + OK + OK + GO + ACC + BYE)
    assert len(core.queued) == 2
    assert core.queued[1].sender == b"admin@bank.example"


def test_real_proper_end_then_commands_are_commands(home):
    """The control through the real program: two messages in the real queue."""
    variant = dict(VARIANTS)["CRLF.CRLF"]
    r = run_smtp(probe(variant), home=home)
    core = run(probe(variant))
    assert norm(r.out) == norm(core.out)
    assert len(r.queued) == len(core.queued) == 2
    assert r.queued[1].sender == b"admin@bank.example"

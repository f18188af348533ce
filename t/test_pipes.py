"""Every reply of spec §3.3, DATA (§4) and every qmail-queue exit status (§4.7), as byte
transcripts.

The semantics run in-process: the session core against the reference world
(t/world.py), with the Config loaded from a qmail home's control files by the real
loader (control.load), so each test keeps its control files; `core` below plays one
session against the default home (conftest.py: me=mx.example.org, rcpthosts example.com
and .sub.example.net, an empty smtpplugins; TCPREMOTEIP=TCPLOCALIP=127.0.0.1,
TCPLOCALHOST=mx.test).

The tests named test_real_* run the installed qmail-smtpd-py over pipes (run_smtp, with
the recording fake qmail-queue); each is there for process plumbing the world cannot
show: the queue's file descriptors and working directory, its real exit status, fd 6
and signals, exec of a missing or relative program, the read timeout on a pipe, the
queue left without an envelope, the qmail home on the command line, the real cdb and
the host's own IP addresses.
"""

import os
import signal

import pytest

from qmail_smtpd_py.cdb import Cdb
from qmail_smtpd_py.control import ControlError
from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.session import Session, cannot_start

from helpers import accept_qp, make_cdb, norm, run_smtp
from world import BASE_ENV, QP, World, load_config, run


def crlf(*lines):
    """Join lines into one CRLF-terminated byte transcript."""
    return b"".join(line + b"\r\n" for line in lines)


GREETING = b"220 mx.example.org ESMTP\r\n"
BYE = b"221 mx.example.org\r\n"
ENVELOPE = crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>")
MESSAGE = crlf(b"DATA", b"Subject: test", b"", b"hello", b".")
RECEIVED = b"Received: from unknown (127.0.0.1)\n  by mx.test with SMTP; <DATE>\n"
BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
SMTPLF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
ENV_BYTES = b"Fa@b.c\0Tu@example.com\0\0"  # the envelope of ENVELOPE
NO_EXEC = rq.CannotStart(rq.EXEC, "No such file or directory")


# ------------------------------------------------------------------ in-process sessions


def _bytes(value):
    return value if isinstance(value, bytes) else os.fsencode(value)


def environ(changes=None):
    """world.BASE_ENV (the environment of run_smtp's sessions) with changes: str or
    bytes names and values, None removes a name."""
    env = dict(BASE_ENV)
    for name, value in (changes or {}).items():
        if value is None:
            env.pop(_bytes(name), None)
        else:
            env[_bytes(name)] = _bytes(value)
    return env


def session(chunks, home, env=None, args=(), **answers):
    """Play one session in-process as run_connection does: the Config from home's
    control files and this environment, or the cannot-start session (421) when the
    controls cannot be read.  answers: World's keywords."""
    env = environ(env)
    try:
        cfg = load_config(home, env, args)
    except ControlError as e:
        return World(chunks, **answers).play(cannot_start(str(e)))
    return run(chunks, cfg=cfg, env=env, **answers)


@pytest.fixture
def core(home):
    """core(chunks, env=None, **answers): session() against the default home."""

    def play(chunks, env=None, **answers):
        return session(chunks, home, env, **answers)

    return play


def start_queue(r):
    """The one StartQueue request of a session."""
    [request] = [q for q in r.requests if type(q) is rq.StartQueue]
    return request


# ------------------------------------------------------------------ greeting


def test_greeting_is_first_line_of_me(make_home):
    home = make_home(control={"me": "mx.example.org\nsecond.line\n"})
    r = session(crlf(b"HELO c.test", b"QUIT"), home)
    assert r.out == GREETING + b"250 mx.example.org\r\n" + BYE
    assert r.status == 0


def test_smtpgreeting_replaces_me_in_220_250_221(make_home):
    home = make_home(control={"smtpgreeting": "greet.example.org hello there\nignored\n"})
    r = session(crlf(b"HELO c.test", b"EHLO c.test", b"QUIT"), home)
    assert r.out == (b"220 greet.example.org hello there ESMTP\r\n"
                     b"250 greet.example.org hello there\r\n"
                     b"250-greet.example.org hello there\r\n"
                     b"250-PIPELINING\r\n"
                     b"250 8BITMIME\r\n"
                     b"221 greet.example.org hello there\r\n")
    assert r.status == 0


def test_smtpgreeting_without_me(make_home):
    home = make_home(control={"me": None, "smtpgreeting": "only.greeting\n"})
    r = session(crlf(b"QUIT"), home)
    assert r.out == b"220 only.greeting ESMTP\r\n221 only.greeting\r\n"


def test_empty_smtpgreeting_gives_two_spaces(make_home):
    home = make_home(control={"smtpgreeting": ""})
    r = session(crlf(b"QUIT"), home)
    assert r.out == b"220  ESMTP\r\n221 \r\n"


def test_smtpgreeting_keeps_cr_of_a_crlf_file(make_home):
    home = make_home(control={"smtpgreeting": "crlf.example\r\n"})
    r = session(crlf(b"QUIT"), home)
    assert r.out == b"220 crlf.example\r ESMTP\r\n221 crlf.example\r\r\n"


def test_neither_me_nor_smtpgreeting_is_421(make_home):
    home = make_home(control={"me": None})
    r = session(crlf(b"HELO c.test", b"QUIT"), home)
    assert r.out == b"421 unable to read controls (#4.3.0)\r\n"
    assert r.status == 1


# ------------------------------------------------------------------ simple verbs


def test_helo(core):
    r = core(crlf(b"HELO client.test", b"HELO", b"QUIT"))
    assert r.out == GREETING + b"250 mx.example.org\r\n" * 2 + BYE
    assert r.status == 0


def test_ehlo(core):
    r = core(crlf(b"EHLO client.test", b"QUIT"))
    assert r.out == (GREETING
                     + b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                     + BYE)


def test_verbs_are_case_insensitive(core):
    r = core(crlf(b"hElO c", b"noop", b"Rset", b"quit"))
    assert r.out == GREETING + b"250 mx.example.org\r\n250 ok\r\n250 flushed\r\n" + BYE


def test_rset_noop_vrfy_help(core):
    r = core(crlf(b"RSET", b"RSET junk", b"NOOP", b"NOOP anything", b"VRFY",
                  b"VRFY postmaster", b"HELP", b"HELP DATA", b"QUIT"))
    assert r.out == (GREETING
                     + b"250 flushed\r\n" * 2
                     + b"250 ok\r\n" * 2
                     + b"252 send some mail, i'll try my best\r\n" * 2
                     + b"214 qmail-smtpd-py: see qmail-smtpd-py(8)\r\n" * 2
                     + BYE)


def test_quit_exits_0_and_ignores_the_rest(core):
    r = core(crlf(b"QUIT", b"NOOP"))
    assert r.out == GREETING + BYE
    assert r.status == 0


def test_eof_exits_1_silently(core):
    r = core(b"NOOP\r\nNOOP")  # the unterminated line is discarded
    assert r.out == GREETING + b"250 ok\r\n"
    assert r.status == 1


@pytest.mark.parametrize("line", [
    b"EXPN root", b"TURN", b"ETRN example.com", b"BDAT 10 LAST", b"AUTH LOGIN",
    b"STARTTLS", b"HELO\tc.test", b" HELO c.test", b"", b"MAILFROM:<a@b.c>",
    b"NOOPS", b"NOOP\r",
])
def test_unimplemented(core, line):
    r = core(line + b"\r\nQUIT\r\n")
    assert r.out == GREETING + b"502 unimplemented (#5.5.1)\r\n" + BYE
    assert r.status == 0


def test_command_lines_may_end_in_bare_lf(core):
    r = core(b"NOOP\nHELO c.test\nQUIT\n")
    assert r.out == GREETING + b"250 ok\r\n250 mx.example.org\r\n" + BYE


# ------------------------------------------------------------------ MAIL / RCPT sequence


def test_rcpt_and_data_need_mail_first(core):
    r = core(crlf(b"RCPT TO:<u@example.com>", b"DATA", b"QUIT"))
    assert r.out == GREETING + b"503 MAIL first (#5.5.1)\r\n" * 2 + BYE


def test_data_needs_an_accepted_rcpt(core):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"DATA", b"RCPT TO:<u@other.org>", b"DATA", b"QUIT"))
    assert r.out == (GREETING + b"250 ok\r\n" + b"503 RCPT first (#5.5.1)\r\n"
                     + NOGATEWAY + b"503 RCPT first (#5.5.1)\r\n" + BYE)
    assert r.queued == []
    assert r.offered == []


def test_helo_and_rset_reset_the_transaction(core):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"HELO c.test", b"RCPT TO:<u@example.com>",
                  b"MAIL FROM:<a@b.c>", b"RSET", b"RCPT TO:<u@example.com>",
                  b"MAIL FROM:<a@b.c>", b"EHLO c.test", b"RCPT TO:<u@example.com>",
                  b"QUIT"))
    assert r.out == (GREETING
                     + b"250 ok\r\n250 mx.example.org\r\n503 MAIL first (#5.5.1)\r\n"
                     + b"250 ok\r\n250 flushed\r\n503 MAIL first (#5.5.1)\r\n"
                     + b"250 ok\r\n250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                     + b"503 MAIL first (#5.5.1)\r\n" + BYE)


def test_mail_again_restarts_the_transaction(core):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
                  b"MAIL FROM:<second@b.c>", b"DATA", b"RCPT TO:<v@example.com>")
             + MESSAGE + crlf(b"QUIT"))
    assert norm(r.out) == (GREETING + b"250 ok\r\n" * 3 + b"503 RCPT first (#5.5.1)\r\n"
                           + b"250 ok\r\n354 go ahead\r\n250 ok <TIME> qp <PID>\r\n" + BYE)
    assert [q.envelope for q in r.queued] == [b"Fsecond@b.c\0Tv@example.com\0\0"]


def test_a_new_mail_is_needed_after_data(core):
    r = core(ENVELOPE + MESSAGE + crlf(b"RCPT TO:<u@example.com>", b"DATA", b"QUIT"))
    assert norm(r.out) == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                           + b"250 ok <TIME> qp <PID>\r\n"
                           + b"503 MAIL first (#5.5.1)\r\n" * 2 + BYE)
    assert len(r.queued) == 1


def test_address_forms(core):
    r = core(crlf(
        b"MAIL a@b.c",                          # no colon: the null sender
        b'RCPT TO:<"q u"\\@@example.com> X',      # quotes and backslash dropped
        b"RCPT TO:<@r1,@r2:d@example.com>",     # source route dropped
        b"RCPT TO: e@example.com junk",         # no brackets: ends at a space
        b"RCPT f@example.com",                  # no colon: empty address, no @
        b"RCPT TO:<Mixed@Example.COM> SIZE=1",  # case kept, parameters ignored
    ) + MESSAGE + crlf(b"QUIT"))
    assert norm(r.out) == (GREETING + b"250 ok\r\n" * 6 + b"354 go ahead\r\n"
                           + b"250 ok <TIME> qp <PID>\r\n" + BYE)
    assert r.queued[0].envelope == (b"F\0Tq u@@example.com\0Td@example.com\0Te@example.com\0"
                                    b"T\0TMixed@Example.COM\0\0")


def test_address_of_900_bytes_is_a_syntax_error(core):
    local899 = b"a" * (899 - len(b"@example.com"))
    local900 = local899 + b"a"
    r = core(crlf(b"MAIL FROM:<" + b"s" * 900 + b">", b"RCPT TO:<u@example.com>",
                  b"MAIL FROM:<" + b"s" * 899 + b">",
                  b"RCPT TO:<" + local900 + b"@example.com>",
                  b"RCPT TO:<" + local899 + b"@example.com>")
             + MESSAGE + crlf(b"QUIT"))
    assert norm(r.out) == (GREETING + b"555 syntax error (#5.5.4)\r\n"
                           + b"503 MAIL first (#5.5.1)\r\n"
                           + b"250 ok\r\n555 syntax error (#5.5.4)\r\n250 ok\r\n"
                           + b"354 go ahead\r\n250 ok <TIME> qp <PID>\r\n" + BYE)
    assert r.queued[0].recipients == [local899 + b"@example.com"]


def test_duplicate_recipients_are_kept(core):
    r = core(ENVELOPE + crlf(b"RCPT TO:<u@example.com>") + MESSAGE)
    assert r.queued[0].recipients == [b"u@example.com", b"u@example.com"]


# ------------------------------------------------------------------ badmailfrom


@pytest.fixture
def bmf_home(make_home):
    return make_home(control={"badmailfrom": "bad@evil.com\n@spam.com\n#@comment.org\n"})


@pytest.mark.parametrize("sender, reply", [
    (b"bad@evil.com", BMF),
    (b"BAD@Evil.COM", BMF),           # case-insensitive
    (b"anyone@spam.com", BMF),        # @domain entry
    (b"x@SPAM.COM", BMF),
    (b"good@evil.com", b"250 ok\r\n"),
    (b"x@sub.spam.com", b"250 ok\r\n"),  # @domain is exact, not a suffix
    (b"x@comment.org", b"250 ok\r\n"),   # '#' lines are comments
    (b"", b"250 ok\r\n"),                # the null sender never matches
])
def test_badmailfrom(bmf_home, sender, reply):
    r = session(crlf(b"MAIL FROM:<" + sender + b">", b"RCPT TO:<u@example.com>",
                     b"RCPT TO:<v@example.com>", b"QUIT"), bmf_home)
    assert r.out == GREETING + b"250 ok\r\n" + reply * 2 + BYE


def test_badmailfrom_is_checked_before_relayclient(bmf_home):
    r = session(crlf(b"MAIL FROM:<bad@evil.com>", b"RCPT TO:<u@other.org>", b"QUIT"),
                bmf_home, env={"RELAYCLIENT": ""})
    assert r.out == GREETING + b"250 ok\r\n" + BMF + BYE


def test_badmailfrom_is_recomputed_at_each_mail(bmf_home):
    r = session(crlf(b"MAIL FROM:<bad@evil.com>", b"RCPT TO:<u@example.com>",
                     b"MAIL FROM:<ok@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), bmf_home)
    assert r.out == GREETING + b"250 ok\r\n" + BMF + b"250 ok\r\n250 ok\r\n" + BYE


# ------------------------------------------------------------------ rcpthosts


@pytest.mark.parametrize("rcpt, reply", [
    (b"u@example.com", b"250 ok\r\n"),
    (b"u@EXAMPLE.Com", b"250 ok\r\n"),
    (b"u@x.sub.example.net", b"250 ok\r\n"),   # .sub.example.net covers subdomains
    (b"u@sub.example.net", NOGATEWAY),         # ... but not itself
    (b"u@x.example.com", NOGATEWAY),           # example.com covers only itself
    (b"u@example.com.", NOGATEWAY),            # no trailing-dot normalisation
    (b"u@other.org", NOGATEWAY),
    (b"x@other.org@example.com", b"250 ok\r\n"),  # the last @ counts
    (b"postmaster", b"250 ok\r\n"),            # no @: accepted
])
def test_rcpthosts(core, rcpt, reply):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<" + rcpt + b">", b"QUIT"))
    assert r.out == GREETING + b"250 ok\r\n" + reply + BYE


def test_no_rcpthosts_accepts_every_domain(make_home):
    home = make_home(control={"rcpthosts": None})
    r = session(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@other.org>", b"QUIT"), home)
    assert r.out == GREETING + b"250 ok\r\n250 ok\r\n" + BYE


class CdbWorld(World):
    """The reference world, answering MoreRcptHosts from a real cdb file as the driver
    does (Cdb lookups of each key)."""

    def __init__(self, chunks, cdb, **answers):
        super().__init__(chunks, **answers)
        self.cdb = cdb

    def more_rcpthosts(self, request):
        return any(key in self.cdb for key in request.keys)


MORE_SESSION = crlf(
    b"MAIL FROM:<a@b.c>",
    b"RCPT TO:<u@more.example.org>",
    b"RCPT TO:<u@MORE.Example.ORG>",
    b"RCPT TO:<u@x.deep.example.org>",
    b"RCPT TO:<u@deep.example.org>",
    b"RCPT TO:<u@example.com>",
    b"RCPT TO:<u@other.org>",
) + MESSAGE


@pytest.fixture
def more_home(make_home):
    """rcpthosts example.com, and morercpthosts.cdb built by the real cdb tool."""
    home = make_home(control={"rcpthosts": "example.com\n"})
    make_cdb(os.path.join(home.path, "control", "morercpthosts.cdb"),
             [b"more.example.org", b".deep.example.org"])
    return home


def test_morercpthosts_cdb_built_by_cdb_tool(more_home):
    cfg = load_config(more_home)
    assert cfg.morercpthosts  # the loader saw the file
    cdb = Cdb.open(os.path.join(more_home.path, "control", "morercpthosts.cdb"))
    try:
        r = CdbWorld(MORE_SESSION, cdb).play(Session(cfg, dict(BASE_ENV)).run())
    finally:
        os.close(cdb.fd)
    assert norm(r.out) == (GREETING + b"250 ok\r\n" * 4 + NOGATEWAY + b"250 ok\r\n" + NOGATEWAY
                           + b"354 go ahead\r\n250 ok <TIME> qp <PID>\r\n")
    assert r.queued[0].recipients == [b"u@more.example.org", b"u@MORE.Example.ORG",
                                      b"u@x.deep.example.org", b"u@example.com"]


def test_relayclient_empty_relays_without_suffix(core):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@other.org>") + MESSAGE,
             env={"RELAYCLIENT": ""})
    assert norm(r.out) == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                           b"250 ok <TIME> qp <PID>\r\n")
    assert r.queued[0].envelope == b"Fa@b.c\0Tu@other.org\0\0"


def test_relayclient_value_is_appended_to_every_recipient(core):
    r = core(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@other.org>",
                  b"RCPT TO:<v@example.com>") + MESSAGE, env={"RELAYCLIENT": "+rc"})
    assert norm(r.out).endswith(b"250 ok <TIME> qp <PID>\r\n")
    assert r.queued[0].envelope == b"Fa@b.c\0Tu@other.org+rc\0Tv@example.com+rc\0\0"


LIP_SESSION = crlf(
    b"MAIL FROM:<a@[127.0.0.1]>",
    b"RCPT TO:<u@[127.0.0.1]>",
    b"RCPT TO:<v@[0.0.0.0]>",
    b"RCPT TO:<w@[192.0.2.1]>",
    b"RCPT TO:<x@[127.0.0.1]x>",
) + MESSAGE
LIP_REPLIES = (GREETING + b"250 ok\r\n" * 3 + NOGATEWAY * 2
               + b"354 go ahead\r\n250 ok <TIME> qp <PID>\r\n")
LIP_ENVELOPE = b"Fa@lip.example.org\0Tu@lip.example.org\0Tv@lip.example.org\0\0"


@pytest.fixture
def lip_home(make_home):
    return make_home(control={"localiphost": "lip.example.org\n",
                              "rcpthosts": "example.com\nlip.example.org\n"})


def test_localiphost_rewrites_local_ip_literals(lip_home):
    # the world's addresses: 0.0.0.0 and 127.0.0.1 (192.0.2.1 is not ours)
    r = session(LIP_SESSION, lip_home)
    assert norm(r.out) == LIP_REPLIES
    assert r.queued[0].envelope == LIP_ENVELOPE


def test_localiphost_defaults_to_me(make_home):
    home = make_home(control={"rcpthosts": "mx.example.org\n"})
    r = session(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@[127.0.0.1]>") + MESSAGE, home)
    assert r.queued[0].recipients == [b"u@mx.example.org"]


# ------------------------------------------------------------------ DATA


def test_data_is_queued_with_received_line_and_envelope(core):
    r = core(ENVELOPE + MESSAGE + crlf(b"QUIT"))
    assert norm(r.out) == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                           b"250 ok <TIME> qp <PID>\r\n" + BYE)
    assert r.status == 0
    assert len(r.queued) == 1
    assert norm(r.queued[0].message) == RECEIVED + b"Subject: test\n\nhello\n"
    assert r.queued[0].envelope == ENV_BYTES
    # qp is the queue program's pid (the world's qmail-queue is QP)
    assert accept_qp(r.out) == [QP]


def test_dot_unstuffing_and_crlf_conversion(core):
    r = core(ENVELOPE + b"DATA\r\n"
             b"Subject: dots\r\n"
             b"\r\n"
             b"..leading dot\r\n"
             b".x\r\n"
             b"...\r\n"
             b"bare\rcr\r\n"
             b"two\r\r\n"
             b".\rX\r\n"
             b"nul\0 and \xff\r\n"
             b".\r\n")
    assert norm(r.out).endswith(b"250 ok <TIME> qp <PID>\r\n")
    assert r.queued[0].body == (b"Subject: dots\n\n.leading dot\nx\n..\nbare\rcr\ntwo\r\n"
                                b".\rX\nnul\0 and \xff\n")


def test_empty_message(core):
    r = core(ENVELOPE + crlf(b"DATA", b"."))
    assert norm(r.queued[0].message) == RECEIVED


def test_pipelined_messages_in_one_write(core):
    r = core((ENVELOPE + MESSAGE) * 2 + crlf(b"QUIT"))
    assert norm(r.out) == (GREETING + (b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                                       b"250 ok <TIME> qp <PID>\r\n") * 2 + BYE)
    assert len(r.queued) == 2


@pytest.mark.parametrize("data", [
    b"Subject: x\nbody\r\n.\r\n",      # bare LF in the header
    b"Subject: x\r\n\r\nbody\n.\r\n",  # bare LF in the body
    b"\n.\r\n",                        # on the first line
    b"hello\r\n.\n",                   # after the final dot
    b"hello\r\n..\n.\r\n",             # after a stuffed dot
])
def test_bare_lf_in_data_is_fatal(core, data):
    r = core(ENVELOPE + b"DATA\r\n" + data + crlf(b"NOOP", b"QUIT"))
    assert r.out == GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n" + SMTPLF
    assert r.status == 1
    assert r.queued == []
    assert r.offered == []  # qmail-queue never got an envelope


@pytest.mark.parametrize("client", [
    ENVELOPE + b"DATA\r\nSubject: x\r\n\r\npartial",  # EOF inside the data
    ENVELOPE + b"DATA\r\n",                          # right after the DATA command
    ENVELOPE + b"DATA\r\nhello\r\n.\r",              # before the LF of the final dot
], ids=["in-data", "after-data-command", "before-final-lf"])
def test_eof_in_data_queues_nothing(core, client):
    r = core(client)
    assert r.out == GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
    assert r.status == 1
    assert r.queued == []
    assert r.offered == []


# ------------------------------------------------------------------ hops


def hop_message(header_lines, after_blank=()):
    return crlf(b"DATA", *header_lines, b"", b"body", *after_blank, b".")


def test_100_received_lines_is_a_loop(core):
    r = core(ENVELOPE + hop_message([b"Received: x"] * 100) + crlf(b"NOOP", b"QUIT"))
    assert r.out == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                     b"554 too many hops, this message is looping (#5.4.6)\r\n"
                     b"250 ok\r\n" + BYE)
    assert r.status == 0
    assert r.queued == []


def test_99_hops_are_accepted(core):
    r = core(ENVELOPE + hop_message([b"Received: x"] * 99))
    assert norm(r.out).endswith(b"354 go ahead\r\n250 ok <TIME> qp <PID>\r\n")
    assert len(r.queued) == 1


def test_hops_count_delivered_and_prefixes_case_insensitively(core):
    lines = ([b"Received: x"] * 40 + [b"DELIVERED-TO: y"] * 40 + [b"received-spf: z"] * 10
             + [b"rEcEiVeDx"] * 10)
    r = core(ENVELOPE + hop_message(lines))
    assert r.out.endswith(b"554 too many hops, this message is looping (#5.4.6)\r\n")
    assert r.queued == []


def test_hops_after_the_blank_line_are_not_counted(core):
    r = core(ENVELOPE + hop_message([b"Received: x"] * 99, after_blank=[b"Received: y"] * 5))
    assert norm(r.out).endswith(b"250 ok <TIME> qp <PID>\r\n")
    assert len(r.queued) == 1


def test_continuation_and_stuffed_lines_are_not_hops(core):
    lines = [b"Received: x"] * 99 + [b" Received: cont"] * 3 + [b"..Received: stuffed"] * 3
    r = core(ENVELOPE + hop_message(lines))
    assert norm(r.out).endswith(b"250 ok <TIME> qp <PID>\r\n")
    assert len(r.queued) == 1


# ------------------------------------------------------------------ databytes

TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"


def size_session(body_line):
    return ENVELOPE + crlf(b"DATA", body_line, b".", b"NOOP", b"QUIT")


def test_databytes_from_control(make_home):
    home = make_home(control={"databytes": "6\n"})
    exact = session(size_session(b"12345"), home)       # "12345\n" = 6 bytes
    over = session(size_session(b"123456"), home)        # 7 bytes
    stuffed = session(size_session(b"..1234"), home)     # ".1234\n" = 6 bytes
    assert norm(exact.out).endswith(b"250 ok <TIME> qp <PID>\r\n250 ok\r\n" + BYE)
    assert over.out == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n" + TOO_BIG
                        + b"250 ok\r\n" + BYE)
    assert norm(stuffed.out).endswith(b"250 ok <TIME> qp <PID>\r\n250 ok\r\n" + BYE)
    assert [len(r.queued) for r in (exact, over, stuffed)] == [1, 0, 1]


def test_databytes_env_overrides_control(make_home):
    home = make_home(control={"databytes": "1000\n"})
    r = session(size_session(b"123456"), home, env={"DATABYTES": "6"})
    assert TOO_BIG in r.out
    assert r.queued == []


def test_databytes_env_decimal_prefix(home):
    r = session(size_session(b"123456"), home, env={"DATABYTES": "6kb"})
    assert TOO_BIG in r.out
    assert r.queued == []


def test_databytes_env_non_numeric_is_unlimited(make_home):
    home = make_home(control={"databytes": "6\n"})
    r = session(size_session(b"x" * 5000), home, env={"DATABYTES": "big"})
    assert norm(r.out).endswith(b"250 ok <TIME> qp <PID>\r\n250 ok\r\n" + BYE)
    assert len(r.queued) == 1


def test_hops_take_precedence_over_databytes(make_home):
    home = make_home(control={"databytes": "10\n"})
    r = session(ENVELOPE + hop_message([b"Received: x"] * 100), home)
    assert r.out.endswith(b"554 too many hops, this message is looping (#5.4.6)\r\n")


# ------------------------------------------------------------------ Received: line


def received_for(core, env, helo=None):
    client = (crlf(helo) if helo is not None else b"") + ENVELOPE + MESSAGE
    r = core(client, env=env)
    assert len(r.queued) == 1
    return norm(r.queued[0].received)


def test_received_default(core):
    assert received_for(core, {}) == RECEIVED


def test_received_date_format(core):
    r = core(ENVELOPE + MESSAGE)
    assert norm(r.queued[0].received) == RECEIVED  # the date matched helpers.RE_DATE
    assert r.queued[0].received.endswith(b" -0000\n")
    # the world's clock is 1795311213.5: qmail's date822fmt of it, in UTC
    assert r.queued[0].received.endswith(b"; 22 Nov 2026 01:33:33 -0000\n")


def test_received_helo_same_as_remotehost_is_omitted(core):
    assert received_for(core, {"TCPREMOTEHOST": "client.test"}, b"HELO CLIENT.test") == (
        b"Received: from client.test (127.0.0.1)\n  by mx.test with SMTP; <DATE>\n")


def test_received_helo_differs_and_remoteinfo(core):
    env = {"TCPREMOTEHOST": "client.test", "TCPREMOTEINFO": "joe", "TCPREMOTEIP": "1.2.3.4"}
    assert received_for(core, env, b"EHLO other.test") == (
        b"Received: from client.test (HELO other.test) (joe@1.2.3.4)\n"
        b"  by mx.test with SMTP; <DATE>\n")


def test_received_empty_helo(core):
    assert received_for(core, {}, b"HELO") == (
        b"Received: from unknown (HELO ) (127.0.0.1)\n  by mx.test with SMTP; <DATE>\n")


def test_received_fallbacks_when_variables_are_missing(core):
    assert received_for(core, {"TCPLOCALHOST": None}) == (
        b"Received: from unknown (127.0.0.1)\n  by 127.0.0.1 with SMTP; <DATE>\n")
    assert received_for(core, {"TCPLOCALHOST": None, "TCPLOCALIP": None,
                               "TCPREMOTEIP": None}, b"HELO c") == (
        b"Received: from unknown (HELO c) (unknown)\n  by unknown with SMTP; <DATE>\n")


def test_received_empty_remoteinfo_still_has_at(core):
    assert received_for(core, {"TCPREMOTEINFO": ""}) == (
        b"Received: from unknown (@127.0.0.1)\n  by mx.test with SMTP; <DATE>\n")


def test_received_replaces_unsafe_bytes_but_keeps_brackets(core):
    env = {"TCPREMOTEHOST": "Z.y-X+w/v=u:t%s@r"}
    assert received_for(core, env, b"HELO [1.2.3.4] a_b\xe9\t ") == (
        b"Received: from Z.y-X+w/v=u:t%s@r (HELO [1.2.3.4]?a?b???) (127.0.0.1)\n"
        b"  by mx.test with SMTP; <DATE>\n")


# ------------------------------------------------------------------ qmail-queue exit status

QQ_REPLIES = [
    (11, b"554 envelope address too long for qq (#5.1.3)"),
    (115, b"554 envelope address too long for qq (#5.1.3)"),
    (31, b"554 mail server permanently rejected message (#5.3.0)"),
    (35, b"554 qq permanent problem (#5.3.0)"),
    (51, b"451 qq out of memory (#4.3.0)"),
    (52, b"451 qq timeout (#4.3.0)"),
    (53, b"451 qq write error or disk full (#4.3.0)"),
    (54, b"451 qq read error (#4.3.0)"),
    (55, b"451 qq unable to read configuration (#4.3.0)"),
    (56, b"451 qq trouble making network connection (#4.3.0)"),
    (61, b"451 qq trouble in home directory (#4.3.0)"),
    (62, b"451 qq trouble creating files in queue (#4.3.0)"),
    (63, b"451 qq trouble creating files in queue (#4.3.0)"),
    (64, b"451 qq trouble creating files in queue (#4.3.0)"),
    (65, b"451 qq trouble creating files in queue (#4.3.0)"),
    (66, b"451 qq trouble creating files in queue (#4.3.0)"),
    (71, b"451 mail server temporarily rejected message (#4.3.0)"),
    (72, b"451 connection to mail server timed out (#4.4.1)"),
    (73, b"451 connection to mail server rejected (#4.4.1)"),
    (74, b"451 communication with mail server failed (#4.4.2)"),
    (81, b"451 qq internal bug (#4.3.0)"),
    (91, b"451 qq internal bug (#4.3.0)"),
    (120, b"451 unable to exec qq (#4.3.0)"),
    (99, b"451 qq temporary problem (#4.3.0)"),
    (82, b"451 qq temporary problem (#4.3.0)"),
]
QQ_MESSAGE = RECEIVED + b"Subject: test\n\nhello\n"
FD6_TEXTS = [
    (b"Dno thanks, spam (#5.7.1)", b"554 no thanks, spam (#5.7.1)"),
    (b"Ztry again later (#4.3.0)", b"451 try again later (#4.3.0)"),
    (b"Xab", b"451 ab"),                              # 3 bytes: not D, so temporary
    (b"Dx", b"451 qq temporary problem (#4.3.0)"),    # under 3 bytes: ignored
]
QQ_SESSION = ENVELOPE + MESSAGE + crlf(b"NOOP", b"QUIT")


def qq_session(home, **kw):
    """The qmail-queue session, in-process (kw: env, and World's answers)."""
    return session(QQ_SESSION, home, **kw)


def expect_final(reply):
    return (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n" + reply + b"\r\n"
            + b"250 ok\r\n" + BYE)


def test_qq_exit_0_is_accepted(home):
    r = qq_session(home, queue_status=0)
    assert norm(r.out) == expect_final(b"250 ok <TIME> qp <PID>")
    assert r.status == 0
    assert accept_qp(r.out) == [QP]
    assert len(r.queued) == 1


@pytest.mark.parametrize("code, reply", QQ_REPLIES, ids=[str(c) for c, _ in QQ_REPLIES])
def test_qq_exit_status(home, code, reply):
    r = qq_session(home, queue_status=code)
    assert r.out == expect_final(reply)
    assert r.status == 0
    # the queue was given the whole message and envelope before it failed
    assert [(norm(m), e) for m, e in r.offered] == [(QQ_MESSAGE, ENV_BYTES)]
    assert r.queued == []


@pytest.mark.parametrize("errtext, reply", FD6_TEXTS)
def test_qq_exit_82_custom_text_on_fd6(home, errtext, reply):
    r = qq_session(home, queue_status=82, queue_errtext=errtext)
    assert r.out == expect_final(reply)


def test_qq_fd6_text_ignored_unless_exit_82(home):
    r = qq_session(home, queue_status=71, queue_errtext=b"Dcustom text")
    assert r.out == expect_final(b"451 mail server temporarily rejected message (#4.3.0)")


def test_qq_killed_by_signal_crashed(home):
    r = qq_session(home, queue_status=rq.Signaled(signal.SIGKILL))
    assert r.out == expect_final(b"451 qq crashed (#4.3.0)")
    assert r.status == 0


def test_missing_queue_program(home):
    missing = os.path.join(home.root, "no-such-qmail-queue")
    r = qq_session(home, env={"QMAILQUEUE": missing}, queue_start=NO_EXEC)
    assert start_queue(r).program == os.fsencode(missing)
    assert r.out == expect_final(b"451 unable to exec qq (#4.3.0)")
    assert r.status == 0
    assert r.queued == []
    assert r.offered == []


def test_relative_qmailqueue_is_passed_as_given(home):
    """The driver runs it in the qmail home (test_real_relative_qmailqueue_...)."""
    r = qq_session(home, env={"QMAILQUEUE": "bin/qq"})
    assert start_queue(r).program == b"bin/qq"
    assert norm(r.out) == expect_final(b"250 ok <TIME> qp <PID>")
    assert len(r.queued) == 1


def test_default_queue_is_bin_qmail_queue_in_home(home):
    r = qq_session(home, env={"QMAILQUEUE": None})
    assert start_queue(r).program == b"bin/qmail-queue"  # relative: in the qmail home
    assert norm(r.out) == expect_final(b"250 ok <TIME> qp <PID>")
    assert len(r.queued) == 1


def test_queue_inherits_environment(home):
    r = qq_session(home, env={"QMAILQUEUE": "/x/qq-wrap", "EXTRA": "seen"})
    [env] = r.queue_envs
    assert (env[b"EXTRA"], env[b"TCPREMOTEIP"]) == (b"seen", b"127.0.0.1")
    assert r.queued[0].message.startswith(b"Received: from unknown")


# ------------------------------------------------------------------ timeouts


def test_idle_timeout(core):
    r = core([crlf(b"HELO c.test"), None])
    assert r.out == GREETING + b"250 mx.example.org\r\n451 timeout (#4.4.2)\r\n"
    assert r.status == 1


def test_timeout_in_data_queues_nothing(make_home):
    home = make_home(control={"timeoutsmtpd": "1\n"})
    assert load_config(home).timeout == 1
    r = session([ENVELOPE + b"DATA\r\nSubject: x\r\n", None], home)
    assert r.out == GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n451 timeout (#4.4.2)\r\n"
    assert r.status == 1
    assert r.queued == []
    assert r.offered == []


def test_timeout_zero_means_one(make_home):
    home = make_home(control={"timeoutsmtpd": "0\n"})
    assert load_config(home).timeout == 1
    r = session([None], home)
    assert r.out == GREETING + b"451 timeout (#4.4.2)\r\n"
    assert r.status == 1


# ------------------------------------------------------------------ the process plumbing


def test_real_queue_gets_message_on_fd0_envelope_on_fd1_in_the_qmail_home(smtp, home):
    """The real fake qmail-queue: what it read on fd 0 and 1, its pid and its cwd."""
    out, status, queued = smtp(ENVELOPE + MESSAGE + crlf(b"QUIT"))
    assert norm(out) == (GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
                         b"250 ok <TIME> qp <PID>\r\n" + BYE)
    assert status == 0
    assert len(queued) == 1
    assert norm(queued[0].message) == QQ_MESSAGE
    assert queued[0].envelope == ENV_BYTES
    # qp is the queue program's pid, and the queue runs in the qmail home
    assert accept_qp(out) == [queued[0].pid]
    assert os.path.realpath(queued[0].cwd) == os.path.realpath(home.path)


@pytest.mark.parametrize("code, reply", [QQ_REPLIES[2], QQ_REPLIES[16]], ids=["31", "71"])
def test_real_queue_exit_status(make_home, code, reply):
    """A real child's exit status, through waitpid."""
    out, status, queued = run_smtp(QQ_SESSION, home=make_home(queue_exit=code))
    assert out == expect_final(reply)
    assert status == 0
    assert [q.envelope for q in queued] == [ENV_BYTES]


def test_real_queue_fd6_text(make_home):
    """notqmail's fd 6 pipe to a real child."""
    errtext, reply = FD6_TEXTS[0]
    out, _, _ = run_smtp(QQ_SESSION, home=make_home(queue_exit=82, queue_errtext=errtext))
    assert out == expect_final(reply)


def test_real_queue_killed_by_signal_crashed(make_home):
    """A real child's death by a signal, through waitpid."""
    out, status, _ = run_smtp(QQ_SESSION, home=make_home(queue_signal=signal.SIGKILL))
    assert out == expect_final(b"451 qq crashed (#4.3.0)")
    assert status == 0


def test_real_missing_queue_program(home):
    """exec of a QMAILQUEUE that does not exist."""
    out, status, queued = run_smtp(
        QQ_SESSION, home=home,
        env={"QMAILQUEUE": os.path.join(home.root, "no-such-qmail-queue")})
    assert out == expect_final(b"451 unable to exec qq (#4.3.0)")
    assert status == 0
    assert queued == []


def test_real_relative_qmailqueue_is_resolved_from_qmail_home(home):
    """A relative QMAILQUEUE is executed from the qmail home (the process's cwd)."""
    os.makedirs(os.path.join(home.path, "bin"))
    os.symlink(home.queue.path, os.path.join(home.path, "bin", "qq"))
    out, _, queued = run_smtp(QQ_SESSION, home=home, env={"QMAILQUEUE": "bin/qq"})
    assert norm(out) == expect_final(b"250 ok <TIME> qp <PID>")
    assert len(queued) == 1


def test_real_eof_in_data_leaves_the_queue_without_envelope(smtp, home):
    """The real queue, started at DATA, gets no envelope and exits 54: nothing queued."""
    r = smtp(ENVELOPE + b"DATA\r\nSubject: x\r\n\r\npartial")
    assert r.out == GREETING + b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
    assert r.status == 1
    assert r.queued == []
    assert home.queue.runs() == 1 and r.incomplete == 1


def test_real_read_timeout_on_a_pipe(make_home):
    """timeoutsmtpd on a real pipe that stays open."""
    home = make_home(control={"timeoutsmtpd": "1\n"})
    out, status, _ = run_smtp(crlf(b"HELO c.test"), home=home, keep_open=True)
    assert out == GREETING + b"250 mx.example.org\r\n451 timeout (#4.4.2)\r\n"
    assert status == 1


def test_real_missing_qmail_home_is_421(home):
    """The process cannot chdir to QMAILHOME."""
    out, status, _ = run_smtp(crlf(b"QUIT"), home=home,
                              env={"QMAILHOME": os.path.join(home.root, "no-such-home")})
    assert out == b"421 unable to read controls (#4.3.0)\r\n"
    assert status == 1


def test_real_qmail_home_option(home):
    """--qmail-home on the command line (the click path of the entry point)."""
    out, status, _ = run_smtp(crlf(b"QUIT"), home=home, env={"QMAILHOME": None},
                              args=["--qmail-home", home.path])
    assert out == GREETING + BYE
    assert status == 0


def test_real_morercpthosts_cdb_is_looked_up_by_the_driver(more_home):
    """The loader opens the cdb file and the driver looks recipients up in it."""
    out, _, queued = run_smtp(MORE_SESSION, home=more_home)
    assert norm(out) == (GREETING + b"250 ok\r\n" * 4 + NOGATEWAY + b"250 ok\r\n" + NOGATEWAY
                         + b"354 go ahead\r\n250 ok <TIME> qp <PID>\r\n")
    assert queued[0].recipients == [b"u@more.example.org", b"u@MORE.Example.ORG",
                                    b"u@x.deep.example.org", b"u@example.com"]


def test_real_localiphost_uses_the_hosts_own_addresses(lip_home):
    """The driver asks the real host for its IPv4 addresses (ipme)."""
    # 0.0.0.0 and 127.0.0.1 are ours, the documentation address 192.0.2.1 is not
    out, _, queued = run_smtp(LIP_SESSION, home=lip_home)
    assert norm(out) == LIP_REPLIES
    assert queued[0].envelope == LIP_ENVELOPE

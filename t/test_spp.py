"""qmail-spp (SMTP plugins): the semantics in-process through the reference world,
the plumbing with the installed qmail-smtpd-py over pipes.

Behaviour: ../shared/spec/spp.md, with the deviations of ../shared/spec/DECISIONS.md
(an unterminated last output line counts whole, a CR before LF is dropped, the stale
badmailfrom flag after O in MAIL is cleared, an empty H line is ignored, SPPTIMEOUT).

In-process tests (the `spp` fixture) write control/smtpplugins into a throw-away qmail
home, load the Config from it with the real loader and play the session against
world.World: each plugin is what it prints and how it ends (world.Plugin, an
(output, exit status or outcome) pair, or rq.CannotStart), what it saw is
r.plugin_envs, what qmail-queue was started with is r.queue_envs.

The tests named test_process_* run the installed server, each for one piece of
plumbing the world cannot show (exec, the plugin's stdin, cwd, stderr and SIGPIPE,
wait statuses, SPPTIMEOUT killing a real process, the control-file error path, a
real checkpassword before the [auth] hook, swaks under tcpserver).  Their plugins are
tiny /bin/sh programs: `:` entries (run as `/bin/sh -c REST`) or scripts in the qmail
home's plugins/ directory.  The default home (conftest.py) has me=mx.example.org and
rcpthosts example.com and .sub.example.net.
"""

import base64
import os

import pytest
from test_tcpserver import swaks

from qmail_smtpd_py.control import ControlError
from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.session import cannot_start

from helpers import (
    ACC,
    BYE,
    FLUSHED,
    GO,
    GREETING,
    HELO250,
    OK,
    crlf,
    norm,
    run_smtp,
)
from world import BASE_ENV, Plugin, World, load_config, run

WANT_MAIL = b"503 MAIL first (#5.5.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
AUTH_FAILED = b"535 authentication failed (#5.7.1)\r\n"
RECEIVED_HELO = (b"Received: from unknown (HELO c.test) (127.0.0.1)\n"
                 b"  by mx.test with SMTP; <DATE>\n")
RECEIVED_NOHELO = b"Received: from unknown (127.0.0.1)\n  by mx.test with SMTP; <DATE>\n"
CLIENT_MESSAGE = b"Subject: t\n\nhi\n"
CANT = rq.CannotStart(rq.EXEC, "No such file or directory")  # what exec said, for the world

HELO = b"HELO c.test"
MAIL = b"MAIL FROM:<a@b.c>"
RCPT = b"RCPT TO:<u@example.com>"
RSET = b"RSET"
QUIT = b"QUIT"
MSG = (b"Subject: t", b"", b"hi", b".")
DATA = (b"DATA",) + MSG  # DATA plus a message; only for a DATA that gets its 354
AUTH_PLAIN_JOE = b"AUTH PLAIN " + base64.b64encode(b"\0joe\0secret")

SECTIONS = ("connection", "helo", "mail", "rcpt", "data")

# The standard session and its replies, one reply slot per section's hook (the
# connection hook runs before the greeting, the data hook before the 354).
STD = crlf(HELO, MAIL, RCPT, *DATA, QUIT)
STD_SLOTS = [GREETING, HELO250, OK, OK, GO + ACC, BYE]


def std_with(slot, text):
    """The standard replies with text inserted in front of the reply of section slot."""
    return b"".join(STD_SLOTS[:slot]) + text + b"".join(STD_SLOTS[slot:])


def failure(entry, reason):
    return b"451 qmail-spp failure: " + entry + b": " + reason + b" (#4.3.0)\r\n"


# ------------------------------------------------------------------ in-process sessions


def listing(pairs):
    """(control/smtpplugins text, the world's plugins) from (section, [plugin, ...])
    pairs, in order: each plugin is listed as the entry SECTION-N, the N-th of its
    section (e.g. rcpt-1; a repeated header goes on counting)."""
    lines, plugins, count = [], {}, {}
    for section, entries in pairs:
        lines.append("[%s]" % section)
        for plugin in entries:
            count[section] = count.get(section, 0) + 1
            entry = "%s-%d" % (section, count[section])
            lines.append(entry)
            plugins[entry.encode()] = plugin
    return "\n".join(lines) + "\n", plugins


def environ(variables=None):
    """world.BASE_ENV with these variables (str; None removes one), as bytes."""
    env = dict(BASE_ENV)
    for name, value in (variables or {}).items():
        if value is None:
            env.pop(name.encode(), None)
        else:
            env[name.encode()] = value.encode()
    return env


@pytest.fixture
def spp(make_home):
    """spp(hooks, chunks, env=None, control=None, plugins=None, **world) -> the World
    after one session in-process, against a fresh qmail home.

    hooks: (section, [plugin, ...]) pairs (see listing()); or control/smtpplugins text
    as it is, whose entries plugins (bytes -> plugin) answers; None: no
    control/smtpplugins at all.  control: more control files (helpers.Home); env:
    variables over world.BASE_ENV (see environ()); world: World's keywords and
    world.run's args (the checkpassword command line)."""

    def play(hooks, chunks, env=None, control=None, plugins=None, **world):
        home = make_home(control=control)
        if hooks is None or isinstance(hooks, str):
            text, answers = hooks, {}
        else:
            text, answers = listing(hooks)
        answers.update(plugins or {})
        home.control("smtpplugins", text)
        return run(chunks, env=environ(env), home=home, plugins=answers, **world)

    return play


def when(name, prefix, output=b"", end=0):
    """A plugin that prints output and ends with end when variable name starts with
    prefix (the shell's `case "$NAME" in PREFIX*)`), and prints nothing and exits 0
    otherwise."""
    hit = lambda env: env.get(name, b"").startswith(prefix)
    return Plugin(lambda env: output if hit(env) else b"", lambda env: end if hit(env) else 0)


def echoes(text):
    """The world's plugins for the `:echo WORDS` entries of control/smtpplugins text:
    each prints its words (as /bin/sh would, for words without quotes or $)."""
    return {line.encode(): (line[len(":echo "):].encode() + b"\n", 0)
            for line in text.split("\n") if line.startswith(":echo ")}


def argvs(r):
    """The argv of every plugin the session started, in order."""
    return [argv for argv, _ in r.plugin_runs]


def queue_programs(r):
    return [q.program for q in r.requests if type(q) is rq.StartQueue]


def time_limits(r):
    return [q.time_limit for q in r.requests if type(q) is rq.StartPlugin]


# ================================================================== command letters
# One test per letter per section where it applies.


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_P_prints_before_the_reply(spp, slot, section):
    r = spp([(section, [(b"P250-from-%s\n" % section.encode(), 0)])], STD)
    assert norm(r.out) == std_with(slot, b"250-from-%s\r\n" % section.encode())
    assert r.status == 0
    assert len(r.queued) == 1


def test_P_lines_form_a_multiline_greeting(spp):
    r = spp([("connection", [(b"P220-first\nP220-second\n", 0)])], crlf(QUIT))
    assert r.out == b"220-first\r\n220-second\r\n" + GREETING + BYE


def test_E_connection_replaces_greeting_but_session_goes_on(spp):
    r = spp([("connection", [(b"E554 go away\nHX-After-E: 1\n", 0)])], STD)
    assert norm(r.out) == b"554 go away\r\n" + b"".join(STD_SLOTS[1:])
    (msg,) = r.queued
    assert norm(msg.message) == RECEIVED_HELO + CLIENT_MESSAGE  # H after E not read


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_E_helo_refuses_helo_and_ehlo_but_not_the_session(spp, verb):
    r = spp([("helo", [(b"E550 bad helo\n", 0)])], crlf(verb + b" c.test", MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == GREETING + b"550 bad helo\r\n" + OK + OK + GO + ACC + BYE
    (msg,) = r.queued
    assert norm(msg.message) == RECEIVED_NOHELO + CLIENT_MESSAGE  # HELO not recorded


def test_E_helo_keeps_the_transaction(spp):
    """A refused HELO does not reset the transaction (an accepted one does)."""
    r = spp([("helo", [when(b"SMTPHELOHOST", b"bad", b"E550 bad helo\n")])],
            crlf(MAIL, RCPT, b"HELO bad.test", *DATA, MAIL, RCPT, b"HELO good.test", b"DATA", QUIT))
    assert norm(r.out) == (GREETING + OK + OK + b"550 bad helo\r\n" + GO + ACC
                           + OK + OK + HELO250 + WANT_MAIL + BYE)
    assert len(r.queued) == 1


def test_E_mail_refuses_and_keeps_the_previous_transaction(spp):
    r = spp([("mail", [when(b"SMTPMAILFROM", b"bad@", b"E550 bad sender\nHX-No: 1\n")])],
            crlf(MAIL, RCPT, b"MAIL FROM:<bad@b.c>", b"RCPT TO:<v@example.com>", *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + b"550 bad sender\r\n" + OK + GO + ACC + BYE
    (msg,) = r.queued
    assert msg.sender == b"a@b.c"
    assert msg.recipients == [b"u@example.com", b"v@example.com"]
    assert b"X-No" not in msg.message


def test_E_mail_resets_counters_and_sets_SMTPMAILFROM_anyway(spp):
    counts = Plugin(lambda env: b"P250-from=%s count=%s all=%s\n" % (
        env[b"SMTPMAILFROM"], env[b"SMTPRCPTCOUNT"], env[b"SMTPRCPTCOUNTALL"]))
    r = spp([("mail", [when(b"SMTPMAILFROM", b"bad@", b"E550 bad sender\n")]),
             ("rcpt", [counts])],
            crlf(MAIL, RCPT, b"MAIL FROM:<bad@b.c>", b"RCPT TO:<v@example.com>", *DATA, QUIT))
    assert norm(r.out) == (GREETING + OK + b"250-from=a@b.c count=0 all=1\r\n" + OK
                           + b"550 bad sender\r\n"
                           + b"250-from=bad@b.c count=0 all=1\r\n" + OK + GO + ACC + BYE)
    (msg,) = r.queued
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"


def test_E_mail_without_previous_transaction(spp):
    r = spp([("mail", [when(b"SMTPMAILFROM", b"bad@", b"E550 bad sender\n")])],
            crlf(b"MAIL FROM:<bad@b.c>", RCPT, b"DATA", MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + b"550 bad sender\r\n" + WANT_MAIL + WANT_MAIL
                           + OK + OK + GO + ACC + BYE)
    assert [m.sender for m in r.queued] == [b"a@b.c"]


def test_E_rcpt_refuses_only_that_recipient(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"bad@", b"E550 5.1.1 no such user\n")])],
            crlf(MAIL, b"RCPT TO:<bad@example.com>", b"DATA", RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + OK + b"550 5.1.1 no such user\r\n" + WANT_RCPT
                           + OK + GO + ACC + BYE)
    (msg,) = r.queued
    assert msg.recipients == [b"u@example.com"]


def test_E_data_refuses_and_keeps_the_transaction(spp):
    # A greylister: refuses the first DATA, accepts the next one.
    seen = []

    def greylist(env):
        if seen:
            return b"N\n"
        seen.append(env)
        return b"E451 grey\n"

    r = spp([("data", [Plugin(greylist)])], crlf(MAIL, RCPT, b"DATA", *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + b"451 grey\r\n" + GO + ACC + BYE
    (msg,) = r.queued
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_R_replies_flushes_and_exits_0(spp, slot, section):
    r = spp([(section, [(b"P421-first\nR421 bye\nHX-No: 1\n", 0),
                        (b"E550 second plugin ran\n", 0)])], STD)
    assert r.out == b"".join(STD_SLOTS[:slot]) + b"421-first\r\n421 bye\r\n"
    assert r.status == 0
    assert r.queue_envs == []  # qmail-queue never started
    assert argvs(r) == [(section.encode() + b"-1",)]


def test_R_flushes_pipelined_replies_first(spp):
    r = spp([("rcpt", [(b"R421 go away\n", 0)])], crlf(HELO, MAIL, RCPT, RCPT, QUIT))  # at once
    assert r.out == GREETING + HELO250 + OK + b"421 go away\r\n"
    assert r.status == 0


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_D_exits_0_silently_after_flushing(spp, slot, section):
    r = spp([(section, [(b"P250-pending\nD\nE550 not read\n", 0),
                        (b"E550 second plugin ran\n", 0)])], STD)
    assert r.out == b"".join(STD_SLOTS[:slot]) + b"250-pending\r\n"
    assert r.status == 0
    assert r.queue_envs == []


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_N_accepts_and_skips_later_plugins(spp, slot, section):
    r = spp([(section, [(b"N\nE550 after N\n", 0), (b"E550 second plugin ran\n", 0)])], STD)
    assert norm(r.out) == std_with(slot, b"")
    assert len(r.queued) == 1


def test_N_in_rcpt_does_not_skip_rcpthosts(spp):
    r = spp([("rcpt", [(b"N\n", 0)])], crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT))
    assert r.out == GREETING + OK + NOGATEWAY + BYE


def test_N_in_mail_does_not_skip_badmailfrom(spp):
    r = spp([("mail", [(b"N\n", 0)])], crlf(b"MAIL FROM:<bad@b.c>", RCPT, QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    assert r.out == GREETING + OK + BMF + BYE


@pytest.mark.parametrize("slot,section", [(0, "connection"), (1, "helo"), (4, "data")])
def test_O_outside_mail_and_rcpt_is_like_N(spp, slot, section):
    r = spp([(section, [(b"O\n", 0), (b"E550 second plugin ran\n", 0)])], STD)
    assert norm(r.out) == std_with(slot, b"")
    assert len(r.queued) == 1


def test_O_in_mail_skips_badmailfrom(spp):
    skip = Plugin(lambda env: b"O\n" if env[b"SMTPMAILFROM"].endswith(b"@b.c") else b"")
    r = spp([("mail", [skip, (b"E550 second plugin ran\n", 0)])],
            crlf(b"MAIL FROM:<bad@b.c>", RCPT, *DATA, QUIT), control={"badmailfrom": "@b.c\n"})
    assert norm(r.out) == GREETING + OK + OK + GO + ACC + BYE
    assert [m.sender for m in r.queued] == [b"bad@b.c"]


def test_O_in_rcpt_skips_rcpthosts(spp):
    skip = Plugin(lambda env: b"O\n" if env[b"SMTPRCPTTO"].endswith(b"@relay.org") else b"")
    r = spp([("rcpt", [skip])],
            crlf(MAIL, b"RCPT TO:<x@relay.org>", b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + NOGATEWAY + GO + ACC + BYE
    assert r.queued[0].recipients == [b"x@relay.org"]


def test_O_in_rcpt_cannot_bypass_badmailfrom(spp):
    r = spp([("rcpt", [(b"O\n", 0)])], crlf(b"MAIL FROM:<bad@b.c>", RCPT, QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    assert r.out == GREETING + OK + BMF + BYE


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_A_disables_plugins_for_the_connection_and_survives_rset(spp, slot, section):
    # Every section has a marker plugin; the target section's first plugin says A.
    pairs = []
    for s in SECTIONS:
        entries = [(b"P250-marker-" + s.encode() + b"\n", 0)]
        if s == section:
            entries.insert(0, (b"A\nE550 after A\n", 0))
        pairs.append((s, entries))
    r = spp(pairs, crlf(HELO, MAIL, RCPT, *DATA, RSET, HELO, MAIL, RCPT, *DATA, QUIT))
    first = b"".join(
        (b"250-marker-" + s.encode() + b"\r\n" if i < slot else b"") + STD_SLOTS[i]
        for i, s in list(enumerate(SECTIONS)))
    assert norm(r.out) == first + FLUSHED + HELO250 + OK + OK + GO + ACC + BYE
    assert len(r.queued) == 2


@pytest.mark.parametrize("letter", ["M", "R", "D"])
@pytest.mark.parametrize("section", SECTIONS)
def test_L_deferred_errors(spp, letter, section):
    """LM/LR/LD from each section: the matching command is refused from then on (the
    buffer fires again and again) until RSET or until the next message's DATA."""
    DEF = b"451 deferred\r\n"
    H = (HELO,) if section == "helo" else ()
    HR = (HELO250,) if section == "helo" else ()
    if letter == "M":
        cases = {
            "connection": ((MAIL, MAIL, RSET, MAIL), (DEF, DEF, FLUSHED, OK)),
            "helo": ((MAIL, MAIL, RSET, MAIL), (DEF, DEF, FLUSHED, OK)),
            "mail": ((MAIL, MAIL, MAIL, RSET, MAIL, MAIL), (OK, DEF, DEF, FLUSHED, OK, DEF)),
            "rcpt": ((MAIL, RCPT, MAIL, MAIL, RSET, MAIL), (OK, OK, DEF, DEF, FLUSHED, OK)),
            "data": ((MAIL, RCPT, *DATA, MAIL), (OK, OK, GO, ACC, OK)),
        }
    elif letter == "R":
        cases = {
            "connection": ((MAIL, RCPT, RCPT, RSET, MAIL, RCPT), (OK, DEF, DEF, FLUSHED, OK, OK)),
            "helo": ((MAIL, RCPT, RCPT, RSET, MAIL, RCPT), (OK, DEF, DEF, FLUSHED, OK, OK)),
            "mail": ((MAIL, RCPT, RCPT, RSET, MAIL, RCPT), (OK, DEF, DEF, FLUSHED, OK, DEF)),
            "rcpt": ((MAIL, RCPT, RCPT, RSET, MAIL, RCPT), (OK, OK, DEF, FLUSHED, OK, OK)),
            "data": ((MAIL, RCPT, *DATA, MAIL, RCPT), (OK, OK, GO, ACC, OK, OK)),
        }
    else:
        cases = {
            "connection": ((MAIL, RCPT, b"DATA", b"DATA", RSET, MAIL, RCPT, *DATA),
                           (OK, OK, DEF, DEF, FLUSHED, OK, OK, GO, ACC)),
            "helo": ((MAIL, RCPT, b"DATA", b"DATA", RSET, MAIL, RCPT, *DATA),
                     (OK, OK, DEF, DEF, FLUSHED, OK, OK, GO, ACC)),
            "mail": ((MAIL, RCPT, b"DATA", b"DATA"), (OK, OK, DEF, DEF)),
            "rcpt": ((MAIL, RCPT, b"DATA", b"DATA"), (OK, OK, DEF, DEF)),
            "data": ((MAIL, RCPT, *DATA, MAIL, RCPT, *DATA), (OK, OK, GO, ACC, OK, OK, GO, ACC)),
        }
    commands, replies = cases[section]
    r = spp([(section, [(b"L%s451 deferred\n" % letter.encode(), 0)])],
            crlf(*H, *commands, QUIT))
    assert norm(r.out) == GREETING + b"".join(HR) + b"".join(replies) + BYE
    assert len(r.queued) == replies.count(ACC)


@pytest.mark.parametrize("section", SECTIONS)
def test_H_header_goes_right_after_received(spp, section):
    r = spp([(section, [(b"HX-Spp: from %s\n" % section.encode(), 0), (b"HX-Second: 2\n", 0)])],
            STD)
    assert norm(r.out) == std_with(0, b"")
    (msg,) = r.queued
    assert norm(msg.message) == (RECEIVED_HELO + b"X-Spp: from " + section.encode()
                                 + b"\nX-Second: 2\n" + CLIENT_MESSAGE)


@pytest.mark.parametrize("section", SECTIONS)
def test_C_changes_the_address_only_in_mail_and_rcpt(spp, section):
    show = Plugin(lambda env: b"HX-Env: from=%s to=%s\n" % (
        env.get(b"SMTPMAILFROM", b"unset"), env.get(b"SMTPRCPTTO", b"unset")))
    r = spp([(section, [(b"Cchanged@x.example\n", 0), show])], STD)
    assert norm(r.out) == std_with(0, b"")
    (msg,) = r.queued
    seen = {"connection": b"from=unset to=unset", "helo": b"from=unset to=unset",
            "mail": b"from=changed@x.example to=unset",
            "rcpt": b"from=a@b.c to=changed@x.example",
            "data": b"from=a@b.c to=u@example.com"}[section]
    assert msg.message.split(b"\n")[2] == b"X-Env: " + seen
    sender = b"changed@x.example" if section == "mail" else b"a@b.c"
    rcpt = b"changed@x.example" if section == "rcpt" else b"u@example.com"
    assert msg.envelope == b"F" + sender + b"\0T" + rcpt + b"\0\0"
    (qenv,) = r.queue_envs
    assert (qenv[b"SMTPMAILFROM"], qenv[b"SMTPRCPTTO"]) == (sender, rcpt)


@pytest.mark.parametrize("section", SECTIONS)
def test_S_sets_a_variable_for_later_plugins_and_qmail_queue(spp, section):
    show = Plugin(lambda env: b"HX-Var: %s\n" % env.get(b"SPPVAR", b"unset"))
    r = spp([(section, [(b"SSPPVAR=x=y\n", 0), show])], STD)
    assert norm(r.out) == std_with(0, b"")
    (msg,) = r.queued
    assert msg.message.split(b"\n")[2] == b"X-Var: x=y"
    assert r.queue_envs[0][b"SPPVAR"] == b"x=y"


@pytest.mark.parametrize("section", SECTIONS)
def test_U_unsets_a_variable_for_later_plugins_and_qmail_queue(spp, section):
    show = Plugin(lambda env: b"HX-Var: %s\n" % env.get(b"SPPVAR", b"unset"))
    r = spp([(section, [(b"USPPVAR\n", 0), show])], STD, env={"SPPVAR": "inherited"})
    assert norm(r.out) == std_with(0, b"")
    (msg,) = r.queued
    assert msg.message.split(b"\n")[2] == b"X-Var: unset"
    assert b"SPPVAR" not in r.queue_envs[0]


# ================================================================== state rules (§5)


def test_A_keeps_qmail_checks_for_its_own_command(spp):
    r = spp([("rcpt", [(b"A\n", 0)]), ("data", [(b"E550 data plugin ran\n", 0)])],
            crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", RCPT, *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + NOGATEWAY + OK + GO + ACC + BYE


def test_A_keeps_pending_deferred_errors_and_headers(spp):
    r = spp([("mail", [(b"HX-Kept: 1\nLR451 still deferred\nA\n", 0)])],
            crlf(MAIL, RCPT, RCPT, RSET, MAIL, RCPT, *DATA, MAIL, RCPT, *DATA, QUIT))
    defer = b"451 still deferred\r\n"
    assert norm(r.out) == (GREETING + OK + defer + defer + FLUSHED + OK + OK + GO + ACC
                           + OK + OK + GO + ACC + BYE)
    # RSET cleared the header; A kept the plugin from adding it again.
    assert [norm(m.message) for m in r.queued] == [RECEIVED_NOHELO + CLIENT_MESSAGE] * 2


def test_A_headers_collected_before_it_are_kept(spp):
    r = spp([("mail", [(b"HX-Kept: 1\nA\n", 0)])], crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == RECEIVED_NOHELO + b"X-Kept: 1\n" + CLIENT_MESSAGE


def test_after_A_only_address_variables_stop_updating(spp):
    r = spp([("mail", [(b"A\n", 0)])],
            crlf(b"HELO one", MAIL, RCPT, *DATA,
                 b"HELO two", b"MAIL FROM:<n@b.c>", b"RCPT TO:<v@example.com>",
                 b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT))
    assert len(r.queued) == 2
    qenv = r.queue_envs[1]
    assert qenv[b"SMTPHELOHOST"] == b"two"
    assert qenv[b"SMTPMAILFROM"] == b"a@b.c"       # set before A, never again
    assert b"SMTPRCPTTO" not in qenv               # rcpt plugins never ran
    assert qenv[b"SMTPRCPTCOUNT"] == b"1"
    assert qenv[b"SMTPRCPTCOUNTALL"] == b"2"
    assert qenv[b"SMTPRCPTHOSTSOK"] == b"0"


def test_NOSPP_is_like_A_from_the_start(spp):
    r = spp([("helo", [(b"E550 helo plugin ran\n", 0)]), ("rcpt", [(b"E550 rcpt plugin ran\n", 0)])],
            crlf(HELO, MAIL, RCPT, *DATA, QUIT), env={"NOSPP": ""})
    assert norm(r.out) == std_with(0, b"")
    assert r.plugin_runs == []
    qenv = r.queue_envs[0]
    assert qenv[b"SMTPHELOHOST"] == b"c.test"
    assert (qenv[b"SMTPRCPTCOUNT"], qenv[b"SMTPRCPTCOUNTALL"], qenv[b"SMTPRCPTHOSTSOK"]) == (
        b"0", b"1", b"1")
    assert b"SMTPMAILFROM" not in qenv and b"SMTPRCPTTO" not in qenv


def test_deferred_errors_from_several_plugins_accumulate(spp):
    r = spp([("connection", [(b"LM451-first\n", 0)]), ("helo", [(b"LM451 second\n", 0)])],
            crlf(HELO, MAIL, QUIT))
    assert r.out == GREETING + HELO250 + b"451-first\r\n451 second\r\n" + BYE


def test_deferred_text_appended_after_firing_is_never_shown(spp):
    """The NUL quirk: once the LM buffer fired, later LM text is hidden until RSET."""
    r = spp([("connection", [(b"LM451 first\n", 0)]), ("helo", [(b"LM451 second\n", 0)])],
            crlf(MAIL, HELO, MAIL, MAIL, RSET, MAIL, HELO, MAIL, QUIT))
    first = b"451 first\r\n"
    assert r.out == (GREETING + first + HELO250 + first + first + FLUSHED + OK + HELO250
                     + b"451 second\r\n" + BYE)


def test_empty_LM_queues_an_empty_reply_line(spp):
    r = spp([("connection", [(b"LM\n", 0)])], crlf(MAIL, RCPT, RSET, MAIL, QUIT))
    assert r.out == GREETING + b"\r\n" + WANT_MAIL + FLUSHED + OK + BYE


def test_qmail_checks_come_before_pending_deferred_errors(spp):
    """555, 503 and badmailfrom answer first; only then does a deferral fire."""
    long_mail = b"MAIL FROM:<" + b"x" * 950 + b"@b.c>"
    r = spp([("connection", [(b"LM451 lm\nLR451 lr\nLD451 ld\n", 0)])],
            crlf(long_mail, RCPT, b"DATA", MAIL, RSET, b"MAIL FROM:<bad@b.c>", RCPT, b"DATA",
                 QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    assert r.out == (GREETING + b"555 syntax error (#5.5.4)\r\n" + WANT_MAIL + WANT_MAIL
                     + b"451 lm\r\n" + FLUSHED + OK + BMF + WANT_RCPT + BYE)


def test_LM_from_connection_can_be_cleared_by_rset(spp):
    r = spp([("connection", [(b"LM554 listed in an RBL\n", 0)])],
            crlf(MAIL, RSET, MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + b"554 listed in an RBL\r\n" + FLUSHED + OK + OK
                           + GO + ACC + BYE)


def test_pending_LR_stops_plugins_and_counting(spp):
    def plugin(env):
        to = env[b"SMTPRCPTTO"]
        said = b"P250-all=%s to=%s\n" % (env[b"SMTPRCPTCOUNTALL"], to)
        return said + (b"LR451 later\n" if to.startswith(b"defer@") else b"")

    r = spp([("rcpt", [Plugin(plugin)])],
            crlf(MAIL, b"RCPT TO:<defer@example.com>", RCPT, RCPT, QUIT))
    assert r.out == (GREETING + OK + b"250-all=1 to=defer@example.com\r\n" + OK
                     + b"451 later\r\n" * 2 + BYE)
    assert len(r.plugin_runs) == 1


def test_deferred_LM_does_not_reset_the_counters(spp):
    def plugin(env):
        said = b"P250-count=%s all=%s\n" % (env[b"SMTPRCPTCOUNT"], env[b"SMTPRCPTCOUNTALL"])
        return said + (b"LM451 no more mail\n" if env[b"SMTPRCPTTO"].startswith(b"lm@") else b"")

    r = spp([("rcpt", [Plugin(plugin)])],
            crlf(MAIL, b"RCPT TO:<lm@example.com>", MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + OK + b"250-count=0 all=1\r\n" + OK
                           + b"451 no more mail\r\n" + b"250-count=1 all=2\r\n" + OK
                           + GO + ACC + BYE)
    assert r.queued[0].recipients == [b"lm@example.com", b"u@example.com"]


def test_headers_are_cleared_at_data(spp):
    r = spp([("connection", [(b"HX-Conn: 1\n", 0)]),
             ("mail", [Plugin(lambda env: b"HX-From: " + env[b"SMTPMAILFROM"] + b"\n")])],
            crlf(MAIL, RCPT, *DATA, b"MAIL FROM:<b@b.c>", RCPT, *DATA, QUIT))
    first, second = [norm(m.message) for m in r.queued]
    assert first == RECEIVED_NOHELO + b"X-Conn: 1\nX-From: a@b.c\n" + CLIENT_MESSAGE
    assert second == RECEIVED_NOHELO + b"X-From: b@b.c\n" + CLIENT_MESSAGE


def test_headers_are_cleared_at_data_even_if_the_message_fails(spp):
    big = (b"DATA", b"Subject: t", b"", b"x" * 100, b".")
    r = spp([("connection", [(b"HX-Conn: 1\n", 0)])],
            crlf(MAIL, RCPT, *big, MAIL, RCPT, *DATA, QUIT), env={"DATABYTES": "50"})
    assert norm(r.out) == (GREETING + OK + OK + GO
                           + b"552 sorry, that message size exceeds my databytes limit"
                             b" (#5.3.4)\r\n"
                           + OK + OK + GO + ACC + BYE)
    (msg,) = r.queued
    assert norm(msg.message) == RECEIVED_NOHELO + CLIENT_MESSAGE


def test_headers_are_cleared_by_rset(spp):
    r = spp([("helo", [Plugin(lambda env: b"HX-Helo: " + env[b"SMTPHELOHOST"] + b"\n")])],
            crlf(HELO, RSET, MAIL, RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == RECEIVED_HELO + CLIENT_MESSAGE


def test_headers_of_an_abandoned_transaction_carry_over(spp):
    r = spp([("mail", [Plugin(lambda env: b"HX-From: " + env[b"SMTPMAILFROM"] + b"\n")])],
            crlf(MAIL, RCPT, b"MAIL FROM:<b@b.c>", RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == (RECEIVED_NOHELO + b"X-From: a@b.c\nX-From: b@b.c\n"
                                         + CLIENT_MESSAGE)


def test_H_tab_makes_a_continuation_line(spp):
    r = spp([("rcpt", [(b"HX-Long: one\nH\ttwo\n", 0)])], crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == RECEIVED_NOHELO + b"X-Long: one\n\ttwo\n" + CLIENT_MESSAGE


def test_C_in_rcpt_skips_rcpthosts_for_the_new_address(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"u@", b"Cchanged@other.org\n")])],
            crlf(MAIL, RCPT, b"RCPT TO:<x@other.org>", *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + NOGATEWAY + GO + ACC + BYE
    assert r.queued[0].recipients == [b"changed@other.org"]


def test_C_in_rcpt_gets_the_relayclient_suffix(spp):
    r = spp([("rcpt", [(b"Cchanged@other.org\n", 0)])], crlf(MAIL, RCPT, *DATA, QUIT),
            env={"RELAYCLIENT": "+gw"})
    assert r.queued[0].recipients == [b"changed@other.org+gw"]


def test_C_in_data_sees_the_last_changed_rcpt(spp):
    r = spp([("rcpt", [(b"Cchanged@example.com\n", 0)]),
             ("data", [Plugin(lambda env: b"HX-Rcpt: " + env[b"SMTPRCPTTO"] + b"\n")])],
            crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == (RECEIVED_NOHELO + b"X-Rcpt: changed@example.com\n"
                                         + CLIENT_MESSAGE)


@pytest.mark.parametrize("original,changed,rcpt_reply", [
    (b"good@b.c", b"bad@b.c", BMF),   # badmailfrom applies to the new address
    (b"bad@b.c", b"good@b.c", OK),    # ... and not to the original one
])
def test_C_in_mail_then_badmailfrom_checks_the_new_address(spp, original, changed, rcpt_reply):
    r = spp([("mail", [(b"C" + changed + b"\n", 0)])],
            crlf(b"MAIL FROM:<" + original + b">", RCPT, QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    assert r.out == GREETING + OK + rcpt_reply + BYE


def test_C_with_empty_address_makes_a_null_sender(spp):
    r = spp([("mail", [(b"C\n", 0)])], crlf(MAIL, RCPT, *DATA, QUIT))
    assert r.queued[0].envelope == b"F\0Tu@example.com\0\0"


def test_S_and_U_persist_across_rset_and_transactions(spp):
    show = Plugin(lambda env: b"HX-Conn: %s ip=%s\n" % (
        env.get(b"SPPCONN", b"unset"), env.get(b"TCPREMOTEIP", b"unset")))
    r = spp([("connection", [(b"SSPPCONN=1\nUTCPREMOTEIP\n", 0)]), ("mail", [show])],
            crlf(MAIL, RCPT, *DATA, RSET, MAIL, RCPT, *DATA, QUIT))
    assert len(r.queued) == 2
    for msg, qenv in zip(r.queued, r.queue_envs):
        # Received still shows the address read at startup.
        assert norm(msg.message) == (RECEIVED_NOHELO + b"X-Conn: 1 ip=unset\n" + CLIENT_MESSAGE)
        assert qenv[b"SPPCONN"] == b"1" and b"TCPREMOTEIP" not in qenv


def test_S_QMAILQUEUE_redirects_the_message(spp):
    r = spp([("rcpt", [(b"SQMAILQUEUE=/other/qmail-queue\n", 0)])],
            crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + GO + ACC + BYE
    assert queue_programs(r) == [b"/other/qmail-queue"]  # not the default bin/qmail-queue
    assert [m.recipients for m in r.queued] == [[b"u@example.com"]]


def test_S_RELAYCLIENT_does_not_allow_relaying(spp):
    r = spp([("mail", [(b"SRELAYCLIENT=\n", 0)])], crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT))
    assert r.out == GREETING + OK + NOGATEWAY + BYE


# ================================================================== environment variables


def test_SMTPHELOHOST_is_the_argument_as_typed(spp):
    r = spp([("helo", [Plugin(lambda env: b"P250-[" + env[b"SMTPHELOHOST"] + b"]\n")])],
            crlf(b"HELO   spaced.test  ", b"EHLO x.test", b"HELO", QUIT))
    assert r.out == (GREETING + b"250-[spaced.test  ]\r\n" + HELO250
                     + b"250-[x.test]\r\n250-mx.example.org\r\n250-PIPELINING\r\n"
                       b"250 8BITMIME\r\n"
                     + b"250-[]\r\n" + HELO250 + BYE)


@pytest.mark.parametrize("arg,seen", [
    (b"<a@b.c>", b"a@b.c"),
    (b"<>", b""),
    (b'<"q u"@b.c>', b"q u@b.c"),
    (b"<@r1,@r2:x@b.c>", b"x@b.c"),
    (b"<a@[127.0.0.1]>", b"a@mx.example.org"),  # localiphost (here: me) substitution
])
def test_SMTPMAILFROM_is_the_parsed_address(spp, arg, seen):
    r = spp([("mail", [Plugin(lambda env: b"P250-[" + env[b"SMTPMAILFROM"] + b"]\n")])],
            crlf(b"MAIL FROM:" + arg, QUIT))
    assert r.out == GREETING + b"250-[" + seen + b"]\r\n" + OK + BYE


def test_rcpt_counters_hostsok_and_rcptto(spp):
    def value(env, name):
        return env.get(b"SMTPRCPT" + name, b"unset")

    at_mail = Plugin(lambda env: b"P250-mail from=%s to=%s count=%s all=%s\n" % (
        env[b"SMTPMAILFROM"], value(env, b"TO"), value(env, b"COUNT"), value(env, b"COUNTALL")))
    at_rcpt = Plugin(lambda env: b"P250-count=%s all=%s ok=%s to=%s\n" % (
        value(env, b"COUNT"), value(env, b"COUNTALL"), value(env, b"HOSTSOK"), value(env, b"TO")))
    at_data = Plugin(lambda env: b"HX-Data: count=%s all=%s ok=%s to=%s\n" % (
        value(env, b"COUNT"), value(env, b"COUNTALL"), value(env, b"HOSTSOK"), value(env, b"TO")))
    long_rcpt = b"RCPT TO:<" + b"x" * 950 + b"@example.com>"
    r = spp([("mail", [at_mail]),
             ("rcpt", [at_rcpt, when(b"SMTPRCPTTO", b"bad@", b"E550 refused\n")]),
             ("data", [at_data])],
            crlf(RCPT,                                   # 503: not counted
                 MAIL,
                 long_rcpt,                              # 555: not counted
                 b"RCPT TO:<u@example.com>",
                 b"RCPT TO:<x@elsewhere.org>",
                 b"RCPT TO:<bad@example.com>",
                 b"RCPT TO:<v@x.sub.example.net>",
                 *DATA,
                 b"MAIL FROM:<b@b.c>",
                 RCPT,
                 b"RCPT TO:<y@elsewhere.org>",
                 *DATA, QUIT))
    assert norm(r.out) == (
        GREETING + WANT_MAIL
        + b"250-mail from=a@b.c to=unset count=unset all=unset\r\n" + OK
        + b"555 syntax error (#5.5.4)\r\n"
        + b"250-count=0 all=1 ok=1 to=u@example.com\r\n" + OK
        + b"250-count=1 all=2 ok=0 to=x@elsewhere.org\r\n" + NOGATEWAY
        + b"250-count=1 all=3 ok=1 to=bad@example.com\r\n550 refused\r\n"
        + b"250-count=1 all=4 ok=1 to=v@x.sub.example.net\r\n" + OK
        + GO + ACC
        # the next [mail] still sees the previous transaction's values
        + b"250-mail from=b@b.c to=v@x.sub.example.net count=1 all=4\r\n" + OK
        + b"250-count=0 all=1 ok=1 to=u@example.com\r\n" + OK
        + b"250-count=1 all=2 ok=0 to=y@elsewhere.org\r\n" + NOGATEWAY
        + GO + ACC + BYE)
    first, second = r.queued
    # In [data], SMTPRCPTCOUNT is one low when the last RCPT was accepted ...
    assert first.message.split(b"\n")[2] == b"X-Data: count=1 all=4 ok=1 to=v@x.sub.example.net"
    # ... and SMTPRCPTTO is the last RCPT attempted, even a refused one.
    assert second.message.split(b"\n")[2] == b"X-Data: count=1 all=2 ok=0 to=y@elsewhere.org"


def test_rcpts_refused_by_badmailfrom_do_not_reach_plugins(spp):
    r = spp([("rcpt", [Plugin(lambda env: b"P250-all=" + env[b"SMTPRCPTCOUNTALL"] + b"\n")])],
            crlf(b"MAIL FROM:<bad@b.c>", RCPT, MAIL, RCPT, QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    assert r.out == GREETING + OK + BMF + OK + b"250-all=1\r\n" + OK + BYE


def test_SMTPRCPTHOSTSOK_and_SMTPRCPTTO_with_relayclient(spp):
    r = spp([("rcpt", [Plugin(lambda env: b"P250-ok=%s to=%s\n" % (
        env[b"SMTPRCPTHOSTSOK"], env[b"SMTPRCPTTO"]))])],
            crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT), env={"RELAYCLIENT": "+gw"})
    assert norm(r.out) == (GREETING + OK + b"250-ok=1 to=x@elsewhere.org\r\n" + OK
                           + GO + ACC + BYE)
    assert r.queued[0].recipients == [b"x@elsewhere.org+gw"]


def test_plugins_see_the_connection_environment(spp):
    r = spp([("connection", [Plugin(lambda env: b"HX-Env: %s %s %s\n" % (
        env[b"TCPREMOTEIP"], env[b"TCPLOCALHOST"], env[b"SPPINHERITED"]))])],
            crlf(MAIL, RCPT, *DATA, QUIT), env={"SPPINHERITED": "yes"})
    assert r.queued[0].message.split(b"\n")[2] == b"X-Env: 127.0.0.1 mx.test yes"


# ================================================================== configuration


def test_config_comments_blank_lines_and_trailing_whitespace(spp):
    text = ("# comment\n\n   \n[rcpt]\n#:echo E550 commented out\n"
            ":echo P250-one \t \n\n:echo P250-two\n")
    r = spp(text, crlf(MAIL, RCPT, QUIT), plugins=echoes(text.replace(" \t \n", "\n")))
    assert r.out == GREETING + OK + b"250-one\r\n250-two\r\n" + OK + BYE
    assert argvs(r) == [(b"/bin/sh", b"-c", b"echo P250-one"), (b"/bin/sh", b"-c", b"echo P250-two")]


def test_config_indented_comment_is_an_entry(spp):
    r = spp("[rcpt]\n #not a comment\n", crlf(MAIL, RCPT, QUIT),
            plugins={b" #not a comment": CANT})
    assert r.out == GREETING + OK + failure(b" #not a comment", b"can't execute") + BYE
    assert argvs(r) == [(b" #not a comment",)]


def test_config_leading_whitespace_of_an_entry_is_kept(spp):
    """An indented `:` entry is a path, not a shell command."""
    r = spp("[rcpt]\n  :echo P250-indented\n", crlf(MAIL, RCPT, QUIT),
            plugins={b"  :echo P250-indented": CANT})
    assert r.out == GREETING + OK + failure(b"  :echo P250-indented", b"can't execute") + BYE
    assert argvs(r) == [(b"  :echo P250-indented",)]


def test_config_sections_by_second_byte_and_discard_bucket(spp):
    text = (":echo E550 before any header\n"
            "[HELO]\n:echo E550 uppercase\n"
            "[ehlo]\n:echo E550 ehlo\n"
            "[]\n:echo E550 empty header\n"
            "[hxyz\n:echo P250-hxyz\n"
            "[disconnect]\n:echo P250-disconnect-is-data\n"
            "[rcpt]\n:echo P250-rcpt-1\n"
            "[xyz]\n:echo E550 unknown\n"
            "[r\n:echo P250-rcpt-2\n")
    r = spp(text, STD, plugins=echoes(text))
    assert norm(r.out) == (GREETING + b"250-hxyz\r\n" + HELO250 + OK
                           + b"250-rcpt-1\r\n250-rcpt-2\r\n" + OK
                           + b"250-disconnect-is-data\r\n" + GO + ACC + BYE)


def test_config_shell_entries_are_run_by_sh_c(spp):
    """A `:` entry is the rest of the line for /bin/sh -c (that the shell then has
    arguments, pipes and PATH: test_process_exec_of_paths_and_shell_entries)."""
    entry = b":printf 'P250-%s\\n' args | tr a-z A-Z"
    r = spp("[rcpt]\n%s\n" % entry.decode(), crlf(MAIL, RCPT, QUIT),
            plugins={entry: (b"P250-ARGS\n", 0)})
    assert r.out == GREETING + OK + b"250-ARGS\r\n" + OK + BYE
    assert argvs(r) == [(b"/bin/sh", b"-c", entry[1:])]


def test_config_plain_entries_are_one_path_without_arguments(spp):
    text = "[rcpt]\nplugins/p -x\nplugins/with space\n"
    r = spp(text, crlf(MAIL, RCPT, b"RCPT TO:<v@example.com>", QUIT),
            plugins={b"plugins/p -x": CANT, b"plugins/with space": (b"E550 with space ran\n", 0)})
    assert r.out == GREETING + OK + failure(b"plugins/p -x", b"can't execute") * 2 + BYE
    assert argvs(r) == [(b"plugins/p -x",)] * 2
    r = spp("[rcpt]\nplugins/with space\n", crlf(MAIL, RCPT, QUIT),
            plugins={b"plugins/with space": (b"E550 with space ran\n", 0)})
    assert r.out == GREETING + OK + b"550 with space ran\r\n" + BYE
    assert argvs(r) == [(b"plugins/with space",)]


def test_config_plain_entries_are_not_looked_up_in_path(spp):
    """The entry is the path given to execv as written (no PATH search: the real exec
    refusing `true` is in test_process_exec_failures_are_cant_execute)."""
    r = spp("[rcpt]\ntrue\n", crlf(MAIL, RCPT, QUIT), plugins={b"true": CANT})
    assert r.out == GREETING + OK + failure(b"true", b"can't execute") + BYE
    assert argvs(r) == [(b"true",)]


def test_config_crlf_file_breaks_entries_but_not_headers(spp):
    r = spp("[rcpt]\r\nplugins/p\r\n", crlf(MAIL, RCPT, QUIT),
            plugins={b"plugins/p\r": CANT, b"plugins/p": (b"P250-ran\n", 0)})
    assert r.out == GREETING + OK + failure(b"plugins/p\r", b"can't execute") + BYE
    assert argvs(r) == [(b"plugins/p\r",)]


def test_config_repeated_header_appends_in_order(spp):
    r = spp([("rcpt", [(b"P250-a\n", 0)]), ("mail", []), ("rcpt", [(b"P250-b\n", 0)])],
            crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + b"250-a\r\n250-b\r\n" + OK + BYE


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_SPPCONFFILE(make_home, where):
    home = make_home(control={"smtpplugins": "[rcpt]\ndefault\n"})
    if where == "absolute":
        path = os.path.join(home.root, "other-plugins")
    else:
        path = os.path.join(home.path, "control", "other")
    with open(path, "w") as f:
        f.write("[rcpt]\nother\n")
    value = path if where == "absolute" else "control/other"
    r = run(crlf(MAIL, RCPT, QUIT), env=environ({"SPPCONFFILE": value}), home=home,
            plugins={b"default": (b"E550 default file used\n", 0),
                     b"other": (b"E550 from SPPCONFFILE\n", 0)})
    assert r.out == GREETING + OK + b"550 from SPPCONFFILE\r\n" + BYE


def test_empty_SPPCONFFILE_means_the_default(spp):
    r = spp([("rcpt", [(b"E550 default file used\n", 0)])], crlf(MAIL, RCPT, QUIT),
            env={"SPPCONFFILE": ""})
    assert r.out == GREETING + OK + b"550 default file used\r\n" + BYE


@pytest.mark.parametrize("nospp", ["", "1"])
def test_NOSPP_turns_plugins_off_and_needs_no_config(spp, nospp):
    r = spp(None, STD, env={"NOSPP": nospp, "SPPCONFFILE": "control/missing"})
    assert norm(r.out) == std_with(0, b"")
    r = spp([("connection", [(b"R421 plugin ran\n", 0)])], crlf(QUIT), env={"NOSPP": nospp})
    assert r.out == GREETING + BYE
    assert r.plugin_runs == []


@pytest.mark.parametrize("how", ["missing", "SPPCONFFILE missing", "directory"])
def test_unreadable_config_is_421_and_exit_1(make_home, how):
    """The loader refuses the configuration, and a connection whose controls cannot
    be read is 421 and exit 1 (the driver's glue between the two, with the real
    program: test_process_missing_config_is_421_and_exit_1)."""
    home = make_home()
    home.control("smtpplugins", None)
    env = {}
    if how == "SPPCONFFILE missing":
        home.control("smtpplugins", "")
        env["SPPCONFFILE"] = "control/nope"
    elif how == "directory":
        os.makedirs(os.path.join(home.path, "control", "smtpplugins"))
    with pytest.raises(ControlError) as refused:
        load_config(home, environ(env))
    r = World(crlf(HELO, MAIL, QUIT)).play(cannot_start(str(refused.value)))
    assert r.out == CONTROLS
    assert r.status == 1


def test_empty_config_is_fine(spp):
    r = spp("", STD)
    assert norm(r.out) == std_with(0, b"")


# ================================================================== running a plugin


def test_exit_120_is_cant_execute_and_rejects(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"bad@", end=120)])],
            crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + OK + failure(b"rcpt-1", b"can't execute")
                           + OK + GO + ACC + BYE)
    assert r.queued[0].recipients == [b"u@example.com"]


def test_other_exit_codes_are_ignored(spp):
    r = spp([("rcpt", [(b"HX-One: 1\n", 1), (b"", 127), (b"P250-third ran\n", 2)])],
            crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + b"250-third ran\r\n" + OK + GO + ACC + BYE
    assert norm(r.queued[0].message) == RECEIVED_NOHELO + b"X-One: 1\n" + CLIENT_MESSAGE


def test_killed_plugin_is_child_crashed_and_rejects(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"bad@", end=rq.Signaled(9))])],
            crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(r.out) == (GREETING + OK + failure(b"rcpt-1", b"child crashed")
                           + OK + GO + ACC + BYE)
    assert r.queued[0].recipients == [b"u@example.com"]


def test_output_before_a_crash_stays(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"bad@", b"HX-Before-Crash: 1\nE550 printed\n",
                            rq.Signaled(9))])],
            crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert b"550 printed\r\n451 qmail-spp failure: " in r.out
    assert b"child crashed (#4.3.0)\r\n" + OK + GO in r.out
    assert norm(r.queued[0].message) == (RECEIVED_NOHELO + b"X-Before-Crash: 1\n"
                                         + CLIENT_MESSAGE)


def test_R_then_crash_rejects_instead_of_disconnecting(spp):
    r = spp([("helo", [(b"R421 bye\n", rq.Signaled(9))])], crlf(HELO, MAIL, QUIT))
    assert r.out == (GREETING + b"421 bye\r\n" + failure(b"helo-1", b"child crashed")
                     + OK + BYE)
    assert r.status == 0


def test_wait_failure_rejects(spp):
    r = spp([("rcpt", [(b"P250-said\n", rq.WaitFailed("No child processes"))])],
            crlf(MAIL, RCPT, QUIT))
    assert r.out == (GREETING + OK + b"250-said\r\n" + failure(b"rcpt-1", b"wait_pid() failed")
                     + BYE)


@pytest.mark.parametrize("reason, text", [(rq.EXEC, b"can't execute"),
                                          (rq.PIPE, b"can't pipe()"),
                                          (rq.FORK, b"fork() failed")])
def test_unrunnable_plugin_rejects_and_skips_the_rest(spp, reason, text):
    """What the system could not start (for exec: a missing file, no x bit, a
    directory; the real exec: test_process_exec_failures_are_cant_execute)."""
    r = spp([("rcpt", [rq.CannotStart(reason, "Permission denied"), (b"P250-never\n", 0)])],
            crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + failure(b"rcpt-1", text) + BYE
    assert argvs(r) == [(b"rcpt-1",)]  # the second plugin never started


def test_plugin_printing_N_then_lingering_breaks_nothing(spp):
    """After N nothing more is read (waiting for a lingering real process:
    test_process_SIGPIPE_stays_ignored_in_plugins)."""
    r = spp([("rcpt", [(b"N\nE550 not read\n", 0)]), ("data", [(b"N\n", 0)])],
            crlf(MAIL, RCPT, b"RCPT TO:<v@example.com>", *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + OK + OK + GO + ACC + BYE
    assert r.queued[0].recipients == [b"u@example.com", b"v@example.com"]


def test_terminating_command_stops_reading(spp):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", b"bad@", b"E550 no\nHX-After: 1\nSSPPAFTER=1\n")]),
             ("data", [Plugin(lambda env: b"HX-Var: %s\n" % env.get(b"SPPAFTER", b"unset"))])],
            crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(r.out) == GREETING + OK + b"550 no\r\n" + OK + GO + ACC + BYE
    assert norm(r.queued[0].message) == RECEIVED_NOHELO + b"X-Var: unset\n" + CLIENT_MESSAGE


def test_unknown_letters_are_ignored(spp):
    r = spp([("rcpt", [(b"e550 lower\nZ550 zed\nL\nLX550 lx\nP250-p\n", 0)])],
            crlf(MAIL, RCPT, RCPT, QUIT))
    # No reply from e/Z/L/LX, and nothing deferred: the second RCPT is accepted too.
    assert r.out == GREETING + OK + b"250-p\r\n" + OK + b"250-p\r\n" + OK + BYE


def test_long_reply_line_goes_through_intact(spp):
    r = spp([("rcpt", [(b"E550 %0100000d\n" % 7, 0)])], crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + b"550 " + b"0" * 99999 + b"7\r\n" + BYE


# ================================================================== DECISIONS.md deviations


def test_deviation_unterminated_last_line_counts_whole(spp):
    r = spp([("rcpt", [(b"P250-x\nE550 abc", 0)])], crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + b"250-x\r\n550 abc\r\n" + BYE  # qmail-spp: "550 ab"


def test_deviation_unterminated_single_letter_counts(spp):
    r = spp([("rcpt", [(b"N", 0), (b"E550 second plugin ran\n", 0)])], crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + OK + BYE  # qmail-spp ignores the bare N


def test_deviation_cr_before_lf_is_dropped(spp):
    show = Plugin(lambda env: b"HX-Var: [%s]\r\nE550 x\r\n" % env.get(b"SPPCR", b""))
    r = spp([("rcpt", [(b"P250-p\r\nHX-Cr: 1\r\nSSPPCR=v\r\n", 0), show])],
            crlf(MAIL, RCPT, QUIT))
    assert r.out == GREETING + OK + b"250-p\r\n550 x\r\n" + BYE  # not 550 x\r\r\n
    r = spp([("rcpt", [(b"Cnew@example.com\r\nHX-Cr: 1\r\n", 0)])], crlf(MAIL, RCPT, *DATA, QUIT))
    (msg,) = r.queued
    assert msg.recipients == [b"new@example.com"]
    assert norm(msg.message) == RECEIVED_NOHELO + b"X-Cr: 1\n" + CLIENT_MESSAGE


def test_deviation_cr_in_S_value_is_dropped(spp):
    show = Plugin(lambda env: b"HX-Var: [%s]\n" % env.get(b"SPPCR", b""))
    r = spp([("rcpt", [(b"SSPPCR=v\r\n", 0), show])], crlf(MAIL, RCPT, *DATA, QUIT))
    assert r.queued[0].message.split(b"\n")[2] == b"X-Var: [v]"


def test_deviation_stale_badmailfrom_flag_is_cleared_after_O(spp):
    r = spp([("mail", [when(b"SMTPMAILFROM", b"good@", b"O\n")])],
            crlf(b"MAIL FROM:<bad@b.c>", RCPT, b"MAIL FROM:<good@b.c>", RCPT, *DATA, QUIT),
            control={"badmailfrom": "bad@b.c\n"})
    # qmail-spp 0.42 would answer the second RCPT with the badmailfrom 553 too.
    assert norm(r.out) == GREETING + OK + BMF + OK + OK + GO + ACC + BYE
    assert r.queued[0].sender == b"good@b.c"


@pytest.mark.parametrize("empty", [b"H\n", b"H\r\n"])
def test_deviation_empty_H_is_ignored(spp, empty):
    r = spp([("rcpt", [(b"HX-Before: 1\n" + empty + b"HX-After: 1\n", 0)])],
            crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(r.queued[0].message) == (RECEIVED_NOHELO + b"X-Before: 1\nX-After: 1\n"
                                         + CLIENT_MESSAGE)


# ================================================================== SPPTIMEOUT


SLOW = b"slow@example.com"


@pytest.mark.parametrize("output", [
    b"",      # the plugin hangs (itself, or a grandchild keeping the pipe open)
    b"N\n",   # done talking, but does not exit
])
def test_SPPTIMEOUT_kills_a_slow_plugin_as_crashed(spp, output):
    r = spp([("rcpt", [when(b"SMTPRCPTTO", SLOW, output, rq.TIMED_OUT), (b"P250-next\n", 0)])],
            crlf(MAIL, b"RCPT TO:<" + SLOW + b">", RCPT, *DATA, QUIT), env={"SPPTIMEOUT": "1"})
    assert norm(r.out) == (GREETING + OK + failure(b"rcpt-1", b"child crashed")
                           + b"250-next\r\n" + OK + GO + ACC + BYE)
    assert r.queued[0].recipients == [b"u@example.com"]
    assert time_limits(r) == [1, 1, 1]
    assert "qmail-spp: pid 4243 killed after its time limit of 1s" in r.log


def test_SPPTIMEOUT_is_per_plugin(spp):
    """Each plugin of a hook gets the whole limit, not what the ones before it left."""
    r = spp([("rcpt", [(b"", 0), (b"E550 both ran\n", 0)])], crlf(MAIL, RCPT, QUIT),
            env={"SPPTIMEOUT": "2"})
    assert r.out == GREETING + OK + b"550 both ran\r\n" + BYE
    assert time_limits(r) == [2, 2]


@pytest.mark.parametrize("value, limit", [(None, None), ("0", None), ("5", 5)])
def test_SPPTIMEOUT_unset_zero_or_large_lets_slow_plugins_finish(spp, value, limit):
    r = spp([("rcpt", [(b"E550 slow but honoured\n", 0)])], crlf(MAIL, RCPT, QUIT),
            env={"SPPTIMEOUT": value})
    assert r.out == GREETING + OK + b"550 slow but honoured\r\n" + BYE
    assert time_limits(r) == [limit]


# ================================================================== the [auth] hook


AUTH_ARGS = ("/bin/checkpassword", "/bin/true")


def joe_only(data):
    """checkpassword: exit 0 for joe/secret, 1 for anyone else."""
    return 0 if data == b"joe\0secret\0" else 1


def test_auth_hook_runs_after_checkpassword_with_user_and_method(spp):
    r = spp([("auth", [(b"P235-hook\n", 0)])],
            crlf(AUTH_PLAIN_JOE, MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT),
            env={"SMTPAUTH": ""}, args=AUTH_ARGS, checkpassword=joe_only)
    assert r.out == GREETING + b"235-hook\r\n" + AUTH_OK + OK + OK + BYE  # relaying allowed
    (env,) = r.plugin_envs
    assert (env[b"SMTPAUTHUSER"], env[b"SMTPAUTHMETHOD"]) == (b"joe", b"plain")
    assert r.checkpassword == [b"joe\0secret\0"]


def test_auth_hook_refusal_leaves_the_session_unauthenticated(spp):
    r = spp([("auth", [(b"E535 5.7.0 not you\n", 0)])],
            crlf(AUTH_PLAIN_JOE, MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT),
            env={"SMTPAUTH": ""}, args=AUTH_ARGS, checkpassword=joe_only)
    assert r.out == GREETING + b"535 5.7.0 not you\r\n" + OK + NOGATEWAY + BYE


def test_auth_hook_does_not_run_when_checkpassword_refuses(spp):
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0joe\0wrong")
    r = spp([("auth", [(b"E535 hook ran\n", 0)])], crlf(wrong, QUIT),
            env={"SMTPAUTH": ""}, args=AUTH_ARGS, checkpassword=joe_only)
    assert r.out == GREETING + AUTH_FAILED + BYE
    assert r.plugin_runs == []


# ================================================================== the real process
# Each test here needs the installed program: what it pins happens between the
# driver and the system, where the world only sees argv and outcomes.


def add_plugin(home, name, body, mode=0o755):
    """Write home/plugins/NAME as a /bin/sh script; returns the entry 'plugins/NAME'."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)
    return "plugins/" + name


def real_home(make_home, smtpplugins):
    home = make_home()
    home.control("smtpplugins", smtpplugins)
    return home


def test_process_exec_of_paths_and_shell_entries(make_home):
    """A `:` entry runs under /bin/sh -c (arguments, a pipe, tr found in PATH); a
    plain entry is execv'ed as written: relative to the cwd (the qmail home; the
    server is started in home.root), absolute, a space part of the name."""
    home = make_home()
    rel = add_plugin(home, "rel", "echo P250-relative")
    absolute = os.path.join(home.path, add_plugin(home, "abs", "echo P250-absolute"))
    add_plugin(home, "with space", "echo P250-with space ran")
    home.control("smtpplugins", "[rcpt]\n:printf 'P250-%%s\\n' args | tr a-z A-Z\n%s\n%s\n"
                                "plugins/with space\n" % (rel, absolute))
    res = run_smtp(crlf(MAIL, RCPT, QUIT), home=home)
    assert res.out == (GREETING + OK + b"250-ARGS\r\n250-relative\r\n250-absolute\r\n"
                       b"250-with space ran\r\n" + OK + BYE)


def test_process_exec_failures_are_cant_execute(make_home):
    """What the real exec refuses is can't execute, and the section's later plugins
    do not run: a missing file, one without the x bit, a directory, a path followed
    by an argument (no splitting: plugins/p exists), a bare name PATH would find.
    One hook per failure: a refused connection hook takes the greeting's place, a
    refused HELO or MAIL leaves the session going."""
    home = make_home()
    add_plugin(home, "noexec", "echo E550 noexec ran", mode=0o644)
    add_plugin(home, "p", "echo E550 p ran")
    home.control("smtpplugins", "[connection]\nplugins/none\n:echo P220-never\n"
                                "[helo]\nplugins/noexec\n:echo P250-never\n"
                                "[mail]\nplugins\n:echo P250-never\n")
    res = run_smtp(crlf(HELO, MAIL, QUIT), home=home)
    assert res.out == (failure(b"plugins/none", b"can't execute")
                       + failure(b"plugins/noexec", b"can't execute")
                       + failure(b"plugins", b"can't execute") + BYE)
    home.control("smtpplugins", "[helo]\nplugins/p -x\n[mail]\ntrue\n")
    res = run_smtp(crlf(HELO, MAIL, QUIT), home=home)
    assert res.out == (GREETING + failure(b"plugins/p -x", b"can't execute")
                       + failure(b"true", b"can't execute") + BYE)


def test_process_exit_status_and_signals_of_a_real_plugin(make_home):
    """Real wait statuses: exit 120 is can't execute, death by SIGKILL is child
    crashed (both quoting the `:` entry), exit 1 and a shell's 127 for a missing
    command are ignored."""
    entry = ':case "$SMTPRCPTTO" in x120@*) exit 120;; kill@*) kill -9 $$;; one@*) exit 1;; esac'
    home = real_home(make_home, "[rcpt]\n%s\n:no-such-command-xyz 2>/dev/null\n" % entry)
    res = run_smtp(crlf(MAIL, b"RCPT TO:<x120@example.com>", b"RCPT TO:<kill@example.com>",
                        b"RCPT TO:<one@example.com>", RCPT, *DATA, QUIT), home=home)
    assert norm(res.out) == (GREETING + OK + failure(entry.encode(), b"can't execute")
                             + failure(entry.encode(), b"child crashed") + OK + OK
                             + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"one@example.com", b"u@example.com"]


def test_process_plugin_stdin_is_closed(make_home):
    """The plugin's fd 0 is closed (not the SMTP connection, not /dev/null)."""
    home = real_home(make_home, "[connection]\n:if [ -e /proc/$$/fd/0 ]; then "
                                "echo P220-stdin-open; else echo P220-stdin-closed; fi\n")
    res = run_smtp(crlf(QUIT), home=home)
    assert res.out == b"220-stdin-closed\r\n" + GREETING + BYE


def test_process_plugin_cwd_is_the_qmail_home(make_home):
    """The server is started elsewhere (home.root); plugins run in the qmail home."""
    home = real_home(make_home, '[connection]\n:echo "P220-$(pwd -P)"\n')
    res = run_smtp(crlf(QUIT), home=home)
    assert res.out == (b"220-" + os.path.realpath(home.path).encode() + b"\r\n"
                       + GREETING + BYE)


def test_process_plugin_stderr_reaches_the_server_log(make_home):
    """The plugin's fd 2 is the server's stderr (the log), never the client."""
    home = real_home(make_home, "[rcpt]\n:echo plugin-log: rcpt=$SMTPRCPTTO ppid=$PPID >&2\n")
    res = run_smtp(crlf(MAIL, RCPT, QUIT), home=home)
    assert res.out == GREETING + OK + OK + BYE
    assert b"plugin-log: rcpt=u@example.com ppid=" in res.err


def test_process_SIGPIPE_stays_ignored_in_plugins(make_home):
    """A plugin writing on after N, to the pipe the server closed, gets EPIPE and
    exits 0 (with SIGPIPE at its default it would die: child crashed); the server
    waits for it to end, then goes on."""
    home = real_home(make_home, "[rcpt]\n:echo N; while echo HX-late; do :; done 2>/dev/null; "
                                "exit 0\n:echo E550 second plugin ran\n")
    res = run_smtp(crlf(MAIL, RCPT, *DATA, QUIT), home=home)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + CLIENT_MESSAGE


def test_process_SPPTIMEOUT_kills_a_real_plugin_that_keeps_writing(make_home):
    """A real process over the limit is killed, also while its output keeps arriving
    faster than it is read (ignored Z lines, so nothing accumulates), and the
    session goes on (a plugin that hangs, closes its stdout or leaves a grandchild
    holding the pipe: t/test_faults.py)."""
    entry = ':case "$SMTPRCPTTO" in %s) exec yes Z;; esac' % SLOW.decode()
    home = real_home(make_home, "[rcpt]\n%s\n" % entry)
    res = run_smtp(crlf(MAIL, b"RCPT TO:<" + SLOW + b">", RCPT, QUIT), home=home,
                   env={"SPPTIMEOUT": "1"}, timeout=15)
    assert res.out == GREETING + OK + failure(entry.encode(), b"child crashed") + OK + BYE
    assert b"killed after its time limit of 1s" in res.err


def test_process_missing_config_is_421_and_exit_1(make_home):
    """qmail-spp fails closed: without control/smtpplugins the installed program
    answers 421 and exits 1 (the driver's handling of the loader's refusal)."""
    home = real_home(make_home, None)
    res = run_smtp(crlf(HELO, MAIL, QUIT), home=home)
    assert res.out == CONTROLS
    assert res.status == 1


def test_process_auth_hook_after_a_real_checkpassword(make_home):
    """A real checkpassword (credentials on fd 3, exec of the next program) accepts
    joe; then the [auth] plugin runs with SMTPAUTHUSER and SMTPAUTHMETHOD set."""
    home = make_home()
    checkpw = os.path.join(home.path, add_plugin(
        home, "checkpw", 'read -r x <&3; case "$x" in joesecret) exec "$@";; esac; exit 1'))
    home.control("smtpplugins", '[auth]\n:echo "P235-$SMTPAUTHUSER $SMTPAUTHMETHOD"\n')
    res = run_smtp(crlf(AUTH_PLAIN_JOE, MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT), home=home,
                   args=(checkpw, "/bin/true"), env={"SMTPAUTH": ""})
    assert res.out == GREETING + b"235-joe plain\r\n" + AUTH_OK + OK + OK + BYE


def test_process_swaks_under_tcpserver_rcpt_plugin_rejects_one_recipient(tcpservers, make_home):
    """A real client (swaks) over TCP, the server under the real tcpserver."""
    home = real_home(make_home, '[rcpt]\n:case "$SMTPRCPTTO" in bad@*) '
                                'echo "E550 5.1.1 no mailbox here";; esac\n')
    port = tcpservers.start(home).port
    status, transcript = swaks(port, "--to", "good@example.com,bad@example.com",
                               "--header", "Subject: spp test", "--body", "hello")
    assert b"<** 550 5.1.1 no mailbox here" in transcript, transcript
    assert b"<-  250 ok " in transcript, transcript  # the message was accepted
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tgood@example.com\0\0"
    assert b"\nSubject: spp test\n" in msg.message

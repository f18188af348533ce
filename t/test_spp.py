"""qmail-spp (SMTP plugins) in the installed qmail-smtpd-py, over pipes.

Behaviour: ../shared/spec/spp.md, with the deviations of ../shared/spec/DECISIONS.md
(an unterminated last output line counts whole, a CR before LF is dropped, the stale
badmailfrom flag after O in MAIL is cleared, an empty H line is ignored, SPPTIMEOUT).

Plugins are tiny /bin/sh programs: `:` entries of control/smtpplugins (run as
`/bin/sh -c REST`) or scripts written into the qmail home's plugins/ directory. The
environment a message was queued with is recorded by a wrapper around the fake
qmail-queue (helpers.EnvQueue). The default home (conftest.py) has
me=mx.example.org and rcpthosts example.com and .sub.example.net.
"""

import os

import pytest
from test_tcpserver import swaks

from helpers import (
    ACC,
    BYE,
    FLUSHED,
    GO,
    GREETING,
    HELO250,
    OK,
    EnvQueue,
    crlf,
    norm,
    run_smtp,
)

WANT_MAIL = b"503 MAIL first (#5.5.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
RECEIVED_HELO = (b"Received: from unknown (HELO c.test) (127.0.0.1)\n"
                 b"  by mx.test with SMTP; <DATE>\n")
RECEIVED_NOHELO = b"Received: from unknown (127.0.0.1)\n  by mx.test with SMTP; <DATE>\n"
CLIENT_MESSAGE = b"Subject: t\n\nhi\n"

HELO = b"HELO c.test"
MAIL = b"MAIL FROM:<a@b.c>"
RCPT = b"RCPT TO:<u@example.com>"
RSET = b"RSET"
QUIT = b"QUIT"
MSG = (b"Subject: t", b"", b"hi", b".")
DATA = (b"DATA",) + MSG  # DATA plus a message; only for a DATA that gets its 354

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


def conf(*pairs):
    """control/smtpplugins text from (section, [entries]) pairs, in order."""
    lines = []
    for section, entries in pairs:
        lines.append("[%s]" % section)
        lines.extend(entries)
    return "\n".join(lines) + "\n"


def add_plugin(home, name, body, mode=0o755):
    """Write home/plugins/NAME as a /bin/sh script; returns the entry 'plugins/NAME'."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)
    return "plugins/" + name


@pytest.fixture
def spp(make_home):
    """spp(config, control=None, files=True) -> a home with control/smtpplugins = config.

    With files=True (the default) every `:` entry of config is written instead as a
    /bin/sh script plugins/pN (mode 0755) and the entry becomes `plugins/pN`, the way
    plugins are usually installed; files=False keeps the `:` entries (tests of that form
    and tests whose expected replies quote the entry)."""

    def make(config, control=None, files=True):
        home = make_home(control=dict(control or {}, smtpplugins=""))
        if config is None:
            home.control("smtpplugins", None)
            return home
        if files:
            lines = config.split("\n")
            for n, line in enumerate(lines):
                if line.startswith(":"):
                    lines[n] = add_plugin(home, "p%d" % n, line[1:])
            config = "\n".join(lines)
        home.control("smtpplugins", config)
        return home

    return make


def run(home, data, env=None, **kw):
    return run_smtp(data, env=env, home=home, **kw)


# ================================================================== command letters
# One test per letter per section where it applies.


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_P_prints_before_the_reply(spp, slot, section):
    home = spp(conf((section, [":echo P250-from-%s" % section])))
    res = run(home, STD)
    assert norm(res.out) == std_with(slot, b"250-from-%s\r\n" % section.encode())
    assert res.status == 0
    assert len(res.queued) == 1


def test_P_lines_form_a_multiline_greeting(spp):
    home = spp(conf(("connection", [":echo P220-first; echo P220-second"])))
    res = run(home, crlf(QUIT))
    assert res.out == b"220-first\r\n220-second\r\n" + GREETING + BYE


def test_E_connection_replaces_greeting_but_session_goes_on(spp):
    home = spp(conf(("connection", [":echo E554 go away; echo HX-After-E: 1"])))
    res = run(home, STD)
    assert norm(res.out) == b"554 go away\r\n" + b"".join(STD_SLOTS[1:])
    (msg,) = res.queued
    assert norm(msg.message) == RECEIVED_HELO + CLIENT_MESSAGE  # H after E not read


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_E_helo_refuses_helo_and_ehlo_but_not_the_session(spp, verb):
    home = spp(conf(("helo", [":echo E550 bad helo"])))
    res = run(home, crlf(verb + b" c.test", MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + b"550 bad helo\r\n" + OK + OK + GO + ACC + BYE
    (msg,) = res.queued
    assert norm(msg.message) == RECEIVED_NOHELO + CLIENT_MESSAGE  # HELO not recorded


def test_E_helo_keeps_the_transaction(spp):
    """A refused HELO does not reset the transaction (an accepted one does)."""
    home = spp(conf(("helo", [':case "$SMTPHELOHOST" in bad*) echo E550 bad helo;; esac'])))
    res = run(home, crlf(MAIL, RCPT, b"HELO bad.test", *DATA,
                         MAIL, RCPT, b"HELO good.test", b"DATA", QUIT))
    assert norm(res.out) == (GREETING + OK + OK + b"550 bad helo\r\n" + GO + ACC
                             + OK + OK + HELO250 + WANT_MAIL + BYE)
    assert len(res.queued) == 1


def test_E_mail_refuses_and_keeps_the_previous_transaction(spp):
    home = spp(conf(("mail", [
        ':case "$SMTPMAILFROM" in bad@*) echo E550 bad sender; echo HX-No: 1;; esac'])))
    res = run(home, crlf(MAIL, RCPT, b"MAIL FROM:<bad@b.c>", b"RCPT TO:<v@example.com>",
                         *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + b"550 bad sender\r\n" + OK + GO + ACC + BYE
    (msg,) = res.queued
    assert msg.sender == b"a@b.c"
    assert msg.recipients == [b"u@example.com", b"v@example.com"]
    assert b"X-No" not in msg.message


def test_E_mail_resets_counters_and_sets_SMTPMAILFROM_anyway(spp):
    home = spp(conf(("mail", [':case "$SMTPMAILFROM" in bad@*) echo E550 bad sender;; esac']),
                    ("rcpt", [':echo "P250-from=$SMTPMAILFROM count=$SMTPRCPTCOUNT '
                              'all=$SMTPRCPTCOUNTALL"'])))
    res = run(home, crlf(MAIL, RCPT, b"MAIL FROM:<bad@b.c>", b"RCPT TO:<v@example.com>",
                         *DATA, QUIT))
    assert norm(res.out) == (GREETING + OK + b"250-from=a@b.c count=0 all=1\r\n" + OK
                             + b"550 bad sender\r\n"
                             + b"250-from=bad@b.c count=0 all=1\r\n" + OK + GO + ACC + BYE)
    (msg,) = res.queued
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"


def test_E_mail_without_previous_transaction(spp):
    home = spp(conf(("mail", [':case "$SMTPMAILFROM" in bad@*) echo E550 bad sender;; esac'])))
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, b"DATA", MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + b"550 bad sender\r\n" + WANT_MAIL + WANT_MAIL
                             + OK + OK + GO + ACC + BYE)
    assert [m.sender for m in res.queued] == [b"a@b.c"]


def test_E_rcpt_refuses_only_that_recipient(spp):
    home = spp(conf(("rcpt", [
        ':case "$SMTPRCPTTO" in bad@*) echo E550 5.1.1 no such user;; esac'])))
    res = run(home, crlf(MAIL, b"RCPT TO:<bad@example.com>", b"DATA", RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + OK + b"550 5.1.1 no such user\r\n" + WANT_RCPT
                             + OK + GO + ACC + BYE)
    (msg,) = res.queued
    assert msg.recipients == [b"u@example.com"]


def test_E_data_refuses_and_keeps_the_transaction(spp):
    # A greylister: refuses the first DATA, accepts the next one.
    home = spp(conf(("data", [":if [ -e grey ]; then echo N; else : > grey; echo E451 grey; fi"])))
    res = run(home, crlf(MAIL, RCPT, b"DATA", *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + b"451 grey\r\n" + GO + ACC + BYE
    (msg,) = res.queued
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_R_replies_flushes_and_exits_0(spp, slot, section):
    home = spp(conf((section, [":echo P421-first; echo R421 bye; echo HX-No: 1",
                               ":echo E550 second plugin ran"])))
    res = run(home, STD)
    assert res.out == b"".join(STD_SLOTS[:slot]) + b"421-first\r\n421 bye\r\n"
    assert res.status == 0
    assert home.queue.runs() == 0


def test_R_flushes_pipelined_replies_first(spp):
    home = spp(conf(("rcpt", [":echo R421 go away"])))
    res = run(home, crlf(HELO, MAIL, RCPT, RCPT, QUIT))  # all sent at once
    assert res.out == GREETING + HELO250 + OK + b"421 go away\r\n"
    assert res.status == 0


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_D_exits_0_silently_after_flushing(spp, slot, section):
    home = spp(conf((section, [":echo P250-pending; echo D; echo E550 not read",
                               ":echo E550 second plugin ran"])))
    res = run(home, STD)
    assert res.out == b"".join(STD_SLOTS[:slot]) + b"250-pending\r\n"
    assert res.status == 0
    assert home.queue.runs() == 0


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_N_accepts_and_skips_later_plugins(spp, slot, section):
    home = spp(conf((section, [":echo N; echo E550 after N", ":echo E550 second plugin ran"])))
    res = run(home, STD)
    assert norm(res.out) == std_with(slot, b"")
    assert len(res.queued) == 1


def test_N_in_rcpt_does_not_skip_rcpthosts(spp):
    home = spp(conf(("rcpt", [":echo N"])))
    res = run(home, crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT))
    assert res.out == GREETING + OK + NOGATEWAY + BYE


def test_N_in_mail_does_not_skip_badmailfrom(spp):
    home = spp(conf(("mail", [":echo N"])), control={"badmailfrom": "bad@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, QUIT))
    assert res.out == GREETING + OK + BMF + BYE


@pytest.mark.parametrize("slot,section", [(0, "connection"), (1, "helo"), (4, "data")])
def test_O_outside_mail_and_rcpt_is_like_N(spp, slot, section):
    home = spp(conf((section, [":echo O", ":echo E550 second plugin ran"])))
    res = run(home, STD)
    assert norm(res.out) == std_with(slot, b"")
    assert len(res.queued) == 1


def test_O_in_mail_skips_badmailfrom(spp):
    home = spp(conf(("mail", [':case "$SMTPMAILFROM" in *@b.c) echo O;; esac',
                              ":echo E550 second plugin ran"])),
               control={"badmailfrom": "@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert [m.sender for m in res.queued] == [b"bad@b.c"]


def test_O_in_rcpt_skips_rcpthosts(spp):
    home = spp(conf(("rcpt", [':case "$SMTPRCPTTO" in *@relay.org) echo O;; esac'])))
    res = run(home, crlf(MAIL, b"RCPT TO:<x@relay.org>", b"RCPT TO:<x@elsewhere.org>",
                         *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + NOGATEWAY + GO + ACC + BYE
    assert res.queued[0].recipients == [b"x@relay.org"]


def test_O_in_rcpt_cannot_bypass_badmailfrom(spp):
    home = spp(conf(("rcpt", [":echo O"])), control={"badmailfrom": "bad@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, QUIT))
    assert res.out == GREETING + OK + BMF + BYE


@pytest.mark.parametrize("slot,section", list(enumerate(SECTIONS)))
def test_A_disables_plugins_for_the_connection_and_survives_rset(spp, slot, section):
    # Every section has a marker plugin; the target section's first plugin says A.
    pairs = []
    for s in SECTIONS:
        entries = [":echo P250-marker-" + s]
        if s == section:
            entries.insert(0, ":echo A; echo E550 after A")
        pairs.append((s, entries))
    home = spp(conf(*pairs))
    res = run(home, crlf(HELO, MAIL, RCPT, *DATA, RSET, HELO, MAIL, RCPT, *DATA, QUIT))
    first = b"".join(
        (b"250-marker-" + s.encode() + b"\r\n" if i < slot else b"") + STD_SLOTS[i]
        for i, s in list(enumerate(SECTIONS)))
    assert norm(res.out) == first + FLUSHED + HELO250 + OK + OK + GO + ACC + BYE
    assert len(res.queued) == 2


@pytest.mark.parametrize("letter", ["M", "R", "D"])
@pytest.mark.parametrize("section", SECTIONS)
def test_L_deferred_errors(spp, letter, section):
    """LM/LR/LD from each section: the matching command is refused from then on (the
    buffer fires again and again) until RSET or until the next message's DATA."""
    home = spp(conf((section, [":echo L%s451 deferred" % letter])))
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
    res = run(home, crlf(*H, *commands, QUIT))
    assert norm(res.out) == GREETING + b"".join(HR) + b"".join(replies) + BYE
    assert len(res.queued) == replies.count(ACC)


@pytest.mark.parametrize("section", SECTIONS)
def test_H_header_goes_right_after_received(spp, section):
    home = spp(conf((section, [":echo HX-Spp: from %s" % section, ":echo HX-Second: 2"])))
    res = run(home, STD)
    assert norm(res.out) == std_with(0, b"")
    (msg,) = res.queued
    assert norm(msg.message) == (RECEIVED_HELO + b"X-Spp: from " + section.encode()
                                 + b"\nX-Second: 2\n" + CLIENT_MESSAGE)


@pytest.mark.parametrize("section", SECTIONS)
def test_C_changes_the_address_only_in_mail_and_rcpt(spp, section):
    home = spp(conf((section, [":echo Cchanged@x.example",
                               ":echo HX-Env: from=${SMTPMAILFROM-unset} to=${SMTPRCPTTO-unset}"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    res = run(home, STD, env=env)
    assert norm(res.out) == std_with(0, b"")
    (msg,) = res.queued
    seen = {"connection": b"from=unset to=unset", "helo": b"from=unset to=unset",
            "mail": b"from=changed@x.example to=unset",
            "rcpt": b"from=a@b.c to=changed@x.example",
            "data": b"from=a@b.c to=u@example.com"}[section]
    assert msg.message.split(b"\n")[2] == b"X-Env: " + seen
    sender = b"changed@x.example" if section == "mail" else b"a@b.c"
    rcpt = b"changed@x.example" if section == "rcpt" else b"u@example.com"
    assert msg.envelope == b"F" + sender + b"\0T" + rcpt + b"\0\0"
    qenv = queue.environ(msg.pid)
    assert (qenv[b"SMTPMAILFROM"], qenv[b"SMTPRCPTTO"]) == (sender, rcpt)


@pytest.mark.parametrize("section", SECTIONS)
def test_S_sets_a_variable_for_later_plugins_and_qmail_queue(spp, section):
    home = spp(conf((section, [":echo SSPPVAR=x=y", ":echo HX-Var: ${SPPVAR-unset}"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    res = run(home, STD, env=env)
    assert norm(res.out) == std_with(0, b"")
    (msg,) = res.queued
    assert msg.message.split(b"\n")[2] == b"X-Var: x=y"
    assert queue.environ(msg.pid)[b"SPPVAR"] == b"x=y"


@pytest.mark.parametrize("section", SECTIONS)
def test_U_unsets_a_variable_for_later_plugins_and_qmail_queue(spp, section):
    home = spp(conf((section, [":echo USPPVAR", ":echo HX-Var: ${SPPVAR-unset}"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    env["SPPVAR"] = "inherited"
    res = run(home, STD, env=env)
    assert norm(res.out) == std_with(0, b"")
    (msg,) = res.queued
    assert msg.message.split(b"\n")[2] == b"X-Var: unset"
    assert b"SPPVAR" not in queue.environ(msg.pid)


# ================================================================== state rules (§5)


def test_A_keeps_qmail_checks_for_its_own_command(spp):
    home = spp(conf(("rcpt", [":echo A"]), ("data", [":echo E550 data plugin ran"])))
    res = run(home, crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + NOGATEWAY + OK + GO + ACC + BYE


def test_A_keeps_pending_deferred_errors_and_headers(spp):
    home = spp(conf(("mail", [":echo HX-Kept: 1; echo LR451 still deferred; echo A"])))
    res = run(home, crlf(MAIL, RCPT, RCPT, RSET, MAIL, RCPT, *DATA, MAIL, RCPT, *DATA, QUIT))
    defer = b"451 still deferred\r\n"
    assert norm(res.out) == (GREETING + OK + defer + defer + FLUSHED + OK + OK + GO + ACC
                             + OK + OK + GO + ACC + BYE)
    # RSET cleared the header; A kept the plugin from adding it again.
    assert [norm(m.message) for m in res.queued] == [RECEIVED_NOHELO + CLIENT_MESSAGE] * 2


def test_A_headers_collected_before_it_are_kept(spp):
    home = spp(conf(("mail", [":echo HX-Kept: 1; echo A"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + b"X-Kept: 1\n" + CLIENT_MESSAGE


def test_after_A_only_address_variables_stop_updating(spp):
    home = spp(conf(("mail", [":echo A"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    res = run(home, crlf(b"HELO one", MAIL, RCPT, *DATA,
                         b"HELO two", b"MAIL FROM:<n@b.c>", b"RCPT TO:<v@example.com>",
                         b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT), env=env)
    assert len(res.queued) == 2
    qenv = queue.environ(res.queued[1].pid)
    assert qenv[b"SMTPHELOHOST"] == b"two"
    assert qenv[b"SMTPMAILFROM"] == b"a@b.c"       # set before A, never again
    assert b"SMTPRCPTTO" not in qenv               # rcpt plugins never ran
    assert qenv[b"SMTPRCPTCOUNT"] == b"1"
    assert qenv[b"SMTPRCPTCOUNTALL"] == b"2"
    assert qenv[b"SMTPRCPTHOSTSOK"] == b"0"


def test_NOSPP_is_like_A_from_the_start(spp):
    home = spp(conf(("helo", [":echo E550 helo plugin ran"]),
                    ("rcpt", [":echo E550 rcpt plugin ran"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    env["NOSPP"] = ""
    res = run(home, crlf(HELO, MAIL, RCPT, *DATA, QUIT), env=env)
    assert norm(res.out) == std_with(0, b"")
    qenv = queue.environ(res.queued[0].pid)
    assert qenv[b"SMTPHELOHOST"] == b"c.test"
    assert (qenv[b"SMTPRCPTCOUNT"], qenv[b"SMTPRCPTCOUNTALL"], qenv[b"SMTPRCPTHOSTSOK"]) == (
        b"0", b"1", b"1")
    assert b"SMTPMAILFROM" not in qenv and b"SMTPRCPTTO" not in qenv


def test_deferred_errors_from_several_plugins_accumulate(spp):
    home = spp(conf(("connection", [":echo LM451-first"]), ("helo", [":echo LM451 second"])))
    res = run(home, crlf(HELO, MAIL, QUIT))
    assert res.out == GREETING + HELO250 + b"451-first\r\n451 second\r\n" + BYE


def test_deferred_text_appended_after_firing_is_never_shown(spp):
    """The NUL quirk: once the LM buffer fired, later LM text is hidden until RSET."""
    home = spp(conf(("connection", [":echo LM451 first"]), ("helo", [":echo LM451 second"])))
    res = run(home, crlf(MAIL, HELO, MAIL, MAIL, RSET, MAIL, HELO, MAIL, QUIT))
    first = b"451 first\r\n"
    assert res.out == (GREETING + first + HELO250 + first + first + FLUSHED + OK + HELO250
                       + b"451 second\r\n" + BYE)


def test_empty_LM_queues_an_empty_reply_line(spp):
    home = spp(conf(("connection", [":echo LM"])))
    res = run(home, crlf(MAIL, RCPT, RSET, MAIL, QUIT))
    assert res.out == GREETING + b"\r\n" + WANT_MAIL + FLUSHED + OK + BYE


def test_qmail_checks_come_before_pending_deferred_errors(spp):
    """555, 503 and badmailfrom answer first; only then does a deferral fire."""
    home = spp(conf(("connection", [":echo LM451 lm; echo LR451 lr; echo LD451 ld"])),
               control={"badmailfrom": "bad@b.c\n"})
    long_mail = b"MAIL FROM:<" + b"x" * 950 + b"@b.c>"
    res = run(home, crlf(long_mail, RCPT, b"DATA", MAIL, RSET,
                         b"MAIL FROM:<bad@b.c>", RCPT, b"DATA", QUIT))
    assert res.out == (GREETING + b"555 syntax error (#5.5.4)\r\n" + WANT_MAIL + WANT_MAIL
                       + b"451 lm\r\n" + FLUSHED + OK + BMF + WANT_RCPT + BYE)


def test_LM_from_connection_can_be_cleared_by_rset(spp):
    home = spp(conf(("connection", [":echo LM554 listed in an RBL"])))
    res = run(home, crlf(MAIL, RSET, MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + b"554 listed in an RBL\r\n" + FLUSHED + OK + OK
                             + GO + ACC + BYE)


def test_pending_LR_stops_plugins_and_counting(spp):
    home = spp(conf(("rcpt", [
        ':echo "P250-all=$SMTPRCPTCOUNTALL to=$SMTPRCPTTO"; '
        'case "$SMTPRCPTTO" in defer@*) echo LR451 later;; esac'])))
    res = run(home, crlf(MAIL, b"RCPT TO:<defer@example.com>", RCPT, RCPT, QUIT))
    assert res.out == (GREETING + OK + b"250-all=1 to=defer@example.com\r\n" + OK
                       + b"451 later\r\n" * 2 + BYE)


def test_deferred_LM_does_not_reset_the_counters(spp):
    home = spp(conf(("rcpt", [
        ':echo "P250-count=$SMTPRCPTCOUNT all=$SMTPRCPTCOUNTALL"; '
        'case "$SMTPRCPTTO" in lm@*) echo LM451 no more mail;; esac'])))
    res = run(home, crlf(MAIL, b"RCPT TO:<lm@example.com>", MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + OK + b"250-count=0 all=1\r\n" + OK
                             + b"451 no more mail\r\n" + b"250-count=1 all=2\r\n" + OK
                             + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"lm@example.com", b"u@example.com"]


def test_headers_are_cleared_at_data(spp):
    home = spp(conf(("connection", [":echo HX-Conn: 1"]),
                    ("mail", [":echo HX-From: $SMTPMAILFROM"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, b"MAIL FROM:<b@b.c>", RCPT, *DATA, QUIT))
    first, second = [norm(m.message) for m in res.queued]
    assert first == RECEIVED_NOHELO + b"X-Conn: 1\nX-From: a@b.c\n" + CLIENT_MESSAGE
    assert second == RECEIVED_NOHELO + b"X-From: b@b.c\n" + CLIENT_MESSAGE


def test_headers_are_cleared_at_data_even_if_the_message_fails(spp):
    home = spp(conf(("connection", [":echo HX-Conn: 1"])))
    big = (b"DATA", b"Subject: t", b"", b"x" * 100, b".")
    res = run(home, crlf(MAIL, RCPT, *big, MAIL, RCPT, *DATA, QUIT), env={"DATABYTES": "50"})
    assert norm(res.out) == (GREETING + OK + OK + GO
                             + b"552 sorry, that message size exceeds my databytes limit"
                               b" (#5.3.4)\r\n"
                             + OK + OK + GO + ACC + BYE)
    (msg,) = res.queued
    assert norm(msg.message) == RECEIVED_NOHELO + CLIENT_MESSAGE


def test_headers_are_cleared_by_rset(spp):
    home = spp(conf(("helo", [":echo HX-Helo: $SMTPHELOHOST"])))
    res = run(home, crlf(HELO, RSET, MAIL, RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == RECEIVED_HELO + CLIENT_MESSAGE


def test_headers_of_an_abandoned_transaction_carry_over(spp):
    home = spp(conf(("mail", [":echo HX-From: $SMTPMAILFROM"])))
    res = run(home, crlf(MAIL, RCPT, b"MAIL FROM:<b@b.c>", RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == (RECEIVED_NOHELO + b"X-From: a@b.c\nX-From: b@b.c\n"
                                           + CLIENT_MESSAGE)


def test_H_tab_makes_a_continuation_line(spp):
    home = spp(conf(("rcpt", [":printf 'HX-Long: one\\nH\\ttwo\\n'"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + b"X-Long: one\n\ttwo\n" + CLIENT_MESSAGE


def test_C_in_rcpt_skips_rcpthosts_for_the_new_address(spp):
    home = spp(conf(("rcpt", [':case "$SMTPRCPTTO" in u@*) echo Cchanged@other.org;; esac'])))
    res = run(home, crlf(MAIL, RCPT, b"RCPT TO:<x@other.org>", *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + NOGATEWAY + GO + ACC + BYE
    assert res.queued[0].recipients == [b"changed@other.org"]


def test_C_in_rcpt_gets_the_relayclient_suffix(spp):
    home = spp(conf(("rcpt", [":echo Cchanged@other.org"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT), env={"RELAYCLIENT": "+gw"})
    assert res.queued[0].recipients == [b"changed@other.org+gw"]


def test_C_in_data_sees_the_last_changed_rcpt(spp):
    home = spp(conf(("rcpt", [":echo Cchanged@example.com"]),
                    ("data", [":echo HX-Rcpt: $SMTPRCPTTO"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == (RECEIVED_NOHELO + b"X-Rcpt: changed@example.com\n"
                                           + CLIENT_MESSAGE)


@pytest.mark.parametrize("original,changed,rcpt_reply", [
    (b"good@b.c", b"bad@b.c", BMF),   # badmailfrom applies to the new address
    (b"bad@b.c", b"good@b.c", OK),    # ... and not to the original one
])
def test_C_in_mail_then_badmailfrom_checks_the_new_address(spp, original, changed, rcpt_reply):
    home = spp(conf(("mail", [":echo C" + changed.decode()])),
               control={"badmailfrom": "bad@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<" + original + b">", RCPT, QUIT))
    assert res.out == GREETING + OK + rcpt_reply + BYE


def test_C_with_empty_address_makes_a_null_sender(spp):
    home = spp(conf(("mail", [":echo C"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert res.queued[0].envelope == b"F\0Tu@example.com\0\0"


def test_S_and_U_persist_across_rset_and_transactions(spp):
    home = spp(conf(("connection", [":echo SSPPCONN=1; echo UTCPREMOTEIP"]),
                    ("mail", [":echo HX-Conn: ${SPPCONN-unset} ip=${TCPREMOTEIP-unset}"])))
    queue = EnvQueue(home)
    env = {"QMAILQUEUE": queue.path}
    res = run(home, crlf(MAIL, RCPT, *DATA, RSET, MAIL, RCPT, *DATA, QUIT), env=env)
    assert len(res.queued) == 2
    for msg in res.queued:
        # Received still shows the address read at startup.
        assert norm(msg.message) == (RECEIVED_NOHELO + b"X-Conn: 1 ip=unset\n" + CLIENT_MESSAGE)
        qenv = queue.environ(msg.pid)
        assert qenv[b"SPPCONN"] == b"1" and b"TCPREMOTEIP" not in qenv


def test_S_QMAILQUEUE_redirects_the_message(spp, make_home):
    other = make_home()
    home = spp(conf(("rcpt", [":echo SQMAILQUEUE=" + other.queue.path])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert res.queued == []
    assert [m.recipients for m in other.queued()] == [[b"u@example.com"]]


def test_S_RELAYCLIENT_does_not_allow_relaying(spp):
    home = spp(conf(("mail", [":echo SRELAYCLIENT="])))
    res = run(home, crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT))
    assert res.out == GREETING + OK + NOGATEWAY + BYE


# ================================================================== environment variables


def test_SMTPHELOHOST_is_the_argument_as_typed(spp):
    home = spp(conf(("helo", [':echo "P250-[$SMTPHELOHOST]"'])))
    res = run(home, crlf(b"HELO   spaced.test  ", b"EHLO x.test", b"HELO", QUIT))
    assert res.out == (GREETING + b"250-[spaced.test  ]\r\n" + HELO250
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
    home = spp(conf(("mail", [':echo "P250-[$SMTPMAILFROM]"'])))
    res = run(home, crlf(b"MAIL FROM:" + arg, QUIT))
    assert res.out == GREETING + b"250-[" + seen + b"]\r\n" + OK + BYE


def test_rcpt_counters_hostsok_and_rcptto(spp):
    home = spp(conf(
        ("mail", [':echo "P250-mail from=$SMTPMAILFROM to=${SMTPRCPTTO-unset} '
                  'count=${SMTPRCPTCOUNT-unset} all=${SMTPRCPTCOUNTALL-unset}"']),
        ("rcpt", [':echo "P250-count=$SMTPRCPTCOUNT all=$SMTPRCPTCOUNTALL '
                  'ok=$SMTPRCPTHOSTSOK to=$SMTPRCPTTO"',
                  ':case "$SMTPRCPTTO" in bad@*) echo E550 refused;; esac']),
        ("data", [":echo HX-Data: count=$SMTPRCPTCOUNT all=$SMTPRCPTCOUNTALL "
                  "ok=$SMTPRCPTHOSTSOK to=$SMTPRCPTTO"])))
    long_rcpt = b"RCPT TO:<" + b"x" * 950 + b"@example.com>"
    res = run(home, crlf(
        RCPT,                                   # 503: not counted
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
    assert norm(res.out) == (
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
    first, second = res.queued
    # In [data], SMTPRCPTCOUNT is one low when the last RCPT was accepted ...
    assert first.message.split(b"\n")[2] == b"X-Data: count=1 all=4 ok=1 to=v@x.sub.example.net"
    # ... and SMTPRCPTTO is the last RCPT attempted, even a refused one.
    assert second.message.split(b"\n")[2] == b"X-Data: count=1 all=2 ok=0 to=y@elsewhere.org"


def test_rcpts_refused_by_badmailfrom_do_not_reach_plugins(spp):
    home = spp(conf(("rcpt", [':echo "P250-all=$SMTPRCPTCOUNTALL"'])),
               control={"badmailfrom": "bad@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + BMF + OK + b"250-all=1\r\n" + OK + BYE


def test_SMTPRCPTHOSTSOK_and_SMTPRCPTTO_with_relayclient(spp):
    home = spp(conf(("rcpt", [':echo "P250-ok=$SMTPRCPTHOSTSOK to=$SMTPRCPTTO"'])))
    res = run(home, crlf(MAIL, b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT),
              env={"RELAYCLIENT": "+gw"})
    assert norm(res.out) == (GREETING + OK + b"250-ok=1 to=x@elsewhere.org\r\n" + OK
                             + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"x@elsewhere.org+gw"]


def test_plugins_see_the_connection_environment(spp):
    home = spp(conf(("connection", [":echo HX-Env: $TCPREMOTEIP $TCPLOCALHOST $SPPINHERITED"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT), env={"SPPINHERITED": "yes"})
    assert res.queued[0].message.split(b"\n")[2] == b"X-Env: 127.0.0.1 mx.test yes"


# ================================================================== configuration


def test_config_comments_blank_lines_and_trailing_whitespace(spp):
    home = spp("# comment\n\n   \n[rcpt]\n#:echo E550 commented out\n"
               ":echo P250-one \t \n\n:echo P250-two\n", files=False)
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-one\r\n250-two\r\n" + OK + BYE


def test_config_indented_comment_is_an_entry(spp):
    home = spp("[rcpt]\n #not a comment\n")
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + failure(b" #not a comment", b"can't execute") + BYE


def test_config_leading_whitespace_of_an_entry_is_kept(spp):
    home = spp("[rcpt]\n  :echo P250-indented\n")
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + failure(b"  :echo P250-indented", b"can't execute") + BYE


def test_config_sections_by_second_byte_and_discard_bucket(spp):
    home = spp(":echo E550 before any header\n"
               "[HELO]\n:echo E550 uppercase\n"
               "[ehlo]\n:echo E550 ehlo\n"
               "[]\n:echo E550 empty header\n"
               "[hxyz\n:echo P250-hxyz\n"
               "[disconnect]\n:echo P250-disconnect-is-data\n"
               "[rcpt]\n:echo P250-rcpt-1\n"
               "[xyz]\n:echo E550 unknown\n"
               "[r\n:echo P250-rcpt-2\n")
    res = run(home, STD)
    assert norm(res.out) == (GREETING + b"250-hxyz\r\n" + HELO250 + OK
                             + b"250-rcpt-1\r\n250-rcpt-2\r\n" + OK
                             + b"250-disconnect-is-data\r\n" + GO + ACC + BYE)


def test_config_shell_entries_have_arguments_pipes_and_path(spp):
    home = spp("[rcpt]\n:printf 'P250-%s\\n' args | tr a-z A-Z\n", files=False)
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-ARGS\r\n" + OK + BYE


def test_config_plain_entries_are_one_path_without_arguments(spp):
    home = spp("[rcpt]\nplugins/p -x\nplugins/with space\n")
    add_plugin(home, "p", "echo E550 p ran")
    add_plugin(home, "with space", "echo E550 with space ran")
    res = run(home, crlf(MAIL, RCPT, b"RCPT TO:<v@example.com>", QUIT))
    assert res.out == GREETING + OK + failure(b"plugins/p -x", b"can't execute") * 2 + BYE
    home.control("smtpplugins", "[rcpt]\nplugins/with space\n")
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"550 with space ran\r\n" + BYE


def test_config_plain_entries_are_not_looked_up_in_path(spp):
    home = spp("[rcpt]\ntrue\n")
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + failure(b"true", b"can't execute") + BYE


def test_config_relative_and_absolute_paths(spp):
    home = spp("")
    rel = add_plugin(home, "rel", "echo P250-relative")
    absolute = os.path.join(home.path, add_plugin(home, "abs", "echo P250-absolute"))
    home.control("smtpplugins", "[rcpt]\n%s\n%s\n" % (rel, absolute))
    res = run(home, crlf(MAIL, RCPT, QUIT))  # the server starts in home.root, not home
    assert res.out == GREETING + OK + b"250-relative\r\n250-absolute\r\n" + OK + BYE


def test_config_crlf_file_breaks_entries_but_not_headers(spp):
    home = spp("")
    entry = add_plugin(home, "p", "echo P250-ran")
    home.control("smtpplugins", "[rcpt]\r\n%s\r\n" % entry)
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + failure(entry.encode() + b"\r", b"can't execute") + BYE


def test_config_repeated_header_appends_in_order(spp):
    home = spp(conf(("rcpt", [":echo P250-a"]), ("mail", []), ("rcpt", [":echo P250-b"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-a\r\n250-b\r\n" + OK + BYE


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_SPPCONFFILE(spp, where):
    home = spp(conf(("rcpt", [":echo E550 default file used"])))
    if where == "absolute":
        path = os.path.join(home.root, "other-plugins")
    else:
        path = os.path.join(home.path, "control", "other")
    with open(path, "w") as f:
        f.write(conf(("rcpt", [":echo E550 from SPPCONFFILE"])))
    value = path if where == "absolute" else "control/other"
    res = run(home, crlf(MAIL, RCPT, QUIT), env={"SPPCONFFILE": value})
    assert res.out == GREETING + OK + b"550 from SPPCONFFILE\r\n" + BYE


def test_empty_SPPCONFFILE_means_the_default(spp):
    home = spp(conf(("rcpt", [":echo E550 default file used"])))
    res = run(home, crlf(MAIL, RCPT, QUIT), env={"SPPCONFFILE": ""})
    assert res.out == GREETING + OK + b"550 default file used\r\n" + BYE


@pytest.mark.parametrize("nospp", ["", "1"])
def test_NOSPP_turns_plugins_off_and_needs_no_config(spp, nospp):
    home = spp(None)
    res = run(home, STD, env={"NOSPP": nospp, "SPPCONFFILE": "control/missing"})
    assert norm(res.out) == std_with(0, b"")
    home.control("smtpplugins", conf(("connection", [":echo R421 plugin ran"])))
    res = run(home, crlf(QUIT), env={"NOSPP": nospp})
    assert res.out == GREETING + BYE


@pytest.mark.parametrize("how", ["missing", "SPPCONFFILE missing", "directory"])
def test_unreadable_config_is_421_and_exit_1(spp, how):
    home = spp(None)
    env = {}
    if how == "SPPCONFFILE missing":
        home.control("smtpplugins", "")
        env["SPPCONFFILE"] = "control/nope"
    elif how == "directory":
        os.makedirs(os.path.join(home.path, "control", "smtpplugins"))
    res = run(home, crlf(HELO, MAIL, QUIT), env=env)
    assert res.out == CONTROLS
    assert res.status == 1


def test_empty_config_is_fine(spp):
    home = spp("")
    res = run(home, STD)
    assert norm(res.out) == std_with(0, b"")


# ================================================================== running a plugin


def test_exit_120_is_cant_execute_and_rejects(spp):
    home = spp(conf(("rcpt", [':case "$SMTPRCPTTO" in bad@*) exit 120;; esac'])), files=False)
    res = run(home, crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + OK
                             + failure(b':case "$SMTPRCPTTO" in bad@*) exit 120;; esac',
                                       b"can't execute")
                             + OK + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"u@example.com"]


def test_other_exit_codes_are_ignored(spp):
    home = spp(conf(("rcpt", [":echo HX-One: 1; exit 1", ":no-such-command-xyz",
                              ":echo P250-third ran; exit 2"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + b"250-third ran\r\n" + OK + GO + ACC + BYE
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + b"X-One: 1\n" + CLIENT_MESSAGE


def test_killed_plugin_is_child_crashed_and_rejects(spp):
    entry = ':case "$SMTPRCPTTO" in bad@*) kill -9 $$;; esac'
    home = spp(conf(("rcpt", [entry])), files=False)
    res = run(home, crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(res.out) == (GREETING + OK + failure(entry.encode(), b"child crashed")
                             + OK + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"u@example.com"]


def test_output_before_a_crash_stays(spp):
    home = spp(conf(("rcpt", [
        ':case "$SMTPRCPTTO" in bad@*) '
        'echo HX-Before-Crash: 1; echo E550 printed; kill -9 $$;; esac',
    ])))
    res = run(home, crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert b"550 printed\r\n451 qmail-spp failure: " in res.out
    assert b"child crashed (#4.3.0)\r\n" + OK + GO in res.out
    assert norm(res.queued[0].message) == (RECEIVED_NOHELO + b"X-Before-Crash: 1\n"
                                           + CLIENT_MESSAGE)


def test_R_then_crash_rejects_instead_of_disconnecting(spp):
    home = spp(conf(("helo", [":echo R421 bye; kill -9 $$"])), files=False)
    res = run(home, crlf(HELO, MAIL, QUIT))
    assert res.out == (GREETING + b"421 bye\r\n"
                       + failure(b":echo R421 bye; kill -9 $$", b"child crashed") + OK + BYE)
    assert res.status == 0


@pytest.mark.parametrize("kind", ["not executable", "missing", "directory"])
def test_unrunnable_plugin_is_cant_execute(spp, kind):
    home = spp("")
    if kind == "not executable":
        entry = add_plugin(home, "p", "echo N", mode=0o644)
    elif kind == "missing":
        entry = "plugins/none"
    else:
        entry = "plugins"
        os.makedirs(os.path.join(home.path, entry))
    home.control("smtpplugins", conf(("rcpt", [entry, ":echo P250-never"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + failure(entry.encode(), b"can't execute") + BYE


def test_plugin_stdin_is_closed(spp):
    home = spp(conf(("connection", [
        ":if [ -e /proc/$$/fd/0 ]; then echo P220-stdin-open; else echo P220-stdin-closed; fi"])))
    res = run(home, crlf(QUIT))
    assert res.out == b"220-stdin-closed\r\n" + GREETING + BYE


def test_plugin_cwd_is_the_qmail_home(spp):
    home = spp(conf(("connection", [':echo "P220-$(pwd -P)"'])))
    res = run(home, crlf(QUIT))
    assert res.out == (b"220-" + os.path.realpath(home.path).encode() + b"\r\n"
                       + GREETING + BYE)


def test_plugin_stderr_reaches_the_server_log(spp):
    home = spp(conf(("rcpt", [":echo plugin-log: rcpt=$SMTPRCPTTO ppid=$PPID >&2"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + OK + BYE
    assert b"plugin-log: rcpt=u@example.com ppid=" in res.err


def test_plugin_writing_after_N_gets_EPIPE_not_SIGPIPE(spp):
    """SIGPIPE stays ignored in the plugin: writing to the closed pipe fails and the
    plugin exits 0 (with SIGPIPE at its default it would die: child crashed)."""
    home = spp(conf(("rcpt", [":echo N; sleep 0.2; "
                              "while echo HX-late; do :; done 2>/dev/null; exit 0",
                              ":echo E550 second plugin ran"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + CLIENT_MESSAGE


def test_plugin_printing_N_then_lingering_breaks_nothing(spp):
    home = spp(conf(("rcpt", [":echo N; sleep 0.5; echo E550 not read"]),
                    ("data", [":echo N; sleep 0.3"])))
    res = run(home, crlf(MAIL, RCPT, b"RCPT TO:<v@example.com>", *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + OK + OK + GO + ACC + BYE
    assert res.queued[0].recipients == [b"u@example.com", b"v@example.com"]


def test_terminating_command_stops_reading(spp):
    home = spp(conf(("rcpt", [':case "$SMTPRCPTTO" in bad@*) '
                              'echo E550 no; echo HX-After: 1; echo SSPPAFTER=1;; esac']),
                    ("data", [":echo HX-Var: ${SPPAFTER-unset}"])))
    res = run(home, crlf(MAIL, b"RCPT TO:<bad@example.com>", RCPT, *DATA, QUIT))
    assert norm(res.out) == GREETING + OK + b"550 no\r\n" + OK + GO + ACC + BYE
    assert norm(res.queued[0].message) == RECEIVED_NOHELO + b"X-Var: unset\n" + CLIENT_MESSAGE


def test_unknown_letters_are_ignored(spp):
    home = spp(conf(("rcpt", [":printf 'e550 lower\\nZ550 zed\\nL\\nLX550 lx\\nP250-p\\n'"])))
    # No reply from e/Z/L/LX, and nothing deferred: the second RCPT is accepted too.
    res = run(home, crlf(MAIL, RCPT, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-p\r\n" + OK + b"250-p\r\n" + OK + BYE


def test_long_reply_line_goes_through_intact(spp):
    home = spp(conf(("rcpt", [":printf 'E550 %0100000d\\n' 7"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"550 " + b"0" * 99999 + b"7\r\n" + BYE


# ================================================================== DECISIONS.md deviations


def test_deviation_unterminated_last_line_counts_whole(spp):
    home = spp(conf(("rcpt", [":printf 'P250-x\\nE550 abc'"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-x\r\n550 abc\r\n" + BYE  # qmail-spp: "550 ab"


def test_deviation_unterminated_single_letter_counts(spp):
    home = spp(conf(("rcpt", [":printf N", ":echo E550 second plugin ran"])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + OK + BYE  # qmail-spp ignores the bare N


def test_deviation_cr_before_lf_is_dropped(spp):
    home = spp(conf(("rcpt", [":printf 'P250-p\\r\\nHX-Cr: 1\\r\\nSSPPCR=v\\r\\n'",
                              ':printf "HX-Var: [%s]\\r\\nE550 x\\r\\n" "$SPPCR"'])))
    res = run(home, crlf(MAIL, RCPT, QUIT))
    assert res.out == GREETING + OK + b"250-p\r\n550 x\r\n" + BYE  # not 550 x\r\r\n
    home.control("smtpplugins", conf(("rcpt", [":printf 'Cnew@example.com\\r\\nHX-Cr: 1\\r\\n'"])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    (msg,) = res.queued
    assert msg.recipients == [b"new@example.com"]
    assert norm(msg.message) == RECEIVED_NOHELO + b"X-Cr: 1\n" + CLIENT_MESSAGE


def test_deviation_cr_in_S_value_is_dropped(spp):
    home = spp(conf(("rcpt", [":printf 'SSPPCR=v\\r\\n'", ':echo "HX-Var: [$SPPCR]"'])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert res.queued[0].message.split(b"\n")[2] == b"X-Var: [v]"


def test_deviation_stale_badmailfrom_flag_is_cleared_after_O(spp):
    home = spp(conf(("mail", [':case "$SMTPMAILFROM" in good@*) echo O;; esac'])),
               control={"badmailfrom": "bad@b.c\n"})
    res = run(home, crlf(b"MAIL FROM:<bad@b.c>", RCPT, b"MAIL FROM:<good@b.c>", RCPT,
                         *DATA, QUIT))
    # qmail-spp 0.42 would answer the second RCPT with the badmailfrom 553 too.
    assert norm(res.out) == GREETING + OK + BMF + OK + OK + GO + ACC + BYE
    assert res.queued[0].sender == b"good@b.c"


@pytest.mark.parametrize("empty", [b"H\\n", b"H\\r\\n"])
def test_deviation_empty_H_is_ignored(spp, empty):
    home = spp(conf(("rcpt", [":printf 'HX-Before: 1\\n%sHX-After: 1\\n'" % empty.decode()])))
    res = run(home, crlf(MAIL, RCPT, *DATA, QUIT))
    assert norm(res.queued[0].message) == (RECEIVED_NOHELO + b"X-Before: 1\nX-After: 1\n"
                                           + CLIENT_MESSAGE)


# ================================================================== SPPTIMEOUT


SLOW = "slow@example.com"


@pytest.mark.parametrize("plugin", [
    "exec sleep 30",                          # the plugin itself hangs
    "sleep 30 2>/dev/null; echo E550 late",   # a grandchild keeps the pipe open
    "echo N; exec sleep 30",                  # done talking, but does not exit
])
def test_SPPTIMEOUT_kills_a_slow_plugin_as_crashed(spp, plugin):
    home = spp("")
    entry = add_plugin(home, "slow", 'case "$SMTPRCPTTO" in %s) %s;; esac' % (SLOW, plugin))
    home.control("smtpplugins", conf(("rcpt", [entry, ":echo P250-next"])))
    res = run(home, crlf(MAIL, b"RCPT TO:<" + SLOW.encode() + b">", RCPT, *DATA, QUIT),
              env={"SPPTIMEOUT": "1"}, timeout=15)
    assert norm(res.out) == (GREETING + OK + failure(entry.encode(), b"child crashed")
                             + b"250-next\r\n" + OK + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"u@example.com"]


def test_SPPTIMEOUT_kills_a_plugin_that_keeps_writing(spp):
    """The limit also applies while output keeps arriving faster than it is read
    (ignored Z lines here, so nothing accumulates in memory)."""
    entry = ':case "$SMTPRCPTTO" in %s) exec yes Z;; esac' % SLOW
    home = spp(conf(("rcpt", [entry])), files=False)
    res = run(home, crlf(MAIL, b"RCPT TO:<" + SLOW.encode() + b">", RCPT, QUIT),
              env={"SPPTIMEOUT": "1"}, timeout=8)
    assert res.out == GREETING + OK + failure(entry.encode(), b"child crashed") + OK + BYE


def test_SPPTIMEOUT_is_per_plugin(spp):
    """Two plugins of one hook that each stay under the limit are both fine, even
    though together they take longer than it."""
    home = spp(conf(("rcpt", [":sleep 1.2", ":sleep 1.2; echo E550 both ran"])))
    res = run(home, crlf(MAIL, RCPT, QUIT), env={"SPPTIMEOUT": "2"})
    assert res.out == GREETING + OK + b"550 both ran\r\n" + BYE


@pytest.mark.parametrize("value", [None, "0", "5"])
def test_SPPTIMEOUT_unset_zero_or_large_lets_slow_plugins_finish(spp, value):
    home = spp(conf(("rcpt", [":sleep 0.5; echo E550 slow but honoured"])))
    res = run(home, crlf(MAIL, RCPT, QUIT), env={"SPPTIMEOUT": value})
    assert res.out == GREETING + OK + b"550 slow but honoured\r\n" + BYE


# ================================================================== tcpserver + swaks


def test_tcpserver_swaks_rcpt_plugin_rejects_one_recipient(tcpservers, spp):
    home = spp(conf(("rcpt", [
        ':case "$SMTPRCPTTO" in bad@*) echo "E550 5.1.1 no mailbox here";; esac'])))
    port = tcpservers.start(home).port
    status, transcript = swaks(port, "--to", "good@example.com,bad@example.com",
                               "--header", "Subject: spp test", "--body", "hello")
    assert b"<** 550 5.1.1 no mailbox here" in transcript, transcript
    assert b"<-  250 ok " in transcript, transcript  # the message was accepted
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tgood@example.com\0\0"
    assert b"\nSubject: spp test\n" in msg.message

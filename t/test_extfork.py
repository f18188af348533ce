"""SMTPEXTFORK (../shared/spec/extfork.md and DECISIONS.md): the exit-code table, custom
texts, the program list, relay vs non-relay lists, the REMOTE* variables, the order of
the checks and XF_QUITASAP.

The semantics run in-process through the reference world (t/world.py): a program is
an entry of the world's `programs`, path -> exit status or outcome, or a function of
the environment it was given (most of them look at REMOTERCPT so that one transcript
shows a refused recipient next to accepted ones and the session carrying on).  The
Config is loaded from the test's qmail home with the real loader.

The tests at the end run the installed server with real programs, because their
point is process plumbing: no arguments, the qmail home as cwd (relative paths),
stdin /dev/null, stdout into the log, exit codes and signals of a real process.  (A
real program killed after SMTPEXTFORKTIMEOUT: t/test_faults.py.)
"""

import json
import os
import re
import sys

import pytest

from qmail_smtpd_py.core import requests as rq

from helpers import norm, run_smtp, script
from world import BASE_ENV, run


def crlf(*lines):
    return b"".join(line + b"\r\n" for line in lines)


GREETING = b"220 mx.example.org ESMTP\r\n"
BYE = b"221 mx.example.org\r\n"
OK = b"250 ok\r\n"
GO_AHEAD = b"354 go ahead\r\n"
ACCEPTED = b"250 ok <TIME> qp <PID>\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
MESSAGE = crlf(b"DATA", b"Subject: x", b"", b"hi", b".")
RELAY_LOG = b"XF: SMTPEXTFORKR env variable not defined in relay mode: 127.0.0.1"

# exit code -> (reply code, default text, suffix), extfork.md §1 and DECISIONS.md
TABLE = {
    100: (b"554", b"sorry, permanent envelope failure due to local policy", b"(#5.7.1)"),
    101: (b"454", b"sorry, temporary envelope failure due to local policy", b"(#5.7.1)"),
    102: (b"550", b"sorry, permanent failure imposed by local policy", b"(#5.7.1)"),
    103: (b"451", b"sorry, service not available due to local policy", b"(#4.3.0)"),
    104: (b"552", b"sorry, permanent mailbox failure due to local policy", b"(#5.7.1)"),
    105: (b"421", b"sorry, service not available due to local policy", b"(#4.3.0)"),
    106: (b"503", b"sorry, wrong usage of SMTP commands", b"(#5.7.1)"),
    107: (b"450", b"sorry, temporary mailbox failure imposed by local policy", b"(#4.3.0)"),
    108: (b"501", b"syntax error", b"(#5.7.1)"),
}


def refusal(exit_code):
    code, text, suffix = TABLE[exit_code]
    return code + b" " + text + b" " + suffix + b"\r\n"


# ------------------------------------------------------------------ the world's programs

XF = "/var/qmail/xf/"  # where the programs of the in-process tests "are"; none exists
MISSING = rq.CannotStart(rq.EXEC, "No such file or directory")  # exec failed: no such file


def xf(chunks, home, env=None, programs=None, **world):
    """One session in-process: env (str values, None removes a name) over world.BASE_ENV,
    the Config loaded from home, programs as for World (bytes or str paths).  An
    unexpected program makes the world raise (KeyError)."""
    full = dict(BASE_ENV)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(os.fsencode(name), None)
        else:
            full[os.fsencode(name)] = os.fsencode(value)
    programs = {os.fsencode(path): answer for path, answer in (programs or {}).items()}
    return run(chunks, env=full, home=home, programs=programs, **world)


def refuse_bad(status):
    """A program that exits STATUS for recipients bad@... and 0 for all others."""
    return lambda env: status if env[b"REMOTERCPT"].startswith(b"bad@") else 0


def ran(r):
    """The names of the programs run, in order (what a tracer program would append)."""
    return [os.path.basename(path).decode() for path, _ in r.program_runs]


def seen(r, name):
    """The value of NAME (REMOTEMF, REMOTEHELO, REMOTERCPT) in each program's environment."""
    return [env.get(name.encode()) for _, env in r.program_runs]


# ------------------------------------------------------------------ exit codes


def test_exit_0_accepts_the_recipient(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "ok"}, programs={XF + "ok": 0})
    assert norm(r.out) == GREETING + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert r.status == 0
    assert [m.envelope for m in r.queued] == [b"Fa@b.c\0Tu@example.com\0\0"]
    assert ran(r) == ["ok"]


@pytest.mark.parametrize("exit_code", sorted(TABLE))
def test_refusing_exit_code_default_text(home, exit_code):
    """Exits 100..108 refuse only the recipient they judged, with the table's reply;
    the session goes on (even after 421) and earlier/later recipients are kept."""
    prog = XF + "refuse"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<bad@example.com>",
                b"NOOP", b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": prog}, programs={prog: refuse_bad(exit_code)})
    assert norm(r.out) == (GREETING + OK + OK + refusal(exit_code) + OK + OK
                           + GO_AHEAD + ACCEPTED + BYE)
    assert r.status == 0
    assert [m.envelope for m in r.queued] == [b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"]
    assert "XF (%d): %s" % (exit_code, prog) in r.log


def test_all_recipients_refused_then_data_wants_rcpt(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "no"}, programs={XF + "no": 100})
    assert r.out == GREETING + OK + refusal(100) + WANT_RCPT + BYE
    assert r.queued == []


@pytest.mark.parametrize("exit_code", sorted(TABLE))
def test_refusing_exit_code_custom_text(home, exit_code):
    """<reply code>SMTPEXTFORK replaces only the text; code and suffix stay."""
    code, _, suffix = TABLE[exit_code]
    prog = XF + "refuse"
    env = {"SMTPEXTFORK": prog, code.decode() + "SMTPEXTFORK": "go away, exit %d" % exit_code}
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"), home, env=env,
           programs={prog: refuse_bad(exit_code)})
    assert r.out == (GREETING + OK + code + b" go away, exit %d " % exit_code + suffix + b"\r\n"
                     + BYE)


def test_custom_text_of_another_code_is_not_used(home):
    prog = XF + "refuse"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": prog, "550SMTPEXTFORK": "wrong one",
                "100SMTPEXTFORK": "exit code, not reply code"},
           programs={prog: refuse_bad(100)})
    assert r.out == GREETING + OK + refusal(100) + BYE


def test_empty_custom_text_counts_as_set(home):
    prog = XF + "refuse"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": prog, "554SMTPEXTFORK": ""}, programs={prog: refuse_bad(100)})
    assert r.out == GREETING + OK + b"554  (#5.7.1)\r\n" + BYE


@pytest.mark.parametrize("env, text", [
    ({"553SMTPEXTFORK": "from 553"}, b"sorry, permanent mailbox failure due to local policy"),
    ({"552SMTPEXTFORK": "from 552"}, b"from 552"),
    ({"552SMTPEXTFORK": "from 552", "553SMTPEXTFORK": "from 553"}, b"from 552"),
])
def test_exit_104_text_comes_from_552(home, env, text):
    """DECISIONS.md: exit 104 answers 552 and reads 552SMTPEXTFORK (the original read
    553SMTPEXTFORK's value after testing 552SMTPEXTFORK, and could crash)."""
    prog = XF + "refuse"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": prog, **env}, programs={prog: refuse_bad(104)})
    assert r.out == GREETING + OK + b"552 " + text + b" (#5.7.1)\r\n" + BYE
    assert r.status == 0


def john_joe_checker(env):
    """The README's kind of example, as a small C program would do it: exit 101 (454)
    when REMOTEMF is john@... and REMOTERCPT is joe@...; else accept."""
    if env[b"REMOTEMF"].startswith(b"john@") and env[b"REMOTERCPT"].startswith(b"joe@"):
        return 101
    return 0


def test_john_joe_checker(home):
    """Refuse (exit 101) mail from john@... to joe@..., accept every other pair."""
    prog = XF + "john-joe-checker"
    env = {"SMTPEXTFORK": prog, "454SMTPEXTFORK": "sorry john, joe does not want your mail"}
    r = xf(crlf(b"MAIL FROM:<john@b.c>", b"RCPT TO:<joe@example.com>",
                b"RCPT TO:<ann@example.com>") + MESSAGE
           + crlf(b"MAIL FROM:<bob@b.c>", b"RCPT TO:<joe@example.com>") + MESSAGE
           + crlf(b"MAIL FROM:<johnny@b.c>", b"RCPT TO:<joey@example.com>",
                  b"RCPT TO:<Joe@example.com>") + MESSAGE
           + crlf(b"QUIT"),
           home, env=env, programs={prog: john_joe_checker})
    assert norm(r.out) == (
        GREETING
        + OK + b"454 sorry john, joe does not want your mail (#5.7.1)\r\n" + OK
        + GO_AHEAD + ACCEPTED
        + OK + OK + GO_AHEAD + ACCEPTED
        + OK + OK + OK + GO_AHEAD + ACCEPTED
        + BYE)
    assert r.status == 0
    assert [m.envelope for m in r.queued] == [
        b"Fjohn@b.c\0Tann@example.com\0\0",
        b"Fbob@b.c\0Tjoe@example.com\0\0",
        b"Fjohnny@b.c\0Tjoey@example.com\0TJoe@example.com\0\0",
    ]


def test_exit_111_is_logged_and_the_next_program_runs(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "first," + XF + "second"},
           programs={XF + "first": 111, XF + "second": 102})
    assert r.out == GREETING + OK + refusal(102) + BYE
    assert ran(r) == ["first", "second"]


def test_exit_111_alone_accepts_and_logs_a_warning(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "e111"}, programs={XF + "e111": 111})
    assert r.out == GREETING + OK + OK + BYE
    assert b"XF warn: cannot fork external program" in r.err


def test_missing_program_is_like_111(home):
    """A program that cannot be executed: the patch's child exits 111 after its execv."""
    missing = XF + "no-such-program"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": missing + "," + XF + "second"},
           programs={missing: MISSING, XF + "second": 0})
    assert r.out == GREETING + OK + OK + BYE
    assert ran(r) == ["no-such-program", "second"]
    assert "XF warn: cannot fork external program: " + missing in r.log


@pytest.mark.parametrize("other", [1, 42, 99, 109, 110, 112, 255])
def test_other_exit_codes_continue_with_the_next_program(home, other):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "first," + XF + "second"},
           programs={XF + "first": other, XF + "second": 107})
    assert r.out == GREETING + OK + refusal(107) + BYE
    assert ran(r) == ["first", "second"]


def test_other_exit_code_alone_accepts(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "e42"}, programs={XF + "e42": 42})
    assert r.out == GREETING + OK + OK + BYE
    assert b"XF (#5d)" in r.err


@pytest.mark.parametrize("signal", [9, 15])
def test_death_by_signal_stops_the_list_and_accepts(home, signal):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "killed," + XF + "never"},
           programs={XF + "killed": rq.Signaled(signal), XF + "never": 100})
    assert norm(r.out) == GREETING + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert ran(r) == ["killed"]
    assert [m.recipients for m in r.queued] == [[b"u@example.com"]]
    assert b"XF (#5c)" in r.err


@pytest.mark.parametrize("outcome, logged", [
    (rq.CannotStart(rq.FORK, "Resource temporarily unavailable"), "XF: forking failed for "),
    (rq.CannotStart(rq.PIPE, "Too many open files"), "XF: forking failed for "),
    (rq.WaitFailed("No child processes"), "XF: no exit status for "),
])
def test_no_process_or_no_status_stops_the_list_and_accepts(home, outcome, logged):
    """The patch gives up when it cannot fork, accepting, as after a crash."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "p," + XF + "never"},
           programs={XF + "p": outcome, XF + "never": 100})
    assert r.out == GREETING + OK + OK + BYE
    assert ran(r) == ["p"]
    assert any(line.startswith(logged + XF + "p") for line in r.log)


# ------------------------------------------------------------------ SMTPEXTFORKTIMEOUT


def test_smtpextforktimeout_is_the_time_limit_and_a_killed_program_accepts(home):
    """A program overrunning SMTPEXTFORKTIMEOUT is killed: a death by a signal
    (logged; the list stops, the recipient is accepted)."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "hang," + XF + "never", "SMTPEXTFORKTIMEOUT": "7"},
           programs={XF + "hang": rq.TIMED_OUT, XF + "never": 100})
    assert r.out == GREETING + OK + OK + BYE
    assert ran(r) == ["hang"]
    assert [q.time_limit for q in r.requests if type(q) is rq.RunProgram] == [7]
    assert "XF: %shang killed after its time limit of 7s" % XF in r.log
    assert b"XF (#5c)" in r.err


@pytest.mark.parametrize("value", [None, "", "0", "x"])
def test_no_time_limit_without_a_positive_smtpextforktimeout(home, value):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "p", "SMTPEXTFORKTIMEOUT": value}, programs={XF + "p": 0})
    assert r.out == GREETING + OK + OK + BYE
    assert [q.time_limit for q in r.requests if type(q) is rq.RunProgram] == [None]


# ------------------------------------------------------------------ the list


def test_programs_run_in_list_order_until_a_refusal(home):
    names = ["p1", "p2", "p3", "p4"]
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": ",".join(XF + n for n in names)},
           programs={XF + "p1": 0, XF + "p2": 0, XF + "p3": 103, XF + "p4": 0})
    assert r.out == GREETING + OK + refusal(103) + BYE
    assert ran(r) == ["p1", "p2", "p3"]


def test_all_programs_run_for_every_rcpt(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@example.com>")
           + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "p1," + XF + "p2"},
           programs={XF + "p1": 0, XF + "p2": 0})
    assert norm(r.out) == GREETING + OK + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert ran(r) == ["p1", "p2", "p1", "p2"]
    assert r.queued[0].recipients == [b"u@example.com", b"v@example.com"]


@pytest.mark.parametrize("template", [",{a},,{b},", ",,{a},{b}", "{a},,,{b},,"])
def test_empty_fields_in_the_list_are_skipped(home, template):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": template.format(a=XF + "a", b=XF + "b")},
           programs={XF + "a": 0, XF + "b": 0})
    assert r.out == GREETING + OK + OK + BYE
    assert ran(r) == ["a", "b"]


@pytest.mark.parametrize("value", ["", ",", ",,,"])
def test_list_without_programs_accepts(home, value):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": value})
    assert r.out == GREETING + OK + OK + BYE
    assert r.program_runs == []


def test_entry_with_a_space_is_one_path(home):
    """No whitespace trimming: ' /path' is a different (missing) program, which counts
    as 111, so the recipient is accepted although /path itself would refuse."""
    prog = XF + "p"
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": " " + prog}, programs={" " + prog: MISSING, prog: 100})
    assert r.out == GREETING + OK + OK + BYE
    assert [path for path, _ in r.program_runs] == [b" " + prog.encode()]


def test_relative_path_is_passed_as_given(home):
    """A relative entry is run as it is written (the driver runs it from the qmail
    home: test_real_program_runs_with_no_arguments_from_the_qmail_home)."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": "plugins/refuse"}, programs={"plugins/refuse": refuse_bad(106)})
    assert r.out == GREETING + OK + refusal(106) + BYE
    assert [path for path, _ in r.program_runs] == [b"plugins/refuse"]


# ------------------------------------------------------------------ when programs run


def test_programs_run_only_at_rcpt_after_the_builtin_checks(make_home):
    """Not at HELO/MAIL/DATA, and not for a RCPT that rcpthosts, badmailfrom, a missing
    MAIL or a syntax error already refused."""
    home = make_home(control={"badmailfrom": "bad@evil.test\n"})
    r = xf(crlf(b"HELO c.test", b"RCPT TO:<early@example.com>", b"MAIL FROM:<bad@evil.test>",
                b"RCPT TO:<u@example.com>", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>",
                b"RCPT TO:<" + b"x" * 950 + b"@example.com>", b"RCPT TO:<u@example.com>")
           + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "p"}, programs={XF + "p": 0})
    assert norm(r.out) == (GREETING + b"250 mx.example.org\r\n" + b"503 MAIL first (#5.5.1)\r\n"
                           + OK + BMF + OK + NOGATEWAY + b"555 syntax error (#5.5.4)\r\n" + OK
                           + GO_AHEAD + ACCEPTED + BYE)
    assert ran(r) == ["p"]
    assert seen(r, "REMOTERCPT") == [b"u@example.com"]
    assert len(r.queued) == 1


def test_no_programs_without_either_variable(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"554SMTPEXTFORK": "x", "XF_QUITASAP": "1"})
    assert r.out == GREETING + OK + OK + BYE
    assert r.program_runs == []


# ------------------------------------------------------------------ relay split horizon


@pytest.mark.parametrize("relayclient, expected", [
    (None, refusal(100)),
    ("", refusal(102)),
    ("+rc", refusal(102)),
])
def test_relay_clients_use_smtpextforkr(home, relayclient, expected):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "plain", "SMTPEXTFORKR": XF + "relay",
                "RELAYCLIENT": relayclient},
           programs={XF + "plain": 100, XF + "relay": 102})
    assert r.out == GREETING + OK + expected + BYE


def test_relay_client_relays_through_the_r_list(home):
    """A relay client's RCPT to a foreign domain reaches SMTPEXTFORKR's programs."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@elsewhere.org>",
                b"RCPT TO:<ok@elsewhere.org>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORKR": XF + "relay", "RELAYCLIENT": ""},
           programs={XF + "relay": refuse_bad(107)})
    assert norm(r.out) == GREETING + OK + refusal(107) + OK + GO_AHEAD + ACCEPTED + BYE
    assert r.queued[0].recipients == [b"ok@elsewhere.org"]


def test_only_smtpextforkr_leaves_non_relay_clients_alone(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORKR": XF + "relay"}, programs={XF + "relay": 100})
    assert r.out == GREETING + OK + OK + BYE
    assert ran(r) == []
    assert RELAY_LOG not in r.err


def test_relay_client_without_smtpextforkr_logs_once_per_connection(home):
    """SMTPEXTFORK is not used for a relay client; the missing SMTPEXTFORKR is logged
    once per connection (DECISIONS.md), not once per RCPT."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@elsewhere.org>")
           + MESSAGE
           + crlf(b"RSET", b"MAIL FROM:<a@b.c>", b"RCPT TO:<w@example.com>") + MESSAGE
           + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "plain", "RELAYCLIENT": ""},
           programs={XF + "plain": 100})
    assert norm(r.out) == (GREETING + OK + OK + OK + GO_AHEAD + ACCEPTED
                           + b"250 flushed\r\n" + OK + OK + GO_AHEAD + ACCEPTED + BYE)
    assert ran(r) == []
    assert r.err.count(RELAY_LOG) == 1
    assert re.search(re.escape(RELAY_LOG) + rb"\n", r.err)


def test_relay_log_line_not_written_without_relay_or_with_r_list(home):
    for env in ({"SMTPEXTFORK": XF + "plain"},
                {"SMTPEXTFORK": XF + "plain", "SMTPEXTFORKR": XF + "plain", "RELAYCLIENT": ""}):
        r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home, env=env,
               programs={XF + "plain": 0})
        assert r.out == GREETING + OK + OK + BYE
        assert b"SMTPEXTFORKR env variable not defined" not in r.err
        assert ran(r) == ["plain"]


# ------------------------------------------------------------------ REMOTE* variables


def test_remote_variables(home):
    r = xf(crlf(b"HELO client.test", b"MAIL FROM:<Sender@B.C>", b"RCPT TO:<u1@example.com>",
                b"RCPT TO:<\"q u\"@example.com>", b"MAIL FROM:<>",
                b"RCPT TO:<u3@x.sub.example.net>", b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "record"}, programs={XF + "record": 0})
    assert r.out == GREETING + b"250 mx.example.org\r\n" + OK * 5 + BYE
    assert [(env[b"REMOTEMF"], env[b"REMOTEHELO"], env[b"REMOTERCPT"])
            for _, env in r.program_runs] == [
        (b"Sender@B.C", b"client.test", b"u1@example.com"),
        (b"Sender@B.C", b"client.test", b"q u@example.com"),
        (b"", b"client.test", b"u3@x.sub.example.net"),
    ]


@pytest.mark.parametrize("remotehost, helo", [(None, b"unknown"), ("client.example.net",
                                                                    b"client.example.net")])
def test_remotehelo_without_helo_is_the_remote_host(home, remotehost, helo):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"), home,
           env={"SMTPEXTFORK": XF + "record", "TCPREMOTEHOST": remotehost},
           programs={XF + "record": 0})
    assert r.out == GREETING + OK + OK + BYE
    assert seen(r, "REMOTEHELO") == [helo]


def test_remotehelo_follows_the_last_helo_and_may_be_empty(home):
    r = xf(crlf(b"EHLO first.test", b"HELO", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
                b"HELO second.test ", b"MAIL FROM:<a@b.c>", b"RCPT TO:<v@example.com>",
                b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "record"}, programs={XF + "record": 0})
    assert r.out.endswith(OK + BYE)
    assert seen(r, "REMOTEHELO") == [b"", b"second.test "]


def test_remotercpt_includes_the_relayclient_suffix(home):
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORKR": XF + "record", "RELAYCLIENT": "+rc"},
           programs={XF + "record": 0})
    assert norm(r.out) == GREETING + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert seen(r, "REMOTERCPT") == [b"x@elsewhere.org+rc"]
    assert r.queued[0].recipients == [b"x@elsewhere.org+rc"]


def test_remote_variables_reach_qmail_queue(home):
    """The variables are set in the server's own environment and stay set, so
    qmail-queue sees the last RCPT that was checked (extfork.md §3)."""
    r = xf(crlf(b"HELO h.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
                b"RCPT TO:<bad@example.com>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "refuse"}, programs={XF + "refuse": refuse_bad(100)})
    assert norm(r.out) == (GREETING + b"250 mx.example.org\r\n" + OK + OK + refusal(100)
                           + GO_AHEAD + ACCEPTED + BYE)
    (env,) = r.queue_envs
    assert (env[b"REMOTEMF"], env[b"REMOTEHELO"], env[b"REMOTERCPT"]) == (
        b"a@b.c", b"h.test", b"bad@example.com")
    assert r.queued[0].recipients == [b"u@example.com"]


# ------------------------------------------------------------------ XF_QUITASAP


def test_xf_quitasap_refusal_ends_the_session(home):
    """With XF_QUITASAP the refusal is the last thing sent: after a pause the server
    exits 1 without answering the pipelined commands and nothing is queued."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<bad@example.com>",
                b"NOOP", b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "refuse", "XF_QUITASAP": "1",
                      "454SMTPEXTFORK": "bye now"},
           programs={XF + "refuse": refuse_bad(101)})
    assert r.out == GREETING + OK + OK + b"454 bye now (#5.7.1)\r\n"
    assert r.status == 1
    assert "slept 2" in r.log
    assert r.queued == []
    assert r.offered == [] and not any(type(q) is rq.StartQueue for q in r.requests)


def test_xf_quitasap_without_a_refusal_changes_nothing(home):
    """Programs that accept, and refusals by qmail's own checks, keep the session."""
    r = xf(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<x@elsewhere.org>",
                b"NOOP") + MESSAGE + crlf(b"QUIT"),
           home, env={"SMTPEXTFORK": XF + "refuse", "XF_QUITASAP": "1"},
           programs={XF + "refuse": refuse_bad(100)})
    assert norm(r.out) == (GREETING + OK + OK + NOGATEWAY + OK + GO_AHEAD + ACCEPTED + BYE)
    assert r.status == 0
    assert len(r.queued) == 1
    assert not any(line.startswith("slept") for line in r.log)


# ------------------------------------------------------------------ real processes: plumbing


def recorder(home, name="record"):
    """A real program that appends one JSON line per run to home/NAME.jsonl: its argv,
    cwd, and REMOTEMF/REMOTEHELO/REMOTERCPT (latin-1, None when unset)."""
    out = os.path.join(home.root, name + ".jsonl")
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!%s -IS\n" % sys.executable
                + "import json, os, sys\n"
                + "env = os.environb\n"
                + "get = lambda k: None if k not in env else env[k].decode('latin-1')\n"
                + "rec = {'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
                + "       'MF': get(b'REMOTEMF'), 'HELO': get(b'REMOTEHELO'),\n"
                + "       'RCPT': get(b'REMOTERCPT')}\n"
                + "with open(%r, 'a') as f:\n" % out
                + "    f.write(json.dumps(rec) + '\\n')\n")
    os.chmod(path, 0o755)

    def records():
        if not os.path.exists(out):
            return []
        with open(out) as f:
            return [json.loads(line) for line in f]

    return path, records


def test_real_program_runs_with_no_arguments_from_the_qmail_home(home):
    """Real process: the driver execs it without arguments from the qmail home (a relative entry)."""
    _, records = recorder(home)
    out, _, _ = run_smtp(
        crlf(b"HELO client.test", b"MAIL FROM:<Sender@B.C>", b"RCPT TO:<u1@example.com>",
             b"MAIL FROM:<>", b"RCPT TO:<u3@x.sub.example.net>", b"QUIT"),
        home=home, env={"SMTPEXTFORK": "plugins/record"})
    assert out == GREETING + b"250 mx.example.org\r\n" + OK * 4 + BYE
    cwd = os.path.realpath(home.path)
    assert records() == [
        {"argv": [], "cwd": cwd, "MF": mf, "HELO": "client.test", "RCPT": rcpt}
        for mf, rcpt in (("Sender@B.C", "u1@example.com"), ("", "u3@x.sub.example.net"))
    ]


def test_real_program_stdin_is_not_the_connection(home):
    """Real process: its stdin is /dev/null, so it cannot eat the client's pipelined commands."""
    stdin_seen = os.path.join(home.root, "stdin-seen")
    reader = script(home, "reader", 'cat > "%s"\nexit 0\n' % stdin_seen)
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"NOOP") + MESSAGE
        + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": reader})
    assert norm(out) == GREETING + OK + OK + OK + GO_AHEAD + ACCEPTED + BYE
    with open(stdin_seen, "rb") as f:
        assert f.read() == b""
    assert len(queued) == 1


def test_real_program_stdout_goes_to_the_log_not_the_client(home):
    """Real process: its stdout goes to the log (stderr), refusing or not, never to the client."""
    noisy = script(home, "noisy", 'case "$REMOTERCPT" in\n'
                   '  bad@*) echo "250 fake ok from program"; exit 100;;\n'
                   'esac\n'
                   'echo "250 junk-from-extfork-program"\nprintf "more junk\\r\\n"\nexit 0\n')
    result = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<bad@example.com>")
        + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": noisy})
    assert norm(result.out) == (GREETING + OK + OK + refusal(100) + GO_AHEAD + ACCEPTED + BYE)
    assert b"250 junk-from-extfork-program\n" in result.err
    assert b"more junk" in result.err
    assert b"250 fake ok from program" in result.err
    assert [m.recipients for m in result.queued] == [[b"u@example.com"]]


def test_real_program_exit_codes_and_signals(home):
    """Real process: exit codes and a SIGKILL death read by waitpid from a real program drive the table."""
    prog = script(home, "exits", 'case "$REMOTERCPT" in\n'
                  '  kill@*) kill -KILL $$;;\n'
                  '  e*@*) code=${REMOTERCPT%%@*}; exit ${code#e};;\n'
                  'esac\nexit 0\n')
    refused = [b"RCPT TO:<e%d@example.com>" % code for code in sorted(TABLE)]
    accepted = [b"RCPT TO:<e111@example.com>", b"RCPT TO:<e42@example.com>",
                b"RCPT TO:<kill@example.com>", b"RCPT TO:<ok@example.com>"]
    result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", *refused, *accepted) + MESSAGE
                      + crlf(b"QUIT"), home=home, env={"SMTPEXTFORK": prog})
    assert norm(result.out) == (GREETING + OK + b"".join(refusal(c) for c in sorted(TABLE))
                                + OK * 4 + GO_AHEAD + ACCEPTED + BYE)
    assert [m.recipients for m in result.queued] == [
        [b"e111@example.com", b"e42@example.com", b"kill@example.com", b"ok@example.com"]]
    assert b"XF warn: cannot fork external program: " + prog.encode() in result.err
    assert b"XF (#5d): " + prog.encode() + b" exited 42" in result.err
    assert b"XF (#5c): " + prog.encode() in result.err

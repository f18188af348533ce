"""SMTPEXTFORK over pipes against the installed qmail-smtpd-py (../shared/spec/extfork.md
and DECISIONS.md): the exit-code table, custom texts, the program list, relay vs
non-relay lists, the REMOTE* variables, program stdout kept off the connection, and
XF_QUITASAP.

The programs are small scripts written into the test's qmail home. Most of them look
at REMOTERCPT so that one transcript shows a refused recipient next to accepted ones
and the session carrying on afterwards.
"""

import json
import os
import re
import sys

import pytest

from helpers import EnvQueue, norm, run_smtp, script


def crlf(*lines):
    return b"".join(line + b"\r\n" for line in lines)


GREETING = b"220 mx.example.org ESMTP\r\n"
BYE = b"221 mx.example.org\r\n"
OK = b"250 ok\r\n"
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


def refuse_bad(home, status, name="refuse"):
    """A program that exits STATUS for recipients bad@... and 0 for all others."""
    return script(home, name, 'case "$REMOTERCPT" in bad@*) exit %d;; esac\nexit 0\n' % status)


def tracer(home, name, status=0):
    """A program that appends its name to home/trace, then exits STATUS."""
    trace = os.path.join(home.root, "trace")
    return script(home, name, 'echo %s >> "%s"\nexit %d\n' % (name, trace, status))


def trace(home):
    path = os.path.join(home.root, "trace")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def recorder(home, name="record"):
    """A program that appends one JSON line per run to home/NAME.jsonl: its argv,
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


# ------------------------------------------------------------------ exit codes


def test_exit_0_accepts_the_recipient(home):
    ok = script(home, "ok", "exit 0\n")
    out, status, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": ok})
    assert norm(out) == GREETING + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    assert status == 0
    assert [m.envelope for m in queued] == [b"Fa@b.c\0Tu@example.com\0\0"]


@pytest.mark.parametrize("exit_code", sorted(TABLE))
def test_refusing_exit_code_default_text(home, exit_code):
    """Exits 100..108 refuse only the recipient they judged, with the table's reply;
    the session goes on (even after 421) and earlier/later recipients are kept."""
    code, text, suffix = TABLE[exit_code]
    prog = refuse_bad(home, exit_code)
    out, status, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<bad@example.com>",
             b"NOOP", b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog})
    refusal = code + b" " + text + b" " + suffix + b"\r\n"
    assert norm(out) == (GREETING + OK + OK + refusal + OK + OK
                         + b"354 go ahead\r\n" + ACCEPTED + BYE)
    assert status == 0
    assert [m.envelope for m in queued] == [b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"]


def test_all_recipients_refused_then_data_wants_rcpt(home):
    prog = script(home, "no", "exit 100\n")
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA", b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog})
    assert out == (GREETING + OK
                   + b"554 sorry, permanent envelope failure due to local policy (#5.7.1)\r\n"
                   + WANT_RCPT + BYE)
    assert queued == []


@pytest.mark.parametrize("exit_code", sorted(TABLE))
def test_refusing_exit_code_custom_text(home, exit_code):
    """<reply code>SMTPEXTFORK replaces only the text; code and suffix stay."""
    code, _, suffix = TABLE[exit_code]
    prog = refuse_bad(home, exit_code)
    env = {"SMTPEXTFORK": prog, code.decode() + "SMTPEXTFORK": "go away, exit %d" % exit_code}
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"),
                         home=home, env=env)
    assert out == (GREETING + OK + code + b" go away, exit %d " % exit_code + suffix + b"\r\n"
                   + BYE)


def test_custom_text_of_another_code_is_not_used(home):
    prog = refuse_bad(home, 100)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": prog, "550SMTPEXTFORK": "wrong one",
                                         "100SMTPEXTFORK": "exit code, not reply code"})
    assert out == (GREETING + OK
                   + b"554 sorry, permanent envelope failure due to local policy (#5.7.1)\r\n"
                   + BYE)


def test_empty_custom_text_counts_as_set(home):
    prog = refuse_bad(home, 100)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": prog, "554SMTPEXTFORK": ""})
    assert out == GREETING + OK + b"554  (#5.7.1)\r\n" + BYE


@pytest.mark.parametrize("env, text", [
    ({"553SMTPEXTFORK": "from 553"}, b"sorry, permanent mailbox failure due to local policy"),
    ({"552SMTPEXTFORK": "from 552"}, b"from 552"),
    ({"552SMTPEXTFORK": "from 552", "553SMTPEXTFORK": "from 553"}, b"from 552"),
])
def test_exit_104_text_comes_from_552(home, env, text):
    """DECISIONS.md: exit 104 answers 552 and reads 552SMTPEXTFORK (the original read
    553SMTPEXTFORK's value after testing 552SMTPEXTFORK, and could crash)."""
    prog = refuse_bad(home, 104)
    out, status, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"),
                              home=home, env={"SMTPEXTFORK": prog, **env})
    assert out == GREETING + OK + b"552 " + text + b" (#5.7.1)\r\n" + BYE
    assert status == 0


def test_john_joe_checker(home):
    """The README's kind of example, as a script doing what a small C program would:
    refuse (exit 101) mail from john@... to joe@..., accept every other pair."""
    checker = script(home, "john-joe-checker", r'''
# exit 101 (454) when REMOTEMF is john@... and REMOTERCPT is joe@...; else accept
case "$REMOTEMF" in
  john@*) case "$REMOTERCPT" in joe@*) echo "john-joe-checker: refused" >&2; exit 101;; esac;;
esac
exit 0
''')
    env = {"SMTPEXTFORK": checker, "454SMTPEXTFORK": "sorry john, joe does not want your mail"}
    out, status, queued = run_smtp(
        crlf(b"MAIL FROM:<john@b.c>", b"RCPT TO:<joe@example.com>", b"RCPT TO:<ann@example.com>")
        + MESSAGE
        + crlf(b"MAIL FROM:<bob@b.c>", b"RCPT TO:<joe@example.com>") + MESSAGE
        + crlf(b"MAIL FROM:<johnny@b.c>", b"RCPT TO:<joey@example.com>",
               b"RCPT TO:<Joe@example.com>") + MESSAGE
        + crlf(b"QUIT"),
        home=home, env=env)
    assert norm(out) == (
        GREETING
        + OK + b"454 sorry john, joe does not want your mail (#5.7.1)\r\n" + OK
        + b"354 go ahead\r\n" + ACCEPTED
        + OK + OK + b"354 go ahead\r\n" + ACCEPTED
        + OK + OK + OK + b"354 go ahead\r\n" + ACCEPTED
        + BYE)
    assert status == 0
    assert [m.envelope for m in queued] == [
        b"Fjohn@b.c\0Tann@example.com\0\0",
        b"Fbob@b.c\0Tjoe@example.com\0\0",
        b"Fjohnny@b.c\0Tjoey@example.com\0TJoe@example.com\0\0",
    ]


def test_exit_111_is_logged_and_the_next_program_runs(home):
    first = tracer(home, "first", 111)
    second = tracer(home, "second", 102)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": first + "," + second})
    assert out == (GREETING + OK
                   + b"550 sorry, permanent failure imposed by local policy (#5.7.1)\r\n" + BYE)
    assert trace(home) == ["first", "second"]


def test_exit_111_alone_accepts_and_logs_a_warning(home):
    prog = script(home, "e111", "exit 111\n")
    result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                      home=home, env={"SMTPEXTFORK": prog})
    assert result.out == GREETING + OK + OK + BYE
    assert b"XF warn: cannot fork external program" in result.err


def test_missing_program_is_like_111(home):
    missing = os.path.join(home.path, "plugins", "no-such-program")
    second = tracer(home, "second", 0)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": missing + "," + second})
    assert out == GREETING + OK + OK + BYE
    assert trace(home) == ["second"]


@pytest.mark.parametrize("other", [1, 42, 99, 109, 110, 112, 255])
def test_other_exit_codes_continue_with_the_next_program(home, other):
    first = tracer(home, "first", other)
    second = tracer(home, "second", 107)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": first + "," + second})
    assert out == (GREETING + OK
                   + b"450 sorry, temporary mailbox failure imposed by local policy (#4.3.0)\r\n"
                   + BYE)
    assert trace(home) == ["first", "second"]


def test_other_exit_code_alone_accepts(home):
    prog = script(home, "e42", "exit 42\n")
    result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                      home=home, env={"SMTPEXTFORK": prog})
    assert result.out == GREETING + OK + OK + BYE
    assert b"XF (#5d)" in result.err


@pytest.mark.parametrize("signame", ["KILL", "TERM"])
def test_death_by_signal_stops_the_list_and_accepts(home, signame):
    trace_file = os.path.join(home.root, "trace")
    killed = script(home, "killed", 'echo killed >> "%s"\nkill -%s $$\nexit 100\n'
                    % (trace_file, signame))
    never = tracer(home, "never", 100)
    result = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": killed + "," + never})
    assert norm(result.out) == GREETING + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    assert trace(home) == ["killed"]
    assert [m.recipients for m in result.queued] == [[b"u@example.com"]]
    assert b"XF (#5c)" in result.err


# ------------------------------------------------------------------ the list


def test_programs_run_in_list_order_until_a_refusal(home):
    progs = [tracer(home, "p1", 0), tracer(home, "p2", 0), tracer(home, "p3", 103),
             tracer(home, "p4", 0)]
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": ",".join(progs)})
    assert out == (GREETING + OK
                   + b"451 sorry, service not available due to local policy (#4.3.0)\r\n" + BYE)
    assert trace(home) == ["p1", "p2", "p3"]


def test_all_programs_run_for_every_rcpt(home):
    progs = [tracer(home, "p1", 0), tracer(home, "p2", 0)]
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@example.com>")
        + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": ",".join(progs)})
    assert norm(out) == GREETING + OK + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    assert trace(home) == ["p1", "p2", "p1", "p2"]
    assert queued[0].recipients == [b"u@example.com", b"v@example.com"]


@pytest.mark.parametrize("template", [",{a},,{b},", ",,{a},{b}", "{a},,,{b},,"])
def test_empty_fields_in_the_list_are_skipped(home, template):
    a, b = tracer(home, "a", 0), tracer(home, "b", 0)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": template.format(a=a, b=b)})
    assert out == GREETING + OK + OK + BYE
    assert trace(home) == ["a", "b"]


@pytest.mark.parametrize("value", ["", ",", ",,,"])
def test_list_without_programs_accepts(home, value):
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": value})
    assert out == GREETING + OK + OK + BYE


def test_entry_with_a_space_is_one_path(home):
    """No whitespace trimming: ' /path' is a different (missing) program, which counts
    as 111, so the recipient is accepted although /path itself would refuse."""
    prog = tracer(home, "p", 100)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": " " + prog})
    assert out == GREETING + OK + OK + BYE
    assert trace(home) == []


def test_relative_path_is_relative_to_the_qmail_home(home):
    refuse_bad(home, 106)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": "plugins/refuse"})
    assert out == GREETING + OK + b"503 sorry, wrong usage of SMTP commands (#5.7.1)\r\n" + BYE


# ------------------------------------------------------------------ when programs run


def test_programs_run_only_at_rcpt_after_the_builtin_checks(make_home):
    """Not at HELO/MAIL/DATA, and not for a RCPT that rcpthosts, badmailfrom, a missing
    MAIL or a syntax error already refused."""
    home = make_home(control={"badmailfrom": "bad@evil.test\n"})
    prog = tracer(home, "p", 0)
    out, _, queued = run_smtp(
        crlf(b"HELO c.test", b"RCPT TO:<early@example.com>", b"MAIL FROM:<bad@evil.test>",
             b"RCPT TO:<u@example.com>", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>",
             b"RCPT TO:<" + b"x" * 950 + b"@example.com>", b"RCPT TO:<u@example.com>")
        + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog})
    assert norm(out) == (GREETING + b"250 mx.example.org\r\n" + b"503 MAIL first (#5.5.1)\r\n"
                         + OK + BMF + OK + NOGATEWAY + b"555 syntax error (#5.5.4)\r\n" + OK
                         + b"354 go ahead\r\n" + ACCEPTED + BYE)
    assert trace(home) == ["p"]
    assert len(queued) == 1


def test_no_programs_without_either_variable(home):
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"554SMTPEXTFORK": "x", "XF_QUITASAP": "1"})
    assert out == GREETING + OK + OK + BYE


# ------------------------------------------------------------------ relay split horizon


@pytest.mark.parametrize("relayclient, expected", [
    (None, b"554 sorry, permanent envelope failure due to local policy (#5.7.1)\r\n"),
    ("", b"550 sorry, permanent failure imposed by local policy (#5.7.1)\r\n"),
    ("+rc", b"550 sorry, permanent failure imposed by local policy (#5.7.1)\r\n"),
])
def test_relay_clients_use_smtpextforkr(home, relayclient, expected):
    plain = script(home, "plain", "exit 100\n")
    relay = script(home, "relay", "exit 102\n")
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": plain, "SMTPEXTFORKR": relay,
                                         "RELAYCLIENT": relayclient})
    assert out == GREETING + OK + expected + BYE


def test_relay_client_relays_through_the_r_list(home):
    """A relay client's RCPT to a foreign domain reaches SMTPEXTFORKR's programs."""
    relay = refuse_bad(home, 107, "relay")
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<bad@elsewhere.org>", b"RCPT TO:<ok@elsewhere.org>")
        + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORKR": relay, "RELAYCLIENT": ""})
    assert norm(out) == (
        GREETING + OK
        + b"450 sorry, temporary mailbox failure imposed by local policy (#4.3.0)\r\n"
        + OK + b"354 go ahead\r\n" + ACCEPTED + BYE)
    assert queued[0].recipients == [b"ok@elsewhere.org"]


def test_only_smtpextforkr_leaves_non_relay_clients_alone(home):
    relay = tracer(home, "relay", 100)
    result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                      home=home, env={"SMTPEXTFORKR": relay})
    assert result.out == GREETING + OK + OK + BYE
    assert trace(home) == []
    assert RELAY_LOG not in result.err


def test_relay_client_without_smtpextforkr_logs_once_per_connection(home):
    """SMTPEXTFORK is not used for a relay client; the missing SMTPEXTFORKR is logged
    once per connection (DECISIONS.md), not once per RCPT."""
    plain = tracer(home, "plain", 100)
    result = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@elsewhere.org>")
        + MESSAGE
        + crlf(b"RSET", b"MAIL FROM:<a@b.c>", b"RCPT TO:<w@example.com>") + MESSAGE
        + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": plain, "RELAYCLIENT": ""})
    assert norm(result.out) == (GREETING + OK + OK + OK + b"354 go ahead\r\n" + ACCEPTED
                                + b"250 flushed\r\n" + OK + OK + b"354 go ahead\r\n" + ACCEPTED
                                + BYE)
    assert trace(home) == []
    assert result.err.count(RELAY_LOG) == 1
    assert re.search(re.escape(RELAY_LOG) + rb"\n", result.err)


def test_relay_log_line_not_written_without_relay_or_with_r_list(home):
    plain = tracer(home, "plain", 0)
    for env in ({"SMTPEXTFORK": plain},
                {"SMTPEXTFORK": plain, "SMTPEXTFORKR": plain, "RELAYCLIENT": ""}):
        result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                          home=home, env=env)
        assert result.out == GREETING + OK + OK + BYE
        assert b"SMTPEXTFORKR env variable not defined" not in result.err
    assert trace(home) == ["plain", "plain"]


# ------------------------------------------------------------------ program I/O


def test_program_stdout_goes_to_the_log_not_the_client(home):
    noisy = script(home, "noisy",
                   'echo "250 junk-from-extfork-program"\nprintf "more junk\\r\\n"\nexit 0\n')
    result = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": noisy})
    assert norm(result.out) == GREETING + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    assert b"250 junk-from-extfork-program\n" in result.err
    assert b"more junk" in result.err


def test_refusing_program_stdout_does_not_reach_the_client(home):
    noisy = script(home, "noisy", 'echo "250 fake ok from program"\nexit 100\n')
    result = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                      home=home, env={"SMTPEXTFORK": noisy})
    assert result.out == (GREETING + OK
                          + b"554 sorry, permanent envelope failure due to local policy (#5.7.1)"
                            b"\r\n" + BYE)
    assert b"250 fake ok from program" in result.err


def test_program_stdin_is_not_the_connection(home):
    """A program reading stdin must not eat the client's pipelined commands."""
    seen = os.path.join(home.root, "stdin-seen")
    reader = script(home, "reader", 'cat > "%s"\nexit 0\n' % seen)
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"NOOP") + MESSAGE
        + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": reader})
    assert norm(out) == GREETING + OK + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    with open(seen, "rb") as f:
        assert f.read() == b""
    assert len(queued) == 1


# ------------------------------------------------------------------ REMOTE* variables


def test_remote_variables_argv_and_cwd(home):
    prog, records = recorder(home)
    out, _, _ = run_smtp(
        crlf(b"HELO client.test", b"MAIL FROM:<Sender@B.C>", b"RCPT TO:<u1@example.com>",
             b"RCPT TO:<\"q u\"@example.com>", b"MAIL FROM:<>", b"RCPT TO:<u3@x.sub.example.net>",
             b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog})
    assert out == GREETING + b"250 mx.example.org\r\n" + OK * 5 + BYE
    cwd = os.path.realpath(home.path)
    assert records() == [
        {"argv": [], "cwd": cwd, "MF": mf, "HELO": "client.test", "RCPT": rcpt}
        for mf, rcpt in (("Sender@B.C", "u1@example.com"), ("Sender@B.C", "q u@example.com"),
                         ("", "u3@x.sub.example.net"))
    ]


@pytest.mark.parametrize("remotehost, helo", [(None, "unknown"), ("client.example.net",
                                                                   "client.example.net")])
def test_remotehelo_without_helo_is_the_remote_host(home, remotehost, helo):
    prog, records = recorder(home)
    out, _, _ = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                         home=home, env={"SMTPEXTFORK": prog, "TCPREMOTEHOST": remotehost})
    assert out == GREETING + OK + OK + BYE
    assert [r["HELO"] for r in records()] == [helo]


def test_remotehelo_follows_the_last_helo_and_may_be_empty(home):
    prog, records = recorder(home)
    out, _, _ = run_smtp(
        crlf(b"EHLO first.test", b"HELO", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
             b"HELO second.test ", b"MAIL FROM:<a@b.c>", b"RCPT TO:<v@example.com>", b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog})
    assert out.endswith(OK + BYE)
    assert [r["HELO"] for r in records()] == ["", "second.test "]


def test_remotercpt_includes_the_relayclient_suffix(home):
    prog, records = recorder(home)
    out, _, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORKR": prog, "RELAYCLIENT": "+rc"})
    assert norm(out) == GREETING + OK + OK + b"354 go ahead\r\n" + ACCEPTED + BYE
    assert [r["RCPT"] for r in records()] == ["x@elsewhere.org+rc"]
    assert queued[0].recipients == [b"x@elsewhere.org+rc"]


def test_remote_variables_reach_qmail_queue(home):
    """The variables are set in the server's own environment and stay set, so
    qmail-queue sees the last RCPT that was checked (extfork.md §3)."""
    prog = refuse_bad(home, 100)
    queue = EnvQueue(home)
    out, _, queued = run_smtp(
        crlf(b"HELO h.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
             b"RCPT TO:<bad@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog, "QMAILQUEUE": queue.path})
    assert norm(out) == (GREETING + b"250 mx.example.org\r\n" + OK + OK
                         + b"554 sorry, permanent envelope failure due to local policy (#5.7.1)"
                           b"\r\n" + b"354 go ahead\r\n" + ACCEPTED + BYE)
    env = queue.text()
    assert (env["REMOTEMF"], env["REMOTEHELO"], env["REMOTERCPT"]) == (
        "a@b.c", "h.test", "bad@example.com")
    assert queued[0].recipients == [b"u@example.com"]


# ------------------------------------------------------------------ XF_QUITASAP


def test_xf_quitasap_refusal_ends_the_session(home):
    """With XF_QUITASAP the refusal is the last thing sent: after a pause the server
    exits 1 without answering the pipelined commands and nothing is queued."""
    prog = refuse_bad(home, 101)
    out, status, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<bad@example.com>",
             b"NOOP", b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog, "XF_QUITASAP": "1",
                        "454SMTPEXTFORK": "bye now"})
    assert out == GREETING + OK + OK + b"454 bye now (#5.7.1)\r\n"
    assert status == 1
    assert queued == []
    assert home.queue.runs() == 0


def test_xf_quitasap_without_a_refusal_changes_nothing(home):
    """Programs that accept, and refusals by qmail's own checks, keep the session."""
    prog = refuse_bad(home, 100)
    out, status, queued = run_smtp(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<x@elsewhere.org>",
             b"NOOP") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"SMTPEXTFORK": prog, "XF_QUITASAP": "1"})
    assert norm(out) == (GREETING + OK + OK + NOGATEWAY + OK + b"354 go ahead\r\n" + ACCEPTED
                         + BYE)
    assert status == 0
    assert len(queued) == 1

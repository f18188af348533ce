"""Where random sessions through the C programs and this one differed (issue
12's fidelity list), each pinned: the semantics in-process through the
reference world, the plumbing (exec, environment, signals) with the
installed program."""

import os
import signal
import subprocess

import pytest

from qmail_smtpd_py.control import first_line, parse_lines
from qmail_smtpd_py.core import requests as rq

from helpers import (
    ACC,
    BYE,
    GO,
    GREETING,
    OK,
    SERVER,
    EnvQueue,
    crlf,
    norm,
    require_tools,
    run_smtp,
    script,
    server_env,
)
from world import config, run

MESSAGE = crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA", b"Subject: t", b"",
               b"hi", b".")

# ------------------------------------------------------------------ 1. the children's environment


@pytest.mark.parametrize("locale", [{}, {"LANG": "C"}, {"LC_CTYPE": "C"}, {"LC_ALL": "C"},
                                    {"LC_CTYPE": "C.UTF-8"}])
def test_children_get_the_environment_qmail_smtpd_would_pass(home, locale):
    """Python coerces a C locale to LC_CTYPE=C.UTF-8 in its own environment;
    qmail-queue, plugins and programs must not see that."""
    queue = EnvQueue(home)
    res = run_smtp(MESSAGE + crlf(b"QUIT"), home=home, env={"QMAILQUEUE": queue.path, **locale})
    assert len(res.queued) == 1
    seen = {k: v for k, v in queue.text().items() if k in ("LANG", "LC_ALL", "LC_CTYPE")}
    assert seen == locale


# ------------------------------------------------------------------ 2. QMAILQUEUE set but empty


def test_empty_qmailqueue_is_execed_as_given_and_fails_closed(home):
    """C execs the empty name: 354, then 451 unable to exec qq, for every message
    (an envdir file holding just a newline).  The default queue is not used."""
    res = run_smtp(MESSAGE + MESSAGE + crlf(b"QUIT"), home=home, env={"QMAILQUEUE": ""})
    fail = b"451 unable to exec qq (#4.3.0)\r\n"
    assert res.out == GREETING + OK + OK + GO + fail + OK + OK + GO + fail + BYE
    assert home.queue.runs() == 0


def test_empty_qmailqueue_in_the_core():
    r = run(MESSAGE, env={b"QMAILQUEUE": b""},
            queue_start=rq.CannotStart(rq.EXEC, "No such file or directory"))
    assert r.queue_envs and [q for q in r.requests if type(q) is rq.StartQueue][0].program == b""
    assert r.output.endswith(GO + b"451 unable to exec qq (#4.3.0)\r\n")


# ------------------------------------------------------------------ 3. NUL bytes in control files


@pytest.mark.parametrize("data, entries", [
    (b"nul.org\0x\n", [b"nul.org", b"x"]),
    (b"a\0\0b\n", [b"a", b"", b"b"]),
    (b"\0c\nd\n", [b"d"]),                  # a line starting with NUL is dropped
    (b"d\0#e\n", [b"d", b"#e"]),            # a '#' after a NUL is no comment
    (b"f \0g \t\n", [b"f ", b"g"]),          # trailing blanks go before the split
    (b"#x\0y\n\nz", [b"z"]),
])
def test_list_files_split_at_nul_as_qmail(data, entries):
    assert parse_lines(data) == entries


def test_line_files_end_at_nul():
    assert first_line(b"mx.\0example\nsecond\n") == b"mx."
    assert first_line(b"\0") == b""


def test_nul_in_rcpthosts_is_two_entries(make_home):
    home = make_home(control={"rcpthosts": "nul.org\0x.org\n"})
    res = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@nul.org>", b"RCPT TO:<u@x.org>",
                        b"RCPT TO:<u@nul.org\0x>", b"QUIT"), home=home)
    assert res.out == GREETING + OK + OK + OK + OK + BYE


def test_nul_in_smtpplugins_runs_both_plugins(make_home):
    home = make_home()
    p1 = script(home, "p1", "echo HX-One: 1\n")
    p2 = script(home, "p2", "echo HX-Two: 2\n")
    home.control("smtpplugins", "[mail]\n%s\0%s\n" % (p1, p2))
    res = run_smtp(MESSAGE + crlf(b"QUIT"), home=home)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert b"X-One: 1\nX-Two: 2\n" in res.queued[0].message


def test_nul_in_me_is_no_crash_and_no_nul_on_the_wire(make_home):
    home = make_home(control={"me": "mx.example.org\0junk\n"})
    res = run_smtp(crlf(b"HELO c", b"MAIL FROM:<a@[127.0.0.1]>", b"RCPT TO:<u@example.com>",
                        b"DATA", b"x", b".", b"QUIT"), home=home)
    assert b"\0" not in res.out
    assert norm(res.out) == GREETING + b"250 mx.example.org\r\n" + OK + OK + GO + ACC + BYE
    assert res.queued[0].sender == b"a@mx.example.org"


@pytest.mark.parametrize("errtext, reply", [
    (b"Dbad\0tail", b"554 bad\r\n"),
    (b"D\0xyz", b"554 \r\n"),
    (b"Zlater (#4.3.0)\0\0", b"451 later (#4.3.0)\r\n"),
    (b"\0abc", b"451 abc\r\n"),  # C answers 250 ok here: never for a refused message
    (b"Xa", b"451 qq temporary problem (#4.3.0)\r\n"),
])
def test_fd6_text_is_a_c_string_and_never_a_nul_on_the_wire(errtext, reply):
    r = run(MESSAGE, queue_status=82, queue_errtext=errtext)
    assert r.output.endswith(GO + reply)
    assert r.queued == []


def test_fd6_nul_through_the_real_queue(make_home):
    home = make_home(queue_exit=82, queue_errtext=b"Dno thanks\0 (#5.7.1)")
    res = run_smtp(MESSAGE + crlf(b"QUIT"), home=home)
    assert res.out == GREETING + OK + OK + GO + b"554 no thanks\r\n" + BYE


# ------------------------------------------------------------------ 4. exec as each C program does


def no_shebang(home, name, body, mode=0o755):
    """An executable text file without #!: execvp runs it with /bin/sh, execv fails."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, mode)
    return path


def auth_line(user=b"joe", password=b"secret"):
    import base64
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password)


def test_checkpassword_script_without_shebang_runs_through_sh(home):
    """The AUTH patch execs checkpassword with execvp, which falls back to /bin/sh."""
    checkpw = no_shebang(home, "checkpw", 'read -r x <&3; case "$x" in joe*) exec "$@";; esac\n'
                                          "exit 1\n")
    res = run_smtp(crlf(auth_line(), b"QUIT"), home=home, args=(checkpw, "/bin/true"),
                   env={"SMTPAUTH": ""})
    assert res.out == GREETING + b"235 ok, go ahead (#2.0.0)\r\n" + BYE


def test_checkpassword_found_in_path(home):
    """A checkpassword named without a path is looked for in PATH (execvp)."""
    res = run_smtp(crlf(auth_line(), b"QUIT"), home=home, args=("mx.test", "true"),
                   env={"SMTPAUTH": ""})
    assert res.out == GREETING + b"235 ok, go ahead (#2.0.0)\r\n" + BYE


def test_plugin_without_shebang_cannot_execute(make_home):
    """qmail-spp execs with execv: no shell fallback, exit 120 -> can't execute."""
    home = make_home()
    plugin = no_shebang(home, "p", "echo E550 never\n")
    home.control("smtpplugins", "[mail]\n%s\n" % plugin)
    res = run_smtp(crlf(b"MAIL FROM:<a@b.c>", b"QUIT"), home=home)
    assert res.out == GREETING + b"451 qmail-spp failure: %s: can't execute (#4.3.0)\r\n" \
        % plugin.encode() + BYE


def test_extfork_program_without_shebang_is_an_exec_failure(home):
    """SMTPEXTFORK execs with execv: the child's exit 111, logged, next program."""
    program = no_shebang(home, "xf", "exit 100\n")
    res = run_smtp(MESSAGE[:MESSAGE.index(b"DATA")] + crlf(b"QUIT"), home=home,
                   env={"SMTPEXTFORK": program})
    assert res.out == GREETING + OK + OK + BYE
    assert b"XF warn: cannot fork external program: " + program.encode() in res.err


def test_queue_without_shebang_is_unable_to_exec(home):
    queue = no_shebang(home, "qq", "exit 0\n")
    res = run_smtp(MESSAGE + crlf(b"QUIT"), home=home, env={"QMAILQUEUE": queue})
    assert res.out == GREETING + OK + OK + GO + b"451 unable to exec qq (#4.3.0)\r\n" + BYE


# ------------------------------------------------------------------ 5., 6. AUTH details


def auth_config(mode=b""):
    from qmail_smtpd_py.core.auth import parse_mode
    return config(auth_mode=parse_mode(mode), checkpassword=(b"/cp", b"/bin/true"))


def test_mail_auth_parameter_first_value_wins():
    r = run(crlf(b"MAIL FROM:<a@b.c> AUTH=first AUTH=second", b"RCPT TO:<u@example.com>",
                 b"DATA", b".", b"QUIT"), cfg=auth_config())
    assert r.queue_envs[0][b"TCPREMOTEINFO"] == b"first"
    assert b"(first@127.0.0.1)" in r.queued[0][0]


@pytest.mark.parametrize("cancel", [b"*", b"*\0more bytes"])
def test_auth_cancel_is_a_star_as_a_c_string(cancel):
    r = run(b"AUTH LOGIN\r\n" + cancel + b"\r\nQUIT\r\n", cfg=auth_config())
    assert r.output == GREETING + b"334 VXNlcm5hbWU6\r\n501 auth exchange canceled (#5.0.0)\r\n" \
        + BYE


def test_auth_line_starting_with_nul_is_no_cancel():
    r = run(b"AUTH LOGIN\r\n\0*\r\nx\r\nQUIT\r\n", cfg=auth_config(), checkpassword=lambda d: 1)
    assert b"501 auth exchange canceled" not in r.output


# ------------------------------------------------------------------ 7. bounded texts are logged


@pytest.mark.parametrize("line, what", [(b"HX-Big: " + b"y" * 70000, "H"),
                                        (b"LR451 " + b"z" * 70000, "LR")])
def test_oversized_plugin_text_is_dropped_and_logged(line, what):
    cfg = config(plugins={b"r": [b"p"]})
    r = run(MESSAGE, cfg=cfg, plugins={b"p": (line + b"\n", 0)})
    assert "qmail-spp: p: %s text over 65536 bytes not used" % what in r.log
    assert len(r.queued) == 1 and b"y" * 100 not in r.queued[0][0]


# ------------------------------------------------------------------ SIGCHLD ignored by the parent


def test_started_with_sigchld_ignored_queues_once_and_says_250(home):
    """A parent ignoring SIGCHLD (swaks --pipe, some inetd launchers) made every
    waitpid fail: queued, then 451 and a retry (a duplicate)."""
    p = subprocess.run([SERVER], input=MESSAGE + crlf(b"QUIT"), capture_output=True,
                       env=server_env(home), cwd=home.path, timeout=30,
                       preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert norm(p.stdout) == GREETING + OK + OK + GO + ACC + BYE
    assert len(home.queued()) == 1


def test_swaks_pipe_queues_exactly_one_message(home):
    require_tools("swaks")
    env = server_env(home)
    p = subprocess.run(["swaks", "--pipe", SERVER, "--to", "u@example.com", "--from", "a@b.c",
                        "--helo", "client.test"], capture_output=True, env=env,
                       cwd=home.path, timeout=60)
    assert p.returncode == 0, p.stdout
    assert b"<-  250 ok " in p.stdout
    assert len(home.queued()) == 1


def test_a_wait_that_fails_anyway_is_qq_waitpid_surprise():
    r = run(MESSAGE, queue_status=rq.WaitFailed("No child processes"))
    assert r.output.endswith(GO + b"451 qq waitpid surprise (#4.3.0)\r\n")


def test_children_wait_reports_a_lost_child():
    from qmail_smtpd_py.children import wait
    assert type(wait(os.getpid())) is rq.WaitFailed  # not our child

"""The sample plugins tarpit, authlog, ifauthnext and badhelo, as installed (next to
qmail-smtpd-py, with the venv's interpreter in their first line), in sessions played
in-process (plugin_world.run_home: the core with the home's configuration, the plugins
real processes, preloaded as the pool runs them) and, for some, under the real
tcpserver driven by swaks.

No test measures time: tarpit's delays are seen in its log line, and the slow ones are
cut short with SPPTIMEOUT (the plugin is killed: 451 ... child crashed), which also
proves it was still sleeping.
"""

import os
import re
import subprocess
import sys

import pytest
from plugin_world import preloaded, run_home
from test_auth import LOGIN_JOE, PLAIN_JOE, CheckPw

from helpers import (
    ACC,
    BIN_DIR,
    BYE,
    GO,
    GREETING,
    HELO250,
    OK,
    crlf,
    norm,
    require_tools,
)

TARPIT = os.path.join(BIN_DIR, "tarpit")
AUTHLOG = os.path.join(BIN_DIR, "authlog")
IFAUTHNEXT = os.path.join(BIN_DIR, "ifauthnext")
BADHELO = os.path.join(BIN_DIR, "badhelo")


AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
FORBIDDEN = b"553 sorry, your HELO is forbidden (#5.7.1)\r\n"

MAIL = b"MAIL FROM:<a@b.c>"
DATA = (b"DATA", b"Subject: t", b"", b"hi", b".")
QUIT = b"QUIT"


def rcpt(n):
    return b"RCPT TO:<u%d@example.com>" % n


def configure(home, *sections):
    """control/smtpplugins from (section, [entries]) pairs, after a [connection] plugin
    that logs the server's pid (a plain entry: the server is its parent)."""
    path = os.path.join(home.path, "ppid")
    with open(path, "w") as f:
        f.write('#!/bin/sh\necho "server-pid=$PPID" >&2\n')
    os.chmod(path, 0o755)
    lines = ["[connection]", "ppid"]
    for section, entries in sections:
        lines += ["[%s]" % section, *entries]
    home.control("smtpplugins", "\n".join(lines) + "\n")


@pytest.fixture(scope="module", autouse=True)
def plugins_preloaded():
    with preloaded(TARPIT, AUTHLOG, IFAUTHNEXT, BADHELO, base_env={}):
        yield


def run(home, *lines, env=None, args=()):
    return run_home(crlf(*lines), env=env, home=home, args=args)


def server_pid(err):
    (pid,) = re.findall(rb"^server-pid=(\d+)$", err, re.MULTILINE)
    return int(pid)


def crashed(entry):
    return b"451 qmail-spp failure: %s: child crashed (#4.3.0)\r\n" % entry.encode()


def test_samples_are_installed_with_the_venv_interpreter():
    for path in (TARPIT, AUTHLOG, IFAUTHNEXT, BADHELO):
        assert os.access(path, os.X_OK), path
        with open(path, "rb") as f:
            first = f.readline()
        assert first.startswith(b"#!") and b"python" in first, (path, first)


# ------------------------------------------------------------------ tarpit


def tarpit_log(err):
    return re.findall(rb"^tarpit: pid \d+: (.*)$", err, re.MULTILINE)


def test_tarpit_without_TARPITCOUNT_does_nothing(home):
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), rcpt(3), QUIT, env={"TARPITDELAY": "1"})
    assert res.out == GREETING + OK + OK + OK + OK + BYE
    assert tarpit_log(res.err) == []


def test_tarpit_delays_the_recipients_over_the_count_then_lets_them_through(home):
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), rcpt(3), *DATA, QUIT,
              env={"TARPITCOUNT": "1", "TARPITDELAY": "1"})
    assert norm(res.out) == GREETING + OK + OK + OK + OK + GO + ACC + BYE
    assert res.queued[0].recipients == [b"u1@example.com", b"u2@example.com", b"u3@example.com"]
    # SMTPRCPTCOUNT is 0, 1, 2: only the third RCPT is over TARPITCOUNT=1.
    assert tarpit_log(res.err) == [b"delaying for 1 seconds. sender: a@b.c"]
    assert server_pid(res.err) == int(re.search(rb"^tarpit: pid (\d+)", res.err, re.MULTILINE).group(1))


def test_tarpit_NOTARPIT_spares_the_client(home):
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), QUIT,
              env={"TARPITCOUNT": "0", "TARPITDELAY": "1", "NOTARPIT": ""})
    assert res.out == GREETING + OK + OK + OK + BYE
    assert tarpit_log(res.err) == []


def test_tarpit_zero_delay_does_not_sleep_or_log(home):
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), QUIT, env={"TARPITCOUNT": "0", "TARPITDELAY": "0"})
    assert res.out == GREETING + OK + OK + OK + BYE
    assert tarpit_log(res.err) == []


def tarpit_call(monkeypatch, **env):
    """tarpit's main() run here on a session of env, its time.sleep recorded instead of
    slept: which delay it chooses is behaviour; how long a sleep takes is not."""
    import runpy
    import time

    from qmail_smtpd_py import plugin
    script = runpy.run_path(TARPIT, run_name="tarpit")  # a copy of its globals: main's own
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(sys, "argv", [TARPIT])  # the kit's log lines are named after argv[0]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    script["main"](plugin.Session())
    return slept


@pytest.mark.parametrize("setting,seconds", [("NORMAL", 8), ("medium", 20), ("Hard", 16),
                                             ("2.5", 2.5)])
def test_tarpit_named_delays_grow_with_the_count(monkeypatch, capfd, setting, seconds):
    """The fourth RCPT (SMTPRCPTCOUNT=3) over TARPITCOUNT=0: 3 - 0 + 1 = 4 for the
    formulas, as tarpit.c; the delay chosen is slept and logged."""
    slept = tarpit_call(monkeypatch, SMTPRCPTCOUNT="3", TARPITCOUNT="0", TARPITDELAY=setting,
                        SMTPMAILFROM="a@b.c")
    assert slept == [seconds]
    assert tarpit_log(capfd.readouterr().err.encode()) == [
        b"delaying for %g seconds. sender: a@b.c" % seconds]


def test_tarpit_bad_TARPITCOUNT_is_logged_and_ignored(home):
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), QUIT, env={"TARPITCOUNT": "lots", "TARPITDELAY": "1"})
    assert res.out == GREETING + OK + OK + OK + BYE
    assert tarpit_log(res.err) == [
        b"bad TARPITCOUNT 'lots' (a whole number of recipients); not tarpitting"] * 2
    assert b"Traceback" not in res.err


@pytest.mark.parametrize("setting", ["fast", "-3", "nan", "1e999"])
def test_tarpit_bad_TARPITDELAY_is_logged_and_random_used(monkeypatch, capfd, setting):
    """Random is 0..49 s, as tarpit.c: no delay at 0, else that one, slept and logged."""
    slept = tarpit_call(monkeypatch, SMTPRCPTCOUNT="1", TARPITCOUNT="0", TARPITDELAY=setting,
                        SMTPMAILFROM="a@b.c")
    log = tarpit_log(capfd.readouterr().err.encode())
    assert log[0] == ("bad TARPITDELAY %r (a number of seconds, NORMAL, MEDIUM, HARD or "
                      "RANDOM); using RANDOM" % setting).encode()
    assert all(re.fullmatch(rb"delaying for ([1-9]|[1-4][0-9]) seconds\. sender: a@b\.c", line)
               for line in log[1:])
    assert slept == [int(n) for n in re.findall(rb"for (\d+) seconds", b"".join(log[1:]))]
    assert all(0 < n < 50 for n in slept)


def test_tarpit_bad_TARPITDELAY_in_a_session_has_no_traceback(home):
    """The same through the server: the reply is 250 after the random delay, or the
    451 of a plugin stopped by SPPTIMEOUT, whichever the draw gives."""
    configure(home, ("rcpt", [TARPIT]))
    res = run(home, MAIL, rcpt(1), rcpt(2), QUIT,
              env={"TARPITCOUNT": "0", "TARPITDELAY": "fast", "SPPTIMEOUT": "1"})
    assert res.out in (GREETING + OK + OK + OK + BYE, GREETING + OK + OK + crashed(TARPIT) + BYE)
    assert b"bad TARPITDELAY 'fast'" in res.err and b"Traceback" not in res.err


def test_tarpit_null_sender_and_no_counts(home):
    """The null sender is logged as <>; outside [rcpt] (no SMTPRCPTCOUNT) nothing happens."""
    configure(home, ("mail", [TARPIT]), ("rcpt", [TARPIT]))
    res = run(home, b"MAIL FROM:<>", rcpt(1), rcpt(2), QUIT,
              env={"TARPITCOUNT": "0", "TARPITDELAY": "0.1"})
    assert res.out == GREETING + OK + OK + OK + BYE
    assert tarpit_log(res.err) == [b"delaying for 0.1 seconds. sender: <>"]


# ------------------------------------------------------------------ authlog


def auth_home(home):
    return home, CheckPw(home)


@pytest.mark.parametrize("login,method", [(PLAIN_JOE, b"plain"), (LOGIN_JOE, b"login")])
def test_authlog_logs_the_login_in_gentoo_format(home, login, method):
    home, checkpw = auth_home(home)
    configure(home, ("auth", [AUTHLOG]))
    res = run(home, b"EHLO c.test", *login.rstrip(b"\r\n").split(b"\r\n"), MAIL, QUIT,
              env={"SMTPAUTH": "", "TCPREMOTEIP": "192.0.2.7"}, args=[checkpw.path, "/bin/true"])
    assert AUTH_OK + OK + BYE in res.out
    line = b"smtp-login: Login: <joe>, method=%s, rip=192.0.2.7, pid=%d\n" % (
        method, server_pid(res.err))
    assert line in res.err
    assert res.err.count(b"smtp-login") == 1
    for secret in (b"secret", b"c2VjcmV0", b"AGpvZQBzZWNyZXQ="):  # plain, base64 forms
        assert secret not in res.err


def test_authlog_without_a_login_logs_nothing(home):
    configure(home, ("rcpt", [AUTHLOG]), ("mail", [AUTHLOG]))
    res = run(home, MAIL, rcpt(1), QUIT)
    assert res.out == GREETING + OK + OK + BYE
    assert b"smtp-login" not in res.err


def test_authlog_escapes_the_user_and_copes_with_missing_variables(home):
    """SMTPAUTHUSER inherited from the environment (no AUTH, so no method), no
    TCPREMOTEIP: the line still comes, and a newline cannot start a forged one."""
    configure(home, ("rcpt", [AUTHLOG]))
    res = run(home, MAIL, rcpt(1), QUIT,
              env={"SMTPAUTHUSER": "eve\nsmtp-login: Login: <root>", "TCPREMOTEIP": None})
    assert res.out == GREETING + OK + OK + BYE
    assert (b"\nsmtp-login: Login: <eve\\x0asmtp-login: Login: <root>>, method=unknown, "
            b"rip=unknown, pid=%d\n" % server_pid(res.err)) in res.err


# ------------------------------------------------------------------ ifauthnext

REFUSE = ':echo E550 later plugin ran'


def test_ifauthnext_skips_later_plugins_when_authenticated(home):
    home, checkpw = auth_home(home)
    configure(home, ("mail", [IFAUTHNEXT, REFUSE]), ("rcpt", [IFAUTHNEXT, REFUSE]))
    res = run(home, b"EHLO c.test", PLAIN_JOE.rstrip(b"\r\n"), MAIL,
              b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT,
              env={"SMTPAUTH": ""}, args=[checkpw.path, "/bin/true"])
    assert norm(res.out).endswith(AUTH_OK + OK + OK + GO + ACC + BYE)
    assert res.queued[0].recipients == [b"x@elsewhere.org"]  # relaying: authenticated


def test_ifauthnext_passes_on_when_not_authenticated(home):
    configure(home, ("rcpt", [IFAUTHNEXT, REFUSE]))
    res = run(home, MAIL, rcpt(1), QUIT, env={"SMTPAUTHUSER": ""})
    assert res.out == GREETING + OK + b"550 later plugin ran\r\n" + BYE


def test_ifauthnext_does_not_skip_the_servers_checks(home):
    """N, not O: an inherited SMTPAUTHUSER without AUTH does not open the relay."""
    configure(home, ("rcpt", [IFAUTHNEXT, REFUSE]))
    res = run(home, MAIL, b"RCPT TO:<x@elsewhere.org>", QUIT, env={"SMTPAUTHUSER": "joe"})
    assert res.out == (GREETING + OK + b"553 sorry, that domain isn't in my list of allowed "
                       b"rcpthosts (#5.7.1)\r\n" + BYE)


# ------------------------------------------------------------------ badhelo

BADHELO_ARGS = ":%s example.com .spammers.com '[192.0.2.1]'" % BADHELO


@pytest.mark.parametrize("name,refused", [
    (b"example.com", True),
    (b"EXAMPLE.com.", True),          # case and one trailing dot do not matter
    (b"mx.spammers.com", True),       # .spammers.com: any subdomain
    (b"a.b.SPAMMERS.COM", True),
    (b"[192.0.2.1]", True),
    (b"spammers.com", False),         # ...but not the domain itself
    (b"example.com.au", False),
    (b"notexample.com", False),
    (b"[192.0.2.10]", False),
    (b"good.test", False),
])
def test_badhelo_arguments(home, name, refused):
    configure(home, ("helo", [BADHELO_ARGS]))
    res = run(home, b"HELO " + name, MAIL, QUIT)
    if refused:
        assert res.out == GREETING + FORBIDDEN
        assert res.status == 0
        assert re.search(rb"^badhelo: pid \d+: refused HELO %s from 127\.0\.0\.1 \(.*, argument\)$"
                         % re.escape(name), res.err, re.MULTILINE)
    else:
        assert res.out == GREETING + HELO250 + OK + BYE
        assert b"badhelo" not in res.err


def test_badhelo_control_file_and_ehlo(home):
    home.control("badhelo", "# forged names\n\n  friend.example.net  \n.bad.test\r\n")
    configure(home, ("helo", [BADHELO]))
    res = run(home, b"EHLO x.bad.test", MAIL, QUIT)
    assert res.out == GREETING + FORBIDDEN
    assert b"refused HELO x.bad.test from 127.0.0.1 (.bad.test, control/badhelo)" in res.err
    res = run(home, b"HELO Friend.Example.Net", MAIL, QUIT)
    assert res.out == GREETING + FORBIDDEN
    res = run(home, b"HELO ok.test", MAIL, QUIT)
    assert res.out == GREETING + HELO250 + OK + BYE


@pytest.mark.parametrize("env", [{"RELAYCLIENT": ""}, {"NOBADHELO": "1"}])
def test_badhelo_spares_trusted_clients(home, env):
    configure(home, ("helo", [BADHELO_ARGS]))
    res = run(home, b"HELO example.com", MAIL, QUIT, env=env)
    assert res.out == GREETING + HELO250 + OK + BYE
    assert b"badhelo" not in res.err


@pytest.mark.parametrize("name", [b"mx.example.org", b"alias.test", b"[127.0.0.1]"])
def test_badhelo_own_names_with_BADHELOSELF(home, name):
    home.control("locals", "alias.test\n")
    configure(home, ("helo", [BADHELO]))
    res = run(home, b"HELO " + name, MAIL, QUIT)
    assert res.out == GREETING + HELO250 + OK + BYE  # off by default
    res = run(home, b"HELO " + name, MAIL, QUIT, env={"BADHELOSELF": "1"})
    assert res.out == GREETING + FORBIDDEN


def test_badhelo_unreadable_control_file_is_logged_and_arguments_still_apply(home):
    os.mkdir(os.path.join(home.path, "control", "badhelo"))
    configure(home, ("helo", [BADHELO_ARGS]))
    res = run(home, b"HELO ok.test", b"HELO example.com", QUIT)
    assert res.out == GREETING + HELO250 + FORBIDDEN
    assert re.search(rb"^badhelo: pid \d+: cannot read control/badhelo \(Is a directory\); "
                     rb"using the arguments only$", res.err, re.MULTILINE)
    assert b"Traceback" not in res.err


def test_badhelo_empty_and_odd_helo(home):
    configure(home, ("helo", [BADHELO_ARGS]))
    res = run(home, b"HELO", b"HELO \xff\xfe.example.com", b"HELO   example.com  ", QUIT)
    assert res.out == GREETING + HELO250 + HELO250 + FORBIDDEN
    assert b"Traceback" not in res.err


# ------------------------------------------------------------------ under tcpserver, with swaks


def swaks(port, *args):
    require_tools("swaks")
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@b.c",
                        "--to", "u@example.com", "--timeout", "20", *args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60, check=False)
    return p.returncode, p.stdout


def test_badhelo_under_tcpserver(tcpservers, home):
    configure(home, ("helo", [BADHELO_ARGS]))
    server = tcpservers.start(home)
    status, transcript = swaks(server.port, "--helo", "mx.spammers.com")
    assert status != 0, transcript
    assert b"<** 553 sorry, your HELO is forbidden (#5.7.1)" in transcript
    assert home.queued() == []
    status, transcript = swaks(server.port, "--helo", "client.test")
    assert status == 0, transcript
    assert len(home.queued()) == 1
    (first, _) = server.session_pids(2)
    assert server.wait_log(re.compile(rb"badhelo: pid (\d+): refused HELO mx\.spammers\.com"
                                      rb" from 127\.0\.0\.1")) == [first.encode()]


def test_authlog_under_tcpserver_logs_the_session_pid(tcpservers, home):
    """pid= is the number tcpserver logs as `pid N from 127.0.0.1` for the connection."""
    home, checkpw = auth_home(home)
    configure(home, ("auth", [AUTHLOG]), ("rcpt", [IFAUTHNEXT, REFUSE]))
    server = tcpservers.start(home, env={"SMTPAUTH": ""}, args=[checkpw.path, "/bin/true"])
    status, transcript = swaks(server.port, "--helo", "client.test", "--auth", "PLAIN",
                               "--auth-user", "joe", "--auth-password", "secret")
    assert status == 0, transcript
    assert len(home.queued()) == 1  # ifauthnext skipped the refusing plugin
    (pid,) = server.session_pids(1)
    logged = server.wait_log(re.compile(rb"smtp-login: Login: <joe>, method=plain, "
                                        rb"rip=127\.0\.0\.1, pid=(\d+)\n"))
    assert logged == [pid.encode()]
    assert b"secret" not in server.log_text()

"""The connection log (stderr): one line per event, `<pid> <client ip> <event> ...`.

Format and events: qmail_smtpd_py/core/logline.py and the README's "Logging" section.
The events are the core's Log requests, so they are pinned in-process (the session core
against the reference world, t/world.py, with each qmail home's control files read by
the real loader); the world records each line without the `<pid> <ip> ` prefix the
driver adds.  The test_real_* tests run the installed server over pipes (result.err is
what it wrote on stderr): the prefix really is the connection's pid and client ip, the
pid is the one a plugin sees as its parent, multilog keeps the lines apart, and the
real process logs no credentials.
"""

import re
import subprocess

import pytest
from test_auth import CheckPw, auth, b64, cram_digest
from test_pipes import session

from qmail_smtpd_py.core import requests as rq

from helpers import SERVER, crlf, require_tools, run_smtp, script, server_env

RE_QP = re.compile(rb"250 ok \d+ qp (\d+)")


MAIL = b"MAIL FROM:<a@b.c>"
RCPT = b"RCPT TO:<u@example.com>"
MESSAGE = (b"DATA", b"Subject: t", b"", b"hi", b".")


def lines(err):
    return err.decode().splitlines()


def events(err, name):
    """The details of each `name` event of a real process, after `<pid> <ip> name `."""
    return [line.split(" ", 3)[3] if line.count(" ") >= 3 else ""
            for line in lines(err) if line.split(" ")[2:3] == [name]]


def core_events(err, name):
    """The details of each `name` event of an in-process session (lines without the
    `<pid> <ip> ` prefix), after `name `."""
    return [line.split(" ", 1)[1] if " " in line else ""
            for line in lines(err) if line.split(" ")[0] == name]


def checkpassword(data):
    """test_auth's fake checkpassword: joe/secret (or a CRAM-MD5 digest of "secret"),
    and any secret for a user starting with `anyone`."""
    fields = data.split(b"\0")
    user, secret = fields[0], fields[1]
    if user == b"joe":
        challenge = fields[2] if len(fields) > 3 else b""
        ok = secret == b"secret" or (challenge != b"" and secret == cram_digest(challenge))
    else:
        ok = user.startswith(b"anyone")
    return 0 if ok else 1


def auth_session(client, home, smtpauth="", env=None):
    """In-process: an AUTH session (SMTPAUTH, checkpassword /p/checkpw /bin/true)."""
    return session(client, home, env={"SMTPAUTH": smtpauth, **(env or {})},
                   args=("/p/checkpw", "/bin/true"), checkpassword=checkpassword)


# ------------------------------------------------------------------ the real log


def test_real_every_line_carries_the_connection_pid_and_client_ip(home):
    """The driver's prefix on the real stderr: the process's pid and TCPREMOTEIP."""
    result = run_smtp(crlf(b"HELO c", MAIL, RCPT, *MESSAGE, b"QUIT"), home=home,
                      env={"TCPREMOTEIP": "192.0.2.7", "TCPREMOTEPORT": "4711"})
    qp = RE_QP.search(result.out).group(1).decode()
    logged = lines(result.err)
    pids = {line.split(" ")[0] for line in logged}
    assert len(pids) == 1 and pids.pop().isdigit()
    assert {line.split(" ")[1] for line in logged} == {"192.0.2.7"}
    assert [line.split(" ", 2)[2] for line in logged] == [
        "connect host=unknown port=4711",
        "accept qp=%s bytes=15 from=<a@b.c> rcpts=1" % qp,
        "close status=0 why=quit messages=1",
    ]


def test_real_the_connection_id_is_the_pid_plugins_and_tcpserver_print(home):
    """Plugins log their parent's pid (spec spp.md §7): the same id (a real process tree)."""
    script(home, "who", 'echo "who: pid $PPID" >&2\n')
    home.control("smtpplugins", "[connection]\nplugins/who\n")
    result = run_smtp(crlf(b"QUIT"), home=home)
    first, plugin_line = lines(result.err)[:2]
    assert plugin_line == "who: pid %s" % first.split(" ")[0]


# ------------------------------------------------------------------ events


@pytest.mark.parametrize("client, reply, expected", [
    (crlf(b"RCPT TO:<u@example.com>"), b"503", "refuse RCPT 503 by=sequence"),
    (crlf(MAIL, b"RCPT TO:<u@elsewhere.org>"), b"553",
     "refuse RCPT 553 by=rcpthosts to=<u@elsewhere.org>"),
    (crlf(b"MAIL FROM:<spam@bad.example>", RCPT), b"553",
     "refuse RCPT 553 by=badmailfrom from=<spam@bad.example> to=<u@example.com>"),
    (crlf(b"MAIL FROM:<" + b"a" * 1100 + b">"), b"555", "refuse MAIL 555 by=syntax"),
    (crlf(b"BOGUS stuff"), b"502", "refuse BOGUS 502 by=unimplemented"),
    (crlf(b"X" * 70000), b"500", "refuse - 500 by=max-line"),
    (crlf(MAIL, RCPT, b"DATA", b"Received: x", b"Received: y", b"."), b"554",
     "refuse DATA 554 by=queue bytes=24 from=<a@b.c>"),
    (crlf(MAIL, RCPT, b"DATA", b"0123456789" * 20, b"."), b"552",
     "refuse DATA 552 by=databytes bytes=100 from=<a@b.c>"),
])
def test_each_refusal_names_its_code_and_check(make_home, client, reply, expected):
    home = make_home(control={"badmailfrom": "spam@bad.example\n", "databytes": "100\n"})
    queue_status = 0
    if b"Received: y" in client:  # a queue that refuses: qmail-queue's exit 31 -> 554
        home, queue_status = make_home(), 31
    result = session(client + crlf(b"QUIT"), home, queue_status=queue_status)
    assert b"\r\n" + reply in result.out
    assert core_events(result.err, "refuse") == [expected.split(" ", 1)[1]]


def test_plugin_refusals_name_the_plugin(make_home):
    home = make_home(control={"smtpplugins": "[helo]\nplugins/nohelo\n[mail]\nplugins/later\n"})
    result = session(crlf(b"HELO c", MAIL, RCPT, b"QUIT"), home,
                     plugins={b"plugins/nohelo": (b"E550 no thanks\n", 0),
                              b"plugins/later": (b"LR451 try later\n", 0)})
    assert b"550 no thanks\r\n" in result.out and b"451 try later\r\n" in result.out
    assert core_events(result.err, "refuse") == [
        "HELO 550 by=plugin plugin=plugins/nohelo",
        "RCPT 451 by=plugin-deferred plugin=plugins/later",
    ]


def test_a_plugin_that_disconnects_is_logged_as_the_reason(make_home):
    home = make_home(control={"smtpplugins": "[connection]\nplugins/bye\n"})
    result = session(b"", home, plugins={b"plugins/bye": (b"R421 go away\n", 0)})
    assert result.out == b"421 go away\r\n"
    assert core_events(result.err, "refuse") == ["CONNECT 421 by=plugin plugin=plugins/bye"]
    assert core_events(result.err, "close") == [
        "status=0 why=plugin plugin=plugins/bye messages=0"]


def test_extfork_refusals_name_the_program(home):
    program = "/p/nope"
    result = session(crlf(MAIL, RCPT, b"QUIT"), home, env={"SMTPEXTFORK": program},
                     programs={b"/p/nope": 100})
    assert b"\r\n554 " in result.out
    assert core_events(result.err, "refuse") == [
        "RCPT 554 by=extfork program=%s to=<u@example.com>" % program]
    assert core_events(result.err, "XF") == ["(100): %s" % program]


@pytest.mark.parametrize("client, why, status", [
    (b"", "eof", 1),
    (crlf(b"QUIT"), "quit", 0),
    (crlf(MAIL, RCPT, b"DATA", b"bare\nLF", b"."), "bare-lf", 1),
])
def test_close_says_why(home, client, why, status):
    result = session(client, home)
    assert result.status == status
    assert core_events(result.err, "close") == ["status=%d why=%s messages=0" % (status, why)]


def test_timeout_is_logged(home):
    result = session([b"HELO c\r\n", None], home)
    assert core_events(result.err, "close") == ["status=1 why=timeout messages=0"]


def test_client_bytes_cannot_forge_or_split_a_line(home):
    """Spaces, control bytes and 8-bit bytes in addresses become \\xNN: one word each."""
    result = session(crlf(MAIL, b"RCPT TO:<x y=z\x1b[0m\xff@elsewhere.org>", b"QUIT"), home,
                     env={"SMTPLOGLEVEL": "2"})
    assert (r"refuse RCPT 553 by=rcpthosts to=<x\x20y=z\x1b[0m\xff@elsewhere.org>"
            in result.err.decode())
    assert b"\x1b" not in result.err and b"\xff" not in result.err
    assert all(line.split(" ")[0] in {"connect", "command", "refuse", "close"}
               for line in lines(result.err))
    assert len(lines(result.err)) == 6  # connect, 3 commands, the refusal, close


def test_loglevel_0_logs_only_errors(home, tmp_path):
    result = session(crlf(MAIL, b"RCPT TO:<u@elsewhere.org>", RCPT, *MESSAGE, b"QUIT"), home,
                     env={"SMTPLOGLEVEL": "0"})
    assert RE_QP.search(result.out) and result.err == b""
    missing = str(tmp_path / "no-such-queue")
    result = session(crlf(MAIL, RCPT, *MESSAGE, b"QUIT"), home,
                     env={"SMTPLOGLEVEL": "0", "QMAILQUEUE": missing},
                     queue_start=rq.CannotStart(rq.EXEC, "No such file or directory"))
    assert lines(result.err) and all("unable to exec %s" % missing in line
                                     for line in lines(result.err))


def test_loglevel_2_adds_commands_and_3_the_replies_in_order(home):
    client = crlf(b"HELO c", MAIL, b"QUIT")
    two = lines(session(client, home, env={"SMTPLOGLEVEL": "2"}).err)
    assert two == ["connect host=unknown port=-", "command HELO c",
                   "command MAIL FROM:<a@b.c>", "command QUIT",
                   "close status=0 why=quit messages=0"]
    three = lines(session(client, home, env={"SMTPLOGLEVEL": "3"}).err)
    assert three == ["connect host=unknown port=-", "reply 220 mx.example.org ESMTP",
                     "command HELO c", "reply 250 mx.example.org",
                     "command MAIL FROM:<a@b.c>", "reply 250 ok", "command QUIT",
                     "reply 221 mx.example.org", "close status=0 why=quit messages=0"]


# ------------------------------------------------------------------ credentials


SECRET = b"Sup3r-s3cret"


def _auth_sessions():
    """(name, client bytes, every string that would give the secret away)."""
    # The fake checkpassword takes any password from "anyone...": no 5 s failure pause.
    plain = b64(b"\0anyone\0" + SECRET)
    login_user, login_pass = b64(b"anyone"), b64(SECRET)
    return [
        ("plain-initial", crlf(b"AUTH PLAIN " + plain), [plain]),
        ("plain-prompt", crlf(b"AUTH PLAIN", plain), [plain]),
        ("login", crlf(b"AUTH LOGIN", login_user, login_pass), [login_pass]),
        ("login-initial", crlf(b"AUTH LOGIN " + login_user, login_pass), [login_pass]),
        ("secret-as-mechanism", crlf(b"AUTH " + plain), [plain]),
        ("cram", crlf(b"AUTH CRAM-MD5", b64(b"anyone " + cram_digest(b"<1.2@x>", SECRET))), []),
    ]


@pytest.mark.parametrize("level", ["0", "1", "2", "3"])
def test_credentials_are_never_logged(home, level):
    for name, client, giveaways in _auth_sessions():
        result = auth_session(client + crlf(b"QUIT"), home, smtpauth="+cram",
                              env={"SMTPLOGLEVEL": level})
        assert result.status == 0, name
        for secret in [SECRET, b64(SECRET), *giveaways]:
            assert secret not in result.err, (name, level)


def test_real_process_logs_no_credentials(home):
    """All the real process and its children write on stderr (SMTPLOGLEVEL=3)."""
    # checkpassword's stdout is the log too
    ahome = home, CheckPw(home)
    for name, client, giveaways in _auth_sessions():
        result = auth(client + crlf(b"QUIT"), ahome, smtpauth="+cram",
                      env={"SMTPLOGLEVEL": "3"})
        assert result.status == 0 and result.err, name
        for secret in [SECRET, b64(SECRET), *giveaways]:
            assert secret not in result.err, name


def test_auth_success_and_failure_are_logged_with_the_user(home):
    good = auth_session(crlf(b"AUTH PLAIN " + b64(b"\0joe\0secret"), b"QUIT"), home)
    assert b"235 " in good.out
    assert core_events(good.err, "auth") == ["method=plain user=joe"]
    bad = auth_session(crlf(b"AUTH LOGIN", b64(b"joe"), b64(b"wrong"), b"QUIT"), home)
    assert b"535 " in bad.out
    assert core_events(bad.err, "refuse") == ["AUTH 535 by=checkpassword method=login user=joe"]


# ------------------------------------------------------------------ multilog


def test_real_multilog_keeps_one_line_per_event_for_grep(home, tmp_path):
    """The real multilog with timestamps: grep finds the accept line by the pid."""
    require_tools("multilog")
    logdir = tmp_path / "log"
    client = crlf(b"HELO c", MAIL, RCPT, *MESSAGE, b"QUIT")
    with subprocess.Popen(["multilog", "t", str(logdir)], stdin=subprocess.PIPE) as log:
        server = subprocess.run([SERVER], input=client, stdout=subprocess.PIPE,
                                stderr=log.stdin, env=server_env(home), cwd=home.root,
                                timeout=30)
        log.stdin.close()
    qp = RE_QP.search(server.stdout).group(1).decode()
    current = (logdir / "current").read_text().splitlines()
    assert all(line.startswith("@4000") for line in current)
    pid = current[0].split(" ")[1]
    grep = subprocess.run(["grep", " %s " % pid, str(logdir / "current")],
                          stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "accept qp=%s " % qp in grep and len(grep.splitlines()) == len(current) == 3

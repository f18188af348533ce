"""SMTP AUTH (Hoffmann 0.8.3 wire behaviour, ../shared/spec/qmail-smtpd.md §6.1 A1, plus
DECISIONS.md and spp.md §6) against the installed qmail-smtpd-py: SMTPAUTH modes and
the EHLO they produce, the LOGIN / PLAIN / CRAM-MD5 dialogues, the checkpassword
interface on fd 3 byte for byte, what success grants, RSET, the MAIL parameters, the
old HOSTNAME command line, the qmail-spp [auth] hook and FORCETLS.

The fake checkpassword (checkpw() below) accepts joe/secret, or a CRAM-MD5 digest of
"secret" over the challenge it was given, records what it read on fd 3, and execs its
subprogram on success like the real one.

A failed authentication costs a 5 s pause before the 535; every case that needs one is
run at the same time by the `failures` fixture, so the suite pays that pause once.
"""

import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import selectors
import signal
import smtplib
import subprocess
import sys
import time

import pytest

from helpers import (
    SERVER,
    EnvQueue,
    Home,
    norm,
    require_server,
    require_tools,
    run_smtp,
    script,
    server_env,
)


def crlf(*lines):
    return b"".join(line + b"\r\n" for line in lines)


def b64(data):
    return base64.b64encode(data)


GREETING = b"220 mx.example.org ESMTP\r\n"
BYE = b"221 mx.example.org\r\n"
OK = b"250 ok\r\n"
HELO = b"250 mx.example.org\r\n"
GO_AHEAD = b"354 go ahead\r\n"
ACCEPTED = b"250 ok <TIME> qp <PID>\r\n"
FLUSHED = b"250 flushed\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
MESSAGE = crlf(b"DATA", b"Subject: x", b"", b"hi", b".")

USER_PROMPT = b"334 VXNlcm5hbWU6\r\n"
PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6\r\n"
PLAIN_PROMPT = b"334 \r\n"
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
FAILED = b"535 authentication failed (#5.7.1)\r\n"
NOT_AVAILABLE = b"503 auth not available (#5.3.3)\r\n"
ALREADY = b"503 you're already authenticated (#5.5.0)\r\n"
DURING_MAIL = b"503 no auth during mail transaction (#5.5.0)\r\n"
UNIMPLEMENTED_TYPE = b"504 auth type unimplemented (#5.5.1)\r\n"
CANCELED = b"501 auth exchange canceled (#5.0.0)\r\n"
MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
CHILD_PROBLEM = b"454 oops, problem with child and I can't auth (#4.3.0)\r\n"
REQUIRED = b"530 Authorization required (#5.7.1) \r\n"
NO_TLS = b"538 auth not available without TLS (#5.3.3)\r\n"

LOGIN_JOE = crlf(b"AUTH LOGIN", b64(b"joe"), b64(b"secret"))
PLAIN_JOE = crlf(b"AUTH PLAIN " + b64(b"\0joe\0secret"))
LOGIN_DIALOGUE = USER_PROMPT + PASSWORD_PROMPT + AUTH_OK
RECEIVED_AUTH = (b"Received: from unknown (HELO c.test) (joe@127.0.0.1)\n"
                 b"  by mx.test with ESMTPA; <DATE>\n")
RECEIVED_PLAIN = (b"Received: from unknown (HELO c.test) (127.0.0.1)\n"
                  b"  by mx.test with SMTP; <DATE>\n")
RE_CHALLENGE = re.compile(rb"334 (PD[A-Za-z0-9+/=]+)\r\n")  # base64 of "<..."


def ehlo(auth_line=None, size=0):
    """The AUTH patch's EHLO reply."""
    return (b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
            + (b"250-" + auth_line + b"\r\n" if auth_line else b"")
            + b"250 SIZE %d\r\n" % size)


LOGIN_PLAIN = b"AUTH LOGIN PLAIN"
CRAM_ONLY = b"AUTH CRAM-MD5"
ALL_THREE = b"AUTH LOGIN PLAIN CRAM-MD5"


def cram_digest(challenge, secret=b"secret"):
    return hmac.new(secret, challenge, hashlib.md5).hexdigest().encode()


# ------------------------------------------------------------------ fakes

CHECKPW = r'''#!%(python)s -IS
# fake checkpassword written by t/test_auth.py
import hashlib, hmac, json, os, sys
RECORDS = %(records)r
data = b""
while True:
    try:
        chunk = os.read(3, 4096)
    except OSError:
        break
    if not chunk:
        break
    data += chunk
try:
    stdin = os.read(0, 4096).decode("latin-1")
except OSError as e:
    stdin = "<error %%d>" %% e.errno
n = 1
while True:
    try:
        fd = os.open(os.path.join(RECORDS, "%%d.fd3" %% n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        break
    except FileExistsError:
        n += 1
os.write(fd, data)
os.close(fd)
with open(os.path.join(RECORDS, "%%d.json" %% n), "w") as f:
    json.dump({"argv": sys.argv[1:], "stdin": stdin}, f)
os.write(1, b"checkpw-stdout-marker\n")
fields = data.split(b"\0")
user = fields[0]
secret = fields[1] if len(fields) > 1 else b""
challenge = fields[2] if len(fields) > 3 else b""
if user == b"joe":
    ok = secret == b"secret" or (challenge != b"" and hmac.compare_digest(
        secret, hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()))
else:
    ok = user.startswith(b"anyone")  # any secret: to look at fd 3 only
if not ok:
    sys.exit(1)
if len(sys.argv) > 1:
    os.execv(sys.argv[1], sys.argv[1:])
sys.exit(0)
'''


class CheckPw:
    """The fake checkpassword of one qmail home: .path, and .calls() -> list of
    (fd 3 bytes, {"argv": subprogram argv, "stdin": what stdin gave})."""

    def __init__(self, home):
        self.records = os.path.join(home.root, "checkpw-records")
        os.makedirs(self.records, exist_ok=True)
        self.path = os.path.join(home.path, "plugins", "checkpw")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            f.write(CHECKPW % {"python": sys.executable, "records": self.records})
        os.chmod(self.path, 0o755)

    def calls(self):
        out = []
        numbers = sorted(int(n.split(".")[0]) for n in os.listdir(self.records)
                         if n.endswith(".json"))
        for n in numbers:
            with open(os.path.join(self.records, "%d.fd3" % n), "rb") as f:
                fd3 = f.read()
            with open(os.path.join(self.records, "%d.json" % n)) as f:
                out.append((fd3, json.load(f)))
        return out

    def fd3(self):
        return [fd3 for fd3, _ in self.calls()]


def make_auth_home(root, control=None):
    home = Home(root, control=control)
    return home, CheckPw(home)


@pytest.fixture
def ahome(home):
    """(home, checkpw): the default qmail home with the fake checkpassword."""
    return home, CheckPw(home)


def auth(input_bytes, ahome, smtpauth="", args=None, env=None, **kw):
    """run_smtp with SMTPAUTH (None: unset) and the checkpassword command line
    (default: checkpw /bin/true)."""
    home, checkpw = ahome
    e = {"SMTPAUTH": smtpauth}
    e.update(env or {})
    if args is None:
        args = [checkpw.path, "/bin/true"]
    return run_smtp(input_bytes, env=e, home=home, args=args, **kw)


def auth_plugin(home, body="", name="authplug"):
    """An [auth] qmail-spp plugin that appends "$SMTPAUTHUSER $SMTPAUTHMETHOD" to
    home/auth-hook, then runs BODY; control/smtpplugins lists it."""
    log = os.path.join(home.root, "auth-hook")
    path = script(home, name, 'echo "$SMTPAUTHUSER $SMTPAUTHMETHOD" >> "%s"\n%s' % (log, body))
    home.control("smtpplugins", "[auth]\n%s\n" % path)

    def calls():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return f.read().splitlines()

    return calls


class Conversation:
    """The installed server over pipes, one command at a time (CRAM-MD5 needs the
    challenge before the answer can be computed)."""

    def __init__(self, home, env=None, args=(), timeout=20):
        require_server()
        self.timeout = timeout
        self.err_path = os.path.join(home.root, "conversation-%d.err" % time.monotonic_ns())
        with open(self.err_path, "wb") as err:
            self.p = subprocess.Popen([SERVER, *args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=err,
                                      env=server_env(home, env), cwd=home.root,
                                      start_new_session=True)
        self.buf = b""
        self.transcript = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()

    def kill(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass

    def send(self, line):
        self.p.stdin.write(line + b"\r\n")
        self.p.stdin.flush()

    def reply(self):
        """The next complete reply (all its lines)."""
        deadline = time.monotonic() + self.timeout
        fd = self.p.stdout.fileno()
        while True:
            pos = 0
            while True:
                end = self.buf.find(b"\r\n", pos)
                if end < 0:
                    break
                if end - pos < 4 or self.buf[pos + 3:pos + 4] == b" ":
                    reply, self.buf = self.buf[:end + 2], self.buf[end + 2:]
                    self.transcript += reply
                    return reply
                pos = end + 2
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no complete reply; got %r" % self.buf)
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(left):
                    continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("server closed the connection; got %r" % self.buf)
            self.buf += chunk

    def command(self, line):
        self.send(line)
        return self.reply()

    def finish(self):
        """Close stdin; returns (rest of stdout, exit status, stderr)."""
        self.p.stdin.close()
        rest = self.buf + self.p.stdout.read()
        status = self.p.wait(self.timeout)
        with open(self.err_path, "rb") as f:
            return rest, status, f.read()


def cram_login(conv, user=b"joe", secret=b"secret"):
    """AUTH CRAM-MD5 with a real HMAC-MD5 digest; returns (challenge, digest, reply)."""
    first = conv.command(b"AUTH CRAM-MD5")
    m = RE_CHALLENGE.fullmatch(first)
    assert m, first
    challenge = base64.b64decode(m.group(1), validate=True)
    digest = cram_digest(challenge, secret)
    return challenge, digest, conv.command(b64(user + b" " + digest))


# ------------------------------------------------------------------ modes and EHLO


MODES = [
    # SMTPAUTH, EHLO AUTH line, AUTH required
    (None, None, False),        # unset: AUTH off even with a checkpassword command line
    ("-", None, False),
    ("", LOGIN_PLAIN, False),
    ("!", LOGIN_PLAIN, True),
    ("cram", CRAM_ONLY, False),
    ("+cram", ALL_THREE, False),
    ("!cram", CRAM_ONLY, True),
    ("!+cram", ALL_THREE, True),
    ("yes", LOGIN_PLAIN, False),
    ("0", LOGIN_PLAIN, False),
    ("!foo", LOGIN_PLAIN, False),
    ("!!", LOGIN_PLAIN, False),
    ("--", LOGIN_PLAIN, False),
    ("-cram", LOGIN_PLAIN, False),
    ("+cra", LOGIN_PLAIN, False),
    ("x+cram", LOGIN_PLAIN, False),
    (" cram", LOGIN_PLAIN, False),
    ("CRAM", CRAM_ONLY, False),
    ("Cram-MD5", CRAM_ONLY, False),
    ("cramfoo", CRAM_ONLY, False),
    ("+CRAMfoo", ALL_THREE, False),
    ("!CRAM", CRAM_ONLY, True),
    ("!cram!", CRAM_ONLY, True),
    ("!+Cram-md5", ALL_THREE, True),
]


@pytest.mark.parametrize("smtpauth, auth_line, required", MODES)
def test_smtpauth_modes(ahome, smtpauth, auth_line, required):
    """EHLO lines, whether AUTH is available (an unknown mechanism shows it: 504 when
    on, 503 when off) and whether MAIL needs AUTH first."""
    out, status, _ = auth(crlf(b"EHLO c.test", b"AUTH NOSUCH", b"MAIL FROM:<a@b.c>", b"QUIT"),
                          ahome, smtpauth)
    assert out == (GREETING + ehlo(auth_line)
                   + (UNIMPLEMENTED_TYPE if auth_line else NOT_AVAILABLE)
                   + (REQUIRED if required else OK) + BYE)
    assert status == 0
    assert ahome[1].calls() == []


@pytest.mark.parametrize("smtpauth", [None, "-"])
def test_disabled_modes_refuse_every_mechanism(ahome, smtpauth):
    out, _, _ = auth(crlf(b"AUTH LOGIN") + PLAIN_JOE + crlf(b"AUTH CRAM-MD5", b"QUIT"),
                     ahome, smtpauth)
    assert out == GREETING + NOT_AVAILABLE * 3 + BYE
    assert ahome[1].calls() == []


@pytest.mark.parametrize("control, env, size", [
    ({}, {"DATABYTES": "12345"}, 12345),
    ({"databytes": "777\n"}, {}, 777),
    ({"databytes": "777\n"}, {"DATABYTES": "99"}, 99),
    ({}, {"DATABYTES": "4294967295"}, 4294967294),
])
def test_ehlo_size_is_databytes(make_home, control, env, size):
    home = make_home(control=control)
    out, _, _ = auth(crlf(b"EHLO c.test", b"QUIT"), (home, CheckPw(home)), "", env=env)
    assert out == GREETING + ehlo(LOGIN_PLAIN, size) + BYE


def test_no_arguments_and_no_smtpauth_is_plain_notqmail(home):
    """No AUTH, no SIZE line, and MAIL parameters ignored (DECISIONS.md)."""
    out, _, queued = run_smtp(
        crlf(b"EHLO c.test", b"AUTH LOGIN", b"MAIL FROM:<a@b.c> SIZE=99999 AUTH=joe",
             b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
        home=home, env={"DATABYTES": "100"})
    assert norm(out) == (GREETING
                         + b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                         + b"502 unimplemented (#5.5.1)\r\n" + OK + OK + GO_AHEAD + ACCEPTED
                         + BYE)
    assert norm(queued[0].received) == RECEIVED_PLAIN


def test_smtpauth_without_checkpassword_is_503(ahome):
    """SMTPAUTH set but no command line: the patch's EHLO, and AUTH not available."""
    out, _, _ = auth(crlf(b"EHLO c.test", b"AUTH LOGIN") + PLAIN_JOE + crlf(b"QUIT"),
                     ahome, "", args=[])
    assert out == GREETING + ehlo(LOGIN_PLAIN) + NOT_AVAILABLE * 2 + BYE


# ------------------------------------------------------------------ LOGIN and PLAIN


def test_login_with_prompts_then_relaying(ahome):
    home, checkpw = ahome
    out, status, queued = auth(
        crlf(b"EHLO c.test") + LOGIN_JOE
        + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE + crlf(b"QUIT"),
        ahome)
    assert norm(out) == (GREETING + ehlo(LOGIN_PLAIN) + LOGIN_DIALOGUE + OK + OK + GO_AHEAD
                         + ACCEPTED + BYE)
    assert status == 0
    assert checkpw.fd3() == [b"joe\0secret\0"]
    (msg,) = queued
    assert msg.envelope == b"Fa@b.c\0Tx@elsewhere.org\0\0"
    assert norm(msg.received) == RECEIVED_AUTH


def test_login_with_initial_response(ahome):
    out, _, _ = auth(crlf(b"AUTH LOGIN " + b64(b"joe"), b64(b"secret"), b"QUIT"), ahome)
    assert out == GREETING + PASSWORD_PROMPT + AUTH_OK + BYE
    assert ahome[1].fd3() == [b"joe\0secret\0"]


def test_mechanism_name_is_case_insensitive(ahome):
    out, _, _ = auth(crlf(b"auth LoGiN", b64(b"joe"), b64(b"secret"), b"QUIT"), ahome)
    assert out == GREETING + LOGIN_DIALOGUE + BYE


def test_plain_with_prompt(ahome):
    out, _, _ = auth(crlf(b"AUTH PLAIN", b64(b"\0joe\0secret"), b"QUIT"), ahome)
    assert out == GREETING + PLAIN_PROMPT + AUTH_OK + BYE
    assert ahome[1].fd3() == [b"joe\0secret\0"]


def test_plain_with_initial_response(ahome):
    out, _, _ = auth(PLAIN_JOE + crlf(b"QUIT"), ahome)
    assert out == GREETING + AUTH_OK + BYE
    assert ahome[1].fd3() == [b"joe\0secret\0"]


def test_plain_authzid_is_ignored(ahome):
    out, _, _ = auth(crlf(b"AUTH PLAIN " + b64(b"admin\0joe\0secret"), b"QUIT"), ahome)
    assert out == GREETING + AUTH_OK + BYE
    assert ahome[1].fd3() == [b"joe\0secret\0"]


@pytest.mark.parametrize("smtpauth, mechanism", [
    ("+cram", LOGIN_JOE), ("!+cram", LOGIN_JOE), ("cram", PLAIN_JOE), ("!cram", PLAIN_JOE),
    ("+CRAM", PLAIN_JOE),
])
def test_fd3_has_an_empty_challenge_when_cram_is_enabled(ahome, smtpauth, mechanism):
    """LOGIN/PLAIN pass user\\0password\\0 plus an empty challenge \\0 when SMTPAUTH
    enables CRAM-MD5 (every mechanism is accepted whatever SMTPAUTH advertises)."""
    out, _, _ = auth(mechanism + crlf(b"QUIT"), ahome, smtpauth)
    assert out.endswith(AUTH_OK + BYE)
    assert ahome[1].fd3() == [b"joe\0secret\0\0"]


@pytest.mark.parametrize("smtpauth", ["", "!", "yes"])
def test_fd3_has_no_challenge_without_cram(ahome, smtpauth):
    out, _, _ = auth(LOGIN_JOE + crlf(b"QUIT"), ahome, smtpauth)
    assert out.endswith(AUTH_OK + BYE)
    assert ahome[1].fd3() == [b"joe\0secret\0"]


def test_checkpassword_gets_its_subprogram_dev_null_stdin_and_the_log_as_stdout(ahome):
    home, checkpw = ahome
    marker = os.path.join(home.root, "subprogram-ran")
    result = auth(crlf(b"NOOP") + LOGIN_JOE + crlf(b"NOOP", b"QUIT"), ahome,
                  args=[checkpw.path, "/bin/sh", "-c", 'echo "$0 $1" > "%s"' % marker,
                        "arg0", "arg1"])
    assert result.out == GREETING + OK + LOGIN_DIALOGUE + OK + BYE
    ((fd3, info),) = checkpw.calls()
    assert info == {"argv": ["/bin/sh", "-c", 'echo "$0 $1" > "%s"' % marker, "arg0", "arg1"],
                    "stdin": ""}
    with open(marker) as f:
        assert f.read() == "arg0 arg1\n"
    assert b"checkpw-stdout-marker" in result.err


def test_checkpassword_found_on_path(ahome):
    """The command line is run like execvp: a bare name is looked up in PATH. (Only
    in the old form: a first argument that is not an absolute path is the HOSTNAME.)"""
    home, checkpw = ahome
    out, _, _ = auth(LOGIN_JOE + crlf(b"QUIT"), ahome,
                     args=["mail.host.example", "checkpw", "/bin/true"],
                     env={"PATH": os.path.dirname(checkpw.path) + ":/usr/bin:/bin"})
    assert out == GREETING + LOGIN_DIALOGUE + BYE
    assert checkpw.fd3() == [b"joe\0secret\0"]


# ------------------------------------------------------------------ CRAM-MD5


@pytest.mark.parametrize("smtpauth", ["cram", "+cram", "!cram", "!+cram"])
def test_cram_md5_with_a_real_digest(ahome, smtpauth):
    home, checkpw = ahome
    with Conversation(home, env={"SMTPAUTH": smtpauth}, args=[checkpw.path, "/bin/true"]) as c:
        assert c.reply() == GREETING
        start = int(time.time())
        challenge, digest, reply = cram_login(c)
        assert reply == AUTH_OK
        assert c.command(b"MAIL FROM:<a@b.c>") == OK
        assert c.command(b"RCPT TO:<x@elsewhere.org>") == OK
        pid = c.p.pid
        rest, status, _ = c.finish()
    m = re.fullmatch(rb"<(\d+)\.(\d+)@mx\.test>", challenge)
    assert m, challenge
    assert int(m.group(1)) == pid
    assert start - 5 <= int(m.group(2)) <= time.time() + 5
    assert checkpw.fd3() == [b"joe\0" + digest + b"\0" + challenge + b"\0"]
    assert (rest, status) == (b"", 1)


def test_cram_md5_accepted_but_no_challenge_on_fd3_without_cram_mode(ahome):
    """CRAM-MD5 works although SMTPAUTH only advertises LOGIN PLAIN, and then fd 3
    carries no challenge (the fake accepts user `anyone` without checking)."""
    home, checkpw = ahome
    with Conversation(home, env={"SMTPAUTH": ""}, args=[checkpw.path, "/bin/true"]) as c:
        assert c.reply() == GREETING
        challenge, digest, reply = cram_login(c, user=b"anyone")
        assert reply == AUTH_OK
        c.finish()
    assert re.fullmatch(rb"<\d+\.\d+@mx\.test>", challenge)
    assert checkpw.fd3() == [b"anyone\0" + digest + b"\0"]


@pytest.mark.parametrize("env, host", [
    ({}, b"mx.test"),
    ({"TCPLOCALHOST": None}, b"127.0.0.1"),
    ({"TCPLOCALHOST": None, "TCPLOCALIP": None}, b"unknown"),
])
def test_cram_challenge_host(ahome, env, host):
    out, _, _ = auth(crlf(b"AUTH CRAM-MD5", b"*", b"QUIT"), ahome, "cram", env=env)
    m = RE_CHALLENGE.search(out)
    assert out == GREETING + m.group(0) + CANCELED + BYE
    assert re.fullmatch(rb"<\d+\.\d+@" + re.escape(host) + rb">", base64.b64decode(m.group(1)))


def test_old_hostname_form_puts_the_host_in_the_challenge(ahome):
    """`qmail-smtpd-py HOSTNAME /path/checkpassword subprogram` (A3 command line)."""
    home, checkpw = ahome
    args = ["mail.host.example", checkpw.path, "/bin/true"]
    with Conversation(home, env={"SMTPAUTH": "+cram"}, args=args) as c:
        assert c.reply() == GREETING
        challenge, digest, reply = cram_login(c)
        assert reply == AUTH_OK
        c.finish()
    assert re.fullmatch(rb"<\d+\.\d+@mail\.host\.example>", challenge)
    assert checkpw.fd3() == [b"joe\0" + digest + b"\0" + challenge + b"\0"]


def test_old_hostname_form_login(ahome):
    home, checkpw = ahome
    out, _, _ = auth(crlf(b"EHLO c.test") + LOGIN_JOE + crlf(b"QUIT"), ahome, "",
                     args=["mail.host.example", checkpw.path, "/bin/true"])
    assert out == GREETING + ehlo(LOGIN_PLAIN) + LOGIN_DIALOGUE + BYE
    assert checkpw.fd3() == [b"joe\0secret\0"]


def test_cram_response_is_split_at_the_last_space(ahome):
    """0.8.3 takes everything before the last space as the user name (the fake
    accepts users starting with `anyone` whatever the digest)."""
    out, _, _ = auth(crlf(b"AUTH CRAM-MD5", b64(b"anyone else " + b"0" * 32), b"QUIT"), ahome)
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", out) == GREETING + b"334 <C>\r\n" + AUTH_OK + BYE
    assert ahome[1].fd3() == [b"anyone else\0" + b"0" * 32 + b"\0"]


def test_cram_response_without_a_space_is_malformed(ahome):
    out, _, _ = auth(crlf(b"AUTH CRAM-MD5", b64(b"joe" + b"0" * 32), b"QUIT"), ahome, "cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", out) == GREETING + b"334 <C>\r\n" + MALFORMED + BYE
    assert ahome[1].calls() == []


# ------------------------------------------------------------------ cancel and bad input


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH LOGIN", b"*"), USER_PROMPT),
    (crlf(b"AUTH LOGIN", b64(b"joe"), b"*"), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH LOGIN " + b64(b"joe"), b"*"), PASSWORD_PROMPT),
    (crlf(b"AUTH PLAIN", b"*"), PLAIN_PROMPT),
    (crlf(b"AUTH CRAM-MD5", b"*"), b"334 <C>\r\n"),
])
def test_star_cancels(ahome, dialogue, prompts):
    """`*` cancels: 501, checkpassword never runs, the session is not authenticated."""
    out, status, _ = auth(dialogue + crlf(b"NOOP", b"MAIL FROM:<a@b.c>",
                                          b"RCPT TO:<x@elsewhere.org>", b"QUIT"), ahome, "+cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", out) == (GREETING + prompts + CANCELED + OK + OK
                                                     + NOGATEWAY + BYE)
    assert status == 0
    assert ahome[1].calls() == []


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH LOGIN", b""), USER_PROMPT),
    (crlf(b"AUTH LOGIN", b64(b"joe"), b""), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH PLAIN", b""), PLAIN_PROMPT),
    (crlf(b"AUTH CRAM-MD5", b""), b"334 <C>\r\n"),
    (b"AUTH LOGIN\r\n\n", USER_PROMPT),  # a bare LF ends the (empty) line too
])
def test_empty_response_is_malformed(ahome, dialogue, prompts):
    out, _, _ = auth(dialogue + crlf(b"NOOP", b"QUIT"), ahome, "+cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", out) == GREETING + prompts + MALFORMED + OK + BYE
    assert ahome[1].calls() == []


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH PLAIN " + b64(b"\0joe")), b""),                    # no password
    (crlf(b"AUTH PLAIN " + b64(b"\0joe\0")), b""),                  # empty password
    (crlf(b"AUTH PLAIN " + b64(b"joe\0secret")), b""),              # no authzid NUL
    (crlf(b"AUTH PLAIN " + b64(b"\0\0secret")), b""),               # empty user
    (crlf(b"AUTH PLAIN", b64(b"joe")), PLAIN_PROMPT),
    (crlf(b"AUTH LOGIN", b"====", b64(b"secret")), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH LOGIN " + b64(b"joe"), b"===="), PASSWORD_PROMPT),
])
def test_missing_user_or_password_is_malformed(ahome, dialogue, prompts):
    out, _, _ = auth(dialogue + crlf(b"NOOP", b"QUIT"), ahome)
    assert out == GREETING + prompts + MALFORMED + OK + BYE
    assert ahome[1].calls() == []


@pytest.mark.parametrize("line", [b"AUTH", b"AUTH DIGEST-MD5", b"AUTH LOGINX", b"AUTH XOAUTH2 abc",
                                  b"AUTH CRAM-MD5X"])
def test_unknown_mechanism_is_504(ahome, line):
    out, _, _ = auth(crlf(line, b"NOOP", b"QUIT"), ahome, "+cram")
    assert out == GREETING + UNIMPLEMENTED_TYPE + OK + BYE


def test_auth_twice(ahome):
    out, _, _ = auth(PLAIN_JOE + LOGIN_JOE + crlf(b"QUIT"), ahome)
    # the second AUTH is refused at once; its two answer lines are then unknown verbs
    assert out == (GREETING + AUTH_OK + ALREADY + b"502 unimplemented (#5.5.1)\r\n" * 2 + BYE)
    assert len(ahome[1].calls()) == 1


def test_auth_during_a_transaction(ahome):
    out, _, queued = auth(
        crlf(b"MAIL FROM:<a@b.c>") + PLAIN_JOE + crlf(b"RCPT TO:<x@elsewhere.org>", b"RSET")
        + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
        + crlf(b"QUIT"), ahome)
    assert norm(out) == (GREETING + OK + DURING_MAIL + NOGATEWAY + FLUSHED + AUTH_OK + OK + OK
                         + GO_AHEAD + ACCEPTED + BYE)
    assert len(ahome[1].calls()) == 1
    assert queued[0].recipients == [b"x@elsewhere.org"]


def test_auth_after_a_delivered_message_is_allowed(ahome):
    out, _, _ = auth(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE
                     + PLAIN_JOE + crlf(b"QUIT"), ahome)
    assert norm(out) == GREETING + OK + OK + GO_AHEAD + ACCEPTED + AUTH_OK + BYE


def test_checkpassword_killed_is_454(ahome):
    home, checkpw = ahome
    result = auth(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"RSET")
                  + PLAIN_JOE + crlf(b"QUIT"),
                  ahome, args=[checkpw.path, "/bin/sh", "-c", "kill -KILL $$"])
    assert result.out == GREETING + CHILD_PROBLEM + OK + NOGATEWAY + FLUSHED + CHILD_PROBLEM + BYE
    assert result.status == 0
    assert checkpw.fd3() == [b"joe\0secret\0"] * 2


# ------------------------------------------------------------------ required modes, RSET


def test_required_mode_530_then_auth_then_rset(ahome):
    out, _, queued = auth(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + LOGIN_JOE
        + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
        + crlf(b"MAIL FROM:<a@b.c>", b"RSET", b"MAIL FROM:<a@b.c>")
        + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"QUIT"),
        ahome, "!")
    assert norm(out) == (GREETING + REQUIRED + b"503 MAIL first (#5.5.1)\r\n" + LOGIN_DIALOGUE
                         + OK + OK + GO_AHEAD + ACCEPTED
                         + OK + FLUSHED + REQUIRED
                         + AUTH_OK + OK + BYE)
    assert REQUIRED.endswith(b") \r\n")
    assert len(queued) == 1
    assert len(ahome[1].calls()) == 2


def test_rset_forgets_authenticated_but_relaying_stays(ahome):
    out, _, queued = auth(
        PLAIN_JOE + crlf(b"RSET", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>")
        + MESSAGE + crlf(b"RSET") + LOGIN_JOE + crlf(b"QUIT"),
        ahome)
    # after RSET AUTH is allowed again (no "already authenticated")
    assert norm(out) == (GREETING + AUTH_OK + FLUSHED + OK + OK + GO_AHEAD + ACCEPTED + FLUSHED
                         + LOGIN_DIALOGUE + BYE)
    (msg,) = queued
    assert msg.recipients == [b"x@elsewhere.org"]
    assert norm(msg.received) == (b"Received: from unknown (joe@127.0.0.1)\n"
                                  b"  by mx.test with ESMTPA; <DATE>\n")


# ------------------------------------------------------------------ what success grants


def test_success_exports_tcpremoteinfo_and_relayclient_to_qmail_queue(ahome):
    home, _ = ahome
    queue = EnvQueue(home)
    out, _, queued = auth(
        crlf(b"EHLO c.test") + PLAIN_JOE
        + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@other.org>") + MESSAGE + crlf(b"QUIT"),
        ahome, env={"QMAILQUEUE": queue.path})
    assert norm(out) == (GREETING + ehlo(LOGIN_PLAIN) + AUTH_OK + OK + OK + GO_AHEAD + ACCEPTED
                         + BYE)
    env = queue.text()
    assert env["TCPREMOTEINFO"] == "joe"
    assert env["RELAYCLIENT"] == ""
    assert norm(queued[0].received) == RECEIVED_AUTH


def test_no_export_before_auth(ahome):
    home, _ = ahome
    queue = EnvQueue(home)
    out, _, queued = auth(crlf(b"HELO c.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>")
                          + MESSAGE + crlf(b"QUIT"), ahome, env={"QMAILQUEUE": queue.path})
    assert norm(out) == GREETING + HELO + OK + OK + GO_AHEAD + ACCEPTED + BYE
    env = queue.text()
    assert "TCPREMOTEINFO" not in env
    assert "RELAYCLIENT" not in env
    assert norm(queued[0].received) == RECEIVED_PLAIN


def test_auth_replaces_a_relayclient_suffix(ahome):
    """Success sets RELAYCLIENT to empty: recipients no longer get the old suffix."""
    out, _, queued = auth(
        crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
        + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<y@elsewhere.org>") + MESSAGE
        + crlf(b"QUIT"),
        ahome, env={"RELAYCLIENT": "+rc"})
    assert norm(out) == (GREETING + OK + OK + GO_AHEAD + ACCEPTED + AUTH_OK + OK + OK + GO_AHEAD
                         + ACCEPTED + BYE)
    assert [m.recipients for m in queued] == [[b"x@elsewhere.org+rc"], [b"y@elsewhere.org"]]


def test_auth_replaces_an_ident_remoteinfo(ahome):
    out, _, queued = auth(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>")
                          + MESSAGE + crlf(b"QUIT"), ahome, env={"TCPREMOTEINFO": "identuser"})
    assert norm(out).endswith(ACCEPTED + BYE)
    assert b"(joe@127.0.0.1)" in queued[0].received


# ------------------------------------------------------------------ MAIL parameters


def test_mail_size_over_databytes_is_552_and_keeps_the_transaction(ahome):
    out, _, queued = auth(
        crlf(b"MAIL FROM:<a@b.c> SIZE=1000", b"RCPT TO:<u@example.com>",
             b"MAIL FROM:<z@b.c> SIZE=1001", b"MAIL FROM:<z@b.c> BODY=8BITMIME size=5000",
             b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
        ahome, env={"DATABYTES": "1000"})
    assert norm(out) == (GREETING + OK + OK + TOO_BIG + TOO_BIG + OK + GO_AHEAD + ACCEPTED
                         + BYE)
    assert [m.envelope for m in queued] == [b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"]


def test_mail_size_first_transaction_refused(ahome):
    out, _, _ = auth(crlf(b"MAIL FROM:<a@b.c> SIZE=5000", b"RCPT TO:<u@example.com>", b"QUIT"),
                     ahome, env={"DATABYTES": "1000"})
    assert out == GREETING + TOO_BIG + b"503 MAIL first (#5.5.1)\r\n" + BYE


def test_mail_size_without_databytes_is_not_limited(ahome):
    out, _, _ = auth(crlf(b"MAIL FROM:<a@b.c> SIZE=999999999999", b"QUIT"), ahome)
    assert out == GREETING + OK + BYE


def test_mail_size_needs_a_closing_angle_bracket(ahome):
    """The patch parses parameters only when the argument has a '>' (past byte 4)."""
    out, _, _ = auth(crlf(b"MAIL FROM:a@b.c SIZE=5000", b"QUIT"), ahome,
                     env={"DATABYTES": "1000"})
    assert out == GREETING + OK + BYE


@pytest.mark.parametrize("param, info", [
    (b"AUTH=x+2By+3Dz+41", b"x+y=z41"),
    (b"AUTH=<>", b"unknown"),
    (b"auth=someone", b"someone"),
])
def test_mail_auth_parameter_becomes_remoteinfo(ahome, param, info):
    home, _ = ahome
    queue = EnvQueue(home)
    out, _, queued = auth(
        crlf(b"HELO c.test", b"MAIL FROM:<a@b.c> " + param, b"RCPT TO:<u@example.com>")
        + MESSAGE + crlf(b"QUIT"), ahome, env={"QMAILQUEUE": queue.path})
    assert norm(out) == GREETING + HELO + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert norm(queued[0].received) == (b"Received: from unknown (HELO c.test) ("
                                        + info + b"@127.0.0.1)\n"
                                        b"  by mx.test with SMTP; <DATE>\n")
    assert queue.text()["TCPREMOTEINFO"] == info.decode()


def test_mail_auth_parameter_does_not_override_auth_or_ident(ahome):
    out, _, queued = auth(
        PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c> AUTH=mallory", b"RCPT TO:<u@example.com>")
        + MESSAGE + crlf(b"QUIT"), ahome)
    assert norm(out).endswith(ACCEPTED + BYE)
    assert b"(joe@127.0.0.1)" in queued[0].received
    out, _, queued = auth(
        crlf(b"MAIL FROM:<a@b.c> AUTH=mallory", b"RCPT TO:<u@example.com>") + MESSAGE
        + crlf(b"QUIT"), ahome, env={"TCPREMOTEINFO": "ident"})
    assert b"(ident@127.0.0.1)" in queued[0].received


# ------------------------------------------------------------------ secrets and the log


def test_credentials_not_in_the_log_on_success(ahome):
    result = auth(LOGIN_JOE + PLAIN_JOE + crlf(b"QUIT"), ahome)
    assert result.out == GREETING + LOGIN_DIALOGUE + ALREADY + BYE
    for secret in (b"secret", b64(b"secret"), b64(b"\0joe\0secret")):
        assert secret not in result.err


# ------------------------------------------------------------------ qmail-spp [auth]


@pytest.mark.parametrize("dialogue, method", [
    (LOGIN_JOE, "login"),
    (crlf(b"auth login " + b64(b"joe"), b64(b"secret")), "login"),
    (PLAIN_JOE, "plain"),
    (crlf(b"AUTH pLaIn", b64(b"\0joe\0secret")), "plain"),
])
def test_auth_plugin_sees_user_and_method(ahome, dialogue, method):
    home, _ = ahome
    calls = auth_plugin(home)
    out, _, _ = auth(dialogue + crlf(b"QUIT"), ahome)
    assert out.endswith(AUTH_OK + BYE)
    assert calls() == ["joe " + method]


def test_auth_plugin_sees_cram_md5(ahome):
    home, checkpw = ahome
    calls = auth_plugin(home)
    with Conversation(home, env={"SMTPAUTH": "cram"}, args=[checkpw.path, "/bin/true"]) as c:
        assert c.reply() == GREETING
        _, _, reply = cram_login(c)
        assert reply == AUTH_OK
        c.finish()
    assert calls() == ["joe cram-md5"]


def test_auth_variables_reach_later_plugins(ahome):
    home, _ = ahome
    log = os.path.join(home.root, "mail-hook")
    mail = script(home, "mailplug", 'echo "[$SMTPAUTHUSER][$SMTPAUTHMETHOD]" >> "%s"\n' % log)
    home.control("smtpplugins", "[mail]\n%s\n" % mail)
    out, _, _ = auth(crlf(b"MAIL FROM:<a@b.c>", b"RSET") + PLAIN_JOE
                     + crlf(b"MAIL FROM:<a@b.c>", b"QUIT"), ahome)
    assert out == GREETING + OK + FLUSHED + AUTH_OK + OK + BYE
    with open(log) as f:
        assert f.read() == "[][]\n[joe][plain]\n"


def test_auth_plugin_rejecting_leaves_the_session_unauthenticated(ahome):
    """E in [auth]: the plugin's text instead of 235, no relaying, no ESMTPA; the
    client may AUTH again (here the plugin lets the second attempt through)."""
    home, _ = ahome
    queue = EnvQueue(home)
    once = os.path.join(home.root, "rejected-once")
    calls = auth_plugin(home, '[ -e "%s" ] && exit 0\ntouch "%s"\necho "E535 5.7.0 not you"\n'
                        % (once, once))
    out, _, queued = auth(
        PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>",
                         b"RCPT TO:<u@example.com>") + MESSAGE
        + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
        + crlf(b"QUIT"),
        ahome, env={"QMAILQUEUE": queue.path})
    assert norm(out) == (GREETING + b"535 5.7.0 not you\r\n" + OK + NOGATEWAY + OK + GO_AHEAD
                         + ACCEPTED + AUTH_OK + OK + OK + GO_AHEAD + ACCEPTED + BYE)
    assert calls() == ["joe plain", "joe plain"]
    first, second = queued
    assert norm(first.received) == (b"Received: from unknown (127.0.0.1)\n"
                                    b"  by mx.test with SMTP; <DATE>\n")
    assert norm(second.received) == (b"Received: from unknown (joe@127.0.0.1)\n"
                                      b"  by mx.test with ESMTPA; <DATE>\n")
    assert second.recipients == [b"x@elsewhere.org"]


def test_auth_plugin_not_run_on_cancel_or_bad_input(ahome):
    home, _ = ahome
    calls = auth_plugin(home)
    out, _, _ = auth(crlf(b"AUTH LOGIN", b"*", b"AUTH PLAIN", b"", b"AUTH NOSUCH", b"QUIT"),
                     ahome)
    assert out == (GREETING + USER_PROMPT + CANCELED + PLAIN_PROMPT + MALFORMED
                   + UNIMPLEMENTED_TYPE + BYE)
    assert calls() == []


# ------------------------------------------------------------------ FORCETLS


@pytest.mark.parametrize("smtpauth, auth_line", [("", LOGIN_PLAIN), ("+cram", ALL_THREE)])
def test_forcetls_hides_and_refuses_auth_before_tls(ahome, smtpauth, auth_line):
    out, _, _ = auth(crlf(b"EHLO c.test") + LOGIN_JOE + PLAIN_JOE
                     + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
                     ahome, smtpauth, env={"FORCETLS": "1"})
    # the two LOGIN answer lines are then unknown verbs
    assert out == (GREETING + ehlo(None) + NO_TLS + b"502 unimplemented (#5.5.1)\r\n" * 2
                   + NO_TLS + OK + NOGATEWAY + BYE)
    assert ahome[1].calls() == []
    out, _, _ = auth(crlf(b"EHLO c.test") + PLAIN_JOE + crlf(b"QUIT"), ahome, smtpauth,
                     env={"FORCETLS": "0"})
    assert out == GREETING + ehlo(auth_line) + AUTH_OK + BYE


# ------------------------------------------------------------------ failures (5 s pause)


def _failure_cases(root):
    """name -> a function returning (result, home, checkpw, plugin calls or None)."""

    def wrong_login():
        home, checkpw = make_auth_home(os.path.join(root, "wrong_login"))
        calls = auth_plugin(home)
        result = auth(crlf(b"EHLO c.test", b"AUTH LOGIN", b64(b"joe"), b64(b"Wr0ng-Pa55w0rd"),
                           b"NOOP", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
                      (home, checkpw))
        return result, home, checkpw, calls

    def wrong_plain_then_right():
        home, checkpw = make_auth_home(os.path.join(root, "wrong_plain"))
        result = auth(crlf(b"AUTH PLAIN " + b64(b"\0joe\0Plain-Wr0ng-Pa55")) + PLAIN_JOE
                      + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
                      (home, checkpw))
        return result, home, checkpw, None

    def wrong_cram_digest():
        home, checkpw = make_auth_home(os.path.join(root, "wrong_cram"))
        result = auth(crlf(b"AUTH CRAM-MD5", b64(b"joe " + b"0" * 32), b"QUIT"),
                      (home, checkpw), "cram")
        return result, home, checkpw, None

    def missing_checkpw():
        home, checkpw = make_auth_home(os.path.join(root, "missing"))
        result = auth(LOGIN_JOE + crlf(b"NOOP", b"QUIT"), (home, checkpw),
                      args=[os.path.join(home.path, "plugins", "no-such-checkpw"), "/bin/true"])
        return result, home, checkpw, None

    def not_executable():
        home, checkpw = make_auth_home(os.path.join(root, "noexec"))
        os.chmod(checkpw.path, 0o644)
        result = auth(LOGIN_JOE + crlf(b"NOOP", b"QUIT"), (home, checkpw))
        return result, home, checkpw, None

    def subprogram_fails():
        home, checkpw = make_auth_home(os.path.join(root, "subfails"))
        result = auth(PLAIN_JOE + crlf(b"QUIT"), (home, checkpw),
                      args=[checkpw.path, "/bin/false"])
        return result, home, checkpw, None

    return {f.__name__: f for f in (wrong_login, wrong_plain_then_right, wrong_cram_digest,
                                    missing_checkpw, not_executable, subprogram_fails)}


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """Every failed-authentication session, run concurrently (each one pauses 5 s)."""
    root = str(tmp_path_factory.mktemp("auth-failures"))
    cases = _failure_cases(root)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(run) for name, run in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def test_wrong_password_is_535_and_nothing_is_granted(failures):
    result, _, checkpw, _ = failures["wrong_login"]
    assert result.out == (GREETING + ehlo(LOGIN_PLAIN) + USER_PROMPT + PASSWORD_PROMPT + FAILED
                          + OK + OK + NOGATEWAY + BYE)
    assert result.status == 0
    assert checkpw.fd3() == [b"joe\0Wr0ng-Pa55w0rd\0"]


def test_failed_auth_runs_no_auth_plugin(failures):
    _, _, _, calls = failures["wrong_login"]
    assert calls() == []


def test_password_not_in_the_log_on_failure(failures):
    for name, secret in (("wrong_login", b"Wr0ng-Pa55w0rd"),
                         ("wrong_plain_then_right", b"Plain-Wr0ng-Pa55")):
        result = failures[name][0]
        assert secret not in result.err, name
        assert b64(secret) not in result.err, name
        assert b"secret" not in result.err, name


def test_auth_may_be_retried_after_a_failure(failures):
    result, _, checkpw, _ = failures["wrong_plain_then_right"]
    assert result.out == GREETING + FAILED + AUTH_OK + OK + OK + BYE
    assert checkpw.fd3() == [b"joe\0Plain-Wr0ng-Pa55\0", b"joe\0secret\0"]


def test_wrong_cram_digest_is_535(failures):
    result, _, checkpw, _ = failures["wrong_cram_digest"]
    m = RE_CHALLENGE.search(result.out)
    assert result.out == GREETING + m.group(0) + FAILED + BYE
    challenge = base64.b64decode(m.group(1))
    assert checkpw.fd3() == [b"joe\0" + b"0" * 32 + b"\0" + challenge + b"\0"]


@pytest.mark.parametrize("name", ["missing_checkpw", "not_executable"])
def test_checkpassword_that_cannot_be_executed_is_535(failures, name):
    result, _, checkpw, _ = failures[name]
    assert result.out == GREETING + USER_PROMPT + PASSWORD_PROMPT + FAILED + OK + BYE
    assert result.status == 0
    assert checkpw.calls() == []


def test_subprogram_exit_status_decides(failures):
    result, _, checkpw, _ = failures["subprogram_fails"]
    assert result.out == GREETING + FAILED + BYE
    assert checkpw.fd3() == [b"joe\0secret\0"]


# ------------------------------------------------------------------ real clients over TCP


def test_swaks_auth_login_relays(tcpservers, ahome):
    require_tools("swaks")
    home, checkpw = ahome
    port = tcpservers.start(home, env={"SMTPAUTH": ""}, args=(checkpw.path, "/bin/true")).port
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@b.c",
                        "--helo", "client.test", "--to", "u@elsewhere.org", "--timeout", "20",
                        "--auth", "LOGIN", "--auth-user", "joe", "--auth-password", "secret",
                        "--header", "Subject: swaks auth"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    assert p.returncode == 0, p.stdout
    assert b"\n<-  235 ok, go ahead (#2.0.0)\n" in p.stdout
    assert checkpw.fd3() == [b"joe\0secret\0"]
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@elsewhere.org\0\0"
    assert norm(msg.received) == (b"Received: from unknown (HELO client.test) (joe@127.0.0.1)\n"
                                  b"  by mx.test with ESMTPA; <DATE>\n")


@pytest.mark.parametrize("smtpauth, advertised, mechanism", [
    ("+cram", "LOGIN PLAIN CRAM-MD5", "cram"),  # smtplib prefers CRAM-MD5
    ("", "LOGIN PLAIN", "plain"),
])
def test_smtplib_login_relays(tcpservers, ahome, smtpauth, advertised, mechanism):
    home, checkpw = ahome
    port = tcpservers.start(home, env={"SMTPAUTH": smtpauth},
                            args=(checkpw.path, "/bin/true")).port
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
        s.ehlo()
        assert s.esmtp_features["auth"].split() == advertised.split()
        assert s.esmtp_features["size"].strip() == "0"
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("a@b.c", ["x@elsewhere.org"], b"Subject: before\r\n\r\nno\r\n")
        assert s.login("joe", "secret") == (235, b"ok, go ahead (#2.0.0)")
        refused = s.sendmail("a@b.c", ["x@elsewhere.org"], b"Subject: smtplib auth\r\n\r\nhi\r\n")
        assert refused == {}
    (fd3,) = checkpw.fd3()
    if mechanism == "cram":
        assert re.fullmatch(rb"joe\0[0-9a-f]{32}\0<\d+\.\d+@mx\.test>\0", fd3)
    else:
        assert fd3 == b"joe\0secret\0"
    (msg,) = home.queued()
    assert msg.recipients == [b"x@elsewhere.org"]
    assert norm(msg.received) == (b"Received: from unknown (HELO client.test) (joe@127.0.0.1)\n"
                                  b"  by mx.test with ESMTPA; <DATE>\n")

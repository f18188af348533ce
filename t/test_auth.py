"""SMTP AUTH (Hoffmann 0.8.3 wire behaviour, ../shared/spec/qmail-smtpd.md §6.1 A1, plus
DECISIONS.md and spp.md §6): SMTPAUTH modes and the EHLO they produce, the LOGIN /
PLAIN / CRAM-MD5 dialogues, the checkpassword interface on fd 3 byte for byte, what
success grants, RSET, the MAIL parameters, the old HOSTNAME command line, the qmail-spp
[auth] hook and FORCETLS.

The semantics run in-process through the reference world (t/world.py): play() loads
the Config from the test's qmail home with the real loader, and checkpassword is
checkpw() below, a function of the fd 3 bytes (the Sleep before a 535 costs nothing
there).  The tests at the end run the installed server (or, for one, its children
module) because their point is process plumbing: fd 3, stdin, stdout, SIGPIPE, execvp,
the real pause, the pid in the CRAM-MD5 challenge, a real client under tcpserver.

The real fake checkpassword (CheckPw below, also used by other test modules) accepts
joe/secret, or a CRAM-MD5 digest of "secret" over the challenge it was given, records
what it read on fd 3, and execs its subprogram on success like the real one.
"""

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from qmail_smtpd_py import children
from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.session import NO_CHECKPASSWORD, Session

from helpers import (
    SERVER,
    Home,
    norm,
    require_server,
    require_tools,
    run_smtp,
    script,
    server_env,
)
from world import BASE_ENV, Plugin, World, load_config


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
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
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


# ------------------------------------------------------------------ the world's checkpassword

CHECKPW = "/var/qmail/bin/checkpw"  # the command line's program; never run in-process


def checkpw(data, then=0):
    """The fake checkpassword as the world runs it, deciding from the fd 3 bytes like
    CHECKPW below: joe with "secret" or a CRAM-MD5 digest of "secret" over the
    challenge field, or any user starting with `anyone` (any secret: to look at fd 3
    only).  Success gives `then`, the subprogram's end (0: /bin/true); failure exit 1."""
    fields = data.split(b"\0")
    user = fields[0]
    secret = fields[1] if len(fields) > 1 else b""
    challenge = fields[2] if len(fields) > 3 else b""
    if user == b"joe":
        ok = secret == b"secret" or (challenge != b"" and hmac.compare_digest(
            secret, cram_digest(challenge)))
    else:
        ok = user.startswith(b"anyone")
    return then if ok else 1


def bytes_env(env):
    """world.BASE_ENV plus env (str or bytes; None removes a name)."""
    out = dict(BASE_ENV)
    for name, value in (env or {}).items():
        name = os.fsencode(name)
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value.encode("latin-1") if isinstance(value, str) else value
    return out


class Dialogue(World):
    """The reference world with a client that may answer what it was sent: a chunk
    may be a function of the output so far returning the next bytes (CRAM-MD5 needs
    the challenge before the answer can be computed)."""

    def read(self, request):
        if self.pending and callable(self.pending[0]):
            self.pending[0] = self.pending[0](bytes(self.output))
        return super().read(request)


def play(chunks, home, smtpauth="", args=None, env=None, then=0, pid=b"77", **world):
    """One session in-process: SMTPAUTH (None: unset), the checkpassword command line
    (default: CHECKPW /bin/true) and env over world.BASE_ENV, the Config loaded from
    home's control files; checkpassword is checkpw with the subprogram's end `then`
    unless given.  Returns the world (.out, .status, .err, .queued, .checkpassword ...)."""
    full = {"SMTPAUTH": smtpauth}
    full.update(env or {})
    full = bytes_env(full)
    if args is None:
        args = (CHECKPW, "/bin/true")
    world.setdefault("checkpassword", functools.partial(checkpw, then=then))
    cfg = load_config(home, full, args)
    return Dialogue(chunks, **world).play(Session(cfg, full, pid).run())


def cram_answer(user=b"joe", secret=b"secret"):
    """A client chunk: the CRAM-MD5 answer to the last challenge the client was sent."""
    def answer(out):
        challenge = base64.b64decode(RE_CHALLENGE.findall(out)[-1], validate=True)
        return crlf(b64(user + b" " + cram_digest(challenge, secret)))
    return answer


def challenge_of(out):
    return base64.b64decode(RE_CHALLENGE.search(out).group(1), validate=True)


def checkpassword_argvs(r):
    """The command line of every checkpassword run, as the server would exec it."""
    return [q.argv for q in r.requests if type(q) is rq.CheckPassword]


AUTH_PLUGIN = b"/var/qmail/plugins/authplug"


def auth_hook(home, output=b""):
    """An [auth] qmail-spp plugin listed in control/smtpplugins; output is what it
    prints (bytes, or a function of its environment).  Returns the world's plugins."""
    home.control("smtpplugins", b"[auth]\n" + AUTH_PLUGIN + b"\n")
    return {AUTH_PLUGIN: Plugin(output)}


def hook_calls(r):
    """"$SMTPAUTHUSER $SMTPAUTHMETHOD" of every run of the [auth] plugin."""
    return ["%s %s" % (env.get(b"SMTPAUTHUSER", b"").decode(),
                       env.get(b"SMTPAUTHMETHOD", b"").decode())
            for argv, env in r.plugin_runs if argv == (AUTH_PLUGIN,)]


# ------------------------------------------------------------------ the real fake

CHECKPW_SCRIPT = r'''#!%(python)s -IS
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
            f.write(CHECKPW_SCRIPT % {"python": sys.executable, "records": self.records})
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
    """(home, checkpw): the default qmail home with the real fake checkpassword."""
    return home, CheckPw(home)


def auth(input_bytes, ahome, smtpauth="", args=None, env=None, **kw):
    """run_smtp (the installed server) with SMTPAUTH (None: unset) and the
    checkpassword command line (default: checkpw /bin/true)."""
    home, checkpw = ahome
    e = {"SMTPAUTH": smtpauth}
    e.update(env or {})
    if args is None:
        args = [checkpw.path, "/bin/true"]
    return run_smtp(input_bytes, env=e, home=home, args=args, **kw)


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
def test_smtpauth_modes(home, smtpauth, auth_line, required):
    """EHLO lines, whether AUTH is available (an unknown mechanism shows it: 504 when
    on, 503 when off) and whether MAIL needs AUTH first."""
    r = play(crlf(b"EHLO c.test", b"AUTH NOSUCH", b"MAIL FROM:<a@b.c>", b"QUIT"), home,
             smtpauth)
    assert r.out == (GREETING + ehlo(auth_line)
                     + (UNIMPLEMENTED_TYPE if auth_line else NOT_AVAILABLE)
                     + (REQUIRED if required else OK) + BYE)
    assert r.status == 0
    assert r.checkpassword == []


@pytest.mark.parametrize("smtpauth", [None, "-"])
def test_disabled_modes_refuse_every_mechanism(home, smtpauth):
    r = play(crlf(b"AUTH LOGIN") + PLAIN_JOE + crlf(b"AUTH CRAM-MD5", b"QUIT"), home, smtpauth)
    assert r.out == GREETING + NOT_AVAILABLE * 3 + BYE
    assert r.checkpassword == []


@pytest.mark.parametrize("control, env, size", [
    ({}, {"DATABYTES": "12345"}, 12345),
    ({"databytes": "777\n"}, {}, 777),
    ({"databytes": "777\n"}, {"DATABYTES": "99"}, 99),
    ({}, {"DATABYTES": "4294967295"}, 4294967294),
])
def test_ehlo_size_is_databytes(make_home, control, env, size):
    r = play(crlf(b"EHLO c.test", b"QUIT"), make_home(control=control), "", env=env)
    assert r.out == GREETING + ehlo(LOGIN_PLAIN, size) + BYE


def test_no_arguments_and_no_smtpauth_is_plain_notqmail(home):
    """No AUTH, no SIZE line, and MAIL parameters ignored (DECISIONS.md)."""
    r = play(crlf(b"EHLO c.test", b"AUTH LOGIN", b"MAIL FROM:<a@b.c> SIZE=99999 AUTH=joe",
                  b"RCPT TO:<u@example.com>") + MESSAGE + crlf(b"QUIT"),
             home, None, args=(), env={"DATABYTES": "100"})
    assert norm(r.out) == (GREETING
                           + b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                           + UNIMPLEMENTED + OK + OK + GO_AHEAD + ACCEPTED + BYE)
    assert norm(r.queued[0].received) == RECEIVED_PLAIN


def test_smtpauth_without_checkpassword_is_503(home):
    """SMTPAUTH set but no command line: the patch's EHLO, and AUTH not available.  The
    log says why once, at the start of the connection, however many AUTHs follow."""
    r = play(crlf(b"EHLO c.test", b"AUTH LOGIN") + PLAIN_JOE + crlf(b"QUIT"), home, "", args=[])
    assert r.out == GREETING + ehlo(LOGIN_PLAIN) + NOT_AVAILABLE * 2 + BYE
    assert r.checkpassword == []
    assert r.log == ["connect host=unknown port=-", NO_CHECKPASSWORD,
                     "refuse AUTH 503 by=auth-off", "refuse AUTH 503 by=auth-off",
                     "close status=0 why=quit messages=0"]


@pytest.mark.parametrize("smtpauth, args, env, warned", [
    ("!cram", [], {}, True),
    ("", ["mx.example.org"], {}, True),      # the old form's hostname alone
    ("", [], {"SMTPLOGLEVEL": "0"}, True),   # a warning: logged at every level
    ("-", [], {}, False),                    # AUTH switched off on purpose
    (None, [], {}, False),                   # plain notqmail
    ("", None, {}, False),                   # a checkpassword is given
])
def test_missing_checkpassword_warning(home, smtpauth, args, env, warned):
    r = play(crlf(b"QUIT"), home, smtpauth, args=args, env=env)
    assert r.log.count(NO_CHECKPASSWORD) == (1 if warned else 0), r.log


# ------------------------------------------------------------------ LOGIN and PLAIN


def test_login_with_prompts_then_relaying(home):
    r = play(crlf(b"EHLO c.test") + LOGIN_JOE
             + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
             + crlf(b"QUIT"), home)
    assert norm(r.out) == (GREETING + ehlo(LOGIN_PLAIN) + LOGIN_DIALOGUE + OK + OK + GO_AHEAD
                           + ACCEPTED + BYE)
    assert r.status == 0
    assert r.checkpassword == [b"joe\0secret\0"]
    assert checkpassword_argvs(r) == [(CHECKPW.encode(), b"/bin/true")]
    (msg,) = r.queued
    assert msg.envelope == b"Fa@b.c\0Tx@elsewhere.org\0\0"
    assert norm(msg.received) == RECEIVED_AUTH


def test_login_with_initial_response(home):
    r = play(crlf(b"AUTH LOGIN " + b64(b"joe"), b64(b"secret"), b"QUIT"), home)
    assert r.out == GREETING + PASSWORD_PROMPT + AUTH_OK + BYE
    assert r.checkpassword == [b"joe\0secret\0"]


def test_mechanism_name_is_case_insensitive(home):
    r = play(crlf(b"auth LoGiN", b64(b"joe"), b64(b"secret"), b"QUIT"), home)
    assert r.out == GREETING + LOGIN_DIALOGUE + BYE


def test_plain_with_prompt(home):
    r = play(crlf(b"AUTH PLAIN", b64(b"\0joe\0secret"), b"QUIT"), home)
    assert r.out == GREETING + PLAIN_PROMPT + AUTH_OK + BYE
    assert r.checkpassword == [b"joe\0secret\0"]


def test_plain_with_initial_response(home):
    r = play(PLAIN_JOE + crlf(b"QUIT"), home)
    assert r.out == GREETING + AUTH_OK + BYE
    assert r.checkpassword == [b"joe\0secret\0"]


def test_plain_authzid_is_ignored(home):
    r = play(crlf(b"AUTH PLAIN " + b64(b"admin\0joe\0secret"), b"QUIT"), home)
    assert r.out == GREETING + AUTH_OK + BYE
    assert r.checkpassword == [b"joe\0secret\0"]


@pytest.mark.parametrize("smtpauth, mechanism", [
    ("+cram", LOGIN_JOE), ("!+cram", LOGIN_JOE), ("cram", PLAIN_JOE), ("!cram", PLAIN_JOE),
    ("+CRAM", PLAIN_JOE),
])
def test_fd3_has_an_empty_challenge_when_cram_is_enabled(home, smtpauth, mechanism):
    """LOGIN/PLAIN pass user\\0password\\0 plus an empty challenge \\0 when SMTPAUTH
    enables CRAM-MD5 (every mechanism is accepted whatever SMTPAUTH advertises)."""
    r = play(mechanism + crlf(b"QUIT"), home, smtpauth)
    assert r.out.endswith(AUTH_OK + BYE)
    assert r.checkpassword == [b"joe\0secret\0\0"]


@pytest.mark.parametrize("smtpauth", ["", "!", "yes"])
def test_fd3_has_no_challenge_without_cram(home, smtpauth):
    r = play(LOGIN_JOE + crlf(b"QUIT"), home, smtpauth)
    assert r.out.endswith(AUTH_OK + BYE)
    assert r.checkpassword == [b"joe\0secret\0"]


def test_checkpassword_command_line_is_passed_whole(home):
    """The whole command line after the program (the subprogram and its arguments)
    is what checkpassword is run with, once per AUTH, with the session's environment."""
    args = (CHECKPW, "/bin/sh", "-c", 'echo "$0 $1" > marker', "arg0", "arg1")
    r = play(crlf(b"NOOP") + LOGIN_JOE + crlf(b"NOOP", b"QUIT"), home, args=args)
    assert r.out == GREETING + OK + LOGIN_DIALOGUE + OK + BYE
    assert checkpassword_argvs(r) == [tuple(os.fsencode(a) for a in args)]
    assert r.checkpassword == [b"joe\0secret\0"]
    (env,) = r.checkpassword_envs
    assert env[b"TCPREMOTEIP"] == b"127.0.0.1" and env[b"SMTPAUTH"] == b""


# ------------------------------------------------------------------ CRAM-MD5


@pytest.mark.parametrize("smtpauth", ["cram", "+cram", "!cram", "!+cram"])
def test_cram_md5_with_a_real_digest(home, smtpauth):
    """The challenge is <pid.time@host> of the session's pid and the clock; the client
    answers with an HMAC-MD5 digest of it, checkpassword gets user, digest, challenge."""
    r = play([crlf(b"AUTH CRAM-MD5"), cram_answer(),
              crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>")], home, smtpauth,
             pid=b"4321", now=1700000000.75)
    challenge = challenge_of(r.out)
    assert challenge == b"<4321.1700000000@mx.test>"
    assert r.out == GREETING + b"334 " + b64(challenge) + b"\r\n" + AUTH_OK + OK + OK
    assert r.checkpassword == [b"joe\0" + cram_digest(challenge) + b"\0" + challenge + b"\0"]
    assert r.status == 1  # the input ended without QUIT


def test_cram_md5_accepted_but_no_challenge_on_fd3_without_cram_mode(home):
    """CRAM-MD5 works although SMTPAUTH only advertises LOGIN PLAIN, and then fd 3
    carries no challenge (checkpw accepts user `anyone` without checking)."""
    r = play([crlf(b"AUTH CRAM-MD5"), cram_answer(user=b"anyone")], home, "")
    challenge = challenge_of(r.out)
    assert r.out == GREETING + b"334 " + b64(challenge) + b"\r\n" + AUTH_OK
    assert re.fullmatch(rb"<\d+\.\d+@mx\.test>", challenge)
    assert r.checkpassword == [b"anyone\0" + cram_digest(challenge) + b"\0"]


@pytest.mark.parametrize("env, host", [
    ({}, b"mx.test"),
    ({"TCPLOCALHOST": None}, b"127.0.0.1"),
    ({"TCPLOCALHOST": None, "TCPLOCALIP": None}, b"unknown"),
])
def test_cram_challenge_host(home, env, host):
    r = play(crlf(b"AUTH CRAM-MD5", b"*", b"QUIT"), home, "cram", env=env)
    m = RE_CHALLENGE.search(r.out)
    assert r.out == GREETING + m.group(0) + CANCELED + BYE
    assert re.fullmatch(rb"<\d+\.\d+@" + re.escape(host) + rb">", base64.b64decode(m.group(1)))


def test_old_hostname_form_puts_the_host_in_the_challenge(home):
    """`qmail-smtpd-py HOSTNAME /path/checkpassword subprogram` (A3 command line)."""
    r = play([crlf(b"AUTH CRAM-MD5"), cram_answer()], home, "+cram",
             args=["mail.host.example", CHECKPW, "/bin/true"])
    challenge = challenge_of(r.out)
    assert r.out.endswith(AUTH_OK)
    assert re.fullmatch(rb"<\d+\.\d+@mail\.host\.example>", challenge)
    assert r.checkpassword == [b"joe\0" + cram_digest(challenge) + b"\0" + challenge + b"\0"]
    assert checkpassword_argvs(r) == [(CHECKPW.encode(), b"/bin/true")]


def test_old_hostname_form_login(home):
    r = play(crlf(b"EHLO c.test") + LOGIN_JOE + crlf(b"QUIT"), home, "",
             args=["mail.host.example", CHECKPW, "/bin/true"])
    assert r.out == GREETING + ehlo(LOGIN_PLAIN) + LOGIN_DIALOGUE + BYE
    assert r.checkpassword == [b"joe\0secret\0"]
    assert checkpassword_argvs(r) == [(CHECKPW.encode(), b"/bin/true")]


def test_cram_response_is_split_at_the_last_space(home):
    """0.8.3 takes everything before the last space as the user name (checkpw
    accepts users starting with `anyone` whatever the digest)."""
    r = play(crlf(b"AUTH CRAM-MD5", b64(b"anyone else " + b"0" * 32), b"QUIT"), home)
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", r.out) == GREETING + b"334 <C>\r\n" + AUTH_OK + BYE
    assert r.checkpassword == [b"anyone else\0" + b"0" * 32 + b"\0"]


def test_cram_response_without_a_space_is_malformed(home):
    r = play(crlf(b"AUTH CRAM-MD5", b64(b"joe" + b"0" * 32), b"QUIT"), home, "cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", r.out) == (GREETING + b"334 <C>\r\n" + MALFORMED
                                                       + BYE)
    assert r.checkpassword == []


# ------------------------------------------------------------------ cancel and bad input


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH LOGIN", b"*"), USER_PROMPT),
    (crlf(b"AUTH LOGIN", b64(b"joe"), b"*"), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH LOGIN " + b64(b"joe"), b"*"), PASSWORD_PROMPT),
    (crlf(b"AUTH PLAIN", b"*"), PLAIN_PROMPT),
    (crlf(b"AUTH CRAM-MD5", b"*"), b"334 <C>\r\n"),
])
def test_star_cancels(home, dialogue, prompts):
    """`*` cancels: 501, checkpassword never runs, the session is not authenticated."""
    r = play(dialogue + crlf(b"NOOP", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>",
                             b"QUIT"), home, "+cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", r.out) == (GREETING + prompts + CANCELED + OK + OK
                                                       + NOGATEWAY + BYE)
    assert r.status == 0
    assert r.checkpassword == []


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH LOGIN", b""), USER_PROMPT),
    (crlf(b"AUTH LOGIN", b64(b"joe"), b""), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH PLAIN", b""), PLAIN_PROMPT),
    (crlf(b"AUTH CRAM-MD5", b""), b"334 <C>\r\n"),
    (b"AUTH LOGIN\r\n\n", USER_PROMPT),  # a bare LF ends the (empty) line too
])
def test_empty_response_is_malformed(home, dialogue, prompts):
    r = play(dialogue + crlf(b"NOOP", b"QUIT"), home, "+cram")
    assert RE_CHALLENGE.sub(b"334 <C>\r\n", r.out) == GREETING + prompts + MALFORMED + OK + BYE
    assert r.checkpassword == []


@pytest.mark.parametrize("dialogue, prompts", [
    (crlf(b"AUTH PLAIN " + b64(b"\0joe")), b""),                    # no password
    (crlf(b"AUTH PLAIN " + b64(b"\0joe\0")), b""),                  # empty password
    (crlf(b"AUTH PLAIN " + b64(b"joe\0secret")), b""),              # no authzid NUL
    (crlf(b"AUTH PLAIN " + b64(b"\0\0secret")), b""),               # empty user
    (crlf(b"AUTH PLAIN", b64(b"joe")), PLAIN_PROMPT),
    (crlf(b"AUTH LOGIN", b"====", b64(b"secret")), USER_PROMPT + PASSWORD_PROMPT),
    (crlf(b"AUTH LOGIN " + b64(b"joe"), b"===="), PASSWORD_PROMPT),
])
def test_missing_user_or_password_is_malformed(home, dialogue, prompts):
    r = play(dialogue + crlf(b"NOOP", b"QUIT"), home)
    assert r.out == GREETING + prompts + MALFORMED + OK + BYE
    assert r.checkpassword == []


@pytest.mark.parametrize("line", [b"AUTH", b"AUTH DIGEST-MD5", b"AUTH LOGINX", b"AUTH XOAUTH2 abc",
                                  b"AUTH CRAM-MD5X"])
def test_unknown_mechanism_is_504(home, line):
    r = play(crlf(line, b"NOOP", b"QUIT"), home, "+cram")
    assert r.out == GREETING + UNIMPLEMENTED_TYPE + OK + BYE


def test_auth_twice(home):
    r = play(PLAIN_JOE + LOGIN_JOE + crlf(b"QUIT"), home)
    # the second AUTH is refused at once; its two answer lines are then unknown verbs
    assert r.out == GREETING + AUTH_OK + ALREADY + UNIMPLEMENTED * 2 + BYE
    assert len(r.checkpassword) == 1


def test_auth_during_a_transaction(home):
    r = play(crlf(b"MAIL FROM:<a@b.c>") + PLAIN_JOE + crlf(b"RCPT TO:<x@elsewhere.org>", b"RSET")
             + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
             + crlf(b"QUIT"), home)
    assert norm(r.out) == (GREETING + OK + DURING_MAIL + NOGATEWAY + FLUSHED + AUTH_OK + OK + OK
                           + GO_AHEAD + ACCEPTED + BYE)
    assert len(r.checkpassword) == 1
    assert r.queued[0].recipients == [b"x@elsewhere.org"]


def test_auth_after_a_delivered_message_is_allowed(home):
    r = play(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE
             + PLAIN_JOE + crlf(b"QUIT"), home)
    assert norm(r.out) == GREETING + OK + OK + GO_AHEAD + ACCEPTED + AUTH_OK + BYE


# ------------------------------------------------------------------ child failures: 454


def test_checkpassword_killed_is_454(home):
    """A checkpassword (here its subprogram) killed by a signal: 454, no pause, nothing
    granted, and the client may try again."""
    r = play(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"RSET")
             + PLAIN_JOE + crlf(b"QUIT"),
             home, args=[CHECKPW, "/bin/sh", "-c", "kill -KILL $$"], then=rq.Signaled(9))
    assert r.out == GREETING + CHILD_PROBLEM + OK + NOGATEWAY + FLUSHED + CHILD_PROBLEM + BYE
    assert r.status == 0
    assert r.checkpassword == [b"joe\0secret\0"] * 2
    assert not any(line.startswith("slept") for line in r.log)


@pytest.mark.parametrize("outcome, reply", [
    (rq.Signaled(11), CHILD_PROBLEM),
    (rq.WaitFailed("No child processes"), CHILD_PROBLEM),
    (rq.CannotStart(rq.FORK, "Resource temporarily unavailable"),
     b"454 oops, child won't start and I can't auth (#4.3.0)\r\n"),
    (rq.CannotStart(rq.PIPE, "Too many open files"),
     b"454 oops, unable to open pipe and I can't auth (#4.3.0)\r\n"),
    (rq.WRITE_FAILED, b"454 oops, unable to write pipe and I can't auth (#4.3.0)\r\n"),
])
def test_checkpassword_that_cannot_be_run_properly_is_454(home, outcome, reply):
    r = play(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
             home, checkpassword=lambda data: outcome)
    assert r.out == GREETING + reply + OK + NOGATEWAY + BYE
    assert r.status == 0
    assert not any(line.startswith("slept") for line in r.log)


# ------------------------------------------------------------------ required modes, RSET


def test_required_mode_530_then_auth_then_rset(home):
    r = play(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + LOGIN_JOE
             + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
             + crlf(b"MAIL FROM:<a@b.c>", b"RSET", b"MAIL FROM:<a@b.c>")
             + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"QUIT"),
             home, "!")
    assert norm(r.out) == (GREETING + REQUIRED + b"503 MAIL first (#5.5.1)\r\n" + LOGIN_DIALOGUE
                           + OK + OK + GO_AHEAD + ACCEPTED
                           + OK + FLUSHED + REQUIRED
                           + AUTH_OK + OK + BYE)
    assert REQUIRED.endswith(b") \r\n")
    assert len(r.queued) == 1
    assert len(r.checkpassword) == 2


def test_rset_forgets_authenticated_but_relaying_stays(home):
    r = play(PLAIN_JOE + crlf(b"RSET", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>")
             + MESSAGE + crlf(b"RSET") + LOGIN_JOE + crlf(b"QUIT"), home)
    # after RSET AUTH is allowed again (no "already authenticated")
    assert norm(r.out) == (GREETING + AUTH_OK + FLUSHED + OK + OK + GO_AHEAD + ACCEPTED + FLUSHED
                           + LOGIN_DIALOGUE + BYE)
    (msg,) = r.queued
    assert msg.recipients == [b"x@elsewhere.org"]
    assert norm(msg.received) == (b"Received: from unknown (joe@127.0.0.1)\n"
                                  b"  by mx.test with ESMTPA; <DATE>\n")


# ------------------------------------------------------------------ what success grants


def test_success_exports_tcpremoteinfo_and_relayclient_to_qmail_queue(home):
    r = play(crlf(b"EHLO c.test") + PLAIN_JOE
             + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@other.org>") + MESSAGE + crlf(b"QUIT"),
             home)
    assert norm(r.out) == (GREETING + ehlo(LOGIN_PLAIN) + AUTH_OK + OK + OK + GO_AHEAD
                           + ACCEPTED + BYE)
    (env,) = r.queue_envs
    assert env[b"TCPREMOTEINFO"] == b"joe"
    assert env[b"RELAYCLIENT"] == b""
    assert norm(r.queued[0].received) == RECEIVED_AUTH


def test_no_export_before_auth(home):
    r = play(crlf(b"HELO c.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE
             + crlf(b"QUIT"), home)
    assert norm(r.out) == GREETING + HELO + OK + OK + GO_AHEAD + ACCEPTED + BYE
    (env,) = r.queue_envs
    assert b"TCPREMOTEINFO" not in env
    assert b"RELAYCLIENT" not in env
    assert norm(r.queued[0].received) == RECEIVED_PLAIN


def test_auth_replaces_a_relayclient_suffix(home):
    """Success sets RELAYCLIENT to empty: recipients no longer get the old suffix."""
    r = play(crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
             + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<y@elsewhere.org>") + MESSAGE
             + crlf(b"QUIT"), home, env={"RELAYCLIENT": "+rc"})
    assert norm(r.out) == (GREETING + OK + OK + GO_AHEAD + ACCEPTED + AUTH_OK + OK + OK
                           + GO_AHEAD + ACCEPTED + BYE)
    assert [m.recipients for m in r.queued] == [[b"x@elsewhere.org+rc"], [b"y@elsewhere.org"]]


def test_auth_replaces_an_ident_remoteinfo(home):
    r = play(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>") + MESSAGE
             + crlf(b"QUIT"), home, env={"TCPREMOTEINFO": "identuser"})
    assert norm(r.out).endswith(ACCEPTED + BYE)
    assert b"(joe@127.0.0.1)" in r.queued[0].received


# ------------------------------------------------------------------ MAIL parameters


def test_mail_size_over_databytes_is_552_and_keeps_the_transaction(home):
    r = play(crlf(b"MAIL FROM:<a@b.c> SIZE=1000", b"RCPT TO:<u@example.com>",
                  b"MAIL FROM:<z@b.c> SIZE=1001", b"MAIL FROM:<z@b.c> BODY=8BITMIME size=5000",
                  b"RCPT TO:<v@example.com>") + MESSAGE + crlf(b"QUIT"),
             home, env={"DATABYTES": "1000"})
    assert norm(r.out) == (GREETING + OK + OK + TOO_BIG + TOO_BIG + OK + GO_AHEAD + ACCEPTED
                           + BYE)
    assert [m.envelope for m in r.queued] == [b"Fa@b.c\0Tu@example.com\0Tv@example.com\0\0"]


def test_mail_size_first_transaction_refused(home):
    r = play(crlf(b"MAIL FROM:<a@b.c> SIZE=5000", b"RCPT TO:<u@example.com>", b"QUIT"), home,
             env={"DATABYTES": "1000"})
    assert r.out == GREETING + TOO_BIG + b"503 MAIL first (#5.5.1)\r\n" + BYE


def test_mail_size_without_databytes_is_not_limited(home):
    r = play(crlf(b"MAIL FROM:<a@b.c> SIZE=999999999999", b"QUIT"), home)
    assert r.out == GREETING + OK + BYE


def test_mail_size_needs_a_closing_angle_bracket(home):
    """The patch parses parameters only when the argument has a '>' (past byte 4)."""
    r = play(crlf(b"MAIL FROM:a@b.c SIZE=5000", b"QUIT"), home, env={"DATABYTES": "1000"})
    assert r.out == GREETING + OK + BYE


@pytest.mark.parametrize("param, info", [
    (b"AUTH=x+2By+3Dz+41", b"x+y=z41"),
    (b"AUTH=<>", b"unknown"),
    (b"auth=someone", b"someone"),
])
def test_mail_auth_parameter_becomes_remoteinfo(home, param, info):
    r = play(crlf(b"HELO c.test", b"MAIL FROM:<a@b.c> " + param, b"RCPT TO:<u@example.com>")
             + MESSAGE + crlf(b"QUIT"), home)
    assert norm(r.out) == GREETING + HELO + OK + OK + GO_AHEAD + ACCEPTED + BYE
    assert norm(r.queued[0].received) == (b"Received: from unknown (HELO c.test) ("
                                          + info + b"@127.0.0.1)\n"
                                          b"  by mx.test with SMTP; <DATE>\n")
    assert r.queue_envs[0][b"TCPREMOTEINFO"] == info


def test_mail_auth_parameter_does_not_override_auth_or_ident(home):
    r = play(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c> AUTH=mallory", b"RCPT TO:<u@example.com>")
             + MESSAGE + crlf(b"QUIT"), home)
    assert norm(r.out).endswith(ACCEPTED + BYE)
    assert b"(joe@127.0.0.1)" in r.queued[0].received
    r = play(crlf(b"MAIL FROM:<a@b.c> AUTH=mallory", b"RCPT TO:<u@example.com>") + MESSAGE
             + crlf(b"QUIT"), home, env={"TCPREMOTEINFO": "ident"})
    assert b"(ident@127.0.0.1)" in r.queued[0].received


# ------------------------------------------------------------------ secrets and the log


def test_credentials_not_in_the_log_on_success(home):
    r = play(LOGIN_JOE + PLAIN_JOE + crlf(b"QUIT"), home)
    assert r.out == GREETING + LOGIN_DIALOGUE + ALREADY + BYE
    assert "auth method=login user=joe" in r.log
    for secret in (b"secret", b64(b"secret"), b64(b"\0joe\0secret")):
        assert secret not in r.err


# ------------------------------------------------------------------ qmail-spp [auth]


@pytest.mark.parametrize("dialogue, method", [
    (LOGIN_JOE, "login"),
    (crlf(b"auth login " + b64(b"joe"), b64(b"secret")), "login"),
    (PLAIN_JOE, "plain"),
    (crlf(b"AUTH pLaIn", b64(b"\0joe\0secret")), "plain"),
])
def test_auth_plugin_sees_user_and_method(home, dialogue, method):
    plugins = auth_hook(home)
    r = play(dialogue + crlf(b"QUIT"), home, plugins=plugins)
    assert r.out.endswith(AUTH_OK + BYE)
    assert hook_calls(r) == ["joe " + method]


def test_auth_plugin_sees_cram_md5(home):
    plugins = auth_hook(home)
    r = play([crlf(b"AUTH CRAM-MD5"), cram_answer(), crlf(b"QUIT")], home, "cram",
             plugins=plugins)
    assert r.out.endswith(AUTH_OK + BYE)
    assert hook_calls(r) == ["joe cram-md5"]


def test_auth_variables_reach_later_plugins(home):
    mail = b"/var/qmail/plugins/mailplug"
    home.control("smtpplugins", b"[mail]\n" + mail + b"\n")
    r = play(crlf(b"MAIL FROM:<a@b.c>", b"RSET") + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"QUIT"),
             home, plugins={mail: Plugin()})
    assert r.out == GREETING + OK + FLUSHED + AUTH_OK + OK + BYE
    assert [b"[%s][%s]" % (env.get(b"SMTPAUTHUSER", b""), env.get(b"SMTPAUTHMETHOD", b""))
            for env in r.plugin_envs] == [b"[][]", b"[joe][plain]"]


def test_auth_plugin_rejecting_leaves_the_session_unauthenticated(home):
    """E in [auth]: the plugin's text instead of 235, no relaying, no ESMTPA; the
    client may AUTH again (here the plugin lets the second attempt through)."""
    said = iter([b"E535 5.7.0 not you\n", b""])
    plugins = auth_hook(home, lambda env: next(said))
    r = play(PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>",
                              b"RCPT TO:<u@example.com>") + MESSAGE
             + PLAIN_JOE + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>") + MESSAGE
             + crlf(b"QUIT"), home, plugins=plugins)
    assert norm(r.out) == (GREETING + b"535 5.7.0 not you\r\n" + OK + NOGATEWAY + OK + GO_AHEAD
                           + ACCEPTED + AUTH_OK + OK + OK + GO_AHEAD + ACCEPTED + BYE)
    assert hook_calls(r) == ["joe plain", "joe plain"]
    first, second = r.queued
    assert norm(first.received) == (b"Received: from unknown (127.0.0.1)\n"
                                    b"  by mx.test with SMTP; <DATE>\n")
    assert norm(second.received) == (b"Received: from unknown (joe@127.0.0.1)\n"
                                     b"  by mx.test with ESMTPA; <DATE>\n")
    assert second.recipients == [b"x@elsewhere.org"]


def test_auth_plugin_not_run_on_cancel_or_bad_input(home):
    plugins = auth_hook(home)
    r = play(crlf(b"AUTH LOGIN", b"*", b"AUTH PLAIN", b"", b"AUTH NOSUCH", b"QUIT"), home,
             plugins=plugins)
    assert r.out == (GREETING + USER_PROMPT + CANCELED + PLAIN_PROMPT + MALFORMED
                     + UNIMPLEMENTED_TYPE + BYE)
    assert r.plugin_runs == []


# ------------------------------------------------------------------ FORCETLS


@pytest.mark.parametrize("smtpauth, auth_line", [("", LOGIN_PLAIN), ("+cram", ALL_THREE)])
def test_forcetls_hides_and_refuses_auth_before_tls(home, smtpauth, auth_line):
    r = play(crlf(b"EHLO c.test") + LOGIN_JOE + PLAIN_JOE
             + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
             home, smtpauth, env={"FORCETLS": "1"})
    # the two LOGIN answer lines are then unknown verbs
    assert r.out == (GREETING + ehlo(None) + NO_TLS + UNIMPLEMENTED * 2
                     + NO_TLS + OK + NOGATEWAY + BYE)
    assert r.checkpassword == []
    r = play(crlf(b"EHLO c.test") + PLAIN_JOE + crlf(b"QUIT"), home, smtpauth,
             env={"FORCETLS": "0"})
    assert r.out == GREETING + ehlo(auth_line) + AUTH_OK + BYE


# ------------------------------------------------------------------ failures (the pause)


def paused_before_each_535(r):
    """Each 535 went out after its own 5 s pause (a Sleep, free in-process), with
    nothing sent in between."""
    steps = ["sleep" if q == rq.Sleep(5) else "535" if FAILED in q.data else "send"
             for q in r.requests if q == rq.Sleep(5) or type(q) is rq.Send]
    assert steps.count("535") == r.out.count(FAILED) > 0
    assert [b for a, b in zip(steps, steps[1:]) if a == "sleep"] == ["535"] * steps.count("535")
    assert steps.count("sleep") == steps.count("535")
    assert r.log.count("slept 5") == steps.count("sleep")


def test_wrong_password_is_535_and_nothing_is_granted(home):
    plugins = auth_hook(home)
    r = play(crlf(b"EHLO c.test", b"AUTH LOGIN", b64(b"joe"), b64(b"Wr0ng-Pa55w0rd"), b"NOOP",
                  b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
             home, plugins=plugins)
    assert r.out == (GREETING + ehlo(LOGIN_PLAIN) + USER_PROMPT + PASSWORD_PROMPT + FAILED
                     + OK + OK + NOGATEWAY + BYE)
    assert r.status == 0
    assert r.checkpassword == [b"joe\0Wr0ng-Pa55w0rd\0"]
    paused_before_each_535(r)
    # the failed login runs no [auth] plugin
    assert r.plugin_runs == []
    for secret in (b"Wr0ng-Pa55w0rd", b"secret"):
        assert secret not in r.err
        assert b64(secret) not in r.err


def test_auth_may_be_retried_after_a_failure(home):
    r = play(crlf(b"AUTH PLAIN " + b64(b"\0joe\0Plain-Wr0ng-Pa55")) + PLAIN_JOE
             + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"), home)
    assert r.out == GREETING + FAILED + AUTH_OK + OK + OK + BYE
    assert r.checkpassword == [b"joe\0Plain-Wr0ng-Pa55\0", b"joe\0secret\0"]
    paused_before_each_535(r)
    # the password is never logged
    for secret in (b"Plain-Wr0ng-Pa55", b"secret"):
        assert secret not in r.err
        assert b64(secret) not in r.err


def test_wrong_cram_digest_is_535(home):
    r = play(crlf(b"AUTH CRAM-MD5", b64(b"joe " + b"0" * 32), b"QUIT"), home, "cram")
    m = RE_CHALLENGE.search(r.out)
    assert r.out == GREETING + m.group(0) + FAILED + BYE
    challenge = base64.b64decode(m.group(1))
    assert r.checkpassword == [b"joe\0" + b"0" * 32 + b"\0" + challenge + b"\0"]
    paused_before_each_535(r)


@pytest.mark.parametrize("detail", ["No such file or directory", "Permission denied"])
def test_checkpassword_that_cannot_be_executed_is_535(home, detail):
    """A missing or non-executable checkpassword: as the patch's child exiting 1 when
    its exec fails, a failed login (after the pause), logged; the session goes on."""
    r = play(LOGIN_JOE + crlf(b"NOOP", b"QUIT"), home,
             checkpassword=lambda data: rq.CannotStart(rq.EXEC, detail))
    assert r.out == GREETING + USER_PROMPT + PASSWORD_PROMPT + FAILED + OK + BYE
    assert r.status == 0
    assert "unable to run checkpassword %s: %s" % (CHECKPW, detail) in r.log
    paused_before_each_535(r)


def test_subprogram_exit_status_decides(home):
    """checkpassword execs its subprogram on success: /bin/false's exit 1 is a failure."""
    r = play(PLAIN_JOE + crlf(b"QUIT"), home, args=[CHECKPW, "/bin/false"], then=1)
    assert r.out == GREETING + FAILED + BYE
    assert r.checkpassword == [b"joe\0secret\0"]
    assert checkpassword_argvs(r) == [(CHECKPW.encode(), b"/bin/false")]
    paused_before_each_535(r)


# ------------------------------------------------------------------ a real client, in-process


class SocketWorld(World):
    """The reference world with a real client at the other end of a socket pair: the
    session's Read and Send go through the socket."""

    def __init__(self, sock, **world):
        super().__init__((), **world)
        self.sock = sock

    def read(self, request):
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return rq.TIMED_OUT
        return data or rq.END_OF_INPUT

    def send(self, request):
        super().send(request)
        self.sock.sendall(request.data)
        return rq.SENT


class PairSMTP(smtplib.SMTP):
    """smtplib's client over an already connected socket."""

    def __init__(self, sock, **kw):
        self._pair = sock
        super().__init__(**kw)

    def _get_socket(self, host, port, timeout):
        return self._pair


def with_client(home, env, client, **world):
    """Play one session in-process against client(smtp), run in a thread with an
    smtplib.SMTP connected to the session; returns the world."""
    ours, theirs = socket.socketpair()
    ours.settimeout(20)
    theirs.settimeout(20)
    failure = []

    def run_client():
        try:
            with PairSMTP(theirs, local_hostname="client.test", timeout=20) as s:
                s.connect("mx.test", 25)
                client(s)
        except BaseException as e:
            failure.append(e)
        finally:
            theirs.close()

    thread = threading.Thread(target=run_client)
    thread.start()
    try:
        env = bytes_env(env)
        cfg = load_config(home, env, (CHECKPW, "/bin/true"))
        world.setdefault("checkpassword", checkpw)
        r = SocketWorld(ours, **world).play(Session(cfg, env, b"77").run())
    finally:
        ours.close()
        thread.join(30)
    assert not thread.is_alive(), "the smtplib client did not finish"
    if failure:
        raise failure[0]
    return r


@pytest.mark.parametrize("smtpauth, advertised, mechanism", [
    ("+cram", "LOGIN PLAIN CRAM-MD5", "cram"),  # smtplib prefers CRAM-MD5
    ("", "LOGIN PLAIN", "plain"),
])
def test_smtplib_login_relays(home, smtpauth, advertised, mechanism):
    def client(s):
        s.ehlo()
        assert s.esmtp_features["auth"].split() == advertised.split()
        assert s.esmtp_features["size"].strip() == "0"
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("a@b.c", ["x@elsewhere.org"], b"Subject: before\r\n\r\nno\r\n")
        assert s.login("joe", "secret") == (235, b"ok, go ahead (#2.0.0)")
        refused = s.sendmail("a@b.c", ["x@elsewhere.org"], b"Subject: smtplib auth\r\n\r\nhi\r\n")
        assert refused == {}

    r = with_client(home, {"SMTPAUTH": smtpauth}, client)
    (fd3,) = r.checkpassword
    if mechanism == "cram":
        assert re.fullmatch(rb"joe\0[0-9a-f]{32}\0<\d+\.\d+@mx\.test>\0", fd3)
    else:
        assert fd3 == b"joe\0secret\0"
    (msg,) = r.queued
    assert msg.recipients == [b"x@elsewhere.org"]
    assert norm(msg.received) == (b"Received: from unknown (HELO client.test) (joe@127.0.0.1)\n"
                                  b"  by mx.test with ESMTPA; <DATE>\n")


# ------------------------------------------------------------------ real processes: plumbing


def test_real_checkpassword_gets_fd3_its_subprogram_dev_null_stdin_and_the_log_as_stdout(ahome):
    """Real process: fd 3, /dev/null stdin, stdout into the log and the subprogram exec are the driver's."""
    home, checkpw = ahome
    marker = os.path.join(home.root, "subprogram-ran")
    result = auth(crlf(b"NOOP") + LOGIN_JOE + crlf(b"NOOP", b"QUIT"), ahome,
                  args=[checkpw.path, "/bin/sh", "-c", 'echo "$0 $1" > "%s"' % marker,
                        "arg0", "arg1"])
    assert result.out == GREETING + OK + LOGIN_DIALOGUE + OK + BYE
    ((fd3, info),) = checkpw.calls()
    assert fd3 == b"joe\0secret\0"
    assert info == {"argv": ["/bin/sh", "-c", 'echo "$0 $1" > "%s"' % marker, "arg0", "arg1"],
                    "stdin": ""}
    with open(marker) as f:
        assert f.read() == "arg0 arg1\n"
    assert b"checkpw-stdout-marker" in result.err


def test_real_checkpassword_runs_with_sigpipe_at_its_default(home):
    """Real process: SIGPIPE at its default is a signal disposition a real child starts with."""
    seen = os.path.join(home.root, "sigign")
    shell = script(home, "checkpw-sh",
                   'sed -n "s/^SigIgn:[[:space:]]*//p" /proc/$$/status > "%s"\nexec "$@"\n' % seen)
    result = run_smtp(PLAIN_JOE + crlf(b"QUIT"), home=home, env={"SMTPAUTH": ""},
                      args=[shell, "/bin/true"])
    assert result.out == GREETING + AUTH_OK + BYE
    with open(seen) as f:
        ignored = int(f.read().strip(), 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_real_checkpassword_found_on_path(ahome):
    """Real process: the PATH search is execvp's, in the driver (a bare name needs the HOSTNAME form)."""
    home, checkpw = ahome
    out, _, _ = auth(LOGIN_JOE + crlf(b"QUIT"), ahome,
                     args=["mail.host.example", "checkpw", "/bin/true"],
                     env={"PATH": os.path.dirname(checkpw.path) + ":/usr/bin:/bin"})
    assert out == GREETING + LOGIN_DIALOGUE + BYE
    assert checkpw.fd3() == [b"joe\0secret\0"]


def test_real_checkpassword_exec_failures_are_cannot_start_exec(ahome):
    """Real exec attempts (children module, no server): missing/non-executable is CannotStart(EXEC)."""
    home, checkpw = ahome
    env = {b"PATH": b"/usr/bin:/bin"}
    missing = os.path.join(home.path, "plugins", "no-such-checkpw").encode()
    assert children.check_password([missing, b"/bin/true"], b"joe\0secret\0", env) == \
        rq.CannotStart(rq.EXEC, "No such file or directory")
    os.chmod(checkpw.path, 0o644)
    assert children.check_password([checkpw.path.encode(), b"/bin/true"], b"joe\0secret\0",
                                   env) == rq.CannotStart(rq.EXEC, "Permission denied")
    assert checkpw.calls() == []


def test_real_failed_auth_pauses_then_535(ahome):
    """Real process: the driver really sleeps once before the 535 (replies asserted, never its length)."""
    home, checkpw = ahome
    result = auth(crlf(b"EHLO c.test", b"AUTH LOGIN", b64(b"joe"), b64(b"Wr0ng-Pa55w0rd"),
                       b"NOOP", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@elsewhere.org>", b"QUIT"),
                  ahome)
    assert result.out == (GREETING + ehlo(LOGIN_PLAIN) + USER_PROMPT + PASSWORD_PROMPT + FAILED
                          + OK + OK + NOGATEWAY + BYE)
    assert result.status == 0
    assert checkpw.fd3() == [b"joe\0Wr0ng-Pa55w0rd\0"]
    for secret in (b"Wr0ng-Pa55w0rd", b"secret"):
        assert secret not in result.err
        assert b64(secret) not in result.err


def test_real_cram_challenge_has_the_server_pid_and_clock(ahome):
    """Real process: the challenge's pid and time come from the driver (getpid(), the real clock)."""
    home, checkpw = ahome
    with Conversation(home, env={"SMTPAUTH": "cram"}, args=[checkpw.path, "/bin/true"]) as c:
        assert c.reply() == GREETING
        start = int(time.time())
        first = c.command(b"AUTH CRAM-MD5")
        m = RE_CHALLENGE.fullmatch(first)
        assert m, first
        challenge = base64.b64decode(m.group(1), validate=True)
        digest = cram_digest(challenge)
        assert c.command(b64(b"joe " + digest)) == AUTH_OK
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


def test_swaks_auth_login_relays(tcpservers, ahome):
    """Real processes: a real client (swaks) against the server under the real tcpserver."""
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

"""Client-controlled strings versus shells, plugins, headers.

* The HELO argument, MAIL/RCPT addresses and AUTH user names reach qmail-spp plugins
  (SMTPHELOHOST, SMTPMAILFROM, SMTPRCPTTO, SMTPAUTHUSER) and SMTPEXTFORK programs
  (REMOTEHELO, REMOTEMF, REMOTERCPT) only as environment values: the programs get no
  arguments ($# is 0), the values are byte-exact, and shell metacharacters in them are
  never evaluated (no marker file appears).
* Received: sanitising (spec §4.2): every byte of REMOTEHOST, HELO, REMOTEINFO (also
  from AUTH and MAIL's AUTH= parameter) outside `A-Z a-z 0-9 . @ % + / = : - [ ]`
  becomes `?`; CR, LF, 8-bit bytes, space, `(`, `)`, `;` included.
* Header injection: a client cannot make the server add a header line. Command lines
  end at LF, so `\\r\\nX-Injected: 1` in a HELO or address starts a new (unknown)
  command; a lone CR stays inside the value and is sanitised in Received:. Only
  plugins (H) add headers, and even a plugin copying a client value into an H line
  gets exactly one line.

The probes run in-process (the session core against the reference world, t/world.py,
with each qmail home's control files read by the real loader): what each plugin,
program and checkpassword is started with (argv, environment) and what is queued.  The
test_real_* tests run the installed program over pipes with real /bin/sh plugins,
programs and checkpassword for a couple of payloads each: that the values reach a real
process's environment byte for byte and a real shell never evaluates them (no marker
file appears).
"""

import base64
import os

import pytest
from test_auth import CheckPw
from test_pipes import session

from qmail_smtpd_py.core import requests as rq

from helpers import ACC, BYE, GO, GREETING, HELO250, OK, crlf, norm, run_smtp
from world import Plugin

UNIMPL = b"502 unimplemented (#5.5.1)\r\n"
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
BODY = b"Subject: t\r\n\r\nhi\r\n.\r\n"

# The Received: alphabet of notqmail (spec §4.2), written out independently of the code.
ALLOWED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-[]")


def san(value):
    return bytes(c if c in ALLOWED else ord("?") for c in value)


# {M} is replaced by the absolute path of the test's marker file (in-process: FAKE_MARKER).
PAYLOADS = {
    "dollar-paren": b"$(touch {M})",
    "backticks": b"`touch {M}`",
    "semicolon": b"x;touch {M}",
    "pipe": b"x|touch {M}",
    "and": b"x&&touch {M}",
    "background": b"x&touch {M}&",
    "single-quotes": b"x';touch {M};'",
    "double-quotes": b'x";touch {M};"',
    "redirect": b"x>{M}",
    "dash-x": b"-x",
    "double-dash": b"--help -c touch {M}",
    "dollar-brace": b"${IFS}$(touch${IFS}{M})",
    "cr": b"x\rtouch {M}\r",
    "8bit": b"\xff\xfe$(touch {M})\x80",
    "glob-tilde": b"~/* ?[a] {a,b} $HOME",
    "newline-escape": b"x\\\ntouch {M}".replace(b"\n", b"n"),
}


FAKE_MARKER = "/nonexistent/pwned"
# The payloads the real-process tests also run through real shells.
REAL_PAYLOADS = ["8bit", "single-quotes"]


def payload(name, marker=FAKE_MARKER):
    return PAYLOADS[name].replace(b"{M}", os.fsencode(marker))


def addr_ok(name):
    """Payloads that survive address parsing unchanged (no quote, backslash or `>`)."""
    return not any(c in PAYLOADS[name] for c in b'"\\>')


def recorder(home, name, var):
    """A /bin/sh program home/plugins/NAME recording $#, "$*" and the value of VAR into
    home.root/NAME.{argc,argv,value} (printf '%s', byte-exact)."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    out = os.path.join(home.root, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                "printf '%%s' \"$#\" > '%s.argc'\n"
                "printf '%%s' \"$*\" > '%s.argv'\n"
                "printf '%%s' \"$%s\" > '%s.value'\n" % (out, out, var, out))
    os.chmod(path, 0o755)

    def read():
        got = {}
        for ext in ("argc", "argv", "value"):
            with open(out + "." + ext, "rb") as f:
                got[ext] = f.read()
        return got

    return path, read


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield str(path)
    assert not path.exists(), "a client string was evaluated by a shell"


def smtp_session(helo, mail, rcpt):
    return (b"HELO " + helo + b"\r\nMAIL FROM:<" + mail + b"@b.c>\r\nRCPT TO:<" + rcpt
            + b"@example.com>\r\nDATA\r\n" + BODY + b"QUIT\r\n")


STD = GREETING + HELO250 + OK + OK + GO + ACC + BYE
SILENT = (b"", 0)  # a plugin that prints nothing and exits 0


def started(r, var):
    """(argv, value of var) of each plugin the session started, in order."""
    return [(argv, env.get(var)) for argv, env in r.plugin_runs]


# ------------------------------------------------------------------ qmail-spp plugins

SPP_CONF = "[helo]\n/p/helo\n[mail]\n/p/mail\n[rcpt]\n:/p/rcpt\n"
SPP_PLUGINS = {b"/p/helo": SILENT, b"/p/mail": SILENT, b":/p/rcpt": SILENT}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_spp_plugins_get_client_strings_only_as_environment(make_home, name):
    """The plain file form runs the program with no arguments; the `:` form runs
    /bin/sh -c with exactly the configured command: no client byte in any argv."""
    home = make_home(control={"smtpplugins": SPP_CONF})
    value = payload(name)
    addr = value if addr_ok(name) else b"plain"
    r = session(smtp_session(value, addr, addr), home, plugins=SPP_PLUGINS)
    assert norm(r.out) == STD
    assert len(r.queued) == 1
    runs = r.plugin_runs
    assert [argv for argv, _ in runs] == [(b"/p/helo",), (b"/p/mail",),
                                          (b"/bin/sh", b"-c", b"/p/rcpt")]
    assert runs[0][1][b"SMTPHELOHOST"] == value
    assert runs[1][1][b"SMTPMAILFROM"] == addr + b"@b.c"
    assert runs[2][1][b"SMTPRCPTTO"] == addr + b"@example.com"
    assert r.queued[0].sender == addr + b"@b.c"
    assert r.queued[0].recipients == [addr + b"@example.com"]


@pytest.mark.parametrize("name", REAL_PAYLOADS)
def test_real_spp_plugins_get_client_strings_only_as_environment(make_home, marker, name):
    """Real /bin/sh plugins (both forms) get the value in a real environment, unevaluated."""
    home = make_home()
    value = payload(name, marker)
    helo, read_helo = recorder(home, "helo", "SMTPHELOHOST")
    mail, read_mail = recorder(home, "mail", "SMTPMAILFROM")
    rcpt, read_rcpt = recorder(home, "rcpt", "SMTPRCPTTO")
    # the plain file form and the `:` form (/bin/sh -c 'REST': no arguments either)
    home.control("smtpplugins", "[helo]\n%s\n[mail]\n%s\n[rcpt]\n:%s\n" % (helo, mail, rcpt))
    addr = value if addr_ok(name) else b"plain"
    r = run_smtp(smtp_session(value, addr, addr), home=home)
    assert norm(r.out) == STD
    assert len(r.queued) == 1
    assert read_helo() == {"argc": b"0", "argv": b"", "value": value}
    assert read_mail() == {"argc": b"0", "argv": b"", "value": addr + b"@b.c"}
    assert read_rcpt() == {"argc": b"0", "argv": b"", "value": addr + b"@example.com"}
    assert r.queued[0].sender == addr + b"@b.c"
    assert r.queued[0].recipients == [addr + b"@example.com"]


# ------------------------------------------------------------------ SMTPEXTFORK programs

XF_VARS = (b"REMOTEHELO", b"REMOTEMF", b"REMOTERCPT")


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_extfork_programs_get_client_strings_only_as_environment(home, name):
    """RunProgram has no arguments at all: the values are in its environment only."""
    value = payload(name)
    paths = [b"/p/xf" + var for var in XF_VARS]
    addr = value if addr_ok(name) else b"plain"
    r = session(smtp_session(value, addr, addr), home,
                env={"SMTPEXTFORK": b",".join(paths)}, programs=dict.fromkeys(paths, 0))
    assert norm(r.out) == STD
    assert len(r.queued) == 1
    assert [path for path, _ in r.program_runs] == paths
    expect = [value, addr + b"@b.c", addr + b"@example.com"]
    for (_, env), var, want in zip(r.program_runs, XF_VARS, expect):
        assert env[var] == want


@pytest.mark.parametrize("name", REAL_PAYLOADS)
def test_real_extfork_programs_get_client_strings_only_as_environment(make_home, marker,
                                                                      name):
    """Real /bin/sh programs get no arguments and the value in a real environment."""
    home = make_home()
    value = payload(name, marker)
    progs = [recorder(home, "xf" + v, v) for v in ("REMOTEHELO", "REMOTEMF", "REMOTERCPT")]
    addr = value if addr_ok(name) else b"plain"
    r = run_smtp(smtp_session(value, addr, addr), home=home,
                 env={"SMTPEXTFORK": ",".join(p for p, _ in progs)})
    assert norm(r.out) == STD
    assert len(r.queued) == 1
    expect = [value, addr + b"@b.c", addr + b"@example.com"]
    for (_, read), want in zip(progs, expect):
        assert read() == {"argc": b"0", "argv": b"", "value": want}


# ------------------------------------------------------------------ AUTH user names


def b64(data):
    return base64.b64encode(data)


def fake_checkpassword(data):
    """test_auth's fake checkpassword: any secret for a user starting with `anyone`."""
    return 0 if data.split(b"\0")[0].startswith(b"anyone") else 1


AUTH_EXTRA = {"lf": b"x\ntouch {M}", "crlf-header": b"x\r\nX-Injected: 1\r\n"}
AUTH_NAMES = sorted(PAYLOADS) + sorted(AUTH_EXTRA)


def auth_user(name, marker=FAKE_MARKER):
    if name in AUTH_EXTRA:
        return b"anyone" + AUTH_EXTRA[name].replace(b"{M}", os.fsencode(marker))
    return b"anyone" + payload(name, marker)


def auth_dialogue(user):
    return (crlf(b"EHLO c.test", b"AUTH PLAIN " + b64(b"\0" + user + b"\0pw"),
                 b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@other.org>", b"DATA") + BODY + b"QUIT\r\n")


def auth_received(user):
    return (b"Received: from unknown (HELO c.test) (" + san(user)
            + b"@127.0.0.1)\n  by mx.test with ESMTPA; <DATE>\n")


@pytest.mark.parametrize("name", AUTH_NAMES)
def test_auth_user_reaches_plugins_only_as_environment(make_home, name):
    """AUTH user names are base64: they can carry LF too. The user goes to
    checkpassword on fd 3, never in argv."""
    home = make_home(control={"smtpplugins": "[auth]\n/p/auth\n[mail]\n/p/mail\n"})
    user = auth_user(name)
    r = session(auth_dialogue(user), home, env={"SMTPAUTH": ""},
                args=("/p/checkpw", "/bin/true"), checkpassword=fake_checkpassword,
                plugins={b"/p/auth": SILENT, b"/p/mail": SILENT})
    assert AUTH_OK in r.out and norm(r.out).endswith(OK + OK + GO + ACC + BYE)
    assert started(r, b"SMTPAUTHUSER") == [((b"/p/auth",), user), ((b"/p/mail",), user)]
    [fd3] = r.checkpassword
    assert fd3.split(b"\0")[0] == user
    [call] = [q for q in r.requests if type(q) is rq.CheckPassword]
    assert call.argv == (b"/p/checkpw", b"/bin/true")
    [q] = r.queued
    assert norm(q.received) == auth_received(user)
    assert q.body == b"Subject: t\n\nhi\n"
    assert header_names(q.message) == [b"Received", b"Subject"]


@pytest.mark.parametrize("name", ["lf", "8bit"])
def test_real_auth_user_reaches_plugins_only_as_environment(make_home, marker, name):
    """A real checkpassword gets the user on fd 3 only, real sh plugins as SMTPAUTHUSER."""
    home = make_home()
    checkpw = CheckPw(home)
    user = auth_user(name, marker)
    auth, read_auth = recorder(home, "auth", "SMTPAUTHUSER")
    mail, read_mail = recorder(home, "mail", "SMTPAUTHUSER")
    home.control("smtpplugins", "[auth]\n%s\n[mail]\n%s\n" % (auth, mail))
    r = run_smtp(auth_dialogue(user), home=home, env={"SMTPAUTH": ""},
                 args=[checkpw.path, "/bin/true"])
    assert AUTH_OK in r.out and norm(r.out).endswith(OK + OK + GO + ACC + BYE)
    assert read_auth() == {"argc": b"0", "argv": b"", "value": user}
    assert read_mail() == {"argc": b"0", "argv": b"", "value": user}
    [(fd3, call)] = checkpw.calls()
    assert fd3.split(b"\0")[0] == user
    assert call["argv"] == ["/bin/true"]
    [q] = r.queued
    assert norm(q.received) == auth_received(user)
    assert q.body == b"Subject: t\n\nhi\n"
    assert header_names(q.message) == [b"Received", b"Subject"]


# ------------------------------------------------------------------ Received: sanitising

EVERY_HELO_BYTE = bytes(c for c in range(1, 256) if c not in (10, 32)) + b" (x);y\rz"
EVERY_ENV_BYTE = bytes(range(1, 256)) + b"(a);b\r\nX-Injected: 1"
EVERY_BYTE_SESSION = (b"HELO " + EVERY_HELO_BYTE + b"\r\nMAIL FROM:<a@b.c>\r\n"
                      b"RCPT TO:<u@example.com>\r\nDATA\r\n" + BODY)
EVERY_BYTE_ENV = {"TCPREMOTEHOST": EVERY_ENV_BYTE, "TCPREMOTEINFO": EVERY_ENV_BYTE[::-1]}


def check_every_byte_received(q):
    assert norm(q.received) == (b"Received: from " + san(EVERY_ENV_BYTE) + b" (HELO "
                                + san(EVERY_HELO_BYTE) + b") (" + san(EVERY_ENV_BYTE[::-1])
                                + b"@127.0.0.1)\n  by mx.test with SMTP; <DATE>\n")
    assert q.message.count(b"\n") == 2 + q.body.count(b"\n")
    assert q.body == b"Subject: t\n\nhi\n"
    fields = q.received[len(b"Received: from "):q.received.index(b"@127.0.0.1)")]
    assert set(fields.replace(b" (HELO ", b"").replace(b") (", b"")) <= ALLOWED | {ord("?")}


def test_received_sanitises_every_byte_outside_the_alphabet(home):
    """HELO (any byte but NUL and LF, CR included) and the environment values
    TCPREMOTEHOST/TCPREMOTEINFO (any byte but NUL): one `?` per byte outside the set."""
    r = session(EVERY_BYTE_SESSION, home, env=EVERY_BYTE_ENV)
    [q] = r.queued
    check_every_byte_received(q)


def test_real_environment_bytes_reach_received(home):
    """Every byte of a real process environment (os.environb) reaches Received: sanitised."""
    r = run_smtp(EVERY_BYTE_SESSION, home=home, env=EVERY_BYTE_ENV)
    [q] = r.queued
    check_every_byte_received(q)


@pytest.mark.parametrize("c", [b"\r", b"\x80", b"\xff", b"(", b")", b";", b" ", b"_",
                               b"<", b">", b"\t", b",", b"\"", b"\\", b"`", b"$"])
def test_each_bad_byte_becomes_a_question_mark(home, c):
    r = session(b"HELO a" + c + b"b\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\n"
                b"DATA\r\n" + BODY, home)
    assert r.queued[0].received.startswith(b"Received: from unknown (HELO a?b) (127.0.0.1)\n")


def test_mail_auth_parameter_is_sanitised_in_received(home):
    """The AUTH patch takes MAIL's AUTH=<user> as REMOTEINFO when not authenticated."""
    r = session(crlf(b"EHLO c.test", b"MAIL FROM:<a@b.c> AUTH=x(y);z\r$(w)",
                     b"RCPT TO:<u@example.com>", b"DATA") + BODY,
                home, env={"SMTPAUTH": ""}, args=("/p/checkpw", "/bin/true"))
    [q] = r.queued
    info = q.received.split(b") (", 1)[1].split(b"@127.0.0.1)")[0]
    assert set(info) <= ALLOWED | {ord("?")}
    assert q.message.count(b"\n") == 2 + q.body.count(b"\n")
    assert info == b"x?y??z???w?"  # the whole AUTH= value, sanitised


# ------------------------------------------------------------------ header injection


def header_names(message):
    head = message.split(b"\n\n", 1)[0]
    return [line.split(b":", 1)[0] for line in head.split(b"\n") if line[:1] not in b" \t"]


@pytest.mark.parametrize("helo, replies", [
    (b"HELO x\r\nX-Injected: 1\r\n", HELO250 + UNIMPL),
    (b"HELO x\nX-Injected: 1\n", HELO250 + UNIMPL),
    (b"HELO x\rX-Injected: 1\r\n", HELO250),
    (b"HELO x)\r\n (X-Injected: 1\r\n", HELO250 + UNIMPL),
])
def test_helo_cannot_add_a_header(home, helo, replies):
    r = session(helo + crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA")
                + BODY, home)
    assert norm(r.out) == GREETING + replies + OK + OK + GO + ACC
    [q] = r.queued
    assert header_names(q.message) == [b"Received", b"Subject"]
    assert b"\nX-Injected" not in q.message and b"\rX-Injected" not in q.message


@pytest.mark.parametrize("mail, rcpt, replies", [
    (b"MAIL FROM:<a@b.c>\r\nX-Injected: 1>", b"RCPT TO:<u@example.com>", OK + UNIMPL + OK),
    (b"MAIL FROM:<a@b.c\rX-Injected: 1>", b"RCPT TO:<u@example.com>", OK + OK),
    (b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>\r\nX-Injected: 1>", OK + OK + UNIMPL),
    (b"MAIL FROM:<a@b.c>", b"RCPT TO:<\"u\rX-Injected: 1\"@example.com>", OK + OK),
])
def test_addresses_cannot_add_a_header(home, mail, rcpt, replies):
    r = session(crlf(b"HELO c.test", mail, rcpt, b"DATA") + BODY, home)
    assert norm(r.out) == GREETING + HELO250 + replies + GO + ACC
    [q] = r.queued
    assert header_names(q.message) == [b"Received", b"Subject"]
    assert b"X-Injected" not in q.message


HELO_CR = crlf(b"HELO x\rX-Injected: 1", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
               b"DATA") + BODY


def test_only_a_plugin_adds_headers_and_a_client_value_stays_one_line(make_home):
    """A plugin that copies the HELO into an H line: a CR in the HELO stays inside that
    one line (the client cannot send an LF)."""
    home = make_home(control={"smtpplugins": "[helo]\n/p/hdr\n"})
    copy = Plugin(lambda env: b"HX-Helo: " + env[b"SMTPHELOHOST"] + b"\n")
    r = session(HELO_CR, home, plugins={b"/p/hdr": copy})
    [q] = r.queued
    assert header_names(q.message) == [b"Received", b"X-Helo", b"Subject"]
    assert q.message.split(b"\n")[2] == b"X-Helo: x\rX-Injected: 1"


def test_real_plugin_output_is_split_at_lf_only(make_home):
    """A real plugin's stdout pipe is split at LF only: its CR stays inside one H line."""
    home = make_home()
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory)
    path = os.path.join(directory, "hdr")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nprintf 'HX-Helo: %s\\n' \"$SMTPHELOHOST\"\n")
    os.chmod(path, 0o755)
    home.control("smtpplugins", "[helo]\n%s\n" % path)
    r = run_smtp(HELO_CR, home=home)
    [q] = r.queued
    assert header_names(q.message) == [b"Received", b"X-Helo", b"Subject"]
    assert q.message.split(b"\n")[2] == b"X-Helo: x\rX-Injected: 1"

"""The rcptcheck sample plugin as installed (next to qmail-smtpd-py, with the
venv's interpreter), run by the installed server over pipes and through
`qmail-smtpd-py plugin-test`.

The qmail installation is spec §12's (test_recipients.spec_site) with the
server's qmail home as its qmail home: control/locals, virtualdomains,
users/cdb built with the project's qmail-newu, home directories with .qmail
files, and the test accounts in a passwd file the plugin reads through
RCPTCHECK_PASSWD.  The resolution itself is tested in-process
(test_recipients.py); these tests pin what the client, the queue and the
log see.

Behaviour: plugins/rcptcheck (its docstring is the manual).
"""

import os
import re
import subprocess

import pytest

from helpers import ACC, BIN_DIR, GO, OK, SERVER, crlf, norm, require_server, run_smtp
from test_recipients import spec_site

RCPTCHECK = os.path.join(BIN_DIR, "rcptcheck")

GREETING = b"220 mail.example.org ESMTP\r\n"
BYE = b"221 mail.example.org\r\n"
NO_MAILBOX = b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"


@pytest.fixture
def site(make_home):
    if not os.access(RCPTCHECK, os.X_OK):
        pytest.fail(f"{RCPTCHECK} is not installed next to the server (pip install .)")
    home = make_home(control={"smtpplugins": f"[rcpt]\n{RCPTCHECK}\n"})
    site = spec_site(home.root, qmail=home.path)
    site.server_home = home
    site.env = {"RCPTCHECK_PASSWD": os.fsdecode(site.passwd_file())}
    return site


def session(*rcpts, data=False):
    lines = [b"MAIL FROM:<a@sender.test>"] + [b"RCPT TO:<%s>" % r for r in rcpts]
    if data:
        lines += [b"DATA", b"Subject: t", b"", b"hi", b"."]
    return crlf(*lines, b"QUIT")


def run(site, data, env=None, args=()):
    full = dict(site.env, **(env or {}))
    res = run_smtp(data, env=full, home=site.server_home, args=args)
    assert b"Traceback" not in res.err and b"internal error" not in res.err, res.err
    assert res.status == 0
    return res


def plugin_log(err):
    return re.findall(rb"^rcptcheck: pid \d+: (.*)$", err, re.MULTILINE)


def test_unknown_recipients_are_refused_and_the_rest_delivered(site):
    res = run(site, session(b"joe@example.org", b"joe-nosuch@example.org",
                            b"joe-sos@example.org", b"postmaster@example.org",
                            b"bob@virt.example.com", b"anyone@vpop.example.net",
                            b"x@ext.example.com", data=True))
    assert norm(res.out) == (GREETING + OK + OK + NO_MAILBOX + OK + OK + NO_MAILBOX + OK + OK
                             + GO + ACC + BYE)
    (msg,) = res.queued
    assert msg.recipients == [b"joe@example.org", b"joe-sos@example.org",
                              b"postmaster@example.org", b"anyone@vpop.example.net",
                              b"x@ext.example.com"]
    joe_home = site.passwd[b"joe"][3]  # bob@virt.example.com is joe's (virtualdomains)
    assert plugin_log(res.err) == [
        b"refused <joe-nosuch@example.org>: no .qmail-nosuch or .qmail-default in " + joe_home,
        b"refused <bob@virt.example.com>: no .qmail-bob or .qmail-default in " + joe_home,
    ]


def test_relay_clients_are_not_checked(site):
    res = run(site, session(b"joe-nosuch@example.org"), env={"RELAYCLIENT": ""})
    assert res.out == GREETING + OK + OK + BYE
    assert plugin_log(res.err) == []


def test_authenticated_sessions_are_not_checked(site):
    data = crlf(b"EHLO c.test", b"AUTH PLAIN AGpvZQBzZWNyZXQ=", b"MAIL FROM:<a@sender.test>",
                b"RCPT TO:<joe-nosuch@example.org>", b"QUIT")
    res = run(site, data, env={"SMTPAUTH": ""}, args=("/bin/true",))
    assert res.out.endswith(AUTH_OK + OK + OK + BYE)
    assert plugin_log(res.err) == []


@pytest.mark.parametrize("value", ["", "1"])
def test_norcptcheck_skips(site, value):
    res = run(site, session(b"joe-nosuch@example.org"), env={"NORCPTCHECK": value})
    assert res.out == GREETING + OK + OK + BYE
    assert plugin_log(res.err) == []


def test_recipients_the_server_refuses_are_left_to_it(site):
    res = run(site, session(b"joe@elsewhere.test"))
    assert res.out == GREETING + OK + NOGATEWAY + BYE
    assert plugin_log(res.err) == []


def test_cannot_tell_accepts_and_logs_why(site):
    """A users/cdb that is cut short: qmail would defer, so nothing is refused."""
    with open(os.path.join(site.qmail, b"users", b"cdb"), "wb") as f:
        f.write(b"\0" * 10)
    res = run(site, session(b"joe-nosuch@example.org", b"nosuch@example.org"),
              env={"RCPTCHECK_AUTO_PATRN": "rw"})
    assert res.out == GREETING + OK + OK + OK + BYE
    log = plugin_log(res.err)
    assert log.count(b"RCPTCHECK_AUTO_PATRN='rw' is not an octal mode; using 002") == 2
    assert [line for line in log if line.startswith(b"accepting")] == [
        b"accepting <joe-nosuch@example.org>: users/cdb: truncated cdb",
        b"accepting <nosuch@example.org>: users/cdb: truncated cdb",
    ]


def test_unreadable_passwd_file_accepts(site):
    res = run(site, session(b"joe-nosuch@example.org"),
              env={"RCPTCHECK_PASSWD": "/nonexistent/passwd"})
    assert res.out == GREETING + OK + OK + BYE
    assert plugin_log(res.err) == [(b"accepting <joe-nosuch@example.org>: cannot read "
                                    b"/nonexistent/passwd: No such file or directory")]


def test_plugin_test_shows_the_refusal(site, tmp_path):
    require_server()
    cmd = [SERVER, "plugin-test", "--qmail-home", os.fsdecode(site.qmail),
           "--env", "RCPTCHECK_PASSWD=" + site.env["RCPTCHECK_PASSWD"],
           "--to", "joe-nosuch@example.org", "--to", "joe-sos@example.org", "rcptcheck"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
                       capture_output=True, timeout=60, check=False)
    assert (p.returncode, p.stderr) == (0, b"")
    lines = norm(p.stdout).decode().splitlines()
    assert lines[0] == "# [rcpt] " + RCPTCHECK
    first = lines.index("C: RCPT TO:<joe-nosuch@example.org>")
    second = lines.index("C: RCPT TO:<joe-sos@example.org>")
    answer = lines[first + 1:second]  # log lines (L:) and the reply (S:)
    assert [line for line in answer if line.startswith("S: ")] == [
        "S: " + NO_MAILBOX.decode().rstrip()]
    assert any(re.fullmatch(r"L: rcptcheck: pid \d+: refused <joe-nosuch@example\.org>: "
                            r"no \.qmail-nosuch or \.qmail-default in .*/homes/joe", line)
               for line in answer), answer
    assert lines[second + 1] == "S: 250 ok"
    assert "Q: from <sender@example.org> to <joe-sos@example.org>" in lines

"""qmail-smtpd-py as a network daemon on loopback, driven by swaks and smtplib, the way a
qmail installation runs it: tcprules CDBs setting RELAYCLIENT, an envdir-configured
daemontools-style command line, and delivery through bin/qmail-queue-maildir into a
Maildir.

Every test runs twice (the conftest.py fixture `servers`): under the real tcpserver
(ucspi-tcp) and under the pool `qmail-smtpd-py serve`, which must behave the
same. Both run with -R -H (no ident or DNS look-ups) and -l mx.test, so the server sees
TCPREMOTEIP=127.0.0.1, TCPLOCALHOST=mx.test and no TCPREMOTEHOST.
"""

import os
import smtplib
import subprocess

import pytest

from helpers import QUEUE_MAILDIR, RE_DATE, norm, require_tools

RECEIVED = (b"Received: from unknown (HELO client.test) (127.0.0.1)\n"
            b"  by mx.test with SMTP; <DATE>\n")
NOGATEWAY = b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


def swaks(port, *args):
    require_tools("swaks")
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@b.c",
                        "--helo", "client.test", "--timeout", "20", *args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    return p.returncode, p.stdout


def tcprules(tmp_path, name, text):
    """Compile a tcprules file with the real tcprules; returns the cdb path."""
    require_tools("tcprules")
    cdb = str(tmp_path / (name + ".cdb"))
    subprocess.run(["tcprules", cdb, cdb + ".tmp"], input=text, check=True)
    return cdb


# ------------------------------------------------------------------ deliveries


def test_swaks_delivery_into_the_queue(servers, home):
    port = servers.start(home).port
    status, transcript = swaks(port, "--to", "u@example.com",
                               "--header", "Subject: swaks test", "--body", "hello from swaks")
    assert status == 0, transcript
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"
    assert norm(msg.received) == RECEIVED
    assert b"\nSubject: swaks test\n" in msg.message
    assert b"\n\nhello from swaks\n" in msg.message  # swaks adds blank lines at the end
    assert b"\r" not in msg.message


def test_smtplib_delivery_with_dot_stuffing(servers, home):
    server = servers.start(home)
    port = server.port
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
        assert s.ehlo() == (250, b"mx.example.org\nPIPELINING\n8BITMIME")
        refused = s.sendmail("a@b.c", ["u@example.com", "v@x.sub.example.net"],
                             b"Subject: smtplib test\r\n\r\n.leading dot\r\nhello\r\n")
        assert refused == {}
        assert s.noop() == (250, b"ok")
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0Tv@x.sub.example.net\0\0"
    assert norm(msg.message) == RECEIVED + b"Subject: smtplib test\n\n.leading dot\nhello\n"
    ((pid, status),) = server.ends(1)  # both launchers log `pid N from` and `end N status 0`
    assert status == 0 and server.session_pids() == [pid]


# ------------------------------------------------------------------ tcprules and RELAYCLIENT


def try_relay(port):
    """MAIL, then RCPT to a domain outside rcpthosts; returns the RCPT reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
        assert s.mail("a@b.c") == (250, b"ok")
        reply = s.rcpt("u@elsewhere.org")
        if reply[0] == 250:
            assert s.data(b"Subject: relayed\r\n\r\nhi\r\n")[0] == 250
        return reply


def test_tcprules_relayclient_allows_relaying(servers, home, tmp_path):
    rules = tcprules(tmp_path, "relay", b'127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    port = servers.start(home, rules=rules).port
    assert try_relay(port) == (250, b"ok")
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@elsewhere.org\0\0"


def test_tcprules_without_relayclient_refuses_relaying(servers, home, tmp_path):
    rules = tcprules(tmp_path, "norelay", b"127.0.0.1:allow\n:allow\n")
    port = servers.start(home, rules=rules).port
    assert try_relay(port) == (553, NOGATEWAY)
    assert home.queued() == []


def test_tcprules_relayclient_suffix(servers, home, tmp_path):
    rules = tcprules(tmp_path, "suffix", b'127.0.0.1:allow,RELAYCLIENT="+gw"\n')
    port = servers.start(home, rules=rules).port
    assert try_relay(port) == (250, b"ok")
    assert home.queued()[0].recipients == [b"u@elsewhere.org+gw"]


# ------------------------------------------------------------------ envdir + Maildir


def test_envdir_run_delivers_into_maildir(servers, home, tmp_path):
    """A daemontools-style `envdir ./env tcpserver ... qmail-smtpd-py` (or `envdir ./env
    qmail-smtpd-py serve ...`) with QMAILQUEUE=qmail-queue-maildir; DATABYTES from the
    envdir is honoured too."""
    maildir = tmp_path / "Maildir"
    envdir = tmp_path / "env"
    envdir.mkdir()
    for name, value in {"QMAILHOME": home.path, "QMAILQUEUE": QUEUE_MAILDIR,
                        "MAILDIR": str(maildir), "DATABYTES": "2000"}.items():
        (envdir / name).write_text(value + "\n")
    port = servers.start(envdir="./env", cwd=str(tmp_path)).port

    status, transcript = swaks(port, "--to", "u@example.com",
                               "--header", "Subject: maildir test", "--body", "into the Maildir")
    assert status == 0, transcript
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
        with pytest.raises(smtplib.SMTPDataError) as too_big:
            s.sendmail("a@b.c", ["u@example.com"], b"Subject: big\r\n\r\n" + b"x" * 3000)
    assert (too_big.value.smtp_code, too_big.value.smtp_error) == (
        552, b"sorry, that message size exceeds my databytes limit (#5.3.4)")

    (name,) = os.listdir(maildir / "new")  # the oversized message was not delivered
    assert os.listdir(maildir / "tmp") == []
    delivered = (maildir / "new" / name).read_bytes()
    lines = delivered.split(b"\n")
    assert lines[0] == b"Return-Path: <a@b.c>"
    assert lines[1] == b"Delivered-To: u@example.com"
    assert lines[2].startswith(b"Received: (qmail ") and b" invoked from network); " in lines[2]
    assert RE_DATE.search(lines[2])
    assert norm(b"\n".join(lines[3:5]) + b"\n") == RECEIVED
    assert b"\nSubject: maildir test\n" in delivered
    assert b"\n\ninto the Maildir\n" in delivered

"""SMTPUTF8 (RFC 6531): off by default (EHLO stays netqmail's); with SMTPUTF8 set it is
advertised, the MAIL parameter is taken, UTF-8 addresses reach plugins and qmail-queue
byte for byte, and the Received line says UTF8SMTP (RFC 6531 §3.7.3)."""

import os
import smtplib

from test_auth import CheckPw, auth, b64

from helpers import crlf, run_smtp, script

SENDER = "jöran@bücher.example".encode()
RCPT = "δοκιμή@example.com".encode()
NETQMAIL_EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
UTF8_EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"


def utf8_session(mail_params=b" SMTPUTF8"):
    return crlf(b"EHLO c.test", b"MAIL FROM:<" + SENDER + b">" + mail_params,
                b"RCPT TO:<" + RCPT + b">", b"DATA", b"Subject: t", b"", b"hi", b".", b"QUIT")


def test_off_by_default_ehlo_is_netqmails(home):
    result = run_smtp(crlf(b"EHLO c.test", b"QUIT"), home=home)
    assert result.out.split(b"\r\n", 1)[1].startswith(NETQMAIL_EHLO)


def test_smtputf8_0_or_empty_is_off(home):
    for value in ("", "0"):
        result = run_smtp(crlf(b"EHLO c.test", b"QUIT"), home=home, env={"SMTPUTF8": value})
        assert b"SMTPUTF8" not in result.out


def test_enabled_it_is_advertised(home):
    result = run_smtp(crlf(b"EHLO c.test", b"QUIT"), home=home, env={"SMTPUTF8": "1"})
    assert result.out.split(b"\r\n", 1)[1].startswith(UTF8_EHLO)


def test_helo_does_not_advertise(home):
    result = run_smtp(crlf(b"HELO c.test", b"QUIT"), home=home, env={"SMTPUTF8": "1"})
    assert b"SMTPUTF8" not in result.out


def test_utf8_addresses_reach_the_queue_intact(home):
    result = run_smtp(utf8_session(), home=home, env={"SMTPUTF8": "1"})
    assert b"\r\n250 ok " in result.out
    [msg] = result.queued
    assert msg.envelope == b"F" + SENDER + b"\0T" + RCPT + b"\0\0"
    assert b" with UTF8SMTP; " in msg.received


def test_the_parameter_is_case_insensitive_and_may_follow_others(home):
    result = run_smtp(utf8_session(b" BODY=8BITMIME smtputf8"), home=home,
                      env={"SMTPUTF8": "1"})
    [msg] = result.queued
    assert b" with UTF8SMTP; " in msg.received


def test_without_the_parameter_the_transaction_is_plain_smtp(home):
    """As notqmail, 8-bit addresses are taken either way; only a transaction that
    asked for SMTPUTF8 is recorded as one."""
    result = run_smtp(utf8_session(b""), home=home, env={"SMTPUTF8": "1"})
    [msg] = result.queued
    assert msg.envelope.startswith(b"F" + SENDER + b"\0")
    assert b" with SMTP; " in msg.received


def test_disabled_the_parameter_changes_nothing(home):
    result = run_smtp(utf8_session(), home=home)
    [msg] = result.queued
    assert b" with SMTP; " in msg.received


def test_authenticated_utf8_is_utf8smtpa(home):
    checkpw = CheckPw(home)
    script = crlf(b"EHLO c.test", b"AUTH PLAIN " + b64(b"\0joe\0secret"),
                  b"MAIL FROM:<" + SENDER + b"> SMTPUTF8", b"RCPT TO:<u@elsewhere.org>",
                  b"DATA", b"hi", b".", b"QUIT")
    result = auth(script, (home, checkpw), env={"SMTPUTF8": "1"})
    assert b"250-SMTPUTF8\r\n" in result.out
    [msg] = result.queued
    assert b" with UTF8SMTPA; " in msg.received


def test_plugins_see_the_addresses_byte_for_byte(home):
    record = os.path.join(home.root, "seen")
    script(home, "record", "printf '%%s\\n%%s' \"$SMTPMAILFROM\" \"$SMTPRCPTTO\" > %s\n"
           % record)
    home.control("smtpplugins", "[rcpt]\nplugins/record\n")
    run_smtp(utf8_session(), home=home, env={"SMTPUTF8": "1"})
    with open(record, "rb") as f:
        assert f.read() == SENDER + b"\n" + RCPT


def test_smtplib_sends_an_internationalised_message(tcpservers, home):
    """Python's smtplib, a real RFC 6531 client: it uses SMTPUTF8 only when offered."""
    server = tcpservers.start(home, env={"SMTPUTF8": "1"})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        refused = client.sendmail(SENDER.decode(), [RCPT.decode()],
                                  "Subject: grüße\r\n\r\nhallo\r\n".encode(),
                                  mail_options=["SMTPUTF8"])
    assert refused == {}
    [msg] = home.queued()
    assert msg.recipients == [RCPT] and msg.sender == SENDER
    assert b" with UTF8SMTP; " in msg.received
    assert "Subject: grüße\n".encode() in msg.body

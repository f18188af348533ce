"""IPv6 clients: TCPREMOTEIP=::1 as ucspi-tcp-ipv6's tcpserver sets it, in the Received
line, in plugin variables and in the log; then for real on ::1, under tcpserver (Debian's
ucspi-tcp-ipv6, which .ci/run installs) and in the pool (`serve`)."""

import os
import smtplib
import socket
import subprocess

import pytest

from helpers import EnvQueue, crlf, require_tools, run_smtp, script

MESSAGE = (b"DATA", b"Subject: t", b"", b"hi", b".")


SESSION = crlf(b"HELO c.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", *MESSAGE,
               b"QUIT")


def test_received_line_shows_the_ipv6_address(home):
    result = run_smtp(SESSION, home=home,
                      env={"TCPREMOTEIP": "2001:db8::25", "TCPLOCALIP": "2001:db8::1"})
    [msg] = result.queued
    assert msg.received.startswith(b"Received: from unknown (HELO c.test) (2001:db8::25)\n"
                                   b"  by mx.test with SMTP; ")


def test_a_link_local_zone_index_is_kept(home):
    """'%' is one of notqmail's safe Received bytes; other bytes still become '?'."""
    result = run_smtp(SESSION, home=home, env={"TCPREMOTEIP": "fe80::1%eth0 x"})
    [msg] = result.queued
    assert b"(fe80::1%eth0?x)\n" in msg.received


def test_plugins_and_the_queue_see_the_ipv6_variables(home):
    record = os.path.join(home.root, "seen")
    script(home, "record", 'echo "$TCPREMOTEIP $PROTO" > %s\n' % record)
    home.control("smtpplugins", "[connection]\nplugins/record\n")
    queue = EnvQueue(home)
    run_smtp(SESSION, home=home, env={"TCPREMOTEIP": "::1", "PROTO": "TCP6",
                                      "QMAILQUEUE": queue.path})
    with open(record) as f:
        assert f.read() == "::1 TCP6\n"
    assert queue.text()["TCPREMOTEIP"] == "::1"


def test_log_lines_carry_the_ipv6_address(home):
    result = run_smtp(SESSION, home=home, env={"TCPREMOTEIP": "2001:db8::25"})
    logged = result.err.decode().splitlines()
    assert logged and all(line.split(" ")[1] == "2001:db8::25" for line in logged)


# ------------------------------------------------------------------ on ::1


def require_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no ::1")


def require_ipv6_tcpserver():
    """Debian's ucspi-tcp is IPv4 only; ucspi-tcp-ipv6 (same tools) listens on ::1."""
    require_tools("tcpserver")
    try:
        p = subprocess.run(["tcpserver", "::1", "0", "true"], stderr=subprocess.PIPE,
                           timeout=0.5)
    except subprocess.TimeoutExpired:
        return  # it is listening: IPv6 works
    why = "tcpserver cannot listen on ::1 (%s): apt-get install ucspi-tcp-ipv6" % (
        p.stderr.decode().strip())
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def test_a_real_ipv6_connection(servers, home, launcher):
    require_ipv6_loopback()
    if launcher == "tcpserver":
        require_ipv6_tcpserver()
    queue = EnvQueue(home)
    server = servers.start(home, env={"QMAILQUEUE": queue.path}, host="::1")
    with smtplib.SMTP("::1", server.port, local_hostname="c.test", timeout=20) as client:
        client.sendmail("a@b.c", ["u@example.com"], b"Subject: v6\r\n\r\nhi\r\n")
        client_port = client.sock.getsockname()[1]
    [msg] = home.queued()
    assert msg.received.startswith(b"Received: from unknown (HELO c.test) (::1)\n"
                                   b"  by mx.test with SMTP; ")
    env = queue.text(msg.pid)
    assert (env["PROTO"], env["TCPREMOTEIP"], env["TCPLOCALIP"]) == ("TCP6", "::1", "::1")
    assert (env["TCP6REMOTEIP"], env["TCP6REMOTEPORT"]) == ("::1", str(client_port))
    assert " ::1 accept qp=%d " % msg.pid in server.log_text().decode()


def test_tcprules_for_an_ipv6_client(servers, home, tmp_path, launcher):
    """A tcprules entry for ::1 (ucspi-tcp-ipv6 syntax) grants relaying."""
    require_ipv6_loopback()
    if launcher == "tcpserver":
        require_ipv6_tcpserver()
    require_tools("tcprules")
    rules = str(tmp_path / "rules.cdb")
    subprocess.run(["tcprules", rules, rules + ".tmp"], check=True,
                   input=b'::1:allow,RELAYCLIENT=""\n:allow\n')
    server = servers.start(home, rules=rules, host="::1")
    with smtplib.SMTP("::1", server.port, timeout=20) as client:
        assert client.sendmail("a@b.c", ["u@elsewhere.org"], b"hi\r\n") == {}
    assert home.queued()[0].recipients == [b"u@elsewhere.org"]

"""The PROXY protocol where connections come in: the pool's --proxy (trusted balancers,
the header read before the greeting, the real client for -x, -C, reverse DNS,
Received, the log and plugins), and the per-connection mode's PROXYPROTOCOL over pipes
and under the real tcpserver (set by a tcprules rule for the balancer).

Refusals close the connection without a byte and write one log line
(`<id> <peer> proxy refuse why=KIND (...)`).  The headers are built by
helpers.proxy_v1/proxy_v2; the parser's own cases are t/test_proxy.py, HAProxy in
front of two pools is t/test_multihost.py.  No assertion depends on timing: a time
limit is shown by the log line it writes, not by a duration.
"""

import os
import re
import socket
import subprocess

import pytest
from test_pool import Client, require_loopback_source, run_serve
from test_tcpserver import tcprules

from helpers import (
    BYE,
    GO,
    GREETING,
    HELO250,
    OK,
    SERVER,
    EnvQueue,
    TcpServer,
    crlf,
    free_port,
    norm,
    proxy_v1,
    proxy_v2,
    run_smtp,
    script,
    tlv,
)

CLIENT = ("192.0.2.7", 4711)
MX = ("198.51.100.25", 25)
HEADERS = {"v1": proxy_v1, "v2": proxy_v2}
SESSION = crlf(b"HELO client.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA",
               b"Subject: t", b"", b"hi", b".", b"QUIT")
SESSION_REPLIES = GREETING + HELO250 + OK + OK + GO + b"250 ok <TIME> qp <PID>\r\n" + BYE
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
REFUSAL = re.compile(rb"^(\S+) (\S+) proxy refuse why=(\w+) \((.*)\)$", re.MULTILINE)


def received_from(ip):
    return b"Received: from unknown (HELO client.test) (%s)\n  by mx.test with SMTP; " % ip


def pool(tcpservers, home, *options, trusted="127.0.0.1", env=None, rules=None, host="127.0.0.1"):
    """serve --proxy TRUSTED OPTIONS with the helpers' defaults (-v -H -l mx.test)."""
    return tcpservers.start(home, env=env, rules=rules, mode="pool", host=host,
                            options=("--proxy", trusted, *options))


def deliver(port, header, source="127.0.0.1", host="127.0.0.1"):
    """Header and a whole session in one segment; every reply up to the close."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(20)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(header + SESSION)
        return read_to_close(s)


def read_to_close(s):
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return out
        out += chunk


def refusals(server, count=1):
    """(id, peer, kind, text) of the proxy refusals logged, once there are `count`."""
    return [tuple(x.decode() for x in found) for found in server.wait_log(REFUSAL, count)]


def connection_lines(log, connection_id):
    return [line for line in log.decode().splitlines() if line.startswith(connection_id + " ")]


# ------------------------------------------------------------------ the pool: the real client


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trusted_balancer_passes_the_client_to_the_session(tcpservers, home, version):
    queue = EnvQueue(home)
    server = pool(tcpservers, home, env={"QMAILQUEUE": queue.path})
    out = deliver(server.port, HEADERS[version](CLIENT, MX))
    assert norm(out) == SESSION_REPLIES
    (msg,) = home.queued()
    assert msg.received.startswith(received_from(b"192.0.2.7"))
    env = queue.text(msg.pid)
    assert (env["PROTO"], env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("TCP", "192.0.2.7", "4711")
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("198.51.100.25", "25")
    assert (env["TCP6REMOTEIP"], env["TCP6LOCALIP"]) == ("::ffff:192.0.2.7", "::ffff:198.51.100.25")
    assert (env["TCP6REMOTEPORT"], env["TCP6LOCALPORT"]) == ("4711", "25")
    (conn,) = server.session_pids(1)
    log = server.log_text()
    assert b"serve: pid %s from 192.0.2.7\n" % conn.encode() in log
    lines = connection_lines(log, conn)
    assert lines and all(line.split(" ")[1] == "192.0.2.7" for line in lines)
    assert lines[0].endswith(" connect host=unknown port=4711")
    assert b"proxy refuse" not in log


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ipv6_client_in_the_header(tcpservers, home, version):
    queue = EnvQueue(home)
    server = pool(tcpservers, home, env={"QMAILQUEUE": queue.path})
    out = deliver(server.port, HEADERS[version](("2001:db8::7", 50000), ("2001:db8::25", 25)))
    assert norm(out) == SESSION_REPLIES
    (msg,) = home.queued()
    assert msg.received.startswith(received_from(b"2001:db8::7"))
    env = queue.text(msg.pid)
    assert (env["PROTO"], env["TCPREMOTEIP"], env["TCPLOCALIP"]) == (
        "TCP6", "2001:db8::7", "2001:db8::25")
    assert (env["TCP6REMOTEIP"], env["TCP6REMOTEPORT"]) == ("2001:db8::7", "50000")


def test_ipv4_mapped_client_shows_as_ipv4(tcpservers, home):
    queue = EnvQueue(home)
    server = pool(tcpservers, home, env={"QMAILQUEUE": queue.path})
    deliver(server.port, proxy_v2(("::ffff:192.0.2.7", 1), ("::ffff:198.51.100.25", 25)))
    (msg,) = home.queued()
    env = queue.text(msg.pid)
    assert (env["PROTO"], env["TCPREMOTEIP"], env["TCP6REMOTEIP"]) == (
        "TCP", "192.0.2.7", "::ffff:192.0.2.7")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bytes_pipelined_behind_the_header_reach_the_session(tcpservers, home, version):
    """Header, commands and message in one send: not a byte of them is lost to the
    header's reading (deliver() sends them together)."""
    header = HEADERS[version](CLIENT, MX)
    if version == "v2":
        header = proxy_v2(CLIENT, MX, tlvs=tlv(0x04, b"\0" * 100) + tlv(0x05, b"id-1"))
    server = pool(tcpservers, home)
    assert norm(deliver(server.port, header)) == SESSION_REPLIES
    (msg,) = home.queued()
    assert msg.body == b"Subject: t\n\nhi\n"


def test_ipv6_balancer(tcpservers, home):
    from test_ipv6 import require_ipv6_loopback
    require_ipv6_loopback()
    queue = EnvQueue(home)
    server = pool(tcpservers, home, trusted="::1/128", env={"QMAILQUEUE": queue.path},
                  host="::1")
    assert norm(deliver(server.port, proxy_v1(CLIENT, MX), source="::1", host="::1")) \
        == SESSION_REPLIES
    (msg,) = home.queued()
    assert queue.text(msg.pid)["TCPREMOTEIP"] == "192.0.2.7"


def test_trust_is_by_network(tcpservers, home):
    """--proxy takes networks, a comma-separated list, and may be given again."""
    require_loopback_source("127.0.0.3")
    server = pool(tcpservers, home, "--proxy", "127.0.0.3", trusted="10.0.0.0/8,127.0.0.2/32")
    for source in ("127.0.0.2", "127.0.0.3"):
        assert norm(deliver(server.port, proxy_v1(CLIENT, MX), source=source)) == SESSION_REPLIES
    assert deliver(server.port, proxy_v1(CLIENT, MX)) == b""  # 127.0.0.1 is not listed
    assert [r[1:3] for r in refusals(server)] == [("127.0.0.1", "untrusted")]


def test_fork_per_connection_reads_the_header_too(tcpservers, home):
    server = pool(tcpservers, home, "--fork")
    assert norm(deliver(server.port, proxy_v2(CLIENT, MX))) == SESSION_REPLIES
    assert home.queued()[0].received.startswith(received_from(b"192.0.2.7"))


# ------------------------------------------------------------------ the pool: refusals


def test_untrusted_peer_is_closed_without_a_byte_and_one_log_line(tcpservers, home):
    require_loopback_source("127.0.0.2")
    server = pool(tcpservers, home)
    assert deliver(server.port, proxy_v1(CLIENT, MX), source="127.0.0.2") == b""
    ((conn, peer, kind, text),) = refusals(server)
    assert (peer, kind, text) == ("127.0.0.2", "untrusted", "not a balancer of --proxy")
    assert home.queue.runs() == 0
    assert connection_lines(server.log_text(), conn) == [
        "%s 127.0.0.2 proxy refuse why=untrusted (not a balancer of --proxy)" % conn]
    # a session of the balancer afterwards: the worker goes on
    assert norm(deliver(server.port, proxy_v1(CLIENT, MX))) == SESSION_REPLIES


BAD_HEADERS = {
    "malformed": (b"EHLO client.test\r\n", "not a PROXY header: EHLO\\x20c"),
    "malformed-v1": (b"PROXY TCP4 192.0.2.7 198.51.100.25 4711 025\r\n", "v1: port 025"),
    "malformed-v2": (proxy_v2(CLIENT, MX, tlvs=b"\x04\x00\x09"), "v2: TLV 0x04 runs past the header"),
    "oversized": (b"PROXY TCP4 " + b"1" * 200, "v1: no CRLF in the first 107 bytes"),
    "oversized-v2": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + b"\0" * 100,
                     "v2: length 65535 (at most 2048)"),
    "local": (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", "v2 LOCAL (a health check?): no client to serve"),
    "unspec": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00", "v2 UNSPEC (0x00): no client address"),
    "unspec-v1": (b"PROXY UNKNOWN\r\n", "v1 UNKNOWN: no client address"),
    "unsupported": (proxy_v2(CLIENT, MX, family=0x12), "v2: datagram over IPv4"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_from_a_balancer_is_closed_without_a_byte(tcpservers, home, case):
    """Everything after the bad header is a valid session: none of it is served."""
    data, text = BAD_HEADERS[case]
    server = pool(tcpservers, home, "--proxy-timeout", "30")
    assert deliver(server.port, data) == b""
    ((conn, peer, kind, logged),) = refusals(server)
    assert (peer, kind, logged) == ("127.0.0.1", case.split("-")[0], text)
    assert len(connection_lines(server.log_text(), conn)) == 1
    assert home.queue.runs() == 0


def test_header_cut_short_by_the_close_is_truncated(tcpservers, home):
    server = pool(tcpservers, home, "--proxy-timeout", "30")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(proxy_v2(CLIENT, MX)[:20])
        s.shutdown(socket.SHUT_WR)
        assert read_to_close(s) == b""
    ((_, _, kind, text),) = refusals(server)
    assert (kind, text) == ("truncated", "closed after 20 bytes")


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 192.0.2.7 "])
def test_no_complete_header_in_time_is_closed(tcpservers, home, sent):
    server = pool(tcpservers, home, "--proxy-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(sent)
        assert read_to_close(s) == b""
    ((_, _, kind, text),) = refusals(server)
    assert (kind, text) == ("timeout", "no complete header within 0.5 s, %d bytes" % len(sent))


def test_a_slow_balancer_still_gets_through(tcpservers, home):
    """A header that arrives in pieces is read as it comes."""
    server = pool(tcpservers, home)
    c = Client(server.port)
    try:
        header = proxy_v1(CLIENT, MX)
        for piece in (header[:3], header[3:20], header[20:-1], header[-1:]):
            assert c.silent_for(0.2)
            c.send(piece)
        assert c.reply() == GREETING
        assert c.quit() == BYE
    finally:
        c.close()


# ------------------------------------------------------------------ the pool: -x, -C, DNS, plugins

RULES = (b'192.0.2.7:allow,RELAYCLIENT="",RULEVAR="client"\n'
         b'192.0.2.66:deny\n'
         b'127.0.0.1:allow,RELAYCLIENT="",RULEVAR="balancer"\n'
         b':allow,RULEVAR="default"\n')


def relay_session(port, client):
    c = Client(port)
    try:
        c.send(proxy_v2(client, MX))
        greeting = c.reply()
        if not greeting:
            return None
        assert c.cmd(b"MAIL FROM:<a@b.c>") == OK
        reply = c.cmd(b"RCPT TO:<u@elsewhere.org>")
        c.quit()
        return reply
    finally:
        c.close()


def test_tcprules_are_looked_up_for_the_real_client(tcpservers, home, tmp_path):
    queue = EnvQueue(home)
    server = pool(tcpservers, home, env={"QMAILQUEUE": queue.path},
                  rules=tcprules(tmp_path, "rules", RULES))
    assert relay_session(server.port, ("192.0.2.7", 1)) == OK
    assert relay_session(server.port, ("192.0.2.8", 1)) == NOGATEWAY  # not the balancer's rule
    assert relay_session(server.port, ("192.0.2.66", 1)) is None      # deny
    assert server.wait_log(re.compile(rb"serve: deny [\d.]+ (192\.0\.2\.66)")) == [b"192.0.2.66"]
    deliver(server.port, proxy_v1(("192.0.2.9", 1), MX))
    (msg,) = home.queued()
    assert queue.text(msg.pid)["RULEVAR"] == "default"


def test_per_address_limit_counts_the_real_clients(tcpservers, home):
    """-C 1 behind one balancer: a second session of 192.0.2.7 is refused, one of
    192.0.2.8 is not (all three come from 127.0.0.1)."""
    server = pool(tcpservers, home, "-C", "1")
    first, second, other = Client(server.port), Client(server.port), Client(server.port)
    try:
        first.send(proxy_v1(("192.0.2.7", 1), MX))
        assert first.reply() == GREETING
        second.send(proxy_v1(("192.0.2.7", 2), MX))
        assert second.reply() == (b"421 too many connections from your address, try again "
                                  b"later (#4.7.0)\r\n")
        other.send(proxy_v1(("192.0.2.8", 3), MX))
        assert other.reply() == GREETING
        assert first.quit() == BYE and other.quit() == BYE
    finally:
        for c in (first, second, other):
            c.close()
    assert server.wait_log(re.compile(rb"serve: limit [\d.]+ (\S+)")) == [b"192.0.2.7"]


def test_plugins_see_the_real_client(tcpservers, home):
    seen = os.path.join(home.root, "seen")
    plugin = script(home, "record", 'echo "$TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALIP '
                    '$TCPLOCALPORT" >> %s\n' % seen)
    home.control("smtpplugins", "[connection]\n%s\n[rcpt]\n%s\n" % (plugin, plugin))
    server = pool(tcpservers, home)
    assert norm(deliver(server.port, proxy_v2(CLIENT, MX))) == SESSION_REPLIES
    with open(seen) as f:
        assert f.read() == "192.0.2.7 4711 198.51.100.25 25\n" * 2


def test_reverse_dns_is_asked_for_the_real_client(tcpservers, home):
    from dnsserver import DNSServer
    records = {"7.2.0.192.in-addr.arpa": {"PTR": ["real.example."]},
               "1.0.0.127.in-addr.arpa": {"PTR": ["balancer.example."]}}
    queue = EnvQueue(home)
    with DNSServer(records) as dns:
        port = free_port()
        cmd = [SERVER, "serve", "-v", "--root", "-l", "mx.test", "--proxy", "127.0.0.1",
               "127.0.0.1", str(port)]
        env = {"PATH": os.environ.get("PATH", "/bin"), "QMAILHOME": home.path,
               "QMAILQUEUE": queue.path, "DNSCACHEIP": dns.cacheip}
        p, log = tcpservers.spawn(cmd, env)
        assert tcpservers.wait_listening(p, log), log.read_bytes()
        deliver(TcpServer(port, log, p, "pool").port, proxy_v1(CLIENT, MX))
        queries = list(dns.queries)
    (msg,) = home.queued()
    assert queue.text(msg.pid)["TCPREMOTEHOST"] == "real.example"
    assert msg.received.startswith(b"Received: from real.example (HELO client.test) (192.0.2.7)")
    assert not any("1.0.0.127" in str(q) for q in queries)


# ------------------------------------------------------------------ the pool: without --proxy


def test_without_proxy_a_header_is_just_a_bad_command(tcpservers, home):
    server = tcpservers.start(home, mode="pool")
    out = deliver(server.port, proxy_v1(CLIENT, MX))
    assert norm(out) == SESSION_REPLIES.replace(GREETING, GREETING + b"502 unimplemented (#5.5.1)\r\n")
    assert home.queued()[0].received.startswith(received_from(b"127.0.0.1"))


@pytest.mark.parametrize("args,words", [
    (("--proxy", "10.0.0.1/8"), b"has host bits set"),
    (("--proxy", "balancer.example"), b"does not appear to be an IPv4 or IPv6 network"),
    (("--proxy", "127.0.0.1", "--proxy-timeout", "0"), b"give a number of seconds"),
    (("--proxy", "127.0.0.1", "--proxy-timeout", "soon"), b"is not a valid float"),
])
def test_bad_proxy_options_are_usage_errors(args, words):
    p = run_serve(*args, "127.0.0.1", "1")
    assert p.returncode == 2
    assert words in p.stderr


def test_help_names_the_options():
    out = run_serve("--help").stdout
    assert b"--proxy CIDR,..." in out and b"--proxy-timeout SECONDS" in out


# ------------------------------------------------------------------ the reader itself


def descriptors(kind):
    """(read end, write end) of a socket pair or a pipe, as file descriptors."""
    if kind == "pipe":
        return os.pipe()
    a, b = socket.socketpair()
    return b.detach(), a.detach()


@pytest.mark.parametrize("kind", ["socket", "pipe"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_reader_takes_the_header_and_not_a_byte_more(kind, version):
    """driver.read_proxy_header in this process: the header arrives in two pieces
    (cut anywhere, the client's first bytes behind it in the second), and what is
    left to read is exactly the client's.  A socket is peeked at, a pipe read for
    what the header still has at least: both end at the same byte."""
    import threading

    from qmail_smtpd_py import driver
    header = HEADERS[version](CLIENT, MX)
    client = b"EHLO client.test\r\n"
    for cut in sorted({1, 12, 13, 15, 16, 17, 30, len(header) - 1, len(header)}):
        r, w = descriptors(kind)
        try:
            os.write(w, header[:cut])
            later = threading.Timer(0.02, os.write, (w, header[cut:] + client))
            later.start()
            got = driver.read_proxy_header(r, 20)
            later.join()
            assert (got.source, got.destination, got.length) == (CLIENT, MX, len(header))
            os.set_blocking(r, False)  # everything is written: an empty fd raises, never hangs
            assert os.read(r, 100) == client, cut
        finally:
            os.close(r)
            os.close(w)


# ------------------------------------------------------------------ per connection: pipes


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxyprotocol_over_a_pipe_reads_exactly_the_header(home, version):
    """All the input is written at once: nothing of the session may be read with the
    header (a pipe cannot be peeked at).  tcpserver's names of the balancer go."""
    queue = EnvQueue(home)
    env = {"PROXYPROTOCOL": "", "QMAILQUEUE": queue.path, "TCPREMOTEIP": "10.0.0.5",
           "TCPREMOTEPORT": "40000", "TCPREMOTEHOST": "balancer.example",
           "TCPREMOTEINFO": "ident", "TCP6REMOTEIP": "::ffff:10.0.0.5", "PROTO": "TCP"}
    res = run_smtp(HEADERS[version](("2001:db8::7", 50000), ("2001:db8::25", 25)) + SESSION,
                   env=env, home=home)
    assert norm(res.out) == SESSION_REPLIES
    (msg,) = res.queued
    assert msg.received.startswith(received_from(b"2001:db8::7"))
    seen = queue.text(msg.pid)
    assert (seen["PROTO"], seen["TCPREMOTEIP"], seen["TCPREMOTEPORT"]) == (
        "TCP6", "2001:db8::7", "50000")
    assert (seen["TCPLOCALIP"], seen["TCPLOCALPORT"]) == ("2001:db8::25", "25")
    assert (seen["TCP6REMOTEIP"], seen["TCP6LOCALPORT"]) == ("2001:db8::7", "25")
    for gone in ("TCPREMOTEHOST", "TCPREMOTEINFO"):
        assert gone not in seen
    assert all(line.split(" ")[1] == "2001:db8::7" for line in res.err.decode().splitlines())


def test_proxyprotocol_without_tcp6_variables_adds_none(home):
    """Plain ucspi-tcp sets no TCP6* variables: none appear."""
    queue = EnvQueue(home)
    res = run_smtp(proxy_v1(CLIENT, MX) + SESSION, home=home,
                   env={"PROXYPROTOCOL": "", "QMAILQUEUE": queue.path})
    seen = queue.text(res.queued[0].pid)
    assert seen["TCPREMOTEIP"] == "192.0.2.7"
    assert not [name for name in seen if name.startswith("TCP6")]


@pytest.mark.parametrize("data,kind", [
    (b"EHLO client.test\r\n", "malformed"), (proxy_v1(CLIENT, MX)[:-1], "truncated"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", "local"), (b"PROXY UNKNOWN\r\n", "unspec")])
def test_bad_header_over_a_pipe_gets_no_byte_and_one_log_line(home, data, kind):
    res = run_smtp(data + SESSION if kind != "truncated" else data, home=home,
                   env={"PROXYPROTOCOL": "", "TCPREMOTEIP": "10.0.0.5"})
    assert (res.out, res.status, res.queued) == (b"", 1, [])
    (line,) = res.err.decode().splitlines()
    assert re.fullmatch(r"\d+ 10\.0\.0\.5 proxy refuse why=%s \(.*\)" % kind, line), line


def test_proxyprotocol_value_is_the_time_limit(home):
    res = run_smtp(b"PROXY TCP4 ", home=home, keep_open=True,
                   env={"PROXYPROTOCOL": "0.5", "TCPREMOTEIP": "10.0.0.5"})
    assert (res.out, res.status) == (b"", 1)
    (line,) = res.err.decode().splitlines()
    assert line.endswith(" 10.0.0.5 proxy refuse why=timeout (no complete header within "
                         "0.5 s, 11 bytes)")


def test_proxyprotocol_bad_value_is_logged_and_the_default_used(home):
    res = run_smtp(proxy_v1(CLIENT, MX) + SESSION, home=home,
                   env={"PROXYPROTOCOL": "soon", "TCPREMOTEIP": "10.0.0.5"})
    assert norm(res.out) == SESSION_REPLIES
    first = res.err.decode().splitlines()[0]
    assert first.endswith(" 10.0.0.5 PROXYPROTOCOL='soon' is no number of seconds (0-3600); "
                          "using 5")


# ------------------------------------------------------------------ per connection: tcpserver

TCPSERVER_RULES = (b'127.0.0.1:allow,PROXYPROTOCOL="",TCPREMOTEHOST="balancer.example"\n'
                   b':allow\n')


def test_under_tcpserver_a_rule_for_the_balancer_asks_for_the_header(tcpservers, home, tmp_path):
    """tcpserver -x: PROXYPROTOCOL for 127.0.0.1 (the balancer) only.  Its sessions get
    the header's client; another peer's are plain; a bad header is closed silently."""
    require_loopback_source("127.0.0.2")
    queue = EnvQueue(home)
    server = tcpservers.start(home, env={"QMAILQUEUE": queue.path}, mode="tcpserver",
                              rules=tcprules(tmp_path, "rules", TCPSERVER_RULES))
    assert norm(deliver(server.port, proxy_v2(CLIENT, MX))) == SESSION_REPLIES
    (msg,) = home.queued()
    assert msg.received.startswith(received_from(b"192.0.2.7"))
    seen = queue.text(msg.pid)
    assert (seen["TCPREMOTEIP"], seen["TCPREMOTEPORT"], seen["TCPLOCALIP"]) == (
        "192.0.2.7", "4711", "198.51.100.25")
    assert "TCPREMOTEHOST" not in seen  # it named the balancer
    # not the balancer: no header expected, the session as always
    assert norm(deliver(server.port, b"", source="127.0.0.2")) == SESSION_REPLIES
    assert home.queued()[1].received.startswith(received_from(b"127.0.0.2"))
    # the balancer with a bad header
    assert deliver(server.port, b"PROXY TCP4 192.0.2.7 198.51.100.25 4711\r\n") == b""
    ((conn, peer, kind, text),) = refusals(server)
    assert (peer, kind, text) == ("127.0.0.1", "malformed", "v1: 5 fields, not 6")
    assert [status for pid, status in server.ends(3) if pid == conn] == [256]
    assert len(home.queued()) == 2


def test_per_connection_path_imports_nothing_new_without_proxyprotocol(home, tmp_path):
    """The modules a per-connection session imports are the same as before PROXY
    support, i.e. the PROXY code is not imported unless PROXYPROTOCOL asks for it."""
    def imported(env):
        out = subprocess.run(
            [os.path.join(os.path.dirname(SERVER), "python"), "-IS", "-X", "importtime", SERVER],
            input=SESSION, capture_output=True, cwd=home.root,
            env=dict(env, PATH="/usr/bin:/bin", QMAILHOME=home.path, QMAILQUEUE=home.queue.path,
                     TCPREMOTEIP="127.0.0.1", TCPLOCALIP="127.0.0.1", TCPLOCALHOST="mx.test"))
        return {line.split("|")[-1].strip() for line in out.stderr.decode().splitlines()
                if line.startswith("import time:")}
    plain = imported({})
    proxied = imported({"PROXYPROTOCOL": ""})
    assert "qmail_smtpd_py.proxy" not in plain and "_socket" not in plain
    assert proxied - plain == {"qmail_smtpd_py.proxy", "_socket"}

"""Past one host: HAProxy in front of two pools, one Redis behind them, all on loopback
and all real processes the `site` fixture starts (and kills at teardown):

    clients 127.0.0.2-5 --> HAProxy 127.0.0.1 (mode tcp, balance roundrobin,
                            send-proxy-v2, from 127.0.2.1)
                              |--> host a: serve --proxy 127.0.2.1 -x rules 127.0.1.1
                              |--> host b: the same on 127.0.1.2
                                     both with GREYLIST_DB and RATELIMIT_REDIS at
                                     one redis-server (redisserver.RedisServer)

Each host has its own qmail home (control/me a.mx.test or b.mx.test, so the greeting
says which host a client reached; its own recording fake queue and log) and the same
tcprules CDB.  HAProxy's roundrobin with one thread sends sequential connections to
the hosts in turn, which the tests check rather than assume.

Shown: each host's Received: line, log and -x decisions are the real client's (a
rule denies the balancer's own address, so a host that looked it up would refuse
everyone); a triplet greylisted through one host passes through the other after
GREYLIST_DELAY; ratelimit counts the messages of both hosts; a Redis stopped
(SIGSTOP: it accepts connections and never answers) in the middle of a session costs
each plugin call one REDISTIMEOUT and loses nothing.  No assertion depends on timing.
"""

import os
import re
import signal
import time

import pytest
from test_greylist import GREYLIST, GREYLISTED
from test_pool import Client, require_loopback_source
from test_proxy_serve import NOGATEWAY
from test_redis_plugins import MESSAGES, RATELIMIT
from test_tcpserver import tcprules

from balancer import HAProxy, check_config, require_haproxy
from helpers import ACC, GO, OK, REPO, norm
from redisserver import RedisServer

BALANCER = "127.0.2.1"                        # HAProxy's source address: what --proxy trusts
HOSTS = {"a": "127.0.1.1", "b": "127.0.1.2"}  # the pools' addresses
RELAYING, PLAIN, DENIED, OTHER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
RULES = ('%s:allow,RELAYCLIENT=""\n' % RELAYING
         + "%s:deny\n" % DENIED
         + "%s:deny\n" % BALANCER  # the rules apply to the client, never the balancer
         + ":allow\n").encode()
DELAY = 1
ENV = {"GREYLIST_DELAY": str(DELAY), "RATELIMIT_MESSAGES": "2/3600", "REDISTIMEOUT": "0.5"}

TIMEOUT = "Timeout reading from socket"  # redis-py's words
GREETING = re.compile(rb"220 ([ab])\.mx\.test ESMTP\r\n")


class Host:
    """One SMTP host: its qmail home (and fake queue) and its pool."""

    def __init__(self, home, server):
        self.home = home
        self.server = server

    def log(self):
        return self.server.log_text().decode(errors="replace")


class Site:
    """The running site: .port (HAProxy's), .hosts (name: Host), .redis (the
    RedisServer) and .db (a client of it)."""

    def __init__(self, balancer, hosts, redis):
        self.port = balancer.port
        self.hosts = hosts
        self.redis = redis
        self.db = redis.client()
        self.clients = []

    def visit(self, source):
        """A client from source through HAProxy: (the host that greeted it, the
        Client after HELO), or (None, Client) if it was closed without a greeting."""
        c = Client(self.port, source)
        self.clients.append(c)
        match = GREETING.fullmatch(c.reply())
        if match is None:
            return None, c
        host = match.group(1).decode()
        assert c.cmd(b"HELO client.test") == b"250 %s.mx.test\r\n" % host.encode()
        return host, c

    def plugins(self, text):
        """control/smtpplugins of every host (read for each connection)."""
        for host in self.hosts.values():
            host.home.control("smtpplugins", text)

    def close(self):
        for c in self.clients:
            c.close()
        self.db.close()


@pytest.fixture
def site(tcpservers, make_home, tmp_path):
    require_haproxy()
    for address in (RELAYING, PLAIN, DENIED, OTHER, BALANCER, *HOSTS.values()):
        require_loopback_source(address)
    redis = RedisServer(tmp_path / "redis").start()
    try:
        rules = tcprules(tmp_path, "rules", RULES)
        env = dict(ENV, GREYLIST_DB=redis.url(), RATELIMIT_REDIS=redis.url())
        hosts = {}
        for name, address in HOSTS.items():
            home = make_home(control={"me": "%s.mx.test\n" % name})
            server = tcpservers.start(home, env=env, rules=rules, mode="pool", host=address,
                                      local_name="%s.mx.test" % name,
                                      options=("--proxy", BALANCER))
            hosts[name] = Host(home, server)
        servers = [(name, HOSTS[name], host.server.port) for name, host in hosts.items()]
        with HAProxy(tmp_path / "haproxy", servers, BALANCER) as balancer:
            site = Site(balancer, hosts, redis)
            try:
                yield site
            finally:
                site.close()
    finally:
        redis.stop()


def deliver(c, *recipients):
    """MAIL, a RCPT to each (all accepted), then DATA and QUIT: the reply to the
    final dot."""
    assert c.cmd(b"MAIL FROM:<a@b.c>") == OK
    for rcpt in recipients:
        assert c.cmd(b"RCPT TO:<%s>" % rcpt) == OK
    return data(c)


def data(c):
    """DATA, a short message and QUIT: the reply to the final dot."""
    assert c.cmd(b"DATA") == GO
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    reply = norm(c.reply())
    assert c.quit().startswith(b"221 ")
    return reply


def received(source, host):
    return (b"Received: from unknown (HELO client.test) (%s)\n  by %s.mx.test with SMTP; "
            % (source.encode(), host.encode()))


def logged(host, pattern, count=1):
    """The matches of pattern (one line each) in host's log, once there are at least
    count (or 20 s passed): the pool's parent writes its lines when it gets to them."""
    found = host.server.wait_log(re.compile(pattern.encode(), re.MULTILINE), count)
    return [tuple(x.decode() for x in f) if isinstance(f, tuple) else f.decode() for f in found]


def in_turn(visited):
    """Both hosts, never the same one twice in a row (roundrobin)."""
    return set(visited) == set(HOSTS) and all(x != y for x, y in zip(visited, visited[1:]))


# ------------------------------------------------------------------ the real client

# what the rules let each source do: the replies to RCPT u@elsewhere.org, and the
# recipients of its message
RELAY = {RELAYING: (OK, [b"u@elsewhere.org", b"u@example.com"]),
         PLAIN: (NOGATEWAY, [b"u@example.com"])}


def test_each_host_sees_the_real_client_in_received_log_and_rules(site):
    """Two sessions per source, in an order that gives each host one of each: the
    relaying client (RELAYCLIENT by its rule) relays, the other may not; the denied
    client is closed without a greeting by both hosts; the balancer's address is in
    no host's log."""
    sessions = {name: [] for name in HOSTS}  # host: [(source, client port)]
    visited = []
    for source in (RELAYING, PLAIN, PLAIN, RELAYING):
        host, c = site.visit(source)
        visited.append(host)
        sessions[host].append((source, c.sock.getsockname()[1]))
        assert c.cmd(b"MAIL FROM:<a@b.c>") == OK
        assert c.cmd(b"RCPT TO:<u@elsewhere.org>") == RELAY[source][0]
        assert c.cmd(b"RCPT TO:<u@example.com>") == OK
        assert data(c) == ACC
    assert in_turn(visited), visited
    for _ in HOSTS:
        assert site.visit(DENIED)[0] is None
    for name, host in site.hosts.items():
        assert sorted(source for source, _ in sessions[name]) == [RELAYING, PLAIN]
        queued = host.home.queued()
        assert len(queued) == 2
        for msg, (source, _) in zip(queued, sessions[name]):
            assert msg.received.startswith(received(source, name))
            assert msg.recipients == RELAY[source][1]
        assert logged(host, r"^\d+ serve: pid \S+ from (\S+)$", 2) == [
            source for source, _ in sessions[name]]
        assert logged(host, r"^\S+ (\S+) connect host=unknown port=(\d+)\b", 2) == [
            (source, str(port)) for source, port in sessions[name]]
        assert logged(host, r"^\d+ serve: deny \S+ (\S+)$") == [DENIED]
        assert BALANCER not in host.log()


# ------------------------------------------------------------------ Redis shared by the hosts


def test_a_triplet_greylisted_through_one_host_passes_through_the_other(site):
    """The first RCPT of the triplet is greylisted on one host; once GREYLIST_DELAY
    has passed (on Redis's clock, which greylist uses) the retry is accepted by the
    other host, which has never seen the client before."""
    site.plugins("[rcpt]\n%s\n" % GREYLIST)
    first, c = site.visit(PLAIN)
    assert c.cmd(b"MAIL FROM:<a@b.c>") == OK
    assert c.cmd(b"RCPT TO:<u@example.com>") == GREYLISTED
    assert c.quit().startswith(b"221 ")
    # the triplet's network is the client's, not the balancer's 127.0.2.0/24
    (key,) = site.db.keys("greylist:*")
    assert key == b"greylist:127.0.0.0/24 <a@b.c> <u@example.com>"
    first_seen = int(site.db.hget(key, "first_seen"))
    deadline = time.monotonic() + 30
    while site.db.time()[0] < first_seen + DELAY:  # the delay, on the clock greylist uses
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second, c = site.visit(PLAIN)
    assert second != first
    assert deliver(c, b"u@example.com") == ACC
    assert site.hosts[first].home.queued() == []
    (msg,) = site.hosts[second].home.queued()
    assert msg.received.startswith(received(PLAIN, second))
    triplet = r"127\.0\.0\.0/24 <a@b\.c> -> <u@example\.com>$"
    assert len(logged(site.hosts[first], r"^greylist: pid \d+: greylisted .*: " + triplet)) == 1
    assert len(logged(site.hosts[second], r"^greylist: pid \d+: passed after \d+ s: "
                      + triplet)) == 1


def test_ratelimit_counts_the_messages_of_both_hosts(site, tmp_path):
    """RATELIMIT_MESSAGES=2/3600 per client address: two messages through two hosts,
    and the third is refused; another client is not."""
    link = str(tmp_path / "ratelimit-mail")
    os.symlink(RATELIMIT, link)
    site.plugins("[mail]\n%s\n" % link)
    visited = []
    for _ in range(2):
        host, c = site.visit(PLAIN)
        visited.append(host)
        assert deliver(c, b"u@example.com") == ACC
    host, c = site.visit(PLAIN)
    visited.append(host)
    assert c.cmd(b"MAIL FROM:<a@b.c>") == MESSAGES
    assert c.quit().startswith(b"221 ")
    assert in_turn(visited), visited
    assert len(logged(site.hosts[host], r"^ratelimit-mail: pid \d+: too many messages from "
                      r"network 127\.0\.0\.3/32 \(RATELIMIT_MESSAGES=2/3600\); refused$")) == 1
    other, c = site.visit(OTHER)
    assert deliver(c, b"u@example.com") == ACC
    assert sorted(len(h.home.queued()) for h in site.hosts.values()) == [1, 2]
    assert sorted(site.db.keys("ratelimit:*")) == [
        b"ratelimit:messages:3600:net:127.0.0.3/32", b"ratelimit:messages:3600:net:127.0.0.5/32"]


def test_a_stopped_redis_costs_each_call_its_timeout_and_loses_nothing(site, tmp_path):
    """Redis stops (SIGSTOP: connections are still accepted, nothing is answered) in
    the middle of a session on one host: its next RCPT is accepted (greylist fails
    open), its message queued; a session through the other host meanwhile gets every
    reply too (ratelimit and greylist fail open) and its message is queued.  Each
    plugin call waits once for REDISTIMEOUT and logs one line."""
    link = str(tmp_path / "ratelimit-mail")
    os.symlink(RATELIMIT, link)
    site.plugins("[mail]\n%s\n[rcpt]\n%s\n" % (link, GREYLIST))
    first, c = site.visit(PLAIN)
    assert c.cmd(b"MAIL FROM:<a@b.c>") == OK
    assert c.cmd(b"RCPT TO:<u@example.com>") == GREYLISTED  # Redis answers
    os.kill(site.redis.proc.pid, signal.SIGSTOP)
    assert c.cmd(b"RCPT TO:<v@example.com>") == OK
    assert data(c) == ACC
    second, c = site.visit(PLAIN)
    assert second != first
    assert deliver(c, b"u@example.com") == ACC
    for name, recipients in ((first, [b"v@example.com"]), (second, [b"u@example.com"])):
        (msg,) = site.hosts[name].home.queued()
        assert msg.recipients == recipients
    failed = r"^(\S+): pid \d+: cannot use %s: (.*); not (.*)$" % re.escape(site.redis.url())
    assert logged(site.hosts[first], failed) == [("greylist", TIMEOUT, "greylisting")]
    assert logged(site.hosts[second], failed, 2) == [("ratelimit-mail", TIMEOUT, "rate limiting"),
                                                     ("greylist", TIMEOUT, "greylisting")]
    for host in site.hosts.values():
        assert "Traceback" not in host.log()


# ------------------------------------------------------------------ the shipped sample


def test_the_shipped_haproxy_config_is_valid():
    """service/haproxy.cfg passes `haproxy -c`, and every server it names gets PROXY
    v2 headers (the pools refuse connections without one)."""
    require_haproxy()
    path = os.path.join(REPO, "service", "haproxy.cfg")
    status, output = check_config(path)
    assert status == 0, output
    with open(path) as f:
        lines = [line.split() for line in f]
    assert ["mode", "tcp"] in lines
    servers = [words for words in lines if words[:1] == ["server"]]
    assert servers and all("send-proxy-v2" in words for words in servers)

"""Redis for the sample plugins: greylist's Redis backend and ratelimit, under the
installed qmail-smtpd-py over pipes, against a real redis-server on loopback
(redisserver.RedisServer: conftest.py's fresh_redis, emptied for each test, or
own_redis, which a test may kill).

Several "hosts" are several qmail homes pointed at the same Redis.  Time passing
is simulated by moving the stored timestamps back (HINCRBY), as in
test_greylist.py, whose tests of the greylisting rules also run on Redis.  A Redis
that dies mid-run is killed by a [rcpt] plugin listed before the one under test
(redis-cli SHUTDOWN NOSAVE, which returns once the server is gone); a Redis that
hangs is redisserver.SilentServer.  Only outcomes and log lines are asserted, never
durations (speed: bench/redis_plugins.py).

The sessions are played in-process (plugin_world.run_home: the core with the
home's configuration, the plugins real processes) with greylist and ratelimit
preloaded as the pool runs them; the two-host tests run the installed server
over pipes.

Behaviour: plugins/greylist and plugins/ratelimit (their docstrings are the manuals),
qmail_smtpd_py/plugin_redis.py.
"""

import ast
import base64
import hashlib
import os
import re

import pytest
from plugin_world import preloaded, run_home
from test_auth import LOGIN_PLAIN, ehlo
from test_greylist import ACCEPTED, GREYLIST, GREYLISTED, REFUSED, RedisStore, session

from helpers import ACC, BIN_DIR, BYE, GO, GREETING, OK, crlf, free_port, norm, run_smtp
from redisserver import RedisServer, SilentServer

RATELIMIT = os.path.join(BIN_DIR, "ratelimit")
REDIS_CLI = "redis-cli"

AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
MESSAGES = b"451 too many messages, try again later (#4.7.0)\r\n"
RECIPIENTS = b"451 too many recipients, try again later (#4.7.0)\r\n"
CONNECTIONS = b"421 too many connections, try again later (#4.7.0)\r\n"
EHLO = ehlo(LOGIN_PLAIN)

FLUSHED = b"250 flushed\r\n"


SECTIONS = ("connection", "mail", "rcpt")
LINKS = {}  # section: the ratelimit-SECTION link to ratelimit (as make install makes)


@pytest.fixture(scope="module", autouse=True)
def plugins_preloaded(tmp_path_factory):
    links = tmp_path_factory.mktemp("ratelimit-links")
    for section in SECTIONS:
        LINKS[section] = str(links / ("ratelimit-" + section))
        os.symlink(RATELIMIT, LINKS[section])
    with preloaded(GREYLIST, RATELIMIT, *LINKS.values(), base_env={}):
        yield


def run(home, data, ip="192.0.2.7", env=None, args=(), redis_trouble=False, process=False):
    """One session (in-process, or with process the installed server); the log
    never has a traceback, and unless redis_trouble it never says that Redis
    could not be used."""
    full = {"TCPREMOTEIP": ip}
    full.update(env or {})
    res = (run_smtp if process else run_home)(data, env=full, home=home, args=args)
    assert b"Traceback" not in res.err, res.err.decode(errors="replace")
    if not redis_trouble:
        assert b"cannot use" not in res.err, res.err
    assert res.status == 0
    return res


def plugin_home(make_home, *sections):
    """A home whose smtpplugins has the (section, [entries]) pairs."""
    for path in (GREYLIST, RATELIMIT):
        if not os.access(path, os.X_OK):
            pytest.fail("%s is not installed next to the server (pip install .)" % path)
    lines = []
    for section, entries in sections:
        lines += ["[%s]" % section, *entries]
    return make_home(control={"smtpplugins": "\n".join(lines) + "\n"})


def stopper(server):
    """A [rcpt] entry that shuts the Redis server down when the recipient starts
    with "stop" (and prints nothing, so the next plugin runs)."""
    return (':case "$SMTPRCPTTO" in stop*) %s -p %d SHUTDOWN NOSAVE >/dev/null 2>&1;; esac'
            % (REDIS_CLI, server.port))


def log_lines(err, name):
    """The texts the plugin logged (as NAME or, run through a link, NAME-SECTION)."""
    return re.findall(rb"^%s(?:-[a-z]+)?: pid \d+: (.*)$" % name.encode(), err, re.MULTILINE)


# ================================================================== greylist on Redis


@pytest.fixture
def grey_redis(fresh_redis, make_home):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    home.store = RedisStore(fresh_redis)
    return home


def attempt(home, ip="192.0.2.10", sender=b"a@sender.test", rcpt=b"u@example.com", env=None,
            redis_trouble=False, process=False):
    full = dict(home.store.env)
    full.update(env or {})
    return run(home, session(sender, rcpt), ip=ip, env=full, redis_trouble=redis_trouble,
               process=process)


def test_greylist_on_redis_is_shared_by_two_hosts(fresh_redis, make_home):
    """Two MX hosts (two qmail homes), one Redis: each sees the other's attempts."""
    mx1 = plugin_home(make_home, ("rcpt", [GREYLIST]))
    mx2 = plugin_home(make_home, ("rcpt", [GREYLIST]))
    mx1.store = mx2.store = store = RedisStore(fresh_redis)
    assert attempt(mx1, process=True).out == REFUSED  # first seen
    assert attempt(mx2, process=True).out == REFUSED  # an early retry, at the other host
    ((*_, passed, attempts),) = store.rows()
    assert passed is None and attempts == 2
    store.age(300, "first_seen")
    res = attempt(mx2, process=True)  # after the delay
    assert res.out == ACCEPTED
    assert log_lines(res.err, "greylist")[0].startswith(b"passed after ")
    assert attempt(mx1, process=True).out == ACCEPTED  # confirmed: passes at once, anywhere
    ((*_, passed, attempts),) = store.rows()
    assert passed is not None and attempts == 4
    store.age(36 * 86400, "last_seen")
    assert attempt(mx2).out == REFUSED  # unused too long: forgotten, starts over
    ((*_, first, last, passed, attempts),) = store.rows()
    assert first == last and passed is None and attempts == 1


def test_greylist_redis_keys_and_ttls(grey_redis):
    client = grey_redis.store.client
    assert attempt(grey_redis).out == REFUSED
    name = b"greylist:192.0.2.0/24 <a@sender.test> <u@example.com>"
    assert grey_redis.store.names() == [name]
    assert 0 < client.ttl(name) <= 2 * 86400 + 1  # the retry window
    grey_redis.store.age(300, "first_seen")
    assert attempt(grey_redis).out == ACCEPTED
    assert 2 * 86400 + 1 < client.ttl(name) <= 35 * 86400 + 1  # confirmed: the expiry
    assert sorted(client.hgetall(name)) == [b"attempts", b"first_seen", b"last_seen",
                                            b"passed"]


def test_greylist_redis_ttl_follows_the_settings(grey_redis):
    env = {"GREYLIST_RETRY_WINDOW": "600", "GREYLIST_EXPIRE": "7200", "GREYLIST_DELAY": "0"}
    assert attempt(grey_redis, env=env).out == REFUSED
    (name,) = grey_redis.store.names()
    assert 0 < grey_redis.store.client.ttl(name) <= 601
    assert attempt(grey_redis, env=env).out == ACCEPTED
    assert 601 < grey_redis.store.client.ttl(name) <= 7201


def test_greylist_redis_prefix_and_database_number(fresh_redis, make_home):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    home.store = RedisStore(fresh_redis, db=3, prefix=b"mx:grey:")
    assert attempt(home).out == REFUSED
    assert [k[:8] for k in home.store.names()] == [b"mx:grey:"]
    assert fresh_redis.client(0).dbsize() == 0


def test_greylist_redis_over_a_unix_socket(tmp_path, make_home):
    with RedisServer(tmp_path / "redis", unix=True) as server:
        home = plugin_home(make_home, ("rcpt", [GREYLIST]))
        home.store = RedisStore(server, db=1)
        home.store.env["GREYLIST_DB"] = "unix://%s?db=1" % server.socket
        assert attempt(home).out == REFUSED
        home.store.age(300, "first_seen")
        assert attempt(home).out == ACCEPTED
        assert len(home.store.names()) == 1


def test_greylist_redis_key_escapes_spaces_and_percent(grey_redis):
    """A quoted local part may hold a space: written %20 (and % as %25), so the
    three parts of a key never run together."""
    assert attempt(grey_redis, sender=b'"a b%"@sender.test').out == REFUSED
    assert grey_redis.store.names() == [
        b"greylist:192.0.2.0/24 <a%20b%25@sender.test> <u@example.com>"]
    assert grey_redis.store.rows()[0][1] == "a b%@sender.test"


def test_greylist_redis_script_is_loaded_again_after_a_flush(grey_redis):
    """EVALSHA answered NOSCRIPT (Redis restarted, or SCRIPT FLUSH): EVAL instead."""
    client = grey_redis.store.client
    assert attempt(grey_redis).out == REFUSED
    client.script_flush()
    assert attempt(grey_redis, rcpt=b"v@example.com").out == REFUSED
    assert len(grey_redis.store.names()) == 2
    sha = hashlib.sha1(plugin_constant(GREYLIST, "REDIS_SCRIPT").encode()).hexdigest()
    assert client.script_exists(sha) == [True]  # EVAL cached it for the next EVALSHA


def plugin_constant(path, name):
    """A string constant of an installed plugin script (read, not run)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return node.value.value
    raise LookupError(name)


def test_greylist_redis_url_password_is_never_logged(make_home):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    port = free_port()
    res = run(home, session(b"a@sender.test", b"u@example.com"), redis_trouble=True,
              env={"GREYLIST_DB": "redis://joe:sekrit@127.0.0.1:%d/2?db=2" % port})
    assert res.out == ACCEPTED
    (line,) = log_lines(res.err, "greylist")
    assert line.startswith(b"cannot use redis://127.0.0.1:%d/2: " % port)
    assert line.endswith(b"; not greylisting")
    assert b"sekrit" not in res.err and b"joe" not in res.err


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/x",
                                 "http://127.0.0.1:6379/"])
def test_greylist_bad_redis_url_fails_open(make_home, url):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    res = run(home, session(b"a@sender.test", b"u@example.com"), redis_trouble=True,
              env={"GREYLIST_DB": url})
    assert res.out == ACCEPTED
    (line,) = log_lines(res.err, "greylist")
    assert line.startswith(b"cannot use ") and line.endswith(b"; not greylisting")


# ================================================================== Redis goes away


def test_greylist_redis_stopped_mid_session_fails_open_and_loses_nothing(own_redis, make_home):
    home = plugin_home(make_home, ("rcpt", [stopper(own_redis), GREYLIST]))
    home.store = RedisStore(own_redis)
    data = crlf(b"MAIL FROM:<a@sender.test>", b"RCPT TO:<u1@example.com>",
                b"RCPT TO:<stop@example.com>", b"RCPT TO:<u2@example.com>", b"DATA",
                b"Subject: t", b"", b"hi", b".", b"QUIT")
    res = run(home, data, env=home.store.env, redis_trouble=True)
    # u1 while Redis ran; then Redis is gone: stop@ and u2 are accepted (fail open).
    assert norm(res.out) == GREETING + OK + GREYLISTED + OK + OK + GO + ACC + BYE
    (msg,) = res.queued
    assert msg.recipients == [b"stop@example.com", b"u2@example.com"]
    lines = log_lines(res.err, "greylist")
    assert lines[0].startswith(b"greylisted (first seen 0 s ago)")
    refused = (b"cannot use redis://127.0.0.1:%d/0: Error 111 connecting to 127.0.0.1:%d"
               b". Connection refused; not greylisting" % (own_redis.port, own_redis.port))
    assert lines[1:] == [refused, refused]
    own_redis.start()  # back, empty: greylisting goes on, nothing to restart
    res = attempt(home)
    assert res.out == REFUSED


def test_greylist_redis_that_never_answers_fails_open(make_home):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    with SilentServer() as silent:
        res = run(home, session(b"a@sender.test", b"u@example.com"), redis_trouble=True,
                  env={"GREYLIST_DB": silent.url(), "REDISTIMEOUT": "0.2"})
        received = b"".join(silent.received)
    assert res.out == ACCEPTED
    assert log_lines(res.err, "greylist") == [
        b"cannot use %s: Timeout reading from socket; not greylisting" % silent.url().encode()]
    # One request, and the script's first: no HELLO, CLIENT SETINFO or SELECT before it.
    assert received.startswith(b"*7\r\n$7\r\nEVALSHA\r\n")


def test_redistimeout_bad_value_is_logged_and_the_default_used(grey_redis):
    res = attempt(grey_redis, env={"REDISTIMEOUT": "soon"})
    assert res.out == REFUSED
    assert log_lines(res.err, "greylist")[0] == (
        b"REDISTIMEOUT='soon' is no number of seconds (0-60); using 0.25")


# ================================================================== ratelimit

def b64(data):
    return base64.b64encode(data)


def mail_session(count=1, rcpts=1):
    """count messages' MAIL and RCPTs (no DATA), then QUIT."""
    lines = []
    for n in range(count):
        lines.append(b"MAIL FROM:<s%d@sender.test>" % n)
        lines += [b"RCPT TO:<u%d@example.com>" % r for r in range(rcpts)]
        lines.append(b"RSET")
    return crlf(*lines, b"QUIT")


def auth_session(user, count=1):
    plain = b"AUTH PLAIN " + b64(b"\0" + user + b"\0pw")
    lines = [b"EHLO c.test", plain]
    lines += [b"MAIL FROM:<%s@example.com>" % user, b"RSET"] * count
    return crlf(*lines, b"QUIT")


def limited(make_home, section, *before):
    """A home with ratelimit-SECTION in that section (after the entries before)."""
    return plugin_home(make_home, (section, [*before, LINKS[section]]))


def counter(server, name):
    """The hash of a ratelimit counter: {field: int}."""
    client = server.client()
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(name).items()}
    finally:
        client.close()


def age_counter(server, name, seconds):
    client = server.client()
    try:
        client.hincrby(name, "start", -seconds * 1000)
    finally:
        client.close()


def rl_env(server, **limits):
    env = {"RATELIMIT_REDIS": server.url()}
    env.update({"RATELIMIT_" + k.upper(): v for k, v in limits.items()})
    return env


def test_ratelimit_messages_are_counted_across_two_hosts(fresh_redis, make_home):
    mx1, mx2 = limited(make_home, "mail"), limited(make_home, "mail")
    env = rl_env(fresh_redis, messages="3/3600")
    for home in (mx1, mx2, mx1):
        assert run(home, mail_session(), env=env, process=True).out == GREETING + OK + OK + FLUSHED + BYE
    res = run(mx2, mail_session(), env=env, process=True)
    assert res.out == GREETING + MESSAGES + b"503 MAIL first (#5.5.1)\r\n" + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"too many messages from network 192.0.2.7/32 (RATELIMIT_MESSAGES=3/3600); refused"]
    name = b"ratelimit:messages:3600:net:192.0.2.7/32"
    assert counter(fresh_redis, name)["count"] == 3  # the refused one is not counted
    client = fresh_redis.client()
    assert 3600 * 1000 < client.pttl(name) <= 2 * 3600 * 1000
    client.close()


def test_ratelimit_recipients_over_the_limit(fresh_redis, make_home):
    home = limited(make_home, "rcpt")
    res = run(home, mail_session(rcpts=4), env=rl_env(fresh_redis, recipients="2/600"))
    assert res.out == GREETING + OK + OK + OK + RECIPIENTS + RECIPIENTS + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"too many recipients from network 192.0.2.7/32 (RATELIMIT_RECIPIENTS=2/600); "
        b"refused"] * 2
    assert counter(fresh_redis, b"ratelimit:recipients:600:net:192.0.2.7/32")["count"] == 2


def test_ratelimit_connections_are_refused_and_closed(fresh_redis, make_home):
    home = limited(make_home, "connection")
    env = rl_env(fresh_redis, connections="2/60")
    for _ in range(2):
        assert run(home, crlf(b"QUIT"), env=env).out == GREETING + BYE
    res = run(home, crlf(b"MAIL FROM:<a@b.c>", b"QUIT"), env=env)
    assert res.out == CONNECTIONS  # instead of the greeting, and closed
    assert log_lines(res.err, "ratelimit") == [
        b"too many connections from network 192.0.2.7/32 (RATELIMIT_CONNECTIONS=2/60); "
        b"refused"]
    # Another client is not affected.
    assert run(home, crlf(b"QUIT"), ip="192.0.2.8", env=env).out == GREETING + BYE


def test_ratelimit_window_resets(fresh_redis, make_home):
    home = limited(make_home, "mail")
    env = rl_env(fresh_redis, messages="2/3600")
    name = b"ratelimit:messages:3600:net:192.0.2.7/32"
    res = run(home, mail_session(count=3, rcpts=0), env=env)
    assert res.out == GREETING + (OK + FLUSHED) * 2 + MESSAGES + FLUSHED + BYE
    age_counter(fresh_redis, name, 2 * 3600)  # two windows later: all forgotten
    res = run(home, mail_session(count=3, rcpts=0), env=env)
    assert res.out == GREETING + (OK + FLUSHED) * 2 + MESSAGES + FLUSHED + BYE
    assert counter(fresh_redis, name)["previous"] == 0


def test_ratelimit_window_slides(fresh_redis, make_home):
    """Half a window after the end of a full one, half of its count still counts:
    4/3600 used up, then 5400 s later 4 * 0.5 = 2 remain in the sliding hour."""
    home = limited(make_home, "mail")
    env = rl_env(fresh_redis, messages="4/3600")
    name = b"ratelimit:messages:3600:net:192.0.2.7/32"
    res = run(home, mail_session(count=5, rcpts=0), env=env)
    assert res.out == GREETING + (OK + FLUSHED) * 4 + MESSAGES + FLUSHED + BYE
    age_counter(fresh_redis, name, 5400)
    res = run(home, mail_session(count=3, rcpts=0), env=env)
    assert res.out == GREETING + (OK + FLUSHED) * 2 + MESSAGES + FLUSHED + BYE
    fields = counter(fresh_redis, name)
    assert (fields["previous"], fields["count"]) == (4, 2)


def test_ratelimit_per_user(fresh_redis, make_home):
    """Authenticated sessions count as their user, wherever they come from, and are
    spared the network limit (AUTH sets RELAYCLIENT); others count by network."""
    home = limited(make_home, "mail")
    env = rl_env(fresh_redis, messages="1/3600", user_messages="3/3600")
    env["SMTPAUTH"] = ""
    ok = GREETING + EHLO + AUTH_OK
    res = run(home, auth_session(b"joe", count=2), env=env, args=("/bin/true",))
    assert res.out == ok + (OK + FLUSHED) * 2 + BYE
    res = run(home, auth_session(b"joe", count=2), ip="198.51.100.9", env=env,
              args=("/bin/true",))
    assert res.out == ok + OK + FLUSHED + MESSAGES + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"too many messages from user joe (RATELIMIT_USER_MESSAGES=3/3600); refused"]
    res = run(home, auth_session(b"ann"), env=env, args=("/bin/true",))
    assert res.out == ok + OK + FLUSHED + BYE
    # Not logged in: the network limit, 1 from 192.0.2.7, untouched by joe's and ann's.
    res = run(home, mail_session(count=2), env=env)
    assert res.out == GREETING + OK + OK + FLUSHED + MESSAGES + b"503 MAIL first (#5.5.1)\r\n" \
        + FLUSHED + BYE
    assert counter(fresh_redis, b"ratelimit:messages:3600:user:joe")["count"] == 3
    assert counter(fresh_redis, b"ratelimit:messages:3600:user:ann")["count"] == 1
    assert counter(fresh_redis, b"ratelimit:messages:3600:net:192.0.2.7/32")["count"] == 1


def test_ratelimit_ipv6_clients_count_by_64(fresh_redis, make_home):
    home = limited(make_home, "mail")
    env = rl_env(fresh_redis, messages="1/3600")
    assert run(home, mail_session(), ip="2001:db8:1:2::5", env=env).out.count(MESSAGES) == 0
    res = run(home, mail_session(), ip="2001:db8:1:2:ffff::9", env=env)
    assert res.out.startswith(GREETING + MESSAGES)
    assert run(home, mail_session(), ip="2001:db8:1:3::5", env=env).out.count(MESSAGES) == 0
    assert counter(fresh_redis, b"ratelimit:messages:3600:net:2001:db8:1:2::/64")["count"] == 1


@pytest.mark.parametrize("env", [{"RELAYCLIENT": ""}, {"NORATELIMIT": ""}])
def test_ratelimit_spares_relay_clients_and_NORATELIMIT(fresh_redis, make_home, env):
    home = limited(make_home, "rcpt")
    full = dict(rl_env(fresh_redis, recipients="0/60"), **env)
    res = run(home, mail_session(rcpts=2), env=full)
    assert res.out == GREETING + OK + OK + OK + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == []
    assert fresh_redis.client().dbsize() == 0


def test_ratelimit_without_redis_says_so_and_accepts(make_home):
    home = limited(make_home, "rcpt")
    res = run(home, mail_session(rcpts=2), env={"RATELIMIT_RECIPIENTS": "0/60"})
    assert res.out == GREETING + OK + OK + OK + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"RATELIMIT_REDIS is not set; not rate limiting"] * 2


def test_ratelimit_without_limits_does_nothing(make_home):
    """No limit for the section: Redis is not even asked (this one is dead)."""
    home = limited(make_home, "rcpt")
    env = {"RATELIMIT_REDIS": "redis://127.0.0.1:%d/0" % free_port(),
           "RATELIMIT_MESSAGES": "1/60"}
    res = run(home, mail_session(rcpts=2), env=env)
    assert res.out == GREETING + OK + OK + OK + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == []


def test_ratelimit_takes_its_section_as_argument(fresh_redis, make_home):
    """`:ratelimit rcpt` (a shell entry, never preloaded) works as ratelimit-rcpt."""
    home = plugin_home(make_home, ("rcpt", [":%s rcpt" % RATELIMIT]))
    res = run(home, mail_session(rcpts=2), env=rl_env(fresh_redis, recipients="1/60"))
    assert res.out == GREETING + OK + OK + RECIPIENTS + FLUSHED + BYE


@pytest.mark.parametrize("entry", ["{plugin}", ":{plugin} data", ":{plugin} mail rcpt"])
def test_ratelimit_needs_its_section_as_argument(fresh_redis, make_home, entry):
    home = plugin_home(make_home, ("rcpt", [entry.format(plugin=RATELIMIT)]))
    res = run(home, mail_session(rcpts=1), env=rl_env(fresh_redis, recipients="0/60"))
    assert res.out == GREETING + OK + OK + FLUSHED + BYE
    (line,) = log_lines(res.err, "ratelimit")
    assert line.startswith(b"usage: ratelimit connection|mail|rcpt, or a link named "
                           b"ratelimit-SECTION (the section it runs in), not ")
    assert line.endswith(b"; not rate limiting")


def test_ratelimit_takes_its_section_from_a_link_name(fresh_redis, make_home, tmp_path):
    """ratelimit-rcpt (make install makes these links): a plain entry, no argument."""
    link = tmp_path / "ratelimit-rcpt"
    link.symlink_to(RATELIMIT)
    home = plugin_home(make_home, ("rcpt", [str(link)]))
    res = run(home, mail_session(rcpts=2), env=rl_env(fresh_redis, recipients="1/60"))
    assert res.out == GREETING + OK + OK + b"451 too many recipients, try again later (#4.7.0)\r\n" \
        + FLUSHED + BYE


@pytest.mark.parametrize("value", ["10", "10/0", "ten/60", "-1/60", "10/60s"])
def test_ratelimit_bad_limit_is_logged_and_ignored(fresh_redis, make_home, value):
    home = limited(make_home, "rcpt")
    res = run(home, mail_session(rcpts=1), env=rl_env(fresh_redis, recipients=value))
    assert res.out == GREETING + OK + OK + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"RATELIMIT_RECIPIENTS=%s is not N/SECONDS (e.g. 50/3600); not limiting by it"
        % repr(value).encode()]


def test_ratelimit_redis_stopped_mid_session_fails_open(own_redis, make_home):
    home = limited(make_home, "rcpt", stopper(own_redis))
    env = rl_env(own_redis, recipients="1/3600")
    data = crlf(b"MAIL FROM:<a@sender.test>", b"RCPT TO:<u1@example.com>",
                b"RCPT TO:<u2@example.com>", b"RCPT TO:<stop@example.com>",
                b"RCPT TO:<u3@example.com>", b"DATA", b"Subject: t", b"", b"hi", b".",
                b"QUIT")
    res = run(home, data, env=env, redis_trouble=True)
    assert norm(res.out) == GREETING + OK + OK + RECIPIENTS + OK + OK + GO + ACC + BYE
    (msg,) = res.queued
    assert msg.recipients == [b"u1@example.com", b"stop@example.com", b"u3@example.com"]
    refused = (b"cannot use redis://127.0.0.1:%d/0: Error 111 connecting to 127.0.0.1:%d"
               b". Connection refused; not rate limiting" % (own_redis.port, own_redis.port))
    assert log_lines(res.err, "ratelimit")[1:] == [refused, refused]


def test_ratelimit_redis_that_never_answers_fails_open(make_home):
    home = limited(make_home, "mail")
    with SilentServer() as silent:
        env = {"RATELIMIT_REDIS": silent.url(), "RATELIMIT_MESSAGES": "1/60",
               "REDISTIMEOUT": "0.2"}
        res = run(home, mail_session(count=2, rcpts=0), env=env, redis_trouble=True)
    assert res.out == GREETING + (OK + FLUSHED) * 2 + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"cannot use %s: Timeout reading from socket; not rate limiting"
        % silent.url().encode()] * 2


# ================================================================== without redis-py


@pytest.fixture
def no_redis_py(tmp_path):
    """PYTHONPATH with a `redis` package that cannot be imported, shadowing redis-py
    for the plugins (their interpreter is not run with -I)."""
    package = tmp_path / "shadow" / "redis"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('no redis-py here')\n")
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def test_greylist_without_redis_py_says_so_and_accepts(make_home, no_redis_py):
    home = plugin_home(make_home, ("rcpt", [GREYLIST]))
    env = dict(no_redis_py, GREYLIST_DB="redis://127.0.0.1:%d/0" % free_port())
    res = run(home, session(b"a@sender.test", b"u@example.com"), env=env)
    assert res.out == ACCEPTED
    assert log_lines(res.err, "greylist") == [
        b"GREYLIST_DB names Redis, but redis-py is not installed (pip install "
        b"'qmail-smtpd-py[redis]'); not greylisting"]
    # The SQLite backend does not need it.
    res = run(home, session(b"a@sender.test", b"u@example.com"), env=no_redis_py)
    assert res.out == REFUSED


def test_ratelimit_without_redis_py_says_so_and_accepts(make_home, no_redis_py):
    home = limited(make_home, "mail")
    env = dict(no_redis_py, RATELIMIT_REDIS="redis://127.0.0.1:%d/0" % free_port(),
               RATELIMIT_MESSAGES="0/60")
    res = run(home, mail_session(rcpts=0), env=env)
    assert res.out == GREETING + OK + FLUSHED + BYE
    assert log_lines(res.err, "ratelimit") == [
        b"redis-py is not installed (pip install 'qmail-smtpd-py[redis]'); not rate limiting"]

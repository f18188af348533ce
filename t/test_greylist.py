"""The greylist sample plugin under the installed qmail-smtpd-py, over pipes.

Each attempt is one SMTP session (MAIL, RCPT, QUIT) with control/smtpplugins
naming the installed plugin (next to the server in the venv's bin/) in
[rcpt].  The default home (conftest.py) has rcpthosts example.com.

Every test of the greylisting rules runs against both backends (the `grey`
fixture is parametrized): SQLite, the default (var/greylist.sqlite3 under the
home), and Redis (GREYLIST_DB=redis://... of a real redis-server on loopback,
conftest.py's fresh_redis).  Time passing is simulated by moving the stored
timestamps back (an UPDATE in SQLite, HINCRBY in Redis), so nothing sleeps and
nothing asserts durations.  The tests of the SQLite file itself take
`sqlite_grey`; those of Redis alone (keys, TTLs, outages, several hosts) are in
test_redis_plugins.py.

The sessions are played in-process (plugin_world.run_home: the core with
the home's configuration, the plugin a real process), with the plugin
preloaded as the pool runs it; the concurrency tests run the installed
server over pipes, one process per session.  test_preload.py shows that
greylist gives the same results both ways.

Behaviour: plugins/greylist (its docstring is the manual).
"""

import concurrent.futures
import contextlib
import os
import re
import sqlite3
import subprocess

import pytest
from plugin_world import preloaded, run_home

from helpers import BIN_DIR, BYE, GREETING, OK, crlf, run_smtp

GREYLIST = os.path.join(BIN_DIR, "greylist")

AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
GREYLISTED = b"451 greylisted, please try again later (#4.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"

DEFAULT_DB = os.path.join("var", "greylist.sqlite3")

ACCEPTED = GREETING + OK + OK + BYE
REFUSED = GREETING + OK + GREYLISTED + BYE


def session(sender=b"a@sender.test", rcpt=b"u@example.com"):
    return crlf(b"MAIL FROM:<" + sender + b">", b"RCPT TO:<" + rcpt + b">", b"QUIT")


class SQLiteStore:
    """The SQLite backend: the database at path (relative to the home)."""

    def __init__(self, home, path=DEFAULT_DB):
        self.path = os.path.join(home.path, path)
        self.env = {}

    # Each connection is closed before the next session: a preloaded plugin
    # is a fork of this process, and SQLite's locks do not survive a fork of
    # a process that has the database open (the pool's processes never do).
    def rows(self):
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            return db.execute("SELECT network, sender, recipient, first_seen, last_seen,"
                              " passed, attempts FROM triplets ORDER BY 1, 2, 3").fetchall()

    def age(self, seconds, column):
        with contextlib.closing(sqlite3.connect(self.path)) as db, db:
            db.execute("UPDATE triplets SET %s = %s - ?" % (column, column), (seconds,))

    def untouched(self):
        return not os.path.exists(self.path)


class RedisStore:
    """The Redis backend: GREYLIST_DB=server's URL; one hash per triplet, named
    "greylist:NETWORK <SENDER> <RECIPIENT>" (space and % escaped in the addresses)."""

    def __init__(self, server, db=0, prefix=b"greylist:"):
        self.client = server.client(db)
        self.prefix = prefix
        self.env = {"GREYLIST_DB": server.url(db)}
        if prefix != b"greylist:":
            self.env["GREYLIST_REDIS_PREFIX"] = os.fsdecode(prefix)

    def names(self):
        return sorted(self.client.scan_iter(match=self.prefix + b"*"))

    @staticmethod
    def triplet(name):
        """(network, sender, recipient) from a key without its prefix."""
        network, sender, recipient = name.split(b" ")
        assert sender[:1] + sender[-1:] == b"<>" and recipient[:1] + recipient[-1:] == b"<>"
        return tuple(os.fsdecode(part.replace(b"%20", b" ").replace(b"%25", b"%"))
                     for part in (network, sender[1:-1], recipient[1:-1]))

    def rows(self):
        table = []
        for key in self.names():
            first, last, passed, attempts = self.client.hmget(
                key, "first_seen", "last_seen", "passed", "attempts")
            table.append(self.triplet(key[len(self.prefix):]) + (
                int(first), int(last), None if passed is None else int(passed),
                int(attempts)))
        return sorted(table)

    def age(self, seconds, column):
        for key in self.names():
            if self.client.hexists(key, column):
                self.client.hincrby(key, column, -seconds)

    def untouched(self):
        return self.names() == []


@pytest.fixture(scope="module", autouse=True)
def greylist_preloaded():
    with preloaded(GREYLIST, base_env={}):
        yield


def greylist_home(make_home):
    if not os.access(GREYLIST, os.X_OK):
        pytest.fail("%s is not installed next to the server (pip install .)" % GREYLIST)
    return make_home(control={"smtpplugins": "[rcpt]\n%s\n" % GREYLIST})


@pytest.fixture(params=["sqlite", "redis"])
def grey(request, make_home):
    """A home with greylist in [rcpt], on each backend in turn (home.store)."""
    home = greylist_home(make_home)
    if request.param == "redis":
        home.store = RedisStore(request.getfixturevalue("fresh_redis"))
    else:
        home.store = SQLiteStore(home)
    return home


@pytest.fixture
def sqlite_grey(make_home):
    """A home with greylist in [rcpt] on the SQLite backend only."""
    home = greylist_home(make_home)
    home.store = SQLiteStore(home)
    return home


def attempt(home, ip="192.0.2.10", sender=b"a@sender.test", rcpt=b"u@example.com",
            env=None, data=None, args=(), db_trouble=False, process=False):
    """One session with the home's backend (in-process, or with process the
    installed server); unless db_trouble, the log must not mention database
    errors."""
    full = {"TCPREMOTEIP": ip}
    full.update(home.store.env)
    full.update(env or {})
    play = run_smtp if process else run_home
    res = play(data or session(sender, rcpt), env=full, home=home, args=args)
    assert b"Traceback" not in res.err, res.err.decode(errors="replace")
    if not db_trouble:
        assert b"cannot use" not in res.err and b"locked" not in res.err, res.err
    assert res.status == 0
    return res


def db_path(home, path=DEFAULT_DB):
    return os.path.join(home.path, path)


def rows(home, path=None):
    """(network, sender, recipient, first_seen, last_seen, passed, attempts) of every
    triplet, sorted: in the home's backend, or in the SQLite database at path."""
    return (SQLiteStore(home, path) if path else home.store).rows()


def age(home, seconds, column="first_seen", path=None):
    """Pretend `seconds` have passed for every row (move `column` back)."""
    (SQLiteStore(home, path) if path else home.store).age(seconds, column)


def untouched(home):
    """True if the backend holds nothing (no database file, no key)."""
    return home.store.untouched()


# ================================================================== the basic cycle


def test_first_attempt_is_greylisted_and_recorded(grey):
    res = attempt(grey)
    assert res.out == REFUSED
    ((network, sender, rcpt, first, last, passed, attempts),) = rows(grey)
    assert (network, sender, rcpt) == ("192.0.2.0/24", "a@sender.test", "u@example.com")
    assert first == last and passed is None and attempts == 1
    assert b"greylist: pid " in res.err and b"greylisted" in res.err


def test_retry_before_the_delay_is_greylisted_again(grey):
    """290, not 299: the second attempt may well come a second later."""
    assert attempt(grey).out == REFUSED
    age(grey, 290)
    assert attempt(grey).out == REFUSED
    ((*_, passed, attempts),) = rows(grey)
    assert passed is None and attempts == 2


def test_retry_after_the_delay_is_accepted_and_stays_accepted(grey):
    assert attempt(grey).out == REFUSED
    age(grey, 300)
    res = attempt(grey)
    assert res.out == ACCEPTED
    # 300 s back, and the second (or two) the attempt itself took on a busy machine
    assert re.search(rb"passed after 30[0-9] s", res.err), res.err
    ((*_, passed, attempts),) = rows(grey)
    assert passed is not None and attempts == 2
    assert attempt(grey).out == ACCEPTED  # confirmed: no more waiting
    assert rows(grey)[0][-1] == 3


def test_accepted_message_is_queued(grey):
    attempt(grey)
    age(grey, 600)
    data = crlf(b"MAIL FROM:<a@sender.test>", b"RCPT TO:<u@example.com>", b"DATA",
                b"Subject: x", b"", b"hi", b".", b"QUIT")
    res = attempt(grey, data=data)
    (msg,) = res.queued
    assert msg.recipients == [b"u@example.com"]


def test_greylist_delay_env(grey):
    env = {"GREYLIST_DELAY": "3600"}
    assert attempt(grey, env=env).out == REFUSED
    age(grey, 600)
    assert attempt(grey, env=env).out == REFUSED
    age(grey, 3000)
    assert attempt(grey, env=env).out == ACCEPTED


def test_triplet_matching_ignores_case_and_batv_tags(grey):
    assert attempt(grey, sender=b"prvs=1234abcdef=A@Sender.TEST",
                   rcpt=b"U@example.com").out == REFUSED
    age(grey, 300)
    assert attempt(grey, sender=b"prvs=9876fedcba=a@sender.test").out == ACCEPTED
    assert [r[1:3] for r in rows(grey)] == [("a@sender.test", "u@example.com")]


# ================================================================== triplets


def test_separate_triplets_are_independent(grey):
    attempt(grey)
    age(grey, 300)
    assert attempt(grey).out == ACCEPTED
    assert attempt(grey, rcpt=b"other@example.com").out == REFUSED
    assert attempt(grey, sender=b"b@sender.test").out == REFUSED
    assert attempt(grey, ip="198.51.100.10").out == REFUSED
    assert len(rows(grey)) == 4
    assert attempt(grey).out == ACCEPTED  # the first one is not disturbed


def test_one_ipv4_24_is_one_client(grey):
    attempt(grey, ip="192.0.2.10")
    age(grey, 300)
    assert attempt(grey, ip="192.0.2.200").out == ACCEPTED
    assert attempt(grey, ip="192.0.3.10").out == REFUSED


def test_ipv6_clients_count_by_64(grey):
    assert attempt(grey, ip="2001:db8:1:2::5").out == REFUSED
    age(grey, 300)
    assert attempt(grey, ip="2001:db8:1:2:ffff::99").out == ACCEPTED
    assert attempt(grey, ip="2001:db8:1:3::5").out == REFUSED
    assert [r[0] for r in rows(grey)] == ["2001:db8:1:2::/64", "2001:db8:1:3::/64"]


def test_ipv4_mapped_client_is_ipv4(grey):
    attempt(grey, ip="::ffff:192.0.2.10")
    assert [r[0] for r in rows(grey)] == ["192.0.2.0/24"]


def test_prefix_lengths_are_configurable(grey):
    env = {"GREYLIST_V4_PREFIX": "32", "GREYLIST_V6_PREFIX": "48"}
    attempt(grey, ip="192.0.2.10", env=env)
    attempt(grey, ip="2001:db8:1:2::5", env=env)
    assert [r[0] for r in rows(grey)] == ["192.0.2.10/32", "2001:db8:1::/48"]


def test_null_sender_is_greylisted_too(grey):
    assert attempt(grey, sender=b"").out == REFUSED
    age(grey, 300)
    assert attempt(grey, sender=b"").out == ACCEPTED
    assert [r[1] for r in rows(grey)] == [""]


def test_each_recipient_of_a_session_is_judged(grey):
    attempt(grey, rcpt=b"old@example.com")
    age(grey, 300)
    data = crlf(b"MAIL FROM:<a@sender.test>", b"RCPT TO:<old@example.com>",
                b"RCPT TO:<new@example.com>", b"QUIT")
    res = attempt(grey, data=data)
    assert res.out == GREETING + OK + OK + GREYLISTED + BYE


# ================================================================== expiry


def test_unconfirmed_entry_expires_after_the_retry_window(grey):
    attempt(grey)
    age(grey, 2 * 86400 + 1)
    assert attempt(grey).out == REFUSED  # too late: it starts over
    ((*_, first, last, passed, attempts),) = rows(grey)
    assert first == last and passed is None and attempts == 1


def test_retry_window_env(grey):
    env = {"GREYLIST_RETRY_WINDOW": "3600"}
    attempt(grey, env=env)
    age(grey, 3601)
    assert attempt(grey, env=env).out == REFUSED
    age(grey, 1000)
    assert attempt(grey, env=env).out == ACCEPTED


def test_confirmed_entry_expires_when_unused(grey):
    attempt(grey)
    age(grey, 300)
    assert attempt(grey).out == ACCEPTED
    age(grey, 34 * 86400, column="last_seen")
    assert attempt(grey).out == ACCEPTED  # still known; this refreshes last_seen
    age(grey, 36 * 86400, column="last_seen")
    assert attempt(grey).out == REFUSED
    ((*_, passed, attempts),) = rows(grey)
    assert passed is None and attempts == 1


def test_old_rows_of_other_triplets_are_purged(sqlite_grey):
    """In Redis each hash has a TTL instead (test_redis_plugins.py)."""
    grey = sqlite_grey
    attempt(grey, rcpt=b"stale@example.com")
    age(grey, 3 * 86400)
    attempt(grey, rcpt=b"fresh@example.com")
    assert [r[2] for r in rows(grey)] == ["fresh@example.com"]


# ================================================================== not greylisted


def test_relay_clients_are_not_greylisted(grey):
    res = attempt(grey, env={"RELAYCLIENT": ""})
    assert res.out == ACCEPTED
    assert untouched(grey)


def test_authenticated_sessions_are_not_greylisted(grey):
    data = crlf(b"EHLO c.test", b"AUTH PLAIN AGpvZQBzZWNyZXQ=", b"MAIL FROM:<a@sender.test>",
                b"RCPT TO:<u@elsewhere.test>", b"QUIT")
    res = attempt(grey, data=data, env={"SMTPAUTH": ""}, args=("/bin/true",))
    assert res.out.endswith(AUTH_OK + OK + OK + BYE)
    assert untouched(grey)


@pytest.mark.parametrize("value", ["", "1"])
def test_nogreylist_env_skips(grey, value):
    assert attempt(grey, env={"NOGREYLIST": value}).out == ACCEPTED
    assert untouched(grey)


def test_client_without_ip_address_is_logged_and_accepted(grey):
    res = attempt(grey, ip="unknown")
    assert res.out == ACCEPTED
    assert b"client address 'unknown' is no IP address; not greylisting" in res.err
    assert untouched(grey)


def test_recipients_outside_rcpthosts_leave_no_row(grey):
    res = attempt(grey, rcpt=b"u@elsewhere.test")
    assert res.out == GREETING + OK + NOGATEWAY + BYE
    assert untouched(grey)


def test_whitelist_file(grey):
    path = os.path.join(grey.path, "control", "greylistwhitelist")
    with open(path, "w") as f:
        f.write("# friends\n198.51.100.7\n203.0.113.0/24  # a farm\n192.0.2.\n"
                "2001:db8:aa::/48\nnot an address\n")
    env = {"GREYLIST_WHITELIST": "control/greylistwhitelist"}
    for ip in ("198.51.100.7", "203.0.113.99", "192.0.2.77", "2001:db8:aa:1::1",
               "::ffff:198.51.100.7"):
        assert attempt(grey, ip=ip, env=env).out == ACCEPTED, ip
    assert untouched(grey)
    for ip in ("198.51.100.8", "192.0.20.1", "2001:db8:ab::1"):
        assert attempt(grey, ip=ip, env=env).out == REFUSED, ip
    assert len(rows(grey)) == 3


def test_missing_whitelist_file_is_logged_and_greylisting_goes_on(grey):
    res = attempt(grey, env={"GREYLIST_WHITELIST": "control/nonesuch"})
    assert res.out == REFUSED
    assert b"cannot read GREYLIST_WHITELIST control/nonesuch" in res.err


# ================================================================== the SQLite database


def test_default_db_is_created_under_the_qmail_home(sqlite_grey):
    grey = sqlite_grey
    assert not os.path.exists(os.path.join(grey.path, "var"))
    attempt(grey)
    assert os.path.isfile(db_path(grey))
    with contextlib.closing(sqlite3.connect(db_path(grey))) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("relative", [True, False])
def test_greylist_db_env_is_honoured(sqlite_grey, tmp_path, relative):
    grey = sqlite_grey
    path = "data/grey/db.sqlite3" if relative else str(tmp_path / "elsewhere" / "g.db")
    env = {"GREYLIST_DB": path}
    assert attempt(grey, env=env).out == REFUSED
    assert untouched(grey)
    assert len(rows(grey, path)) == 1  # joins an absolute path as it is
    age(grey, 300, path=path)
    assert attempt(grey, env=env).out == ACCEPTED


def unusable(home, kind):
    """A GREYLIST_DB path that cannot be used."""
    if kind == "parent-is-a-file":
        with open(os.path.join(home.path, "afile"), "w") as f:
            f.write("x")
        return "afile/greylist.sqlite3"
    if kind == "is-a-directory":
        os.makedirs(os.path.join(home.path, "adir"))
        return "adir"
    if kind == "not-a-database":
        with open(os.path.join(home.path, "junk.sqlite3"), "wb") as f:
            f.write(b"this is not an SQLite database\n" * 200)
        return "junk.sqlite3"
    if kind == "unwritable-directory":
        return "/proc/greylist.sqlite3"  # no file can be made there, not even by root
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["parent-is-a-file", "is-a-directory", "not-a-database",
                                  "unwritable-directory"])
def test_unusable_db_fails_open_with_a_log_line(sqlite_grey, kind):
    grey = sqlite_grey
    path = unusable(grey, kind)
    res = attempt(grey, env={"GREYLIST_DB": path}, db_trouble=True)
    assert res.out == ACCEPTED
    assert b"greylist: pid " in res.err
    assert b"cannot use " + path.encode() + b": " in res.err
    assert b"not greylisting" in res.err


def test_locked_db_fails_open_with_a_log_line(sqlite_grey):
    grey = sqlite_grey
    assert attempt(grey).out == REFUSED  # creates the database
    holder = sqlite3.connect(db_path(grey), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        # the installed server: this process holds the lock, a fork of it would too
        res = attempt(grey, rcpt=b"other@example.com", db_trouble=True, process=True)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert res.out == ACCEPTED
    assert b"cannot use var/greylist.sqlite3: database is locked; not greylisting" in res.err
    assert len(rows(grey)) == 1


# ================================================================== concurrency


def test_concurrent_sessions_share_one_database(sqlite_grey):
    """12 sessions at once (4 triplets, 3 sessions each) against a database none of
    them has created yet; then the same again after the delay.  (Redis: the
    next test, and test_redis_plugins.py's hosts.)"""
    grey = sqlite_grey
    triplets = [("192.0.2.%d" % (n * 30), b"s%d@sender.test" % n, b"u%d@example.com" % (n % 3))
                for n in range(1, 5)]
    jobs = triplets * 3

    def run_all():
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda t: attempt(grey, ip=t[0], sender=t[1], rcpt=t[2],
                                                   process=True), jobs))

    results = run_all()
    for res in results:
        assert res.out == REFUSED, res.err
        assert b"cannot use" not in res.err and b"locked" not in res.err
    table = rows(grey)
    assert len(table) == 4  # exactly one row per triplet
    assert sorted(r[-1] for r in table) == [3] * 4  # every attempt counted once
    age(grey, 300)
    for res in run_all():
        assert res.out == ACCEPTED, res.err
        assert b"cannot use" not in res.err and b"locked" not in res.err
    table = rows(grey)
    assert len(table) == 4 and all(r[5] is not None for r in table)
    assert sorted(r[-1] for r in table) == [6] * 4


def test_many_plugin_processes_at_once(grey):
    """16 plugin processes started together on a fresh database, four per triplet."""
    procs = []
    for n in range(16):
        env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "198.51.100.%d" % (n % 4),
               "SMTPMAILFROM": "s@sender.test", "SMTPRCPTTO": "u%d@example.com" % (n % 4),
               "SMTPRCPTHOSTSOK": "1", **grey.store.env}
        procs.append(subprocess.Popen([GREYLIST], env=env, cwd=grey.path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0
        assert out == b"E451 greylisted, please try again later (#4.7.1)\n", err
        assert b"locked" not in err and b"cannot use" not in err and b"Traceback" not in err
    counts = [(r[2], r[-1]) for r in rows(grey)]
    assert counts == [("u%d@example.com" % n, 4) for n in range(4)]

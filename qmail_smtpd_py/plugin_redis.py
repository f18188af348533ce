"""Redis for the sample plugins (greylist's Redis backend, ratelimit), through redis-py.

Theory of operation: one plugin call is one connection, one Lua script and
one close.  The script makes the whole decision on the server (read the
state, compare it with the server's clock, write it back with a TTL), so
calls from any number of sessions on any number of hosts cannot interleave,
and the client sends one request and reads one answer: EVALSHA, or EVAL
when the server does not know the script yet (NOSCRIPT, answered at once).

Nothing here connects at import time: every call makes its own connection.  A
parent that imports a plugin once and forks a child per call (preloading)
therefore never shares a socket between processes, and importing this
module (which imports redis-py, about 0.2 s in a fresh interpreter) is the
only thing such a parent needs to do ahead.

Timeouts are short and retries off: REDISTIMEOUT seconds (default 0.25) to
connect and the same for the answer.  A Redis that is down on this host
refuses the connection at once; one that is unreachable, or accepts and
never answers, costs REDISTIMEOUT.  A host name in the URL is resolved
without a time limit (as every resolver call is): use an address, or a
name from /etc/hosts.  Callers catch ERRORS, accept and log one line.

URLs are redis-py's: redis://[[user]:password@]host[:port][/db],
rediss://... (TLS), unix:///path/to/socket?db=N.  The connection speaks RESP2
and sends no CLIENT SETINFO, so connecting costs no extra round trips.

Only the plugins that use Redis import this module (and so redis-py, the
`redis` extra); the server never does.
"""

import hashlib
import inspect
import os

import redis
from redis.connection import parse_url

from qmail_smtpd_py import plugin

DEFAULT_TIMEOUT = 0.25
TIMEOUT_VARIABLE = "REDISTIMEOUT"

# What a call fails open on: redis-py's own errors (connection refused or
# reset, timeouts, error replies, authentication), socket errors it lets
# through, and a URL it cannot parse (ValueError).
ERRORS = (redis.RedisError, OSError, ValueError)


def _connection_options():
    """Keyword arguments for redis.Connection that this redis-py version takes:
    no retries (a Connection's default, unlike a redis.Redis client's three;
    retry=None also spares a deep copy of a Retry object per connection),
    RESP2 (redis-py 8 defaults to RESP3, whose HELLO costs a round trip per
    connection), no CLIENT SETINFO (two more)."""
    known = inspect.signature(redis.Connection.__init__).parameters
    if not known.keys() & {"protocol", "driver_info", "lib_name"}:  # a wrapper's (*args, **kw)
        known = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    options = {"retry": None, "health_check_interval": 0}
    if "protocol" in known:
        options["protocol"] = 2
    if "driver_info" in known:
        options["driver_info"] = None
    elif "lib_name" in known:
        options.update(lib_name=None, lib_version=None)
    return options


CONNECTION_OPTIONS = _connection_options()


def timeout_from(environ):
    """REDISTIMEOUT as seconds (0 < t <= 60); DEFAULT_TIMEOUT when unset, and
    when bad (then logged)."""
    text = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:
        plugin.log("%s=%r is no number of seconds (0-60); using %g"
                   % (TIMEOUT_VARIABLE, text, DEFAULT_TIMEOUT))
        return DEFAULT_TIMEOUT
    return value


def display(url):
    """The URL for a log line: no user, password or query (which may hold one)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    location, slash, path = rest.partition("/")
    location = location.rpartition("@")[2]
    return "%s://%s%s%s" % (scheme, location, slash, path.partition("?")[0])


def key(text):
    """A str key or argument as bytes, the environment's bytes restored
    (plugin.Session decodes with surrogateescape)."""
    return os.fsencode(text)


class Script:
    """A Lua script, run with EVALSHA and, when the server does not have it
    cached (after a restart or SCRIPT FLUSH), with EVAL, which caches it."""

    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, connection, keys, args):
        """The script's reply, over a redis.Connection; raises one of ERRORS."""
        try:
            connection.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
            return connection.read_response()
        except redis.exceptions.NoScriptError:
            connection.send_command("EVAL", self.source, len(keys), *keys, *args)
            return connection.read_response()


def run(url, timeout, script, keys, args):
    """Connect to url, run script once with keys and args, close; returns the
    script's reply (raw: no redis-py response callbacks).  Raises one of ERRORS.

    A bare connection, not a redis.Redis client nor a pool: a client builds a
    table of some 170 response callbacks each time it is made, and in a child
    just forked every object touched costs a copied page, so the fewer the
    better (bench/redis_plugins.py)."""
    options = parse_url(url)  # ValueError for a bad one
    connection_class = options.pop("connection_class", redis.Connection)
    options.update(CONNECTION_OPTIONS, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        connection = connection_class(**options)
    except TypeError as e:  # an option in the URL's query that a connection does not take
        raise ValueError("bad URL option: %s" % e) from None
    try:
        return script(connection, keys, args)
    finally:
        connection.disconnect()


def reason(exc):
    """A short text for the log: redis-py's message without its final period."""
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    if isinstance(exc, redis.TimeoutError) and "timeout" not in text.lower():
        text = "timeout: " + text
    return text

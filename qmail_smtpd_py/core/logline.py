"""The log line format, in one place.

Every line the server writes to its log (stderr, where multilog or
journald picks it up) reads

    <pid> <client ip> <event> <details>

The pid is the connection's id: tcpserver's own `pid N from IP` / `end N
status S` lines, qmail-spp plugins (which print their parent's pid) and
this server's lines all carry it, so `grep ' 4711 '` gathers one
connection.  Details are `key=value` words; each value is one word (see
word()), so a client cannot forge or split a line.  The events:

    connect host=H port=P [relayclient]
    command VERB ARGS...                 (SMTPLOGLEVEL 2 or more)
    reply TEXT                           (SMTPLOGLEVEL 3)
    tls cipher=C
    auth method=M user=U
    refuse VERB CODE by=CHECK [plugin=P] [program=P] [from=<A>] [to=<A>]
           [method=M user=U] [bytes=N]
    accept qp=N bytes=N from=<A> rcpts=N
    close status=S why=quit|eof|timeout|plugin|... messages=N
    XF (N): PROGRAM                      (SMTPEXTFORK, the patch's labels)

Anything else is an error or warning in plain words.  No password, AUTH
response or message content is ever logged.

The words of by= and why= are listed below (CHECKS, ENDINGS): the metrics
(metrics.py) count refusals and sessions by them, from the facts the Log
requests carry (requests.Refused, requests.Closed).
"""

from __future__ import annotations

_AUTH_MECHANISMS = (b"login", b"plain", b"cram-md5")

# The checks a refuse line names (by=).
CHECKS = ("rcpthosts", "badmailfrom", "syntax", "sequence", "unimplemented", "max-line",
          "databytes", "hops", "bare-lf", "queue", "auth-required", "auth-off", "canceled",
          "tls-required", "checkpassword", "plugin", "plugin-deferred", "extfork")
# Why a session ended (the why= of a close line); "controls" also ends the
# sessions that cannot read their control files before the greeting.
ENDINGS = ("quit", "eof", "timeout", "write", "plugin", "extfork", "bare-lf", "tls",
           "controls", "ipme")

# Log values are one word: bytes outside printable ASCII, the space and the
# backslash are written as \xNN, so a client cannot forge or split a line.
_LOG_ESCAPES = {c: "\\x%02x" % c for c in range(256) if not 0x21 <= c <= 0x7E or c == 0x5C}


def word(raw: bytes | None) -> str:
    """Bytes (or None) as one printable log word."""
    if raw is None:
        return "-"
    return raw.decode("latin-1").translate(_LOG_ESCAPES)


def connection_prefix(connection_id: str, env: dict[bytes, bytes]) -> str:
    """The start of each of a connection's log lines: "<id> <client ip> "."""
    return "%s %s " % (connection_id, word(env.get(b"TCPREMOTEIP", b"unknown")))


def words(line: bytes) -> str:
    """A line of client or server text for the log: each space-separated
    part escaped as one word."""
    return " ".join(map(word, line.split(b" ")))


def command_words(verb: bytes, line: bytes) -> str:
    """A command line for the log; what follows AUTH's mechanism may be a
    credential, and so may anything in the place of a mechanism."""
    if verb != b"auth":
        return words(line)
    parts = line.split()
    shown = ["AUTH"]
    if len(parts) > 1:
        known = parts[1].lower() in _AUTH_MECHANISMS
        shown.append(word(parts[1]) if known else "[hidden]")
    if len(parts) > 2:
        shown.append("[hidden]")
    return " ".join(shown)


def reply_code(reply: bytes) -> bytes:
    """The first three bytes of a reply's last line (its code, as a rule)."""
    return bytes(reply).rstrip(b"\r\n").rsplit(b"\n", 1)[-1][:3]


def refusal_words(verb: bytes, code: bytes, by: str, fields: dict) -> str:
    """`refuse <VERB> <code> by=<check> key=value...`; code: the reply's (reply_code)."""
    words = ["refuse", word(verb.upper()), word(code or b"-"), "by=" + by]
    for key, value in fields.items():
        if isinstance(value, bytes):
            value = "<%s>" % word(value) if key in ("from", "to") else word(value)
        words.append("%s=%s" % (key, value))
    return " ".join(words)

"""qmail-spp: the SMTP plugin interface, as a part of the sans-I/O core.

Theory of operation.  control/smtpplugins lists programs per section
([connection] [helo] [mail] [rcpt] [data] [auth]).  At each hook the session
runs the section's programs in order; each prints one-letter commands on
its stdout, which are acted on line by line as they arrive, until a
terminating command (A N O E R D) or EOF; then its exit status is checked.
The hook's result is REJECT, NORMAL or SKIP_CHECKS (the O command), or the
session ends (R, D).  Running a program is a request (start, read lines,
finish), so this module never touches a process itself.

Deviations from qmail-spp 0.42 (../shared/spec/DECISIONS.md): an
unterminated last output line counts whole, a CR before the LF is dropped,
an empty H line is ignored, H and L texts are bounded (and what is dropped
is logged); the stale badmailfrom flag is fixed in session.py.
"""

from __future__ import annotations

from . import replies
from .logline import word
from .requests import (
    EXEC,
    FINISH_PLUGIN,
    FORK,
    PIPE,
    READ_PLUGIN,
    CannotStart,
    Exited,
    Lines,
    Log,
    Signaled,
    StartPlugin,
    TimedOut,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING would cost an import per connection
if TYPE_CHECKING:
    from collections.abc import Callable

    from .requests import Steps

REJECT, NORMAL, SKIP_CHECKS = 0, 1, 2
MAX_TEXT = 1 << 16  # most bytes of H headers, and of each LM/LR/LD buffer, kept
FLUSH_AT = 1 << 16  # replies printed by a plugin are sent once this many are pending

# The byte after '[' picks the section; anything else discards entries.
SECTIONS = (b"c", b"h", b"m", b"r", b"d", b"a")
_TERMINATING = {ord("A"): NORMAL, ord("N"): NORMAL, ord("O"): SKIP_CHECKS, ord("E"): REJECT}
_CANNOT_START = {PIPE: replies.SPP_CANT_PIPE, FORK: replies.SPP_FORK_FAILED,
                 EXEC: replies.SPP_CANT_EXECUTE}


def parse_config(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    """Plugin entries per section letter from the control file's lines
    (already stripped of comments and blank lines, as control files are)."""
    sections = {letter: [] for letter in SECTIONS}
    current = None  # entries before the first header are discarded
    for line in lines:
        if line[:1] == b"[":
            current = sections.get(line[1:2])
        elif current is not None:
            current.append(line)
    return sections


def plugin_argv(entry: bytes) -> tuple[bytes, ...]:
    """A ':' entry is a shell command line; any other is the program's path."""
    if entry[:1] == b":":
        return (b"/bin/sh", b"-c", entry[1:])
    return (entry,)  # the whole line: no argument splitting, as qmail-spp


def plugin_entry(argv: tuple[bytes, ...]) -> bytes:
    """The entry plugin_argv() made argv from (the log's plugin= word)."""
    if len(argv) == 3 and argv[:2] == (b"/bin/sh", b"-c"):
        return b":" + argv[2]
    return argv[0]


class Disconnect(Exception):
    """A plugin said R or D: send what is pending and exit 0."""


class _Deferred:
    """An LM/LR/LD buffer.  Like qmail-spp's, a NUL is appended each time it
    fires and the reply stops at the first NUL, so text added after the first
    firing is never shown (spec spp.md §5.2)."""

    __slots__ = ("text", "entry")

    def __init__(self):
        self.text = bytearray()
        self.entry = None  # the plugin that deferred the error, for the log

    def fire(self):
        """The reply to send, or None if nothing is pending."""
        if not self.text:
            return None
        self.text += b"\0"
        return bytes(self.text[:self.text.index(b"\0")])


class Plugins:
    """The qmail-spp state of one connection."""

    def __init__(self, sections: dict[bytes, list[bytes]] | None,
                 time_limit: float | None = None) -> None:
        self.sections = sections or {}
        self.running = sections is not None   # False after A, or with NOSPP
        self.time_limit = time_limit          # SPPTIMEOUT
        self.headers = bytearray()            # H lines, LF-terminated
        self.deferred = {b"M": _Deferred(), b"R": _Deferred(), b"D": _Deferred()}
        self.rcptcount = 0                    # recipients accepted so far
        self.rcptcountall = 0                 # recipients that reached the plugins
        self.entry = None                     # the plugin run last: who decided, for the log
        self._dropped = set()                 # texts over MAX_TEXT in this plugin run

    def reset(self):
        """RSET, and the start of each message body."""
        self.headers = bytearray()
        for deferred in self.deferred.values():
            deferred.text = bytearray()
        self.rcptcount = self.rcptcountall = 0

    def pending_error(self, which, out):
        """Send a deferred error for MAIL/RCPT/DATA (b"M", b"R", b"D").  Returns
        the entry of the plugin that deferred it, or None if none is pending."""
        deferred = self.deferred[which]
        reply = deferred.fire()
        if reply is None:
            return None
        out += reply
        return deferred.entry

    def hook(self, section: bytes, env: dict[bytes, bytes], out: bytearray,
             flush: Callable[[], Steps], addr_var: bytes | None = None,
             addr: bytes | None = None) -> Steps:
        """Run the plugins of a section (generator).  Replies go into out;
        flush() (a generator) sends them when a plugin prints without end.
        Returns (result, addr): addr is the address as changed by C (only
        when addr_var names the variable holding it).  Raises Disconnect."""
        if not self.running:
            return NORMAL, addr
        if addr_var is not None:
            env[addr_var] = addr
        for entry in self.sections.get(section, ()):
            self.entry = entry
            started = yield StartPlugin(plugin_argv(entry), dict(env), self.time_limit)
            if type(started) is CannotStart:
                if started.reason != EXEC:
                    yield Log("qmail-spp: %s: %s" % (word(entry), started.detail))
                out += replies.spp_failure(entry, _CANNOT_START[started.reason])
                return REJECT, addr
            self._dropped.clear()
            last = None
            while last is None:
                got = yield READ_PLUGIN
                if type(got) is not Lines:  # end of its output, or killed
                    break
                for raw in got.lines:
                    last, addr = self._command(raw, env, out, addr_var, addr)
                    if last is not None:
                        break
                if len(out) > FLUSH_AT:
                    yield from flush()
            for what in sorted(self._dropped):
                yield Log("qmail-spp: %s: %s text over %d bytes not used"
                          % (word(entry), what, MAX_TEXT))
            finished = yield FINISH_PLUGIN
            failure = self._failure(finished)
            if type(finished) is TimedOut:
                yield Log("qmail-spp: pid %d killed after its time limit of %gs"
                          % (started.pid, self.time_limit))
            if failure is not None:
                out += replies.spp_failure(entry, failure)
                return REJECT, addr
            if last is not None:
                if last in b"RD":
                    raise Disconnect()
                return _TERMINATING[last], addr
        return NORMAL, addr

    @staticmethod
    def _failure(finished):
        """The failure text for how the plugin ended, or None if it did not fail."""
        kind = type(finished)
        if kind is Exited:
            return replies.SPP_CANT_EXECUTE if finished.code == 120 else None
        if kind is Signaled or kind is TimedOut:
            return replies.SPP_CRASHED
        return replies.SPP_WAIT_FAILED

    def _command(self, raw, env, out, addr_var, addr):
        """Act on one output line; returns (terminating letter or None, addr)."""
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return None, addr
        letter, payload = line[0], line[1:]
        if letter in b"PER":
            out += replies.plugin_line(_cstr(payload))
        elif letter == ord("H"):
            if payload and len(self.headers) + len(payload) < MAX_TEXT:
                self.headers += payload + b"\n"
            elif payload:
                self._dropped.add("H")
        elif letter == ord("C"):
            if addr_var is not None:
                addr = _cstr(payload)
                env[addr_var] = addr
        elif letter == ord("S"):
            name, eq, value = _cstr(payload).partition(b"=")
            if name and eq:
                env[name] = value
        elif letter == ord("U"):
            env.pop(_cstr(payload), None)
        elif letter == ord("L"):
            deferred = self.deferred.get(payload[:1])
            if deferred is not None:
                if len(deferred.text) + len(payload) < MAX_TEXT:
                    if not deferred.text:
                        deferred.entry = self.entry
                    deferred.text += replies.plugin_line(payload[1:])
                else:
                    self._dropped.add("L" + chr(payload[0]))
        elif letter == ord("A"):
            self.running = False
        if letter in b"ANOEDR":
            return letter, addr
        return None, addr


def _cstr(payload):
    """What a C string of these bytes holds: everything before the first NUL."""
    nul = payload.find(b"\0")
    return payload if nul < 0 else payload[:nul]

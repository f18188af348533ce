"""qmail-spp: the SMTP plugin interface, as a part of the sans-I/O core.

Theory of operation.  control/smtpplugins lists programs per section
([connection] [helo] [mail] [rcpt] [data] [auth]).  At each hook the session
runs the section's programs in order; each prints one-letter commands on
its stdout, which are acted on line by line as they arrive, until a
terminating command (A N O E R D) or EOF; then its exit status is checked.
The hook's result is REJECT, NORMAL or SKIP_CHECKS (the O command), or the
session ends (R, D).  Running a program is a request to the driver (start,
read lines, finish), so this module never touches a process itself.

Deviations from qmail-spp 0.42 (../shared/spec/DECISIONS.md): an
unterminated last output line counts whole, a CR before the LF is dropped,
an empty H line is ignored; the stale badmailfrom flag is fixed in session.py.
"""

from .effects import PLUGIN_CRASHED, PluginFinish, PluginRead, PluginStart

REJECT, NORMAL, SKIP_CHECKS = 0, 1, 2
MAX_TEXT = 1 << 16  # most bytes of H headers, and of each LM/LR/LD buffer, kept

# The byte after '[' picks the section; anything else discards entries.
SECTIONS = (b"c", b"h", b"m", b"r", b"d", b"a")


def parse_config(lines):
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


class Disconnect(Exception):
    """A plugin said R or D: flush the replies and exit 0."""


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

    def __init__(self, sections):
        self.sections = sections or {}
        self.running = sections is not None   # False after A, or with NOSPP
        self.headers = bytearray()            # H lines, LF-terminated
        self.deferred = {b"M": _Deferred(), b"R": _Deferred(), b"D": _Deferred()}
        self.rcptcount = 0                    # recipients accepted so far
        self.rcptcountall = 0                 # recipients that reached the plugins
        self.entry = None                     # the plugin run last: who decided, for the log

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

    def hook(self, section, env, out, addr_var=None, addr=None):
        """Run the plugins of a section (generator).  Returns (result, addr):
        addr is the address as changed by C (only when addr_var names the
        variable holding it).  Raises Disconnect for R and D."""
        if not self.running:
            return NORMAL, addr
        if addr_var is not None:
            env[addr_var] = addr
        for entry in self.sections.get(section, ()):
            self.entry = entry
            failure = yield PluginStart(entry, env)
            if failure is not None:
                out += _failure(entry, failure)
                return REJECT, addr
            last = None
            while last is None:
                lines = yield PluginRead()
                if lines is None:
                    break
                for raw in lines:
                    last, addr = self._command(raw, env, out, addr_var, addr)
                    if last is not None:
                        break
            status = yield PluginFinish()
            if status == PLUGIN_CRASHED:
                out += _failure(entry, b"child crashed")
                return REJECT, addr
            if status == 120:
                out += _failure(entry, b"can't execute")
                return REJECT, addr
            if last is not None:
                if last in b"RD":
                    raise Disconnect()
                return {ord("E"): REJECT, ord("O"): SKIP_CHECKS}.get(last, NORMAL), addr
        return NORMAL, addr

    def _command(self, raw, env, out, addr_var, addr):
        """Act on one output line; returns (terminating letter or None, addr)."""
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return None, addr
        letter, payload = line[0], line[1:]
        if letter in b"PER":
            out += _cstr(payload) + b"\r\n"
        elif letter == ord("H"):
            if payload and len(self.headers) + len(payload) < MAX_TEXT:
                self.headers += payload + b"\n"
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
            if deferred is not None and len(deferred.text) + len(payload) < MAX_TEXT:
                if not deferred.text:
                    deferred.entry = self.entry
                deferred.text += payload[1:] + b"\r\n"
        elif letter == ord("A"):
            self.running = False
        if letter in b"ANOEDR":
            return letter, addr
        return None, addr


def _cstr(payload):
    """What a C string of these bytes holds: everything before the first NUL."""
    nul = payload.find(b"\0")
    return payload if nul < 0 else payload[:nul]


def _failure(entry, reason):
    return b"451 qmail-spp failure: " + entry + b": " + reason + b" (#4.3.0)\r\n"

"""Write qmail-spp plugins in Python.

A qmail-spp plugin is a program that qmail-smtpd-py (or qmail-smtpd with
the qmail-spp patch) runs at one SMTP event: it reads the session from its
environment and answers with one-letter commands on stdout, one per line
(../shared/spec/spp.md §4).  This module does the reading and the framing:

    #!/opt/qmail-smtpd-py/bin/python
    from qmail_smtpd_py import plugin

    def main(session):
        if session.helo.endswith(".invalid"):
            plugin.reject("550 go away (#5.7.1)")   # prints E550 ..., exits

    plugin.run(main)

The interpreter must be one that has this package installed (the venv's
bin/python; a script listed in setup.cfg `scripts` gets it written into its
first line by pip).  `qmail-smtpd-py plugin-test PLUGIN` tries a plugin out.

Strings are str; the environment's bytes are decoded with surrogateescape,
so an address with odd bytes goes back out (e.g. through change_address)
exactly as it came in.  Every command is checked before it is written: a
CR, LF or NUL inside one, or a reply that is not an SMTP reply line, raises
ValueError instead of sending the client something broken.

The commands that end the plugin's say for this event (accept, next_plugin,
skip_checks, reject, disconnect, drop) exit the process (sys.exit(0)) after
writing: the server stops reading at them anyway.  The others (say, defer,
header, change_address, set_env, unset_env) can be given any number of
times first.  A plugin that writes nothing and exits leaves the command to
the next plugin and to the server's own checks; the server ignores exit
codes, so a plugin that crashes with a traceback lets the command through.

Only os and sys are imported: an exec'd plugin run is a new interpreter,
and what a plugin imports at its top is what a preloaded run saves
(preload.py: the pool, and a per-connection server, run a script for
their own interpreter as a fork instead of an exec).  A script whose top
level says

    RUN_IN_PROCESS = True

is run without even the fork, inside the server's process: its globals are
new at each call, the modules it imports stay loaded, and it must change
nothing of the process for good (no os._exit, threads, signal handlers,
atexit, patched modules).  Every sample plugin says so.  What should
outlive a call (a database connection) is kept with kept().
"""

import os
import sys

_server_pid = None  # (our pid, the server's), found at the first use


def _log_name():
    """The plugin's name for its log lines (read at each use: a preloaded plugin
    runs in a process that imported this module for another program)."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "plugin"


class Session:
    """The SMTP session as the environment shows it to a plugin.

    Values are str, "" when unset; the counts are ints (0 when unset or
    not a number).  `get` reads any other variable (e.g. one an earlier
    plugin set with set_env, or one tcprules set for this client)."""

    def get(self, name, default=""):
        value = os.environb.get(os.fsencode(name))
        return default if value is None else os.fsdecode(value)

    def has(self, name):
        """True if the variable is set, even to "" (RELAYCLIENT= is)."""
        return os.fsencode(name) in os.environb

    def _int(self, name):
        try:
            return int(self.get(name, "0"))
        except ValueError:
            return 0

    remote_ip = property(lambda self: self.get("TCPREMOTEIP"))
    remote_host = property(lambda self: self.get("TCPREMOTEHOST"))
    remote_info = property(lambda self: self.get("TCPREMOTEINFO"))
    local_ip = property(lambda self: self.get("TCPLOCALIP"))
    local_host = property(lambda self: self.get("TCPLOCALHOST"))
    helo = property(lambda self: self.get("SMTPHELOHOST"),
                    doc="The HELO/EHLO argument as typed ([helo] and later).")
    mail_from = property(lambda self: self.get("SMTPMAILFROM"),
                         doc="The sender without <>, \"\" for the null sender ([mail] on).")
    rcpt_to = property(lambda self: self.get("SMTPRCPTTO"),
                       doc="The current recipient ([rcpt]).")
    rcpt_count = property(lambda self: self._int("SMTPRCPTCOUNT"),
                          doc="Recipients accepted so far, not counting the current one.")
    rcpt_count_all = property(lambda self: self._int("SMTPRCPTCOUNTALL"),
                              doc="RCPTs that reached the plugins, the current one included.")
    rcpthosts_ok = property(lambda self: self.get("SMTPRCPTHOSTSOK") == "1",
                            doc="True if rcpthosts (or RELAYCLIENT) accepts the recipient.")
    auth_user = property(lambda self: self.get("SMTPAUTHUSER"),
                         doc="The user of a successful AUTH ([auth] and later), else \"\".")
    auth_method = property(lambda self: self.get("SMTPAUTHMETHOD"),
                           doc="login, plain or cram-md5 after a successful AUTH.")

    @property
    def remote_address(self):
        """The client's address (TCPREMOTEIP) as an ipaddress object, for
        network checks: an IPv4-mapped IPv6 address becomes IPv4, a %zone
        is dropped.  None when it is no IP address."""
        import ipaddress  # only the plugins that compare networks pay for it
        try:
            addr = ipaddress.ip_address(self.remote_ip.split("%", 1)[0].strip())
        except ValueError:
            return None
        if addr.version == 6 and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return addr

    @property
    def relay_client(self):
        """True if the client may relay (RELAYCLIENT set, by tcprules or AUTH)."""
        return self.has("RELAYCLIENT")

    @property
    def authenticated(self):
        """True after a successful SMTP AUTH (SMTPAUTHUSER is not empty)."""
        return bool(self.get("SMTPAUTHUSER"))

    @property
    def server_pid(self):
        """The qmail-smtpd-py process, to group one connection's log lines
        (the number tcpserver logs as `pid N from IP`)."""
        return server_pid()


def server_pid():
    """The pid of the SMTP server that runs this plugin.

    That is the parent, except for a `:` entry of control/smtpplugins: it
    runs through `/bin/sh -c`, which (dash) stays in between as the parent,
    so there it is the grandparent (read from /proc; the parent where /proc
    is missing)."""
    global _server_pid
    if _server_pid is None or _server_pid[0] != os.getpid():  # not one of a parent's
        pid = os.getppid()
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
            if argv[:2] == [b"/bin/sh", b"-c"]:
                with open("/proc/%d/stat" % pid, "rb") as f:
                    stat = f.read()
                pid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "pid (comm) S"
        except (OSError, ValueError, IndexError):
            pass
        _server_pid = (os.getpid(), pid)
    return _server_pid[1]


_kept = {}  # key -> (the pid that made it, value)


def kept(key, make):
    """make(), once per process: for what is worth keeping from one call to
    the next of a plugin run in process (a database connection), where its
    globals do not last.  Exec'd, a plugin has one call, so this is just
    make().  A forked process makes its own (what a parent made is not
    shared with a child).  A value with a close method is closed when the
    server drops what was kept (forget_kept)."""
    entry = _kept.get(key)
    if entry is None or entry[0] != os.getpid():
        entry = _kept[key] = (os.getpid(), make())
    return entry[1]


def forget_kept():
    """Close (their close method) and drop the values kept by this process.
    The server calls it before it forks a plugin: a SQLite connection, for
    one, must not be open across a fork, even one the child never uses."""
    entries = list(_kept.values())
    _kept.clear()
    for pid, value in entries:
        if pid == os.getpid() and hasattr(value, "close"):
            try:
                value.close()
            except Exception:  # noqa: BLE001 - it is being dropped anyway
                pass


def control_lines(name):
    """The entries of control/NAME (read from the working directory, which
    is the qmail home for a plugin): one per line, surrounding whitespace
    removed, empty lines and lines starting with '#' skipped.  [] if the
    file does not exist; other errors (OSError) are the caller's."""
    try:
        with open(os.path.join("control", name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = (os.fsdecode(line.strip()) for line in data.split(b"\n"))
    return [line for line in lines if line and not line.startswith("#")]


def run(main):
    """Call main(Session()) and exit 0.  An exception other than SystemExit
    becomes one log line (not a traceback spread over the log) and the
    plugin ends without a command, so the SMTP command goes on as if the
    plugin were not there, as with any failing plugin."""
    try:
        main(Session())
    except Exception as e:  # noqa: BLE001 - one log line instead of a traceback
        log("error: %s: %s" % (type(e).__name__, e))
    sys.exit(0)


# ------------------------------------------------------------ commands

def _bytes(text):
    return os.fsencode(text) if isinstance(text, str) else bytes(text)


def _write(letter, text=b""):
    data = _bytes(text)
    if b"\n" in data or b"\r" in data or b"\0" in data:
        raise ValueError("a plugin command must be one line without CR, LF or NUL: %r"
                         % (text,))
    data = letter.encode() + data + b"\n"
    try:
        while data:  # unbuffered: the server acts on each line as it arrives
            data = data[os.write(1, data):]
    except BrokenPipeError:
        sys.exit(0)  # the server no longer listens: nothing left to say


def _reply_lines(reply):
    """The lines of an SMTP reply, checked: each starts with the same code
    (200-599), every line but the last continues it ("550-"), the last ends
    it ("550 text" or just "550").  Lines are separated by LF or CRLF; one
    final line end is allowed."""
    raw = _bytes(reply).replace(b"\r\n", b"\n")
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    lines = raw.split(b"\n")
    code = lines[0][:3]
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345"
                or line[:3] != code):
            raise ValueError("not an SMTP reply (a code 200-599 on every line): %r" % (reply,))
        if (last and line[3:4] not in (b"", b" ")) or (not last and line[3:4] != b"-"):
            raise ValueError("not an SMTP reply (\"NNN-\" on every line but the last, "
                             "\"NNN \" on the last): %r" % (reply,))
    return lines


def _reply_line(line):
    """One line of a reply that may go on ("250-...") or end ("250 ...")."""
    raw = _bytes(line)
    if len(raw) < 4 or not raw[:3].isdigit() or raw[:1] not in b"2345" \
            or raw[3:4] not in (b" ", b"-"):
        raise ValueError("not an SMTP reply line (\"NNN text\" or \"NNN-text\"): %r" % (line,))
    return raw


def _final(letter, reply=None):
    if reply is None:
        _write(letter)
    else:
        *continued, last = _reply_lines(reply)
        for line in continued:
            _write("P", line)
        _write(letter, last)
    sys.exit(0)


def accept():
    """A: accept, and switch qmail-spp off for the rest of the connection."""
    _final("A")


def next_plugin():
    """N: accept as far as plugins go; the remaining plugins of this event are skipped."""
    _final("N")


def skip_checks():
    """O: like next_plugin, and in [mail]/[rcpt] skip the server's own
    badmailfrom/rcpthosts check too."""
    _final("O")


def reject(reply):
    """E: refuse the current command with this reply, e.g. "550 no (#5.7.1)".
    Several lines ("550-first\\n550 last") give a multi-line reply.  At
    [connection] and [helo] a client may carry on regardless: use disconnect
    (or defer) to really refuse there."""
    _final("E", reply)


def disconnect(reply):
    """R: send this reply and close the connection."""
    _final("R", reply)


def drop():
    """D: close the connection without a reply."""
    _final("D")


def say(reply):
    """P: send a reply line at once (e.g. a "250-" continuation)."""
    _write("P", _reply_line(reply))


def defer(command, reply):
    """L: refuse every later MAIL, RCPT or DATA (command "M", "R" or "D")
    of this transaction with reply (one or more lines); RSET clears it."""
    if command not in ("M", "R", "D"):
        raise ValueError("defer() takes 'M', 'R' or 'D', not %r" % (command,))
    for line in _reply_lines(reply):
        _write("L" + command, line)


def header(line):
    """H: add a header line to the message, e.g. "X-Greylist: delayed 300 s",
    or a continuation of the previous one (starting with a space or TAB)."""
    raw = _bytes(line)
    name, colon, _ = raw.partition(b":")
    continuation = raw[:1] in (b" ", b"\t")
    if not continuation and not (colon and name and all(33 <= c <= 126 for c in name)):
        raise ValueError("not a header line (\"Name: value\", or a continuation starting "
                         "with a space or TAB): %r" % (line,))
    _write("H", raw)


def change_address(address):
    """C: replace the current sender ([mail]) or recipient ([rcpt]); no <>,
    "" for the null sender."""
    _write("C", address)


def _check_name(name):
    raw = _bytes(name)
    if not raw or b"=" in raw:
        raise ValueError("bad variable name: %r" % (name,))
    return raw


def set_env(name, value):
    """S: set a variable in the server's environment (later plugins,
    qmail-queue and other programs see it)."""
    _write("S", _check_name(name) + b"=" + _bytes(value))


def unset_env(name):
    """U: remove a variable from the server's environment."""
    _write("U", _check_name(name))


# ------------------------------------------------------------ logging

def log_line(text):
    """Write text as exactly one line on stderr, the server's log; control
    characters (a CR or LF smuggled in through an address) are escaped."""
    if isinstance(text, str):
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "backslashreplace")
    else:
        data = bytes(text)
    out = bytearray()
    for c in data:
        if c < 32 and c != 9 or c == 127:
            out += b"\\x%02x" % c
        else:
            out.append(c)
    out += b"\n"
    try:
        os.write(2, out)
    except OSError:
        pass


def log(text):
    """One line on stderr, the server's log: "<plugin>: pid <server pid>: text"."""
    log_line("%s: pid %d: %s" % (_log_name(), server_pid(), text))

"""`qmail-smtpd-py plugin-test [OPTIONS] PLUGIN [ARG...]`: try one plugin.

Theory of operation.  The plugin is listed, alone, under the chosen
section(s) of a temporary qmail-spp configuration (SPPCONFFILE), and the
real server, the qmail-smtpd-py next to this program, runs as a child over
pipes: it is the same code path as under tcpserver.  A scripted client
sends one command, reads up to the final line of the reply ("NNN ..."),
then sends the next; after a 354 it sends the message lines without
waiting, up to the "." line.  Everything is printed as it happens:

    C: a line the client sent        S: a line the server answered
    L: a log line (server's stderr, where plugins write)
    Q: what the queue got: the envelope and the message's header lines
    #  notes from plugin-test itself

The queue is a temporary accept-and-discard script (QMAILQUEUE): it reads
the message and the envelope to EOF, keeps them only until they are
printed, and exits 0, so nothing is ever delivered, even with --qmail-home
pointing at a live qmail home.  The server gets a clean environment: PATH,
what tcpserver would set for a client on 127.0.0.1 (PROTO TCPREMOTEIP
TCPREMOTEPORT TCPLOCALIP TCPLOCALPORT TCPLOCALHOST), QMAILHOME, QMAILQUEUE,
SPPCONFFILE, SMTPAUTH with --auth-user, then --env (which may override
any of them).

With --preloaded the session runs as a pool worker runs it (serve): the
plugin, when it qualifies (preload.py, checked for --user), is prepared in
this process and each call is a fork of the server process instead of an
exec (or runs in the server process itself, when the script says
RUN_IN_PROCESS = True); the notes say whether it was preloaded, and why not.  --both runs
the session exec'd, then preloaded, and ends with the reply times of both
(from the end of a command line to the end of its reply, so a plugin's
call is inside the time of the command it runs at).

Exit status: 0 when the session ran (whatever the replies were), 1 when it
could not run or a reply did not come within --timeout seconds, 2 for a
usage error (one line on stderr).

Options come before PLUGIN; everything after PLUGIN is the plugin's
arguments, options included.
"""

import base64
import os
import pwd
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import click

SECTIONS = ("connection", "helo", "mail", "rcpt", "data", "auth")
DEFAULTS = {"section": "rcpt", "helo": "client.example", "from": "sender@example.org",
            "to": "postmaster@localhost", "timeout": 30.0, "auth_method": "plain"}
AUTH_PASSWORD = b"plugin-test"  # any password is accepted for --auth-user


class UsageError(click.UsageError):
    """A mistake on the command line: exit 2."""


class Options:
    def __init__(self):
        self.sections = []
        self.helo = DEFAULTS["helo"]
        self.mail_from = DEFAULTS["from"]
        self.rcpts = []
        self.auth_user = None
        self.auth_method = DEFAULTS["auth_method"]
        self.env = {}
        self.script = None
        self.qmail_home = None
        self.timeout = DEFAULTS["timeout"]
        self.plugin = None
        self.args = []
        self.modes = ["exec"]
        self.user = None  # (uid, gid) the preloaded mode checks the plugin for


def _set_option(opts, name, value):
    if name == "--section":
        if value not in SECTIONS:
            raise UsageError("--section %s: use one of %s" % (value, " ".join(SECTIONS)))
        if value not in opts.sections:
            opts.sections.append(value)
    elif name == "--helo":
        opts.helo = _one_line(name, value)
    elif name == "--from":
        opts.mail_from = _one_line(name, value)
    elif name == "--to":
        opts.rcpts.append(_one_line(name, value))
    elif name == "--auth-user":
        if not value or "\0" in value:
            raise UsageError("--auth-user: give a user name")
        opts.auth_user = _one_line(name, value)
    elif name == "--auth-method":
        if value.lower() not in ("plain", "login"):
            raise UsageError("--auth-method %s: use plain or login" % value)
        opts.auth_method = value.lower()
    elif name == "--env":
        var, eq, val = value.partition("=")
        if not eq or not var:
            raise UsageError("--env %s: write NAME=VALUE (NAME= for an empty value)" % value)
        opts.env[var] = val
    elif name == "--script":
        opts.script = value
    elif name == "--qmail-home":
        if not os.path.isdir(value):
            raise UsageError("--qmail-home %s: not a directory" % value)
        opts.qmail_home = os.path.abspath(value)
    elif name == "--user":
        try:
            entry = pwd.getpwnam(value)
        except KeyError:
            raise UsageError("--user %s: no such user" % value) from None
        opts.user = (entry.pw_uid, entry.pw_gid)
    elif name == "--timeout":
        try:
            opts.timeout = float(value)
        except ValueError:
            opts.timeout = -1.0
        if not 0 < opts.timeout < 86400:
            raise UsageError("--timeout %s: give a number of seconds" % value)


def _one_line(name, value):
    if "\n" in value or "\r" in value:
        raise UsageError("%s: one line, please" % name)
    return value


# ------------------------------------------------------------ setting up


def bin_dir_candidates():
    """Where qmail-smtpd-py (and the installed sample plugins) live: next to
    the program that runs this, else next to the interpreter."""
    dirs = []
    if sys.argv and sys.argv[0]:
        dirs.append(os.path.dirname(os.path.abspath(sys.argv[0])))
    dirs.append(os.path.dirname(sys.executable))
    return dirs


def find_server():
    for directory in bin_dir_candidates():
        path = os.path.join(directory, "qmail-smtpd-py")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_plugin(name):
    """The plugin's absolute path, or UsageError.  A name without '/' that is
    not a file here is looked up next to qmail-smtpd-py, then in PATH."""
    path = name
    if "/" not in name and not os.path.lexists(name):
        search = os.pathsep.join(bin_dir_candidates() + [os.environ.get("PATH", "")])
        found = shutil.which(name, path=search)
        if found is None:
            raise UsageError("%s: no such file, nor an installed plugin of that name" % name)
        path = found
    if not os.path.exists(path):
        raise UsageError("%s: no such file" % name)
    if not os.path.isfile(path):
        raise UsageError("%s: not a file" % name)
    if not os.access(path, os.X_OK):
        raise UsageError("%s: not executable (chmod +x it)" % name)
    return os.path.abspath(path)


def plugin_entry(path, args):
    """The control/smtpplugins line for the plugin: the path alone (run
    without a shell, as a plain entry), or a ':' entry quoted for /bin/sh when
    there are arguments (or the path would not survive as a plain entry)."""
    for word in [path, *args]:
        if "\n" in word:
            raise UsageError("%r: an smtpplugins entry is one line" % word)
    if not args and path == path.rstrip(" \t\r"):
        return path
    return ":" + shlex.join([path, *args])


def domain_of(address):
    return address.rpartition("@")[2].lower() if "@" in address else None


def script_recipients(lines):
    """The addresses of the RCPT TO:<...> lines of a client script."""
    found = []
    for line in lines:
        if line[:8].upper() == b"RCPT TO:" and b"<" in line:
            found.append(os.fsdecode(line.split(b"<", 1)[1].split(b">", 1)[0]))
    return found


def make_home(root, rcpts):
    """A temporary qmail home: control/me localhost, rcpthosts localhost
    and the domains of the recipients, an empty smtpplugins."""
    home = os.path.join(root, "home")
    os.makedirs(os.path.join(home, "control"))
    domains = ["localhost"]
    for address in rcpts:
        domain = domain_of(address)
        if domain and domain not in domains:
            domains.append(domain)
    for name, text in (("me", "localhost\n"), ("rcpthosts", "\n".join(domains) + "\n"),
                       ("smtpplugins", "")):
        with open(os.path.join(home, "control", name), "w") as f:
            f.write(text)
    return home


QUEUE_SCRIPT = """#!/bin/sh
# accept-and-discard qmail-queue of qmail-smtpd-py plugin-test: keeps the
# message (fd 0) and the envelope (fd 1) until plugin-test has shown them
cat > %(dir)s/$$.msg || cat > /dev/null
cat 0<&1 > %(dir)s/$$.env || cat 0<&1 > /dev/null
exit 0
"""

CHECKPASSWORD_SCRIPT = """#!/bin/sh
# checkpassword of qmail-smtpd-py plugin-test: accepts %(user)s, any password
user=`tr '\\000' '\\n' <&3 | sed -n 1p`
test "$user" = %(user)s || exit 1
exec "$@"
"""


def write_script(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def client_script(opts):
    """The client's lines (bytes, no line ends)."""
    if opts.script is not None:
        try:
            if opts.script == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(opts.script, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise UsageError("--script %s: %s" % (opts.script, e.strerror)) from None
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]
    enc = os.fsencode
    lines = [b"EHLO " + enc(opts.helo)]
    if opts.auth_user is not None:
        user = enc(opts.auth_user)
        if opts.auth_method == "login":
            lines += [b"AUTH LOGIN", base64.b64encode(user), base64.b64encode(AUTH_PASSWORD)]
        else:
            lines.append(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + AUTH_PASSWORD))
    lines.append(b"MAIL FROM:<" + enc(opts.mail_from) + b">")
    lines += [b"RCPT TO:<" + enc(rcpt) + b">" for rcpt in opts.rcpts]
    lines.append(b"DATA")
    if opts.mail_from:
        lines.append(b"From: <" + enc(opts.mail_from) + b">")
    lines += [b"To: " + b", ".join(b"<" + enc(r) + b">" for r in opts.rcpts),
              b"Subject: qmail-smtpd-py plugin-test", b"",
              b"A test message from qmail-smtpd-py plugin-test.", b".", b"QUIT"]
    return lines


# ------------------------------------------------------------ the transcript


def show(prefix, line):
    """One transcript line on stdout, control characters escaped."""
    out = bytearray(prefix.encode())
    for c in line:
        if c < 32 and c != 9 or c == 127:
            out += b"\\x%02x" % c
        else:
            out.append(c)
    sys.stdout.buffer.write(bytes(out) + b"\n")
    sys.stdout.buffer.flush()


def note(text):
    show("# ", text.encode("utf-8", "backslashreplace"))


class Timeout(Exception):
    pass


class Child:
    """The server over pipes: send() lines, reply() reads one reply; its
    stderr is shown as L: lines whenever it arrives."""

    def __init__(self, proc, timeout):
        self.timeout = timeout
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        self.out_fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        self.in_fd = self.proc.stdin.fileno()
        os.set_blocking(self.in_fd, False)
        self.sel.register(self.out_fd, selectors.EVENT_READ)
        self.sel.register(self.err_fd, selectors.EVENT_READ)
        self.out = bytearray()
        self.err = bytearray()
        self.out_eof = self.err_eof = False
        self.stdin_open = True

    def _pump(self, deadline, pending=None):
        """One round of waiting (until deadline) and reading; writes pending
        (a bytearray, consumed) to stdin when it can.  Raises Timeout."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        if pending and self.stdin_open:
            self.sel.register(self.in_fd, selectors.EVENT_WRITE)
        try:
            events = self.sel.select(left)
        finally:
            if pending and self.stdin_open:
                self.sel.unregister(self.in_fd)
        ready = {key.fd for key, _ in events}
        for fd in (self.err_fd, self.out_fd):  # the log first: it was written first
            if fd in ready:
                self._read(fd)
        if self.in_fd in ready:
            try:
                del pending[:os.write(self.in_fd, pending)]
            except BlockingIOError:
                pass
            except OSError:  # the server stopped reading
                del pending[:]
                self.close_stdin()

    def _read(self, fd):
        chunk = os.read(fd, 65536)
        if fd == self.err_fd:
            if chunk:
                self.err += chunk
            else:
                self.err_eof = True
                self.sel.unregister(fd)
            self._show_log()
        elif chunk:
            self.out += chunk
        else:
            self.out_eof = True
            self.sel.unregister(fd)

    def _show_log(self):
        while b"\n" in self.err:
            line, _, rest = bytes(self.err).partition(b"\n")
            self.err[:] = rest
            show("L: ", line)
        if self.err_eof and self.err:
            show("L: ", bytes(self.err))
            self.err.clear()

    def send(self, line):
        """Send one line (CRLF added); False if the server no longer reads.
        The next reply's time counts from the end of this line."""
        show("C: ", line)
        self.sent_at = time.monotonic()
        if not self.stdin_open:
            return False
        pending = bytearray(line + b"\r\n")
        deadline = time.monotonic() + self.timeout
        while pending and self.stdin_open:
            self._pump(deadline, pending)
        self.sent_at = time.monotonic()
        return self.stdin_open

    def reply(self):
        """The lines of one reply (shown as they come), up to the final one
        (the fourth byte is not '-', as smtplib reads); fewer when the server
        closed its output first.  Raises Timeout."""
        deadline = time.monotonic() + self.timeout
        lines = []
        while True:
            while b"\n" in self.out:
                line, _, rest = bytes(self.out).partition(b"\n")
                self.out[:] = rest
                line = line[:-1] if line.endswith(b"\r") else line
                show("S: ", line)
                lines.append(line)
                if line[3:4] != b"-":
                    return lines
            if self.out_eof:
                if self.out:
                    show("S: ", bytes(self.out))
                    lines.append(bytes(self.out))
                    self.out.clear()
                return lines
            self._pump(deadline)

    def close_stdin(self):
        if self.stdin_open:
            self.stdin_open = False
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def finish(self):
        """Close stdin, show what is left, wait for the exit; the exit status."""
        self.close_stdin()
        deadline = time.monotonic() + self.timeout
        while not self.out_eof:
            self.reply()
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise Timeout()
            time.sleep(0.01)
        # A plugin's leftover child may hold stderr open: don't wait for it long.
        grace = min(deadline, time.monotonic() + 1.0)
        try:
            while not self.err_eof:
                self._pump(grace)
        except Timeout:
            pass
        return self.proc.returncode

    def kill(self):
        """Kill the server and whatever it started (its process group)."""
        try:
            os.killpg(self.proc.pid, 9)
        except OSError:
            pass
        self.proc.wait()
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        if self.err:
            show("L: ", bytes(self.err))


def preload_plugin(opts, entry, env):
    """Prepare the plugin as serve would (for --user), saying so in a note."""
    from . import preload
    preload.install({}, {})
    if entry.startswith(":"):
        note("not preloaded: a ':' entry (arguments) always runs through /bin/sh")
        return
    uid, gid = opts.user or (os.geteuid(), os.getegid())
    if uid == 0:
        note("checked for root, who can change every file: give --user, the user of "
             "serve -u")
    scripts = preload.prepare([entry], uid, gid, lambda text: note(text.replace(
        "serve: ", "", 1)))
    preload.install(scripts, {os.fsencode(k): os.fsencode(v) for k, v in env.items()})


class ForkedServer:
    """The server as a worker of serve runs it: a fork of this process
    serving the connection on pipes, so that the plugins preloaded here are
    forked from it.  The parts of subprocess.Popen that Child uses."""

    def __init__(self, args, env, cwd):
        from . import driver
        fds = [os.pipe() for _ in range(3)]
        environ = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        self.pid = os.fork()
        if self.pid == 0:
            code = 111
            try:
                os.setsid()
                for target, fd in enumerate((fds[0][0], fds[1][1], fds[2][1])):
                    os.dup2(fd, target)
                for pair in fds:
                    for fd in pair:
                        os.close(fd)
                code = driver.run_connection([os.fsencode(a) for a in args],
                                             os.fsencode(cwd), environ)
            finally:
                os._exit(code)
        self.stdin = os.fdopen(fds[0][1], "wb", buffering=0)
        self.stdout = os.fdopen(fds[1][0], "rb", buffering=0)
        self.stderr = os.fdopen(fds[2][0], "rb", buffering=0)
        for fd in (fds[0][0], fds[1][1], fds[2][1]):
            os.close(fd)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def show_queued(queue_dir, shown):
    """Q: lines for the messages the queue got since the last call."""
    names = sorted((n for n in os.listdir(queue_dir) if n.endswith(".env")),
                   key=lambda n: os.stat(os.path.join(queue_dir, n)).st_mtime_ns)
    for name in names:
        if name in shown:
            continue
        shown.add(name)
        with open(os.path.join(queue_dir, name), "rb") as f:
            envelope = f.read()
        with open(os.path.join(queue_dir, name[:-4] + ".msg"), "rb") as f:
            message = f.read()
        fields = envelope.split(b"\0")
        sender = fields[0][1:] if fields and fields[0][:1] == b"F" else b"?"
        rcpts = [f[1:] for f in fields[1:] if f[:1] == b"T"]
        show("Q: ", b"from <" + sender + b"> to " + b" ".join(b"<" + r + b">" for r in rcpts))
        for line in message.split(b"\n\n", 1)[0].split(b"\n"):
            show("Q: ", line)


def run_session(child, lines, queue_dir, times):
    """Drive the session: the greeting, then each line.  Returns when the
    script is done or the server closed the connection; times gets
    (command, milliseconds to its reply) for each reply."""
    shown = set()
    child.sent_at = time.monotonic()
    if not child.reply():
        note("the server closed the connection")
        return
    times.append((b"(greeting)", (time.monotonic() - child.sent_at) * 1000))
    in_data = False
    skipping = False
    for line in lines:
        if skipping:  # the message of a DATA that was refused
            if line == b".":
                skipping = False
            continue
        if not child.send(line):
            note("the server closed the connection")
            return
        if in_data and line != b".":
            continue
        reply = child.reply()
        if not reply:
            note("the server closed the connection")
            return
        times.append((b"(message)" if in_data else line.split(b" ", 1)[0].upper()
                      if line[:5].upper() == b"AUTH " else line,
                      (time.monotonic() - child.sent_at) * 1000))
        if in_data:
            show_queued(queue_dir, shown)
            in_data = False
        elif reply[-1][:3] == b"354":
            in_data = True
        elif line.upper() == b"DATA":
            skipping = True
            note("DATA refused: its message lines are not sent")


@click.command("plugin-test", context_settings={"allow_interspersed_args": False,
                                                "help_option_names": ["-h", "--help"]})
@click.option("--section", "sections", multiple=True, metavar="NAME",
              help="connection, helo, mail, rcpt (default), data or auth; repeat it to list "
                   "the plugin in several sections")
@click.option("--helo", metavar="NAME", help="EHLO argument (default client.example)")
@click.option("--from", "mail_from", metavar="ADDR",
              help='sender (default sender@example.org; "" for <>)')
@click.option("--to", "rcpts", multiple=True, metavar="ADDR",
              help="recipient, repeatable (default postmaster@localhost)")
@click.option("--auth-user", metavar="USER",
              help="log in with AUTH before MAIL (SMTPAUTH is set and a checkpassword "
                   "accepting USER with any password is used); needed for --section auth")
@click.option("--auth-method", metavar="M", help="plain (default) or login")
@click.option("--env", "envs", multiple=True, metavar="NAME=VALUE",
              help="set a variable for the server and its plugins, repeatable (e.g. "
                   "TCPREMOTEIP=192.0.2.1, RELAYCLIENT=)")
@click.option("--script", metavar="FILE",
              help="client lines to send instead of the default EHLO [AUTH] MAIL RCPT... "
                   "DATA message QUIT ('-': stdin)")
@click.option("--qmail-home", metavar="DIR",
              help="use this qmail home's control files (default: a temporary home: "
                   "control/me localhost, rcpthosts localhost and the domains of the "
                   "recipients, from --to and the script's RCPT TO lines)")
@click.option("--timeout", metavar="SECONDS", help="most time to wait for each reply "
                                                   "(default 30)")
@click.option("--preloaded", is_flag=True,
              help="run the session as serve's workers do: the plugin preloaded when it "
                   "qualifies (the notes say), each call a fork, or in the server's "
                   "process when the script says RUN_IN_PROCESS")
@click.option("--both", is_flag=True,
              help="run the session exec'd, then preloaded, and compare the reply times")
@click.option("--user", metavar="USER",
              help="with --preloaded/--both: check the plugin as serve -u USER would "
                   "(default: the user running this)")
@click.argument("plugin", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(plugin, args, **given):
    """Run PLUGIN (a path, or the name of an installed plugin such as tarpit)
    as the only qmail-spp plugin of a section, against a scripted SMTP
    session with the installed qmail-smtpd-py, and print the transcript:
    C: client lines, S: server lines, L: log lines (the plugin's stderr),
    Q: what the (discarding) queue got, # notes.  With ARGs the plugin is
    listed as a ':' entry (run by /bin/sh -c, arguments quoted).  Options go
    before PLUGIN.

    Exit status: 0 the session ran, 1 it could not run or timed out, 2 usage
    error.
    """
    opts = Options()
    both, preloaded = given.pop("both"), given.pop("preloaded")
    if both or preloaded:
        opts.modes = ["exec", "preloaded"] if both else ["preloaded"]
    for name, values in given.items():
        option = "--" + {"sections": "section", "mail_from": "from", "rcpts": "to",
                         "envs": "env"}.get(name, name).replace("_", "-")
        for value in values if isinstance(values, tuple) else [values]:
            if value is not None:
                _set_option(opts, option, value)
    if plugin is None:
        raise UsageError("no PLUGIN given (see --help)")
    opts.plugin, opts.args = plugin, list(args)
    opts.sections = opts.sections or [DEFAULTS["section"]]
    opts.rcpts = opts.rcpts or [DEFAULTS["to"]]
    if "auth" in opts.sections and opts.auth_user is None:
        raise UsageError("[auth] plugins run only after a successful AUTH: give --auth-user USER")
    entry = plugin_entry(find_plugin(opts.plugin), opts.args)
    lines = client_script(opts)
    server = find_server()
    if server is None:
        sys.stderr.write("qmail-smtpd-py plugin-test: qmail-smtpd-py not found in %s\n"
                         % " or ".join(bin_dir_candidates()))
        raise SystemExit(1)
    root = tempfile.mkdtemp(prefix="qmail-smtpd-py-plugin-test-")
    try:
        results = []
        for mode in opts.modes:
            if len(opts.modes) > 1:
                note("--- %s" % MODE_NAMES[mode])
            times = []
            code = _run(opts, server, entry, lines, os.path.join(root, mode), mode, times)
            results.append((mode, times))
            if code:
                break
        else:
            if opts.modes != ["exec"]:
                show_times(results)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # e.g. `plugin-test ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # no second error at exit's flush
        code = 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(code)


MODE_NAMES = {"exec": "exec'd", "preloaded": "preloaded"}


def show_times(results):
    """The reply times of each run, side by side."""
    note("reply times (ms): " + " / ".join(MODE_NAMES[mode] for mode, _ in results))
    rows = max(len(times) for _, times in results)
    for i in range(rows):
        cells = [times[i] for _, times in results if i < len(times)]
        label = cells[0][0].decode("utf-8", "backslashreplace")
        note("  %-40s %s" % (label[:40], "  ".join("%8.1f" % ms for _, ms in cells)))


def _run(opts, server, entry, lines, root, mode, times):
    os.mkdir(root)
    home = opts.qmail_home or make_home(root, opts.rcpts + script_recipients(lines))
    queue_dir = os.path.join(root, "queue")
    os.mkdir(queue_dir)
    queue = os.path.join(root, "qmail-queue")
    write_script(queue, QUEUE_SCRIPT % {"dir": shlex.quote(queue_dir)})
    conf = os.path.join(root, "smtpplugins")
    with open(conf, "wb") as f:
        f.writelines(b"[%s]\n%s\n" % (s.encode(), os.fsencode(entry)) for s in opts.sections)
    env = {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
           "PROTO": "TCP", "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": "50025",
           "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": "25", "TCPLOCALHOST": "localhost",
           "QMAILHOME": home, "QMAILQUEUE": queue, "SPPCONFFILE": conf}
    cmd = [server]
    if opts.auth_user is not None:
        checkpassword = os.path.join(root, "checkpassword")
        write_script(checkpassword, CHECKPASSWORD_SCRIPT % {"user": shlex.quote(opts.auth_user)})
        cmd += [checkpassword, shutil.which("true") or "/bin/true"]
        env["SMTPAUTH"] = ""
    env.update(opts.env)
    for section in opts.sections:
        note("[%s] %s" % (section, entry))
    try:
        if mode == "preloaded":
            preload_plugin(opts, entry, env)
            proc = ForkedServer(cmd[1:], env, home)
        else:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, cwd=home,
                                    start_new_session=True)
    except OSError as e:
        sys.stderr.write("qmail-smtpd-py plugin-test: cannot run %s: %s\n" % (server, e.strerror))
        return 1
    child = Child(proc, opts.timeout)
    try:
        run_session(child, lines, queue_dir, times)
        status = child.finish()
    except Timeout:
        note("no reply within %g s: stopped (a slower plugin needs --timeout)" % opts.timeout)
        return 1
    finally:
        child.kill()
    note("server exit status %d" % status)
    return 0

"""Shared test helpers: a throw-away qmail home, a recording fake qmail-queue,
run_smtp(), which runs the *installed* qmail-smtpd-py over pipes, EnvQueue (a
QMAILQUEUE wrapper recording its environment) and TcpServers (the server on loopback,
under the real tcpserver or in its resident mode, `qmail-smtpd-py serve`).

Theory of operation: every black-box test builds a qmail home (control/ files from a
dict, plus the empty control/smtpplugins that qmail-spp insists on), points QMAILQUEUE
at a fake qmail-queue that records what it was given, feeds the server a byte
transcript on stdin and compares the bytes it wrote on stdout.

The fake queue behaves like the real one where it matters: it reads the message (fd 0)
to EOF, then the envelope (fd 1), and an incomplete envelope (no F, no NUL after the
sender, no final NUL) makes it exit 54 without counting the message as queued. Otherwise
it exits with the status it was built with, after optionally writing notqmail's custom
error text to fd 6, or kills itself with a signal.
"""

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

BIN_DIR = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The installed console script, from the same venv that runs the tests (make test
# installs the package non-editable into .venv). QMAIL_SMTPD_PY_SERVER overrides it.
SERVER = os.environ.get("QMAIL_SMTPD_PY_SERVER") or os.path.join(BIN_DIR, "qmail-smtpd-py")
QUEUE_MAILDIR = os.path.join(BIN_DIR, "qmail-queue-maildir")
if not os.path.exists(QUEUE_MAILDIR):
    QUEUE_MAILDIR = os.path.join(REPO, "bin", "qmail-queue-maildir")

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "TCPREMOTEIP": "127.0.0.1",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALHOST": "mx.test",
}
# `make coverage`: the servers the tests start are measured too
BASE_ENV.update({name: os.environ[name] for name in ("COVERAGE_PROCESS_START", "COVERAGE_FILE")
                 if name in os.environ})

DEFAULT_CONTROL = {
    "me": "mx.example.org\n",
    "rcpthosts": "example.com\n.sub.example.net\n",
    "smtpplugins": "",
}

RUN_TIMEOUT = 30.0

# ------------------------------------------------------------------ transcripts

# The replies of the default home (me=mx.example.org) most tests expect; ACC is an
# accepted message after norm().
GREETING = b"220 mx.example.org ESMTP\r\n"
HELO250 = b"250 mx.example.org\r\n"
OK = b"250 ok\r\n"
GO = b"354 go ahead\r\n"
ACC = b"250 ok <TIME> qp <PID>\r\n"
BYE = b"221 mx.example.org\r\n"
FLUSHED = b"250 flushed\r\n"


def crlf(*lines):
    """These lines, each with CR LF: a client transcript."""
    return b"".join(line + b"\r\n" for line in lines)


# ------------------------------------------------------------------ normalising

MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
RE_ACCEPT = re.compile(rb"250 ok (\d+) qp (\d+)")
RE_DATE = re.compile(rb"\b\d{1,2} (?:" + MONTHS.encode() + rb") \d{4} \d\d:\d\d:\d\d -0000")


def norm(data):
    """Replace `250 ok <digits> qp <digits>` and RFC 822 dates with fixed tokens."""
    data = RE_ACCEPT.sub(b"250 ok <TIME> qp <PID>", data)
    return RE_DATE.sub(b"<DATE>", data)


def accept_qp(out):
    """The qp numbers of every `250 ok <time> qp <pid>` reply in out, as ints."""
    return [int(m.group(2)) for m in RE_ACCEPT.finditer(out)]


# ------------------------------------------------------------------ fake qmail-queue

FAKE_QUEUE = r'''#!%(python)s -IS
# recording fake qmail-queue written by t/helpers.py
import os, signal, sys
QDIR = %(qdir)r
EXIT = %(exit)d
ERRTEXT = %(errtext)r
SIGNAL = %(signal)r

def readall(fd):
    parts = []
    while True:
        try:
            b = os.read(fd, 65536)
        except OSError:
            break
        if not b:
            break
        parts.append(b)
    return b"".join(parts)

def check(env):
    """None for a complete envelope, else the status a real qmail-queue exits with."""
    if not env:
        return 54
    if env[:1] != b"F":
        return 91
    pos = env.find(b"\0")
    if pos < 0:
        return 54
    pos += 1
    while True:
        if pos >= len(env):
            return 54
        c = env[pos:pos + 1]
        if c == b"\0":
            return None
        if c != b"T":
            return 91
        end = env.find(b"\0", pos)
        if end < 0:
            return 54
        pos = end + 1

msg = readall(0)
env = readall(1)
bad = check(env)
n = 1
while True:
    try:
        os.close(os.open(os.path.join(QDIR, "%%d.lock" %% n), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        break
    except FileExistsError:
        n += 1
suffix = "" if bad is None else ".bad"
for ext, data in (("msg", msg), ("env", env), ("pid", str(os.getpid()).encode()),
                  ("cwd", os.getcwd().encode())):
    tmp = os.path.join(QDIR, "%%d.%%s.tmp" %% (n, ext))
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(QDIR, "%%d.%%s%%s" %% (n, ext, suffix)))
if bad is not None:
    sys.exit(bad)
if ERRTEXT is not None:
    try:
        os.write(6, ERRTEXT)
    except OSError:
        pass
if SIGNAL is not None:
    os.kill(os.getpid(), SIGNAL)
sys.exit(EXIT)
'''


@dataclass(frozen=True)
class Queued:
    """One message the fake queue accepted (its envelope was complete)."""

    message: bytes
    envelope: bytes
    pid: int
    cwd: str

    @property
    def sender(self):
        return self.envelope[1:self.envelope.index(b"\0")]

    @property
    def recipients(self):
        entries = self.envelope[self.envelope.index(b"\0") + 1:].split(b"\0")
        return [e[1:] for e in entries if e.startswith(b"T")]

    @property
    def received(self):
        """The server's own Received: header (its two lines, LF-terminated)."""
        first = self.message.index(b"\n")
        second = self.message.index(b"\n", first + 1)
        return self.message[:second + 1]

    @property
    def body(self):
        """The message as the client sent it, after the server's Received: header."""
        return self.message[len(self.received):]


class FakeQueue:
    """A recording qmail-queue in its own directory."""

    def __init__(self, directory, exit=0, errtext=None, signal=None):
        self.dir = directory
        self.records = os.path.join(directory, "records")
        os.makedirs(self.records, exist_ok=True)
        self.path = os.path.join(directory, "fake-qmail-queue")
        with open(self.path, "w") as f:
            f.write(FAKE_QUEUE % {"python": sys.executable, "qdir": self.records,
                                  "exit": exit, "errtext": errtext,
                                  "signal": None if signal is None else int(signal)})
        os.chmod(self.path, 0o755)

    def _numbers(self):
        return sorted(int(n.split(".")[0]) for n in os.listdir(self.records)
                      if n.endswith(".lock"))

    def _read(self, n, ext):
        with open(os.path.join(self.records, "%d.%s" % (n, ext)), "rb") as f:
            return f.read()

    def queued(self, since=0):
        """Messages with a complete envelope, in the order the queue ran (runs after
        the first `since` ones)."""
        out = []
        for n in self._numbers()[since:]:
            if os.path.exists(os.path.join(self.records, "%d.env" % n)):
                out.append(Queued(self._read(n, "msg"), self._read(n, "env"),
                                  int(self._read(n, "pid")), self._read(n, "cwd").decode()))
        return out

    def runs(self):
        """How many times the queue has run."""
        return len(self._numbers())

    def incomplete(self, since=0):
        """How many times the queue ran and saw an incomplete envelope (exit 54/91)."""
        return sum(1 for n in self._numbers()[since:]
                   if os.path.exists(os.path.join(self.records, "%d.env.bad" % n)))


# ------------------------------------------------------------------ qmail home


def write_control(home, name, content):
    """Write control/NAME (str is latin-1 bytes); None removes the file."""
    path = os.path.join(home, "control", name)
    if content is None:
        if os.path.lexists(path):
            os.unlink(path)
        return
    if isinstance(content, str):
        content = content.encode("latin-1")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


class Home:
    """A temporary qmail home (root/home) with a recording fake queue (root/queue).

    control: file name -> content (str = latin-1 bytes, None = leave the file out),
    merged over DEFAULT_CONTROL unless defaults=False (an empty smtpplugins is then
    still written unless control says None).
    """

    def __init__(self, root, control=None, defaults=True, queue_exit=0,
                 queue_errtext=None, queue_signal=None):
        self.root = root
        self.path = os.path.join(root, "home")
        os.makedirs(os.path.join(self.path, "control"), exist_ok=True)
        files = dict(DEFAULT_CONTROL) if defaults else {"smtpplugins": ""}
        files.update(control or {})
        for name, content in files.items():
            write_control(self.path, name, content)
        self.queue = FakeQueue(os.path.join(root, "queue"), queue_exit,
                               queue_errtext, queue_signal)

    def control(self, name, content):
        write_control(self.path, name, content)

    def queued(self, since=0):
        return self.queue.queued(since)


def script(home, name, body, shell="/bin/sh"):
    """An executable script home/plugins/NAME (a plugin, a checkpassword, an
    SMTPEXTFORK program) running body under shell; returns its absolute path."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!%s\n%s" % (shell, body))
    os.chmod(path, 0o755)
    return path


def new_home(**kw):
    """A Home in a fresh temporary directory (the caller removes home.root)."""
    return Home(tempfile.mkdtemp(prefix="qsmtpd-test-"), **kw)


# ------------------------------------------------------------------ running the server


class Result(tuple):
    """(stdout bytes, exit status, queued messages); also .err (stderr) and .incomplete."""

    def __new__(cls, out, status, queued, err=b"", incomplete=0):
        self = super().__new__(cls, (out, status, queued))
        self.err = err
        self.incomplete = incomplete
        return self

    out = property(lambda self: self[0])
    status = property(lambda self: self[1])
    queued = property(lambda self: self[2])


def require_server():
    if not os.path.exists(SERVER):
        pytest.fail("%s is not installed: run `make test` (it installs the package into "
                    ".venv) or set QMAIL_SMTPD_PY_SERVER" % SERVER)


def server_env(home, env=None):
    """The base environment of the conformance suite plus env (None removes a name)."""
    e = dict(BASE_ENV)
    if home is not None:
        e["QMAILHOME"] = home.path
        e["QMAILQUEUE"] = home.queue.path
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def run_smtp(input_bytes, env=None, home=None, args=(), keep_open=False,
             timeout=RUN_TIMEOUT):
    """Run the installed qmail-smtpd-py with input_bytes on stdin.

    stdin is closed after the input unless keep_open (then it stays open until the
    server exits, for timeout tests). Returns Result(out, status, queued), queued
    being what this run queued. Waits for the server's children too (they share its
    stderr), so the queue has finished when this returns.
    """
    require_server()
    own = home is None
    if own:
        home = new_home()
    try:
        before = home.queue.runs()
        out, err, status = _run(
            [SERVER, *args], server_env(home, env), home.root, input_bytes, keep_open,
            timeout)
        return Result(out, status, home.queued(before), err, home.queue.incomplete(before))
    finally:
        if own:
            shutil.rmtree(home.root, ignore_errors=True)


def _run(cmd, env, cwd, data, keep_open, timeout):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    sel = selectors.DefaultSelector()
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    bufs = {out_fd: [], err_fd: []}
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = p.stdin.fileno()
    pending = memoryview(data)
    if pending:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    elif not keep_open:
        p.stdin.close()
    deadline = _now() + timeout
    try:
        while sel.get_map():
            left = deadline - _now()
            if left <= 0:
                raise AssertionError("server still running after %.0fs; stdout so far: %r"
                                     % (timeout, b"".join(bufs[out_fd])))
            for key, _ in sel.select(left):
                if key.fd == stdin_fd:
                    try:
                        n = os.write(stdin_fd, pending[:65536])
                        pending = pending[n:]
                    except OSError:  # the server stopped reading (exited): fine
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin_fd)
                        if not keep_open:
                            p.stdin.close()
                else:
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        bufs[key.fd].append(chunk)
                    else:
                        sel.unregister(key.fd)
        p.wait(max(0.1, deadline - _now()))
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        if p.returncode is None:
            p.wait()
        sel.close()
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                f.close()
            except OSError:
                pass
    return b"".join(bufs[out_fd]), b"".join(bufs[err_fd]), p.returncode


def _now():
    return time.monotonic()


# ------------------------------------------------------------------ tools and ports


def require_tools(*names):
    """Skip the calling test when a Debian tool it drives is not installed; under CI
    (CI set) fail instead, so a missing install step in .ci/run cannot pass silently."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        why = ("not installed: %s (apt-get install ucspi-tcp swaks tinycdb daemontools; "
               ".ci/run does)" % ", ".join(missing))
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def require_program(path, package):
    """Skip the calling test when the program at path (a Debian package's) is not
    installed; under CI (CI set) fail instead, as require_tools."""
    if os.access(path, os.X_OK):
        return
    why = "%s is not installed (apt-get install %s; .ci/run does)" % (path, package)
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def make_cdb(path, keys):
    """Build a djb cdb with the real `cdb -c` (tinycdb): each key with empty data."""
    require_tools("cdb")
    src = b"".join(b"+%d,0:%s->\n" % (len(k), k) for k in keys) + b"\n"
    subprocess.run(["cdb", "-c", path], input=src, check=True)


def transfer(body_lines):
    """CRLF-joined DATA body ending with the final dot line."""
    return b"".join(line + b"\r\n" for line in body_lines) + b".\r\n"


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# `qmail-smtpd-py check`'s line for SMTPAUTH without a checkpassword command line
CHECK_NO_CHECKPASSWORD = (
    "SMTPAUTH: set, but no checkpassword program is given on the command line, so AUTH is "
    "offered and every attempt refused with 503 (logged by=auth-off); give the "
    "checkpassword command line after qmail-smtpd-py (env/CHECKPASSWORD in the service "
    "kit) or unset SMTPAUTH")

def wait_greeting(port, proc, output, timeout=30):
    """Wait until a 220 greeting comes on the loopback port (then QUIT); fail the test
    with what proc wrote to output (a Path) if proc exits first or nothing answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("%s exited %s: %s" % (proc.args[0], proc.returncode,
                                              output.read_text(errors="replace")))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("nothing answered on port %d: %s" % (port, output.read_text(errors="replace")))

# ------------------------------------------------------------------ environment-recording queue

ENV_QUEUE = '#!/bin/sh\nenv -0 > "%(dir)s/$$"\ncp "%(dir)s/$$" "%(dir)s/last"\nexec "%(queue)s"\n'


class EnvQueue:
    """A QMAILQUEUE wrapper (.path) in front of home's fake queue that saves the
    environment it was run with, then execs the fake queue. Each run is saved under
    its pid (exec keeps the pid, so it matches Queued.pid) and as the last run."""

    def __init__(self, home):
        self.dir = os.path.join(home.root, "queue-env")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(home.root, "env-queue")
        with open(self.path, "w") as f:
            f.write(ENV_QUEUE % {"dir": self.dir, "queue": home.queue.path})
        os.chmod(self.path, 0o755)

    def environ(self, pid=None):
        """The environment of run `pid` (None: the last run) as a dict of bytes."""
        with open(os.path.join(self.dir, "last" if pid is None else str(pid)), "rb") as f:
            data = f.read()
        return dict(item.split(b"=", 1) for item in data.split(b"\0") if item)

    def text(self, pid=None):
        """environ(pid) decoded as latin-1 str."""
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.environ(pid).items()}


# ------------------------------------------------------------------ tcpserver and serve

# The two ways of running the server as a network daemon: each connection under the real
# tcpserver (a new interpreter per connection), or `qmail-smtpd-py serve` (the pool of
# pre-forked workers; "resident" is its old name). TcpServers.start runs either; the
# conftest.py fixture `servers` is parametrized over both.
LAUNCHERS = ("tcpserver", "pool")

RE_SESSION_PID = re.compile(rb"pid ([\d.]+) from ")
RE_END = re.compile(rb"end ([\d.]+) status (\d+)")


class TcpServer:
    """A started tcpserver or `qmail-smtpd-py serve`: its loopback port, its -v log
    (a pathlib.Path), its process (.proc, .pid) and launcher (.mode)."""

    def __init__(self, port, log, proc=None, mode="tcpserver"):
        self.port = port
        self.log = log
        self.proc = proc
        self.mode = mode

    @property
    def pid(self):
        return self.proc.pid

    def statuses(self, count, timeout=20):
        """The wait statuses tcpserver logged for the first `count` finished connections
        (waits up to timeout seconds for them; exit 1 is 256)."""
        return [status for _, status in self.ends(count, timeout)]

    def ends(self, count=0, timeout=20):
        """(connection id, wait status) of the finished connections, in the order
        logged; waits up to timeout seconds until there are at least `count`.  The id
        is tcpserver's child pid, or serve's WORKERPID.N (str either way)."""
        found = self.wait_log(RE_END, count, timeout)
        return [(pid.decode(), int(status)) for pid, status in found]

    def session_pids(self, count=0, timeout=20):
        """The connection ids (str), from the `pid ID from IP` lines, in the order
        logged; waits up to timeout seconds until there are at least `count`."""
        return [pid.decode() for pid in self.wait_log(RE_SESSION_PID, count, timeout)]

    def wait_log(self, regex, count=1, timeout=20):
        """regex.findall over the log once it has at least `count` matches (or the
        timeout passed: then whatever there is)."""
        if isinstance(regex, bytes):
            regex = re.compile(re.escape(regex))
        deadline = time.monotonic() + timeout
        while True:
            found = regex.findall(self.log.read_bytes())
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def log_text(self):
        return self.log.read_bytes()


def children_of(pid):
    """{child pid: state letter} of the processes whose parent is pid (from /proc/*/stat;
    "Z" is a zombie)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid:
            out[int(name)] = fields[0].decode()
    return out


class TcpServers:
    """Starts network servers for a test and kills them (process group by process group)
    in stop_all(), which the conftest.py fixtures `tcpservers` and `servers` call at
    teardown. Launchers (mode):

      tcpserver: [envdir DIR] tcpserver -v -R -H -l mx.test -c 10 [-x RULES]
                 127.0.0.1 PORT qmail-smtpd-py ARGS
      pool:      [envdir DIR] qmail-smtpd-py serve -v -H -R --root -l mx.test -c 10
                 [-x RULES] 127.0.0.1 PORT ARGS

    Both log `status: 0/10` once they listen, `pid N from IP` per connection and
    `end N status S` per finished one."""

    def __init__(self, tmp_path, mode="tcpserver"):
        mode = "pool" if mode == "resident" else mode
        assert mode in LAUNCHERS, mode
        self.tmp = tmp_path
        self.mode = mode
        self.procs = []

    @staticmethod
    def command(mode, port, rules=None, maxconn=10, local_name="mx.test", args=(),
                host="127.0.0.1", options=()):
        """The command line of a launcher listening on HOST PORT."""
        if mode == "tcpserver":
            cmd = ["tcpserver", "-v", "-R", "-H"]
        elif mode in ("pool", "resident"):
            cmd = [SERVER, "serve", "-v", "-H", "-R", "--root"]
        else:
            raise ValueError(mode)
        if local_name is not None:
            cmd += ["-l", local_name]
        cmd += ["-c", str(maxconn)]
        if rules:
            cmd += ["-x", rules]
        cmd += list(options) + [host, str(port)]
        if mode == "tcpserver":
            cmd.append(SERVER)
        return cmd + list(args)

    def start(self, home=None, env=None, rules=None, envdir=None, cwd=None, args=(),
              mode=None, maxconn=10, local_name="mx.test", host="127.0.0.1", options=()):
        """Start a server and wait until it listens; returns a TcpServer.

        The environment is PATH, QMAILHOME and QMAILQUEUE of home (if given), then env.
        rules: a tcprules cdb for -x; envdir: run under `envdir ENVDIR` (relative to
        cwd, which defaults to the test's tmp_path); args: the server's arguments (the
        checkpassword command line); mode: "tcpserver" or "resident" (default: the
        mode this TcpServers was made with); maxconn: -c; local_name: -l (None: no -l);
        host: the address to listen on (e.g. "::1"); options: more options of the
        launcher (before HOST PORT)."""
        mode = mode or self.mode
        mode = "pool" if mode == "resident" else mode
        if mode == "tcpserver":
            require_tools("tcpserver")
        require_server()
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if home is not None:
            full_env.update(QMAILHOME=home.path, QMAILQUEUE=home.queue.path)
        full_env.update(env or {})
        for _ in range(5):
            port = free_port()
            cmd = self.command(mode, port, rules, maxconn, local_name, args, host, options)
            if envdir:
                require_tools("envdir")
                cmd = ["envdir", envdir] + cmd
            p, log = self.spawn(cmd, full_env, cwd=cwd)
            if self.wait_listening(p, log):
                return TcpServer(port, log, p, mode)
            self.stop(p)
            text = log.read_bytes()
            if b"unable to bind" not in text and b"Address already in use" not in text:
                pytest.fail("%s did not start: %r" % (mode, text))
        pytest.fail("%s could not bind a free port" % mode)

    def spawn(self, cmd, env, cwd=None, **popen):
        """Popen cmd in a new session (process group), stdout to /dev/null, stderr to a
        new log file; stop_all() kills it. Returns (Popen, log path)."""
        log = self.tmp / ("server-%d.log" % len(self.procs))
        with open(log, "wb") as logf:
            p = subprocess.Popen(cmd, env=env, cwd=cwd or str(self.tmp),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=logf, start_new_session=True, **popen)
        self.procs.append(p)
        return p, log

    @staticmethod
    def wait_listening(p, log, timeout=15):
        """True once the log shows `status: 0/` (the server listens), False if p
        exited first or after the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"status: 0/" in log.read_bytes():
                return True
            if p.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def stop(self, p):
        """SIGTERM p's process group, SIGKILL it after 5 s; then SIGKILL whatever is
        left in the group (sessions a draining resident server still waits for, a
        qmail-queue a killed session left behind)."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()

    def stop_all(self):
        for p in self.procs:
            self.stop(p)


# ------------------------------------------------------------------ PROXY protocol headers

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source, destination, protocol=None):
    """A PROXY v1 line for the (ip, port) pairs (the protocol from the source's family)."""
    if protocol is None:
        protocol = "TCP6" if ":" in source[0] else "TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (protocol.encode(), source[0].encode(),
                                          destination[0].encode(), source[1], destination[1])


def proxy_v2(source, destination, tlvs=b"", command=0x21, family=None):
    """A PROXY v2 header for the (ip, port) pairs, with these TLV bytes after the
    addresses; command and family (0x11 TCP4, 0x21 TCP6: from the source) as given."""
    import ipaddress
    import struct
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if family is None:
        family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return PROXY_V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def tlv(kind, value):
    """One PROXY v2 TLV."""
    return bytes([kind]) + len(value).to_bytes(2, "big") + value

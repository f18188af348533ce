"""The reference world: the session core's requests answered with plain data.

Theory of operation.  The driver (qmail_smtpd_py/driver.py) carries out the
core's requests with real file descriptors and processes; World answers the
same requests (core/requests.py), one method per request type as in the
driver, from what a test says: the client's bytes (cut into chunks, None for
a read timeout), what each qmail-spp plugin prints and how it ends, the exit
of each SMTPEXTFORK program and of checkpassword, qmail-queue's status and
fd 6 text, the host's IP addresses, TLS.  It records everything: the bytes
sent and their segments (one per Send: qmail's flush points), the requests
in order, the log, what every child was started with, what was queued.

The tests (run() below) and the fuzzer (fuzz/fuzz_session.py, a subclass with
random outcomes) share it, so there is one interpreter of the request
protocol besides the driver.

Outcomes may be given as the core's outcome values, or as plain ints for an
exit status (Exited(int)).
"""

import os

from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.config import Config
from qmail_smtpd_py.core.session import Session
from qmail_smtpd_py.core.spp import plugin_entry

BASE_ENV = {b"TCPREMOTEIP": b"127.0.0.1", b"TCPLOCALIP": b"127.0.0.1",
            b"TCPLOCALHOST": b"mx.test"}
FIXED_TIME = 1795311213.5  # 22 Nov 2026 01:33:33 UTC
LOCAL_IPS = frozenset({(0, 0, 0, 0), (127, 0, 0, 1)})
QP = 4242
CIPHER = b"TLS_AES_256_GCM_SHA384"


def config(**overrides):
    """A Config like the tests' default qmail home: me mx.example.org,
    rcpthosts example.com and .sub.example.net."""
    fields = dict(greeting=b"mx.example.org", localiphost=b"mx.example.org",
                  rcpthosts={b"example.com", b".sub.example.net"})
    fields.update(overrides)
    return Config(**fields)


def _outcome(value):
    return rq.Exited(value) if isinstance(value, int) else value


def load_config(home, env=None, args=()):
    """The Config a connection would get from this qmail home (a path, or a
    helpers.Home) with this environment: control.load run in the home."""
    from qmail_smtpd_py.control import load
    path = getattr(home, "path", home)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        config, cdb = load(dict(BASE_ENV if env is None else env), args)
    finally:
        os.chdir(cwd)
    if cdb is not None:
        os.close(cdb.fd)
    return config


_COMMANDS = {verb.upper().decode() for verb in Session._VERBS} | {"CONNECT"}


def fact_of(line):
    """The fact a close, refuse or accept log line (without its prefix) states,
    read back from the text: the oracle for the facts the Log requests carry.
    None for other lines."""
    event, _, rest = line.partition(" ")
    words = rest.split(" ")
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    if event == "close":
        return rq.Closed(int(fields["status"]), fields["why"])
    if event == "refuse":
        verb, code = words[0], words[1]
        return rq.Refused(verb if verb in _COMMANDS else "OTHER",
                          code if len(code) == 3 and code.isdigit() else "other", fields["by"])
    if event == "accept":
        return rq.Accepted(int(fields["bytes"]), int(fields["rcpts"]))
    return None


class Queued(tuple):
    """(message, envelope) of one message qmail-queue accepted, with the
    views of helpers.Queued."""

    message = property(lambda self: self[0])
    envelope = property(lambda self: self[1])

    @property
    def sender(self):
        return self.envelope[1:self.envelope.index(b"\0")]

    @property
    def recipients(self):
        entries = self.envelope[self.envelope.index(b"\0") + 1:].split(b"\0")
        return [e[1:] for e in entries if e.startswith(b"T")]

    @property
    def received(self):
        """The server's own Received: header (its two lines)."""
        first = self.message.index(b"\n")
        return self.message[:self.message.index(b"\n", first + 1) + 1]

    @property
    def body(self):
        return self.message[len(self.received):]


class Plugin:
    """What a qmail-spp plugin does: print output (bytes), then end (an
    exit status or an outcome: Signaled, TIMED_OUT, WaitFailed).  A
    function of the environment (a dict) may stand for either."""

    def __init__(self, output=b"", end=0):
        self.output = output
        self.end = end


class World:
    """Answers one session's requests; see the module docstring."""

    def __init__(self, chunks=(), plugins=None, programs=None, checkpassword=None,
                 queue_status=0, queue_errtext=b"", queue_start=None, queue_write_fails=False,
                 local_ips=LOCAL_IPS, more_rcpthosts=(), tls_ready=None, handshake=None,
                 certificate=rq.NO_CERTIFICATE, now=FIXED_TIME):
        self.pending = [chunks] if isinstance(chunks, (bytes, bytearray)) else list(chunks)
        self.plugins = plugins or {}
        self.programs = programs or {}
        self.checkpassword_answer = checkpassword
        self.queue_status = queue_status
        self.queue_errtext = queue_errtext
        self.queue_start = rq.Started(QP) if queue_start is None else queue_start
        self.queue_write_fails = queue_write_fails
        self.local_ips_answer = local_ips
        self.more_rcpthosts_keys = more_rcpthosts
        self.tls_ready = rq.TLSReady() if tls_ready is None else tls_ready
        self.handshake_answer = rq.Secured(CIPHER) if handshake is None else handshake
        self.certificate = certificate
        self.clock = now

        self.output = bytearray()  # every byte sent
        self.segments = []         # the data of each Send
        self.requests = []         # every request, in order
        self.log = []              # Log texts (and "slept N" for each Sleep)
        self.facts = []            # the facts of the Log requests (Closed, Refused, Accepted)
        self.exit = None
        self.queued = []           # (message, envelope) of messages qmail-queue accepted
        self.offered = []          # every (message, envelope) handed to qmail-queue
        self.queue_envs = []       # the environment of each qmail-queue
        self.plugin_runs = []      # (argv, env) of each plugin started
        self.program_runs = []     # (path, env) of each SMTPEXTFORK program run
        self.checkpassword = []    # the fd 3 bytes of every checkpassword run
        self.checkpassword_envs = []
        self._message = None
        self._lines = None
        self._end = None

    @property
    def plugin_envs(self):
        return [env for _, env in self.plugin_runs]

    # The names of helpers.Result, for tests that run either way.
    out = property(lambda self: bytes(self.output))
    status = property(lambda self: self.exit)
    err = property(lambda self: "".join(line + "\n" for line in self.log).encode(
        "utf-8", "backslashreplace"))

    def play(self, steps, max_steps=None):
        """Answer the requests of steps (Session.run()) up to its Exit."""
        handlers = {kind: getattr(self, name) for kind, name in self._HANDLERS.items()}
        outcome = None
        count = 0
        while True:
            request = steps.send(outcome)
            self.requests.append(request)
            outcome = handlers[type(request)](request)
            if type(request) is rq.Exit:
                return self
            count += 1
            if max_steps is not None and count > max_steps:
                raise AssertionError("no Exit after %d requests" % max_steps)

    # ------------------------------------------------------------ the client

    def read(self, request):
        if not self.pending:
            return rq.END_OF_INPUT
        chunk = self.pending.pop(0)
        if chunk is None:
            return rq.TIMED_OUT
        return bytes(chunk) if chunk else rq.END_OF_INPUT

    def send(self, request):
        self.output += request.data
        self.segments.append(request.data)
        return rq.SENT

    def write_log(self, request):
        if request.text is not None:
            self.log.append(request.text)
        if request.fact is not None:
            self.facts.append(request.fact)

    def end(self, request):
        self.exit = request.code

    def now(self, request):
        return self.clock

    def local_ips(self, request):
        answer = self.local_ips_answer
        return rq.Failed("no interfaces") if answer is None else answer

    def more_rcpthosts(self, request):
        keys = self.more_rcpthosts_keys
        if type(keys) is rq.Failed:
            return keys
        return any(key in keys for key in request.keys)

    def sleep(self, request):
        self.log.append("slept %s" % request.seconds)

    # ------------------------------------------------------------ qmail-queue

    def start_queue(self, request):
        self.queue_envs.append(request.env)
        started = self.queue_start
        if type(started) is rq.Started:
            self._message = bytearray()
        return started

    def write_queue(self, request):
        self._message += request.data
        return rq.WRITE_FAILED if self.queue_write_fails else rq.WRITTEN

    def finish_queue(self, request):
        message, self._message = bytes(self._message), None
        self.offered.append((message, request.envelope))
        if request.envelope is None:  # the real qmail-queue rejects it
            return rq.Exited(54)
        status = _outcome(self.queue_status)
        if status == rq.Exited(0):
            self.queued.append(Queued((message, request.envelope)))
        if type(status) is rq.Exited:
            return rq.Exited(status.code, self.queue_errtext)
        return status

    # ------------------------------------------------------------ plugins, programs

    def start_plugin(self, request):
        entry = plugin_entry(request.argv)
        self.plugin_runs.append((request.argv, request.env))
        plugin = self.plugins[entry]
        if not isinstance(plugin, Plugin):
            if type(plugin) is rq.CannotStart:
                return plugin
            plugin = Plugin(*plugin)
        output = plugin.output(request.env) if callable(plugin.output) else plugin.output
        end = plugin.end(request.env) if callable(plugin.end) else plugin.end
        lines = [line + b"\n" for line in output.split(b"\n")]
        lines[-1] = lines[-1][:-1]
        self._lines = [line for line in lines if line]
        self._end = _outcome(end)
        return rq.Started(QP + 1)

    def read_plugin(self, request):
        lines, self._lines = self._lines, []
        if lines:
            return rq.Lines(lines)
        return rq.TIMED_OUT if self._end == rq.TIMED_OUT else rq.END_OF_INPUT

    def finish_plugin(self, request):
        return self._end

    def run_program(self, request):
        self.program_runs.append((request.path, request.env))
        answer = self.programs[request.path]
        if callable(answer):
            answer = answer(request.env)
        return _outcome(answer)

    def check_password(self, request):
        self.checkpassword.append(request.data)
        self.checkpassword_envs.append(request.env)
        return _outcome(self.checkpassword_answer(request.data))

    # ------------------------------------------------------------ TLS

    def start_tls(self, request):
        return self.tls_ready

    def handshake(self, request):
        return self.handshake_answer

    def client_certificate(self, request):
        return self.certificate

    # request type -> the method answering it (by name, so subclasses can override)
    _HANDLERS = {
        rq.Read: "read", rq.Send: "send", rq.Log: "write_log", rq.Exit: "end", rq.Now: "now",
        rq.LocalIPs: "local_ips", rq.MoreRcptHosts: "more_rcpthosts", rq.Sleep: "sleep",
        rq.StartQueue: "start_queue", rq.WriteQueue: "write_queue",
        rq.FinishQueue: "finish_queue", rq.StartPlugin: "start_plugin",
        rq.ReadPlugin: "read_plugin", rq.FinishPlugin: "finish_plugin",
        rq.RunProgram: "run_program", rq.CheckPassword: "check_password",
        rq.StartTLS: "start_tls", rq.Handshake: "handshake",
        rq.ClientCertificate: "client_certificate",
    }


def run(chunks, cfg=None, env=None, pid=b"77", home=None, args=(), **world):
    """Play one session: chunks of client bytes (bytes, or a list with None
    for a read timeout), the session's Config (or a qmail home to load it
    from, with args the checkpassword command line) and environment, and
    what the world answers (World's keywords).  Returns the World, with its
    records."""
    env = dict(BASE_ENV if env is None else env)
    if cfg is None:
        cfg = config() if home is None else load_config(home, env, args)
    return World(chunks, **world).play(Session(cfg, env, pid).run())

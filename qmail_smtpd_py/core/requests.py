"""The seam between the core and the world: typed requests and outcomes.

Theory of operation.  The session (session.py) is a generator: it yields a
request and is resumed with the outcome.  A driver carries the requests out
(driver.py: file descriptors, processes, clocks); the reference world of the
tests (t/world.py) answers them with plain data.  Requests say what is to be
done, never how; outcomes say what happened, never what it means: every
mapping from an outcome to a reply or a log line is core code.

Both are small frozen values with equality and a repr, so a test can compare
them and a failing test shows them.  The classes are hand-slotted rather than
attrs or dataclasses: they are on the per-connection path, where every import
costs every connection (README, "Design").

Requests, with their possible outcomes:

    Read()                     bytes (never empty) | END_OF_INPUT | TIMED_OUT
    Send(data)                 SENT | SEND_FAILED
    Log(text)                  None
    Now()                      the Unix time (float)
    LocalIPs()                 frozenset of IPv4 4-tuples | Failed
    MoreRcptHosts(keys)        True | False | Failed     (morercpthosts.cdb)
    Sleep(seconds)             None
    Exit(code)                 (never answered)
    StartQueue(program, env)   Started | CannotStart
    WriteQueue(data)           WRITTEN | WRITE_FAILED
    FinishQueue(envelope)      Exited | Signaled | WaitFailed
    StartPlugin(argv, env, time_limit)
                               Started | CannotStart
    ReadPlugin()               Lines | END_OF_INPUT | TIMED_OUT
    FinishPlugin()             Exited | Signaled | TIMED_OUT | WaitFailed
    RunProgram(path, env, time_limit)
                               Exited | Signaled | TIMED_OUT | CannotStart | WaitFailed
    CheckPassword(argv, data, env)
                               Exited | Signaled | CannotStart | WRITE_FAILED | WaitFailed
    StartTLS(ciphers, client_ca)
                               TLSReady | TLSSetupFailed
    Handshake()                Secured | HandshakeFailed
    ClientCertificate()        PeerCertificate | NO_CERTIFICATE
"""

from __future__ import annotations

TYPE_CHECKING = False  # as typing's, which would cost 15 ms of imports on every connection
if TYPE_CHECKING:
    from collections.abc import Generator

    # What the core's generators are: they yield requests, get outcomes back.
    Steps = Generator["Value", object, object]


class Value:
    """A frozen record: fields from __slots__ (positional or by name, with
    defaults from _defaults), equality, hash and repr by field.  Fields
    named in _secret are never shown by repr (credentials)."""

    __slots__ = ()
    _defaults = {}
    _secret = ()

    def __init__(self, *args, **kwargs):
        names = self.__slots__
        if not kwargs and len(args) == len(names):  # the usual case, made cheap
            for name, value in zip(names, args):
                object.__setattr__(self, name, value)
            return
        if len(args) > len(names):
            raise TypeError("%s takes %d fields" % (type(self).__name__, len(names)))
        values = dict(self._defaults)
        values.update(zip(names, args))
        values.update(kwargs)
        if values.keys() != set(names):
            unknown = set(values) - set(names)
            missing = set(names) - set(values)
            raise TypeError("%s: unknown %s, missing %s" % (
                type(self).__name__, sorted(unknown), sorted(missing)))
        for name in names:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name, value):
        raise AttributeError("%s is frozen" % type(self).__name__)

    def __delattr__(self, name):
        raise AttributeError("%s is frozen" % type(self).__name__)

    def _fields(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        return type(other) is type(self) and other._fields() == self._fields()

    def __hash__(self):
        return hash((type(self), self._fields()))

    def replace(self, **changes):
        """A copy with some fields changed."""
        values = dict(zip(self.__slots__, self._fields()))
        values.update(changes)
        return type(self)(**values)

    def __repr__(self):
        shown = []
        for name in self.__slots__:
            value = getattr(self, name)
            if name in self._secret:
                shown.append("%s=<%d bytes>" % (name, len(value)))
            else:
                shown.append("%s=%r" % (name, value))
        return "%s(%s)" % (type(self).__name__, ", ".join(shown))


# ------------------------------------------------------------------ the client


class Read(Value):
    """Wait (up to the connection's timeout) for bytes from the client."""
    __slots__ = ()


class Send(Value):
    """Write these bytes to the client now (a flush point of the core)."""
    __slots__ = ("data",)
    data: bytes


class Log(Value):
    """Write one line to the log; the driver adds the connection's prefix."""
    __slots__ = ("text",)
    text: str


class Now(Value):
    __slots__ = ()


class LocalIPs(Value):
    """This host's IPv4 addresses (qmail's ipme), 0.0.0.0 included."""
    __slots__ = ()


class MoreRcptHosts(Value):
    """Is any of these keys in control/morercpthosts.cdb?"""
    __slots__ = ("keys",)
    keys: tuple[bytes, ...]


class Sleep(Value):
    __slots__ = ("seconds",)
    seconds: float


class Exit(Value):
    """End the connection with this exit status (all output was sent)."""
    __slots__ = ("code",)
    code: int


READ = Read()
NOW = Now()
LOCAL_IPS = LocalIPs()

# ------------------------------------------------------------------ children


class StartQueue(Value):
    """Start qmail-queue (execv, cwd the qmail home): message on its fd 0,
    envelope on fd 1, notqmail's error text on fd 6."""
    __slots__ = ("program", "env")
    program: bytes
    env: dict[bytes, bytes]


class WriteQueue(Value):
    __slots__ = ("data",)
    data: bytes


class FinishQueue(Value):
    """Close the message, write the envelope (None: none at all, so that
    qmail-queue gives up on the message), wait for the child."""
    __slots__ = ("envelope",)
    envelope: bytes | None


class StartPlugin(Value):
    """Start a qmail-spp plugin (execv of argv[0]): stdin closed, stdout a
    pipe read by ReadPlugin, stderr the log.  time_limit: seconds for the
    whole run, or None; past it the plugin is killed."""
    __slots__ = ("argv", "env", "time_limit")
    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    time_limit: float | None


class ReadPlugin(Value):
    """The next lines the running plugin printed."""
    __slots__ = ()


class FinishPlugin(Value):
    """Stop reading the plugin and wait for it."""
    __slots__ = ()


class RunProgram(Value):
    """Run an SMTPEXTFORK program (execv, no arguments, stdin /dev/null,
    stdout and stderr the log) and wait for it, killing it past time_limit."""
    __slots__ = ("path", "env", "time_limit")
    path: bytes
    env: dict[bytes, bytes]
    time_limit: float | None


class CheckPassword(Value):
    """Run the checkpassword command line (execvp) with data on its fd 3,
    stdin /dev/null, stdout the log, SIGPIPE at its default; wait for it."""
    __slots__ = ("argv", "data", "env")
    _secret = ("data",)
    argv: tuple[bytes, ...]
    data: bytes
    env: dict[bytes, bytes]


READ_PLUGIN = ReadPlugin()
FINISH_PLUGIN = FinishPlugin()

# ------------------------------------------------------------------ TLS


class StartTLS(Value):
    """Prepare TLS from control/servercert.pem: ciphers is the OpenSSL cipher
    list (None: the library's default); client_ca asks for (never requires)
    client certificates signed by control/clientca.pem."""
    __slots__ = ("ciphers", "client_ca")
    ciphers: bytes | None
    client_ca: bool


class Handshake(Value):
    """Run the server side of the TLS handshake on the connection."""
    __slots__ = ()


class ClientCertificate(Value):
    """The certificate the client presented in the handshake."""
    __slots__ = ()


HANDSHAKE = Handshake()
CLIENT_CERTIFICATE = ClientCertificate()

# ------------------------------------------------------------------ outcomes


class Outcome(Value):
    __slots__ = ()


class EndOfInput(Outcome):
    """The client (or the plugin) closed its end."""
    __slots__ = ()


class TimedOut(Outcome):
    """The time limit passed (a child that overran it was killed)."""
    __slots__ = ()


class Sent(Outcome):
    __slots__ = ()


class SendFailed(Outcome):
    """A write error or a write timeout: the client is gone."""
    __slots__ = ()


class Written(Outcome):
    __slots__ = ()


class WriteFailed(Outcome):
    __slots__ = ()


class Failed(Outcome):
    """The thing could not be done; detail says why (for the log)."""
    __slots__ = ("detail",)
    detail: str


class Started(Outcome):
    __slots__ = ("pid",)
    pid: int


# What could not be made when a child was not started.
PIPE, FORK, EXEC = "pipe", "fork", "exec"


class CannotStart(Outcome):
    """No child: reason is PIPE (no pipe), FORK (no process) or EXEC (the
    program could not be executed); detail is the system's error text."""
    __slots__ = ("reason", "detail")
    _defaults = {"detail": ""}
    reason: str
    detail: str


class Exited(Outcome):
    """The child exited with code; text is what qmail-queue wrote on fd 6."""
    __slots__ = ("code", "text")
    _defaults = {"text": b""}
    code: int
    text: bytes


class Signaled(Outcome):
    __slots__ = ("signal",)
    signal: int


class WaitFailed(Outcome):
    """waitpid() did not give the child's status (e.g. ECHILD)."""
    __slots__ = ("detail",)
    _defaults = {"detail": ""}
    detail: str


class Lines(Outcome):
    """Output lines of a plugin, each with its LF (an unterminated last one
    at the end of the output without)."""
    __slots__ = ("lines",)
    lines: list[bytes]


class TLSReady(Outcome):
    """client_certs: client certificates will be asked for; warnings: what
    the log should say about the set-up (e.g. an unusable cipher list)."""
    __slots__ = ("client_certs", "warnings")
    _defaults = {"client_certs": False, "warnings": ()}
    client_certs: bool
    warnings: tuple[str, ...]


# The set-up step that failed (TLSSetupFailed.step).
TLS_CONTEXT, TLS_CERTIFICATE, TLS_KEY = "context", "certificate", "key"


class TLSSetupFailed(Outcome):
    """step: TLS_CONTEXT, TLS_CERTIFICATE or TLS_KEY; detail: OpenSSL's
    error string (b"" when it gave none)."""
    __slots__ = ("step", "detail")
    _defaults = {"detail": b""}
    step: str
    detail: bytes


class Secured(Outcome):
    __slots__ = ("cipher",)
    cipher: bytes


# Why a handshake failed (HandshakeFailed.why).
TLS_TIMEOUT, TLS_CLOSED, TLS_ERROR = "timeout", "closed", "error"


class HandshakeFailed(Outcome):
    """why: TLS_TIMEOUT, TLS_CLOSED or TLS_ERROR (detail: OpenSSL's text)."""
    __slots__ = ("why", "detail")
    _defaults = {"detail": b""}
    why: str
    detail: bytes


class NoCertificate(Outcome):
    """The client presented no certificate (or none was asked for)."""
    __slots__ = ()


class PeerCertificate(Outcome):
    """The client's certificate: the e-mail addresses of its subject, and
    the first verification error (None: it verified)."""
    __slots__ = ("emails", "verify_error")
    _defaults = {"verify_error": None}
    emails: tuple[bytes, ...]
    verify_error: bytes | None


END_OF_INPUT = EndOfInput()
TIMED_OUT = TimedOut()
SENT = Sent()
SEND_FAILED = SendFailed()
WRITTEN = Written()
WRITE_FAILED = WriteFailed()
NO_CERTIFICATE = NoCertificate()

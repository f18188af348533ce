"""What the session core asks of the outside world.

The core (session.py) is a generator: it yields one of these requests and
is resumed with the answer.  The driver (server.py) fulfils them with real
file descriptors, processes and clocks; tests fulfil them with plain data.
Before answering any request that waits (READ, a queue finish, an exit) the
driver writes out the replies the session has accumulated in `out`.
"""


class Read:
    """Wait for client bytes.  Answer: bytes, b"" at EOF, None on timeout."""
    __slots__ = ()


READ = Read()


class Now:
    """Answer: the current Unix time as a float."""
    __slots__ = ()


NOW = Now()


class LocalIPs:
    """Answer: the set of this host's IPv4 addresses as 4-tuples (0.0.0.0
    included), or None if they cannot be determined."""
    __slots__ = ()


LOCAL_IPS = LocalIPs()


class Exit:
    """Flush the replies and end the process with this status."""
    __slots__ = ("code",)

    def __init__(self, code):
        self.code = code


class Log:
    """Write one line to the log (stderr)."""
    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


class QueueStart:
    """Start qmail-queue with this environment.

    Answer: the child's pid; QUEUE_EXEC_FAILED if the program could not be
    executed (reported later as exit 120); None if no pipe or process could
    be made (451 qqt failure)."""
    __slots__ = ("env",)

    def __init__(self, env):
        self.env = env


QUEUE_EXEC_FAILED = 0


class QueueWrite:
    """Write message bytes to qmail-queue.  Answer: False on a write error."""
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class QueueFinish:
    """Close the message, send the envelope (None: send nothing, so that
    qmail-queue rejects the message), wait for the child.

    Answer: (status, errtext): the exit code, or QUEUE_CRASHED if the child
    died from a signal; errtext is what it wrote on fd 6 (notqmail's
    custom error channel), b"" if nothing."""
    __slots__ = ("envelope",)

    def __init__(self, envelope):
        self.envelope = envelope


QUEUE_CRASHED = -1


class PluginStart:
    """Start a qmail-spp plugin (an entry of control/smtpplugins) with this
    environment.  Answer: None, or the failure reason (b"can't execute",
    b"can't pipe()", b"fork() failed")."""
    __slots__ = ("entry", "env")

    def __init__(self, entry, env):
        self.entry = entry
        self.env = env


class PluginRead:
    """Answer: the next output lines of the running plugin (each with its LF,
    an unterminated last one without), or None at EOF."""
    __slots__ = ()


class PluginFinish:
    """Stop reading and wait for the plugin.  Answer: its exit code, or
    PLUGIN_CRASHED if it died from a signal or was killed for overrunning
    its time limit."""
    __slots__ = ()


PLUGIN_CRASHED = -1


class RunProgram:
    """Run a program without arguments (stdin /dev/null, stdout to the log)
    and wait for it.  Answer: its exit code (111 if it could not be
    executed), PROGRAM_CRASHED after a signal, PROGRAM_NOT_STARTED if no
    process could be made."""
    __slots__ = ("path", "env")

    def __init__(self, path, env):
        self.path = path
        self.env = env


PROGRAM_CRASHED = -1
PROGRAM_NOT_STARTED = -2


class Sleep:
    """Flush the replies, then pause this many seconds."""
    __slots__ = ("seconds",)

    def __init__(self, seconds):
        self.seconds = seconds


class CheckPassword:
    """Run the checkpassword command (argv) with `data` on its fd 3.
    Answer: its exit code (0 = accepted), or one of "child", "fork",
    "pipe", "write" when it could not be run properly."""
    __slots__ = ("argv", "data", "env")

    def __init__(self, argv, data, env):
        self.argv = argv
        self.data = data
        self.env = env

    def __repr__(self):  # never show credentials
        return "CheckPassword(%r, <%d bytes>)" % (self.argv, len(self.data))


class TLSStart:
    """Prepare TLS (context, certificate).  Answer: None, or the reply text
    of a set-up failure, e.g. b"missing certificate: <reason>"."""
    __slots__ = ()


TLS_START = TLSStart()


class TLSHandshake:
    """Run the TLS handshake on the connection (replies flushed first).
    Answer: (True, cipher name) or (False, reason)."""
    __slots__ = ()


TLS_HANDSHAKE = TLSHandshake()


class TLSClientCert:
    """Answer: (email or None, reason or None) for the client certificate
    given in the handshake, judged against control/tlsclients; (None, None)
    when client certificates are not in use."""
    __slots__ = ()


TLS_CLIENT_CERT = TLSClientCert()

"""Drive the sans-I/O session core from byte transcripts (no processes)."""

from qmail_smtpd_py import effects
from qmail_smtpd_py.control import Config
from qmail_smtpd_py.session import Session

BASE_ENV = {b"TCPREMOTEIP": b"127.0.0.1", b"TCPLOCALIP": b"127.0.0.1",
            b"TCPLOCALHOST": b"mx.test"}
FIXED_TIME = 1795311213.5  # 22 Nov 2026 01:33:33 UTC


def config(**overrides):
    fields = dict(greeting=b"mx.example.org", localiphost=b"mx.example.org",
                  rcpthosts={b"example.com", b".sub.example.net"})
    fields.update(overrides)
    return Config(**fields)


class Result:
    def __init__(self):
        self.output = bytearray()
        self.queued = []      # (message, envelope) of messages qmail-queue accepted
        self.offered = []     # every (message, envelope) handed to qmail-queue
        self.exit = None
        self.log = []


LOCAL_IPS = frozenset({(0, 0, 0, 0), (127, 0, 0, 1)})


def run(chunks, cfg=None, env=None, queue_status=0, queue_errtext=b"", local_ips=LOCAL_IPS,
        queue_start=4242, plugins=None, checkpassword=None, programs=None, tls=None):
    """Feed chunks (bytes each, EOF after the last) to a Session.

    The fake qmail-queue records what it is given and answers queue_status;
    like the real one it rejects (54) a message without an envelope.
    plugins maps a qmail-spp entry to (output bytes, exit status);
    checkpassword(data) gives the exit status for the fd 3 bytes;
    programs maps an SMTPEXTFORK program to its exit status;
    tls is (start failure or None, (ok, detail), (email, reason)).
    """
    if isinstance(chunks, bytes):
        chunks = [chunks]
    session = Session(cfg or config(), dict(BASE_ENV if env is None else env), pid=77)
    result = Result()
    result.checkpassword = []  # the fd 3 bytes of every checkpassword run
    result.plugin_envs = []    # the environment each plugin was started with
    plugin_lines = []
    pending = list(chunks)
    message = bytearray()
    steps = session.run()
    answer = None
    while True:
        request = steps.send(answer)
        answer = None
        result.output += session.out
        del session.out[:]
        if request is effects.READ:
            answer = pending.pop(0) if pending else b""
        elif request is effects.NOW:
            answer = FIXED_TIME
        elif request is effects.LOCAL_IPS:
            answer = local_ips
        elif isinstance(request, effects.QueueStart):
            message = bytearray()
            answer = queue_start
        elif isinstance(request, effects.QueueWrite):
            message += request.data
            answer = True
        elif isinstance(request, effects.QueueFinish):
            result.offered.append((bytes(message), request.envelope))
            if request.envelope is None:
                answer = (54, b"")
            else:
                if queue_status == 0:
                    result.queued.append((bytes(message), request.envelope))
                answer = (queue_status, queue_errtext)
        elif isinstance(request, effects.Log):
            result.log.append(request.text)
        elif isinstance(request, effects.PluginStart):
            output, status = plugins[request.entry]
            result.plugin_envs.append(dict(request.env))
            plugin_lines = [line + b"\n" for line in output.split(b"\n")]
            plugin_lines[-1] = plugin_lines[-1][:-1]
            plugin_status = status
        elif isinstance(request, effects.PluginRead):
            lines = [line for line in plugin_lines if line]
            plugin_lines = []
            answer = lines or None
        elif isinstance(request, effects.PluginFinish):
            answer = plugin_status
        elif isinstance(request, effects.CheckPassword):
            result.checkpassword.append(request.data)
            answer = checkpassword(request.data)
        elif isinstance(request, effects.RunProgram):
            answer = programs[request.path]
        elif isinstance(request, effects.Sleep):
            result.log.append("slept %s" % request.seconds)
        elif request is effects.TLS_START:
            answer = tls[0]
        elif request is effects.TLS_HANDSHAKE:
            answer = tls[1]
        elif request is effects.TLS_CLIENT_CERT:
            answer = tls[2]
        elif isinstance(request, effects.Exit):
            result.exit = request.code
            return result
        else:
            raise AssertionError("unexpected request %r" % request)

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
        queue_start=4242):
    """Feed chunks (bytes each, EOF after the last) to a Session.

    The fake qmail-queue records what it is given and answers queue_status;
    like the real one it rejects (54) a message without an envelope.
    """
    if isinstance(chunks, bytes):
        chunks = [chunks]
    session = Session(cfg or config(), dict(BASE_ENV if env is None else env))
    result = Result()
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
        elif isinstance(request, effects.Exit):
            result.exit = request.code
            return result
        else:
            raise AssertionError("unexpected request %r" % request)

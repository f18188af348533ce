"""The core's small pieces on their own: the request/outcome values, the
certificate judgement, fault replies, and the session's edges that no
transcript of another test reaches (STARTTLS twice, a line longer than the
buffer, a client gone at a flush, nothing after Exit)."""

import pytest

from qmail_smtpd_py.core import replies
from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.config import LOG_REPLIES
from qmail_smtpd_py.core.logline import word
from qmail_smtpd_py.core.session import Session, fault
from qmail_smtpd_py.core.tlspolicy import judge_certificate

from world import BASE_ENV, World, config, run

GREETING = b"220 mx.example.org ESMTP\r\n"


# ------------------------------------------------------------------ values


def test_values_are_frozen_and_compare_by_type_and_fields():
    a = rq.Exited(3, b"text")
    assert a == rq.Exited(code=3, text=b"text") and hash(a) == hash(rq.Exited(3, b"text"))
    assert a != rq.Exited(4, b"text") and a != rq.Signaled(3)
    assert rq.Exited(3) == rq.Exited(3, b"")  # the default
    with pytest.raises(AttributeError, match="frozen"):
        a.code = 4
    with pytest.raises(AttributeError, match="frozen"):
        del a.code
    assert a.replace(code=9) == rq.Exited(9, b"text") and a.code == 3


def test_values_refuse_wrong_fields():
    with pytest.raises(TypeError, match="takes 2 fields"):
        rq.Exited(1, b"", 3)
    with pytest.raises(TypeError, match=r"unknown \['status'\], missing \['code'\]"):
        rq.Exited(status=1)


def test_repr_hides_secrets():
    request = rq.CheckPassword((b"/bin/cp",), b"joe\0secret\0", {})
    assert repr(request) == "CheckPassword(argv=(b'/bin/cp',), data=<11 bytes>, env={})"
    assert "secret" not in repr(request)


def test_log_word_of_nothing_is_a_dash():
    assert word(None) == "-" and word(b"a\nb") == "a\\x0ab"


# ------------------------------------------------------------------ certificates


@pytest.mark.parametrize("certificate,listed,expected", [
    (rq.NO_CERTIFICATE, {b"joe@x"}, (None, None)),
    (rq.PeerCertificate((b"joe@x",), b"unable to get local issuer certificate"), {b"joe@x"},
     (None, b"unable to get local issuer certificate")),
    (rq.PeerCertificate(()), {b"joe@x"}, (None, replies.TLS_CERT_NO_EMAIL)),
    (rq.PeerCertificate((b"ann@x",)), {b"joe@x"}, (None, replies.TLS_CERT_NOT_LISTED)),
    (rq.PeerCertificate((b"joe@x",)), None, (None, replies.TLS_CERT_NOT_LISTED)),
    (rq.PeerCertificate((b"joe@x", b"ann@x")), {b"joe@x"}, (b"joe@x", None)),
])
def test_judge_certificate(certificate, listed, expected):
    tls_clients = None if listed is None else frozenset(listed)
    assert judge_certificate(certificate, tls_clients) == expected


# ------------------------------------------------------------------ faults


def test_fault_replies():
    assert fault(MemoryError()) == (replies.NOMEM, "fatal: out of memory at ?")
    try:
        {}["x"]
    except KeyError as e:
        reply, text = fault(e)
    assert reply == replies.INTERNAL
    assert text.startswith("internal error: KeyError: 'x' at ") and "test_core_values" in text


# ------------------------------------------------------------------ session edges


def test_starttls_inside_tls_is_unimplemented():
    w = run([b"STARTTLS\r\n", b"STARTTLS\r\n", b"QUIT\r\n"], cfg=config(tls=True))
    assert w.out == (GREETING + b"220 ready for tls\r\n" + replies.UNIMPLEMENTED
                     + b"221 mx.example.org\r\n")


def test_a_line_longer_than_the_limit_before_its_end_arrives_is_skipped():
    """The limit is passed while the line's LF has not come yet: what came is
    dropped at once (memory stays bounded), the rest up to the LF too."""
    w = run([b"NOOP " + b"x" * 200, b"y" * 200, b"z\r\nNOOP\r\nQUIT\r\n"],
            cfg=config(max_line=100))
    assert w.out == GREETING + replies.LINE_TOO_LONG + b"250 ok\r\n221 mx.example.org\r\n"


class GoneWorld(World):
    """A client that is gone: every Send fails."""

    def send(self, request):
        super().send(request)
        return rq.SEND_FAILED


def test_a_client_gone_at_a_flush_ends_the_session():
    w = GoneWorld(b"NOOP\r\nNOOP\r\n").play(Session(config(), dict(BASE_ENV), b"7").run())
    assert w.exit == 1
    assert w.log[-1] == "close status=1 why=write messages=0"
    assert w.segments == [GREETING]  # nothing after the first failed write


def test_nothing_comes_after_exit_at_every_log_level():
    for level in (1, LOG_REPLIES):
        steps = Session(config(log_level=level), dict(BASE_ENV), b"7").run()
        request = steps.send(None)
        outcome = None
        while type(request) is not rq.Exit:
            outcome = {rq.Read: rq.END_OF_INPUT, rq.Send: rq.SENT}.get(type(request))
            request = steps.send(outcome)
        with pytest.raises(StopIteration):
            steps.send(None)

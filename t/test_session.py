"""The session core from byte transcripts: client bytes in, server bytes out."""

from hypothesis import given, settings
from hypothesis import strategies as st

from qmail_smtpd_py.core import requests as rq

from world import config, run

GREETING = b"220 mx.example.org ESMTP\r\n"
MSG = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
RECEIVED = (b"Received: from unknown (127.0.0.1)\n"
            b"  by mx.test with SMTP; 22 Nov 2026 01:33:33 -0000\n")


def test_a_whole_session():
    r = run(b"HELO c.test\r\n" + MSG + b"QUIT\r\n")
    assert r.output == (GREETING + b"250 mx.example.org\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
                        b"250 ok 1795311213 qp 4242\r\n221 mx.example.org\r\n")
    assert r.queued == [(RECEIVED.replace(b"unknown (", b"unknown (HELO c.test) (")
                         + b"Subject: t\n\nhi\n", b"Fa@b.c\0Tu@example.com\0\0")]
    assert r.exit == 0


def test_eof_ends_with_status_1_and_no_reply():
    r = run(b"NOOP\r\nNOO")
    assert r.output == GREETING + b"250 ok\r\n"
    assert r.exit == 1


def test_timeout_replies_451_and_exits_1():
    r = run([b"NOOP\r\n", None])
    assert r.output == GREETING + b"250 ok\r\n451 timeout (#4.4.2)\r\n"
    assert r.exit == 1


def test_eof_inside_data_queues_nothing():
    r = run(MSG[:-3])
    assert r.queued == []
    assert r.offered == []  # qmail-queue never got an envelope
    assert r.exit == 1


def test_over_long_command_line_is_refused_and_the_session_goes_on():
    r = run(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n", cfg=config(max_line=1000))
    assert r.output == GREETING + b"500 line too long (#5.5.2)\r\n250 ok\r\n"
    assert r.exit == 1


def test_queue_exec_failure_reads_the_message_then_451():
    r = run(MSG + b"NOOP\r\n", queue_start=rq.CannotStart(rq.EXEC, "No such file or directory"))
    assert r.output.endswith(b"354 go ahead\r\n451 unable to exec qq (#4.3.0)\r\n250 ok\r\n")


def test_no_pipe_or_process_gives_qqt_failure_without_354():
    r = run(MSG + b"NOOP\r\n", queue_start=rq.CannotStart(rq.FORK, "Resource temporarily unavailable"))
    assert r.output == GREETING + b"250 ok\r\n250 ok\r\n451 qqt failure (#4.3.0)\r\n502 unimplemented (#5.5.1)\r\n502 unimplemented (#5.5.1)\r\n" \
        b"502 unimplemented (#5.5.1)\r\n502 unimplemented (#5.5.1)\r\n250 ok\r\n"


def test_queue_crash_and_custom_error_text():
    assert run(MSG, queue_status=rq.Signaled(11)).output.endswith(b"451 qq crashed (#4.3.0)\r\n")
    r = run(MSG, queue_status=82, queue_errtext=b"Dno thanks (#5.7.1)")
    assert r.output.endswith(b"554 no thanks (#5.7.1)\r\n")


def test_looping_message_is_read_to_the_end_then_554():
    body = b"Received: x\r\n" * 100 + b"\r\nbody\r\n.\r\n"
    r = run(MSG.replace(b"Subject: t\r\n\r\nhi\r\n.\r\n", body) + b"NOOP\r\n")
    assert r.output.endswith(b"554 too many hops, this message is looping (#5.4.6)\r\n250 ok\r\n")
    assert r.queued == []


def test_localiphost_rewrites_only_local_literals():
    r = run(b"MAIL FROM:<a@[127.0.0.1]>\r\nRCPT TO:<u@[8.8.8.8]>\r\nRCPT TO:<v@[0.0.0.0]>\r\n"
            b"DATA\r\n.\r\n", cfg=config(rcpthosts=None))
    assert r.queued[0][1] == b"Fa@mx.example.org\0Tu@[8.8.8.8]\0Tv@mx.example.org\0\0"


def test_unknown_ip_addresses_give_421():
    r = run(b"MAIL FROM:<a@[1.2.3.4]>\r\n", local_ips=None)
    assert r.output == GREETING + b"421 unable to figure out my IP addresses (#4.3.0)\r\n"
    assert r.exit == 1
    r = run(b"MAIL FROM:<a@[1.2.3.4]>\r\n", local_ips=frozenset())
    assert r.output == GREETING + b"250 ok\r\n"


def test_badmailfrom_is_reported_at_each_rcpt():
    r = run(b"MAIL FROM:<X@Spam.COM>\r\nRCPT TO:<u@example.com>\r\nMAIL FROM:<ok@b.c>\r\n"
            b"RCPT TO:<u@example.com>\r\n", cfg=config(badmailfrom={b"@spam.com"}))
    assert r.output == GREETING + b"250 ok\r\n553 sorry, your envelope sender is in my " \
        b"badmailfrom list (#5.7.1)\r\n250 ok\r\n250 ok\r\n"


def test_relayclient_suffix_and_rcpthosts():
    r = run(b"MAIL FROM:<>\r\nRCPT TO:<a@other.org>\r\nDATA\r\n.\r\n",
            env={b"RELAYCLIENT": b"+rc"})
    assert r.queued[0][1] == b"F\0Ta@other.org+rc\0\0"
    r = run(b"MAIL FROM:<>\r\nRCPT TO:<a@other.org>\r\nRCPT TO:<a@x.sub.example.net>\r\n")
    assert r.output == GREETING + b"250 ok\r\n553 sorry, that domain isn't in my list of " \
        b"allowed rcpthosts (#5.7.1)\r\n250 ok\r\n"


def test_received_line_without_environment():
    r = run(b"HELO [1.2.3.4] x\r\n" + MSG, env={})
    assert r.queued[0][0].startswith(
        b"Received: from unknown (HELO [1.2.3.4]?x) (unknown)\n  by unknown with SMTP; ")


# ------------------------------------------------------------ splitting

SESSIONS = [
    b"EHLO c\r\n" + MSG + MSG.replace(b"Subject", b"..Received: x\r\nSubject") + b"QUIT\r\n",
    b"HELO c\nMAIL FROM:<a@b.c>\nRCPT TO:<u@example.com>\nDATA\n..x\r\n\r\r\n.\r\nNOOP\nQUIT\n",
    b"MAIL x\r\nRCPT <u@example.com>\r\nDATA\r\nbad\nline\r\n.\r\n",
    b"NOOP\r\nRSET\r\nVRFY\r\nHELP\r\nFOO\r\n\0\r\nDATA\r\nRCPT\r\nMAIL FROM:<\"a b\"@c>\r\n",
]


AUTH_SESSION = (b"EHLO c\r\nAUTH LOGIN\r\nam9l\r\nc2VjcmV0\r\nRSET\r\nAUTH PLAIN\r\n"
                b"AGpvZQBzZWNyZXQ=\r\n" + MSG.replace(b"u@example.com", b"x@other.org"))


@settings(max_examples=300, deadline=None)  # no timing: the machine is shared
@given(st.sampled_from(SESSIONS + [AUTH_SESSION]),
       st.lists(st.integers(min_value=1, max_value=200), max_size=8))
def test_input_split_anywhere_gives_the_same_output(session_bytes, cuts):
    def play(chunks):
        r = run(chunks, cfg=auth_config(b"!", plugins={b"r": [b"p"]}), checkpassword=joe,
                plugins={b"p": (b"HX-P: $SMTPRCPTTO\n", 0)})
        return r.output, r.queued, r.exit
    points = sorted({c % len(session_bytes) for c in cuts} - {0})
    chunks = [session_bytes[a:b] for a, b in zip([0] + points, points + [len(session_bytes)])]
    assert play(chunks) == play(session_bytes)


# ------------------------------------------------------------ plugins, AUTH, TLS in the core

def spp_config(**sections):
    return config(plugins={k.encode(): v for k, v in sections.items()})


def test_spp_rcpt_plugin_rejects_and_sees_counters():
    plugins = {b"p/r": (b"P250-seen\nE550 no\n", 0)}
    r = run(MSG, cfg=spp_config(r=[b"p/r"]), plugins=plugins)
    assert r.output == GREETING + b"250 ok\r\n250-seen\r\n550 no\r\n503 RCPT first (#5.5.1)\r\n" \
        + b"502 unimplemented (#5.5.1)\r\n" * 4
    env = r.plugin_envs[0]
    assert (env[b"SMTPRCPTTO"], env[b"SMTPRCPTCOUNT"], env[b"SMTPRCPTCOUNTALL"],
            env[b"SMTPRCPTHOSTSOK"]) == (b"u@example.com", b"0", b"1", b"1")


def test_spp_crash_after_output_gives_451_after_it():
    r = run(b"HELO x\r\n", cfg=spp_config(h=[b"p/h"]), plugins={b"p/h": (b"P250-a", rq.Signaled(11))})
    assert r.output == GREETING + b"250-a\r\n451 qmail-spp failure: p/h: child crashed (#4.3.0)\r\n"


def test_spp_headers_follow_received_and_are_reset():
    plugins = {b"p/m": (b"HX-A: 1\nH\n", 0)}
    r = run(MSG + MSG, cfg=spp_config(m=[b"p/m"]), plugins=plugins)
    assert r.queued[0][0] == RECEIVED + b"X-A: 1\nSubject: t\n\nhi\n"
    assert r.queued[1][0] == RECEIVED + b"X-A: 1\nSubject: t\n\nhi\n"


def auth_config(mode=b"", **kw):
    from qmail_smtpd_py.core.auth import parse_mode
    return config(auth_mode=parse_mode(mode), checkpassword=(b"/cp", b"/bin/true"), **kw)


def joe(data):
    return 0 if data.startswith(b"joe\0secret\0") else 1


def test_auth_login_dialogue_and_relay():
    r = run(b"AUTH LOGIN\r\nam9l\r\nc2VjcmV0\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@other.org>\r\n",
            cfg=auth_config(), checkpassword=joe)
    assert r.output == GREETING + b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" \
        b"235 ok, go ahead (#2.0.0)\r\n250 ok\r\n250 ok\r\n"
    assert r.checkpassword == [b"joe\0secret\0"]


def test_auth_failure_pauses_then_535_and_never_logs_the_password():
    r = run(b"AUTH PLAIN AGpvZQB3cm9uZw==\r\n", cfg=auth_config(), checkpassword=joe)
    assert r.output == GREETING + b"535 authentication failed (#5.7.1)\r\n"
    assert "slept 5" in r.log
    assert not any("wrong" in line for line in r.log)


def test_cram_md5_challenge_and_fd3_with_challenge_field():
    import base64
    import hashlib
    import hmac
    r = run(b"AUTH CRAM-MD5\r\n*\r\n", cfg=auth_config(b"+cram"))
    challenge = base64.b64decode(r.output.split(b"334 ")[1].split(b"\r\n")[0])
    assert challenge == b"<77.1795311213@mx.test>"
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
    answer = base64.b64encode(b"joe " + digest)
    r = run(b"AUTH CRAM-MD5\r\n" + answer + b"\r\n", cfg=auth_config(b"+cram"),
            checkpassword=lambda data: 0)
    assert r.checkpassword == [b"joe\0" + digest + b"\0" + challenge + b"\0"]


def test_starttls_discards_pipelined_input_and_resets_helo():
    cfg = config(tls=True)
    r = run([b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\n"
             b"DATA\r\n.\r\n"], cfg=cfg, handshake=rq.Secured(b"TLS_X"))
    assert r.output == GREETING + b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n" \
        b"250 8BITMIME\r\n220 ready for tls\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n" \
        b"250 ok 1795311213 qp 4242\r\n"
    assert r.queued[0][0].startswith(
        b"Received: from unknown (127.0.0.1)\n  by mx.test with ESMTPS (TLS_X encrypted); ")


def test_client_cert_relaying_in_tls():
    cfg = config(tls=True, tls_clients=frozenset({b"joe@example.com"}))
    tls = dict(tls_ready=rq.TLSReady(client_certs=True), handshake=rq.Secured(b"TLS_X"),
               certificate=rq.PeerCertificate((b"joe@example.com",)))
    r = run([b"STARTTLS\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@other.org>\r\nDATA\r\n.\r\n"],
            cfg=cfg, **tls)
    assert r.queued[0][0].split(b";")[0].endswith(b"ESMTPS (TLS_X encrypted)\n  (cert joe@example.com)")
    tls["certificate"] = rq.PeerCertificate(())
    r = run([b"STARTTLS\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@other.org>\r\n"], cfg=cfg, **tls)
    assert r.output.endswith(b"553 sorry, that domain isn't in my list of allowed rcpthosts; "
                             b"no valid cert for gatewaying: contains no email address (#5.7.1)\r\n")


def test_extfork_refusal_and_quitasap():
    env = {**BASE, b"SMTPEXTFORK": b"/x", b"XF_QUITASAP": b""}
    r = run(MSG, env=env, programs={b"/x": 100})
    assert r.output == GREETING + b"250 ok\r\n554 sorry, permanent envelope failure due to local " \
        b"policy (#5.7.1)\r\n"
    assert r.exit == 1 and "slept 2" in r.log


BASE = {b"TCPREMOTEIP": b"127.0.0.1", b"TCPLOCALIP": b"127.0.0.1", b"TCPLOCALHOST": b"mx.test"}


# ------------------------------------------------------------ fuzz

@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([
    b"HELO x\r\n", b"EHLO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<u@example.com>\r\n",
    b"DATA\r\n", b".\r\n", b"RSET\r\n", b"AUTH LOGIN\r\n", b"AUTH PLAIN\r\n", b"*\r\n",
    b"am9l\r\n", b"STARTTLS\r\n", b"\r\n", b"\n", b"\0", b"\xff", b"x", b"MAIL <", b".",
    b"AUTH CRAM-MD5\r\n", b"RCPT TO:<\"q\\\"@x\r\n", b"Received: x\r\n"]), max_size=30),
    st.sampled_from(["plain", "auth", "spp", "tls"]))
def test_fuzz_the_core_never_crashes_and_replies_in_lines(parts, flavour):
    cfg = {"plain": config(), "auth": auth_config(b"!+cram"),
           "spp": spp_config(c=[b"p"], h=[b"p"], m=[b"p"], r=[b"p"], d=[b"p"]),
           "tls": config(tls=True)}[flavour]
    r = run(b"".join(parts), cfg=cfg, plugins={b"p": (b"HX: y\nLD451 no\nP250-p\n", 0)},
            checkpassword=joe, handshake=rq.Secured(b"T"))
    assert r.exit in (0, 1)
    assert r.output.endswith(b"\r\n")
    assert all(line[:3].isdigit() for line in r.output.split(b"\r\n")[:-1])


def test_spp_headers_and_deferred_errors_are_bounded():
    from qmail_smtpd_py.core.spp import MAX_TEXT
    flood = b"HX-Flood: " + b"y" * 990 + b"\n"
    plugins = {b"p/r": (flood * 200 + b"LD451 " + b"z" * 200000 + b"\n", 0)}
    r = run(MSG, cfg=spp_config(r=[b"p/r"]), plugins=plugins)
    message = r.queued[0][0]
    assert MAX_TEXT - 1000 < message.count(b"X-Flood") * len(flood) < MAX_TEXT
    assert b"451 z" not in r.output  # the oversized LD line was not kept


def test_driver_answers_out_of_memory_with_qmails_421(monkeypatch):
    """spec §1: out of memory anywhere -> 421 out of memory (#4.3.0), exit 1."""
    import os

    from qmail_smtpd_py import driver

    def steps():
        yield rq.Send(b"220 x ESMTP\r\n")
        yield rq.NOW

    def exhausted(driver, request):
        raise MemoryError()

    monkeypatch.setitem(driver.Driver._HANDLERS, rq.Now, exhausted)
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    try:
        status = driver.Driver(5, "1 127.0.0.1 ", infd=r_in, outfd=w_out).run(steps())
        assert status == 1
        assert os.read(r_out, 4096) == b"220 x ESMTP\r\n421 out of memory (#4.3.0)\r\n"
    finally:
        for fd in (r_in, w_in, r_out, w_out):
            os.close(fd)

"""STARTTLS and SMTPS (qmail-smtpd.md §7, the netqmail TLS patch's wire behaviour).

Certificates are made here with the openssl command: a test CA, a server certificate
for mx.test / 127.0.0.1, and client certificates signed by that CA with a listed
e-mail address, an unlisted one and none, plus one with the listed address signed by
another CA.

Most tests run the installed server under the real tcpserver on a free loopback port
and talk to it with real TLS clients: swaks (--tls, --tlsc), openssl s_client,
smtplib's starttls() and SMTP_SSL, and a raw socket for the command-injection probe.
A few pipe-mode tests (run_smtp) pin the replies that need no handshake.

tcpserver runs with -R -H -l mx.test, so TCPREMOTEHOST is unset ("unknown") and a
Received line without HELO part reads `from unknown (127.0.0.1)`.
"""

import os
import re
import smtplib
import socket
import ssl
import subprocess

import pytest

from helpers import EnvQueue, norm, require_tools, run_smtp

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO_TLS = b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
READY = b"220 ready for tls\r\n"
NO_PARAMETERS = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
NOGATEWAY = b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
NOGWCERT = b"sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying"
AUTH_FIRST = b"538 auth not available without TLS (#5.3.3)\r\n"
MAIL_FIRST = b"530 Must issue a STARTTLS command first (#5.7.0)\r\n"
CA_NAME = "qmail-smtpd-py test CA"
JOE = "joe@client.test"
IO_TIMEOUT = 20


def received(protocol, helo=None, info=None):
    """The expected Received: header (date normalised) for a tcpserver connection."""
    return (b"Received: from unknown" + (b" (HELO " + helo + b")" if helo else b"")
            + b" (" + (info + b"@" if info else b"") + b"127.0.0.1)\n  by mx.test with "
            + protocol + b"; <DATE>\n")


def esmtps(cipher):
    return b"ESMTPS (" + cipher.encode() + b" encrypted)"


# ------------------------------------------------------------------ certificates


class Certs:
    """Paths of the PEM files; each client/server .pem holds certificate and key."""

    def __init__(self, d):
        self.dir = d
        self.ca = str(d / "ca.pem")
        self.server = str(d / "server.pem")         # cert + key, for control/servercert.pem
        self.server_crt = str(d / "server.crt")
        self.joe = str(d / "joe.pem")               # emailAddress joe@client.test (listed)
        self.stranger = str(d / "stranger.pem")     # emailAddress stranger@client.test
        self.anon = str(d / "anon.pem")             # no emailAddress
        self.rogue = str(d / "rogue.pem")           # joe@client.test, signed by another CA
        self.revoked = str(d / "revoked.pem")       # joe@client.test, revoked in crl.pem
        self.crl = str(d / "crl.pem")
        self.joe_key = str(d / "joe.key")

    def read(self, name):
        with open(getattr(self, name), "rb") as f:
            return f.read()


def _openssl(d, *args):
    p = subprocess.run(["openssl", *args], cwd=str(d), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.returncode == 0, p.stdout


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    require_tools("openssl")
    d = tmp_path_factory.mktemp("certs")
    (d / "server.ext").write_text("subjectAltName=DNS:mx.test,IP:127.0.0.1\n"
                                  "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    # The server's key is RSA (the ECDHE-RSA suites); the others are P-256, which
    # is quick to make (each pytest worker makes its own set).
    ec = ("ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    for ca, cn in (("ca", CA_NAME), ("rogueca", "some other CA")):
        _openssl(d, "req", "-x509", "-newkey", *ec, "-nodes", "-keyout", ca + ".key",
                 "-out", ca + ".pem", "-days", "30", "-subj", "/CN=" + cn,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    issued = (("server", "/CN=mx.test", "server.ext", "ca"),
              ("joe", "/CN=Joe/emailAddress=" + JOE, "client.ext", "ca"),
              ("stranger", "/CN=Stranger/emailAddress=stranger@client.test", "client.ext", "ca"),
              ("anon", "/CN=Anonymous client", "client.ext", "ca"),
              ("rogue", "/CN=Joe/emailAddress=" + JOE, "client.ext", "rogueca"),
              ("revoked", "/CN=Joe/emailAddress=" + JOE, "client.ext", "ca"))
    for serial, (name, subject, ext, ca) in enumerate(issued, 1):
        key = ("rsa:2048",) if name == "server" else ec
        _openssl(d, "req", "-newkey", *key, "-nodes", "-keyout", name + ".key",
                 "-out", name + ".csr", "-subj", subject)
        _openssl(d, "x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey",
                 ca + ".key", "-set_serial", str(serial), "-days", "30", "-out",
                 name + ".crt", "-extfile", ext)
        (d / (name + ".pem")).write_bytes((d / (name + ".crt")).read_bytes()
                                          + (d / (name + ".key")).read_bytes())
    # control/clientcrl.pem material: the CA revokes the "revoked" certificate.
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text("[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\n"
                              "crlnumber=crlnumber\ndefault_md=sha256\ndefault_crl_days=30\n")
    _openssl(d, "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
             "-revoke", "revoked.crt")
    _openssl(d, "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
             "-gencrl", "-out", "crl.pem")
    return Certs(d)


def client_context(certs, cert=None, max_version=None, ciphers=None):
    """A verifying client context (trusts the test CA), optionally with a client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.ca)
    if cert:
        ctx.load_cert_chain(cert)
    if max_version:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@pytest.fixture
def tls_home(make_home, certs):
    """The default home plus control/servercert.pem."""
    return make_home(control={"servercert.pem": certs.read("server")})


@pytest.fixture
def cert_home(make_home, certs):
    """servercert.pem, clientca.pem (the test CA) and tlsclients listing joe."""
    return make_home(control={"servercert.pem": certs.read("server"),
                              "clientca.pem": certs.read("ca"),
                              "tlsclients": JOE + "\n"})


# ------------------------------------------------------------------ tcpserver clients


def smtp(server, **kw):
    return smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test",
                        timeout=IO_TIMEOUT, **kw)


def swaks(server, *args):
    require_tools("swaks")
    p = subprocess.run(["perl", "-MIO::Socket::SSL", "-MNet::SSLeay", "-e", "1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if p.returncode != 0:
        why = "swaks TLS needs libio-socket-ssl-perl and libnet-ssleay-perl"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % server.port, "--from", "a@b.c",
                        "--helo", "client.test", "--timeout", str(IO_TIMEOUT), *args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    return p.returncode, p.stdout


def swaks_cipher(transcript):
    """The cipher name from swaks' `=== TLS started with cipher VERSION:CIPHER:BITS`."""
    m = re.search(rb"TLS started with cipher [^:\s]+:([^:\s]+):", transcript)
    assert m, transcript
    return m.group(1).decode()


class Raw:
    """A line-oriented SMTP client on a plain socket that can switch to TLS."""

    def __init__(self, server):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
        self.buf = b""

    def reply(self):
        """One complete SMTP reply (all its lines), as bytes."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed; pending %r, reply so far %r"
                                   % (self.buf, out))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def send(self, data):
        self.sock.sendall(data)

    def rest(self):
        """Everything until the server closes the connection."""
        data = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def starttls(self, ctx):
        assert self.buf == b"", "server sent %r before the handshake" % self.buf
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test")

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ pipe mode: no handshake


def test_pipe_ehlo_offers_starttls_right_after_the_greeting_line(tls_home):
    r = run_smtp(b"EHLO c.test\r\nHELO c.test\r\nQUIT\r\n", home=tls_home)
    assert r.out == (GREETING + EHLO_TLS + b"250 mx.example.org\r\n"
                     + b"221 mx.example.org\r\n")
    assert r.status == 0


def test_pipe_ehlo_with_auth_keeps_starttls_second(tls_home):
    r = run_smtp(b"EHLO c.test\r\nQUIT\r\n", home=tls_home, env={"SMTPAUTH": ""},
                 args=("/bin/false", "/bin/true"))
    assert r.out == (GREETING + b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                     b"250-8BITMIME\r\n250-AUTH LOGIN PLAIN\r\n250 SIZE 0\r\n"
                     b"221 mx.example.org\r\n")


def test_pipe_without_certificate_starttls_is_unimplemented(home):
    """No servercert.pem: plain notqmail (no STARTTLS line, 502, nothing discarded)."""
    r = run_smtp(b"EHLO c.test\r\nSTARTTLS\r\nNOOP\r\nQUIT\r\n", home=home)
    assert r.out == (GREETING + EHLO_PLAIN + UNIMPLEMENTED + b"250 ok\r\n"
                     + b"221 mx.example.org\r\n")
    assert r.status == 0


def test_pipe_starttls_with_argument_is_501_and_drops_pipelined_input(tls_home):
    r = run_smtp(b"EHLO c.test\r\nSTARTTLS now\r\nNOOP\r\nQUIT\r\n", home=tls_home)
    # NOOP and QUIT were buffered behind STARTTLS: discarded, then EOF.
    assert r.out == GREETING + EHLO_TLS + NO_PARAMETERS
    assert r.status == 1


def test_pipe_broken_certificate_is_454_and_drops_pipelined_input(make_home):
    home = make_home(control={"servercert.pem": "this is not a certificate\n"})
    r = run_smtp(b"EHLO c.test\r\nSTARTTLS\r\nNOOP\r\n", home=home)
    assert r.out.startswith(GREETING + EHLO_TLS + b"454 TLS missing certificate: "), r.out
    assert r.out.endswith(b" (#4.3.0)\r\n") and r.out.count(b"\r\n") == 6, r.out
    assert r.status == 1  # the EOF after the discarded NOOP, not the 454


def test_pipe_certificate_error_reason_is_the_openssl_error_string(make_home):
    """§7: `454 TLS missing certificate: <OpenSSL error string> (#4.3.0)`, e.g.
    `error:0480006C:PEM routines::no start line` (OpenSSL 1.1 adds the function name)."""
    home = make_home(control={"servercert.pem": "this is not a certificate\n"})
    r = run_smtp(b"STARTTLS\r\n", home=home)
    assert re.fullmatch(GREETING + rb"454 TLS missing certificate: error:[0-9A-F]{8}:"
                        rb"PEM routines:[A-Za-z_]*:no start line \(#4\.3\.0\)\r\n", r.out), r.out


def test_pipe_certificate_without_key_is_454(make_home, certs):
    home = make_home(control={"servercert.pem": certs.read("server_crt")})
    r = run_smtp(b"STARTTLS\r\n", home=home)
    assert re.fullmatch(GREETING + rb"454 TLS (missing certificate|no valid RSA private key)"
                        rb": [^\r\n]+ \(#4\.3\.0\)\r\n", r.out), r.out


def test_pipe_certificate_with_wrong_key_is_no_valid_rsa_private_key(make_home, certs):
    home = make_home(control={"servercert.pem": certs.read("server_crt")
                              + certs.read("joe_key")})
    r = run_smtp(b"STARTTLS\r\n", home=home)
    assert re.fullmatch(GREETING + rb"454 TLS no valid RSA private key: [^\r\n]+ \(#4\.3\.0\)\r\n",
                        r.out), r.out


def test_pipe_handshake_at_eof_fails_with_454_and_exit_1(tls_home):
    """Whatever follows STARTTLS in the same write is discarded plaintext; the handshake
    then meets EOF: 454 in clear, exit 1, nothing queued."""
    r = run_smtp(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\nSTARTTLS\r\n"
                 b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n", home=tls_home)
    assert r.out.startswith(GREETING + b"250 ok\r\n250 ok\r\n" + READY
                            + b"454 TLS connection failed: "), r.out
    assert r.out.endswith(b" (#4.3.0)\r\n") and r.out.count(b"\r\n") == 5, r.out
    assert r.status == 1
    assert r.queued == [] and tls_home.queue.runs() == 0


def test_pipe_smtps_with_broken_certificate_exits_before_the_greeting(make_home):
    home = make_home(control={"servercert.pem": "garbage\n"})
    r = run_smtp(b"EHLO c.test\r\n", home=home, env={"SMTPS": ""})
    assert re.fullmatch(rb"454 TLS missing certificate: [^\r\n]+ \(#4\.3\.0\)\r\n", r.out), r.out
    assert r.status == 1


def test_pipe_forcetls_hides_auth_before_tls(tls_home):
    r = run_smtp(b"EHLO c.test\r\nAUTH PLAIN AGpvZQBzZWNyZXQ=\r\nAUTH LOGIN\r\nQUIT\r\n",
                 home=tls_home, env={"SMTPAUTH": "", "FORCETLS": "1"},
                 args=("/bin/true", "/bin/true"))
    assert r.out == (GREETING + b"250-mx.example.org\r\n250-STARTTLS\r\n250-PIPELINING\r\n"
                     b"250-8BITMIME\r\n250 SIZE 0\r\n" + AUTH_FIRST + AUTH_FIRST
                     + b"221 mx.example.org\r\n")


def test_pipe_tlsrequired_refuses_mail_before_tls(tls_home):
    r = run_smtp(b"EHLO c.test\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\nQUIT\r\n",
                 home=tls_home, env={"TLSREQUIRED": "1"})
    assert r.out == (GREETING + EHLO_TLS + MAIL_FIRST + b"503 MAIL first (#5.5.1)\r\n"
                     + b"221 mx.example.org\r\n")


def test_pipe_without_policies_mail_and_auth_work_in_clear(tls_home):
    r = run_smtp(b"EHLO c.test\r\nAUTH PLAIN AGpvZQBzZWNyZXQ=\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n",
                 home=tls_home, env={"SMTPAUTH": ""}, args=("/bin/true", "/bin/true"))
    assert b"250-AUTH LOGIN PLAIN\r\n" in r.out
    assert r.out.endswith(b"235 ok, go ahead (#2.0.0)\r\n250 ok\r\n221 mx.example.org\r\n")


# ------------------------------------------------------------------ real clients: STARTTLS


def test_swaks_starttls_delivers_with_esmtps(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home)
    status, transcript = swaks(server, "--tls", "--tls-verify", "--tls-ca-path", certs.ca,
                               "--to", "u@example.com", "--header", "Subject: over tls",
                               "--body", "secret body")
    assert status == 0, transcript
    assert (b"<-  250-mx.example.org\n<-  250-STARTTLS\n<-  250-PIPELINING\n"
            b"<-  250 8BITMIME\n -> STARTTLS\n<-  220 ready for tls\n") in transcript
    # inside TLS: EHLO again, without STARTTLS
    assert (b" ~> EHLO client.test\n<~  250-mx.example.org\n<~  250-PIPELINING\n"
            b"<~  250 8BITMIME\n") in transcript
    (msg,) = tls_home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"
    assert norm(msg.received) == received(esmtps(swaks_cipher(transcript)), b"client.test")
    assert b"\n\nsecret body\n" in msg.message


def test_openssl_s_client_starttls(tcpservers, tls_home, certs):
    require_tools("openssl")
    server = tcpservers.start(tls_home)
    p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % server.port,
                        "-starttls", "smtp", "-CAfile", certs.ca, "-verify_return_error",
                        "-verify_hostname", "mx.test", "-quiet", "-crlf"],
                       input=b"EHLO s.client.test\nNOOP\nQUIT\n", capture_output=True,
                       timeout=60)
    # (s_client itself echoes the last line of the clear-text EHLO reply first.)
    assert (EHLO_PLAIN + b"250 ok\r\n221 mx.example.org\r\n") in p.stdout, (p.stdout, p.stderr)
    assert server.statuses(1) == [0]


def test_smtplib_starttls_received_and_helo_reset(tcpservers, tls_home, certs):
    """After the handshake the HELO is forgotten: a message sent without a new EHLO has
    no HELO part; after EHLO again it has the new name. Protocol ESMTPS (cipher)."""
    server = tcpservers.start(tls_home)
    with smtp(server) as s:
        code, text = s.ehlo()
        assert (code, text) == (250, b"mx.example.org\nSTARTTLS\nPIPELINING\n8BITMIME")
        assert s.starttls(context=client_context(certs)) == (220, b"ready for tls")
        cipher = s.sock.cipher()[0]
        assert s.mail("a@b.c") == (250, b"ok")
        assert s.rcpt("u@example.com") == (250, b"ok")
        assert s.data(b"Subject: one\r\n\r\nfirst\r\n")[0] == 250
        assert s.ehlo("again.test") == (250, b"mx.example.org\nPIPELINING\n8BITMIME")
        assert s.sendmail("a@b.c", ["v@example.com"], b"Subject: two\r\n\r\nsecond\r\n") == {}
    first, second = tls_home.queued()
    assert norm(first.received) == received(esmtps(cipher))
    assert norm(second.received) == received(esmtps(cipher), b"again.test")
    assert first.body == b"Subject: one\n\nfirst\n"
    assert second.envelope == b"Fa@b.c\0Tv@example.com\0\0"


def test_starttls_twice_is_502_and_session_goes_on(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home)
    with smtp(server) as s:
        s.ehlo()
        assert s.starttls(context=client_context(certs)) == (220, b"ready for tls")
        assert s.docmd("STARTTLS") == (502, b"unimplemented (#5.5.1)")
        assert s.docmd("STARTTLS", "x") == (501, b"Syntax error (no parameters allowed) (#5.5.4)")
        assert s.noop() == (250, b"ok")
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: s\r\n\r\nx\r\n") == {}
    assert len(tls_home.queued()) == 1


def test_starttls_with_argument_then_real_starttls(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home)
    raw = Raw(server)
    try:
        assert raw.reply() == GREETING
        raw.send(b"STARTTLS please\r\n")
        assert raw.reply() == NO_PARAMETERS
        raw.send(b"STARTTLS\r\n")
        assert raw.reply() == READY
        raw.starttls(client_context(certs))
        raw.send(b"NOOP\r\n")
        assert raw.reply() == b"250 ok\r\n"
        raw.send(b"QUIT\r\n")
        assert raw.reply() == b"221 mx.example.org\r\n"
    finally:
        raw.close()


def test_open_transaction_survives_starttls(tcpservers, tls_home, certs):
    """§7: the handshake resets the HELO, not the MAIL already given."""
    server = tcpservers.start(tls_home)
    raw = Raw(server)
    try:
        assert raw.reply() == GREETING
        raw.send(b"MAIL FROM:<early@b.c>\r\n")
        assert raw.reply() == b"250 ok\r\n"
        raw.send(b"STARTTLS\r\n")
        assert raw.reply() == READY
        raw.starttls(client_context(certs))
        raw.send(b"RCPT TO:<u@example.com>\r\n")
        assert raw.reply() == b"250 ok\r\n"
        raw.send(b"DATA\r\n")
        assert raw.reply() == b"354 go ahead\r\n"
        raw.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        assert raw.reply().startswith(b"250 ok ")
        raw.send(b"QUIT\r\n")
        assert raw.reply() == b"221 mx.example.org\r\n"
    finally:
        raw.close()
    (msg,) = tls_home.queued()
    assert msg.envelope == b"Fearly@b.c\0Tu@example.com\0\0"
    assert norm(msg.received).startswith(b"Received: from unknown (127.0.0.1)\n  by mx.test "
                                         b"with ESMTPS (")


def test_pipelined_command_after_starttls_is_not_executed(tcpservers, tls_home, certs):
    """The command-injection probe: NOOP written together with STARTTLS must not be
    answered inside TLS; the first reply after the handshake is the EHLO's."""
    server = tcpservers.start(tls_home)
    raw = Raw(server)
    try:
        assert raw.reply() == GREETING
        raw.send(b"EHLO c.test\r\n")
        assert raw.reply() == EHLO_TLS
        raw.send(b"STARTTLS\r\nNOOP\r\n")
        assert raw.reply() == READY
        raw.starttls(client_context(certs))
        raw.send(b"EHLO c.test\r\n")
        assert raw.reply() == EHLO_PLAIN
        raw.send(b"QUIT\r\n")
        assert raw.reply() == b"221 mx.example.org\r\n"
    finally:
        raw.close()
    assert server.statuses(1) == [0]


def test_pipelined_mail_transaction_after_starttls_is_not_queued(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home)
    raw = Raw(server)
    try:
        assert raw.reply() == GREETING
        raw.send(b"STARTTLS\r\nMAIL FROM:<evil@b.c>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
                 b"Subject: injected\r\n\r\nx\r\n.\r\n")
        assert raw.reply() == READY
        raw.starttls(client_context(certs))
        raw.send(b"RCPT TO:<u@example.com>\r\n")
        assert raw.reply() == b"503 MAIL first (#5.5.1)\r\n"
        raw.send(b"QUIT\r\n")
        assert raw.reply() == b"221 mx.example.org\r\n"
    finally:
        raw.close()
    assert server.statuses(1) == [0]
    assert tls_home.queue.runs() == 0


def test_broken_certificate_454_then_session_continues_in_clear(tcpservers, make_home):
    home = make_home(control={"servercert.pem": "-----BEGIN CERTIFICATE-----\nnope\n"})
    server = tcpservers.start(home)
    with smtp(server) as s:
        code, text = s.ehlo()
        assert code == 250 and b"\nSTARTTLS\n" in text  # advertised: the file exists
        code, text = s.docmd("STARTTLS")
        assert code == 454 and text.startswith(b"TLS missing certificate: "), text
        assert text.endswith(b" (#4.3.0)")
        assert s.noop() == (250, b"ok")
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: clear\r\n\r\nx\r\n") == {}
    (msg,) = home.queued()
    assert norm(msg.received) == received(b"SMTP", b"client.test")  # qmail never says ESMTP
    assert server.statuses(1) == [0]


def test_handshake_failure_is_454_in_clear_and_exit_1(tcpservers, tls_home):
    server = tcpservers.start(tls_home)
    raw = Raw(server)
    try:
        assert raw.reply() == GREETING
        raw.send(b"MAIL FROM:<a@b.c>\r\n")
        assert raw.reply() == b"250 ok\r\n"
        raw.send(b"RCPT TO:<u@example.com>\r\n")
        assert raw.reply() == b"250 ok\r\n"
        raw.send(b"STARTTLS\r\n")
        assert raw.reply() == READY
        raw.send(b"GARBAGE, NOT A CLIENT HELLO\r\n")
        rest = raw.rest()
    finally:
        raw.close()
    assert re.fullmatch(rb"454 TLS connection failed: [^\r\n]+ \(#4\.3\.0\)\r\n", rest), rest
    assert server.statuses(1) == [256]
    assert tls_home.queue.runs() == 0


def test_handshake_failure_on_client_cipher_mismatch(tcpservers, make_home, certs):
    home = make_home(control={"servercert.pem": certs.read("server"),
                              "tlsserverciphers": "ECDHE-RSA-AES128-GCM-SHA256\n"})
    server = tcpservers.start(home)
    ctx = client_context(certs, max_version=ssl.TLSVersion.TLSv1_2,
                         ciphers="ECDHE-RSA-CHACHA20-POLY1305")
    with smtp(server) as s:
        s.ehlo()
        with pytest.raises(ssl.SSLError):
            s.starttls(context=ctx)
    assert server.statuses(1) == [256]
    assert b"TLS handshake failed" in server.log_text()


def test_tlsserverciphers_lines_joined_and_tlsciphers_overrides(tcpservers, make_home, certs):
    home = make_home(control={"servercert.pem": certs.read("server"),
                              "tlsserverciphers": "ECDHE-RSA-AES256-GCM-SHA384\n"
                                                  "ECDHE-RSA-AES128-GCM-SHA256\n"})
    by_file = tcpservers.start(home)
    by_env = tcpservers.start(home, env={"TLSCIPHERS": "ECDHE-RSA-CHACHA20-POLY1305"})

    def deliver(server, cipher):
        ctx = client_context(certs, max_version=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
        with smtp(server) as s:
            s.ehlo()
            s.starttls(context=ctx)
            assert s.sock.cipher()[0] == cipher
            assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: c\r\n\r\nx\r\n") == {}

    deliver(by_file, "ECDHE-RSA-AES128-GCM-SHA256")  # the second line of the file
    deliver(by_env, "ECDHE-RSA-CHACHA20-POLY1305")
    with smtp(by_env) as s:  # TLSCIPHERS replaces the file's list
        s.ehlo()
        with pytest.raises(ssl.SSLError):
            s.starttls(context=client_context(certs, max_version=ssl.TLSVersion.TLSv1_2,
                                              ciphers="ECDHE-RSA-AES128-GCM-SHA256"))
    first, second = home.queued()
    assert norm(first.received) == received(b"ESMTPS (ECDHE-RSA-AES128-GCM-SHA256 encrypted)",
                                            b"client.test")
    assert norm(second.received) == received(b"ESMTPS (ECDHE-RSA-CHACHA20-POLY1305 encrypted)",
                                             b"client.test")


# ------------------------------------------------------------------ SMTPS (port-465 style)


def test_swaks_smtps_delivers_with_esmtps(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home, env={"SMTPS": ""})
    status, transcript = swaks(server, "--tlsc", "--tls-verify", "--tls-ca-path", certs.ca,
                               "--to", "u@example.com", "--body", "implicit tls")
    assert status == 0, transcript
    assert b"<~  220 mx.example.org ESMTP" in transcript  # the greeting came over TLS
    assert b"<~  250-mx.example.org" in transcript
    assert b"STARTTLS" not in transcript
    (msg,) = tls_home.queued()
    assert norm(msg.received) == received(esmtps(swaks_cipher(transcript)), b"client.test")


def test_smtplib_smtp_ssl(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home, env={"SMTPS": ""})
    with smtplib.SMTP_SSL("127.0.0.1", server.port, local_hostname="client.test",
                          timeout=IO_TIMEOUT, context=client_context(certs)) as s:
        cipher = s.sock.cipher()[0]
        assert s.ehlo() == (250, b"mx.example.org\nPIPELINING\n8BITMIME")
        assert s.docmd("STARTTLS") == (502, b"unimplemented (#5.5.1)")
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: ssl\r\n\r\nx\r\n") == {}
    (msg,) = tls_home.queued()
    assert norm(msg.received) == received(esmtps(cipher), b"client.test")


def test_smtps_plaintext_client_gets_no_greeting(tcpservers, tls_home):
    server = tcpservers.start(tls_home, env={"SMTPS": ""})
    raw = Raw(server)
    try:
        raw.send(b"EHLO c.test\r\n")
        rest = raw.rest()
    finally:
        raw.close()
    assert GREETING not in rest and b"250" not in rest
    assert re.fullmatch(rb"454 TLS connection failed: [^\r\n]+ \(#4\.3\.0\)\r\n", rest), rest
    assert server.statuses(1) == [256]


# ------------------------------------------------------------------ client certificates


def relay_attempt(server, certs, cert, home=None):
    """STARTTLS (with cert), MAIL, RCPT outside rcpthosts: the RCPT reply; when accepted,
    the message is sent too."""
    with smtp(server) as s:
        s.ehlo()
        assert s.starttls(context=client_context(certs, cert))[0] == 220
        s.ehlo()
        assert s.mail("a@b.c") == (250, b"ok")
        reply = s.rcpt("u@elsewhere.org")
        if reply[0] == 250:
            assert s.rcpt("v@another.org") == (250, b"ok")  # granted for the session
            assert s.data(b"Subject: relayed\r\n\r\nhi\r\n")[0] == 250
        else:
            assert s.rcpt("u@example.com") == (250, b"ok")  # local mail still fine
            assert s.data(b"Subject: local\r\n\r\nhi\r\n")[0] == 250
        return reply, s.sock.cipher()[0]


def test_listed_client_certificate_allows_relaying(tcpservers, cert_home, certs):
    queue = EnvQueue(cert_home)
    server = tcpservers.start(cert_home, env={"QMAILQUEUE": queue.path})
    reply, cipher = relay_attempt(server, certs, certs.joe)
    assert reply == (250, b"ok")
    (msg,) = cert_home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@elsewhere.org\0Tv@another.org\0\0"
    assert norm(msg.message).startswith(
        b"Received: from unknown (HELO client.test) (127.0.0.1)\n  by mx.test with "
        + esmtps(cipher) + b"\n  (cert " + JOE.encode() + b"); <DATE>\n"
        + b"Subject: relayed\n")
    assert queue.environ().get(b"RELAYCLIENT") == b""


def test_swaks_with_listed_client_certificate_relays(tcpservers, cert_home, certs):
    server = tcpservers.start(cert_home)
    status, transcript = swaks(server, "--tls", "--tls-cert", certs.joe, "--tls-key",
                               certs.joe_key, "--to", "u@elsewhere.org")
    assert status == 0, transcript
    (msg,) = cert_home.queued()
    assert msg.recipients == [b"u@elsewhere.org"]
    assert b"\n  (cert joe@client.test); " in msg.message


@pytest.mark.parametrize("cert, reason", [
    ("stranger", b": email address not in my list of tlsclients"),
    ("anon", b": contains no email address"),
    (None, b""),
])
def test_client_certificate_refusals(tcpservers, cert_home, certs, cert, reason):
    queue = EnvQueue(cert_home)
    server = tcpservers.start(cert_home, env={"QMAILQUEUE": queue.path})
    reply, cipher = relay_attempt(server, certs, cert and getattr(certs, cert))
    assert reply == (553, NOGWCERT + reason + b" (#5.7.1)")
    (msg,) = cert_home.queued()  # the local message
    assert msg.recipients == [b"u@example.com"]
    assert norm(msg.received) == received(esmtps(cipher), b"client.test")
    assert b"RELAYCLIENT" not in queue.environ()


def test_refused_certificate_is_judged_once(tcpservers, cert_home, certs):
    """Only the first refused RCPT looks at the certificate: listing its address
    afterwards does not help within the same connection (the next one relays)."""
    server = tcpservers.start(cert_home)
    expected = (553, NOGWCERT + b": email address not in my list of tlsclients (#5.7.1)")
    with smtp(server) as s:
        s.ehlo()
        s.starttls(context=client_context(certs, certs.stranger))
        s.ehlo()
        s.mail("a@b.c")
        assert s.rcpt("u@elsewhere.org") == expected
        cert_home.control("tlsclients", JOE + "\nstranger@client.test\n")
        assert s.rcpt("v@elsewhere.org") == expected
    reply, _ = relay_attempt(server, certs, certs.stranger)
    assert reply == (250, b"ok")


def test_relaying_by_certificate_needs_tls(tcpservers, cert_home):
    server = tcpservers.start(cert_home)
    with smtp(server) as s:
        s.ehlo()
        s.mail("a@b.c")
        assert s.rcpt("u@elsewhere.org") == (553, NOGATEWAY)


def test_without_tlsclients_a_certificate_does_not_relay(tcpservers, make_home, certs):
    home = make_home(control={"servercert.pem": certs.read("server"),
                              "clientca.pem": certs.read("ca")})
    server = tcpservers.start(home)
    reply, _ = relay_attempt(server, certs, certs.joe)
    assert reply == (553, NOGWCERT + b" (#5.7.1)")


def test_client_certificate_is_asked_for_only_with_clientca_and_tlsclients(
        tcpservers, cert_home, tls_home, certs):
    """s_client prints the CertificateRequest's signature algorithms only when the server
    sent one; without a client certificate the handshake still succeeds (not required)."""
    require_tools("openssl")

    def s_client(server):
        p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % server.port,
                            "-starttls", "smtp", "-CAfile", certs.ca, "-verify_return_error",
                            "-crlf", "-ign_eof"],
                           input=b"QUIT\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60)
        assert b"221 mx.example.org" in p.stdout, p.stdout
        return p.stdout

    assert b"Requested Signature Algorithms" in s_client(tcpservers.start(cert_home))
    assert b"Requested Signature Algorithms" not in s_client(tcpservers.start(tls_home))


def test_untrusted_client_certificate_gets_553_with_verify_error(tcpservers, cert_home, certs):
    """§7: a certificate that does not verify against clientca.pem is no reason to drop
    the connection; the refused RCPT says why (the X509 verify error text) and local mail
    is still accepted."""
    server = tcpservers.start(cert_home)
    reply, _ = relay_attempt(server, certs, certs.rogue)
    assert reply == (553, NOGWCERT + b": unable to get local issuer certificate (#5.7.1)")
    assert len(cert_home.queued()) == 1


@pytest.mark.parametrize("cert, reply", [
    ("joe", (250, b"ok")),
    ("revoked", (553, NOGWCERT + b": certificate revoked (#5.7.1)")),
])
def test_clientcrl_revokes_client_certificates(tcpservers, cert_home, certs, cert, reply):
    """§7: control/clientcrl.pem (CRLs for the client certificates) is checked."""
    cert_home.control("clientcrl.pem", certs.read("crl"))
    server = tcpservers.start(cert_home)
    assert relay_attempt(server, certs, getattr(certs, cert))[0] == reply
    assert len(cert_home.queued()) == 1


# ------------------------------------------------------------------ policies and AUTH in TLS

CHECKPASSWORD = """#!/bin/sh
# fake checkpassword: accepts joe/secret (fd 3: user NUL password NUL ...)
data=$(tr '\\0' '\\n' <&3 | head -n 2 | tr '\\n' ' ')
[ "$data" = "joe secret " ] || exit 1
exec "$@"
"""


def checkpassword(home):
    path = os.path.join(home.root, "checkpassword")
    with open(path, "w") as f:
        f.write(CHECKPASSWORD)
    os.chmod(path, 0o755)
    return path


def test_forcetls_auth_only_inside_tls_and_esmtpa_wins(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home, env={"SMTPAUTH": "", "FORCETLS": "1"},
                           args=(checkpassword(tls_home), "/bin/true"))
    with smtp(server) as s:
        code, text = s.ehlo()
        assert code == 250 and b"AUTH" not in text and b"STARTTLS" in text
        assert s.docmd("AUTH", "PLAIN AGpvZQBzZWNyZXQ=") == (
            538, b"auth not available without TLS (#5.3.3)")
        assert s.starttls(context=client_context(certs))[0] == 220
        code, text = s.ehlo()
        assert code == 250 and b"\nAUTH LOGIN PLAIN\n" in text and b"STARTTLS" not in text
        assert s.login("joe", "secret") == (235, b"ok, go ahead (#2.0.0)")
        assert s.sendmail("a@b.c", ["u@elsewhere.org"], b"Subject: auth\r\n\r\nx\r\n") == {}
    (msg,) = tls_home.queued()
    assert norm(msg.received) == received(b"ESMTPA", b"client.test", b"joe")


def test_auth_in_clear_without_forcetls(tcpservers, tls_home):
    server = tcpservers.start(tls_home, env={"SMTPAUTH": ""},
                           args=(checkpassword(tls_home), "/bin/true"))
    with smtp(server) as s:
        code, text = s.ehlo()
        assert b"\nSTARTTLS\n" in text and b"\nAUTH LOGIN PLAIN\n" in text
        assert s.login("joe", "secret")[0] == 235


def test_tlsrequired_mail_only_after_starttls(tcpservers, tls_home, certs):
    server = tcpservers.start(tls_home, env={"TLSREQUIRED": "1"})
    with smtp(server) as s:
        s.ehlo()
        assert s.mail("a@b.c") == (530, b"Must issue a STARTTLS command first (#5.7.0)")
        assert s.starttls(context=client_context(certs))[0] == 220
        cipher = s.sock.cipher()[0]
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: req\r\n\r\nx\r\n") == {}
    (msg,) = tls_home.queued()
    assert norm(msg.received) == received(esmtps(cipher), b"client.test")


# ------------------------------------------------------------------ the transport in-process


def memory_handshake(server_context, client_ctx):
    """A TLSConnection (the server side, as the driver runs it) against a client
    SSLObject, over memory: (server outcome, client SSLObject)."""
    from qmail_smtpd_py.tls import TLSConnection
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="mx.test")
    server = TLSConnection(server_context)

    def read_raw():  # the client's turn, then what it wrote
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return to_server.read() or b""

    outcome = server.handshake(read_raw, to_client.write)
    client.do_handshake()
    return outcome, server, client


def test_client_certificates_without_ctypes_access_fail_soft(cert_home, certs, monkeypatch):
    """If the SSL_CTX behind an SSLContext cannot be reached on some CPython,
    STARTTLS still works: no relaying by certificate, and one warning."""
    from qmail_smtpd_py import tls
    from qmail_smtpd_py.core import requests as rq

    def unreachable(*args):
        raise ssl.SSLError("cannot reach the SSL_CTX of the ssl module")

    monkeypatch.setattr(tls, "_ssl_ctx", unreachable)
    monkeypatch.chdir(cert_home.path)
    context, ready = tls.make_context(None, True)
    assert type(ready) is rq.TLSReady and ready.client_certs is False
    assert len(ready.warnings) == 1 and "client certificates not available" in ready.warnings[0]
    outcome, server, _ = memory_handshake(context, client_context(certs, cert=certs.joe))
    assert type(outcome) is rq.Secured
    assert server.client_certificate() == rq.NO_CERTIFICATE


def test_client_certificate_is_read_in_process(cert_home, certs, monkeypatch):
    from qmail_smtpd_py import tls
    from qmail_smtpd_py.core import requests as rq
    monkeypatch.chdir(cert_home.path)
    context, ready = tls.make_context(None, True)
    assert ready == rq.TLSReady(True, ())
    outcome, server, _ = memory_handshake(context, client_context(certs, cert=certs.joe))
    assert type(outcome) is rq.Secured
    assert server.client_certificate() == rq.PeerCertificate((JOE.encode(),), None)
    _, server, _ = memory_handshake(context, client_context(certs, cert=certs.rogue))
    certificate = server.client_certificate()
    assert certificate.emails == (JOE.encode(),) and certificate.verify_error  # not our CA


def test_tls_warning_is_logged_once_and_starttls_goes_on():
    from qmail_smtpd_py.core import requests as rq

    from world import config, run
    r = run([b"STARTTLS\r\n", b"QUIT\r\n"], cfg=config(tls=True, tls_clients=frozenset({b"j@x"})),
            tls_ready=rq.TLSReady(False, ("client certificates not available: x",)))
    assert r.log.count("TLS: client certificates not available: x") == 1
    assert r.output.endswith(b"220 ready for tls\r\n221 mx.example.org\r\n")
    assert not any(type(q) is rq.ClientCertificate for q in r.requests)


# ------------------------------------------------------------------ the sample cipher list

SAMPLE_CIPHERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "control", "tlsserverciphers")


def test_sample_tlsserverciphers_leaves_only_ecdhe_aead_suites(make_home, certs, monkeypatch):
    """The shipped control/tlsserverciphers, read by the real loader: for TLS 1.2 and
    below only ECDHE suites with AES-GCM or ChaCha20-Poly1305 remain (no CBC, which the
    default list keeps); TLS 1.3 keeps its own (AEAD) suites."""
    from qmail_smtpd_py import tls

    from world import load_config
    with open(SAMPLE_CIPHERS) as f:
        home = make_home(control={"servercert.pem": certs.read("server"),
                                  "tlsserverciphers": f.read()})
    cfg = load_config(home)
    monkeypatch.chdir(home.path)
    context, _ = tls.make_context(cfg.tls_ciphers, False)
    old = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert {c["name"] for c in old} == {
        "ECDHE-%s-%s" % (auth, cipher) for auth in ("ECDSA", "RSA")
        for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")}
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in old)
    assert any(c["protocol"] == "TLSv1.3" for c in context.get_ciphers())
    default, _ = tls.make_context(None, False)
    assert any(not c["aead"] for c in default.get_ciphers())  # what the sample is for


def test_sample_tlsserverciphers_refuses_a_cbc_client(tcpservers, make_home, certs):
    with open(SAMPLE_CIPHERS) as f:
        home = make_home(control={"servercert.pem": certs.read("server"),
                                  "tlsserverciphers": f.read()})
    server = tcpservers.start(home)
    with smtp(server) as s:
        s.ehlo()
        with pytest.raises(ssl.SSLError):
            s.starttls(context=client_context(certs, max_version=ssl.TLSVersion.TLSv1_2,
                                              ciphers="ECDHE-RSA-AES128-SHA256"))
    with smtp(server) as s:
        s.ehlo()
        s.starttls(context=client_context(certs, max_version=ssl.TLSVersion.TLSv1_2))
        name, version, _ = s.sock.cipher()
        assert version == "TLSv1.2"
        assert re.fullmatch(r"ECDHE-RSA-(AES128-GCM-SHA256|AES256-GCM-SHA384|CHACHA20-POLY1305)",
                            name), name


# ------------------------------------------------------------------ no session tickets

@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_no_session_tickets(servers, tls_home, certs, version):
    """Neither TLS 1.3 nor TLS 1.2 tickets, under tcpserver and in the pool: the EHLO
    after STARTTLS is read, so a ticket sent after the handshake would have arrived."""
    server = servers.start(tls_home)
    context = client_context(certs, max_version=ssl.TLSVersion[version])
    context.minimum_version = ssl.TLSVersion[version]
    with smtp(server) as s:
        s.ehlo()
        s.starttls(context=context)
        assert s.ehlo()[0] == 250
        assert s.sock.version() == version.replace("_", ".")
        assert not s.sock.session.has_ticket


def starttls_once(port, context, session=None):
    """One session: EHLO, STARTTLS offering session, EHLO, QUIT; the SSLSocket's
    (session_reused, session)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        while not f.readline().startswith(b"220 "):
            pass
        with context.wrap_socket(s, server_hostname="mx.test", session=session) as t:
            t.sendall(b"EHLO client.test\r\nQUIT\r\n")
            assert t.makefile("rb").read().endswith(b"221 mx.example.org\r\n")
            return t.session_reused, t.session


@pytest.mark.parametrize("mode", ["tcpserver", "pool"])
def test_tls12_resumption_by_session_id_only_in_the_same_worker(tcpservers, tls_home, certs,
                                                                mode):
    """Without tickets, a TLS 1.2 client that comes back resumes by session id only from
    the cache of the process that served it: never under tcpserver (one process per
    connection), in the pool when the same worker (here the only one) accepts."""
    options = ("--min-spare", "1", "--max-spare", "1") if mode == "pool" else ()
    server = tcpservers.start(tls_home, mode=mode, maxconn=1, options=options)
    context = client_context(certs, max_version=ssl.TLSVersion.TLSv1_2)
    reused, session = starttls_once(server.port, context)
    assert not reused and not session.has_ticket
    reused, _ = starttls_once(server.port, context, session)
    assert reused == (mode == "pool")

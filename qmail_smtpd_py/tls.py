"""TLS for the driver: the standard library's ssl over memory BIOs.

tcpserver hands us the connection as fd 0 and fd 1 (and the conformance
suite as two pipes), so ssl cannot wrap a socket object; an SSLObject with
MemoryBIOs does the protocol while we move the bytes with os.read/os.write
under the same timeouts as clear text.

Files, as the netqmail TLS patch: control/servercert.pem (certificate chain
and private key), control/tlsserverciphers (lines joined with ':'; TLSCIPHERS
overrides), control/dh2048.pem (optional DH parameters), control/clientca.pem
and control/tlsclients (client certificates whose e-mail address is listed
may relay).  Unlike the patch, which renegotiates at the first refused RCPT,
the client certificate is asked for (not required) in the first handshake.
"""

import os
import ssl

from .control import parse_lines, read_file

SERVERCERT = "control/servercert.pem"
CLIENTCA = "control/clientca.pem"


class TLSSetupError(Exception):
    """The reply text after '454 TLS ', e.g. b"missing certificate: ..."."""


def _reason(exc):
    return str(exc).encode("utf-8", "backslashreplace")


def make_context(environ):
    """The server context for this connection; raises TLSSetupError."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    except ssl.SSLError as e:
        raise TLSSetupError(b"unable to initialize ctx: " + _reason(e)) from None
    try:
        context.load_cert_chain(SERVERCERT)
    except (ssl.SSLError, OSError) as e:
        what = b"no valid RSA private key" if "KEY" in str(e).upper() else b"missing certificate"
        raise TLSSetupError(what + b": " + _reason(e)) from None
    ciphers = environ.get(b"TLSCIPHERS")
    if ciphers is None:
        lines = parse_lines(read_file("control/tlsserverciphers") or b"")
        ciphers = b":".join(lines) if lines else None
    try:
        if ciphers:
            context.set_ciphers(ciphers.decode("ascii", "replace"))
        if os.path.exists("control/dh2048.pem"):
            context.load_dh_params("control/dh2048.pem")
        clients = tls_clients()
        if clients is not None and os.path.exists(CLIENTCA):
            context.load_verify_locations(CLIENTCA)
            context.verify_mode = ssl.CERT_OPTIONAL
    except (ssl.SSLError, OSError) as e:
        raise TLSSetupError(b"unable to initialize ctx: " + _reason(e)) from None
    return context


def tls_clients():
    """The e-mail addresses of control/tlsclients, or None without the file."""
    data = read_file("control/tlsclients")
    return None if data is None else set(parse_lines(data))


class TLSConnection:
    """An SSLObject between the session's plain text and the raw fds."""

    def __init__(self, context):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def handshake(self, read_raw, write_raw):
        """Returns (True, cipher) or (False, reason).  read_raw() gives bytes,
        b"" at EOF or None on timeout; write_raw(bytes) sends them."""
        while True:
            try:
                self.ssl.do_handshake()
                write_raw(self.outgoing.read())
                return True, self.ssl.cipher()[0].encode("ascii")
            except ssl.SSLWantReadError:
                write_raw(self.outgoing.read())
                data = read_raw()
                if data is None:
                    return False, b"timed out"
                if not data:
                    return False, b"connection closed"
                self.incoming.write(data)
            except (ssl.SSLError, OSError) as e:
                try:
                    write_raw(self.outgoing.read())  # the alert, if any
                except OSError:
                    pass
                return False, _reason(e)

    def read(self, read_raw, write_raw, size):
        """Plain text: bytes, b"" at EOF, None on timeout."""
        while True:
            try:
                data = self.ssl.read(size)
                write_raw(self.outgoing.read())
                return data
            except ssl.SSLWantReadError:
                write_raw(self.outgoing.read())
                raw = read_raw()
                if raw is None:
                    return None
                if not raw:
                    return b""
                self.incoming.write(raw)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError:
                return b""

    def encrypt(self, data):
        self.ssl.write(data)
        return self.outgoing.read()

    def client_cert(self):
        """(email, reason) for relaying by client certificate."""
        clients = tls_clients()
        if clients is None or self.ssl.context.verify_mode != ssl.CERT_OPTIONAL:
            return None, None
        cert = self.ssl.getpeercert()
        if not cert:
            return None, None
        emails = [value for rdn in cert.get("subject", ()) for key, value in rdn
                  if key == "emailAddress"]
        if not emails:
            return None, b"contains no email address"
        email = emails[0].encode("utf-8", "backslashreplace")
        if email not in clients:
            return None, b"email address not in my list of tlsclients"
        return email, None

"""TLS for the driver: the standard library's ssl over memory BIOs.

tcpserver hands us the connection as fd 0 and fd 1 (and the conformance
suite as two pipes), so ssl cannot wrap a socket object; an SSLObject with
MemoryBIOs does the protocol while we move the bytes with os.read/os.write
under the same timeouts as clear text.

Files, as the netqmail TLS patch: control/servercert.pem (certificate chain
and private key), control/tlsserverciphers (lines joined with ':'; TLSCIPHERS
overrides), control/dh2048.pem (optional DH parameters), control/clientca.pem,
control/clientcrl.pem and control/tlsclients (client certificates whose
e-mail address is listed may relay).  Unlike the patch, which renegotiates at
the first refused RCPT, the client certificate is asked for (not required)
in the first handshake; as in the patch, a certificate that does not verify
never fails the handshake, its verification error is only remembered.
"""

import os
import ssl

from .control import parse_lines, read_file

SERVERCERT = "control/servercert.pem"
CLIENTCA = "control/clientca.pem"
CLIENTCRL = "control/clientcrl.pem"


class TLSSetupError(Exception):
    """The reply text after '454 TLS ', e.g. b"missing certificate: ..."."""


def _reason(exc):
    """OpenSSL's wording where the ssl module kept it ("PEM routines::no start line")."""
    library, reason = getattr(exc, "library", None), getattr(exc, "reason", None)
    if library and reason:
        text = "%s routines::%s" % (library, reason.lower().replace("_", " "))
    else:
        text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    return text.encode("utf-8", "backslashreplace")


def make_context(environ, log=lambda text: None):
    """The server context for this connection; raises TLSSetupError."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    except ssl.SSLError as e:
        raise TLSSetupError(b"unable to initialize ctx: " + _reason(e)) from None
    try:
        context.load_cert_chain(SERVERCERT)
    except (ssl.SSLError, OSError) as e:
        raise TLSSetupError(_certificate_error(e)) from None
    ciphers = environ.get(b"TLSCIPHERS")
    if ciphers is None:
        lines = parse_lines(read_file("control/tlsserverciphers") or b"")
        ciphers = b":".join(lines) if lines else None
    if ciphers:
        try:
            context.set_ciphers(ciphers.decode("ascii", "replace"))
        except ssl.SSLError as e:  # as the patch: keep the defaults (TLS 1.3 still works)
            log("TLS: cipher list %r not usable: %s" % (ciphers, e))
    try:
        if os.path.exists("control/dh2048.pem"):
            context.load_dh_params("control/dh2048.pem")
        if tls_clients() is not None and os.path.exists(CLIENTCA):
            context.load_verify_locations(CLIENTCA)
            if os.path.exists(CLIENTCRL):
                context.load_verify_locations(CLIENTCRL)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            context.verify_mode = ssl.CERT_OPTIONAL
            context.verify_errors = []
            context.verify_callback = _remember_verify_errors(context, context.verify_errors)
    except (ssl.SSLError, OSError) as e:
        raise TLSSetupError(b"unable to initialize ctx: " + _reason(e)) from None
    return context


def _libssl():
    """The libssl the ssl module is linked with, for the few calls it lacks."""
    import ctypes
    import _ssl
    return ctypes, ctypes.CDLL(_ssl.__file__)


def _ssl_ctx(ctypes, lib, context):
    """The SSL_CTX pointer an SSLContext wraps (the field after the object header)."""
    c_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    if lib.SSL_CTX_get_options(c_ctx) != context.options:
        raise ssl.SSLError("cannot reach the SSL_CTX of the ssl module")
    return c_ctx


def _certificate_error(exc):
    """The patch's 454 text for an unusable servercert.pem, with OpenSSL's
    error string (the ssl module keeps only its own summary): the patch's
    loading steps are replayed through libssl to read the error queue."""
    try:
        ctypes, lib = _libssl()
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # referenced while c_ctx is used
        c_ctx = _ssl_ctx(ctypes, lib, scratch)
        lib.ERR_get_error.restype = ctypes.c_ulong
        lib.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
        lib.SSL_CTX_use_certificate_chain_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_use_PrivateKey_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                    ctypes.c_int]
        lib.SSL_CTX_check_private_key.argtypes = [ctypes.c_void_p]
        for what, step in (
                (b"missing certificate",
                 lambda: lib.SSL_CTX_use_certificate_chain_file(c_ctx, SERVERCERT.encode())),
                (b"no valid RSA private key",
                 lambda: lib.SSL_CTX_use_PrivateKey_file(c_ctx, SERVERCERT.encode(), 1)),
                (b"no valid RSA private key", lambda: lib.SSL_CTX_check_private_key(c_ctx))):
            lib.ERR_clear_error()
            if step() != 1:
                code = lib.ERR_get_error()
                if not code:
                    return what
                text = ctypes.create_string_buffer(256)
                lib.ERR_error_string_n(code, text, len(text))
                return what + b": " + text.value
    except (OSError, AttributeError, ssl.SSLError):
        pass
    return b"missing certificate: " + _reason(exc)


def _remember_verify_errors(context, errors):
    """Ask for a client certificate without ever failing the handshake over
    it, as the patch's verify_cb: the first verification error is appended
    to errors instead.  The ssl module has no verify callback, so this sets
    one with libssl's SSL_CTX_set_verify, through ctypes.  Returns the
    callback object, which must stay referenced."""
    ctypes, lib = _libssl()
    c_ctx = _ssl_ctx(ctypes, lib, context)
    lib.X509_STORE_CTX_get_error.argtypes = [ctypes.c_void_p]
    lib.X509_verify_cert_error_string.argtypes = [ctypes.c_long]
    lib.X509_verify_cert_error_string.restype = ctypes.c_char_p

    def verify(ok, store):
        if not ok and not errors:
            errors.append(lib.X509_verify_cert_error_string(lib.X509_STORE_CTX_get_error(store)))
        return 1

    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(verify)
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, type(callback)]
    lib.SSL_CTX_set_verify(c_ctx, 1, callback)  # SSL_VERIFY_PEER, not FAIL_IF_NO_PEER_CERT
    # Tell clients which CAs we accept, as the patch does.
    lib.SSL_load_client_CA_file.argtypes = [ctypes.c_char_p]
    lib.SSL_load_client_CA_file.restype = ctypes.c_void_p
    lib.SSL_CTX_set_client_CA_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    names = lib.SSL_load_client_CA_file(CLIENTCA.encode())
    if names:
        lib.SSL_CTX_set_client_CA_list(c_ctx, names)
    return callback


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

    def close_notify(self):
        """The bytes of our TLS close_notify alert."""
        try:
            self.ssl.unwrap()
        except ssl.SSLError:
            pass  # we do not wait for the client's
        return self.outgoing.read()

    def client_cert(self):
        """(email, reason) for relaying by client certificate."""
        context = self.ssl.context
        clients = tls_clients()
        if clients is None or context.verify_mode != ssl.CERT_OPTIONAL:
            return None, None
        cert = self.ssl.getpeercert()
        if not cert:
            return None, None
        if context.verify_errors:
            return None, context.verify_errors[0]
        emails = [value for rdn in cert.get("subject", ()) for key, value in rdn
                  if key == "emailAddress"]
        if not emails:
            return None, b"contains no email address"
        email = emails[0].encode("utf-8", "backslashreplace")
        if email not in clients:
            return None, b"email address not in my list of tlsclients"
        return email, None

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

from .core.requests import (
    NO_CERTIFICATE,
    TLS_CERTIFICATE,
    TLS_CLOSED,
    TLS_CONTEXT,
    TLS_ERROR,
    TLS_KEY,
    TLS_TIMEOUT,
    HandshakeFailed,
    PeerCertificate,
    Secured,
    TLSReady,
    TLSSetupFailed,
)

SERVERCERT = "control/servercert.pem"
CLIENTCA = "control/clientca.pem"
CLIENTCRL = "control/clientcrl.pem"
DHPARAMS = "control/dh2048.pem"


def _reason(exc):
    """OpenSSL's wording where the ssl module kept it ("PEM routines::no start line")."""
    library, reason = getattr(exc, "library", None), getattr(exc, "reason", None)
    if library and reason:
        text = "%s routines::%s" % (library, reason.lower().replace("_", " "))
    else:
        text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    return text.encode("utf-8", "backslashreplace")


_contexts = {}  # the context last made, by what it was made from


def make_context(ciphers, client_ca):
    """(context or None, TLSReady or TLSSetupFailed) for a StartTLS request:
    the server context from control/servercert.pem, asking for client
    certificates signed by control/clientca.pem when client_ca is true.
    A resident worker keeps the context until one of its files changes."""
    key = (ciphers, client_ca, os.getcwd(), _signature())
    made = _contexts.get(key)
    if made is None:
        made = _make_context(ciphers, client_ca)
        _contexts.clear()
        if made[0] is not None:
            _contexts[key] = made
    return made


def _signature():
    """What identifies the files a context is made from."""
    signature = []
    for path in (SERVERCERT, DHPARAMS, CLIENTCA, CLIENTCRL):
        try:
            st = os.stat(path)
            signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append(None)
    return tuple(signature)


def _make_context(ciphers, client_ca):
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    except ssl.SSLError as e:
        return None, TLSSetupFailed(TLS_CONTEXT, _reason(e))
    try:
        context.load_cert_chain(SERVERCERT)
    except (ssl.SSLError, OSError) as e:
        return None, TLSSetupFailed(*_certificate_error(e))
    # No session tickets, TLS 1.3 (num_tickets) or 1.2 (OP_NO_TICKET): the ticket
    # keys are the process's own, so under tcpserver no ticket could ever be resumed,
    # and in the pool only by a client that happens to land on the same worker; each
    # ticket costs a write per session.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    warnings = []
    if ciphers:
        try:
            context.set_ciphers(ciphers.decode("ascii", "replace"))
        except ssl.SSLError as e:  # as the patch: keep the defaults (TLS 1.3 still works)
            warnings.append("cipher list %r not usable: %s" % (ciphers, e))
    client_certs = False
    try:
        if os.path.exists(DHPARAMS):
            context.load_dh_params(DHPARAMS)
        if client_ca:
            context.load_verify_locations(CLIENTCA)
            if os.path.exists(CLIENTCRL):
                context.load_verify_locations(CLIENTCRL)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            client_certs = _ask_for_client_certificates(context, warnings)
    except (ssl.SSLError, OSError) as e:
        return None, TLSSetupFailed(TLS_CONTEXT, _reason(e))
    return context, TLSReady(client_certs, tuple(warnings))


def _ask_for_client_certificates(context, warnings):
    """Ask for (never require) a client certificate, keeping the first
    verification error instead of failing the handshake, as the patch's
    verify_cb.  That needs libssl through ctypes; if that cannot be done on
    this Python, TLS goes on without client certificates (False)."""
    context.verify_errors = []
    try:
        context.verify_callback = _remember_verify_errors(context, context.verify_errors)
    except (OSError, AttributeError, ValueError, ssl.SSLError) as e:
        context.verify_mode = ssl.CERT_NONE
        warnings.append("client certificates not available (no relaying by certificate): %s"
                        % e)
        return False
    context.verify_mode = ssl.CERT_OPTIONAL
    return True


_libssl_loaded = []


def _libssl():
    """The libssl the ssl module is linked with, for the few calls it lacks."""
    if not _libssl_loaded:
        import _ssl
        import ctypes
        _libssl_loaded[:] = [ctypes, ctypes.CDLL(_ssl.__file__)]
    return _libssl_loaded


def preload():
    """Load now what TLS would load at its first use (a resident parent,
    before it drops its privileges)."""
    try:
        _libssl()
    except (OSError, AttributeError):
        pass  # then client certificates fail soft at each session, as always


def _ssl_ctx(ctypes, lib, context):
    """The SSL_CTX pointer an SSLContext wraps (the field after the object header)."""
    c_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    if lib.SSL_CTX_get_options(c_ctx) != context.options:
        raise ssl.SSLError("cannot reach the SSL_CTX of the ssl module")
    return c_ctx


def _certificate_error(exc):
    """(step, OpenSSL's error string) for an unusable servercert.pem (the ssl
    module keeps only its own summary): the patch's loading steps are
    replayed through libssl to read the error queue."""
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
                (TLS_CERTIFICATE,
                 lambda: lib.SSL_CTX_use_certificate_chain_file(c_ctx, SERVERCERT.encode())),
                (TLS_KEY, lambda: lib.SSL_CTX_use_PrivateKey_file(c_ctx, SERVERCERT.encode(), 1)),
                (TLS_KEY, lambda: lib.SSL_CTX_check_private_key(c_ctx))):
            lib.ERR_clear_error()
            if step() != 1:
                code = lib.ERR_get_error()
                if not code:
                    return what, b""
                text = ctypes.create_string_buffer(256)
                lib.ERR_error_string_n(code, text, len(text))
                return what, text.value
    except (OSError, AttributeError, ValueError, ssl.SSLError):
        pass
    return TLS_CERTIFICATE, _reason(exc)


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


class TLSConnection:
    """An SSLObject between the session's plain text and the raw fds.

    read_raw() gives bytes, b"" at EOF or None after the timeout;
    write_raw(bytes) sends them (the driver's own clear-text I/O)."""

    def __init__(self, context):
        errors = getattr(context, "verify_errors", None)
        if errors:  # a context serves one connection at a time
            del errors[:]
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def handshake(self, read_raw, write_raw):
        """Secured or HandshakeFailed."""
        while True:
            try:
                self.ssl.do_handshake()
                write_raw(self.outgoing.read())
                return Secured(self.ssl.cipher()[0].encode("ascii"))
            except ssl.SSLWantReadError:
                write_raw(self.outgoing.read())
                data = read_raw()
                if data is None:
                    return HandshakeFailed(TLS_TIMEOUT)
                if not data:
                    return HandshakeFailed(TLS_CLOSED)
                self.incoming.write(data)
            except (ssl.SSLError, OSError) as e:
                try:
                    write_raw(self.outgoing.read())  # the alert, if any
                except OSError:
                    pass
                return HandshakeFailed(TLS_ERROR, _reason(e))

    def read(self, read_raw, write_raw, size):
        """Plain text: bytes, b"" at EOF (or a TLS error), None on timeout."""
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
            except ssl.SSLError:  # close_notify, EOF, or a broken record
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

    def client_certificate(self):
        """PeerCertificate, or NO_CERTIFICATE when none was given or asked for."""
        context = self.ssl.context
        if context.verify_mode != ssl.CERT_OPTIONAL:
            return NO_CERTIFICATE
        cert = self.ssl.getpeercert()
        if not cert:
            return NO_CERTIFICATE
        errors = context.verify_errors
        emails = tuple(value.encode("utf-8", "backslashreplace")
                       for rdn in cert.get("subject", ()) for key, value in rdn
                       if key == "emailAddress")
        return PeerCertificate(emails, errors[0] if errors else None)

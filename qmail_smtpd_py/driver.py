"""The driver: carries out a session's requests on fd 0/1.

It owns everything the core may not touch: the file descriptors and their
timeouts, the child processes, TLS, the clock, the host's IP addresses, the
log.  It is mechanical: one handler per request type, each doing what the
request says and answering with the outcome (core/requests.py); what an
outcome means for the client is decided by the core.

run_connection() is the per-connection entry point, for tcpserver and for
each session of the resident mode.
"""

import _signal
import os
import select
import time

from . import children
from .cdb import CdbError
from .children import PluginProcess, QueueProcess, check_password, run_program
from .control import ControlError, load
from .core import requests as rq
from .core.logline import connection_prefix
from .core.session import Session, cannot_start, fault

READ_SIZE = 1 << 16
_COERCED_LOCALES = (b"C.UTF-8", b"C.utf8", b"UTF-8")  # PEP 538's targets


class _Done(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def log(text):
    """One line on stderr, prefixed with our pid (multilog adds the time);
    a connection's lines go through Driver.log, which adds its prefix."""
    write_quietly(2, ("%d %s\n" % (os.getpid(), text)).encode("utf-8", "backslashreplace"))


class Driver:
    """Runs one session's requests.  timeout: seconds for each read and
    write; log_prefix: what starts each log line of this connection;
    morercpthosts: the open control/morercpthosts.cdb, or None."""

    def __init__(self, timeout, log_prefix, infd=0, outfd=1, morercpthosts=None):
        self.timeout_ms = min(timeout * 1000, 0x7FFFFFFF)  # poll() takes a C int
        self.log_prefix = log_prefix
        self.infd = infd
        self.outfd = outfd
        self.morercpthosts = morercpthosts
        self.queue = None
        self.plugin = None
        self.tls_context = None
        self.tls = None  # a tls.TLSConnection once the handshake is done
        self._local_ips = None
        self._in_poll = select.poll()
        self._in_poll.register(infd, select.POLLIN)
        self._out_poll = select.poll()
        self._out_poll.register(outfd, select.POLLOUT)
        # A client that stops reading must not block us past the timeout.
        os.set_blocking(outfd, False)

    def run(self, steps):
        """Carry out the requests of steps (a session generator) to its Exit;
        returns the exit status."""
        handlers = self._HANDLERS
        outcome = None
        try:
            while True:
                request = steps.send(outcome)
                outcome = handlers[type(request)](self, request)
        except _Done as done:
            return done.code
        except Exception as e:  # a bug: one log line and the core's reply, never a traceback
            reply, text = fault(e)
            self.log(text)
            try:
                self._send(reply)
            except Exception:  # _Done, or a TLS layer in trouble: nothing more to say
                pass
            return 1
        finally:
            if self.queue is not None:
                self.queue.close()  # no envelope: qmail-queue discards the message
            if self.plugin is not None:
                self.plugin.finish()

    def log(self, text):
        write_quietly(2, (self.log_prefix + text + "\n").encode("utf-8", "backslashreplace"))

    # ------------------------------------------------------------ client I/O

    def _send(self, data):
        if self.tls is not None:
            data = self.tls.encrypt(data)
        self._write_raw(data)

    def _write_raw(self, data):
        data = memoryview(data)
        while data:
            try:
                data = data[os.write(self.outfd, data):]
                continue
            except BlockingIOError:
                pass
            if not self._out_poll.poll(self.timeout_ms):
                raise TimeoutError("write timed out")

    def _read_raw(self):
        """Bytes from the client, b"" at EOF, None after the timeout."""
        while True:
            if not self._in_poll.poll(self.timeout_ms):
                return None
            try:
                return os.read(self.infd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    def read(self, request):
        if self.tls is not None:
            try:  # TLS may have to write while it reads
                data = self.tls.read(self._read_raw, self._write_raw, READ_SIZE)
            except OSError:
                return rq.END_OF_INPUT
        else:
            data = self._read_raw()
        if data is None:
            return rq.TIMED_OUT
        return data or rq.END_OF_INPUT

    def send(self, request):
        try:
            self._send(request.data)
        except OSError:  # a write error, or the write timeout: the client is gone
            return rq.SEND_FAILED
        return rq.SENT

    def exit(self, request):
        if self.tls is not None:
            try:
                self._write_raw(self.tls.close_notify())
            except OSError:
                pass
        raise _Done(request.code)

    # ------------------------------------------------------------ facts

    def now(self, request):
        return time.time()

    def local_ips(self, request):
        if self._local_ips is None:
            from .ipme import local_ipv4_addresses  # only sessions that meet user@[ip]
            try:
                self._local_ips = local_ipv4_addresses()
            except OSError as e:
                return rq.Failed(str(e))
        return self._local_ips

    def more_rcpthosts(self, request):
        try:
            return any(key in self.morercpthosts for key in request.keys)
        except CdbError as e:
            return rq.Failed(str(e))

    def write_log(self, request):
        if request.text is not None:  # None: a fact only, at this SMTPLOGLEVEL
            self.log(request.text)

    def sleep(self, request):
        time.sleep(request.seconds)

    # ------------------------------------------------------------ children

    def start_queue(self, request):
        self.queue, outcome = QueueProcess.start(request.program, request.env)
        return outcome

    def write_queue(self, request):
        return self.queue.write(request.data)

    def finish_queue(self, request):
        queue, self.queue = self.queue, None
        return queue.finish(request.envelope)

    def start_plugin(self, request):
        self.plugin, outcome = PluginProcess.start(request.argv, request.env,
                                                   request.time_limit)
        return outcome

    def read_plugin(self, request):
        return self.plugin.read_lines()

    def finish_plugin(self, request):
        plugin, self.plugin = self.plugin, None
        return plugin.finish()

    def run_program(self, request):
        return run_program(request.path, request.env, request.time_limit)

    def check_password(self, request):
        return check_password(request.argv, request.data, request.env)

    # ------------------------------------------------------------ TLS

    def start_tls(self, request):
        from .tls import make_context
        self.tls_context, outcome = make_context(request.ciphers, request.client_ca)
        return outcome

    def handshake(self, request):
        from .tls import TLSConnection
        connection = TLSConnection(self.tls_context)
        outcome = connection.handshake(self._read_raw, self._write_raw)
        if type(outcome) is rq.Secured:
            self.tls = connection
        return outcome

    def client_certificate(self, request):
        return self.tls.client_certificate()

    _HANDLERS = {
        rq.Read: read, rq.Send: send, rq.Log: write_log, rq.Exit: exit, rq.Now: now,
        rq.LocalIPs: local_ips, rq.MoreRcptHosts: more_rcpthosts, rq.Sleep: sleep,
        rq.StartQueue: start_queue, rq.WriteQueue: write_queue, rq.FinishQueue: finish_queue,
        rq.StartPlugin: start_plugin, rq.ReadPlugin: read_plugin,
        rq.FinishPlugin: finish_plugin, rq.RunProgram: run_program,
        rq.CheckPassword: check_password, rq.StartTLS: start_tls, rq.Handshake: handshake,
        rq.ClientCertificate: client_certificate,
    }


def run_connection(args=(), qmail_home=None, environ=None, connection_id=None, infd=0,
                   outfd=1, prepare_plugins=False, driver=Driver):
    """Serve the SMTP connection on infd/outfd (fd 0/1 the tcpserver way; a
    socket in the resident mode); returns the exit status.  connection_id
    starts each log line and makes the CRAM-MD5 challenge unique (default:
    the pid, as qmail-smtpd).  prepare_plugins: a process for this one
    connection prepares its Python plugins at their first call (children.py)
    unless NOPRELOAD is set.  With PROXYPROTOCOL in the process's environment
    (tcpserver mode) the connection starts with a PROXY header, whose client
    the session then sees.  driver: the Driver class (the pool's
    metrics.MeteredDriver counts what it does)."""
    reset_signals()
    own_process = environ is None
    if own_process:
        environ = started_environment(os.environb)
    if b"TCPREMOTEIP" not in environ:  # not under tcpserver: systemd, inetd, ...
        environ = peer_environment(environ)
    if connection_id is None:
        connection_id = str(os.getpid())
    if own_process and b"PROXYPROTOCOL" in environ:  # the pool has --proxy instead
        environ = proxied_environment(environ, infd, connection_id)
        if environ is None:
            return 1
    env = dict(environ)
    if prepare_plugins and b"NOPRELOAD" not in env:
        children.prepare_on_first_use = env
    if qmail_home is None:
        qmail_home = env.get(b"QMAILHOME", b"/var/qmail")
    prefix = connection_prefix(connection_id, env)
    try:
        os.chdir(qmail_home)
        config, morercpthosts = load(env, args)
    except (OSError, ControlError) as e:
        return driver(1200, prefix, infd, outfd).run(cannot_start(str(e)))
    session = Session(config, env, connection_id.encode())
    try:
        return driver(config.timeout, prefix, infd, outfd, morercpthosts).run(session.run())
    finally:
        if morercpthosts is not None:
            os.close(morercpthosts.fd)


def reset_signals():
    """SIGCHLD back at its default: a parent that ignored it (swaks --pipe,
    some inetd-style launchers) would make every wait for a child fail.
    _signal is built in; the signal module costs an import (enum)."""
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGCHLD})


def started_environment(environ):
    """The environment as this process was started with.  Python's C-locale
    coercion (PEP 538) puts LC_CTYPE=C.UTF-8 into it when the locale is C or
    unset, and children must get what qmail-smtpd would give them; the
    kernel keeps the original in /proc/self/environ."""
    coerced = environ.get(b"LC_CTYPE")
    if coerced not in _COERCED_LOCALES:
        return environ
    try:
        with open("/proc/self/environ", "rb") as f:
            original = f.read().split(b"\0")
    except OSError:
        return environ
    if b"LC_CTYPE=" + coerced in original:
        return environ
    environ = dict(environ)
    for entry in original:  # an LC_CTYPE=C that was coerced
        if entry.startswith(b"LC_CTYPE="):
            environ[b"LC_CTYPE"] = entry[9:]
            break
    else:
        del environ[b"LC_CTYPE"]
    return environ


def peer_environment(environ, fd=0):
    """tcpserver's TCP variables from systemd's REMOTE_ADDR/REMOTE_PORT
    (Accept=yes sockets) or, for inetd-style launchers, from the socket on
    fd itself.  On a pipe nothing is added (the variables stay unknown)."""
    env = dict(environ)
    if b"REMOTE_ADDR" in env:
        env[b"TCPREMOTEIP"] = unmapped(env[b"REMOTE_ADDR"])
        if b"REMOTE_PORT" in env:
            env[b"TCPREMOTEPORT"] = env[b"REMOTE_PORT"]
        return env
    import socket
    copy = os.dup(fd)  # the socket object owns and closes the copy, not fd
    try:
        sock = socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return env
    with sock:
        try:
            remote, local = sock.getpeername(), sock.getsockname()
        except OSError:
            return env
    if not isinstance(remote, tuple):  # e.g. a Unix socket: no addresses
        return env
    env[b"PROTO"] = b"TCP"
    env[b"TCPREMOTEIP"] = unmapped(remote[0].encode())
    env[b"TCPREMOTEPORT"] = b"%d" % remote[1]
    env.setdefault(b"TCPLOCALIP", unmapped(local[0].encode()))
    env.setdefault(b"TCPLOCALPORT", b"%d" % local[1])
    return env


# ------------------------------------------------------------------ PROXY protocol


def read_proxy_header(fd, seconds):
    """The PROXY header (proxy.py) at the start of fd, read within `seconds`
    and never a byte past it: the client's SMTP may follow in the same
    segment.  A socket is peeked at, so that a header that has arrived takes
    one read to see and one to take; a pipe (nothing can be peeked at or put
    back) is read for what the header still has at least, which for v1 ends
    in a byte at a time.  Raises proxy.ProxyError."""
    from _socket import MSG_PEEK, socket

    from . import proxy
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        sock = socket(fileno=fd)  # fd itself: detached below, never closed
    except OSError:  # not a socket
        sock = None
    data = peeked = b""  # taken from fd; seen on the socket, not taken yet
    try:
        while True:
            try:
                header = proxy.parse(data + peeked)
            except proxy.Truncated as short:
                if peeked:  # a header longer than all of it: every byte is the header's
                    data += sock.recv(len(peeked))
                    peeked = b""
                wanted = short.needed - len(data)
            else:
                if peeked:
                    sock.recv(header.length - len(data))  # its bytes, none of the client's
                return header
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise proxy.ProxyError(proxy.TIMEOUT, "no complete header within %g s, %d bytes"
                                       % (seconds, len(data)))
            try:
                if sock is None:
                    chunk = os.read(fd, wanted)
                    data += chunk
                else:
                    chunk = peeked = sock.recv(proxy.MAX_LENGTH, MSG_PEEK)
            except BlockingIOError:
                continue
            if not chunk:
                raise proxy.ProxyError(proxy.TRUNCATED, "closed after %d bytes" % len(data))
    except OSError:  # reset by the peer: as good as closed
        raise proxy.ProxyError(proxy.TRUNCATED, "closed after %d bytes" % len(data)) from None
    finally:
        if sock is not None:
            sock.detach()


def proxied_environment(environ, fd, connection_id):
    """tcpserver mode, PROXYPROTOCOL set (by a tcprules rule for the balancer):
    the environment with the client of the PROXY header on fd, read within
    PROXYPROTOCOL seconds (empty: proxy.DEFAULT_SECONDS).  tcpserver's
    TCPREMOTEHOST and TCPREMOTEINFO name the balancer, so they go.  None
    (after one log line) if there is no acceptable header: the caller closes
    without a word."""
    from . import proxy
    prefix = connection_prefix(connection_id, environ)
    value = environ[b"PROXYPROTOCOL"]
    seconds = proxy.DEFAULT_SECONDS
    try:
        if value:
            seconds = float(value)
            if not 0 < seconds <= 3600:
                raise ValueError(value)
    except ValueError:
        seconds = proxy.DEFAULT_SECONDS
        write_quietly(2, ("%sPROXYPROTOCOL=%r is no number of seconds (0-3600); using %g\n"
                          % (prefix, value.decode("latin-1"), seconds)).encode())
    try:
        header = read_proxy_header(fd, seconds)
    except proxy.ProxyError as e:
        write_quietly(2, (prefix + e.log_text() + "\n").encode("utf-8", "backslashreplace"))
        return None
    env = dict(environ)
    for name in (b"TCPREMOTEHOST", b"TCPREMOTEINFO", b"TCP6REMOTEHOST", b"TCP6REMOTEINFO"):
        env.pop(name, None)
    set_addresses(env, header.destination, header.source, b"TCP6REMOTEIP" in environ)
    return env


def set_addresses(env, local, remote, tcp6=True):
    """PROTO and the TCP address variables of a connection from remote to
    local ((ip, port) pairs, as sockets give them), as Debian's
    ucspi-tcp-ipv6 sets them: an IPv4 client on an IPv6 socket shows as
    plain IPv4, PROTO=TCP6 for IPv6 clients, and (tcp6) every variable again
    as TCP6* with IPv4 addresses in their ::ffff: form."""
    remote_ip = unmapped(remote[0].encode())
    env[b"PROTO"] = b"TCP6" if b":" in remote_ip else b"TCP"
    for side, (ip, port) in ((b"LOCAL", local[:2]), (b"REMOTE", remote[:2])):
        ip = unmapped(ip.encode())
        env[b"TCP%sIP" % side] = ip
        env[b"TCP%sPORT" % side] = b"%d" % port
        if tcp6:
            env[b"TCP6%sIP" % side] = ip if b":" in ip else b"::ffff:" + ip
            env[b"TCP6%sPORT" % side] = b"%d" % port


def unmapped(ip):
    """::ffff:192.0.2.1 (an IPv4 client on an IPv6 socket) -> 192.0.2.1."""
    return ip[7:] if ip.startswith(b"::ffff:") and b"." in ip else ip


def write_quietly(fd, data):
    try:
        os.write(fd, data)
    except OSError:
        pass

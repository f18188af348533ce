"""The driver: runs a Session on fd 0/1 and fulfils its requests.

It owns everything the core may not touch: the file descriptors and their
timeouts, qmail-queue, the clock, the host's IP addresses, the log.  One
request at a time, in the order the session yields them.
"""

import os
import select
import sys
import time

from . import replies
from .control import LOG_REPLIES
from .effects import (
    PROGRAM_CRASHED, PROGRAM_NOT_STARTED, QUEUE_EXEC_FAILED, Exit, LocalIPs, Log, Now,
    CheckPassword, PluginFinish, PluginRead, PluginStart, QueueFinish, QueueStart, QueueWrite,
    Read, RunProgram, Sleep, TLSClientCert, TLSHandshake, TLSStart,
)
from .logline import word, words

READ_SIZE = 1 << 16


class _Done(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def log(text):
    """One line on stderr, prefixed with our pid (multilog adds the time);
    a connection's lines go through Driver.log, which adds the client."""
    _write_quietly(2, ("%d %s\n" % (os.getpid(), text)).encode("utf-8", "backslashreplace"))


class Driver:
    def __init__(self, session, timeout, infd=0, outfd=1, plugin_time_limit=None,
                 program_time_limit=None):
        self.session = session
        self.plugin = None
        self.plugin_time_limit = plugin_time_limit
        self.program_time_limit = program_time_limit
        self.tls_context = None
        self.tls = None  # a tls.TLSConnection once the handshake is done
        self.timeout_ms = min(timeout * 1000, 0x7FFFFFFF)  # poll() takes a C int
        self.infd = infd
        self.outfd = outfd
        self.queue = None
        self.queue_program = None
        # logline.py: "<pid> <client ip> <event> ..."
        self.log_prefix = "%d %s " % (os.getpid(), word(session.remoteip))
        self.log_replies = session.log_level >= LOG_REPLIES
        self._replies_logged = 0  # how much of session.out the log has shown
        self._local_ips = None
        self._in_poll = select.poll()
        self._in_poll.register(infd, select.POLLIN)
        self._out_poll = select.poll()
        self._out_poll.register(outfd, select.POLLOUT)
        # A client that stops reading must not block us past the timeout.
        os.set_blocking(outfd, False)

    def run(self):
        """Play the session to its end; returns the exit status."""
        handlers = self._HANDLERS
        steps = self.session.run()
        answer = None
        try:
            while True:
                request = steps.send(answer)
                answer = handlers[type(request)](self, request)
        except _Done as done:
            return done.code
        except Exception as e:  # a bug: one log line, a 451, never a traceback
            if isinstance(e, MemoryError):  # as qmail: 421 out of memory
                self.log("fatal: out of memory at %s" % _where(e))
                self.session.out += replies.NOMEM
            else:
                self.log("internal error: %s: %s at %s" % (type(e).__name__, e, _where(e)))
                self.session.out += replies.INTERNAL
            try:
                self.flush()
            except Exception:  # _Done, or a TLS layer in trouble: nothing more to say
                pass
            return 1
        finally:
            if self.queue is not None:
                self.queue.close()  # no envelope: qmail-queue discards the message
            if self.plugin is not None:
                self.plugin.finish()

    def log(self, text):
        if self.log_replies:
            self._log_replies()
        _write_quietly(2, (self.log_prefix + text + "\n").encode("utf-8", "backslashreplace"))

    def _log_replies(self):
        """SMTPLOGLEVEL 3: the replies queued since the last log line, so that
        they appear in the log in the order the session made them."""
        out = self.session.out
        new, self._replies_logged = out[self._replies_logged:], len(out)
        for line in new.splitlines():
            _write_quietly(2, (self.log_prefix + "reply " + words(line) + "\n").encode())

    # ------------------------------------------------------------ client I/O

    def flush(self):
        out = self.session.out
        if not out:
            return
        if self.log_replies:
            self._log_replies()
            self._replies_logged = 0
        data = bytes(out)
        del out[:]
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
            except OSError:
                raise _Done(1) from None
            if not self._out_poll.poll(self.timeout_ms):
                raise _Done(1)  # write timeout: silent, as in qmail

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
        self.flush()
        if self.tls is not None:
            return self.tls.read(self._read_raw, self._write_raw, READ_SIZE)
        return self._read_raw()

    # ------------------------------------------------------------ requests

    def exit(self, request):
        self.flush()
        if self.tls is not None:
            try:
                self._write_raw(self.tls.close_notify())
            except _Done:
                pass
        raise _Done(request.code)

    def now(self, request):
        return time.time()

    def local_ips(self, request):
        if self._local_ips is None:
            from .ipme import local_ipv4_addresses
            try:
                self._local_ips = local_ipv4_addresses()
            except OSError as e:
                self.log("unable to figure out my IP addresses: %s" % e)
                return None
        return self._local_ips

    def write_log(self, request):
        self.log(request.text)

    def queue_start(self, request):
        from .queue import QueueProcess
        if self.queue_program is None:  # read at the first DATA, then kept
            self.queue_program = request.env.get(b"QMAILQUEUE") or b"bin/qmail-queue"
        try:
            self.queue = QueueProcess(self.queue_program, request.env)
        except OSError as e:
            if e.errno in _CANNOT_START:
                self.log("qqt failure: %s" % e)
                return None
            self.log("unable to exec %s: %s" % (_text(self.queue_program), e.strerror))
            return QUEUE_EXEC_FAILED
        return self.queue.pid

    def queue_write(self, request):
        return self.queue is not None and self.queue.write(request.data)

    def queue_finish(self, request):
        queue, self.queue = self.queue, None
        if queue is None:
            return 0, b""  # never started; the session reports exit 120
        self.flush()
        return queue.finish(request.envelope)

    def plugin_start(self, request):
        from .plugin_process import PluginProcess
        try:
            self.plugin = PluginProcess(request.entry, request.env, self.plugin_time_limit)
        except OSError as e:
            if e.errno in _CANNOT_START:
                self.log("qmail-spp: %s: %s" % (_text(request.entry), e.strerror))
                return b"can't pipe()" if e.errno in (23, 24) else b"fork() failed"
            return b"can't execute"
        except ValueError:  # a NUL byte in the path or the environment
            return b"can't execute"
        return None

    def plugin_read(self, request):
        if len(self.session.out) > READ_SIZE:  # a plugin printing without end
            self.flush()
        return self.plugin.read_lines()

    def plugin_finish(self, request):
        plugin, self.plugin = self.plugin, None
        status = plugin.finish()
        if plugin.killed:
            self.log("qmail-spp: pid %d killed after its time limit of %gs"
                     % (plugin.pid, self.plugin_time_limit))
        return status

    def run_program(self, request):
        """An SMTPEXTFORK program: stdin /dev/null, stdout into the log (the
        patch let it write into the SMTP stream), no arguments, wait for it."""
        try:
            pid = os.posix_spawn(request.path, [request.path], request.env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, 2, 1)])
        except OSError as e:
            if e.errno in _CANNOT_START:
                return PROGRAM_NOT_STARTED
            return 111  # the patch's child exits 111 when exec fails
        except ValueError:  # NUL in the path or environment
            return 111
        if self.program_time_limit and not _exits_within(pid, self.program_time_limit):
            os.kill(pid, 9)  # SIGKILL: reported as death by a signal (stop, accept)
            self.log("XF: %s killed after its time limit of %gs"
                     % (_text(request.path), self.program_time_limit))
        _, status = os.waitpid(pid, 0)
        return PROGRAM_CRASHED if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def check_password(self, request):
        """checkpassword: the credentials on its fd 3, SIGPIPE at its default,
        PATH searched (execvp, as the AUTH patch); its stdin and stdout are
        kept off the SMTP connection."""
        from .queue import _off_targets, _write_all
        argv = list(request.argv)
        try:
            readable, writable = os.pipe()
        except OSError:
            return "pipe"
        readable = _off_targets(readable, (0, 1, 3))
        # Fill the pipe before the child exists: a checkpassword that exits
        # without reading fd 3 then cannot make the write fail (the patch
        # has that race).  Only what does not fit is written afterwards.
        os.set_blocking(writable, False)
        data = memoryview(request.data)
        try:
            data = data[os.write(writable, data):]
        except BlockingIOError:
            pass
        os.set_blocking(writable, True)
        try:
            pid = os.posix_spawnp(argv[0], argv, request.env, setsigdef=(_SIGPIPE,),
                                  file_actions=[(os.POSIX_SPAWN_DUP2, readable, 3),
                                                (os.POSIX_SPAWN_OPEN, 0, "/dev/null",
                                                 os.O_RDONLY, 0),
                                                (os.POSIX_SPAWN_DUP2, 2, 1)])
        except (OSError, ValueError) as e:
            os.close(writable)
            if isinstance(e, OSError) and e.errno in _CANNOT_START:
                return "fork"
            self.log("unable to run checkpassword %s: %s" % (_text(argv[0]), e))
            return 1  # the patch's child exits 1 when exec fails: authentication fails
        finally:
            os.close(readable)
        try:
            _write_all(writable, data)
        except OSError:
            return "write"
        finally:
            os.close(writable)
        _, status = os.waitpid(pid, 0)
        return "child" if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def tls_start(self, request):
        from .tls import TLSSetupError, make_context
        try:
            self.tls_context = make_context(self.session.env, self.log)
        except TLSSetupError as e:
            self.log("TLS set-up failed: %s" % _text(e.args[0]))
            return e.args[0]
        return None

    def tls_handshake(self, request):
        from .tls import TLSConnection
        self.flush()  # "220 ready for tls" goes out in clear text
        connection = TLSConnection(self.tls_context)
        ok, detail = connection.handshake(self._read_raw, self._write_raw)
        if ok:
            self.tls = connection
        else:
            self.log("TLS handshake failed: %s" % _text(detail))
        return ok, detail

    def tls_client_cert(self, request):
        return self.tls.client_cert()

    def sleep(self, request):
        self.flush()
        time.sleep(request.seconds)

    _HANDLERS = {
        Read: read, Exit: exit, Now: now, LocalIPs: local_ips, Log: write_log,
        QueueStart: queue_start, QueueWrite: queue_write, QueueFinish: queue_finish,
        PluginStart: plugin_start, PluginRead: plugin_read, PluginFinish: plugin_finish,
        RunProgram: run_program, Sleep: sleep, CheckPassword: check_password,
        TLSStart: tls_start, TLSHandshake: tls_handshake, TLSClientCert: tls_client_cert,
    }


_CANNOT_START = {11, 12, 23, 24}  # EAGAIN, ENOMEM, ENFILE, EMFILE: no process/pipe
_SIGPIPE = 13  # the signal module costs an import on every connection


def _text(raw):
    return raw.decode("utf-8", "backslashreplace")


def _where(exc):
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "%s:%d" % (os.path.basename(tb.tb_frame.f_code.co_filename), tb.tb_lineno)


def serve(args=(), qmail_home=None, environ=None):
    """Serve one SMTP connection on fd 0/1 (the tcpserver way, and each child
    of the resident mode); returns the exit status."""
    from .control import ControlError, load
    from .session import Session

    if environ is None:
        environ = os.environb
    if b"TCPREMOTEIP" not in environ:  # not under tcpserver: systemd, inetd, ...
        environ = peer_environment(environ)
    if qmail_home is None:
        qmail_home = environ.get(b"QMAILHOME", b"/var/qmail")
    try:
        os.chdir(qmail_home)
        config = load(environ, args)
    except (OSError, ControlError) as e:
        log("fatal: unable to read controls: %s" % e)
        _write_quietly(1, replies.CONTROLS)
        return 1
    session = Session(config, dict(environ), pid=os.getpid())
    return Driver(session, config.timeout,
                  plugin_time_limit=_time_limit(environ, b"SPPTIMEOUT"),
                  program_time_limit=_time_limit(environ, b"SMTPEXTFORKTIMEOUT")).run()


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


def unmapped(ip):
    """::ffff:192.0.2.1 (an IPv4 client on an IPv6 socket) -> 192.0.2.1."""
    return ip[7:] if ip.startswith(b"::ffff:") and b"." in ip else ip


def _time_limit(environ, name):
    """SPPTIMEOUT / SMTPEXTFORKTIMEOUT: seconds a qmail-spp plugin / an
    SMTPEXTFORK program may run (unset or 0: no limit, as the C patches)."""
    from .control import leading_number
    seconds = leading_number(environ.get(name, b""))
    return seconds or None


def _exits_within(pid, seconds):
    """Wait up to seconds for the child to end (it is not reaped here)."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(seconds * 1000))
    finally:
        os.close(fd)


def _write_quietly(fd, data):
    try:
        os.write(fd, data)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(serve())

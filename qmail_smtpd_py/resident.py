"""Resident mode: `qmail-smtpd-py serve [-x RULES.cdb] [-c MAXCONN] HOST PORT`.

Theory of operation.  tcpserver starts a new interpreter for every
connection.  Here one process imports everything once, listens (on its own
socket, or on one handed over by systemd through LISTEN_FDS), and forks one
child per connection.  The child gets the environment a `tcpserver -H -R`
child would get (PROTO, TCPLOCALIP, TCPLOCALPORT, TCPLOCALHOST with -l,
TCPREMOTEIP, TCPREMOTEPORT, and what the tcprules CDB file assigns), puts
the connection on fd 0 and 1 and runs the very same session code as the
tcpserver path (server.serve).  The parent never touches a connection's
bytes: it accepts, forks, reaps and counts.

Signals arrive through a wakeup pipe watched with the listening socket, so
SIGCHLD reaps at once and SIGTERM stops accepting at once; on SIGTERM the
running sessions are allowed to finish (drain) before the process exits.
"""

import gc
import getopt
import os
import select
import signal
import socket
import sys

import click

# Everything a session may need, imported once in the parent (the children
# inherit it with the fork instead of importing it again).
from . import children, control, tls  # noqa: F401
from . import driver as server
from .cdb import Cdb, CdbError
from .core import auth, extfork, queue, session, spp  # noqa: F401

SD_LISTEN_FDS_START = 3


USAGE = """usage: qmail-smtpd-py serve [-x RULES.cdb] [-c MAXCONN] [-l LOCALNAME] [-b BACKLOG]
                            [--qmail-home DIR] HOST PORT [CHECKPASSWORD ...]

Resident mode: accept SMTP connections on HOST PORT (tcpserver's order) and
fork one session per connection, with the environment a `tcpserver -H -R`
child gets.  Everything is imported once, so a session costs a fork
instead of a new interpreter.

  -x RULES.cdb  tcprules CDB file: deny, or set variables per client address
  -c MAXCONN    most sessions at once (default 40); further connections wait
  -l LOCALNAME  TCPLOCALHOST for the sessions (names are never looked up)
  -b BACKLOG    listen backlog (default 128)
  -H, -R        accepted for tcpserver compatibility
  --qmail-home  qmail home (default $QMAILHOME or /var/qmail)

With systemd socket activation (LISTEN_FDS, LISTEN_PID) the socket on fd 3
is used and HOST PORT may be left out.  SIGTERM: stop accepting, let the
running sessions finish, exit 0.
"""


class Options:
    """The serve command line.  getopt, not click: this process forks for
    every connection, and each imported module makes every fork dearer."""

    __slots__ = ("host", "port", "rules", "max_connections", "local_name", "backlog",
                 "qmail_home", "args")

    def __init__(self, host="0.0.0.0", port=0, rules=None, max_connections=40,
                 local_name=None, backlog=128, qmail_home=None, args=()):
        self.host = host
        self.port = port
        self.rules = rules                      # tcprules CDB file (-x)
        self.max_connections = max_connections  # -c, tcpserver's default
        self.local_name = local_name            # -l: TCPLOCALHOST
        self.backlog = backlog
        self.qmail_home = qmail_home
        self.args = args                        # the checkpassword command line

    @classmethod
    def parse(cls, argv, environ):
        """Options from the arguments after `serve`; raises ValueError."""
        try:
            opts, rest = getopt.getopt(argv, "x:c:l:b:HRh", ["qmail-home=", "help"])
        except getopt.GetoptError as e:
            raise ValueError(str(e)) from None
        options = cls()
        for flag, value in opts:
            if flag in ("-h", "--help"):
                sys.stdout.write(USAGE)
                raise SystemExit(0)
            if flag == "-x":
                options.rules = value
            elif flag == "-l":
                options.local_name = value
            elif flag == "--qmail-home":
                options.qmail_home = os.fsencode(value)
            elif flag in ("-c", "-b"):
                if not value.isdigit() or int(value) < 1:
                    raise ValueError("%s needs a positive number" % flag)
                setattr(options, "max_connections" if flag == "-c" else "backlog", int(value))
        socket_activated = socket_activation(environ)
        if len(rest) >= 2 and rest[1].isdigit():
            options.host, options.port, rest = rest[0], int(rest[1]), rest[2:]
        elif not socket_activated:
            raise ValueError("HOST and PORT are required without LISTEN_FDS")
        options.args = tuple(rest)
        return options


@click.command("serve", add_help_option=False, context_settings={
    "ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args):
    """The resident mode: accept SMTP connections on HOST PORT (see serve --help)."""
    raise SystemExit(main(list(args)))


def main(argv):
    """`qmail-smtpd-py serve ...`; returns the exit status."""
    try:
        options = Options.parse(argv, os.environ)
    except ValueError as e:
        sys.stderr.write("qmail-smtpd-py serve: %s\n%s" % (e, USAGE))
        return 2
    return Resident(options).run()


def socket_activation(environ):
    """True if systemd passed us a listening socket (on fd 3)."""
    fds = environ.get("LISTEN_FDS", "")
    return (environ.get("LISTEN_PID") == str(os.getpid()) and fds.isdigit()
            and int(fds) >= 1)


def rules_lookup(path, ip):
    """tcpserver's rule search for `ip` in a tcprules CDB file: the address,
    then each prefix ending in '.' (or ':'), then the empty default key.
    Returns (deny, {name: value}), or None if no rule matched."""
    with open(path, "rb") as f:
        cdb = Cdb(f.fileno())
        keys = [ip] + [ip[:i + 1] for i in range(len(ip) - 1, -1, -1) if ip[i] in b".:"]
        for key in keys + [b""]:
            data = cdb.get(key)
            if data is not None:
                return _parse_rule(data)
    return None


def _parse_rule(data):
    deny, env = False, {}
    for entry in data.split(b"\0"):
        if entry == b"D":
            deny = True
        elif entry[:1] == b"+" and b"=" in entry:
            name, _, value = entry[1:].partition(b"=")
            env[name] = value
    return deny, env


def connection_env(base, local, remote, local_name):
    """The environment of a `tcpserver -H -R [-l NAME]` child, as Debian's
    ucspi-tcp-ipv6 sets it: TCP* as in ucspi-tcp (an IPv4 client on an IPv6
    socket shows as plain IPv4), PROTO=TCP6 for IPv6 clients, and every
    variable again as TCP6* with IPv4 addresses in their ::ffff: form."""
    env = dict(base)
    for name in (b"TCPREMOTEHOST", b"TCPREMOTEINFO", b"TCPLOCALHOST", b"TCP6REMOTEHOST",
                 b"TCP6REMOTEINFO", b"TCP6LOCALHOST", b"LISTEN_FDS", b"LISTEN_PID",
                 b"LISTEN_FDNAMES"):
        env.pop(name, None)
    remote_ip = server.unmapped(remote[0].encode())
    env[b"PROTO"] = b"TCP6" if b":" in remote_ip else b"TCP"
    for side, (ip, port) in ((b"LOCAL", local[:2]), (b"REMOTE", remote[:2])):
        ip = server.unmapped(ip.encode())
        env[b"TCP%sIP" % side] = ip
        env[b"TCP6%sIP" % side] = ip if b":" in ip else b"::ffff:" + ip
        env[b"TCP%sPORT" % side] = env[b"TCP6%sPORT" % side] = b"%d" % port
    if local_name is not None:
        env[b"TCPLOCALHOST"] = env[b"TCP6LOCALHOST"] = local_name.encode()
    return env


class Resident:
    def __init__(self, options, log=server.log):
        self.options = options
        self.log = log
        self.children = set()
        self.stopping = False
        self.listener = None

    # ------------------------------------------------------------ parent

    def listen(self):
        """The listening socket: systemd's (LISTEN_FDS) or our own."""
        if socket_activation(os.environ):
            sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        else:
            family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.options.host, self.options.port))
            sock.listen(self.options.backlog)
        sock.setblocking(False)
        self.listener = sock
        return sock

    def run(self):
        """Accept until SIGTERM, then wait for the running sessions; returns 0."""
        listener = self.listener or self.listen()
        # What is imported now is shared with every child; keep the collector
        # from walking (and so copying) those pages in each of them.
        gc.freeze()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signo, frame: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self._status()
        try:
            while not self.stopping:
                watched = [wake_r]
                if len(self.children) < self.options.max_connections:
                    watched.append(listener)
                readable, _, _ = select.select(watched, [], [])
                if wake_r in readable:
                    _drain(wake_r)
                self._reap()
                if listener in readable and not self.stopping:
                    self._accept(listener, (wake_r, wake_w))
            listener.close()
            while self.children:  # drain: let the sessions finish
                select.select([wake_r], [], [])
                _drain(wake_r)
                self._reap()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _stop(self, signo, frame):
        if not self.stopping:
            self.stopping = True
            self.log("serve: got signal %d: no more connections, %d running"
                     % (signo, len(self.children)))

    def _status(self):
        self.log("serve: status: %d/%d" % (len(self.children), self.options.max_connections))

    def _accept(self, listener, wakeup):
        try:
            conn, remote = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:  # e.g. out of file descriptors: keep serving the others
            self.log("serve: unable to accept: %s" % e)
            select.select([], [], [], 0.1)  # do not spin while the cause lasts
            return
        try:
            pid = os.fork()
        except OSError as e:
            self.log("serve: unable to fork: %s" % e)
            conn.close()
            return
        if pid == 0:  # the child never returns
            self._child(conn, remote, wakeup)
        conn.close()
        self.children.add(pid)
        self.log("serve: pid %d from %s" % (pid, remote[0]))
        self._status()

    def _reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self.log("serve: end %d status %d" % (pid, status))
                self._status()

    # ------------------------------------------------------------ child

    def _child(self, conn, remote, wakeup):
        code = 111
        try:
            self.listener.close()
            signal.set_wakeup_fd(-1)
            for fd in wakeup:
                os.close(fd)
            for signo in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(signo, signal.SIG_DFL)
            local = conn.getsockname()
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            conn.close()
            env = connection_env(server.started_environment(os.environb), local, remote,
                                 self.options.local_name)
            if self.options.rules is not None:
                try:
                    rule = rules_lookup(self.options.rules, env[b"TCPREMOTEIP"])
                except (OSError, CdbError) as e:
                    self.log("serve: unable to read %s: %s" % (self.options.rules, e))
                    os._exit(111)
                if rule is not None:
                    deny, assignments = rule
                    if deny:
                        self.log("serve: deny %d %s" % (os.getpid(), remote[0]))
                        os._exit(100)
                    env.update(assignments)
            code = server.run_connection(self.options.args, self.options.qmail_home, env)
        except BaseException as e:  # never return into the parent's loop
            self.log("serve: child failed: %s: %s" % (type(e).__name__, e))
        os._exit(code)


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass

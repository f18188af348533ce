"""Resident mode: `qmail-smtpd-py serve`, a pool of pre-forked workers.

Theory of operation.  tcpserver starts a new interpreter for every
connection.  Here one parent imports everything a session can need, binds
the listening socket (or takes systemd's, LISTEN_FDS), drops to the SMTP
user as tcpserver -u/-g does, and forks workers.  Each worker accepts on the
shared socket and serves one session at a time, many in its life: the
session code is the very same as under tcpserver (driver.run_connection),
with the environment a `tcpserver -R [-H] [-l NAME] [-x RULES]` child gets.
A worker ends after -n sessions or when its memory passes --max-rss, and
the parent starts another; the parent keeps --min-spare idle workers ready,
up to -c busy ones, and lets extra idle ones go.

Nothing of a session outlives it in a worker: the session's environment is
a new copy of the pool's, its state lives in its own Session and Driver
objects, its children and fds are closed or reaped when it ends, and the
working directory, umask and signal dispositions are set again for each
one.  The parent never touches a connection's bytes.

The parent and its workers share a scoreboard (shared memory: one slot per
worker, with its state and client address, for the per-address limit -C)
and a status pipe, on which each worker reports the start and end of each
session; the parent writes tcpserver's -v lines from it, counts busy
workers, reaps, and replaces dead ones (a worker killed mid-session is
logged with its signal; its client sees the connection close, and the
qmail-queue it was feeding sees no envelope, so nothing is half-queued).

Signals: SIGTERM (and SIGINT) stop accepting; running sessions finish, then
the parent exits 0.  SIGHUP reloads: the parent re-executes itself (new
code after an upgrade) keeping its socket, scoreboard and pipe, and the
old workers finish their sessions and go; if a fresh interpreter cannot
load the package (e.g. an installation the SMTP user cannot read), the
workers are recycled from the running code instead.
"""

import errno
import fcntl
import gc
import ipaddress
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import attrs
import click

from . import children, control, driver, ipme, preload, proxy, tls  # noqa: F401  (before forking)
from .cdb import Cdb, CdbError
from .core import replies, session  # noqa: F401
from .core.logline import word

SD_LISTEN_FDS_START = 3
# Blocked around each fork: a worker must never run a handler of the parent's.
POOL_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
INHERIT = "QMAIL_SMTPD_PY_INHERIT"  # fds kept over a SIGHUP re-exec


# ------------------------------------------------------------------ options


@attrs.frozen
class Options:
    """The serve command line (tcpserver's options where they apply)."""

    host: str = "0.0.0.0"
    port: int = 0
    rules: str | None = None          # -x: tcprules CDB
    max_connections: int = 40         # -c: most sessions at once
    local_name: str | None = None     # -l: TCPLOCALHOST
    backlog: int = 128                # -b
    remote_host: bool = True          # -h (default) / -H: look up TCPREMOTEHOST
    paranoid: bool = False            # -p: the name must map back to the address
    verbose: bool = False             # -v: status lines; -q / -Q: errors only
    uid: int | None = None            # -u / -U
    gid: int | None = None            # -g / -U
    root: bool = False                # --root: sessions may run as root
    per_ip: int = 0                   # -C: most sessions from one address (0: no limit)
    max_sessions: int = 500           # -n: sessions in a worker's life
    max_rss: int = 256                # --max-rss: MiB of a worker's memory
    min_spare: int = 4                # --min-spare: idle workers kept ready
    max_spare: int = 16               # --max-spare: idle workers kept at most
    dns_timeout: float = 3.0          # --dns-timeout: seconds for a name lookup
    fork: bool = False                # --fork: one process per connection, no pool
    metrics: tuple | None = None      # --metrics: (host, port) of the Prometheus endpoint
    proxies: tuple = ()               # --proxy: the balancers' networks (PROXY header required)
    proxy_timeout: float = proxy.DEFAULT_SECONDS  # --proxy-timeout: seconds for the header
    qmail_home: bytes | None = None
    args: tuple = ()                  # the checkpassword command line


def _metrics_address(ctx, param, value):
    if value is None:
        return None
    import importlib.util

    from .metrics import parse_address  # only with --metrics
    if importlib.util.find_spec("prometheus_client") is None:
        raise click.BadParameter("needs prometheus_client: pip install 'qmail-smtpd-py[metrics]'")
    try:
        return parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter("give a positive number")
    return value


def _networks(ctx, param, values):
    """--proxy 127.0.0.1,10.0.0.0/8 (and again): a tuple of ip_network."""
    try:
        return tuple(ipaddress.ip_network(text.strip()) for value in values
                     for text in value.split(",") if text.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _seconds(ctx, param, value):
    if not 0 < value <= 3600:
        raise click.BadParameter("give a number of seconds (0-3600)")
    return value


@click.command("serve", context_settings={"allow_interspersed_args": False,
                                          "help_option_names": ["--help"]})
@click.option("-x", "rules", metavar="RULES.cdb",
              help="tcprules CDB file: deny, or set variables per client address")
@click.option("-c", "max_connections", type=int, default=40, show_default=True,
              callback=_positive, metavar="MAXCONN", help="most sessions at once")
@click.option("-C", "per_ip", type=int, default=0, metavar="N",
              help="most sessions at once from one client address; the others are "
                   "refused with 421 (default: no limit)")
@click.option("-l", "local_name", metavar="LOCALNAME",
              help="TCPLOCALHOST for the sessions (else looked up, unless -H)")
@click.option("-b", "backlog", type=int, default=128, show_default=True, callback=_positive,
              metavar="BACKLOG", help="listen backlog")
@click.option("-h/-H", "remote_host", default=True,
              help="look up TCPREMOTEHOST in DNS (-h, the default) or not (-H)")
@click.option("-p/-P", "paranoid", default=False,
              help="-p: keep TCPREMOTEHOST only if it maps back to the client address")
@click.option("-r/-R", "ident", default=False, hidden=True,
              help="accepted for tcpserver compatibility: ident is never asked")
@click.option("-v", "verbose", flag_value=True, default=False,
              help="log the pool's status and each connection")
@click.option("-q", "-Q", "verbose", flag_value=False, help="log errors only (the default)")
@click.option("-u", "uid", type=int, metavar="UID", help="run the sessions as this user id")
@click.option("-g", "gid", type=int, metavar="GID", help="and this group id")
@click.option("-U", "from_env", is_flag=True, help="-u $UID -g $GID (as envuidgid sets them)")
@click.option("--root", is_flag=True,
              help="let sessions run as root (only where users cannot be switched)")
@click.option("-n", "max_sessions", type=int, default=500, show_default=True,
              callback=_positive, metavar="N",
              help="sessions a worker serves before it is replaced")
@click.option("--max-rss", type=int, default=256, show_default=True, callback=_positive,
              metavar="MIB", help="a worker whose memory grows past this is replaced")
@click.option("--min-spare", type=int, default=4, show_default=True, metavar="N",
              help="idle workers kept ready")
@click.option("--max-spare", type=int, default=16, show_default=True, metavar="N",
              help="idle workers kept at most")
@click.option("--dns-timeout", type=float, default=3.0, show_default=True, metavar="SECONDS",
              help="time limit of each DNS look-up (-h, -p, no -l)")
@click.option("--fork", is_flag=True,
              help="no pool: fork one process per connection after accepting it")
@click.option("--metrics", metavar="HOST:PORT", callback=_metrics_address,
              help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
@click.option("--proxy", "proxies", multiple=True, callback=_networks, metavar="CIDR,...",
              help="trusted load balancers (e.g. 127.0.0.1,10.0.0.0/8): their connections "
                   "start with a PROXY header (v1 or v2) naming the client; any other peer "
                   "is closed without a word")
@click.option("--proxy-timeout", type=float, default=proxy.DEFAULT_SECONDS, show_default=True,
              callback=_seconds, metavar="SECONDS",
              help="time limit for the PROXY header (--proxy)")
@click.option("--qmail-home", metavar="DIR", help="qmail home (default $QMAILHOME or /var/qmail)")
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="HOST PORT [CHECKPASSWORD...]")
def command(words, from_env, ident, qmail_home, **given):
    """Accept SMTP connections on HOST PORT (tcpserver's order; HOST 0 is
    every address) and serve them with a pool of pre-forked workers, each
    session with the environment a tcpserver child gets.  The arguments
    after PORT are the checkpassword command line for SMTP AUTH.

    With systemd socket activation (LISTEN_FDS, LISTEN_PID) the socket on
    fd 3 is used and HOST PORT are left out.  As root, give -u and -g (or
    -U): the pool binds, then drops to that user before any session.
    SIGTERM: stop accepting, let the sessions finish, exit 0.  SIGHUP:
    reload the code and replace the workers gracefully.
    """
    if from_env:
        try:
            given["uid"], given["gid"] = int(os.environ["UID"]), int(os.environ["GID"])
        except (KeyError, ValueError):
            raise click.UsageError("-U needs $UID and $GID (run it under envuidgid)") from None
    if given["min_spare"] > given["max_spare"]:
        raise click.UsageError("--min-spare is more than --max-spare")
    words = list(words)
    options = {}
    if len(words) >= 2 and _port(words[1]) is not None:
        options["host"] = "0.0.0.0" if words[0] == "0" else words[0]
        options["port"] = _port(words[1])
        words = words[2:]
    elif not (socket_activation(os.environ) or INHERIT in os.environ):
        raise click.UsageError("HOST and PORT are required without LISTEN_FDS")
    if qmail_home is not None:
        options["qmail_home"] = os.fsencode(qmail_home)
    options = Options(args=tuple(words), **options, **given)
    raise SystemExit(Pool(options).run())


def _port(text):
    if text.isdigit():
        return int(text) if int(text) < 65536 else None
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def socket_activation(environ):
    """True if systemd passed us a listening socket (on fd 3)."""
    fds = environ.get("LISTEN_FDS", "")
    return (environ.get("LISTEN_PID") == str(os.getpid()) and fds.isdigit()
            and int(fds) >= 1)


# ------------------------------------------------------------------ the connection's environment


def rules_lookup(path, ip):
    """tcpserver's rule search for `ip` in a tcprules CDB file: the address,
    then each prefix ending in '.' (or ':'), then the empty default key.
    Returns (deny, {name: value}), or None if no rule matched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cdb = Cdb(fd)
        keys = [ip] + [ip[:i + 1] for i in range(len(ip) - 1, -1, -1) if ip[i] in b".:"]
        for key in keys + [b""]:
            data = cdb.get(key)
            if data is not None:
                return _parse_rule(data)
    finally:
        os.close(fd)
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


def connection_env(base, local, remote, local_name, remote_name=None):
    """The environment of a `tcpserver -R [-l NAME]` child, as Debian's
    ucspi-tcp-ipv6 sets it (driver.set_addresses)."""
    env = dict(base)
    for name in (b"TCPREMOTEHOST", b"TCPREMOTEINFO", b"TCPLOCALHOST", b"TCP6REMOTEHOST",
                 b"TCP6REMOTEINFO", b"TCP6LOCALHOST", b"LISTEN_FDS", b"LISTEN_PID",
                 b"LISTEN_FDNAMES", os.fsencode(INHERIT)):
        env.pop(name, None)
    driver.set_addresses(env, local, remote)
    if local_name is not None:
        env[b"TCPLOCALHOST"] = env[b"TCP6LOCALHOST"] = os.fsencode(local_name)
    if remote_name is not None:
        env[b"TCPREMOTEHOST"] = env[b"TCP6REMOTEHOST"] = remote_name
    return env


class Names:
    """Reverse DNS, as tcpserver looks names up (dnspython, loaded in the
    parent): one PTR query within the time limit; paranoid, the name's
    addresses must include the client's.  A failed or slow look-up gives
    None, never an error."""

    def __init__(self, timeout, paranoid):
        from . import plugin_dns  # dnspython: only when names are looked up
        self.dns = plugin_dns
        self.timeout = timeout
        self.paranoid = paranoid
        self.resolver = None

    def prepare(self):
        """Read resolv.conf (or $DNSCACHEIP) once, in the parent."""
        try:
            self.resolver = self.dns.make_resolver()
        except ValueError as e:
            raise SystemExit("qmail-smtpd-py serve: DNSCACHEIP: %s" % e) from None

    def name_of(self, ip):
        import dns.reversename
        lookup = self.dns.Lookup(timeout=self.timeout, resolver=self.resolver)
        try:
            reverse = dns.reversename.from_address(ip).to_text()
        except (ValueError, SyntaxError):
            return None
        result = lookup.query(reverse, "PTR")
        if result.status != self.dns.FOUND:
            return None
        name = result.records[0].target.to_text(omit_final_dot=True)
        if self.paranoid and not self._maps_back(lookup, name, ip):
            return None
        return name.encode("ascii", "replace")

    def _maps_back(self, lookup, name, ip):
        for rdtype in ("A", "AAAA"):
            result = lookup.query(name, rdtype)
            if result.status == self.dns.FOUND and ip in self.dns.a_addresses(result.records):
                return True
        return False


# ------------------------------------------------------------------ the scoreboard

SLOT = struct.Struct("=i46s")  # a worker's pid and client address
FREE, IDLE, BUSY = 0, 1, 2


class Scoreboard:
    """Memory shared by the pool: a byte that says the pool is stopping, then
    one state byte per slot (so that counting is one bytes.count), then each
    slot's worker pid and client address.  Memfds, so that it survives the
    parent's re-exec."""

    STATES = 8

    def __init__(self, size, fds=None):
        self.size = size
        self.slots_at = self.STATES + size
        length = self.slots_at + SLOT.size * size
        if fds is None:
            fds = (os.memfd_create("qmail-smtpd-py-scoreboard", 0),
                   os.memfd_create("qmail-smtpd-py-lock", 0))
            os.ftruncate(fds[0], length)
        self.fd, self.lock_fd = fds
        self.memory = mmap.mmap(self.fd, length)

    @property
    def stopping(self):
        return self.memory[0] == 1

    def stop(self):
        self.memory[0] = 1

    def state(self, index):
        return self.memory[self.STATES + index]

    def count(self, state):
        return self.memory[self.STATES:self.slots_at].count(state)

    def get(self, index):
        pid, ip = SLOT.unpack_from(self.memory, self.slots_at + index * SLOT.size)
        return pid, self.state(index), ip.rstrip(b"\0")

    def set(self, index, pid, state, ip=b""):
        SLOT.pack_into(self.memory, self.slots_at + index * SLOT.size, pid, ip)
        self.memory[self.STATES + index] = state

    def set_state(self, index, state):
        self.memory[self.STATES + index] = state

    def free_slot(self):
        index = self.memory.find(bytes([FREE]), self.STATES, self.slots_at)
        return None if index < 0 else index - self.STATES

    def claim(self, index, pid, ip, limit):
        """Mark slot index busy with ip unless ip has `limit` sessions already
        (0: no limit); counting and claiming are one step for the whole pool."""
        if not limit:
            self.set(index, pid, BUSY, ip)
            return True
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            busy = sum(1 for i in range(self.size) if self.state(i) == BUSY
                       and self.get(i)[2] == ip)
            if busy >= limit:
                return False
            self.set(index, pid, BUSY, ip)
            return True
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)


# ------------------------------------------------------------------ the parent


@attrs.define
class WorkerRecord:
    """What the parent knows of one worker."""

    slot: int
    retiring: bool = False   # told to go after its session (or at once, if idle)
    connection: str = ""     # the id of its session, for the end line
    client: str = ""


class Pool:
    def __init__(self, options, log=driver.log):
        self.options = options
        self.log = log
        self.workers = {}        # pid -> WorkerRecord
        self.stopping = False
        self.reload_asked = False
        self.listener = None
        self.scoreboard = None
        self.status_r = self.status_w = None
        self.wake_r = self.wake_w = None
        self.names = None
        self.base_env = None
        self.umask = 0o022
        self.pending = b""       # a status message not complete yet
        self.busy = 0
        self.metrics = None      # metrics.Metrics with --metrics
        self.driver = driver.Driver

    # ------------------------------------------------------------ start

    def run(self):
        """Serve until SIGTERM, then wait for the running sessions; returns 0
        (111 when the pool cannot start)."""
        try:
            self._open()
        except OSError as e:
            self.log("serve: unable to bind: %s" % e)
            return 111
        try:
            return self._serve()
        finally:
            if self.metrics is not None:  # not reached by a SIGHUP re-exec: kept for it
                self.metrics.close()

    def _serve(self):
        options = self.options
        if options.metrics is not None:
            from . import metrics
            self.metrics = metrics.Metrics(options.metrics, self.log, self._gauges)
            try:
                self.metrics.open()
            except OSError as e:
                self.log("serve: unable to bind the metrics address %s:%d: %s"
                         % (*options.metrics, e))
                return 111
            self.driver = metrics.MeteredDriver
        try:
            self._prepare()
            self._drop_privileges()
            if self.metrics is not None:
                self.metrics.start()
        except (OSError, SystemExit) as e:
            self.log("serve: %s" % (e.code if isinstance(e, SystemExit) else e))
            return 111
        if os.geteuid() == 0 and not options.root:
            self.log("serve: refusing to run sessions as root: give -u UID -g GID (or -U "
                     "under envuidgid), or --root where users cannot be switched")
            return 111
        if self.metrics is not None and options.verbose:
            self.log("serve: metrics on %s (files in %s)" % (self.metrics.where(),
                                                             self.metrics.directory))
        # What is imported now is shared with every worker: keep the collector
        # from walking (and so copying) those pages in each of them.
        gc.freeze()
        self._signals()
        self._status()
        try:
            if options.fork:
                self._fork_per_connection()
            else:
                self._supervise()
        finally:
            signal.set_wakeup_fd(-1)
        return 0

    def _open(self):
        """The listening socket (our own, systemd's, or the one kept over a
        re-exec), the scoreboard and the status pipe."""
        inherited = os.environ.pop(INHERIT, None)
        if inherited:
            fds, _, old = inherited.partition(";")
            listen_fd, board_fd, lock_fd, self.status_r, self.status_w = map(int, fds.split(","))
            self.listener = socket.socket(fileno=listen_fd)
            self.scoreboard = Scoreboard(self.options.max_connections, (board_fd, lock_fd))
            for item in filter(None, old.split(",")):
                pid, slot = map(int, item.split(":"))
                self.workers[pid] = WorkerRecord(slot, retiring=True)
            for fd in (listen_fd, board_fd, lock_fd, self.status_r, self.status_w):
                os.set_inheritable(fd, False)
            self.log("serve: reloaded: %d workers of the old code finish their sessions"
                     % len(self.workers))
        else:
            self.listener = self._listen()
            self.scoreboard = Scoreboard(self.options.max_connections)
            self.status_r, self.status_w = os.pipe()
        os.set_blocking(self.status_r, False)
        self.listener.setblocking(True)

    def _listen(self):
        if socket_activation(os.environ):
            return socket.socket(fileno=SD_LISTEN_FDS_START)
        host, port = self.options.host, self.options.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
        sock.listen(self.options.backlog)
        return sock

    def _prepare(self):
        """Everything a session or a worker may load lazily, loaded now: after
        the drop, the interpreter's own files need not be readable."""
        import codecs
        for codec in ("latin-1", "ascii", "utf-8", "idna"):
            codecs.lookup(codec)
        tls.preload()
        ipme.local_ipv4_addresses()
        options = self.options
        if options.remote_host or options.paranoid or options.local_name is None:
            if options.remote_host or options.local_name is None:
                self.names = Names(options.dns_timeout, options.paranoid)
                self.names.prepare()
        self.base_env = dict(driver.started_environment(os.environb))
        if self.metrics is not None:  # before _preload, which may import a plugin's modules
            self.metrics.prepare(self.options.uid, self.options.gid)
        control.kept = {}  # each worker keeps the control files it read
        self._preload()
        self.umask = os.umask(0o022)
        os.umask(self.umask)

    def _preload(self):
        """Prepare the Python plugins and SMTPEXTFORK programs (preload.py),
        unless NOPRELOAD is set."""
        if b"NOPRELOAD" in self.base_env:
            self.log("serve: NOPRELOAD: plugins and programs are exec'd")
            return
        home = self.options.qmail_home or self.base_env.get(b"QMAILHOME", b"/var/qmail")
        paths = []
        if b"NOSPP" not in self.base_env:
            conffile = self.base_env.get(b"SPPCONFFILE") or b"control/smtpplugins"
            try:
                lines = control.read_list(os.path.join(home, conffile)) or []
            except control.ControlError:
                lines = []  # the sessions will answer 421 and log why
            paths += [line for line in lines if line[:1] not in (b"[", b":")]
        for name in (b"SMTPEXTFORK", b"SMTPEXTFORKR"):
            paths += [p for p in self.base_env.get(name, b"").split(b",") if p]
        uid = os.geteuid() if self.options.uid is None else self.options.uid
        gid = os.getegid() if self.options.gid is None else self.options.gid
        scripts = preload.prepare([os.path.join(home, p) for p in paths], uid, gid, self.log)
        preload.install(scripts, self.base_env)

    def _drop_privileges(self):
        """-u/-g: supplementary groups cleared, then the group, then the user,
        as tcpserver's prot_gid and prot_uid; checked afterwards."""
        uid, gid = self.options.uid, self.options.gid
        if gid is not None and os.getegid() != gid or uid is not None and os.geteuid() != uid:
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
        if uid is not None and (os.getuid(), os.geteuid()) != (uid, uid):
            raise OSError("still uid %d after setuid(%d)" % (os.geteuid(), uid))
        if gid is not None and (os.getgid(), os.getegid()) != (gid, gid):
            raise OSError("still gid %d after setgid(%d)" % (os.getegid(), gid))

    def _signals(self):
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signo, frame: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)

    def _stop(self, signo, frame):
        if not self.stopping:
            self.stopping = True
            self.scoreboard.stop()  # a connection a worker takes from now on is closed
            self.listener.close()   # the workers close theirs when told to stop
            self._retire(list(self.workers))
            self.log("serve: got signal %d: no more connections, %d running"
                     % (signo, self._count(BUSY)))

    def _reload(self, signo, frame):
        self.reload_asked = True

    # ------------------------------------------------------------ supervising

    def _supervise(self):
        while not (self.stopping and not self.workers):
            if self.stopping:
                self._retire(list(self.workers))
            else:
                self._maintain()
            ready = self._wait([self.wake_r, self.status_r])
            if self.wake_r in ready:
                _drain(self.wake_r)
            if self.status_r in ready:
                self._read_status()
            self._reap()
            if self.reload_asked and not self.stopping:
                self.reload_asked = False
                self._reload_code()
        self.listener.close()

    def _wait(self, watched):
        """select() on watched (and the metrics endpoint's sockets, which are
        served here: see metrics.py); what is ready of watched."""
        if self.metrics is None:
            return select.select(watched, [], [], 1.0)[0]
        scrapes = self.metrics.readers()
        ready, writable, _ = select.select(watched + scrapes, self.metrics.writers(), [], 1.0)
        self.metrics.handle(ready, writable)
        return ready

    def _gauges(self):
        """(busy, idle, -c, the listening socket) for a scrape."""
        board = self.scoreboard
        return board.count(BUSY), board.count(IDLE), self.options.max_connections, self.listener

    def _maintain(self):
        """Keep min-spare idle workers, up to -c workers in all; let extra idle
        ones go."""
        options = self.options
        idle = [pid for pid, w in self.workers.items() if not w.retiring
                and self.scoreboard.state(w.slot) == IDLE]
        wanted = min(options.min_spare - len(idle), options.max_connections - len(self.workers))
        for _ in range(max(0, wanted)):
            if not self._spawn():
                break
        if len(idle) > options.max_spare:
            self._retire(idle[options.max_spare:])

    def _spawn(self):
        slot = self.scoreboard.free_slot()
        if slot is None:
            return False
        self.scoreboard.set(slot, 0, IDLE)  # reserved before the worker claims it
        pid = self._fork()
        if pid is None:
            self.scoreboard.set(slot, 0, FREE)
            return False
        if pid == 0:
            Worker(self, slot).run()  # never returns
        self.workers[pid] = WorkerRecord(slot)
        if self.metrics is not None:
            self.metrics.worker_started()
        return True

    def _fork(self):
        """fork() with the pool's signals blocked until the child has its own
        handlers (Worker.start unblocks them); None if it failed."""
        signal.pthread_sigmask(signal.SIG_BLOCK, POOL_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            self.log("serve: unable to fork: %s" % e)
            pid = None
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, POOL_SIGNALS)
        return pid

    def _retire(self, pids):
        for pid in pids:
            worker = self.workers.get(pid)
            if worker is not None and not worker.retiring:
                worker.retiring = True
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _count(self, state):
        return self.scoreboard.count(state)

    def _status(self):
        if self.options.verbose:
            self.log("serve: status: %d/%d" % (self._count(BUSY), self.options.max_connections))

    def _read_status(self):
        """Log the workers' reports, tcpserver -v style."""
        try:
            data = self.pending + os.read(self.status_r, 65536)
        except BlockingIOError:
            return
        *lines, self.pending = data.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode("ascii", "replace").partition(" ")
            fields = rest.split(" ")
            if kind == "W":      # a worker saw too few idle ones: _maintain runs next
                continue
            if kind == "B":      # pid slot id ip
                pid, _, conn, ip = fields
                worker = self.workers.get(int(pid))
                if worker is not None:
                    worker.connection, worker.client = conn, ip
                if self.options.verbose:
                    self.log("serve: pid %s from %s" % (conn, ip))
                    self._status()
            elif kind == "E":    # id status
                if self.options.verbose:
                    self.log("serve: end %s status %s" % (fields[0], fields[1]))
                    self._status()
            elif kind in ("D", "L") and self.options.verbose:  # deny, limit: id ip
                self.log("serve: %s %s %s" % ("deny" if kind == "D" else "limit", *fields))

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            state = self.scoreboard.state(worker.slot)
            self.scoreboard.set(worker.slot, 0, FREE)
            if state == BUSY:  # died in a session: its end line is ours to write
                self.log("serve: end %s status %d (worker %d died in its session)"
                         % (worker.connection or pid, status, pid))
                self._status()
                if self.metrics is not None:
                    self.metrics.worker_died_in_session(status)
            elif status != 0:
                self.log("serve: worker %d ended with status %d" % (pid, status))
            if self.metrics is not None:
                self.metrics.worker_gone(pid)

    # ------------------------------------------------------------ SIGHUP

    def _reload_code(self):
        """Re-execute the parent with the same command line, keeping the
        socket, scoreboard and pipe; the workers finish and go.  If a fresh
        interpreter cannot load the package, recycle the workers instead."""
        try:
            check = subprocess.run([sys.executable, "-c", "import qmail_smtpd_py.pool"],
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                                   env=_environ(self.base_env))
            loads = check.returncode == 0
            why = check.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        except (OSError, subprocess.TimeoutExpired) as e:
            loads, why = False, [str(e)]
        self._retire(list(self.workers))
        if not loads:
            self.log("serve: SIGHUP: the code cannot be reloaded (%s): new workers of the "
                     "running code" % why[0])
            self._preload()  # the plugins are looked at again all the same
            return
        fds = (self.listener.fileno(), self.scoreboard.fd, self.scoreboard.lock_fd,
               self.status_r, self.status_w)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = _environ(self.base_env)
        if self.metrics is not None:
            env.update(self.metrics.keep())
        env[INHERIT] = "%s;%s" % (",".join(map(str, fds)), ",".join(
            "%d:%d" % (pid, w.slot) for pid, w in self.workers.items()))
        signal.set_wakeup_fd(-1)
        self.log("serve: SIGHUP: reloading the code")
        os.execve(sys.executable, sys.orig_argv, env)

    # ------------------------------------------------------------ --fork

    def _fork_per_connection(self):
        """The old resident mode: accept in the parent, one child per connection."""
        self.listener.setblocking(False)
        while not (self.stopping and not self.workers):
            watched = [self.wake_r, self.status_r]
            if not self.stopping and len(self.workers) < self.options.max_connections:
                watched.append(self.listener)
            ready = self._wait(watched)
            if self.wake_r in ready:
                _drain(self.wake_r)
            if self.status_r in ready:
                self._read_status()
            self._reap()
            if self.listener in ready and not self.stopping:
                self._fork_one()
        self.listener.close()

    def _fork_one(self):
        try:
            conn, remote = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:  # e.g. out of file descriptors: keep serving the others
            self.log("serve: unable to accept: %s" % e)
            time.sleep(0.1)  # do not spin while the cause lasts
            return
        slot = self.scoreboard.free_slot()
        self.scoreboard.set(slot, 0, IDLE)
        pid = self._fork()
        if pid is None:
            self.scoreboard.set(slot, 0, FREE)
            conn.close()
            return
        if pid == 0:
            worker = Worker(self, slot)
            worker.start()
            worker.serve(conn, remote, str(os.getpid()))
            os._exit(0)
        conn.close()
        self.workers[pid] = WorkerRecord(slot)
        if self.metrics is not None:
            self.metrics.worker_started()


def _environ(env):
    """A bytes environment for os.execve / subprocess."""
    return {key: value for key, value in env.items() if key != os.fsencode(INHERIT)}


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# ------------------------------------------------------------------ a worker


class Worker:
    """A forked worker: accepts and serves sessions one at a time."""

    def __init__(self, pool, slot):
        self.pool = pool
        self.options = pool.options
        self.slot = slot
        self.pid = 0
        self.stopping = False  # SIGTERM: end after the session, if there is one
        self.balancers = set()  # peers found in --proxy's networks (a few, again and again)

    def start(self):
        """The worker's own set-up after the fork."""
        pool = self.pool
        self.pid = os.getpid()
        signal.set_wakeup_fd(-1)
        for fd in (pool.wake_r, pool.wake_w, pool.status_r):
            os.close(fd)
        if pool.metrics is not None:
            pool.metrics.in_worker()
        for signo in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP):
            signal.signal(signo, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self._term)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, POOL_SIGNALS)
        os.set_blocking(pool.status_w, False)
        pool.scoreboard.set(self.slot, self.pid, IDLE)

    def _term(self, signo, frame):
        # Nothing raised from here: a connection accept() has just returned would be
        # dropped unanswered (the parent retires idle workers at any moment). A
        # blocked accept() retries on the closed listener and fails (EBADF) instead.
        self.stopping = True
        self.pool.listener.close()  # new connections are refused as soon as possible

    def run(self):
        code = 0
        try:
            self.start()
            listener = self.pool.listener
            served = 0
            while served < self.options.max_sessions and not self.stopping:
                try:
                    conn, remote = listener.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.pool.log("serve: unable to accept: %s" % e)
                        time.sleep(0.1)  # do not spin while the cause lasts
                    continue
                if self.pool.scoreboard.stopping:  # taken as the pool stopped: unanswered
                    conn.close()
                    break
                served += 1
                self.serve(conn, remote, "%d.%d" % (self.pid, served))
                if _rss_mib() > self.options.max_rss:
                    self.pool.log("serve: worker %d past %d MiB after %d sessions: replaced"
                                  % (self.pid, self.options.max_rss, served))
                    break
        except BaseException as e:  # never return into the parent's loop
            self.pool.log("serve: worker %d failed: %s: %s" % (self.pid, type(e).__name__, e))
            code = 111
        os._exit(code)

    def _report(self, text):
        try:
            os.write(self.pool.status_w, text.encode("ascii", "replace") + b"\n")
        except OSError:  # the parent is busy or gone: the scoreboard still tells
            pass

    def serve(self, conn, remote, connection_id):
        """One session on an accepted connection."""
        pool, options = self.pool, self.options
        code = 111
        begun = False
        try:
            local = conn.getsockname()
            if options.proxies:
                addresses = self._proxied(conn, remote, connection_id)
                if addresses is None:
                    return
                local, remote = addresses
            ip = driver.unmapped(remote[0].encode())
            rule = None
            if options.rules is not None:
                try:
                    rule = rules_lookup(options.rules, ip)
                except (OSError, CdbError) as e:
                    pool.log("serve: unable to read %s: %s" % (options.rules, e))
                    return
                if rule is not None and rule[0]:
                    if pool.metrics is not None:
                        pool.metrics.connection_refused("deny")
                    self._report("D %s %s" % (connection_id, word(ip)))
                    code = 100 << 8
                    return
            if not pool.scoreboard.claim(self.slot, self.pid, ip, options.per_ip):
                if pool.metrics is not None:
                    pool.metrics.connection_refused("per-ip")
                self._report("L %s %s" % (connection_id, word(ip)))
                _send_quietly(conn, replies.TOO_MANY_FROM_ADDRESS)
                code = 0
                return
            begun = True
            if pool.metrics is not None and pool.scoreboard.count(BUSY) >= options.max_connections:
                pool.metrics.max_connections_reached()
            if options.verbose:
                self._report("B %d %d %s %s" % (self.pid, self.slot, connection_id, word(ip)))
            elif (pool.scoreboard.count(IDLE) < options.min_spare
                  and pool.scoreboard.count(FREE)):
                self._report("W")  # the parent: time to start more workers
            env = self._environment(local, remote, rule)
            os.umask(pool.umask)
            fd = conn.fileno()
            code = driver.run_connection(options.args, options.qmail_home, env,
                                         connection_id=connection_id, infd=fd, outfd=fd,
                                         driver=pool.driver) << 8
        except Exception as e:  # a bug: one log line, never the worker
            pool.log("serve: %s: %s: %s" % (connection_id, type(e).__name__, e))
        finally:
            conn.close()
            # idle before the end line: once it is logged, -C counts this one no more
            pool.scoreboard.set_state(self.slot, IDLE)
            if options.verbose and begun:
                self._report("E %s %d" % (connection_id, code))

    def _proxied(self, conn, remote, connection_id):
        """--proxy: (local, remote) of the real client, from the PROXY header a
        trusted balancer sends first; None for any other peer or header (one
        log line; the connection is closed without a byte).  The slot is busy
        meanwhile, with no client address for -C to count."""
        peer = driver.unmapped(remote[0].encode())
        try:
            if peer not in self.balancers:
                address = ipaddress.ip_address(peer.decode())
                if not any(address in net for net in self.options.proxies):
                    raise proxy.ProxyError(proxy.UNTRUSTED, "not a balancer of --proxy")
                self.balancers.add(peer)
            self.pool.scoreboard.set(self.slot, self.pid, BUSY)
            header = driver.read_proxy_header(conn.fileno(), self.options.proxy_timeout)
        except proxy.ProxyError as e:
            driver.write_quietly(2, ("%s %s %s\n" % (connection_id, word(peer), e.log_text()))
                                 .encode("utf-8", "backslashreplace"))
            return None
        return header.destination, header.source

    def _environment(self, local, remote, rule):
        pool, options = self.pool, self.options
        local_name = options.local_name
        remote_name = None
        if pool.names is not None:
            if options.remote_host:
                remote_name = pool.names.name_of(driver.unmapped(
                    remote[0].encode()).decode("ascii"))
            if local_name is None:
                local_name = pool.names.name_of(driver.unmapped(
                    local[0].encode()).decode("ascii"))
                local_name = local_name and os.fsdecode(local_name)
        env = connection_env(pool.base_env, local, remote, local_name, remote_name)
        if rule is not None:
            env.update(rule[1])
        return env


def _send_quietly(conn, data):
    try:
        conn.settimeout(5)
        conn.sendall(data)
    except OSError:
        pass


def _rss_mib():
    """This process's resident memory now, in MiB (/proc/self/statm counts pages;
    the peak of getrusage would count the parent's too, inherited at the fork)."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            return int(os.read(fd, 256).split()[1]) * mmap.PAGESIZE >> 20
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return 0

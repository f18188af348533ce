"""Prometheus metrics of the pool: `qmail-smtpd-py serve --metrics HOST:PORT`.

Theory of operation.  Sessions run in workers, separate processes that come
and go (-n, --max-rss, SIGHUP), so the counts are kept the way
prometheus_client's multiprocess mode keeps them: each process adds to its
own memory-mapped files in a directory the parent makes
(PROMETHEUS_MULTIPROC_DIR, on /dev/shm when it can), and a scrape sums the
files.  A worker's files outlive it: when the parent reaps a worker it folds
the worker's counters and histograms into archive files of its own and
removes the worker's, so the counts survive worker turnover and a scrape
reads a few files per live worker, not one per worker that ever ran.
Workers keep no gauges (a dead worker's gauge would linger): the busy and
idle workers and the listen backlog are read by the parent at scrape time,
from the scoreboard and the listening socket.

What a worker counts comes as data.  The core's Log requests carry a fact
(requests.Closed, Refused, Accepted) beside the log line, at every
SMTPLOGLEVEL; MeteredDriver, the driver of pool sessions with --metrics,
counts them and times the plugin, SMTPEXTFORK and qmail-queue children it
runs.  The per-connection path (tcpserver) never imports this module, nor
does the pool without --metrics.

The endpoint is served by the parent, in its own select loop: a
non-blocking listening socket and its connections beside the status and
signal pipes, each scrape answered whole in one pass.  Not a thread: the
parent forks workers, and a fork taken while a server thread holds a lock
(prometheus_client's, an allocator's, the import lock) leaves the worker
with that lock held for ever.  Not a child process either: the parent folds
the files of dead workers, and a scrape in the same loop can never see a
worker's counts twice (in its file and in the archive) or not at all.
"""

import os
import shutil
import socket
import struct
import tempfile
import time

from . import driver
from .core import requests as rq
from .core.logline import word
from .core.spp import plugin_entry

DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it at import
INHERIT = "QMAIL_SMTPD_PY_METRICS"      # "FD DIRECTORY", kept over a SIGHUP re-exec
PREFIX = "qmail_smtpd_py_"
# Seconds: a preloaded plugin takes about a millisecond, an exec'd Python one 20 ms.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_REQUEST = 8192     # bytes of an HTTP request head
MAX_CLIENTS = 8        # scrape connections at once; more wait in the backlog
CLIENT_TIMEOUT = 10.0  # seconds a scrape connection may stay
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

instruments = None  # the Instruments, once Metrics.start() ran (inherited by the workers)


def parse_address(text):
    """HOST:PORT (an IPv6 HOST in brackets) -> (host, port); ValueError."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("give HOST:PORT, e.g. 127.0.0.1:9425 or [::1]:9425")
    return host, int(port)


class Instruments:
    """The metrics the workers (and the parent) add to."""

    def __init__(self, prometheus):
        def counter(name, text, labels=()):
            return prometheus.Counter(PREFIX + name, text, labels, registry=None)

        def histogram(name, text, labels=()):
            return prometheus.Histogram(PREFIX + name, text, labels, buckets=BUCKETS,
                                        registry=None)

        self.sessions = counter(
            "sessions", "SMTP sessions ended, by the why= and status= of their close log "
            "line; why=controls also counts sessions that could not read their control files, "
            "why=worker-died those of killed workers, why=internal those ended by an "
            "internal error", ("why", "status"))
        self.refusals = counter(
            "refusals", "Commands refused, by the check of the refuse log line (by=), the "
            "verb (OTHER: not a command) and the reply code", ("by", "verb", "code"))
        self.messages = counter("messages_queued", "Messages qmail-queue accepted "
                                "(accept log lines)")
        self.message_bytes = counter("queued_bytes", "Bytes of the accepted messages, as "
                                     "the bytes= of their accept log lines")
        self.recipients = counter("queued_recipients", "Envelope recipients of the accepted "
                                  "messages")
        self.queue_results = counter(
            "queue_results", "qmail-queue runs by how they ended: exit_N (its exit code), "
            "signal_N, wait_failed, or not_started_pipe/fork/exec", ("result",))
        self.queue_seconds = histogram(
            "queue_seconds", "From the end of a message to qmail-queue's exit: what the "
            "client waits for after its final dot")
        self.plugin_seconds = histogram(
            "plugin_seconds", "qmail-spp plugin runs, from the start to the exit, by "
            "smtpplugins entry", ("plugin",))
        self.extfork_seconds = histogram(
            "extfork_seconds", "SMTPEXTFORK program runs, from the start to the exit",
            ("program",))
        self.refused_connections = counter(
            "refused_connections", "Connections closed before their session: per-ip (-C, "
            "answered 421) or deny (a tcprules deny rule)", ("limit",))
        for limit in ("per-ip", "deny"):  # both shown from the start, at 0
            self.refused_connections.labels(limit)
        self.max_connections_reached = counter(
            "max_connections_reached", "Sessions that took the last of the -c slots: until "
            "one ends, the next connections wait in the listen backlog")
        self.workers_started = counter("workers_started", "Worker processes forked (with "
                                       "--fork: one per connection)")


class MeteredDriver(driver.Driver):
    """The driver of a pool session with --metrics.  A fact is counted before
    its line is written, so that a scrape never shows fewer events than the
    log had before it."""

    def run(self, steps):
        self.closed = False
        code = driver.Driver.run(self, steps)
        if not self.closed:  # an internal error ended it, without a close event
            instruments.sessions.labels("internal", str(code)).inc()
        return code

    def write_log(self, request):
        fact = request.fact
        if fact is not None:
            kind = type(fact)
            if kind is rq.Closed:
                self.closed = True
                instruments.sessions.labels(fact.why, str(fact.status)).inc()
            elif kind is rq.Refused:
                instruments.refusals.labels(fact.by, fact.verb, fact.code).inc()
            elif kind is rq.Accepted:
                instruments.messages.inc()
                instruments.message_bytes.inc(fact.size)
                instruments.recipients.inc(fact.rcpts)
        driver.Driver.write_log(self, request)

    def start_plugin(self, request):
        self.plugin_began = time.monotonic()
        self.plugin_name = word(plugin_entry(request.argv))
        return driver.Driver.start_plugin(self, request)

    def finish_plugin(self, request):
        outcome = driver.Driver.finish_plugin(self, request)
        instruments.plugin_seconds.labels(self.plugin_name).observe(
            time.monotonic() - self.plugin_began)
        return outcome

    def run_program(self, request):
        began = time.monotonic()
        outcome = driver.Driver.run_program(self, request)
        if type(outcome) is not rq.CannotStart:
            instruments.extfork_seconds.labels(word(request.path)).observe(
                time.monotonic() - began)
        return outcome

    def start_queue(self, request):
        outcome = driver.Driver.start_queue(self, request)
        if type(outcome) is rq.CannotStart:
            instruments.queue_results.labels("not_started_" + outcome.reason).inc()
        return outcome

    def finish_queue(self, request):
        began = time.monotonic()
        outcome = driver.Driver.finish_queue(self, request)
        instruments.queue_seconds.observe(time.monotonic() - began)
        instruments.queue_results.labels(queue_result(outcome)).inc()
        return outcome

    _HANDLERS = {**driver.Driver._HANDLERS, rq.Log: write_log, rq.StartPlugin: start_plugin,
                 rq.FinishPlugin: finish_plugin, rq.RunProgram: run_program,
                 rq.StartQueue: start_queue, rq.FinishQueue: finish_queue}


def queue_result(outcome):
    """The queue_results label of a FinishQueue outcome."""
    kind = type(outcome)
    if kind is rq.Exited:
        return "exit_%d" % outcome.code
    if kind is rq.Signaled:
        return "signal_%d" % outcome.signal
    return "wait_failed"


def listen_backlog(sock):
    """Connections waiting in a listening TCP socket's accept queue (Linux
    reports it as tcpi_unacked of a listener's tcp_info), or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return None
    return struct.unpack_from("=I", info, 24)[0] if len(info) >= 28 else None


class _Scrape:
    __slots__ = ("since", "request", "reply")

    def __init__(self, now):
        self.since = now
        self.request = b""
        self.reply = None  # the response not sent yet, once the request is read


class Metrics:
    """The parent's side: the endpoint, the directory, the archive.

    open() binds the endpoint (before the pool drops its privileges) or takes
    the one kept over a re-exec; prepare() makes the directory and imports
    prometheus_client (also before the drop); start() makes the instruments
    (after it, before the first fork); the pool's select loop calls
    readers(), writers() and handle(); worker_gone() folds a reaped worker's
    files; in_worker() lets a forked worker drop the parent's sockets; keep()
    passes the socket and directory over a re-exec; close() removes it all."""

    def __init__(self, address, log, state):
        self.address = address
        self.log = log
        self.state = state     # () -> (busy, idle, max_connections, listening socket)
        self.parent = os.getpid()
        self.listener = None
        self.directory = None
        self.clients = {}      # socket -> _Scrape
        self.archives = {}     # "counter", "histogram" -> MmapedDict
        self.registry = None
        self.generate = None
        self._prometheus = None  # prometheus_client and the parts of it start() uses
        self._gauge_family = self._mmaped_dict = self._collector = None

    def open(self):
        kept = os.environ.pop(INHERIT, None)
        if kept:
            fd, _, self.directory = kept.partition(" ")
            self.listener = socket.socket(fileno=int(fd))
            os.set_inheritable(self.listener.fileno(), False)
        else:
            host, port = self.address
            family, _, _, _, where = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
            self.listener = socket.create_server(where, family=family, backlog=16)
        self.listener.setblocking(False)

    def prepare(self, uid=None, gid=None):
        """The directory (the sessions' user's) and prometheus_client, imported
        in multiprocess mode (before the pool imports its plugins' modules)."""
        if self.directory is None:
            shm = "/dev/shm"
            base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
            self.directory = tempfile.mkdtemp(prefix="qmail-smtpd-py-metrics-", dir=base)
            if os.geteuid() == 0 and (uid is not None or gid is not None):
                os.chown(self.directory, -1 if uid is None else uid, -1 if gid is None else gid)
        os.environ[DIRECTORY] = self.directory
        # Every module now, while the interpreter's files are readable (-u).
        try:
            import prometheus_client
            from prometheus_client import mmap_dict, multiprocess, values
            from prometheus_client.core import GaugeMetricFamily
        except ImportError as e:
            raise OSError("--metrics needs prometheus_client (pip install "
                          "'qmail-smtpd-py[metrics]'): %s" % e) from None
        if not values.ValueClass._multiprocess:  # imported before the variable was set
            raise OSError("prometheus_client was loaded before %s was set" % DIRECTORY)
        self._prometheus = prometheus_client
        self._gauge_family = GaugeMetricFamily
        self._mmaped_dict = mmap_dict.MmapedDict
        self._collector = multiprocess.MultiProcessCollector

    def start(self):
        """After the privileges are dropped (the files are the sessions'
        user's: a re-executed parent must open them again), before the first
        fork: the instruments, the archive and the scrape registry."""
        global instruments
        prometheus_client = self._prometheus
        instruments = Instruments(prometheus_client)
        self.archives = {kind: self._mmaped_dict(os.path.join(self.directory,
                                                              "%s_archive.db" % kind))
                         for kind in ("counter", "histogram")}
        self.registry = prometheus_client.CollectorRegistry()
        self._collector(self.registry, self.directory)
        self.registry.register(_PoolGauges(self.state, self._gauge_family))
        self.generate = prometheus_client.generate_latest

    def where(self):
        host, port = self.listener.getsockname()[:2]
        return "http://%s:%d/metrics" % ("[%s]" % host if ":" in host else host, port)

    # ------------------------------------------------------------ workers

    def worker_started(self):
        instruments.workers_started.inc()

    def worker_died_in_session(self, status):
        instruments.sessions.labels("worker-died", str(status)).inc()

    def worker_gone(self, pid):
        """Fold the counts of a reaped worker into the archive and remove its
        files (live gauges: none are kept, see the module's docstring)."""
        for kind, archive in self.archives.items():
            path = os.path.join(self.directory, "%s_%d.db" % (kind, pid))
            try:
                found = list(self._mmaped_dict.read_all_values_from_file(path))
            except FileNotFoundError:
                continue
            except (OSError, RuntimeError) as e:  # damaged: its counts are lost, not the others'
                self.log("serve: metrics: %s: %s" % (path, e))
                found = []
            for key, value, _, _ in found:
                total, _ = archive.read_value(key)
                archive.write_value(key, total + value, 0.0)
            os.unlink(path)

    def connection_refused(self, limit):
        instruments.refused_connections.labels(limit).inc()

    def max_connections_reached(self):
        instruments.max_connections_reached.inc()

    def in_worker(self):
        """In a forked worker: the parent's sockets and archive are not its own."""
        for sock in [self.listener, *self.clients]:
            sock.close()
        self.clients = {}
        for archive in self.archives.values():
            archive.close()
        self.archives = {}

    # ------------------------------------------------------------ the endpoint

    def readers(self):
        waiting = [sock for sock, scrape in self.clients.items() if scrape.reply is None]
        if len(self.clients) < MAX_CLIENTS:
            waiting.append(self.listener)
        return waiting

    def writers(self):
        return [sock for sock, scrape in self.clients.items() if scrape.reply is not None]

    def handle(self, readable, writable):
        """Accept, read and answer what select() found ready; drop the slow."""
        now = time.monotonic()
        if self.listener in readable:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # gone already, or out of descriptors: the next loop retries
                pass
            else:
                sock.setblocking(False)
                self.clients[sock] = _Scrape(now)
        for sock, scrape in list(self.clients.items()):
            try:
                if sock in readable and scrape.reply is None:
                    self._read(sock, scrape)
                elif sock in writable:
                    scrape.reply = scrape.reply[sock.send(scrape.reply):]
                    if not scrape.reply:
                        self._drop(sock)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(sock)
            if sock in self.clients and now - scrape.since > CLIENT_TIMEOUT:
                self._drop(sock)

    def _read(self, sock, scrape):
        data = sock.recv(4096)
        if not data:
            self._drop(sock)
            return
        scrape.request += data
        head = scrape.request.replace(b"\r\n", b"\n")
        if b"\n\n" in head:
            scrape.reply = self._answer(head.split(b"\n", 1)[0])
        elif len(scrape.request) > MAX_REQUEST:
            scrape.reply = _response(b"431 Request Header Fields Too Large", b"")

    def _answer(self, line):
        """The HTTP/1.0 response to a request line."""
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(b"400 Bad Request", b"")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"", b"Allow: GET, HEAD\r\n")
        if target != b"/metrics":
            return _response(b"404 Not Found", b"see /metrics\n")
        try:
            body = self.generate(self.registry)
        except Exception as e:  # a bug: one log line, never the pool
            self.log("serve: metrics: %s: %s" % (type(e).__name__, e))
            return _response(b"500 Internal Server Error", b"")
        return _response(b"200 OK", body, head_only=method == b"HEAD")

    def _drop(self, sock):
        self.clients.pop(sock, None)
        sock.close()

    # ------------------------------------------------------------ the end

    def keep(self):
        """The environment that hands the endpoint and directory to the
        re-executed parent."""
        os.set_inheritable(self.listener.fileno(), True)
        return {os.fsencode(INHERIT): os.fsencode("%d %s" % (self.listener.fileno(),
                                                            self.directory))}

    def close(self):
        for sock in [*self.clients, self.listener]:
            if sock is not None:
                sock.close()
        self.clients = {}
        for archive in self.archives.values():
            archive.close()
        # Only the pool's parent: a forked child unwinding into its code (a bug) must
        # not take the live workers' files with it.
        if self.directory is not None and os.getpid() == self.parent:
            shutil.rmtree(self.directory, ignore_errors=True)


def _response(status, body, extra=b"", head_only=False):
    content = b"Content-Type: %s\r\n" % (CONTENT_TYPE if status == b"200 OK"
                                           else b"text/plain; charset=utf-8")
    return (b"HTTP/1.0 %s\r\n%s%sContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, content, extra, len(body)) + (b"" if head_only else body))


class _PoolGauges:
    """The gauges a scrape reads from the pool itself."""

    def __init__(self, state, family):
        self.state = state
        self.family = family

    def collect(self):
        busy, idle, most, listener = self.state()
        workers = self.family(PREFIX + "workers", "Workers by state, from the scoreboard "
                              "at the time of the scrape", labels=("state",))
        workers.add_metric(("busy",), busy)
        workers.add_metric(("idle",), idle)
        yield workers
        yield self.family(PREFIX + "max_connections", "Most sessions at once (-c)", value=most)
        backlog = listen_backlog(listener) if listener is not None else None
        if backlog is not None:
            yield self.family(PREFIX + "listen_backlog", "Connections waiting in the listen "
                              "queue for a worker (the kernel accepted them; -c, or all "
                              "workers busy)", value=backlog)

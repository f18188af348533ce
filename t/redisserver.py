"""Redis for the tests: a real redis-server of our own, and a server that never answers.

RedisServer runs Debian's redis-server on a free loopback port, in a directory of its
own, without persistence (`--save '' --appendonly no`): nothing outlives the test run,
and the tests' data never meets another Redis.  stop() kills it (a Redis that dies
mid-run), start() brings it back on the same port, empty.

SilentServer accepts TCP connections and reads whatever is sent, but never replies: a
Redis that hangs.  A client with a read timeout gives up; one without would wait forever.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import redis

from helpers import free_port, require_program

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 15.0


def require_redis_server():
    """Skip the calling test when redis-server is missing (fail under CI)."""
    require_program(REDIS_SERVER, "redis-server")


class RedisServer:
    """redis-server on 127.0.0.1:port with its files in directory (and, with
    unix=True, also on the Unix socket directory/redis.sock: .socket)."""

    def __init__(self, directory, unix=False):
        require_redis_server()
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.socket = os.path.join(self.directory, "redis.sock") if unix else None
        self.port = None
        self.proc = None

    def url(self, db=0):
        return "redis://127.0.0.1:%d/%d" % (self.port, db)

    def client(self, db=0):
        """A redis-py client of the test's own (decode_responses off: keys are bytes)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10)

    def start(self):
        """Start on self.port (a free port the first time); waits until it answers PING."""
        for _ in range(5):
            port = self.port or free_port()
            log = os.path.join(self.directory, "redis.log")
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.directory, "--logfile", log,
                 "--daemonize", "no"]
                + (["--unixsocket", self.socket, "--unixsocketperm", "700"] if self.socket else []),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _pong(port):
                    self.port = port
                    return self
                time.sleep(0.05)
            self.stop()
            if self.port:  # the port we must keep was taken meanwhile
                break
        import pytest
        with open(os.path.join(self.directory, "redis.log"), errors="replace") as f:
            pytest.fail("redis-server did not start: %s" % f.read()[-2000:])

    def stop(self):
        """Kill it (SIGKILL: no goodbye to its clients) and wait until it is gone."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _pong(port):
    """True if something on port answers PING as Redis does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class SilentServer:
    """A TCP server on a free loopback port that accepts, reads and never replies."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self._conns = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, db=0):
        return "redis://127.0.0.1:%d/%d" % (self.port, db)

    def wait_received(self, timeout=30):
        """What was received so far, once something was (b"" after timeout)."""
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.01)
        return b"".join(self.received)

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(0.1)
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received.append(data)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self.sock.close()

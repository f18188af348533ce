"""HAProxy for the tests and benches: Debian's haproxy in the foreground, in front of
servers that read PROXY headers.

HAProxy runs with `-db` (foreground, no daemon), `mode tcp`, `balance roundrobin` and
one thread (so that sequential connections go to the servers in turn), its
configuration written to a directory of the caller's.  It listens on a socket the
caller has bound and passes on (`bind fd@N`): there is no race for a free port, and
connections wait in the socket's backlog until HAProxy takes them.  Every server line
has `send-proxy-v2`; `source` is the address HAProxy connects to the servers from
(the one their --proxy trusts).  No health checks, so no connection reaches a server
but the clients'.
"""

import os
import shutil
import signal
import socket
import subprocess

from helpers import require_program

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

CONFIG = """\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind fd@%(fd)d
    default_backend pools
backend pools
    balance roundrobin
    source %(source)s
%(servers)s"""


def require_haproxy():
    """Skip the calling test when haproxy is missing (fail under CI)."""
    require_program(HAPROXY, "haproxy")


def check_config(path, pass_fds=()):
    """(exit status, output) of `haproxy -c -f path`: 0 when HAProxy accepts it
    (pass_fds: the sockets its `bind fd@N` lines name)."""
    p = subprocess.run([HAPROXY, "-c", "-f", str(path)], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30, pass_fds=pass_fds)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


class HAProxy:
    """HAProxy on host (a free port: .port) balancing over servers, a list of
    (name, host, port), from source; its configuration and stderr in directory."""

    def __init__(self, directory, servers, source, host="127.0.0.1"):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.config = os.path.join(self.directory, "haproxy.cfg")
        self.log = os.path.join(self.directory, "haproxy.log")
        self.servers = servers
        self.source = source
        self.listener = socket.socket()
        self.listener.bind((host, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.proc = None

    def start(self):
        """Write the configuration, check it (RuntimeError with HAProxy's words if it
        is refused) and start HAProxy."""
        fd = self.listener.fileno()
        lines = "".join("    server %s %s:%d send-proxy-v2\n" % server for server in self.servers)
        with open(self.config, "w") as f:
            f.write(CONFIG % {"fd": fd, "source": self.source, "servers": lines})
        status, output = check_config(self.config, [fd])
        if status != 0:
            raise RuntimeError("haproxy -c refused %s: %s" % (self.config, output))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.config], pass_fds=[fd],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.listener.close()  # HAProxy has it now
        return self

    def stop(self):
        """SIGTERM (SIGKILL after 5 s) and wait."""
        self.listener.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

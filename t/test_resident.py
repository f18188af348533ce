"""The resident mode, `qmail-smtpd-py serve [-x RULES.cdb] [-c MAXCONN] [-l NAME] [-H] [-R]
HOST PORT [checkpassword args...]`, against the real tcpserver where both apply:

- the environment qmail-queue sees is the one a `tcpserver -H -R -l NAME -x RULES` child
  passes on (helpers.EnvQueue records it), tcprules `deny` closes without a greeting;
- -c: further connections wait (no greeting) until a session ends;
- SIGTERM: no new connections, the open sessions finish, then exit 0;
- a killed session is reaped and logged, the others go on;
- systemd socket activation (LISTEN_FDS=1, LISTEN_PID, the socket on fd 3);
- the checkpassword command line after HOST PORT reaches the sessions (SMTP AUTH);
- the command line: --help, usage errors.

Servers are started by helpers.TcpServers (fixtures `servers`, parametrized over both
launchers, and `tcpservers`, which starts either on request) and killed at teardown.
No assertion depends on timing: "no greeting yet" is a 0.5 s read that gets nothing,
everything else waits generously for an event.
"""

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys

import pytest
from test_tcpserver import tcprules

from helpers import SERVER, EnvQueue, TcpServer, children_of, require_server

TIMEOUT = 20  # seconds a client waits for any reply
GREETING = b"220 mx.example.org ESMTP\r\n"
BYE = b"221 mx.example.org\r\n"
NOGATEWAY = (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")


class Client:
    """A raw SMTP client on a loopback socket: whole replies, and "nothing yet" checks."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                             source_address=(source, 0))
        self.buf = b""

    def reply(self):
        """The next complete (possibly multi-line) reply; b"" if the server closed
        the connection (or reset it) before a complete reply."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] != b"-":
                    end = sum(len(x) + 2 for x in lines[:i + 1])
                    out, self.buf = self.buf[:end], self.buf[end:]
                    return out
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return b""
            self.buf += chunk

    def silent_for(self, seconds=0.5):
        """True if the server sent nothing (and did not close) within `seconds`."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            chunk = b""
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buf += chunk
        return False

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line + b"\r\n")
        return self.reply()

    def deliver(self, rcpt=b"u@example.com", body=b"Subject: x\r\n\r\nhi\r\n"):
        """MAIL, RCPT, DATA; returns the reply to the final dot."""
        assert self.cmd(b"MAIL FROM:<a@b.c>") == b"250 ok\r\n"
        assert self.cmd(b"RCPT TO:<" + rcpt + b">") == b"250 ok\r\n"
        assert self.cmd(b"DATA") == b"354 go ahead\r\n"
        self.send(body + b".\r\n")
        return self.reply()

    def quit(self):
        reply = self.cmd(b"QUIT")
        self.close()
        return reply

    def close(self):
        self.sock.close()


def closed_without_greeting(port, source="127.0.0.1"):
    """Connect and read: True if the connection is refused, or accepted and then closed
    (EOF or reset) without a byte; False if anything arrives. A connection that is left
    open without a word fails the calling test (socket.timeout after TIMEOUT)."""
    try:
        c = Client(port, source)
    except (ConnectionRefusedError, ConnectionResetError):
        # reset: accepted by the kernel, then the listening socket was closed (with a
        # timeout the connect is non-blocking, so it can report that as its result)
        return True
    try:
        try:
            data = c.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        return data == b""
    finally:
        c.close()


@pytest.fixture
def clients():
    """Client factory; every client is closed at teardown."""
    made = []

    def make(port, source="127.0.0.1"):
        c = Client(port, source)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def smtplib_relay(port, source="127.0.0.1"):
    """Deliver to a foreign domain (needs RELAYCLIENT) with smtplib; returns the client's
    own port (what the server sees as TCPREMOTEPORT)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=TIMEOUT,
                      source_address=(source, 0)) as s:
        client_port = s.sock.getsockname()[1]
        assert s.sendmail("a@b.c", ["u@elsewhere.org"], b"Subject: relay\r\n\r\nhi\r\n") == {}
    return client_port


def smtplib_local(port, source):
    """Deliver to a local domain (no RELAYCLIENT needed); returns the client's port."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=TIMEOUT,
                      source_address=(source, 0)) as s:
        client_port = s.sock.getsockname()[1]
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: local\r\n\r\nhi\r\n") == {}
    return client_port


def require_loopback_source(address):
    """Skip unless a socket can be bound to address (127.0.0.2: the whole 127/8 is
    loopback on Linux, so a test can be a second client address)."""
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError as e:
        pytest.skip("cannot bind %s: %s" % (address, e))


# ------------------------------------------------------------------ environment parity

RULES = (b'127.0.0.1:allow,RELAYCLIENT="",RULEVAR="for 127.0.0.1",PROTO="overridden?"\n'
         b':allow,RULEVAR="default rule"\n')

# What the launcher's environment holds besides PATH, QMAILHOME and QMAILQUEUE: a plain
# variable that both must pass on, and stale connection variables both must replace or
# remove (-H: no TCPREMOTEHOST, -R: no TCPREMOTEINFO, -l: TCPLOCALHOST=mx.test).
LAUNCH_ENV = {"SITEVAR": "passed on", "TCPREMOTEHOST": "stale.example",
              "TCPREMOTEINFO": "stale-ident", "TCPLOCALHOST": "stale.example",
              "TCPREMOTEPORT": "1", "TCPLOCALPORT": "2"}

# Excluded from the comparison, and only these: the two ports, which differ legitimately
# (each server listens on its own free port, each client connects from its own ephemeral
# port); each run's values are checked against the real ports instead. Everything else
# must be equal, including what neither launcher sets itself: PATH, QMAILHOME, QMAILQUEUE,
# LC_CTYPE (Python's C locale coercion, in the session under either launcher), PWD (the
# recording sh), and the SMTP* variables the session adds.
PER_CONNECTION = ("TCPLOCALPORT", "TCPREMOTEPORT")
PER_CONNECTION6 = ("TCP6LOCALPORT", "TCP6REMOTEPORT")


def test_queue_environment_is_the_same_under_tcpserver_and_serve(tcpservers, home, tmp_path):
    """One tcprules CDB (made by tcprules), `tcpserver -H -R -l mx.test -x rules.cdb` and
    `serve -H -R -l mx.test -x rules.cdb`: qmail-queue's environment, for the rule of
    127.0.0.1 (relaying) and for the default rule (a client on 127.0.0.2)."""
    require_loopback_source("127.0.0.2")
    rules = tcprules(tmp_path, "parity", RULES)
    queue = EnvQueue(home)
    env = dict(LAUNCH_ENV, QMAILQUEUE=queue.path)
    seen = {}
    ipv4_only_tcpserver = False
    for mode in ("tcpserver", "resident"):
        server = tcpservers.start(home, env=env, rules=rules, mode=mode)
        before = len(home.queued())
        relay_port = smtplib_relay(server.port)                # rule 127.0.0.1
        local_port = smtplib_local(server.port, "127.0.0.2")  # the default rule
        relayed, local = home.queued(before)
        assert relayed.recipients == [b"u@elsewhere.org"]
        assert local.recipients == [b"u@example.com"]
        for name, msg, client_port in (("127.0.0.1", relayed, relay_port),
                                       ("default", local, local_port)):
            e = queue.text(msg.pid)
            local_port, remote_port = (e.pop(name) for name in PER_CONNECTION)
            assert (local_port, remote_port) == (str(server.port), str(client_port)), mode
            # serve sets ucspi-tcp-ipv6's TCP6* copies; the IPv4-only build does not.
            if mode == "tcpserver" and "TCP6REMOTEIP" not in e:
                ipv4_only_tcpserver = True
            if mode == "resident" and ipv4_only_tcpserver:
                e = {k: v for k, v in e.items() if not k.startswith("TCP6")}
            elif "TCP6REMOTEIP" in e or mode == "resident":
                ports6 = tuple(e.pop(name) for name in PER_CONNECTION6)
                assert ports6 == (local_port, remote_port), mode
            seen[mode, name] = e

    for rule in ("127.0.0.1", "default"):
        assert seen["resident", rule] == seen["tcpserver", rule], rule

    # and it is the right environment, not merely the same one
    e = seen["resident", "127.0.0.1"]
    assert e["RELAYCLIENT"] == "" and e["RULEVAR"] == "for 127.0.0.1"
    assert e["PROTO"] == "overridden?"  # rule assignments come after tcpserver's own
    assert (e["TCPREMOTEIP"], e["TCPLOCALIP"], e["TCPLOCALHOST"]) == (
        "127.0.0.1", "127.0.0.1", "mx.test")
    assert e["SITEVAR"] == "passed on"
    assert "TCPREMOTEHOST" not in e and "TCPREMOTEINFO" not in e
    d = seen["resident", "default"]
    assert "RELAYCLIENT" not in d and d["RULEVAR"] == "default rule"
    assert (d["PROTO"], d["TCPREMOTEIP"], d["TCPLOCALIP"]) == ("TCP", "127.0.0.2", "127.0.0.1")


def test_serve_without_l_sets_no_tcplocalhost(tcpservers, home):
    """`TCPLOCALHOST only with -l`: without -l a TCPLOCALHOST in serve's own environment
    must not reach the sessions (tcpserver would replace it by its own look-up of the
    local address, or remove it)."""
    queue = EnvQueue(home)
    server = tcpservers.start(home, env={"QMAILQUEUE": queue.path,
                                         "TCPLOCALHOST": "stale.example"},
                              mode="resident", local_name=None)
    smtplib_local(server.port, "127.0.0.1")
    (msg,) = home.queued()
    assert b"by 127.0.0.1 with SMTP" in msg.received
    assert "TCPLOCALHOST" not in queue.text(msg.pid)


# ------------------------------------------------------------------ deny


def test_deny_rule_closes_without_greeting(servers, home, tmp_path, clients):
    require_loopback_source("127.0.0.2")
    rules = tcprules(tmp_path, "deny", b"127.0.0.1:deny\n:allow\n")
    server = servers.start(home, rules=rules)
    assert closed_without_greeting(server.port)
    # the rule is per address: another client is served; the server goes on denying
    c = clients(server.port, "127.0.0.2")
    assert c.reply() == GREETING
    assert c.deliver().startswith(b"250 ok ")
    assert c.quit() == BYE
    assert closed_without_greeting(server.port)
    assert [m.recipients for m in home.queued()] == [[b"u@example.com"]]
    assert b"deny" in server.log_text()
    assert server.proc.poll() is None


# ------------------------------------------------------------------ -c


def test_connection_limit_makes_the_next_client_wait(servers, home, clients):
    """-c 1: while one session is open a second connection is accepted by the kernel but
    gets no greeting (it waits, it is not refused); when the first QUITs it is served."""
    server = servers.start(home, maxconn=1)
    first = clients(server.port)
    assert first.reply() == GREETING
    assert first.cmd(b"HELO first.test") == b"250 mx.example.org\r\n"

    second = clients(server.port)  # connects (listen backlog), but nobody greets it
    assert second.silent_for(0.5)
    assert len(server.session_pids(1)) == 1  # one session only

    assert first.quit() == BYE
    assert second.reply() == GREETING  # now it gets its turn
    assert second.deliver().startswith(b"250 ok ")
    assert second.quit() == BYE
    assert [status for _, status in server.ends(2)] == [0, 0]
    assert len(server.session_pids()) == 2
    assert [m.recipients for m in home.queued()] == [[b"u@example.com"]]


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_refuses_new_connections_and_drains(tcpservers, home, clients):
    """SIGTERM with a session open: new connections are refused (or closed unanswered),
    the open session still delivers and QUITs, then serve exits 0; nothing is lost."""
    server = tcpservers.start(home, mode="resident")
    open_session = clients(server.port)
    assert open_session.reply() == GREETING
    assert open_session.cmd(b"HELO c.test") == b"250 mx.example.org\r\n"
    (pid,) = server.session_pids(1)

    os.kill(server.pid, signal.SIGTERM)
    server.wait_log(re.compile(rb"got signal 15"))  # it took the signal (asynchronously)
    assert closed_without_greeting(server.port)
    assert server.proc.poll() is None  # still there: a session is open

    assert open_session.deliver().startswith(b"250 ok ")
    assert open_session.quit() == BYE
    assert server.proc.wait(TIMEOUT) == 0
    assert server.ends() == [(pid, 0)]
    assert server.session_pids() == [pid]  # nobody got in after the signal
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"
    assert closed_without_greeting(server.port)


# ------------------------------------------------------------------ a session crashes


def test_killed_session_is_reaped_and_the_others_go_on(tcpservers, home, clients):
    """SIGKILL one session's child: its end is logged (status 9), another open session
    delivers, serve keeps accepting, and no child of serve is left (no zombie)."""
    server = tcpservers.start(home, mode="resident")
    doomed = clients(server.port)
    assert doomed.reply() == GREETING
    (doomed_pid,) = server.session_pids(1)
    survivor = clients(server.port)
    assert survivor.reply() == GREETING
    assert survivor.cmd(b"HELO c.test") == b"250 mx.example.org\r\n"
    survivor_pid = server.session_pids(2)[1]
    assert set(children_of(server.pid)) == {doomed_pid, survivor_pid}

    os.kill(doomed_pid, signal.SIGKILL)
    assert doomed.reply() == b""  # the connection died with it
    assert server.ends(1) == [(doomed_pid, signal.SIGKILL)]

    assert survivor.deliver().startswith(b"250 ok ")
    assert survivor.quit() == BYE
    late = clients(server.port)  # the server still accepts
    assert late.reply() == GREETING
    assert late.quit() == BYE

    ends = server.ends(3)
    assert ends[0] == (doomed_pid, signal.SIGKILL)
    assert sorted(ends[1:]) == sorted((pid, 0) for pid in server.session_pids()[1:])
    assert server.proc.poll() is None
    assert children_of(server.pid) == {}  # reaped: no zombie (state Z) left behind
    assert [m.recipients for m in home.queued()] == [[b"u@example.com"]]


# ------------------------------------------------------------------ socket activation


def test_systemd_socket_activation(tcpservers, home, tmp_path):
    """A listening socket on fd 3 with LISTEN_FDS=1 and LISTEN_PID=serve's pid, no HOST
    PORT: serve accepts on it, and LISTEN_* do not reach the sessions."""
    require_server()
    queue = EnvQueue(home)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()

    def socket_on_fd_3():
        os.dup2(fd, 3)  # inheritable; close_fds=False keeps it (and nothing else of ours)

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QMAILHOME": home.path,
           "QMAILQUEUE": queue.path, "LISTEN_FDNAMES": "smtp"}
    # LISTEN_PID must be serve's own pid: the shell's, which exec keeps.
    cmd = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve -l mx.test', SERVER]
    try:
        p, log = tcpservers.spawn(cmd, env, preexec_fn=socket_on_fd_3, close_fds=False)
    finally:
        listener.close()  # serve has its own copy now
    assert tcpservers.wait_listening(p, log), log.read_bytes()

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=TIMEOUT) as s:
        assert s.sendmail("a@b.c", ["u@example.com"], b"Subject: activated\r\n\r\nhi\r\n") == {}
    (msg,) = home.queued()
    assert msg.envelope == b"Fa@b.c\0Tu@example.com\0\0"
    e = queue.text(msg.pid)
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(e)
    assert (e["TCPLOCALPORT"], e["TCPLOCALHOST"], e["PROTO"]) == (str(port), "mx.test", "TCP")
    server = TcpServer(port, log, p, "resident")
    assert server.ends(1) == [(pid, 0) for pid in server.session_pids(1)]
    assert p.poll() is None


# ------------------------------------------------------------------ checkpassword

CHECKPW = r'''#!%(python)s -IS
# fake checkpassword (t/test_resident.py): accepts joe/secret, records argv and the user
import json, os, sys
data = b""
while True:
    chunk = os.read(3, 4096)
    if not chunk:
        break
    data += chunk
fields = data.split(b"\0")
with open(%(record)r, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "user": fields[0].decode("latin-1")}) + "\n")
sys.exit(0 if fields[:2] == [b"joe", b"secret"] else 1)
'''


def fake_checkpassword(home):
    """(path, calls): calls() -> [{"argv": its arguments, "user": ...}, ...]."""
    record = os.path.join(home.root, "checkpw.jsonl")
    path = os.path.join(home.root, "checkpw")
    with open(path, "w") as f:
        f.write(CHECKPW % {"python": sys.executable, "record": record})
    os.chmod(path, 0o755)

    def calls():
        if not os.path.exists(record):
            return []
        with open(record) as f:
            return [json.loads(line) for line in f]

    return path, calls


def auth_relay(port):
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=TIMEOUT) as s:
        s.ehlo()
        assert s.has_extn("auth") and "LOGIN" in s.esmtp_features["auth"].split()
        assert s.mail("a@b.c") == (250, b"ok")
        assert s.rcpt("u@elsewhere.org") == NOGATEWAY  # not yet authenticated
        s.rset()
        assert s.login("joe", "secret")[0] == 235
        assert s.sendmail("a@b.c", ["u@elsewhere.org"], b"Subject: auth\r\n\r\nhi\r\n") == {}


def test_checkpassword_arguments_reach_the_sessions(servers, home):
    """The arguments after HOST PORT are the checkpassword command line: AUTH LOGIN as
    joe/secret, then relaying to a foreign domain."""
    checkpw, calls = fake_checkpassword(home)
    server = servers.start(home, env={"SMTPAUTH": ""},
                           args=(checkpw, "/bin/true", "two words"))
    auth_relay(server.port)
    (msg,) = home.queued()
    assert msg.recipients == [b"u@elsewhere.org"]
    assert b"(joe@127.0.0.1)" in msg.received and b"with ESMTPA;" in msg.received
    assert calls() == [{"argv": ["/bin/true", "two words"], "user": "joe"}]


def test_checkpassword_arguments_that_look_like_options(servers, home):
    """tcpserver stops reading options at HOST: `-s smtp` after it belongs to the
    checkpassword command line (as in `checkpassword-pam -s smtp /bin/true`), and so
    does serve: -s is neither taken for an option of serve nor refused."""
    checkpw, calls = fake_checkpassword(home)
    server = servers.start(home, env={"SMTPAUTH": ""}, args=(checkpw, "-s", "smtp", "/bin/true"))
    auth_relay(server.port)
    assert calls() == [{"argv": ["-s", "smtp", "/bin/true"], "user": "joe"}]


# ------------------------------------------------------------------ command line


def run_serve(*args, env=None, timeout=TIMEOUT):
    """Run `qmail-smtpd-py serve ARGS` to its end (killed after timeout: then the test
    fails with the output so far)."""
    require_server()
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    e.update(env or {})
    try:
        return subprocess.run([SERVER, "serve", *args], env=e, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail("serve %s is still running after %ds (serving?): %r"
                    % (" ".join(args), timeout, e.stderr))


def test_serve_help():
    p = run_serve("--help")
    assert p.returncode == 0, p.stderr
    assert b"LISTEN_FDS" in p.stdout
    assert b"HOST" in p.stdout and b"PORT" in p.stdout


@pytest.mark.parametrize("args", [(), ("127.0.0.1",), ("-l", "mx.test", "-c", "5")])
def test_serve_without_host_and_port_is_a_usage_error(args):
    p = run_serve(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert b"usage:" in p.stderr.lower() and b"HOST and PORT" in p.stderr


def test_serve_with_another_process_s_listen_fds_needs_host_and_port():
    """LISTEN_FDS with a LISTEN_PID that is not serve's own (inherited from a socket-activated
    parent) passes no socket: without HOST PORT that is a usage error, not a listener on
    some random port of 0.0.0.0."""
    p = run_serve("-l", "mx.test", env={"LISTEN_FDS": "1", "LISTEN_PID": "1"}, timeout=5)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert b"usage:" in p.stderr.lower()


@pytest.mark.parametrize("args", [("-c", "0", "127.0.0.1", "1"), ("127.0.0.1", "notaport")])
def test_serve_bad_options_are_usage_errors(args):
    p = run_serve(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert b"usage:" in p.stderr.lower()

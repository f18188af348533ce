"""Shared set-up for the bench/ scripts: the installed server, a throw-away qmail home
and a queue program that discards what it is given (so the figures measure the SMTP
server, not a queue)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BIN_DIR = os.path.dirname(sys.executable)
SERVER = os.environ.get("QMAIL_SMTPD_PY_SERVER") or os.path.join(BIN_DIR, "qmail-smtpd-py")

# Reads the message (fd 0) and then the envelope (fd 1) to EOF, exits 0.  In C
# when a compiler is at hand: the shell version starts three processes per
# message, which costs more than the SMTP session being measured.
DISCARD_QUEUE = "#!/bin/sh\ncat >/dev/null\nexec cat <&1 >/dev/null\n"
DISCARD_QUEUE_C = (b"#include <unistd.h>\nint main(void) { char b[65536];\n"
                   b"  while (read(0, b, sizeof b) > 0) ; while (read(1, b, sizeof b) > 0) ;\n"
                   b"  return 0; }\n")


def make_queue(path):
    """The discarding queue at path: compiled C if cc works, else the shell one."""
    source = path + ".c"
    with open(source, "wb") as f:
        f.write(DISCARD_QUEUE_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and subprocess.run([cc, "-O2", "-o", path, source],
                             stderr=subprocess.DEVNULL).returncode == 0:
        return
    with open(path, "w") as f:
        f.write(DISCARD_QUEUE)
    os.chmod(path, 0o755)


def setup(root=None, plugins=""):
    """Create a qmail home with a discarding queue; returns (home, environment).
    plugins is the content of control/smtpplugins."""
    if not os.path.exists(SERVER):
        sys.exit("%s is not installed: run `make bench`" % SERVER)
    root = root or tempfile.mkdtemp(prefix="qsmtpd-bench-")
    home = os.path.join(root, "home")
    os.makedirs(os.path.join(home, "control"))
    for name, text in {"me": "bench.example\n", "rcpthosts": "example.com\n",
                       "smtpplugins": plugins}.items():
        with open(os.path.join(home, "control", name), "w") as f:
            f.write(text)
    queue = os.path.join(root, "discard-queue")
    make_queue(queue)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TCPREMOTEIP": "127.0.0.1",
           "TCPLOCALIP": "127.0.0.1", "TCPLOCALHOST": "bench.example",
           "QMAILHOME": home, "QMAILQUEUE": queue}
    return root, env


def session(message):
    """One complete SMTP session delivering message (bytes, CRLF lines, not stuffed)."""
    return (b"HELO client.example\r\nMAIL FROM:<a@client.example>\r\n"
            b"RCPT TO:<u@example.com>\r\nDATA\r\n" + message + b".\r\nQUIT\r\n")



def converse(port, data):
    """Send a whole pipelined session to the loopback port; the replies up to the 221."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n221 " not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply

def check(out, status):
    if status != 0 or b"\r\n250 ok " not in out or not out.endswith(b"221 bench.example\r\n"):
        sys.exit("unexpected session result (exit %s): %r" % (status, out[-300:]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(mode, env, local_name, program=SERVER, log=None, options=(), first=b""):
    """A server on a free loopback port, output to the file log or nowhere; returns
    (process, port).  mode: "pool" (`qmail-smtpd-py serve`, the pre-forked workers),
    "fork" (`serve --fork`, a fork per connection), "tcpserver" (running program),
    or "qpsmtpd" (Debian's qpsmtpd-prefork, see qpsmtpd_config).  It is up once a
    connection that sends first (e.g. the PROXY header --proxy wants) is greeted."""
    port = free_port()
    if mode in ("pool", "fork"):
        cmd = [SERVER, "serve", "-H", "-R", "--root", "-c", "40", "-l", local_name,
               *(["--fork"] if mode == "fork" else []), *options, "127.0.0.1", str(port)]
    elif mode == "tcpserver":
        cmd = ["tcpserver", "-H", "-R", "-l", local_name, "-c", "40", *options, "127.0.0.1",
               str(port), program]
    elif mode == "qpsmtpd":
        cmd = ["qpsmtpd-prefork", "--listen-address", "127.0.0.1", "--port", str(port),
               "--children", "40", "--idle-children", "8", "--max-from-ip", "0",
               "--user", "root", *options]
    else:
        raise ValueError(mode)
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (kept by the server)
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    finally:
        if log:
            out.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(first)
                if s.recv(512).startswith(b"220"):
                    return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    stop_server(proc)
    sys.exit("%s server did not start" % mode)


def tree_cpu(pid):
    """CPU seconds (user + system) of pid and every process below it, with the
    children they have reaped (so a process that came and went still counts)."""
    children = {}
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(name))
        stats[int(name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0)
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def smtp_source():
    """(command, environment) for Postfix's smtp-source, or None.  Taken from
    $SMTP_SOURCE, else from a cache of the Debian package (fetched with
    `apt-get download postfix` and unpacked with `dpkg -x`: never installed)."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "qmail-smtpd-py-bench", "postfix")
    path = os.environ.get("SMTP_SOURCE") or os.path.join(cache, "usr", "sbin", "smtp-source")
    if not os.path.exists(path) and shutil.which("apt-get") and shutil.which("dpkg"):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(["apt-get", "download", "postfix"], cwd=cache, capture_output=True)
        debs = [n for n in os.listdir(cache) if n.startswith("postfix_") and n.endswith(".deb")]
        if debs:
            subprocess.run(["dpkg", "-x", os.path.join(cache, debs[0]), cache], capture_output=True)
    if not os.path.exists(path):
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(path)), "lib", "postfix")
    return path, {"LD_LIBRARY_PATH": libs, "PATH": "/usr/bin:/bin"}


def qpsmtpd_config(root, queue):
    """A config directory for qpsmtpd-prefork (QPSMTPD_CONFIG): no checks but
    rcpthosts, qmail-queue into our discarding queue, warnings only."""
    config = os.path.join(root, "qpsmtpd")
    os.makedirs(config, exist_ok=True)
    for name, text in {"plugins": "rcpt_ok\nqueue/qmail-queue %s\n" % queue,
                       "plugin_dirs": "/usr/share/qpsmtpd/plugins\n",
                       "me": "bench.example\n", "rcpthosts": "example.com\n",
                       "loglevel": "2\n", "logging": "logging/warn 2\n",
                       "spool_dir": os.path.join(root, "qpsmtpd-spool") + "\n"}.items():
        with open(os.path.join(config, name), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(root, "qpsmtpd-spool"), mode=0o700, exist_ok=True)
    return config


def stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.wait()

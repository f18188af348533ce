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


def check(out, status):
    if status != 0 or b"\r\n250 ok " not in out or not out.endswith(b"221 bench.example\r\n"):
        sys.exit("unexpected session result (exit %s): %r" % (status, out[-300:]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(mode, env, local_name, program=SERVER, log=None):
    """`qmail-smtpd-py serve` (mode "resident") or tcpserver running program on a free
    loopback port, output to the file log or nowhere; returns (process, port)."""
    port = free_port()
    if mode == "resident":
        cmd = [SERVER, "serve", "-c", "40", "-l", local_name, "127.0.0.1", str(port)]
    else:
        cmd = ["tcpserver", "-H", "-R", "-l", local_name, "-c", "40", "127.0.0.1", str(port),
               program]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (kept by the server)
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    finally:
        if log:
            out.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    stop_server(proc)
    sys.exit("%s server did not start" % mode)


def stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.wait()

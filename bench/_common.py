"""Shared set-up for the bench/ scripts: the installed server, a throw-away qmail home
and a queue program that discards what it is given (so the figures measure the SMTP
server, not a queue)."""

import os
import sys
import tempfile

BIN_DIR = os.path.dirname(sys.executable)
SERVER = os.environ.get("QMAIL_SMTPD_PY_SERVER") or os.path.join(BIN_DIR, "qmail-smtpd-py")

# Reads the message (fd 0) and then the envelope (fd 1) to EOF, exits 0.
DISCARD_QUEUE = "#!/bin/sh\ncat >/dev/null\nexec cat <&1 >/dev/null\n"


def setup(root=None):
    """Create a qmail home with a discarding queue; returns (home, environment)."""
    if not os.path.exists(SERVER):
        sys.exit("%s is not installed: run `make bench`" % SERVER)
    root = root or tempfile.mkdtemp(prefix="qsmtpd-bench-")
    home = os.path.join(root, "home")
    os.makedirs(os.path.join(home, "control"))
    for name, text in {"me": "bench.example\n", "rcpthosts": "example.com\n",
                       "smtpplugins": ""}.items():
        with open(os.path.join(home, "control", name), "w") as f:
            f.write(text)
    queue = os.path.join(root, "discard-queue")
    with open(queue, "w") as f:
        f.write(DISCARD_QUEUE)
    os.chmod(queue, 0o755)
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

"""Sessions per second over TCP: under tcpserver and in resident mode.

Each client process opens a connection, sends a whole 2 KB session at once
(the server handles the pipelining), reads up to the 221 and closes; it
repeats for a fixed time.  For 1, 2, 4 and 8 parallel clients the two modes
(and qpsmtpd under tcpserver, when installed) are measured in alternation,
round after round, and the medians of the rounds are printed.  The queue is
the discarding one of _common.py, so the figure is the SMTP front end's.
"""

import os
import shutil
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, session, setup, start_server, stop_server  # noqa: E402

CLIENTS = (1, 2, 4, 8)
ROUNDS = 3
SECONDS = 2.0  # per client count, mode and round
MESSAGE = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26
QPSMTPD = shutil.which("qpsmtpd")


def client(port, data, until):
    """Sessions until the deadline; the count is the exit status's payload via a pipe."""
    done = 0
    while time.monotonic() < until:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(data)
            reply = b""
            while not reply.endswith(b"\r\n") or b"\r\n221 " not in reply:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            if b"\r\n250 ok " not in reply:
                raise SystemExit("session failed: %r" % reply[-200:])
        done += 1
    return done


def measure(port, clients):
    data = session(MESSAGE)
    until = time.monotonic() + SECONDS
    pipes, pids = [], []
    start_time = time.monotonic()
    for _ in range(clients):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            count = client(port, data, until)
            os.write(w, b"%d" % count)
            os._exit(0)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    total = 0
    for r, pid in zip(pipes, pids):
        total += int(os.read(r, 32) or b"0")
        os.close(r)
        os.waitpid(pid, 0)
    return total / (time.monotonic() - start_time)


def main():
    if not shutil.which("tcpserver"):
        sys.exit("tcpserver (ucspi-tcp) is not installed")
    root, env = setup()
    modes = ["tcpserver", "resident"] + (["qpsmtpd"] if QPSMTPD else [])
    results = {(m, c): [] for m in modes for c in CLIENTS}
    try:
        for _ in range(ROUNDS):
            for clients in CLIENTS:
                for mode in modes:
                    proc, port = start_server(mode, env, "bench.example",
                                               QPSMTPD if mode == "qpsmtpd" else SERVER)
                    try:
                        results[mode, clients].append(measure(port, clients))
                    finally:
                        stop_server(proc)
        for clients in CLIENTS:
            figures = {m: statistics.median(results[m, clients]) for m in modes}
            print("sessions_per_second: %d client%s: %s; resident/tcpserver %.1fx" % (
                clients, "" if clients == 1 else "s",
                ", ".join("%s %.0f/s" % (m, figures[m]) for m in modes),
                figures["resident"] / figures["tcpserver"]))
        if not QPSMTPD:
            print("sessions_per_second: qpsmtpd not installed (apt-get install qpsmtpd to compare);"
                  " no C qmail-smtpd on this machine")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

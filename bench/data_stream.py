"""DATA throughput and memory.

Streams a 50 MB message (CRLF lines of 78 bytes; size from argv[1] in MB) through the
installed qmail-smtpd-py over pipes into a discarding queue, then a 2 KB message, and
prints MB/s and the server's peak RSS for each. A flat RSS between the two means DATA is
streamed, not buffered.

The session bytes come from a separate feeder process, so this script stays small: a
child's ru_maxrss starts from its parent's high-water mark at fork, and holding 50 MB
here would show up in the server's figure. ru_maxrss comes from wait4 on the server and
includes the small queue child it reaped.
"""

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, check, session, setup  # noqa: E402

MB = 1000 * 1000

# Writes one session with a message of about argv[1] bytes, 78-byte CRLF lines.
FEEDER = r"""
import os, sys
size = int(sys.argv[1])
head, tail = sys.argv[2].encode("latin-1").split(b"@MESSAGE@")
line = b"y" * 76 + b"\r\n"
out = sys.stdout.buffer
out.write(head + b"Subject: stream\r\n\r\n")
block = line * 840  # about 64 KB
lines = max(1, (size - 19) // len(line))
for _ in range(lines // 840):
    out.write(block)
out.write(line * (lines % 840))
out.write(tail)
out.flush()
"""


def run(size, env):
    """One session with a message of about size bytes; returns (seconds, peak RSS MB)."""
    template = session(b"@MESSAGE@").decode("latin-1")
    t0 = time.perf_counter()
    feeder = subprocess.Popen([sys.executable, "-I", "-c", FEEDER, str(size), template],
                              stdout=subprocess.PIPE)
    server = subprocess.Popen([SERVER], stdin=feeder.stdout, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env)
    feeder.stdout.close()
    out = server.stdout.read()
    _, wstatus, usage = os.wait4(server.pid, 0)
    elapsed = time.perf_counter() - t0
    server.returncode = os.waitstatus_to_exitcode(wstatus)
    server.stdout.close()
    feeder.wait()
    check(out, server.returncode)
    return elapsed, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def main():
    size = int(float(sys.argv[1]) * MB) if len(sys.argv) > 1 else 50 * MB
    root, env = setup()
    try:
        t_big, rss_big = run(size, env)
        t_small, rss_small = run(2000, env)
        print("data_stream: %.0f MB message at %.1f MB/s, peak RSS %.1f MB"
              " (2 KB message: %.1f MB, %.0f ms)"
              % (size / MB, size / MB / t_big, rss_big, rss_small, t_small * 1000))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

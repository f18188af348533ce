"""Cold-start cost of one complete SMTP session.

Runs N (default 200, or argv[1]) complete sessions of the installed qmail-smtpd-py over
pipes (greeting, HELO, MAIL, RCPT, DATA with a 2 KB message, QUIT; the queue discards;
one qmail-spp plugin, /bin/true in [rcpt], is configured and runs once), interleaved with
the same venv's `python -I -c pass`, and prints the medians and their ratio. The ratio
is the comparable figure: it factors out the machine's speed.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, check, session, setup  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
LINE = b"x" * 62 + b"\r\n"  # 64-byte lines
MESSAGE = b"Subject: bench\r\n\r\n" + LINE * 32  # about 2 KB


def main():
    root, env = setup(plugins="[rcpt]\n/bin/true\n")
    try:
        data = session(MESSAGE)
        smtp, bare = [], []
        for _ in range(N):
            t0 = time.perf_counter()
            p = subprocess.run([SERVER], input=data, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=env)
            t1 = time.perf_counter()
            check(p.stdout, p.returncode)
            subprocess.run([sys.executable, "-I", "-c", "pass"], env=env, check=True)
            t2 = time.perf_counter()
            smtp.append(t1 - t0)
            bare.append(t2 - t1)
        s, b = statistics.median(smtp) * 1000, statistics.median(bare) * 1000
        print("session_cold: %d sessions of %d bytes: median %.1f ms; python -I -c pass %.1f ms;"
              " ratio %.2f" % (N, len(MESSAGE), s, b, s / b))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

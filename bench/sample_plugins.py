"""What each sample plugin costs per call.

Runs every installed sample plugin (plugins/, installed next to qmail-smtpd-py) N times
(default 50, or argv[1]) with the environment of a typical call in its section, stdin
closed and stdout on a pipe, as the server runs it, and prints the median wall time.
The DNS plugins ask a DNS server on loopback (t/dnsserver.py) that answers at once, so
the figure is the plugins' own cost, not the network's. `python -I -c pass` is the
floor every Python plugin pays (a new interpreter per call). The greylist figure is a
known triplet in a warm database (the common case after the first day).

The last line is the comparable figure: the slowest plugin's median in ms.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "t"))
from _common import SERVER  # noqa: E402

from dnsserver import DNSServer  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
BIN = os.path.dirname(SERVER)
BASE = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "127.0.0.1",
        "SMTPHELOHOST": "client.example", "SMTPMAILFROM": "a@example.com",
        "SMTPRCPTTO": "u@example.org", "SMTPRCPTCOUNT": "0", "SMTPRCPTCOUNTALL": "1",
        "SMTPRCPTHOSTSOK": "1"}


def timed(argv, env, cwd):
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, env=env, cwd=cwd, check=False)
    return time.perf_counter() - t0


def median_ms(argv, env, cwd):
    timed(argv, env, cwd)  # warm the page cache and, for greylist, the database
    return statistics.median(timed(argv, env, cwd) for _ in range(N)) * 1000


def main():
    if not os.path.exists(os.path.join(BIN, "tarpit")):
        sys.exit("the sample plugins are not installed next to %s: run `make bench`" % SERVER)
    home = tempfile.mkdtemp(prefix="bench-plugins-")
    records = {"example.com": {"MX": ["10 mx.example.com."]},
               "7.2.0.192.zen.test": {}}  # not listed: the usual answer
    try:
        with DNSServer(records) as dns:
            dns_env = {"DNSCACHEIP": dns.cacheip}
            cases = [
                ("python -I -c pass", [sys.executable, "-I", "-c", "pass"], {}),
                ("ifauthnext", ["ifauthnext"], {"SMTPAUTHUSER": "joe"}),
                ("authlog", ["authlog"], {"SMTPAUTHUSER": "joe", "SMTPAUTHMETHOD": "plain"}),
                ("tarpit (under the count)", ["tarpit"], {"TARPITCOUNT": "50"}),
                ("badhelo (2 names)", ["badhelo", "example.net", ".spam.test"], {}),
                ("mfdnscheck (MX found)", ["mfdnscheck"], dns_env),
                ("rbl (not listed)", ["rbl", "zen.test"], dns_env),
                ("greylist (known triplet)", ["greylist"],
                 {"GREYLIST_DB": os.path.join(home, "greylist.sqlite3"),
                  "GREYLIST_DELAY": "0"}),
            ]
            results = []
            for name, argv, extra in cases:
                if not os.path.isabs(argv[0]):
                    argv = [os.path.join(BIN, argv[0])] + argv[1:]
                ms = median_ms(argv, dict(BASE, **extra), home)
                results.append((name, ms))
                print("  %-28s %6.1f ms" % (name, ms))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    floor = results[0][1]
    name, slowest = max(results[1:], key=lambda r: r[1])
    print("sample_plugins: %d calls each: slowest %s %.1f ms (python -I -c pass %.1f ms, "
          "ratio %.2f)" % (N, name, slowest, floor, slowest / floor))


if __name__ == "__main__":
    main()

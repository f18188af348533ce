"""What the PROXY protocol costs the pool: sessions per second and server CPU per
session with --proxy and a header, against the same pool without.

    .venv/bin/python bench/proxy.py [--seconds S] [--rounds R] [--clients N]
                                    [--no-haproxy]

Two pools with the same options (those of _common.start_server: -H -R -c 40, the
discarding C queue), one of them with --proxy 127.0.0.1, and the bench's own forked
clients (bench/pool.py), each sending its whole session in one segment, 2 KB of
message.  The modes:

  off      the pool without --proxy, no header
  v2       the --proxy pool; each session opens with a PROXY v2 header (28 bytes,
           TCP4 without TLVs: what HAProxy's send-proxy-v2 sends), sent by the client
  v1       the same with a v1 line (PROXY TCP4 ..., 44 bytes)
  haproxy  HAProxy (t/balancer.py: mode tcp, send-proxy-v2, one thread) in front of
           the --proxy pool: the clients connect to HAProxy, which sends the header;
           its own CPU per session is given apart (skipped without haproxy or with
           --no-haproxy)

The modes are measured in turn, round after round (A B C D, C A D B, ...: each
round in its own order, so that none is always first or after the same one), each
run long enough for about --seconds.  Server CPU is user + system time of the pool's
whole process tree (the workers, and the queues they reaped) divided by the
sessions of the run; the ratios to `off` are taken within each round, and the
medians of the rounds are printed.  The target is at most 5% more CPU per session
for the header.
"""

import argparse
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "t"))
from _common import SERVER, setup, start_server, stop_server, tree_cpu  # noqa: E402
from pool import own_clients  # noqa: E402

from balancer import HAPROXY, HAProxy  # noqa: E402
from helpers import proxy_v1, proxy_v2  # noqa: E402

CLIENT, MX = ("192.0.2.7", 4711), ("198.51.100.25", 25)
HEADERS = {"v2": proxy_v2(CLIENT, MX), "v1": proxy_v1(CLIENT, MX)}


def run(port, clients, count, prefix, pids):
    """count sessions on port: (sessions per second, [CPU ms per session of each
    process tree in pids])."""
    before = [tree_cpu(pid) for pid in pids]
    seconds = own_clients(port, clients, count, prefix=prefix)
    time.sleep(0.2)  # let the last sessions' processes be reaped into the tree's counts
    return count / seconds, [(tree_cpu(pid) - cpu) * 1000 / count
                             for pid, cpu in zip(pids, before)]


def reading_cost(header, count=3000):
    """Microseconds one driver.read_proxy_header takes in this process, the header
    and a session behind it waiting on a socket pair (the median call)."""
    from qmail_smtpd_py import driver
    times = []
    for _ in range(count):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(header + b"EHLO client.example\r\n")
            t0 = time.perf_counter()
            driver.read_proxy_header(ours.fileno(), 5.0)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per run (default 2)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4, help="sessions in parallel (default 4)")
    ap.add_argument("--no-haproxy", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(SERVER):
        sys.exit("%s is not installed: run `make bench`" % SERVER)
    root, env = setup(tempfile.mkdtemp(prefix="qsmtpd-bench-proxy-"))
    servers, balancer = [], None
    try:
        plain = start_server("pool", env, "bench.example")
        proxied = start_server("pool", env, "bench.example", options=("--proxy", "127.0.0.1"),
                               first=HEADERS["v2"])
        servers = [plain, proxied]
        # mode: (port, header the clients send, process trees measured: pool[, HAProxy])
        modes = {"off": (plain[1], b"", [plain[0].pid])}
        for version in ("v2", "v1"):
            modes[version] = (proxied[1], HEADERS[version], [proxied[0].pid])
        if not args.no_haproxy and os.access(HAPROXY, os.X_OK):
            balancer = HAProxy(os.path.join(root, "haproxy"),
                               [("pool", "127.0.0.1", proxied[1])], "127.0.0.1").start()
            modes["haproxy"] = (balancer.port, b"", [proxied[0].pid, balancer.proc.pid])
        counts = {}
        for mode, (port, prefix, pids) in modes.items():  # calibration: about --seconds a run
            rate, _ = run(port, args.clients, 60, prefix, pids)
            counts[mode] = max(60, int(rate * args.seconds))
        results = {mode: [] for mode in modes}
        order = list(modes)
        for number in range(args.rounds):
            random.Random(number).shuffle(order)  # no mode always first or after another
            for mode in order:
                port, prefix, pids = modes[mode]
                results[mode].append(run(port, args.clients, counts[mode], prefix, pids))
    finally:
        if balancer is not None:
            balancer.stop()
        for proc, _ in servers:
            stop_server(proc)
        shutil.rmtree(root, ignore_errors=True)
    report(args, results, {version: reading_cost(HEADERS[version]) for version in ("v2", "v1")})


def report(args, results, reading):
    """One line per mode (medians over the rounds), then the comparable figure."""
    median = statistics.median
    off = results["off"]
    print("proxy: %d clients, %d rounds of about %g s each, the bench's own clients"
          % (args.clients, args.rounds, args.seconds))
    more_cpu = {}
    for mode, runs in results.items():
        line = "proxy:   %-8s %5.0f sessions/s  %.2f ms pool CPU per session" % (
            mode, median([rate for rate, _ in runs]), median([cpu[0] for _, cpu in runs]))
        if mode != "off":
            cpu_ratio = median([cpu[0] / base[0] for (_, cpu), (_, base) in zip(runs, off)])
            rate_ratio = median([rate / base for (rate, _), (base, _) in zip(runs, off)])
            more_cpu[mode] = cpu_ratio - 1
            line += "  (against off: CPU x%.3f, sessions/s x%.2f)" % (cpu_ratio, rate_ratio)
        if mode == "haproxy":
            line += "; HAProxy %.2f ms per session" % median([cpu[1] for _, cpu in runs])
        print(line)
    base = median([cpu[0] for _, cpu in off]) * 1000
    print("proxy:   reading the header alone, in-process from a socket pair: %s"
          % ", ".join("%s %.1f us (%.1f%% of off's CPU per session)"
                      % (version, us, 100 * us / base) for version, us in reading.items()))
    print("proxy: the PROXY header costs the pool %s CPU per session (target <= +5%%)"
          % ", ".join("%s %+.1f%%" % (mode, 100 * more_cpu[mode]) for mode in ("v2", "v1")))


if __name__ == "__main__":
    main()

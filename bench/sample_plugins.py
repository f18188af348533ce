"""What each sample plugin costs per call: exec'd, and preloaded in the pool.

    .venv/bin/python bench/sample_plugins.py [--calls N] [--rounds R] [--exec-only]
                                             [--parts exec,pool,connection,chain]

1. Exec'd, as tcpserver's sessions run them: every installed sample plugin started N
   times (default 50) with the environment of a typical call in its section, stdin
   closed and stdout on a pipe; the median wall time.  `python -I -c pass` is the
   floor every exec'd Python plugin pays.
2. In the pool (`serve`, running the sessions as nobody, so that the plugins qualify for
   preloading; this needs root): the sample plugins run in the worker (they say
   RUN_IN_PROCESS), a copy without that line is forked per call; a pool per plugin
   with that plugin in [rcpt], and one
   without plugins; sessions with 10 RCPTs each, one client at a time, the pools taken
   in turn round after round.  A call costs the difference to the pool without plugins,
   divided by the calls: wall time and server CPU (the pool's whole process tree).  A
   `/bin/sh` script is the yardstick of the issue (a preloaded Python call against it).
3. The chain rbl ([connection]) + mfdnscheck ([mail]) + greylist ([rcpt]) on every
   session: the pool's sessions/s with the chain against without plugins, 4 clients.
4. One process per connection, as under tcpserver (the installed server over pipes):
   a session with the plugin in [rcpt] and 1 or 10 RCPTs, the plugin prepared at its
   first call (the default) against NOPRELOAD (exec'd each call), interleaved; the
   median wall time of the whole session.

The DNS plugins ask a DNS server on loopback (t/dnsserver.py) that answers at once;
greylist sees a known triplet in a warm database (the common case after the first day).
"""

import argparse
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
from _common import SERVER, converse, make_queue, start_server, stop_server, tree_cpu  # noqa: E402

from dnsserver import DNSServer  # noqa: E402

BIN = os.path.dirname(SERVER)
BASE = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "127.0.0.1",
        "SMTPHELOHOST": "client.example", "SMTPMAILFROM": "a@example.com",
        "SMTPRCPTTO": "u@example.org", "SMTPRCPTCOUNT": "0", "SMTPRCPTCOUNTALL": "1",
        "SMTPRCPTHOSTSOK": "1"}
RECORDS = {"example.com": {"MX": ["10 mx.example.com."]}, "client.example": {"MX": ["10 mx."]},
           "7.2.0.192.zen.test": {}, "1.0.0.127.zen.test": {}}  # not listed: the usual answer
RCPTS = 10


# ------------------------------------------------------------------ exec'd


def timed(argv, env, cwd):
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, env=env, cwd=cwd, check=False)
    return time.perf_counter() - t0


def exec_costs(args, home, dns):
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
         {"GREYLIST_DB": os.path.join(home, "exec-greylist.sqlite3"), "GREYLIST_DELAY": "0"}),
    ]
    print("sample_plugins: exec'd, median of %d calls:" % args.calls)
    results = []
    for name, argv, extra in cases:
        if not os.path.isabs(argv[0]):
            argv = [os.path.join(BIN, argv[0])] + argv[1:]
        env = dict(BASE, **extra)
        timed(argv, env, home)  # warm the page cache and, for greylist, the database
        ms = statistics.median(timed(argv, env, home) for _ in range(args.calls)) * 1000
        results.append((name, ms))
        print("  %-28s %6.1f ms" % (name, ms))
    return results


# ------------------------------------------------------------------ in the pool


def pool_home(root):
    """A qmail home and queue that nobody can read (the pool's sessions run as nobody)."""
    home = os.path.join(root, "home")
    os.makedirs(os.path.join(home, "control"))
    os.makedirs(os.path.join(home, "var"))
    os.chmod(os.path.join(home, "var"), 0o777)  # greylist's database
    for name, text in {"me": "bench.example\n", "rcpthosts": "example.com\n",
                       "smtpplugins": ""}.items():
        with open(os.path.join(home, "control", name), "w") as f:
            f.write(text)
    queue = os.path.join(root, "discard-queue")
    make_queue(queue)
    sh = os.path.join(root, "sh-plugin")
    with open(sh, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(sh, 0o755)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    return home, queue, sh


def forked_copy(root, name):
    """The installed sample plugin without its RUN_IN_PROCESS line: preloaded, each
    call is a fork (the way before in-process calls, and for scripts not marked)."""
    with open(os.path.join(BIN, name)) as f:
        text = f.read().replace("\nRUN_IN_PROCESS = True\n", "\n")
    path = os.path.join(root, name + "-forked")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def session_bytes(rcpts):
    return (b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\n"
            + b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(rcpts))
            + b"DATA\r\nSubject: bench\r\n\r\nhi\r\n.\r\nQUIT\r\n")


def sessions(port, count, rcpts):
    data = session_bytes(rcpts)
    for _ in range(count):
        reply = converse(port, data)
        if reply.count(b"250 ok\r\n") < rcpts + 1:  # MAIL and each RCPT
            raise SystemExit("session failed: %r" % reply[-300:])


def start_pool(home, queue, env, sections):
    """A pool with its own qmail-spp configuration (SPPCONFFILE: the homes are shared)."""
    conf = os.path.join(home, "control", "smtpplugins-%d" % len(os.listdir(
        os.path.join(home, "control"))))
    with open(conf, "w") as f:
        f.write("".join("[%s]\n%s\n" % item for item in sections))
    os.chmod(conf, 0o644)
    full = dict(env, QMAILHOME=home, QMAILQUEUE=queue, SPPCONFFILE=conf)
    return start_server("pool", full, "bench.example",
                        options=("-u", "65534", "-g", "65534", "--min-spare", "2"))


def pool_costs(args, root, dns, measure=True):
    """The per-call costs in the pool (measure False: only the home and environment
    the other parts use)."""
    home, queue, sh = pool_home(root)
    env = {"PATH": "/usr/bin:/bin", "DNSCACHEIP": dns.cacheip, "GREYLIST_DELAY": "0",
           "RBL_ZONES": "zen.test"}
    if not measure:
        return home, queue, env
    cases = [("no plugin", None), ("/bin/sh script", sh),
             ("ifauthnext", os.path.join(BIN, "ifauthnext")),
             ("ifauthnext, forked", forked_copy(root, "ifauthnext")),
             ("tarpit (under the count)", os.path.join(BIN, "tarpit")),
             ("mfdnscheck (MX found)", os.path.join(BIN, "mfdnscheck")),
             ("rbl (not listed)", os.path.join(BIN, "rbl")),
             ("greylist (known triplet)", os.path.join(BIN, "greylist")),
             ("greylist, forked", forked_copy(root, "greylist"))]
    servers = {}
    try:
        for name, plugin in cases:
            servers[name] = start_pool(home, queue, dict(env, TARPITCOUNT="50"),
                                       [("rcpt", plugin)] if plugin else [])
        port = servers["greylist (known triplet)"][1]
        try:  # greylist learns its triplets: a first attempt, then a retry a second later
            sessions(port, 1, RCPTS)
        except SystemExit:
            pass
        time.sleep(1.5)
        for _, port in servers.values():
            sessions(port, 5, RCPTS)  # warm up
        figures = {}
        count = args.calls
        for _ in range(args.rounds):
            for name, _ in cases:
                proc, port = servers[name]
                cpu0, t0 = tree_cpu(proc.pid), time.perf_counter()
                sessions(port, count, RCPTS)
                wall = time.perf_counter() - t0
                time.sleep(0.1)
                figures.setdefault(name, []).append(((tree_cpu(proc.pid) - cpu0) / count,
                                                     wall / count))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    base = figures.pop("no plugin")
    print("sample_plugins: in the pool (preloaded, sessions as nobody), per call: wall, "
          "server CPU")
    results = {}
    for name, runs in figures.items():
        walls = [(w - bw) / RCPTS * 1000 for (_, w), (_, bw) in zip(runs, base)]
        cpus = [(c - bc) / RCPTS * 1000 for (c, _), (bc, _) in zip(runs, base)]
        results[name] = (statistics.median(walls), statistics.median(cpus))
        print("  %-28s %6.2f ms %6.2f ms" % (name, *results[name]))
    sh_wall, sh_cpu = results["/bin/sh script"]
    py_wall, py_cpu = results["ifauthnext"]
    print("sample_plugins: a preloaded Python plugin call (ifauthnext) against a /bin/sh "
          "one: %.2fx wall, %.2fx CPU" % (py_wall / sh_wall, py_cpu / sh_cpu))
    return home, queue, env


def chain(args, home, queue, env):
    """The chain on every session against no plugins: sessions/s at 4 clients."""
    sys.path.insert(0, HERE)
    from _common import session
    from pool import MESSAGE, one_session, own_clients
    chained = [("connection", os.path.join(BIN, "rbl")), ("mail", os.path.join(BIN, "mfdnscheck")),
               ("rcpt", os.path.join(BIN, "greylist"))]
    servers = {"without plugins": start_pool(home, queue, env, []),
               "with the chain": start_pool(home, queue, env, chained)}
    rates = {}
    try:
        try:  # greylist learns the bench's triplet: refused now, known a second later
            one_session(servers["with the chain"][1], session(MESSAGE), None)
        except SystemExit:
            pass
        time.sleep(1.5)
        for _, port in servers.values():
            own_clients(port, 4, 40)
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                seconds = own_clients(port, 4, 400)
                rates.setdefault(name, []).append(400 / seconds)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    ratios = [c / w for c, w in zip(rates["with the chain"], rates["without plugins"])]
    print("sample_plugins: pool, 4 clients, rbl + mfdnscheck + greylist on every session: "
          "%.0f/s, without plugins %.0f/s: %.2fx" % (
              statistics.median(rates["with the chain"]),
              statistics.median(rates["without plugins"]), statistics.median(ratios)))


def per_connection(args, home, queue, env):
    """Sessions of the server over pipes (a process per connection), default
    against NOPRELOAD, for a few plugins and RCPT counts."""
    cases = [("ifauthnext", os.path.join(BIN, "ifauthnext")),
             ("mfdnscheck", os.path.join(BIN, "mfdnscheck")),
             ("greylist (known triplet)", os.path.join(BIN, "greylist"))]
    print("sample_plugins: one process per connection (over pipes), session wall time, "
          "median of %d: prepared at the first call / NOPRELOAD" % args.calls)
    for name, plugin in cases:
        conf = os.path.join(home, "control", "smtpplugins-pc")
        with open(conf, "w") as f:
            f.write("[rcpt]\n%s\n" % plugin)
        full = dict(env, QMAILHOME=home, QMAILQUEUE=queue, SPPCONFFILE=conf,
                    TCPREMOTEIP="192.0.2.7", TCPLOCALIP="127.0.0.1", TCPLOCALHOST="mx.test")
        # greylist: the triplets seen once, then (GREYLIST_DELAY=0) known a second later
        subprocess.run([SERVER], input=session_bytes(RCPTS), env=full, capture_output=True,
                       cwd=home)
        time.sleep(1.5)
        for rcpts in (1, RCPTS):
            data = session_bytes(rcpts)
            times = {"prepared": [], "NOPRELOAD": []}
            for _ in range(args.calls):
                for mode, extra in (("prepared", {}), ("NOPRELOAD", {"NOPRELOAD": ""})):
                    t0 = time.perf_counter()
                    out = subprocess.run([SERVER], input=data, env=dict(full, **extra),
                                         capture_output=True, cwd=home).stdout
                    times[mode].append(time.perf_counter() - t0)
                    if out.count(b"250 ok") < rcpts + 1:
                        raise SystemExit("session failed: %r" % out[-300:])
            a, b = (statistics.median(times[m]) * 1000 for m in ("prepared", "NOPRELOAD"))
            print("  %-28s %2d RCPT  %6.1f ms  %6.1f ms  (%.2fx)" % (name, rcpts, a, b, a / b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exec-only", action="store_true")
    ap.add_argument("--parts", default="exec,pool,connection,chain",
                    help="which of the parts to run (comma-separated)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not os.path.exists(os.path.join(BIN, "tarpit")):
        sys.exit("the sample plugins are not installed next to %s: run `make bench`" % SERVER)
    root = tempfile.mkdtemp(prefix="bench-plugins-")
    os.chmod(root, 0o755)
    try:
        with DNSServer(RECORDS) as dns:
            if "exec" in parts:
                exec_costs(args, root, dns)
            if args.exec_only:
                return
            if os.geteuid() != 0:
                print("sample_plugins: the pool part needs root (its sessions run as nobody, "
                      "so that the plugins qualify for preloading)")
                return
            home, queue, env = pool_costs(args, root, dns, "pool" in parts)
            if "connection" in parts:
                per_connection(args, home, queue, env)
            if "chain" in parts:
                chain(args, home, queue, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

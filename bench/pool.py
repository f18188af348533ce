"""Sessions per second and server CPU per session: the pool against the other modes.

    .venv/bin/python bench/pool.py [--seconds S] [--rounds R] [--clients 1,4,16]
                                   [--modes pool,fork,tcpserver,qpsmtpd] [--tls] [--pss]
                                   [--metrics]

Each mode's server runs on its own loopback port with the discarding C queue of
_common.py (so the figures are the SMTP front end's): `qmail-smtpd-py serve` (the
pool of pre-forked workers), `serve --fork` (the resident mode before the pool: a
fork per connection), tcpserver running qmail-smtpd-py (a new interpreter per
connection), and Debian's qpsmtpd-prefork when it is installed (its default
reverse lookups go to the system resolver; ours run with -H, as tcpserver -H).
The load is Postfix's smtp-source (fetched with `apt-get download postfix` and
unpacked with `dpkg -x`, never installed), one 2 KB message per connection, with
1, 4 and 16 sessions in parallel; without it, the bench's own forked clients.

The modes are measured in turn, round after round (A B C A B C ...), each run
long enough for about --seconds; the medians of the rounds are printed, with
ratios taken within each round.  Server CPU is user + system time of the
server's whole process tree (workers, and the queue processes they reaped),
divided by the sessions it served.

--tls: the pool's STARTTLS sessions (an ECDSA P-256 and an RSA 2048 certificate)
against its plain sessions, server CPU per session, with the bench's own client.
--pss: the memory of a pool of 40 idle workers that have served sessions: total
PSS, and private memory per worker.
--metrics: the pool with --metrics against the pool without, server CPU per session
(rounds A B A B ..., the first --clients figure; the counts of the last scrape are
checked against the sessions run), and the parent's CPU per scrape.
"""

import argparse
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    SERVER,
    free_port,
    qpsmtpd_config,
    session,
    setup,
    smtp_source,
    start_server,
    stop_server,
    tree_cpu,
)

MESSAGE = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26  # about 2 KB


def run_load(port, clients, count, source):
    """Deliver count messages with clients sessions in parallel; wall seconds."""
    if source is not None:
        path, env = source
        t0 = time.monotonic()
        subprocess.run([path, "-s", str(clients), "-m", str(count), "-l", "2048", "-M",
                        "client.example", "-f", "a@client.example", "-t", "u@example.com",
                        "127.0.0.1:%d" % port], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return time.monotonic() - t0
    return own_clients(port, clients, count)


def own_clients(port, clients, count, tls_context=None, prefix=b""):
    """The bench's own client: forked processes, each a share of count sessions
    (each opened with prefix, e.g. a PROXY header, when given)."""
    data = session(MESSAGE)
    t0 = time.monotonic()
    pids = []
    for n in range(clients):
        share = count // clients + (1 if n < count % clients else 0)
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(share):
                    one_session(port, data, tls_context, prefix)
            except BaseException as e:
                sys.stderr.write("client: %s\n" % e)
                os._exit(1)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if status:
            sys.exit("a client failed")
    return time.monotonic() - t0


def one_session(port, data, tls_context, prefix=b""):
    with socket.create_connection(("127.0.0.1", port)) as s:
        if tls_context is None:
            data = prefix + data  # one segment, as the plain session alone
        else:
            s.sendall(prefix)
            reader = s.makefile("rb")
            reader.readline()
            s.sendall(b"EHLO client.example\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            reader.readline()
            s = tls_context.wrap_socket(s, server_hostname="bench.example")
        s.sendall(data)
        reply = b""
        while b"\r\n221 " not in reply and not reply.startswith(b"221 "):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        lines = reply.split(b"\r\n")
        final = [b for a, b in zip(lines, lines[1:]) if a.startswith(b"354 ")]
        if not final or not final[0].startswith(b"250 "):  # the reply to the final dot
            raise SystemExit("session failed: %r" % reply[-200:])


def measure(proc, port, clients, count, source):
    """(sessions per second, server CPU ms per session) for one run."""
    cpu0 = tree_cpu(proc.pid)
    seconds = run_load(port, clients, count, source)
    time.sleep(0.2)  # let the last sessions' processes be reaped into the tree's counts
    cpu1 = tree_cpu(proc.pid)
    return count / seconds, (cpu1 - cpu0) * 1000 / count


def sessions(args, root, env, source):
    modes = [m for m in args.modes.split(",") if m != "qpsmtpd" or shutil.which(
        "qpsmtpd-prefork")]
    servers = {}
    try:
        for mode in modes:
            server_env = dict(env)
            if mode == "qpsmtpd":
                server_env["QPSMTPD_CONFIG"] = qpsmtpd_config(root, env["QMAILQUEUE"])
            servers[mode] = start_server(mode, server_env, "bench.example")
        clients_list = [int(c) for c in args.clients.split(",")]
        counts = {}
        for clients in clients_list:  # calibration: about --seconds per run
            for mode in modes:
                proc, port = servers[mode]
                rate, _ = measure(proc, port, clients, 60, source)
                counts[mode, clients] = max(60, int(rate * args.seconds))
        results = {}
        for _ in range(args.rounds):
            for clients in clients_list:
                for mode in modes:
                    proc, port = servers[mode]
                    results.setdefault((mode, clients), []).append(
                        measure(proc, port, clients, counts[mode, clients], source))
        print("pool: load: %s" % ("smtp-source (Postfix)" if source else "the bench's clients"))
        for clients in clients_list:
            row = []
            for mode in modes:
                rates = [r for r, _ in results[mode, clients]]
                cpus = [c for _, c in results[mode, clients]]
                row.append("%s %.0f/s %.2f ms" % (mode, statistics.median(rates),
                                                  statistics.median(cpus)))
            ratios = []
            for other in modes:
                if other != "pool":
                    per_round = [p[0] / o[0] for p, o in zip(results["pool", clients],
                                                              results[other, clients])]
                    ratios.append("pool/%s %.2fx" % (other, statistics.median(per_round)))
            print("pool: %2d clients: %s; %s" % (clients, ", ".join(row), ", ".join(ratios)))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


def certificate(root, kind):
    key, crt = os.path.join(root, kind + ".key"), os.path.join(root, kind + ".crt")
    spec = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ecdsa"
            else ["-newkey", "rsa:2048"])
    subprocess.run(["openssl", "req", "-x509", *spec, "-nodes", "-keyout", key, "-out", crt,
                    "-days", "2", "-subj", "/CN=bench.example"], check=True,
                   capture_output=True)
    with open(crt, "rb") as c, open(key, "rb") as k:
        return c.read() + k.read()


def tls(args, root, env):
    """STARTTLS against plain sessions in the pool: server CPU per session."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    cert_path = os.path.join(env["QMAILHOME"], "control", "servercert.pem")
    clients = int(args.clients.split(",")[0])
    figures = {}
    for kind in ("ecdsa", "rsa"):
        with open(cert_path, "wb") as f:
            f.write(certificate(root, kind))
        proc, port = start_server("pool", env, "bench.example")
        try:
            for _ in range(args.rounds):
                for name, ctx in (("plain", None), (kind, context)):
                    cpu0 = tree_cpu(proc.pid)
                    own_clients(port, clients, 400, ctx)
                    time.sleep(0.2)
                    figures.setdefault(name, []).append((tree_cpu(proc.pid) - cpu0) * 1000 / 400)
        finally:
            stop_server(proc)
    os.unlink(cert_path)
    plain = statistics.median(figures["plain"])
    for kind in ("ecdsa", "rsa"):
        cost = statistics.median(figures[kind])
        print("pool: %d clients: STARTTLS (%s) %.2f ms of server CPU per session, plain "
              "%.2f ms: %.2fx" % (clients, kind, cost, plain, cost / plain))


def pss(args, env):
    """40 idle workers that have served sessions: PSS and private memory."""
    proc, port = start_server("pool", env, "bench.example",
                              options=("--min-spare", "40", "--max-spare", "40"))
    try:
        own_clients(port, 16, 800)
        time.sleep(2)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                  capture_output=True, text=True).stdout.split()]
        total_pss = private = 0
        for pid in workers + [proc.pid]:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                fields = {k: int(v.split()[0]) for k, v in
                          (line.split(":", 1) for line in f if ":" in line and "kB" in line)}
            total_pss += fields["Pss"]
            if pid != proc.pid:
                private += fields["Private_Clean"] + fields["Private_Dirty"]
        print("pool: memory: %d workers and the parent: PSS %.1f MiB in all; private memory "
              "per worker %.2f MiB" % (len(workers), total_pss / 1024,
                                       private / 1024 / max(1, len(workers))))
    finally:
        stop_server(proc)


def metrics(args, env, source):
    """The pool with --metrics (B) against the pool without (A), interleaved."""
    import urllib.request
    mport = free_port()
    url = "http://127.0.0.1:%d/metrics" % mport
    servers = {"off": start_server("pool", env, "bench.example"),
               "on": start_server("pool", env, "bench.example",
                                  options=("--metrics", "127.0.0.1:%d" % mport))}
    clients = int(args.clients.split(",")[0])
    try:
        proc, port = servers["off"]
        rate, _ = measure(proc, port, clients, 100, source)
        count = max(200, int(rate * args.seconds))
        delivered = 0
        figures = {"off": [], "on": []}
        for _ in range(args.rounds):
            for name in ("off", "on"):
                proc, port = servers[name]
                figures[name].append(measure(proc, port, clients, count, source)[1])
                if name == "on":
                    delivered += count
        with urllib.request.urlopen(url) as r:
            text = r.read().decode()
        queued = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("qmail_smtpd_py_messages_queued_total"))
        if queued != delivered:
            sys.exit("metrics: %d messages counted, %d delivered" % (queued, delivered))
        proc, _ = servers["on"]
        cpu0 = tree_cpu(proc.pid)
        for _ in range(200):
            with urllib.request.urlopen(url) as r:
                r.read()
        scrape_ms = (tree_cpu(proc.pid) - cpu0) * 1000 / 200
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    ratios = [b / a for a, b in zip(figures["off"], figures["on"])]
    print("pool: load: %s" % ("smtp-source (Postfix)" if source else "the bench's clients"))
    print("pool: metrics: %d clients, %d rounds of %d sessions: server CPU per session %.2f ms "
          "without, %.2f ms with --metrics (median ratio %.3fx, rounds %s); %d messages counted "
          "as delivered; a scrape %.2f ms of the parent's CPU"
          % (clients, args.rounds, count, statistics.median(figures["off"]),
             statistics.median(figures["on"]), statistics.median(ratios),
             " ".join("%.3f" % r for r in ratios), queued, scrape_ms))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--modes", default="pool,fork,tcpserver,qpsmtpd")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--pss", action="store_true")
    ap.add_argument("--metrics", action="store_true")
    ap.add_argument("--own-client", action="store_true", help="not smtp-source")
    args = ap.parse_args()
    if not os.path.exists(SERVER):
        sys.exit("%s is not installed: run `make bench`" % SERVER)
    root, env = setup(tempfile.mkdtemp(prefix="qsmtpd-bench-pool-"))
    try:
        if args.tls:
            tls(args, root, env)
        elif args.pss:
            pss(args, env)
        elif args.metrics:
            metrics(args, env, None if args.own_client else smtp_source())
        else:
            sessions(args, root, env, None if args.own_client else smtp_source())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

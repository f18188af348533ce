"""What one rcptcheck resolution costs.

Builds a qmail installation in a temporary directory (control/locals and
virtualdomains, users/cdb compiled from users/assign by the project's
qmail-newu, home directories with .qmail files, the accounts in a passwd
file given by RCPTCHECK_PASSWD) and resolves a mix of recipients with
qmail_smtpd_py.recipients, imported once, the way plugins/rcptcheck does
per call: Resolver.from_environ(environment).check(address), so every
lookup reads the control files, users/cdb and the passwd file again and
stats the homes and .qmail files.  N rounds (default 500, or argv[1]) of
the mix, timed 5 times; the best time counts.

Then the real thing, as root: the installed plugin preloaded in the pool
(`serve` running its sessions as nobody, so that the script qualifies; the
pool's log must say "preloaded"; it runs in the worker, without a fork, as
its RUN_IN_PROCESS asks), over the same installation made readable
for nobody.  Two pools, one with rcptcheck in [rcpt] and one without
plugins, take sessions of 10 RCPTs (the local kinds of the mix, 3 of them
refused with 550 by the plugin, which is checked) in turn, round after
round; a call costs the difference in wall time (and in the pools' CPU)
divided by the calls, as bench/sample_plugins.py measures the others.  A
third pool with ifauthnext (which prints nothing for these sessions) is
the yardstick: what any preloaded call costs (the runner's set-up and
clean-up around the script).
The issue's target is 5 ms per call.

The last line is the comparable figure: milliseconds per resolution.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qmail_smtpd_py import cdbmake
from qmail_smtpd_py.recipients import REJECT, Resolver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, converse, make_queue, start_server, stop_server, tree_cpu

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
SESSIONS = 40  # per pool and round
ROUNDS = 5
RCPTS = 10
VDELIVERMAIL = b"| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n"

# (address, refused?): the common kinds of RCPT at a qmail site
MIX = [
    (b"joe@example.org", False),             # an account, no extension
    (b"joe-sos@example.org", False),         # .qmail-sos
    (b"joe-nosuch@example.org", True),       # no .qmail-nosuch, no .qmail-default
    (b"postmaster@example.org", False),      # alias user, .qmail-postmaster
    (b"first.last@example.org", True),       # alias user, nothing
    (b"info@virt.example.com", False),       # virtual domain, .qmail-info
    (b"anyone@vpop.example.net", False),     # users/cdb wildcard, .qmail-default
    (b"someone@elsewhere.example", False),   # not local
]


def build(root):
    """The installation under root; returns the plugin's environment (bytes)."""
    qmail = os.path.join(root, b"qmail")
    for sub in (b"control", b"users", b"homes"):
        os.makedirs(os.path.join(qmail if sub != b"homes" else root, sub))
    controls = {b"me": b"mail.example.org\n", b"locals": b"example.org\nmail.example.org\n",
                b"virtualdomains": b"virt.example.com:vjoe\nvpop.example.net:vpop.example.net\n"}
    for name, text in controls.items():
        with open(os.path.join(qmail, b"control", name), "wb") as f:
            f.write(text)
    uid = os.geteuid() or 1001
    homes = {}
    for name, files in ((b"joe", [b".qmail-sos", b".qmail-list-default"]),
                        (b"vjoe", [b".qmail-info"]),
                        (b"alias", [b".qmail-postmaster", b".qmail-root"]),
                        (b"vpop", [])):
        home = homes[name] = os.path.join(root, b"homes", name)
        os.mkdir(home, 0o755)
        if os.geteuid() == 0:
            os.chown(home, uid, 100)
        for file in files:
            open(os.path.join(home, file), "wb").close()
    with open(os.path.join(homes[b"vpop"], b".qmail-default"), "wb") as f:
        f.write(VDELIVERMAIL)
    with open(os.path.join(qmail, b"users", b"assign"), "wb") as f:
        f.write(b"=joe.shmoe:joe:1001:100:%s:-:shmoe:\n"
                b"+vpop.example.net-:vpop.example.net:89:89:%s:-::\n.\n"
                % (homes[b"joe"], homes[b"vpop"]))
    cdbmake.newu(qmail)
    passwd = os.path.join(root, b"passwd")
    with open(passwd, "wb") as f:
        f.write(b"root:x:0:0:root:/root:/bin/sh\n")
        for name in (b"joe", b"vjoe", b"alias"):
            f.write(b"%s:x:%d:100::%s:/bin/sh\n" % (name, uid, homes[name]))
        f.writelines(b"user%d:x:%d:100::/nonexistent:/bin/sh\n" % (i, 2000 + i)
                     for i in range(200))  # a passwd file of a realistic size
    return {b"QMAILHOME": qmail, b"RCPTCHECK_PASSWD": passwd}


def resolution_ms(env):
    """Best of 5 timings of N rounds of MIX: ms per resolution."""
    for rcpt, refused in MIX:  # warm the caches; and check the set-up is what it claims
        verdict = Resolver.from_environ(env).check(rcpt)
        if (verdict.status == REJECT) != refused:
            sys.exit(f"unexpected verdict for {rcpt.decode()}: {verdict!r}")
    rcpts = [rcpt for rcpt, _ in MIX]
    best = None
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(N):
            for rcpt in rcpts:
                Resolver.from_environ(env).check(rcpt)
        elapsed = time.perf_counter() - t0
        best = elapsed if best is None else min(best, elapsed)
    return best / (N * len(rcpts)) * 1000


def pool_session(rcpts):
    return (b"HELO client.example\r\nMAIL FROM:<a@client.example>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % rcpt for rcpt in rcpts) + b"QUIT\r\n")


def sessions(port, count, data, refused):
    """count sessions of data; each must get `refused` 550s and 250s for the rest."""
    for _ in range(count):
        reply = converse(port, data)
        lines = reply.split(b"\r\n")
        got = lines.count(b"550 sorry, no mailbox here by that name (#5.1.1)")
        if got != refused or lines.count(b"250 ok") != RCPTS + 1 - refused:
            sys.exit(f"unexpected session on port {port} (wanted {refused} refusals): "
                     f"{reply[-400:]!r}")


def pool_ms(root, env, script):
    """(wall ms, CPU ms) per preloaded call: the pool with rcptcheck against without."""
    qmail = os.fsdecode(env[b"QMAILHOME"])
    local = [(rcpt, refused) for rcpt, refused in MIX if not rcpt.endswith(b".example")]
    rcpts = [local[i % len(local)] for i in range(RCPTS)]
    data = pool_session(rcpt for rcpt, _ in rcpts)
    refused = sum(1 for _, r in rcpts if r)
    with open(os.path.join(qmail, "control", "rcpthosts"), "w") as f:
        f.write("example.org\nmail.example.org\nvirt.example.com\nvpop.example.net\n")
    yardstick = os.path.join(os.path.dirname(script), "ifauthnext")  # the least a call costs
    confs = {}
    for name, text in (("with", "[rcpt]\n%s\n" % script), ("without", ""),
                       ("yardstick", "[rcpt]\n%s\n" % yardstick)):
        confs[name] = os.path.join(qmail, "control", "smtpplugins-" + name)
        with open(confs[name], "w") as f:
            f.write(text)
    queue = os.path.join(os.fsdecode(root), "discard-queue")
    make_queue(queue)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)  # sessions run as nobody
    base = {"PATH": "/usr/bin:/bin", "QMAILHOME": qmail, "QMAILQUEUE": queue,
            "RCPTCHECK_PASSWD": os.fsdecode(env[b"RCPTCHECK_PASSWD"])}
    servers = {}
    try:
        for name, conf in confs.items():
            log = os.path.join(os.fsdecode(root), "pool-%s.log" % name)
            servers[name] = start_server("pool", dict(base, SPPCONFFILE=conf), "bench.example",
                                         log=log, options=("-u", "65534", "-g", "65534",
                                                           "--min-spare", "2"))
        with open(os.path.join(os.fsdecode(root), "pool-with.log"), "rb") as f:
            if b"serve: preloaded %s (" % os.fsencode(script) not in f.read():
                sys.exit("rcptcheck was not preloaded in the pool: see its log")
        for name, (_, port) in servers.items():
            sessions(port, 5, data, refused if name == "with" else 0)  # warm up
        figures = {name: [] for name in servers}
        for _ in range(ROUNDS):
            for name, (proc, port) in servers.items():
                cpu0, t0 = tree_cpu(proc.pid), time.perf_counter()
                sessions(port, SESSIONS, data, refused if name == "with" else 0)
                wall = time.perf_counter() - t0
                time.sleep(0.1)  # let the pool's bookkeeping of the last session finish
                figures[name].append((wall, tree_cpu(proc.pid) - cpu0))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    calls = SESSIONS * RCPTS

    def per_call(name):
        walls = [(w - bw) / calls * 1000 for (w, _), (bw, _) in zip(figures[name],
                                                                     figures["without"])]
        cpus = [(c - bc) / calls * 1000 for (_, c), (_, bc) in zip(figures[name],
                                                                    figures["without"])]
        return statistics.median(walls), statistics.median(cpus)

    return per_call("with"), per_call("yardstick")


def main():
    script = os.path.join(os.path.dirname(SERVER), "rcptcheck")
    if not os.path.exists(script):
        sys.exit(f"{script} is not installed: run `make bench`")
    root = os.fsencode(tempfile.mkdtemp(prefix="bench-rcptcheck-"))
    try:
        env = build(root)
        ms = resolution_ms(env)
        if os.geteuid() == 0:
            (wall, cpu), (yard_wall, yard_cpu) = pool_ms(root, env, script)
            print(f"  ifauthnext preloaded in the pool, per call: {yard_wall:.2f} ms wall, "
                  f"{yard_cpu:.2f} ms server CPU (the runner's own cost)")
            verdict = "within" if wall <= 5 else "OVER"
            print(f"  rcptcheck preloaded in the pool (sessions as nobody), per call: "
                  f"{wall:.2f} ms wall, {cpu:.2f} ms server CPU ({verdict} the 5 ms target)")
        else:
            print("  the pool part needs root (its sessions run as nobody, so that the "
                  "plugin qualifies for preloading)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"rcptcheck: {N} x {len(MIX)} recipients: {ms:.3f} ms per resolution (in-process, "
          "Resolver.from_environ + check)")


if __name__ == "__main__":
    main()

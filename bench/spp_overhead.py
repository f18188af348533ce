"""Per-plugin cost of qmail-spp.

Runs N (default 100, or argv[1]) complete sessions of the installed qmail-smtpd-py over
pipes (HELO, MAIL, RCPTS recipients, DATA with a small message, QUIT; the queue
discards), alternately with no plugins and with 10 `[rcpt]` plugins whose entry is
/bin/true, so each session with plugins makes 10 * RCPTS plugin calls. The difference
of the medians divided by the number of calls is the cost of one plugin call.

For comparison it times, in this process, what a plugin call boils down to: a bare
os.posix_spawn of /bin/true with stdin closed and stdout on a pipe, reading the pipe to
EOF and waiting for the child. The last line is the comparable figure: milliseconds per
plugin call (and its ratio to the bare posix_spawn).
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, check, setup  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
PLUGINS = 10
RCPTS = 5
PROGRAM = "/bin/true"
SPAWNS = 2000


def session():
    rcpts = b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(RCPTS))
    return (b"HELO client.example\r\nMAIL FROM:<a@client.example>\r\n" + rcpts
            + b"DATA\r\nSubject: bench\r\n\r\nhello\r\n.\r\nQUIT\r\n")


def timed_session(data, env):
    t0 = time.perf_counter()
    p = subprocess.run([SERVER], input=data, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, env=env)
    elapsed = time.perf_counter() - t0
    check(p.stdout, p.returncode)
    return elapsed


def bare_spawn(env):
    """One posix_spawn + read to EOF + waitpid, as the server runs a plugin."""
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(PROGRAM, [PROGRAM], env, file_actions=[
            (os.POSIX_SPAWN_CLOSE, 0), (os.POSIX_SPAWN_DUP2, w, 1)])
    finally:
        os.close(w)
    while os.read(r, 65536):
        pass
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        sys.exit("%s exited with status %d" % (PROGRAM, status))


def main():
    root, env = setup()
    try:
        conf = os.path.join(env["QMAILHOME"], "control", "smtpplugins-bench")
        with open(conf, "w") as f:
            f.write("[rcpt]\n" + (PROGRAM + "\n") * PLUGINS)
        with_plugins = dict(env, SPPCONFFILE=conf)
        data = session()
        timed_session(data, env)  # warm the page cache
        without, with_ = [], []
        for _ in range(N):
            without.append(timed_session(data, env))
            with_.append(timed_session(data, with_plugins))
        base, plugged = statistics.median(without), statistics.median(with_)
        calls = PLUGINS * RCPTS
        per_call = (plugged - base) / calls * 1000

        spawn_env = {k.encode(): v.encode() for k, v in with_plugins.items()}
        spawns = []
        for _ in range(SPAWNS):
            t0 = time.perf_counter()
            bare_spawn(spawn_env)
            spawns.append(time.perf_counter() - t0)
        spawn = statistics.median(spawns) * 1000

        print("spp_overhead: %d sessions each way; median %.1f ms without plugins, %.1f ms with"
              " %d [rcpt] plugins x %d RCPTs = %d calls"
              % (N, base * 1000, plugged * 1000, PLUGINS, RCPTS, calls))
        print("spp_overhead: bare posix_spawn+read+wait of %s from Python: median %.3f ms"
              " (%d spawns)" % (PROGRAM, spawn, SPAWNS))
        print("spp_overhead: %.3f ms per plugin call (bare posix_spawn %.3f ms; ratio %.2f)"
              % (per_call, spawn, per_call / spawn))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

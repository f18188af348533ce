"""What a greylist or ratelimit call costs with Redis, against greylist on SQLite.

A redis-server of its own on loopback (no persistence, a temporary directory), the
installed plugins, a known greylist triplet (GREYLIST_DELAY=0, confirmed before timing:
the common case) and a ratelimit [rcpt] call under its limit.  Each call is made
three ways:

  fresh process   the plugin run as the server runs it today (stdin closed, stdout on
                  a pipe): a new interpreter that imports everything, as in
                  bench/sample_plugins.py; `python -I -c pass` and `python -c 'import
                  redis'` are the floors
  in-process      the call as the server makes it for these scripts (they say
                  RUN_IN_PROCESS): preload.call_in_process in this process, the
                  imports done once (one warm-up run)
  preloaded       the compiled script run as __main__ after a fork per call (the
                  child runs it and exits, the parent waits): what a preloaded
                  script without RUN_IN_PROCESS costs

The cases of each group are timed in interleaved rounds (A B C A B C ...): ROUNDS
(default 20, or argv[1]) for the fresh processes, ten times as many for the others.
Each line is one median.  A Redis that refuses connections and one that never
answers (REDISTIMEOUT=0.25) show what an outage costs a call (in-process, 5 rounds).
The last line is the comparable figure: the calls with Redis as the server makes them,
whose target is at most 5 ms each, and the forked ones with how much of them the fork
alone takes (it grows with the parent's size: this process, with redis-py, sqlite3 and
the three scripts loaded).
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
from _common import SERVER, free_port  # noqa: E402

from qmail_smtpd_py import plugin, preload  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BIN = os.path.dirname(SERVER)
BASE = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "127.0.0.1",
        "SMTPHELOHOST": "client.example", "SMTPMAILFROM": "a@example.com",
        "SMTPRCPTTO": "u@example.org", "SMTPRCPTCOUNT": "0", "SMTPRCPTCOUNTALL": "1",
        "SMTPRCPTHOSTSOK": "1"}


class Case:
    """One plugin call: argv (the installed plugin and its arguments) and the
    environment beyond BASE."""

    def __init__(self, name, argv, env):
        self.name = name
        self.argv = [os.path.join(BIN, argv[0])] + argv[1:] if argv[0] != "-" else argv[1:]
        self.env = dict(BASE, **env)
        self.code = None
        self.script = None  # prepared by preload.examine, for in_process
        if argv[0] != "-":
            with open(self.argv[0]) as f:
                self.code = compile(f.read(), self.argv[0], "exec")

    def fresh(self, cwd):
        t0 = time.perf_counter()
        subprocess.run(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, env=self.env, cwd=cwd, check=False)
        return time.perf_counter() - t0

    def _run_main(self):
        """Run the compiled script as __main__ with the call's argv and environment
        (fd 1 and 2 are the caller's business)."""
        if self.code is None:
            return
        sys.argv = self.argv
        os.environ.clear()
        os.environ.update(self.env)
        try:
            exec(self.code, {"__name__": "__main__", "__file__": self.argv[0]})  # noqa: S102
        except SystemExit:
            pass

    def in_process(self, devnull):
        """The call as the server makes it for a script that says RUN_IN_PROCESS
        (preload.call_in_process: no fork; its output is read from a memory file)."""
        if self.script is None:
            self.script = preload.examine(self.argv[0], None, None)
            assert self.script.in_process, self.argv[0]
        argv = [os.fsencode(a) for a in self.argv]
        env = {os.fsencode(k): os.fsencode(v) for k, v in self.env.items()}
        saved = os.dup(2)
        os.dup2(devnull, 2)
        try:
            t0 = time.perf_counter()
            preload.call_in_process(self.script, argv, env, 30)
            return time.perf_counter() - t0
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def preloaded(self, devnull):
        plugin.forget_kept()  # as the server does before a fork (in_process kept greylist's db)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                self._run_main()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        return time.perf_counter() - t0


def rounds(cases, count, measure):
    """{case name: median seconds} over `count` interleaved rounds."""
    times = {case.name: [] for case in cases}
    for _ in range(count):
        for case in cases:
            times[case.name].append(measure(case))
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    from redisserver import REDIS_SERVER, RedisServer, SilentServer
    if not os.path.exists(os.path.join(BIN, "ratelimit")):
        sys.exit("the sample plugins are not installed next to %s: run `make bench`" % SERVER)
    if not os.access(REDIS_SERVER, os.X_OK):
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    home = tempfile.mkdtemp(prefix="bench-redis-")
    os.chdir(home)  # the plugins' working directory, as the server's qmail home
    devnull = os.open(os.devnull, os.O_WRONLY)
    server = RedisServer(os.path.join(home, "redis")).start()
    try:
        grey_env = {"GREYLIST_DELAY": "0"}
        sqlite = Case("greylist SQLite (known triplet)", ["greylist"],
                      dict(grey_env, GREYLIST_DB=os.path.join(home, "greylist.sqlite3")))
        grey = Case("greylist Redis (known triplet)", ["greylist"],
                    dict(grey_env, GREYLIST_DB=server.url()))
        rate = Case("ratelimit Redis ([rcpt], under the limit)", ["ratelimit", "rcpt"],
                    {"RATELIMIT_REDIS": server.url(), "RATELIMIT_RECIPIENTS": "999999999/60"})
        plugins = [sqlite, grey, rate]
        for case in plugins:  # first seen, then confirmed: a known triplet from here on
            case.fresh(home)
            case.fresh(home)
        floors = [Case("python -I -c pass", ["-", sys.executable, "-I", "-c", "pass"], {}),
                  Case("python -c 'import redis'", ["-", sys.executable, "-c", "import redis"],
                       {})]
        results = []
        for name, ms in rounds(floors + plugins, ROUNDS, lambda c: c.fresh(home)).items():
            results.append(("fresh process", name, ms))
        for case in plugins:
            case.in_process(devnull)  # the imports, once
        for name, ms in rounds(plugins, 10 * ROUNDS, lambda c: c.in_process(devnull)).items():
            results.append(("in-process", name, ms))
        nothing = Case("fork + exit (the floor)", ["-"], {})
        for name, ms in rounds([nothing] + plugins, 10 * ROUNDS,
                               lambda c: c.preloaded(devnull)).items():
            results.append(("preloaded", name, ms))
        with SilentServer() as silent:
            down = Case("greylist, Redis refuses connections", ["greylist"],
                        dict(grey_env, GREYLIST_DB="redis://127.0.0.1:%d/0" % free_port()))
            hung = Case("greylist, Redis never answers (REDISTIMEOUT=0.25)", ["greylist"],
                        dict(grey_env, GREYLIST_DB=silent.url(), REDISTIMEOUT="0.25"))
            for name, ms in rounds([down, hung], 5, lambda c: c.in_process(devnull)).items():
                results.append(("in-process", name, ms))
    finally:
        server.stop()
        os.chdir("/")
        shutil.rmtree(home, ignore_errors=True)
    figures = {}
    for how, name, seconds in results:
        figures[how, name] = seconds * 1000
        print("  %-14s %-50s %8.2f ms" % (how, name, seconds * 1000))
    print("redis_plugins: in process (as the server runs them): greylist Redis %.2f ms, "
          "ratelimit Redis %.2f ms (target <= 5 ms), greylist SQLite %.2f ms; forked: %.2f, "
          "%.2f and %.2f ms, of which %.2f ms is the fork itself"
          % (figures["in-process", grey.name], figures["in-process", rate.name],
             figures["in-process", sqlite.name], figures["preloaded", grey.name],
             figures["preloaded", rate.name], figures["preloaded", sqlite.name],
             figures["preloaded", nothing.name]))


if __name__ == "__main__":
    main()

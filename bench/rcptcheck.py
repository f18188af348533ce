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

For the later preloaded plugin runner it also times a simulated preloaded
call: the installed script compiled once in this process (its imports
done here), then per call a fork that sets the environment and runs the
code as __main__ with stdout on a pipe, and the parent reads it to EOF and
waits; next to a bare fork + wait, the floor of that runner.

The last line is the comparable figure: milliseconds per resolution.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from qmail_smtpd_py import cdbmake, plugin  # noqa: F401 - plugin: preloaded, as the runner will
from qmail_smtpd_py.recipients import REJECT, Resolver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
PRELOADED_CALLS = 300
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


def forked_call(code, env):
    """One simulated preloaded call: fork, run code as __main__ with env; ms."""
    t0 = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            if code is not None:
                os.environb.clear()
                os.environb.update(env)
                exec(code, {"__name__": "__main__"})  # noqa: S102 - the runner's way
        except SystemExit:
            pass
        finally:
            os._exit(0)
    os.close(w)
    while os.read(r, 65536):
        pass
    os.close(r)
    os.waitpid(pid, 0)
    return (time.perf_counter() - t0) * 1000


def preloaded_ms(script, env):
    with open(script, "rb") as f:
        code = compile(f.read(), script, "exec")
    calls = []
    for i in range(PRELOADED_CALLS):
        rcpt = MIX[i % len(MIX)][0]
        calls.append(forked_call(code, {**env, b"SMTPRCPTTO": rcpt, b"SMTPRCPTHOSTSOK": b"1"}))
    bare = [forked_call(None, env) for _ in range(PRELOADED_CALLS)]
    return statistics.median(calls), statistics.median(bare)


def main():
    script = os.path.join(os.path.dirname(SERVER), "rcptcheck")
    if not os.path.exists(script):
        sys.exit(f"{script} is not installed: run `make bench`")
    root = os.fsencode(tempfile.mkdtemp(prefix="bench-rcptcheck-"))
    try:
        env = build(root)
        ms = resolution_ms(env)
        base = {b"PATH": b"/usr/bin:/bin", b"TCPREMOTEIP": b"192.0.2.7",
                b"SMTPMAILFROM": b"a@example.net", b"SMTPRCPTCOUNT": b"0"}
        call, bare = preloaded_ms(script, {**base, **env})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"  simulated preloaded call (fork + script as __main__): median {call:.2f} ms; "
          f"bare fork + wait {bare:.2f} ms")
    print(f"rcptcheck: {N} x {len(MIX)} recipients: {ms:.3f} ms per resolution (in-process, "
          "Resolver.from_environ + check)")


if __name__ == "__main__":
    main()

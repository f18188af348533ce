"""`make run` and `make run-demo`, as a newcomer runs them: the real make, openssl,
tcpserver and swaks.

Each target runs in the background with its own RUNDIR (a temporary directory) and a
free PORT; the message swaks sends has to land in the target's Maildir, and for the
demo only after a login over STARTTLS with the user and password the target printed.
The installed .venv is the one the suite runs (`make -o .venv/.installed`: never
reinstalled from here).
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import REPO, free_port, require_tools, wait_greeting

PASSWORD_LINE = "LOGIN PLAIN as user demo, password demo-password; mail into %s/Maildir/new"


def make_env():
    env = dict(os.environ)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "RUNDIR", "PORT",
                 "HOST"):
        env.pop(name, None)
    return env


def serve(target, tmp_path):
    """Start `make target` in the background; once it greets, (port, RUNDIR, its output
    file, the make process)."""
    require_tools("make", "tcpserver", "swaks")
    rundir = tmp_path / "run"
    port = free_port()
    out = tmp_path / "make.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", REPO, "-o", ".venv/.installed", target,
             "PORT=%d" % port, "RUNDIR=" + str(rundir)],
            env=make_env(), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_greeting(port, proc, out)
    except BaseException:
        stop(proc)
        raise
    return port, rundir, out, proc


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # make and tcpserver: Ctrl-C's way out
    except OSError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_make_run_delivers_into_its_maildir(tmp_path):
    port, rundir, out, proc = serve("run", tmp_path)
    try:
        p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--to",
                            "user@localhost", "--from", "me@client.test", "--helo",
                            "client.test", "--timeout", "20"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    finally:
        stop(proc)
    assert p.returncode == 0, p.stdout + p.stderr
    (name,) = os.listdir(rundir / "Maildir" / "new")
    message = (rundir / "Maildir" / "new" / name).read_bytes()
    assert message.startswith(b"Return-Path: <me@client.test>\n"
                              b"Delivered-To: user@localhost\n"), message
    # the sample control files: control/me is localhost
    assert os.readlink(rundir / "control") == os.path.join(REPO, "control")
    assert b"  by localhost with SMTP; " in message, message


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """make run-demo in the background: (port, demo home, its output file)."""
    require_tools("openssl")
    if subprocess.run(["perl", "-MIO::Socket::SSL", "-e", "1"],
                      capture_output=True).returncode != 0:
        pytest.skip("swaks --tls needs libio-socket-ssl-perl")
    port, rundir, out, proc = serve("run-demo", tmp_path_factory.mktemp("demo"))
    try:
        yield port, rundir / "demo", out
    finally:
        stop(proc)


def test_run_demo_starttls_and_auth_deliver_into_the_maildir(demo):
    port, home, out = demo
    printed = out.read_text()
    assert PASSWORD_LINE % home in printed, printed
    swaks_line = ("  swaks --server 127.0.0.1:%d --tls --auth-user demo --auth-password "
                  "demo-password --to friend@example.org\n" % port)
    assert swaks_line in printed, printed
    p = subprocess.run(swaks_line.split() + ["--from", "me@client.test", "--helo",
                                             "client.test", "--timeout", "20"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"<~  235 ok, go ahead (#2.0.0)" in p.stdout  # swaks marks lines inside TLS with ~
    (name,) = os.listdir(home / "Maildir" / "new")
    message = (home / "Maildir" / "new" / name).read_bytes()
    # friend@example.org is not in rcpthosts: the login allowed the relaying
    assert message.startswith(b"Return-Path: <me@client.test>\n"
                              b"Delivered-To: friend@example.org\n"), message
    assert (b"Received: from unknown (HELO client.test) (demo@127.0.0.1)\n"
            b"  by localhost with ESMTPA; ") in message, message
    # the demo's files are its own; the tracked samples got no certificate
    assert os.path.islink(home / "control" / "me")
    assert not os.path.lexists(os.path.join(REPO, "control", "servercert.pem"))


def test_run_demo_before_starttls_offers_no_auth(demo):
    port, _, _ = demo
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rwb")
        f.readline()
        f.write(b"EHLO client.test\r\nAUTH LOGIN\r\nQUIT\r\n")
        f.flush()
        text = f.read()
    assert b"250-STARTTLS\r\n" in text and b"AUTH" not in text.split(b"538")[0], text
    assert b"538 auth not available without TLS (#5.3.3)\r\n" in text


@pytest.mark.parametrize("fd3, accepted", [
    (b"demo\0demo-password\0", True),
    (b"demo\0demo-passwordx\0", False),
    (b"demo\0\0", False),
    (b"demox\0demo-password\0", False),
    (b"", False),
])
def test_run_demo_checkpassword_takes_only_the_demo_login(demo, fd3, accepted):
    _, home, _ = demo
    r, w = os.pipe()
    os.write(w, fd3)
    os.close(w)
    try:  # the login on fd 3, as qmail-smtpd-py gives it
        p = subprocess.run([sys.executable, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                            "os.execv(sys.argv[2], sys.argv[2:])", str(r),
                            str(home / "checkpassword"), "/bin/echo", "ran"], pass_fds=(r,),
                           capture_output=True, timeout=30)
    finally:
        os.close(r)
    assert (p.returncode, p.stdout) == ((0, b"ran\n") if accepted else (1, b""))

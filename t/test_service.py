"""service/qmail-smtpd-py, the daemontools service directory, run as an administrator
would run it: the real `supervise` on a copy of it, the real `tcprules` building its
tcp.smtp.cdb and `swaks` as the client. The test changes only files in env/ (listen on
127.0.0.1 and a free port, the test's qmail home and fake queue, PATH with the installed
qmail-smtpd-py first, no SMTPUSER), so what is exercised is the shipped run script."""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from helpers import (
    BIN_DIR,
    CHECK_NO_CHECKPASSWORD,
    REPO,
    free_port,
    require_server,
    require_tools,
    wait_greeting,
)

SERVICE = os.path.join(REPO, "service", "qmail-smtpd-py")
FOREIGN = "rcpt@foreign.example"
LOCAL = "rcpt@example.com"  # in the default control/rcpthosts
REFUSED = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


def write_env(service, name, value):
    """env/NAME as envdir reads it: None = a 0-byte file (envdir removes the variable)."""
    with open(os.path.join(service, "env", name), "w") as f:
        f.write("" if value is None else value + "\n")


def build_rules(service, rules):
    with open(os.path.join(service, "tcp.smtp"), "w") as f:
        f.write(rules)
    with open(os.path.join(service, "tcp.smtp"), "rb") as src:
        subprocess.run(["tcprules", "tcp.smtp.cdb", "tcp.smtp.tmp"], stdin=src,
                       cwd=service, check=True, timeout=30)


def daemontools(argv, log):
    """supervise or svscan in a process group of its own (the test kills the group),
    the installed programs first in PATH, its output into log."""
    env = {"PATH": BIN_DIR + ":" + os.environ.get("PATH", "/usr/bin:/bin")}
    with open(log, "wb") as logf:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)


def swaks(port, to, *extra):
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--helo", "client.test",
                        "--from", "sender@client.test", "--to", to, "--timeout", "20",
                        *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=60)
    return p.returncode, p.stdout


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def service(tmp_path, make_home):
    """A copy of service/qmail-smtpd-py set up for this test: (directory, home, port)."""
    require_tools("supervise", "svc", "tcpserver", "tcprules", "swaks", "envdir")
    require_server()
    home = make_home()
    directory = str(tmp_path / "qmail-smtpd-py")
    shutil.copytree(SERVICE, directory, ignore=shutil.ignore_patterns(
        "supervise", "tcp.smtp.cdb", "tcp.smtp.tmp", "main"))
    port = free_port()
    write_env(directory, "IP", "127.0.0.1")
    write_env(directory, "PORT", str(port))
    write_env(directory, "MAXCONN", "5")
    write_env(directory, "SMTPUSER", None)  # tcpserver keeps the test's uid
    write_env(directory, "QMAILHOME", home.path)
    write_env(directory, "QMAILQUEUE", home.queue.path)
    write_env(directory, "PATH", BIN_DIR + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    return directory, home, port


@pytest.mark.parametrize("run", ["run", "run.pool"])
def test_supervised_service_relays_by_tcprules(service, tmp_path, run):
    """Under tcpserver (run) and the pool (run.pool, copied over run as the README says;
    --root in env/POOLOPTIONS because the test cannot switch users)."""
    directory, home, port = service
    pool = run == "run.pool"
    if pool:
        shutil.copy(os.path.join(directory, "run.pool"), os.path.join(directory, "run"))
        write_env(directory, "POOLOPTIONS", "--root")
    build_rules(directory, '127.:allow,RELAYCLIENT=""\n:allow\n')
    log = tmp_path / "supervise.log"
    proc = daemontools(["supervise", directory], log)
    try:
        wait_greeting(port, proc, log)

        # 127.0.0.1 matches 127.: RELAYCLIENT is set, a foreign recipient is accepted
        status, out = swaks(port, FOREIGN)
        assert status == 0, out
        assert b"<-  250 ok " in out, out
        queued = home.queued()
        assert len(queued) == 1
        assert queued[0].sender == b"sender@client.test"
        assert queued[0].recipients == [FOREIGN.encode()]
        # the local name came from control/me (env/LOCALNAME is a 0-byte file)
        assert b"by mx.example.org with SMTP" in queued[0].received, queued[0].received

        # new rules without RELAYCLIENT: the cdb is read for each connection
        build_rules(directory, ":allow\n")
        status, out = swaks(port, FOREIGN, "--quit-after", "RCPT")
        assert status != 0, out
        assert REFUSED in out, out
        status, out = swaks(port, LOCAL)
        assert status == 0, out
        queued = home.queued()
        assert len(queued) == 2
        assert queued[1].recipients == [LOCAL.encode()]

        # the -v log went through supervise's stdout (the log service's pipe); the
        # launcher's lines of the last connection may come a moment after its reply
        launcher = b"serve" if pool else b"tcpserver"
        deadline = time.monotonic() + 20
        while True:
            text = log.read_bytes()
            pids = set(re.findall(launcher + rb": pid ([\d.]+) from 127\.0\.0\.1", text))
            if len(pids) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert launcher + b": status: 0/5" in text, text
        # qmail-smtpd-py's event lines carry the id the launcher logged for the connection
        accepted = re.findall(rb"([\d.]+) 127\.0\.0\.1 accept qp=\d+ ", text)
        refused = re.findall(rb"([\d.]+) 127\.0\.0\.1 refuse RCPT 553 by=rcpthosts ", text)
        assert (len(accepted), len(refused)) == (2, 1), text
        assert set(accepted + refused) <= pids, text

        subprocess.run(["svc", "-dx", directory], check=True, timeout=30)
        proc.wait(20)
        deadline = time.monotonic() + 20
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), "processes of the service are left over"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "port still open"
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        if proc.poll() is None:
            proc.wait()


def test_svscan_log_service_as_loguser_and_a_maildir_trial(service, tmp_path):
    """svscan runs the service and its log/ as an administrator's /service would: the
    log service switches to env/LOGUSER (nobody here) and writes log/main; env/QMAILQUEUE
    and env/MAILDIR send the mail of a trial into a Maildir."""
    require_tools("svscan", "multilog", "setuidgid")
    if os.geteuid() != 0:
        pytest.skip("the log service switches users: needs root")
    directory, home, port = service
    maildir = tmp_path / "Maildir"
    write_env(directory, "LOGUSER", "nobody")
    write_env(directory, "QMAILQUEUE", os.path.join(BIN_DIR, "qmail-queue-maildir"))
    write_env(directory, "MAILDIR", str(maildir))
    build_rules(directory, ":allow\n")
    main = os.path.join(directory, "log", "main")
    os.mkdir(main)
    nobody = pwd.getpwnam("nobody")
    os.chown(main, nobody.pw_uid, nobody.pw_gid)
    log = tmp_path / "svscan.log"
    proc = daemontools(["svscan", str(tmp_path)], log)
    try:
        wait_greeting(port, proc, log)
        status, out = swaks(port, LOCAL)
        assert status == 0, out
        (name,) = os.listdir(maildir / "new")
        message = (maildir / "new" / name).read_bytes()
        assert message.startswith(b"Return-Path: <sender@client.test>\nDelivered-To: "
                                  + LOCAL.encode() + b"\n"), message
        current = os.path.join(main, "current")
        deadline = time.monotonic() + 20
        text = b""
        while b" accept qp=" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            if os.path.exists(current):
                with open(current, "rb") as f:
                    text = f.read()
        assert re.search(rb"^@[0-9a-f]{24} \d+ 127\.0\.0\.1 accept qp=\d+ ", text, re.M), text
        assert os.stat(current).st_uid == nobody.pw_uid  # multilog ran as LOGUSER
    finally:
        # svscan, both supervise, tcpserver and multilog share the process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        deadline = time.monotonic() + 20
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_make_check_reads_the_service_settings(service):
    """`make check` in the service directory runs check with env/: QMAILHOME, the
    accounts, SMTPAUTH and CHECKPASSWORD."""
    directory, home, port = service

    def make_check():
        p = subprocess.run(["make", "--no-print-directory", "-s", "-C", directory, "check"],
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin"})
        return p.stdout.splitlines(), p.returncode

    write_env(directory, "LOGUSER", "qsmtpd-no-such-account")
    write_env(directory, "SMTPAUTH", "")
    lines, code = make_check()
    assert lines == [
        "log user qsmtpd-no-such-account: no such account, so the log service (setuidgid in "
        "log/run) cannot start, and the server blocks once the log pipe is full; create it "
        "(qmail's INSTALL.ids) or name another in env/LOGUSER", CHECK_NO_CHECKPASSWORD], lines
    assert code != 0
    write_env(directory, "LOGUSER", "nobody")
    write_env(directory, "CHECKPASSWORD", "/bin/true /bin/true")
    assert make_check() == (["ok: 3 control files checked"], 0)

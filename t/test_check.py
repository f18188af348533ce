"""`qmail-smtpd-py check`: each problem it knows gives its line and exit 1; a clean
home gives the ok line and exit 0.  The installed program runs as a subprocess."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import CHECK_NO_CHECKPASSWORD, Home, require_tools, script

PROGRAM = os.path.join(os.path.dirname(sys.executable), "qmail-smtpd-py")


def run_check(*args, env=None):
    environ = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    environ.update(env or {})
    p = subprocess.run([PROGRAM, "check", *args], env=environ, capture_output=True,
                       text=True, timeout=30)
    return p.stdout.splitlines(), p.returncode


def check_home(home, env=None):
    return run_check("--qmail-home", home.path, env=env)


def assert_problem(home, line, env=None):
    lines, code = check_home(home, env)
    assert line in lines, lines
    assert code == 1


def test_clean_home(make_home):
    home = make_home()  # me, rcpthosts, empty smtpplugins
    assert check_home(home) == (["ok: 3 control files checked"], 0)


def test_qmail_home_option_forms_and_env(make_home):
    home = make_home()
    ok = ["ok: 3 control files checked"]
    assert run_check("--qmail-home=" + home.path) == (ok, 0)
    assert run_check(env={"QMAILHOME": home.path}) == (ok, 0)


def test_help():
    lines, code = run_check("--help")
    assert code == 0
    assert lines[0].startswith("Usage: qmail-smtpd-py check [OPTIONS]")
    assert any(line.lstrip().startswith("--qmail-home DIR") for line in lines)


def test_usage_error_exits_2():
    lines, code = run_check("--bogus")
    assert (lines, code) == ([], 2)


def test_missing_home(tmp_path):
    missing = str(tmp_path / "nothere")
    assert run_check("--qmail-home", missing) == (
        ["%s: qmail home does not exist (give --qmail-home DIR or set QMAILHOME)" % missing],
        1)


def test_neither_me_nor_smtpgreeting(make_home):
    assert_problem(make_home(control={"me": None}),
                   "control/me: neither control/me nor control/smtpgreeting exists, the "
                   "server would answer 421; put this host's name in control/me")


def test_smtpgreeting_alone_is_enough(make_home):
    home = make_home(control={"me": None, "smtpgreeting": "mx.example.org ESMTP\n"})
    assert check_home(home) == (["ok: 3 control files checked"], 0)


def test_directory_in_place_of_a_file(make_home):
    home = make_home()
    os.mkdir(os.path.join(home.path, "control", "badmailfrom"))
    assert_problem(home, "control/badmailfrom: cannot read (Is a directory), the server "
                         "would answer 421; make it a file the server can read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(make_home):
    home = make_home(control={"badmailfrom": "spam@example.com\n"})
    os.chmod(os.path.join(home.path, "control", "badmailfrom"), 0)
    assert_problem(home, "control/badmailfrom: cannot read (Permission denied), the server "
                         "would answer 421; make it a file the server can read")


@pytest.mark.parametrize("name, content, number", [
    ("me", "mx.example.org\r\n", 1),
    ("smtpgreeting", "mx.example.org\r\n", 1),
    ("rcpthosts", "example.com\r\nexample.net\r\n", 1),
    ("badmailfrom", "# comment\nspam@example.com\r\n", 2),
    ("localiphost", "mx.example.org\r\n", 1),
    ("smtpplugins", "\r\n", 1),
    ("tlsclients", "user@example.com\r\n", 1),
])
def test_crlf(make_home, name, content, number):
    assert_problem(make_home(control={name: content}),
                   "control/%s: line %d ends in CR (DOS line endings); convert the file with "
                   "dos2unix or tr -d '\\r'" % (name, number))


def test_open_relay(make_home):
    assert_problem(make_home(control={"rcpthosts": None}),
                   "warning: control/rcpthosts: missing, so this is an open relay (every "
                   "domain is accepted); list the domains you receive mail for")


@pytest.mark.parametrize("name", ["databytes", "timeoutsmtpd"])
def test_not_a_number(make_home, name):
    assert_problem(make_home(control={name: "ten megabytes\n"}),
                   "control/%s: does not start with a digit, so it is ignored; write a "
                   "number" % name)


def test_numbers_fine(make_home):
    home = make_home(control={"databytes": "10485760\n", "timeoutsmtpd": "1200\n"})
    assert check_home(home) == (["ok: 5 control files checked"], 0)


def test_corrupt_morercpthosts(make_home):
    assert_problem(make_home(control={"morercpthosts.cdb": "not a cdb"}),
                   "control/morercpthosts.cdb: unreadable or corrupt (truncated cdb); the "
                   "server would answer 421 at RCPT, rebuild it with qmail-newmrh")


def test_good_morercpthosts(make_home):
    require_tools("cdb")
    home = make_home()
    src = b"+11,0:example.org->\n\n"
    subprocess.run(["cdb", "-c", os.path.join(home.path, "control", "morercpthosts.cdb")],
                   input=src, check=True)
    assert check_home(home) == (["ok: 4 control files checked"], 0)


def test_smtpplugins_missing(make_home):
    home = make_home(control={"smtpplugins": None})
    assert_problem(home, "control/smtpplugins: missing, so the server fails closed with 421; "
                         "create it (empty is fine) or set NOSPP to switch qmail-spp off")
    assert check_home(home, env={"NOSPP": ""}) == (["ok: 2 control files checked"], 0)


def plugins_home(make_home, text):
    return make_home(control={"smtpplugins": text})


def test_unknown_section(make_home):
    assert_problem(plugins_home(make_home, "[greeting]\n"),
                   "warning: control/smtpplugins: unknown section [greeting], its entries are "
                   "ignored; use [connection] [helo] [mail] [rcpt] [data] or [auth]")


def test_entry_before_first_section(make_home):
    assert_problem(plugins_home(make_home, "/bin/true\n[mail]\n"),
                   "warning: control/smtpplugins: /bin/true: before the first [section], so "
                   "it is ignored; put it under a section header")


def test_plugin_missing(make_home):
    assert_problem(plugins_home(make_home, "[rcpt]\nplugins/nope\n"),
                   "control/smtpplugins: plugins/nope: does not exist (paths are relative to "
                   "the qmail home); its section would answer 451")


def test_plugin_not_executable(make_home):
    home = plugins_home(make_home, "[rcpt]\nplugins/check\n")
    os.mkdir(os.path.join(home.path, "plugins"))
    with open(os.path.join(home.path, "plugins", "check"), "w") as f:
        f.write("#!/bin/sh\n")
    assert_problem(home, "control/smtpplugins: plugins/check: not an executable file; "
                         "chmod +x it or fix the path")


def test_plugin_with_arguments(make_home):
    assert_problem(plugins_home(make_home, "[mail]\n/bin/echo hello\n"),
                   "warning: control/smtpplugins: /bin/echo hello: looks like a program with "
                   "arguments, but entries are not split; write ':/bin/echo hello' to run it "
                   "through /bin/sh")


def test_good_plugins(make_home):
    home = plugins_home(make_home, "# spam checks\n[connection]\n/bin/true\n[rcpt]\n"
                                   "plugins/ok\n:exit 0 # shell entries are not checked\n")
    os.mkdir(os.path.join(home.path, "plugins"))
    path = os.path.join(home.path, "plugins", "ok")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(path, 0o755)
    assert check_home(home) == (["ok: 3 control files checked"], 0)


def test_bad_servercert(make_home):
    home = make_home(control={"servercert.pem": "not a certificate\n"})
    lines, code = check_home(home)
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith("control/servercert.pem: not usable (missing certificate: ")
    assert lines[0].endswith("); STARTTLS would fail with 454, install the certificate chain "
                             "and key in one PEM file")


def test_good_servercert(make_home, tmp_path):
    require_tools("openssl")
    pem = tmp_path / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(pem), "-out", str(tmp_path / "cert.pem"), "-days", "2", "-subj",
                    "/CN=mx.example.org"], check=True, capture_output=True)
    home = make_home(control={"servercert.pem": pem.read_bytes().decode("latin-1")
                              + (tmp_path / "cert.pem").read_text()})
    assert check_home(home) == (["ok: 4 control files checked"], 0)


@pytest.mark.parametrize("have, missing", [("clientca.pem", "tlsclients"),
                                           ("tlsclients", "clientca.pem")])
def test_client_relaying_half_set_up(make_home, have, missing):
    assert_problem(make_home(control={have: "x\n"}),
                   "warning: control/%s: present without control/%s, but relaying by client "
                   "certificate needs both; add %s or remove %s" % (have, missing, missing, have))


# ------------------------------------------------------------------ AUTH set-up

@pytest.mark.parametrize("smtpauth", ["", "cram", "!"])
def test_smtpauth_without_checkpassword(make_home, smtpauth):
    assert check_home(make_home(), env={"SMTPAUTH": smtpauth}) == ([CHECK_NO_CHECKPASSWORD], 1)


@pytest.mark.parametrize("env, args", [
    ({"SMTPAUTH": "-"}, ()),                              # switched off on purpose
    ({"SMTPAUTH": ""}, ("/bin/true", "/bin/true")),
    ({"SMTPAUTH": ""}, ("mx.example.org", "true", "x")),  # the old form, found in PATH
    ({}, ()),
])
def test_auth_set_up_fine(make_home, env, args):
    assert run_check("--qmail-home", make_home().path, *args, env=env) == (
        ["ok: 3 control files checked"], 0)


def test_checkpassword_program_missing(make_home, tmp_path):
    missing = str(tmp_path / "checkpassword")
    lines, code = run_check("--qmail-home", make_home().path, missing, "/bin/true",
                            env={"SMTPAUTH": ""})
    assert (lines, code) == (["%s: checkpassword program not found, so every AUTH fails (535 "
                              "after 5 seconds); fix the command line" % missing], 1)


def test_relative_checkpassword_is_found_from_the_qmail_home(make_home):
    """The server runs checkpassword with the qmail home as working directory (a relative
    path only fits the old form, after the hostname)."""
    home = make_home()
    script(home, "checkpassword", "exit 1\n")
    assert run_check("--qmail-home", home.path, "mx.example.org", "plugins/checkpassword",
                     "/bin/true",
                     env={"SMTPAUTH": ""}) == (["ok: 3 control files checked"], 0)


def test_checkpassword_given_but_smtpauth_unset(make_home):
    """Options after the first argument belong to the checkpassword command line."""
    lines, code = run_check("--qmail-home", make_home().path, "/bin/true", "--user", "x")
    assert (lines, code) == (["warning: SMTPAUTH: unset, so AUTH is off although a "
                              "checkpassword command line is given; set it (empty: LOGIN "
                              "PLAIN)"], 1)


# ------------------------------------------------------------------ the service's accounts

NO_SUCH_ACCOUNT = "qsmtpd-no-such-account"


def test_missing_accounts(make_home):
    lines, code = run_check("--qmail-home", make_home().path, "--user", NO_SUCH_ACCOUNT,
                            "--log-user", NO_SUCH_ACCOUNT + "l")
    assert (lines, code) == ([
        "log user %sl: no such account, so the log service (setuidgid in log/run) cannot "
        "start, and the server blocks once the log pipe is full; create it (qmail's "
        "INSTALL.ids) or name another in env/LOGUSER" % NO_SUCH_ACCOUNT,
        "user %s: no such account, so the sessions cannot run as it (envuidgid fails, the "
        "service does not start); create it (qmail's INSTALL.ids) or name another in "
        "env/SMTPUSER" % NO_SUCH_ACCOUNT], 1)


def test_existing_log_user(make_home):
    assert run_check("--qmail-home", make_home().path, "--log-user", "nobody") == (
        ["ok: 3 control files checked"], 0)


# ------------------------------------------------------------------ as the SMTP user

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="check --user needs root")


@pytest.fixture
def open_home():
    """A qmail home in a directory everybody can search (the pytest tmp_path is private)."""
    root = tempfile.mkdtemp(prefix="qsmtpd-check-")
    os.chmod(root, 0o755)
    try:
        yield Home(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def program_finding():
    """The line about the installed program itself, found out independently: whether
    nobody can run it (setuidgid, as tcpserver -U would) decides if there is one."""
    require_tools("setuidgid")
    p = subprocess.run(["setuidgid", "nobody", PROGRAM, "--version"], cwd="/",
                       capture_output=True, timeout=60)
    return p.returncode != 0


def as_nobody(home, *args):
    lines, code = run_check("--qmail-home", home.path, "--user", "nobody", *args)
    mine = [line for line in lines if line.startswith(PROGRAM + ": ")]
    if program_finding():
        assert len(mine) == 1, lines
        assert mine[0].startswith(PROGRAM + ": nobody cannot run it (")
        assert " is in the way), so every connection would be dropped" in mine[0]
    else:
        assert mine == [], lines
    return [line for line in lines if line not in mine], code


@needs_root
def test_as_nobody_a_clean_home(open_home):
    lines, code = as_nobody(open_home)
    assert lines == ["ok: 3 control files checked"] or (lines == [] and code == 1)


@needs_root
def test_as_nobody_what_root_can_read_but_the_sessions_cannot(open_home):
    """Files of mode 600 (root reads them anyway), a plugin only root may run, a plugin
    whose interpreter lies in a private directory: each is found."""
    require_tools("openssl")
    home = open_home
    home.control("badmailfrom", "spam@example.com\n")
    pem = os.path.join(home.path, "control", "servercert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", pem, "-out", pem + ".crt",
                    "-days", "2", "-subj", "/CN=mx.example.org"], check=True, capture_output=True)
    with open(pem, "ab") as f, open(pem + ".crt", "rb") as crt:
        f.write(crt.read())
    os.unlink(pem + ".crt")
    for name in ("badmailfrom", "servercert.pem"):
        os.chmod(os.path.join(home.path, "control", name), 0o600)
    private = os.path.join(home.root, "private")
    os.mkdir(private, 0o700)
    os.symlink("/bin/sh", os.path.join(private, "sh"))
    ok = script(home, "ok", "exit 0\n")
    rootonly = script(home, "rootonly", "exit 0\n")
    os.chmod(rootonly, 0o700)
    hidden = script(home, "hidden", "exit 0\n", shell=os.path.join(private, "sh"))
    home.control("smtpplugins", "[rcpt]\n%s\n%s\n%s\n" % (ok, rootonly, hidden))
    assert check_home(home) == (["ok: 5 control files checked"], 0)  # as root: all fine
    lines, code = as_nobody(home)
    assert code == 1
    assert lines == [
        "control/badmailfrom: cannot read (Permission denied), the server would answer 421; "
        "make it a file the server can read",
        "control/servercert.pem: cannot read (Permission denied), STARTTLS would fail; make "
        "it a file the server can read",
        "control/smtpplugins: %s: not an executable file; chmod +x it or fix the path"
        % rootonly,
        "control/smtpplugins: %s: its interpreter %s/sh cannot be reached (Permission "
        "denied; %s (mode 700) is in the way), so its section would answer 451; fix its "
        "first line or the interpreter's permissions" % (hidden, private, private)]


@needs_root
def test_as_nobody_a_home_it_cannot_enter(make_home):
    """The pytest tmp_path is private to root: the sessions could not even enter it."""
    home = make_home()
    lines, _ = as_nobody(home)
    assert lines == ["%s: cannot enter the qmail home (Permission denied), so every "
                     "connection would fail; make it and the directories above it searchable "
                     "(chmod o+x)" % home.path]

"""`qmail-smtpd-py check`: each problem it knows gives its line and exit 1; a clean
home gives the ok line and exit 0.  The installed program runs as a subprocess."""

import os
import subprocess
import sys

import pytest

from helpers import require_tools

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

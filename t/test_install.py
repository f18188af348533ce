"""`make install`: the venv under PREFIX, the bin/ links, the man page, the sample
control files, and QMAILBIN, which links the program beside qmail's own but never
replaces a file it did not make.

One install (PREFIX=<tmp>/usr, no DESTDIR) is shared by the module; the QMAILBIN tests
install again into the same PREFIX (make install upgrades in place). pip needs PyPI or
its cache for click and attrs.  That install is made as an administrator with a
private Python would make it: PYTHON is a link inside a mode-700 directory, so make
install has to fall back to the system Python; PREFIX is in a directory everybody can
search, and the installed program is run as `nobody`, as the SMTP sessions would.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import helpers

REPO = helpers.REPO
MAN = os.path.join(REPO, "man", "qmail-smtpd-py.8")
CONTROL = os.path.join(REPO, "control")
INSTALL_TIMEOUT = 600


def make_install(prefix, *extra):
    """Run `make -C REPO install PREFIX=prefix extra...`; the CompletedProcess."""
    env = dict(os.environ)
    # Not inherited from a surrounding `make test` (its flags, jobserver, variables)
    # nor from the caller's environment (the Makefile's variables use ?=).
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "DESTDIR",
                 "QMAILBIN", "PREFIX"):
        env.pop(name, None)
    return subprocess.run(
        ["make", "--no-print-directory", "-C", REPO, "install", "PREFIX=" + prefix,
         *extra],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT)


def check(proc):
    assert proc.returncode == 0, "make install failed (%d):\n%s\n%s" % (
        proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def installed():
    """(PREFIX, the make install run, the private PYTHON it was given)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    private = tempfile.mkdtemp(prefix="qsmtpd-private-")  # mode 700
    python = os.path.join(private, "python3")
    os.symlink(sys._base_executable, python)  # the Python that made the test venv
    root = tempfile.mkdtemp(prefix="qsmtpd-install-")
    os.chmod(root, 0o755)  # PREFIX reachable by the SMTP user
    try:
        prefix = os.path.join(root, "usr")
        proc = make_install(prefix, "PYTHON=" + python)
        check(proc)
        yield prefix, proc, python
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def prefix(installed):
    return installed[0]


def test_private_python_is_replaced_by_the_system_one(installed):
    """make install says why it does not use PYTHON, and the venv runs the system Python."""
    prefix, proc, python = installed
    private = os.path.dirname(python)
    assert ("make install: %s will not do (%s cannot be run by other users: %s (mode 700) is "
            "in the way): the SMTP user could not run the server; using /usr/bin/python3 "
            "instead\n" % (python, python, private)) in proc.stdout
    with open(os.path.join(prefix, "lib", "qmail-smtpd-py", "pyvenv.cfg")) as f:
        assert "home = /usr/bin\n" in f.read()
    assert "warning" not in proc.stderr


def as_nobody(*argv, **kw):
    if os.geteuid() != 0:
        pytest.skip("switching to nobody needs root")
    helpers.require_tools("setuidgid")
    return subprocess.run(["setuidgid", "nobody", *argv], capture_output=True, text=True,
                          timeout=60, **kw)


def test_installed_program_runs_as_the_smtp_user(prefix):
    proc = as_nobody(os.path.join(prefix, "bin", "qmail-smtpd-py"), "--version", cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("qmail-smtpd-py, version ")


def test_check_as_the_smtp_user_finds_the_installation_usable(prefix):
    """`check --user nobody` runs the installed program as nobody: no finding."""
    if os.geteuid() != 0:
        pytest.skip("check --user needs root")
    root = tempfile.mkdtemp(prefix="qsmtpd-home-")
    try:
        os.chmod(root, 0o755)
        home = helpers.Home(root)
        proc = subprocess.run([os.path.join(prefix, "bin", "qmail-smtpd-py"), "check",
                               "--qmail-home", home.path, "--user", "nobody"],
                              capture_output=True, text=True, timeout=60, cwd="/")
        assert (proc.stdout, proc.returncode) == ("ok: 3 control files checked\n", 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def venv_script(prefix, name):
    return os.path.join(prefix, "lib", "qmail-smtpd-py", "bin", name)


def test_bin_links_point_into_the_venv(prefix):
    for name in ("qmail-smtpd-py", "qmail-queue-maildir"):
        link = os.path.join(prefix, "bin", name)
        assert os.path.islink(link)
        assert os.readlink(link) == venv_script(prefix, name)
        assert os.access(link, os.X_OK)


def test_installed_program_is_not_the_checkout(prefix):
    """Non-editable: the venv holds its own copy of the package."""
    python = venv_script(prefix, "python")
    out = subprocess.run(
        [python, "-I", "-c", "import qmail_smtpd_py; print(qmail_smtpd_py.__file__)"],
        capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    assert out.startswith(os.path.join(prefix, "lib", "qmail-smtpd-py") + os.sep)
    with open(venv_script(prefix, "qmail-smtpd-py"), "rb") as f:
        assert f.readline().startswith(b"#!" + venv_script(prefix, "python").encode())


def test_version(prefix):
    proc = subprocess.run([os.path.join(prefix, "bin", "qmail-smtpd-py"), "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("qmail-smtpd-py, version ")


def test_quit_session_over_pipes(prefix, make_home, monkeypatch):
    monkeypatch.setattr(helpers, "SERVER", os.path.join(prefix, "bin", "qmail-smtpd-py"))
    res = helpers.run_smtp(b"QUIT\r\n", home=make_home())
    assert res.out == b"220 mx.example.org ESMTP\r\n221 mx.example.org\r\n"
    assert res.status == 0
    assert res.queued == []


def test_message_into_installed_queue_maildir(prefix, make_home, monkeypatch, tmp_path):
    """The installed qmail-queue-maildir takes a message from the installed server."""
    monkeypatch.setattr(helpers, "SERVER", os.path.join(prefix, "bin", "qmail-smtpd-py"))
    maildir = tmp_path / "Maildir"
    env = {"QMAILQUEUE": os.path.join(prefix, "bin", "qmail-queue-maildir"),
           "MAILDIR": str(maildir)}
    res = helpers.run_smtp(
        b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
        b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n", env=env, home=make_home())
    assert res.status == 0, res.err
    assert b"\r\n250 ok " in res.out
    (new,) = os.listdir(maildir / "new")
    data = (maildir / "new" / new).read_bytes()
    assert b"Delivered-To: u@example.com\n" in data
    assert data.endswith(b"Subject: t\n\nhello\n")


def test_man_page_installed(prefix):
    installed = os.path.join(prefix, "share", "man", "man8", "qmail-smtpd-py.8")
    with open(installed, "rb") as a, open(MAN, "rb") as b:
        assert a.read() == b.read()
    assert oct(os.stat(installed).st_mode & 0o777) == oct(0o644)


def test_man_page_renders_without_warnings(prefix):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (Debian: groff-base)")
    installed = os.path.join(prefix, "share", "man", "man8", "qmail-smtpd-py.8")
    proc = subprocess.run(["groff", "-man", "-ww", "-z", installed],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout == ""


def test_samples_installed(prefix):
    samples = os.path.join(prefix, "share", "qmail-smtpd-py", "control")
    names = sorted(os.listdir(CONTROL))
    assert sorted(os.listdir(samples)) == names
    assert "smtpplugins" in names and "me" in names
    for name in names:
        with open(os.path.join(samples, name), "rb") as a, \
                open(os.path.join(CONTROL, name), "rb") as b:
            assert a.read() == b.read()


def test_sample_plugins_installed_with_the_venvs_python(prefix):
    """lib/qmail-smtpd-py/plugins/NAME for each sample plugin, runnable as it is (the
    helper module, dnspython and redis-py come with it)."""
    plugins = os.path.join(prefix, "lib", "qmail-smtpd-py", "plugins")
    links = ["ratelimit-" + s for s in ("connection", "mail", "rcpt")]
    assert sorted(os.listdir(plugins)) == sorted(os.listdir(os.path.join(REPO, "plugins"))
                                                 + links)
    for name in links:  # the sections' plain entries (a link's name is its section)
        assert os.path.realpath(os.path.join(plugins, name)) == os.path.realpath(
            os.path.join(plugins, "ratelimit"))
    for name in os.listdir(plugins):
        with open(os.path.join(plugins, name), "rb") as f:
            assert f.readline().startswith(b"#!%s" % os.fsencode(
                os.path.join(prefix, "lib", "qmail-smtpd-py", "bin", "python"))), name
    proc = subprocess.run([os.path.join(plugins, "ifauthnext")], capture_output=True,
                          env={"SMTPAUTHUSER": "joe"}, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, b"N\n")
    python = os.path.join(prefix, "lib", "qmail-smtpd-py", "bin", "python")
    subprocess.run([python, "-c", "import dns.resolver, qmail_smtpd_py.plugin_dns, "
                    "redis, qmail_smtpd_py.plugin_redis"], check=True, timeout=30)


@pytest.mark.parametrize("kind", ["file", "foreign link", "dangling link"])
def test_qmailbin_refuses_to_replace_a_foreign_file(prefix, tmp_path, kind):
    qmailbin = tmp_path / "qmail" / "bin"
    qmailbin.mkdir(parents=True)
    target = qmailbin / "qmail-smtpd-py"
    if kind == "file":
        target.write_bytes(b"#!/bin/sh\nexit 0\n")
    elif kind == "foreign link":
        other = tmp_path / "other"
        other.write_bytes(b"#!/bin/sh\n")
        target.symlink_to(other)
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = os.readlink(target) if target.is_symlink() else target.read_bytes()
    proc = make_install(prefix, "QMAILBIN=" + str(qmailbin))
    assert proc.returncode != 0
    assert "refusing" in proc.stderr
    after = os.readlink(target) if target.is_symlink() else target.read_bytes()
    assert after == before
    assert os.listdir(qmailbin) == ["qmail-smtpd-py"]


def test_qmailbin_links_when_absent_and_again_when_ours(prefix, tmp_path, make_home,
                                                         monkeypatch):
    qmailbin = tmp_path / "qmail" / "bin"  # created by make install
    target = qmailbin / "qmail-smtpd-py"
    check(make_install(prefix, "QMAILBIN=" + str(qmailbin)))
    assert os.readlink(target) == venv_script(prefix, "qmail-smtpd-py")
    # Installing again over our own link is fine and leaves it as it was.
    check(make_install(prefix, "QMAILBIN=" + str(qmailbin)))
    assert os.readlink(target) == venv_script(prefix, "qmail-smtpd-py")
    monkeypatch.setattr(helpers, "SERVER", str(target))
    res = helpers.run_smtp(b"QUIT\r\n", home=make_home())
    assert res.out == b"220 mx.example.org ESMTP\r\n221 mx.example.org\r\n"
    assert res.status == 0


def test_help_and_man_page_list_the_same_environment_variables():
    """`qmail-smtpd-py --help` and ENVIRONMENT in qmail-smtpd-py(8) name the same
    variables, so neither falls behind when one is added."""
    helpers.require_server()
    text = subprocess.run([helpers.SERVER, "--help"], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    block = text.split("Environment", 1)[1].split("Control files", 1)[0]
    in_help = set(re.findall(r"\b[0-9]*[A-Z][A-Z0-9_]{3,}\b", block))
    with open(MAN) as f:
        man = f.read().split(".SH ENVIRONMENT", 1)[1].split("\n.SH ", 1)[0].split("\n")
    headers = [man[i + 1] for i, line in enumerate(man[:-1]) if line == ".TP"]
    in_man = set(re.findall(r"\b[0-9]*[A-Z][A-Z0-9_]{3,}\b", " ".join(headers)))
    in_help -= {"LOGIN", "PLAIN", "STARTTLS", "AUTH", "MAIL", "EHLO", "OpenSSL", "RCPT"}
    assert in_help == in_man

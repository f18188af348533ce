"""`qmail-smtpd-py check [--qmail-home DIR] [--user USER] [--log-user USER]
[CHECKPASSWORD...]`: look over control/ and the set-up for mistakes.

Every problem is one line naming the file and the fix; "warning:" lines are
set-ups that work but are probably not meant.  The checks read the files the
way the server does (control.py, from the qmail home as working directory),
so what they report is what a connection would see.  The environment and
the checkpassword command line are the server's (SMTPAUTH, NOSPP, ...).

With --user the checks run in a child process with that account's uid and
primary group and no other groups, as tcpserver -U and `serve -U` run the
sessions: the kernel itself says what the account may read and run, ACLs
and mount options included, which computing permission bits would miss.
The child also runs this installation's qmail-smtpd-py (the interpreter,
the package), as tcpserver would for every connection.
"""

import json
import os
import pwd
import subprocess
import sys

import attrs
import click

from . import access
from .cdb import Cdb, CdbError
from .control import (
    ControlError,
    auth_settings,
    leading_number,
    parse_lines,
    read_file,
    read_line,
)
from .core.auth import DISABLED
from .core.replies import TLS_SETUP_STEPS
from .core.spp import SECTIONS
from .tls import make_context

# Every control file the server reads.
CONTROL_FILES = ("me", "smtpgreeting", "localiphost", "rcpthosts", "morercpthosts.cdb",
                 "badmailfrom", "databytes", "timeoutsmtpd", "smtpplugins", "servercert.pem",
                 "clientca.pem", "clientcrl.pem", "tlsclients", "tlsserverciphers",
                 "dh2048.pem")
# Text files where a CR before the LF becomes part of the value.
TEXT_FILES = ("me", "smtpgreeting", "localiphost", "rcpthosts", "badmailfrom", "databytes",
              "timeoutsmtpd", "smtpplugins", "tlsclients", "tlsserverciphers")
TLS_FILES = ("servercert.pem", "clientca.pem", "clientcrl.pem", "tlsclients",
             "tlsserverciphers", "dh2048.pem")


@attrs.frozen
class Finding:
    """One problem: the file, what is wrong and the fix; a warning is a
    set-up that works but is probably not meant."""

    path: str
    text: str
    warning: bool = False

    def __str__(self):
        return "%s%s: %s" % ("warning: " if self.warning else "", self.path, self.text)


def check(qmail_home, environ=None, args=(), user=None, log_user=None):
    """The findings for qmail_home (empty: all fine), and how many control
    files were looked at.  args: the server's checkpassword command line;
    user: the account the sessions run as (checked as it would see things);
    log_user: the log service's account."""
    environ = os.environb if environ is None else environ
    problems = []
    if log_user:
        problems += _account_missing(log_user, "log user", "the log service (setuidgid in "
                                     "log/run) cannot start, and the server blocks once the "
                                     "log pipe is full", "env/LOGUSER")
    if user:
        missing = _account_missing(user, "user", "the sessions cannot run as it (envuidgid "
                                   "fails, the service does not start)", "env/SMTPUSER")
        if missing:
            return problems + missing, 0
        found, checked = _as_user(user, qmail_home, environ, args)
    else:
        found, checked = _check_home(qmail_home, environ, args)
    return problems + found, checked


def _account_missing(name, what, effect, setting):
    try:
        pwd.getpwnam(name)
        return []
    except KeyError:
        return [Finding("%s %s" % (what, name), "no such account, so %s; create it (qmail's "
                        "INSTALL.ids) or name another in %s" % (effect, setting))]


def _check_home(qmail_home, environ, args):
    cwd = os.open(".", os.O_RDONLY)
    try:
        os.chdir(qmail_home)
    except OSError as e:
        os.close(cwd)
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):
            return [Finding(qmail_home, "qmail home does not exist (give --qmail-home DIR or "
                                        "set QMAILHOME)")], 0
        return [Finding(qmail_home, "cannot enter the qmail home (%s), so every connection "
                        "would fail; make it and the directories above it searchable "
                        "(chmod o+x)" % e.strerror)], 0
    try:  # the server runs checkpassword from the qmail home too
        problems, checked = _check_here(environ)
        problems += _check_auth(environ, args)
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    return problems, checked


def _as_user(name, qmail_home, environ, args):
    """check() in a child running as the account name, as the sessions do;
    the findings come back as JSON on a pipe."""
    account = pwd.getpwnam(name)
    qmail_home = os.path.abspath(qmail_home)
    program = _program()
    # Resolved here: the account may not be able to follow the symlinks itself.
    walks = [(access.steps(path), os.X_OK) for path in (program, sys.executable)]
    walks += [(access.steps(path), os.R_OK) for path in (os.__file__, __file__)]
    ours = os.geteuid() == account.pw_uid
    if os.geteuid() != 0 and not ours:
        return [Finding("user " + name, "checking as another account needs root; run check "
                        "as root (or as %s)" % name)], 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the account, check, report, never return
        status = 1
        try:
            os.close(r)
            os.chdir("/")  # this directory may be closed to the account
            if not ours:
                os.setgroups([account.pw_gid])
                os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
                os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
            problems, checked = _check_home(qmail_home, environ, args)
            problems += _check_runs(program, walks, name)
            report = {"checked": checked, "problems": [attrs.astuple(p) for p in problems]}
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(w, data):]
            status = 0
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            os.write(w, json.dumps({"error": "%s: %s" % (type(e).__name__, e)}).encode())
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks) or b'{"error": "the child died"}')
    if "error" in report:
        return [Finding("user " + name, "the check as this account failed: " + report["error"])], 0
    return [Finding(*p) for p in report["problems"]], report["checked"]


def _program():
    """This installation's qmail-smtpd-py: the one check was started as, or the
    script beside the interpreter."""
    if os.path.basename(sys.argv[0]) == "qmail-smtpd-py" and os.path.isfile(sys.argv[0]):
        return os.path.abspath(sys.argv[0])
    return os.path.join(os.path.dirname(sys.executable), "qmail-smtpd-py")


def _check_runs(program, walks, name):
    """Run program as tcpserver would for a connection (as this process's
    account); a finding naming what is in the way if it cannot."""
    try:
        p = subprocess.run([program, "--version"], stdin=subprocess.DEVNULL,
                           capture_output=True, cwd="/", timeout=60,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except OSError as e:
        why = e.strerror
    except subprocess.TimeoutExpired:
        why = "no answer to --version in 60 seconds"
    else:
        if p.returncode == 0 and p.stdout.startswith(b"qmail-smtpd-py"):
            return []
        lines = p.stderr.decode("utf-8", "replace").strip().splitlines() or [""]
        why = "exit status %d%s" % (p.returncode, ": " + lines[-1] if lines[-1] else "")
    for walk, mode in walks:
        step = access.blocked(walk, lambda path, last, mode=mode: os.access(
            path, mode if last else os.X_OK))
        if step is not None:
            why += "; %s is in the way" % access.describe(step)
            break
    return [Finding(program, "%s cannot run it (%s), so every connection would be dropped "
                    "(tcpserver logs only \"unable to run\"); install with a Python and into "
                    "a directory other users can reach (make install falls back to "
                    "/usr/bin/python3 by itself)" % (name, why))]


def _check_auth(environ, args):
    """SMTPAUTH against the checkpassword command line, as the server reads them."""
    mode, argv, _ = auth_settings(environ, args)
    if mode is None:
        return []
    if mode != DISABLED and not argv:
        return [Finding("SMTPAUTH", "set, but no checkpassword program is given on the "
                        "command line, so AUTH is offered and every attempt refused with 503 "
                        "(logged by=auth-off); give the checkpassword command line after "
                        "qmail-smtpd-py (env/CHECKPASSWORD in the service kit) or unset "
                        "SMTPAUTH")]
    problems = []
    if mode == DISABLED and b"SMTPAUTH" not in environ:
        problems.append(Finding("SMTPAUTH", "unset, so AUTH is off although a checkpassword "
                                "command line is given; set it (empty: LOGIN PLAIN)",
                                warning=True))
    if argv:
        program = _find_program(argv[0], environ)
        text = os.fsdecode(argv[0])
        if program is None:
            problems.append(Finding(text, "checkpassword program not found, so every AUTH "
                                    "fails (535 after 5 seconds); fix the command line"))
        elif not os.access(program, os.X_OK) or not os.path.isfile(program):
            problems.append(Finding(text, "checkpassword program is not an executable file, "
                                    "so every AUTH fails (535 after 5 seconds); chmod +x it or "
                                    "fix the command line"))
    return problems


def _find_program(name, environ):
    """The path execvp would run for name, or None."""
    if b"/" in name:
        return name if os.path.exists(name) else None
    for directory in environ.get(b"PATH", b"/usr/bin:/bin").split(b":"):
        path = os.path.join(directory or b".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _check_here(environ):
    problems = []
    contents = {}  # readable text files: name -> bytes
    checked = 0
    for name in CONTROL_FILES:
        path = "control/" + name
        if not os.path.lexists(path) or name == "morercpthosts.cdb":
            continue
        checked += 1
        try:
            contents[name] = read_file(path)
        except ControlError as e:
            effect = "STARTTLS would fail" if name in TLS_FILES else "the server would answer 421"
            problems.append(Finding(path, "cannot read (%s), %s; make it a file the server can "
                                          "read" % (str(e).partition(": ")[2], effect)))
    for name in TEXT_FILES:
        problems += _crlf(name, contents.get(name))

    if read_or_none("control/me") is None and read_or_none("control/smtpgreeting") is None:
        problems.append(Finding("control/me", "neither control/me nor control/smtpgreeting "
                                "exists, the server would answer 421; put this host's name "
                                "in control/me"))
    if not os.path.lexists("control/rcpthosts"):
        problems.append(Finding("control/rcpthosts", "missing, so this is an open relay (every "
                                "domain is accepted); list the domains you receive mail for",
                                warning=True))
    for name in ("databytes", "timeoutsmtpd"):
        data = contents.get(name)
        if data is not None and leading_number(data.split(b"\n", 1)[0]) is None:
            problems.append(Finding("control/" + name, "does not start with a digit, so it is "
                                    "ignored; write a number"))

    if os.path.lexists("control/morercpthosts.cdb"):
        checked += 1
        problems += _check_cdb("control/morercpthosts.cdb")
    problems += _check_plugins(environ)
    problems += _check_tls(environ)
    return problems, checked


def read_or_none(path):
    """read_line, with an unreadable file counted as missing (reported elsewhere)."""
    try:
        return read_line(path)
    except ControlError:
        return None


def _crlf(name, data):
    if not data:
        return []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.rstrip(b" \t").endswith(b"\r"):
            return [Finding("control/" + name, "line %d ends in CR (DOS line endings); convert "
                            "the file with dos2unix or tr -d '\\r'" % number)]
    return []


def _check_cdb(path):
    try:
        cdb = Cdb.open(path)
    except OSError as e:
        return [Finding(path, "cannot read (%s); the server would answer 421, fix its "
                        "permissions or rebuild it with qmail-newmrh" % e.strerror)]
    try:
        for key in (b"example.com", b"localhost", b"check.invalid"):
            cdb.get(key)
    except CdbError as e:
        return [Finding(path, "unreadable or corrupt (%s); the server would answer 421 at "
                        "RCPT, rebuild it with qmail-newmrh" % e)]
    finally:
        os.close(cdb.fd)
    return []


def _check_plugins(environ):
    if b"NOSPP" in environ:
        return []
    conffile = os.fsdecode(environ.get(b"SPPCONFFILE") or b"control/smtpplugins")
    try:
        data = read_file(conffile)
    except ControlError:
        return []  # reported as unreadable above (SPPCONFFILE elsewhere: by the server)
    if data is None:
        return [Finding(conffile, "missing, so the server fails closed with 421; create it "
                        "(empty is fine) or set NOSPP to switch qmail-spp off")]
    problems = []
    section = None
    for line in parse_lines(data):
        text = line.decode("utf-8", "replace")
        if line[:1] == b"[":
            section = line[1:2]
            if section not in SECTIONS:
                problems.append(Finding(conffile, "unknown section %s, its entries are "
                                        "ignored; use [connection] [helo] [mail] [rcpt] [data] "
                                        "or [auth]" % text, warning=True))
        elif section is None:
            problems.append(Finding(conffile, "%s: before the first [section], so it is "
                                    "ignored; put it under a section header" % text,
                                    warning=True))
        elif section in SECTIONS and line[:1] != b":":
            problems += _check_plugin(conffile, line, text)
    return problems


def _check_plugin(conffile, entry, text):
    if os.path.isfile(entry) and os.access(entry, os.X_OK):
        return _check_interpreter(conffile, entry, text)
    if b" " in entry and not os.path.exists(entry):
        return [Finding(conffile, "%s: looks like a program with arguments, but entries are "
                        "not split; write ':%s' to run it through /bin/sh" % (text, text),
                        warning=True)]
    if not os.path.exists(entry):
        return [Finding(conffile, "%s: does not exist (paths are relative to the qmail home); "
                        "its section would answer 451" % text)]
    return [Finding(conffile, "%s: not an executable file; chmod +x it or fix the path" % text)]


def _check_interpreter(conffile, entry, text):
    """A script's #! interpreter must be runnable by this account too."""
    try:
        with open(entry, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        return [Finding(conffile, "%s: cannot read it (%s), so it can only be a compiled "
                        "program; if it is a script, make it readable (chmod o+r)"
                        % (text, e.strerror), warning=True)]
    if not first.startswith(b"#!"):
        return []
    words = first[2:].split()
    why = _unrunnable(os.fsdecode(words[0])) if words else None
    if why is None:
        return []
    return [Finding(conffile, "%s: its interpreter %s %s, so its section would answer 451; "
                    "fix its first line or the interpreter's permissions"
                    % (text, os.fsdecode(words[0]), why))]


def _unrunnable(path):
    """Why this process cannot run path, or None if it can."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        step = access.blocked(access.steps(path), lambda step, last: os.access(step, os.X_OK))
        return "cannot be reached (%s%s)" % (
            e.strerror, "; %s is in the way" % access.describe(step) if step else "")
    return "is not an executable file"


def _check_tls(environ):
    problems = []
    if os.path.isfile("control/servercert.pem") and os.access("control/servercert.pem",
                                                              os.R_OK):
        _, outcome = make_context(None, False)
        if hasattr(outcome, "step"):  # TLSSetupFailed
            what = TLS_SETUP_STEPS[outcome.step] + (b": " + outcome.detail if outcome.detail
                                                    else b"")
            problems.append(Finding("control/servercert.pem", "not usable (%s); STARTTLS would "
                                    "fail with 454, install the certificate chain and key in "
                                    "one PEM file" % os.fsdecode(what)))
    ca = os.path.lexists("control/clientca.pem")
    clients = os.path.lexists("control/tlsclients")
    if ca != clients:
        have, missing = ("clientca.pem", "tlsclients") if ca else ("tlsclients", "clientca.pem")
        problems.append(Finding("control/" + have, "present without control/%s, but relaying "
                                "by client certificate needs both; add %s or remove %s"
                                % (missing, missing, have), warning=True))
    return problems


@click.command("check", context_settings={"allow_interspersed_args": False})
@click.option("--qmail-home", envvar="QMAILHOME", default="/var/qmail", show_default=True,
              metavar="DIR", help="the qmail home whose control/ is checked")
@click.option("--user", metavar="USER",
              help="the account the sessions run as (qmaild): check everything as it "
                   "would see it, and that it can run this program (needs root)")
@click.option("--log-user", metavar="USER",
              help="the log service's account (qmaill): say if it does not exist")
@click.argument("checkpassword", nargs=-1, type=click.UNPROCESSED)
def command(qmail_home, user, log_user, checkpassword):
    """Look over the control files for mistakes: one line per problem,
    naming the file and the fix.  Exit status 1 when there is one.

    CHECKPASSWORD is the server's checkpassword command line, if any
    (checked with SMTPAUTH from the environment)."""
    problems, checked = check(qmail_home, args=checkpassword, user=user, log_user=log_user)
    for problem in problems:
        click.echo(str(problem))
    if not problems:
        click.echo("ok: %d control files checked" % checked)
    raise SystemExit(1 if problems else 0)

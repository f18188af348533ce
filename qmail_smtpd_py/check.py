"""`qmail-smtpd-py check [--qmail-home DIR]`: look over control/ for mistakes.

Every problem is one line naming the file and the fix; "warning:" lines are
set-ups that work but are probably not meant.  The checks read the files the
way the server does (control.py, from the qmail home as working directory),
so what they report is what a connection would see.
"""

import os

import attrs
import click

from .cdb import Cdb, CdbError
from .control import ControlError, leading_number, parse_lines, read_file, read_line
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


def check(qmail_home, environ=None):
    """The findings for qmail_home (empty: all fine), and how many control
    files were looked at."""
    environ = os.environb if environ is None else environ
    if not os.path.isdir(qmail_home):
        return [Finding(qmail_home, "qmail home does not exist (give --qmail-home DIR or set "
                                    "QMAILHOME)")], 0
    cwd = os.open(".", os.O_RDONLY)
    os.chdir(qmail_home)
    try:
        return _check_here(environ)
    finally:
        os.fchdir(cwd)
        os.close(cwd)


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
            problems += _check_program(conffile, line, text)
    return problems


def _check_program(conffile, entry, text):
    if os.path.isfile(entry) and os.access(entry, os.X_OK):
        return []
    if b" " in entry and not os.path.exists(entry):
        return [Finding(conffile, "%s: looks like a program with arguments, but entries are "
                        "not split; write ':%s' to run it through /bin/sh" % (text, text),
                        warning=True)]
    if not os.path.exists(entry):
        return [Finding(conffile, "%s: does not exist (paths are relative to the qmail home); "
                        "its section would answer 451" % text)]
    return [Finding(conffile, "%s: not an executable file; chmod +x it or fix the path" % text)]


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


@click.command("check")
@click.option("--qmail-home", envvar="QMAILHOME", default="/var/qmail", show_default=True,
              metavar="DIR", help="the qmail home whose control/ is checked")
def command(qmail_home):
    """Look over the control files for mistakes: one line per problem,
    naming the file and the fix.  Exit status 1 when there is one."""
    problems, checked = check(qmail_home)
    for problem in problems:
        click.echo(str(problem))
    if not problems:
        click.echo("ok: %d control files checked" % checked)
    raise SystemExit(1 if problems else 0)

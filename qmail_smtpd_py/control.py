"""Control files and environment -> one configuration object.

Read once per connection, before the greeting, relative to the qmail home
(the process has already chdir'ed there).  The readers follow qmail's
control.c: a "line" is the first line with trailing LF/space/TAB removed
(CR is kept), a "list" drops empty lines and lines starting with '#', an
"int" is the leading decimal digits of the line.
"""

import os

from .cdb import Cdb, CdbError
from .spp import parse_config


DEFAULT_MAX_LINE = 1 << 16


class ControlError(Exception):
    """A control file exists but cannot be read: 421 unable to read controls."""


def read_file(name):
    """The whole file as bytes, or None if it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError("%s: %s" % (os.fsdecode(name), e.strerror)) from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as e:
        raise ControlError("%s: %s" % (os.fsdecode(name), e.strerror)) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_line(name):
    data = read_file(name)
    if data is None:
        return None
    return data.split(b"\n", 1)[0].rstrip(b" \t")


def parse_lines(data):
    lines = (line.rstrip(b" \t") for line in data.split(b"\n"))
    return [line for line in lines if line and not line.startswith(b"#")]


def read_list(name):
    data = read_file(name)
    return None if data is None else parse_lines(data)


def leading_number(text):
    """The value of the leading decimal digits, or None if there are none."""
    n = 0
    while n < len(text) and 0x30 <= text[n] <= 0x39:
        n += 1
    return int(text[:n]) if n else None


def read_int(name, default):
    line = read_line(name)
    value = None if line is None else leading_number(line)
    return default if value is None else value


def c_int(value):
    """What a C int holds after 'int x = (unsigned long) value'."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# SMTPLOGLEVEL: what goes to the log (stderr).  Errors are always logged;
# the default adds one line per connection event (connect, accept, each
# refusal, AUTH, TLS, close); 2 adds every command (AUTH arguments hidden),
# 3 every reply.
LOG_ERRORS, LOG_EVENTS, LOG_COMMANDS, LOG_REPLIES = 0, 1, 2, 3


class Config:
    """Everything the session needs from control/ and the start-up environment."""

    __slots__ = ("greeting", "localiphost", "timeout", "rcpthosts", "morercpthosts",
                 "badmailfrom", "databytes", "max_line", "plugins", "auth_mode",
                 "checkpassword", "auth_hostname", "tls", "smtps", "force_tls", "require_tls",
                 "smtputf8", "log_level")

    def __init__(self, greeting, localiphost=None, timeout=1200, rcpthosts=None,
                 morercpthosts=None, badmailfrom=None, databytes=0, max_line=DEFAULT_MAX_LINE,
                 plugins=None, auth_mode=None, checkpassword=(), auth_hostname=None,
                 tls=False, smtps=False, force_tls=False, require_tls=False, smtputf8=False,
                 log_level=LOG_EVENTS):
        self.greeting = greeting          # bytes, used verbatim in 220/250/221
        self.localiphost = localiphost    # bytes or None (feature off)
        self.timeout = timeout            # seconds for each read and write
        self.rcpthosts = rcpthosts        # set of lower-cased domains, or None = accept all
        self.morercpthosts = morercpthosts  # container of domains (cdb) or None
        self.badmailfrom = badmailfrom    # set of lower-cased entries, or None
        self.databytes = databytes        # 0 = unlimited
        self.max_line = max_line          # longest command line accepted
        self.plugins = plugins            # qmail-spp entries per section letter; None = off
        self.auth_mode = auth_mode        # auth.* mode; None = plain notqmail, no AUTH patch
        self.checkpassword = checkpassword  # argv of the checkpassword program
        self.auth_hostname = auth_hostname  # CRAM-MD5 challenge host (old 3-argument form)
        self.tls = tls                    # control/servercert.pem exists: offer STARTTLS
        self.smtps = smtps                # SMTPS set: TLS from the first byte
        self.force_tls = force_tls        # FORCETLS: no AUTH before TLS
        self.require_tls = require_tls    # TLSREQUIRED: no MAIL before TLS
        self.smtputf8 = smtputf8          # SMTPUTF8: offer RFC 6531 (off: netqmail's EHLO)
        self.log_level = log_level        # SMTPLOGLEVEL: LOG_ERRORS ... LOG_REPLIES


class _CheckedCdb:
    """A Cdb whose read errors become ControlError (421 at RCPT time)."""

    __slots__ = ("cdb",)

    def __init__(self, cdb):
        self.cdb = cdb

    def __contains__(self, key):
        try:
            return key in self.cdb
        except CdbError as e:
            raise ControlError("control/morercpthosts.cdb: %s" % e) from None


def auth_settings(environ, args):
    """(mode, checkpassword argv, hostname) from SMTPAUTH and the command line.

    No arguments and no SMTPAUTH: plain notqmail (mode None).  Otherwise the
    AUTH patch: `qmail-smtpd-py /bin/checkpassword prog` or the old form
    `qmail-smtpd-py HOSTNAME /bin/checkpassword prog` (first argument not an
    absolute path).
    """
    smtpauth = environ.get(b"SMTPAUTH")
    if not args and smtpauth is None:
        return None, (), None
    from .auth import parse_mode
    args = [os.fsencode(a) for a in args]
    hostname = None
    if args and not args[0].startswith(b"/"):
        hostname, args = args[0], args[1:]
    return parse_mode(smtpauth), tuple(args), hostname


def load(environ, args=()):
    """Read control/* (cwd = qmail home) and the relevant environment."""
    me = read_line("control/me")
    greeting = read_line("control/smtpgreeting")
    if greeting is None:
        greeting = me
    if greeting is None:
        raise ControlError("neither control/smtpgreeting nor control/me exists")
    localiphost = read_line("control/localiphost")
    if localiphost is None:
        localiphost = me

    timeout = c_int(read_int("control/timeoutsmtpd", 1200))
    if timeout <= 0:
        timeout = 1

    rcpthosts = read_list("control/rcpthosts")
    morercpthosts = None
    if rcpthosts is not None:
        rcpthosts = {host.lower() for host in rcpthosts}
        try:
            cdb = Cdb.open("control/morercpthosts.cdb")
        except OSError as e:
            raise ControlError("control/morercpthosts.cdb: %s" % e.strerror) from None
        if cdb is not None:
            morercpthosts = _CheckedCdb(cdb)

    plugins = None
    if b"NOSPP" not in environ:
        # qmail-spp fails closed: a deleted file must not switch spam checks off.
        conffile = environ.get(b"SPPCONFFILE") or b"control/smtpplugins"
        lines = read_list(conffile)
        if lines is None:
            raise ControlError("%s does not exist (create it, empty is fine, or set NOSPP)"
                               % os.fsdecode(conffile))
        plugins = parse_config(lines)

    badmailfrom = read_list("control/badmailfrom")
    if badmailfrom is not None:
        badmailfrom = {entry.lower() for entry in badmailfrom}

    databytes = read_int("control/databytes", 0) & 0xFFFFFFFF
    env_databytes = environ.get(b"DATABYTES")
    if env_databytes is not None:
        databytes = (leading_number(env_databytes) or 0) & 0xFFFFFFFF
    if databytes == 0xFFFFFFFF:
        databytes -= 1

    # Not in qmail (its lines are unbounded); SMTPMAXLINE bounds memory use.
    max_line = leading_number(environ.get(b"SMTPMAXLINE", b"")) or DEFAULT_MAX_LINE

    auth_mode, checkpassword, auth_hostname = auth_settings(environ, args)

    # As the TLS patch: the certificate's existence decides; it is loaded
    # only when a client asks for TLS.
    tls = os.path.exists("control/servercert.pem")

    return Config(greeting, localiphost, timeout, rcpthosts, morercpthosts,
                  badmailfrom, databytes, max_line, plugins, auth_mode, checkpassword,
                  auth_hostname, tls, b"SMTPS" in environ, _flag(environ, b"FORCETLS"),
                  _flag(environ, b"TLSREQUIRED"), _flag(environ, b"SMTPUTF8"),
                  _log_level(environ))


def _flag(environ, name):
    """An on/off variable: set and not empty or "0"."""
    return environ.get(name, b"") not in (b"", b"0")


def _log_level(environ):
    level = environ.get(b"SMTPLOGLEVEL", b"")
    return min(int(level), LOG_REPLIES) if level.isdigit() else LOG_EVENTS

"""Control files and environment -> one core.config.Config.

Read once per connection, before the greeting, relative to the qmail home
(the process has already chdir'ed there).  The readers follow qmail's
control.c: a "line" is the first line with trailing LF/space/TAB removed
(CR is kept), a "list" drops empty lines and lines starting with '#', an
"int" is the leading decimal digits of the line.  qmail keeps each entry as
a C string, so a NUL ends a line file's value and splits a list line into
several entries.
"""

import os

from .cdb import Cdb
from .core.auth import parse_mode
from .core.config import DEFAULT_MAX_LINE, LOG_EVENTS, LOG_REPLIES, Config
from .core.spp import parse_config


class ControlError(Exception):
    """A control file exists but cannot be read: 421 unable to read controls."""


# A resident worker keeps what it read, by file identity: a file whose inode,
# size, mtime or ctime changed (an edit, a replacement, a chmod) is read again,
# so each session still sees the control files as they are when it starts.
kept = None  # {name: (identity, data)} when keeping; None: read every time


def read_file(name):
    """The whole file as bytes, or None if it does not exist."""
    if kept is not None:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ControlError("%s: %s" % (os.fsdecode(name), e.strerror)) from None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry = kept.get(name)
        if entry is not None and entry[0] == identity:
            return entry[1]
        data = _read(name)
        kept[name] = (identity, data)
        return data
    return _read(name)


def _read(name):
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


def first_line(data):
    """control_readline(): the first line, trailing space/TAB removed, up to
    a NUL (qmail sends a NUL in smtpgreeting to the client and cuts
    localiphost at it in some uses only; here the value ends there)."""
    line = data.split(b"\n", 1)[0].rstrip(b" \t")
    return line.split(b"\0", 1)[0]


def read_line(name):
    data = read_file(name)
    return None if data is None else first_line(data)


def parse_lines(data):
    """control_readfile(): the entries of a list file.  Each line loses its
    trailing space/TAB; a line that is empty or starts with '#' or NUL is
    dropped; what is left becomes NUL-terminated C strings, so a NUL inside
    a line splits it into entries (empty ones included, and a '#' after a
    NUL is no comment)."""
    entries = []
    for line in data.split(b"\n"):
        line = line.rstrip(b" \t")
        if line and line[0] not in b"#\0":
            entries += line.split(b"\0") if b"\0" in line else (line,)
    return entries


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
    args = [os.fsencode(a) for a in args]
    hostname = None
    if args and not args[0].startswith(b"/"):
        hostname, args = args[0], args[1:]
    return parse_mode(smtpauth), tuple(args), hostname


def load(environ, args=()):
    """Read control/* (cwd = qmail home) and the relevant environment.

    Returns (config, morercpthosts): the open morercpthosts.cdb (a cdb.Cdb,
    which the driver looks recipients up in) or None.  Raises ControlError.
    """
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
            morercpthosts = Cdb.open("control/morercpthosts.cdb")
        except OSError as e:
            raise ControlError("control/morercpthosts.cdb: %s" % e.strerror) from None

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

    auth_mode, checkpassword, auth_hostname = auth_settings(environ, args)

    # As the TLS patch: the certificate's existence decides; it is loaded
    # only when a client asks for TLS.
    tls = os.path.exists("control/servercert.pem")
    tls_ciphers = tls_clients = None
    if tls:
        tls_ciphers = environ.get(b"TLSCIPHERS")
        if tls_ciphers is None:
            lines = read_list("control/tlsserverciphers")
            tls_ciphers = b":".join(lines) if lines else None
        clients = read_list("control/tlsclients")
        if clients is not None and os.path.exists("control/clientca.pem"):
            tls_clients = frozenset(clients)

    config = Config(
        greeting=greeting, localiphost=localiphost, timeout=timeout, rcpthosts=rcpthosts,
        morercpthosts=morercpthosts is not None, badmailfrom=badmailfrom,
        databytes=databytes,
        # Not in qmail (its lines are unbounded); SMTPMAXLINE bounds memory use.
        max_line=leading_number(environ.get(b"SMTPMAXLINE", b"")) or DEFAULT_MAX_LINE,
        plugins=plugins, plugin_time_limit=_time_limit(environ, b"SPPTIMEOUT"),
        program_time_limit=_time_limit(environ, b"SMTPEXTFORKTIMEOUT"),
        auth_mode=auth_mode, checkpassword=checkpassword, auth_hostname=auth_hostname,
        tls=tls, smtps=b"SMTPS" in environ, force_tls=_flag(environ, b"FORCETLS"),
        require_tls=_flag(environ, b"TLSREQUIRED"), tls_ciphers=tls_ciphers,
        tls_clients=tls_clients, smtputf8=_flag(environ, b"SMTPUTF8"),
        log_level=_log_level(environ))
    return config, morercpthosts


def _flag(environ, name):
    """An on/off variable: set and not empty or "0"."""
    return environ.get(name, b"") not in (b"", b"0")


def _time_limit(environ, name):
    """SPPTIMEOUT / SMTPEXTFORKTIMEOUT: seconds a qmail-spp plugin / an
    SMTPEXTFORK program may run (unset or 0: no limit, as the C patches)."""
    return leading_number(environ.get(name, b"")) or None


def _log_level(environ):
    level = environ.get(b"SMTPLOGLEVEL", b"")
    return min(int(level), LOG_REPLIES) if level.isdigit() else LOG_EVENTS

"""Which recipients qmail would bounce with "no mailbox here by that name".

Theory of operation.  `Resolver.check(rcpt)` follows one recipient (the
SMTPRCPTTO a qmail-spp plugin sees) through qmail's own programs, reading
the same files they read (../shared/spec/recipients.md):

    rewrite()       qmail-send: envnoathost, percenthack, locals,
                    virtualdomains -> remote, or local with a local part L
    _assignment()   qmail-lspawn: L == "" is thrown away; users/cdb
                    (qmail-newu's format: "=" and "+" entries, wildchars)
    _getpw()        qmail-getpw: the passwd database (longest account
                    name before a conf-break byte, uid != 0, home owned by
                    it), else the alias user with the whole local part
    _dotqmail()     qmail-local: the home checks, then .qmail-EXT and the
                    -default chain; nothing found with a dash means the
                    bounce "Sorry, no mailbox here by that name. (#5.1.1)"

and returns a Verdict whose status is one of

    ACCEPT   qmail has somewhere to deliver it
    REJECT   qmail would bounce it with #5.1.1 (the only refusal)
    TRASH    an empty local part: qmail drops it (success, nothing delivered)
    REMOTE   not a local or virtual domain: rcpthosts' business
    UNKNOWN  qmail would defer, or this process cannot see what qmail
             would see, or a file is not understood: accept, log .reason

Nothing here refuses on a guess: every read error, unexpected format and
permission problem is UNKNOWN.  The checker runs as the SMTP server's user
(qmaild), qmail-getpw as qmailp and qmail-local as the recipient, so an
EACCES seen here says nothing about what they would see: UNKNOWN too.
Files are stat()ed, not opened (existence is what qmail-local decides on),
except a found "-default" file when a backend is configured (below).

Backends.  A "-default" file that hands the mail to a program or forwards
it (vpopmail's `| vdelivermail '' bounce-no-mailbox`, any other program) is
where qmail's knowledge ends; qmail accepts every address it catches.  Two
optional backends know more:

    AddressMap   a CDB or text map of valid addresses, as Postfix's
                 relay_recipient_maps: authoritative for the domains it
                 declares (a bare "domain" key), "user@domain" valid,
                 "@domain" every address of the domain valid
    vpopmail     when the file's one delivery is vdelivermail with
                 bounce-no-mailbox: the domain directory's vpasswd.cdb
                 (else vpasswd), as vdelivermail's cdb backend reads it

All strings are bytes; case folding is ASCII-only (bytes.lower), as qmail's.
The passwd lookup is injectable: a function name -> (name, uid, gid, home)
or None, which may raise OSError (system_getpw, PasswdFile).
"""

import errno
import os
import pwd
import stat

from .cdb import Cdb, CdbError

ACCEPT = "accept"
REJECT = "reject"
TRASH = "trash"
REMOTE = "remote"
UNKNOWN = "unknown"

# qmail's compiled-in defaults (conf-qmail, conf-break, conf-users, conf-patrn).
QMAILHOME = b"/var/qmail"
AUTO_BREAK = b"-"
AUTO_USERA = b"alias"
AUTO_PATRN = 0o002
GETPW_USERLEN = 32  # qmail-getpw: account names of 32 bytes or more are never tried

# error_temp.c: errnos qmail treats as temporary (a deferral).
_TEMP_NAMES = ("EINTR ENOMEM ETXTBSY EIO ETIMEDOUT EAGAIN EWOULDBLOCK EDEADLK EBUSY ENFILE "
               "EMFILE EFBIG ENOSPC ENETDOWN ENETUNREACH ENETRESET ECONNABORTED ECONNRESET "
               "ENOBUFS ETOOMANYREFS ECONNREFUSED EHOSTDOWN EHOSTUNREACH EPROCLIM EUSERS "
               "EDQUOT ESTALE ENOLCK")
TEMP_ERRNOS = frozenset(getattr(errno, name) for name in _TEMP_NAMES.split()
                        if hasattr(errno, name))
# What qmail-local's qmeexists() turns into a deferral besides those.
_DEFER_ERRNOS = TEMP_ERRNOS | {errno.EACCES, errno.EPERM}

VDELIVERMAIL_BOUNCE = b"bounce-no-mailbox"


class Verdict:
    """The outcome of Resolver.check.  status is one of ACCEPT REJECT TRASH
    REMOTE UNKNOWN; reason says why in words (for the log); the rest is the
    trace: address (after rewrite, with a virtual domain's prefix), local
    (L), user, home, dash, ext, tried (the .qmail names stat()ed, in order)
    and found (the one found, or None)."""

    TRACE = ("address", "local", "user", "home", "dash", "ext", "tried", "found")
    __slots__ = ("address", "dash", "ext", "found", "home", "local", "reason", "status",
                 "tried", "user")

    def __init__(self, status, reason, **trace):
        self.status = status
        self.reason = reason
        for name in self.TRACE:
            setattr(self, name, trace.get(name))

    @property
    def refused(self):
        """True if the recipient should be refused (550 #5.1.1)."""
        return self.status == REJECT

    def __repr__(self):
        return f"Verdict({self.status!r}, {self.reason!r})"


class _Unknown(Exception):
    """Raised inside the resolver to end a check with UNKNOWN."""


def _text(data):
    return os.fsdecode(data) if isinstance(data, bytes) else str(data)


def _oserror(what, exc):
    return f"{what}: {exc.strerror or exc}"


# ------------------------------------------------------------ passwd lookups


def system_getpw(name):
    """getpwnam(3) through the system's NSS: (name, uid, gid, home) or None."""
    try:
        pw = pwd.getpwnam(os.fsdecode(name))
    except (KeyError, ValueError):
        return None
    return os.fsencode(pw.pw_name), pw.pw_uid, pw.pw_gid, os.fsencode(pw.pw_dir)


class PasswdFile:
    """getpwnam(3) over one passwd(5) file (e.g. a copy for a chroot, or a
    test's): the first line with that name, as the files backend returns.
    Lines starting with "#", "+" or "-" (NIS compat entries) and lines with
    fewer than 7 fields or a non-numeric uid/gid are skipped.  The file is
    read at the first lookup and searched, not parsed, so a big one costs
    little; OSError propagates (the resolver: UNKNOWN)."""

    def __init__(self, path):
        self.path = os.fsencode(path)
        self._data = None

    def __call__(self, name):
        if self._data is None:
            with open(self.path, "rb") as f:
                self._data = b"\n" + f.read()
        if not name or name[:1] in (b"#", b"+", b"-") or b"\n" in name or b":" in name:
            return None
        data, needle = self._data, b"\n" + name + b":"
        pos = data.find(needle)
        while pos >= 0:
            end = data.find(b"\n", pos + 1)
            fields = data[pos + 1:end if end >= 0 else len(data)].split(b":")
            if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
                return fields[0], int(fields[2]), int(fields[3]), fields[5]
            pos = data.find(needle, pos + 1)
        return None


# ------------------------------------------------------------ control files


def read_list(path):
    """A qmail list control file (control_readfile): its entries, or None if
    it does not exist.  Trailing spaces, TABs and the LF are stripped (a CR
    is kept), empty lines and lines starting with "#" are skipped.  A NUL
    byte is not understood: _Unknown; other OSError propagates."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if b"\0" in data:
        raise _Unknown(f"{_text(path)} has a NUL byte")
    entries = []
    for line in data.split(b"\n"):
        line = line.rstrip(b" \t")
        if line and line[:1] != b"#":
            entries.append(line)
    return entries


def read_line(path):
    """The first line of a control file (control_readline), trailing spaces,
    TABs and LF stripped; None if it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data.split(b"\n", 1)[0].rstrip(b" \t")


class Controls:
    """What qmail-send reads for rewrite(): me, envnoathost, locals,
    percenthack and virtualdomains (a dict: lowercased key -> value, the
    last line of a key wins)."""

    __slots__ = ("envnoathost", "locals", "me", "percenthack", "vdoms")

    def __init__(self, locals_, envnoathost=b"envnoathost", percenthack=(), vdoms=None, me=None):
        self.me = me
        self.envnoathost = envnoathost
        self.locals = {d.lower() for d in locals_}
        self.percenthack = {d.lower() for d in percenthack}
        self.vdoms = {}
        for line in vdoms or ():
            key, colon, value = line.partition(b":")
            if colon:
                self.vdoms[key.lower()] = value

    @classmethod
    def read(cls, qmail):
        """From qmail/control/.  _Unknown when qmail-send could not start
        (no locals and no me) or a file is not understood; OSError propagates."""
        control = os.path.join(qmail, b"control")
        me = read_line(os.path.join(control, b"me"))
        envnoathost = read_line(os.path.join(control, b"envnoathost"))
        if envnoathost is None:
            envnoathost = me if me is not None else b"envnoathost"
        locals_ = read_list(os.path.join(control, b"locals"))
        if locals_ is None:
            if me is None:
                raise _Unknown("neither control/locals nor control/me exists: "
                               "qmail-send would not start")
            locals_ = [me]
        return cls(locals_, envnoathost,
                   read_list(os.path.join(control, b"percenthack")) or (),
                   read_list(os.path.join(control, b"virtualdomains")) or (), me)


def rewrite(addr, controls):
    """qmail-send's rewrite(): ("local", address) for a local or virtual
    recipient (a virtual one with its prefix and "-" in front), else
    ("remote", address).  Also returns the address before the virtual
    prefix, the one backends look up: (kind, address, plain)."""
    if b"@" not in addr:
        addr = addr + b"@" + controls.envnoathost
    i = addr.rindex(b"@")
    while addr[i + 1:].lower() in controls.percenthack:
        j = addr.rfind(b"%", 0, i)
        if j < 0:
            break
        addr = addr[:j] + b"@" + addr[j + 1:i]
        i = j
    at = addr.rindex(b"@")
    if addr[at + 1:].lower() in controls.locals:
        return "local", addr, addr
    vdoms = controls.vdoms
    if vdoms:
        keys = [addr, addr[at + 1:]]
        keys += [addr[k:] for k in range(at + 2, len(addr)) if addr[k] == 0x2E]  # "."
        keys.append(b"")
        for key in keys:
            value = vdoms.get(key.lower())
            if value is not None:
                if not value:
                    return "remote", addr, addr  # an exception: not virtual
                return "local", value + b"-" + addr, addr
    return "remote", addr, addr


# ------------------------------------------------------------ backends


def _map_keys(address):
    local, _, domain = address.rpartition(b"@")
    domain = domain.lower()
    return domain, local.lower() + b"@" + domain, b"@" + domain


class AddressMap:
    """Valid addresses, as Postfix's relay_recipient_maps: a cdb file (path
    ending in ".cdb"; keys as below, data ignored; a key with a trailing
    NUL, as some postmap builds write, counts too) or a text file (one
    entry per line, its first word the key, the rest ignored; "#" lines
    and blank lines skipped).  Keys are lowercase:

        example.com         the map is authoritative for example.com
        joe@example.com     a valid address
        @example.com        every address of example.com is valid

    lookup(address) -> True (valid), False (the domain is declared and the
    address is not in it) or None (the map says nothing about the domain).
    OSError and CdbError propagate."""

    def __init__(self, path):
        self.path = os.fsencode(path)

    def lookup(self, address):
        keys = _map_keys(address)
        if self.path.endswith(b".cdb"):
            db = Cdb.open(self.path)
            if db is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory")
            try:
                found = [key in db or key + b"\0" in db for key in keys]
            finally:
                os.close(db.fd)
        else:
            with open(self.path, "rb") as f:
                data = f.read()
            words = set()
            for line in data.split(b"\n"):
                word = line.split(None, 1)[0] if line.strip() else b""
                if word and word[:1] != b"#":
                    words.add(word.lower())
            found = [key in words for key in keys]
        declared, address_ok, domain_ok = found
        if not declared:
            return None
        return address_ok or domain_ok


def _vpasswd_has(directory, names):
    """True if one of names is a user in directory's vpasswd.cdb (else its
    vpasswd text file, which vdelivermail would compile first), False if
    none is; _Unknown when neither file exists or can be read."""
    cdb_path = os.path.join(directory, b"vpasswd.cdb")
    try:
        db = Cdb.open(cdb_path)
    except OSError as e:
        raise _Unknown(_oserror(f"vpopmail: cannot read {_text(cdb_path)}", e)) from None
    if db is not None:
        try:
            return any(name in db for name in names)
        except CdbError as e:
            raise _Unknown(f"vpopmail: {_text(cdb_path)}: {e}") from None
        finally:
            os.close(db.fd)
    text_path = os.path.join(directory, b"vpasswd")
    try:
        with open(text_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _Unknown(f"vpopmail: no vpasswd.cdb or vpasswd in {_text(directory)} "
                       "(not the cdb backend?)") from None
    except OSError as e:
        raise _Unknown(_oserror(f"vpopmail: cannot read {_text(text_path)}", e)) from None
    users = {line.split(b":", 1)[0] for line in data.split(b"\n") if b":" in line}
    return any(name in users for name in names)


def _deliveries(content):
    """The delivery lines of a .qmail file, by dot-qmail(5): lists of
    (kind, line) with kind "file" (. or /), "program" (|) or "forward"."""
    out = []
    for line in content.split(b"\n"):
        if not line or line[:1] == b"#":
            continue
        first = line[:1]
        if first in (b".", b"/"):
            out.append(("file", line))
        elif first == b"|":
            out.append(("program", line[1:]))
        else:
            out.append(("forward", line))
    return out


_SHELL_SPECIAL = frozenset(b"\\$`;&|<>()*?[]{}~\n")


def _shell_words(command):
    """The words of a /bin/sh command line made of plain words and '...' or
    "..." quoting (as `vdelivermail '' bounce-no-mailbox`); None if it uses
    anything more (variables, escapes, operators, globs, comments), which
    is not worth guessing at."""
    words, word, quote, quoted = [], bytearray(), None, False
    for c in command:
        if quote is not None:
            if c == quote:
                quote = None
            elif quote == 0x22 and c in b"$`\\":  # special inside "..."
                return None
            else:
                word.append(c)
        elif c in b"'\"":
            quote, quoted = c, True
        elif c in b" \t":
            if word or quoted:
                words.append(bytes(word))
                word, quoted = bytearray(), False
        elif c in _SHELL_SPECIAL or (c == 0x23 and not word and not quoted):  # "#"
            return None
        else:
            word.append(c)
    if quote is not None:
        return None
    if word or quoted:
        words.append(bytes(word))
    return words


def _vdelivermail_args(command):
    """The arguments of a vdelivermail command line, or None if the command
    is not vdelivermail (or is beyond simple shell quoting)."""
    words = _shell_words(command)
    if not words or os.path.basename(words[0]) != b"vdelivermail":
        return None
    return words[1:]


# ------------------------------------------------------------ the resolver


class Resolver:
    """qmail's recipient resolution over one qmail home.

    qmail: the qmail home (auto_qmail); brk: conf-break (its first byte
    splits account and extension in qmail-getpw; b"" = no split); usera:
    the alias user (conf-users); patrn: conf-patrn, the mode bits that make
    a home or .qmail file "writable" (a deferral); getpw: the passwd
    lookup; address_map: an AddressMap or None; vpopmail: consult
    vpasswd.cdb for vdelivermail domains."""

    def __init__(self, qmail=QMAILHOME, brk=AUTO_BREAK, usera=AUTO_USERA, patrn=AUTO_PATRN,
                 getpw=system_getpw, address_map=None, vpopmail=False):
        self.qmail = os.fsencode(qmail)
        self.brk = brk[:1]
        self.usera = usera
        self.patrn = patrn
        self.getpw = getpw
        self.address_map = address_map
        self.vpopmail = vpopmail

    @classmethod
    def from_environ(cls, environ=None, warn=None):
        """A Resolver set up from the environment (bytes names and values,
        like os.environb): QMAILHOME, RCPTCHECK_AUTO_BREAK,
        RCPTCHECK_AUTO_USERA, RCPTCHECK_AUTO_PATRN, RCPTCHECK_PASSWD,
        RCPTCHECK_MAP, RCPTCHECK_VPOPMAIL.  A bad value is reported
        through warn(text) and the default used."""
        env = os.environb if environ is None else environ
        patrn = AUTO_PATRN
        text = env.get(b"RCPTCHECK_AUTO_PATRN")
        if text:
            try:
                patrn = int(text, 8)
            except ValueError:
                if warn:
                    warn(f"RCPTCHECK_AUTO_PATRN={_text(text)!r} is not an octal mode; "
                         f"using {AUTO_PATRN:03o}")
        passwd = env.get(b"RCPTCHECK_PASSWD")
        map_path = env.get(b"RCPTCHECK_MAP")
        return cls(qmail=env.get(b"QMAILHOME") or QMAILHOME,
                   brk=env.get(b"RCPTCHECK_AUTO_BREAK", AUTO_BREAK),
                   usera=env.get(b"RCPTCHECK_AUTO_USERA") or AUTO_USERA,
                   patrn=patrn,
                   getpw=PasswdFile(passwd) if passwd else system_getpw,
                   address_map=AddressMap(map_path) if map_path else None,
                   vpopmail=env.get(b"RCPTCHECK_VPOPMAIL", b"0") not in (b"", b"0"))

    def check(self, rcpt):
        """The Verdict for one recipient address (bytes, as SMTPRCPTTO)."""
        rcpt = rcpt.split(b"\0", 1)[0]  # qmail-smtpd loses everything after a NUL
        trace = {}
        try:
            return self._check(rcpt, trace)
        except _Unknown as e:
            return Verdict(UNKNOWN, str(e), **trace)
        except CdbError as e:
            return Verdict(UNKNOWN, f"users/cdb: {e}", **trace)
        except OSError as e:
            what = "lookup failed" if e.filename is None else f"cannot read {_text(e.filename)}"
            return Verdict(UNKNOWN, _oserror(what, e), **trace)

    # -------------------------------------------------------- the steps

    def _check(self, rcpt, trace):
        controls = Controls.read(self.qmail)
        kind, address, plain = rewrite(rcpt, controls)
        trace["address"] = address
        if kind == "remote":
            return Verdict(REMOTE, "not a local or virtual domain", **trace)
        local = address[:address.rindex(b"@")]
        trace["local"] = local
        if not local:
            return Verdict(TRASH, "empty local part: qmail throws the message away", **trace)
        found = self._assignment(local)
        if found is None:
            found = self._getpw(local)
        user, uid, home, dash, ext = found
        trace.update(user=user, home=home, dash=dash, ext=ext)
        if uid % 2**32 == 0:
            raise _Unknown(f"{_text(local)}: user {_text(user)} has uid 0: "
                           "qmail defers (no deliveries as root)")
        return self._dotqmail(home, dash, ext, plain, trace)

    def _assignment(self, local):
        """qmail-lspawn's users/cdb lookup: (user, uid, home, dash, ext) or
        None (no users/cdb, or no entry: qmail-getpw decides)."""
        path = os.path.join(self.qmail, b"users", b"cdb")
        try:
            db = Cdb.open(path)
        except OSError as e:
            raise _Unknown(_oserror("cannot read users/cdb (qmail defers)", e)) from None
        if db is None:
            return None
        try:
            wild = db.get(b"")
            if wild is None:
                raise _Unknown("users/cdb has no \"\" record (qmail defers)")
            low = b"!" + local.lower() + b"\0"
            i, flagwild = len(low), False
            while i > 0:
                if not flagwild or i == 1 or low[i - 1] in wild:
                    data = db.get(low[:i])
                    if data is not None:
                        if flagwild:
                            data += local[i - 1:]
                        return self._fields(data, local)
                i -= 1
                flagwild = True
        finally:
            os.close(db.fd)
        return None

    @staticmethod
    def _fields(data, local):
        fields = data.split(b"\0", 5)
        if len(fields) < 6:
            raise _Unknown(f"users/cdb entry for {_text(local)} has fewer than 6 fields "
                           "(qmail defers)")
        user, uid, _gid, home, dash, ext = fields
        digits = len(uid) - len(uid.lstrip(b"0123456789"))
        return user, int(uid[:digits] or b"0"), home, dash, ext.split(b"\0", 1)[0]

    def _getpw(self, local):
        """qmail-getpw: (user, uid, home, dash, ext) of the longest account
        name, else of the alias user."""
        for end in range(len(local), -1, -1):
            if end >= GETPW_USERLEN or (end < len(local) and local[end:end + 1] != self.brk):
                continue
            pw = self.getpw(local[:end].lower())
            if pw is None or pw[1] == 0:
                continue
            name, uid, _gid, home = pw
            try:
                st = os.stat(home)
            except OSError as e:
                if e.errno in _DEFER_ERRNOS:
                    raise _Unknown(_oserror(
                        f"account {_text(name)}: cannot stat home {_text(home)}", e)) from None
                continue  # missing home: not a user, as for qmail-getpw
            if st.st_uid != uid:
                continue
            if end == len(local):
                return name, uid, home, b"", b""
            return name, uid, home, b"-", local[end + 1:]
        pw = self.getpw(self.usera)
        if pw is None:
            raise _Unknown(f"{_text(local)}: no such account and no {_text(self.usera)} "
                           "user (qmail defers: Unable to find alias user!)")
        name, uid, _gid, home = pw
        return name, uid, home, b"-", local

    def _dotqmail(self, home, dash, ext, plain, trace):
        """qmail-local's checks and .qmail search, then the backends."""
        if not home.startswith(b"/"):
            raise _Unknown(f"home {_text(home)} is not absolute: qmail bounces with "
                           "another text (qmail-local usage), not 5.1.1")
        try:
            st = os.stat(home)
        except OSError as e:
            raise _Unknown(_oserror(f"cannot stat home {_text(home)}", e)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise _Unknown(f"home {_text(home)} is not a directory (qmail defers)")
        if st.st_mode & (self.patrn | stat.S_ISVTX):
            raise _Unknown(f"home {_text(home)} is writable or sticky (qmail defers)")
        if not dash:
            return Verdict(ACCEPT, "no extension: .qmail or the default delivery", **trace)
        safe = ext.lower().replace(b".", b":")
        base = b".qmail" + dash
        names = [base + safe]
        names += [base + safe[:i] + b"default" for i in range(len(safe), -1, -1)
                  if i == 0 or safe[i - 1] == 0x2D]  # "-"
        tried = trace["tried"] = []
        for index, name in enumerate(names):
            tried.append(name)
            path = os.path.join(home, name)
            try:
                st = os.stat(path)
            except OSError as e:
                if e.errno in _DEFER_ERRNOS:
                    raise _Unknown(_oserror(f"cannot stat {_text(path)}", e)) from None
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            trace["found"] = name
            if st.st_mode & self.patrn:
                raise _Unknown(f"{_text(path)} is writable (qmail defers)")
            if index == 0 or not (self.address_map or self.vpopmail):
                return Verdict(ACCEPT, f"{_text(name)} exists", **trace)
            return self._backends(path, ext, plain, trace)
        return Verdict(REJECT, f"no {' or '.join(_text(n) for n in names)} in {_text(home)}",
                       **trace)

    def _backends(self, path, ext, plain, trace):
        """A "-default" file was found: does it deliver outside qmail, and
        does a backend know the address?"""
        name = trace["found"]
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError as e:
            raise _Unknown(_oserror(f"cannot read {_text(path)} to ask the backends", e)) \
                from None
        deliveries = _deliveries(content)
        kinds = {kind for kind, _ in deliveries}
        if "file" in kinds or not kinds:
            return Verdict(ACCEPT, f"{_text(name)} delivers to a mailbox", **trace)
        if self.address_map is not None:
            try:
                valid = self.address_map.lookup(plain)
            except (OSError, CdbError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise _Unknown(f"cannot read RCPTCHECK_MAP {_text(self.address_map.path)}: "
                               f"{why}") from None
            if valid is not None:
                if valid:
                    return Verdict(ACCEPT, "listed in RCPTCHECK_MAP", **trace)
                return Verdict(REJECT, f"{_text(name)} hands it on and RCPTCHECK_MAP does "
                               "not list it", **trace)
        if self.vpopmail and len(deliveries) == 1 and deliveries[0][0] == "program":
            args = _vdelivermail_args(deliveries[0][1])
            if args is not None:
                if len(args) != 2:
                    raise _Unknown(f"{_text(path)}: vdelivermail with {len(args)} arguments "
                                   "(it defers: invalid syntax)")
                if args[1] != VDELIVERMAIL_BOUNCE:
                    return Verdict(ACCEPT, "vdelivermail does not bounce unknown users "
                                   "here", **trace)
                user = ext.lower()
                names = [user, user.split(b"-", 1)[0]] if b"-" in user else [user]
                if _vpasswd_has(trace["home"], names):
                    return Verdict(ACCEPT, "a vpopmail user", **trace)
                return Verdict(REJECT, f"no vpopmail user {_text(user)} in "
                               f"{_text(trace['home'])}", **trace)
        raise _Unknown(f"{_text(path)} hands the mail to a program or forward, "
                       "which decides")

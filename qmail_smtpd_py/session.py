"""The SMTP session: qmail-smtpd's command loop as a sans-I/O core.

Theory of operation.  `Session.run()` is a generator that plays one SMTP
connection.  Client bytes come in through `READ` requests into a receive
buffer the session owns; replies are appended to `self.out`; everything
else it needs (the clock, the host's IP addresses, qmail-queue, logging,
exiting) it asks for by yielding a request from effects.py.  The session
never touches file descriptors, the environment or the clock itself, so
tests drive it with byte transcripts and fake answers, and the driver in
server.py stays a thin loop.

Each SMTP verb has one handler method below, named after it; their order
and their replies follow qmail-smtpd.c (spec §3), so the reader can put
this file and the C side by side.
"""

from . import address, auth, replies
from .control import LOG_COMMANDS, LOG_EVENTS, ControlError
from .data import BareLF, Blast
from .effects import (
    LOCAL_IPS, NOW, QUEUE_EXEC_FAILED, READ, TLS_CLIENT_CERT, TLS_HANDSHAKE, TLS_START,
    CheckPassword, Exit, Log, QueueFinish, QueueStart, QueueWrite, Sleep,
)
from .extfork import QUITASAP_PAUSE, ExtFork
from .logline import command_words, refusal_words
from .logline import word as _show
from .queue import EXEC_FAILED_STATUS, reply_for, status_text
from .received import received
from .spp import NORMAL, REJECT, Disconnect, Plugins

MAX_HOPS = 100


class _End(Exception):
    """Leave the command loop and exit with `code`; `why` goes into the log."""

    def __init__(self, code, why):
        super().__init__(code)
        self.code = code
        self.why = why


def split_command(line):
    """(lower-cased verb, argument): split at the first space; further
    leading spaces of the argument are skipped, trailing ones kept."""
    verb, _, arg = line.partition(b" ")
    return verb.lower(), arg.lstrip(b" ")


class Session:
    """One SMTP connection.  `config` is a control.Config, `env` the
    connection's environment as a dict of bytes (it is what qmail-queue
    and other children get)."""

    def __init__(self, config, env, pid=0):
        self.config = config
        self.env = env
        self.pid = pid             # for the CRAM-MD5 challenge
        self.out = bytearray()
        self._buf = bytearray()
        self._scanned = 0  # _buf[:_scanned] is known to hold no LF

        self.remoteip = env.get(b"TCPREMOTEIP", b"unknown")
        self.remotehost = env.get(b"TCPREMOTEHOST", b"unknown")
        self.remoteinfo = env.get(b"TCPREMOTEINFO")
        self.local = env.get(b"TCPLOCALHOST")
        if self.local is None:
            self.local = env.get(b"TCPLOCALIP", b"unknown")
        self.relayclient = env.get(b"RELAYCLIENT")
        self.protocol = b"SMTP"

        self.helo = self.remotehost
        self.fakehelo = None       # the HELO argument when it differs from remotehost
        self.seenmail = False
        self.mailfrom = b""
        self.rcpts = []            # envelope recipients, RELAYCLIENT suffix included
        self.badmailfrom = False   # the current sender is in badmailfrom
        self.authenticated = False
        self.in_tls = False
        self.tls_cert_checked = False  # the client certificate is judged once
        self.tls_cert_reason = None    # why it did not allow relaying
        self.spp = Plugins(config.plugins)
        self.extfork = ExtFork()
        self.log_level = config.log_level
        self.verb = b"connect"     # the command being handled, for the log
        self.utf8 = False          # this transaction asked for SMTPUTF8
        self.messages = 0          # accepted in this connection

    # ------------------------------------------------------------ the loop

    def run(self):
        """The session generator; see effects.py for what it yields."""
        logging = self.log_level >= LOG_EVENTS
        if logging:
            yield Log("connect host=%s port=%s%s" % (
                _show(self.remotehost), _show(self.env.get(b"TCPREMOTEPORT", b"-")),
                "" if self.relayclient is None else " relayclient"))
        try:
            if self.config.smtps:
                yield from self._start_tls(implicit=True)
            result, _ = yield from self._plugins(b"c")
            if result != REJECT:
                self.out += replies.greeting(self.config.greeting)
            commands = self.log_level >= LOG_COMMANDS
            while True:
                line = yield from self._read_line()
                verb, arg = split_command(line)
                self.verb = verb
                if commands:
                    yield Log("command " + command_words(verb, line))
                handler = self._VERBS.get(verb)
                if handler is None:
                    yield from self._refuse(replies.UNIMPLEMENTED, "unimplemented")
                    continue
                steps = handler(self, arg)
                if steps is not None:  # the handler needs the outside world
                    yield from steps
        except _End as end:
            code, why = end.code, end.why
        except Disconnect:
            code, why = 0, "plugin plugin=" + _show(self.spp.entry)
        except ControlError as e:
            yield Log("fatal: unable to read controls: %s" % e)
            self.out += replies.CONTROLS
            code, why = 1, "controls"
        if logging:
            yield Log("close status=%d why=%s messages=%d" % (code, why, self.messages))
        yield Exit(code)

    def _refuse(self, reply, by, **fields):
        """Send a refusal of the current command and log who refused it."""
        self.out += reply
        if self.log_level >= LOG_EVENTS:
            yield Log(refusal_words(self.verb, reply, by, fields))

    def _plugins(self, section, addr_var=None, addr=None):
        """Run a qmail-spp hook; a refusal is logged with the plugin's name."""
        mark = len(self.out)
        try:
            result, addr = yield from self.spp.hook(section, self.env, self.out, addr_var, addr)
        except Disconnect:  # R or D: log the refusal (if any) before closing
            if self.log_level >= LOG_EVENTS and len(self.out) > mark:
                yield Log(self._plugin_refusal(mark))
            raise
        if result == REJECT and self.log_level >= LOG_EVENTS:
            yield Log(self._plugin_refusal(mark))
        return result, addr

    def _plugin_refusal(self, mark):
        return refusal_words(self.verb, self.out[mark:], "plugin", {"plugin": self.spp.entry})

    def _deferred_refusal(self, which):
        """Send an LM/LR/LD error of a plugin if one is pending; True if sent."""
        mark = len(self.out)
        entry = self.spp.pending_error(which, self.out)
        if entry is None:
            return False
        if self.log_level >= LOG_EVENTS:
            yield Log(refusal_words(self.verb, self.out[mark:], "plugin-deferred",
                                    {"plugin": entry}))
        return True

    def _fill(self):
        data = yield READ
        if data is None:
            self.out += replies.TIMEOUT
            raise _End(1, "timeout")
        if not data:
            raise _End(1, "eof")
        self._buf += data

    def _read_line(self, cut_at_nul=True):
        """The next command line without LF, one CR before it, or anything
        from the first NUL on.  Over-long lines are skipped with a 500."""
        buf = self._buf
        too_long = False
        while True:
            lf = buf.find(b"\n", self._scanned)
            if lf < 0 and len(buf) > self.config.max_line:
                del buf[:]  # skip the rest of the line without keeping it
                too_long = True
            elif lf >= 0 and (too_long or lf > self.config.max_line):
                del buf[:lf + 1]
                self._scanned = 0
                too_long = False
                self.verb = b"-"
                yield from self._refuse(replies.LINE_TOO_LONG, "max-line")
                continue
            elif lf >= 0:
                break
            self._scanned = len(buf)
            yield from self._fill()
        line = bytes(buf[:lf])
        del buf[:lf + 1]
        self._scanned = 0
        if line.endswith(b"\r"):
            line = line[:-1]
        nul = line.find(b"\0") if cut_at_nul else -1
        return line if nul < 0 else line[:nul]

    # ------------------------------------------------------------ verbs

    def smtp_helo(self, arg):
        if (yield from self._helo_plugins(arg)):
            self.out += replies.helo(self.config.greeting)
            self.seenmail = False
            self._set_helo(arg)

    def smtp_ehlo(self, arg):
        if (yield from self._helo_plugins(arg)):
            self.out += replies.ehlo(self.config.greeting, self.ehlo_extensions())
            self.seenmail = False
            self._set_helo(arg)

    def _helo_plugins(self, arg):
        self.env[b"SMTPHELOHOST"] = arg
        result, _ = yield from self._plugins(b"h")
        return result != REJECT

    def ehlo_extensions(self):
        extensions = [b"PIPELINING", b"8BITMIME"]
        if self.config.tls and not self.in_tls:
            extensions.insert(0, b"STARTTLS")
        if self.config.smtputf8:
            extensions.append(b"SMTPUTF8")
        mode = self.config.auth_mode
        if mode is not None:  # the AUTH patch's EHLO
            if mode in auth.EHLO_LINES and not self._auth_needs_tls():
                extensions.append(auth.EHLO_LINES[mode])
            extensions.append(b"SIZE %d" % self.config.databytes)
        return extensions

    def _set_helo(self, arg):
        self.helo = arg
        self.fakehelo = None if arg.lower() == self.remotehost.lower() else arg

    def smtp_rset(self, arg):
        self.seenmail = False
        self.authenticated = False  # as the AUTH patch; relaying stays granted
        self.spp.reset()
        self.out += replies.FLUSHED

    def smtp_noop(self, arg):
        self.out += replies.OK

    def smtp_vrfy(self, arg):
        self.out += replies.VRFY

    def smtp_help(self, arg):
        self.out += replies.HELP

    def smtp_quit(self, arg):
        self.out += replies.quit(self.config.greeting)
        raise _End(0, "quit")

    def smtp_mail(self, arg):
        mode = self.config.auth_mode
        if mode is not None and mode > 10 and not self.authenticated:
            yield from self._refuse(auth.REQUIRED, "auth-required")
            return
        if self.config.require_tls and not self.in_tls:
            yield from self._refuse(replies.TLS_MAIL_FIRST, "tls-required")
            return
        addr = yield from self._parse_address(arg)
        if addr is None:
            yield from self._refuse(replies.SYNTAX, "syntax")
            return
        if (yield from self._deferred_refusal(b"M")):
            return
        self.spp.rcptcount = self.spp.rcptcountall = 0
        result, addr = yield from self._plugins(b"m", b"SMTPMAILFROM", addr)
        if result == REJECT:
            return
        if mode is not None:  # the AUTH patch parses SIZE= and AUTH=
            too_big, auth_user = auth.mail_parameters(arg, self.config.databytes)
            if auth_user is not None and self.remoteinfo is None:
                self.remoteinfo = auth_user
                self.env[b"TCPREMOTEINFO"] = auth_user
            if too_big:
                yield from self._refuse(replies.TOO_BIG, "databytes", **{"from": addr})
                return
        # After O the check is skipped; qmail-spp kept the previous sender's
        # flag then, which DECISIONS.md fixes.
        bmf = self.config.badmailfrom
        self.badmailfrom = (result == NORMAL and bmf is not None
                            and address.in_badmailfrom(addr, bmf))
        self.seenmail = True
        self.mailfrom = addr
        self.rcpts = []
        self.utf8 = self.config.smtputf8 and _asks_for_utf8(arg)
        self.out += replies.OK

    def smtp_rcpt(self, arg):
        if not self.seenmail:
            yield from self._refuse(replies.WANT_MAIL, "sequence")
            return
        addr = yield from self._parse_address(arg)
        if addr is None:
            yield from self._refuse(replies.SYNTAX, "syntax")
            return
        if self.badmailfrom:
            yield from self._refuse(replies.BADMAILFROM, "badmailfrom",
                                    **{"from": self.mailfrom, "to": addr})
            return
        allowed = self.relayclient is not None or address.rcpthosts_allows(
            addr, self.config.rcpthosts, self.config.morercpthosts)
        spp = self.spp
        if (yield from self._deferred_refusal(b"R")):
            return
        spp.rcptcountall += 1
        self.env[b"SMTPRCPTCOUNT"] = b"%d" % spp.rcptcount
        self.env[b"SMTPRCPTCOUNTALL"] = b"%d" % spp.rcptcountall
        self.env[b"SMTPRCPTHOSTSOK"] = b"1" if allowed else b"0"
        result, addr = yield from self._plugins(b"r", b"SMTPRCPTTO", addr)
        if result == REJECT:
            return
        if self.relayclient is not None:
            addr += self.relayclient
        elif result == NORMAL and not allowed:
            if not self.in_tls:
                yield from self._refuse(replies.NOGATEWAY, "rcpthosts", to=addr)
                return
            if not (yield from self._relay_by_client_cert()):
                yield from self._refuse(replies.tls_nogateway(self.tls_cert_reason),
                                        "rcpthosts", to=addr)
                return
        refusal = yield from self.extfork.check(
            self.env, self.relayclient is not None, self.mailfrom, self.helo, addr)
        if refusal is not None:
            yield from self._refuse(refusal, "extfork", program=self.extfork.refused_by,
                                    to=addr)
            if b"XF_QUITASAP" in self.env:
                yield Sleep(QUITASAP_PAUSE)
                raise _End(1, "extfork")
            return
        spp.rcptcount += 1
        self.rcpts.append(addr)
        self.out += replies.OK

    def _parse_address(self, arg):
        """addrparse plus the localiphost rewrite; None for a syntax error."""
        addr = address.parse(arg)
        if self.config.localiphost is not None:
            bracketed = address.bracketed_ip(addr)
            if bracketed is not None:
                mine = yield LOCAL_IPS
                if mine is None:
                    self.out += replies.IPME
                    raise _End(1, "ipme")
                if bracketed[1] in mine:
                    addr = bracketed[0] + self.config.localiphost
        return None if len(addr) >= address.MAX_ADDRESS else addr

    def smtp_data(self, arg):
        if not self.seenmail:
            yield from self._refuse(replies.WANT_MAIL, "sequence")
            return
        if not self.rcpts:
            yield from self._refuse(replies.WANT_RCPT, "sequence")
            return
        if (yield from self._deferred_refusal(b"D")):
            return
        result, _ = yield from self._plugins(b"d")
        if result == REJECT:
            return
        self.seenmail = False
        qp = yield QueueStart(self.env)
        if qp is None:
            yield from self._refuse(replies.QQT_FAILURE, "queue")
            return
        self.out += replies.GO_AHEAD
        when = yield NOW
        blast = Blast(self.config.databytes)
        writing = qp != QUEUE_EXEC_FAILED
        protocol = _utf8_protocol(self.protocol) if self.utf8 else self.protocol
        pending = received(protocol, self.local, self.remoteip, self.remotehost,
                           self.remoteinfo, self.fakehelo, when) + self.spp.headers
        self.spp.reset()
        while True:
            try:
                chunk, consumed, done = blast.feed(self._buf)
            except BareLF:
                yield from self._refuse(replies.BARE_LF, "bare-lf")
                raise _End(1, "bare-lf") from None
            del self._buf[:consumed]
            if writing and (pending or chunk):
                writing = yield QueueWrite(pending + chunk if pending else chunk)
                pending = b""
            if done:
                break
            yield from self._fill()
        self._scanned = 0

        looping = blast.hops >= MAX_HOPS
        failed = not writing or blast.exceeded or looping
        envelope = None if failed else self.envelope()
        status, errtext = yield QueueFinish(envelope)
        if qp == QUEUE_EXEC_FAILED:
            status = EXEC_FAILED_STATUS
        text = status_text(status, failed, errtext)
        if not text:
            when = yield NOW
            self.out += replies.accepted(int(when), qp)
            self.messages += 1
            if self.log_level >= LOG_EVENTS:
                yield Log("accept qp=%d bytes=%d from=<%s> rcpts=%d" % (
                    qp, blast.size, _show(self.mailfrom), len(self.rcpts)))
            return
        if looping:
            reply, by = replies.LOOPING, "hops"
        elif self.config.databytes and blast.exceeded:
            reply, by = replies.TOO_BIG, "databytes"
        else:
            reply, by = reply_for(text), "queue"
        yield from self._refuse(reply, by, bytes=blast.size, **{"from": self.mailfrom})

    # ------------------------------------------------------------ AUTH

    def smtp_auth(self, arg):
        config = self.config
        if config.auth_mode is None:  # plain notqmail has no AUTH
            yield from self._refuse(replies.UNIMPLEMENTED, "unimplemented")
            return
        if not config.auth_mode or not config.checkpassword:
            yield from self._refuse(auth.NOT_AVAILABLE, "auth-off")
            return
        if self.authenticated:
            yield from self._refuse(auth.ALREADY, "sequence")
            return
        if self.seenmail:
            yield from self._refuse(auth.DURING_MAIL, "sequence")
            return
        if self._auth_needs_tls():
            yield from self._refuse(replies.TLS_AUTH_FIRST, "tls-required")
            return
        mechanism, _, arg = arg.partition(b" ")
        mechanism = mechanism.lower()
        dialogue = self._AUTH_MECHANISMS.get(mechanism)
        if dialogue is None:
            yield from self._refuse(auth.UNIMPLEMENTED, "unimplemented")
            return
        credentials = yield from dialogue(self, arg.lstrip(b" "))
        if credentials is None:
            return  # canceled or malformed: already answered
        user, secret, challenge = credentials
        if not user or not secret:
            yield from self._refuse(auth.MALFORMED, "syntax")
            return
        data = user + b"\0" + secret + b"\0"
        if auth.sends_challenge(config.auth_mode):
            data += challenge + b"\0"
        status = yield CheckPassword(config.checkpassword, data, self.env)
        if status in auth.CHILD_FAILURES:
            yield from self._refuse(auth.CHILD_FAILURES[status], "checkpassword")
            return
        user = user.split(b"\0", 1)[0]
        if status != 0:
            yield Sleep(auth.FAIL_DELAY)
            yield from self._refuse(auth.FAILED, "checkpassword", method=mechanism, user=user)
            return
        self.env[b"SMTPAUTHUSER"] = user
        self.env[b"SMTPAUTHMETHOD"] = mechanism
        result, _ = yield from self._plugins(b"a")
        if result == REJECT:
            return
        if self.log_level >= LOG_EVENTS:
            yield Log("auth method=%s user=%s" % (_show(mechanism), _show(user)))
        self.authenticated = True
        self.protocol = b"ESMTPA"
        self.relayclient = b""
        self.remoteinfo = user
        self.env[b"TCPREMOTEINFO"] = user
        self.env[b"RELAYCLIENT"] = b""
        self.out += auth.OK

    def _auth_needs_tls(self):
        return self.config.force_tls and not self.in_tls

    def _auth_response(self):
        """One line of the AUTH dialogue, decoded; None after '*' or an empty line."""
        line = yield from self._read_line(cut_at_nul=False)
        if line == b"*":
            yield from self._refuse(auth.CANCELED, "canceled")
            return None
        if not line:
            yield from self._refuse(auth.MALFORMED, "syntax")
            return None
        return auth.b64decode(line)

    def _auth_login(self, arg):
        if arg:
            user = auth.b64decode(arg)
        else:
            self.out += auth.LOGIN_USER_PROMPT
            user = yield from self._auth_response()
            if user is None:
                return None
        self.out += auth.LOGIN_PASSWORD_PROMPT
        password = yield from self._auth_response()
        if password is None:
            return None
        return user, password, b""

    def _auth_plain(self, arg):
        if arg:
            decoded = auth.b64decode(arg)
        else:
            self.out += auth.PLAIN_PROMPT
            decoded = yield from self._auth_response()
            if decoded is None:
                return None
        user, password = auth.plain_credentials(decoded)
        return user, password, b""

    def _auth_cram(self, arg):
        when = yield NOW
        host = self.config.auth_hostname or self.local
        challenge = b"<%d.%d@%s>" % (self.pid, int(when), host)
        self.out += b"334 " + auth.b64encode(challenge) + b"\r\n"
        decoded = yield from self._auth_response()
        if decoded is None:
            return None
        user, digest = auth.cram_credentials(decoded)
        return user, digest, challenge

    _AUTH_MECHANISMS = {b"login": _auth_login, b"plain": _auth_plain, b"cram-md5": _auth_cram}

    # ------------------------------------------------------------ STARTTLS

    def smtp_starttls(self, arg):
        if not self.config.tls:  # no certificate: plain notqmail
            yield from self._refuse(replies.UNIMPLEMENTED, "unimplemented")
            return
        if arg:
            yield from self._refuse(replies.TLS_NO_PARAMETERS, "syntax")
        elif self.in_tls:
            yield from self._refuse(replies.UNIMPLEMENTED, "sequence")
        else:
            yield from self._start_tls(implicit=False)
        # Whatever was pipelined behind STARTTLS was sent in clear text: a
        # man in the middle may have put it there.  Drop it.
        del self._buf[:]
        self._scanned = 0

    def _start_tls(self, implicit):
        failure = yield TLS_START
        if failure is not None:
            self.out += replies.tls_failure(failure)
            if implicit:
                raise _End(1, "tls")
            return
        if not implicit:
            self.out += replies.TLS_READY
        ok, detail = yield TLS_HANDSHAKE
        if not ok:
            self.out += replies.tls_failure(b"connection failed: " + detail)
            raise _End(1, "tls")
        self.in_tls = True
        if self.log_level >= LOG_EVENTS:
            yield Log("tls cipher=%s" % _show(detail))
        self.protocol = b"ESMTPS (" + detail + b" encrypted)"
        self._set_helo(self.remotehost)  # the client must say EHLO again

    def _relay_by_client_cert(self):
        """In TLS, a verified client certificate whose e-mail address is in
        control/tlsclients allows relaying (judged at the first refusal)."""
        if not self.tls_cert_checked:
            self.tls_cert_checked = True
            email, self.tls_cert_reason = yield TLS_CLIENT_CERT
            if email is not None:
                self.relayclient = b""
                self.env[b"RELAYCLIENT"] = b""
                self.protocol += b"\n  (cert " + email + b")"
        return self.relayclient is not None

    def envelope(self):
        parts = [b"F", self.mailfrom, b"\0"]
        for rcpt in self.rcpts:
            parts += [b"T", rcpt, b"\0"]
        parts.append(b"\0")
        return b"".join(parts)

    _VERBS = {
        b"helo": smtp_helo, b"ehlo": smtp_ehlo, b"rset": smtp_rset, b"noop": smtp_noop,
        b"vrfy": smtp_vrfy, b"help": smtp_help, b"quit": smtp_quit, b"mail": smtp_mail,
        b"rcpt": smtp_rcpt, b"data": smtp_data, b"auth": smtp_auth, b"starttls": smtp_starttls,
    }


def _asks_for_utf8(arg):
    """Whether the MAIL parameters after the address include SMTPUTF8 (RFC 6531)."""
    params = arg[arg.find(b">") + 1:] if b">" in arg else b""
    return any(word.upper() == b"SMTPUTF8" for word in params.split())


def _utf8_protocol(protocol):
    """RFC 6531's WITH value: SMTP -> UTF8SMTP, ESMTPA -> UTF8SMTPA, ..."""
    return b"UTF8" + (protocol[1:] if protocol.startswith(b"E") else protocol)

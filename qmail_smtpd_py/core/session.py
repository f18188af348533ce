"""The SMTP session: qmail-smtpd's command loop as a sans-I/O core.

Theory of operation.  `Session.run()` is a generator that plays one SMTP
connection.  Client bytes come in through Read requests into a receive
buffer the session owns; replies collect in an output buffer the session
owns too, and go out as Send requests at qmail's flush points: after every
command but MAIL, RCPT and RSET, and before every read that has to wait for
the client (spec qmail-smtpd.md §3.1), so a pipelining client gets the
replies at the same moments as from qmail-smtpd.  Everything else (the clock,
the host's IP addresses, qmail-queue, plugins, programs, checkpassword, TLS,
the log) is a request from requests.py, answered with a typed outcome; the
session never touches a file descriptor, the environment or the clock
itself, so tests drive it with byte transcripts and plain answers, and the
driver stays mechanical.

Each SMTP verb has one handler method below, named after it; their order
and their replies follow qmail-smtpd.c (spec §3), so the reader can put
this file and the C side by side.
"""

from __future__ import annotations

from . import address, auth, queue, replies
from .config import LOG_COMMANDS, LOG_EVENTS, LOG_REPLIES, Config
from .data import BareLF, Blast
from .extfork import QUITASAP_PAUSE, ExtFork
from .logline import command_words, refusal_words, reply_code, word, words
from .received import received
from .requests import (
    CLIENT_CERTIFICATE,
    EXEC,
    HANDSHAKE,
    LOCAL_IPS,
    NOW,
    PIPE,
    READ,
    Accepted,
    CannotStart,
    CheckPassword,
    Closed,
    EndOfInput,
    Exit,
    Exited,
    Failed,
    FinishQueue,
    HandshakeFailed,
    Log,
    MoreRcptHosts,
    Refused,
    Send,
    SendFailed,
    Sleep,
    Started,
    StartQueue,
    StartTLS,
    TimedOut,
    TLSSetupFailed,
    WaitFailed,
    WriteFailed,
    WriteQueue,
)
from .spp import NORMAL, REJECT, Disconnect, Plugins
from .tlspolicy import judge_certificate

TYPE_CHECKING = False  # typing.TYPE_CHECKING would cost an import per connection
if TYPE_CHECKING:
    from .requests import Steps

MAX_HOPS = 100
# Logged at every level, once per connection (qmail-smtpd-py check reports it too).
NO_CHECKPASSWORD = ("warning: SMTPAUTH is set but no checkpassword program was given on the "
                    "command line, so AUTH is offered and every attempt refused (503 "
                    "by=auth-off); add checkpassword and its arguments to the command line")
# qmail-smtpd's verb table: these do not flush their replies (pipelining).
_BUFFERED_VERBS = frozenset((b"mail", b"rcpt", b"rset"))


class _End(Exception):
    """Leave the command loop and exit with `code`; `why` goes into the log."""

    def __init__(self, code, why):
        super().__init__(code)
        self.code = code
        self.why = why


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """(lower-cased verb, argument): split at the first space; further
    leading spaces of the argument are skipped, trailing ones kept."""
    verb, _, arg = line.partition(b" ")
    return verb.lower(), arg.lstrip(b" ")


class Session:
    """One SMTP connection.  `config` is a config.Config, `env` the
    connection's environment as a dict of bytes (it is what qmail-queue
    and other children get, and the session changes it as qmail-smtpd
    changes its own)."""

    def __init__(self, config: Config, env: dict[bytes, bytes],
                 connection_id: bytes = b"0") -> None:
        self.config = config
        self.env = env
        self.connection_id = connection_id  # qmail's pid: the CRAM-MD5 challenge's first part
        self._out = bytearray()    # replies not sent yet
        self._buf = bytearray()    # client bytes not consumed yet
        self._scanned = 0          # _buf[:_scanned] is known to hold no LF

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
        self.tls_client_certs = False  # the handshake asked for a client certificate
        self.tls_cert_checked = False  # the client certificate is judged once
        self.tls_cert_reason = None    # why it did not allow relaying
        self.spp = Plugins(config.plugins, config.plugin_time_limit)
        self.extfork = ExtFork(config.program_time_limit)
        self.log_level = config.log_level
        self.verb = b"connect"     # the command being handled, for the log
        self.utf8 = False          # this transaction asked for SMTPUTF8
        self.messages = 0          # accepted in this connection

    # ------------------------------------------------------------ the loop

    def run(self) -> Steps:
        """The session's requests, as a generator (see requests.py)."""
        steps = self._play()
        if self.log_level >= LOG_REPLIES:
            steps = self._with_reply_lines(steps)
        return steps

    def _play(self):
        logging = self.log_level >= LOG_EVENTS
        if logging:
            yield Log("connect host=%s port=%s%s" % (
                word(self.remotehost), word(self.env.get(b"TCPREMOTEPORT", b"-")),
                "" if self.relayclient is None else " relayclient"))
        if self.config.auth_mode and not self.config.checkpassword:
            # Said at the start, not at the first AUTH: the set-up is wrong for every
            # connection, and the first one (a probe, a test without AUTH) shows it.
            yield Log(NO_CHECKPASSWORD)
        try:
            if self.config.smtps:
                yield from self._start_tls(implicit=True)
            result, _ = yield from self._plugins(b"c")
            if result != REJECT:
                self._out += replies.greeting(self.config.greeting)
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
                else:
                    steps = handler(self, arg)
                    if steps is not None:  # the handler needs the outside world
                        yield from steps
                if verb not in _BUFFERED_VERBS:
                    yield from self._flush()
        except _End as end:
            code, why, detail = end.code, end.why, ""
        except Disconnect:
            code, why, detail = 0, "plugin", " plugin=" + word(self.spp.entry)
        text = None
        if logging:
            text = "close status=%d why=%s%s messages=%d" % (code, why, detail, self.messages)
        yield Log(text, Closed(code, why))
        if self._out:
            yield Send(bytes(self._out))  # the last words; a failure changes nothing now
            del self._out[:]
        yield Exit(code)

    def _with_reply_lines(self, steps):
        """SMTPLOGLEVEL 3: a `reply` log line for each reply line, in the order
        the session made them among its other log lines."""
        logged = 0  # how much of the output buffer the log has shown
        outcome = None
        while True:
            try:
                request = steps.send(outcome)
            except StopIteration:
                return
            kind = type(request)
            if kind is Log or kind is Send:
                pending = self._out if kind is Log else request.data
                for line in bytes(pending[logged:]).splitlines():
                    yield Log("reply " + words(line))
                logged = len(pending) if kind is Log else 0
            outcome = yield request

    def _flush(self):
        """Send the pending replies; a client that is gone ends the session."""
        if self._out:
            data = bytes(self._out)
            del self._out[:]
            if type((yield Send(data))) is SendFailed:
                raise _End(1, "write")

    def _refuse(self, reply, by, **fields):
        """Answer the current command with a refusal and log who refused it."""
        self._out += reply
        yield self._refusal(reply, by, fields)

    def _refusal(self, reply, by, fields):
        """The Log request of a refusal: its line (from SMTPLOGLEVEL 1 on) and
        its fact.  The fact's verb and code are bounded: a client may send any
        word as a command, a plugin any text as a reply."""
        verb, code = self.verb, reply_code(reply)
        text = None
        if self.log_level >= LOG_EVENTS:
            text = refusal_words(verb, code, by, fields)
        verb = verb.upper().decode() if verb in self._VERBS or verb == b"connect" else "OTHER"
        code = code.decode() if len(code) == 3 and code.isdigit() else "other"
        return Log(text, Refused(verb, code, by))

    def _plugins(self, section, addr_var=None, addr=None):
        """Run a qmail-spp hook; a refusal is logged with the plugin's name."""
        mark = len(self._out)
        try:
            result, addr = yield from self.spp.hook(section, self.env, self._out, self._flush,
                                                    addr_var, addr)
        except Disconnect:  # R or D: log the refusal (if any) before closing
            if len(self._out) > mark:
                yield self._refusal(self._out[mark:], "plugin", {"plugin": self.spp.entry})
            raise
        if result == REJECT:
            yield self._refusal(self._out[mark:], "plugin", {"plugin": self.spp.entry})
        return result, addr

    def _deferred_refusal(self, which):
        """Send an LM/LR/LD error of a plugin if one is pending; True if sent."""
        mark = len(self._out)
        entry = self.spp.pending_error(which, self._out)
        if entry is None:
            return False
        yield self._refusal(self._out[mark:], "plugin-deferred", {"plugin": entry})
        return True

    def _fill(self):
        """More client bytes into the buffer; pending replies go out first."""
        yield from self._flush()
        got = yield READ
        if type(got) is TimedOut:
            self._out += replies.TIMEOUT
            raise _End(1, "timeout")
        if type(got) is EndOfInput:
            raise _End(1, "eof")
        self._buf += got

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
                yield from self._flush()
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

    def _fatal(self, reply, why, detail):
        """A 421 of qmail's: log, answer, end the session."""
        yield Log("fatal: %s" % detail)
        self._out += reply
        raise _End(1, why)

    # ------------------------------------------------------------ verbs

    def smtp_helo(self, arg):
        if (yield from self._helo_plugins(arg)):
            self._out += replies.helo(self.config.greeting)
            self.seenmail = False
            self._set_helo(arg)

    def smtp_ehlo(self, arg):
        if (yield from self._helo_plugins(arg)):
            self._out += replies.ehlo(self.config.greeting, self.ehlo_extensions())
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
            if mode in replies.AUTH_EHLO_LINES and not self._auth_needs_tls():
                extensions.append(replies.AUTH_EHLO_LINES[mode])
            extensions.append(b"SIZE %d" % self.config.databytes)
        return extensions

    def _set_helo(self, arg):
        self.helo = arg
        self.fakehelo = None if arg.lower() == self.remotehost.lower() else arg

    def smtp_rset(self, arg):
        self.seenmail = False
        self.authenticated = False  # as the AUTH patch; relaying stays granted
        self.spp.reset()
        self._out += replies.FLUSHED

    def smtp_noop(self, arg):
        self._out += replies.OK

    def smtp_vrfy(self, arg):
        self._out += replies.VRFY

    def smtp_help(self, arg):
        self._out += replies.HELP

    def smtp_quit(self, arg):
        self._out += replies.quit(self.config.greeting)
        raise _End(0, "quit")

    def smtp_mail(self, arg):
        mode = self.config.auth_mode
        if mode is not None and auth.is_required(mode) and not self.authenticated:
            yield from self._refuse(replies.AUTH_REQUIRED, "auth-required")
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
        self._out += replies.OK

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
        allowed = self.relayclient is not None or (yield from self._rcpthosts_allow(addr))
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
                yield from self._flush()  # the patch: reply, flush, pause, exit
                yield Sleep(QUITASAP_PAUSE)
                raise _End(1, "extfork")
            return
        spp.rcptcount += 1
        self.rcpts.append(addr)
        self._out += replies.OK

    def _rcpthosts_allow(self, addr):
        """qmail's rcpthosts(): may mail for addr be accepted without relaying?"""
        config = self.config
        if config.rcpthosts is None:
            return True  # no control/rcpthosts: every domain
        keys = address.domain_candidates(addr)
        if keys is None:
            return True  # no '@'
        if any(key in config.rcpthosts for key in keys):
            return True
        if not config.morercpthosts or not keys:
            return False
        found = yield MoreRcptHosts(tuple(keys))
        if type(found) is Failed:
            yield from self._fatal(replies.CONTROLS, "controls",
                                   "unable to read controls: control/morercpthosts.cdb: %s"
                                   % found.detail)
        return found

    def _parse_address(self, arg):
        """addrparse plus the localiphost rewrite; None for a syntax error."""
        addr = address.parse(arg)
        if self.config.localiphost is not None:
            bracketed = address.bracketed_ip(addr)
            if bracketed is not None:
                mine = yield LOCAL_IPS
                if type(mine) is Failed:
                    yield from self._fatal(replies.IPME, "ipme",
                                           "unable to figure out my IP addresses: %s"
                                           % mine.detail)
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
        # Read at each DATA: a plugin may have changed it (DECISIONS.md).
        program = self.env.get(b"QMAILQUEUE")
        if program is None:
            program = b"bin/qmail-queue"
        started = yield StartQueue(program, dict(self.env))
        if type(started) is CannotStart:
            if started.reason != EXEC:  # no pipe, no process: no 354 (qmail's qqt failure)
                yield Log("qqt failure: %s" % started.detail)
                yield from self._refuse(replies.QQT_FAILURE, "queue")
                return
            # qmail forks, then its child fails to exec: the message is read
            # and answered with exit 120's text.
            yield Log("unable to exec %s: %s" % (word(program), started.detail))
        writing = type(started) is Started
        self._out += replies.GO_AHEAD
        when = yield NOW
        blast = Blast(self.config.databytes)
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
                written = yield WriteQueue(pending + chunk if pending else chunk)
                writing = type(written) is not WriteFailed
                pending = b""
            if done:
                break
            yield from self._fill()
        self._scanned = 0

        looping = blast.hops >= MAX_HOPS
        failed = not writing or blast.exceeded or looping
        if type(started) is Started:
            finished = yield FinishQueue(None if failed else self.envelope())
            text = queue.final_text(finished, failed)
        else:
            text = replies.QUEUE_EXEC_FAILED
        if not text:
            when = yield NOW
            self._out += replies.accepted(int(when), started.pid)
            self.messages += 1
            text = None
            if self.log_level >= LOG_EVENTS:
                text = "accept qp=%d bytes=%d from=<%s> rcpts=%d" % (
                    started.pid, blast.size, word(self.mailfrom), len(self.rcpts))
            yield Log(text, Accepted(blast.size, len(self.rcpts)))
            return
        if looping:
            reply, by = replies.LOOPING, "hops"
        elif self.config.databytes and blast.exceeded:
            reply, by = replies.TOO_BIG, "databytes"
        else:
            reply, by = replies.queue_failure(text), "queue"
        yield from self._refuse(reply, by, bytes=blast.size, **{"from": self.mailfrom})

    def envelope(self) -> bytes:
        parts = [b"F", self.mailfrom, b"\0"]
        for rcpt in self.rcpts:
            parts += [b"T", rcpt, b"\0"]
        parts.append(b"\0")
        return b"".join(parts)

    # ------------------------------------------------------------ AUTH

    def smtp_auth(self, arg):
        config = self.config
        if config.auth_mode is None:  # plain notqmail has no AUTH
            yield from self._refuse(replies.UNIMPLEMENTED, "unimplemented")
            return
        if not config.auth_mode or not config.checkpassword:
            yield from self._refuse(replies.AUTH_NOT_AVAILABLE, "auth-off")
            return
        if self.authenticated:
            yield from self._refuse(replies.AUTH_ALREADY, "sequence")
            return
        if self.seenmail:
            yield from self._refuse(replies.AUTH_DURING_MAIL, "sequence")
            return
        if self._auth_needs_tls():
            yield from self._refuse(replies.TLS_AUTH_FIRST, "tls-required")
            return
        mechanism, _, arg = arg.partition(b" ")
        mechanism = mechanism.lower()
        dialogue = self._AUTH_MECHANISMS.get(mechanism)
        if dialogue is None:
            yield from self._refuse(replies.AUTH_UNIMPLEMENTED, "unimplemented")
            return
        credentials = yield from dialogue(self, arg.lstrip(b" "))
        if credentials is None:
            return  # canceled or malformed: already answered
        user, secret, challenge = credentials
        if not user or not secret:
            yield from self._refuse(replies.AUTH_MALFORMED, "syntax")
            return
        data = user + b"\0" + secret + b"\0"
        if auth.sends_challenge(config.auth_mode):
            data += challenge + b"\0"
        outcome = yield CheckPassword(config.checkpassword, data, dict(self.env))
        failure = yield from self._checkpassword_failure(outcome)
        if failure is not None:
            yield from self._refuse(failure, "checkpassword")
            return
        user = user.split(b"\0", 1)[0]
        if type(outcome) is not Exited or outcome.code != 0:
            yield Sleep(auth.FAIL_DELAY)
            yield from self._refuse(replies.AUTH_FAILED, "checkpassword", method=mechanism,
                                    user=user)
            return
        self.env[b"SMTPAUTHUSER"] = user
        self.env[b"SMTPAUTHMETHOD"] = mechanism
        result, _ = yield from self._plugins(b"a")
        if result == REJECT:
            return
        if self.log_level >= LOG_EVENTS:
            yield Log("auth method=%s user=%s" % (word(mechanism), word(user)))
        self.authenticated = True
        self.protocol = b"ESMTPA"
        self.relayclient = b""
        self.remoteinfo = user
        self.env[b"TCPREMOTEINFO"] = user
        self.env[b"RELAYCLIENT"] = b""
        self._out += replies.AUTH_OK

    def _checkpassword_failure(self, outcome):
        """The 454 for a checkpassword that could not be run properly, or
        None (then its exit code decides; an exec failure is the patch's
        child exiting 1: the login fails)."""
        kind = type(outcome)
        if kind is Exited:
            return None
        if kind is CannotStart:
            if outcome.reason == EXEC:
                yield Log("unable to run checkpassword %s: %s"
                          % (word(self.config.checkpassword[0]), outcome.detail))
                return None
            return (replies.AUTH_PIPE_FAILED if outcome.reason == PIPE
                    else replies.AUTH_FORK_FAILED)
        if kind is WriteFailed:
            return replies.AUTH_WRITE_FAILED
        if kind is WaitFailed:
            yield Log("checkpassword: no exit status: %s" % outcome.detail)
        return replies.AUTH_CHILD_FAILED  # killed by a signal, or no status

    def _auth_needs_tls(self):
        return self.config.force_tls and not self.in_tls

    def _auth_response(self):
        """One line of the AUTH dialogue, decoded; None after '*' or an empty line."""
        line = yield from self._read_line(cut_at_nul=False)
        if auth.is_cancel(line):
            yield from self._refuse(replies.AUTH_CANCELED, "canceled")
            return None
        if not line:
            yield from self._refuse(replies.AUTH_MALFORMED, "syntax")
            return None
        return auth.b64decode(line)

    def _auth_login(self, arg):
        if arg:
            user = auth.b64decode(arg)
        else:
            self._out += replies.AUTH_LOGIN_USER_PROMPT
            user = yield from self._auth_response()
            if user is None:
                return None
        self._out += replies.AUTH_LOGIN_PASSWORD_PROMPT
        password = yield from self._auth_response()
        if password is None:
            return None
        return user, password, b""

    def _auth_plain(self, arg):
        if arg:
            decoded = auth.b64decode(arg)
        else:
            self._out += replies.AUTH_PLAIN_PROMPT
            decoded = yield from self._auth_response()
            if decoded is None:
                return None
        user, password = auth.plain_credentials(decoded)
        return user, password, b""

    def _auth_cram(self, arg):
        when = yield NOW
        host = self.config.auth_hostname or self.local
        challenge = b"<%s.%d@%s>" % (self.connection_id, int(when), host)
        self._out += replies.auth_challenge(auth.b64encode(challenge))
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
        config = self.config
        ready = yield StartTLS(config.tls_ciphers, config.tls_clients is not None)
        if type(ready) is TLSSetupFailed:
            what = replies.TLS_SETUP_STEPS[ready.step]
            yield Log("TLS set-up failed: %s%s" % (
                word(what), ": " + word(ready.detail) if ready.detail else ""))
            self._out += replies.tls_failure(what, ready.detail)
            if implicit:
                raise _End(1, "tls")
            return
        for warning in ready.warnings:
            yield Log("TLS: %s" % warning)
        self.tls_client_certs = ready.client_certs
        if not implicit:
            self._out += replies.TLS_READY
            yield from self._flush()  # in clear text, before the handshake
        secured = yield HANDSHAKE
        if type(secured) is HandshakeFailed:
            reason = replies.TLS_HANDSHAKE_REASONS.get(secured.why, secured.detail)
            yield Log("TLS handshake failed: %s" % word(reason))
            self._out += replies.tls_failure(b"connection failed", reason)
            raise _End(1, "tls")
        self.in_tls = True
        if self.log_level >= LOG_EVENTS:
            yield Log("tls cipher=%s" % word(secured.cipher))
        self.protocol = b"ESMTPS (" + secured.cipher + b" encrypted)"
        self._set_helo(self.remotehost)  # the client must say EHLO again

    def _relay_by_client_cert(self):
        """In TLS, a verified client certificate whose e-mail address is in
        control/tlsclients allows relaying (judged at the first refusal)."""
        if not self.tls_cert_checked and self.tls_client_certs:
            self.tls_cert_checked = True
            certificate = yield CLIENT_CERTIFICATE
            email, self.tls_cert_reason = judge_certificate(certificate,
                                                            self.config.tls_clients)
            if email is not None:
                self.relayclient = b""
                self.env[b"RELAYCLIENT"] = b""
                self.protocol += b"\n  (cert " + email + b")"
        return self.relayclient is not None

    _VERBS = {
        b"helo": smtp_helo, b"ehlo": smtp_ehlo, b"rset": smtp_rset, b"noop": smtp_noop,
        b"vrfy": smtp_vrfy, b"help": smtp_help, b"quit": smtp_quit, b"mail": smtp_mail,
        b"rcpt": smtp_rcpt, b"data": smtp_data, b"auth": smtp_auth, b"starttls": smtp_starttls,
    }


def cannot_start(detail: str) -> Steps:
    """The session of a connection whose control files cannot be read
    (generator, like Session.run): 421 and exit 1, as qmail-smtpd."""
    yield Log("fatal: unable to read controls: %s" % detail, Closed(1, "controls"))
    yield Send(replies.CONTROLS)
    yield Exit(1)


def fault(exc: BaseException) -> tuple[bytes, str]:
    """(reply, log text) for an exception that escaped the session or the
    driver: a bug, never a traceback on the wire (out of memory: qmail's 421)."""
    if isinstance(exc, MemoryError):
        return replies.NOMEM, "fatal: out of memory at %s" % _where(exc)
    return replies.INTERNAL, "internal error: %s: %s at %s" % (type(exc).__name__, exc,
                                                              _where(exc))


def _where(exc):
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "%s:%d" % (tb.tb_frame.f_code.co_filename.rsplit("/", 1)[-1], tb.tb_lineno)


def _asks_for_utf8(arg):
    """Whether the MAIL parameters after the address include SMTPUTF8 (RFC 6531)."""
    params = arg[arg.find(b">") + 1:] if b">" in arg else b""
    return any(word.upper() == b"SMTPUTF8" for word in params.split())


def _utf8_protocol(protocol):
    """RFC 6531's WITH value: SMTP -> UTF8SMTP, ESMTPA -> UTF8SMTPA, ..."""
    return b"UTF8" + (protocol[1:] if protocol.startswith(b"E") else protocol)

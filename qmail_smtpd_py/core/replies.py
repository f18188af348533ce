"""Every byte a client can see, in one place.

The texts are notqmail's and its patches' (../shared/spec/): clients, log
readers and monitoring scripts match on them, so they are the contract.
Each constant is a complete reply including CR LF; the functions build the
replies that carry a variable part.  Text that comes from elsewhere (a
plugin's P/E/R line, an SMTPEXTFORK custom text, qmail-queue's fd 6) is
placed into them here, never sent raw by another module.
"""

# ------------------------------------------------------------------ qmail-smtpd

CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
NOMEM = b"421 out of memory (#4.3.0)\r\n"
IPME = b"421 unable to figure out my IP addresses (#4.3.0)\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
INTERNAL = b"451 qmail-smtpd-py internal error, closing connection (#4.3.0)\r\n"
# serve -C: before the greeting, to a client over its limit of sessions at once
TOO_MANY_FROM_ADDRESS = b"421 too many connections from your address, try again later (#4.7.0)\r\n"

OK = b"250 ok\r\n"
FLUSHED = b"250 flushed\r\n"
VRFY = b"252 send some mail, i'll try my best\r\n"
HELP = b"214 qmail-smtpd-py: see qmail-smtpd-py(8)\r\n"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
LINE_TOO_LONG = b"500 line too long (#5.5.2)\r\n"
SYNTAX = b"555 syntax error (#5.5.4)\r\n"
WANT_MAIL = b"503 MAIL first (#5.5.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"

GO_AHEAD = b"354 go ahead\r\n"
QQT_FAILURE = b"451 qqt failure (#4.3.0)\r\n"
BARE_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
LOOPING = b"554 too many hops, this message is looping (#5.4.6)\r\n"
TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"


def greeting(text):
    return b"220 " + text + b" ESMTP\r\n"


def helo(text):
    return b"250 " + text + b"\r\n"


def ehlo(text, extensions):
    """The multi-line EHLO reply: greeting first, then one line per extension."""
    lines = [text, *extensions]
    last = len(lines) - 1
    return b"".join(
        (b"250 " if i == last else b"250-") + line + b"\r\n" for i, line in enumerate(lines)
    )


def quit(text):
    return b"221 " + text + b"\r\n"


def accepted(when, qp):
    return b"250 ok %d qp %d\r\n" % (when, qp)


# ------------------------------------------------------------------ qmail-queue
# qmail.c's qmail_close(): exit status -> D (permanent, 554) or Z (temporary,
# 451) and the text.  Spec qmail-smtpd.md §4.7.

QUEUE_EXIT_TEXTS = {
    11: b"Denvelope address too long for qq (#5.1.3)",
    115: b"Denvelope address too long for qq (#5.1.3)",
    31: b"Dmail server permanently rejected message (#5.3.0)",
    51: b"Zqq out of memory (#4.3.0)",
    52: b"Zqq timeout (#4.3.0)",
    53: b"Zqq write error or disk full (#4.3.0)",
    54: b"Zqq read error (#4.3.0)",
    55: b"Zqq unable to read configuration (#4.3.0)",
    56: b"Zqq trouble making network connection (#4.3.0)",
    61: b"Zqq trouble in home directory (#4.3.0)",
    62: b"Zqq trouble creating files in queue (#4.3.0)",
    63: b"Zqq trouble creating files in queue (#4.3.0)",
    64: b"Zqq trouble creating files in queue (#4.3.0)",
    65: b"Zqq trouble creating files in queue (#4.3.0)",
    66: b"Zqq trouble creating files in queue (#4.3.0)",
    71: b"Zmail server temporarily rejected message (#4.3.0)",
    72: b"Zconnection to mail server timed out (#4.4.1)",
    73: b"Zconnection to mail server rejected (#4.4.1)",
    74: b"Zcommunication with mail server failed (#4.4.2)",
    81: b"Zqq internal bug (#4.3.0)",
    91: b"Zqq internal bug (#4.3.0)",
    120: b"Zunable to exec qq (#4.3.0)",
}
QUEUE_READ_ERROR = QUEUE_EXIT_TEXTS[54]
QUEUE_EXEC_FAILED = QUEUE_EXIT_TEXTS[120]
QUEUE_PERMANENT = b"Dqq permanent problem (#5.3.0)"
QUEUE_TEMPORARY = b"Zqq temporary problem (#4.3.0)"
QUEUE_CRASHED = b"Zqq crashed (#4.3.0)"
QUEUE_WAIT_SURPRISE = b"Zqq waitpid surprise (#4.3.0)"


def queue_failure(text):
    """The reply for a D/Z-prefixed qmail-queue text."""
    return (b"554 " if text[:1] == b"D" else b"451 ") + text[1:] + b"\r\n"


# ------------------------------------------------------------------ SMTP AUTH
# Hoffmann's qmail-authentication 0.8.3 (spec qmail-smtpd.md §6.1).

AUTH_LOGIN_USER_PROMPT = b"334 VXNlcm5hbWU6\r\n"      # "Username:"
AUTH_LOGIN_PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
AUTH_PLAIN_PROMPT = b"334 \r\n"
AUTH_NOT_AVAILABLE = b"503 auth not available (#5.3.3)\r\n"
AUTH_ALREADY = b"503 you're already authenticated (#5.5.0)\r\n"
AUTH_DURING_MAIL = b"503 no auth during mail transaction (#5.5.0)\r\n"
AUTH_UNIMPLEMENTED = b"504 auth type unimplemented (#5.5.1)\r\n"
AUTH_CANCELED = b"501 auth exchange canceled (#5.0.0)\r\n"
AUTH_MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
AUTH_FAILED = b"535 authentication failed (#5.7.1)\r\n"
AUTH_REQUIRED = b"530 Authorization required (#5.7.1) \r\n"  # sic: space before CR LF
AUTH_CHILD_FAILED = b"454 oops, problem with child and I can't auth (#4.3.0)\r\n"
AUTH_FORK_FAILED = b"454 oops, child won't start and I can't auth (#4.3.0)\r\n"
AUTH_PIPE_FAILED = b"454 oops, unable to open pipe and I can't auth (#4.3.0)\r\n"
AUTH_WRITE_FAILED = b"454 oops, unable to write pipe and I can't auth (#4.3.0)\r\n"
AUTH_EHLO_LINES = {  # auth mode -> EHLO line (see auth.py for the modes)
    1: b"AUTH LOGIN PLAIN", 11: b"AUTH LOGIN PLAIN",
    2: b"AUTH CRAM-MD5", 12: b"AUTH CRAM-MD5",
    3: b"AUTH LOGIN PLAIN CRAM-MD5", 13: b"AUTH LOGIN PLAIN CRAM-MD5",
}


def auth_challenge(encoded):
    """The CRAM-MD5 challenge line (the challenge already in base64)."""
    return b"334 " + encoded + b"\r\n"


# ------------------------------------------------------------------ STARTTLS
# Vermeulen's TLS patch (spec qmail-smtpd.md §7) and the optional policies.

TLS_READY = b"220 ready for tls\r\n"
TLS_NO_PARAMETERS = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
TLS_AUTH_FIRST = b"538 auth not available without TLS (#5.3.3)\r\n"
TLS_MAIL_FIRST = b"530 Must issue a STARTTLS command first (#5.7.0)\r\n"
TLS_SETUP_STEPS = {  # requests.TLSSetupFailed.step -> the patch's words
    "context": b"unable to initialize ctx",
    "certificate": b"missing certificate",
    "key": b"no valid RSA private key",
}
TLS_HANDSHAKE_REASONS = {"timeout": b"timed out", "closed": b"connection closed"}
TLS_CERT_NO_EMAIL = b"contains no email address"
TLS_CERT_NOT_LISTED = b"email address not in my list of tlsclients"


def tls_failure(what, detail=b""):
    """`454 TLS <what>[: <detail>] (#4.3.0)`."""
    return b"454 TLS " + what + (b": " + detail if detail else b"") + b" (#4.3.0)\r\n"


def tls_nogateway(reason):
    """The rcpthosts refusal inside TLS, where a client certificate could have helped."""
    return (b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for "
            b"gatewaying" + (b": " + reason if reason else b"") + b" (#5.7.1)\r\n")


# ------------------------------------------------------------------ qmail-spp
# spec spp.md §3: the failure replies, and the text lines plugins print.

SPP_CANT_EXECUTE = b"can't execute"
SPP_CANT_PIPE = b"can't pipe()"
SPP_FORK_FAILED = b"fork() failed"
SPP_CRASHED = b"child crashed"
SPP_WAIT_FAILED = b"wait_pid() failed"


def spp_failure(entry, reason):
    return b"451 qmail-spp failure: " + entry + b": " + reason + b" (#4.3.0)\r\n"


def plugin_line(text):
    """A P, E or R line of a plugin, sent as it printed it (up to a NUL)."""
    return text + b"\r\n"


# ------------------------------------------------------------------ SMTPEXTFORK
# exit code -> (reply code, default text, fixed suffix); spec extfork.md, and
# DECISIONS.md for 104.

EXTFORK_REPLIES = {
    100: (b"554", b"sorry, permanent envelope failure due to local policy", b"(#5.7.1)"),
    101: (b"454", b"sorry, temporary envelope failure due to local policy", b"(#5.7.1)"),
    102: (b"550", b"sorry, permanent failure imposed by local policy", b"(#5.7.1)"),
    103: (b"451", b"sorry, service not available due to local policy", b"(#4.3.0)"),
    104: (b"552", b"sorry, permanent mailbox failure due to local policy", b"(#5.7.1)"),
    105: (b"421", b"sorry, service not available due to local policy", b"(#4.3.0)"),
    106: (b"503", b"sorry, wrong usage of SMTP commands", b"(#5.7.1)"),
    107: (b"450", b"sorry, temporary mailbox failure imposed by local policy", b"(#4.3.0)"),
    108: (b"501", b"syntax error", b"(#5.7.1)"),
}


def extfork_refusal(status, env):
    """The reply for a refusing exit status; the text may come from
    <code>SMTPEXTFORK (even empty), the code and suffix never change."""
    code, text, suffix = EXTFORK_REPLIES[status]
    custom = env.get(code + b"SMTPEXTFORK")
    if custom is not None:
        text = custom
    return code + b" " + text + b" " + suffix + b"\r\n"

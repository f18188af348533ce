"""Every reply the server sends, in one place.

The texts are notqmail's (see ../shared/spec/qmail-smtpd.md); clients, log
readers and monitoring scripts match on them, so they are the contract.
Each constant is the complete reply including CR LF.
"""

CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
NOMEM = b"421 out of memory (#4.3.0)\r\n"
IPME = b"421 unable to figure out my IP addresses (#4.3.0)\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
INTERNAL = b"451 qmail-smtpd-py internal error, closing connection (#4.3.0)\r\n"

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

# STARTTLS (Vermeulen's TLS patch) and the optional TLS policies.
TLS_READY = b"220 ready for tls\r\n"
TLS_NO_PARAMETERS = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
TLS_AUTH_FIRST = b"538 auth not available without TLS (#5.3.3)\r\n"
TLS_MAIL_FIRST = b"530 Must issue a STARTTLS command first (#5.7.0)\r\n"


def tls_failure(what):
    return b"454 TLS " + what + b" (#4.3.0)\r\n"


def tls_nogateway(reason):
    """The rcpthosts refusal inside TLS, where a client certificate could have helped."""
    return (b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for "
            b"gatewaying" + (b": " + reason if reason else b"") + b" (#5.7.1)\r\n")

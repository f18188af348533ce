"""SMTPEXTFORK: outside programs that judge each RCPT by their exit code.

With SMTPEXTFORK (or SMTPEXTFORKR for relay clients) naming a comma-separated
list of programs, every RCPT that passed qmail's own checks is shown to the
programs in order, each run without arguments and with REMOTEMF, REMOTEHELO
and REMOTERCPT in its environment.  Exit 0 passes to the next program; 100-108
refuse the recipient with the reply of the table below; 111 (exec failure)
and any other code are logged and the next program runs; death by a signal
stops the list and the recipient is accepted.  Spec: ../shared/spec/extfork.md;
exit 104 answers 552 with 552SMTPEXTFORK's text (DECISIONS.md).
"""

from .effects import PROGRAM_CRASHED, PROGRAM_NOT_STARTED, Log, RunProgram

# exit code -> (reply code, default text, fixed suffix)
REPLIES = {
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
QUITASAP_PAUSE = 2  # seconds between the reply and the exit, as the patch does


def reply(status, env):
    """The SMTP reply for a refusing exit status; the text may come from
    <code>SMTPEXTFORK (even empty), the code and suffix never change."""
    code, text, suffix = REPLIES[status]
    custom = env.get(code + b"SMTPEXTFORK")
    if custom is not None:
        text = custom
    return code + b" " + text + b" " + suffix + b"\r\n"


class ExtFork:
    """Per-connection SMTPEXTFORK state."""

    def __init__(self):
        self.warned_relay = False
        self.refused_by = None  # the program behind the last refusal, for the log

    def check(self, env, relay, mailfrom, helo, rcpt):
        """Run the programs for one recipient (generator).  Returns the
        refusal reply, or None if the recipient may be accepted."""
        if b"SMTPEXTFORK" not in env and b"SMTPEXTFORKR" not in env:
            return None  # the feature is off: nothing at all happens
        value = env.get(b"SMTPEXTFORKR" if relay else b"SMTPEXTFORK")
        if value is None:
            if relay and not self.warned_relay:
                self.warned_relay = True
                yield Log("XF: SMTPEXTFORKR env variable not defined in relay mode: %s"
                          % _text(env.get(b"TCPREMOTEIP", b"unknown")))
            return None
        env[b"REMOTEMF"] = mailfrom
        env[b"REMOTEHELO"] = helo
        env[b"REMOTERCPT"] = rcpt
        for program in value.split(b","):
            if not program:
                continue
            status = yield RunProgram(program, env)
            name = _text(program)
            if status == PROGRAM_CRASHED:
                yield Log("XF (#5c): %s" % name)
                return None
            if status == PROGRAM_NOT_STARTED:
                yield Log("XF: forking failed for %s" % name)
                return None
            if status in REPLIES:
                yield Log("XF (%d): %s" % (status, name))
                self.refused_by = program
                return reply(status, env)
            if status == 0:
                yield Log("XF (0): %s" % name)
            elif status == 111:
                yield Log("XF warn: cannot fork external program: %s" % name)
            else:
                yield Log("XF (#5d): %s exited %d" % (name, status))
        return None


def _text(raw):
    return raw.decode("utf-8", "backslashreplace")

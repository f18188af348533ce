"""SMTPEXTFORK: outside programs that judge each RCPT by their exit code.

With SMTPEXTFORK (or SMTPEXTFORKR for relay clients) naming a comma-separated
list of programs, every RCPT that passed qmail's own checks is shown to the
programs in order, each run without arguments and with REMOTEMF, REMOTEHELO
and REMOTERCPT in its environment.  Exit 0 passes to the next program; 100-108
refuse the recipient with the reply of the table (replies.EXTFORK_REPLIES);
111 (the child's exit when exec fails) and any other code are logged and the
next program runs; death by a signal stops the list and the recipient is
accepted.  Spec: ../shared/spec/extfork.md; exit 104 answers 552 with
552SMTPEXTFORK's text (DECISIONS.md).
"""

from __future__ import annotations

from . import replies
from .requests import EXEC, CannotStart, Exited, Log, RunProgram, Signaled, TimedOut

TYPE_CHECKING = False  # typing.TYPE_CHECKING would cost an import per connection
if TYPE_CHECKING:
    from .requests import Steps

QUITASAP_PAUSE = 2  # seconds between the reply and the exit, as the patch does
EXEC_FAILED = 111   # the patch's child exits 111 when execv fails


class ExtFork:
    """Per-connection SMTPEXTFORK state."""

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit  # SMTPEXTFORKTIMEOUT
        self.warned_relay = False
        self.refused_by = None  # the program behind the last refusal, for the log

    def check(self, env: dict[bytes, bytes], relay: bool, mailfrom: bytes, helo: bytes,
              rcpt: bytes) -> Steps:
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
            name = _text(program)
            outcome = yield RunProgram(program, dict(env), self.time_limit)
            kind = type(outcome)
            if kind is CannotStart and outcome.reason == EXEC:
                outcome = Exited(EXEC_FAILED)  # the patch forks first: its child exits 111
                kind = Exited
            if kind is TimedOut:  # killed: the same as any death by a signal
                yield Log("XF: %s killed after its time limit of %gs" % (name, self.time_limit))
                kind = Signaled
            if kind is Signaled:
                yield Log("XF (#5c): %s" % name)
                return None
            if kind is CannotStart:  # no pipe or process: the patch gives up, accepting
                yield Log("XF: forking failed for %s" % name)
                return None
            if kind is not Exited:  # no exit status: as a crash
                yield Log("XF: no exit status for %s: %s" % (name, outcome.detail))
                return None
            status = outcome.code
            if status in replies.EXTFORK_REPLIES:
                yield Log("XF (%d): %s" % (status, name))
                self.refused_by = program
                return replies.extfork_refusal(status, env)
            if status == 0:
                yield Log("XF (0): %s" % name)
            elif status == EXEC_FAILED:
                yield Log("XF warn: cannot fork external program: %s" % name)
            else:
                yield Log("XF (#5d): %s exited %d" % (name, status))
        return None


def _text(raw):
    return raw.decode("utf-8", "backslashreplace")

"""What qmail-queue's end means: notqmail's qmail_close().

qmail-queue reads the message on fd 0 and the envelope on fd 1 and tells how
it went by its exit status (qmail-queue(8)); notqmail adds fd 6, on which a
queue filter exiting 82 may give its own reply text.  The texts and their
replies are in replies.py; spec qmail-smtpd.md §4.7.
"""

from __future__ import annotations

from . import replies
from .requests import Exited, Outcome, Signaled

MAX_ERRTEXT = 255  # bytes of the fd 6 text qmail reads


def final_text(finished: Outcome, transfer_failed: bool) -> bytes:
    """b"" for success, else the D/Z-prefixed reason, for a FinishQueue outcome."""
    kind = type(finished)
    if kind is Signaled:
        return replies.QUEUE_CRASHED
    if kind is not Exited:
        return replies.QUEUE_WAIT_SURPRISE
    status = finished.code
    if status == 0:
        return replies.QUEUE_READ_ERROR if transfer_failed else b""
    if status == 82 and len(finished.text) >= 3:
        return _custom_text(finished.text[:MAX_ERRTEXT])
    text = replies.QUEUE_EXIT_TEXTS.get(status)
    if text is not None:
        return text
    return replies.QUEUE_PERMANENT if 11 <= status <= 40 else replies.QUEUE_TEMPORARY


def _custom_text(text):
    """The fd 6 text: its first byte D is permanent, anything else temporary;
    the rest is used as the C string it is in qmail (up to a NUL)."""
    rest = text[1:]
    nul = rest.find(b"\0")
    if nul >= 0:
        rest = rest[:nul]
    return (b"D" if text[:1] == b"D" else b"Z") + rest

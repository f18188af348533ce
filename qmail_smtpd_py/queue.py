"""Talking to qmail-queue: what its exit status means, and running it.

qmail-queue reads the message on fd 0 and the envelope on fd 1 and tells
how it went by its exit status (qmail-queue(8)); notqmail adds fd 6, on
which a queue filter exiting 82 may give its own reply text.
"""

import os

from .effects import QUEUE_CRASHED

# Exit code -> reply text.  First byte D = permanent (554), Z = temporary (451).
_EXIT_TEXT = {
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
_PERMANENT = b"Dqq permanent problem (#5.3.0)"
_TEMPORARY = b"Zqq temporary problem (#4.3.0)"
_CRASHED = b"Zqq crashed (#4.3.0)"
EXEC_FAILED_STATUS = 120


def status_text(status, transfer_failed, errtext=b""):
    """qmail_close(): b"" for success, else the D/Z-prefixed reason."""
    if status == QUEUE_CRASHED:
        return _CRASHED
    if status == 0:
        return _EXIT_TEXT[54] if transfer_failed else b""
    if status == 82 and len(errtext) >= 3:
        return errtext if errtext[:1] == b"D" else b"Z" + errtext[1:]
    text = _EXIT_TEXT.get(status)
    if text is not None:
        return text
    return _PERMANENT if 11 <= status <= 40 else _TEMPORARY


def reply_for(text):
    """The SMTP reply for a non-empty status_text()."""
    return (b"554 " if text[:1] == b"D" else b"451 ") + text[1:] + b"\r\n"


class QueueProcess:
    """A running qmail-queue: message pipe on its fd 0, envelope on fd 1,
    error text on fd 6.  SIGPIPE stays ignored in the child, as in qmail."""

    def __init__(self, program, env):
        self.pid = None
        self.msg = self.envelope = self.err = None
        self.failed = False  # a write failed; nothing more is written
        pipes = [os.pipe() for _ in range(3)]
        (msg_r, self.msg), (env_r, self.envelope), (self.err, err_w) = pipes
        child_ends = [_off_targets(fd, (0, 1, 6)) for fd in (msg_r, env_r, err_w)]
        actions = [(os.POSIX_SPAWN_DUP2, fd, target)
                   for fd, target in zip(child_ends, (0, 1, 6))]
        try:
            self.pid = os.posix_spawn(program, [program], env, file_actions=actions)
        except OSError:
            self.close()
            raise
        finally:
            for fd in child_ends:
                os.close(fd)

    def write(self, data):
        if self.failed:
            return False
        try:
            _write_all(self.msg, data)
        except OSError:
            self.failed = True
        return not self.failed

    def finish(self, envelope):
        """Close the message, send the envelope (if any), wait: (status, errtext)."""
        os.close(self.msg)
        self.msg = None
        if envelope is not None:
            try:
                _write_all(self.envelope, envelope)
            except OSError:
                pass
        os.close(self.envelope)
        self.envelope = None
        errtext = self._collect_errtext()
        _, wstatus = os.waitpid(self.pid, 0)
        self.pid = None
        errtext += self._read_errtext(255 - len(errtext))
        self.close()
        if os.WIFSIGNALED(wstatus):
            return QUEUE_CRASHED, errtext
        return os.WEXITSTATUS(wstatus), errtext

    def _collect_errtext(self):
        """Read fd 6 while the child runs, so that a child writing more than
        a pipe holds there cannot block on us while we wait for it; stop at
        its exit (a grandchild may keep fd 6 open) or after 255 bytes (as
        notqmail: the rest is not read, the pipe is closed)."""
        import select
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return b""
        text = b""
        try:
            poller = select.poll()
            poller.register(self.err, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            while True:
                ready = dict(poller.poll())
                if self.err in ready:
                    chunk = os.read(self.err, 255 - len(text))
                    text += chunk
                    if not chunk or len(text) >= 255:
                        poller.unregister(self.err)
                        os.close(self.err)
                        self.err = None
                if pidfd in ready:
                    return text
        finally:
            os.close(pidfd)

    def _read_errtext(self, size):
        if self.err is None or size <= 0:
            return b""
        os.set_blocking(self.err, False)
        text = b""
        try:
            while len(text) < size and (chunk := os.read(self.err, size - len(text))):
                text += chunk
        except OSError:
            pass
        return text

    def close(self):
        """Drop our pipe ends without an envelope: qmail-queue then gives up."""
        for name in ("msg", "envelope", "err"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _off_targets(fd, targets):
    """fd itself, or a copy of it if it is one of the numbers the child's
    dup2 actions write to: dup2(6, 6) would leave close-on-exec set.  A
    copy made while fd is open never gets fd's number."""
    if fd not in targets:
        return fd
    new = os.dup(fd)
    os.close(fd)
    return new

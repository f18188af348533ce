"""Running one qmail-spp plugin for the driver.

As qmail-spp does: stdin closed, stdout a pipe we read line by line, stderr
inherited (the plugin's log), cwd the qmail home (the process's cwd),
SIGPIPE left ignored.  posix_spawn, not a fork of the whole interpreter.
An optional time limit covers the whole run; a plugin over it is killed
and reported as crashed.
"""

import os
import select
import time

from .effects import PLUGIN_CRASHED

READ_SIZE = 1 << 16
MAX_LINE = 1 << 20  # longer plugin output lines are cut here (memory stays bounded)


class PluginProcess:
    def __init__(self, entry, env, time_limit=None):
        """Start the plugin; raises OSError when it cannot be started
        (errno tells pipe, fork and exec failures apart)."""
        if entry[:1] == b":":
            argv = [b"/bin/sh", b"-c", entry[1:]]
        else:
            argv = [entry]  # the whole line is the path: no argument splitting
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.pending = b""
        self.skipping = False  # dropping the rest of an over-long line
        self.killed = False
        self.out, child_out = os.pipe()
        try:
            self.pid = os.posix_spawn(argv[0], argv, env, file_actions=[
                (os.POSIX_SPAWN_CLOSE, 0), (os.POSIX_SPAWN_DUP2, child_out, 1)])
        except BaseException:
            os.close(self.out)
            raise
        finally:
            os.close(child_out)

    def _remaining_ms(self):
        if self.deadline is None:
            return None
        return max(0, int((self.deadline - time.monotonic()) * 1000))

    def read_lines(self):
        """The next complete lines (with LF), or the unterminated rest at EOF,
        or None at EOF.  A plugin over its time limit is killed: EOF."""
        while True:
            if self.deadline is not None:
                # Checked before every read: a plugin that writes without end
                # keeps the pipe readable, so poll alone would never time out.
                poller = select.poll()
                poller.register(self.out, select.POLLIN)
                if not self._remaining_ms() or not poller.poll(self._remaining_ms()):
                    self._kill()
                    return None
            data = os.read(self.out, READ_SIZE)
            if not data:
                rest, self.pending = self.pending, b""
                return [rest] if rest else None
            if self.skipping:
                lf = data.find(b"\n")
                if lf < 0:
                    continue
                self.skipping = False
                data = data[lf + 1:]
            data = self.pending + data
            end = data.rfind(b"\n") + 1
            self.pending = data[end:]
            lines = [line[:MAX_LINE] + b"\n" for line in data[:end - 1].split(b"\n")] if end else []
            if len(self.pending) > MAX_LINE:  # an endless line: act on its start, drop the rest
                lines.append(self.pending[:MAX_LINE] + b"\n")
                self.pending = b""
                self.skipping = True
            if lines:
                return lines

    def finish(self):
        """Close the pipe, wait; the exit code or PLUGIN_CRASHED."""
        os.close(self.out)
        if self.deadline is not None and not self._wait_until_deadline():
            self._kill()
        _, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status) or self.killed:
            return PLUGIN_CRASHED
        return os.WEXITSTATUS(status)

    def _wait_until_deadline(self):
        fd = os.pidfd_open(self.pid)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(self._remaining_ms()))
        finally:
            os.close(fd)

    def _kill(self):
        self.killed = True
        try:
            os.kill(self.pid, 9)  # SIGKILL; the signal module costs an import
        except ProcessLookupError:
            pass

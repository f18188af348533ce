"""Child processes for the driver: qmail-queue, plugins, programs, checkpassword.

Each child is started with posix_spawn (not a fork of the whole interpreter)
in the process's working directory, the qmail home, with the environment the
core gives.  SIGPIPE stays ignored in the children, as qmail-smtpd leaves it;
only checkpassword gets it back at its default, as the AUTH patch does.
Failures are reported as the core's outcomes (requests.py): which step
failed, never what that means for the client.
"""

import errno
import os
import select
import sys
import time
from _signal import SIGKILL, SIGPIPE  # built in: the signal module costs an import

from .core.requests import (
    END_OF_INPUT,
    EXEC,
    FORK,
    PIPE,
    TIMED_OUT,
    WRITE_FAILED,
    WRITTEN,
    CannotStart,
    Exited,
    Lines,
    Signaled,
    Started,
    WaitFailed,
)

# Python scripts the pool prepared (preload.py): path -> (Script, the pool's
# environment).
preloaded = {}
# Under tcpserver (one process per connection) a Python script is prepared at
# its first call instead, when this holds the connection's environment (the
# driver sets it unless NOPRELOAD is set): what a call saves is the
# interpreter start, so from its first call on a fork is cheaper.  Paths that
# did not qualify are remembered as None.
prepare_on_first_use = None
READ_SIZE = 1 << 16
MAX_LINE = 1 << 20  # longer plugin output lines are cut here (memory stays bounded)
_NO_PROCESS = {errno.EAGAIN, errno.ENOMEM}  # posix_spawn could not make a process
_TRY_NEXT = {errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV, errno.ETIMEDOUT}


def spawn_failure(exc):
    """The CannotStart outcome for an exception of posix_spawn."""
    if isinstance(exc, OSError) and exc.errno in _NO_PROCESS:
        return CannotStart(FORK, exc.strerror or str(exc))
    if isinstance(exc, OSError):
        return CannotStart(EXEC, exc.strerror or str(exc))
    return CannotStart(EXEC, str(exc))  # ValueError: a NUL in a path or the environment


def spawn(path, argv, env, file_actions, setsigdef=(), search_path=False):
    """posix_spawn as execv would run path; with search_path as execvp: a
    name without '/' is looked for in the PATH of env (the environment the
    C program would have had), and a file that is no executable format is
    run through /bin/sh.  Returns the pid; raises OSError or ValueError."""
    if not search_path:
        return os.posix_spawn(path, argv, env, file_actions=file_actions, setsigdef=setsigdef)
    if b"/" in path:
        candidates = [path]
    else:
        directories = env.get(b"PATH", b"/bin:/usr/bin").split(b":")
        candidates = [os.path.join(d, path) if d else path for d in directories]
    denied = False
    for candidate in candidates:
        try:
            return os.posix_spawn(candidate, argv, env, file_actions=file_actions,
                                  setsigdef=setsigdef)
        except OSError as e:
            if e.errno == errno.ENOEXEC:  # glibc's execvp: sh FILE ARGS...
                return os.posix_spawn(b"/bin/sh", [b"/bin/sh", candidate, *argv[1:]], env,
                                      file_actions=file_actions, setsigdef=setsigdef)
            if e.errno == errno.EACCES:
                denied = True
            elif e.errno not in _TRY_NEXT:
                raise
    code = errno.EACCES if denied else errno.ENOENT
    raise OSError(code, os.strerror(code))


def _preloaded(path, env):
    """The prepared Script to run for path now, or None (exec it)."""
    path = os.path.abspath(path)
    entry = preloaded.get(path, False)
    if entry is False and prepare_on_first_use is not None:
        entry = preloaded[path] = _prepare(path)
    if entry is None or entry is False:
        return None
    from . import preload  # loaded by the pool, or by _prepare
    script, base_env = entry
    return script if preload.usable(script, env, base_env) else None


def _prepare(path):
    """(Script, environment) for a script of this interpreter, or None.  The
    #! line is looked at first: preload.py costs an import (some 15 ms), which
    only a Python script can pay back."""
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    interpreter = first[2:].split(maxsplit=1)[:1]
    if first[:2] != b"#!" or not interpreter or os.path.dirname(
            interpreter[0]) != os.path.dirname(os.fsencode(sys.executable)):
        return None
    from . import preload
    try:
        script = preload.examine(os.fsdecode(path), None, None)
    except preload.NotPreloaded:
        return None
    return script, prepare_on_first_use


def wait(pid):
    """Exited, Signaled or WaitFailed for a child."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError as e:  # e.g. started with SIGCHLD ignored
        return WaitFailed(e.strerror or str(e))
    if os.WIFSIGNALED(status):
        return Signaled(os.WTERMSIG(status))
    return Exited(os.WEXITSTATUS(status))


def exits_within(pid, seconds):
    """Wait up to seconds for the child to end (it is not reaped here)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, seconds) * 1000))
    finally:
        os.close(fd)


def kill(pid):
    try:
        os.kill(pid, SIGKILL)
    except ProcessLookupError:
        pass


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def off_targets(fd, targets):
    """fd itself, or a copy of it if it is one of the numbers the child's
    dup2 actions write to: dup2(6, 6) would leave close-on-exec set.  A
    copy made while fd is open never gets fd's number."""
    if fd not in targets:
        return fd
    new = os.dup(fd)
    os.close(fd)
    return new


def _pipes(count):
    """count pipes, or OSError with all of them closed again."""
    made = []
    try:
        for _ in range(count):
            made.append(os.pipe())
    except OSError:
        for pair in made:
            for fd in pair:
                os.close(fd)
        raise
    return made


# ------------------------------------------------------------------ qmail-queue


class QueueProcess:
    """A running qmail-queue: message pipe on its fd 0, envelope on fd 1,
    error text on fd 6.  Use start(), which returns an outcome."""

    def __init__(self):
        self.pid = None
        self.msg = self.envelope = self.err = None
        self.failed = False  # a write failed; nothing more is written

    @classmethod
    def start(cls, program, env):
        """(QueueProcess or None, Started or CannotStart)."""
        queue = cls()
        try:
            (msg_r, queue.msg), (env_r, queue.envelope), (queue.err, err_w) = _pipes(3)
        except OSError as e:
            return None, CannotStart(PIPE, e.strerror)
        child_ends = [off_targets(fd, (0, 1, 6)) for fd in (msg_r, env_r, err_w)]
        actions = [(os.POSIX_SPAWN_DUP2, fd, target)
                   for fd, target in zip(child_ends, (0, 1, 6))]
        try:
            queue.pid = spawn(program, [program], env, actions)
        except (OSError, ValueError) as e:
            queue.close()
            return None, spawn_failure(e)
        finally:
            for fd in child_ends:
                os.close(fd)
        return queue, Started(queue.pid)

    def write(self, data):
        if not self.failed:
            try:
                write_all(self.msg, data)
            except OSError:
                self.failed = True
        return WRITE_FAILED if self.failed else WRITTEN

    def finish(self, envelope):
        """Close the message, send the envelope (if any), wait."""
        os.close(self.msg)
        self.msg = None
        if envelope is not None:
            try:
                write_all(self.envelope, envelope)
            except OSError:
                pass
        os.close(self.envelope)
        self.envelope = None
        errtext = self._collect_errtext()
        outcome = wait(self.pid)
        self.pid = None
        errtext += self._read_errtext(255 - len(errtext))
        self.close()
        if type(outcome) is Exited:
            return Exited(outcome.code, errtext)
        return outcome

    def _collect_errtext(self):
        """Read fd 6 while the child runs, so that a child writing more than
        a pipe holds there cannot block on us while we wait for it; stop at
        its exit (a grandchild may keep fd 6 open) or after 255 bytes (as
        notqmail: the rest is not read, the pipe is closed)."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
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


# ------------------------------------------------------------------ qmail-spp plugins


class LineSplitter:
    """A plugin's output cut into lines (each with its LF), as it arrives;
    a line over MAX_LINE is acted on by its start, the rest of it dropped."""

    def __init__(self):
        self.pending = b""
        self.skipping = False  # dropping the rest of an over-long line

    def feed(self, data):
        """The lines completed by data."""
        if self.skipping:
            lf = data.find(b"\n")
            if lf < 0:
                return []
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
        return lines

    def rest(self):
        """[the unterminated rest] at the end of the output, or []."""
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


class PluginProcess:
    """A running qmail-spp plugin, as qmail-spp runs one: stdin closed, stdout
    a pipe read line by line, stderr inherited (the plugin's log).  An
    optional time limit covers the whole run; a plugin over it is killed."""

    def __init__(self, pid, out, time_limit):
        self.pid = pid
        self.out = out
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.lines = LineSplitter()
        self.killed = False

    @classmethod
    def start(cls, argv, env, time_limit):
        """(PluginProcess or None, Started or CannotStart)."""
        script = _preloaded(argv[0], env) if len(argv) == 1 else None
        if script is not None and script.in_process:
            from . import preload
            try:
                return preload.call_in_process(script, argv, env, time_limit), Started(os.getpid())
            except preload.NotStarted:  # no descriptor for what it borrows: a fork may do
                pass
        try:
            out, child_out = os.pipe()
        except OSError as e:
            return None, CannotStart(PIPE, e.strerror)
        try:
            if script is not None:
                from . import preload
                pid = preload.start(script, argv, env, child_out, stdin_null=False)
            else:
                pid = spawn(argv[0], list(argv), env, [
                    (os.POSIX_SPAWN_CLOSE, 0), (os.POSIX_SPAWN_DUP2, child_out, 1)])
        except (OSError, ValueError) as e:
            os.close(out)
            return None, spawn_failure(e)
        finally:
            os.close(child_out)
        return cls(pid, out, time_limit), Started(pid)

    def _remaining_ms(self):
        return max(0, int((self.deadline - time.monotonic()) * 1000))

    def read_lines(self):
        """Lines: the next complete lines (with LF), or the unterminated rest
        at the end; END_OF_INPUT; TIMED_OUT (the plugin was killed)."""
        while True:
            if self.deadline is not None:
                # Checked before every read: a plugin that writes without end
                # keeps the pipe readable, so poll alone would never time out.
                poller = select.poll()
                poller.register(self.out, select.POLLIN)
                if not self._remaining_ms() or not poller.poll(self._remaining_ms()):
                    self._kill()
                    return TIMED_OUT
            data = os.read(self.out, READ_SIZE)
            if not data:
                rest = self.lines.rest()
                return Lines(rest) if rest else END_OF_INPUT
            lines = self.lines.feed(data)
            if lines:
                return Lines(lines)

    def finish(self):
        """Close the pipe and wait: Exited, Signaled, TIMED_OUT or WaitFailed."""
        os.close(self.out)
        if self.deadline is not None and not exits_within(self.pid, self._remaining_ms() / 1000):
            self._kill()
        outcome = wait(self.pid)
        return TIMED_OUT if self.killed else outcome

    def _kill(self):
        self.killed = True
        kill(self.pid)


# ------------------------------------------------------------------ SMTPEXTFORK programs


def run_program(path, env, time_limit):
    """An SMTPEXTFORK program: execv, no arguments, stdin /dev/null, stdout
    into the log (the patch let it write into the SMTP stream); wait for it,
    killing it after time_limit seconds (TIMED_OUT)."""
    script = _preloaded(path, env)
    try:
        if script is not None:
            from . import preload
            pid = preload.start(script, [path], env, 2, stdin_null=True)
        else:
            pid = spawn(path, [path], env, [(os.POSIX_SPAWN_OPEN, 0, "/dev/null",
                                             os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, 2, 1)])
    except (OSError, ValueError) as e:
        return spawn_failure(e)
    if time_limit and not exits_within(pid, time_limit):
        kill(pid)
        wait(pid)
        return TIMED_OUT
    return wait(pid)


# ------------------------------------------------------------------ checkpassword


def check_password(argv, data, env):
    """checkpassword: the credentials on its fd 3, SIGPIPE at its default,
    execvp (PATH search, /bin/sh for a script without #!), as the AUTH
    patch; its stdin and stdout are kept off the SMTP connection."""
    argv = list(argv)
    try:
        readable, writable = os.pipe()
    except OSError as e:
        return CannotStart(PIPE, e.strerror)
    readable = off_targets(readable, (0, 1, 3))
    # Fill the pipe before the child exists: a checkpassword that exits
    # without reading fd 3 then cannot make the write fail (the patch has
    # that race).  Only what does not fit is written afterwards.
    os.set_blocking(writable, False)
    rest = memoryview(data)
    try:
        rest = rest[os.write(writable, rest):]
    except BlockingIOError:
        pass
    os.set_blocking(writable, True)
    try:
        pid = spawn(argv[0], argv, env, [(os.POSIX_SPAWN_DUP2, readable, 3),
                                         (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                         (os.POSIX_SPAWN_DUP2, 2, 1)],
                    setsigdef=(SIGPIPE,), search_path=True)
    except (OSError, ValueError) as e:
        os.close(writable)
        return spawn_failure(e)
    finally:
        os.close(readable)
    try:
        write_all(writable, rest)
    except OSError:  # it closed fd 3 without reading all: no use waiting for it
        kill(pid)
        wait(pid)
        return WRITE_FAILED
    finally:
        os.close(writable)
    return wait(pid)

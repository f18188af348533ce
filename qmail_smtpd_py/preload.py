"""Python plugins and SMTPEXTFORK programs without an interpreter per call.

Theory of operation.  qmail-spp starts a plugin afresh at every event, so a
Python plugin costs a whole interpreter start plus its imports each time.
In the pool, a plugin or program that is a Python script for this very
interpreter (its `#!` line names the venv's python) is prepared once, in the
parent before the workers fork: its source compiled, the modules it imports
at top level imported.  A call then forks a child from the worker that sets
up exactly what exec would have given the script (argv, the session's
environment, the qmail home as working directory, stdin closed or
/dev/null, stdout the plugin pipe or the log, stderr the log, default
signal dispositions but SIGPIPE ignored, no other descriptor, a fresh
`__main__`) and runs it; the child exits as the interpreter would (the
status of sys.exit, 1 with the traceback for an uncaught exception, 120
when stdout cannot be flushed at the end), and the time limits of the
server apply to it unchanged.

What qualifies is decided once at start (again on SIGHUP) and logged, one
line per program.  Not preloaded, and so run the old way: shell (`:`)
entries, programs that are not Python scripts for this interpreter
(another interpreter, interpreter options, C programs), scripts whose
imports fail in the parent, and scripts that the sessions' user could
change (the script, a module it imports, or a directory of either writable
by that user: what the parent imported lives as long as the pool).  A
script changed since it was prepared, or a session whose environment sets
PYTHON* variables the pool's does not, runs the old way too.  NOPRELOAD
set (even empty) in the pool's environment turns all of it off.

A qmail-spp plugin script that says so at its top level (the line
`RUN_IN_PROCESS = True`, as every sample plugin does) skips even the fork:
the worker runs it in its own process, set up and put back around the call
(call_in_process), its time limit a SIGALRM.  That is a promise of the
script's: it changes nothing of the process for good (no os._exit, threads,
signal handlers it relies on, atexit, monkey-patched modules) and keeps no
session's data where the next call would find it (its globals are new at
each call; modules it imports stay).  What the server can check, it does: a
script that starts a thread or registers an atexit handler, or that its
time limit stopped, runs forked from then on.

State a fork copies is handled: the parent prepares scripts, it never runs
them, so no connection or socket of theirs exists before the child makes
it; the child closes every descriptor it does not own, drops the parent's
atexit handlers, and random is reseeded by Python's own at-fork hook.
"""

import ast
import atexit
import builtins
import fcntl
import importlib
import io
import os
import signal
import stat
import sys
import types
from _thread import _count as _threads_started

from . import children
from .core.requests import END_OF_INPUT, TIMED_OUT, Exited, Lines
from .driver import log

PYTHON_NAMES = ("python", "python3", "python%d.%d" % sys.version_info[:2])
# Signals a preloaded child must find at their defaults (those the pool and the
# workers handle); SIGPIPE stays ignored, as qmail-smtpd leaves it for its children.
HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Script:
    """A prepared Python script.  (A slotted class, not attrs: under
    tcpserver this module is on the per-connection path.)"""

    __slots__ = ("path", "code", "directory", "identity", "modules", "in_process")

    def __init__(self, path, code, directory, identity, modules, in_process=False):
        self.path = path            # absolute, as it is run
        self.code = code            # types.CodeType
        self.directory = directory  # sys.path[0] of the script: its directory, symlinks resolved
        self.identity = identity    # the file when it was prepared (device, inode, size, mtime)
        self.modules = modules      # modules its imports brought into the parent
        self.in_process = in_process  # it says RUN_IN_PROCESS = True (see call_in_process)

    def current(self):
        """True while the file is the one that was prepared."""
        try:
            return _identity(os.stat(self.path)) == self.identity
        except OSError:
            return False


def _identity(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class NotPreloaded(Exception):
    """Why a program runs the old way (for the log)."""


def prepare(paths, uid, gid, log):
    """{absolute path: Script} for the programs that qualify among paths
    (relative to the working directory, the qmail home); one log line for
    each, saying what was preloaded or why not."""
    scripts = {}
    for path in dict.fromkeys(os.path.abspath(os.fsdecode(p)) for p in paths):
        try:
            script = examine(path, uid, gid)
        except NotPreloaded as e:
            log("serve: not preloaded: %s: %s" % (path, e))
            continue
        scripts[path] = script
        log("serve: preloaded %s (%d modules imported%s)"
            % (path, script.modules, ", runs in process" if script.in_process else ""))
    return scripts


def examine(path, uid, gid):
    """The Script for path, or NotPreloaded; uid and gid: the sessions' user
    (None: not checked, see _not_writable)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise NotPreloaded(e.strerror) from None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise NotPreloaded("not an executable file")
    first = source.split(b"\n", 1)[0]
    if not first.startswith(b"#!"):
        raise NotPreloaded("no #! line")
    words = first[2:].split()
    if not words or not _this_interpreter(os.fsdecode(words[0])):
        raise NotPreloaded("not a script for %s" % sys.executable)
    if len(words) > 1:
        raise NotPreloaded("interpreter options (%s)" % os.fsdecode(b" ".join(words[1:])))
    _not_writable(path, uid, gid, "the script")
    try:
        code = compile(source, path, "exec", dont_inherit=True)
        tree = ast.parse(source, path)
    except (SyntaxError, ValueError) as e:
        raise NotPreloaded("does not compile: %s" % e) from None
    before = set(sys.modules)
    for name, required in _top_level_imports(tree):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure means: the old way
            if required:
                raise NotPreloaded("import %s failed: %s: %s" % (name, type(e).__name__, e)) \
                    from None
    new = set(sys.modules) - before
    for name in sorted(new):
        module_file = getattr(sys.modules[name], "__file__", None)
        if module_file:
            _not_writable(module_file, uid, gid, "module %s" % name)
    return Script(path, code, os.path.dirname(os.path.realpath(path)), _identity(st), len(new),
                  _says_in_process(tree))


def _this_interpreter(interpreter):
    """The #! names this interpreter: a python in the directory of ours."""
    return (os.path.isabs(interpreter)
            and os.path.dirname(os.path.normpath(interpreter))
            == os.path.dirname(sys.executable)
            and os.path.basename(interpreter) in PYTHON_NAMES)


def _not_writable(path, uid, gid, what):
    """NotPreloaded if the user uid/gid (the sessions') could change path:
    the file, or the directory it is in.  uid None: no check (a process that
    serves one connection keeps nothing past it)."""
    if uid is None:
        return
    for target in (path, os.path.dirname(path)):
        try:
            st = os.stat(target)
        except OSError:
            continue
        if (st.st_mode & 0o002 or st.st_gid == gid and st.st_mode & 0o020
                or st.st_uid == uid and st.st_mode & 0o200):
            raise NotPreloaded("%s is writable by the sessions' user (%s)"
                               % (what, os.fsdecode(target)))


def _says_in_process(tree):
    """The script's own top level assigns RUN_IN_PROCESS = True."""
    return any(isinstance(node, ast.Assign) and node.value.__class__ is ast.Constant
               and node.value.value is True
               and any(isinstance(t, ast.Name) and t.id == "RUN_IN_PROCESS" for t in node.targets)
               for node in tree.body)


def _top_level_imports(tree):
    """(module name, required) for each import the module itself runs:
    those in its body, and in if/try/with blocks of it (not required: they
    may be optional); never those inside functions or classes."""
    found = []

    def visit(nodes, required):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name, required) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    found.append((node.module, required))
                    found.extend(("%s.%s" % (node.module, alias.name), False)
                                 for alias in node.names if alias.name != "*")
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []), False)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, False)

    visit(tree.body, True)
    return found


# ------------------------------------------------------------------ running one


def start(script, argv, env, stdout, stdin_null):
    """Fork a child that runs script as exec would have; returns its pid.
    stdout: the descriptor to be its fd 1; stdin_null: fd 0 is /dev/null
    (an SMTPEXTFORK program) rather than closed (a qmail-spp plugin)."""
    kit = sys.modules.get("qmail_smtpd_py.plugin")
    if kit is not None and kit._kept:
        kit.forget_kept()  # what in-process calls kept is not to be open across a fork
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        return pid
    code = 1
    try:
        code = _run(script, argv, env, stdout, stdin_null)
    except BaseException:  # nothing of the worker may go on in the child
        pass
    os._exit(code)


def _run(script, argv, env, stdout, stdin_null):
    # The descriptors exec would leave: 0 closed or /dev/null, 1, 2; no other.
    if stdout != 1:
        os.dup2(stdout, 1)
    if stdin_null:
        null = os.open("/dev/null", os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
    else:
        os.close(0)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    # Signals as exec leaves them: handlers gone, SIGPIPE ignored, none blocked.
    signal.set_wakeup_fd(-1)
    for signo in HANDLED:
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # The process as a fresh interpreter running the script would see it.
    os.environ.clear()
    os.environb.update(env)
    sys.argv = [os.fsdecode(a) for a in argv]
    sys.path[0] = script.directory
    # New standard streams, as the interpreter makes them at its start.  The
    # worker's are kept referenced: freed, they would flush into the new fds.
    _kept.extend((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin = sys.__stdin__ = _stream(0, "r", "surrogateescape") if stdin_null else None
    sys.stdout = sys.__stdout__ = _stream(1, "w", "surrogateescape")
    sys.stderr = sys.__stderr__ = _stream(2, "w", "backslashreplace")
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=script.path, __builtins__=builtins, __cached__=None)
    sys.modules["__main__"] = main
    atexit._clear()  # the parent's handlers are not the script's
    try:
        exec(script.code, main.__dict__)
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException as e:
        # as the interpreter shows it: the traceback from the script's frame on
        e = e.with_traceback(e.__traceback__.tb_next)
        sys.excepthook(type(e), e, e.__traceback__)
        status = 1
    atexit._run_exitfuncs()
    return _flushed(status)


_kept = []
_STREAM_NAMES = {0: "<stdin>", 1: "<stdout>", 2: "<stderr>"}


def _stream(fd, mode, errors):
    """sys.stdin/stdout/stderr as CPython's create_stdio makes them (UTF-8
    mode: the server's interpreter runs in it, as a plugin's would)."""
    raw = io.FileIO(fd, mode, closefd=False)
    raw.name = _STREAM_NAMES[fd]
    buffered = (io.BufferedReader if mode == "r" else io.BufferedWriter)(raw)
    stream = io.TextIOWrapper(buffered, encoding="utf-8", errors=errors,
                              line_buffering=mode == "w" and os.isatty(fd))
    stream.mode = mode
    return stream


def _exit_status(code):
    """The interpreter's exit status for SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _flushed(status):
    """Flush stdout and stderr as the interpreter does at its end: a failed
    stdout flush makes the status 120."""
    try:
        sys.stdout.flush()
    except Exception as e:  # noqa: BLE001
        status = 120
        try:
            sys.stderr.write("Exception ignored in: %r\n%s: %s\n" % (sys.stdout,
                                                                    type(e).__name__, e))
        except Exception:  # noqa: BLE001
            pass
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    return status


# ------------------------------------------------------------------ in process

# What a call in this process saves and puts back (besides the environment,
# the descriptors 0, 1 and 2, the working directory and the sys attributes).
KEPT_SIGNALS = (*HANDLED, signal.SIGALRM, signal.SIGPIPE)
# A call's output is kept in memory: past this it cannot write (EPERM), as a
# killed plugin's endless output is cut.
MAX_OUTPUT = 16 << 20


class TimeLimit(BaseException):
    """An in-process call's time is up (not an Exception: a plugin's own
    `except Exception` does not stop it)."""


_armed = False  # SIGALRM raises TimeLimit only while a call runs
_cut_at = None  # the output's size when the time was up (what a kill would leave)
_output = None  # the memory file of the call that runs


def _time_is_up(signo, frame):
    global _cut_at
    if _armed:
        if _cut_at is None:  # the output's end (fd 1 shares the memory file's offset)
            _cut_at = os.lseek(_output, 0, os.SEEK_CUR)
        raise TimeLimit()


class NotStarted(OSError):
    """An in-process call could not be set up; the script did not run."""


class Finished:
    """An in-process call that has run, read as a PluginProcess is."""

    __slots__ = ("lines", "outcome")

    def __init__(self, lines, outcome):
        self.lines = lines
        self.outcome = outcome

    def read_lines(self):
        lines, self.lines = self.lines, None
        if lines:
            return Lines(lines)
        return TIMED_OUT if self.outcome is TIMED_OUT else END_OF_INPUT

    def finish(self):
        return self.outcome


def call_in_process(script, argv, env, time_limit):
    """Run a qmail-spp plugin script that says RUN_IN_PROCESS = True here,
    without a fork: what exec would give it is set up for the call and put
    back after it (the environment, argv, sys.path, a fresh __main__, fd 0
    /dev/null, fd 1 a memory file that is then read as the plugin's output,
    fd 2, new sys streams, the working directory, the umask, signal handlers
    and mask).  The time limit is a SIGALRM that raises TimeLimit in the
    script; then, whatever the script does with it, the call counts as
    killed at that moment (its later and unflushed output is dropped).  A C
    call (a blocking look-up, SQLite's busy wait) is only interrupted when it
    returns.  Modules stay imported between calls (what makes a call cheap);
    a script that starts a thread or registers an atexit handler, or that
    its time limit stopped (it may have left a module half-way), runs forked
    from then on in this process.  Returns a Finished; raises NotStarted
    when the call cannot be set up (no descriptor left: it did not run)."""
    try:
        output = os.memfd_create("plugin-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise NotStarted(e.errno, e.strerror) from None
    try:
        try:
            os.ftruncate(output, MAX_OUTPUT)  # sparse: pages come with the writes
            fcntl.fcntl(output, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        except OSError as e:
            raise NotStarted(e.errno, e.strerror) from None
        status, size = _call(script, argv, env, output, time_limit)
        splitter = children.LineSplitter()
        lines = []
        offset = 0
        while offset < size:
            chunk = os.pread(output, min(1 << 20, size - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            lines += splitter.feed(chunk)
        lines += splitter.rest()
    finally:
        os.close(output)
    return Finished(lines, TIMED_OUT if status is None else Exited(status))


def _call(script, argv, env, output, time_limit):
    """(the status of one call, None when its time limit stopped it; the
    size of its output)."""
    global _cut_at, _output
    threads, exits = _threads_started(), atexit._ncallbacks()
    saved_fds = []
    new_streams = ()
    try:
        for fd in (0, 1, 2):
            saved_fds.append(os.dup(fd))
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # O_PATH: needs no read right
    except OSError as e:
        for fd in saved_fds:
            os.close(fd)
        raise NotStarted(e.errno, e.strerror) from None
    umask = os.umask(0o22)
    os.umask(umask)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    environ = dict(os.environb)
    handlers = [(signo, signal.getsignal(signo)) for signo in KEPT_SIGNALS]
    streams = sys.stdin, sys.stdout, sys.stderr
    argv_before, path_before, main_before = sys.argv, sys.path[:], sys.modules.get("__main__")
    excepthook = sys.excepthook
    main = types.ModuleType("__main__")
    _cut_at, _output = None, output
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(output, 1)
        _set_environ(environ, env)
        sys.argv = [os.fsdecode(a) for a in argv]
        sys.path[0] = script.directory
        new_streams = (_stream(1, "w", "surrogateescape"), _stream(2, "w", "backslashreplace"))
        sys.stdin = sys.__stdin__ = None  # as for an exec'd plugin, whose fd 0 is closed
        sys.stdout = sys.__stdout__ = new_streams[0]
        sys.stderr = sys.__stderr__ = new_streams[1]
        main.__dict__.update(__file__=script.path, __builtins__=builtins, __cached__=None)
        sys.modules["__main__"] = main
        kit = sys.modules.get("qmail_smtpd_py.plugin")
        if kit is not None:
            kit._server_pid = (os.getpid(), os.getpid())  # this process is the server
        signal.signal(signal.SIGALRM, _time_is_up)
        status = _exec_limited(script.code, main.__dict__, time_limit)
        if _cut_at is None:
            status = _flushed(status)
        else:  # killed there: what it wrote later, or left in a buffer, is lost
            status = None
            new_streams[0].buffer.raw.close()
    finally:
        # fds first: whatever fails after, the server's own are back
        for fd, saved in enumerate(saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for stream in new_streams:  # closefd=False: marks them closed, no late flush
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        sys.modules["__main__"] = main_before
        sys.argv, sys.excepthook = argv_before, excepthook
        sys.path[:] = path_before
        sys.stdin, sys.stdout, sys.stderr = streams
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
        for signo, handler in handlers:
            if handler is not None:
                signal.signal(signo, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _set_environ(dict(os.environb), environ)  # as the script left it
        os.umask(umask)
        os.fchdir(cwd)
        os.close(cwd)
    size = os.lseek(output, 0, os.SEEK_CUR) if _cut_at is None else _cut_at
    why = ("was stopped at its time limit" if status is None
           else "started a thread" if _threads_started() > threads
           else "registered an atexit handler" if atexit._ncallbacks() > exits else None)
    if why is not None:
        script.in_process = False
        kit = sys.modules.get("qmail_smtpd_py.plugin")
        if kit is not None:
            kit.forget_kept()  # it may have been stopped inside what it kept
        log("preload: %s %s: it runs forked from now on" % (script.path, why))
    return status, size


def _set_environ(now, new):
    """os.environ, which holds now (a dict), becomes new, changing only what
    differs: a session's environment is mostly the server's, and a clear and
    refill would cost more than the call of a simple plugin."""
    environb = os.environb
    for name in now.keys() - new.keys():
        del environb[name]
    for name, value in new.items():
        if now.get(name) != value:
            environb[name] = value


def _exec_limited(code, namespace, time_limit):
    """Run code; its exit status as the interpreter would give it, or None
    when its time limit stopped it."""
    global _armed
    try:
        try:
            if time_limit:
                _armed = True
                # again every 0.1 s: a script that catches BaseException is stopped still
                signal.setitimer(signal.ITIMER_REAL, time_limit, 0.1)
            exec(code, namespace)
        finally:
            _armed = False  # a TimeLimit raised before this line is caught below
            signal.setitimer(signal.ITIMER_REAL, 0)
        return 0
    except TimeLimit:
        return None
    except SystemExit as e:
        return _exit_status(e.code)
    except BaseException as e:
        e = e.with_traceback(e.__traceback__.tb_next)
        sys.excepthook(type(e), e, e.__traceback__)
        return 1


def usable(script, env, base_env):
    """A prepared script can run for this call: unchanged since it was
    prepared, and no PYTHON* variable of the session differs from the
    environment this interpreter started with, nor is set at all when it
    ignored its environment (the launcher's -I): the script's interpreter
    would have obeyed them."""
    if not script.current():
        return False
    isolated = sys.flags.ignore_environment
    for name in set(env) | set(base_env):
        if name.startswith(b"PYTHON") and (isolated and name in env
                                           or env.get(name) != base_env.get(name)):
            return False
    return True


def install(scripts, base_env):
    """Let the children module run these scripts preloaded in this process
    and the workers it forks."""
    children.preloaded.clear()
    children.preloaded.update({os.fsencode(path): (script, base_env)
                               for path, script in scripts.items()})

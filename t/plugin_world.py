"""The reference world with real qmail-spp plugins and SMTPEXTFORK programs.

PluginWorld answers the core's plugin and program requests with real
processes, through the driver's own children module: exec'd (posix_spawn,
as under tcpserver) or, inside `preloaded(...)`, run the way the pool runs
Python scripts it prepared (preload.py: a fork of this process).  Everything
else is the reference world's.  The same session can so be played both
ways and compared, and a plugin's semantics tested without an interpreter
start per call.
"""

import contextlib
import os
import tempfile

from qmail_smtpd_py import children, preload
from qmail_smtpd_py.core.session import Session

from helpers import Result, server_env
from world import World, load_config

SESSION_USER = (65534, 65534)  # whose writes would disqualify a script (nobody)


class PluginWorld(World):
    """World whose plugins and programs are real processes (children.py)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._process = None

    def start_plugin(self, request):
        self.plugin_runs.append((request.argv, request.env))
        self._process, outcome = children.PluginProcess.start(request.argv, request.env,
                                                               request.time_limit)
        return outcome

    def read_plugin(self, request):
        return self._process.read_lines()

    def finish_plugin(self, request):
        process, self._process = self._process, None
        return process.finish()

    def run_program(self, request):
        self.program_runs.append((request.path, request.env))
        return children.run_program(request.path, request.env, request.time_limit)

    def check_password(self, request):
        """A real checkpassword, unless the test gave the answer (checkpassword=)."""
        if self.checkpassword_answer is not None:
            return super().check_password(request)
        self.checkpassword.append(request.data)
        self.checkpassword_envs.append(request.env)
        return children.check_password(request.argv, request.data, request.env)


def run_home(data, home, env=None, args=(), pid=b"77"):
    """One session as the installed server would run it in this qmail home
    (a helpers.Home; env and args as for helpers.run_smtp), played in this
    process: the configuration loaded from the home, plugins, programs and
    checkpassword real processes run in the home (the preloaded ones forked
    from here), the queue the reference world's.  Returns a helpers.Result
    whose err is what the children wrote to stderr, then the session's log."""
    environ = {os.fsencode(k): os.fsencode(v) for k, v in server_env(home, env).items()}
    cfg = load_config(home, environ, args)
    world = PluginWorld(data)
    err = bytearray()
    with contextlib.chdir(home.path), _stderr_captured(err):
        world.play(Session(cfg, environ, pid).run())
    return Result(world.out, world.status, world.queued, bytes(err) + world.err)


@contextlib.contextmanager
def _stderr_captured(into):
    """fd 2 goes to a temporary file while the block runs (children inherit
    it); what was written is then added to the bytearray into."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            into += f.read()


@contextlib.contextmanager
def preloaded(*paths, base_env):
    """Run these Python scripts preloaded (prepared here, as the pool's parent
    prepares them) while the block runs; base_env stands for the pool's
    environment (a session whose PYTHON* variables differ runs exec'd)."""
    scripts = {os.path.abspath(p): preload.examine(os.path.abspath(p), *SESSION_USER)
               for p in paths}
    preload.install(scripts, base_env)
    try:
        yield scripts
    finally:
        children.preloaded.clear()

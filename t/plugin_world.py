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

from qmail_smtpd_py import children, preload

from world import World

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

"""The core cannot do I/O: nothing in qmail_smtpd_py/core reaches a file, a
socket, a process, the clock or the environment.  Everything a client can
see is in core/replies.py.  (core/__init__.py says why.)"""

import ast
import os
import re
import subprocess
import sys

import pytest

import qmail_smtpd_py
import qmail_smtpd_py.core

CORE = os.path.dirname(qmail_smtpd_py.core.__file__)
PACKAGE = os.path.dirname(qmail_smtpd_py.__file__)
CORE_MODULES = sorted(name[:-3] for name in os.listdir(CORE) if name.endswith(".py"))
# The only modules outside the core that the core may import: pure functions.
ALLOWED_IMPORTS = {"__future__", "binascii", "time"}
# I/O modules that importing the core must not load (the interpreter's start loads os).
IO_MODULES = {"select", "selectors", "ssl", "_ssl", "socket", "_socket", "subprocess",
              "signal", "io", "fcntl", "mmap", "pathlib", "tempfile", "shutil"}
IO_BUILTINS = {"open", "input", "print", "__import__", "exec", "eval", "compile"}


def parsed(module):
    """The module's syntax tree, without its `if TYPE_CHECKING:` blocks (never run)."""
    with open(os.path.join(CORE, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    tree.body = [node for node in tree.body if not (
        isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING")]
    return tree


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_nothing_that_does_io(module):
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: another core module
                assert node.level == 1, "%s reaches out of the core" % module
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in ALLOWED_IMPORTS, "%s imports %s" % (module, name)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_calls_no_io_builtin_and_reads_no_clock(module):
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            assert node.id not in IO_BUILTINS, "%s uses %s" % (module, node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "time":
            # time.gmtime(when) converts a given time; reading the clock is a request
            assert node.attr == "gmtime", "%s uses time.%s" % (module, node.attr)


def test_importing_the_core_loads_no_io_module():
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            + "".join("import qmail_smtpd_py.core.%s\n" % m for m in CORE_MODULES if m != "__init__")
            + "print(' '.join(sorted(set(sys.modules) - before)))\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, check=True,
                         text=True).stdout.split()
    assert out, "the core was not imported"
    assert not IO_MODULES & set(out), out
    assert all(name.startswith("qmail_smtpd_py") or name in ALLOWED_IMPORTS for name in out), out


def test_the_driver_side_is_not_imported_by_the_core():
    for module in CORE_MODULES:
        for node in ast.walk(parsed(module)):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                pytest.fail("%s imports %s from outside the core" % (module, node.module))


SMTP_REPLY = re.compile(rb"^[245][0-9][0-9][ -]")


def _reply_like_literals(path):
    """Byte-string constants in a module that look like SMTP replies."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, bytes)
            and SMTP_REPLY.match(node.value)]


@pytest.mark.parametrize("module", sorted(
    name for name in os.listdir(PACKAGE) if name.endswith(".py") and name not in (
        "plugin.py", "plugin_test.py", "metrics.py")) + ["core/" + m + ".py" for m in
                                                         CORE_MODULES if m != "replies"])
def test_no_reply_text_outside_replies(module):
    """plugin.py (for plugin authors), plugin-test (a client) and metrics.py (its status
    lines are HTTP's) are not the SMTP server."""
    assert _reply_like_literals(os.path.join(PACKAGE, module)) == []


def test_replies_module_has_the_texts():
    found = [text for _, text in _reply_like_literals(os.path.join(CORE, "replies.py"))]
    assert b"250 ok\r\n" in found and b"421 unable to read controls (#4.3.0)\r\n" in found

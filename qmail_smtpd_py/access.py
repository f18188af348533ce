"""Can another user reach a file?  The walk the kernel makes to a path.

The SMTP server runs as an unprivileged account (qmaild), so the
interpreter, the installed package, the control files and the plugins must
be reachable by it: every directory on the way searchable, the file itself
readable or executable.  A Python under root's mode-700 home (pyenv's
default) is not, and then tcpserver only logs "unable to run ...: access
denied" for every connection.

`qmail-smtpd-py check --user` asks the kernel itself (os.access in a child
running as that user) and uses steps() to name the directory in the way;
`make install` runs this file as a script with the Python it is about to
use, before the package is installed: standard library only.

    python3 -I qmail_smtpd_py/access.py [--venv]

exits 0 when other users (the "others" permission bits) can run this
interpreter and read its standard library, else prints what is in the way
and exits 1.
"""

import os
import stat
import sys


def steps(path):
    """The paths the kernel looks at to reach path, outermost first: each
    directory on the way, symlinks resolved wherever they occur, ending
    with the file itself (resolved)."""
    parts = os.path.abspath(path).strip("/").split("/")
    seen = []
    for i in range(1, len(parts) + 1):
        real = os.path.realpath("/" + "/".join(parts[:i]))
        real_parts = real.strip("/").split("/")
        for j in range(1, len(real_parts) + 1):
            step = "/" + "/".join(real_parts[:j])
            if step not in seen:
                seen.append(step)
    final = os.path.realpath(path)
    if final in seen:  # the file last: a symlink's target may have come earlier
        seen.remove(final)
    seen.append(final)
    return seen


def blocked(walk, allowed):
    """The first of the steps() walk for which allowed(step, is_last) is false, or None."""
    for n, step in enumerate(walk):
        if not allowed(step, n == len(walk) - 1):
            return step
    return None


def _mode(step):
    try:
        return os.stat(step).st_mode
    except OSError:
        return None


def others_can(need):
    """allowed() for blocked(): directories searchable by others, and the
    file itself with the `need` bits (stat.S_IROTH, S_IXOTH) for others."""
    def allowed(step, last):
        mode = _mode(step)
        if mode is None:
            return False
        if not last or stat.S_ISDIR(mode):
            return bool(mode & stat.S_IXOTH)
        return mode & need == need
    return allowed


def describe(step):
    """'/root (mode 700)' for a message."""
    mode = _mode(step)
    if mode is None:
        return "%s (missing)" % step
    return "%s (mode %o)" % (step, stat.S_IMODE(mode))


def main():
    """make install's test of the interpreter it runs under: the one a venv
    made by it would run (--venv: this venv's python itself, so its own
    directories count too)."""
    if sys.version_info < (3, 11):  # noqa: UP036 - run by whatever python3 make finds
        print("%s is Python %d.%d; qmail-smtpd-py needs 3.11 or later"
              % (sys.executable, *sys.version_info[:2]))
        return 1
    interpreter = sys.executable if "--venv" in sys.argv else sys._base_executable
    checks = [(interpreter, stat.S_IXOTH), (os.__file__, stat.S_IROTH)]
    library = _shared_library()
    if library:
        checks.append((library, stat.S_IROTH))
    for path, need in checks:
        step = blocked(steps(path), others_can(need))
        if step is not None:
            print("%s cannot be %s by other users: %s is in the way" % (
                path, "run" if need == stat.S_IXOTH else "read", describe(step)))
            return 1
    return 0


def _shared_library():
    """libpython, when the interpreter is linked against it."""
    import sysconfig
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    name, directory = sysconfig.get_config_var("LDLIBRARY"), sysconfig.get_config_var("LIBDIR")
    path = os.path.join(directory or "", name or "")
    return path if name and os.path.exists(path) else None


if __name__ == "__main__":
    sys.exit(main())

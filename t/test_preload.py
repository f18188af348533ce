"""Preloaded Python plugins and programs (preload.py) behave as exec'd ones.

The same sessions run both ways through the core with real plugin processes
(plugin_world.PluginWorld): exec'd as under tcpserver, and preloaded as the pool
runs them (prepared in this process, then a fork per call).  Replies, what reached
qmail-queue (headers, environment), the plugins' log lines and exit handling must
be the same; adversarial scripts cover what a fork could change (output without a
final newline, megabytes, stdin, exit statuses, exceptions, signals, os.environ,
grandchildren, time limits, failing imports, random state, atexit).  Then the
qualification rules, and the pool doing it for real.  A script that says
RUN_IN_PROCESS = True runs a third way, inside this process: the sample plugins
(all say so) are compared all three ways, and what an in-process call borrows
from the server is checked to be put back.
"""

import atexit
import os
import re
import signal
import stat
import subprocess
import sys

import pytest
from plugin_world import PluginWorld, preloaded

from qmail_smtpd_py import preload
from qmail_smtpd_py.core.config import Config
from qmail_smtpd_py.core.session import Session

from helpers import SERVER, free_port
from world import BASE_ENV

MODES = ["exec", "preloaded"]
THREE_WAYS = ["exec", "forked", "in-process"]  # preloaded: forked, or in this process
IN_PROCESS = "RUN_IN_PROCESS = True\n"  # the line that lets a script run in this process
PYTHON = sys.executable
ENV = {**BASE_ENV, b"PATH": b"/usr/bin:/bin"}
MESSAGE = (b"HELO client.test\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\n"
           b"RCPT TO:<v@example.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n")


def write_script(directory, name, body):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!%s\n%s" % (PYTHON, body))
    os.chmod(path, 0o755)
    return path


def play(mode, home, sections, data=MESSAGE, env=None, cfg=None, programs=(), base_env=None,
         **world):
    """One session through the core with real plugins (preloaded: as a pool whose
    environment is base_env, default the session's own); returns the world."""
    env = dict(ENV if env is None else env)
    cfg = cfg or Config(greeting=b"mx.test", rcpthosts={b"example.com"}, plugins={
        letter.encode(): [os.fsencode(p) for p in entries] for letter, entries in sections.items()},
        plugin_time_limit=world.pop("spptimeout", None))
    paths = [p for entries in sections.values() for p in entries] + list(programs)
    cwd = os.getcwd()
    os.chdir(home)
    try:
        w = PluginWorld(data, **world)
        if mode != "exec":
            with preloaded(*paths, base_env=env if base_env is None else base_env) as scripts:
                for script in scripts.values():
                    if mode == "forked":
                        script.in_process = False
                    elif mode == "in-process":
                        assert script.in_process, script.path
                w.play(Session(cfg, env, b"77").run())
        else:
            w.play(Session(cfg, env, b"77").run())
    finally:
        os.chdir(cwd)
    return w


def same_both_ways(tmp_path, capfd, sections, modes=MODES, **kw):
    """Play the session each way (exec'd first); assert equal records; return the
    exec'd world and its log."""
    results = []
    for mode in modes:
        capfd.readouterr()
        w = play(mode, str(tmp_path), sections, **kw)
        err = capfd.readouterr().err
        results.append((w, re.sub(r"pid \d+", "pid N", err)))
    (a, a_err), *others = results
    for mode, (b, b_err) in zip(modes[1:], others):
        assert (b.out, b.exit) == (a.out, a.exit), mode
        assert b.queued == a.queued, mode
        assert b.queue_envs == a.queue_envs, mode
        assert b_err == a_err, mode
    return a, a_err


def same_three_ways(tmp_path, capfd, sections, **kw):
    return same_both_ways(tmp_path, capfd, sections, modes=THREE_WAYS, **kw)


# ------------------------------------------------------------------ adversarial scripts

ADVERSARIAL = {
    "no final newline": ("import sys\nsys.stdout.write('P250-first\\nE550 no newline')\n",
                         b"250-first\r\n550 no newline\r\n"),
    "reads stdin": ("import sys\nprint('HX-Stdin: %r' % (sys.stdin,))\nsys.stdin.read()\n",
                    b"250 ok\r\n"),
    "sys.exit(3)": ("import sys\nprint('HX-Exit: 3')\nsys.exit(3)\n", b"250 ok\r\n"),
    "sys.exit(text)": ("import sys\nsys.exit('plugin gives up')\n", b"250 ok\r\n"),
    "raises": ("print('HX-Before: raise', flush=True)\nraise ValueError('broken plugin')\n",
               b"250 ok\r\n"),
    "os._exit(120)": ("import os\nos._exit(120)\n",
                      b"451 qmail-spp failure: %s: can't execute (#4.3.0)\r\n"),
    "SIGSEGV": ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
                b"451 qmail-spp failure: %s: child crashed (#4.3.0)\r\n"),
    "changes os.environ": ("import os\nos.environ['TCPREMOTEIP'] = '6.6.6.6'\n"
                           "os.environ.pop('TCPLOCALHOST')\nprint('SPLUGINVAR=set')\n",
                           b"250 ok\r\n"),
    "grandchild holds stdout": ("import subprocess\nsubprocess.Popen(['sleep', '0.5'])\n"
                                "print('HX-Grandchild: started')\n", b"250 ok\r\n"),
    "atexit": ("import atexit\natexit.register(lambda: print('HX-Atexit: ran'))\n",
               b"250 ok\r\n"),
    "stdout closed at exit": ("import os, sys\nprint('HX-Lost: buffered')\nos.close(1)\n",
                              b"451 qmail-spp failure: %s: can't execute (#4.3.0)\r\n"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_script_is_the_same_preloaded(tmp_path, capfd, name):
    body, reply = ADVERSARIAL[name]
    path = write_script(str(tmp_path), "p", body)
    w, err = same_both_ways(tmp_path, capfd, {"r": [path]})
    expected = reply % path.encode() if b"%s" in reply else reply
    assert w.out.split(b"\r\n", 3)[3].startswith(expected), w.out  # the first RCPT's reply
    if name == "raises":
        assert "ValueError: broken plugin" in err and "Traceback" in err
    if name == "sys.exit(text)":
        assert "plugin gives up" in err
    if name == "changes os.environ":
        assert w.queue_envs[0][b"PLUGINVAR"] == b"set"
        assert w.queue_envs[0][b"TCPREMOTEIP"] == b"127.0.0.1"  # its own env only
    if name == "atexit":
        assert b"X-Atexit: ran\n" in w.queued[0].message
    if name == "reads stdin":
        assert b"X-Stdin: None\n" in w.queued[0].message and "AttributeError" in err


def test_megabytes_of_output_are_the_same(tmp_path, capfd):
    path = write_script(str(tmp_path), "p", "import sys\nsys.stdout.write('P250-x\\n' * 300000)\n")
    w, _ = same_both_ways(tmp_path, capfd, {"r": [path]})
    assert w.out.count(b"250-x\r\n") == 600000  # two RCPTs


def test_sleeping_past_spptimeout_is_killed_both_ways(tmp_path, capfd):
    path = write_script(str(tmp_path), "p", "import time\nprint('P250-early', flush=True)\n"
                                              "time.sleep(30)\n")
    w, _ = same_both_ways(tmp_path, capfd, {"r": [path]}, spptimeout=1)
    assert b"250-early\r\n451 qmail-spp failure: %s: child crashed (#4.3.0)\r\n" \
        % path.encode() in w.out


def test_extfork_program_is_the_same_preloaded(tmp_path, capfd):
    program = write_script(str(tmp_path), "xf", "import os, sys\n"
                           "print('seen', os.environ['REMOTERCPT'], sys.argv)\n"
                           "sys.exit(100 if os.environ['REMOTERCPT'].startswith('v@') else 0)\n")
    env = {**ENV, b"SMTPEXTFORK": os.fsencode(program)}
    w, err = same_both_ways(tmp_path, capfd, {}, env=env, programs=[program])
    assert b"554 sorry, permanent envelope failure due to local policy (#5.7.1)\r\n" in w.out
    assert "seen v@example.com ['%s']" % program in err  # stdout into the log, argv as exec


def test_a_failing_import_runs_the_old_way(tmp_path, capfd):
    path = write_script(str(tmp_path), "p", "import no_such_module_here\n")
    with pytest.raises(preload.NotPreloaded, match="import no_such_module_here failed"):
        preload.examine(path, 65534, 65534)
    w = play("exec", str(tmp_path), {"r": [path]})
    assert b"250 ok" in w.out and w.exit == 0


def test_random_state_differs_in_each_call(tmp_path, capfd):
    path = write_script(str(tmp_path), "p", "import random, secrets, tempfile, uuid\n"
                        "print('HX-Random: %s %s %s %s' % (random.random(), uuid.uuid4(),\n"
                        "      secrets.token_hex(8), next(tempfile._get_candidate_names())))\n")
    w = play("preloaded", str(tmp_path), {"r": [path]})
    values = re.findall(rb"X-Random: (.*)\n", w.queued[0].message)
    assert len(values) == 2 and values[0] != values[1]
    first, second = (v.split() for v in values)
    assert all(a != b for a, b in zip(first, second))


def test_the_parents_atexit_handlers_do_not_run_in_a_call(tmp_path, capfd):
    marker = tmp_path / "parent-atexit"
    handler = lambda: marker.write_text("ran")  # noqa: E731
    atexit.register(handler)
    try:
        path = write_script(str(tmp_path), "p", "print('N')\n")
        play("preloaded", str(tmp_path), {"r": [path]})
        assert not marker.exists()
    finally:
        atexit.unregister(handler)


def test_session_python_variables_run_the_old_way(tmp_path):
    path = write_script(str(tmp_path), "p", "import sys\nprint('HX-Flags: %d' % sys.flags.optimize)\n")
    w = play("preloaded", str(tmp_path), {"r": [path]}, env={**ENV, b"PYTHONOPTIMIZE": b"1"},
             base_env=ENV)
    assert b"X-Flags: 1\n" in w.queued[0].message  # exec'd: the variable took effect


def test_a_changed_script_runs_the_old_way(tmp_path):
    path = write_script(str(tmp_path), "p", "print('HX-Version: 1')\n")
    with preloaded(path, base_env=ENV):
        write_script(str(tmp_path), "p", "print('HX-Version: 22')\n")
        cwd = os.getcwd()
        os.chdir(str(tmp_path))
        try:
            w = PluginWorld(MESSAGE).play(Session(Config(greeting=b"mx.test", plugins={
                b"r": [os.fsencode(path)]}), dict(ENV), b"77").run())
        finally:
            os.chdir(cwd)
    assert b"X-Version: 22\n" in w.queued[0].message


# ------------------------------------------------------------------ what qualifies


def raw_file(directory, name, text, mode=0o755):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_qualification(tmp_path):
    d = str(tmp_path)
    ok = write_script(d, "ok", "print('N')\n")
    assert preload.examine(ok, 65534, 65534).path == ok
    cases = {
        raw_file(d, "sh", "#!/bin/sh\necho N\n"): "not a script for",
        raw_file(d, "env", "#!/usr/bin/env python3\nprint('N')\n"): "not a script for",
        raw_file(d, "opts", "#!%s -I\nprint('N')\n" % PYTHON): "interpreter options",
        raw_file(d, "noexec", "#!%s\nprint('N')\n" % PYTHON, 0o644): "not an executable",
        raw_file(d, "broken", "#!%s\nprint(\n" % PYTHON): "does not compile",
        raw_file(d, "writable", "#!%s\nprint('N')\n" % PYTHON, 0o757): "writable by",
    }
    for path, why in cases.items():
        with pytest.raises(preload.NotPreloaded, match=why):
            preload.examine(path, 65534, 65534)
    with pytest.raises(preload.NotPreloaded, match="writable by the sessions' user"):
        preload.examine(ok, os.stat(ok).st_uid, 65534)  # the owner may write it


def test_a_writable_module_is_not_preloaded(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "local_helper_mod.py").write_text("X = 1\n")
    os.chmod(lib, 0o777)
    monkeypatch.syspath_prepend(str(lib))
    path = write_script(str(tmp_path), "p", "import local_helper_mod\n")
    with pytest.raises(preload.NotPreloaded, match="module local_helper_mod is writable"):
        preload.examine(path, 65534, 65534)


def test_only_top_level_imports_are_done_in_the_parent(tmp_path):
    path = write_script(str(tmp_path), "p", "import json\n"
                        "try:\n    import no_such_optional_module\nexcept ImportError:\n    pass\n"
                        "def main():\n    import no_such_module_in_a_function\n")
    assert preload.examine(path, 65534, 65534).path == path


# ------------------------------------------------------------------ one process per connection


FORKED = "import sys\nprint('HX-Forked: %s' % ('qmail_smtpd_py.driver' in sys.modules))\n"


@pytest.mark.parametrize("env,forked", [
    ({}, b"True"),                                  # prepared at its first call
    ({"NOPRELOAD": ""}, b"False"),                  # turned off
    ({"PYTHONWARNINGS": "ignore"}, b"False"),       # the server ignored it (-I); a plugin would not
])
def test_the_per_connection_server_prepares_python_plugins(make_home, env, forked):
    """The installed server over pipes, as under tcpserver: a Python [rcpt] plugin runs
    as a fork of the server (it finds the server's modules loaded) at both RCPTs."""
    from helpers import run_smtp
    home = make_home()
    write_script(home.path, "forked", FORKED)
    home.control("smtpplugins", "[rcpt]\nforked\n")
    res = run_smtp(MESSAGE, home=home, env=env)
    assert res.status == 0 and b"250 ok" in res.out, res.out
    (message,) = res.queued
    assert message.message.count(b"X-Forked: " + forked + b"\n") == 2, message.message


@pytest.mark.parametrize("env,stdout", [({}, b"/memfd:plugin-output"), ({"NOPRELOAD": ""}, b"pipe:")])
def test_the_per_connection_server_runs_a_marked_plugin_in_process(make_home, env, stdout):
    """The installed server over pipes: a script that says RUN_IN_PROCESS writes into
    the server's memory file, not a pipe (NOPRELOAD: exec'd as ever)."""
    from helpers import run_smtp
    home = make_home()
    write_script(home.path, "inproc", IN_PROCESS + "import os\n"
                 "print('HX-Stdout: %s' % os.readlink('/proc/self/fd/1'))\n")
    home.control("smtpplugins", "[rcpt]\ninproc\n")
    res = run_smtp(MESSAGE, home=home, env=env)
    assert res.status == 0 and b"250 ok" in res.out, res.out
    (message,) = res.queued
    assert message.message.count(b"X-Stdout: " + stdout) == 2, message.message


def test_a_program_that_is_no_python_script_costs_no_import():
    """The #! line decides before preload.py (an import of some 15 ms) is loaded."""
    code = ("import sys\nfrom qmail_smtpd_py import children\n"
            "children.prepare_on_first_use = {}\n"
            "print(children._preloaded(b'/bin/true', {}), children._preloaded(b'/nonesuch', {}),"
            " 'qmail_smtpd_py.preload' in sys.modules)\n")
    out = subprocess.run([PYTHON, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "None None False\n"


# ------------------------------------------------------------------ in the pool, for real


@pytest.mark.skipif(os.geteuid() != 0, reason="the pool drops to nobody: needs root")
@pytest.mark.parametrize("mode", ["forked", "in-process", "off"])
def test_the_pool_preloads_a_python_plugin(tcpservers, tmp_path, mode):
    """serve as nobody with a Python [rcpt] plugin: logged as preloaded, it runs
    (the interpreter under /root is not readable by nobody, so exec'd it could not),
    in the worker when it says RUN_IN_PROCESS; NOPRELOAD set: not preloaded, and the
    plugin cannot be exec'd as nobody."""
    off = mode == "off"
    import tempfile
    root = tempfile.mkdtemp(prefix="qsmtpd-preload-")
    os.chmod(root, 0o755)
    for sub in ("control", "plugins", "queue"):
        os.mkdir(os.path.join(root, sub))
    with open(os.path.join(root, "control", "me"), "w") as f:
        f.write("mx.example.org\n")
    write_script(os.path.join(root, "plugins"), "hello",
                 (IN_PROCESS if mode == "in-process" else "")
                 + "import os\nprint('HX-Hello: uid %d, stdout %s'\n"
                 "      % (os.getuid(), os.readlink('/proc/self/fd/1').split(':')[0]))\n")
    with open(os.path.join(root, "control", "smtpplugins"), "w") as f:
        f.write("[rcpt]\nplugins/hello\n")
    queue = os.path.join(root, "qmail-queue")
    with open(queue, "w") as f:
        f.write('#!/bin/sh\ncat > "%s/queue/$$"\ncat <&1 >/dev/null\n' % root)
    os.chmod(queue, 0o755)
    os.chmod(os.path.join(root, "queue"), 0o777)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    env = {"PATH": "/usr/bin:/bin", "QMAILHOME": root, "QMAILQUEUE": queue}
    if off:
        env["NOPRELOAD"] = ""
    port = free_port()
    p, log = tcpservers.spawn([SERVER, "serve", "-v", "-H", "-l", "mx.test", "-u", "65534",
                               "-g", "65534", "127.0.0.1", str(port)], env)
    assert tcpservers.wait_listening(p, log), log.read_bytes()
    text = log.read_bytes()
    if off:
        assert b"NOPRELOAD" in text and b"preloaded" not in text.replace(b"NOPRELOAD", b"")
    else:
        assert b"serve: preloaded %s/plugins/hello" % root.encode() in text
        assert (b"runs in process" in text) == (mode == "in-process")
    reply = smtplib_local_session(port)
    if off:
        assert b"can't execute" in reply  # exec'd as nobody: the interpreter is unreadable
    else:
        assert reply.startswith(b"250")
        (name,) = os.listdir(os.path.join(root, "queue"))
        with open(os.path.join(root, "queue", name), "rb") as f:
            stdout = b"/memfd" if mode == "in-process" else b"pipe"
            assert b"X-Hello: uid 65534, stdout %s\n" % stdout in f.read()


def smtplib_local_session(port):
    """One message through the pool: the reply to its RCPT (bytes, code first)."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.mail("a@b.c")
        code, text = s.rcpt("u@example.com")
        if code == 250:
            s.data(b"Subject: t\r\n\r\nhi\r\n")
    return b"%d %s" % (code, text)


def test_sample_plugin_scripts_qualify():
    """Every sample plugin installed with the package is a script for this interpreter."""
    bin_dir = os.path.dirname(PYTHON)
    for name in ("tarpit", "authlog", "ifauthnext", "badhelo", "mfdnscheck", "rbl",
                 "greylist", "rcptcheck", "ratelimit"):
        path = os.path.join(bin_dir, name)
        st = os.stat(path)
        assert stat.S_ISREG(st.st_mode)
        assert preload.examine(path, 65534, 65534).path == path, name


# ------------------------------------------------------------------ the sample plugins


def sample(name):
    return os.path.join(os.path.dirname(PYTHON), name)


def auth_config(sections):
    from qmail_smtpd_py.core.auth import parse_mode
    return Config(greeting=b"mx.test", rcpthosts={b"example.com"}, auth_mode=parse_mode(b""),
                  checkpassword=(b"/cp",), plugins={
                      letter.encode(): [os.fsencode(p) for p in entries]
                      for letter, entries in sections.items()})


AUTH_MESSAGE = b"EHLO client.test\r\nAUTH PLAIN AGpvZQBzZWNyZXQ=\r\n" + MESSAGE.split(b"\r\n", 1)[1]


@pytest.fixture
def dns():
    from dnsserver import DNSServer
    with DNSServer({"good.test": {"MX": ["10 mx.good.test."]},
                    "1.0.0.127.zen.test": {"A": ["127.0.0.2"], "TXT": ['"listed here"']}}) as s:
        yield s


def test_tarpit_ifauthnext_authlog_are_the_same_three_ways(tmp_path, capfd):
    sections = {"a": [sample("authlog")], "r": [sample("ifauthnext"), sample("tarpit")]}
    env = {**ENV, b"TARPITCOUNT": b"1", b"TARPITDELAY": b"0"}
    w, err = same_three_ways(tmp_path, capfd, sections, data=AUTH_MESSAGE, env=env,
                            cfg=auth_config(sections), checkpassword=lambda data: 0)
    assert "smtp-login: Login: <joe>, method=plain" in err
    assert len(w.queued) == 1
    w, _ = same_three_ways(tmp_path, capfd, {"r": [sample("tarpit")]}, env=env)
    assert len(w.queued) == 1


def test_badhelo_is_the_same_three_ways(tmp_path, capfd):
    os.mkdir(tmp_path / "control")
    (tmp_path / "control" / "badhelo").write_text(".spammers.test\n")
    w, err = same_three_ways(tmp_path, capfd, {"h": [sample("badhelo")]},
                            data=b"HELO mx.spammers.test\r\nQUIT\r\n")
    assert w.out.endswith(b"553 sorry, your HELO is forbidden (#5.7.1)\r\n")
    assert "refused HELO mx.spammers.test" in err


@pytest.mark.parametrize("sender, reply", [(b"a@good.test", b"250 ok"),
                                           (b"a@nowhere.test", b"550 sorry, envelope sender")])
def test_mfdnscheck_is_the_same_three_ways(tmp_path, capfd, dns, sender, reply):
    env = {**ENV, b"DNSCACHEIP": dns.cacheip.encode(), b"DNSTIMEOUT": b"2"}
    w, _ = same_three_ways(tmp_path, capfd, {"m": [sample("mfdnscheck")]}, env=env,
                          data=b"MAIL FROM:<" + sender + b">\r\nQUIT\r\n")
    assert w.out.split(b"\r\n")[1].startswith(reply)


def test_rbl_is_the_same_three_ways(tmp_path, capfd, dns):
    env = {**ENV, b"DNSCACHEIP": dns.cacheip.encode(), b"RBL_ZONES": b"zen.test"}
    w, err = same_three_ways(tmp_path, capfd, {"m": [sample("rbl")]}, env=env,
                            data=b"MAIL FROM:<a@good.test>\r\nQUIT\r\n")
    assert b"listed here" in w.out and "zen.test" in err


def test_greylist_is_the_same_three_ways(tmp_path, capfd):
    results = []
    for mode in THREE_WAYS:  # each way with a database of its own, from scratch
        db = tmp_path / ("greylist-%s.sqlite3" % mode)
        capfd.readouterr()
        w = play(mode, str(tmp_path), {"r": [sample("greylist")]},
                 env={**ENV, b"GREYLIST_DB": b"greylist.sqlite3"})
        os.rename(tmp_path / "greylist.sqlite3", db)
        results.append((w.out, re.sub(r"pid \d+", "pid N", capfd.readouterr().err)))
    assert results[0] == results[1] == results[2]
    assert b"451 greylisted, please try again later (#4.7.1)" in results[0][0]


def test_rcptcheck_is_the_same_three_ways(tmp_path, capfd):
    from test_recipients import spec_site
    site = spec_site(str(tmp_path / "site"), qmail=str(tmp_path))
    env = {**ENV, b"RCPTCHECK_PASSWD": site.passwd_file(), b"QMAILHOME": os.fsencode(tmp_path)}
    w, err = same_three_ways(tmp_path, capfd, {"r": [sample("rcptcheck")]}, env=env,
                            cfg=Config(greeting=b"mx.test", rcpthosts={b"example.org"}, plugins={
                                b"r": [os.fsencode(sample("rcptcheck"))]}),
                            data=b"MAIL FROM:<a@b.c>\r\nRCPT TO:<joe@example.org>\r\n"
                                 b"RCPT TO:<joe-nosuch@example.org>\r\nQUIT\r\n")
    assert b"550 sorry, no mailbox here by that name (#5.1.1)" in w.out
    assert "refused <joe-nosuch@example.org>" in err


def test_ratelimit_link_without_redis_is_the_same_three_ways(tmp_path, capfd):
    link = tmp_path / "ratelimit-rcpt"
    link.symlink_to(sample("ratelimit"))
    w, err = same_three_ways(tmp_path, capfd, {"r": [str(link)]},
                            env={**ENV, b"RATELIMIT_RECIPIENTS": b"1/60"})
    assert len(w.queued) == 1 and "RATELIMIT_REDIS" in err


def test_preloaded_calls_are_forks_not_execs(tmp_path):
    """The check that the other tests compare two different things: preloaded, the
    plugin's process is a fork of this one (its command line is ours)."""
    path = write_script(str(tmp_path), "p", "with open('/proc/self/cmdline', 'rb') as f:\n"
                        "    print('HX-Cmdline: %s' % f.read().split(b'\\0')[1].decode())\n")
    seen = {mode: re.findall(rb"X-Cmdline: (.*)\n", play(mode, str(tmp_path),
                                                        {"r": [path]}).queued[0].message)
            for mode in MODES}
    assert seen["exec"] == [path.encode()] * 2
    with open("/proc/self/cmdline", "rb") as f:
        ours = f.read().split(b"\0")[1]
    assert seen["preloaded"] == [ours] * 2


# ------------------------------------------------------------------ in this process

# The adversarial scripts an in-process call must also give as exec does (the
# others end or change the process itself: no script that says RUN_IN_PROCESS may).
SAME_IN_PROCESS = ["no final newline", "reads stdin", "sys.exit(3)", "sys.exit(text)",
                   "raises", "changes os.environ"]


@pytest.mark.parametrize("name", SAME_IN_PROCESS)
def test_adversarial_script_is_the_same_in_process(tmp_path, capfd, name):
    body, reply = ADVERSARIAL[name]
    path = write_script(str(tmp_path), "p", IN_PROCESS + body)
    w, err = same_both_ways(tmp_path, capfd, {"r": [path]}, modes=["exec", "in-process"])
    assert w.out.split(b"\r\n", 3)[3].startswith(reply), w.out


def test_megabytes_of_output_are_the_same_in_process(tmp_path, capfd):
    path = write_script(str(tmp_path), "p", IN_PROCESS
                        + "import sys\nsys.stdout.write('P250-x\\n' * 300000)\n")
    w, _ = same_both_ways(tmp_path, capfd, {"r": [path]}, modes=["exec", "in-process"])
    assert w.out.count(b"250-x\r\n") == 600000


def test_an_in_process_call_runs_here_and_puts_everything_back(tmp_path):
    """The call runs in this process (its pid is ours), fresh globals each time;
    fd 1 writes are its output (not ours), fd 0 reads nothing; what it changes of
    the process is put back."""
    path = write_script(str(tmp_path), "p", IN_PROCESS + (
        "import os, signal, sys\n"
        "try:\n    calls += 1\nexcept NameError:\n    calls = 1\n"
        "os.write(1, b'HX-Raw: pid %d calls %d\\n' % (os.getpid(), calls))\n"
        "print('HX-Stdin: %r %r' % (sys.stdin, os.read(0, 10)))\n"
        "print('HX-Argv: %s' % sys.argv[0])\n"
        "os.environ['HOME'] = '/nowhere'\nos.chdir('/')\nos.umask(0o077)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\nsys.argv.append('x')\n"))
    environ, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    handler, umask = signal.getsignal(signal.SIGHUP), os.umask(0o022)
    os.umask(umask)
    w = play("in-process", str(tmp_path), {"r": [path]})
    message = w.queued[0].message
    assert message.count(b"X-Raw: pid %d calls 1\n" % os.getpid()) == 2, message
    assert b"X-Stdin: None b''\n" in message and b"X-Argv: %s\n" % path.encode() in message
    assert dict(os.environ) == environ and os.getcwd() == cwd and sys.argv == argv
    assert signal.getsignal(signal.SIGHUP) == handler and os.umask(umask) == umask


def test_the_time_limit_stops_an_in_process_call(tmp_path, capfd):
    """SPPTIMEOUT: the same reply as for a killed process; a plugin's
    `except Exception` does not stop it; the script then runs forked."""
    path = write_script(str(tmp_path), "p", IN_PROCESS + (
        "import time\nprint('HX-Before: sleep', flush=True)\n"
        "try:\n    time.sleep(30)\nexcept Exception:\n    print('HX-Caught: it')\n"))
    with preloaded(path, base_env=ENV) as scripts:
        cwd = os.getcwd()
        os.chdir(str(tmp_path))
        try:
            w = PluginWorld(MESSAGE).play(Session(Config(greeting=b"mx.test", plugins={
                b"r": [os.fsencode(path)]}, plugin_time_limit=0.3), dict(ENV), b"77").run())
        finally:
            os.chdir(cwd)
        assert not scripts[path].in_process
    assert w.out.count(b"451 qmail-spp failure: %s: child crashed (#4.3.0)\r\n"
                       % path.encode()) == 2, w.out
    err = capfd.readouterr().err
    assert "was stopped at its time limit: it runs forked from now on" in err
    assert w.err.count(b"killed after its time limit of 0.3s") == 2


@pytest.mark.parametrize("body, why", [
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(0.2,)).start()\n",
     "started a thread"),
    ("import atexit\natexit.register(print, 'HX-Atexit: ran')\n",
     "registered an atexit handler"),
], ids=["thread", "atexit"])
def test_a_script_that_changes_the_process_runs_forked_after(tmp_path, capfd, body, why):
    path = write_script(str(tmp_path), "p", IN_PROCESS + body
                        + "import os\nprint('HX-Pid: %d' % os.getpid())\n")
    try:
        w = play("in-process", str(tmp_path), {"r": [path]})
    finally:
        atexit.unregister(print)  # what the in-process call left in this process
    pids = [int(pid) for pid in re.findall(rb"X-Pid: (\d+)\n", w.queued[0].message)]
    assert pids[0] == os.getpid() and pids[1] != os.getpid(), pids  # the second call: a fork
    assert capfd.readouterr().err.count(why + ": it runs forked from now on") == 1
    if why.startswith("registered"):
        assert w.queued[0].message.count(b"X-Atexit: ran\n") == 1  # the forked call's own


def test_without_the_marker_a_script_is_not_run_in_process(tmp_path):
    d = str(tmp_path)
    assert preload.examine(write_script(d, "yes", IN_PROCESS), 65534, 65534).in_process
    for name, body in [("no", "print('N')\n"), ("false", "RUN_IN_PROCESS = False\n"),
                       ("nested", "if True:\n    RUN_IN_PROCESS = True\n"),
                       ("function", "def f():\n    RUN_IN_PROCESS = True\n")]:
        assert not preload.examine(write_script(d, name, body), 65534, 65534).in_process, name


def test_greylist_in_process_keeps_its_database_until_it_is_replaced(tmp_path):
    """Run in process, greylist keeps its connection between calls; a database an
    administrator removed is made anew (not written on the removed file)."""
    env = {**ENV, b"GREYLIST_DB": b"greylist.sqlite3"}
    for _ in range(2):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(tmp_path / ("greylist.sqlite3" + suffix)):
                os.remove(tmp_path / ("greylist.sqlite3" + suffix))
        w = play("in-process", str(tmp_path), {"r": [sample("greylist")]}, env=env)
        assert w.out.count(b"451 greylisted, please try again later (#4.7.1)") == 2
        assert os.path.exists(tmp_path / "greylist.sqlite3")


def test_what_in_process_calls_kept_is_closed_before_a_fork(tmp_path, capfd):
    """greylist in process keeps its SQLite connection; a forked call of it in the same
    process then works on the same database (SQLite breaks in a child forked with a
    connection open: "locking protocol"), because the kept connection is closed first."""
    env = {**ENV, b"GREYLIST_DB": b"greylist.sqlite3"}
    from qmail_smtpd_py import plugin
    for mode in ("in-process", "forked"):
        w = play(mode, str(tmp_path), {"r": [sample("greylist")]}, env=env)
        assert w.out.count(b"451 greylisted, please try again later (#4.7.1)") == 2, mode
        assert any(key[0] == "greylist" for key in plugin._kept) == (mode == "in-process")
    err = capfd.readouterr().err
    assert "cannot use" not in err and err.count("greylisted (first seen") == 4, err


@pytest.mark.parametrize("body", [
    # unflushed output when the time is up: a killed process loses it
    "import time\nprint('E451 plugin says no')\ntime.sleep(30)\n",
    # the limit caught and the script carrying on: killed then, it could not
    "import time\ntry:\n    time.sleep(30)\nexcept BaseException:\n    pass\n"
    "print('E451 plugin says no', flush=True)\n",
], ids=["unflushed", "caught"])
def test_at_its_time_limit_an_in_process_call_ends_as_a_killed_one(tmp_path, body):
    path = write_script(str(tmp_path), "p", IN_PROCESS + body)
    outs = {mode: play(mode, str(tmp_path), {"r": [path]}, spptimeout=0.3).out
            for mode in ("exec", "in-process")}
    assert outs["in-process"] == outs["exec"]
    assert b"plugin says no" not in outs["exec"]
    assert outs["exec"].count(b"child crashed (#4.3.0)") == 2


def test_in_process_calls_leave_sys_path_as_it_was(tmp_path):
    path = write_script(str(tmp_path), "p", IN_PROCESS
                        + "import os, sys\nsys.path.insert(0, os.path.dirname(__file__))\n")
    before = list(sys.path)
    play("in-process", str(tmp_path), {"r": [path]})
    assert sys.path == before


def test_in_process_output_is_bounded(tmp_path):
    """Past MAX_OUTPUT (16 MiB) a call cannot write: memory stays bounded."""
    path = write_script(str(tmp_path), "p", IN_PROCESS + (
        "import os\nchunk = b'P250-' + b'x' * (1 << 20) + b'\\n'\n"
        "try:\n    for _ in range(20):  # 20 MiB\n        os.write(1, chunk)\n"
        "except OSError as e:\n    os.write(1, b'HX-Stopped: %s\\n' % e.strerror.encode())\n"))
    w = play("in-process", str(tmp_path), {"r": [path]}, data=MESSAGE.replace(
        b"RCPT TO:<v@example.com>\r\n", b""))
    assert 0 < w.out.count(b"\r\n250-x") <= preload.MAX_OUTPUT >> 20

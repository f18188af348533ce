"""`qmail-smtpd-py plugin-test`, end to end: the installed program runs a plugin under
the installed server and prints the transcript (C: client, S: server, L: log, Q: queue,
# notes).  Plugins are small /bin/sh scripts written into the test's directory, or the
installed samples called by name.
"""

import os
import re
import subprocess
import time

import pytest

from helpers import SERVER, norm, require_server


def plugin_test(*args, cwd, stdin=None, env=None, timeout=60):
    """Run `qmail-smtpd-py plugin-test ARGS`; (exit status, stdout lines, stderr)."""
    require_server()
    environ = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    environ.update(env or {})
    p = subprocess.run([SERVER, "plugin-test", *args], cwd=str(cwd), env=environ,
                       input=stdin, capture_output=True, timeout=timeout, check=False)
    out = norm(p.stdout).decode("utf-8", "replace")
    return p.returncode, out.splitlines(), p.stderr.decode("utf-8", "replace")


def sh_plugin(directory, name, body, mode=0o755):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)
    return path


def client_and_server(lines):
    """The transcript without log lines (the server's own carry pids)."""
    return [line for line in lines if not line.startswith("L: ")]


MESSAGE = ["C: From: <sender@example.org>",
           "C: To: <postmaster@localhost>",
           "C: Subject: qmail-smtpd-py plugin-test",
           "C: ",
           "C: A test message from qmail-smtpd-py plugin-test.",
           "C: ."]
EHLO = ["C: EHLO client.example", "S: 250-localhost", "S: 250-PIPELINING", "S: 250 8BITMIME"]


def test_default_session(tmp_path):
    plug = sh_plugin(tmp_path, "seen", 'echo "seen $SMTPRCPTTO count=$SMTPRCPTCOUNT" >&2\n'
                                       'echo "P250-rcpt $SMTPRCPTTO"\n'
                                       'echo "HX-Plugin: yes"\n'
                                       'echo "Cchanged@localhost"')
    code, lines, err = plugin_test("seen", cwd=tmp_path)
    assert (code, err) == (0, "")
    assert client_and_server(lines) == [
        "# [rcpt] %s" % plug,
        "S: 220 localhost ESMTP",
        *EHLO,
        "C: MAIL FROM:<sender@example.org>",
        "S: 250 ok",
        "C: RCPT TO:<postmaster@localhost>",
        "S: 250-rcpt postmaster@localhost",
        "S: 250 ok",
        "C: DATA",
        "S: 354 go ahead",
        *MESSAGE,
        "S: 250 ok <TIME> qp <PID>",
        "Q: from <sender@example.org> to <changed@localhost>",
        "Q: Received: from unknown (HELO client.example) (127.0.0.1)",
        "Q:   by localhost with SMTP; <DATE>",
        "Q: X-Plugin: yes",
        "Q: From: <sender@example.org>",
        "Q: To: <postmaster@localhost>",
        "Q: Subject: qmail-smtpd-py plugin-test",
        "C: QUIT",
        "S: 221 localhost",
        "# server exit status 0"]
    # The plugin's log line comes before the reply it delays.
    assert lines.index("L: seen postmaster@localhost count=0") < lines.index(
        "S: 250-rcpt postmaster@localhost")


def test_arguments_make_a_quoted_shell_entry(tmp_path):
    plug = sh_plugin(tmp_path, "args", """printf 'E550 '; printf '%s|' "$@"; echo""")
    code, lines, _ = plugin_test("--section", "mail", plug, "a b", "it's", "$HOME", "-x",
                                 cwd=tmp_path)
    assert code == 0
    assert lines[0] == "# [mail] :%s 'a b' 'it'\"'\"'s' '$HOME' -x" % plug
    assert "S: 550 a b|it's|$HOME|-x|" in lines


def test_several_sections_and_options(tmp_path):
    sh_plugin(tmp_path, "where", 'echo "P250-$SMTPHELOHOST/$SMTPMAILFROM/$SMTPRCPTTO"')
    code, lines, _ = plugin_test("--section", "helo", "--section=mail", "--helo", "h.test",
                                 "--from", "", "--to", "a@x.test", "--to=b@y.test", "./where",
                                 cwd=tmp_path)
    assert code == 0
    shown = client_and_server(lines)
    assert shown[:2] == ["# [helo] %s/where" % tmp_path, "# [mail] %s/where" % tmp_path]
    assert shown[3:] == [
        "C: EHLO h.test", "S: 250-h.test//", "S: 250-localhost", "S: 250-PIPELINING",
        "S: 250 8BITMIME",
        "C: MAIL FROM:<>", "S: 250-h.test//", "S: 250 ok",
        "C: RCPT TO:<a@x.test>", "S: 250 ok",     # rcpthosts lists the recipients' domains
        "C: RCPT TO:<b@y.test>", "S: 250 ok",
        "C: DATA", "S: 354 go ahead",
        "C: To: <a@x.test>, <b@y.test>",           # no From: for the null sender
        "C: Subject: qmail-smtpd-py plugin-test", "C: ",
        "C: A test message from qmail-smtpd-py plugin-test.", "C: .",
        "S: 250 ok <TIME> qp <PID>",
        "Q: from <> to <a@x.test> <b@y.test>",
        "Q: Received: from unknown (HELO h.test) (127.0.0.1)",
        "Q:   by localhost with SMTP; <DATE>",
        "Q: To: <a@x.test>, <b@y.test>", "Q: Subject: qmail-smtpd-py plugin-test",
        "C: QUIT", "S: 221 localhost", "# server exit status 0"]


def test_env_reaches_server_and_plugin(tmp_path):
    sh_plugin(tmp_path, "env", 'echo "ip=$TCPREMOTEIP foo=$FOO relay=${RELAYCLIENT-unset}" >&2')
    code, lines, _ = plugin_test("--env", "TCPREMOTEIP=192.0.2.1", "--env", "FOO=a=b",
                                 "--env", "RELAYCLIENT=", "--to", "x@elsewhere.org", "./env",
                                 cwd=tmp_path)
    assert code == 0
    assert "L: ip=192.0.2.1 foo=a=b relay=" in lines
    assert "Q: Received: from unknown (HELO client.example) (192.0.2.1)" in lines


def test_script_file_and_a_refused_data(tmp_path):
    sh_plugin(tmp_path, "refuse", 'case "$SMTPRCPTTO" in bad@*) echo E550 no such user;; esac')
    script = tmp_path / "session.txt"
    script.write_bytes(b"HELO c.test\r\nMAIL FROM:<a@b.c>\nRCPT TO:<bad@localhost>\n"
                       b"DATA\nSubject: never sent\n\nbody\n.\nNOOP\nRSET\nQUIT\n")
    code, lines, _ = plugin_test("--script", str(script), "./refuse", cwd=tmp_path)
    assert code == 0
    assert client_and_server(lines)[1:] == [
        "S: 220 localhost ESMTP",
        "C: HELO c.test", "S: 250 localhost",
        "C: MAIL FROM:<a@b.c>", "S: 250 ok",
        "C: RCPT TO:<bad@localhost>", "S: 550 no such user",
        "C: DATA", "S: 503 RCPT first (#5.5.1)",
        "# DATA refused: its message lines are not sent",
        "C: NOOP", "S: 250 ok",
        "C: RSET", "S: 250 flushed",
        "C: QUIT", "S: 221 localhost",
        "# server exit status 0"]


def test_script_recipients_domains_are_in_the_temporary_rcpthosts(tmp_path):
    sh_plugin(tmp_path, "n", "echo N")
    code, lines, _ = plugin_test("--script", "-", "./n", cwd=tmp_path,
                                 stdin=b"MAIL FROM:<a@b.c>\nrcpt to:<u@Scripted.Test>\n"
                                       b"RCPT TO:<v@elsewhere.test>\nQUIT\n")
    assert code == 0
    assert client_and_server(lines)[-7:] == [
        "C: rcpt to:<u@Scripted.Test>", "S: 250 ok",
        "C: RCPT TO:<v@elsewhere.test>", "S: 250 ok",
        "C: QUIT", "S: 221 localhost", "# server exit status 0"]


def test_script_from_stdin_with_pipelined_style_dialogue(tmp_path):
    """AUTH LOGIN's 334 prompts are replies like any other: one line, one reply."""
    sh_plugin(tmp_path, "auth", 'echo "P235-$SMTPAUTHUSER $SMTPAUTHMETHOD"')
    code, lines, _ = plugin_test("--section", "auth", "--auth-user", "joe", "--script", "-",
                                 "./auth", cwd=tmp_path,
                                 stdin=b"EHLO c\nAUTH LOGIN\nam9l\neA==\nQUIT\n")
    assert code == 0
    shown = client_and_server(lines)
    assert shown[shown.index("C: AUTH LOGIN"):] == [
        "C: AUTH LOGIN", "S: 334 VXNlcm5hbWU6",
        "C: am9l", "S: 334 UGFzc3dvcmQ6",
        "C: eA==", "S: 235-joe login", "S: 235 ok, go ahead (#2.0.0)",
        "C: QUIT", "S: 221 localhost", "# server exit status 0"]


@pytest.mark.parametrize("method,lines_sent", [
    ("plain", ["C: AUTH PLAIN AGpvZQBwbHVnaW4tdGVzdA=="]),
    ("login", ["C: AUTH LOGIN", "S: 334 VXNlcm5hbWU6", "C: am9l", "S: 334 UGFzc3dvcmQ6",
               "C: cGx1Z2luLXRlc3Q="]),
])
def test_auth_user_logs_in_before_mail(tmp_path, method, lines_sent):
    sh_plugin(tmp_path, "who", 'echo "P250-user=$SMTPAUTHUSER"')
    code, lines, _ = plugin_test("--auth-user", "joe", "--auth-method", method, "./who",
                                 cwd=tmp_path)
    assert code == 0
    shown = client_and_server(lines)
    start = shown.index("S: 250-AUTH LOGIN PLAIN") + 2
    assert shown[start:start + len(lines_sent) + 5] == [
        *lines_sent, "S: 235 ok, go ahead (#2.0.0)",
        "C: MAIL FROM:<sender@example.org>", "S: 250 ok",
        "C: RCPT TO:<postmaster@localhost>", "S: 250-user=joe"]
    assert "Q: Received: from unknown (HELO client.example) (joe@127.0.0.1)" in shown


def test_installed_plugin_by_name_and_a_disconnect(tmp_path):
    code, lines, _ = plugin_test("--section", "helo", "--helo", "mx.spammers.com",
                                 "badhelo", "example.com", ".spammers.com", cwd=tmp_path)
    assert code == 0
    assert re.fullmatch(r"# \[helo\] :/\S+/badhelo example\.com \.spammers\.com", lines[0])
    shown = client_and_server(lines)
    assert shown[1:] == ["S: 220 localhost ESMTP", "C: EHLO mx.spammers.com",
                         "S: 553 sorry, your HELO is forbidden (#5.7.1)",
                         "C: MAIL FROM:<sender@example.org>",
                         "# the server closed the connection", "# server exit status 0"]
    assert any(re.fullmatch(r"L: badhelo: pid \d+: refused HELO mx\.spammers\.com from "
                            r"127\.0\.0\.1 \(\.spammers\.com, argument\)", line) for line in lines)


def test_connection_plugin_that_drops(tmp_path):
    sh_plugin(tmp_path, "drop", "echo D")
    code, lines, _ = plugin_test("--section", "connection", "./drop", cwd=tmp_path)
    assert code == 0
    assert client_and_server(lines)[1:] == ["# the server closed the connection",
                                            "# server exit status 0"]


def test_qmail_home_option_uses_its_controls_but_not_its_plugins(tmp_path, make_home):
    home = make_home(control={"me": "mx.home.test\n", "smtpplugins": "[rcpt]\n:echo E550 no\n"})
    sh_plugin(tmp_path, "p", 'echo "P250-cwd=$(pwd -P)"')
    code, lines, _ = plugin_test("--qmail-home", home.path, "--to", "u@example.com", "./p",
                                 cwd=tmp_path)
    assert code == 0
    assert "S: 220 mx.home.test ESMTP" in lines
    assert "S: 250-cwd=%s" % os.path.realpath(home.path) in lines
    assert "S: 550 no" not in lines
    assert "Q: from <sender@example.org> to <u@example.com>" in lines
    assert home.queue.runs() == 0  # the discarding queue took the message


def test_path_with_spaces_is_a_plain_entry(tmp_path):
    directory = tmp_path / "my plugins"
    directory.mkdir()
    plug = sh_plugin(directory, "say hi", "echo P250-hi")
    code, lines, _ = plugin_test(plug, cwd=tmp_path)
    assert code == 0
    assert lines[0] == "# [rcpt] %s" % plug
    assert "S: 250-hi" in lines


def test_control_characters_are_escaped(tmp_path):
    sh_plugin(tmp_path, "ctl", r"printf 'P250-a\033[31mb\r\n'; printf 'log\001\n' >&2")
    code, lines, _ = plugin_test("./ctl", cwd=tmp_path)
    assert code == 0
    assert "S: 250-a\\x1b[31mb" in lines
    assert "L: log\\x01" in lines


def test_no_reply_within_the_timeout(tmp_path):
    pidfile = tmp_path / "plugin.pid"
    sh_plugin(tmp_path, "hang", 'echo $$ > "%s"; exec sleep 60' % pidfile)
    code, lines, _ = plugin_test("--timeout", "1", "./hang", cwd=tmp_path, timeout=30)
    assert code == 1
    assert lines[-1] == "# no reply within 1 s: stopped (a slower plugin needs --timeout)"
    assert lines[-2] == "C: RCPT TO:<postmaster@localhost>"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while process_state(pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_state(pid) in (None, "Z"), "the hung plugin was left running"


def process_state(pid):
    """The state letter of a process ("Z": zombie), None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_help(tmp_path):
    code, lines, err = plugin_test("--help", cwd=tmp_path)
    assert code == 0 and err == ""
    assert lines[0] == "Usage: qmail-smtpd-py plugin-test [OPTIONS] [PLUGIN] [ARGS]..."
    assert any(line.lstrip().startswith("--script FILE") for line in lines)


@pytest.mark.parametrize("args,message", [
    ([], "no PLUGIN given (see --help)"),
    (["./missing"], "./missing: no such file"),
    (["no-such-plugin-anywhere"],
     "no-such-plugin-anywhere: no such file, nor an installed plugin of that name"),
    (["./noexec"], "./noexec: not executable (chmod +x it)"),
    (["./adir"], "./adir: not a file"),
    (["--nonesuch", "./ok"], "No such option '--nonesuch'."),
    (["--section", "ehlo", "./ok"],
     "--section ehlo: use one of connection helo mail rcpt data auth"),
    (["--section", "auth", "./ok"],
     "[auth] plugins run only after a successful AUTH: give --auth-user USER"),
    (["--env", "FOO", "./ok"], "--env FOO: write NAME=VALUE (NAME= for an empty value)"),
    (["--env", "=x", "./ok"], "--env =x: write NAME=VALUE (NAME= for an empty value)"),
    (["--script", "nothere.txt", "./ok"], "--script nothere.txt: No such file or directory"),
    (["--timeout", "soon", "./ok"], "--timeout soon: give a number of seconds"),
    (["--timeout", "0", "./ok"], "--timeout 0: give a number of seconds"),
    (["--qmail-home", "nothere", "./ok"], "--qmail-home nothere: not a directory"),
    (["--auth-method", "cram-md5", "./ok"], "--auth-method cram-md5: use plain or login"),
    (["--helo", "a\nb", "./ok"], "--helo: one line, please"),
    (["--to"], "Option '--to' requires an argument."),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    sh_plugin(tmp_path, "ok", "echo N")
    sh_plugin(tmp_path, "noexec", "echo N", mode=0o644)
    (tmp_path / "adir").mkdir()
    code, lines, err = plugin_test(*args, cwd=tmp_path)
    assert (code, lines) == (2, [])
    assert err.splitlines()[-1] == "Error: " + message  # click's usage error


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`plugin-test ... | head -1`: exit 1 quietly, the server session killed."""
    require_server()
    plugin = sh_plugin(tmp_path, "quiet", "exit 0")
    reader, writer = os.pipe()
    p = subprocess.Popen([SERVER, "plugin-test", plugin], stdout=writer,
                         stderr=subprocess.PIPE, cwd=str(tmp_path),
                         env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    os.close(writer)
    with os.fdopen(reader, "rb") as f:
        assert f.readline().startswith(b"# [rcpt] ")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err == b""


# ------------------------------------------------------------------ --preloaded, --both


def py_plugin(directory, name, body):
    """A Python plugin for the server's interpreter, in a directory only root can
    change (so that serve -u nobody would preload it)."""
    directory = os.path.join(str(directory), "plugins")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, name)
    python = os.path.join(os.path.dirname(SERVER), "python")
    with open(path, "w") as f:
        f.write("#!%s\n%s\n" % (python, body))
    os.chmod(path, 0o755)
    return path


PID_PLUGIN = "import os\nprint('HX-Parent: %d' % os.getppid())\nprint('P250-rcpt seen')"


def runs(lines):
    """The transcript cut into its runs at the `# --- MODE` notes: {mode: lines}."""
    found, mode = {}, None
    for line in lines:
        if line.startswith("# --- "):
            mode = line[6:]
            found[mode] = []
        elif mode is not None:
            found[mode].append(line)
    return found


def test_both_runs_the_session_twice_and_compares_the_reply_times(tmp_path):
    plug = py_plugin(tmp_path, "seen", PID_PLUGIN)
    code, lines, err = plugin_test("--both", "--user", "nobody", plug, cwd=tmp_path)
    assert (code, err) == (0, "")
    both = runs(lines)
    assert list(both) == ["exec'd", "preloaded"]
    assert any(line.startswith("# preloaded %s (" % plug) for line in both["preloaded"])
    assert not any("preloaded" in line for line in both["exec'd"])
    # the same replies either way; the plugin's parent is the server (its log's pid)
    def replies(run):
        return [line for line in run if line.startswith("S: ")]
    assert replies(both["exec'd"]) == replies(both["preloaded"])
    for run in both.values():
        (server,) = {line.split()[1] for line in run if line.startswith("L: ")}
        assert "Q: X-Parent: " + server in run
    assert "S: 250-rcpt seen" in both["preloaded"]
    table = lines[lines.index("# reply times (ms): exec'd / preloaded") + 1:]
    labels = [re.match(r"#   (.*?)\s+[\d.]+\s+[\d.]+$", row).group(1) for row in table]
    assert labels == ["(greeting)", "EHLO client.example", "MAIL FROM:<sender@example.org>",
                      "RCPT TO:<postmaster@localhost>", "DATA", "(message)", "QUIT"]


def test_preloaded_says_why_a_plugin_is_not_preloaded(tmp_path):
    shell = sh_plugin(tmp_path, "shell", 'echo "P250 from sh"')
    code, lines, _ = plugin_test("--preloaded", "--user", "nobody", shell, cwd=tmp_path)
    assert code == 0 and "S: 250 from sh" in lines
    assert any(line.startswith("# not preloaded: %s: " % shell) for line in lines), lines
    code, lines, _ = plugin_test("--preloaded", py_plugin(tmp_path, "p", PID_PLUGIN), "arg",
                                 cwd=tmp_path)
    assert "# not preloaded: a ':' entry (arguments) always runs through /bin/sh" in lines
    assert "S: 250-rcpt seen" in lines


@pytest.mark.skipif(os.geteuid() != 0, reason="root's own check")
def test_preloaded_as_root_without_user_says_to_give_one(tmp_path):
    code, lines, _ = plugin_test("--preloaded", py_plugin(tmp_path, "p", PID_PLUGIN),
                                 cwd=tmp_path)
    assert code == 0
    assert ("# checked for root, who can change every file: give --user, the user of "
            "serve -u") in lines
    assert any(line.startswith("# not preloaded: ") for line in lines)


def test_user_must_exist(tmp_path):
    code, _, err = plugin_test("--preloaded", "--user", "no-such-user-here", "x",
                               cwd=tmp_path)
    assert code == 2 and "--user no-such-user-here: no such user" in err

"""qmail_smtpd_py.plugin, the helper for plugins written in Python, seen from the wire.

Each test writes a small Python plugin into the qmail home's plugins/ directory (its
first line is the interpreter running the tests, which has the package installed), lists
it in control/smtpplugins and runs the installed qmail-smtpd-py over pipes
(helpers.run_smtp): what a helper call does is what the client and the queue get.
The default home has me=mx.example.org and rcpthosts example.com, .sub.example.net.
"""

import os
import re
import sys
import textwrap

import pytest

from helpers import ACC, BYE, FLUSHED, GO, GREETING, HELO250, OK, crlf, norm, run_smtp

NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
RECEIVED = (b"Received: from unknown (HELO c.test) (127.0.0.1)\n"
            b"  by mx.test with SMTP; <DATE>\n")

HELO = b"HELO c.test"
MAIL = b"MAIL FROM:<a@b.c>"
RCPT = b"RCPT TO:<u@example.com>"
DATA = (b"DATA", b"Subject: t", b"", b"hi", b".")
QUIT = b"QUIT"


def plugin(home, name, body):
    """Write plugins/NAME, a Python plugin with body (indented freely); returns its
    smtpplugins entry."""
    directory = os.path.join(home.path, "plugins")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!%s -I\nimport os, sys\nfrom qmail_smtpd_py import plugin\n"
                % sys.executable + textwrap.dedent(body))
    os.chmod(path, 0o755)
    return "plugins/" + name


def configure(home, *sections):
    """control/smtpplugins from (section, [entries]) pairs."""
    lines = []
    for section, entries in sections:
        lines += ["[%s]" % section, *entries]
    home.control("smtpplugins", "\n".join(lines) + "\n")


def run(home, *lines, env=None):
    return run_smtp(crlf(*lines), env=env, home=home)


# ------------------------------------------------------------------ ending commands


def test_reject_sends_the_reply_and_refuses_the_command(home):
    configure(home, ("rcpt", [plugin(home, "no", 'plugin.reject("550 5.7.1 no thanks")\n'
                                                 'plugin.reject("550 not reached")\n')]))
    res = run(home, MAIL, RCPT, b"DATA", QUIT)
    assert res.out == GREETING + OK + b"550 5.7.1 no thanks\r\n" + b"503 RCPT first (#5.5.1)\r\n" + BYE


def test_reject_with_several_lines_is_one_multiline_reply(home):
    configure(home, ("mail", [plugin(home, "multi",
                                     'plugin.reject("550-first line\\r\\n550-second\\n550 last\\n")')]))
    res = run(home, MAIL, QUIT)
    assert res.out == GREETING + b"550-first line\r\n550-second\r\n550 last\r\n" + BYE


def test_next_plugin_skips_the_rest_of_the_section(home):
    configure(home, ("rcpt", [plugin(home, "n", "plugin.next_plugin()\n"),
                              plugin(home, "e", 'plugin.reject("550 second plugin ran")\n')]))
    res = run(home, MAIL, RCPT, b"RCPT TO:<x@elsewhere.org>", QUIT)
    assert res.out == GREETING + OK + OK + NOGATEWAY + BYE  # N does not skip rcpthosts


def test_skip_checks_skips_rcpthosts(home):
    configure(home, ("rcpt", [plugin(home, "o", "plugin.skip_checks()\n"),
                              plugin(home, "e", 'plugin.reject("550 second plugin ran")\n')]))
    res = run(home, MAIL, b"RCPT TO:<x@elsewhere.org>", *DATA, QUIT)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert res.queued[0].recipients == [b"x@elsewhere.org"]


def test_accept_switches_plugins_off_for_the_connection(home):
    configure(home, ("mail", [plugin(home, "a", "plugin.accept()\n"),
                              plugin(home, "e", 'plugin.reject("550 second plugin ran")\n')]),
              ("rcpt", [plugin(home, "r", 'plugin.reject("550 rcpt plugin ran")\n')]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + OK + BYE


def test_disconnect_replies_and_closes(home):
    configure(home, ("mail", [plugin(home, "r", 'plugin.disconnect("421-busy\\n421 bye")\n')]))
    res = run(home, HELO, MAIL, RCPT, QUIT)
    assert res.out == GREETING + HELO250 + b"421-busy\r\n421 bye\r\n"
    assert res.status == 0


def test_drop_closes_without_a_reply(home):
    configure(home, ("helo", [plugin(home, "d", 'plugin.say("250-pending")\nplugin.drop()\n')]))
    res = run(home, HELO, MAIL, QUIT)
    assert res.out == GREETING + b"250-pending\r\n"
    assert res.status == 0


# ------------------------------------------------------------------ other commands


def test_say_prints_before_the_reply(home):
    configure(home, ("connection", [plugin(home, "p", 'plugin.say("220-hello")\n'
                                                      'plugin.say("220-there")\n')]))
    res = run(home, QUIT)
    assert res.out == b"220-hello\r\n220-there\r\n" + GREETING + BYE


def test_defer_refuses_later_commands_until_rset(home):
    configure(home, ("connection", [plugin(home, "l", 'plugin.defer("M", "451-slow down\\n'
                                                      '451 try later")\n')]))
    res = run(home, MAIL, MAIL, b"RSET", MAIL, QUIT)
    deferred = b"451-slow down\r\n451 try later\r\n"
    assert res.out == GREETING + deferred + deferred + FLUSHED + OK + BYE


def test_defer_rcpt_refuses_every_later_rcpt(home):
    configure(home, ("mail", [plugin(home, "l", 'plugin.defer("R", "450 later")\n')]))
    res = run(home, MAIL, RCPT, RCPT, QUIT)
    assert res.out == GREETING + OK + b"450 later\r\n" + b"450 later\r\n" + BYE


def test_defer_data(home):
    configure(home, ("rcpt", [plugin(home, "l", 'plugin.defer("D", "451 not now")\n')]))
    res = run(home, MAIL, RCPT, b"DATA", QUIT)
    assert res.out == GREETING + OK + OK + b"451 not now\r\n" + BYE
    assert res.queued == []


def test_header_lines_go_after_the_received_line(home):
    configure(home, ("rcpt", [plugin(home, "h", 'plugin.header("X-Checked: yes")\n'
                                                'plugin.header("\\tby a plugin")\n'
                                                'plugin.header(b"X-Bytes: 1")\n')]))
    res = run(home, HELO, MAIL, RCPT, *DATA, QUIT)
    assert norm(res.out) == GREETING + HELO250 + OK + OK + GO + ACC + BYE
    assert norm(res.queued[0].message) == (RECEIVED + b"X-Checked: yes\n\tby a plugin\n"
                                           b"X-Bytes: 1\nSubject: t\n\nhi\n")


def test_change_address_rewrites_sender_and_recipient(home):
    configure(home, ("mail", [plugin(home, "cm", 'plugin.change_address("new@s.org")\n')]),
              ("rcpt", [plugin(home, "cr", 'plugin.change_address("other@example.com")\n')]))
    res = run(home, MAIL, RCPT, *DATA, QUIT)
    assert norm(res.out) == GREETING + OK + OK + GO + ACC + BYE
    assert res.queued[0].envelope == b"Fnew@s.org\0Tother@example.com\0\0"


def test_change_address_keeps_odd_bytes(home):
    """The environment's bytes survive the str round trip (surrogateescape)."""
    configure(home, ("mail", [plugin(home, "c", "s = plugin.Session()\n"
                                                'plugin.change_address("moved." + s.mail_from)\n')]))
    res = run(home, b"MAIL FROM:<a\xffb@c.d>", RCPT, *DATA, QUIT)
    assert res.queued[0].sender == b"moved.a\xffb@c.d"


def test_set_env_and_unset_env_reach_later_plugins(home):
    show = plugin(home, "show", 's = plugin.Session()\n'
                                'plugin.reject("550 FOO=%s BAR=%s" % (s.get("FOO", "unset"), '
                                's.has("BAR")))\n')
    configure(home, ("mail", [plugin(home, "set", 'plugin.set_env("FOO", "x=y z")\n'
                                                  'plugin.set_env("BAR", "")\n')]),
              ("rcpt", [plugin(home, "unset", 'plugin.unset_env("BAR")\n'), show]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + b"550 FOO=x=y z BAR=False\r\n" + BYE


# ------------------------------------------------------------------ Session


def test_session_properties(home):
    configure(home, ("rcpt", [plugin(home, "props", '''\
        s = plugin.Session()
        plugin.say("250-helo=%s from=%s to=%s" % (s.helo, s.mail_from, s.rcpt_to))
        plugin.say("250-count=%r all=%r hostsok=%r" % (s.rcpt_count, s.rcpt_count_all,
                                                       s.rcpthosts_ok))
        plugin.say("250-ip=%s relay=%r auth=%r user=%r" % (s.remote_ip, s.relay_client,
                                                           s.authenticated, s.auth_user))
        plugin.say("250-local=%s/%s missing=%r" % (s.local_ip, s.local_host, s.get("NOPE", None)))
        ''')]))
    res = run(home, HELO, MAIL, b"RCPT TO:<x@elsewhere.org>", RCPT, QUIT,
              env={"TCPREMOTEIP": "192.0.2.7"})
    assert res.out == (
        GREETING + HELO250 + OK
        + b"250-helo=c.test from=a@b.c to=x@elsewhere.org\r\n"
        + b"250-count=0 all=1 hostsok=False\r\n"
        + b"250-ip=192.0.2.7 relay=False auth=False user=''\r\n"
        + b"250-local=127.0.0.1/mx.test missing=None\r\n" + NOGATEWAY
        + b"250-helo=c.test from=a@b.c to=u@example.com\r\n"
        + b"250-count=0 all=2 hostsok=True\r\n"
        + b"250-ip=192.0.2.7 relay=False auth=False user=''\r\n"
        + b"250-local=127.0.0.1/mx.test missing=None\r\n" + OK + BYE)


def test_session_relay_client_and_bad_counts(home):
    configure(home, ("mail", [plugin(home, "props", '''\
        s = plugin.Session()
        plugin.reject("550 relay=%r count=%r" % (s.relay_client, s.rcpt_count))
        ''')]))
    res = run(home, MAIL, QUIT, env={"RELAYCLIENT": "", "SMTPRCPTCOUNT": "many"})
    assert res.out == GREETING + b"550 relay=True count=0\r\n" + BYE


def test_control_lines(home):
    home.control("plugintest", "# comment\n\n  first  \nsecond\r\n\t#indented comment\n")
    configure(home, ("helo", [plugin(home, "c", '''\
        plugin.reject("550 %r %r" % (plugin.control_lines("plugintest"),
                                     plugin.control_lines("missing")))
        ''')]))
    res = run(home, HELO, QUIT)
    assert res.out == GREETING + b"550 ['first', 'second'] []\r\n" + BYE


# ------------------------------------------------------------------ logging and errors

@pytest.mark.parametrize("shell", [False, True])
def test_log_names_the_plugin_and_the_server_pid(home, shell):
    """Also through a ':' entry, where /bin/sh stands between server and plugin.  The
    server's pid comes from a plain /bin/sh entry (the server runs it directly)."""
    ppid = os.path.join(home.path, "ppid")
    with open(ppid, "w") as f:
        f.write('#!/bin/sh\necho "server-pid=$PPID" >&2\n')
    os.chmod(ppid, 0o755)
    entry = plugin(home, "logger", 'plugin.log("hello %s" % plugin.Session().rcpt_to)\n')
    configure(home, ("connection", ["ppid"]), ("rcpt", [":" + entry + " arg" if shell else entry]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + OK + BYE
    (server_pid,) = re.findall(rb"^server-pid=(\d+)$", res.err, re.MULTILINE)
    assert b"\nlogger: pid %s: hello u@example.com\n" % server_pid in res.err


def test_log_line_escapes_control_characters(home):
    configure(home, ("mail", [plugin(home, "l", 'plugin.log_line("one\\ntwo\\r\\x7f\\tend")\n'
                                                'plugin.log_line(b"raw \\xff\\x00")\n')]))
    res = run(home, MAIL, QUIT)
    assert b"\none\\x0atwo\\x0d\\x7f\tend\n" in res.err
    assert b"\nraw \xff\\x00\n" in res.err


def test_run_turns_an_exception_into_one_log_line(home):
    configure(home, ("rcpt", [plugin(home, "boom", '''\
        def main(session):
            plugin.say("250-before")
            {}["missing"]

        plugin.run(main)
        ''')]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + b"250-before\r\n" + OK + BYE  # the RCPT goes on
    assert b"\nboom: pid " in res.err
    assert b": error: KeyError: 'missing'\n" in res.err
    assert b"Traceback" not in res.err


def test_run_lets_the_ending_commands_exit(home):
    configure(home, ("rcpt", [plugin(home, "r", '''\
        plugin.run(lambda session: plugin.reject("550 no %s" % session.rcpt_to))
        ''')]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + b"550 no u@example.com\r\n" + BYE
    assert b"error" not in res.err


@pytest.mark.parametrize("call", [
    'plugin.reject("hello")',                  # no code
    'plugin.reject("55 short")',               # two digits
    'plugin.reject("650 not a code")',         # not 2xx-5xx
    'plugin.reject("550x")',                   # no space after the code
    'plugin.reject("550-only a continuation")',
    'plugin.reject("550-first\\n550-second")',   # last line continues
    'plugin.reject("550 first\\n550 second")',   # first line ends the reply
    'plugin.reject("550-first\\n551 other code")',
    'plugin.reject("550 one\\n\\n")',           # empty line
    'plugin.reject("550 a\\rb")',               # bare CR
    'plugin.reject("550 a\\x00b")',             # NUL
    'plugin.disconnect("bye")',
    'plugin.say("250 x\\ny")',
    'plugin.say("hello")',
    'plugin.defer("X", "451 later")',
    'plugin.defer("M", "later")',
    'plugin.header("X-A: 1\\nX-B: 2")',
    'plugin.header("no colon here")',
    'plugin.header("")',
    'plugin.header(": no name")',
    'plugin.header("Bad Name: x")',
    'plugin.change_address("a@b\\r\\nDATA")',
    'plugin.change_address("a\\x00b")',
    'plugin.set_env("A=B", "x")',
    'plugin.set_env("", "x")',
    'plugin.set_env("A", "x\\ny")',
    'plugin.unset_env("")',
    'plugin.unset_env("A\\nB")',
])
def test_bad_commands_raise_ValueError_and_write_nothing(home, call):
    configure(home, ("rcpt", [plugin(home, "bad", '''\
        try:
            %s
        except ValueError:
            plugin.reject("550 ValueError")
        plugin.reject("550 no error")
        ''' % call)]))
    res = run(home, MAIL, RCPT, QUIT)
    assert res.out == GREETING + OK + b"550 ValueError\r\n" + BYE

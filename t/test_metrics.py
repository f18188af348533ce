"""The pool's Prometheus metrics, `serve --metrics HOST:PORT` (qmail_smtpd_py/metrics.py).

In-process: the core's Log requests carry the fact their line states (requests.Closed,
Refused, Accepted), at every log level, with label values from bounded sets; the by=
and why= words are the core's lists (logline.CHECKS, ENDINGS).  The oracle is
world.fact_of, which reads a fact back from the line's text.

Real: the installed pool with --metrics under a mixed load from several client
addresses (accepted, relay refused, a plugin refusal, QUIT at once, EOF, an unknown
verb, -C refusals, a tcprules deny), scraped over HTTP during and after the run; the
log is the ground truth (close, refuse and accept lines; `serve: limit/deny`; the
plugin's own line per run).  Workers are recycled (-n 7) during the run, a SIGHUP
re-executes the parent, and the counts stay equal to the log; the files of dead workers
are folded away, and the directory is removed at the end (also by a parent that dropped
to -u nobody).  The exposition is linted with promtool when it is installed.  Without
prometheus_client on the path --metrics is a usage error; without --metrics nothing of
it is imported.  No assertion depends on timing: waits are for events, with generous
limits.
"""

import ast
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_pool import (
    GREETING,
    Client,
    require_loopback_source,
    smtplib_local,
    spawn_serve,
    wait_for,
    world_readable_home,
)
from test_tcpserver import tcprules

import qmail_smtpd_py.core.session as session_module
from qmail_smtpd_py import metrics
from qmail_smtpd_py.core import requests as rq
from qmail_smtpd_py.core.logline import CHECKS, ENDINGS
from qmail_smtpd_py.core.spp import plugin_argv, plugin_entry

from helpers import SERVER, children_of, crlf, free_port, require_server, script
from world import config, fact_of, run

PREFIX = "qmail_smtpd_py_"
TIMEOUT = 30

# ------------------------------------------------------------------ in-process: the facts

PLUGIN = b"plugins/check"
SESSIONS = {  # name -> (client bytes, World keywords, Config fields)
    "delivered": (crlf(b"HELO c", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>",
                       b"RCPT TO:<v@example.com>", b"DATA", b"Subject: t", b"", b"hi", b".",
                       b"QUIT"), {}, {}),
    "relay refused, eof": (crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@elsewhere.org>"), {}, {}),
    "syntax, sequence, unknown verb, timeout": (
        [crlf(b"MAIL FROM:<" + b"a" * 1000 + b">", b"RCPT TO:<u@example.com>", b"DATA",
              b"FOO bar"), None],
        {}, {}),
    "badmailfrom": (crlf(b"MAIL FROM:<spam@bad.example>", b"RCPT TO:<u@example.com>",
                         b"QUIT"), {}, {"badmailfrom": {b"spam@bad.example"}}),
    "databytes": (crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA",
                       b"x" * 200, b".", b"QUIT"), {}, {"databytes": 100}),
    "queue refused": (crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA", b"hi",
                           b".", b"QUIT"), {"queue_status": 71}, {}),
    "plugin refusal": (crlf(b"MAIL FROM:<a@b.c>", b"QUIT"),
                       {"plugins": {PLUGIN: (b"E550 no (#5.7.1)",)}},
                       {"plugins": {b"m": [PLUGIN]}}),
    "plugin deferred": (crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                        {"plugins": {PLUGIN: (b"LR451 later (#4.3.0)\nN",)}},
                        {"plugins": {b"m": [PLUGIN]}}),
    "plugin disconnect": (crlf(b"HELO c", b"QUIT"),
                          {"plugins": {PLUGIN: (b"R421 go away (#4.3.0)",)}},
                          {"plugins": {b"h": [PLUGIN]}}),
    "plugin code not a code": (crlf(b"MAIL FROM:<a@b.c>", b"QUIT"),
                               {"plugins": {PLUGIN: (b"Ehello there",)}},
                               {"plugins": {b"m": [PLUGIN]}}),
    "extfork refusal": (crlf(b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"QUIT"),
                        {"programs": {b"/p/xf": 100}}, {}),
    "max-line": (crlf(b"NOOP " + b"x" * 300, b"QUIT"), {}, {"max_line": 100}),
}


def play(name, level=1):
    chunks, answers, fields = SESSIONS[name]
    env = {b"TCPREMOTEIP": b"127.0.0.1", b"TCPLOCALIP": b"127.0.0.1"}
    if name == "extfork refusal":
        env[b"SMTPEXTFORK"] = b"/p/xf"
    return run(chunks, cfg=config(log_level=level, **fields), env=env, **answers)


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_each_event_line_comes_with_the_fact_it_states(name):
    world = play(name)
    stated = [fact for fact in map(fact_of, world.log) if fact is not None]
    assert world.facts == stated
    assert type(world.facts[-1]) is rq.Closed and world.facts[-1].status == world.exit


def test_facts_come_at_log_level_0_without_their_lines():
    """SMTPLOGLEVEL=0 keeps the event lines out of the log, not the facts out of the
    metrics."""
    for name in SESSIONS:
        quiet, loud = play(name, level=0), play(name, level=1)
        assert quiet.facts == loud.facts, name
        assert not [line for line in quiet.log if fact_of(line) is not None], name


def test_label_values_are_bounded():
    """A client may send any word as a command and a plugin any text as a reply: the
    facts say OTHER / other, while the log line shows what came."""
    world = play("syntax, sequence, unknown verb, timeout")
    assert rq.Refused("OTHER", "502", "unimplemented") in world.facts
    assert any(line.startswith("refuse FOO 502 by=unimplemented") for line in world.log)
    world = play("plugin code not a code")
    assert rq.Refused("MAIL", "other", "plugin") in world.facts
    assert any(line.startswith("refuse MAIL hel by=plugin") for line in world.log)
    world = play("max-line")
    assert rq.Refused("OTHER", "500", "max-line") in world.facts


def test_the_facts_of_every_check_and_ending():
    """The sessions above reach these checks and endings, each as its own fact."""
    facts = [f for name in SESSIONS for f in play(name).facts]
    assert {f.by for f in facts if type(f) is rq.Refused} == {
        "rcpthosts", "syntax", "sequence", "unimplemented", "badmailfrom", "databytes",
        "queue", "plugin", "plugin-deferred", "extfork", "max-line"}
    assert {f.why for f in facts if type(f) is rq.Closed} == {"quit", "eof", "timeout",
                                                               "plugin"}
    assert rq.Accepted(15, 2) in facts  # bytes as qmail-queue gets them: LF line ends


def _string_arguments(tree, names, position):
    """String constants at argument `position` of calls to any of names."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) > position:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[position]
            if called in names and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
    return found


def test_the_by_and_why_words_are_the_core_s_lists():
    """The metrics' label values come from logline.CHECKS and ENDINGS: every word the
    session uses is listed, and every listed word is used (not invented)."""
    with open(session_module.__file__) as f:
        source = f.read()
    tree = ast.parse(source)
    assert _string_arguments(tree, {"_refuse", "_refusal"}, 1) <= set(CHECKS)
    assert _string_arguments(tree, {"_End", "Closed"}, 1) | _string_arguments(
        tree, {"_fatal"}, 1) <= set(ENDINGS)
    for word in CHECKS + ENDINGS:
        assert '"%s"' % word in source, word
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    for word in CHECKS:
        assert "`%s`" % word in readme, word


def test_plugin_entry_inverts_plugin_argv():
    for entry in (b"plugins/rbl", b":plugins/rbl -b zen.example", b"/bin/sh", b":"):
        assert plugin_entry(plugin_argv(entry)) == entry


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9425", ("127.0.0.1", 9425)), ("[::1]:9425", ("::1", 9425)),
    ("localhost:1", ("localhost", 1))])
def test_metrics_address(text, address):
    assert metrics.parse_address(text) == address


@pytest.mark.parametrize("text", ["9425", ":9425", "127.0.0.1:", "127.0.0.1:0",
                                  "127.0.0.1:65536", "[::1]", "host:port"])
def test_metrics_address_errors(text):
    with pytest.raises(ValueError):
        metrics.parse_address(text)


def test_queue_results_name_the_outcome():
    assert metrics.queue_result(rq.Exited(0)) == "exit_0"
    assert metrics.queue_result(rq.Exited(71, b"Zno")) == "exit_71"
    assert metrics.queue_result(rq.Signaled(9)) == "signal_9"
    assert metrics.queue_result(rq.WaitFailed("no child")) == "wait_failed"


def test_listen_backlog_counts_connections_nobody_accepted():
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        assert metrics.listen_backlog(listener) == 0
        waiting = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            wait_for(lambda: metrics.listen_backlog(listener) == 3)
            listener.accept()[0].close()
            assert metrics.listen_backlog(listener) == 2
        finally:
            for sock in waiting:
                sock.close()


# ------------------------------------------------------------------ the real pool


def start(tcpservers, home, *options, rules=None, maxconn=10):
    """A pool with --metrics on a free loopback port; (TcpServer, metrics port)."""
    port = free_port()
    server = tcpservers.start(home, rules=rules, maxconn=maxconn, mode="pool",
                              options=("--metrics", "127.0.0.1:%d" % port, *options))
    return server, port


def scrape(port, path="/metrics"):
    """The exposition, parsed: {(sample name, frozenset of labels): value}."""
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=TIMEOUT) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def total(samples, name, **labels):
    """The sum of the samples of name whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == PREFIX + name and want <= ls)


def by_label(samples, name, *keys):
    """Counter {tuple of the keys' label values: value} of name's non-zero samples."""
    out = collections.Counter()
    for (n, ls), v in samples.items():
        if n == PREFIX + name and v:
            labels = dict(ls)
            out[tuple(labels[k] for k in keys)] += int(v)
    return out


class Log:
    """The pool's log, counted: the ground truth."""

    def __init__(self, server):
        text = server.log_text().decode("utf-8", "replace")
        self.lines = text.splitlines()
        if not text.endswith("\n"):  # a line being written as we read
            self.lines = self.lines[:-1]
        self.sessions = collections.Counter()
        self.refusals = collections.Counter()
        self.accepts = self.accepted_bytes = self.recipients = 0
        for line in self.lines:
            parts = line.split(" ", 2)
            fact = fact_of(parts[2]) if len(parts) == 3 and "." in parts[0] else None
            if type(fact) is rq.Closed:
                self.sessions[fact.why, str(fact.status)] += 1
            elif type(fact) is rq.Refused:
                self.refusals[fact.by, fact.verb, fact.code] += 1
            elif type(fact) is rq.Accepted:
                self.accepts += 1
                self.accepted_bytes += fact.size
                self.recipients += fact.rcpts
        self.limits = sum(" serve: limit " in line for line in self.lines)
        self.denies = sum(" serve: deny " in line for line in self.lines)
        self.plugin_runs = sum(line.endswith("check: ran") for line in self.lines)

    def at_most(self, samples):
        """Every count of the log is at most the scrape's (facts are counted before their
        lines are written)."""
        assert self.sessions <= by_label(samples, "sessions_total", "why", "status")
        assert self.refusals <= by_label(samples, "refusals_total", "by", "verb", "code")
        assert self.accepts <= total(samples, "messages_queued_total")
        assert self.limits <= total(samples, "refused_connections_total", limit="per-ip")
        assert self.denies <= total(samples, "refused_connections_total", limit="deny")

    def equal(self, samples, plugin=None):
        assert by_label(samples, "sessions_total", "why", "status") == self.sessions
        assert by_label(samples, "refusals_total", "by", "verb", "code") == self.refusals
        assert total(samples, "messages_queued_total") == self.accepts
        assert total(samples, "queued_bytes_total") == self.accepted_bytes
        assert total(samples, "queued_recipients_total") == self.recipients
        assert total(samples, "queue_results_total", result="exit_0") == self.accepts
        assert total(samples, "queue_results_total") == self.accepts
        assert total(samples, "queue_seconds_count") == self.accepts
        assert total(samples, "refused_connections_total", limit="per-ip") == self.limits
        assert total(samples, "refused_connections_total", limit="deny") == self.denies
        if plugin is not None:
            assert total(samples, "plugin_seconds_count", plugin=plugin) == self.plugin_runs


def ids_from(server, ip):
    """The ids of the sessions from ip, in order."""
    return re.findall(rb"serve: pid (\S+) from %s\n" % re.escape(ip.encode()),
                      server.log_text())


def ended(server):
    return set(re.findall(rb"serve: end (\S+) status", server.log_text()))


def mail_home(make_home):
    """The default home with a [mail] plugin that logs each run and refuses bad@."""
    home = make_home()
    plugin = script(home, "check", 'echo "check: ran" >&2\ncase "$SMTPMAILFROM" in\n'
                    '  bad@*) echo "E550 sorry, bad sender (#5.7.1)";;\nesac\n')
    home.control("smtpplugins", "[mail]\n%s\n" % plugin)
    return home, plugin


def converse(port, source, lines, read_all=True):
    """One session from source: each line sent and its reply read; then the connection is
    closed (after QUIT: read to the end)."""
    c = Client(port, source)
    try:
        assert c.reply() == GREETING
        for line in lines:
            if line is None:  # leave without QUIT
                return
            reply = c.cmd(line)
            assert reply, line
            if line == b"DATA" and reply.startswith(b"354"):
                assert c.cmd(b"Subject: load\r\n\r\nhello\r\n.").startswith(b"250 ok ")
        if read_all:
            assert c.reply() == b""
    finally:
        c.close()


KINDS = [
    [b"EHLO c", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"DATA", b"QUIT"],
    [b"EHLO c", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@example.com>", b"RCPT TO:<v@example.com>",
     b"DATA", b"QUIT"],
    [b"HELO c", b"MAIL FROM:<a@b.c>", b"RCPT TO:<u@elsewhere.org>", b"QUIT"],
    [b"HELO c", b"MAIL FROM:<bad@spam.example>", b"QUIT"],
    [b"QUIT"],
    [b"HELO c", None],
    [b"FOO bar", b"QUIT"],
]


def test_counts_match_the_log_during_and_after_a_load(tcpservers, make_home, tmp_path):
    for address in ("127.0.0.5", "127.0.0.9", "127.0.4.28"):
        require_loopback_source(address)
    home, plugin = mail_home(make_home)
    rules = tcprules(tmp_path, "rules", b"127.0.0.9:deny\n:allow\n")
    server, port = start(tcpservers, home, "-n", "7", "-C", "2", rules=rules)
    directory = re.search(rb"files in (\S+)\)", server.log_text()).group(1).decode()

    # one session held open all along: a busy worker at every scrape
    held = Client(server.port, "127.0.0.5")
    assert held.reply() == GREETING

    rounds, threads_count, failures = 6, 4, []

    def load(n):
        try:
            for i in range(rounds):
                for k, lines in enumerate(KINDS):
                    # an address per session: -C 2 never counts the load's own sessions
                    converse(server.port, "127.0.%d.%d" % (n + 1, i * len(KINDS) + k + 1),
                             lines)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(threads_count)]
    for t in threads:
        t.start()
    scrapes = 0
    while any(t.is_alive() for t in threads) or scrapes < 3:
        before = Log(server)
        samples = scrape(port)
        before.at_most(samples)
        assert total(samples, "workers", state="busy") >= 1
        assert total(samples, "workers") <= 10
        assert total(samples, "max_connections") == 10
        scrapes += 1
        # -C 2: a second session from the held client's address is served, a third refused
        second = Client(server.port, "127.0.0.5")
        assert second.reply() == GREETING
        third = Client(server.port, "127.0.0.5")
        assert third.reply().startswith(b"421 too many connections from your address")
        assert third.reply() == b""
        third.close()
        assert second.quit() == b"221 mx.example.org\r\n"
        # once its end is logged, -C counts the second session no more
        wait_for(lambda: set(ids_from(server, "127.0.0.5")[1:]) <= ended(server))
        denied = Client(server.port, "127.0.0.9")
        assert denied.reply() == b""  # closed without a word
        denied.close()
    for t in threads:
        t.join()
    assert not failures, failures
    assert held.quit() == b"221 mx.example.org\r\n"

    sessions = rounds * threads_count * len(KINDS) + scrapes + 1
    wait_for(lambda: sum(Log(server).sessions.values()) == sessions, TIMEOUT)
    wait_for(lambda: Log(server).denies == scrapes and Log(server).limits == scrapes, TIMEOUT)
    final = scrape(port)
    log = Log(server)
    log.equal(final, plugin=plugin)
    # the load as planned, for the record: every kind was counted
    delivered = rounds * threads_count * 2
    assert log.accepts == delivered and log.recipients == delivered * 3 // 2
    assert log.sessions["quit", "0"] == sessions - rounds * threads_count
    assert log.sessions["eof", "1"] == rounds * threads_count
    assert log.refusals["rcpthosts", "RCPT", "553"] == rounds * threads_count
    assert log.refusals["plugin", "MAIL", "550"] == rounds * threads_count
    assert log.refusals["unimplemented", "OTHER", "502"] == rounds * threads_count
    assert log.limits == log.denies == scrapes
    # workers came and went (-n 7), and each one started is counted
    ids = re.findall(rb"serve: pid (\d+)\.\d+ from", server.log_text())
    assert len(set(ids)) >= sessions // 7
    assert total(final, "workers_started_total") >= len(set(ids))
    # the files of the workers that ended were folded into the archive and removed
    def settled():
        alive = set(children_of(server.pid))
        names = os.listdir(directory)
        return alive == set(children_of(server.pid)), alive, names
    wait_for(lambda: settled()[0])
    _, alive, names = settled()
    owners = {name.rsplit("_", 1)[1][:-3] for name in names}
    assert owners <= {str(pid) for pid in alive} | {str(server.pid), "archive"}, names
    assert len(names) <= 2 * (len(alive) + 2)

    os.killpg(server.pid, signal.SIGTERM)
    server.proc.wait(TIMEOUT)
    assert not os.path.exists(directory)  # removed when the pool ends


def test_counts_survive_a_sighup_reload(tcpservers, home):
    server, port = start(tcpservers, home, "-n", "3")
    directory = re.search(rb"files in (\S+)\)", server.log_text()).group(1)
    deliver = KINDS[0]
    for _ in range(5):
        converse(server.port, "127.0.0.1", deliver)
    wait_for(lambda: Log(server).accepts == 5)
    before = scrape(port)
    Log(server).equal(before)
    os.kill(server.pid, signal.SIGHUP)
    server.wait_log(b"serve: reloaded:")
    wait_for(lambda: len(re.findall(rb"metrics on \S+ \(files in (\S+)\)",
                                    server.log_text())) == 2)
    assert set(re.findall(rb"files in (\S+)\)", server.log_text())) == {directory}
    for _ in range(5):
        converse(server.port, "127.0.0.1", deliver)
    wait_for(lambda: Log(server).sessions["quit", "0"] == 10)
    after = scrape(port)  # the same port, served by the re-executed parent
    Log(server).equal(after)
    assert total(after, "messages_queued_total") == 10
    assert total(after, "workers_started_total") > total(before, "workers_started_total")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_metrics_under_u_g(tcpservers, make_home, tmp_path):
    """As root with -u/-g nobody: everything the endpoint needs is loaded before the drop
    (the interpreter's files need not be readable by nobody), the directory is nobody's,
    the workers count into it, and the parent, as nobody, removes it at the end."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    _, home_path, queue, _ = world_readable_home(make_home, tmp_path)
    port = free_port()
    env = {"PATH": os.environ["PATH"], "QMAILHOME": home_path, "QMAILQUEUE": queue}
    server = spawn_serve(tcpservers, [SERVER, "serve", "-v", "-H", "-l", "mx.test", "-u",
                                      str(nobody.pw_uid), "-g", str(nobody.pw_gid),
                                      "--metrics", "127.0.0.1:%d" % port], env)
    directory = re.search(rb"files in (\S+)\)", server.log_text()).group(1).decode()
    assert (os.stat(directory).st_uid, os.stat(directory).st_gid) == (nobody.pw_uid,
                                                                      nobody.pw_gid)
    for _ in range(2):
        smtplib_local(server.port, "127.0.0.1")
    wait_for(lambda: Log(server).sessions["quit", "0"] == 2)
    samples = scrape(port)
    Log(server).equal(samples)
    assert total(samples, "messages_queued_total") == 2
    os.killpg(server.pid, signal.SIGTERM)
    server.proc.wait(TIMEOUT)
    assert server.proc.returncode == 0, server.log_text()
    assert not os.path.exists(directory)


def test_exposition_has_help_and_type_and_passes_promtool(tcpservers, make_home):
    home, _ = mail_home(make_home)
    server, port = start(tcpservers, home)
    for lines in KINDS:
        converse(server.port, "127.0.0.1", lines)
    wait_for(lambda: sum(Log(server).sessions.values()) == len(KINDS))
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=TIMEOUT) as r:
        text = r.read()
    families = list(text_string_to_metric_families(text.decode()))
    assert {f.name for f in families} >= {
        PREFIX + name for name in ("sessions", "refusals", "messages_queued", "queued_bytes",
                                   "queue_results", "queue_seconds", "plugin_seconds",
                                   "refused_connections", "workers", "max_connections",
                                   "listen_backlog", "workers_started")}
    for family in families:
        assert family.name.startswith(PREFIX) and family.documentation, family.name
        name = family.name + ("_total" if family.type == "counter" else "")
        assert b"# HELP %s " % name.encode() in text
        assert b"# TYPE %s %s\n" % (name.encode(), family.type.encode()) in text
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs it)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint


def http(port, request):
    """A raw HTTP exchange: the whole response (read to the end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_endpoint_answers_http_and_holds_nothing_up(tcpservers, home):
    """404 and 405 besides GET/HEAD /metrics; a scrape connection that says nothing
    holds up neither sessions nor other scrapes, and workers forked while it is open do
    not keep it open; a worker killed in its session is counted."""
    server, port = start(tcpservers, home, "-n", "1")
    assert http(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    assert http(port, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert http(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    head = http(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    with pytest.raises(urllib.error.HTTPError):
        scrape(port, "/other")

    silent = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    scrape(port)  # answered after the parent accepted `silent` (in the order they came)
    for _ in range(3):  # -n 1: a new worker forked for each session
        converse(server.port, "127.0.0.1", KINDS[0])
    assert total(scrape(port), "messages_queued_total") == 3
    silent.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := silent.recv(65536):  # the end comes: no worker holds the connection
        data += chunk
    silent.close()
    assert data.startswith(b"HTTP/1.0 200 OK") and PREFIX.encode() in data

    victim = Client(server.port)
    assert victim.reply() == GREETING
    worker = server.session_pids(4)[3].split(".")[0]
    os.kill(int(worker), signal.SIGKILL)
    assert victim.reply() == b""  # its client sees the connection close
    victim.close()
    server.wait_log(b"died in its session")
    status = re.search(rb"status (\d+) \(worker \d+ died", server.log_text()).group(1)
    samples = scrape(port)
    assert total(samples, "sessions_total", why="worker-died") == 1
    assert total(samples, "sessions_total", why="worker-died", status=status.decode()) == 1


def test_metrics_option_errors(tcpservers, home):
    require_server()
    bad = subprocess.run([SERVER, "serve", "--metrics", "9425", "127.0.0.1", "0"],
                         capture_output=True)
    assert bad.returncode == 2 and b"HOST:PORT" in bad.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = subprocess.run([SERVER, "serve", "-H", "--root", "--metrics",
                               "127.0.0.1:%d" % port, "127.0.0.1", str(free_port())],
                              capture_output=True, timeout=TIMEOUT,
                              env={"PATH": os.environ["PATH"], "QMAILHOME": home.path})
    assert busy.returncode == 111
    assert b"unable to bind the metrics address 127.0.0.1:%d" % port in busy.stderr


def test_without_the_extra_metrics_is_a_usage_error(home, tmp_path):
    """The installed package run from a copy of its site-packages that lacks
    prometheus_client (links to everything else): --metrics exits 2 naming the extra,
    before binding anything; a session without it is served as usual."""
    import prometheus_client
    site = os.path.dirname(os.path.dirname(prometheus_client.__file__))
    bare = tmp_path / "site-packages"
    bare.mkdir()
    for name in os.listdir(site):
        if not name.startswith("prometheus_client"):
            os.symlink(os.path.join(site, name), bare / name)
    program = ["-c", "import sys; sys.path.append(%r); from qmail_smtpd_py.cli import main; "
               "sys.exit(main())" % str(bare)]
    with socket.create_server(("127.0.0.1", 0)) as taken:  # not even tried
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-I", "-S", *program, "serve", "--metrics",
                            "127.0.0.1:%d" % port, "127.0.0.1", str(free_port())],
                           capture_output=True, timeout=TIMEOUT)
    assert p.returncode == 2, p
    assert b"--metrics" in p.stderr and b"qmail-smtpd-py[metrics]" in p.stderr, p.stderr
    env = {"PATH": os.environ["PATH"], "QMAILHOME": home.path, "QMAILQUEUE": home.queue.path,
           "TCPREMOTEIP": "127.0.0.1"}
    p = subprocess.run([sys.executable, "-I", "-S", *program], input=crlf(*KINDS[0][:3], b"QUIT"),
                       env=env, capture_output=True, timeout=TIMEOUT)
    assert p.returncode == 0 and b"250 ok" in p.stdout, p


def imported(argv, **run):
    """The modules a run of the installed program imported (python -X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-I", *argv], capture_output=True,
                       timeout=TIMEOUT, **run)
    return {line.split("|")[-1].strip() for line in p.stderr.decode().splitlines()
            if line.startswith("import time:")}, p


def test_without_metrics_nothing_of_them_is_imported(home, tmp_path):
    """Neither a connection under tcpserver nor a pool without --metrics imports
    prometheus_client or metrics.py."""
    require_server()
    env = {"PATH": os.environ["PATH"], "QMAILHOME": home.path, "QMAILQUEUE": home.queue.path,
           "TCPREMOTEIP": "127.0.0.1"}
    modules, p = imported([SERVER], input=crlf(*KINDS[0][:3], b"QUIT"), env=env)
    assert b"250 ok" in p.stdout and "qmail_smtpd_py.driver" in modules
    assert not {m for m in modules if "prometheus" in m or m.endswith(".metrics")}
    log = tmp_path / "pool.log"
    with open(log, "wb") as err:
        pool = subprocess.Popen([sys.executable, "-X", "importtime", "-I", SERVER, "serve",
                                 "-v", "-H", "--root", "127.0.0.1", str(free_port())],
                                env=env, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: b"status: 0/" in log.read_bytes() or pool.poll() is not None)
    finally:
        os.killpg(pool.pid, signal.SIGTERM)
        pool.wait(TIMEOUT)
    text = log.read_bytes().decode()
    assert "qmail_smtpd_py.pool" in text and "status: 0/" in text
    assert "prometheus" not in text and "qmail_smtpd_py.metrics" not in text

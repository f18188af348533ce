#!/usr/bin/env python3
"""A long-running fuzzer for the sans-I/O session core (qmail_smtpd_py.session).

Each session is built from its own seed (master seed + session number), so any
session can be replayed alone with --replay SEED. It picks a configuration (plain;
qmail-spp plugins that answer random command letters; AUTH modes with a checkpassword
that says yes or no; STARTTLS / SMTPS / FORCETLS / TLSREQUIRED; SMTPEXTFORK programs;
databytes, badmailfrom, a small max_line, random qmail-queue outcomes), generates a
client byte stream (valid commands, random bytes, NULs, bare CR and LF, long lines,
DATA with random bodies and smuggling sequences, AUTH dialogues, all pipelined) and
drives the core in-process through the tests' reference world (t/world.py),
subclassed here to answer the core's requests with seeded random outcomes.

Invariants checked after every session:
  * the core ends with an Exit request (status 0 or 1) within a bounded number of
    steps, and raises nothing;
  * the output is a sequence of CRLF-terminated lines, each a valid SMTP reply line
    (3 digits then space or '-'), except lines that a plugin printed verbatim;
  * every close, refuse and accept log line carries the fact (requests.Closed,
    Refused, Accepted) that its text states, and only those lines carry one;
  * nothing is queued without a final `250 ok <time> qp <pid>` right after it, and
    every such reply belongs to a queued message; queued envelopes are well formed;
  * the same input cut into other random chunks gives the same output, messages and
    exit status (sessions with STARTTLS excepted: the pipelined plaintext after it is
    dropped, and how much of it was buffered depends on the chunks).

Usage: fuzz_session.py [--seconds N] [--sessions N] [--seed S] [--replay SEED]
Prints sessions tried, failures and sessions/s; exits 1 on any failure, saving each
failing session under fuzz/failures/ (input bytes, configuration, traceback).
"""

import argparse
import base64
import json
import os
import random
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "t"))  # the reference world

from qmail_smtpd_py.core import requests as rq  # noqa: E402
from qmail_smtpd_py.core.auth import parse_mode  # noqa: E402
from qmail_smtpd_py.core.config import Config  # noqa: E402
from qmail_smtpd_py.core.session import Session  # noqa: E402

from world import BASE_ENV, FIXED_TIME, QP, World, fact_of  # noqa: E402

ACCEPT = b"250 ok %d qp %d" % (int(FIXED_TIME), QP)
RE_REPLY = re.compile(rb"\A[0-9]{3}[ -]")
RE_ACCEPT = re.compile(rb"\A250 ok [0-9]+ qp [0-9]+\Z")
MAX_STEPS_BASE = 20000


class Failure(Exception):
    pass


# ------------------------------------------------------------------ configurations


def make_config(rng):
    """(Config, env, description, effect answers settings) for one session."""
    desc = {}
    kw = dict(greeting=b"mx.example.org", localiphost=b"mx.example.org",
              rcpthosts={b"example.com", b".sub.example.net"})
    env = dict(BASE_ENV)
    if rng.random() < 0.2:
        kw["databytes"] = rng.choice([1, 10, 100, 1000])
    if rng.random() < 0.2:
        kw["badmailfrom"] = {b"bad@evil.test", b"@spam.test"}
    if rng.random() < 0.15:
        kw["max_line"] = rng.choice([20, 100, 1000])
    if rng.random() < 0.1:
        kw["rcpthosts"] = None
    if rng.random() < 0.4:
        sections = {}
        n = 0
        for letter in (b"c", b"h", b"m", b"r", b"d", b"a"):
            entries = []
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                n += 1
                entries.append(rng.choice([b"plugins/p%d" % n, b":echo %d" % n]))
            sections[letter] = entries
        kw["plugins"] = sections
        desc["spp"] = True
    if rng.random() < 0.4:
        smtpauth = rng.choice([b"", b"", b"!", b"cram", b"+cram", b"!cram", b"!+cram", b"-",
                               None])
        kw["auth_mode"] = parse_mode(smtpauth)
        kw["checkpassword"] = (b"/bin/checkpassword", b"/bin/true")
        if rng.random() < 0.2:
            kw["auth_hostname"] = b"auth.example"
        desc["auth"] = repr(smtpauth)
    if rng.random() < 0.3:
        kw["tls"] = True
        if rng.random() < 0.5:
            kw["tls_clients"] = frozenset({b"c@client.test"})
        kw["smtps"] = rng.random() < 0.15
        kw["force_tls"] = rng.random() < 0.3
        kw["require_tls"] = rng.random() < 0.2
        desc["tls"] = "smtps" if kw["smtps"] else "starttls"
    if rng.random() < 0.25:
        env[b"SMTPEXTFORK"] = rng.choice([b"/x/a", b"/x/a,/x/b", b",/x/a,,"])
        if rng.random() < 0.3:
            env[b"554SMTPEXTFORK"] = b"custom text"
        desc["extfork"] = True
    kw["log_level"] = rng.choice([0, 1, 1, 2, 3])
    if rng.random() < 0.2:
        kw["plugin_time_limit"] = rng.choice([1, 30])
    if rng.random() < 0.2:
        kw["program_time_limit"] = rng.choice([1, 30])
    kw["smtputf8"] = rng.random() < 0.2
    if rng.random() < 0.15:
        env[b"RELAYCLIENT"] = rng.choice([b"", b"+rc"])
    if rng.random() < 0.1:
        env[b"TCPREMOTEHOST"] = b"client.test"
    if rng.random() < 0.05:
        env = {}
    desc["config"] = {k: repr(sorted(v) if isinstance(v, (set, frozenset)) else v)
                      for k, v in kw.items() if k not in ("greeting", "localiphost")}
    return Config(**kw), env, desc


# ------------------------------------------------------------------ client input

ADDRS = [b"a@b.c", b"", b"u@example.com", b"x@other.org", b"bad@evil.test", b"q@spam.test",
         b"v@x.sub.example.net", b"a@[127.0.0.1]", b"a@[8.8.8.8]", b"\"q u\"@example.com",
         b"@r1,@r2:d@example.com", b"a\\>b@example.com", b"x" * 950 + b"@example.com"]
VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP",
         b"QUIT", b"AUTH", b"STARTTLS", b"EXPN", b"BDAT", b"helo", b"mAiL", b""]
SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\n.\r", b"\r\n\x00.\r\n",
           b"\r\n.\x00\r\n", b"\r.\r\n", b"\r\n.\r\r\n", b"\r\n..\r\n", b"\r\r\n.\r\r\n"]


def rand_bytes(rng, n, alphabet=None):
    if alphabet is None:
        return rng.randbytes(n)
    return bytes(rng.choices(alphabet, k=n))


def eol(rng):
    return rng.choices([b"\r\n", b"\n", b"\r", b"", b"\r\r\n"], [85, 8, 3, 1, 3])[0]


def b64(data):
    return base64.b64encode(data)


def addr(rng):
    a = rng.choice(ADDRS)
    if rng.random() < 0.1:
        a = rand_bytes(rng, rng.randint(0, 30))
    return a


def body(rng):
    parts = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.4:
            line = rand_bytes(rng, rng.randint(0, 40), b"abc .:Received-\x00\xff\r")
        elif r < 0.55:
            line = b"." + rand_bytes(rng, rng.randint(0, 5), b".a\r")
        elif r < 0.65:
            line = rng.choice([b"Received: x", b"Delivered-To: y", b"", b"."])
        elif r < 0.75:
            line = rng.choice(SMUGGLE) + rng.choice(
                [b"MAIL FROM:<s@evil.test>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nx", b"QUIT"])
        elif r < 0.8:
            line = rng.choice([b"x", b".", b"\r", b"ab"]) * rng.choice([500, 1000, 40000])
        else:
            line = rand_bytes(rng, rng.randint(0, 30))
        parts.append(line + eol(rng))
    if rng.random() < 0.1:
        parts.append(b"Received: loop\r\n" * 101)
    if rng.random() < 0.9:
        parts.append(rng.choice([b"\r\n.\r\n", b".\r\n"]))
    return b"".join(parts)


def auth_dialogue(rng):
    mech = rng.choice([b"LOGIN", b"PLAIN", b"CRAM-MD5", b"login", b"plain", b"cram-md5",
                       b"XOAUTH", b""])
    user = rng.choice([b"joe", b"anyone", b"", b"a\0b", rand_bytes(rng, 8)])
    pw = rng.choice([b"secret", b"", rand_bytes(rng, 5)])
    garbage = rng.choice([b"*", b"!!!", b"=", b"", rand_bytes(rng, 6)])
    lines = []
    if mech.lower() == b"plain":
        if rng.random() < 0.5:
            lines.append(b"AUTH " + mech + b" " + b64(b"\0" + user + b"\0" + pw))
        else:
            lines += [b"AUTH " + mech, rng.choice([b64(b"\0" + user + b"\0" + pw), garbage])]
    elif mech.lower() == b"login":
        if rng.random() < 0.5:
            lines += [b"AUTH " + mech + b" " + b64(user), rng.choice([b64(pw), garbage])]
        else:
            lines += [b"AUTH " + mech, rng.choice([b64(user), garbage]), b64(pw)]
    elif mech.lower() == b"cram-md5":
        lines += [b"AUTH " + mech, rng.choice([b64(user + b" " + b"0" * 32), garbage])]
    else:
        lines.append(b"AUTH " + mech)
    return b"".join(line + eol(rng) for line in lines)


def command(rng):
    r = rng.random()
    if r < 0.1:
        return rng.choice([b"HELO ", b"EHLO ", b"helo ", b"EHLO"]) + rng.choice(
            [b"c.test", b"", b"[1.2.3.4] x", rand_bytes(rng, 10)]) + eol(rng)
    if r < 0.25:
        return b"MAIL FROM:<" + addr(rng) + b">" + rng.choice(
            [b"", b" SIZE=10", b" SIZE=99999999", b" AUTH=<joe>", b" AUTH=x(y)"]) + eol(rng)
    if r < 0.42:
        return rng.choice([b"RCPT TO:<", b"rcpt to:", b"RCPT "]) + addr(rng) + b">" + eol(rng)
    if r < 0.55:
        return b"DATA" + eol(rng) + body(rng)
    if r < 0.62:
        return auth_dialogue(rng)
    if r < 0.65:
        return b"STARTTLS" + rng.choice([b"", b" x"]) + eol(rng)
    if r < 0.75:
        return rng.choice(VERBS) + rng.choice([b"", b" ", b" x", b"\tx"]) + eol(rng)
    if r < 0.82:
        return rand_bytes(rng, rng.randint(0, 50)) + eol(rng)
    if r < 0.86:
        return rng.choice([b"\0", b"\r", b"\n", b"\r\r\n", b"\0\r\n", b"NOOP\0x\r\n"])
    if r < 0.89:
        return rng.choice([b"NOOP ", b"HELO ", b"MAIL FROM:<"]) + b"x" * rng.choice(
            [100, 1000, 5000, 70000]) + eol(rng)
    if r < 0.9:
        return b"QUIT" + eol(rng)
    return rng.choice([b"RSET", b"NOOP", b"VRFY x", b"HELP"]) + eol(rng)


def make_input(rng):
    n = rng.choice([1, 3, 8, 20, 40])
    data = b"".join(command(rng) for _ in range(n))
    if rng.random() < 0.5:
        data += b"QUIT\r\n"
    return data


def chunk(rng, data):
    """data cut at random places (a few large pieces, or many small ones)."""
    if not data:
        return [data]
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice([0, 1, 3, 20])))
    if rng.random() < 0.05 and len(data) < 3000:
        cuts = list(range(len(data)))
    pieces, last = [], 0
    for c in cuts + [len(data)]:
        if c > last:
            pieces.append(data[last:c])
            last = c
    return pieces


# ------------------------------------------------------------------ the driver

PLUGIN_LETTERS = [b"N", b"O", b"A", b"E", b"R", b"D", b"P", b"LM", b"LR", b"LD", b"H", b"C",
                  b"S", b"U", b"X", b""]


class RandomWorld(World):
    """The reference world with seeded random outcomes.  Plugin texts it
    printed are recorded, so that their lines are accepted in the output;
    marks are the numbers (0, 1, ...) of the messages given a 354 that
    qmail-queue accepted."""

    def __init__(self, pieces, seed):
        super().__init__(pieces)
        self.rng = random.Random(seed)
        self.plugin_texts = set()
        self.marks = []
        self._go_aheads = 0  # messages that got (or will get) their 354
        self._write_ok = True

    def write_log(self, request):
        # One event, one line of printable text: client bytes are escaped.
        text = request.text
        if text is None:  # SMTPLOGLEVEL 0: the facts of events still come, alone
            if request.fact is None:
                raise Failure("a Log request with neither text nor fact")
            return
        if not text.isprintable() or not text.isascii():
            raise Failure("log line not one printable line: %r" % text)
        # The metrics count the facts: each must say what its line says.
        if request.fact != fact_of(text):
            raise Failure("fact %r for the line %r" % (request.fact, text))

    def sleep(self, request):
        pass

    def start_queue(self, request):
        # decided per message: how many WriteQueues there are depends on the chunks
        self._write_ok = self.rng.random() > 0.02
        self.queue_start = self.rng.choices(
            [rq.Started(QP), rq.CannotStart(rq.EXEC, "x"), rq.CannotStart(rq.FORK, "x"),
             rq.CannotStart(rq.PIPE, "x")], [95, 3, 1, 1])[0]
        if self.queue_start in (rq.Started(QP), rq.CannotStart(rq.EXEC, "x")):
            self._go_aheads += 1
        return super().start_queue(request)

    def write_queue(self, request):
        if not isinstance(request.data, (bytes, bytearray)):
            raise Failure("WriteQueue of %r" % type(request.data))
        self.queue_write_fails = not self._write_ok
        return super().write_queue(request)

    def finish_queue(self, request):
        if request.envelope is not None:
            self.queue_status = self.rng.choices(
                [0, 54, 71, 82, 31, rq.Signaled(9), rq.WaitFailed("ECHILD")],
                [90, 2, 2, 2, 2, 1, 1])[0]
            self.queue_errtext = b"Dcustom (#5.7.1)" if self.queue_status == 82 else b""
            if self.queue_status == 82:
                self.plugin_texts.add(b"554 custom (#5.7.1)")
        outcome = super().finish_queue(request)
        if outcome == rq.Exited(0, self.queue_errtext):
            self.marks.append(self._go_aheads - 1)
        return outcome

    def start_plugin(self, request):
        rng = self.rng
        self.plugin_runs.append((request.argv, request.env))
        failure = rng.choices([None, rq.CannotStart(rq.EXEC), rq.CannotStart(rq.FORK),
                               rq.CannotStart(rq.PIPE)], [95, 2, 2, 1])[0]
        if failure is not None:
            return failure
        lines = []
        for _ in range(rng.choice([0, 1, 1, 2, 4])):
            letter = rng.choice(PLUGIN_LETTERS)
            if letter in (b"E", b"R", b"P", b"LM", b"LR", b"LD"):
                text = rng.choice([b"550 plugin says no", b"451 later", b"250-multi",
                                   b"plugin text without a code", b"", b"554 " + b"y" * 300])
                self.plugin_texts.add(text)
                lines.append(letter + text)
            elif letter == b"H":
                lines.append(b"HX-Plugin: " + rand_bytes(rng, 5, b"ab\r"))
            elif letter == b"C":
                lines.append(b"C" + rng.choice(ADDRS[:6]))
            elif letter == b"S":
                lines.append(rng.choice([b"SRELAYCLIENT=", b"SFOO=bar", b"SX"]))
            elif letter == b"U":
                lines.append(rng.choice([b"URELAYCLIENT", b"UFOO"]))
            else:
                lines.append(letter)
        out = [line + b"\n" for line in lines]
        if out and rng.random() < 0.2:
            out[-1] = out[-1][:-1]
        self._lines = out
        self._end = rng.choices([rq.Exited(0), rq.Exited(1), rq.Exited(120), rq.Signaled(9),
                                 rq.TIMED_OUT, rq.WaitFailed()], [90, 5, 2, 1, 1, 1])[0]
        if self._end == rq.TIMED_OUT and request.time_limit is None:  # no limit: no timeout
            self._end = rq.Signaled(9)
        return rq.Started(QP + 1)

    def check_password(self, request):
        return self.rng.choices(
            [rq.Exited(0), rq.Exited(1), rq.Exited(111), rq.Signaled(9),
             rq.CannotStart(rq.FORK), rq.CannotStart(rq.PIPE), rq.CannotStart(rq.EXEC),
             rq.WRITE_FAILED, rq.WaitFailed()], [50, 40, 2, 2, 2, 2, 2, 2, 1])[0]

    def run_program(self, request):
        outcome = self.rng.choices(
            [rq.Exited(code) for code in (0, 100, 101, 102, 103, 104, 105, 106, 107, 108, 111, 1)]
            + [rq.Signaled(9), rq.TIMED_OUT, rq.CannotStart(rq.FORK), rq.CannotStart(rq.EXEC),
               rq.WaitFailed()],
            [60] + [3] * 16)[0]
        if outcome == rq.TIMED_OUT and request.time_limit is None:
            outcome = rq.Signaled(9)
        return outcome

    def local_ips(self, request):
        return self.rng.choices([frozenset({(0, 0, 0, 0), (127, 0, 0, 1)}), rq.Failed("x")],
                                [98, 2])[0]

    def start_tls(self, request):
        return self.rng.choices([rq.TLSReady(request.client_ca, ("a warning",)),
                                 rq.TLSSetupFailed(rq.TLS_CERTIFICATE, b"x"),
                                 rq.TLSSetupFailed(rq.TLS_CONTEXT)], [90, 5, 5])[0]

    def handshake(self, request):
        return self.rng.choices([rq.Secured(b"TLS_AES_256_GCM_SHA384"),
                                 rq.HandshakeFailed(rq.TLS_ERROR, b"bad record"),
                                 rq.HandshakeFailed(rq.TLS_TIMEOUT)], [90, 5, 5])[0]

    def client_certificate(self, request):
        return self.rng.choice([rq.NO_CERTIFICATE, rq.PeerCertificate((b"c@client.test",)),
                                rq.PeerCertificate((), b"unable to get local issuer"),
                                rq.PeerCertificate((b"x@y",))])


def drive(cfg, env, pieces, seed, max_steps):
    """Run one session; returns (output, queued, exit, marks, plugin texts)."""
    world = RandomWorld(pieces, seed)
    try:
        world.play(Session(cfg, dict(env), b"77").run(), max_steps)
    except AssertionError as e:
        raise Failure(str(e)) from None
    except StopIteration:
        raise Failure("the core returned without an Exit request") from None
    return bytes(world.output), world.queued, world.exit, world.marks, world.plugin_texts


def check(output, queued, code, marks, plugin_texts):
    if code not in (0, 1):
        raise Failure("exit status %r" % code)
    if output and not output.endswith(b"\r\n"):
        raise Failure("output does not end with CRLF: %r" % output[-80:])
    lines = output.split(b"\r\n")[:-1]
    accepts = 0
    for line in lines:
        if RE_ACCEPT.match(line):
            accepts += 1
        if b"\n" in line or b"\r" in line:
            if line not in plugin_texts:
                raise Failure("bare CR/LF inside a reply line: %r" % line[:200])
        if not RE_REPLY.match(line) and line not in plugin_texts:
            raise Failure("not an SMTP reply line: %r" % line[:200])
    if accepts != len(queued):
        raise Failure("%d `250 ok <time> qp <pid>` replies but %d messages queued"
                      % (accepts, len(queued)))
    # The reply right after each 354 is that message's: accepted exactly
    # for the messages qmail-queue accepted.
    finals = [lines[i + 1] if i + 1 < len(lines) else None
              for i, line in enumerate(lines) if line == b"354 go ahead"]
    accepted = [i for i, final in enumerate(finals) if final is not None
                and RE_ACCEPT.match(final)]
    if accepted != marks:
        raise Failure("messages %r accepted by qmail-queue, but %r got a 250 after their 354"
                      % (marks, accepted))
    for message, envelope in queued:
        if not message.startswith(b"Received: "):
            raise Failure("queued message without our Received line: %r" % message[:100])
        if not (envelope[:1] == b"F" and envelope.endswith(b"\0\0")
                and envelope.count(b"\0T") >= 1):
            raise Failure("malformed envelope %r" % envelope[:200])


def one_session(seed):
    """Run session `seed`; returns (input, description) and raises on a failure."""
    rng = random.Random(seed)
    cfg, env, desc = make_config(rng)
    data = make_input(rng)
    timeout = rng.random() < 0.05
    pieces = chunk(rng, data) + ([None] if timeout else [])
    max_steps = MAX_STEPS_BASE + 4 * len(data)
    answer_seed = rng.getrandbits(64)
    info = {"seed": seed, "desc": desc, "input": data, "timeout": timeout}
    try:
        first = drive(cfg, env, pieces, answer_seed, max_steps)
        check(*first)
        if b"starttls" not in data.lower():
            other = chunk(random.Random(answer_seed ^ 1), data) + ([None] if timeout else [])
            again = drive(cfg, env, other, answer_seed, max_steps)
            if again[:3] != first[:3]:
                raise Failure("another chunking gives another result:\n%r\nvs\n%r"
                              % (first[0][-300:], again[0][-300:]))
    except Exception as e:  # noqa: BLE001 - every exception is a finding
        info["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        raise Failure(info) from e
    return info


def save(info, directory):
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "session-%d" % info["seed"])
    with open(base + ".input", "wb") as f:
        f.write(info["input"])
    meta = dict(info, input=info["input"].decode("latin-1"))
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1, default=repr)
    return base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None,
                   help="run for this long (default 60, or unlimited with --sessions)")
    p.add_argument("--sessions", type=int, default=None, help="stop after this many sessions")
    p.add_argument("--seed", type=int, default=None, help="master seed (default: random)")
    p.add_argument("--replay", type=int, default=None, help="run one session seed, verbosely")
    p.add_argument("--failures", default=os.path.join(HERE, "failures"),
                   help="where failing sessions are saved")
    p.add_argument("--max-failures", type=int, default=20)
    args = p.parse_args(argv)

    if args.replay is not None:
        try:
            info = one_session(args.replay)
        except Failure as f:
            info = f.args[0]
            print(json.dumps(dict(info, input=info["input"].decode("latin-1")),
                             indent=1, default=repr))
            return 1
        print("session %d passed (%d input bytes, %s)" % (args.replay, len(info["input"]),
                                                           info["desc"]))
        return 0

    seconds = args.seconds
    if seconds is None and args.sessions is None:
        seconds = 60.0
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print("fuzz_session: seed %d (replay one session with --replay <seed+n>)" % seed,
          flush=True)
    start = time.monotonic()
    deadline = None if seconds is None else start + seconds
    tried = failures = 0
    input_bytes = 0
    next_report = start + 30
    while True:
        if args.sessions is not None and tried >= args.sessions:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now >= next_report:
            print("  %d sessions, %d failures, %.0f sessions/s" % (
                tried, failures, tried / (now - start)), flush=True)
            next_report = now + 30
        session_seed = seed * 1000003 + tried
        tried += 1
        try:
            info = one_session(session_seed)
            input_bytes += len(info["input"])
        except Failure as f:
            failures += 1
            info = f.args[0]
            base = save(info, args.failures)
            print("FAIL session seed %d (saved %s.*):\n%s" % (
                session_seed, base, info["error"][-2000:]), flush=True)
            if failures >= args.max_failures:
                print("too many failures, stopping")
                break
    elapsed = time.monotonic() - start
    rate = tried / elapsed if elapsed else 0.0
    print("fuzz_session: seed %d: %d sessions tried, %d failures, %.1f s, %.0f sessions/s, "
          "%.1f MB of client input" % (seed, tried, failures, elapsed, rate, input_bytes / 1e6))
    if rate:
        print("  (1,000,000 sessions would take about %.0f min at this rate)"
              % (1e6 / rate / 60))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A long-running fuzzer for the sans-I/O session core (qmail_smtpd_py.session).

Each session is built from its own seed (master seed + session number), so any
session can be replayed alone with --replay SEED. It picks a configuration (plain;
qmail-spp plugins that answer random command letters; AUTH modes with a checkpassword
that says yes or no; STARTTLS / SMTPS / FORCETLS / TLSREQUIRED; SMTPEXTFORK programs;
databytes, badmailfrom, a small max_line, random qmail-queue outcomes), generates a
client byte stream (valid commands, random bytes, NULs, bare CR and LF, long lines,
DATA with random bodies and smuggling sequences, AUTH dialogues, all pipelined) and
drives the core in-process the way t/transcript.py does, fulfilling its requests
with seeded random answers.

Invariants checked after every session:
  * the core ends with an Exit request (status 0 or 1) within a bounded number of
    steps, and raises nothing;
  * the output is a sequence of CRLF-terminated lines, each a valid SMTP reply line
    (3 digits then space or '-'), except lines that a plugin printed verbatim;
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
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "t"))  # blast_oracle etc. if wanted

from qmail_smtpd_py import effects  # noqa: E402
from qmail_smtpd_py.auth import parse_mode  # noqa: E402
from qmail_smtpd_py.control import Config  # noqa: E402
from qmail_smtpd_py.session import Session  # noqa: E402

FIXED_TIME = 1795311213.5
QP = 4242
ACCEPT = b"250 ok %d qp %d" % (int(FIXED_TIME), QP)
RE_REPLY = re.compile(rb"\A[0-9]{3}[ -]")
RE_ACCEPT = re.compile(rb"\A250 ok [0-9]+ qp [0-9]+\Z")
BASE_ENV = {b"TCPREMOTEIP": b"127.0.0.1", b"TCPLOCALIP": b"127.0.0.1",
            b"TCPLOCALHOST": b"mx.test"}
LOCAL_IPS = frozenset({(0, 0, 0, 0), (127, 0, 0, 1)})
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
    kw["smtputf8"] = rng.random() < 0.2
    if rng.random() < 0.15:
        env[b"RELAYCLIENT"] = rng.choice([b"", b"+rc"])
    if rng.random() < 0.1:
        env[b"TCPREMOTEHOST"] = b"client.test"
    if rng.random() < 0.05:
        env = {}
    desc["config"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kw.items()
                      if k not in ("greeting", "localiphost")}
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


class Answers:
    """Seeded answers to the core's requests; plugin texts it printed are recorded so
    that their lines are accepted in the output."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.plugin_texts = set()

    def plugin_output(self):
        rng = self.rng
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
        out = b"\n".join(lines)
        if lines and rng.random() < 0.8:
            out += b"\n"
        status = rng.choices([0, 1, 120, effects.PLUGIN_CRASHED], [90, 5, 2, 3])[0]
        failure = rng.choices([None, b"can't execute", b"fork() failed"], [95, 3, 2])[0]
        return out, status, failure


def drive(cfg, env, pieces, answers, max_steps):
    """Run one session; returns (output, queued, exit, marks, offered)."""
    session = Session(cfg, dict(env), pid=77)
    rng = answers.rng
    output = bytearray()
    queued = []
    marks = []  # output length when each message was accepted by the queue
    pending = list(pieces)
    message = bytearray()
    plugin_lines = []
    plugin_status = 0
    write_ok = True
    steps = session.run()
    answer = None
    for _ in range(max_steps):
        try:
            request = steps.send(answer)
        except StopIteration:
            raise Failure("the core returned without an Exit request")
        answer = None
        output += session.out
        del session.out[:]
        if request is effects.READ:
            answer = pending.pop(0) if pending else b""
        elif request is effects.NOW:
            answer = FIXED_TIME
        elif request is effects.LOCAL_IPS:
            answer = LOCAL_IPS
        elif isinstance(request, effects.QueueStart):
            message = bytearray()
            # decided per message: how many QueueWrites there are depends on the chunks
            write_ok = rng.random() > 0.02
            answer = rng.choices([QP, effects.QUEUE_EXEC_FAILED, None], [95, 3, 2])[0]
        elif isinstance(request, effects.QueueWrite):
            if not isinstance(request.data, (bytes, bytearray, memoryview)):
                raise Failure("QueueWrite of %r" % type(request.data))
            message += request.data
            answer = write_ok
        elif isinstance(request, effects.QueueFinish):
            if request.envelope is None:
                answer = (54, b"")
            else:
                status = rng.choices([0, 54, 71, 82, 31, effects.QUEUE_CRASHED],
                                     [90, 2, 2, 2, 2, 2])[0]
                errtext = b"Dcustom (#5.7.1)" if status == 82 else b""
                if status == 82:
                    answers.plugin_texts.add(b"554 custom (#5.7.1)")
                if status == 0:
                    queued.append((bytes(message), bytes(request.envelope)))
                    marks.append(len(output))
                answer = (status, errtext)
        elif isinstance(request, effects.Log):
            # One event, one line of printable text: client bytes are escaped.
            text = request.text
            if not text.isprintable() or not text.isascii():
                raise AssertionError("log line not one printable line: %r" % text)
        elif isinstance(request, effects.PluginStart):
            out, plugin_status, failure = answers.plugin_output()
            if failure is not None:
                answer = failure
                continue
            plugin_lines = [line + b"\n" for line in out.split(b"\n")]
            plugin_lines[-1] = plugin_lines[-1][:-1]
        elif isinstance(request, effects.PluginRead):
            lines = [line for line in plugin_lines if line]
            plugin_lines = []
            answer = lines or None
        elif isinstance(request, effects.PluginFinish):
            answer = plugin_status
        elif isinstance(request, effects.CheckPassword):
            answer = rng.choices([0, 1, 111, "child", "fork", "pipe", "write"],
                                 [50, 40, 2, 2, 2, 2, 2])[0]
        elif isinstance(request, effects.RunProgram):
            answer = rng.choices([0, 100, 101, 102, 103, 104, 105, 106, 107, 108, 111, 1,
                                  effects.PROGRAM_CRASHED, effects.PROGRAM_NOT_STARTED],
                                 [60] + [3] * 13)[0]
        elif isinstance(request, effects.Sleep):
            pass
        elif request is effects.TLS_START:
            answer = rng.choices([None, b"missing certificate: x"], [90, 10])[0]
        elif request is effects.TLS_HANDSHAKE:
            answer = rng.choices([(True, b"TLS_AES_256_GCM_SHA384"), (False, b"bad record")],
                                 [90, 10])[0]
        elif request is effects.TLS_CLIENT_CERT:
            answer = rng.choice([(None, None), (b"c@client.test", None), (None, b"no cert")])
        elif isinstance(request, effects.Exit):
            output += session.out
            return bytes(output), queued, request.code, marks
        else:
            raise Failure("unexpected request %r" % (request,))
    raise Failure("no Exit after %d steps" % max_steps)


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
    for mark, (message, envelope) in zip(marks, queued):
        if not output[mark:].startswith(ACCEPT + b"\r\n"):
            raise Failure("message queued without a 250 right after: %r"
                          % output[mark:mark + 100])
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
        answers = Answers(answer_seed)
        first = drive(cfg, env, pieces, answers, max_steps)
        check(*first, answers.plugin_texts)
        if b"starttls" not in data.lower():
            other = chunk(random.Random(answer_seed ^ 1), data) + ([None] if timeout else [])
            again = drive(cfg, env, other, Answers(answer_seed), max_steps)
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

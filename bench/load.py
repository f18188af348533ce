"""Load and integrity test: many parallel SMTP sessions of mixed kinds for a fixed time,
then a check that the queue holds exactly the messages that were acknowledged.

    .venv/bin/python bench/load.py [--seconds 60] [--clients 8] [--mode tcpserver|pool|fork]
                                   [--faults] [--seed N] [--keep]

The server (under tcpserver on 127.0.0.1, or `qmail-smtpd-py serve`) hands every
message to a recording queue program written by this script (C compiled with cc when
available, else a `python -S -I` script).  The queue reads the message (fd 0) and the
envelope (fd 1) to EOF, refuses an incomplete envelope (exit 54, nothing stored) and
otherwise, with --faults, decides only then whether to fail: about 20% of the messages
get exit 71 or 53 (-> 451) or 31 (-> 554), and are not stored.  A stored message is
<name>.env and <name>.msg in the queue directory, each renamed into place complete.

Each client process loops over sessions until the time is up.  A session is HELO/EHLO
and one to three transactions, each one of: accepted mail (1-3 recipients, a body of
200 B - 200 KB, log-uniformly, with lines that need dot-stuffing, lines of a lone dot and
long lines up to 20 000 bytes, 8-bit bytes), the same with recipients refused because
their domain is not in rcpthosts (553) or by the qmail-spp [rcpt] plugin (550 no spam),
an RSET in the middle of the transaction, and DATA without any accepted recipient
(503).  A session ends with QUIT, or by closing the connection, or (aborted DATA) by
closing the connection in the middle of a message body.

Bodies are generated from a recorded seed, so the verification regenerates each one and
compares it byte for byte with what the queue stored (after the server's Received:
header), matching them by the unique Message-ID every message carries, and checks the
envelope.  It fails if the number of stored messages differs from the number of
`250 ok` replies, if an acknowledged message is missing, duplicated or different, or if
a message is stored whose DATA got another reply or was aborted.

The last line is `load: OK <n> messages verified` or `load: FAILED ...` (exit status 1).
"""

import argparse
import collections
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SERVER, start_server, stop_server  # noqa: E402

ME = "load.example"
HOSTS = "example.com\n"
PLUGINS = '[rcpt]\n:case "$SMTPRCPTTO" in spam*) echo "E550 no spam";; esac\n'
REPLY_TIMEOUT = 60.0

# ------------------------------------------------------------------ recording queue

# Exit codes with --faults, each with its per-mille probability (20% in all).
FAULTS = ((71, 80), (53, 40), (31, 80))

QUEUE_C = r'''
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *qdir = QDIR;
static int faults = FAULTSON;

static char *readall(int fd, size_t *len)
{
  size_t cap = 65536, n = 0;
  char *b = malloc(cap);
  if (!b) exit(51);
  for (;;) {
    ssize_t r;
    if (n == cap) { cap *= 2; b = realloc(b, cap); if (!b) exit(51); }
    r = read(fd, b + n, cap - n);
    if (r < 0) { if (errno == EINTR) continue; exit(54); }
    if (r == 0) break;
    n += r;
  }
  *len = n;
  return b;
}

/* 0 for a complete envelope F<sender>\0 (T<rcpt>\0)* \0 with at least one T */
static int envbad(const char *e, size_t n)
{
  size_t i = 0; int rcpts = 0;
  if (n == 0 || e[0] != 'F') return 1;
  while (i < n && e[i]) ++i;
  if (i >= n) return 1;
  ++i;
  for (;;) {
    if (i >= n) return 1;
    if (e[i] == 0) return (i + 1 == n && rcpts) ? 0 : 1;
    if (e[i] != 'T') return 1;
    while (i < n && e[i]) ++i;
    if (i >= n) return 1;
    ++i; ++rcpts;
  }
}

static void put(const char *tmp, const char *final, const char *b, size_t n)
{
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
  size_t off = 0;
  if (fd < 0) exit(53);
  while (off < n) {
    ssize_t w = write(fd, b + off, n - off);
    if (w < 0) { if (errno == EINTR) continue; unlink(tmp); exit(53); }
    off += w;
  }
  if (close(fd) != 0) { unlink(tmp); exit(53); }
  if (rename(tmp, final) != 0) { unlink(tmp); exit(53); }
}

static void mark(const char *sub, int code, unsigned long long rnd)
{
  char p[4096];
  int fd;
  snprintf(p, sizeof p, "%s/%s/%d.%ld.%llx", qdir, sub, code, (long) getpid(), rnd);
  fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd >= 0) close(fd);
}

int main(void)
{
  size_t mlen, elen;
  char *msg = readall(0, &mlen);
  char *env = readall(1, &elen);
  unsigned long long rnd = 0;
  char tmp[4096], fin[4096];
  struct timespec ts;
  int fd = open("/dev/urandom", O_RDONLY);
  if (fd < 0 || read(fd, &rnd, sizeof rnd) != sizeof rnd) exit(55);
  close(fd);
  clock_gettime(CLOCK_REALTIME, &ts);
  if (envbad(env, elen)) { mark("refused", 54, rnd); return 54; }
  if (faults) {
    unsigned int r = (unsigned int) (rnd >> 32) % 1000, acc = 0;
    FAULTTABLE
  }
  snprintf(tmp, sizeof tmp, "%s/tmp/%ld.%lld.%llx.env", qdir, (long) getpid(),
           (long long) ts.tv_sec, rnd);
  snprintf(fin, sizeof fin, "%s/new/%ld.%lld.%llx.env", qdir, (long) getpid(),
           (long long) ts.tv_sec, rnd);
  put(tmp, fin, env, elen);
  tmp[strlen(tmp) - 3] = 0; strcat(tmp, "msg");
  fin[strlen(fin) - 3] = 0; strcat(fin, "msg");
  put(tmp, fin, msg, mlen);
  return 0;
}
'''

QUEUE_PY = r'''#!%(python)s -SI
import os, sys
QDIR = %(qdir)r
FAULTS = %(faults)r

def readall(fd):
    parts = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(parts)
        parts.append(b)

def envbad(e):
    if not e.startswith(b"F") or not e.endswith(b"\0\0"):
        return True
    fields = e[:-1].split(b"\0")[:-1]
    return len(fields) < 2 or not all(f.startswith(b"T") for f in fields[1:])

def mark(sub, code, rnd):
    name = os.path.join(QDIR, sub, "%%d.%%d.%%x" %% (code, os.getpid(), rnd))
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL))

def put(name, data):
    tmp = os.path.join(QDIR, "tmp", name)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(QDIR, "new", name))
    except OSError:
        sys.exit(53)

msg = readall(0)
env = readall(1)
rnd = int.from_bytes(os.urandom(8), "little")
if envbad(env):
    mark("refused", 54, rnd)
    sys.exit(54)
r = (rnd >> 32) %% 1000
acc = 0
for code, permille in FAULTS:
    acc += permille
    if r < acc:
        mark("refused", code, rnd)
        sys.exit(code)
base = "%%d.%%x" %% (os.getpid(), rnd)
put(base + ".env", env)
put(base + ".msg", msg)
'''


def make_queue(root, qdir, faults):
    """Write the recording queue program; returns (path, kind)."""
    for sub in ("tmp", "new", "refused"):
        os.makedirs(os.path.join(qdir, sub))
    path = os.path.join(root, "record-queue")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and not os.environ.get("LOAD_PYTHON_QUEUE"):
        table = "".join("acc += %d; if (r < acc) { mark(\"refused\", %d, rnd); return %d; }\n"
                        % (permille, code, code) for code, permille in FAULTS)
        src = (QUEUE_C.replace("QDIR", json.dumps(qdir)).replace("FAULTSON", "1" if faults else "0")
               .replace("FAULTTABLE", table))
        with open(path + ".c", "w") as f:
            f.write(src)
        if subprocess.run([cc, "-O2", "-o", path, path + ".c"]).returncode == 0:
            return path, "C"
    with open(path, "w") as f:
        f.write(QUEUE_PY % {"python": sys.executable, "qdir": qdir,
                            "faults": FAULTS if faults else ()})
    os.chmod(path, 0o755)
    return path, "python -SI"


# ------------------------------------------------------------------ messages

def body_lines(seed, size):
    """The message body (after the headers) as a list of lines without line ends."""
    rng = random.Random(seed)
    lines, total = [], 0
    printable = bytes(range(0x20, 0x7f))
    eight = bytes(range(0x80, 0x100))
    while total < size:
        kind = rng.random()
        if kind < 0.06:
            line = b"." * rng.randint(1, 3) + bytes(
                rng.choice(printable) for _ in range(rng.randint(0, 60)))
        elif kind < 0.08:
            line = b"."
        elif kind < 0.10:
            line = b""
        elif kind < 0.13:
            n = rng.randint(1000, 20000)
            line = (b"long-" + bytes([rng.choice(printable)]) * n)[:n]
        elif kind < 0.15:
            line = bytes(rng.choice(eight) for _ in range(rng.randint(1, 40)))
        else:
            n = rng.randint(1, 78)
            line = bytes(rng.choice(printable) for _ in range(n)).rstrip(b".")
            if rng.random() < 0.1:
                line = b"\t" + line
        lines.append(line)
        total += len(line) + 2
    return lines


def message_lines(mid, sender, rcpts, seed, size):
    head = [b"From: <" + sender + b">", b"To: " + b", ".join(b"<" + r + b">" for r in rcpts),
            b"Subject: load test " + mid.encode(), b"Message-ID: <" + mid.encode() + b">", b""]
    return head + body_lines(seed, max(0, size - 150))


def wire(lines):
    """The DATA payload as sent: CRLF lines, dot-stuffed (no terminating dot)."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)


def queued(lines):
    """The message as the server should hand it to the queue (after its Received:)."""
    return b"".join(line + b"\n" for line in lines)


def strip_received(msg):
    """msg without its leading Received: header (first line and continuation lines)."""
    if not msg.startswith(b"Received: "):
        return None
    pos = msg.index(b"\n") + 1
    while msg[pos:pos + 1] in (b" ", b"\t"):
        pos = msg.index(b"\n", pos) + 1
    return msg[pos:]


def message_id(msg):
    pos = msg.find(b"\nMessage-ID: <")
    if pos < 0:
        return None
    end = msg.find(b">", pos)
    return msg[pos + 14:end].decode("ascii", "replace")


# ------------------------------------------------------------------ client

class SessionError(Exception):
    pass


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.buf = b""

    def reply(self):
        """The next complete reply: (code, text of its last line)."""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SessionError("connection closed by server, pending %r" % self.buf[:200])
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            if len(line) >= 4 and line[3:4] == b" " or len(line) == 3:
                return int(line[:3]), line.rstrip(b"\r")
            if not (len(line) >= 4 and line[3:4] == b"-"):
                raise SessionError("malformed reply line %r" % line[:200])

    def cmd(self, data):
        self.sock.sendall(data)
        return self.reply()

    def close(self, reset=False):
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.sock.close()


class Client:
    def __init__(self, index, port, seed):
        self.index = index
        self.port = port
        self.rng = random.Random(seed)
        self.seq = 0
        self.stats = collections.Counter()
        self.codes = collections.Counter()  # refusals: "<code> <command>"
        self.records = []  # every message for which DATA got a 354
        self.errors = []

    def expect(self, got, want, what):
        code, line = got
        if code != want:
            raise SessionError("%s: expected %d, got %r" % (what, want, line))

    def refusal(self, code, command):
        self.codes["%d %s" % (code, command)] += 1

    def rcpt(self, conn, kind):
        n = self.rng.randint(0, 99999)
        addr = {"good": b"u%d@example.com" % n, "relay": b"u%d@elsewhere.test" % n,
                "spam": b"spam%d@example.com" % n}[kind]
        code, line = conn.cmd(b"RCPT TO:<" + addr + b">\r\n")
        want = {"good": (250, b"250 ok"), "relay": (553, b"553 sorry, that domain isn't in my "
                                                         b"list of allowed rcpthosts (#5.7.1)"),
                "spam": (550, b"550 no spam")}[kind]
        if (code, line) != want:
            raise SessionError("RCPT %s (%s): got %r" % (addr, kind, line))
        if code != 250:
            self.refusal(code, "RCPT")
        return addr if code == 250 else None

    def transaction(self, conn, last):
        """One MAIL ... transaction; returns False when the connection was dropped."""
        rng = self.rng
        sender = b"s%d.%d@client.example" % (self.index, self.seq)
        self.expect(conn.cmd(b"MAIL FROM:<" + sender + b">\r\n"), 250, "MAIL")
        kind = rng.random()
        good = rng.randint(1, 3)
        plan = ["good"] * good
        if kind < 0.35:  # some refused recipients among the accepted ones
            plan += rng.choice([["relay"], ["spam"], ["relay", "spam"], ["spam", "spam"]])
        elif kind < 0.45:  # only refused recipients, then DATA anyway
            plan = rng.choice([["relay"], ["spam"], ["relay", "spam"]])
        rng.shuffle(plan)
        rset = rng.random() < 0.12
        if rset:
            plan = plan[:rng.randint(0, len(plan))]
        accepted = [a for a in (self.rcpt(conn, k) for k in plan) if a]
        if rset:
            self.expect(conn.cmd(b"RSET\r\n"), 250, "RSET")
            self.stats["rset"] += 1
            return True
        code, line = conn.cmd(b"DATA\r\n")
        if not accepted:
            if (code, line) != (503, b"503 RCPT first (#5.5.1)"):
                raise SessionError("DATA without recipients: got %r" % line)
            self.refusal(code, "DATA")
            return True
        self.expect((code, line), 354, "DATA")
        self.seq += 1
        mid = "%d.%d.%d.%x@load.test" % (self.index, os.getpid(), self.seq,
                                          rng.getrandbits(32))
        size = int(math.exp(rng.uniform(math.log(200), math.log(200 * 1024))))
        seed = rng.getrandbits(64)
        rec = {"mid": mid, "sender": sender.decode(), "rcpts": [a.decode() for a in accepted],
               "seed": seed, "size": size, "outcome": None}
        self.records.append(rec)
        data = wire(message_lines(mid, sender, accepted, seed, size))
        if last and rng.random() < 0.10:  # aborted DATA
            rec["outcome"] = "aborted"
            conn.sock.sendall(data[:rng.randint(0, len(data) - 1)])
            conn.close(reset=rng.random() < 0.3)
            self.stats["aborted"] += 1
            return False
        rec["outcome"] = "unknown"  # until the reply is in
        code, line = conn.cmd(data + b".\r\n")
        rec["outcome"] = str(code)
        rec["reply"] = line.decode("latin-1")
        if code == 250:
            if not line.startswith(b"250 ok "):
                raise SessionError("DATA end: %r" % line)
            self.stats["accepted"] += 1
        elif code in (451, 554):
            self.refusal(code, "DATA")
        else:
            raise SessionError("end of DATA: unexpected %r" % line)
        return True

    def session(self):
        rng = self.rng
        conn = Conn(self.port)
        try:
            self.expect(conn.reply(), 220, "greeting")
            if rng.random() < 0.5:
                self.expect(conn.cmd(b"EHLO c%d.client.example\r\n" % self.index), 250, "EHLO")
            else:
                self.expect(conn.cmd(b"HELO c%d.client.example\r\n" % self.index), 250, "HELO")
            n = rng.randint(1, 3)
            for i in range(n):
                if not self.transaction(conn, i == n - 1):
                    return
            if rng.random() < 0.8:
                self.expect(conn.cmd(b"QUIT\r\n"), 221, "QUIT")
            conn.close()
        except BaseException:
            conn.close()
            raise

    def run(self, until):
        while time.monotonic() < until:
            try:
                self.session()
                self.stats["sessions"] += 1
            except (SessionError, OSError) as e:
                self.stats["errors"] += 1
                if len(self.errors) < 20:
                    self.errors.append("%s: %s" % (type(e).__name__, e))


def client_main(index, port, seed, until, out):
    c = Client(index, port, seed)
    c.run(until)
    with open(out, "w") as f:
        json.dump({"stats": c.stats, "codes": c.codes, "records": c.records,
                   "errors": c.errors}, f)


# ------------------------------------------------------------------ verification

def verify(qdir, records):
    """A list of problems (empty: all good) and the number of messages verified."""
    problems = []
    new = os.path.join(qdir, "new")
    names = os.listdir(new)
    msgs = sorted(n[:-4] for n in names if n.endswith(".msg"))
    envs = {n[:-4] for n in names if n.endswith(".env")}
    leftovers = os.listdir(os.path.join(qdir, "tmp"))
    if leftovers:
        problems.append("%d half-written files in the queue's tmp/" % len(leftovers))
    for extra in sorted(envs - set(msgs)):
        problems.append("envelope without message in queue: %s" % extra)
    by_mid = {r["mid"]: r for r in records}
    acked = [r for r in records if r["outcome"] == "250"]
    stored = collections.defaultdict(list)
    for name in msgs:
        with open(os.path.join(new, name + ".msg"), "rb") as f:
            msg = f.read()
        env = b""
        if name in envs:
            with open(os.path.join(new, name + ".env"), "rb") as f:
                env = f.read()
        stripped = strip_received(msg)
        mid = message_id(stripped if stripped is not None else msg)
        if stripped is None:
            problems.append("stored message %s (%s) has no leading Received: header" % (name, mid))
        stored[mid].append((name, stripped, env))
    unknown_stored = 0
    for mid, copies in stored.items():
        rec = by_mid.get(mid)
        if rec is None:
            problems.append("stored message %s with unknown Message-ID %r" % (copies[0][0], mid))
        elif rec["outcome"] == "unknown":
            unknown_stored += 1  # the client lost the connection before the reply
        elif rec["outcome"] != "250":
            problems.append("message %s stored although its outcome was %s (%s)" % (
                mid, rec["outcome"], rec.get("reply", "connection closed in the body")))
        if len(copies) > 1:
            problems.append("message %s stored %d times: %s" % (
                mid, len(copies), ", ".join(c[0] for c in copies)))
    if len(msgs) != len(acked) + unknown_stored:
        problems.append("%d messages in the queue, %d `250 ok` replies%s" % (
            len(msgs), len(acked),
            " (+%d stored with the reply unknown)" % unknown_stored if unknown_stored else ""))
    verified = 0
    for rec in acked:
        copies = stored.get(rec["mid"])
        if not copies:
            problems.append("acknowledged message %s (%s) is not in the queue" % (
                rec["mid"], rec["reply"]))
            continue
        sender, rcpts = rec["sender"].encode(), [r.encode() for r in rec["rcpts"]]
        want = queued(message_lines(rec["mid"], sender, rcpts, rec["seed"], rec["size"]))
        want_env = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in rcpts) + b"\0"
        name, got, env = copies[0]
        ok = True
        if got != want:
            ok = False
            got = got or b""
            at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                      min(len(got), len(want)))
            problems.append("message %s (%s) differs: stored %d bytes, expected %d, first "
                            "difference at %d: %r vs %r" % (
                                rec["mid"], name, len(got), len(want), at,
                                got[max(0, at - 20):at + 20], want[max(0, at - 20):at + 20]))
        if env != want_env:
            ok = False
            problems.append("message %s: envelope %r, expected %r" % (rec["mid"], env, want_env))
        verified += ok
    return problems, verified, len(msgs)


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--mode", choices=("tcpserver", "pool", "fork"), default="tcpserver")
    ap.add_argument("--faults", action="store_true", help="queue fails ~20%% of messages")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not os.path.exists(SERVER):
        sys.exit("load: FAILED %s is not installed" % SERVER)
    if args.mode == "tcpserver" and not shutil.which("tcpserver"):
        sys.exit("load: FAILED tcpserver (ucspi-tcp) is not installed")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)

    root = tempfile.mkdtemp(prefix="qsmtpd-load-")
    home = os.path.join(root, "home")
    qdir = os.path.join(root, "queue")
    os.makedirs(os.path.join(home, "control"))
    for name, text in {"me": ME + "\n", "rcpthosts": HOSTS, "smtpplugins": PLUGINS}.items():
        with open(os.path.join(home, "control", name), "w") as f:
            f.write(text)
    queue, kind = make_queue(root, qdir, args.faults)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TCPREMOTEIP": "127.0.0.1",
           "TCPLOCALIP": "127.0.0.1", "TCPLOCALHOST": ME, "QMAILHOME": home,
           "QMAILQUEUE": queue}
    print("load: %s, %d clients, %gs, queue in %s%s, seed %d" % (
        args.mode, args.clients, args.seconds, kind, ", faults ~20%" if args.faults else "",
        seed), flush=True)

    proc, port = start_server(args.mode, env, ME,
                              log=os.path.join(env["QMAILHOME"], "..", "server.log"))
    failed = True
    try:
        started = time.monotonic()
        until = started + args.seconds
        pids = []
        for i in range(args.clients):
            pid = os.fork()
            if pid == 0:
                status = 0
                try:
                    client_main(i, port, seed * 1000 + i, until,
                                os.path.join(root, "client%d.json" % i))
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    status = 1
                os._exit(status)
            pids.append(pid)
        crashed = 0
        for pid in pids:
            crashed += os.waitpid(pid, 0)[1] != 0
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let the server finish with connections the clients dropped
        server_alive = proc.poll() is None
    finally:
        stop_server(proc)

    try:
        stats, codes, records, errors = collections.Counter(), collections.Counter(), [], []
        for i in range(args.clients):
            path = os.path.join(root, "client%d.json" % i)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                d = json.load(f)
            stats.update(d["stats"])
            codes.update(d["codes"])
            records += d["records"]
            errors += d["errors"]
        refused = collections.Counter(int(n.split(".")[0])
                                      for n in os.listdir(os.path.join(qdir, "refused")))
        problems, verified, nstored = verify(qdir, records)
        if crashed:
            problems.insert(0, "%d client processes crashed" % crashed)
        if not server_alive:
            problems.insert(0, "the server exited during the run")
        if args.faults:
            # every 451/554 after DATA should be a refusal by the queue
            for code, qcodes in ((451, (71, 53)), (554, (31,))):
                n_queue = sum(refused[c] for c in qcodes)
                n_client = codes["%d DATA" % code]
                if n_client > n_queue:
                    problems.append("%d DATA answered %d but the queue refused only %d" % (
                        n_client, code, n_queue))
        else:
            bad = sum(v for k, v in codes.items() if k in ("451 DATA", "554 DATA"))
            if bad:
                problems.append("%d messages refused at the end of DATA without faults" % bad)

        by_code = collections.Counter()
        for k, v in codes.items():
            by_code[int(k.split()[0])] += v
        print("load: %.1f sessions/s (%d sessions in %.1fs, %d clients)" % (
            stats["sessions"] / elapsed, stats["sessions"], elapsed, args.clients))
        print("load: messages accepted %d (%.1f/s), stored %d; RSETs %d; aborted DATA %d" % (
            stats["accepted"], stats["accepted"] / elapsed, nstored, stats["rset"],
            stats["aborted"]))
        print("load: rejections by code: %s" % (", ".join(
            "%d: %d (%s)" % (c, by_code[c], ", ".join("%s %d" % (k.split()[1], v)
                                                      for k, v in sorted(codes.items())
                                                      if int(k.split()[0]) == c))
            for c in sorted(by_code)) or "none"))
        print("load: queue refusals by exit code: %s" % (
            ", ".join("%d: %d" % kv for kv in sorted(refused.items())) or "none"))
        print("load: client errors %d" % stats["errors"])
        for e in errors[:10]:
            print("load:   client error: %s" % e)
        if problems:
            for p in problems[:30]:
                print("load:   problem: %s" % p)
            print("load: FAILED %d problem%s (%d of %d acknowledged messages verified; work "
                  "directory %s kept)" % (len(problems), "" if len(problems) == 1 else "s",
                                          verified, stats["accepted"], root))
            return 1
        failed = False
        print("load: OK %d messages verified" % verified)
        return 0
    finally:
        if not failed and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            print("load: work directory %s" % root)


if __name__ == "__main__":
    sys.exit(main())

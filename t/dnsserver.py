"""A small authoritative DNS server on loopback for the DNS plugin tests.

Theory of operation: one thread serves UDP and TCP on 127.0.0.1 at the same
free port, answering from a dict built with dnspython's message API:

    server = DNSServer({
        "example.com": {"MX": ["10 mx.example.com."], "A": ["192.0.2.1"]},
        "v6only.test": {"AAAA": ["2001:db8::25"]},
        "2.0.0.127.zen.test": {"A": ["127.0.0.2"], "TXT": ['"listed, see x"']},
        "broken.test": SERVFAIL,
        "refused.test": REFUSED,
        "slow.test": SLOW,            # the query is read and never answered
        "mixed.test": {"MX": SLOW, "A": ["192.0.2.2"]},   # per type, too
        "odd.test": {"MX": SERVFAIL, "A": NXDOMAIN},
    })
    server.start()   # .port; .queries records (name, type, "udp"/"tcp")
    ...
    server.stop()

Names are case-insensitive and written without the final dot.  A name that
is in the dict answers NOERROR (no answer section for a type it lacks: the
"no data" case); a name that is not answers NXDOMAIN.  The records are read
at each query, so a test may change `server.records` while it runs.  A UDP
answer bigger than 512 bytes (or the client's EDNS size) goes out with TC set
and no records, so the client must retry over TCP, as real servers make it.

It is also a context manager (`with DNSServer(records) as server:`), which
makes the pytest fixture three lines (see test_dns_plugins.py).
`server.cacheip` is the DNSCACHEIP value that points the plugins at it.
"""

import selectors
import socket
import struct
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SERVFAIL = "SERVFAIL"
REFUSED = "REFUSED"
SLOW = "SLOW"
NXDOMAIN = "NXDOMAIN"  # only useful per type: a missing name answers NXDOMAIN anyway

TTL = 60
UDP_LIMIT = 512


class DNSServer:
    def __init__(self, records=None):
        self.records = dict(records or {})
        self.queries = []
        self.port = None
        self._lock = threading.Lock()
        self._stop = None
        self._thread = None
        self._socks = []

    # ------------------------------------------------------------ running

    def start(self):
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:
            raise RuntimeError("no free port for UDP and TCP at once")
        self.port = port
        self._socks = [udp, tcp]
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(udp, tcp), daemon=True)
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._thread is None:
            return
        self._stop_w.send(b"x")
        self._thread.join(10)
        self._thread = None
        for s in self._socks + [self._stop_r, self._stop_w]:
            s.close()

    def _serve(self, udp, tcp):
        sel = selectors.DefaultSelector()
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(tcp, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        held = []  # TCP connections of SLOW queries, kept open until stop
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        wire, peer = udp.recvfrom(65535)
                        reply = self._answer(wire, "udp")
                        if reply is not None:
                            udp.sendto(reply, peer)
                    else:
                        conn, _ = tcp.accept()
                        conn.settimeout(5)
                        try:
                            if not self._serve_tcp(conn):
                                held.append(conn)
                                continue
                        except (OSError, EOFError):
                            pass
                        conn.close()
        finally:
            sel.close()
            for conn in held:
                conn.close()

    def _serve_tcp(self, conn):
        """Answer the queries on one TCP connection; False if one was SLOW
        (the connection is then held open and never answered)."""
        while True:
            head = _recv_exactly(conn, 2)
            if head is None:
                return True
            wire = _recv_exactly(conn, struct.unpack("!H", head)[0])
            if wire is None:
                return True
            reply = self._answer(wire, "tcp")
            if reply is None:
                return False
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    # ------------------------------------------------------------ answering

    def _answer(self, wire, transport):
        """The reply's wire bytes, or None for no reply at all."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype, transport))
            entry = self.records.get(name)
        if isinstance(entry, dict) and isinstance(entry.get(rdtype), str):
            entry = entry[rdtype]  # SERVFAIL, REFUSED, SLOW or NXDOMAIN for this type only
        if entry == SLOW:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if entry is None or entry == NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entry == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry == REFUSED:
            response.set_rcode(dns.rcode.REFUSED)
        elif entry.get(rdtype):
            response.answer.append(dns.rrset.from_text_list(
                question.name, TTL, dns.rdataclass.IN, question.rdtype, entry[rdtype]))
        if transport == "tcp":
            return response.to_wire()
        limit = max(UDP_LIMIT, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer = []
            response.flags |= dns.flags.TC
            return response.to_wire()

    # ------------------------------------------------------------ for tests

    def queried(self, rdtype=None, transport=None):
        """The names asked for so far (optionally only of one type/transport)."""
        with self._lock:
            return [n for n, t, tr in self.queries
                    if (rdtype is None or t == rdtype)
                    and (transport is None or tr == transport)]

    @property
    def cacheip(self):
        """The DNSCACHEIP value pointing at this server."""
        return "127.0.0.1:%d" % self.port


def _recv_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data

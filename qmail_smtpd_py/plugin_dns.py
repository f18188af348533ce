"""DNS for the sample plugins (mfdnscheck, rbl), through dnspython.

Theory of operation: a plugin makes one Lookup per run.  It knows which
nameservers to ask, how long the whole run may spend asking them, and
answers each query with a Result whose status is one of

    FOUND     the name has records of that type
    NOTFOUND  NXDOMAIN, or the name exists without records of that type
    TEMPFAIL  timeout, SERVFAIL/REFUSED from every server, network error:
              ask again later

so that a plugin maps each status to exactly one reply and never sees a
dnspython exception.  Only the DNS plugins import this module (and so
dnspython, the `dns` extra); the server never does.

Nameservers, as djbdns programs find them:

    DNSCACHEIP   nameserver addresses separated by whitespace or commas.
                 An extension for non-standard ports (tests, local caches):
                 `127.0.0.1:5300` and `[::1]:5300`.  A bare IPv6 address
                 (`::1`) means port 53.
    otherwise    the nameserver lines of /etc/resolv.conf; with none,
                 127.0.0.1 (where djbdns expects dnscache).

    DNSTIMEOUT   seconds one plugin run may spend on DNS in total, over
                 all its queries and retries (default 5).  When it is used
                 up, every further query answers TEMPFAIL at once.

Names are looked up as absolute names: resolv.conf's search list is never
applied.
"""

import ipaddress
import os
import time

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

FOUND = "found"
NOTFOUND = "notfound"
TEMPFAIL = "tempfail"

DEFAULT_TIMEOUT = 5.0
PER_TRY = 2.0  # one server's share of the time before the next is tried


class Result:
    """The outcome of one query: status (FOUND/NOTFOUND/TEMPFAIL), the
    rdata objects (empty unless FOUND), a short reason for the log, and
    `nxdomain`: True when the name itself does not exist (NXDOMAIN, or no
    valid DNS name), so no other record type will be found either."""

    __slots__ = ("nxdomain", "reason", "records", "status")

    def __init__(self, status, records=(), reason="", nxdomain=False):
        self.status = status
        self.records = list(records)
        self.reason = reason
        self.nxdomain = nxdomain

    def __repr__(self):
        return "Result(%s, %r, %r)" % (self.status, self.records, self.reason)


def parse_nameservers(text):
    """[(address, port)] from a DNSCACHEIP value; ValueError names the first
    entry that is no IP address (with an optional port)."""
    servers = []
    for item in text.replace(",", " ").split():
        host, port = item, 53
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError("bad nameserver %r" % item)
            if rest:
                port = _port(rest[1:], item)
        elif item.count(":") == 1:  # IPv4:port; a bare IPv6 address has several
            host, port = item.split(":")
            port = _port(port, item)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError("bad nameserver %r" % item) from None
        servers.append((host, port))
    return servers


def _port(text, item):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("bad port in nameserver %r" % item)
    return int(text)


def timeout_from(environ):
    """DNSTIMEOUT as a positive float, DEFAULT_TIMEOUT when unset or bad."""
    try:
        value = float(environ.get("DNSTIMEOUT", ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value < 3600 else DEFAULT_TIMEOUT


def make_resolver(environ=None):
    """A dnspython Resolver for DNSCACHEIP (else /etc/resolv.conf, else
    127.0.0.1).  ValueError if DNSCACHEIP is set but unusable."""
    environ = os.environ if environ is None else environ
    cacheip = environ.get("DNSCACHEIP", "").strip()
    if cacheip:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in parse_nameservers(cacheip)]
        return resolver
    try:
        resolver = dns.resolver.Resolver()
    except (dns.resolver.NoResolverConfiguration, OSError):
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
    return resolver


class Lookup:
    """Queries sharing one time budget (DNSTIMEOUT unless `timeout` is given)."""

    def __init__(self, environ=None, timeout=None, resolver=None):
        environ = os.environ if environ is None else environ
        self.resolver = resolver or make_resolver(environ)
        self.timeout = timeout if timeout else timeout_from(environ)
        self.resolver.timeout = min(PER_TRY, self.timeout)
        self.deadline = time.monotonic() + self.timeout

    def query(self, name, rdtype):
        """Look up `name` (str; made absolute) for `rdtype` ("A", "MX", ...)."""
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".") if name.strip(".") else None
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            return Result(NOTFOUND, reason="not a valid domain name (%s)" % _why(e),
                          nxdomain=True)
        if qname is None:
            return Result(NOTFOUND, reason="empty domain name", nxdomain=True)
        left = self.deadline - time.monotonic()
        if left <= 0:
            return Result(TEMPFAIL, reason="DNS time budget (%gs) used up" % self.timeout)
        try:
            answer = self.resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                           lifetime=left, search=False)
        except dns.resolver.NXDOMAIN:
            return Result(NOTFOUND, reason="NXDOMAIN", nxdomain=True)
        except dns.resolver.NoAnswer:
            return Result(NOTFOUND, reason="no %s record" % rdtype)
        except dns.resolver.YXDOMAIN:
            return Result(NOTFOUND, reason="name too long after DNAME", nxdomain=True)
        except dns.resolver.LifetimeTimeout:
            return Result(TEMPFAIL, reason="timed out after %.1fs" % max(left, 0))
        except dns.resolver.NoNameservers as e:
            return Result(TEMPFAIL, reason="no server answered (%s)" % _why(e))
        except dns.exception.DNSException as e:
            return Result(TEMPFAIL, reason=_why(e))
        except (OSError, ValueError) as e:  # e.g. no route to the nameserver
            return Result(TEMPFAIL, reason=_why(e))
        rrset = answer.rrset
        if rrset is None or not len(rrset):
            return Result(NOTFOUND, reason="no %s record" % rdtype)
        return Result(FOUND, list(rrset))


def _why(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def dnsbl_name(addr, zone):
    """The DNSBL query name of an address in a zone (RFC 5782): IPv4
    1.2.3.4 -> 4.3.2.1.zone, IPv6 -> 32 reversed nibbles + zone."""
    addr = ipaddress.ip_address(addr)
    zone = zone.strip(".")
    if addr.version == 4:
        labels = str(addr).split(".")[::-1]
    else:
        labels = addr.exploded.replace(":", "")[::-1]
    return ".".join(labels) + "." + zone


def txt_text(records, limit=400):
    """The strings of TXT rdata as one printable line: the strings of a
    record are joined as they are, records with "; ".  Bytes outside
    printable ASCII (CR, LF, NUL, 8-bit) become "?", so the text cannot
    break SMTP reply framing; longer texts are cut at `limit` characters."""
    parts = []
    for rdata in records:
        strings = getattr(rdata, "strings", None)
        if strings is not None:
            parts.append(b"".join(strings))
    text = "; ".join(_printable(p) for p in parts)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _printable(data):
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in data)


def a_addresses(records):
    """The addresses (str) in A/AAAA rdata."""
    return [r.address for r in records if hasattr(r, "address")]


def null_mx(records):
    """True for the RFC 7505 "null MX": a single MX record `0 .`."""
    return (len(records) == 1 and getattr(records[0], "exchange", None) is not None
            and records[0].exchange == dns.name.root)

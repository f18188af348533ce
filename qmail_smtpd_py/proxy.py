"""PROXY protocol headers (HAProxy's proxy-protocol.txt, v1 and v2), parsed
without I/O.

Theory of operation.  A load balancer that speaks the PROXY protocol puts one
header before the client's bytes: v1 is a text line ("PROXY TCP4 SRC DST
SPORT DPORT\\r\\n", at most 107 bytes), v2 a 16-byte binary block (a 12-byte
signature, version and command, family and transport, the length of the
rest) followed by the addresses and optional TLVs.  parse() takes the bytes
received so far and either returns the Header (its .length says where the
client's own bytes start: whatever follows is SMTP, possibly pipelined in the
same segment) or raises ProxyError with a kind and a text for the log.
Truncated (a ProxyError) means "not all there yet": its .needed is a length
the header has at least, so a reader can ask for exactly that many bytes and
never take one of the client's (on a pipe nothing can be peeked at or put
back).  Bytes are judged in order, so an error is raised as soon as the
bytes that show it have arrived, and more bytes never change the verdict.

What is accepted: v1 TCP4 and TCP6; v2 PROXY commands for TCP over IPv4 and
IPv6.  Refused, each with its kind: v2 LOCAL (a balancer's health check: no
client to serve), UNSPEC (v2 AF_UNSPEC or transport UNSPEC, v1 UNKNOWN),
unsupported (v2 UDP, AF_UNIX), oversized (a v1 line without CRLF in 107
bytes, a v2 length over V2_MAX_LENGTH) and malformed (anything that is not
exactly the specification, e.g. leading zeros, a lone CR or LF, an address of
the wrong family).  v2 TLVs are walked to check that their lengths add up to
the header's, and ignored: none is kept, and a CRC32C TLV is not verified.

Addresses are text in the form the kernel's inet_ntop gives (what accept()
returns in Python), ports ints.  _socket's address conversions are pure
functions; the module costs no other import, and is only imported where a
header is expected.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from .core.logline import word

V1_MAX_LENGTH = 107          # the specification's worst case, CRLF included
V2_MAX_LENGTH = 2048         # the most bytes after v2's fixed 16 we accept (addresses + TLVs)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
MAX_LENGTH = V2_FIXED + V2_MAX_LENGTH  # the longest header accepted, of either version

DEFAULT_SECONDS = 5.0        # the time limit of the readers (driver.read_proxy_header)

# The kinds of ProxyError, as the log names them (why=...): the parser's,
# then the readers' (TIMEOUT, and UNTRUSTED for a peer that may not send one).
MALFORMED = "malformed"
TRUNCATED = "truncated"
OVERSIZED = "oversized"
LOCAL = "local"
UNSPEC = "unspec"
UNSUPPORTED = "unsupported"
TIMEOUT = "timeout"
UNTRUSTED = "untrusted"

_V1_PREFIX = b"PROXY "
# The shortest valid v1 lines, by their second word: reading up to these
# lengths can never go past a valid header.
_V1_SHORTEST = {b"TCP4": len(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
                b"TCP6": len(b"PROXY TCP6 :: :: 0 0\r\n")}
_V1_SHORTEST_ANY = len(b"PROXY UNKNOWN\r\n")
_PRINTABLE = bytes(range(0x20, 0x7F))
_IPV6_CHARACTERS = b"0123456789abcdefABCDEF:."
_DIGITS = b"0123456789"
_V2_ADDRESSES = {0x1: (4, "TCP4"), 0x2: (16, "TCP6")}  # family: (address bytes, name)


class ProxyError(Exception):
    """The bytes are no acceptable PROXY header: .kind is one of the kinds
    above, .text says why in a few words (client bytes escaped)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__("%s: %s" % (kind, text))
        self.kind = kind
        self.text = text

    def log_text(self) -> str:
        """The connection's one log line about it (after the usual prefix)."""
        return "proxy refuse why=%s (%s)" % (self.kind, self.text)


class Truncated(ProxyError):
    """The header is not complete yet; it is at least .needed bytes long."""

    def __init__(self, needed: int) -> None:
        super().__init__(TRUNCATED, "a header of at least %d bytes" % needed)
        self.needed = needed


class Header:
    """A parsed header: version 1 or 2, family "TCP4" or "TCP6", the client's
    (source) and the address it connected to (destination) as (ip, port),
    and its length in bytes."""

    __slots__ = ("version", "family", "source", "destination", "length")

    def __init__(self, version: int, family: str, source: tuple[str, int],
                 destination: tuple[str, int], length: int) -> None:
        self.version = version
        self.family = family
        self.source = source
        self.destination = destination
        self.length = length

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        return "Header(%r, %r, %r, %r, %r)" % tuple(getattr(self, n) for n in self.__slots__)


def parse(data: bytes) -> Header:
    """The header at the start of data (bytes after it are left alone).
    Raises Truncated while data is a valid beginning, ProxyError otherwise."""
    data = bytes(data)
    if data[:1] == b"\r" or not data:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyError(MALFORMED, "not a PROXY header: %s" % word(data[:12]))
        if not data:
            raise Truncated(_V1_SHORTEST_ANY)  # the shortest of either version
        return _parse_v2(data)
    if not _V1_PREFIX.startswith(data[:6]):
        raise ProxyError(MALFORMED, "not a PROXY header: %s" % word(data[:6]))
    return _parse_v1(data)


# ------------------------------------------------------------------ v1


def _parse_v1(data):
    head = data[:V1_MAX_LENGTH]
    end = head.find(b"\r\n")
    if end < 0:
        line = head[:-1] if head[-1:] == b"\r" else head  # its LF may be on its way
    else:
        line = head[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyError(MALFORMED, "v1: a CR or LF that is not CRLF")
    if line.translate(None, _PRINTABLE):
        raise ProxyError(MALFORMED, "v1: a byte that is no printable ASCII")
    if end < 0:
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyError(OVERSIZED, "v1: no CRLF in the first %d bytes" % V1_MAX_LENGTH)
        shortest = _V1_SHORTEST_ANY
        if line[10:11] == b" ":
            shortest = _V1_SHORTEST.get(line[6:10], shortest)
        raise Truncated(max(len(data) + 1, shortest))
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        raise ProxyError(UNSPEC, "v1 UNKNOWN: no client address")
    if protocol not in _V1_SHORTEST:
        raise ProxyError(MALFORMED, "v1: protocol %s (TCP4, TCP6 or UNKNOWN)" % word(protocol))
    if len(fields) != 6:
        raise ProxyError(MALFORMED, "v1: %d fields, not 6" % len(fields))
    address = _ipv4 if protocol == b"TCP4" else _ipv6
    return Header(1, protocol.decode(), (address(fields[2]), _port(fields[4])),
                  (address(fields[3]), _port(fields[5])), end + 2)


def _ipv4(text):
    """Four decimal numbers 0-255 without leading zeros, as the specification
    writes them: the address must come back from inet_ntop as it was given
    (inet_pton's leniency varies between C libraries)."""
    address = text.decode()  # printable ASCII (checked)
    try:
        if inet_ntop(AF_INET, inet_pton(AF_INET, address)) == address:
            return address
    except OSError:
        pass
    raise ProxyError(MALFORMED, "v1: IPv4 address %s" % word(text))


def _ipv6(text):
    if not text or text.translate(None, _IPV6_CHARACTERS):
        raise ProxyError(MALFORMED, "v1: IPv6 address %s" % word(text))
    try:
        return inet_ntop(AF_INET6, inet_pton(AF_INET6, text.decode()))
    except (OSError, ValueError):
        raise ProxyError(MALFORMED, "v1: IPv6 address %s" % word(text)) from None


def _port(text):
    if not _decimal(text, 5) or int(text) > 65535:
        raise ProxyError(MALFORMED, "v1: port %s" % word(text))
    return int(text)


def _decimal(text, most):
    """1 to `most` digits, no leading zero (but "0")."""
    return (0 < len(text) <= most and not text.translate(None, _DIGITS)
            and (text[:1] != b"0" or text == b"0"))


# ------------------------------------------------------------------ v2


def _parse_v2(data):
    if len(data) < 13:
        raise Truncated(V2_FIXED)
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        raise ProxyError(MALFORMED, "v2: version %d" % version)
    if command == 0:
        raise ProxyError(LOCAL, "v2 LOCAL (a health check?): no client to serve")
    if command != 1:
        raise ProxyError(MALFORMED, "v2: command %d" % command)
    if len(data) < 14:
        raise Truncated(V2_FIXED)
    family, transport = data[13] >> 4, data[13] & 0xF
    if family > 3 or transport > 2:
        raise ProxyError(MALFORMED, "v2: family and transport 0x%02x" % data[13])
    if family == 0 or transport == 0:
        raise ProxyError(UNSPEC, "v2 UNSPEC (0x%02x): no client address" % data[13])
    if family == 3 or transport == 2:
        raise ProxyError(UNSUPPORTED, "v2: %s over %s" % (
            ("stream", "datagram")[transport - 1], ("IPv4", "IPv6", "AF_UNIX")[family - 1]))
    if len(data) < V2_FIXED:
        raise Truncated(V2_FIXED)
    rest = int.from_bytes(data[14:16], "big")
    if rest > V2_MAX_LENGTH:
        raise ProxyError(OVERSIZED, "v2: length %d (at most %d)" % (rest, V2_MAX_LENGTH))
    size, name = _V2_ADDRESSES[family]
    if rest < 2 * size + 4:
        raise ProxyError(MALFORMED, "v2: length %d, too short for %s" % (rest, name))
    length = V2_FIXED + rest
    if len(data) < length:
        raise Truncated(length)
    block = data[V2_FIXED:length]
    _check_tlvs(block[2 * size + 4:])
    ip_family = AF_INET6 if size == 16 else AF_INET
    ports = block[2 * size:2 * size + 4]
    return Header(2, name, (inet_ntop(ip_family, block[:size]), int.from_bytes(ports[:2], "big")),
                  (inet_ntop(ip_family, block[size:2 * size]), int.from_bytes(ports[2:], "big")),
                  length)


def _check_tlvs(tlvs):
    """Each TLV (type, 2-byte length, value) must lie within the header."""
    at = 0
    while at < len(tlvs):
        if len(tlvs) - at < 3:
            raise ProxyError(MALFORMED, "v2: %d bytes after the last TLV" % (len(tlvs) - at))
        end = at + 3 + int.from_bytes(tlvs[at + 1:at + 3], "big")
        if end > len(tlvs):
            raise ProxyError(MALFORMED, "v2: TLV 0x%02x runs past the header" % tlvs[at])
        at = end

"""The PROXY header parser (qmail_smtpd_py/proxy.py), in-process: bytes in, a Header or
a ProxyError of one kind out.

Fixed vectors from HAProxy's proxy-protocol.txt and from a real HAProxy 2.6 (a v2
header with the client's EHLO in the same segment, a v2 LOCAL health check); each
refusal kind; and Hypothesis properties: arbitrary and mutated bytes never raise
anything but ProxyError, headers built here (helpers.proxy_v1/proxy_v2, with
ipaddress and struct rather than the parser's own functions) come back with their
addresses and exact length, every strict prefix of a valid header is Truncated with a
`needed` that never reaches past the header, and more bytes never change a verdict.

The readers (driver.read_proxy_header) and the pool: t/test_proxy_serve.py.
"""

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmail_smtpd_py import proxy
from qmail_smtpd_py.proxy import Header, ProxyError, Truncated, parse

from helpers import PROXY_V2_SIGNATURE, proxy_v1, proxy_v2, tlv

SIG = PROXY_V2_SIGNATURE
EHLO = b"EHLO client.example\r\n"


def kind_of(data):
    """The kind of ProxyError parse(data) raises ("ok" if it returns)."""
    try:
        parse(data)
    except ProxyError as e:
        return e.kind
    return "ok"


# ------------------------------------------------------------------ accepted headers


def test_v1_example_of_the_specification():
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    header = parse(line + b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n")
    assert header == Header(1, "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), len(line))


def test_v2_from_haproxy_with_the_client_bytes_behind_it():
    """What HAProxy 2.6 (send-proxy-v2) sent for a client on 127.0.0.2:46533 connecting
    to 127.0.0.1:27001, in the same segment as the client's first line."""
    data = (b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x02\x7f\x00\x00\x01\xb5\xc5iy"
            + EHLO)
    header = parse(data)
    assert header == Header(2, "TCP4", ("127.0.0.2", 46533), ("127.0.0.1", 27001), 28)
    assert data[header.length:] == EHLO


def test_v1_tcp6_addresses_come_out_as_inet_ntop_writes_them():
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::ffff:192.0.2.1 1025 25\r\n"
    assert parse(line) == Header(1, "TCP6", ("2001:db8::7", 1025), ("::ffff:192.0.2.1", 25),
                                 len(line))


def test_v1_longest_tcp6_line_is_accepted():
    full = ":".join(["ffff"] * 8)
    line = proxy_v1((full, 65535), (full, 65535))
    assert len(line) == 104  # the specification's figure
    assert parse(line).source == (full, 65535)


@pytest.mark.parametrize("port", [0, 1, 9, 10, 65535])
def test_v1_ports_at_the_edges(port):
    assert parse(proxy_v1(("192.0.2.1", port), ("0.0.0.0", port))).source[1] == port


def test_v2_tcp6_with_tlvs_which_are_ignored():
    tlvs = (tlv(0x04, b"") + tlv(0x02, b"mx.example.org") + tlv(0x05, b"\x00" * 128)
            + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")) + tlv(0xEA, b"x" * 40))
    data = proxy_v2(("2001:db8::7", 50000), ("2001:db8::25", 25), tlvs=tlvs)
    header = parse(data + EHLO)
    assert header == Header(2, "TCP6", ("2001:db8::7", 50000), ("2001:db8::25", 25), len(data))


def test_v2_ipv4_mapped_addresses_stay_as_they_are():
    """The readers unmap ::ffff:a.b.c.d (driver.unmapped), as for accept()'s addresses."""
    header = parse(proxy_v2(("::ffff:192.0.2.7", 1), ("::ffff:192.0.2.25", 25)))
    assert header.source == ("::ffff:192.0.2.7", 1)


def test_v2_longest_accepted_length():
    tlvs = tlv(0x04, b"\x00" * (proxy.V2_MAX_LENGTH - 12 - 3))
    data = proxy_v2(("192.0.2.7", 1), ("192.0.2.25", 25), tlvs=tlvs)
    assert len(data) == 16 + proxy.V2_MAX_LENGTH
    assert parse(data).length == len(data)


def test_any_bytes_like_object_is_accepted():
    data = proxy_v1(("192.0.2.7", 1), ("192.0.2.25", 25))
    assert parse(bytearray(data)) == parse(memoryview(data)) == parse(data)


def test_header_equality_and_repr():
    a = Header(1, "TCP4", ("192.0.2.7", 1), ("192.0.2.25", 25), 40)
    assert a != Header(1, "TCP4", ("192.0.2.7", 2), ("192.0.2.25", 25), 40)
    assert a != ("192.0.2.7", 1)
    assert repr(a) == "Header(1, 'TCP4', ('192.0.2.7', 1), ('192.0.2.25', 25), 40)"


# ------------------------------------------------------------------ refused headers

V1_OK = b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25\r\n"


@pytest.mark.parametrize("line", [
    b"proxy TCP4 192.0.2.7 192.0.2.25 1025 25\r\n",      # the word is upper case
    b"PROXY  TCP4 192.0.2.7 192.0.2.25 1025 25\r\n",     # two spaces
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25 \r\n",     # a trailing space
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025\r\n",         # five fields
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25 7\r\n",    # seven
    b"PROXY TCP5 192.0.2.7 192.0.2.25 1025 25\r\n",      # no such protocol
    b"PROXY tcp4 192.0.2.7 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4\t192.0.2.7 192.0.2.25 1025 25\r\n",     # a tab
    b"PROXY TCP4 192.0.2.07 192.0.2.25 1025 25\r\n",     # a leading zero (octal?)
    b"PROXY TCP4 192.0.2.256 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.7.1 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.+7 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 0x7f.0.0.1 192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 01025 25\r\n",     # leading zero in a port
    b"PROXY TCP4 192.0.2.7 192.0.2.25 65536 25\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 -1 25\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 0x19\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 \r\n",
    b"PROXY TCP4 2001:db8::7 192.0.2.25 1025 25\r\n",    # the wrong family
    b"PROXY TCP6 192.0.2.7 2001:db8::25 1025 25\r\n",
    b"PROXY TCP6 2001:db8::7 fe80::1%eth0 1025 25\r\n",   # a zone
    b"PROXY TCP6 2001:db8::7::1 2001:db8::25 1025 25\r\n",
    b"PROXY TCP6 1:2:3:4:5:6:7:8:9 2001:db8::25 1025 25\r\n",
    b"PROXY TCP6 12345::1 2001:db8::25 1025 25\r\n",
    b"PROXY TCP6 [2001:db8::7] 2001:db8::25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25\n",        # a bare LF
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25\r\r\n",
    b"PROXY TCP4 192.0.2.7\r192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.7\n192.0.2.25 1025 25\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25\x00\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 2\xc3\xa9\r\n",
    b"PROXY \r\n",
    b"PROXY\r\n",
    b"PROXYTCP4 192.0.2.7 192.0.2.25 1025 25\r\n",
    b"EHLO client.example\r\n",                          # a client without a balancer
    b"GET / HTTP/1.0\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",      # a TLS ClientHello
])
def test_v1_malformed(line):
    with pytest.raises(ProxyError) as e:
        parse(line)
    assert e.value.kind == proxy.MALFORMED, e.value
    assert type(e.value) is ProxyError


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN 192.0.2.7 192.0.2.25 1025 25\r\n",
                                  b"PROXY UNKNOWN anything at all\r\n"])
def test_v1_unknown_is_unspec(line):
    with pytest.raises(ProxyError) as e:
        parse(line + EHLO)
    assert e.value.kind == proxy.UNSPEC


def test_v1_worst_case_line_of_107_bytes_is_read_whole():
    full = ":".join(["ffff"] * 8)
    line = b"PROXY UNKNOWN %s %s 65535 65535\r\n" % (full.encode(), full.encode())
    assert len(line) == 107
    assert kind_of(line) == proxy.UNSPEC
    assert kind_of(line[:-2] + b"5\r\n") == proxy.OVERSIZED  # CRLF at 107-108: too far


@pytest.mark.parametrize("data", [b"PROXY TCP6 " + b"1" * 96, b"PROXY TCP4 " + b"x" * 500,
                                  b"PROXY TCP6 " + b"1" * 95 + b"\r"])
def test_v1_without_crlf_in_107_bytes_is_oversized(data):
    assert kind_of(data) == proxy.OVERSIZED


def test_v1_line_cut_short_is_truncated_at_every_byte():
    for k in range(len(V1_OK)):
        with pytest.raises(Truncated) as e:
            parse(V1_OK[:k])
        assert k < e.value.needed <= len(V1_OK)
        assert e.value.kind == proxy.TRUNCATED


def test_v1_needed_grows_to_the_shortest_line_of_the_protocol():
    assert parse_needed(b"") == 15              # "PROXY UNKNOWN\r\n"
    assert parse_needed(b"PROXY TCP4") == 15
    assert parse_needed(b"PROXY TCP4 ") == 32   # "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"
    assert parse_needed(b"PROXY TCP6 ") == 22   # "PROXY TCP6 :: :: 0 0\r\n"
    data = b"PROXY TCP4 192.0.2.7 192.0.2.25 1"
    assert parse_needed(data) == len(data) + 1  # past the shortest: one byte at a time
    assert parse_needed(b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 25\r") == len(V1_OK)


def parse_needed(data):
    with pytest.raises(Truncated) as e:
        parse(data)
    return e.value.needed


V2_OK = proxy_v2(("192.0.2.7", 1025), ("192.0.2.25", 25))


def v2(command_byte, family_byte, rest=b"", length=None):
    if length is None:
        length = len(rest)
    return SIG + bytes([command_byte, family_byte]) + length.to_bytes(2, "big") + rest


ADDRESSES4 = bytes(12)


@pytest.mark.parametrize("data,kind", [
    (v2(0x20, 0x00), proxy.LOCAL),                          # HAProxy's health check
    (v2(0x20, 0x11, ADDRESSES4), proxy.LOCAL),              # LOCAL with addresses
    (v2(0x20, 0xFF, length=0xFFFF), proxy.LOCAL),           # LOCAL decides first
    (v2(0x21, 0x00), proxy.UNSPEC),
    (v2(0x21, 0x10, ADDRESSES4), proxy.UNSPEC),             # AF_INET, transport UNSPEC
    (v2(0x21, 0x01, ADDRESSES4), proxy.UNSPEC),             # AF_UNSPEC, STREAM
    (v2(0x21, 0x12, ADDRESSES4), proxy.UNSUPPORTED),        # UDP over IPv4
    (v2(0x21, 0x22, bytes(36)), proxy.UNSUPPORTED),         # UDP over IPv6
    (v2(0x21, 0x31, bytes(216)), proxy.UNSUPPORTED),        # AF_UNIX stream
    (v2(0x21, 0x32, bytes(216)), proxy.UNSUPPORTED),
    (v2(0x21, 0x11, length=proxy.V2_MAX_LENGTH + 1), proxy.OVERSIZED),
    (v2(0x21, 0x21, length=0xFFFF), proxy.OVERSIZED),
    (v2(0x11, 0x11, ADDRESSES4), proxy.MALFORMED),          # version 1
    (v2(0x31, 0x11, ADDRESSES4), proxy.MALFORMED),          # version 3
    (v2(0x22, 0x11, ADDRESSES4), proxy.MALFORMED),          # command 2
    (v2(0x2F, 0x11, ADDRESSES4), proxy.MALFORMED),
    (v2(0x21, 0x41, ADDRESSES4), proxy.MALFORMED),          # family 4
    (v2(0x21, 0x13, ADDRESSES4), proxy.MALFORMED),          # transport 3
    (v2(0x21, 0x11, bytes(11)), proxy.MALFORMED),           # too short for IPv4
    (v2(0x21, 0x21, bytes(35)), proxy.MALFORMED),           # too short for IPv6
    (v2(0x21, 0x21, bytes(12)), proxy.MALFORMED),           # IPv4's length, family IPv6
    (v2(0x21, 0x11, ADDRESSES4 + b"\x04"), proxy.MALFORMED),            # 1 stray byte
    (v2(0x21, 0x11, ADDRESSES4 + b"\x04\x00"), proxy.MALFORMED),        # 2
    (v2(0x21, 0x11, ADDRESSES4 + b"\x04\x00\x02x"), proxy.MALFORMED),   # TLV past the end
    (v2(0x21, 0x11, ADDRESSES4 + tlv(4, b"") + b"\x02\xff\xff"), proxy.MALFORMED),
    (SIG[:5] + b"\x01" + SIG[6:] + bytes([0x21, 0x11, 0, 12]) + ADDRESSES4, proxy.MALFORMED),
    (b"\r\n\r\nQUIT\r\n", proxy.MALFORMED),
])
def test_v2_refusals(data, kind):
    assert kind_of(data + EHLO) == kind


def test_v2_oversized_is_known_from_the_fixed_part_alone():
    assert kind_of(v2(0x21, 0x11, length=proxy.V2_MAX_LENGTH + 1)[:16]) == proxy.OVERSIZED


def test_v2_local_is_known_from_its_13th_byte():
    assert kind_of(SIG + b"\x20") == proxy.LOCAL


def test_v2_needed():
    assert parse_needed(b"\r") == 16
    assert parse_needed(V2_OK[:15]) == 16
    assert parse_needed(V2_OK[:16]) == len(V2_OK) == 28
    assert parse_needed(V2_OK[:27]) == 28


def test_texts_for_the_log_are_one_line_of_printable_words():
    with pytest.raises(ProxyError) as e:
        parse(b"PROXY TCP4 192.0.2.7 192.0.2.25 1025 2\xff\r\n")
    with pytest.raises(ProxyError) as f:
        parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 a\\b\r\n")
    assert f.value.log_text() == "proxy refuse why=malformed (v1: port a\\x5cb)"
    assert e.value.log_text().startswith("proxy refuse why=malformed (")
    with pytest.raises(ProxyError) as g:
        parse(b"GET\r\n / HTTP/1.0")  # its first six bytes, each one printable
    assert g.value.log_text() == (
        "proxy refuse why=malformed (not a PROXY header: GET\\x0d\\x0a\\x20)")


# ------------------------------------------------------------------ properties

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)
tails = st.binary(max_size=40)


@st.composite
def endpoints(draw):
    """(source, destination) of one family."""
    ips = draw(st.sampled_from([ipv4, ipv6]))
    return (draw(ips), draw(ports)), (draw(ips), draw(ports))


@st.composite
def tlv_blocks(draw):
    items = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=60)), max_size=6))
    return b"".join(tlv(kind, value) for kind, value in items)


@st.composite
def valid_headers(draw):
    """(header bytes, source, destination), v1 or v2."""
    source, destination = draw(endpoints())
    if draw(st.booleans()):
        return proxy_v1(source, destination), source, destination
    return proxy_v2(source, destination, tlvs=draw(tlv_blocks())), source, destination


def same_address(text, original):
    """text is the address, in inet_ntop's form."""
    family = socket.AF_INET6 if ":" in original else socket.AF_INET
    return (ipaddress.ip_address(text) == ipaddress.ip_address(original)
            and text == socket.inet_ntop(family, socket.inet_pton(family, original)))


@settings(max_examples=150, deadline=None)  # no timing: the machine is shared
@given(valid_headers(), tails)
def test_built_headers_round_trip_and_leave_what_follows_alone(built, tail):
    data, source, destination = built
    header = parse(data + tail)
    assert header.length == len(data)
    assert header.family == ("TCP6" if ":" in source[0] else "TCP4")
    assert header.version == (1 if data.startswith(b"PROXY") else 2)
    for got, want in ((header.source, source), (header.destination, destination)):
        assert got[1] == want[1] and same_address(got[0], want[0])


@settings(max_examples=150, deadline=None)
@given(valid_headers())
def test_every_strict_prefix_is_truncated_and_needed_never_passes_the_header(built):
    data = built[0]
    for k in range(len(data)):
        with pytest.raises(Truncated) as e:
            parse(data[:k])
        assert k < e.value.needed <= len(data)


def parse_outcome(data):
    try:
        return parse(data)
    except Truncated:
        return "truncated"
    except ProxyError as e:  # only ProxyError may come out: anything else fails the test
        return e.kind


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=120).map(lambda b: SIG + b)),
       st.binary(max_size=60))
def test_arbitrary_bytes_raise_only_proxy_errors_and_more_bytes_keep_the_verdict(data, more):
    first = parse_outcome(data)
    if isinstance(first, Header):
        assert 0 < first.length <= len(data)
        assert parse_outcome(data[:first.length]) == first
    if first != "truncated":
        assert parse_outcome(data + more) == first


@st.composite
def mutated_headers(draw):
    """A valid header with a few bytes replaced, removed or inserted."""
    data = bytearray(draw(valid_headers())[0])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "delete", "insert"]))
        byte = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x3A, 0x2E, 0x30, 0x39, 0xFF])
                    | st.integers(0, 255))
        if action == "insert":
            data.insert(at, byte)
        elif at < len(data):
            if action == "delete":
                del data[at]
            else:
                data[at] = byte
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(mutated_headers(), tails)
def test_mutated_headers_raise_only_proxy_errors(data, tail):
    outcome = parse_outcome(data + tail)
    if isinstance(outcome, Header):
        assert outcome.length <= len(data) + len(tail)
        assert outcome.family in ("TCP4", "TCP6")
        for ip, port in (outcome.source, outcome.destination):
            assert 0 <= port <= 65535
            ipaddress.ip_address(ip)  # a real address

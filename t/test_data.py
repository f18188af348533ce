"""The bulk DATA reader against a literal transcription of qmail's blast()."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from qmail_smtpd_py.core import data
from qmail_smtpd_py.core.data import BareLF, Blast

from blast_oracle import blast


def bulk(chunks, databytes=0):
    """Feed chunks to Blast the way the session does."""
    reader = Blast(databytes)
    buf = bytearray()
    out = bytearray()
    consumed_total = 0
    for chunk in chunks:
        buf += chunk
        while True:
            try:
                piece, consumed, done = reader.feed(buf)
            except BareLF:
                return bytes(out), reader.hops, reader.exceeded, None, "barelf"
            out += piece
            del buf[:consumed]
            consumed_total += consumed
            if done:
                return bytes(out), reader.hops, reader.exceeded, consumed_total, "done"
            if not consumed:
                break
    return bytes(out), reader.hops, reader.exceeded, None, "eof"


def oracle(stream, databytes=0):
    out, hops, exceeded, consumed, fate = blast(stream, databytes)
    return out, hops, exceeded, consumed if fate == "done" else None, fate


def split(stream, cuts):
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(stream)]:
        pieces.append(stream[last:p])
        last = p
    return [p for p in pieces if p]


# Bytes that matter to the state machine, plus filler.
smtp_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\r\n.", b"\r\n.\r\n", b"x", b"\0",
                     b"\xff", b"Received:", b"dElIvErEd", b"\r\n\r\n", b"recei"]),
    max_size=40).map(b"".join)


@settings(max_examples=600, deadline=None)  # no timing: the machine is shared
@given(smtp_bytes, st.lists(st.integers(min_value=0, max_value=400), max_size=6),
       st.sampled_from([0, 0, 1, 5, 12]))
@example(b"..dot\r\n.x\r\nbare\rcr\r\n\r\r\n.\r\n", [], 0)
@example(b".\r\n", [], 0)
@example(b".\rX\r\n.\r\r\n.\r\n", [3, 4, 5], 0)
def test_bulk_reader_matches_byte_by_byte_blast(stream, cuts, databytes):
    got = bulk(split(stream, cuts), databytes)
    want = oracle(stream, databytes)
    if want[4] == "barelf":
        # Both stop; what was emitted before a bare LF is thrown away anyway.
        assert got[4] == "barelf"
        return
    if want[4] == "eof":
        # The bulk reader may hold back an incomplete line; what it did emit
        # is a prefix of what blast() emitted.
        assert got[4] == "eof"
        assert want[0].startswith(got[0])
        return
    assert got == want


def test_over_long_lines_stream_in_pieces_with_exact_output(monkeypatch):
    monkeypatch.setattr(data, "LONG_LINE", 8)
    stream = b".abcdefghijklmnop\r\r\rqrstuvwxyz0123456789\r\n" * 3 + b".\r\n"
    for size in (1, 3, 7, 1000):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert bulk(chunks) == oracle(stream)


def test_over_long_line_memory_stays_bounded(monkeypatch):
    monkeypatch.setattr(data, "LONG_LINE", 64)
    reader = Blast()
    buf = bytearray()
    for _ in range(1000):
        buf += b"y" * 50
        piece, consumed, done = reader.feed(buf)
        del buf[:consumed]
        assert len(buf) <= 64 + 50
        assert not done


def test_dot_unstuffing_and_line_ends():
    out, hops, exceeded, consumed, fate = bulk([b"..dot\r\n.x\r\nbare\rcr\r\n\r\r\n.\r\nNOOP\r\n"])
    assert out == b".dot\nx\nbare\rcr\n\r\n"
    assert fate == "done"
    assert consumed == len(b"..dot\r\n.x\r\nbare\rcr\r\n\r\r\n.\r\n")


def test_bare_lf_is_fatal():
    assert bulk([b"Subject: x\r\nbody\n.\r\n"])[4] == "barelf"


def test_hops_count_received_and_delivered_lines_in_header_only():
    header = b"Received: a\r\nDELIVERED-TO: b\r\nReceived-SPF: c\r\n .Received\r\n"
    _, hops, _, _, _ = bulk([header + b"\r\nReceived: body\r\n.\r\n"])
    assert hops == 3


def test_databytes_counts_converted_bytes():
    assert bulk([b"12345\r\n.\r\n"], databytes=6)[2] is False
    assert bulk([b"123456\r\n.\r\n"], databytes=6)[2] is True

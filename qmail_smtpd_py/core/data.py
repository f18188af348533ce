"""The DATA reader: qmail's `blast` state machine, done in bulk.

Theory of operation.  qmail-smtpd copies the message byte by byte through a
five-state machine (spec §4.3): CR LF becomes LF, a leading dot is removed
unless a CR follows it, CR LF . CR LF ends the data, and an LF without a CR
before it is fatal.  Byte for byte those rules reduce to simple facts about
whole lines, so this reader works on complete lines with bytes methods:

* the end is the first CR LF . CR LF (or '.' CR LF right at the start);
* a bare LF exists exactly when a chunk has more LFs than CR LFs;
* output = chunk.replace(CR LF, LF), then a '.' at the start of a line is
  dropped unless a CR follows it (CR CR LF and '.' CR X come out as the
  state machine writes them);
* hops are counted on the raw header lines: each line starting with
  'received' or 'delivered' (ASCII case-insensitive) counts, and the header
  ends at the first empty line.

Only complete lines are processed; the partial last line stays in the
session's buffer for the next round.  A line longer than LONG_LINE is
processed in pieces (holding back a final CR) so memory stays flat whatever
the client sends.
"""

from __future__ import annotations

LONG_LINE = 1 << 16


class BareLF(Exception):
    """The client sent LF without CR: 451 and the session ends."""


class Blast:
    __slots__ = ("limit", "size", "exceeded", "hops", "in_header", "line_start", "_scanned")

    def __init__(self, databytes: int = 0) -> None:
        self.limit = databytes    # 0 = unlimited
        self.size = 0             # bytes written so far (after CR LF -> LF, unstuffing)
        self.exceeded = False
        self.hops = 0
        self.in_header = True
        self.line_start = True    # False while in the middle of an over-long line
        self._scanned = 0         # buf[:_scanned] is known to hold no LF

    def feed(self, buf: bytearray) -> tuple[bytes, int, bool]:
        """Consume what can be decided from buf (a bytearray).

        Returns (output, consumed, done): output goes to qmail-queue,
        consumed bytes are to be removed from buf, done is True when the
        final dot has been read (bytes after it belong to the next command).
        Raises BareLF.
        """
        if self.line_start and buf[:3] == b".\r\n":
            return b"", 3, True
        # buf[:_scanned] holds no LF, so no terminator starts before _scanned - 1.
        start = max(0, self._scanned - 1)
        if buf.find(b".", start) >= 0:  # a fast memchr: most chunks have no dot at all
            end = buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                self._scanned = 0
                return self._convert(buf[:end + 2]), end + 5, True
        last_lf = buf.rfind(b"\n", self._scanned)
        if last_lf >= 0:
            self._scanned = 0
            return self._convert(buf[:last_lf + 1]), last_lf + 1, False
        self._scanned = len(buf)
        if len(buf) <= LONG_LINE:
            return b"", 0, False
        # An over-long line: pass on all of it but a final CR (it may start CR LF).
        self._scanned = 0
        n = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        return self._convert(buf[:n], complete=False), n, False

    def _convert(self, raw, complete=True):
        # raw holds whole lines (complete) or a piece of one over-long line.
        crlf = raw.count(b"\r\n")
        if raw.count(b"\n") != crlf:
            raise BareLF()
        if self.in_header:
            self._count_hops(raw)
        # Deleting every CR is much faster than replacing CR LF, and the same
        # when each CR starts a CR LF; the length tells whether one did not.
        text = raw.translate(None, b"\r")
        if len(raw) - len(text) != crlf:
            text = raw.replace(b"\r\n", b"\n")
        if b"." in text:
            if self.line_start and text[:1] == b"." and text[1:2] != b"\r":
                text = text[1:]
            if b"\n." in text:
                text = _unstuff(text)
        self.line_start = complete
        return self._limit(text)

    def _count_hops(self, raw):
        header = raw
        if self.line_start and raw[:2] == b"\r\n":
            header = b""
        else:
            blank = raw.find(b"\n\r\n")
            if blank >= 0:
                header = raw[:blank + 1]
        if len(header) != len(raw):
            self.in_header = False
        header = header.lower()
        if self.line_start and (header[:8] == b"received" or header[:9] == b"delivered"):
            self.hops += 1
        self.hops += header.count(b"\nreceived") + header.count(b"\ndelivered")

    def _limit(self, text):
        if self.exceeded:
            return b""
        if self.limit and self.size + len(text) > self.limit:
            self.exceeded = True
            text = text[:self.limit - self.size]
        self.size += len(text)
        return text


def _unstuff(text):
    """Drop the '.' after each LF unless a CR follows it."""
    pieces = text.split(b"\n.")
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(b"\n." if piece[:1] == b"\r" else b"\n")
        out.append(piece)
    return b"".join(out)

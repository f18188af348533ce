"""MAIL/RCPT argument parsing and the address checks that follow it.

All functions are pure and work on bytes, exactly as qmail-smtpd's C code
works on char arrays: no syntax checking, no case folding of the address
itself, only the few transformations qmail applies (spec §3.4-3.7).
"""

from __future__ import annotations

MAX_ADDRESS = 900  # an address of this many bytes or more is a syntax error


def parse(arg: bytes) -> bytes:
    """Extract the address from a MAIL/RCPT argument (qmail's addrparse).

    With a '<' the address runs from after the first '<' to an unquoted '>';
    without one it runs from after the first ':' (skipping spaces) to an
    unquoted space.  A leading source route is dropped, backslash escapes
    the next byte, double quotes toggle quoting and vanish.  A missing
    terminator is not an error.
    """
    i = arg.find(b"<")
    if i >= 0:
        rest, terminator = arg[i + 1:], b">"
    else:
        i = arg.find(b":")
        rest = arg[i + 1:].lstrip(b" ") if i >= 0 else b""
        terminator = b" "
    if rest[:1] == b"@":  # source route: @a,@b:user@host
        i = rest.find(b":")
        rest = rest[i + 1:] if i >= 0 else b""
    if b"\\" not in rest and b'"' not in rest:
        i = rest.find(terminator)
        return rest if i < 0 else rest[:i]
    return _parse_quoted(rest, terminator[0])


def _parse_quoted(rest: bytes, terminator: int) -> bytes:
    out = bytearray()
    escaped = quoted = False
    for ch in rest:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == terminator and not quoted:
            break
        elif ch == 0x5C:  # backslash
            escaped = True
        elif ch == 0x22:  # double quote
            quoted = not quoted
        else:
            out.append(ch)
    return bytes(out)


def bracketed_ip(addr: bytes) -> tuple[bytes, tuple[int, int, int, int]] | None:
    """If addr ends in '@[d.d.d.d]', return (text up to and including '@', ip tuple).

    Components are unbounded decimals truncated to 8 bits, as qmail's ip_scan
    does; anything else, or trailing bytes after ']', gives None.
    """
    at = addr.rfind(b"@")
    if at < 0 or addr[at + 1:at + 2] != b"[" or not addr.endswith(b"]"):
        return None
    parts = addr[at + 2:-1].split(b".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    return addr[:at + 1], tuple(int(p) & 0xFF for p in parts)


def in_badmailfrom(addr: bytes, badmailfrom: set[bytes]) -> bool:
    """True if the whole address, or its '@domain' part, is listed.

    badmailfrom is a set of lower-cased entries; the match is
    ASCII-case-insensitive and exact-length.
    """
    addr = addr.lower()
    if addr in badmailfrom:
        return True
    at = addr.rfind(b"@")
    return at >= 0 and addr[at:] in badmailfrom


def domain_candidates(addr: bytes) -> list[bytes] | None:
    """The keys rcpthosts is searched for: the lower-cased domain and every
    suffix of it that starts at a dot.  None if the address has no '@'."""
    at = addr.rfind(b"@")
    if at < 0:
        return None
    host = addr[at + 1:].lower()
    keys = [host] if host else []
    i = host.find(b".", 1)
    while i >= 0:
        keys.append(host[i:])
        i = host.find(b".", i + 1)
    return keys


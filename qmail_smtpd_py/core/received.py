"""The Received: line qmail-smtpd puts at the top of every message."""

from __future__ import annotations

import time

# Bytes that survive in the Received fields; everything else becomes '?'.
# notqmail also keeps '[' and ']' (qmail 1.03 and netqmail do not).
_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-[]"
_SANITISE = bytes(c if c in _SAFE else ord("?") for c in range(256))

_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def safe(field: bytes) -> bytes:
    return field.translate(_SANITISE)


def date822(when: float) -> bytes:
    """qmail's date822fmt: '22 Nov 2026 01:33:33 -0000' (always UTC)."""
    t = time.gmtime(when)
    return b"%d %s %d %02d:%02d:%02d -0000" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def received(protocol: bytes, local: bytes, remoteip: bytes, remotehost: bytes,
             remoteinfo: bytes | None, helo: bytes | None, when: float) -> bytes:
    """Build the header (LF line ends).

    helo is None when the client's HELO matched the remote host name;
    remoteinfo is None when no ident/auth user is known; protocol is
    written raw (the TLS patch puts spaces and parentheses in it).
    """
    parts = [b"Received: from ", safe(remotehost)]
    if helo is not None:
        parts += [b" (HELO ", safe(helo), b")"]
    parts.append(b" (")
    if remoteinfo is not None:
        parts += [safe(remoteinfo), b"@"]
    parts += [safe(remoteip), b")\n  by ", safe(local), b" with ", protocol, b"; ",
              date822(when), b"\n"]
    return b"".join(parts)

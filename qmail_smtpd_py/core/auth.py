"""SMTP AUTH as Erwin Hoffmann's qmail-authentication 0.8.3 patch does it.

Pure functions: the SMTPAUTH modes, the patch's lenient base64, splitting
the client's answers into user and secret, and the MAIL parameters (SIZE=,
AUTH=) the patch parses.  The dialogue itself lives in session.py (it reads
lines), its replies in replies.py; checkpassword is a request.  Spec:
qmail-smtpd.md §6.1.
"""

from __future__ import annotations

import binascii

# SMTPAUTH modes, numbered as in the patch (> 10 means AUTH is required).
DISABLED, LOGIN_PLAIN, CRAM, ALL = 0, 1, 2, 3
REQUIRED_LOGIN_PLAIN, REQUIRED_CRAM, REQUIRED_ALL = 11, 12, 13

FAIL_DELAY = 5  # seconds before 535, to slow down password guessing


def parse_mode(value: bytes | None) -> int:
    """The mode for an SMTPAUTH value (None: variable unset)."""
    if value is None:
        return DISABLED
    value = value.lower()
    mode = LOGIN_PLAIN
    if value == b"-":
        mode = DISABLED
    if value == b"!":
        mode = REQUIRED_LOGIN_PLAIN
    for prefix, prefixed_mode in ((b"cram", CRAM), (b"+cram", ALL), (b"!cram", REQUIRED_CRAM),
                                  (b"!+cram", REQUIRED_ALL)):
        if value.startswith(prefix):
            mode = prefixed_mode
    return mode


def is_required(mode: int) -> bool:
    """The `!` modes: no MAIL before a successful AUTH."""
    return mode > 10


def is_cancel(line: bytes) -> bool:
    """A response line that cancels the exchange: `*` (compared as the C
    string it is in the patch, so what follows a NUL does not count)."""
    nul = line.find(b"\0")
    return (line if nul < 0 else line[:nul]) == b"*"


def sends_challenge(mode: int) -> bool:
    """With CRAM enabled the patch appends the challenge field on fd 3."""
    return mode in (CRAM, ALL, REQUIRED_CRAM, REQUIRED_ALL)


_B64_VALUES = {c: i for i, c in enumerate(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64decode(text: bytes) -> bytes:
    """The patch's decoder: never fails.  Trailing '=' count as padding,
    only whole groups of four are decoded, bytes outside the alphabet add
    no bits.  For well-formed input it is standard base64."""
    length = len(text)
    pad = 0
    while length and text[length - 1] == 0x3D:
        pad += 1
        length -= 1
    groups = (length + pad) // 4
    size = groups * 3 - pad
    if size <= 0:
        return b""
    out = bytearray()
    for start in range(0, groups * 4, 4):
        x = 0
        for ch in text[start:start + 4]:
            value = _B64_VALUES.get(ch)
            if value is not None:
                x = (x << 6) + value
            elif ch == 0x3D:
                x <<= 6
        out += (x & 0xFFFFFF).to_bytes(3, "big")
    return bytes(out[:size])


def b64encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False)


def _cstr(data):
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]


def plain_credentials(decoded: bytes) -> tuple[bytes, bytes]:
    """'authzid NUL user NUL password' -> (user, password); the authzid is ignored."""
    resp = decoded + b"\0"
    skip = resp.index(b"\0") + 1
    user = _cstr(resp[skip:]) if len(resp) > skip else b""
    rest = skip + len(user) + 1
    password = _cstr(resp[rest:]) if len(resp) > rest else b""
    return user, password


def cram_credentials(decoded: bytes) -> tuple[bytes, bytes]:
    """'user digest' -> (user, digest), split at the last space."""
    resp = _cstr(decoded)
    space = resp.rfind(b" ")
    if space < 0:
        return resp, b""
    return resp[:space], resp[space:].lstrip(b" ")


def mail_parameters(arg: bytes, databytes: int) -> tuple[bool, bytes | None]:
    """The patch's MAIL parameter scan (only when the argument has a '>'
    after its 5th byte): space-separated tokens of the argument after its
    first byte.  Returns (size_too_big, auth_value or None); scanning stops
    at an oversized SIZE=."""
    gt = arg.find(b">")
    if gt <= 4:
        return False, None
    auth_value = None
    for token in arg[1:].split(b" "):
        keyword = token[:5].upper()
        if keyword == b"SIZE=":
            digits = token[5:]
            n = 0
            while n < len(digits) and 0x30 <= digits[n] <= 0x39:
                n += 1
            size = int(digits[:n]) if n else 0
            if databytes and size > databytes:
                return True, auth_value
        elif keyword == b"AUTH=" and auth_value is None:
            # The patch sets the remote info from the first AUTH= only.
            auth_value = xtext_user(token[5:])
    return False, auth_value


def xtext_user(value: bytes) -> bytes:
    """The AUTH= value as the patch decodes it: '<>' is 'unknown', +2B and
    +3D become '+' and '=', any other '+' is dropped."""
    if value[:2] == b"<>":
        return b"unknown"
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == 0x2B:  # '+'
            code = value[i + 1:i + 3].upper()
            if code == b"3D":
                out += b"="
                i += 2
            elif code == b"2B":
                out += b"+"
                i += 2
        else:
            out.append(value[i])
        i += 1
    return bytes(out)

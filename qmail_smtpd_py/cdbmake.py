"""Write djb constant databases (cdb) as cdbmake and qmail-newu do.

Theory of operation.  A cdb file is a 2048-byte header of 256 (table
position, slot count) pairs, then the records (key length, data length,
key, data; lengths u32 little-endian) in the order they were added, then
256 hash tables.  Table b holds every record whose hash h has h & 255 == b,
in twice as many slots as records; a record goes into slot (h >> 8) % slots
or, if that is taken, the next free one (wrapping).  Records are placed in
the order they were added, so among records with the same key the first
one added is the first one a reader finds: qmail-newu's "first one wins".
This is cdbmake's algorithm (cdbmake_split/cdbmake_throw, which qmail's
cdbmss uses), so the files are byte for byte what those tools write.

`assign_records` is qmail-newu's reading of users/assign (qmail-users(5)),
`newu` the whole program: users/assign -> users/cdb, through users/cdb.tmp
and a rename, leaving users/cdb alone when the assign file is bad.  The
reader is qmail_smtpd_py.cdb.
"""

import os

from .cdb import cdb_hash

_MAX = 0xFFFFFFFF


def cdb_bytes(records):
    """The cdb file holding records, an iterable of (key, data) bytes pairs,
    as bytes.  ValueError if it would not fit in 4 GiB."""
    body = bytearray()
    entries = []  # (hash, position) in the order added
    pos = 2048
    for key, data in records:
        key, data = bytes(key), bytes(data)
        entries.append((cdb_hash(key), pos))
        body += len(key).to_bytes(4, "little") + len(data).to_bytes(4, "little")
        body += key
        body += data
        pos += 8 + len(key) + len(data)
    buckets = [[] for _ in range(256)]
    for h, p in entries:
        buckets[h & 255].append((h, p))
    header = bytearray()
    tables = bytearray()
    for bucket in buckets:
        slots = 2 * len(bucket)
        header += pos.to_bytes(4, "little") + slots.to_bytes(4, "little")
        table = [(0, 0)] * slots
        for h, p in bucket:
            where = (h >> 8) % slots
            while table[where][1]:
                where = (where + 1) % slots
            table[where] = (h, p)
        for h, p in table:
            tables += h.to_bytes(4, "little") + p.to_bytes(4, "little")
        pos += 8 * slots
    if pos > _MAX:
        raise ValueError("too much data for a cdb")
    return bytes(header + body + tables)


def write_cdb(path, records, mode=0o644):
    """Write records (see cdb_bytes) to path atomically: into path + ".tmp",
    fsync, rename, as cdbmake and qmail-newu do."""
    data = cdb_bytes(records)
    path = os.fsencode(path)
    tmp = path + b".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


class AssignError(ValueError):
    """users/assign is not in qmail-users(5) format (qmail-newu: bad format)."""


def assign_records(text):
    """The users/cdb records of a users/assign file (bytes), in qmail-newu's
    order, or AssignError.

    Lines are read up to one starting with "."; each must end in LF, hold no
    NUL, and have a ":" that is not its first byte and at least 6 more.
    "+loc:..." is a wildcard entry, any other first byte an exact one.
    Keys are "!" + lowercased loc (+ NUL for exact entries); data is fields
    2 to 7 joined by NUL; a last record with the empty key holds the last
    bytes of the non-empty wildcard locs, each once, in their original case.
    """
    records = []
    wildchars = bytearray()
    start = 0
    while True:
        end = text.find(b"\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if line.startswith(b"."):
            break
        if end < 0:
            raise AssignError("users/assign: no final \".\" line")
        start = end + 1
        if b"\0" in line:
            raise AssignError(f"users/assign: NUL in a line: {line[:80]!r}")
        colon = line.find(b":")
        if colon <= 0:
            raise AssignError(f"users/assign: no \"user:\" in line {line[:80]!r}")
        loc = line[1:colon]
        if line[:1] == b"+":
            key = b"!" + loc.lower()
            if loc and line[colon - 1] not in wildchars:
                wildchars.append(line[colon - 1])
        else:
            key = b"!" + loc.lower() + b"\0"
        fields = line[colon + 1:].split(b":", 6)
        if len(fields) < 7:
            raise AssignError(f"users/assign: fewer than 7 \":\" in line {line[:80]!r}")
        records.append((key, b"\0".join(fields[:6])))
    records.append((b"", bytes(wildchars)))
    return records


def newu(qmail_home):
    """qmail-newu: compile qmail_home/users/assign into qmail_home/users/cdb.
    Raises OSError or AssignError; on error users/cdb is left as it was."""
    users = os.path.join(os.fsencode(qmail_home), b"users")
    with open(os.path.join(users, b"assign"), "rb") as f:
        records = assign_records(f.read())
    write_cdb(os.path.join(users, b"cdb"), records)

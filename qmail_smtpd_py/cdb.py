"""Read-only lookups in a djb constant database (cdb), e.g. morercpthosts.cdb.

The file is kept open and read with pread, as qmail does, so a file that
qmail-newmrh replaces atomically is seen by new connections only.
"""

import os


class CdbError(Exception):
    """The file is not a readable cdb (truncated, corrupt, I/O error)."""


def cdb_hash(key):
    h = 5381
    for byte in key:
        h = (((h << 5) + h) ^ byte) & 0xFFFFFFFF
    return h


class Cdb:
    def __init__(self, fd):
        self.fd = fd

    @classmethod
    def open(cls, path):
        """Open path; None if it does not exist; other errors propagate."""
        try:
            return cls(os.open(path, os.O_RDONLY))
        except FileNotFoundError:
            return None

    def _read(self, pos, n):
        try:
            data = os.pread(self.fd, n, pos)
        except OSError as e:
            raise CdbError(str(e)) from None
        if len(data) != n:
            raise CdbError("truncated cdb")
        return data

    def _pair(self, pos):
        data = self._read(pos, 8)
        return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")

    def get(self, key):
        """The data of the first record with this key, or None."""
        h = cdb_hash(key)
        table, slots = self._pair((h & 0xFF) * 8)
        if not slots:
            return None
        slot = (h >> 8) % slots
        for _ in range(slots):
            slot_hash, pos = self._pair(table + slot * 8)
            if not pos:
                return None
            if slot_hash == h:
                klen, dlen = self._pair(pos)
                if klen == len(key) and self._read(pos + 8, klen) == key:
                    return self._read(pos + 8 + klen, dlen)
            slot = (slot + 1) % slots
        return None

    def __contains__(self, key):
        return self.get(key) is not None

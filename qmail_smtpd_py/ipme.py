"""This host's IPv4 addresses (qmail's ipme), for the localiphost rewrite.

Only sessions that see an address like user@[1.2.3.4] need this, so it is
imported on demand.
"""

import array
import fcntl
import socket
import struct

_SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux


def local_ipv4_addresses():
    """All IPv4 interface addresses as 4-tuples, plus 0.0.0.0 (as qmail)."""
    addresses = {(0, 0, 0, 0)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 64
        while True:
            buf = array.array("B", bytes(size * _IFREQ_SIZE))
            address, _ = buf.buffer_info()
            ifconf = struct.pack("iL", len(buf), address)
            used = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, ifconf))[0]
            if used < len(buf):
                break
            size *= 2
    raw = buf.tobytes()
    for offset in range(0, used, _IFREQ_SIZE):
        family = struct.unpack_from("H", raw, offset + 16)[0]
        if family == socket.AF_INET:
            addresses.add(tuple(raw[offset + 20:offset + 24]))
    return frozenset(addresses)

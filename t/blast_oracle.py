"""qmail-smtpd.c's blast() transcribed literally, byte by byte: the oracle
the bulk DATA reader is checked against."""


def blast(stream, databytes=0):
    """Returns (output, hops, exceeded, consumed, fate); fate is 'done',
    'barelf' or 'eof'."""
    out = bytearray()
    hops = 0
    in_header = True
    pos = 0
    maybe_x = maybe_y = maybe_z = True
    state = 1
    bytes_to_recv = databytes + 1 if databytes else 0
    exceeded = False

    def put(chars):
        nonlocal bytes_to_recv, exceeded
        for ch in chars:
            if bytes_to_recv:
                bytes_to_recv -= 1
                if not bytes_to_recv:
                    exceeded = True
            if not exceeded:
                out.append(ch)

    for i, ch in enumerate(stream):
        if in_header:
            if pos < 9:
                if ch != b"delivered"[pos] and ch != b"DELIVERED"[pos]:
                    maybe_z = False
                if maybe_z and pos == 8:
                    hops += 1
                if pos < 8 and ch != b"received"[pos] and ch != b"RECEIVED"[pos]:
                    maybe_x = False
                if maybe_x and pos == 7:
                    hops += 1
                if pos < 2 and ch != b"\r\n"[pos]:
                    maybe_y = False
                if maybe_y and pos == 1:
                    in_header = False
                pos += 1
            if ch == 10:
                pos = 0
                maybe_x = maybe_y = maybe_z = True
        if state == 0:
            if ch == 10:
                return bytes(out), hops, exceeded, i + 1, "barelf"
            if ch == 13:
                state = 4
                continue
        elif state == 1:
            if ch == 10:
                return bytes(out), hops, exceeded, i + 1, "barelf"
            if ch == 46:
                state = 2
                continue
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 2:
            if ch == 10:
                return bytes(out), hops, exceeded, i + 1, "barelf"
            if ch == 13:
                state = 3
                continue
            state = 0
        elif state == 3:
            if ch == 10:
                return bytes(out), hops, exceeded, i + 1, "done"
            put(b".\r")
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 4:
            if ch == 10:
                state = 1
            elif ch != 13:
                put(b"\r")
                state = 0
            else:
                put(b"\r")
                continue
        put(bytes([ch]))
    return bytes(out), hops, exceeded, len(stream), "eof"

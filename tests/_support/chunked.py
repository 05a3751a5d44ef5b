"""
One decoder of HTTP/1.1 chunked bodies (RFC 9112, section 7.1), for every
test that reads a response off the wire.
"""

from __future__ import annotations


class Dechunker:
    """
    Undo chunked framing as bytes arrive. A chunk's payload comes out only
    once the whole chunk is in (the server writes each frame as one chunk,
    so frames come out whole). Chunk extensions are skipped; trailers are
    not expected: the last chunk must be C{0\\r\\n\\r\\n}.

    @ivar ended: the last chunk (size 0) has been read.
    @ivar rest: what came after the last chunk (the next response on the
        connection).
    """

    def __init__(self) -> None:
        self._pending = b""
        self.ended = False
        self.rest = b""

    def chunks(self, data: bytes) -> list[bytes]:
        """
        @return: the payload of each chunk these bytes completed, in order.
        @raise AssertionError: a chunk is not followed by CRLF.
        @raise ValueError: a chunk size is not hexadecimal.
        """
        if self.ended:
            self.rest += data
            return []
        if self._pending:
            data, self._pending = self._pending + data, b""
        out = []
        position, size = 0, len(data)
        while True:
            end = data.find(b"\r\n", position)
            if end < 0:
                break
            length = int(data[position:end].split(b";", 1)[0], 16)
            start = end + 2
            stop = start + length
            if stop + 2 > size:
                break
            if data[stop : stop + 2] != b"\r\n":
                raise AssertionError(f"chunk of {length} bytes not followed by CRLF: {data[start:stop + 20]!r}")
            position = stop + 2
            if length == 0:
                self.ended = True
                self.rest = data[position:]
                return out
            out.append(data[start:stop])
        self._pending = data[position:]
        return out

    def feed(self, data: bytes) -> bytes:
        """
        @return: the payload these bytes completed.
        """
        return b"".join(self.chunks(data))


def chunks(data: bytes) -> list[bytes]:
    """
    The payload of each whole chunk in C{data} (a response body that may
    still be open: no last chunk yet), in order.
    """
    return Dechunker().chunks(data)


def dechunk(data: bytes) -> bytes:
    return b"".join(chunks(data))

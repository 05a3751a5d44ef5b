"""
An HTTP/1.1 connection to a real L{Site} over a L{StringTransport}, and
the transports the unit tests put under it: the in-memory layer of the
tests (no sockets, no reactor).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from twistedsse._decoder import EventStreamDecoder

from .chunked import chunks, dechunk

__all__ = ["BUFFER", "BufferTransport", "Connection", "TCPStringTransport", "chunks", "decode", "dechunk", "splitResponse"]


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """
    A StringTransport with the TCP socket options, standing in for a TCP
    connection: it records what TCP_NODELAY was set to.
    """

    noDelay = False
    keepAlive = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepAlive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepAlive


class Connection:
    """
    One client connection to C{site}, speaking raw HTTP/1.1.
    """

    def __init__(self, site: Site, transport: StringTransport | None = None) -> None:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.protocol = site.buildProtocol(address)
        self.transport = transport or StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.protocol.dataReceived(raw)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def splitResponse(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Status, headers (lower-cased names) and the de-chunked body of one
    HTTP/1.1 response, which may still be open (no terminal chunk yet).
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    statusLine, *headerLines = head.split(b"\r\n")
    status = int(statusLine.split(b" ")[1])
    headers = {}
    for line in headerLines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = dechunk(rest) if headers.get(b"transfer-encoding") == b"chunked" else rest
    return status, headers, body


def decode(body: bytes) -> list[Any]:
    return EventStreamDecoder().feed(body)


#: Twisted's FileDescriptor.bufferSize: a transport pauses its producer
#: once more than this is waiting to be sent.
BUFFER = 64 * 1024


class BufferTransport(StringTransport):
    """
    A transport with a send buffer: it pauses its producer once more than
    C{limit} bytes wait in it, as a full socket makes Twisted's do, and
    L{drain} empties it (the client read everything) and resumes.

    @ivar most: the most bytes ever waiting at once.
    """

    def __init__(self, limit: int = BUFFER) -> None:
        super().__init__()
        self.limit = limit
        self.full = False
        self.most = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        waiting = len(self.value())
        self.most = max(self.most, waiting)
        if waiting > self.limit and not self.full and self.producer is not None:
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data

"""
The HTTP server's own behaviour: L{DrainingSite} bounds what a request may
send and can close its connections gracefully at shutdown, and
L{ServerService} stops a whole server in the right order.
"""

from __future__ import annotations

import json
from typing import Any

from zope.interface import implementer
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from ._app import MAX_BODY
from ._errors import HeaderTooLarge, PayloadTooLarge, URITooLong
from ._service import RenderService
from ._transport import sendTogether

_log = Logger()

MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_LINE = 8 * 1024


def _refuseNow(channel: Any, status: int, reason: bytes, code: str, detail: str) -> None:
    """
    Answer with a JSON error and close, before the request is whole (so no
    Request object can answer it).
    """
    body = json.dumps({"error": code, "detail": detail}).encode() + b"\n"
    transport = channel.transport
    if transport is None or getattr(transport, "disconnecting", False):
        return
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )
    transport.loseConnection()


def _lineTooLong(channel: Any, line: bytes) -> None:
    """
    Twisted just drops a connection whose request line or a header line is
    over the limit; say why, as JSON, first.
    """
    first = line.split(b" ", 1)[0]
    error, reason = (
        (URITooLong, b"URI Too Long") if b":" not in first else (HeaderTooLarge, b"Request Header Fields Too Large")
    )
    _refuseNow(channel, error.status, reason, error.code, f"a request line or header line is over {MAX_LINE} bytes")


class _LastChunk:
    """
    The chunked framing of the last body write: an event fanned out to N
    streams is the same bytes object N times, so it is framed once, not N
    times. (Holds one frame; a miss costs what Twisted's own framing does.)
    """

    __slots__ = ("data", "chunk")

    def __init__(self) -> None:
        self.data = b""
        self.chunk = b""

    def of(self, data: bytes) -> bytes:
        if data is not self.data:
            self.chunk = b"%x\r\n%s\r\n" % (len(data), data)
            self.data = data
        return self.chunk


_lastChunk = _LastChunk()


class BoundedRequest(Request):
    """
    A request that keeps at most C{maxBody} bytes of body. Twisted would
    otherwise buffer any body in full (in memory, or a temporary file)
    before the application sees it; past the limit this one keeps nothing
    and the app answers 413.

    Its C{write}, once a chunked response has started, hands the channel
    the whole chunk in one call (framed once per event, see L{_LastChunk}):
    what Twisted's own C{write} sends as three pieces, with the same checks.
    """

    maxBody = MAX_BODY
    tooLarge = False
    _answered = False

    def write(self, data: bytes) -> None:
        if (
            self.chunked
            and data
            and not self.finished
            and not self._disconnected
            and self._encoder is None
            and type(data) is bytes
        ):
            self.sentLength += len(data)
            self.channel.write(_lastChunk.of(data))
            return
        if not self.startedWriting:
            # The headers and the first frame: one send, not two.
            with sendTogether(getattr(self.channel, "transport", None)):
                super().write(data)
            return
        super().write(data)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.maxBody:
            # Announced too large: say so now and close, rather than read
            # (and drop) the whole body first, or answer 100 Continue.
            self.tooLarge = self._answered = True
            self.requestHeaders.removeHeader(b"expect")  # no 100 Continue after it
            _refuseNow(
                self.channel,
                PayloadTooLarge.status,
                b"Content Too Large",
                PayloadTooLarge.code,
                f"request body is over the {self.maxBody}-byte limit",
            )
            length = 0
        super().gotLength(length)

    def process(self) -> None:
        if self._answered:
            return  # the 413 went out already; the connection is closing
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        if self.tooLarge:
            return
        if self.content.tell() + len(data) > self.maxBody:
            self.tooLarge = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


@implementer(IProtocol)
class _TrackedConnection:
    """
    Site's protocol for one connection, seen from outside, so that
    L{DrainingSite} knows when the connection starts and ends.

    Not by assigning to that protocol's methods: Site's protocol is a proxy
    (C{_GenericHTTPChannelProtocol}) whose attributes are its current
    channel's, writes included, and when ALPN selects h2 it swaps the
    C{HTTPChannel} for a new C{H2Connection}, which never calls them.
    Everything else is the wrapped protocol's.
    """

    def __init__(self, connections: dict[Any, tuple[Any, Deferred[None]]], protocol: Any) -> None:
        self._connections = connections
        self._protocol = protocol
        self._gone: Deferred[None] = Deferred()

    def makeConnection(self, transport: Any) -> None:
        self._connections[self] = (transport, self._gone)
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._connections.pop(self, None)
        try:
            self._protocol.connectionLost(reason)
        finally:
            self._gone.callback(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)


class DrainingSite(Site):
    """
    A L{Site} that can close its connections gracefully.

    At shutdown the reactor drops every connection without sending what is
    still in its write buffer, so the final frame each stream was just
    given would be lost. L{DrainingSite.drain} closes each connection the
    polite way (pending bytes first) and waits for all of them to go.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gone: dict[Any, tuple[Any, Deferred[None]]] = {}

    requestFactory = BoundedRequest

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        # Bounds on what a client may send before any app code runs: the
        # request line (URL) and each header line, their number and size.
        channel = getattr(protocol, "_channel", protocol)
        channel.MAX_LENGTH = MAX_LINE
        channel.maxHeaders = MAX_HEADERS
        channel.totalHeadersSize = MAX_HEADER_BYTES
        channel.lineLengthExceeded = lambda line: _lineTooLong(channel, line)
        return _TrackedConnection(self._gone, protocol)

    def openConnections(self) -> int:
        return len(self._gone)

    def drain(self, clock: IReactorTime, timeout: float = 5.0) -> Deferred[None]:
        """
        Close every connection after its pending bytes are sent; abort any
        still open after C{timeout} seconds (a client that stopped reading).
        """
        waits = [gone for _, gone in self._gone.values()]
        for transport, _ in list(self._gone.values()):
            # (A TLS connection waits for its HTTP channel, registered as
            # its producer, and so ends at the abort: its frames are sent.)
            transport.loseConnection()

        def abort() -> None:
            for transport, _ in list(self._gone.values()):
                transport.abortConnection()

        deadline = clock.callLater(timeout, abort)

        def done(result: object) -> None:
            if deadline.active():
                deadline.cancel()

        return DeferredList(waits).addCallback(done)


class ServerService(MultiService):
    """
    The whole server: the render service and the listening services, which
    stop in order: no new connections; every render ends and every stream
    gets its final frame; the site's connections drain.
    """

    def __init__(self, renders: RenderService, site: DrainingSite, clock: IReactorTime, drainTimeout: float = 5.0):
        super().__init__()
        self.renders = renders
        self.site = site
        self._clock = clock
        self._drainTimeout = drainTimeout
        renders.setServiceParent(self)

    def addListener(self, listener: IService) -> None:
        listener.setServiceParent(self)

    @inlineCallbacks
    def stopService(self) -> Any:
        # twistd drops a failure from a shutdown trigger silently: log each
        # step's, and go on to the next step regardless.
        self.running = 0
        listeners = [s for s in self if s is not self.renders]
        steps = [
            ("stop listening", lambda: DeferredList([maybeDeferred(s.stopService) for s in listeners])),
            ("stop renders", self.renders.stopService),
            ("drain connections", lambda: self.site.drain(self._clock, self._drainTimeout)),
        ]
        for what, step in steps:
            try:
                yield maybeDeferred(step)
            except Exception:
                _log.failure("shutdown: could not {what}", what=what)

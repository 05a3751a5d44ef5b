"""
The HTTP server's own behaviour: L{DrainingSite} bounds what a request may
send and can close its connections gracefully at shutdown.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as _Protocol, cast

from zope.interface import implementer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ._app import MAX_BODY
from ._connections import ABORT_AFTER, ConnectionCounter, ConnectionLimits, RequestClock, timeoutResponse
from ._errors import HeaderTooLarge, PayloadTooLarge, URITooLong
from ._responses import errorBody
from ._transport import sendTogether

_log = Logger()

MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_LINE = 8 * 1024


class _Closable(_Protocol):
    """
    What L{DrainingSite} does to a connection's transport. C{IProtocol}
    promises an C{ITransport} only, which cannot abort; every transport a
    listening port gives a site (TCP, TLS, UNIX) can.
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...


def _refuseNow(channel: HTTPChannel, status: int, reason: bytes, code: str, detail: str) -> None:
    """
    Answer with a JSON error and close, before the request is whole (so no
    Request object can answer it).
    """
    body = errorBody(code, detail)
    response = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )
    tracked = getattr(channel, "_twistedsseTracked", None)
    if tracked is not None:
        tracked.refuse(response)
        return
    transport = channel.transport
    if transport is None or getattr(transport, "disconnecting", False):
        return
    transport.write(response)
    transport.loseConnection()


def _refuseStream(stream: Any, status: int, code: str, detail: str) -> None:
    """
    Answer one HTTP/2 stream with a JSON error before its request is
    whole, then reset that stream only (C{RST_STREAM NO_ERROR}: "stop
    sending, the answer is complete", RFC 9113 section 8.1): the
    connection's other streams go on. Under h2 a request's channel is an
    C{H2Stream} whose C{transport} is C{None}, so L{_refuseNow} cannot.

    @param stream: that C{H2Stream} (C{Any}: Twisted's, private and
        unannotated; the private names read here are checked by
        tests/test_twisted_private.py).
    """
    connection = stream._conn
    streamID = stream.streamID
    if connection.streams.get(streamID) is not stream:
        return  # already ended
    body = errorBody(code, detail)
    h2 = connection.conn
    try:
        fits = h2.local_flow_control_window(streamID) >= len(body)
        headers = [(b":status", b"%d" % status), (b"content-type", b"application/json")]
        if fits:
            headers.append((b"content-length", b"%d" % len(body)))
        h2.send_headers(streamID, headers, end_stream=not fits)
        if fits:
            h2.send_data(streamID, body, end_stream=True)
        h2.reset_stream(streamID, error_code=0)
    except Exception:
        # (h2's ProtocolError: the stream was closed meanwhile.)
        _log.failure("HTTP/2: could not refuse stream {streamID}", streamID=streamID)
    if connection._tryToWriteControlData():
        stream.connectionLost(Failure(ConnectionLost(detail)))
        connection._requestDone(streamID)


def _isH2Stream(channel: object) -> bool:
    return getattr(channel, "transport", True) is None and hasattr(channel, "streamID")


def _lineTooLong(channel: HTTPChannel, line: bytes) -> None:
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

    # Typing note: Request's methods are unannotated, and mypy's
    # untyped_calls_exclude misses calls through super() (python/mypy#16653).

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
                super().write(data)  # type: ignore[no-untyped-call]
            return
        super().write(data)  # type: ignore[no-untyped-call]

    def _refuseTooLarge(self, later: bool = False) -> None:
        """
        Answer 413 now, before the body is read: over HTTP/1.1 on the
        connection, which closes; over HTTP/2 on this stream, which is
        reset (C{later}: on the next turn, as an h2 stream being built is
        not yet the connection's).
        """
        self.tooLarge = self._answered = True
        self.requestHeaders.removeHeader(b"expect")  # no 100 Continue after it
        detail = f"request body is over the {self.maxBody}-byte limit"
        channel = self.channel
        if _isH2Stream(channel):
            stream: Any = channel  # (see _refuseStream)

            def refuse() -> None:
                _refuseStream(stream, PayloadTooLarge.status, PayloadTooLarge.code, detail)

            if later:
                reactor: IReactorTime = stream._conn._reactor
                reactor.callLater(0, refuse)
            else:
                refuse()
            return
        clock = getattr(channel, "_twistedsseClock", None)
        if clock is not None:
            clock.stop()
        _refuseNow(channel, PayloadTooLarge.status, b"Content Too Large", PayloadTooLarge.code, detail)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.maxBody:
            # Announced too large: say so now and close, rather than read
            # (and drop) the whole body first, or answer 100 Continue.
            self._refuseTooLarge(later=True)
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]
        clock = getattr(self.channel, "_twistedsseClock", None)
        if clock is not None and not self._answered:
            clock.headReceived(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        clock = getattr(self.channel, "_twistedsseClock", None)
        if clock is not None:
            clock.requestReceived()
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def finish(self) -> None:
        clock = getattr(self.channel, "_twistedsseClock", None)
        if clock is not None and not self.finished and not self._disconnected:
            clock.responseEnded()
        super().finish()  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self._answered:
            return  # the 413 went out already; the connection is closing
        super().process()  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.tooLarge:
            return
        # (gotLength made it: Request.content is None only once finished.)
        assert self.content is not None
        if self.content.tell() + len(data) > self.maxBody:
            # A chunked (or HTTP/2) body past the limit: answer now, and
            # read no more of it.
            self.content.seek(0)
            self.content.truncate()
            self._refuseTooLarge()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


@implementer(IProtocol)
class _TrackedConnection:
    """
    Site's protocol for one connection, seen from outside, so that
    L{DrainingSite} knows when the connection starts and ends, and its
    L{RequestClock} sees every byte the client sends.

    Not by assigning to that protocol's methods: Site's protocol is a proxy
    (C{_GenericHTTPChannelProtocol}) whose attributes are its current
    channel's, writes included, and when ALPN selects h2 it swaps the
    C{HTTPChannel} for a new C{H2Connection}, which never calls them.
    Everything else is the wrapped protocol's.

    Over HTTP/2 the request clock bounds the TLS handshake and the first
    request head only; then h2's own idle timeout governs the connection.
    """

    def __init__(
        self,
        connections: dict[_TrackedConnection, tuple[_Closable, Deferred[None]]],
        protocol: Any,
        clock: IReactorTime | None = None,
        limits: ConnectionLimits | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """
        @param protocol: Site's protocol (C{Any}: a proxy whose attributes
            are its current channel's, C{HTTPChannel} or C{H2Connection}).
        """
        self._connections = connections
        self._protocol = protocol
        self._gone: Deferred[None] = Deferred()
        self._clock = clock
        self._limits = limits
        self._release = release
        self._requests: RequestClock | None = None
        self._abort: IDelayedCall | None = None
        self._transport: _Closable | None = None
        self._refused = False

    def makeConnection(self, transport: ITransport) -> None:
        closable = cast(_Closable, transport)  # (see _Closable)
        self._connections[self] = (closable, self._gone)
        self._transport = closable
        limits = self._limits
        if self._clock is not None and limits is not None and (limits.requestTimeout or limits.bodyMinRate):
            self._requests = RequestClock(self._clock, limits, self._expire)
            getattr(self._protocol, "_channel", self._protocol)._twistedsseClock = self._requests
        getattr(self._protocol, "_channel", self._protocol)._twistedsseTracked = self
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what the client still sends is dropped unread
        requests = self._requests
        if requests is None:
            self._protocol.dataReceived(data)
            return
        requests.received(len(data))
        self._protocol.dataReceived(data)
        if requests.state == "head" and self._isH2():
            if getattr(getattr(self._protocol, "_channel", None), "conn", None) is not None:
                if self._protocol._channel.conn.highest_inbound_stream_id:
                    requests.stop()

    def _isH2(self) -> bool:
        return getattr(self._protocol, "_negotiatedProtocol", None) == b"h2"

    def _expire(self, detail: str, started: bool) -> None:
        """
        The request clock ran out: answer 408 if a request had begun (over
        HTTP/1.1), and close.
        """
        if started and not self._isH2():
            self.refuse(timeoutResponse(detail))
        else:
            self.refuse(b"")

    def refuse(self, response: bytes) -> None:
        """
        Send C{response} (an error written before a request was whole) and
        close, aborting if the close has not happened L{ABORT_AFTER}
        seconds later (a peer that does not read).

        Over plain TCP a lingering close, as Apache's and nginx's: the
        write side is shut after the answer, and what the client still
        sends is read and dropped, not parsed, until it closes or the
        abort. Closing at once with its bytes unread would send a TCP
        reset, and a reset makes the client's kernel drop the answer it
        has not read yet: a client still sending its body would never see
        why it was refused.
        """
        transport = self._transport
        if self._refused or transport is None or getattr(transport, "disconnecting", False):
            return
        self._refused = True
        if self._requests is not None:
            self._requests.stop()
        if response:
            transport.write(response)
        if response and ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()
        if self._clock is not None:
            self._abort = self._clock.callLater(ABORT_AFTER, transport.abortConnection)

    def connectionLost(self, reason: Failure) -> None:
        self._connections.pop(self, None)
        if self._requests is not None:
            self._requests.stop()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self._release is not None:
            release, self._release = self._release, None
            release()
        try:
            self._protocol.connectionLost(reason)
        finally:
            if not self._gone.called:
                self._gone.callback(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)


class _RefusedConnection(Protocol):
    """
    A connection past the caps: closed as soon as it is made, before a
    byte is read (and, under TLS, before any handshake).
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        cast(_Closable, self.transport).abortConnection()  # (see _Closable)


class DrainingSite(Site):
    """
    A L{Site} that bounds its connections and can close them gracefully.

    Past C{connections}' caps (in all, per client address) a new
    connection is closed at once (C{buildProtocol} returns C{None}); each
    connection's requests run on a L{RequestClock}.

    At shutdown the reactor drops every connection without sending what is
    still in its write buffer, so the final frame each stream was just
    given would be lost. L{DrainingSite.drain} closes each connection the
    polite way (pending bytes first) and waits for all of them to go.
    """

    def __init__(self, *args: Any, connections: ConnectionCounter | None = None, **kwargs: Any) -> None:
        # Site.__init__ is unannotated, and untyped_calls_exclude misses
        # calls through super() (python/mypy#16653).
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._gone: dict[_TrackedConnection, tuple[_Closable, Deferred[None]]] = {}
        self.connections = connections if connections is not None else ConnectionCounter()

    requestFactory = BoundedRequest

    # Typing note: HTTPFactory builds _GenericHTTPChannelProtocol (Factory
    # is generic in its protocol); this one wraps that, or refuses with
    # another, and a listening port takes any IProtocol. Its addr is
    # never None (IListeningPort builds with the peer's).
    def buildProtocol(self, addr: IAddress) -> IProtocol:  # type: ignore[override]
        release = self.connections.admit(addr)
        if release is None:
            # (Not None: under TLS, Twisted's wrapping factory would wrap
            # it and fail.)
            return _RefusedConnection()
        try:
            protocol = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        except BaseException:
            release()
            raise
        # Bounds on what a client may send before any app code runs: the
        # request line (URL) and each header line, their number and size.
        channel = getattr(protocol, "_channel", protocol)
        channel.MAX_LENGTH = MAX_LINE
        channel.maxHeaders = MAX_HEADERS
        channel.totalHeadersSize = MAX_HEADER_BYTES
        channel.lineLengthExceeded = lambda line: _lineTooLong(channel, line)
        return _TrackedConnection(self._gone, protocol, self.reactor, self.connections.limits, release)

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

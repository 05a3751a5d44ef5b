"""
L{EventStreamResource}: one job's events as a C{text/event-stream}
response, the only module that touches a twisted.web C{Request}.

The rule it exists for: every frame, keepalives included, is written with
one C{request.write} the moment it exists. Nothing here holds bytes back;
C{request.write} hands them to the transport in the same reactor turn, and
the socket has TCP_NODELAY, so they leave at once. Proxies are told not to
buffer (C{X-Accel-Buffering: no}) and nothing compresses the stream.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._frames import TERMINAL_EVENTS, Event, encodeComment, encodeEvent, encodeRetry
from ._interfaces import IJobBroker, ISubscriber

_log = Logger()

KEEPALIVE = encodeComment("keepalive")
OPENED = encodeComment("open")


def tcpTransport(request: Any) -> ITCPTransport | None:
    """
    The TCP transport under C{request}, if there is one.

    HTTP/1.1 (plain or TLS) requests have it at C{request.transport}.
    HTTP/2 requests have C{transport = None}, their TCP connection being
    shared by every stream; it sits at C{request.channel._conn.transport}
    (a private attribute, hence the guarded walk). In-memory transports in
    tests provide no L{ITCPTransport}.
    """
    transport = getattr(request, "transport", None)
    if transport is None:
        connection = getattr(getattr(request, "channel", None), "_conn", None)
        transport = getattr(connection, "transport", None)
    return transport if ITCPTransport.providedBy(transport) else None


def lastEventID(request: Request) -> str | None:
    """
    The id the client last saw: the C{Last-Event-ID} header a browser sends
    when it reconnects, or else a C{lastEventId} query parameter (for
    clients that cannot set headers). Undecodable bytes count as none.
    """
    raw = request.getHeader(b"last-event-id")
    if raw is None:
        values = request.args.get(b"lastEventId")
        raw = values[0] if values else None
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "replace")
    try:
        return raw.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def startStreamHeaders(request: Request) -> None:
    """
    The response headers of an event stream. No C{Content-Length}: the
    body ends when the job does (chunked over HTTP/1.1, connection close
    over HTTP/1.0, as nginx speaks to its upstreams by default).
    """
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"cache-control", b"no-cache, no-store")
    request.setHeader(b"x-accel-buffering", b"no")


@implementer(ISubscriber)
class _Stream:
    """
    One open event stream: the subscriber the broker delivers to, and the
    owner of the keepalive timer. Everything it holds is released in
    L{_Stream._closed} (the request's C{notifyFinish}), whether the job
    ended, the client left or the server is stopping.
    """

    __slots__ = ("_request", "_keepalive", "_unsubscribe", "_rewriteID", "_open")

    def __init__(self, request: Request, rewriteID: Callable[[str], str] | None) -> None:
        self._request = request
        self._rewriteID = rewriteID
        self._keepalive: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._open = True

    def start(
        self,
        broker: IJobBroker,
        jobID: str,
        after: str | None,
        clock: IReactorTime,
        keepalive: float,
        retry: int,
    ) -> None:
        request = self._request
        request.notifyFinish().addBoth(self._closed)
        transport = tcpTransport(request)
        if transport is not None:
            transport.setTcpNoDelay(True)
        # Headers leave with the first write: send it now, so that
        # EventSource fires "open" and proxies pass the response on.
        request.write(encodeRetry(retry) if retry else OPENED)
        if keepalive > 0:
            loop = self._keepalive = LoopingCall(self._ping)
            loop.clock = clock
            loop.start(keepalive, now=False)
        unsubscribe = broker.subscribe(jobID, after, self)
        if self._open:
            self._unsubscribe = unsubscribe
        else:
            # The terminal event came with the replay and ended the stream.
            unsubscribe()

    def _ping(self) -> None:
        self._request.write(KEEPALIVE)

    def deliver(self, event: Event, frame: bytes) -> None:
        if not self._open:
            return
        if self._rewriteID is not None and event.id is not None:
            frame = encodeEvent(attrs.evolve(event, id=self._rewriteID(event.id)))
        self._request.write(frame)
        if event.event in TERMINAL_EVENTS:
            self._request.finish()

    def _closed(self, result: object) -> None:
        # Fires once: on finish() and on a lost connection alike.
        self._open = False
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            unsubscribe()
        if isinstance(result, Failure):
            _log.debug("event stream closed by the client: {why}", why=result.getErrorMessage())


class EventStreamResource(Resource):
    """
    Streams one job's events: the history after the client's last event
    id, then live events, keepalive comments every C{keepalive} seconds,
    and the end of the response after the terminal event.

    @param rewriteID: maps the broker's event id to the one sent, for the
        one-request C{/render-stream} shape whose ids name the job too.
    """

    isLeaf = True

    def __init__(
        self,
        broker: IJobBroker,
        jobID: str,
        clock: IReactorTime,
        keepalive: float = 15.0,
        retry: int = 2000,
        after: str | None = None,
        rewriteID: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        self._broker = broker
        self._jobID = jobID
        self._clock = clock
        self._keepalive = keepalive
        self._retry = retry
        self._after = after
        self._rewriteID = rewriteID

    def _finishedFor(self, request: Request) -> bool:
        after = self._after if self._after is not None else lastEventID(request)
        if after is not None and self._broker.caughtUp(self._jobID, after):
            # A reconnect after the job's last event: 204 tells EventSource
            # to stop reconnecting, instead of replaying forever.
            request.setResponseCode(204)
            return True
        return False

    def render_GET(self, request: Request) -> bytes | int:
        if self._finishedFor(request):
            return b""
        after = self._after if self._after is not None else lastEventID(request)
        startStreamHeaders(request)
        _Stream(request, self._rewriteID).start(
            self._broker, self._jobID, after, self._clock, self._keepalive, self._retry
        )
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        # Resource.render_HEAD would call render_GET and open a stream (and
        # its keepalive timer) that nothing ever reads.
        if not self._finishedFor(request):
            startStreamHeaders(request)
        return b""

"""
L{EventStreamResource}: one job's events as a C{text/event-stream}
response, the only module that touches a twisted.web C{Request}.

The rule it exists for: every frame, keepalives included, is written with
one C{request.write} the moment it reaches the stream (the broker's fan-out
decides when that is, see L{twistedsse._fanout}). Nothing here holds bytes
back; C{request.write} hands them to the transport, which sends them in the
call (L{twistedsse._transport}), and the socket has TCP_NODELAY, so they
leave at once. Proxies are told not to
buffer (C{X-Accel-Buffering: no}) and nothing compresses the stream.

The one exception is a client that stops reading. Each stream is a push
producer: when the connection's buffers are full Twisted pauses it, and
from then on it keeps only the latest live C{progress} event and the
terminal event, and writes those when the client reads again. The replay
a client asks for when it connects (the job's history after its last event
id) stops where the client stopped reading: the stream keeps only the id of
the last event it wrote, and when the client reads again it asks the broker
for the history after that id, so a client that reads nothing costs one
frame past its connection's buffer, not the whole history. A client that reads
nothing for C{writeTimeout} seconds while paused is disconnected (it can
resume with C{Last-Event-ID}). So a slow or dead client costs a bounded
amount of memory, and never slows the others.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import socket

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._errors import RetryLater, TooManyStreams, TwistedSSEError, UnknownJob
from ._frames import TERMINAL_EVENTS, Event, encodeComment, encodeEvent, encodeRetry
from ._asyncbroker import AsyncMemoryBroker, IAsyncJobBroker
from ._interfaces import IJobBroker, ISubscriber
from ._responses import respondError
from ._keepalive import Keepalives
from ._transport import sendTogether

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


def lastEventID(request: IRequest) -> str | None:
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
    try:
        return raw.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def startStreamHeaders(request: IRequest) -> None:
    """
    The response headers of an event stream. No C{Content-Length}: the
    body ends when the job does (chunked over HTTP/1.1, connection close
    over HTTP/1.0, as nginx speaks to its upstreams by default).
    """
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"cache-control", b"no-cache, no-store")
    request.setHeader(b"x-accel-buffering", b"no")


@attrs.frozen
class StreamSettings:
    """
    How event streams behave.

    @ivar keepalive: seconds between keepalive comments (0: none).
    @ivar retry: the reconnection delay (ms) sent to EventSource clients
        (0: none sent; an C{: open} comment opens the stream instead).
    @ivar writeTimeout: seconds a client may leave its connection full
        (reading nothing) before it is dropped; also set as the socket's
        C{TCP_USER_TIMEOUT}, so the kernel gives up on a dead peer as soon.
    @ivar logStreams: log each stream's opening and closing (debug level,
        with the job id). Off by default (C{--log-level debug} turns it
        on): made and written, two lines per stream cost a fifth to a half
        of what connecting a stream does (docs/performance.md, "Metrics").
    """

    keepalive: float = 15.0
    retry: int = 2000
    writeTimeout: float = 30.0
    logStreams: bool = False


@attrs.define
class StreamLimits:
    """
    Counts open event streams, globally and per job, against their limits
    (C{0}: no limit).
    """

    maxStreams: int = 0
    maxPerJob: int = 0
    retryAfter: int = 5
    _open: int = attrs.field(default=0, init=False)
    _perJob: dict[str, int] = attrs.field(factory=dict, init=False)
    #: Streams dropped because their client read nothing for
    #: C{writeTimeout} (for /metrics).
    dropped: int = attrs.field(default=0, init=False)

    def check(self, jobID: str | None) -> None:
        """
        @param jobID: the job the stream would watch; C{None} for a job not
            made yet (it has no streams): only the global limit applies.
        @raise TooManyStreams: one more stream (for C{jobID}) would pass a
            limit.
        """
        if self.maxStreams and self._open >= self.maxStreams:
            raise TooManyStreams(f"the server has {self._open} open streams, its limit", self.retryAfter)
        if jobID is not None and self.maxPerJob and self._perJob.get(jobID, 0) >= self.maxPerJob:
            raise TooManyStreams(f"this render has {self.maxPerJob} open streams, its limit", self.retryAfter)

    def opened(self, jobID: str) -> None:
        self._open += 1
        self._perJob[jobID] = self._perJob.get(jobID, 0) + 1

    def closed(self, jobID: str) -> None:
        self._open -= 1
        left = self._perJob[jobID] - 1
        if left:
            self._perJob[jobID] = left
        else:
            del self._perJob[jobID]

    def checkMany(self, jobIDs: Sequence[str]) -> None:
        """
        As L{check}, for one stream that watches every job of C{jobIDs}
        (C{GET /events}): it counts once towards the global limit and once
        towards each job's.
        """
        self.check(None)
        if self.maxPerJob:
            for jobID in jobIDs:
                if self._perJob.get(jobID, 0) >= self.maxPerJob:
                    raise TooManyStreams(
                        f"render {jobID} has {self.maxPerJob} open streams, its limit", self.retryAfter
                    )

    def openedMany(self, jobIDs: Sequence[str]) -> None:
        self._open += 1
        for jobID in jobIDs:
            self._perJob[jobID] = self._perJob.get(jobID, 0) + 1

    def closedMany(self, jobIDs: Sequence[str]) -> None:
        self._open -= 1
        for jobID in jobIDs:
            left = self._perJob[jobID] - 1
            if left:
                self._perJob[jobID] = left
            else:
                del self._perJob[jobID]

    def perJob(self, jobID: str) -> int:
        """
        How many open streams watch C{jobID}.
        """
        return self._perJob.get(jobID, 0)

    @property
    def open(self) -> int:
        return self._open


def _abort(request: Request) -> None:
    """
    Drop a request's connection now, without waiting to flush (the peer is
    not reading). Under HTTP/2 only this stream is reset.
    """
    transport = getattr(request, "transport", None)
    if transport is not None:
        transport.abortConnection()
    else:
        request.channel.loseConnection()


NOTSENT_LOWAT = 128 * 1024


def openingFrame(retry: int, event: Event | None = None) -> bytes:
    """
    The first frame of a stream, which makes the response's headers leave
    at once: C{retry:} (the reconnection time), or the comment C{: open}
    with C{retry} 0. With C{event}, that event, carrying C{retry:} too.

    An opening event gives the client its first id before anything else
    happens (C{/render-stream}'s C{render} event, id C{JOBID:0}): a client
    that drops before the first real event reconnects with it. The event
    needs data: WHATWG's "dispatch the event" sets the last event ID even
    for a block without data, and Chromium does, but Firefox and WebKit
    keep an id only from a block they dispatch as an event (measured:
    tests/browsers/test_renderstream.py).
    """
    if event is not None:
        return encodeEvent(attrs.evolve(event, retry=retry or None))
    return encodeRetry(retry) if retry else OPENED


def _socketOptions(transport: ITCPTransport, writeTimeout: float) -> None:
    """
    Linux, plain TCP only (under TLS getHandle() is not a socket):

    - C{TCP_USER_TIMEOUT}: the kernel gives up on a peer that acknowledges
      nothing for C{writeTimeout}, as we do;
    - C{TCP_NOTSENT_LOWAT}: the kernel keeps at most 128 KiB unsent per
      socket, so a client that stops reading fills its buffers (and makes
      Twisted pause the stream) after ~128 KiB rather than megabytes of
      kernel memory.
    """
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(handle, socket.socket):
        return
    for name, value in (("TCP_USER_TIMEOUT", int(writeTimeout * 1000)), ("TCP_NOTSENT_LOWAT", NOTSENT_LOWAT)):
        option = getattr(socket, name, None)
        if option is not None and value > 0:
            try:
                handle.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:  # pragma: no cover - a kernel without it
                pass


@implementer(ISubscriber, IPushProducer)
class _Stream:
    """
    One open event stream: the subscriber the broker delivers to, the push
    producer Twisted pauses when the client stops reading, a member of the
    shared L{Keepalives} timer, and the owner of its write-deadline timer.
    Everything it holds is released in L{_Stream._closed} (the request's
    C{notifyFinish}), whether the job ended, the client left, or the server
    is stopping.

    Paused during its replay, it writes no more of it: it is I{behind}, and
    drops what the broker delivers (all of it is in the job's history)
    until the client reads again; then it subscribes again after
    C{_cursor}, the broker's id of the last event it wrote. Paused once
    live, it coalesces (the latest progress, the terminal event).
    """

    __slots__ = (
        "_request", "_clock", "_settings", "_rewriteID", "_onClose", "_keepalives", "_unsubscribe",
        "_open", "_paused", "_latest", "_terminal", "_deadline", "_replaying", "_wrote",
        "_broker", "_jobID", "_cursor", "_behind", "_pending", "_limits",
    )  # fmt: skip

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        settings: StreamSettings,
        rewriteID: Callable[[str], str] | None = None,
        onClose: Callable[[], None] | None = None,
        keepalives: Keepalives | None = None,
        limits: StreamLimits | None = None,
    ) -> None:
        self._request = request
        self._limits = limits
        self._clock = clock
        self._settings = settings
        self._rewriteID = rewriteID
        self._onClose = onClose
        self._keepalives = keepalives
        self._unsubscribe: Callable[[], None] | None = None
        self._open = True
        self._paused = False
        self._latest: tuple[Event, bytes] | None = None
        self._terminal: tuple[Event, bytes] | None = None
        self._deadline: IDelayedCall | None = None
        self._replaying = False
        self._wrote = False
        self._broker: IAsyncJobBroker | None = None
        self._jobID = ""
        self._cursor: str | None = None
        self._behind = False
        self._pending: Deferred[Callable[[], None]] | None = None

    def start(self, broker: IAsyncJobBroker, jobID: str, after: str | None, opening: Event | None = None) -> None:
        """
        Send the headers and the opening frame (with the C{opening} event,
        if given), then the job's events after C{after}, then live ones.
        """
        request, settings = self._request, self._settings
        request.notifyFinish().addBoth(self._closed)
        transport = tcpTransport(request)
        if transport is not None:
            transport.setTcpNoDelay(True)
            _socketOptions(transport, settings.writeTimeout)
        request.registerProducer(self, True)
        # Headers leave with the first write: send it now, so that
        # EventSource fires "open" and proxies pass the response on.
        request.write(openingFrame(settings.retry, opening))
        self._wrote = True
        if self._open and self._keepalives is not None:
            self._keepalives.add(self)
        self._broker, self._jobID, self._cursor = broker, jobID, after
        if settings.logStreams:
            _log.debug("event stream of {jobID} opened", jobID=jobID)
        if self._open:
            self._subscribe()

    def _subscribe(self) -> None:
        """
        Subscribe after C{_cursor}: the broker writes the replay through
        L{deliver} before its Deferred fires (the memory broker: in this
        call; Redis: once the history is loaded). If the client's buffer
        fills part-way, the rest waits for L{resumeProducing}; if it
        drained again already (within the replay), go on at once.
        """
        assert self._broker is not None
        self._behind = False
        self._replaying = True
        pending = self._pending = self._broker.subscribe(self._jobID, self._cursor, self)
        pending.addCallbacks(self._subscribed, self._subscribeFailed)

    def _subscribed(self, unsubscribe: Callable[[], None]) -> None:
        self._pending = None
        self._replaying = False
        if not self._open:
            # The terminal event came with the replay and ended the
            # stream (or the client left meanwhile).
            unsubscribe()
            return
        if self._behind and not self._paused:
            unsubscribe()
            self._subscribe()
            return
        self._unsubscribe = unsubscribe

    def _subscribeFailed(self, failure: Failure) -> None:
        self._pending = None
        self._replaying = False
        if failure.check(CancelledError) is not None and not self._open:
            return
        if failure.check(UnknownJob) is not None:
            # The job is gone (expired) while the client was not reading:
            # end the stream; its reconnect learns why.
            _log.info("event stream of {jobID} ended: the job is gone", jobID=self._jobID)
        elif failure.check(RetryLater) is not None:
            # Redis cannot answer: the client reconnects (after its retry
            # delay) and resumes from its last event.
            _log.info("event stream of {jobID} ended: {why}", jobID=self._jobID, why=failure.getErrorMessage())
        else:
            _log.failure("event stream of {jobID} could not subscribe", failure, jobID=self._jobID)
        if self._open:
            self._end()

    def keepalive(self) -> bool:
        """
        Called by L{Keepalives} every half interval: write a keepalive
        comment unless a frame went out since the last call, so that a quiet
        stream gets one every interval and a busy one none. A paused
        stream's connection is full: a keepalive would only queue. Whether
        it wrote one.
        """
        if self._wrote:
            self._wrote = False
        elif not self._paused:
            self._wrote = True
            self._request.write(KEEPALIVE)
            return True
        return False

    def deliver(self, event: Event, frame: bytes) -> None:
        if not self._open:
            return
        if self._paused or self._replaying:
            # Off the hot path: a stream that keeps up and is live skips it.
            if self._behind or (self._paused and self._replaying):
                # Paused during the replay: the rest of it, and live events
                # meanwhile, are in the history after the cursor.
                self._behind = True
                return
            if self._paused:
                # Coalesce: the latest progress supersedes the earlier ones.
                if self._rewriteID is not None and event.id is not None:
                    frame = encodeEvent(attrs.evolve(event, id=self._rewriteID(event.id)))
                if event.event in TERMINAL_EVENTS:
                    self._terminal = (event, frame)
                else:
                    self._latest = (event, frame)
                return
            self._cursor = event.id
        if self._rewriteID is not None and event.id is not None:
            frame = encodeEvent(attrs.evolve(event, id=self._rewriteID(event.id)))
        self._wrote = True
        if event.event in TERMINAL_EVENTS:
            # The last frame and the end of the response: one send.
            with sendTogether(getattr(self._request.channel, "transport", None)):
                self._request.write(frame)
                self._end()
            return
        self._request.write(frame)

    def deliverMany(self, events: Sequence[Event], frames: Sequence[bytes], joined: bytes) -> None:
        if not self._open:
            return
        if (
            self._rewriteID is not None
            or self._paused
            or self._replaying
            or events[-1].event in TERMINAL_EVENTS  # (not in the contract) ends the stream
        ):
            for event, frame in zip(events, frames):
                self.deliver(event, frame)
            return
        # Published together (the render printed them while the server was
        # busy), or queued while a fan-out pass came round: they leave
        # together, each frame whole, in one write.
        self._wrote = True
        self._request.write(joined)

    def _end(self) -> None:
        self._request.unregisterProducer()
        self._request.finish()

    # -- IPushProducer: Twisted calls these as the client's buffer fills
    # and drains.

    def pauseProducing(self) -> None:
        if self._paused or not self._open:
            return
        self._paused = True
        if self._settings.writeTimeout > 0:
            self._deadline = self._clock.callLater(self._settings.writeTimeout, self._stalled)

    def resumeProducing(self) -> None:
        if not self._paused or not self._open:
            return
        self._paused = False
        self._cancelDeadline()
        if self._behind:
            if not self._replaying:
                self._catchUp()
            # (Within the replay: _subscribe goes on when it returns.)
            return
        latest, self._latest = self._latest, None
        terminal, self._terminal = self._terminal, None
        if latest is not None or terminal is not None:
            self._wrote = True
        if latest is not None:
            self._request.write(latest[1])
        if terminal is not None:
            self._request.write(terminal[1])
            self._end()

    def _catchUp(self) -> None:
        """
        The client reads again after the replay stopped: subscribe afresh
        after the last event written. Events dropped from the history
        meanwhile come as a C{reset}, as on a resume.
        """
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        self._subscribe()

    def stopProducing(self) -> None:
        # The connection is going away; notifyFinish will clean up.
        self._latest = self._terminal = None

    def _stalled(self) -> None:
        self._deadline = None
        _log.info(
            "event stream dropped: the client read nothing for {seconds} s",
            seconds=self._settings.writeTimeout,
        )
        if self._limits is not None:
            self._limits.dropped += 1
        _abort(self._request)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _closed(self, result: object) -> None:
        # Fires once: on finish() and on a lost connection alike.
        self._open = False
        self._cancelDeadline()
        self._latest = self._terminal = None
        if self._keepalives is not None:
            keepalives, self._keepalives = self._keepalives, None
            keepalives.discard(self)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            unsubscribe()
        if self._onClose is not None:
            onClose, self._onClose = self._onClose, None
            onClose()
        if self._settings.logStreams:
            if isinstance(result, Failure):
                _log.debug("event stream of {jobID} closed by the client: {why}", jobID=self._jobID,
                           why=result.getErrorMessage())
            else:
                _log.debug("event stream of {jobID} closed", jobID=self._jobID)


class EventStreamResource(Resource):
    """
    Streams one job's events: the history after the client's last event
    id, then live events, keepalive comments every C{settings.keepalive}
    seconds, and the end of the response after the terminal event.

    @param rewriteID: maps the broker's event id to the one sent, for the
        one-request C{/render-stream} shape whose ids name the job too.
    @param limits: counts this stream while it is open.
    @param keepalives: the timer that sends this stream's keepalives,
        shared by every stream of an app; by default one of its own.
    @param opening: an event sent in the opening frame, before the
        history (C{/render-stream}'s C{render} event, whose id C{JOBID:0}
        makes a reconnect, however early, name the render it watches).
    """

    isLeaf = True

    def __init__(
        self,
        broker: IAsyncJobBroker | IJobBroker,
        jobID: str,
        clock: IReactorTime,
        settings: StreamSettings = StreamSettings(),
        after: str | None = None,
        rewriteID: Callable[[str], str] | None = None,
        limits: StreamLimits | None = None,
        keepalives: Keepalives | None = None,
        opening: Event | None = None,
    ) -> None:
        # Typing note: Resource.__init__ is unannotated, and mypy's
        # untyped_calls_exclude misses calls through super()
        # (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        # (A synchronous broker, as an embedder may hold, is served through
        # the asynchronous contract: already-fired Deferreds.)
        self._broker: IAsyncJobBroker = (
            broker if IAsyncJobBroker.providedBy(broker) else AsyncMemoryBroker(broker)
        )
        self._jobID = jobID
        self._clock = clock
        self._settings = settings
        self._after = after
        self._rewriteID = rewriteID
        self._limits = limits
        self._opening = opening
        self._keepalives = keepalives if keepalives is not None else Keepalives(clock, settings.keepalive)

    def _lastSeen(self, request: Request) -> str | None:
        return self._after if self._after is not None else lastEventID(request)

    def _whenFinishedFor(self, request: Request) -> Deferred[bool]:
        """
        Whether the client has seen the job's last event already (a
        reconnect after it): then C{204} tells EventSource to stop
        reconnecting, instead of replaying forever.
        """
        after = self._lastSeen(request)
        if after is None:
            return succeed(False)
        return self._broker.caughtUp(self._jobID, after)

    def _answer(self, request: Request, then: Callable[[], bytes | int]) -> bytes | int:
        """
        Ask the broker whether the client is done; answer C{204} if so,
        else C{then()}. At once when the broker answers at once (memory);
        otherwise when it does, or with an error answer if it cannot say
        (Redis down: 503 with C{Retry-After}).
        """
        box: list[bool | Failure] = []
        decision = self._whenFinishedFor(request)
        decision.addBoth(box.append)
        if box:
            return self._decided(request, box[0], then)
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)

        def late(outcome: bool | Failure) -> None:
            if gone:
                return
            body = self._decided(request, outcome, then)
            if body is not NOT_DONE_YET:
                assert isinstance(body, bytes)
                request.write(body)
                request.finish()

        decision.addCallback(lambda _: late(box[0])).addErrback(
            lambda f: _log.failure("event stream of {jobID} could not start", f, jobID=self._jobID)
        )
        return NOT_DONE_YET

    def _decided(self, request: Request, outcome: bool | Failure, then: Callable[[], bytes | int]) -> bytes | int:
        if isinstance(outcome, Failure):
            error = outcome.value
            if not isinstance(error, TwistedSSEError):
                _log.failure("event stream of {jobID}: the broker failed", outcome, jobID=self._jobID)
                return respondError(request, 500, "internal_error", "the server failed; the error was logged")
            if isinstance(error, RetryLater):
                request.setHeader(b"retry-after", str(error.retryAfter).encode("ascii"))
            return respondError(request, error.status, error.code, str(error))
        if outcome:
            request.setResponseCode(204)
            return b""
        return then()

    def render_GET(self, request: Request) -> bytes | int:
        return self._answer(request, lambda: self._open(request))

    def _open(self, request: Request) -> int:
        startStreamHeaders(request)
        onClose = None
        if self._limits is not None:
            limits, jobID = self._limits, self._jobID
            limits.opened(jobID)
            onClose = lambda: limits.closed(jobID)  # noqa: E731
        stream = _Stream(
            request, self._clock, self._settings, self._rewriteID, onClose, self._keepalives, self._limits
        )
        stream.start(self._broker, self._jobID, self._lastSeen(request), self._opening)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes | int:
        # Resource.render_HEAD would call render_GET and open a stream (and
        # its keepalive timer) that nothing ever reads.
        def headers() -> bytes:
            startStreamHeaders(request)
            return b""

        return self._answer(request, headers)

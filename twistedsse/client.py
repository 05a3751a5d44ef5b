"""
An EventSource client for Twisted: L{subscribe} opens an event stream with
treq and calls back with each decoded L{Event}, reconnecting the way a
browser does.

It follows the EventSource rules: on a dropped connection it reconnects
after the server's C{retry:} delay (on the injected clock) with
C{Last-Event-ID}; C{204 No Content} or any other non-200 answer ends it.
Unlike a browser it also stops, by default, at a twistedsse terminal event
(C{complete}, C{failed}, C{cancelled}), so it does not make the extra
request that a browser page that forgets to C{close()} makes.

The body is read with C{unbuffered=True} and handed straight to the
decoder: an endless stream is never kept in memory.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Protocol as _Protocol, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.iweb import IResponse
from twisted.python.failure import Failure

from ._decoder import EventStreamDecoder
from ._frames import TERMINAL_EVENTS, Event

__all__ = ["HTTPStatusError", "Subscription", "subscribe"]


class HTTPStatusError(Exception):
    """
    The server answered the stream request with a status that ends an
    EventSource: anything but 200 and 204, or a non-event-stream body.

    @ivar code: the HTTP status code.
    @ivar body: the start of the response body (an error's JSON, usually).
    """

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__(f"event stream answered {code}: {body[:200]!r}")
        self.code = code
        self.body = body


class _Body(Protocol):
    """
    Feeds a response body to the decoder as it arrives.
    """

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._subscription._feed(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.ended.callback(None)


class _HTTPGetter(_Protocol):
    """
    What the client needs of treq: the C{treq} module, a treq
    C{HTTPClient}, or a C{treq.testing.StubTreq}.
    """

    # Typing note: Deferred[Any], as treq's answer is a Deferred of its
    # private _Response (an IResponse), and Deferred is invariant.
    def get(
        self, url: str, headers: dict[str | bytes, str | bytes], *, unbuffered: bool
    ) -> Deferred[Any]: ...


@attrs.define(eq=False)
class Subscription:
    """
    One subscription to an event stream, across reconnects.

    @ivar lastEventID: the id of the last event received (sent back as
        C{Last-Event-ID} when reconnecting).
    @ivar retry: the reconnection delay in milliseconds (updated by the
        server's C{retry:} field).
    @ivar done: fires with C{None} when the subscription ends normally (a
        terminal event, C{204}, or L{Subscription.close}) and fails with
        L{HTTPStatusError} for any other answer.
    @ivar connections: how many times the stream was opened.
    """

    _client: _HTTPGetter
    _url: str
    _onEvent: Callable[[Event], object]
    _clock: IReactorTime
    _headers: dict[str, str]
    _stopOn: Collection[str]
    lastEventID: str | None
    retry: int
    done: Deferred[None] = attrs.field(factory=Deferred)
    connections: int = 0
    _decoder: EventStreamDecoder = attrs.field(factory=EventStreamDecoder)
    _body: _Body | None = None
    _pending: Deferred[Any] | None = None
    _reconnect: IDelayedCall | None = None
    _closed: bool = False

    def _connect(self) -> None:
        self._reconnect = None
        self._decoder = EventStreamDecoder()
        # Typed as treq takes them (its dict is invariant in str | bytes).
        headers: dict[str | bytes, str | bytes] = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(self._headers.items())
        if self.lastEventID:
            headers["Last-Event-ID"] = self.lastEventID
        self._pending = self._client.get(self._url, headers=headers, unbuffered=True)
        self._pending.addCallbacks(self._response, self._lost)

    def _response(self, response: IResponse) -> None:
        self._pending = None
        if self._closed:
            response.deliverBody(Protocol())
            return
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if response.code == 204:
            self._end()
            return
        if response.code != 200 or not kind.startswith(b"text/event-stream"):
            collected: list[bytes] = []
            body = _Collect(collected)
            response.deliverBody(body)
            body.ended.addCallback(lambda _: self._end(HTTPStatusError(response.code, b"".join(collected))))
            return
        self.connections += 1
        self._body = _Body(self)
        response.deliverBody(self._body)
        self._body.ended.addCallback(lambda _: self._lost(None))

    def _feed(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if self._closed:
                return
            if event.id is not None:
                self.lastEventID = event.id
            self._onEvent(event)
            if event.event in self._stopOn:
                self._end()
                return
        if self._decoder.lastEventId:
            # A block with an id and no data (C{/render-stream}'s opening
            # C{id: JOBID:0}) dispatches no event but sets the id a
            # reconnect sends, as in a browser.
            self.lastEventID = self._decoder.lastEventId
        if self._decoder.retry is not None:
            self.retry = self._decoder.retry

    def _lost(self, reason: Failure | None) -> None:
        # The connection dropped, or the server ended the response: try
        # again after the retry delay, as EventSource does.
        self._pending = None
        self._body = None
        if not self._closed:
            self._reconnect = self._clock.callLater(self.retry / 1000, self._connect)

    def _end(self, error: Exception | None = None) -> None:
        if self._closed:
            return
        self._stop()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def close(self) -> None:
        """
        Stop: drop the connection, cancel any reconnect. C{done} fires if it
        had not.
        """
        if not self._closed:
            self._stop()
        if not self.done.called:
            self.done.callback(None)

    def _stop(self) -> None:
        self._closed = True
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.addErrback(lambda _: None)
            pending.cancel()
        if self._body is not None and self._body.transport is not None:
            # Typing note: Protocol.transport is typed ITransport; a
            # response body's is a producer (twisted.web's
            # TransportProxyProducer), which is how a body is abandoned.
            cast(IPushProducer, self._body.transport).stopProducing()


class _Collect(Protocol):
    def __init__(self, into: list[bytes], limit: int = 4096) -> None:
        self._into = into
        self._left = limit
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self._left > 0:
            self._into.append(data[: self._left])
            self._left -= len(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.ended.callback(None)


def subscribe(
    url: str,
    onEvent: Callable[[Event], object],
    *,
    clock: IReactorTime,
    client: _HTTPGetter | None = None,
    lastEventID: str | None = None,
    retry: int = 3000,
    headers: dict[str, str] | None = None,
    stopOn: Collection[str] = TERMINAL_EVENTS,
) -> Subscription:
    """
    Open the event stream at C{url} and call C{onEvent} with each event.

    @param clock: schedules reconnects.
    @param client: a treq C{HTTPClient} (or C{treq.testing.StubTreq}); by
        default the C{treq} module's global client.
    @param lastEventID: resume after this id.
    @param retry: the reconnection delay (ms) until the server sets one.
    @param stopOn: event names after which the subscription ends (pass
        C{()} to behave exactly as EventSource).
    """
    if client is None:
        import treq

        client = treq
    subscription = Subscription(
        client, url, onEvent, clock, dict(headers or {}), frozenset(stopOn), lastEventID, retry
    )
    subscription._connect()
    return subscription

"""
A client for Twisted: L{RenderClient} drives the whole HTTP API (create,
status, cancel, download, events, L{RenderClient.whenFinished}) with treq
and raises typed errors (L{APIError} and its subclasses) for the JSON error
answers; L{subscribe} opens one event stream and calls back with each
decoded L{Event}, reconnecting the way a browser does.

The error tree, from the server's C{{"error": CODE, "detail": ...}}::

    APIError                    any error answer (code, detail, status, retryAfter)
    ├── InvalidRequest          malformed_json, invalid_body, unknown_renderer,
    │   │                       body_too_large, bad_request, ...
    │   └── InvalidParams       invalid_params
    ├── Unauthorized            unauthorized (401), forbidden (403)
    ├── UnknownJob              unknown_job, job_expired
    ├── JobFinished             job_finished (cancelling an ended render)
    ├── NoOutput                output_not_ready, output_expired
    ├── RetryLater              too_many_streams, redis_unavailable; any
    │   │                       429/503 (retryAfter: the server's Retry-After)
    │   └── QueueFull           queue_full
    └── UnexpectedResponse      not a JSON answer of the API (a proxy's page,
                                an answer over the size bound)

A code not listed (a newer server's) is classed by its status: 400, 413,
415, 422 InvalidRequest; 401, 403 Unauthorized; 429, 503 RetryLater; any
other APIError. The code is always the server's.

An event stream follows the EventSource rules: on a dropped connection it
reconnects after the server's C{retry:} delay (on the injected clock) with
C{Last-Event-ID}, backing off (Twisted's L{backoffPolicy}) while
connections keep failing before any byte arrives; C{204 No Content} or any
other non-200 answer ends it. A line longer than C{maxLineLength} ends it
with the decoder's C{ValueError}.
Unlike a browser it also stops, by default, at a twistedsse terminal event
(C{complete}, C{failed}, C{cancelled}), so it does not make the extra
request that a browser page that forgets to C{close()} makes.

The body is read with C{unbuffered=True} and handed straight to the
decoder: an endless stream is never kept in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Collection, Mapping, Protocol as _Protocol, cast

import attrs
from hyperlink import DecodedURL
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.python.failure import Failure

from ._decoder import EventStreamDecoder
from ._frames import TERMINAL_EVENTS, Event

__all__ = [
    "APIError", "HTTPStatusError", "InvalidParams", "InvalidRequest", "Job", "JobFinished", "NoOutput",
    "QueueFull", "RenderClient", "RetryLater", "Subscription", "Unauthorized", "UnexpectedResponse",
    "UnknownJob", "subscribe",
]  # fmt: skip

#: The longest event stream line a client accepts by default: the server's
#: own lines are at most a 64 KiB render line plus the frame's field name.
MAX_LINE_LENGTH = 1024 * 1024

#: The largest JSON answer (a job, an error) a L{RenderClient} reads.
MAX_JSON_BYTES = 1024 * 1024


class HTTPStatusError(Exception):
    """
    The server answered the stream request with a status that ends an
    EventSource: anything but 200 and 204, or a non-event-stream body.

    @ivar code: the HTTP status code.
    @ivar body: the start of the response body (an error's JSON, usually).
    @ivar headers: the response's headers (for C{Retry-After}).
    """

    def __init__(self, code: int, body: bytes, headers: Headers | None = None) -> None:
        super().__init__(f"event stream answered {code}: {body[:200]!r}")
        self.code = code
        self.body = body
        self.headers = headers if headers is not None else Headers()


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
    @ivar failures: connections in a row that ended (or failed) before a
        byte of the stream arrived; the reconnect delay backs off with it.
    """

    _client: _HTTPGetter
    _url: str
    _onEvent: Callable[[Event], object]
    _clock: IReactorTime
    _headers: dict[str, str]
    _stopOn: Collection[str]
    lastEventID: str | None
    retry: int
    _backoff: Callable[[int], float] = attrs.field(factory=backoffPolicy)
    _maxLineLength: int | None = MAX_LINE_LENGTH
    _maxFailures: int | None = None
    done: Deferred[None] = attrs.field(factory=Deferred)
    connections: int = 0
    failures: int = 0
    _received: bool = False
    _decoder: EventStreamDecoder = attrs.field(factory=EventStreamDecoder)
    _body: _Body | None = None
    _pending: Deferred[Any] | None = None
    _reconnect: IDelayedCall | None = None
    _closed: bool = False

    def _connect(self) -> None:
        self._reconnect = None
        self._received = False
        self._decoder = EventStreamDecoder(maxLineLength=self._maxLineLength)
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
            body.ended.addCallback(
                lambda _: self._end(HTTPStatusError(response.code, b"".join(collected), response.headers))
            )
            return
        self.connections += 1
        self._body = _Body(self)
        response.deliverBody(self._body)
        self._body.ended.addCallback(lambda _: self._lost(None))

    def _feed(self, data: bytes) -> None:
        self._received = True
        try:
            events = self._decoder.feed(data)
        except ValueError as e:
            # A line over the bound: this is not a stream we can read.
            self._end(e)
            return
        for event in events:
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
        if self._closed:
            return
        delay = self.retry / 1000
        if self._received:
            self.failures = 0
        else:
            # Refused, reset, or ended before a byte: back off, so a
            # server that is down or restarting is not hammered.
            delay = max(delay, self._backoff(self.failures))
            self.failures += 1
            limit = self._maxFailures
            if limit is not None and (self.connections == 0 or self.failures > limit):
                error = reason.value if reason is not None else None
                if not isinstance(error, Exception):
                    error = ConnectionDone("the event stream ended before any event")
                self._end(error)
                return
        self._reconnect = self._clock.callLater(delay, self._connect)

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
    backoff: Callable[[int], float] | None = None,
    maxLineLength: int | None = MAX_LINE_LENGTH,
    maxFailures: int | None = None,
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
    @param backoff: the delay (s) before reconnect attempt N (from 0) after
        connections that failed before any byte arrived; the server's
        C{retry:} is the least delay. Default: Twisted's L{backoffPolicy}
        (1 s, growing 1.5 times per attempt to a minute, with jitter).
    @param maxLineLength: the longest line accepted; a longer one ends the
        subscription with C{ValueError}. C{None}: no bound.
    @param maxFailures: give up (C{done} fails with the connection's
        error) when the first connection fails, or after this many failed
        reconnects in a row. C{None}: retry for ever, as EventSource does.
    """
    if client is None:
        import treq

        client = treq
    subscription = Subscription(
        client, url, onEvent, clock, dict(headers or {}), frozenset(stopOn), lastEventID, retry,
        backoff=backoff if backoff is not None else backoffPolicy(), maxLineLength=maxLineLength,
        maxFailures=maxFailures,
    )  # fmt: skip
    subscription._connect()
    return subscription


# -- the whole API ---------------------------------------------------------


class APIError(Exception):
    """
    The server answered with an error: C{{"error": code, "detail": ...}}
    and a 4xx/5xx status (see the README's "HTTP API" for the codes).

    @ivar code: the machine-readable C{error} code, e.g. C{"unknown_job"}.
    @ivar detail: the server's explanation.
    @ivar status: the HTTP status.
    @ivar retryAfter: seconds the server asked the client to wait before
        trying again (its C{Retry-After}), or C{None} if it did not say.
    """

    def __init__(self, code: str, detail: str, status: int, retryAfter: float | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status
        self.retryAfter = retryAfter


class InvalidRequest(APIError):
    """
    The server refused the request as it is (400, 413, 415, 422): sending
    it again will not help.
    """


class InvalidParams(InvalidRequest):
    """
    A render parameter is missing, of the wrong type or out of range; the
    detail names it.
    """


class Unauthorized(APIError):
    """
    No valid token (401 C{unauthorized}), or one whose scope does not cover
    the request (403 C{forbidden}).
    """


class UnknownJob(APIError, LookupError):
    """
    No such render (404 C{unknown_job}), or it has expired (410
    C{job_expired}).
    """


class JobFinished(APIError):
    """
    Cancelling a render that has already ended (409 C{job_finished}).
    """


class NoOutput(APIError):
    """
    The render has no output to download: not yet, or not any more (409
    C{output_not_ready}, 410 C{output_expired}).
    """


class RetryLater(APIError):
    """
    The server is at a limit now (too many streams, Redis unavailable, any
    429 or 503); the same request may succeed after C{retryAfter} seconds.
    """


class QueueFull(RetryLater):
    """
    The render queue is full (429 C{queue_full}).
    """


class UnexpectedResponse(APIError):
    """
    The answer is not one of the API's: not JSON (a proxy's error page), not
    the expected shape, or larger than the client reads.
    """


_ERRORS: dict[str, type[APIError]] = {
    "malformed_json": InvalidRequest,
    "invalid_body": InvalidRequest,
    "unknown_renderer": InvalidRequest,
    "body_too_large": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "bad_request": InvalidRequest,
    "invalid_params": InvalidParams,
    "unauthorized": Unauthorized,
    "forbidden": Unauthorized,
    "unknown_job": UnknownJob,
    "job_expired": UnknownJob,
    "job_finished": JobFinished,
    "output_not_ready": NoOutput,
    "output_expired": NoOutput,
    "queue_full": QueueFull,
    "too_many_streams": RetryLater,
    "redis_unavailable": RetryLater,
}


#: The class of an error whose code is not in L{_ERRORS}.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest, 413: InvalidRequest, 415: InvalidRequest, 422: InvalidRequest,
    401: Unauthorized, 403: Unauthorized, 429: RetryLater, 503: RetryLater,
}  # fmt: skip


def _retryAfter(headers: Headers, now: float) -> float | None:
    """
    C{Retry-After} in seconds: either form (delay-seconds or an HTTP date),
    or C{None} if absent or unreadable.
    """
    value = (headers.getRawHeaders(b"retry-after") or [b""])[0].decode("latin-1").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def apiError(status: int, body: bytes, headers: Headers, now: float) -> APIError:
    """
    The typed error for an error answer.
    """
    retryAfter = _retryAfter(headers, now)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), str)):
        text = body[:200].decode("utf-8", "replace")
        kind: type[APIError] = RetryLater if status in (429, 503) else UnexpectedResponse
        return kind("unexpected_response", f"not an API error answer: {text!r}", status, retryAfter)
    code = parsed["error"]
    detail = str(parsed.get("detail", ""))
    # A code this client does not know (a newer server's) by its status.
    kind = _ERRORS.get(code) or _BY_STATUS.get(status, APIError)
    return kind(code, detail, status, retryAfter)


class _TooLarge(Exception):
    pass


class _ToFile(Protocol):
    """
    A download's body, handed to C{write} as it arrives (what C{treq.collect}
    does, plus cancellation: cancelling C{done} drops the connection, so no
    more of the body is read, and nothing is written after it).
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self.done: Deferred[None] = Deferred(lambda _: self._abandon())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            self._write(data)
        except BaseException:
            failure = Failure()
            self._abandon()
            self.done.errback(failure)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # (PotentialDataLoss: a body without a length, ended by the
            # close, as treq.collect takes it.)
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abandon(self) -> None:
        if self.transport is not None:
            # Typing note: as in Subscription._stop.
            cast(IPushProducer, self.transport).stopProducing()


#: The states after which a render changes no more.
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


@attrs.frozen
class Job:
    """
    A render as the server describes it (C{GET /renders/ID}).

    @ivar state: C{queued}, C{running}, C{succeeded}, C{failed} or
        C{cancelled}.
    @ivar progress: the last progress event's data, or C{None}.
    @ivar result: the C{complete} event's data once it succeeded.
    @ivar error: the C{failed} (or C{cancelled}) data once it ended so.
    @ivar statusURL: absolute URLs, resolved against the client's base.
    @ivar raw: the whole JSON object, fields this class does not name included.
    """

    id: str
    renderer: str
    state: str
    progress: Mapping[str, Any] | None
    result: Mapping[str, Any] | None
    error: Mapping[str, Any] | None
    statusURL: str
    eventsURL: str
    outputURL: str
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def fromJSON(cls, obj: object, base: DecodedURL) -> Job:
        """
        @raise UnexpectedResponse: C{obj} is not a job.
        """
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("id", "renderer", "state"))):
            raise UnexpectedResponse("unexpected_response", f"not a job: {str(obj)[:200]}", 200)
        jobID = obj["id"]
        default = base.child("renders", jobID)

        def url(field: str, fallback: DecodedURL) -> str:
            value = obj.get(field)
            return (base.click(value) if isinstance(value, str) else fallback).to_text()

        def mapping(field: str) -> Mapping[str, Any] | None:
            value = obj.get(field)
            return value if isinstance(value, dict) else None

        return cls(
            jobID, obj["renderer"], obj["state"], mapping("progress"), mapping("result"), mapping("error"),
            url("status_url", default), url("events_url", default.child("events")),
            url("output_url", default.child("output")), obj,
        )  # fmt: skip


def _defaultHTTP(reactor: Any, pool: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


@attrs.define
class RenderClient:
    """
    The whole HTTP API, on treq: each method returns a L{Deferred} that
    fails with an L{APIError} subclass for the server's error answers (and
    with Twisted's connection errors when it cannot be reached).

    JSON answers are read up to C{maxJSONBytes}; downloads and event
    streams are never held in memory. Redirects are not followed, so the
    token goes to C{baseURL}'s server only.

    @ivar baseURL: where the service is, e.g. C{http://127.0.0.1:8080}
        (a path prefix, for a service mounted under one, is kept).
    @ivar timeout: seconds a JSON request may wait for its answer.
    @ivar maxStreamFailures: an event stream that cannot be opened fails
        at once; one that was open and is lost is reopened (with backoff)
        up to this many times in a row (about two minutes), then fails.
    """

    baseURL: str
    _token: str | None = attrs.field(default=None, repr=False, kw_only=True)
    _reactor: IReactorTime = attrs.field(kw_only=True)
    _pool: Any = attrs.field(default=None, kw_only=True, repr=False)
    # Typing note: Any, as both treq's HTTPClient and StubTreq are taken,
    # and treq's precise signatures match no Protocol of **kwargs.
    _http: Any = attrs.field(default=None, kw_only=True, repr=False)
    timeout: float = attrs.field(default=30.0, kw_only=True)
    maxJSONBytes: int = attrs.field(default=MAX_JSON_BYTES, kw_only=True)
    maxLineLength: int = attrs.field(default=MAX_LINE_LENGTH, kw_only=True)
    maxStreamFailures: int = attrs.field(default=10, kw_only=True)
    _base: DecodedURL = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._base = DecodedURL.from_text(self.baseURL)
        if self._http is None:
            self._http = _defaultHTTP(self._reactor, self._pool)

    def _headers(self, **extra: str) -> dict[str | bytes, str | bytes]:
        headers: dict[str | bytes, str | bytes] = {"Accept": "application/json"}
        headers.update(extra)
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _url(self, jobID: str, *more: str) -> str:
        return self._base.child("renders", jobID, *more).to_text()

    async def _read(self, response: IResponse) -> bytes:
        """
        The body, up to C{maxJSONBytes}; past it, the connection is closed.
        """
        import treq

        chunks: list[bytes] = []
        left = self.maxJSONBytes

        def collect(data: bytes) -> None:
            nonlocal left
            left -= len(data)
            if left < 0:
                raise _TooLarge()
            chunks.append(data)

        try:
            await treq.collect(response, collect)
        except _TooLarge:
            raise UnexpectedResponse(
                "unexpected_response", f"the answer is over {self.maxJSONBytes} bytes", response.code
            ) from None
        return b"".join(chunks)

    async def _error(self, response: IResponse) -> APIError:
        return apiError(response.code, await self._read(response), response.headers, self._reactor.seconds())

    async def _call(self, method: str, url: str, ok: int, body: object = None) -> object:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        response = await self._http.request(
            method, url, headers=self._headers(), unbuffered=True, allow_redirects=False,
            timeout=self.timeout, reactor=self._reactor, **kwargs,
        )  # fmt: skip
        if response.code != ok:
            raise await self._error(response)
        data = await self._read(response)
        try:
            return json.loads(data)
        except ValueError:
            raise UnexpectedResponse("unexpected_response", f"not JSON: {data[:200]!r}", response.code) from None

    async def _job(self, method: str, url: str, ok: int, body: object = None) -> Job:
        return Job.fromJSON(await self._call(method, url, ok, body), self._base)

    def create(self, renderer: str, params: Mapping[str, object] | None = None) -> Deferred[Job]:
        """
        Start a render (C{POST /renders}).
        """
        body = {"renderer": renderer, "params": dict(params or {})}
        return Deferred.fromCoroutine(self._job("POST", self._base.child("renders").to_text(), 202, body))

    def status(self, jobID: str) -> Deferred[Job]:
        """
        The render now (C{GET /renders/ID}).
        """
        return Deferred.fromCoroutine(self._job("GET", self._url(jobID), 200))

    def cancel(self, jobID: str) -> Deferred[Job]:
        """
        Cancel a queued or running render (C{DELETE /renders/ID}); fails
        with L{JobFinished} if it had ended.
        """
        return Deferred.fromCoroutine(self._job("DELETE", self._url(jobID), 202))

    def download(self, jobID: str, path: str | os.PathLike[str]) -> Deferred[int]:
        """
        Save the render's output to C{path}, streamed to disk as it arrives:
        written to a temporary file beside C{path} and renamed over it once
        whole, so C{path} is never a partial file; the temporary file is
        removed if anything fails (or the Deferred is cancelled, which also
        drops the connection). A body shorter than its C{Content-Length}
        fails with L{UnexpectedResponse}.

        @return: a Deferred firing with the number of bytes written.
        """
        return Deferred.fromCoroutine(self._download(jobID, os.fspath(path)))

    async def _download(self, jobID: str, path: str) -> int:
        response = await self._http.request(
            "GET", self._url(jobID, "output"), headers=self._headers(Accept="*/*"), unbuffered=True,
            allow_redirects=False, timeout=self.timeout, reactor=self._reactor,
        )  # fmt: skip
        if response.code != 200:
            raise await self._error(response)
        expected = response.length
        directory, name = os.path.split(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
        written = 0
        try:
            # mkstemp makes it 0600; the file gets the mode any new file would.
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:

                def write(data: bytes) -> None:
                    nonlocal written
                    f.write(data)
                    written += len(data)

                body = _ToFile(write)
                response.deliverBody(body)
                await body.done
            if isinstance(expected, int) and written != expected:
                raise UnexpectedResponse(
                    "unexpected_response", f"the output ended after {written} of {expected} bytes", 200
                )
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return written

    def events(
        self,
        jobID: str,
        onEvent: Callable[[Event], object],
        *,
        lastEventID: str | None = None,
        stopOn: Collection[str] = TERMINAL_EVENTS,
    ) -> Subscription:
        """
        L{subscribe} to the render's event stream; an error answer fails
        C{done} with an L{APIError}.
        """
        return self.eventsAt(self._url(jobID, "events"), onEvent, lastEventID=lastEventID, stopOn=stopOn)

    def eventsAt(
        self,
        url: str,
        onEvent: Callable[[Event], object],
        *,
        lastEventID: str | None = None,
        stopOn: Collection[str] = TERMINAL_EVENTS,
    ) -> Subscription:
        """
        L{events} for a stream at a URL (an C{events_url}, or
        C{/render-stream?...}), relative to C{baseURL} or absolute.
        """
        headers = {str(k): str(v) for k, v in self._headers().items() if k != "Accept"}
        subscription = subscribe(
            self._base.click(url).to_text(), onEvent, clock=self._reactor, client=self._http,
            lastEventID=lastEventID, headers=headers, stopOn=stopOn, maxLineLength=self.maxLineLength,
            maxFailures=self.maxStreamFailures,
        )  # fmt: skip

        def typed(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, HTTPStatusError):
                return Failure(apiError(error.code, error.body, error.headers, self._reactor.seconds()))
            return failure

        subscription.done.addErrback(typed)
        return subscription

    def whenFinished(self, jobID: str, onEvent: Callable[[Event], object] | None = None) -> Deferred[Job]:
        """
        The render once it has ended: follows its event stream to the
        terminal event, then reads its state. Cancelling the Deferred stops
        following (the render goes on).

        @param onEvent: also called with each event on the way.
        """
        return Deferred.fromCoroutine(self._whenFinished(jobID, onEvent or (lambda event: None)))

    async def _whenFinished(self, jobID: str, onEvent: Callable[[Event], object]) -> Job:
        lastEventID = None
        for attempt in range(_FOLLOW_ATTEMPTS):
            # Again after a pause, the stream resumes where it was.
            subscription = self.events(jobID, onEvent, lastEventID=lastEventID)
            try:
                await subscription.done
            except RetryLater as e:
                # Too many streams open now: wait as asked, then again.
                await deferLater(self._reactor, e.retryAfter if e.retryAfter is not None else 1.0)
                continue
            finally:
                subscription.close()
                lastEventID = subscription.lastEventID
            job = await self.status(jobID)
            if job.finished:
                return job
            # The stream ended before the state did (it is recorded a
            # moment later in Redis mode): look again shortly.
            await deferLater(self._reactor, 0.5)
        raise UnexpectedResponse(
            "unexpected_response", f"render {jobID} did not end after {_FOLLOW_ATTEMPTS} attempts to follow it", 200
        )


#: How many times L{RenderClient.whenFinished} opens the stream (after
#: C{too_many_streams}, or a stream that ended before the state did)
#: before it gives up.
_FOLLOW_ATTEMPTS = 60


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

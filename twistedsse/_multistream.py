"""
One event stream for many jobs: C{GET /events?job=A&job=B...}, for a
dashboard that watches many renders over HTTP/1.1, where a browser opens
at most six connections per server (a seventh C{EventSource} waits for one
of them to end).

Each job's events are what its own stream (C{/renders/ID/events}) sends,
named the same (C{progress}, C{retrying}, C{reset}, C{complete},
C{failed}, C{cancelled}), with the job's id added to the data as C{job}.
The stream ends once every job has ended, that is once each job's terminal
event has been sent (on this connection or an earlier one of the same
client).

One id for all of them. Every event's id is the I{combined} id: the
position of every job of the stream, so that the browser's automatic
reconnect (the same URL, and C{Last-Event-ID} set to the last id it saw)
resumes every job after the last event of it the client got, each event
exactly once. Its form (opaque to clients)::

    TAG:POS1,POS2,...,POSn

C{TAG} is 8 hex digits of a hash of the stream's job list (in the order of
the query, duplicates dropped); C{POSi} is the id of the last event of the
I{i}th job sent (the broker's own: C{12} in memory, C{0-12} in Redis,
percent-encoded should it hold a comma or a colon), empty for a job none of
whose events was sent yet, C{!} for a job whose C{expired} event was sent.
A hundred Redis jobs of a thousand events make an id of about 700
characters. An id that is not one of this job list's (another list's
C{TAG}, another count of positions, a position over L{MAX_POSITION}
characters, garbage) counts as none, as on the single-job stream: every
job's whole retained history again.

A job that has expired (C{410 job_expired} on its own URL) gets one
C{expired} event, C{{"error": "job_expired", "detail": ..., "job": ID}},
and counts as ended: a dashboard that reconnects a day later keeps its
other jobs. A job id the server does not know is C{404 unknown_job} naming
it: the client made a mistake.

The stream is one response: one C{request.write} per frame, keepalives
from the app's shared timer, TCP_NODELAY, and the single-job stream's
bound on a client that stops reading (L{twistedsse._stream}), done the
simplest way that keeps every event: while the connection is full, each
job's feed writes nothing and remembers only the id of the last event it
wrote; when the client reads again, it subscribes afresh after that id
(the broker replays the rest of the history, or a C{reset} if some of it
was dropped meanwhile). A client that reads nothing for C{writeTimeout} is
disconnected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence, cast
from urllib.parse import quote, unquote

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from . import _json
from ._asyncbroker import IAsyncJobBroker
from ._errors import InvalidJobs, JobExpired, RetryLater, TooManyJobs, TwistedSSEError, UnknownJob
from ._frames import TERMINAL_EVENTS, Event, encodeEvent
from ._interfaces import ISubscriber
from ._keepalive import Keepalives
from ._security import BearerTokens
from ._stream import (
    KEEPALIVE,
    StreamLimits,
    StreamSettings,
    _abort,
    _socketOptions,
    openingFrame,
    startStreamHeaders,
    tcpTransport,
)
from ._transport import sendTogether

_log = Logger()

#: The most jobs one stream may watch: a hundred 32-character ids make a
#: request line of about 3.8 KiB, under the 8 KiB it may have.
MAX_JOBS = 100
#: The longest position of one job a combined id may hold: the memory
#: broker's ids have at most 18 digits, Redis' at most 21 characters.
MAX_POSITION = 40
#: The event a job that has expired gets, once.
EXPIRED = "expired"

_GONE = "!"
_LIVE, _ENDED, _EXPIRED = "live", "ended", "expired"


def parseJobs(values: Sequence[bytes]) -> tuple[str, ...]:
    """
    The jobs a C{GET /events} names in its C{job} parameters, in order,
    each once (a repeated id is dropped).

    @raise InvalidJobs: none, or an empty or undecodable one.
    @raise TooManyJobs: more than L{MAX_JOBS} different ones.
    """
    if not values:
        raise InvalidJobs("name the jobs to watch: /events?job=ID&job=ID...")
    jobs: dict[str, None] = {}
    for raw in values:
        try:
            jobID = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJobs(f"a job id must be UTF-8, not {raw[:40]!r}") from None
        if not jobID:
            raise InvalidJobs("a job id is empty (job=)")
        jobs[jobID] = None
    if len(jobs) > MAX_JOBS:
        raise TooManyJobs(f"one stream watches at most {MAX_JOBS} jobs; this asks for {len(jobs)}")
    return tuple(jobs)


def checkWatch(auth: BearerTokens, request: IRequest, now: float, jobs: Sequence[str]) -> None:
    """
    Without a credential, the job ids are the capability (as for
    C{/renders/ID/events}). A request that carries one must carry a valid
    one, and a scoped token must allow C{watch} on every job.

    @raise Unauthorized: the credential is not valid.
    @raise Forbidden: a scoped token does not cover one of C{jobs}.
    """
    if not auth.enabled:
        return
    grant = auth.authenticate(request, now, allowQuery=True)
    if grant is not None:
        for jobID in jobs:
            grant.need("watch", jobID)


def jobsTag(jobs: Sequence[str]) -> str:
    """
    The C{TAG} of the combined ids of a stream watching C{jobs}.
    """
    return hashlib.sha256(json.dumps(list(jobs)).encode("utf-8")).hexdigest()[:8]


def encodePosition(eventID: str | None) -> str:
    return "" if eventID is None else quote(eventID, safe="-_.~")


def combinedID(tag: str, positions: Sequence[str]) -> str:
    """
    The combined id of a stream whose jobs are at C{positions} (encoded).
    """
    return tag + ":" + ",".join(positions)


def parsePositions(lastEventID: str | None, jobs: Sequence[str]) -> list[str | None] | None:
    """
    Read a combined C{Last-Event-ID} for C{jobs}: per job, the id of the
    last event of it the client got (C{None}: none; L{_GONE}: its
    C{expired} event). C{None} for an id that is not one of this job
    list's.
    """
    if lastEventID is None or len(lastEventID) > 9 + len(jobs) * (MAX_POSITION + 1):
        return None
    tag, sep, rest = lastEventID.partition(":")
    if not sep or tag != jobsTag(jobs):
        return None
    parts = rest.split(",")
    if len(parts) != len(jobs):
        return None
    positions: list[str | None] = []
    for part in parts:
        if len(part) > MAX_POSITION:
            return None
        if not part:
            positions.append(None)
        elif part == _GONE:
            positions.append(_GONE)
        else:
            try:
                value = unquote(part, errors="strict")
            except UnicodeDecodeError:
                return None
            if any(c in value for c in "\r\n\0"):
                return None
            positions.append(value)
    return positions


@attrs.frozen
class StreamPlan:
    """
    What a C{GET /events} is to send, decided before it answers.

    @ivar jobs: the jobs, in the query's order.
    @ivar positions: per job, the broker's id of the last event of it the
        client got (C{None}: none yet, or the id counted as none; C{"!"}:
        its C{expired} event).
    @ivar states: per job, C{"live"} (subscribe after its position),
        C{"ended"} (the client has its terminal or C{expired} event) or
        C{"expired"} (its C{expired} event is due).
    @ivar errors: per expired job, why.
    """

    jobs: tuple[str, ...]
    positions: tuple[str | None, ...]
    states: tuple[str, ...]
    errors: dict[str, TwistedSSEError] = attrs.field(factory=dict)

    @property
    def live(self) -> tuple[str, ...]:
        return tuple(job for job, state in zip(self.jobs, self.states) if state == _LIVE)

    @property
    def done(self) -> bool:
        """
        Whether the client has seen the end of every job (answer C{204}).
        """
        return all(state == _ENDED for state in self.states)


async def planStream(broker: IAsyncJobBroker, jobs: Sequence[str], lastEventID: str | None) -> StreamPlan:
    """
    Where the client is in each job, and which of them have ended: one
    C{caughtUp} per job, all at once.

    @raise UnknownJob: the first job (in order) the server does not know.
    @raise RetryLater: the broker cannot answer now (Redis down).
    """
    positions = parsePositions(lastEventID, jobs) or [None] * len(jobs)
    checks: list[Deferred[bool]] = [
        succeed(True) if position == _GONE else broker.caughtUp(job, position)
        for job, position in zip(jobs, positions)
    ]
    results = await DeferredList(checks, consumeErrors=True)
    states: list[str] = []
    errors: dict[str, TwistedSSEError] = {}
    for job, (ok, result) in zip(jobs, results):
        if ok:
            states.append(_ENDED if result else _LIVE)
            continue
        # Typing note: DeferredList types a failed result as the value type.
        failure = cast(Failure, result)
        if failure.check(JobExpired) is not None:
            states.append(_EXPIRED)
            error = failure.value
            assert isinstance(error, JobExpired)
            errors[job] = error
        elif failure.check(UnknownJob) is not None:
            raise UnknownJob(f"no render with id {job!r}")
        else:
            failure.raiseException()
    return StreamPlan(tuple(jobs), tuple(positions), tuple(states), errors)


@implementer(ISubscriber)
class _Feed:
    """
    One job of a L{_MultiStream}: the subscriber its broker delivers to.
    It writes through the stream; while the stream is paused it drops
    what it is given (I{behind}) and, when the stream resumes, subscribes
    again after C{cursor}, the id of its last event written.
    """

    __slots__ = (
        "_stream", "jobID", "index", "cursor", "ended", "_suffix",
        "_replaying", "_behind", "_pending", "_unsubscribe",
    )  # fmt: skip

    def __init__(self, stream: _MultiStream, jobID: str, index: int, cursor: str | None) -> None:
        self._stream = stream
        self.jobID = jobID
        self.index = index
        self.cursor = cursor
        self.ended = False
        self._suffix = ',"job":' + _json.dumps(jobID) + "}"
        self._replaying = False
        self._behind = False
        self._pending: Deferred[Callable[[], None]] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def withJob(self, data: str) -> str:
        """
        C{data} (a JSON object's text) with C{"job": ID} added last, so
        that it wins over a C{job} of the event's own (a command renderer's
        progress is its own object).
        """
        if data.startswith("{") and data.endswith("}"):
            if data[1:-1].strip():
                return data[:-1] + self._suffix
            return "{" + self._suffix[1:]
        return '{"data":' + _json.dumps(data) + self._suffix

    def subscribe(self) -> None:
        """
        Subscribe after C{cursor}: the replay comes through L{deliver}
        before the Deferred fires.
        """
        self._behind = False
        self._replaying = True
        pending = self._pending = self._stream.broker.subscribe(self.jobID, self.cursor, self)
        pending.addCallbacks(self._subscribed, self._failed)

    def _subscribed(self, unsubscribe: Callable[[], None]) -> None:
        self._pending = None
        self._replaying = False
        stream = self._stream
        if self.ended or not stream.isOpen:
            unsubscribe()
            return
        if self._behind and not stream.paused:
            # The client filled its buffer during the replay, and has read
            # it since: go on from the last event written.
            unsubscribe()
            self.subscribe()
            return
        self._unsubscribe = unsubscribe

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        self._replaying = False
        if failure.check(CancelledError) is not None and not self._stream.isOpen:
            return
        self._stream.feedFailed(self, failure)

    def deliver(self, event: Event, frame: bytes) -> None:
        stream = self._stream
        if self.ended or not stream.isOpen:
            return
        if stream.paused or self._behind:
            # All of it is in the history after the cursor.
            self._behind = True
            return
        stream.write(self, event)

    def deliverMany(self, events: Sequence[Event], frames: Sequence[bytes], joined: bytes) -> None:
        for event, frame in zip(events, frames):
            self.deliver(event, frame)

    def resumed(self) -> None:
        """
        The client reads again: if events were dropped meanwhile, subscribe
        afresh after the last one written (within a replay, L{_subscribed}
        does so when it ends).
        """
        if self._behind and not self._replaying and not self.ended:
            self.unsubscribe()
            self.subscribe()

    def unsubscribe(self) -> None:
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            unsubscribe()

    def close(self) -> None:
        """
        The stream has closed: let go of the broker.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self.unsubscribe()


@implementer(IPushProducer)
class _MultiStream:
    """
    One open C{GET /events}: the push producer of its request, a member of
    the shared L{Keepalives}, the owner of its write deadline, and the
    writer of every feed's frames, each with the combined id.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        settings: StreamSettings,
        broker: IAsyncJobBroker,
        plan: StreamPlan,
        onClose: Callable[[], None] | None = None,
        keepalives: Keepalives | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._settings = settings
        self.broker = broker
        self._plan = plan
        self._onClose = onClose
        self._keepalives = keepalives
        self._tag = jobsTag(plan.jobs)
        self._positions = [_GONE if p == _GONE else encodePosition(p) for p in plan.positions]
        self._feeds = [
            _Feed(self, job, index, position)
            for index, (job, position, state) in enumerate(zip(plan.jobs, plan.positions, plan.states))
            if state == _LIVE
        ]
        # Jobs whose end is still to be sent.
        self._left = sum(state != _ENDED for state in plan.states)
        self.isOpen = True
        self.paused = False
        self._wrote = False
        self._deadline: IDelayedCall | None = None

    def start(self) -> None:
        """
        Send the opening frame, each expired job's C{expired} event, then
        each live job's history after its position, then live events.
        """
        request, settings = self._request, self._settings
        request.notifyFinish().addBoth(self._closed)
        transport = tcpTransport(request)
        if transport is not None:
            transport.setTcpNoDelay(True)
            _socketOptions(transport, settings.writeTimeout)
        request.registerProducer(self, True)
        request.write(openingFrame(settings.retry))
        self._wrote = True
        if self.isOpen and self._keepalives is not None:
            self._keepalives.add(self)
        plan = self._plan
        for index, (job, state) in enumerate(zip(plan.jobs, plan.states)):
            if state == _EXPIRED and self.isOpen:
                self._gone(index, job, plan.errors[job])
        for feed in self._feeds:
            if not self.isOpen:
                break
            feed.subscribe()

    def _id(self) -> str:
        return combinedID(self._tag, self._positions)

    def write(self, feed: _Feed, event: Event) -> None:
        """
        Write one of C{feed}'s events with the combined id that counts it.
        """
        if event.id is not None:
            feed.cursor = event.id
            self._positions[feed.index] = encodePosition(event.id)
        frame = encodeEvent(Event(data=feed.withJob(event.data), event=event.event, id=self._id()))
        ends = event.event in TERMINAL_EVENTS
        if ends:
            feed.ended = True
            feed.unsubscribe()
        self._send(frame, ends)

    def _gone(self, index: int, jobID: str, error: TwistedSSEError) -> None:
        self._positions[index] = _GONE
        data = _json.dumps({"error": error.code, "detail": str(error), "job": jobID})
        self._send(encodeEvent(Event(data=data, event=EXPIRED, id=self._id())), True)

    def _send(self, frame: bytes, ends: bool) -> None:
        self._wrote = True
        if ends:
            self._left -= 1
            if not self._left:
                # The last frame and the end of the response: one send.
                with sendTogether(getattr(self._request.channel, "transport", None)):
                    self._request.write(frame)
                    self._end()
                return
        self._request.write(frame)

    def feedFailed(self, feed: _Feed, failure: Failure) -> None:
        """
        A feed could not subscribe (again): a job gone meanwhile gets its
        C{expired} event; any other failure ends the stream, and the
        client's reconnect resumes every job.
        """
        if not self.isOpen:
            return
        if failure.check(UnknownJob) is not None:
            _log.info("stream of many jobs: {jobID} is gone", jobID=feed.jobID)
            feed.ended = True
            error = failure.value
            assert isinstance(error, UnknownJob)
            self._gone(feed.index, feed.jobID, error)
            return
        if failure.check(RetryLater) is not None:
            _log.info("stream of many jobs ended: {why}", why=failure.getErrorMessage())
        else:
            _log.failure("stream of many jobs: {jobID} could not subscribe", failure, jobID=feed.jobID)
        self._end()

    def keepalive(self) -> bool:
        # As _Stream.keepalive (whether it wrote one: the keepalives count).
        if self._wrote:
            self._wrote = False
        elif not self.paused:
            self._wrote = True
            self._request.write(KEEPALIVE)
            return True
        return False

    def _end(self) -> None:
        self._request.unregisterProducer()
        self._request.finish()

    # -- IPushProducer

    def pauseProducing(self) -> None:
        if self.paused or not self.isOpen:
            return
        self.paused = True
        if self._settings.writeTimeout > 0:
            self._deadline = self._clock.callLater(self._settings.writeTimeout, self._stalled)

    def resumeProducing(self) -> None:
        if not self.paused or not self.isOpen:
            return
        self.paused = False
        self._cancelDeadline()
        for feed in self._feeds:
            if not self.isOpen or self.paused:
                # (A catch-up filled the buffer again: the rest wait for
                # the next resume.)
                break
            feed.resumed()

    def stopProducing(self) -> None:
        # The connection is going away; notifyFinish will clean up.
        pass

    def _stalled(self) -> None:
        self._deadline = None
        _log.info(
            "stream of many jobs dropped: the client read nothing for {seconds} s",
            seconds=self._settings.writeTimeout,
        )
        _abort(self._request)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _closed(self, result: object) -> None:
        self.isOpen = False
        self._cancelDeadline()
        if self._keepalives is not None:
            keepalives, self._keepalives = self._keepalives, None
            keepalives.discard(self)
        for feed in self._feeds:
            feed.close()
        if self._onClose is not None:
            onClose, self._onClose = self._onClose, None
            onClose()
        if isinstance(result, Failure):
            _log.debug("stream of many jobs closed by the client: {why}", why=result.getErrorMessage())


class MultiEventStreamResource(Resource):
    """
    The response to a C{GET /events} whose L{StreamPlan} has something to
    send: the stream of every job of the plan.

    @param limits: counts this stream once while it is open, and once for
        each job it subscribes to.
    """

    isLeaf = True

    def __init__(
        self,
        broker: IAsyncJobBroker,
        plan: StreamPlan,
        clock: IReactorTime,
        settings: StreamSettings = StreamSettings(),
        limits: StreamLimits | None = None,
        keepalives: Keepalives | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (as EventStreamResource)
        self._broker = broker
        self._plan = plan
        self._clock = clock
        self._settings = settings
        self._limits = limits
        self._keepalives = keepalives if keepalives is not None else Keepalives(clock, settings.keepalive)

    def render_GET(self, request: Request) -> int:
        startStreamHeaders(request)
        onClose = None
        if self._limits is not None:
            limits, live = self._limits, self._plan.live
            limits.openedMany(live)
            onClose = lambda: limits.closedMany(live)  # noqa: E731
        stream = _MultiStream(request, self._clock, self._settings, self._broker, self._plan, onClose, self._keepalives)
        stream.start()
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        startStreamHeaders(request)
        return b""

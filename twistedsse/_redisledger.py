"""
L{RedisLedger}: where a worker in Redis mode records a render's life (the
L{IRenderLedger} that L{twistedsse._ledger.JobLedger} is in one process):
the job's state in L{RedisJobState}, its events in L{RedisEventLog}.

While Redis is down it waits and tries again (backing off up to
L{MAX_BACKOFF}), so that a render's start and end are recorded once Redis
returns rather than lost; progress reports that could not be sent wait,
in order (at most C{keep} of them, the oldest dropped first), and go out
together. Each job has at most one progress write in flight, so reports
are written in the order the render printed them, and its end after all
of them.
"""

from __future__ import annotations

import uuid
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import UnknownJob
from ._interfaces import IRenderLedger, QueuedRender
from ._job import JobSnapshot, JobState
from ._json import JSONObject
from ._outcome import Outcome, retrying
from ._redisevents import RedisEventLog
from ._redisstate import RedisJobState, isOutage
from ._webhooks import Webhooks

_log = Logger()

_T = TypeVar("_T")

#: The longest wait between two tries while Redis is down, in seconds.
MAX_BACKOFF = 5.0

_NOT_ENDED = frozenset(state for state in JobState if not state.terminal)


def endJob(
    state: RedisJobState,
    events: RedisEventLog,
    clock: IReactorTime,
    jobID: str,
    outcome: Outcome,
    webhooks: Webhooks | None = None,
) -> Deferred[bool]:
    """
    Record a job's end: its final state (compare-and-set: of two writers
    ending one job, one wins), then, if this one won, its terminal event.
    Fires with whether it won. Safe to repeat after a lost reply: a job
    already in C{outcome}'s state gets its event if it lacks it (the
    stream refuses a second terminal event).

    @param webhooks: sends the job to its C{callback_url} if this call's
        compare-and-set ended it: exactly one process sends each callback
        (none, if the reply to the write that ended it was lost).
    """
    return Deferred.fromCoroutine(_endJob(state, events, clock, jobID, outcome, webhooks))


async def _endJob(
    state: RedisJobState,
    events: RedisEventLog,
    clock: IReactorTime,
    jobID: str,
    outcome: Outcome,
    webhooks: Webhooks | None = None,
) -> bool:
    try:
        snapshot = await state.get(jobID)
    except UnknownJob:
        return False
    if snapshot.state.terminal:
        if snapshot.state is not outcome.state:
            return False
    else:
        changes: dict[str, JSONObject] = {}
        if outcome.state is JobState.SUCCEEDED:
            changes["result"] = outcome.payload
        elif outcome.state is JobState.FAILED:
            changes["error"] = outcome.payload
        final = snapshot.transition(outcome.state, clock.seconds(), **changes)
        moved = await state.transition(jobID, _NOT_ENDED, final)
        if not moved.applied:
            # Another writer ended it first (a cancel): its event stands.
            return False
        if webhooks is not None:
            webhooks.ended(final)
        elif final.callbackURL is not None:
            _log.warn(
                "callback for render {jobID} not sent: this process has no --callback-allow "
                "(give every instance and worker the same callback options)",
                jobID=jobID,
            )
    try:
        await events.publish(jobID, outcome.event, outcome.payload)
    except ValueError:
        # The stream has its terminal event already.
        pass
    return True


@attrs.define(eq=False)
class _Progress:
    """
    A job's progress reports not yet written, and whether a write is in
    flight.
    """

    waiting: list[JSONObject] = attrs.field(factory=list)
    sending: bool = False
    idle: list[Deferred[None]] = attrs.field(factory=list)
    #: A batch whose write failed while Redis was away, with its token:
    #: sent again as it was (the same token: never written twice).
    unsent: tuple[str, list[JSONObject]] | None = None


@implementer(IRenderLedger)
@attrs.define(eq=False)
class RedisLedger:
    """
    @param maxAttempts: the C{retrying} event's C{max_attempts}.
    @param keep: progress reports kept while Redis is down, per job.
    """

    state: RedisJobState
    events: RedisEventLog
    clock: IReactorTime
    maxAttempts: int = 2
    keep: int = 1000
    webhooks: Webhooks | None = None
    _progress: dict[str, _Progress] = attrs.field(factory=dict, init=False)
    _sleeping: set[Deferred[None]] = attrs.field(factory=set, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    _down: bool = attrs.field(default=False, init=False)
    _failures: int = attrs.field(default=0, init=False)
    #: This ledger's name in its write tokens (L{RedisEventLog}'s
    #: C{_PUBLISH}): a run's writes are told from another run's.
    writer: str = attrs.field(factory=lambda: uuid.uuid4().hex, init=False)
    _written: int = attrs.field(default=0, init=False)

    def _token(self) -> str:
        self._written += 1
        return f"{self.writer}:{self._written}"

    # -- IRenderLedger ------------------------------------------------

    def began(self, render: QueuedRender) -> Deferred[JobSnapshot | None]:
        token = self._token()
        return Deferred.fromCoroutine(self._persist(render.jobID, lambda: self._begin(render, token)))

    async def _begin(self, render: QueuedRender, token: str) -> JobSnapshot | None:
        jobID = render.jobID
        snapshot = await self.state.get(jobID)
        if snapshot.state.terminal:
            return None
        now = self.clock.seconds()
        if snapshot.state is JobState.RUNNING:
            # It ran before, on a worker that died or handed it back at a
            # warm shutdown: clients learn it starts over.
            reason = "worker_lost" if render.attempt > 1 else "handed_back"
            # Taking the job's events over: what the earlier run still
            # sends (queued while Redis was away) is refused from now on.
            payload = retrying(render.attempt, self.maxAttempts, reason)
            await self.events.publishMany(jobID, "retrying", [payload], token=token, take=True)
            fresh = attrs.evolve(snapshot, startedAt=now, progress=None)
            moved = await self.state.transition(jobID, {JobState.RUNNING}, fresh)
            if moved.applied:
                await self.state.updateProgress(jobID, None)
        else:
            moved = await self.state.transition(jobID, {JobState.QUEUED}, snapshot.transition(JobState.RUNNING, now))
        if not moved.applied:
            return None
        return moved.snapshot

    def progress(self, jobID: str, payloads: Sequence[JSONObject]) -> None:
        pending = self._progress.get(jobID)
        if pending is None:
            pending = self._progress[jobID] = _Progress()
        pending.waiting.extend(payloads)
        if len(pending.waiting) > self.keep:
            del pending.waiting[: len(pending.waiting) - self.keep]
        if not pending.sending:
            self._send(jobID, pending)

    def _send(self, jobID: str, pending: _Progress) -> None:
        if pending.unsent is not None:
            (token, batch), pending.unsent = pending.unsent, None
        else:
            token, (batch, pending.waiting) = self._token(), (pending.waiting, [])
        pending.sending = True
        # Sent back to back on one connection: one round trip.
        sends: list[Deferred[Any]] = [
            self.events.publishMany(jobID, "progress", batch, token=token),
            self.state.updateProgress(jobID, batch[-1]),
        ]
        written = gatherResults(sends, consumeErrors=True)

        def sent(_: object) -> None:
            self._recovered()
            self._next(jobID, pending)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, FirstError):
                error = error.subFailure.value
            assert error is not None
            if isOutage(error) and not self._stopped:
                self._outage(error)
                pending.unsent = (token, batch)
                del pending.waiting[: max(0, len(pending.waiting) + len(batch) - self.keep)]
                self._sleep().addCallbacks(lambda _: self._next(jobID, pending), lambda _: self._next(jobID, pending))
                return
            # The job ended or is gone (cancelled meanwhile), or another
            # run writes it now: nothing more of this one is wanted.
            _log.info("render {jobID}: progress not recorded: {why}", jobID=jobID, why=error)
            pending.waiting.clear()
            pending.unsent = None
            self._next(jobID, pending)

        written.addCallbacks(sent, failed)

    def _next(self, jobID: str, pending: _Progress) -> None:
        pending.sending = False
        if (pending.waiting or pending.unsent) and not self._stopped and self._progress.get(jobID) is pending:
            self._send(jobID, pending)
            return
        if self._progress.get(jobID) is pending:
            del self._progress[jobID]
        idle, pending.idle = pending.idle, []
        for d in idle:
            d.callback(None)

    def abandon(self, jobID: str) -> None:
        """
        L{IRenderLedger.abandon}: drop the job's progress not yet written
        (the render is no longer this worker's).
        """
        pending = self._progress.pop(jobID, None)
        if pending is not None:
            pending.waiting.clear()
            pending.unsent = None
            idle, pending.idle = pending.idle, []
            for d in idle:
                d.callback(None)

    def _flushed(self, jobID: str) -> Deferred[None]:
        """
        Fires once every progress report given so far is written (or
        dropped).
        """
        pending = self._progress.get(jobID)
        if pending is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        pending.idle.append(d)
        return d

    def finish(self, jobID: str, outcome: Outcome) -> Deferred[None]:
        return Deferred.fromCoroutine(self._finish(jobID, outcome))

    async def _finish(self, jobID: str, outcome: Outcome) -> None:
        await self._flushed(jobID)
        await self._persist(jobID, lambda: self._end(jobID, outcome))

    def _end(self, jobID: str, outcome: Outcome) -> Deferred[bool]:
        return endJob(self.state, self.events, self.clock, jobID, outcome, self.webhooks)

    # -- while Redis is down -----------------------------------------

    async def _persist(self, jobID: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """
        Run C{operation} until Redis answers it (backing off while it is
        down); fails with L{CancelledError} if the ledger stops first.
        """
        while True:
            try:
                result = await operation()
            except Exception as e:
                if self._stopped or not isOutage(e):
                    raise
                self._outage(e)
                await self._sleep()
                continue
            self._recovered()
            return result

    def _sleep(self) -> Deferred[None]:
        """
        Wait before trying again (longer while the outage lasts); cancelled
        by L{stop}.
        """
        if self._stopped:
            raise CancelledError()
        delay = min(MAX_BACKOFF, 0.25 * 2 ** min(self._failures, 5))
        self._failures += 1
        call: IDelayedCall | None = None

        def cancel(d: Deferred[None]) -> None:
            if call is not None and call.active():
                call.cancel()

        d: Deferred[None] = Deferred(cancel)
        self._sleeping.add(d)

        def woke(result: object) -> object:
            self._sleeping.discard(d)
            return result

        d.addBoth(woke)
        call = self.clock.callLater(delay, d.callback, None)
        return d

    def _outage(self, error: BaseException) -> None:
        if not self._down:
            self._down = True
            _log.warn("Redis cannot record renders now ({error}); trying again", error=error)

    def _recovered(self) -> None:
        self._failures = 0
        if self._down:
            self._down = False
            _log.info("Redis records renders again")

    def stop(self) -> None:
        """
        Stop waiting for Redis: what waits now fails (a render's start) or
        is dropped (progress); a render's end not recorded stays so, and
        its claim is taken over by another worker.
        """
        self._stopped = True
        for d in list(self._sleeping):
            d.cancel()

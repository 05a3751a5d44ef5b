"""
L{RedisJobs}: the web side in Redis mode, the L{IRenderAPI} the HTTP layer
uses when the jobs live in Redis: any instance creates, describes,
cancels, streams and serves the output of any job. It never runs a render:
it queues it (L{RedisJobQueue}) for whichever worker claims it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._api import IRenderAPI
from ._asyncbroker import IAsyncJobBroker
from ._disk import OutputDisk
from ._errors import IdempotencyKeyReused, InsufficientStorage, JobFinished, OutputExpired, OutputNotReady, QueueFull
from ._idempotency import Once
from ._interfaces import IRenderer, QueuedRender
from ._job import JobSnapshot, JobState
from ._metrics import RenderStats
from ._jobs import validated
from ._json import JSON, JSONObject
from ._outcome import CANCELLED_QUEUED
from ._redisbroker import RedisBroker
from ._redisledger import endJob
from ._redisqueue import RedisJobQueue
from ._redisstate import RedisJobState, unavailable
from ._webhooks import CallbackPolicy, Webhooks

_log = Logger()


@implementer(IRenderAPI)
@attrs.define(eq=False)
class RedisJobs:
    """
    @ivar maxQueued: renders that may wait for a worker (0: no limit),
        over every instance; past it, L{QueueFull}.
    @ivar running: how many renders this process runs (a web instance
        that is a worker too: C{--role all}), for C{/healthz}.
    @ivar describe: what C{/healthz} says of Redis (its URL, no password).
    @ivar webhooks: the C{callback_url}s clients may give, and what sends
        the callback of a queued render this instance cancels (C{None}:
        none allowed).
    """

    clock: IReactorTime
    renderers: Mapping[str, IRenderer]
    state: RedisJobState
    queue: RedisJobQueue
    broker: RedisBroker
    disk: OutputDisk
    newID: Callable[[], str]
    maxQueued: int = 0
    maxRenders: int = 0
    running: Callable[[], int] = lambda: 0
    describe: str = ""
    role: str = "web"
    webhooks: Webhooks | None = None
    #: Renders this instance ended before they ran (cancelled while
    #: queued), for /metrics (a worker counts the ones it ran).
    stats: RenderStats = attrs.field(factory=RenderStats)

    @property
    def streams(self) -> IAsyncJobBroker:
        return self.broker

    @property
    def outputDir(self) -> Path:
        return self.disk.directory

    def newJobID(self) -> str:
        return self.newID()

    def submit(
        self,
        renderer: object,
        params: object,
        outputURL: str | None,
        jobID: str,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> Deferred[JobSnapshot]:
        return Deferred.fromCoroutine(self._submit(renderer, params, outputURL, jobID, callbackURL, once))

    async def _earlier(self, held: tuple[str, str], once: Once) -> JobSnapshot:
        """
        The job an earlier create with C{once}'s key made, as it is now.

        @raise IdempotencyKeyReused: that create had another body.
        """
        earlierID, fingerprint = held
        if fingerprint != once.fingerprint:
            raise IdempotencyKeyReused(f"this Idempotency-Key made render {earlierID} from another request body")
        return await self.state.get(earlierID)

    async def _submit(
        self,
        renderer: object,
        params: object,
        outputURL: str | None,
        jobID: str,
        callbackURL: object,
        once: Once | None,
    ) -> JobSnapshot:
        # A retry is answered before the checks a new render must pass (a
        # full queue does not concern a render that exists).
        if once is not None and (held := await self.state.heldBy(once)) is not None:
            return await self._earlier(held, once)
        renderer, normalized = validated(self.renderers, renderer, params)
        if callbackURL is not None:
            policy = self.webhooks.policy if self.webhooks is not None else CallbackPolicy()
            callbackURL = policy.check(callbackURL)
        if self.maxQueued:
            waiting = await self.queue.depth().addErrback(unavailable)
            if waiting >= self.maxQueued:
                raise QueueFull(f"{waiting} renders are waiting already, the limit", retryAfter=10)
        lacking = self.disk.lacks()
        if lacking is not None:
            raise InsufficientStorage(lacking)
        snapshot = JobSnapshot(
            id=jobID,
            renderer=renderer,
            params=normalized,
            state=JobState.QUEUED,
            createdAt=self.clock.seconds(),
            callbackURL=callbackURL,
        )
        if once is None:
            await self.state.create(snapshot, outputURL)
        elif (held := await self.state.createOnce(snapshot, outputURL, once)) is not None:
            # Another request with the key (on any instance) created its
            # render since we looked: that one, not a second.
            return await self._earlier(held, once)
        _log.info("render {jobID} submitted ({renderer})", jobID=jobID, renderer=renderer)
        try:
            await self.queue.enqueue(QueuedRender(jobID, outputURL)).addErrback(unavailable)
        except BaseException:
            # Not queued: not created either (the client got no id). If
            # Redis cannot even delete it, it is a queued job no worker
            # will run: it expires... never, as it never ends; so try.
            await self.broker.remove(jobID).addErrback(lambda _: None)
            if once is not None:
                await self.state.release(once, jobID).addErrback(lambda _: None)
            raise
        return snapshot

    def get(self, jobID: str) -> Deferred[JobSnapshot]:
        return self.state.get(jobID)

    def cancel(self, jobID: str) -> Deferred[JobSnapshot]:
        return Deferred.fromCoroutine(self._cancel(jobID))

    async def _cancel(self, jobID: str) -> JobSnapshot:
        snapshot = await self.state.get(jobID)
        if snapshot.state.terminal:
            raise JobFinished(f"render {jobID} has already {snapshot.state.value}")
        if await self.queue.withdraw(jobID).addErrback(unavailable):
            # No worker has it, and none ever will.
            _log.info("render {jobID} cancelled while queued", jobID=jobID)
            if await endJob(self.state, self.broker.events, self.clock, jobID, CANCELLED_QUEUED, self.webhooks):
                self.stats.record(snapshot.renderer, JobState.CANCELLED.value)
        else:
            # The worker holding it stops it and publishes "cancelled".
            _log.info("render {jobID} cancelled while running: telling its worker", jobID=jobID)
            await self.queue.cancelRunning(jobID).addErrback(unavailable)
        return await self.state.get(jobID)

    def outputPath(self, jobID: str) -> Deferred[Path]:
        return self.state.get(jobID).addCallback(self._output)

    def _output(self, snapshot: JobSnapshot) -> Path:
        jobID = snapshot.id
        if snapshot.state is not JobState.SUCCEEDED:
            raise OutputNotReady(f"render {jobID} is {snapshot.state.value}: no output yet")
        if not (snapshot.result or {}).get("output_url"):
            raise OutputNotReady(f"render {jobID} made no output file")
        path = self.disk.pathOf(jobID)
        if not path.is_file():
            raise OutputExpired(f"the output of render {jobID} has been deleted")
        return path

    def health(self) -> Deferred[JSONObject]:
        def answer(queued: int | None) -> JSONObject:
            renders: dict[str, JSON] = {"running": self.running(), "queued": queued, "max": self.maxRenders}
            return {
                **({} if queued is not None else {"status": "degraded"}),
                "role": self.role,
                "renders": renders,
                "subscribers": self.broker.subscriberCount(),
                "redis": {"url": self.describe, "connected": queued is not None},
            }

        # The queue's depth says both how many wait and whether Redis
        # answers (not within a second: it is down, for this answer).
        d: Deferred[Any] = self.queue.depth()
        d.addTimeout(1.0, self.clock)
        return d.addErrback(lambda _: None).addCallback(answer)

"""
L{ClaimedRenders}: the renders a L{RedisWorker} has claimed, as the
L{RenderRunner} takes them (an L{IRenderSource}); and the worker's
callbacks (L{IClaimConsumer}) turned into the runner's calls and the
ledger's records. The runner runs a claimed render with the same process
code as in one process.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from ._interfaces import IQueueConsumer, IRenderLedger, IRenderSource, QueuedRender
from ._outcome import CANCELLED_QUEUED, Outcome, workerLost
from ._redisqueue import IClaimConsumer, RedisWorker

_log = Logger()


@implementer(IRenderSource, IClaimConsumer)
@attrs.define(eq=False)
class ClaimedRenders:
    """
    @ivar worker: the claiming side, set once it is made (it needs this
        object first).
    """

    ledger: IRenderLedger
    worker: RedisWorker | None = None
    _consumer: IQueueConsumer | None = attrs.field(default=None, init=False)
    _waiting: deque[QueuedRender] = attrs.field(factory=deque, init=False)

    # -- IRenderSource ---------------------------------------------------

    def attach(self, consumer: IQueueConsumer) -> None:
        self._consumer = consumer

    def take(self) -> QueuedRender | None:
        return self._waiting.popleft() if self._waiting else None

    def finished(self, jobID: str) -> None:
        # Acknowledged only now that its end is recorded: a worker that
        # dies before leaves it to be reclaimed, not lost.
        if self.worker is not None:
            self.worker.finished(jobID)

    # -- IClaimConsumer --------------------------------------------------

    def start(self, render: QueuedRender, attempt: int) -> None:
        self._waiting.append(attrs.evolve(render, attempt=attempt))
        if self._consumer is not None:
            self._consumer.rendersWaiting()

    def cancel(self, jobID: str) -> None:
        if self._unwait(jobID):
            self._record(jobID, CANCELLED_QUEUED, then=self.finished)
        elif self._consumer is not None:
            self._consumer.cancel(jobID)

    def cancelledBeforeStart(self, render: QueuedRender) -> None:
        self._record(render.jobID, CANCELLED_QUEUED)

    def lost(self, render: QueuedRender, attempts: int) -> None:
        _log.warn("render {jobID}: its workers were lost {attempts} times; failed", jobID=render.jobID, attempts=attempts)
        self._record(render.jobID, workerLost(attempts))

    def abandon(self, jobID: str) -> None:
        self.ledger.abandon(jobID)
        if not self._unwait(jobID) and self._consumer is not None:
            self._consumer.abandon(jobID)

    # -- helpers -----------------------------------------------------------

    def _unwait(self, jobID: str) -> bool:
        for render in self._waiting:
            if render.jobID == jobID:
                self._waiting.remove(render)
                return True
        return False

    def _record(self, jobID: str, outcome: Outcome, then: object = None) -> None:
        d = self.ledger.finish(jobID, outcome)
        if callable(then):
            d.addCallback(lambda _: then(jobID))
        d.addErrback(lambda f: _log.info("render {jobID}: end not recorded: {why}", jobID=jobID, why=f.getErrorMessage()))

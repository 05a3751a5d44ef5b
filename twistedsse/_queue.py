"""
L{MemoryQueue}: the seam between the side that accepts jobs and the side
that runs them, in one process.

The web side (L{twistedsse._jobs.JobTracker}) puts a L{QueuedRender} in and
may withdraw it while it waits; the worker side
(L{twistedsse._runner.RenderRunner}), attached as the queue's consumer, is
told when there is work and takes it when it has a free slot. Cancelling a
render that has been taken goes to the consumer through the queue too:
across processes (a Redis stream and a cancel message), the web side never
holds the running render.
"""

from __future__ import annotations

from collections import deque

import attrs
from zope.interface import implementer

from ._interfaces import IQueueConsumer, IRenderQueue, IRenderSource, QueuedRender


@implementer(IRenderQueue, IRenderSource)
@attrs.define
class MemoryQueue:
    """
    First come, first served, in memory; one consumer.
    """

    _waiting: deque[QueuedRender] = attrs.field(factory=deque, init=False)
    _consumer: IQueueConsumer | None = attrs.field(default=None, init=False)

    def attach(self, consumer: IQueueConsumer) -> None:
        self._consumer = consumer

    def enqueue(self, render: QueuedRender) -> None:
        self._waiting.append(render)
        if self._consumer is not None:
            self._consumer.rendersWaiting()

    def withdraw(self, jobID: str) -> bool:
        for render in self._waiting:
            if render.jobID == jobID:
                self._waiting.remove(render)
                return True
        return False

    def take(self) -> QueuedRender | None:
        return self._waiting.popleft() if self._waiting else None

    def finished(self, jobID: str) -> None:
        # Nothing to acknowledge in one process.
        pass

    def __len__(self) -> int:
        return len(self._waiting)

    def cancelRunning(self, jobID: str) -> None:
        if self._consumer is not None:
            self._consumer.cancel(jobID)

    def busy(self) -> bool:
        return self._consumer is not None and self._consumer.busy()

    def refusal(self) -> str | None:
        return None if self._consumer is None else self._consumer.refusal()

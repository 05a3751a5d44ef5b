"""
L{JobLedger}: the one place a job's state changes are written, to the
broker (its live state and events, for streams) and to the store (what
survives a restart). The web side and the worker side both report through
it: a job starts, makes progress, ends with an L{Outcome}.
"""

from __future__ import annotations

from typing import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._interfaces import IJobBroker, IJobStore, IRenderLedger, QueuedRender
from ._job import JobSnapshot, JobState
from ._json import JSONObject
from ._outcome import Outcome, storageFailed
from ._store import STORE_ERRORS, StoredEvent
from ._webhooks import Webhooks

_log = Logger()


def _nothing(snapshot: JobSnapshot) -> None:
    pass


@implementer(IRenderLedger)
@attrs.define
class JobLedger:
    """
    @ivar onEnded: called with each job's final snapshot once it is
        recorded (the web side schedules its expiry).
    @ivar webhooks: sends each ended job with a C{callback_url} there
        (C{None}: no callbacks are configured).
    """

    clock: IReactorTime
    broker: IJobBroker
    store: IJobStore
    onEnded: Callable[[JobSnapshot], None] = _nothing
    webhooks: Webhooks | None = None

    def started(self, jobID: str) -> JobSnapshot | None:
        """
        Mark a job C{running} and store it. If the store cannot be written
        (disk full), end the job C{failed} ("storage") instead and return
        C{None}: it must not stay C{running} (or, after a restart, be
        "interrupted") without a process.
        """
        snapshot = self.broker.get(jobID).transition(JobState.RUNNING, self.clock.seconds())
        self.broker.update(snapshot)
        try:
            self.store.save(snapshot)
        except STORE_ERRORS as e:
            _log.warn("could not store render {jobID}: {e!r}", jobID=jobID, e=e)
            self.end(jobID, storageFailed(f"the job store cannot be written ({e})"))
            return None
        return snapshot

    def began(self, render: QueuedRender) -> Deferred[JobSnapshot | None]:
        """
        L{IRenderLedger.began}: L{started}, already fired (in one process
        a render never runs twice).
        """
        return succeed(self.started(render.jobID))

    def finish(self, jobID: str, outcome: Outcome) -> Deferred[None]:
        """
        L{IRenderLedger.finish}: L{end}, already fired.
        """
        self.end(jobID, outcome)
        return succeed(None)

    def abandon(self, jobID: str) -> None:
        # In one process a render is never taken over: nothing waits.
        pass

    def progress(self, jobID: str, payloads: Sequence[JSONObject]) -> None:
        """
        Publish progress reports, several at once when the render printed
        faster than we read (the server is busy): one fan-out for all of
        them, not one each.
        """
        self.broker.publishMany(jobID, "progress", payloads)
        self.broker.update(attrs.evolve(self.broker.get(jobID), progress=payloads[-1]))

    def end(self, jobID: str, outcome: Outcome) -> None:
        """
        Record a job's end: its final snapshot, its terminal event (which
        ends its streams), and both in the store.
        """
        changes: dict[str, JSONObject] = {}
        if outcome.state is JobState.SUCCEEDED:
            changes["result"] = outcome.payload
        elif outcome.state is JobState.FAILED:
            changes["error"] = outcome.payload
        final = self.broker.get(jobID).transition(outcome.state, self.clock.seconds(), **changes)
        self.broker.update(final)
        self.broker.publish(jobID, outcome.event, outcome.payload)
        try:
            self.store.finish(final, [StoredEvent(*e) for e in self.broker.finalEvents(jobID)])
        except Exception:
            _log.failure("could not store the end of render {jobID}", jobID=jobID)
        self.onEnded(final)
        if self.webhooks is not None:
            self.webhooks.ended(final)

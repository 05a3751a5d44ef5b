"""
L{JobTracker}: the web side. It accepts renders (validated by their
renderer), creates each job in the broker and the store, queues it, cancels
it, answers where its output is, expires finished jobs, and restores the
jobs of earlier runs. It never holds a render process: it reaches the
worker side only through the L{IRenderQueue}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Concatenate, Literal, Mapping, ParamSpec

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._disk import OutputDisk
from ._errors import (
    IdempotencyKeyReused,
    InsufficientStorage,
    JobFinished,
    OutputExpired,
    OutputNotReady,
    QueueFull,
    UnknownJob,
    UnknownRenderer,
)
from ._expiry import Deadlines
from ._idempotency import Once
from ._interfaces import IJobBroker, IJobStore, IRenderer, IRenderQueue, QueuedRender
from ._job import JobSnapshot, JobState
from ._json import JSONObject
from ._ledger import JobLedger
from ._metrics import RenderStats
from ._outcome import CANCELLED_QUEUED, interrupted
from ._store import STORE_ERRORS
from ._webhooks import CallbackPolicy

_log = Logger()

#: Renders that may wait for a slot, by default (C{--max-queued}).
MAX_QUEUED = 100

#: What a deadline does to a job: delete it (its id is remembered as
#: expired), or forget even its id.
_Due = tuple[Literal["expire", "forget"], str]

_P = ParamSpec("_P")


def validated(renderers: Mapping[str, IRenderer], renderer: object, params: object) -> tuple[str, JSONObject]:
    """
    The renderer's name and C{params} as the renderer named C{renderer}
    normalizes them.

    @param renderer: its name (any other value, as a client may send, is
        no renderer's).
    @raise UnknownRenderer: no renderer by that name.
    @raise twistedsse._errors.InvalidParams: C{params} do not suit it.
    """
    if not isinstance(renderer, str) or (impl := renderers.get(renderer)) is None:
        known = ", ".join(sorted(renderers)) or "none"
        raise UnknownRenderer(f"no renderer named {renderer!r} (known: {known})")
    return renderer, impl.validate(params)


#: The C{params} schema of a renderer that says nothing of its own.
_ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


def paramsSchema(renderer: IRenderer) -> Mapping[str, Any]:
    """
    The JSON Schema of C{renderer}'s C{params}, for C{GET /renderers}: its
    C{paramsSchema} (the card's, made with its validator; a command
    renderer's from the operator), or, for a renderer without one (an
    embedding application's), any JSON object.
    """
    schema: Mapping[str, Any] = getattr(renderer, "paramsSchema", _ANY_OBJECT)
    return schema


@attrs.define
class JobTracker:
    """
    @ivar maxQueued: renders that may wait for a slot (0: no limit).
    @ivar expireAfter: seconds after a job ends when it and its output are
        deleted (C{0}: never); its id answers
        L{twistedsse._errors.JobExpired} for as long again.
    """

    clock: IReactorTime
    renderers: Mapping[str, IRenderer]
    ledger: JobLedger
    queue: IRenderQueue
    disk: OutputDisk
    newID: Callable[[], str]
    maxQueued: int = 0
    expireAfter: float = 86400.0
    callbacks: CallbackPolicy = CallbackPolicy()
    #: Where renders that end before they ran (cancelled or interrupted
    #: while queued) are counted for /metrics; the runner counts the rest.
    stats: RenderStats = attrs.field(factory=RenderStats)
    _deadlines: Deadlines[_Due] = attrs.field(init=False)
    #: Idempotency: the job and body fingerprint of each slot, and the
    #: slot of each such job (to drop it when the job expires).
    _onces: dict[str, tuple[str, str]] = attrs.field(factory=dict, init=False)
    _slots: dict[str, str] = attrs.field(factory=dict, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _restored: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._deadlines = Deadlines(self.clock, self._due)

    @property
    def broker(self) -> IJobBroker:
        return self.ledger.broker

    @property
    def store(self) -> IJobStore:
        return self.ledger.store

    # -- the API -------------------------------------------------------

    def submit(
        self,
        renderer: object,
        params: object,
        outputURL: str | None = None,
        jobID: str | None = None,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> JobSnapshot:
        """
        Validate and queue a render.

        @param outputURL: the URL clients fetch its output from (the
            C{complete} event's C{output_url}), opaque here.
        @param jobID: the job's id, if the caller made it (with C{newID})
            to name the job's URLs first; by default a new one.
        @param callbackURL: where to POST the job when it ends (the
            client's C{callback_url}, any JSON value), or C{None}.
        @param once: the request's idempotency key, if it has one: the
            job an earlier create with it made (as it is now), if there is
            one, else a new one, kept with the key until it expires.
        @raise IdempotencyKeyReused: C{once}'s key came with another body.
        @raise UnknownRenderer: no renderer by that name.
        @raise twistedsse._errors.InvalidParams: C{params} do not suit it.
        @raise twistedsse._errors.InvalidCallback: a bad C{callbackURL}.
        @raise twistedsse._errors.CallbackNotAllowed: its host is not
            allowed.
        @raise QueueFull: too many renders wait already.
        @raise InsufficientStorage: the output filesystem is nearly full,
            or the job store cannot be written.
        """
        if once is not None and (earlier := self._onces.get(once.slot)) is not None:
            earlierID, fingerprint = earlier
            if fingerprint != once.fingerprint:
                raise IdempotencyKeyReused(
                    f"this Idempotency-Key made render {earlierID} from another request body"
                )
            return self.broker.get(earlierID)
        renderer, normalized = validated(self.renderers, renderer, params)
        if callbackURL is not None:
            callbackURL = self.callbacks.check(callbackURL)
        if self.maxQueued and len(self.queue) >= self.maxQueued and self.queue.busy():
            raise QueueFull(f"{len(self.queue)} renders are waiting already, the limit", retryAfter=10)
        lacking = self.queue.refusal()
        if lacking is not None:
            raise InsufficientStorage(lacking)
        if jobID is None:
            jobID = self.newID()
        snapshot = JobSnapshot(
            id=jobID,
            renderer=renderer,
            params=normalized,
            state=JobState.QUEUED,
            createdAt=self.clock.seconds(),
            callbackURL=callbackURL,
        )
        self.broker.create(snapshot)
        try:
            self.store.save(snapshot)
        except STORE_ERRORS as e:
            # Not created at all: nobody has its id yet.
            self.broker.remove(jobID)
            _log.warn("could not store a new render: {e!r}", e=e)
            raise InsufficientStorage(f"the job store cannot be written ({e})") from None
        if once is not None:
            self._onces[once.slot] = (jobID, once.fingerprint)
            self._slots[jobID] = once.slot
        if self._stopping:
            self.ledger.end(jobID, interrupted())
        else:
            _log.info("render {jobID} submitted ({renderer})", jobID=jobID, renderer=renderer)
            self.queue.enqueue(QueuedRender(jobID, outputURL))
        return self.broker.get(jobID)

    def cancel(self, jobID: str) -> JobSnapshot:
        """
        Cancel a queued or running render. A running one is stopped (TERM,
        then KILL) and becomes C{cancelled} once its process has exited.

        @raise twistedsse._errors.UnknownJob: no such job.
        @raise JobFinished: it had finished already.
        """
        snapshot = self.broker.get(jobID)
        if snapshot.state.terminal:
            raise JobFinished(f"render {jobID} has already {snapshot.state.value}")
        if self.queue.withdraw(jobID):
            _log.info("render {jobID} cancelled while queued", jobID=jobID)
            self.ledger.end(jobID, CANCELLED_QUEUED)
            self._neverRan(jobID)
        else:
            _log.info("render {jobID} cancelled while running: stopping it", jobID=jobID)
            self.queue.cancelRunning(jobID)
        return self.broker.get(jobID)

    def outputPath(self, jobID: str) -> Path:
        """
        The finished output file of a job.

        @raise twistedsse._errors.UnknownJob: no such job.
        @raise OutputNotReady: the render has not succeeded, or made no file.
        @raise OutputExpired: the file has been deleted since.
        """
        snapshot = self.broker.get(jobID)
        if snapshot.state is not JobState.SUCCEEDED:
            raise OutputNotReady(f"render {jobID} is {snapshot.state.value}: no output yet")
        path = self.disk.pathOf(jobID)
        if not (snapshot.result or {}).get("output_url"):
            raise OutputNotReady(f"render {jobID} made no output file")
        if not path.is_file():
            # Deleted since: to make room for newer outputs
            # (maxOutputBytes), or by hand.
            raise OutputExpired(f"the output of render {jobID} has been deleted")
        return path

    # -- life ----------------------------------------------------------

    def start(self) -> None:
        """
        Accept renders; restore the jobs of earlier runs (once); expire
        jobs on time.
        """
        self._stopping = False
        if not self._restored:
            self._restore()
        self._deadlines.start()

    def stop(self) -> None:
        """
        Fail every queued render ("interrupted"), and every one submitted
        from now on; stop expiring.
        """
        self._stopping = True
        self._deadlines.stop()
        while (queued := self.queue.take()) is not None:
            self.ledger.end(queued.jobID, interrupted())
            self._neverRan(queued.jobID)

    def _neverRan(self, jobID: str) -> None:
        snapshot = self.broker.get(jobID)
        self.stats.record(snapshot.renderer, snapshot.state.value)

    def ended(self, snapshot: JobSnapshot) -> None:
        """
        A job ended: it expires C{expireAfter} from now.
        """
        if self.expireAfter > 0:
            self._deadlines.add(self.clock.seconds() + self.expireAfter, ("expire", snapshot.id))

    def _restore(self) -> None:
        """
        Load the jobs of earlier runs. One that never ended (the process
        stopped, or was killed, while it was queued or running) ends now as
        C{failed}, "interrupted": never a job that hangs forever. One that
        expired while the service was down is deleted, not loaded, and its
        id remembered as expired as if the service had run all along.
        """
        self._restored = True
        now = self.clock.seconds()
        for jobID, forgetAt in self.store.expired(now):
            self.broker.expire(jobID)
            self._deadlines.add(forgetAt, ("forget", jobID))
        found: list[tuple[float, str, int]] = []
        for snapshot, events in self.store.load():
            ended = snapshot.endedAt
            if snapshot.state.terminal and ended is not None and self.expireAfter > 0:
                if ended + self.expireAfter <= now:
                    # Expired while the service was down: deleted, not loaded.
                    self.disk.delete(snapshot.id)
                    self._expireStored(snapshot.id, ended + 2 * self.expireAfter, now)
                    continue
                self._deadlines.add(ended + self.expireAfter, ("expire", snapshot.id))
            self.broker.restore(snapshot, [(e.seq, e.name, e.data) for e in events])
            if snapshot.state is JobState.SUCCEEDED:
                try:
                    found.append((ended or 0.0, snapshot.id, self.disk.pathOf(snapshot.id).stat().st_size))
                except OSError:
                    pass
            if not snapshot.state.terminal:
                self.disk.delete(snapshot.id)
                self.ledger.end(snapshot.id, interrupted())
        # Oldest first, by when they ended: the first to go for room.
        for _, jobID, size in sorted(found, key=lambda item: item[0]):
            self.disk.add(jobID, size)

    # -- expiry --------------------------------------------------------

    def _due(self, key: _Due) -> None:
        kind, jobID = key
        if kind == "expire":
            self._expire(jobID)
        else:
            self.broker.forget(jobID)
            try:
                self.store.forget(jobID)
            except STORE_ERRORS as e:
                _log.warn("could not forget render {jobID}: {e!r}", jobID=jobID, e=e)

    def _expire(self, jobID: str) -> None:
        """
        Delete a finished job: its output, its memory, its rows; remember
        its id as expired for another C{expireAfter}.
        """
        now = self.clock.seconds()
        try:
            ended = self.broker.get(jobID).endedAt
        except UnknownJob:
            return
        # Forgotten one period after the expiry was due (not after this
        # call, which a busy or suspended process may make late), as a
        # restart would compute it.
        forgetAt = (now if ended is None else ended + self.expireAfter) + self.expireAfter
        self.disk.delete(jobID)
        self.broker.expire(jobID)
        slot = self._slots.pop(jobID, None)
        if slot is not None:
            del self._onces[slot]
        self._expireStored(jobID, forgetAt, now)

    def _expireStored(self, jobID: str, forgetAt: float, now: float) -> None:
        if forgetAt <= now:
            self.broker.forget(jobID)
            self._tryStore(self.store.delete, jobID)
            return
        self.broker.expire(jobID)
        self._deadlines.add(forgetAt, ("forget", jobID))
        self._tryStore(self.store.expire, jobID, forgetAt)

    def _tryStore(
        self, write: Callable[Concatenate[str, _P], None], jobID: str, *args: _P.args, **kwargs: _P.kwargs
    ) -> None:
        try:
            write(jobID, *args, **kwargs)
        except STORE_ERRORS as e:
            _log.warn("could not delete render {jobID} from the store: {e!r}", jobID=jobID, e=e)

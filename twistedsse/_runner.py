"""
L{RenderRunner}: the worker side. It takes queued renders while it has
free slots (C{maxRenders}), launches each one's process, stops it at its
timeout or when asked, reports its progress and outcome through the
L{JobLedger}, and cleans up after it (scratch files, a failed render's
output), keeping the outputs within their disk budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._disk import OutputDisk, unlink
from ._interfaces import IQueueConsumer, IRenderer, IRenderQueue, QueuedRender, RenderPlan
from ._job import JobState
from ._ledger import JobLedger
from ._outcome import OverShare, completed, ofExit, outputUnusable, spawnFailed, storageFailed
from ._render import ExitStatus, RunningRender, launch

_log = Logger()


@attrs.define
class _Active:
    queued: QueuedRender
    plan: RenderPlan
    render: RunningRender
    timeout: IDelayedCall | None


@implementer(IQueueConsumer)
@attrs.define
class RenderRunner:
    """
    @ivar renderTimeout: seconds a render may run before it is stopped and
        failed; C{0} for no limit.
    @ivar killGrace: seconds between TERM and KILL.
    @ivar renderEnv: variables added to every render's environment.
    """

    clock: IReactorTime
    spawner: IReactorProcess
    renderers: Mapping[str, IRenderer]
    queue: IRenderQueue
    ledger: JobLedger
    disk: OutputDisk
    maxRenders: int
    renderTimeout: float = 3600.0
    killGrace: float = 5.0
    renderEnv: Mapping[str, str] = attrs.field(factory=dict)
    _active: dict[str, _Active] = attrs.field(factory=dict, init=False)
    _running: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.queue.attach(self)

    # -- IQueueConsumer ------------------------------------------------

    def rendersWaiting(self) -> None:
        self._pump()

    def cancel(self, jobID: str) -> None:
        active = self._active.get(jobID)
        if active is not None:
            active.render.stop("cancel")

    def busy(self) -> bool:
        return len(self._active) >= self.maxRenders

    def refusal(self) -> str | None:
        # Before it starts (and after it stops), renders only wait.
        return self.disk.lacks() if self._running else None

    # -- life ----------------------------------------------------------

    def activeCount(self) -> int:
        return len(self._active)

    def start(self) -> None:
        """
        Take renders from now on (those queued already first).
        """
        self._running = True
        self._pump()

    def stop(self) -> list[Deferred[ExitStatus]]:
        """
        Take no more renders; stop every running one (TERM, then KILL after
        C{killGrace}). Returns when each process exits.
        """
        self._running = False
        return [active.render.stop("shutdown") for active in self._active.values()]

    # -- running -------------------------------------------------------

    def _pump(self) -> None:
        while self._running and len(self._active) < self.maxRenders:
            queued = self.queue.take()
            if queued is None:
                return
            self._start(queued)

    def _start(self, queued: QueuedRender) -> None:
        jobID = queued.jobID
        snapshot = self.ledger.started(jobID)
        if snapshot is None or not self._roomFor(jobID):
            return
        renderer = self.renderers[snapshot.renderer]
        outputDir = self.disk.directory
        plan = None
        try:
            outputDir.mkdir(parents=True, exist_ok=True)
            plan = renderer.plan(snapshot.params, outputDir, jobID)
            render = launch(
                self.spawner,
                self.clock,
                plan,
                lambda payloads: self.ledger.progress(jobID, payloads),
                killGrace=self.killGrace,
                path=str(outputDir),
                extraEnv=self.renderEnv,
            )
        except Exception as e:
            # The full reason (paths included) is for the operator's log;
            # the client gets the kind of error only.
            _log.warn("render {jobID} could not start: {e!r}", jobID=jobID, e=e)
            if plan is not None:
                for path in plan.scratch:
                    unlink(path)
            self.ledger.end(jobID, spawnFailed(e))
            return
        timeout = None
        if self.renderTimeout > 0:
            timeout = self.clock.callLater(self.renderTimeout, render.stop, "timeout")
        self._active[jobID] = _Active(queued, plan, render, timeout)
        render.whenEnded().addCallback(self._ended, jobID).addErrback(
            lambda f: _log.failure("finishing render {jobID}", f, jobID=jobID)
        )

    def _roomFor(self, jobID: str) -> bool:
        """
        Before a render starts: fail it ("storage") if the disk is nearly
        full; otherwise make room for its share by deleting the oldest
        finished outputs.
        """
        lacking = self.disk.lacks()
        if lacking is not None:
            self.ledger.end(jobID, storageFailed(lacking))
            return False
        self.disk.evict(len(self._active) + 1)
        return True

    def _ended(self, status: ExitStatus, jobID: str) -> None:
        active = self._active.pop(jobID)
        if active.timeout is not None and active.timeout.active():
            active.timeout.cancel()
        plan = active.plan
        try:
            self._conclude(active.queued, plan, status)
        finally:
            for path in plan.scratch:
                unlink(path)
            if self.ledger.broker.get(jobID).state is not JobState.SUCCEEDED and plan.output is not None:
                unlink(plan.output)
            self._pump()

    def _conclude(self, queued: QueuedRender, plan: RenderPlan, status: ExitStatus) -> None:
        jobID = queued.jobID
        outcome = ofExit(status, timeout=self.renderTimeout, outputDir=str(self.disk.directory.resolve()))
        if outcome is not None:
            self.ledger.end(jobID, outcome)
            return
        size = None
        try:
            size = _finalize(plan, self.disk.share())
        except Exception as e:
            _log.warn("render {jobID}: output unusable: {e!r}", jobID=jobID, e=e)
            self.ledger.end(jobID, outputUnusable(e, status))
            return
        snapshot = self.ledger.broker.get(jobID)
        outcome = completed(
            size=size,
            outputURL=queued.outputURL,
            mediaDuration=plan.mediaDuration,
            startedAt=snapshot.startedAt or snapshot.createdAt,
            now=self.clock.seconds(),
        )
        if size is not None:
            self.disk.add(jobID, size)
        self.ledger.end(jobID, outcome)


def _finalize(plan: RenderPlan, share: int | None) -> int | None:
    """
    Move a successful render's output into place and check it; its size,
    or C{None} if it made no file.

    @raise OverShare: it is over C{share} bytes.
    """
    if plan.finalize is not None:
        plan.finalize()
    output: Path | None = plan.output
    if output is None or not output.is_file():
        return None
    size = output.stat().st_size
    if share is not None and size > share:
        raise OverShare(f"{size} bytes, over its share of --max-output-bytes ({share})")
    return size



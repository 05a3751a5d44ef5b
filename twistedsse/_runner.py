"""
L{RenderRunner}: the worker side. It takes queued renders while it has
free slots (C{maxRenders}), launches each one's process, stops it at its
timeout or when asked, reports its progress and outcome through its
L{IRenderLedger}, and cleans up after it (scratch files, a failed render's
output), keeping the outputs within their disk budget.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._disk import OutputDisk, unlink
from ._errors import UnknownRenderer
from ._interfaces import IQueueConsumer, IRenderer, IRenderLedger, IRenderSource, QueuedRender, RenderPlan
from ._job import JobSnapshot, JobState
from ._outcome import CANCELLED_RUNNING, Outcome, OverShare, completed, ofExit, outputUnusable, spawnFailed, storageFailed
from ._metrics import RenderStats
from ._render import ExitStatus, RunningRender, launch

_log = Logger()


@attrs.define
class _Active:
    queued: QueuedRender
    snapshot: JobSnapshot
    plan: RenderPlan
    render: RunningRender
    timeout: IDelayedCall | None
    #: No longer this worker's (Redis: handed back, or taken over):
    #: stopped, and nothing recorded.
    abandoned: bool = False


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
    queue: IRenderSource
    ledger: IRenderLedger
    disk: OutputDisk
    maxRenders: int
    renderTimeout: float = 3600.0
    killGrace: float = 5.0
    renderEnv: Mapping[str, str] = attrs.field(factory=dict)
    #: This worker's name in the log (Redis mode: its consumer name).
    name: str = ""
    #: Renders ended, by renderer and outcome, and their durations (for
    #: /metrics).
    stats: RenderStats = attrs.field(factory=RenderStats)
    _active: dict[str, _Active] = attrs.field(factory=dict, init=False)
    _beginning: set[str] = attrs.field(factory=set, init=False)
    _abandoned: set[str] = attrs.field(factory=set, init=False)
    _cancelled: set[str] = attrs.field(factory=set, init=False)
    _running: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.queue.attach(self)

    # -- IQueueConsumer ------------------------------------------------

    def rendersWaiting(self) -> None:
        self._pump()

    def cancel(self, jobID: str) -> None:
        if jobID in self._beginning:
            # Its start is being recorded: it ends cancelled instead.
            self._cancelled.add(jobID)
        active = self._active.get(jobID)
        if active is not None:
            active.render.stop("cancel")

    def busy(self) -> bool:
        return self._slotsTaken() >= self.maxRenders

    def abandon(self, jobID: str) -> None:
        """
        The render is no longer this worker's (Redis: handed back at a warm
        shutdown, or taken over by another worker): stop its process and
        record nothing.
        """
        if jobID in self._beginning:
            self._abandoned.add(jobID)
        active = self._active.get(jobID)
        if active is not None:
            active.abandoned = True
            active.render.stop("shutdown")

    def refusal(self) -> str | None:
        # Before it starts (and after it stops), renders only wait.
        return self.disk.lacks() if self._running else None

    # -- life ----------------------------------------------------------

    def activeCount(self) -> int:
        return self._slotsTaken()

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
        while self._running and self._slotsTaken() < self.maxRenders:
            queued = self.queue.take()
            if queued is None:
                return
            self._start(queued)

    def _slotsTaken(self) -> int:
        return len(self._active) + len(self._beginning)

    def _start(self, queued: QueuedRender) -> None:
        """
        Record the start (in one process at once; in Redis a round trip,
        while the slot stays taken), then launch.
        """
        jobID = queued.jobID
        self._beginning.add(jobID)

        def begun(snapshot: JobSnapshot | None) -> None:
            self._beginning.discard(jobID)
            if jobID in self._abandoned:
                self._abandoned.discard(jobID)
                self._cancelled.discard(jobID)
                return
            if jobID in self._cancelled:
                self._cancelled.discard(jobID)
                if snapshot is not None:
                    self._record(jobID, CANCELLED_RUNNING, snapshot.renderer)
                else:
                    self.queue.finished(jobID)
            elif snapshot is None:
                # Ended meanwhile (cancelled), or its start not recorded.
                self.queue.finished(jobID)
            elif self._roomFor(queued, snapshot.renderer) and self._launch(queued, snapshot):
                return
            self._pump()

        def failed(failure: Failure) -> None:
            # Only at shutdown (a Redis ledger retries while Redis is
            # down): the render is handed back, not run.
            self._beginning.discard(jobID)
            self._abandoned.discard(jobID)
            self._cancelled.discard(jobID)
            _log.info("render {jobID} not started: {why}", jobID=jobID, why=failure.getErrorMessage())

        self.ledger.began(queued).addCallbacks(begun, failed).addErrback(
            lambda f: _log.failure("starting render {jobID}", f, jobID=jobID)
        )

    def _launch(self, queued: QueuedRender, snapshot: JobSnapshot) -> bool:
        """
        Start the render's process; whether it started.
        """
        jobID = queued.jobID
        outputDir = self.disk.directory
        plan = None
        try:
            renderer = self.renderers.get(snapshot.renderer)
            if renderer is None:
                # (Redis mode: a worker not given every --renderer the web
                # instances accept.)
                raise UnknownRenderer(f"no renderer named {snapshot.renderer!r} on this worker")
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
            self._record(jobID, spawnFailed(e), snapshot.renderer)
            return False
        _log.info(
            "render {jobID} started: pid {pid}{worker}",
            jobID=jobID, pid=getattr(render.protocol.transport, "pid", None),
            worker=f" on worker {self.name}" if self.name else "",
        )  # fmt: skip
        timeout = None
        if self.renderTimeout > 0:
            timeout = self.clock.callLater(self.renderTimeout, render.stop, "timeout")
        self._active[jobID] = _Active(queued, snapshot, plan, render, timeout)
        render.whenEnded().addCallback(self._ended, jobID).addErrback(
            lambda f: _log.failure("finishing render {jobID}", f, jobID=jobID)
        )
        return True

    def _record(self, jobID: str, outcome: Outcome, renderer: str, seconds: float | None = None) -> None:
        """
        Record a render's end, then tell the source (which, in Redis,
        acknowledges it: only once its end is written).

        @param seconds: how long its process ran, if it did.
        """
        self.stats.record(renderer, outcome.state.value, seconds)
        self.ledger.finish(jobID, outcome).addCallbacks(
            lambda _: self.queue.finished(jobID),
            lambda f: _log.info("the end of render {jobID} was not recorded: {why}", jobID=jobID,
                                why=f.getErrorMessage()),
        )

    def _roomFor(self, queued: QueuedRender, renderer: str) -> bool:
        """
        Before a render starts: fail it ("storage") if the disk is nearly
        full; otherwise make room for its share by deleting the oldest
        finished outputs.
        """
        lacking = self.disk.lacks()
        if lacking is not None:
            self._record(queued.jobID, storageFailed(lacking), renderer)
            return False
        self.disk.evict(len(self._active) + 1)
        return True

    def _ended(self, status: ExitStatus, jobID: str) -> None:
        active = self._active.pop(jobID)
        if active.timeout is not None and active.timeout.active():
            active.timeout.cancel()
        plan = active.plan
        outcome = None
        try:
            if active.abandoned:
                _log.info("render {jobID} given up, not recorded: no longer this worker's", jobID=jobID)
            else:
                outcome = self._conclude(active, status)
                began = active.snapshot.startedAt or active.snapshot.createdAt
                seconds = self.clock.seconds() - began
                _log.info(
                    "render {jobID} ended {state} after {seconds:.1f} s ({exit})",
                    jobID=jobID, state=outcome.state.value, seconds=seconds,
                    exit=_exitText(status),
                )  # fmt: skip
                self._record(jobID, outcome, active.snapshot.renderer, seconds)
        finally:
            for path in plan.scratch:
                unlink(path)
            if (outcome is None or outcome.state is not JobState.SUCCEEDED) and plan.output is not None:
                unlink(plan.output)
            self._pump()

    def _conclude(self, active: _Active, status: ExitStatus) -> Outcome:
        jobID = active.queued.jobID
        plan = active.plan
        outcome = ofExit(status, timeout=self.renderTimeout, outputDir=str(self.disk.directory.resolve()))
        if outcome is not None:
            return outcome
        size = None
        try:
            size = _finalize(plan, self.disk.share())
        except Exception as e:
            _log.warn("render {jobID}: output unusable: {e!r}", jobID=jobID, e=e)
            return outputUnusable(e, status)
        snapshot = active.snapshot
        outcome = completed(
            size=size,
            outputURL=active.queued.outputURL,
            mediaDuration=plan.mediaDuration,
            startedAt=snapshot.startedAt or snapshot.createdAt,
            now=self.clock.seconds(),
        )
        if size is not None:
            self.disk.add(jobID, size)
        return outcome


def _exitText(status: ExitStatus) -> str:
    """
    How the process ended, for the log: C{exit status 0}, C{SIGKILL}.
    """
    if status.signal is None:
        return f"exit status {status.exitCode}"
    try:
        return signal.Signals(status.signal).name
    except ValueError:
        return f"signal {status.signal}"


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



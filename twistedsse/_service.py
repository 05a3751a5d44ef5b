"""
L{RenderService}: owns the jobs (through an L{IJobBroker}), the queue and
the running render processes, and ends all of them when it stops.

Its API speaks in jobs and renderers, not HTTP: C{_app} maps requests onto
it, and an embedding application may call it directly.
"""

from __future__ import annotations

import secrets
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger

from ._errors import JobFinished, OutputNotReady, QueueFull, RenderProtocolError, UnknownRenderer
from ._interfaces import IJobBroker, IRenderer, RenderPlan
from ._job import JobSnapshot, JobState
from ._render import ExitStatus, RunningRender, launch, removeWorkDirs
from ._store import SQLiteJobStore, StoredEvent

_log = Logger()

Links = Callable[[str], Mapping[str, str]]


def newJobID() -> str:
    """
    An unguessable job id: 192 random bits, URL-safe. The id is the
    capability to read a job's events and output.
    """
    return secrets.token_urlsafe(24)


@attrs.define
class _Active:
    plan: RenderPlan
    render: RunningRender
    timeout: IDelayedCall | None


class RenderService(Service):
    """
    Runs renders, at most C{maxRenders} at a time, first come first served;
    the rest wait C{queued}.

    @param clock: schedules timeouts and KILLs.
    @param spawner: starts processes.
    @param renderers: the renderers clients may ask for, by name.
    @param outputDir: where outputs and scratch files go.
    @param renderTimeout: seconds a render may run before it is stopped
        and failed; C{0} for no limit.
    @param killGrace: seconds between TERM and KILL.
    @param maxQueued: renders that may wait for a slot (0: no limit); past
        it, L{QueueFull}.
    @param store: where jobs are kept across restarts, or C{None} for
        memory only.
    @param renderEnv: variables added to every render's environment (the
        operator's C{--render-env}, the thread budget).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        spawner: IReactorProcess,
        broker: IJobBroker,
        renderers: Mapping[str, IRenderer],
        outputDir: Path,
        maxRenders: int = 2,
        renderTimeout: float = 3600.0,
        killGrace: float = 5.0,
        maxQueued: int = 0,
        store: SQLiteJobStore | None = None,
        newID: Callable[[], str] = newJobID,
        renderEnv: Mapping[str, str] | None = None,
    ) -> None:
        if maxRenders < 1:
            raise ValueError(f"maxRenders must be at least 1, got {maxRenders!r}")
        self.clock = clock
        self.spawner = spawner
        self.broker = broker
        self.renderers = dict(renderers)
        self.outputDir = Path(outputDir)
        self.maxRenders = maxRenders
        self.renderTimeout = renderTimeout
        self.killGrace = killGrace
        self.maxQueued = maxQueued
        self.store = store
        self.renderEnv = dict(renderEnv or {})
        self._restored = False
        self._newID = newID
        self._links: dict[str, Mapping[str, str]] = {}
        self._queue: deque[str] = deque()
        self._active: dict[str, _Active] = {}
        self._stopping = False

    # -- the API -------------------------------------------------------

    def submit(self, renderer: str, params: object, links: Links | None = None) -> JobSnapshot:
        """
        Validate and queue a render.

        @param links: gives the URLs clients use for a job id; the
            C{output_url} in the C{complete} event comes from it.
        @raise UnknownRenderer: no renderer by that name.
        @raise twistedsse._errors.InvalidParams: C{params} do not suit it.
        """
        impl = self.renderers.get(renderer) if isinstance(renderer, str) else None
        if impl is None:
            known = ", ".join(sorted(self.renderers)) or "none"
            raise UnknownRenderer(f"no renderer named {renderer!r} (known: {known})")
        normalized = impl.validate(params)
        if self.maxQueued and len(self._queue) >= self.maxQueued and len(self._active) >= self.maxRenders:
            raise QueueFull(f"{len(self._queue)} renders are waiting already, the limit", retryAfter=10)
        jobID = self._newID()
        snapshot = JobSnapshot(
            id=jobID,
            renderer=renderer,
            params=normalized,
            state=JobState.QUEUED,
            createdAt=self.clock.seconds(),
        )
        self.broker.create(snapshot)
        if self.store is not None:
            self.store.save(snapshot)
        if links is not None:
            self._links[jobID] = links(jobID)
        if self._stopping:
            self._end(jobID, JobState.FAILED, "failed", self._interrupted())
        else:
            self._queue.append(jobID)
            self._pump()
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
        if jobID in self._active:
            self._active[jobID].render.stop("cancel")
        else:
            self._queue.remove(jobID)
            self._end(jobID, JobState.CANCELLED, "cancelled", {"message": "cancelled before it started"})
        return self.broker.get(jobID)

    def outputPath(self, jobID: str) -> Path:
        """
        The finished output file of a job.

        @raise twistedsse._errors.UnknownJob: no such job.
        @raise OutputNotReady: the render has not succeeded, or made no file.
        """
        snapshot = self.broker.get(jobID)
        if snapshot.state is not JobState.SUCCEEDED:
            raise OutputNotReady(f"render {jobID} is {snapshot.state.value}: no output yet")
        path = self.outputDir / f"{jobID}.mp4"
        if not (snapshot.result or {}).get("output_url") or not path.is_file():
            raise OutputNotReady(f"render {jobID} made no output file")
        return path

    def activeCount(self) -> int:
        """
        How many render processes are running.
        """
        return len(self._active)

    def queuedCount(self) -> int:
        return len(self._queue)

    # -- running -------------------------------------------------------

    def _pump(self) -> None:
        # Renders submitted before the service starts wait in the queue.
        while self._queue and len(self._active) < self.maxRenders and self.running and not self._stopping:
            self._start(self._queue.popleft())

    def _start(self, jobID: str) -> None:
        snapshot = self.broker.get(jobID).transition(JobState.RUNNING, self.clock.seconds())
        self.broker.update(snapshot)
        if self.store is not None:
            self.store.save(snapshot)
        renderer = self.renderers[snapshot.renderer]
        plan = None
        try:
            self.outputDir.mkdir(parents=True, exist_ok=True)
            plan = renderer.plan(snapshot.params, self.outputDir, jobID)
            render = launch(
                self.spawner,
                self.clock,
                plan,
                lambda payloads: self._progress(jobID, payloads),
                killGrace=self.killGrace,
                path=str(self.outputDir),
                extraEnv=self.renderEnv,
            )
        except Exception as e:
            # The full reason (paths included) is for the operator's log;
            # the client gets the kind of error only.
            _log.warn("render {jobID} could not start: {e!r}", jobID=jobID, e=e)
            if plan is not None:
                for path in plan.scratch:
                    _unlink(path)
            self._end(
                jobID,
                JobState.FAILED,
                "failed",
                _failure(f"could not start the renderer ({_clientReason(e)})", reason="spawn"),
            )
            return
        timeout = None
        if self.renderTimeout > 0:
            timeout = self.clock.callLater(self.renderTimeout, render.stop, "timeout")
        self._active[jobID] = _Active(plan, render, timeout)
        render.whenEnded().addCallback(self._ended, jobID).addErrback(
            lambda f: _log.failure("finishing render {jobID}", f, jobID=jobID)
        )

    def _progress(self, jobID: str, payloads: list[dict[str, Any]]) -> None:
        # Several at once when the render printed faster than we read (the
        # server is busy): one fan-out for all of them, not one each.
        self.broker.publishMany(jobID, "progress", payloads)
        self.broker.update(attrs.evolve(self.broker.get(jobID), progress=payloads[-1]))

    def _ended(self, status: ExitStatus, jobID: str) -> None:
        active = self._active.pop(jobID)
        if active.timeout is not None and active.timeout.active():
            active.timeout.cancel()
        plan = active.plan
        try:
            self._conclude(jobID, plan, status)
        finally:
            for path in plan.scratch:
                _unlink(path)
            if self.broker.get(jobID).state is not JobState.SUCCEEDED and plan.output is not None:
                _unlink(plan.output)
            self._pump()

    def _conclude(self, jobID: str, plan: RenderPlan, status: ExitStatus) -> None:
        if status.stopReason == "cancel":
            self._end(jobID, JobState.CANCELLED, "cancelled", {"message": "cancelled by request"})
            return
        if status.stopReason == "shutdown":
            self._end(jobID, JobState.FAILED, "failed", self._interrupted(status))
            return
        if not status.succeeded:
            self._end(jobID, JobState.FAILED, "failed", _exitFailure(self._private(status), self.renderTimeout))
            return
        size = None
        try:
            if plan.finalize is not None:
                plan.finalize()
            if plan.output is not None and plan.output.is_file():
                size = plan.output.stat().st_size
        except Exception as e:
            _log.warn("render {jobID}: output unusable: {e!r}", jobID=jobID, e=e)
            self._end(
                jobID,
                JobState.FAILED,
                "failed",
                _failure(f"the render's output is unusable ({_clientReason(e)})", reason="output", status=status),
            )
            return
        snapshot = self.broker.get(jobID)
        links = self._links.get(jobID, {})
        result = {
            "output_url": links.get("output_url") if size is not None else None,
            "duration": plan.mediaDuration,
            "size": size,
            "elapsed": round(self.clock.seconds() - (snapshot.startedAt or snapshot.createdAt), 3),
        }
        self._end(jobID, JobState.SUCCEEDED, "complete", result)

    def _end(self, jobID: str, state: JobState, event: str, payload: Mapping[str, Any]) -> None:
        snapshot = self.broker.get(jobID)
        changes: dict[str, Any] = {}
        if state is JobState.SUCCEEDED:
            changes["result"] = payload
        elif state is JobState.FAILED:
            changes["error"] = payload
        final = snapshot.transition(state, self.clock.seconds(), **changes)
        self.broker.update(final)
        self.broker.publish(jobID, event, payload)
        self._links.pop(jobID, None)
        if self.store is not None:
            try:
                self.store.finish(
                    final, [StoredEvent(*e) for e in self.broker.finalEvents(jobID)]
                )
            except Exception:
                _log.failure("could not store the end of render {jobID}", jobID=jobID)

    def _private(self, status: ExitStatus) -> ExitStatus:
        """
        The status with the output directory's path taken out of its
        stderr lines (ffmpeg names the file it cannot open): clients do not
        need to know the server's paths.
        """
        where = str(self.outputDir.resolve())
        if not any(where in line for line in status.stderrTail):
            return status
        return attrs.evolve(status, stderrTail=tuple(line.replace(where, "<output>") for line in status.stderrTail))

    def _interrupted(self, status: ExitStatus | None = None) -> dict[str, Any]:
        return _failure("interrupted: the server shut down", reason="interrupted", status=status)

    # -- the service ---------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """
        Fail every queued render, stop every running one (TERM, then KILL
        after C{killGrace}), and fire once every process has exited. Each
        job publishes its terminal C{failed} event ("interrupted"), which
        ends its open streams with a final frame.
        """
        super().stopService()
        self._stopping = True
        while self._queue:
            self._end(self._queue.popleft(), JobState.FAILED, "failed", self._interrupted())
        ended = [active.render.stop("shutdown") for active in self._active.values()]

        def closeStore(result: object) -> None:
            # Every stream's final frame is written before the connections
            # are closed (the fan-out may be mid-pass).
            self.broker.flush()
            if self.store is not None:
                self.store.close()

        if not ended:
            closeStore(None)
            return succeed(None)
        return DeferredList(ended, consumeErrors=True).addCallback(closeStore)

    def startService(self) -> None:
        self._stopping = False
        # No render runs yet: any working directory is a dead one's.
        removeWorkDirs(self.outputDir)
        if self.store is not None and not self._restored:
            self._restore(self.store)
        super().startService()
        self._pump()

    def _restore(self, store: SQLiteJobStore) -> None:
        """
        Load the jobs of earlier runs. One that never ended (the process
        stopped, or was killed, while it was queued or running) ends now as
        C{failed}, "interrupted": never a job that hangs forever.
        """
        self._restored = True
        for snapshot, events in store.load():
            self.broker.restore(snapshot, [(e.seq, e.name, e.data) for e in events])
            if not snapshot.state.terminal:
                for leftover in self.outputDir.glob(f"{snapshot.id}.*"):
                    _unlink(leftover)
                self._end(snapshot.id, JobState.FAILED, "failed", self._interrupted())


def _failure(
    message: str, reason: str, status: ExitStatus | None = None
) -> dict[str, Any]:
    return {
        "message": message,
        "reason": reason,
        "exit_code": None if status is None else status.exitCode,
        "signal": None if status is None else status.signal,
        "stderr_tail": [] if status is None else list(status.stderrTail),
    }


def _clientReason(error: Exception) -> str:
    """
    What went wrong, without the paths an C{OSError} carries.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, RenderProtocolError):
        return str(error)
    return type(error).__name__


def _exitFailure(status: ExitStatus, timeout: float) -> dict[str, Any]:
    if status.stopReason == "timeout":
        return _failure(f"timed out after {timeout:g} s", reason="timeout", status=status)
    if status.protocolError is not None:
        return _failure(
            f"the renderer broke its output protocol: {status.protocolError}",
            reason="protocol",
            status=status,
        )
    if status.signal is not None:
        return _failure(f"the renderer was killed by signal {status.signal}", "signal", status)
    last = status.stderrTail[-1] if status.stderrTail else "no message on stderr"
    return _failure(f"the renderer exited with code {status.exitCode}: {last}", "exit", status)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("could not remove {path}: {e}", path=path, e=e)


def defaultOutputDir() -> Path:
    """
    A fresh private temporary directory, for when none is configured.
    """
    return Path(tempfile.mkdtemp(prefix="twistedsse-"))

"""
L{RenderService}: owns the jobs (through an L{IJobBroker}), the queue and
the running render processes, and ends all of them when it stops.

Its API speaks in jobs and renderers, not HTTP: C{_app} maps requests onto
it, and an embedding application may call it directly.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger

from ._errors import (
    InsufficientStorage,
    JobFinished,
    OutputExpired,
    OutputNotReady,
    QueueFull,
    UnknownJob,
    UnknownRenderer,
)
from ._expiry import Deadlines
from ._interfaces import IJobBroker, IRenderer, RenderPlan
from ._job import JobSnapshot, JobState
from ._outcome import (
    CANCELLED_QUEUED,
    Outcome,
    OverShare,
    clientReason,
    completed,
    interrupted,
    ofExit,
    outputUnusable,
    spawnFailed,
    storageFailed,
)
from ._render import ExitStatus, RunningRender, launch, removeWorkDirs
from ._interfaces import IJobStore
from ._store import STORE_ERRORS, NullJobStore, StoredEvent

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
    @param store: where jobs are kept across restarts; C{None} (a
        L{NullJobStore}) for memory only.
    @param expireAfter: seconds after a job ends when it and its output
        are deleted (memory, disk, store; C{0}: never). Its id answers
        L{twistedsse._errors.JobExpired} for as long again, then is
        forgotten.
    @param maxOutputBytes: the total size of outputs on disk (C{None} or
        C{0}: no limit). Each running render reserves an equal share,
        C{maxOutputBytes // maxRenders}, which is also the most it may
        write; room for it is made before it starts by deleting the oldest
        finished outputs.
    @param minFreeBytes: a render is refused (at submit) or failed (when
        it would start) while the output filesystem has less free space.
    @param statvfs: C{os.statvfs}, or a stand-in for tests.
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
        store: IJobStore | None = None,
        newID: Callable[[], str] = newJobID,
        expireAfter: float = 86400.0,
        maxOutputBytes: int | None = None,
        minFreeBytes: int = 0,
        statvfs: Callable[[str], Any] = os.statvfs,
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
        self.store: IJobStore = store if store is not None else NullJobStore()
        self.renderEnv = dict(renderEnv or {})
        self._restored = False
        self._newID = newID
        self._links: dict[str, Mapping[str, str]] = {}
        self._queue: deque[str] = deque()
        self._active: dict[str, _Active] = {}
        self._stopping = False
        self.expireAfter = expireAfter
        self.maxOutputBytes = maxOutputBytes or None
        self.minFreeBytes = minFreeBytes
        self._statvfs = statvfs
        self._deadlines = Deadlines(clock, self._due)
        # Finished outputs on disk, oldest first, with their sizes.
        self._outputs: dict[str, int] = {}

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
        if self.running:
            lacking = self._diskLacks()
            if lacking is not None:
                raise InsufficientStorage(lacking)
        jobID = self._newID()
        snapshot = JobSnapshot(
            id=jobID,
            renderer=renderer,
            params=normalized,
            state=JobState.QUEUED,
            createdAt=self.clock.seconds(),
        )
        self.broker.create(snapshot)
        try:
            self.store.save(snapshot)
        except STORE_ERRORS as e:
            # Not created at all: nobody has its id yet.
            self.broker.remove(jobID)
            _log.warn("could not store a new render: {e!r}", e=e)
            raise InsufficientStorage(f"the job store cannot be written ({e})") from None
        if links is not None:
            self._links[jobID] = links(jobID)
        if self._stopping:
            self._end(jobID, interrupted())
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
            self._end(jobID, CANCELLED_QUEUED)
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
        if not (snapshot.result or {}).get("output_url"):
            raise OutputNotReady(f"render {jobID} made no output file")
        if not path.is_file():
            # Deleted since: to make room for newer outputs
            # (maxOutputBytes), or by hand.
            raise OutputExpired(f"the output of render {jobID} has been deleted")
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
        if not self._saved(snapshot) or not self._roomFor(jobID):
            return
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
            self._end(jobID, spawnFailed(e))
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
        outcome = ofExit(status, timeout=self.renderTimeout, outputDir=str(self.outputDir.resolve()))
        if outcome is not None:
            self._end(jobID, outcome)
            return
        size = None
        try:
            if plan.finalize is not None:
                plan.finalize()
            if plan.output is not None and plan.output.is_file():
                size = plan.output.stat().st_size
                share = self._share()
                if share is not None and size > share:
                    raise OverShare(f"{size} bytes, over its share of --max-output-bytes ({share})")
        except Exception as e:
            _log.warn("render {jobID}: output unusable: {e!r}", jobID=jobID, e=e)
            self._end(jobID, outputUnusable(e, status))
            return
        snapshot = self.broker.get(jobID)
        outcome = completed(
            size=size,
            outputURL=self._links.get(jobID, {}).get("output_url"),
            mediaDuration=plan.mediaDuration,
            startedAt=snapshot.startedAt or snapshot.createdAt,
            now=self.clock.seconds(),
        )
        if size is not None:
            self._outputs[jobID] = size
        self._end(jobID, outcome)

    def _end(self, jobID: str, outcome: Outcome) -> None:
        state, event, payload = outcome.state, outcome.event, outcome.payload
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
        try:
            self.store.finish(final, [StoredEvent(*e) for e in self.broker.finalEvents(jobID)])
        except Exception:
            _log.failure("could not store the end of render {jobID}", jobID=jobID)
        if self.expireAfter > 0:
            self._deadlines.add(self.clock.seconds() + self.expireAfter, ("expire", jobID))

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
        self._deadlines.stop()
        while self._queue:
            self._end(self._queue.popleft(), interrupted())
        ended = [active.render.stop("shutdown") for active in self._active.values()]

        def closeStore(result: object) -> None:
            # Every stream's final frame is written before the connections
            # are closed (the fan-out may be mid-pass).
            self.broker.flush()
            self.store.close()

        if not ended:
            closeStore(None)
            return succeed(None)
        return DeferredList(ended, consumeErrors=True).addCallback(closeStore)

    def startService(self) -> None:
        self._stopping = False
        # No render runs yet: any working directory is a dead one's.
        removeWorkDirs(self.outputDir)
        if not self._restored:
            self._restore(self.store)
        self._evict(0)
        self._deadlines.start()
        super().startService()
        self._pump()

    def _restore(self, store: IJobStore) -> None:
        """
        Load the jobs of earlier runs. One that never ended (the process
        stopped, or was killed, while it was queued or running) ends now as
        C{failed}, "interrupted": never a job that hangs forever. One that
        expired while the service was down is deleted, not loaded, and its
        id remembered as expired as if the service had run all along.
        """
        self._restored = True
        now = self.clock.seconds()
        for jobID, forgetAt in store.expired(now):
            self.broker.expire(jobID)
            self._deadlines.add(forgetAt, ("forget", jobID))
        found: list[tuple[float, str, int]] = []
        for snapshot, events in store.load():
            ended = snapshot.endedAt
            if snapshot.state.terminal and ended is not None and self.expireAfter > 0:
                if ended + self.expireAfter <= now:
                    # Expired while the service was down: deleted, not loaded.
                    self._deleteOutputs(snapshot.id)
                    self._expireStored(snapshot.id, ended + 2 * self.expireAfter, now)
                    continue
                self._deadlines.add(ended + self.expireAfter, ("expire", snapshot.id))
            self.broker.restore(snapshot, [(e.seq, e.name, e.data) for e in events])
            if snapshot.state is JobState.SUCCEEDED:
                path = self.outputDir / f"{snapshot.id}.mp4"
                try:
                    found.append((ended or 0.0, snapshot.id, path.stat().st_size))
                except OSError:
                    pass
            if not snapshot.state.terminal:
                for leftover in self.outputDir.glob(f"{snapshot.id}.*"):
                    _unlink(leftover)
                self._end(snapshot.id, interrupted())
        # Oldest first, by when they ended: the first to go for room.
        for _, jobID, size in sorted(found, key=lambda item: item[0]):
            self._outputs[jobID] = size

    # -- bounded storage -----------------------------------------------

    def _saved(self, snapshot: JobSnapshot) -> bool:
        """
        Write a job's snapshot; if the store cannot be written (disk full),
        end the job C{failed} ("storage") instead: it must not stay
        C{running} (or, after a restart, be "interrupted") without a
        process.
        """
        try:
            self.store.save(snapshot)
        except STORE_ERRORS as e:
            _log.warn("could not store render {jobID}: {e!r}", jobID=snapshot.id, e=e)
            self._end(snapshot.id, storageFailed(f"the job store cannot be written ({e})"))
            return False
        return True

    def _diskLacks(self) -> str | None:
        """
        Why the output filesystem cannot take a new render (less than
        C{minFreeBytes} free), or C{None}.
        """
        if self.minFreeBytes <= 0:
            return None
        where = self.outputDir
        while not where.exists() and where.parent != where:
            where = where.parent
        try:
            stat = self._statvfs(str(where))
        except OSError as e:
            return f"the output filesystem cannot be examined ({clientReason(e)})"
        free = stat.f_bavail * stat.f_frsize
        if free < self.minFreeBytes:
            return f"the output filesystem is nearly full: {free} bytes free, {self.minFreeBytes} needed"
        return None

    def _share(self) -> int | None:
        """
        What one render may write, and reserves while it runs.
        """
        if self.maxOutputBytes is None:
            return None
        return self.maxOutputBytes // self.maxRenders

    def _roomFor(self, jobID: str) -> bool:
        """
        Before a render starts: fail it ("storage") if the disk is nearly
        full; otherwise make room for its share by deleting the oldest
        finished outputs.
        """
        lacking = self._diskLacks()
        if lacking is not None:
            self._end(jobID, storageFailed(lacking))
            return False
        self._evict(len(self._active) + 1)
        return True

    def _evict(self, renders: int) -> None:
        """
        Delete the oldest finished outputs until they and the shares of
        C{renders} renders fit in C{maxOutputBytes}. Their jobs stay; their
        C{/output} answers L{OutputExpired}.
        """
        share = self._share()
        if share is None or self.maxOutputBytes is None:
            return
        budget = self.maxOutputBytes - renders * share
        total = sum(self._outputs.values())
        while self._outputs and total > budget:
            jobID = next(iter(self._outputs))
            total -= self._outputs.pop(jobID)
            _log.info("deleting the output of render {jobID} to make room", jobID=jobID)
            _unlink(self.outputDir / f"{jobID}.mp4")

    def outputBytes(self) -> int:
        """
        The total size of the finished outputs on disk.
        """
        return sum(self._outputs.values())

    def _due(self, key: Hashable) -> None:
        kind, jobID = key  # type: ignore[misc]
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
        self._deleteOutputs(jobID)
        self.broker.expire(jobID)
        self._expireStored(jobID, forgetAt, now)

    def _expireStored(self, jobID: str, forgetAt: float, now: float) -> None:
        if forgetAt <= now:
            self.broker.forget(jobID)
            self._tryStore(self.store.delete, jobID)
            return
        self.broker.expire(jobID)
        self._deadlines.add(forgetAt, ("forget", jobID))
        self._tryStore(self.store.expire, jobID, forgetAt)

    def _tryStore(self, write: Callable[..., None], jobID: str, *args: Any) -> None:
        try:
            write(jobID, *args)
        except STORE_ERRORS as e:
            _log.warn("could not delete render {jobID} from the store: {e!r}", jobID=jobID, e=e)

    def _deleteOutputs(self, jobID: str) -> None:
        self._outputs.pop(jobID, None)
        if self.outputDir.is_dir():
            for path in self.outputDir.glob(f"{jobID}.*"):
                _unlink(path)


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

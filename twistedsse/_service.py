"""
L{RenderService}: the jobs and the render processes of one server, as one
Twisted service that ends all of them when it stops.

It is a facade over the parts that a server split across processes will
run apart: the web side (L{twistedsse._jobs.JobTracker}: submit, cancel,
status, expiry, restore) and the worker side
(L{twistedsse._runner.RenderRunner}: run, time out, stop, clean up), joined
by a queue (L{twistedsse._queue.MemoryQueue}) and both reporting through
one L{JobLedger} (broker and store). Its API speaks in jobs and renderers,
not HTTP: C{_app} maps requests onto it, and an embedding application may
call it directly.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from ._disk import OutputDisk
from ._idempotency import Once
from ._interfaces import IJobBroker, IJobStore, IRenderer
from ._job import JobSnapshot
from ._jobs import JobTracker
from ._ledger import JobLedger
from ._metrics import DeliveryStats, ServiceMetrics
from ._queue import MemoryQueue
from ._render import removeWorkDirs
from ._runner import RenderRunner
from ._store import NullJobStore
from ._webhooks import CallbackPolicy, Webhooks


def newJobID() -> str:
    """
    An unguessable job id: 192 random bits, URL-safe. The id is the
    capability to read a job's events and output.
    """
    return secrets.token_urlsafe(24)


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
        it, L{twistedsse._errors.QueueFull}.
    @param store: where jobs are kept across restarts; C{None} (a
        L{NullJobStore}) for memory only.
    @param newID: makes job ids (L{newJobID}).
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
    @param webhooks: sends ended jobs to their C{callback_url}s; C{None}:
        a C{callback_url} is refused (none is allowed).
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
        webhooks: Webhooks | None = None,
    ) -> None:
        if maxRenders < 1:
            raise ValueError(f"maxRenders must be at least 1, got {maxRenders!r}")
        self.clock = clock
        self.broker = broker
        self.renderers = dict(renderers)
        self.maxRenders = maxRenders
        self.store: IJobStore = store if store is not None else NullJobStore()
        self._disk = OutputDisk(Path(outputDir), maxRenders, maxOutputBytes or None, minFreeBytes, statvfs)
        self.webhooks = webhooks
        self._ledger = JobLedger(clock, broker, self.store, webhooks=webhooks)
        queue = MemoryQueue()
        self._jobs = JobTracker(
            clock, self.renderers, self._ledger, queue, self._disk, newID, maxQueued=maxQueued, expireAfter=expireAfter,
            callbacks=webhooks.policy if webhooks is not None else CallbackPolicy(),
        )
        self._ledger.onEnded = self._jobs.ended
        self._runner = RenderRunner(
            clock,
            spawner,
            self.renderers,
            queue,
            self._ledger,
            self._disk,
            maxRenders,
            renderTimeout=renderTimeout,
            killGrace=killGrace,
            renderEnv=dict(renderEnv or {}),
            # One count of renders by outcome: the tracker's (ended before
            # they ran) and the runner's (ran).
            stats=self._jobs.stats,
        )
        self._queue = queue
        #: This service's Prometheus registry (/metrics); the apps built
        #: over it add their streams and connections.
        self.metrics = ServiceMetrics()
        collector = self.metrics.collector
        stats = getattr(broker, "stats", None)
        if isinstance(stats, DeliveryStats):
            collector.deliveries.append(stats)
        collector.renders = self._runner.stats
        collector.queueDepth = self.queuedCount
        collector.activeRenders = self.activeCount

    # -- settings, as given --------------------------------------------

    @property
    def outputDir(self) -> Path:
        return self._disk.directory

    @outputDir.setter
    def outputDir(self, value: Path) -> None:
        # (Set before startService by a service that makes its directory
        # then: see twistedsse._build.)
        self._disk.directory = Path(value)

    @property
    def spawner(self) -> IReactorProcess:
        return self._runner.spawner

    @property
    def renderTimeout(self) -> float:
        return self._runner.renderTimeout

    @property
    def killGrace(self) -> float:
        return self._runner.killGrace

    @property
    def renderEnv(self) -> Mapping[str, str]:
        return self._runner.renderEnv

    @property
    def maxQueued(self) -> int:
        return self._jobs.maxQueued

    @property
    def expireAfter(self) -> float:
        return self._jobs.expireAfter

    @property
    def maxOutputBytes(self) -> int | None:
        return self._disk.maxBytes

    @property
    def minFreeBytes(self) -> int:
        return self._disk.minFreeBytes

    # -- the API -------------------------------------------------------

    def newJobID(self) -> str:
        """
        A new job id, for a caller that names a job's URLs before it
        submits it (the C{outputURL} of L{submit}).
        """
        return self._jobs.newID()

    def submit(
        self,
        renderer: object,
        params: object,
        outputURL: str | None = None,
        *,
        jobID: str | None = None,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> JobSnapshot:
        """
        Validate and queue a render.

        @param renderer: its name (any other value, as a client may send,
            is no renderer's).
        @param outputURL: the URL clients fetch the output from, opaque
            here: the C{output_url} in the C{complete} event if the render
            makes a file.
        @param jobID: the id to give the job, from L{newJobID}; by default
            a new one.
        @param callbackURL: where to POST the job when it ends (see
            L{twistedsse._webhooks}).
        @param once: its C{Idempotency-Key} (L{JobTracker.submit}).
        @raise ValueError: a job with that C{jobID} exists already.
        @raise twistedsse._errors.UnknownRenderer: no renderer by that name.
        @raise twistedsse._errors.InvalidParams: C{params} do not suit it.
        @raise twistedsse._errors.QueueFull: too many renders wait already.
        @raise twistedsse._errors.InsufficientStorage: no room on disk, or
            the job store cannot be written.
        """
        return self._jobs.submit(renderer, params, outputURL, jobID, callbackURL, once)

    def cancel(self, jobID: str) -> JobSnapshot:
        """
        Cancel a queued or running render. A running one is stopped (TERM,
        then KILL) and becomes C{cancelled} once its process has exited.

        @raise twistedsse._errors.UnknownJob: no such job.
        @raise twistedsse._errors.JobFinished: it had finished already.
        """
        return self._jobs.cancel(jobID)

    def outputPath(self, jobID: str) -> Path:
        """
        The finished output file of a job.

        @raise twistedsse._errors.UnknownJob: no such job.
        @raise twistedsse._errors.OutputNotReady: the render has not
            succeeded, or made no file.
        @raise twistedsse._errors.OutputExpired: it has been deleted since.
        """
        return self._jobs.outputPath(jobID)

    def activeCount(self) -> int:
        """
        How many render processes are running.
        """
        return self._runner.activeCount()

    def queuedCount(self) -> int:
        return len(self._queue)

    def outputBytes(self) -> int:
        """
        The total size of the finished outputs on disk.
        """
        return self._disk.total()

    # -- the service ---------------------------------------------------

    def startService(self) -> None:
        # No render runs yet: any working directory is a dead one's.
        removeWorkDirs(self.outputDir)
        if self.webhooks is not None:
            self.webhooks.start()
        self._jobs.start()
        self._disk.evict(0)
        # Service.startService/stopService are unannotated, and
        # untyped_calls_exclude misses calls through super() (python/mypy#16653).
        super().startService()  # type: ignore[no-untyped-call]
        self._runner.start()

    def stopService(self) -> Deferred[None]:
        """
        Fail every queued render, stop every running one (TERM, then KILL
        after C{killGrace}), and fire once every process has exited. Each
        job publishes its terminal C{failed} event ("interrupted"), which
        ends its open streams with a final frame.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._jobs.stop()
        ended = self._runner.stop()

        def closeStore(result: object) -> Deferred[None]:
            # Every stream's final frame is written before the connections
            # are closed (the fan-out may be mid-pass).
            self.broker.flush()
            self.store.close()
            # Callbacks: no retry from now on; attempts in flight end.
            return self.webhooks.stop() if self.webhooks is not None else succeed(None)

        if not ended:
            return closeStore(None)
        return DeferredList(ended, consumeErrors=True).addCallback(closeStore)


def defaultOutputDir() -> Path:
    """
    A fresh private temporary directory, for when none is configured.
    """
    return Path(tempfile.mkdtemp(prefix="twistedsse-"))

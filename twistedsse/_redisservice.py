"""
L{RedisRenderService}: the jobs of a server in Redis mode (C{--redis}), as
one Twisted service: a web instance's side (L{RedisJobs}: create, cancel,
describe, stream, serve outputs), a worker's side (L{RedisWorker} claiming
renders for a L{RenderRunner} that records them through a
L{RedisLedger}), or both (C{--role all}), over connections it opens when
it starts and closes once it has stopped.

A web instance never runs a render, and stopping it never touches one. A
worker stops warmly: it claims nothing more, lets its renders finish for
C{drainTimeout} seconds, then hands the rest back to the queue for
another worker to run from the start.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._api import IRenderAPI
from ._asyncbroker import IAsyncJobBroker
from ._disk import OutputDisk
from ._errors import RedisUnavailable
from ._idempotency import Once
from ._interfaces import IRenderer
from ._job import JobSnapshot
from ._json import JSONObject
from ._metrics import RedisStats, RenderStats, ServiceMetrics, askedInReactor
from ._redis import RedisEndpoint, ready
from ._redisbroker import RedisBroker
from ._redisevents import RedisEventLog
from ._redisledger import RedisLedger
from ._redisqueue import QueueKeys, RedisJobQueue, RedisWorker
from ._redisreader import RedisEventReader
from ._redisrunner import ClaimedRenders
from ._redisstate import RedisJobState
from ._redisweb import RedisJobs
from ._runner import RenderRunner
from ._responses import respondError, respondJSON
from ._service import newJobID
from ._webhooks import Webhooks

_log = Logger()

#: The roles of C{--role}.
ROLES = ("web", "worker", "all")

#: Seconds between two passes deleting the outputs of expired jobs.
OUTPUT_SWEEP = 30.0


def workerName() -> str:
    """
    This worker's consumer name in the queue's group: unique per process
    (a restarted worker is a new consumer; the old one's claims are taken
    over).
    """
    return f"{socket.gethostname()}:{os.getpid()}"


@implementer(IRenderAPI)
class RedisRenderService(Service):
    """
    @param webhooks: sends ended jobs to their C{callback_url}s (the
        process whose write ended the job sends it); C{None}: none allowed.
    @param role: C{web}, C{worker} or C{all} (L{ROLES}).
    @param claimTimeout: seconds after which a worker's claim not renewed
        is taken over by another worker.
    @param maxAttempts: runs of one render, counting those whose worker
        died; past it, C{failed} ("worker_lost").
    @param drainTimeout: seconds a stopping worker lets its renders finish
        before handing them back.
    @param consumerName: the worker's name in the queue's consumer group
        (L{workerName}: host and pid).
    @param sweepInterval: seconds between two passes deleting the outputs
        of the jobs Redis has expired (a web instance's).
    The other parameters are L{twistedsse._service.RenderService}'s.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        spawner: IReactorProcess,
        endpoint: RedisEndpoint,
        role: str,
        renderers: Mapping[str, IRenderer],
        outputDir: Path,
        maxRenders: int = 2,
        renderTimeout: float = 3600.0,
        killGrace: float = 5.0,
        maxQueued: int = 0,
        expireAfter: float = 86400.0,
        maxOutputBytes: int | None = None,
        minFreeBytes: int = 0,
        statvfs: Callable[[str], Any] = os.statvfs,
        renderEnv: Mapping[str, str] | None = None,
        history: int = 1000,
        claimTimeout: float = 60.0,
        maxAttempts: int = 2,
        drainTimeout: float = 60.0,
        newID: Callable[[], str] = newJobID,
        consumerName: str | None = None,
        prefix: str = "twistedsse:",
        sweepInterval: float = OUTPUT_SWEEP,
        webhooks: Webhooks | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if maxRenders < 1:
            raise ValueError(f"maxRenders must be at least 1, got {maxRenders!r}")
        self.clock = clock
        self.spawner = spawner
        self.endpoint = endpoint
        self.role = role
        self.renderers = dict(renderers)
        self.maxRenders = maxRenders
        self.renderTimeout = renderTimeout
        self.killGrace = killGrace
        self.maxQueued = maxQueued
        self.expireAfter = expireAfter
        self.renderEnv = dict(renderEnv or {})
        self.history = history
        self.claimTimeout = claimTimeout
        self.maxAttempts = maxAttempts
        self.drainTimeout = drainTimeout
        self.newID = newID
        self.consumerName = consumerName or workerName()
        self.prefix = prefix
        self.sweepInterval = sweepInterval
        self.webhooks = webhooks
        self.disk = OutputDisk(Path(outputDir), maxRenders, maxOutputBytes or None, minFreeBytes, statvfs)
        self._connections: list[Any] = []
        self._web: RedisJobs | None = None
        self._broker: RedisBroker | None = None
        self._runner: RenderRunner | None = None
        self._worker: RedisWorker | None = None
        self._ledger: RedisLedger | None = None
        self._sweeper: LoopingCall | None = None
        self._command: Any = None
        self._events: RedisEventLog | None = None
        self.metrics = ServiceMetrics()
        self._redisStats = self.metrics.collector.redis = RedisStats()
        # Renders by outcome: a worker's runs, and the ones a web instance
        # ended before any worker took them (cancelled while queued).
        self._renderStats = self.metrics.collector.renders = RenderStats()
        if self.worker:
            self.metrics.collector.activeRenders = self.activeCount

    @property
    def web(self) -> bool:
        return self.role in ("web", "all")

    @property
    def worker(self) -> bool:
        return self.role in ("worker", "all")

    @property
    def outputDir(self) -> Path:
        return self.disk.directory

    # -- life ------------------------------------------------------------

    def _connect(self) -> Any:
        made = 0

        def connectionMade() -> None:
            nonlocal made
            made += 1
            if made > 1:
                self._redisStats.reconnects += 1

        connection = self.endpoint.connect(onConnectionMade=connectionMade)
        self._connections.append(connection)
        return connection

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # (see RenderService)
        self.disk.directory.mkdir(parents=True, exist_ok=True)
        if self.webhooks is not None:
            self.webhooks.start()
        command = self._command = self._connect()
        state = RedisJobState(command, self.clock, prefix=self.prefix, expireAfter=self.expireAfter)
        events = self._events = RedisEventLog(
            command, prefix=self.prefix, history=self.history, expireAfter=self.expireAfter, clock=self.clock
        )
        if self.web:
            reader = RedisEventReader(self._connect(), command, self.clock, prefix=self.prefix)
            self._broker = RedisBroker(state, events, reader, self.clock, history=self.history)
            self.metrics.collector.deliveries[:] = [self._broker.stats]
            self._broker.start()
            queue = RedisJobQueue(command, self.clock, keys=QueueKeys(self.prefix))
            # The whole cluster's queue, asked of Redis at each scrape.
            self.metrics.collector.queueDepth = askedInReactor(self.clock, queue.depth)
            self._web = RedisJobs(
                self.clock,
                self.renderers,
                state,
                queue,
                self._broker,
                self.disk,
                self.newID,
                maxQueued=self.maxQueued,
                maxRenders=self.maxRenders if self.worker else 0,
                running=self.activeCount,
                describe=self.endpoint.describe(),
                role=self.role,
                webhooks=self.webhooks,
                stats=self._renderStats,
            )
            if self.expireAfter > 0:
                self._sweeper = LoopingCall(self._sweep, state)
                self._sweeper.clock = self.clock
                self._sweeper.start(self.sweepInterval, now=False).addErrback(
                    lambda f: _log.failure("deleting expired outputs", f)
                )
        if self.worker:
            self._ledger = RedisLedger(
                state, events, self.clock, maxAttempts=self.maxAttempts, keep=self.history, webhooks=self.webhooks
            )
            claims = ClaimedRenders(self._ledger)
            self._runner = RenderRunner(
                self.clock,
                self.spawner,
                self.renderers,
                claims,
                self._ledger,
                self.disk,
                self.maxRenders,
                renderTimeout=self.renderTimeout,
                killGrace=self.killGrace,
                renderEnv=self.renderEnv,
                name=self.consumerName,
                stats=self._renderStats,
            )
            self._worker = claims.worker = RedisWorker(
                command,
                self._connect(),
                self.endpoint,
                self.clock,
                claims,
                name=self.consumerName,
                maxRenders=self.maxRenders,
                claimTimeout=self.claimTimeout,
                maxAttempts=self.maxAttempts,
                keys=QueueKeys(self.prefix),
                stats=self._redisStats,
            )
            self._runner.start()
            self._worker.start().addErrback(self._notSubscribed)
        _log.info(
            "Redis mode, role {role}, at {redis}{worker}",
            role=self.role,
            redis=self.endpoint.describe(),
            worker=f" (worker {self.consumerName}, {self.maxRenders} renders at once)" if self.worker else "",
        )

    def whenReady(self) -> Deferred[None]:
        """
        Fire once every connection this service opened answers (after it
        started): then it serves (L{ServerService} tells systemd so).
        Fails with C{TimeoutError} if one does not within
        L{CONNECT_TIMEOUT} seconds.
        """
        waits = [ready(connection, self.clock) for connection in self._connections]
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def _notSubscribed(self, failure: Failure) -> None:
        if failure.check(CancelledError) is None:
            # (Stopped before it was: nothing to say.)
            _log.warn("the cancel subscription is not active yet ({why}); trying on", why=failure.getErrorMessage())

    def stopService(self) -> Deferred[None]:
        """
        Stop claiming; let running renders finish for C{drainTimeout}, then
        hand the rest back (stopping their processes); stop reading; close
        the connections. Fires when all of it is done.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._worker is not None:
            try:
                handed = await self._worker.drain(self.drainTimeout)
            except Exception as e:
                _log.warn("worker {name}: draining failed ({e!r})", name=self.consumerName, e=e)
            else:
                if handed:
                    _log.info("worker {name}: handed back {count} render(s)", name=self.consumerName, count=len(handed))
        if self._runner is not None:
            # Every process still running was handed back (abandoned) or
            # could not be: stop each, and wait for it to exit.
            ended = self._runner.stop()
            if ended:
                await DeferredList(ended, consumeErrors=True)
        if self._ledger is not None:
            self._ledger.stop()
        if self._broker is not None:
            await self._broker.stop()
        if self._events is not None:
            self._events.stop()
        connections, self._connections = self._connections, []
        for connection in connections:
            try:
                await connection.disconnect()
            except Exception:
                pass
        if self.webhooks is not None:
            # No retry from now on; attempts in flight end (their timeout).
            await self.webhooks.stop()

    async def _sweep(self, state: RedisJobState) -> None:
        """
        Delete the outputs of jobs Redis has expired (each id is handed to
        one instance only).
        """
        try:
            while True:
                due = await state.dueOutputs()
                for jobID in due:
                    self.disk.delete(jobID)
                if len(due) < 100:
                    return
        except RedisUnavailable:
            return

    # -- what C{/healthz} counts ------------------------------------------

    def activeCount(self) -> int:
        return self._runner.activeCount() if self._runner is not None else 0

    def workerHealth(self) -> Deferred[JSONObject]:
        """
        A worker's C{/healthz}: its renders, and whether Redis answers.
        """
        def answer(connected: bool) -> JSONObject:
            return {
                "status": "ok" if connected else "degraded",
                "role": self.role,
                "worker": self.consumerName,
                "renders": {"running": self.activeCount(), "max": self.maxRenders},
                "redis": {"url": self.endpoint.describe(), "connected": connected},
            }

        if self._command is None:
            return succeed(answer(False))
        d: Deferred[Any] = self._command.execute_command("PING")
        d.addTimeout(1.0, self.clock)
        return d.addCallbacks(lambda _: True, lambda _: False).addCallback(answer)

    # -- IRenderAPI (a web instance) ------------------------------------

    def _jobs(self) -> RedisJobs:
        if self._web is None:
            raise RedisUnavailable("the service is not running", retryAfter=5)
        return self._web

    @property
    def streams(self) -> IAsyncJobBroker:
        return self._jobs().broker

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
        return self._jobs().submit(renderer, params, outputURL, jobID, callbackURL, once)

    def get(self, jobID: str) -> Deferred[JobSnapshot]:
        return self._jobs().get(jobID)

    def cancel(self, jobID: str) -> Deferred[JobSnapshot]:
        return self._jobs().cancel(jobID)

    def outputPath(self, jobID: str) -> Deferred[Path]:
        return self._jobs().outputPath(jobID)

    def health(self) -> Deferred[JSONObject]:
        return self._jobs().health()


class WorkerResource(Resource):
    """
    What a worker (C{--role worker}) serves: C{GET /healthz} (its renders,
    and whether Redis answers), C{GET /metrics} (unless a
    C{--metrics-listen} endpoint serves them), and a JSON 404 for anything
    else. It holds no jobs' API: the web instances do.
    """

    isLeaf = True

    def __init__(self, service: RedisRenderService, serveMetrics: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (see RenderService)
        self._service = service
        self._serveMetrics = serveMetrics

    def render(self, request: IRequest) -> bytes | int:
        if request.path == b"/metrics" and self._serveMetrics and request.method in (b"GET", b"HEAD"):
            # (As open as /healthz: counts, no job's data.)
            metrics: bytes | int = self._service.metrics.resource().render(request)
            return metrics
        if request.path != b"/healthz":
            return respondError(request, 404, "not_found", "a worker serves /healthz and /metrics only")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return respondError(request, 405, "method_not_allowed", "use GET")
        gone: list[object] = []
        cast(Request, request).notifyFinish().addBoth(gone.append)

        def answer(health: JSONObject) -> None:
            if not gone:
                request.write(respondJSON(request, 200, health))
                request.finish()

        self._service.workerHealth().addCallback(answer).addErrback(
            lambda f: _log.failure("worker health", f)
        )
        return NOT_DONE_YET

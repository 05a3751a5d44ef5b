"""
The Redis job queue (L{twistedsse._redisqueue}) against a real
redis-server: claims, withdrawals, cancels, take-overs from dead workers,
warm shutdown and a Redis restart.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests._support.redis import RedisServer
from tests._support.waiting import whenTrue
from twistedsse._interfaces import QueuedRender
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisqueue import IClaimConsumer, QueueKeys, RedisJobQueue, RedisWorker

#: Small real timeouts: Redis measures idle time itself.
CLAIM_TIMEOUT = 0.3


@implementer(IClaimConsumer)
class Renders:
    """
    Records what a worker asks of its consumer; renders "run" until the
    test calls the worker's C{finished}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.running: set[str] = set()
        self.worker: RedisWorker | None = None
        self.finishOnCancel = True

    def of(self, kind: str) -> list[str]:
        return [jobID for k, jobID, _ in self.calls if k == kind]

    def start(self, render: QueuedRender, attempt: int) -> None:
        self.calls.append(("start", render.jobID, attempt))
        self.running.add(render.jobID)

    def cancel(self, jobID: str) -> None:
        self.calls.append(("cancel", jobID, 0))
        if self.finishOnCancel and self.worker is not None:
            self.running.discard(jobID)
            self.worker.finished(jobID)

    def cancelledBeforeStart(self, render: QueuedRender) -> None:
        self.calls.append(("cancelledBeforeStart", render.jobID, 0))

    def lost(self, render: QueuedRender, attempts: int) -> None:
        self.calls.append(("lost", render.jobID, attempts))

    def abandon(self, jobID: str) -> None:
        self.calls.append(("abandon", jobID, 0))
        self.running.discard(jobID)


class QueueTests(TestCase):
    timeout = 60

    appendOnly = False

    def setUp(self) -> Deferred[None]:
        self.server = RedisServer(appendOnly=self.appendOnly)
        self.addCleanup(self.server.stop)
        self.endpoint = RedisEndpoint.fromURL(self.server.url)
        self.connection = self.connect()
        self.queue = RedisJobQueue(self.connection, reactor)
        return ready(self.connection, reactor)

    def connect(self) -> Any:
        connection = self.endpoint.connect()
        self.addCleanup(connection.disconnect)
        return connection

    @inlineCallbacks
    def worker(self, name: str, maxRenders: int = 2, maxAttempts: int = 2, **kw: Any) -> Any:
        renders = Renders()
        worker = RedisWorker(
            self.connect(), self.connect(), self.endpoint, reactor, renders, name=name, maxRenders=maxRenders,
            claimTimeout=CLAIM_TIMEOUT, maxAttempts=maxAttempts, block=0.2, **kw,
        )  # fmt: skip
        renders.worker = worker
        self.addCleanup(worker.stop)
        yield worker.start()
        return worker, renders

    def enqueueAll(self, count: int, prefix: str = "job") -> Deferred[Any]:
        return gatherResults([self.queue.enqueue(QueuedRender(f"{prefix}{i}", f"/o/{i}")) for i in range(count)])

    def redis(self, *args: object) -> Deferred[Any]:
        d: Deferred[Any] = self.connection.execute_command(*args)
        return d

    @inlineCallbacks
    def test_claimedOnceAcrossWorkers(self) -> Any:
        """
        Two workers competing for 20 renders: each render starts exactly
        once, on one of them (attempt 1), with its output URL; finished
        renders are acknowledged and deleted: the queue ends empty.
        """
        (a, ra), (b, rb) = yield gatherResults([self.worker("a", 3), self.worker("b", 3)])
        verifyObject(IClaimConsumer, ra)
        yield self.enqueueAll(20)
        # Claimed on the server before the workers read the replies.
        self.assertLessEqual((yield self.queue.depth()), 20)

        def finishSome() -> bool:
            for worker, renders in ((a, ra), (b, rb)):
                for jobID in list(renders.running):
                    renders.running.discard(jobID)
                    worker.finished(jobID)
            return len(ra.of("start")) + len(rb.of("start")) == 20

        yield whenTrue(reactor, finishSome, 15, "20 renders started")
        yield whenTrue(reactor, lambda: not a._unacked and not b._unacked, 5, "acknowledged")
        started = ra.of("start") + rb.of("start")
        self.assertEqual(sorted(started), sorted(f"job{i}" for i in range(20)))
        self.assertTrue(ra.of("start") and rb.of("start"), "both workers took some")
        self.assertEqual({attempt for _, _, attempt in ra.calls + rb.calls}, {1})
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)
        self.assertEqual((yield self.redis("HLEN", "twistedsse:queued")), 0)
        self.assertEqual((yield self.queue.depth()), 0)

    @inlineCallbacks
    def test_outputURL(self) -> Any:
        """
        The worker gets the render as queued: its output URL, or none.
        """
        worker, renders = yield self.worker("a")
        starts: list[QueuedRender] = []
        renders.start = lambda render, attempt: starts.append(render)  # type: ignore[method-assign]
        yield self.queue.enqueue(QueuedRender("with", "/outputs/with.mp4"))
        yield self.queue.enqueue(QueuedRender("without"))
        yield whenTrue(reactor, lambda: len(starts) == 2, 5, "two starts")
        self.assertEqual(starts, [QueuedRender("with", "/outputs/with.mp4"), QueuedRender("without")])

    @inlineCallbacks
    def test_withdrawBeforeClaim(self) -> Any:
        """
        A render withdrawn before any worker claimed it is never started;
        withdrawing it again says so again; an unknown job is not withdrawn.
        """
        yield self.enqueueAll(3)
        self.assertEqual((yield self.queue.depth()), 3)
        self.assertTrue((yield self.queue.withdraw("job1")))
        self.assertTrue((yield self.queue.withdraw("job1")))
        self.assertFalse((yield self.queue.withdraw("nosuchjob")))
        self.assertEqual((yield self.queue.depth()), 2)
        worker, renders = yield self.worker("a", 5)
        yield whenTrue(reactor, lambda: len(renders.of("start")) == 2, 5, "two starts")
        self.assertEqual(renders.of("start"), ["job0", "job2"])
        self.assertFalse((yield self.queue.withdraw("job0")), "claimed: not withdrawn")

    @inlineCallbacks
    def test_withdrawClaimRace(self) -> Any:
        """
        Withdraw and claim sent at the same moment, 200 times in both
        orders: each render either is withdrawn and never started, or is
        started and then cancelled (withdraw False, then cancelRunning);
        never both, never neither. A render withdrawn before any worker
        read it never starts.
        """
        worker, renders = yield self.worker("a", maxRenders=1000)
        outcomes = {"withdrawn": 0, "cancelled": 0}
        for i in range(200):
            jobID = f"race{i}"
            if i % 2:
                enqueued = self.queue.enqueue(QueuedRender(jobID))
                yield enqueued
                withdrawn = yield self.queue.withdraw(jobID)
            else:
                # Enqueue and withdraw pipelined: the worker's blocked read
                # and the withdraw compete for the new entry.
                enqueued = self.queue.enqueue(QueuedRender(jobID))
                withdrawing = self.queue.withdraw(jobID)
                yield enqueued
                withdrawn = yield withdrawing
            if withdrawn:
                outcomes["withdrawn"] += 1
            else:
                yield self.queue.cancelRunning(jobID)
                outcomes["cancelled"] += 1
        yield whenTrue(
            reactor, lambda: len(renders.of("cancel")) + len(renders.of("cancelledBeforeStart")) == outcomes["cancelled"],
            10, lambda: f"every cancel delivered: {outcomes}, {len(renders.calls)} calls",
        )  # fmt: skip
        yield whenTrue(reactor, lambda: not worker._unacked, 5, "acknowledged")
        startedOrDropped = set(renders.of("start")) | set(renders.of("cancelledBeforeStart"))
        self.assertEqual(len(startedOrDropped), outcomes["cancelled"])
        self.assertEqual(set(renders.of("cancel")), set(renders.of("start")))
        self.assertEqual(renders.running, set())
        # Withdrawn ones never reached the worker.
        self.assertEqual(len(startedOrDropped) + outcomes["withdrawn"], 200)
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)
        self.assertEqual((yield self.redis("HLEN", "twistedsse:queued")), 0)
        self.assertNotEqual(outcomes["cancelled"], 0, outcomes)
        # (Which side wins the race depends on whether the worker is blocked
        # in XREADGROUP when the entry lands: a worker that parses and
        # writes without waiting a reactor turn nearly always is. Withdrawn
        # before any claim, with no worker reading:)
        yield worker.stop()
        for i in range(10):
            yield self.queue.enqueue(QueuedRender(f"late{i}"))
            self.assertTrue((yield self.queue.withdraw(f"late{i}")))
        self.assertEqual([c for c in renders.calls if c[1].startswith("late")], [])
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)

    @inlineCallbacks
    def test_cancelRunningReachesHolder(self) -> Any:
        """
        cancelRunning through another connection (another instance) reaches
        the worker that holds the render, and only that one; the cancel
        mark is gone once it is acknowledged.
        """
        (a, ra), (b, rb) = yield gatherResults([self.worker("a", 1), self.worker("b", 1)])
        yield self.enqueueAll(2)
        yield whenTrue(reactor, lambda: len(ra.of("start")) == len(rb.of("start")) == 1, 5, "one start each")
        other = RedisJobQueue(self.connect(), reactor)
        holder = ra.of("start")[0]
        self.assertFalse((yield other.withdraw(holder)))
        self.assertEqual((yield other.cancelRunning(holder)), 2, "both workers subscribed")
        yield whenTrue(reactor, lambda: ra.of("cancel") == [holder], 5, "cancel on a")
        self.assertEqual(rb.of("cancel"), [])
        yield whenTrue(reactor, lambda: not a._unacked, 5, "acknowledged")
        self.assertEqual((yield self.redis("EXISTS", f"twistedsse:cancel:{holder}")), 0)

    @inlineCallbacks
    def test_cancelMessageMissed(self) -> Any:
        """
        A cancel whose message the worker missed (published before it
        subscribed) still reaches it: its renewal finds the mark.
        """
        worker, renders = yield self.worker("a", 1)
        yield self.enqueueAll(1)
        yield whenTrue(reactor, lambda: renders.of("start") == ["job0"], 5, "start")
        yield self.redis("SET", "twistedsse:cancel:job0", "running")
        yield whenTrue(reactor, lambda: renders.of("cancel") == ["job0"], 5, "cancel by renewal")

    @inlineCallbacks
    def test_deadWorkerReclaimed(self) -> Any:
        """
        A worker that stops renewing (its loop stopped, nothing
        acknowledged) loses its render to the other after claimTimeout:
        attempt 2. The other worker keeps it (renewing) past claimTimeout.
        """
        dead, rdead = yield self.worker("dead", 1)
        yield self.enqueueAll(1)
        yield whenTrue(reactor, lambda: rdead.of("start") == ["job0"], 5, "first start")
        yield dead.stop()
        alive, ralive = yield self.worker("alive", 1)
        yield whenTrue(reactor, lambda: ralive.calls, 5, "reclaimed")
        self.assertEqual(ralive.calls, [("start", "job0", 2)])
        # Renewed: nobody takes it again, and it is still the alive worker's.
        yield deferLater(reactor, CLAIM_TIMEOUT * 3, lambda: None)
        self.assertEqual(ralive.calls, [("start", "job0", 2)])
        pending = yield self.redis("XPENDING", "twistedsse:queue", "workers", "-", "+", 10)
        self.assertEqual([(p[1], p[3]) for p in pending], [("alive", 2)])
        self.assertTrue((yield alive.finished("job0")))
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)

    @inlineCallbacks
    def test_ownIdleClaimGivenUp(self) -> Any:
        """
        A worker whose renewals stalled (as through a Redis outage) gives
        its render up once the claim has gone unrenewed for 2/3 of
        claimTimeout, before another worker could take it over; the
        render, still pending, is then taken over as a new attempt (here
        by the same worker, the only one): one run at a time.
        """
        worker, renders = yield self.worker("a", 2)
        yield self.enqueueAll(1)
        yield whenTrue(reactor, lambda: renders.of("start") == ["job0"], 5, "start")
        worker._renewer.stop()
        yield whenTrue(reactor, lambda: renders.of("abandon") == ["job0"], 5, "given up")
        worker._renewer.start(worker.reclaimInterval, now=False)
        yield whenTrue(reactor, lambda: len(renders.of("start")) == 2, 5, "taken over")
        self.assertEqual(renders.calls, [("start", "job0", 1), ("abandon", "job0", 0), ("start", "job0", 2)])

    @inlineCallbacks
    def test_lostAfterMaxAttempts(self) -> Any:
        """
        Past maxAttempts (2) deaths, the render is reported lost with its
        attempts, acknowledged and never started again.
        """
        for name in ("one", "two"):
            dead, rdead = yield self.worker(name, 1)
            if name == "one":
                yield self.enqueueAll(1)
            yield whenTrue(reactor, lambda: rdead.of("start") == ["job0"], 5, f"start on {name}")
            yield dead.stop()
        third, rthird = yield self.worker("three", 1)
        yield whenTrue(reactor, lambda: rthird.calls, 5, "lost")
        self.assertEqual(rthird.calls, [("lost", "job0", 2)])
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)
        self.assertEqual((yield self.redis("HLEN", "twistedsse:queued")), 0)

    @inlineCallbacks
    def test_cancelledWhileHolderDead(self) -> Any:
        """
        A render cancelled while the worker holding it is dead is never
        started again: the reclaiming worker drops it.
        """
        dead, rdead = yield self.worker("dead", 1)
        yield self.enqueueAll(1)
        yield whenTrue(reactor, lambda: rdead.of("start") == ["job0"], 5, "first start")
        yield dead.stop()
        self.assertFalse((yield self.queue.withdraw("job0")))
        yield self.queue.cancelRunning("job0")
        alive, ralive = yield self.worker("alive", 1)
        yield whenTrue(reactor, lambda: ralive.calls, 5, "reclaimed")
        self.assertEqual(ralive.calls, [("cancelledBeforeStart", "job0", 0)])
        self.assertEqual((yield self.redis("XLEN", "twistedsse:queue")), 0)

    @inlineCallbacks
    def test_drainHandsBack(self) -> Any:
        """
        A warm shutdown lets a render that finishes in time be acknowledged,
        hands back the one that does not (abandoned, not failed), claims
        nothing new; another worker takes the handed-back one at once with
        the same attempt number, before the render queued meanwhile.
        """
        a, ra = yield self.worker("a", 2)
        yield self.enqueueAll(2)
        yield whenTrue(reactor, lambda: len(ra.of("start")) == 2, 5, "two starts")
        reactor.callLater(0.1, a.finished, "job0")
        draining = a.drain(0.5)
        yield self.queue.enqueue(QueuedRender("later"))
        handed = yield draining
        self.assertEqual(handed, ["job1"])
        self.assertEqual(ra.of("abandon"), ["job1"])
        self.assertEqual(ra.of("start"), ["job0", "job1"])
        b, rb = yield self.worker("b", 1)
        yield whenTrue(reactor, lambda: rb.calls, 5, "b takes over")
        self.assertEqual(rb.calls, [("start", "job1", 1)])
        b.finished("job1")
        yield whenTrue(reactor, lambda: len(rb.calls) == 2, 5, "b takes the later one")
        self.assertEqual(rb.calls[1], ("start", "later", 1))

    @inlineCallbacks
    def test_stopLeavesNothing(self) -> Any:
        """
        stop() fires with the loop, the renewals and the subscription
        stopped (trial fails a test that leaves timers or connections), and
        is idempotent; a render claimed while stopping is handed back.
        """
        worker, renders = yield self.worker("a", 1)
        yield self.enqueueAll(1)
        yield whenTrue(reactor, lambda: renders.of("start"), 5, "start")
        yield gatherResults([worker.stop(), worker.stop()])
        self.assertFalse(worker._renewer.running)
        self.assertEqual(worker._waiters, [])


class RedisRestartTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def started(self, claimTimeout: float, timeout: float) -> Any:
        """
        A queue and a started worker (one slot) on a Redis with AOF, for
        restarting: (server, queue, worker, renders).
        """
        server = RedisServer(appendOnly=True)
        self.addCleanup(server.stop)
        endpoint = RedisEndpoint.fromURL(server.url)
        connections = [endpoint.connect() for _ in range(3)]
        for c in connections:
            self.addCleanup(c.disconnect)
        yield ready(connections[0], reactor)
        queue = RedisJobQueue(connections[0], reactor, timeout=timeout)
        renders = Renders()
        worker = RedisWorker(
            connections[1], connections[2], endpoint, reactor, renders, name="w", maxRenders=1,
            claimTimeout=claimTimeout, block=0.2, timeout=timeout,
        )  # fmt: skip
        renders.worker = worker
        self.addCleanup(worker.stop)
        yield worker.start()
        return server, queue, worker, renders

    @inlineCallbacks
    def test_loopSurvivesRestart(self) -> Any:
        """
        Redis restarted under a running worker: its loop backs off and
        resumes (no crash, no spin); with AOF, a render queued before the
        restart is still there and starts; the held render's claim is kept.
        """
        # (A claim timeout well above the outage: the claim outlives it.)
        server, queue, worker, renders = yield self.started(claimTimeout=30, timeout=1.0)
        yield queue.enqueue(QueuedRender("first"))
        yield queue.enqueue(QueuedRender("second"))
        yield whenTrue(reactor, lambda: renders.of("start") == ["first"], 5, "first start")
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        server.stop(remove=False)
        yield self.assertFailure(queue.depth(), Exception)
        server.start()
        worker.finished("first")
        yield whenTrue(reactor, lambda: renders.of("start") == ["first", "second"], 30, "second after restart")
        self.assertEqual(renders.calls, [("start", "first", 1), ("start", "second", 1)])
        yield whenTrue(reactor, lambda: not worker._unacked, 10, "first acknowledged")
        self.assertEqual((yield queue.depth()), 0)
        # The outage is logged once (not once per retry), and its end once.
        # (It may not be seen at all: a command queued on a reconnecting
        # connection can simply wait for Redis to return.)
        down = len([m for m in logged if "Redis queue unavailable" in m])
        up = len([m for m in logged if "Redis queue available again" in m])
        self.assertIn(down, (0, 1), logged)
        self.assertEqual(up, down, logged)


    @inlineCallbacks
    def test_leaseExpiresInAnOutage(self) -> Any:
        """
        Cut off from Redis for longer than 2/3 of its claim timeout, a
        worker gives its render up (abandon: stop it, record nothing)
        before Redis could let another worker take it over; once Redis is
        back the render, still pending, is taken over and run again
        (attempt 2): never two runs at once.
        """
        claimTimeout = 1.5
        server, queue, worker, renders = yield self.started(claimTimeout=claimTimeout, timeout=0.5)
        yield queue.enqueue(QueuedRender("job"))
        yield whenTrue(reactor, lambda: renders.of("start") == ["job"], 5, "start")
        server.stop(remove=False)
        stopped = reactor.seconds()
        yield whenTrue(reactor, lambda: renders.of("abandon") == ["job"], 10, "abandon")
        self.assertLess(reactor.seconds() - stopped, claimTimeout, "given up before a takeover was possible")
        self.assertEqual(worker.held(), [])
        server.start()
        yield whenTrue(reactor, lambda: len(renders.of("start")) == 2, 20, "the render taken over")
        self.assertEqual(renders.calls, [("start", "job", 1), ("abandon", "job", 0), ("start", "job", 2)])


class KeysTests(TestCase):
    def test_prefix(self) -> None:
        """
        Every key and the channel are under the prefix.
        """
        keys = QueueKeys("app:")
        self.assertEqual(
            (keys.queue, keys.queued, keys.channel, keys.cancel("j")),
            ("app:queue", "app:queued", "app:cancel", "app:cancel:j"),
        )


class PasswordTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_cancelSubscriptionAuthenticates(self) -> Any:
        """
        With C{requirepass}, the worker's own cancel subscription logs in
        with the password from the file, as its other connections do.
        """
        server = RedisServer(password="pw")
        self.addCleanup(server.stop)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("pw\n")
        endpoint = RedisEndpoint.fromURL(server.url, path)
        connections = [endpoint.connect() for _ in range(3)]
        for c in connections:
            self.addCleanup(c.disconnect)
        renders = Renders()
        worker = RedisWorker(connections[1], connections[2], endpoint, reactor, renders, name="w", maxRenders=1, block=0.2)
        renders.worker = worker
        self.addCleanup(worker.stop)
        yield worker.start()
        queue = RedisJobQueue(connections[0], reactor)
        yield queue.enqueue(QueuedRender("j"))
        yield whenTrue(reactor, lambda: renders.of("start") == ["j"], 5, "start")
        self.assertEqual((yield queue.cancelRunning("j")), 1)
        yield whenTrue(reactor, lambda: renders.of("cancel") == ["j"], 5, "cancel")

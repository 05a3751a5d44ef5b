"""
L{RedisRenderService} in this process, on the real reactor, against a real
redis-server: web and worker sides together and apart, cancels, limits,
Redis going away, and nothing left running after a stop. (Several
processes, SIGKILL and nginx: tests/redis/test_cluster.py.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from tests._support.fixtures import Recorder
from tests._support.redis import RedisServer, startedService
from tests._support.waiting import whenTrue
from twistedsse import RedisUnavailable
from twistedsse._build import buildResource, buildService
from twistedsse._command import CommandRenderer
from twistedsse._errors import JobFinished, QueueFull
from twistedsse._frames import TERMINAL_EVENTS
from twistedsse._job import JobState
from twistedsse._redis import RedisEndpoint
from twistedsse._redisservice import RedisRenderService, WorkerResource

TICKER = str(Path(__file__).parent.parent / "integration" / "ticker.py")


def ticks() -> CommandRenderer:
    return CommandRenderer("ticks", [sys.executable, TICKER])


class RedisServiceTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)
        self.output = Path(self.mktemp())

    def service(self, role: str = "all", **options: Any) -> RedisRenderService:
        return startedService(self, self.server, self.output, role, [ticks()], **options)

    @inlineCallbacks
    def watch(self, service: RedisRenderService, jobID: str, timeout: float = 20) -> Any:
        recorder = Recorder()
        unsubscribe = yield service.streams.subscribe(jobID, None, recorder)
        self.addCleanup(unsubscribe)
        yield whenTrue(
            reactor,
            lambda: any(event.event in TERMINAL_EVENTS for event, _ in recorder.got),
            timeout,
            lambda: f"a terminal event; got {[e.event for e, _ in recorder.got]}",
        )
        return recorder

    @inlineCallbacks
    def test_oneProcessRunsAndStreams(self) -> Any:
        """
        C{--role all}: a render submitted is claimed, run and streamed;
        its events are numbered C{0-1}, C{0-2}... in order, it ends
        C{succeeded} in Redis, and C{/healthz} counts it.
        """
        service = self.service()
        snapshot = yield service.submit("ticks", {"count": 5, "interval": 0.01}, "/out", service.newJobID())
        self.assertIs(snapshot.state, JobState.QUEUED)
        recorder = yield self.watch(service, snapshot.id)
        names = [event.event for event, _ in recorder.got]
        self.assertEqual(names, ["progress"] * 5 + ["complete"])
        self.assertEqual(recorder.ids, [f"0-{n}" for n in range(1, 7)])
        self.assertEqual([json.loads(e.data)["i"] for e, _ in recorder.got[:5]], [1, 2, 3, 4, 5])
        final = yield service.get(snapshot.id)
        self.assertIs(final.state, JobState.SUCCEEDED)
        self.assertEqual(final.progress["i"], 5)  # type: ignore[index]
        health = yield service.health()
        self.assertEqual(health["role"], "all")
        self.assertEqual(health["renders"], {"running": 0, "queued": 0, "max": 2})
        self.assertEqual(health["redis"], {"url": self.server.url, "connected": True})

    @inlineCallbacks
    def test_webRoleRunsNothingAndCancelsQueued(self) -> Any:
        """
        C{--role web} never runs a render: it waits queued, and a cancel
        withdraws it (C{cancelled} at once, never started). A second
        cancel is C{JobFinished}.
        """
        service = self.service("web")
        snapshot = yield service.submit("ticks", {"count": 3}, None, service.newJobID())
        health = yield service.health()
        self.assertEqual(health["renders"], {"running": 0, "queued": 1, "max": 0})
        cancelled = yield service.cancel(snapshot.id)
        self.assertIs(cancelled.state, JobState.CANCELLED)
        self.assertIsNone(cancelled.startedAt)
        recorder = yield self.watch(service, snapshot.id)
        self.assertEqual([e.event for e, _ in recorder.got], ["cancelled"])
        self.assertEqual(json.loads(recorder.got[0][0].data), {"message": "cancelled before it started"})
        yield self.assertFailure(service.cancel(snapshot.id), JobFinished)
        health = yield service.health()
        self.assertEqual(health["renders"]["queued"], 0)

    @inlineCallbacks
    def test_cancelRunningReachesTheWorker(self) -> Any:
        """
        A cancel through a web instance of a render a worker (another
        service here) runs: the worker stops it and publishes
        C{cancelled}.
        """
        web = self.service("web")
        worker = self.service("worker")
        snapshot = yield web.submit("ticks", {"count": 1000, "interval": 0.02}, None, web.newJobID())
        yield whenTrue(reactor, lambda: worker.activeCount() == 1, 10, "the worker to start it")
        recorder = Recorder()
        yield web.streams.subscribe(snapshot.id, None, recorder)
        yield whenTrue(reactor, lambda: len(recorder.got) >= 2, 10, "progress")
        yield web.cancel(snapshot.id)
        yield whenTrue(reactor, lambda: recorder.got[-1][0].event == "cancelled", 10, "cancelled")
        self.assertEqual(json.loads(recorder.got[-1][0].data), {"message": "cancelled by request"})
        yield whenTrue(reactor, lambda: worker.activeCount() == 0, 10, "the worker to let go")
        final = yield web.get(snapshot.id)
        self.assertIs(final.state, JobState.CANCELLED)

    @inlineCallbacks
    def test_queueLimitOverEveryInstance(self) -> Any:
        """
        C{maxQueued} counts the renders waiting in Redis, whichever
        instance queued them: past it, L{QueueFull}.
        """
        first = self.service("web", maxQueued=2)
        second = self.service("web", maxQueued=2)
        yield first.submit("ticks", {}, None, first.newJobID())
        yield second.submit("ticks", {}, None, second.newJobID())
        yield self.assertFailure(first.submit("ticks", {}, None, first.newJobID()), QueueFull)

    @inlineCallbacks
    def test_redisDownIs503(self) -> Any:
        """
        With Redis gone, what needs it fails L{RedisUnavailable} (503,
        C{Retry-After}) within a bounded time, nothing crashes, and
        C{/healthz} says C{degraded}; when Redis returns, requests work
        again, with the state Redis kept (AOF).
        """
        self.server.stop()
        self.server = RedisServer(appendOnly=True)
        self.addCleanup(self.server.stop)
        service = self.service("web")
        snapshot = yield service.submit("ticks", {}, None, service.newJobID())
        self.server.stop(remove=False)
        started = reactor.seconds()
        error = yield self.assertFailure(service.get(snapshot.id), RedisUnavailable)
        self.assertEqual(error.status, 503)
        yield self.assertFailure(service.submit("ticks", {}, None, service.newJobID()), RedisUnavailable)
        self.assertLess(reactor.seconds() - started, 15)
        health = yield service.health()
        self.assertEqual(health["status"], "degraded")
        self.assertFalse(health["redis"]["connected"])
        self.server.start()
        # (txredisapi reconnects with a backoff of up to 10 s, its default.)
        deadline = reactor.seconds() + 30
        while not (yield service.health())["redis"]["connected"]:
            self.assertLess(reactor.seconds(), deadline, "Redis answers again")
            yield deferLater(reactor, 0.1, lambda: None)
        again = yield service.get(snapshot.id)
        self.assertIs(again.state, JobState.QUEUED)

    @inlineCallbacks
    def test_expiry(self) -> Any:
        """
        C{expireAfter} after a render ends, Redis expires the job (its id
        then answers L{JobExpired}) and a web instance deletes its output
        file from the shared directory.
        """
        from twistedsse._errors import JobExpired

        service = buildService(
            reactor, renderers=[ticks()], outputDir=self.output, redis=RedisEndpoint.fromURL(self.server.url),
            minFreeBytes=0, expireAfter=1.0,
        )  # fmt: skip
        assert isinstance(service, RedisRenderService)
        service.sweepInterval = 0.1
        service.startService()
        self.addCleanup(service.stopService)
        snapshot = yield service.submit("ticks", {"count": 2, "interval": 0.01, "output": "bytes"}, "/o", "expiring")
        yield self.watch(service, snapshot.id)
        path = yield service.outputPath(snapshot.id)
        self.assertEqual(path.read_bytes(), b"bytes")
        yield whenTrue(reactor, lambda: not path.exists(), 10, "the output deleted")
        yield self.assertFailure(service.get(snapshot.id), JobExpired)

    @inlineCallbacks
    def test_workerServesHealthOnly(self) -> Any:
        """
        A worker's HTTP face: C{/healthz} (its renders and Redis), a JSON
        404 for anything else.
        """
        worker = self.service("worker", maxRenders=3)
        resource = buildResource(worker, reactor)
        self.assertIsInstance(resource, WorkerResource)
        request = DummyRequest([b"healthz"])
        request.path = b"/healthz"
        finished = request.notifyFinish()
        resource.render(request)
        yield finished
        body = json.loads(b"".join(request.written))
        self.assertEqual(body["role"], "worker")
        self.assertEqual(body["renders"], {"running": 0, "max": 3})
        self.assertTrue(body["redis"]["connected"])
        other = DummyRequest([b"renders"])
        other.path = b"/renders"
        body = resource.render(other)
        self.assertEqual(other.responseCode, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
        Site(resource)  # (buildSite serves it as it serves the app)

    @inlineCallbacks
    def test_stopLeavesNothingRunning(self) -> Any:
        """
        A worker stopped mid-render with no drain time hands the render
        back: its process is stopped, nothing is recorded, and another
        worker runs it from the start (C{retrying}, C{handed_back}), to
        C{complete}.
        """
        web = self.service("web")
        first = self.service("worker", drainTimeout=0)
        snapshot = yield web.submit("ticks", {"count": 60, "interval": 0.02}, None, web.newJobID())
        recorder = Recorder()
        yield web.streams.subscribe(snapshot.id, None, recorder)
        yield whenTrue(reactor, lambda: len(recorder.got) >= 3, 10, "progress")
        yield first.stopService()
        self.assertEqual(first.activeCount(), 0)
        self.assertEqual((yield web.get(snapshot.id)).state, JobState.RUNNING)
        self.service("worker")
        yield whenTrue(reactor, lambda: recorder.got[-1][0].event == "complete", 20, "complete")
        names = [event.event for event, _ in recorder.got]
        retry = names.index("retrying")
        self.assertEqual(json.loads(recorder.got[retry][0].data)["reason"], "handed_back")
        self.assertEqual(json.loads(recorder.got[retry + 1][0].data)["i"], 1)
        self.assertEqual(names[retry + 1 :], ["progress"] * 60 + ["complete"])

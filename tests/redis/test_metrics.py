"""
Redis mode's metrics against a real redis-server: a worker's claims and
renders, a web instance's deliveries, reconnects after Redis comes back,
and a worker's C{/metrics} over a real socket.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import treq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from tests._support.fixtures import Recorder
from tests.redis.test_queue import CLAIM_TIMEOUT, Renders
from tests._support.redis import RedisServer, startedService
from tests._support.waiting import whenTrue
from twistedsse._build import buildResource
from twistedsse._command import CommandRenderer
from twistedsse._frames import TERMINAL_EVENTS
from twistedsse._interfaces import QueuedRender
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisqueue import RedisJobQueue, RedisWorker
from twistedsse._redisservice import RedisRenderService

TICKER = str(Path(__file__).parent.parent / "integration" / "ticker.py")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(service: RedisRenderService) -> Samples:
    return parse(generate_latest(service.metrics.registry).decode("utf-8"))


class RedisMetricsTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer(appendOnly=True)
        self.addCleanup(self.server.stop)
        self.output = Path(self.mktemp())

    def service(self, role: str) -> RedisRenderService:
        return startedService(self, self.server, self.output, role, [CommandRenderer("ticks", [sys.executable, TICKER])])

    @inlineCallbacks
    def test_webAndWorkerCounts(self) -> Any:
        """
        A render submitted on a web instance and run by a worker: the
        worker counts one claim and the render by renderer and outcome
        (and serves them at C{/metrics} over a real socket); the web
        instance counts the events it gave its subscriber.
        """
        web = self.service("web")
        worker = self.service("worker")
        snapshot = yield web.submit("ticks", {"count": 5, "interval": 0.01}, None, web.newJobID())
        recorder = Recorder()
        unsubscribe = yield web.streams.subscribe(snapshot.id, None, recorder)
        self.addCleanup(unsubscribe)
        yield whenTrue(reactor, lambda: any(e.event in TERMINAL_EVENTS for e, _ in recorder.got), 20, "the end")
        yield whenTrue(
            reactor, lambda: scrape(worker).get(("twistedsse_renders_total", (("outcome", "succeeded"), ("renderer", "ticks")))),
            10, "the render counted",
        )  # fmt: skip
        found = scrape(worker)
        self.assertEqual(found[("twistedsse_redis_claims_total", ())], 1)
        self.assertEqual(found[("twistedsse_redis_reclaims_total", ())], 0)
        self.assertEqual(found[("twistedsse_render_duration_seconds_count", (("renderer", "ticks"),))], 1)
        self.assertNotIn(("twistedsse_events_delivered_total", ()), found)
        seen = scrape(web)
        self.assertEqual(seen[("twistedsse_events_published_total", ())], 6)
        self.assertEqual(seen[("twistedsse_events_delivered_total", ())], 6)
        self.assertEqual(seen[("twistedsse_redis_claims_total", ())], 0)
        self.assertEqual(seen[("twistedsse_delivery_lag_seconds_count", ())], 6)

        site = Site(buildResource(worker, reactor))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port.getHost().port}/metrics", pool=pool)
        body = yield treq.text_content(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(parse(body)[("twistedsse_redis_claims_total", ())], 1)

    @inlineCallbacks
    def test_queueDepthOfTheCluster(self) -> Any:
        """
        A web instance's C{twistedsse_queue_depth} is the whole cluster's
        queue, asked of Redis at each scrape over a real socket (the scrape
        runs in the reactor's thread pool): renders queued through another
        instance count. Scraped in the reactor thread (which must not wait
        for Redis), the gauge has no sample, and nothing hangs.
        """
        first, second = self.service("web"), self.service("web")
        for _ in range(3):
            yield first.submit("ticks", {"count": 1}, None, first.newJobID())
        site = Site(buildResource(second, reactor))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port.getHost().port}/metrics", pool=pool)
        body = yield treq.text_content(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(parse(body)[("twistedsse_queue_depth", ())], 3)
        self.assertNotIn(("twistedsse_queue_depth", ()), scrape(second))

    @inlineCallbacks
    def test_cancelledWhileQueuedCounted(self) -> Any:
        """
        A render cancelled while queued ended on the web instance that
        withdrew it: that instance counts it (a worker counts the renders
        it ran), once, even when two instances race to cancel it.
        """
        first, second = self.service("web"), self.service("web")
        snapshot = yield first.submit("ticks", {"count": 1}, None, first.newJobID())
        # (Both may answer 202: the second sees the job still queued and
        # finds it withdrawn; only one ends it.)
        yield DeferredList([first.cancel(snapshot.id), second.cancel(snapshot.id)], consumeErrors=True)
        key = ("twistedsse_renders_total", (("outcome", "cancelled"), ("renderer", "ticks")))
        self.assertEqual(scrape(first).get(key, 0) + scrape(second).get(key, 0), 1)
        self.assertNotIn(("twistedsse_render_duration_seconds_count", (("renderer", "ticks"),)), scrape(first))

    @inlineCallbacks
    def test_reconnectsCounted(self) -> Any:
        """
        After Redis goes away and comes back, each of the instance's
        connections counts its reconnect; none before.
        """
        web = self.service("web")
        health = yield web.health()
        self.assertTrue(health["redis"]["connected"])
        self.assertEqual(scrape(web)[("twistedsse_redis_reconnects_total", ())], 0)
        self.server.stop(remove=False)
        self.server.start()
        deadline = reactor.seconds() + 30
        while scrape(web)[("twistedsse_redis_reconnects_total", ())] < 2:
            self.assertLess(reactor.seconds(), deadline, "both connections made again")
            yield deferLater(reactor, 0.1, lambda: None)


class ClaimCountsTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_claimAndReclaim(self) -> Any:
        """
        A worker counts the render it claims from the queue; the worker
        that takes it over from one that died counts a reclaim, not a
        claim.
        """
        server = RedisServer()
        self.addCleanup(server.stop)
        endpoint = RedisEndpoint.fromURL(server.url)

        def connect() -> Any:
            connection = endpoint.connect()
            self.addCleanup(connection.disconnect)
            return connection

        @inlineCallbacks
        def worker(name: str) -> Any:
            renders = Renders()
            worker = RedisWorker(
                connect(), connect(), endpoint, reactor, renders, name=name, maxRenders=1,
                claimTimeout=CLAIM_TIMEOUT, block=0.2,
            )  # fmt: skip
            renders.worker = worker
            self.addCleanup(worker.stop)
            yield worker.start()
            return worker, renders

        command = connect()
        yield ready(command, reactor)
        dead, rdead = yield worker("dead")
        yield RedisJobQueue(command, reactor).enqueue(QueuedRender("job0", "/o/0"))
        yield whenTrue(reactor, lambda: rdead.of("start") == ["job0"], 5, "first start")
        self.assertEqual((dead.stats.claims, dead.stats.reclaims), (1, 0))
        yield dead.stop()
        alive, ralive = yield worker("alive")
        yield whenTrue(reactor, lambda: ralive.calls, 5, "reclaimed")
        self.assertEqual(ralive.calls, [("start", "job0", 2)])
        self.assertEqual((alive.stats.claims, alive.stats.reclaims), (0, 1))

"""
C{Idempotency-Key} in Redis mode (L{twistedsse._redisweb.RedisJobs},
L{twistedsse._redisstate.RedisJobState.createOnce}), against a real
redis-server: one render per key over every web instance, even for
creates in flight at once; the key expires with its job. Also: an
operator's params schema is applied by web instances.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support.fixtures import Recorder
from tests._support.redis import RedisServer, startedService
from tests._support.waiting import whenTrue
from twistedsse._command import CommandRenderer
from twistedsse._errors import IdempotencyKeyReused, InvalidParams
from twistedsse._frames import TERMINAL_EVENTS
from twistedsse._idempotency import once
from twistedsse._job import JobState
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisservice import RedisRenderService

TICKER = str(Path(__file__).parent.parent / "integration" / "ticker.py")

SCHEMA = {"type": "object", "properties": {"count": {"type": "integer", "maximum": 50}, "interval": {"type": "number"}}}


def body(**params: Any) -> dict[str, Any]:
    return {"renderer": "ticks", "params": params}


class IdempotencyTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)
        self.output = Path(self.mktemp())

    def service(self, role: str = "web", **options: Any) -> RedisRenderService:
        renderers = [CommandRenderer("ticks", [sys.executable, TICKER], schema=SCHEMA)]
        return startedService(self, self.server, self.output, role, renderers, **options)

    def submit(self, service: RedisRenderService, key: str, request: dict[str, Any]) -> Any:
        return service.submit(
            request["renderer"], request["params"], None, service.newJobID(), once=once("anonymous", key, request)
        )

    @inlineCallbacks
    def test_oneRenderPerKey(self) -> Any:
        """
        Creates with one key on two web instances, all in flight at once,
        make one job, queued once; a later retry gets it too, even with
        the queue full; another key makes another.
        """
        first, second = self.service(maxQueued=2), self.service(maxQueued=2)
        request = body(count=3)
        snapshots = yield gatherResults(
            [self.submit(service, "k", request) for service in (first, second, first, second)]
        )
        self.assertEqual(len({s.id for s in snapshots}), 1, snapshots)
        health = yield first.health()
        self.assertEqual(health["renders"]["queued"], 1)
        other = yield self.submit(second, "other", request)
        self.assertNotEqual(other.id, snapshots[0].id)
        again = yield self.submit(first, "k", request)
        self.assertEqual(again.id, snapshots[0].id)
        health = yield first.health()
        self.assertEqual(health["renders"]["queued"], 2)

    @inlineCallbacks
    def test_otherBody(self) -> Any:
        """
        The same key with another body is L{IdempotencyKeyReused} on any
        instance; a key's first create that fails takes nothing.
        """
        first, second = self.service(), self.service()
        yield self.assertFailure(self.submit(first, "k", body(count=500)), InvalidParams)
        yield self.submit(first, "k", body(count=3))
        error = yield self.assertFailure(self.submit(second, "k", body(count=4)), IdempotencyKeyReused)
        self.assertEqual((error.status, error.code), (422, "idempotency_key_reused"))

    @inlineCallbacks
    def test_expiresWithTheJob(self) -> Any:
        """
        The key's slot gets its job's expiry when the job ends; once the job
        has expired, the key makes a new render.
        """
        service = self.service("all", expireAfter=1.0)
        request = body(count=2, interval=0.01)
        job = yield self.submit(service, "k", request)
        recorder = Recorder()
        unsubscribe = yield service.streams.subscribe(job.id, None, recorder)
        self.addCleanup(unsubscribe)
        yield whenTrue(reactor, lambda: any(e.event in TERMINAL_EVENTS for e, _ in recorder.got), 20, "the end")
        again = yield self.submit(service, "k", request)
        self.assertEqual((again.id, again.state), (job.id, JobState.SUCCEEDED))
        admin = RedisEndpoint.fromURL(self.server.url).connect()
        self.addCleanup(admin.disconnect)
        yield ready(admin, reactor)
        slots = yield admin.execute_command("KEYS", "*idem:*")
        self.assertEqual(len(slots), 1)
        ttl = yield admin.execute_command("PTTL", slots[0])
        self.assertTrue(0 < ttl <= 1000, ttl)
        yield deferLater(reactor, ttl / 1000 + 0.1, lambda: None)
        self.assertEqual((yield admin.execute_command("EXISTS", slots[0])), 0)
        fresh = yield self.submit(service, "k", request)
        self.assertNotEqual(fresh.id, job.id)

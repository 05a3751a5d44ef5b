"""
C{GET /events} in Redis mode, with real processes: two web instances and a
render worker (L{tests._support.cluster}) over one redis-server. Two jobs
watched on one instance; the client leaves mid-way and resumes with the
last combined id on the other instance, which sends each job exactly the
events it missed; after the end, either instance answers 204.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generator
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support.cluster import Cluster, EventStream, logsOf, openStream
from tests._support.redis import RedisServer
from tests._support.waiting import whenTrue

COUNT = 30


class MultiStreamClusterTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_resumeOnAnotherInstance(self) -> Generator[Deferred[Any], Any, None]:
        """
        Two renders watched on web instance A; the client leaves after some
        events and reconnects to instance B with its last combined id (Redis
        entry ids inside): B sends, for each job, exactly the events after
        its position, and ends after both jobs' C{complete}. Over both
        connections each job's events came once, in order (ids C{0-1},
        C{0-2}...). A reconnect after the end is 204 on either instance.
        """
        redis = RedisServer()
        self.addCleanup(redis.stop)
        cluster = Cluster(self, redis.url)
        webA, webB, worker = yield cluster.startMany(("web",), ("web",), ("worker", "--max-renders", "2"))
        go = Path(self.mktemp()).absolute()
        params = {"count": COUNT, "interval": 0.03, "start_file": str(go)}
        jobs = []
        for _ in range(2):
            job = yield cluster.post(webA, "ticks", params)
            jobs.append(job["id"])
        path = "/events?" + urlencode([("job", job) for job in jobs])
        first: EventStream = yield openStream(webA.base + path, cluster.pool)
        self.assertEqual(first.code, 200)
        go.touch()
        yield first.whenEvents(COUNT // 2)
        yield first.close()
        last = first.events[-1].id
        assert last is not None
        # Events go on while nobody watches.
        yield deferLater(reactor, 0.3, lambda: None)
        second: EventStream = yield openStream(webB.base + path, cluster.pool, lastEventID=last)
        self.assertEqual(second.code, 200)
        yield whenTrue(reactor, lambda: second.done.called, 30, lambda: f"the stream to end\n{logsOf(webA, webB, worker)}")
        seen = first.events + second.events
        self.assertLess(len(first.events), 2 * (COUNT + 1))
        self.assertEqual({e.data["job"] for e in second.events}, set(jobs))
        for job in jobs:
            mine = [e for e in seen if e.data["job"] == job]
            self.assertEqual(
                [(e.event, e.data.get("i")) for e in mine],
                [("progress", i) for i in range(1, COUNT + 1)] + [("complete", None)],
                job,
            )
        position: dict[str, list[str]] = {job: [] for job in jobs}
        for event in seen:
            assert event.id is not None
            tag, _, positions = event.id.partition(":")
            position[event.data["job"]].append(positions.split(",")[jobs.index(event.data["job"])])
        for job in jobs:
            self.assertEqual(position[job], [f"0-{n}" for n in range(1, COUNT + 2)])
        ids = [e.id for e in seen]
        self.assertEqual(len(ids), len(set(ids)))
        for web in (webA, webB):
            after: EventStream = yield openStream(web.base + path, cluster.pool, lastEventID=ids[-1])
            yield after.done
            self.assertEqual((after.code, after.events), (204, []))

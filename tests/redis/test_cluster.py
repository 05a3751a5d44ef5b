"""
Redis mode as it is deployed: web instances and render workers, each a
C{twistd twistedsse} process of its own (L{tests._support.cluster}),
joined by a real redis-server and one shared output directory. A client
moves between web instances; a worker is SIGKILLed or SIGTERMed
mid-render; a render is cancelled through another instance than the one
that created it, running or still queued; Redis itself stops and comes
back; and a wrong password stops the service at start-up.

Renders are the C{ticks} command (tests/integration/ticker.py): its lines
carry their number C{i} and the PID that printed them, so a test sees a
render start over and which process ran it; the cancel test runs the
built-in C{card} (a real ffmpeg).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Generator

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support.cluster import Cluster, EventStream, Instance, groupMembers, logsOf, renderProcesses
from tests._support.ports import freePort
from tests._support.procfs import descendants
from tests._support.redis import RedisServer
from tests._support.waiting import TimedOut, whenTrue

#: A render of about 3 s: 60 lines, 50 ms apart.
LONG = {"count": 60, "interval": 0.05, "output": "the video"}

#: Seconds within which an idle worker takes a render handed back by a
#: draining one: as soon as it would take a new render, give or take a
#: blocking read (the issue: "hands the rest back to the queue").
HAND_BACK_WITHIN = 5.0

#: How long Redis stays down in the restart test: as long as a restart
#: that loads its AOF may take, longer than one command's timeout.
OUTAGE = 4.0


def ids(count: int) -> list[str]:
    """
    The event ids of a job's first C{count} events: Redis entry ids.
    """
    return [f"0-{n}" for n in range(1, count + 1)]


def describe(stream: EventStream) -> str:
    """
    Each event of C{stream} as C{id event i} (the ticker's line number), for
    a failure message.
    """
    return " ".join(f"{e.id}:{e.event}:{e.data.get('i', '') if isinstance(e.data, dict) else ''}" for e in stream.events)


def report(line: str) -> None:
    sys.stderr.write(f"\n[cluster] {line}\n")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def exitedCleanly(reason: Any) -> bool:
    """
    twistd ended by its own exit 0, or by the SIGTERM it re-raises on
    itself (what systemd counts as a clean stop).
    """
    code = getattr(reason, "exitCode", 0)
    return (code, getattr(reason, "signal", None)) in [(0, None), (None, 15)]


class ClusterTests(TestCase):
    timeout = 60

    def startCluster(self, appendOnly: bool = False) -> Cluster:
        self.redis = RedisServer(appendOnly=appendOnly)
        self.addCleanup(self.redis.stop)
        self.cluster = Cluster(self, self.redis.url)
        return self.cluster

    def whenDone(self, stream: EventStream, timeout: float = 30.0, *instances: Instance) -> Deferred[Any]:
        return whenTrue(
            reactor, lambda: stream.done.called, timeout,
            lambda: f"the stream to end (got {stream.names()[-8:]})\n{logsOf(*instances)}",
        )  # fmt: skip

    def runningOn(self, pid: int, workers: list[Instance]) -> Instance:
        """
        The worker whose process tree holds C{pid} (a render's line said it
        printed it).
        """
        holding = [w for w in workers if pid in descendants(w.pid)]
        self.assertEqual(len(holding), 1, f"render process {pid} under {[w.pid for w in holding]}")
        return holding[0]

    def assertRestarted(self, stream: EventStream, reason: str, count: int) -> Any:
        """
        C{stream} holds a first run's progress (from C{i} 1), one
        C{retrying} with C{reason}, a whole second run (C{i} 1 to C{count})
        and C{complete}; every id once, in order. Returns the C{retrying}
        event's data.
        """
        names = stream.names()
        self.assertEqual(names.count("retrying"), 1, names)
        cut = names.index("retrying")
        self.assertGreaterEqual(cut, 1)
        self.assertEqual(names, ["progress"] * cut + ["retrying"] + ["progress"] * count + ["complete"])
        self.assertEqual(stream.ids(), ids(len(names)))
        progress = [e.data["i"] for e in stream.events if e.event == "progress"]
        self.assertEqual(progress, list(range(1, cut + 1)) + list(range(1, count + 1)))
        retrying = stream.events[cut].data
        self.assertEqual(retrying["reason"], reason, retrying)
        first = {e.data["pid"] for e in stream.events[:cut]}
        second = {e.data["pid"] for e in stream.events[cut + 1 : -1]}
        self.assertEqual((len(first), len(second)), (1, 1))
        self.assertNotEqual(first, second)
        return retrying

    @inlineCallbacks
    def assertOutput(self, job: Any, *instances: Instance) -> Generator[Deferred[Any], Any, None]:
        """
        C{job} succeeded, and each of C{instances} says so and serves its
        output.
        """
        for instance in instances:
            code, status = yield self.cluster.getJSON(instance, job["status_url"])
            self.assertEqual((code, status["state"], status["error"]), (200, "succeeded", None), status)
            code, _, body = yield self.cluster.request("GET", instance.base + job["output_url"])
            self.assertEqual((code, body), (200, b"the video"))

    @inlineCallbacks
    def test_clientMovesBetweenWebInstances(self) -> Generator[Deferred[Any], Any, None]:
        """
        A render created through web instance A (and run by a worker) is
        watched through web instance B; mid-render the client moves to A
        with C{Last-Event-ID}: it gets every event exactly once, in order
        (ids C{0-1}, C{0-2}...), ending with C{complete}. Both web instances
        answer its status and serve its output; the worker serves only
        C{/healthz} (every other path: JSON 404).
        """
        cluster = self.startCluster()
        a, b, worker = yield cluster.startMany(("web",), ("web",), ("worker",))
        job = yield cluster.post(a, "ticks", LONG)
        first = yield cluster.stream(b, job)
        self.assertEqual(first.code, 200)
        yield first.whenEvents(10)
        yield first.close()
        code, status = yield cluster.getJSON(a, job["status_url"])
        self.assertEqual(status["state"], "running", "the client should move mid-render")
        second = yield cluster.stream(a, job, lastEventID=first.events[-1].id)
        self.assertEqual(second.code, 200)
        yield self.whenDone(second, 30, a, b, worker)
        events = first.events + second.events
        self.assertEqual([e.event for e in events], ["progress"] * 60 + ["complete"])
        self.assertEqual([e.id for e in events], ids(61))
        self.assertEqual([e.data["i"] for e in events[:-1]], list(range(1, 61)))
        self.assertGreater(len(second.events), 1)
        yield self.assertOutput(job, a, b)
        code, body = yield cluster.getJSON(worker, job["status_url"])
        self.assertEqual(code, 404, body)
        self.assertIn("error", body)
        code, health = yield cluster.getJSON(worker, "/healthz")
        self.assertEqual((code, health["status"], health["role"]), (200, "ok", "worker"), health)
        self.assertEqual(health["renders"]["running"], 0, health)
        self.assertEqual(health["redis"], {"url": self.redis.url, "connected": True})
        code, health = yield cluster.getJSON(a, "/healthz")
        self.assertEqual((code, health["role"], health["redis"]["connected"]), (200, "web", True), health)

    @inlineCallbacks
    def test_sigkilledWorkerRenderIsReclaimed(self) -> Generator[Deferred[Any], Any, None]:
        """
        Two workers with C{--claim-timeout 2}; the one running a render is
        SIGKILLed mid-render. The other reclaims it after the claim timeout:
        the client sees C{retrying} (attempt 2 of 2, C{worker_lost}), the
        render's progress start over from the other worker's new process,
        then C{complete}; the render is not lost, and its two runs never
        overlap (never two of its process groups alive at once).
        """
        cluster = self.startCluster()
        a, *workers = yield cluster.startMany(
            ("web",), ("worker", "--claim-timeout", "2"), ("worker", "--claim-timeout", "2")
        )
        job = yield cluster.post(a, "ticks", LONG)
        sampler = cluster.sampleRuns(job["id"])
        stream = yield cluster.stream(a, job)
        yield stream.whenEvents(10)
        victim = self.runningOn(stream.events[-1].data["pid"], workers)
        survivor = workers[1 - workers.index(victim)]
        code, health = yield cluster.getJSON(victim, "/healthz")
        self.assertEqual(health["renders"]["running"], 1, health)
        killedAt = reactor.seconds()
        victim.signal("KILL")
        reason = yield victim.ended
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, 9)
        retrying = yield stream.whenEvent("retrying", 20)
        after = len(stream.events)
        yield stream.whenEvents(after + 1)
        rerun = stream.events[after]
        self.assertEqual(rerun.event, "progress")
        # The second run is the survivor's child: checked while it runs.
        self.runningOn(rerun.data["pid"], [survivor])
        yield self.whenDone(stream, 30, a, survivor)
        sampler.stop()
        data = self.assertRestarted(stream, "worker_lost", 60)
        self.assertEqual((data["attempt"], data["max_attempts"]), (2, 2), data)
        waited = retrying.at - killedAt
        report(f"SIGKILL of the worker: retrying {waited:.2f} s later (--claim-timeout 2), {len(stream.events)} events")
        self.assertTrue(1.0 <= waited <= 10.0, f"retrying {waited:.2f} s after the kill, with --claim-timeout 2")
        self.assertEqual(sampler.most, 1, f"two runs at once: runs {sampler.runs}")
        self.assertEqual(len(sampler.runs), 2, sampler.runs)
        yield self.assertOutput(job, a)
        code, health = yield cluster.getJSON(survivor, "/healthz")
        self.assertEqual(health["renders"]["running"], 0, health)

    @inlineCallbacks
    def test_sigtermHandsLongRenderBack(self) -> Generator[Deferred[Any], Any, None]:
        """
        SIGTERM to the worker running a render, with C{--drain-timeout 1}
        and a render longer than that: the render runs on for the drain
        timeout, then the worker stops it, hands it back and exits cleanly;
        the other worker, idle, takes it as it would a new render (within
        a few seconds, not at its next takeover scan) and runs it from the
        start. The client sees C{retrying} (C{handed_back}, not terminal),
        progress from 1 again, then C{complete}; the two runs never overlap.
        """
        cluster = self.startCluster()
        a, *workers = yield cluster.startMany(
            ("web",), ("worker", "--drain-timeout", "1"), ("worker", "--drain-timeout", "1")
        )
        job = yield cluster.post(a, "ticks", LONG)
        sampler = cluster.sampleRuns(job["id"])
        stream = yield cluster.stream(a, job)
        yield stream.whenEvents(5)
        victim = self.runningOn(stream.events[-1].data["pid"], workers)
        survivor = workers[1 - workers.index(victim)]
        termAt = reactor.seconds()
        victim.signal("TERM")
        yield whenTrue(reactor, lambda: victim.ended.called, 15, lambda: f"the worker to exit\n{logsOf(victim)}")
        exitedAt = reactor.seconds()
        reason = yield victim.ended
        self.assertTrue(exitedCleanly(reason), f"{reason!r}\n{logsOf(victim)}")
        self.assertLess(exitedAt - termAt, 10, "the draining worker took too long to exit")
        try:
            retrying = yield stream.whenEvent("retrying", HAND_BACK_WITHIN)
        except TimedOut:
            self.fail(
                f"the render handed back {exitedAt - termAt:.1f} s after SIGTERM was not taken by the idle worker "
                f"within {HAND_BACK_WITHIN:g} s (events so far: {describe(stream)[-200:]})\n{logsOf(victim, survivor)}"
            )
        yield self.whenDone(stream, 30, a, survivor)
        sampler.stop()
        report(
            f"SIGTERM, --drain-timeout 1: exited {exitedAt - termAt:.2f} s later, "
            f"retrying (handed_back) {retrying.at - exitedAt:.2f} s after the exit"
        )
        self.assertRestarted(stream, "handed_back", 60)
        # The drain waited its second: the render ran on meanwhile.
        self.assertGreaterEqual(retrying.at - termAt, 0.8)
        during = [e for e in stream.events if e.event == "progress" and termAt + 0.2 < e.at < retrying.at]
        self.assertTrue(during, "no progress during the drain")
        self.assertEqual(sampler.most, 1, f"two runs at once: runs {sampler.runs}")
        self.assertEqual(len(sampler.runs), 2, sampler.runs)
        yield self.assertOutput(job, a)

    @inlineCallbacks
    def test_sigtermLetsShortRenderFinish(self) -> Generator[Deferred[Any], Any, None]:
        """
        SIGTERM to a worker with a long C{--drain-timeout} (30 s) while it
        runs a 2 s render: the render finishes there (every event, no
        C{retrying}), the worker claims nothing new meanwhile (a render
        created after the SIGTERM stays queued), then exits cleanly; the
        next worker runs the queued render.
        """
        cluster = self.startCluster()
        a, worker = yield cluster.startMany(("web",), ("worker", "--drain-timeout", "30"))
        job = yield cluster.post(a, "ticks", {"count": 40, "interval": 0.05, "output": "the video"})
        stream = yield cluster.stream(a, job)
        yield stream.whenEvents(5)
        termAt = reactor.seconds()
        worker.signal("TERM")
        later = yield cluster.post(a, "ticks", {"count": 3})
        yield self.whenDone(stream, 30, a, worker)
        self.assertEqual(stream.names(), ["progress"] * 40 + ["complete"])
        self.assertEqual(stream.ids(), ids(41))
        self.assertEqual(len({e.data["pid"] for e in stream.events[:-1]}), 1)
        yield whenTrue(reactor, lambda: worker.ended.called, 10, lambda: f"the worker to exit\n{logsOf(worker)}")
        exitedAfter = reactor.seconds() - termAt
        reason = yield worker.ended
        self.assertTrue(exitedCleanly(reason), f"{reason!r}\n{logsOf(worker)}")
        report(f"SIGTERM, --drain-timeout 30, 2 s render: finished there, worker exited {exitedAfter:.2f} s after SIGTERM")
        self.assertLess(exitedAfter, 15)
        yield self.assertOutput(job, a)
        code, status = yield cluster.getJSON(a, later["status_url"])
        self.assertEqual((status["state"], status["started_at"]), ("queued", None), status)
        yield cluster.start("worker")
        status = yield cluster.whenState(a, later, ("succeeded", "failed", "cancelled"))
        self.assertEqual(status["state"], "succeeded", status)

    @inlineCallbacks
    def test_cancelThroughOtherInstanceEndsProcessGroup(self) -> Generator[Deferred[Any], Any, None]:
        """
        A card render (ffmpeg) created through web instance A and running on
        a worker is cancelled through web instance B: B's client gets
        C{cancelled} last; by then no process of the render's process group
        is left; A says C{cancelled}; no file of it is left in the output
        directory.
        """
        cluster = self.startCluster()
        a, b, worker = yield cluster.startMany(("web",), ("web",), ("worker",))
        job = yield cluster.post(a, "card", {"duration": 30})
        stream = yield cluster.stream(b, job)
        yield stream.whenEvent("progress", 30)
        found = renderProcesses(f"{job['id']}.part.mp4", frozenset([worker.pid]))
        ffmpeg = [pid for pid in found if b"ffmpeg" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        self.assertTrue(ffmpeg, found)
        group = found[ffmpeg[0]]
        # The group's leader is the render's supervisor, not the worker.
        self.assertIn(group, found)
        self.assertNotEqual(group, os.getpgid(worker.pid))
        code, _, body = yield cluster.request("DELETE", b.base + job["status_url"])
        self.assertEqual(code, 202, body)
        yield self.whenDone(stream, 20, b, worker)
        self.assertEqual(stream.names()[-1], "cancelled", stream.names())
        self.assertEqual(set(stream.names()[:-1]), {"progress"})
        self.assertEqual(stream.ids(), ids(len(stream.events)))
        self.assertEqual(groupMembers(group), [], "the render's process group outlived its cancelled event")
        code, status = yield cluster.getJSON(a, job["status_url"])
        self.assertEqual((code, status["state"]), (200, "cancelled"), status)
        yield whenTrue(
            reactor, lambda: not [p for p in os.listdir(cluster.outputDir) if p.startswith(job["id"])], 5,
            lambda: f"the render's files to go: {os.listdir(cluster.outputDir)}",
        )  # fmt: skip
        code, health = yield cluster.getJSON(worker, "/healthz")
        self.assertEqual(health["renders"]["running"], 0, health)

    @inlineCallbacks
    def test_cancelledQueuedRenderNeverStarts(self) -> Generator[Deferred[Any], Any, None]:
        """
        With the one worker busy (C{--max-renders 1}), a second render waits
        queued; cancelled, its client gets C{cancelled} alone, and it never
        starts: no process of it ever appears, and a third render, queued
        after it, runs once the first has finished.
        """
        cluster = self.startCluster()
        a, worker = yield cluster.startMany(("web",), ("worker", "--max-renders", "1"))
        first = yield cluster.post(a, "ticks", {"count": 30, "interval": 0.05})
        yield cluster.whenState(a, first, ("running",))
        queued = yield cluster.post(a, "ticks", {"count": 5, "output": "never"})
        sampler = cluster.sampleRuns(queued["id"])
        code, status = yield cluster.getJSON(a, queued["status_url"])
        self.assertEqual(status["state"], "queued", status)
        stream = yield cluster.stream(a, queued)
        code, _, body = yield cluster.request("DELETE", a.base + queued["status_url"])
        self.assertEqual(code, 202, body)
        yield self.whenDone(stream, 10, a, worker)
        self.assertEqual(stream.names(), ["cancelled"])
        third = yield cluster.post(a, "ticks", {"count": 3})
        status = yield cluster.whenState(a, third, ("succeeded", "failed", "cancelled"))
        self.assertEqual(status["state"], "succeeded", status)
        code, done = yield cluster.getJSON(a, first["status_url"])
        self.assertEqual(done["state"], "succeeded", done)
        self.assertGreaterEqual(status["started_at"], done["ended_at"])
        sampler.stop()
        code, status = yield cluster.getJSON(a, queued["status_url"])
        self.assertEqual((status["state"], status["started_at"]), ("cancelled", None), status)
        self.assertEqual(sampler.runs, [], "the cancelled render was started")
        self.assertGreater(sampler.samples, 10)

    @inlineCallbacks
    def test_redisRestartWithAOFMidStream(self) -> Generator[Deferred[Any], Any, None]:
        """
        Redis (with AOF) stopped mid-render for 4 s and started again: the
        client's stream stays open, keepalive comments go on
        (C{--keepalive 0.2}) while Redis is down, and C{GET /renders/ID}
        answers 503 JSON C{redis_unavailable} with C{Retry-After}; once Redis
        is back the same stream resumes: every event exactly once (each of
        the render's lines once), in order, then C{complete}.
        """
        cluster = self.startCluster(appendOnly=True)
        a, worker = yield cluster.startMany(("web", "--keepalive", "0.2"), ("worker",))
        job = yield cluster.post(a, "ticks", {"count": 140, "interval": 0.05, "output": "the video"})
        stream = yield cluster.stream(a, job)
        yield stream.whenEvents(10)
        self.redis.stop(remove=False)
        downAt = reactor.seconds()
        code, headers, body = yield cluster.request("GET", a.base + job["status_url"])
        answeredIn = reactor.seconds() - downAt
        self.assertEqual(code, 503, body)
        self.assertEqual(json.loads(body)["error"], "redis_unavailable")
        self.assertTrue(headers.getRawHeaders(b"retry-after"), headers)
        self.assertLess(answeredIn, OUTAGE)
        yield sleep(max(0.0, downAt + OUTAGE - reactor.seconds()))
        self.assertFalse(stream.done.called, "the stream ended while Redis was down")
        self.redis.start()
        upAt = reactor.seconds()
        during = [t for t in stream.keepalives if downAt < t < upAt]
        self.assertGreaterEqual(len(during), OUTAGE / 0.2 / 2, f"keepalives {stream.keepalives}, Redis down {downAt}-{upAt}")
        yield self.whenDone(stream, 30, a, worker)
        resumed = next(e.at for e in stream.events if e.at > upAt)
        report(
            f"Redis down {upAt - downAt:.1f} s: 503 in {answeredIn:.2f} s, {len(during)} keepalives meanwhile, "
            f"first event {resumed - upAt:.2f} s after Redis was back"
        )
        self.maxDiff = None
        self.assertEqual(describe(stream).split(), [f"0-{n}:progress:{n}" for n in range(1, 141)] + ["0-141:complete:"])
        yield self.assertOutput(job, a)

    @inlineCallbacks
    def test_startupRefusesWrongPassword(self) -> Generator[Deferred[Any], Any, None]:
        """
        With a wrong password file, twistd refuses to start: a non-zero exit
        and a message naming the Redis URL and the problem, without the
        password (neither the wrong one nor the right one). So does an
        unreachable Redis. With the right file it starts and is connected.
        """
        self.redis = RedisServer(password="right-horse-battery-staple")
        self.addCleanup(self.redis.stop)
        wrong, right = Path(self.mktemp()), Path(self.mktemp())
        wrong.write_text("wrong-horse-7331\n")
        right.write_text("right-horse-battery-staple\n")
        cluster = Cluster(self, self.redis.url, passwordFile=str(wrong))
        _, protocol = cluster.spawn("web")
        yield self.assertFailure(protocol.listening, RuntimeError)
        reason = yield protocol.ended
        output = protocol.output.decode(errors="replace")
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertNotEqual(reason.exitCode, 0, output)
        self.assertIn(self.redis.url, output)
        self.assertRegex(output.lower(), "password|auth")
        self.assertNotIn("wrong-horse-7331", output)
        self.assertNotIn("right-horse-battery-staple", output)

        nowhere = f"redis://127.0.0.1:{freePort()}/0"
        _, protocol = Cluster(self, nowhere).spawn("worker")
        yield self.assertFailure(protocol.listening, RuntimeError)
        reason = yield protocol.ended
        output = protocol.output.decode(errors="replace")
        self.assertNotEqual(getattr(reason, "exitCode", 0), 0, output)
        self.assertIn(nowhere, output)

        cluster = Cluster(self, self.redis.url, passwordFile=str(right))
        web = yield cluster.start("web")
        code, health = yield cluster.getJSON(web, "/healthz")
        self.assertEqual(health["redis"], {"url": self.redis.url, "connected": True}, health)
        self.assertNotIn("right-horse-battery-staple", web.log())

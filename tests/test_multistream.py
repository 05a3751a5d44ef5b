"""
C{GET /events?job=A&job=B...} (L{twistedsse._multistream}) over the real
app and L{Site}, on in-memory transports and a L{Clock}: frames carry their
job, the combined id advances and resumes every job exactly once, the
stream ends when every job has, and its bounds (jobs, limits, tokens, a
client that stops reading).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from zope.interface import implementer

from twistedsse._asyncbroker import AsyncMemoryBroker, IAsyncJobBroker
from twistedsse._broker import MemoryBroker

from twistedsse._build import buildSite
from twistedsse._multistream import (
    MAX_JOBS,
    MultiEventStreamResource,
    combinedID,
    jobsTag,
    parseJobs,
    parsePositions,
    planStream,
)
from twistedsse._errors import InvalidJobs, RedisUnavailable, TooManyJobs
from twistedsse._stream import StreamLimits, StreamSettings
from twistedsse._security import mintToken
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import snapshot, ticksService
from tests._support.web import BufferTransport, Connection, TCPStringTransport, chunks, decode, splitResponse

SECRET = b"s" * 32


def ours(clock: MemoryReactorClock) -> list[Any]:
    """
    The streams' timers left (the keepalive loop, write deadlines), not
    the render service's own.
    """
    return [
        c for c in clock.getDelayedCalls()
        if isinstance(c.func, LoopingCall) or getattr(c.func, "__name__", "") == "_stalled"
    ]  # fmt: skip


class _Base(SynchronousTestCase):
    jobs = 3
    siteOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, Path(self.mktemp()), maxRenders=10)
        self.site = buildSite(self.service, self.clock, keepalive=15.0, retry=1000, **self.siteOptions)
        self.ids = [self.service.submit("ticks", {}).id for _ in range(self.jobs)]
        self.processes = {jobID: process for jobID, process in zip(self.ids, self.spawner.processes)}
        self.conns: list[Connection] = []

    def tearDown(self) -> None:
        for conn in self.conns:
            conn.disconnect()

    def url(self, *jobs: str) -> str:
        return "/events?" + "&".join(f"job={job}" for job in jobs)

    def open(self, *jobs: str, lastEventID: str | None = None, transport: Any = None, method: str = "GET") -> Connection:
        conn = Connection(self.site, transport)
        self.conns.append(conn)
        headers = {"Accept": "text/event-stream"}
        if lastEventID is not None:
            headers["Last-Event-ID"] = lastEventID
        conn.request(method, self.url(*(jobs or self.ids)), headers)
        return conn

    def progress(self, jobID: str, i: int) -> None:
        self.processes[jobID].stdout(json.dumps({"progress": i / 10, "i": i}).encode() + b"\n")

    def finish(self, jobID: str) -> None:
        self.processes[jobID].exit(0)

    def assertNothingLeft(self) -> None:
        for conn in self.conns:
            conn.disconnect()
        self.conns = []
        self.assertEqual(self.service.broker.subscriberCount(), 0)
        self.assertEqual(ours(self.clock), [])
        self.assertEqual(self.streams(), 0)

    def streams(self) -> int:
        conn = Connection(self.site)
        conn.request("GET", "/healthz")
        body = splitResponse(conn.take())[2]
        conn.disconnect()
        return int(json.loads(body)["streams"])


def assertDocumented(case: SynchronousTestCase, name: str, data: Any) -> None:
    """
    C{data} validates against C{openapi.json}'s schema C{name}.
    """
    import jsonschema

    from tests.test_openapi import loadSpec

    root = {**loadSpec(), "$ref": f"#/components/schemas/{name}"}
    case.assertEqual(list(jsonschema.Draft202012Validator(root).iter_errors(data)), [], f"{name}: {data!r}")


def events(body: bytes) -> list[tuple[str | None, str | None, Any]]:
    """
    (event, id, data) of each event of an event-stream body.
    """
    return [(e.event, e.id, json.loads(e.data)) for e in decode(body)]


class MultiStreamTests(_Base):
    def test_framesCarryTheirJobAndTheCombinedID(self) -> None:
        """
        Each job's events come as on its own stream (name, data), with
        C{job} added to the data; each event's id holds every job's
        position, the event's own job advanced.
        """
        a, b, c = self.ids
        conn = self.open()
        status, head, body = splitResponse(conn.take())
        self.assertEqual((status, head[b"content-type"], body), (200, b"text/event-stream; charset=utf-8", b"retry: 1000\n\n"))
        tag = jobsTag(self.ids)
        self.progress(b, 1)
        self.progress(a, 1)
        self.progress(b, 2)
        got = events(b"".join(chunks(conn.take())))
        self.assertEqual(got, [
            ("progress", f"{tag}:,1,", {"progress": 0.1, "i": 1, "job": b}),
            ("progress", f"{tag}:1,1,", {"progress": 0.1, "i": 1, "job": a}),
            ("progress", f"{tag}:1,2,", {"progress": 0.2, "i": 2, "job": b}),
        ])  # fmt: skip

    def test_eachFrameIsOneChunkAtOnce(self) -> None:
        """
        After each event the transport holds its whole frame, as one HTTP
        chunk: nothing waits.
        """
        conn = self.open()
        conn.take()
        for i in range(1, 4):
            for jobID in self.ids:
                self.progress(jobID, i)
                (frame,) = chunks(conn.take())
                ((name, _, data),) = events(frame)
                self.assertEqual((name, data["job"], data["i"]), ("progress", jobID, i))

    def test_endsWhenEveryJobHasEnded(self) -> None:
        """
        A job's terminal event does not end the stream while another job
        runs; the last one's does (the chunked terminator in the same
        write), and nothing is left: no subscriber, no timer, no count.
        """
        a, b, c = self.ids
        conn = self.open()
        conn.take()
        self.finish(a)
        self.processes[c].exit(3)
        wire = conn.take()
        self.assertFalse(wire.endswith(b"0\r\n\r\n"))
        self.assertEqual([(n, d["job"]) for n, _, d in events(b"".join(chunks(wire)))], [("complete", a), ("failed", c)])
        self.progress(b, 1)
        self.finish(b)
        wire = conn.take()
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        self.assertEqual([(n, d["job"]) for n, _, d in events(b"".join(chunks(wire)))], [("progress", b), ("complete", b)])
        self.assertNothingLeft()

    def test_resumeGivesEachJobItsMissedEventsOnce(self) -> None:
        """
        A reconnect with the last combined id it got gets, for each job,
        exactly the events after that job's position, then live ones, and
        ends with the last job; over both connections every event of every
        job came once, in order.
        """
        a, b, c = self.ids
        first = self.open()
        first.take()
        self.progress(a, 1)
        self.progress(b, 1)
        self.progress(a, 2)
        seen = events(b"".join(chunks(first.take())))
        first.disconnect()
        # Missed while away:
        self.progress(b, 2)
        self.progress(c, 1)
        self.finish(a)
        self.progress(b, 3)
        second = self.open(lastEventID=seen[-1][1])
        status, _, body = splitResponse(second.take())
        self.assertEqual(status, 200)
        resumed = events(body)
        self.assertEqual(
            [(n, d["job"], d.get("i")) for n, _, d in resumed],
            [("complete", a, None), ("progress", b, 2), ("progress", b, 3), ("progress", c, 1)],
        )
        self.finish(b)
        self.finish(c)
        wire = second.take()
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        allEvents = seen + resumed + events(b"".join(chunks(wire)))
        perJob = {job: [(n, d.get("i")) for n, _, d in allEvents if d["job"] == job] for job in self.ids}
        self.assertEqual(perJob[a], [("progress", 1), ("progress", 2), ("complete", None)])
        self.assertEqual(perJob[b], [("progress", 1), ("progress", 2), ("progress", 3), ("complete", None)])
        self.assertEqual(perJob[c], [("progress", 1), ("complete", None)])
        ids = [i for _, i, _ in allEvents]
        self.assertEqual(len(set(ids)), len(ids), "an id repeats")
        # And once it has all, a reconnect is 204 (EventSource stops).
        third = self.open(lastEventID=ids[-1])
        self.assertEqual(splitResponse(third.take())[:1], (204,))
        self.assertNothingLeft()

    def test_endedJobGetsItsEndOnceThenCounts(self) -> None:
        """
        A job that ended before the client connected gets what its own
        stream would give (its latest progress and terminal event) and
        counts as ended; a job the client has seen end is not sent again.
        """
        a, b, c = self.ids
        self.progress(a, 1)
        self.progress(a, 2)
        self.finish(a)
        conn = self.open(a, b)
        got = events(splitResponse(conn.take())[2])
        self.assertEqual([(n, d["job"], d.get("i")) for n, _, d in got], [("progress", a, 2), ("complete", a, None)])
        self.finish(b)
        (done,) = events(b"".join(chunks(conn.take())))
        self.assertEqual((done[0], done[2]["job"]), ("complete", b))
        # A reconnect that has a's end but not b's gets b's end only.
        again = self.open(a, b, lastEventID=got[-1][1])
        resent = events(splitResponse(again.take())[2])
        self.assertEqual([(n, d["job"]) for n, _, d in resent], [("complete", b)])
        self.assertEqual(resent[0][1], done[1])
        self.assertNothingLeft()

    def test_headAndAllSeen(self) -> None:
        """
        HEAD sends the stream's headers and subscribes to nothing; once the
        client has seen every job end, GET and HEAD are 204.
        """
        conn = self.open(method="HEAD")
        status, head, body = splitResponse(conn.take())
        self.assertEqual((status, head[b"content-type"], body), (200, b"text/event-stream; charset=utf-8", b""))
        self.assertEqual(self.service.broker.subscriberCount(), 0)
        for jobID in self.ids:
            self.finish(jobID)
        conn = self.open()
        last = events(splitResponse(conn.take())[2])[-1][1]
        for method in ("GET", "HEAD"):
            conn = self.open(lastEventID=last, method=method)
            self.assertEqual(splitResponse(conn.take())[0], 204, method)
        self.assertNothingLeft()

    def test_keepaliveAndNoDelay(self) -> None:
        """
        A quiet stream gets a keepalive comment each interval from the
        app's shared timer; the stream sets TCP_NODELAY on its transport.
        """
        transport = TCPStringTransport()
        conn = self.open(transport=transport)
        self.assertTrue(transport.noDelay)
        conn.take()
        self.clock.pump([0.5] * 29)
        self.assertEqual(conn.take(), b"")
        self.clock.pump([0.5])
        self.assertEqual(chunks(conn.take()), [b": keepalive\n\n"])

    def test_jobKeyOfTheEventGivesWay(self) -> None:
        """
        An event whose data has a C{job} of its own (a command renderer's
        progress is its own object) still names the stream's job: ours
        comes last, and JSON parsers keep the last.
        """
        a = self.ids[0]
        conn = self.open(a)
        conn.take()
        self.processes[a].stdout(b'{"job": "not this", "progress": 0.5}\n')
        ((_, _, data),) = events(b"".join(chunks(conn.take())))
        self.assertEqual(data["job"], a)


class ValidationTests(_Base):
    jobs = 2

    def answer(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = Connection(self.site)
        conn.request("GET", path, headers)
        status, head, body = splitResponse(conn.take())
        conn.disconnect()
        return status, json.loads(body) if head.get(b"content-type") == b"application/json" else body

    def test_noJob(self) -> None:
        """
        No C{job} (or an empty one) is 422 C{invalid_jobs}.
        """
        for path in ("/events", "/events?jobs=x", "/events?job=", f"/events?job={self.ids[0]}&job="):
            status, body = self.answer(path)
            self.assertEqual((status, body["error"]), (422, "invalid_jobs"), path)

    def test_atMostAHundredJobs(self) -> None:
        """
        101 different jobs are 422 C{too_many_jobs}, before any is looked
        up; 100 are looked up (404 names the first unknown one), and 100
        known ones are a stream.
        """
        many = [f"job{i}" for i in range(MAX_JOBS + 1)]
        status, body = self.answer(self.url(*many))
        self.assertEqual((status, body["error"]), (422, "too_many_jobs"))
        self.assertIn("101", body["detail"])
        status, body = self.answer(self.url(*self.ids, *many[: MAX_JOBS - 2]))
        self.assertEqual((status, body["error"]), (404, "unknown_job"))
        self.assertIn("'job0'", body["detail"])
        # 100 known jobs: a stream.
        more = [self.service.submit("ticks", {}).id for _ in range(MAX_JOBS - 2)]
        conn = self.open(*self.ids, *more)
        self.assertEqual(splitResponse(conn.take())[0], 200)

    def test_duplicatesCountOnce(self) -> None:
        """
        A job named twice is watched once: its events come once, and the
        combined id has one position per job.
        """
        a, b = self.ids
        conn = self.open(a, b, a, a)
        conn.take()
        self.progress(a, 1)
        ((_, eventID, data),) = events(b"".join(chunks(conn.take())))
        self.assertEqual(eventID, f"{jobsTag([a, b])}:1,")
        self.assertEqual(data["job"], a)

    def test_unknownJobIs404NamingIt(self) -> None:
        """
        A job id the server does not know is 404 C{unknown_job}, naming it;
        nothing is subscribed.
        """
        status, body = self.answer(self.url(self.ids[0], "nosuchjob", self.ids[1]))
        self.assertEqual((status, body["error"]), (404, "unknown_job"))
        self.assertIn("'nosuchjob'", body["detail"])
        self.assertEqual(self.service.broker.subscriberCount(), 0)

    def test_expiredJobGetsOneExpiredEvent(self) -> None:
        """
        A job that has expired gets one C{expired} event (the error a
        request for it would get, and C{job}), then counts as ended: a
        reconnect does not get it again, and once the other jobs have
        ended too, a reconnect is 204.
        """
        a, b = self.ids
        self.finish(a)
        self.service.broker.expire(a)
        conn = self.open()
        ((name, eventID, data),) = events(splitResponse(conn.take())[2])
        self.assertEqual((name, data["job"], data["error"]), ("expired", a, "job_expired"))
        assertDocumented(self, "ExpiredEvent", data)
        self.assertEqual(eventID, f"{jobsTag(self.ids)}:!,")
        conn.disconnect()
        again = self.open(lastEventID=eventID)
        self.assertEqual(events(splitResponse(again.take())[2]), [])
        self.finish(b)
        ((name, last, data),) = events(b"".join(chunks(again.take())))
        self.assertEqual((name, data["job"]), ("complete", b))
        self.assertEqual(splitResponse(self.open(lastEventID=last).take())[0], 204)
        self.assertNothingLeft()

    def test_foreignOrBrokenIDCountsAsNone(self) -> None:
        """
        A C{Last-Event-ID} that is not one of this job list's (garbage,
        another list's, the wrong number of positions, too long, bad
        percent-encoding) counts as none, as on the single-job stream:
        every job's whole retained history.
        """
        a, b = self.ids
        self.progress(a, 1)
        self.progress(b, 1)
        tag = jobsTag(self.ids)
        for bad in (
            "garbage", "1", f"{jobsTag([b, a])}:1,1", f"{tag}:1", f"{tag}:1,1,1", f"{tag}:1," + "9" * 41,
            f"{tag}:1,%FF", f"{tag}:1,%0A", "x" * 5000,
        ):  # fmt: skip
            conn = Connection(self.site)
            conn.request("GET", self.url(*self.ids), {"Last-Event-ID": bad})
            got = events(splitResponse(conn.take())[2])
            conn.disconnect()
            self.assertEqual([(d["job"], d["i"]) for _, _, d in got], [(a, 1), (b, 1)], bad)
        # The query parameter works as the header does.
        conn = Connection(self.site)
        conn.request("GET", self.url(*self.ids) + f"&lastEventId={tag}:1,")
        got = events(splitResponse(conn.take())[2])
        conn.disconnect()
        self.assertEqual([(d["job"], d["i"]) for _, _, d in got], [(b, 1)])

    def test_parsing(self) -> None:
        """
        The pure parts: job lists (order kept, duplicates dropped, bounds)
        and combined ids, whose positions round-trip percent-encoding.
        """
        self.assertEqual(parseJobs([b"b", b"a", b"b"]), ("b", "a"))
        self.assertRaises(InvalidJobs, parseJobs, [])
        self.assertRaises(InvalidJobs, parseJobs, [b"\xff"])
        self.assertRaises(TooManyJobs, parseJobs, [b"%d" % i for i in range(101)])
        self.assertEqual(len(parseJobs([b"%d" % (i % 100) for i in range(300)])), 100)
        jobs = ["x", "y", "z"]
        tag = jobsTag(jobs)
        self.assertEqual(parsePositions(combinedID(tag, ["0-5", "", "a%2Cb%3A"]), jobs), ["0-5", None, "a,b:"])
        self.assertEqual(parsePositions(combinedID(tag, ["!", "12", ""]), jobs), ["!", "12", None])
        self.assertIsNone(parsePositions(None, jobs))


class LimitsAndTokensTests(_Base):
    jobs = 2
    siteOptions = {"maxStreams": 2, "maxStreamsPerJob": 1, "jwtSecret": SECRET}

    def test_oneStreamManyJobs(self) -> None:
        """
        The stream counts once towards C{--max-streams} and once towards
        each of its live jobs' C{--max-streams-per-job}: a second stream
        of a job it watches is 503 C{too_many_streams}; it frees both when
        it closes.
        """
        a, b = self.ids
        conn = self.open()
        self.assertEqual(splitResponse(conn.take())[0], 200)
        other = self.open(a)
        status, head, body = splitResponse(other.take())
        self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_streams"))
        single = Connection(self.site)
        self.conns.append(single)
        single.request("GET", f"/renders/{b}/events")
        self.assertEqual(splitResponse(single.take())[0], 503)
        conn.disconnect()
        single = Connection(self.site)
        self.conns.append(single)
        single.request("GET", f"/renders/{b}/events")
        self.assertEqual(splitResponse(single.take())[0], 200)
        # Now the global limit (2) is what a third stream meets.
        extra = self.service.submit("ticks", {}).id
        self.assertEqual(splitResponse(self.open(a).take())[0], 200)
        status, _, body = splitResponse(self.open(extra).take())
        self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_streams"))

    def test_scopedTokenMustCoverEveryJob(self) -> None:
        """
        Without a token the ids are the capability; with a scoped token it
        must allow C{watch} on every job asked for (403 names the first it
        does not), C{watch:*} covers all, and a token that is not valid is
        401.
        """
        a, b = self.ids
        now = self.clock.seconds()

        def answer(token: str | None) -> tuple[int, Any]:
            conn = Connection(self.site)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request("GET", self.url(a, b), headers)
            status, _, body = splitResponse(conn.take())
            conn.disconnect()
            return status, json.loads(body) if status >= 400 else None

        status, body = answer(mintToken(SECRET, [f"watch:{a}"], now=now))
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertIn(f"watch:{b}", body["detail"])
        self.assertEqual(answer(mintToken(SECRET, [f"watch:{a}", f"watch:{b}"], now=now))[0], 200)
        self.assertEqual(answer(mintToken(SECRET, ["watch:*"], now=now))[0], 200)
        self.assertEqual(answer(None)[0], 200)
        self.assertEqual(answer("not-a-token")[0], 401)


class SlowClientTests(_Base):
    jobs = 2
    siteOptions = {"writeTimeout": 30.0}

    def test_pausedStreamCatchesUpEveryEvent(self) -> None:
        """
        While the client's connection is full the stream writes nothing;
        when it drains, every job goes on from its last event written:
        every event once, in order, per job (none coalesced away).
        """
        a, b = self.ids
        transport = BufferTransport(limit=1500)
        conn = self.open(transport=transport)
        got = events(splitResponse(transport.drain())[2])
        whenFull = None
        for i in range(1, 40):
            self.progress(a, i)
            self.progress(b, i)
            if transport.full and whenFull is None:
                whenFull = (i, len(transport.value()))
        self.assertIsNotNone(whenFull)
        assert whenFull is not None
        self.assertLess(whenFull[0], 30)
        self.assertEqual(len(transport.value()), whenFull[1], "written to a full connection")
        wire = b""
        while transport.full:
            wire += transport.drain()
        self.finish(a)
        self.finish(b)
        wire += transport.drain()
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        got += events(b"".join(chunks(wire)))
        for jobID in self.ids:
            mine = [(n, d.get("i")) for n, _, d in got if d["job"] == jobID]
            self.assertEqual(mine, [("progress", i) for i in range(1, 40)] + [("complete", None)], jobID)
        conn.disconnect()
        self.assertNothingLeft()

    def test_stalledClientIsDropped(self) -> None:
        """
        A client that reads nothing for the write timeout is disconnected,
        and nothing of its stream is left.
        """
        transport = BufferTransport(limit=100)
        self.open(transport=transport)
        for i in range(1, 5):
            self.progress(self.ids[0], i)
        self.assertTrue(transport.full)
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertNothingLeft()


@implementer(IAsyncJobBroker)
class HeldBroker:
    """
    An L{AsyncMemoryBroker} whose C{subscribe}s wait (as Redis' do while a
    job's history loads) until the test releases or fails them.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        self._async = AsyncMemoryBroker(broker)
        self.held: list[tuple[str, str | None, Any, Deferred[Any]]] = []
        self.cancelled = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._async, name)

    def subscribe(self, jobID: str, lastEventID: str | None, subscriber: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.held.append((jobID, lastEventID, subscriber, d))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for jobID, last, subscriber, d in held:
            if not d.called:
                self._async.subscribe(jobID, last, subscriber).chainDeferred(d)

    def fail(self, error: Exception) -> None:
        held, self.held = self.held, []
        for *_, d in held:
            if not d.called:  # (cancelled: as Redis' waiters, never fired after)
                d.errback(error)


class AsynchronousBrokerTests(SynchronousTestCase):
    """
    The stream over a broker whose subscriptions take time (Redis), driven
    directly: L{MultiEventStreamResource} with a L{StreamPlan}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.memory = MemoryBroker(history=100)
        for jobID in ("a", "b"):
            self.memory.create(snapshot(jobID))
        self.broker = HeldBroker(self.memory)
        self.limits = StreamLimits()

    def open(self, lastEventID: str | None = None) -> Connection:
        plan = self.successResultOf(Deferred.fromCoroutine(planStream(self.broker, ["a", "b"], lastEventID)))
        resource = MultiEventStreamResource(
            self.broker, plan, self.clock, StreamSettings(keepalive=15.0, retry=0, writeTimeout=30.0), self.limits
        )
        conn = Connection(Site(resource, reactor=self.clock))
        conn.request("GET", "/", {"Last-Event-ID": lastEventID} if lastEventID else {})
        return conn

    def test_clientLeavesWhileSubscribing(self) -> None:
        """
        A client that leaves before the broker has answered cancels its
        subscriptions: nothing is subscribed or left running.
        """
        conn = self.open()
        self.assertEqual(splitResponse(conn.take())[2], b": open\n\n")
        self.assertEqual(len(self.broker.held), 2)
        conn.disconnect()
        self.assertEqual(self.broker.cancelled, 2)
        self.assertEqual((self.memory.subscriberCount(), self.limits.open, ours(self.clock)), (0, 0, []))

    def test_replayWhenTheBrokerAnswers(self) -> None:
        """
        Each job's history comes when its subscription does, then live
        events.
        """
        self.memory.publish("a", "progress", {"i": 1})
        self.memory.publish("b", "complete", {})
        conn = self.open()
        conn.take()
        self.broker.release()
        self.memory.publish("a", "progress", {"i": 2})
        got = events(b"".join(chunks(conn.take())))
        tag = jobsTag(["a", "b"])
        self.assertEqual(
            [(n, i, d["job"]) for n, i, d in got],
            [("progress", f"{tag}:1,", "a"), ("complete", f"{tag}:1,1", "b"), ("progress", f"{tag}:2,1", "a")],
        )
        self.memory.publish("a", "failed", {"message": "x"})
        self.assertTrue(conn.take().endswith(b"0\r\n\r\n"))
        self.assertEqual((self.memory.subscriberCount(), self.limits.open), (0, 0))

    def test_brokerUnavailableEndsTheStream(self) -> None:
        """
        When the broker cannot answer (Redis down), the stream ends, and
        the client's reconnect (its last id) resumes every job.
        """
        self.memory.publish("a", "progress", {"i": 1})
        conn = self.open()
        conn.take()
        self.broker.release()
        last = events(b"".join(chunks(conn.take())))[-1][1]
        conn.disconnect()
        again = self.open(last)
        again.take()
        self.broker.fail(RedisUnavailable("redis is down"))
        self.assertTrue(again.take().endswith(b"0\r\n\r\n"))
        self.assertEqual(self.limits.open, 0)
        self.memory.publish("a", "progress", {"i": 2})
        third = self.open(last)
        third.take()
        self.broker.release()
        self.assertEqual([d["i"] for _, _, d in events(b"".join(chunks(third.take())))], [2])
        third.disconnect()

    def test_jobGoneWhileBehind(self) -> None:
        """
        A job that expires while the client is not reading (its terminal
        event was dropped meanwhile) gets its C{expired} event when the
        client reads again; the stream goes on for the others.
        """
        transport = BufferTransport(limit=10)
        plan = self.successResultOf(Deferred.fromCoroutine(planStream(self.broker, ["a", "b"], None)))
        resource = MultiEventStreamResource(self.broker, plan, self.clock, StreamSettings(keepalive=0, retry=0))
        conn = Connection(Site(resource, reactor=self.clock), transport)
        conn.request("GET", "/")
        self.broker.release()
        self.assertTrue(transport.full)
        self.memory.publish("a", "complete", {})
        self.memory.expire("a")
        transport.drain()
        self.broker.release()
        got = events(b"".join(chunks(transport.drain())))
        self.assertEqual([(n, d["job"], d.get("error")) for n, _, d in got], [("expired", "a", "job_expired")])
        self.memory.publish("b", "complete", {})
        wire = transport.drain()
        self.assertEqual([n for n, _, _ in events(b"".join(chunks(wire)))], ["complete"])
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        conn.disconnect()

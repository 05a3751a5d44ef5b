"""
Job events in Redis Streams (L{twistedsse._redisevents}) against a real
redis-server: publishing, history with L{MemoryBroker}'s C{Last-Event-ID}
rules, shared history reads, and the one-loop-per-instance reader.

Redis work is counted with C{INFO commandstats} (reset with C{CONFIG
RESETSTAT}): commands a script runs are counted too.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from tests._support.fixtures import Recorder, snapshot
from tests._support.redis import RedisServer
from tests._support.waiting import whenTrue
from twistedsse import _json
from twistedsse._broker import MemoryBroker
from twistedsse._frames import encodeEvent
from twistedsse._job import Entry
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisevents import RedisEventLog, SharedHistory, parseEventID
from twistedsse._redisreader import RedisEventReader, Reset

#: Last-Event-ID values a client may send that this module never issued.
HOSTILE = [
    "", "garbage", "9" * 30, "0-0", "$", "+", "-", "-1", "0--1", "0-" + "9" * 19, "0-" + "9" * 20,
    "1-1", "12345678901234567890-1", "0-1\n", "0-1 ", " 0-1", "0-\u0663", "0-+1", "0x1", "(0-1",
    "0-1\x00", "*", ">", "0-*",
]  # fmt: skip


def commandstats(connection: Any) -> Deferred[dict[str, int]]:
    """
    C{{command: calls}} from C{INFO commandstats}.
    """

    def parse(text: str) -> dict[str, int]:
        calls = {}
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_") :].partition(":")
                calls[name] = int(fields.split(",")[0].partition("=")[2])
        return calls

    d: Deferred[str] = connection.execute_command("INFO", "commandstats")
    return d.addCallback(parse)


@inlineCallbacks
def waitFor(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        yield deferLater(reactor, 0.002, lambda: None)


class Collector:
    """
    A watcher callback that records what it is given, and fires
    L{Collector.waiting} when it has C{n} entries. L{Collector.reset} is
    an C{onReset}: L{Collector.timeline} has the sequence numbers given and
    the resets, in order.
    """

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.timeline: list[int | Reset] = []
        self.calls = 0
        self._want: tuple[int, Deferred[None]] | None = None

    def reset(self, reset: Reset) -> None:
        self.timeline.append(reset)

    @property
    def resets(self) -> list[Reset]:
        return [item for item in self.timeline if isinstance(item, Reset)]

    def __call__(self, entries: Sequence[Entry]) -> None:
        self.calls += 1
        self.entries.extend(entries)
        self.timeline.extend(entry.seq for entry in entries)
        if self._want is not None and len(self.entries) >= self._want[0]:
            d = self._want[1]
            self._want = None
            d.callback(None)

    def waitFor(self, n: int, timeout: float = 10.0) -> Deferred[None]:
        if len(self.entries) >= n:
            return Deferred.fromCoroutine(_nothing())
        d: Deferred[None] = Deferred()
        self._want = (n, d)
        return d.addTimeout(timeout, reactor)

    @property
    def seqs(self) -> list[int]:
        return [entry.seq for entry in self.entries]


async def _nothing() -> None:
    return None


class RedisTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = RedisServer(appendOnly=self.appendOnly)
        self.addCleanup(self.server.stop)

    appendOnly = False

    def connect(self) -> Any:
        connection = RedisEndpoint.fromURL(self.server.url).connect()
        self.addCleanup(connection.disconnect)
        return connection

    @inlineCallbacks
    def makeLog(self, history: int = 1000, expireAfter: float = 86400.0) -> Any:
        connection = self.connect()
        yield ready(connection, reactor)
        self.admin = connection
        return RedisEventLog(connection, history=history, expireAfter=expireAfter)

    @inlineCallbacks
    def stream(self, log: RedisEventLog, jobID: str) -> Any:
        """
        C{(seq, name, data)} of each entry of C{jobID}'s stream.
        """
        rows = yield self.admin.execute_command("XRANGE", log.key(jobID), "-", "+")
        result = []
        for entryID, fields in rows or ():
            values = dict(zip(fields[::2], fields[1::2]))
            result.append((parseEventID(entryID), values["name"], values["data"]))
        return result

    @inlineCallbacks
    def makeReader(self, **kwargs: Any) -> Any:
        connection = self.connect()
        yield ready(connection, reactor)
        reader = RedisEventReader(connection, self.admin, reactor, **kwargs)
        reader.start()
        self.addCleanup(reader.stop)
        return reader

    @inlineCallbacks
    def resetStats(self) -> Any:
        yield self.admin.execute_command("CONFIG", "RESETSTAT")


class EventLogTests(RedisTestCase):
    @inlineCallbacks
    def test_publishReadBack(self) -> Any:
        """
        Published data comes back exactly as its strict JSON text: strings
        that look like numbers stay strings, ids are C{0-1}, C{0-2}, ...
        and the frame is the encoded event.
        """
        log = yield self.makeLog()
        datas = [{"frame": "0019", "pct": 12.5, "n": 19, "s": "12.5"}, {"x": "\u00e9\n\u2028"}, "0019", None]
        ids = []
        for data in datas:
            ids.append((yield log.publish("j", "progress", data)))
        self.assertEqual(ids, ["0-1", "0-2", "0-3", "0-4"])
        history = yield log.history("j", None)
        self.assertEqual(history.missed, 0)
        self.assertEqual(history.lastSeq, 4)
        self.assertEqual([e.event.data for e in history.entries], [_json.dumps(d) for d in datas])
        self.assertEqual([e.event.id for e in history.entries], ids)
        self.assertEqual({e.event.event for e in history.entries}, {"progress"})
        self.assertEqual([e.frame for e in history.entries], [encodeEvent(e.event) for e in history.entries])
        self.assertEqual([e.event.data for e in (yield log.history("j", "0-2")).entries], [_json.dumps("0019"), "null"])

    @inlineCallbacks
    def test_notJSON(self) -> Any:
        """
        Data that is not strict JSON is refused before anything is sent.
        """
        log = yield self.makeLog()
        self.assertRaises(ValueError, log.publish, "j", "progress", {"pct": float("nan")})
        self.assertRaises(ValueError, log.publishMany, "j", "progress", [{}, float("inf")])
        self.assertEqual((yield self.admin.execute_command("EXISTS", log.key("j"))), 0)

    @inlineCallbacks
    def test_publishManyIsOneCommand(self) -> Any:
        """
        L{RedisEventLog.publishMany} is one command from the client (one
        C{EVALSHA}, one round trip) doing one C{GET} of the end marker and
        one C{XADD} per event; the ids follow on.
        """
        log = yield self.makeLog()
        yield log.publish("j", "progress", {"i": 0})
        yield self.resetStats()
        ids = yield log.publishMany("j", "progress", [{"i": i} for i in range(1, 6)])
        stats = yield commandstats(self.admin)
        self.assertEqual(ids, [f"0-{i}" for i in range(2, 7)])
        self.assertEqual(stats.get("evalsha"), 1)
        self.assertEqual(stats.get("xadd"), 5)
        self.assertEqual(stats.get("get"), 1)
        self.assertEqual(sum(stats.values()) - stats["xadd"], 3)  # EVALSHA, GET, and the INFO asking
        history = yield log.history("j", "0-1")
        self.assertEqual([e.event.data for e in history.entries], [_json.dumps({"i": i}) for i in range(1, 6)])
        self.assertEqual((yield log.publishMany("j", "progress", [])), [])

    @inlineCallbacks
    def test_trimmedWithReset(self) -> Any:
        """
        A stream keeps about C{history} entries (at least that many); a
        resume from before them is told how many it missed, and the
        reset's id is the one before the first retained entry.
        """
        log = yield self.makeLog(history=10)
        for start in range(0, 350, 50):
            yield log.publishMany("j", "progress", [{"i": i} for i in range(start + 1, start + 51)])
        length = yield self.admin.execute_command("XLEN", log.key("j"))
        self.assertTrue(10 <= length < 350, length)
        first = 350 - length + 1
        history = yield log.history("j", "0-5")
        self.assertEqual(history.missed, first - 6)
        self.assertEqual(history.resetID, f"0-{first - 1}")
        self.assertEqual([e.seq for e in history.entries], list(range(first, 351)))
        history = yield log.history("j", f"0-{first - 1}")
        self.assertEqual((history.missed, len(history.entries)), (0, length))
        history = yield log.history("j", "0-349")
        self.assertEqual(([e.seq for e in history.entries], history.missed), ([350], 0))
        history = yield log.history("j", "0-350")
        self.assertEqual((history.entries, history.missed, history.lastSeq), ((), 0, 350))

    @inlineCallbacks
    def test_sameAsMemoryBroker(self) -> Any:
        """
        For the same retained events, every C{Last-Event-ID} (issued ones,
        hostile ones, ones ahead of the last) gets what L{MemoryBroker}
        gives the same id in its own numbering: the same events, the same
        reset and count.
        """
        log = yield self.makeLog(history=10)
        yield log.publishMany("j", "progress", [{"i": i} for i in range(1, 251)])
        length = yield self.admin.execute_command("XLEN", log.key("j"))
        memory = MemoryBroker(history=length)
        memory.create(snapshot("j"))
        memory.publishMany("j", "progress", [{"i": i} for i in range(1, 251)])
        cases = [f"0-{n}" for n in (1, 2, 100, 250 - length - 1, 250 - length, 250 - length + 1, 249, 250, 251, 10**6)]
        cases += HOSTILE + [None]
        for lastEventID in cases:
            history = yield log.history("j", lastEventID)
            recorder = Recorder()
            memoryID = lastEventID[2:] if lastEventID and lastEventID in cases[:10] else lastEventID
            memory.subscribe("j", memoryID, recorder)()
            expected = [(e.event, e.data) for e, _ in recorder.got]
            got = [(e.event.event, e.event.data) for e in history.entries]
            if history.missed:
                got.insert(0, ("reset", _json.dumps({"state": "queued", "progress": None, "missed": history.missed})))
                self.assertEqual(recorder.got[0][0].id, history.resetID[2:])  # type: ignore[index]
            self.assertEqual(got, expected, lastEventID)

    def test_parseEventID(self) -> None:
        """
        Only C{0-N} ids (N from 1 to 2**63 - 1) are read; everything else
        means none (0), so no client text is ever sent to Redis.
        """
        self.assertEqual(parseEventID("0-1"), 1)
        self.assertEqual(parseEventID("0-0042"), 42)
        self.assertEqual(parseEventID(f"0-{2**63 - 1}"), 2**63 - 1)
        self.assertEqual(parseEventID(f"0-{2**63}"), 0)
        self.assertEqual(parseEventID(None), 0)
        for value in HOSTILE:
            self.assertEqual(parseEventID(value), 0, value)

    @inlineCallbacks
    def test_missingStream(self) -> Any:
        """
        A job with no events yet (no stream): an empty history from 0,
        whatever the id.
        """
        log = yield self.makeLog()
        for lastEventID in (None, "0-5", "junk"):
            history = yield log.history("none", lastEventID)
            self.assertEqual((history.entries, history.missed, history.lastSeq), ((), 0, 0))


class WriteTokenTests(RedisTestCase):
    @inlineCallbacks
    def test_retriedWriteIsNotRepeated(self) -> Any:
        """
        A write sent again with its token (a retry after a lost reply, or a
        command Redis got twice) adds nothing and answers the first ids.
        """
        log = yield self.makeLog()
        first = yield log.publishMany("j", "progress", [{"n": 1}, {"n": 2}], token="w1:1")
        again = yield log.publishMany("j", "progress", [{"n": 1}, {"n": 2}], token="w1:1")
        self.assertEqual(again, first)
        later = yield log.publishMany("j", "progress", [{"n": 3}], token="w1:2")
        self.assertEqual((first, later), (["0-1", "0-2"], ["0-3"]))
        self.assertEqual(int((yield self.admin.execute_command("XLEN", log.key("j")))), 3)

    @inlineCallbacks
    def test_anotherRunTakesTheEventsOver(self) -> Any:
        """
        Once a new run has taken a job's events over (its C{retrying}
        event, mode C{take}), what the earlier run still sends is refused
        (C{STALE}); the new run's writes go on; the terminal event ends the
        token's life.
        """
        log = yield self.makeLog()
        yield log.publishMany("j", "progress", [{"n": 1}], token="old:1")
        yield log.publishMany("j", "retrying", [{"attempt": 2}], token="new:1", take=True)
        failure = yield self.assertFailure(log.publishMany("j", "progress", [{"n": 2}], token="old:2"), Exception)
        self.assertIn("STALE", str(failure))
        self.assertEqual((yield log.publishMany("j", "progress", [{"n": 1}], token="new:2")), ["0-3"])
        yield log.publish("j", "complete", {})
        self.assertEqual(int((yield self.admin.execute_command("EXISTS", log.writerKey("j")))), 0)


class FinishedJobTests(RedisTestCase):
    @inlineCallbacks
    def test_commandsPerOperation(self) -> Any:
        """
        Redis commands (C{INFO commandstats}, a script's counted) per
        operation: a publish is C{EVALSHA} + C{GET} + C{XADD}; a terminal
        publish adds C{PEXPIRE}, C{SET} and C{DEL} (the write token); the compaction that follows is
        C{EVALSHA} + C{GET} + one C{XREVRANGE} (the progress is near the
        end) + C{XTRIM} (and one C{XDEL} when entries other than progress
        come between them).
        """
        log = yield self.makeLog(expireAfter=60)
        yield log.publish("warm", "complete", {})  # EVAL once: the scripts are cached
        yield log.compact("warm")
        measured = {}
        for label, operation in [
            ("publish", lambda: log.publish("j", "progress", {"i": 1})),
            ("publishMany(10)", lambda: log.publishMany("j", "progress", [{"i": i} for i in range(10)])),
            ("terminal publish", lambda: log.publish("j", "complete", {})),
            ("compact", lambda: log.compact("j")),
            ("compact, a retrying after the progress", None),
        ]:
            if operation is None:
                yield log.publishMany("k", "progress", [{"i": i} for i in range(10)])
                yield log.publish("k", "retrying", {})
                yield log.publish("k", "failed", {})
                operation = lambda: log.compact("k")  # noqa: E731
            yield self.resetStats()
            yield operation()
            stats = yield commandstats(self.admin)
            # (INFO counts itself once it has answered: not in its own reply)
            measured[label] = {name: n for name, n in sorted(stats.items()) if n and not name.startswith("config")}
        print("\nRedis commands per operation:", measured)
        self.assertEqual(measured["publish"], {"evalsha": 1, "get": 1, "xadd": 1})
        self.assertEqual(measured["publishMany(10)"], {"evalsha": 1, "get": 1, "xadd": 10})
        self.assertEqual(
            measured["terminal publish"], {"evalsha": 1, "get": 1, "xadd": 1, "pexpire": 1, "set": 1, "del": 1}
        )
        compact = {"evalsha": 1, "get": 1, "xrevrange": 1, "xtrim": 1}
        self.assertEqual(measured["compact"], compact)
        self.assertEqual(measured["compact, a retrying after the progress"], {**compact, "xdel": 1})

    @inlineCallbacks
    def test_refusedAfterTerminal(self) -> Any:
        """
        After a terminal event, a job's stream takes nothing more (as
        L{MemoryBroker}): publish and publishMany fail with L{ValueError},
        another terminal event too, and the stream is left as it was.
        publishMany refuses a terminal event's name at once.
        """
        log = yield self.makeLog()
        for terminal in ("complete", "failed", "cancelled"):
            job = f"job-{terminal}"
            yield log.publishMany(job, "progress", [{"i": 1}, {"i": 2}])
            self.assertEqual((yield log.publish(job, terminal, {"why": 1})), "0-3")
            before = yield self.stream(log, job)
            for name in ("progress", "retrying", "complete", "failed", "cancelled"):
                failure = yield self.assertFailure(log.publish(job, name, {}), ValueError)
                self.assertIn("after its terminal event (0-3)", str(failure))
            yield self.assertFailure(log.publishMany(job, "progress", [{}, {}]), ValueError)
            self.assertEqual((yield self.stream(log, job)), before)
            self.assertRaises(ValueError, log.publishMany, job, terminal, [{}])
        self.assertRaises(ValueError, log.publishMany, "fresh", "complete", [{}])
        self.assertEqual((yield self.admin.execute_command("EXISTS", log.key("fresh"))), 0)

    @inlineCallbacks
    def test_terminalRace(self) -> Any:
        """
        Two writers on two connections, one publishing 200 progress events
        (all sent at once) and one the terminal event among them: every
        progress event is either in the stream before the terminal event or
        refused, never after it.
        """
        log = yield self.makeLog()
        other = self.connect()
        yield ready(other, reactor)
        racer = RedisEventLog(other)
        yield log.publish("j", "progress", {"i": 0})
        progress = [racer.publish("j", "progress", {"i": i}) for i in range(1, 201)]
        terminal = log.publish("j", "complete", {})
        progress += [racer.publish("j", "progress", {"i": i}) for i in range(201, 401)]
        results = yield DeferredList(progress, consumeErrors=True)
        terminalID = yield terminal
        accepted = [parseEventID(value) for ok, value in results if ok]
        refused = [value for ok, value in results if not ok]
        for failure in refused:
            failure.trap(ValueError)
        self.assertEqual(len(accepted) + len(refused), 400)
        self.assertTrue(refused)
        self.assertTrue(all(seq < parseEventID(terminalID) for seq in accepted))
        self.assertEqual(parseEventID(terminalID), len(accepted) + 2)
        kept = yield self.stream(log, "j")
        # (How many got in before the terminal event depends on how the two
        # connections' writes interleave; none after it.)
        self.assertEqual([name for _, name, _ in kept], ["progress"] * (len(accepted) + 1) + ["complete"])
        self.assertEqual(kept[-1][0], parseEventID(terminalID))

    @inlineCallbacks
    def test_finishedKeepsWhatMemoryKeeps(self) -> Any:
        """
        Compacted after its terminal event, a stream keeps what
        L{MemoryBroker} keeps of a finished job (L{MemoryBroker.finalEvents}:
        the latest progress and the terminal event), and answers every
        C{Last-Event-ID} as L{MemoryBroker} does then (same events, same
        reset and count). Compacting again, or a job not ended, removes
        nothing.
        """
        log = yield self.makeLog(history=1000)
        cases = {
            "plain": ["progress"] * 5 + ["complete"],
            "retried": ["progress"] * 5 + ["retrying"] + ["progress"] * 3 + ["retrying", "retrying", "failed"],
            "alone": ["cancelled"],
            "noProgress": ["retrying", "retrying", "cancelled"],
            # 300 entries to read back before the progress: the scan
            # grows (4, 16, 64, 256...).
            "far": ["progress"] * 20 + ["retrying"] * 300 + ["complete"],
            "onlyOthers": ["retrying"] * 200 + ["failed"],
        }
        yield log.publishMany("running", "progress", [{}, {}])
        self.assertEqual((yield log.compact("running")), 0)
        self.assertEqual((yield log.compact("none")), 0)
        self.assertEqual(len((yield self.stream(log, "running"))), 2)
        self.assertEqual((yield self.admin.execute_command("EXISTS", log.key("none"))), 0)
        for jobID, names in cases.items():
            memory = MemoryBroker(history=1000)
            memory.create(snapshot(jobID))
            for i, name in enumerate(names, 1):
                memory.publish(jobID, name, {"i": i})
                yield log.publish(jobID, name, {"i": i})
            removed = yield log.compact(jobID)
            self.assertEqual(removed, len(names) - len(memory.finalEvents(jobID)))
            self.assertEqual((yield log.compact(jobID)), 0)
            self.assertEqual((yield self.stream(log, jobID)), memory.finalEvents(jobID), jobID)
            ids = [None, "garbage"] + [f"0-{n}" for n in range(0, len(names) + 3)]
            for lastEventID in ids:
                history = yield log.history(jobID, lastEventID)
                recorder = Recorder()
                memory.subscribe(jobID, lastEventID[2:] if lastEventID and lastEventID.startswith("0-") else lastEventID, recorder)()
                expected = [(e.event, e.id, e.data) for e, _ in recorder.got]
                got = [(e.event.event, e.event.id[2:], e.event.data) for e in history.entries]  # type: ignore[index]
                if history.missed:
                    data = {"state": "queued", "progress": None, "missed": history.missed}
                    got.insert(0, ("reset", history.resetID[2:], _json.dumps(data)))  # type: ignore[index]
                self.assertEqual(got, expected, (jobID, lastEventID))

    @inlineCallbacks
    def test_compactedAfterSettling(self) -> Any:
        """
        With a clock, the log compacts a job's stream C{settle} seconds
        after it published its terminal event, not before; L{stop} cancels
        a compaction not done (the stream stays whole).
        """
        yield self.makeLog()
        clock = Clock()
        log = RedisEventLog(self.admin, clock=clock, settle=5.0)
        for jobID in ("j", "k"):
            yield log.publishMany(jobID, "progress", [{"i": i} for i in range(1, 6)])
            yield log.publish(jobID, "retrying", {})
            yield log.publish(jobID, "complete", {})
            self.assertEqual(len((yield self.stream(log, jobID))), 7)
        clock.advance(4.9)
        self.assertEqual(len((yield self.stream(log, "j"))), 7)
        clock.advance(0.1)  # (the same connection: the read follows the compaction)
        kept = yield self.stream(log, "j")
        self.assertEqual([(seq, name) for seq, name, _ in kept], [(5, "progress"), (7, "complete")])
        yield log.publish("l", "failed", {})
        log.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_expiry(self) -> Any:
        """
        A stream has no expiry until its terminal event; that event's
        script sets C{expireAfter} on the stream and twice that on its end
        marker, which goes on refusing events once the stream has gone.
        C{expireAfter} 0: neither expires.
        """
        log = yield self.makeLog(expireAfter=0.3)
        yield log.publish("j", "progress", {})
        self.assertEqual((yield self.admin.execute_command("PTTL", log.key("j"))), -1)
        yield log.publish("j", "complete", {})
        streamTTL = yield self.admin.execute_command("PTTL", log.key("j"))
        markerTTL = yield self.admin.execute_command("PTTL", log.endKey("j"))
        self.assertTrue(0 < streamTTL <= 300, streamTTL)
        self.assertTrue(300 < markerTTL <= 600, markerTTL)
        exists: list[int] = [1]

        @inlineCallbacks
        def gone() -> Any:
            while exists[0]:
                yield deferLater(reactor, 0.02, lambda: None)
                exists[0] = yield self.admin.execute_command("EXISTS", log.key("j"))

        yield gone().addTimeout(5, reactor)
        yield self.assertFailure(log.publish("j", "progress", {}), ValueError)
        self.assertEqual((yield self.admin.execute_command("EXISTS", log.key("j"))), 0)
        never = RedisEventLog(self.admin, expireAfter=0)
        yield never.publish("k", "progress", {})
        yield never.publish("k", "failed", {})
        self.assertEqual((yield self.admin.execute_command("PTTL", never.key("k"))), -1)
        self.assertEqual((yield self.admin.execute_command("PTTL", never.endKey("k"))), -1)
        self.assertEqual((yield self.admin.execute_command("GET", never.endKey("k"))), "0-2")


class SharedHistoryTests(RedisTestCase):
    @inlineCallbacks
    def test_massReconnect(self) -> Any:
        """
        10 000 resumes of three jobs made at once (with various ids,
        garbage ones too) cost one C{XRANGE} per job, and each gets what a
        read of its own would give.
        """
        log = yield self.makeLog(history=1000)
        for job in ("a", "b", "c"):
            yield log.publishMany(job, "progress", [{"job": job, "i": i} for i in range(1, 201)])
        shared = SharedHistory(log, reactor)
        self.addCleanup(shared.stop)
        ids = ["0-200", "0-199", "0-150", None, "garbage", "0-999", "0-1"]
        requests = [(job, ids[i % len(ids)]) for i, job in zip(range(10_000), ["a", "b", "c"] * 4000)]
        yield self.resetStats()
        results = yield gatherResults([shared.history(job, lastEventID) for job, lastEventID in requests])
        stats = yield commandstats(self.admin)
        self.assertEqual(stats.get("xrange"), 3)
        self.assertEqual(shared.reads, 3)
        self.assertNotIn("xrevrange", stats)
        own = {}
        for job in ("a", "b", "c"):
            for lastEventID in ids:
                own[job, lastEventID] = yield log.history(job, lastEventID)
        for (job, lastEventID), history in zip(requests, results):
            self.assertEqual(history, own[job, lastEventID])

    @inlineCallbacks
    def test_joinsARead(self) -> Any:
        """
        A resume made while a read of its job is out joins it when that
        read covers it (it started from an older id); one from an older
        id than the read's makes a read of its own.
        """
        log = yield self.makeLog()
        yield log.publishMany("a", "progress", [{"i": i} for i in range(1, 21)])
        shared = SharedHistory(log, reactor)
        yield self.resetStats()
        first = shared.history("a", "0-10")
        yield deferLater(reactor, 0, lambda: None)  # the read is out
        self.assertEqual(shared.reads, 1)
        later = shared.history("a", "0-15")
        older = shared.history("a", "0-5")
        results = yield gatherResults([first, later, older])
        self.assertEqual([[e.seq for e in h.entries][:1] for h in results], [[11], [16], [6]])
        self.assertEqual(shared.reads, 2)
        self.assertEqual((yield commandstats(self.admin)).get("xrange"), 2)

    @inlineCallbacks
    def test_stop(self) -> Any:
        """
        L{SharedHistory.stop} cancels reads not started yet.
        """
        log = yield self.makeLog()
        shared = SharedHistory(log, reactor)
        d = shared.history("a", None)
        shared.stop()
        self.failureResultOf(d).trap(Exception)


class ReaderTests(RedisTestCase):
    @inlineCallbacks
    def test_watchersShareAPosition(self) -> Any:
        """
        Two watchers of one job get every entry once, in order, from one
        stream position; the entries (and their frames) are the same
        objects for both.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader()
        one, two = Collector(), Collector()
        reader.watch("j", 0, one)
        reader.watch("j", 0, two)
        for i in range(1, 21):
            yield log.publish("j", "progress", {"i": i})
        yield gatherResults([one.waitFor(20), two.waitFor(20)])
        self.assertEqual(one.seqs, list(range(1, 21)))
        self.assertEqual(two.seqs, list(range(1, 21)))
        self.assertTrue(all(a is b for a, b in zip(one.entries, two.entries)))
        self.assertEqual(reader.watching(), 1)

    @inlineCallbacks
    def test_readsDoNotScaleWithWatchers(self) -> Any:
        """
        The XREAD calls per event are the same with 1 and with 100
        watchers of a job (events published one at a time, each awaited):
        Redis read work per event is per instance.
        """
        log = yield self.makeLog()
        perEvent = {}
        for n, job in ((1, "one"), (100, "hundred")):
            reader = yield self.makeReader()
            collectors = [Collector() for _ in range(n)]
            for collector in collectors:
                reader.watch(job, 0, collector)
            yield waitFor(lambda reader=reader: reader.reads >= 1)
            yield self.resetStats()
            for i in range(1, 51):
                yield log.publish(job, "progress", {"i": i})
                yield gatherResults([c.waitFor(i) for c in collectors])
            stats = yield commandstats(self.admin)
            perEvent[n] = stats["xread"] / 50
            self.assertEqual(stats["xadd"], 50)
            self.assertEqual({tuple(c.seqs) for c in collectors}, {tuple(range(1, 51))})
            yield reader.stop()
        print(f"\nXREAD calls per event: 1 watcher {perEvent[1]:.2f}, 100 watchers {perEvent[100]:.2f}")
        self.assertLessEqual(perEvent[1], 1.1)
        self.assertLessEqual(perEvent[100], 1.1)
        self.assertLess(abs(perEvent[100] - perEvent[1]), 0.1)

    @inlineCallbacks
    def test_latency(self) -> Any:
        """
        From publish to a watcher's callback, on loopback (median of 50,
        printed); and from watching a job to its first entry while the
        loop is blocked on another job: with C{CLIENT UNBLOCK}, not the
        rest of the BLOCK.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader()
        collector = Collector()
        reader.watch("live", 0, collector)
        yield waitFor(lambda: reader.reads >= 1)
        samples = []
        for i in range(1, 51):
            start = time.perf_counter()
            log.publish("live", "progress", {"i": i})
            yield collector.waitFor(i)
            samples.append(time.perf_counter() - start)
        publishToCallback = statistics.median(samples)
        newWatch = {}
        for wakeup in (True, False):
            reader = yield self.makeReader(wakeup=wakeup)
            reader.watch("idle", 0, Collector())
            times = []
            for i in range(10 if wakeup else 5):
                job = f"new-{wakeup}-{i}"
                yield log.publish(job, "progress", {})
                yield deferLater(reactor, 0.05, lambda: None)  # the loop is blocked
                collector = Collector()
                start = time.perf_counter()
                reader.watch(job, 0, collector)
                yield collector.waitFor(1, timeout=5)
                times.append(time.perf_counter() - start)
            newWatch[wakeup] = statistics.median(times)
            yield reader.stop()
        print(
            f"\npublish -> callback median {publishToCallback * 1000:.2f} ms (max {max(samples) * 1000:.2f});"
            f" new watch -> first entry median {newWatch[True] * 1000:.2f} ms with CLIENT UNBLOCK,"
            f" {newWatch[False] * 1000:.1f} ms waiting for BLOCK 1000"
        )
        self.assertLess(publishToCallback, 0.5)
        self.assertLess(newWatch[True], 0.5)

    @inlineCallbacks
    def test_terminalEndsTheWatch(self) -> Any:
        """
        A terminal event is delivered, then the job is no longer read;
        unwatching afterwards does no harm.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader()
        collector = Collector()
        unwatch = reader.watch("j", 0, collector)
        yield log.publishMany("j", "progress", [{"i": 1}, {"i": 2}])
        yield log.publish("j", "complete", {"output": "x"})
        yield collector.waitFor(3)
        self.assertEqual([e.event.event for e in collector.entries], ["progress", "progress", "complete"])
        self.assertEqual(reader.watching(), 0)
        unwatch()
        self.assertEqual(reader.watching(), 0)

    @inlineCallbacks
    def test_unwatch(self) -> Any:
        """
        Once its last watcher has gone, a job is no longer read, and the
        gone watcher gets nothing more.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader()
        gone, staying = Collector(), Collector()
        unwatchGone = reader.watch("j", 0, gone)
        unwatchStaying = reader.watch("j", 0, staying)
        yield log.publish("j", "progress", {"i": 1})
        yield gatherResults([gone.waitFor(1), staying.waitFor(1)])
        unwatchGone()
        yield log.publish("j", "progress", {"i": 2})
        yield staying.waitFor(2)
        self.assertEqual(gone.seqs, [1])
        unwatchStaying()
        self.assertEqual(reader.watching(), 0)

    @inlineCallbacks
    def test_joiningBehind(self) -> Any:
        """
        A watcher joining behind the shared position gets what it lacks
        first, once: from the kept tail when it covers it, else read from
        Redis by the loop; one joining ahead gets only what follows its id.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader(tailSize=5)
        first = Collector()
        reader.watch("j", 0, first)
        yield log.publishMany("j", "progress", [{"i": i} for i in range(1, 11)])
        yield first.waitFor(10)
        fromTail, fromRedis, ahead = Collector(), Collector(), Collector()
        reader.watch("j", 7, fromTail)
        self.assertEqual(fromTail.seqs, [8, 9, 10])  # at once, no Redis
        reader.watch("j", 2, fromRedis)
        reader.watch("j", 12, ahead)
        yield fromRedis.waitFor(8)
        self.assertEqual(fromRedis.seqs, list(range(3, 11)))
        yield log.publishMany("j", "progress", [{"i": i} for i in range(11, 14)])
        yield gatherResults([c.waitFor(n) for c, n in ((first, 13), (fromTail, 6), (fromRedis, 11), (ahead, 1))])
        self.assertEqual(first.seqs, list(range(1, 14)))
        self.assertEqual(fromTail.seqs, list(range(8, 14)))
        self.assertEqual(fromRedis.seqs, list(range(3, 14)))
        self.assertEqual(ahead.seqs, [13])

    @inlineCallbacks
    def test_stopWhileBlocked(self) -> Any:
        """
        L{RedisEventReader.stop} while the XREAD blocks fires well within
        the BLOCK (the read is unblocked), and leaves nothing running
        (trial fails a test that leaves a timer or a call behind).
        """
        yield self.makeLog()
        reader = yield self.makeReader(block=1000)
        reader.watch("j", 0, Collector())
        yield waitFor(lambda: reader.reads >= 1)
        yield deferLater(reactor, 0.05, lambda: None)
        start = time.perf_counter()
        yield reader.stop()
        self.assertLess(time.perf_counter() - start, 0.5)
        self.assertRaises(RuntimeError, reader.watch, "j", 0, Collector())

    @inlineCallbacks
    def test_stopIdleAndStopWhileDown(self) -> Any:
        """
        L{RedisEventReader.stop} ends an idle loop at once, and one waiting
        to retry with Redis down.
        """
        yield self.makeLog()
        idle = yield self.makeReader()
        yield idle.stop()
        reader = yield self.makeReader(retryDelay=5.0, maxRetryDelay=5.0, grace=0.2)
        reader.watch("j", 0, Collector())
        yield waitFor(lambda: reader.reads >= 1)
        self.server.stop(remove=False)
        yield waitFor(lambda: reader.errors >= 1)
        start = time.perf_counter()
        yield reader.stop()
        self.assertLess(time.perf_counter() - start, 0.5)
        self.flushLoggedErrors()


class RestartTests(RedisTestCase):
    appendOnly = True

    @inlineCallbacks
    def test_restartWithAOF(self) -> Any:
        """
        Redis killed (SIGKILL, AOF with fsync always) and restarted in the
        middle of a job's stream: the reader backs off, resumes from its
        position, and every event arrives exactly once, in order, those
        published while it was away included; the check of its position
        after the failure finds the stream whole: no reset.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader(retryDelay=0.05, maxRetryDelay=0.2)
        collector = Collector()
        reader.watch("j", 0, collector, collector.reset)
        for i in range(1, 31):
            yield log.publish("j", "progress", {"i": i})
        yield collector.waitFor(30)
        self.server.kill()
        yield waitFor(lambda: reader.errors >= 1)
        self.server.start()
        yield ready(self.admin, reactor, timeout=10)
        yield log.publishMany("j", "progress", [{"i": i} for i in range(31, 61)])
        for i in range(61, 71):
            yield log.publish("j", "progress", {"i": i})
        yield log.publish("j", "complete", {})
        yield collector.waitFor(71, timeout=20)
        self.assertEqual(collector.timeline, list(range(1, 72)))
        self.assertEqual([e.event.data for e in collector.entries[:70]], [_json.dumps({"i": i}) for i in range(1, 71)])
        self.assertEqual(reader.watching(), 0)
        self.assertGreaterEqual(reader.verifications, 1)
        self.assertEqual(reader.losses, 0)
        self.flushLoggedErrors()


class RestartWithoutAOFTests(RedisTestCase):
    """
    Redis stopped and started again without persistence (C{--save ""},
    no AOF): its streams are gone, and start again at C{0-1}.
    """

    appendOnly = False

    @inlineCallbacks
    def restart(self, reader: RedisEventReader) -> Any:
        self.server.stop(remove=False)
        yield waitFor(lambda: reader.errors >= 1)
        self.server.start()
        yield ready(self.admin, reactor, timeout=10)

    @inlineCallbacks
    def test_lostStreamIsReset(self) -> Any:
        """
        The reader finds its position gone, tells the watchers with a
        reset (seq 0, missed unknown), then gives them the new stream
        from C{0-1}: none of it lost, none repeated; a job it watched from
        a client's id (no entry read yet) too. A client resuming with an id
        ahead of the new stream's end gets all of it (as L{MemoryBroker}
        does for an id it did not issue).
        """
        log = yield self.makeLog()
        reader = yield self.makeReader(retryDelay=0.05, maxRetryDelay=0.2)
        live, fromID = Collector(), Collector()
        reader.watch("j", 0, live, live.reset)
        for i in range(1, 31):
            yield log.publish("j", "progress", {"epoch": 1, "i": i})
        yield log.publish("k", "progress", {"epoch": 1})
        reader.watch("k", 1, fromID, fromID.reset)
        yield live.waitFor(30)
        # The loop has read the entry at k's position before Redis goes: it
        # cannot tell a lost stream from the one it had otherwise (this
        # test's race until it waited for it: the loop's learning pass
        # could come after the restart, and take the new 0-1 for the old).
        yield whenTrue(reactor, lambda: reader._jobs["k"].known, 5, "k's position read")
        yield self.restart(reader)
        ids = yield log.publishMany("j", "progress", [{"epoch": 2, "i": i} for i in range(1, 4)])
        self.assertEqual(ids, ["0-1", "0-2", "0-3"])
        history = yield log.history("j", "0-30")
        self.assertEqual(([e.seq for e in history.entries], history.missed), ([1, 2, 3], 0))
        yield log.publish("k", "progress", {"epoch": 2})
        yield live.waitFor(33, timeout=20)
        yield fromID.waitFor(1, timeout=20)
        for i in range(4, 11):
            yield log.publish("j", "progress", {"epoch": 2, "i": i})
        yield log.publish("j", "complete", {})
        yield live.waitFor(41, timeout=20)
        self.assertEqual(live.timeline, [*range(1, 31), Reset(0, None), *range(1, 12)])
        epochs = [_json.loads(e.event.data) for e in live.entries[:40]]
        self.assertEqual(epochs, [{"epoch": 1, "i": i} for i in range(1, 31)] + [{"epoch": 2, "i": i} for i in range(1, 11)])
        self.assertEqual(fromID.timeline, [Reset(0, None), 1])
        self.assertEqual(reader.losses, 2)
        self.assertEqual(reader.watching(), 1)  # k, not ended
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_newStreamPastThePosition(self) -> Any:
        """
        The new stream already has more entries than the reader's position
        when it checks: the entry there is another one, so it is a reset
        all the same, and the whole new stream follows (not just what
        comes after the old position).
        """
        log = yield self.makeLog()
        # The reader waits 2 s after the failure: the new stream is
        # written well before it checks.
        reader = yield self.makeReader(retryDelay=2.0, maxRetryDelay=2.0)
        collector = Collector()
        reader.watch("j", 0, collector, collector.reset)
        yield log.publishMany("j", "progress", [{"epoch": 1, "i": i} for i in range(1, 31)])
        yield collector.waitFor(30)
        yield self.restart(reader)
        self.assertEqual(reader.verifications, 0)
        yield log.publishMany("j", "progress", [{"epoch": 2, "i": i} for i in range(1, 41)])
        yield collector.waitFor(70, timeout=20)
        self.assertEqual(collector.timeline, [*range(1, 31), Reset(0, None), *range(1, 41)])
        self.assertEqual([_json.loads(e.event.data)["epoch"] for e in collector.entries], [1] * 30 + [2] * 40)
        self.assertEqual((reader.verifications, reader.losses), (1, 1))
        self.flushLoggedErrors()


class SkippedEntriesTests(RedisTestCase):
    @inlineCallbacks
    def test_trimmedBeforeCatchingUp(self) -> Any:
        """
        A watcher joining behind entries trimmed away since its history was
        read is told how many it missed (a reset, as L{History} counts),
        then given what is left.
        """
        log = yield self.makeLog(history=10)
        reader = yield self.makeReader(tailSize=5)
        first = Collector()
        reader.watch("j", 0, first, first.reset)
        for start in range(0, 300, 50):
            yield log.publishMany("j", "progress", [{"i": i} for i in range(start + 1, start + 51)])
        yield first.waitFor(1)
        yield waitFor(lambda: first.timeline[-1] == 300)
        late = Collector()
        reader.watch("j", 2, late, late.reset)
        yield late.waitFor(1)
        firstKept = late.entries[0].seq
        self.assertGreater(firstKept, 3)
        self.assertEqual(late.timeline, [Reset(firstKept - 1, firstKept - 3), *range(firstKept, 301)])

    @inlineCallbacks
    def test_finishedUnderThePosition(self) -> Any:
        """
        A job that finished (its stream shrunk to its last progress and
        terminal event) past the position a watch starts at: a reset for
        each run of entries gone, with its count, then the terminal event.
        """
        log = yield self.makeLog()
        reader = yield self.makeReader()
        names = ["progress"] * 40 + ["retrying"] * 4 + ["complete"]
        for i, name in enumerate(names, 1):
            yield log.publish("j", name, {"i": i})
        yield log.compact("j")
        collector = Collector()
        reader.watch("j", 38, collector, collector.reset)
        yield collector.waitFor(2)
        self.assertEqual(collector.timeline, [Reset(39, 1), 40, Reset(44, 4), 45])
        self.assertEqual(reader.watching(), 0)

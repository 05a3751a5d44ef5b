"""
L{RedisBroker} against a real redis-server: the L{IAsyncJobBroker}
contract (the suite L{AsyncMemoryBroker} passes), and what the mirror is
for: Redis work per event that does not depend on the number of local
subscribers, history loads shared, two instances on one Redis.

Redis work is counted with C{INFO commandstats} (reset with C{CONFIG
RESETSTAT}): commands a script runs are counted too.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support.fixtures import Recorder, snapshot
from tests._support.redis import RedisServer
from tests.redis.test_events import commandstats
from tests.test_brokercontract import AsyncBrokerContract, ended
from twistedsse import _json
from twistedsse._errors import JobExpired, UnknownJob
from twistedsse._job import JobState
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisbroker import RedisBroker
from twistedsse._redisevents import RedisEventLog
from twistedsse._redisreader import RedisEventReader
from twistedsse._redisstate import RedisJobState, RedisUnavailable


class RedisBrokerTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)
        self.admin: Any = None

    @inlineCallbacks
    def connect(self) -> Any:
        connection = RedisEndpoint.fromURL(self.server.url).connect()
        self.addCleanup(connection.disconnect)
        yield ready(connection, reactor)
        return connection

    @inlineCallbacks
    def makeBroker(self, history: int = 100) -> Any:
        """
        A started L{RedisBroker}, as a web instance has one: a connection
        for state and writes, one for the reading loop.
        """
        connection = yield self.connect()
        if self.admin is None:
            self.admin = connection
        reading = yield self.connect()
        broker = RedisBroker(
            RedisJobState(connection, reactor),
            RedisEventLog(connection, history=history),
            RedisEventReader(reading, connection, reactor),
            reactor,
            history=history,
        )
        broker.start()
        self.addCleanup(broker.stop)
        return broker

    @inlineCallbacks
    def settle(self, predicate: Callable[[], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"never true within {timeout} s: {predicate}")
            yield deferLater(reactor, 0.002, lambda: None)


class RedisBrokerContractTests(AsyncBrokerContract, RedisBrokerTestCase):
    """
    The contract on L{RedisBroker}.
    """


def perEvent(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, float]:
    """
    Redis commands per event between two C{commandstats}, without the
    C{INFO} and C{CONFIG} that measure.
    """
    return {
        name: (after.get(name, 0) - before.get(name, 0)) / events
        for name in after
        if name not in ("info", "config|resetstat", "config") and after.get(name, 0) != before.get(name, 0)
    }


class MirrorTests(RedisBrokerTestCase):
    @inlineCallbacks
    def publishAndCount(self, broker: RedisBroker, jobID: str, subscribers: int, events: int) -> Any:
        """
        Subscribe C{subscribers} to a new job, then publish C{events} one at
        a time, each once every subscriber has the one before; return the
        Redis commands per event, and the recorders.
        """
        yield broker.create(snapshot(jobID))
        recorders = [Recorder() for _ in range(subscribers)]
        reads = broker.reader.reads
        unsubscribes = yield gatherResults([broker.subscribe(jobID, None, r) for r in recorders])
        # The loop has come round with the new job (the XREAD it was
        # blocked in, woken by the watch, is counted): count from now.
        yield self.settle(lambda: broker.reader.reads > reads)
        before = yield commandstats(self.admin)
        for i in range(events):
            yield broker.publish(jobID, "progress", {"i": i})
            yield self.settle(lambda: all(len(r.got) > i for r in recorders))
        after = yield commandstats(self.admin)
        for unsubscribe in unsubscribes:
            unsubscribe()
        return perEvent(before, after, events), recorders

    @inlineCallbacks
    def test_commandsPerEventIndependentOfSubscribers(self) -> Any:
        """
        A job with 100 local subscribers costs Redis the same commands per
        event as a job with 1: one C{XADD} for the write, and the one
        C{XREAD} (of the instance's loop) that brings it back. Each
        subscriber gets every event once, in order.
        """
        broker = yield self.makeBroker()
        events = 30
        # The scripts loaded first (EVAL once, then EVALSHA).
        yield broker.create(snapshot("warm"))
        yield broker.publish("warm", "progress", {})
        one, _ = yield self.publishAndCount(broker, "one", 1, events)
        hundred, recorders = yield self.publishAndCount(broker, "hundred", 100, events)
        for recorder in recorders:
            self.assertEqual([_id for _id in recorder.ids], [f"0-{i}" for i in range(1, events + 1)])
        self.assertEqual(one.get("xadd"), 1.0)
        self.assertEqual(hundred.get("xadd"), 1.0)
        # Per command, the same counts (one command of slack over the run:
        # an XREAD blocked when the count starts or ends falls on either
        # side). The write is one EVALSHA doing a GET (the end marker: no
        # event after a terminal one) and an XADD; the read one XREAD entry
        # of this instance's loop.
        for name in set(one) | set(hundred):
            self.assertTrue(abs(one.get(name, 0) - hundred.get(name, 0)) * events <= 1, (name, one, hundred))
        print(f"\nRedis commands per event: 1 subscriber {one}; 100 subscribers {hundred}")

    @inlineCallbacks
    def test_concurrentSubscribesShareOneLoad(self) -> Any:
        """
        200 subscribes to a job this instance does not mirror yet, in one
        turn, with various ids: one load (one state read, one C{XRANGE});
        a subscribe to a mirrored job costs no Redis command. The last
        unsubscribe drops the mirror and the watch.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        published = yield broker.publishMany("a", "progress", [{"i": i} for i in range(10)])
        yield self.admin.execute_command("CONFIG", "RESETSTAT")
        ids = [None, "garbage", published[3].id, published[9].id]
        recorders = [Recorder() for _ in range(200)]
        unsubscribes = yield gatherResults(
            [broker.subscribe("a", ids[i % 4], r) for i, r in enumerate(recorders)]
        )
        stats = yield commandstats(self.admin)
        self.assertEqual(broker.loads, 1)
        self.assertEqual(broker.historyReads(), 1)
        # One XRANGE for the history, and the reader's one of the entry at
        # the position it starts from (per watched job, not per subscriber)
        # if it has come to it yet.
        self.assertIn(stats.get("xrange"), (1, 2), stats)
        self.assertEqual(stats.get("evalsha", 0) + stats.get("eval", 0), 1, stats)
        yield self.settle(lambda: broker.reader.reads > 0)
        for i, recorder in enumerate(recorders):
            want = {0: published, 1: published, 2: published[4:], 3: []}[i % 4]
            self.assertEqual(recorder.ids, [e.id for e in want])
        yield self.admin.execute_command("CONFIG", "RESETSTAT")
        recorder = Recorder()
        unsubscribes.append((yield broker.subscribe("a", published[5].id, recorder)))
        self.assertEqual(recorder.ids, [e.id for e in published[6:]])
        stats = yield commandstats(self.admin)
        self.assertEqual(set(stats) - {"info", "config|resetstat", "xread"}, set(), stats)
        self.assertEqual(broker.mirrored(), 1)
        self.assertEqual(broker.reader.watching(), 1)
        for unsubscribe in unsubscribes:
            unsubscribe()
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.reader.watching(), 0)

    @inlineCallbacks
    def test_mirrorDroppedAfterTerminal(self) -> Any:
        """
        Once the terminal event has reached the local subscribers, the
        mirror and the watch are gone without anyone unsubscribing.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        recorders = [Recorder() for _ in range(3)]
        yield gatherResults([broker.subscribe("a", None, r) for r in recorders])
        self.assertEqual(broker.mirrored(), 1)
        yield broker.publishMany("a", "progress", [{}, {}])
        yield broker.publish("a", "failed", {"reason": "x"})
        yield self.settle(lambda: all(ended(r) for r in recorders))
        self.assertEqual([r.ids for r in recorders], [["0-1", "0-2", "0-3"]] * 3)
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.reader.watching(), 0)

    @inlineCallbacks
    def test_cancelWhileLoading(self) -> Any:
        """
        A subscribe cancelled before the load is done (its client went
        away) delivers nothing and leaves nothing: no subscriber, no
        mirror, no watch.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        yield broker.publish("a", "progress", {})
        recorder = Recorder()
        d = broker.subscribe("a", None, recorder)
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(recorder.got, [])
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.reader.watching(), 0)

    @inlineCallbacks
    def test_twoInstances(self) -> Any:
        """
        Two web instances on one Redis, subscribers on each, events
        published through one of them (and through the other): every
        subscriber gets every event once, in order, and the stream ends
        with the terminal event on both.
        """
        a = yield self.makeBroker()
        b = yield self.makeBroker()
        yield a.create(snapshot("j"))
        self.assertEqual((yield b.get("j")), snapshot("j"))
        onA = [Recorder() for _ in range(5)]
        onB = [Recorder() for _ in range(5)]
        yield gatherResults([a.subscribe("j", None, r) for r in onA] + [b.subscribe("j", None, r) for r in onB])
        published = []
        for i in range(20):
            published.append((yield a.publish("j", "progress", {"i": i})))
        published += yield b.publishMany("j", "progress", [{"i": i} for i in range(20, 60)])
        for i in range(60, 80):
            published.append((yield (a if i % 2 else b).publish("j", "progress", {"i": i})))
        published.append((yield a.publish("j", "complete", {})))
        everyone = onA + onB
        yield self.settle(lambda: all(ended(r) for r in everyone))
        for recorder in everyone:
            self.assertEqual(recorder.ids, [e.id for e in published])
            self.assertEqual([event for event, _ in recorder.got], published)
        for broker in (a, b):
            self.assertEqual(broker.subscriberCount(), 0)
            self.assertEqual(broker.mirrored(), 0)

    @inlineCallbacks
    def test_lateSubscriberMidStream(self) -> Any:
        """
        Subscribers that join a mirrored job while events flow each get
        every event once, in order: the mirror's history, then live.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        first = Recorder()
        yield broker.subscribe("a", None, first)
        joined = []
        published = []
        for i in range(40):
            published.append((yield broker.publish("a", "progress", {"i": i})))
            if i % 10 == 5:
                recorder = Recorder()
                resumeFrom = first.ids[-1] if first.ids and i % 20 == 5 else None
                yield broker.subscribe("a", resumeFrom, recorder)
                joined.append((resumeFrom, recorder))
        published.append((yield broker.publish("a", "complete", {})))
        yield self.settle(lambda: ended(first) and all(ended(r) for _, r in joined))
        self.assertEqual(first.ids, [e.id for e in published])
        for resumeFrom, recorder in joined:
            start = 0 if resumeFrom is None else [e.id for e in published].index(resumeFrom) + 1
            self.assertEqual(recorder.ids, [e.id for e in published[start:]])

    @inlineCallbacks
    def test_resetForSubscriberOfMirroredJob(self) -> Any:
        """
        A resume from before a mirrored job's retained history gets a
        C{reset} with the job's state as Redis has it now (read for it),
        not as it was when the mirror was loaded.
        """
        broker = yield self.makeBroker(history=10)
        job = snapshot("a")
        yield broker.create(job)
        holder = Recorder()
        yield broker.subscribe("a", None, holder)
        published = yield broker.publishMany("a", "progress", [{"i": i} for i in range(30)])
        yield self.settle(lambda: len(holder.got) == 30)
        yield broker.update(job.transition(JobState.RUNNING, 1.0, progress={"i": 29}))
        recorder = Recorder()
        yield broker.subscribe("a", published[0].id, recorder)
        reset = recorder.got[0][0]
        self.assertEqual(reset.event, "reset")
        self.assertEqual(_json.loads(reset.data), {"state": "running", "progress": {"i": 29}, "missed": 19})
        self.assertEqual(reset.id, published[19].id)
        self.assertEqual(recorder.ids[1:], [e.id for e in published[20:]])
        self.assertEqual(broker.loads, 1)

    @inlineCallbacks
    def test_gapInLiveEntries(self) -> Any:
        """
        Entries trimmed away before the loop read them (300 published in
        one script to a stream kept to about 10): the local subscribers get
        a C{reset} counting what they missed, then what follows, and stay
        subscribed: the events after that reach them once each.
        """
        broker = yield self.makeBroker(history=10)
        yield broker.create(snapshot("a"))
        recorders = [Recorder() for _ in range(3)]
        yield gatherResults([broker.subscribe("a", None, r) for r in recorders])
        published = yield broker.publishMany("a", "progress", [{"i": i} for i in range(300)])
        published.append((yield broker.publish("a", "complete", {})))
        yield self.settle(lambda: all(ended(r) for r in recorders))
        for recorder in recorders:
            reset = recorder.got[0][0]
            self.assertEqual(reset.event, "reset")
            missed = _json.loads(reset.data)["missed"]
            rest = recorder.ids[1:]
            self.assertEqual(rest, [e.id for e in published[-len(rest) :]])
            self.assertEqual(missed + len(rest), 301)
            self.assertEqual(reset.id, published[missed - 1].id)
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)

    @inlineCallbacks
    def test_redisDown(self) -> Any:
        """
        With Redis down, a subscribe to a job not mirrored here fails with
        L{RedisUnavailable} within the state's timeout, leaving nothing;
        a subscriber of a mirrored job stays subscribed.
        """
        broker = yield self.makeBroker()
        broker.state.timeout = 0.5
        yield broker.create(snapshot("a"))
        yield broker.create(snapshot("b"))
        recorder = Recorder()
        unsubscribe = yield broker.subscribe("a", None, recorder)
        self.server.stop(remove=False)
        started = time.monotonic()
        yield self.assertFailure(broker.subscribe("b", None, Recorder()), RedisUnavailable)
        self.assertTrue(time.monotonic() - started < 3)
        self.assertEqual(broker.mirrored(), 1)
        self.assertEqual(broker.subscriberCount(), 1)
        unsubscribe()
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.subscriberCount(), 0)
        self.server.start()

    @inlineCallbacks
    def test_stop(self) -> Any:
        """
        L{RedisBroker.stop} drops every mirror and its subscribers, fails
        the subscribes still loading, and stops the loop.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        yield broker.create(snapshot("b"))
        yield broker.subscribe("a", None, Recorder())
        loading = broker.subscribe("b", None, Recorder())
        yield broker.stop()
        yield self.assertFailure(loading, CancelledError)
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.reader.watching(), 0)

    @inlineCallbacks
    def test_expiredWhileLoading(self) -> Any:
        """
        A subscribe still loading when its job expires (or is removed)
        fails with L{JobExpired} (L{UnknownJob}) and leaves nothing.
        """
        broker = yield self.makeBroker()
        for jobID, end, error in [("a", broker.expire, JobExpired), ("b", broker.remove, UnknownJob)]:
            yield broker.create(snapshot(jobID))
            loading = broker.subscribe(jobID, None, Recorder())
            yield end(jobID)
            yield self.assertFailure(loading, error)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.assertEqual(broker.reader.watching(), 0)

    @inlineCallbacks
    def test_redisRestartedWithoutData(self) -> Any:
        """
        Redis restarted without persistence under a mirrored job: its
        subscribers get a C{reset} (C{missed} unknown: C{null}; the id
        C{0-0}, from which a resume gets the new stream whole), then the
        new stream from C{0-1}, each event once, and the terminal event
        ends them.
        """
        broker = yield self.makeBroker()
        job = snapshot("a")
        yield broker.create(job)
        recorders = [Recorder() for _ in range(3)]
        yield gatherResults([broker.subscribe("a", None, r) for r in recorders])
        before = yield broker.publishMany("a", "progress", [{"pct": i} for i in range(10)])
        yield self.settle(lambda: all(len(r.got) == 10 for r in recorders))
        self.server.stop(remove=False)
        yield self.settle(lambda: broker.reader.errors >= 1)
        self.server.start()
        yield ready(self.admin, reactor, timeout=10)
        after = yield broker.publishMany("a", "progress", [{"pct": i} for i in range(3)])
        after.append((yield broker.publish("a", "complete", {})))
        self.assertEqual([e.id for e in after], ["0-1", "0-2", "0-3", "0-4"])
        yield self.settle(lambda: all(ended(r) for r in recorders), timeout=20)
        for recorder in recorders:
            events = [event for event, _ in recorder.got]
            self.assertEqual(events[:10], before)
            self.assertEqual((events[10].event, events[10].id), ("reset", "0-0"))
            self.assertEqual(_json.loads(events[10].data), {"state": "queued", "progress": {"pct": 9}, "missed": None})
            self.assertEqual(events[11:], after)
        self.assertEqual(broker.subscriberCount(), 0)
        self.assertEqual(broker.mirrored(), 0)
        self.flushLoggedErrors()

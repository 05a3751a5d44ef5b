"""
The L{IAsyncJobBroker} contract: one suite (L{AsyncBrokerContract}), run
here against L{AsyncMemoryBroker} (a L{Clock}) and in
C{tests/redis/test_brokercontract.py} against L{RedisBroker} (a real
redis-server, the real reactor).

Event ids are opaque: the tests use the ids the broker gave (C{publish}'s
events) and never build one, except as hostile input.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests._support.fixtures import Recorder, snapshot
from twistedsse import _json
from twistedsse._asyncbroker import AsyncMemoryBroker, IAsyncJobBroker
from twistedsse._broker import MemoryBroker
from twistedsse._errors import JobExpired, UnknownJob
from twistedsse._frames import TERMINAL_EVENTS
from twistedsse._job import JobState

#: Last-Event-ID values no broker issued for a job with a few events:
#: garbage, "0", and ids from ahead in either broker's form.
HOSTILE = [None, "", "0", "0-0", "garbage", "-1", "9" * 40, "0-" + "9" * 25, "\x00", "999999", "0-999999", "$", "+"]


def ended(recorder: Recorder) -> bool:
    return bool(recorder.got) and recorder.got[-1][0].event in TERMINAL_EVENTS


class AsyncBrokerContract:
    """
    What every L{IAsyncJobBroker} does. A test case mixing it in defines
    C{makeBroker(history)} (fires with a started broker, cleaned up by
    the test case) and C{settle(predicate)} (fires once C{predicate()}
    holds: events published reach subscribers when the broker's reading
    side gets them; fails if it never does).
    """

    # The hooks (defined by the test case, which comes after this mixin
    # in its bases), and TestCase's methods, for readers and linters.
    makeBroker: Callable[..., Deferred[Any]]
    settle: Callable[[Callable[[], bool]], Deferred[None]]
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIs: Any
    assertFailure: Any
    assertRaises: Any

    @inlineCallbacks
    def subscribe(self, broker: Any, jobID: str, lastEventID: str | None) -> Any:
        recorder = Recorder()
        unsubscribe = yield broker.subscribe(jobID, lastEventID, recorder)
        return recorder, unsubscribe

    @inlineCallbacks
    def test_provides(self) -> Any:
        """
        The broker provides L{IAsyncJobBroker}.
        """
        broker = yield self.makeBroker()
        self.assertTrue(verifyObject(IAsyncJobBroker, broker))

    @inlineCallbacks
    def test_createGet(self) -> Any:
        """
        C{get} returns what C{create} stored, C{update} replaces it; an id
        taken fails C{create} with C{ValueError}.
        """
        broker = yield self.makeBroker()
        job = snapshot("a")
        yield broker.create(job)
        self.assertEqual((yield broker.get("a")), job)
        running = job.transition(JobState.RUNNING, 5.0, progress={"pct": 12.5, "frame": "0019"})
        yield broker.update(running)
        self.assertEqual((yield broker.get("a")), running)
        yield self.assertFailure(broker.create(job), ValueError)

    @inlineCallbacks
    def test_unknownJob(self) -> Any:
        """
        The per-job methods fail with L{UnknownJob} (not L{JobExpired}) for
        an id no job has.
        """
        broker = yield self.makeBroker()
        for d in [broker.get("nope"), broker.subscribe("nope", None, Recorder()), broker.caughtUp("nope", None)]:
            failure = yield self.assertFailure(d, UnknownJob)
            self.assertIs(type(failure), UnknownJob)
        self.assertEqual(broker.subscriberCount(), 0)

    @inlineCallbacks
    def test_publishLive(self) -> Any:
        """
        A subscriber gets each event published after it subscribed, once,
        in order, with the id and data C{publish} fired with, and the wire
        frame of that event.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        recorder, unsubscribe = yield self.subscribe(broker, "a", None)
        self.assertEqual(recorder.got, [])
        published = [(yield broker.publish("a", "progress", {"i": 0, "s": "0019"}))]
        published += yield broker.publishMany("a", "progress", [{"i": 1}, {"i": 2}, {"i": 3}])
        published.append((yield broker.publish("a", "log", "text")))
        yield self.settle(lambda: len(recorder.got) >= 5)
        self.assertEqual([event for event, _ in recorder.got], published)
        self.assertEqual([json for json in (e.data for e in published)], [_json.dumps(d) for d in [{"i": 0, "s": "0019"}, {"i": 1}, {"i": 2}, {"i": 3}, "text"]])
        self.assertEqual(len(set(e.id for e in published)), 5)
        self.assertEqual(broker.subscriberCount(), 1)
        unsubscribe()
        self.assertEqual(broker.subscriberCount(), 0)

    @inlineCallbacks
    def test_historyAfterID(self) -> Any:
        """
        A subscribe with an id the broker gave gets the retained events
        after it, with no C{reset}, then live ones.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        published = yield broker.publishMany("a", "progress", [{"i": i} for i in range(5)])
        recorder, unsubscribe = yield self.subscribe(broker, "a", published[1].id)
        self.assertEqual(recorder.ids, [e.id for e in published[2:]])
        more = yield broker.publish("a", "progress", {"i": 5})
        yield self.settle(lambda: len(recorder.got) >= 4)
        self.assertEqual(recorder.ids, [e.id for e in published[2:]] + [more.id])
        # From the last id: nothing yet, then the next one.
        late, unsubscribeLate = yield self.subscribe(broker, "a", more.id)
        self.assertEqual(late.got, [])
        last = yield broker.publish("a", "progress", {"i": 6})
        yield self.settle(lambda: len(late.got) >= 1 and len(recorder.got) >= 5)
        self.assertEqual(late.ids, [last.id])
        unsubscribe()
        unsubscribeLate()
        self.assertEqual(broker.subscriberCount(), 0)

    @inlineCallbacks
    def test_resetAfterTrimmedHistory(self) -> Any:
        """
        A resume from before the retained history gets a C{reset} first
        (the job's state and progress, and how many events it missed),
        then the retained events, which end with the last published; the
        count adds up. Resuming from the reset's id gets no second reset.
        """
        broker = yield self.makeBroker(history=10)
        job = snapshot("a").transition(JobState.RUNNING, 1.0, progress={"pct": 99})
        yield broker.create(snapshot("a"))
        yield broker.update(job)
        published = []
        for start in range(0, 300, 100):
            published += yield broker.publishMany("a", "progress", [{"i": i} for i in range(start, start + 100)])
        recorder, unsubscribe = yield self.subscribe(broker, "a", published[0].id)
        first, rest = recorder.got[0][0], [event for event, _ in recorder.got[1:]]
        self.assertEqual(first.event, "reset")
        data = _json.loads(first.data)
        self.assertEqual(data["state"], "running")
        self.assertEqual(data["progress"], {"pct": 99})
        self.assertTrue(0 < data["missed"] and rest)
        self.assertEqual(rest, published[-len(rest) :])
        self.assertEqual(1 + data["missed"] + len(rest), 300)
        unsubscribe()
        again, unsubscribeAgain = yield self.subscribe(broker, "a", first.id)
        self.assertEqual([event for event, _ in again.got], rest)
        unsubscribeAgain()

    @inlineCallbacks
    def test_hostileLastEventIDs(self) -> Any:
        """
        C{None}, C{"0"}, garbage and ids from ahead all get the whole
        retained history, then live events (an id from ahead must not
        hold them back).
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        published = yield broker.publishMany("a", "progress", [{"i": i} for i in range(3)])
        recorders = []
        for lastEventID in HOSTILE:
            recorder, unsubscribe = yield self.subscribe(broker, "a", lastEventID)
            self.assertEqual(recorder.ids, [e.id for e in published], repr(lastEventID))
            recorders.append((recorder, unsubscribe))
        self.assertEqual(broker.subscriberCount(), len(HOSTILE))
        done = yield broker.publish("a", "complete", {})
        yield self.settle(lambda: all(ended(r) for r, _ in recorders))
        for recorder, unsubscribe in recorders:
            self.assertEqual(recorder.ids, [e.id for e in published] + [done.id])
            unsubscribe()
        self.assertEqual(broker.subscriberCount(), 0)

    @inlineCallbacks
    def test_terminalEndsSubscribers(self) -> Any:
        """
        The terminal event is each subscriber's last: afterwards the job
        has none (C{subscriberCount} 0 without unsubscribing), unsubscribe
        is idempotent, a later subscribe gets the history with the
        terminal event and is not counted, and no event can follow it.
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        first, unsubscribeFirst = yield self.subscribe(broker, "a", None)
        progress = yield broker.publish("a", "progress", {"pct": 50})
        second, unsubscribeSecond = yield self.subscribe(broker, "a", None)
        self.assertEqual(broker.subscriberCount(), 2)
        done = yield broker.publish("a", "complete", {"output_url": None})
        yield self.settle(lambda: ended(first) and ended(second))
        self.assertEqual(first.ids, [progress.id, done.id])
        self.assertEqual(second.ids, [progress.id, done.id])
        self.assertEqual(broker.subscriberCount(), 0)
        for unsubscribe in [unsubscribeFirst, unsubscribeSecond, unsubscribeFirst]:
            unsubscribe()
        self.assertEqual(broker.subscriberCount(), 0)
        late, unsubscribeLate = yield self.subscribe(broker, "a", None)
        self.assertEqual(late.ids[-1], done.id)
        self.assertEqual(broker.subscriberCount(), 0)
        unsubscribeLate()
        unsubscribeLate()
        resumed, _ = yield self.subscribe(broker, "a", progress.id)
        self.assertEqual(resumed.ids, [done.id])
        self.assertEqual(broker.subscriberCount(), 0)
        # Nothing after the terminal event.
        yield self.assertFailure(broker.publish("a", "progress", {}), ValueError)
        yield self.assertFailure(broker.publishMany("a", "progress", [{}]), ValueError)
        yield self.assertFailure(broker.publishMany("a", "complete", [{}]), ValueError)
        again, _ = yield self.subscribe(broker, "a", None)
        self.assertEqual(again.ids[-1], done.id)

    @inlineCallbacks
    def test_caughtUp(self) -> Any:
        """
        C{caughtUp} is true only for an id at a finished job's terminal
        event: never while it runs, not for an earlier id, C{None} or
        garbage.
        """
        broker = yield self.makeBroker()
        job = snapshot("a")
        yield broker.create(job)
        progress = yield broker.publish("a", "progress", {"pct": 1})
        for lastEventID in [None, progress.id, "garbage"]:
            self.assertFalse((yield broker.caughtUp("a", lastEventID)))
        running = job.transition(JobState.RUNNING, 1.0)
        yield broker.update(running)
        yield broker.update(running.transition(JobState.SUCCEEDED, 2.0, result={}))
        done = yield broker.publish("a", "complete", {})
        self.assertTrue((yield broker.caughtUp("a", done.id)))
        for lastEventID in [None, progress.id, "garbage", "0"]:
            self.assertFalse((yield broker.caughtUp("a", lastEventID)), repr(lastEventID))

    @inlineCallbacks
    def test_subscriberCount(self) -> Any:
        """
        C{subscriberCount} counts open subscriptions over all jobs and goes
        back to 0 once each is unsubscribed (twice each: no harm).
        """
        broker = yield self.makeBroker()
        yield broker.create(snapshot("a"))
        yield broker.create(snapshot("b"))
        unsubscribes = []
        for jobID in ["a", "a", "b", "a", "b"]:
            _, unsubscribe = yield self.subscribe(broker, jobID, None)
            unsubscribes.append(unsubscribe)
        self.assertEqual(broker.subscriberCount(), 5)
        for index, unsubscribe in enumerate(unsubscribes):
            unsubscribe()
            unsubscribe()
            self.assertEqual(broker.subscriberCount(), 4 - index)
        # Still a working job afterwards.
        recorder, unsubscribe = yield self.subscribe(broker, "a", None)
        event = yield broker.publish("a", "progress", {})
        yield self.settle(lambda: len(recorder.got) >= 1)
        self.assertEqual(recorder.ids, [event.id])
        unsubscribe()
        self.assertEqual(broker.subscriberCount(), 0)

    @inlineCallbacks
    def test_expireForgetRemove(self) -> Any:
        """
        An expired job fails the per-job methods with L{JobExpired}, and
        its id cannot be created again, until C{forget}: then it is
        unknown. A removed job is unknown at once.
        """
        broker = yield self.makeBroker()
        job = snapshot("a")
        yield broker.create(job)
        running = job.transition(JobState.RUNNING, 1.0)
        yield broker.update(running)
        yield broker.update(running.transition(JobState.SUCCEEDED, 2.0, result={}))
        yield broker.publish("a", "complete", {})
        yield broker.expire("a")
        for d in [broker.get("a"), broker.subscribe("a", None, Recorder()), broker.caughtUp("a", None)]:
            yield self.assertFailure(d, JobExpired)
        yield self.assertFailure(broker.create(job), ValueError)
        yield broker.forget("a")
        failure = yield self.assertFailure(broker.get("a"), UnknownJob)
        self.assertIs(type(failure), UnknownJob)
        yield broker.create(snapshot("b"))
        yield broker.publish("b", "progress", {})
        yield broker.remove("b")
        failure = yield self.assertFailure(broker.get("b"), UnknownJob)
        self.assertIs(type(failure), UnknownJob)
        yield self.assertFailure(broker.subscribe("b", None, Recorder()), UnknownJob)
        self.assertEqual(broker.subscriberCount(), 0)


class AsyncMemoryBrokerTests(AsyncBrokerContract, TestCase):
    """
    The contract on L{AsyncMemoryBroker}, its fan-out on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def tearDown(self) -> None:
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def makeBroker(self, history: int = 100) -> Deferred[Any]:
        return succeed(AsyncMemoryBroker(MemoryBroker(history=history, clock=self.clock)))

    def settle(self, predicate: Callable[[], bool]) -> Deferred[None]:
        for _ in range(100):
            if predicate():
                return succeed(None)
            self.clock.advance(0)
        raise AssertionError(f"never true: {predicate}")

    def test_alreadyFired(self) -> None:
        """
        Every Deferred is fired when returned: the memory broker costs no
        reactor turn; failures are the Deferred's, not raised.
        """
        broker = AsyncMemoryBroker(MemoryBroker(clock=self.clock))
        recorder = Recorder()
        calls = [
            broker.create(snapshot("a")),
            broker.get("a"),
            broker.publish("a", "progress", {}),
            broker.subscribe("a", None, recorder),
            broker.caughtUp("a", None),
            broker.get("nope"),
            broker.publish("a", "progress", float("nan")),
        ]
        results: list[Any] = []
        for d in calls:
            d.addBoth(results.append)
        self.assertEqual(len(results), len(calls))
        self.assertEqual(len(recorder.got), 1)
        self.assertEqual(results[-2].type, UnknownJob)
        self.assertEqual(results[-1].type, ValueError)
        results[3]()

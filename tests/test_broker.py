"""
The L{IJobBroker} contract, run against every implementation, and
L{MemoryBroker}'s own details.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistedsse._broker import MemoryBroker, parseSequence
from twistedsse._errors import UnknownJob
from twistedsse._frames import Event, encodeEvent
from twistedsse._interfaces import IJobBroker, ISubscriber
from twistedsse._job import JobState

from tests._support.fixtures import Recorder, snapshot



class BrokerContractTests:
    """
    What every L{IJobBroker} must do. Subclasses define C{makeBroker}.
    """

    def makeBroker(self, history: int = 100) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.broker = self.makeBroker()
        self.broker.create(snapshot("a"))

    def test_provides(self) -> None:
        """
        The broker provides L{IJobBroker}.
        """
        self.assertTrue(verifyObject(IJobBroker, self.broker))

    def test_unknownJob(self) -> None:
        """
        Every per-job method raises L{UnknownJob} for an unknown id.
        """
        self.assertRaises(UnknownJob, self.broker.get, "nope")
        self.assertRaises(UnknownJob, self.broker.publish, "nope", "progress", {})
        self.assertRaises(UnknownJob, self.broker.subscribe, "nope", None, Recorder())

    def test_getAndUpdate(self) -> None:
        """
        C{update} replaces what C{get} returns.
        """
        newer = self.broker.get("a").transition(JobState.RUNNING, 5.0)
        self.broker.update(newer)
        self.assertEqual(self.broker.get("a"), newer)

    def test_idsIncrease(self) -> None:
        """
        Each published event gets an id, and they increase per job.
        """
        ids = [self.broker.publish("a", "progress", {"i": i}).id for i in range(5)]
        self.assertEqual(len(set(ids)), 5)
        self.assertEqual(ids, sorted(ids, key=int))

    def test_sameBytesForEverySubscriber(self) -> None:
        """
        One event reaches every subscriber as the very same bytes object:
        it is encoded once.
        """
        recorders = [Recorder() for _ in range(3)]
        for recorder in recorders:
            self.broker.subscribe("a", None, recorder)
        self.broker.publish("a", "progress", {"x": 1})
        frames = [recorder.got[0][1] for recorder in recorders]
        self.assertIs(frames[0], frames[1])
        self.assertIs(frames[1], frames[2])

    def test_replayThenLiveNoGapNoDuplicate(self) -> None:
        """
        A subscriber gets the history after its last id, then live events,
        each once, in order.
        """
        for i in range(3):
            self.broker.publish("a", "progress", {"i": i})
        recorder = Recorder()
        self.broker.subscribe("a", "1", recorder)
        self.broker.publish("a", "progress", {"i": 3})
        self.assertEqual(recorder.ids, ["2", "3", "4"])

    def test_idAheadOfARunningJobCountsAsUnknown(self) -> None:
        """
        A last id beyond a running job's latest event (not one it issued)
        counts as an id the broker cannot read: the whole retained
        history, then every live event, the terminal one included, after
        which the subscriber is dropped. (It used to filter on the id:
        with C{999999} nothing ever came, not even the terminal event, and
        the stream never ended.)
        """
        for i in range(5):
            self.broker.publish("a", "progress", {"i": i})
        recorder = Recorder()
        self.broker.subscribe("a", "999999", recorder)
        self.assertEqual(recorder.ids, ["1", "2", "3", "4", "5"])
        self.broker.publish("a", "progress", {"i": 5})
        self.broker.publish("a", "complete", {})
        self.assertEqual(recorder.ids, ["1", "2", "3", "4", "5", "6", "7"])
        self.assertEqual(recorder.got[-1][0].event, "complete")
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_idAheadOfAFinishedJob(self) -> None:
        """
        A last id beyond a finished job's terminal event: the job is
        caught up for it (the stream answers C{204}); subscribed anyway,
        it gets the whole retained history (a finished job keeps its latest
        progress and its terminal event), and stays subscribed to nothing.
        """
        for i in range(5):
            self.broker.publish("a", "progress", {"i": i})
        self.broker.publish("a", "complete", {})
        self.assertTrue(self.broker.caughtUp("a", "999999"))
        recorder = Recorder()
        self.broker.subscribe("a", "999999", recorder)
        self.assertEqual(recorder.ids, ["5", "6"])
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_zeroIsBeforeTheFirstEvent(self) -> None:
        """
        C{"0"} (what C{/render-stream} opens with, C{JOBID:0}) names the
        point before a job's first event: the whole history.
        """
        recorder = Recorder()
        self.broker.subscribe("a", "0", recorder)
        self.broker.publish("a", "progress", {"i": 1})
        self.broker.publish("a", "progress", {"i": 2})
        self.assertEqual(recorder.ids, ["1", "2"])
        later = Recorder()
        self.broker.subscribe("a", "0", later)
        self.assertEqual(later.ids, ["1", "2"])

    def test_unsubscribe(self) -> None:
        """
        After unsubscribing nothing more arrives, and unsubscribing twice
        is harmless.
        """
        recorder = Recorder()
        unsubscribe = self.broker.subscribe("a", None, recorder)
        self.assertEqual(self.broker.subscriberCount(), 1)
        unsubscribe()
        unsubscribe()
        self.assertEqual(self.broker.subscriberCount(), 0)
        self.broker.publish("a", "progress", {})
        self.assertEqual(recorder.got, [])

    def test_terminalDropsSubscribers(self) -> None:
        """
        A terminal event is the last thing subscribers get; then they are
        gone, and their unsubscribe does nothing.
        """
        recorder = Recorder()
        unsubscribe = self.broker.subscribe("a", None, recorder)
        self.broker.publish("a", "complete", {})
        self.assertEqual(self.broker.subscriberCount(), 0)
        unsubscribe()
        self.assertEqual(self.broker.subscriberCount(), 0)
        self.assertEqual([e.event for e, _ in recorder.got], ["complete"])
        self.assertRaises(ValueError, self.broker.publish, "a", "progress", {})

    def test_subscribeAfterTheEnd(self) -> None:
        """
        Subscribing to a finished job replays and does not stay subscribed.
        """
        self.broker.publish("a", "progress", {})
        self.broker.publish("a", "failed", {"message": "x"})
        recorder = Recorder()
        self.broker.subscribe("a", None, recorder)
        self.assertEqual([e.event for e, _ in recorder.got], ["progress", "failed"])
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_caughtUp(self) -> None:
        """
        C{caughtUp} is true only for an id at or after the terminal event.
        """
        self.broker.publish("a", "progress", {})
        self.assertFalse(self.broker.caughtUp("a", "1"))
        self.broker.publish("a", "complete", {})
        self.assertFalse(self.broker.caughtUp("a", "1"))
        self.assertFalse(self.broker.caughtUp("a", None))
        self.assertTrue(self.broker.caughtUp("a", "2"))

    def test_unsubscribeDuringDelivery(self) -> None:
        """
        A subscriber that unsubscribes another (and itself) while an event
        is being delivered: the one it removed gets nothing more, from then
        on; the others still get the event.
        """
        unsubscribes = []

        @implementer(ISubscriber)
        class Leaver:
            got = 0

            def deliver(self, event: Event, frame: bytes) -> None:
                self.got += 1
                for u in unsubscribes:
                    u()

        leaver, removed, other = Leaver(), Recorder(), Recorder()
        unsubscribes.append(self.broker.subscribe("a", None, leaver))
        unsubscribes.append(self.broker.subscribe("a", None, removed))
        self.broker.subscribe("a", None, other)
        self.broker.publish("a", "progress", {})
        self.assertEqual((leaver.got, len(removed.got), len(other.got)), (1, 0, 1))
        self.assertEqual(self.broker.subscriberCount(), 1)
        self.broker.publish("a", "complete", {})
        self.assertEqual((leaver.got, len(removed.got), len(other.got)), (1, 0, 2))
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_publishManyIsPublishInOrder(self) -> None:
        """
        Events published together are numbered, recorded and delivered as
        if published one by one; a subscriber gets them in one call, with
        their frames joined once for all.
        """
        first, second = Recorder(), Recorder()
        self.broker.subscribe("a", None, first)
        self.broker.subscribe("a", None, second)
        self.broker.publish("a", "progress", {"i": 0})
        events = self.broker.publishMany("a", "progress", [{"i": 1}, {"i": 2}, {"i": 3}])
        self.assertEqual([e.id for e in events], ["2", "3", "4"])
        self.assertEqual(first.ids, ["1", "2", "3", "4"])
        self.assertEqual(first.batches, [b"".join(encodeEvent(e) for e in events)])
        self.assertIs(first.batches[0], second.batches[0])
        late = Recorder()
        self.broker.subscribe("a", "1", late)
        self.assertEqual(late.ids, ["2", "3", "4"])
        self.assertEqual([e.data for e, _ in late.got], ['{"i":1}', '{"i":2}', '{"i":3}'])

    def test_publishManyRefusesTerminal(self) -> None:
        """
        Terminal events are published alone; nothing is published after one.
        """
        with self.assertRaises(ValueError):
            self.broker.publishMany("a", "complete", [{}, {}])
        self.broker.publish("a", "complete", {})
        with self.assertRaises(ValueError):
            self.broker.publishMany("a", "progress", [{}, {}])

    def test_publishManyToSubscriberFromAhead(self) -> None:
        """
        A subscriber whose last id was ahead of the job gets every event
        published together, as one batch.
        """
        recorder = Recorder()
        self.broker.subscribe("a", "2", recorder)
        self.broker.publishMany("a", "progress", [{"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}])
        self.assertEqual(recorder.ids, ["1", "2", "3", "4"])
        self.assertEqual(len(recorder.batches), 1)

    def test_historyBoundKeepsLatestAndTerminal(self) -> None:
        """
        The history is bounded: old progress goes, the latest progress and
        the terminal event stay; once the job has ended, only those two.
        """
        broker = self.makeBroker(history=3)
        broker.create(snapshot("b"))
        for i in range(10):
            broker.publish("b", "progress", {"i": i})
        recorder = Recorder()
        broker.subscribe("b", None, recorder)
        self.assertEqual([e.event for e, _ in recorder.got], ["progress"] * 3)
        broker.publish("b", "complete", {})
        recorder = Recorder()
        broker.subscribe("b", None, recorder)
        self.assertEqual([e.event for e, _ in recorder.got], ["progress", "complete"])
        self.assertEqual(recorder.got[-2][0].data, '{"i":9}')

    def test_dataIsCompactJSON(self) -> None:
        """
        Event data is the payload as JSON, unicode kept as is.
        """
        event = self.broker.publish("a", "progress", {"title": "\u00e9\u2603", "n": 1})
        self.assertEqual(event.data, '{"title":"\u00e9\u2603","n":1}')
        self.assertEqual(event.event, "progress")


class MemoryBrokerTests(BrokerContractTests, SynchronousTestCase):
    def makeBroker(self, history: int = 100) -> MemoryBroker:
        return MemoryBroker(history=history)

    def test_parseSequence(self) -> None:
        """
        Only plain ASCII decimal ids are ours; anything else counts as 0.
        """
        self.assertEqual(parseSequence("42"), 42)
        for garbage in (None, "", "x", "-1", "+1", " 1", "1e3", "\u0663", "9" * 19):
            self.assertEqual(parseSequence(garbage), 0, garbage)

    def test_subscriberErrorDoesNotStopFanout(self) -> None:
        """
        A subscriber that raises is logged; the others still get the event.
        """

        @implementer(ISubscriber)
        class Broken:
            def deliver(self, event: Event, frame: bytes) -> None:
                raise RuntimeError("broken subscriber")

        recorder = Recorder()
        self.broker.subscribe("a", None, Broken())
        self.broker.subscribe("a", None, recorder)
        self.broker.publish("a", "progress", {})
        self.assertEqual(len(recorder.got), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

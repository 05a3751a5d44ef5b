"""
The sliced fan-out (L{twistedsse._fanout}) through L{MemoryBroker} with a
L{Clock}: a slice of subscribers per reactor turn, events published during
a pass reach the subscribers it has not come to yet in the same call, and
every subscriber gets every event once, in order.
"""

from __future__ import annotations

from typing import Any, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twistedsse._broker import MemoryBroker
from twistedsse._fanout import SLICE, Fanout
from twistedsse._frames import Event, encodeEvent
from twistedsse._interfaces import ISubscriber
from twistedsse._job import Entry

from tests._support.fixtures import snapshot


@implementer(ISubscriber)
class Calls:
    """
    Records each call: the ids it brought and the bytes object it carried.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bytes]] = []

    def deliver(self, event: Event, frame: bytes) -> None:
        self.calls.append(([str(event.id)], frame))

    def deliverMany(self, events: Sequence[Event], frames: Sequence[bytes], joined: bytes) -> None:
        self.calls.append(([str(e.id) for e in events], joined))

    @property
    def ids(self) -> list[int]:
        return [int(i) for ids, _ in self.calls for i in ids]


def turn(clock: Clock) -> None:
    """
    One reactor iteration: run the calls due now, but not the ones they
    schedule (the reactor runs those on its next iteration, after I/O;
    C{Clock.advance(0)} would run them at once too).
    """
    for call in [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]:
        if call.active():
            func, args, kw = call.func, call.args, call.kw
            call.cancel()
            func(*args, **kw)


class SlicedFanoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(clock=self.clock)
        self.broker.create(snapshot("a"))

    def subscribers(self, count: int) -> list[Calls]:
        subscribers = [Calls() for _ in range(count)]
        for s in subscribers:
            self.broker.subscribe("a", None, s)
        return subscribers

    def test_aSlicePerTurn(self) -> None:
        """
        The first slice is given the event in the publishing call, the
        next slices one reactor turn each; nothing is scheduled afterwards.
        """
        subscribers = self.subscribers(SLICE * 2 + 10)
        self.broker.publish("a", "progress", {})
        self.assertEqual(sum(1 for s in subscribers if s.calls), SLICE)
        turn(self.clock)
        self.assertEqual(sum(1 for s in subscribers if s.calls), SLICE * 2)
        turn(self.clock)
        self.assertEqual([s.ids for s in subscribers], [[1]] * len(subscribers))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # One bytes object for all of them.
        self.assertEqual(len({id(s.calls[0][1]) for s in subscribers}), 1)

    def test_eventDuringAPass(self) -> None:
        """
        An event published while a pass is under way reaches the
        subscribers the pass has not come to with the earlier one, in one
        call; the ones it had served get it on the next round.
        """
        subscribers = self.subscribers(SLICE * 3)
        self.broker.publish("a", "progress", {"n": 1})
        self.broker.publish("a", "progress", {"n": 2})  # runs the second slice too
        turn(self.clock)
        first, second, third = subscribers[0], subscribers[SLICE], subscribers[-1]
        self.assertEqual([ids for ids, _ in first.calls], [["1"]])
        self.assertEqual([ids for ids, _ in second.calls], [["1", "2"]])
        self.assertEqual([ids for ids, _ in third.calls], [["1", "2"]])
        for _ in range(3):
            turn(self.clock)
        self.assertEqual([ids for ids, _ in first.calls], [["1"], ["2"]])
        self.assertEqual([s.ids for s in subscribers], [[1, 2]] * len(subscribers))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_terminalWaitsForTheRestThenIsSliced(self) -> None:
        """
        The terminal event goes out only once everything before it has
        reached everyone (ending streams is slower work than sending), then
        a slice per turn like any other; once everyone has it, no timer and
        no subscriber is left.
        """
        subscribers = self.subscribers(SLICE * 3)
        self.broker.publish("a", "progress", {})
        self.broker.publish("a", "complete", {})
        for _ in range(10):
            got = [s.ids for s in subscribers]
            if any(2 in ids for ids in got):
                self.assertTrue(all(1 in ids for ids in got), "the terminal event overtook the progress")
            if not self.clock.getDelayedCalls():
                break
            self.assertGreater(self.broker.subscriberCount(), 0)
            turn(self.clock)
        self.assertEqual([[ids for ids, _ in s.calls] for s in subscribers], [[["1"], ["2"]]] * len(subscribers))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_flushGivesEverythingNow(self) -> None:
        """
        C{flush} (at shutdown, before connections close) gives every queued
        event, the terminal one included, to everyone at once.
        """
        subscribers = self.subscribers(SLICE * 3)
        self.broker.publish("a", "progress", {})
        self.broker.publish("a", "failed", {})
        self.broker.flush()
        self.assertEqual([s.ids for s in subscribers], [[1, 2]] * len(subscribers))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.broker.subscriberCount(), 0)

    def test_subscribeAndLeaveDuringAPass(self) -> None:
        """
        A subscriber that joins during a pass gets the history at once and
        nothing twice; one that leaves before the pass comes to it gets
        nothing.
        """
        self.subscribers(SLICE)
        leaving = Calls()
        unsubscribe = self.broker.subscribe("a", None, leaving)
        self.broker.publish("a", "progress", {})
        late = Calls()
        self.broker.subscribe("a", None, late)
        self.assertEqual(late.ids, [1])
        unsubscribe()
        turn(self.clock)
        self.assertEqual((late.ids, leaving.ids), ([1], []))
        self.assertEqual(self.broker.subscriberCount(), SLICE + 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("publish"), st.integers(1, 4)),
                st.tuples(st.just("turn"), st.integers(1, 3)),
                st.tuples(st.just("join"), st.integers(1, 300)),
                st.tuples(st.just("leave"), st.integers(0, 10_000)),
            ),
            max_size=40,
        ),
    )
    def test_everyEventOnceInOrder(self, operations: list[tuple[str, int]]) -> None:
        """
        Whatever interleaving of publishing (one event or several at once),
        reactor turns, joining and leaving: every subscriber gets each event
        after the one it joined at exactly once, in order; the ones that
        stayed get all of them by the terminal event.
        """
        clock = Clock()
        broker = MemoryBroker(clock=clock)
        broker.create(snapshot("j"))
        members: list[tuple[Calls, int, Any]] = []
        left: set[int] = set()
        published = 0
        for op, n in operations:
            if op == "publish":
                if n == 1:
                    broker.publish("j", "progress", {})
                else:
                    broker.publishMany("j", "progress", [{}] * n)
                published += n
            elif op == "turn":
                for _ in range(n):
                    turn(clock)
            elif op == "join":
                for _ in range(n):
                    calls = Calls()
                    members.append((calls, published, broker.subscribe("j", str(published) if published else None, calls)))
            elif members:
                index = n % len(members)
                members[index][2]()
                left.add(index)
        broker.publish("j", "complete", {})
        published += 1
        for _ in range(100):
            if not clock.getDelayedCalls():
                break
            turn(clock)
        for index, (calls, joinedAt, _) in enumerate(members):
            ids = calls.ids
            self.assertEqual(ids, list(range(joinedAt + 1, joinedAt + 1 + len(ids))), "gap, repeat or disorder")
            if index not in left:
                self.assertEqual(ids[-1:], [published])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(broker.subscriberCount(), 0)

    def test_keepsOnlyWhatSomeoneLacks(self) -> None:
        """
        A server that stays behind for a whole render (a new event before
        every pass ends) keeps only the events some subscriber has yet to
        get, not all of them; everyone still gets each once, in order.
        """
        fanout = Fanout(self.clock, slice=1)
        subscribers = [Calls() for _ in range(3)]
        for token, s in enumerate(subscribers):
            fanout.add(token, s, 0)
        worst = 0
        for seq in range(1, 1001):
            event = Event(data="{}", event="progress", id=str(seq))
            fanout.publish([Entry(seq, event, encodeEvent(event))])
            worst = max(worst, fanout.pending)
        self.assertLessEqual(worst, 4)
        fanout.flush()
        self.assertEqual(fanout.pending, 0)
        self.assertEqual([s.ids for s in subscribers], [list(range(1, 1001))] * 3)

"""
L{Fanout}: gives one job's new events to its subscribers in passes, a slice
of subscribers per reactor turn.

A pass over 10 000 streams is 10 000 sends, longer than the gap between
two progress events (docs/performance.md). Run in one reactor turn, nothing else happens meanwhile (no new
connection, no read of the render's next line), and an event printed during
a pass waits for that pass to end, then for a pass of its own to reach its
last subscriber: two passes at worst. Run a slice at a time, the render's
next lines are read between slices and reach every subscriber the pass has
not come to yet in the same write as the event they are waiting for; the
pass then goes round again for the ones it had already served. No event
waits more than about one pass, and the reactor stays responsive.

Each subscriber has a cursor, the sequence number of the last event it was
given. When the pass comes to it, it gets every queued event after its
cursor in one call (L{ISubscriber.deliver} for one, C{deliverMany} for
several: one write for a stream that keeps up). Subscribers at the same
cursor get the very same bytes object, joined once. Order and exactly-once
follow from the cursors. A terminal event goes out the same way (ending a
stream is work too: the pass that ends 10 000 of them is sliced like any
other); after it the job has no subscribers. L{Fanout.flush} gives out
everything queued at once: at shutdown, before connections are closed.

What it gives out is counted for /metrics (L{DeliveryStats}) in plain
integers when it is published (events times subscribers, their frames'
bytes times subscribers), and the delivery lag is observed once per pass:
from the first event a pass was started for to the pass's last delivery
(two clock reads per pass, none per delivery).
"""

from __future__ import annotations

import time
from typing import Callable, Union

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ._frames import Event
from ._interfaces import ISubscriber
from ._job import Entry
from ._metrics import DeliveryStats

_log = Logger()

#: Deliveries per reactor turn: a few milliseconds of sends, so the reactor
#: stays responsive during a long pass (docs/performance.md).
SLICE = 400


#: What one subscriber is handed: the arguments of C{ISubscriber.deliver}
#: (one event) or of C{deliverMany} (several).
_Batch = Union[tuple[Event, bytes], tuple[list[Event], list[bytes], bytes]]


class _Member:
    __slots__ = ("subscriber", "cursor", "active")

    def __init__(self, subscriber: ISubscriber, cursor: int) -> None:
        self.subscriber = subscriber
        self.cursor = cursor
        self.active = True


class Fanout:
    """
    One job's subscribers and the events not yet given to all of them.

    @param clock: schedules the next slice of a pass; with C{None} every
        pass runs whole in the call that published (no timers).
    @param onDropped: called with how many subscribers were dropped after
        the terminal event (those that did not leave by themselves).
    @param stats: where what it gives out is counted (shared by a
        broker's fan-outs); by default counts of its own.
    """

    def __init__(
        self,
        clock: IReactorTime | None = None,
        slice: int = SLICE,
        onDropped: Callable[[int], None] | None = None,
        stats: DeliveryStats | None = None,
    ) -> None:
        self._clock = clock
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.monotonic
        self._stats = stats if stats is not None else DeliveryStats()
        #: When the oldest event not yet given to everyone was published.
        self._since: float | None = None
        self._slice = slice
        self._onDropped = onDropped
        self._members: dict[int, _Member] = {}
        self._queue: list[Entry] = []
        self._head = 0
        self._pass: list[_Member] | None = None
        self._index = 0
        self._batches: dict[int, _Batch] = {}
        self._call: IDelayedCall | None = None
        self._running = False
        self._ending = False
        self._held: Entry | None = None

    def __len__(self) -> int:
        return len(self._members)

    @property
    def pending(self) -> int:
        """
        How many events are kept because some subscriber has yet to get
        them.
        """
        return len(self._queue) + (self._held is not None)

    def add(self, token: int, subscriber: ISubscriber, cursor: int) -> None:
        """
        Add a subscriber that has been given every event up to C{cursor}.
        """
        self._members[token] = _Member(subscriber, cursor)

    def remove(self, token: int) -> bool:
        member = self._members.pop(token, None)
        if member is None:
            return False
        member.active = False
        return True

    def publish(self, entries: list[Entry], terminal: bool = False) -> None:
        """
        Queue C{entries} (the next consecutive events) and give them out:
        the first slice now, the rest in later reactor turns. After a
        C{terminal} entry (it ends the job) has reached everyone, there are
        no subscribers left.
        """
        stats = self._stats
        stats.published += len(entries)
        members = len(self._members)
        if members:
            # Counted here, for the subscribers of now: a pass gives each
            # of them these events (one that leaves meanwhile is counted
            # all the same), and nothing is counted per delivery.
            stats.delivered += len(entries) * members
            stats.bytes += sum([len(entry.frame) for entry in entries]) * members
            if self._since is None:
                self._since = self._now()
        if terminal:
            # Held until everything before it has reached everyone: ending
            # a stream costs more than a send (the response's end, its log
            # line), and the last progress must not wait behind that work.
            self._ending = True
            self._held = entries[-1]
            entries = entries[:-1]
        if entries:
            self._queue.extend(entries)
            self._head = entries[-1].seq
            self._batches.clear()
        if self._pass is None:
            self._startPass()
        if self._running:
            return  # published from a delivery: the running slice goes on
        if self._clock is None:
            self.flush()
        else:
            self._step()

    def flush(self) -> None:
        """
        Give out everything queued now, whole.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        while self._pass is not None and not self._running:
            self._runSlice(len(self._pass) + 1)

    def _step(self) -> None:
        done = 0
        while self._pass is not None and done < self._slice:
            done += self._runSlice(self._slice - done)
        if self._pass is not None and self._call is None:
            self._call = self._clock.callLater(0, self._later)  # type: ignore[union-attr]

    def _later(self) -> None:
        self._call = None
        if self._pass is not None:
            self._step()

    def _startPass(self) -> None:
        self._pass = list(self._members.values())
        self._index = 0

    def _runSlice(self, budget: int) -> int:
        """
        Go on with the pass for up to C{budget} deliveries (members with
        nothing to get are skipped, and cost next to nothing); return how
        many were made.
        """
        order = self._pass
        assert order is not None
        self._running = True
        start = budget
        index, end = self._index, len(order)
        try:
            while index < end:
                member = order[index]
                if member.active and member.cursor < self._head:
                    if not budget:
                        # Stop at the next one with something to get: a
                        # pass whose work is done ends now, not a turn later.
                        break
                    budget -= 1
                    self._give(member)
                index += 1
        finally:
            self._index = index
            self._running = False
        if index < end:
            return start - budget
        head = self._head
        low = min((m.cursor for m in self._members.values()), default=head)
        if low < head:
            # Events came during this pass: round again for those it had
            # already served (the others got them with the rest). What
            # everyone has is dropped: a server that stays behind for a
            # long render must not keep all of it.
            done = low + 1 - self._queue[0].seq
            if done > 0:
                del self._queue[:done]
                self._batches.clear()
            self._startPass()
        elif self._held is not None:
            # Everyone has everything before the terminal event: now it.
            entry, self._held = self._held, None
            self._queue = [entry]
            self._head = entry.seq
            self._batches.clear()
            self._startPass()
        else:
            self._pass = None
            self._queue.clear()
            self._batches.clear()
            if self._since is not None:
                self._stats.lag.observe(self._now() - self._since)
                self._since = None
            if self._ending:
                self._drop()
        return start - budget

    def _drop(self) -> None:
        # Every one of them has had the terminal event.
        dropped = len(self._members)
        for member in self._members.values():
            member.active = False
        self._members.clear()
        if self._onDropped is not None and dropped:
            self._onDropped(dropped)

    def _give(self, member: _Member) -> None:
        offset = member.cursor + 1 - self._queue[0].seq
        batch = self._batches.get(offset)
        if batch is None:
            entries = self._queue[offset:]
            if len(entries) == 1:
                batch = (entries[0].event, entries[0].frame)
            else:
                frames = [e.frame for e in entries]
                batch = ([e.event for e in entries], frames, b"".join(frames))
            self._batches[offset] = batch
        member.cursor = self._head
        subscriber = member.subscriber
        try:
            if len(batch) == 2:
                subscriber.deliver(*batch)
            else:
                subscriber.deliverMany(*batch)
        except Exception:
            _log.failure("subscriber {subscriber!r} failed to take events", subscriber=subscriber)

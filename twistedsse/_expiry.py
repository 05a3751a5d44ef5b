"""
L{Deadlines}: many keys, each due at a time, served by one timer.

The service gives every finished job a deadline (C{--expire-after} after
it ended) and every expired id another (when it is forgotten). There may
be tens of thousands of them; one C{DelayedCall} each would cost a reactor
timer per job and make shutdown cancel them all. Instead the deadlines sit
in a heap and a single C{DelayedCall} waits for the earliest one: adding is
O(log n), and the reactor holds one timer whatever the count. When it
fires, every key that is due is handed to C{onDue}, in order, and the
timer is set for the next.

The timer exists only while the schedule is started, so that a stopped
service leaves no timer behind (trial's dirty-reactor check): deadlines
added while stopped wait in the heap until L{Deadlines.start}.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Callable, Generic, Hashable, TypeVar

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

_Key = TypeVar("_Key", bound=Hashable)


@attrs.define
class Deadlines(Generic[_Key]):
    """
    @ivar clock: the time, and the one timer.
    @ivar onDue: called with each key whose time has come.
    """

    clock: IReactorTime
    onDue: Callable[[_Key], None]
    _heap: list[tuple[float, int, _Key]] = attrs.field(factory=list, init=False)
    _order: "count[int]" = attrs.field(factory=count, init=False)
    _call: IDelayedCall | None = attrs.field(default=None, init=False)
    _started: bool = attrs.field(default=False, init=False)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, key: _Key) -> None:
        """
        Hand C{key} to C{onDue} at C{when} (or at the next start, if
        stopped; at once, if started and C{when} has passed).
        """
        entry = (when, next(self._order), key)
        heapq.heappush(self._heap, entry)
        if self._started and self._heap[0] is entry:
            self._schedule()

    def start(self) -> None:
        self._started = True
        self._schedule()

    def stop(self) -> None:
        """
        Cancel the timer; the deadlines are kept for the next start.
        """
        self._started = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._heap:
            delay = max(0.0, self._heap[0][0] - self.clock.seconds())
            self._call = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now and self._started:
            _, _, key = heapq.heappop(self._heap)
            try:
                self.onDue(key)
            except Exception:
                _log.failure("deadline of {key}", key=key)
        if self._started:
            self._schedule()

"""
L{Keepalives}: one timer for the keepalive comments of every open stream.

A timer per stream costs each of 10 000 idle streams a C{LoopingCall}, a
C{DelayedCall} and a Deferred, and the reactor a heap of 10 000 timers. One
C{LoopingCall} ticking every half interval does the same job: a stream that
wrote nothing since the previous tick gets a keepalive, so no stream goes
longer than the interval without a frame, and a stream whose events keep it
busy gets none (they are what a keepalive would have been for).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class _Pingable(Protocol):
    def keepalive(self) -> bool:
        """
        Write a keepalive comment unless a frame was written since the last
        call; whether it wrote one.
        """


class Keepalives:
    """
    Calls C{keepalive()} on every added stream each C{interval / 2}
    seconds, on C{clock}. The timer runs only while a stream is added.
    """

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._streams: dict[_Pingable, None] = {}
        self._loop: LoopingCall | None = None
        #: Keepalive comments written (for /metrics).
        self.sent = 0

    def add(self, stream: _Pingable) -> None:
        if self._interval <= 0:
            return
        self._streams[stream] = None
        if self._loop is None:
            loop = self._loop = LoopingCall(self._tick)
            loop.clock = self._clock
            loop.start(self._interval / 2, now=False)

    def discard(self, stream: _Pingable) -> None:
        self._streams.pop(stream, None)
        if not self._streams and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def running(self) -> bool:
        """
        Whether the timer is scheduled (only while a stream is added).
        """
        return self._loop is not None

    def _tick(self) -> None:
        # A copy: a write may end a stream (a lost connection) and discard it.
        sent = 0
        for stream in list(self._streams):
            if stream.keepalive():
                sent += 1
        self.sent += sent

"""
Waiting with a deadline, never without one: for a condition to hold
(blocking, or on the reactor) and for a process's output (a pipe read
with C{select}, so a silent process cannot hang the test).
"""

from __future__ import annotations

import os
import select
import time
from typing import IO, Any, Callable, Generator, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")


class TimedOut(AssertionError):
    """
    What was waited for did not happen before the deadline.
    """


def poll(condition: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """
    Call C{condition} every C{interval} seconds (sleeping in between) until
    it returns something true or C{timeout} seconds have passed.

    @return: its last value (false if the time ran out).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _describe(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def waitUntil(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.02) -> T:
    """
    L{poll} that fails when the time runs out.

    @return: the first true value of C{condition()}.
    @raise TimedOut: C{condition()} was still false after C{timeout}
        seconds; the message names C{what} (or what C{what()} says
        then).
    """
    value = poll(condition, timeout, interval)
    if not value:
        raise TimedOut(f"timed out after {timeout:g} s waiting for {_describe(what)}")
    return value


@inlineCallbacks
def whenTrue(
    clock: IReactorTime, condition: Callable[[], Any], timeout: float, what: str | Callable[[], str],
    interval: float = 0.01,
) -> Generator[Deferred[Any], Any, Any]:
    """
    L{waitUntil} for trial TestCases on a running reactor: check
    C{condition} every C{interval} seconds of C{clock} without blocking it.

    @return: a Deferred that fires with the first true value of
        C{condition()}, or fails with L{TimedOut} after C{timeout} seconds.
    """
    deadline = clock.seconds() + timeout
    while True:
        value = condition()
        if value:
            return value
        if clock.seconds() > deadline:
            raise TimedOut(f"timed out after {timeout:g} s waiting for {_describe(what)}")
        yield deferLater(clock, interval, lambda: None)


class PipeReader:
    """
    What a child process writes to a pipe, read as it comes with a
    deadline: each read waits in C{select} for at most the time left.

    @ivar output: everything read so far.
    @ivar closed: the other end closed the pipe (the process ended, or
        closed its output).
    """

    def __init__(self, pipe: IO[bytes] | int) -> None:
        self.fd = pipe if isinstance(pipe, int) else pipe.fileno()
        self.output = b""
        self.closed = False

    def readUntil(self, found: Callable[[bytes], T], timeout: float) -> T | None:
        """
        Read until C{found(output)} returns something true, the pipe closes
        or C{timeout} seconds pass.

        @return: the first true value of C{found(output)}, or C{None}: the
            pipe closed or the time ran out first (see L{closed}).
        """
        deadline = time.monotonic() + timeout
        while True:
            value = found(self.output)
            if value:
                return value
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                data = os.read(self.fd, 65536)
                if data:
                    self.output += data
                else:
                    self.closed = True

    def readLine(self, timeout: float) -> bytes | None:
        """
        The next whole line (with its LF), or C{None} if the pipe closed or
        C{timeout} seconds passed first.
        """
        line = self.readUntil(lambda output: output[: output.index(b"\n") + 1] if b"\n" in output else b"", timeout)
        if line:
            self.output = self.output[len(line) :]
        return line

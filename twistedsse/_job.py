"""
What a render job is: its state machine and the bounded, numbered history
of events it has published. Values and plain bookkeeping; no I/O, no
C{twisted.web}.
"""

from __future__ import annotations

import enum
from collections import deque
from itertools import islice
from typing import Any, Sequence

import attrs

from ._frames import Event
from ._json import JSONObject


class JobState(enum.Enum):
    """
    C{queued -> running -> succeeded | failed | cancelled}; C{queued} may
    also go straight to C{cancelled} (or C{failed}, when the server stops).
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_ALLOWED = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
}


@attrs.frozen
class JobSnapshot:
    """
    Everything known about one job at one moment. Changed only through
    L{JobSnapshot.transition} and L{attrs.evolve}.

    @ivar progress: the payload of the latest C{progress} event, or C{None}.
    @ivar result: the payload of the C{complete} event, once succeeded.
    @ivar error: the payload of the C{failed} event, once failed.
    @ivar callbackURL: where its end is POSTed (the client's
        C{callback_url}, checked against the operator's allow list), or
        C{None}.
    """

    id: str
    renderer: str
    params: JSONObject
    state: JobState
    createdAt: float
    startedAt: float | None = None
    endedAt: float | None = None
    progress: JSONObject | None = None
    result: JSONObject | None = None
    error: JSONObject | None = None
    callbackURL: str | None = None

    def transition(self, state: JobState, now: float, **changes: Any) -> JobSnapshot:
        """
        Move to C{state}, stamping the start or end time.

        @raise ValueError: the state machine does not allow this move (a
            finished job never changes again).
        """
        if state not in _ALLOWED.get(self.state, ()):
            raise ValueError(f"job {self.id}: cannot go from {self.state.value} to {state.value}")
        if state is JobState.RUNNING:
            changes["startedAt"] = now
        if state.terminal:
            changes["endedAt"] = now
        return attrs.evolve(self, state=state, **changes)

    def toJSON(self) -> dict[str, Any]:
        """
        The job as clients see it (URLs are added by the HTTP layer);
        C{callback_url} only if the client gave one.
        """
        data: dict[str, Any] = {
            "id": self.id,
            "renderer": self.renderer,
            "params": dict(self.params),
            "state": self.state.value,
            "progress": None if self.progress is None else dict(self.progress),
            "created_at": self.createdAt,
            "started_at": self.startedAt,
            "ended_at": self.endedAt,
            "result": None if self.result is None else dict(self.result),
            "error": None if self.error is None else dict(self.error),
        }
        if self.callbackURL is not None:
            data["callback_url"] = self.callbackURL
        return data


@attrs.frozen
class Entry:
    """
    One published event: its position in the job's sequence, the value,
    and its wire bytes, encoded once and shared by every subscriber.
    """

    seq: int
    event: Event
    frame: bytes


@attrs.define
class EventLog:
    """
    A job's numbered event history, bounded to C{limit} entries.

    When full, the oldest entries go first. A job publishes many
    C{progress} events and exactly one terminal event, which is always the
    last, so what is dropped is always old progress: a late subscriber still
    gets the latest progress and the outcome ("progress may be compacted to
    the latest, terminal events always kept").

    Once the job has ended, L{EventLog.compact} keeps only its latest
    progress and its terminal event: a finished job costs two entries, not
    C{limit}, for as long as it is kept. The retained sequence numbers are
    then no longer contiguous.
    """

    limit: int = attrs.field()
    _entries: deque[Entry] = attrs.field(factory=deque, init=False)
    _lastSeq: int = attrs.field(default=0, init=False)
    _contiguous: bool = attrs.field(default=True, init=False)

    @limit.validator
    def _checkLimit(self, attribute: object, value: int) -> None:
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"history limit must be an integer >= 2, got {value!r}")

    def append(self, entry: Entry) -> None:
        """
        Add the next entry (its C{seq} must follow the last one).
        """
        if entry.seq <= self._lastSeq:
            raise ValueError(f"event sequence must increase: {entry.seq} after {self._lastSeq}")
        if self._entries and entry.seq != self._lastSeq + 1:
            self._contiguous = False
        self._lastSeq = entry.seq
        self._entries.append(entry)
        if len(self._entries) > self.limit:
            self._entries.popleft()

    @property
    def lastSeq(self) -> int:
        """
        The sequence number of the last event ever appended (0: none yet).
        """
        return self._lastSeq

    def after(self, seq: int) -> Sequence[Entry]:
        """
        The retained entries with a sequence number above C{seq}, in order.
        """
        if seq >= self._lastSeq:
            return ()
        if not self._entries or seq < self._entries[0].seq:
            return tuple(self._entries)
        if not self._contiguous:
            # A compacted (or restored) log: a couple of entries.
            return tuple(entry for entry in self._entries if entry.seq > seq)
        # Sequence numbers are contiguous within the deque.
        return tuple(islice(self._entries, seq - self._entries[0].seq + 1, None))

    def compact(self) -> None:
        """
        Keep only the last entry (a finished job's terminal event) and the
        latest C{progress} entry before it.
        """
        if len(self._entries) <= 1:
            return
        last = self._entries[-1]
        progress = next(
            (e for e in reversed(self._entries) if e is not last and e.event.event == "progress"), None
        )
        kept = [last] if progress is None else [progress, last]
        self._contiguous = len(kept) == 1 or kept[0].seq + 1 == kept[1].seq
        self._entries = deque(kept)

    def __len__(self) -> int:
        return len(self._entries)

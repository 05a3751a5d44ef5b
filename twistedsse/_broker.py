"""
L{MemoryBroker}: jobs, their bounded event histories and the fan-out of
every new event to its subscribers, all in this process.

It is the shipped default and a verified implementation of L{IJobBroker},
not a test stub: the contract tests run against it. Event ids are the
decimal sequence numbers C{"1"}, C{"2"}, ... of each job.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from . import _json
from ._errors import JobExpired, UnknownJob
from ._frames import TERMINAL_EVENTS, Event, encodeEvent
from ._fanout import SLICE, Fanout
from ._metrics import DeliveryStats
from ._interfaces import IJobBroker, ISubscriber
from ._job import Entry, EventLog, JobSnapshot
from ._json import JSON

_log = Logger()

_MAX_ID_DIGITS = 18


def parseSequence(lastEventID: str | None) -> int:
    """
    Read a C{Last-Event-ID} this broker issued. Anything else (absent,
    empty, not plain ASCII digits, absurdly long) counts as "none", i.e. 0:
    the client gets the job's whole retained history, which is always safe
    (documented in the README).
    """
    if (
        lastEventID
        and len(lastEventID) <= _MAX_ID_DIGITS
        and lastEventID.isascii()
        and lastEventID.isdigit()
    ):
        return int(lastEventID)
    return 0


@attrs.define
class _MemoryJob:
    snapshot: JobSnapshot
    log: EventLog
    fanout: Fanout
    terminalSeq: int = 0


@implementer(IJobBroker)
@attrs.define
class MemoryBroker:
    """
    Keeps every job and its last C{history} events in memory; once a job
    has ended, only its latest progress and terminal event (a resume from
    an older id gets a C{reset} first). L{MemoryBroker.expire} deletes a
    job and remembers its id as expired (L{JobExpired}, 410) until
    L{MemoryBroker.forget}; the service decides when (C{--expire-after}).

    @ivar history: how many events each job retains for late subscribers
        and resumes.
    @ivar clock: lets a fan-out to many subscribers run a slice per reactor
        turn (L{Fanout}); without one, each runs whole when published.
    """

    history: int = 1000
    clock: IReactorTime | None = None
    fanoutSlice: int = SLICE
    _jobs: dict[str, _MemoryJob] = attrs.field(factory=dict, init=False)
    _nextToken: int = attrs.field(default=0, init=False)
    _subscriberCount: int = attrs.field(default=0, init=False)
    _expired: set[str] = attrs.field(factory=set, init=False)
    #: What the fan-outs gave out, for /metrics.
    stats: DeliveryStats = attrs.field(factory=DeliveryStats, init=False)

    def create(self, snapshot: JobSnapshot) -> None:
        if snapshot.id in self._jobs or snapshot.id in self._expired:
            raise ValueError(f"job {snapshot.id!r} exists already")
        self._jobs[snapshot.id] = _MemoryJob(snapshot, EventLog(self.history), Fanout(self.clock, self.fanoutSlice, self._dropped, self.stats))

    def flush(self) -> None:
        for job in self._jobs.values():
            job.fanout.flush()

    def _dropped(self, count: int) -> None:
        self._subscriberCount -= count

    def restore(self, snapshot: JobSnapshot, events: Iterable[tuple[int, str, str]]) -> None:
        """
        Add a job read back from storage with its events, each C{(seq,
        name, data)} with C{data} already JSON text, keeping their ids.
        """
        self.create(snapshot)
        job = self._jobs[snapshot.id]
        for seq, name, data in events:
            event = Event(data=data, event=name, id=str(seq))
            job.log.append(Entry(seq, event, encodeEvent(event)))
            if name in TERMINAL_EVENTS:
                job.terminalSeq = seq

    def finalEvents(self, jobID: str) -> list[tuple[int, str, str]]:
        """
        What is worth keeping of a finished job's history: its latest
        progress event and its terminal event.
        """
        entries = list(self._job(jobID).log.after(0))
        kept = entries[-1:]
        progress = [e for e in entries[:-1] if e.event.event == "progress"]
        kept = progress[-1:] + kept
        return [(e.seq, e.event.event or "message", e.event.data) for e in kept]

    def _job(self, jobID: str) -> _MemoryJob:
        try:
            return self._jobs[jobID]
        except KeyError:
            if jobID in self._expired:
                raise JobExpired(f"render {jobID} has expired: it and its output were deleted") from None
            raise UnknownJob(f"no render with id {jobID!r}") from None

    def remove(self, jobID: str) -> None:
        """
        Forget a job entirely, as if it had never been (a job that could
        not even be stored). Anything still queued for its subscribers is
        given out first.
        """
        job = self._jobs.pop(jobID, None)
        if job is not None:
            job.fanout.flush()

    def expire(self, jobID: str) -> None:
        """
        Delete a job and remember its id as expired: L{get} and the others
        raise L{JobExpired} until L{forget}.
        """
        self.remove(jobID)
        self._expired.add(jobID)

    def forget(self, jobID: str) -> None:
        """
        Stop remembering an expired id: it is unknown (404) from now on.
        """
        self._expired.discard(jobID)

    def expiredCount(self) -> int:
        """
        How many expired ids are remembered.
        """
        return len(self._expired)

    def get(self, jobID: str) -> JobSnapshot:
        return self._job(jobID).snapshot

    def update(self, snapshot: JobSnapshot) -> None:
        self._job(snapshot.id).snapshot = snapshot

    def jobs(self) -> list[JobSnapshot]:
        """
        Every job, oldest first.
        """
        return [job.snapshot for job in self._jobs.values()]

    def publish(self, jobID: str, name: str, data: JSON) -> Event:
        return self._publish(jobID, name, [data], name in TERMINAL_EVENTS)[0]

    def publishMany(self, jobID: str, name: str, datas: Sequence[JSON]) -> list[Event]:
        if name in TERMINAL_EVENTS:
            raise ValueError(f"job {jobID}: publishMany is for non-terminal events, not {name!r}")
        return self._publish(jobID, name, datas, False)

    def _publish(self, jobID: str, name: str, datas: Sequence[JSON], terminal: bool) -> list[Event]:
        """
        Number, encode (once) and record each event, then hand them to the
        job's fan-out together.
        """
        job = self._job(jobID)
        if job.terminalSeq:
            raise ValueError(f"job {jobID}: event {name!r} after its terminal event")
        entries: list[Entry] = []
        for data in datas:
            seq = job.log.lastSeq + 1
            event = Event(data=_json.dumps(data), event=name, id=str(seq))
            entry = Entry(seq, event, encodeEvent(event))
            job.log.append(entry)
            entries.append(entry)
        if terminal:
            job.terminalSeq = entries[-1].seq
        job.fanout.publish(entries, terminal)
        if terminal:
            # The fan-out holds its own list of what it has still to give
            # out: the log can shrink to what a late subscriber needs.
            job.log.compact()
        return [entry.event for entry in entries]

    def subscribe(
        self, jobID: str, lastEventID: str | None, subscriber: ISubscriber
    ) -> Callable[[], None]:
        job = self._job(jobID)
        after = parseSequence(lastEventID)
        if after > job.log.lastSeq:
            # An id ahead of this job's last event (not one this job issued:
            # another server's, a client's guess) is one we cannot read:
            # the whole retained history, as for garbage. Filtering on it
            # would hold back every event, the terminal one too, and the
            # stream would never end.
            after = 0
        entries = job.log.after(after)
        if after and entries and entries[0].seq > after + 1:
            # The client's last event is older than the retained history:
            # tell it so, with the current state, rather than skip silently.
            reset = self._reset(job, missed=entries[0].seq - after - 1, seq=entries[0].seq - 1)
            subscriber.deliver(reset, encodeEvent(reset))
        for entry in entries:
            subscriber.deliver(entry.event, entry.frame)
        if job.terminalSeq:
            return _noop
        token = self._nextToken
        self._nextToken += 1
        job.fanout.add(token, subscriber, job.log.lastSeq)
        self._subscriberCount += 1

        def unsubscribe() -> None:
            if job.fanout.remove(token):
                self._subscriberCount -= 1

        return unsubscribe

    @staticmethod
    def _reset(job: _MemoryJob, missed: int, seq: int) -> Event:
        return resetEvent(job.snapshot, missed, str(seq))

    def caughtUp(self, jobID: str, lastEventID: str | None) -> bool:
        job = self._job(jobID)
        return bool(job.terminalSeq) and parseSequence(lastEventID) >= job.terminalSeq

    def subscriberCount(self) -> int:
        return self._subscriberCount


def _noop() -> None:
    pass


def resetEvent(snapshot: JobSnapshot, missed: int | None, eventID: str) -> Event:
    """
    The C{reset} event a resuming client gets when events after its last
    one were dropped: the job's state and latest progress, and how many it
    missed (C{None}: unknown, after Redis lost a stream). Its id is that of
    the last dropped event, so a reconnect resumes after it.
    """
    data = {
        "state": snapshot.state.value,
        "progress": None if snapshot.progress is None else dict(snapshot.progress),
        "missed": missed,
    }
    return Event(data=_json.dumps(data), event="reset", id=eventID)

"""
L{RedisBroker}: L{IAsyncJobBroker} for a web instance in Redis mode.

Job state is L{RedisJobState}'s, events are written with L{RedisEventLog},
and streams keep today's fan-out: a web instance does not subscribe each
client to Redis. For each job with local subscribers it keeps a I{mirror}:
an L{EventLog} and a L{Fanout}, exactly as L{MemoryBroker} has for every
job, fed by the instance's one L{RedisEventReader} loop. The first
subscribe to a job loads the mirror (the job's state and its retained
stream, read once: L{SharedHistory}; every subscribe that comes while it
loads waits for that one read), then joins the loop at the stream's last
entry. From then on a subscribe is served from the mirror with no Redis
command at all, and a new event costs this instance one entry of one
C{XREAD}, encoded once, given out by the L{Fanout} as in memory mode:
the Redis work per event does not depend on the number of subscribers.

The SSE id is the Redis entry id (C{0-N}: L{twistedsse._redisevents});
L{Entry.seq} is its N, which the fan-out's cursors count in.

When a job's last local subscriber leaves, or after its terminal event
has been given out, its mirror is dropped and its watch ended: nothing is
kept for a job nobody here watches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _json
from ._asyncbroker import IAsyncJobBroker
from ._broker import resetEvent
from ._errors import JobExpired, UnknownJob
from ._fanout import SLICE, Fanout
from ._metrics import DeliveryStats
from ._frames import TERMINAL_EVENTS, Event, encodeEvent
from ._interfaces import ISubscriber
from ._job import Entry, EventLog, JobSnapshot, JobState
from ._json import JSON
from ._redisevents import History, RedisEventLog, SharedHistory, entryFrom, formatEventID, parseEventID
from ._redisreader import RedisEventReader, Reset
from ._redisstate import RedisJobState

_log = Logger()

_NON_TERMINAL = frozenset(state for state in JobState if not state.terminal)

#: KEYS: the job's hash, its expired marker, its event stream (the key
#: layout of L{RedisJobState} and L{RedisEventLog}). ARGV[1]: how long the
#: marker lives, in ms (0: until L{RedisBroker.forget}).
_EXPIRE = """
redis.call('DEL', KEYS[1], KEYS[3])
local ms = tonumber(ARGV[1])
if ms > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ms)
else
  redis.call('SET', KEYS[2], '1')
end
return 1
"""


@attrs.define(eq=False)
class _Waiter:
    after: int
    subscriber: ISubscriber
    deferred: Deferred[Callable[[], None]]
    #: Fresh state for a C{reset}, once read (a subscribe to a loaded
    #: mirror that needs one waits for it).
    snapshot: JobSnapshot | None = None


@attrs.define(eq=False)
class _Mirror:
    """
    One job as this instance mirrors it for its local subscribers.
    """

    jobID: str
    log: EventLog
    fanout: Fanout = attrs.field(init=False)
    loaded: bool = False
    terminalSeq: int = 0
    #: The subscribers the fan-out has, by token (kept to move their
    #: cursors over a gap in the stream: L{RedisBroker._entries}).
    members: dict[int, ISubscriber] = attrs.field(factory=dict)
    #: Subscribes waiting for the load, or for the state a reset needs.
    waiting: list[_Waiter] = attrs.field(factory=list)
    snapshot: JobSnapshot | None = None
    unwatch: Callable[[], None] | None = None


@implementer(IAsyncJobBroker)
@attrs.define
class RedisBroker:
    """
    A web instance's broker in Redis mode.

    @param state: job state (its connection: not the reader's).
    @param events: event writes and history reads (likewise).
    @param reader: this instance's one reading loop, started by L{start}
        and stopped by L{stop}.
    @param clock: for the fan-out's slices and the shared history reads.
    @param history: how many events each mirror keeps for a subscriber
        that resumes (give it the streams' C{--history}: a stream keeps at
        least that many).
    @param timeout: seconds a Redis command of this class's own may take
        (L{expire}, L{remove}, L{forget}, L{caughtUp}'s stream read).
    """

    state: RedisJobState
    events: RedisEventLog
    reader: RedisEventReader
    clock: IReactorTime
    history: int = 1000
    fanoutSlice: int = SLICE
    timeout: float = 3.0
    _shared: SharedHistory = attrs.field(init=False)
    _mirrors: dict[str, _Mirror] = attrs.field(factory=dict, init=False)
    _nextToken: int = attrs.field(default=0, init=False)
    _subscriberCount: int = attrs.field(default=0, init=False)
    #: Counters, for tests and the benchmark.
    loads: int = attrs.field(default=0, init=False)
    #: What the fan-outs gave out, for /metrics.
    stats: DeliveryStats = attrs.field(factory=DeliveryStats, init=False)

    @_shared.default
    def _makeShared(self) -> SharedHistory:
        return SharedHistory(self.events, self.clock)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """
        Start the reading loop.
        """
        self.reader.start()

    def stop(self) -> Deferred[None]:
        """
        Give out what was received, drop every mirror, stop the loop;
        fires once it has stopped. Subscribes still waiting for a load
        fail with C{CancelledError}.
        """
        self.flush()
        self._shared.stop()
        for mirror in list(self._mirrors.values()):
            waiting, mirror.waiting = mirror.waiting, []
            for waiter in waiting:
                waiter.deferred.cancel()
            self._drop(mirror)
        return self.reader.stop()

    def historyReads(self) -> int:
        """
        How many history reads (C{XRANGE}) the mirrors' loads made.
        """
        return self._shared.reads

    def mirrored(self) -> int:
        """
        How many jobs this instance mirrors (and watches).
        """
        return len(self._mirrors)

    # -- state -----------------------------------------------------------

    def create(self, snapshot: JobSnapshot) -> Deferred[None]:
        return self.state.create(snapshot)

    def get(self, jobID: str) -> Deferred[JobSnapshot]:
        return self.state.get(jobID)

    def update(self, snapshot: JobSnapshot) -> Deferred[None]:
        """
        Write C{snapshot}'s progress, then its state and the rest, if the
        job has not ended (two scripts, sent back to back: one round trip).
        A finished job never changes again: the Deferred fails with
        C{ValueError}, and the state Redis has stays (a compare-and-set,
        L{RedisJobState.transition}: of a cancel and a completion racing on
        two instances, one wins).
        """
        progress: Deferred[Any] = self.state.updateProgress(snapshot.id, snapshot.progress)
        written: Deferred[Any] = self.state.transition(snapshot.id, _NON_TERMINAL, snapshot)

        def done(results: list[Any]) -> None:
            transition = results[1]
            if not transition.applied:
                raise ValueError(
                    f"job {snapshot.id}: it is {transition.snapshot.state.value} already; not updated"
                )

        return gatherResults([progress, written], consumeErrors=True).addCallbacks(done, _firstError)

    def remove(self, jobID: str) -> Deferred[None]:
        return self._forgetLocally(
            jobID,
            # The hash, the stream and its end marker: as if never.
            self._command("DEL", *self._keys(jobID)[::2], self.events.endKey(jobID)),
            lambda: UnknownJob(f"no render with id {jobID!r}"),
        )

    def expire(self, jobID: str) -> Deferred[None]:
        """
        Delete the job's state and events now, and mark its id expired for
        the state's C{expireAfter} (0: until L{forget}). The job's output
        file is the caller's to delete (L{RedisJobState.dueOutputs} may
        name it again later: deleting it twice does no harm).
        """
        ms = round(self.state.expireAfter * 1000) if self.state.expireAfter > 0 else 0
        d = self._eval(_EXPIRE, self._keys(jobID), [ms])
        return self._forgetLocally(
            jobID, d, lambda: JobExpired(f"render {jobID} has expired: it and its output were deleted")
        )

    def forget(self, jobID: str) -> Deferred[None]:
        return self._command("DEL", self._keys(jobID)[1]).addCallback(lambda _: None)

    def _keys(self, jobID: str) -> list[str]:
        # The hash and the expired marker as RedisJobState names them, and
        # the event stream.
        prefix = self.state.prefix
        return [f"{prefix}job:{jobID}", f"{prefix}expired:{jobID}", self.events.key(jobID)]

    def _command(self, *args: object) -> Deferred[Any]:
        d: Deferred[Any] = self.events.connection.execute_command(*args)
        return d.addTimeout(self.timeout, self.clock)

    def _eval(self, script: str, keys: list[str], args: list[object]) -> Deferred[Any]:
        d: Deferred[Any] = self.events.connection.eval(script, keys, args)
        return d.addTimeout(self.timeout, self.clock)

    def _forgetLocally(self, jobID: str, d: Deferred[Any], gone: Callable[[], Exception]) -> Deferred[None]:
        def done(_: object) -> None:
            mirror = self._mirrors.get(jobID)
            if mirror is not None:
                # As MemoryBroker.remove: what is queued is given out first.
                mirror.fanout.flush()
                waiting, mirror.waiting = mirror.waiting, []
                self._drop(mirror)
                for waiter in waiting:
                    waiter.deferred.errback(gone())

        return d.addCallback(done)

    # -- events ----------------------------------------------------------

    def publish(self, jobID: str, name: str, data: JSON) -> Deferred[Event]:
        """
        Write the event to the job's stream (L{RedisEventLog.publish});
        fires with it, its id the entry's. Subscribers, here and on every
        instance, get it from their instance's reading loop.
        """
        try:
            text = _json.dumps(data)
        except ValueError:
            return fail()
        return self.events.publish(jobID, name, data).addCallback(
            lambda entryID: Event(data=text, event=name, id=entryID)
        )

    def publishMany(self, jobID: str, name: str, datas: Sequence[JSON]) -> Deferred[list[Event]]:
        try:
            if name in TERMINAL_EVENTS:
                raise ValueError(f"job {jobID}: publishMany is for non-terminal events, not {name!r}")
            texts = [_json.dumps(data) for data in datas]
        except ValueError:
            return fail()
        return self.events.publishMany(jobID, name, datas).addCallback(
            lambda ids: [Event(data=text, event=name, id=entryID) for text, entryID in zip(texts, ids)]
        )

    def flush(self) -> None:
        for mirror in list(self._mirrors.values()):
            mirror.fanout.flush()

    def subscriberCount(self) -> int:
        return self._subscriberCount

    def caughtUp(self, jobID: str, lastEventID: str | None) -> Deferred[bool]:
        """
        From the mirror when this instance has the job's terminal event;
        else the job's state, and for a finished job its last entry (one
        C{XREVRANGE COUNT 1}).
        """
        after = parseEventID(lastEventID)
        mirror = self._mirrors.get(jobID)
        if mirror is not None and mirror.loaded:
            # What this instance has of the job (a terminal event not read
            # yet here: the client subscribes and gets it).
            return succeed(bool(mirror.terminalSeq) and after >= mirror.terminalSeq)

        def state(snapshot: JobSnapshot) -> Deferred[bool] | bool:
            if not snapshot.state.terminal or not after:
                return False
            key = self.events.key(jobID)
            return self._command("XREVRANGE", key, "+", "-", "COUNT", 1).addCallback(last)

        def last(rows: Any) -> bool:
            for entryID, fields in rows or ():
                entry = entryFrom(entryID, fields)
                if entry is not None and entry.event.event in TERMINAL_EVENTS:
                    return after >= entry.seq
            return False

        return self.state.get(jobID).addCallback(state)

    # -- streams ---------------------------------------------------------

    def subscribe(
        self, jobID: str, lastEventID: str | None, subscriber: ISubscriber
    ) -> Deferred[Callable[[], None]]:
        after = parseEventID(lastEventID)
        mirror = self._mirrors.get(jobID)
        if mirror is not None and mirror.loaded:
            unsubscribe = self._attach(mirror, after, subscriber, None)
            if unsubscribe is not None:
                return succeed(unsubscribe)
        waiter = _Waiter(after, subscriber, Deferred(lambda d: self._cancelled(jobID, waiter)))
        if mirror is None:
            mirror = self._load(jobID)
            mirror.waiting.append(waiter)
        else:
            mirror.waiting.append(waiter)
            if mirror.loaded:
                # A reset is due: it carries the job's state as it is now.
                loaded = mirror
                self.state.get(jobID).addCallbacks(
                    lambda snapshot: self._fresh(snapshot, loaded, waiter),
                    lambda failure: self._failed(failure, loaded, waiter),
                )
        return waiter.deferred

    def _load(self, jobID: str) -> _Mirror:
        mirror = _Mirror(jobID, EventLog(self.history))
        mirror.fanout = Fanout(
            self.clock, self.fanoutSlice, lambda count: self._dropped(mirror, count), self.stats
        )
        self._mirrors[jobID] = mirror
        self.loads += 1
        reads: list[Deferred[Any]] = [self.state.get(jobID), self._shared.historyAfter(jobID, 0)]
        gatherResults(reads, consumeErrors=True).addCallbacks(
            lambda results: self._loaded(results, mirror), lambda failure: self._loadFailed(failure, mirror)
        )
        return mirror

    def _loaded(self, results: list[Any], mirror: _Mirror) -> None:
        if self._mirrors.get(mirror.jobID) is not mirror:
            return  # every waiter went away, or stopped
        snapshot: JobSnapshot = results[0]
        history: History = results[1]
        for entry in history.entries:
            mirror.log.append(entry)
            if entry.event.event in TERMINAL_EVENTS:
                mirror.terminalSeq = entry.seq
                break
        mirror.snapshot = snapshot
        mirror.loaded = True
        if mirror.terminalSeq:
            mirror.log.compact()
        else:
            mirror.unwatch = self.reader.watch(
                mirror.jobID,
                mirror.log.lastSeq,
                lambda entries: self._entries(mirror, entries),
                lambda reset: self._lost(mirror, reset),
            )
        waiting, mirror.waiting = mirror.waiting, []
        for waiter in waiting:
            unsubscribe = self._attach(mirror, waiter.after, waiter.subscriber, snapshot)
            assert unsubscribe is not None
            waiter.deferred.callback(unsubscribe)
        self._dropIfIdle(mirror)

    def _loadFailed(self, failure: Failure, mirror: _Mirror) -> None:
        if self._mirrors.get(mirror.jobID) is mirror:
            del self._mirrors[mirror.jobID]
        failure = _unwrap(failure)
        waiting, mirror.waiting = mirror.waiting, []
        for waiter in waiting:
            waiter.deferred.errback(failure)

    def _fresh(self, snapshot: JobSnapshot, mirror: _Mirror, waiter: _Waiter) -> None:
        if waiter not in mirror.waiting:
            return  # cancelled, or stopped
        mirror.waiting.remove(waiter)
        if self._mirrors.get(mirror.jobID) is not mirror:
            waiter.deferred.errback(UnknownJob(f"no render with id {mirror.jobID!r}"))
            return
        unsubscribe = self._attach(mirror, waiter.after, waiter.subscriber, snapshot)
        assert unsubscribe is not None
        waiter.deferred.callback(unsubscribe)
        self._dropIfIdle(mirror)

    def _failed(self, failure: Failure, mirror: _Mirror, waiter: _Waiter) -> None:
        if waiter in mirror.waiting:
            mirror.waiting.remove(waiter)
            waiter.deferred.errback(failure)
            self._dropIfIdle(mirror)

    def _cancelled(self, jobID: str, waiter: _Waiter) -> None:
        mirror = self._mirrors.get(jobID)
        if mirror is not None and waiter in mirror.waiting:
            mirror.waiting.remove(waiter)
            self._dropIfIdle(mirror)

    def _attach(
        self, mirror: _Mirror, after: int, subscriber: ISubscriber, snapshot: JobSnapshot | None
    ) -> Callable[[], None] | None:
        """
        L{MemoryBroker.subscribe} on the mirror: the retained events after
        C{after}, then the fan-out. C{None} if a C{reset} is due and there
        is no fresh C{snapshot} for it.
        """
        log = mirror.log
        if after > log.lastSeq:
            after = 0  # an id from ahead: the whole history (see IJobBroker)
        entries = log.after(after)
        if after and entries and entries[0].seq > after + 1:
            if snapshot is None:
                return None
            reset = resetEvent(snapshot, entries[0].seq - after - 1, formatEventID(entries[0].seq - 1))
            subscriber.deliver(reset, encodeEvent(reset))
        for entry in entries:
            subscriber.deliver(entry.event, entry.frame)
        if mirror.terminalSeq:
            return _noop
        token = self._nextToken
        self._nextToken += 1
        mirror.fanout.add(token, subscriber, log.lastSeq)
        mirror.members[token] = subscriber
        self._subscriberCount += 1

        def unsubscribe() -> None:
            if mirror.members.pop(token, None) is not None:
                mirror.fanout.remove(token)
                self._subscriberCount -= 1
                self._dropIfIdle(mirror)

        return unsubscribe

    def _entries(self, mirror: _Mirror, entries: Sequence[Entry]) -> None:
        """
        New entries from the reading loop: record them and fan them out.
        """
        if mirror.terminalSeq or self._mirrors.get(mirror.jobID) is not mirror:
            return
        fresh: list[Entry] = []
        for entry in entries:
            if entry.seq <= mirror.log.lastSeq:
                continue
            if entry.seq > (fresh[-1].seq if fresh else mirror.log.lastSeq) + 1:
                self._publish(mirror, fresh, False)
                fresh = []
                self._gap(mirror, entry.seq)
            fresh.append(entry)
            if entry.event.event in TERMINAL_EVENTS:
                break
        terminal = bool(fresh) and fresh[-1].event.event in TERMINAL_EVENTS
        self._publish(mirror, fresh, terminal)

    def _publish(self, mirror: _Mirror, entries: list[Entry], terminal: bool) -> None:
        if not entries:
            return
        for entry in entries:
            mirror.log.append(entry)
        if terminal:
            mirror.terminalSeq = entries[-1].seq
        mirror.fanout.publish(entries, terminal)
        if terminal:
            mirror.log.compact()

    def _gap(self, mirror: _Mirror, nextSeq: int) -> None:
        """
        Entries before C{nextSeq} were trimmed away before the loop read
        them (it fell more than the stream's length behind): each local
        subscriber is given what came before, then a C{reset} with how many
        it missed; the fan-out's cursors move past the gap.
        """
        fanout = mirror.fanout
        fanout.flush()
        reset = self._resetEvent(mirror, missed=nextSeq - mirror.log.lastSeq - 1, seq=nextSeq - 1)
        for token, subscriber in list(mirror.members.items()):
            fanout.remove(token)
            fanout.add(token, subscriber, nextSeq - 1)
        self._tell(mirror, reset)

    def _lost(self, mirror: _Mirror, reset: Reset) -> None:
        """
        The reader's L{Reset}. Entries skipped (C{missed} counted) are a
        gap, which L{_entries} sees in the ids as well and handles there
        (so that it is handled the same with or without this). A lost
        stream (Redis restarted without its data: numbering starts again
        at C{0-1}): each subscriber is given what came before, then a
        C{reset} (C{missed} unknown: C{null}; id C{0-0}, from which a
        resume gets the new stream whole), and the mirror starts again
        empty, its subscribers at the new stream's start.
        """
        if reset.missed is not None or self._mirrors.get(mirror.jobID) is not mirror or mirror.terminalSeq:
            return
        mirror.fanout.flush()
        event = self._resetEvent(mirror, missed=None, seq=reset.seq)
        members = dict(mirror.members)
        for token in members:
            mirror.fanout.remove(token)
        mirror.log = EventLog(self.history)
        mirror.fanout = Fanout(
            self.clock, self.fanoutSlice, lambda count: self._dropped(mirror, count), self.stats
        )
        for token, subscriber in members.items():
            mirror.fanout.add(token, subscriber, reset.seq)
        self._tell(mirror, event)

    def _resetEvent(self, mirror: _Mirror, missed: int | None, seq: int) -> Event:
        """
        A C{reset} for the mirror's subscribers: the state as last read
        here (Redis may have lost it: it is what this instance knows), the
        latest progress this mirror has.
        """
        snapshot = mirror.snapshot
        assert snapshot is not None
        progress = next((e for e in reversed(mirror.log.after(0)) if e.event.event == "progress"), None)
        payload = None if progress is None else _json.loads(progress.event.data)
        if isinstance(payload, dict):
            snapshot = attrs.evolve(snapshot, progress=payload)
        return resetEvent(snapshot, missed, formatEventID(seq))

    def _tell(self, mirror: _Mirror, reset: Event) -> None:
        frame = encodeEvent(reset)
        for subscriber in list(mirror.members.values()):
            try:
                subscriber.deliver(reset, frame)
            except Exception:
                _log.failure("subscriber {subscriber!r} failed to take a reset", subscriber=subscriber)

    def _dropped(self, mirror: _Mirror, count: int) -> None:
        # The terminal event has reached every subscriber: they are gone.
        self._subscriberCount -= count
        mirror.members.clear()
        self._dropIfIdle(mirror)

    def _dropIfIdle(self, mirror: _Mirror) -> None:
        if not mirror.members and not mirror.waiting:
            self._drop(mirror)

    def _drop(self, mirror: _Mirror) -> None:
        if self._mirrors.get(mirror.jobID) is mirror:
            del self._mirrors[mirror.jobID]
        if mirror.unwatch is not None:
            unwatch, mirror.unwatch = mirror.unwatch, None
            unwatch()
        if mirror.members:
            self._subscriberCount -= len(mirror.members)
            for token in mirror.members:
                mirror.fanout.remove(token)
            mirror.members.clear()
        # Ends a pass in progress (nothing left to give), and its timer.
        mirror.fanout.flush()


def _unwrap(failure: Failure) -> Failure:
    if isinstance(failure.value, FirstError):
        sub: Failure = failure.value.subFailure
        return sub
    return failure


def _firstError(failure: Failure) -> Failure:
    return _unwrap(failure)


def _noop() -> None:
    pass

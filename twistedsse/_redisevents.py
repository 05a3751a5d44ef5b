"""
Job events in Redis Streams: one stream per job (C{{prefix}events:{jobID}}),
trimmed to about C{history} entries, written by whoever runs the job and
read by every web instance.

Three parts:

  - L{RedisEventLog}: publish (C{XADD}), publish a batch in one round trip
    (one C{EVAL}), and read what a resuming client needs (C{XRANGE}),
    with L{MemoryBroker}'s C{Last-Event-ID} rules.
  - L{SharedHistory}: concurrent history reads of one job share one
    C{XRANGE}: a mass reconnect reads each job once, not once per client.
  - L{RedisEventReader}: one blocking C{XREAD} loop per instance over every
    watched job; the watchers of one job share one stream position, so
    the Redis work per event is per instance, not per subscriber.

Event ids. Entries are added with the id C{0-*}: Redis (>= 7.0) fills in
the sequence part, so a job's ids are C{0-1}, C{0-2}, ... in publish order.
They are real stream entry ids (the SSE id is the stream entry id) and,
like L{MemoryBroker}'s C{"1"}, C{"2"}, they count: a resume from before
the retained history knows exactly how many events it missed (the
C{reset} event's C{missed}), an id ahead of the last entry is recognised
with one comparison, and L{Entry.seq} (what L{Fanout} keeps its cursors
in) is the id's second part. Redis time-based ids (C{*}) would give
neither count. Intentional divergence from Redis habits: the
millisecond part is always 0.

A client's C{Last-Event-ID} is hostile input: L{parseEventID} reads only
C{0-N} (N at most 19 digits, below 2**63); anything else means "none"
(the whole retained history), as L{parseSequence} does for the memory
broker. What reaches Redis is an id this module formats from the integer,
never the client's text.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import deque
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import _json
from ._frames import TERMINAL_EVENTS, Event, encodeEvent
from ._job import Entry
from ._json import JSON

_log = Logger()

#: The only ids this module issues and reads back: C{0-N}, N >= 1.
_ID = re.compile(r"0-([0-9]{1,19})\Z")
_MAX_SEQ = 2**63 - 1

#: Adds each data (ARGV[5...]) as an entry of KEYS[1] (the stream), in
#: order, in one command (atomic: all or none), unless KEYS[2] (the end
#: marker) says the job has ended: then adds nothing and returns the
#: marker (the terminal event's id), not a table. ARGV[1] is MAXLEN,
#: ARGV[2] the name, ARGV[3] 1 for a terminal event, ARGV[4] the expiry in
#: ms (0: never).
#:
#: With a terminal event: the marker, and the expiry of the stream (ARGV[4]
#: ms) and of the marker (twice that: a late publish of an expired job is
#: refused for as long again, rather than start a stream with no expiry),
#: all set here, with the terminal event. C{0-*}: Redis 7.0.
_PUBLISH = """\
local ended = redis.call('GET', KEYS[2])
if ended then return ended end
local ids = {}
for i = 5, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-*',
                             'name', ARGV[2], 'data', ARGV[i])
end
if ARGV[3] == '1' then
  local ms = tonumber(ARGV[4])
  if ms > 0 then
    redis.call('PEXPIRE', KEYS[1], ms)
    redis.call('SET', KEYS[2], ids[#ids], 'PX', 2 * ms)
  else
    redis.call('SET', KEYS[2], ids[#ids])
  end
end
return ids
"""

#: Shrinks a finished job's stream (KEYS[1]; KEYS[2] its end marker: the
#: terminal event's id) to what L{MemoryBroker} keeps of a finished job
#: (L{twistedsse._job.EventLog.compact}): the latest C{progress} before
#: the terminal event (found reading backwards, a few entries at a time:
#: it is usually the one just before) and the terminal event. Returns how
#: many entries went. Nothing for a job not ended, or a stream gone
#: (XTRIM and XDEL create nothing). Exclusive ranges, XTRIM MINID: 6.2.
_COMPACT = """\
local last = redis.call('GET', KEYS[2])
if not last then return 0 end
local keep, doomed, before, count = nil, {}, '(' .. last, 4
while not keep do
  local rows = redis.call('XREVRANGE', KEYS[1], before, '-', 'COUNT', count)
  for _, row in ipairs(rows) do
    local fields = row[2]
    for j = 1, #fields - 1, 2 do
      if fields[j] == 'name' then
        if fields[j + 1] == 'progress' then keep = row[1] end
        break
      end
    end
    if keep then break end
    doomed[#doomed + 1] = row[1]
  end
  if keep or #rows < count then break end
  before, count = '(' .. rows[#rows][1], math.min(count * 4, 1000)
end
local removed = 0
if keep then
  removed = redis.call('XTRIM', KEYS[1], 'MINID', keep)
  for i = 1, #doomed, 1000 do
    removed = removed + redis.call('XDEL', KEYS[1], unpack(doomed, i, math.min(i + 999, #doomed)))
  end
else
  removed = redis.call('XTRIM', KEYS[1], 'MINID', last)
end
return removed
"""


def parseEventID(lastEventID: str | None) -> int:
    """
    The sequence number of a C{Last-Event-ID} this module issued
    (C{"0-42"} -> 42). Anything else (absent, garbage, C{"$"}, C{"+"},
    C{"-"}, negative, time-based, absurdly long or large, C{"0-0"}) is
    0: "none", the whole retained history.
    """
    if lastEventID and len(lastEventID) <= 21:
        match = _ID.match(lastEventID)
        if match is not None:
            seq = int(match.group(1))
            if seq <= _MAX_SEQ:
                return seq
    return 0


def formatEventID(seq: int) -> str:
    """
    The stream entry id of sequence number C{seq}.
    """
    return f"0-{seq}"


def streamKey(prefix: str, jobID: str) -> str:
    """
    The key of C{jobID}'s event stream.
    """
    return f"{prefix}events:{jobID}"


def entryFrom(entryID: str, fields: Sequence[str]) -> Entry | None:
    """
    An L{Entry} (its frame encoded once) from a stream entry as
    txredisapi returns it; C{None} for one this module did not write.
    """
    match = _ID.match(entryID)
    if match is None:
        return None
    values = dict(zip(fields[::2], fields[1::2]))
    name, data = values.get("name"), values.get("data")
    if not isinstance(name, str) or not isinstance(data, str):
        return None
    try:
        event = Event(data=data, event=name, id=entryID)
    except ValueError:
        return None
    return Entry(int(match.group(1)), event, encodeEvent(event))


def _entries(rows: Any, key: str) -> list[Entry]:
    entries = []
    for entryID, fields in rows or ():
        entry = entryFrom(entryID, fields)
        if entry is None:
            _log.warn("{key}: skipping stream entry {entryID!r}: not a twistedsse event", key=key, entryID=entryID)
        else:
            entries.append(entry)
    return entries


@attrs.frozen
class History:
    """
    What a (re)connecting client is given before live events.

    @ivar entries: the retained events after its C{Last-Event-ID}, in order.
    @ivar missed: how many events it missed (trimmed away before it came
        back); when not 0, the caller sends a C{reset} event (id
        L{resetID}) before C{entries}, as L{MemoryBroker} does.
    @ivar lastSeq: the job's last sequence number seen by this read (0:
        none): where to start watching for live events.
    """

    entries: tuple[Entry, ...]
    missed: int
    lastSeq: int

    @property
    def resetID(self) -> str | None:
        """
        The C{reset} event's id (the one before the first entry), if a
        reset is due.
        """
        if not self.missed:
            return None
        return formatEventID(self.entries[0].seq - 1)


@attrs.frozen
class StreamRead:
    """
    One C{XRANGE}'s worth of a job's stream: every retained entry after
    C{base} (C{base} 0: the whole retained stream), and the last sequence
    number. L{StreamRead.history} cuts it for each client that shares it.
    """

    base: int
    entries: tuple[Entry, ...]
    lastSeq: int
    _seqs: tuple[int, ...] = attrs.field(init=False)

    @_seqs.default
    def _makeSeqs(self) -> tuple[int, ...]:
        return tuple(entry.seq for entry in self.entries)

    def serves(self, after: int) -> bool:
        """
        Whether L{history}C{(after)} can be answered from this read: a
        resume from C{base} or later, or anything (garbage and ids ahead
        of the last entry too) from a whole read.
        """
        return self.base == 0 or self.base <= after <= self.lastSeq

    def history(self, after: int) -> History:
        """
        L{MemoryBroker.subscribe}'s rules: an id ahead of the last entry
        counts as none (the whole history: filtering on it would hold back
        every event, the terminal one too); an id older than the retained
        history gets C{missed} events counted.
        """
        if after > self.lastSeq:
            after = 0
        entries = self.entries[bisect_right(self._seqs, after) :]
        missed = 0
        if after and entries and entries[0].seq > after + 1:
            missed = entries[0].seq - after - 1
        return History(entries, missed, self.lastSeq)


@attrs.define
class RedisEventLog:
    """
    A job's events in Redis: written with L{publish} and L{publishMany},
    read back with L{history} (or L{read}, which L{SharedHistory} shares).

    Each write is one script (C{EVALSHA}; C{EVAL} the first time on a
    connection and after a restart emptied Redis' script cache): it refuses
    events after the job's terminal one, as L{MemoryBroker} does, atomically
    (no read-then-write race between two writers); with the terminal event
    it sets the stream's expiry.

    A finished job's stream shrinks to what L{MemoryBroker} keeps of it
    (L{compact}), but not with the terminal event: a reader a little behind
    (backing off after a failure, busy) would find the entries between its
    position and the terminal event gone. With a C{clock}, the log
    compacts C{settle} seconds after each terminal event it publishes (a
    reader behind by less loses nothing; one behind by more is told with a
    L{Reset}); L{stop} cancels those not done (the stream stays whole until
    it expires). Without a clock, whoever calls L{compact} decides.

    @param connection: a txredisapi connection (L{RedisEndpoint.connect});
        not the blocking reader's.
    @param history: streams are trimmed to about this many entries
        (C{MAXLEN ~}: whole radix-tree nodes go, so a few more, up to a
        node's 100, may stay; never fewer).
    @param expireAfter: seconds after its terminal event when a job's
        stream is deleted (C{0}: never): give it
        L{twistedsse._redisstate.RedisJobState}'s, so that a job's events
        go with it. A job's stream has no expiry before it ends.
    """

    connection: Any
    prefix: str = "twistedsse:"
    _history: int = attrs.field(default=1000, alias="history")
    expireAfter: float = 86400.0
    clock: IReactorTime | None = None
    settle: float = 10.0
    _compactions: dict[str, IDelayedCall] = attrs.field(factory=dict, init=False)

    def key(self, jobID: str) -> str:
        return streamKey(self.prefix, jobID)

    def endKey(self, jobID: str) -> str:
        """
        The key of C{jobID}'s end marker: its terminal event's id, set with
        it (a key of its own: it outlives the stream, see L{_PUBLISH}; and
        L{compact} finds the terminal event with it).
        """
        return f"{self.prefix}events-end:{jobID}"

    def _milliseconds(self) -> int:
        # As RedisJobState: at least 1 ms when set, 0 for never.
        return max(1, round(self.expireAfter * 1000)) if self.expireAfter > 0 else 0

    def publish(self, jobID: str, name: str, data: JSON) -> Deferred[str]:
        """
        Append one event (one C{EVALSHA} doing one C{XADD}); fires with its
        id. A terminal event (L{TERMINAL_EVENTS}) ends the job's stream.

        @raise ValueError: C{data} is not strict JSON (at once, nothing
            sent). Fails with L{ValueError} if the job has ended already.
        """
        texts = [_json.dumps(data)]
        terminal = name in TERMINAL_EVENTS
        d = self._publish(jobID, name, texts, terminal)
        if terminal and self.clock is not None:
            d.addCallback(self._scheduleCompaction, jobID)
        return d.addCallback(lambda ids: ids[0])

    def _scheduleCompaction(self, ids: list[str], jobID: str) -> list[str]:
        assert self.clock is not None
        self._compactions[jobID] = self.clock.callLater(self.settle, self._compactLater, jobID)
        return ids

    def _compactLater(self, jobID: str) -> None:
        del self._compactions[jobID]

        def failed(failure: Failure) -> None:
            # The stream stays whole until it expires: no harm beyond memory.
            _log.warn("{key}: could not compact: {failure.value!r}", key=self.key(jobID), failure=failure)

        self.compact(jobID).addErrback(failed)

    def compact(self, jobID: str) -> Deferred[int]:
        """
        Shrink a finished job's stream to its latest C{progress} and its
        terminal event (one C{EVALSHA}); fires with how many entries went
        (0 for a job not ended).
        """
        d: Deferred[int] = self.connection.eval(_COMPACT, [self.key(jobID), self.endKey(jobID)], [])
        return d

    def stop(self) -> None:
        """
        Cancel the compactions not done yet.
        """
        compactions, self._compactions = self._compactions, {}
        for call in compactions.values():
            if call.active():
                call.cancel()

    def publishMany(self, jobID: str, name: str, datas: Sequence[JSON]) -> Deferred[list[str]]:
        """
        Append several events of one name in one round trip and one
        command (an C{EVALSHA} doing one C{XADD} each: all are added, or
        none); fires with their ids, in order.

        @raise ValueError: C{name} is a terminal event's (as
            L{MemoryBroker.publishMany}), or some data is not strict JSON.
            Fails with L{ValueError} if the job has ended already.
        """
        if name in TERMINAL_EVENTS:
            raise ValueError(f"job {jobID}: publishMany is for non-terminal events, not {name!r}")
        texts = [_json.dumps(data) for data in datas]
        if not texts:
            return succeed([])
        return self._publish(jobID, name, texts, False)

    def _publish(self, jobID: str, name: str, texts: list[str], terminal: bool) -> Deferred[list[str]]:
        keys = [self.key(jobID), self.endKey(jobID)]
        args = [self._history, name, 1 if terminal else 0, self._milliseconds() if terminal else 0, *texts]
        d: Deferred[Any] = self.connection.eval(_PUBLISH, keys, args)

        def added(reply: Any) -> list[str]:
            if not isinstance(reply, list):
                raise ValueError(f"job {jobID}: event {name!r} after its terminal event ({reply})")
            return reply

        return d.addCallback(added)

    def read(self, jobID: str, after: int) -> Deferred[StreamRead]:
        """
        Read what a client resuming after C{after} needs. One C{XRANGE} in
        the common cases (0: the whole stream; an id with events after
        it); a client already up to date costs one C{XREVRANGE COUNT 1}
        more, and an id ahead of the last entry one C{XRANGE} more.
        """
        return Deferred.fromCoroutine(self._read(jobID, after))

    async def _read(self, jobID: str, after: int) -> StreamRead:
        key = self.key(jobID)
        if after:
            rows = await self.connection.execute_command("XRANGE", key, f"({formatEventID(after)}", "+")
            entries = _entries(rows, key)
            if entries:
                return StreamRead(after, tuple(entries), entries[-1].seq)
            last = _entries(await self.connection.execute_command("XREVRANGE", key, "+", "-", "COUNT", 1), key)
            if last and last[0].seq >= after:
                # Up to date (or an entry came between the two reads: the
                # live watch, which starts at after, will bring it).
                return StreamRead(after, (), after)
        rows = await self.connection.execute_command("XRANGE", key, "-", "+")
        entries = _entries(rows, key)
        return StreamRead(0, tuple(entries), entries[-1].seq if entries else 0)

    def history(self, jobID: str, lastEventID: str | None) -> Deferred[History]:
        """
        The events a client with C{lastEventID} (a raw, untrusted header
        value or C{None}) is owed, with L{MemoryBroker}'s rules.
        """
        after = parseEventID(lastEventID)
        return self.read(jobID, after).addCallback(lambda read: read.history(after))


@attrs.define(eq=False)
class _PendingRead:
    base: int
    waiters: list[tuple[int, Deferred[History]]] = attrs.field(factory=list)
    started: bool = False


@attrs.define
class SharedHistory:
    """
    History reads shared by the clients resuming one job at the same time.

    Requests made in one reactor turn for a job become one read, from the
    oldest of their ids; a request made while a read of its job is in
    flight joins it if that read covers it (it started at or before the
    request's id, or is a whole read). A mass reconnect of 10 000 clients
    of one job therefore costs one C{XRANGE}, whatever ids they bring.
    """

    log: RedisEventLog
    clock: IReactorTime
    _queued: dict[str, _PendingRead] = attrs.field(factory=dict, init=False)
    _inFlight: dict[str, list[_PendingRead]] = attrs.field(factory=dict, init=False)
    _calls: set[IDelayedCall] = attrs.field(factory=set, init=False)
    reads: int = attrs.field(default=0, init=False)

    def history(self, jobID: str, lastEventID: str | None) -> Deferred[History]:
        return self.historyAfter(jobID, parseEventID(lastEventID))

    def historyAfter(self, jobID: str, after: int) -> Deferred[History]:
        d: Deferred[History] = Deferred()
        for pending in self._inFlight.get(jobID, ()):
            if pending.base == 0 or 0 < pending.base <= after:
                pending.waiters.append((after, d))
                return d
        queued = self._queued.get(jobID)
        if queued is None:
            queued = self._queued[jobID] = _PendingRead(after)
            self._calls.add(self.clock.callLater(0, self._start, jobID))
        else:
            queued.base = min(queued.base, after)
        queued.waiters.append((after, d))
        return d

    def _start(self, jobID: str) -> None:
        self._calls = {call for call in self._calls if call.active()}
        pending = self._queued.pop(jobID)
        pending.started = True
        self._inFlight.setdefault(jobID, []).append(pending)
        self.reads += 1
        self.log.read(jobID, pending.base).addBoth(self._done, jobID, pending)

    def _done(self, result: StreamRead | Any, jobID: str, pending: _PendingRead) -> None:
        reads = self._inFlight[jobID]
        reads.remove(pending)
        if not reads:
            del self._inFlight[jobID]
        for after, d in pending.waiters:
            if not isinstance(result, StreamRead):
                d.errback(result)
            elif result.serves(after):
                d.callback(result.history(after))
            else:
                # An id ahead of the last entry, past a read that was not
                # whole: read again (it will be).
                self.historyAfter(jobID, after).chainDeferred(d)

    def stop(self) -> None:
        """
        Cancel the reads not started yet (their Deferreds fail with
        L{CancelledError}).
        """
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        queued, self._queued = self._queued, {}
        for pending in queued.values():
            for _, d in pending.waiters:
                d.errback(CancelledError())


#: What a watcher is given: the next entries of its job, in order. The
#: last may be a terminal event (L{TERMINAL_EVENTS}): then the watch has
#: ended (there is nothing to unwatch, though unwatching does no harm).
OnEntries = Callable[[Sequence[Entry]], None]


@attrs.frozen
class Reset:
    """
    A watcher's position no longer leads on to the entries that follow:
    what its client must be told with the SSE C{reset} event (the job's
    state and progress as Redis has them now, read by whoever turns this
    into the event: L{RedisJobState}), before the entries that follow.

    Two causes:

      - Redis lost the job's stream (restarted without persistence, or
        the stream was deleted): its numbering starts again at C{0-1}.
        C{seq} is 0, C{missed} C{None} (unknown: the events published
        between the watcher's last one and the loss are gone without a
        count). The entries that follow are the stream from its start.
      - Entries between the watcher's last one and the next were removed
        before the reader got to them (trimmed to C{history}, or a finished
        job's stream shrunk: L{RedisEventLog.compact}): C{missed} of them, as
        L{History.missed} counts for a resume.

    @ivar seq: the sequence number the C{reset} event's id is made of
        (L{formatEventID}): the entry before the next one given, so that a
        client reconnecting with it resumes right after the reset (C{0-0}
        is read as "none": the whole stream, which is right after a loss).
    @ivar missed: how many events were skipped, or C{None}: unknown.
    """

    seq: int
    missed: int | None


#: Told of a L{Reset} before the entries that follow it.
OnReset = Callable[[Reset], None]


@attrs.define(eq=False)
class _Watcher:
    token: int
    onEntries: OnEntries
    onReset: OnReset | None
    delivered: int
    active: bool = True


@attrs.define(eq=False)
class _WatchedJob:
    jobID: str
    key: str
    #: The id of the last entry read (sent back as XREAD's position); a
    #: server-issued id, never a client's.
    position: str
    #: The sequence number of the last of our entries read.
    seq: int
    tail: deque[Entry]
    #: The entry numbered C{seq}, once read: what the check after a
    #: failure looks for in Redis (None: none read yet).
    last: Entry | None = None
    #: Whether C{last} is known (read, or looked for once: a watch from a
    #: client's id).
    known: bool = False
    watchers: dict[int, _Watcher] = attrs.field(factory=dict)
    #: Watchers that joined behind C{seq} and beyond the tail: the loop
    #: reads their gap (one XRANGE per distinct id) before its next XREAD.
    catchingUp: list[_Watcher] = attrs.field(factory=list)
    ended: bool = False


@attrs.define
class RedisEventReader:
    """
    One instance's reader of every job it watches: one loop doing
    C{XREAD COUNT n BLOCK b STREAMS k1 k2 ... id1 id2 ...} on a connection
    of its own, one stream position per job, whatever the number of
    watchers of that job (they share it, and the entries, encoded once).

    A new watch must not wait for the running C{XREAD} to time out (up to
    C{block} ms): with C{wakeup}, the reader sends C{CLIENT UNBLOCK} for
    its blocking connection's client id (learnt with C{CLIENT ID}) on the
    C{control} connection, and the loop comes round with the new job at
    once. Several watches in a row cost one unblock.

    Redis down: the read fails (or times out, bounded), the loop waits
    (backing off from C{retryDelay} to C{maxRetryDelay}) and tries again
    from the same positions, so when Redis (with AOF) is back, every entry
    arrives once, in order. L{stop} ends the loop (unblocking the read) and
    fires when it has.

    Redis back without its data (no AOF): its streams start again at
    C{0-1}, below the positions the loop holds, which an C{XREAD} would
    wait at for ever. So after a failure, before reading on, the loop
    checks each watched job (L{_verify}: one C{XRANGE} of the one entry at
    its position, all jobs in one round trip): if that entry is gone or is
    another one, Redis lost the stream; its watchers are told with a
    L{Reset} (C{missed} unknown) and given the stream from its start.
    Entries removed under the loop's position (trimmed, or a finished
    job's stream shrunk) are a L{Reset} with their count too (no command:
    the ids count).

    @param connection: a txredisapi connection for this reader alone (a
        blocking read holds its connection).
    @param control: another connection (the one L{RedisEventLog} uses
        will do), for C{CLIENT UNBLOCK}.
    @param block: milliseconds each C{XREAD} may block; keep it short (a
        cancelled C{XREAD} still blocks its connection server-side, and
        L{stop} waits for at most about this long if an unblock fails).
    @param count: at most this many entries per job per C{XREAD}.
    @param tailSize: the last entries of each job kept here, so that a
        watcher joining a little behind the shared position (its history
        was read just before the reader went on) is caught up without
        Redis.
    """

    connection: Any
    control: Any
    clock: IReactorTime
    prefix: str = "twistedsse:"
    block: int = 1000
    count: int = 100
    tailSize: int = 128
    wakeup: bool = True
    retryDelay: float = 0.05
    maxRetryDelay: float = 2.0
    #: Extra seconds an XREAD may take beyond its BLOCK before it is
    #: abandoned (Redis unreachable: txredisapi waits for a connection).
    grace: float = 2.0

    _jobs: dict[str, _WatchedJob] = attrs.field(factory=dict, init=False)
    _byKey: dict[str, _WatchedJob] = attrs.field(factory=dict, init=False)
    _nextToken: int = attrs.field(default=0, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _loop: Deferred[None] | None = attrs.field(default=None, init=False)
    _idle: Deferred[None] | None = attrs.field(default=None, init=False)
    _sleeping: Deferred[None] | None = attrs.field(default=None, init=False)
    _reading: bool = attrs.field(default=False, init=False)
    _readNumber: int = attrs.field(default=0, init=False)
    _dirty: bool = attrs.field(default=False, init=False)
    _waking: Deferred[None] | None = attrs.field(default=None, init=False)
    _clientID: int | None = attrs.field(default=None, init=False)
    _failures: int = attrs.field(default=0, init=False)
    #: Counters, for tests and the benchmark.
    reads: int = attrs.field(default=0, init=False)
    unblocks: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    #: Jobs found lost by L{_verify}, and its runs.
    losses: int = attrs.field(default=0, init=False)
    verifications: int = attrs.field(default=0, init=False)
    #: Set by a failure: check the positions before reading on.
    _unverified: bool = attrs.field(default=False, init=False)

    def start(self) -> None:
        """
        Start the loop (it does nothing while nothing is watched).
        """
        if self._loop is not None:
            raise RuntimeError("the reader has started already")
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())

    def stop(self) -> Deferred[None]:
        """
        End the loop; fires once it has, with nothing of it left running
        (no timer, no command awaited). Watchers get nothing more.
        """
        if self._loop is None:
            return succeed(None)
        self._running = False
        self._jobs.clear()
        self._byKey.clear()
        if self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)
        if self._sleeping is not None:
            self._sleeping.cancel()
        self._wake()
        loop = self._loop

        def waking(_: object) -> Deferred[None] | None:
            return self._waking

        return loop.addCallback(waking)

    def watching(self) -> int:
        """
        How many jobs the loop reads.
        """
        return len(self._jobs)

    def watch(
        self, jobID: str, after: int, onEntries: OnEntries, onReset: OnReset | None = None
    ) -> Callable[[], None]:
        """
        Give C{onEntries} every entry of C{jobID} after sequence number
        C{after} (from L{History.lastSeq}), as it comes; returns the
        function that stops it. C{onReset} is told when the entries that
        follow do not follow on from the last one given (L{Reset}); without
        it, the watcher is given them all the same.

        The watchers of one job share its stream position: a watcher
        joining at an older C{after} is first given the entries it lacks
        (from the kept tail, in this call; else read from Redis by the
        loop), a watcher ahead of the position gets only what follows its
        C{after}.
        """
        if not self._running:
            raise RuntimeError("the reader is not running")
        job = self._jobs.get(jobID)
        if job is None:
            key = streamKey(self.prefix, jobID)
            job = _WatchedJob(jobID, key, formatEventID(after) if after else "0-0", after, deque(maxlen=self.tailSize))
            job.known = not after
            self._jobs[jobID] = job
            self._byKey[key] = job
            self._wake()
        watcher = _Watcher(self._nextToken, onEntries, onReset, after)
        self._nextToken += 1
        if after >= job.seq and not job.ended:
            job.watchers[watcher.token] = watcher
        elif job.tail and job.tail[0].seq <= after + 1:
            entries = [entry for entry in job.tail if entry.seq > after]
            if not job.ended:
                job.watchers[watcher.token] = watcher
            self._give(watcher, entries, job.seq)
        else:
            job.catchingUp.append(watcher)
            self._wake()

        def unwatch() -> None:
            watcher.active = False
            if job.watchers.pop(watcher.token, None) is None and watcher in job.catchingUp:
                job.catchingUp.remove(watcher)
            if not job.watchers and not job.catchingUp:
                self._drop(job)

        return unwatch

    def _drop(self, job: _WatchedJob) -> None:
        if self._jobs.get(job.jobID) is job:
            del self._jobs[job.jobID]
            del self._byKey[job.key]

    def _give(self, watcher: _Watcher, entries: Sequence[Entry], upTo: int = 0) -> None:
        """
        Give C{watcher} those of C{entries} after the last it was given,
        a L{Reset} before each gap in their numbers; it is then at
        C{upTo} (or the last given, if later).
        """
        since = watcher.delivered
        given = [entry for entry in entries if entry.seq > since]
        watcher.delivered = max(since, upTo, given[-1].seq if given else 0)
        if not given or not watcher.active:
            return
        start, previous = 0, since
        for index, entry in enumerate(given):
            if entry.seq > previous + 1:
                self._call(watcher, given[start:index])
                self._reset(watcher, Reset(entry.seq - 1, entry.seq - previous - 1))
                start = index
            previous = entry.seq
        self._call(watcher, given[start:])

    def _call(self, watcher: _Watcher, entries: Sequence[Entry]) -> None:
        if not entries or not watcher.active:
            return
        try:
            watcher.onEntries(entries)
        except Exception:
            _log.failure("a watcher failed with the events up to {eventID}", eventID=entries[-1].event.id)

    def _reset(self, watcher: _Watcher, reset: Reset) -> None:
        if watcher.onReset is None or not watcher.active:
            return
        try:
            watcher.onReset(reset)
        except Exception:
            _log.failure("a watcher failed with {reset!r}", reset=reset)

    def _wake(self) -> None:
        """
        Bring the loop round now: it is idle, or its XREAD lacks a job.
        """
        self._dirty = True
        if self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)
            return
        if not self._reading or not self.wakeup or self._waking is not None or self._clientID is None:
            return
        self._waking = Deferred.fromCoroutine(self._unblock(self._readNumber, self._clientID))
        self._waking.addBoth(self._woken)

    def _woken(self, result: object) -> None:
        self._waking = None
        if isinstance(result, Failure):
            _log.failure("CLIENT UNBLOCK", result)
        elif self._dirty and self._reading:
            # A watch came after the unblock went out: that read lacks it.
            self._wake()

    async def _unblock(self, readNumber: int, clientID: int) -> None:
        """
        C{CLIENT UNBLOCK} the reader's C{XREAD}. It may not have reached
        the server yet (it went on another connection): then try again a
        little later, while that same read is still going.
        """
        for attempt in range(12):
            if self._readNumber != readNumber or not self._reading:
                return
            try:
                d = self.control.execute_command("CLIENT", "UNBLOCK", clientID)
                unblocked = await d.addTimeout(self.grace, self.clock)
            except Exception as e:
                _log.warn("CLIENT UNBLOCK {clientID}: {e!r}", clientID=clientID, e=e)
                return
            if unblocked == 1:
                self.unblocks += 1
                return
            await self._sleep(0.0005 * 2**attempt)

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        call = self.clock.callLater(seconds, d.callback, None)

        def cancel(_: Deferred[None]) -> None:
            call.cancel()

        d2: Deferred[None] = Deferred(cancel)
        d.chainDeferred(d2)
        return d2

    async def _run(self) -> None:
        while self._running:
            if not self._jobs:
                self._idle = Deferred()
                await self._idle
                continue
            try:
                if self._clientID is None and self.wakeup:
                    d = self.connection.execute_command("CLIENT", "ID")
                    self._clientID = int(await d.addTimeout(self.grace, self.clock))
                if self._unverified:
                    await self._verify()
                    self._unverified = False
                await self._learn()
                await self._catchUp()
                if self._stopping():
                    break
                reply = await self._read()
            except Exception as e:
                if self._stopping():
                    break
                self.errors += 1
                self._clientID = None
                self._unverified = True
                delay = min(self.retryDelay * 2**self._failures, self.maxRetryDelay)
                self._failures += 1
                _log.warn("reading job events from Redis: {e!r}; again in {delay:.2f} s", e=e, delay=delay)
                self._sleeping = self._sleep(delay)
                try:
                    await self._sleeping
                except CancelledError:
                    pass
                finally:
                    self._sleeping = None
                continue
            self._failures = 0
            if reply:
                self._deliver(reply)

    def _stopping(self) -> bool:
        # (a method: mypy would take self._running for the True it was
        # when the loop went round, awaits notwithstanding)
        return not self._running

    async def _read(self) -> Any:
        jobs = [job for job in self._jobs.values() if not job.ended]
        if not jobs:
            return None
        args: list[object] = ["XREAD", "COUNT", self.count, "BLOCK", self.block, "STREAMS"]
        args += [job.key for job in jobs]
        args += [job.position for job in jobs]
        self._dirty = False
        self._readNumber += 1
        self.reads += 1
        self._reading = True
        try:
            d = self.connection.execute_command(*args)
            return await d.addTimeout(self.block / 1000 + self.grace, self.clock)
        finally:
            self._reading = False

    async def _positionEntries(self, jobs: Sequence[_WatchedJob]) -> list[Any]:
        """
        The entry at each job's position (C{XRANGE id id}), read together.
        """
        reads = [
            self.connection.execute_command(
                "XRANGE", job.key, formatEventID(job.seq), formatEventID(job.seq)
            ).addTimeout(self.grace, self.clock)
            for job in jobs
        ]
        replies: list[Any] = await gatherResults(reads, consumeErrors=True)
        return replies

    async def _learn(self) -> None:
        """
        Read the entry at the position of each job watched from a client's
        id (once, before its first C{XREAD}; one round trip for all), for
        L{_verify} to compare: without it, a new stream with an entry there
        would pass for the one lost.
        """
        jobs = [job for job in self._jobs.values() if not job.known]
        if not jobs:
            return
        replies = await self._positionEntries(jobs)
        for job, rows in zip(jobs, replies):
            if self._jobs.get(job.jobID) is job and not job.known:
                found = _entries(rows, job.key)
                job.last = found[0] if found else None
                job.known = True

    async def _verify(self) -> None:
        """
        Check, after a failure, that each watched job's stream still holds
        the entry at the loop's position (read by the loop or by L{_learn};
        if neither found one, any entry there): one C{XRANGE id id} per job,
        sent together (one round trip). An entry gone or another one: Redis
        lost the stream (restarted without AOF), so L{_lost}.

        An entry trimmed away while the loop was away is taken for a loss
        too: its watchers missed entries either way, and the stream from
        its start is then exactly what follows their position. A new
        stream whose entry at the position is equal to the old one (same
        name and data) is not told apart: ids carry no epoch.
        """
        jobs = [job for job in self._jobs.values() if job.seq and not job.ended]
        if not jobs:
            return
        self.verifications += 1
        replies = await self._positionEntries(jobs)
        for job, rows in zip(jobs, replies):
            if self._jobs.get(job.jobID) is not job or job.ended:
                continue  # unwatched, or (a new watch) read since
            found = _entries(rows, job.key)
            if found and (job.last is None or found[0].event == job.last.event):
                continue
            self._lost(job)

    def _lost(self, job: _WatchedJob) -> None:
        """
        C{job}'s stream is not the one the loop was reading: read it again
        from its start, and tell its watchers (those catching up too: what
        they lack is gone).
        """
        self.losses += 1
        _log.warn("{key}: Redis lost the events up to {eventID}; reading it from its start", key=job.key, eventID=formatEventID(job.seq))
        job.position, job.seq, job.last, job.known = "0-0", 0, None, True
        job.tail.clear()
        watchers = list(job.watchers.values()) + job.catchingUp
        job.catchingUp = []
        for watcher in watchers:
            watcher.delivered = 0
            if watcher.active:
                job.watchers[watcher.token] = watcher
        for watcher in watchers:
            self._reset(watcher, Reset(0, None))

    async def _catchUp(self) -> None:
        """
        Read, for the watchers that joined behind their job's position and
        beyond its tail, the entries they lack: one C{XRANGE} per job and
        id.
        """
        for job in list(self._jobs.values()):
            while job.catchingUp and self._running:
                after = min(watcher.delivered for watcher in job.catchingUp)
                upTo = job.seq
                rows = await self.connection.execute_command(
                    "XRANGE", job.key, f"({formatEventID(after)}", formatEventID(upTo)
                )
                entries = _entries(rows, job.key)
                for watcher in [w for w in job.catchingUp if w.delivered == after]:
                    job.catchingUp.remove(watcher)
                    if watcher.active and not job.ended:
                        job.watchers[watcher.token] = watcher
                    self._give(watcher, entries, upTo)
            if job.ended and not job.catchingUp:
                self._drop(job)

    def _deliver(self, reply: Any) -> None:
        for key, rows in reply:
            job = self._byKey.get(key)
            if job is None or job.ended or not rows:
                continue  # unwatched while the read was out
            job.position = rows[-1][0]
            entries = _entries(rows, key)
            for index, entry in enumerate(entries):
                if entry.event.event in TERMINAL_EVENTS:
                    del entries[index + 1 :]
                    job.ended = True
                    break
            if not entries:
                continue
            job.seq = entries[-1].seq
            job.last, job.known = entries[-1], True
            job.tail.extend(entries)
            watchers = list(job.watchers.values())
            if job.ended:
                # Over before the watchers hear of it: one that looks
                # (or watches again) from its callback sees it over.
                job.watchers.clear()
                if not job.catchingUp:
                    self._drop(job)
            for watcher in watchers:
                self._give(watcher, entries)

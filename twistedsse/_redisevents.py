"""
Job events in Redis Streams: one stream per job (C{{prefix}events:{jobID}}),
trimmed to about C{history} entries, written by whoever runs the job and
read by every web instance.

Here:

  - L{RedisEventLog}: publish (C{XADD}), publish a batch in one round trip
    (one C{EVAL}), and read what a resuming client needs (C{XRANGE}),
    with L{MemoryBroker}'s C{Last-Event-ID} rules.
  - L{SharedHistory}: concurrent history reads of one job share one
    C{XRANGE}: a mass reconnect reads each job once, not once per client.

Live events are read by L{twistedsse._redisreader.RedisEventReader}: one
blocking C{XREAD} loop per instance over every watched job.

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
from typing import Any, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
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
#:
#: ARGV[5] is a write token (C{WRITER:N}, or empty) and ARGV[6] its mode;
#: KEYS[3] keeps the last token written with the ids it got. The same
#: token again (a retry after a reply was lost, or a command Redis got
#: twice) adds nothing and returns the first ids: a retried write is never
#: a duplicate. A token of another WRITER is refused (C{STALE}) unless the
#: mode is C{take}: a worker that runs a job anew takes its events over
#: (its C{retrying} event), and what an earlier run still sends (commands
#: queued while Redis was away) is refused. The terminal event deletes
#: KEYS[3]; otherwise it lives a day.
_PUBLISH = """\
local ended = redis.call('GET', KEYS[2])
if ended then return ended end
local token, mode = ARGV[5], ARGV[6]
if token ~= '' then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local sep = string.find(prev, '\\n', 1, true)
    local before = string.sub(prev, 1, sep - 1)
    if before == token then return cjson.decode(string.sub(prev, sep + 1)) end
    if mode ~= 'take' and string.match(before, '^(.*):') ~= string.match(token, '^(.*):') then
      return redis.error_reply('STALE another run of this job writes its events now')
    end
  end
end
local ids = {}
for i = 7, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-*',
                             'name', ARGV[2], 'data', ARGV[i])
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[3])
  local ms = tonumber(ARGV[4])
  if ms > 0 then
    redis.call('PEXPIRE', KEYS[1], ms)
    redis.call('SET', KEYS[2], ids[#ids], 'PX', 2 * ms)
  else
    redis.call('SET', KEYS[2], ids[#ids])
  end
elseif token ~= '' then
  redis.call('SET', KEYS[3], token .. '\\n' .. cjson.encode(ids), 'PX', 86400000)
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


def entriesFrom(rows: Any, key: str) -> list[Entry]:
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

    def writerKey(self, jobID: str) -> str:
        """
        The key of C{jobID}'s last write token (see L{_PUBLISH}).
        """
        return f"{self.prefix}events-writer:{jobID}"

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

    def publishMany(
        self, jobID: str, name: str, datas: Sequence[JSON], token: str | None = None, take: bool = False
    ) -> Deferred[list[str]]:
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
        return self._publish(jobID, name, texts, False, token, take)

    def _publish(
        self, jobID: str, name: str, texts: list[str], terminal: bool, token: str | None = None, take: bool = False
    ) -> Deferred[list[str]]:
        keys = [self.key(jobID), self.endKey(jobID), self.writerKey(jobID)]
        args = [
            self._history, name, 1 if terminal else 0, self._milliseconds() if terminal else 0,
            token or "", "take" if take else "own", *texts,
        ]  # fmt: skip
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
            entries = entriesFrom(rows, key)
            if entries:
                return StreamRead(after, tuple(entries), entries[-1].seq)
            last = entriesFrom(await self.connection.execute_command("XREVRANGE", key, "+", "-", "COUNT", 1), key)
            if last and last[0].seq >= after:
                # Up to date (or an entry came between the two reads: the
                # live watch, which starts at after, will bring it).
                return StreamRead(after, (), after)
        rows = await self.connection.execute_command("XRANGE", key, "-", "+")
        entries = entriesFrom(rows, key)
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

"""
L{RedisEventReader}: one blocking C{XREAD} loop per instance over every
job its clients watch, each job at one stream position shared by all its
watchers: the Redis work per event is per instance, not per subscriber.
A new watch wakes the blocked read with C{CLIENT UNBLOCK} (from a second
connection) instead of waiting out the block; after a failure (Redis
restarted) the loop checks each job's position still names the entry it
read, and tells watchers L{Reset} when Redis lost it (no AOF).

The streams and their ids are L{twistedsse._redisevents}'.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._frames import TERMINAL_EVENTS
from ._job import Entry
from ._redisevents import entriesFrom, formatEventID, streamKey

_log = Logger()

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
                found = entriesFrom(rows, job.key)
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
            found = entriesFrom(rows, job.key)
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
                entries = entriesFrom(rows, job.key)
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
            entries = entriesFrom(rows, key)
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

"""
The render queue across processes: a Redis Stream with a consumer group.
Web instances put renders in (L{RedisJobQueue}); workers claim them, keep
their claims alive while they run them, and acknowledge them at the end
(L{RedisWorker}).

Keys (all under one prefix, default C{twistedsse:}):

    - C{{prefix}queue}: the stream, one entry per render (fields C{jobID},
      and C{outputURL} when there is one); consumer group C{workers}.
    - C{{prefix}queued}: a hash, job id -> its entry id, so that any
      instance can withdraw a render by job id.
    - C{{prefix}cancel:{jobID}}: a cancel mark (C{EX}, a day by default):
      C{withdrawn} for a render withdrawn before any worker had it,
      C{running} for one cancelled after.
    - channel C{{prefix}cancel}: job ids to cancel, published to every
      worker. (Pub/sub ignores the database number: deployments sharing a
      server must use different prefixes.)

Every operation that reads and writes is one Lua script (C{EVALSHA}, with
C{EVAL} after a restart emptied the script cache), so it is atomic and one
round trip:

    - B{withdraw vs. claim.} C{XREADGROUP} and the withdraw script are both
      atomic on the server, and the script deletes the entry only if no
      worker has had it (it is not in the group's pending list). So exactly
      one happens: the entry was delivered first (withdraw answers
      C{False}, and the caller cancels it with L{RedisJobQueue.cancelRunning})
      or it was deleted first (no worker ever sees it).
    - B{cancel of a running render} sets the mark and publishes the job id.
      The worker holding it cancels it on the message; if the message is
      missed (the worker's subscription was reconnecting, or it arrived on
      its socket before the claim arrived on the other), the mark is found
      by the next renewal (every C{claimTimeout / 3}), and by a worker that
      reclaims the render from a dead one (which then never starts it).
    - B{claims are renewed} by C{XCLAIM ... JUSTID} on the worker's own
      entries, after checking in the same script that they are still its
      own (a plain C{XCLAIM} would steal back an entry another worker has
      reclaimed from a worker that stalled). C{JUSTID} resets the idle time
      and leaves the delivery count alone.
    - B{a dead worker's renders} go idle; C{XAUTOCLAIM} by another worker
      takes them (the delivery count, incremented by it, is the attempt
      number); past C{maxAttempts} the render is lost (acknowledged, and
      reported, never started again).
    - B{hand back} (warm shutdown): Redis has no "unclaim". The script
      re-claims the worker's entries with C{IDLE} a year (so the next
      C{XAUTOCLAIM} of any worker takes them at once) and C{RETRYCOUNT} one
      less (so the hand-back does not count as an attempt). Unlike a fresh
      C{XADD} plus C{XACK}, the render keeps its place (reclaimed entries
      are taken before new ones) and its entry id, so the C{queued} hash
      stays right.
    - B{acknowledgement} is C{XACK} plus C{XDEL} (and the hash field and
      the mark): the stream holds only renders waiting or running.

Known limits: if a connection drops after the server ran an
C{XREADGROUP} or C{XAUTOCLAIM} and before its reply arrived, the entries
it claimed sit in this worker's pending list unknown to it; nothing
renews them, and after C{claimTimeout} they are reclaimed (by any
worker) as if this worker had died, which counts one attempt. Keys named
inside the scripts (the cancel marks) are not declared, so the scripts
are not Redis Cluster safe.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from ._interfaces import QueuedRender
from ._metrics import RedisStats
from ._redis import RedisEndpoint

_log = Logger()

_T = TypeVar("_T")

#: Seconds a command may take (waiting for a connection included) before
#: it counts as failed: Redis is down or unreachable.
COMMAND_TIMEOUT = 5.0

#: Seconds a cancel mark is kept: longer than any render waits and runs.
CANCEL_TTL = 86400

#: Idle time, in milliseconds, given to a handed-back entry: over any
#: claim timeout, so the next XAUTOCLAIM takes it.
_HANDED_BACK_IDLE = 365 * 86400 * 1000


class _Script:
    """
    A Lua script, run with txredisapi's C{eval}: C{EVALSHA} once the
    connection has sent it, C{EVAL} the first time and again after a
    C{NOSCRIPT} (a restart or C{SCRIPT FLUSH} emptied Redis' cache), as
    L{twistedsse._redisstate} and L{twistedsse._redisevents} run theirs.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, connection: Any, keys: Sequence[str], args: Sequence[object]) -> Deferred[Any]:
        d: Deferred[Any] = connection.eval(self.source, list(keys), list(args))
        return d


_ENQUEUE = _Script(
    """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local id
if ARGV[3] == '1' then
  id = redis.call('XADD', KEYS[1], '*', 'jobID', ARGV[2], 'outputURL', ARGV[4])
else
  id = redis.call('XADD', KEYS[1], '*', 'jobID', ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[2], id)
return id
"""
)

# KEYS: queue, queued hash, cancel mark. ARGV: group, jobID, mark TTL.
_WITHDRAW = _Script(
    """
local id = redis.call('HGET', KEYS[2], ARGV[2])
if not id then
  if redis.call('GET', KEYS[3]) == 'withdrawn' then return 1 end
  return 0
end
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
if type(p) == 'table' and p.err == nil and #p > 0 then return 0 end
local n = redis.call('XDEL', KEYS[1], id)
redis.call('HDEL', KEYS[2], ARGV[2])
if n == 1 then redis.call('SET', KEYS[3], 'withdrawn', 'EX', ARGV[3]) end
return n
"""
)

# KEYS: cancel mark. ARGV: TTL, channel, jobID.
_CANCEL = _Script(
    """
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[1])
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""
)

# KEYS: queue. ARGV: group.
_DEPTH = _Script(
    """
local n = redis.call('XLEN', KEYS[1])
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(p) == 'table' and p.err == nil then n = n - p[1] end
return n
"""
)

# KEYS: queue. ARGV: group, consumer, prefix, then (entry id, job id) pairs.
# Returns {lost job ids, job ids with a cancel mark}.
_RENEW = _Script(
    """
local lost, cancelled, mine = {}, {}, {}
for i = 4, #ARGV, 2 do
  local id, job = ARGV[i], ARGV[i + 1]
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(p) == 'table' and p.err ~= nil then
    -- no group (Redis restarted without its data): nobody else can have it
  elseif #p > 0 and p[1][2] == ARGV[2] then
    table.insert(mine, id)
    if redis.call('EXISTS', ARGV[3] .. 'cancel:' .. job) == 1 then table.insert(cancelled, job) end
  else
    table.insert(lost, job)
  end
end
if #mine > 0 then
  local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(mine) do table.insert(claim, id) end
  table.insert(claim, 'JUSTID')
  redis.call(unpack(claim))
end
return {lost, cancelled}
"""
)

# KEYS: queue, queued hash. ARGV: group, consumer, entry id, job id, prefix.
# Returns 1 if it was this consumer's (and is now acknowledged), else 0.
_FINISH = _Script(
    """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
local held = type(p) == 'table' and p.err == nil and #p > 0
local mine = held and p[1][2] == ARGV[2]
if mine then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
end
-- another worker that reclaimed it cleans up when it finishes
if mine or not held then
  if redis.call('HGET', KEYS[2], ARGV[4]) == ARGV[3] then redis.call('HDEL', KEYS[2], ARGV[4]) end
  redis.call('DEL', ARGV[5] .. 'cancel:' .. ARGV[4])
end
if mine then return 1 end
return 0
"""
)

# KEYS: queue, queued hash. ARGV: group, consumer, min idle ms, cursor,
# count, max attempts, prefix, then the entry ids this consumer holds.
# Returns {next cursor, {{kind, id, attempt, fields}, ...}}, kind one of
# start, lost, cancelled; the lost and cancelled ones are acknowledged here.
# The consumer's own entries are renewed first: after an outage longer than
# the claim timeout they are idle too, and XAUTOCLAIM would hand them to
# their own holder again as new attempts.
_RECLAIM = _Script(
    """
local own = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 8, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then table.insert(own, ARGV[i]) end
end
if #own > 5 then
  table.insert(own, 'JUSTID')
  redis.call(unpack(own))
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  local id, fields = e[1], e[2]
  local job = ''
  if fields then
    for i = 1, #fields, 2 do if fields[i] == 'jobID' then job = fields[i + 1] end end
  end
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local attempt = p[1][4]
  local kind = 'start'
  if redis.call('EXISTS', ARGV[7] .. 'cancel:' .. job) == 1 then
    kind = 'cancelled'
  elseif attempt > tonumber(ARGV[6]) then
    kind = 'lost'
  end
  if kind ~= 'start' then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    if redis.call('HGET', KEYS[2], job) == id then redis.call('HDEL', KEYS[2], job) end
    redis.call('DEL', ARGV[7] .. 'cancel:' .. job)
  end
  table.insert(out, {kind, id, attempt, fields})
end
return {r[1], out}
"""
)

# KEYS: queue, channel. ARGV: group, consumer, idle ms, entry ids. Returns the ids
# handed back (those still this consumer's), and tells the workers (HANDED_BACK).
_HAND_BACK = _Script(
    """
local back = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(p) == 'table' and p.err == nil and #p > 0 and p[1][2] == ARGV[2] then
    local retries = math.max(p[1][4] - 1, 0)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', retries, 'JUSTID')
    table.insert(back, id)
  end
end
if #back > 0 then redis.call('PUBLISH', KEYS[2], '*') end
return back
"""
)


@attrs.frozen
class QueueKeys:
    """
    The key and channel names under one prefix.
    """

    prefix: str = "twistedsse:"

    @property
    def queue(self) -> str:
        return f"{self.prefix}queue"

    @property
    def queued(self) -> str:
        return f"{self.prefix}queued"

    @property
    def channel(self) -> str:
        return f"{self.prefix}cancel"

    def cancel(self, jobID: str) -> str:
        return f"{self.prefix}cancel:{jobID}"


def _timed(d: Deferred[_T], clock: IReactorTime, timeout: float) -> Deferred[_T]:
    """
    C{d}, failed with C{TimeoutError} after C{timeout} seconds. A lazy
    connection holds a command until it is connected, forever while Redis
    is down; cancelled then, the command is never sent.
    """
    return d.addTimeout(timeout, clock)


def _render(fields: object) -> QueuedRender:
    values: dict[str, str] = {}
    if isinstance(fields, list):
        values = dict(zip(fields[::2], fields[1::2]))
    return QueuedRender(jobID=values.get("jobID", ""), outputURL=values.get("outputURL"))


@attrs.define
class RedisJobQueue:
    """
    The web side of the queue: put renders in, withdraw or cancel them.
    Any instance may withdraw or cancel a render any other one queued.

    @ivar timeout: seconds an operation may take before it fails (Redis
        down: the caller answers C{503}).
    """

    _connection: Any
    _clock: IReactorTime
    keys: QueueKeys = attrs.field(factory=QueueKeys)
    group: str = "workers"
    timeout: float = COMMAND_TIMEOUT
    cancelTTL: int = CANCEL_TTL

    def enqueue(self, render: QueuedRender) -> Deferred[str]:
        """
        Add C{render} at the end of the queue (creating the stream and the
        group if need be); fire with its entry id. One C{EVALSHA}.
        """
        hasURL = render.outputURL is not None
        args = [self.group, render.jobID, "1" if hasURL else "0", render.outputURL or ""]
        return _timed(_ENQUEUE(self._connection, [self.keys.queue, self.keys.queued], args), self._clock, self.timeout)

    def withdraw(self, jobID: str) -> Deferred[bool]:
        """
        Delete the render if no worker has had it yet: then no worker ever
        will (C{True}; again C{True} for a render already withdrawn). C{False}
        if a worker has it (or it is unknown): cancel it with
        L{cancelRunning}. One C{EVALSHA}.
        """
        keys = [self.keys.queue, self.keys.queued, self.keys.cancel(jobID)]
        d = _WITHDRAW(self._connection, keys, [self.group, jobID, self.cancelTTL])
        return _timed(d, self._clock, self.timeout).addCallback(lambda n: int(n) == 1)

    def cancelRunning(self, jobID: str) -> Deferred[int]:
        """
        Mark the render cancelled and tell every worker: the one holding it
        stops it (at once on the message; at its next renewal if it missed
        the message); a worker reclaiming it from a dead one never starts
        it. Fires with the number of workers that got the message. One
        C{EVALSHA}.
        """
        d = _CANCEL(self._connection, [self.keys.cancel(jobID)], [self.cancelTTL, self.keys.channel, jobID])
        return _timed(d, self._clock, self.timeout).addCallback(int)

    def depth(self) -> Deferred[int]:
        """
        How many renders wait for a worker: the stream's length less the
        group's pending entries (the ones workers hold), since finished and
        withdrawn entries are deleted. (C{XINFO GROUPS}' C{lag} would say
        the same but is C{nil} once an entry was deleted, as withdraw
        does.) Renders held by a dead worker, or handed back, count as
        held until reclaimed. One C{EVALSHA}.
        """
        d = _DEPTH(self._connection, [self.keys.queue], [self.group])
        return _timed(d, self._clock, self.timeout).addCallback(int)


class IClaimConsumer(Interface):
    """
    What runs the renders a L{RedisWorker} claims (the wiring adapts
    L{twistedsse._runner.RenderRunner}). Called in the reactor thread.
    """

    def start(render: QueuedRender, attempt: int) -> None:
        """
        Run C{render} from the start; C{attempt} is 1, or more when it was
        reclaimed from a worker that died (publish C{retrying} then). Call
        L{RedisWorker.finished} when it ends, however it ends.
        """

    def cancel(jobID: str) -> None:
        """
        A client cancelled a render this worker runs: stop it; it ends
        C{cancelled} (then L{RedisWorker.finished}).
        """

    def cancelledBeforeStart(render: QueuedRender) -> None:
        """
        A render claimed after it was cancelled: it was never started and
        never will be (it is acknowledged already); end the job
        C{cancelled}.
        """

    def lost(render: QueuedRender, attempts: int) -> None:
        """
        A render whose workers died C{attempts} times: it is acknowledged
        and never runs again; end the job C{failed}, reason
        C{worker_lost}.
        """

    def abandon(jobID: str) -> None:
        """
        The render is no longer this worker's: handed back at a warm
        shutdown, or taken over by another worker after this one failed to
        renew its claim for C{claimTimeout}. Stop it and publish nothing;
        do not call L{RedisWorker.finished}.
        """


#: The message on the queue's channel that says renders were handed back
#: (not a job id: those are URL-safe base64).
HANDED_BACK = "*"

#: The share of C{claimTimeout} after which a worker that cannot renew a
#: claim gives the render up (L{RedisWorker._expireLeases}): the rest is
#: the time its process has to stop (TERM, then KILL after the kill grace)
#: before another worker may start it.
LEASE = 2 / 3


@attrs.define
class _Claim:
    entryID: str
    render: QueuedRender
    attempt: int
    started: bool = False
    cancelled: bool = False
    #: When the last renewal that Redis confirmed was sent (or the claim
    #: made): Redis may let another worker take it C{claimTimeout} after.
    renewedAt: float = 0.0


@attrs.define(eq=False)
class RedisWorker:
    """
    The worker side: claims renders while it has free slots, keeps its
    claims alive, takes over the renders of dead workers, acknowledges
    finished renders, and hands back what it could not finish at a warm
    shutdown.

    @param connection: for short commands; may be shared. Not closed here.
    @param blocking: for the blocking C{XREADGROUP} only (a command behind a
        blocked one waits for it). Not closed here.
    @param endpoint: where the cancel subscription connects; that
        connection is the worker's own, closed by L{stop}.
    @ivar claimTimeout: seconds after which a claim not renewed is taken
        over; renewed every third of it.
    @ivar block: the longest C{XREADGROUP BLOCK}, in seconds (short:
        cancelling a read does not end it on the server, so L{stop} waits
        for it).
    """

    _connection: Any
    _blocking: Any
    _endpoint: RedisEndpoint
    _clock: IReactorTime
    _consumer: IClaimConsumer
    name: str
    maxRenders: int
    claimTimeout: float = 60.0
    maxAttempts: int = 2
    keys: QueueKeys = attrs.field(factory=QueueKeys)
    group: str = "workers"
    block: float = 1.0
    timeout: float = COMMAND_TIMEOUT
    maxBackoff: float = 5.0
    #: Claims and reclaims (for /metrics).
    stats: RedisStats = attrs.field(factory=RedisStats)

    _held: dict[str, _Claim] = attrs.field(factory=dict, init=False)
    _unacked: dict[str, str] = attrs.field(factory=dict, init=False)
    _recentCancels: dict[str, float] = attrs.field(factory=dict, init=False)
    _waiters: list[tuple[Deferred[None], Any]] = attrs.field(factory=list, init=False)
    _loop: Deferred[None] | None = attrs.field(default=None, init=False)
    _renewer: LoopingCall | None = attrs.field(default=None, init=False)
    _renewing: Deferred[None] | None = attrs.field(default=None, init=False)
    _listener: Any = attrs.field(default=None, init=False)
    _subscribed: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _isSubscribed: bool = attrs.field(default=False, init=False)
    _cursor: str = attrs.field(default="0-0", init=False)
    _nextReclaim: float = attrs.field(default=0.0, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _stopped: Deferred[None] | None = attrs.field(default=None, init=False)
    _down: bool = attrs.field(default=False, init=False)
    _leaseTimer: IDelayedCall | None = attrs.field(default=None, init=False)

    @property
    def reclaimInterval(self) -> float:
        return self.claimTimeout / 3

    def held(self) -> list[str]:
        """
        The job ids this worker holds (started, or claimed while draining).
        """
        return list(self._held)

    # -- life cycle ------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Subscribe to cancels and start claiming and renewing. Fires once
        the subscription is active, or fails with C{TimeoutError} after
        C{timeout} (it goes on trying; the loop runs either way).
        """
        self._listener = _subscriberConnection(
            self._endpoint, _subscriberProtocol(self.keys.channel, self._cancelMessage, self._nowSubscribed)
        )
        self._renewer = LoopingCall(self._renewTick)
        self._renewer.clock = self._clock
        self._renewer.start(self.claimTimeout / 3, now=False)
        self._loop = Deferred.fromCoroutine(self._run())
        if self._isSubscribed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._subscribed.append(d)
        return _timed(d, self._clock, self.timeout)

    def drain(self, timeout: float) -> Deferred[list[str]]:
        """
        Warm shutdown: claim nothing more, let running renders finish for
        up to C{timeout} seconds, then hand the others back to the queue
        (L{IClaimConsumer.abandon} for each) and L{stop}. Fires with the
        job ids handed back.
        """
        return Deferred.fromCoroutine(self._drain(timeout))

    def stop(self) -> Deferred[None]:
        """
        Stop the loop, the renewals and the subscription; fires when all
        have stopped. Renders still held are neither acknowledged nor
        renewed: another worker takes them over after C{claimTimeout}, as
        from a dead worker (L{drain} first for a warm shutdown). Claims
        never started are handed back.
        """
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop())
        d: Deferred[None] = Deferred()

        def fire(result: object) -> None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

        self._stopped.addBoth(fire)
        return d

    async def _stop(self) -> None:
        self._stopping = True
        self._armLease()
        self._poke()
        if self._loop is not None:
            await self._loop
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        if self._renewing is not None:
            await self._renewing
        unstarted = [c for c in self._held.values() if not c.started]
        if unstarted:
            await self._handBack(unstarted)
        for jobID in list(self._unacked):
            await self._ack(jobID)
        self._poke()
        # Whoever waits for the subscription (start()'s Deferred) waits no
        # more: it never will be active now.
        waiting, self._subscribed = self._subscribed, []
        for d in waiting:
            d.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.disconnect()

    async def _drain(self, timeout: float) -> list[str]:
        self._draining = True
        self._poke()
        if self._loop is not None:
            await self._loop
        deadline = self._clock.seconds() + timeout
        while any(c.started for c in self._held.values()) and not self._stopping:
            left = deadline - self._clock.seconds()
            if left <= 0:
                break
            await self._idle(left)
        claims = list(self._held.values())
        handed = await self._handBack(claims)
        for claim in claims:
            del self._held[claim.render.jobID]
            if claim.started:
                self._call(self._consumer.abandon, claim.render.jobID)
        await self.stop()
        return handed

    # -- what the consumer calls ------------------------------------------

    def finished(self, jobID: str) -> Deferred[bool]:
        """
        A render this worker started has ended (any outcome): acknowledge
        it and free its slot. Fires C{True} once acknowledged, C{False} if
        it is no longer this worker's or Redis failed (the acknowledgement
        is then retried at each renewal, and the claim renewed meanwhile,
        so nobody runs it again). Never fails.
        """
        claim = self._held.pop(jobID, None)
        if claim is None:
            return succeed(False)
        self._unacked[jobID] = claim.entryID
        self._poke()
        return Deferred.fromCoroutine(self._ack(jobID))

    async def _ack(self, jobID: str) -> bool:
        entryID = self._unacked.get(jobID)
        if entryID is None:
            return False
        keys = [self.keys.queue, self.keys.queued]
        args = [self.group, self.name, entryID, jobID, self.keys.prefix]
        try:
            mine = await _timed(_FINISH(self._connection, keys, args), self._clock, self.timeout)
        except Exception as e:
            self._outage(e)
            return False
        self._recovered()
        self._unacked.pop(jobID, None)
        return int(mine) == 1

    # -- the claim loop -----------------------------------------------------

    def _free(self) -> int:
        return self.maxRenders - len(self._held)

    def _done(self) -> bool:
        return self._stopping or self._draining

    async def _run(self) -> None:
        failures = 0
        while not self._done():
            try:
                if self._free() <= 0:
                    await self._idle(None)
                    continue
                if self._clock.seconds() >= self._nextReclaim:
                    self._nextReclaim = self._clock.seconds() + self.reclaimInterval
                    await self._reclaim()
                    continue
                await self._read()
            except Exception as e:
                if "NOGROUP" in str(e):
                    failures = 0
                    await self._createGroup()
                    continue
                failures += 1
                self._outage(e)
                await self._idle(min(self.maxBackoff, 0.05 * 2**failures))
            else:
                failures = 0
                self._recovered()

    async def _createGroup(self) -> None:
        try:
            await _timed(
                self._connection.execute_command("XGROUP", "CREATE", self.keys.queue, self.group, "0", "MKSTREAM"),
                self._clock,
                self.timeout,
            )
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                self._outage(e)
                await self._idle(self.maxBackoff)

    async def _read(self) -> None:
        wait = min(self.block, self._nextReclaim - self._clock.seconds())
        blockMS = max(1, int(wait * 1000))
        command = self._blocking.execute_command(
            "XREADGROUP", "GROUP", self.group, self.name, "COUNT", self._free(),
            "BLOCK", blockMS, "STREAMS", self.keys.queue, ">",
        )  # fmt: skip
        reply = await _timed(command, self._clock, blockMS / 1000 + self.timeout)
        for _stream, entries in reply or []:
            for entryID, fields in entries:
                self.stats.claims += 1
                self._claimed(entryID, _render(fields), 1)

    async def _reclaim(self) -> None:
        keys = [self.keys.queue, self.keys.queued]
        args = [
            self.group, self.name, int(self.claimTimeout * 1000), self._cursor, self._free(),
            self.maxAttempts, self.keys.prefix,
        ]  # fmt: skip
        own = {c.entryID for c in self._held.values()} | set(self._unacked.values())
        args += sorted(own)
        cursor, items = await _timed(_RECLAIM(self._connection, keys, args), self._clock, self.timeout)
        self._cursor = cursor
        for kind, entryID, attempt, fields in items:
            render = _render(fields)
            if entryID in own:
                continue  # renewed above; cannot be taken here
            if kind == "start":
                self.stats.reclaims += 1
                self._claimed(entryID, render, int(attempt))
            elif kind == "lost":
                self._call(self._consumer.lost, render, int(attempt) - 1)
            else:
                self._call(self._consumer.cancelledBeforeStart, render)

    def _claimed(self, entryID: str, render: QueuedRender, attempt: int) -> None:
        claim = _Claim(entryID, render, attempt, renewedAt=self._clock.seconds())
        self._held[render.jobID] = claim
        if self._done():
            return  # handed back by drain or stop
        if self._recentCancels.pop(render.jobID, None) is not None:
            del self._held[render.jobID]
            self._unacked[render.jobID] = entryID
            Deferred.fromCoroutine(self._ack(render.jobID))
            self._call(self._consumer.cancelledBeforeStart, render)
            return
        claim.started = True
        self._armLease()
        self._call(self._consumer.start, render, attempt)

    async def _handBack(self, claims: list[_Claim]) -> list[str]:
        if not claims:
            return []
        args = [self.group, self.name, _HANDED_BACK_IDLE, *(c.entryID for c in claims)]
        try:
            keys = [self.keys.queue, self.keys.channel]
            back = await _timed(_HAND_BACK(self._connection, keys, args), self._clock, self.timeout)
        except Exception as e:
            # Left in this worker's pending list, not renewed: taken over
            # after claimTimeout, as from a dead worker.
            self._outage(e)
            return []
        jobs = {c.entryID: c.render.jobID for c in claims}
        return [jobs[entryID] for entryID in back]

    # -- renewals and cancels ---------------------------------------------

    def _renewTick(self) -> Deferred[None]:
        self._renewing = Deferred.fromCoroutine(self._renew())
        return self._renewing

    async def _renew(self) -> None:
        for jobID in list(self._unacked):
            await self._ack(jobID)
        pairs = [(c.entryID, jobID) for jobID, c in self._held.items()]
        pairs += [(entryID, jobID) for jobID, entryID in self._unacked.items()]
        if not pairs:
            return
        args: list[object] = [self.group, self.name, self.keys.prefix]
        for entryID, jobID in pairs:
            args += [entryID, jobID]
        sentAt = self._clock.seconds()
        try:
            lost, cancelled = await _timed(_RENEW(self._connection, [self.keys.queue], args), self._clock, self.timeout)
        except Exception as e:
            self._outage(e)
            return
        self._recovered()
        for held in self._held.values():
            held.renewedAt = max(held.renewedAt, sentAt)
        self._armLease()
        for jobID in lost:
            self._unacked.pop(jobID, None)
            claim = self._held.pop(jobID, None)
            if claim is not None:
                _log.warn("render {jobID}: claim taken over by another worker; abandoning it", jobID=jobID)
                if claim.started:
                    self._call(self._consumer.abandon, jobID)
        if lost:
            self._poke()
        for jobID in cancelled:
            self._cancelMessage(jobID)

    def _armLease(self) -> None:
        """
        Set the lease timer for the claim renewed longest ago (see
        L{_expireLeases}).
        """
        if self._leaseTimer is not None and self._leaseTimer.active():
            self._leaseTimer.cancel()
        self._leaseTimer = None
        started = [claim.renewedAt for claim in self._held.values() if claim.started]
        if not started or self._stopping:
            return
        due = min(started) + LEASE * self.claimTimeout
        self._leaseTimer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._expireLeases)

    def _expireLeases(self) -> None:
        """
        Renewals have not succeeded (Redis is away, or a renewal waits on a
        reconnecting connection): a render whose claim has not been renewed
        for L{LEASE} of C{claimTimeout} is given up (stopped, nothing
        recorded), before Redis could let another worker take it over, so
        that no render runs twice at once. It stays pending in Redis: once
        Redis is back, a worker takes it over and runs it again from the
        start.
        """
        self._leaseTimer = None
        now = self._clock.seconds()
        for jobID, claim in list(self._held.items()):
            if claim.started and now - claim.renewedAt >= LEASE * self.claimTimeout:
                del self._held[jobID]
                _log.warn(
                    "render {jobID}: claim not renewed for {seconds:.0f} s (Redis away); stopping it, "
                    "for another worker to run once Redis is back",
                    jobID=jobID, seconds=now - claim.renewedAt,
                )  # fmt: skip
                self._call(self._consumer.abandon, jobID)
                # (A free slot: the claim loop may wait for one.)
                self._poke()
        self._armLease()

    def _cancelMessage(self, jobID: str) -> None:
        if jobID == HANDED_BACK:
            # Renders were handed back (a worker's warm shutdown): take them
            # now rather than at the next periodic XAUTOCLAIM, within the
            # current XREADGROUP's BLOCK.
            self._nextReclaim = 0.0
            self._poke()
            return
        claim = self._held.get(jobID)
        if claim is None:
            # Perhaps claimed and not yet read: the claim comes on another
            # socket. Remembered briefly (the renewal is the backstop).
            now = self._clock.seconds()
            self._recentCancels = {j: t for j, t in self._recentCancels.items() if now - t < 60.0}
            if len(self._recentCancels) < 10_000:
                self._recentCancels[jobID] = now
            return
        if claim.started and not claim.cancelled:
            claim.cancelled = True
            self._call(self._consumer.cancel, jobID)

    def _nowSubscribed(self) -> None:
        self._isSubscribed = True
        waiting, self._subscribed = self._subscribed, []
        for d in waiting:
            d.callback(None)

    # -- helpers ---------------------------------------------------------

    def _call(self, f: Callable[..., object], *args: object) -> None:
        try:
            f(*args)
        except Exception:
            _log.failure("queue consumer {f!r} failed", f=f)

    def _idle(self, seconds: float | None) -> Deferred[None]:
        """
        Fires after C{seconds} (never, if C{None}) or at the next
        L{_poke}, whichever is first.
        """
        d: Deferred[None] = Deferred()
        call = None if seconds is None else self._clock.callLater(max(0.0, seconds), self._fire, d)
        self._waiters.append((d, call))
        return d

    def _fire(self, d: Deferred[None]) -> None:
        self._waiters = [(w, c) for w, c in self._waiters if w is not d]
        d.callback(None)

    def _poke(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d, call in waiters:
            if call is not None and call.active():
                call.cancel()
            d.callback(None)

    def _outage(self, e: BaseException) -> None:
        if not self._down:
            self._down = True
            _log.warn("Redis queue unavailable ({e!r}); retrying with backoff", e=e)

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            _log.info("Redis queue available again")


def _subscriberProtocol(channel: str, onMessage: Callable[[str], None], onSubscribed: Callable[[], None]) -> type:
    """
    A txredisapi subscriber protocol that subscribes to C{channel} each
    time it connects (again after a reconnect) and passes each message to
    C{onMessage}.
    """
    import txredisapi

    # Typing note: txredisapi is untyped; the subclass is an Any.
    class CancelSubscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Deferred[Any]:
            d: Deferred[Any] = super().connectionMade()

            def subscribe(_: object) -> Deferred[None]:
                # After a failed AUTH or SELECT this fails (connection lost).
                subscribed: Deferred[Any] = self.subscribe(channel)
                return subscribed.addCallback(lambda _: onSubscribed())

            def lost(f: Failure) -> None:
                _log.debug("cancel subscription: {f!r}", f=f.value)

            return d.addCallback(subscribe).addErrback(lost)

        def messageReceived(self, pattern: object, channel: object, message: object) -> None:
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            onMessage(str(message))

    return CancelSubscriber


def _subscriberConnection(endpoint: RedisEndpoint, protocol: type) -> Any:
    """
    A lazy, reconnecting txredisapi connection to C{endpoint} (its
    database, credentials, TLS and connect timeout, as
    L{RedisEndpoint.connect}) whose protocol is C{protocol}: for pub/sub,
    which a plain connection cannot do. Close it with its C{disconnect()}.
    """
    return endpoint.connect(protocol=protocol)

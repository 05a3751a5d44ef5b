"""
Job state in Redis: what L{twistedsse._broker.MemoryBroker} keeps for each
job (its L{JobSnapshot}) and what the L{twistedsse._jobs.JobTracker} does
to it at expiry, shared by every web instance and worker.

One hash per job, C{PREFIX job:ID}::

    state       "queued" | "running" | ... (the compare-and-set reads it)
    doc         the rest of the snapshot, strict JSON (L{JobSnapshot.toJSON}
                without C{state} and C{progress})
    progress    the latest progress payload, JSON (C{null}: none yet)
    output_url  JSON string or C{null}: the C{complete} event's C{output_url}

Each operation is one Lua script, sent as one C{EVALSHA} (txredisapi sends
C{EVAL} the first time on each connection, and again after a C{NOSCRIPT}:
a restarted Redis has an empty script cache): atomic, and one round trip.

Expiry is Redis' own. The script that ends a job (any terminal state)
also sets C{PEXPIRE job expireAfter} and C{SET PREFIX expired:ID 1 PX
2*expireAfter}, and files the id in the sorted set C{PREFIX ended} (score:
when it expires, Redis' clock) for L{RedisJobState.dueOutputs}, since
Redis' expiry tells nobody whose output file to delete: the job is deleted C{expireAfter} after it ended, and its
id answers L{JobExpired} for as long again, then L{UnknownJob}, as
L{twistedsse._jobs.JobTracker} does in memory. The marker exists from the
end on, so "no job, a marker" means expired, read atomically in one
script. Relative expiry (C{PEXPIRE}, not C{PEXPIREAT} from the snapshot's
C{endedAt}): it does not depend on the instances' clocks agreeing with
Redis'.

When Redis is down, restarting, loading its data set or read-only, every
method fails with L{RedisUnavailable} (503, C{Retry-After}) within
C{timeout} seconds, never hangs: a lazy reconnecting connection otherwise
holds a command until Redis is back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from . import _json
from ._errors import JobExpired, RedisUnavailable, UnknownJob
from ._idempotency import Once

__all__ = ["RedisJobState", "RedisUnavailable", "Transition", "isOutage", "snapshotFromJSON", "unavailable"]
from ._job import JobSnapshot, JobState
from ._json import JSONObject

#: Seconds a state operation may wait for Redis before L{RedisUnavailable}.
TIMEOUT = 3.0

#: Seconds a client is told to wait (C{Retry-After}) while Redis is down.
RETRY_AFTER = 2


#: Redis error replies that mean "not now" rather than "wrong request".
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "MISCONF", "CLUSTERDOWN")


def _isUnavailable(failure: Failure) -> bool:
    import txredisapi

    # txredisapi.ConnectionError: "Not connected", "Lost connection", and
    # its TimeoutError (a reply timeout) is a subclass.
    if failure.check(txredisapi.ConnectionError, defer.TimeoutError, defer.CancelledError) is not None:
        return True
    if failure.check(error.ConnectError, error.ConnectionLost, error.ConnectionDone) is not None:
        return True
    if failure.check(txredisapi.ResponseError) is not None:
        return str(failure.value).startswith(_TRANSIENT)
    return False


def isOutage(error: BaseException) -> bool:
    """
    Whether C{error} means Redis cannot answer now (rather than "no").
    """
    return isinstance(error, RedisUnavailable) or _isUnavailable(Failure(error))


def unavailable(failure: Failure) -> Failure:
    """
    An errback: a failure that means Redis cannot answer now becomes
    L{RedisUnavailable} (a 503 with C{Retry-After}); others pass.
    """
    if failure.check(RedisUnavailable) is None and _isUnavailable(failure):
        if failure.check(defer.TimeoutError, defer.CancelledError) is not None:
            why = "no answer in time"
        else:
            why = failure.getErrorMessage() or type(failure.value).__name__
        raise RedisUnavailable(f"Redis cannot answer now ({why})", retryAfter=RETRY_AFTER) from None
    return failure


# -- snapshots as stored ---------------------------------------------------

_NON_TERMINAL = [state.value for state in JobState if not state.terminal]


def _document(snapshot: JobSnapshot) -> str:
    """
    The snapshot as stored in C{doc}: strict JSON, without the fields
    stored apart (C{state}, C{progress}).
    """
    data = snapshot.toJSON()
    del data["state"], data["progress"]
    return _json.dumps(data)


def _optionalNumber(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"stored job: {name} is not a number: {value!r}")
    return value


def _optionalString(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"stored job: {name} is not a string: {value!r}")
    return value


def _optionalObject(value: object, name: str) -> JSONObject | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"stored job: {name} is not an object: {value!r}")
    return value


def _requiredObject(value: object) -> JSONObject:
    if not isinstance(value, dict):
        raise ValueError(f"stored job: params is not an object: {value!r}")
    return value


def snapshotFromJSON(data: Mapping[str, Any]) -> JobSnapshot:
    """
    The inverse of L{JobSnapshot.toJSON} (which C{_job} lacks): a snapshot
    equal to the one written, JSON types as written (C{1} stays an int,
    C{1.0} a float; a tuple in C{params} comes back a list, as from any
    JSON).

    @raise ValueError: a field is missing or of the wrong type (stored data
        that is not ours).
    """
    try:
        jobID, renderer, state = data["id"], data["renderer"], JobState(data["state"])
        params = data["params"]
        createdAt = _optionalNumber(data, "created_at")
    except (KeyError, TypeError) as e:
        raise ValueError(f"stored job: {e!r}") from None
    if not isinstance(jobID, str) or not isinstance(renderer, str) or createdAt is None:
        raise ValueError(f"stored job: bad id, renderer or created_at in {data!r}")
    return JobSnapshot(
        id=jobID,
        renderer=renderer,
        params=_requiredObject(params),
        state=state,
        createdAt=createdAt,
        startedAt=_optionalNumber(data, "started_at"),
        endedAt=_optionalNumber(data, "ended_at"),
        progress=_optionalObject(data.get("progress"), "progress"),
        result=_optionalObject(data.get("result"), "result"),
        error=_optionalObject(data.get("error"), "error"),
        callbackURL=_optionalString(data, "callback_url"),
    )


def _snapshot(state: str, doc: str, progress: str) -> JobSnapshot:
    data = _json.loads(doc)
    if not isinstance(data, dict):
        raise ValueError(f"stored job: not an object: {doc!r}")
    data["state"] = state
    data["progress"] = _json.loads(progress)
    return snapshotFromJSON(data)


def _held(value: str | bytes) -> tuple[str, str]:
    """
    A slot's C{"JOBID FINGERPRINT"} as a pair.
    """
    text = value.decode("ascii") if isinstance(value, bytes) else value
    jobID, _, fingerprint = text.partition(" ")
    return jobID, fingerprint


# -- the scripts -----------------------------------------------------------

# KEYS[1] the job's hash, KEYS[2] its expired marker, KEYS[3] the ended
# set; ended(ms, id) starts both clocks and files the job's output for
# deletion at the same moment (Redis' clock: TIME). HSET with several
# fields: Redis 4.0; TIME before a write in a script: 5.0 (effects
# replication).
_ENDED = """
local function ended(ms, id)
  if ms > 0 then
    redis.call('PEXPIRE', KEYS[1], ms)
    local idem = redis.call('HGET', KEYS[1], 'idem')
    if idem then redis.call('PEXPIRE', idem, ms) end
    redis.call('SET', KEYS[2], '1', 'PX', 2 * ms)
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000) + ms, id)
  end
end
"""

#: ARGV: state, doc, progress, output_url, terminal (0/1), ms, id.
#: Returns 1: created; 0: the id is taken (a job, or an expired one).
_CREATE = (
    _ENDED
    + """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'doc', ARGV[2], 'progress', ARGV[3], 'output_url', ARGV[4])
if ARGV[5] == '1' then ended(tonumber(ARGV[6]), ARGV[7]) end
return 1
"""
)

# An Idempotency-Key's slot holds "JOBID FINGERPRINT" (see
# twistedsse._idempotency) while the job exists: set with the job, given
# the job's expiry when it ends (ended() above: the job's hash names its
# slot in its "idem" field; a key a script reads out of a value, like the
# queue's scripts, is not Redis Cluster safe). A slot whose job is gone
# (removed when its queueing failed) holds nothing.
# held(slot, prefix): the slot's "JOBID FINGERPRINT", or nil.
_HELD_FUNCTION = """
local function held(slot, prefix)
  local value = redis.call('GET', slot)
  if not value then return nil end
  local id = string.match(value, '^(%S+)')
  if redis.call('EXISTS', prefix .. 'job:' .. id) == 0 then return nil end
  return value
end
"""

#: KEYS[1] the slot; ARGV: the prefix. Returns "JOBID FINGERPRINT" or nil.
_HELD = _HELD_FUNCTION + "return held(KEYS[1], ARGV[1]) or false\n"

#: KEYS as _CREATE, and the slot; ARGV as _CREATE, then the fingerprint
#: and the prefix. Returns 1: created (and the slot set); 0: the id is
#: taken; "JOBID FINGERPRINT": the slot holds another job (nothing done).
_CREATE_ONCE = (
    _ENDED
    + _HELD_FUNCTION
    + """
local earlier = held(KEYS[4], ARGV[9])
if earlier then return earlier end
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'doc', ARGV[2], 'progress', ARGV[3], 'output_url', ARGV[4],
           'idem', KEYS[4])
redis.call('SET', KEYS[4], ARGV[7] .. ' ' .. ARGV[8])
if ARGV[5] == '1' then ended(tonumber(ARGV[6]), ARGV[7]) end
return 1
"""
)

#: KEYS[1] the slot; ARGV: the job id. Empties the slot if it holds that
#: job (whose queueing failed: it is removed).
_RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and string.match(value, '^(%S+)') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

#: Returns {1, state, doc, progress, output_url}, or {0, expired (0/1)}.
_READ = """
local job = redis.call('HMGET', KEYS[1], 'state', 'doc', 'progress', 'output_url')
if not job[1] then return {0, redis.call('EXISTS', KEYS[2])} end
return {1, job[1], job[2], job[3], job[4]}
"""

#: ARGV: new state, doc, terminal (0/1), ms, id, expected states...
#: Returns {1, state, doc, progress}: written; {0, state, doc, progress}:
#: the job was in another state (what it is); {-1, expired (0/1)}: no job.
_TRANSITION = (
    _ENDED
    + """
local job = redis.call('HMGET', KEYS[1], 'state', 'doc', 'progress')
if not job[1] then return {-1, redis.call('EXISTS', KEYS[2])} end
for i = 6, #ARGV do
  if job[1] == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'doc', ARGV[2])
    if ARGV[3] == '1' then ended(tonumber(ARGV[4]), ARGV[5]) end
    return {1, ARGV[1], ARGV[2], job[3]}
  end
end
return {0, job[1], job[2], job[3]}
"""
)

#: ARGV: progress. Returns 1: written; 0: the job has ended (a finished
#: job never changes again); -1: no job (never recreated by an HSET).
_PROGRESS = (
    "local state = redis.call('HGET', KEYS[1], 'state')\n"
    "if not state then return -1 end\n"
    f"if {' and '.join(f'state ~= {_json.dumps(s)}' for s in _NON_TERMINAL)} then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'progress', ARGV[1])\n"
    "return 1\n"
)


#: KEYS[1] the ended set; ARGV: count. The ids whose expiry is due, at
#: most C{count}, taken out of the set: each is returned once, to one caller.
_DUE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
"""


@attrs.frozen
class Transition:
    """
    What L{RedisJobState.transition} did.

    @ivar applied: whether this call wrote its snapshot (C{False}: the job
        was no longer in an expected state: another writer won).
    @ivar snapshot: the job as it is now: ours if applied, else the
        winner's.
    """

    applied: bool
    snapshot: JobSnapshot


@attrs.define
class RedisJobState:
    """
    The jobs' snapshots in Redis, shared by every instance.

    @ivar connection: a txredisapi connection (L{twistedsse._redis.RedisEndpoint.connect});
        not one that holds a blocking read.
    @ivar expireAfter: seconds after a job ends when it is deleted
        (C{0}: never); its id answers L{JobExpired} for as long again.
    @ivar timeout: seconds each operation may take before it fails with
        L{RedisUnavailable}.
    """

    _connection: Any
    _clock: IReactorTime
    prefix: str = "twistedsse:"
    expireAfter: float = 86400.0
    timeout: float = TIMEOUT

    def _keys(self, jobID: str) -> list[str]:
        return [f"{self.prefix}job:{jobID}", f"{self.prefix}expired:{jobID}", f"{self.prefix}ended"]

    def _milliseconds(self) -> int:
        return max(1, round(self.expireAfter * 1000)) if self.expireAfter > 0 else 0

    def _run(self, script: str, keys: Sequence[str], args: Sequence[str | int]) -> defer.Deferred[Any]:
        """
        Run a script (C{EVALSHA}, C{EVAL} when Redis lacks it); fail with
        L{RedisUnavailable} when Redis cannot answer within C{timeout}.
        """
        d: defer.Deferred[Any] = defer.maybeDeferred(self._connection.eval, script, list(keys), list(args))
        d.addTimeout(self.timeout, self._clock)

        return d.addErrback(unavailable)

    def _missing(self, jobID: str, expired: int) -> UnknownJob:
        if expired:
            return JobExpired(f"render {jobID} has expired: it and its output were deleted")
        return UnknownJob(f"no render with id {jobID!r}")

    # -- the API -------------------------------------------------------

    def create(self, snapshot: JobSnapshot, outputURL: str | None = None) -> defer.Deferred[None]:
        """
        Store a new job, with the URL its output will be served from (the
        worker's C{complete} event names it). A job created already ended
        starts expiring at once.

        @raise ValueError: the id is taken, by a job or an expired one.
        @raise RedisUnavailable: Redis cannot answer now.
        """

        def created(result: int) -> None:
            if not result:
                raise ValueError(f"job {snapshot.id!r} exists already")

        return self._run(_CREATE, self._keys(snapshot.id), self._createArgs(snapshot, outputURL)).addCallback(
            created
        )

    def createOnce(
        self, snapshot: JobSnapshot, outputURL: str | None, once: Once
    ) -> defer.Deferred[tuple[str, str] | None]:
        """
        L{create}, for a request with an C{Idempotency-Key}: unless the
        key's slot holds a job already, the job is created and the slot set
        with it, atomically; the slot expires with the job.

        @return: C{None} when created; else the id and body fingerprint of
            the job the slot holds (and nothing is created).
        @raise ValueError: the id is taken, by a job or an expired one.
        @raise RedisUnavailable: Redis cannot answer now.
        """

        def created(result: int | str | bytes) -> tuple[str, str] | None:
            if isinstance(result, (str, bytes)):
                return _held(result)
            if not result:
                raise ValueError(f"job {snapshot.id!r} exists already")
            return None

        keys = [*self._keys(snapshot.id), self._slot(once)]
        args = [*self._createArgs(snapshot, outputURL), once.fingerprint, self.prefix]
        return self._run(_CREATE_ONCE, keys, args).addCallback(created)

    def _createArgs(self, snapshot: JobSnapshot, outputURL: str | None) -> list[str | int]:
        return [
            snapshot.state.value,
            _document(snapshot),
            _json.dumps(None if snapshot.progress is None else dict(snapshot.progress)),
            _json.dumps(outputURL),
            int(snapshot.state.terminal),
            self._milliseconds(),
            snapshot.id,
        ]

    def _slot(self, once: Once) -> str:
        return f"{self.prefix}idem:{once.slot}"

    def heldBy(self, once: Once) -> defer.Deferred[tuple[str, str] | None]:
        """
        The id and body fingerprint of the job an C{Idempotency-Key}'s slot
        holds, or C{None}.
        """

        def read(result: str | bytes | None) -> tuple[str, str] | None:
            return None if result is None else _held(result)

        return self._run(_HELD, [self._slot(once)], [self.prefix]).addCallback(read)

    def release(self, once: Once, jobID: str) -> defer.Deferred[None]:
        """
        Empty C{once}'s slot if it holds C{jobID} (which is being removed).
        """
        return self._run(_RELEASE, [self._slot(once)], [jobID]).addCallback(lambda _: None)

    def _read(self, jobID: str) -> defer.Deferred[tuple[JobSnapshot, str | None]]:
        def read(reply: list[Any]) -> tuple[JobSnapshot, str | None]:
            if not reply[0]:
                raise self._missing(jobID, reply[1])
            url = _json.loads(reply[4])
            return _snapshot(reply[1], reply[2], reply[3]), url

        return self._run(_READ, self._keys(jobID), []).addCallback(read)

    def get(self, jobID: str) -> defer.Deferred[JobSnapshot]:
        """
        The job as it is now.

        @raise UnknownJob: no such job (never, or forgotten).
        @raise JobExpired: it ended and was deleted C{expireAfter} later.
        @raise RedisUnavailable: Redis cannot answer now.
        """
        return self._read(jobID).addCallback(lambda read: read[0])

    def outputURL(self, jobID: str) -> defer.Deferred[str | None]:
        """
        The URL given at L{create}.

        @raise UnknownJob: as L{get}.
        """
        return self._read(jobID).addCallback(lambda read: read[1])

    def transition(
        self, jobID: str, expected: Collection[JobState], snapshot: JobSnapshot
    ) -> defer.Deferred[Transition]:
        """
        Compare and set: write C{snapshot} if the job's state is one of
        C{expected}, atomically. Of two instances ending one job (a cancel
        racing the worker's C{complete}), exactly one is applied; the other
        learns the winner's snapshot. An ended job starts expiring.

        The stored progress is kept, not C{snapshot}'s: L{updateProgress}
        alone writes it, and what is stored is never older than what the
        caller read.

        @param expected: non-terminal states only: a finished job never
            changes again.
        @raise UnknownJob: as L{get}.
        @raise RedisUnavailable: Redis cannot answer now; whether the write
            happened is then unknown (read it again).
        """
        if snapshot.id != jobID:
            raise ValueError(f"snapshot of job {snapshot.id!r} given for job {jobID!r}")
        if not expected or any(state.terminal for state in expected):
            raise ValueError(f"expected states must be non-terminal, not {sorted(s.value for s in expected)}")
        args: list[str | int] = [
            snapshot.state.value,
            _document(snapshot),
            int(snapshot.state.terminal),
            self._milliseconds(),
            jobID,
        ]
        args += sorted(state.value for state in expected)

        def done(reply: list[Any]) -> Transition:
            if reply[0] == -1:
                raise self._missing(jobID, reply[1])
            return Transition(reply[0] == 1, _snapshot(reply[1], reply[2], reply[3]))

        return self._run(_TRANSITION, self._keys(jobID), args).addCallback(done)

    def updateProgress(self, jobID: str, payload: JSONObject | None) -> defer.Deferred[bool]:
        """
        Record a job's latest progress (C{None}: none, as when a render
        starts over). One C{EVALSHA} per progress batch.

        @return: C{False} if the job had ended: its progress stays.
        @raise UnknownJob: no such job (an expired one included: a running
            job cannot have expired).
        @raise RedisUnavailable: Redis cannot answer now.
        """
        progress = _json.dumps(None if payload is None else dict(payload))

        def done(reply: int) -> bool:
            if reply == -1:
                raise UnknownJob(f"no render with id {jobID!r}")
            return reply == 1

        return self._run(_PROGRESS, self._keys(jobID)[:1], [progress]).addCallback(done)

    def dueOutputs(self, count: int = 100) -> defer.Deferred[list[str]]:
        """
        The ids of jobs whose expiry is due (Redis deleted or is deleting
        their state), at most C{count}, each handed to one caller only:
        the instance that gets an id deletes its output file (Redis' expiry
        tells nobody). Call it periodically until it returns fewer than
        C{count}.

        @raise RedisUnavailable: Redis cannot answer now.
        """
        return self._run(_DUE, [f"{self.prefix}ended"], [count]).addCallback(list)

"""
L{twistedsse._redisstate.RedisJobState} against a real redis-server
(tests/_support/redis.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support.redis import RedisServer
from twistedsse._errors import JobExpired, RetryLater, UnknownJob
from twistedsse._job import JobSnapshot, JobState
from twistedsse._redis import RedisEndpoint, ready
from twistedsse._redisstate import RedisJobState, RedisUnavailable, Transition, snapshotFromJSON

#: JSON values whose types a careless round trip would change.
PARAMS = {
    "duration": 3,
    "fps": 25.0,
    "frame": "0019",
    "pct": "12.5",
    "ratio": 0.1,
    "big": 2**60,
    "tiny": 5e-324,
    "flag": True,
    "none": None,
    "list": [1, 1.0, "x", None, {"k": []}],
    "text": "é ✓ \u2028",
}

RUNNING = frozenset({JobState.RUNNING})
LIVE = frozenset({JobState.QUEUED, JobState.RUNNING})


def queued(jobID: str = "job1", **changes: Any) -> JobSnapshot:
    snapshot = JobSnapshot(
        id=jobID, renderer="testsrc", params=PARAMS, state=JobState.QUEUED, createdAt=1795480327.1234567
    )
    return attrs.evolve(snapshot, **changes)


def wait(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@inlineCallbacks
def eventually(attempt: Callable[[], Deferred[Any]], within: float = 10.0) -> Any:
    """
    The first outcome of C{attempt} that is not L{RedisUnavailable},
    trying every 50 ms for C{within} seconds; then that failure.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            return (yield attempt())
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
        yield wait(0.05)


@inlineCallbacks
def until(attempt: Callable[[], Deferred[Any]], error: type[Exception], within: float) -> Any:
    """
    Try C{attempt} every 20 ms until it fails with exactly C{error} (not a
    subclass); then C{error}, or after C{within} seconds what it did last.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            outcome: Any = yield attempt()
        except Exception as e:
            outcome = e
        if type(outcome) is error or time.monotonic() > deadline:
            return type(outcome) if isinstance(outcome, Exception) else outcome
        yield wait(0.02)


class StateTestsMixin:
    server: RedisServer

    def connect(self) -> Any:
        connection = RedisEndpoint.fromURL(self.server.url).connect()
        self.addCleanup(connection.disconnect)  # type: ignore[attr-defined]
        return connection

    @inlineCallbacks
    def makeState(self, **kwargs: Any) -> Any:
        connection = self.connect()
        yield ready(connection, reactor)
        return RedisJobState(connection, reactor, **kwargs)

    @inlineCallbacks
    def raw(self, *command: Any) -> Any:
        """
        One command on a connection of its own.
        """
        connection = self.connect()
        yield ready(connection, reactor)
        return (yield connection.execute_command(*command))


class StateTests(StateTestsMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)

    @inlineCallbacks
    def test_roundTrip(self) -> Any:
        """
        A created job reads back equal, every JSON type as written: C{3}
        stays an int, C{25.0} a float, C{"0019"} a string.
        """
        state = yield self.makeState()
        snapshot = queued()
        yield state.create(snapshot, "/renders/job1/output")
        got = yield state.get("job1")
        self.assertEqual(got, snapshot)
        for name, value in PARAMS.items():
            self.assertIs(type(got.params[name]), type(value), name)
        self.assertIs(type(got.params["list"][1]), float)
        self.assertEqual((yield state.outputURL("job1")), "/renders/job1/output")

    @inlineCallbacks
    def test_roundTripEveryField(self) -> Any:
        """
        Times, progress, result and error come back too; no output URL
        reads back C{None}.
        """
        state = yield self.makeState()
        snapshot = queued(
            state=JobState.FAILED,
            startedAt=1.5,
            endedAt=2,
            progress={"pct": 12.5},
            result=None,
            error={"reason": "exit", "code": 1},
        )
        yield state.create(snapshot)
        self.assertEqual((yield state.get("job1")), snapshot)
        self.assertIsNone((yield state.outputURL("job1")))

    def test_fromJSON(self) -> None:
        """
        L{snapshotFromJSON} inverts L{JobSnapshot.toJSON}, and refuses what
        is not a snapshot.
        """
        snapshot = queued(progress={"pct": 1}, startedAt=3.0)
        self.assertEqual(snapshotFromJSON(snapshot.toJSON()), snapshot)
        for broken in [
            {},
            dict(snapshot.toJSON(), state="paused"),
            dict(snapshot.toJSON(), params=None),
            dict(snapshot.toJSON(), created_at="1"),
            dict(snapshot.toJSON(), started_at=True),
            dict(snapshot.toJSON(), progress=[1]),
        ]:
            self.assertRaises(ValueError, snapshotFromJSON, broken)

    @inlineCallbacks
    def test_duplicate(self) -> Any:
        """
        An id that exists is refused, and the job stays as it was.
        """
        state = yield self.makeState()
        yield state.create(queued(), "/a")
        yield self.assertFailure(state.create(queued(renderer="other"), "/b"), ValueError)
        self.assertEqual((yield state.get("job1")), queued())
        self.assertEqual((yield state.outputURL("job1")), "/a")

    @inlineCallbacks
    def test_unknown(self) -> Any:
        """
        No such job: L{UnknownJob}, not L{JobExpired}, from every method.
        """
        state = yield self.makeState()
        for d in [
            state.get("nope"),
            state.outputURL("nope"),
            state.transition("nope", RUNNING, queued("nope", state=JobState.CANCELLED)),
            state.updateProgress("nope", {"pct": 1}),
        ]:
            failure = yield self.assertFailure(d, UnknownJob)
            self.assertNotIsInstance(failure, JobExpired)
        # Progress never creates the job it names.
        self.assertEqual((yield self.raw("EXISTS", "twistedsse:job:nope")), 0)

    @inlineCallbacks
    def test_transition(self) -> Any:
        """
        A transition from an expected state is applied; from another one it
        is not, and says what the job is. The stored progress is kept.
        """
        state = yield self.makeState()
        yield state.create(queued())
        yield state.updateProgress("job1", {"pct": 5})
        running = queued().transition(JobState.RUNNING, 10.0)
        result = yield state.transition("job1", {JobState.QUEUED}, running)
        self.assertEqual(result, Transition(True, attrs.evolve(running, progress={"pct": 5})))
        again = yield state.transition("job1", {JobState.QUEUED}, running)
        self.assertEqual(again, Transition(False, result.snapshot))
        self.assertRaises(ValueError, state.transition, "job1", {JobState.SUCCEEDED}, running)
        self.assertRaises(ValueError, state.transition, "job1", set(), running)
        self.assertRaises(ValueError, state.transition, "job2", RUNNING, running)

    @inlineCallbacks
    def test_progress(self) -> Any:
        """
        Progress is written while the job runs, then never again.
        """
        state = yield self.makeState()
        yield state.create(queued())
        self.assertTrue((yield state.updateProgress("job1", {"pct": 1.0, "frame": "0019"})))
        self.assertEqual((yield state.get("job1")).progress, {"pct": 1.0, "frame": "0019"})
        ended = queued().transition(JobState.CANCELLED, 2.0)
        self.assertTrue((yield state.transition("job1", LIVE, ended)).applied)
        self.assertFalse((yield state.updateProgress("job1", {"pct": 2})))
        final = yield state.get("job1")
        self.assertEqual(final, attrs.evolve(ended, progress={"pct": 1.0, "frame": "0019"}))
        self.assertTrue((yield state.updateProgress("job1", None)) is False)

    @inlineCallbacks
    def test_expiry(self) -> Any:
        """
        An ended job is deleted C{expireAfter} after it ended (Redis'
        expiry: PEXPIRE), its id answers L{JobExpired} for as long again,
        then L{UnknownJob}; an expired id cannot be created again.
        """
        state = yield self.makeState(expireAfter=0.4)
        yield state.create(queued())
        self.assertEqual((yield self.raw("PTTL", "twistedsse:job:job1")), -1)
        running = queued().transition(JobState.RUNNING, 1.0)
        yield state.transition("job1", {JobState.QUEUED}, running)
        self.assertEqual((yield self.raw("PTTL", "twistedsse:job:job1")), -1)
        endedAt = time.monotonic()
        done = running.transition(JobState.SUCCEEDED, 2.0, result={"output_url": "/o"})
        yield state.transition("job1", RUNNING, done)
        self.assertEqual((yield state.get("job1")), done)
        jobTTL = yield self.raw("PTTL", "twistedsse:job:job1")
        markerTTL = yield self.raw("PTTL", "twistedsse:expired:job1")
        self.assertTrue(300 < jobTTL <= 400, jobTTL)
        self.assertTrue(700 < markerTTL <= 800, markerTTL)
        self.assertEqual((yield state.dueOutputs()), [])

        self.assertEqual((yield until(lambda: state.get("job1"), JobExpired, 2.0)), JobExpired)
        self.assertGreaterEqual(time.monotonic() - endedAt, 0.39)
        # Its output is due for deletion, once: to one caller.
        self.assertEqual((yield state.dueOutputs()), ["job1"])
        self.assertEqual((yield state.dueOutputs()), [])
        yield self.assertFailure(state.outputURL("job1"), JobExpired)
        yield self.assertFailure(state.create(queued()), ValueError)
        self.assertEqual((yield until(lambda: state.get("job1"), UnknownJob, 2.0)), UnknownJob)
        self.assertGreaterEqual(time.monotonic() - endedAt, 0.79)
        self.assertEqual((yield self.raw("KEYS", "twistedsse:*")), [])  # the ended set is empty

    @inlineCallbacks
    def test_createdEnded(self) -> Any:
        """
        A job created already ended (the server was stopping) expires too.
        """
        state = yield self.makeState(expireAfter=10)
        yield state.create(queued(state=JobState.FAILED, endedAt=1.0, error={"reason": "interrupted"}))
        self.assertTrue(9000 < (yield self.raw("PTTL", "twistedsse:job:job1")) <= 10000)
        self.assertTrue(19000 < (yield self.raw("PTTL", "twistedsse:expired:job1")) <= 20000)

    @inlineCallbacks
    def test_dueOutputs(self) -> Any:
        """
        Ended jobs come out of L{RedisJobState.dueOutputs} when their
        expiry is due, oldest first, at most C{count} at a time, each
        once, whichever instance asks.
        """
        one = yield self.makeState(expireAfter=0.2)
        other = yield self.makeState(expireAfter=0.2)
        for i in range(5):
            yield one.create(queued(f"j{i}", state=JobState.CANCELLED, endedAt=1.0))
        yield one.create(queued("late"))
        self.assertEqual((yield other.dueOutputs()), [])
        yield wait(0.25)
        yield one.transition("late", LIVE, queued("late").transition(JobState.CANCELLED, 2.0))
        self.assertEqual((yield other.dueOutputs(3)), ["j0", "j1", "j2"])
        self.assertEqual((yield one.dueOutputs(3)), ["j3", "j4"])
        self.assertEqual((yield other.dueOutputs(3)), [])
        deadline = time.monotonic() + 2.0
        while not (due := (yield one.dueOutputs())) and time.monotonic() < deadline:
            yield wait(0.02)
        self.assertEqual(due, ["late"])

    @inlineCallbacks
    def test_neverExpire(self) -> Any:
        """
        C{expireAfter=0}: an ended job stays, without a marker.
        """
        state = yield self.makeState(expireAfter=0)
        yield state.create(queued())
        yield state.transition("job1", LIVE, queued().transition(JobState.CANCELLED, 1.0))
        self.assertEqual((yield self.raw("PTTL", "twistedsse:job:job1")), -1)
        self.assertEqual((yield self.raw("EXISTS", "twistedsse:expired:job1")), 0)
        self.assertEqual((yield state.dueOutputs()), [])
        self.assertEqual((yield self.raw("EXISTS", "twistedsse:ended")), 0)

    @inlineCallbacks
    def test_prefix(self) -> Any:
        """
        Every key is under the prefix.
        """
        state = yield self.makeState(prefix="other:", expireAfter=60)
        yield state.create(queued())
        yield state.transition("job1", LIVE, queued().transition(JobState.CANCELLED, 1.0))
        keys = yield self.raw("KEYS", "*")
        self.assertEqual(sorted(keys), ["other:ended", "other:expired:job1", "other:job:job1"])

    @inlineCallbacks
    def test_race(self) -> Any:
        """
        A cancel through one instance racing the worker's C{complete}
        through another, both sent before either answer: exactly one is
        applied, every time, and the loser gets the winner's snapshot.
        """
        web = yield self.makeState()
        worker = yield self.makeState()
        wins = {"cancel": 0, "complete": 0}
        for i in range(300):
            jobID = f"race{i}"
            running = queued(jobID).transition(JobState.RUNNING, 1.0)
            yield web.create(running)
            cancelled = running.transition(JobState.CANCELLED, 2.0)
            succeeded = running.transition(JobState.SUCCEEDED, 2.0, result={"output_url": "/o"})
            # Both written in the same reactor turn, on two sockets, so
            # that Redis reads them in the same event loop turn. Redis
            # then serves its clients in a fixed order (by socket), not
            # by who wrote first: the two roles swap connections too.
            one, other = (web, worker) if i % 2 else (worker, web)
            sends = [
                partial(one.transition, jobID, LIVE, cancelled),
                partial(other.transition, jobID, RUNNING, succeeded),
            ]
            if i % 4 >= 2:
                sends.reverse()
            results = yield gatherResults([send() for send in sends])
            applied = [r for r in results if r.applied]
            self.assertEqual(len(applied), 1, results)
            winner = applied[0].snapshot
            self.assertIn(winner, (cancelled, succeeded))
            self.assertEqual([r.snapshot for r in results], [winner, winner])
            self.assertEqual((yield worker.get(jobID)), winner)
            wins["cancel" if winner == cancelled else "complete"] += 1
        # Both sides won sometimes: the race was run both ways.
        self.assertTrue(all(wins.values()), wins)


class UnavailableTests(StateTestsMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)

    def operations(self, state: RedisJobState) -> list[Callable[[], Deferred[Any]]]:
        return [
            lambda: state.create(queued("job2")),
            lambda: state.get("job1"),
            lambda: state.outputURL("job1"),
            lambda: state.transition("job1", LIVE, queued().transition(JobState.RUNNING, 1.0)),
            lambda: state.updateProgress("job1", {"pct": 1}),
        ]

    @inlineCallbacks
    def test_stopped(self) -> Any:
        """
        Redis stopped: every method fails with L{RedisUnavailable} (a
        L{RetryLater}: 503, C{Retry-After}) within its timeout, never
        hangs; once Redis is back (its script cache empty), the same
        object works again.
        """
        state = yield self.makeState(timeout=0.5)
        yield state.create(queued())
        self.server.stop(remove=False)
        for operation in self.operations(state):
            started = time.monotonic()
            failure = yield self.assertFailure(operation(), RedisUnavailable)
            self.assertLess(time.monotonic() - started, 1.5)
            self.assertIsInstance(failure, RetryLater)
            self.assertEqual((failure.status, failure.code), (503, "redis_unavailable"))
            self.assertGreater(failure.retryAfter, 0)
        self.server.start()
        restarted = time.monotonic()
        # No AOF: the data is gone, the service is not. (txredisapi's
        # reconnect backoff reaches 10 s, with jitter.)
        yield self.assertFailure(eventually(lambda: state.get("job1"), 30.0), UnknownJob)
        self.assertLess(time.monotonic() - restarted, 20.0)
        yield state.create(queued())
        self.assertEqual((yield state.get("job1")), queued())

    @inlineCallbacks
    def test_replyTimeout(self) -> Any:
        """
        Redis connected but not answering (C{CLIENT PAUSE}): the caller
        gets L{RedisUnavailable} after the timeout; the late replies are
        dropped, not handed to the next commands.
        """
        state = yield self.makeState(timeout=0.3)
        yield state.create(queued())
        yield state.create(queued("job2", renderer="two"))
        yield self.raw("CLIENT", "PAUSE", "1000", "ALL")
        started = time.monotonic()
        yield self.assertFailure(state.get("job2"), RedisUnavailable)
        self.assertLess(time.monotonic() - started, 0.9)
        self.assertEqual((yield eventually(lambda: state.get("job1"), 5.0)), queued())
        self.assertEqual((yield state.get("job2")), queued("job2", renderer="two"))

    @inlineCallbacks
    def test_lostConnection(self) -> Any:
        """
        Redis killed with a command in flight: L{RedisUnavailable} at once
        (the lost connection), not after the timeout.
        """
        state = yield self.makeState(timeout=10.0)
        yield state.create(queued())
        yield self.raw("CLIENT", "PAUSE", "5000", "ALL")
        d = state.get("job1")
        yield wait(0.1)
        started = time.monotonic()
        self.server.kill()
        yield self.assertFailure(d, RedisUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)
        self.server.start()


class PersistenceTests(StateTestsMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = RedisServer(appendOnly=True)
        self.addCleanup(self.server.stop)

    @inlineCallbacks
    def test_restart(self) -> Any:
        """
        With AOF, a job's state (and its expiry clock) survives a Redis
        restart; the state object reconnects by itself.
        """
        state = yield self.makeState(expireAfter=3600)
        yield state.create(queued(), "/out")
        yield state.create(queued("job2"))
        running = queued().transition(JobState.RUNNING, 1.0)
        yield state.transition("job1", {JobState.QUEUED}, running)
        yield state.updateProgress("job1", {"pct": 50.0})
        ended = queued("job2").transition(JobState.CANCELLED, 2.0)
        yield state.transition("job2", LIVE, ended)
        self.server.stop(remove=False)
        self.server.start()
        got = yield eventually(lambda: state.get("job1"))
        self.assertEqual(got, attrs.evolve(running, progress={"pct": 50.0}))
        self.assertEqual((yield state.outputURL("job1")), "/out")
        self.assertEqual((yield state.get("job2")), ended)
        self.assertTrue(3500_000 < (yield self.raw("PTTL", "twistedsse:job:job2")) <= 3600_000)
        self.assertTrue((yield state.updateProgress("job1", {"pct": 60.0})))

"""
Bounded storage: finished jobs expire (memory, disk, store, at start too)
and then answer 410; the expiry runs on one timer; outputs are kept within
C{--max-output-bytes}; renders are refused while the disk is nearly full;
a store that cannot be written fails jobs instead of leaving them running.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._broker import MemoryBroker
from twistedsse._build import buildSite
from twistedsse._errors import InsufficientStorage, JobExpired, OutputExpired, UnknownJob
from twistedsse._expiry import Deadlines
from twistedsse._job import JobState
from twistedsse._service import RenderService
from twistedsse._store import SQLiteJobStore
from twistedsse.testing import FakeSpawner

from tests._support.web import Connection, splitResponse
from tests._support.fixtures import Recorder, ticksService

DAY = 86400.0


def submitTicks(service: RenderService) -> str:
    """
    Submit a C{ticks} render whose output URL is C{/renders/ID/output}.
    """
    jobID = service.newJobID()
    return service.submit("ticks", {}, f"/renders/{jobID}/output", jobID=jobID).id


@attrs.frozen
class FakeStatvfs:
    """
    C{os.statvfs} for a filesystem with C{free} bytes available.
    """

    free: int
    calls: list[str] = attrs.Factory(list)

    def __call__(self, path: str) -> Any:
        self.calls.append(path)
        return os.statvfs_result((4096, 4096, 10**6, 0, self.free // 4096, 0, 0, 0, 0, 255))


class DeadlinesTests(SynchronousTestCase):
    def test_oneTimerForManyKeys(self) -> None:
        """
        A thousand deadlines are served by one C{DelayedCall}, each key
        handed over when its time comes, in time order.
        """
        clock = Clock()
        due: list[object] = []
        deadlines = Deadlines(clock, due.append)
        deadlines.start()
        for i in range(1000):
            deadlines.add(1000 - i, i)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(10)
        self.assertEqual(due, [999, 998, 997, 996, 995, 994, 993, 992, 991, 990])
        clock.advance(990)
        self.assertEqual(len(due), 1000)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stopLeavesNoTimer(self) -> None:
        """
        Stopping cancels the timer and keeps the deadlines; added while
        stopped, they wait for the next start; one already past is handed
        over at once then.
        """
        clock = Clock()
        due: list[object] = []
        deadlines = Deadlines(clock, due.append)
        deadlines.start()
        deadlines.add(5, "a")
        deadlines.stop()
        deadlines.add(1, "b")
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(due, [])
        deadlines.start()
        clock.advance(0)
        self.assertEqual(due, ["b", "a"])
        self.assertEqual(clock.getDelayedCalls(), [])


class ExpiryTests(SynchronousTestCase):
    """
    A service with the C{ticks} command renderer run by the fake spawner,
    a real SQLite store, and the HTTP app over it.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.out = self.dir / "outputs"
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spawner = FakeSpawner()
        self.service = self.makeService()

    def makeService(self, **options: Any) -> RenderService:
        options.setdefault("expireAfter", DAY)
        service = ticksService(
            self.clock,
            self.spawner,
            self.out,
            maxRenders=1,
            store=SQLiteJobStore(self.dir / "jobs.sqlite3"),
            **options,
        )
        self.addCleanup(lambda: service.running and self.successResultOf(service.stopService()))
        return service

    def render(self, service: RenderService | None = None, output: bytes = b"video") -> str:
        """
        Submit a render and make it succeed with C{output}.
        """
        service = service or self.service
        jobID = submitTicks(service)
        process = self.spawner.processes[-1]
        process.stdout(b'{"p": 0.5}\n{"p": 1.0}\n')
        Path(process.env["TWISTEDSSE_OUTPUT"]).write_bytes(output)
        process.exit(0)
        return jobID

    def call(self, service: RenderService, method: str, path: str) -> tuple[int, dict[str, Any]]:
        conn = Connection(buildSite(service, self.clock))
        conn.request(method, path, {"Content-Type": "application/json"} if method == "POST" else {},
                     b'{"renderer": "ticks"}' if method == "POST" else b"")
        status, headers, body = splitResponse(conn.take())
        conn.disconnect()
        self.assertEqual(headers[b"content-type"], b"application/json")
        return status, json.loads(body)

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.dir / "jobs.sqlite3")
        try:
            return list(db.execute(f"select * from {table}"))  # noqa: S608 (a test's fixed name)
        finally:
            db.close()

    def test_finishedJobIsDeletedAfterExpireAfter(self) -> None:
        """
        A finished job and its output are kept C{expireAfter} seconds after
        it ended, then deleted: from memory, from disk and from the store.
        """
        jobID = self.render()
        output = self.service.outputPath(jobID)
        self.clock.advance(DAY - 1)
        self.assertEqual(self.service.broker.get(jobID).state, JobState.SUCCEEDED)
        self.assertTrue(output.is_file())
        self.clock.advance(1)
        self.assertRaises(JobExpired, self.service.broker.get, jobID)
        self.assertFalse(output.exists())
        self.assertEqual(list(self.out.iterdir()), [])
        self.assertEqual(self.rows("jobs"), [])
        self.assertEqual(self.rows("events"), [])
        self.assertEqual([r[0] for r in self.rows("expired")], [jobID])

    def test_expiredAnswers410UnknownAnswers404(self) -> None:
        """
        After expiry the status, events, output and cancel routes answer
        C{410 job_expired} (JSON); an id never seen is still C{404
        unknown_job}.
        """
        jobID = self.render()
        self.clock.advance(DAY)
        for method, path in [
            ("GET", f"/renders/{jobID}"),
            ("GET", f"/renders/{jobID}/events"),
            ("GET", f"/renders/{jobID}/output"),
            ("DELETE", f"/renders/{jobID}"),
        ]:
            status, body = self.call(self.service, method, path)
            self.assertEqual((status, body["error"]), (410, "job_expired"), (method, path))
        status, body = self.call(self.service, "GET", "/renders/neverseen")
        self.assertEqual((status, body["error"]), (404, "unknown_job"))

    def test_expiredIDsAreForgottenAfterAnotherPeriod(self) -> None:
        """
        An expired id is remembered (410) for another C{expireAfter}, then
        forgotten (404), in memory and in the store: nothing is kept
        forever.
        """
        jobID = self.render()
        self.clock.advance(2 * DAY - 1)
        self.assertRaises(JobExpired, self.service.broker.get, jobID)
        self.clock.advance(1)
        error = self.assertRaises(UnknownJob, self.service.broker.get, jobID)
        self.assertNotIsInstance(error, JobExpired)
        self.assertEqual(self.service.broker.expiredCount(), 0)
        self.assertEqual(self.rows("expired"), [])

    def test_everyKindOfEndExpires(self) -> None:
        """
        Failed and cancelled jobs expire too, queued ones included.
        """
        running = self.service.submit("ticks", {}).id
        queued = self.service.submit("ticks", {}).id
        self.service.cancel(queued)
        self.spawner.processes[-1].exit(1)
        self.clock.advance(DAY)
        for jobID in (running, queued):
            self.assertRaises(JobExpired, self.service.broker.get, jobID)
        self.assertEqual(self.rows("jobs"), [])

    def test_oneTimerAndNoneAfterStop(self) -> None:
        """
        However many jobs wait to expire, the service holds one timer, and
        none once it has stopped.
        """
        for _ in range(20):
            self.render()
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zeroMeansNever(self) -> None:
        """
        C{expireAfter=0} keeps finished jobs for good, with no timer.
        """
        self.successResultOf(self.service.stopService())
        service = self.makeService(expireAfter=0)
        jobID = self.render(service)
        self.clock.advance(100 * DAY)
        self.assertEqual(service.broker.get(jobID).state, JobState.SUCCEEDED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restartDeletesWhatExpiredWhileDown(self) -> None:
        """
        A restart after a job's expiry time deletes it and its output, and
        does not load it: it answers 410, then 404 once the id is
        forgotten.
        """
        jobID = self.render()
        output = self.service.outputPath(jobID)
        self.successResultOf(self.service.stopService())
        self.clock.advance(DAY + 5)
        second = self.makeService()
        self.assertFalse(output.exists())
        self.assertEqual(second.broker.jobs(), [])
        self.assertEqual(self.rows("jobs"), [])
        self.assertEqual(self.call(second, "GET", f"/renders/{jobID}"), (410, self.call(second, "GET", f"/renders/{jobID}")[1]))
        self.assertEqual(self.call(second, "GET", f"/renders/{jobID}")[1]["error"], "job_expired")
        self.clock.advance(DAY)
        self.assertEqual(self.call(second, "GET", f"/renders/{jobID}")[0], 404)
        self.assertEqual(self.rows("expired"), [])

    def test_restartKeepsTheExpiryTimes(self) -> None:
        """
        A job not yet expired at a restart expires when it would have, and
        an id already expired is still 410 after the restart, until its
        own time to be forgotten.
        """
        old = self.render()
        self.clock.advance(DAY / 2)
        young = self.render()
        self.clock.advance(DAY / 2)
        self.assertRaises(JobExpired, self.service.broker.get, old)
        self.successResultOf(self.service.stopService())
        second = self.makeService()
        self.assertRaises(JobExpired, second.broker.get, old)
        self.assertEqual(second.broker.get(young).state, JobState.SUCCEEDED)
        self.clock.advance(DAY / 2)
        self.assertRaises(JobExpired, second.broker.get, young)
        self.clock.advance(DAY / 2)
        self.assertNotIsInstance(self.assertRaises(UnknownJob, second.broker.get, old), JobExpired)
        self.assertRaises(JobExpired, second.broker.get, young)

    def test_twoStartsWithinTheWindowStillGone(self) -> None:
        """
        A job that expired while the service was down is not loaded at any
        later start either.
        """
        jobID = self.render()
        self.successResultOf(self.service.stopService())
        self.clock.advance(DAY + 1)
        self.successResultOf(self.makeService().stopService())
        third = self.makeService()
        self.assertRaises(JobExpired, third.broker.get, jobID)


class CompactionTests(SynchronousTestCase):
    def test_finishedJobKeepsLatestProgressAndTerminal(self) -> None:
        """
        Once a job has ended the broker keeps two of its events, not its
        whole history; a resume from an older id gets C{reset} first.
        """
        broker = MemoryBroker(history=1000)
        from tests._support.fixtures import snapshot

        broker.create(snapshot("j"))
        for i in range(500):
            broker.publish("j", "progress", {"i": i})
        broker.publish("j", "complete", {})
        recorder = Recorder()
        broker.subscribe("j", None, recorder)
        self.assertEqual([(e.event, e.id) for e, _ in recorder.got], [("progress", "500"), ("complete", "501")])
        recorder = Recorder()
        broker.subscribe("j", "10", recorder)
        self.assertEqual([(e.event, e.id) for e, _ in recorder.got], [("reset", "499"), ("progress", "500"), ("complete", "501")])
        self.assertEqual(json.loads(recorder.got[0][0].data)["missed"], 489)
        recorder = Recorder()
        broker.subscribe("j", "500", recorder)
        self.assertEqual([(e.event, e.id) for e, _ in recorder.got], [("complete", "501")])

    def test_restoredJobResumesFromBetweenItsEvents(self) -> None:
        """
        A restored job (latest progress 5, terminal 9) resumed from id 7
        gets a C{reset} and the terminal event: not nothing.
        """
        from tests._support.fixtures import snapshot

        broker = MemoryBroker()
        final = snapshot("r").transition(JobState.CANCELLED, 1.0)
        broker.restore(final, [(5, "progress", "{}"), (9, "cancelled", "{}")])
        recorder = Recorder()
        broker.subscribe("r", "7", recorder)
        self.assertEqual([(e.event, e.id) for e, _ in recorder.got], [("reset", "8"), ("cancelled", "9")])


class BrokerExpiryTests(SynchronousTestCase):
    def test_expireThenForget(self) -> None:
        """
        An expired job is gone from the broker and every per-job method
        raises L{JobExpired} (410) until the id is forgotten, then
        L{UnknownJob} (404); an expired id cannot be created again.
        """
        from tests._support.fixtures import snapshot

        broker = MemoryBroker()
        broker.create(snapshot("x"))
        broker.publish("x", "cancelled", {})
        broker.expire("x")
        for call in (
            lambda: broker.get("x"),
            lambda: broker.subscribe("x", None, Recorder()),
            lambda: broker.caughtUp("x", "1"),
            lambda: broker.finalEvents("x"),
        ):
            self.assertRaises(JobExpired, call)
        self.assertEqual(broker.jobs(), [])
        self.assertRaises(ValueError, broker.create, snapshot("x"))
        self.assertEqual(broker.expiredCount(), 1)
        broker.forget("x")
        error = self.assertRaises(UnknownJob, broker.get, "x")
        self.assertNotIsInstance(error, JobExpired)
        self.assertEqual(broker.expiredCount(), 0)

    def test_removeForgetsEntirely(self) -> None:
        """
        A removed job (one that could not be stored) is simply unknown.
        """
        from tests._support.fixtures import snapshot

        broker = MemoryBroker()
        broker.create(snapshot("y"))
        broker.remove("y")
        self.assertNotIsInstance(self.assertRaises(UnknownJob, broker.get, "y"), JobExpired)
        self.assertEqual(broker.expiredCount(), 0)


class OutputBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.clock = Clock()
        self.spawner = FakeSpawner()

    def makeService(self, **options: Any) -> RenderService:
        options.setdefault("maxRenders", 1)
        service = ticksService(self.clock, self.spawner, self.dir, expireAfter=0, **options)
        self.addCleanup(lambda: self.successResultOf(service.stopService()))
        return service

    def finish(self, service: RenderService, jobID: str, size: int, code: int = 0) -> None:
        process = [p for p in self.spawner.processes if p.env["TWISTEDSSE_RENDER_ID"] == jobID][0]
        Path(process.env["TWISTEDSSE_OUTPUT"]).write_bytes(b"x" * size)
        process.exit(code)

    def test_oldestOutputsGoFirst(self) -> None:
        """
        With a 1000-byte budget, a new render starts only once the oldest
        finished outputs are deleted to leave room for its share; the
        newest stay. A deleted output answers C{410 output_expired}.
        """
        service = self.makeService(maxOutputBytes=1000)
        ids = []
        for size in (400, 300, 200):
            jobID = submitTicks(service)
            self.finish(service, jobID, size)
            ids.append(jobID)
        # 400 + 300 + 200 = 900 on disk; the next render reserves 1000.
        nextID = submitTicks(service)
        for jobID in ids:
            self.assertRaises(OutputExpired, service.outputPath, jobID)
        self.finish(service, nextID, 100)
        self.assertEqual(service.outputBytes(), 100)
        service2 = self.makeService(maxOutputBytes=1000, maxRenders=2)
        self.assertEqual(service2.outputBytes(), 0)

    def test_evictsOnlyWhatIsNeeded(self) -> None:
        """
        With two render slots (a 500-byte share each of 1000), a new render
        deletes just enough of the oldest outputs.
        """
        service = self.makeService(maxOutputBytes=1000, maxRenders=2)
        ids = []
        for size in (200, 200, 200):
            jobID = submitTicks(service)
            self.finish(service, jobID, size)
            ids.append(jobID)
        # 600 on disk; room for one share (500) needs 100 gone: the oldest.
        nextID = submitTicks(service)
        self.assertRaises(OutputExpired, service.outputPath, ids[0])
        self.assertEqual(service.outputPath(ids[1]).stat().st_size, 200)
        self.assertEqual(service.outputBytes(), 400)
        self.finish(service, nextID, 10)

    def test_renderOverItsShareFails(self) -> None:
        """
        A render that writes more than its share fails with reason
        C{output}, and its file is deleted.
        """
        service = self.makeService(maxOutputBytes=1000, maxRenders=2)
        jobID = submitTicks(service)
        self.finish(service, jobID, 501)
        snapshot = service.broker.get(jobID)
        self.assertEqual(snapshot.state, JobState.FAILED)
        self.assertEqual(snapshot.error["reason"], "output")
        self.assertIn("501 bytes", snapshot.error["message"])
        self.assertEqual(list(self.dir.iterdir()), [])
        self.assertEqual(service.outputBytes(), 0)

    def test_outputExpiredOverHTTP(self) -> None:
        """
        C{GET /renders/ID/output} of a deleted output is C{410
        output_expired}, JSON.
        """
        service = self.makeService(maxOutputBytes=100)
        first = submitTicks(service)
        self.finish(service, first, 50)
        second = submitTicks(service)
        self.finish(service, second, 50)
        conn = Connection(buildSite(service, self.clock))
        conn.request("GET", f"/renders/{first}/output")
        status, headers, body = splitResponse(conn.take())
        self.assertEqual((status, json.loads(body)["error"]), (410, "output_expired"))
        conn.disconnect()

    def test_restartCountsAndTrimsOutputs(self) -> None:
        """
        A restart counts the outputs it finds, and a smaller budget than
        before deletes the oldest at start.
        """
        store = self.dir / "state" / "jobs.sqlite3"
        first = self.makeService(store=SQLiteJobStore(store))
        ids = []
        for size in (300, 300):
            jobID = submitTicks(first)
            self.finish(first, jobID, size)
            ids.append(jobID)
        self.successResultOf(first.stopService())
        second = self.makeService(store=SQLiteJobStore(store), maxOutputBytes=400)
        self.assertRaises(OutputExpired, second.outputPath, ids[0])
        self.assertEqual(second.outputBytes(), 300)


class DiskSpaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.statvfs = FakeStatvfs(free=10 * 1024 * 1024)
        self.service = ticksService(
            self.clock,
            self.spawner,
            self.dir / "outputs",
            maxRenders=1,
            expireAfter=0,
            minFreeBytes=100 * 1024 * 1024,
            statvfs=self.statvfs,
        )
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))

    def test_submitRefusedWhenNearlyFull(self) -> None:
        """
        With less free space than C{minFreeBytes}, a submit is refused
        (L{InsufficientStorage}) and no job exists; the output directory's
        nearest existing parent is what is measured.
        """
        error = self.assertRaises(InsufficientStorage, self.service.submit, "ticks", {})
        self.assertIn("10485760 bytes free", str(error))
        self.assertEqual(self.service.broker.jobs(), [])
        self.assertEqual(self.spawner.processes, [])
        self.assertEqual(self.statvfs.calls, [str(self.dir.parent)] if not self.dir.exists() else [str(self.dir)])

    def test_postAnswers507(self) -> None:
        """
        Over HTTP the refusal is C{507 insufficient_storage}, JSON.
        """
        conn = Connection(buildSite(self.service, self.clock))
        conn.request("POST", "/renders", {"Content-Type": "application/json"}, b'{"renderer": "ticks"}')
        status, headers, body = splitResponse(conn.take())
        self.assertEqual((status, json.loads(body)["error"]), (507, "insufficient_storage"))
        conn.disconnect()

    def test_queuedRenderFailsWhenTheDiskFillsMeanwhile(self) -> None:
        """
        A render queued while there was room, whose turn comes when there
        is none, ends C{failed} (reason C{storage}) with its terminal
        event, and the next one in the queue is considered too.
        """
        object.__setattr__(self.statvfs, "free", 10**12)
        running = self.service.submit("ticks", {}).id
        queued = self.service.submit("ticks", {}).id
        recorder = Recorder()
        self.service.broker.subscribe(queued, None, recorder)
        object.__setattr__(self.statvfs, "free", 1)
        self.spawner.processes[0].exit(0)
        self.assertEqual(self.service.broker.get(running).state, JobState.SUCCEEDED)
        snapshot = self.service.broker.get(queued)
        self.assertEqual((snapshot.state, snapshot.error["reason"]), (JobState.FAILED, "storage"))
        self.assertEqual([e.event for e, _ in recorder.got], ["failed"])
        self.assertEqual(len(self.spawner.processes), 1)


def fillStore(store: SQLiteJobStore) -> None:
    """
    Make C{store}'s database really full: no page may be added
    (C{max_page_count}) and the pages it has are packed with filler rows,
    so the next write that needs room fails with SQLite's own
    C{SQLITE_FULL}, "database or disk is full".
    """
    db = store._db
    (pages,) = db.execute("pragma page_count").fetchone()
    db.execute(f"pragma max_page_count = {pages}")
    n = 0
    for size in (2000, 500, 100, 20, 1):
        while True:
            n += 1
            try:
                db.execute(
                    "insert into jobs (id, snapshot, created_at) values (?, ?, 0)",
                    (f"~fill{n}", "x" * size),
                )
            except sqlite3.OperationalError as e:
                assert "full" in str(e), e
                break


class StoreFullTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.store = SQLiteJobStore(self.dir / "jobs.sqlite3")
        self.service = ticksService(
            self.clock,
            self.spawner,
            self.dir / "outputs",
            maxRenders=1,
            expireAfter=0,
            renderTimeout=0,
            store=self.store,
        )
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))

    def test_fullStoreRefusesANewRender(self) -> None:
        """
        When the new job cannot be stored, submit raises
        L{InsufficientStorage} (HTTP 507), and no job is left behind.
        """
        fillStore(self.store)
        error = self.assertRaises(InsufficientStorage, self.service.submit, "ticks", {"pad": "p" * 3000})
        self.assertIn("database or disk is full", str(error))
        self.assertEqual(self.service.broker.jobs(), [])
        self.assertEqual(self.spawner.processes, [])

    def test_fullStoreOverHTTPIs507(self) -> None:
        """
        C{POST /renders} against a full store answers C{507
        insufficient_storage} (JSON), not 500.
        """
        fillStore(self.store)
        conn = Connection(buildSite(self.service, self.clock))
        body = json.dumps({"renderer": "ticks", "params": {"pad": "p" * 3000}}).encode()
        conn.request("POST", "/renders", {"Content-Type": "application/json"}, body)
        status, headers, raw = splitResponse(conn.take())
        self.assertEqual((status, json.loads(raw)["error"]), (507, "insufficient_storage"))
        conn.disconnect()

    def test_fullStoreAtStartFailsTheJob(self) -> None:
        """
        A queued render whose start cannot be stored ends C{failed}
        (reason C{storage}) with its terminal event, and no process is
        started for it: nothing stays C{running} without a process.
        """
        running = self.service.submit("ticks", {}).id
        queued = self.service.submit("ticks", {"pad": "p" * 3000}).id
        recorder = Recorder()
        self.service.broker.subscribe(queued, None, recorder)
        fillStore(self.store)
        # The queued job's row grows when it starts: no room for it.
        self.clock.advance(1.2345678901234567e15)
        self.spawner.processes[0].exit(0)
        self.flushLoggedErrors(sqlite3.OperationalError)
        snapshot = self.service.broker.get(queued)
        self.assertEqual((snapshot.state, snapshot.error["reason"]), (JobState.FAILED, "storage"))
        self.assertIn("database or disk is full", snapshot.error["message"])
        self.assertEqual([e.event for e, _ in recorder.got], ["failed"])
        self.assertEqual(len(self.spawner.processes), 1)
        self.assertEqual(self.service.broker.get(running).state, JobState.SUCCEEDED)


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        By default finished jobs expire after a day, outputs have no total
        limit, and renders need 100 MiB free on the output filesystem.
        """
        from twistedsse import tap

        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["expire-after"], 86400.0)
        self.assertEqual(options["max-output-bytes"], 0)
        self.assertEqual(options["min-free-bytes"], 100 * 1024 * 1024)

    def test_passedToTheService(self) -> None:
        """
        C{--expire-after}, C{--max-output-bytes} and C{--min-free-bytes}
        reach the render service; negative values are refused.
        """
        import gc

        from twisted.internet.testing import MemoryReactorClock
        from twisted.python import usage

        from twistedsse import tap

        thresholds = gc.get_threshold()
        self.addCleanup(lambda: (gc.unfreeze(), gc.set_threshold(*thresholds)))
        options = tap.Options()
        options.parseOptions([
            "--listen", "tcp:0:interface=127.0.0.1", "--state-dir", self.mktemp(), "--expire-after", "3600",
            "--max-output-bytes", "1000000", "--min-free-bytes", "0",
        ])  # fmt: skip
        service = list(tap.makeService(options, MemoryReactorClock()))[0]
        self.assertEqual((service.expireAfter, service.maxOutputBytes, service.minFreeBytes), (3600.0, 1000000, 0))
        self.assertIsInstance(service.store, SQLiteJobStore)  # --state-dir: the jobs persist
        service.store.close()
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--expire-after", "-1"])

    def test_systemdUnitKeepsState(self) -> None:
        """
        The shipped systemd unit keeps jobs and outputs together
        (C{--state-dir}), so a restart orphans no output.
        """
        unit = (Path(__file__).parent.parent / "docs" / "systemd" / "twistedsse.service").read_text()
        self.assertIn("--state-dir /var/lib/twistedsse", unit)
        self.assertNotIn("--output-dir", unit.split("ExecStart=")[1].split("\n\n")[0].split("KillSignal")[0])

"""
What survives a restart: L{SQLiteJobStore} and the service's restore.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistedsse._interfaces import IJobStore
from twistedsse._job import JobState
from twistedsse._service import RenderService
from twistedsse._store import NullJobStore, SQLiteJobStore, StoredEvent
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import snapshot as queuedSnapshot, ticksService
from tests._support.fixtures import Recorder


class JobStoreInterfaceTests(SynchronousTestCase):
    def test_sqliteProvides(self) -> None:
        """
        L{SQLiteJobStore} provides L{IJobStore}.
        """
        store = SQLiteJobStore(Path(self.mktemp()) / "jobs.sqlite3")
        self.addCleanup(store.close)
        self.assertTrue(verifyObject(IJobStore, store))

    def test_nullProvides(self) -> None:
        """
        L{NullJobStore} provides L{IJobStore}, and keeps nothing: what is
        written is never read back.
        """
        store = NullJobStore()
        self.assertTrue(verifyObject(IJobStore, store))
        job = queuedSnapshot()
        store.save(job)
        store.finish(job, [StoredEvent(1, "complete", "{}")])
        store.expire("job2", 10.0)
        self.assertEqual((store.load(), store.expired(0.0)), ([], []))

    def test_serviceWithoutAStoreHasTheNullOne(self) -> None:
        """
        A service built without a store has a L{NullJobStore}, never
        C{None}.
        """
        service = ticksService(Clock(), FakeSpawner(), Path(self.mktemp()))
        self.assertIsInstance(service.store, NullJobStore)
        self.successResultOf(service.stopService())


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.path = self.dir / "state" / "jobs.sqlite3"

    def service(self, spawner: FakeSpawner, clock: Clock) -> RenderService:
        return ticksService(clock, spawner, self.dir / "out", maxRenders=1, store=SQLiteJobStore(self.path))

    def test_roundTrip(self) -> None:
        """
        A saved snapshot and its final events read back equal.
        """
        store = SQLiteJobStore(self.path)
        clock, spawner = Clock(), FakeSpawner()
        service = ticksService(clock, spawner, self.dir / "out")
        snapshot = service.submit("ticks", {"a": "\u00e9"})
        store.save(snapshot)
        store.finish(snapshot, [StoredEvent(3, "progress", '{"p":1}'), StoredEvent(4, "complete", "{}")])
        store.close()
        ((loaded, events),) = SQLiteJobStore(self.path).load()
        self.assertEqual(loaded, snapshot)
        self.assertEqual(events, [StoredEvent(3, "progress", '{"p":1}'), StoredEvent(4, "complete", "{}")])
        spawner.processes[0].exit(0)

    def test_finishedJobsSurviveARestart(self) -> None:
        """
        After a restart a finished render keeps its status, its latest
        progress and terminal events (with their ids) and its output.
        """
        clock, spawner = Clock(), FakeSpawner()
        first = self.service(spawner, clock)
        jobID = first.newJobID()
        first.submit("ticks", {}, f"/renders/{jobID}/output", jobID=jobID)
        process = spawner.processes[0]
        process.stdout(b'{"p": 0.5}\n{"p": 1.0}\n')
        Path(process.env["TWISTEDSSE_OUTPUT"]).write_bytes(b"video")
        process.exit(0)
        self.successResultOf(first.stopService())

        second = self.service(FakeSpawner(), Clock())
        snapshot = second.broker.get(jobID)
        self.assertEqual(snapshot.state, JobState.SUCCEEDED)
        self.assertEqual(snapshot.progress, {"p": 1.0})
        self.assertEqual(second.outputPath(jobID).read_bytes(), b"video")
        recorder = Recorder()
        second.broker.subscribe(jobID, None, recorder)
        self.assertEqual([(e.event, e.id) for e, _ in recorder.got], [("progress", "2"), ("complete", "3")])
        self.assertTrue(second.broker.caughtUp(jobID, "3"))
        self.successResultOf(second.stopService())

    def test_unfinishedJobsEndInterrupted(self) -> None:
        """
        Renders queued or running when the process went away (no clean
        stop: as after SIGKILL) end as failed, "interrupted", after the
        restart; their leftover files are removed.
        """
        clock, spawner = Clock(), FakeSpawner()
        first = self.service(spawner, clock)
        running = first.submit("ticks", {}).id
        queued = first.submit("ticks", {}).id
        (self.dir / "out" / f"{running}.part.mp4").write_bytes(b"partial")
        # No stopService: the process died.
        second = self.service(FakeSpawner(), Clock())
        for jobID in (running, queued):
            snapshot = second.broker.get(jobID)
            self.assertEqual(snapshot.state, JobState.FAILED)
            self.assertEqual(snapshot.error["reason"], "interrupted")
            recorder = Recorder()
            second.broker.subscribe(jobID, None, recorder)
            self.assertEqual([e.event for e, _ in recorder.got], ["failed"])
            self.assertEqual(json.loads(recorder.got[0][0].data)["reason"], "interrupted")
        self.assertFalse((self.dir / "out" / f"{running}.part.mp4").exists())
        self.successResultOf(second.stopService())
        third = self.service(FakeSpawner(), Clock())
        self.assertEqual(third.broker.get(running).state, JobState.FAILED)
        self.successResultOf(third.stopService())
        spawner.processes[0].exit(signal="KILL")

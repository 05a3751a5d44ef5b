"""
L{RenderService}: queueing, running, cancelling, failing and stopping
renders, with a fake spawner and a L{Clock}, and the real L{RenderProtocol}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistedsse._broker import MemoryBroker
from twistedsse._command import JSONLinesParser
from twistedsse._errors import InvalidParams, JobFinished, OutputNotReady, UnknownJob, UnknownRenderer
from twistedsse._interfaces import IQueueConsumer, IRenderer, IRenderQueue, QueuedRender, RenderPlan
from twistedsse._job import JobState
from twistedsse._queue import MemoryQueue
from twistedsse._service import RenderService, newJobID
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import Recorder


@implementer(IRenderer)
@attrs.frozen
class FileRenderer:
    """
    A renderer whose "process" the test drives; on success its finalize
    writes the output file, as a real renderer's child would.
    """

    name: str = "file"

    def validate(self, params: object) -> Mapping[str, Any]:
        if not isinstance(params, dict):
            raise InvalidParams("params", "must be a JSON object")
        return params

    def plan(self, params: Mapping[str, Any], workdir: Path, stem: str) -> RenderPlan:
        scratch = workdir / f"{stem}.scratch"
        scratch.write_text("x")
        final = workdir / f"{stem}.mp4"
        return RenderPlan(
            argv=("/bin/render", stem),
            env={"PATH": "/usr/bin"},
            stdin=b"{}\n",
            parser=JSONLinesParser(),
            output=final,
            scratch=(scratch,),
            mediaDuration=2.0,
            finalize=lambda: final.write_bytes(b"MP4DATA"),
        )


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.broker = MemoryBroker()
        self.dir = Path(self.mktemp())
        self.ids = iter(f"job{i}" for i in range(100))
        self.service = RenderService(
            clock=self.clock,
            spawner=self.spawner,
            broker=self.broker,
            renderers={"file": FileRenderer()},
            outputDir=self.dir,
            maxRenders=1,
            renderTimeout=60,
            killGrace=5,
            newID=lambda: next(self.ids),
            # Expiry has its own tests (test_expiry); here no timer may
            # outlive a render.
            expireAfter=0,
        )
        self.service.startService()

    def submit(self) -> str:
        jobID = self.service.newJobID()
        return self.service.submit("file", {"a": 1}, f"/renders/{jobID}/output", jobID=jobID).id

    def watch(self, jobID: str) -> Recorder:
        recorder = Recorder()
        self.broker.subscribe(jobID, None, recorder)
        return recorder

    def names(self, recorder: Recorder) -> list[str | None]:
        return [e.event for e, _ in recorder.got]

    def test_unguessableIDs(self) -> None:
        """
        Job ids carry at least 128 random bits, URL-safe.
        """
        ids = {newJobID() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        for jobID in ids:
            self.assertGreaterEqual(len(jobID) * 6, 128)
            self.assertRegex(jobID, r"\A[A-Za-z0-9_-]+\Z")

    def test_unknownRendererAndBadParams(self) -> None:
        """
        An unknown renderer name, or a non-string one, and invalid params
        are refused before any job exists.
        """
        self.assertRaises(UnknownRenderer, self.service.submit, "nope", {})
        self.assertRaises(UnknownRenderer, self.service.submit, ["file"], {})
        self.assertRaises(InvalidParams, self.service.submit, "file", [1])
        self.assertEqual(self.broker.jobs(), [])

    def test_linesOfOneReadAreOneFanOut(self) -> None:
        """
        Lines that arrive in one read (the render printed faster than the
        server read) are published together: one delivery to each
        subscriber, every event in it, in order; the job's progress is the
        last of them.
        """
        jobID = self.submit()
        recorder = self.watch(jobID)
        process = self.spawner.processes[-1]
        process.stdout(b'{"i": 1}\n{"i": 2}\n{"i": 3}\n')
        process.stdout(b'{"i": 4}\n')
        self.assertEqual([event.data for event, _ in recorder.got], ['{"i":1}', '{"i":2}', '{"i":3}', '{"i":4}'])
        self.assertEqual(len(recorder.batches), 1)
        self.assertEqual(self.broker.get(jobID).progress, {"i": 4})
        process.exit(0)

    def test_runsToSuccess(self) -> None:
        """
        A render runs with its plan's argv, env and stdin, in a private
        working directory of its own under the output directory (its
        C{HOME} and C{TMPDIR}); each stdout line is a progress event; exit 0
        finalizes the output, publishes C{complete} and removes the scratch
        files and the working directory.
        """
        jobID = self.submit()
        recorder = self.watch(jobID)
        process = self.spawner.processes[-1]
        self.assertEqual(process.args, ["/bin/render", jobID])
        workDir = Path(process.path)
        self.assertEqual(workDir.parent, self.dir.absolute() / ".work")
        self.assertEqual(process.env, {"PATH": "/usr/bin", "HOME": str(workDir), "TMPDIR": str(workDir)})
        self.assertEqual(process.stdin, b"{}\n")
        self.assertTrue(process.stdinClosed)
        self.assertEqual(self.broker.get(jobID).state, JobState.RUNNING)
        process.stdout(b'{"progress": 0.5, "t_ns": 123}\n{"progress"')
        process.stdout(b": 1.0}\n")
        self.clock.advance(3)
        process.exit(0)
        self.assertEqual(self.names(recorder), ["progress", "progress", "complete"])
        self.assertEqual(recorder.got[0][0].data, '{"progress":0.5,"t_ns":123}')
        snap = self.broker.get(jobID)
        self.assertEqual(snap.state, JobState.SUCCEEDED)
        self.assertEqual(snap.progress, {"progress": 1.0})
        self.assertEqual(
            snap.result,
            {"output_url": f"/renders/{jobID}/output", "duration": 2.0, "size": 7, "elapsed": 3.0},
        )
        self.assertEqual(self.service.outputPath(jobID).read_bytes(), b"MP4DATA")
        self.assertFalse((self.dir / f"{jobID}.scratch").exists())
        self.assertFalse(workDir.parent.exists())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothingRunsBeforeStart(self) -> None:
        """
        Renders submitted before the service starts wait, and start with it.
        """
        stopped = RenderService(
            clock=self.clock, spawner=self.spawner, broker=self.broker,
            renderers={"file": FileRenderer()}, outputDir=self.dir,
        )  # fmt: skip
        jobID = stopped.submit("file", {}).id
        self.assertEqual((self.spawner.processes, self.broker.get(jobID).state), ([], JobState.QUEUED))
        stopped.startService()
        self.assertEqual(len(self.spawner.processes), 1)
        self.spawner.processes[0].exit(0)

    def test_queueAndConcurrencyLimit(self) -> None:
        """
        Renders beyond C{maxRenders} wait C{queued} and start, in order, as
        slots free up.
        """
        first, second = self.submit(), self.submit()
        self.assertEqual(len(self.spawner.processes), 1)
        self.assertEqual(self.broker.get(first).state, JobState.RUNNING)
        self.assertEqual(self.broker.get(second).state, JobState.QUEUED)
        self.assertEqual(self.service.queuedCount(), 1)
        self.spawner.processes[0].exit(0)
        self.assertEqual(len(self.spawner.processes), 2)
        self.assertEqual(self.broker.get(second).state, JobState.RUNNING)
        self.spawner.processes[1].exit(0)
        self.assertEqual(self.service.activeCount(), 0)

    def test_nonZeroExitFails(self) -> None:
        """
        A non-zero exit fails the render with the exit code and the stderr
        tail, and leaves no output.
        """
        jobID = self.submit()
        recorder = self.watch(jobID)
        process = self.spawner.processes[-1]
        process.stderr(b"working\r\nbad thing happened\n")
        process.exit(3)
        self.assertEqual(self.names(recorder), ["failed"])
        error = self.broker.get(jobID).error
        self.assertEqual(error["exit_code"], 3)
        self.assertEqual(error["reason"], "exit")
        self.assertEqual(error["stderr_tail"], ["working", "bad thing happened"])
        self.assertIn("bad thing happened", error["message"])
        self.assertRaises(OutputNotReady, self.service.outputPath, jobID)
        self.assertFalse((self.dir / f"{jobID}.scratch").exists())

    def test_logsTheRenderNotItsEvents(self) -> None:
        """
        A render's life is logged with its id, one line each: submitted,
        started (its pid), ended (state, seconds, exit status), and a
        cancel; nothing per progress event.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        jobID = self.submit()
        process = self.spawner.processes[-1]
        for i in range(20):
            process.stdout(b'{"progress": %d}\n' % i)
        self.clock.advance(2)
        process.exit(0)
        cancelled = self.submit()
        self.service.cancel(cancelled)
        self.spawner.processes[-1].exit(signal="TERM")
        mine = [formatEvent(e) for e in events if e.get("jobID") == jobID]
        self.assertEqual(
            mine,
            [
                f"render {jobID} submitted (file)",
                f"render {jobID} started: pid 4242",
                f"render {jobID} ended succeeded after 2.0 s (exit status 0)",
            ],
        )
        theirs = [formatEvent(e) for e in events if e.get("jobID") == cancelled]
        self.assertEqual(
            theirs,
            [
                f"render {cancelled} submitted (file)",
                f"render {cancelled} started: pid 4242",
                f"render {cancelled} cancelled while running: stopping it",
                f"render {cancelled} ended cancelled after 0.0 s (SIGTERM)",
            ],
        )

    def test_cancelRunning(self) -> None:
        """
        Cancelling a running render sends TERM, then KILL after the grace
        period if it is still there; it ends C{cancelled}.
        """
        jobID = self.submit()
        recorder = self.watch(jobID)
        process = self.spawner.processes[-1]
        self.service.cancel(jobID)
        self.assertEqual(process.signals, ["TERM"])
        self.clock.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.exit(signal="KILL")
        self.assertEqual(self.names(recorder), ["cancelled"])
        self.assertEqual(self.broker.get(jobID).state, JobState.CANCELLED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(JobFinished, self.service.cancel, jobID)

    def test_cancelBeforeKill(self) -> None:
        """
        A render that exits on TERM is not KILLed later.
        """
        jobID = self.submit()
        process = self.spawner.processes[-1]
        self.service.cancel(jobID)
        process.exit(255)
        self.assertEqual(self.broker.get(jobID).state, JobState.CANCELLED)
        self.clock.advance(10)
        self.assertEqual(process.signals, ["TERM"])

    def test_cancelQueued(self) -> None:
        """
        A queued render is cancelled at once and never starts.
        """
        self.submit()
        queued = self.submit()
        self.service.cancel(queued)
        self.assertEqual(self.broker.get(queued).state, JobState.CANCELLED)
        self.spawner.processes[0].exit(0)
        self.assertEqual(len(self.spawner.processes), 1)

    def test_everyEndCountedOnce(self) -> None:
        """
        /metrics counts every render's end once, by renderer and outcome:
        the ones that ran (the runner) and the ones that ended before they
        ran (cancelled or interrupted while queued), with a duration only
        for the former.
        """
        ran = self.submit()
        cancelled = self.submit()
        interrupted = self.submit()
        self.service.cancel(cancelled)
        self.spawner.processes[0].exit(0)
        self.assertEqual(self.broker.get(ran).state, JobState.SUCCEEDED)
        self.assertEqual(self.broker.get(interrupted).state, JobState.RUNNING)
        self.service.cancel(interrupted)
        queuedAtStop = [self.submit(), self.submit()]
        d = self.service.stopService()
        self.spawner.processes[1].exit(signal="TERM")
        self.successResultOf(d)
        for jobID in queuedAtStop:
            self.assertEqual(self.broker.get(jobID).error["reason"], "interrupted")
        stats = self.service.metrics.collector.renders
        assert stats is not None
        self.assertEqual(
            stats.ended, {("file", "succeeded"): 1, ("file", "cancelled"): 2, ("file", "failed"): 2}
        )
        self.assertEqual(stats.durations["file"].count, 2)

    def test_cancelUnknown(self) -> None:
        """
        Cancelling an unknown id raises L{UnknownJob}.
        """
        self.assertRaises(UnknownJob, self.service.cancel, "nope")

    def test_timeout(self) -> None:
        """
        A render still running at its timeout is stopped and failed.
        """
        jobID = self.submit()
        process = self.spawner.processes[-1]
        self.clock.advance(60)
        self.assertEqual(process.signals, ["TERM"])
        process.exit(signal="TERM")
        error = self.broker.get(jobID).error
        self.assertEqual(error["reason"], "timeout")
        self.assertEqual(error["message"], "timed out after 60 s")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_protocolErrorKills(self) -> None:
        """
        A line that is not a JSON object breaks the protocol: the child is
        killed and the render fails saying why.
        """
        jobID = self.submit()
        process = self.spawner.processes[-1]
        process.stdout(b'{"ok": 1}\nnot json\n{"more": 2}\n')
        self.assertEqual(process.signals, ["KILL"])
        process.exit(signal="KILL")
        error = self.broker.get(jobID).error
        self.assertEqual(error["reason"], "protocol")
        self.assertIn("line 2 is not a JSON object", error["message"])

    def test_spawnFailure(self) -> None:
        """
        A renderer that cannot be started fails its render; the service
        goes on with the next one.
        """
        self.spawner.failWith = FileNotFoundError(2, "No such file or directory", "/bin/render")
        jobID = self.submit()
        self.assertEqual(self.broker.get(jobID).state, JobState.FAILED)
        self.assertEqual(self.broker.get(jobID).error["reason"], "spawn")
        self.assertFalse((self.dir / f"{jobID}.scratch").exists())
        self.spawner.failWith = None
        self.submit()
        self.assertEqual(len(self.spawner.processes), 1)

    def test_stopServiceDeliversEveryFinalEvent(self) -> None:
        """
        With a fan-out that would take several reactor turns, every
        subscriber has its progress and final C{failed} event by the time
        stopService's Deferred fires (connections are drained next).
        """
        self.broker.clock = self.clock
        self.broker.fanoutSlice = 2
        jobID = self.submit()
        recorders = [self.watch(jobID) for _ in range(7)]
        self.spawner.processes[-1].stdout(b'{"p": 1}\n')
        d = self.service.stopService()
        self.spawner.processes[-1].exit(signal="TERM")
        self.successResultOf(d)
        self.assertEqual([self.names(r) for r in recorders], [["progress", "failed"]] * 7)
        self.assertEqual(self.broker.subscriberCount(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopServiceEndsEverything(self) -> None:
        """
        Stopping the service fails queued renders and stops running ones
        (TERM, then KILL), each ending "interrupted"; its Deferred fires
        once every process has exited.
        """
        running, queued = self.submit(), self.submit()
        recorders = [self.watch(running), self.watch(queued)]
        process = self.spawner.processes[-1]
        d = self.service.stopService()
        self.assertNoResult(d)
        self.assertEqual(self.broker.get(queued).error["reason"], "interrupted")
        self.clock.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.exit(signal="KILL")
        self.successResultOf(d)
        for recorder in recorders:
            self.assertEqual(self.names(recorder), ["failed"])
        self.assertEqual(self.broker.get(running).error["reason"], "interrupted")
        self.assertEqual(len(self.spawner.processes), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.broker.subscriberCount(), 0)


@implementer(IQueueConsumer)
@attrs.define
class RecordingConsumer:
    """
    A consumer that records what its queue tells it.
    """

    told: list[str] = attrs.field(factory=list)

    def rendersWaiting(self) -> None:
        self.told.append("waiting")

    def cancel(self, jobID: str) -> None:
        self.told.append(f"cancel {jobID}")

    def busy(self) -> bool:
        return True

    def refusal(self) -> str | None:
        return "full"


class MemoryQueueTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """
        L{MemoryQueue} provides L{IRenderQueue}; the service's runner
        provides L{IQueueConsumer}.
        """
        self.assertTrue(verifyObject(IRenderQueue, MemoryQueue()))
        service = RenderService(
            clock=Clock(), spawner=FakeSpawner(), broker=MemoryBroker(), renderers={}, outputDir=Path(self.mktemp())
        )
        self.assertTrue(verifyObject(IQueueConsumer, service._runner))

    def test_firstComeFirstServed(self) -> None:
        """
        Renders are taken in the order they were queued, each once, and the
        consumer is told of each; one withdrawn while it waits is never
        taken, and a second withdraw finds nothing.
        """
        queue, consumer = MemoryQueue(), RecordingConsumer()
        queue.attach(consumer)
        for jobID in ("a", "b", "c"):
            queue.enqueue(QueuedRender(jobID, f"/{jobID}"))
        self.assertEqual(consumer.told, ["waiting"] * 3)
        self.assertEqual((queue.withdraw("b"), queue.withdraw("b"), len(queue)), (True, False, 2))
        self.assertEqual([queue.take(), queue.take(), queue.take()], [QueuedRender("a", "/a"), QueuedRender("c", "/c"), None])

    def test_consumerAnswersForTheWorkers(self) -> None:
        """
        Cancelling a taken render, and whether the workers are busy or
        refuse renders, go to the consumer; with none attached, nothing
        runs, so nothing is busy or refused.
        """
        queue, consumer = MemoryQueue(), RecordingConsumer()
        self.assertEqual((queue.busy(), queue.refusal()), (False, None))
        queue.cancelRunning("x")
        queue.attach(consumer)
        queue.cancelRunning("x")
        self.assertEqual((consumer.told, queue.busy(), queue.refusal()), (["cancel x"], True, "full"))

"""
Render processes that misbehave, for real: child processes started by a
real server on 127.0.0.1 (the C{faulty.py} command renderer, and ffmpeg for
C{card}) that exit non-zero, die of a signal, hang, ignore SIGTERM, print
garbage or an endless line, flood stderr, cannot be started, or cannot
write their output. Each one ends as C{failed} with a C{failed} event that
says why, while a healthy render running alongside completes; afterwards no
process, stream, slot or file is left behind and the server still renders.
Cancelling works in every state a render can be in, and hostile card titles
never leak into the event stream's framing.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twistedsse import CommandRenderer

from tests._support.server import ServerMixin, stream, ticker
from tests._support.waiting import whenTrue

HERE = Path(__file__).parent
FAULTY = str(HERE / "faulty.py")

#: Everything a test waits for is bounded by this (seconds), well inside
#: the trial timeout, so that a hang fails with a clear message.
WAIT = 20.0

#: A binary that does not exist; its path must never reach a client.
MISSING = "/nonexistent/twistedsse-secret-dir/render-binary"


def faulty(name: str = "faulty") -> CommandRenderer:
    return CommandRenderer(name, [sys.executable, "-u", FAULTY])


@attrs.define
class Render:
    """
    A render started through the API, and its event stream as it arrives.
    """

    job: dict[str, Any]
    events: list[Any]
    done: Deferred[Any]

    @property
    def received(self) -> list[Any]:
        return self.events[1:]

    @property
    def names(self) -> list[str | None]:
        return [e.event for e in self.received]

    def payloads(self, name: str = "progress") -> list[Any]:
        return [json.loads(e.data) for e in self.received if e.event == name]

    @property
    def terminal(self) -> Any:
        return json.loads(self.received[-1].data)

    def pid(self) -> int:
        return int(self.payloads()[0]["pid"])


def pidGone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class FaultTests(ServerMixin, TestCase):
    timeout = 60

    def serve(self, *more: Any, **kw: Any) -> str:
        kw.setdefault("maxRenders", 4)
        kw.setdefault("killGrace", 0.5)
        return self.startServer([faulty(), ticker(), *more], **kw)

    @inlineCallbacks
    def start(self, renderer: str, params: Any) -> Any:
        """
        Start a render and subscribe to it before it can end: a finished
        job keeps only its latest progress and terminal event, and these
        tests read every event (the first carries the child's pid). The
        renderer waits at a gate file until the stream is open.
        """
        gate = None
        if isinstance(params, dict) and renderer in ("faulty", "ticks"):
            gate = os.path.abspath(self.mktemp())
            params = {**params, ("gate" if renderer == "faulty" else "start_file"): gate}
        job = yield self.post(renderer, params)
        events, done = stream(self.base + job["events_url"], self.pool)
        done.addTimeout(WAIT, reactor)
        if gate is not None:
            # (C{done.called} is no use: it is "called" with treq's inner
            # Deferred long before the response arrives.)
            failed: list[Any] = []
            done.addErrback(lambda f: (failed.append(f), f)[1])
            deadline = time.monotonic() + WAIT
            while not events and not failed and time.monotonic() < deadline:
                yield deferLater(reactor, 0.005, lambda: None)
            Path(gate).touch()
        return Render(job, events, done)

    def waitUntil(self, predicate: Any, what: str, timeout: float = WAIT) -> Any:
        return whenTrue(reactor, predicate, timeout, what)

    @inlineCallbacks
    def started(self, renderer: str, params: Any) -> Any:
        """
        Start a render and wait for its first progress event (which, from
        C{faulty.py}, carries its pid).
        """
        render = yield self.start(renderer, params)
        yield self.waitUntil(lambda: "progress" in render.names, "the first progress event")
        return render

    @inlineCallbacks
    def healthy(self, count: int = 5) -> Any:
        """
        A normal render: it must complete with every progress event.
        """
        render = yield self.start("ticks", {"count": count, "interval": 0.01})
        yield render.done
        self.assertEqual(render.names, ["progress"] * count + ["complete"], render.received)
        self.assertEqual([p["i"] for p in render.payloads()], list(range(1, count + 1)))
        self.assertTrue(pidGone(render.payloads()[0]["pid"]))
        return render

    @inlineCallbacks
    def assertFailed(self, render: Render, reason: str) -> Any:
        """
        The render ends with exactly one event, C{failed}, for C{reason};
        its status says the same. Returns the event's data.
        """
        yield render.done
        self.assertEqual(render.events[0].code, 200)
        self.assertEqual(render.names, ["progress"] * (len(render.names) - 1) + ["failed"], render.received)
        failed = render.terminal
        self.assertEqual(sorted(failed), ["exit_code", "message", "reason", "signal", "stderr_tail"])
        self.assertEqual(failed["reason"], reason, failed)
        code, status = yield self.getJSON(render.job["status_url"])
        self.assertEqual((code, status["state"], status["error"]), (200, "failed", failed))
        return failed

    @inlineCallbacks
    def assertClean(self, *pids: int, keep: tuple[str, ...] = ()) -> Any:
        """
        Nothing is left: no process, no running or queued render, no
        subscriber, no file in the output directory but C{keep}; and the
        server still completes a normal render.
        """
        for pid in pids:
            self.assertTrue(pidGone(pid), f"process {pid} is still there")
        self.assertEqual(self.service.activeCount(), 0)
        self.assertEqual(self.service.queuedCount(), 0)
        self.assertEqual(self.service.broker.subscriberCount(), 0)
        self.assertEqual(sorted(os.listdir(self.service.outputDir)), sorted(keep))
        yield self.healthy(3)
        self.assertEqual(self.service.activeCount(), 0)
        self.assertEqual(self.service.broker.subscriberCount(), 0)
        self.assertEqual(sorted(os.listdir(self.service.outputDir)), sorted(keep))
        code, health = yield self.getJSON("/healthz")
        self.assertEqual((code, health["renders"]["running"], health["subscribers"]), (200, 0, 0))

    @inlineCallbacks
    def failsAlongside(self, params: Any, reason: str) -> Any:
        """
        Run a C{faulty} render with C{params} and a healthy one at the same
        time; the faulty one fails for C{reason}, the healthy one completes.
        Returns the faulty render and its C{failed} data.
        """
        alongside = self.healthy(20)
        render = yield self.start("faulty", params)
        failed = yield self.assertFailed(render, reason)
        yield alongside
        return render, failed

    # -- the process ends badly -------------------------------------------

    @inlineCallbacks
    def test_nonZeroExit(self) -> None:
        """
        A renderer that exits 3 after writing half an output fails with
        C{reason: "exit"}, its exit code, the last stderr line in the message
        and its stderr lines in C{stderr_tail}; its partial output is
        deleted.
        """
        self.serve()
        params = {"mode": "exit", "code": 3, "partial": "half an mp4",
                  "stderr": ["warming up", "error: the frobnicator broke"]}  # fmt: skip
        render, failed = yield self.failsAlongside(params, "exit")
        self.assertEqual(failed["exit_code"], 3)
        self.assertIsNone(failed["signal"])
        self.assertEqual(failed["stderr_tail"], ["warming up", "error: the frobnicator broke"])
        self.assertEqual(failed["message"], "the renderer exited with code 3: error: the frobnicator broke")
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def killedBySignal(self, signum: int) -> Any:
        self.serve()
        render, failed = yield self.failsAlongside({"mode": "signal", "signal": signum}, "signal")
        self.assertEqual((failed["signal"], failed["exit_code"]), (signum, None))
        self.assertEqual(failed["message"], f"the renderer was killed by signal {signum}")
        yield self.assertClean(render.pid())

    def test_killedBySIGKILL(self) -> Deferred[Any]:
        """
        A renderer that dies of SIGKILL fails with C{reason: "signal"},
        C{signal: 9} and no exit code.
        """
        return self.killedBySignal(9)

    def test_killedBySIGSEGV(self) -> Deferred[Any]:
        """
        A renderer that crashes with SIGSEGV fails with C{reason: "signal"},
        C{signal: 11}, and leaves no core file in the output directory.
        """
        return self.killedBySignal(11)

    # -- the process does not end -----------------------------------------

    @inlineCallbacks
    def test_hangPastTimeout(self) -> None:
        """
        A renderer that hangs is stopped with SIGTERM at its
        C{--render-timeout} (1 s) and fails with C{reason: "timeout"} and
        C{signal: 15}, about a second after it started.
        """
        self.serve(renderTimeout=1.0)
        began = time.monotonic()
        render = yield self.start("faulty", {"mode": "hang"})
        failed = yield self.assertFailed(render, "timeout")
        elapsed = time.monotonic() - began
        self.assertEqual((failed["signal"], failed["exit_code"]), (15, None))
        self.assertEqual(failed["message"], "timed out after 1 s")
        self.assertTrue(1.0 <= elapsed < 3.0, elapsed)
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def test_hangIgnoringSIGTERM(self) -> None:
        """
        A hung renderer that ignores SIGTERM is KILLed after the kill grace
        (0.5 s): it fails with C{reason: "timeout"} and C{signal: 9}, 1.5 s
        after it started.
        """
        self.serve(renderTimeout=1.0)
        began = time.monotonic()
        render = yield self.start("faulty", {"mode": "hang", "ignore_term": True})
        failed = yield self.assertFailed(render, "timeout")
        elapsed = time.monotonic() - began
        self.assertEqual((failed["signal"], failed["exit_code"]), (9, None))
        self.assertTrue(1.5 <= elapsed < 3.5, elapsed)
        yield self.assertClean(render.pid())

    # -- the process breaks its output protocol ---------------------------

    @inlineCallbacks
    def test_garbageLines(self) -> None:
        """
        A stdout line that is not a JSON object (text, an array, C{null}, a
        string, C{NaN}, invalid UTF-8, a cut-off object, an array nested
        deeper than Python's recursion limit) fails the render at once with
        C{reason: "protocol"}: the server KILLs it (signal 9) and says which
        line it was. So does a JSON object that could not be sent on as
        strict UTF-8 JSON (a lone surrogate, a number too large for a
        double). The valid line before it, often read in the same chunk, is
        delivered.
        """
        self.serve(maxRenders=10)
        lines: list[Any] = [
            "this is not json", "[1, 2]", "null", '"a string"', '{"a": NaN}',
            [0xFF, 0xFE, 0x00, 0x41], '{"unterminated": ', "[" * 50000, '{"x": "\\ud800"}', '{"x": 1e400}',
        ]  # fmt: skip
        renders = yield gatherResults([self.start("faulty", {"mode": "garbage", "line": line}) for line in lines])
        pids = []
        for line, render in zip(lines, renders):
            failed = yield self.assertFailed(render, "protocol")
            self.assertEqual((failed["signal"], failed["exit_code"]), (9, None), line)
            self.assertTrue(failed["message"].startswith("the renderer broke its output protocol: stdout line 2"),
                            failed["message"])  # fmt: skip
            self.assertEqual(len(render.payloads()), 1, line)
            pids.append(render.pid())
        yield self.assertClean(*pids)

    @inlineCallbacks
    def test_tenMiBLine(self) -> None:
        """
        A 10 MiB stdout line fails the render with C{reason: "protocol"} as
        soon as it passes the 64 KiB line limit: the server KILLs the
        renderer, and never holds more than a bounded amount of it (the
        server's peak of traced allocations stays under 4 MiB; holding the
        line would take over 20).
        """
        self.serve()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        began = time.monotonic()
        render = yield self.start("faulty", {"mode": "longline", "mib": 10})
        tracemalloc.reset_peak()
        failed = yield self.assertFailed(render, "protocol")
        elapsed = time.monotonic() - began
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertLess(elapsed, 5.0)
        self.assertEqual(failed["message"], "the renderer broke its output protocol: line longer than 65536 bytes")
        self.assertEqual(failed["signal"], 9)
        yield self.assertClean(render.pid())

    # -- stderr -------------------------------------------------------------

    @inlineCallbacks
    def test_stderrFloodThenFailure(self) -> None:
        """
        A renderer that writes 50 MiB to stderr, as one endless line, then
        C{"last words"} and exits 4 fails by its exit code; C{stderr_tail}
        stays bounded (at most 20 lines of at most 2000 characters) and ends
        with its last words. The server's memory stays bounded meanwhile.
        """
        self.serve()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        render, failed = yield self.failsAlongside({"mode": "stderr", "mib": 50, "code": 4}, "exit")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertEqual(failed["exit_code"], 4)
        tail = failed["stderr_tail"]
        self.assertLessEqual(len(tail), 20)
        self.assertTrue(all(len(line) <= 2000 for line in tail), [len(line) for line in tail])
        self.assertEqual(tail[-1], "last words")
        self.assertEqual(failed["message"], "the renderer exited with code 4: last words")
        self.assertLess(peak, 4 * 1024 * 1024)
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def test_stderrFloodThenSuccess(self) -> None:
        """
        A renderer that writes 20 MiB of short stderr lines and exits 0
        completes: stderr is not a failure.
        """
        self.serve()
        render = yield self.start("faulty", {"mode": "stderr", "mib": 20, "newlines": True, "code": 0})
        yield render.done
        self.assertEqual(render.names, ["progress", "complete"])
        yield self.assertClean(render.pid())

    # -- the process cannot start or cannot write ---------------------------

    @inlineCallbacks
    def test_cannotStart(self) -> None:
        """
        A renderer whose binary is missing (by path, or by name on no
        C{PATH} directory) or is not executable fails with C{reason:
        "spawn"} and the system's reason only: no server path reaches the
        client, in the event or the status.
        """
        notExecutable = Path(self.mktemp()).absolute()
        notExecutable.write_text("#!/bin/sh\nexit 0\n")
        notExecutable.chmod(stat.S_IRUSR | stat.S_IWUSR)
        self.serve(
            CommandRenderer("missing", [MISSING, "--secret-flag"]),
            CommandRenderer("nameless", ["twistedsse-no-such-binary-anywhere"]),
            CommandRenderer("noexec", [str(notExecutable)]),
        )
        cases = {
            "missing": "could not start the renderer (No such file or directory)",
            "nameless": "could not start the renderer (No such file or directory)",
            "noexec": "could not start the renderer (Permission denied)",
        }
        for name, message in cases.items():
            alongside = self.healthy()
            render = yield self.start(name, {})
            failed = yield self.assertFailed(render, "spawn")
            yield alongside
            self.assertEqual(render.names, ["failed"])
            self.assertEqual(failed, {"message": message, "reason": "spawn", "exit_code": None,
                                      "signal": None, "stderr_tail": []})  # fmt: skip
            code, status = yield self.getJSON(render.job["status_url"])
            text = json.dumps(status)
            for secret in ("nonexistent", "secret", str(notExecutable), sys.prefix, str(HERE)):
                self.assertNotIn(secret, text)
        yield self.assertClean()

    @inlineCallbacks
    def test_cardCannotWriteOutput(self) -> None:
        """
        A card render whose output cannot be written fails with ffmpeg's
        reason and exit code. The disk-full case is made real: the partial
        output's name is a symlink to C{/dev/full}, so each of ffmpeg's
        writes gets ENOSPC from the kernel (root included, where C{chmod}
        would stop nothing). The symlink is removed afterwards, and
        C{/dev/full} is left alone.
        """
        self.serve(maxRenders=1)
        blocker = yield self.started("faulty", {"mode": "hang"})
        card = yield self.start("card", {"title": "no room", "duration": 1, "size": "128x72", "fps": 10})
        self.assertEqual(card.job["state"], "queued")
        part = Path(self.service.outputDir) / f"{card.job['id']}.part.mp4"
        part.symlink_to("/dev/full")
        yield treq.delete(self.base + blocker.job["status_url"], pool=self.pool).addCallback(treq.content)
        yield blocker.done
        self.assertEqual(blocker.names[-1], "cancelled")
        failed = yield self.assertFailed(card, "exit")
        self.assertNotIn(failed["exit_code"], (0, None))
        self.assertTrue(any("No space left on device" in line for line in failed["stderr_tail"]), failed)
        self.assertTrue(stat.S_ISCHR(os.stat("/dev/full").st_mode))
        yield self.assertClean(blocker.pid())

    @inlineCallbacks
    def test_outputDirectoryReplacedByAFile(self) -> None:
        """
        If the output directory is replaced by a regular file (it cannot be
        created, as a read-only directory would not stop root), renders fail
        with C{reason: "spawn"} and no path in the message; once it is a
        directory again, renders work.
        """
        self.serve()
        outputDir = Path(self.service.outputDir)
        yield self.healthy()  # the directory is made for the first render
        os.rmdir(outputDir)
        outputDir.write_text("not a directory")
        for renderer in ("card", "ticks"):
            render = yield self.start(renderer, {})
            failed = yield self.assertFailed(render, "spawn")
            self.assertEqual(failed["message"], "could not start the renderer (File exists)")
        outputDir.unlink()
        outputDir.mkdir()
        yield self.assertClean()

    # -- cancelling -----------------------------------------------------------

    @inlineCallbacks
    def cancel(self, render: Render) -> Any:
        response = yield treq.delete(self.base + render.job["status_url"], pool=self.pool)
        body = yield response.json()
        self.assertEqual(response.code, 202, body)
        return body

    @inlineCallbacks
    def test_cancelQueued(self) -> None:
        """
        A render waiting for a slot (one slot, taken by a long render) is
        cancelled at once: its stream has the one event C{cancelled}, it
        never starts, and the render ahead of it is unaffected.
        """
        self.serve(maxRenders=1)
        ahead = yield self.started("faulty", {"mode": "hang"})
        queued = yield self.start("faulty", {"mode": "exit"})
        self.assertEqual(queued.job["state"], "queued")
        body = yield self.cancel(queued)
        self.assertEqual(body["state"], "cancelled")
        yield queued.done
        self.assertEqual(queued.names, ["cancelled"])
        self.assertEqual(queued.terminal, {"message": "cancelled before it started"})
        self.assertEqual((self.service.activeCount(), self.service.queuedCount()), (1, 0))
        self.assertEqual(ahead.names, ["progress"])
        yield self.cancel(ahead)
        yield ahead.done
        self.assertEqual(ahead.names, ["progress", "cancelled"])
        yield self.assertClean(ahead.pid())

    @inlineCallbacks
    def test_cancelRunning(self) -> None:
        """
        Cancelling a running render TERMs its process: the stream ends with
        C{cancelled} and the status says C{cancelled}; a second cancel is
        409 C{job_finished}.
        """
        self.serve()
        render = yield self.started("faulty", {"mode": "hang"})
        yield self.cancel(render)
        yield render.done
        self.assertEqual(render.names, ["progress", "cancelled"])
        self.assertEqual(render.terminal, {"message": "cancelled by request"})
        code, status = yield self.getJSON(render.job["status_url"])
        self.assertEqual(status["state"], "cancelled")
        response = yield treq.delete(self.base + render.job["status_url"], pool=self.pool)
        body = yield response.json()
        self.assertEqual((response.code, body["error"]), (409, "job_finished"))
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def test_cancelRunningIgnoringSIGTERM(self) -> None:
        """
        Cancelling a render that ignores SIGTERM KILLs it after the grace
        period (0.5 s); it ends C{cancelled}.
        """
        self.serve()
        render = yield self.started("faulty", {"mode": "hang", "ignore_term": True})
        began = time.monotonic()
        yield self.cancel(render)
        yield render.done
        elapsed = time.monotonic() - began
        self.assertEqual(render.names, ["progress", "cancelled"])
        self.assertTrue(0.5 <= elapsed < 2.0, elapsed)
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def test_cancelWhileExiting(self) -> None:
        """
        A render whose process is already exiting (it got SIGTERM and takes
        0.3 s to clean up, then exits 0) can be cancelled again meanwhile
        (202, still C{running}); it ends with one C{cancelled} event, not
        C{complete}, and was not KILLed (the grace is 3 s).
        """
        self.serve(killGrace=3.0)
        render = yield self.started("faulty", {"mode": "exiting", "cleanup": 0.3})
        began = time.monotonic()
        yield self.cancel(render)
        again = yield self.cancel(render)
        self.assertEqual(again["state"], "running")
        yield render.done
        elapsed = time.monotonic() - began
        self.assertEqual(render.names, ["progress", "cancelled"])
        self.assertTrue(0.3 <= elapsed < 2.5, elapsed)
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def orphan(self, code: int = 0) -> Any:
        """
        Start a renderer that starts a process holding its stdout and
        stderr for 30 s, and exits C{code} at once; return it once it has
        exited. The process leaves the render's process group (as a daemon
        does), so that the service cannot end it with the render: only its
        pipes can be closed. (One that stays in the group is KILLed when the
        render exits: see test_containment.)
        """
        render = yield self.start("faulty", {"mode": "orphan", "seconds": 30, "code": code, "escape": True})
        yield self.waitUntil(lambda: len(render.payloads()) == 2, "the grandchild's pid")
        grandchild, parent = render.payloads()[1]["grandchild"], render.payloads()[1]["parent"]
        self.addCleanup(lambda: pidGone(grandchild) or os.kill(grandchild, 9))
        yield self.waitUntil(lambda: pidGone(render.pid()), "the renderer to exit")
        if parent != os.getpid():
            # Its supervisor exits once it has: then the server has seen it
            # exit (it collected the supervisor).
            yield self.waitUntil(lambda: pidGone(parent), "the supervisor to exit")
        return render

    @inlineCallbacks
    def test_exitWithPipesHeldOpen(self) -> None:
        """
        A renderer that exits while a process it started still holds its
        stdout and stderr (a shell wrapper whose command lives on) ends by
        its exit code (3: C{failed}, C{reason: "exit"}) once the kill grace
        has passed after its exit, not when the other process lets go (30 s
        later).
        """
        self.serve()
        render = yield self.orphan(code=3)
        exited = time.monotonic()
        failed = yield self.assertFailed(render, "exit")
        elapsed = time.monotonic() - exited
        self.assertEqual((failed["exit_code"], failed["signal"]), (3, None))
        self.assertTrue(elapsed < 3.0, elapsed)
        yield self.assertClean(render.pid())

    @inlineCallbacks
    def test_cancelWithPipesHeldOpen(self) -> None:
        """
        Cancelling such a render while the server still waits for its pipes
        (the grace is 5 s) ends it at once, C{cancelled}: there is no
        process left to TERM, so the server closes the pipes.
        """
        self.serve(killGrace=5.0)
        render = yield self.orphan()
        self.assertEqual(self.service.activeCount(), 1)
        began = time.monotonic()
        yield self.cancel(render)
        yield render.done
        elapsed = time.monotonic() - began
        self.assertEqual(render.names, ["progress", "progress", "cancelled"])
        self.assertLess(elapsed, 2.5)
        yield self.assertClean(render.pid())

    # -- hostile text ---------------------------------------------------------

    HOSTILE = [
        "It's", "a: b", "back\\slash", "%{pts}", "%{eif:1:d}", "two\nlines", "a;b", "ünï\u00e7ødé \U0001f600 \u202e",
        "\n\nevent: complete", "x\r\ndata: injected\r\n\r\nevent: complete\nid: 99",
    ]  # fmt: skip

    @inlineCallbacks
    def test_hostileCardTitles(self) -> None:
        """
        Card renders titled with quotes, colons, backslashes, ffmpeg
        expansions, newlines, semicolons, unicode and attempts at SSE frames
        each complete with a valid MP4; the streams hold exactly the
        expected events, none of them made by a title.
        """
        self.serve()
        hostile = [t for t in self.HOSTILE if "\r" not in t]  # the card refuses CR (a control character)
        renders = yield gatherResults([
            self.start("card", {"title": title, "subtitle": title, "duration": 1, "size": "128x72", "fps": 10})
            for title in hostile
        ])  # fmt: skip
        keep = []
        for title, render in zip(hostile, renders):
            yield render.done
            names = render.names
            self.assertEqual(names, ["progress"] * (len(names) - 1) + ["complete"], (title, render.received))
            self.assertEqual(len(set(e.id for e in render.received)), len(names))
            result = render.terminal
            self.assertEqual(sorted(result), ["duration", "elapsed", "output_url", "size"])
            self.assertGreater(result["size"], 0)
            code, status = yield self.getJSON(render.job["status_url"])
            self.assertEqual((status["state"], status["params"]["title"]), ("succeeded", title))
            keep.append(f"{render.job['id']}.mp4")
        yield self.assertClean(keep=tuple(keep))

    @inlineCallbacks
    def test_hostileProgressText(self) -> None:
        """
        A command renderer's progress line carrying the same text (CR and
        LF included) is one C{progress} event whose data round-trips
        exactly: it cannot start a field or an event of its own.
        """
        self.serve()
        renders = yield gatherResults([self.start("faulty", {"mode": "echo", "text": t}) for t in self.HOSTILE])
        for text, render in zip(self.HOSTILE, renders):
            yield render.done
            self.assertEqual(render.names, ["progress", "progress", "complete"], render.received)
            self.assertEqual(render.payloads()[1], {"text": text})
            self.assertEqual([e.id for e in render.received], ["1", "2", "3"])
        yield self.assertClean(*(r.pid() for r in renders))

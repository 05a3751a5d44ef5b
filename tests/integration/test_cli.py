"""
The C{twistedsse} command as a user runs it: a real C{twistd twistedsse}
child with the ticker renderer, and the command in its own process, its
stdout a pipe (the plain lines) or a real pseudo-terminal (the progress
bar). Every run is bounded in time.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from twistedsse.client import InvalidParams, JobFinished, RenderClient, UnknownJob

from tests._support.launcher import TwistdMixin, childEnv, spawnService
from tests._support.server import ServerMixin, ticker
from tests._support.waiting import whenTrue

#: How long one command may take.
RUN_TIMEOUT = 60.0

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen(output: str) -> list[str]:
    """
    What a terminal shows at the end of C{output}: ANSI codes stripped,
    each line as its last carriage-return rewrite left it.
    """
    lines = []
    for line in ANSI.sub("", output).split("\n"):
        parts = [part for part in line.split("\r") if part.strip()]
        if parts:
            lines.append(parts[-1].rstrip())
    return lines


def frames(output: str) -> list[str]:
    """
    Every state the bar's line went through (each rewrite).
    """
    return [part.rstrip() for part in ANSI.sub("", output).replace("\n", "\r").split("\r") if part.strip()]


class Command(ProcessProtocol):
    """
    A C{twistedsse} command: its output and how it ended (C{ended} fires
    with the exit code; C{SIGKILL} after L{RUN_TIMEOUT}).
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()
        self.timer: Any = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        value = reason.value
        self.ended.callback(value.exitCode if value.exitCode is not None else -(value.signal or 0))

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


class CLITests(TwistdMixin, TestCase):
    timeout = 120

    @inlineCallbacks
    def serve(self, *options: str) -> Any:
        process, protocol = self.startTwistd(*options)
        port = yield protocol.listening
        self.base = f"http://127.0.0.1:{port}"
        return port

    def cli(self, *args: str, pty: bool = False, env: dict[str, str] | None = None) -> Command:
        """
        Start C{python -m twistedsse ARGS} (in a fresh directory).
        """
        command = Command()
        cwd = Path(self.mktemp()).absolute()
        cwd.mkdir(parents=True)
        self.cwd = cwd
        argv = [sys.executable, "-m", "twistedsse", *args]
        transport = reactor.spawnProcess(
            command, sys.executable, argv, env=childEnv(**(env or {})), path=str(cwd), usePTY=pty
        )
        command.transport = transport
        command.timer = reactor.callLater(RUN_TIMEOUT, transport.signalProcess, "KILL")

        def stop() -> Deferred[int | None]:
            if not command.ended.called:
                transport.signalProcess("KILL")
            return command.ended

        self.addCleanup(stop)
        return command

    def jobJSON(self, jobID: str) -> Deferred[Any]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        return treq.get(f"{self.base}/renders/{jobID}", pool=pool).addCallback(treq.json_content)

    @inlineCallbacks
    def test_renderPlain(self) -> None:
        """
        Without a terminal, C{render} prints one line per event (created,
        each progress as a percent, complete), downloads the output to
        C{-o} and says so, and exits 0.
        """
        yield self.serve()
        command = self.cli(
            # (delay: the first line comes once the command is watching.)
            "render", "ticks", "--param", "count=10", "--param", "interval=0.02", "--param", "delay=1", "--params",
            '{"output": "the video", "count": 99}', "-o", "out.mp4", "--url", self.base,
        )  # fmt: skip
        code = yield command.ended
        self.assertEqual(code, 0, command.err)
        lines = command.lines
        created = re.fullmatch(r"created (\S+) ticks", lines[0])
        assert created is not None, lines
        jobID = created.group(1)
        self.assertEqual(lines[1:11], [f"progress {jobID} percent={10.0 * i:.1f}" for i in range(1, 11)])
        self.assertTrue(lines[11].startswith(f"complete {jobID} {{"), lines)
        self.assertEqual(json.loads(lines[11].split(" ", 2)[2])["size"], 9)
        self.assertEqual(lines[12:], ["saved out.mp4 9"])
        self.assertEqual((self.cwd / "out.mp4").read_bytes(), b"the video")
        self.assertEqual(sorted(p.name for p in self.cwd.iterdir()), ["out.mp4"])

    @inlineCallbacks
    def test_renderFails(self) -> None:
        """
        A render that fails: a C{failed} line with the server's data, exit
        1, nothing saved.
        """
        yield self.serve()
        command = self.cli("render", "ticks", "--param", "count=2", "--param", "exit=3", "--url", self.base)
        self.assertEqual((yield command.ended), 1, command.err)
        last = command.lines[-1].split(" ", 2)
        self.assertEqual(last[0], "failed")
        self.assertEqual(json.loads(last[2])["exit_code"], 3)
        self.assertEqual(list(self.cwd.iterdir()), [])

    @inlineCallbacks
    def test_renderCancelled(self) -> None:
        """
        A render cancelled by C{twistedsse cancel ID} (which prints the job
        and exits 0): C{render} prints C{cancelled} and exits 3.
        """
        yield self.serve()
        command = self.cli("render", "ticks", "--param", "count=5000", "--param", "interval=0.02", "--url", self.base)
        yield whenTrue(reactor, lambda: len(command.lines) >= 2, 30, lambda: f"two lines: {command.out!r} {command.err!r}")
        jobID = command.lines[0].split()[1]
        cancel = self.cli("cancel", jobID, "--url", self.base)
        self.assertEqual((yield cancel.ended), 0, cancel.err)
        self.assertEqual(json.loads(cancel.out)["id"], jobID)
        self.assertEqual((yield command.ended), 3, command.err)
        self.assertEqual(command.lines[-1].split()[:2], ["cancelled", jobID])
        status = self.cli("status", jobID, "--url", self.base)
        self.assertEqual((yield status.ended), 0, status.err)
        self.assertEqual(json.loads(status.out)["state"], "cancelled")

    @inlineCallbacks
    def test_usageErrors(self) -> None:
        """
        Wrong arguments exit 2 with the reason on stderr, before anything
        is sent.
        """
        for args, reason in [
            (["render"], b"Wrong number of arguments"),
            (["render", "ticks", "--param", "nokey"], b"expected KEY=VALUE"),
            (["render", "ticks", "--params", "[1]"], b"expected a JSON object"),
            (["render", "ticks", "--url", "ftp://x"], b"--url"),
            (["status", "x", "--token-file", "/nonexistent"], b"--token-file"),
            (["status", "x", "--bogus"], b"bogus"),
            (["frobnicate"], b"unknown command"),
        ]:
            command = self.cli(*args)
            self.assertEqual((yield command.ended), 2, args)
            self.assertIn(reason, command.err.splitlines()[-1], args)
            self.assertEqual(command.out, b"")

    @inlineCallbacks
    def test_errorsExit4(self) -> None:
        """
        An API error (an unknown job) and an unreachable server each exit 4
        with one clear stderr line.
        """
        port = yield self.serve()
        command = self.cli("status", "nope", "--url", self.base)
        self.assertEqual((yield command.ended), 4)
        self.assertEqual(
            command.err.decode().splitlines(),
            ["twistedsse: the server answered 404 unknown_job: no render with id 'nope'"],
        )
        command = self.cli("render", "nope", "--url", self.base)
        self.assertEqual((yield command.ended), 4)
        self.assertIn("422 unknown_renderer", command.err.decode())
        # A port nothing listens on: this test's server's, once it is gone.
        self.process.signalProcess("TERM")  # type: ignore[attr-defined]
        yield self.protocol.ended  # type: ignore[attr-defined]
        command = self.cli("status", "x", "--url", f"http://127.0.0.1:{port}")
        self.assertEqual((yield command.ended), 4)
        self.assertEqual(len(command.err.splitlines()), 1, command.err)
        self.assertIn(f"cannot reach http://127.0.0.1:{port}: Connection was refused", command.err.decode())

    def startTwistd(self, *options: str) -> tuple[Any, Any]:
        self.process, self.protocol = super().startTwistd(*options)
        return self.process, self.protocol

    @inlineCallbacks
    def test_watch(self) -> None:
        """
        C{watch EVENTS_URL} prints each event as C{EVENT ID DATA} and exits
        with the render's outcome: 0 for complete (a relative URL, against
        --url), 1 for failed (an absolute URL).
        """
        yield self.serve()
        pool = HTTPConnectionPool(reactor, persistent=False)
        for count, code, last in [(3, 0, "complete"), (2, 1, "failed")]:
            # The render starts once the command watches (a late watcher
            # of an ended render gets only its last two events).
            start = os.path.abspath(self.mktemp())
            params = {"count": count, "exit": code, "start_file": start}
            job = yield treq.post(
                f"{self.base}/renders", json={"renderer": "ticks", "params": params}, pool=pool
            ).addCallback(treq.json_content)
            url = job["events_url"] if code == 0 else self.base + job["events_url"]
            command = self.cli("watch", url, "--url", self.base)
            yield self.whenWatched(pool)
            Path(start).touch()
            self.assertEqual((yield command.ended), code, command.err)
            lines = [line.split(" ", 2) for line in command.lines]
            self.assertEqual([(e, i) for e, i, _ in lines], [*[("progress", str(n)) for n in range(1, count + 1)], (last, str(count + 1))])
            self.assertEqual(json.loads(lines[0][2])["i"], 1)

    @inlineCallbacks
    def whenWatched(self, pool: HTTPConnectionPool) -> Any:
        """
        Wait (up to 30 s) until the server has a subscriber.
        """
        for _ in range(300):
            health = yield treq.get(f"{self.base}/healthz", pool=pool).addCallback(treq.json_content)
            if health["subscribers"] >= 1:
                return
            yield deferLater(reactor, 0.1)
        self.fail(f"no subscriber: {health}")

    @inlineCallbacks
    def test_token(self) -> None:
        """
        Against a server that needs a token: without one, 401 and exit 4;
        with C{--token-file}, the render runs; the token is never printed.
        """
        token = "a-secret-token-" + "x" * 20
        tokens = Path(self.mktemp()).absolute()
        tokens.write_text(f"# operators\n{token}\n")
        yield self.serve("--auth-token-file", str(tokens))
        command = self.cli("render", "ticks", "--param", "count=2", "--url", self.base)
        self.assertEqual((yield command.ended), 4)
        self.assertIn("401 unauthorized", command.err.decode())
        command = self.cli("render", "ticks", "--param", "count=2", "--url", self.base, "--token-file", str(tokens))
        self.assertEqual((yield command.ended), 0, command.err)
        self.assertEqual(command.lines[-1].split()[0], "complete")
        for output in (command.out, command.err):
            self.assertNotIn(token.encode(), output)

    @inlineCallbacks
    def test_interruptLeavesTheRenderRunning(self) -> None:
        """
        Ctrl-C (SIGINT) during C{render}: it stops watching, says how to
        cancel the render, and exits 130; the render goes on.
        """
        yield self.serve()
        command = self.cli("render", "ticks", "--param", "count=5000", "--param", "interval=0.02", "--url", self.base)
        yield whenTrue(reactor, lambda: len(command.lines) >= 2, 30, lambda: f"two lines: {command.out!r} {command.err!r}")
        jobID = command.lines[0].split()[1]
        command.transport.signalProcess("INT")  # type: ignore[union-attr]
        self.assertEqual((yield command.ended), 130, command.err)
        self.assertIn(f"render {jobID} goes on (twistedsse cancel {jobID} stops it)", command.err.decode())
        job = yield self.jobJSON(jobID)
        self.assertEqual(job["state"], "running")
        cancel = self.cli("cancel", jobID, "--url", self.base)
        self.assertEqual((yield cancel.ended), 0, cancel.err)

    @inlineCallbacks
    def test_progressBarOnATerminal(self) -> None:
        """
        On a real pseudo-terminal, C{render} draws a live bar: a percent, a
        speed and an ETA as the render runs, 100 % at the end, then
        C{complete} and the saved file.
        """
        yield self.serve()
        command = self.cli(
            "render", "ticks", "--param", "count=40", "--param", "interval=0.05", "--param", "delay=1",
            "--param", "output=video",
            "-o", "out.mp4", "--url", self.base, pty=True, env={"TERM": "xterm-256color", "COLUMNS": "100"},
        )  # fmt: skip
        code = yield command.ended
        output = command.out.decode()
        self.assertEqual(code, 0, output)
        self.assertIn("\x1b[", output, "no terminal codes: not drawn as a bar")
        states = [f for f in frames(output) if f.startswith("ticks ")]
        running = [f for f in states if re.search(r" [1-9]\d?% .*%/s ETA 0:\d\d:\d\d ", f)]
        self.assertTrue(running, states)
        self.assertRegex(states[-1], r"^ticks ━+ 100% +ETA 0:00:00 0:\d\d:\d\d$")
        shown = screen(output)
        self.assertEqual(shown[-2:], ["complete", "saved out.mp4 (5 bytes)"])
        self.assertTrue(all(len(f) <= 100 for f in states))
        self.assertEqual((self.cwd / "out.mp4").read_bytes(), b"video")

    @inlineCallbacks
    def test_serveSubcommand(self) -> None:
        """
        C{twistedsse serve [options]} runs the service, as the bare
        C{twistedsse [options]} does.
        """
        argv = [sys.executable, "-m", "twistedsse", "serve", "--listen", "tcp:0:interface=127.0.0.1",
                "--output-dir", os.path.abspath(self.mktemp())]  # fmt: skip
        process, protocol = spawnService(argv, childEnv())
        self.addCleanup(protocol.kill)
        port = yield protocol.listening
        pool = HTTPConnectionPool(reactor, persistent=False)
        health = yield treq.get(f"http://127.0.0.1:{port}/healthz", pool=pool).addCallback(treq.json_content)
        self.assertEqual(health["status"], "ok")
        process.signalProcess("TERM")
        yield protocol.ended



class RenderClientTests(ServerMixin, TestCase):
    """
    L{RenderClient} against a real server in this process, on 127.0.0.1.
    """

    timeout = 120

    def client(self) -> RenderClient:
        return RenderClient(self.base, reactor=reactor, pool=self.pool)

    @inlineCallbacks
    def test_cardEndToEnd(self) -> None:
        """
        A real card render (ffmpeg): created, followed to its end through
        the event stream, and its MP4 downloaded whole.
        """
        self.startServer()
        client = self.client()
        job = yield client.create("card", {"duration": 1, "size": "160x90", "fps": 10})
        events: list[Any] = []
        ended = yield client.whenFinished(job.id, events.append)
        self.assertEqual(ended.state, "succeeded")
        self.assertEqual(events[-1].event, "complete")
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        size = yield client.download(job.id, target)
        data = target.read_bytes()
        self.assertEqual((size, len(data)), (ended.result["size"], ended.result["size"]))
        self.assertEqual(data[4:8], b"ftyp")

    @inlineCallbacks
    def test_errorsAndCancel(self) -> None:
        """
        Typed errors from the real server: an unknown job, invalid params;
        cancelling a running render, then again (L{JobFinished}).
        """
        self.startServer([ticker()])
        client = self.client()
        yield self.assertFailure(client.status("nope"), UnknownJob)
        error = yield self.assertFailure(client.create("card", {"duration": 99}), InvalidParams)
        self.assertEqual((error.code, error.status), ("invalid_params", 422))
        job = yield client.create("ticks", {"count": 5000})
        cancelled = client.whenFinished(job.id)
        yield client.cancel(job.id)
        self.assertEqual((yield cancelled).state, "cancelled")
        yield self.assertFailure(client.cancel(job.id), JobFinished)

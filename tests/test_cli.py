"""
The C{twistedsse} command's parts that need no process: its options, the
plain lines, the progress bar drawn on a L{Clock}, the exit codes for
errors, and the dispatch between C{serve} and the client commands. (The
commands themselves run against a real server in
tests/integration/test_cli.py.)
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import __main__ as entry
from twistedsse import _cli
from twistedsse._cli import (
    EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, RenderOptions, StatusOptions, WatchOptions,
    describeError, parseParam, runCommand,
)  # fmt: skip
from twistedsse._cliview import BarView, IRenderView, PlainView, percentOf
from twistedsse._frames import Event
from twistedsse.client import JobFinished, QueueFull, UnexpectedResponse
from zope.interface.verify import verifyObject


class ParamTests(SynchronousTestCase):
    def test_values(self) -> None:
        """
        A value that parses as JSON is that value; anything else (NaN
        included, which is no JSON) is the string as written; the first
        C{=} splits.
        """
        for spec, expected in [
            ("duration=3", ("duration", 3)), ("fps=29.97", ("fps", 29.97)), ("loud=true", ("loud", True)),
            ("x=null", ("x", None)), ("size=[1, 2]", ("size", [1, 2])), ('title="5"', ("title", "5")),
            ("title=Hello world", ("title", "Hello world")), ("t=a=b", ("t", "a=b")), ("t=", ("t", "")),
            ("n=NaN", ("n", "NaN")), ("n=Infinity", ("n", "Infinity")), ("c=#1e293b", ("c", "#1e293b")),
        ]:  # fmt: skip
            self.assertEqual(parseParam(spec), expected, spec)

    def test_refused(self) -> None:
        """
        No C{=}, or no key: a usage error naming the argument.
        """
        for spec in ("duration", "=3", ""):
            with self.assertRaises(usage.UsageError) as raised:
                parseParam(spec)
            self.assertIn(repr(spec), str(raised.exception))


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> RenderOptions:
        options = RenderOptions()
        options.parseOptions(list(argv))
        return options

    def test_paramsMerged(self) -> None:
        """
        C{--params} is the base; each C{--param} overrides its key; options
        may come after the renderer.
        """
        options = self.parse("card", "--params", '{"duration": 9, "title": "a"}', "--param", "duration=3", "-o", "x.mp4")
        self.assertEqual(options["renderer"], "card")
        self.assertEqual(options["parsed-params"], {"duration": 3, "title": "a"})
        self.assertEqual((options["output"], options["url"], options["token"]), ("x.mp4", "http://127.0.0.1:8080", None))

    def test_usageErrors(self) -> None:
        """
        Each mistake is a usage error that says what is wrong.
        """
        for argv, reason in [
            ([], "Wrong number of arguments"),
            (["a", "b"], "Wrong number of arguments"),
            (["card", "--params", "{"], "--params: not JSON"),
            (["card", "--params", "[]"], "expected a JSON object"),
            (["card", "--url", "localhost:8080"], "--url"),
            (["card", "--url", "http://"], "--url"),
            (["card", "--nope"], "nope"),
            (["card", "--token-file", "/nonexistent/tokens"], "--token-file"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                self.parse(*argv)
            self.assertIn(reason, str(raised.exception), argv)

    def test_tokenFile(self) -> None:
        """
        The first token of C{--token-file} (comments and blank lines
        skipped), as the server reads its own.
        """
        path = Path(self.mktemp())
        path.write_text("# ours\n\n  first-token \nsecond\n")
        options = StatusOptions()
        options.parseOptions(["ID", "--token-file", str(path), "--url", "https://example.com/sse/"])
        self.assertEqual((options["id"], options["token"]), ("ID", "first-token"))
        self.assertNotIn("first-token", repr(options.client(Clock())))

    def test_watch(self) -> None:
        """
        C{watch} takes the events URL as its argument.
        """
        options = WatchOptions()
        options.parseOptions(["/renders/x/events"])
        self.assertEqual(options["events-url"], "/renders/x/events")


def progress(data: object, name: str = "progress", id: str = "1") -> Event:
    return Event(json.dumps(data), event=name, id=id)


class PlainViewTests(SynchronousTestCase):
    def test_lines(self) -> None:
        """
        One line per event: progress as a percent (from C{percent} or a
        C{progress} fraction) with the renderer's speed and ETA if given;
        other events with their data on one line.
        """
        out = io.StringIO()
        view = PlainView(out)
        verifyObject(IRenderView, view)
        view.created("J", "card")
        view.event("J", progress({"percent": 12.5, "speed": 2.1, "eta": 3}))
        view.event("J", progress({"progress": 0.5}))
        view.event("J", progress({"note": "no number"}))
        view.event("J", Event("line one\nline two \x1b[2J\x07", event="retrying", id="4"))
        view.event("J", progress({"size": 10}, "complete"))
        view.saved("out.mp4", 10)
        view.stop()
        self.assertEqual(out.getvalue().splitlines(), [
            "created J card",
            "progress J percent=12.5 speed=2.1 eta=3",
            "progress J percent=50.0",
            'progress J {"note": "no number"}',
            "retrying J line one\\nline two \\x1b[2J\\x07",
            'complete J {"size": 10}',
            "saved out.mp4 10",
        ])  # fmt: skip

    def test_percent(self) -> None:
        """
        The percent, clamped to 0-100; booleans and strings are no number.
        """
        for data, expected in [({"percent": 150}, 100.0), ({"progress": -1}, 0.0), ({"percent": True}, None),
                               ({"progress": "0.5"}, None), ({"percent": 5, "progress": 0.9}, 5.0)]:  # fmt: skip
            self.assertEqual(percentOf(data), expected, data)


class BarViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out = io.StringIO()
        console = Console(file=self.out, force_terminal=True, width=100, color_system=None)
        self.view = BarView(console, self.clock)
        verifyObject(IRenderView, self.view)

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.out.getvalue())

    def lastFrame(self) -> str:
        return self.text().replace("\n", "\r").split("\r")[-1]

    def test_barToCompletion(self) -> None:
        """
        The bar shows the percent, the renderer's speed and ETA; between
        events it is redrawn every 0.1 s of the clock; C{complete} takes it to
        100 % and stops the redraws.
        """
        self.view.created("J", "card")
        self.clock.advance(1)
        self.view.event("J", progress({"percent": 40.0, "speed": 2.5, "eta": 75}))
        frame = self.lastFrame()
        self.assertRegex(frame, r"^card ━+╸?━* +40% 2\.50x ETA 0:01:15 0:00:01")
        before = len(self.out.getvalue())
        self.clock.advance(0.1)
        self.assertGreater(len(self.out.getvalue()), before)
        self.view.event("J", progress({"percent": 99.9}, "progress"))
        self.view.event("J", progress({"size": 5}, "complete"))
        self.assertIn(" 100% ", self.text())
        self.assertEqual(self.text().rstrip().splitlines()[-1], "complete")
        self.view.saved("out.mp4", 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.text().rstrip().splitlines()[-1], "saved out.mp4 (5 bytes)")

    def test_estimatesWithoutTheRenderersOwn(self) -> None:
        """
        Without C{speed} or C{eta} in the events, the bar estimates both from
        the percent's pace.
        """
        self.view.created("J", "ticks")
        for second in range(1, 5):
            self.clock.advance(1)
            self.view.event("J", progress({"progress": second / 10}))
        self.assertRegex(self.lastFrame(), r" 40% 10\.0 %/s ETA 0:00:06 ")
        self.view.event("J", progress({"message": "exit 1 [not markup]"}, "failed"))
        self.assertEqual(self.text().rstrip().splitlines()[-1], "failed: exit 1 [not markup]")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopBeforeStart(self) -> None:
        """
        Stopping a view that never started (the create failed) is harmless.
        """
        self.view.stop()
        self.assertEqual(self.out.getvalue(), "")


class ErrorTests(SynchronousTestCase):
    def test_describe(self) -> None:
        """
        API errors (with their retry hint) and connection errors get one
        line each; anything else is no error of the server's (a bug).
        """
        url = "http://127.0.0.1:8080"
        self.assertEqual(
            describeError(QueueFull("queue_full", "the queue is full", 429, 5.0), url),
            "twistedsse: the server answered 429 queue_full: the queue is full (retry after 5 s)",
        )
        self.assertEqual(
            describeError(JobFinished("job_finished", "it ended", 409), url),
            "twistedsse: the server answered 409 job_finished: it ended",
        )
        self.assertIn("unexpected_response", describeError(UnexpectedResponse("unexpected_response", "x", 502), url) or "")
        self.assertEqual(
            describeError(ConnectionRefusedError("111: Connection refused"), url),
            "twistedsse: cannot reach http://127.0.0.1:8080: Connection was refused by other side: 111: Connection refused.",
        )
        self.assertIsNone(describeError(KeyError("bug"), url))


class FakeReactor(Clock):
    """
    A clock that records shutdown triggers, so a test can play Ctrl-C.
    """

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[object] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: object) -> None:
        self.triggers.append((phase, event, f))


class Scripted:
    """
    A command whose work is a given coroutine function.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.interruptions = 0

    def interrupted(self) -> None:
        self.interruptions += 1


class RunTests(SynchronousTestCase):
    def test_exitCodeFromTheCommand(self) -> None:
        """
        A command that cannot reach its server ends with L{EXIT_ERROR} and one
        stderr line; Ctrl-C afterwards changes nothing.
        """
        reactor = FakeReactor()
        err = io.StringIO()

        async def refused(reactor: object) -> int:
            raise ConnectionRefusedError()

        command = Scripted(refused)
        finished = runCommand(reactor, command, "http://127.0.0.1:1", err)  # type: ignore[arg-type]
        self.assertEqual(self.failureResultOf(finished, SystemExit).value.code, EXIT_ERROR)
        self.assertEqual(err.getvalue(), "twistedsse: cannot reach http://127.0.0.1:1: Connection was refused by other side.\n")
        [(phase, event, interrupted)] = reactor.triggers
        interrupted()  # type: ignore[operator]
        self.assertEqual(command.interruptions, 0)

    def test_interrupted(self) -> None:
        """
        Ctrl-C (the reactor shutting down while the command runs) ends it
        with L{EXIT_INTERRUPTED} and cancels the work.
        """
        from twisted.internet.defer import Deferred

        reactor = FakeReactor()
        pending: Deferred[int] = Deferred()

        async def waits(reactor: object) -> int:
            return await pending

        command = Scripted(waits)
        finished = runCommand(reactor, command, "http://x", io.StringIO())  # type: ignore[arg-type]
        self.assertNoResult(finished)
        [(phase, event, interrupted)] = reactor.triggers
        self.assertEqual((phase, event), ("before", "shutdown"))
        interrupted()  # type: ignore[operator]
        self.assertEqual(self.failureResultOf(finished, SystemExit).value.code, EXIT_INTERRUPTED)
        self.assertEqual(command.interruptions, 1)
        self.assertTrue(pending.called, "the work was not cancelled")


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.err = io.StringIO()
        self.out = io.StringIO()
        self.patch(_cli.sys, "stderr", self.err)
        self.patch(_cli.sys, "stdout", self.out)

    def exitCode(self, *argv: str) -> object:
        with self.assertRaises(SystemExit) as raised:
            entry.main(list(argv))
        return raised.exception.code

    def test_clientCommands(self) -> None:
        """
        A first argument that is no option is a client command: unknown ones
        and usage errors exit 2 before any reactor runs; C{help} lists the
        commands.
        """
        self.assertEqual(self.exitCode("frobnicate"), EXIT_USAGE)
        self.assertIn("unknown command 'frobnicate'", self.err.getvalue())
        self.assertEqual(self.exitCode("render"), EXIT_USAGE)
        self.assertIn("twistedsse render: Wrong number of arguments", self.err.getvalue())
        self.assertEqual(self.exitCode("help"), 0)
        self.assertIn("twistedsse watch EVENTS-URL", self.out.getvalue())

    def test_serve(self) -> None:
        """
        C{serve OPTIONS} and a bare C{OPTIONS} both parse the service's
        options (a usage error shows them, exit 2).
        """
        self.patch(entry.sys, "stderr", self.err)
        self.assertEqual(self.exitCode("serve", "--max-renders", "0"), 2)
        self.assertIn("--max-renders", self.err.getvalue())
        self.assertEqual(self.exitCode("--max-renders", "0"), 2)
        self.assertIn("--max-renders", self.err.getvalue())

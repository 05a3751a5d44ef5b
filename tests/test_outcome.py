"""
L{twistedsse._outcome}: from how a render ended to what its clients are
told, table-driven (pure: no clock, no process, no broker).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twistedsse._errors import RenderProtocolError
from twistedsse._job import JobState
from twistedsse._outcome import (
    CANCELLED_QUEUED,
    OverShare,
    clientReason,
    completed,
    interrupted,
    ofExit,
    outputUnusable,
    scrubPaths,
    spawnFailed,
    storageFailed,
)
from twistedsse._render import ExitStatus

OUT = "/srv/twistedsse/outputs"


def failure(message: str, reason: str, code: int | None = None, signal: int | None = None,
            tail: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"message": message, "reason": reason, "exit_code": code, "signal": signal, "stderr_tail": tail or []}


class OfExitTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        Each way a process can end maps to one state, one event name and
        one payload; a clean exit 0 is left to the output checks (C{None}).
        """
        cases: list[tuple[ExitStatus, Any]] = [
            (ExitStatus(0, None), None),
            (
                ExitStatus(None, 9, ("late",), stopReason="cancel"),
                (JobState.CANCELLED, "cancelled", {"message": "cancelled by request"}),
            ),
            (
                ExitStatus(None, 15, ("bye",), stopReason="shutdown"),
                (JobState.FAILED, "failed",
                 failure("interrupted: the server shut down", "interrupted", None, 15, ["bye"])),
            ),
            (
                ExitStatus(None, 15, (), stopReason="timeout"),
                (JobState.FAILED, "failed", failure("timed out after 60 s", "timeout", None, 15)),
            ),
            (
                ExitStatus(0, None, (), stopReason="timeout"),
                (JobState.FAILED, "failed", failure("timed out after 60 s", "timeout", 0)),
            ),
            (
                ExitStatus(None, 9, (), protocolError="line 2 is not a JSON object"),
                (JobState.FAILED, "failed", failure(
                    "the renderer broke its output protocol: line 2 is not a JSON object", "protocol", None, 9)),
            ),
            (
                ExitStatus(None, 11, ("x",)),
                (JobState.FAILED, "failed", failure("the renderer was killed by signal 11", "signal", None, 11, ["x"])),
            ),
            (
                ExitStatus(3, None, ("working", "bad thing")),
                (JobState.FAILED, "failed",
                 failure("the renderer exited with code 3: bad thing", "exit", 3, None, ["working", "bad thing"])),
            ),
            (
                ExitStatus(1, None, ()),
                (JobState.FAILED, "failed", failure("the renderer exited with code 1: no message on stderr", "exit", 1)),
            ),
        ]  # fmt: skip
        for status, expected in cases:
            outcome = ofExit(status, timeout=60, outputDir=OUT)
            got = None if outcome is None else (outcome.state, outcome.event, dict(outcome.payload))
            self.assertEqual(got, expected, status)

    def test_fractionalTimeout(self) -> None:
        """
        The timeout is named as given, without a trailing C{.0}.
        """
        outcome = ofExit(ExitStatus(None, 15, stopReason="timeout"), timeout=2.5, outputDir=OUT)
        assert outcome is not None
        self.assertEqual(outcome.payload["message"], "timed out after 2.5 s")

    def test_outputDirScrubbedFromStderr(self) -> None:
        """
        The output directory's path never reaches a client: in the stderr
        tail and in the message quoting its last line, it reads
        C{<output>}.
        """
        status = ExitStatus(1, None, ("Opening x", f"{OUT}/abc.mp4: No space left on device"))
        outcome = ofExit(status, timeout=60, outputDir=OUT)
        assert outcome is not None
        self.assertEqual(outcome.payload["stderr_tail"], ["Opening x", "<output>/abc.mp4: No space left on device"])
        self.assertEqual(
            outcome.payload["message"], "the renderer exited with code 1: <output>/abc.mp4: No space left on device"
        )

    def test_scrubLeavesOtherStatusesAlone(self) -> None:
        """
        A status whose stderr names no output path is returned as is.
        """
        status = ExitStatus(1, None, ("nothing here",))
        self.assertIs(scrubPaths(status, OUT), status)


class OtherOutcomesTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        The outcomes decided without a process exit, or after exit 0.
        """
        ok = ExitStatus(0, None, ("done",))
        cases = [
            (CANCELLED_QUEUED, (JobState.CANCELLED, "cancelled", {"message": "cancelled before it started"})),
            (interrupted(), (JobState.FAILED, "failed", failure("interrupted: the server shut down", "interrupted"))),
            (
                spawnFailed(FileNotFoundError(2, "No such file or directory", "/secret/bin/render")),
                (JobState.FAILED, "failed",
                 failure("could not start the renderer (No such file or directory)", "spawn")),
            ),
            (
                storageFailed("the output filesystem is nearly full"),
                (JobState.FAILED, "failed", failure("the output filesystem is nearly full", "storage")),
            ),
            (
                outputUnusable(OverShare("900 bytes, over its share"), ok),
                (JobState.FAILED, "failed",
                 failure("the render's output is unusable (900 bytes, over its share)", "output", 0, None, ["done"])),
            ),
            (
                completed(size=7, outputURL="/renders/j/output", mediaDuration=2.0, startedAt=1.0, now=4.12345),
                (JobState.SUCCEEDED, "complete",
                 {"output_url": "/renders/j/output", "duration": 2.0, "size": 7, "elapsed": 3.123}),
            ),
            (
                completed(size=None, outputURL="/renders/j/output", mediaDuration=None, startedAt=1.0, now=1.0),
                (JobState.SUCCEEDED, "complete", {"output_url": None, "duration": None, "size": None, "elapsed": 0.0}),
            ),
        ]  # fmt: skip
        for outcome, expected in cases:
            self.assertEqual((outcome.state, outcome.event, dict(outcome.payload)), expected)

    def test_clientReason(self) -> None:
        """
        A client learns the kind of error, never a path: an C{OSError}'s
        strerror, our own errors' text, otherwise the exception's type.
        """
        cases: list[tuple[Exception, str]] = [
            (PermissionError(13, "Permission denied", "/srv/secret"), "Permission denied"),
            (OSError("/srv/secret is odd"), "OSError"),
            (RenderProtocolError("line 1 is over 64 KiB"), "line 1 is over 64 KiB"),
            (OverShare("9 bytes, over its share"), "9 bytes, over its share"),
            (ValueError("/srv/secret"), "ValueError"),
        ]
        for error, expected in cases:
            self.assertEqual(clientReason(error), expected)

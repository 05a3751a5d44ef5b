"""
L{twistedsse._logformat}: the service's log lines, text or JSON (one
object per line), and the lowest level kept.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._logformat import logFormat, logLevel, logObserver


class LogObserverTests(SynchronousTestCase):
    def log(self, format: str, level: str = "info") -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        return Logger(namespace="twistedsse.test", observer=LogPublisher(logObserver(out, format, level))), out

    def test_json(self) -> None:
        """
        JSON: one object per line (no RS separator), the event's fields as
        keys, the message as text in C{log_text}; a failure's traceback
        stays inside its line.
        """
        log, out = self.log("json")
        log.info("render {jobID} started (pid {pid})", jobID="j1", pid=42)
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("render {jobID} failed", jobID="j2")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertNotIn("\x1e", out.getvalue())
        first, second = (json.loads(line) for line in lines)
        self.assertEqual((first["jobID"], first["pid"]), ("j1", 42))
        self.assertEqual(first["log_text"], "render j1 started (pid 42)")
        self.assertEqual(first["log_namespace"], "twistedsse.test")
        self.assertEqual(first["log_level"]["name"], "info")
        self.assertEqual(second["jobID"], "j2")
        self.assertIn("ZeroDivisionError", json.dumps(second["log_failure"]))

    def test_text(self) -> None:
        """
        Text: Twisted's usual lines.
        """
        log, out = self.log("text")
        log.info("render {jobID} started", jobID="j1")
        self.assertRegex(out.getvalue(), r"^\S+ \[twistedsse\.test#info\] render j1 started\n$")

    def test_level(self) -> None:
        """
        Events below the level are dropped: debug is not logged by default.
        """
        for level, kept in [("info", ["i", "w"]), ("debug", ["d", "i", "w"]), ("warn", ["w"])]:
            log, out = self.log("json", level)
            log.debug("d")
            log.info("i")
            log.warn("w")
            self.assertEqual([json.loads(line)["log_text"] for line in out.getvalue().splitlines()], kept, level)

    def test_coerce(self) -> None:
        """
        The option values are checked, and a wrong one says which are right.
        """
        self.assertEqual((logFormat("json"), logLevel("debug")), ("json", "debug"))
        with self.assertRaises(ValueError) as caught:
            logFormat("xml")
        self.assertIn("one of text, json", str(caught.exception))
        with self.assertRaises(ValueError):
            logLevel("verbose")

"""
The real thing as an operator runs it: C{twistd -n twistedsse} in its own
process, then SIGTERM while a render streams.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from ._support import TICKER, stream

TWISTD = str(Path(sys.executable).with_name("twistd"))


class _Twistd(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        found = re.search(rb"Site starting on (\d+)", self.output)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)


class TwistdTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_sigtermEndsStreamsAndChildren(self) -> None:
        """
        Under SIGTERM, twistd gives every open stream a final C{failed}
        ("interrupted") frame, ends the render process, removes its temporary
        output directory and exits promptly, leaving no process behind.
        """
        if not os.path.exists(TWISTD):
            self.fail(f"no twistd next to {sys.executable}")
        protocol = _Twistd()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
        process = reactor.spawnProcess(
            protocol,
            TWISTD,
            [
                TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "twistedsse",
                "--listen", "tcp:0:interface=127.0.0.1",
                "--renderer", f"ticks={sys.executable} -u {TICKER}",
                "--kill-grace", "2",
            ],
            env=env,
        )  # fmt: skip
        self.addCleanup(lambda: protocol.ended if protocol.ended.called else _kill(process, protocol))
        port = yield protocol.listening
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port}/render-stream?renderer=ticks&params=" + "%7B%22count%22%3A2000%7D"
        events, done = stream(url, pool)
        while len(events) < 5:
            yield deferLater(reactor, 0.02, lambda: None)
        child = json.loads(events[-1].data)
        self.assertTrue(Path(child["cwd"]).is_dir())
        started = reactor.seconds()
        process.signalProcess("TERM")
        yield done
        reason = yield protocol.ended
        elapsed = reactor.seconds() - started
        response, *received = events
        self.assertEqual(response.code, 200)
        last = received[-1]
        self.assertEqual(last.event, "failed")
        self.assertEqual(json.loads(last.data)["reason"], "interrupted")
        # twistd ends itself with the signal that stopped it (systemd counts
        # SIGTERM as a clean stop); anything else is a failure.
        self.assertIn((reason.exitCode, reason.signal), [(0, None), (None, 15)], protocol.output.decode(errors="replace"))
        self.assertLess(elapsed, 10)
        with self.assertRaises(ProcessLookupError):
            os.kill(child["pid"], 0)
        self.assertFalse(Path(child["cwd"]).exists(), "temporary output directory left behind")


def _kill(process: Any, protocol: _Twistd) -> Deferred[Any]:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass
    return protocol.ended

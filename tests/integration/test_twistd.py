"""
The real thing as an operator runs it: C{twistd -n twistedsse} in its own
process, then SIGTERM while a render streams.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests._support.launcher import TwistdMixin
from tests._support.waiting import whenTrue
from tests._support.server import stream

class TwistdTests(TwistdMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_finishedRendersSurviveARestart(self) -> None:
        """
        With --state-dir, a finished render keeps its status, final events
        and output across a restart of twistd, and a render that was running
        at the SIGTERM comes back as failed, "interrupted"; so does one that
        was running when twistd was SIGKILLed.
        """
        import treq

        state = os.path.abspath(self.mktemp())
        pool = HTTPConnectionPool(reactor, persistent=False)

        def post(port: int, params: dict[str, Any]) -> Any:
            return treq.post(
                f"http://127.0.0.1:{port}/renders", json={"renderer": "ticks", "params": params}, pool=pool
            ).addCallback(treq.json_content)

        process, protocol = self.startTwistd("--state-dir", state)
        port = yield protocol.listening
        done = yield post(port, {"count": 3, "interval": 0.01, "output": "the video"})
        events, finished = stream(f"http://127.0.0.1:{port}{done['events_url']}", pool)
        yield finished
        running = yield post(port, {"count": 5000})
        events, finished = stream(f"http://127.0.0.1:{port}{running['events_url']}", pool)
        yield whenTrue(reactor, lambda: len(events) >= 3, 20, "3 events")
        process.signalProcess("TERM")
        yield protocol.ended
        yield finished
        self.assertEqual(events[-1].event, "failed")

        process, protocol = self.startTwistd("--state-dir", state)
        port = yield protocol.listening
        status = yield treq.get(f"http://127.0.0.1:{port}{done['status_url']}", pool=pool).addCallback(treq.json_content)
        self.assertEqual(status["state"], "succeeded")
        output = yield treq.get(f"http://127.0.0.1:{port}{done['output_url']}", pool=pool).addCallback(treq.content)
        self.assertEqual(output, b"the video")
        replay, finished = stream(f"http://127.0.0.1:{port}{done['events_url']}", pool)
        yield finished
        self.assertEqual([e.event for e in replay[1:]], ["progress", "complete"])
        self.assertEqual(json.loads(replay[1].data)["i"], 3)
        status = yield treq.get(f"http://127.0.0.1:{port}{running['status_url']}", pool=pool).addCallback(treq.json_content)
        self.assertEqual((status["state"], status["error"]["reason"]), ("failed", "interrupted"))

        killed = yield post(port, {"count": 5000})
        events, cut = stream(f"http://127.0.0.1:{port}{killed['events_url']}", pool)
        yield whenTrue(reactor, lambda: len(events) >= 3, 20, "3 events")
        process.signalProcess("KILL")
        yield protocol.ended
        # A SIGKILLed server cannot end its streams: the body is cut short.
        yield self.assertFailure(cut, Exception)
        process, protocol = self.startTwistd("--state-dir", state)
        port = yield protocol.listening
        status = yield treq.get(f"http://127.0.0.1:{port}{killed['status_url']}", pool=pool).addCallback(treq.json_content)
        self.assertEqual((status["state"], status["error"]["reason"]), ("failed", "interrupted"))
        process.signalProcess("TERM")
        yield protocol.ended

    @inlineCallbacks
    def test_sigtermEndsStreamsAndChildren(self) -> None:
        """
        Under SIGTERM, twistd gives every open stream a final C{failed}
        ("interrupted") frame, ends the render process, removes its temporary
        output directory and exits promptly, leaving no process behind.
        """
        process, protocol = self.startTwistd()
        port = yield protocol.listening
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port}/render-stream?renderer=ticks&params=" + "%7B%22count%22%3A2000%7D"
        events, done = stream(url, pool)
        yield whenTrue(reactor, lambda: len(events) >= 5, 20, "5 events")
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

"""
The real thing as an operator runs it: C{twistd -n twistedsse} in its own
process, then SIGTERM while a render streams.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from ._support import TICKER, ServiceProcess, stream

TWISTD = str(Path(sys.executable).with_name("twistd"))


def startTwistd(*options: str) -> tuple[Any, ServiceProcess]:
    protocol = ServiceProcess()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    argv = [
        TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "twistedsse",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--renderer", f"ticks={sys.executable} -u {TICKER}",
        "--kill-grace", "2", *options,
    ]  # fmt: skip
    process = reactor.spawnProcess(protocol, TWISTD, argv, env=env)
    return process, protocol


class TwistdTests(TestCase):
    timeout = 60

    def start(self, *options: str) -> Any:
        if not os.path.exists(TWISTD):
            self.fail(f"no twistd next to {sys.executable}")
        process, protocol = startTwistd(*options)
        self.addCleanup(lambda: protocol.ended if protocol.ended.called else _kill(process, protocol))
        return process, protocol

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

        process, protocol = self.start("--state-dir", state)
        port = yield protocol.listening
        done = yield post(port, {"count": 3, "interval": 0.01, "output": "the video"})
        events, finished = stream(f"http://127.0.0.1:{port}{done['events_url']}", pool)
        yield finished
        running = yield post(port, {"count": 5000})
        events, finished = stream(f"http://127.0.0.1:{port}{running['events_url']}", pool)
        while len(events) < 3:
            yield deferLater(reactor, 0.02, lambda: None)
        process.signalProcess("TERM")
        yield protocol.ended
        yield finished
        self.assertEqual(events[-1].event, "failed")

        process, protocol = self.start("--state-dir", state)
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
        while len(events) < 3:
            yield deferLater(reactor, 0.02, lambda: None)
        process.signalProcess("KILL")
        yield protocol.ended
        # A SIGKILLed server cannot end its streams: the body is cut short.
        yield self.assertFailure(cut, Exception)
        process, protocol = self.start("--state-dir", state)
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
        if not os.path.exists(TWISTD):
            self.fail(f"no twistd next to {sys.executable}")
        protocol = ServiceProcess()
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


def _kill(process: Any, protocol: ServiceProcess) -> Deferred[Any]:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass
    return protocol.ended

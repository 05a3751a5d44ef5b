"""
Bounded storage with the real thing: C{twistd -n twistedsse} with
C{--state-dir}, a real SQLite file, real outputs on disk and the real
filesystem's free space.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests._support.launcher import TwistdMixin
from tests._support.server import stream


class StorageTests(TwistdMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_expiryAcrossARestart(self) -> None:
        """
        With C{--state-dir} and C{--expire-after 4}: a render that ended
        answers 410 C{job_expired} about 4 s later (the live timer), and
        one whose expiry passed while twistd was stopped is deleted at the
        restart (rows, output file) and answers 410 too; an id never seen
        is 404.
        """
        import treq

        state = Path(self.mktemp()).absolute()
        pool = HTTPConnectionPool(reactor, persistent=False)
        options = ("--state-dir", str(state), "--expire-after", "4")

        def post(port: int) -> Any:
            return treq.post(
                f"http://127.0.0.1:{port}/renders",
                json={"renderer": "ticks", "params": {"count": 2, "interval": 0.01, "output": "video"}},
                pool=pool,
            ).addCallback(treq.json_content)

        def get(port: int, path: str) -> Any:
            def both(response: Any) -> Any:
                return treq.json_content(response).addCallback(lambda body: (response.code, body))

            return treq.get(f"http://127.0.0.1:{port}{path}", pool=pool).addCallback(both)

        process, protocol = self.startTwistd(*options)
        port = yield protocol.listening
        down = yield post(port)
        events, finished = stream(f"http://127.0.0.1:{port}{down['events_url']}", pool)
        yield finished
        self.assertEqual(events[-1].event, "complete")
        outputs = list((state / "outputs").glob(f"{down['id']}.*"))
        self.assertEqual(len(outputs), 1)
        process.signalProcess("TERM")
        yield protocol.ended
        yield deferLater(reactor, 4.2, lambda: None)

        process, protocol = self.startTwistd(*options)
        port = yield protocol.listening
        code, body = yield get(port, down["status_url"])
        self.assertEqual((code, body["error"]), (410, "job_expired"))
        self.assertFalse(outputs[0].exists())
        db = sqlite3.connect(state / "jobs.sqlite3")
        self.assertEqual(db.execute("select count(*) from jobs where id = ?", (down["id"],)).fetchone(), (0,))
        db.close()
        code, body = yield get(port, "/renders/neverseen")
        self.assertEqual((code, body["error"]), (404, "unknown_job"))

        live = yield post(port)
        events, finished = stream(f"http://127.0.0.1:{port}{live['events_url']}", pool)
        yield finished
        code, _ = yield get(port, live["status_url"])
        self.assertEqual(code, 200)
        deadline = time.monotonic() + 10
        while code == 200 and time.monotonic() < deadline:
            yield deferLater(reactor, 0.1, lambda: None)
            code, body = yield get(port, live["status_url"])
        self.assertEqual((code, body["error"]), (410, "job_expired"))
        code, body = yield get(port, live["output_url"])
        self.assertEqual(code, 410)
        self.assertEqual(list((state / "outputs").glob(f"{live['id']}.*")), [])
        process.signalProcess("TERM")
        yield protocol.ended

    @inlineCallbacks
    def test_nearlyFullDiskRefusesRenders(self) -> None:
        """
        With C{--min-free-bytes} above the output filesystem's real free
        space, C{POST /renders} answers 507 C{insufficient_storage} (JSON)
        and starts nothing; C{/healthz} still answers.
        """
        import treq

        state = Path(self.mktemp()).absolute()
        state.mkdir(parents=True)
        stat = os.statvfs(state)
        free = stat.f_bavail * stat.f_frsize
        pool = HTTPConnectionPool(reactor, persistent=False)
        process, protocol = self.startTwistd("--state-dir", str(state), "--min-free-bytes", str(free * 2 + 1))
        port = yield protocol.listening
        response = yield treq.post(
            f"http://127.0.0.1:{port}/renders", json={"renderer": "ticks", "params": {"count": 2}}, pool=pool
        )
        body = yield treq.json_content(response)
        self.assertEqual((response.code, body["error"]), (507, "insufficient_storage"))
        self.assertIn("bytes free", body["detail"])
        health = yield treq.get(f"http://127.0.0.1:{port}/healthz", pool=pool).addCallback(treq.json_content)
        self.assertEqual((health["renders"]["running"], health["renders"]["queued"]), (0, 0))
        process.signalProcess("TERM")
        yield protocol.ended

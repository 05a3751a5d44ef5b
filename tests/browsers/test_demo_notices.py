"""
The demo page shows C{retrying} and C{reset} for what they are, in
Chromium: a visible notice (not an error), the progress bar back at 0 when
a render starts again, the state as C{reset} carries it.

The events come from a tiny server in this test, which serves the page's
real files (with its CSP) and answers C{POST /renders} and the events URL
with a stream the test writes event by event: a C{retrying} event needs a
Redis cluster whose worker dies, a C{reset} a history that overflowed or a
Redis that lost its data, where the page's handling is what is tested.
(Both streams, from the real service: tests/redis, tests/test_replay.py.)
"""

from __future__ import annotations

import http.server
import json
import queue
import threading
from importlib import resources
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from twistedsse._app import CSP

from ._drivers import OneBrowserPerClass, pollInPage

JOB = {
    "id": "job1",
    "renderer": "card",
    "params": {},
    "state": "running",
    "status_url": "/renders/job1",
    "events_url": "/renders/job1/events",
    "output_url": "/renders/job1/output",
}

# What the page shows: read in one go.
SHOWN = """(function () {
  function $(id) { return document.getElementById(id); }
  var notice = $("notice");
  return {
    notice: notice.hidden ? null : notice.textContent,
    kind: notice.getAttribute("data-kind"),
    bar: $("progress").value,
    percent: $("percent").textContent,
    state: $("job-state").textContent,
    failureShown: !$("failure").hidden,
    formError: !$("form-error").hidden,
    statsShown: ["stat-frame", "stat-fps", "stat-eta"].filter(function (id) { return !$(id).hidden; }),
    events: window.twistedsse.events.length
  };
})()"""


def waitFor(events: int) -> str:
    """
    A promise that settles once the page has handled C{events} events.
    """
    return pollInPage(
        "window.twistedsse.events.length",
        f"v >= {events}",
        "resolve(v)",
        f'"{events} events expected, got " + v',
        10,
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _send(self, status: int, body: bytes, contentType: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", contentType)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        static = resources.files("twistedsse") / "_static"
        if self.path == "/":
            page = (static / "index.html").read_bytes()
            self._send(200, page, "text/html; charset=utf-8", {"Content-Security-Policy": CSP.decode()})
        elif self.path in ("/static/app.js", "/static/app.css"):
            kind = "text/javascript" if self.path.endswith(".js") else "text/css"
            self._send(200, (static / self.path[len("/static/"):]).read_bytes(), kind)
        elif self.path == "/renderers":
            body = {"renderers": [{"name": "card", "params_schema": {"type": "object"}}]}
            self._send(200, json.dumps(body).encode(), "application/json")
        elif self.path == JOB["events_url"]:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(b"retry: 60000\n\n")
            self.wfile.flush()
            while (frame := self.server.frames.get(timeout=60)) is not None:
                self.wfile.write(frame)
                self.wfile.flush()
        else:
            self._send(404, b'{"error": "not_found", "detail": "no"}', "application/json")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(202, json.dumps(JOB).encode(), "application/json", {"Location": JOB["status_url"]})

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    frames: queue.Queue[bytes | None]


class ChromiumDemoNoticeTests(OneBrowserPerClass, SynchronousTestCase):
    engine: ClassVar[str] = "chromium"

    def setUp(self) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.frames = queue.Queue()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.addCleanup(server.frames.put, None)
        self.server = server
        self.seq = 0

    def send(self, event: str, data: object) -> None:
        self.seq += 1
        self.server.frames.put(f"id: 0-{self.seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode())

    def shown(self, events: int) -> dict[str, Any]:
        self.browser.evaluate(waitFor(events), timeout=20)
        value: dict[str, Any] = self.browser.evaluate(SHOWN)
        return value

    def test_retryingAndReset(self) -> None:
        """
        C{retrying} shows a notice naming the attempt, puts the bar back
        to 0 and keeps the render running (no failure shown); progress then
        moves the bar again under the notice. C{reset} shows a notice
        saying how many events were missed (or that the history was lost,
        C{missed: null}) and the state and progress it carries. The render
        then completes as usual.
        """
        self.browser.open(f"http://127.0.0.1:{self.server.server_address[1]}/")
        self.browser.evaluate('window.twistedsse.start("card", {}).then(function (job) { return job.id; })')
        self.send("progress", {"percent": 60.0, "frame": 90, "total_frames": 150, "eta": 2.0})
        before = self.shown(1)
        self.assertEqual((before["bar"], before["notice"], before["kind"]), (60, None, "none"))
        self.assertIn("stat-frame", before["statsShown"])

        message = "the worker running it was lost; starting again (attempt 2 of at most 3)"
        self.send("retrying", {"attempt": 2, "max_attempts": 3, "reason": "worker_lost", "message": message})
        retrying = self.shown(2)
        self.assertEqual((retrying["bar"], retrying["percent"]), (0, "0.0 %"))
        self.assertEqual((retrying["kind"], retrying["state"]), ("retrying", "running"))
        self.assertIn("attempt 2 of at most 3", retrying["notice"])
        self.assertIn(message, retrying["notice"])
        self.assertEqual(retrying["statsShown"], [])
        self.assertFalse(retrying["failureShown"] or retrying["formError"])

        self.send("progress", {"percent": 10.0})
        again = self.shown(3)
        self.assertEqual((again["bar"], again["kind"]), (10, "retrying"))

        self.send("reset", {"state": "running", "progress": {"percent": 35.0}, "missed": 4})
        reset = self.shown(4)
        self.assertEqual((reset["kind"], reset["bar"], reset["state"]), ("reset", 35, "running"))
        self.assertIn("Missed 4 events", reset["notice"])
        self.send("reset", {"state": "running", "progress": None, "missed": None})
        lost = self.shown(5)
        self.assertIn("lost this render's earlier events", lost["notice"])
        self.assertFalse(lost["failureShown"])

        self.send("complete", {"output_url": None, "duration": None, "size": None, "elapsed": 1.0})
        done = self.shown(6)
        self.assertEqual((done["state"], done["bar"]), ("succeeded", 100))

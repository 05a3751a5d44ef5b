"""
Real browsers and C{/render-stream}: a page's EventSource opens the stream
of a render that waits queued, the connection is cut before the first
event, and the browser's own reconnect re-attaches to that render (it
sends the C{JOBID:0} of the opening C{render} event), so
the server holds exactly one render and the page gets that render's
events. In Chromium, Firefox and WebKit.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from ._cutter import Cutter
from ._drivers import OneBrowserPerClass, inEveryEngine, pollInPage
from tests._support.jsonhttp import getJSON, postJSON
from tests._support.launcher import Server

# Opens the page's own EventSource on /render-stream and records what it
# sees; closes it on the terminal event, as a page should.
OPEN = """(function () {
  var t = window.renderStreamTest = {events: [], opens: 0, errors: 0, done: false};
  var source = new EventSource(%s);
  source.onopen = function () { t.opens += 1; t.openedAt = Date.now(); };
  source.onerror = function () { t.errors += 1; };
  ["progress", "complete", "failed", "cancelled"].forEach(function (name) {
    source.addEventListener(name, function (e) {
      t.events.push({type: name, id: e.lastEventId, data: JSON.parse(e.data)});
      if (name !== "progress") { source.close(); t.done = true; }
    });
  });
  return null;
})()"""

# Settles once the page's EventSource has opened N times (and, for the
# first, half a second has passed: the opening frame is parsed).
OPENED = pollInPage(
    "window.renderStreamTest",
    "v.opens >= %d && Date.now() - v.openedAt >= 500",
    "resolve(v.opens)",
    '"opened " + v.opens + " times after 20 s"',
    20,
)

DONE = pollInPage("window.renderStreamTest", "v.done", "resolve(v)", '"not done after 30 s: " + JSON.stringify(v)', 30)


class RenderStreamMixin(OneBrowserPerClass):
    def test_dropBeforeTheFirstEventReattaches(self: Any) -> None:
        """
        With the one render slot held by another render, the page opens
        C{/render-stream} (its render queues) and the connection is cut
        before any event; the browser reconnects by itself with
        C{Last-Event-ID: JOBID:0}, and the server still holds exactly one
        more render (C{/healthz}: 1 running, 1 queued; before the fix the
        reconnect carried no id and started a second: C{queued: 2}). Once
        the slot frees, the page gets that render's 5 progress events and
        C{complete}, each id naming it.
        """
        server = Server("--max-renders", "1", "--retry", "200")
        self.addCleanup(server.stop)
        base = f"http://127.0.0.1:{server.port}"
        go = Path(self.mktemp()).absolute()
        code, _ = postJSON(f"{base}/renders", {"renderer": "ticks", "params": {"count": 1, "start_file": str(go)}})
        self.assertEqual(code, 202)
        with Cutter(server.port) as cutter:
            self.browser.open(f"http://127.0.0.1:{cutter.port}/")
            query = urllib.parse.urlencode({"renderer": "ticks", "params": json.dumps({"count": 5, "interval": 0.02})})
            self.browser.evaluate(OPEN % json.dumps(f"/render-stream?{query}"))
            self.browser.evaluate(OPENED % 1, timeout=30)
            streams = [c for c in cutter.connections if any("/render-stream" in r.target for r in c.requests())]
            self.assertEqual(len(streams), 1)
            opening = re.search(rb"\nid: ([^\n:]+):0\nevent: render\n", bytes(streams[0].response))
            self.assertIsNotNone(opening, bytes(streams[0].response)[-800:])
            jobID = opening.group(1).decode()  # type: ignore[union-attr]
            self.assertEqual(getJSON(f"{base}/healthz")[1]["renders"], {"running": 1, "queued": 1, "max": 1})
            cutAt = time.time()
            self.assertGreaterEqual(cutter.cut(), 1)
            self.browser.evaluate(OPENED % 2, timeout=30)
            requests = sorted(
                (r for c in cutter.connections for r in c.requests() if "/render-stream" in r.target),
                key=lambda r: r.at,
            )
            self.assertEqual(len(requests), 2, requests)
            self.assertNotIn("last-event-id", requests[0].headers)
            self.assertEqual(requests[1].headers.get("last-event-id"), f"{jobID}:0")
            renders = getJSON(f"{base}/healthz")[1]["renders"]
            self.assertEqual(renders, {"running": 1, "queued": 1, "max": 1}, "a second render was started")
            go.touch()
            page = self.browser.evaluate(DONE, timeout=40)
        events = page["events"]
        self.assertEqual([e["type"] for e in events], ["progress"] * 5 + ["complete"], server.logText())
        self.assertEqual([e["id"] for e in events], [f"{jobID}:{i}" for i in range(1, 7)])
        self.assertEqual([e["data"]["i"] for e in events[:-1]], list(range(1, 6)))
        self.assertGreaterEqual(page["errors"], 1)
        self.assertEqual(getJSON(f"{base}/healthz")[1]["renders"], {"running": 0, "queued": 0, "max": 1})
        sys.stderr.write(
            f"\n[render-stream] {self.engine}: cut before the first event; reconnect "
            f"{(requests[1].at - cutAt) * 1000:.0f} ms later with Last-Event-ID {jobID}:0; one render\n"
        )


ChromiumRenderStreamTests, FirefoxRenderStreamTests, WebKitRenderStreamTests = inEveryEngine(RenderStreamMixin, "RenderStream")

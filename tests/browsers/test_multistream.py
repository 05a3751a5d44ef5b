"""
A dashboard in real browsers: ten renders watched over one
C{new EventSource("/events?job=...")}, over HTTP/1.1 straight to the server
(through a relay that can cut it, L{Cutter}), in Chromium, Firefox and
WebKit, with the jobs in memory and in Redis mode (a web instance and a
render worker). The connection is cut once mid-way: the browser reconnects
by itself with the last combined id, and the page ends with every event of
every job exactly once, in order per job; a reconnect after the end is 204.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from tests._support.cluster import BlockingInstance
from tests._support.jsonhttp import postJSON
from tests._support.launcher import Server
from tests._support.redis import RedisServer

from ._cutter import Cutter
from ._drivers import OneBrowserPerClass, inEveryEngine, pollInPage

JOBS = 10
COUNT = 40
INTERVAL = 0.05
#: Events seen before the cut: about a quarter of the way.
CUT_AFTER = 100

# Opens one EventSource on the stream of many jobs and records, per job,
# each event (its name, the ticker's line number, the event's id); closes
# it once every job has ended, as a page should.
OPEN = """(function (url, jobs) {
  var t = window.multiTest = {events: {}, ids: [], total: 0, ended: 0, opens: 0, errors: 0, done: false,
                              strays: []};
  jobs.forEach(function (job) { t.events[job] = []; });
  var source = new EventSource(url);
  source.onopen = function () { t.opens += 1; };
  source.onerror = function () { t.errors += 1; };
  ["progress", "retrying", "reset", "complete", "failed", "cancelled", "expired"].forEach(function (name) {
    source.addEventListener(name, function (e) {
      var data = JSON.parse(e.data);
      var mine = t.events[data.job];
      if (mine === undefined) { t.strays.push(e.data); return; }
      mine.push({type: name, i: data.i === undefined ? null : data.i, id: e.lastEventId});
      t.ids.push(e.lastEventId);
      t.total += 1;
      if (name === "complete" || name === "failed" || name === "cancelled" || name === "expired") {
        t.ended += 1;
        if (t.ended === jobs.length) { source.close(); t.done = true; }
      }
    });
  });
  return null;
})(%s, %s)"""

OPENED = pollInPage(
    "window.multiTest",
    "v.opens >= 1",
    "requestAnimationFrame(function () { requestAnimationFrame(function () { resolve(v.opens); }); })",
    '"no EventSource open after 20 s: " + JSON.stringify(v)',
    20,
    every=5,
)

AT_LEAST = pollInPage(
    "window.multiTest", "v.total >= %d", "resolve(v.total)", '"only " + v.total + " events after 30 s"', 30, every=5
)

DONE = pollInPage(
    "window.multiTest", "v.done", "resolve(v)", '"not done after 60 s: " + JSON.stringify(v).slice(0, 2000)', 60
)


def getStatus(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


class MultiStreamMixin(OneBrowserPerClass):
    def watchTen(self: Any, web: int, create: Callable[[dict[str, Any]], Any], log: Callable[[], str]) -> None:
        """
        Ten C{ticks} renders (C{COUNT} lines each), held until the page's
        one stream is open, watched through a L{Cutter} in front of the
        server at C{web}; cut after L{CUT_AFTER} events.
        """
        go = Path(self.mktemp()).absolute()
        params = {"count": COUNT, "interval": INTERVAL, "start_file": str(go)}
        jobs = []
        for _ in range(JOBS):
            code, job = create(params)
            self.assertEqual(code, 202, job)
            jobs.append(job["id"])
        path = "/events?" + urllib.parse.urlencode([("job", job) for job in jobs])
        with Cutter(web) as cutter:
            self.browser.open(f"http://127.0.0.1:{cutter.port}/")
            self.browser.evaluate(OPEN % (json.dumps(path), json.dumps(jobs)))
            self.browser.evaluate(OPENED, timeout=30)
            go.touch()
            before = self.browser.evaluate(AT_LEAST % CUT_AFTER, timeout=40)
            cutAt = time.time()
            self.assertGreaterEqual(cutter.cut(), 1)
            page = self.browser.evaluate(DONE, timeout=70)
            streams = sorted(
                (r for c in cutter.connections for r in c.requests() if r.method == "GET" and r.target == path),
                key=lambda r: r.at,
            )
        self.assertEqual(page["strays"], [])
        for job in jobs:
            events = page["events"][job]
            self.assertEqual(
                [(e["type"], e["i"]) for e in events],
                [("progress", i) for i in range(1, COUNT + 1)] + [("complete", None)],
                f"{self.engine}: job {job}\n{log()}",
            )
        ids = page["ids"]
        self.assertEqual(len(ids), len(set(ids)), "an event id repeats")
        self.assertGreaterEqual(page["opens"], 2, page["opens"])
        # One connection at a time: the first request and the browser's
        # own reconnect(s) with the last combined id it had.
        self.assertGreaterEqual(len(streams), 2, streams)
        self.assertEqual(len(streams), page["opens"])
        self.assertNotIn("last-event-id", streams[0].headers)
        lastSeen = streams[1].headers.get("last-event-id")
        self.assertIn(lastSeen, ids, "the reconnect did not send an id the page had")
        self.assertGreaterEqual(ids.index(lastSeen) + 1, before)
        self.assertLess(ids.index(lastSeen) + 1, len(ids), "the cut came after the end")
        # After the end, the browser's reconnect would get 204.
        self.assertEqual(getStatus(f"http://127.0.0.1:{web}{path}", {"Last-Event-ID": ids[-1]}), 204)
        sys.stderr.write(
            f"\n[multistream] {self.engine}: {JOBS} jobs x {COUNT + 1} events over one EventSource; cut after "
            f"{before} events, reconnected {(streams[1].at - cutAt) * 1000:.0f} ms later with an id of "
            f"{len(lastSeen or '')} chars; {page['opens']} connections\n"
        )

    def test_tenRendersInMemory(self: Any) -> None:
        """
        Jobs in this process: every event of each of ten renders reaches
        the page once, in order per job, over one stream at a time, across
        a cut.
        """
        server = Server("--max-renders", str(JOBS), "--retry", "200")
        self.addCleanup(server.stop)
        base = f"http://127.0.0.1:{server.port}"
        self.watchTen(server.port, lambda params: postJSON(base + "/renders", {"renderer": "ticks", "params": params}), server.logText)

    @pytest.mark.redis
    def test_tenRendersInRedisMode(self: Any) -> None:
        """
        The same in Redis mode: a web instance serves the stream, a worker
        runs the ten renders, Redis carries the events.
        """
        redis = RedisServer()
        self.addCleanup(redis.stop)
        outputDir = tempfile.mkdtemp(prefix="twistedsse-multi-")
        self.addCleanup(shutil.rmtree, outputDir, ignore_errors=True)
        web = BlockingInstance(redis.url, "web", outputDir, "--retry", "200")
        self.addCleanup(web.stop)
        worker = BlockingInstance(redis.url, "worker", outputDir, "--max-renders", str(JOBS))
        self.addCleanup(worker.stop)
        self.watchTen(
            web.port,
            lambda params: postJSON(web.base + "/renders", {"renderer": "ticks", "params": params}),
            lambda: web.log() + "\n" + worker.log(),
        )


ChromiumMultiStreamTests, FirefoxMultiStreamTests, WebKitMultiStreamTests = inEveryEngine(MultiStreamMixin, "MultiStream")

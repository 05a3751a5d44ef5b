"""
Redis mode behind a load balancer, in real browsers: nginx (the shipped
location snippet) balancing round-robin over two web instances, a render
worker, one redis-server. One render, created through nginx, is watched
at once by Chromium, Firefox and WebKit, each through nginx (so by either
web instance): each page gets every event once, in order (ids C{0-1},
C{0-2}...), each progress event within 100 ms of the render printing it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests._support.cluster import BlockingInstance
from tests._support.jsonhttp import postJSON
from tests._support.need import needProgram
from tests._support.redis import RedisServer
from tests._support.stats import summary
from tests._support.waiting import poll

from ._drivers import ENGINES, browser, pollInPage
from ._netns import BOUND_MS, late
from ._nginx import SNIPPET, Nginx

pytestmark = pytest.mark.redis

COUNT = 50

# Opens an EventSource on the render's events URL and records what it
# sees, each event with the moment it arrived; closes it on the terminal
# event, as a page should.
OPEN = """(function () {
  var t = window.clusterTest = {events: [], opens: 0, errors: 0, done: false};
  var source = new EventSource(%s);
  source.onopen = function () { t.opens += 1; };
  source.onerror = function () { t.errors += 1; };
  ["progress", "retrying", "reset", "complete", "failed", "cancelled"].forEach(function (name) {
    source.addEventListener(name, function (e) {
      t.events.push({type: name, id: e.lastEventId, data: JSON.parse(e.data),
                     receivedAt: performance.timeOrigin + performance.now()});
      if (name === "complete" || name === "failed" || name === "cancelled") { source.close(); t.done = true; }
    });
  });
  return null;
})()"""

# Settles once the EventSource is open and a frame has been painted since
# (WebKit's first paint holds its main thread for hundreds of ms).
OPENED = pollInPage(
    "window.clusterTest",
    "v.opens >= 1",
    "requestAnimationFrame(function () { requestAnimationFrame(function () { resolve(v.opens); }); })",
    '"no EventSource open after 20 s: " + JSON.stringify(v)',
    20,
    every=5,
)

DONE = pollInPage("window.clusterTest", "v.done", "resolve(v)", '"not done after 40 s: " + JSON.stringify(v)', 40)


class RedisClusterBrowserTests(SynchronousTestCase):
    def test_threeBrowsersTwoWebInstances(self) -> None:
        """
        One C{ticks} render of 50 events, created through nginx, watched
        through nginx by Chromium, Firefox and WebKit at once (their streams
        served by both web instances): every page gets each event exactly
        once, in order, then C{complete}, over one connection, each progress
        event within 100 ms of being printed.
        """
        needProgram("nginx")
        redis = RedisServer()
        self.addCleanup(redis.stop)
        outputDir = tempfile.mkdtemp(prefix="twistedsse-cluster-")
        self.addCleanup(shutil.rmtree, outputDir, ignore_errors=True)
        instances = []
        for role in ("web", "web", "worker"):
            instance = BlockingInstance(redis.url, role, outputDir)
            self.addCleanup(instance.stop)
            instances.append(instance)
        webA, webB, worker = instances
        nginx = Nginx([f"127.0.0.1:{webA.port}", f"127.0.0.1:{webB.port}"], SNIPPET)
        self.addCleanup(nginx.stop)
        go = Path(self.mktemp()).absolute()
        with contextlib.ExitStack() as stack:
            drivers = [stack.enter_context(browser(engine)) for engine in ENGINES]
            for driver in drivers:
                driver.open(nginx.url + "/")
            params = {"count": COUNT, "start_file": str(go)}
            code, job = postJSON(nginx.url + "/renders", {"renderer": "ticks", "params": params})
            self.assertEqual(code, 202, job)
            for driver in drivers:
                driver.evaluate(OPEN % json.dumps(job["events_url"]))
            for driver in drivers:
                driver.evaluate(OPENED, timeout=30)
            go.touch()
            pages = {driver.engine: driver.evaluate(DONE, timeout=60) for driver in drivers}
        logs = "\n".join(i.log() for i in instances)
        worst: list[float] = []
        for engine, page in pages.items():
            events = page["events"]
            self.assertEqual([e["type"] for e in events], ["progress"] * COUNT + ["complete"], f"{engine}: {page}\n{logs}")
            self.assertEqual([e["id"] for e in events], [f"0-{n}" for n in range(1, COUNT + 2)], engine)
            self.assertEqual([e["data"]["i"] for e in events[:-1]], list(range(1, COUNT + 1)), engine)
            self.assertEqual((page["opens"], page["errors"]), (1, 0), f"{engine} reconnected: {page}")
            latencies = [e["receivedAt"] - e["data"]["t_ns"] / 1e6 for e in events if e["type"] == "progress"]
            sys.stderr.write(f"\n[latency] Redis mode, nginx over two web instances, {engine}: {summary(latencies)}\n")
            self.assertEqual(late(latencies), [], f"{engine}: {summary(latencies)} (bound {BOUND_MS:.0f} ms)")
            worst.extend(latencies)
        # Each instance logs a stream's request line when it ends.
        line = re.compile(rf'"GET {re.escape(job["events_url"])} HTTP/1\.1"')
        served = lambda: [len(line.findall(i.logBytes().decode(errors="replace"))) for i in (webA, webB)]  # noqa: E731
        poll(lambda: sum(served()) >= len(ENGINES), 5)
        self.assertEqual(sum(served()), len(ENGINES), served())
        self.assertTrue(all(served()), f"streams per web instance: {served()}")
        sys.stderr.write(f"\n[cluster] streams per web instance {served()}; all engines: {summary(worst)}\n")

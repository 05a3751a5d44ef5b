"""
C{/metrics} over real sockets: scraped during and after a real render
(a command renderer's process), parsed with prometheus-client's own
parser; and C{--metrics-listen} on a real twistd.
"""

from __future__ import annotations

import os
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from twistedsse._frames import encodeEvent

from tests._support.launcher import TwistdMixin
from tests._support.ports import freePort
from tests._support.server import ServerMixin, stream, ticker
from tests._support.waiting import whenTrue


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a scrape, by name and sorted labels.
    """
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return scrape[(name, tuple(sorted(labels.items())))]


@inlineCallbacks
def scrape(url: str, pool: HTTPConnectionPool, **kw: Any) -> Any:
    response = yield treq.get(url, pool=pool, **kw)
    body = yield treq.text_content(response)
    if response.code != 200:
        raise AssertionError(f"GET {url}: {response.code} {body[:300]}")
    return samples(body)


class ScrapeTests(ServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_scrapeDuringAndAfterARender(self) -> None:
        """
        During a render watched by three streams, /metrics shows the three
        open streams and deliveries moving; after it, the render counted
        as succeeded by its renderer, one duration observation, deliveries
        of every event to every stream, their bytes, and lag observations.
        """
        base = self.startServer([ticker()])
        before = yield scrape(base + "/metrics", self.pool)
        self.assertEqual(value(before, "twistedsse_streams_open"), 0)
        self.assertEqual(value(before, "twistedsse_events_delivered_total"), 0)
        start = os.path.abspath(self.mktemp())
        job = yield self.post("ticks", {"count": 40, "interval": 0.05, "start_file": start})
        watchers = [stream(base + job["events_url"], self.pool) for _ in range(3)]
        opened: list[Any] = []

        @inlineCallbacks
        def streamsOpen() -> Any:
            found = yield scrape(base + "/metrics", self.pool)
            opened.append(value(found, "twistedsse_streams_open"))

        while not opened or opened[-1] != 3:
            yield streamsOpen()
        open(start, "w").close()
        yield whenTrue(reactor, lambda: all(len(events) > 5 for events, _ in watchers), 20, "events on every stream")
        during = yield scrape(base + "/metrics", self.pool)
        self.assertEqual(value(during, "twistedsse_streams_open"), 3)
        self.assertGreater(value(during, "twistedsse_events_delivered_total"), 0)
        self.assertEqual(value(during, "twistedsse_renders_running"), 1)
        for _, finished in watchers:
            yield finished
        after = yield scrape(base + "/metrics", self.pool)
        self.assertEqual(value(after, "twistedsse_streams_open"), 0)
        self.assertEqual(value(after, "twistedsse_renders_running"), 0)
        self.assertEqual(value(after, "twistedsse_renders_total", renderer="ticks", outcome="succeeded"), 1)
        self.assertEqual(value(after, "twistedsse_render_duration_seconds_count", renderer="ticks"), 1)
        self.assertGreater(value(after, "twistedsse_render_duration_seconds_sum", renderer="ticks"), 1.5)
        published = value(after, "twistedsse_events_published_total")
        delivered = value(after, "twistedsse_events_delivered_total")
        # The 40 progress events and the terminal one came after the
        # streams opened: live, to each of the three.
        live = [e for e in watchers[0][0][1:] if e.event == "progress"] + [watchers[0][0][-1]]
        self.assertEqual(len(live), 41)
        self.assertGreaterEqual(published, 41)
        self.assertGreaterEqual(delivered, 3 * 41)
        self.assertLessEqual(delivered, 3 * published)
        self.assertGreaterEqual(
            value(after, "twistedsse_stream_sent_bytes_total"), 3 * sum(len(encodeEvent(e)) for e in live)
        )
        self.assertGreater(value(after, "twistedsse_delivery_lag_seconds_count"), 0)
        self.assertEqual(
            value(after, "twistedsse_delivery_lag_seconds_bucket", le="+Inf"),
            value(after, "twistedsse_delivery_lag_seconds_count"),
        )
        self.assertGreater(value(after, "twistedsse_connections_open"), 0)  # this scrape's
        self.assertIn(("process_cpu_seconds_total", ()), after)

    @inlineCallbacks
    def test_serviceRegistriesAreApart(self) -> None:
        """
        Two services in one process keep metrics of their own: a render
        on one is not counted by the other.
        """
        base = self.startServer([ticker()])
        other = self.startServer([ticker()])
        job = yield self.post("ticks", {"count": 2, "interval": 0.01})
        events, finished = stream(other + job["events_url"], self.pool)
        yield finished
        mine = yield scrape(other + "/metrics", self.pool)
        theirs = yield scrape(base + "/metrics", self.pool)
        self.assertEqual(value(mine, "twistedsse_renders_total", renderer="ticks", outcome="succeeded"), 1)
        self.assertNotIn(("twistedsse_renders_total", (("outcome", "succeeded"), ("renderer", "ticks"))), theirs)


class MetricsListenTests(TwistdMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_metricsOnTheirOwnEndpoint(self) -> None:
        """
        With --metrics-listen, the metrics are served on that endpoint (and
        nothing else there), and /metrics on the main one is a JSON 404.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        port = freePort()
        process, protocol = self.startTwistd("--metrics-listen", f"tcp:{port}:interface=127.0.0.1")
        main = yield protocol.listening
        self.assertNotEqual(main, port)
        job = yield treq.post(
            f"http://127.0.0.1:{main}/renders", json={"renderer": "ticks", "params": {"count": 3, "interval": 0.01}},
            pool=pool,
        ).addCallback(treq.json_content)
        events, finished = stream(f"http://127.0.0.1:{main}{job['events_url']}", pool)
        yield finished
        found = yield scrape(f"http://127.0.0.1:{port}/metrics", pool)
        self.assertEqual(value(found, "twistedsse_renders_total", renderer="ticks", outcome="succeeded"), 1)
        self.assertGreater(value(found, "twistedsse_events_delivered_total"), 0)
        response = yield treq.get(f"http://127.0.0.1:{main}/metrics", pool=pool)
        body = yield response.json()
        self.assertEqual((response.code, body["error"]), (404, "not_found"))
        response = yield treq.get(f"http://127.0.0.1:{port}/healthz", pool=pool)
        body = yield response.json()
        self.assertEqual((response.code, body["error"]), (404, "not_found"))
        process.signalProcess("TERM")
        yield protocol.ended

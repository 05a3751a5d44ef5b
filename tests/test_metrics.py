"""
L{twistedsse._metrics}: the counters the hot objects keep (the fan-out,
streams, keepalives, the runner), the collector that reads them at scrape
time, and where /metrics is served (the app, C{--metrics-listen}).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import tap
from twistedsse._broker import MemoryBroker
from twistedsse._build import MetricsOnly, buildMetricsSite, buildResource, buildService
from twistedsse._frames import encodeEvent
from twistedsse._metrics import LAG_BUCKETS, Histogram, RenderStats, ServiceMetrics
from twistedsse._stream import EventStreamResource, StreamLimits, StreamSettings
from twisted.web.server import Site

from tests._support.fixtures import snapshot
from tests._support.web import Connection
from tests.test_fanout import Calls, turn


def scrape(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The registry's exposition, parsed by the library's parser: every
    sample by name and sorted labels.
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class HistogramTests(SynchronousTestCase):
    def test_bucketsAreCumulativeAndInclusive(self) -> None:
        """
        A value on a bucket's bound counts in that bucket (C{le}); the
        exposition's pairs are cumulative, C{+Inf} last, equal to the count.
        """
        histogram = Histogram([1.0, 2.0])
        for value in (0.5, 1.0, 1.5, 3.0):
            histogram.observe(value)
        self.assertEqual(histogram.cumulative(), [("1.0", 2), ("2.0", 3), ("+Inf", 4)])
        self.assertEqual((histogram.count, histogram.sum), (4, 6.0))


class FanoutCountsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(clock=self.clock, fanoutSlice=2)
        self.broker.create(snapshot("a"))

    def test_publishedDeliveredAndBytes(self) -> None:
        """
        Each event given to each subscriber counts once, and its frame's
        bytes; events published together count each.
        """
        subscribers = [Calls() for _ in range(3)]
        for s in subscribers:
            self.broker.subscribe("a", None, s)
        first = self.broker.publish("a", "progress", {"p": 1})
        self.clock.advance(0)
        more = self.broker.publishMany("a", "progress", [{"p": 2}, {"p": 3}])
        self.clock.advance(0)
        stats = self.broker.stats
        self.assertEqual(stats.published, 3)
        self.assertEqual(stats.delivered, 9)
        frames = [encodeEvent(e) for e in [first, *more]]
        self.assertEqual(stats.bytes, 3 * sum(len(f) for f in frames))
        self.assertEqual(sum(len(frame) for s in subscribers for _, frame in s.calls), stats.bytes)

    def test_lagOncePerPass(self) -> None:
        """
        The lag is observed once a pass has reached its last subscriber:
        from the publish to then, on the injected clock; a publish nobody
        watches observes nothing.
        """
        self.broker.publish("a", "progress", {"p": 0})
        self.assertEqual(self.broker.stats.lag.count, 0)
        for _ in range(5):
            self.broker.subscribe("a", None, Calls())
        self.broker.publish("a", "progress", {"p": 1})
        # Two of five in the publishing call; the rest a slice per turn.
        self.assertEqual(self.broker.stats.lag.count, 0)
        # (Time passes between turns; Clock.advance would run the slices
        # each schedules in the same call.)
        self.clock.rightNow += 0.004
        turn(self.clock)
        self.assertEqual(self.broker.stats.lag.count, 0)
        self.clock.rightNow += 0.003
        turn(self.clock)
        lag = self.broker.stats.lag
        self.assertEqual(lag.count, 1)
        self.assertAlmostEqual(lag.sum, 0.007)
        self.assertEqual(lag.counts[LAG_BUCKETS.index(0.01)], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StreamCountsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.broker = MemoryBroker(history=100)
        self.broker.create(snapshot("job1"))
        self.limits = StreamLimits()
        self.resource = EventStreamResource(
            self.broker, "job1", self.clock, StreamSettings(keepalive=10.0, retry=0, writeTimeout=30.0),
            limits=self.limits,
        )  # fmt: skip
        self.site = Site(self.resource, reactor=self.clock)

    def test_keepalivesCounted(self) -> None:
        """
        Each keepalive comment written counts once; a tick that writes none
        counts none.
        """
        conn = Connection(self.site)
        conn.request("GET", "/")
        keepalives = self.resource._keepalives
        self.clock.pump([1.0] * 9)
        self.assertEqual(keepalives.sent, 0)
        self.clock.pump([1.0] * 2)
        self.assertEqual(keepalives.sent, 1)
        self.assertIn(b": keepalive", conn.take())
        conn.disconnect()

    def test_slowClientDropCounted(self) -> None:
        """
        A stream whose client reads nothing for the write timeout is
        dropped and counted.
        """
        conn = Connection(self.site)
        conn.request("GET", "/")
        conn.transport.producer.pauseProducing()
        self.assertEqual(self.limits.dropped, 0)
        self.clock.advance(30.0)
        self.assertEqual(self.limits.dropped, 1)
        self.assertTrue(conn.transport.disconnecting)


class StreamLogTests(SynchronousTestCase):
    def opened(self, settings: StreamSettings, path: str = "/") -> list[dict[str, Any]]:
        from twisted.logger import LogLevel, capturedLogs

        clock = MemoryReactorClock()
        broker = MemoryBroker(history=100)
        broker.create(snapshot("job1"))
        site = Site(EventStreamResource(broker, "job1", clock, settings), reactor=clock)
        with capturedLogs() as events:
            conn = Connection(site)
            conn.request("GET", path)
            conn.disconnect()
        return [e for e in events if e["log_level"] is LogLevel.debug and e.get("log_namespace") == "twistedsse._stream"]

    def test_openedAndClosedWhenAsked(self) -> None:
        """
        With C{logStreams}, a stream logs its opening and closing at debug
        level with its job id, and nothing of the request's token.
        """
        from twisted.logger import formatEvent

        lines = [formatEvent(e) for e in self.opened(StreamSettings(logStreams=True), "/?access_token=SECRET")]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0], "event stream of job1 opened")
        self.assertTrue(lines[1].startswith("event stream of job1 closed"), lines[1])
        self.assertFalse(any("SECRET" in line for line in lines))

    def test_quietByDefault(self) -> None:
        """
        By default a stream logs nothing when it opens and closes (twistd
        writes every debug event, at a cost per stream).
        """
        self.assertEqual(self.opened(StreamSettings()), [])


class CollectorTests(SynchronousTestCase):
    def test_serviceMetricsScraped(self) -> None:
        """
        A service's registry, as the library exposes it: the service's
        counters with the C{twistedsse_} prefix and Prometheus's suffixes,
        an app's streams, keepalives and connections once it is built, and
        the process collector.
        """
        reactor = MemoryReactorClock()
        service = buildService(reactor, outputDir=self.mktemp(), minFreeBytes=0)
        metrics = service.metrics
        found = scrape(metrics)
        self.assertEqual(found[("twistedsse_queue_depth", ())], 0)
        self.assertEqual(found[("twistedsse_renders_running", ())], 0)
        self.assertEqual(found[("twistedsse_events_published_total", ())], 0)
        self.assertEqual(found[("twistedsse_delivery_lag_seconds_count", ())], 0)
        self.assertEqual(found[("twistedsse_delivery_lag_seconds_bucket", (("le", "+Inf"),))], 0)
        self.assertNotIn(("twistedsse_streams_open", ()), found)
        self.assertIn(("process_cpu_seconds_total", ()), found)
        buildResource(service, reactor)
        found = scrape(metrics)
        self.assertEqual(found[("twistedsse_streams_open", ())], 0)
        self.assertEqual(found[("twistedsse_keepalives_total", ())], 0)
        self.assertEqual(found[("twistedsse_slow_client_drops_total", ())], 0)

    def test_rendersByRendererAndOutcome(self) -> None:
        """
        Renders are counted by renderer and outcome; the ones that ran
        observe their duration, by renderer.
        """
        metrics = ServiceMetrics()
        stats = metrics.collector.renders = RenderStats()
        stats.record("card", "succeeded", 12.0)
        stats.record("card", "succeeded", 40.0)
        stats.record("card", "failed")
        stats.record("ticks", "cancelled", 0.5)
        found = scrape(metrics)
        renders = {k[1]: v for k, v in found.items() if k[0] == "twistedsse_renders_total"}
        self.assertEqual(
            renders,
            {
                (("outcome", "succeeded"), ("renderer", "card")): 2,
                (("outcome", "failed"), ("renderer", "card")): 1,
                (("outcome", "cancelled"), ("renderer", "ticks")): 1,
            },
        )
        self.assertEqual(found[("twistedsse_render_duration_seconds_count", (("renderer", "card"),))], 2)
        self.assertEqual(found[("twistedsse_render_duration_seconds_sum", (("renderer", "card"),))], 52.0)
        self.assertEqual(
            found[("twistedsse_render_duration_seconds_bucket", (("le", "15.0"), ("renderer", "card")))], 1
        )

    def test_registriesApart(self) -> None:
        """
        Two services have registries of their own, and neither is the
        library's global one.
        """
        from prometheus_client import REGISTRY

        reactor = MemoryReactorClock()
        one = buildService(reactor, outputDir=self.mktemp())
        two = buildService(reactor, outputDir=self.mktemp())
        self.assertIsNot(one.metrics.registry, two.metrics.registry)
        self.assertIsNot(one.metrics.registry, REGISTRY)


class RoutesTests(SynchronousTestCase):
    """
    Where /metrics is not served, and who may not scrape it. (A served
    scrape runs in the reactor's thread pool: the integration tests.)
    """

    def get(self, resource: Any, path: str, **kw: Any) -> tuple[int, Any]:
        treq = StubTreq(resource)
        response = self.successResultOf(treq.get("http://127.0.0.1" + path, **kw))
        body = self.successResultOf(response.json())
        return response.code, body

    def test_notServedWhenElsewhere(self) -> None:
        """
        With C{serveMetrics=False} (C{--metrics-listen}), the main app's
        /metrics is a JSON 404.
        """
        reactor = MemoryReactorClock()
        service = buildService(reactor, outputDir=self.mktemp())
        code, body = self.get(buildResource(service, reactor, serveMetrics=False), "/metrics")
        self.assertEqual((code, body["error"]), (404, "not_found"))

    def test_tokenNeeded(self) -> None:
        """
        With tokens configured, a scrape without one is refused (401), and
        one with a scoped token lacking C{read:metrics} too (403); the same
        on a C{--metrics-listen} site.
        """
        from twistedsse import mintToken

        reactor = MemoryReactorClock()
        reactor.advance(1_000_000)
        service = buildService(reactor, outputDir=self.mktemp())
        secret = b"s" * 32
        main = buildResource(service, reactor, authTokens=[b"operator"], jwtSecret=secret)
        alone = buildMetricsSite(service, reactor, authTokens=[b"operator"], jwtSecret=secret).resource
        scoped = mintToken(secret, ["create:card"], now=reactor.seconds())
        for resource in (main, alone):
            code, body = self.get(resource, "/metrics")
            self.assertEqual((code, body["error"]), (401, "unauthorized"))
            code, body = self.get(resource, "/metrics", headers={"authorization": f"Bearer {scoped}"})
            self.assertEqual((code, body["error"]), (403, "forbidden"))

    def test_metricsSiteServesNothingElse(self) -> None:
        """
        A C{--metrics-listen} site answers anything but /metrics with a JSON
        404, and methods other than GET with 405.
        """
        reactor = MemoryReactorClock()
        service = buildService(reactor, outputDir=self.mktemp())
        site = buildMetricsSite(service, reactor)
        self.assertIsInstance(site.resource, MetricsOnly)
        code, body = self.get(site.resource, "/healthz")
        self.assertEqual((code, body["error"]), (404, "not_found"))
        response = self.successResultOf(StubTreq(site.resource).post("http://127.0.0.1/metrics"))
        self.assertEqual(response.code, 405)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--output-dir", self.mktemp(), *argv])
        return options

    def test_metricsListen(self) -> None:
        """
        --metrics-listen is repeatable; makeService adds a listener for
        each, beside the main ones.
        """
        options = self.parse("--metrics-listen", "tcp:9100:interface=127.0.0.1", "--metrics-listen", "unix:/tmp/m.sock")
        self.assertEqual(options["metrics-listen"], ["tcp:9100:interface=127.0.0.1", "unix:/tmp/m.sock"])
        self.assertEqual(self.parse()["metrics-listen"], [])
        import gc

        thresholds = gc.get_threshold()
        self.addCleanup(lambda: (gc.unfreeze(), gc.set_threshold(*thresholds)))
        top = tap.makeService(options, MemoryReactorClock())
        self.assertEqual(len(list(top)), 1 + 1 + 2)

    def test_metricsListenBeyondLoopback(self) -> None:
        """
        A --metrics-listen reachable beyond this machine is refused without
        tokens, and allowed with them or with --no-auth.
        """
        from twisted.python.usage import UsageError

        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("a-long-enough-operator-token-0123456789\n")
        with self.assertRaises(UsageError) as caught:
            self.parse("--metrics-listen", "tcp:9100")
        self.assertIn("--metrics-listen tcp:9100", str(caught.exception))
        self.parse("--metrics-listen", "tcp:9100", "--no-auth")
        self.parse("--metrics-listen", "tcp:9100", "--auth-token-file", tokens)

    def test_logStreams(self) -> None:
        """
        The streams' opening and closing lines are made with
        --log-level debug only (where they are kept).
        """
        import gc

        thresholds = gc.get_threshold()
        self.addCleanup(lambda: (gc.unfreeze(), gc.set_threshold(*thresholds)))

        def settings(*argv: str) -> bool:
            top = tap.makeService(self.parse(*argv), MemoryReactorClock())
            # (The site's resource is the app behind its front resources.)
            resource: Any = top.site.resource
            while not hasattr(resource, "settings"):
                resource = getattr(resource, "_wrapped", None) or resource._app
            return bool(resource.settings.logStreams)

        self.assertFalse(settings())
        self.assertFalse(settings("--log-level", "info"))
        self.assertTrue(settings("--log-level", "debug"))

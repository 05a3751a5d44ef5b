"""
The service's Prometheus metrics: plain counters kept by the objects that
do the work, read only when Prometheus scrapes.

Nothing on the delivery path calls the Prometheus library. The fan-out
adds to L{DeliveryStats} once per slice of a pass (a few integer
additions for hundreds of deliveries) and observes the delivery lag once
per pass; the runner adds a render's end to L{RenderStats} (and the job
tracker the end of one that never ran); streams,
keepalives and connections are counted where they were counted already
(L{StreamLimits<twistedsse._stream.StreamLimits>},
L{Keepalives<twistedsse._keepalive.Keepalives>},
L{ConnectionCounter<twistedsse._connections.ConnectionCounter>}). A
L{ServiceCollector} turns all of it into metric families at scrape time,
on a L{CollectorRegistry} of the service's own (never the library's global
one: an application may embed two services, and tests build many), beside
the library's process and platform collectors.

prometheus-client's Twisted resource serves the registry from the
reactor's thread pool (a WSGI application): L{ServiceCollector.collect}
runs in a thread. It only reads integers and copies small dicts (whole,
under the GIL); a figure may be one event behind another, never torn.

Intentional divergence: the delivery lag is measured from the moment the
fan-out is handed an event, not from the render's line read. In one
process they are the same reactor turn (the line is parsed and published
in the call that read it); in Redis mode it is the moment the web instance
reads the entry from Redis, so the lag is the web side's (Redis to
socket): the worker's clock is another host's.
"""

from __future__ import annotations

from bisect import bisect_left
from queue import Empty, Queue
from typing import Any, Callable, Iterable, Iterator, Protocol, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.metrics_core import Metric


#: Delivery lag buckets, in seconds: a frame normally leaves within
#: milliseconds of its line (docs/performance.md); a fan-out pass over
#: 10 000 streams takes tens of milliseconds.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Render duration buckets, in seconds: from a second to the default
#: hour's timeout.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Histogram:
    """
    A histogram as plain numbers: C{observe} is a bisect and two additions
    (no lock: the reactor thread alone observes).
    """

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        #: Per bucket (not cumulative); the last is C{+Inf}.
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """
        The C{(le, count)} pairs of the exposition format, C{+Inf} last.
        """
        counts = list(self.counts)
        pairs: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.buckets, counts):
            total += count
            pairs.append((_le(bound), total))
        pairs.append(("+Inf", total + counts[-1]))
        return pairs


def _le(bound: float) -> str:
    return repr(float(bound))


class DeliveryStats:
    """
    What a broker's fan-outs gave out: events published, deliveries (one
    stream given one batch of events counts each event), bytes of frames
    handed to streams, and the delivery lag of each pass.
    """

    __slots__ = ("published", "delivered", "bytes", "lag")

    def __init__(self) -> None:
        self.published = 0
        self.delivered = 0
        self.bytes = 0
        self.lag = Histogram(LAG_BUCKETS)


class RenderStats:
    """
    Renders ended, by renderer and outcome (C{succeeded}, C{failed},
    C{cancelled}), and how long the ones that ran took, by renderer.
    """

    __slots__ = ("ended", "durations")

    def __init__(self) -> None:
        self.ended: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}

    def record(self, renderer: str, outcome: str, seconds: float | None = None) -> None:
        key = (renderer, outcome)
        self.ended[key] = self.ended.get(key, 0) + 1
        if seconds is not None:
            histogram = self.durations.get(renderer)
            if histogram is None:
                histogram = self.durations[renderer] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)


class RedisStats:
    """
    Redis mode: connections made again after a loss, and the renders this
    worker claimed from the queue or reclaimed from a worker that died.
    """

    __slots__ = ("reconnects", "claims", "reclaims")

    def __init__(self) -> None:
        self.reconnects = 0
        self.claims = 0
        self.reclaims = 0


def askedInReactor(
    reactor: IReactorTime, ask: Callable[[], Deferred[int]], timeout: float = 1.0
) -> Callable[[], int | None]:
    """
    A gauge's value that only the reactor thread can get (a Redis query),
    for a collector that runs in the scrape's thread (prometheus-client
    serves from the reactor's thread pool): that thread waits for it, at
    most C{timeout} seconds (and a second more for the reactor to take the
    call: a reactor that has stopped never will, and a thread waiting for
    ever would hang the thread pool's shutdown). C{None}, no sample, when
    the answer does not come or is a failure, or when called in the
    reactor thread, which must never wait for itself.
    """

    def sample() -> int | None:
        if isInIOThread():
            return None
        answers: Queue[object] = Queue(1)

        def inReactor() -> None:
            d = maybeDeferred(ask)
            d.addTimeout(timeout, reactor)
            d.addBoth(answers.put)

        # (Every reactor Twisted ships is both.)
        cast(IReactorFromThreads, reactor).callFromThread(inReactor)
        try:
            answer = answers.get(timeout=timeout + 1.0)
        except Empty:
            return None
        return None if isinstance(answer, Failure) else int(cast(int, answer))

    return sample


class _Open(Protocol):
    @property
    def open(self) -> int: ...


class _StreamsSource(Protocol):
    @property
    def open(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class _Keepalives(Protocol):
    @property
    def sent(self) -> int: ...


class ServiceCollector(Collector):
    """
    The C{twistedsse_*} metric families, read from the counters above at
    scrape time. A source not given (a worker has no streams; memory mode
    no Redis) yields nothing.
    """

    def __init__(self) -> None:
        self.deliveries: list[DeliveryStats] = []
        self.renders: RenderStats | None = None
        self.redis: RedisStats | None = None
        #: (C{None} from it: no sample now.)
        self.queueDepth: Callable[[], int | None] | None = None
        self.activeRenders: Callable[[], int] | None = None
        self.streams: list[_StreamsSource] = []
        self.keepalives: list[_Keepalives] = []
        self.connections: list[_Open] = []

    def collect(self) -> Iterator[Metric]:
        yield from self._streams()
        yield from self._deliveries()
        yield from self._renders()
        yield from self._redis()

    def _streams(self) -> Iterator[Metric]:
        if self.streams:
            yield _gauge("twistedsse_streams_open", "Event streams open now.", sum(s.open for s in self.streams))
            yield _counter(
                "twistedsse_slow_client_drops",
                "Event streams dropped because their client read nothing for --write-timeout seconds.",
                sum(s.dropped for s in self.streams),
            )
        if self.keepalives:
            yield _counter(
                "twistedsse_keepalives", "Keepalive comments written to quiet streams.",
                sum(k.sent for k in self.keepalives),
            )  # fmt: skip
        if self.connections:
            yield _gauge("twistedsse_connections_open", "Client connections open now.", sum(c.open for c in self.connections))

    def _deliveries(self) -> Iterator[Metric]:
        if not self.deliveries:
            return
        stats = self.deliveries
        yield _counter("twistedsse_events_published", "Events published to the streams of their job.", sum(s.published for s in stats))
        yield _counter(
            "twistedsse_events_delivered", "Events handed to event streams (one event, one stream: one).",
            sum(s.delivered for s in stats),
        )  # fmt: skip
        yield _counter("twistedsse_stream_sent_bytes", "Bytes of event frames handed to event streams.", sum(s.bytes for s in stats))
        lag = HistogramMetricFamily(
            "twistedsse_delivery_lag_seconds",
            "From an event reaching the fan-out (the render's line read; in Redis mode, the entry read from "
            "Redis) to its frame handed to the last stream's socket, one observation per fan-out pass.",
        )
        merged = Histogram(LAG_BUCKETS)
        for s in stats:
            merged.counts = [a + b for a, b in zip(merged.counts, s.lag.counts)]
            merged.sum += s.lag.sum
        lag.add_metric([], merged.cumulative(), merged.sum)
        yield lag

    def _renders(self) -> Iterator[Metric]:
        depth = None if self.queueDepth is None else self.queueDepth()
        if depth is not None:
            yield _gauge("twistedsse_queue_depth", "Renders waiting for a slot.", depth)
        if self.activeRenders is not None:
            yield _gauge("twistedsse_renders_running", "Render processes running now.", self.activeRenders())
        stats = self.renders
        if stats is None:
            return
        ended = CounterMetricFamily(
            "twistedsse_renders", "Renders ended, by renderer and outcome.", labels=["renderer", "outcome"]
        )
        for (renderer, outcome), count in sorted(dict(stats.ended).items()):
            ended.add_metric([renderer, outcome], count)
        yield ended
        durations = HistogramMetricFamily(
            "twistedsse_render_duration_seconds",
            "How long renders ran, from their process's start to its exit, by renderer.",
            labels=["renderer"],
        )
        for renderer, histogram in sorted(dict(stats.durations).items()):
            durations.add_metric([renderer], histogram.cumulative(), histogram.sum)
        yield durations

    def _redis(self) -> Iterator[Metric]:
        stats = self.redis
        if stats is None:
            return
        yield _counter("twistedsse_redis_reconnects", "Connections to Redis made again after one was lost.", stats.reconnects)
        yield _counter("twistedsse_redis_claims", "Renders this worker claimed from the queue.", stats.claims)
        yield _counter(
            "twistedsse_redis_reclaims", "Renders this worker took over from a worker that stopped renewing its claim.",
            stats.reclaims,
        )  # fmt: skip


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    # (The library adds _total to a counter's name in the exposition.)
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServiceMetrics:
    """
    One service's registry: L{ServiceCollector} (C{collector}, which the
    service and the apps over it fill in) plus the process and platform
    collectors.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServiceCollector()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def watch(self, streams: _StreamsSource, keepalives: _Keepalives, connections: _Open | None = None) -> None:
        """
        Count an app's streams and keepalives, and a site's connections.
        """
        collector = self.collector
        collector.streams.append(streams)
        collector.keepalives.append(keepalives)
        if connections is not None:
            collector.connections.append(connections)

    def resource(self) -> Any:
        """
        prometheus-client's Twisted resource over this registry (it serves
        from the global reactor's thread pool).
        """
        from prometheus_client.twisted import MetricsResource

        # Typing note: the library's MetricsResource is an untyped lambda.
        return MetricsResource(registry=self.registry)  # type: ignore[no-untyped-call]


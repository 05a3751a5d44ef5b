"""
The builders an embedding application uses give it twistd's limits unless
it asks for others.
"""

from __future__ import annotations

import inspect
import json
import resource

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twistedsse import ConnectionLimits, buildResource, buildService, buildSite, tap
from twistedsse._connections import MAX_CONNECTIONS_PER_ADDRESS, defaultLimits, fileReserve
from twistedsse.testing import FakeSpawner
from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse


def _defaults(builder: object) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(builder).parameters.items()  # type: ignore[arg-type]
        if p.default is not inspect.Parameter.empty
    }


class DefaultsTests(SynchronousTestCase):
    def test_sameAsTwistd(self) -> None:
        """
        Each builder keyword that has a twistd option defaults to that
        option's default (C{None} where twistd computes it the same way:
        the CPU count, what the open-file limit holds).
        """
        options = tap.Options()
        pairs = {
            buildService: {
                "history": "history", "renderTimeout": "render-timeout", "killGrace": "kill-grace",
                "maxQueued": "max-queued", "expireAfter": "expire-after", "minFreeBytes": "min-free-bytes",
                "renderThreads": "render-threads", "ffmpeg": "ffmpeg",
            },
            buildResource: {
                "keepalive": "keepalive", "retry": "retry", "writeTimeout": "write-timeout",
                "maxStreams": "max-streams", "maxStreamsPerJob": "max-streams-per-job",
            },
        }  # fmt: skip
        for builder, names in pairs.items():
            defaults = _defaults(builder)
            for keyword, option in names.items():
                self.assertEqual(defaults[keyword], options.defaults[option], f"{keyword} / --{option}")
        # No limit either way: 0 for twistd, None or 0 for the builder.
        self.assertFalse(_defaults(buildService)["maxOutputBytes"] or options.defaults["max-output-bytes"])
        limits = defaultLimits(1, 1, limit=1 << 20)
        self.assertEqual(
            (limits.requestTimeout, limits.bodyMinRate, limits.maxPerAddress, limits.limitLoopback),
            (
                options.defaults["request-timeout"],
                options.defaults["body-min-rate"],
                options.defaults["max-connections-per-address"],
                False,
            ),
        )


class FileLimitTests(SynchronousTestCase):
    """
    Unless given, the stream and connection caps are what the open-file
    limit holds (the builders read the soft limit as it is; twistd raises
    it first).
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.service = ticksService(self.clock, FakeSpawner(), self.mktemp(), maxRenders=1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = fileReserve(1, 1) + 3  # room for 3 streams and connections
        if soft != resource.RLIM_INFINITY and soft < low:
            self.skipTest(f"the open-file limit ({soft}) is lower than this test's")
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        try:
            self.site = buildSite(self.service, self.clock)
            # Connections uncapped, to reach the streams' own cap.
            self.uncapped = buildSite(self.service, self.clock, connections=ConnectionLimits())
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_connections(self) -> None:
        """
        The site caps connections at the room the limit leaves, and
        connections per address at twistd's default.
        """
        limits = self.site.connections.limits
        self.assertEqual((limits.maxConnections, limits.maxPerAddress), (3, MAX_CONNECTIONS_PER_ADDRESS))

    def test_streams(self) -> None:
        """
        The fourth stream is refused: 503 C{too_many_streams}; the fourth
        connection, on the site with default caps, is closed at once.
        """
        jobID = self.service.submit("ticks", {}).id
        conns = []
        for _ in range(3):
            conn = Connection(self.uncapped)
            conn.request("GET", f"/renders/{jobID}/events")
            self.assertEqual(splitResponse(conn.take())[0], 200)
            conns.append(conn)
        conn = Connection(self.uncapped)
        conn.request("GET", f"/renders/{jobID}/events")
        status, _, body = splitResponse(conn.take())
        self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_streams"))
        for conn in conns + [conn]:
            conn.disconnect()


class OptionsTests(SynchronousTestCase):
    def test_siteOptionsAreTheResourceOptions(self) -> None:
        """
        L{buildSite} passes on exactly the keywords L{buildResource} takes
        (but the connection counter, which it makes itself): the typed
        options stay in step with the builder.
        """
        from twistedsse._build import ResourceOptions

        keywords = {
            name
            for name, p in inspect.signature(buildResource).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        self.assertEqual(set(ResourceOptions.__annotations__), keywords - {"connectionCounter"})


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        return NOT_DONE_YET


class FormsTests(SynchronousTestCase):
    def test_formsNotParsed(self) -> None:
        """
        A site from L{buildSite} leaves POST bodies to the app: Twisted
        does not parse a form (its fields would join C{request.args}) nor
        answer a bare 400 to a multipart body it cannot parse (before the
        app's JSON 415).
        """
        clock = MemoryReactorClock()
        site = buildSite(ticksService(clock, FakeSpawner(), self.mktemp()), clock)
        recorder = site.resource = _Recorder()
        for contentType, body in [
            ("application/x-www-form-urlencoded", b"a=1&b=2"),
            ("multipart/form-data; boundary=x", b"not multipart at all"),
        ]:
            conn = Connection(site)
            conn.request("POST", "/p", {"Content-Type": contentType}, body)
            request = recorder.requests.pop()
            self.assertEqual((request.args, request.content.read()), ({}, body))
            self.assertEqual(request.getHeader(b"content-type"), contentType.encode())
            request.finish()
            self.assertEqual(splitResponse(conn.take())[0], 200)
            conn.disconnect()


class RedisOptionsTests(SynchronousTestCase):
    def test_redisModeBuildsTheRedisService(self) -> None:
        """
        With C{redis}, the builder makes a L{RedisRenderService} in its
        role and opens nothing until it starts; its options must go
        together.
        """
        from twistedsse import RedisEndpoint, RedisRenderService

        reactor = MemoryReactorClock()
        endpoint = RedisEndpoint.fromURL("redis://127.0.0.1:6379/2")
        service = buildService(reactor, redis=endpoint, role="worker", outputDir="/srv/out", maxRenders=3)
        assert isinstance(service, RedisRenderService)
        self.assertEqual((service.role, service.maxRenders, service.outputDir.as_posix()), ("worker", 3, "/srv/out"))
        self.assertEqual(reactor.tcpClients, [])
        for kw, words in [
            ({"redis": endpoint}, "output directory is required"),
            ({"redis": endpoint, "outputDir": "/o", "stateDir": "/s"}, "Redis keeps them"),
            ({"role": "web"}, "needs Redis"),
            ({"redis": endpoint, "outputDir": "/o", "role": "boss"}, "role must be one of"),
        ]:
            with self.assertRaises(ValueError) as caught:
                buildService(reactor, **kw)  # type: ignore[arg-type]
            self.assertIn(words, str(caught.exception), kw)

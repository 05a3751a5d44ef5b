"""
Through a real nginx: every progress event reaches the client within
100 ms of the render printing it, with the location block we ship
(docs/nginx-location.conf, included as it is) and with nginx's defaults;
and the negative controls show the same check fails when the server stops
sending C{X-Accel-Buffering: no} or holds its frames back.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests._support.stats import summary
from tests._support.waiting import poll

from ._drivers import browser
from ._netns import Measuring, late, pageRender
from ._nginx import DEFAULTS, LOCATION, SNIPPET, Nginx
from tests._support.launcher import ROOT, Server
from tests._support.need import needProgram


class NginxMixin(Measuring):
    def serve(self, *args: str) -> tuple[Server, str]:
        """
        A server (L{Server}'s C{args}), stopped at cleanup: it and its URL.
        """
        # nginx's default proxy_pass sends the upstream's name as Host.
        server = Server("--public-name", "twistedsse", *args)
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        return server, f"http://127.0.0.1:{server.port}"

    def proxy(self, server: Server, locations: str) -> Nginx:
        """
        nginx in front of C{server} with C{locations}, stopped at cleanup.
        """
        nginx = Nginx(f"127.0.0.1:{server.port}", locations)
        self.addCleanup(nginx.stop)  # type: ignore[attr-defined]
        return nginx


class NginxTests(NginxMixin, SynchronousTestCase):
    def setUp(self) -> None:
        needProgram("nginx")

    def assertUpstreamProtocol(self, server: Server, version: str) -> None:
        """
        The server's access log shows the render-stream request arriving
        over HTTP/C{version} (it is logged when the response ends: wait a
        little for it).
        """
        line = re.compile(rf'"GET /render-stream\?[^"]* HTTP/{re.escape(version)}"')
        poll(lambda: line.search(server.logText()), 5)
        self.assertRegex(server.logText(), line)

    def test_snippetIsTheREADMEs(self) -> None:
        """
        The README's "Behind nginx" section shows docs/nginx-location.conf
        verbatim, and it has what streaming needs: HTTP/1.1 without
        C{Connection: close} upstream, the client's Host, a read timeout well
        above the keepalive interval, no gzip.
        """
        snippet = LOCATION.read_text()
        readme = (ROOT / "README.md").read_text()
        section = readme[readme.index("### Behind nginx") :]
        section = section[: section.index("\n## ")]
        self.assertIn(snippet, section)
        for directive in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                          "proxy_set_header Host $host;", "gzip off;"):
            self.assertIn(directive, snippet)
        timeout = re.search(r"proxy_read_timeout (\d+)([smh]?);", snippet)
        assert timeout is not None
        seconds = int(timeout.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[timeout.group(2)]
        self.assertGreaterEqual(seconds, 10 * 15)  # --keepalive defaults to 15 s

    def test_snippetEveryEventWithin100ms(self) -> None:
        """
        Through nginx with the shipped snippet (HTTP/1.1 upstream), each of 50
        events reaches a socket client within 100 ms of being printed, in
        order, then C{complete}.
        """
        server, _ = self.serve()
        nginx = self.proxy(server, SNIPPET)
        _, latencies = self.stream(nginx.url, "nginx, shipped snippet, socket client")
        self.assertOnTime(latencies)
        self.assertUpstreamProtocol(server, "1.1")

    def test_defaultsEveryEventWithin100ms(self) -> None:
        """
        nginx with only C{proxy_pass} (HTTP/1.0 upstream, C{proxy_buffering
        on}): the app's own response says C{X-Accel-Buffering: no}, nginx
        obeys it (and strips it), and each of 50 events arrives within 100 ms.
        """
        server, direct = self.serve()
        head, _ = self.stream(direct, "direct, HTTP/1.1 socket client")
        self.assertEqual(head["headers"].get("x-accel-buffering"), "no")
        nginx = self.proxy(server, DEFAULTS)
        head, latencies = self.stream(nginx.url, "nginx defaults (HTTP/1.0 upstream, buffering on), socket client")
        self.assertOnTime(latencies)
        self.assertNotIn("x-accel-buffering", head["headers"])
        self.assertUpstreamProtocol(server, "1.0")

    def test_appStreamsToHTTP10Client(self) -> None:
        """
        To an HTTP/1.0 client (what nginx is to its upstream by default) the
        app streams unchunked, each event within 100 ms.
        """
        _, direct = self.serve()
        head, latencies = self.stream(direct, "direct, HTTP/1.0 socket client", http10=True)
        self.assertNotIn("transfer-encoding", head["headers"])
        self.assertNotIn("content-length", head["headers"])
        self.assertOnTime(latencies)

    def test_withoutAccelHeaderNginxHoldsEventsBack(self) -> None:
        """
        Negative control: the defaults with a server that does not send
        C{X-Accel-Buffering: no}. nginx buffers the stream and the 100 ms
        check fails for most events, so it would catch the header's loss.
        """
        server, direct = self.serve("--no-accel-header")
        head, _ = self.stream(direct, "direct, server without the header")
        self.assertNotIn("x-accel-buffering", head["headers"])
        nginx = self.proxy(server, DEFAULTS)
        _, latencies = self.stream(nginx.url, "negative control: nginx defaults, no X-Accel-Buffering")
        self.assertGreater(len(late(latencies)), self.COUNT // 2, summary(latencies))

    def test_bufferedFramesCaughtThroughSnippet(self) -> None:
        """
        Negative control: a server that holds frames back and writes them
        every 250 ms (the bug this project exists to prevent), through the
        shipped snippet: the 100 ms check fails.
        """
        server, _ = self.serve("--buffer-frames", "250")
        nginx = self.proxy(server, SNIPPET)
        _, latencies = self.stream(nginx.url, "negative control: --buffer-frames 250, shipped snippet")
        self.assertGreater(len(late(latencies)), self.COUNT // 4, summary(latencies))


class NginxBrowserTests(NginxMixin, SynchronousTestCase):
    def pageThroughNginx(self, engine: str) -> None:
        needProgram("nginx")
        server, _ = self.serve()
        nginx = self.proxy(server, SNIPPET)
        with browser(engine) as b:
            seen = pageRender(b, nginx.url, self.COUNT, str(Path(self.mktemp()).absolute()))
        self.assertOnTime(self.page(seen, f"nginx, shipped snippet, {engine}"))

    def test_chromium(self) -> None:
        """
        The demo page, served through nginx with the shipped snippet, in
        Chromium: it starts a 50-event render and receives every event, in
        order, within 100 ms of its being printed.
        """
        self.pageThroughNginx("chromium")

    def test_firefox(self) -> None:
        """
        The same in Firefox.
        """
        self.pageThroughNginx("firefox")

    def test_webkit(self) -> None:
        """
        The same in WebKit.
        """
        self.pageThroughNginx("webkit")

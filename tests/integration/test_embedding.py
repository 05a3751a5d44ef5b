"""
Embedding: an existing Twisted web app mounts twistedsse under its own
resource tree, at a sub-path, and a render streams through it on real
sockets.
"""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.static import Data

from twistedsse import buildResource, buildService

from twistedsse import DrainingSite

from tests._support.server import ServerMixin, ticker


class EmbeddingTests(ServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_mountedAtASubPath(self) -> None:
        """
        Mounted at C{/api/sse/} beside the host app's own pages, the page,
        the API (with prefixed URLs) and a stream all work, and the host's
        own resources still answer.
        """
        service = buildService(reactor, renderers=[ticker()], outputDir=self.mktemp())
        service.startService()
        self.addCleanup(service.stopService)
        root = Resource()
        root.putChild(b"", Data(b"host app home", "text/plain"))
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"sse", buildResource(service, reactor, keepalive=5))
        site = DrainingSite(root, reactor=reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(site.drain, reactor, 5.0)
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)

        home = yield treq.get(base + "/", pool=pool)
        self.assertEqual((yield treq.content(home)), b"host app home")
        page = yield treq.get(base + "/api/sse/", pool=pool)
        self.assertIn(b"static/app.js", (yield treq.content(page)))

        created = yield treq.post(
            base + "/api/sse/renders", json={"renderer": "ticks", "params": {"count": 5, "interval": 0.01}}, pool=pool
        )
        job = yield created.json()
        self.assertEqual(created.code, 202)
        self.assertEqual(job["events_url"], f"/api/sse/renders/{job['id']}/events")

        self.service = service
        self.base = base
        lines = yield self.clientProcess(base + job["events_url"])
        # Attached while it ran: every event; after its end (the client
        # process may start slower than the render): its latest progress and
        # terminal event only, as a finished job keeps.
        names = [line.get("event") for line in lines[1:]]
        self.assertIn(names, (["progress"] * 5 + ["complete"], ["progress", "complete"]))
        self.assertEqual(json.loads(lines[-2]["data"])["i"], 5)
        self.assertEqual(service.broker.subscriberCount(), 0)

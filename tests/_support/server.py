"""
A real twistedsse server on 127.0.0.1 in the test's reactor, that closes
every connection it accepted at cleanup; an event stream read with treq;
and a client process that timestamps each event it receives
(L{tests._support.sseclient}). For trial TestCases (integration).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import HTTPConnectionPool

from twistedsse import CommandRenderer, EagerSendReactor, EventStreamDecoder, buildService, buildSite

from .launcher import ROOT, TICKER, childEnv
from .waiting import whenTrue

CLIENT = str(ROOT / "tests" / "_support" / "sseclient.py")


def ticker(name: str = "ticks") -> CommandRenderer:
    return CommandRenderer(name, [sys.executable, "-u", TICKER])


def stream(url: str, pool: HTTPConnectionPool, headers: dict[str, str] | None = None) -> tuple[list[Any], Deferred[Any]]:
    """
    Open an event stream with treq (unbuffered: an endless body must not be
    kept), decoding it as it arrives. Returns the list that fills with
    events and a Deferred that fires when the response ends.
    """
    events: list[Any] = []
    decoder = EventStreamDecoder()

    def collect(response: Any) -> Any:
        events.append(response)
        return treq.collect(response, lambda data: events.extend(decoder.feed(data)))

    d = treq.get(url, headers=headers or {}, unbuffered=True, pool=pool).addCallback(collect)
    return events, d


class ServerMixin:
    """
    For trial TestCases: C{startServer} serves twistedsse on an ephemeral
    127.0.0.1 port and arranges for everything to stop afterwards.
    """

    def startServer(self, renderers: Any = (), keepalive: float = 15.0, **kw: Any) -> str:
        kw.setdefault("outputDir", self.mktemp())  # type: ignore[attr-defined]
        kw.setdefault("killGrace", 1.0)
        self.service = buildService(reactor, renderers=renderers, **kw)
        self.service.startService()
        self.addCleanup(self.service.stopService)  # type: ignore[attr-defined]
        self.site = buildSite(self.service, reactor, keepalive=keepalive)
        # As twistd serves it: connections that send each frame at once.
        port = EagerSendReactor(reactor).listenTCP(0, self.site, interface="127.0.0.1")
        # DrainingSite closes every connection it accepted, and waits.
        self.addCleanup(self.site.drain, reactor, 5.0)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        return self.base

    @inlineCallbacks
    def post(self, renderer: str, params: Any) -> Any:
        response = yield treq.post(
            self.base + "/renders", json={"renderer": renderer, "params": params}, pool=self.pool
        )
        body = yield response.json()
        if response.code != 202:
            raise AssertionError(f"POST /renders: {response.code} {body}")
        return body

    @inlineCallbacks
    def getJSON(self, path: str) -> Any:
        response = yield treq.get(self.base + path, pool=self.pool)
        body = yield response.json()
        return response.code, body

    def whenSubscribed(self, count: int, timeout: float = 30.0) -> Deferred[Any]:
        """
        Wait until C{count} streams are subscribed (polling the broker
        every 10 ms, bounded by C{timeout}).
        """
        broker = self.service.broker
        return whenTrue(
            reactor, lambda: broker.subscriberCount() >= count, timeout,
            lambda: f"{count} streams to be subscribed (only {broker.subscriberCount()} are)",
        )  # fmt: skip

    @inlineCallbacks
    def clientProcess(self, url: str, lastEventID: str | None = None, timeout: float = 60) -> Any:
        """
        Run the socket client in its own process; its JSON lines.
        """
        args = [CLIENT, url] + ([lastEventID] if lastEventID else [])
        out, err, code = yield getProcessOutputAndValue(sys.executable, args, env=childEnv()).addTimeout(
            timeout, reactor
        )
        if code != 0:
            raise AssertionError(f"client exited {code}: {err.decode(errors='replace')}")
        return [json.loads(line) for line in out.splitlines()]

"""
Integration-test plumbing: a real twistedsse server on 127.0.0.1 in the
test's reactor, that closes every connection it accepted at cleanup, and
a client process that timestamps each event it receives.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import HTTPConnectionPool

from twistedsse import CommandRenderer, EagerSendReactor, EventStreamDecoder, buildService, buildSite

HERE = Path(__file__).parent
TICKER = str(HERE / "ticker.py")
CLIENT = str(HERE / "sseclient.py")


def ticker(name: str = "ticks") -> CommandRenderer:
    return CommandRenderer(name, [sys.executable, "-u", TICKER])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> str:
    return (
        f"n={len(latencies)} p50={statistics.median(latencies):.2f}ms "
        f"p95={percentile(latencies, 0.95):.2f}ms max={max(latencies):.2f}ms"
    )


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

    @inlineCallbacks
    def whenSubscribed(self, count: int, timeout: float = 30.0) -> Any:
        """
        Wait until C{count} streams are subscribed (polling the broker
        every 10 ms, bounded by C{timeout}).
        """
        deadline = reactor.seconds() + timeout
        while self.service.broker.subscriberCount() < count:
            if reactor.seconds() > deadline:
                raise AssertionError(f"only {self.service.broker.subscriberCount()} of {count} subscribed")
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def clientProcess(self, url: str, lastEventID: str | None = None, timeout: float = 60) -> Any:
        """
        Run the socket client in its own process; its JSON lines.
        """
        args = [CLIENT, url] + ([lastEventID] if lastEventID else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent.parent), env.get("PYTHONPATH")]))
        out, err, code = yield getProcessOutputAndValue(sys.executable, args, env=env).addTimeout(
            timeout, reactor
        )
        if code != 0:
            raise AssertionError(f"client exited {code}: {err.decode(errors='replace')}")
        return [json.loads(line) for line in out.splitlines()]


class ServiceProcess(ProcessProtocol):
    """
    A twistedsse service process (twistd, or C{python -m twistedsse}) as
    the tests see it: its output so far, C{listening} (fires with the port
    once it logs that its site is listening; errbacks with its output if it
    ends first) and C{ended} (fires with how it ended).
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        found = re.search(rb"Site starting on (\d+)", self.output)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)

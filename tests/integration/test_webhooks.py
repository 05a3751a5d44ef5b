"""
Webhooks on real sockets: a receiver (a twisted.web C{Site} on 127.0.0.1)
gets one signed POST of the job when its render ends, verified here as a
receiver would (the README's recipe); it is retried after 5xx answers and
after a receiver that hangs; a C{callback_url} whose host is not allowed
is refused at create time (422) and nothing is sent; and stopping the
service leaves no retry behind (trial's dirty-reactor check).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from twistedsse import CommandRenderer, buildService, buildSite

from tests._support.waiting import whenTrue

SECRET = b"integration-test-secret-0123456789abcdef"
TICKER = str(Path(__file__).with_name("ticker.py"))


def verify(secret: bytes, header: str, body: bytes, tolerance: float = 300) -> bool:
    """
    The README's receiver recipe (section Webhooks), verbatim.
    """
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    t, v1 = fields.get("t", ""), fields.get("v1", "")
    if not t.isdigit() or abs(time.time() - int(t)) > tolerance:
        return False  # too old (a replay) or a clock far off
    expected = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1)


def until(condition: Any, timeout: float, what: str = "the condition") -> Any:
    return whenTrue(reactor, condition, timeout, what)


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class Receiver(Resource):
    """
    Records each POST (headers, body, when) and answers with the next
    status of C{script} (C{None}: hangs, never answers; C{"trickle"}: 200
    and a body that never ends, a byte every 50 ms; C{"big"}: 200 and a
    4 MiB body), then 200.
    """

    isLeaf = True

    def __init__(self, script: list[int | str | None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.script = list(script)
        self.received: list[tuple[dict[bytes, bytes], bytes, float]] = []
        self.hanging: list[Request] = []
        self.trickles: list[LoopingCall] = []

    def render_POST(self, request: Request) -> bytes | int:
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        assert request.content is not None
        self.received.append((headers, request.content.read(), time.monotonic()))
        status = self.script.pop(0) if self.script else 200
        if status is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        if status == "big":
            return b"x" * (4 << 20)
        if status == "trickle":
            self.hanging.append(request)
            trickle = LoopingCall(request.write, b"x")
            trickle.clock = reactor
            self.trickles.append(trickle)
            trickle.start(0.05)
            request.notifyFinish().addBoth(lambda _: trickle.stop())
            return NOT_DONE_YET
        request.setResponseCode(status)
        return b"ok"


class WebhookTests(TestCase):
    timeout = 60

    def startReceiver(self, script: list[int | str | None]) -> Receiver:
        receiver = Receiver(script)
        site = Site(receiver)
        site.timeOut = None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.receiverURL = f"http://127.0.0.1:{port.getHost().port}/hooks/in"
        self.receiverPort = port.getHost().port
        return receiver

    def startService(self, timeout: float = 10.0, allow: list[str] | None = None) -> None:
        self.service = buildService(
            reactor,
            renderers=[CommandRenderer("ticks", [sys.executable, TICKER])],
            outputDir=self.mktemp(),
            killGrace=1.0,
            callbackAllow=allow if allow is not None else [f"127.0.0.1:{self.receiverPort}"],
            callbackSecret=SECRET,
        )
        hooks = self.service.webhooks
        assert hooks is not None
        # Fast retries for the test (the defaults are seconds to minutes).
        hooks.backoffBase = 0.05
        hooks.timeout = timeout
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        site = buildSite(self.service, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(site.drain, reactor, 5.0)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @inlineCallbacks
    def create(self, body: dict[str, Any]) -> Any:
        response = yield treq.post(self.base + "/renders", json=body, pool=self.pool)
        data = yield response.json()
        return response.code, data

    @inlineCallbacks
    def test_delivered(self) -> Any:
        """
        A render with a C{callback_url} ends: its job's JSON is POSTed
        there once, with a signature that verifies with the secret; the
        job's JSON shows the C{callback_url}.
        """
        receiver = self.startReceiver([])
        self.startService()
        code, job = yield self.create(
            {"renderer": "ticks", "params": {"count": 3, "interval": 0.01}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, job)
        self.assertEqual(job["callback_url"], self.receiverURL)
        yield until(lambda: receiver.received, timeout=20)
        yield sleep(0.3)  # (no second one)
        [(headers, body, _)] = receiver.received
        self.assertTrue(verify(SECRET, headers[b"twistedsse-signature"].decode(), body))
        self.assertFalse(verify(SECRET + b"!", headers[b"twistedsse-signature"].decode(), body))
        self.assertEqual(headers[b"content-type"], b"application/json")
        sent = json.loads(body)
        self.assertEqual((sent["id"], sent["state"]), (job["id"], "succeeded"))
        self.assertEqual(sent["callback_url"], self.receiverURL)
        response = yield treq.get(self.base + job["status_url"], pool=self.pool)
        status = yield response.json()
        self.assertEqual(status["callback_url"], self.receiverURL)
        self.assertEqual(self.service.webhooks.pendingCount(), 0)

    @inlineCallbacks
    def test_failedAndCancelled(self) -> Any:
        """
        Every terminal state is sent: a render that fails, and one
        cancelled while it runs.
        """
        receiver = self.startReceiver([])
        self.startService()
        code, failing = yield self.create(
            {"renderer": "ticks", "params": {"count": 1, "exit": 3}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, failing)
        code, slow = yield self.create(
            {"renderer": "ticks", "params": {"count": 1000, "interval": 0.05}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, slow)
        yield sleep(0.2)
        response = yield treq.delete(self.base + slow["status_url"], pool=self.pool)
        yield response.content()
        yield until(lambda: len(receiver.received) == 2, timeout=20)
        states = {json.loads(body)["id"]: json.loads(body)["state"] for _, body, _ in receiver.received}
        self.assertEqual(states, {failing["id"]: "failed", slow["id"]: "cancelled"})

    @inlineCallbacks
    def test_retriedAfterServerErrors(self) -> Any:
        """
        A receiver answering 500, 503, then 200 gets three POSTs of the same
        body, each signed anew, and then no more.
        """
        receiver = self.startReceiver([500, 503, 200])
        self.startService()
        code, job = yield self.create(
            {"renderer": "ticks", "params": {"count": 2, "interval": 0.01}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, job)
        yield until(lambda: len(receiver.received) >= 3, timeout=20)
        yield until(lambda: self.service.webhooks.pendingCount() == 0, timeout=5)
        yield sleep(0.5)
        self.assertEqual(len(receiver.received), 3)
        bodies = {body for _, body, _ in receiver.received}
        self.assertEqual(len(bodies), 1)
        for headers, body, _ in receiver.received:
            self.assertTrue(verify(SECRET, headers[b"twistedsse-signature"].decode(), body))

    @inlineCallbacks
    def test_hangingReceiver(self) -> Any:
        """
        A receiver that never answers costs its own attempt only: it is
        given up after the attempt timeout (0.5 s here) and retried; other
        requests are answered meanwhile.
        """
        receiver = self.startReceiver([None, 200])
        self.startService(timeout=0.5)
        code, job = yield self.create(
            {"renderer": "ticks", "params": {"count": 2, "interval": 0.01}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, job)
        yield until(lambda: receiver.received, timeout=20)
        response = yield treq.get(self.base + "/healthz", pool=self.pool)
        self.assertEqual(response.code, 200)
        yield response.content()
        yield until(lambda: len(receiver.received) == 2, timeout=10)
        first, second = receiver.received[0][2], receiver.received[1][2]
        self.assertGreaterEqual(second - first, 0.5)
        yield until(lambda: self.service.webhooks.pendingCount() == 0, timeout=5)
        # The hung request's connection was closed by the sender.
        yield until(lambda: receiver.hanging[0].channel is None or receiver.hanging[0]._disconnected, timeout=5)

    @inlineCallbacks
    def test_endlessAnswer(self) -> Any:
        """
        A receiver whose answer's body never ends holds its attempt no
        longer than the timeout: the connection is closed and the
        delivery retried; a big answer is read only up to a bound (its
        status counts) and its connection closed.
        """
        receiver = self.startReceiver(["trickle", "big"])
        self.startService(timeout=0.5)
        code, job = yield self.create(
            {"renderer": "ticks", "params": {"count": 2, "interval": 0.01}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, job)
        yield until(lambda: len(receiver.received) == 2, 20, "two attempts")
        yield until(lambda: not receiver.trickles[0].running, 5, "the trickling answer to be cut")
        yield until(lambda: self.service.webhooks.pendingCount() == 0, 5, "the delivery to end")
        yield sleep(0.3)
        self.assertEqual(len(receiver.received), 2)

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        A C{callback_url} whose host (or port) is not allowed is 422
        C{callback_not_allowed}; one that is no http(s) URL is 422
        C{invalid_callback_url}; no job is made and nothing is sent.
        """
        receiver = self.startReceiver([])
        self.startService()
        other = f"http://127.0.0.1:{self.receiverPort + 1 if self.receiverPort < 65535 else 1}/"
        for url, error in (
            (f"http://localhost:{self.receiverPort}/hooks/in", "callback_not_allowed"),
            (f"http://127.0.0.2:{self.receiverPort}/hooks/in", "callback_not_allowed"),
            (other, "callback_not_allowed"),
            (f"http://user@127.0.0.1:{self.receiverPort}/", "invalid_callback_url"),
            (f"ftp://127.0.0.1:{self.receiverPort}/", "invalid_callback_url"),
            (5, "invalid_callback_url"),
        ):
            code, body = yield self.create(
                {"renderer": "ticks", "params": {"count": 1}, "callback_url": url}
            )
            self.assertEqual((code, body["error"]), (422, error), url)
        yield sleep(0.5)
        self.assertEqual(receiver.received, [])

    @inlineCallbacks
    def test_noneAllowedByDefault(self) -> Any:
        """
        A server without callbacks configured refuses every
        C{callback_url}, loopback included.
        """
        receiver = self.startReceiver([])
        self.service = buildService(
            reactor, renderers=[CommandRenderer("ticks", [sys.executable, TICKER])], outputDir=self.mktemp()
        )
        self.assertIsNone(self.service.webhooks)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        site = buildSite(self.service, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(site.drain, reactor, 5.0)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        code, body = yield self.create({"renderer": "ticks", "callback_url": self.receiverURL})
        self.assertEqual((code, body["error"]), (422, "callback_not_allowed"))
        self.assertEqual(receiver.received, [])

    @inlineCallbacks
    def test_stopCancelsRetries(self) -> Any:
        """
        Stopping the service while a delivery waits to retry cancels it:
        the stop completes, nothing is left scheduled (trial fails a test
        that leaves a timer or a connection), no POST comes after.
        """
        receiver = self.startReceiver([500] * 100)
        self.startService()
        self.service.webhooks.backoffBase = 5.0
        self.service.webhooks.random = lambda: 1.0
        code, job = yield self.create(
            {"renderer": "ticks", "params": {"count": 1}, "callback_url": self.receiverURL}
        )
        self.assertEqual(code, 202, job)
        yield until(lambda: receiver.received, timeout=20)
        yield until(lambda: self.service.webhooks.pendingCount() == 1 and not any(
            d.queued for d in self.service.webhooks._pending) and all(
            d.waiting for d in self.service.webhooks._pending), timeout=5)
        yield self.service.stopService()
        self.assertEqual(self.service.webhooks.pendingCount(), 0)
        yield sleep(0.2)
        self.assertEqual(len(receiver.received), 1)

"""
Webhooks in Redis mode, with real processes: two web instances and one
worker (C{twistd twistedsse}, L{tests._support.cluster}) allow the test's
receiver; each job's callback is sent exactly once, by the process whose
compare-and-set ended it: the worker for a render that succeeds or is
cancelled while running, the web instance that cancelled a queued one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests._support.cluster import Cluster, logsOf
from tests._support.redis import RedisServer
from tests._support.waiting import whenTrue

SECRET = b"redis-webhook-test-secret-0123456789abcdef"


class Receiver(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.received: list[tuple[str, bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        signature = (request.getHeader(b"twistedsse-signature") or b"").decode()
        self.received.append((signature, request.content.read()))
        return b"ok"


def verify(header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    if abs(time.time() - int(fields["t"])) > 300:
        return False
    expected = hmac.new(SECRET, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


class RedisWebhookTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_oncePerJob(self) -> Any:
        """
        Three jobs end three ways (succeeded on the worker; a queued one
        cancelled through the other web instance; a running one cancelled
        through it): one signed POST each, of the job in its final state,
        none twice; a host not allowed is refused by either instance.
        """
        receiver = Receiver()
        site = Site(receiver)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        hookPort = port.getHost().port
        url = f"http://127.0.0.1:{hookPort}/in"
        secretFile = self.mktemp()
        with open(secretFile, "wb") as f:
            f.write(SECRET)
        redis = RedisServer()
        self.addCleanup(redis.stop)
        cluster = Cluster(self, redis.url)
        hooks = ("--callback-allow", f"127.0.0.1:{hookPort}", "--callback-secret-file", secretFile)
        web1, web2, worker = yield cluster.startMany(
            ("web", *hooks), ("web", *hooks), ("worker", "--max-renders", "1", *hooks)
        )

        @inlineCallbacks
        def create(instance: Any, params: Any, callback: str = url) -> Any:
            code, _, content = yield cluster.request(
                "POST", instance.base + "/renders", {"renderer": "ticks", "params": params, "callback_url": callback}
            )
            return code, json.loads(content)

        for instance in (web1, web2):
            code, body = yield create(instance, {"count": 1}, "http://127.0.0.2:1/in")
            self.assertEqual((code, body["error"]), (422, "callback_not_allowed"))

        code, running = yield create(web1, {"count": 400, "interval": 0.05})
        self.assertEqual(code, 202, running)
        yield cluster.whenState(web1, running, ("running",))
        code, queued = yield create(web1, {"count": 1})
        self.assertEqual(code, 202, queued)
        self.assertEqual(queued["callback_url"], url)
        # Cancelled through the other instance: the queued one is ended by
        # web2, the running one by the worker.
        code, _, _ = yield cluster.request("DELETE", web2.base + queued["status_url"])
        self.assertEqual(code, 202)
        code, _, _ = yield cluster.request("DELETE", web2.base + running["status_url"])
        self.assertEqual(code, 202)
        code, succeeding = yield create(web2, {"count": 2, "interval": 0.01})
        self.assertEqual(code, 202, succeeding)
        yield whenTrue(
            reactor, lambda: len(receiver.received) >= 3, 30,
            lambda: f"three callbacks (got {len(receiver.received)})\n{logsOf(web1, web2, worker)}",
        )  # fmt: skip
        # Time for a duplicate to arrive, if any process sent one.
        yield deferLater(reactor, 1.0, lambda: None)
        sent = [json.loads(body) for _, body in receiver.received]
        self.assertEqual(Counter(s["id"] for s in sent), Counter([running["id"], queued["id"], succeeding["id"]]))
        states = {s["id"]: s["state"] for s in sent}
        self.assertEqual(
            states, {running["id"]: "cancelled", queued["id"]: "cancelled", succeeding["id"]: "succeeded"}
        )
        for signature, body in receiver.received:
            self.assertTrue(verify(signature, body), signature)
        # Sent by the process that ended each job.
        self.assertIn(f"callback for render {queued['id']} delivered", web2.log())
        self.assertIn(f"callback for render {running['id']} delivered", worker.log())
        self.assertIn(f"callback for render {succeeding['id']} delivered", worker.log())

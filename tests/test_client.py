"""
The EventSource client, against the real app resource and small custom
resources, in memory through C{treq.testing.StubTreq}, on a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistedsse._build import buildResource
from twistedsse._frames import Event
from twistedsse.client import HTTPStatusError, subscribe
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService


class Scripted(Resource):
    """
    Answers each request with the next scripted (code, body, finish)
    response, recording the C{Last-Event-ID} it was sent.
    """

    isLeaf = True

    def __init__(self, *responses: tuple[int, bytes, bool]) -> None:
        super().__init__()
        self.responses = list(responses)
        self.lastEventIDs: list[bytes | None] = []
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.lastEventIDs.append(request.getHeader(b"last-event-id"))
        self.requests.append(request)
        code, body, finish = self.responses.pop(0)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/event-stream" if code == 200 else b"application/json")
        if finish:
            return body
        request.write(body)
        return NOT_DONE_YET


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[Event] = []

    def test_streamsTheAppUntilTheTerminalEvent(self) -> None:
        """
        Against the real app, each event arrives decoded as it is
        published; the terminal event ends the subscription without another
        request.
        """
        spawner = FakeSpawner()
        service = ticksService(self.clock, spawner, self.mktemp())
        stub = StubTreq(buildResource(service, self.clock))
        jobID = service.submit("ticks", {}).id
        subscription = subscribe(f"http://localhost/renders/{jobID}/events", self.events.append, clock=self.clock, client=stub)
        stub.flush()
        process = spawner.processes[0]
        process.stdout(b'{"progress": 0.5}\n')
        stub.flush()
        self.assertEqual([(e.event, e.id, json.loads(e.data)) for e in self.events], [("progress", "1", {"progress": 0.5})])
        self.assertNoResult(subscription.done)
        process.exit(0)
        stub.flush()
        self.assertEqual([e.event for e in self.events], ["progress", "complete"])
        self.successResultOf(subscription.done)
        self.assertEqual((subscription.connections, subscription.lastEventID), (1, "2"))
        # The finished job's expiry is the service's one timer until it stops.
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(service.broker.subscriberCount(), 0)

    def test_reconnectsWithLastEventIDAfterRetry(self) -> None:
        """
        When the server ends the response early, the client reconnects after
        the server's C{retry:} delay, sending C{Last-Event-ID}.
        """
        server = Scripted(
            (200, b"retry: 500\n\nid: 1\nevent: progress\ndata: a\n\n", True),
            (200, b"id: 2\nevent: complete\ndata: {}\n\n", False),
        )
        stub = StubTreq(server)
        subscription = subscribe("http://localhost/events", self.events.append, clock=self.clock, client=stub)
        stub.flush()
        self.assertEqual([e.id for e in self.events], ["1"])
        self.clock.advance(0.499)
        stub.flush()
        self.assertEqual(server.lastEventIDs, [None])
        self.clock.advance(0.001)
        stub.flush()
        self.assertEqual(server.lastEventIDs, [None, b"1"])
        self.assertEqual([e.id for e in self.events], ["1", "2"])
        self.successResultOf(subscription.done)
        self.assertEqual(subscription.connections, 2)
        self.assertTrue(server.requests[-1]._disconnected, "the client did not hang up")

    def test_idWithoutDataIsSentOnReconnect(self) -> None:
        """
        An opening frame with an id and no data (C{/render-stream}'s
        C{id: JOBID:0}) dispatches no event, but the reconnect after a drop
        before the first event sends that id, as a browser does.
        """
        server = Scripted(
            (200, b"retry: 500\nid: job:0\n\n", True),
            (200, b"id: job:1\nevent: complete\ndata: {}\n\n", False),
        )
        stub = StubTreq(server)
        subscription = subscribe("http://x/events", self.events.append, clock=self.clock, client=stub)
        stub.flush()
        self.assertEqual(self.events, [])
        self.clock.advance(0.5)
        stub.flush()
        self.assertEqual(server.lastEventIDs, [None, b"job:0"])
        self.assertEqual([e.id for e in self.events], ["job:1"])
        self.successResultOf(subscription.done)

    def test_204Ends(self) -> None:
        """
        C{204 No Content} ends the subscription normally.
        """
        stub = StubTreq(Scripted((204, b"", True)))
        subscription = subscribe("http://localhost/e", self.events.append, clock=self.clock, client=stub, lastEventID="9")
        stub.flush()
        self.successResultOf(subscription.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_errorStatusFails(self) -> None:
        """
        A 404 (or any non-200 answer) fails the subscription with the status
        and body, and it does not reconnect.
        """
        stub = StubTreq(Scripted((404, b'{"error": "unknown_job"}', True)))
        subscription = subscribe("http://localhost/e", self.events.append, clock=self.clock, client=stub)
        stub.flush()
        error = self.failureResultOf(subscription.done, HTTPStatusError).value
        self.assertEqual((error.code, error.body), (404, b'{"error": "unknown_job"}'))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeStopsEverything(self) -> None:
        """
        C{close()} mid-stream drops the connection and cancels any
        reconnect; C{done} fires.
        """
        server = Scripted((200, b"id: 1\ndata: a\n\n", False))
        stub = StubTreq(server)
        subscription = subscribe("http://localhost/e", self.events.append, clock=self.clock, client=stub)
        stub.flush()
        subscription.close()
        stub.flush()
        self.successResultOf(subscription.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(server.requests[0]._disconnected or server.requests[0].finished)

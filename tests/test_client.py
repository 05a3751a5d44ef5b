"""
The EventSource client, against the real app resource and small custom
resources, in memory through C{treq.testing.StubTreq}, on a L{Clock}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistedsse._build import buildResource
from twistedsse._frames import Event
from twistedsse.client import (
    APIError, HTTPStatusError, InvalidRequest, Job, JobFinished, NoOutput, QueueFull, RenderClient, RetryLater,
    Unauthorized, UnexpectedResponse, UnknownJob, subscribe,
)  # fmt: skip
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

    def test_backsOffWhileConnectionsFail(self) -> None:
        """
        A stream that ends before a byte arrives is retried after the
        backoff policy's delay for that attempt (the server's C{retry:} is
        the least); once a connection gets data, the next reconnect is after
        C{retry:} again.
        """
        server = Scripted(
            (200, b"", True),
            (200, b"", True),
            (200, b"id: 1\ndata: a\n\n", True),
            (200, b"id: 2\nevent: complete\ndata: {}\n\n", False),
        )
        stub = StubTreq(server)
        subscription = subscribe(
            "http://x/e", self.events.append, clock=self.clock, client=stub, retry=100,
            backoff=backoffPolicy(initialDelay=1.0, factor=2.0, jitter=lambda: 0.0),
        )  # fmt: skip
        stub.flush()
        self.assertEqual(len(server.lastEventIDs), 1)
        self.clock.advance(0.999)
        stub.flush()
        self.assertEqual(len(server.lastEventIDs), 1)
        self.clock.advance(0.001)  # attempt 0: 1 s
        stub.flush()
        self.assertEqual((len(server.lastEventIDs), subscription.failures), (2, 2))
        self.clock.advance(1.999)
        stub.flush()
        self.assertEqual(len(server.lastEventIDs), 2)
        self.clock.advance(0.001)  # attempt 1: 2 s
        stub.flush()
        self.assertEqual([e.id for e in self.events], ["1"])
        self.clock.advance(0.1)  # data arrived: back to retry
        stub.flush()
        self.assertEqual([e.id for e in self.events], ["1", "2"])
        self.assertEqual(subscription.failures, 0)
        self.successResultOf(subscription.done)

    def test_lineLengthBound(self) -> None:
        """
        A line longer than C{maxLineLength} ends the subscription with the
        decoder's C{ValueError} and hangs up; it does not reconnect.
        """
        server = Scripted((200, b"data: " + b"x" * 200, False))
        stub = StubTreq(server)
        subscription = subscribe("http://x/e", self.events.append, clock=self.clock, client=stub, maxLineLength=100)
        stub.flush()
        self.failureResultOf(subscription.done, ValueError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(server.requests[0]._disconnected)

    def test_maxFailures(self) -> None:
        """
        With C{maxFailures}, a stream whose first connection fails ends at
        once with that error; one that was open gives up after that many
        failed reconnects in a row, with C{ConnectionDone}.
        """

        class Refusing:
            def get(self, url: str, headers: Any, unbuffered: bool) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        subscription = subscribe("http://x/e", self.events.append, clock=self.clock, client=Refusing(), maxFailures=3)
        self.failureResultOf(subscription.done, ConnectionRefusedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        server = Scripted((200, b"id: 1\ndata: a\n\n", True), (200, b"", True), (200, b"", True))
        stub = StubTreq(server)
        subscription = subscribe(
            "http://x/e", self.events.append, clock=self.clock, client=stub, retry=100, maxFailures=1,
            backoff=backoffPolicy(jitter=lambda: 0.0),
        )  # fmt: skip
        stub.flush()
        self.clock.advance(0.1)
        stub.flush()
        self.assertNoResult(subscription.done)
        self.clock.advance(1.0)
        stub.flush()
        self.failureResultOf(subscription.done, ConnectionDone)
        self.assertEqual((len(server.lastEventIDs), self.clock.getDelayedCalls()), (3, []))


class FirstTenth(Resource):
    """
    Answers a C{GET} with a C{Content-Length} of 1000 and the first 100
    bytes, then nothing more: the test holds C{request}.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"1000")
        request.write(b"x" * 100)
        self.request = request
        return NOT_DONE_YET


class Answers(Resource):
    """
    Answers every request with one fixed response, recording the requests.
    """

    isLeaf = True

    def __init__(self, code: int, body: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.code, self.body, self.headers = code, body, headers or {}
        self.requests: list[Any] = []

    def render(self, request: Any) -> bytes:
        self.requests.append(request)
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class RenderClientTests(SynchronousTestCase):
    """
    L{RenderClient} against the real app in memory (C{StubTreq}), on a
    L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, self.mktemp())
        self.stub = StubTreq(buildResource(self.service, self.clock))
        self.client = RenderClient("http://localhost", reactor=self.clock, http=self.stub)

    def tearDown(self) -> None:
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.service.broker.subscriberCount(), 0)

    def result(self, d: Deferred[Any]) -> Any:
        self.stub.flush()
        return self.successResultOf(d)

    def test_wholeRender(self) -> None:
        """
        create, status, whenFinished (with the events on the way) and
        download: the output arrives in the file, whole; no temporary file
        is left beside it.
        """
        job = self.result(self.client.create("ticks", {"n": 1}))
        self.assertIsInstance(job, Job)
        self.assertEqual((job.renderer, job.state, job.finished), ("ticks", "running", False))
        self.assertEqual(job.eventsURL, f"http://localhost/renders/{job.id}/events")
        events: list[Event] = []
        finished = self.client.whenFinished(job.id, events.append)
        self.stub.flush()
        process = self.spawner.processes[0]
        process.stdout(b'{"progress": 0.5}\n')
        self.stub.flush()
        self.assertEqual([e.event for e in events], ["progress"])
        self.assertNoResult(finished)
        self.assertEqual(self.result(self.client.status(job.id)).progress, {"progress": 0.5})
        Path(process.env["TWISTEDSSE_OUTPUT"]).write_bytes(b"output " * 1000)
        process.exit(0)
        ended = self.result(finished)
        self.assertEqual((ended.state, ended.finished, ended.result["size"]), ("succeeded", True, 7000))
        self.assertEqual([e.event for e in events], ["progress", "complete"])
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        self.assertEqual(self.result(self.client.download(job.id, target)), 7000)
        self.assertEqual(target.read_bytes(), b"output " * 1000)
        self.assertEqual(sorted(p.name for p in target.parent.iterdir()), [target.name])

    def test_cancel(self) -> None:
        """
        cancel answers the job; cancelling it again fails with
        L{JobFinished}, whose code and status are the server's.
        """
        job = self.result(self.client.create("ticks"))
        d = self.client.cancel(job.id)
        self.stub.flush()
        self.assertEqual(self.spawner.processes[0].signals, ["TERM"])
        self.spawner.processes[0].exit(None, "TERM")
        self.result(d)
        self.assertEqual(self.result(self.client.status(job.id)).state, "cancelled")
        d = self.client.cancel(job.id)
        self.stub.flush()
        error = self.failureResultOf(d, JobFinished).value
        self.assertEqual((error.code, error.status), ("job_finished", 409))

    def test_typedErrors(self) -> None:
        """
        The JSON error codes become the client's error classes: an unknown
        job, invalid params, an unknown renderer; an events stream of an
        unknown job too.
        """
        d = self.client.status("nope")
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, UnknownJob).value.code, "unknown_job")
        d = self.client.create("nope")
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, InvalidRequest).value.code, "unknown_renderer")
        subscription = self.client.events("nope", lambda e: None)
        self.stub.flush()
        self.failureResultOf(subscription.done, UnknownJob)

    def test_downloadFailureLeavesNothing(self) -> None:
        """
        A download before the output exists fails with L{NoOutput} and
        creates no file.
        """
        job = self.result(self.client.create("ticks"))
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        d = self.client.download(job.id, target)
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, NoOutput).value.code, "output_not_ready")
        self.assertEqual(list(target.parent.iterdir()), [])
        self.spawner.processes[0].exit(0)
        self.stub.flush()


class ClientErrorTests(SynchronousTestCase):
    """
    Answers the real app never gives, from small resources.
    """

    def client(self, resource: Resource, token: str | None = None) -> tuple[RenderClient, StubTreq, Clock]:
        clock = Clock()
        clock.advance(1_000_000)
        stub = StubTreq(resource)
        return RenderClient("http://localhost/base/", token=token, reactor=clock, http=stub), stub, clock

    def test_retryAfter(self) -> None:
        """
        C{queue_full} is L{QueueFull}, a L{RetryLater} with the server's
        C{Retry-After} in seconds, in either of its forms.
        """
        body = b'{"error": "queue_full", "detail": "the queue is full"}'
        for value, expected in [(b"7", 7.0), (b"Mon, 12 Jan 1970 13:46:50 GMT", 10.0), (b"soon", None)]:
            client, stub, clock = self.client(Answers(429, body, {b"retry-after": value}))
            d = client.create("card")
            stub.flush()
            error = self.failureResultOf(d, QueueFull).value
            self.assertEqual((error.code, error.detail, error.status, error.retryAfter),
                             ("queue_full", "the queue is full", 429, expected))  # fmt: skip

    def test_notTheAPI(self) -> None:
        """
        An answer that is not the API's JSON (a proxy's page) is
        L{UnexpectedResponse}, or L{RetryLater} for a 503.
        """
        client, stub, clock = self.client(Answers(502, b"<html>Bad Gateway</html>"))
        d = client.status("x")
        stub.flush()
        self.assertEqual(self.failureResultOf(d, UnexpectedResponse).value.status, 502)
        client, stub, clock = self.client(Answers(503, b"<html>down</html>", {b"retry-after": b"3"}))
        d = client.status("x")
        stub.flush()
        self.assertEqual(self.failureResultOf(d, RetryLater).value.retryAfter, 3.0)
        client, stub, clock = self.client(Answers(200, b"[1, 2]"))
        d = client.status("x")
        stub.flush()
        self.failureResultOf(d, UnexpectedResponse)

    def test_unknownCodes(self) -> None:
        """
        An error code this client does not know (a newer server's) gets the
        class of its status, keeping its code.
        """
        for status, kind in [(422, InvalidRequest), (403, Unauthorized), (503, RetryLater), (418, APIError)]:
            client, stub, clock = self.client(Answers(status, b'{"error": "new_code", "detail": "d"}'))
            d = client.create("card")
            stub.flush()
            error = self.failureResultOf(d, APIError).value
            self.assertIs(type(error), kind)
            self.assertEqual((error.code, error.status), ("new_code", status))

    def test_jsonBound(self) -> None:
        """
        A JSON answer over C{maxJSONBytes} fails with L{UnexpectedResponse}
        instead of being read whole.
        """
        client, stub, clock = self.client(Answers(200, b'{"id": "' + b"x" * 5000 + b'"}'))
        client.maxJSONBytes = 1000
        d = client.status("x")
        stub.flush()
        self.assertIn("over 1000 bytes", self.failureResultOf(d, UnexpectedResponse).value.detail)

    def test_whenFinishedWaitsForAStream(self) -> None:
        """
        C{whenFinished} told C{too_many_streams} (503, C{Retry-After: 2})
        tries again 2 s later, resuming after the last event it had; once
        the terminal event arrives, it reads the job.
        """
        job = {"id": "j", "renderer": "card", "state": "succeeded", "result": {"size": 1}}
        server = Scripted(
            (200, b"id: 1\nevent: progress\ndata: {}\n\n", True),
            (503, b'{"error": "too_many_streams", "detail": "later"}', True),
            (200, b"id: 2\nevent: complete\ndata: {}\n\n", True),
            (200, json.dumps(job).encode(), True),
        )
        client, stub, clock = self.client(server)
        events: list[Event] = []
        d = client.whenFinished("j", events.append)
        stub.flush()
        clock.advance(3.0)  # the server's retry: (the default 3 s)
        stub.flush()
        self.assertEqual(len(server.requests), 2)
        self.assertNoResult(d)
        clock.advance(2.0)
        stub.flush()
        finished = self.successResultOf(d)
        self.assertEqual((finished.state, finished.result), ("succeeded", {"size": 1}))
        self.assertEqual([e.event for e in events], ["progress", "complete"])
        self.assertEqual(server.lastEventIDs, [None, b"1", b"1", None])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_downloadCutShort(self) -> None:
        """
        A download whose connection is lost midway fails and leaves neither
        the file nor its temporary file; a file already there is untouched.
        """

        resource = FirstTenth()
        client, stub, clock = self.client(resource)
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"the old one")
        d = client.download("j", target)
        stub.flush()
        self.assertNoResult(d)
        self.assertEqual(len(list(target.parent.iterdir())), 2)  # it and the temporary file
        resource.request.transport.loseConnection()
        stub.flush()
        self.failureResultOf(d)
        self.assertEqual([p.name for p in target.parent.iterdir()], [target.name])
        self.assertEqual(target.read_bytes(), b"the old one")

    def test_downloadCancelled(self) -> None:
        """
        Cancelling a download midway drops its connection and leaves no
        file; what arrives after is not written.
        """

        resource = FirstTenth()
        client, stub, clock = self.client(resource)
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        d = client.download("j", target)
        stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        resource.request.write(b"y" * 100)
        stub.flush()
        self.assertEqual(list(target.parent.iterdir()), [])
        self.assertTrue(resource.request._disconnected)

    def test_whenFinishedIsBounded(self) -> None:
        """
        A job whose stream says it has ended (204) while its state says it
        runs is looked at again every 0.5 s, 60 times, then
        C{whenFinished} fails rather than wait for ever.
        """

        class Stuck(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                if request.path.endswith(b"/events"):
                    request.setResponseCode(204)
                    return b""
                return json.dumps({"id": "j", "renderer": "card", "state": "running"}).encode()

        client, stub, clock = self.client(Stuck())
        d = client.whenFinished("j")
        for _ in range(59):
            stub.flush()
            clock.advance(0.5)
        stub.flush()
        self.assertNoResult(d)
        clock.advance(0.5)
        stub.flush()
        self.assertIn("did not end after 60 attempts", self.failureResultOf(d, UnexpectedResponse).value.detail)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_tokenAndPrefix(self) -> None:
        """
        The token goes in C{Authorization: Bearer}; the base URL's path
        prefix is kept; the token is not in the client's repr.
        """
        resource = Answers(401, b'{"error": "unauthorized", "detail": "a token is needed"}')
        client, stub, clock = self.client(resource, token="s3cret")
        d = client.cancel("job1")
        stub.flush()
        self.assertEqual(self.failureResultOf(d, Unauthorized).value.status, 401)
        request = resource.requests[0]
        self.assertEqual((request.method, request.path), (b"DELETE", b"/base/renders/job1"))
        self.assertEqual(request.getHeader(b"authorization"), b"Bearer s3cret")
        self.assertNotIn("s3cret", repr(client))

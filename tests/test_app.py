"""
The HTTP API end to end over a real L{Site} on an in-memory transport:
routes, status codes, JSON errors, the event stream and the output file.
Render processes are the fake spawner's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistedsse._app import TwistedSSEApp, _EventsFirst, _RequireUTF8
from twistedsse._broker import MemoryBroker
from twistedsse._build import buildResource, buildSite
from twistedsse._card import CardRenderer
from twistedsse._command import CommandRenderer
from twistedsse._job import JobState
from twistedsse._service import RenderService
from twistedsse._site import BoundedRequest
from twistedsse._stream import StreamLimits, StreamSettings
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, chunks, decode, splitResponse


class AppTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.dir = Path(self.mktemp())
        self.service = RenderService(
            clock=self.clock,
            spawner=self.spawner,
            broker=MemoryBroker(),
            renderers={
                "card": CardRenderer(ffmpeg="/opt/ffmpeg"),
                "ticks": CommandRenderer("ticks", ["/bin/ticks", "--fast"]),
            },
            outputDir=self.dir,
            maxRenders=2,
        )
        self.service.startService()
        self.site = buildSite(self.service, self.clock, keepalive=15.0, retry=1000)

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, dict[bytes, bytes], Any]:
        conn = Connection(self.site)
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if data:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, hdrs, data)
        status, head, payload = splitResponse(conn.take())
        conn.disconnect()
        if head.get(b"content-type") == b"application/json" and payload:
            return status, head, json.loads(payload)
        return status, head, payload

    def assertError(self, response: tuple[int, dict[bytes, bytes], Any], status: int, code: str) -> str:
        got, head, body = response
        self.assertEqual((got, head.get(b"content-type")), (status, b"application/json"), body)
        self.assertEqual(set(body), {"error", "detail"})
        self.assertEqual(body["error"], code)
        self.assertNotIn("Traceback", body["detail"])
        return body["detail"]

    def create(self, renderer: str = "ticks", params: Any = {}, prefix: str = "") -> dict[str, Any]:
        request = {"renderer": renderer} if params is None else {"renderer": renderer, "params": params}
        status, head, body = self.call("POST", prefix + "/renders", request)
        self.assertEqual(status, 202, body)
        self.assertEqual(head[b"location"].decode(), body["status_url"])
        return body

    def test_createReturnsLinks(self) -> None:
        """
        C{POST /renders} answers 202 with the job's id, state and URLs.
        """
        body = self.create()
        jobID = body["id"]
        self.assertEqual(body["renderer"], "ticks")
        self.assertEqual(body["state"], "running")
        self.assertEqual(body["status_url"], f"/renders/{jobID}")
        self.assertEqual(body["events_url"], f"/renders/{jobID}/events")
        self.assertEqual(body["output_url"], f"/renders/{jobID}/output")
        self.assertGreaterEqual(len(jobID), 22)

    def test_commandRendererGetsParamsOnStdin(self) -> None:
        """
        A command renderer runs the operator's argv, never a shell, with the
        client's params as JSON on stdin.
        """
        self.create(params={"n": 3, "text": "; rm -rf / $(x)"})
        process = self.spawner.processes[-1]
        self.assertEqual(process.args, ["/bin/ticks", "--fast"])
        self.assertEqual(json.loads(process.stdin), {"n": 3, "text": "; rm -rf / $(x)"})

    def test_status(self) -> None:
        """
        C{GET /renders/{id}} gives the state, last progress, timings and
        error.
        """
        jobID = self.create()["id"]
        self.spawner.processes[-1].stdout(b'{"progress": 0.25}\n')
        status, _, body = self.call("GET", f"/renders/{jobID}")
        self.assertEqual(status, 200)
        self.assertEqual(body["state"], "running")
        self.assertEqual(body["progress"], {"progress": 0.25})
        self.assertIsNotNone(body["started_at"])
        self.assertIsNone(body["error"])

    def test_streamOverTheApp(self) -> None:
        """
        The events URL streams progress then the terminal event, each as
        its own chunk at once, and the response ends.
        """
        job = self.create()
        conn = Connection(self.site)
        conn.request("GET", job["events_url"], {"Accept": "text/event-stream"})
        status, head, body = splitResponse(conn.take())
        self.assertEqual((status, head[b"content-type"]), (200, b"text/event-stream; charset=utf-8"))
        self.assertEqual(body, b"retry: 1000\n\n")
        process = self.spawner.processes[-1]
        process.stdout(b'{"progress": 0.5, "t_ns": 1}\n')
        (frame,) = chunks(conn.take())
        (event,) = decode(frame)
        self.assertEqual((event.event, event.id, json.loads(event.data)), ("progress", "1", {"progress": 0.5, "t_ns": 1}))
        process.exit(0)
        wire = conn.take()
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        (done,) = decode(b"".join(chunks(wire)))
        self.assertEqual(done.event, "complete")
        self.assertEqual(json.loads(done.data)["output_url"], None)  # ticks made no file
        conn.disconnect()

    def test_cancel(self) -> None:
        """
        C{DELETE} cancels a running render (its child gets TERM); a second
        C{DELETE} once it has ended is 409.
        """
        jobID = self.create()["id"]
        status, _, _ = self.call("DELETE", f"/renders/{jobID}")
        self.assertEqual(status, 202)
        process = self.spawner.processes[-1]
        self.assertEqual(process.signals, ["TERM"])
        process.exit(signal="TERM")
        self.assertEqual(self.service.broker.get(jobID).state, JobState.CANCELLED)
        self.assertError(self.call("DELETE", f"/renders/{jobID}"), 409, "job_finished")

    def test_outputNotReady(self) -> None:
        """
        The output is 409 while the render runs, and for a render that made
        no file. (Serving it, Range requests included, is tested in
        tests/test_output.py.)
        """
        jobID = self.create()["id"]
        self.assertError(self.call("GET", f"/renders/{jobID}/output"), 409, "output_not_ready")
        self.spawner.processes[-1].exit(0)
        self.assertError(self.call("GET", f"/renders/{jobID}/output"), 409, "output_not_ready")

    def test_badInput(self) -> None:
        """
        Each kind of bad request gets its JSON error and 4xx, never a 500.
        """
        self.assertError(self.call("POST", "/renders", raw=b"{nope"), 400, "malformed_json")
        self.assertError(self.call("POST", "/renders", raw=b"\xff\xfe"), 400, "malformed_json")
        self.assertError(self.call("POST", "/renders", [1, 2]), 422, "invalid_body")
        self.assertError(
            self.call("POST", "/renders", raw=b'{"renderer": "ticks", "params": {"a": NaN}}'), 400, "malformed_json"
        )
        self.assertError(self.call("POST", "/renders", {"renderer": "nope"}), 422, "unknown_renderer")
        self.assertError(self.call("POST", "/renders", {"renderer": 5}), 422, "unknown_renderer")
        self.assertError(self.call("POST", "/renders", {"renderer": "card", "extra": 1}), 422, "invalid_body")
        detail = self.assertError(
            self.call("POST", "/renders", {"renderer": "card", "params": {"duration": 100}}), 422, "invalid_params"
        )
        self.assertIn("duration", detail)
        self.assertIn("60", detail)
        self.assertError(self.call("POST", "/renders", raw=b" " * (64 * 1024 + 1)), 413, "body_too_large")
        self.assertError(self.call("GET", "/renders/nope"), 404, "unknown_job")
        self.assertError(self.call("GET", "/renders/nope/events"), 404, "unknown_job")
        self.assertError(self.call("DELETE", "/renders/nope"), 404, "unknown_job")
        self.assertError(self.call("GET", "/renders/nope/output"), 404, "unknown_job")
        self.assertError(self.call("GET", "/no/such/route"), 404, "not_found")
        self.assertError(self.call("GET", "/static/../../etc/passwd"), 404, "not_found")
        # An empty segment is no route (not a redirect to another one).
        self.assertError(self.call("DELETE", "/renders//output"), 404, "not_found")
        self.assertError(self.call("GET", "/renders//status"), 404, "not_found")
        status, head, body = self.call("PUT", "/renders")
        self.assertError((status, head, body), 405, "method_not_allowed")
        self.assertIn(b"POST", head[b"allow"])
        self.assertEqual(self.service.broker.jobs(), [])

    def test_renderStreamStartsOnceAndReattaches(self) -> None:
        """
        Opening C{/render-stream} starts a render and streams it with ids
        that name the job; the browser's reconnect (with C{Last-Event-ID})
        re-attaches to the same render, strictly after that id, and never
        starts a second one.
        """
        conn = Connection(self.site)
        conn.request("GET", "/render-stream?renderer=ticks&params=%7B%22n%22%3A1%7D")
        conn.take()
        self.assertEqual(len(self.spawner.processes), 1)
        process = self.spawner.processes[-1]
        self.assertEqual(json.loads(process.stdin), {"n": 1})
        process.stdout(b'{"progress": 0.1}\n{"progress": 0.2}\n')
        events = decode(b"".join(chunks(conn.take())))
        jobID = self.service.broker.jobs()[0].id
        self.assertEqual([e.id for e in events], [f"{jobID}:1", f"{jobID}:2"])
        conn.disconnect()
        process.stdout(b'{"progress": 0.3}\n')
        again = Connection(self.site)
        again.request("GET", "/render-stream?renderer=ticks&params=%7B%7D", {"Last-Event-ID": f"{jobID}:1"})
        _, _, body = splitResponse(again.take())
        self.assertEqual([e.id for e in decode(body)], [f"{jobID}:2", f"{jobID}:3"])
        self.assertEqual(len(self.spawner.processes), 1)
        process.exit(0)
        again.disconnect()
        status, _, _ = self.call("GET", "/render-stream?renderer=ticks", headers={"Last-Event-ID": f"{jobID}:4"})
        self.assertEqual(status, 204)
        self.assertError(
            self.call("GET", "/render-stream?renderer=ticks", headers={"Last-Event-ID": "gone:3"}), 404, "unknown_job"
        )
        self.assertError(self.call("GET", "/render-stream?renderer=ticks&params=%7B"), 400, "malformed_json")
        self.assertError(self.call("GET", "/render-stream?renderer=nope"), 422, "unknown_renderer")
        self.assertEqual(len(self.spawner.processes), 1)

    def test_headStartsNothing(self) -> None:
        """
        HEAD on C{/render-stream} answers with a stream's headers and starts
        no render.
        """
        status, head, body = self.call("HEAD", "/render-stream?renderer=ticks")
        self.assertEqual((status, head[b"content-type"], body), (200, b"text/event-stream; charset=utf-8", b""))
        self.assertEqual(self.spawner.processes, [])

    def test_cardWithoutParams(self) -> None:
        """
        A card render request may leave C{params} out: every default holds.
        """
        self.assertEqual(self.create("card", None)["params"]["title"], "twistedsse")

    def test_pageAndStatic(self) -> None:
        """
        The page is served with a strict CSP, and its assets by name only.
        """
        status, head, body = self.call("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(head[b"content-type"], b"text/html; charset=utf-8")
        self.assertIn(b"script-src 'self'", head[b"content-security-policy"])
        self.assertIn(b"static/app.js", body)
        for name, kind in (("app.js", b"text/javascript"), ("app.css", b"text/css")):
            status, head, _ = self.call("GET", f"/static/{name}")
            self.assertEqual(status, 200)
            self.assertTrue(head[b"content-type"].startswith(kind))
        self.assertError(self.call("GET", "/static/index.html"), 404, "not_found")

    def test_healthzAndRenderers(self) -> None:
        """
        C{/healthz} reports counts; C{/renderers} lists the names (their
        schemas: tests/test_renderers.py).
        """
        status, _, body = self.call("GET", "/healthz")
        self.assertEqual((status, body["status"]), (200, "ok"))
        self.assertEqual(body["renders"], {"running": 0, "queued": 0, "max": 2})
        _, _, body = self.call("GET", "/renderers")
        self.assertEqual([r["name"] for r in body["renderers"]], ["card", "ticks"])

    def test_openAPIDocument(self) -> None:
        """
        C{GET /openapi.json} serves the document the package ships (which
        documents this route too), as JSON; other methods are 405.
        """
        from importlib import resources

        status, head, body = self.call("GET", "/openapi.json")
        shipped = json.loads((resources.files("twistedsse") / "openapi.json").read_bytes())
        self.assertEqual((status, head[b"content-type"], body), (200, b"application/json", shipped))
        self.assertIn("/openapi.json", body["paths"])
        self.assertError(self.call("DELETE", "/openapi.json"), 405, "method_not_allowed")

    def test_mountedUnderAParent(self) -> None:
        """
        Mounted under a parent resource at a sub-path, the API's URLs carry
        the prefix.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"sse", buildResource(self.service, self.clock))
        self.site = Site(root, reactor=self.clock)
        status, head, _ = self.call("GET", "/sse")
        self.assertEqual(status, 308)
        self.assertTrue(head[b"location"].endswith(b"/sse/"), head[b"location"])
        job = self.create(prefix="/sse")
        self.assertEqual(job["events_url"], f"/sse/renders/{job['id']}/events")
        self.assertEqual(self.call("GET", job["status_url"])[2]["id"], job["id"])


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, self.mktemp(), maxRenders=1, maxQueued=1)
        self.site = buildSite(self.service, self.clock, maxStreams=3, maxStreamsPerJob=2)

    def test_streamLimits(self) -> None:
        """
        Past the per-job and the global stream limits, opening a stream is
        503 with C{Retry-After}; a closed stream frees its place.
        """
        first = self.service.submit("ticks", {}).id
        second = self.service.submit("ticks", {}).id
        conns = []
        for jobID in (first, first, second):
            conn = Connection(self.site)
            conn.request("GET", f"/renders/{jobID}/events")
            self.assertEqual(splitResponse(conn.take())[0], 200)
            conns.append(conn)
        for jobID in (first, second):
            conn = Connection(self.site)
            conn.request("GET", f"/renders/{jobID}/events")
            status, head, body = splitResponse(conn.take())
            self.assertEqual((status, head[b"retry-after"]), (503, b"5"))
            self.assertEqual(json.loads(body)["error"], "too_many_streams")
            conn.disconnect()
        conns.pop().disconnect()
        conn = Connection(self.site)
        conn.request("GET", f"/renders/{second}/events")
        self.assertEqual(splitResponse(conn.take())[0], 200)
        for conn in conns + [conn]:
            conn.disconnect()

    def test_queueLimit(self) -> None:
        """
        With every slot busy and the queue full, a new render is 429 with
        C{Retry-After}, and no job is made.
        """
        self.service.submit("ticks", {})
        self.service.submit("ticks", {})
        conn = Connection(self.site)
        conn.request("POST", "/renders", {"Content-Type": "application/json"}, b'{"renderer": "ticks"}')
        status, head, body = splitResponse(conn.take())
        conn.disconnect()
        self.assertEqual((status, head[b"retry-after"], json.loads(body)["error"]), (429, b"10", "queue_full"))
        self.assertEqual(len(self.service.broker.jobs()), 2)


class BoundsTests(SynchronousTestCase):
    """
    What a client may send is bounded before any app code runs.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site = buildSite(ticksService(self.clock, FakeSpawner(), self.mktemp()), self.clock)

    def test_bodyOverTheLimitIsNotKept(self) -> None:
        """
        A body over 64 KiB is not buffered: announced by Content-Length it
        gets 413 at once (before any body, and instead of 100 Continue) and
        the connection closes; chunked, it gets 413 as soon as it passes the
        limit (the app never sees it) and the connection closes.
        """
        body = b'{"renderer": "' + b"x" * (70 * 1024) + b'"}'
        for chunked in (False, True):
            if chunked:
                raw = b"POST /renders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                raw += b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192]) for i in range(0, len(body), 8192))
                raw += b"0\r\n\r\n"
            else:
                raw = b"POST /renders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
            kept: list[int] = []

            class Recording(BoundedRequest):
                def process(self) -> None:
                    if not self._answered:
                        kept.append(self.content.seek(0, 2))
                    super().process()

            self.site.requestFactory = Recording
            conn = Connection(self.site)
            conn.protocol.dataReceived(raw)
            wire = conn.take()
            status, _, payload = splitResponse(wire)
            self.assertEqual((status, json.loads(payload)["error"]), (413, "body_too_large"), chunked)
            self.assertNotIn(b"100 Continue", wire)
            self.assertEqual(wire.count(b"HTTP/1.1 "), 1)
            self.assertEqual(kept, [])
            self.assertTrue(conn.transport.disconnecting)
            conn.disconnect()

    def test_nonUTF8PathOrHostIsJSON400(self) -> None:
        """
        A path or Host that is not UTF-8 gets a JSON 400, not Klein's HTML
        page and logged traceback.
        """
        for raw in (
            b"GET /renders/%FF HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: \xff\r\n\r\n",
        ):
            conn = Connection(self.site)
            conn.protocol.dataReceived(raw)
            status, head, body = splitResponse(conn.take())
            self.assertEqual((status, head[b"content-type"]), (400, b"application/json"), raw)
            self.assertEqual(json.loads(body)["error"], "bad_request")
            conn.disconnect()

    def test_deeplyNestedJSON(self) -> None:
        """
        JSON nested deeper than Python can parse is malformed (400), not a
        500.
        """
        conn = Connection(self.site)
        conn.request("POST", "/renders", {"Content-Type": "application/json"}, b"[" * 5000)
        status, _, body = splitResponse(conn.take())
        self.assertEqual((status, json.loads(body)["error"]), (400, "malformed_json"))
        conn.disconnect()

    def test_headerLimits(self) -> None:
        """
        An over-long URL, too many headers or too many header bytes are
        refused by the HTTP layer (4xx), not handed to the app.
        """
        for raw in (
            b"GET /" + b"a" * (9 * 1024) + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 4000) for i in range(6)) + b"\r\n",
        ):
            conn = Connection(self.site)
            conn.protocol.dataReceived(raw)
            response = conn.take()
            self.assertRegex(response[:12], rb"HTTP/1\.1 4\d\d", raw[:40])
            conn.disconnect()


class EventsRouteTests(SynchronousTestCase):
    """
    The events route is answered before Klein routes (it is the hot one);
    every request to it, and every near miss, gets exactly the bytes
    Klein's own route would have given.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.service = RenderService(
            clock=self.clock,
            spawner=FakeSpawner(),
            broker=MemoryBroker(),
            renderers={"ticks": CommandRenderer("ticks", ["/bin/ticks"])},
            outputDir=Path(self.mktemp()),
            maxRenders=2,
        )
        self.service.startService()
        self.app = TwistedSSEApp(
            self.service, self.clock, StreamSettings(keepalive=15.0, retry=1000), StreamLimits(maxPerJob=1)
        )
        self.jobID = self.service.submit("ticks", {}).id
        self.service.broker.publish(self.jobID, "progress", {"p": 0.5})

    def respond(self, resource: Any, method: str, path: str, headers: dict[str, str]) -> tuple[bytes, Any]:
        conn = Connection(Site(resource, reactor=self.clock))
        conn.request(method, path, headers)
        raw = conn.take()
        return raw, conn

    def test_sameBytesAsKlein(self) -> None:
        """
        Open streams (with and without Last-Event-ID, GET and HEAD), an
        unknown job, a stream past the per-job limit and near misses of
        the path: byte for byte what Klein's route answers (but the Date).
        """
        fast = self.app.resource()
        klein = _RequireUTF8(self.app.router.resource())
        j = self.jobID
        cases = [
            ("GET", f"/renders/{j}/events", {}),
            ("GET", f"/renders/{j}/events?lastEventId=1", {}),
            ("GET", f"/renders/{j}/events", {"Last-Event-ID": "1"}),
            ("HEAD", f"/renders/{j}/events", {}),
            ("GET", "/renders/nope/events", {}),
            ("GET", "/renders/%2Fx/events", {}),
            ("GET", f"/renders/{j}/events/", {}),
            ("GET", f"/renders//{j}/events", {}),
            ("POST", f"/renders/{j}/events", {"Content-Type": "application/json"}),
            ("DELETE", f"/renders/{j}/events", {}),
            ("GET", "/renders/%C3%A9/events", {}),
        ]
        for method, path, headers in cases:
            answers = []
            for resource in (fast, klein):
                raw, conn = self.respond(resource, method, path, headers)
                # Past the per-job limit (1) while the first is open: 503.
                second, other = self.respond(resource, method, path, headers)
                answers.append([re.sub(rb"Date: [^\r]*", b"Date: -", r) for r in (raw, second)])
                other.disconnect()
                conn.disconnect()
            self.assertEqual(answers[0], answers[1], f"{method} {path}")
        self.assertEqual(self.app.limits.open, 0)
        self.assertEqual(self.service.broker.subscriberCount(), 0)

    def test_kleinNotAskedForTheEventsRoute(self) -> None:
        """
        The events route really is answered first: with a Klein resource
        that fails every request, the stream still opens.
        """

        class Refuse(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                raise AssertionError("routed through Klein")

        raw, conn = self.respond(_EventsFirst(self.app, Refuse()), "GET", f"/renders/{self.jobID}/events", {})
        self.assertEqual(splitResponse(raw)[0], 200)
        self.assertIn(b"event: progress", raw)
        conn.disconnect()

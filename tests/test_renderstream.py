"""
C{/render-stream}, the one-request shape (open the stream, start the
render): it never starts a second render, however early the client drops;
it checks the stream limits before it starts anything; an id ahead of the
render ends like any other stream. Over a real L{Site} in memory; the
render processes are the fake spawner's. The client here does what
EventSource does: it sends back the last event id it was given, if any.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._build import buildSite
from twistedsse._decoder import EventStreamDecoder
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, chunks, splitResponse

OPEN = "/render-stream?renderer=ticks&params=%7B%7D"


class EventSourceLike:
    """
    One EventSource's view across its connections: the last event id (set
    by any block with an C{id:}, with data or not) and the events.
    """

    def __init__(self, site: Any) -> None:
        self.site = site
        self.decoder = EventStreamDecoder()
        self.lastEventID = ""
        self.events: list[tuple[str | None, str | None]] = []
        self.conn: Connection | None = None
        self.status = 0
        self.body = b""

    def connect(self, path: str = OPEN) -> None:
        self.conn = Connection(self.site)
        self.conn.request("GET", path, {"Last-Event-ID": self.lastEventID} if self.lastEventID else {})
        self.status, _, body = splitResponse(self.conn.take())
        self.body = body
        self.feed(body)

    def read(self) -> bytes:
        assert self.conn is not None
        data = b"".join(chunks(self.conn.take()))
        self.feed(data)
        return data

    def feed(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            self.events.append((event.event, event.id))
        if self.decoder.lastEventId:
            self.lastEventID = self.decoder.lastEventId

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None
        self.decoder = EventStreamDecoder()


class RenderStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, self.mktemp(), maxRenders=1)
        self.site = buildSite(self.service, self.clock, keepalive=15.0, retry=1000, maxStreams=3)

    def healthz(self) -> dict[str, Any]:
        conn = Connection(self.site)
        conn.request("GET", "/healthz")
        body = json.loads(splitResponse(conn.take())[2])
        conn.disconnect()
        return body  # type: ignore[no-any-return]

    def test_dropBeforeTheFirstEventReattaches(self) -> None:
        """
        With the one render slot busy, C{/render-stream} queues its render;
        its opening frame (a C{render} event, id C{JOBID:0}, with
        C{retry:}) already names it, so a client that drops before the
        render's first event reconnects with C{Last-Event-ID: JOBID:0} and
        re-attaches to that render: one queued render, not two (before: the
        opening frame was C{retry:} alone, the reconnect had no id, and
        C{/healthz} said C{queued: 2}). The re-attached stream opens with
        C{retry:} alone, then gets the render's events, then the end.
        """
        blocker = self.service.submit("ticks", {})
        client = EventSourceLike(self.site)
        client.connect()
        self.assertEqual(client.status, 200)
        (job,) = [j for j in self.service.broker.jobs() if j.id != blocker.id]
        self.assertTrue(client.body.startswith(f"id: {job.id}:0\nevent: render\nretry: 1000\ndata: {{".encode()))
        self.assertEqual((client.events, client.lastEventID), ([("render", f"{job.id}:0")], f"{job.id}:0"))
        client.drop()
        client.connect()
        self.assertEqual((client.status, client.body), (200, b"retry: 1000\n\n"))
        self.assertEqual(self.healthz()["renders"], {"running": 1, "queued": 1, "max": 1})
        self.assertEqual(len(self.service.broker.jobs()), 2)
        self.spawner.processes[0].exit(0)
        process = self.spawner.processes[1]
        process.stdout(b'{"progress": 0.5}\n')
        process.exit(0)
        client.read()
        self.assertEqual(
            client.events, [("render", f"{job.id}:0"), ("progress", f"{job.id}:1"), ("complete", f"{job.id}:2")]
        )
        self.assertEqual(len(self.spawner.processes), 2)
        client.drop()
        self.assertEqual(self.service.broker.subscriberCount(), 0)

    def test_reattachWithZeroGetsTheWholeHistory(self) -> None:
        """
        A reconnect with C{JOBID:0} (dropped before the first event, which
        came meanwhile) gets every event of the render from the first, and
        its opening frame names the same point again.
        """
        client = EventSourceLike(self.site)
        client.connect()
        jobID = client.lastEventID.split(":")[0]
        client.drop()
        process = self.spawner.processes[0]
        process.stdout(b'{"progress": 0.1}\n{"progress": 0.2}\n{"progress": 0.3}\n')
        client.connect()
        self.assertEqual([id for _, id in client.events], [f"{jobID}:{i}" for i in (0, 1, 2, 3)])
        self.assertEqual(len(self.spawner.processes), 1)
        client.drop()

    def test_renderEventDescribesTheRender(self) -> None:
        """
        The C{render} event's data is the render as C{GET /renders/ID}
        describes it (its id, state and URLs: the page can cancel it); a
        page that does not listen for it sees nothing (it is a named
        event), and a re-attach does not get it again.
        """
        client = EventSourceLike(self.site)
        client.connect()
        (render,) = EventStreamDecoder().feed(client.body)
        data = json.loads(render.data)
        jobID = data["id"]
        self.assertEqual((render.event, render.id), ("render", f"{jobID}:0"))
        self.assertEqual(data["state"], "running")
        self.assertEqual(data["events_url"], f"/renders/{jobID}/events")
        conn = Connection(self.site)
        conn.request("GET", data["status_url"])
        self.assertEqual(json.loads(splitResponse(conn.take())[2])["id"], jobID)
        conn.disconnect()
        client.drop()
        client.connect()
        self.assertEqual(client.body, b"retry: 1000\n\n")
        client.drop()

    def test_streamLimitCheckedBeforeTheRenderStarts(self) -> None:
        """
        With the server's stream limit reached, C{/render-stream} answers
        C{503 too_many_streams} and starts no render: no job made, no
        process, nothing queued (before: the render started, then the 503,
        and nobody watched it).
        """
        jobID = self.service.submit("ticks", {}).id
        watchers = []
        for _ in range(3):
            conn = Connection(self.site)
            conn.request("GET", f"/renders/{jobID}/events")
            self.assertEqual(splitResponse(conn.take())[0], 200)
            watchers.append(conn)
        conn = Connection(self.site)
        conn.request("GET", OPEN)
        status, head, body = splitResponse(conn.take())
        conn.disconnect()
        self.assertEqual((status, head[b"retry-after"], json.loads(body)["error"]), (503, b"5", "too_many_streams"))
        self.assertEqual([j.id for j in self.service.broker.jobs()], [jobID])
        self.assertEqual(len(self.spawner.processes), 1)
        self.assertEqual(self.healthz()["renders"]["queued"], 0)
        for watcher in watchers:
            watcher.disconnect()

    def test_idAheadOfARunningRender(self) -> None:
        """
        A reconnect with C{JOBID:999999} to a running render with 2 events
        counts as an id the server cannot read: the whole history, then
        live events, then the terminal event, and the response ends (before:
        nothing came, the terminal event neither, and it never ended).
        """
        client = EventSourceLike(self.site)
        client.connect()
        jobID = client.lastEventID.split(":")[0]
        client.drop()
        process = self.spawner.processes[0]
        process.stdout(b'{"progress": 0.1}\n{"progress": 0.2}\n')
        client.lastEventID = f"{jobID}:999999"
        client.connect()
        process.stdout(b'{"progress": 0.3}\n')
        process.exit(0)
        client.read()
        self.assertEqual(
            client.events[1:],
            [("progress", f"{jobID}:1"), ("progress", f"{jobID}:2"), ("progress", f"{jobID}:3"), ("complete", f"{jobID}:4")],
        )
        self.assertEqual(self.service.broker.subscriberCount(), 0)
        client.drop()

    def test_idAheadOfAFinishedRender(self) -> None:
        """
        An id ahead of a finished render's terminal event: nothing more can
        come, C{204} (EventSource stops reconnecting); on the events URL too.
        """
        client = EventSourceLike(self.site)
        client.connect()
        jobID = client.lastEventID.split(":")[0]
        self.spawner.processes[0].exit(0)
        client.drop()
        client.lastEventID = f"{jobID}:999999"
        client.connect()
        self.assertEqual(client.status, 204)
        client.drop()
        conn = Connection(self.site)
        conn.request("GET", f"/renders/{jobID}/events", {"Last-Event-ID": "999999"})
        self.assertEqual(splitResponse(conn.take())[0], 204)
        conn.disconnect()

    def test_idAheadOnTheEventsURL(self) -> None:
        """
        The same on C{/renders/ID/events}: C{Last-Event-ID: 999999} on a
        running job gets its history, live events, the terminal event, and
        the end of the response.
        """
        jobID = self.service.submit("ticks", {}).id
        process = self.spawner.processes[0]
        process.stdout(b'{"progress": 0.1}\n')
        conn = Connection(self.site)
        conn.request("GET", f"/renders/{jobID}/events", {"Last-Event-ID": "999999"})
        process.stdout(b'{"progress": 0.2}\n')
        process.exit(0)
        raw = conn.take()
        _, _, body = splitResponse(raw)
        self.assertEqual([(e.event, e.id) for e in EventStreamDecoder().feed(body)],
                         [("progress", "1"), ("progress", "2"), ("complete", "3")])
        self.assertTrue(raw.endswith(b"0\r\n\r\n"))
        conn.disconnect()

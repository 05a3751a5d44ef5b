"""
Nothing lost: a client that drops at any point while the job runs and
reconnects with C{Last-Event-ID} gets every later event exactly once, in
order. Once the job has ended, its history is compacted to its latest
progress and terminal event, so a client that was away at the end gets a
C{reset} (when it missed more than those two) and then those two. Checked
as a property over random disconnect points, on a real Site (in memory).
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from twistedsse._broker import MemoryBroker
from twistedsse._decoder import EventStreamDecoder
from twistedsse._stream import EventStreamResource, StreamSettings

from tests._support.fixtures import snapshot
from tests._support.web import BufferTransport, Connection, chunks, splitResponse

EVENTS = 40


class Client:
    """
    A client that keeps its last event id and everything it saw, across
    connections, as EventSource does. With C{buffer}, its connections hold
    that many bytes before the stream is paused (it reads everything
    waiting whenever it reads).
    """

    def __init__(self, site: Site, buffer: int | None = None) -> None:
        self.site = site
        self.buffer = buffer
        self.seen: list[tuple[str | None, str | None]] = []
        self.lastEventID: str | None = None
        self.conn: Connection | None = None
        self.decoder = EventStreamDecoder()
        self.done = False

    def connect(self) -> None:
        self.conn = Connection(self.site, None if self.buffer is None else BufferTransport(self.buffer))
        self.decoder = EventStreamDecoder()
        headers = {"Last-Event-ID": self.lastEventID} if self.lastEventID else {}
        self.conn.request("GET", "/", headers)
        raw = self.takeAll()
        head, _, rest = raw.partition(b"\r\n\r\n")
        status, _, _ = splitResponse(head + b"\r\n\r\n")
        if status == 204:
            self.done = True
            self.drop()
            return
        self.take(b"".join(chunks(rest)) if b"chunked" in head.lower() else rest)

    def takeAll(self) -> bytes:
        """
        Everything waiting, reading until the stream stops writing (a
        paused stream writes more as soon as it is read).
        """
        assert self.conn is not None
        transport = self.conn.transport
        if not isinstance(transport, BufferTransport):
            return self.conn.take()
        data = transport.drain()
        while transport.full or transport.value():
            data += transport.drain()
        return data

    def take(self, body: bytes) -> None:
        for event in self.decoder.feed(body):
            self.seen.append((event.event, event.id))
            self.lastEventID = event.id
            if event.event == "complete":
                self.done = True

    def read(self) -> None:
        if self.conn is not None:
            self.take(b"".join(chunks(self.takeAll())))

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None


class ResumeTests(SynchronousTestCase):
    def makeSite(self, history: int) -> tuple[MemoryBroker, Site]:
        clock = MemoryReactorClock()
        broker = MemoryBroker(history=history)
        broker.create(snapshot("job1"))
        resource = EventStreamResource(broker, "job1", clock, StreamSettings(keepalive=0, retry=0))
        return broker, Site(resource, reactor=clock)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(
        drops=st.sets(st.integers(min_value=0, max_value=EVENTS), max_size=12),
        offline=st.integers(min_value=0, max_value=5),
        buffer=st.sampled_from([None, 1, 60, 150, 400]),
    )
    def test_everyEventExactlyOnce(self, drops: set[int], offline: int, buffer: int | None) -> None:
        """
        Whatever events the client is disconnected after, and however many
        are published while it is away, the union of what it saw is the
        job's whole event list, in order, each once, as long as it
        reconnects before the end. A client away at the end gets what it saw
        plus, on reconnecting, C{reset} (if it missed more than the final
        two), the latest progress and the terminal event: never a silent
        gap, never the end missed. A reconnect after the end gets 204. So
        too when its connection holds only a few events (or none) before
        the stream is paused: a replay stopped part-way goes on where it
        stopped.
        """
        broker, site = self.makeSite(history=EVENTS + 10)
        client = Client(site, buffer)
        client.connect()
        away = 0
        for i in range(1, EVENTS + 1):
            broker.publish("job1", "progress", {"i": i})
            client.read()
            if away:
                away -= 1
                if not away:
                    client.connect()
            elif i in drops:
                client.drop()
                away = offline or 1
        broker.publish("job1", "complete", {})
        awayAtEnd = client.conn is None
        seenBefore = len(client.seen)
        if awayAtEnd:
            client.connect()
        client.read()
        expected = [("progress", str(i)) for i in range(1, EVENTS + 1)] + [("complete", str(EVENTS + 1))]
        if not awayAtEnd:
            self.assertEqual(client.seen, expected)
        else:
            self.assertEqual(client.seen[:seenBefore], expected[:seenBefore])
            last = int(client.seen[seenBefore - 1][1]) if seenBefore else 0
            tail = expected[-2:] if last < EVENTS else expected[-1:]
            if 0 < last < EVENTS - 1:
                tail = [("reset", str(EVENTS - 1))] + tail
            self.assertEqual(client.seen[seenBefore:], tail)
        client.drop()
        client.connect()
        self.assertTrue(client.done)
        self.assertEqual(broker.subscriberCount(), 0)

    def test_olderThanHistoryGetsReset(self) -> None:
        """
        A client whose last id is older than the retained history first gets
        a C{reset} event with the current state and how many events it
        missed, then the retained events: not silence, not a silent gap.
        """
        broker, site = self.makeSite(history=5)
        for i in range(1, 21):
            broker.publish("job1", "progress", {"i": i})
        client = Client(site)
        client.lastEventID = "3"
        client.connect()
        self.assertEqual(client.seen[0], ("reset", "15"))
        self.assertEqual([id for _, id in client.seen[1:]], ["16", "17", "18", "19", "20"])
        client.drop()
        conn = Connection(site)
        conn.request("GET", "/", {"Last-Event-ID": "3"})
        body = splitResponse(conn.take())[2]
        reset = EventStreamDecoder().feed(body)[0]
        self.assertEqual(json.loads(reset.data), {"state": "queued", "progress": None, "missed": 12})
        conn.disconnect()

    def test_noResetWithinHistory(self) -> None:
        """
        A client whose last id is still retained gets no C{reset}.
        """
        broker, site = self.makeSite(history=5)
        for i in range(1, 21):
            broker.publish("job1", "progress", {"i": i})
        client = Client(site)
        client.lastEventID = "15"
        client.connect()
        self.assertEqual([name for name, _ in client.seen], ["progress"] * 5)
        client.drop()

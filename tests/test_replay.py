"""
The replay a stream starts with (the job's history after the client's last
event id) under backpressure: a client that reads nothing gets one
buffer's worth of it, not the whole history; when it reads again the
stream goes on from the broker's history after the last event it wrote.
Over a real L{Site} on an in-memory transport that pauses its producer as
Twisted's does.
"""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from twistedsse._broker import MemoryBroker
from twistedsse._decoder import EventStreamDecoder
from twistedsse._errors import UnknownJob
from twistedsse._stream import EventStreamResource, StreamSettings

from tests._support.chunked import Dechunker
from tests._support.fixtures import snapshot
from tests._support.web import BUFFER, BufferTransport, Connection, splitResponse

PAD = 8 * 1024


class Reader:
    """
    The client end: de-chunks and decodes what it drains.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: BufferTransport = conn.transport  # type: ignore[assignment]
        self.decoder = EventStreamDecoder()
        self.dechunker = Dechunker()
        self.events: list[tuple[str | None, str | None, str]] = []
        self.head = b""
        self.body = bytearray()
        self.ended = False

    def drain(self) -> int:
        """
        Read everything waiting; return how many bytes that was.
        """
        data = self.transport.drain()
        if not self.head:
            head, _, data = data.partition(b"\r\n\r\n")
            self.head = head
        self.body += data
        self._parse()
        return len(data)

    def _parse(self) -> None:
        # Whole chunks only; a partial one stays for the next drain.
        for chunk in self.dechunker.chunks(bytes(self.body)):
            for event in self.decoder.feed(chunk):
                self.events.append((event.event, event.id, event.data))
        del self.body[:]
        self.ended = self.dechunker.ended


class ReplayBackpressureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.sites: list[Site] = []

    def site(self, resource: EventStreamResource) -> Site:
        site = Site(resource, reactor=self.clock)
        self.sites.append(site)
        return site

    def makeJob(self, events: int, history: int) -> MemoryBroker:
        broker = MemoryBroker(history=history)
        broker.create(snapshot("job1"))
        for i in range(1, events + 1):
            broker.publish("job1", "progress", {"i": i, "pad": "x" * PAD})
        return broker

    def open(self, broker: MemoryBroker, headers: dict[str, str] | None = None, **kw: object) -> Reader:
        resource = EventStreamResource(
            broker, "job1", self.clock, StreamSettings(keepalive=0, retry=0, writeTimeout=30.0), **kw  # type: ignore[arg-type]
        )
        conn = Connection(self.site(resource), BufferTransport())
        conn.request("GET", "/", headers)
        return Reader(conn)

    def assertNothingLeft(self, broker: MemoryBroker) -> None:
        self.assertEqual(broker.subscriberCount(), 0)
        # Stop the sites as a listening port's end would (public
        # Factory.stopFactory): that cancels whatever timer Twisted's
        # HTTPFactory keeps for its access log, so every call left is ours.
        for site in self.sites:
            site.stopFactory()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientThatReadsNothingGetsOneBuffer(self) -> None:
        """
        A client that connects to a job with 1 000 retained events of 8 KiB
        (8 MiB) and reads nothing has at most Twisted's 64 KiB buffer plus
        one frame written to it, however long it waits and whatever is
        published meanwhile (before: the whole 8 MiB at once). Reading
        again, buffer by buffer, it gets every event exactly once, in
        order: the history, the live events published while it was not
        reading, then the terminal event, and the response ends.
        """
        broker = self.makeJob(1000, history=1000)
        reader = self.open(broker)
        frame = len(broker.finalEvents("job1")[-1][2]) + 64
        bound = BUFFER + frame + 16
        self.assertLessEqual(reader.transport.most, bound)
        for i in range(5):
            broker.publish("job1", "progress", {"live": i})
        self.clock.advance(10)
        self.assertLessEqual(len(reader.transport.value()), bound)
        rounds = 0
        while not reader.ended:
            rounds += 1
            self.assertLess(rounds, 1000, "the stream does not end")
            reader.drain()
            self.assertLessEqual(reader.transport.most, bound)
            if len(reader.events) == 1005 and rounds < 1000:
                # Caught up: the job ends now (had it ended while the
                # client was behind, its history would be compacted, see
                # test_jobEndsWhileTheClientIsBehind).
                broker.publish("job1", "complete", {"ok": True})
        ids = [id for _, id, _ in reader.events]
        self.assertEqual(ids, [str(i) for i in range(1, 1007)])
        self.assertEqual([json.loads(data).get("live") for _, _, data in reader.events[1000:1005]], list(range(5)))
        self.assertEqual(reader.events[-1][0], "complete")
        self.assertGreater(rounds, 100)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_thenLiveEventsFlowAsUsual(self) -> None:
        """
        Once the replay is caught up, the stream is an ordinary live one:
        each new event is written at once.
        """
        broker = self.makeJob(100, history=1000)
        reader = self.open(broker, {"Last-Event-ID": "10"})
        while reader.transport.full:
            reader.drain()
        reader.drain()
        self.assertEqual([id for _, id, _ in reader.events], [str(i) for i in range(11, 101)])
        broker.publish("job1", "progress", {"i": 101})
        reader.drain()
        self.assertEqual(reader.events[-1][1], "101")
        self.assertEqual(broker.subscriberCount(), 1)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_historyDroppedMeanwhileGetsReset(self) -> None:
        """
        If events after the last one written leave the history while the
        client is not reading, it then gets a C{reset} event (the current
        state, how many it missed), as a resume would, and the retained
        events after it: no silent gap, no repeat.
        """
        broker = self.makeJob(100, history=100)
        reader = self.open(broker)
        reader.drain()  # the first buffer read; the next one written
        self.assertTrue(reader.transport.full)
        for i in range(101, 201):
            broker.publish("job1", "progress", {"i": i, "pad": "x" * PAD})
        while not reader.events or reader.events[-1][1] != "200":
            reader.drain()
        broker.publish("job1", "complete", {})
        while not reader.ended:
            reader.drain()
        names = [name for name, _, _ in reader.events]
        self.assertEqual(names.count("reset"), 1)
        at = names.index("reset")
        self.assertGreater(at, 0)
        ids = [int(id) for _, id, _ in reader.events if id is not None]
        # Events 1..at were written before the job went on without the
        # client; 101..200 are what the history held when it read again
        # (its last 100), and 201 ended the job after that.
        self.assertEqual(ids[:at], list(range(1, at + 1)))
        self.assertEqual(ids[at], 100)
        self.assertEqual(ids[at + 1 :], list(range(101, 202)))
        self.assertEqual(names[-1], "complete")
        self.assertEqual(json.loads(reader.events[at][2])["missed"], 100 - at)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_jobEndsWhileTheClientIsBehind(self) -> None:
        """
        A job that ends while its client is not reading keeps only its
        latest progress and terminal event: the client, reading again,
        gets what was written before, then a C{reset} naming how many it
        missed, the latest progress and the terminal event, and the
        response ends. Never more than one buffer waits for it.
        """
        broker = self.makeJob(1000, history=1000)
        reader = self.open(broker)
        frame = len(broker.finalEvents("job1")[-1][2]) + 64
        bound = BUFFER + frame + 16
        broker.publish("job1", "complete", {"ok": True})
        while not reader.ended:
            reader.drain()
            self.assertLessEqual(reader.transport.most, bound)
        names = [name for name, _, _ in reader.events]
        ids = [int(id) for _, id, _ in reader.events]
        self.assertEqual(names[-3:], ["reset", "progress", "complete"])
        self.assertEqual(ids[-3:], [999, 1000, 1001])
        seen = len(names) - 3
        self.assertEqual(ids[:seen], list(range(1, seen + 1)))
        self.assertEqual(json.loads(reader.events[-3][2])["missed"], 999 - seen)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_rewrittenIDsUnderBackpressure(self) -> None:
        """
        A stream that rewrites ids (C{/render-stream}'s C{JOBID:SEQ}) goes
        on from the broker's own id of the last event it wrote: every event
        once, each with its rewritten id.
        """
        broker = self.makeJob(50, history=1000)
        reader = self.open(broker, rewriteID=lambda seq: "job1:" + seq, after="0")
        while len(reader.events) < 50:
            reader.drain()
        broker.publish("job1", "complete", {})
        while not reader.ended:
            reader.drain()
        self.assertEqual([id for _, id, _ in reader.events], [f"job1:{i}" for i in range(1, 52)])
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_pausedFromTheFirstWrite(self) -> None:
        """
        A connection already full when the stream opens (its opening frame
        fills it): no replay at all until the client reads, then all of it.
        """
        broker = self.makeJob(10, history=1000)
        resource = EventStreamResource(broker, "job1", self.clock, StreamSettings(keepalive=0, retry=0))
        conn = Connection(self.site(resource), BufferTransport(limit=10))
        conn.request("GET", "/")
        reader = Reader(conn)
        reader.drain()
        self.assertEqual(reader.events, [])
        while reader.transport.full:
            reader.drain()
        reader.drain()
        self.assertEqual([id for _, id, _ in reader.events], [str(i) for i in range(1, 11)])
        conn.disconnect()
        self.assertNothingLeft(broker)

    def test_drainedWithinTheReplay(self) -> None:
        """
        A connection that pauses and resumes within one write of the replay
        (its buffer drained at once): the replay goes straight on, every
        event once, in order.
        """

        class Bouncing(BufferTransport):
            def write(self, data: bytes) -> None:
                StringTransport.write(self, data)
                if self.producer is not None and len(self.value()) > 3 * PAD:
                    self.producer.pauseProducing()
                    self.producer.resumeProducing()

        broker = self.makeJob(20, history=1000)
        resource = EventStreamResource(broker, "job1", self.clock, StreamSettings(keepalive=0, retry=0))
        conn = Connection(self.site(resource), Bouncing())
        conn.request("GET", "/")
        _, _, body = splitResponse(conn.take())
        self.assertEqual([e.id for e in EventStreamDecoder().feed(body)], [str(i) for i in range(1, 21)])
        self.assertEqual(broker.subscriberCount(), 1)
        conn.disconnect()
        self.assertNothingLeft(broker)

    def test_stalledDuringTheReplayIsDropped(self) -> None:
        """
        A client that stops reading during its replay and never reads again
        is dropped after the write timeout, and nothing of it is left.
        """
        broker = self.makeJob(100, history=1000)
        reader = self.open(broker)
        self.assertTrue(reader.transport.full)
        self.clock.advance(30)
        self.assertTrue(reader.transport.disconnecting)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

    def test_jobGoneWhileNotReading(self) -> None:
        """
        If the job is gone (expired) by the time a client that stopped
        reading during its replay reads again, its stream ends (its
        reconnect then learns why), and nothing of it is left.
        """

        class Forgetting(MemoryBroker):
            forgotten = False

            def subscribe(self, jobID: str, lastEventID: str | None, subscriber: object) -> object:
                if self.forgotten:
                    raise UnknownJob(f"no render with id {jobID!r}")
                return super().subscribe(jobID, lastEventID, subscriber)  # type: ignore[arg-type]

        broker = Forgetting(history=1000)
        broker.create(snapshot("job1"))
        for i in range(1, 101):
            broker.publish("job1", "progress", {"i": i, "pad": "x" * PAD})
        reader = self.open(broker)
        self.assertTrue(reader.transport.full)
        broker.forgotten = True
        reader.drain()  # read: the stream goes on, finds no job, ends
        reader.drain()
        self.assertTrue(reader.ended)
        reader.conn.disconnect()
        self.assertNothingLeft(broker)

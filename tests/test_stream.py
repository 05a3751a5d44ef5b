"""
The event stream over a real L{Site} and L{HTTPChannel}, on an in-memory
transport and a L{Clock}: exact wire bytes, one chunk per frame, at once.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from twistedsse._broker import MemoryBroker
from twistedsse._frames import encodeEvent
from twistedsse._stream import EventStreamResource, StreamLimits, StreamSettings, tcpTransport

from tests._support.fixtures import snapshot
from tests._support.web import Connection, TCPStringTransport, chunks, decode, splitResponse


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.broker = MemoryBroker(history=100)
        self.broker.create(snapshot("job1"))
        self.resource = EventStreamResource(
            self.broker, "job1", self.clock, StreamSettings(keepalive=15.0, retry=2000, writeTimeout=30.0)
        )
        self.site = Site(self.resource, reactor=self.clock)

    def connect(self, transport: StringTransport | None = None) -> Connection:
        return Connection(self.site, transport)

    def assertNothingLeft(self, conn: Connection | None = None) -> None:
        """
        No subscriber and no timer of ours remain (closing C{conn} first:
        a kept-alive connection's idle timer is Twisted's own).
        """
        if conn is not None:
            conn.disconnect()
        self.assertEqual(self.broker.subscriberCount(), 0)
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_updateLogDateTime"], []
        )

    def test_headersLeaveAtOnce(self) -> None:
        """
        The response headers and a first C{retry:} frame are on the wire as
        soon as the request is handled, before any event exists: proxies
        and EventSource see an open stream.
        """
        conn = self.connect()
        conn.request("GET", "/", {"Accept": "text/event-stream"})
        status, headers, body = splitResponse(conn.take())
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertEqual(headers[b"cache-control"], b"no-cache, no-store")
        self.assertEqual(headers[b"x-accel-buffering"], b"no")
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertNotIn(b"content-length", headers)
        self.assertNotIn(b"content-encoding", headers)
        self.assertEqual(body, b"retry: 2000\n\n")
        conn.disconnect()

    def test_eachPublishIsOneChunkOnTheWireAtOnce(self) -> None:
        """
        After each publish the transport already holds the whole frame, as
        exactly one HTTP chunk: nothing waits for a flush.
        """
        conn = self.connect()
        conn.request("GET", "/")
        conn.take()
        for i in range(1, 6):
            event = self.broker.publish("job1", "progress", {"percent": i * 10})
            wire = conn.take()
            self.assertEqual(chunks(wire), [encodeEvent(event)])
            self.assertEqual(wire, b"%x\r\n%s\r\n" % (len(encodeEvent(event)), encodeEvent(event)))
        conn.disconnect()

    def test_eventsPublishedTogetherAreOneChunk(self) -> None:
        """
        Events published together (a busy server read several render lines
        at once) leave in one write, one chunk holding each whole frame, in
        order.
        """
        conn = self.connect()
        conn.request("GET", "/")
        conn.take()
        events = self.broker.publishMany("job1", "progress", [{"i": i} for i in range(3)])
        self.assertEqual(chunks(conn.take()), [b"".join(encodeEvent(e) for e in events)])
        conn.disconnect()

    def test_eventsPublishedTogetherWithRewrittenIDs(self) -> None:
        """
        A stream that rewrites ids (C{/render-stream}) gets each of them
        with its own id.
        """
        resource = EventStreamResource(
            self.broker, "job1", self.clock, StreamSettings(retry=0), rewriteID=lambda seq: "job1:" + seq
        )
        conn = Connection(Site(resource, reactor=self.clock))
        conn.request("GET", "/")
        conn.take()
        self.broker.publishMany("job1", "progress", [{"i": i} for i in range(3)])
        events = decode(b"".join(chunks(conn.take())))
        self.assertEqual([e.id for e in events], ["job1:1", "job1:2", "job1:3"])
        conn.disconnect()

    def test_terminalQueuedBehindAPassEndsTheResponse(self) -> None:
        """
        With a sliced fan-out (one stream per reactor turn here), a stream
        the pass had not come to when the render ended gets the queued
        progress, then the terminal event, and its response ends; nothing
        is left running.
        """
        clock = MemoryReactorClock()
        broker = MemoryBroker(clock=clock, fanoutSlice=1)
        broker.create(snapshot("job2"))
        site = Site(EventStreamResource(broker, "job2", clock, StreamSettings(keepalive=0, retry=0)), reactor=clock)
        conns = [Connection(site) for _ in range(3)]
        for conn in conns:
            conn.request("GET", "/")
            conn.take()
        progress = broker.publish("job2", "progress", {"p": 1})
        self.assertEqual([len(c.take()) > 0 for c in conns], [True, False, False])
        complete = broker.publish("job2", "complete", {})
        broker.flush()
        for conn in conns[1:]:
            wire = conn.take()
            self.assertEqual(chunks(wire), [encodeEvent(progress), encodeEvent(complete)])
            self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        self.assertEqual(broker.subscriberCount(), 0)
        for conn in conns:
            conn.disconnect()
        self.assertEqual([c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_updateLogDateTime"], [])

    def test_terminalEventEndsTheResponse(self) -> None:
        """
        The terminal event is written, then the response ends (the chunked
        terminator), and nothing is left running.
        """
        conn = self.connect()
        conn.request("GET", "/")
        conn.take()
        self.broker.publish("job1", "progress", {"percent": 50})
        self.broker.publish("job1", "complete", {"output_url": "/x"})
        wire = conn.take()
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        events = decode(b"".join(chunks(wire)))
        self.assertEqual([e.event for e in events], ["progress", "complete"])
        self.assertNothingLeft(conn)

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """
        Let C{seconds} pass as a running reactor would, in small steps (one
        big C{Clock.advance} runs a C{LoopingCall} once, as a blocked
        reactor would).
        """
        self.clock.pump([step] * round(seconds / step))

    def test_keepaliveOnTheClock(self) -> None:
        """
        A quiet stream gets a keepalive comment, as its own chunk, each
        time the keepalive interval passes on the injected clock without a
        frame, and not before.
        """
        conn = self.connect()
        conn.request("GET", "/")
        conn.take()
        self.advance(14.5)
        self.assertEqual(conn.take(), b"")
        self.advance(0.5)
        self.assertEqual(chunks(conn.take()), [b": keepalive\n\n"])
        self.advance(14.5)
        self.assertEqual(conn.take(), b"")
        self.advance(0.5)
        self.assertEqual(chunks(conn.take()), [b": keepalive\n\n"])
        conn.disconnect()

    def test_busyStreamGetsNoKeepalive(self) -> None:
        """
        Events are frames enough: a stream that got one within the interval
        gets no keepalive, and gets one again an interval after it went
        quiet.
        """
        conn = self.connect()
        conn.request("GET", "/")
        conn.take()
        for i in range(12):
            self.advance(5)
            self.broker.publish("job1", "progress", {"i": i})
        self.assertNotIn(b"keepalive", conn.take())
        self.advance(15)
        self.assertEqual(chunks(conn.take()), [b": keepalive\n\n"])
        conn.disconnect()

    def test_oneTimerForAllStreams(self) -> None:
        """
        However many streams are open, one timer sends their keepalives;
        it stops with the last stream.
        """
        conns = [self.connect() for _ in range(50)]
        for conn in conns:
            conn.request("GET", "/")
            conn.take()
        ours = [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_updateLogDateTime"]
        self.assertEqual(len(ours), 1)
        self.advance(15)
        self.assertEqual({tuple(chunks(conn.take())) for conn in conns}, {(b": keepalive\n\n",)})
        for conn in conns[1:]:
            conn.disconnect()
        self.assertEqual(len([c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_updateLogDateTime"]), 1)
        self.assertNothingLeft(conns[0])

    def test_disconnectReleasesEverything(self) -> None:
        """
        A client that goes away leaves no subscriber and no timer behind,
        and later events do not touch its request.
        """
        conn = self.connect()
        conn.request("GET", "/")
        self.assertEqual(self.broker.subscriberCount(), 1)
        conn.disconnect()
        self.assertNothingLeft()
        self.broker.publish("job1", "progress", {"percent": 1})
        self.clock.advance(60)
        self.assertNothingLeft()

    def test_headLeavesNothingRunning(self) -> None:
        """
        HEAD answers with the stream's headers and ends: no subscription,
        no keepalive timer (C{Resource.render_HEAD} would have opened a
        stream nobody reads).
        """
        conn = self.connect()
        conn.request("HEAD", "/")
        status, headers, body = splitResponse(conn.take())
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertEqual(body, b"")
        self.assertEqual(self.broker.subscriberCount(), 0)
        conn.disconnect()  # the kept-alive connection's idle timer is Twisted's
        self.assertNothingLeft()

    def test_tcpNoDelayRequested(self) -> None:
        """
        The stream sets TCP_NODELAY on its TCP transport itself, whatever
        Twisted's channel did before.
        """
        transport = TCPStringTransport()
        conn = self.connect(transport)
        transport.noDelay = False  # as if the channel had not set it
        conn.request("GET", "/")
        self.assertTrue(transport.noDelay)
        conn.disconnect()

    def test_noTCPTransportIsTolerated(self) -> None:
        """
        Requests without a TCP transport (HTTP/2 streams, in-memory ones)
        give C{None}, not an error.
        """
        self.assertIsNone(tcpTransport(object()))
        self.assertIsNone(tcpTransport(type("R", (), {"transport": StringTransport()})()))

    def test_lateSubscriberGetsHistoryThenLive(self) -> None:
        """
        A subscriber that connects late gets the job's history first, in
        order, then live events.
        """
        for i in range(3):
            self.broker.publish("job1", "progress", {"i": i})
        conn = self.connect()
        conn.request("GET", "/")
        _, _, body = splitResponse(conn.take())
        self.assertEqual([e.id for e in decode(body)], ["1", "2", "3"])
        self.broker.publish("job1", "progress", {"i": 3})
        self.assertEqual([e.id for e in decode(b"".join(chunks(conn.take())))], ["4"])
        conn.disconnect()

    def test_resumeStrictlyAfterLastEventID(self) -> None:
        """
        A reconnect with C{Last-Event-ID: 2} (header) or C{?lastEventId=2}
        (query) gets events 3.. only.
        """
        for i in range(4):
            self.broker.publish("job1", "progress", {"i": i})
        for how in ("header", "query"):
            conn = self.connect()
            if how == "header":
                conn.request("GET", "/", {"Last-Event-ID": "2"})
            else:
                conn.request("GET", "/?lastEventId=2")
            _, _, body = splitResponse(conn.take())
            self.assertEqual([e.id for e in decode(body)], ["3", "4"], how)
            conn.disconnect()

    def test_garbageLastEventIDCountsAsNone(self) -> None:
        """
        An unparseable C{Last-Event-ID} is treated as none: the whole
        retained history is sent (documented).
        """
        self.broker.publish("job1", "progress", {"i": 0})
        for garbage in ("abc", "-1", "1.5", "9" * 40, "\u0661"):
            conn = self.connect()
            conn.request("GET", "/", {"Last-Event-ID": garbage.encode("utf-8").decode("latin-1")})
            _, _, body = splitResponse(conn.take())
            self.assertEqual([e.id for e in decode(body)], ["1"], garbage)
            conn.disconnect()

    def test_reconnectAfterTheEndGets204(self) -> None:
        """
        A reconnect that has seen the terminal event gets 204 No Content,
        which tells EventSource to stop reconnecting.
        """
        self.broker.publish("job1", "progress", {"i": 0})
        self.broker.publish("job1", "failed", {"message": "boom"})
        conn = self.connect()
        conn.request("GET", "/", {"Last-Event-ID": "2"})
        status, _, body = splitResponse(conn.take())
        self.assertEqual(status, 204)
        self.assertEqual(body, b"")
        self.assertNothingLeft(conn)

    def test_reconnectBeforeTheEndGetsTheRest(self) -> None:
        """
        A reconnect that missed the terminal event gets it and the response
        ends.
        """
        self.broker.publish("job1", "progress", {"i": 0})
        self.broker.publish("job1", "cancelled", {"message": "x"})
        conn = self.connect()
        conn.request("GET", "/", {"Last-Event-ID": "1"})
        raw = conn.take()
        status, _, body = splitResponse(raw)
        self.assertEqual(status, 200)
        self.assertEqual([e.event for e in decode(body)], ["cancelled"])
        self.assertTrue(raw.endswith(b"0\r\n\r\n"))
        self.assertNothingLeft(conn)

    def test_http10ClientStreamsWithoutChunking(self) -> None:
        """
        An HTTP/1.0 client (nginx's default upstream protocol) gets the
        frames unchunked, each at once, and the connection closes at the
        end.
        """
        conn = self.connect()
        conn.protocol.dataReceived(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        head, _, body = conn.take().partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"retry: 2000\n\n")
        event = self.broker.publish("job1", "progress", {"x": 1})
        self.assertEqual(conn.take(), encodeEvent(event))
        self.broker.publish("job1", "complete", {})
        conn.take()
        self.assertTrue(conn.transport.disconnecting)
        self.assertNothingLeft()


class BackpressureTests(SynchronousTestCase):
    """
    A client that stops reading: Twisted pauses the stream (its push
    producer); it keeps only the latest progress and the terminal event.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.broker = MemoryBroker(history=100)
        self.broker.create(snapshot("job1"))
        self.limits = StreamLimits(maxStreams=2, maxPerJob=1)
        resource = EventStreamResource(
            self.broker, "job1", self.clock, StreamSettings(keepalive=15.0, retry=0, writeTimeout=30.0),
            limits=self.limits,
        )  # fmt: skip
        self.site = Site(resource, reactor=self.clock)
        self.conn = Connection(self.site)
        self.conn.request("GET", "/")
        self.conn.take()
        # The connection's producer is its HTTPChannel: pausing it is what a
        # full socket buffer does.
        self.channel = self.conn.transport.producer

    def test_openCommentWithoutRetry(self) -> None:
        """
        With no retry configured, a comment opens the stream instead.
        """
        conn = Connection(self.site)
        conn.request("GET", "/")
        self.assertEqual(splitResponse(conn.take())[2], b": open\n\n")
        conn.disconnect()
        self.conn.disconnect()

    def test_pausedStreamCoalesces(self) -> None:
        """
        While paused nothing is written; on resume the client gets the
        latest progress, then the terminal event, and the response ends.
        """
        self.channel.pauseProducing()
        for i in range(10):
            self.broker.publish("job1", "progress", {"i": i})
        self.broker.publish("job1", "complete", {"ok": True})
        self.assertEqual(self.conn.take(), b"")
        self.channel.resumeProducing()
        wire = self.conn.take()
        events = decode(b"".join(chunks(wire)))
        self.assertEqual([(e.event, e.id) for e in events], [("progress", "10"), ("complete", "11")])
        self.assertTrue(wire.endswith(b"0\r\n\r\n"))
        self.conn.disconnect()
        self.assertEqual([c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", "") != "_updateLogDateTime"], [])
        self.assertEqual(self.limits.open, 0)

    def test_pausedStreamCoalescesEventsPublishedTogether(self) -> None:
        """
        Events published together while paused: only the latest is kept.
        """
        self.channel.pauseProducing()
        self.broker.publishMany("job1", "progress", [{"i": i} for i in range(5)])
        self.assertEqual(self.conn.take(), b"")
        self.channel.resumeProducing()
        events = decode(b"".join(chunks(self.conn.take())))
        self.assertEqual([(e.id, e.data) for e in events], [("5", '{"i":4}')])
        self.conn.disconnect()

    def test_resumeWithNothingNew(self) -> None:
        """
        A pause and resume with no event in between writes nothing, and live
        events flow again afterwards.
        """
        self.channel.pauseProducing()
        self.channel.resumeProducing()
        self.assertEqual(self.conn.take(), b"")
        self.broker.publish("job1", "progress", {"i": 1})
        self.assertEqual(len(decode(b"".join(chunks(self.conn.take())))), 1)
        self.conn.disconnect()

    def test_noKeepaliveWhilePaused(self) -> None:
        """
        A paused stream queues no keepalives on its full connection.
        """
        self.channel.pauseProducing()
        self.clock.pump([0.5] * 40)
        self.assertEqual(self.conn.take(), b"")
        self.channel.resumeProducing()
        self.clock.pump([0.5] * 30)
        self.assertEqual(chunks(self.conn.take()), [b": keepalive\n\n"])
        self.conn.disconnect()

    def test_stalledClientIsDropped(self) -> None:
        """
        A client that reads nothing for the write timeout while paused is
        disconnected, and nothing of it is left.
        """
        self.channel.pauseProducing()
        self.broker.publish("job1", "progress", {"i": 1})
        self.clock.advance(29.9)
        self.assertFalse(self.conn.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.conn.transport.disconnecting)
        self.conn.disconnect()
        self.assertEqual(self.broker.subscriberCount(), 0)
        self.assertEqual(self.limits.open, 0)

    def test_resumeInTimeKeepsTheClient(self) -> None:
        """
        A client that drains its buffer before the write timeout stays.
        """
        self.channel.pauseProducing()
        self.clock.advance(29)
        self.channel.resumeProducing()
        self.clock.advance(60)
        self.assertFalse(self.conn.transport.disconnecting)
        self.conn.disconnect()

    def test_limitsCountOpenStreams(self) -> None:
        """
        L{StreamLimits} counts streams while they are open and refuses past
        its limits, globally and per job.
        """
        from twistedsse._errors import TooManyStreams

        self.assertEqual(self.limits.open, 1)
        self.assertRaises(TooManyStreams, self.limits.check, "job1")
        self.limits.check("job2")
        self.limits.opened("job2")
        error = self.assertRaises(TooManyStreams, self.limits.check, "job3")
        self.assertEqual((error.status, error.retryAfter), (503, 5))
        self.limits.closed("job2")
        self.conn.disconnect()
        self.assertEqual(self.limits.open, 0)
        self.limits.check("job1")


class PausingTransport(StringTransport):
    """
    A transport whose buffer "fills" past C{limit} bytes: it pauses its
    producer then, as a real one does.
    """

    limit = 2000
    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None and not self.full:
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))


class ReplayUnderBackpressureTests(SynchronousTestCase):
    def test_replayStopsWhileTheBufferIsFull(self) -> None:
        """
        A client that connects late (or resumes) and whose buffer fills
        part-way through its replay gets no more of it until it reads
        again; then the rest of the replay, and the live events published
        meanwhile, each once, in order (the replay used to be written whole
        whatever the client read).
        """
        clock = MemoryReactorClock()
        broker = MemoryBroker(history=1000)
        broker.create(snapshot("job1"))
        for i in range(200):
            broker.publish("job1", "progress", {"i": i, "pad": "x" * 50})
        site = Site(EventStreamResource(broker, "job1", clock, StreamSettings(keepalive=0)), reactor=clock)
        conn = Connection(site, PausingTransport())
        conn.request("GET", "/", {"Last-Event-ID": "10"})
        _, _, body = splitResponse(conn.take())
        first = [e.id for e in decode(body)]
        self.assertLess(len(first), 30)
        self.assertEqual(first, [str(i) for i in range(11, 11 + len(first))])
        for i in range(5):
            broker.publish("job1", "progress", {"live": i})
        self.assertEqual(conn.take(), b"")
        conn.transport.producer.resumeProducing()
        rest = [e.id for e in decode(b"".join(chunks(conn.take())))]
        self.assertEqual(first + rest, [str(i) for i in range(11, 206)])
        conn.disconnect()

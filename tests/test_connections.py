"""
What a client may hold of the server's connections and time
(L{twistedsse._connections}, L{twistedsse._site}): request heads and
bodies on a clock, chunked bodies cut at the limit, caps on connections
in all and per address, the open-file budget. Over a real L{Site} on
L{StringTransport}s, driven by a L{MemoryReactorClock}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._build import buildSite
from twistedsse._connections import ConnectionLimits, checkFileBudget, fileReserve
from twistedsse.tap import Options
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import TCPStringTransport, splitResponse


class _HalfClosingTransport(TCPStringTransport):
    """
    A TCP stand-in that records a shut write side.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

HEAD = b"POST /renders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


class _Client:
    """
    One connection to C{site} from C{host}, speaking raw bytes.
    """

    def __init__(self, site: Any, host: str = "127.0.0.1", port: int = 40000, tcp: bool = False) -> None:
        kind = IPv6Address if ":" in host else IPv4Address
        address = kind("TCP", host, port)
        self.protocol = site.buildProtocol(address)
        self.transport = (_HalfClosingTransport if tcp else StringTransport)(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def response(self) -> tuple[int, dict[bytes, bytes], Any]:
        status, head, body = splitResponse(self.transport.value())
        self.transport.clear()
        return status, head, json.loads(body) if head.get(b"content-type") == b"application/json" else body

    def close(self) -> None:
        if not getattr(self, "_gone", False):
            self._gone = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class _SiteMixin:
    def makeSite(self, **limits: Any) -> Any:
        self.clock = MemoryReactorClock()
        self.service = ticksService(self.clock, FakeSpawner(), self.mktemp())  # type: ignore[attr-defined]
        self.addCleanup(self.service.stopService)  # type: ignore[attr-defined]
        self.site = buildSite(self.service, self.clock, connections=ConnectionLimits(**limits))
        return self.site

    def connect(self, host: str = "127.0.0.1", port: int = 40000, tcp: bool = False) -> _Client:
        client = _Client(self.site, host, port, tcp)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client


class RequestClockTests(_SiteMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.makeSite(requestTimeout=10.0, bodyMinRate=1024)

    def test_trickledHeadIsClosedWith408(self) -> None:
        """
        A head sent one byte a second (each byte would reset Twisted's idle
        timer) is answered C{408 request_timeout} JSON and closed 10 s
        after the connection opened, not later.
        """
        client = self.connect()
        head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
        for i in range(9):
            client.send(head[i : i + 1])
            self.clock.advance(1)
        client.send(head[9:10])
        self.clock.advance(0.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)
        status, _, body = client.response()
        self.assertEqual((status, body["error"]), (408, "request_timeout"))
        self.assertIn("10 s", body["detail"])

    def test_silentConnectionIsClosedWithoutAnswer(self) -> None:
        """
        A connection that sends nothing is closed after the request timeout
        with no answer (there is no request to answer), and aborted if it
        has not gone 2 s later.
        """
        client = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertEqual(client.transport.value(), b"")
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(client.transport.disconnected)  # aborted
        client.close()
        self.assertEqual(self.site.connections.open, 0)

    def test_wholeRequestStopsTheClock(self) -> None:
        """
        Once a request is whole no request timer runs: an event stream
        stays open for minutes (keepalives flow), and its connection is
        not closed by the request clock.
        """
        other = self.connect(port=40001)
        created = self._create()
        other.send(b"GET /renders/%s/events HTTP/1.1\r\nHost: localhost\r\n\r\n" % created.encode())
        for _ in range(30):
            self.clock.advance(10)
        self.assertFalse(other.closed)
        self.assertIn(b": keepalive", other.transport.value())

    def _create(self) -> str:
        client = self.connect(port=40009)
        body = b'{"renderer": "ticks"}'
        client.send(HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status, _, answer = client.response()
        self.assertEqual(status, 202, answer)
        return str(answer["id"])

    def test_keptAliveIdleIsNotTimedButNextHeadIs(self) -> None:
        """
        Between requests on a kept-alive connection no request timer runs
        (Twisted's idle timeout governs it); the next request's first byte
        starts its 10 s clock.
        """
        client = self.connect()
        client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(client.response()[0], 200)
        self.clock.advance(30)
        self.assertFalse(client.closed)
        client.send(b"GET /heal")
        self.clock.advance(9.9)
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertEqual(client.response()[0], 408)

    def test_slowBodyIsClosedWith408(self) -> None:
        """
        A body that averages under C{bodyMinRate} (1 024 B/s) once it has
        had the request timeout is answered 408 and closed; the head came
        at once, so it is the body's rate that counts.
        """
        client = self.connect()
        client.send(HEAD + b"Content-Length: 60000\r\n\r\n")
        for _ in range(10):
            client.send(b" " * 100)
            self.clock.advance(1)
        self.assertTrue(client.closed)
        status, _, body = client.response()
        self.assertEqual((status, body["error"]), (408, "request_timeout"))
        self.assertIn("bytes/s", body["detail"])

    def test_bodyOnPaceIsRead(self) -> None:
        """
        A body that keeps up the minimum rate may take longer than the
        request timeout: 40 000 bytes at 2 000 B/s (20 s) are read and
        answered.
        """
        client = self.connect()
        body = json.dumps({"renderer": "ticks", "params": {"pad": "x" * (40000 - 42)}}).encode()
        client.send(HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 2000):
            client.send(body[i : i + 2000])
            self.assertFalse(client.closed, i)
            self.clock.advance(1)
        self.assertNotEqual(client.response()[0], 408)

    def test_clockStopsWithTheConnection(self) -> None:
        """
        A connection that goes away leaves no timer of ours behind.
        """
        before = len(self.clock.getDelayedCalls())
        client = self.connect()
        client.send(b"GET /")
        self.assertGreater(len(self.clock.getDelayedCalls()), before)
        client.close()
        self.assertEqual(len(self.clock.getDelayedCalls()), before)


class ChunkedBodyTests(_SiteMixin, SynchronousTestCase):
    def test_endlessChunkedBodyAnswered413AtTheLimit(self) -> None:
        """
        An endless chunked body is answered C{413 body_too_large} JSON as
        soon as it passes 64 KiB, and the connection is closed: the answer
        does not wait for a last chunk that never comes.
        """
        self.makeSite()
        client = self.connect()
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while not client.transport.value() and sent < 1024 * 1024:
            client.send(b"1000\r\n" + b" " * 0x1000 + b"\r\n")
            sent += 0x1000
        self.assertEqual(sent, 64 * 1024 + 0x1000)
        self.assertTrue(client.closed)
        status, _, body = client.response()
        self.assertEqual((status, body["error"]), (413, "body_too_large"))


    def test_refusalLingers(self) -> None:
        """
        Over TCP the refusal is a lingering close: the write side is shut
        after the 413 (a FIN, so the client reads the answer; closing with
        its bytes unread would reset the connection and make the client's
        kernel drop the answer), what the client still sends is dropped
        unparsed, and the connection is aborted 2 s later if the client
        has not closed it.
        """
        self.makeSite()
        client = self.connect(tcp=True)
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(17):
            client.send(b"1000\r\n" + b" " * 0x1000 + b"\r\n")
        self.assertTrue(client.transport.writeClosed)
        self.assertEqual(client.response()[0], 413)
        client.send(b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(client.transport.value(), b"")
        self.clock.advance(1.9)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(client.transport.disconnected)


class CapTests(_SiteMixin, SynchronousTestCase):
    def healthz(self, client: _Client) -> Any:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = client.response()
        self.assertEqual(status, 200)
        return body

    def test_perAddressAndTotalCaps(self) -> None:
        """
        Past the per-address cap a new connection from that address is
        closed at once (aborted, not a byte read); another address still
        gets in until the total cap; the admitted connections keep
        working, C{/healthz} counts them, and the counts return to 0 once
        they close.
        """
        self.makeSite(maxConnections=4, maxPerAddress=2)
        a1, a2 = self.connect("203.0.113.1", 1), self.connect("203.0.113.1", 2)
        refused = self.connect("203.0.113.1", 3)
        self.assertTrue(refused.transport.disconnected)
        b1 = self.connect("2001:db8::1", 1)
        local = self.connect("127.0.0.1", 1)
        overTotal = self.connect("198.51.100.7", 1)
        self.assertTrue(overTotal.transport.disconnected)
        for client in (a1, a2, b1, local):
            self.assertFalse(client.transport.disconnecting)
        self.assertEqual(self.healthz(a2)["connections"], {"open": 4, "max": 4})
        self.assertEqual(self.site.connections.fromAddress("203.0.113.1"), 2)
        for client in (a1, a2, b1, local, refused, overTotal):
            client.close()
        self.assertEqual((self.site.connections.open, self.site.connections.fromAddress("203.0.113.1")), (0, 0))
        again = self.connect("203.0.113.1", 4)
        self.assertEqual(self.healthz(again)["connections"], {"open": 1, "max": 4})

    def test_anIPv6ClientIsItsSlash64(self) -> None:
        """
        IPv6 peers count per /64 (a client picks any address of its /64 at
        no cost): past the cap, a new address in the same /64 is refused,
        one in another /64 gets in; an IPv4-mapped peer counts as its IPv4
        address.
        """
        self.makeSite(maxConnections=10, maxPerAddress=2)
        first = [self.connect("2001:db8:0:1::1", 1), self.connect("2001:db8:0:1::ffff", 1)]
        sameNetwork = self.connect("2001:db8:0:1:abcd::7", 1)
        otherNetwork = self.connect("2001:db8:0:2::1", 1)
        self.assertTrue(sameNetwork.transport.disconnected)
        self.assertFalse(otherNetwork.transport.disconnecting)
        self.assertEqual(self.site.connections.fromAddress("2001:db8:0:1::42"), 2)
        mapped = [self.connect("::ffff:203.0.113.9", 1), self.connect("203.0.113.9", 2)]
        self.assertTrue(self.connect("203.0.113.9", 3).transport.disconnected)
        for client in first + mapped + [otherNetwork, sameNetwork]:
            client.close()

    def test_loopbackIsExemptFromThePerAddressCap(self) -> None:
        """
        Loopback peers (a reverse proxy on the same host: every client's
        connection comes from it) count only against the total cap, unless
        C{limitLoopback}.
        """
        self.makeSite(maxConnections=10, maxPerAddress=2)
        clients = [self.connect("127.0.0.1", port) for port in range(5)] + [
            self.connect("::1", 9),
            self.connect("::ffff:127.0.0.1", 9),
        ]
        self.assertFalse(any(c.transport.disconnected for c in clients))
        self.makeSite(maxConnections=10, maxPerAddress=2, limitLoopback=True)
        clients = [self.connect("127.0.0.1", port) for port in range(3)]
        self.assertEqual([c.transport.disconnected for c in clients], [False, False, True])


class FileBudgetTests(SynchronousTestCase):
    def test_tooManyStreamsRefusedClearly(self) -> None:
        """
        A C{--max-streams} that cannot fit in the open-file limit (after
        the reserve for listeners, renders, the store and logs) is a usage
        error that names the option, the limit and how to raise it.
        """
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--max-streams", str(10**9)])
        message = str(caught.exception)
        for part in ("--max-streams 1000000000", "open-file limit", "LimitNOFILE=", "ulimit -n"):
            self.assertIn(part, message)
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--max-connections", str(10**9)])
        self.assertIn("--max-connections", str(caught.exception))

    def test_budget(self) -> None:
        """
        The reserve is 64 plus one per listener plus 4 per render; what is
        left holds one stream or connection each.
        """
        self.assertEqual(fileReserve(2, 4), 64 + 2 + 16)
        checkFileBudget(1024, 82, max_streams=942)
        self.assertRaises(ValueError, checkFileBudget, 1024, 82, max_streams=943)

    def test_systemdUnitHoldsTheDefaults(self) -> None:
        """
        The shipped systemd unit sets C{LimitNOFILE=} high enough for the
        default caps (16 384 connections) beside the reserve of a many-CPU
        host (64 renders).
        """
        import re
        from pathlib import Path

        unit = (Path(__file__).parents[1] / "docs" / "systemd" / "twistedsse.service").read_text()
        limit = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
        checkFileBudget(limit, fileReserve(1, 64), max_connections=16384, max_streams=10000)

    def test_defaultsFitTheLimit(self) -> None:
        """
        Unless given, C{--max-streams} and C{--max-connections} default to
        10 000 and 16 384, or to what the open-file limit leaves.
        """
        options = Options()
        options.parseOptions([])
        room = options["open-file-limit"] - fileReserve(1, options["max-renders"])
        self.assertEqual(options["max-streams"], min(10000, room))
        self.assertEqual(options["max-connections"], min(16384, room))

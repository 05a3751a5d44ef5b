"""
L{EagerSendReactor}'s TCP connections on real sockets: a write is on the
wire when the call returns; what the kernel cannot take is queued in order,
with Twisted's backpressure; a lost peer is reported as ever.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from twistedsse import EagerSendReactor
from twistedsse._transport import EagerServer


class _Held(Protocol):
    """
    The server side of one connection, handed to the test.
    """

    def __init__(self, accepted: "Deferred[_Held]") -> None:
        self.accepted = accepted
        self.lost: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.accepted.callback(self)

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class EagerTransportTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def connect(self) -> Any:
        """
        A listening eager port on 127.0.0.1 and one connection to it: the
        server protocol and the client's blocking socket.
        """
        accepted: Deferred[_Held] = Deferred()
        factory = Factory.forProtocol(lambda: _Held(accepted))
        port = EagerSendReactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        held = yield accepted
        self.addCleanup(lambda: held.transport.abortConnection() if held.transport.connected else None)
        self.assertIsInstance(held.transport, EagerServer)
        return held, client

    @inlineCallbacks
    def test_writeIsSentInTheCall(self) -> None:
        """
        Without the reactor running in between, the client reads the bytes
        of each write (and of a writeSequence, as one piece): nothing was
        queued.
        """
        held, client = yield self.connect()
        client.settimeout(5)
        transport = held.transport
        for i in range(100):
            frame = b"data: %d\n\n" % i
            transport.write(frame)
            self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
            self.assertEqual(client.recv(1000), frame)
        transport.writeSequence([b"5\r\n", b"hello", b"\r\n"])
        self.assertEqual(client.recv(1000), b"5\r\nhello\r\n")

    @inlineCallbacks
    def test_fullSocketQueuesInOrderWithBackpressure(self) -> None:
        """
        A client that does not read: the kernel takes what it can, the
        rest is queued (the producer is paused once past the buffer
        size); when the client reads, every byte arrives once, in order,
        and the producer is resumed.
        """
        held, client = yield self.connect()
        transport = held.transport
        producer = _Producer()
        transport.registerProducer(producer, True)
        # 32 MB: more than the kernel's socket buffers hold on loopback.
        pieces = [(b"%08d" % i) * 128 for i in range(32000)]
        for piece in pieces:
            transport.write(piece)
        self.assertGreater(transport._tempDataLen + len(transport.dataBuffer), 0)
        self.assertGreaterEqual(producer.paused, 1)
        expected = b"".join(pieces)
        received = bytearray()
        client.setblocking(False)
        deadline = reactor.seconds() + 20
        while len(received) < len(expected) and reactor.seconds() < deadline:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
                continue
            received += chunk
        self.assertEqual(len(received), len(expected))
        self.assertTrue(bytes(received) == expected, "bytes reordered or repeated")
        self.assertGreaterEqual(producer.resumed, 1)
        # Drained: the next write is eager again.
        transport.write(b"after")
        self.assertEqual(transport.dataBuffer, b"")

    @inlineCallbacks
    def test_peerResetIsReported(self) -> None:
        """
        Writing to a connection the peer reset raises nothing in the
        caller; the connection is reported lost through connectionLost.
        """
        held, client = yield self.connect()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        yield deferLater(reactor, 0.05, lambda: None)
        for _ in range(3):
            held.transport.write(b"data: x\n\n")
        yield held.lost
        self.assertFalse(held.transport.connected)
        self.assertIsNotNone(held.reason)

    @inlineCallbacks
    def test_loseConnectionSendsEverythingFirst(self) -> None:
        """
        loseConnection after eager and queued writes closes only after the
        last byte, as Twisted's own transport does.
        """
        held, client = yield self.connect()
        transport = held.transport
        body = b"x" * (8 << 20)
        transport.write(b"first")
        transport.write(body)
        transport.loseConnection()
        received = bytearray()
        client.setblocking(False)
        deadline = reactor.seconds() + 20
        while reactor.seconds() < deadline:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
                continue
            if not chunk:
                break
            received += chunk
        self.assertEqual(bytes(received), b"first" + body)
        yield held.lost

    @inlineCallbacks
    def test_heldWritesAreOneSend(self) -> None:
        """
        Writes made within C{holding()} (a response's headers and first
        frame; the last frame and the end of the response) leave in one
        C{send}, in order; outside it each write is its own.
        """
        held, client = yield self.connect()
        client.settimeout(5)
        transport = held.transport

        class Counting:
            def __init__(self, sock: socket.socket) -> None:
                self.sock, self.sends = sock, []

            def send(self, data: bytes) -> int:
                self.sends.append(bytes(data))
                return self.sock.send(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.sock, name)

        counting = Counting(transport.socket)
        transport.socket = counting
        try:
            with transport.holding():
                transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n"])
                with transport.holding():
                    transport.write(b"6\r\nretry\n\r\n")
                self.assertEqual(counting.sends, [])
            transport.write(b"0\r\n\r\n")
        finally:
            transport.socket = counting.sock
        self.assertEqual(counting.sends, [b"HTTP/1.1 200 OK\r\n\r\n6\r\nretry\n\r\n", b"0\r\n\r\n"])
        expected = b"".join(counting.sends)
        received = b""
        while len(received) < len(expected):
            received += client.recv(1000)
        self.assertEqual(received, expected)

    @inlineCallbacks
    def test_nothingSentAfterAbort(self) -> None:
        """
        After abortConnection nothing more is sent (the connection is
        being dropped, not flushed), as with Twisted's own transport.
        """
        held, client = yield self.connect()
        client.settimeout(5)
        held.transport.write(b"before")
        self.assertEqual(client.recv(100), b"before")
        held.transport.abortConnection()
        held.transport.write(b"after")
        yield held.lost
        rest = b""
        try:
            while chunk := client.recv(100):
                rest += chunk
        except ConnectionResetError:
            pass
        self.assertEqual(rest, b"")

    @inlineCallbacks
    def test_adoptedSocketIsEager(self) -> None:
        """
        A listening socket passed in (systemd socket activation:
        C{--listen systemd:...}) is adopted with eager connections too.
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        self.addCleanup(listener.close)
        accepted: Deferred[_Held] = Deferred()
        port = EagerSendReactor(reactor).adoptStreamPort(
            listener.fileno(), socket.AF_INET, Factory.forProtocol(lambda: _Held(accepted))
        )
        self.addCleanup(port.stopListening)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        held = yield accepted
        self.addCleanup(held.transport.abortConnection)
        self.assertIsInstance(held.transport, EagerServer)
        client.settimeout(5)
        held.transport.write(b"adopted")
        self.assertEqual(client.recv(100), b"adopted")

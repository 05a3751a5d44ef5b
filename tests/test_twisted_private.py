"""
The canary for Twisted upgrades: every private (or undocumented) Twisted
attribute that twistedsse reads is named in L{PRIVATE}, and checked here to
still mean what the code assumes, on real Twisted objects: TCP connections
on real 127.0.0.1 sockets, driven by hand on a L{MemoryReactorClock} (the
test calls C{doRead}/C{doWrite} where the reactor would), and HTTP/1.1 and
HTTP/2 channels over L{StringTransport}.

If a check fails after an upgrade, the named code is what breaks: fix it
(handle both releases) before raising the bound on Twisted in
pyproject.toml. L{PrivateNamesTests} fails when the package starts reading a
private name that is not listed here.
"""

from __future__ import annotations

import gzip
import os
import re
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server as webserver
from twisted.web._http2 import H2Connection, H2Stream
from twisted.web.http import HTTPChannel
from twisted.web.resource import EncodingResourceWrapper, Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Site

import twistedsse
from twistedsse._site import BoundedRequest, _refuseStream
from twistedsse._transport import EagerClient, EagerPort, EagerSendReactor, EagerServer

#: (module of twistedsse, name): the test here that checks what it means.
#: Underscored names are found by L{PrivateNamesTests}; the others
#: (undocumented public-looking attributes) are listed by hand.
PRIVATE: dict[tuple[str, str], str] = {
    ("_transport.py", "_tempDataLen"): "EagerServerTests.test_queuedBytesGoFirst",
    ("_transport.py", "dataBuffer"): "EagerServerTests.test_queuedBytesGoFirst",
    ("_transport.py", "offset"): "EagerServerTests.test_queuedBytesGoFirst",
    ("_transport.py", "socket"): "EagerServerTests.test_queuedBytesGoFirst",
    ("_transport.py", "_aborting"): "EagerServerTests.test_abortMidQueue",
    ("_transport.py", "_writeDisconnected"): "EagerServerTests.test_writeAfterWriteSideClosed",
    ("_transport.py", "TLS"): "TLSTests.test_startTLSTurnsTheEagerPathOff",
    ("_transport.py", "transport"): "PortTests.test_portBuildsItsTransportClass",
    ("_transport.py", "bindAddress"): "ClientTests.test_connectorBuildsEagerClients",
    ("_transport.py", "_type"): "PortTests.test_typeNamesThePortInTheLog",
    ("_transport.py", "_fromListeningDescriptor"): "PortTests.test_adoptedDescriptor",
    ("_site.py", "_disconnected"): "RequestTests.test_disconnected",
    ("_site.py", "_encoder"): "RequestTests.test_encoder",
    ("_site.py", "_channel"): "ChannelTests.test_genericProtocolChannel",
    ("_site.py", "_negotiatedProtocol"): "ChannelTests.test_genericProtocolChannel",
    ("_site.py", "_conn"): "HTTP2Tests.test_streamAndConnection",
    ("_stream.py", "_conn"): "HTTP2Tests.test_streamAndConnection",
    ("_site.py", "streams"): "HTTP2Tests.test_streamAndConnection",
    ("_site.py", "conn"): "HTTP2Tests.test_streamAndConnection",
    ("_site.py", "_reactor"): "HTTP2Tests.test_streamAndConnection",
    ("_site.py", "_tryToWriteControlData"): "HTTP2Tests.test_tryToWriteControlData",
    ("_site.py", "_requestDone"): "HTTP2Tests.test_refuseStream",
    ("_listen.py", "_sddaemon"): "SystemdTests.test_parserHoldsTheSockets",
}

#: Private names read from the standard library, not Twisted.
NOT_TWISTED = {("_launcher.py", "_exit"), ("_launcher.py", "_Environ")}

_SOURCE = Path(twistedsse.__file__).parent
_PEM = (Path(webserver.__file__).parent.parent / "test" / "server.pem").read_bytes()


class _Held(Protocol):
    """
    The server side of one connection, kept for the test.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class _ClientFactory(Factory):
    """
    A client factory for L{ClientTests}: it builds C{protocol} and ignores
    the connection's end.
    """

    def __init__(self, protocol: type) -> None:
        self.protocol = protocol

    def startedConnecting(self, connector: Any) -> None:
        pass

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        pass

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        pass


class _Connected:
    """
    One connection to an L{EagerPort} on 127.0.0.1: the port, the server
    protocol and transport, the client's socket, and the memory reactor.
    """

    def __init__(self, case: SynchronousTestCase, factory: Any = None, smallBuffers: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.held: list[Any] = []
        if factory is None:
            factory = Factory.forProtocol(self._protocol)
        self.port = EagerSendReactor(self.reactor).listenTCP(0, factory, interface="127.0.0.1")
        case.addCleanup(self.close)
        self.client = socket.socket()
        if smallBuffers:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.client.connect(("127.0.0.1", self.port.getHost().port))
        self.port.doRead()  # the reactor's accept
        self.protocol = self.acceptedProtocol()
        self.transport = self.protocol.transport
        self.transport.setTcpNoDelay(True)  # as HTTPChannel does: no Nagle wait for a test's small writes
        if smallBuffers:
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.client.setblocking(False)

    def _protocol(self) -> _Held:
        held = _Held()
        self.held.append(held)
        return held

    def acceptedProtocol(self) -> Any:
        (connection,) = [r for r in self.reactor.getReaders() if r is not self.port]
        return connection.protocol

    def recv(self) -> bytes:
        try:
            return self.client.recv(1 << 16)
        except BlockingIOError:
            return b""

    def fill(self) -> list[bytes]:
        """
        Write until the kernel's buffers are full and Twisted's queue holds
        the rest; return the writes.
        """
        writes = []
        for i in range(10000):
            piece = (b"%07d " % i) * 100
            self.transport.write(piece)
            writes.append(piece)
            if self.transport._tempDataLen:
                return writes
        raise AssertionError("the socket never filled")

    def drain(self, length: int) -> bytes:
        """
        Read while calling C{doWrite} as the reactor would when the socket
        is writable, until C{length} bytes came.
        """
        received = bytearray()
        for _ in range(200000):
            received += self.recv()
            if len(received) >= length:
                break
            why = self.transport.doWrite()
            assert why is None, why
        return bytes(received)

    def close(self) -> None:
        if self.transport.connected:
            self.transport.abortConnection()
        self.port.stopListening()
        self.reactor.advance(0)
        self.reactor.advance(0)
        self.client.close()


class EagerServerTests(SynchronousTestCase):
    def test_queuedBytesGoFirst(self) -> None:
        """
        C{_tempDataLen}, C{dataBuffer} and C{offset}: L{EagerServer.write}
        sends in the call only when C{_tempDataLen == 0} and C{offset ==
        len(dataBuffer)}, taking these to mean "nothing is queued". If the
        queue lived elsewhere, an eager write would overtake queued bytes:
        frames out of order on a slow client. Under a full socket the
        writes made after the queue started wait behind it, and every byte
        arrives in write order; drained, the next write is sent in the call
        again (C{socket.send}).
        """
        c = _Connected(self)
        transport = c.transport
        writes = c.fill()
        self.assertEqual(transport._tempDataLen, sum(len(d) for d in transport._tempDataBuffer))
        transport.doWrite()  # the queue moves to dataBuffer; the socket is still full
        self.assertEqual(transport._tempDataLen, 0)
        self.assertGreater(len(transport.dataBuffer) - transport.offset, 0)
        for i in range(3):
            late = b"late %d;" % i
            transport.write(late)
            writes.append(late)
        self.assertGreater(transport._tempDataLen, 0, "an eager write overtook the queue")
        expected = b"".join(writes)
        self.assertTrue(c.drain(len(expected)) == expected, "bytes out of write order")
        self.assertEqual((transport._tempDataLen, transport.dataBuffer, transport.offset), (0, b"", 0))
        transport.write(b"eager")
        self.assertEqual(c.recv(), b"eager")

    def test_abortMidQueue(self) -> None:
        """
        C{_aborting}: after C{abortConnection} the transport stays
        C{connected} until the reactor's next turn, so
        L{EagerServer.write} relies on C{_aborting} alone to send nothing
        more. Twisted drops the queue (C{doWrite} does nothing), and the
        client gets a prefix of what was written, never a later write.
        """
        c = _Connected(self)
        transport = c.transport
        writes = c.fill()
        transport.abortConnection()
        self.assertTrue(transport._aborting)
        self.assertTrue(transport.connected)
        transport.write(b"AFTER ABORT")
        self.assertIsNone(transport.doWrite())
        c.reactor.advance(0)
        self.assertIsInstance(c.held[0].lost.value, error.ConnectionAborted)
        received = b""
        c.client.setblocking(True)
        c.client.settimeout(5)
        try:
            while chunk := c.client.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        written = b"".join(writes)
        self.assertTrue(written.startswith(received))
        self.assertLess(len(received), len(written))
        self.assertNotIn(b"AFTER ABORT", received)

    def test_writeAfterWriteSideClosed(self) -> None:
        """
        C{_writeDisconnected}: set once C{loseWriteConnection}'s pending
        bytes are sent and the write side is shut; Twisted's C{write} then
        drops data, and L{EagerServer.write} defers to it instead of
        sending (which would raise C{EPIPE} from the socket).
        """
        c = _Connected(self)
        transport = c.transport
        transport.write(b"before")
        transport.loseWriteConnection()
        self.assertFalse(transport._writeDisconnected)  # not yet: doWrite shuts it
        transport.doWrite()
        self.assertTrue(transport._writeDisconnected)
        transport.write(b"after")
        self.assertEqual(transport._tempDataLen, 0)
        self.assertEqual(c.recv(), b"before")
        c.client.setblocking(True)
        c.client.settimeout(5)
        self.assertEqual(c.client.recv(100), b"")  # end of stream, and nothing after

    def test_writeAfterPeerReset(self) -> None:
        """
        A write to a connection the peer reset raises nothing in the
        caller: L{EagerServer.write} queues what C{send} refused, and
        Twisted's C{doWrite} returns the loss (the reactor then calls
        C{connectionLost}).
        """
        c = _Connected(self)
        c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.client.close()
        for _ in range(3):
            c.transport.write(b"data: x\n\n")
        self.assertGreater(c.transport._tempDataLen, 0)
        self.assertIsInstance(c.transport.doWrite(), error.ConnectionLost)


class ClientTests(TestCase):
    timeout = 10

    def test_connectorBuildsEagerClients(self) -> Any:
        """
        C{tcp.Connector._makeTransport} (with its C{host}, C{port},
        C{bindAddress}): what a connector builds its connection with;
        L{EagerSendReactor.connectTCP}'s connector builds an
        L{EagerClient}, whose write on an empty queue is sent in the call
        (on a real connection to 127.0.0.1: nothing left queued).
        """
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        received: Deferred[bytes] = Deferred()

        class Server(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.callback(data)

        port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        queued: list[int] = []

        class Client(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"now")
                queued.append(self.transport._tempDataLen + len(self.transport.dataBuffer))
                self.transport.loseConnection()

        connector = EagerSendReactor(reactor).connectTCP("127.0.0.1", port.getHost().port, _ClientFactory(Client))
        self.assertIsInstance(connector.transport, EagerClient)
        self.assertEqual(connector.getDestination().port, port.getHost().port)

        def check(data: bytes) -> None:
            self.assertEqual(data, b"now")
            self.assertEqual(queued, [0])

        return received.addCallback(check)


class PortTests(SynchronousTestCase):
    def test_portBuildsItsTransportClass(self) -> None:
        """
        C{tcp.Port.transport}: the class a port builds its connections
        with; L{EagerPort} sets it to L{EagerServer}. If Twisted built
        connections otherwise, nothing would be eager (and no test of
        delivery order would notice).
        """
        c = _Connected(self, smallBuffers=False)
        self.assertIsInstance(c.transport, EagerServer)
        self.assertIs(EagerPort.transport, EagerServer)

    def test_typeNamesThePortInTheLog(self) -> None:
        """
        C{tcp.Port._type}: only a label in the port's log lines ("TLS"
        for a TLS port, as the reactor's C{listenSSL} sets it);
        L{EagerSendReactor.listenSSL} sets it the same way.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactorClock()
        options = PrivateCertificate.loadPEM(_PEM).options()
        port = EagerSendReactor(reactor).listenSSL(0, Factory.forProtocol(Protocol), options, interface="127.0.0.1")
        self.assertEqual(port._type, "TLS")
        self.assertIsInstance(port.factory, TLSMemoryBIOFactory)
        port.stopListening()
        reactor.advance(0)
        self.assertTrue(any("(TLS Port" in str(e.get("log_text", "")) for e in events), events)

    def test_adoptedDescriptor(self) -> None:
        """
        C{tcp.Port._fromListeningDescriptor}: a classmethod that wraps a
        listening socket's descriptor (systemd socket activation) in an
        instance of the class it is called on, so
        L{EagerSendReactor.adoptStreamPort} gets an L{EagerPort} with
        eager connections.
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        self.addCleanup(listener.close)
        reactor = MemoryReactorClock()
        held: list[_Held] = []
        factory = Factory.forProtocol(lambda: held.append(_Held()) or held[-1])
        port = EagerSendReactor(reactor).adoptStreamPort(listener.fileno(), socket.AF_INET, factory)
        self.assertIsInstance(port, EagerPort)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        port.doRead()
        self.assertIsInstance(held[0].transport, EagerServer)
        held[0].transport.write(b"adopted")
        client.settimeout(5)
        self.assertEqual(client.recv(100), b"adopted")
        held[0].transport.abortConnection()
        port.stopListening()
        reactor.advance(0)
        reactor.advance(0)


def _cancelNewGlobalCalls(case: SynchronousTestCase) -> set[Any]:
    """
    Cancel, at C{case}'s cleanup, the calls the test leaves on the global
    reactor (C{startTLS}'s flush, C{HTTPChannel}'s timeout): the test
    drives the transports by hand and never runs that reactor.

    @return: the calls already there, which are not the test's.
    """
    from twisted.internet import reactor as globalReactor

    before = set(globalReactor.getDelayedCalls())

    def cancelNew() -> None:
        for call in globalReactor.getDelayedCalls():
            if call not in before and call.active():
                call.cancel()

    case.addCleanup(cancelNew)
    return before


class _TLSClient:
    """
    The client end of a TLS connection, in memory (C{ssl.SSLObject}) over
    the test's socket; C{pump} moves bytes both ways once.
    """

    def __init__(self, c: _Connected) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # (what is checked here is not the certificate)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self.c = c
        self.wire = b""  # every byte the client received

    def pump(self, serverTransport: Any) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if data := self.outgoing.read():
            self.c.client.sendall(data)
        serverTransport.doRead()
        self.c.reactor.advance(0)
        serverTransport.doWrite()
        if data := self.c.recv():
            self.wire += data
            self.incoming.write(data)

    def read(self) -> bytes:
        try:
            return self.tls.read(1 << 16)
        except ssl.SSLWantReadError:
            return b""


class TLSTests(SynchronousTestCase):
    def test_tlsPortEncryptsBeforeTheEagerWrite(self) -> None:
        """
        On a TLS port (L{EagerSendReactor.listenSSL}: TLS in memory over an
        L{EagerServer}), the connection's C{TLS} is C{False}, and what the
        eager path sends is the TLS layer's ciphertext: a frame written by
        the application is on the wire without the reactor writing
        (C{doWrite}), and never in clear.
        """
        options = PrivateCertificate.loadPEM(_PEM).options()
        held: list[_Held] = []
        reactor = MemoryReactorClock()
        wrapped = Factory.forProtocol(lambda: held.append(_Held()) or held[-1])
        c = _Connected.__new__(_Connected)  # (as _Connected builds it, with TLS and the reactor as its clock)
        c.reactor = reactor
        c.held = held
        c.port = EagerSendReactor(reactor).listenTCP(
            0, TLSMemoryBIOFactory(options, False, wrapped, clock=reactor), interface="127.0.0.1"
        )
        self.addCleanup(c.close)
        c.client = socket.create_connection(("127.0.0.1", c.port.getHost().port))
        c.port.doRead()
        tlsProtocol = c.acceptedProtocol()
        c.protocol, c.transport = tlsProtocol, tlsProtocol.transport
        c.transport.setTcpNoDelay(True)
        c.client.setblocking(False)
        self.assertIsInstance(c.transport, EagerServer)
        self.assertFalse(c.transport.TLS)
        client = _TLSClient(c)
        for _ in range(50):
            client.pump(c.transport)
            if client.tls.version():
                break
        for _ in range(5):  # the server's side of the handshake ends as it reads the client's last flight
            client.pump(c.transport)
        self.assertTrue(client.tls.version())
        client.wire = b""
        held[0].transport.write(b"data: secret frame\n\n")
        reactor.advance(0)  # the TLS layer's flush of small writes (no doWrite)
        wire = c.recv()
        self.assertTrue(wire)
        self.assertNotIn(b"secret frame", wire)
        client.incoming.write(wire)
        self.assertEqual(client.read(), b"data: secret frame\n\n")

    def test_startTLSTurnsTheEagerPathOff(self) -> None:
        """
        C{TLS}: C{True} once C{startTLS} runs on the connection itself;
        L{EagerServer.write} then hands writes to Twisted, whose TLS layer
        encrypts them (an eager C{send} would put them on the wire in
        clear).
        """
        from twisted.internet import reactor as globalReactor

        before = _cancelNewGlobalCalls(self)
        c = _Connected(self, smallBuffers=False)
        c.transport.startTLS(PrivateCertificate.loadPEM(_PEM).options())
        self.assertTrue(c.transport.TLS)
        client = _TLSClient(c)
        c.transport.write(b"data: secret frame\n\n")
        received = b""
        for _ in range(50):
            client.pump(c.transport)
            for call in globalReactor.getDelayedCalls():  # startTLS's flush runs on the global reactor
                if call not in before and call.active():
                    func, args, kw = call.func, call.args, call.kw
                    call.cancel()
                    func(*args, **kw)
            c.transport.doWrite()
            received += client.read()
            if received:
                break
        self.assertEqual(received, b"data: secret frame\n\n")
        self.assertNotIn(b"secret frame", client.wire)


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


def _channel(site: Site) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class RequestTests(SynchronousTestCase):
    def site(self, resource: Any) -> Site:
        site = Site(resource, reactor=MemoryReactorClock())
        site.requestFactory = BoundedRequest
        return site

    def test_disconnected(self) -> None:
        """
        C{Request._disconnected}: C{False} until the connection is lost,
        then C{True}; Twisted's C{write} drops data after it.
        L{BoundedRequest.write} takes its fast path only while it is
        C{False}: else it would write to a closed channel.
        """
        recorder = _Recorder()
        protocol, transport = _channel(self.site(recorder))
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        (request,) = recorder.requests
        self.assertFalse(request._disconnected)
        request.write(b"one")
        request.write(b"two")
        self.assertTrue(transport.value().endswith(b"3\r\none\r\n3\r\ntwo\r\n"))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(request._disconnected)
        written = transport.value()
        request.write(b"three")
        self.assertEqual(transport.value(), written)

    def test_encoder(self) -> None:
        """
        C{Request._encoder}: C{None} unless a content encoding (gzip by
        C{EncodingResourceWrapper}) applies, when C{write} passes data
        through it. L{BoundedRequest.write} frames data itself only when
        it is C{None}: else it would send the stream uncompressed under a
        C{Content-Encoding: gzip} header.
        """
        recorder = _Recorder()
        site = self.site(EncodingResourceWrapper(recorder, [GzipEncoderFactory()]))
        protocol, transport = _channel(site)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsNone(recorder.requests[0]._encoder)
        protocol, transport = _channel(site)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        request = recorder.requests[1]
        self.assertIsNotNone(request._encoder)
        request.write(b"data: secret frame\n\n" * 20)
        request.finish()
        body = transport.value().split(b"\r\n\r\n", 1)[1]
        self.assertNotIn(b"secret frame", body)
        chunks, rest = [], body
        while rest:
            size, rest = rest.split(b"\r\n", 1)
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2 :]
        self.assertEqual(gzip.decompress(b"".join(chunks)), b"data: secret frame\n\n" * 20)


class ChannelTests(SynchronousTestCase):
    def test_genericProtocolChannel(self) -> None:
        """
        C{_GenericHTTPChannelProtocol._channel} and C{_negotiatedProtocol}:
        Site's protocol is a proxy whose C{_channel} is the HTTP/1.1
        C{HTTPChannel} that parses requests (L{twistedsse.DrainingSite}
        sets its line and header limits there) until ALPN picks C{h2},
        when it becomes an C{H2Connection}; C{_negotiatedProtocol} says
        which (L{twistedsse._site._TrackedConnection} reads both, and
        C{_channel.conn.highest_inbound_stream_id}, to stop the request
        clock at the first h2 stream).
        """
        _cancelNewGlobalCalls(self)
        recorder = _Recorder()
        site = Site(recorder, reactor=MemoryReactorClock())
        protocol, transport = _channel(site)
        self.assertIsInstance(protocol._channel, HTTPChannel)
        self.assertIsNone(protocol._negotiatedProtocol)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(protocol._negotiatedProtocol, b"http/1.1")
        self.assertIs(recorder.requests[0].channel, protocol._channel)
        recorder.requests[0].finish()
        protocol.connectionLost(Failure(error.ConnectionDone()))

        protocol2 = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        h2transport = StringTransport()
        h2transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol2.makeConnection(h2transport)
        client = _h2Client()
        client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/")], end_stream=True)
        protocol2.dataReceived(client.data_to_send())
        self.assertEqual(protocol2._negotiatedProtocol, b"h2")
        self.assertIsInstance(protocol2._channel, H2Connection)
        self.assertEqual(protocol2._channel.conn.highest_inbound_stream_id, 1)
        protocol2.connectionLost(Failure(error.ConnectionDone()))


def _h2Client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


class HTTP2Tests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.recorder = _Recorder()
        site = Site(self.recorder, reactor=self.clock)
        site.requestFactory = BoundedRequest
        self.connection = H2Connection(self.clock)
        self.connection.site = site
        self.connection.requestFactory = BoundedRequest
        self.connection.factory = site
        self.connection.timeOut = None
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.client = _h2Client()
        self.addCleanup(self.connection.connectionLost, Failure(error.ConnectionDone()))

    def exchange(self) -> list[Any]:
        self.connection.dataReceived(self.client.data_to_send())
        self.clock.advance(0)
        events = self.client.receive_data(self.transport.value())
        self.transport.clear()
        return events

    def openStream(self, streamID: int, method: bytes = b"POST", end: bool = False) -> None:
        headers = [(b":method", method), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/")]
        self.client.send_headers(streamID, headers, end_stream=end)
        self.exchange()

    def test_streamAndConnection(self) -> None:
        """
        C{H2Stream._conn} is the C{H2Connection} (whose C{transport} is the
        TCP connection: L{twistedsse._stream.tcpTransport}); the
        connection's C{streams} maps open stream ids to their
        C{H2Stream}; C{conn} is the h2 library's state machine (its
        C{highest_inbound_stream_id} counts the client's streams); and
        C{_reactor} is the reactor it schedules on (an h2 413 is answered
        there on the next turn). L{twistedsse._site._refuseStream} and
        C{BoundedRequest._refuseTooLarge} use all of them.
        """
        self.openStream(1)
        stream = self.connection.streams[1]
        self.assertIsInstance(stream, H2Stream)
        self.assertIs(stream._conn, self.connection)
        self.assertIs(stream._conn.transport, self.transport)
        self.assertIsInstance(self.connection.conn, h2.connection.H2Connection)
        self.assertEqual(self.connection.conn.highest_inbound_stream_id, 1)
        self.assertGreater(self.connection.conn.local_flow_control_window(1), 0)
        self.assertIs(self.connection._reactor, self.clock)
        self.assertIsNone(stream.transport)

    def test_tryToWriteControlData(self) -> None:
        """
        C{H2Connection._tryToWriteControlData()}: writes what the h2 state
        machine has to send (frames queued by C{send_headers},
        C{reset_stream}...) to the transport, and returns true while the
        connection lives. L{twistedsse._site._refuseStream} sends its
        answer with it and ends the stream only if it returned true.
        """
        self.openStream(1)
        self.connection.conn.ping(b"12345678")
        self.assertIs(self.connection._tryToWriteControlData(), True)
        self.assertEqual(self.connection.conn.data_to_send(), b"")
        events = self.client.receive_data(self.transport.value())
        self.assertEqual([type(e) for e in events], [h2.events.PingReceived])

    def test_refuseStream(self) -> None:
        """
        C{H2Connection._requestDone(streamID)}: forgets a finished stream
        (C{streams} no longer holds it). With the names above it lets
        L{twistedsse._site._refuseStream} answer one stream (413 JSON,
        then C{RST_STREAM}) while the connection's other streams go on.
        """
        self.openStream(1)
        self.openStream(3, method=b"GET", end=True)
        _refuseStream(self.connection.streams[1], 413, "body_too_large", "too large")
        self.assertNotIn(1, self.connection.streams)
        self.assertIn(3, self.connection.streams)
        events = self.exchange()
        responses = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertEqual([(e.stream_id, dict(e.headers)[b":status"]) for e in responses], [(1, b"413")])
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == 1)
        self.assertIn(b'"body_too_large"', data)
        other = self.recorder.requests[0]
        other.write(b"still here")
        other.finish()
        self.clock.advance(0)
        events = self.exchange()
        self.assertIn(b"still here", b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)))


_ACCESS = re.compile(r"\.(_[A-Za-z]\w*)\b|(?:getattr|hasattr|setattr)\([^,()]+(?:\([^()]*\))?,\s*[\"'](_[A-Za-z]\w*)[\"']")
_CHAINED = re.compile(r"\.(_[A-Za-z]\w*)\.(_[A-Za-z]\w*)\b")
_DEFINED = [
    re.compile(r"\b(?:self|cls)\.(_\w+)\s*(?::[^=\n]+)?=(?!=)"),
    re.compile(r"^\s*(_\w+)\s*(?::[^=\n]*)?=(?!=)", re.M),
    re.compile(r"^\s*(_\w+)\s*:", re.M),
    re.compile(r"\b(?:def|class)\s+(_\w+)"),
]


def privateNamesRead() -> set[tuple[str, str]]:
    """
    The private names twistedsse's source reads from objects that are not
    its own, as (module, name): every C{._name} access and
    C{getattr(x, "_name")}, less the names twistedsse itself defines
    (its own attributes, functions and classes, and the C{_twistedsse...}
    marks it sets on Twisted objects) and references to its own modules;
    but a name read through a private that is not its own
    (C{x._conn._reactor}) counts even if twistedsse has one like it.
    """
    sources = {p.name: p.read_text() for p in sorted(_SOURCE.glob("*.py"))}
    ours: set[str] = set()
    for text in sources.values():
        for pattern in _DEFINED:
            ours.update(pattern.findall(text))
    found = set()
    for module, text in sources.items():
        text = re.sub(r"\btwistedsse\.(?:_\w+\.?)+", "", text)
        text = re.sub(r"^\s*from\s+\.\S*\s+import.*$", "", text, flags=re.M)
        for match in _ACCESS.finditer(text):
            name = match.group(1) or match.group(2)
            if not (name.startswith(("_twistedsse", "__")) or name in ours):
                found.add((module, name))
        found.update((module, name) for first, name in _CHAINED.findall(text) if first not in ours)
    return found


class SystemdTests(SynchronousTestCase):
    def test_parserHoldsTheSockets(self) -> None:
        """
        Twisted's C{systemd:} endpoint parser adopts the sockets in its
        C{_sddaemon} (a L{ListenFDs}, taken from the environment when
        C{twisted.internet.endpoints} is imported), by index and by name:
        what L{twistedsse._listen.systemdEnvironment} reads them back from.
        """
        from twisted.internet.endpoints import _SystemdParser, serverFromString
        from twisted.python.systemd import ListenFDs

        from twistedsse._listen import systemdEnvironment

        self.assertIsInstance(_SystemdParser._sddaemon, ListenFDs)
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([7, 8], ("web", "metrics")))
        self.patch(os, "environ", {})
        reactor = MemoryReactorClock()
        self.assertEqual(serverFromString(reactor, "systemd:domain=INET:name=metrics").fileno, 8)
        self.assertEqual(serverFromString(reactor, "systemd:domain=INET:index=0").fileno, 7)
        self.assertEqual(systemdEnvironment(), {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:metrics"})
        # (Still in the environment, if Twisted leaves them there: as they are.)
        self.patch(os, "environ", {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"})
        self.assertEqual(dict(systemdEnvironment()), {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"})


class PrivateNamesTests(SynchronousTestCase):
    def test_everyPrivateNameIsChecked(self) -> None:
        """
        Every private name the package reads from Twisted's objects is in
        L{PRIVATE} (so a check here says what it must mean). A new one
        fails this test until it is listed, with a check.
        """
        found = privateNamesRead() - NOT_TWISTED
        self.assertEqual(found - set(PRIVATE), set(), "read from Twisted but not checked here")
        underscored = {key for key in PRIVATE if key[1].startswith("_")}
        self.assertEqual(underscored - found, set(), "listed but no longer read: remove them")

    def test_everyListedCheckExists(self) -> None:
        """
        Each entry of L{PRIVATE} names a test of this module.
        """
        for check in set(PRIVATE.values()):
            cls, method = check.split(".")
            self.assertTrue(callable(getattr(globals()[cls], method, None)), check)


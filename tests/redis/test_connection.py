"""
Connections to a real redis-server (tests/_support/redis.py), through
L{twistedsse._redis}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase

from tests._support.ports import freePort
from tests._support.redis import RedisServer
from twistedsse._redis import RedisConfigError, RedisEndpoint, checkNow, ready


class ConnectionTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RedisServer()
        self.addCleanup(self.server.stop)

    def connect(self, endpoint: RedisEndpoint | None = None) -> Any:
        connection = (endpoint or RedisEndpoint.fromURL(self.server.url)).connect()
        self.addCleanup(connection.disconnect)
        return connection

    @inlineCallbacks
    def test_streamValuesStayStrings(self) -> Any:
        """
        Stream entries come back as written: C{"0019"} and C{"12.5"} stay
        strings (txredisapi would convert them by default).
        """
        connection = self.connect()
        yield ready(connection, reactor)
        entry = yield connection.execute_command("XADD", "job:a", "*", "frame", "0019", "pct", "12.5")
        read = yield connection.execute_command("XRANGE", "job:a", "-", "+")
        self.assertEqual(read, [[entry, ["frame", "0019", "pct", "12.5"]]])

    @inlineCallbacks
    def test_password(self) -> Any:
        """
        With C{requirepass}, the password from the file authenticates; a
        wrong one fails L{ready} instead of hanging.
        """
        self.server.stop()
        self.server = RedisServer(password="pw-from-file")
        self.addCleanup(self.server.stop)
        right = Path(self.mktemp())
        right.write_text("pw-from-file\n")
        connection = self.connect(RedisEndpoint.fromURL(self.server.url, right))
        yield ready(connection, reactor)
        self.assertEqual((yield connection.execute_command("SET", "k", "v")), "OK")
        wrong = Path(self.mktemp())
        wrong.write_text("nope\n")
        bad = RedisEndpoint.fromURL(self.server.url, wrong).connect(reconnect=False)
        try:
            yield self.assertFailure(ready(bad, reactor, timeout=3), Exception)
        finally:
            yield bad.disconnect()

    @inlineCallbacks
    def test_serverDown(self) -> Any:
        """
        Against a port where nothing listens, L{ready} fails after its
        timeout; disconnecting stops the reconnecting (trial fails a test
        that leaves a timer or a connection behind).
        """
        connection = RedisEndpoint.fromURL(f"redis://127.0.0.1:{freePort()}/0").connect()
        try:
            yield self.assertFailure(ready(connection, reactor, timeout=0.5), Exception)
        finally:
            yield connection.disconnect()

    @inlineCallbacks
    def test_reconnectsAfterARestart(self) -> Any:
        """
        Redis restarted (same port): the same connection works again,
        without the caller making a new one.
        """
        connection = self.connect()
        yield ready(connection, reactor)
        self.server.stop(remove=False)
        self.server.start()
        for _ in range(100):
            try:
                yield ready(connection, reactor, timeout=0.5)
                break
            except Exception:
                yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield connection.execute_command("SET", "k", "v")), "OK")



    @inlineCallbacks
    def test_handshakeCutShortIsRetried(self) -> Any:
        """
        A connection lost in the middle of its handshake (the C{SELECT}
        sent, no answer: a reconnect that reached a restarting Redis) is
        tried again, not given up for good as txredisapi does, and no
        unhandled error is left behind. Through a proxy that closes the
        first connection when its first bytes arrive and forwards the
        next ones.
        """
        cut: list[bytes] = []

        class CutFirst(portforward.ProxyServer):
            def dataReceived(self, data: bytes) -> None:
                if not cut:
                    cut.append(data)
                    self.transport.loseConnection()
                    return
                super().dataReceived(data)

        factory = portforward.ProxyFactory("127.0.0.1", self.server.port)
        factory.protocol = CutFirst
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connection = self.connect(RedisEndpoint.fromURL(f"redis://127.0.0.1:{port.getHost().port}/0"))
        deadline = reactor.seconds() + 10
        while True:
            try:
                yield ready(connection, reactor, timeout=0.5)
                break
            except Exception:
                self.assertLess(reactor.seconds(), deadline, "connected after the cut handshake")
        self.assertIn(b"SELECT", cut[0])
        self.assertEqual((yield connection.execute_command("SET", "k", "v")), "OK")

    def test_checkAtStart(self) -> None:
        """
        L{checkNow} (blocking, before the reactor runs) passes against a
        server that answers, and fails clearly, without the password,
        against a wrong password, a missing one, a database the server
        lacks, or a closed port.
        """
        checkNow(RedisEndpoint.fromURL(self.server.url))
        with self.assertRaises(RedisConfigError) as caught:
            checkNow(RedisEndpoint.fromURL(self.server.url.replace("/0", "/99")))
        self.assertIn("refused SELECT", str(caught.exception))
        self.server.stop()
        self.server = RedisServer(password="the-right-one")
        self.addCleanup(self.server.stop)
        right = Path(self.mktemp())
        right.write_text("the-right-one\n")
        checkNow(RedisEndpoint.fromURL(self.server.url, right))
        wrong = Path(self.mktemp())
        wrong.write_text("not-the-right-one\n")
        for endpoint in (RedisEndpoint.fromURL(self.server.url, wrong), RedisEndpoint.fromURL(self.server.url)):
            with self.assertRaises(RedisConfigError) as caught:
                checkNow(endpoint)
            self.assertIn("refused the credentials", str(caught.exception))
            self.assertNotIn("not-the-right-one", str(caught.exception))
        closed = RedisEndpoint.fromURL(f"redis://127.0.0.1:{freePort()}/0")
        with self.assertRaises(RedisConfigError) as caught:
            checkNow(closed, timeout=1)
        self.assertIn("cannot be reached", str(caught.exception))

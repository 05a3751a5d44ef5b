"""
L{twistedsse._server.ServerService}: ready (C{READY=1}) only once every
listener's port is bound and the render service is ready; C{STOPPING=1}
as soon as it stops, before the drain; the twistd log observer.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import ILogObserver
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from twistedsse._server import ServerService, describeAddress
from twistedsse._site import DrainingSite


@implementer(IListeningPort)
class _Port:
    def __init__(self, address: Any) -> None:
        self.address = address
        self.stopped = False

    def getHost(self) -> Any:
        return self.address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


@implementer(IStreamServerEndpoint)
class _Endpoint:
    """
    An endpoint whose C{listen} the test completes (a port bound later).
    """

    def __init__(self) -> None:
        self.listening: list[Deferred[IListeningPort]] = []

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = Deferred()
        self.listening.append(d)
        return d


class _Renders(Service):
    """
    A render service ready when the test says, which records its stop.
    """

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.ready: Deferred[None] = Deferred()

    def whenReady(self) -> Deferred[None]:
        return self.ready

    def stopService(self) -> None:
        self.events.append("renders stopped")


class ServerServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[str] = []
        self.messages: list[dict[str, str]] = []
        self.renders = _Renders(self.events)
        self.clock = Clock()
        self.server = ServerService(
            self.renders, DrainingSite(Resource()), self.clock, notify=lambda **fields: self.messages.append(fields)
        )

    def listener(self) -> _Endpoint:
        endpoint = _Endpoint()
        self.server.addListener(StreamServerEndpointService(endpoint, Factory()))
        return endpoint

    def test_readyOnceAllListen(self) -> None:
        """
        C{READY=1} waits for every port and for the render service, and
        for the reactor to run (its first turn: twistd starts services
        before, when a SIGTERM would still kill the process), then comes
        once with the addresses in C{STATUS=}.
        """
        one, two = self.listener(), self.listener()
        self.server.startService()
        one.listening[0].callback(_Port(IPv4Address("TCP", "127.0.0.1", 8080)))
        self.renders.ready.callback(None)
        two.listening[0].callback(_Port(IPv6Address("TCP", "::1", 8081)))
        self.assertEqual(self.messages, [])
        self.clock.advance(0)
        self.assertEqual(self.messages, [{"READY": "1", "STATUS": "serving on 127.0.0.1:8080, [::1]:8081"}])
        self.clock.advance(60)
        self.assertEqual(len(self.messages), 1)

    def test_stoppedBeforeTheReactorRuns(self) -> None:
        """
        Stopped once it listens but before the reactor's first turn: only
        C{STOPPING=1}, and no timer left.
        """
        endpoint = self.listener()
        self.server.startService()
        endpoint.listening[0].callback(_Port(IPv4Address("TCP", "127.0.0.1", 8080)))
        self.renders.ready.callback(None)
        self.successResultOf(self.server.stopService())
        self.clock.advance(1)
        self.assertEqual([list(m) for m in self.messages], [["STOPPING", "STATUS"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notReady(self) -> None:
        """
        A render service that does not become ready (Redis does not
        answer): no C{READY=1} (systemd's start timeout acts), a status
        and an error saying why.
        """
        endpoint = self.listener()
        self.server.startService()
        endpoint.listening[0].callback(_Port(IPv4Address("TCP", "127.0.0.1", 8080)))
        self.renders.ready.errback(TimeoutError("no answer from Redis"))
        self.clock.advance(0)
        self.assertEqual(self.messages, [{"STATUS": "not ready: no answer from Redis"}])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_listenerFails(self) -> None:
        """
        A port that cannot be bound after all (an endpoint that listens
        asynchronously): no C{READY=1}, a status saying why; the
        listener's service logs the error itself, as it always did.
        """
        endpoint = self.listener()
        self.server.startService()
        self.renders.ready.callback(None)
        endpoint.listening[0].errback(CannotListenError("127.0.0.1", 8080, OSError("in use")))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.assertEqual([list(m) for m in self.messages], [["STATUS"]])
        self.assertIn("not ready: Couldn't listen on 127.0.0.1:8080", self.messages[0]["STATUS"])

    def test_stoppingFirst(self) -> None:
        """
        C{STOPPING=1} is sent when stopping begins, before the renders
        stop; stopping before ready sends no C{READY=1} later.
        """
        endpoint = self.listener()
        self.renders.stopService = lambda: self.events.append(f"renders stopped after {self.messages}")  # type: ignore[method-assign]
        self.server.startService()
        self.successResultOf(self.server.stopService())
        self.assertEqual(self.events, ["renders stopped after [{'STOPPING': '1', 'STATUS': 'stopping: draining renders and streams'}]"])
        # (The stop cancelled the listen not done yet.)
        self.assertTrue(endpoint.listening[0].called)
        self.renders.ready.callback(None)
        self.clock.advance(0)
        self.assertEqual([m for m in self.messages if "READY" in m], [])

    def test_withoutNotify(self) -> None:
        """
        Without C{notify} (not under a service manager) it starts and stops
        all the same.
        """
        server = ServerService(self.renders, DrainingSite(Resource()), Clock())
        endpoint = _Endpoint()
        server.addListener(StreamServerEndpointService(endpoint, Factory()))
        server.startService()
        port = _Port(IPv4Address("TCP", "127.0.0.1", 8080))
        endpoint.listening[0].callback(port)
        self.renders.ready.callback(None)
        self.successResultOf(server.stopService())
        self.assertTrue(port.stopped)

    def test_logObserverUnderTwistd(self) -> None:
        """
        Given a log observer, it becomes the twistd application's
        L{ILogObserver} component (which twistd's logger installs) when
        twistd makes the server the application's child.
        """

        @implementer(ILogObserver)
        def observer(event: Any) -> None:
            pass

        server = ServerService(self.renders, DrainingSite(Resource()), Clock(), logObserver=observer)
        application = Application("twistedsse")
        server.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        plain = Application("twistedsse")
        ServerService(Service(), DrainingSite(Resource()), Clock()).setServiceParent(plain)
        self.assertIsNone(plain.getComponent(ILogObserver))

    def test_describeAddress(self) -> None:
        """
        Addresses are written as people write them.
        """
        self.assertEqual(describeAddress(IPv4Address("TCP", "10.0.0.1", 80)), "10.0.0.1:80")
        self.assertEqual(describeAddress(IPv6Address("TCP", "::1", 80)), "[::1]:80")
        self.assertEqual(describeAddress(UNIXAddress(b"/run/t.sock")), "/run/t.sock")

"""
TCP connections that send a write at once.

Twisted's TCP transport queues every C{write} and sends it when the
reactor next finds the socket writable: for each frame, the socket is
registered with epoll, the reactor wakes, dispatches C{doWrite}, sends, and
unregisters it. For an event fanned out to thousands of streams that is
most of the server's CPU time (measured in C{docs/performance.md}), and the
first subscriber waits for the whole pass to be queued before anything is
sent.

L{EagerServer} sends a write in the call itself when nothing is queued
before it (the common case for a stream whose client keeps up), and queues
only what the kernel did not take, exactly as Twisted would: order,
backpressure (producers paused when the queue is full), connection loss
(found and reported by C{doWrite}, as ever) and TLS on top are unchanged.
L{EagerSendReactor} gives endpoints (C{serverFromString},
C{strports.service}) TCP ports whose connections are L{EagerServer}s.
C{twistd twistedsse --no-eager-send} listens without it.

It reads Twisted's private write state (C{_tempDataLen}, C{dataBuffer},
C{offset}, C{_writeDisconnected}, C{_aborting}; C{TLS}, C{_type},
C{_fromListeningDescriptor}): tests/test_twisted_private.py checks each
still means what is assumed here, and pyproject.toml bounds Twisted below
its next major release until C{scripts/test-twisted} passes on it.

Upstream, on the same question:
  - U{twisted#5303<https://github.com/twisted/twisted/issues/5303>} (open
    since 2011): "Default transport implementation doesn't write out bytes
    immediately"; writing at once when the buffer is empty is the policy
    proposed there, and this module's.
  - U{twisted#11989<https://github.com/twisted/twisted/issues/11989>},
    fixed by U{twisted#11996<https://github.com/twisted/twisted/pull/11996>}:
    TLS gathers small writes and encrypts them at C{callLater(0)} (at most
    64 000 bytes); so under TLS an L{EagerServer} sends ciphertext at the
    next turn, never clear text.
  - U{twisted#12742<https://github.com/twisted/twisted/issues/12742>}:
    C{FileDescriptor.doWrite} copies a partly sent buffer back into
    C{dataBuffer}; and
    U{twisted#12732<https://github.com/twisted/twisted/issues/12732>},
    optimising C{writeSequence}: changes to the very fields read here.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterable, Iterator

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorSSL,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


class _EagerWrites(tcp.Connection):
    """
    A TCP connection's C{write} that sends at once when nothing is queued
    before it (mixed into Twisted's C{tcp.Server} and C{tcp.Client}).
    """

    _holding: list[bytes] | None = None

    @contextmanager
    def holding(self) -> Iterator[None]:
        """
        The writes made within are sent together, as one C{send}, when it
        ends: a response's headers and its first bytes, written by Twisted
        as separate calls, then leave in one segment.
        """
        if self._holding is not None:
            yield
            return
        held: list[bytes] = []
        self._holding = held
        try:
            yield
        finally:
            self._holding = None
            if held:
                self.write(b"".join(held))

    def write(self, data: bytes) -> None:
        if self._holding is not None and type(data) is bytes:
            self._holding.append(data)
            return
        if (
            self._tempDataLen
            or self.offset != len(self.dataBuffer)
            or self.TLS
            or not self.connected
            or self._writeDisconnected
            or self._aborting
            or type(data) is not bytes
        ):
            # Queued bytes go first; TLS started on this connection (not a
            # TLS port's) encrypts in its protocol; an aborted connection
            # sends nothing more; the rest is Twisted's own checks and errors.
            # (tcp.Server's methods are unannotated, and untyped_calls_exclude
            # misses calls through super(): python/mypy#16653.)
            super().write(data)  # type: ignore[no-untyped-call]
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            # Full (EAGAIN), interrupted, or a lost connection: queue it as
            # Twisted would; doWrite sends it or reports the loss as ever.
            sent = 0
        if sent < len(data):
            super().write(data[sent:] if sent else data)  # type: ignore[no-untyped-call]  # (as above)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS and self._holding is None:
            super().writeSequence(iovec)  # type: ignore[no-untyped-call]  # (as above)
            return
        self.write(b"".join(iovec))


class EagerServer(_EagerWrites, tcp.Server):
    """
    A server-side TCP connection whose C{write} sends at once when nothing
    is queued before it.
    """


class EagerClient(_EagerWrites, tcp.Client):
    """
    A client-side TCP connection whose C{write} sends at once when nothing
    is queued before it: Redis commands (a worker's progress) leave in the
    call, not at the reactor's next turn.
    """


class EagerConnector(tcp.Connector):
    """
    A TCP connector whose connections are L{EagerClient}s.
    """

    def _makeTransport(self) -> tcp.Client:
        # (tcp.Client is unannotated.)
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


def sendTogether(transport: object) -> ContextManager[None]:
    """
    The writes made within go out in one C{send} if C{transport} is an
    L{EagerServer} (on others, as they always do).
    """
    if isinstance(transport, EagerServer):
        return transport.holding()
    return nullcontext()


class EagerPort(tcp.Port):
    """
    A TCP port whose connections are L{EagerServer}s.
    """

    transport = EagerServer


@implementer(IReactorTCP, IReactorSSL, IReactorSocket, IReactorCore, IReactorTime, IReactorPluggableNameResolver)
class EagerSendReactor:
    """
    A reactor, as an endpoint sees it, whose TCP (and TLS over TCP) ports
    make L{EagerServer} connections and whose TCP connectors
    L{EagerClient}s; everything else is C{reactor}'s (its C{IReactorCore}
    included, which endpoints also use).

    Pass it where a listening endpoint takes its reactor::

        strports.service("tcp:8080", site, reactor=EagerSendReactor(reactor))
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30.0, bindAddress: Any = None
    ) -> EagerConnector:
        # As the reactor's own connectTCP, with eager connections.
        connector = EagerConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> EagerPort:
        listening = EagerPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> EagerPort:
        # As the reactor's own listenSSL: TLS in memory over a TCP port.
        listening = self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface)
        listening._type = "TLS"
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> Any:
        # Sockets passed by systemd (socket activation): TCP ones get
        # eager connections, others (UNIX) are the reactor's.
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)
        listening = EagerPort._fromListeningDescriptor(self._reactor, fileDescriptor, addressFamily, factory)
        listening.startListening()
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

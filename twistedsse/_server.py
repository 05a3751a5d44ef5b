"""
L{ServerService}: a whole server (the render service and its listeners)
that stops in the right order, and tells a service manager (systemd's
C{Type=notify}) when it is ready and when it is stopping.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from ._site import DrainingSite

_log = Logger()


@implementer(IStreamServerEndpoint)
class _WatchedEndpoint:
    """
    An endpoint that puts a copy of each C{listen}'s result (the port, or
    why it could not listen) in C{listening}: a
    L{StreamServerEndpointService} listens when it starts, but its port may
    be bound later (C{listen} returns a Deferred), and it keeps the result
    to itself (its C{endpoint} is the one public way in).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, listening: list[Deferred[IListeningPort]]) -> None:
        self.endpoint = endpoint
        self.listening = listening

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self.endpoint.listen(factory)
        copy: Deferred[IListeningPort] = Deferred()
        self.listening.append(copy)

        def chain(result: IListeningPort | Failure) -> IListeningPort | Failure:
            if copy.called:
                # (Cancelled: the server stopped before it was ready.)
                pass
            elif isinstance(result, Failure):
                copy.errback(result)
            else:
                copy.callback(result)
            return result

        return d.addBoth(chain)


def describeAddress(address: object) -> str:
    """
    A listening address as people write it (C{127.0.0.1:8080},
    C{[::1]:8080}, a UNIX socket's path).
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address)


class ServerService(MultiService):
    """
    The whole server: the render service and the listening services, which
    stop in order: no new connections; every render ends and every stream
    gets its final frame; the site's connections drain.

    With C{notify} (a L{twistedsse._sdnotify.Notifier}'s C{notify}, or
    any callable taking the message's fields as keywords) it sends
    C{READY=1} (and a C{STATUS=} naming the addresses) once every
    listener's port is bound, the render service is ready and the reactor
    runs; and C{STOPPING=1} as soon as stopping begins, before the drain:
    systemd then knows the unit is up only when it serves, and that a
    drain is a stop under way.

    @ivar logObserver: under twistd, the log observer twistd installs for
        the whole process (set as the application's L{ILogObserver}
        component when twistd makes this service its child; see
        L{setServiceParent}); C{None} leaves twistd's own.
    """

    def __init__(
        self,
        renders: Service,
        site: DrainingSite,
        clock: IReactorTime,
        drainTimeout: float = 5.0,
        notify: Callable[..., None] | None = None,
        logObserver: ILogObserver | None = None,
    ):
        # MultiService.__init__ is unannotated, and untyped_calls_exclude
        # misses calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self.renders = renders
        self.site = site
        self._clock = clock
        self._drainTimeout = drainTimeout
        self._notify = notify
        self.logObserver = logObserver
        self._listening: list[Deferred[IListeningPort]] = []
        self._ready: Deferred[None] | None = None
        renders.setServiceParent(self)

    def addListener(self, listener: IService) -> None:
        if isinstance(listener, StreamServerEndpointService):
            # (Its endpoint is a public attribute, read when it starts.)
            listener.endpoint = _WatchedEndpoint(listener.endpoint, self._listening)
        listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """
        Under twistd, the parent is the application: give it
        L{logObserver}, which twistd's logger looks for on it before it
        makes its own (as a C{.tac} file's C{application.setComponent}
        would).
        """
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        # (Service.setServiceParent is unannotated.)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # (see __init__)
        waits: list[Deferred[Any]] = list(self._listening)
        # A render service may be ready only after it starts (Redis mode:
        # once its connections answer): it says so with whenReady().
        readies = getattr(self.renders, "whenReady", None)
        if readies is not None:
            waits.append(maybeDeferred(readies))
        waiting = gatherResults(waits, consumeErrors=True)
        # (A DeferredList cannot be cancelled once it has fired: this one
        # can, at every step.)
        ready: Deferred[Any] = Deferred(lambda _: waiting.cancel())
        waiting.chainDeferred(ready)
        # Said once the reactor runs: twistd and the twistedsse command
        # start the services before it does, and until then a SIGTERM (a
        # stop right after READY=1) would kill the process, not stop it.
        ready.addCallback(lambda results: deferLater(self._clock, 0, lambda: results))
        self._ready = ready.addCallback(self._isReady).addErrback(self._notReady)

    def _isReady(self, results: list[Any]) -> None:
        self._ready = None
        ports = [r for r in results if IListeningPort.providedBy(r)]
        addresses = ", ".join(describeAddress(p.getHost()) for p in ports)
        status = f"serving on {addresses}" if addresses else "serving"
        _log.info("ready: {status}", status=status)
        if self._notify is not None:
            self._notify(READY="1", STATUS=status)

    def _notReady(self, failure: Failure) -> None:
        self._ready = None
        failure = getattr(failure.value, "subFailure", failure)
        if failure.check(Exception) and not failure.check(CancelledError):
            # (A listener's failure is reported by its service too.)
            _log.error("not ready: {why}", why=failure.getErrorMessage())
            if self._notify is not None:
                self._notify(STATUS=f"not ready: {failure.getErrorMessage()}")

    @inlineCallbacks
    def stopService(self) -> Any:
        # twistd drops a failure from a shutdown trigger silently: log each
        # step's, and go on to the next step regardless.
        self.running = 0
        if self._notify is not None:
            self._notify(STOPPING="1", STATUS="stopping: draining renders and streams")
        if self._ready is not None:
            self._ready.cancel()
        listeners = [s for s in self if s is not self.renders]
        steps = [
            ("stop listening", lambda: DeferredList([maybeDeferred(s.stopService) for s in listeners])),
            ("stop renders", self.renders.stopService),
            ("drain connections", lambda: self.site.drain(self._clock, self._drainTimeout)),
        ]
        for what, step in steps:
            try:
                yield maybeDeferred(step)
            except Exception:
                _log.failure("shutdown: could not {what}", what=what)


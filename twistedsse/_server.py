"""
L{ServerService}: a whole server (the render service and its listeners)
that stops in the right order.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted.application.service import Service
from ._site import DrainingSite

_log = Logger()


class ServerService(MultiService):
    """
    The whole server: the render service and the listening services, which
    stop in order: no new connections; every render ends and every stream
    gets its final frame; the site's connections drain.
    """

    def __init__(self, renders: Service, site: DrainingSite, clock: IReactorTime, drainTimeout: float = 5.0):
        # MultiService.__init__ is unannotated, and untyped_calls_exclude
        # misses calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self.renders = renders
        self.site = site
        self._clock = clock
        self._drainTimeout = drainTimeout
        renders.setServiceParent(self)

    def addListener(self, listener: IService) -> None:
        listener.setServiceParent(self)

    @inlineCallbacks
    def stopService(self) -> Any:
        # twistd drops a failure from a shutdown trigger silently: log each
        # step's, and go on to the next step regardless.
        self.running = 0
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

"""
The builders that twistd, the console script, embedding applications and
the tests all use, so there is one way to put twistedsse together. The only
place, with C{tap}, that may resolve the global reactor.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from twisted.internet.defer import Deferred
from twisted.web.resource import IResource
from twisted.web.server import Site

from ._app import TwistedSSEApp
from ._broker import MemoryBroker
from ._card import CardRenderer
from ._interfaces import IJobBroker, IRenderer
from ._service import RenderService, defaultOutputDir


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        return globalReactor
    return reactor


class _TemporaryOutputService(RenderService):
    """
    A render service whose outputs live in a temporary directory that it
    made, and removes once it has stopped: nothing is left behind.
    """

    def stopService(self) -> Deferred[None]:
        def remove(result: object) -> object:
            shutil.rmtree(self.outputDir, ignore_errors=True)
            return result

        return super().stopService().addBoth(remove)


def buildService(
    reactor: Any = None,
    *,
    renderers: Iterable[IRenderer] = (),
    outputDir: str | os.PathLike[str] | None = None,
    ffmpeg: str | None = None,
    broker: IJobBroker | None = None,
    history: int = 1000,
    maxRenders: int | None = None,
    renderTimeout: float = 3600.0,
    killGrace: float = 5.0,
) -> RenderService:
    """
    A L{RenderService} with the built-in C{card} renderer (ffmpeg from
    C{ffmpeg}, by default the one in the C{imageio-ffmpeg} wheel) plus
    C{renderers}.

    @param outputDir: where outputs go; by default a temporary directory
        that is removed when the service stops.
    @param maxRenders: renders run at once; by default the CPU count.
    """
    reactor = _reactor(reactor)
    table: dict[str, IRenderer] = {"card": CardRenderer(ffmpeg=ffmpeg)}
    for renderer in renderers:
        if renderer.name in table:
            raise ValueError(f"renderer {renderer.name!r} is defined twice")
        table[renderer.name] = renderer
    kind = RenderService
    if outputDir is None:
        kind, outputDir = _TemporaryOutputService, defaultOutputDir()
    return kind(
        clock=reactor,
        spawner=reactor,
        broker=broker if broker is not None else MemoryBroker(history=history),
        renderers=table,
        outputDir=Path(outputDir),
        maxRenders=maxRenders if maxRenders is not None else (os.cpu_count() or 1),
        renderTimeout=renderTimeout,
        killGrace=killGrace,
    )


def buildResource(
    service: RenderService, reactor: Any = None, *, keepalive: float = 15.0, retry: int = 2000
) -> IResource:
    """
    The HTTP API and page over C{service}, as a resource to serve or to
    mount under a parent resource (C{parent.putChild(b"sse", ...)}).

    @param keepalive: seconds between keepalive comments on event streams.
    @param retry: the reconnection delay, in ms, sent to EventSource clients.
    """
    return TwistedSSEApp(service, _reactor(reactor), keepalive=keepalive, retry=retry).resource()


def buildSite(
    service: RenderService, reactor: Any = None, *, keepalive: float = 15.0, retry: int = 2000
) -> Site:
    """
    A L{Site} serving L{buildResource} at its root.
    """
    reactor = _reactor(reactor)
    site = Site(buildResource(service, reactor, keepalive=keepalive, retry=retry), reactor=reactor)
    site.displayTracebacks = False
    return site

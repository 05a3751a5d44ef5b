"""
L{IRenderAPI}: what the HTTP layer (C{_app}) asks of the jobs, with
Deferreds, so that one app serves jobs held in this process
(L{MemoryRenderAPI} over a L{RenderService}) and jobs held in Redis
(L{twistedsse._redisweb.RedisJobs}) alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from ._asyncbroker import AsyncMemoryBroker, IAsyncJobBroker
from ._idempotency import Once
from ._job import JobSnapshot
from ._json import JSONObject

if TYPE_CHECKING:
    from ._interfaces import IRenderer
    from ._service import RenderService


class IRenderAPI(Interface):
    """
    The jobs as the HTTP API sees them. Failures are the Deferreds':
    L{twistedsse._errors} types, answered as their JSON errors.
    """

    renderers: Mapping[str, IRenderer] = Attribute("The renderers clients may ask for, by name.")
    outputDir: Path = Attribute("Where finished outputs are.")
    streams: IAsyncJobBroker = Attribute("The broker event streams subscribe to.")

    def newJobID() -> str:
        """
        A new job id (to name the job's URLs before it is submitted).
        """

    def submit(
        renderer: object,
        params: object,
        outputURL: str | None,
        jobID: str,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> Deferred[JobSnapshot]:
        """
        Validate and queue a render (L{RenderService.submit}); C{callbackURL}
        is the client's C{callback_url} (any JSON value), or C{None}; with
        C{once} (an C{Idempotency-Key}), the job an earlier create with
        that key made, as it is now, if there is one.
        """

    def get(jobID: str) -> Deferred[JobSnapshot]:
        """
        The job as it is now.
        """

    def cancel(jobID: str) -> Deferred[JobSnapshot]:
        """
        Cancel a queued or running render (L{RenderService.cancel}); fires
        with the job as it is after the request.
        """

    def outputPath(jobID: str) -> Deferred[Path]:
        """
        The finished output file (L{RenderService.outputPath}).
        """

    def health() -> Deferred[JSONObject]:
        """
        What C{/healthz} says of the jobs: at least C{renders}
        (C{running}, C{queued}, C{max}) and C{subscribers}.
        """


@implementer(IRenderAPI)
@attrs.define(eq=False)
class MemoryRenderAPI:
    """
    L{IRenderAPI} over a L{RenderService}: its synchronous answers in
    already-fired Deferreds.
    """

    service: RenderService
    streams: IAsyncJobBroker = attrs.field(init=False)

    @streams.default
    def _streams(self) -> IAsyncJobBroker:
        return AsyncMemoryBroker(self.service.broker)

    @property
    def renderers(self) -> Mapping[str, IRenderer]:
        return self.service.renderers

    @property
    def outputDir(self) -> Path:
        return self.service.outputDir

    def newJobID(self) -> str:
        return self.service.newJobID()

    def submit(
        self,
        renderer: object,
        params: object,
        outputURL: str | None,
        jobID: str,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> Deferred[JobSnapshot]:
        return maybeDeferred(
            self.service.submit, renderer, params, outputURL, jobID=jobID, callbackURL=callbackURL, once=once
        )

    def get(self, jobID: str) -> Deferred[JobSnapshot]:
        return maybeDeferred(self.service.broker.get, jobID)

    def cancel(self, jobID: str) -> Deferred[JobSnapshot]:
        return maybeDeferred(self.service.cancel, jobID)

    def outputPath(self, jobID: str) -> Deferred[Path]:
        return maybeDeferred(self.service.outputPath, jobID)

    def health(self) -> Deferred[JSONObject]:
        service = self.service
        return succeed(
            {
                "renders": {
                    "running": service.activeCount(),
                    "queued": service.queuedCount(),
                    "max": service.maxRenders,
                },
                "subscribers": service.broker.subscriberCount(),
            }
        )


def renderAPI(service: object) -> IRenderAPI:
    """
    The L{IRenderAPI} of C{service}: itself if it provides it, else (a
    L{RenderService}) a L{MemoryRenderAPI} over it.
    """
    if IRenderAPI.providedBy(service):
        return service
    api = getattr(service, "api", None)
    if IRenderAPI.providedBy(api):
        return api
    from ._service import RenderService

    if not isinstance(service, RenderService):
        raise TypeError(f"not a render service: {service!r}")
    return MemoryRenderAPI(service)

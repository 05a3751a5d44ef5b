"""
twistedsse: stream the progress of long-running renders to browsers over
Server-Sent Events, with Twisted.

Run it with C{twistd -n twistedsse}, or embed it::

    service = twistedsse.buildService()           # renders, jobs, processes
    service.setServiceParent(application)
    root.putChild(b"sse", twistedsse.buildResource(service))

Every event frame, keepalives included, leaves in one C{request.write}
the moment it exists, on a socket with TCP_NODELAY, marked for proxies as
not to be buffered.
"""

from ._app import TwistedSSEApp
from ._broker import MemoryBroker
from ._build import buildResource, buildService, buildSite
from ._server import ServerService
from ._site import DrainingSite
from ._card import CardRenderer
from ._connections import ConnectionLimits
from ._command import CommandRenderer
from ._decoder import EventStreamDecoder
from ._errors import (
    BadRequest,
    Conflict,
    InvalidParams,
    JobFinished,
    MalformedJSON,
    NotFound,
    OutputNotReady,
    PayloadTooLarge,
    TwistedSSEError,
    Unprocessable,
    UnknownJob,
    UnknownRenderer,
)
from ._frames import TERMINAL_EVENTS, Event, encodeComment, encodeEvent
from ._interfaces import IJobBroker, IProgressParser, IRenderer, ISubscriber, RenderPlan
from ._job import JobSnapshot, JobState
from ._security import mintToken, redactedLogFormatter
from ._service import RenderService
from ._stream import EventStreamResource
from ._transport import EagerSendReactor

__all__ = [
    "BadRequest",
    "CardRenderer",
    "CommandRenderer",
    "Conflict",
    "ConnectionLimits",
    "DrainingSite",
    "EagerSendReactor",
    "Event",
    "EventStreamDecoder",
    "EventStreamResource",
    "IJobBroker",
    "IProgressParser",
    "IRenderer",
    "ISubscriber",
    "InvalidParams",
    "JobFinished",
    "JobSnapshot",
    "JobState",
    "MalformedJSON",
    "MemoryBroker",
    "NotFound",
    "OutputNotReady",
    "PayloadTooLarge",
    "RenderPlan",
    "RenderService",
    "ServerService",
    "TERMINAL_EVENTS",
    "TwistedSSEApp",
    "TwistedSSEError",
    "UnknownJob",
    "UnknownRenderer",
    "Unprocessable",
    "buildResource",
    "buildService",
    "buildSite",
    "encodeComment",
    "encodeEvent",
    "mintToken",
    "redactedLogFormatter",
]

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

from ._broker import MemoryBroker
from ._build import ResourceOptions, buildResource, buildService, buildSite
from ._card import CardRenderer
from ._command import CommandRenderer
from ._connections import ConnectionCounter, ConnectionLimits
from ._decoder import EventStreamDecoder
from ._errors import (
    BadRequest,
    CallbackNotAllowed,
    Conflict,
    Forbidden,
    HeaderTooLarge,
    IdempotencyKeyReused,
    InsufficientStorage,
    InvalidBody,
    InvalidCallback,
    InvalidIdempotencyKey,
    InvalidJobs,
    InvalidParams,
    JobExpired,
    JobFinished,
    MalformedJSON,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    OutputExpired,
    OutputNotReady,
    PayloadTooLarge,
    QueueFull,
    RedisUnavailable,
    RangeNotSatisfiable,
    RenderProtocolError,
    RetryLater,
    TooManyJobs,
    TooManyStreams,
    TwistedSSEError,
    Unauthorized,
    UnknownJob,
    UnknownRenderer,
    Unprocessable,
    UnsupportedMediaType,
    URITooLong,
)
from ._frames import TERMINAL_EVENTS, Event, encodeComment, encodeEvent
from ._interfaces import IJobBroker, IJobStore, IProgressParser, IRenderer, ISubscriber, RenderPlan
from ._job import JobSnapshot, JobState
from ._security import mintToken, redactedLogFormatter
from ._redis import RedisConfigError, RedisEndpoint
from ._redisservice import RedisRenderService
from ._server import ServerService
from ._service import RenderService
from ._site import DrainingSite
from ._store import NullJobStore, SQLiteJobStore
from ._transport import EagerSendReactor
from ._webhooks import CallbackPolicy, Webhooks, verifySignature

# The shape, deliberately: the builders (what twistd uses, with twistd's
# limits by default), the service and site they return with what their
# constructors take, the renderer and broker seams, the event format, and
# every error the API raises. The HTTP app and the per-request stream
# resource are reached through buildResource (their constructors take
# private policy objects). tests/test_exports.py pins this list.
__all__ = [
    # Building and serving
    "buildService",
    "buildResource",
    "buildSite",
    "ResourceOptions",
    "RenderService",
    "RedisRenderService",
    "RedisEndpoint",
    "RedisConfigError",
    "DrainingSite",
    "ServerService",
    "ConnectionLimits",
    "ConnectionCounter",
    "EagerSendReactor",
    # Renderers
    "IRenderer",
    "IProgressParser",
    "RenderPlan",
    "CardRenderer",
    "CommandRenderer",
    # Jobs, their events and where they are kept
    "IJobBroker",
    "ISubscriber",
    "MemoryBroker",
    "IJobStore",
    "SQLiteJobStore",
    "NullJobStore",
    "JobSnapshot",
    "JobState",
    "Event",
    "TERMINAL_EVENTS",
    "encodeEvent",
    "encodeComment",
    "EventStreamDecoder",
    # Tokens and logs
    "mintToken",
    "redactedLogFormatter",
    # Errors
    "TwistedSSEError",
    "BadRequest",
    "MalformedJSON",
    "InvalidIdempotencyKey",
    "PayloadTooLarge",
    "URITooLong",
    "HeaderTooLarge",
    "Unauthorized",
    "Forbidden",
    "UnsupportedMediaType",
    "MisdirectedRequest",
    "Unprocessable",
    "InvalidBody",
    "UnknownRenderer",
    "InvalidParams",
    "InvalidCallback",
    "CallbackNotAllowed",
    "InvalidJobs",
    "TooManyJobs",
    "IdempotencyKeyReused",
    "NotFound",
    "UnknownJob",
    "JobExpired",
    "OutputExpired",
    "InsufficientStorage",
    "MethodNotAllowed",
    "RetryLater",
    "TooManyStreams",
    "QueueFull",
    "RedisUnavailable",
    "RangeNotSatisfiable",
    "Conflict",
    "JobFinished",
    "OutputNotReady",
    "RenderProtocolError",
    # webhooks
    "Webhooks",
    "CallbackPolicy",
    "verifySignature",
]

"""
The errors twistedsse raises, and the HTTP status each one maps to.

Every error a client can cause is a L{TwistedSSEError} carrying a stable
machine-readable C{code} and the HTTP C{status}; C{_app} turns it into
C{{"error": code, "detail": str(error)}} at one place. The tree::

    TwistedSSEError
    ├── BadRequest (400)                    ValueError
    │   ├── MalformedJSON                   "malformed_json"
    │   └── InvalidIdempotencyKey           "invalid_idempotency_key"
    ├── PayloadTooLarge (413)               "body_too_large"
    ├── URITooLong (414)                    "uri_too_long"
    ├── HeaderTooLarge (431)                "header_too_large"
    ├── Unauthorized (401)                  "unauthorized" (WWW-Authenticate)
    ├── Forbidden (403)                     "forbidden" (a token without the scope)
    ├── UnsupportedMediaType (415)          "unsupported_media_type"
    ├── MisdirectedRequest (421)            "unknown_host" (Host not served)
    ├── Unprocessable (422)                 ValueError
    │   ├── InvalidBody                     "invalid_body"
    │   ├── UnknownRenderer                 "unknown_renderer"
    │   ├── InvalidParams                   "invalid_params" (names the field)
    │   ├── InvalidCallback                 "invalid_callback_url"
    │   ├── CallbackNotAllowed              "callback_not_allowed" (host not in --callback-allow)
    │   ├── InvalidJobs                     "invalid_jobs" (GET /events: no job, or a bad one)
    │   │   └── TooManyJobs                 "too_many_jobs" (GET /events: over 100 jobs)
    │   └── IdempotencyKeyReused            "idempotency_key_reused"
    ├── NotFound (404)                      LookupError
    │   └── UnknownJob                      "unknown_job"
    │       └── JobExpired (410)            "job_expired" (deleted after --expire-after)
    ├── MethodNotAllowed (405)              "method_not_allowed"
    ├── TooManyStreams (503)                "too_many_streams" (Retry-After)
    ├── QueueFull (429)                     "queue_full" (Retry-After)
    ├── InsufficientStorage (507)           "insufficient_storage"
    ├── OutputExpired (410)                 "output_expired"
    ├── RangeNotSatisfiable (416)           "range_not_satisfiable" (Content-Range)
    └── Conflict (409)
        ├── JobFinished                     "job_finished"
        └── OutputNotReady                  "output_not_ready"

    RenderProtocolError                     a child broke the output protocol
                                            (never reaches a client as HTTP)
"""

from __future__ import annotations


class TwistedSSEError(Exception):
    """
    Base of every error a client can cause.

    @cvar code: stable machine-readable error code, the C{"error"} field.
    @cvar status: HTTP status code.
    """

    code: str = "error"
    status: int = 400


class BadRequest(TwistedSSEError, ValueError):
    code = "bad_request"
    status = 400


class MalformedJSON(BadRequest):
    code = "malformed_json"


class PayloadTooLarge(TwistedSSEError):
    code = "body_too_large"
    status = 413


class URITooLong(TwistedSSEError):
    """
    The request line is over the limit (answered before routing).
    """

    code = "uri_too_long"
    status = 414


class HeaderTooLarge(TwistedSSEError):
    """
    A header line is over the limit (answered before routing).
    """

    code = "header_too_large"
    status = 431


class Unauthorized(TwistedSSEError):
    """
    Creating or cancelling renders needs an operator token, and the
    request had none of them.
    """

    code = "unauthorized"
    status = 401


class Forbidden(TwistedSSEError):
    """
    The request's token is valid, but its scopes do not cover this.
    """

    code = "forbidden"
    status = 403


class UnsupportedMediaType(TwistedSSEError):
    """
    A C{POST} without C{Content-Type: application/json}: refused, so that
    no cross-site "simple" request (a form, C{no-cors} fetch) can act.
    """

    code = "unsupported_media_type"
    status = 415


class MisdirectedRequest(TwistedSSEError):
    """
    The C{Host} is not a name this server answers to without a token (a
    guard against DNS rebinding).
    """

    code = "unknown_host"
    status = 421


class InvalidIdempotencyKey(BadRequest):
    """
    An C{Idempotency-Key} header that is not 1 to 255 printable ASCII
    characters (as a Structured Fields string or bare), or more than one.
    """

    code = "invalid_idempotency_key"


class Unprocessable(TwistedSSEError, ValueError):
    code = "unprocessable"
    status = 422


class InvalidBody(Unprocessable):
    """
    The request body is JSON, but not C{{"renderer": NAME, "params": {...}}}.
    """

    code = "invalid_body"


class UnknownRenderer(Unprocessable):
    code = "unknown_renderer"


class IdempotencyKeyReused(Unprocessable):
    """
    An C{Idempotency-Key} came back with another request (another
    renderer, other params): a client's bug, not a retry (the IETF
    draft's 422).
    """

    code = "idempotency_key_reused"


class InvalidParams(Unprocessable):
    """
    A render parameter is missing, of the wrong type or out of range.

    @ivar field: the name of the offending parameter, e.g. C{"duration"}.
    """

    code = "invalid_params"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"params: {detail}" if field == "params" else f"params.{field}: {detail}")
        self.field = field


class InvalidCallback(Unprocessable):
    """
    A C{callback_url} that is not an http(s) URL this server may send to
    (too long, userinfo, a fragment, not printable ASCII).
    """

    code = "invalid_callback_url"


class CallbackNotAllowed(Unprocessable):
    """
    A C{callback_url} whose host (and port) the operator does not allow
    (C{--callback-allow}): no request forgery into the operator's network.
    """

    code = "callback_not_allowed"
class InvalidJobs(Unprocessable):
    """
    C{GET /events} names no job, or a job id that cannot be one (empty,
    not UTF-8).
    """

    code = "invalid_jobs"


class TooManyJobs(InvalidJobs):
    """
    C{GET /events} names more jobs than one stream may watch.
    """

    code = "too_many_jobs"


class NotFound(TwistedSSEError, LookupError):
    code = "not_found"
    status = 404


class UnknownJob(NotFound):
    code = "unknown_job"


class JobExpired(UnknownJob):
    """
    The job existed, ended, and was deleted C{--expire-after} seconds
    later (410 Gone). A subclass of L{UnknownJob} so that code which only
    asks "is there such a job?" needs no second C{except}; the id is
    remembered as expired for another expiry period, then answers 404.
    """

    code = "job_expired"
    status = 410


class OutputExpired(TwistedSSEError, LookupError):
    """
    The render succeeded, but its output file has been deleted since (the
    oldest outputs go first when C{--max-output-bytes} would be passed).
    """

    code = "output_expired"
    status = 410


class InsufficientStorage(TwistedSSEError):
    """
    A render cannot be created or started: the output filesystem is
    nearly full (C{--min-free-bytes}), or the job store cannot be written
    (disk full).
    """

    code = "insufficient_storage"
    status = 507


class MethodNotAllowed(TwistedSSEError):
    code = "method_not_allowed"
    status = 405


class RetryLater(TwistedSSEError):
    """
    The server is at a configured limit now; the same request may succeed
    later. Answered with C{Retry-After}.

    @ivar retryAfter: seconds the client should wait.
    """

    def __init__(self, detail: str, retryAfter: int = 5) -> None:
        super().__init__(detail)
        self.retryAfter = retryAfter


class TooManyStreams(RetryLater):
    """
    Opening one more event stream would pass a configured limit.
    """

    code = "too_many_streams"
    status = 503


class QueueFull(RetryLater):
    """
    The render queue is full: try again later.
    """

    code = "queue_full"
    status = 429


class RedisUnavailable(RetryLater):
    """
    Redis cannot answer now (down, restarting, loading its data, a
    replica that cannot write): the same request may succeed later.
    """

    code = "redis_unavailable"
    status = 503


class RangeNotSatisfiable(TwistedSSEError):
    """
    No range of a download's C{Range} header overlaps the file.

    @ivar size: the file's size, for C{Content-Range: bytes */SIZE}.
    """

    code = "range_not_satisfiable"
    status = 416

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.size = size


class Conflict(TwistedSSEError):
    code = "conflict"
    status = 409


class JobFinished(Conflict):
    code = "job_finished"


class OutputNotReady(Conflict):
    code = "output_not_ready"


class RenderProtocolError(Exception):
    """
    A render process wrote output that breaks its protocol: a line over
    the length limit, or (for command renderers) a line that is not a JSON
    object. The render is failed with this message.
    """


#: Reason phrases Twisted's status table lacks (it would say "Unknown
#: Status"), for the errors above that use them.
REASONS = {421: b"Misdirected Request", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}

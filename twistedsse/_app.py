"""
The HTTP API, as Klein routes over the jobs (an L{IRenderAPI}: in this
process, or in Redis). The only module
that imports Klein; every error a client can cause leaves here as JSON
C{{"error": CODE, "detail": TEXT}} with its 4xx status, unknown routes and
wrong methods included.
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import unquote_to_bytes
from typing import Any, Callable, Mapping, cast

import attrs
from klein import Klein
from klein.interfaces import IKleinRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.routing import RequestRedirect

from ._errors import (
    InvalidBody,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    OutputNotReady,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RetryLater,
    TwistedSSEError,
    Unauthorized,
    UnknownJob,
)
from . import _json
from ._connections import ConnectionCounter
from ._frames import Event
from ._json import JSON
from ._responses import respondError as _error
from ._responses import respondJSON as _respond
from ._api import IRenderAPI, renderAPI
from ._idempotency import Once, callerScope, parseKey
from ._idempotency import once as makeOnce
from ._job import JobSnapshot
from ._jobs import paramsSchema
from ._security import BearerTokens, CORSPolicy, CORSResource, HostPolicy, RequestGuard
from ._keepalive import Keepalives
from ._output import OutputResource
from ._multistream import MultiEventStreamResource, checkWatch, parseJobs, planStream
from ._stream import EventStreamResource, StreamLimits, StreamSettings, lastEventID, startStreamHeaders

_log = Logger()

MAX_BODY = 64 * 1024

CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    b"frame-ancestors 'none'"
)

_STATIC_TYPES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}


def _loadOpenAPI() -> bytes:
    return (resources.files("twistedsse") / "openapi.json").read_bytes()


def _loadStatic() -> dict[str, bytes]:
    folder = resources.files("twistedsse") / "_static"
    return {name: (folder / name).read_bytes() for name in _STATIC_TYPES}


def _readJSON(request: IRequest) -> JSON:
    if getattr(request, "tooLarge", False):
        raise PayloadTooLarge(f"request body is over the {MAX_BODY}-byte limit")
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise PayloadTooLarge(f"request body is over the {MAX_BODY}-byte limit")
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"request body is over the {MAX_BODY}-byte limit")
    try:
        value: JSON = _json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedJSON(f"request body is not valid JSON: {e}") from None
    return value


def _render(resource: IResource, request: IRequest) -> bytes | int:
    """
    C{resource.render(request)}, typed: the body, or C{NOT_DONE_YET}.
    """
    result: bytes | int = resource.render(request)
    return result


def _streamIDs(jobID: str) -> Callable[[str], str]:
    """
    Event ids on C{/render-stream} are C{JOBID:SEQ}, so that the browser's
    automatic reconnect tells us which render it was watching.
    """
    prefix = jobID + ":"
    return lambda seq: prefix + seq


class _RequireUTF8(Resource):
    """
    Klein answers a path or C{Host} that is not UTF-8 with an HTML 400 and
    logs a traceback per request (a free way to flood the log): answer
    JSON 400 here first.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        # Resource.__init__ is unannotated, and untyped_calls_exclude misses
        # calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self._wrapped = wrapped

    def render(self, request: IRequest) -> bytes | int:
        try:
            request.path.decode("utf-8")
            (request.getHeader(b"host") or b"").decode("utf-8")
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "bad_request", "the URL path and Host header must be UTF-8")
        return _render(self._wrapped, request)


class _EventsFirst(Resource):
    """
    The events route, answered before Klein routes the request: it is the
    one route opened by thousands of clients at once (a render's watchers,
    and their reconnects), and Klein's per-request routing (binding a
    werkzeug map, matching, two Deferreds) is about a third of what a new
    stream costs (see docs/performance.md). Exactly C{/renders/ID/events}
    (GET or HEAD) is taken here, with the same route method and error
    handler Klein would use; anything else, however close, goes to Klein.
    """

    isLeaf = True

    def __init__(self, app: "TwistedSSEApp", klein: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (as above)
        self._app = app
        self._klein = klein

    def render(self, request: IRequest) -> bytes | int:
        post = request.postpath
        if (
            len(post) == 3
            and post[0] == b"renders"
            and post[2] == b"events"
            and post[1]
            and b"/" not in post[1]
            and request.method in (b"GET", b"HEAD")
        ):
            app = self._app
            try:
                jobID = post[1].decode("utf-8")
            except UnicodeDecodeError:
                return _render(self._klein, request)
            box: list[EventStreamResource | Failure] = []
            found = app.events(request, jobID)
            found.addBoth(box.append)
            if box:
                return self._serve(request, box[0])
            # Not known yet (Redis): answered when it is.
            gone: list[object] = []
            cast(Request, request).notifyFinish().addBoth(gone.append)

            def later(_: object) -> None:
                if gone:
                    return
                body = self._serve(request, box[0])
                if body is not NOT_DONE_YET:
                    assert isinstance(body, bytes)
                    request.write(body)
                    request.finish()

            found.addCallback(later).addErrback(
                lambda f: _log.failure("answering {path}", f, path=request.path)
            )
            return NOT_DONE_YET
        return _render(self._klein, request)

    def _serve(self, request: IRequest, found: EventStreamResource | Failure) -> bytes | int:
        if isinstance(found, Failure):
            if found.check(TwistedSSEError) is None:
                bug: bytes = self._app._bug(request, found)
                return bug
            # Written as Klein writes a handler's answer (chunked).
            request.write(self._app._ourError(request, found))
            request.finish()
            return NOT_DONE_YET
        request.prepath.extend(request.postpath)
        request.postpath = []
        return _render(found, request)


@attrs.define(slots=False)
class TwistedSSEApp:
    """
    The routes. C{slots=False}: Klein caches its bound router on the
    instance.

    @ivar settings: how event streams behave (keepalive, retry, write
        timeout).
    @ivar limits: how many event streams may be open, in all and per job.
    @ivar connections: the server's open connections (a
        L{ConnectionCounter<twistedsse._connections.ConnectionCounter>}),
        if it counts them: their number and cap in C{/healthz}.
    @ivar metrics: the service's metrics
        (L{ServiceMetrics<twistedsse._metrics.ServiceMetrics>}) served at
        C{/metrics}; C{None}: not here (a C{--metrics-listen} endpoint
        serves them), 404.
    """

    service: object
    clock: IReactorTime
    settings: StreamSettings = StreamSettings()
    limits: StreamLimits = attrs.field(factory=StreamLimits)
    auth: BearerTokens = BearerTokens()
    cors: CORSPolicy = CORSPolicy()
    hosts: HostPolicy = HostPolicy()
    connections: ConnectionCounter | None = None
    metrics: Any = None
    _static: Mapping[str, bytes] = attrs.field(factory=_loadStatic)
    _openapi: bytes = attrs.field(factory=_loadOpenAPI)
    _keepalives: Keepalives = attrs.field(
        default=attrs.Factory(lambda self: Keepalives(self.clock, self.settings.keepalive), takes_self=True),
        init=False,
    )

    api: IRenderAPI = attrs.field(
        default=attrs.Factory(lambda self: renderAPI(self.service), takes_self=True), init=False
    )

    router = Klein()
    # An empty path segment is no route: werkzeug would answer
    # /renders//output with a 308 to /renders/output (another resource,
    # undocumented), so empty segments are not merged (set before the
    # routes below bind to the map).
    router.url_map.merge_slashes = False

    def resource(self) -> IResource:
        """
        The app as a twisted.web resource, to serve or to mount under a
        parent resource.
        """
        resource: IResource = _RequireUTF8(
            RequestGuard(_EventsFirst(self, self.router.resource()), self.hosts, self.auth, self.clock)
        )
        if self.cors.origins:
            return CORSResource(resource, self.cors)
        return resource

    @property
    def keepalives(self) -> Keepalives:
        """
        The timer of every stream's keepalives (it counts them).
        """
        return self._keepalives

    # -- errors ----------------------------------------------------------

    @router.handle_errors(TwistedSSEError)
    def _ourError(self, request: IRequest, failure: Failure) -> bytes:
        # Klein calls this for that type only; Failure.value is any.
        error = cast(TwistedSSEError, failure.value)
        if isinstance(error, RetryLater):
            request.setHeader(b"retry-after", str(error.retryAfter).encode("ascii"))
        if isinstance(error, Unauthorized):
            request.setHeader(b"www-authenticate", b'Bearer realm="twistedsse"')
        if isinstance(error, RangeNotSatisfiable):
            request.setHeader(b"content-range", b"bytes */%d" % (error.size,))
        return _error(request, error.status, error.code, str(error))

    @router.handle_errors(HTTPException)
    def _routingError(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPException, failure.value)  # (as above)
        if isinstance(error, RequestRedirect):
            # e.g. the page mounted at /sse is at /sse/ (its URLs are relative).
            request.setResponseCode(error.code)
            request.setHeader(b"location", error.new_url.encode("utf-8"))
            return _respond(request, error.code, {"location": error.new_url})
        if isinstance(error, WerkzeugMethodNotAllowed):
            allowed = ", ".join(sorted(error.valid_methods or ()))
            request.setHeader(b"allow", allowed.encode("ascii"))
            method = request.method.decode("latin-1")
            return _error(request, 405, MethodNotAllowed.code, f"{method} is not allowed here; use {allowed}")
        if error.code == 404:
            path = request.path.decode("utf-8", "replace")
            return _error(request, 404, "not_found", f"no such resource: {path}")
        return _error(request, error.code or 400, "bad_request", error.description or "bad request")

    @router.handle_errors(Exception)
    def _bug(self, request: IRequest, failure: Failure) -> bytes:
        _log.failure("unhandled error in {method} {path}", failure,
                     method=request.method, path=request.path)
        return _error(request, 500, "internal_error", "the server failed; the error was logged")

    # -- helpers ---------------------------------------------------------

    def _links(self, request: IRequest, jobID: str) -> dict[str, str]:
        kr = IKleinRequest(request)
        return {
            "status_url": kr.url_for("status", {"jobID": jobID}),
            "events_url": kr.url_for("events", {"jobID": jobID}),
            "output_url": kr.url_for("output", {"jobID": jobID}),
        }

    def _describe(self, request: IRequest, snapshot: JobSnapshot) -> dict[str, JSON]:
        body = snapshot.toJSON()
        body.update(self._links(request, snapshot.id))
        return body

    def _submit(
        self,
        request: IRequest,
        renderer: object,
        params: object,
        callbackURL: object = None,
        once: Once | None = None,
    ) -> Deferred[JobSnapshot]:
        """
        Submit a render, giving the service the URL its output will have
        (for the C{complete} event), which names its id: so the id is made
        first.
        """
        jobID = self.api.newJobID()
        outputURL = IKleinRequest(request).url_for("output", {"jobID": jobID})
        return self.api.submit(renderer, params, outputURL, jobID, callbackURL, once)

    def _stream(self, jobID: str, **kw: Any) -> EventStreamResource:
        self.limits.check(jobID)
        return EventStreamResource(
            self.api.streams, jobID, self.clock, self.settings, limits=self.limits,
            keepalives=self._keepalives, **kw,
        )

    # -- the page --------------------------------------------------------

    @router.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", _STATIC_TYPES["index.html"])
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self._static["index.html"]

    @router.route("/static/<string:name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        if name not in _STATIC_TYPES or name == "index.html":
            raise NotFound(f"no such file: static/{name}")
        request.setHeader(b"content-type", _STATIC_TYPES[name])
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return self._static[name]

    # -- the API ---------------------------------------------------------

    @router.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        health = await self.api.health()
        return _respond(
            request,
            200,
            {
                "status": "ok",
                **health,
                "streams": self.limits.open,
                **({"connections": self.connections.toJSON()} if self.connections is not None else {}),
            },
        )

    @router.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """
        The OpenAPI description of this API, as shipped in the package.
        """
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return self._openapi

    @router.route("/metrics", methods=["GET"])
    def metricsPage(self, request: IRequest) -> IResource:
        """
        The Prometheus text format, from prometheus-client's resource. With
        tokens configured it needs an operator token (or scope
        C{read:metrics}).
        """
        if self.metrics is None:
            raise NotFound("metrics are not served here (see --metrics-listen)")
        self.auth.check(request, self.clock.seconds(), "read", "metrics")
        resource: IResource = self.metrics.resource()
        return resource

    @router.route("/renderers", methods=["GET"])
    def renderers(self, request: IRequest) -> bytes:
        table = self.api.renderers
        return _respond(
            request,
            200,
            {"renderers": [{"name": name, "params_schema": paramsSchema(table[name])} for name in sorted(table)]},
        )

    @router.route("/renders", methods=["POST"])
    async def create(self, request: IRequest) -> bytes:
        # 401 before the body is read; 403 once it names the renderer.
        grant = self.auth.require(request, self.clock.seconds())
        body = _readJSON(request)
        if not isinstance(body, dict):
            raise InvalidBody('the body must be a JSON object like {"renderer": NAME, "params": {...}}')
        unknown = sorted(set(body) - {"renderer", "params", "callback_url"})
        if unknown:
            raise InvalidBody(
                f"unknown field {unknown[0]!r}; a render request has only renderer, params and callback_url"
            )
        grant.need("create", str(body.get("renderer")))
        # A retry with the same key: the job the first create made, as it
        # is now (202 again, whatever its state).
        key = parseKey(request.requestHeaders.getRawHeaders(b"idempotency-key"))
        once = None
        if key is not None:
            once = makeOnce(callerScope(grant, self.auth.given(request, allowQuery=False)), key, body)
        snapshot = await self._submit(
            request, body.get("renderer"), body.get("params", {}), body.get("callback_url"), once
        )
        description = self._describe(request, snapshot)
        request.setHeader(b"location", str(description["status_url"]).encode("ascii"))
        return _respond(request, 202, description)

    @router.route("/renders/<string:jobID>", methods=["GET"])
    async def status(self, request: IRequest, jobID: str) -> bytes:
        return _respond(request, 200, self._describe(request, await self.api.get(jobID)))

    @router.route("/renders/<string:jobID>", methods=["DELETE"])
    async def cancel(self, request: IRequest, jobID: str) -> bytes:
        self.auth.check(request, self.clock.seconds(), "cancel", jobID)
        return _respond(request, 202, self._describe(request, await self.api.cancel(jobID)))

    @router.route("/renders/<string:jobID>/events", methods=["GET"])
    def events(self, request: IRequest, jobID: str) -> Deferred[EventStreamResource]:
        # (Not a coroutine: _EventsFirst takes the answer in this call when
        # the jobs are in memory.)
        return self.api.get(jobID).addCallback(lambda _: self._stream(jobID))

    @router.route("/events", methods=["GET"])
    async def manyEvents(self, request: IRequest) -> MultiEventStreamResource | bytes:
        """
        One stream for many jobs (L{twistedsse._multistream}):
        C{?job=A&job=B...}, through Klein (a dashboard's one stream is not
        the route thousands open at once).
        """
        jobs = parseJobs(request.args.get(b"job", []))
        checkWatch(self.auth, request, self.clock.seconds(), jobs)
        plan = await planStream(self.api.streams, jobs, lastEventID(request))
        if plan.done:
            # The client has seen every job's end: EventSource stops.
            request.setResponseCode(204)
            return b""
        if request.method == b"HEAD":
            startStreamHeaders(request)
            return b""
        self.limits.checkMany(plan.live)
        return MultiEventStreamResource(
            self.api.streams, plan, self.clock, self.settings, self.limits, self._keepalives
        )

    @router.route("/renders/<string:jobID>/output", methods=["GET"])
    async def output(self, request: IRequest, jobID: str) -> OutputResource:
        path = await self.api.outputPath(jobID)
        # Served from the output directory's own entry, never through a
        # symlink (see twistedsse._output).
        if path.parent != self.api.outputDir:
            raise OutputNotReady(f"render {jobID}'s output is not in the output directory")
        return OutputResource(
            self.api.outputDir, path.name, f"{jobID}.mp4", self.clock, self.settings.writeTimeout
        )

    @router.route("/render-stream", methods=["GET"])
    async def renderStream(self, request: IRequest) -> EventStreamResource | bytes:
        """
        Opening this stream starts a render; a browser's automatic
        reconnect (it sends C{Last-Event-ID}, whose ids here carry the job
        id) re-attaches to that render and never starts a second one. The
        first frame is a C{render} event (the render, as C{GET
        /renders/ID} describes it) with id C{JOBID:0}, so a client that
        drops before the render's first event re-attaches too.
        """
        if request.method == b"HEAD":
            # What a GET's headers would be; only a GET starts a render.
            startStreamHeaders(request)
            return b""
        last = lastEventID(request)
        if last is not None:
            jobID, sep, seq = last.rpartition(":")
            if not sep or not jobID:
                raise UnknownJob("Last-Event-ID does not name a render of this stream")
            await self.api.get(jobID)
            return self._stream(jobID, after=seq, rewriteID=_streamIDs(jobID))
        # Starting a render needs a token, if auth is configured;
        # re-attaching (above) only reads, which the job id allows.
        grant = self.auth.require(request, self.clock.seconds(), allowQuery=True)
        args = request.args
        renderer = args.get(b"renderer", [b""])[0].decode("utf-8", "replace")
        grant.need("create", renderer)
        raw = args.get(b"params", [None])[0]
        params: JSON = {}
        if raw is not None:
            try:
                params = _json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise MalformedJSON(f"the params query parameter is not valid JSON: {e}") from None
        # The stream limits first: a 503 must not leave a render nobody
        # watches (a new job has no streams: only the global limit applies).
        self.limits.check(None)
        snapshot = await self._submit(request, renderer, params)
        # The first frame names the render (a C{render} event, id
        # C{JOBID:0}): a client that drops before the render's first event
        # re-attaches to it rather than starting another.
        opening = Event(
            data=_json.dumps(self._describe(request, snapshot)), event="render", id=snapshot.id + ":0"
        )
        return self._stream(snapshot.id, rewriteID=_streamIDs(snapshot.id), opening=opening)

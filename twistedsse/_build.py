"""
The builders that twistd, the console script, embedding applications and
the tests all use, so there is one way to put twistedsse together. The only
place, with C{tap}, that may resolve the global reactor.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TypedDict, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from ._app import TwistedSSEApp
from ._broker import MemoryBroker
from ._card import CardRenderer
from ._command import renderEnvironment
from ._interfaces import IJobBroker, IRenderer
from ._redis import RedisEndpoint
from ._redisservice import RedisRenderService, WorkerResource
from ._service import RenderService, defaultOutputDir
from ._security import BearerTokens, CORSPolicy, HostPolicy, redactedLogFormatter
from ._connections import (
    MAX_STREAMS,
    MAX_STREAMS_PER_JOB,
    ConnectionCounter,
    ConnectionLimits,
    defaultLimits,
    fileRoom,
)
from ._jobs import MAX_QUEUED
from ._errors import TwistedSSEError
from ._metrics import ServiceMetrics
from ._responses import respondError
from ._site import DrainingSite
from ._store import SQLiteJobStore
from ._stream import StreamLimits, StreamSettings
from ._webhooks import CallbackPolicy, Webhooks, treqPost

if TYPE_CHECKING:
    from typing_extensions import Unpack


def _reactor(reactor: IReactorTime | None) -> IReactorTime:
    """
    The reactor given, or the global one, imported only now: importing
    twistedsse never installs a reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        # (Typed as a module; it is the running reactor.)
        return cast(IReactorTime, globalReactor)
    return reactor


def _spawner(reactor: IReactorTime) -> IReactorProcess:
    """
    The same reactor as what starts processes: every reactor Twisted ships
    is both (a type cannot say "both" of two zope interfaces).
    """
    return cast(IReactorProcess, reactor)


class ResourceOptions(TypedDict, total=False):
    """
    The options L{buildResource} takes and L{buildSite} passes on: see
    L{buildResource} for each.
    """

    keepalive: float
    retry: int
    writeTimeout: float
    maxStreams: int | None
    maxStreamsPerJob: int
    authTokens: Iterable[bytes]
    corsOrigins: Iterable[str]
    jwtSecret: bytes | None
    publicNames: Iterable[str]
    serveMetrics: bool
    logStreams: bool


class _TemporaryOutputService(RenderService):
    """
    A render service whose outputs live in a temporary directory that it
    makes when it starts and removes once it has stopped: nothing is left
    behind, not even by a service that was built and never started.
    """

    def startService(self) -> None:
        self.outputDir = defaultOutputDir()
        super().startService()

    def stopService(self) -> Deferred[None]:
        def remove(result: object) -> object:
            shutil.rmtree(self.outputDir, ignore_errors=True)
            return result

        return super().stopService().addBoth(remove)


def defaultRenderThreads() -> int:
    """
    The CPUs this process may run on (its affinity mask: a container's or
    C{taskset}'s limit, not the machine's count), the default cap on a
    render's threads.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def buildService(
    reactor: IReactorTime | None = None,
    *,
    renderers: Iterable[IRenderer] = (),
    outputDir: str | os.PathLike[str] | None = None,
    ffmpeg: str | None = None,
    broker: IJobBroker | None = None,
    history: int = 1000,
    maxRenders: int | None = None,
    renderTimeout: float = 3600.0,
    killGrace: float = 5.0,
    maxQueued: int = MAX_QUEUED,
    stateDir: str | os.PathLike[str] | None = None,
    expireAfter: float = 86400.0,
    maxOutputBytes: int | None = None,
    minFreeBytes: int = 100 * 1024 * 1024,
    renderThreads: int | None = None,
    renderEnv: Iterable[str] = (),
    redis: RedisEndpoint | str | None = None,
    role: str = "all",
    claimTimeout: float = 60.0,
    maxAttempts: int = 2,
    drainTimeout: float = 60.0,
    callbackAllow: Iterable[str] = (),
    callbackSecret: bytes | None = None,
) -> RenderService | RedisRenderService:
    """
    A L{RenderService} with the built-in C{card} renderer (ffmpeg from
    C{ffmpeg}, by default the one in the C{imageio-ffmpeg} wheel) plus
    C{renderers}; with C{redis}, a L{RedisRenderService} in C{role}.

    @param outputDir: where outputs go; by default C{stateDir/outputs}, or
        without a C{stateDir} a temporary directory that is removed when
        the service stops.
    @param stateDir: where jobs are kept across restarts (SQLite); by
        default they live in memory only.
    @param maxRenders: renders run at once; by default the CPU count.
    @param maxQueued: renders that may wait for a slot (C{0}: no limit);
        by default, as twistd, L{MAX_QUEUED}.
    @param expireAfter: seconds after a render ends when it and its output
        are deleted (C{0}: never).
    @param maxOutputBytes: total bytes of outputs kept (C{None}/C{0}: no
        limit); the oldest finished ones go first.
    @param minFreeBytes: renders are refused while the output filesystem
        has less free space (C{0}: no check).
    @param renderThreads: the threads a render may use: ffmpeg's
        C{-threads} and C{-filter_threads} for C{card}, and
        C{TWISTEDSSE_THREADS} in every render's environment; by default
        L{defaultRenderThreads}.
    @param renderEnv: C{NAME} (the service's own variable, passed on if
        set) or C{NAME=VALUE}: added to every render's environment, which
        otherwise holds only an allow-list.
    @param redis: Redis (a L{RedisEndpoint}, or a C{redis://} URL without
        a password) that jobs, the queue and events live in, shared by
        every instance and worker; then C{outputDir} is required (storage
        they all share) and C{stateDir} refused.
    @param role: with C{redis}: C{web} (the HTTP API; runs no render),
        C{worker} (runs renders), or C{all}.
    @param claimTimeout: with C{redis}: seconds after which a dead
        worker's render is taken over by another.
    @param maxAttempts: with C{redis}: runs of a render whose workers die,
        before it fails C{worker_lost}.
    @param drainTimeout: with C{redis}: seconds a stopping worker lets its
        renders finish before handing them back to the queue.
    @param callbackAllow: hosts (C{HOST} or C{HOST:PORT}) a render's
        C{callback_url} may name (see L{twistedsse._webhooks}); needs
        C{callbackSecret}, the key its POSTs are signed with.
    @param callbackSecret: the key callbacks are signed with
        (HMAC-SHA256, see L{twistedsse.verifySignature}); needs
        C{callbackAllow}.
    @raise ValueError: a bad C{renderEnv} entry, or C{renderThreads} < 1,
        or options that do not go together.
    """
    reactor = _reactor(reactor)
    threads = defaultRenderThreads() if renderThreads is None else renderThreads
    if threads < 1:
        raise ValueError(f"renderThreads must be at least 1, got {renderThreads!r}")
    extraEnv = {"TWISTEDSSE_THREADS": str(threads), **renderEnvironment(renderEnv, os.environ)}
    table: dict[str, IRenderer] = {"card": CardRenderer(ffmpeg=ffmpeg, threads=threads)}
    for renderer in renderers:
        if renderer.name in table:
            raise ValueError(f"renderer {renderer.name!r} is defined twice")
        table[renderer.name] = renderer
    webhooks = _webhooks(reactor, tuple(callbackAllow), callbackSecret)
    # What a service takes in either mode.
    common: dict[str, Any] = dict(
        clock=reactor,
        spawner=_spawner(reactor),
        renderers=table,
        maxRenders=maxRenders if maxRenders is not None else (os.cpu_count() or 1),
        renderTimeout=renderTimeout,
        killGrace=killGrace,
        maxQueued=maxQueued,
        expireAfter=expireAfter,
        maxOutputBytes=maxOutputBytes,
        minFreeBytes=minFreeBytes,
        renderEnv=extraEnv,
        webhooks=webhooks,
    )
    if redis is not None:
        if stateDir is not None:
            raise ValueError("a state directory is for jobs kept in this process; with Redis, Redis keeps them")
        if outputDir is None:
            raise ValueError("with Redis, an output directory is required: one every instance and worker shares")
        return RedisRenderService(
            endpoint=redis if isinstance(redis, RedisEndpoint) else RedisEndpoint.fromURL(redis),
            role=role,
            outputDir=Path(outputDir),
            history=history,
            claimTimeout=claimTimeout,
            maxAttempts=maxAttempts,
            drainTimeout=drainTimeout,
            **common,
        )
    if role != "all":
        raise ValueError(f"role {role!r} needs Redis: without it one process does everything")
    kind = RenderService
    store = None
    if stateDir is not None:
        store = SQLiteJobStore(Path(stateDir) / "jobs.sqlite3")
        if outputDir is None:
            outputDir = Path(stateDir) / "outputs"
    if outputDir is None:
        # A placeholder until startService makes the real directory.
        kind, outputDir = _TemporaryOutputService, Path(os.devnull)
    return kind(
        broker=broker if broker is not None else MemoryBroker(history=history, clock=reactor),
        outputDir=Path(outputDir),
        store=store,
        **common,
    )


def _webhooks(reactor: IReactorTime, allow: tuple[str, ...], secret: bytes | None) -> Webhooks | None:
    """
    The callbacks' sender, with its own connection pool; C{None} if none
    is configured. Allowed hosts and the secret go together: one without
    the other is a configuration mistake, refused.
    """
    if not allow and secret is None:
        return None
    if not allow or not secret:
        raise ValueError("callbacks need both allowed hosts and a secret to sign them with")
    post, close = treqPost(reactor)
    return Webhooks(reactor, secret, CallbackPolicy.of(allow), post, close)


def buildResource(
    service: RenderService | RedisRenderService,
    reactor: IReactorTime | None = None,
    *,
    keepalive: float = 15.0,
    retry: int = 2000,
    writeTimeout: float = 30.0,
    maxStreams: int | None = None,
    maxStreamsPerJob: int = MAX_STREAMS_PER_JOB,
    authTokens: Iterable[bytes] = (),
    corsOrigins: Iterable[str] = (),
    jwtSecret: bytes | None = None,
    publicNames: Iterable[str] = (),
    connectionCounter: ConnectionCounter | None = None,
    serveMetrics: bool = True,
    logStreams: bool = False,
) -> IResource:
    """
    The HTTP API and page over C{service}, as a resource to serve or to
    mount under a parent resource (C{parent.putChild(b"sse", ...)}).

    @param keepalive: seconds between keepalive comments on event streams.
    @param retry: the reconnection delay, in ms, sent to EventSource clients.
    @param writeTimeout: seconds a client may read nothing while its
        stream has frames waiting, before it is disconnected.
    @param maxStreams: event streams open at once (0: no limit); past it,
        503 with C{Retry-After}. By default, as twistd: L{MAX_STREAMS}, or
        fewer if the open-file limit holds fewer (L{fileRoom}).
    @param maxStreamsPerJob: the same, per render.
    @param authTokens: operator tokens; if any, creating and cancelling
        renders needs one (C{Authorization: Bearer TOKEN}).
    @param corsOrigins: origins (C{https://app.example}) whose pages may
        use the API and open event streams.
    @param jwtSecret: the secret scoped tokens (JWTs, see
        L{twistedsse.mintToken}) are signed with; if set, such tokens may
        create and cancel renders within their scopes.
    @param publicNames: C{Host} names (besides loopback and IP addresses)
        that requests without a token may use; C{"*"}: any, for a parent
        site that checks C{Host} itself.
    @param connectionCounter: the serving site's connection counts, for
        C{/healthz} and C{/metrics}.
    @param serveMetrics: serve the service's metrics at C{/metrics}
        (C{False}: L{buildMetricsSite} serves them elsewhere; C{/metrics}
        is then a 404). Either way this resource's streams and the site's
        connections are counted in them.
    @param logStreams: log each event stream's opening and closing (debug
        level, with the job id).
    """
    metrics = getattr(service, "metrics", None)
    if not isinstance(metrics, ServiceMetrics):
        metrics = None  # (an embedder's service of its own making)
    if isinstance(service, RedisRenderService) and service.role == "worker":
        # A worker serves its health (and metrics) only.
        if metrics is not None and connectionCounter is not None:
            metrics.collector.connections.append(connectionCounter)
        return WorkerResource(service, serveMetrics)
    if maxStreams is None:
        maxStreams = min(MAX_STREAMS, fileRoom(1, service.maxRenders))
    app = TwistedSSEApp(
        service,
        _reactor(reactor),
        StreamSettings(keepalive=keepalive, retry=retry, writeTimeout=writeTimeout, logStreams=logStreams),
        StreamLimits(maxStreams=maxStreams, maxPerJob=maxStreamsPerJob),
        BearerTokens(tuple(authTokens), jwtSecret=jwtSecret),
        CORSPolicy.of(corsOrigins),
        HostPolicy.of(publicNames),
        connectionCounter,
        metrics if serveMetrics else None,
    )
    if metrics is not None:
        metrics.watch(app.limits, app.keepalives, connectionCounter)
    return app.resource()


class MetricsOnly(Resource):
    """
    What a C{--metrics-listen} endpoint serves: C{GET /metrics} (with the
    main listener's tokens, if any: an operator token or scope
    C{read:metrics}), and a JSON 404 for anything else.
    """

    isLeaf = True

    def __init__(self, metrics: ServiceMetrics, auth: BearerTokens, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (see RenderService)
        self._metrics = metrics
        self._auth = auth
        self._clock = clock

    def render(self, request: IRequest) -> bytes | int:
        if request.path != b"/metrics":
            return respondError(request, 404, "not_found", "this endpoint serves /metrics only")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return respondError(request, 405, "method_not_allowed", "use GET")
        try:
            self._auth.check(request, self._clock.seconds(), "read", "metrics")
        except TwistedSSEError as e:
            return respondError(request, e.status, e.code, str(e))
        body: bytes | int = self._metrics.resource().render(request)
        return body


def buildMetricsSite(
    service: RenderService | RedisRenderService,
    reactor: IReactorTime | None = None,
    *,
    authTokens: Iterable[bytes] = (),
    jwtSecret: bytes | None = None,
) -> Site:
    """
    A small site serving the service's metrics at C{/metrics} only (a
    C{--metrics-listen} endpoint; build the main one with
    C{serveMetrics=False}). With C{authTokens} or C{jwtSecret}, a scrape
    needs an operator token or scope C{read:metrics}.
    """
    resource = MetricsOnly(service.metrics, BearerTokens(tuple(authTokens), jwtSecret=jwtSecret), _reactor(reactor))
    site = Site(resource, reactor=_reactor(reactor))
    site.displayTracebacks = False
    return site


def buildSite(
    service: RenderService | RedisRenderService,
    reactor: IReactorTime | None = None,
    *,
    connections: ConnectionLimits | None = None,
    **options: Unpack[ResourceOptions],
) -> DrainingSite:
    """
    A L{DrainingSite} serving L{buildResource} (which takes C{options}) at
    its root. Its access log writes C{access_token} values as C{REDACTED}.

    @param connections: the bounds on client connections (request
        timeouts, caps); by default twistd's (L{defaultLimits}): request
        timeouts, L{MAX_CONNECTIONS} or what the open-file limit holds,
        L{MAX_CONNECTIONS_PER_ADDRESS} per non-loopback address.
    """
    reactor = _reactor(reactor)
    if connections is None:
        connections = defaultLimits(1, service.maxRenders)
    counter = ConnectionCounter(connections)
    site = DrainingSite(
        buildResource(service, reactor, connectionCounter=counter, **options),
        reactor=reactor,
        connections=counter,
        logFormatter=redactedLogFormatter,
        # Bodies are JSON that the app reads: Twisted must not parse form
        # submissions (a multipart body it cannot parse gets a bare 400
        # before the app's JSON 415, and a form's fields would join the
        # query's in request.args).
        parsePOSTFormSubmission=False,
    )
    site.displayTracebacks = False
    return site



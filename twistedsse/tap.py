"""
The twistd plugin's options and service: C{twistd -n twistedsse ...}.

Ordinary, tested code; the dropin in C{twisted/plugins/} only names this
module.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from urllib.parse import urlsplit
from typing import IO, Any, cast

import attrs
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore, IReactorThreads, IReactorTime
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile

from twisted.logger import Logger

from ._logformat import logFormat, logLevel, logObserver
from ._sdnotify import Notifier
from ._build import _reactor, buildMetricsSite, buildService, buildSite
from ._connections import (
    BODY_MIN_RATE,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    MAX_STREAMS,
    MAX_STREAMS_PER_JOB,
    REQUEST_TIMEOUT,
    ConnectionLimits,
    checkFileBudget,
    fileReserve,
    fileRoom,
    raiseFileLimit,
)
from ._jobs import MAX_QUEUED
from ._redis import RedisConfigError, RedisEndpoint, checkNow
from ._redisservice import ROLES
from ._server import ServerService
from ._command import CommandRenderer, ParamsSchema, checkRenderEnv
from ._listen import loopbackOnly, systemdEnvironment
from ._security import HostPolicy, readSecret, readTokens
from ._webhooks import allowEntry
from ._transport import EagerSendReactor

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

_log = Logger()


def _role(value: str) -> str:
    if value not in ROLES:
        raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {value!r}")
    return value


_role.coerceDoc = f"(one of {', '.join(ROLES)})"  # type: ignore[attr-defined]


def _positive(kind: type, name: str, minimum: float) -> Any:
    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"{name} must be at least {minimum:g}, got {value!r}")
        return number

    article = "an" if kind.__name__[0] in "aeiou" else "a"
    coerce.coerceDoc = f"({article} {kind.__name__}, at least {minimum:g})"  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """
    twistedsse's command line.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve render progress over Server-Sent Events. Defaults: listen on "
        f"{DEFAULT_LISTEN}, jobs in memory, ffmpeg from the imageio-ffmpeg wheel, "
        "outputs in a temporary directory removed at exit."
    )

    optParameters = [
        ["state-dir", "s", None, "Keep jobs (SQLite) and outputs here, across restarts (default: memory and a temporary directory)."],
        ["output-dir", "o", None, "Directory for render outputs (default: STATE-DIR/outputs, or a temporary one)."],
        ["keepalive", "k", 15.0, "A quiet stream gets a keepalive comment after this many seconds without a frame.", _positive(float, "--keepalive", 0.01)],
        ["max-renders", "m", os.cpu_count() or 1, "Renders run at once; the rest queue.", _positive(int, "--max-renders", 1)],
        ["history", None, 1000, "Events kept per job for late subscribers and resumes.", _positive(int, "--history", 2)],
        ["ffmpeg", None, None, "The ffmpeg executable (default: the imageio-ffmpeg one)."],
        ["render-timeout", None, 3600.0, "Seconds a render may run (0: no limit).", _positive(float, "--render-timeout", 0)],
        ["kill-grace", None, 5.0, "Seconds between TERM and KILL when stopping a render.", _positive(float, "--kill-grace", 0)],
        ["retry", None, 2000, "Reconnection delay (ms) sent to EventSource clients.", _positive(int, "--retry", 0)],
        ["write-timeout", None, 30.0, "Seconds a client may read nothing while frames wait, before it is dropped (0: never).", _positive(float, "--write-timeout", 0)],
        ["max-streams", None, None, f"Event streams open at once (0: no limit); past it, 503. Default: {MAX_STREAMS}, or what the open-file limit allows", _positive(int, "--max-streams", 0)],
        ["max-streams-per-job", None, MAX_STREAMS_PER_JOB, "Event streams open at once per render (0: no limit).", _positive(int, "--max-streams-per-job", 0)],
        ["request-timeout", None, REQUEST_TIMEOUT, "Seconds a request head may take, from the connection's start (or the next request's first byte); also the grace of a body before --body-min-rate applies (0: no limit, and no body rate either). Past it, 408 and close.", _positive(float, "--request-timeout", 0)],
        ["body-min-rate", None, BODY_MIN_RATE, "Bytes/s a request body must average once it has had --request-timeout seconds (0: no minimum). Slower: 408 and close.", _positive(int, "--body-min-rate", 0)],
        ["max-connections", None, None, f"Client connections open at once (0: no limit); past it, new ones are closed at once. Default: {MAX_CONNECTIONS}, or what the open-file limit allows", _positive(int, "--max-connections", 0)],
        ["max-connections-per-address", None, MAX_CONNECTIONS_PER_ADDRESS, "Client connections open at once from one address (0: no limit); loopback peers (a reverse proxy on this host) are exempt unless --limit-loopback.", _positive(int, "--max-connections-per-address", 0)],
        ["max-queued", None, MAX_QUEUED, "Renders that may wait for a slot (0: no limit); past it, 429.", _positive(int, "--max-queued", 0)],
        ["expire-after", None, 86400.0, "Seconds after a render ends when it and its output are deleted (0: never); its id then answers 410 for as long again.", _positive(float, "--expire-after", 0)],
        ["max-output-bytes", None, 0, "Total bytes of render outputs kept (0: no limit); the oldest go first, and each render may write at most this / --max-renders.", _positive(int, "--max-output-bytes", 0)],
        ["min-free-bytes", None, 100 * 1024 * 1024, "Renders are refused (507) while the output filesystem has less free space (0: no check).", _positive(int, "--min-free-bytes", 0)],
        ["render-threads", None, None, "Threads a render may use: ffmpeg's -threads and -filter_threads, and $TWISTEDSSE_THREADS for commands (default: the CPUs this process may use).", _positive(int, "--render-threads", 1)],
        ["redis", None, None, "Keep jobs, the render queue and events in Redis at this URL (redis://HOST:PORT/DB or rediss://...), shared by every web instance and worker; needs --output-dir on storage they all share. Default: in this process."],
        ["redis-password-file", None, None, "The Redis password: the first line of this file (never on the command line)."],
        ["role", None, "all", "With --redis: web (the HTTP API and streams; runs no render), worker (runs renders; serves /healthz and /metrics only) or all.", _role],
        ["claim-timeout", None, 60.0, "With --redis: seconds after which the render of a worker that stopped renewing its claim (died) is taken over by another worker.", _positive(float, "--claim-timeout", 1)],
        ["max-attempts", None, 2, "With --redis: runs of a render whose workers die; past it, failed with reason worker_lost.", _positive(int, "--max-attempts", 1)],
        ["log-format", None, "text", "Log lines as text, or json: one JSON object per line (journald, log shippers).", logFormat],
        ["log-level", None, "info", "The lowest level logged (debug, info, warn, error, critical): debug adds a line as each event stream opens and closes (with its job id) and as a download is closed by its client.", logLevel],
        ["drain-timeout", None, 60.0, "With --redis: seconds a worker stopping (SIGTERM) lets its renders finish before handing them back to the queue.", _positive(float, "--drain-timeout", 0)],
    ]

    optFlags = [
        ["no-auth", None, "Serve on a non-loopback address without any token: for operators whose own "
         "authentication stands in front of this service."],
        ["limit-loopback", None, "Apply --max-connections-per-address to loopback and UNIX-socket peers too."],
        ["no-eager-send", None, "Send with Twisted's own TCP transport (each write queued until the reactor's next "
         "turn) instead of sending in the write: a fallback if a Twisted release breaks the eager one."],
    ]

    def __init__(self) -> None:
        # usage.Options.__init__ is unannotated, and untyped_calls_exclude
        # misses calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["metrics-listen"] = []
        self["renderers"] = []
        self["cors-origins"] = []
        self["auth-tokens"] = ()
        self["jwt-secret"] = None
        self["public-names"] = []
        self["render-env"] = []
        self["callback-allow"] = []
        self["callback-secret"] = None
        self["renderer-schemas"] = {}

    def opt_listen(self, description: str) -> None:
        """
        An endpoint to serve on, in strports form (repeatable; default
        tcp:8080:interface=127.0.0.1). systemd:domain=INET:index=0 serves
        on a socket passed by systemd.
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_metrics_listen(self, description: str) -> None:
        """
        Serve /metrics (Prometheus) on this strports endpoint instead of
        the main one, where /metrics is then a 404 (repeatable). Refused
        beyond loopback unless tokens are configured (a scrape then needs
        one) or --no-auth.
        """
        self["metrics-listen"].append(description)

    def opt_renderer(self, spec: str) -> None:
        """
        NAME=COMMAND: a renderer clients may ask for by NAME (repeatable).
        COMMAND is split like a shell would, and run without one; it gets
        the params as JSON on stdin and prints one JSON object per line.
        """
        try:
            renderer = CommandRenderer.fromSpec(spec)
        except ValueError as e:
            raise usage.UsageError(f"--renderer: {e}") from None
        if renderer.name == "card" or any(r.name == renderer.name for r in self["renderers"]):
            raise usage.UsageError(f"--renderer: the name {renderer.name!r} is taken")
        self["renderers"].append(renderer)

    def opt_renderer_schema(self, spec: str) -> None:
        """
        NAME=FILE: a JSON Schema (2020-12 unless its $schema names another
        draft; at most 1 MiB; references only within the file) for the
        params of the command renderer NAME (repeatable). POST /renders
        checks params against it (422 invalid_params), and GET /renderers
        shows it. Without one, any JSON object.
        """
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise usage.UsageError(f"--renderer-schema: expected NAME=FILE, got {spec!r}")
        if name in self["renderer-schemas"]:
            raise usage.UsageError(f"--renderer-schema: {name!r} has a schema already")
        try:
            self["renderer-schemas"][name] = ParamsSchema.fromFile(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--renderer-schema: {e}") from None

    def opt_render_env(self, spec: str) -> None:
        """
        NAME: pass this variable of the service's environment on to every
        render; NAME=VALUE: set it (repeatable). Renders otherwise get only
        PATH, LANG, LC_ALL and their TWISTEDSSE_* variables.
        """
        try:
            self["render-env"].append(checkRenderEnv(spec))
        except ValueError as e:
            raise usage.UsageError(f"--render-env: {e}") from None

    def opt_cors_origin(self, origin: str) -> None:
        """
        An origin (scheme://host[:port]) whose pages may use the API and
        open event streams (repeatable; default: none).
        """
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise usage.UsageError(f"--cors-origin: expected http(s)://host[:port], got {origin!r}")
        self["cors-origins"].append(origin)

    def opt_auth_token_file(self, path: str) -> None:
        """
        A file of operator tokens, one per line: creating and cancelling
        renders then needs Authorization: Bearer TOKEN.
        """
        try:
            self["auth-tokens"] = readTokens(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"--auth-token-file: {e}") from None

    def opt_jwt_secret_file(self, path: str) -> None:
        """
        A file holding the secret (at least 32 bytes) that scoped tokens
        are signed with (HS256 JWTs an app's backend mints for its pages,
        see twistedsse.mintToken). A file, never the command line.
        """
        try:
            self["jwt-secret"] = readSecret(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--jwt-secret-file: {e}") from None

    def opt_callback_allow(self, entry: str) -> None:
        """
        HOST or HOST:PORT (IPv6 in brackets) that a render's callback_url
        may name (repeatable; default: none, and callback_url is refused).
        Needs --callback-secret-file.
        """
        try:
            allowEntry(entry)
        except ValueError as e:
            raise usage.UsageError(f"--callback-allow: {e}") from None
        self["callback-allow"].append(entry)

    def opt_callback_secret_file(self, path: str) -> None:
        """
        A file holding the secret (at least 32 bytes) that callbacks are
        signed with (HMAC-SHA256, header Twistedsse-Signature). Needs
        --callback-allow.
        """
        try:
            self["callback-secret"] = readSecret(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--callback-secret-file: {e}") from None

    def opt_public_name(self, name: str) -> None:
        """
        A host name browsers use to reach this service (repeatable).
        Requests without a token are answered only for loopback names, IP
        addresses and these (a guard against DNS rebinding); * allows any.
        """
        name = name.strip()
        try:
            if not name or "/" in name or any(c.isspace() for c in name):
                raise ValueError(name)
            HostPolicy.of([name])
        except (ValueError, UnicodeError):
            raise usage.UsageError(f"--public-name: expected a host name, got {name!r}") from None
        self["public-names"].append(name)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self.attachSchemas()
        for description in self["listen"]:
            if description.startswith("systemd:") and not systemdEnvironment().get("LISTEN_FDS"):
                raise usage.UsageError(
                    f"--listen {description}: no socket passed by systemd (LISTEN_FDS unset, or without "
                    "LISTEN_FDNAMES, which Twisted needs: systemd-socket-activate sets it only with --fdname)"
                )
        self.checkRedis()
        if bool(self["callback-allow"]) != (self["callback-secret"] is not None):
            raise usage.UsageError(
                "--callback-allow and --callback-secret-file go together: callbacks are sent only to "
                "allowed hosts, and always signed"
            )
        self.checkLogging()
        # Secure by default: never open to the network without a token (a
        # worker serves its health only).
        authenticated = bool(self["auth-tokens"]) or self["jwt-secret"] is not None
        if not authenticated and not self["no-auth"] and self["role"] != "worker":
            for description in self["listen"]:
                if not loopbackOnly(description):
                    raise usage.UsageError(
                        f"--listen {description} is reachable beyond this machine, and no authentication "
                        "is configured: give --auth-token-file (and/or --jwt-secret-file), or --no-auth "
                        "if your own authentication stands in front of this service"
                    )
        if not authenticated and not self["no-auth"]:
            for description in self["metrics-listen"]:
                if not loopbackOnly(description):
                    raise usage.UsageError(
                        f"--metrics-listen {description} is reachable beyond this machine, and no "
                        "authentication is configured: give --auth-token-file (scrapes then need a token), "
                        "or --no-auth if only your monitoring network reaches it"
                    )
        self.fitFileLimit()

    def attachSchemas(self) -> None:
        """
        Give each C{--renderer-schema} to its C{--renderer} (in either
        order on the command line).
        """
        schemas = self["renderer-schemas"]
        for name in schemas:
            if not any(r.name == name for r in self["renderers"]):
                raise usage.UsageError(f"--renderer-schema {name}: no --renderer {name}=COMMAND")
        self["renderers"] = [
            attrs.evolve(r, schema=schemas[r.name].schema) if r.name in schemas else r for r in self["renderers"]
        ]

    def checkLogging(self) -> None:
        """
        Under twistd, C{--log-format} and C{--log-level} make the observer
        twistd installs (see L{twistdLogObserver}); twistd's own
        C{--logger} and C{--syslog} make another, so not with them.
        """
        parent = getattr(self, "parent", None)
        custom = self["log-format"] != "text" or self["log-level"] != "info"
        if parent is not None and custom and (parent.get("logger") or parent.get("syslog")):
            raise usage.UsageError("--log-format and --log-level do not go with twistd's --logger or --syslog")
        if parent is not None and parent.get("logfile") == "-" and not parent.get("nodaemon", True):
            # (What twistd's own observer says, when ours stands in for it.)
            raise usage.UsageError("a daemon cannot log to stdout: give --nodaemon, or a --logfile")

    def checkRedis(self) -> None:
        """
        Redis mode's options go together, and Redis answers with these
        credentials now: a wrong password or an unreachable server is a
        start-up error, not a connection that retries it forever.
        """
        self["redis-endpoint"] = None
        if self["redis"] is None:
            if self["role"] != "all":
                raise usage.UsageError(f"--role {self['role']} needs --redis: without it one process does everything")
            if self["redis-password-file"] is not None:
                raise usage.UsageError("--redis-password-file needs --redis")
            return
        if self["state-dir"] is not None:
            raise usage.UsageError("--state-dir keeps jobs in this process; with --redis, Redis keeps them: drop one")
        if self["output-dir"] is None:
            raise usage.UsageError(
                "--redis needs --output-dir: a directory every web instance and worker shares (a volume, NFS)"
            )
        try:
            endpoint = RedisEndpoint.fromURL(self["redis"], self["redis-password-file"])
            checkNow(endpoint)
        except RedisConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["redis-endpoint"] = endpoint

    def fitFileLimit(self) -> None:
        """
        Raise the open-file soft limit to the hard limit, and check that
        the streams and connections asked for fit in it (each holds a
        descriptor, beside a reserve for listeners, renders, the store and
        logs); unless given, they default to what fits.
        """
        limit = self["open-file-limit"] = raiseFileLimit()
        listeners = len(self["listen"]) + len(self["metrics-listen"])
        reserve = fileReserve(listeners, self["max-renders"])
        room = fileRoom(listeners, self["max-renders"], limit)
        if self["max-streams"] is None:
            self["max-streams"] = min(MAX_STREAMS, room)
        if self["max-connections"] is None:
            self["max-connections"] = min(MAX_CONNECTIONS, room)
        try:
            checkFileBudget(
                limit, reserve, max_streams=self["max-streams"], max_connections=self["max-connections"]
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _oneLineHelp(options: type[usage.Options]) -> None:
    """
    usage.Options prints an C{opt_} method's docstring in C{--help} as it
    is, its line breaks' indentation included (runs of spaces in the middle
    of the wrapped text): make each docstring one line.
    """
    for name, method in vars(options).items():
        if name.startswith("opt_") and method.__doc__:
            method.__doc__ = " ".join(method.__doc__.split())


_oneLineHelp(Options)

GC_THRESHOLDS = (10_000, 10, 10)


def tuneGarbageCollector() -> None:
    """
    Python's cycle collector, tuned for a process holding many open
    streams: each stream is dozens of container objects, and with the
    default thresholds several full collections (each scanning every
    object, a stall for every stream) ran while thousands of clients
    connected, a large share of the connect CPU. Objects that live as long
    as the process (modules, the app) are frozen out of every collection,
    and young collections run every 10 000 net allocations instead of 700,
    so old objects are examined far less often. (Higher thresholds save
    little more and let cyclic garbage, and RSS, grow further between
    collections.) The measured figures: docs/performance.md, "Figures
    cited by the code". Only the service process does this; embedding
    applications keep theirs.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def twistdLogObserver(options: Options) -> ILogObserver | None:
    """
    Under twistd (C{options.parent}, its own options), the observer twistd
    installs for the whole process (L{ServerService.logObserver}): the
    C{--log-format} and C{--log-level} one, writing where twistd's own
    would (stdout with C{--nodaemon} and no C{--logfile} or
    C{--logfile=-}, else the file, C{twistd.log} by default, rotated as
    twistd rotates it, and on SIGUSR1). C{None} (twistd's own) with
    C{--logger} or C{--syslog}, or outside twistd.
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("logger") or parent.get("syslog"):
        return None
    path = parent.get("logfile")
    outFile: IO[Any]
    if path == "-" or (not path and parent.get("nodaemon")):
        outFile = sys.stdout
    else:
        outFile = logFile = LogFile.fromFullPath(path or "twistd.log")
        # SIGUSR1 rotates it, as twistd's own observer's file (unless
        # something else handles the signal).
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(number: int, frame: Any) -> None:
                from twisted.internet import reactor

                cast(IReactorThreads, reactor).callFromThread(logFile.rotate)

            signal.signal(signal.SIGUSR1, rotate)
    return logObserver(outFile, options["log-format"], options["log-level"])


def makeService(options: Options, reactor: IReactorTime | None = None) -> IService:
    """
    The render service and one listening service per C{--listen}. They stop
    in reverse order: first no new connections, then every render ends and
    every open stream gets its final frame.
    """
    reactor = _reactor(reactor)
    # Taken out of the environment first: no render inherits it (not even
    # through --render-env).
    notifier = Notifier.fromEnvironment()
    service = buildService(
        reactor,
        renderers=options["renderers"],
        outputDir=options["output-dir"],
        stateDir=options["state-dir"],
        ffmpeg=options["ffmpeg"],
        history=options["history"],
        maxRenders=options["max-renders"],
        renderTimeout=options["render-timeout"],
        killGrace=options["kill-grace"],
        maxQueued=options["max-queued"],
        expireAfter=options["expire-after"],
        maxOutputBytes=options["max-output-bytes"],
        minFreeBytes=options["min-free-bytes"],
        renderThreads=options["render-threads"],
        renderEnv=options["render-env"],
        redis=options.get("redis-endpoint"),
        role=options["role"],
        claimTimeout=options["claim-timeout"],
        maxAttempts=options["max-attempts"],
        drainTimeout=options["drain-timeout"],
        callbackAllow=options["callback-allow"],
        callbackSecret=options["callback-secret"],
    )
    site = buildSite(
        service,
        reactor,
        keepalive=options["keepalive"],
        retry=options["retry"],
        writeTimeout=options["write-timeout"],
        maxStreams=options["max-streams"],
        maxStreamsPerJob=options["max-streams-per-job"],
        authTokens=options["auth-tokens"],
        corsOrigins=options["cors-origins"],
        jwtSecret=options["jwt-secret"],
        publicNames=options["public-names"],
        serveMetrics=not options["metrics-listen"],
        # The streams' opening and closing lines are made only when they
        # are kept: made and filtered out, they would still cost a share of
        # what connecting a stream does (docs/performance.md, "Metrics").
        logStreams=options["log-level"] == "debug",
        connections=ConnectionLimits(
            requestTimeout=options["request-timeout"],
            bodyMinRate=options["body-min-rate"],
            maxConnections=options["max-connections"],
            maxPerAddress=options["max-connections-per-address"],
            limitLoopback=bool(options["limit-loopback"]),
        ),
    )
    _log.info(
        "open-file limit {limit}: up to {connections} connections, {streams} event streams",
        limit=options.get("open-file-limit"),
        connections=options["max-connections"] or "unlimited",
        streams=options["max-streams"] or "unlimited",
    )
    top = ServerService(
        service,
        site,
        reactor,
        notify=None if notifier is None else notifier.notify,
        logObserver=twistdLogObserver(options),
    )
    # TCP connections that send each frame in the write itself (see
    # twistedsse._transport); other endpoints are the reactor's own.
    listening: IReactorCore = EagerSendReactor(reactor)
    if options["no-eager-send"]:
        # (Every reactor Twisted ships is an IReactorCore too.)
        listening = cast(IReactorCore, reactor)
    for description in options["listen"]:
        top.addListener(strports.service(description, site, reactor=listening))
    if options["metrics-listen"]:
        metricsSite = buildMetricsSite(
            service, reactor, authTokens=options["auth-tokens"], jwtSecret=options["jwt-secret"]
        )
        for description in options["metrics-listen"]:
            top.addListener(strports.service(description, metricsSite, reactor=cast(IReactorCore, reactor)))
    tuneGarbageCollector()
    return top

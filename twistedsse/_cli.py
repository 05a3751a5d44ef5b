"""
The client side of the C{twistedsse} command: C{render}, C{watch},
C{status} and C{cancel}, on L{twistedsse.client.RenderClient}, driven by
Twisted's C{react}. (C{twistedsse serve}, and a bare C{twistedsse
--listen ...}, run the service: see L{twistedsse.__main__}.)

Exit codes, the same for every subcommand::

    0    done: the render succeeded (render, watch); the answer was printed
         (status, cancel)
    1    the render failed
    2    usage: a wrong option or argument (nothing was sent)
    3    the render was cancelled
    4    the server could not be reached, or refused the request (an API
         error such as unknown_job, unauthorized, queue_full), or the
         output could not be saved: the command could not do its job, which
         says nothing of the render's outcome (so not 1; a script may retry)
    130  interrupted (Ctrl-C): C{render} stops watching and leaves the render
         running (it says how to cancel it); nothing is cancelled on the
         way out

The token (C{--token-file}) is sent in C{Authorization} and never printed.
"""

from __future__ import annotations

import getopt
import json
import sys
from typing import IO, Any, Callable, Coroutine, NoReturn

import attrs
from hyperlink import DecodedURL
from twisted.internet import error as netError
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import _newclient

from ._cliview import BarView, IRenderView, PlainView, oneLine
from ._frames import Event
from ._security import readTokens
from .client import APIError, RenderClient

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_ERROR = 4
EXIT_INTERRUPTED = 130

#: The exit code for each terminal event (and final state).
OUTCOMES = {
    "complete": EXIT_SUCCEEDED, "succeeded": EXIT_SUCCEEDED,
    "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED,
}  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:8080"

USAGE = """\
Usage: twistedsse [serve] [SERVICE-OPTIONS]     run the service (twistedsse serve --help)
       twistedsse render RENDERER [--param KEY=VALUE ...] [--params JSON] [-o FILE]
       twistedsse watch EVENTS-URL
       twistedsse status ID
       twistedsse cancel ID

The client commands take --url BASE (default http://127.0.0.1:8080) and
--token-file FILE; `twistedsse COMMAND --help` lists a command's options.
Exit codes: 0 succeeded, 1 failed, 2 usage, 3 cancelled, 4 server
unreachable or request refused, 130 interrupted."""

#: The errors that mean the server could not be reached (or went away).
_CONNECTION_ERRORS = (
    netError.ConnectError, netError.DNSLookupError, netError.TimeoutError, netError.ConnectionLost,
    netError.ConnectionDone, _newclient.ResponseFailed, _newclient.RequestTransmissionFailed,
    _newclient.ResponseNeverReceived,
)  # fmt: skip


def parseParam(spec: str) -> tuple[str, object]:
    """
    C{KEY=VALUE}: a value that parses as JSON is that value (C{5}, C{true},
    C{[1,2]}, C{"5"}), anything else is the string as written.

    @raise usage.UsageError: no C{=}, or no key.
    """
    key, sep, raw = spec.partition("=")
    if not sep or not key:
        raise usage.UsageError(f"--param {spec!r}: expected KEY=VALUE")

    def refuse(constant: str) -> object:
        # NaN and Infinity are no JSON (the server refuses them): a string.
        raise ValueError(constant)

    try:
        value: object = json.loads(raw, parse_constant=refuse)
    except ValueError:
        value = raw
    return key, value


class _ClientOptions(usage.Options):
    """
    What every client command takes: where the service is, and its token.
    """

    optParameters = [
        ["url", "u", DEFAULT_URL, "The service's base URL."],
        ["token-file", None, None, "A file whose first token is sent as Authorization: Bearer (never printed)."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        As usage.Options does, but options may follow the arguments
        (C{render card --param duration=3}), as in GNU tools: usage.Options
        (getopt) stops at the first argument.
        """
        argv = sys.argv[1:] if options is None else options
        try:
            found, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for name, value in found:
            if name.startswith("--"):
                ordered.append(f"{name}={value}" if f"{name[2:]}=" in self.longOpt else name)
            else:
                ordered.append(f"{name}{value}" if f"{name[1]}:" in self.shortOpt else name)
        super().parseOptions([*ordered, "--", *args])  # type: ignore[no-untyped-call]

    def postOptions(self) -> None:
        url = self["url"]
        try:
            parsed = DecodedURL.from_text(url)
        except ValueError as e:
            raise usage.UsageError(f"--url {url!r}: {e}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise usage.UsageError(f"--url {url!r}: expected http://HOST[:PORT] or https://...")
        self["token"] = None
        if self["token-file"] is not None:
            try:
                self["token"] = readTokens(self["token-file"])[0].decode("utf-8")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"--token-file: {e}") from None

    def client(self, reactor: Any) -> RenderClient:
        return RenderClient(self["url"], token=self["token"], reactor=reactor)


class RenderOptions(_ClientOptions):
    synopsis = "twistedsse render RENDERER [--param KEY=VALUE ...] [--params JSON] [-o FILE] [options]"
    longdesc = (
        "Start a render, show its progress (a live bar on a terminal, one line per event otherwise) "
        "and download its output. Ctrl-C stops watching and leaves the render running."
    )
    optFlags = [["plain", None, "One line per event even on a terminal."]]
    optParameters = [
        ["params", None, None, "The params as one JSON object; each --param overrides its key."],
        ["output", "o", None, "Save the output here (default: JOBID.mp4 in the current directory)."],
    ]

    def __init__(self) -> None:
        # usage.Options.__init__ is unannotated, and untyped_calls_exclude
        # misses calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self["param"] = []

    def opt_param(self, spec: str) -> None:
        """
        A render parameter KEY=VALUE (repeatable); VALUE is JSON if it parses as JSON, else a string.
        """
        self["param"].append(parseParam(spec))

    # Typing note: usage.Options.parseArgs takes the positional arguments
    # a subclass names (it reads the signature), so each override differs.
    def parseArgs(self, renderer: str) -> None:  # type: ignore[override]
        self["renderer"] = renderer

    def postOptions(self) -> None:
        super().postOptions()
        params: dict[str, object] = {}
        if self["params"] is not None:
            try:
                parsed = json.loads(self["params"])
            except ValueError as e:
                raise usage.UsageError(f"--params: not JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise usage.UsageError("--params: expected a JSON object like {\"duration\": 3}")
            params.update(parsed)
        params.update(self["param"])
        self["parsed-params"] = params


class WatchOptions(_ClientOptions):
    synopsis = "twistedsse watch EVENTS-URL [options]"
    longdesc = (
        "Print a render's events, one line each (EVENT ID DATA), until its end. EVENTS-URL is absolute, "
        "or relative to --url (/renders/ID/events)."
    )

    def parseArgs(self, url: str) -> None:  # type: ignore[override]
        self["events-url"] = url


class JobOptions(_ClientOptions):
    def parseArgs(self, jobID: str) -> None:  # type: ignore[override]
        self["id"] = jobID


class StatusOptions(JobOptions):
    synopsis = "twistedsse status ID [options]"
    longdesc = "Print the render's state (the JSON of GET /renders/ID)."


class CancelOptions(JobOptions):
    synopsis = "twistedsse cancel ID [options]"
    longdesc = "Cancel a queued or running render (DELETE /renders/ID) and print the answer."


@attrs.define
class RenderCommand:
    """
    C{twistedsse render}: create, watch, download.
    """

    options: RenderOptions
    out: IO[str]
    err: IO[str]
    view: IRenderView | None = None
    jobID: str | None = None

    async def run(self, reactor: Any) -> int:
        client = self.options.client(reactor)
        if self.out.isatty() and not self.options["plain"]:
            self.view = BarView.forTerminal(self.out, reactor)
        else:
            self.view = PlainView(self.out)
        view = self.view
        try:
            job = await client.create(self.options["renderer"], self.options["parsed-params"])
            self.jobID = job.id
            view.created(job.id, job.renderer)
            final = await client.whenFinished(job.id, lambda event: view.event(job.id, event))
        finally:
            # Before any error is printed: the terminal gets its cursor back.
            view.stop()
        if final.state == "succeeded":
            if final.result and final.result.get("output_url"):
                path = self.options["output"] or f"{job.id}.mp4"
                view.saved(path, await client.download(job.id, path))
            elif self.options["output"]:
                self.err.write(f"twistedsse: render {job.id} made no output; nothing saved\n")
        return OUTCOMES.get(final.state, EXIT_ERROR)

    def interrupted(self) -> None:
        if self.view is not None:
            self.view.stop()
        if self.jobID is not None:
            self.err.write(
                f"twistedsse: stopped watching; render {self.jobID} goes on "
                f"(twistedsse cancel {self.jobID} stops it)\n"
            )


@attrs.define
class WatchCommand:
    """
    C{twistedsse watch}: print every event (C{EVENT ID DATA}) to the end.
    """

    options: WatchOptions
    out: IO[str]
    err: IO[str]
    last: str | None = None

    def _print(self, event: Event) -> None:
        self.last = event.event
        self.out.write(oneLine(f"{event.event or 'message'} {event.id or '-'} {event.data}") + "\n")
        self.out.flush()

    async def run(self, reactor: Any) -> int:
        subscription = self.options.client(reactor).eventsAt(self.options["events-url"], self._print)
        try:
            await subscription.done
        finally:
            subscription.close()
        return OUTCOMES.get(self.last or "", EXIT_SUCCEEDED)

    def interrupted(self) -> None:
        pass


@attrs.define
class JobCommand:
    """
    C{twistedsse status} and C{twistedsse cancel}: one request, its JSON
    answer printed.
    """

    options: JobOptions
    out: IO[str]
    err: IO[str]
    cancel: bool = False

    async def run(self, reactor: Any) -> int:
        client = self.options.client(reactor)
        call = client.cancel if self.cancel else client.status
        job = await call(self.options["id"])
        self.out.write(json.dumps(dict(job.raw), indent=2) + "\n")
        return EXIT_SUCCEEDED

    def interrupted(self) -> None:
        pass


_Command = RenderCommand | WatchCommand | JobCommand

#: Each subcommand: its options and how to make the command from them.
COMMANDS: dict[str, tuple[type[_ClientOptions], Callable[[Any, IO[str], IO[str]], _Command]]] = {
    "render": (RenderOptions, lambda o, out, err: RenderCommand(o, out, err)),
    "watch": (WatchOptions, lambda o, out, err: WatchCommand(o, out, err)),
    "status": (StatusOptions, lambda o, out, err: JobCommand(o, out, err)),
    "cancel": (CancelOptions, lambda o, out, err: JobCommand(o, out, err, cancel=True)),
}


def describeError(error: BaseException, url: str) -> str | None:
    """
    The one stderr line for an error that ends a client command with
    L{EXIT_ERROR}, or C{None} for any other error (a bug).
    """
    if isinstance(error, APIError):
        retry = f" (retry after {error.retryAfter:g} s)" if error.retryAfter is not None else ""
        return oneLine(f"twistedsse: the server answered {error.status} {error.code}: {error.detail}{retry}")
    if isinstance(error, _CONNECTION_ERRORS):
        reasons = getattr(error, "reasons", None)
        why = reasons[0].getErrorMessage() if reasons else (str(error) or type(error).__name__)
        return oneLine(f"twistedsse: cannot reach {url}: {why}")
    if isinstance(error, OSError):
        return f"twistedsse: {error}"
    if isinstance(error, ValueError):
        # An event stream line over the bound.
        return f"twistedsse: unreadable event stream from {url}: {error}"
    return None


def runCommand(reactor: Any, command: _Command, url: str, err: IO[str]) -> Deferred[None]:
    """
    Run C{command} for C{react}: its result becomes the exit code; Ctrl-C
    (the reactor shutting down first) exits with L{EXIT_INTERRUPTED}.
    """
    finished: Deferred[None] = Deferred()
    coroutine: Coroutine[Any, Any, int] = command.run(reactor)
    work = Deferred.fromCoroutine(coroutine)

    def done(result: int | Failure) -> None:
        if finished.called:
            return
        if isinstance(result, Failure):
            line = describeError(result.value, url) if result.value is not None else None
            if line is None:
                finished.errback(result)
                return
            err.write(line + "\n")
            result = EXIT_ERROR
        finished.errback(SystemExit(result))

    def interrupted() -> None:
        if not finished.called:
            command.interrupted()
            finished.errback(SystemExit(EXIT_INTERRUPTED))
            work.cancel()

    work.addBoth(done)
    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    return finished


def main(argv: list[str], out: IO[str] | None = None, err: IO[str] | None = None) -> NoReturn:
    """
    Run the client subcommand C{argv[0]} with its arguments, then exit.
    """
    from twisted.internet.task import react

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    name = argv[0] if argv else "help"
    if name in ("help", "-h", "--help"):
        out.write(USAGE + "\n")
        sys.exit(EXIT_SUCCEEDED)
    if name not in COMMANDS:
        err.write(f"{USAGE}\ntwistedsse: unknown command {name!r}\n")
        sys.exit(EXIT_USAGE)
    makeOptions, makeCommand = COMMANDS[name]
    options = makeOptions()
    try:
        options.parseOptions(argv[1:])
    except usage.UsageError as e:
        err.write(f"{options}\ntwistedsse {name}: {e}\n")
        sys.exit(EXIT_USAGE)
    command = makeCommand(options, out, err)
    react(runCommand, (command, options["url"], err))

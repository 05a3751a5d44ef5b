"""
A twistedsse server for the browser, proxy and network tests, in its own
process (browser drivers block, so the server cannot share the test's
thread). Takes the C{twistd twistedsse} options plus two test-only
switches that make the negative controls:

    --no-accel-header     suppress X-Accel-Buffering (nginx then buffers)
    --buffer-frames MS    the bug this project exists to prevent: hold
                          frames back and write them together every MS ms
    --leak-streams        a deliberate leak: keep every stream's request
                          (and so its channel and transport) forever

and prints one line per listening port, C{LISTENING <description> <port>},
then C{READY}, on stdout. Ends on SIGTERM like twistd.

On SIGUSR1 it runs a full garbage collection and writes one line,
C{CENSUS objects=N rss_kib=M}, to stderr: the objects the collector tracks
and the resident memory once no garbage is left, which a leak check reads
(tests/load/test_churn.py).

usage: python -m tests._support.serve [--no-accel-header] [--buffer-frames MS] [--leak-streams] TWISTEDSSE-OPTIONS...
"""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver

from twistedsse import _stream
from twistedsse.tap import Options, makeService


def suppressAccelHeader() -> None:
    original = _stream.startStreamHeaders

    def withoutAccel(request: Any) -> None:
        original(request)
        request.responseHeaders.removeHeader(b"x-accel-buffering")

    _stream.startStreamHeaders = withoutAccel


def bufferFrames(reactor: Any, milliseconds: float) -> None:
    """
    Make every stream hold its frames and write them in one batch every
    C{milliseconds}: what a server without a flush per write does.
    """
    deliver = _stream._Stream.deliver
    held: dict[Any, list[tuple[Any, bytes]]] = {}

    def flush() -> None:
        for stream, items in list(held.items()):
            held.pop(stream)
            for event, frame in items:
                deliver(stream, event, frame)
        reactor.callLater(milliseconds / 1000, flush)

    def buffered(self: Any, event: Any, frame: bytes) -> None:
        held.setdefault(self, []).append((event, frame))

    _stream._Stream.deliver = buffered
    reactor.callLater(milliseconds / 1000, flush)


_leaked: list[Any] = []


def leakStreams() -> None:
    """
    Keep every stream's request alive: what a stream that is never
    released costs per connection.
    """
    init = _stream._Stream.__init__

    def leaking(self: Any, request: Any, *args: Any, **kwargs: Any) -> None:
        _leaked.append(request)
        init(self, request, *args, **kwargs)

    _stream._Stream.__init__ = leaking  # type: ignore[method-assign]


def census() -> None:
    gc.collect()
    with open("/proc/self/status") as status:
        rss = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    print(f"CENSUS objects={len(gc.get_objects())} rss_kib={rss}", file=sys.stderr, flush=True)


def main(reactor: Any, argv: list[str]) -> Deferred[None]:
    if "--leak-streams" in argv:
        argv.remove("--leak-streams")
        leakStreams()
    # From a signal handler, only hand the work to the reactor's thread.
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(census))
    if "--no-accel-header" in argv:
        argv.remove("--no-accel-header")
        suppressAccelHeader()
    if "--buffer-frames" in argv:
        at = argv.index("--buffer-frames")
        milliseconds = float(argv[at + 1])
        del argv[at : at + 2]
        bufferFrames(reactor, milliseconds)
    options = Options()
    options.parseOptions(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    service = makeService(options, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    listeners = [s for s in service if s is not service.renders]  # type: ignore[attr-defined]

    def report(ports: list[Any]) -> None:
        for description, port in zip(options["listen"], ports):
            print(f"LISTENING {description} {port.getHost().port}", flush=True)
        print("READY", flush=True)

    # _waitingForPort is StreamServerEndpointService's (private) Deferred.
    gatherResults([listener._waitingForPort for listener in listeners]).addCallback(report)
    return Deferred()


if __name__ == "__main__":
    react(main, (sys.argv[1:],))

"""
C{python -m twistedsse} / C{twistedsse}: C{twistedsse serve [options]} (or
a bare C{twistedsse [options]}) runs the same service as C{twistd -n
twistedsse}, without plugin discovery or a pidfile; C{render}, C{watch},
C{status} and C{cancel} are a client of a running one (L{twistedsse._cli}).
"""

from __future__ import annotations

import sys
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import react
from twisted.logger import globalLogBeginner
from twisted.python import usage

from ._logformat import logObserver
from .tap import Options, makeService


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        from ._cli import main as client

        client(argv)
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{options}\ntwistedsse: {e}", file=sys.stderr)
        sys.exit(2)
    globalLogBeginner.beginLoggingTo([logObserver(sys.stdout, options["log-format"], options["log-level"])])

    def run(reactor: IReactorCore) -> Deferred[None]:
        # (react's reactor is the global one: every interface at once.)
        service = makeService(options, cast(IReactorTime, reactor))
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        return Deferred()  # runs until SIGINT/SIGTERM

    react(run)


if __name__ == "__main__":
    main()

"""
The log observer of the service process: text (Twisted's usual lines) or
JSON, one object per line, for journald and log shippers; and the lowest
level it keeps. One function, for C{twistd twistedsse} and the
C{twistedsse} command alike.

Intentional divergence: Twisted's L{jsonFileLogObserver} starts each
record with an RS character (C{\\x1e}, RFC 7464 JSON text sequences);
ours are plain JSON lines (C{recordSeparator=""}), what journald, jq,
Vector, Fluent Bit and Loki read line by line; and each carries the
message as text too (C{log_text}, what the text format prints), so a
reader needs no Twisted to show it.
"""

from __future__ import annotations

from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogEvent,
    LogLevelFilterPredicate,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

#: The values of C{--log-format}.
LOG_FORMATS = ("text", "json")

#: The values of C{--log-level}, lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def logFormat(value: str) -> str:
    """
    C{--log-format}'s coerce.
    """
    if value not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


logFormat.coerceDoc = f"(one of {', '.join(LOG_FORMATS)})"  # type: ignore[attr-defined]


def logLevel(value: str) -> str:
    """
    C{--log-level}'s coerce.
    """
    if value not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value


logLevel.coerceDoc = f"(one of {', '.join(LOG_LEVELS)})"  # type: ignore[attr-defined]


def _withText(observer: ILogObserver) -> ILogObserver:
    """
    C{observer}, given each event with its message formatted in
    C{log_text} (on a copy: other observers see the event as it was).
    """

    @implementer(ILogObserver)
    def withText(event: LogEvent) -> None:
        observer({**event, "log_text": formatEvent(event)})

    return cast(ILogObserver, withText)


def logObserver(outFile: IO[Any], format: str = "text", level: str = "info") -> ILogObserver:
    """
    An observer writing to C{outFile}: Twisted's text lines, or
    (C{format="json"}) one JSON object per line, each event's fields
    (C{jobID}, C{log_level}, C{log_namespace}, C{log_time}, ...) as its
    keys; events below C{level} are dropped.
    """
    observer: ILogObserver
    if format == "json":
        observer = _withText(jsonFileLogObserver(outFile, recordSeparator=""))
    else:
        observer = textFileLogObserver(outFile)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [predicate])

"""
Turn events into the bytes of the C{text/event-stream} wire format.

This module is pure: values in, bytes out, no I/O and no Twisted. An
L{Event} is validated once, when it is made, so that L{encodeEvent} (called
once per event, whose bytes then go to every subscriber) does no checking
and, for the common single-line payload, no splitting.

Intentional divergence (from sse-starlette and most SSE servers): a field
value that would break the framing (CR, LF or NUL in C{event} or C{id}) is
refused with L{ValueError}, never silently stripped. Stripping turns a bug
in the caller into an event the browser routes somewhere unexpected.
"""

from __future__ import annotations

import re

import attrs

TERMINAL_EVENTS = frozenset({"complete", "failed", "cancelled"})
"""
The event types after which a job's stream ends.

A failure is C{"failed"}, never C{"error"}: C{EventSource} dispatches its own
C{error} event when the connection drops, so a server event called C{error}
would reach the same listeners and be indistinguishable from a network
failure (which the browser answers by reconnecting).
"""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
"""
What ends a line in an event stream: CRLF (one break, not two), lone CR or
lone LF, and nothing else (not U+2028, U+0085, VT or FF, which
C{str.splitlines} would also split on).
"""

_FORBIDDEN = ("\r", "\n", "\0")


def _refuseBreaks(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    """
    Refuse an C{event} or C{id} that could not be sent as one field line.

    CR or LF would end the line early and let the rest become a field of its
    own; a browser ignores an C{id} containing NUL. Neither may be empty:
    an empty C{event} means the default type (say C{None}), and an empty
    C{id} line resets the browser's last event ID, which must never be
    sent by accident.
    """
    if value is None:
        return
    name = attribute.name
    if not isinstance(value, str):
        raise TypeError(f"Event.{name} must be a str or None, not {value!r}")
    if not value:
        raise ValueError(f"Event.{name} must not be empty (use None): {value!r}")
    if any(c in value for c in _FORBIDDEN):
        raise ValueError(f"Event.{name} must not contain CR, LF or NUL: {value!r}")


def _checkData(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    """
    Refuse data that is not text: bytes would encode as C{b'...'}.
    """
    if not isinstance(value, str):
        raise TypeError(f"Event.data must be a str, not {value!r}")


def _checkRetry(value: int, name: str) -> None:
    """
    Refuse a reconnection time that a browser would ignore.

    Browsers accept only ASCII digits, so the value must be a non-negative
    C{int}; C{True} is an C{int} too but is certainly a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative: {value!r}")


def _validateRetry(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        _checkRetry(value, "Event.retry")


@attrs.frozen
class Event:
    """
    One server-sent event, as sent and as decoded.

    @ivar data: the payload, any text. Line breaks (CR, LF or CRLF) are
        sent as several C{data} lines, which a browser joins with LF: a
        payload with CR or CRLF arrives with LF instead.
    @ivar event: the event type, or C{None} for the default type (which
        browsers call C{"message"}). Never empty, never containing CR, LF
        or NUL.
    @ivar id: the event ID, which the browser sends back as
        C{Last-Event-ID} when it reconnects; C{None} to send no C{id} line
        (the browser keeps the previous ID). Never empty (an empty C{id}
        line resets the browser's last event ID) and never containing CR,
        LF or NUL.
    @ivar retry: the reconnection time to ask for, in milliseconds, or
        C{None}.

    @raise ValueError: a field has a value that cannot be sent intact.
    @raise TypeError: a field has the wrong type.
    """

    data: str = attrs.field(validator=_checkData)
    event: str | None = attrs.field(default=None, validator=_refuseBreaks)
    id: str | None = attrs.field(default=None, validator=_refuseBreaks)
    retry: int | None = attrs.field(default=None, validator=_validateRetry)


def encodeEvent(event: Event) -> bytes:
    """
    Encode one event as a complete frame, ending with its blank line.

    Fields go in the order C{id}, C{event}, C{retry}, C{data}, always with
    one space after the colon, so a payload that itself begins with a space
    survives (the decoder strips exactly one). Empty data is sent as one
    empty C{data} line, which browsers dispatch as an event with empty
    data.

    @param event: the event; it was validated when it was made.
    @return: the UTF-8 frame.
    """
    data = event.data
    if "\n" in data or "\r" in data:
        data = _LINE_BREAK.sub("\ndata: ", data)
    head = ""
    if event.id is not None:
        head = "id: " + event.id + "\n"
    if event.event is not None:
        head += "event: " + event.event + "\n"
    if event.retry is not None:
        head += f"retry: {event.retry:d}\n"
    return (head + "data: " + data + "\n\n").encode("utf-8")


def encodeComment(text: str = "") -> bytes:
    """
    Encode a comment frame, such as a keepalive.

    Browsers ignore comments, but the bytes keep proxies and NAT tables
    from timing out an idle stream. Each line of C{text} gets its own
    C{:} prefix, so no text can turn into a field or an event.

    @param text: the comment; may be empty or span several lines.
    @return: the UTF-8 frame, ending with a blank line.
    """
    return (": " + _LINE_BREAK.sub("\n: ", text) + "\n\n").encode("utf-8")


def encodeRetry(ms: int) -> bytes:
    """
    Encode a frame that sets only the browser's reconnection time.

    @param ms: the reconnection time in milliseconds.
    @return: the frame; it dispatches no event.
    @raise ValueError: C{ms} is negative.
    @raise TypeError: C{ms} is not an C{int} (or is a C{bool}).
    """
    _checkRetry(ms, "ms")
    return f"retry: {ms:d}\n\n".encode("ascii")

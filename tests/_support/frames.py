"""
L{FrameReader}: the load clients' event stream parser, on bytes, for the
server's own framing only. L{tests.test_support} checks that it returns
what L{twistedsse._decoder.EventStreamDecoder} returns, or refuses.
"""

from __future__ import annotations

import re

#: The frame of a one-line event with an id and a type, as the server
#: writes every event.
_EVENT = re.compile(rb"id: ([^\n]*)\nevent: ([^\n]*)\ndata: ([^\n]*)")


class FrameReader:
    """
    The event stream parser of the load clients: the server's frames, on
    bytes.

    The project's L{EventStreamDecoder} implements the whole WHATWG
    algorithm on text and builds a validated L{Event} per event: about
    13 us an event for 1 KiB events on a quiet machine, as much as the
    server spends on writing one, so twenty clients decoding 20 000 events
    each would make the client the bottleneck of a test about the server.
    This reader, three to four times faster, takes the server's own framing
    (LF line ends; C{id}, C{event}, C{data}, C{retry} fields; comments)
    and refuses anything else (a CR, a NUL, an unknown field) rather than
    misread it. On what it accepts it returns what L{EventStreamDecoder}
    returns: the event's id is the last id the stream set (C{None} once
    reset to empty), its type C{None} for the default, and C{retry} keeps
    the last valid value (tests/test_support.py checks this on generated
    streams cut at random places).

    @ivar comments: how many comment lines (keepalives) it has read.
    @ivar retry: the last valid C{retry} value, or C{None}.
    @ivar lastEventID: the id the next event gets if it sets none.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.comments = 0
        self.retry: int | None = None
        self.lastEventID: str | None = None

    def feed(self, data: bytes) -> list[tuple[str | None, str | None, bytes]]:
        """
        @return: the C{(id, event, data)} of each event these bytes
            completed.
        @raise AssertionError: the bytes are not the server's framing.
        """
        if b"\r" in data or b"\0" in data:
            raise AssertionError("a CR or NUL in the event stream: this reader only takes the server's LF frames")
        if self._pending:
            data, self._pending = self._pending + data, b""
        blocks = data.split(b"\n\n")
        self._pending = blocks.pop()
        events = []
        match = _EVENT.fullmatch
        for block in blocks:
            m = match(block)
            if m is not None:
                eventID, name, payload = m.groups()
                self.lastEventID = eventID.decode() or None
                events.append((self.lastEventID, name.decode() or None, payload))
                continue
            eventID = name = None
            lines = []
            for line in block.split(b"\n"):
                if not line:
                    continue
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    lines.append(value)
                elif field == b"id":
                    eventID = value.decode()
                elif field == b"event":
                    name = value.decode()
                elif field == b"":
                    self.comments += 1
                elif field == b"retry":
                    if value.isdigit():
                        self.retry = int(value)
                else:
                    raise AssertionError(f"unexpected event stream line {line[:80]!r}")
            if eventID is not None:
                self.lastEventID = eventID or None
            if lines:
                events.append((self.lastEventID, name or None, b"\n".join(lines)))
        return events

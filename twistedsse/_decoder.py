"""
Parse a C{text/event-stream} incrementally, as a browser's C{EventSource}
does.

L{EventStreamDecoder} follows the WHATWG HTML rules for parsing and
interpreting an event stream
(U{https://html.spec.whatwg.org/multipage/server-sent-events.html}). It is
pure, bytes in and L{Event}s out, so the client and every test read a
stream through the same parser.

Each L{Event}'s C{id} is the spec's last event ID buffer when the event is
dispatched, as a browser's C{MessageEvent.lastEventId} is: it is sticky, so
an event sent without an C{id} line carries the previous event's ID.

Intentional divergences:

  - An C{event} field containing NUL has each NUL replaced by U+FFFD. The
    spec allows NUL in event types, but L{Event} refuses it (see
    L{twistedsse._frames}); replacing it keeps the event, and keeps it out
    of the default C{message} type, as a browser would.
  - L{Event.retry} is a convenience the spec does not have: the C{retry}
    value seen in the same block as the event, so that encoding and then
    decoding an event gives it back. The spec's reconnection time is
    L{EventStreamDecoder.retry}.
"""

from __future__ import annotations

import codecs

import attrs

from ._frames import _LINE_BREAK, Event


def _newTextDecoder() -> codecs.IncrementalDecoder:
    # utf-8-sig drops exactly one leading BOM, even one split across chunks,
    # and leaves any later U+FEFF alone, as the spec requires.
    return codecs.getincrementaldecoder("utf-8-sig")(errors="replace")


@attrs.define
class EventStreamDecoder:
    """
    An incremental event stream parser: feed it chunks, get back events.

    Chunks may be split anywhere: inside a UTF-8 sequence, inside the BOM,
    or between the CR and LF of a CRLF. An event that is not ended by a
    blank line before the stream ends is never returned (as in browsers).

    The decoder bounds nothing unless asked. A client reading a stream it
    does not trust should pass C{maxLineLength}, since one endless line
    otherwise grows without limit, and should also bound what it reads in
    all: an endless event made of short C{data} lines is never one long
    line.

    @ivar maxLineLength: the longest line, in characters, to accept; C{None}
        for no limit.
    @ivar lastEventId: the spec's "last event ID string": the ID a
        reconnecting client sends as C{Last-Event-ID}. Like a browser's, it
        is updated when a block ends (even one without data), so an ID in
        an event that never arrived whole is never reported.
    @ivar retry: the reconnection time in milliseconds the server last
        asked for, or C{None} if it never did.
    @ivar comments: how many comment lines have been read, which lets a
        test see keepalives arrive.
    @ivar lastComment: the text of the last comment line, with one leading
        space removed, or C{None} if there has been none.
    """

    maxLineLength: int | None = None
    lastEventId: str = attrs.field(default="", init=False)
    retry: int | None = attrs.field(default=None, init=False)
    comments: int = attrs.field(default=0, init=False)
    lastComment: str | None = attrs.field(default=None, init=False)

    _text: codecs.IncrementalDecoder = attrs.field(factory=_newTextDecoder, init=False)
    _partial: list[str] = attrs.field(factory=list, init=False)
    _partialLength: int = attrs.field(default=0, init=False)
    _afterCR: bool = attrs.field(default=False, init=False)
    _data: list[str] = attrs.field(factory=list, init=False)
    _eventType: str = attrs.field(default="", init=False)
    _idBuffer: str = attrs.field(default="", init=False)
    _blockRetry: int | None = attrs.field(default=None, init=False)

    def feed(self, data: bytes) -> list[Event]:
        """
        Read the next chunk of the stream.

        A CR at the end of a chunk ends its line at once (so a stream using
        bare CRs is not delayed by a chunk), and an LF at the start of the
        next chunk is then skipped as the second half of a CRLF.

        @param data: the next bytes, of any length.
        @return: the events that this chunk completed, in order.
        @raise ValueError: a line is longer than C{maxLineLength}; the
            decoder must not be used after that.
        """
        text = self._text.decode(data)
        if not text:
            return []
        if self._afterCR and text[0] == "\n":
            text = text[1:]
        self._afterCR = text[-1:] == "\r"
        *complete, rest = _LINE_BREAK.split(text)
        if complete:
            if self._partial:
                complete[0] = "".join(self._partial) + complete[0]
                self._partial.clear()
                self._partialLength = 0
            if self.maxLineLength is not None:
                for line in complete:
                    self._checkLength(len(line))
        events = []
        for line in complete:
            event = self._processLine(line)
            if event is not None:
                events.append(event)
        if rest:
            self._partial.append(rest)
            self._partialLength += len(rest)
            if self.maxLineLength is not None:
                self._checkLength(self._partialLength)
        return events

    def _checkLength(self, length: int) -> None:
        """
        Refuse a line over C{maxLineLength} before buffering any more of it.
        """
        limit = self.maxLineLength
        if limit is not None and length > limit:
            raise ValueError(
                f"event stream line of {length} characters is longer than "
                f"maxLineLength={limit!r}"
            )

    def _processLine(self, line: str) -> Event | None:
        """
        Interpret one complete line, returning the event it dispatches.
        """
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments += 1
            comment = line[1:]
            self.lastComment = comment[1:] if comment[:1] == " " else comment
            return None
        field, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._eventType = value
        elif field == "id":
            if "\0" not in value:
                self._idBuffer = value
        elif field == "retry":
            # isdigit() alone would accept non-ASCII digits such as "٣".
            if value.isascii() and value.isdigit():
                self.retry = self._blockRetry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        """
        End the block at a blank line: make its event, if it had data.
        """
        self.lastEventId = self._idBuffer
        data, self._data = self._data, []
        eventType, self._eventType = self._eventType, ""
        retry, self._blockRetry = self._blockRetry, None
        if not data:
            return None
        return Event(
            data="\n".join(data),
            event=eventType.replace("\0", "\ufffd") or None,
            id=self._idBuffer or None,
            retry=retry,
        )

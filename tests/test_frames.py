"""
Tests for L{twistedsse._frames}: exact frames, refusals, and round trips
through L{EventStreamDecoder}.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import (
    TERMINAL_EVENTS,
    Event,
    encodeComment,
    encodeEvent,
    encodeRetry,
)

# Text biased towards the characters that matter to the framing.
_framingText = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(
            ["\r", "\n", "\r\n", "\0", ":", " ", "\ufeff", "\u2028", "\x85"]
        ),
    )
).map("".join)
_fieldValues = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\0"), min_size=1
)
_events = st.builds(
    Event,
    data=_framingText,
    event=st.none() | _fieldValues,
    id=st.none() | _fieldValues,
    retry=st.none() | st.integers(min_value=0, max_value=2**64),
)


def _normalized(event: Event) -> Event:
    """
    The event a browser receives for C{event}: line breaks become LF.
    """
    return Event(
        data=re.sub(r"\r\n|\r", "\n", event.data),
        event=event.event,
        id=event.id,
        retry=event.retry,
    )


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Split C{data} at the given offsets (any order, duplicates allowed).
    """
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def _decodeChunks(chunks: list[bytes]) -> list[Event]:
    decoder = EventStreamDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


class EncodeEventTests(SynchronousTestCase):
    """
    Tests for L{encodeEvent}.
    """

    def test_dataOnly(self) -> None:
        """
        An event with only data is one C{data} line and a blank line.
        """
        self.assertEqual(encodeEvent(Event("hello")), b"data: hello\n\n")

    def test_progressJSON(self) -> None:
        """
        A typical progress event puts C{id}, C{event} and C{data} in that
        order, each with one space after the colon.
        """
        event = Event('{"frame": 120, "percent": 40.0}', event="progress", id="17")
        self.assertEqual(
            encodeEvent(event),
            b'id: 17\nevent: progress\ndata: {"frame": 120, "percent": 40.0}\n\n',
        )

    def test_allFields(self) -> None:
        """
        C{retry} goes after C{event} and before C{data}.
        """
        event = Event("x", event="complete", id="9", retry=3000)
        self.assertEqual(
            encodeEvent(event), b"id: 9\nevent: complete\nretry: 3000\ndata: x\n\n"
        )

    def test_retryZero(self) -> None:
        """
        A reconnection time of zero is sent, not mistaken for no retry.
        """
        self.assertEqual(encodeEvent(Event("x", retry=0)), b"retry: 0\ndata: x\n\n")

    def test_multilineLF(self) -> None:
        """
        Each LF-separated line of data gets its own C{data} line.
        """
        self.assertEqual(
            encodeEvent(Event("a\nb\nc")), b"data: a\ndata: b\ndata: c\n\n"
        )

    def test_multilineMixedBreaks(self) -> None:
        """
        CRLF is one break, and lone CR and lone LF are one break each, so
        C{"\\n\\r"} is two breaks and the empty line between them is kept.
        """
        self.assertEqual(
            encodeEvent(Event("a\r\nb\rc\nd\n\re")),
            b"data: a\ndata: b\ndata: c\ndata: d\ndata: \ndata: e\n\n",
        )

    def test_trailingBreak(self) -> None:
        """
        A trailing line break is an empty last line, so it survives.
        """
        self.assertEqual(encodeEvent(Event("a\n")), b"data: a\ndata: \n\n")

    def test_emptyData(self) -> None:
        """
        Empty data is one empty C{data} line: browsers dispatch an event
        with empty data, where no C{data} line would dispatch nothing.
        """
        self.assertEqual(encodeEvent(Event("")), b"data: \n\n")

    def test_leadingSpace(self) -> None:
        """
        Data starting with a space keeps it: the separator space comes
        first, and a decoder strips only that one.
        """
        self.assertEqual(encodeEvent(Event(" x")), b"data:  x\n\n")

    def test_otherSeparatorsAreNotBreaks(self) -> None:
        """
        Characters that C{str.splitlines} would split on but an event
        stream does not (VT, FF, U+0085, U+2028) stay inside the line.
        """
        data = "a\x0bb\x0cc\x85d\u2028e"
        self.assertEqual(encodeEvent(Event(data)), ("data: " + data + "\n\n").encode())

    def test_unicode(self) -> None:
        """
        The frame is UTF-8.
        """
        self.assertEqual(
            encodeEvent(Event("d\u00e9j\u00e0 \U0001f3ac", event="\u00e9tat")),
            b"event: \xc3\xa9tat\ndata: d\xc3\xa9j\xc3\xa0 \xf0\x9f\x8e\xac\n\n",
        )


class EventValidationTests(SynchronousTestCase):
    """
    L{Event} refuses, at construction, anything it could not send intact.
    """

    def test_breaksInEventAndId(self) -> None:
        """
        CR, LF or NUL anywhere in C{event} or C{id} raises L{ValueError}
        naming the field and showing the value.
        """
        for field in ("event", "id"):
            for char in ("\r", "\n", "\0"):
                value = f"a{char}b"
                with self.assertRaises(ValueError) as raised:
                    Event("x", **{field: value})
                message = str(raised.exception)
                self.assertIn(f"Event.{field}", message)
                self.assertIn(repr(value), message)

    def test_emptyEvent(self) -> None:
        """
        An empty C{event} is refused: the default type is spelled C{None}.
        """
        with self.assertRaises(ValueError) as raised:
            Event("x", event="")
        self.assertIn("Event.event", str(raised.exception))

    def test_emptyId(self) -> None:
        """
        An empty C{id} is refused: an empty C{id} line would reset the
        browser's last event ID.
        """
        with self.assertRaises(ValueError) as raised:
            Event("x", id="")
        self.assertIn("Event.id", str(raised.exception))

    def test_negativeRetry(self) -> None:
        """
        A negative C{retry} raises L{ValueError} showing the value.
        """
        with self.assertRaises(ValueError) as raised:
            Event("x", retry=-1)
        self.assertIn("Event.retry", str(raised.exception))
        self.assertIn("-1", str(raised.exception))

    def test_retryType(self) -> None:
        """
        A C{retry} that is not an C{int}, including a C{bool}, raises
        L{TypeError}.
        """
        for value in (True, False, 1.5, "100"):
            with self.assertRaises(TypeError) as raised:
                Event("x", retry=value)  # type: ignore[arg-type]
            self.assertIn("Event.retry", str(raised.exception))
            self.assertIn(repr(value), str(raised.exception))

    def test_dataType(self) -> None:
        """
        Data that is not a C{str} (bytes, say) raises L{TypeError}.
        """
        with self.assertRaises(TypeError) as raised:
            Event(b"x")  # type: ignore[arg-type]
        self.assertIn("Event.data", str(raised.exception))
        self.assertIn("b'x'", str(raised.exception))

    def test_fieldTypes(self) -> None:
        """
        An C{event} or C{id} that is neither C{str} nor C{None} raises
        L{TypeError}.
        """
        for field in ("event", "id"):
            with self.assertRaises(TypeError) as raised:
                Event("x", **{field: 7})  # type: ignore[arg-type]
            self.assertIn(f"Event.{field}", str(raised.exception))

    def test_anythingInData(self) -> None:
        """
        Data may hold any text, line breaks and NUL included.
        """
        self.assertEqual(Event("\r\n\0").data, "\r\n\0")


class EncodeCommentTests(SynchronousTestCase):
    """
    Tests for L{encodeComment}.
    """

    def test_comment(self) -> None:
        """
        A comment is a C{:} line and a blank line.
        """
        self.assertEqual(encodeComment("keepalive"), b": keepalive\n\n")

    def test_empty(self) -> None:
        """
        The default comment is empty.
        """
        self.assertEqual(encodeComment(), b": \n\n")

    def test_lineBreaks(self) -> None:
        """
        Each line of the text is its own comment line, so text that looks
        like fields stays a comment.
        """
        frame = encodeComment("a\r\nevent: complete\rdata: x\n\nid: 5")
        self.assertEqual(
            frame, b": a\n: event: complete\n: data: x\n: \n: id: 5\n\n"
        )
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(frame), [])
        self.assertEqual((decoder.comments, decoder.lastComment), (5, "id: 5"))
        self.assertEqual(decoder.lastEventId, "")


class EncodeRetryTests(SynchronousTestCase):
    """
    Tests for L{encodeRetry}.
    """

    def test_retry(self) -> None:
        """
        A retry frame is one C{retry} line and a blank line; it sets the
        reconnection time without dispatching an event.
        """
        frame = encodeRetry(2500)
        self.assertEqual(frame, b"retry: 2500\n\n")
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(frame), [])
        self.assertEqual(decoder.retry, 2500)

    def test_refused(self) -> None:
        """
        A negative value raises L{ValueError}; a C{bool} raises
        L{TypeError}.
        """
        self.assertRaises(ValueError, encodeRetry, -5)
        self.assertRaises(TypeError, encodeRetry, True)


class TerminalEventsTests(SynchronousTestCase):
    """
    Tests for L{TERMINAL_EVENTS}.
    """

    def test_noError(self) -> None:
        """
        The terminal types are C{complete}, C{failed} and C{cancelled};
        none is C{error}, which would collide with C{EventSource}'s own
        connection error event.
        """
        self.assertEqual(TERMINAL_EVENTS, {"complete", "failed", "cancelled"})
        self.assertNotIn("error", TERMINAL_EVENTS)


class RoundTripTests(SynchronousTestCase):
    """
    Whatever L{encodeEvent} sends, L{EventStreamDecoder} reads back as the
    same one event.
    """

    @given(_events)
    def test_roundTrip(self, event: Event) -> None:
        """
        Decoding an encoded event gives exactly that event, with CRLF and
        CR in its data turned into LF.
        """
        self.assertEqual(
            EventStreamDecoder().feed(encodeEvent(event)), [_normalized(event)]
        )

    @settings(deadline=None)
    @given(_events, st.lists(st.integers(min_value=0)))
    def test_roundTripSplit(self, event: Event, cuts: list[int]) -> None:
        """
        The round trip holds however the frame is split into chunks.
        """
        self.assertEqual(
            _decodeChunks(_chunks(encodeEvent(event), cuts)), [_normalized(event)]
        )

    @settings(deadline=None)
    @given(_events)
    def test_roundTripByteByByte(self, event: Event) -> None:
        """
        The round trip holds when the frame arrives one byte at a time.
        """
        frame = encodeEvent(event)
        chunks = [frame[i : i + 1] for i in range(len(frame))]
        self.assertEqual(_decodeChunks(chunks), [_normalized(event)])

    @given(st.lists(st.one_of(_events, _framingText.map(encodeComment))))
    def test_streamRoundTrip(self, items: list[Event | bytes]) -> None:
        """
        A stream of events and comments decodes to the events in order;
        an event sent without an C{id} carries the last one sent, as in
        browsers.
        """
        stream = b"".join(
            encodeEvent(item) if isinstance(item, Event) else item for item in items
        )
        expected = []
        lastId = None
        for item in items:
            if isinstance(item, Event):
                lastId = item.id or lastId
                sent = Event(item.data, item.event, lastId, item.retry)
                expected.append(_normalized(sent))
        self.assertEqual(EventStreamDecoder().feed(stream), expected)

    @given(_framingText, st.none() | _fieldValues)
    def test_noInjection(self, data: str, eventType: str | None) -> None:
        """
        No data can add an event, a field, or change the event type: the
        decoder sees one event of the type given and no id or retry.
        """
        decoder = EventStreamDecoder()
        events = decoder.feed(encodeEvent(Event(data, event=eventType)))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0].event, eventType)
        self.assertEqual((events[0].id, events[0].retry), (None, None))
        self.assertEqual(
            (decoder.lastEventId, decoder.retry, decoder.comments), ("", None, 0)
        )

    def test_hostileData(self) -> None:
        """
        Data that spells out blank lines, fields and comments is still one
        event's data.
        """
        for data in [
            "x\n\nevent: complete\ndata: y",
            "\r\rid: 5",
            "\r\n\r\nretry: 1\r\n\r\n",
            "x\n: comment\nevent: failed\n\n",
            "\n",
            "\r\n",
            "\r",
        ]:
            decoder = EventStreamDecoder()
            events = decoder.feed(encodeEvent(Event(data, event="progress")))
            self.assertEqual(
                events, [Event(re.sub(r"\r\n|\r", "\n", data), event="progress")], data
            )
            self.assertEqual((decoder.lastEventId, decoder.retry), ("", None))

"""
Tests for L{twistedsse._decoder.EventStreamDecoder}, mostly the WHATWG
interpretation rules as exercised by the web-platform-tests
C{eventsource/format-*} cases.
"""

from __future__ import annotations

from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import Event

_LONG = b"x" * 2048

# (what it shows, the stream, the events it dispatches)
VECTORS: list[tuple[str, bytes, list[Event]]] = [
    (
        "a leading BOM is dropped; a BOM later makes an unknown field",
        b"\xef\xbb\xbfdata:1\n\n\xef\xbb\xbfdata:2\n\ndata:3\n\n",
        [Event("1"), Event("3")],
    ),
    (
        "of two leading BOMs only the first is dropped",
        b"\xef\xbb\xbf\xef\xbb\xbfdata:1\n\ndata:2\n\ndata:3\n\n",
        [Event("2"), Event("3")],
    ),
    ("LF line endings", b"data:a\ndata:b\n\n", [Event("a\nb")]),
    ("CR line endings", b"data:a\rdata:b\r\r", [Event("a\nb")]),
    ("CRLF line endings", b"data:a\r\ndata:b\r\n\r\n", [Event("a\nb")]),
    ("mixed line endings", b"data:a\r\ndata:b\rdata:c\n\r\n", [Event("a\nb\nc")]),
    (
        "LF then CR is two line endings",
        b"data:a\n\rdata:b\n\n",
        [Event("a"), Event("b")],
    ),
    (
        "CR then CRLF is two line endings",
        b"data:a\r\r\ndata:b\n\n",
        [Event("a"), Event("b")],
    ),
    (
        "other Unicode line separators are not line endings",
        b"data:a\xe2\x80\xa8b\xc2\x85c\x0bd\x0ce\n\n",
        [Event("a\u2028b\x85c\x0bd\x0ce")],
    ),
    (
        "comments anywhere are ignored (format-comments)",
        b"data:1\r:\0\n:\r\ndata:2\n:" + _LONG + b"\rdata:3\n:data:fail\r:" + _LONG
        + b"\ndata:4\n\n",
        [Event("1\n2\n3\n4")],
    ),
    (
        "field names are exact and case-sensitive (format-field-parsing)",
        b"data:\0\ndata:  2\rData:1\ndata\0:2\ndata:1\r\0data:4\nda-ta:3\rdata_5\n"
        b"data:3\rdata:\r\n data:32\ndata:4\n\n",
        [Event("\0\n 2\n1\n3\n\n4")],
    ),
    (
        "data with only a colon, or no colon, is an empty line (format-field-data)",
        b"data:\n\ndata\ndata\n\ndata:test\n\n",
        [Event(""), Event("\n"), Event("test")],
    ),
    ("one space after the colon is stripped", b"data: x\n\n", [Event("x")]),
    ("no space after the colon is fine", b"data:x\n\n", [Event("x")]),
    ("only one space is stripped", b"data:  x\n\n", [Event(" x")]),
    ("a tab is not stripped", b"data:\tx\n\n", [Event("\tx")]),
    ("the value runs from the first colon", b"data:a: b:c\n\n", [Event("a: b:c")]),
    ("empty data lines join with LF", b"data:a\ndata:\ndata:b\n\n", [Event("a\n\nb")]),
    ("NUL in data is data (format-null-character)", b"data:\0\n\n", [Event("\0")]),
    ("UTF-8 data (format-utf-8)", b"data:ok\xe2\x80\xa6\n\n", [Event("ok\u2026")]),
    ("blank lines alone dispatch nothing", b"\n\r\n\r\n\n", []),
    ("a comment block dispatches nothing", b": hi\n\n", []),
    (
        "an event field sets the type, reset after dispatch (format-field-event)",
        b"event:test\ndata:x\n\ndata:x\n\n",
        [Event("x", event="test"), Event("x")],
    ),
    (
        "the type is reset by a block without data too",
        b"event:test\n\ndata:y\n\n",
        [Event("y")],
    ),
    (
        "an empty event field is the default type",
        b"event: \ndata:data\n\n",
        [Event("data")],
    ),
    (
        "the last event field wins",
        b"event:a\nevent:b\ndata:x\n\n",
        [Event("x", event="b")],
    ),
    (
        "NUL in an event type becomes U+FFFD (divergence)",
        b"event:a\0b\ndata:x\n\n",
        [Event("x", event="a\ufffdb")],
    ),
    ("unknown fields are ignored", b"foo:bar\nDATA:x\nfoo\ndata:y\n\n", [Event("y")]),
    (
        "retry with digits sets it, bogus retry is ignored (format-field-retry-bogus)",
        b"retry:2000\nretry:1000x\ndata:x\n\n",
        [Event("x", retry=2000)],
    ),
    (
        "retry must be all ASCII digits",
        b"retry:\nretry\nretry:-1\nretry:1.5\nretry:0x1\nretry: 1 \nretry:  1\n"
        b"retry:\xd9\xa3\nretry:\xc2\xb2\ndata:x\n\n",
        [Event("x")],
    ),
    (
        "retry is decimal, leading zeros allowed",
        b"retry: 011\ndata:x\n\n",
        [Event("x", retry=11)],
    ),
    (
        "the event retry is only this block's",
        b"retry:5\ndata:a\n\ndata:b\n\n",
        [Event("a", retry=5), Event("b")],
    ),
    (
        "an id persists until the next id (format-field-id-3, persists)",
        b"id: 1\ndata: 1\n\ndata:2\n\n",
        [Event("1", id="1"), Event("2", id="1")],
    ),
    (
        "an id changes and persists (format-field-id-3)",
        b"id: 1\ndata: 1\n\nid: 2\ndata:2\n\ndata:3\n\n",
        [Event("1", id="1"), Event("2", id="2"), Event("3", id="2")],
    ),
    (
        "an empty id resets it (format-field-id-3, resets)",
        b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n",
        [Event("1", id="1"), Event("2"), Event("3")],
    ),
    (
        "an id with no colon resets it",
        b"id:1\ndata:a\n\nid\ndata:b\n\n",
        [Event("a", id="1"), Event("b")],
    ),
    (
        "an id containing NUL is ignored (format-field-id-null)",
        b"id:1\ndata:a\n\nid:2\x003\ndata:b\n\nid:\0\0\ndata:c\n\n",
        [Event("a", id="1"), Event("b", id="1"), Event("c", id="1")],
    ),
    (
        "an id set in a block without data still applies (format-field-id)",
        b"id:7\n\ndata:a\n\n",
        [Event("a", id="7")],
    ),
    (
        "an unfinished last event is discarded (format-data-before-final-empty-line)",
        b"retry:1000\ndata:test1\n\nid:test\ndata:test2",
        [Event("test1", retry=1000)],
    ),
    ("a single LF does not end an event", b"data:a\n\ndata:b\n", [Event("a")]),
    ("a single CR does not end an event", b"data:a\r\rdata:b\r", [Event("a")]),
]


def _decode(chunks: list[bytes]) -> list[Event]:
    """
    Feed C{chunks} to a new decoder and return every event it dispatches.
    """
    decoder = EventStreamDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def _splitBetweenCRLF(stream: bytes) -> list[bytes]:
    """
    Split C{stream} between the CR and LF of every CRLF.
    """
    chunks = []
    start = 0
    crlf = stream.find(b"\r\n")
    while crlf != -1:
        chunks.append(stream[start : crlf + 1])
        start = crlf + 1
        crlf = stream.find(b"\r\n", start)
    chunks.append(stream[start:])
    return chunks


class VectorTests(SynchronousTestCase):
    """
    The table of WHATWG and web-platform-tests vectors, fed in different
    chunkings.
    """

    def assertVectors(self, chunking: Callable[[bytes], list[bytes]]) -> None:
        """
        Assert that every vector, split into chunks by C{chunking}, gives
        its events.
        """
        for name, stream, expected in VECTORS:
            self.assertEqual(_decode(chunking(stream)), expected, name)

    def test_whole(self) -> None:
        """
        Each vector fed in one chunk gives its events.
        """
        self.assertVectors(lambda stream: [stream])

    def test_byteByByte(self) -> None:
        """
        Each vector fed one byte at a time gives the same events.
        """
        self.assertVectors(lambda stream: [bytes([byte]) for byte in stream])

    def test_splitBetweenCRLF(self) -> None:
        """
        Splitting a chunk between the CR and LF of a CRLF does not make
        two line endings.
        """
        self.assertVectors(_splitBetweenCRLF)

    def test_everyTwoPieceSplit(self) -> None:
        """
        Each vector split in two at any offset gives the same events.
        """
        for name, stream, expected in VECTORS:
            for i in range(len(stream) + 1):
                self.assertEqual(_decode([stream[:i], stream[i:]]), expected, (name, i))


class DecoderTests(SynchronousTestCase):
    """
    Tests for L{EventStreamDecoder} beyond the event table: its state,
    chunk boundaries and text decoding.
    """

    def test_splitHelper(self) -> None:
        """
        The CRLF splitting helper used by L{VectorTests} really splits
        between CR and LF and loses nothing.
        """
        self.assertEqual(_splitBetweenCRLF(b"a\r\nb\r\n"), [b"a\r", b"\nb\r", b"\n"])

    def test_multibyteSplit(self) -> None:
        """
        A UTF-8 sequence split across chunks, at any byte, decodes whole.
        """
        stream = "data: \U0001f3ac\u2026\u00e9\n\n".encode()
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                self.assertEqual(
                    _decode([stream[:i], stream[i:j], stream[j:]]),
                    [Event("\U0001f3ac\u2026\u00e9")],
                    (i, j),
                )

    def test_invalidUTF8(self) -> None:
        """
        Bytes that are not UTF-8 become U+FFFD, one per maximal invalid
        subsequence, and the rest of the line survives.
        """
        self.assertEqual(
            _decode([b"data:\xff\xfe|\xe2\x80x|\xc3\n\n"]),
            [Event("\ufffd\ufffd|\ufffdx|\ufffd")],
        )

    def test_invalidUTF8Split(self) -> None:
        """
        An invalid sequence split across chunks is still one U+FFFD.
        """
        self.assertEqual(_decode([b"data:\xe2", b"\x80", b"x\n\n"]), [Event("\ufffdx")])

    def test_bomSplit(self) -> None:
        """
        A leading BOM split across chunks is still dropped.
        """
        self.assertEqual(_decode([b"\xef", b"\xbb", b"\xbfdata:1\n\n"]), [Event("1")])

    def test_bomOnlyAtStart(self) -> None:
        """
        A BOM after the first chunk of text is not dropped, even if it
        starts a chunk.
        """
        self.assertEqual(
            _decode([b"data:1\n\n", b"\xef\xbb\xbfdata:2\n\ndata:3\n\n"]),
            [Event("1"), Event("3")],
        )

    def test_crDispatchesAtOnce(self) -> None:
        """
        A CR ending a chunk ends its line at once: a stream using bare CRs
        gets each event without waiting for the next chunk, and an LF
        starting the next chunk is the rest of that CRLF.
        """
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(b"data:a\r\r"), [Event("a")])
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertEqual(decoder.feed(b"data:b\r"), [])
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertEqual(decoder.feed(b"\r"), [Event("b")])
        self.assertEqual(decoder.feed(b"\ndata:c\n\n"), [Event("c")])

    def test_crThenEmptyChunk(self) -> None:
        """
        An empty chunk between a CR and its LF does not make the LF a
        second line ending, nor does a chunk that is only an LF forget
        that the next chunk no longer follows a CR.
        """
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(b"data:a\r"), [])
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertEqual(decoder.feed(b"\n"), [Event("a")])

    def test_severalEventsInOneChunk(self) -> None:
        """
        One chunk can complete several events; they come back in order.
        """
        self.assertEqual(
            EventStreamDecoder().feed(b"data:1\n\ndata:2\n\ndata:3\n\ndata:4"),
            [Event("1"), Event("2"), Event("3")],
        )

    def test_comments(self) -> None:
        """
        Comment lines are counted and the last one's text, without one
        leading space, is kept, so a test can see keepalives arrive.
        """
        decoder = EventStreamDecoder()
        self.assertEqual((decoder.comments, decoder.lastComment), (0, None))
        self.assertEqual(decoder.feed(b": keepalive 1\n\n:keepalive 2\n"), [])
        self.assertEqual((decoder.comments, decoder.lastComment), (2, "keepalive 2"))
        self.assertEqual(decoder.feed(b":\n\n"), [])
        self.assertEqual((decoder.comments, decoder.lastComment), (3, ""))

    def test_commentInsideEvent(self) -> None:
        """
        A comment inside an event does not end or change it.
        """
        self.assertEqual(
            EventStreamDecoder().feed(b"event:e\ndata:a\n: ping\ndata:b\n\n"),
            [Event("a\nb", event="e")],
        )

    def test_retryState(self) -> None:
        """
        C{retry} is the last valid reconnection time, kept across events
        and set by a block without data.
        """
        decoder = EventStreamDecoder()
        self.assertIsNone(decoder.retry)
        self.assertEqual(decoder.feed(b"retry: 2500\n\n"), [])
        self.assertEqual(decoder.retry, 2500)
        self.assertEqual(decoder.feed(b"retry: soon\ndata:x\n\n"), [Event("x")])
        self.assertEqual(decoder.retry, 2500)
        decoder.feed(b"retry:0\n")
        self.assertEqual(decoder.retry, 0)

    def test_lastEventIdAtBlockEnd(self) -> None:
        """
        C{lastEventId} changes when a block ends, not when its C{id} line
        is read: the ID of an event cut off mid-way is never reported, so
        a reconnecting client does not skip that event.
        """
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.lastEventId, "")
        decoder.feed(b"id: 6\ndata: x\n\nid: 7\ndata: y\n")
        self.assertEqual(decoder.lastEventId, "6")
        decoder.feed(b"\n")
        self.assertEqual(decoder.lastEventId, "7")

    def test_lastEventIdWithoutData(self) -> None:
        """
        A block with an C{id} and no data sets C{lastEventId} (the spec's
        dispatch sets it before checking for data); an empty C{id} resets
        it.
        """
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(b"id: 8\n\n"), [])
        self.assertEqual(decoder.lastEventId, "8")
        self.assertEqual(decoder.feed(b"id\n\n"), [])
        self.assertEqual(decoder.lastEventId, "")

    def test_maxLineLength(self) -> None:
        """
        With C{maxLineLength}, a line of that many characters is read and
        a longer one raises L{ValueError}, whether it arrives whole or a
        piece at a time.
        """
        line = b"data:" + b"x" * 5
        atLimit = EventStreamDecoder(maxLineLength=10)
        self.assertEqual(atLimit.feed(line + b"\n\n"), [Event("xxxxx")])
        for stream in (line + b"\n\n", line):
            overLimit = EventStreamDecoder(maxLineLength=9)
            self.assertRaises(ValueError, overLimit.feed, stream)
        decoder = EventStreamDecoder(maxLineLength=9)
        for byte in line[:9]:
            decoder.feed(bytes([byte]))
        with self.assertRaises(ValueError) as raised:
            decoder.feed(b"x")
        self.assertIn("maxLineLength=9", str(raised.exception))

    def test_maxLineLengthCountsWholeLine(self) -> None:
        """
        The limit applies to a line assembled from several chunks even
        when the chunk that ends it is short.
        """
        decoder = EventStreamDecoder(maxLineLength=9)
        decoder.feed(b"data:xxxx")
        self.assertRaises(ValueError, decoder.feed, b"x\n")

    def test_noLimitByDefault(self) -> None:
        """
        Without C{maxLineLength} a long line is read whole.
        """
        data = "x" * 100_000
        stream = f"data:{data}\n\n".encode()
        self.assertEqual(EventStreamDecoder().feed(stream), [Event(data)])

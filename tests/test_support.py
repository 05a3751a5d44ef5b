"""
The test toolkit (L{tests._support}) is itself tested: the load clients'
L{FrameReader} returns what L{EventStreamDecoder} returns (or refuses);
the chunk decoder undoes chunked framing however the bytes are cut; the
percentile is the nearest rank; and waiting never outlasts its deadline,
even on a process that says nothing.
"""

from __future__ import annotations

import os
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import Event, encodeComment, encodeEvent, encodeRetry

from tests._support.chunked import Dechunker, chunks
from tests._support.frames import FrameReader
from tests._support.launcher import Launched
from tests._support.stats import percentile, summary
from tests._support.waiting import PipeReader, TimedOut, poll, waitUntil, whenTrue


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def decoded(pieces: list[bytes]) -> tuple[list[tuple[str | None, str | None, str]], int | None]:
    decoder = EventStreamDecoder()
    events = [(e.id, e.event, e.data) for piece in pieces for e in decoder.feed(piece)]
    return events, decoder.retry


def read(pieces: list[bytes]) -> tuple[list[tuple[str | None, str | None, str]], int | None]:
    reader = FrameReader()
    events = [(i, n, d.decode()) for piece in pieces for i, n, d in reader.feed(piece)]
    return events, reader.retry


# What the server writes: events (every one with an id, as the server
# gives them), keepalive comments, retry.
_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), min_size=1, max_size=8)
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\0"), max_size=30)
serverFrames = st.lists(
    st.one_of(
        st.builds(
            lambda data, event, i: encodeEvent(Event(data=data, event=event, id=str(i))),
            _text, st.none() | _name, st.integers(0, 10**6),
        ),
        st.builds(lambda t: encodeComment(t), st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), max_size=10)),
        st.builds(encodeRetry, st.integers(0, 10**6)),
    ),
    max_size=12,
).map(b"".join)  # fmt: skip

# Any stream: field lines (data, id, event, retry, comments, unknown
# fields), blank lines, any line end, maybe a BOM.
_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=10)
_line = st.one_of(
    st.tuples(st.sampled_from(["data"] * 4 + ["id"] * 3 + ["event"] * 3 + ["retry"] * 2 + ["", "", "foo", "Data"]),
              st.sampled_from([":", ": ", ":  ", ""]), _value | st.from_regex(r"\A[0-9]{1,4}\Z")),
    st.just(("", "", "")),
).map("".join)  # fmt: skip
_end = st.sampled_from(["\n"] * 30 + ["\r", "\r\n"])
anyStream = st.tuples(
    st.integers(0, 9), st.lists(st.tuples(_line, _end), max_size=20)
).map(lambda t: ("\ufeff" if t[0] == 0 else "").encode() + "".join(line + end for line, end in t[1]).encode())


class FrameReaderTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(serverFrames, st.lists(st.integers(0, 10**6), max_size=8))
    def test_agreesOnServerStreams(self, stream: bytes, cuts: list[int]) -> None:
        """
        On what the server writes (events, comments, retry), cut anywhere,
        L{FrameReader} returns the same events (id, type, data) and retry
        as L{EventStreamDecoder}, and never refuses.
        """
        pieces = cut(stream, cuts)
        self.assertEqual(read(pieces), decoded(pieces))

    @settings(max_examples=500, deadline=None)
    @given(anyStream, st.lists(st.integers(0, 10**6), max_size=8))
    def test_refusesOrAgrees(self, stream: bytes, cuts: list[int]) -> None:
        """
        On any stream (CR, LF or CRLF line ends, a BOM, comments, ids,
        retry, multi-line data, unknown fields), cut anywhere,
        L{FrameReader} either refuses it or returns what
        L{EventStreamDecoder} returns: it never misreads. (The streams end
        with a blank line: the decoder takes a C{retry} as its line ends,
        FrameReader as its block ends.)
        """
        pieces = cut(stream + b"\n\n", cuts)
        try:
            got = read(pieces)
        except AssertionError:
            return
        self.assertEqual(got, decoded(pieces))

    def test_refusesCR(self) -> None:
        """
        CR line ends (which the server never writes) are refused, not
        misread.
        """
        self.assertRaises(AssertionError, FrameReader().feed, b"data: a\r\n\r\n")


class DechunkerTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=8), st.binary(max_size=10),
           st.lists(st.integers(0, 10**6), max_size=8))  # fmt: skip
    def test_anyCut(self, payloads: list[bytes], after: bytes, cuts: list[int]) -> None:
        """
        Chunked framing, cut anywhere, gives back each chunk's payload
        whole, the end, and what came after the last chunk.
        """
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n" + after
        dechunker = Dechunker()
        got = [c for piece in cut(wire, cuts) for c in dechunker.chunks(piece)]
        self.assertEqual((got, dechunker.ended, dechunker.rest), (payloads, True, after))

    def test_openBody(self) -> None:
        """
        A body still open gives its whole chunks; a partial one waits.
        """
        self.assertEqual(chunks(b"3\r\nabc\r\n5;ext=1\r\nde"), [b"abc"])

    def test_missingCRLF(self) -> None:
        """
        A chunk not followed by CRLF is an error, not data.
        """
        self.assertRaises(AssertionError, Dechunker().feed, b"3\r\nabcX\r\n")


class PercentileTests(SynchronousTestCase):
    def test_nearestRank(self) -> None:
        """
        The nearest rank: the smallest value with at least C{q} of them at
        or below it.
        """
        values = [float(v) for v in range(1, 21)]
        self.assertEqual(percentile(values, 0.95), 19.0)
        self.assertEqual(percentile(values, 0.5), 10.0)
        self.assertEqual(percentile(values, 1.0), 20.0)
        self.assertEqual(percentile([3.0], 0.99), 3.0)
        self.assertEqual(summary([2.0, 1.0]), "n=2 p50=1.00ms p95=2.00ms max=2.00ms")

    @given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0.01, 1.0))
    def test_definition(self, values: list[float], q: float) -> None:
        """
        It is a measured value; at least C{q} of the values are at or
        below it, and fewer are below it.
        """
        p = percentile(values, q)
        n = len(values)
        self.assertIn(p, values)
        self.assertGreaterEqual(sum(v <= p for v in values), q * n - 1e-9)
        self.assertLess(sum(v < p for v in values), q * n)


class WaitingTests(SynchronousTestCase):
    def test_pollReturnsTheValue(self) -> None:
        """
        L{poll} returns the first true value, at once if there is one.
        """
        self.assertEqual(poll(lambda: 7, 10), 7)

    def test_waitUntilTimesOut(self) -> None:
        """
        L{waitUntil} fails after its timeout, naming what it waited for.
        """
        began = time.monotonic()
        error = self.assertRaises(TimedOut, waitUntil, lambda: False, 0.05, lambda: "a thing", 0.01)
        self.assertLess(time.monotonic() - began, 2)
        self.assertIn("a thing", str(error))

    def test_whenTrueOnTheClock(self) -> None:
        """
        L{whenTrue} checks on the clock it is given and fails at its
        deadline.
        """
        clock = Clock()
        box: list[int] = []
        d = whenTrue(clock, lambda: box, 1.0, "box")
        clock.advance(0.5)
        box.append(1)
        clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), [1])
        d = whenTrue(clock, lambda: False, 1.0, "never")
        clock.pump([0.01] * 101)
        self.failureResultOf(d, TimedOut)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_silentPipe(self) -> None:
        """
        Reading a pipe nobody writes to returns at the deadline (the hang
        C{readline()} had).
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        reader = PipeReader(read)
        began = time.monotonic()
        self.assertIsNone(reader.readLine(0.1))
        self.assertLess(time.monotonic() - began, 2)
        os.write(write, b"READY\nmore")
        self.assertEqual(reader.readLine(1), b"READY\n")
        self.assertEqual(reader.output, b"more")

    def test_silentProcessFailsWithItsOutput(self) -> None:
        """
        A launched process that never says it is ready fails the wait at
        the deadline, with what it did say, and is stopped.
        """
        launched = Launched([sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"])
        self.addCleanup(launched.stop)
        began = time.monotonic()
        error = self.assertRaises(TimedOut, launched.waitFor, lambda out: b"READY" in out, 1.0, "start")
        self.assertLess(time.monotonic() - began, 10)
        self.assertIn("starting", str(error))
        self.assertIsNotNone(launched.process.poll())

"""
Tests for L{twistedsse._lines}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._errors import RenderProtocolError
from twistedsse._lines import LineBuffer

SAMPLE = b"frame=1\nfps=2.5\r\n\r\nlone\rcr\nspeed= 2.8x\nprogress=end\ntail"
SAMPLE_LINES = [b"frame=1", b"fps=2.5", b"", b"lone\rcr", b"speed= 2.8x", b"progress=end"]


def feedAll(buffer: LineBuffer, chunks: list[bytes]) -> list[bytes]:
    lines = []
    for chunk in chunks:
        lines.extend(buffer.feed(chunk))
    return lines


class SplittingTests(SynchronousTestCase):
    """
    L{LineBuffer.feed} returns complete lines, however the stream is cut.
    """

    def test_wholeChunk(self) -> None:
        """
        One chunk gives every LF-terminated line, in order, and keeps the
        unterminated tail for L{LineBuffer.end}.
        """
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(SAMPLE), SAMPLE_LINES)
        self.assertEqual(buffer.end(), [b"tail"])

    def test_everySplitPosition(self) -> None:
        """
        Cutting the stream into two chunks at any byte position, including
        between a CR and its LF, gives the same lines.
        """
        for position in range(len(SAMPLE) + 1):
            buffer = LineBuffer()
            lines = feedAll(buffer, [SAMPLE[:position], SAMPLE[position:]])
            self.assertEqual((position, lines), (position, SAMPLE_LINES))
            self.assertEqual(buffer.end(), [b"tail"])

    def test_everyPairOfSplitPositions(self) -> None:
        """
        Cutting the stream into three chunks anywhere gives the same lines.
        """
        for first in range(len(SAMPLE) + 1):
            for second in range(first, len(SAMPLE) + 1):
                buffer = LineBuffer()
                chunks = [SAMPLE[:first], SAMPLE[first:second], SAMPLE[second:]]
                self.assertEqual(feedAll(buffer, chunks), SAMPLE_LINES)
                self.assertEqual(buffer.end(), [b"tail"])

    def test_oneByteAtATime(self) -> None:
        """
        Feeding one byte per call gives the same lines.
        """
        buffer = LineBuffer()
        chunks = [SAMPLE[i : i + 1] for i in range(len(SAMPLE))]
        self.assertEqual(feedAll(buffer, chunks), SAMPLE_LINES)
        self.assertEqual(buffer.end(), [b"tail"])

    def test_emptyChunk(self) -> None:
        """
        An empty chunk completes nothing and changes nothing.
        """
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b"ab"), [])
        self.assertEqual(buffer.feed(b""), [])
        self.assertEqual(buffer.feed(b"c\n"), [b"abc"])

    def test_crlf(self) -> None:
        """
        One CR just before the LF is dropped; a lone CR, or a second CR,
        is data.
        """
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b"a\r\nb\r\r\nc\rd\n\r\n"), [b"a", b"b\r", b"c\rd", b""])

    def test_manySmallLines(self) -> None:
        """
        A chunk of many short lines is split into all of them.
        """
        buffer = LineBuffer()
        data = b"".join(b"line%d\n" % i for i in range(10000))
        lines = buffer.feed(data)
        self.assertEqual(len(lines), 10000)
        self.assertEqual(lines[-1], b"line9999")

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
    def test_anyChunking(self, data: bytes, cuts: list[int]) -> None:
        """
        For any bytes cut anywhere, the lines are those of C{data.split}
        with one trailing CR removed, and L{LineBuffer.end} gives the rest.
        """
        positions = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
        chunks = [data[a:b] for a, b in zip(positions, positions[1:])]
        *expected, tail = data.split(b"\n")
        expected = [line[:-1] if line.endswith(b"\r") else line for line in expected]
        tail = tail[:-1] if tail.endswith(b"\r") else tail
        buffer = LineBuffer()
        self.assertEqual(feedAll(buffer, chunks), expected)
        self.assertEqual(buffer.end(), [tail] if tail else [])


class LimitTests(SynchronousTestCase):
    """
    L{LineBuffer} refuses a line longer than C{maxLength}, as soon as it
    can tell.
    """

    def test_exactlyAtLimit(self) -> None:
        """
        A line of exactly C{maxLength} bytes is accepted, with LF or CRLF,
        and so is an unterminated one at L{LineBuffer.end}.
        """
        buffer = LineBuffer(maxLength=10)
        self.assertEqual(buffer.feed(b"x" * 10 + b"\n"), [b"x" * 10])
        self.assertEqual(buffer.feed(b"y" * 10 + b"\r"), [])
        self.assertEqual(buffer.feed(b"\n"), [b"y" * 10])
        self.assertEqual(buffer.feed(b"z" * 10), [])
        self.assertEqual(buffer.end(), [b"z" * 10])

    def test_completeLineOverLimit(self) -> None:
        """
        A complete line one byte over the limit raises
        L{RenderProtocolError} naming the limit.
        """
        buffer = LineBuffer(maxLength=10)
        error = self.assertRaises(RenderProtocolError, buffer.feed, b"ok\n" + b"x" * 11 + b"\nok\n")
        self.assertEqual(str(error), "line longer than 10 bytes")

    def test_tailOverLimit(self) -> None:
        """
        An unterminated tail raises as soon as it passes the limit, before
        any LF arrives.
        """
        buffer = LineBuffer(maxLength=10)
        self.assertEqual(buffer.feed(b"x" * 10), [])
        self.assertRaises(RenderProtocolError, buffer.feed, b"x")

    def test_tailOverLimitByACR(self) -> None:
        """
        A tail one byte over the limit is kept if that byte is a CR (its LF
        may follow), and refused once anything but a LF follows it.
        """
        buffer = LineBuffer(maxLength=10)
        self.assertEqual(buffer.feed(b"x" * 10 + b"\r"), [])
        self.assertRaises(RenderProtocolError, buffer.feed, b"x")

    def test_hugeLineInChunks(self) -> None:
        """
        A 10 MiB line fed in 64 KiB chunks raises on the second chunk,
        the first to take the tail past the 64 KiB default limit: memory
        never holds more than the limit plus a chunk.
        """
        buffer = LineBuffer()
        chunk = b"x" * 65536
        fed = 0
        with self.assertRaises(RenderProtocolError) as raised:
            for _ in range(160):
                fed += 1
                buffer.feed(chunk)
        self.assertEqual(fed, 2)
        self.assertEqual(str(raised.exception), "line longer than 65536 bytes")

    def test_hugeLineInOneChunk(self) -> None:
        """
        A single chunk holding an over-long line, terminated or not,
        raises.
        """
        self.assertRaises(RenderProtocolError, LineBuffer(maxLength=100).feed, b"x" * 1000)
        self.assertRaises(RenderProtocolError, LineBuffer(maxLength=100).feed, b"x" * 1000 + b"\n")

    def test_failedStaysFailed(self) -> None:
        """
        Once a line is refused the stream has lost its framing: later
        calls to C{feed} and C{end} raise too instead of resynchronising.
        """
        buffer = LineBuffer(maxLength=4)
        self.assertRaises(RenderProtocolError, buffer.feed, b"xxxxxx")
        self.assertRaises(RenderProtocolError, buffer.feed, b"\nok\n")
        self.assertRaises(RenderProtocolError, buffer.end)


class EndTests(SynchronousTestCase):
    """
    L{LineBuffer.end} returns what is left when the stream closes.
    """

    def test_nothingLeft(self) -> None:
        """
        After a complete line, or nothing at all, there is no final line.
        """
        buffer = LineBuffer()
        self.assertEqual(buffer.end(), [])
        buffer.feed(b"a\n")
        self.assertEqual(buffer.end(), [])

    def test_finalLine(self) -> None:
        """
        An unterminated final line is returned, without a trailing CR.
        """
        buffer = LineBuffer()
        buffer.feed(b"a\nb")
        buffer.feed(b"c\r")
        self.assertEqual(buffer.end(), [b"bc"])

    def test_loneCR(self) -> None:
        """
        A final line that is only a CR is empty, so nothing is returned.
        """
        buffer = LineBuffer()
        buffer.feed(b"a\n\r")
        self.assertEqual(buffer.end(), [])

    def test_resets(self) -> None:
        """
        After C{end} the buffer is empty and can be used again.
        """
        buffer = LineBuffer()
        buffer.feed(b"partial")
        self.assertEqual(buffer.end(), [b"partial"])
        self.assertEqual(buffer.end(), [])
        self.assertEqual(buffer.feed(b"new\n"), [b"new"])

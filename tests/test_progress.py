"""
Tests for L{twistedsse._progress}.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistedsse._errors import RenderProtocolError
from twistedsse._interfaces import IProgressParser
from twistedsse._progress import (
    FFmpegProgressParser,
    Progress,
    ProgressParser,
    progressPayload,
)

# Real output of the card renderer's ffmpeg command (bundled ffmpeg 9.0.2,
# a 1 s 1280x720 30 fps card, -progress pipe:1 -stats_period 0.05),
# captured unedited. Note the two blocks before the first frame, speed
# with a leading space, out_time_us and speed going back to N/A in the
# fourth block, and out_time_us stopping one frame short of 1 s in the
# progress=end block.
CAPTURE = (
    b"frame=0\n"
    b"fps=0.00\n"
    b"stream_0_0_q=0.0\n"
    b"bitrate=N/A\n"
    b"total_size=0\n"
    b"out_time_us=N/A\n"
    b"out_time_ms=N/A\n"
    b"out_time=N/A\n"
    b"dup_frames=0\n"
    b"drop_frames=0\n"
    b"speed=N/A\n"
    b"progress=continue\n"
    b"frame=0\n"
    b"fps=0.00\n"
    b"stream_0_0_q=0.0\n"
    b"bitrate=N/A\n"
    b"total_size=0\n"
    b"out_time_us=N/A\n"
    b"out_time_ms=N/A\n"
    b"out_time=N/A\n"
    b"dup_frames=0\n"
    b"drop_frames=0\n"
    b"speed=N/A\n"
    b"progress=continue\n"
    b"frame=7\n"
    b"fps=0.00\n"
    b"stream_0_0_q=29.0\n"
    b"bitrate=   2.3kbits/s\n"
    b"total_size=48\n"
    b"out_time_us=166667\n"
    b"out_time_ms=166667\n"
    b"out_time=00:00:00.166667\n"
    b"dup_frames=0\n"
    b"drop_frames=0\n"
    b"speed= 1.1x\n"
    b"progress=continue\n"
    b"frame=14\n"
    b"fps=0.00\n"
    b"stream_0_0_q=29.0\n"
    b"bitrate=N/A\n"
    b"total_size=48\n"
    b"out_time_us=N/A\n"
    b"out_time_ms=N/A\n"
    b"out_time=N/A\n"
    b"dup_frames=0\n"
    b"drop_frames=0\n"
    b"speed=N/A\n"
    b"progress=continue\n"
    b"frame=30\n"
    b"fps=0.00\n"
    b"stream_0_0_q=-1.0\n"
    b"bitrate=  64.9kbits/s\n"
    b"total_size=7577\n"
    b"out_time_us=933333\n"
    b"out_time_ms=933333\n"
    b"out_time=00:00:00.933333\n"
    b"dup_frames=0\n"
    b"drop_frames=0\n"
    b"speed=3.91x\n"
    b"progress=end\n"
)

CAPTURE_PROGRESS = [
    Progress(frame=0, fps=0.0, outTimeUs=None, speed=None, end=False),
    Progress(frame=0, fps=0.0, outTimeUs=None, speed=None, end=False),
    Progress(frame=7, fps=0.0, outTimeUs=166667, speed=1.1, end=False),
    Progress(frame=14, fps=0.0, outTimeUs=None, speed=None, end=False),
    Progress(frame=30, fps=0.0, outTimeUs=933333, speed=3.91, end=True),
]


class FromBlockTests(SynchronousTestCase):
    """
    L{Progress.fromBlock} reads one block, tolerating what ffmpeg writes
    before it knows a value.
    """

    def test_complete(self) -> None:
        """
        Every field is read from a block of known values.
        """
        progress = Progress.fromBlock(
            {
                "frame": "150",
                "fps": "85.18",
                "out_time_us": "4933333",
                "speed": "2.8x",
                "progress": "end",
            }
        )
        self.assertEqual(progress, Progress(150, 85.18, 4933333, 2.8, True))

    def test_notAvailable(self) -> None:
        """
        C{N/A}, blanks and missing keys are C{None}; a block ending in
        C{progress=continue} is not the end.
        """
        progress = Progress.fromBlock(
            {
                "frame": "",
                "fps": "N/A",
                "out_time_us": "N/A",
                "out_time_ms": "N/A",
                "out_time": "N/A",
                "speed": "N/A",
                "progress": "continue",
            }
        )
        self.assertEqual(progress, Progress(None, None, None, None, False))
        self.assertEqual(Progress.fromBlock({}), Progress(None, None, None, None, False))

    def test_leadingSpaces(self) -> None:
        """
        Values padded with spaces (ffmpeg writes C{speed= 2.8x}) are read.
        """
        progress = Progress.fromBlock(
            {"frame": "  12", "speed": " 2.8x", "fps": " 3.5 ", "progress": " end"}
        )
        self.assertEqual(progress, Progress(12, 3.5, None, 2.8, True))

    def test_outTimeFallbacks(self) -> None:
        """
        C{out_time_us} is preferred; C{out_time_ms}, which ffmpeg also
        writes in microseconds, comes next, then the C{out_time} clock.
        """
        self.assertEqual(
            Progress.fromBlock(
                {"out_time_us": "5", "out_time_ms": "6", "out_time": "00:00:07.000000"}
            ).outTimeUs,
            5,
        )
        self.assertEqual(
            Progress.fromBlock(
                {"out_time_us": "N/A", "out_time_ms": "6", "out_time": "00:00:07.000000"}
            ).outTimeUs,
            6,
        )
        self.assertEqual(
            Progress.fromBlock({"out_time_us": "N/A", "out_time": "01:02:03.250000"}).outTimeUs,
            3723250000,
        )

    def test_negativeOutTime(self) -> None:
        """
        The negative out_time ffmpeg can write at the start is read as 0,
        whichever key it comes from.
        """
        self.assertEqual(Progress.fromBlock({"out_time_us": "-66667"}).outTimeUs, 0)
        self.assertEqual(Progress.fromBlock({"out_time": "-00:00:00.066667"}).outTimeUs, 0)

    def test_garbage(self) -> None:
        """
        Values that are not plain ASCII decimal numbers, or that are not
        finite or are negative, are C{None} rather than errors.
        """
        progress = Progress.fromBlock(
            {"frame": "12abc", "fps": "inf", "out_time_us": "1_000", "out_time": "soon", "speed": "nanx"}
        )
        self.assertEqual(progress, Progress(None, None, None, None, False))
        progress = Progress.fromBlock(
            {"frame": "-1", "fps": "-2.0", "out_time_us": "\u0661\u0662", "speed": "-1x"}
        )
        self.assertEqual(progress, Progress(None, None, None, None, False))
        self.assertIsNone(Progress.fromBlock({"speed": "1e999x"}).speed)

    def test_unknownProgressValue(self) -> None:
        """
        Only C{progress=end} marks the end.
        """
        self.assertFalse(Progress.fromBlock({"progress": "maybe"}).end)


class ProgressParserTests(SynchronousTestCase):
    """
    L{ProgressParser} turns a byte stream into one L{Progress} per block.
    """

    def test_capture(self) -> None:
        """
        The captured output, fed whole, gives its five blocks.
        """
        parser = ProgressParser()
        self.assertEqual(parser.feed(CAPTURE), CAPTURE_PROGRESS)
        self.assertEqual(parser.end(), [])

    def test_captureOneByteAtATime(self) -> None:
        """
        The captured output fed one byte per call gives the same blocks.
        """
        parser = ProgressParser()
        progress = []
        for i in range(len(CAPTURE)):
            progress.extend(parser.feed(CAPTURE[i : i + 1]))
        self.assertEqual(progress, CAPTURE_PROGRESS)
        self.assertEqual(parser.end(), [])

    @given(st.lists(st.integers(0, len(CAPTURE)), max_size=20))
    def test_captureAnyChunking(self, cuts: list[int]) -> None:
        """
        The captured output cut anywhere gives the same blocks.
        """
        positions = sorted({0, len(CAPTURE), *cuts})
        parser = ProgressParser()
        progress = []
        for a, b in zip(positions, positions[1:]):
            progress.extend(parser.feed(CAPTURE[a:b]))
        self.assertEqual(progress, CAPTURE_PROGRESS)

    def test_crlf(self) -> None:
        """
        CRLF line ends are read like LF.
        """
        parser = ProgressParser()
        self.assertEqual(parser.feed(CAPTURE.replace(b"\n", b"\r\n")), CAPTURE_PROGRESS)

    def test_partialBlockDiscarded(self) -> None:
        """
        A block with no C{progress=} line when stdout closes is discarded.
        """
        parser = ProgressParser()
        self.assertEqual(parser.feed(b"frame=3\nfps=1.0\nspeed=1x"), [])
        self.assertEqual(parser.end(), [])

    def test_finalLineWithoutNewline(self) -> None:
        """
        A block whose C{progress=} line lost only its newline is still
        complete at C{end}.
        """
        parser = ProgressParser()
        self.assertEqual(parser.feed(b"frame=3\nprogress=end"), [])
        self.assertEqual(parser.end(), [Progress(frame=3, end=True)])

    def test_blocksAreIndependent(self) -> None:
        """
        A value from one block does not leak into the next.
        """
        parser = ProgressParser()
        progress = parser.feed(b"frame=3\nspeed=2x\nprogress=continue\nframe=4\nprogress=continue\n")
        self.assertEqual(progress, [Progress(frame=3, speed=2.0), Progress(frame=4)])

    def test_otherLinesIgnored(self) -> None:
        """
        Lines without C{=}, blank lines and keys the parser does not use
        are ignored.
        """
        parser = ProgressParser()
        data = b"\nnonsense\nstream_0_0_q=29.0\nbitrate=N/A\n frame = 5\nprogress=continue\n"
        self.assertEqual(parser.feed(data), [Progress(frame=5)])

    def test_invalidUTF8(self) -> None:
        """
        Bytes that are not UTF-8 do not raise.
        """
        parser = ProgressParser()
        self.assertEqual(parser.feed(b"frame=\xff\xfe\nprogress=continue\n"), [Progress()])

    def test_lineTooLong(self) -> None:
        """
        A line over C{maxLine} raises L{RenderProtocolError}.
        """
        parser = ProgressParser(maxLine=100)
        self.assertRaises(RenderProtocolError, parser.feed, b"frame=" + b"1" * 200)


class ProgressPayloadTests(SynchronousTestCase):
    """
    L{progressPayload} computes a C{progress} event's JSON payload.
    """

    def test_fromFrames(self) -> None:
        """
        The percentage is C{frame / totalFrames}, to one decimal; the ETA
        is the remaining media time over the speed.
        """
        payload = progressPayload(Progress(frame=50, fps=90.0, outTimeUs=1633333, speed=2.5), 150, 5.0)
        self.assertEqual(
            payload,
            {
                "percent": 33.3,
                "frame": 50,
                "total_frames": 150,
                "fps": 90.0,
                "out_time": 1.633333,
                "speed": 2.5,
                "eta": round((5.0 - 5.0 * 50 / 150) / 2.5, 1),
            },
        )

    def test_fromOutTime(self) -> None:
        """
        Without a frame count the percentage and ETA come from
        C{out_time / duration}.
        """
        payload = progressPayload(Progress(outTimeUs=2_000_000, speed=4.0), 150, 5.0)
        self.assertEqual(payload["percent"], 40.0)
        self.assertEqual(payload["frame"], 0)
        self.assertEqual(payload["eta"], 0.8)

    def test_framePreferred(self) -> None:
        """
        When both are known the frame count wins: out_time stops a frame
        short of the end.
        """
        payload = progressPayload(Progress(frame=75, outTimeUs=1_000_000), 150, 5.0)
        self.assertEqual(payload["percent"], 50.0)

    def test_nothingKnown(self) -> None:
        """
        The first block (all N/A) is 0% with no ETA.
        """
        payload = progressPayload(Progress(frame=0), 150, 5.0)
        self.assertEqual(
            payload,
            {
                "percent": 0.0,
                "frame": 0,
                "total_frames": 150,
                "fps": None,
                "out_time": None,
                "speed": None,
                "eta": None,
            },
        )
        self.assertEqual(progressPayload(Progress(), 150, 5.0)["percent"], 0.0)

    def test_clampedBelow100(self) -> None:
        """
        A finished or overshooting count shows 99.9, never 100 (only a
        successful exit is 100), including values that would round up to
        100.
        """
        self.assertEqual(progressPayload(Progress(frame=150, end=True), 150, 5.0)["percent"], 99.9)
        self.assertEqual(progressPayload(Progress(frame=9999), 10000, 5.0)["percent"], 99.9)
        self.assertEqual(progressPayload(Progress(frame=400), 150, 5.0)["percent"], 99.9)
        self.assertEqual(progressPayload(Progress(outTimeUs=9_000_000), 0, 5.0)["percent"], 99.9)

    def test_overshootETA(self) -> None:
        """
        An overshooting count has an ETA of 0, not a negative one.
        """
        self.assertEqual(progressPayload(Progress(frame=400, speed=2.0), 150, 5.0)["eta"], 0.0)

    def test_noETAWithoutSpeed(self) -> None:
        """
        A speed of N/A or 0 gives no ETA rather than a division by zero.
        """
        self.assertIsNone(progressPayload(Progress(frame=10, speed=None), 150, 5.0)["eta"])
        self.assertIsNone(progressPayload(Progress(frame=10, speed=0.0), 150, 5.0)["eta"])

    def test_noTotals(self) -> None:
        """
        With no usable totals the percentage is 0 and there is no ETA.
        """
        payload = progressPayload(Progress(frame=10, outTimeUs=1_000_000, speed=2.0), 0, 0.0)
        self.assertEqual((payload["percent"], payload["eta"]), (0.0, None))

    def test_capturePayloads(self) -> None:
        """
        The captured run gives a rising percentage that stops at 99.9,
        and every payload survives strict JSON encoding.
        """
        payloads = [progressPayload(p, 30, 1.0) for p in CAPTURE_PROGRESS]
        self.assertEqual([p["percent"] for p in payloads], [0.0, 0.0, 23.3, 46.7, 99.9])
        self.assertEqual([p["eta"] for p in payloads], [None, None, 0.7, None, 0.0])
        for payload in payloads:
            json.dumps(payload, allow_nan=False)


class FFmpegProgressParserTests(SynchronousTestCase):
    """
    L{FFmpegProgressParser} is the L{IProgressParser} of one render.
    """

    def test_interface(self) -> None:
        """
        It provides L{IProgressParser}.
        """
        self.assertTrue(
            verifyObject(IProgressParser, FFmpegProgressParser(totalFrames=30, durationS=1.0))
        )

    def test_payloads(self) -> None:
        """
        It turns stdout into the payloads of L{progressPayload} with the
        render's totals, each one once (the capture repeats its first).
        """
        parser = FFmpegProgressParser(totalFrames=30, durationS=1.0)
        payloads = parser.feed(CAPTURE[:400]) + parser.feed(CAPTURE[400:]) + parser.end()
        expected = []
        for p in CAPTURE_PROGRESS:
            payload = progressPayload(p, 30, 1.0)
            if not expected or expected[-1] != payload:
                expected.append(payload)
        self.assertEqual(payloads, expected)
        self.assertLess(len(expected), len(CAPTURE_PROGRESS))

    def test_maxLine(self) -> None:
        """
        Its line limit is passed on.
        """
        parser = FFmpegProgressParser(totalFrames=30, durationS=1.0, maxLine=10)
        self.assertRaises(RenderProtocolError, parser.feed, b"x" * 11)


class RepeatTests(SynchronousTestCase):
    def test_repeatedBlocksSentOnce(self) -> None:
        """
        Identical consecutive progress blocks (ffmpeg repeats its first one
        while the encoder starts) give one payload; a change gives another.
        """
        block = b"frame=0\nfps=0.00\nout_time_us=N/A\nspeed=N/A\nprogress=continue\n"
        later = b"frame=5\nfps=10.0\nout_time_us=166666\nspeed=0.5x\nprogress=continue\n"
        parser = FFmpegProgressParser(totalFrames=30, durationS=1.0)
        self.assertEqual(len(parser.feed(block * 3)), 1)
        self.assertEqual(parser.feed(block), [])
        self.assertEqual([p["frame"] for p in parser.feed(later + later)], [5])

"""
Read ffmpeg's C{-progress pipe:1} output: bytes in, L{Progress} values out.

ffmpeg writes blocks of C{key=value} lines, each block ending in
C{progress=continue} or, for the last one, C{progress=end}. The values are
loosely formatted, and this module is deliberately tolerant of that (see
L{Progress.fromBlock}): a progress report we cannot read is shown as
unknown, never turned into an error. Pure: no Twisted import, no I/O.

Facts this relies on (measured with the static ffmpeg 9.0.2 build that
imageio-ffmpeg ships for Linux x86-64):

  - the first block or two come before any frame is encoded: C{frame=0}
    and C{N/A} for times and speed;
  - C{out_time_ms} is in microseconds, like C{out_time_us}, despite its
    name;
  - C{speed} has a leading space when it is below 10 (C{speed= 2.8x});
  - C{out_time} can be negative at the start;
  - C{out_time_us} stops at the last frame's timestamp, short of the
    duration, so C{frame} is the better measure of how far along we are;
  - C{progress=end} is also printed when ffmpeg is stopped by SIGTERM, so
    it does not mean success. Only exit status 0 does, and so
    L{progressPayload} never reports 100%: that is the C{complete} event's
    job.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, TypeVar

import attrs
from zope.interface import implementer

from ._interfaces import IProgressParser
from ._json import JSON, JSONObject
from ._lines import LineBuffer

_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_CLOCK = re.compile(r"(-?)([0-9]+):([0-9]{1,2}):([0-9]{1,2}(?:\.[0-9]*)?)\Z")

#: The keys L{ProgressParser} keeps; anything else in a block is ignored,
#: which bounds the memory a block can take.
_KEYS = frozenset({"frame", "fps", "out_time_us", "out_time_ms", "out_time", "speed", "progress"})

#: The highest percentage a progress report may show. 100 belongs to the
#: C{complete} event, sent only when the process exits 0.
MAX_PERCENT = 99.9


def _parseInt(value: str | None) -> int | None:
    """
    An ASCII decimal integer, or C{None} for C{N/A}, blanks or garbage.

    C{int()} alone would also accept C{"1_000"} and non-ASCII digits.
    """
    if value is None:
        return None
    value = value.strip()
    if not _INTEGER.match(value):
        return None
    return int(value)


def _parseFloat(value: str | None) -> float | None:
    """
    A finite ASCII decimal number, or C{None} for C{N/A}, blanks, C{inf},
    C{nan} or garbage (so the result is always JSON-ready).
    """
    if value is None:
        return None
    value = value.strip()
    if not _DECIMAL.match(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _parseClock(value: str | None) -> int | None:
    """
    C{out_time}'s C{[-]HH:MM:SS.ffffff} as microseconds, or C{None}.
    """
    if value is None:
        return None
    match = _CLOCK.match(value.strip())
    if match is None:
        return None
    sign, hours, minutes, seconds = match.groups()
    total = (int(hours) * 60 + int(minutes)) * 60 + float(seconds)
    return round(total * 1_000_000) * (-1 if sign else 1)


_Number = TypeVar("_Number", int, float)


def _nonNegative(value: _Number | None) -> _Number | None:
    """
    Counts, rates and speeds below zero are garbage: C{None}.
    """
    return None if value is None or value < 0 else value


@attrs.frozen
class Progress:
    """
    One progress report from ffmpeg. Every field is C{None} when ffmpeg
    did not know it yet (C{N/A}) or wrote something unreadable.

    @ivar frame: frames written so far.
    @ivar fps: encoding speed in frames per second of wall time.
    @ivar outTimeUs: media time written so far, in microseconds; never
        negative (ffmpeg's negative start values are reported as 0).
    @ivar speed: media seconds encoded per wall-clock second.
    @ivar end: the block ended in C{progress=end}: ffmpeg will write no
        more, which does B{not} mean it succeeded.
    """

    frame: int | None = None
    fps: float | None = None
    outTimeUs: int | None = None
    speed: float | None = None
    end: bool = False

    @classmethod
    def fromBlock(cls, fields: Mapping[str, str]) -> Progress:
        """
        Read one block of C{-progress} output, already split into C{key:
        value} pairs, tolerating whatever ffmpeg writes before it knows a
        value.

        C{out_time_us} is preferred; C{out_time_ms} (also microseconds)
        and then C{out_time} are the fallbacks.
        """
        outTimeUs = _parseInt(fields.get("out_time_us"))
        if outTimeUs is None:
            outTimeUs = _parseInt(fields.get("out_time_ms"))
        if outTimeUs is None:
            outTimeUs = _parseClock(fields.get("out_time"))
        if outTimeUs is not None:
            outTimeUs = max(outTimeUs, 0)
        speed = fields.get("speed")
        if speed is not None:
            speed = speed.strip()
            speed = speed[:-1] if speed.endswith("x") else speed
        return cls(
            frame=_nonNegative(_parseInt(fields.get("frame"))),
            fps=_nonNegative(_parseFloat(fields.get("fps"))),
            outTimeUs=outTimeUs,
            speed=_nonNegative(_parseFloat(speed)),
            end=(fields.get("progress") or "").strip() == "end",
        )


@attrs.define
class ProgressParser:
    """
    Incremental parser of ffmpeg's C{-progress pipe:1} output.

    Only the keys it reads are kept while a block is open, so a block's
    memory is bounded by the line limit whatever the child writes.

    @ivar maxLine: the longest line accepted, in bytes.
    """

    maxLine: int = 65536
    _lines: LineBuffer = attrs.field(init=False)
    _block: dict[str, str] = attrs.field(factory=dict, init=False)

    @_lines.default
    def _makeLines(self) -> LineBuffer:
        return LineBuffer(self.maxLine)

    def feed(self, data: bytes) -> list[Progress]:
        """
        Take the next chunk of stdout; return one L{Progress} per block it
        completed, in order.

        @raise twistedsse._errors.RenderProtocolError: a line is longer
            than C{maxLine}.
        """
        return self._readLines(self._lines.feed(data))

    def end(self) -> list[Progress]:
        """
        Stdout closed. A final line without its LF is still read, so a
        block whose C{progress=} line was cut short of its newline counts;
        a block with no C{progress=} line at all is discarded, since ffmpeg
        did not finish writing it.
        """
        progress = self._readLines(self._lines.end())
        self._block = {}
        return progress

    def _readLines(self, lines: list[bytes]) -> list[Progress]:
        progress = []
        for line in lines:
            key, equals, value = line.decode("utf-8", "replace").partition("=")
            key = key.strip()
            if not equals or key not in _KEYS:
                continue
            self._block[key] = value
            if key == "progress":
                progress.append(Progress.fromBlock(self._block))
                self._block = {}
        return progress


def progressPayload(progress: Progress, totalFrames: int, durationS: float) -> dict[str, JSON]:
    """
    The JSON-ready payload of a C{progress} event.

    How far along the render is comes from C{frame / totalFrames}, which
    reaches the end exactly; C{out_time / duration} is the fallback when
    the frame count is unknown (it stops one frame short). The percentage
    is clamped to [0, L{MAX_PERCENT}]: a C{progress=end} block is printed on
    SIGTERM too, so only the process's exit can say 100.

    @param totalFrames: frames the finished output will have.
    @param durationS: the finished output's duration in seconds.
    @return: C{percent} (0 to 99.9, one decimal), C{frame}, C{total_frames},
        C{fps}, C{out_time} (seconds), C{speed} and C{eta} (seconds of wall
        time left: remaining media time over C{speed}; C{None} until
        ffmpeg reports a positive speed).
    """
    fraction: float | None = None
    if progress.frame is not None and totalFrames > 0:
        fraction = progress.frame / totalFrames
    elif progress.outTimeUs is not None and durationS > 0:
        fraction = progress.outTimeUs / 1_000_000 / durationS
    if fraction is not None:
        fraction = min(max(fraction, 0.0), 1.0)
    percent = 0.0 if fraction is None else min(round(fraction * 100, 1), MAX_PERCENT)
    eta = None
    if fraction is not None and progress.speed and durationS > 0:
        eta = round(durationS * (1 - fraction) / progress.speed, 1)
    return {
        "percent": percent,
        "frame": progress.frame or 0,
        "total_frames": totalFrames,
        "fps": progress.fps,
        "out_time": None if progress.outTimeUs is None else progress.outTimeUs / 1_000_000,
        "speed": progress.speed,
        "eta": eta,
    }


@implementer(IProgressParser)
@attrs.define
class FFmpegProgressParser:
    """
    The L{IProgressParser} for one ffmpeg render: L{ProgressParser} plus
    L{progressPayload} with that render's totals.

    @ivar totalFrames: frames the finished output will have.
    @ivar durationS: the finished output's duration in seconds.
    """

    totalFrames: int
    durationS: float
    maxLine: int = 65536
    _last: JSONObject | None = attrs.field(default=None, init=False)
    _parser: ProgressParser = attrs.field(init=False)

    @_parser.default
    def _makeParser(self) -> ProgressParser:
        return ProgressParser(self.maxLine)

    def feed(self, data: bytes) -> list[JSONObject]:
        """
        See L{IProgressParser.feed}.
        """
        return self._changed(self._parser.feed(data))

    def end(self) -> list[JSONObject]:
        """
        See L{IProgressParser.end}.
        """
        return self._changed(self._parser.end())

    def _changed(self, blocks: list[Progress]) -> list[JSONObject]:
        # ffmpeg repeats its first block while the encoder starts up; a
        # progress event that says nothing new is not sent.
        payloads: list[JSONObject] = []
        for block in blocks:
            payload = self._payload(block)
            if payload != self._last:
                payloads.append(payload)
                self._last = payload
        return payloads

    def _payload(self, progress: Progress) -> JSONObject:
        return progressPayload(progress, self.totalFrames, self.durationS)

"""
The built-in C{card} renderer: an H.264 MP4 title card made by ffmpeg.

The card is a plain background with a centred title, an optional subtitle
and a progress bar along the bottom that fills up as the video plays.

Client text never reaches ffmpeg's command line. The title and subtitle
are written to files in the job's working directory and drawn with
C{drawtext=textfile=...:expansion=none}, so no character of theirs is
ever parsed as filter-graph syntax, and C{%{...}} sequences are drawn as
written instead of being expanded. What does go into the filter graph is
either produced by L{CardRenderer.validate} (numbers, C{0xRRGGBB}
colours) or chosen by the operator (the working directory, the font
file); the paths among those are escaped by L{_escapeFilterValue}, since
an operator's directory may contain any character.

Choices measured with the bundled ffmpeg 9.0.2 (default card: 5 s,
1280x720, 30 fps, C{-preset veryfast}; the figures: docs/performance.md,
"Figures cited by the code"):

  - A render is several times faster than real time. With ffmpeg's
    default stats period (0.5 s) that is too few progress reports for a
    bar to move; C{-stats_period 0.05} gives one every few frames at no
    measurable cost, so 0.05 is the default: about 20 C{progress} events
    a second at most, a bar that visibly moves, and no artificial
    slowdown (C{-readrate} would make every render take a fixed share of
    its duration in wall time).
  - C{drawbox} evaluates its size once, not per frame (it has no time
    variable: its C{t} is the line thickness), so the growing bar is a
    second C{color} source overlaid at C{x=-w+w*(n+1)/frames}, which is
    full width exactly on the last frame. A moving bar costs some
    encoding time (a fraction of the render), the price of a picture
    that is not static.
  - The frame count is fixed with C{-frames:v}: C{round(duration * fps)}
    frames, so progress can be measured against an exact total, and the
    output lasts C{frames / fps} seconds (the requested duration to
    within half a frame).
  - C{text_align} (to centre each line of a multi-line title) needs
    ffmpeg 6.1 or later; an operator-supplied ffmpeg must be that recent.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import attrs
from zope.interface import implementer

from ._errors import InvalidParams, RenderProtocolError
from ._interfaces import IRenderer, RenderPlan
from ._json import JSONObject
from ._progress import FFmpegProgressParser

MAX_TEXT = 200
MIN_DURATION, MAX_DURATION = 1, 60
MIN_WIDTH, MAX_WIDTH = 64, 1920
MIN_HEIGHT, MAX_HEIGHT = 64, 1080
MIN_FPS, MAX_FPS = 1, 60

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")

#: Characters that mean nothing to either level of ffmpeg's filter
#: parsing; a value made only of these is passed as is.
_PLAIN = re.compile(r"[A-Za-z0-9_.@#+*/()-]+")
#: Characters the filter-graph level splits on or unescapes.
_GRAPH_SPECIAL = re.compile(r"([\\'\[\],;\n])")

#: The environment variables passed through to ffmpeg when the service
#: has them: an operator who points fontconfig somewhere expects ffmpeg
#: to look there too.
_FONTCONFIG_VARIABLES = ("FONTCONFIG_FILE", "FONTCONFIG_PATH")


def _escapeFilterValue(value: str) -> str:
    """
    Escape C{value} so that it reaches a filter as exactly that string
    when written as C{key=<result>} in a C{-vf} filter graph.

    ffmpeg unescapes twice (see "Notes on filtergraph escaping" in its
    filters documentation): the filter graph parser reads each filter's
    arguments up to an unquoted, unescaped C{[ ] , ;}, removing quotes and
    backslashes; then the filter's option parser reads each value up to
    C{:}, removing them again. So the value is first quoted for the option
    level (C{'...'}, where only C{'} is special and is written C{'\\''}),
    and every C{\\}, C{'}, C{[}, C{]}, C{,}, C{;} and newline of that is
    then backslash-escaped for the graph level (a backslash keeps the
    next character whatever it is). Values made only of harmless
    characters are returned unchanged, to keep the command line readable.
    """
    if _PLAIN.fullmatch(value):
        return value
    quoted = "'" + value.replace("'", "'\\''") + "'"
    return _GRAPH_SPECIAL.sub(r"\\\1", quoted)


def _filter(name: str, **options: str | float) -> str:
    """
    C{name=key=value:...} with every value escaped, in the order given.
    """
    return (
        name
        + "="
        + ":".join(f"{key}={_escapeFilterValue(str(value))}" for key, value in options.items())
    )


def _show(value: object) -> str:
    """
    A short, ASCII-only rendering of a client's bad value for an error
    message: as JSON, since that is what the client sent.
    """
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonType(value: object) -> str:
    """
    The JSON name of C{value}'s type, for "must be a JSON object, got
    array".
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def _checkText(field: str, value: object, minimum: int) -> str:
    """
    A title or subtitle: a string of C{minimum} to L{MAX_TEXT} characters
    with no control characters but newline (a multi-line card) and tab.

    Other controls are refused rather than drawn as boxes, and lone
    surrogates (which JSON can encode) because the text must be written
    out as UTF-8.
    """
    limit = f"a string of {minimum} to {MAX_TEXT} characters"
    if not isinstance(value, str):
        raise InvalidParams(field, f"must be {limit}, got {_show(value)}")
    if not minimum <= len(value) <= MAX_TEXT:
        raise InvalidParams(field, f"must be {limit}, got {len(value)} characters")
    for index, character in enumerate(value):
        category = unicodedata.category(character)
        if category == "Cc" and character not in "\n\t":
            raise InvalidParams(
                field,
                f"must not contain control characters other than newline and tab, "
                f"got {ascii(character)} at index {index}",
            )
        if category == "Cs":
            raise InvalidParams(
                field,
                f"must be valid Unicode, got the lone surrogate {ascii(character)} at index {index}",
            )
    return value


def _checkColour(field: str, value: object) -> str:
    """
    A C{#rrggbb} colour, lower-cased so equal colours compare equal.
    """
    if not isinstance(value, str) or not _COLOUR.fullmatch(value):
        raise InvalidParams(field, f'must be a colour "#rrggbb", got {_show(value)}')
    return value.lower()


def _checkDuration(value: object) -> int | float:
    """
    A number of seconds, int or float but not bool (JSON's C{true} is not
    one second); C{NaN} fails the range check.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if MIN_DURATION <= value <= MAX_DURATION:
            return value
    raise InvalidParams(
        "duration",
        f"must be a number from {MIN_DURATION} to {MAX_DURATION} seconds, got {_show(value)}",
    )


def _checkSize(value: object) -> str:
    """
    C{"WxH"} within limits, both even (yuv420p halves the chroma planes,
    so libx264 refuses odd sizes), normalized (C{"0640x360"} is
    C{"640x360"}).
    """
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        width, height = int(match.group(1)), int(match.group(2))
        if (
            MIN_WIDTH <= width <= MAX_WIDTH
            and MIN_HEIGHT <= height <= MAX_HEIGHT
            and width % 2 == 0
            and height % 2 == 0
        ):
            return f"{width}x{height}"
    raise InvalidParams(
        "size",
        f'must be "WxH" with an even width from {MIN_WIDTH} to {MAX_WIDTH} and an even height '
        f"from {MIN_HEIGHT} to {MAX_HEIGHT}, got {_show(value)}",
    )


def _checkFPS(value: object) -> int:
    """
    An integer frame rate. JSON has one number type, so C{30.0} counts as
    30 (as in JSON Schema); C{29.97} and C{true} are refused.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_FPS <= value <= MAX_FPS:
        raise InvalidParams("fps", f"must be an integer from {MIN_FPS} to {MAX_FPS}, got {_show(value)}")
    return value


def _digits(low: str, high: str) -> str:
    """
    A regular expression for the decimal numbers from C{low} to C{high},
    two strings of digits of the same length, as written with that many
    digits.
    """
    if low == high:
        return low
    width = len(low) - 1
    if width == 0:
        return f"[{low}-{high}]"
    if low == "0" * (width + 1) and high == "9" * (width + 1):
        return f"[0-9]{{{width + 1}}}"
    if low[0] == high[0]:
        return low[0] + f"(?:{_digits(low[1:], high[1:])})"
    parts = [low[0] + f"(?:{_digits(low[1:], '9' * width)})"]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{width}}}")
    parts.append(high[0] + f"(?:{_digits('0' * width, high[1:])})")
    return "|".join(parts)


def _evenDigit(low: int, high: int) -> str:
    return "[" + "".join(str(d) for d in range(low, high + 1) if d % 2 == 0) + "]"


def _evenPattern(low: int, high: int, places: int) -> str:
    """
    A regular expression (no anchors) for the even integers from C{low}
    to C{high} (both even, at least 10) written in at most C{places}
    digits, leading zeros allowed, as L{_SIZE} reads them.

    Generated from the limits, so that the schema's size pattern cannot
    drift from L{_checkSize}; the tests compare the two over every string
    of up to C{places} digits.
    """
    alternatives = []
    for length in range(len(str(low)), len(str(high)) + 1):
        # (10**length - 2: the greatest even number of that length.)
        first, last = max(low, 10 ** (length - 1)), min(high, 10**length - 2)
        tens, lastTens = first // 10, last // 10
        zeros = f"0{{0,{places - length}}}" if places > length else ""
        if tens == lastTens:
            body = f"{tens}{_evenDigit(first % 10, last % 10)}"
        else:
            body = f"{tens}{_evenDigit(first % 10, 8)}"
            if lastTens - tens > 1:
                middle = _digits(str(tens + 1), str(lastTens - 1).zfill(len(str(tens + 1))))
                body += f"|(?:{middle})[02468]"
            body += f"|{lastTens}{_evenDigit(0, last % 10)}"
        alternatives.append(f"{zeros}(?:{body})")
    return "|".join(alternatives)


#: The end of the subject, in both Python's C{re} and ECMA-262 (JSON
#: Schema's dialect): Python's C{$} also matches before a final newline.
_END = r"$(?!\n)"

#: Code points a title may not hold: control characters (category Cc)
#: other than tab and newline, and lone surrogates (category Cs, which
#: JSON's C{\\ud800} escapes can encode), as L{_checkText} refuses them.
_TEXT_PATTERN = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F\uD800-\uDFFF]*$"


@attrs.frozen
class Field:
    """
    One parameter of the card: its name, its default, the check that
    L{CardRenderer.validate} applies (it returns the value normalized), and
    the JSON Schema that accepts exactly what the check accepts. Both come
    from the same limits (L{MAX_TEXT}, L{MIN_DURATION}, ...), next to each
    other, and the tests compare them value by value.
    """

    name: str
    default: object
    check: Callable[[object], Any]
    schema: Mapping[str, Any]


def _textField(name: str, default: str, minimum: int, description: str) -> Field:
    return Field(
        name,
        default,
        lambda value: _checkText(name, value, minimum),
        {
            "type": "string",
            "minLength": minimum,
            "maxLength": MAX_TEXT,
            "pattern": _TEXT_PATTERN,
            "description": description,
        },
    )


def _colourField(name: str, default: str, description: str) -> Field:
    return Field(
        name,
        default,
        lambda value: _checkColour(name, value),
        # maxLength: Python's "$" would let a final newline through.
        {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$", "maxLength": 7, "description": description},
    )


#: Every parameter a client may give, in order.
FIELDS: tuple[Field, ...] = (
    _textField("title", "twistedsse", 1, "The title; newline and tab are the only control characters allowed."),
    _textField("subtitle", "", 0, "The subtitle (empty: none)."),
    Field(
        "duration",
        5,
        _checkDuration,
        {
            "type": "number",
            "minimum": MIN_DURATION,
            "maximum": MAX_DURATION,
            "description": "Length in seconds.",
        },
    ),
    Field(
        "size",
        "1280x720",
        _checkSize,
        {
            "type": "string",
            "pattern": "^[0-9]{1,5}x[0-9]{1,5}$",
            # The form above; this one, generated from the limits, says
            # the ranges and evenness too.
            "allOf": [
                {
                    "pattern": f"^(?:{_evenPattern(MIN_WIDTH, MAX_WIDTH, 5)})"
                    f"x(?:{_evenPattern(MIN_HEIGHT, MAX_HEIGHT, 5)}){_END}"
                }
            ],
            "x-size-limits": {
                "width": {"minimum": MIN_WIDTH, "maximum": MAX_WIDTH, "multipleOf": 2},
                "height": {"minimum": MIN_HEIGHT, "maximum": MAX_HEIGHT, "multipleOf": 2},
            },
            "description": "WIDTHxHEIGHT in pixels, both even.",
        },
    ),
    Field(
        "fps",
        30,
        _checkFPS,
        {"type": "integer", "minimum": MIN_FPS, "maximum": MAX_FPS, "description": "Frames per second."},
    ),
    _colourField("background", "#1e293b", "The background colour, #rrggbb."),
    _colourField("foreground", "#f8fafc", "The text colour, #rrggbb."),
    _colourField("accent", "#38bdf8", "The progress bar's colour, #rrggbb."),
)

#: Every parameter a client may give, with its default.
DEFAULTS: Mapping[str, Any] = {field.name: field.default for field in FIELDS}

#: The card's C{params} as a JSON Schema (2020-12), for C{GET /renderers}:
#: made of L{FIELDS}, as the validator is.
PARAMS_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {field.name: {**field.schema, "default": field.default} for field in FIELDS},
}


def _checkStem(stem: str) -> None:
    """
    The stem names files inside the working directory: it must be a plain
    file name. It comes from the service, not the client, so a bad one is
    a programming error.
    """
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem or "\0" in stem:
        raise ValueError(f"stem must be a plain file name, got {stem!r}")


def _ems(line: str) -> float:
    """
    Roughly how wide C{line} is in ems when drawn in DejaVu Sans: wide
    (CJK, most emoji) characters take one em, combining and format
    characters none, tabs four ordinary characters, the rest 0.6.
    """
    width = 0.0
    for character in line:
        if character == "\t":
            width += 2.4
        elif unicodedata.category(character) in ("Mn", "Me", "Cf"):
            continue
        elif unicodedata.east_asian_width(character) in ("W", "F"):
            width += 1.0
        else:
            width += 0.6
    return width


def _fontSize(text: str, width: int, largest: float, blockHeight: float) -> int:
    """
    The font size, in pixels, at which C{text} fits within 90% of the
    frame's width and within C{blockHeight}, but no larger than
    C{largest}, and at least 8 pixels (past that it is unreadable anyway,
    and the text is cut at the frame's edge instead).
    """
    lines = text.split("\n")
    size = min(largest, blockHeight / (len(lines) * _LINE_HEIGHT))
    widest = max(_ems(line) for line in lines)
    if widest > 0:
        size = min(size, 0.9 * width / widest)
    return max(8, int(size))


#: A line's height in ems (DejaVu Sans: ascent plus descent is 1.164 em).
_LINE_HEIGHT = 1.17


def _ffmpegColour(colour: str) -> str:
    """
    A validated C{#rrggbb} as ffmpeg's C{0xRRGGBB}.
    """
    return "0x" + colour[1:].upper()


@attrs.define
class _Finalizer:
    """
    Move a finished render's partial output into place: ffmpeg writes
    C{<stem>.part.mp4}, so the final name only ever holds a complete file.
    """

    part: Path
    final: Path

    def __call__(self) -> None:
        """
        Rename the partial output to its final name, atomically (same
        directory, C{os.replace}).

        @raise RenderProtocolError: ffmpeg exited 0 but left no output, or
            an empty one. The message names no server path, since it may
            reach the client.
        """
        try:
            size = self.part.stat().st_size
        except FileNotFoundError:
            raise RenderProtocolError("ffmpeg exited 0 but wrote no output file") from None
        if size == 0:
            raise RenderProtocolError("ffmpeg exited 0 but wrote an empty output file")
        os.replace(self.part, self.final)


@implementer(IRenderer)
@attrs.define
class CardRenderer:
    """
    The C{card} renderer: a title card as an H.264 MP4.

    @ivar ffmpeg: the ffmpeg executable; C{None} (the default) means the
        static build bundled with C{imageio-ffmpeg}, looked up when the
        first plan is made so that importing this module stays cheap.
    @ivar fontfile: a font file for the text, set by the operator; C{None}
        lets fontconfig choose (DejaVu Sans where C{fonts-dejavu-core} is
        installed). A machine with no fonts for fontconfig to find needs
        this.
    @ivar statsPeriod: seconds between ffmpeg's progress reports; see the
        module docstring for why the default is 0.05.
    @ivar threads: the most threads ffmpeg may use for encoding
        (C{-threads}) and for the filter graph (C{-filter_threads}), each;
        C{None} leaves it to ffmpeg (one per CPU, and more: libx264 adds
        lookahead threads).
    """

    name: ClassVar[str] = "card"
    paramsSchema: ClassVar[Mapping[str, Any]] = PARAMS_SCHEMA

    _ffmpeg: str | None = None
    _fontfile: str | None = None
    _statsPeriod: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    _threads: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )

    def validate(self, params: object) -> dict[str, Any]:
        """
        Check a client's C{params} and return them with every default
        filled in.

        @raise InvalidParams: C{params} is not a JSON object, has a key
            this renderer does not know, or a value of the wrong type or
            out of range; the error names the field, the limit, and the
            bad value.
        """
        if not isinstance(params, dict):
            raise InvalidParams("params", f"must be a JSON object, got {_jsonType(params)}")
        for key in params:
            if key not in DEFAULTS:
                # Escaped: a key may hold a lone surrogate (JSON can encode
                # one), which the UTF-8 error response could not.
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                raise InvalidParams(
                    name if len(name) <= 60 else name[:57] + "...",
                    f"is not a parameter of the card renderer, which takes {', '.join(DEFAULTS)}",
                )
        return {field.name: field.check(params.get(field.name, field.default)) for field in FIELDS}

    def plan(self, params: JSONObject, workdir: Path, stem: str) -> RenderPlan:
        """
        Write the card's text files into C{workdir} and return the ffmpeg
        command that draws them.

        C{params} are validated again: it is cheap, and it guarantees that
        nothing unchecked reaches the command line whoever calls this.

        @raise InvalidParams: C{params} are not valid.
        @raise ValueError: C{stem} is not a plain file name.
        """
        card = self.validate(dict(params))
        _checkStem(stem)
        workdir = Path(workdir).absolute()
        titlePath = workdir / f"{stem}.title.txt"
        subtitlePath = workdir / f"{stem}.subtitle.txt"
        partPath = workdir / f"{stem}.part.mp4"
        finalPath = workdir / f"{stem}.mp4"
        titlePath.write_bytes(card["title"].encode("utf-8"))
        subtitlePath.write_bytes(card["subtitle"].encode("utf-8"))

        width, height = (int(n) for n in card["size"].split("x"))
        fps = card["fps"]
        frames = max(1, round(card["duration"] * fps))
        duration = frames / fps

        argv = [
            self._ffmpegExecutable(),
            "-hide_banner",
            "-nostdin",
            "-y",
            *self._threadOptions("-filter_threads"),
            "-f",
            "lavfi",
            "-i",
            f"color=c={_ffmpegColour(card['background'])}:s={width}x{height}:r={fps}",
            "-vf",
            self._filterGraph(card, width, height, frames, titlePath, subtitlePath),
            "-frames:v",
            str(frames),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            *self._threadOptions("-threads"),
            "-f",
            "mp4",
            "-movflags",
            "+faststart",
            "-progress",
            "pipe:1",
            "-nostats",
            "-stats_period",
            f"{self._statsPeriod:g}",
            # "file:" stops ffmpeg reading a protocol name out of a
            # directory name containing ":".
            "file:" + str(partPath),
        ]
        return RenderPlan(
            argv=argv,
            env=self._environment(workdir),
            stdin=None,
            parser=FFmpegProgressParser(totalFrames=frames, durationS=duration),
            output=finalPath,
            scratch=(titlePath, subtitlePath, partPath),
            mediaDuration=duration,
            finalize=_Finalizer(partPath, finalPath),
        )

    def _threadOptions(self, option: str) -> list[str]:
        return [] if self._threads is None else [option, str(self._threads)]

    def _ffmpegExecutable(self) -> str:
        if self._ffmpeg is not None:
            return self._ffmpeg
        import imageio_ffmpeg

        executable: str = imageio_ffmpeg.get_ffmpeg_exe()
        return executable

    def _environment(self, workdir: Path) -> dict[str, str]:
        """
        The child's whole environment: nothing of the service's is passed
        on but fontconfig's location, if set. C{HOME} and C{TMPDIR} point
        into the job's working directory so that nothing ffmpeg or
        fontconfig might write lands elsewhere.
        """
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
        }
        for variable in _FONTCONFIG_VARIABLES:
            if variable in os.environ:
                env[variable] = os.environ[variable]
        return env

    def _filterGraph(
        self,
        card: Mapping[str, Any],
        width: int,
        height: int,
        frames: int,
        titlePath: Path,
        subtitlePath: Path,
    ) -> str:
        """
        The C{-vf} graph: a dim track and a growing bar along the bottom,
        then the title and subtitle centred as one block.
        """
        accent = _ffmpegColour(card["accent"])
        foreground = _ffmpegColour(card["foreground"])
        barHeight = max(4, (height // 80) & ~1)
        title, subtitle = card["title"], card["subtitle"]

        textHeight = height - 4 * barHeight
        titleSize = _fontSize(title, width, height / 8, textHeight * (0.55 if subtitle else 0.8))
        titleBlock = (title.count("\n") + 1) * titleSize * _LINE_HEIGHT
        fonts: dict[str, str] = {} if self._fontfile is None else {"fontfile": self._fontfile}

        drawTitle: dict[str, str | float] = {
            **fonts,
            "textfile": str(titlePath),
            "expansion": "none",
            "fontcolor": foreground,
            "fontsize": titleSize,
            "text_align": "C",
            "x": "(w-text_w)/2",
        }
        steps = [
            _filter("color", c=accent, s=f"{width}x{barHeight}", r=card["fps"]) + "[bar]",
            "[in]"
            + _filter(
                "drawbox",
                x=0,
                y=f"ih-{barHeight}",
                w="iw",
                h=barHeight,
                color=f"{accent}@0.25",
                t="fill",
            )
            + "[track]",
            "[track][bar]" + _filter("overlay", x=f"-w+w*(n+1)/{frames}", y="H-h", eval="frame"),
        ]
        if subtitle:
            subtitleSize = _fontSize(subtitle, width, max(8.0, titleSize * 0.45), textHeight * 0.3)
            gap = titleSize * 0.5
            subtitleBlock = (subtitle.count("\n") + 1) * subtitleSize * _LINE_HEIGHT
            top = (height - titleBlock - gap - subtitleBlock) / 2
            drawSubtitle: dict[str, str | float] = {
                **drawTitle,
                "textfile": str(subtitlePath),
                "fontcolor": f"{foreground}@0.75",
                "fontsize": subtitleSize,
                "y": math.floor(top + titleBlock + gap),
            }
            steps[-1] += "," + _filter("drawtext", **drawTitle, y=math.floor(top))
            steps[-1] += "," + _filter("drawtext", **drawSubtitle)
        else:
            steps[-1] += "," + _filter("drawtext", **drawTitle, y="(h-text_h)/2")
        return ";".join(steps)

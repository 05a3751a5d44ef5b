"""
Tests for L{twistedsse._card}, the built-in C{card} renderer.

The render tests run the real (bundled) ffmpeg, synchronously and with a
timeout: a card of 1 s at 320x180 takes about a tenth of a second.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import imageio_ffmpeg
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twistedsse._card import DEFAULTS, CardRenderer, _escapeFilterValue
from twistedsse._errors import InvalidParams, RenderProtocolError
from twistedsse._interfaces import IProgressParser, IRenderer, RenderPlan

FFMPEG_TIMEOUT = 60

#: Every character that means something to ffmpeg's filter parsing or to a
#: shell, plus non-ASCII, RTL and whitespace, in one directory name.
HOSTILE_DIRECTORY = "wd 'q' \"dq\" : \\ , ; [x] =é 日本 \u202eltr %{pts} $HOME `id` *?\n\tend "

HOSTILE_TEXTS = [
    "'",
    "it's a 'quoted' title",
    ":",
    "a:b=c",
    "\\",
    "back\\slash\\",
    "%{pts}",
    "%{eif:1:d}",
    "%{localtime}",
    "line one\nline two\n\nline four",
    "tab\there",
    ";",
    ",",
    "[x]",
    "[in]null[out];movie=/etc/passwd",
    "drawtext=textfile=/etc/passwd",
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u202eRTL override",
    "emoji \U0001f389\U0001f1eb\U0001f1f7 \u0301combining",
    "\n\nevent: complete\ndata: {}\n\n",
    "$(id) `id` ${HOME}",
    " leading and trailing spaces ",
]


def makeWorkdir(test: SynchronousTestCase, name: str = "work") -> Path:
    """
    A fresh directory named C{name}, removed after the test. (Not
    C{TestCase.mktemp}: under pytest that writes into the source tree.)
    """
    base = Path(tempfile.mkdtemp(prefix="twistedsse-card-"))
    test.addCleanup(shutil.rmtree, base, True)
    workdir = base / name
    workdir.mkdir()
    return workdir


def invalid(test: SynchronousTestCase, params: object) -> InvalidParams:
    """
    Validate C{params}, which must fail; return the error.
    """
    return test.assertRaises(InvalidParams, CardRenderer().validate, params)


class InterfaceTests(SynchronousTestCase):
    """
    L{CardRenderer} is an L{IRenderer} named C{card}.
    """

    def test_provides(self) -> None:
        """
        It provides L{IRenderer}, with the name C{card}.
        """
        renderer = CardRenderer()
        self.assertTrue(verifyObject(IRenderer, renderer))
        self.assertEqual(renderer.name, "card")


class ValidateTests(SynchronousTestCase):
    """
    L{CardRenderer.validate} accepts exactly the documented parameters and
    fills in defaults.
    """

    def assertInvalid(self, params: object, field: str, detail: str | None = None) -> None:
        error = invalid(self, params)
        self.assertEqual(error.field, field, f"{params!r}: {error}")
        if detail is not None:
            prefix = "params" if field == "params" else f"params.{field}"
            self.assertEqual(str(error), f"{prefix}: {detail}")

    def test_defaults(self) -> None:
        """
        An empty object gives every default.
        """
        self.assertEqual(
            CardRenderer().validate({}),
            {
                "title": "twistedsse",
                "subtitle": "",
                "duration": 5,
                "size": "1280x720",
                "fps": 30,
                "background": "#1e293b",
                "foreground": "#f8fafc",
                "accent": "#38bdf8",
            },
        )
        self.assertEqual(CardRenderer().validate({}), dict(DEFAULTS))

    def test_allFields(self) -> None:
        """
        Every field can be set; colours are lower-cased and sizes
        normalized.
        """
        params = {
            "title": "T",
            "subtitle": "S",
            "duration": 2.5,
            "size": "0640x0360",
            "fps": 24,
            "background": "#ABCDEF",
            "foreground": "#000000",
            "accent": "#FfFfFf",
        }
        self.assertEqual(
            CardRenderer().validate(params),
            {**params, "size": "640x360", "background": "#abcdef", "accent": "#ffffff"},
        )

    def test_doesNotMutate(self) -> None:
        """
        The client's dict is left as it was.
        """
        params = {"title": "x"}
        CardRenderer().validate(params)
        self.assertEqual(params, {"title": "x"})

    def test_notAnObject(self) -> None:
        """
        C{params} that are not a JSON object are refused, naming
        C{params} and the type received.
        """
        for params, kind in [
            ([], "array"),
            ("x", "string"),
            (1, "number"),
            (None, "null"),
            (True, "boolean"),
        ]:
            self.assertInvalid(params, "params", f"must be a JSON object, got {kind}")

    def test_unknownKey(self) -> None:
        """
        A key this renderer does not take is refused, naming it.
        """
        self.assertInvalid({"title": "x", "colour": "#000000"}, "colour")
        self.assertInvalid({"ffmpeg": "/bin/sh"}, "ffmpeg")
        error = invalid(self, {"k" * 500: 1})
        self.assertLessEqual(len(error.field), 60)

    def test_duration(self) -> None:
        """
        C{duration} is a number from 1 to 60, int or float; bools, strings,
        NaN and infinities are refused and the error shows the value.
        """
        for good in [1, 1.0, 1.5, 59.999, 60, 60.0]:
            self.assertEqual(CardRenderer().validate({"duration": good})["duration"], good)
        for bad, shown in [
            (100, "100"),
            (0, "0"),
            (0.999, "0.999"),
            (60.001, "60.001"),
            (61, "61"),
            (-5, "-5"),
            (True, "true"),
            (False, "false"),
            ("5", '"5"'),
            (None, "null"),
            ([5], "[5]"),
            (float("nan"), "NaN"),
            (float("inf"), "Infinity"),
        ]:
            self.assertInvalid(
                {"duration": bad}, "duration", f"must be a number from 1 to 60 seconds, got {shown}"
            )

    def test_fps(self) -> None:
        """
        C{fps} is an integer from 1 to 60 (JSON's C{30.0} is 30); fractions
        and bools are refused.
        """
        for good in [1, 25, 60]:
            self.assertEqual(CardRenderer().validate({"fps": good})["fps"], good)
        self.assertEqual(CardRenderer().validate({"fps": 30.0})["fps"], 30)
        self.assertIs(type(CardRenderer().validate({"fps": 30.0})["fps"]), int)
        for bad, shown in [
            (0, "0"),
            (61, "61"),
            (61.0, "61"),
            (29.97, "29.97"),
            (True, "true"),
            ("30", '"30"'),
        ]:
            self.assertInvalid({"fps": bad}, "fps", f"must be an integer from 1 to 60, got {shown}")

    def test_size(self) -> None:
        """
        C{size} is C{"WxH"} with an even width from 64 to 1920 and an even
        height from 64 to 1080.
        """
        for good in ["64x64", "1920x1080", "320x180", "1080x1080", "1920x64"]:
            self.assertEqual(CardRenderer().validate({"size": good})["size"], good)
        for bad in [
            "62x64",
            "64x62",
            "1922x720",
            "1280x1082",
            "65x64",
            "64x65",
            "1281x720",
            "1280x721",
            "1280X720",
            " 1280x720",
            "1280x720 ",
            "1280*720",
            "1280x",
            "x720",
            "-1280x720",
            "1280x720x3",
            "\u0661\u0662\u0668\u0660x720",
            "",
            1280,
            [1280, 720],
            None,
        ]:
            self.assertInvalid({"size": bad}, "size")
        self.assertInvalid(
            {"size": "1281x720"},
            "size",
            'must be "WxH" with an even width from 64 to 1920 and an even height from 64 to 1080, '
            'got "1281x720"',
        )

    def test_colours(self) -> None:
        """
        C{background}, C{foreground} and C{accent} are C{"#rrggbb"}.
        """
        for field in ["background", "foreground", "accent"]:
            self.assertEqual(CardRenderer().validate({field: "#A1b2C3"})[field], "#a1b2c3")
            for bad in [
                "red",
                "#fff",
                "#ffffff0",
                "ffffff",
                "#gggggg",
                "#ffffff\n",
                "0xffffff",
                0xFFFFFF,
                None,
            ]:
                self.assertInvalid({field: bad}, field)
            self.assertInvalid({field: "red"}, field, 'must be a colour "#rrggbb", got "red"')

    def test_titleLength(self) -> None:
        """
        C{title} is 1 to 200 characters (code points, not bytes).
        """
        for good in ["x", "x" * 200, "\U0001f389" * 200]:
            self.assertEqual(CardRenderer().validate({"title": good})["title"], good)
        self.assertInvalid(
            {"title": ""}, "title", "must be a string of 1 to 200 characters, got 0 characters"
        )
        self.assertInvalid(
            {"title": "x" * 201}, "title", "must be a string of 1 to 200 characters, got 201 characters"
        )

    def test_subtitleLength(self) -> None:
        """
        C{subtitle} is 0 to 200 characters.
        """
        for good in ["", "x" * 200]:
            self.assertEqual(CardRenderer().validate({"subtitle": good})["subtitle"], good)
        self.assertInvalid(
            {"subtitle": "x" * 201},
            "subtitle",
            "must be a string of 0 to 200 characters, got 201 characters",
        )

    def test_textTypes(self) -> None:
        """
        Titles and subtitles must be strings.
        """
        for field in ["title", "subtitle"]:
            for bad in [1, None, True, ["x"], {"x": 1}]:
                self.assertInvalid({field: bad}, field)

    def test_textControlCharacters(self) -> None:
        """
        Newline and tab are allowed; every other C0 control, DEL and the
        C1 controls are refused, and the error shows which and where.
        """
        for field in ["title", "subtitle"]:
            self.assertEqual(CardRenderer().validate({field: "a\nb\tc"})[field], "a\nb\tc")
            for code in [*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0x7F, 0x85, 0x9F]:
                self.assertInvalid({field: "ab" + chr(code)}, field)
        self.assertInvalid(
            {"title": "ab\x00"},
            "title",
            "must not contain control characters other than newline and tab, got '\\x00' at index 2",
        )

    def test_loneSurrogate(self) -> None:
        """
        A lone surrogate (JSON can encode one) is refused: the text must be
        written out as UTF-8.
        """
        self.assertInvalid({"title": "a\ud800"}, "title")

    def test_hostileTextsAccepted(self) -> None:
        """
        Text that means something to ffmpeg, a shell or SSE is accepted as
        is: it never reaches any of them.
        """
        for text in HOSTILE_TEXTS:
            card = CardRenderer().validate({"title": text, "subtitle": text})
            self.assertEqual((card["title"], card["subtitle"]), (text, text))


class EscapeFilterValueTests(SynchronousTestCase):
    """
    L{_escapeFilterValue} makes any string reach a filter option intact,
    checked here against a model of ffmpeg's parser; the render tests
    check it against ffmpeg itself.
    """

    def test_plain(self) -> None:
        """
        Values with no special character are left alone.
        """
        for value in ["/tmp/work/job.title.txt", "(w-text_w)/2", "0x38BDF8@0.25", "-w+w*(n+1)/150"]:
            self.assertEqual(_escapeFilterValue(value), value)

    def test_quotedAndEscaped(self) -> None:
        """
        Other values are quoted for the option level, and the quotes and
        specials escaped for the graph level.
        """
        self.assertEqual(_escapeFilterValue("a b"), "\\'a b\\'")
        self.assertEqual(_escapeFilterValue("it's"), "\\'it\\'\\\\\\'\\'s\\'")
        self.assertEqual(_escapeFilterValue("a:b,c;d[e]\\"), "\\'a:b\\,c\\;d\\[e\\]\\\\\\'")
        self.assertEqual(_escapeFilterValue(""), "\\'\\'")

    def test_specials(self) -> None:
        """
        Each special character, alone and in company, survives both levels.
        """
        for value in [
            "'",
            ":",
            "\\",
            ",",
            ";",
            "[",
            "]",
            "=",
            " ",
            "\n",
            "\t",
            "\r",
            " x ",
            "''",
            "\\'",
            "é日本",
        ]:
            self.assertEqual(parseOption(_escapeFilterValue(value)), value)
        self.assertEqual(parseOption(_escapeFilterValue(HOSTILE_DIRECTORY)), HOSTILE_DIRECTORY)

    @given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")))
    def test_anyString(self, value: str) -> None:
        """
        Any string without NUL (which no argument can hold) survives both
        levels.
        """
        self.assertEqual(parseOption(_escapeFilterValue(value)), value)


# A model of ffmpeg's libavutil av_get_token(), which both levels of
# filter-graph parsing use, to check the escaping against many strings.
_WHITESPACES = " \n\t\r"


def avGetToken(buf: str, term: str) -> tuple[str, str]:
    """
    Return the token at the start of C{buf} and the rest, as ffmpeg's
    C{av_get_token(&buf, term)} does: leading whitespace skipped, C{\\}
    escapes any character, C{'...'} quotes, unescaped trailing whitespace
    dropped.
    """
    out: list[str] = []
    end = 0
    p = 0
    while p < len(buf) and buf[p] in _WHITESPACES:
        p += 1
    while p < len(buf) and buf[p] not in term:
        c = buf[p]
        p += 1
        if c == "\\" and p < len(buf):
            out.append(buf[p])
            p += 1
            end = len(out)
        elif c == "'":
            while p < len(buf) and buf[p] != "'":
                out.append(buf[p])
                p += 1
            if p < len(buf):
                p += 1
                end = len(out)
        else:
            out.append(c)
    while len(out) > end and out[-1] in _WHITESPACES:
        out.pop()
    return "".join(out), buf[p:]


def parseOption(escaped: str) -> str:
    """
    Put C{textfile=<escaped>} between two other options of a filter in a
    chain, parse it as ffmpeg does, and return the value C{textfile} gets.
    """
    graph = f"drawtext=x=0:textfile={escaped}:y=0,null"
    name, rest = avGetToken(graph, "=,;[\n")
    assert (name, rest[0]) == ("drawtext", "=")
    args, rest = avGetToken(rest[1:], "[],;\n")
    assert rest == ",null", rest
    options = {}
    while args:
        key, args = avGetToken(args, "=")
        value, args = avGetToken(args[1:], ":")
        options[key] = value
        args = args[1:]
    assert list(options) == ["x", "textfile", "y"], options
    return options["textfile"]


class PlanTests(SynchronousTestCase):
    """
    L{CardRenderer.plan} writes the text files and builds an argv that
    holds no client text.
    """

    def plan(self, workdir: Path, **params: Any) -> RenderPlan:
        renderer = CardRenderer(ffmpeg="/opt/ffmpeg/bin/ffmpeg")
        return renderer.plan(renderer.validate(params), workdir, "AbC-_9")

    def test_files(self) -> None:
        """
        The output, the scratch files and the finalizer are named from the
        stem inside the working directory; the text files exist at once.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(workdir, title="Hello", subtitle="World")
        self.assertEqual(plan.output, workdir / "AbC-_9.mp4")
        self.assertEqual(
            list(plan.scratch),
            [workdir / "AbC-_9.title.txt", workdir / "AbC-_9.subtitle.txt", workdir / "AbC-_9.part.mp4"],
        )
        self.assertEqual((workdir / "AbC-_9.title.txt").read_bytes(), b"Hello")
        self.assertEqual((workdir / "AbC-_9.subtitle.txt").read_bytes(), b"World")
        self.assertEqual(plan.argv[-1], f"file:{workdir}/AbC-_9.part.mp4")
        self.assertIsNone(plan.stdin)

    def test_emptySubtitle(self) -> None:
        """
        An empty subtitle is still written (an empty file), but not drawn.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(workdir)
        self.assertEqual((workdir / "AbC-_9.subtitle.txt").read_bytes(), b"")
        graph = plan.argv[plan.argv.index("-vf") + 1]
        self.assertEqual(graph.count("drawtext="), 1)
        self.assertNotIn("subtitle", graph)

    def test_argv(self) -> None:
        """
        The command is the configured ffmpeg with the documented options:
        a lavfi colour source, an exact frame count, x264 in yuv420p, an
        MP4 with faststart, and progress on stdout every 0.05 s.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(workdir, duration=2, size="320x180", fps=10, background="#102030")
        argv = list(plan.argv)
        self.assertEqual(argv[0], "/opt/ffmpeg/bin/ffmpeg")
        self.assertEqual(
            argv[1:8],
            ["-hide_banner", "-nostdin", "-y", "-f", "lavfi", "-i", "color=c=0x102030:s=320x180:r=10"],
        )
        for option, value in [
            ("-frames:v", "20"),
            ("-c:v", "libx264"),
            ("-preset", "veryfast"),
            ("-pix_fmt", "yuv420p"),
            ("-f", "mp4"),
            ("-movflags", "+faststart"),
            ("-progress", "pipe:1"),
            ("-stats_period", "0.05"),
        ]:
            self.assertEqual(argv[len(argv) - argv[::-1].index(option)], value, option)
        self.assertIn("-nostats", argv)
        self.assertEqual(plan.mediaDuration, 2.0)
        self.assertNotIn("-threads", argv)

    def test_threads(self) -> None:
        """
        With a thread cap, ffmpeg gets it for the filter graph (the global
        C{-filter_threads}, before the input) and for the encoder (the
        output option C{-threads}, before the output file).
        """
        renderer = CardRenderer(ffmpeg="/opt/ffmpeg/bin/ffmpeg", threads=3)
        argv = list(renderer.plan(renderer.validate({}), makeWorkdir(self), "j").argv)
        self.assertEqual(argv[1:6], ["-hide_banner", "-nostdin", "-y", "-filter_threads", "3"])
        self.assertLess(argv.index("-threads"), len(argv) - 1)
        self.assertEqual(argv[argv.index("-threads") + 1], "3")
        self.assertGreater(argv.index("-threads"), argv.index("-i"))
        self.assertRaises(ValueError, CardRenderer, threads=0)

    def test_filterGraph(self) -> None:
        """
        The graph draws the text from files with expansion off, in the
        chosen colours, and overlays a bar that is full on the last frame.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(
            workdir, subtitle="s", duration=2, fps=10, foreground="#aabbcc", accent="#010203"
        )
        graph = plan.argv[plan.argv.index("-vf") + 1]
        self.assertIn(f"textfile={workdir}/AbC-_9.title.txt:expansion=none:fontcolor=0xAABBCC:", graph)
        self.assertIn(
            f"textfile={workdir}/AbC-_9.subtitle.txt:expansion=none:fontcolor=0xAABBCC@0.75:", graph
        )
        self.assertIn("color=c=0x010203:", graph)
        self.assertIn("overlay=x=-w+w*(n+1)/20:", graph)
        self.assertNotIn("fontfile", graph)

    def test_statsPeriod(self) -> None:
        """
        The progress period is the operator's to set, and must be positive.
        """
        plan = CardRenderer(statsPeriod=0.25).plan({}, makeWorkdir(self), "j")
        self.assertEqual(plan.argv[plan.argv.index("-stats_period") + 1], "0.25")
        self.assertRaises(ValueError, CardRenderer, statsPeriod=0)

    def test_fontfile(self) -> None:
        """
        An operator's font file is given to every drawtext, escaped.
        """
        workdir = makeWorkdir(self)
        renderer = CardRenderer(fontfile="/fonts/it's here.ttf")
        plan = renderer.plan(renderer.validate({"subtitle": "s"}), workdir, "j")
        graph = plan.argv[plan.argv.index("-vf") + 1]
        self.assertEqual(graph.count("fontfile=" + _escapeFilterValue("/fonts/it's here.ttf") + ":"), 2)

    def test_fractionalDuration(self) -> None:
        """
        The frame count is the duration times the rate, rounded, and the
        media duration is what that many frames last.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(workdir, duration=1.05, fps=30)
        self.assertEqual(plan.argv[plan.argv.index("-frames:v") + 1], "32")
        self.assertAlmostEqual(plan.mediaDuration, 32 / 30)

    def test_hostileTextNeverInArgv(self) -> None:
        """
        Hostile titles and subtitles are written to their files
        byte-for-byte as UTF-8, and appear nowhere in the argv or the
        environment.
        """
        for index, text in enumerate(HOSTILE_TEXTS):
            workdir = makeWorkdir(self)
            title = f"\u00abTITLE{index}\u00bb{text}"
            subtitle = f"\u00abSUB{index}\u00bb{text}"
            plan = self.plan(workdir, title=title, subtitle=subtitle)
            self.assertEqual((workdir / "AbC-_9.title.txt").read_bytes(), title.encode("utf-8"))
            self.assertEqual((workdir / "AbC-_9.subtitle.txt").read_bytes(), subtitle.encode("utf-8"))
            for argument in [*plan.argv, *plan.env.values()]:
                self.assertNotIn("TITLE", argument)
                self.assertNotIn("SUB", argument)
                self.assertNotIn("\u00ab", argument)

    def test_revalidates(self) -> None:
        """
        C{plan} validates its params again, so unchecked values never reach
        the command line, and fills in defaults.
        """
        workdir = makeWorkdir(self)
        renderer = CardRenderer()
        self.assertRaises(InvalidParams, renderer.plan, {"background": "red;drawtext"}, workdir, "j")
        self.assertRaises(InvalidParams, renderer.plan, {"extra": 1}, workdir, "j")
        self.assertEqual(os.listdir(workdir), [])
        plan = renderer.plan({}, workdir, "j")
        self.assertIn("-frames:v", plan.argv)

    def test_badStem(self) -> None:
        """
        A stem that is not a plain file name is a programming error.
        """
        workdir = makeWorkdir(self)
        for stem in ["", ".", "..", "a/b", "../x", "a\0b"]:
            self.assertRaises(ValueError, CardRenderer().plan, {}, workdir, stem)

    def test_relativeWorkdir(self) -> None:
        """
        Paths in the plan are absolute, whatever the child's working
        directory turns out to be.
        """
        workdir = makeWorkdir(self)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir.parent)
        plan = CardRenderer().plan({}, Path(workdir.name), "j")
        self.assertEqual(plan.output, workdir / "j.mp4")
        self.assertTrue(all(path.is_absolute() for path in plan.scratch))
        self.assertEqual(plan.argv[-1], f"file:{workdir}/j.part.mp4")

    def test_environment(self) -> None:
        """
        The child's environment is minimal and points its home and
        temporary directory at the working directory.
        """
        workdir = makeWorkdir(self)
        plan = self.plan(workdir)
        self.assertEqual(
            {key: value for key, value in plan.env.items() if not key.startswith("FONTCONFIG_")},
            {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": str(workdir),
                "TMPDIR": str(workdir),
                "LANG": "C.UTF-8",
            },
        )

    def test_fontconfigPassedThrough(self) -> None:
        """
        The service's fontconfig location, if set, is passed on.
        """
        workdir = makeWorkdir(self)
        self.patch(os, "environ", {**os.environ, "FONTCONFIG_FILE": "/etc/fonts/x.conf", "SECRET": "s"})
        plan = self.plan(workdir)
        self.assertEqual(plan.env["FONTCONFIG_FILE"], "/etc/fonts/x.conf")
        self.assertNotIn("SECRET", plan.env)

    def test_defaultFFmpeg(self) -> None:
        """
        Without an C{ffmpeg} argument the bundled one is used.
        """
        plan = CardRenderer().plan({}, makeWorkdir(self), "j")
        self.assertEqual(plan.argv[0], imageio_ffmpeg.get_ffmpeg_exe())

    def test_parser(self) -> None:
        """
        The plan's parser is an L{IProgressParser} that measures progress
        against this render's frame count.
        """
        plan = self.plan(makeWorkdir(self), duration=2, fps=10)
        self.assertTrue(verifyObject(IProgressParser, plan.parser))
        [payload] = plan.parser.feed(b"frame=5\nprogress=continue\n")
        self.assertEqual((payload["percent"], payload["total_frames"]), (25.0, 20))


class FinalizeTests(SynchronousTestCase):
    """
    The plan's C{finalize} moves a successful render's output into place.
    """

    def test_renames(self) -> None:
        """
        The partial output is renamed to the final name.
        """
        workdir = makeWorkdir(self)
        plan = CardRenderer().plan({}, workdir, "j")
        (workdir / "j.part.mp4").write_bytes(b"data")
        assert plan.finalize is not None
        plan.finalize()
        self.assertFalse((workdir / "j.part.mp4").exists())
        self.assertEqual((workdir / "j.mp4").read_bytes(), b"data")

    def test_missing(self) -> None:
        """
        A missing output fails the render, without naming server paths.
        """
        workdir = makeWorkdir(self)
        plan = CardRenderer().plan({}, workdir, "j")
        assert plan.finalize is not None
        error = self.assertRaises(RenderProtocolError, plan.finalize)
        self.assertEqual(str(error), "ffmpeg exited 0 but wrote no output file")
        self.assertFalse((workdir / "j.mp4").exists())

    def test_empty(self) -> None:
        """
        An empty output fails the render and is not renamed.
        """
        workdir = makeWorkdir(self)
        plan = CardRenderer().plan({}, workdir, "j")
        (workdir / "j.part.mp4").write_bytes(b"")
        assert plan.finalize is not None
        error = self.assertRaises(RenderProtocolError, plan.finalize)
        self.assertEqual(str(error), "ffmpeg exited 0 but wrote an empty output file")
        self.assertFalse((workdir / "j.mp4").exists())


def probe(path: Path) -> tuple[int, float, str]:
    """
    Decode C{path} with ffmpeg; return its frame count, its container
    duration in seconds, and ffmpeg's stderr.
    """
    result = subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-i",
            "file:" + str(path),
            "-f",
            "null",
            "-progress",
            "pipe:1",
            "-nostats",
            "-",
        ],
        capture_output=True,
        timeout=FFMPEG_TIMEOUT,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0:
        raise AssertionError(f"ffmpeg could not decode {path}: {stderr}")
    frames = int(re.findall(rb"^frame=(\d+)$", result.stdout, re.M)[-1])
    match = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", stderr)
    assert match is not None, stderr
    hours, minutes, seconds = match.groups()
    return frames, (int(hours) * 60 + int(minutes)) * 60 + float(seconds), stderr


class RenderTests(TestCase):
    """
    Real renders with the bundled ffmpeg, in hostile surroundings.
    """

    def render(
        self, renderer: CardRenderer, params: dict[str, Any], workdir: Path
    ) -> tuple[RenderPlan, list]:
        """
        Plan and run one render as the service would (argv, env and no
        stdin); check the scratch files exist while it runs and that it
        exits 0; finalize it and return the plan and progress payloads.
        """
        plan = renderer.plan(renderer.validate(params), workdir, "j0b-ID_x")
        self.assertTrue(all(path.exists() for path in plan.scratch[:2]))
        result = subprocess.run(
            list(plan.argv),
            env=dict(plan.env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FFMPEG_TIMEOUT,
        )
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, stderr)
        self.assertTrue(all(path.exists() for path in plan.scratch), stderr)
        payloads = plan.parser.feed(result.stdout) + plan.parser.end()
        assert plan.finalize is not None
        plan.finalize()
        return plan, payloads

    def test_hostileTitleAndWorkdir(self) -> None:
        """
        A card whose title holds filter syntax, quotes and expansions,
        rendered in a directory whose name holds every character special
        to ffmpeg, is a valid H.264 MP4 of exactly duration x fps frames,
        moov first; progress never says 100.
        """
        workdir = makeWorkdir(self, HOSTILE_DIRECTORY)
        title = (
            "it's: 50% \\ %{pts} %{eif:1:d}\n"
            "[x];, \u05e2\u05d1\u05e8\u05d9\u05ea \U0001f389\n"
            "\n"
            "event: complete"
        )
        params = {
            "title": title,
            "subtitle": "[in]null[out]; 'sub'",
            "duration": 1,
            "size": "320x180",
            "fps": 10,
        }
        plan, payloads = self.render(CardRenderer(), params, workdir)

        self.assertEqual(
            sorted(os.listdir(workdir)), ["j0b-ID_x.mp4", "j0b-ID_x.subtitle.txt", "j0b-ID_x.title.txt"]
        )
        assert plan.output is not None
        frames, duration, stderr = probe(plan.output)
        self.assertEqual(frames, 10)
        self.assertAlmostEqual(duration, 1.0, delta=0.02)
        self.assertAlmostEqual(duration, plan.mediaDuration, delta=0.02)
        self.assertRegex(stderr, r"Video: h264 .*yuv420p.*320x180")
        data = plan.output.read_bytes()
        self.assertLess(data.index(b"moov"), data.index(b"mdat"))

        self.assertGreaterEqual(len(payloads), 1)
        self.assertTrue(all(0 <= p["percent"] <= 99.9 for p in payloads))
        self.assertEqual(payloads[-1]["frame"], 10)
        self.assertEqual(payloads[-1]["total_frames"], 10)

    def test_fontfileInHostileDirectory(self) -> None:
        """
        An operator's font file in a directory with special characters
        reaches drawtext intact and is loaded (drawtext falls back to
        fontconfig silently, so ffmpeg's debug log is the witness: it shows
        the value set and, on a fallback, which font it used instead).
        """
        source = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        if not source.exists():
            self.skipTest(f"{source} is not installed")
        workdir = makeWorkdir(self, HOSTILE_DIRECTORY)
        fontfile = workdir / "font 'x':,;[].ttf"
        shutil.copyfile(source, fontfile)
        renderer = CardRenderer(fontfile=str(fontfile))
        plan = renderer.plan(
            renderer.validate({"subtitle": "s", "duration": 1, "size": "64x64", "fps": 2}), workdir, "j"
        )
        argv = [plan.argv[0], "-v", "debug", *plan.argv[1:]]
        result = subprocess.run(argv, env=dict(plan.env), capture_output=True, timeout=FFMPEG_TIMEOUT)
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, stderr[-2000:])
        self.assertIn(f"Setting 'fontfile' to value '{fontfile}'", stderr)
        self.assertNotIn('Using "', stderr)
        assert plan.finalize is not None and plan.output is not None
        plan.finalize()
        self.assertEqual(probe(plan.output)[0], 2)

    def test_escapingAgainstFFmpeg(self) -> None:
        """
        ffmpeg itself reads back every special string exactly as escaped
        by L{_escapeFilterValue}: each is set as a drawtext C{text} in one
        graph, and ffmpeg's debug log shows the value it set. (Client text
        never goes into a graph; this only exercises the escaping.)
        """
        values = [
            "'",
            ":",
            "\\",
            ",",
            ";",
            "[",
            "]",
            "=",
            "a b",
            " lead",
            "trail ",
            "\t",
            "\n",
            "''",
            "\\'",
            "x=1:y=2",
            "[in]null[out]",
            "%{pts}",
            HOSTILE_DIRECTORY,
            *(t for t in HOSTILE_TEXTS if t.strip()),
        ]
        graph = ",".join(
            f"drawtext=expansion=none:fontsize=8:text={_escapeFilterValue(value)}" for value in values
        )
        argv = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-v",
            "debug",
            "-nostdin",
            "-f",
            "lavfi",
            "-i",
            "color=s=64x64:r=1",
            "-frames:v",
            "1",
            "-vf",
            graph,
            "-f",
            "null",
            "-",
        ]
        result = subprocess.run(argv, capture_output=True, timeout=FFMPEG_TIMEOUT)
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, stderr[-2000:])
        for value in values:
            self.assertIn(f"Setting 'text' to value '{value}'\n", stderr)

"""
Operator-registered command renderers (C{--renderer NAME=COMMAND}).

The operator names a command; clients choose it by name only and never
supply a command, a path or a flag. The child gets the client's C{params}
as JSON on stdin and prints one JSON object per line on stdout; each line
becomes a C{progress} event whose data is that object, every field kept.
It may write an MP4 to the path in C{$TWISTEDSSE_OUTPUT}; exit 0 completes
the render.

The child does not get the service's environment (which may hold its
secrets): only L{ALLOWED_VARIABLES} of it, its C{TWISTEDSSE_*} variables,
and what the operator passes on with C{--render-env} (see
L{renderEnvironment}).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import attrs
from zope.interface import implementer

from . import _json
from ._errors import InvalidParams, RenderProtocolError
from ._interfaces import IProgressParser, IRenderer, RenderPlan
from ._json import JSONObject
from ._lines import LineBuffer, LineTooLong

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")

#: What a command renderer gets of the service's environment: where to
#: find programs, and the locale (C{LC_ALL}, when the operator set it,
#: overrides C{LANG}: passing one without the other would give the child
#: another locale than the operator chose).
ALLOWED_VARIABLES = ("PATH", "LANG", "LC_ALL")

#: The prefix of the variables twistedsse sets for a render itself.
RESERVED_PREFIX = "TWISTEDSSE_"


def allowedEnvironment(environ: Mapping[str, str]) -> dict[str, str]:
    """
    The allow-listed part of C{environ}: C{PATH} (the system default if
    unset), C{LANG} (C{C.UTF-8} if unset) and C{LC_ALL} if set.
    """
    env = {name: environ[name] for name in ALLOWED_VARIABLES if name in environ}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    return env


def checkRenderEnv(spec: str) -> str:
    """
    Check one C{--render-env} value: C{NAME} (pass the service's own
    variable on, if it has it) or C{NAME=VALUE}.

    @raise ValueError: an empty or malformed name, a NUL, or a name of
        twistedsse's own (C{TWISTEDSSE_*}: a render's output path is not
        the operator's to move).
    """
    name, _, value = spec.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"expected NAME or NAME=VALUE with NAME of letters, digits and '_', got {spec!r}")
    if "\0" in value:
        raise ValueError(f"a NUL in the value of {name}")
    if name.upper().startswith(RESERVED_PREFIX):
        raise ValueError(f"{name} is set by twistedsse itself")
    return spec


def renderEnvironment(specs: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """
    The variables C{--render-env} adds to every render's environment:
    C{NAME=VALUE} as given, C{NAME} with its value in C{environ} (the
    service's environment), or not at all if it has none there.

    @raise ValueError: see L{checkRenderEnv}.
    """
    env: dict[str, str] = {}
    for spec in specs:
        name, sep, value = checkRenderEnv(spec).partition("=")
        if sep:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env


def checkRendererName(name: str) -> str:
    """
    Renderer names appear in URLs and JSON: keep them plain.

    @raise ValueError: C{name} is not 1-64 of C{[a-z0-9_.-]}, starting with
        a letter or digit.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"renderer name must be 1-64 characters of a-z, 0-9, '_', '.', '-', got {name!r}"
        )
    return name


class BrokenOutput(RenderProtocolError):
    """
    A stdout line broke the protocol.

    @ivar payloads: the progress payloads of the good lines that came
        before it in the same chunk, in order: L{RenderProtocol} delivers
        them before it fails the render, so that no progress is lost.
    """

    def __init__(self, message: str, payloads: Sequence[JSONObject]) -> None:
        super().__init__(message)
        self.payloads = payloads


def _strictProblem(value: object) -> str | None:
    """
    Why C{value} (decoded JSON) could not be sent on as strict UTF-8 JSON,
    or C{None} if it can. Python's JSON reader takes C{1e400} (as infinity)
    and C{"\\ud800"} (a lone surrogate), which our strict writer refuses
    and UTF-8 cannot encode: found here, they are the client's or the
    child's error, not a failure later when the value is sent on.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return "a number too large for a double"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return f"a lone surrogate in {_escape(item)!r}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _escape(text: str) -> str:
    """
    C{text} with anything UTF-8 cannot encode (lone surrogates) escaped,
    so that it can go into a message, and cut to 60 characters.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."


@implementer(IProgressParser)
@attrs.define
class JSONLinesParser:
    """
    One JSON object per line; blank lines are skipped. Anything else is a
    broken protocol and fails the render: silently dropping a line would
    hide a broken renderer from its operator. So is an object that could
    not be sent on as strict UTF-8 JSON (a number that overflows to
    infinity, a lone surrogate).

    The good lines before a broken one are never lost: they travel with
    the error (L{BrokenOutput.payloads}).
    """

    _lines: LineBuffer = attrs.field(factory=LineBuffer)
    _count: int = 0

    def _parse(self, lines: Sequence[bytes]) -> list[JSONObject]:
        payloads: list[JSONObject] = []
        for line in lines:
            self._count += 1
            if not line.strip():
                continue
            try:
                value = _json.loads(line)
            except (ValueError, RecursionError):
                value = None
            if not isinstance(value, dict):
                raise BrokenOutput(f"stdout line {self._count} is not a JSON object: {line[:200]!r}", payloads)
            problem = _strictProblem(value)
            if problem is not None:
                raise BrokenOutput(f"stdout line {self._count} is not strict JSON: {problem}", payloads)
            payloads.append(value)
        return payloads

    def _read(self, read: Callable[[], list[bytes]]) -> list[JSONObject]:
        try:
            lines = read()
        except LineTooLong as e:
            # The lines before the long one: deliver them, unless one of
            # them is broken too (it came first, so its error wins).
            raise BrokenOutput(str(e), self._parse(e.lines)) from None
        return self._parse(lines)

    def feed(self, data: bytes) -> list[JSONObject]:
        return self._read(lambda: self._lines.feed(data))

    def end(self) -> list[JSONObject]:
        return self._read(self._lines.end)


def _jsonType(value: object) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "an array"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _finalize(part: Path, final: Path) -> None:
    # The output is optional for a command renderer; a present, non-empty
    # file becomes the render's output.
    if part.exists():
        if part.stat().st_size > 0:
            os.replace(part, final)
        else:
            part.unlink()


def _argvTuple(argv: Iterable[str]) -> tuple[str, ...]:
    # Typed, unlike the bare C{tuple} converter (which mypy cannot solve).
    return tuple(argv)


@implementer(IRenderer)
@attrs.frozen
class CommandRenderer:
    """
    @ivar argv: the operator's command, split as a shell would split it,
        run without one.
    @ivar env: the child's environment (before its C{TWISTEDSSE_*}
        variables); by default the allow-listed part of the service's own
        (L{allowedEnvironment}): the operator's command is trusted, but the
        service's environment may hold secrets it does not need. What else
        it needs, the operator passes on with C{--render-env}.
    """

    name: str = attrs.field(validator=lambda self, a, v: checkRendererName(v))
    argv: tuple[str, ...] = attrs.field(converter=_argvTuple)
    env: Mapping[str, str] | None = None

    @argv.validator
    def _checkArgv(self, attribute: object, value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError(f"renderer {self.name!r}: empty command")

    @classmethod
    def fromSpec(cls, spec: str) -> CommandRenderer:
        """
        Parse C{NAME=COMMAND}, as given to C{--renderer}.

        @raise ValueError: no C{=}, a bad name, or a command that does not
            split (unbalanced quotes) or is empty.
        """
        name, sep, command = spec.partition("=")
        if not sep:
            raise ValueError(f"expected NAME=COMMAND, got {spec!r}")
        return cls(name.strip(), shlex.split(command))

    def validate(self, params: object) -> JSONObject:
        """
        Any JSON object (C{null}: C{{}}), as long as it can be sent on as
        strict UTF-8 JSON: it goes to the child's stdin and back to clients
        in the job's status.

        @raise InvalidParams: not an object, or it holds a number that
            overflows to infinity or a lone surrogate (named by its
            top-level field).
        """
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise InvalidParams("params", f"must be a JSON object, got {_jsonType(params)}")
        for key, value in params.items():
            problem = _strictProblem(key) or _strictProblem(value)
            if problem is not None:
                raise InvalidParams(_escape(str(key)), f"must be strict JSON, got {problem}")
        return params

    def plan(self, params: JSONObject, workdir: Path, stem: str) -> RenderPlan:
        # Absolute: the child runs in the working directory, so a relative
        # one (an operator's "--output-dir renders") would point inside it.
        workdir = Path(workdir).absolute()
        part = workdir / f"{stem}.part.mp4"
        final = workdir / f"{stem}.mp4"
        env = allowedEnvironment(os.environ) if self.env is None else dict(self.env)
        env["TWISTEDSSE_OUTPUT"] = str(part)
        env["TWISTEDSSE_RENDER_ID"] = stem
        return RenderPlan(
            argv=self.argv,
            env=env,
            stdin=json.dumps(params).encode("utf-8") + b"\n",
            parser=JSONLinesParser(),
            output=final,
            scratch=(part,),
            finalize=lambda: _finalize(part, final),
        )

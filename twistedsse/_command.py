"""
Operator-registered command renderers (C{--renderer NAME=COMMAND}).

The operator names a command; clients choose it by name only and never
supply a command, a path or a flag. The child gets the client's C{params}
as JSON on stdin and prints one JSON object per line on stdout; each line
becomes a C{progress} event whose data is that object, every field kept.
It may write an MP4 to the path in C{$TWISTEDSSE_OUTPUT}; exit 0 completes
the render.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Mapping

import attrs
from zope.interface import implementer

from . import _json
from ._errors import InvalidParams, RenderProtocolError
from ._interfaces import IProgressParser, IRenderer, RenderPlan
from ._lines import LineBuffer

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")


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


@implementer(IProgressParser)
@attrs.define
class JSONLinesParser:
    """
    One JSON object per line; blank lines are skipped. Anything else is a
    broken protocol and fails the render: silently dropping a line would
    hide a broken renderer from its operator.
    """

    _lines: LineBuffer = attrs.field(factory=LineBuffer)
    _count: int = 0

    def _parse(self, lines: list[bytes]) -> list[dict[str, Any]]:
        payloads = []
        for line in lines:
            self._count += 1
            if not line.strip():
                continue
            try:
                value = _json.loads(line)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise RenderProtocolError(
                    f"stdout line {self._count} is not a JSON object: {line[:200]!r}"
                )
            payloads.append(value)
        return payloads

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._parse(self._lines.feed(data))

    def end(self) -> list[dict[str, Any]]:
        return self._parse(self._lines.end())


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


@implementer(IRenderer)
@attrs.frozen
class CommandRenderer:
    """
    @ivar argv: the operator's command, split as a shell would split it,
        run without one.
    @ivar env: the child's environment; by default the server's own (the
        operator's command is trusted and may need its PATH or virtualenv).
    """

    name: str = attrs.field(validator=lambda self, a, v: checkRendererName(v))
    argv: tuple[str, ...] = attrs.field(converter=tuple)
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

    def validate(self, params: object) -> Mapping[str, Any]:
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise InvalidParams("params", f"must be a JSON object, got {_jsonType(params)}")
        return params

    def plan(self, params: Mapping[str, Any], workdir: Path, stem: str) -> RenderPlan:
        part = workdir / f"{stem}.part.mp4"
        final = workdir / f"{stem}.mp4"
        env = dict(os.environ if self.env is None else self.env)
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

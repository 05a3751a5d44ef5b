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

import itertools
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import attrs
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012
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


#: A command renderer's C{params} schema when the operator gives none:
#: any JSON object.
OPEN_SCHEMA: Mapping[str, Any] = {"type": "object"}

#: The largest schema file an operator may give (C{--renderer-schema}).
MAX_SCHEMA_BYTES = 1024 * 1024

#: How many of a body's schema errors are weighed to pick the one the
#: client is told (jsonschema's C{best_match}): a bound on the work a
#: body that breaks the schema everywhere can cause.
_ERRORS_WEIGHED = 20


def _uniqueKey(value: object) -> object:
    """
    A hashable key equal for JSON values JSON Schema deems equal: C{1}
    and C{1.0} alike, C{true} and C{1} not, objects by their members.
    """
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, dict):
        return ("o", frozenset((k, _uniqueKey(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("a", tuple(_uniqueKey(v) for v in value))
    return ("v", value)


def _uniqueItems(validator: Any, unique: object, instance: Any, schema: object) -> Iterator[ValidationError]:
    """
    C{uniqueItems} in linear time. jsonschema's own compares every pair
    of items that do not sort (objects), which a 64 KiB body of 8 000 small
    objects turns into seconds of the reactor's time (measured: 16 s).
    """
    if unique and validator.is_type(instance, "array"):
        seen: set[object] = set()
        for index, item in enumerate(instance):
            key = _uniqueKey(item)
            if key in seen:
                yield ValidationError(f"item {index} is a duplicate: the items must be unique")
                return
            seen.add(key)


def _localReferences(schema: object) -> Iterator[str]:
    """
    Every C{$ref} and C{$dynamicRef} in C{schema}.
    """
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                    yield value
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


@attrs.frozen
class ParamsSchema:
    """
    An operator's JSON Schema for a command renderer's C{params}, checked
    (L{fromFile}) and ready to validate with.

    The schema is the operator's: how much work a schema can make is
    theirs to bound (a pattern that backtracks, say). What a client's body
    can add to it is bounded: the body is at most 64 KiB, C{uniqueItems}
    is linear (L{_uniqueItems}), only the first few errors are weighed,
    a body nested too deeply to validate is refused, and references are
    only ever resolved within the file (nothing is fetched).

    @ivar schema: the schema, as in the file.
    """

    schema: Mapping[str, Any]
    _validator: Any = attrs.field(repr=False)

    @classmethod
    def fromJSON(cls, schema: object) -> ParamsSchema:
        """
        @raise ValueError: C{schema} is not a JSON object, or not a valid
            schema of the draft its C{$schema} names (2020-12 without
            one), or it refers to anything outside itself.
        """
        if not isinstance(schema, dict):
            raise ValueError(f"a schema must be a JSON object, got {_jsonType(schema)}")
        kind = validator_for(schema, default=Draft202012Validator)
        try:
            kind.check_schema(schema)
        except SchemaError as e:
            where = "/".join(str(part) for part in e.absolute_path)
            raise ValueError(f"not a valid JSON Schema: {_cut(e.message, 200)} (at /{where})") from None
        # No retrieval: a reference to anything but the file itself is
        # refused here, and could not be fetched later.
        resource = Resource.from_contents(schema, default_specification=DRAFT202012)
        registry: Registry[Any] = Registry().with_resource(_SCHEMA_URI, resource)
        resolver = registry.resolver(_SCHEMA_URI)
        for reference in _localReferences(schema):
            if not reference.startswith("#"):
                raise ValueError(f"$ref {reference!r}: only references within the file are supported")
            try:
                resolver.lookup(reference)
            except Unresolvable:
                raise ValueError(f"$ref {reference!r} points to nothing in the file") from None
        # Typing note: the stubs leave extend unannotated.
        checking = validators.extend(kind, {"uniqueItems": _uniqueItems})  # type: ignore[no-untyped-call]
        return cls(schema, checking(schema, registry=registry))

    @classmethod
    def fromFile(cls, path: str) -> ParamsSchema:
        """
        Read a schema file (JSON, at most L{MAX_SCHEMA_BYTES}).

        @raise ValueError: see L{fromJSON}; or the file is too large or not
            JSON.
        @raise OSError: it cannot be read.
        """
        with open(path, "rb") as f:
            data = f.read(MAX_SCHEMA_BYTES + 1)
        if len(data) > MAX_SCHEMA_BYTES:
            raise ValueError(f"{path}: over {MAX_SCHEMA_BYTES} bytes")
        try:
            schema = _json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
        try:
            return cls.fromJSON(schema)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def check(self, params: JSONObject) -> None:
        """
        @raise InvalidParams: C{params} do not validate; the error names
            the path to the offending value (C{"size"}, C{"items/3"}), or
            C{params} for the object itself.
        """
        try:
            error = best_match(itertools.islice(self._validator.iter_errors(params), _ERRORS_WEIGHED))
        except RecursionError:
            raise InvalidParams("params", "nested too deeply to validate") from None
        if error is not None:
            # (jsonschema's messages quote the bad value: cut.)
            raise InvalidParams(_path(error.absolute_path) or "params", _cut(error.message, 200))


_SCHEMA_URI = "urn:twistedsse:params-schema"


def _path(parts: Iterable[object]) -> str:
    """
    A path into the params as C{a.3.b}, escaped and cut for an error
    message.
    """
    return _escape(".".join(str(part) for part in parts))


def _cut(text: str, limit: int) -> str:
    """
    C{text} with anything UTF-8 cannot encode escaped, cut to C{limit}
    characters.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    @ivar schema: the operator's JSON Schema for C{params}
        (C{--renderer-schema}), which L{validate} checks them against (see
        L{ParamsSchema} for what it may hold: a bad one is a C{ValueError}
        here); C{None}: any JSON object.
    @ivar env: the child's environment (before its C{TWISTEDSSE_*}
        variables); by default the allow-listed part of the service's own
        (L{allowedEnvironment}): the operator's command is trusted, but the
        service's environment may hold secrets it does not need. What else
        it needs, the operator passes on with C{--render-env}.
    """

    name: str = attrs.field(validator=lambda self, a, v: checkRendererName(v))
    argv: tuple[str, ...] = attrs.field(converter=_argvTuple)
    env: Mapping[str, str] | None = None
    schema: Mapping[str, Any] | None = None
    _checker: ParamsSchema | None = attrs.field(init=False, eq=False, repr=False)

    @_checker.default
    def _check(self) -> ParamsSchema | None:
        # (ValueError for a schema that is not one: see ParamsSchema.)
        return None if self.schema is None else ParamsSchema.fromJSON(self.schema)

    @property
    def paramsSchema(self) -> Mapping[str, Any]:
        """
        The C{params} schema clients see in C{GET /renderers}: the
        operator's (C{--renderer-schema}), or L{OPEN_SCHEMA}.
        """
        return OPEN_SCHEMA if self.schema is None else self.schema

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
        Any JSON object (C{null}: C{{}}) the operator's schema accepts, if
        there is one, as long as it can be sent on as strict UTF-8 JSON: it
        goes to the child's stdin and back to clients in the job's status.

        @raise InvalidParams: not an object, or it holds a number that
            overflows to infinity or a lone surrogate (named by its
            top-level field), or the schema refuses it (named by the path
            to the value it refuses).
        """
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("params", f"must be a JSON object, got {_jsonType(params)}")
        for key, value in params.items():
            problem = _strictProblem(key) or _strictProblem(value)
            if problem is not None:
                raise InvalidParams(_escape(str(key)), f"must be strict JSON, got {problem}")
        if self._checker is not None:
            self._checker.check(params)
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

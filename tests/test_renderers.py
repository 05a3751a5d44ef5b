"""
Tests for the renderers' C{params} schemas (C{GET /renderers}): the card's,
made from the same field table as its validator
(L{twistedsse._card.FIELDS}), and a command renderer's, an operator's file
(L{twistedsse._command.ParamsSchema}, C{--renderer-schema}).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import tap
from twistedsse._card import DEFAULTS, FIELDS, MAX_TEXT, PARAMS_SCHEMA, CardRenderer
from twistedsse._command import MAX_SCHEMA_BYTES, OPEN_SCHEMA, CommandRenderer, ParamsSchema
from twistedsse._build import buildSite
from twistedsse._errors import InvalidParams
from twistedsse._jobs import paramsSchema
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse
from tests.test_openapi import loadSpec

CARD = Draft202012Validator(PARAMS_SCHEMA)


def cardAccepts(params: object) -> bool:
    """
    Whether L{CardRenderer.validate} accepts C{params}.
    """
    try:
        CardRenderer().validate(params)
    except InvalidParams:
        return False
    return True


#: Values near and at every field's limits, good and bad, and of every
#: JSON type.
_SAMPLES: list[object] = [
    None, True, False, 0, 1, -1, 0.5, 1.0, 29.97, 30, 30.0, 60, 60.0, 61, 60.000001, 0.999999, 10**30,
    "", "x", "x" * MAX_TEXT, "x" * (MAX_TEXT + 1), "two\nlines", "tab\t", "cr\r", "nul\x00", "del\x7f", "c1\x85",
    "\ud800", "ok \U0001f3ac", "#abcdef", "#ABCDEF", "#abcdef\n", "#abcde", "abcdef", "#abcdeg",
    "1280x720", "1920x1080", "1922x1080", "64x64", "62x64", "65x64", "00640x00360", "000640x360",
    "1280x720\n", " 1280x720", "1280X720", "x720", [], {}, ["#abcdef"], {"a": 1},
]


class CardSchemaTests(SynchronousTestCase):
    """
    The card's schema accepts exactly the params its validator accepts.
    """

    def test_validSchema(self) -> None:
        """
        It is a valid 2020-12 schema of an object with one property per
        field, defaults included, and no other.
        """
        Draft202012Validator.check_schema(PARAMS_SCHEMA)
        self.assertEqual(PARAMS_SCHEMA["$schema"], "https://json-schema.org/draft/2020-12/schema")
        self.assertIs(PARAMS_SCHEMA["additionalProperties"], False)
        self.assertEqual(
            {name: prop["default"] for name, prop in PARAMS_SCHEMA["properties"].items()},
            CardRenderer().validate({}),
        )
        self.assertEqual(list(DEFAULTS), [field.name for field in FIELDS])
        self.assertIs(paramsSchema(CardRenderer()), PARAMS_SCHEMA)

    def test_everySample(self) -> None:
        """
        Every sample value, in every field: the schema and the validator
        agree.
        """
        for field in DEFAULTS:
            for value in _SAMPLES:
                params = {field: value}
                self.assertEqual(CARD.is_valid(params), cardAccepts(params), params)
        for params in (None, [], "x", 5, {"colour": "#000000"}, {}):
            self.assertEqual(CARD.is_valid(params), cardAccepts(params), params)

    def test_everySize(self) -> None:
        """
        The size pattern (generated from the limits) and the validator agree
        on every width and every height up to 9999, written with no, up to
        five and six digits (leading zeros), and on 5 and 6-digit ones.
        """
        # Both patterns, as jsonschema applies them to a string (its
        # is_valid, 30 times slower, agrees on the samples above).
        size = PARAMS_SCHEMA["properties"]["size"]
        patterns = [re.compile(size["pattern"]), *(re.compile(s["pattern"]) for s in size["allOf"])]
        mismatches = []
        for n in [*range(10_000), *range(10_000, 1_000_000, 977)]:
            for digits in {str(n), str(n).zfill(4), str(n).zfill(5), str(n).zfill(6)}:
                for value in (f"{digits}x360", f"640x{digits}"):
                    if all(p.search(value) for p in patterns) != cardAccepts({"size": value}):
                        mismatches.append(value)
        self.assertEqual(mismatches, [])

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from([*DEFAULTS, "other"]),
            st.one_of(
                st.sampled_from(_SAMPLES),
                st.text(max_size=MAX_TEXT + 2),
                st.from_regex(r"\A[0-9]{1,6}x[0-9]{1,6}\Z"),
                st.from_regex(r"\A#[0-9a-fA-Z]{5,7}\Z"),
                st.integers(-5, 100),
                st.floats(-5, 100, allow_nan=False),
            ),
        )
    )
    def test_agree(self, params: dict[str, Any]) -> None:
        """
        For any params (Hypothesis), the schema validates them if and only
        if the validator accepts them.
        """
        self.assertEqual(CARD.is_valid(params), cardAccepts(params))

    def test_openAPIDocumentsIt(self) -> None:
        """
        The document's C{CardParams} has the schema's validation keywords,
        exactly; only its prose differs.
        """
        prose = {"description", "examples", "title"}

        def rules(schema: dict[str, Any]) -> dict[str, Any]:
            return {key: value for key, value in schema.items() if key not in prose}

        documented = loadSpec()["components"]["schemas"]["CardParams"]
        self.assertEqual(
            {name: rules(prop) for name, prop in documented["properties"].items()},
            {name: rules(prop) for name, prop in PARAMS_SCHEMA["properties"].items()},
        )
        outer = {key: value for key, value in PARAMS_SCHEMA.items() if key not in ("$schema", "properties")}
        self.assertEqual({key: documented[key] for key in outer}, outer)


def schemaFile(test: SynchronousTestCase, content: object | bytes) -> str:
    """
    A file holding C{content} (JSON unless bytes), removed after the test.
    """
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    directory = Path(tempfile.mkdtemp(prefix="twistedsse-schema-"))
    test.addCleanup(shutil.rmtree, directory, True)
    path = directory / "schema.json"
    path.write_bytes(data)
    return str(path)


TICKS_SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 100},
        "tags": {"type": "array", "uniqueItems": True, "items": {"$ref": "#/$defs/tag"}},
    },
    "required": ["count"],
    "additionalProperties": False,
    "$defs": {"tag": {"type": ["string", "object"]}},
}


class CommandSchemaTests(SynchronousTestCase):
    """
    A command renderer's params are checked against the operator's schema.
    """

    def setUp(self) -> None:
        self.renderer = CommandRenderer("ticks", ["/bin/ticks"], schema=TICKS_SCHEMA)

    def refusal(self, params: object) -> InvalidParams:
        return self.assertRaises(InvalidParams, self.renderer.validate, params)

    def test_withoutSchema(self) -> None:
        """
        Without a schema, any JSON object, and the schema shown is
        C{{"type": "object"}}.
        """
        renderer = CommandRenderer("open", ["/bin/true"])
        self.assertEqual(renderer.validate({"anything": [1, {"x": None}]}), {"anything": [1, {"x": None}]})
        self.assertEqual(renderer.paramsSchema, {"type": "object"})
        self.assertIs(paramsSchema(renderer), OPEN_SCHEMA)

    def test_accepts(self) -> None:
        """
        Params the schema accepts are returned as given; the schema shown
        is the operator's.
        """
        params = {"count": 3, "tags": ["a", {"b": 1}]}
        self.assertEqual(self.renderer.validate(params), params)
        self.assertEqual(paramsSchema(self.renderer), TICKS_SCHEMA)

    def test_refusalsNameThePath(self) -> None:
        """
        A refusal is C{invalid_params} naming the path to the value, or
        C{params} for the object itself.
        """
        cases = [
            ({"count": 0}, "count", "minimum"),
            ({"count": "3"}, "count", "not of type"),
            ({}, "params", "required"),
            ({"count": 1, "extra": 1}, "params", "extra"),
            ({"count": 1, "tags": ["a", 5]}, "tags.1", "not of type"),
            ({"count": 1, "tags": ["a", "a"]}, "tags", "unique"),
            ({"count": 1, "tags": [{"x": 1}, {"x": 1.0}]}, "tags", "unique"),
            (None, "params", "required"),
            ([], "params", "JSON object"),
        ]
        for params, field, words in cases:
            error = self.refusal(params)
            self.assertEqual(error.field, field, params)
            self.assertEqual(error.code, "invalid_params")
            self.assertIn(words, str(error), params)
        # true and 1 are not the same item.
        self.renderer.validate({"count": 1, "tags": [{"x": True}, {"x": 1}]})

    def test_boundedWork(self) -> None:
        """
        A 64 KiB body cannot buy much work: C{uniqueItems} over thousands
        of objects is linear (jsonschema's own took 16 s for this), a body
        that breaks the schema in every item is answered from its first
        errors, and one nested too deeply to validate is refused.
        """
        tags = [{"a": i} for i in range(8000)]
        started = time.perf_counter()
        self.renderer.validate({"count": 1, "tags": tags})
        self.assertEqual(self.refusal({"count": 1, "tags": [*tags, {"a": 0}]}).field, "tags")
        field = self.refusal({"count": 1, "tags": list(range(20000))}).field
        self.assertTrue(field.startswith("tags.") and int(field[5:]) < 20, field)
        self.assertLess(time.perf_counter() - started, 3.0)

        deep = ParamsSchema.fromJSON({"$defs": {"n": {"items": {"$ref": "#/$defs/n"}}}, "properties": {"x": {"$ref": "#/$defs/n"}}})
        renderer = CommandRenderer("deep", ["/bin/true"], schema=deep.schema)
        nested: Any = []
        for _ in range(900):
            nested = [nested]
        error = self.assertRaises(InvalidParams, renderer.validate, {"x": nested})
        self.assertIn("nested too deeply", str(error))

    def test_longMessagesCut(self) -> None:
        """
        jsonschema quotes the bad value: the message is cut, and lone
        surrogates escaped.
        """
        schema = ParamsSchema.fromJSON({"properties": {"s": {"type": "integer"}}})
        error = self.assertRaises(
            InvalidParams, CommandRenderer("s", ["/bin/true"], schema=schema.schema).validate, {"s": "\ud800" + "x" * 10000}
        )
        self.assertLess(len(str(error)), 300)
        str(error).encode("utf-8")

    def test_badSchemas(self) -> None:
        """
        A schema that is not a JSON object, not valid for its draft, or
        refers outside itself (or to nothing) is refused, with why.
        """
        cases = [
            ([], "JSON object"),
            (True, "JSON object"),
            ({"type": "nope"}, "/type"),
            ({"minimum": "a"}, "/minimum"),
            ({"$ref": "https://example.com/s.json"}, "within the file"),
            ({"properties": {"a": {"$ref": "other.json#/x"}}}, "within the file"),
            ({"$ref": "#/$defs/missing"}, "points to nothing"),
        ]
        for schema, words in cases:
            error = self.assertRaises(ValueError, ParamsSchema.fromJSON, schema)
            self.assertIn(words, str(error), schema)
        # A renderer is made with a schema that is one, or not at all.
        self.assertRaises(ValueError, CommandRenderer, "x", ["/bin/true"], schema={"type": "nope"})
        # Another draft, named by $schema, is checked as that draft.
        ParamsSchema.fromJSON({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"})
        self.assertRaises(
            ValueError,
            ParamsSchema.fromJSON,
            {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "minimum": "x"},
        )

    def test_files(self) -> None:
        """
        L{ParamsSchema.fromFile} reads a JSON file of at most
        L{MAX_SCHEMA_BYTES}, naming the file in its errors.
        """
        path = schemaFile(self, TICKS_SCHEMA)
        self.assertEqual(ParamsSchema.fromFile(path).schema, TICKS_SCHEMA)
        big = schemaFile(self, b"{" + b" " * MAX_SCHEMA_BYTES + b"}")
        self.assertIn("over", str(self.assertRaises(ValueError, ParamsSchema.fromFile, big)))
        self.assertIn("not JSON", str(self.assertRaises(ValueError, ParamsSchema.fromFile, schemaFile(self, b"{"))))
        array = schemaFile(self, [])
        self.assertIn(array, str(self.assertRaises(ValueError, ParamsSchema.fromFile, array)))
        self.assertRaises(OSError, ParamsSchema.fromFile, path + ".missing")


class OptionTests(SynchronousTestCase):
    """
    C{--renderer-schema NAME=FILE}.
    """

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_attached(self) -> None:
        """
        The schema goes to the command renderer of that name, whichever
        option comes first; others keep none.
        """
        path = schemaFile(self, TICKS_SCHEMA)
        for argv in (
            ["--renderer", "ticks=/bin/ticks", "--renderer-schema", f"ticks={path}", "--renderer", "other=/bin/o"],
            ["--renderer-schema", f"ticks={path}", "--renderer", "ticks=/bin/ticks", "--renderer", "other=/bin/o"],
        ):
            renderers = {r.name: r for r in self.parse(*argv)["renderers"]}
            self.assertEqual(renderers["ticks"].paramsSchema, TICKS_SCHEMA)
            self.assertEqual(renderers["ticks"].argv, ("/bin/ticks",))
            self.assertEqual(renderers["other"].paramsSchema, OPEN_SCHEMA)

    def test_refusals(self) -> None:
        """
        A malformed spec, a second schema for one name, a name without a
        command renderer, and a bad file are usage errors.
        """
        good = schemaFile(self, TICKS_SCHEMA)
        bad = schemaFile(self, {"type": 5})
        cases = [
            (["--renderer-schema", "ticks"], "NAME=FILE"),
            (["--renderer-schema", f"ticks={good}", "--renderer-schema", f"ticks={good}"], "already"),
            (["--renderer-schema", f"ticks={good}"], "no --renderer ticks"),
            (["--renderer-schema", f"card={good}"], "no --renderer card"),
            (["--renderer", "ticks=/bin/t", "--renderer-schema", f"ticks={bad}"], "not a valid JSON Schema"),
            (["--renderer", "ticks=/bin/t", "--renderer-schema", f"ticks={good}.missing"], "--renderer-schema"),
        ]
        for argv, words in cases:
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(words, str(error), argv)


class RoutesTests(SynchronousTestCase):
    """
    C{GET /renderers} shows each schema; C{POST /renders} applies them.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        also = [CardRenderer(ffmpeg="/opt/ffmpeg"), CommandRenderer("strict", ["/bin/strict"], schema=TICKS_SCHEMA)]
        self.service = ticksService(self.clock, self.spawner, self.mktemp(), also=also, maxRenders=2)
        self.addCleanup(self.service.stopService)
        self.site = buildSite(self.service, self.clock)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = Connection(self.site)
        data = b"" if body is None else json.dumps(body).encode()
        conn.request(method, path, {"Content-Type": "application/json"} if data else {}, data)
        status, _, payload = splitResponse(conn.take())
        conn.disconnect()
        return status, json.loads(payload)

    def test_listed(self) -> None:
        """
        Each renderer, sorted by name, with its C{params_schema}.
        """
        self.assertEqual(
            self.call("GET", "/renderers"),
            (
                200,
                {
                    "renderers": [
                        {"name": "card", "params_schema": json.loads(json.dumps(PARAMS_SCHEMA))},
                        {"name": "strict", "params_schema": TICKS_SCHEMA},
                        {"name": "ticks", "params_schema": {"type": "object"}},
                    ]
                },
            ),
        )

    def test_applied(self) -> None:
        """
        Params the schema refuses are 422 C{invalid_params} naming the
        path; accepted ones start the render, with the params as given.
        """
        for params, prefix in (({"count": 0}, "params.count: "), ({"count": 1, "tags": [1]}, "params.tags.0: ")):
            status, body = self.call("POST", "/renders", {"renderer": "strict", "params": params})
            self.assertEqual((status, body["error"]), (422, "invalid_params"), body)
            self.assertTrue(body["detail"].startswith(prefix), body)
        self.assertEqual(self.spawner.processes, [])
        status, body = self.call("POST", "/renders", {"renderer": "strict", "params": {"count": 2}})
        self.assertEqual((status, body["params"]), (202, {"count": 2}))
        self.assertEqual(json.loads(self.spawner.processes[-1].stdin), {"count": 2})

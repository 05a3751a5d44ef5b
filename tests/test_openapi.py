"""
Tests for C{twistedsse/openapi.json}, the OpenAPI 3.1 document of the HTTP
API: that it is a valid document, and that it cannot drift from the code
(the routes of L{TwistedSSEApp}, the limits of L{CardRenderer.validate},
the error codes of L{twistedsse._errors} and the SSE event names).
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from typing import Any, Iterator

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twistedsse import _errors
from twistedsse._app import TwistedSSEApp
from twistedsse._broker import resetEvent
from twistedsse._card import CardRenderer
from twistedsse._errors import InvalidParams, TwistedSSEError
from twistedsse._frames import TERMINAL_EVENTS
from twistedsse._job import JobSnapshot, JobState
from twistedsse._outcome import retrying, workerLost

_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def loadSpec() -> dict[str, Any]:
    """
    The document as shipped: read as package data, as an installed
    twistedsse would read it.
    """
    text = (resources.files("twistedsse") / "openapi.json").read_text(encoding="utf-8")
    spec: dict[str, Any] = json.loads(text)
    return spec


def appRoutes() -> dict[str, set[str]]:
    """
    The app's routes as OpenAPI paths (C{<string:jobID>} becomes
    C{{jobID}}) mapped to their methods, lower case, HEAD and OPTIONS
    included as werkzeug adds them.
    """
    routes: dict[str, set[str]] = {}
    for rule in TwistedSSEApp.router.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z_]+(?:\([^)]*\))?:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods or ())
    return routes


def walk(node: Any) -> Iterator[Any]:
    """
    Every dict and list in C{node}, itself included, depth first.
    """
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def resolve(spec: dict[str, Any], pointer: str) -> Any:
    """
    Follow a local JSON pointer (C{#/components/schemas/Job}).
    """
    if not pointer.startswith("#/"):
        raise ValueError(f"not a local reference: {pointer!r}")
    node: Any = spec
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def errorClasses() -> list[type[TwistedSSEError]]:
    """
    L{TwistedSSEError} and every subclass of it in L{twistedsse._errors}.
    """
    found: list[type[TwistedSSEError]] = []
    pending: list[type[TwistedSSEError]] = [TwistedSSEError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == _errors.__name__:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def specErrorCodes(spec: dict[str, Any]) -> dict[str, set[str]]:
    """
    Every error code the document names, mapped to the statuses of the
    responses that name it (C{"*"} for the shared C{Error} schema itself):
    the C{enum}s of C{error} properties and the C{error} of examples.
    """
    codes: dict[str, set[str]] = {}
    for code in spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]:
        codes.setdefault(code, set()).add("*")

    def responses() -> Iterator[tuple[str, dict[str, Any]]]:
        for item in spec["paths"].values():
            for method, operation in item.items():
                if method in _HTTP_METHODS:
                    for status, response in operation["responses"].items():
                        yield status, response

    for status, response in responses():
        if "$ref" in response:
            response = resolve(spec, response["$ref"])
        for node in walk(response):
            if not isinstance(node, dict):
                continue
            error = node.get("properties", {}).get("error") if isinstance(node.get("properties"), dict) else None
            if isinstance(error, dict):
                for code in error.get("enum", ()):
                    codes.setdefault(code, set()).add(status)
                if "const" in error:
                    codes.setdefault(error["const"], set()).add(status)
            value = node.get("value")
            if isinstance(value, dict) and set(value) == {"error", "detail"}:
                codes.setdefault(value["error"], set()).add(status)
    return codes


class DocumentTests(SynchronousTestCase):
    """
    The file is an OpenAPI 3.1 document whose references all resolve.
    """

    def setUp(self) -> None:
        self.spec = loadSpec()

    def test_isOpenAPI31(self) -> None:
        """
        C{openapi.json} ships as package data, parses as JSON, and declares
        OpenAPI 3.1 with a title and version.
        """
        self.assertIsInstance(self.spec, dict)
        self.assertTrue(self.spec["openapi"].startswith("3.1"), self.spec["openapi"])
        self.assertTrue(self.spec["info"]["title"])
        self.assertTrue(self.spec["info"]["version"])

    def test_validatesAgainstTheOpenAPISchema(self) -> None:
        """
        The document passes C{openapi-spec-validator}, when that happens to
        be installed (it is not a test dependency).
        """
        try:
            import openapi_spec_validator
        except ImportError:
            raise SkipTest("openapi-spec-validator is not installed") from None
        validate = getattr(openapi_spec_validator, "validate", None) or getattr(
            openapi_spec_validator, "validate_spec"
        )
        validate(self.spec)

    def test_referencesResolve(self) -> None:
        """
        Every C{$ref} points at something in the document, so the document
        is usable without the validator too.
        """
        refs = [node["$ref"] for node in walk(self.spec) if isinstance(node, dict) and "$ref" in node]
        self.assertNotEqual(refs, [])
        for pointer in refs:
            try:
                resolve(self.spec, pointer)
            except (KeyError, ValueError) as e:
                self.fail(f"{pointer} does not resolve: {e!r}")

    def test_operationIDsUnique(self) -> None:
        """
        Every operation has an C{operationId}, a summary and responses, and
        no two operations share an id.
        """
        ids = []
        for path, item in self.spec["paths"].items():
            for method, operation in item.items():
                if method not in _HTTP_METHODS:
                    continue
                self.assertTrue(operation.get("summary"), (path, method))
                self.assertTrue(operation.get("responses"), (path, method))
                ids.append(operation["operationId"])
        self.assertEqual(len(ids), len(set(ids)), ids)


class RoutesTests(SynchronousTestCase):
    """
    The document's paths and methods are exactly the app's routes.
    """

    def setUp(self) -> None:
        self.spec = loadSpec()
        self.routes = appRoutes()

    def test_everyRouteDocumented(self) -> None:
        """
        Every Klein route appears in C{paths} with each of its methods
        (HEAD and OPTIONS aside, which werkzeug adds).
        """
        self.assertIn("/renders/{jobID}/events", self.routes)
        for path, methods in self.routes.items():
            self.assertIn(path, self.spec["paths"], f"route {path} is not documented")
            documented = set(self.spec["paths"][path]) & _HTTP_METHODS
            missing = (methods - {"head", "options"}) - documented
            self.assertEqual(missing, set(), f"{path}: methods not documented")

    def test_nothingTheAppLacks(self) -> None:
        """
        The document describes no path, and no method of a path, that the
        app does not route; a documented C{head} must be one werkzeug
        routes.
        """
        for path, item in self.spec["paths"].items():
            self.assertIn(path, self.routes, f"{path} is documented but not routed")
            documented = set(item) & _HTTP_METHODS
            extra = documented - self.routes[path]
            self.assertEqual(extra, set(), f"{path}: documented methods the app lacks")

    def test_pathParametersDeclared(self) -> None:
        """
        Every C{{name}} in a path is declared as a required path parameter
        of each of its operations.
        """
        for path, item in self.spec["paths"].items():
            names = set(re.findall(r"{([^}]+)}", path))
            for method, operation in item.items():
                if method not in _HTTP_METHODS:
                    continue
                declared = set()
                for parameter in item.get("parameters", []) + operation.get("parameters", []):
                    if "$ref" in parameter:
                        parameter = resolve(self.spec, parameter["$ref"])
                    if parameter["in"] == "path":
                        self.assertTrue(parameter["required"], (path, parameter))
                        declared.add(parameter["name"])
                self.assertEqual(declared, names, (path, method))

    def test_streamEventsAreTheServersEvents(self) -> None:
        """
        Both event streams document exactly C{progress}, C{reset}, Redis
        mode's C{retrying} plus the terminal events of
        L{twistedsse._frames}, each with a data schema; C{/render-stream}
        also its opening C{render} event.
        """
        for path in ("/renders/{jobID}/events", "/render-stream"):
            expected = {"progress", "reset", "retrying"} | set(TERMINAL_EVENTS)
            expected |= {"render"} if path == "/render-stream" else set()
            operation = self.spec["paths"][path]["get"]
            self.assertEqual(set(operation["x-events"]), expected, path)
            self.assertIn("text/event-stream", operation["responses"]["200"]["content"])
            self.assertIn("204", operation["responses"])
            for name in expected:
                self.assertIn(f"`{name}`", operation["description"], (path, name))
                resolve(self.spec, operation["x-events"][name]["$ref"])


class CardParamsTests(SynchronousTestCase):
    """
    The C{CardParams} schema says what L{CardRenderer.validate} does.
    """

    def setUp(self) -> None:
        self.schema = loadSpec()["components"]["schemas"]["CardParams"]
        self.properties = self.schema["properties"]
        self.validate = CardRenderer().validate

    def assertAccepts(self, field: str, value: object) -> None:
        try:
            self.validate({field: value})
        except InvalidParams as e:
            self.fail(f"{field}={value!r} is in the schema but refused: {e}")

    def assertRefuses(self, field: str, value: object) -> None:
        with self.assertRaises(InvalidParams, msg=f"{field}={value!r}") as caught:
            self.validate({field: value})
        self.assertEqual(caught.exception.field, field)

    def test_defaults(self) -> None:
        """
        The schema's fields and defaults are exactly what C{validate({})}
        fills in, and it forbids other keys, as C{validate} does.
        """
        defaults = {name: prop["default"] for name, prop in self.properties.items()}
        self.assertEqual(defaults, self.validate({}))
        self.assertIs(self.schema["additionalProperties"], False)
        self.assertRefuses("colour", "#000000")

    def test_numericLimits(self) -> None:
        """
        For each numeric field, C{validate} accepts the schema's minimum
        and maximum and refuses the nearest values outside them; an
        C{integer} field refuses fractions.
        """
        numeric = {name: p for name, p in self.properties.items() if p["type"] in ("number", "integer")}
        self.assertEqual(set(numeric), {"duration", "fps"})
        for name, prop in numeric.items():
            low, high = prop["minimum"], prop["maximum"]
            self.assertAccepts(name, low)
            self.assertAccepts(name, high)
            if prop["type"] == "integer":
                self.assertRefuses(name, low - 1)
                self.assertRefuses(name, high + 1)
                self.assertRefuses(name, low + 0.5)
            else:
                self.assertAccepts(name, (low + high) / 2 + 0.25)
                self.assertRefuses(name, math.nextafter(low, -math.inf))
                self.assertRefuses(name, math.nextafter(high, math.inf))
            self.assertRefuses(name, True)
            self.assertRefuses(name, str(low))

    def test_sizeLimits(self) -> None:
        """
        C{size}'s pattern and C{x-size-limits} match C{validate}: each
        dimension's minimum and maximum are accepted, the nearest even
        values outside them and odd values refused.
        """
        prop = self.properties["size"]
        pattern = re.compile(prop["pattern"])
        limits = prop["x-size-limits"]
        width, height = limits["width"], limits["height"]
        self.assertEqual((width["multipleOf"], height["multipleOf"]), (2, 2))

        def size(w: int, h: int) -> str:
            value = f"{w}x{h}"
            self.assertTrue(pattern.search(value), value)
            return value

        okHeight, okWidth = height["minimum"], width["minimum"]
        for w in (width["minimum"], width["maximum"]):
            self.assertAccepts("size", size(w, okHeight))
        for h in (height["minimum"], height["maximum"]):
            self.assertAccepts("size", size(okWidth, h))
        for w in (width["minimum"] - 2, width["maximum"] + 2, width["minimum"] + 1):
            self.assertRefuses("size", size(w, okHeight))
        for h in (height["minimum"] - 2, height["maximum"] + 2, height["minimum"] + 1):
            self.assertRefuses("size", size(okWidth, h))
        for bad in ("1280X720", "1280x", "x720", " 1280x720", "1280x720 ", "-64x64", "123456x64"):
            self.assertIsNone(pattern.search(bad), bad)
            self.assertRefuses("size", bad)

    def test_textLimits(self) -> None:
        """
        C{title} and C{subtitle}: the schema's length limits and control
        character pattern agree with C{validate}.
        """
        samples = [
            "plain", "two\nlines", "tab\there", "%{pts}", "caf\u00e9 \u2603 \U0001f3ac",
            "nul\x00", "bell\x07", "cr\r", "esc\x1b", "del\x7f", "c1\x85", "c1\x9f",
            "\u200b zero width", "\u2028 line separator",
        ]
        for name in ("title", "subtitle"):
            prop = self.properties[name]
            pattern = re.compile(prop["pattern"])
            self.assertAccepts(name, "x" * prop["maxLength"])
            self.assertRefuses(name, "x" * (prop["maxLength"] + 1))
            if prop["minLength"] > 0:
                self.assertAccepts(name, "x" * prop["minLength"])
                self.assertRefuses(name, "x" * (prop["minLength"] - 1))
            else:
                self.assertAccepts(name, "")
            for text in samples:
                if pattern.search(text):
                    self.assertAccepts(name, text)
                else:
                    self.assertRefuses(name, text)
            self.assertRefuses(name, 5)

    def test_colourPattern(self) -> None:
        """
        The colour pattern accepts exactly what C{validate} accepts.
        """
        samples = ["#abcdef", "#ABCDEF", "#012345", "#abcde", "abcdef", "#abcdeg", "#abcdef0", "red", "#abc", ""]
        for name in ("background", "foreground", "accent"):
            pattern = re.compile(self.properties[name]["pattern"])
            for value in samples:
                if pattern.search(value):
                    self.assertAccepts(name, value)
                else:
                    self.assertRefuses(name, value)


class ErrorCodesTests(SynchronousTestCase):
    """
    The document's error codes are the code's.
    """

    def setUp(self) -> None:
        self.spec = loadSpec()
        self.classes = errorClasses()
        self.known = {cls.code for cls in self.classes} | {"internal_error"}

    def test_errorSchema(self) -> None:
        """
        The shared C{Error} schema is C{{"error": string, "detail":
        string}}, both required, nothing else.
        """
        error = self.spec["components"]["schemas"]["Error"]
        self.assertEqual(set(error["properties"]), {"error", "detail"})
        self.assertEqual(set(error["required"]), {"error", "detail"})
        self.assertIs(error["additionalProperties"], False)
        self.assertEqual(error["properties"]["detail"]["type"], "string")

    def test_codesExist(self) -> None:
        """
        Every error code in the document is the C{code} of a
        L{TwistedSSEError} subclass, or C{internal_error}.
        """
        self.assertIn("unknown_job", {cls.code for cls in self.classes})
        codes = specErrorCodes(self.spec)
        self.assertIn("method_not_allowed", codes)
        self.assertEqual(set(codes) - self.known, set())

    def test_codesHaveTheirStatus(self) -> None:
        """
        Each code appears only under its class's HTTP status (500 for
        C{internal_error}).
        """
        status = {cls.code: str(cls.status) for cls in self.classes}
        status["internal_error"] = "500"
        for code, where in specErrorCodes(self.spec).items():
            statuses = where - {"*"}
            if statuses:
                self.assertEqual(statuses, {status.get(code, "unknown code")}, code)

    def test_clientErrorsDocumented(self) -> None:
        """
        Each concrete error a client can cause is listed on some response,
        not only in the shared schema.
        """
        codes = specErrorCodes(self.spec)
        for code in (
            "malformed_json", "body_too_large", "unknown_renderer", "invalid_params", "unknown_job",
            "not_found", "method_not_allowed", "job_finished", "output_not_ready", "internal_error",
            "unauthorized", "forbidden", "unsupported_media_type", "unknown_host", "job_expired",
            "output_expired", "insufficient_storage", "too_many_streams", "queue_full",
            "range_not_satisfiable", "uri_too_long", "header_too_large",
        ):
            self.assertIn(code, self.known)
            self.assertNotEqual(codes.get(code, set()) - {"*"}, set(), code)


class EventDataTests(SynchronousTestCase):
    """
    The data the code writes in the events Redis mode added or changed
    (C{retrying}, C{failed} with C{worker_lost}, C{reset} with C{missed}
    C{null}) is what the document's schemas describe.
    """

    def setUp(self) -> None:
        try:
            import jsonschema
        except ImportError:
            raise SkipTest("jsonschema is not installed") from None
        self.jsonschema = jsonschema
        self.spec = loadSpec()

    def assertValid(self, name: str, data: object) -> None:
        """
        C{data} validates against the schema C{#/components/schemas/NAME}
        (the whole document as the root, so its references resolve).
        """
        root = {**self.spec, "$ref": f"#/components/schemas/{name}"}
        errors = list(self.jsonschema.Draft202012Validator(root).iter_errors(data))
        self.assertEqual(errors, [], f"{name}: {data!r}")

    def test_retrying(self) -> None:
        """
        C{retrying}'s data, for both reasons, is a C{RetryingEvent} with
        every field the schema requires; the schema's example is valid too.
        """
        schema = self.spec["components"]["schemas"]["RetryingEvent"]
        self.assertEqual(set(schema["properties"]["reason"]["enum"]), {"worker_lost", "handed_back"})
        for reason in ("worker_lost", "handed_back"):
            data = json.loads(json.dumps(retrying(2, 2, reason)))
            self.assertEqual(set(data), set(schema["required"]))
            self.assertValid("RetryingEvent", data)
        self.assertValid("RetryingEvent", schema["example"])

    def test_workerLost(self) -> None:
        """
        The C{failed} event of a render whose workers were lost is a
        C{FailedEvent}.
        """
        self.assertValid("FailedEvent", json.loads(json.dumps(workerLost(2).payload)))

    def test_resetMissedUnknown(self) -> None:
        """
        A C{reset} after Redis lost a stream (C{missed} C{null}) and an
        ordinary one are both C{ResetEvent}s.
        """
        snapshot = JobSnapshot(
            id="j", renderer="card", params={}, state=JobState.RUNNING, createdAt=0.0, progress={"percent": 1.0}
        )
        for missed in (None, 3):
            event = resetEvent(snapshot, missed, "0-0")
            self.assertEqual(event.event, "reset")
            self.assertValid("ResetEvent", json.loads(event.data))

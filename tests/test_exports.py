"""
The public API: a deliberate list of re-exports of the private modules,
and everything an exported constructor or builder needs is exported too.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.interface import InterfaceClass

import twistedsse
from twistedsse import _broker, _build, _connections, _errors, _frames

#: The exact public names. Adding one is a decision (a name users may
#: build on, kept compatible); this list makes it a visible one.
PUBLIC = {
    "BadRequest", "CardRenderer", "CommandRenderer", "Conflict", "ConnectionCounter", "ConnectionLimits",
    "DrainingSite", "EagerSendReactor", "Event", "EventStreamDecoder", "Forbidden", "HeaderTooLarge",
    "IJobBroker", "IJobStore", "IProgressParser", "IRenderer", "ISubscriber", "IdempotencyKeyReused",
    "InsufficientStorage", "InvalidIdempotencyKey",
    "InvalidBody", "InvalidJobs", "InvalidParams", "JobExpired", "JobFinished", "JobSnapshot", "JobState", "MalformedJSON",
    "MemoryBroker", "MethodNotAllowed", "MisdirectedRequest", "NotFound", "NullJobStore", "OutputExpired",
    "OutputNotReady", "PayloadTooLarge", "QueueFull", "RedisConfigError", "RedisEndpoint", "RedisRenderService", "RedisUnavailable", "RangeNotSatisfiable", "RenderPlan", "RenderProtocolError",
    "RenderService", "ResourceOptions", "RetryLater", "SQLiteJobStore", "ServerService", "TERMINAL_EVENTS", "TooManyJobs", "TooManyStreams",
    "TwistedSSEError", "URITooLong", "Unauthorized", "UnknownJob", "UnknownRenderer", "Unprocessable",
    "UnsupportedMediaType", "buildResource", "buildService", "buildSite", "encodeComment", "encodeEvent",
    "mintToken", "redactedLogFormatter",
    "CallbackNotAllowed", "CallbackPolicy", "InvalidCallback", "Webhooks", "verifySignature",
}  # fmt: skip

#: twistedsse.client's public names: the EventSource client and the
#: whole-API client with its error classes.
CLIENT_PUBLIC = {
    "APIError", "HTTPStatusError", "InvalidParams", "InvalidRequest", "Job", "JobFinished", "NoOutput",
    "QueueFull", "RenderClient", "RetryLater", "Subscription", "Unauthorized", "UnexpectedResponse",
    "UnknownJob", "subscribe",
}  # fmt: skip


def _namespace() -> dict[str, Any]:
    """
    Every module-level name of every twistedsse module, to resolve the
    string annotations (including those imported only for type checking).
    """
    names: dict[str, Any] = {}
    for info in pkgutil.iter_modules(twistedsse.__path__):
        module = importlib.import_module(f"twistedsse.{info.name}")
        names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    from twisted.internet import interfaces
    from twisted.web import resource, server

    for module in (typing, interfaces, resource, server):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    return names


def _ourTypes(hint: object) -> set[type]:
    """
    The twistedsse classes and interfaces a type hint names.
    """
    found: set[type] = set()
    if isinstance(hint, (type, InterfaceClass)) and getattr(hint, "__module__", "").startswith("twistedsse"):
        found.add(hint)  # type: ignore[arg-type]
    for arg in typing.get_args(hint):
        found |= _ourTypes(arg)
    return found


class ExportTests(SynchronousTestCase):
    def test_identity(self) -> None:
        """
        The public names are the private objects, not copies.
        """
        self.assertIs(twistedsse.MemoryBroker, _broker.MemoryBroker)
        self.assertIs(twistedsse.Event, _frames.Event)
        self.assertIs(twistedsse.buildSite, _build.buildSite)
        self.assertIs(twistedsse.ConnectionLimits, _connections.ConnectionLimits)

    def test_all(self) -> None:
        """
        C{__all__} is exactly the deliberate list, without repeats, each
        name real.
        """
        self.assertEqual(len(twistedsse.__all__), len(set(twistedsse.__all__)))
        self.assertEqual(set(twistedsse.__all__), PUBLIC)
        for name in twistedsse.__all__:
            self.assertTrue(hasattr(twistedsse, name), name)

    def test_clientAll(self) -> None:
        """
        C{twistedsse.client.__all__} is exactly its deliberate list; its
        errors are all L{APIError}s (besides the EventSource's own).
        """
        from twistedsse import client

        self.assertEqual(len(client.__all__), len(set(client.__all__)))
        self.assertEqual(set(client.__all__), CLIENT_PUBLIC)
        for name in client.__all__:
            value = getattr(client, name)
            if isinstance(value, type) and issubclass(value, Exception) and value is not client.HTTPStatusError:
                self.assertTrue(issubclass(value, client.APIError), name)

    def test_everyError(self) -> None:
        """
        Every error the package defines is exported: callers catch them
        (L{RenderService.submit} raises C{QueueFull}, a parser raises
        C{RenderProtocolError}).
        """
        errors = {
            name
            for name, value in vars(_errors).items()
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == _errors.__name__
        }
        self.assertEqual(errors - set(twistedsse.__all__), set())

    def test_constructorsNeedOnlyExportedTypes(self) -> None:
        """
        The parameters of every exported builder and constructor are typed
        with exported twistedsse types only: nothing public needs a
        private one to be called.
        """
        namespace = _namespace()
        exported = {getattr(twistedsse, name) for name in twistedsse.__all__}
        missing: dict[str, set[str]] = {}
        checked = 0
        for name in twistedsse.__all__:
            value = getattr(twistedsse, name)
            if isinstance(value, InterfaceClass) or not callable(value):
                continue
            target = value.__init__ if isinstance(value, type) else value
            if isinstance(value, type) and issubclass(value, BaseException):
                continue
            if not hasattr(target, "__annotations__"):
                continue
            hints = typing.get_type_hints(target, globalns=namespace)
            hints.pop("return", None)
            checked += 1
            for hint in hints.values():
                for needed in _ourTypes(hint) - exported:
                    missing.setdefault(name, set()).add(needed.__qualname__)
        self.assertGreater(checked, 15)
        self.assertEqual(missing, {})

    def test_signatureOfTheBuilders(self) -> None:
        """
        The builders take keyword options after their positional
        parameters, so adding one never shifts another.
        """
        for builder in (twistedsse.buildService, twistedsse.buildResource, twistedsse.buildSite):
            kinds = [p.kind for p in inspect.signature(builder).parameters.values()]
            positional = [k for k in kinds if k is inspect.Parameter.POSITIONAL_OR_KEYWORD]
            self.assertLessEqual(len(positional), 2, builder.__name__)

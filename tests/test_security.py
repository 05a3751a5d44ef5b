"""
Operator tokens for creating and cancelling renders, and the CORS
allow-list.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import tap
from twistedsse._build import buildSite
from twistedsse._security import readTokens
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse

TOKEN = "s3cret-token-\u00e9"


class SecurityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, self.mktemp())
        self.site = buildSite(
            self.service, self.clock, authTokens=[b"other", TOKEN.encode()], corsOrigins=["https://app.example"]
        )

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):
        conn = Connection(self.site)
        conn.request(method, path, {k: v.encode().decode("latin-1") for k, v in (headers or {}).items()}, body)
        status, head, payload = splitResponse(conn.take())
        conn.disconnect()
        return status, head, payload

    def create(self, headers: dict[str, str]):
        return self.call("POST", "/renders", {"Content-Type": "application/json", **headers}, b'{"renderer": "ticks"}')

    def test_createAndCancelNeedAToken(self) -> None:
        """
        Without the operator token, or with a wrong one, creating and
        cancelling are 401 (with C{WWW-Authenticate}); with it they work.
        """
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            status, head, body = self.create(headers)
            self.assertEqual((status, json.loads(body)["error"]), (401, "unauthorized"), headers)
            self.assertIn(b"Bearer", head[b"www-authenticate"])
        self.assertEqual(self.spawner.processes, [])
        status, _, body = self.create({"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 202)
        job = json.loads(body)
        self.assertEqual(self.call("DELETE", job["status_url"])[0], 401)
        self.assertEqual(self.call("DELETE", job["status_url"], {"Authorization": f"Bearer {TOKEN}"})[0], 202)

    def test_readingNeedsOnlyTheID(self) -> None:
        """
        Status and events are readable with the job's id alone.
        """
        _, _, body = self.create({"Authorization": "Bearer other"})
        job = json.loads(body)
        self.assertEqual(self.call("GET", job["status_url"])[0], 200)
        conn = Connection(self.site)
        conn.request("GET", job["events_url"])
        self.assertEqual(splitResponse(conn.take())[0], 200)
        conn.disconnect()

    def test_renderStreamTokenInTheQuery(self) -> None:
        """
        C{/render-stream} starts a render only with the token, which an
        EventSource can pass as C{access_token}; re-attaching needs none.
        """
        self.assertEqual(self.call("GET", "/render-stream?renderer=ticks")[0], 401)
        self.assertEqual(self.call("GET", "/render-stream?renderer=ticks&access_token=nope")[0], 401)
        conn = Connection(self.site)
        conn.request("GET", "/render-stream?renderer=ticks&access_token=other")
        self.assertEqual(splitResponse(conn.take())[0], 200)
        conn.disconnect()
        jobID = self.service.broker.jobs()[0].id
        conn = Connection(self.site)
        conn.request("GET", "/render-stream?renderer=ticks", {"Last-Event-ID": f"{jobID}:0"})
        self.assertEqual(splitResponse(conn.take())[0], 200)
        conn.disconnect()
        self.assertEqual(len(self.spawner.processes), 1)

    def test_corsAllowedOrigin(self) -> None:
        """
        An allowed origin gets C{Access-Control-Allow-Origin} on the API and
        on event streams, and its preflight is answered.
        """
        origin = {"Origin": "https://app.example"}
        status, head, _ = self.call("GET", "/healthz", origin)
        self.assertEqual(head[b"access-control-allow-origin"], b"https://app.example")
        self.assertEqual(head[b"vary"], b"Origin")
        status, head, _ = self.call(
            "OPTIONS", "/renders", {**origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "content-type, authorization"},
        )  # fmt: skip
        self.assertEqual(status, 204)
        self.assertIn(b"POST", head[b"access-control-allow-methods"])
        self.assertIn(b"Authorization", head[b"access-control-allow-headers"])
        _, _, body = self.create({"Authorization": "Bearer other"})
        conn = Connection(self.site)
        conn.request("GET", json.loads(body)["events_url"], origin)
        status, head, _ = splitResponse(conn.take())
        self.assertEqual((status, head[b"access-control-allow-origin"]), (200, b"https://app.example"))
        conn.disconnect()

    def test_corsOtherOrigin(self) -> None:
        """
        Any other origin gets no CORS headers (its page cannot read
        anything), and its preflight is not granted.
        """
        status, head, _ = self.call("GET", "/healthz", {"Origin": "https://evil.example"})
        self.assertNotIn(b"access-control-allow-origin", head)
        status, head, _ = self.call(
            "OPTIONS", "/renders", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        self.assertEqual(status, 405)
        self.assertNotIn(b"access-control-allow-origin", head)


class OptionsTests(SynchronousTestCase):
    def test_tokenFile(self) -> None:
        """
        The token file holds one token per line; comments and blank lines
        are skipped; an empty file or a missing one is a usage error.
        """
        path = Path(self.mktemp())
        path.write_text("# operators\n\nalpha\n  beta  \n", encoding="utf-8")
        self.assertEqual(readTokens(path), (b"alpha", b"beta"))
        options = tap.Options()
        options.parseOptions(["--auth-token-file", str(path)])
        self.assertEqual(options["auth-tokens"], (b"alpha", b"beta"))
        path.write_text("# nothing\n", encoding="utf-8")
        self.assertRaises(UsageError, tap.Options().parseOptions, ["--auth-token-file", str(path)])
        self.assertRaises(UsageError, tap.Options().parseOptions, ["--auth-token-file", str(path) + ".missing"])

    def test_corsOrigins(self) -> None:
        """
        --cors-origin takes http(s)://host[:port], repeatable.
        """
        options = tap.Options()
        options.parseOptions(["--cors-origin", "https://a.example", "--cors-origin", "http://b.example:8080"])
        self.assertEqual(options["cors-origins"], ["https://a.example", "http://b.example:8080"])
        for bad in ("a.example", "ftp://a.example", "https://a.example/path", "https://"):
            self.assertRaises(UsageError, tap.Options().parseOptions, ["--cors-origin", bad])

"""
Tests for C{Idempotency-Key} on C{POST /renders} with the jobs in memory
(L{twistedsse._idempotency}, L{twistedsse._jobs.JobTracker.submit}): a
retried create returns the job the first made; the key is the caller's,
bounded, and kept as long as the job. (Redis mode:
tests/redis/test_idempotency.py.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._build import buildSite
from twistedsse._card import CardRenderer
from twistedsse._errors import InvalidIdempotencyKey
from twistedsse._idempotency import MAX_KEY, parseKey
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse
from tests.test_openapi import loadSpec

SECRET = b"s" * 32
TOKENS = (b"operator-a", b"operator-b")


class ParseKeyTests(SynchronousTestCase):
    """
    L{parseKey}: a Structured Fields string or a bare key, 1 to 255
    printable ASCII characters, one header.
    """

    def test_accepted(self) -> None:
        """
        Quoted (escapes undone) and bare forms; the same key either way.
        """
        cases = [
            (b'"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
            (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
            (b'"a \\"quoted\\" \\\\ key"', 'a "quoted" \\ key'),
            (b"  padded\t", "padded"),
            (b'"' + b"k" * MAX_KEY + b'"', "k" * MAX_KEY),
            (b"x", "x"),
        ]
        for raw, key in cases:
            self.assertEqual(parseKey([raw]), key, raw)
        self.assertIsNone(parseKey(None))
        self.assertIsNone(parseKey([]))

    def test_refused(self) -> None:
        """
        Empty, too long, non-ASCII, control characters, spaces in a bare
        key, bad escapes, unbalanced quotes, and two headers: 400
        C{invalid_idempotency_key}.
        """
        bad = [
            [b""], [b'""'], [b"k" * (MAX_KEY + 1)], [b'"' + b"k" * (MAX_KEY + 1) + b'"'], ["é".encode()],
            [b"a\x01b"], [b"two words"], [b'"bad \\n escape"'], [b'"open'], [b'open"x'], [b'"a";p=1'],
            [b"a", b"b"], [b'"tab\tinside"'],
        ]
        for values in bad:
            error = self.assertRaises(InvalidIdempotencyKey, parseKey, values)
            self.assertEqual((error.status, error.code), (400, "invalid_idempotency_key"))


class RoutesTests(SynchronousTestCase):
    """
    C{POST /renders} with C{Idempotency-Key}, over a real L{Site}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.service = ticksService(
            self.clock, self.spawner, self.mktemp(), also=[CardRenderer(ffmpeg="/opt/ffmpeg")],
            maxRenders=8, expireAfter=100.0,
        )  # fmt: skip
        self.addCleanup(self.service.stopService)
        self.site = buildSite(self.service, self.clock)

    def useAuth(self) -> None:
        self.site = buildSite(self.service, self.clock, authTokens=TOKENS, jwtSecret=SECRET)

    def post(self, body: Any, key: str | None = None, token: bytes | str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = "Bearer " + (token.decode() if isinstance(token, bytes) else token)
        conn = Connection(self.site)
        conn.request("POST", "/renders", headers, json.dumps(body).encode())
        status, _, payload = splitResponse(conn.take())
        conn.disconnect()
        return status, json.loads(payload)

    def test_retryReturnsTheJob(self) -> None:
        """
        A retry with the same key and body is 202 with the same job (as it
        is now), and starts no second render; the job's C{Location} too.
        """
        body = {"renderer": "ticks", "params": {"n": 1}}
        status, first = self.post(body, key="k1")
        self.assertEqual((status, first["state"]), (202, "running"))
        self.spawner.processes[-1].stdout(b'{"progress": 0.5}\n')
        status, again = self.post(body, key="k1")
        self.assertEqual((status, again["id"]), (202, first["id"]))
        self.assertEqual(again["progress"], {"progress": 0.5})
        self.assertEqual(len(self.spawner.processes), 1)
        # Quoted, it is the same key.
        self.assertEqual(self.post(body, key='"k1"')[1]["id"], first["id"])
        # Ended, it is still the job.
        self.spawner.processes[-1].exit(0)
        status, ended = self.post(body, key="k1")
        self.assertEqual((status, ended["id"], ended["state"]), (202, first["id"], "succeeded"))
        self.assertEqual(len(self.spawner.processes), 1)

    def test_withoutOrOtherKey(self) -> None:
        """
        Without a key, or with another, each create is a render.
        """
        body = {"renderer": "ticks"}
        ids = {self.post(body)[1]["id"], self.post(body)[1]["id"], self.post(body, key="a")[1]["id"],
               self.post(body, key="b")[1]["id"]}
        self.assertEqual(len(ids), 4)
        self.assertEqual(len(self.spawner.processes), 4)

    def test_otherBody(self) -> None:
        """
        The same key with another renderer or other params is 422
        C{idempotency_key_reused}, and starts nothing.
        """
        self.post({"renderer": "ticks", "params": {"n": 1}}, key="k")
        for body in ({"renderer": "ticks", "params": {"n": 2}}, {"renderer": "card"}, {"renderer": "ticks"}):
            status, error = self.post(body, key="k")
            self.assertEqual((status, error["error"]), (422, "idempotency_key_reused"), body)
        self.assertEqual(len(self.spawner.processes), 1)
        # Key order in the body does not matter.
        status, _ = self.post({"params": {"n": 1}, "renderer": "ticks"}, key="k")
        self.assertEqual(status, 202)

    def test_failedCreateKeepsNothing(self) -> None:
        """
        A create that fails (invalid params) does not take the key.
        """
        status, error = self.post({"renderer": "card", "params": {"fps": 0}}, key="k")
        self.assertEqual((status, error["error"]), (422, "invalid_params"))
        status, job = self.post({"renderer": "card", "params": {"fps": 24}}, key="k")
        self.assertEqual((status, job["params"]["fps"]), (202, 24))

    def test_badKey(self) -> None:
        """
        A key that is too long or not printable ASCII is 400
        C{invalid_idempotency_key}, and nothing is started.
        """
        for key in ("k" * (MAX_KEY + 1), "two words", '"unterminated'):
            status, error = self.post({"renderer": "ticks"}, key=key)
            self.assertEqual((status, error["error"]), (400, "invalid_idempotency_key"), key)
        self.assertEqual(self.spawner.processes, [])

    def test_expiresWithTheJob(self) -> None:
        """
        The key is kept while the job is: once the job expires
        (C{expireAfter} after it ended), the key starts a new render.
        """
        body = {"renderer": "ticks"}
        first = self.post(body, key="k")[1]["id"]
        self.spawner.processes[-1].exit(0)
        self.clock.advance(99)
        self.assertEqual(self.post(body, key="k")[1]["id"], first)
        self.clock.advance(2)
        status, job = self.post(body, key="k")
        self.assertEqual(status, 202)
        self.assertNotEqual(job["id"], first)
        self.assertEqual(len(self.spawner.processes), 2)

    def test_concurrent(self) -> None:
        """
        Two creates with one key in flight at once (the second arrives
        whole while the first's body is still arriving) make one render.
        """
        body = json.dumps({"renderer": "ticks"}).encode()
        head = {"Content-Type": "application/json", "Idempotency-Key": "k", "Content-Length": str(len(body))}
        slow, fast = Connection(self.site), Connection(self.site)
        raw = "".join(f"{name}: {value}\r\n" for name, value in head.items())
        slow.protocol.dataReceived(f"POST /renders HTTP/1.1\r\nHost: localhost\r\n{raw}\r\n".encode() + body[:5])
        fast.request("POST", "/renders", {k: v for k, v in head.items() if k != "Content-Length"}, body)
        slow.protocol.dataReceived(body[5:])
        answers = [splitResponse(conn.take()) for conn in (slow, fast)]
        for conn in (slow, fast):
            conn.disconnect()
        self.assertEqual([status for status, _, _ in answers], [202, 202])
        self.assertEqual(len({json.loads(payload)["id"] for _, _, payload in answers}), 1)
        self.assertEqual(len(self.spawner.processes), 1)

    def test_perCaller(self) -> None:
        """
        With authentication, a key is the caller's: another operator token
        with the same key gets a render of its own, never the first's; a
        scoped token's key is its subject's (a token minted anew for the
        same subject finds the job), and a token without a subject is its
        own caller.
        """
        self.useAuth()
        body = {"renderer": "ticks"}
        a = self.post(body, key="k", token=TOKENS[0])[1]["id"]
        b = self.post(body, key="k", token=TOKENS[1])[1]["id"]
        self.assertNotEqual(a, b)
        self.assertEqual(self.post(body, key="k", token=TOKENS[0])[1]["id"], a)

        def scoped(sub: str | None, ttl: int) -> str:
            now = int(self.clock.seconds())
            claims: dict[str, Any] = {"iat": now, "exp": now + ttl, "scope": "create:ticks"}
            if sub is not None:
                claims["sub"] = sub
            return jwt.encode(claims, SECRET, algorithm="HS256")

        alice = self.post(body, key="k", token=scoped("alice", 300))[1]["id"]
        self.assertNotIn(alice, (a, b))
        self.assertEqual(self.post(body, key="k", token=scoped("alice", 600))[1]["id"], alice)
        bob = self.post(body, key="k", token=scoped("bob", 300))[1]["id"]
        self.assertNotIn(bob, (a, b, alice))
        anonymous = scoped(None, 300)
        nobody = self.post(body, key="k", token=anonymous)[1]["id"]
        self.assertNotIn(nobody, (a, b, alice, bob))
        self.assertEqual(self.post(body, key="k", token=anonymous)[1]["id"], nobody)
        self.assertEqual(len(self.spawner.processes), 5)


class DocumentTests(SynchronousTestCase):
    """
    The document's C{Idempotency-Key} pattern says what L{parseKey} takes.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(st.characters(max_codepoint=127), max_size=260),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=250, max_size=258),
        ),
        st.booleans(),
    )
    def test_patternAgrees(self, text: str, quote: bool) -> None:
        """
        A value the pattern accepts is a key; a key without surrounding
        whitespace (which HTTP strips) matches the pattern.
        """
        value = f'"{text}"' if quote else text
        spec = loadSpec()["components"]["parameters"]["IdempotencyKey"]["schema"]
        matches = re.search(spec["pattern"], value) is not None
        try:
            parseKey([value.encode("ascii")])
        except InvalidIdempotencyKey:
            accepted = False
        else:
            accepted = True
        if matches:
            self.assertTrue(accepted, value)
        elif value == value.strip(" \t"):
            self.assertFalse(accepted, value)

"""
Secure by default: scoped tokens (JWTs) beside the operator tokens, the
C{Host} rule against DNS rebinding, C{POST}'s content type, and no token
in any log line.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

import twistedsse
from twistedsse import _security, tap
from twistedsse._listen import loopbackOnly
from twistedsse._build import buildSite
from twistedsse._security import MAX_TOKEN_LIFETIME, BearerTokens, HostPolicy, mintToken, redactQuery
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse

OPERATOR = "operator-token"
SECRET = b"s" * 32
NOW = 1_800_000_000.0


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forged(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """
    A JWT with any header and claims, and the given (not computed)
    signature: what an attacker can send.
    """
    parts = [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    return b".".join(parts).decode()


class _SiteCase(SynchronousTestCase):
    """
    A site over a service with the C{ticks} renderer, a clock at L{NOW}.
    """

    siteOptions: dict[str, Any] = {"authTokens": [OPERATOR.encode()], "jwtSecret": SECRET}

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.spawner = FakeSpawner()
        self.service = ticksService(self.clock, self.spawner, self.mktemp())
        self.site = buildSite(self.service, self.clock, **self.siteOptions)

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
             host: str = "localhost") -> tuple[int, dict[bytes, bytes], bytes]:
        conn = Connection(self.site)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        conn.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status, head, payload = splitResponse(conn.take())
        conn.disconnect()
        return status, head, payload

    def create(self, token: str | None, renderer: str = "ticks", **kw: Any) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        status, _, body = self.call("POST", "/renders", headers, json.dumps({"renderer": renderer}).encode(), **kw)
        return status, json.loads(body)

    def token(self, *scopes: str, ttl: float = 300, now: float = NOW) -> str:
        return mintToken(SECRET, scopes, ttl, now=now)


class ScopedTokenTests(_SiteCase):
    def test_createWithinScope(self) -> None:
        """
        A token scoped C{create:ticks} (or C{create:*}) starts C{ticks}
        renders; C{create:card} is 403, and no process starts.
        """
        self.assertEqual(self.create(self.token("create:ticks"))[0], 202)
        self.assertEqual(self.create(self.token("create:*"))[0], 202)
        status, body = self.create(self.token("create:card", "watch:x"))
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertIn("create:ticks", body["detail"])
        self.assertEqual(len(self.spawner.processes), 2)

    def test_operatorTokenStillWorks(self) -> None:
        """
        The operator token creates any renderer's renders and cancels any
        job, as before.
        """
        status, job = self.create(OPERATOR)
        self.assertEqual(status, 202)
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        self.assertEqual(self.call("DELETE", job["status_url"], headers)[0], 202)

    def test_cancelScope(self) -> None:
        """
        C{cancel:JOBID} cancels that job only; C{cancel:*} any; a create
        scope cannot cancel.
        """
        _, job = self.create(OPERATOR)
        _, other = self.create(OPERATOR)
        for scopes, expected in (
            (["create:*"], 403),
            ([f"cancel:{other['id']}"], 403),
            ([f"cancel:{job['id']}"], 202),
            (["cancel:*"], 202),
        ):
            headers = {"Authorization": f"Bearer {self.token(*scopes)}"}
            status, _, body = self.call("DELETE", job["status_url"], headers)
            self.assertEqual(status, expected, (scopes, body))
            if status == 403:
                self.assertEqual(json.loads(body)["error"], "forbidden")

    def test_renderStreamAccessTokenInTheQuery(self) -> None:
        """
        An EventSource can pass a scoped token as C{access_token} to
        C{/render-stream}; out of scope it is 403, and no render starts.
        """
        denied = self.call("GET", f"/render-stream?renderer=ticks&access_token={self.token('create:card')}")
        self.assertEqual(denied[0], 403)
        self.assertEqual(self.spawner.processes, [])
        conn = Connection(self.site)
        conn.request("GET", f"/render-stream?renderer=ticks&access_token={self.token('create:ticks')}")
        self.assertEqual(splitResponse(conn.take())[0], 200)
        conn.disconnect()
        self.assertEqual(len(self.spawner.processes), 1)

    def test_invalidTokensAre401(self) -> None:
        """
        Expired, too long-lived, not yet valid, unsigned (C{alg: none}),
        signed with another algorithm or secret, missing C{exp}, with a
        non-finite C{exp}, or not a JWT at all: each is a JSON 401 with
        C{WWW-Authenticate}, never a 5xx, and no render starts.
        """
        good = {"exp": int(NOW) + 60, "scope": "create:*"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyJWT: a 32-byte key is short for SHA-512
            hs512 = jwt.encode(good, SECRET, algorithm="HS512")
        tokens = {
            "expired": self.token("create:*", ttl=60, now=NOW - 120),
            "too long": jwt.encode({"exp": int(NOW) + MAX_TOKEN_LIFETIME + 60, "scope": "create:*"}, SECRET),
            "iat too far back": jwt.encode({**good, "iat": int(NOW) - MAX_TOKEN_LIFETIME}, SECRET),
            "future iat": jwt.encode({**good, "iat": int(NOW) + 30}, SECRET),
            "future nbf": jwt.encode({**good, "nbf": int(NOW) + 30}, SECRET),
            "alg none": forged({"alg": "none", "typ": "JWT"}, good),
            "HS512": hs512,
            "RS256 header": forged({"alg": "RS256", "typ": "JWT"}, good, b"x" * 256),
            "other secret": jwt.encode(good, b"o" * 32),
            "no exp": jwt.encode({"scope": "create:*"}, SECRET),
            "NaN exp": jwt.encode({"exp": float("nan"), "scope": "create:*"}, SECRET),
            "Infinity exp": jwt.encode({"exp": float("inf"), "scope": "create:*"}, SECRET),
            "string exp": jwt.encode({"exp": "soon", "scope": "create:*"}, SECRET),
            "huge exp": jwt.encode({"exp": 10**400, "scope": "create:*"}, SECRET),
            "huge iat": jwt.encode({**good, "iat": -(10**400)}, SECRET),
            "list scope": jwt.encode({**good, "scope": ["create:*"]}, SECRET),
            "aud": jwt.encode({**good, "aud": "elsewhere"}, SECRET),
            "garbage": "a.b.c",
            "not a JWT": "nope",
            "empty": "",
        }
        for what, token in tokens.items():
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            status, head, body = self.call("POST", "/renders", headers, b'{"renderer": "ticks"}')
            self.assertEqual((status, json.loads(body)["error"]), (401, "unauthorized"), what)
            self.assertIn(b"Bearer", head[b"www-authenticate"], what)
            self.assertNotIn(token.encode() or b"\0", body, what)
        self.assertEqual(self.spawner.processes, [])

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=200),
            st.lists(st.binary(max_size=60), min_size=3, max_size=3).map(
                lambda parts: b".".join(_b64(p) for p in parts).decode()
            ),
            st.tuples(st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]),
                                      st.one_of(st.none(), st.text(max_size=8), st.integers(), st.booleans())),
                      st.dictionaries(st.sampled_from(["exp", "iat", "nbf", "scope", "aud", "sub", "jti"]),
                                      st.one_of(st.none(), st.text(max_size=8), st.floats(), st.integers(),
                                                st.lists(st.integers(), max_size=2)))).map(
                lambda hc: forged(hc[0], hc[1], b"sig")
            ),
        )
    )  # fmt: skip
    def test_anyGarbageIs401(self, token: str) -> None:
        """
        Whatever a client puts after C{Bearer} (any text, three base64url
        parts, a JWT with any header and claims and a wrong signature) is a
        JSON 401, never a 5xx.
        """
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        status, _, body = self.call("POST", "/renders", headers, b'{"renderer": "ticks"}')
        self.assertEqual((status, json.loads(body)["error"]), (401, "unauthorized"), token)

    def test_leewayAndLifetime(self) -> None:
        """
        A token is accepted up to 10 s after its C{exp} (clock skew), not
        after; the longest lifetime, 3600 s, is accepted.
        """
        token = self.token("create:*", ttl=60)
        self.clock.advance(60 + 9)
        self.assertEqual(self.create(token)[0], 202)
        self.clock.advance(2)
        self.assertEqual(self.create(token)[0], 401)
        self.assertEqual(self.create(self.token("create:*", ttl=3600, now=self.clock.seconds()))[0], 202)

    def test_jwtOnlyServer(self) -> None:
        """
        A server with a JWT secret and no operator tokens requires a
        token; an operator-looking token is refused.
        """
        self.site = buildSite(self.service, self.clock, jwtSecret=SECRET)
        self.assertEqual(self.create(None)[0], 401)
        self.assertEqual(self.create(OPERATOR)[0], 401)
        self.assertEqual(self.create(self.token("create:ticks"))[0], 202)


class MintTokenTests(SynchronousTestCase):
    def test_claims(self) -> None:
        """
        C{mintToken} makes an HS256 JWT with C{iat}, C{exp} = C{iat} + ttl
        and the scopes space-separated, which any JWT library reads.
        """
        token = mintToken(SECRET, ["create:card", "cancel:*"], ttl=120, now=NOW)
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
        self.assertEqual(claims, {"iat": int(NOW), "exp": int(NOW) + 120, "scope": "create:card cancel:*"})

    def test_refusesWhatTheServerWouldRefuse(self) -> None:
        """
        A ttl over an hour (or not positive) and malformed scopes are
        refused when minting.
        """
        for ttl in (0, -1, MAX_TOKEN_LIFETIME + 1):
            self.assertRaises(ValueError, mintToken, SECRET, ["create:card"], ttl)
        for scope in ("create", "create:", "delete:x", "create:a b", "watch x"):
            self.assertRaises(ValueError, mintToken, SECRET, [scope])

    def test_exported(self) -> None:
        """
        C{twistedsse.mintToken} is the public name of the helper, and
        C{twistedsse.redactedLogFormatter} that of the access log format
        (for embedders with a L{Site} of their own).
        """
        self.assertIs(twistedsse.mintToken, _security.mintToken)
        self.assertIn("mintToken", twistedsse.__all__)
        self.assertIs(twistedsse.redactedLogFormatter, _security.redactedLogFormatter)
        self.assertIn("redactedLogFormatter", twistedsse.__all__)


class HostTests(_SiteCase):
    def test_loopbackAndAddressesServed(self) -> None:
        """
        Without a token, loopback names (any port) and IP literals are
        served.
        """
        for host in ("localhost", "localhost:8080", "LOCALHOST", "127.0.0.1", "127.1.2.3:80", "[::1]",
                     "[::1]:8080", "10.203.0.1:8080", "[2001:db8::1]:443"):
            self.assertEqual(self.call("GET", "/healthz", host=host)[0], 200, host)

    def test_otherNamesRefusedWithoutToken(self) -> None:
        """
        A name the operator did not list (what a DNS-rebinding page sends)
        is a JSON 421 naming C{--public-name}, for the page, the API and
        event streams alike; an invalid token does not help, and nothing
        starts.
        """
        _, job = self.create(OPERATOR)
        for host in ("evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io",
                     "localhost.", "[::1"):
            for path in ("/", "/healthz", job["status_url"], job["events_url"]):
                status, _, body = self.call("GET", path, host=host)
                self.assertEqual((status, json.loads(body)["error"]), (421, "unknown_host"), (host, path))
                self.assertIn("--public-name", json.loads(body)["detail"])
        self.assertEqual(self.create(None, host="evil.example")[0], 421)
        self.assertEqual(self.create("bad.to.ken", host="evil.example")[0], 421)
        self.assertEqual(len(self.spawner.processes), 1)

    def test_statusLineNamesTheStatus(self) -> None:
        """
        The 421's status line says C{Misdirected Request}, not Twisted's
        C{Unknown Status} (its table lacks 421, and 429 and 431 too).
        """
        conn = Connection(self.site)
        conn.protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        self.assertTrue(conn.take().startswith(b"HTTP/1.1 421 Misdirected Request\r\n"))
        conn.disconnect()

    def test_validTokenPassesTheHostRule(self) -> None:
        """
        A request with a valid credential (the operator's, or a scoped
        token in the header or the query) is served whatever its C{Host}:
        a rebinding page has no token.
        """
        self.assertEqual(self.create(OPERATOR, host="api.example")[0], 202)
        self.assertEqual(self.create(self.token("create:ticks"), host="api.example")[0], 202)
        _, job = self.create(OPERATOR)
        path = f"{job['status_url']}?access_token={self.token('watch:' + job['id'])}"
        self.assertEqual(self.call("GET", path, host="api.example")[0], 200)

    def test_publicNames(self) -> None:
        """
        C{--public-name} names are served (any port, any case); C{*}
        serves every name.
        """
        self.site = buildSite(self.service, self.clock, publicNames=["app.example", "Other.Example:443"])
        for host in ("app.example", "APP.example:8443", "other.example"):
            self.assertEqual(self.call("GET", "/healthz", host=host)[0], 200, host)
        self.assertEqual(self.call("GET", "/healthz", host="evil.example")[0], 421)
        self.site = buildSite(self.service, self.clock, publicNames=["*"])
        self.assertEqual(self.call("GET", "/healthz", host="evil.example")[0], 200)

    def test_serverWithoutAuth(self) -> None:
        """
        Without authentication configured no token can be valid: other
        names are refused, even with a made-up token.
        """
        self.site = buildSite(self.service, self.clock)
        self.assertEqual(self.call("GET", "/healthz", host="evil.example")[0], 421)
        headers = {"Authorization": "Bearer anything"}
        self.assertEqual(self.call("GET", "/healthz", headers, host="evil.example")[0], 421)
        self.assertEqual(self.create(None)[0], 202)

    def test_policyValues(self) -> None:
        """
        L{HostPolicy} on raw values: no C{Host} (HTTP/1.0) is served.
        """
        policy = HostPolicy.of([])
        self.assertTrue(policy.allowed(None))
        self.assertFalse(policy.allowed(b""))
        self.assertFalse(policy.allowed(b"localhost:x"))


class ContentTypeTests(_SiteCase):
    siteOptions: dict[str, Any] = {}

    def test_postNeedsJSON(self) -> None:
        """
        C{POST} without C{Content-Type: application/json} is a JSON 415 (a
        cross-site form or simple request cannot send it); parameters and
        case are allowed.
        """
        body = b'{"renderer": "ticks"}'
        for contentType in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                            "application/jsonx", "text/json"):
            headers = {} if contentType is None else {"Content-Type": contentType}
            status, _, payload = self.call("POST", "/renders", headers, body)
            self.assertEqual((status, json.loads(payload)["error"]), (415, "unsupported_media_type"), contentType)
        self.assertEqual(self.spawner.processes, [])
        for contentType in ("application/json", "application/json; charset=utf-8", "Application/JSON ;charset=UTF-8"):
            self.assertEqual(self.call("POST", "/renders", {"Content-Type": contentType}, body)[0], 202)


class AccessLogTests(_SiteCase):
    def test_tokensNeverLogged(self) -> None:
        """
        The access log of a real Site (the log twistd writes) shows
        C{access_token} values, however the name is encoded, and tokens in
        a C{Referer}, as C{REDACTED}; no log line holds a token, refused
        ones included.
        """
        scoped = self.token("create:ticks")
        bad = "bad-secret-value"
        lines: list[str] = []
        globalLogPublisher.addObserver(lambda event: lines.append(formatEvent(event)))
        self.addCleanup(globalLogPublisher.removeObserver, globalLogPublisher._observers[-1])
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        _, job = self.create(OPERATOR)
        # (Twisted logs a request when it finishes: HEAD for the streams.)
        requests = [
            ("HEAD", f"/render-stream?renderer=ticks&access_token={scoped}"),
            ("GET", f"/render-stream?renderer=ticks&access_token={bad}"),
            ("GET", f"{job['status_url']}?x=1&access%5Ftoken={OPERATOR}&y=2"),
            ("HEAD", f"{job['events_url']}?access+token=1&access_token={OPERATOR}"),
        ]
        for method, path in requests:
            conn = Connection(self.site)
            conn.request(method, path, {"Referer": f"http://localhost/?access_token={bad}"})
            conn.disconnect()
        self.call("DELETE", job["status_url"], {"Authorization": f"Bearer {bad}"})
        access = [line for line in lines if '"GET ' in line or '"HEAD ' in line]
        self.assertEqual(len(access), 4, lines)
        self.assertIn("/render-stream?renderer=ticks&access_token=REDACTED HTTP/1.1", access[0])
        self.assertIn("&access%5Ftoken=REDACTED&y=2", access[2])
        self.assertIn('"http://localhost/?access_token=REDACTED"', access[0])
        for secret in (scoped, bad, OPERATOR):
            self.assertEqual([line for line in lines if secret in line], [])

    def test_redactQuery(self) -> None:
        """
        Only C{access_token} values are rewritten; the rest of the URI is
        kept byte for byte.
        """
        self.assertEqual(redactQuery(b"/a?b=1&access_token=t&c"), b"/a?b=1&access_token=REDACTED&c")
        self.assertEqual(redactQuery(b"/a?access_tokens=t"), b"/a?access_tokens=t")
        self.assertEqual(redactQuery(b"/a"), b"/a")
        self.assertEqual(redactQuery(b"/a?access_token"), b"/a?access_token")


class BearerTokensTests(SynchronousTestCase):
    def test_disabled(self) -> None:
        """
        Nothing configured: every request is granted everything.
        """
        self.assertFalse(BearerTokens().enabled)
        self.assertTrue(BearerTokens(jwtSecret=SECRET).enabled)


class SecretFileTests(SynchronousTestCase):
    def test_secretFile(self) -> None:
        """
        The JWT secret comes from a file, of at least 32 bytes.
        """
        path = Path(self.mktemp())
        path.write_bytes(b"short\n")
        self.assertRaises(ValueError, _security.readSecret, path)
        path.write_bytes(SECRET + b"\n")
        self.assertEqual(_security.readSecret(path), SECRET)
        self.assertRaises(ValueError, _security.readSecret, "")


class ListenTests(SynchronousTestCase):
    def options(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_refusesToOpenWithoutAuth(self) -> None:
        """
        Listening anywhere but loopback (no interface means every one)
        without authentication is a usage error that names C{--no-auth}.
        """
        for description in ("tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp6:8080:interface=\\:\\:",
                            "tcp:8080:interface=10.0.0.1", "tcp:8080:10.0.0.1", "8080",
                            "ssl:443:privateKey=k.pem", "le:/srv:tcp:443"):
            with self.assertRaises(UsageError) as caught:
                self.options("--listen", "tcp:1:interface=127.0.0.1", "--listen", description)
            self.assertIn("--no-auth", str(caught.exception))
            self.assertIn(description, str(caught.exception))

    def test_loopbackNeedsNothing(self) -> None:
        """
        Loopback interfaces (and Unix sockets, and the default) start
        without authentication, as before.
        """
        for description in ("tcp:8080:interface=127.0.0.1", "tcp:0:interface=127.9.9.9", "tcp:8080:127.0.0.1",
                            "tcp6:8080:interface=\\:\\:1", "ssl:443:privateKey=k.pem:interface=127.0.0.1",
                            "unix:/run/twistedsse.sock"):
            self.assertEqual(self.options("--listen", description)["listen"], [description])
        self.assertEqual(self.options()["listen"], [tap.DEFAULT_LISTEN])

    def test_authOrNoAuthOpens(self) -> None:
        """
        With operator tokens, a JWT secret, or C{--no-auth}, any interface
        may be used.
        """
        tokens, secret = Path(self.mktemp()), Path(self.mktemp())
        tokens.write_text("t0ken\n")
        secret.write_bytes(SECRET)
        for extra in (["--auth-token-file", str(tokens)], ["--jwt-secret-file", str(secret)], ["--no-auth"]):
            options = self.options("--listen", "tcp:8080", *extra)
            self.assertEqual(options["listen"], ["tcp:8080"])
        self.assertEqual(self.options("--jwt-secret-file", str(secret))["jwt-secret"], SECRET)
        self.assertRaises(UsageError, self.options, "--jwt-secret-file", str(tokens))  # too short
        self.assertRaises(UsageError, self.options, "--auth-token-file=")

    def test_publicNames(self) -> None:
        """
        C{--public-name} is repeatable and reaches the site.
        """
        options = self.options("--public-name", "app.example", "--public-name", "b.example:8443")
        self.assertEqual(options["public-names"], ["app.example", "b.example:8443"])
        for bad in ("", "a b", "http://a.example/", "a..example", "x" * 70 + ".example"):
            self.assertRaises(UsageError, self.options, "--public-name", bad)

    def test_systemdSocketAddress(self) -> None:
        """
        A socket passed by systemd counts as loopback when it is bound to a
        loopback address or is a Unix socket; otherwise (or when it cannot
        be read) it does not.
        """
        loop = socket.socket()
        loop.bind(("127.0.0.1", 0))
        unbound = socket.socket()  # getsockname: 0.0.0.0, every interface
        unix = socket.socket(socket.AF_UNIX)
        for s in (loop, unbound, unix):
            self.addCleanup(s.close)
        env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
        self.assertTrue(loopbackOnly("systemd:domain=INET:index=0", env, firstFD=loop.fileno()))
        self.assertTrue(loopbackOnly("systemd:domain=INET:name=web", env, firstFD=loop.fileno()))
        self.assertTrue(loopbackOnly("systemd:domain=UNIX:index=0", env, firstFD=unix.fileno()))
        self.assertFalse(loopbackOnly("systemd:domain=INET:index=0", env, firstFD=unbound.fileno()))
        self.assertFalse(loopbackOnly("systemd:domain=INET:index=1", env, firstFD=loop.fileno()))
        self.assertFalse(loopbackOnly("systemd:domain=INET:name=api", env, firstFD=loop.fileno()))
        with open(__file__) as notASocket:
            before = len(os.listdir("/proc/self/fd"))
            self.assertFalse(loopbackOnly("systemd:domain=INET:index=0", env, firstFD=notASocket.fileno()))
            self.assertEqual(len(os.listdir("/proc/self/fd")), before)

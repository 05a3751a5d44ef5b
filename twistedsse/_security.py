"""
Who may do what, and from where.

The model:

  - Creating renders (C{POST /renders}, opening C{/render-stream} without
    C{Last-Event-ID}) and cancelling them (C{DELETE /renders/ID}) need a
    credential when authentication is configured: an operator token (from
    C{--auth-token-file}), or a short-lived scoped token (a JWT an app's
    backend mints with the C{--jwt-secret-file} secret, L{mintToken}).
  - Reading a job's status, events and output needs only its id, which is
    an unguessable capability (192 random bits): whoever was given the id
    may watch. A C{watch:ID} scope exists so that a page can pass the
    C{Host} rule below from a name the operator did not list.
  - A request whose C{Host} is not loopback (C{localhost}, C{127.x.x.x},
    C{[::1]}), an IP address, or a name from C{--public-name} is refused
    (C{421}) unless it carries a valid credential: a browser sends the
    name in its address bar, and only a name can be rebound (DNS
    rebinding) to make an attacker's page same-origin with us. IP literals
    cannot be rebound, so they pass.
  - C{POST} needs C{Content-Type: application/json} (C{415}): a cross-site
    form or C{fetch} in C{no-cors} mode can only send "simple" content
    types, so no page on another site can start a render with the
    browser's help.
  - Tokens never reach a log: the access log writes C{access_token=}
    values as C{REDACTED} (L{redactedLogFormatter}).

Scoped tokens are JWTs (RFC 7519) signed with HS256 and nothing else, with
these claims::

    exp    required: expiry, seconds since the epoch; at most
           MAX_TOKEN_LIFETIME (3600 s) ahead of now, and of iat
    iat    optional: issue time (not in the future)
    nbf    optional: not before
    scope  a string of space-separated scopes:
             create:RENDERER   start renders of RENDERER (create:* any)
             cancel:JOBID      cancel that render (cancel:* any whose id
                               the holder knows)
             watch:JOBID       read that render (passes the Host rule)

Any JWT library can mint them; L{mintToken} is one call.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote_to_bytes

import attrs
import jwt
from twisted.internet.interfaces import IReactorTime
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import provider

from ._errors import Forbidden, MisdirectedRequest, TwistedSSEError, Unauthorized, UnsupportedMediaType
from ._responses import respondError

#: The longest a scoped token may live, in seconds.
MAX_TOKEN_LIFETIME = 3600
#: Clock skew allowed between the minting backend and us, in seconds.
TOKEN_LEEWAY = 10
#: The only algorithm accepted (no C{none}, no RS/HS confusion).
TOKEN_ALGORITHM = "HS256"
#: HS256 keys shorter than its 256-bit output are weak (RFC 7518, 3.2).
MIN_SECRET_BYTES = 32

_VERBS = ("create", "cancel", "watch")


def readTokens(path: str | Path) -> tuple[bytes, ...]:
    """
    The tokens in a file, one per line; blank lines and C{#} comments are
    skipped.

    @raise ValueError: the file holds no token.
    """
    if not str(path):
        raise ValueError("no file named (is the variable that should hold its path set?)")
    tokens = tuple(
        line.strip().encode("utf-8")
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    )
    if not tokens:
        raise ValueError(f"{path}: no token in the file")
    return tokens


def readSecret(path: str | Path) -> bytes:
    """
    The JWT signing secret in a file (surrounding whitespace stripped). A
    file, never a command-line argument: argv is readable by every user of
    the machine (C{ps}).

    @raise ValueError: the secret is shorter than L{MIN_SECRET_BYTES}.
    """
    if not str(path):
        raise ValueError("no file named (is the variable that should hold its path set?)")
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: the secret must be at least {MIN_SECRET_BYTES} bytes, it has {len(secret)}")
    return secret


def _checkScope(scope: str) -> str:
    verb, sep, what = scope.partition(":")
    if verb not in _VERBS or not sep or not what or any(c.isspace() for c in scope):
        raise ValueError(f"a scope is VERB:NAME with VERB one of {', '.join(_VERBS)}, got {scope!r}")
    return scope


def mintToken(secret: bytes | str, scopes: Iterable[str], ttl: float = 300, now: float | None = None) -> str:
    """
    A scoped token for a page, as an app's backend mints it: an HS256 JWT
    with C{exp}, C{iat} and C{scope}. Hand it to the page (in the page's
    HTML, or its URL fragment C{#access_token=}, which no server sees);
    the page sends it in C{Authorization: Bearer} or C{access_token}.

    @param secret: the server's C{--jwt-secret-file} contents.
    @param scopes: e.g. C{["create:card", "cancel:*"]}.
    @param ttl: seconds it stays valid, at most L{MAX_TOKEN_LIFETIME}.
    @param now: the issue time (default: the wall clock).
    """
    scopes = [_checkScope(s) for s in scopes]
    if not 0 < ttl <= MAX_TOKEN_LIFETIME:
        raise ValueError(f"ttl must be in (0, {MAX_TOKEN_LIFETIME}] seconds, got {ttl!r}")
    issued = int(time.time() if now is None else now)
    claims = {"iat": issued, "exp": issued + int(ttl), "scope": " ".join(scopes)}
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM)


@attrs.frozen
class Grant:
    """
    What a request's credential allows: everything (an operator token), or
    the scopes of a token.
    """

    operator: bool = False
    scopes: frozenset[str] = frozenset()

    def allows(self, verb: str, name: str) -> bool:
        return self.operator or f"{verb}:{name}" in self.scopes or f"{verb}:*" in self.scopes

    def need(self, verb: str, name: str) -> None:
        """
        @raise Forbidden: this grant does not allow C{verb} on C{name}.
        """
        if not self.allows(verb, name):
            raise Forbidden(f"the token does not allow {verb}:{name}")


def _finite(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int of 400 digits
        number = math.nan
    if not math.isfinite(number):
        # (PyJWT's json.loads takes NaN and Infinity: an exp of NaN
        # compares false with everything, and would never expire.)
        raise Unauthorized(f"the token's {name} claim must be a finite number")
    return number


@attrs.frozen
class BearerTokens:
    """
    Checks C{Authorization: Bearer TOKEN} (or, where an EventSource must
    open the URL and cannot send headers, an C{access_token} query
    parameter) against the operator's tokens, in constant time, and scoped
    tokens (JWTs) against the signing secret. Nothing configured: no check.
    """

    tokens: tuple[bytes, ...] = ()
    jwtSecret: bytes | None = None
    maxLifetime: float = MAX_TOKEN_LIFETIME
    leeway: float = TOKEN_LEEWAY

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.jwtSecret is not None

    def given(self, request: IRequest, allowQuery: bool) -> bytes | None:
        """
        The credential the request carries, if any.
        """
        header: bytes | str | None = request.getHeader(b"authorization")
        if header is not None:
            if isinstance(header, str):
                header = header.encode("latin-1")
            scheme, _, value = header.partition(b" ")
            if scheme.lower() == b"bearer":
                return value.strip()
            # (Another scheme is for a proxy in front of us: not ours.)
        if allowQuery:
            values: list[bytes] | None = request.args.get(b"access_token")
            if values:
                return values[0]
        return None

    def authenticate(self, request: IRequest, now: float, allowQuery: bool = False) -> Grant | None:
        """
        The request's grant, or C{None} if it carries no credential.

        @raise Unauthorized: it carries one that is not valid.
        """
        given = self.given(request, allowQuery)
        if given is None:
            return None
        # Compare against every token, so timing tells nothing of which.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(given, token)
        if matched:
            return Grant(operator=True)
        secret = self.jwtSecret
        if secret is not None and given.count(b".") == 2:
            return self._verify(given, secret, now)
        raise Unauthorized("the token is not valid")

    def _verify(self, token: bytes, secret: bytes, now: float) -> Grant:
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[TOKEN_ALGORITHM],
                # The times are checked below, on our (injected) clock.
                options={"require": ["exp"], "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError as e:
            raise Unauthorized(f"the token is not valid: {e}") from None
        exp = _finite(claims, "exp")
        iat = _finite(claims, "iat")
        nbf = _finite(claims, "nbf")
        assert exp is not None  # required above
        if now > exp + self.leeway:
            raise Unauthorized("the token has expired")
        if exp - now > self.maxLifetime + self.leeway or (iat is not None and exp - iat > self.maxLifetime):
            raise Unauthorized(f"the token lives longer than {self.maxLifetime:g} s; mint short-lived tokens")
        if (iat is not None and iat > now + self.leeway) or (nbf is not None and nbf > now + self.leeway):
            raise Unauthorized("the token is not valid yet")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Unauthorized("the token's scope claim must be a string of space-separated scopes")
        return Grant(scopes=frozenset(scope.split()))

    def require(self, request: IRequest, now: float, allowQuery: bool = False) -> Grant:
        """
        The request's grant; everything when no authentication is
        configured.

        @raise Unauthorized: authentication is configured and the request
            has no valid credential.
        """
        if not self.enabled:
            return Grant(operator=True)
        grant = self.authenticate(request, now, allowQuery)
        if grant is None:
            raise Unauthorized("this needs a token: Authorization: Bearer TOKEN")
        return grant

    def check(self, request: IRequest, now: float, verb: str, name: str, allowQuery: bool = False) -> None:
        """
        The request may C{verb} C{name} (C{create} a renderer's renders,
        C{cancel} a job).

        @raise Unauthorized: see L{require}.
        @raise Forbidden: its credential does not cover this.
        """
        self.require(request, now, allowQuery).need(verb, name)


def _hostName(host: bytes) -> bytes:
    """
    The name in a C{Host} header, without the port, lower-cased; an IPv6
    literal keeps its brackets.
    """
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    name, sep, port = host.rpartition(b":")
    return name if sep and port.isdigit() else host


def _isIPLiteral(name: bytes) -> bool:
    text = name[1:-1] if name.startswith(b"[") and name.endswith(b"]") else name
    try:
        ipaddress.ip_address(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


@attrs.frozen
class HostPolicy:
    """
    The C{Host} names served to a request without a credential: loopback,
    IP literals, and the operator's public names (C{*}: any).
    """

    publicNames: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, names: Iterable[str]) -> HostPolicy:
        return cls(frozenset(_hostName(name.encode("idna") if name != "*" else b"*") for name in names))

    def allowed(self, host: bytes | None) -> bool:
        if host is None or b"*" in self.publicNames:
            # No Host: HTTP/1.0, not a browser (every browser sends one).
            return True
        name = _hostName(host)
        if name == b"localhost" or name in self.publicNames:
            return True
        return _isIPLiteral(name)


def _isJSON(contentType: bytes | None) -> bool:
    if contentType is None:
        return False
    return contentType.split(b";", 1)[0].strip().lower() == b"application/json"


def _refuse(request: IRequest, error: TwistedSSEError) -> bytes:
    return respondError(request, error.status, error.code, str(error))


class RequestGuard(Resource):
    """
    Wraps the app: the rules every request meets before routing, the
    C{Host} rule (DNS rebinding) and C{POST}'s content type (cross-site
    simple requests). See the module docstring.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, hosts: HostPolicy, auth: BearerTokens, clock: IReactorTime) -> None:
        # Resource.__init__ is unannotated, and untyped_calls_exclude misses
        # calls through super() (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self._wrapped = wrapped
        self._hosts = hosts
        self._auth = auth
        self._clock = clock

    def _credentialed(self, request: IRequest) -> bool:
        try:
            return self._auth.authenticate(request, self._clock.seconds(), allowQuery=True) is not None
        except Unauthorized:
            return False

    def render(self, request: IRequest) -> bytes | int:
        host: bytes | None = request.getHeader(b"host")
        # (No Host is allowed: HTTP/1.0.)
        if host is not None and not self._hosts.allowed(host) and not self._credentialed(request):
            shown = host.decode("utf-8", "replace")[:100]
            return _refuse(request, MisdirectedRequest(
                f"this server does not answer to the name {shown!r} without a token; its operator can "
                "allow the name with --public-name (a guard against DNS rebinding)"
            ))  # fmt: skip
        if request.method == b"POST" and not _isJSON(request.getHeader(b"content-type")):
            return _refuse(request, UnsupportedMediaType("POST needs Content-Type: application/json"))
        result: bytes | int = self._wrapped.render(request)
        return result


def redactQuery(uri: bytes) -> bytes:
    """
    C{uri} with the value of every C{access_token} query parameter (however
    its name is percent-encoded) written as C{REDACTED}.
    """
    path, sep, query = uri.partition(b"?")
    if not sep or b"=" not in query:
        return uri
    parts = []
    for part in query.split(b"&"):
        name, eq, _ = part.partition(b"=")
        if eq and unquote_to_bytes(name.replace(b"+", b" ")) == b"access_token":
            part = name + b"=REDACTED"
        parts.append(part)
    return path + b"?" + b"&".join(parts)


class _Redacted:
    """
    A request as the access log sees it: its URI and C{Referer} redacted.
    """

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self.uri = redactQuery(request.uri)

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            return redactQuery(value)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def redactedLogFormatter(timestamp: str, request: IRequest) -> str:
    """
    Twisted's combined log format, with tokens in URLs redacted.
    """
    line: str = combinedLogFormatter(timestamp, _Redacted(request))
    return line


@attrs.frozen
class CORSPolicy:
    """
    The origins whose pages may call the API and open event streams.
    """

    origins: frozenset[bytes] = frozenset()
    maxAge: int = 600

    @classmethod
    def of(cls, origins: Iterable[str]) -> CORSPolicy:
        return cls(frozenset(origin.rstrip("/").encode("ascii") for origin in origins))

    def allowed(self, request: IRequest) -> bytes | None:
        origin = request.getHeader(b"origin")
        if isinstance(origin, str):
            origin = origin.encode("latin-1")
        return origin if origin is not None and origin in self.origins else None


class CORSResource(Resource):
    """
    Wraps the app: adds the CORS headers for allowed origins and answers
    their preflight C{OPTIONS} requests. Other origins get no CORS
    headers, so their pages cannot read anything.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, policy: CORSPolicy) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (see RequestGuard)
        self._wrapped = wrapped
        self._policy = policy

    def render(self, request: IRequest) -> bytes | int:
        request.setHeader(b"vary", b"Origin")
        origin = self._policy.allowed(request)
        if origin is not None:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-expose-headers", b"Location, Retry-After")
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                request.setResponseCode(204)
                request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE")
                request.setHeader(
                    b"access-control-allow-headers", b"Content-Type, Authorization, Last-Event-ID, Cache-Control, Idempotency-Key"
                )
                request.setHeader(b"access-control-max-age", str(self._policy.maxAge).encode("ascii"))
                return b""
        result: bytes | int = self._wrapped.render(request)
        return result

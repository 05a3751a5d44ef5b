"""
Who may do what: operator bearer tokens for creating and cancelling
renders, and the CORS allow-list for pages on other origins.

Reading a job's status, events and output needs only its id, which is an
unguessable capability (192 random bits).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Iterable

import attrs
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from ._errors import Unauthorized


def readTokens(path: str | Path) -> tuple[bytes, ...]:
    """
    The tokens in a file, one per line; blank lines and C{#} comments are
    skipped.

    @raise ValueError: the file holds no token.
    """
    tokens = tuple(
        line.strip().encode("utf-8")
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    )
    if not tokens:
        raise ValueError(f"{path}: no token in the file")
    return tokens


@attrs.frozen
class BearerTokens:
    """
    Checks C{Authorization: Bearer TOKEN} (or, for C{/render-stream}, whose
    EventSource cannot send headers, an C{access_token} query parameter)
    against the operator's tokens, in constant time. No tokens: no check.
    """

    tokens: tuple[bytes, ...] = ()

    def check(self, request: IRequest, allowQuery: bool = False) -> None:
        """
        @raise Unauthorized: tokens are configured and the request has none
            of them.
        """
        if not self.tokens:
            return
        given = b""
        header = request.getHeader(b"authorization") or b""
        if isinstance(header, str):
            header = header.encode("latin-1")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif allowQuery:
            given = (request.args.get(b"access_token") or [b""])[0]
        # Compare against every token, so timing tells nothing of which.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(given, token)
        if not matched:
            raise Unauthorized("this needs an operator token: Authorization: Bearer TOKEN")


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
        super().__init__()
        self._wrapped = wrapped
        self._policy = policy

    def render(self, request: Any) -> Any:
        request.setHeader(b"vary", b"Origin")
        origin = self._policy.allowed(request)
        if origin is not None:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-expose-headers", b"Location, Retry-After")
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                request.setResponseCode(204)
                request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE")
                request.setHeader(
                    b"access-control-allow-headers", b"Content-Type, Authorization, Last-Event-ID, Cache-Control"
                )
                request.setHeader(b"access-control-max-age", str(self._policy.maxAge).encode("ascii"))
                return b""
        return self._wrapped.render(request)

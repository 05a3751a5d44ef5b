"""
What passed over HTTP, as the tests that watch real sockets record it: a
request head a client sent (L{Request}) and the answer a server gave
(L{Reply}). One pair of values for every tree, so a test that reads a
request and one that reads a reply spell them the same way.
"""

from __future__ import annotations

import attrs

__all__ = ["Reply", "Request"]


@attrs.frozen
class Request:
    """
    One request head a client sent.

    @ivar at: when its first byte arrived (C{time.time()}).
    @ivar headers: lower-cased names to values.
    """

    method: str
    target: str
    headers: dict[str, str]
    at: float

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target}>"


@attrs.define
class Reply:
    """
    What a server answered to one request: C{status} is C{None} if it
    closed the connection without answering. Not frozen: the HTTP/2 client
    fills it in as the stream's frames come.

    @ivar headers: lower-cased names to values.
    """

    status: int | None
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:
        # The body can be megabytes: a failure message shows its start.
        return f"<Reply {self.status} {self.headers.get('content-type')} {self.body[:200]!r}>"

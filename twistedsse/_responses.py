"""
The one writer of JSON response bodies, errors above all: the app's
answers, the guards' refusals (L{twistedsse._security}) and the refusals
written before a request is whole (L{twistedsse._site}) all come out of
here, through the strict L{twistedsse._json} (no C{NaN}), as
C{{"error": CODE, "detail": TEXT}} for an error, with a space after each
C{,} and C{:}, non-ASCII as UTF-8, and a trailing newline.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from . import _json
from ._errors import REASONS


def jsonBody(value: Any) -> bytes:
    """
    A response body holding C{value}.

    @raise ValueError: C{value} holds a float that is not finite.
    """
    return _json.dumps(value, spaced=True).encode("utf-8") + b"\n"


def errorBody(code: str, detail: str) -> bytes:
    """
    The body of an error answer.
    """
    return jsonBody({"error": code, "detail": detail})


def respondJSON(request: IRequest, status: int, value: Any) -> bytes:
    """
    Set C{request}'s status and JSON headers (never cached); return the
    body holding C{value}.
    """
    request.setResponseCode(status, REASONS.get(status))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return jsonBody(value)


def respondError(request: IRequest, status: int, code: str, detail: str) -> bytes:
    """
    L{respondJSON} for an error.
    """
    return respondJSON(request, status, {"error": code, "detail": detail})

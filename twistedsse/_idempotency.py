"""
C{Idempotency-Key} on C{POST /renders} (the IETF draft "The
Idempotency-Key HTTP Header Field", draft-ietf-httpapi-idempotency-key-
header): a create retried with the same key returns the job the first one
made, instead of starting a second render.

What is stored per key is a L{Once}: a slot (a digest of the caller and
the key, so that no key, token or subject is kept in the clear and one
caller's key never finds another's job) and a fingerprint of the request
body (the draft's "idempotency fingerprint": the same key with another
body is an error, 422, as the draft says). The job stores keep the slot as
long as they keep the job: it goes when the job expires.

Intentional divergences from the draft:
  - A key is accepted as a Structured Fields string (C{"..."}, as the
    draft specifies) or bare (C{Idempotency-Key: 8e03...}, as most clients
    send it): both are the same key.
  - A retry that arrives while the first request is still being handled
    is not a 409: creating is one atomic step (in memory, one call on the
    reactor thread; in Redis, one script), so the second request finds the
    job the first made and returns it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

import attrs
import jwt

from ._errors import InvalidIdempotencyKey

if TYPE_CHECKING:
    from ._security import Grant

#: The longest key, in characters.
MAX_KEY = 255

#: An RFC 8941 sf-string's content: printable ASCII, C{"} and C{\\}
#: escaped with a backslash.
_QUOTED = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
#: A bare key: visible ASCII but the double quote (no spaces).
_BARE = re.compile(rb"[\x21\x23-\x7e]+")


@attrs.frozen
class Once:
    """
    One create's idempotency: where its key is kept, and what its body
    was.

    @ivar slot: a digest of the caller's scope and the key (hex).
    @ivar fingerprint: a digest of the request body (hex).
    """

    slot: str
    fingerprint: str


def parseKey(values: list[bytes] | None) -> str | None:
    """
    The key the C{Idempotency-Key} header lines C{values} carry, or
    C{None} without one.

    @raise InvalidIdempotencyKey: more than one line, or a value that is
        not 1 to L{MAX_KEY} printable ASCII characters (a Structured
        Fields string, or bare).
    """
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey("send one Idempotency-Key header")
    value = values[0].strip(b" \t")
    quoted = _QUOTED.fullmatch(value)
    if quoted is not None:
        key = re.sub(rb'\\(["\\])', rb"\1", quoted.group(1))
    elif _BARE.fullmatch(value):
        key = value
    else:
        raise InvalidIdempotencyKey(
            'the Idempotency-Key must be printable ASCII, as a string ("...") or bare without spaces'
        )
    if not 1 <= len(key) <= MAX_KEY:
        raise InvalidIdempotencyKey(f"the Idempotency-Key must be 1 to {MAX_KEY} characters, got {len(key)}")
    return key.decode("ascii")


def callerScope(grant: Grant, credential: bytes | None) -> str:
    """
    Who is asking, as far as keys go: the subject (C{sub}) of a scoped
    token, so that a page's retry with a token minted anew for the same
    subject finds its job; else the credential itself (an operator token,
    a token without C{sub}); else nobody in particular (no authentication
    configured: one namespace, so keys should be random).

    The credential has been verified already (C{grant} is its).
    """
    if credential is None:
        return "anonymous"
    if not grant.operator:
        try:
            subject = jwt.decode(credential, options={"verify_signature": False}).get("sub")
        except jwt.InvalidTokenError:
            subject = None
        if isinstance(subject, str):
            return "subject:" + subject
    return "token:" + hashlib.sha256(credential).hexdigest()


def once(scope: str, key: str, body: object) -> Once:
    """
    The L{Once} of a create by C{scope} with C{key} and the decoded JSON
    C{body}.
    """
    slot = hashlib.sha256(f"{scope}\n{key}".encode("utf-8", "backslashreplace")).hexdigest()
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return Once(slot, hashlib.sha256(canonical.encode("ascii")).hexdigest())

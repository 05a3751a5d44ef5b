"""
Strict JSON in and out. Python's C{json} reads and writes C{NaN} and
C{Infinity}, which no other JSON parser accepts; we refuse them both ways.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence, TypeAlias, Union

#: A JSON value, as this module reads and writes it. Read-only containers
#: (C{Sequence}, C{Mapping}), so that a C{dict[str, int]} is one too.
JSON: TypeAlias = Union[None, bool, int, float, str, Sequence["JSON"], Mapping[str, "JSON"]]

#: A JSON object: event payloads, a renderer's validated C{params}.
JSONObject: TypeAlias = Mapping[str, JSON]


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """
    Parse JSON, refusing C{NaN}, C{Infinity} and C{-Infinity}.

    @raise ValueError: not JSON (C{UnicodeDecodeError} included), or nested
        deeper than Python can parse.
    """
    try:
        return json.loads(data, parse_constant=_refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps(value: object, *, spaced: bool = False) -> str:
    """
    Compact JSON text, non-ASCII kept as is.

    @param spaced: a space after each C{,} and C{:}, as HTTP response
        bodies have always been written (L{twistedsse._responses}).
    @raise ValueError: C{value} holds a float that is not finite.
    """
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(value, separators=separators, ensure_ascii=False, allow_nan=False)

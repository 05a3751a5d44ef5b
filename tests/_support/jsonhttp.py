"""
Blocking HTTP for tests that run outside a reactor: JSON requests with
urllib, and the head of a raw HTTP/1.x response.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def parseHead(head: bytes) -> tuple[int, dict[str, str]]:
    """
    The status and headers (lower-cased names; repeated ones joined with
    C{", "}) of a response head, without its blank line.
    """
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return status, headers


def postJSON(url: str, body: Any, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def getJSON(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)

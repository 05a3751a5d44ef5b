"""
Ports for processes that cannot be told to listen on port 0.
"""

from __future__ import annotations

import socket


def freePort() -> int:
    """
    A 127.0.0.1 TCP port that was free a moment ago. Another process may
    take it before ours binds it: callers that can, retry with another.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int, timeout: float = 0.5) -> bool:
    """
    Whether something accepts TCP connections on 127.0.0.1:C{port}.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
    except OSError:
        return False
    return True

"""
The unit tests' helpers, now in L{tests._support} (L{tests._support.web},
L{tests._support.fixtures}); this module keeps the old import path.
"""

from tests._support.fixtures import snapshot, ticksService
from tests._support.web import (
    BUFFER,
    BufferTransport,
    Connection,
    TCPStringTransport,
    chunks,
    decode,
    dechunk,
    splitResponse,
)

__all__ = [
    "BUFFER",
    "BufferTransport",
    "Connection",
    "TCPStringTransport",
    "chunks",
    "decode",
    "dechunk",
    "snapshot",
    "splitResponse",
    "ticksService",
]

"""
Split a byte stream into lines, with a hard bound on memory.

A child process's stdout arrives in chunks of any size. L{LineBuffer} turns
them into complete lines and keeps only the unterminated tail, refusing a
line longer than its limit as soon as the tail passes it, so a child that
never writes a newline cannot make us buffer without bound. Pure: no
Twisted import, no I/O.

Intentional divergence from C{twisted.protocols.basic.LineOnlyReceiver}: the
delimiter is LF alone (what ffmpeg and most tools write) and one CR just
before it is dropped, so CRLF works too; a lone CR is ordinary data.
"""

from __future__ import annotations

import attrs

from ._errors import RenderProtocolError


class LineTooLong(RenderProtocolError):
    """
    A line passed L{LineBuffer.maxLength}.

    @ivar lines: the complete lines the same chunk held before the
        offending one: valid output, which the caller may still use (a
        child's last progress lines before it went wrong are not lost).
    """

    def __init__(self, message: str, lines: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.lines: list[bytes] = lines or []


_LF = b"\n"
_CR = b"\r"


def _stripCR(line: bytes) -> bytes:
    """
    Drop one trailing CR, so C{b"a\\r\\n"} and C{b"a\\n"} give the same line.
    """
    return line[:-1] if line.endswith(_CR) else line


@attrs.define
class LineBuffer:
    """
    An incremental LF line splitter with a maximum line length.

    The unterminated tail is kept as a list of chunks and joined only when
    a LF completes it, so many small chunks cost linear time, not the
    quadratic time of C{buffer += data}.

    @ivar maxLength: the longest line accepted, in bytes, not counting the
        LF nor a CR just before it.
    """

    maxLength: int = 65536
    _tail: list[bytes] = attrs.field(factory=list, init=False)
    _tailLength: int = attrs.field(default=0, init=False)
    _failed: bool = attrs.field(default=False, init=False)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Take the next chunk; return every line it completes, in order,
        without their terminators.

        @raise LineTooLong: a line (complete or still buffered) is longer
            than C{maxLength}; its C{lines} are those the chunk completed
            before it. The buffer is then dropped and every later call
            raises too: the stream has lost its framing, and
            resynchronising silently would hide that.
        """
        self._checkUsable()
        if _LF not in data:
            if data:
                self._tail.append(data)
                self._tailLength += len(data)
                self._checkTail()
            return []
        pieces = data.split(_LF)
        rest = pieces.pop()
        first = pieces[0]
        if self._tail:
            self._tail.append(first)
            first = b"".join(self._tail)
        pieces[0] = first
        lines: list[bytes] = []
        for piece in pieces:
            line = _stripCR(piece)
            if len(line) > self.maxLength:
                self._fail(lines)
            lines.append(line)
        self._tail = [rest] if rest else []
        self._tailLength = len(rest)
        self._checkTail(lines)
        return lines

    def end(self) -> list[bytes]:
        """
        The stream ended: return the final unterminated line, if it is not
        empty, and reset.

        @raise RenderProtocolError: the buffer already overflowed.
        """
        self._checkUsable()
        line = _stripCR(b"".join(self._tail))
        self._tail = []
        self._tailLength = 0
        return [line] if line else []

    def _checkTail(self, complete: list[bytes] | None = None) -> None:
        """
        Refuse the tail once it cannot become an acceptable line: longer
        than C{maxLength}, allowing one extra byte only if that byte is the
        CR of a CRLF still to come.
        """
        excess = self._tailLength - self.maxLength
        if excess > 1 or (excess == 1 and not self._tail[-1].endswith(_CR)):
            self._fail(complete)

    def _checkUsable(self) -> None:
        if self._failed:
            raise self._error()

    def _fail(self, complete: list[bytes] | None = None) -> None:
        self._failed = True
        self._tail = []
        self._tailLength = 0
        raise self._error(complete)

    def _error(self, complete: list[bytes] | None = None) -> LineTooLong:
        return LineTooLong(f"line longer than {self.maxLength} bytes", complete)

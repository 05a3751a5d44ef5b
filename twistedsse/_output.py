"""
L{OutputResource}: a finished render's file, served to clients that may be
hostile, slow or both.

It replaces C{twisted.web.static.File}, which answered C{Range:
bytes=0-,0-,...} (1 000 ranges of a 2 746-byte file) with a 2 830 025-byte
multipart body, and a C{Range} holding a C{0xff} byte with a 500 and a
logged traceback; which followed symlinks; and which streams through the
global cooperator, with no deadline for a client that stops reading.

What it does instead:

  - B{One range at most.} C{bytes=A-B}, C{bytes=A-}, C{bytes=-N} get a 206
    with C{Content-Range}. Several ranges are coalesced when they overlap
    or nearly touch (RFC 9110 15.3.7 allows it, whatever their order) and
    served as one 206 if they become one; otherwise, or past
    L{MAX_RANGES} of them, C{Range} is ignored and the whole file is sent
    (200; RFC 9110 14.2 lets a server ignore C{Range}). So no answer is
    ever longer than the file. A range set none of whose ranges overlaps
    the file is 416 C{range_not_satisfiable} with C{Content-Range: bytes
    */SIZE} (JSON, as every error). A C{Range} that does not parse (bad
    syntax, bytes that are not ASCII, a number of more than
    L{MAX_DIGITS} digits, C{LAST} before C{FIRST}, another unit) is
    ignored: 200.
  - B{C{If-Range}} is honoured in its date form: the range is served only
    if the date is exactly the file's C{Last-Modified}; anything else
    (an entity tag: we send none) means the whole file. C{If-Modified-Since}
    gives a 304 as before.
  - B{No symlinks, nothing outside the output directory.} The file is
    opened by name relative to the output directory's descriptor with
    C{O_NOFOLLOW} (and C{O_NONBLOCK}, so a FIFO planted there cannot block
    the reactor), and the open descriptor is checked with C{fstat} to be a
    regular file. Everything after (size, date, bytes) comes from that
    descriptor, never from the path again: no time-of-check/time-of-use
    gap. A symlink, a directory or anything odd is 409 C{output_not_ready}.
  - B{Headers for a user-influenced file served inline}:
    C{X-Content-Type-Options: nosniff} (it is never sniffed as HTML) and
    C{Content-Security-Policy: default-src 'none'; media-src 'self'}
    (opened as a page, it can run and fetch nothing but itself).
    I{Intentional divergence}: no C{sandbox}. Measured: under C{sandbox}
    (alone, or with any C{media-src}) Chromium's and WebKit's viewers do
    not load the video opened directly (C{readyState} 0; WebKit
    C{MEDIA_ERR_SRC_NOT_SUPPORTED}); Firefox plays it. Without it, all
    three do (tests/browsers/test_output.py).
  - B{Bounded memory, and a deadline.} The body is written by a push
    producer that reads L{BLOCK} bytes at a time, a few blocks per reactor
    turn, only while the connection is not full. A client that reads
    nothing for the streams' C{writeTimeout} seconds is dropped (its
    connection aborted, or its HTTP/2 stream reset), exactly as a stalled
    event stream is. The file is closed when the response ends, when the
    client goes, and when it is dropped.
"""

from __future__ import annotations

import email.utils
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._errors import OutputNotReady, RangeNotSatisfiable
from ._stream import _abort, _socketOptions, tcpTransport

_log = Logger()

#: Bytes read from the file and written per step.
BLOCK = 64 * 1024
#: Blocks written per reactor turn at most, so that one fast download
#: (whose socket takes everything at once) does not hold the reactor.
BLOCKS_PER_TURN = 4
#: More ranges than this in one C{Range} header: ignored (200).
MAX_RANGES = 16
#: A range bound of more digits than this (a petabyte is 16): ignored.
MAX_DIGITS = 18
#: Ranges this close (bytes) are coalesced: about the overhead of a
#: multipart part, which is what RFC 9110 15.3.7 allows to merge.
COALESCE_GAP = 80

CSP = b"default-src 'none'; media-src 'self'"


def byteRange(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The one byte range to send of a C{size}-byte file, as C{(first, last)}
    (both included), or C{None} for the whole file (no C{Range}, or one to
    ignore: malformed, or several that do not coalesce into one).

    @raise RangeNotSatisfiable: the C{Range} parses and none of its ranges
        overlaps the file.
    """
    if header is None or size <= 0:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    unit, sep, rangeSet = text.partition("=")
    if not sep or unit.strip(" \t").lower() != "bytes":
        return None
    # Empty list elements ("a, ,b") are allowed and ignored (RFC 9110 5.6.1).
    specs = [spec.strip(" \t") for spec in rangeSet.split(",")]
    specs = [spec for spec in specs if spec]
    if not specs or len(specs) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        first, dash, last = spec.partition("-")
        if not dash:
            return None
        if first == "":
            if not _isNumber(last):
                return None
            suffix = int(last)
            if suffix > 0:  # a zero suffix is unsatisfiable
                ranges.append((max(0, size - suffix), size - 1))
            continue
        if not _isNumber(first) or not (last == "" or _isNumber(last)):
            return None
        start = int(first)
        end = size - 1 if last == "" else int(last)
        if last != "" and end < start:
            return None  # invalid (RFC 9110 14.1.1): the header is ignored
        if start < size:
            ranges.append((start, min(end, size - 1)))
    if not ranges:
        raise RangeNotSatisfiable(f"no range of {header.decode('ascii')!r} is within the file's {size} bytes", size)
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        lastStart, lastEnd = merged[-1]
        if start <= lastEnd + 1 + COALESCE_GAP:
            merged[-1] = (lastStart, max(lastEnd, end))
        else:
            merged.append((start, end))
    return merged[0] if len(merged) == 1 else None


def _isNumber(text: str) -> bool:
    return 0 < len(text) <= MAX_DIGITS and text.isdigit() and text.isascii()


def _headerDate(raw: bytes | None) -> float | None:
    """
    An HTTP date header as a POSIX time, or C{None} if absent or not a date.
    """
    if raw is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(raw.decode("ascii").split(";", 1)[0].strip()).timestamp()
    except (ValueError, TypeError, IndexError, OverflowError, UnicodeDecodeError):
        return None


def openOutput(directory: Path, name: str) -> tuple[int, os.stat_result]:
    """
    Open the file C{name} of C{directory} for reading, refusing anything
    but a regular file that is an entry of that directory.

    @return: the open descriptor (the caller closes it) and its C{fstat}.
    @raise OutputNotReady: C{name} is not a single path component, or it
        is a symlink, missing, or not a regular file.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise OutputNotReady(f"{name!r} is not an output file name")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        folder = os.open(directory, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    except OSError as e:
        raise OutputNotReady(f"the output directory cannot be read ({e.strerror})") from None
    try:
        fd = os.open(name, flags, dir_fd=folder)
    except OSError as e:
        # ELOOP: a symlink; ENOENT: gone; others: unreadable.
        raise OutputNotReady(f"the output file cannot be served ({e.strerror})") from None
    finally:
        os.close(folder)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputNotReady("the output is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


class OutputResource(Resource):
    """
    One output file (C{GET} and C{HEAD}), opened when a request renders it.

    @param directory: the output directory; the file must be an entry of it.
    @param name: the file's name in C{directory}.
    @param filename: the name offered to the client (C{Content-Disposition}).
    @param clock: runs the write deadline and the production steps.
    @param writeTimeout: seconds a client may read nothing before it is
        dropped (C{0}: never).
    """

    isLeaf = True

    def __init__(
        self,
        directory: Path,
        name: str,
        filename: str,
        clock: IReactorTime,
        writeTimeout: float,
        contentType: bytes = b"video/mp4",
    ) -> None:
        # Typing note: Resource.__init__ is unannotated, and mypy's
        # untyped_calls_exclude misses calls through super()
        # (python/mypy#16653).
        super().__init__()  # type: ignore[no-untyped-call]
        self._directory = directory
        self._name = name
        self._filename = filename
        self._clock = clock
        self._writeTimeout = writeTimeout
        self._contentType = contentType

    def render_GET(self, request: Request) -> bytes | int:
        return self._serve(request, body=True)

    def render_HEAD(self, request: Request) -> bytes | int:
        return self._serve(request, body=False)

    def _serve(self, request: Request, body: bool) -> bytes | int:
        # Errors raised here (409, 416) reach the app's JSON error handler:
        # Klein renders this resource within its own error handling.
        fd, info = openOutput(self._directory, self._name)
        try:
            size = info.st_size
            request.setHeader(b"accept-ranges", b"bytes")
            request.setHeader(b"last-modified", http.datetimeToString(int(info.st_mtime)))
            request.setHeader(b"cache-control", b"private, max-age=3600")
            # Preconditions come before Range (RFC 9110 13.2.2).
            since = _headerDate(request.getHeader(b"if-modified-since"))
            if since is not None and int(info.st_mtime) <= since:
                os.close(fd)
                request.setResponseCode(http.NOT_MODIFIED)
                request.finish()
                return NOT_DONE_YET
            span = byteRange(request.getHeader(b"range"), size)  # may raise the 416
            if span is not None and not self._ifRange(request, info):
                span = None
            request.setHeader(b"content-type", self._contentType)
            request.setHeader(
                b"content-disposition", f'inline; filename="{self._filename}"'.encode("ascii", "replace")
            )
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(b"content-security-policy", CSP)
            if span is None:
                first, length = 0, size
                request.setResponseCode(http.OK)
            else:
                first, length = span[0], span[1] - span[0] + 1
                request.setResponseCode(http.PARTIAL_CONTENT)
                request.setHeader(b"content-range", b"bytes %d-%d/%d" % (span[0], span[1], size))
            request.setHeader(b"content-length", b"%d" % (length,))
        except BaseException:
            os.close(fd)
            raise
        if not body or length == 0:
            os.close(fd)
            return b""
        _Download(request, fd, first, length, self._clock, self._writeTimeout).start()
        return NOT_DONE_YET

    @staticmethod
    def _ifRange(request: Request, info: os.stat_result) -> bool:
        """
        Whether C{If-Range} (if any) lets the range be served: only its
        date form, exactly the file's C{Last-Modified}.
        """
        condition = request.getHeader(b"if-range")
        return condition is None or condition.strip() == http.datetimeToString(int(info.st_mtime))


@implementer(IPushProducer)
class _Download:
    """
    Writes C{length} bytes of an open file from C{offset} to a request:
    a push producer, so Twisted pauses it while the connection is full
    (HTTP/1.1 socket buffers, HTTP/2 flow-control window), and owner of the
    descriptor, the next production step and the write deadline. All three
    are released in L{_Download._release}, which every ending reaches:
    the last byte written, the client gone, the client dropped.
    """

    __slots__ = (
        "_request", "_fd", "_offset", "_left", "_clock", "_writeTimeout",
        "_paused", "_open", "_producing", "_step", "_deadline",
    )  # fmt: skip

    def __init__(
        self, request: Request, fd: int, offset: int, length: int, clock: IReactorTime, writeTimeout: float
    ) -> None:
        self._request = request
        self._fd: int | None = fd
        self._offset = offset
        self._left = length
        self._clock = clock
        self._writeTimeout = writeTimeout
        self._paused = False
        self._open = True
        self._producing = False
        self._step: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None

    def start(self) -> None:
        request = self._request
        request.notifyFinish().addBoth(self._finished)
        transport = tcpTransport(request)
        if transport is not None:
            _socketOptions(transport, self._writeTimeout)
        request.registerProducer(self, True)
        if self._open:
            self._produce()

    def _produce(self) -> None:
        """
        Write up to L{BLOCKS_PER_TURN} blocks while the connection takes
        them; then the next step on the next reactor turn, unless paused
        (C{resumeProducing} goes on) or done.
        """
        self._step = None
        if self._producing:
            return
        self._producing = True
        try:
            for _ in range(BLOCKS_PER_TURN):
                if self._paused or not self._open:
                    return
                assert self._fd is not None
                try:
                    data = os.pread(self._fd, min(BLOCK, self._left), self._offset)
                except OSError as e:
                    self._fail(f"the output file could not be read ({e.strerror})")
                    return
                if not data:
                    self._fail("the output file is shorter than when its download began")
                    return
                self._offset += len(data)
                self._left -= len(data)
                self._request.write(data)
                if not self._left:
                    self._end()
                    return
            if not self._paused and self._open:
                self._step = self._clock.callLater(0, self._produce)
        finally:
            self._producing = False

    def _end(self) -> None:
        self._release()
        self._request.unregisterProducer()
        self._request.finish()

    def _fail(self, why: str) -> None:
        # The Content-Length is promised: an honest end is a broken one.
        _log.warn("download of an output aborted: {why}", why=why)
        self._release()
        _abort(self._request)

    # -- IPushProducer: Twisted calls these as the client's buffer fills and
    # drains.

    def pauseProducing(self) -> None:
        if self._paused or not self._open:
            return
        self._paused = True
        self._cancelStep()
        if self._writeTimeout > 0:
            self._deadline = self._clock.callLater(self._writeTimeout, self._stalled)

    def resumeProducing(self) -> None:
        if not self._paused or not self._open:
            return
        self._paused = False
        self._cancelDeadline()
        self._produce()

    def stopProducing(self) -> None:
        # The connection is going away; release at once (notifyFinish will
        # find nothing left to do).
        self._release()

    def _stalled(self) -> None:
        self._deadline = None
        _log.info("download dropped: the client read nothing for {seconds} s", seconds=self._writeTimeout)
        self._release()
        _abort(self._request)

    # -- releasing ----------------------------------------------------------

    def _cancelStep(self) -> None:
        if self._step is not None and self._step.active():
            self._step.cancel()
        self._step = None

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _release(self) -> None:
        """
        Close the file and cancel both timers; idempotent.
        """
        self._open = False
        self._cancelStep()
        self._cancelDeadline()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _finished(self, result: Any) -> None:
        # Fires once: on finish() and on a lost connection alike.
        self._release()
        if isinstance(result, Failure):
            _log.debug("download closed by the client: {why}", why=result.getErrorMessage())

"""
Tests for L{twistedsse._output}: the C{Range} parser (a table), and the
output route end to end over a real L{Site} on an in-memory transport with
a L{MemoryReactorClock}: ranges, hostile headers, symlinks, headers, HEAD,
the producer's backpressure and write deadline, and that the file is
closed on every ending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._build import buildSite
from twistedsse._errors import OutputNotReady, RangeNotSatisfiable
from twistedsse._output import BLOCK, BLOCKS_PER_TURN, MAX_RANGES, byteRange, openOutput
from twistedsse.testing import FakeSpawner

from tests._support.fixtures import ticksService
from tests._support.web import Connection, splitResponse

#: The size of the finished card the issue measured with.
SIZE = 2746


def openFDs() -> int:
    return len(os.listdir("/proc/self/fd"))


class ByteRangeTests(SynchronousTestCase):
    """
    L{byteRange}: what one C{Range} header means for a file of C{SIZE}
    bytes.
    """

    def test_singleRanges(self) -> None:
        """
        C{A-B}, C{A-} and C{-N} give one range, clamped to the file; the
        unit is case-insensitive and blanks around the list are allowed.
        """
        for header, expected in [
            (b"bytes=0-99", (0, 99)),
            (b"bytes=100-", (100, SIZE - 1)),
            (b"bytes=-100", (SIZE - 100, SIZE - 1)),
            (b"bytes=-99999", (0, SIZE - 1)),
            (b"bytes=2000-99999", (2000, SIZE - 1)),
            (b"bytes=2745-2745", (2745, 2745)),
            (b"BYTES=0-0", (0, 0)),
            (b"bytes= 5-9 ", (5, 9)),
            (b"bytes=5-9, ,", (5, 9)),
        ]:
            self.assertEqual(byteRange(header, SIZE), expected, header)

    def test_severalRanges(self) -> None:
        """
        Ranges that overlap or nearly touch coalesce into one (whatever
        their order); ranges that stay apart, or more than L{MAX_RANGES} of
        them, mean the whole file (C{None}): never more bytes than the file.
        """
        self.assertEqual(byteRange(b"bytes=0-,0-", SIZE), (0, SIZE - 1))
        self.assertEqual(byteRange(b"bytes=100-199,0-99", SIZE), (0, 199))
        self.assertEqual(byteRange(b"bytes=0-9,50-59", SIZE), (0, 59))
        self.assertEqual(byteRange(b"bytes=0-9,2000-2009", SIZE), None)
        self.assertEqual(byteRange(b"bytes=0-9,-5", SIZE), None)
        self.assertEqual(byteRange(b"bytes=" + b",".join([b"0-"] * 1000), SIZE), None)
        self.assertEqual(byteRange(b"bytes=" + b",".join([b"0-0"] * (MAX_RANGES + 1)), SIZE), None)
        self.assertEqual(byteRange(b"bytes=0-9,9999-", SIZE), (0, 9))

    def test_malformedIgnored(self) -> None:
        """
        A header that does not parse is ignored (C{None}: the whole file),
        never an exception: bytes that are not ASCII, another unit, bad
        syntax, C{LAST} before C{FIRST}, absurdly long numbers, Unicode
        digits.
        """
        for header in [
            b"bytes=\xff-1", b"bytes=0-\xff", b"\xff", b"items=0-1", b"bytes", b"bytes=", b"bytes=,",
            b"bytes=a-b", b"bytes=1-2-3", b"bytes=--1", b"bytes=-", b"bytes=+1-2", b"bytes=1 -2",
            b"bytes=0x10-0x20", b"bytes=9-1", b"bytes=1-2,5", b"bytes=" + b"9" * 19 + b"-",
            b"bytes=-" + b"9" * 5000, "bytes=\u0661-\u0662".encode("utf-8"), b"bytes=\x00-1", b"=0-1",
        ]:  # fmt: skip
            self.assertIsNone(byteRange(header, SIZE), header)
        self.assertIsNone(byteRange(None, SIZE))
        self.assertIsNone(byteRange(b"bytes=0-1", 0))

    def test_unsatisfiable(self) -> None:
        """
        A range set that parses but none of whose ranges overlaps the file
        raises L{RangeNotSatisfiable} carrying the file's size.
        """
        for header in [b"bytes=2746-", b"bytes=5000-6000", b"bytes=-0", b"bytes=3000-,-0", b"bytes=" + b"9" * 18 + b"-"]:
            with self.assertRaises(RangeNotSatisfiable, msg=header) as caught:
                byteRange(header, SIZE)
            self.assertEqual(caught.exception.size, SIZE)


class OpenOutputTests(SynchronousTestCase):
    """
    L{openOutput} opens only a regular file that is an entry of the
    output directory.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.outside = Path(self.mktemp())
        self.outside.write_bytes(b"secret")

    def assertRefused(self, name: str) -> None:
        before = openFDs()
        self.assertRaises(OutputNotReady, openOutput, self.dir, name)
        self.assertEqual(openFDs(), before)

    def test_regularFile(self) -> None:
        """
        A regular file opens; its C{fstat} comes with the descriptor.
        """
        (self.dir / "a.mp4").write_bytes(b"x" * 10)
        fd, info = openOutput(self.dir, "a.mp4")
        self.addCleanup(os.close, fd)
        self.assertEqual(info.st_size, 10)
        self.assertEqual(os.pread(fd, 20, 0), b"x" * 10)

    def test_refused(self) -> None:
        """
        A symlink (to a file outside, or inside), a directory, a FIFO (which
        would block the reactor on open), a missing file and names that are
        not one path component are refused, and no descriptor leaks.
        """
        (self.dir / "real.mp4").write_bytes(b"x")
        (self.dir / "out.mp4").symlink_to(self.outside)
        (self.dir / "in.mp4").symlink_to(self.dir / "real.mp4")
        (self.dir / "dir.mp4").mkdir()
        os.mkfifo(self.dir / "fifo.mp4")
        for name in ["out.mp4", "in.mp4", "dir.mp4", "fifo.mp4", "missing.mp4", "", ".", "..",
                     "../" + self.outside.name, "a\0b"]:  # fmt: skip
            self.assertRefused(name)


class _OutputFixture(SynchronousTestCase):
    """
    A render service with a fake spawner behind a real L{Site} on a
    L{MemoryReactorClock}, with a 5 s write timeout.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.dir = Path(self.mktemp())
        # No expiry timer: these tests count the clock's timers.
        self.service = ticksService(self.clock, self.spawner, self.dir, expireAfter=0)
        self.site = buildSite(self.service, self.clock, writeTimeout=5.0)
        self.fds = openFDs()

    def finished(self, size: int = SIZE) -> tuple[str, bytes]:
        """
        A render that succeeded with a C{size}-byte output; its id and the
        bytes.
        """
        jobID = self.service.newJobID()
        self.service.submit("ticks", {}, f"/renders/{jobID}/output", jobID=jobID)
        data = bytes(i % 251 for i in range(size))
        (self.dir / f"{jobID}.part.mp4").write_bytes(data)
        self.spawner.processes[-1].exit(0)
        self.assertEqual(self.service.outputPath(jobID), self.dir / f"{jobID}.mp4")
        return jobID, data

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            raw: bytes | None = None) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
        """
        One request on a new connection, the clock run until the response
        is written; the connection is closed after.
        """
        conn = Connection(self.site)
        if raw is not None:
            conn.protocol.dataReceived(raw)
        else:
            conn.request(method, path, headers)
        for _ in range(100):
            self.clock.advance(0)
        status, head, body = splitResponse(conn.take())
        conn.disconnect()
        return status, head, body

    def assertClean(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(openFDs(), self.fds, "a file descriptor was left open")


class OutputRouteTests(_OutputFixture):
    """
    C{GET /renders/ID/output} over a real L{Site}: a render that succeeded
    with a file, served by L{twistedsse._output.OutputResource}.
    """

    def test_wholeFile(self) -> None:
        """
        Without C{Range}: 200, the file's bytes, and the headers of a
        user-influenced file served inline: C{video/mp4},
        C{X-Content-Type-Options: nosniff}, a CSP that allows only the
        video itself,
        C{Accept-Ranges}, C{Content-Disposition}, C{Cache-Control},
        C{Last-Modified}.
        """
        jobID, data = self.finished()
        status, head, body = self.get(f"/renders/{jobID}/output")
        self.assertEqual((status, body), (200, data))
        self.assertEqual(head[b"content-type"], b"video/mp4")
        self.assertEqual(head[b"content-length"], b"2746")
        self.assertEqual(head[b"x-content-type-options"], b"nosniff")
        self.assertEqual(head[b"content-security-policy"], b"default-src 'none'; media-src 'self'")
        self.assertEqual(head[b"accept-ranges"], b"bytes")
        self.assertEqual(head[b"content-disposition"], f'inline; filename="{jobID}.mp4"'.encode())
        self.assertEqual(head[b"cache-control"], b"private, max-age=3600")
        self.assertIn(b"last-modified", head)
        self.assertClean()

    def test_thousandRanges(self) -> None:
        """
        C{Range: bytes=0-,0-,...} (1 000 ranges) gets the file once, 200,
        2 746 bytes (twisted.web.static.File answered 206 with 2 830 025).
        """
        jobID, data = self.finished()
        status, head, body = self.get(f"/renders/{jobID}/output", {"Range": "bytes=" + ",".join(["0-"] * 1000)})
        self.assertEqual((status, len(body), body), (200, SIZE, data))
        self.assertNotIn(b"content-range", head)
        self.assertClean()

    def test_nonASCIIRange(self) -> None:
        """
        A C{Range} holding a C{0xff} byte is ignored (200, the whole file),
        and nothing is logged (static.File: 500 and a traceback).
        """
        jobID, data = self.finished()
        raw = b"GET /renders/%s/output HTTP/1.1\r\nHost: localhost\r\nRange: bytes=\xff0-10\r\n\r\n" % jobID.encode()
        status, head, body = self.get("", raw=raw)
        self.assertEqual((status, body), (200, data))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertClean()

    def test_singleRange(self) -> None:
        """
        One range: 206, its bytes, C{Content-Range}; coalescable ranges are
        one range.
        """
        jobID, data = self.finished()
        for header, first, last in [("bytes=0-99", 0, 99), ("bytes=2700-", 2700, 2745), ("bytes=-10", 2736, 2745),
                                    ("bytes=10-19,0-9", 0, 19)]:  # fmt: skip
            status, head, body = self.get(f"/renders/{jobID}/output", {"Range": header})
            self.assertEqual((status, body), (206, data[first : last + 1]), header)
            self.assertEqual(head[b"content-range"], b"bytes %d-%d/2746" % (first, last))
            self.assertEqual(head[b"content-length"], b"%d" % (last - first + 1))
            self.assertEqual(head[b"content-type"], b"video/mp4")
        self.assertClean()

    def test_unsatisfiable(self) -> None:
        """
        A range past the end: 416 C{range_not_satisfiable}, JSON, with
        C{Content-Range: bytes */2746}.
        """
        jobID, _ = self.finished()
        status, head, body = self.get(f"/renders/{jobID}/output", {"Range": "bytes=5000-"})
        self.assertEqual((status, head[b"content-type"]), (416, b"application/json"))
        self.assertEqual(json.loads(body)["error"], "range_not_satisfiable")
        self.assertEqual(head[b"content-range"], b"bytes */2746")
        self.assertNotIn(b"content-disposition", head)
        self.assertClean()

    def test_malformedRanges(self) -> None:
        """
        Malformed C{Range} headers get the whole file, 200, never a 5xx.
        """
        jobID, data = self.finished()
        for header in ["bytes=a-b", "bytes=9-1", "bytes=" + "9" * 30 + "-", "lines=1-2", "bytes=0-1,,2-x"]:
            status, _, body = self.get(f"/renders/{jobID}/output", {"Range": header})
            self.assertEqual((status, body), (200, data), header)
        self.assertClean()

    def test_ifRange(self) -> None:
        """
        C{If-Range} with the file's C{Last-Modified} serves the range;
        another date or an entity tag, the whole file.
        """
        jobID, data = self.finished()
        _, head, _ = self.get(f"/renders/{jobID}/output")
        date = head[b"last-modified"].decode()
        status, _, body = self.get(f"/renders/{jobID}/output", {"Range": "bytes=0-9", "If-Range": date})
        self.assertEqual((status, body), (206, data[:10]))
        for other in ["Thu, 01 Jan 1970 00:00:00 GMT", '"etag"', "\xff"]:
            status, _, body = self.get(f"/renders/{jobID}/output", {"Range": "bytes=0-9", "If-Range": other})
            self.assertEqual((status, body), (200, data), other)
        self.assertClean()

    def test_ifModifiedSince(self) -> None:
        """
        C{If-Modified-Since} the file's date or later: 304, no body; an
        earlier date or one that does not parse: 200.
        """
        jobID, data = self.finished()
        _, head, _ = self.get(f"/renders/{jobID}/output")
        status, head304, body = self.get(f"/renders/{jobID}/output", {"If-Modified-Since": head[b"last-modified"].decode()})
        self.assertEqual((status, body), (304, b""))
        for other in ["Thu, 01 Jan 1970 00:00:00 GMT", "yesterday", "Thu, 99 Foo 99999 99:99:99 GMT"]:
            status, _, body = self.get(f"/renders/{jobID}/output", {"If-Modified-Since": other})
            self.assertEqual((status, body), (200, data), other)
        self.assertClean()

    def test_head(self) -> None:
        """
        HEAD gives the headers a GET would (C{Content-Length} of the whole
        file, or of the range) and no body; the file is closed at once.
        """
        jobID, _ = self.finished()
        conn = Connection(self.site)
        conn.request("HEAD", f"/renders/{jobID}/output")
        raw = conn.take()
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertEqual(body, b"")
        self.assertIn(b"Content-Length: 2746", head)
        self.assertIn(b"X-Content-Type-Options: nosniff", head)
        conn.request("HEAD", f"/renders/{jobID}/output", {"Range": "bytes=0-9"})
        head, _, body = conn.take().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 206 "), head)
        self.assertIn(b"Content-Length: 10", head)
        self.assertEqual(body, b"")
        conn.disconnect()
        self.assertClean()

    def test_symlinkRefused(self) -> None:
        """
        An output replaced by a symlink (here to a file outside the output
        directory) is 409 C{output_not_ready}: it is never followed.
        """
        jobID, _ = self.finished()
        secret = Path(self.mktemp())
        secret.write_bytes(b"not for clients")
        output = self.dir / f"{jobID}.mp4"
        output.unlink()
        output.symlink_to(secret.absolute())
        status, head, body = self.get(f"/renders/{jobID}/output")
        self.assertEqual((status, json.loads(body)["error"]), (409, "output_not_ready"))
        self.assertNotIn(b"not for clients", body)
        self.assertClean()

    def test_notReadyAndUnknown(self) -> None:
        """
        A running render is 409 C{output_not_ready}; an unknown id 404
        C{unknown_job}, as before.
        """
        jobID = self.service.submit("ticks", {}).id
        status, _, body = self.get(f"/renders/{jobID}/output")
        self.assertEqual((status, json.loads(body)["error"]), (409, "output_not_ready"))
        status, _, body = self.get("/renders/nope/output")
        self.assertEqual((status, json.loads(body)["error"]), (404, "unknown_job"))
        self.spawner.processes[-1].exit(0)
        self.assertClean()


class DownloadProducerTests(_OutputFixture):
    """
    The body of a large output, written by a push producer on the
    injected clock: a few blocks per reactor turn, nothing while the
    connection is full, dropped after C{writeTimeout} seconds of that, the
    file closed on every ending.
    """

    SIZE = 2 * 1024 * 1024

    def start(self) -> tuple[Connection, bytes]:
        jobID, data = self.finished(self.SIZE)
        conn = Connection(self.site)
        conn.request("GET", f"/renders/{jobID}/output")
        return conn, data

    def test_blocksPerTurn(self) -> None:
        """
        Each reactor turn writes at most C{BLOCKS_PER_TURN} blocks, so one
        fast download does not hold the reactor; the body ends whole and
        the file is closed.
        """
        conn, data = self.start()
        wire = conn.take()
        body = wire.partition(b"\r\n\r\n")[2]
        self.assertEqual(len(body), BLOCK * BLOCKS_PER_TURN)
        # The rest waits for the next turn. (Clock.advance runs the calls
        # scheduled meanwhile at the same time in the same call: one is
        # enough for all the remaining steps.)
        steps = [call for call in self.clock.getDelayedCalls() if call.getTime() == self.clock.seconds()]
        self.assertEqual(len(steps), 1)
        self.clock.advance(0)
        wire += conn.take()
        status, head, body = splitResponse(wire)
        self.assertEqual((status, len(body), body == data), (200, self.SIZE, True))
        conn.disconnect()
        self.assertClean()

    def test_pausedWritesNothing(self) -> None:
        """
        While the connection is full (the transport paused the producer),
        nothing is read or written, however long the clock runs short of
        the write timeout; resumed, it goes on where it stopped.
        """
        conn, data = self.start()
        wire = conn.take()
        conn.transport.producer.pauseProducing()
        self.clock.advance(0)
        self.clock.advance(4.9)
        self.assertEqual(conn.take(), b"")
        conn.transport.producer.resumeProducing()
        for _ in range(1000):
            self.clock.advance(0)
            wire += conn.take()
        self.assertEqual(splitResponse(wire)[2], data)
        self.assertFalse(conn.transport.disconnecting)
        conn.disconnect()
        self.assertClean()

    def test_stalledClientDropped(self) -> None:
        """
        A client that reads nothing for the write timeout (5 s here) is
        dropped: its connection aborted, the file closed, no timer left.
        """
        conn, _ = self.start()
        conn.take()
        conn.transport.producer.pauseProducing()
        self.clock.advance(4.9)
        self.assertFalse(conn.transport.disconnecting)
        self.assertNotEqual(openFDs(), self.fds)
        self.clock.advance(0.2)
        self.assertTrue(conn.transport.disconnecting)
        self.assertTrue(conn.transport.disconnected)  # abortConnection
        self.assertEqual(openFDs(), self.fds)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        conn.disconnect()
        self.assertClean()

    def test_clientGoesMidway(self) -> None:
        """
        A client that disconnects mid-download: the file is closed and no
        step is left scheduled.
        """
        conn, _ = self.start()
        conn.take()
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        conn.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertClean()

    def test_clientGoesWhilePaused(self) -> None:
        """
        A client that disconnects while paused: the write deadline is
        cancelled and the file closed.
        """
        conn, _ = self.start()
        conn.transport.producer.pauseProducing()
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        conn.disconnect()
        self.assertClean()

    def test_fileShrinks(self) -> None:
        """
        A file truncated under a download (the promised length cannot be
        sent): the connection is aborted, the file closed, a warning
        logged; no exception.
        """
        conn, _ = self.start()
        jobID = self.service.broker.jobs()[-1].id
        os.truncate(self.dir / f"{jobID}.mp4", BLOCK * BLOCKS_PER_TURN + 10)
        self.clock.advance(0)
        self.assertTrue(conn.transport.disconnected)
        conn.disconnect()
        self.assertClean()

    def test_noTimeout(self) -> None:
        """
        With C{writeTimeout} 0 a paused download waits without a timer.
        """
        self.site = buildSite(self.service, self.clock, writeTimeout=0)
        conn, _ = self.start()
        conn.transport.producer.pauseProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        conn.disconnect()
        self.assertClean()

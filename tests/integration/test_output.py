"""
Downloads of a render's output on real sockets: a client that stops
reading is dropped after C{--write-timeout} (1 s here) and its file
closed, while a client that reads in bursts with pauses shorter than that
and a fast client both get the whole file; and the answers to hostile
C{Range} headers, as the issue measured them.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from twistedsse import CommandRenderer, EagerSendReactor, buildService, buildSite

from tests._support.procfs import openCount
from tests._support.waiting import whenTrue

SIZE = 8 * 1024 * 1024
WRITE_TIMEOUT = 1.0
#: Writes C{SIZE} bytes (a repeating 0..255 pattern) as its output.
MAKE_OUTPUT = (
    "import os, sys; sys.stdin.read(); "
    f"open(os.environ['TWISTEDSSE_OUTPUT'], 'wb').write(bytes(range(256)) * ({SIZE} // 256))"
)
DATA = bytes(range(256)) * (SIZE // 256)


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class RawClient:
    """
    A client socket that the test reads (or not) by hand, without blocking
    the reactor: C{rcvbuf} bounds how much the kernel takes for it.
    """

    def __init__(self, port: int, path: str, rcvbuf: int, headers: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), headers))
        self.sock.setblocking(False)
        self.data = b""
        self.ended: str | None = None

    def drain(self, limit: int = 1 << 30) -> None:
        """
        Read what the kernel holds (up to C{limit} bytes), noting an end
        (C{"eof"} or C{"reset"}).
        """
        taken = 0
        while taken < limit and self.ended is None:
            try:
                chunk = self.sock.recv(min(65536, limit - taken))
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.ended = "reset"
                return
            if not chunk:
                self.ended = "eof"
                return
            self.data += chunk
            taken += len(chunk)

    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def close(self) -> None:
        self.sock.close()


class StalledDownloadTests(TestCase):
    """
    A real server (as twistd serves it: eager TCP connections) with a
    1-second write timeout and an 8 MiB output.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.service = buildService(
            reactor,
            renderers=[CommandRenderer("big", [sys.executable, "-c", MAKE_OUTPUT])],
            outputDir=self.mktemp(),
            killGrace=1.0,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.site = buildSite(self.service, reactor, writeTimeout=WRITE_TIMEOUT)
        port = EagerSendReactor(reactor).listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.site.drain, reactor, 5.0)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.post(self.base + "/renders", json={"renderer": "big"}, pool=self.pool)
        job = yield response.json()
        deadline = time.monotonic() + 30
        while True:
            response = yield treq.get(self.base + job["status_url"], pool=self.pool)
            status = yield response.json()
            if status["state"] == "succeeded":
                break
            self.assertIn(status["state"], ("queued", "running"), status)
            self.assertLess(time.monotonic(), deadline, "the render did not finish")
            yield sleep(0.05)
        self.outputURL = job["output_url"]
        self.path = (self.service.outputDir / f"{job['id']}.mp4").absolute()
        self.assertEqual(self.path.stat().st_size, SIZE)

    def waitFor(self, condition: Any, timeout: float, what: str) -> Any:
        return whenTrue(reactor, condition, timeout, what)

    @inlineCallbacks
    def test_stalledDownloadDropped(self) -> Any:
        """
        A client that stops reading (a 4 KiB receive buffer, never read) is
        dropped about C{--write-timeout} after the connection filled, and
        its file closed; meanwhile a client that reads in bursts (all its
        256 KiB buffer holds) with 0.4 s pauses (2.4 s of them, more than
        the timeout in all, less each time) and a fast client both
        download the whole file.
        """
        stalled = RawClient(self.port, self.outputURL, 4096)
        self.addCleanup(stalled.close)
        began = time.monotonic()
        bursty = RawClient(self.port, self.outputURL, 256 * 1024)
        self.addCleanup(bursty.close)
        yield self.waitFor(lambda: openCount(self.path) == 2, 5, "both downloads to start")

        response = yield treq.get(self.base + self.outputURL, pool=self.pool)
        fast = yield treq.content(response)
        self.assertEqual((response.code, len(fast), fast == DATA), (200, SIZE, True))

        dropped = None
        for _ in range(6):
            bursty.drain()
            stop = time.monotonic() + 0.4
            while time.monotonic() < stop:
                if dropped is None and openCount(self.path) <= 1:
                    dropped = time.monotonic() - began
                yield sleep(0.01)
        self.assertIsNotNone(dropped, "the stalled download was not dropped")
        sys.stderr.write(f"\n[output] stalled download dropped after {dropped:.2f} s (write timeout {WRITE_TIMEOUT} s)\n")
        self.assertGreaterEqual(dropped, WRITE_TIMEOUT)
        self.assertLess(dropped, WRITE_TIMEOUT + 1.5)
        self.assertIsNone(bursty.ended)

        def bursty_done() -> bool:
            bursty.drain()
            return len(bursty.body()) >= SIZE or bursty.ended is not None

        yield self.waitFor(bursty_done, 20, "the bursty download")
        self.assertTrue(bursty.data.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual((len(bursty.body()), bursty.body() == DATA), (SIZE, True))

        yield self.waitFor(lambda: (stalled.drain(), stalled.ended)[1] is not None, 5, "the stalled end")
        self.assertLess(len(stalled.body()), SIZE)
        self.assertEqual(stalled.ended, "reset")
        yield self.waitFor(lambda: openCount(self.path) == 0, 5, "every file to be closed")

    @inlineCallbacks
    def test_hostileRanges(self) -> Any:
        """
        On real sockets, as the issue measured: 1 000 ranges get the file
        once (200, 8 MiB; static.File sent a 206 of 1 000 parts), a C{Range}
        holding C{0xff} gets 200 (static.File: 500 and a traceback), one
        range 206 with its bytes, one past the end 416. Nothing is logged
        and no file stays open.
        """
        cases = [
            (b"Range: bytes=" + b",".join([b"0-"] * 1000) + b"\r\n", b"200", SIZE),
            (b"Range: bytes=\xff0-10\r\n", b"200", SIZE),
            (b"Range: bytes=100-199\r\n", b"206", 100),
            (b"Range: bytes=" + str(SIZE).encode() + b"-\r\n", b"416", None),
        ]
        for header, status, length in cases:
            client = RawClient(self.port, self.outputURL, 1 << 20, header + b"Connection: close\r\n")
            self.addCleanup(client.close)
            yield self.waitFor(lambda: (client.drain(), client.ended)[1] is not None, 10, "the answer")
            self.assertEqual(client.data.split(b" ")[1], status, header[:40])
            if length is not None:
                self.assertEqual(len(client.body()), length)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(openCount(self.path), 0)



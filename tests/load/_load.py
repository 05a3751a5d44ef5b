"""
Load-test plumbing: a twistedsse server in a process of its own, whose
memory (C{VmRSS}), descriptors and CPU time are read from C{/proc/PID};
many raw non-blocking socket clients driven by one C{selectors} loop in
the test's process (hundreds of them cost it less CPU than the server
spends on them); and L{Attempts}, a crowd of clients in a helper process,
for load the measuring clients must not share a CPU with.

Everything is on 127.0.0.1 and bounded: every loop has a deadline, every
socket opened here is closed here, and the server process is stopped (by
PID) at cleanup.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs

from twisted.trial.unittest import SynchronousTestCase

from tests._support.chunked import Dechunker
from tests._support.frames import FrameReader
from tests._support.jsonhttp import getJSON, parseHead, postJSON
from tests._support.launcher import Launched, Server, childEnv
from tests._support.procfs import cpuSeconds, fdCount, vmRSS
from tests._support.stats import summary
from tests._support.waiting import TimedOut, poll, waitUntil
from twistedsse._frames import TERMINAL_EVENTS

#: Every progress event must reach a reading client this soon after the
#: render printed it.
BOUND_MS = 100.0

#: The listening socket's backlog. Twisted's default (50) drops the SYNs of
#: a burst of a few hundred connects, whose clients then retry after 1 s:
#: the load tests are about the server's event loop, not that queue.
BACKLOG = 1024


def latencySummary(latencies: list[float]) -> str:
    return summary(latencies, (0.5, 0.99))


def firstBreak(seen: list[int], expected: list[int]) -> str:
    """
    Where C{seen} departs from C{expected}, in a few words ("" if it does
    not): a list of 20 000 ids is too long for an assertion message.
    """
    for at, (a, b) in enumerate(zip(seen, expected)):
        if a != b:
            return f"at position {at}: got {seen[max(0, at - 2) : at + 3]}, expected {expected[max(0, at - 2) : at + 3]}"
    if len(seen) != len(expected):
        return f"got {len(seen)} items, expected {len(expected)}; ends with {seen[-3:]}"
    return ""


def report(line: str) -> None:
    """
    A figure for the person reading the test output (pytest shows it with
    C{-s}, or for a failing test).
    """
    sys.stderr.write(f"\n[load] {line}\n")
    sys.stderr.flush()


class LoadServer:
    """
    A twistedsse server process (L{tests._support.serve}) with the C{ticks}
    renderer (tests/integration/ticker.py), listening on an ephemeral
    127.0.0.1 port with a backlog of L{BACKLOG}.
    """

    def __init__(self, *options: str) -> None:
        self.server = Server(*options, "--listen", f"tcp:0:interface=127.0.0.1:backlog={BACKLOG}")
        self.pid = self.server.process.pid
        self.port = self.server.port
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        return self.server.stop()

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def rss(self) -> int:
        return vmRSS(self.pid)

    def cpu(self) -> float:
        return cpuSeconds(self.pid)

    def busy(self, seconds: float) -> float:
        """
        The share of one CPU the server uses over the next C{seconds}.
        """
        before, start = self.cpu(), time.monotonic()
        time.sleep(seconds)
        return (self.cpu() - before) / (time.monotonic() - start)

    def logText(self) -> str:
        """
        Everything the server has logged so far.
        """
        log = self.server.log
        log.flush()
        log.seek(0)
        text = log.read().decode(errors="replace")
        log.seek(0, os.SEEK_END)
        return text

    def assertLoggedNoErrors(self) -> None:
        """
        The server logged no traceback and no unhandled error.
        """
        text = self.logText()
        for sign in ("Traceback", "Unhandled"):
            if sign in text:
                at = text.index(sign)
                raise AssertionError(f"the server logged an error: {text[max(0, at - 300) : at + 1500]}")

    def fds(self) -> int:
        return fdCount(self.pid)

    def census(self, timeout: float = 10.0) -> tuple[int, int]:
        """
        The objects the server's garbage collector tracks and its resident
        memory (KiB), both right after a full collection (SIGUSR1, see
        L{tests._support.serve}): what it keeps, whatever garbage it had.
        """
        before = self.logText().count("CENSUS ")
        os.kill(self.pid, signal.SIGUSR1)
        found = waitUntil(
            lambda: re.findall(r"CENSUS objects=(\d+) rss_kib=(\d+)", self.logText())[before:], timeout,
            "a census from the server",
        )  # fmt: skip
        objects, rss = found[-1]
        return int(objects), int(rss)

    def health(self) -> dict[str, Any]:
        code, body = getJSON(self.base + "/healthz", timeout=10)
        if code != 200:
            raise AssertionError(f"GET /healthz: {code} {body}")
        return body

    def render(self, **params: Any) -> dict[str, Any]:
        code, body = postJSON(self.base + "/renders", {"renderer": "ticks", "params": params})
        if code != 202:
            raise AssertionError(f"POST /renders: {code} {body}")
        return body

    def state(self, job: dict[str, Any]) -> str:
        code, body = getJSON(self.base + job["status_url"])
        return body["state"]

    def cancel(self, job: dict[str, Any]) -> None:
        cancel = urllib.request.Request(self.base + job["status_url"], method="DELETE")
        with urllib.request.urlopen(cancel, timeout=10) as response:
            if response.status != 202:
                raise AssertionError(f"DELETE {job['status_url']}: {response.status}")

    def waitForState(self, job: dict[str, Any], states: Iterable[str], timeout: float) -> str:
        state = poll(lambda: (lambda now: now if now in states else "")(self.state(job)), timeout)
        if not state:
            raise TimedOut(f"render {job['id']} still {self.state(job)} after {timeout} s")
        return state

    def waitFor(self, what: str, condition: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """
        Poll C{/healthz} every 20 ms until C{condition(health)} holds, for
        at most C{timeout} seconds.
        """
        seen: list[dict[str, Any]] = []

        def healthy() -> dict[str, Any] | None:
            seen[:] = [self.health()]
            return seen[0] if condition(seen[0]) else None

        health = poll(healthy, timeout)
        if health is None:
            raise TimedOut(f"{what}: not within {timeout} s; /healthz says {seen[0]}")
        return health

    def settledFds(self, target: int, slack: int, timeout: float = 5.0) -> int:
        """
        The server's descriptor count, once it is within C{slack} of
        C{target} or C{timeout} seconds have passed (closing sockets is
        asynchronous).
        """
        counts: list[int] = []

        def settled() -> bool:
            counts[:] = [self.fds()]
            return abs(counts[0] - target) <= slack

        poll(settled, timeout)
        return counts[0]


class MemoryWatch:
    """
    Samples a process's C{VmRSS}; the loop calls L{sample} every few ms.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = vmRSS(pid)
        self.peak = self.baseline
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1
        self.peak = max(self.peak, vmRSS(self.pid))

    @property
    def growthMiB(self) -> float:
        return (self.peak - self.baseline) / 1024


_TICK = re.compile(rb'\{"progress":[^,]*,"i":(\d+),"t_ns":(\d+),')


def tickOf(data: bytes) -> tuple[int, int]:
    """
    A ticker event's C{(i, t_ns)}. The server re-encodes each line as
    compact JSON with its keys in order, so a regular expression finds
    both without parsing a 1 KiB padded object; anything else is parsed.
    """
    match = _TICK.match(data)
    if match is not None:
        i, printed = match.groups()
        return int(i), int(printed)
    value = json.loads(data)
    return value["i"], value["t_ns"]


#: How often the load tests' clients read (see L{Loop.run}'s C{pace}).
PACE = 0.002


class Loop:
    """
    One C{selectors} loop for many sockets. Each registered object has a
    C{ready(mask)} method.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.open: set[Any] = set()

    def close(self) -> None:
        """
        Close every socket still open, and the selector.
        """
        for connection in list(self.open):
            connection.close()
        self.selector.close()

    def watch(self, connection: Any, mask: int) -> None:
        try:
            self.selector.modify(connection.sock, mask, connection)
        except KeyError:
            self.selector.register(connection.sock, mask, connection)

    def unwatch(self, connection: Any) -> None:
        try:
            self.selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass

    def run(
        self,
        until: Callable[[], bool],
        timeout: float,
        what: str,
        every: Callable[[], None] | None = None,
        period: float = 0.02,
        pace: float = 0.0,
    ) -> float:
        """
        Serve sockets until C{until()} holds; C{every()} runs every
        C{period} seconds meanwhile.

        @param pace: the least time between two rounds of reads. Reading
            every 2 ms rather than at every frame gets several frames per
            C{recv}, which spares the client (and so the CPU the server
            shares with it) a fifth of its work; a latency measured so can
            only come out longer, never shorter.
        @return: the seconds it took.
        @raise AssertionError: it took over C{timeout} seconds.
        """
        start = time.monotonic()
        deadline = start + timeout
        nextTick = start
        # The measuring side must not pause: a full collection in this
        # (pytest's, large) process took up to 55 ms, added to the latency
        # it measures of the server. Little cyclic garbage is made here.
        collecting = gc.isenabled()
        gc.disable()
        try:
            while not until():
                now = time.monotonic()
                if now > deadline:
                    raise AssertionError(f"{what}: not done within {timeout} s")
                if every is not None and now >= nextTick:
                    every()
                    nextTick = now + period
                for key, mask in self.selector.select(min(period, max(0.0, deadline - now))):
                    key.data.ready(mask)
                if pace:
                    time.sleep(max(0.0, now + pace - time.monotonic()))
        finally:
            if collecting:
                gc.enable()
        return time.monotonic() - start


#: The MSS of a TCP connection over Ethernet (1500-byte MTU).
ETHERNET_MSS = 1460


def _socket(rcvbuf: int | None = None, mss: int | None = None) -> socket.socket:
    """
    A non-blocking TCP socket, not yet connected.

    @param rcvbuf: its receive buffer (C{SO_RCVBUF}), set before connecting
        so that the window it first advertises is that small.
    @param mss: the segment size it announces (C{TCP_MAXSEG}). Linux sizes
        a connection's send buffer from its congestion window in segments;
        over loopback a segment is 64 KiB, so the server's kernel takes
        about 3 MB for a client that never reads (measured: 2 992 432
        bytes, SO_SNDBUF grown to 4 MiB). Announcing Ethernet's 1460
        makes the connection behave as it would over a real network
        (84 388 bytes, SO_SNDBUF 117 504), which is what a load test of
        non-reading browsers should see.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.setblocking(False)
    return sock


def request(path: str, port: int, lastEventID: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    if lastEventID is not None:
        lines.append(f"Last-Event-ID: {lastEventID}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class StreamClient:
    """
    An EventSource on a raw non-blocking socket: GETs C{path} and reads the
    stream with a L{FrameReader} as it arrives. It closes its socket after
    the terminal event (as a page closes its EventSource), at the end of
    the response, when the server closes or resets the connection, or when
    told.

    Per event it keeps C{(id, name, i, latency ms)}: for ticker progress
    events C{i} and the latency (arrival, C{time.time_ns()} just after the
    C{recv}, minus the ticker's C{t_ns}), else C{None}. The body of any
    other response (a 503) is kept whole.

    @ivar reading: whether it reads; one made with C{read=False} sends its
        request and then reads nothing until L{startReading}.
    @ivar lastEventID: the C{Last-Event-ID} it sent, if any.
    @ivar reset: the server reset the connection.
    @ivar ended: the server ended the response (last chunk, or EOF).
    """

    def __init__(
        self,
        loop: Loop,
        port: int,
        path: str,
        read: bool = True,
        rcvbuf: int | None = None,
        mss: int | None = None,
        lastEventID: str | None = None,
    ) -> None:
        self.loop = loop
        self.sock = _socket(rcvbuf, mss)
        self.reading = read
        self.lastEventID = lastEventID
        self.out = request(path, port, lastEventID)
        self.head = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.events: list[tuple[str | None, str | None, int | None, float | None]] = []
        self.terminal: bytes | None = None
        self.received = 0
        self.closed = self.reset = self.ended = False
        self.frames = FrameReader()
        self._unframe: Callable[[bytes], bytes] | None = None
        self._dechunker: Dechunker | None = None
        loop.open.add(self)
        error = self.sock.connect_ex(("127.0.0.1", port))
        if error not in (0, errno.EINPROGRESS):
            raise AssertionError(f"connect: {os.strerror(error)}")
        loop.watch(self, selectors.EVENT_WRITE)

    @property
    def sent(self) -> bool:
        return not self.out

    def startReading(self, rcvbuf: int | None = None) -> None:
        """
        Start reading (a client made with C{read=False}), with a receive
        buffer of C{rcvbuf} bytes from now on, if given.
        """
        self.reading = True
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if not self.closed and not self.out:
            self.loop.watch(self, selectors.EVENT_READ)

    def ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._send()
        if mask & selectors.EVENT_READ:
            self._read()

    def _send(self) -> None:
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise AssertionError(f"connect: {os.strerror(error)}")
        self.out = self.out[self.sock.send(self.out) :]
        if not self.out:
            if self.reading:
                self.loop.watch(self, selectors.EVENT_READ)
            else:
                self.loop.unwatch(self)

    def _read(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.reset = True
            self.close()
            return
        now = time.time_ns()
        if not data:
            self.ended = True
            self.close()
            return
        self.received += len(data)
        if self._unframe is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.status, self.headers = parseHead(head)
            if "chunked" in self.headers.get("transfer-encoding", ""):
                self._dechunker = Dechunker()
                self._unframe = self._dechunker.feed
            else:
                self._unframe = bytes
        data = self._unframe(data)
        if self.status != 200:
            self.body += data
            if len(self.body) >= int(self.headers.get("content-length", "0")):
                self.ended = True
                self.close()
            return
        for eventID, name, payload in self.frames.feed(data):
            i = latency = None
            if name == "progress":
                i, printed = tickOf(payload)
                latency = (now - printed) / 1e6
            self.events.append((eventID, name, i, latency))
            if name in TERMINAL_EVENTS:
                self.terminal = payload
        if self._dechunker is not None and self._dechunker.ended:
            self.ended = True
        if self.terminal is not None or self.ended:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.unwatch(self)
            self.loop.open.discard(self)
            self.sock.close()

    def latencies(self) -> list[float]:
        return [latency for _, _, _, latency in self.events if latency is not None]

    def worst(self) -> tuple[float, int]:
        """
        The longest latency, and the event C{i} it was for.
        """
        return max((latency, i) for _, _, i, latency in self.events if latency is not None)  # type: ignore[misc]

    def progress(self) -> list[int]:
        return [i for _, name, i, _ in self.events if name == "progress"]  # type: ignore[misc]

    def names(self) -> list[str | None]:
        return [name for _, name, _, _ in self.events]


def abortive(sock: socket.socket) -> None:
    """
    Make C{close()} send a RST instead of a FIN.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Cycle:
    """
    One connect/disconnect cycle against an event stream, ended the way
    its C{kind} says:

      - C{"eof-after-request"}: send the request, close at once (FIN);
      - C{"reset-after-request"}: send the request, reset at once (RST);
      - C{"after-first-event"}: read the head and the first event, close;
      - C{"reset-after-head"}: read the 200 head, reset;
      - C{"mid-request-line"}: send the request line without its version
        and line end (C{GET /renders/ID/events}), close.

    C{ok} says whether it went as planned: connected, and for the kinds
    that read, a C{200} (with an event for C{"after-first-event"}).
    """

    KINDS = ("eof-after-request", "reset-after-request", "after-first-event", "reset-after-head", "mid-request-line")

    def __init__(self, loop: Loop, port: int, path: str, kind: str, onDone: Callable[[Cycle], None]) -> None:
        assert kind in self.KINDS, kind
        self.loop = loop
        self.kind = kind
        self.onDone = onDone
        self.started = time.monotonic()
        self.ok = False
        self.problem = ""
        self.closed = False
        self.sock = _socket()
        self.request = request(path, port)
        self.received = b""
        self._body = b""
        self._dechunker = Dechunker()
        self._frames = FrameReader()
        loop.open.add(self)
        error = self.sock.connect_ex(("127.0.0.1", port))
        if error not in (0, errno.EINPROGRESS):
            self.finish(f"connect: {os.strerror(error)}")
        else:
            loop.watch(self, selectors.EVENT_WRITE)

    def ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.finish(f"connect: {os.strerror(error)}")
                return
            if self.kind == "mid-request-line":
                self.sock.send(self.request[: self.request.index(b" HTTP/")])
                self.finish()
                return
            self.sock.send(self.request)  # 80 bytes into an empty buffer
            if self.kind == "eof-after-request":
                self.finish()
            elif self.kind == "reset-after-request":
                abortive(self.sock)
                self.finish()
            else:
                self.loop.watch(self, selectors.EVENT_READ)
        elif mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            self.finish("the server reset the connection")
            return
        if not data:
            self.finish(f"the server closed the connection after {self.received[:200]!r}")
            return
        self.received += data
        if b"\r\n\r\n" not in self.received:
            return
        head, body = self.received.split(b"\r\n\r\n", 1)
        status, _ = parseHead(head)
        if status != 200:
            self.finish(f"status {status}: {body[:200]!r}")
        elif self.kind == "reset-after-head":
            abortive(self.sock)
            self.finish()
        elif self._frames.feed(self._dechunker.feed(body[len(self._body) :])):
            self.finish()
        else:
            self._body = body

    def finish(self, problem: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.ok = not problem
        self.problem = problem
        self.loop.unwatch(self)
        self.loop.open.discard(self)
        self.sock.close()
        self.onDone(self)

    def close(self) -> None:
        self.finish("abandoned")


class Churn:
    """
    Runs C{total} L{Cycle}s against C{path}, C{concurrency} at a time,
    their kinds in turn.
    """

    def __init__(self, loop: Loop, port: int, path: str, total: int, concurrency: int) -> None:
        self.loop, self.port, self.path = loop, port, path
        self.total, self.concurrency = total, concurrency
        self.started = 0
        self.inFlight: set[Cycle] = set()
        self.done: dict[str, int] = {kind: 0 for kind in Cycle.KINDS}
        self.failed: list[tuple[str, str]] = []

    def _next(self) -> None:
        while len(self.inFlight) < self.concurrency and self.started < self.total:
            kind = Cycle.KINDS[self.started % len(Cycle.KINDS)]
            self.started += 1
            cycle = Cycle(self.loop, self.port, self.path, kind, self._ended)
            if not cycle.closed:
                self.inFlight.add(cycle)

    def _ended(self, cycle: Cycle) -> None:
        self.inFlight.discard(cycle)
        if cycle.ok:
            self.done[cycle.kind] += 1
        else:
            self.failed.append((cycle.kind, cycle.problem))

    def finished(self) -> bool:
        self._next()
        return self.started >= self.total and not self.inFlight

    def checkStuck(self, limit: float) -> None:
        """
        @raise AssertionError: a cycle has been in flight for over C{limit}
            seconds (the server stopped answering).
        """
        now = time.monotonic()
        for cycle in self.inFlight:
            if now - cycle.started > limit:
                raise AssertionError(f"a {cycle.kind} cycle got no answer in {limit} s: {cycle.received[:200]!r}")

    def run(self, timeout: float, every: Callable[[], None] | None = None) -> float:
        def tick() -> None:
            self.checkStuck(10.0)
            if every is not None:
                every()

        return self.loop.run(self.finished, timeout, f"{self.total} connect/disconnect cycles", tick, period=0.1)


class LoadTestCase(SynchronousTestCase):
    """
    The load tests drive blocking sockets and a server process, so they
    are synchronous; each part they start is stopped at cleanup.
    """

    def serve(self, *options: str) -> LoadServer:
        server = LoadServer(*options)
        self.addCleanup(server.stop)
        return server

    def newLoop(self) -> Loop:
        loop = Loop()
        self.addCleanup(loop.close)
        return loop

    def startFile(self) -> str:
        """
        A path for the ticker's C{start_file}: it prints nothing until the
        test creates it.
        """
        return os.path.abspath(self.mktemp())

    def heldRender(self, options: Iterable[str], **params: Any) -> HeldRender:
        """
        A server started with C{options}, its client loop, and one ticks
        render (C{params}) that prints nothing until L{HeldRender.go}; the
        server's descriptors and memory are read before any client comes.
        """
        server = self.serve(*options)
        loop = self.newLoop()
        fdsBefore = server.fds()
        startFile = self.startFile()
        job = server.render(start_file=startFile, **params)
        return HeldRender(server, loop, job, MemoryWatch(server.pid), fdsBefore, startFile)

    def assertDescriptorsReleased(self, held: HeldRender, what: str) -> int:
        """
        Once every stream has closed, the server holds as many descriptors
        as before the clients came (3 either way), and logged no error.

        @return: the settled count.
        """
        fds = held.server.settledFds(held.fdsBefore, 3)
        report(f"{what}: server fds {fds} after (before: {held.fdsBefore})")
        self.assertLessEqual(abs(fds - held.fdsBefore), 3)
        held.server.assertLoggedNoErrors()
        return fds


@attrs.frozen
class HeldRender:
    """
    What L{LoadTestCase.heldRender} started: the server, the loop, the
    render's job (the POST's answer), the server's memory watch, its
    descriptors before any client, and the file whose creation starts the
    render.
    """

    server: LoadServer
    loop: Loop
    job: dict[str, Any]
    memory: MemoryWatch
    fdsBefore: int
    startFile: str

    def go(self) -> None:
        """
        Let the render print.
        """
        Path(self.startFile).touch()


def attempts(port: int, path: str, count: int, waves: int = 1, spacing: float = 0.0) -> list[dict[str, Any]]:
    """
    Open C{path} C{count} times, in C{waves} equal waves C{spacing}
    seconds apart, and read each answer's head (and its body, if it is not
    a stream).

    @return: each answer's C{status}, C{headers} and C{body}.
    """
    loop = Loop()
    try:
        clients: list[StreamClient] = []
        for wave in range(waves):
            clients += [StreamClient(loop, port, path) for _ in range(count // waves)]
            loop.run(lambda: all(c.closed or c.status == 200 for c in clients), 30, f"{len(clients)} answers")
            time.sleep(spacing)
        return [
            {"status": c.status, "headers": c.headers, "body": c.body.decode("utf-8", "replace")} for c in clients
        ]
    finally:
        loop.close()


class Attempts:
    """
    L{attempts} from a process of its own (C{python -m tests.load._load}),
    so that a crowd of clients costs the test's measuring process nothing.
    It starts at once, and makes the attempts when L{start} is called.
    """

    def __init__(self, port: int, path: str, count: int, waves: int = 1, spacing: float = 0.0) -> None:
        argv = [sys.executable, "-m", "tests.load._load", str(port), path, str(count), str(waves), str(spacing)]
        self.launched = Launched(argv, childEnv(), stdin=subprocess.PIPE)
        self.process = self.launched.process
        self.launched.waitFor(lambda out: out.startswith(b"READY\n"), 30, "the attempts process to start")

    def start(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def running(self) -> bool:
        return self.process.poll() is None

    def answers(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        self.launched.readUntil(lambda out: False, timeout)
        if not self.launched.reader.closed:
            raise TimedOut(f"the attempts process did not answer within {timeout} s")
        if self.process.wait(timeout) != 0:
            raise AssertionError(f"the attempts process failed ({self.process.returncode})")
        return json.loads(self.launched.output.removeprefix(b"READY\n"))

    def stop(self) -> None:
        self.launched.stop(signal.SIGKILL)


def main(argv: list[str]) -> None:
    """
    C{python -m tests.load._load PORT PATH COUNT WAVES SPACING}: prints
    C{READY}, makes the L{attempts} when it reads a line, and prints their
    answers as one JSON list.
    """
    port, path, count, waves, spacing = int(argv[0]), argv[1], int(argv[2]), int(argv[3]), float(argv[4])
    print("READY", flush=True)
    sys.stdin.readline()
    print(json.dumps(attempts(port, path, count, waves, spacing)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

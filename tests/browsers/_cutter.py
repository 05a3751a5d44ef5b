"""
A TCP relay to put between a browser and the server, that can cut every
connection through it at once, as if the server's socket had been closed
in the middle of a stream.

    with Cutter(server.port) as cutter:
        browser.open(f"http://127.0.0.1:{cutter.port}/")   # page and API on the cutter's origin
        ...
        cutter.cut()

It forwards each chunk the moment it is read, with C{TCP_NODELAY} on both
sides, so it adds no buffering of its own (it is not a proxy that parses
HTTP). It also records what passed, per connection, with timestamps, so a
test can see a browser's reconnect (when it came, and its
C{Last-Event-ID}) and the bytes a page never sees (keepalive comments).

One thread runs a selector loop that owns every socket; L{Cutter.cut} and
L{Cutter.close} hand their work to that thread and wait for it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import selectors
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Callable

from tests._support.messages import Request

# SO_LINGER on with a zero timeout: close() sends RST and drops unsent data.
_RESET = struct.pack("ii", 1, 0)


_REQUEST_HEAD = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.DOTALL)


class Connection:
    """
    What passed through one connection.

    @ivar acceptedAt: when the client connected (C{time.time()}).
    @ivar request: every byte the client sent, in order.
    @ivar response: every byte the server sent, in order.
    @ivar cut: whether L{Cutter.cut} ended it.
    """

    def __init__(self) -> None:
        self.acceptedAt = time.time()
        self.request = bytearray()
        self.response = bytearray()
        self.cut = False
        self._chunkTimes: list[tuple[int, float]] = []  # (offset in request, arrival time)

    def received(self, data: bytes) -> None:
        self._chunkTimes.append((len(self.request), time.time()))
        self.request += data

    def requests(self) -> list[Request]:
        """
        The request heads sent on this connection (a kept-alive connection
        carries several), in order, with when each arrived.
        """
        found = []
        for match in _REQUEST_HEAD.finditer(bytes(self.request)):
            at = max(t for offset, t in self._chunkTimes if offset <= match.start())
            headers = {}
            for line in match.group(3).decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            found.append(Request(match.group(1).decode(), match.group(2).decode("latin-1"), headers, at))
        return found


class _Side:
    def __init__(self, sock: socket.socket, record: Callable[[bytes], object]) -> None:
        self.sock = sock
        self.record = record  # logs the bytes read from this socket
        self.peer: _Side
        self.pending = bytearray()  # bytes waiting to be written to this socket
        self.readEOF = False
        self.writeShut = False


class Cutter:
    """
    A relay listening on 127.0.0.1 (an ephemeral port) to C{targetPort}.

    @ivar port: the port to point the browser at.
    @ivar connections: every connection accepted so far, in order.
    """

    def __init__(self, targetPort: int, targetHost: str = "127.0.0.1") -> None:
        self._target = (targetHost, targetPort)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[Connection] = []
        self._pairs: dict[Connection, tuple[_Side, _Side]] = {}
        self._selector = selectors.DefaultSelector()
        self._wakeRead, self._wakeWrite = os.pipe()
        os.set_blocking(self._wakeRead, False)
        self._calls: queue.Queue[tuple[Callable[[], object], queue.Queue[object]]] = queue.Queue()
        self._running = True
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wakeRead, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=f"cutter-{self.port}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------- public

    def cut(self) -> int:
        """
        Close every open connection at once, both sides, with a reset: the
        browser and the server each see their connection die mid-stream.
        New connections are still accepted afterwards.

        @return: how many connections were cut.
        """
        return int(self._call(self._cutAll))  # type: ignore[call-overload]

    def close(self) -> None:
        """
        Stop listening and close everything; idempotent.
        """
        if self._running:
            self._call(self._shutdown)
            self._thread.join(10)
            os.close(self._wakeRead)
            os.close(self._wakeWrite)
            self._selector.close()

    def __enter__(self) -> Cutter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---------------------------------------------------- the loop thread

    def _call(self, function: Callable[[], object]) -> object:
        answer: queue.Queue[object] = queue.Queue()
        self._calls.put((function, answer))
        os.write(self._wakeWrite, b"x")
        result = answer.get(timeout=10)
        if isinstance(result, BaseException):
            raise result
        return result

    def _loop(self) -> None:
        while self._running:
            for key, mask in self._selector.select():
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._runCalls()
                else:
                    side: _Side = key.data
                    if mask & selectors.EVENT_READ and side.sock.fileno() != -1:
                        self._read(side)
                    if mask & selectors.EVENT_WRITE and side.sock.fileno() != -1:
                        self._flush(side)
                if not self._running:
                    break

    def _runCalls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wakeRead, 4096)
        while True:
            try:
                function, answer = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put(function())
            except BaseException as e:  # handed to the caller's thread
                answer.put(e)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            connection = Connection()
            self.connections.append(connection)
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                client.close()
                continue
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            clientSide = _Side(client, connection.received)
            serverSide = _Side(server, connection.response.extend)
            clientSide.peer, serverSide.peer = serverSide, clientSide
            self._pairs[connection] = (clientSide, serverSide)
            self._selector.register(client, selectors.EVENT_READ, clientSide)
            self._selector.register(server, selectors.EVENT_READ, serverSide)

    def _connectionOf(self, side: _Side) -> Connection | None:
        for connection, pair in self._pairs.items():
            if side in pair:
                return connection
        return None

    def _read(self, side: _Side) -> None:
        try:
            data = side.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._abort(side)
            return
        if not data:
            side.readEOF = True
            self._update(side)
            self._flush(side.peer)
            return
        side.record(data)
        side.peer.pending += data
        self._flush(side.peer)

    def _flush(self, side: _Side) -> None:
        """
        Write what is pending to C{side}; pass an end of stream on once all
        is written; close the pair when both directions have ended.
        """
        while side.pending:
            try:
                sent = side.sock.send(side.pending)
            except BlockingIOError:
                break
            except OSError:
                self._abort(side)
                return
            del side.pending[:sent]
        if not side.pending and side.peer.readEOF and not side.writeShut:
            side.writeShut = True
            with contextlib.suppress(OSError):
                side.sock.shutdown(socket.SHUT_WR)
        if side.writeShut and side.peer.writeShut:
            connection = self._connectionOf(side)
            if connection is not None:
                self._close(connection, reset=False)
            return
        self._update(side)

    def _update(self, side: _Side) -> None:
        events = 0 if side.readEOF else selectors.EVENT_READ
        if side.pending:
            events |= selectors.EVENT_WRITE
        registered = side.sock in self._selector.get_map() if side.sock.fileno() != -1 else False
        if events and registered:
            self._selector.modify(side.sock, events, side)
        elif events and side.sock.fileno() != -1:
            self._selector.register(side.sock, events, side)
        elif registered:
            self._selector.unregister(side.sock)

    def _abort(self, side: _Side) -> None:
        connection = self._connectionOf(side)
        if connection is not None:
            self._close(connection, reset=True)

    def _close(self, connection: Connection, reset: bool) -> None:
        for side in self._pairs.pop(connection, ()):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(side.sock)
            if reset:
                with contextlib.suppress(OSError):
                    side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            side.sock.close()

    def _cutAll(self) -> int:
        connections = list(self._pairs)
        for connection in connections:
            connection.cut = True
            self._close(connection, reset=True)
        return len(connections)

    def _shutdown(self) -> None:
        self._cutAll()
        self._selector.unregister(self._listener)
        self._listener.close()
        self._running = False

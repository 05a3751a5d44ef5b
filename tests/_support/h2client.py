"""
A blocking HTTP/2 client over TLS (h2), that timestamps each DATA frame as
it arrives: for the HTTP/2 tests (browsers) and the connection limits
(integration).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any, Callable

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events

from twistedsse._decoder import EventStreamDecoder

from .tls import Identity


@attrs.define
class _Frame:
    """
    One DATA frame as it arrived: the wall-clock time (ns) of the C{recv}
    that brought it, and its payload.
    """

    at: int
    data: bytes


@attrs.define
class Response:
    """
    What one h2 stream has received so far.
    """

    headers: dict[str, str] = attrs.Factory(dict)
    frames: list[_Frame] = attrs.Factory(list)
    ended: bool = False
    reset: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(frame.data for frame in self.frames)

    def events(self) -> list[tuple[int, Any]]:
        """
        The decoded events, each with the arrival time of the DATA frame
        that completed it.
        """
        decoder = EventStreamDecoder()
        found = []
        for frame in self.frames:
            found += [(frame.at, event) for event in decoder.feed(frame.data)]
        return found

    def progress(self) -> list[tuple[int, dict[str, Any]]]:
        return [(at, json.loads(e.data)) for at, e in self.events() if e.event == "progress"]


class H2Client:
    """
    One TLS connection that must negotiate h2, and the streams opened on
    it. Nothing runs in the background: L{H2Client.pump} reads until a
    condition holds, acknowledging data so flow control never stalls the
    server, and stamps every DATA frame with its arrival time.
    """

    def __init__(self, port: int, identity: Identity, serverName: str = "localhost", timeout: float = 10) -> None:
        context = ssl.create_default_context(cafile=str(identity.certificate))
        context.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = context.wrap_socket(raw, server_hostname=serverName)
        self.protocol = self.socket.selected_alpn_protocol()
        self.authority = f"{serverName}:{port}"
        self.connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.responses: dict[int, Response] = {}
        if self.protocol == "h2":
            self.connection.initiate_connection()
            self._flush()

    def _flush(self) -> None:
        data = self.connection.data_to_send()
        if data:
            self.socket.sendall(data)

    def get(self, path: str) -> int:
        """
        Open a stream with a GET of C{path}; return its id.
        """
        stream = self.connection.get_next_available_stream_id()
        self.connection.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "https"), (":authority", self.authority), (":path", path),
             ("accept", "text/event-stream")],
            end_stream=True,
        )
        self.responses[stream] = Response()
        self._flush()
        return stream

    def cancel(self, stream: int) -> None:
        """
        RST_STREAM(CANCEL) one stream and keep the connection: what a
        browser does for C{EventSource.close()} on a shared connection.
        """
        self.connection.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        self.responses[stream].reset = True
        self._flush()

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        """
        Read and handle frames until C{until()} is true; fail after
        C{timeout} seconds, naming C{what} was awaited.
        """
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.socket.settimeout(remaining)
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            at = time.time_ns()
            if not data:
                raise AssertionError(f"the server closed the connection while waiting for {what}")
            for event in self.connection.receive_data(data):
                self._handle(event, at)
            self._flush()

    def _handle(self, event: h2.events.Event, at: int) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.responses[event.stream_id].headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            response = self.responses.get(event.stream_id)
            if response is not None and not response.reset and event.data:
                response.frames.append(_Frame(at, event.data))
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id].reset = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise AssertionError(f"the server ended the h2 connection: {event}")

    def json(self, path: str, timeout: float = 10) -> tuple[str, Any]:
        """
        GET C{path} on this same connection; its C{:status} and JSON body.
        """
        stream = self.get(path)
        response = self.responses[stream]
        self.pump(lambda: response.ended, timeout, f"GET {path}")
        return response.headers[":status"], json.loads(response.body)

    def close(self) -> None:
        if self.socket.fileno() < 0:
            return
        try:
            if self.protocol == "h2":
                self.connection.close_connection()
                self._flush()
        except OSError:
            pass
        self.socket.close()



"""
A socket client in its own process, as a browser's EventSource would be:
GET an event stream over a plain TCP socket, decode it with
L{EventStreamDecoder} and print one JSON line per event with the moment it
arrived (C{time.time_ns()}), then exit after the terminal event or when
the server ends the response.

The first line is the response head: C{{"status", "headers", "t_ns"}},
C{headers} a dict of lower-cased names. The body is read chunked when the
response says C{Transfer-Encoding: chunked} (HTTP/1.1), and otherwise as
it comes until the connection closes (an HTTP/1.0 response, or
C{Connection: close}).

usage: sseclient.py [--http1.0] URL [LAST_EVENT_ID]

C{--http1.0} sends an HTTP/1.0 request, as nginx does to its upstreams by
default.
"""

import json
import socket
import sys
import time
from urllib.parse import urlsplit

from tests._support.chunked import Dechunker
from tests._support.jsonhttp import parseHead
from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import TERMINAL_EVENTS


def main() -> None:
    args = sys.argv[1:]
    version = "HTTP/1.1"
    if "--http1.0" in args:
        args.remove("--http1.0")
        version = "HTTP/1.0"
    url = urlsplit(args[0])
    last = args[1] if len(args) > 1 else None
    path = url.path + (f"?{url.query}" if url.query else "")
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    headers = [f"GET {path} {version}", f"Host: {url.netloc}", "Accept: text/event-stream"]
    if last:
        headers.append(f"Last-Event-ID: {last}")
    sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
    decoder = EventStreamDecoder()
    buffer = b""
    unframe = None
    while True:
        data = sock.recv(65536)
        now = time.time_ns()
        if not data:
            break
        if unframe is None:
            buffer += data
            if b"\r\n\r\n" not in buffer:
                continue
            head, data = buffer.split(b"\r\n\r\n", 1)
            status, responseHeaders = parseHead(head)
            print(json.dumps({"status": status, "headers": responseHeaders, "t_ns": now}), flush=True)
            if status != 200:
                break
            if "chunked" in responseHeaders.get("transfer-encoding", "").lower():
                unframe = Dechunker().feed
            else:
                unframe = bytes
        ended = False
        for event in decoder.feed(unframe(data)):
            print(json.dumps({"event": event.event, "id": event.id, "data": event.data, "t_ns": now}), flush=True)
            ended = ended or event.event in TERMINAL_EVENTS
        if ended:
            break
    sock.close()


if __name__ == "__main__":
    main()

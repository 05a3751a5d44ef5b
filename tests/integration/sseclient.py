"""
A socket client in its own process, as a browser's EventSource would be:
GET an event stream over a plain TCP socket, decode it with
L{EventStreamDecoder} and print one JSON line per event with the moment it
arrived (C{time.time_ns()}), then exit after the terminal event or when
the server ends the response.

usage: sseclient.py URL [LAST_EVENT_ID]
"""

import json
import socket
import sys
import time
from urllib.parse import urlsplit

from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import TERMINAL_EVENTS


def main() -> None:
    url = urlsplit(sys.argv[1])
    last = sys.argv[2] if len(sys.argv) > 2 else None
    path = url.path + (f"?{url.query}" if url.query else "")
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    headers = [f"GET {path} HTTP/1.1", f"Host: {url.netloc}", "Accept: text/event-stream"]
    if last:
        headers.append(f"Last-Event-ID: {last}")
    sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
    decoder = EventStreamDecoder()
    buffer = b""
    head = None
    # HTTP/1.1 chunked body: undo the framing as bytes arrive.
    while True:
        data = sock.recv(65536)
        now = time.time_ns()
        if not data:
            break
        buffer += data
        if head is None:
            if b"\r\n\r\n" not in buffer:
                continue
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            status = int(head.split(b" ")[1])
            print(json.dumps({"status": status, "t_ns": now}), flush=True)
            if status != 200:
                break
        body = b""
        while True:
            size, sep, rest = buffer.partition(b"\r\n")
            if not sep:
                break
            n = int(size, 16)
            if len(rest) < n + 2:
                break
            body += rest[:n]
            buffer = rest[n + 2 :]
            if n == 0:
                buffer = b""
                break
        ended = False
        for event in decoder.feed(body):
            print(json.dumps({"event": event.event, "id": event.id, "data": event.data, "t_ns": now}), flush=True)
            ended = ended or event.event in TERMINAL_EVENTS
        if ended:
            break
    sock.close()


if __name__ == "__main__":
    main()

"""
Hostile clients against the real service: C{twistd -n twistedsse} in its
own process, under a small open-file limit, attacked from 127.0.0.1 by
raw sockets (trickled heads, endless and crawling bodies, idle connections
past the cap) while C{/healthz}, an event stream and a new ffmpeg render
must keep working; the open-file limit raised at start, and a
C{--max-streams} it cannot hold refused; downloads that stop reading
dropped after C{--write-timeout}. Plus: over HTTP/2, a body over
64 KiB answered C{413} on its stream while the connection's other streams
go on.

Each attacker kind is an L{Attacker}: one more kind is a subclass added
to the list in L{AttackTests.attackers}.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests._support.launcher import TWISTD_EXITS_ON_USAGE_ERROR
from tests._support.waiting import poll, waitUntil

ROOT = Path(__file__).resolve().parents[2]

#: Linux TCP states (include/net/tcp_states.h), the first byte of TCP_INFO.
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8
TWISTD = str(Path(sys.executable).with_name("twistd"))


class Service:
    """
    C{twistd -n twistedsse OPTIONS} with its open-file limit set to
    C{nofile} (soft, hard) before it starts; its log in a file (an access
    log line per request must not fill a pipe nobody reads).
    """

    def __init__(self, *options: str, nofile: tuple[int, int] | None = None, timeout: float = 30.0) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="twistedsse-conn-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        listen = [] if "--listen" in options else ["--listen", "tcp:0:interface=127.0.0.1:backlog=1024"]
        argv = [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "twistedsse", *listen, "--kill-grace", "1", *options]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            preexec_fn=limit,
        )  # fmt: skip
        self.port = 0
        process = self.process
        found = poll(lambda: re.search(r" starting on (\d+)", self.logText()) or process.poll() is not None, timeout, 0.05)
        if not found:
            self.stop()
            raise AssertionError(f"twistd did not start: {self.logText()}")
        if found is not True:
            self.port = int(found.group(1))  # else it ended: the caller looks at why

    def logText(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def json(self, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def openFiles(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def softFileLimit(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise AssertionError("no Max open files line")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)
        return self.process.returncode


# -- attackers -------------------------------------------------------------------


@attrs.define
class Victim:
    """
    One attacking socket: when it opened, when the server closed it, and
    what the server said before.
    """

    sock: socket.socket
    opened: float
    closed: float | None = None
    received: bytes = b""

    def poll(self, reads: bool = True) -> None:
        """
        Read what the server sent, without blocking; note the close. If
        not C{reads} (a client that has stopped reading, whose unread bytes
        would hide a close from C{recv}), ask the kernel for the
        connection's TCP state instead: closed (a reset) or close-wait
        (the server's FIN).
        """
        if self.closed is not None:
            return
        if not reads:
            state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state in (TCP_CLOSE, TCP_CLOSE_WAIT):
                self.closed = time.monotonic()
            return
        try:
            while True:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    self.closed = time.monotonic()
                    return
                self.received += data
        except BlockingIOError:
            return
        except OSError:  # reset
            self.closed = time.monotonic()

    def send(self, data: bytes) -> None:
        if self.closed is not None:
            return
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass  # the server is not reading: fine, it is what they do
        except OSError:
            self.closed = time.monotonic()

    @property
    def status(self) -> int | None:
        found = re.match(rb"HTTP/1\.1 (\d+)", self.received)
        return int(found.group(1)) if found else None


class Attacker:
    """
    A kind of hostile client: opens C{count} connections, acts on each
    L{tick}, and expects each to be closed (answered C{status}, if not
    C{None}) within C{bound} seconds of being opened.
    """

    name = "attacker"
    status: int | None = None
    #: Whether it reads what the server sends (a stalled reader does not).
    reads = True

    def __init__(self, count: int, bound: float) -> None:
        self.count = count
        self.bound = bound
        self.victims: list[Victim] = []

    def connect(self, service: Service) -> None:
        """
        Open its connections to C{service} (whose API it may use first,
        e.g. to start a render whose output it then downloads).
        """
        for _ in range(self.count):
            try:
                sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            except ConnectionError:
                # Closed by the server so soon that connect() saw it.
                now = time.monotonic()
                self.victims.append(Victim(socket.socket(), now, now))
                continue
            sock.setblocking(False)
            victim = Victim(sock, time.monotonic())
            self.victims.append(victim)
            self.opened(victim)

    def opened(self, victim: Victim) -> None:
        """
        What it sends first.
        """

    def tick(self, victim: Victim, now: float) -> None:
        """
        What it sends at each turn of the loop (every 50 ms).
        """

    def done(self) -> bool:
        return all(v.closed is not None for v in self.victims)

    def check(self, test: SynchronousTestCase) -> str:
        """
        Each connection was closed within the bound, with the expected
        answer; a summary for the log.
        """
        held = [v.closed - v.opened for v in self.victims if v.closed is not None]
        test.assertEqual(len(held), len(self.victims), f"{self.name}: {len(self.victims) - len(held)} still open")
        test.assertLessEqual(max(held), self.bound, f"{self.name}: held {max(held):.2f} s > {self.bound} s")
        if self.status is not None:
            test.assertEqual(
                {v.status for v in self.victims}, {self.status}, f"{self.name}: {[v.received[:300] for v in self.victims]}"
            )
        return f"{self.name}: {len(held)} closed after {min(held):.2f}-{max(held):.2f} s"

    def close(self) -> None:
        for victim in self.victims:
            victim.sock.close()


class TrickledHead(Attacker):
    """
    Slowloris: a request head, one byte every C{every} seconds (each byte
    would reset Twisted's idle timer).
    """

    name = "trickled heads"
    status = 408
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 10000

    def __init__(self, count: int, bound: float, every: float = 0.2) -> None:
        super().__init__(count, bound)
        self.every = every
        self.sent: dict[int, tuple[int, float]] = {}

    def tick(self, victim: Victim, now: float) -> None:
        index, last = self.sent.get(id(victim), (0, 0.0))
        if now - last >= self.every:
            victim.send(self.head[index : index + 1])
            self.sent[id(victim)] = (index + 1, now)


class EndlessChunkedBody(Attacker):
    """
    A POST whose chunked body never ends, sent as fast as the server reads.
    """

    name = "endless chunked bodies"
    status = 413

    def opened(self, victim: Victim) -> None:
        victim.send(b"POST /renders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip

    def tick(self, victim: Victim, now: float) -> None:
        for _ in range(8):
            victim.send(b"1000\r\n" + b" " * 0x1000 + b"\r\n")


class CrawlingBody(Attacker):
    """
    A POST whose body (announced 60 000 bytes) comes at 100 bytes/s.
    """

    name = "crawling bodies"
    status = 408

    def opened(self, victim: Victim) -> None:
        victim.send(b"POST /renders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 60000\r\n\r\n")  # fmt: skip

    def tick(self, victim: Victim, now: float) -> None:
        victim.send(b" " * 5)


class IdleConnection(Attacker):
    """
    Connections that send nothing at all.
    """

    name = "idle connections"


#: A renderer whose output is 4 MiB: far more than a stalled client's
#: buffers and the server's hold (Twisted pauses a producer past 64 KiB).
BIG_OUTPUT = (
    f"big={sys.executable} -c "
    "\"import os; open(os.environ['TWISTEDSSE_OUTPUT'], 'wb').write(bytes(4 * 1024 * 1024))\""
)


class StalledDownload(Attacker):
    """
    Downloads of a finished render's 4 MiB output that read nothing (a
    4 KiB receive buffer): dropped once the server has had nothing taken
    for C{--write-timeout} seconds; only a reset shows it.
    """

    name = "stalled downloads"
    reads = False

    def connect(self, service: Service) -> None:
        code, job = service.json("/renders", {"renderer": "big"})
        assert code == 202, job
        waitUntil(lambda: service.json(job["status_url"])[1]["state"] == "succeeded", 20, "the big render to succeed", 0.05)
        self.path = job["output_url"]
        super().connect(service)

    def opened(self, victim: Victim) -> None:
        victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        victim.send(f"GET {self.path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


def pump(attackers: list[Attacker], until: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        now = time.monotonic()
        for attacker in attackers:
            for victim in attacker.victims:
                victim.poll(attacker.reads)
                attacker.tick(victim, now)
        # (A client that does not read always has data waiting: waiting on
        # its socket would spin this loop, and the ticks with it.)
        socks = [v.sock for a in attackers if a.reads for v in a.victims if v.closed is None]
        if socks:
            select.select(socks, [], [], 0.05)
        else:
            time.sleep(0.05)


class AttackTests(SynchronousTestCase):
    #: The request clock, short so that the test is.
    requestTimeout = 1.0
    maxConnections = 40
    #: How long a download may read nothing before it is dropped.
    writeTimeout = 2.0

    def attackers(self) -> list[Attacker]:
        """
        The hostile clients, each with the time within which each of its
        connections must be closed.
        """
        slack = 2.0
        return [
            TrickledHead(8, self.requestTimeout + slack),
            EndlessChunkedBody(4, slack),
            CrawlingBody(4, 2 * self.requestTimeout + slack),
            IdleConnection(8, self.requestTimeout + slack),
            StalledDownload(4, self.writeTimeout + 2 * slack),
        ]

    def startService(self) -> Service:
        service = Service(
            "--request-timeout", str(self.requestTimeout), "--max-connections", str(self.maxConnections),
            "--max-renders", "2", "--write-timeout", str(self.writeTimeout), "--renderer", BIG_OUTPUT,
            nofile=(160, 160),
        )  # fmt: skip
        self.addCleanup(service.stop)
        if not service.port:
            raise AssertionError(f"twistd ended: {service.logText()}")
        return service

    def test_attackersAreClosedWhileTheServiceWorks(self) -> None:
        """
        Under an open-file limit of 160: trickled heads (408), endless
        chunked bodies (413 at 64 KiB), crawling bodies (408), idle
        connections and downloads that stop reading (dropped after
        C{--write-timeout}) are each closed within their bounds, while
        C{/healthz} answers, an event stream opened before streams to its
        end and a card render (ffmpeg) started during the attack
        completes; afterwards the connections are back to the baseline and
        the server holds no more files than before.
        """
        service = self.startService()
        code, job = service.json("/renders", {"renderer": "card", "params": {"duration": 3, "size": "320x180", "fps": 10}})
        self.assertEqual(code, 202, job)
        events = Victim(socket.create_connection(("127.0.0.1", service.port), timeout=5), time.monotonic())
        events.sock.setblocking(False)
        self.addCleanup(events.sock.close)
        events.send(f"GET {job['events_url']} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        baseFiles = service.openFiles()

        attackers = self.attackers()
        for attacker in attackers:
            self.addCleanup(attacker.close)
            attacker.connect(service)
        started = time.monotonic()
        healthz: list[int] = []
        second: dict[str, Any] = {}

        def allDone() -> bool:
            return all(a.done() for a in attackers)

        while not allDone() and time.monotonic() - started < 20:
            pump(attackers, lambda: False, 0.3)
            healthz.append(service.json("/healthz")[0])
            if not second:
                second.update(service.json("/renders", {"renderer": "card", "params": {"duration": 1, "size": "160x90", "fps": 10}})[1])
        summaries = [attacker.check(self) for attacker in attackers]
        self.assertEqual(set(healthz), {200}, healthz)

        # The stream opened before the attack ends with the render's outcome.
        deadline = time.monotonic() + 20
        while b"event: complete" not in events.received and events.closed is None and time.monotonic() < deadline:
            select.select([events.sock], [], [], 0.2)
            events.poll()
        self.assertIn(b"event: complete", events.received)
        poll(lambda: service.json(f"/renders/{second['id']}")[1]["state"] == "succeeded", 20, 0.2)
        self.assertEqual(service.json(f"/renders/{second['id']}")[1]["state"], "succeeded")

        # (A refused connection lingers, reading and dropping, until its
        # client closes it or 2 s pass.)
        for attacker in attackers:
            attacker.close()
        poll(lambda: service.json("/healthz")[1]["connections"]["open"] <= 2, 5, 0.1)
        health = service.json("/healthz")[1]
        self.assertEqual(health["connections"]["max"], self.maxConnections)
        self.assertLessEqual(health["connections"]["open"], 2)  # the events socket and this request
        self.assertLessEqual(service.openFiles(), baseFiles + 2)
        print(f"\n{'; '.join(summaries)}; /healthz {len(healthz)} x 200", file=sys.stderr)

    def test_connectionsPastTheCapAreClosedAtOnce(self) -> None:
        """
        With C{--max-connections 40}, 60 idle connections at once: the 20
        past the cap are closed at once (within 0.5 s of their connect,
        long before the 3 s request timeout), the 40 admitted ones stay
        open until their request timeout; then the service answers again,
        and counts one connection (that request's).
        """
        self.requestTimeout = 3.0
        service = self.startService()
        attacker = IdleConnection(self.maxConnections + 20, self.requestTimeout + 2.0)
        self.addCleanup(attacker.close)
        attacker.connect(service)
        pump([attacker], attacker.done, 10)
        summary = attacker.check(self)
        held = sorted(v.closed - v.opened for v in attacker.victims if v.closed is not None)
        self.assertLess(held[19], 0.5, held)
        self.assertGreaterEqual(held[20], self.requestTimeout - 0.1, held)
        health = service.json("/healthz")[1]
        self.assertEqual(health["connections"], {"open": 1, "max": self.maxConnections})
        print(f"\n{summary}; 20 closed at once", file=sys.stderr)


class FileLimitTests(SynchronousTestCase):
    def test_softLimitRaisedToHard(self) -> None:
        """
        Started with an open-file soft limit of 128 and a hard one of 4096,
        the service raises its soft limit to 4096, and defaults its caps to
        what that holds.
        """
        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:
            raise SkipTest("the hard open-file limit here is under 4096")
        service = Service(nofile=(128, 4096))
        self.addCleanup(service.stop)
        self.assertTrue(service.port, service.logText())
        self.assertEqual(service.softFileLimit(), 4096)
        self.assertEqual(service.json("/healthz")[1]["connections"]["max"], 4096 - (64 + 1 + 4 * (os.cpu_count() or 1)))

    def test_tooManyStreamsRefused(self) -> None:
        """
        Under a hard open-file limit of 128, C{--max-streams 1000} is
        refused at start with a message that names it, the limit, and
        how to raise it.
        """
        service = Service("--max-streams", "1000", nofile=(128, 128))
        self.addCleanup(service.stop)
        self.assertEqual(service.port, 0)
        status = service.process.wait(10)
        if TWISTD_EXITS_ON_USAGE_ERROR:
            self.assertNotEqual(status, 0)
        log = service.logText()
        for part in ("--max-streams 1000 cannot be held", "open-file limit is 128", "LimitNOFILE=", "ulimit -n"):
            self.assertIn(part, log)


class HTTP2BodyTests(SynchronousTestCase):
    """
    Over TLS + h2 (the h2 library as the client, as in
    tests/browsers/test_http2.py), a body over 64 KiB.
    """

    def setUp(self) -> None:
        try:
            from tests._support.tls import selfSigned
            from tests._support.h2client import H2Client
        except ImportError as e:  # (h2 or cryptography missing)
            raise SkipTest(str(e))
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        identity = selfSigned(directory)
        self.service = Service("--listen", identity.listen(), "--request-timeout", "1")
        self.addCleanup(self.service.stop)
        self.assertTrue(self.service.port, self.service.logText())
        self.client = H2Client(self.service.port, identity, timeout=10)
        self.addCleanup(self.client.close)
        self.assertEqual(self.client.protocol, "h2")

    def post(self, body: bytes, contentLength: bool, end: bool) -> Any:
        """
        POST C{body} on a new stream, as flow control allows, reading
        meanwhile; stop sending once the server answered or reset it.
        """
        from tests._support.h2client import Response

        client = self.client
        connection = client.connection
        stream = connection.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", client.authority),
                   (":path", "/renders"), ("content-type", "application/json")]  # fmt: skip
        if contentLength:
            headers.append(("content-length", str(len(body))))
        connection.send_headers(stream, headers)
        response = client.responses[stream] = Response()
        sent = 0
        answered = lambda: bool(response.headers) or response.reset or response.ended  # noqa: E731
        while sent < len(body) and not answered():
            window = min(connection.local_flow_control_window(stream), connection.max_outbound_frame_size)
            if window <= 0:
                client.pump(lambda: answered() or connection.local_flow_control_window(stream) > 0, 5, "a window")
                continue
            piece = body[sent : sent + min(window, 16384)]
            sent += len(piece)
            connection.send_data(stream, piece, end_stream=end and sent == len(body))
            client._flush()
        client.pump(lambda: response.ended or response.reset, 5, f"the answer to a {len(body)}-byte POST")
        return response

    def test_bodyOverTheLimitAnswered413OnItsStream(self) -> None:
        """
        A body over 64 KiB, announced by content-length or not (and then
        endless), is answered C{413 body_too_large} JSON on its stream, and
        only that stream is reset: the same connection then answers
        C{/healthz}. (Before: never answered.)
        """
        for contentLength, end in ((True, True), (False, False)):
            response = self.post(b" " * (200 * 1024), contentLength, end)
            self.assertEqual(response.headers.get(":status"), "413", (contentLength, response))
            self.assertEqual(json.loads(response.body)["error"], "body_too_large")
            status, health = self.client.json("/healthz")
            self.assertEqual((status, health["status"]), ("200", "ok"))

    def test_requestClockStopsAtTheFirstStream(self) -> None:
        """
        Over h2 the request clock bounds the handshake and the first
        request only: the connection, idle between streams for twice the
        request timeout, still answers.
        """
        self.assertEqual(self.client.json("/healthz")[0], "200")
        time.sleep(2.0)
        self.assertEqual(self.client.json("/healthz")[0], "200")

    def test_handshakeNeverMadeIsClosed(self) -> None:
        """
        A TCP connection to the TLS port that never starts its handshake
        is closed within the request timeout (1 s) and the abort grace.
        """
        victim = Victim(socket.create_connection(("127.0.0.1", self.service.port), timeout=5), time.monotonic())
        self.addCleanup(victim.sock.close)
        victim.sock.setblocking(False)
        deadline = time.monotonic() + 5
        while victim.closed is None and time.monotonic() < deadline:
            select.select([victim.sock], [], [], 0.1)
            victim.poll()
        self.assertIsNotNone(victim.closed)
        self.assertLess(victim.closed - victim.opened, 3.5)  # type: ignore[operator]

"""
Redis mode with real processes, for trial TestCases: a L{Cluster} of
C{twistd twistedsse} instances with roles (C{web}, C{worker}, C{all}) on
ephemeral 127.0.0.1 ports, sharing one redis-server and one C{--output-dir}
(the shared storage a deployment has); an L{EventStream} read on the
reactor, which can be cut mid-stream (a client moving to another instance)
and counts keepalive comments; and a job's render processes as C{/proc}
shows them (L{renderProcesses}, L{RunSampler}: never two runs of one job
at once).

L{BlockingInstance} is one such instance for synchronous tests (the
browser tests).

Everything started here is stopped at the test's cleanup, by PID: each
instance gets SIGTERM (SIGKILL after L{STOP_TIMEOUT}), and a render process
left behind under the cluster's output directory is killed and fails the
test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Generator

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from .frames import FrameReader
from .launcher import START_TIMEOUT, Launched, ServiceProcess, startTwistd, twistdArgv
from .procfs import allPIDs, procStat, statFields
from .waiting import TimedOut, poll, whenTrue

ROLES = ("web", "worker", "all")

#: Seconds an instance has to exit after SIGTERM at cleanup before SIGKILL.
STOP_TIMEOUT = 10.0


# ------------------------------------------------------------ processes


def redisOptions(redisURL: str, role: str, outputDir: str, passwordFile: str | None = None) -> list[str]:
    """
    The Redis-mode options of one instance of a cluster.
    """
    assert role in ROLES, role
    argv = ["--redis", redisURL, "--role", role, "--output-dir", outputDir]
    if passwordFile is not None:
        argv += ["--redis-password-file", passwordFile]
    return argv


def processGroup(pid: int) -> int | None:
    """
    The process group of live process C{pid}, or C{None}.
    """
    fields = statFields(pid)
    return None if fields is None else int(fields[2])


def groupMembers(pgid: int) -> list[int]:
    """
    The live processes of process group C{pgid}.
    """
    return [pid for pid in allPIDs() if processGroup(pid) == pgid]


def _scan(needle: str, exclude: frozenset[int]) -> dict[int, tuple[int, int]]:
    """
    Live processes whose command line or environment holds C{needle}:
    PID -> (parent PID, process group).
    """
    found: dict[int, tuple[int, int]] = {}
    raw = needle.encode()
    me = os.getpid()
    for pid in allPIDs():
        if pid == me or pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                text = f.read()
            if raw not in text:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    text = f.read()
        except OSError:
            continue
        if raw in text:
            fields = statFields(pid)
            if fields is not None:
                found[pid] = (int(fields[1]), int(fields[2]))
    return found


def renderProcesses(needle: str, exclude: frozenset[int] = frozenset()) -> dict[int, int]:
    """
    Live processes whose command line or environment holds C{needle} (a job
    id: a command renderer has it in C{$TWISTEDSSE_RENDER_ID} and
    C{$TWISTEDSSE_OUTPUT}, ffmpeg in its output path; or an output
    directory), but those in C{exclude}: PID -> process group.
    """
    return {pid: group for pid, (_, group) in _scan(needle, exclude).items()}


class RunSampler:
    """
    Samples a job's render processes every C{interval} seconds on the
    reactor, and counts its runs: a run is a tree of processes under one
    supervisor (the leader of the run's process group), so a run's root is
    a process of the job whose parent is not one (a worker, or init once
    the worker is gone). Roots are told apart by PID and start time: the
    process group would not do, since a supervisor joins its own group
    only once it has started.

    @ivar runs: every run's root seen, C{(pid, process group)}, in the
        order first seen.
    @ivar most: the most runs seen in one sample.
    @ivar samples: how many samples were taken.
    """

    def __init__(self, needle: str, interval: float = 0.05, exclude: frozenset[int] = frozenset()) -> None:
        self.needle = needle
        self.exclude = exclude
        self.runs: list[tuple[int, int]] = []
        self.most = 0
        self.samples = 0
        self._seen: set[tuple[int, int]] = set()
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        self._loop.start(interval)

    def sample(self) -> None:
        found = _scan(self.needle, self.exclude)
        roots = [pid for pid, (parent, _) in found.items() if parent not in found]
        self.samples += 1
        self.most = max(self.most, len(roots))
        for pid in roots:
            started = procStat(pid)
            if started is not None and (pid, started[1]) not in self._seen:
                self._seen.add((pid, started[1]))
                self.runs.append((pid, found[pid][1]))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


# ---------------------------------------------------------------- streams


@attrs.frozen
class StreamEvent:
    """
    One event as a stream client got it, with the moment
    (C{reactor.seconds()}) it arrived.
    """

    id: str | None
    event: str | None
    text: str
    at: float

    @property
    def data(self) -> Any:
        return json.loads(self.text)


class EventStream(Protocol):
    """
    An event stream's body, read on the reactor with the server's framing
    (L{FrameReader}, which also counts comments).

    @ivar code: the response status; C{headers} its headers.
    @ivar events: the events so far, in order.
    @ivar keepalives: when each comment (keepalive) arrived.
    @ivar done: fires (with C{None}) when the body ends, however it ends.
    """

    def __init__(self, code: int, headers: Any) -> None:
        self.code = code
        self.headers = headers
        self.events: list[StreamEvent] = []
        self.keepalives: list[float] = []
        self.done: Deferred[None] = Deferred()
        self._reader = FrameReader()

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        before = self._reader.comments
        for eventID, name, payload in self._reader.feed(data):
            self.events.append(StreamEvent(eventID, name, payload.decode(), now))
        self.keepalives.extend([now] * (self._reader.comments - before))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)

    def close(self) -> Deferred[None]:
        """
        Cut the connection, as a client moving elsewhere does: C{done}.
        """
        if not self.done.called and self.transport is not None:
            self.transport.stopProducing()
        return self.done

    def ids(self) -> list[str | None]:
        return [e.id for e in self.events]

    def names(self) -> list[str | None]:
        return [e.event for e in self.events]

    def whenEvents(self, count: int, timeout: float = 30.0) -> Deferred[Any]:
        """
        Fires once at least C{count} events have arrived.
        """
        return whenTrue(
            reactor, lambda: len(self.events) >= count, timeout,
            lambda: f"{count} events (got {len(self.events)}: {self.names()[-5:]})",
        )  # fmt: skip

    def whenEvent(self, name: str, timeout: float = 30.0) -> Deferred[Any]:
        """
        Fires with the first event named C{name}, once it has arrived.
        """
        return whenTrue(
            reactor, lambda: next((e for e in self.events if e.event == name), None), timeout,
            lambda: f"a {name!r} event (got {self.names()[-8:]})",
        )  # fmt: skip


@inlineCallbacks
def openStream(
    url: str, pool: HTTPConnectionPool, lastEventID: str | None = None, timeout: float = 10.0
) -> Generator[Deferred[Any], Any, EventStream]:
    """
    GET an event stream (C{unbuffered}: an endless body must not be kept);
    fires with its L{EventStream} once the response head has arrived.
    """
    headers = {"Accept": "text/event-stream"}
    if lastEventID is not None:
        headers["Last-Event-ID"] = lastEventID
    response = yield treq.get(url, headers=headers, unbuffered=True, pool=pool, timeout=timeout)
    stream = EventStream(response.code, response.headers)
    response.deliverBody(stream)
    return stream


# ---------------------------------------------------------------- cluster


@attrs.define
class Instance:
    """
    One running C{twistd twistedsse} of a L{Cluster}.
    """

    role: str
    process: Any
    protocol: ServiceProcess
    port: int
    pid: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ended(self) -> Deferred[Any]:
        """
        Fires with how it ended (C{ProcessDone} / C{ProcessTerminated}).
        """
        return self.protocol.ended

    def signal(self, name: str) -> None:
        self.process.signalProcess(name)

    def log(self) -> str:
        return self.protocol.output.decode(errors="replace")


class Cluster:
    """
    twistd instances in Redis mode sharing the Redis at C{redisURL} and one output
    directory, each started with the C{ticks} renderer (as
    L{startTwistd}), C{--redis}, C{--role} and C{--output-dir}; stopped at
    C{testCase}'s cleanup.

    @ivar outputDir: the shared C{--output-dir}.
    @ivar pool: a non-persistent connection pool for the test's requests.
    """

    def __init__(self, testCase: Any, redisURL: str, passwordFile: str | None = None) -> None:
        self.redisURL = redisURL
        self.passwordFile = passwordFile
        self.outputDir = os.path.abspath(testCase.mktemp())
        os.makedirs(self.outputDir)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self._spawned: list[tuple[Any, ServiceProcess, int]] = []
        self._samplers: list[RunSampler] = []
        self._test = testCase
        testCase.addCleanup(self.stop)

    def argv(self, role: str) -> list[str]:
        return redisOptions(self.redisURL, role, self.outputDir, self.passwordFile)

    def spawn(self, role: str, *options: str) -> tuple[Any, ServiceProcess]:
        """
        Start an instance without waiting for it (for start-up failures):
        its process and L{ServiceProcess}.
        """
        process, protocol = startTwistd(*self.argv(role), *options)
        self._spawned.append((process, protocol, process.pid))
        return process, protocol

    @inlineCallbacks
    def start(self, role: str, *options: str) -> Generator[Deferred[Any], Any, Instance]:
        """
        An instance with C{role} and C{options}, once it listens.
        """
        process, protocol = self.spawn(role, *options)
        pid = process.pid
        port = yield protocol.listening
        return Instance(role, process, protocol, port, pid)

    def startMany(self, *specs: tuple[str, ...]) -> Deferred[list[Instance]]:
        """
        Start several instances at once, each C{(role, *options)}; fires
        with them in order once all listen.
        """
        return gatherResults([self.start(*spec) for spec in specs], consumeErrors=True)

    def sampleRuns(self, jobID: str) -> RunSampler:
        """
        A L{RunSampler} of C{jobID}'s render processes, stopped at cleanup
        (if the test has not stopped it).
        """
        sampler = RunSampler(jobID, exclude=frozenset(pid for _, _, pid in self._spawned))
        self._samplers.append(sampler)
        return sampler

    # -- HTTP ------------------------------------------------------------

    @inlineCallbacks
    def request(self, method: str, url: str, body: Any = None) -> Generator[Deferred[Any], Any, tuple[int, Any, bytes]]:
        """
        C{(code, headers, body)} of one request, with a JSON C{body} if
        given.
        """
        kw: dict[str, Any] = {"pool": self.pool, "timeout": 10}
        if body is not None:
            kw["json"] = body
        response = yield treq.request(method, url, **kw)
        content = yield treq.content(response)
        return response.code, response.headers, content

    @inlineCallbacks
    def getJSON(self, instance: Instance, path: str) -> Generator[Deferred[Any], Any, tuple[int, Any]]:
        code, _, content = yield self.request("GET", instance.base + path)
        return code, json.loads(content)

    @inlineCallbacks
    def post(self, instance: Instance, renderer: str, params: Any) -> Generator[Deferred[Any], Any, Any]:
        """
        C{POST /renders} on C{instance}: the job's JSON (202, or fail).
        """
        code, _, content = yield self.request("POST", instance.base + "/renders", {"renderer": renderer, "params": params})
        if code != 202:
            raise AssertionError(f"POST /renders on {instance.role} :{instance.port}: {code} {content!r}")
        return json.loads(content)

    def stream(self, instance: Instance, job: Any, lastEventID: str | None = None) -> Deferred[EventStream]:
        """
        C{job}'s event stream from C{instance}.
        """
        return openStream(instance.base + job["events_url"], self.pool, lastEventID)

    @inlineCallbacks
    def whenState(self, instance: Instance, job: Any, states: tuple[str, ...], timeout: float = 30.0) -> Generator[Deferred[Any], Any, Any]:
        """
        Poll C{job}'s status on C{instance} (every 50 ms) until its state is
        one of C{states}: that status.
        """
        seen: list[Any] = [None]

        @inlineCallbacks
        def check() -> Generator[Deferred[Any], Any, bool]:
            code, status = yield self.getJSON(instance, job["status_url"])
            seen[0] = (code, status)
            return code == 200 and status["state"] in states

        deadline = reactor.seconds() + timeout
        while True:
            if (yield check()):
                return seen[0][1]
            if reactor.seconds() > deadline:
                raise TimedOut(f"job {job['id']} not in {states} after {timeout:g} s: {seen[0]}")
            yield deferLater(reactor, 0.05, lambda: None)

    # -- cleanup ---------------------------------------------------------

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        """
        SIGTERM every instance still running, SIGKILL those still there
        after L{STOP_TIMEOUT}; then fail if a render process was left
        running under the output directory (after killing it, by PID).
        """
        for sampler in self._samplers:
            sampler.stop()
        running = [(process, protocol) for process, protocol, _ in self._spawned if not protocol.ended.called]
        for process, _ in running:
            try:
                process.signalProcess("TERM")
            except Exception:
                pass
        try:
            yield whenTrue(reactor, lambda: all(p.ended.called for _, p in running), STOP_TIMEOUT, "instances to exit")
        except TimedOut:
            pass
        for _, protocol in running:
            protocol.kill()
        yield gatherResults([protocol.ended for _, protocol in running])
        yield self.pool.closeCachedConnections()
        spawned = frozenset(pid for _, _, pid in self._spawned)
        try:
            yield whenTrue(reactor, lambda: not renderProcesses(self.outputDir, spawned), 5, "render processes to end")
        except TimedOut:
            left = renderProcesses(self.outputDir, spawned)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise AssertionError(f"render processes left running after the cluster stopped (killed): {left}")


def logsOf(*instances: Instance) -> str:
    """
    The end of each instance's log, for a failure message.
    """
    return "\n".join(f"--- {i.role} :{i.port} pid {i.pid}\n{i.log()[-3000:]}" for i in instances)


class BlockingInstance:
    """
    One twistd instance of a cluster for synchronous tests (the browser
    tests, whose drivers block): L{Launched} with a deadline, its log in a
    file (a pipe nobody reads would fill and stall it), stopped by PID.

    @ivar port: where it listens (its site's log line says).
    """

    def __init__(self, redisURL: str, role: str, outputDir: str, *options: str, timeout: float = START_TIMEOUT) -> None:
        self.role = role
        handle, name = tempfile.mkstemp(prefix=f"twistedsse-{role}-", suffix=".log")
        os.close(handle)
        self.logPath = Path(name)
        argv = twistdArgv(*redisOptions(redisURL, role, outputDir), *options, logfile=name)
        self.launched = Launched(argv, stderr=subprocess.STDOUT)
        found = poll(lambda: self.launched.process.poll() is not None or _SITE.search(self.logBytes()), timeout, 0.02)
        started = _SITE.search(self.logBytes())
        if not started:
            self.stop()
            why = "ended" if found else f"did not listen within {timeout:g} s"
            raise AssertionError(f"twistd ({role}) {why}:\n{self.log()}")
        self.port = int(started.group(1))
        self.pid = self.launched.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logBytes(self) -> bytes:
        try:
            return self.logPath.read_bytes() + self.launched.output
        except OSError:
            return self.launched.output

    def log(self) -> str:
        return self.logBytes().decode(errors="replace")[-4000:]

    def stop(self) -> int:
        """
        SIGTERM (SIGKILL if it hangs, which fails); remove its log.
        """
        try:
            return self.launched.stop(signal.SIGTERM, STOP_TIMEOUT)
        finally:
            self.logPath.unlink(missing_ok=True)


_SITE = re.compile(rb"Site starting on (\d+)")

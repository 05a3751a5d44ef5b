"""
The fan-out benchmark's harness (issue 5). Run it through C{bench/run},
which sets up C{bench/.venv}, installs the Express reference's packages and
builds the load client and the C floor first.

For each N and run, for each server (twistedsse under twistd, and the
references: sse-starlette + uvicorn, Express on Node.js, and the C floor,
C{bench/floor_server.c}), in a process of its own pinned to core 0: create
one render of the stand-in renderer (C{bench/emit.py}, waiting
for a start file), connect N streams with the C load client
(C{bench/sseload.c}, pinned to core 1), read the server's idle RSS, start
the renderer, and wait until every stream has its 50 events and its end.
Then stop everything it started, by PID.

Per (server, N, run) it derives, from the client's receive times and the
renderer's C{t_ns}: latency p50/p99/max (line printed -> the client's read
of it), events lost, the spread between the first and the last subscriber
to get each event, deliveries/s, connect time for N streams; from
C{/proc/PID}: server RSS per idle stream and server CPU time per delivery
over the event window. Medians over runs go into the table, the JSON under
C{bench/results/} and the plot.

C{--profile} runs twistedsse again, at N = C{--profile-n}, under
C{py-spy record} (raw, by function) for the event window, once per
C{--profile-modes} (default: C{native}, pausing the server per sample and
unwinding C frames, and C{nonblocking}, Python frames without pausing it),
and reports the top functions by self time, overall and
within the fan-out (below C{MemoryBroker.publish}, and the reactor's
C{FileDescriptor.doWrite} that flushes what it queued).

Redis mode (issue 11): the C{twistedsse-redis*} servers are a deployment,
not one process: a C{redis-server} the harness starts on a free loopback
port (a directory of its own under the run's logs, no persistence unless
C{--redis-aof}), one C{--role worker} that runs the renders, and one or two
C{--role web} instances that serve the streams (or one C{--role all}).
Every process of it is pinned to the server core, as the in-memory server
and its renderer are; the CPU counted is theirs, summed; each web instance
gets its share of the N streams (a load client each); C{INFO commandstats}
read before and after the event window gives the Redis commands per
published event. C{--profile-modes cprofile} runs the twistd processes
under C{bench/cprofiled.py} (cProfile for the event window only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
VENV = BENCH / ".venv"
PYTHON = VENV / "bin" / "python"
EXPRESS = BENCH / "reference_express"
FLOOR = VENV / "bin" / "floor_server"

SERVER_CORE = 0
CLIENT_CORE = 1
#: The listening sockets' backlog (every server): a burst of connects must
#: not overflow the SYN/accept queues (Twisted's default is 50).
BACKLOG = 4096

SERVERS = {
    "twistedsse": "twistedsse (twistd)",
    # The same with --no-eager-send: Twisted's own TCP writes (opt-in).
    "twistedsse-no-eager": "twistedsse --no-eager-send",
    # The same, its /metrics scraped every --scrape-interval seconds from
    # before the clients connect to the end of the event window (issue 12).
    "twistedsse-scraped": "twistedsse, /metrics scraped",
    # The same with --log-level debug: a debug line as each stream opens and
    # closes, written by twistd to its log (issue 12).
    "twistedsse-log-streams": "twistedsse --log-level debug",
    # Redis mode (issue 11): redis-server + a worker + web instance(s).
    "twistedsse-redis": "twistedsse Redis: web + worker",
    "twistedsse-redis-2web": "twistedsse Redis: 2 web (N/2 each) + worker",
    "twistedsse-redis-all": "twistedsse Redis: one --role all",
    "starlette": "sse-starlette + uvicorn",
    "express": "Express (Node.js)",
    "c-floor": "C epoll floor",
}
DEFAULT_SERVERS = "twistedsse,starlette,express,c-floor"



@attrs.frozen
class RedisLayout:
    """
    One Redis-mode deployment: how many web instances (each gets its share
    of the N streams), their role, and whether a separate worker runs the
    renders (with C{role="all"}, the one instance runs them itself).
    """

    webs: int
    role: str
    worker: bool


REDIS_LAYOUTS = {
    "twistedsse-redis": RedisLayout(webs=1, role="web", worker=True),
    "twistedsse-redis-2web": RedisLayout(webs=2, role="web", worker=True),
    "twistedsse-redis-all": RedisLayout(webs=1, role="all", worker=False),
}
#: Every server that runs under twistd (the cProfile wrapper can run these).
TWISTD_KINDS = frozenset({"twistedsse", "twistedsse-no-eager", "twistedsse-scraped", "twistedsse-log-streams",
                          *REDIS_LAYOUTS})

FULL_NS = [1, 100, 1000, 5000, 10000]
QUICK_NS = [1, 100, 1000]


# -- processes -----------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raiseNoFile(need: int) -> int:
    """
    Raise this process's RLIMIT_NOFILE (children inherit it) to at least
    C{need}, the hard limit too if we may (root). Returns the soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            soft, hard = need, need
        except (ValueError, OSError):
            pass
    target = need if hard == resource.RLIM_INFINITY else min(max(soft, need), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pinned(core: int | None) -> Callable[[], None]:
    def setup() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    return setup


def vmStatus(pid: int) -> dict[str, int]:
    """
    VmRSS and VmHWM (peak) of C{pid}, in KiB.
    """
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(line.split()[1])
    return values


def openFilesLimit(pid: int) -> int | None:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def cpuTimes(pid: int) -> dict[str, float]:
    """
    CPU time of C{pid} so far, in seconds, two ways: C{stat}, user+system
    from C{/proc/PID/stat} (clock ticks, 10 ms), and C{sched}, the sum over
    its threads of C{/proc/PID/task/*/schedstat}'s time on CPU (ns
    resolution) where the kernel has it; and C{waited}, its time runnable
    but waiting for a CPU (how much something else took its core).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    times = {"stat": (int(fields[11]) + int(fields[12])) / ticks}
    total = waited = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    fields = f.read().split()
                total += int(fields[0])
                waited += int(fields[1])
            except FileNotFoundError:  # a thread that just ended
                pass
        times["sched"] = total / 1e9
        # Time runnable but waiting for a CPU: another process had the core.
        times["waited"] = waited / 1e9
    except OSError:
        pass
    return times


class LineReader:
    """
    Lines from a child's stdout, each with a deadline.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.selector = selectors.DefaultSelector()
        self.selector.register(stream, selectors.EVENT_READ)
        self.buffer = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                return None
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"no {prefix} line within {timeout:.0f} s")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def close(self) -> None:
        self.selector.close()


def stopProcess(process: subprocess.Popen[bytes], name: str, grace: float = 20.0, group: bool = False) -> None:
    """
    SIGTERM the process we started (by its PID); SIGKILL if it hangs. With
    C{group}, also SIGKILL what is left of the session it leads (the
    renderer it started), once it is gone.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"  {name} (pid {process.pid}) ignored SIGTERM for {grace:.0f} s: SIGKILL")
            process.kill()
            process.wait(10)
    if group:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the session we created for it
        except (ProcessLookupError, PermissionError):
            pass


def nodePath() -> str:
    return shutil.which("node") or "/usr/bin/node"


def missingServers(servers: list[str]) -> list[str]:
    """
    Why a server asked for cannot run (not set up by C{bench/run}).
    """
    problems = []
    if "express" in servers:
        if not (shutil.which("node") or Path("/usr/bin/node").exists()):
            problems.append("express: node is not installed")
        elif not (EXPRESS / "node_modules" / "express" / "package.json").exists():
            problems.append("express: bench/reference_express/node_modules is missing (bench/run runs npm ci)")
    if any(s in REDIS_LAYOUTS for s in servers) and shutil.which("redis-server") is None:
        problems.append("twistedsse-redis*: no redis-server on PATH (apt-get install redis-server)")
    if "c-floor" in servers and not os.access(FLOOR, os.X_OK):
        problems.append(f"c-floor: {FLOOR.relative_to(ROOT)} is not built (bench/run builds it)")
    return problems


class Server:
    """
    One server under test, in its own session, pinned to the server core,
    with a descriptor limit for 10 000+ streams.
    """

    def __init__(self, kind: str, workdir: Path, core: int | None, name: str, redis: str | None = None,
                 role: str | None = None, outputDir: Path | None = None,
                 cprofile: Path | None = None) -> None:  # fmt: skip
        self.kind = kind
        self.role = role
        self.port = freePort()
        self.logPath = workdir / f"{name}.log"
        #: Where the cProfile wrapper writes the event window's stats.
        self.cprofile = cprofile
        emit = f"{PYTHON} -u {BENCH / 'emit.py'}"
        if kind in TWISTD_KINDS:
            # Under the cProfile wrapper (bench/cprofiled.py), which runs
            # twistd's own entry point with the same arguments.
            twistd = [str(PYTHON), str(BENCH / "cprofiled.py"), str(cprofile)] if cprofile else [str(VENV / "bin" / "twistd")]
            argv = twistd + [
                "-n", "--pidfile=", "twistedsse",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog={BACKLOG}",
                "--renderer", f"emit={emit}",
                # No caps (0): the descriptor limit raised above is the bound;
                # a cap over what it holds would be refused at start.
                "--max-streams", "0", "--max-streams-per-job", "0", "--max-connections", "0",
                "--keepalive", "15",
            ]  # fmt: skip
            if kind == "twistedsse-no-eager":
                argv.append("--no-eager-send")
            if kind == "twistedsse-log-streams":
                argv.extend(["--log-level", "debug"])
            if redis is not None:
                # Redis mode: the same options plus the broker, the role and
                # the output directory every instance and worker shares.
                argv += ["--redis", redis, "--role", role or "all", "--output-dir", str(outputDir)]
        elif kind == "starlette":
            argv = [
                str(PYTHON), str(BENCH / "reference_starlette.py"),
                "--port", str(self.port), "--backlog", str(BACKLOG),
                "--renderer", f"emit={emit}",
            ]  # fmt: skip
        elif kind == "express":
            argv = [
                nodePath(), str(EXPRESS / "server.js"),
                "--host", "127.0.0.1", "--port", str(self.port), "--backlog", str(BACKLOG),
                "--renderer", f"emit={emit}",
            ]  # fmt: skip
        elif kind == "c-floor":
            argv = [
                str(FLOOR),
                "--host", "127.0.0.1", "--port", str(self.port), "--backlog", str(BACKLOG),
                "--renderer", f"emit={emit}",
            ]  # fmt: skip
        else:
            raise ValueError(kind)
        self.argv = argv
        self.logFile = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.logFile, stderr=subprocess.STDOUT,
            cwd=workdir, preexec_fn=pinned(core), start_new_session=True,
        )  # fmt: skip
        self.pid = self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.role}" if self.role else self.kind

    def waitReady(self, timeout: float = 60.0) -> None:
        """
        Wait until it answers C{GET /renderers} (a worker, which serves only
        C{/healthz}: until that says it is connected to Redis).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.process.returncode}): {self.logTail()}")
            try:
                if self.role == "worker":
                    health = self.get("/healthz")
                    if (health.get("redis") or {}).get("connected", True):
                        return
                else:
                    self.get("/renderers")
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready within {timeout:.0f} s: {self.logTail()}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=5) as response:
            if response.status != 200:
                raise ValueError(f"GET {path}: {response.status}")
            return json.load(response)

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                raise RuntimeError(f"POST {path}: {response.status}")
            return json.load(response)

    def logTail(self) -> str:
        self.logFile.flush()
        try:
            return self.logPath.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stopProcess(self.process, self.label, group=True)
        self.logFile.close()


class RedisProcess:
    """
    The deployment's C{redis-server} (Debian's, from C{PATH}): a free
    loopback port, a directory of its own, no persistence unless C{aof}
    (then C{appendonly yes}, C{appendfsync everysec}, Redis's default
    policy); pinned to the server core; stopped by its PID.
    """

    def __init__(self, workdir: Path, core: int | None, name: str, aof: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("no redis-server on PATH (apt-get install redis-server)")
        self.port = freePort()
        self.directory = workdir / f"{name}.redis"
        self.directory.mkdir()
        argv = [
            executable, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.directory), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if aof else "no", "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if aof:
            argv += ["--appendfsync", "everysec"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=pinned(core))  # fmt: skip
        self.pid = self.process.pid
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_ = self.logTail()
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {log_}")
            try:
                if self.command("PING") == "PONG":
                    break
            except OSError:
                pass
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *words: str, timeout: float = 5.0) -> str:
        """
        One command over a connection of its own; its reply if a simple or
        bulk string (what C{PING} and C{INFO} answer).
        """
        request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(request.encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("redis-server closed the connection")
                data += chunk
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"+"):
                return head[1:].decode()
            if head.startswith(b"$"):
                size = int(head[1:])
                while len(rest) < size + 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise OSError("redis-server closed the connection")
                    rest += chunk
                return rest[:size].decode()
            raise OSError(f"redis-server answered {head[:200]!r}")

    def commandstats(self) -> dict[str, dict[str, int]]:
        """
        C{INFO commandstats}: per command (a script's commands are counted
        under their own names as well as the C{EVALSHA}), its calls and
        microseconds. The C{INFO} reading is counted from the next reading
        on: callers drop C{info}.
        """
        stats = {}
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_") :].partition(":")
                values = dict(f.split("=", 1) for f in fields.split(","))
                stats[name] = {"calls": int(values["calls"]), "usec": int(values["usec"])}
        return stats

    def version(self) -> str | None:
        for line in self.command("INFO", "server").splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return None

    def logTail(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stopProcess(self.process, "redis-server", grace=10)


class Deployment:
    """
    What one measured server is: one process (in memory, the references),
    or in Redis mode, C{redis-server}, the worker and the web instances
    (L{REDIS_LAYOUTS}). C{webs} serve the streams (the load is split among
    them); C{cpuProcesses} are the processes whose CPU counts.
    """

    def __init__(self, kind: str, workdir: Path, core: int | None, name: str, args: argparse.Namespace,
                 cprofile: bool = False) -> None:  # fmt: skip
        self.kind = kind
        self.redis: RedisProcess | None = None
        self.worker: Server | None = None
        self.webs: list[Server] = []

        def profiled(label: str) -> Path | None:
            return workdir / f"{name}.{label}.cprofile" if cprofile else None

        try:
            layout = REDIS_LAYOUTS.get(kind)
            if layout is None:
                self.webs.append(Server(kind, workdir, core, name, cprofile=profiled("web")))
            else:
                # --redis-pin: everything on the server core (default, as in
                # memory); "split": redis-server and the worker on the
                # client's core (a diagnostic: what sharing one core costs
                # the latency); "none": wherever the scheduler puts them.
                webCore = None if args.redis_pin == "none" else core
                backCore = {"server": core, "split": CLIENT_CORE if core is not None else None}.get(args.redis_pin)
                self.redis = RedisProcess(workdir, backCore, name, aof=args.redis_aof)
                outputs = workdir / f"{name}.outputs"
                outputs.mkdir()
                common = {"redis": self.redis.url, "outputDir": outputs}
                if layout.worker:
                    self.worker = Server(kind, workdir, backCore, f"{name}.worker", role="worker",
                                         cprofile=profiled("worker"), **common)  # fmt: skip
                for i in range(layout.webs):
                    label = "web" if layout.webs == 1 else f"web{i + 1}"
                    self.webs.append(Server(kind, workdir, webCore, f"{name}.{label}", role=layout.role,
                                            cprofile=profiled(label), **common))  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def twistds(self) -> list[tuple[str, Server]]:
        """
        The twistd (or other server) processes, labelled.
        """
        labelled = [("web" if len(self.webs) == 1 else f"web{i + 1}", web) for i, web in enumerate(self.webs)]
        if self.worker is not None:
            labelled.append(("worker", self.worker))
        return labelled

    def cpuProcesses(self) -> dict[str, int]:
        """
        Label -> PID of every process whose CPU time is the server's: the
        one server; or the web instances, the worker and C{redis-server}.
        """
        if self.redis is None:
            return {"server": self.webs[0].pid}
        pids = {label: server.pid for label, server in self.twistds()}
        pids["redis"] = self.redis.pid
        return pids

    def waitReady(self) -> None:
        for _, server in self.twistds():
            server.waitReady()

    def logTail(self) -> str:
        parts = [f"[{label}] {server.logTail()}" for label, server in self.twistds()]
        if self.redis is not None:
            parts.append(f"[redis-server] {self.redis.logTail()}")
        return "\n".join(parts)

    def stop(self) -> None:
        # The web instances first (their streams end), then the worker,
        # then Redis, each by its PID.
        for server in self.webs:
            server.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.redis is not None:
            self.redis.stop()


# -- one measurement --------------------------------------------------------

class Scraper:
    """
    GET C{url} every C{interval} seconds in a thread of the harness, as
    Prometheus would, until L{stop}: C{count} scrapes, the last one's
    C{size}, and the first C{error}.
    """

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.count = 0
        self.size = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    self.size = len(response.read())
                self.count += 1
            except Exception as e:
                self.error = self.error or f"{type(e).__name__}: {e}"
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)



def shares(n: int, parts: int) -> list[int]:
    """
    N streams split among C{parts} web instances, as evenly as they go.
    """
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def mergeClients(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One load client's C{CONNECTED} or C{DONE} report from several (one per
    web instance): counts and CPU summed, times the latest (the first
    receive the earliest), flags any.
    """
    if len(reports) == 1:
        return reports[0]
    merged: dict[str, Any] = {}
    for key in reports[0]:
        values = [r[key] for r in reports]
        if isinstance(values[0], bool):
            merged[key] = any(values)
        elif key == "first_recv_ns":
            merged[key] = min(v for v in values if v) if any(values) else 0
        elif key in ("connect_s", "wall_window_s", "last_recv_ns", "max_rss_kib", "events_seen"):
            merged[key] = max(values)
        else:
            merged[key] = sum(values)
    merged["clients"] = reports
    return merged


def waitStarted(web: Server, job: dict[str, Any], timeout: float = 30.0) -> str:
    """
    Wait until the render is no longer C{queued} (in Redis mode a worker
    must claim it first): its renderer is then waiting for the start file.
    """
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = web.get(job["status_url"]).get("state")
        if state != "queued":
            return str(state)
        time.sleep(0.02)
    raise RuntimeError(f"the render stayed {state} for {timeout:.0f} s (no worker claimed it)")


def toggleCProfile(deployment: Deployment) -> None:
    """
    Start (or stop and write) the cProfile of every twistd process of the
    deployment (C{bench/cprofiled.py} toggles on C{SIGUSR2}).
    """
    for _, server in deployment.twistds():
        os.kill(server.pid, signal.SIGUSR2)


def measure(kind: str, n: int, run: int, args: argparse.Namespace, workdir: Path,
            profile: str | None = None) -> dict[str, Any]:  # fmt: skip
    name = f"{kind}-n{n}-r{run}{'-profile-' + profile if profile else ''}"
    result: dict[str, Any] = {"server": kind, "n": n, "run": run, "profile": profile, "loadavg": os.getloadavg()}
    cores = os.cpu_count() or 1
    serverCore = SERVER_CORE if cores >= 2 and not args.no_pin else None
    clientCore = CLIENT_CORE if cores >= 2 and not args.no_pin else None
    startFile = workdir / f"{name}.go"
    cprofile = profile == "cprofile"
    deployment: Deployment | None = None
    clients: list[tuple[subprocess.Popen[bytes], LineReader, Path]] = []
    spy: subprocess.Popen[bytes] | None = None
    monitor: subprocess.Popen[bytes] | None = None
    scraper: Scraper | None = None
    try:
        deployment = Deployment(kind, workdir, serverCore, name, args, cprofile=cprofile)
        deployment.waitReady()
        webs = deployment.webs
        server = webs[0]
        time.sleep(0.3)
        eventWindow = args.events * args.interval
        job = server.post("/renders", {
            "renderer": "emit",
            "params": {
                "count": args.events, "interval": args.interval, "start_file": str(startFile),
                "start_timeout": args.connect_timeout + 60,
            },
        })  # fmt: skip
        if kind in TWISTD_KINDS:
            result["job_state_before"] = waitStarted(server, job)
        time.sleep(0.3)
        base = sum(vmStatus(web.pid)["VmRSS"] for web in webs)
        result["server_nofile"] = openFilesLimit(server.pid)
        if kind == "twistedsse-scraped":
            scraper = Scraper(server.url("/metrics"), args.scrape_interval)
        if profile and not cprofile:
            # The connect phase first (the accept path), then the event window.
            spy = startSpy(server.pid, workdir / f"{name}.connect.pyspy.txt", clientCore, args, profile)
        # One load client per web instance, each with its share of the N.
        for i, (web, share) in enumerate(zip(webs, shares(n, len(webs)))):
            if share == 0:
                continue  # N=1 over two instances: the second has no stream (its CPU still counts)
            binPath = workdir / f"{name}{'' if len(webs) == 1 else f'.c{i + 1}'}.bin"
            clientLog = open(workdir / f"{name}{'' if len(webs) == 1 else f'.c{i + 1}'}.client.log", "wb")
            client = subprocess.Popen(
                [
                    args.client, "--port", str(web.port), "--path", job["events_url"], "-n", str(share),
                    "--events", str(args.events), "--out", str(binPath),
                    "--concurrency", str(max(1, args.concurrency // len(webs))),
                    "--connect-timeout", str(args.connect_timeout), "--timeout", str(eventWindow + args.timeout),
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=clientLog, preexec_fn=pinned(clientCore),
            )  # fmt: skip
            clientLog.close()
            clients.append((client, LineReader(client.stdout), binPath))
        connected = mergeClients([json.loads(r.expect("CONNECTED", args.connect_timeout + 30)) for _, r, _ in clients])
        if spy is not None:
            result["pyspy_connect"] = finishSpy(spy, workdir / f"{name}.connect.pyspy.txt")
            spy = None
        time.sleep(args.settle)
        idle = sum(vmStatus(web.pid)["VmRSS"] for web in webs)
        if profile and not cprofile:
            spy = startSpy(server.pid, workdir / f"{name}.pyspy.txt", clientCore, args, profile)
        pids = deployment.cpuProcesses()
        cpu0 = {label: cpuTimes(pid) for label, pid in pids.items()}
        client0 = [cpuTimes(c.pid) for c, _, _ in clients]
        stats0 = deployment.redis.commandstats() if deployment.redis is not None else None
        if deployment.redis is not None and args.redis_monitor:
            monitorPath = workdir / f"{name}.monitor.txt"
            monitor = startMonitor(deployment.redis, monitorPath, clientCore)
        if cprofile:
            toggleCProfile(deployment)
        triggered = time.time_ns()
        scrapes0 = scraper.count if scraper is not None else 0
        startFile.touch()
        done = mergeClients([json.loads(r.expect("DONE", eventWindow + args.timeout + 30)) for _, r, _ in clients])
        if scraper is not None:
            result["scrapes_in_window"] = scraper.count - scrapes0
            scraper.stop()
            result["scrape_bytes"] = scraper.size
            if scraper.error is not None:
                raise RuntimeError(f"GET /metrics: {scraper.error}")
            scraper = None
        if monitor is not None:
            stopProcess(monitor, "redis-cli monitor", grace=5)
            monitor = None
        if cprofile:
            toggleCProfile(deployment)
        cpu1 = {label: cpuTimes(pid) for label, pid in pids.items()}
        client1 = [cpuTimes(c.pid) for c, _, _ in clients]
        stats1 = deployment.redis.commandstats() if deployment.redis is not None else None
        result["cpu_read_ns"] = time.time_ns()
        if all("waited" in c for c in cpu0.values()):
            result["server_waited_ms"] = sum(cpu1[k]["waited"] - cpu0[k]["waited"] for k in pids) * 1000
            result["client_waited_ms"] = sum(b["waited"] - a["waited"] for a, b in zip(client0, client1)) * 1000
        after = [vmStatus(web.pid) for web in webs]
        if spy is not None:
            result["pyspy"] = finishSpy(spy, workdir / f"{name}.pyspy.txt")
            spy = None
        for client, reader, _ in clients:
            reader.expect("WRITTEN", 60)
            assert client.stdin is not None
            client.stdin.write(b"quit\n")
            client.stdin.close()
            client.wait(30)
        result.update(connected=connected, done=done, triggered_ns=triggered)
        result.update(
            rss_base_kib=base, rss_idle_kib=idle, rss_after_kib=sum(a["VmRSS"] for a in after),
            rss_peak_kib=sum(a["VmHWM"] for a in after),
            cpu_stat_s=sum(cpu1[k]["stat"] - cpu0[k]["stat"] for k in pids),
            cpu_sched_s=sum(cpu1[k]["sched"] - cpu0[k]["sched"] for k in pids)
            if all("sched" in c for c in cpu0.values()) else None,
        )  # fmt: skip
        if deployment.redis is not None:
            # Where the CPU went: each process of the deployment.
            result["cpu_by_process_s"] = {
                k: cpu1[k].get("sched", cpu1[k]["stat"]) - cpu0[k].get("sched", cpu0[k]["stat"]) for k in pids
            }
        result.update(analyse([b for _, _, b in clients], n, args.events, result))
        if deployment.redis is not None and args.redis_monitor:
            result.update(hops(monitorPath, [b for _, _, b in clients]))
        if stats0 is not None and stats1 is not None:
            result.update(redisPerEvent(stats0, stats1, args.events + 1))
        if cprofile:
            result["cprofile"] = {
                label: summariseCProfile(server.cprofile, server.logPath)
                for label, server in deployment.twistds() if server.cprofile is not None
            }  # fmt: skip
    except Exception as e:  # one failed run must not end the matrix
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"  {name}: {result['error']}\n  server log tail:\n{deployment.logTail() if deployment else ''}")
    finally:
        if scraper is not None:
            scraper.stop()
        if spy is not None:
            stopProcess(spy, "py-spy", grace=10)
        if monitor is not None:
            stopProcess(monitor, "redis-cli monitor", grace=5)
        for client, reader, binPath in clients:
            if client.poll() is None:
                stopProcess(client, "sseload", grace=10)
            reader.close()
            if not args.keep:
                binPath.unlink(missing_ok=True)
        if deployment is not None:
            deployment.stop()
        startFile.unlink(missing_ok=True)
    return result


def startMonitor(redis: RedisProcess, output: Path, core: int | None) -> subprocess.Popen[bytes]:
    """
    C{redis-cli MONITOR} into C{output}, until stopped (by its PID): every
    command Redis runs, with Redis's own time (the real-time clock, as the
    renderer's C{t_ns} and the client's receive times).
    """
    executable = shutil.which("redis-cli")
    if executable is None:
        raise RuntimeError("--redis-monitor needs redis-cli on PATH")
    with open(output, "wb") as out:
        monitor = subprocess.Popen([executable, "-h", "127.0.0.1", "-p", str(redis.port), "monitor"],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=pinned(core))  # fmt: skip
    deadline = time.monotonic() + 5
    while output.stat().st_size == 0:  # "OK" once it monitors
        if time.monotonic() > deadline or monitor.poll() is not None:
            stopProcess(monitor, "redis-cli monitor", grace=5)
            raise RuntimeError(f"redis-cli monitor did not start: {output.read_text(errors='replace')[-300:]}")
        time.sleep(0.01)
    return monitor


MONITOR_LINE = re.compile(r'^(\d+)\.(\d{6}) \[\d+ ([^\]]+)\] "(\w+)"')
T_NS = re.compile(r't_ns\\?"\s*:\s*(\d+)')


def hops(monitorPath: Path, receipts: list[Path]) -> dict[str, Any]:
    """
    Each latency split where Redis ran the first command that carried the
    event (the worker's publish, by its C{t_ns}): render line -> Redis (the
    renderer's pipe, the worker, its round trip), then Redis -> client (the
    web instance's read loop and fan-out, the client's socket).
    """
    seen: dict[int, int] = {}
    for line in monitorPath.read_text(errors="replace").splitlines():
        m = MONITOR_LINE.match(line)
        if m is None or m.group(3) == "lua":
            continue  # a script's own commands come with their EVALSHA
        for t in T_NS.findall(line):
            at = int(m.group(1)) * 1_000_000_000 + int(m.group(2)) * 1000
            seen.setdefault(int(t), at)
    tns, recv = readReceipts(receipts)
    matched = np.array([t in seen for t in tns])
    if not matched.any():
        return {"hop_error": "no event found in the MONITOR output"}
    atRedis = np.array([seen.get(int(t), 0) for t in tns])
    first = (atRedis - tns)[matched] / 1e6
    got = (recv > 0) & matched[:, None]
    second = (recv - atRedis[:, None])[got] / 1e6
    return {
        "hop_events_matched": int(matched.sum()),
        "hop_render_to_redis_p50_ms": float(np.percentile(first, 50)),
        "hop_render_to_redis_p99_ms": float(np.percentile(first, 99)),
        "hop_redis_to_client_p50_ms": float(np.percentile(second, 50)),
        "hop_redis_to_client_p99_ms": float(np.percentile(second, 99)),
    }


def redisPerEvent(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                  events: int) -> dict[str, Any]:  # fmt: skip
    """
    Redis commands per published event over the event window, from two
    C{INFO commandstats} readings: in total and by command (a script's own
    commands, run inside it, are counted under their names besides the
    C{EVALSHA}), and each command's microseconds (a script's include those
    of the commands it ran, counted again under their names: not summed).
    The harness's own C{INFO} and C{MONITOR} are left out.
    """
    calls: dict[str, int] = {}
    usecs: dict[str, int] = {}
    for name, stat in after.items():
        if name in ("info", "monitor"):  # the harness's own
            continue
        delta = stat["calls"] - before.get(name, {}).get("calls", 0)
        spent = stat["usec"] - before.get(name, {}).get("usec", 0)
        if delta:
            calls[name] = delta
            usecs[name] = spent
    return {
        "redis_events": events,
        "redis_calls": calls,
        "redis_usec": usecs,
        "redis_cmds_per_event": sum(calls.values()) / events,
        "redis_per_event": {name: c / events for name, c in sorted(calls.items(), key=lambda kv: -kv[1])},
    }


def readReceipts(paths: list[Path]) -> tuple[Any, Any]:
    """
    The load clients' files (L{bench/sseload.c}'s format), merged: every
    event's C{t_ns} and, per event, the receive time of every stream of
    every client (0: not received). Clients that saw an event the others
    did not get columns of zeros for it.
    """
    parts = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.int64)
        kSeen, nConns = int(raw[0]), int(raw[1])
        parts.append((raw[2 : 2 + kSeen], raw[2 + kSeen :].reshape(kSeen, nConns)))
    if len(parts) == 1:
        return parts[0]
    tns = np.unique(np.concatenate([t for t, _ in parts]))
    recv = np.zeros((tns.size, sum(r.shape[1] for _, r in parts)), dtype=np.int64)
    column = 0
    for t, r in parts:
        recv[np.searchsorted(tns, t), column : column + r.shape[1]] = r
        column += r.shape[1]
    return tns, recv


def analyse(paths: list[Path], n: int, k: int, result: dict[str, Any]) -> dict[str, Any]:
    tns, recv = readReceipts(paths)
    order = np.argsort(tns)
    tns, recv = tns[order], recv[order]
    got = recv > 0
    received = int(got.sum())
    out: dict[str, Any] = {"received": received, "expected": n * k, "lost": max(0, n * k - received)}
    if not received:
        return out
    lat = (recv - tns[:, None])[got] / 1e6
    out.update(
        lat_p50_ms=float(np.percentile(lat, 50)),
        lat_p99_ms=float(np.percentile(lat, 99)),
        lat_max_ms=float(lat.max()),
        lat_min_ms=float(lat.min()),
    )
    # Spread: first to last subscriber getting the same event.
    if recv.shape[1] > 1:
        masked = np.where(got, recv, np.nan)
        counts = got.sum(axis=1)
        spread = (np.nanmax(masked, axis=1) - np.nanmin(masked, axis=1))[counts > 1] / 1e6
        if spread.size:
            out.update(spread_p50_ms=float(np.median(spread)), spread_max_ms=float(spread.max()))
    last = int(recv[got].max())
    window = (last - int(tns.min())) / 1e9
    out["window_s"] = window
    out["deliveries_per_s"] = received / window if window > 0 else None
    cpu = result.get("cpu_sched_s")
    if cpu is None:
        cpu = result.get("cpu_stat_s")
    out["cpu_s"] = cpu
    # Microseconds of server CPU per delivery = milliseconds per 1000.
    out["cpu_ms_per_1000"] = cpu * 1e6 / received if cpu is not None else None
    byProcess = result.get("cpu_by_process_s")
    if byProcess:
        # Redis mode: the same figure split into the web instances, the
        # worker and redis-server.
        for group in ("web", "worker", "redis"):
            spent = sum(v for label, v in byProcess.items() if label.startswith(group))
            if any(label.startswith(group) for label in byProcess):
                out[f"cpu_{group}_ms_per_1000"] = spent * 1e6 / received
    # Both CPU readings bracket the event window: trigger to the server's
    # CPU reading after DONE (server) or to the last event received (client).
    serverWindow = (result["cpu_read_ns"] - result["triggered_ns"]) / 1e9
    out["server_busy"] = cpu / serverWindow if serverWindow > 0 and cpu is not None else None
    done = result["done"]
    clientWindow = (last - result["triggered_ns"]) / 1e9
    out["client_busy"] = done["cpu_window_s"] / clientWindow if clientWindow > 0 else None
    # Below 100 streams the allocator's noise is larger than the streams.
    out["rss_per_stream_kib"] = (result["rss_idle_kib"] - result["rss_base_kib"]) / n if n >= 100 else None
    out["connect_s"] = result["connected"]["connect_s"]
    out["streams_ok"] = result["connected"]["ok"]
    out["streams_completed"] = done["completed"]
    unended = n - done.get("clean_end", n)
    if done.get("timed_out") or unended:
        # Every event arrived is not enough: each response must also end
        # (the chunked terminator after the terminal event).
        out["error"] = f"{unended} of {n} streams did not end cleanly (timed out: {bool(done.get('timed_out'))})"
    return out


# -- py-spy -----------------------------------------------------------------


PROFILE_MODES = {
    # name: extra py-spy flags. "native" pauses the server for each sample
    # and unwinds C frames too (time inside syscalls shows as send,
    # epoll_ctl, ...); "nonblocking" never pauses it, Python frames only.
    # They disagree: pausing biases samples toward syscalls. Read both.
    "native": ["--native"],
    "python": [],
    "nonblocking": ["--nonblocking"],
}


def startSpy(pid: int, output: Path, core: int | None, args: argparse.Namespace, mode: str) -> subprocess.Popen[bytes]:
    spyBin = str(VENV / "bin" / "py-spy")
    base = [spyBin, "record", "--pid", str(pid), "--rate", str(args.profile_rate), "--format", "raw",
            "--function", "--output", str(output)]  # fmt: skip
    attempts = [(mode, base + PROFILE_MODES[mode])]
    if mode == "native":
        attempts.append(("python", base))  # where py-spy cannot unwind native frames
    for used, argv in attempts:
        logPath = output.with_suffix(".log")
        with open(logPath, "wb") as spyLog:
            spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=spyLog, stderr=subprocess.STDOUT,
                                   preexec_fn=pinned(core))  # fmt: skip
        # py-spy says "Sampling process ..." once attached; exits otherwise.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and spy.poll() is None:
            if "Sampling process" in logPath.read_text(errors="replace"):
                spy.mode = used  # type: ignore[attr-defined]
                time.sleep(0.5)
                return spy
            time.sleep(0.05)
        stopProcess(spy, "py-spy", grace=5)
        log(f"  py-spy {' '.join(argv[1:])} failed: {logPath.read_text(errors='replace')[-500:]}")
    raise RuntimeError("py-spy could not attach")


def finishSpy(spy: subprocess.Popen[bytes], output: Path) -> dict[str, Any]:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        stopProcess(spy, "py-spy", grace=5)
    return {"mode": getattr(spy, "mode", None), "raw": str(output), **summariseProfile(output)}


def _frameName(frame: str) -> str:
    # "deliver (twistedsse/_stream.py:257)" -> keep as is, but shorten
    # site-packages paths.
    frame = frame.strip()
    return frame.replace(str(VENV) + "/lib/", "").replace("site-packages/", "")


def _inFanout(frame: str) -> bool:
    return ("publish (" in frame and "_broker.py" in frame) or frame.startswith("FileDescriptor.doWrite (")


def summariseProfile(path: Path, top: int = 40) -> dict[str, Any]:
    """
    From py-spy's raw (collapsed) output: the top functions by self time
    (the leaf of each sample) and by total time, overall and within the
    fan-out, i.e. in samples whose stack passes through the broker's
    C{publish}.
    """
    selfAll: Counter[str] = Counter()
    totalAll: Counter[str] = Counter()
    selfFan: Counter[str] = Counter()
    totalFan: Counter[str] = Counter()
    samples = fanSamples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        weight = int(count)
        frames = [_frameName(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += weight
        selfAll[frames[-1]] += weight
        for frame in set(frames):
            totalAll[frame] += weight
        # The fan-out path: the broker handing the event to every stream
        # (publish, down to each transport's buffer), and the reactor
        # flushing those buffers to the sockets (doWrite).
        fanAt = next((i for i, f in enumerate(frames) if _inFanout(f)), None)
        if fanAt is not None:
            fanSamples += weight
            selfFan[frames[-1]] += weight
            for frame in set(frames[fanAt:]):
                totalFan[frame] += weight

    def table(counter: Counter[str], whole: int) -> list[dict[str, Any]]:
        return [{"function": f, "samples": c, "share": c / whole if whole else 0.0} for f, c in counter.most_common(top)]

    return {
        "samples": samples,
        "fanout_samples": fanSamples,
        "self_top": table(selfAll, samples),
        "total_top": table(totalAll, samples),
        "fanout_self_top": table(selfFan, fanSamples),
        "fanout_total_top": table(totalFan, fanSamples),
    }


EPOLL_WAIT = "<method 'poll' of 'select.epoll' objects>"
#: Frames that only lead to the work (twistd, the reactor's loop and
#: dispatch), left out of the inclusive-time table; they include the idle
#: wait.
CPROFILE_PLUMBING = frozenset({
    "run", "runApp", "startReactor", "postApplication", "runReactorWithLogging", "mainLoop", "doPoll",
    "callWithLogger", "callWithContext", "_doReadOrWrite", "doIteration",
})  # fmt: skip


def _cprofileName(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    if filename == "~":
        return function  # a builtin: "<method 'send' of '_socket.socket' objects>"
    short = filename.replace(str(VENV) + "/lib/", "").replace("site-packages/", "").replace(str(ROOT) + "/", "")
    return f"{function} ({short}:{line})"


def summariseCProfile(path: Path | None, logPath: Path, top: int = 30, timeout: float = 30.0) -> dict[str, Any]:
    """
    From one process's event-window C{pstats} (L{bench/cprofiled.py}):
    the top functions by own time and by inclusive time, with calls.
    """
    import pstats

    deadline = time.monotonic() + timeout
    while path is None or not path.exists():
        if time.monotonic() > deadline:
            return {"error": f"no profile written ({path}); log: {logPath.read_text(errors='replace')[-500:]}"}
        time.sleep(0.05)
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = [
        {"function": _cprofileName(key), "calls": nc, "tottime_s": tt, "cumtime_s": ct}
        for key, (cc, nc, tt, ct, callers) in stats.items()
    ]
    # cProfile's clock is wall time: the reactor waiting in epoll is idle,
    # not work; the shares are of the rest.
    idle = sum(r["tottime_s"] for r in rows if r["function"] == EPOLL_WAIT)
    busy = [r for r in rows if r["function"] != EPOLL_WAIT]
    total = sum(r["tottime_s"] for r in busy)
    for r in busy:
        r["share"] = r["tottime_s"] / total if total else 0.0
    byOwn = sorted(busy, key=lambda r: -r["tottime_s"])[:top]
    byTotal = sorted((r for r in busy if r["function"].split(" (", 1)[0] not in CPROFILE_PLUMBING),
                     key=lambda r: -r["cumtime_s"])[:top]  # fmt: skip
    return {"raw": str(path), "total_s": total, "idle_s": idle, "self_top": byOwn, "total_top": byTotal}


def cprofileReport(run: dict[str, Any], top: int = 20) -> str:
    """
    The cProfile run's table per process: own time, then inclusive.
    """
    lines = [
        f"cProfile, {SERVERS.get(run['server'], run['server'])}, N={run['n']}, EVENT window (perturbed by the profiler: "
        f"p50 {fmt(run.get('lat_p50_ms'), '{:.2f}')} ms, CPU {fmt(run.get('cpu_ms_per_1000'), '{:.2f}')} us/delivery"
        + (f", Redis commands/event {run['redis_cmds_per_event']:.2f}" if run.get("redis_cmds_per_event") else "")
        + ")"
    ]  # fmt: skip
    for label, p in (run.get("cprofile") or {}).items():
        if "error" in p:
            lines.append(f"\n[{label}] {p['error']}")
            continue
        lines.append(f"\n[{label}] {p['total_s'] * 1000:.1f} ms busy in Python's view (and {p.get('idle_s', 0) * 1000:.0f} ms "
                     "waiting in epoll); own time:")
        for row in p["self_top"][:top]:
            lines.append(f"  {row['share']:6.1%}  {row['tottime_s'] * 1000:8.2f} ms  {row['calls']:8d} calls  {row['function']}")
        lines.append(f"[{label}] inclusive time:")
        for row in p["total_top"][:top]:
            lines.append(f"  {row['cumtime_s'] * 1000:8.2f} ms  {row['calls']:8d} calls  {row['function']}")
    return "\n".join(lines)


# -- summary, table, plot ---------------------------------------------------

METRICS = [
    # key, label, format, "lower is better" (for the ratio's reading)
    ("lat_p50_ms", "latency p50 (ms)", "{:.2f}"),
    ("lat_p99_ms", "latency p99 (ms)", "{:.2f}"),
    ("lat_max_ms", "latency max (ms)", "{:.2f}"),
    ("lost", "events lost", "{:.0f}"),
    ("spread_p50_ms", "spread first-last p50 (ms)", "{:.2f}"),
    ("spread_max_ms", "spread first-last max (ms)", "{:.2f}"),
    ("rss_idle_mib", "server RSS idle, N streams (MiB)", "{:.1f}"),
    ("rss_per_stream_kib", "RSS per stream (KiB)", "{:.1f}"),
    ("cpu_ms_per_1000", "server CPU per 1000 deliveries (ms) = us/delivery", "{:.2f}"),
    ("cpu_web_ms_per_1000", "  of which Redis-mode web instance(s)", "{:.2f}"),
    ("cpu_worker_ms_per_1000", "  of which Redis-mode worker", "{:.2f}"),
    ("cpu_redis_ms_per_1000", "  of which redis-server", "{:.2f}"),
    ("server_busy", "server core busy in event window", "{:.0%}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("connect_s", "connect time, N streams (s)", "{:.3f}"),
    ("client_busy", "load client core busy (its share)", "{:.0%}"),
    ("server_waited_ms", "server runnable, waiting for its core (ms; noise)", "{:.0f}"),
    ("client_waited_ms", "client runnable, waiting for its core (ms; noise)", "{:.0f}"),
    ("hop_render_to_redis_p50_ms", "  (--redis-monitor) render line -> Redis ran the publish, p50 (ms)", "{:.2f}"),
    ("hop_redis_to_client_p50_ms", "  (--redis-monitor) Redis ran the publish -> client, p50 (ms)", "{:.2f}"),
    ("redis_cmds_per_event", "Redis commands per published event (all)", "{:.2f}"),
    ("scrapes_in_window", "/metrics scrapes in the event window", "{:.0f}"),
    ("scrape_bytes", "/metrics response (bytes)", "{:,.0f}"),
]
#: Rows shown only when a server of the run has them (Redis mode).
OPTIONAL_METRICS = frozenset({
    "cpu_web_ms_per_1000", "cpu_worker_ms_per_1000", "cpu_redis_ms_per_1000", "redis_cmds_per_event",
    "hop_render_to_redis_p50_ms", "hop_redis_to_client_p50_ms", "scrapes_in_window", "scrape_bytes",
})  # fmt: skip
#: Per-command rows (C{redis_per_event}, flattened): "rcmd:evalsha", ...
COMMAND_PREFIX = "rcmd:"


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """
    The median over runs of each metric, per server and N.
    """
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run.get("profile"):
            continue
        if "rss_idle_kib" in run:
            run["rss_idle_mib"] = run["rss_idle_kib"] / 1024
        cell = summary.setdefault(run["server"], {}).setdefault(run["n"], {"runs": 0, "errors": []})
        if "error" in run:
            cell["errors"].append(run["error"])
            continue
        cell["runs"] += 1
        for key, *_ in METRICS:
            if run.get(key) is not None:
                cell.setdefault("_values", {}).setdefault(key, []).append(run[key])
        if "redis_per_event" in run:
            cell.setdefault("_commands", []).append(run["redis_per_event"])
    for cells in summary.values():
        for cell in cells.values():
            values = cell.pop("_values", {})
            # A command missing from a run's reading was called 0 times in it.
            commands = cell.pop("_commands", [])
            for name in sorted({name for c in commands for name in c}):
                values[COMMAND_PREFIX + name] = [c.get(name, 0.0) for c in commands]
            if values.get("lost"):
                cell["lost_max"] = max(values["lost"])
            for key, vs in values.items():
                cell[key] = statistics.median(vs)
                if len(vs) > 1:
                    cell[key + "_runs"] = vs
    return summary


def fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    return pattern.format(value)


def ratioBase(servers: list[str]) -> str:
    """
    The server the ratios are of: twistedsse when it ran, else the first.
    """
    return "twistedsse" if "twistedsse" in servers else servers[0]


def table(summary: dict[str, dict[int, dict[str, Any]]], ns: list[int], servers: list[str]) -> str:
    """
    One column per server, then one ratio column per reference:
    twistedsse (or the first server, without it) / that reference.
    """
    base = ratioBase(servers)
    others = [s for s in servers if s != base]
    # Redis mode is read against in-memory: its ratios are Redis / in-memory.
    inverse = {s for s in others if s in REDIS_LAYOUTS and base == "twistedsse"}
    head = (["N", "metric"] + [SERVERS[s] for s in servers]
            + [f"ratio {s}/{base}" if s in inverse else f"ratio {base}/{s}" for s in others])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    commandKeys = sorted(
        {k for cells in summary.values() for cell in cells.values() for k in cell
         if k.startswith(COMMAND_PREFIX) and not k.endswith("_runs")},
        key=lambda k: -max(cell.get(k) or 0 for cells in summary.values() for cell in cells.values()),
    )  # fmt: skip
    rows = list(METRICS) + [(k, f"  Redis {k[len(COMMAND_PREFIX):].upper()} per event", "{:.2f}") for k in commandKeys]
    for n in ns:
        for key, label, pattern in rows:
            values = {s: summary.get(s, {}).get(n, {}).get(key) for s in servers}
            optional = key in OPTIONAL_METRICS or key.startswith(COMMAND_PREFIX)
            if optional and all(v is None for v in values.values()):
                continue
            row = [str(n), label]
            row += [fmt(values[s], pattern) for s in servers]
            x = values[base]
            for s in others:
                y = values[s]
                if s in inverse:
                    x, y = y, values[base]
                row.append(f"{x / y:.2f}" if x is not None and y not in (None, 0) else "-")
                x = values[base]
            lines.append("| " + " | ".join(row) + " |")
        errors = {s: summary.get(s, {}).get(n, {}).get("errors") for s in servers}
        for s, errs in errors.items():
            for err in errs or []:
                lines.append(f"| {n} | run failed ({s}) | {err} |" + " |" * (len(head) - 3))
    return "\n".join(lines)


def targets(summary: dict[str, dict[int, dict[str, Any]]]) -> str:
    """
    Issue 5's targets, checked on the medians (twistedsse against the
    references of the same run: sse-starlette, Express, the C floor).
    """
    t = summary.get("twistedsse", {})
    r = summary.get("starlette", {})
    express = summary.get("express", {})
    floor = summary.get("c-floor", {})
    rows = []

    def get(d: dict[int, dict[str, Any]], n: int, key: str) -> Any:
        return d.get(n, {}).get(key)

    def check(name: str, value: Any, ok: bool | None) -> None:
        rows.append(f"| {name} | {value} | {'-' if ok is None else ('met' if ok else 'NOT met')} |")

    for n in sorted(t):
        if n >= 1000:
            cpu, ref = get(t, n, "cpu_ms_per_1000"), get(r, n, "cpu_ms_per_1000")
            if cpu is not None:
                ratio = cpu / ref if ref else None
                check(f"N={n}: CPU/delivery <= 0.5x reference", f"{cpu:.2f} us vs {fmt(ref, '{:.2f}')} us (x{fmt(ratio, '{:.2f}')})",
                      ratio <= 0.5 if ratio is not None else None)  # fmt: skip
                check(f"N={n}: CPU/delivery <= 12 us (Express, as measured elsewhere in the issue)", f"{cpu:.2f} us",
                      cpu <= 12)  # fmt: skip
                ref = get(express, n, "cpu_ms_per_1000")
                if ref is not None:
                    check(f"N={n}: CPU/delivery at or below Express's (same run)",
                          f"{cpu:.2f} us vs {ref:.2f} us (x{cpu / ref:.2f})", cpu <= ref)  # fmt: skip
                ref = get(floor, n, "cpu_ms_per_1000")
                if ref is not None:
                    check(f"N={n}: CPU/delivery within 1.5x of the C floor (stretch)",
                          f"{cpu:.2f} us vs {ref:.2f} us (x{cpu / ref:.2f})", cpu <= 1.5 * ref)  # fmt: skip
    if 1000 in t:
        p50, ref, p99 = get(t, 1000, "lat_p50_ms"), get(r, 1000, "lat_p50_ms"), get(t, 1000, "lat_p99_ms")
        if p50 is not None and ref:
            check("N=1000: p50 <= 0.5x reference", f"{p50:.2f} ms vs {ref:.2f} ms", p50 <= 0.5 * ref)
        if p99 is not None:
            check("N=1000: p99 <= 50 ms", f"{p99:.2f} ms", p99 <= 50)
    if 5000 in t and get(t, 5000, "lat_p99_ms") is not None:
        p99 = get(t, 5000, "lat_p99_ms")
        check("N=5000 at 20 events/s: p99 <= 100 ms", f"{p99:.2f} ms", p99 <= 100)
    if 10000 in t and get(t, 10000, "lost") is not None:
        lost = get(t, 10000, "lost_max")
        check("N=10000: every event delivered (every run)", f"{lost:.0f} lost (worst run)", lost == 0)
        check("N=10000: spread within one fan-out pass", f"p50 {fmt(get(t, 10000, 'spread_p50_ms'), '{:.1f}')} ms, "
              f"max {fmt(get(t, 10000, 'spread_max_ms'), '{:.1f}')} ms (judge against CPU/delivery x N)", None)  # fmt: skip
        c = get(t, 10000, "connect_s")
        if c is not None:
            check("N=10000: connect <= 3 s", f"{c:.2f} s", c <= 3)
    big = [n for n in t if n >= 1000 and get(t, n, "rss_per_stream_kib") is not None]
    for n in sorted(big):
        kib = get(t, n, "rss_per_stream_kib")
        check(f"N={n}: RSS per idle stream <= 12 KiB", f"{kib:.1f} KiB", kib <= 12)
    if 1 in t and get(t, 1, "lat_p50_ms") is not None:
        p50 = get(t, 1, "lat_p50_ms")
        check("N=1: p50 <= 1 ms", f"{p50:.3f} ms", p50 <= 1)
    return "\n".join(["| target | twistedsse | |", "|---|---|---|"] + rows)


def redisTargets(summary: dict[str, dict[int, dict[str, Any]]]) -> str:
    """
    Issue 11's targets, checked on the medians: each Redis-mode layout
    against in-memory twistedsse of the same run.
    """
    memory = summary.get("twistedsse", {})
    rows = []

    def check(name: str, value: str, ok: bool | None) -> None:
        rows.append(f"| {name} | {value} | {'-' if ok is None else ('met' if ok else 'NOT met')} |")

    for kind in REDIS_LAYOUTS:
        cells = summary.get(kind)
        if not cells:
            continue
        label = SERVERS[kind]
        if 1 in cells and cells[1].get("lat_p50_ms") is not None:
            p50, ref = cells[1]["lat_p50_ms"], memory.get(1, {}).get("lat_p50_ms")
            check(f"{label}, N=1: p50 within +1 ms of in-memory",
                  f"{p50:.2f} ms vs {fmt(ref, '{:.2f}')} ms" + (f" ({p50 - ref:+.2f} ms)" if ref is not None else ""),
                  p50 <= ref + 1 if ref is not None else None)  # fmt: skip
        for n in sorted(cells):
            cpu, ref = cells[n].get("cpu_ms_per_1000"), memory.get(n, {}).get("cpu_ms_per_1000")
            if n >= 1000 and cpu is not None:
                check(f"{label}, N={n}: CPU/delivery within 1.2x of in-memory",
                      f"{cpu:.2f} us vs {fmt(ref, '{:.2f}')} us" + (f" (x{cpu / ref:.2f})" if ref else ""),
                      cpu <= 1.2 * ref if ref else None)  # fmt: skip
        # Only the N at which every web instance has streams (and so reads
        # the job): at N=1 the second of two instances has none.
        counted = sorted(n for n in cells if cells[n].get("redis_cmds_per_event") is not None
                         and n >= REDIS_LAYOUTS[kind].webs)  # fmt: skip
        if len(counted) >= 2:
            lo, hi = counted[0], counted[-1]
            a, b = cells[lo]["redis_cmds_per_event"], cells[hi]["redis_cmds_per_event"]
            check(f"{label}: Redis commands per event independent of N (N={hi} at most 1.1x N={lo})",
                  f"{a:.2f} at N={lo}, {b:.2f} at N={hi} (x{b / a:.2f})", b <= 1.1 * a if a else None)  # fmt: skip
        one = summary.get("twistedsse-redis", {})
        if REDIS_LAYOUTS[kind].webs > 1 and one:
            for n in sorted(cells):
                a, b = one.get(n, {}).get("redis_cmds_per_event"), cells[n].get("redis_cmds_per_event")
                if n >= REDIS_LAYOUTS[kind].webs and a is not None and b is not None:
                    xa = one[n].get(COMMAND_PREFIX + "xread") or 0
                    xb = cells[n].get(COMMAND_PREFIX + "xread") or 0
                    check(f"{label}, N={n}: Redis work per event grows with instances, not streams (against one web instance)",
                          f"{b:.2f} vs {a:.2f} commands/event ({b - a:+.2f}); XREAD {xb:.2f} vs {xa:.2f}", None)  # fmt: skip
        lost = [c.get("lost_max", c.get("lost")) for c in cells.values() if c.get("lost") is not None]
        if lost:
            check(f"{label}: every event delivered (every run, every N)", f"{max(lost):.0f} lost (worst run)", max(lost) == 0)
    return "\n".join(["| target (issue 11) | Redis mode vs in-memory (medians) | |", "|---|---|---|"] + rows)


def plot(summary: dict[str, dict[int, dict[str, Any]]], servers: list[str], paths: list[Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"twistedsse": "tab:blue", "twistedsse-no-eager": "tab:purple", "twistedsse-scraped": "tab:cyan", "twistedsse-log-streams": "tab:olive", "starlette": "tab:orange", "express": "tab:green",
               "c-floor": "tab:gray", "twistedsse-redis": "tab:red", "twistedsse-redis-2web": "tab:brown",
               "twistedsse-redis-all": "tab:pink"}  # fmt: skip
    for s in servers:
        cells = summary.get(s, {})
        ns = sorted(n for n in cells if cells[n].get("lat_p50_ms") is not None)
        if not ns:
            continue
        c = colours.get(s)
        left.plot(ns, [cells[n]["lat_p50_ms"] for n in ns], "o-", color=c, label=f"{SERVERS[s]} p50")
        left.plot(ns, [cells[n]["lat_p99_ms"] for n in ns], "s--", color=c, label=f"{SERVERS[s]} p99")
        cn = [n for n in ns if cells[n].get("cpu_ms_per_1000") is not None]
        right.plot(cn, [cells[n]["cpu_ms_per_1000"] for n in cn], "o-", color=c, label=SERVERS[s])
    left.set(xscale="log", yscale="log", xlabel="subscribers N", ylabel="ms",
             title="latency: line printed -> client has the event")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="subscribers N", ylabel="us of server CPU per delivery",
              title="server CPU per delivered event (at N=1: per-event costs)")  # fmt: skip
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)


# -- machine ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def output(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None

    try:
        express = json.loads((EXPRESS / "node_modules" / "express" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        express = None

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "twistedsse"],
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
    except OSError:
        rev, dirty = None, None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "twistedsse_git": rev,
        "twistedsse_dirty": dirty,
        "sse_starlette": version("sse-starlette"),
        "starlette": version("starlette"),
        "uvicorn": version("uvicorn"),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "node": output([nodePath(), "--version"]),
        "express": express,
        "gcc": output(["gcc", "-dumpfullversion"]),
        "redis_server": output([shutil.which("redis-server") or "redis-server", "--version"]),
        "txredisapi": version("txredisapi"),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
    }


def machineLine(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Linux {m['kernel']}; Python {m['python']}; "
        f"Twisted {m['twisted']}; twistedsse {m['twistedsse_git']}{' (+local changes)' if m['twistedsse_dirty'] else ''}; "
        f"sse-starlette {m['sse_starlette']}, starlette {m['starlette']}, uvicorn {m['uvicorn']} "
        f"(uvloop {m['uvloop']}, httptools {m['httptools']}); "
        + (f"Node.js {m['node']}, Express {m.get('express')}; " if m.get("node") else "")
        + (f"C floor built by gcc {m['gcc']} -O2; " if m.get("gcc") else "")
        + (f"{m['redis_server']}; txredisapi {m.get('txredisapi')}; " if m.get("redis_server") else "")
        + f"load average at start {m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', (0,))[0]:.2f}"
    )


PLUMBING = frozenset({
    "<module>", "run", "runApp", "ApplicationRunner.run", "UnixApplicationRunner.postApplication",
    "ApplicationRunner.startReactor", "runReactorWithLogging", "ReactorBase.run", "ReactorBase.mainLoop",
    "EPollReactor.doPoll", "callWithLogger", "callWithContext", "ContextTracker.callWithContext",
    "ThreadedContextTracker.callWithContext", "_PollLikeMixin._doReadOrWrite",
})  # fmt: skip


def profileReport(p: dict[str, Any], top: int = 15) -> str:
    run = p.get("run") or {}
    if p.get("phase") == "connect":
        lines = [
            f"py-spy, mode {p['mode']}, CONNECT phase (accepting the N streams): {p['samples']} samples; raw: {p['raw']}",
            f"(that run: connect {fmt(run.get('connect_s'), '{:.3f}')} s)",
        ]
        sections = [("self_top", "self time", p["samples"]), ("total_top", "total (inclusive) time", p["samples"])]
    else:
        lines = [
            f"py-spy, mode {p['mode']}, EVENT window: {p['samples']} samples, {p['fanout_samples']} in the fan-out "
            f"(below MemoryBroker.publish or FileDescriptor.doWrite); raw: {p['raw']}",
            f"(that run, perturbed by the profiler: p50 {fmt(run.get('lat_p50_ms'), '{:.2f}')} ms, "
            f"CPU {fmt(run.get('cpu_ms_per_1000'), '{:.2f}')} us/delivery, server busy {fmt(run.get('server_busy'), '{:.0%}')})",
        ]  # fmt: skip
        sections = [
            ("self_top", "self time, whole process", p["samples"]),
            ("fanout_self_top", "self time within the fan-out", p["fanout_samples"]),
            ("total_top", "total (inclusive) time, whole process", p["samples"]),
        ]
    for key, title, whole in sections:
        lines.append(f"\n{title} ({whole} samples):")
        rows = p[key]
        if key == "total_top":
            # Skip the frames that only lead to the work (twistd's run, the
            # reactor's loop and its dispatch to a descriptor).
            rows = [r for r in rows if r["function"].split(" (", 1)[0] not in PLUMBING and not r["function"].startswith("0x")]
        for row in rows[:top]:
            lines.append(f"  {row['share']:6.1%}  {row['samples']:6d}  {row['function']}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------


def report(document: dict[str, Any], plotTo: list[Path] | None = None) -> None:
    """
    Print a run's table, targets and profiles (from its JSON document);
    draw its plot if asked.
    """
    config, info = document["config"], document["machine"]
    summary = {s: {int(n): cell for n, cell in cells.items()} for s, cells in document["summary"].items()}
    runs, ns, servers = config["runs"], config["ns"], config["servers"]
    every = f"{config['events']} events every {config['interval_s'] * 1000:g} ms"
    print(f"\n## Fan-out benchmark {document['stamp']}: {every}, median of {runs} run(s)\n")
    print(f"Machine: {machineLine(info)}.\n")
    if summary:
        print(table(summary, ns, servers))
        base = ratioBase(servers)
        redisColumns = base == "twistedsse" and any(s in REDIS_LAYOUTS for s in servers)
        print(f"\nratio = {base} / each other server (below 1: {base} lower)"
              + ("; for a Redis-mode server, Redis mode / in-memory (above 1: Redis mode higher)" if redisColumns else "")
              + ".\n" if len(servers) > 1 else "")  # fmt: skip
        if "twistedsse" in summary:
            print(targets(summary))
        if any(s in summary for s in REDIS_LAYOUTS):
            print(redisTargets(summary))
        if plotTo:
            title = f"{document['stamp']}: {every}, median of {runs}; {info['cpu']}, load {info['loadavg_start'][0]:.1f}"
            plot(summary, servers, plotTo, title)
            print(f"\nplot: {', '.join(str(p.relative_to(ROOT)) for p in plotTo)}")
    for profile in document.get("profiles") or []:
        print("\n" + (cprofileReport(profile) if profile.get("mode") == "cprofile" else profileReport(profile)))


def pooled(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One results document from several runs of the same matrix (same
    events, interval, N and servers): every run, the medians over all of
    them, the first machine's description with the lowest start and the
    highest end load average.
    """
    if len(documents) == 1:
        return documents[0]
    first = documents[0]
    same = ("events", "interval_s")
    for d in documents[1:]:
        if any(d["config"][k] != first["config"][k] for k in same):
            raise SystemExit(f"--report: {d['stamp']} is not the same matrix as {first['stamp']} ({', '.join(same)})")
    runs = [r for d in documents for r in d["runs"]]
    servers = list(dict.fromkeys(s for d in documents for s in d["config"]["servers"]))
    ns = sorted({n for d in documents for n in d["config"]["ns"]})
    summary = summarise([r for r in runs if not r.get("profile")])
    info = dict(first["machine"])
    info["loadavg_start"] = min((d["machine"]["loadavg_start"] for d in documents), key=lambda l: l[0])
    info["loadavg_end"] = max((d["machine"].get("loadavg_end", (0,)) for d in documents), key=lambda l: l[0])
    config = {**first["config"], "servers": servers, "ns": ns,
              "runs": sum(d["config"]["runs"] for d in documents)}  # fmt: skip
    return {
        "stamp": " + ".join(d["stamp"] for d in documents), "machine": info, "config": config,
        "summary": {s: {str(n): cell for n, cell in cells.items()} for s, cells in summary.items()},
        "runs": runs, "profiles": [p for d in documents for p in d.get("profiles") or []],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="twistedsse fan-out benchmark (issue 5); see bench/README.md")
    parser.add_argument("--client", required=True, help="the built load client (bench/run passes it)")
    parser.add_argument("--report", metavar="JSON", nargs="+",
                        help="only print the table and profiles of a results file; of several (runs of the same "
                        "matrix), the medians over all their runs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="N = 1,100,1000, 1 run, no profile")
    parser.add_argument("--ns", help="comma-separated subscriber counts (default: 1,100,1000,5000,10000)")
    parser.add_argument("--runs", type=int, help="runs per (server, N); the table shows medians (default 3)")
    parser.add_argument("--servers", default=DEFAULT_SERVERS,
                        help=f"which servers, any of {', '.join(SERVERS)} (default all: {DEFAULT_SERVERS})")  # fmt: skip
    parser.add_argument("--events", type=int, default=50, help="progress events per render (default 50)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between events (default 0.05)")
    parser.add_argument("--concurrency", type=int, default=1000, help="client connects in flight (default 1000)")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds, past the render's own length, "
                        "for every stream to end (default 120)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between connected and the idle RSS reading")
    parser.add_argument("--profile", action="store_true", help="also profile twistedsse with py-spy (default in a full run)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--profile-n", type=int, default=1000)
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    parser.add_argument("--profile-modes", default="native,nonblocking",
                        help="py-spy runs, each a separate server run: native (pauses the server per sample, C frames "
                        "too), python (pauses, Python frames), nonblocking (never pauses, Python frames); or cprofile "
                        "(every twistd process of the server under bench/cprofiled.py, the event window only; where "
                        "py-spy cannot attach); default native,nonblocking")  # fmt: skip
    parser.add_argument("--profile-servers", default="twistedsse",
                        help="which servers the profile runs are of (twistd ones; py-spy attaches to the first web "
                        "instance, cprofile profiles every twistd process); default twistedsse")  # fmt: skip
    parser.add_argument("--redis-pin", choices=("server", "split", "none"), default="server",
                        help="Redis mode: every process on the server core (server, default, as in memory); "
                        "redis-server and the worker on the client's core (split); unpinned (none)")  # fmt: skip
    parser.add_argument("--redis-monitor", action="store_true",
                        help="Redis mode: record the event window with MONITOR (redis-cli, on the client core) to "
                        "split each latency at the moment Redis ran the publish: render line -> Redis (the worker), "
                        "Redis -> client (the web instance). MONITOR costs Redis work: a diagnostic")  # fmt: skip
    parser.add_argument("--redis-aof", action="store_true",
                        help="Redis mode: redis-server with AOF (appendfsync everysec); default no persistence")  # fmt: skip
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between two GET /metrics of the twistedsse-scraped server (default 1: "
                        "a Prometheus scrapes every 15-60 s; often, to make any cost visible)")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores 0 and 1")
    parser.add_argument("--keep", action="store_true", help="keep logs and raw files in bench/results/<ts>.tmp/")
    args = parser.parse_args()
    if args.report:
        report(pooled([json.loads(Path(f).read_text()) for f in args.report]))
        return

    ns = [int(x) for x in args.ns.split(",")] if args.ns else (QUICK_NS if args.quick else FULL_NS)
    runs = args.runs or (1 if args.quick else 3)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
    if not servers:
        parser.error("--servers names none")
    profileServers = [s.strip() for s in args.profile_servers.split(",") if s.strip()]
    for s in profileServers:
        if s not in TWISTD_KINDS:
            parser.error(f"--profile-servers: {s!r} is not a twistd server (known: {', '.join(sorted(TWISTD_KINDS))})")
    problems = missingServers(servers + profileServers)
    if problems:
        parser.error("; ".join(problems))
    doProfile = args.profile_only or (args.profile or not args.quick) and not args.no_profile
    limit = raiseNoFile(max(ns + [args.profile_n]) + 1024)
    if limit < max(ns) + 100:
        sys.exit(f"harness: RLIMIT_NOFILE is {limit}; N={max(ns)} needs more (ulimit -n / prlimit)")

    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    workdir = RESULTS / f"{stamp}.tmp"
    workdir.mkdir()
    info = machine()
    log(f"machine: {machineLine({**info, 'loadavg_end': os.getloadavg()})}")
    log(f"matrix: N={ns}, {runs} run(s), servers {servers}, {args.events} events every {args.interval * 1000:g} ms"
        f"{'; then profiles (' + args.profile_modes + ') at N=' + str(args.profile_n) if doProfile else ''}")  # fmt: skip

    results: list[dict[str, Any]] = []
    started = time.monotonic()
    if not args.profile_only:
        for n in ns:
            for run in range(runs):
                # Alternate which server goes first, so drift hits both alike.
                order = servers if run % 2 == 0 else servers[::-1]
                for kind in order:
                    t = time.monotonic()
                    r = measure(kind, n, run, args, workdir)
                    results.append(r)
                    log(f"  {kind:10s} N={n:<6d} run {run + 1}/{runs}: " + (
                        f"ERROR {r['error']}" if "error" in r else
                        f"p50 {fmt(r.get('lat_p50_ms'), '{:.2f}')} ms, p99 {fmt(r.get('lat_p99_ms'), '{:.2f}')} ms, "
                        f"lost {r.get('lost')}, CPU {fmt(r.get('cpu_ms_per_1000'), '{:.2f}')} us/delivery, "
                        f"{fmt(r.get('rss_per_stream_kib'), '{:.1f}')} KiB/stream, connect {fmt(r.get('connect_s'), '{:.3f}')} s, "
                        f"client busy {fmt(r.get('client_busy'), '{:.0%}')}"
                        + (f", Redis {r['redis_cmds_per_event']:.2f} commands/event" if "redis_cmds_per_event" in r else "")
                        + f"; load {r['loadavg'][0]:.2f} ({time.monotonic() - t:.0f} s)"
                    ))  # fmt: skip
                    time.sleep(1)

    profiles: list[dict[str, Any]] = []
    if doProfile:
        for kind in profileServers:
            for mode in [m.strip() for m in args.profile_modes.split(",") if m.strip()]:
                if mode not in PROFILE_MODES and mode != "cprofile":
                    log(f"unknown profile mode {mode!r} (known: {', '.join(PROFILE_MODES)}, cprofile)")
                    continue
                log(f"profiling {kind} at N={args.profile_n} with {'cProfile' if mode == 'cprofile' else 'py-spy'} ({mode})")
                r = measure(kind, args.profile_n, 0, args, workdir, profile=mode)
                results.append(r)
                if mode == "cprofile":
                    if "cprofile" not in r:
                        log(f"  profile failed: {r.get('error')}")
                        continue
                    for label, p in r["cprofile"].items():
                        if "raw" in p:
                            keep = RESULTS / f"{stamp}.cprofile-{kind}-{label}.pstats"
                            shutil.copy(p["raw"], keep)
                            p["raw"] = str(keep.relative_to(ROOT))
                    profiles.append({"mode": "cprofile", **{k: v for k, v in r.items() if k not in ("connected", "done")}})
                    time.sleep(1)
                    continue
                profile = r.get("pyspy")
                if profile is None:
                    log(f"  profile failed: {r.get('error')}")
                    continue
                keep = RESULTS / f"{stamp}.pyspy-{profile['mode']}.txt"
                shutil.copy(profile["raw"], keep)
                profile["raw"] = str(keep.relative_to(ROOT))
                profile["run"] = {k: r.get(k) for k in ("lat_p50_ms", "lat_p99_ms", "cpu_ms_per_1000", "server_busy", "connect_s")}
                profiles.append(profile)
                connect = r.get("pyspy_connect")
                if connect is not None:
                    keep = RESULTS / f"{stamp}.pyspy-{connect['mode']}-connect.txt"
                    shutil.copy(connect["raw"], keep)
                    connect["raw"] = str(keep.relative_to(ROOT))
                    connect["phase"] = "connect"
                    connect["run"] = profile["run"]
                    profiles.append(connect)
                time.sleep(1)

    info["loadavg_end"] = os.getloadavg()
    info["took_s"] = round(time.monotonic() - started, 1)
    summary = summarise(results)
    config = {
        "ns": ns, "runs": runs, "servers": servers, "events": args.events, "interval_s": args.interval,
        "concurrency": args.concurrency, "backlog": BACKLOG, "pinned": not args.no_pin,
        "server_core": SERVER_CORE, "client_core": CLIENT_CORE, "quick": args.quick,
    }  # fmt: skip
    document = {
        "stamp": stamp, "machine": info, "config": config,
        "summary": {s: {str(n): cell for n, cell in cells.items()} for s, cells in summary.items()},
        "runs": results, "profiles": profiles,
    }  # fmt: skip
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(document, indent=1, default=str) + "\n")

    report(document, plotTo=[RESULTS / f"{stamp}.png", RESULTS / "latest.png"])
    print(f"results: {out.relative_to(ROOT)}")
    if not args.keep and not any("error" in r for r in results):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs: {workdir.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

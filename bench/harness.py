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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

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
    "starlette": "sse-starlette + uvicorn",
    "express": "Express (Node.js)",
    "c-floor": "C epoll floor",
}
DEFAULT_SERVERS = "twistedsse,starlette,express,c-floor"

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
    if "c-floor" in servers and not os.access(FLOOR, os.X_OK):
        problems.append(f"c-floor: {FLOOR.relative_to(ROOT)} is not built (bench/run builds it)")
    return problems


class Server:
    """
    One server under test, in its own session, pinned to the server core,
    with a descriptor limit for 10 000+ streams.
    """

    def __init__(self, kind: str, workdir: Path, core: int | None, name: str) -> None:
        self.kind = kind
        self.port = freePort()
        self.logPath = workdir / f"{name}.log"
        emit = f"{PYTHON} -u {BENCH / 'emit.py'}"
        if kind in ("twistedsse", "twistedsse-no-eager"):
            argv = [
                str(VENV / "bin" / "twistd"), "-n", "--pidfile=", "twistedsse",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog={BACKLOG}",
                "--renderer", f"emit={emit}",
                # No caps (0): the descriptor limit raised above is the bound;
                # a cap over what it holds would be refused at start.
                "--max-streams", "0", "--max-streams-per-job", "0", "--max-connections", "0",
                "--keepalive", "15",
            ]  # fmt: skip
            if kind == "twistedsse-no-eager":
                argv.append("--no-eager-send")
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

    def waitReady(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({self.process.returncode}): {self.logTail()}")
            try:
                with urllib.request.urlopen(self.url("/renderers"), timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} not ready within {timeout:.0f} s: {self.logTail()}")

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
        stopProcess(self.process, self.kind, group=True)
        self.logFile.close()


# -- one measurement --------------------------------------------------------


def measure(kind: str, n: int, run: int, args: argparse.Namespace, workdir: Path,
            profile: str | None = None) -> dict[str, Any]:  # fmt: skip
    name = f"{kind}-n{n}-r{run}{'-profile-' + profile if profile else ''}"
    result: dict[str, Any] = {"server": kind, "n": n, "run": run, "profile": profile}
    cores = os.cpu_count() or 1
    serverCore = SERVER_CORE if cores >= 2 and not args.no_pin else None
    clientCore = CLIENT_CORE if cores >= 2 and not args.no_pin else None
    startFile = workdir / f"{name}.go"
    binPath = workdir / f"{name}.bin"
    server = Server(kind, workdir, serverCore, name)
    client: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    reader: LineReader | None = None
    try:
        server.waitReady()
        time.sleep(0.3)
        eventWindow = args.events * args.interval
        job = server.post("/renders", {
            "renderer": "emit",
            "params": {
                "count": args.events, "interval": args.interval, "start_file": str(startFile),
                "start_timeout": args.connect_timeout + 60,
            },
        })  # fmt: skip
        time.sleep(0.3)
        base = vmStatus(server.pid)
        result["server_nofile"] = openFilesLimit(server.pid)
        if profile:
            # The connect phase first (the accept path), then the event window.
            spy = startSpy(server.pid, workdir / f"{name}.connect.pyspy.txt", clientCore, args, profile)
        clientLog = open(workdir / f"{name}.client.log", "wb")
        client = subprocess.Popen(
            [
                args.client, "--port", str(server.port), "--path", job["events_url"], "-n", str(n),
                "--events", str(args.events), "--out", str(binPath),
                "--concurrency", str(args.concurrency), "--connect-timeout", str(args.connect_timeout),
                "--timeout", str(eventWindow + args.timeout),
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=clientLog, preexec_fn=pinned(clientCore),
        )  # fmt: skip
        reader = LineReader(client.stdout)
        connected = json.loads(reader.expect("CONNECTED", args.connect_timeout + 30))
        if spy is not None:
            result["pyspy_connect"] = finishSpy(spy, workdir / f"{name}.connect.pyspy.txt")
            spy = None
        time.sleep(args.settle)
        idle = vmStatus(server.pid)
        if profile:
            spy = startSpy(server.pid, workdir / f"{name}.pyspy.txt", clientCore, args, profile)
        cpu0 = cpuTimes(server.pid)
        client0 = cpuTimes(client.pid)
        triggered = time.time_ns()
        startFile.touch()
        done = json.loads(reader.expect("DONE", eventWindow + args.timeout + 30))
        cpu1 = cpuTimes(server.pid)
        client1 = cpuTimes(client.pid)
        result["cpu_read_ns"] = time.time_ns()
        if "waited" in cpu0:
            result["server_waited_ms"] = (cpu1["waited"] - cpu0["waited"]) * 1000
            result["client_waited_ms"] = (client1["waited"] - client0["waited"]) * 1000
        after = vmStatus(server.pid)
        if spy is not None:
            result["pyspy"] = finishSpy(spy, workdir / f"{name}.pyspy.txt")
            spy = None
        reader.expect("WRITTEN", 60)
        assert client.stdin is not None
        client.stdin.write(b"quit\n")
        client.stdin.close()
        client.wait(30)
        result.update(connected=connected, done=done, triggered_ns=triggered)
        result.update(
            rss_base_kib=base["VmRSS"], rss_idle_kib=idle["VmRSS"], rss_after_kib=after["VmRSS"],
            rss_peak_kib=after["VmHWM"],
            cpu_stat_s=cpu1["stat"] - cpu0["stat"],
            cpu_sched_s=(cpu1["sched"] - cpu0["sched"]) if "sched" in cpu0 else None,
        )  # fmt: skip
        result.update(analyse(binPath, n, args.events, result))
    except Exception as e:  # one failed run must not end the matrix
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"  {name}: {result['error']}\n  server log tail:\n{server.logTail()}")
    finally:
        if spy is not None:
            stopProcess(spy, "py-spy", grace=10)
        if client is not None and client.poll() is None:
            stopProcess(client, "sseload", grace=10)
        if reader is not None:
            reader.close()
        server.stop()
        startFile.unlink(missing_ok=True)
        if not args.keep:
            binPath.unlink(missing_ok=True)
    return result


def analyse(path: Path, n: int, k: int, result: dict[str, Any]) -> dict[str, Any]:
    raw = np.fromfile(path, dtype=np.int64)
    kSeen, nConns = int(raw[0]), int(raw[1])
    tns = raw[2 : 2 + kSeen]
    recv = raw[2 + kSeen :].reshape(kSeen, nConns)
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
    if nConns > 1:
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
    ("server_busy", "server core busy in event window", "{:.0%}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("connect_s", "connect time, N streams (s)", "{:.3f}"),
    ("client_busy", "load client core busy (its share)", "{:.0%}"),
    ("server_waited_ms", "server runnable, waiting for its core (ms; noise)", "{:.0f}"),
    ("client_waited_ms", "client runnable, waiting for its core (ms; noise)", "{:.0f}"),
]


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
    for cells in summary.values():
        for cell in cells.values():
            values = cell.pop("_values", {})
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
    head = ["N", "metric"] + [SERVERS[s] for s in servers] + [f"ratio {base}/{s}" for s in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in ns:
        for key, label, pattern in METRICS:
            row = [str(n), label]
            values = {s: summary.get(s, {}).get(n, {}).get(key) for s in servers}
            row += [fmt(values[s], pattern) for s in servers]
            x = values[base]
            for s in others:
                y = values[s]
                row.append(f"{x / y:.2f}" if x is not None and y not in (None, 0) else "-")
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


def plot(summary: dict[str, dict[int, dict[str, Any]]], servers: list[str], paths: list[Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"twistedsse": "tab:blue", "twistedsse-no-eager": "tab:purple", "starlette": "tab:orange", "express": "tab:green", "c-floor": "tab:gray"}
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
        print(f"\nratio = {base} / each other server (below 1: {base} lower).\n" if len(servers) > 1 else "")
        if "twistedsse" in summary:
            print(targets(summary))
        if plotTo:
            title = f"{document['stamp']}: {every}, median of {runs}; {info['cpu']}, load {info['loadavg_start'][0]:.1f}"
            plot(summary, servers, plotTo, title)
            print(f"\nplot: {', '.join(str(p.relative_to(ROOT)) for p in plotTo)}")
    for profile in document.get("profiles") or []:
        print("\n" + profileReport(profile))


def main() -> None:
    parser = argparse.ArgumentParser(description="twistedsse fan-out benchmark (issue 5); see bench/README.md")
    parser.add_argument("--client", required=True, help="the built load client (bench/run passes it)")
    parser.add_argument("--report", metavar="JSON", help="only print the table and profiles of a results file")
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
                        "too), python (pauses, Python frames), nonblocking (never pauses, Python frames); "
                        "default native,nonblocking")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores 0 and 1")
    parser.add_argument("--keep", action="store_true", help="keep logs and raw files in bench/results/<ts>.tmp/")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return

    ns = [int(x) for x in args.ns.split(",")] if args.ns else (QUICK_NS if args.quick else FULL_NS)
    runs = args.runs or (1 if args.quick else 3)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
    if not servers:
        parser.error("--servers names none")
    problems = missingServers(servers)
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
        f"{'; then a py-spy profile at N=' + str(args.profile_n) if doProfile else ''}")  # fmt: skip

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
                        f"client busy {fmt(r.get('client_busy'), '{:.0%}')} ({time.monotonic() - t:.0f} s)"
                    ))  # fmt: skip
                    time.sleep(1)

    profiles: list[dict[str, Any]] = []
    if doProfile:
        for mode in [m.strip() for m in args.profile_modes.split(",") if m.strip()]:
            if mode not in PROFILE_MODES:
                log(f"unknown profile mode {mode!r} (known: {', '.join(PROFILE_MODES)})")
                continue
            log(f"profiling twistedsse at N={args.profile_n} with py-spy ({mode})")
            r = measure("twistedsse", args.profile_n, 0, args, workdir, profile=mode)
            results.append(r)
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

"""
A real network hop, as between containers: two network namespaces joined
by a veth pair, the server in one and its clients in the other; and the
two clients the browser and proxy tests measure with (the socket client,
and the demo page in a real browser), run here or inside a namespace.

Each namespace holds only C{lo} and its end of the veth, addressed from a
private /30 that exists nowhere but in them, and has no route anywhere
else: whatever runs in it can reach nothing but the other namespace.
The veth is created with its ends already in the namespaces, so the
host's own network never sees it.

Run as C{python -m tests.browsers._netns ENGINE URL COUNT START_FILE}
(inside a namespace, with C{ip netns exec}: L{browserClient}), this module
loads the demo page in a browser and prints what L{pageRender} returns as
JSON: the browser and its driver then live in the namespace, not just the
page's connections.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from tests._support.stats import summary

from tests._support.launcher import ROOT, childEnv
from tests._support.waiting import poll
from ._drivers import pollInPage
from tests._support.need import need, needProgram

CLIENT = str(ROOT / "tests" / "_support" / "sseclient.py")
BOUND_MS = 100.0

#: The /30 that joins the two namespaces: the server's address, the client's.
SERVER_ADDRESS = "10.203.0.1"
CLIENT_ADDRESS = "10.203.0.2"
PREFIX_LENGTH = 30

_serial = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def inNamespace(argv: Sequence[str], netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


class NamespacePair:
    """
    Two network namespaces, C{.server} and C{.client}, joined by a veth pair
    (L{SERVER_ADDRESS} and L{CLIENT_ADDRESS}), C{lo} up in both. Names carry
    our PID and a serial number, so parallel runs never share one.

    L{remove} deletes them (and with them the veth) whatever happened, after
    killing, by PID, anything still running in them: only our tests start
    processes there.
    """

    def __init__(self) -> None:
        needProgram("ip")
        tag = f"{os.getpid()}x{next(_serial)}"
        self.server = f"twistedsse-{tag}-server"
        self.client = f"twistedsse-{tag}-client"
        # Interface names: at most 15 bytes.
        self.serverLink, self.clientLink = f"tss{tag}", f"tsc{tag}"
        self.created: list[str] = []
        refused = ip("netns", "add", self.server, check=False)
        if refused.returncode != 0:
            need(False, f"the kernel refused a network namespace ({refused.stderr.strip()})")
        self.created.append(self.server)
        try:
            ip("netns", "add", self.client)
            self.created.append(self.client)
            ip("link", "add", self.serverLink, "netns", self.server, "type", "veth",
               "peer", "name", self.clientLink, "netns", self.client)
            for netns, link, address in (
                (self.server, self.serverLink, SERVER_ADDRESS),
                (self.client, self.clientLink, CLIENT_ADDRESS),
            ):
                ip("-n", netns, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", link)
                ip("-n", netns, "link", "set", link, "up")
                ip("-n", netns, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def receivedBytes(self) -> int:
        """
        Bytes received so far by the client's end of the veth.
        """
        shown = json.loads(ip("-n", self.client, "-s", "-j", "link", "show", self.clientLink).stdout)
        return int(shown[0]["stats64"]["rx"]["bytes"])

    def identity(self, netns: str) -> str:
        """
        What C{/proc/PID/ns/net} reads for a process in C{netns}.
        """
        return f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"

    def pids(self, netns: str) -> list[int]:
        listed = ip("netns", "pids", netns, check=False)
        return [int(pid) for pid in listed.stdout.split()]

    def remove(self) -> None:
        leftovers = [pid for netns in self.created for pid in self.pids(netns)]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        poll(lambda: not any(self.pids(netns) for netns in self.created), 5)
        # Deleting a namespace destroys the veth end in it, and so its peer.
        for netns in reversed(self.created):
            ip("netns", "delete", netns, check=False)
        self.created = []
        if leftovers:
            raise AssertionError(f"processes left running in the namespaces were killed: {leftovers}")


# ------------------------------------------------------------------ clients


def renderStreamURL(base: str, **params: Any) -> str:
    return f"{base}/render-stream?renderer=ticks&params={quote(json.dumps(params))}"


def socketClient(url: str, netns: str | None = None, http10: bool = False, timeout: float = 30) -> list[dict]:
    """
    Run the socket client (tests/_support/sseclient.py) in its own
    process, inside C{netns} if given: its JSON lines, the response head
    first.
    """
    argv = [sys.executable, CLIENT, *(["--http1.0"] if http10 else []), url]
    done = subprocess.run(inNamespace(argv, netns), capture_output=True, env=childEnv(), timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"socket client exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return [json.loads(line) for line in done.stdout.splitlines()]


def socketLatencies(lines: list[dict]) -> list[float]:
    """
    Milliseconds from the render printing each progress event to the socket
    client receiving it.
    """
    return [
        (line["t_ns"] - json.loads(line["data"])["t_ns"]) / 1e6 for line in lines if line.get("event") == "progress"
    ]


def late(latencies: list[float]) -> list[tuple[int, float]]:
    """
    The check every test makes: the events later than L{BOUND_MS}, as (i,
    ms), i counting from 1 (the ticker's own C{i}, once the order is
    checked).
    """
    return [(i, round(ms, 1)) for i, ms in enumerate(latencies, 1) if ms > BOUND_MS]


# Settles once the page's EventSource is open and a frame has been painted
# since: WebKit's first paint holds its main thread for hundreds of ms, and
# events arriving meanwhile wait for it.
WAIT_CONNECTED = pollInPage(
    "window.twistedsse",
    "v && v.connections > 0",
    "requestAnimationFrame(function () { requestAnimationFrame(resolve); })",
    '"no EventSource open after 20 s; state " + (v && v.state)',
    20,
    every=5,
)

WAIT_DONE = """window.twistedsse.done.then(function (end) {
  var api = window.twistedsse;
  return {end: end.type, state: api.state, connections: api.connections, reconnects: api.reconnects,
          events: api.events};
})"""


def pageRender(b: Any, base: str, count: int, startFile: str, token: str | None = None) -> dict:
    """
    Load the demo page at C{base}, have it start a C{ticks} render of
    C{count} events that waits for C{startFile}, create that file once the
    page's EventSource is open (so every event is live, none replayed), and
    return what the page saw: C{{end, state, connections, reconnects,
    events}}, each event C{{type, id, data, receivedAt}}.

    @param token: handed to the page in the URL fragment, as an app's
        backend hands it a scoped token (no server sees a fragment).
    """
    params = json.dumps({"count": count, "start_file": startFile})
    fragment = f"#access_token={token}" if token else ""
    b.open(f"{base}/?renderer=ticks&params={quote(params)}&autostart=1{fragment}")
    b.evaluate(WAIT_CONNECTED, timeout=30)
    Path(startFile).touch()
    return b.evaluate(WAIT_DONE, timeout=60)


def pageLatencies(seen: dict) -> list[float]:
    """
    Milliseconds from the render printing each progress event to the page
    receiving it (both wall clocks of this one machine).
    """
    return [e["receivedAt"] - e["data"]["t_ns"] / 1e6 for e in seen["events"] if e["type"] == "progress"]


def browserClient(engine: str, base: str, count: int, startFile: str, netns: str | None = None,
                  timeout: float = 120, token: str | None = None) -> dict:
    """
    L{pageRender} in a process of its own, inside C{netns} if given.
    """
    argv = [sys.executable, "-m", "tests.browsers._netns", engine, base, str(count), startFile]
    argv += [token] if token else []
    process = subprocess.Popen(inNamespace(argv, netns), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=childEnv(), cwd=ROOT)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # TERM first: it quits its browser on the way out.
        process.terminate()
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        raise AssertionError(f"{engine} client did not finish in {timeout} s: {err.decode(errors='replace')[-3000:]}")
    if process.returncode == 77:
        need(False, err.decode(errors="replace").strip().splitlines()[-1])
    if process.returncode != 0:
        raise AssertionError(f"{engine} client exited {process.returncode}: {err.decode(errors='replace')[-3000:]}")
    return json.loads(out)


def namespaceOf(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class Measuring:
    """
    For trial TestCases, the checks the proxy and network tests share: one
    C{ticks} render of L{COUNT} events, read by the socket client or by the
    demo page, arrives whole and in order, and its latencies are reported.
    """

    COUNT = 50

    def report(self, what: str, latencies: list[float], reads: int | None = None) -> None:
        batches = f", arrived in {reads} reads" if reads is not None else ""
        sys.stderr.write(
            f"\n[latency] {what}: {summary(latencies)}, {len(late(latencies))} over {BOUND_MS:.0f} ms{batches}\n"
        )

    def stream(self, base: str, what: str, token: str | None = None, **kw: Any) -> tuple[dict, list[float]]:
        """
        One render through C{/render-stream} at C{base}, read by the socket
        client (L{socketClient}'s C{kw}): every event arrives, in order, then
        C{complete}. Reports and returns the response head and the latencies.

        Every event is live, none replayed: opening C{/render-stream} starts
        the render, so the stream is subscribed before the first line.

        @param token: sent as C{access_token}, as an EventSource would.
        """
        url = renderStreamURL(base, count=self.COUNT) + (f"&access_token={token}" if token else "")
        lines = socketClient(url, **kw)
        head, opening, events = lines[0], lines[1], lines[2:]
        self.assertEqual(head["status"], 200)
        self.assertEqual(opening["event"], "render")
        self.assertEqual([e["event"] for e in events], ["progress"] * self.COUNT + ["complete"])
        self.assertEqual([json.loads(e["data"])["i"] for e in events[:-1]], list(range(1, self.COUNT + 1)))
        latencies = socketLatencies(events)
        self.report(what, latencies, reads=len({e["t_ns"] for e in events}))
        return head, latencies

    def page(self, seen: dict, what: str) -> list[float]:
        """
        What L{pageRender} saw: one connection, every event in order, then
        C{complete}. Reports and returns the latencies.
        """
        self.assertEqual((seen["end"], seen["state"], seen["connections"]), ("complete", "succeeded", 1))
        self.assertEqual([e["type"] for e in seen["events"]], ["progress"] * self.COUNT + ["complete"])
        self.assertEqual([e["data"]["i"] for e in seen["events"][:-1]], list(range(1, self.COUNT + 1)))
        latencies = pageLatencies(seen)
        self.report(what, latencies)
        return latencies

    def assertOnTime(self, latencies: list[float]) -> None:
        self.assertEqual(late(latencies), [], summary(latencies))


def main(engine: str, base: str, count: str, startFile: str, token: str | None = None) -> None:
    from twisted.trial.unittest import SkipTest

    from ._drivers import browser
    from tests._support.procfs import descendants

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"{engine} client: SIGTERM")

    signal.signal(signal.SIGTERM, terminated)
    try:
        with browser(engine) as b:
            seen = pageRender(b, base, int(count), startFile, token)
            # Every process of the browser and its driver descends from us.
            seen["netns"] = sorted({namespaceOf(pid) for pid in [os.getpid(), *descendants(os.getpid())]} - {None})
    except SkipTest as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(77)
    sys.stdout.write(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""
Slow and dead clients cost the server a bounded amount of memory and never
slow the others down.

Each stream is a push producer: once a client's connection is full,
Twisted pauses it, and from then on it keeps only the latest progress
event and the terminal event. A client that reads nothing for
C{--write-timeout} seconds while paused is dropped.

The server runs in its own process (tests/browsers/serve.py), so its
resident memory and descriptors are read from C{/proc/PID}; the clients
are raw non-blocking sockets in this process (L{tests.load._load}).

The non-readers have a 4 KiB receive buffer and announce Ethernet's MSS:
over loopback's 64 KiB segments the server's kernel would take about 3 MB
for each before Twisted pauses its stream (see L{tests.load._load._socket}),
where over a real network it takes about 84 KB, and the test would measure
a loopback artefact (200 of them: 0.5 GB of kernel memory, and 2 s of the
server's time spent filling it).
"""

from __future__ import annotations

import time

from ._load import (
    BOUND_MS,
    ETHERNET_MSS,
    PACE,
    LoadTestCase,
    StreamClient,
    firstBreak,
    latencySummary,
    report,
)

#: A non-reading client's receive buffer: its window closes after a few KiB.
SMALL_RCVBUF = 4096

#: The bound on the server's memory growth during the slow-client run.
#: Expected: about 200 x 64 KiB (each paused stream's Twisted buffer, which
#: is where the pause triggers) = 12.5 MiB, plus per-connection objects.
#: Unbounded buffering would be the 20 MB stream kept per non-reader: 4 GB.
#: Even a leak of 256 KiB per non-reader passes 50 MiB.
RSS_GROWTH_BOUND_MIB = 64


class SlowClientTests(LoadTestCase):
    def test_slowReadersCoalescedWhileOthersStayRealTime(self) -> None:
        """
        While one render prints 20 000 events of about 1 KiB, one a
        millisecond, 200 clients join it (ten every 100 ms, resuming from
        the latest event) and then read nothing: they cost the server less
        than L{RSS_GROWTH_BOUND_MIB} MiB, and 20 reading clients get every
        event, ids 1..20 000 in order, each within 100 ms of the render
        printing it. When the 200 start reading (after the render ended)
        each gets what its connection held, an unbroken run from the event
        after the one it resumed from, then the latest progress (20 000)
        and C{complete}: the documented coalescing, with nothing in
        between.
        """
        count, slowCount, normalCount = 20_000, 200, 20
        waves, firstWave, spacing = 20, 0.5, 0.1
        # The slow ones must still be there when they start reading.
        started = self.heldRender(["--write-timeout", "300"], count=count, interval=0.001, pad=900)
        server, loop, job, memory = started.server, started.loop, started.job, started.memory
        normal = [StreamClient(loop, server.port, job["events_url"]) for _ in range(normalCount)]
        loop.run(lambda: all(c.sent for c in normal), 20, "sending the requests", memory.sample)
        server.waitFor("the readers subscribed", lambda h: h["subscribers"] == normalCount, 20)

        slow: list[StreamClient] = []

        def join() -> None:
            memory.sample()
            due = min(waves, int((time.monotonic() - start - firstWave) / spacing) + 1)
            while len(slow) < due * slowCount // waves:
                latest = normal[0].events[-1][0] if normal[0].events else None
                slow.append(
                    StreamClient(
                        loop, server.port, job["events_url"], read=False, rcvbuf=SMALL_RCVBUF, mss=ETHERNET_MSS,
                        lastEventID=latest,
                    )
                )  # fmt: skip

        started.go()
        start = time.monotonic()
        cpu = server.cpu()
        took = loop.run(lambda: all(c.closed for c in normal), 90, "the readers' streams", join, 0.01, PACE)
        cpu = server.cpu() - cpu
        latencies = [latency for client in normal for latency in client.latencies()]
        _, at = max(client.worst() for client in normal)
        report(
            f"slow clients: {count} events x ~1 KiB to {normalCount} readers + {len(slow)} non-readers in "
            f"{took:.1f} s (server CPU {cpu:.1f} s); readers' latency {latencySummary(latencies)} (the worst: "
            f"event {at}); server RSS baseline {memory.baseline / 1024:.1f} MiB, peak {memory.peak / 1024:.1f} "
            f"MiB (+{memory.growthMiB:.1f} MiB, {memory.samples} samples)"
        )
        for client in normal:
            self.assertEqual(client.status, 200)
            self.assertEqual(client.events[-1][1], "complete")
            ids = [int(e[0]) for e in client.events]
            self.assertEqual(firstBreak(ids, list(range(1, count + 2))), "", "a reader missed events")
            self.assertEqual(firstBreak(client.progress(), list(range(1, count + 1))), "")
        self.assertLessEqual(max(latencies), BOUND_MS, latencySummary(latencies))
        self.assertLess(memory.growthMiB, RSS_GROWTH_BOUND_MIB)
        self.assertEqual(len(slow), slowCount)
        self.assertEqual(server.health()["streams"], slowCount, "a non-reader's stream ended early")

        for client in slow:
            client.startReading(rcvbuf=1 << 20)
        took = loop.run(lambda: all(c.closed for c in slow), 60, "the slow clients' streams", memory.sample)
        held = []
        for client in slow:
            self.assertEqual(client.status, 200)
            self.assertEqual(client.events[-1][:2], (str(count + 1), "complete"))
            progress = client.progress()
            self.assertEqual(progress[-1], count, "the latest progress is not the last one printed")
            first = int(client.lastEventID or 0) + 1
            run = progress[:-1]
            self.assertEqual(firstBreak(run, list(range(first, first + len(run)))), "", "a gap before the latest")
            self.assertEqual(firstBreak([int(e[0]) for e in client.events[:-1]], progress), "")
            held.append(len(run))
        self.assertLess(max(held), count // 2, "the non-readers were never paused; the test proves nothing")
        report(
            f"slow clients: once reading, each got {min(held)} to {max(held)} events after the one it resumed "
            f"from (what its connection held), then 20000 and complete, in {took:.1f} s; server RSS peak "
            f"{memory.peak / 1024:.1f} MiB"
        )

        health = server.waitFor("all streams closed", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        self.assertEqual(health["renders"]["running"], 0)
        self.assertDescriptorsReleased(started, "slow clients")

    def test_deadReadersDroppedAfterWriteTimeout(self) -> None:
        """
        With C{--write-timeout 2}, 200 clients that never read are dropped
        about 2 s after their connections filled (none sooner), while the
        render and 5 reading clients go on: C{/healthz} counts only the 5
        streams, the dropped sockets were reset, and every descriptor is
        released once the render ends. The readers get every event.
        """
        count, deadCount, liveCount, timeout = 1200, 200, 5, 2.0
        started = self.heldRender(["--write-timeout", str(timeout)], count=count, interval=0.005, pad=900)
        server, loop, job, memory = started.server, started.loop, started.job, started.memory
        dead = [
            StreamClient(loop, server.port, job["events_url"], read=False, rcvbuf=SMALL_RCVBUF, mss=ETHERNET_MSS)
            for _ in range(deadCount)
        ]
        live = [StreamClient(loop, server.port, job["events_url"]) for _ in range(liveCount)]
        loop.run(lambda: all(c.sent for c in dead + live), 20, "sending the requests", memory.sample)
        server.waitFor("everyone subscribed", lambda h: h["subscribers"] == deadCount + liveCount, 20)
        fdsOpen = server.fds()

        started.go()
        start = time.monotonic()
        seen: list[tuple[float, int]] = []

        def watch() -> None:
            memory.sample()
            seen.append((time.monotonic() - start, server.health()["streams"]))

        loop.run(lambda: bool(seen) and seen[-1][1] <= liveCount, timeout + 10, "dropping the dead", watch, 0.05)
        firstDrop = next(t for t, streams in seen if streams < deadCount + liveCount)
        allDropped = seen[-1][0]
        fdsDropped = server.fds()
        running = server.state(job)
        report(
            f"dead clients: --write-timeout {timeout:g}: first drop {firstDrop:.2f} s after the render started, "
            f"all {deadCount} dropped by {allDropped:.2f} s; server fds {started.fdsBefore} before, {fdsOpen} with "
            f"{deadCount + liveCount} streams, {fdsDropped} after the drops; RSS +{memory.growthMiB:.1f} MiB"
        )
        self.assertGreaterEqual(firstDrop, timeout, "a stream was dropped before it had stalled that long")
        self.assertEqual(running, "running", "the render ended before the drops: they prove nothing")
        self.assertEqual(server.health()["subscribers"], liveCount)
        self.assertLessEqual(fdsDropped, fdsOpen - deadCount + 3)
        self.assertFalse(any(c.closed for c in live))

        for client in dead:
            client.startReading()
        loop.run(lambda: all(c.closed for c in dead + live), 30, "the end of the render", memory.sample, 0.02, PACE)
        for client in dead:
            self.assertTrue(client.reset or client.ended)
            self.assertNotIn("complete", client.names())
        self.assertEqual(sum(c.reset for c in dead), deadCount, "the server did not reset the dropped streams")
        for client in live:
            self.assertEqual(firstBreak(client.progress(), list(range(1, count + 1))), "")
            self.assertEqual(client.events[-1][1], "complete")

        server.waitFor("all streams closed", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        self.assertDescriptorsReleased(started, "dead clients")

"""
Overload: a server limited to N open event streams (C{--max-streams N})
facing 2N at once admits exactly N, keeps those real time, and answers the
rest at once with a clean C{503} (JSON, C{Retry-After}), also while it is
streaming; it stays up, its memory bounded.

The refused clients try again while the render streams, from a process of
their own (L{tests.load._load.Attempts}), so that the measuring clients
here share their CPU with nobody. They come in waves of 20, 100 ms apart:
every request costs the server's single thread about 0.5 ms, so 200 at the
very same moment would hold every stream back by about 100 ms (measured:
150 to 330 ms on a busy machine), which is what a single-threaded server
does, not a fault of the stream limit.
"""

from __future__ import annotations

import json

from ._load import (
    BOUND_MS,
    PACE,
    Attempts,
    LoadTestCase,
    StreamClient,
    firstBreak,
    latencySummary,
    report,
)

LIMIT = 200

#: The bound on the server's memory growth. Measured: 4 to 6 MiB for 400
#: connections and 200 streams of 200 small events; it would take 200 KiB
#: kept per connection to pass it.
RSS_GROWTH_BOUND_MIB = 40


class OverloadTests(LoadTestCase):
    def test_streamLimitAdmitsNAndRefusesTheRestCleanly(self) -> None:
        """
        With C{--max-streams 200}, 400 clients open the events URL of one
        render at once: exactly 200 get the stream and 200 a C{503}
        C{too_many_streams} JSON error with C{Retry-After}. While the render
        prints 200 events every 20 ms, the 200 refused clients try again (in
        ten waves over a second, from another process) and are refused
        again; every admitted client gets every event within 100 ms of its
        printing all the same. Afterwards no
        stream is open, the server is up and serves a new stream, and its
        memory grew by less than L{RSS_GROWTH_BOUND_MIB} MiB.
        """
        count = 200
        started = self.heldRender(["--max-streams", str(LIMIT)], count=count, interval=0.02)
        server, loop, job, memory = started.server, started.loop, started.job, started.memory

        first = [StreamClient(loop, server.port, job["events_url"]) for _ in range(2 * LIMIT)]
        loop.run(lambda: all(c.status is not None for c in first), 20, "400 answers", memory.sample)
        admitted = [c for c in first if c.status == 200]
        refused = [c for c in first if c.status != 200]
        self.assertEqual((len(admitted), len(refused)), (LIMIT, LIMIT))
        health = server.waitFor("200 streams open", lambda h: h["streams"] == LIMIT, 10)
        self.assertEqual(health["subscribers"], LIMIT)
        loop.run(lambda: all(c.closed for c in refused), 10, "the 503 bodies", memory.sample)

        crowd = Attempts(server.port, job["events_url"], LIMIT, waves=10, spacing=0.1)
        self.addCleanup(crowd.stop)
        started.go()
        retrying: list[bool] = []

        def retry() -> None:
            memory.sample()
            if not retrying and admitted[0].progress()[-1:] >= [count // 3]:
                crowd.start()
                retrying.append(True)

        took = loop.run(lambda: all(c.closed for c in admitted), 60, "the render", retry, 0.01, PACE)
        retries = crowd.answers()
        latencies = [latency for client in admitted for latency in client.latencies()]
        _, at = max(client.worst() for client in admitted)
        report(
            f"overload: --max-streams {LIMIT}: {2 * LIMIT} at once -> {len(admitted)} x 200, "
            f"{len(refused)} x {sorted({c.status for c in refused})}; {len(retries)} retries mid-render -> "
            f"{sorted({r['status'] for r in retries})}; render of {count} events in {took:.1f} s; admitted "
            f"clients' latency {latencySummary(latencies)} (the worst: event {at}, the retries began after "
            f"event {count // 3}); server RSS baseline {memory.baseline / 1024:.1f} MiB, "
            f"peak {memory.peak / 1024:.1f} MiB (+{memory.growthMiB:.1f} MiB)"
        )
        self.assertEqual(len(retries), LIMIT, "the retries never went out")
        answers = [(c.status, c.headers, c.body.decode()) for c in refused]
        answers += [(r["status"], r["headers"], r["body"]) for r in retries]
        for status, headers, body in answers:
            self.assertEqual(status, 503, body)
            self.assertEqual(headers.get("content-type"), "application/json")
            self.assertRegex(headers.get("retry-after", ""), r"^[0-9]+$")
            error = json.loads(body)
            self.assertEqual(set(error), {"error", "detail"})
            self.assertEqual(error["error"], "too_many_streams")
        for client in admitted:
            self.assertEqual(client.events[-1][1], "complete")
            self.assertEqual(firstBreak(client.progress(), list(range(1, count + 1))), "")
        self.assertLessEqual(max(latencies), BOUND_MS, latencySummary(latencies))
        self.assertLess(memory.growthMiB, RSS_GROWTH_BOUND_MIB)

        self.assertTrue(server.alive())
        server.waitFor("every stream closed", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        again = StreamClient(loop, server.port, job["events_url"])
        loop.run(lambda: again.closed, 10, "a stream after the overload")
        self.assertEqual(again.status, 200)
        self.assertEqual(again.events[-1][1], "complete")
        self.assertDescriptorsReleased(started, "overload")

"""
Churn: ten thousand clients connect to a running render's event stream
and leave in every way a client can (a FIN or a RST right after the
request, a FIN after the first event, a RST after the response head, a FIN
in the middle of the request line), 50 at a time, and the server is left
as it was: no stream, no subscriber, no descriptor, no memory and no timer
kept for any of them.

Timers cannot be seen from outside the process; C{streams} and
C{subscribers} at 0 stand for them (each stream's keepalive and write
deadline are cancelled in the same cleanup that unsubscribes it), and so
does the server's CPU time once it is idle: with C{--keepalive 0.05}, ten
thousand leaked keepalive loops would cost it 200 000 calls a second.
"""

from __future__ import annotations

from ._load import Churn, Cycle, LoadTestCase, MemoryWatch, StreamClient, report

CYCLES = 10_000
CONCURRENCY = 50

#: Cycles run before the baseline is taken. The server's RSS grows by about
#: 6 MiB over its first 2 000 cycles (the allocator's high-water mark for
#: 50 streams at a time), then by about 0.1 MiB per 2 000 and levels off
#: (measured over 40 000 cycles in rounds): that first growth is no leak.
WARMUP = 2_000

#: How far the server's RSS may end above where it was after the warm-up.
#: Measured: 1 to 2.5 MiB. A stream kept per cycle (its Request, channel,
#: transport, producer and timers, some KiB each) would be tens of MiB over
#: 10 000 cycles; this catches anything over about 800 bytes a cycle.
RSS_AFTER_BOUND_MIB = 8

#: Descriptors the server may end with beyond those it had before.
FD_SLACK = 3


class ChurnTests(LoadTestCase):
    def test_tenThousandCyclesLeaveNothingBehind(self) -> None:
        """
        After 10 000 connect/disconnect cycles of five kinds (2 000 each)
        against a render's events URL, 50 in flight, every one of which
        connected and, for those that read, got a C{200} and its first
        frames: C{/healthz} shows 0 streams and 0 subscribers, the server
        has the descriptors it had before (within 3), its RSS is within
        L{RSS_AFTER_BOUND_MIB} MiB of what it was after a 2 000-cycle
        warm-up, it is idle once the render is cancelled, and a new client
        still gets the stream.
        """
        # A short history: each new stream replays it (the cost of a
        # connect is not what this test is about).
        server = self.serve("--keepalive", "0.05", "--history", "20", "--max-streams", "1000")
        loop = self.newLoop()
        job = server.render(count=200_000, interval=0.01)
        server.waitFor("the render running", lambda h: h["renders"]["running"] == 1, 10)
        path = job["events_url"]

        warmup = Churn(loop, server.port, path, WARMUP, CONCURRENCY)
        warmup.run(40)
        self.assertEqual(warmup.failed, [])
        server.waitFor("the warm-up's streams closed", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        fdsBefore = server.fds()
        memory = MemoryWatch(server.pid)

        churn = Churn(loop, server.port, path, CYCLES, CONCURRENCY)
        streams: list[int] = []

        def sample() -> None:
            memory.sample()
            streams.append(server.health()["streams"])

        cpu = server.cpu()
        took = churn.run(60, sample)
        cpu = server.cpu() - cpu
        health = server.waitFor("every stream closed", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        fds = server.settledFds(fdsBefore, FD_SLACK)
        rssAfter = server.rss()
        report(
            f"churn: {CYCLES} cycles, {CONCURRENCY} in flight, in {took:.1f} s ({CYCLES / took:.0f}/s, server "
            f"CPU {cpu:.1f} s); by kind {churn.done}; server fds {fdsBefore} before, {fds} after; RSS after "
            f"warm-up {memory.baseline / 1024:.1f} MiB, peak {memory.peak / 1024:.1f} MiB, after "
            f"{rssAfter / 1024:.1f} MiB; streams open during the churn: up to {max(streams)}; /healthz {health}"
        )
        self.assertGreater(max(streams), 0, "no stream was ever open: the cycles did not reach the server")
        self.assertEqual(churn.failed[:10], [])
        self.assertEqual(churn.done, {kind: CYCLES // len(Cycle.KINDS) for kind in Cycle.KINDS})
        self.assertEqual(health["renders"]["running"], 1, "the render ended during the churn")
        self.assertLessEqual(abs(fds - fdsBefore), FD_SLACK)
        self.assertLess((rssAfter - memory.baseline) / 1024, RSS_AFTER_BOUND_MIB)

        # The server still streams.
        client = StreamClient(loop, server.port, path)
        loop.run(lambda: len(client.events) >= 25, 10, "a stream after the churn")
        self.assertEqual(client.status, 200)
        client.close()

        server.cancel(job)
        server.waitForState(job, {"cancelled"}, 10)
        server.waitFor("idle", lambda h: h["streams"] == 0 and h["subscribers"] == 0, 10)
        idle = server.busy(1.0)
        report(f"churn: server CPU when idle afterwards: {idle * 100:.1f} %")
        self.assertLess(idle, 0.05, "the idle server is busy: timers left running?")
        server.assertLoggedNoErrors()

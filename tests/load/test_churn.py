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

Memory is judged by its shape, not by where it ends: RSS grows for tens of
thousands of cycles without any leak (the allocator settling, and garbage
waiting for the tuned collector's rare full collections), so the check
asks the server for a census after a full collection (the objects its
collector tracks, and its RSS) after a warm-up and after each of two equal
batches: a leak grows both, batch after batch; settling does not. A server
with a deliberate leak shows that the check can fail.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._load import Churn, Cycle, LoadServer, LoadTestCase, Loop, StreamClient, report

CYCLES = 10_000
CONCURRENCY = 50

#: Cycles run before the first census. The server's memory grows over its
#: first couple of thousand cycles (the allocator's high-water mark for 50
#: streams at a time), then settles: that first growth is no leak.
WARMUP = 2_000

#: The churn after the warm-up runs as two equal batches, with a census
#: (a full collection, then the tracked objects and RSS) after each.
BATCH = CYCLES // 2

#: How many more objects the server may track after both batches than
#: after the warm-up. Measured: within +-120 of ~1 200 (the count goes up
#: and down with what is in flight at the census). A stream kept per cycle
#: is some 20 objects a cycle (+200 000); even one object a cycle is +10 000.
OBJECT_SLACK = 1_000

#: How far the server's RSS may grow over the second batch. Measured after
#: a full collection: 0 to 1.1 MiB per 2 000 cycles once warmed up (the
#: allocator settling), 2.1 MiB over 20 000. Without the collection the
#: growth only levels off after some 40 000 cycles (+18 MiB by 160 000),
#: when the tuned collector first runs a full collection: hence the
#: census. A stream kept per cycle is ~6 KiB a cycle (+30 MiB a batch);
#: this catches anything over ~0.8 KiB a cycle.
RSS_BATCH_BOUND_MIB = 4

#: Descriptors the server may end with beyond those it had before.
FD_SLACK = 3


@attrs.frozen
class Census:
    """
    What the server keeps after a full collection: the objects its
    collector tracks and its resident memory.
    """

    objects: int
    rssKiB: int


@attrs.frozen
class Verdict:
    """
    The leak check over a warm-up and two equal batches: C{leaks} says
    what grew past its bound, empty if nothing did.
    """

    warm: Census
    first: Census
    second: Census

    @property
    def objectGrowth(self) -> int:
        return self.second.objects - self.warm.objects

    @property
    def rssGrowthMiB(self) -> float:
        return (self.second.rssKiB - self.first.rssKiB) / 1024

    @property
    def leaks(self) -> list[str]:
        found = []
        if self.objectGrowth > OBJECT_SLACK:
            found.append(f"{self.objectGrowth} more objects after {CYCLES} cycles (bound {OBJECT_SLACK})")
        if self.rssGrowthMiB > RSS_BATCH_BOUND_MIB:
            found.append(
                f"RSS +{self.rssGrowthMiB:.1f} MiB over the second {BATCH} cycles (bound {RSS_BATCH_BOUND_MIB})"
            )
        return found

    def __str__(self) -> str:
        return (
            f"objects {self.warm.objects} after the warm-up, {self.first.objects}, {self.second.objects} after "
            f"each batch; RSS {self.warm.rssKiB / 1024:.1f}, {self.first.rssKiB / 1024:.1f}, "
            f"{self.second.rssKiB / 1024:.1f} MiB"
        )


def census(server: LoadServer) -> Census:
    return Census(*server.census())


class ChurnTests(LoadTestCase):
    def churn(self, *options: str) -> tuple[LoadServer, Loop, dict[str, Any], Verdict, int, int]:
        """
        Start a server with C{options} and a render, churn L{WARMUP}
        cycles, then two batches of L{BATCH}, with a census after each.
        """
        # A short history: each new stream replays it (the cost of a
        # connect is not what this test is about).
        server = self.serve("--keepalive", "0.05", "--history", "20", "--max-streams", "1000", *options)
        loop = self.newLoop()
        job = server.render(count=200_000, interval=0.01)
        server.waitFor("the render running", lambda h: h["renders"]["running"] == 1, 10)
        path = job["events_url"]

        warmup = Churn(loop, server.port, path, WARMUP, CONCURRENCY)
        warmup.run(40)
        self.assertEqual(warmup.failed, [])
        closed = lambda h: h["streams"] == 0 and h["subscribers"] == 0  # noqa: E731
        server.waitFor("the warm-up's streams closed", closed, 10)
        fdsBefore = server.fds()
        censuses = [census(server)]
        streams: list[int] = []
        done = {kind: 0 for kind in Cycle.KINDS}
        cpu, took = server.cpu(), 0.0
        for _ in range(2):
            batch = Churn(loop, server.port, path, BATCH, CONCURRENCY)
            took += batch.run(60, lambda: streams.append(server.health()["streams"]))
            self.assertEqual(batch.failed[:10], [])
            for kind, count in batch.done.items():
                done[kind] += count
            server.waitFor("every stream closed", closed, 10)
            censuses.append(census(server))
        cpu = server.cpu() - cpu
        verdict = Verdict(*censuses)
        self.assertGreater(max(streams), 0, "no stream was ever open: the cycles did not reach the server")
        self.assertEqual(done, {kind: CYCLES // len(Cycle.KINDS) for kind in Cycle.KINDS})
        fds = server.settledFds(fdsBefore, FD_SLACK)
        report(
            f"churn{' ' + ' '.join(options) if options else ''}: {CYCLES} cycles, {CONCURRENCY} in flight, in "
            f"{took:.1f} s ({CYCLES / took:.0f}/s, server CPU {cpu:.1f} s); server fds {fdsBefore} before, {fds} "
            f"after; streams open during the churn: up to {max(streams)}; {verdict}"
        )
        return server, loop, job, verdict, fdsBefore, fds

    def test_tenThousandCyclesLeaveNothingBehind(self) -> None:
        """
        After a 2 000-cycle warm-up and 10 000 connect/disconnect cycles of
        five kinds (2 000 each) against a render's events URL, 50 in
        flight, every one of which connected and, for those that read, got
        a C{200} and its first frames: C{/healthz} shows 0 streams and 0
        subscribers, the server has the descriptors it had before (within
        3), it tracks no more objects than after the warm-up (within
        L{OBJECT_SLACK}), its RSS grew by less than L{RSS_BATCH_BOUND_MIB}
        MiB over the second of two equal batches, it is idle once the
        render is cancelled, and a new client still gets the stream.
        """
        server, loop, job, verdict, fdsBefore, fds = self.churn()
        self.assertEqual(verdict.leaks, [])
        self.assertLessEqual(abs(fds - fdsBefore), FD_SLACK)
        health = server.health()
        self.assertEqual(health["renders"]["running"], 1, "the render ended during the churn")
        path = job["events_url"]

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

    def test_aLeakingServerFailsTheCheck(self) -> None:
        """
        The same churn against a server that keeps every stream's request
        (a deliberate leak, C{--leak-streams}) fails both the object and
        the RSS bound: the check can see a real per-cycle leak.
        """
        server, loop, job, verdict, fdsBefore, fds = self.churn("--leak-streams")
        self.assertEqual(len(verdict.leaks), 2, f"the leak went unseen: {verdict}")
        server.cancel(job)
        server.waitForState(job, {"cancelled"}, 10)

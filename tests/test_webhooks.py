"""
Webhooks (L{twistedsse._webhooks}): the callback URL policy, the signature,
and the deliveries' schedule (retries, backoff, give-up, bounds, stop)
driven by a L{Clock} and a fake C{post}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import attrs

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import tap
from twistedsse._errors import CallbackNotAllowed, InvalidCallback
from twistedsse._job import JobSnapshot, JobState
from twistedsse._redisstate import snapshotFromJSON
from twistedsse._store import SQLiteJobStore
from twistedsse._webhooks import (
    MAX_URL_LENGTH,
    CallbackPolicy,
    Webhooks,
    allowEntry,
    payload,
    sign,
    verifySignature,
)

SECRET = b"whsec-0123456789abcdef0123456789abcdef"


def ended(jobID: str = "job1", url: str | None = "http://hooks.example/in") -> JobSnapshot:
    return JobSnapshot(
        id=jobID, renderer="card", params={"title": "x"}, state=JobState.SUCCEEDED,
        createdAt=1.0, startedAt=2.0, endedAt=3.0, result={"output_url": "/renders/job1/output"},
        callbackURL=url,
    )  # fmt: skip


class SignatureTests(SynchronousTestCase):
    def test_knownVector(self) -> None:
        """
        The header is C{t=T,v1=HEX}, HEX the HMAC-SHA256 of C{T.BODY}: the
        value C{openssl dgst -sha256 -hmac} gives for the same input.
        """
        body = b'{"id":"abc","state":"succeeded"}'
        self.assertEqual(
            sign(SECRET, 1700000000, body),
            b"t=1700000000,v1=f7137cfc46d0043903329c37d6bcee11c2490281480bcaad2bbe8183973724ef",
        )

    def test_verify(self) -> None:
        """
        L{verifySignature} accepts the signature within the tolerance, and
        refuses another body, another secret, a timestamp too old or too
        far ahead, and malformed headers.
        """
        body = b'{"id":"abc"}'
        header = sign(SECRET, 1000, body)
        self.assertTrue(verifySignature(SECRET, header, body, now=1000))
        self.assertTrue(verifySignature(SECRET, header.decode(), body, now=1300, tolerance=300))
        self.assertFalse(verifySignature(SECRET, header, body, now=1301, tolerance=300))
        self.assertFalse(verifySignature(SECRET, header, body, now=699, tolerance=300))
        self.assertFalse(verifySignature(SECRET, header, body + b" ", now=1000))
        self.assertFalse(verifySignature(SECRET + b"x", header, body, now=1000))
        for bad in (b"", b"t=1000", b"v1=00", b"t=abc,v1=00", b"t=-1000,v1=00", "t=1000,v1=\u00e9".encode(), b"\xff"):
            self.assertFalse(verifySignature(SECRET, bad, body, now=1000), bad)

    def test_readmeRecipe(self) -> None:
        """
        The receiver's recipe in the README (section Webhooks) verifies
        what L{sign} makes, and refuses another body, another secret and
        an old timestamp.
        """
        import re
        import time

        readme = (Path(__file__).parent.parent / "README.md").read_text()
        section = readme[readme.index("## Webhooks") :]
        [code] = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 5)], re.S)
        namespace: dict[str, object] = {}
        exec(code, namespace)
        verify = namespace["verify"]
        body = b'{"id":"abc"}'
        header = sign(SECRET, int(time.time()), body).decode()
        self.assertTrue(verify(SECRET, header, body))  # type: ignore[operator]
        self.assertFalse(verify(SECRET, header, body + b"x"))  # type: ignore[operator]
        self.assertFalse(verify(SECRET[1:], header, body))  # type: ignore[operator]
        old = sign(SECRET, int(time.time()) - 400, body).decode()
        self.assertFalse(verify(SECRET, old, body))  # type: ignore[operator]
        self.assertFalse(verify(SECRET, "garbage", body))  # type: ignore[operator]

    def test_payload(self) -> None:
        """
        The body is the job's JSON, its C{callback_url} included.
        """
        import json

        data = json.loads(payload(ended()))
        self.assertEqual(data["id"], "job1")
        self.assertEqual(data["state"], "succeeded")
        self.assertEqual(data["callback_url"], "http://hooks.example/in")
        self.assertEqual(data["result"], {"output_url": "/renders/job1/output"})


class PolicyTests(SynchronousTestCase):
    policy = CallbackPolicy.of(["hooks.example", "pinned.example:8443", "[::1]:9000", "10.0.0.5"])

    def test_allowed(self) -> None:
        """
        An allowed host matches whatever its case, with a trailing dot,
        on any port unless the entry names one; IP literals in any
        spelling of the same address.
        """
        for url in (
            "http://hooks.example/in",
            "https://HOOKS.Example./in?x=1",
            "http://hooks.example:8080/",
            "https://pinned.example:8443/x",
            "http://[::1]:9000/",
            "http://[0:0::1]:9000/",
            "http://10.0.0.5/cb",
        ):
            self.assertEqual(self.policy.check(url), url)

    def test_notAllowed(self) -> None:
        """
        Other hosts, ports other than the one an entry names, and look-
        alikes are refused with L{CallbackNotAllowed}.
        """
        for url in (
            "http://evil.example/",
            "http://hooks.example.evil.example/",
            "http://evilhooks.example/",
            "https://pinned.example/x",
            "http://pinned.example:8444/",
            "http://[::1]/",
            "http://[::1]:9001/",
            "http://127.0.0.1/",
            "http://10.0.0.6/",
            "http://localhost/",
            "http://0x0a.0.0.5/",
            "http://167772165/",
        ):
            with self.assertRaises(CallbackNotAllowed, msg=url):
                self.policy.check(url)

    def test_invalid(self) -> None:
        """
        Anything that is not a plain absolute http(s) URL is refused with
        L{InvalidCallback}: other schemes, userinfo (even with an allowed
        host on either side of the C{@}), fragments, bad ports,
        whitespace, backslashes, non-ASCII, over-long, not a string.
        """
        for url in (
            "ftp://hooks.example/",
            "file:///etc/passwd",
            "gopher://hooks.example/",
            "javascript:alert(1)",
            "hooks.example/in",
            "//hooks.example/in",
            "http:/hooks.example/in",
            "http:hooks.example",
            "http://user:pw@hooks.example/",
            "http://hooks.example@evil.example/",
            "http://evil.example\\@hooks.example/",
            "http://hooks.example/in#frag",
            "http://hooks.example/in#",
            "http://hooks.example:99999/",
            "http://hooks.example:port/",
            "http://hooks.example /",
            "http://hooks.example/\r\nX: y",
            "http://h\u00f6oks.example/",
            "http:///path",
            "http://[::1/",
            "http://" + "a" * MAX_URL_LENGTH,
            "",
            42,
            ["http://hooks.example/"],
            {"url": "http://hooks.example/"},
        ):
            with self.assertRaises(InvalidCallback, msg=repr(url)):
                self.policy.check(url)

    def test_noneAllowed(self) -> None:
        """
        With no entry (the default) every callback URL is refused, and the
        detail says the server sends none.
        """
        with self.assertRaises(CallbackNotAllowed) as caught:
            CallbackPolicy().check("http://hooks.example/")
        self.assertIn("no callback host", str(caught.exception))

    def test_entries(self) -> None:
        """
        C{--callback-allow} values: HOST, HOST:PORT, [IPv6] and [IPv6]:PORT,
        normalized; anything else is refused.
        """
        self.assertEqual(allowEntry("Hooks.Example."), ("hooks.example", None))
        self.assertEqual(allowEntry("hooks.example:8080"), ("hooks.example", 8080))
        self.assertEqual(allowEntry("[0::1]"), ("::1", None))
        self.assertEqual(allowEntry("[::1]:80"), ("::1", 80))
        for bad in ("", " ", "::1", "http://hooks.example", "a/b", "u@h", "h:99999", "h:x", "h\u00e9", "h?x"):
            with self.assertRaises(ValueError, msg=bad):
                allowEntry(bad)


class _Receiver:
    """
    A fake C{post}: records each attempt and hands the test its Deferred.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, Mapping[bytes, bytes], Deferred[int]]] = []

    def __call__(self, url: str, body: bytes, headers: Mapping[bytes, bytes]) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((url, body, headers, d))
        return d

    def answer(self, status: int) -> None:
        self.calls[-1][3].callback(status)


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.post = _Receiver()
        self.closed = 0
        self.logged: list[LogEvent] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def webhooks(self, **kw: object) -> Webhooks:
        def close() -> Deferred[None]:
            self.closed += 1
            return succeed(None)

        options: dict[str, object] = dict(random=lambda: 0.5, retryFor=100.0, timeout=10.0, post=self.post)
        options.update(kw)
        hooks = Webhooks(self.clock, SECRET, CallbackPolicy.of(["hooks.example"]), close=close, **options)  # type: ignore[arg-type]
        hooks.start()
        return hooks

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if "callback" in e.get("log_format", "")]

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delivered(self) -> None:
        """
        One POST of the job's JSON to its URL, signed now, ends the
        delivery on a 2xx: nothing pending, nothing scheduled.
        """
        hooks = self.webhooks()
        hooks.ended(ended())
        [(url, body, headers, _)] = self.post.calls
        self.assertEqual(url, "http://hooks.example/in")
        self.assertEqual(body, payload(ended()))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"Twistedsse-Signature"], sign(SECRET, 1_700_000_000, body))
        self.assertTrue(verifySignature(SECRET, headers[b"Twistedsse-Signature"], body, self.clock.seconds()))
        self.post.answer(204)
        self.assertEqual(hooks.pendingCount(), 0)
        self.assertIn("delivered (204, attempt 1)", self.messages()[-1])
        self.assertIn("job1", self.messages()[-1])

    def test_noCallbackURL(self) -> None:
        """
        A job without a C{callback_url} sends nothing.
        """
        hooks = self.webhooks()
        hooks.ended(ended(url=None))
        self.assertEqual(self.post.calls, [])
        self.assertEqual(hooks.pendingCount(), 0)

    def test_backoffSchedule(self) -> None:
        """
        Failed attempts are retried after a jittered delay under a ceiling
        that doubles from 1 s up to 60 s (with jitter 0.5: 0.5, 1, 2, 4,
        8, 16, 30, 30...); each attempt is signed at its own time.
        """
        hooks = self.webhooks(retryFor=10_000.0)
        hooks.ended(ended())
        delays = []
        for status in (500, 502, 503, 408, 429, 500, 500, 500):
            before = self.clock.seconds()
            self.post.answer(status)
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - before)
            self.clock.advance(call.getTime() - before)
            _, body, headers, _ = self.post.calls[-1]
            self.assertEqual(headers[b"Twistedsse-Signature"], sign(SECRET, int(self.clock.seconds()), body))
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 16, 30, 30])
        self.post.answer(200)
        self.assertEqual(len(self.post.calls), 9)
        self.assertEqual(hooks.pendingCount(), 0)

    def test_backoffJitter(self) -> None:
        """
        The jitter is full: the delay is the ceiling times the random
        draw, from 0 up to the ceiling.
        """
        hooks = self.webhooks(random=lambda: 0.0)
        self.assertEqual(hooks.backoff(1), 0.0)
        hooks = self.webhooks(random=lambda: 0.999)
        self.assertAlmostEqual(hooks.backoff(3), 3.996)
        self.assertAlmostEqual(hooks.backoff(100), 59.94)

    def test_giveUp(self) -> None:
        """
        A receiver that keeps failing is given up once the next try would
        start more than C{retryFor} seconds after the first, logged with
        the job id; nothing is left scheduled.
        """
        hooks = self.webhooks(retryFor=100.0)
        hooks.ended(ended())
        start = self.clock.seconds()
        while self.clock.getDelayedCalls() or self.post.calls[-1][3].called is False:
            if not self.post.calls[-1][3].called:
                self.post.answer(503)
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            self.clock.advance(calls[0].getTime() - self.clock.seconds())
        # 0.5 + 1 + 2 + 4 + 8 + 16 + 30 = 61.5; + 30 = 91.5; + 30 > 100.
        self.assertEqual(len(self.post.calls), 9)
        self.assertEqual(self.clock.seconds() - start, 91.5)
        self.assertEqual(hooks.pendingCount(), 0)
        self.assertIn("callback for render job1 given up after 9 attempts", self.messages()[-1])

    def test_finalRefusal(self) -> None:
        """
        A 4xx other than 408 and 429 ends the delivery: not retried,
        logged.
        """
        for status in (400, 401, 403, 404, 410, 422):
            self.post.calls.clear()
            hooks = self.webhooks()
            hooks.ended(ended())
            self.post.answer(status)
            self.assertEqual(len(self.post.calls), 1)
            self.assertEqual(hooks.pendingCount(), 0)
            self.assertIn(f"refused by its receiver ({status})", self.messages()[-1])

    def test_redirectRetried(self) -> None:
        """
        A redirect is not followed (the attempt's answer is the 3xx) and
        counts as a failure: retried, to the same URL.
        """
        hooks = self.webhooks()
        hooks.ended(ended())
        self.post.answer(302)
        self.clock.advance(0.5)
        self.assertEqual([c[0] for c in self.post.calls], ["http://hooks.example/in"] * 2)
        self.post.answer(200)
        self.assertEqual(hooks.pendingCount(), 0)

    def test_timeout(self) -> None:
        """
        An attempt that gets no answer within C{timeout} is cancelled and
        retried.
        """
        hooks = self.webhooks(timeout=10.0)
        hooks.ended(ended())
        first = self.post.calls[0][3]
        self.clock.advance(10)
        self.assertTrue(first.called)
        self.assertIn("timed out after 10 s", self.messages()[-1])
        self.clock.advance(0.5)
        self.assertEqual(len(self.post.calls), 2)
        self.post.answer(200)
        self.assertEqual(hooks.pendingCount(), 0)

    def test_postRaises(self) -> None:
        """
        A C{post} that raises (a URL the client cannot use) is a failed
        attempt like any other, not an error that escapes.
        """

        def post(url: str, body: bytes, headers: Mapping[bytes, bytes]) -> Deferred[int]:
            raise ValueError("no")

        hooks = self.webhooks(post=post, retryFor=1.0)
        hooks.ended(ended())
        self.clock.advance(0.5)
        self.clock.advance(1)
        self.assertEqual(hooks.pendingCount(), 0)
        self.assertIn("ValueError", self.messages()[-1])

    def test_concurrency(self) -> None:
        """
        At most C{maxConcurrent} attempts are in flight; the others wait
        for a slot, in order, and a receiver that hangs holds only its own.
        """
        hooks = self.webhooks(maxConcurrent=2)
        for n in range(4):
            hooks.ended(ended(f"job{n}"))
        self.assertEqual([c[1] for c in self.post.calls], [payload(ended("job0")), payload(ended("job1"))])
        self.post.calls[1][3].callback(200)
        self.assertEqual(len(self.post.calls), 3)
        self.post.answer(200)
        self.assertEqual(len(self.post.calls), 4)
        self.post.answer(200)
        self.assertEqual(hooks.pendingCount(), 1)
        self.clock.advance(10)  # job0's receiver hung: timed out
        self.clock.advance(0.5)
        self.post.answer(200)
        self.assertEqual(hooks.pendingCount(), 0)

    def test_pendingBound(self) -> None:
        """
        Past C{maxPending} deliveries not yet ended, a new one is dropped
        and logged with its job id.
        """
        hooks = self.webhooks(maxPending=2, maxConcurrent=1)
        for n in range(3):
            hooks.ended(ended(f"job{n}"))
        self.assertEqual(hooks.pendingCount(), 2)
        self.assertIn("callback for render job2 dropped", self.messages()[-1])
        self.post.answer(200)
        self.post.answer(200)
        self.assertEqual(hooks.pendingCount(), 0)

    def test_stop(self) -> None:
        """
        L{Webhooks.stop} cancels retries that wait and deliveries that
        wait for a slot (each logged with its job id), lets the attempt in
        flight end, then closes the pool; jobs that end after it send
        nothing.
        """
        hooks = self.webhooks(maxConcurrent=1)
        hooks.ended(ended("waiting"))
        self.post.answer(500)  # now waiting 0.5 s to retry
        hooks.ended(ended("flying"))
        hooks.ended(ended("queued"))
        self.assertEqual(len(self.post.calls), 2)
        stopped = hooks.stop()
        self.assertNoResult(stopped)
        self.assertEqual(hooks.pendingCount(), 1)
        text = "\n".join(self.messages())
        self.assertIn("callback for render waiting cancelled after 1 attempts", text)
        self.assertIn("callback for render queued cancelled after 0 attempts", text)
        hooks.ended(ended("late"))
        self.assertIn("callback for render late not sent", self.messages()[-1])
        self.assertEqual(self.closed, 0)
        self.post.answer(500)  # the attempt in flight fails: not retried
        self.successResultOf(stopped)
        self.assertEqual(self.closed, 1)
        self.assertEqual(len(self.post.calls), 2)
        self.assertIn("callback for render flying not retried", self.messages()[-1])

    def test_stopIdle(self) -> None:
        """
        Stopping with nothing pending closes the pool at once.
        """
        hooks = self.webhooks()
        self.successResultOf(hooks.stop())
        self.assertEqual(self.closed, 1)


class ServiceTests(SynchronousTestCase):
    """
    A L{RenderService} with webhooks (memory mode): the ledger sends each
    ended job with a C{callback_url}; the tracker refuses hosts not
    allowed; a restart ends an interrupted job and sends it.
    """

    def setUp(self) -> None:
        from twistedsse._broker import MemoryBroker
        from twistedsse.testing import FakeSpawner

        from tests.test_service import FileRenderer

        self.clock = Clock()
        self.post = _Receiver()
        self.closed = 0
        self.spawner = FakeSpawner()
        self.dir = Path(self.mktemp())
        self.store = SQLiteJobStore(self.dir / "jobs.sqlite3")
        self.broker = MemoryBroker()
        self.renderers = {"file": FileRenderer()}
        self.MemoryBroker = MemoryBroker

    def service(self, store: SQLiteJobStore | None = None) -> Any:
        from twistedsse._service import RenderService

        def close() -> Deferred[None]:
            self.closed += 1
            return succeed(None)

        hooks = Webhooks(self.clock, SECRET, CallbackPolicy.of(["hooks.example"]), self.post, close, random=lambda: 0.5)
        service = RenderService(
            clock=self.clock, spawner=self.spawner, broker=self.MemoryBroker(), renderers=self.renderers,
            outputDir=self.dir / "out", maxRenders=1, expireAfter=0, store=store or self.store, webhooks=hooks,
        )  # fmt: skip
        service.startService()
        return service

    def test_sentWhenEnded(self) -> None:
        """
        A render that succeeds, and a queued one cancelled, are each sent
        once, in their final state; a job without a C{callback_url} is not.
        """
        import json

        service = self.service()
        url = "https://hooks.example/in"
        running = service.submit("file", {}, callbackURL=url)
        queued = service.submit("file", {}, callbackURL=url)
        service.submit("file", {})
        self.assertEqual(running.callbackURL, url)
        self.assertEqual(service.broker.get(queued.id).toJSON()["callback_url"], url)
        service.cancel(queued.id)
        self.assertEqual(json.loads(self.post.calls[-1][1])["state"], "cancelled")
        self.post.answer(200)
        self.spawner.processes[0].exit(0)
        [_, (_, body, _, _)] = self.post.calls
        self.assertEqual((json.loads(body)["id"], json.loads(body)["state"]), (running.id, "succeeded"))
        self.post.answer(200)
        self.spawner.processes[1].exit(0)  # no callback_url
        self.assertEqual(len(self.post.calls), 2)
        self.successResultOf(service.stopService())
        self.assertEqual(self.closed, 1)

    def test_refusedAtSubmit(self) -> None:
        """
        A host not allowed, or no allow list at all, refuses the render
        before any job exists.
        """
        from twistedsse._service import RenderService

        service = self.service()
        with self.assertRaises(CallbackNotAllowed):
            service.submit("file", {}, callbackURL="https://other.example/in")
        with self.assertRaises(InvalidCallback):
            service.submit("file", {}, callbackURL="ftp://hooks.example/in")
        plain = RenderService(
            clock=self.clock, spawner=self.spawner, broker=self.MemoryBroker(), renderers=self.renderers,
            outputDir=self.dir / "out2", expireAfter=0,
        )  # fmt: skip
        plain.startService()
        with self.assertRaises(CallbackNotAllowed):
            plain.submit("file", {}, callbackURL="https://hooks.example/in")
        self.assertEqual(self.spawner.processes, [])
        self.successResultOf(plain.stopService())
        self.successResultOf(service.stopService())

    def test_interruptedByARestart(self) -> None:
        """
        With a store, a job that was running when its process went away
        ends "interrupted" at the next start, and its callback is sent.
        """
        import json

        self.store.save(attrs.evolve(ended("lost"), state=JobState.RUNNING, endedAt=None, result=None))
        service = self.service()
        [(url, body, _, _)] = self.post.calls
        self.assertEqual(url, "http://hooks.example/in")
        self.assertEqual((json.loads(body)["id"], json.loads(body)["state"]), ("lost", "failed"))
        self.post.answer(200)
        self.successResultOf(service.stopService())

    def test_notAllowedAnyMore(self) -> None:
        """
        A job created under an allow list that no longer holds its host
        (a restart with other options) is not sent, and that is logged.
        """
        logged: list[LogEvent] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.store.save(
            attrs.evolve(ended("old", url="https://gone.example/"), state=JobState.RUNNING, endedAt=None, result=None)
        )
        service = self.service()
        self.assertEqual(self.post.calls, [])
        from twisted.logger import formatEvent

        self.assertIn(
            "callback for render old not sent: callback host 'gone.example' is not one the operator allows",
            [formatEvent(e) for e in logged],
        )
        self.successResultOf(service.stopService())


class KeptTests(SynchronousTestCase):
    def test_storeKeepsCallbackURL(self) -> None:
        """
        The SQLite store (C{--state-dir}) keeps a job's C{callback_url}
        across a restart; a record without one (an earlier version's)
        reads back as none.
        """
        path = Path(self.mktemp()) / "jobs.sqlite3"
        store = SQLiteJobStore(path)
        store.save(ended("a"))
        store.save(ended("b", url=None))
        store.close()
        store = SQLiteJobStore(path)
        self.addCleanup(store.close)
        loaded = {snapshot.id: snapshot for snapshot, _ in store.load()}
        self.assertEqual(loaded["a"], ended("a"))
        self.assertIsNone(loaded["b"].callbackURL)

    def test_redisDocumentKeepsCallbackURL(self) -> None:
        """
        Redis mode's stored document reads back with its C{callback_url};
        a value that is not a string is not ours.
        """
        self.assertEqual(snapshotFromJSON(ended().toJSON()), ended())
        self.assertEqual(snapshotFromJSON(ended(url=None).toJSON()), ended(url=None))
        with self.assertRaises(ValueError):
            snapshotFromJSON({**ended().toJSON(), "callback_url": 5})

    def test_jobJSON(self) -> None:
        """
        The job's JSON has C{callback_url} only when the client gave one.
        """
        self.assertNotIn("callback_url", ended(url=None).toJSON())
        self.assertEqual(ended().toJSON()["callback_url"], "http://hooks.example/in")


class OptionsTests(SynchronousTestCase):
    def secretFile(self, secret: bytes = SECRET) -> str:
        path = Path(self.mktemp())
        path.write_bytes(secret + b"\n")
        return str(path)

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_options(self) -> None:
        """
        C{--callback-allow} repeats; C{--callback-secret-file} reads the
        secret; by default neither is set.
        """
        options = self.parse()
        self.assertEqual(options["callback-allow"], [])
        self.assertIsNone(options["callback-secret"])
        options = self.parse(
            "--callback-allow", "hooks.example", "--callback-allow", "[::1]:9000",
            "--callback-secret-file", self.secretFile(),
        )  # fmt: skip
        self.assertEqual(options["callback-allow"], ["hooks.example", "[::1]:9000"])
        self.assertEqual(options["callback-secret"], SECRET)

    def test_together(self) -> None:
        """
        One without the other is a usage error.
        """
        with self.assertRaises(UsageError) as caught:
            self.parse("--callback-allow", "hooks.example")
        self.assertIn("go together", str(caught.exception))
        with self.assertRaises(UsageError):
            self.parse("--callback-secret-file", self.secretFile())

    def test_bad(self) -> None:
        """
        A bad host, a missing file or a short secret are usage errors that
        name the option.
        """
        for argv in (
            ["--callback-allow", "http://hooks.example/"],
            ["--callback-secret-file", str(Path(self.mktemp()))],
            ["--callback-secret-file", self.secretFile(b"short")],
        ):
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertIn(argv[0], str(caught.exception))

    def test_buildService(self) -> None:
        """
        L{buildService} takes the hosts and the secret together, or
        neither (then no sender, and a C{callback_url} is refused).
        """
        from twisted.internet.testing import MemoryReactorClock

        from twistedsse import buildService

        reactor = MemoryReactorClock()
        self.assertIsNone(buildService(reactor).webhooks)
        for kw in ({"callbackAllow": ["hooks.example"]}, {"callbackSecret": SECRET}, {"callbackAllow": ["h"], "callbackSecret": b""}):
            with self.assertRaises(ValueError):
                buildService(reactor, **kw)  # type: ignore[arg-type]
        service = buildService(reactor, callbackAllow=["hooks.example"], callbackSecret=SECRET)
        assert service.webhooks is not None
        self.assertEqual(service.webhooks.policy, CallbackPolicy.of(["hooks.example"]))

    def test_makeService(self) -> None:
        """
        The service built from the options refuses hosts not allowed and
        signs with the secret.
        """
        from twisted.internet.testing import MemoryReactorClock

        options = self.parse("--callback-allow", "hooks.example", "--callback-secret-file", self.secretFile())
        top = tap.makeService(options, MemoryReactorClock())
        service = top.renders  # type: ignore[attr-defined]
        self.assertIsNotNone(service.webhooks)
        self.assertEqual(service.webhooks.secret, SECRET)
        service.webhooks.policy.check("https://hooks.example/x")
        with self.assertRaises(CallbackNotAllowed):
            service.webhooks.policy.check("https://other.example/x")

"""
Renders are contained, for real: each runs in its own process group and
session, and whatever ends it (cancel, timeout, shutdown, its own exit, the
service being SIGKILLed) ends every process it started too, grandchildren
included, even one that ignores SIGTERM. A command renderer sees only the
allow-listed environment, and runs in a private working directory that is
removed when it ends.

The renderer is C{grouped.py}: it starts two grandchildren (a C{sleep}, and
a C{sleep} that ignores SIGTERM) that hold none of its pipes, and reports
their pids, its environment and its working directory as its first
progress event.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from twistedsse import CommandRenderer
from twistedsse._render import launcherArgv

from tests._support.launcher import childEnv, spawnService
from tests._support.procfs import alive
from tests._support.server import ServerMixin, stream
from tests._support.waiting import whenTrue

HERE = Path(__file__).parent
GROUPED = str(HERE / "grouped.py")

#: Every wait is bounded by this many seconds.
WAIT = 20.0

#: A process the service ended must be gone within this many seconds.
GONE_WITHIN = 2.0


def grouped(name: str = "grouped") -> CommandRenderer:
    return CommandRenderer(name, [sys.executable, "-u", GROUPED])


def waitUntil(predicate: Any, what: str, timeout: float = WAIT) -> Any:
    return whenTrue(reactor, predicate, timeout, what)


def killLeftovers(pids: list[int]) -> None:
    # Only the processes this test started, by pid; a no-op once the
    # service did its job.
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _collect(pids: list[int]) -> None:
    # Zombies handed to this process while it was a subreaper: ours to
    # collect, or they would outlive the test.
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class ContainmentTests(ServerMixin, TestCase):
    timeout = 60

    def serve(self, **kw: Any) -> str:
        kw.setdefault("maxRenders", 4)
        kw.setdefault("killGrace", 0.5)
        return self.startServer([grouped()], **kw)

    @inlineCallbacks
    def started(self, params: Any = None) -> Any:
        """
        Start a C{grouped} render and wait for its report; return it, its
        events and the Deferred that fires when its stream ends.
        """
        job = yield self.post("grouped", params or {})
        events, done = stream(self.base + job["events_url"], self.pool)
        done.addTimeout(WAIT, reactor)
        yield waitUntil(lambda: len(events) > 1, "the renderer's report")
        report = json.loads(events[1].data)
        pids = [report["pid"], *report["grandchildren"]]
        self.addCleanup(killLeftovers, pids)
        return job, report, pids, events, done

    @inlineCallbacks
    def assertAllGone(self, pids: list[int], since: float) -> Any:
        """
        Every process in C{pids} is gone within L{GONE_WITHIN} seconds of
        C{since}.
        """
        yield waitUntil(lambda: not any(alive(pid) for pid in pids), f"{pids} to end", timeout=WAIT)
        elapsed = time.monotonic() - since
        self.assertLess(elapsed, GONE_WITHIN, f"the processes took {elapsed:.2f} s to end")

    def terminal(self, events: list[Any]) -> tuple[str, Any]:
        return events[-1].event, json.loads(events[-1].data)

    @inlineCallbacks
    def test_ownGroupAndSession(self) -> None:
        """
        The render runs in a process group and session of its own, not the
        service's.
        """
        self.serve()
        job, report, pids, events, done = yield self.started({"mode": "exit"})
        yield done
        self.assertNotEqual(report["pgid"], os.getpgid(0))
        self.assertNotEqual(report["sid"], os.getsid(0))
        self.assertEqual(report["pgid"], report["sid"])

    @inlineCallbacks
    def test_cancelEndsTheGroup(self) -> None:
        """
        Cancelling a render ends its grandchildren too: the group gets
        SIGTERM, and the one that ignores it is KILLed by the supervisor
        as soon as the render has exited. The render ends C{cancelled}.
        """
        self.serve()
        job, report, pids, events, done = yield self.started()
        began = time.monotonic()
        response = yield treq.delete(self.base + job["status_url"], pool=self.pool)
        self.assertEqual(response.code, 202)
        yield done
        self.assertEqual(self.terminal(events)[0], "cancelled")
        yield self.assertAllGone(pids, began)

    @inlineCallbacks
    def test_killedGroupIsCollected(self) -> None:
        """
        A render that ignores SIGTERM is KILLed with its whole group after
        the grace (0.5 s): it ends C{cancelled}, and every process of the
        group has been collected, none left a zombie: the supervisor
        collects them, even where orphans go to a process that does not
        (this test process, made their "subreaper" for the test, like the
        service running as pid 1 of a container).
        """
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        self.addCleanup(prctl, 36, 0, 0, 0, 0)
        self.serve()
        job, report, pids, events, done = yield self.started({"ignore_term": True})
        began = time.monotonic()
        yield treq.delete(self.base + job["status_url"], pool=self.pool)
        yield done
        elapsed = time.monotonic() - began
        self.assertEqual(self.terminal(events)[0], "cancelled")
        self.assertTrue(0.5 <= elapsed < 2.0, elapsed)
        yield self.assertAllGone(pids, began)
        self.addCleanup(_collect, pids)
        yield waitUntil(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), "the zombies to be collected", 2.0)

    @inlineCallbacks
    def test_timeoutEndsTheGroup(self) -> None:
        """
        A render stopped at its timeout (1 s) takes its grandchildren with
        it; it fails with C{reason: "timeout"} and C{signal: 15}, as a render
        with no grandchildren does.
        """
        self.serve(renderTimeout=1.0)
        job, report, pids, events, done = yield self.started()
        yield done
        name, data = self.terminal(events)
        self.assertEqual((name, data["reason"], data["signal"], data["exit_code"]), ("failed", "timeout", 15, None))
        yield self.assertAllGone(pids, time.monotonic())

    @inlineCallbacks
    def test_shutdownEndsTheGroup(self) -> None:
        """
        Stopping the service ends every render's whole group, the
        grandchild that ignores SIGTERM included, before its Deferred fires
        (give or take the time the kernel takes to tear a KILLed process
        down).
        """
        self.serve()
        job, report, pids, events, done = yield self.started()
        began = time.monotonic()
        yield self.service.stopService()
        yield done
        self.assertEqual(self.terminal(events)[1]["reason"], "interrupted")
        yield self.assertAllGone(pids, began)

    @inlineCallbacks
    def test_exitEndsLeftovers(self) -> None:
        """
        A render that exits (0: it completes) while processes it started
        run on in its group does not leave them behind: they are KILLed
        when it exits.
        """
        self.serve()
        job, report, pids, events, done = yield self.started({"mode": "exit"})
        began = time.monotonic()
        yield done
        self.assertEqual(self.terminal(events)[0], "complete")
        yield self.assertAllGone(pids, began)

    @inlineCallbacks
    def test_allowListedEnvironment(self) -> None:
        """
        A command renderer's environment holds the allow-list only: C{PATH},
        C{LANG} (and C{LC_ALL} when the service has one), its output path,
        render id and thread budget, C{HOME} and C{TMPDIR} pointing at its
        working directory, and what the operator added with
        C{--render-env}: nothing else of the service's environment (here a
        secret the test puts there).
        """
        self.patch(os, "environ", {**os.environ, "TWISTEDSSE_TEST_SECRET": "hunter2", "PASSED": "through"})
        self.serve(renderEnv=["PASSED", "SET=value", "ABSENT"], renderThreads=3)
        job, report, pids, events, done = yield self.started({"mode": "exit"})
        yield done
        env = report["env"]
        self.assertNotIn("TWISTEDSSE_TEST_SECRET", env)
        expected = {"PATH", "LANG", "HOME", "TMPDIR", "TWISTEDSSE_OUTPUT", "TWISTEDSSE_RENDER_ID",
                    "TWISTEDSSE_THREADS", "PASSED", "SET"}  # fmt: skip
        if "LC_ALL" in os.environ:
            expected.add("LC_ALL")
        self.assertEqual(set(env), expected)
        self.assertEqual(env["PATH"], os.environ.get("PATH", os.defpath))
        self.assertEqual((env["PASSED"], env["SET"], env["TWISTEDSSE_THREADS"]), ("through", "value", "3"))
        self.assertEqual((env["HOME"], env["TMPDIR"]), (report["cwd"], report["cwd"]))
        self.assertEqual(env["TWISTEDSSE_RENDER_ID"], job["id"])

    @inlineCallbacks
    def test_privateWorkingDirectory(self) -> None:
        """
        Each render runs in a fresh working directory of its own (mode 0700,
        writable, not the output directory, not another render's), which is
        removed when it ends, whatever the outcome; the output directory is
        left as it was.
        """
        self.serve()
        outputs = Path(self.service.outputDir).resolve()
        seen = []
        for params in ({"mode": "exit"}, {"mode": "exit", "code": 3}, {}):
            job, report, pids, events, done = yield self.started(params)
            cwd = Path(report["cwd"])
            self.assertTrue(report["wrote"])
            self.assertEqual(stat.S_IMODE(cwd.stat().st_mode) if cwd.exists() else 0o700, 0o700)
            self.assertNotEqual(cwd, outputs)
            self.assertTrue(cwd.is_relative_to(outputs), cwd)
            seen.append(cwd)
            if not params:
                self.assertTrue(cwd.is_dir())
                yield treq.delete(self.base + job["status_url"], pool=self.pool)
            yield done
            self.assertFalse(cwd.exists(), f"{cwd} was left behind")
        self.assertEqual(len(set(seen)), 3)
        self.assertEqual(os.listdir(outputs), [])

    @inlineCallbacks
    def test_leftoverWorkingDirectoriesRemovedAtStart(self) -> None:
        """
        Working directories left by a service that died are removed when
        the service starts again; outputs are left alone.
        """
        outputs = Path(self.mktemp()).absolute()
        leftover = outputs / ".work" / "dead-render"
        (leftover / "deep").mkdir(parents=True)
        (leftover / "deep" / "file").write_text("x")
        (outputs / "kept.mp4").write_bytes(b"video")
        self.serve(outputDir=str(outputs))
        self.assertFalse(leftover.exists())
        self.assertEqual(sorted(os.listdir(outputs)), ["kept.mp4"])
        yield None


class ServiceDeathTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_sigkilledServiceTakesItsRendersAlong(self) -> None:
        """
        When the service process (C{python -m twistedsse}) is SIGKILLed
        mid-render, so that it can stop nothing, the render and its
        grandchildren (the one that ignores SIGTERM too) are gone within 2 s;
        the next start removes the render's working directory.
        """
        from twisted.web.client import HTTPConnectionPool

        env = childEnv()
        outputs = Path(self.mktemp()).absolute()
        argv = [
            sys.executable, "-m", "twistedsse", "--listen", "tcp:0:interface=127.0.0.1",
            "--output-dir", str(outputs), "--renderer", f"grouped={sys.executable} -u {GROUPED}",
        ]  # fmt: skip
        process, protocol = spawnService(argv, env)
        self.addCleanup(protocol.kill)
        port = yield protocol.listening
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.post(
            f"http://127.0.0.1:{port}/renders", json={"renderer": "grouped", "params": {}}, pool=pool
        )
        job = yield response.json()
        events, cut = stream(f"http://127.0.0.1:{port}{job['events_url']}", pool)
        cut.addErrback(lambda f: None)  # a SIGKILLed server cuts the body short
        yield waitUntil(lambda: len(events) > 1, "the renderer's report")
        report = json.loads(events[1].data)
        pids = [report["pid"], *report["grandchildren"]]
        self.addCleanup(killLeftovers, pids)
        self.assertTrue(all(alive(pid) for pid in pids))

        process.signalProcess("KILL")
        began = time.monotonic()
        yield protocol.ended
        yield waitUntil(lambda: not any(alive(pid) for pid in pids), f"{pids} to end")
        elapsed = time.monotonic() - began
        self.assertLess(elapsed, GONE_WITHIN, f"the render outlived the service by {elapsed:.2f} s")
        yield cut
        self.assertTrue(Path(report["cwd"]).is_dir())  # nobody was left to remove it

        process, protocol = spawnService(argv, env)
        self.addCleanup(protocol.kill)
        yield protocol.listening
        self.assertFalse(Path(report["cwd"]).exists())
        process.signalProcess("TERM")
        yield protocol.ended


class LauncherTests(TestCase):
    """
    The supervisor itself (C{twistedsse/_launcher.py}), run by this test
    process as the service would run it: what the service sees of the
    render through it must be what it saw of the render run directly.
    """

    def supervise(self, *argv: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
        import subprocess

        cwd = Path(self.mktemp()).absolute()
        cwd.mkdir(parents=True)
        result = subprocess.run(
            launcherArgv(argv, os.getpid()), env={} if env is None else env, cwd=cwd,
            capture_output=True, timeout=WAIT, **kw,
        )  # fmt: skip
        result.cwd = cwd  # type: ignore[attr-defined]
        return result

    def test_exitCodeAndSignal(self) -> None:
        """
        The supervisor exits with the render's exit code, or dies of the
        signal that killed it (SIGSEGV, SIGKILL), leaving no core file.
        """
        self.assertEqual(self.supervise("/bin/sh", "-c", "exit 3").returncode, 3)
        self.assertEqual(self.supervise("/bin/sh", "-c", "exit 0").returncode, 0)
        for signum in (signal.SIGSEGV, signal.SIGKILL, signal.SIGTERM):
            result = self.supervise("/bin/sh", "-c", f"ulimit -c 0; kill -{int(signum)} $$")
            self.assertEqual(result.returncode, -signum)
            self.assertEqual(os.listdir(result.cwd), [])

    def test_cannotExecute(self) -> None:
        """
        A command that cannot be executed after all (gone since the
        service looked, or not a valid executable) exits 127 or 126, as a
        shell would, with the system's reason on stderr and no path.
        """
        missing = self.supervise("/nonexistent/secret-dir/render")
        self.assertEqual((missing.returncode, missing.stderr),
                         (127, b"twistedsse: cannot run the renderer: No such file or directory\n"))  # fmt: skip
        script = Path(self.mktemp()).absolute()
        script.write_text("no interpreter line\n")
        script.chmod(0o700)
        bad = self.supervise(str(script))
        self.assertEqual((bad.returncode, bad.stderr), (126, b"twistedsse: cannot run the renderer: Exec format error\n"))

    def test_exactArgvAndEnvironment(self) -> None:
        """
        The render gets its argv byte for byte (no shell: quotes, spaces,
        C{$}, empty strings, non-UTF-8 bytes) and exactly the environment
        the supervisor was given: nothing the interpreter adds (it sets
        C{LC_CTYPE} for a C locale), nothing dropped.
        """
        odd = os.fsdecode(b"\xff\xfe")
        args = ["a b", "'", '"', "", "$HOME", "`id`", "ünï", odd]
        result = self.supervise("/usr/bin/printf", "%s\\0", *args)
        self.assertEqual(result.stdout, b"".join(os.fsencode(arg) + b"\0" for arg in args))
        for env in ({}, {"LANG": "C"}, {"LC_CTYPE": "C", "PYTHONPATH": "/evil", "X": "1"}):
            shown = self.supervise("/usr/bin/env", "-0", env=env).stdout
            self.assertEqual(sorted(filter(None, shown.split(b"\0"))),
                             sorted(f"{k}={v}".encode() for k, v in env.items()))  # fmt: skip

    def test_ownSessionAndDefaultSignals(self) -> None:
        """
        The render runs in the supervisor's new session and group (whose
        id is the supervisor's pid), with no signal ignored (the
        interpreter ignores SIGPIPE and SIGXFSZ; an ignored signal would
        stay ignored across exec).
        """
        import subprocess

        script = "echo $PPID $(ps -o sid= -p $$) $(ps -o pgid= -p $$); grep SigIgn /proc/$$/status"
        process = subprocess.Popen(launcherArgv(["/bin/sh", "-c", script], os.getpid()), env={"PATH": os.defpath},
                                   stdout=subprocess.PIPE)  # fmt: skip
        out, _ = process.communicate(timeout=WAIT)
        first, second = out.decode().splitlines()
        ppid, sid, pgid = (int(n) for n in first.split())
        self.assertEqual((ppid, sid, pgid), (process.pid, process.pid, process.pid))
        self.assertEqual(second.split(), ["SigIgn:", "0000000000000000"])

    def test_pipesAreTheRenders(self) -> None:
        """
        The supervisor holds none of the render's pipes: stdout and
        stderr close when the render closes them, though it runs on.
        """
        import subprocess

        process = subprocess.Popen(
            launcherArgv(["/bin/sh", "-c", "exec >&- 2>&-; sleep 1"], os.getpid()), env={"PATH": os.defpath},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        began = time.monotonic()
        self.assertEqual(process.stdout.read(), b"")  # type: ignore[union-attr]
        self.assertLess(time.monotonic() - began, 0.8)
        self.assertIsNone(process.poll())
        self.assertEqual(process.wait(timeout=WAIT), 0)
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]

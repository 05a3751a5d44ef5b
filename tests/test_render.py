"""
Containment of renders, on a L{Clock} with fakes: L{GroupSignals} (how a
contained render's process group is signalled), L{launch}'s launcher argv,
private working directory and environment, and the allow-listed
environment of command renderers. Real processes are in
C{tests/integration/test_containment.py}.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._command import (
    CommandRenderer,
    JSONLinesParser,
    allowedEnvironment,
    checkRenderEnv,
    renderEnvironment,
)
from twistedsse._interfaces import RenderPlan
from twistedsse._render import (
    LAUNCHER,
    WORK_DIR,
    GroupSignals,
    RenderProtocol,
    launch,
    launcherArgv,
    removeWorkDirs,
)
from twistedsse.testing import FakeSpawner


def makeDir(test: SynchronousTestCase) -> Path:
    base = Path(tempfile.mkdtemp(prefix="twistedsse-render-"))
    test.addCleanup(shutil.rmtree, base, True)
    return base


def plan(argv: tuple[str, ...] = ("/bin/render", "--fast"), env: dict[str, str] | None = None) -> RenderPlan:
    return RenderPlan(argv=argv, env=env or {"PATH": "/usr/bin"}, stdin=None, parser=JSONLinesParser())


class _Transport:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid


class _Calls:
    """
    Fakes of C{os.killpg}, C{os.kill} and C{killGroupMembers} that record
    their calls in one list, and raise what they are told to.
    """

    def __init__(self, noGroup: bool = False, noProc: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.noGroup = noGroup
        self.noProc = noProc

    def killpg(self, pgid: int, signum: int) -> None:
        self.calls.append(("killpg", pgid, signum))
        if self.noGroup:
            raise ProcessLookupError(errno.ESRCH, "No such process")

    def kill(self, pid: int, signum: int) -> None:
        self.calls.append(("kill", pid, signum))

    def killMembers(self, pgid: int, spare: int) -> set[int]:
        self.calls.append(("killMembers", pgid, spare))
        if self.noProc:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc")
        return {pgid + 1}

    def signals(self) -> GroupSignals:
        return GroupSignals(killpg=self.killpg, kill=self.kill, killMembers=self.killMembers)


class GroupSignalsTests(SynchronousTestCase):
    def test_termGoesToTheGroup(self) -> None:
        """
        TERM (and any signal but KILL) goes to the whole group the
        supervisor leads: its pid is the group id.
        """
        calls = _Calls()
        calls.signals()(_Transport(4242), "TERM")
        calls.signals()(_Transport(4242), signal.SIGINT)
        self.assertEqual(calls.calls, [("killpg", 4242, signal.SIGTERM), ("killpg", 4242, signal.SIGINT)])

    def test_killSparesTheSupervisor(self) -> None:
        """
        KILL kills every process of the group but the supervisor (which
        then collects them and reports the render's end), after checking
        that the group exists, and wakes the supervisor in case the render
        stopped its group.
        """
        calls = _Calls()
        calls.signals()(_Transport(4242), "KILL")
        self.assertEqual(
            calls.calls,
            [("killpg", 4242, 0), ("killMembers", 4242, 4242), ("kill", 4242, signal.SIGCONT)],
        )

    def test_beforeTheGroupExists(self) -> None:
        """
        In its first milliseconds the supervisor has not made its group
        yet: a signal then goes to it alone (it has started nothing).
        """
        for name, number in (("TERM", signal.SIGTERM), ("KILL", signal.SIGKILL)):
            calls = _Calls(noGroup=True)
            calls.signals()(_Transport(4242), name)
            self.assertEqual(calls.calls[-1], ("kill", 4242, number))
            self.assertNotIn("killMembers", [call[0] for call in calls.calls])

    def test_killWithoutProc(self) -> None:
        """
        Where the group's processes cannot be listed (no C{/proc}), KILL
        goes to the whole group, supervisor included.
        """
        calls = _Calls(noProc=True)
        calls.signals()(_Transport(4242), "KILL")
        self.assertEqual(calls.calls[-1], ("killpg", 4242, signal.SIGKILL))

    def test_collectedSupervisor(self) -> None:
        """
        Once the supervisor has been collected (no pid), its group id may
        name another group: nothing is sent, and the caller hears that the
        process has exited.
        """
        calls = _Calls()
        self.assertRaises(ProcessExitedAlready, calls.signals(), _Transport(None), "TERM")
        self.assertEqual(calls.calls, [])


class LaunchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.dir = makeDir(self)

    def test_launcherArgv(self) -> None:
        """
        A contained render runs the launcher script with an isolated
        interpreter without site packages, the service's pid, then the
        plan's argv exactly as given (never a shell string).
        """
        argv = ("/bin/render", "a b", "'; rm -rf /", "")
        self.assertEqual(
            launcherArgv(argv, 99),
            [sys.executable, "-I", "-S", LAUNCHER, "99", *argv],
        )
        self.assertTrue(os.path.isfile(LAUNCHER))

    def test_containedStopSignalsTheGroup(self) -> None:
        """
        Launched contained, the spawner gets the launcher argv; a stop sends
        TERM to the group, and KILL C{killGrace} seconds later, through
        the group signaller; once the supervisor has exited nothing more is
        sent and no timer is left.
        """
        sent: list[tuple[int | None, str]] = []
        render = launch(
            self.spawner, self.clock, plan(), lambda payloads: None, killGrace=5, path=str(self.dir),
            contain=True, signals=lambda transport, name: sent.append((transport.pid, name)),
        )  # fmt: skip
        process = self.spawner.processes[-1]
        self.assertEqual(process.args, launcherArgv(["/bin/render", "--fast"], os.getpid()))
        self.assertEqual(process.executable, sys.executable)
        ended = render.stop("cancel")
        self.assertEqual(sent, [(4242, "TERM")])
        self.clock.advance(5)
        self.assertEqual(sent, [(4242, "TERM"), (4242, "KILL")])
        self.assertEqual(process.signals, [])
        process.exit(None, "KILL")
        status = self.successResultOf(ended)
        self.assertEqual((status.signal, status.stopReason), (9, "cancel"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fakeSpawnerIsNotContained(self) -> None:
        """
        By default only a real reactor's renders are contained: a fake
        spawner gets the plan's argv, and its process (standing for the
        group) gets the signals.
        """
        render = launch(self.spawner, self.clock, plan(), lambda payloads: None, killGrace=5)
        process = self.spawner.processes[-1]
        self.assertEqual(process.args, ["/bin/render", "--fast"])
        render.stop("cancel")
        self.clock.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.exit(None, "KILL")

    def test_privateWorkingDirectory(self) -> None:
        """
        With a C{path}, the render runs in a fresh directory of its own
        under C{path/.work}, mode 0700, which is its C{HOME} and C{TMPDIR};
        the operator's variables come last. The directory is removed when
        the render ends, and C{.work} with it once no render uses it.
        """
        first = launch(
            self.spawner, self.clock, plan(env={"PATH": "/usr/bin", "HOME": "/root"}), lambda payloads: None,
            path=str(self.dir), extraEnv={"TMPDIR": "/fast", "EXTRA": "1"},
        )  # fmt: skip
        one = self.spawner.processes[-1]
        second = launch(self.spawner, self.clock, plan(), lambda payloads: None, path=str(self.dir))
        two = self.spawner.processes[-1]
        workDir = Path(one.path)
        self.assertEqual(workDir.parent, self.dir / WORK_DIR)
        self.assertNotEqual(one.path, two.path)
        self.assertEqual(stat.S_IMODE(workDir.stat().st_mode), 0o700)
        self.assertEqual(one.env, {"PATH": "/usr/bin", "HOME": str(workDir), "TMPDIR": "/fast", "EXTRA": "1"})
        (workDir / "nested").mkdir()
        (workDir / "nested" / "file").write_text("x")
        one.exit(0)
        self.successResultOf(first.whenEnded())
        self.assertFalse(workDir.exists())
        self.assertTrue((self.dir / WORK_DIR).is_dir())
        two.exit(3)
        self.successResultOf(second.whenEnded())
        self.assertEqual(os.listdir(self.dir), [])

    def test_workingDirectoryRemovedWhenSpawnFails(self) -> None:
        """
        A render that cannot start leaves no working directory.
        """
        self.spawner.failWith = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.assertRaises(
            OSError, launch, self.spawner, self.clock, plan(), lambda payloads: None, path=str(self.dir)
        )
        self.assertEqual(os.listdir(self.dir), [])

    def test_fakeSpawnerChecksTheWorkingDirectory(self) -> None:
        """
        Like the real one, the fake spawner refuses a working directory
        that does not exist, and NUL bytes in argv or environment.
        """
        protocol = RenderProtocol(plan(), lambda payloads: None)
        self.assertRaises(OSError, self.spawner.spawnProcess, protocol, "x", ["x"], {}, str(self.dir / "no"))
        self.assertRaises(ValueError, self.spawner.spawnProcess, protocol, "x", ["x", "a\0b"], {})
        self.assertRaises(ValueError, self.spawner.spawnProcess, protocol, "x", ["x"], {"A": "\0"})

    def test_leftoversRemoved(self) -> None:
        """
        L{removeWorkDirs} removes what a dead service left, even a
        directory the render made unreadable, without following a symlink
        out of the tree (its target is untouched).
        """
        outside = self.dir / "outside"
        outside.mkdir()
        (outside / "precious").write_text("keep")
        outside.chmod(0o755)
        leftover = self.dir / WORK_DIR / "render-x"
        (leftover / "locked" / "deeper").mkdir(parents=True)
        (leftover / "locked" / "deeper" / "file").write_text("x")
        (leftover / "link").symlink_to(outside)
        (leftover / "locked").chmod(0)
        removeWorkDirs(self.dir)
        self.assertFalse((self.dir / WORK_DIR).exists())
        self.assertEqual((outside / "precious").read_text(), "keep")
        self.assertEqual(stat.S_IMODE(outside.stat().st_mode), 0o755)
        removeWorkDirs(self.dir)  # nothing there: no error


class EnvironmentTests(SynchronousTestCase):
    def test_allowList(self) -> None:
        """
        A command renderer gets C{PATH}, C{LANG} and C{LC_ALL} of the
        service's environment, nothing else of it, with defaults for
        C{PATH} and C{LANG}; then its C{TWISTEDSSE_*} variables.
        """
        self.patch(os, "environ", {"PATH": "/opt/bin", "LC_ALL": "de_DE.UTF-8", "AWS_SECRET": "s", "HOME": "/root"})
        self.assertEqual(allowedEnvironment(os.environ), {"PATH": "/opt/bin", "LC_ALL": "de_DE.UTF-8", "LANG": "C.UTF-8"})
        self.assertEqual(allowedEnvironment({}), {"PATH": os.defpath, "LANG": "C.UTF-8"})
        workdir = makeDir(self)
        env = CommandRenderer("r", ["/bin/r"]).plan({}, workdir, "job").env
        self.assertEqual(
            env,
            {"PATH": "/opt/bin", "LC_ALL": "de_DE.UTF-8", "LANG": "C.UTF-8",
             "TWISTEDSSE_OUTPUT": str(workdir / "job.part.mp4"), "TWISTEDSSE_RENDER_ID": "job"},
        )  # fmt: skip

    def test_renderEnv(self) -> None:
        """
        C{--render-env NAME} passes the service's variable on (if it has
        it), C{NAME=VALUE} sets one; malformed names, NULs and twistedsse's
        own names are refused.
        """
        self.assertEqual(
            renderEnvironment(["TOKEN", "MISSING", "MODE=fast", "EMPTY=", "EQ=a=b"], {"TOKEN": "t"}),
            {"TOKEN": "t", "MODE": "fast", "EMPTY": "", "EQ": "a=b"},
        )
        for bad in ("", "=x", "1X", "A-B", "A B=1", "X=a\0b", "TWISTEDSSE_OUTPUT=/etc/passwd", "twistedsse_x"):
            self.assertRaises(ValueError, checkRenderEnv, bad)

"""
Running one render process: L{launch} spawns a L{RenderPlan}'s argv
(never through a shell), turns its stdout into progress payloads as they
arrive, keeps a bounded tail of its stderr, and ends it with TERM, then
KILL after a grace period, when asked to (cancel, timeout, shutdown).

A render is contained: it runs under the supervisor of
L{twistedsse._launcher} in a process group and session of its own, which
every stop signals as a whole (grandchildren included), and which dies with
the service; and it runs in a private working directory, made for it
(mode 0700) and removed when it ends, whose path is its C{HOME} and
C{TMPDIR}.

A render ends when its process has exited and its pipes are closed. A
process it started may hold them open after it exits (a shell wrapper
whose command lives on): then its pipes are closed for it, C{killGrace}
seconds after the exit or at once when the render is stopped, so a render
never outlives its process by more than that.

Imports only C{twisted.internet}: no HTTP here.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal as _signal
import stat
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

import attrs
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._errors import RenderProtocolError
from ._interfaces import RenderPlan
from ._json import JSONObject
from ._launcher import killGroupMembers

STDERR_LINES = 20
_STDERR_LINE_MAX = 2000

#: The directory, in the directory renders are started from (the output
#: directory), that holds their private working directories.
WORK_DIR = ".work"

#: The supervisor run in front of every contained render, as a script.
LAUNCHER = str(Path(__file__).with_name("_launcher.py"))

_log = Logger()


@attrs.frozen
class ExitStatus:
    """
    How a render process ended.

    @ivar exitCode: its exit code, or C{None} if a signal ended it.
    @ivar signal: the signal that ended it, or C{None}.
    @ivar stderrTail: its last lines of stderr.
    @ivar protocolError: why its output was refused, if it was (the process
        was then stopped).
    @ivar stopReason: why we stopped it (C{"cancel"}, C{"timeout"},
        C{"shutdown"}), or C{None} if we did not.
    """

    exitCode: int | None
    signal: int | None
    stderrTail: tuple[str, ...] = ()
    protocolError: str | None = None
    stopReason: str | None = None

    @property
    def succeeded(self) -> bool:
        # ffmpeg prints "progress=end" when TERMed too: only exit 0 counts.
        return (
            self.exitCode == 0
            and self.signal is None
            and self.protocolError is None
            and self.stopReason is None
        )


class _StderrTail:
    """
    The last C{size} non-empty lines of a stream, split on LF and CR (progress
    meters redraw with CR), each cut to a bounded length, so a child that
    floods stderr costs a fixed amount of memory.
    """

    def __init__(self, size: int = STDERR_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=size)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        parts = data.replace(b"\r", b"\n").split(b"\n")
        self._partial = parts.pop()[-_STDERR_LINE_MAX:]
        for part in parts[-(self._lines.maxlen or 0) :]:
            if part.strip():
                self._lines.append(part[:_STDERR_LINE_MAX].decode("utf-8", "replace"))

    def lines(self) -> tuple[str, ...]:
        tail = list(self._lines)
        if self._partial.strip():
            tail.append(self._partial.decode("utf-8", "replace"))
        return tuple(tail[-(self._lines.maxlen or 0) :])


class RenderProtocol(ProcessProtocol):
    """
    Feeds a render's stdout to its plan's parser and reports the progress
    payloads of each read together (several when the render printed
    faster than they were read); writes the plan's stdin; records how the
    process ended.

    @ivar ended: fires with an L{ExitStatus} when the process has exited
        and its pipes are closed. It never errbacks.
    """

    def __init__(
        self,
        plan: RenderPlan,
        onProgress: Callable[[list[JSONObject]], None],
        signals: Callable[[IProcessTransport, str], None] | None = None,
    ) -> None:
        """
        @param signals: sends a signal, by name, to the process behind a
            transport (and whatever belongs with it: L{GroupSignals} for a
            contained render); by default the transport's own
            C{signalProcess}, the process alone.
        """
        self._plan = plan
        self._onProgress = onProgress
        self._signals = signals
        self._stderr = _StderrTail()
        self._protocolError: str | None = None
        self.stopReason: str | None = None
        self.exited: Deferred[None] = Deferred()
        self.ended: Deferred[ExitStatus] = Deferred()

    @property
    def _process(self) -> IProcessTransport:
        # Typing note: ProcessProtocol.transport is optional until
        # makeConnection, which spawnProcess calls before it returns: every
        # use below comes after it.
        transport = self.transport
        assert transport is not None, "not connected to a process yet"
        return transport

    def connectionMade(self) -> None:
        if self._plan.stdin:
            self._process.write(self._plan.stdin)
        self._process.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self._protocolError is not None:
            return
        try:
            payloads = self._plan.parser.feed(data)
        except RenderProtocolError as e:
            self._deliver(_goodPayloads(e))
            self._refuse(str(e))
            return
        self._deliver(payloads)

    def outConnectionLost(self) -> None:
        if self._protocolError is None:
            try:
                payloads = self._plan.parser.end()
            except RenderProtocolError as e:
                self._deliver(_goodPayloads(e))
                self._protocolError = str(e)
                return
            self._deliver(payloads)

    def _deliver(self, payloads: Sequence[JSONObject]) -> None:
        if payloads:
            self._onProgress(list(payloads))

    def errReceived(self, data: bytes) -> None:
        self._stderr.feed(data)

    def _refuse(self, why: str) -> None:
        self._protocolError = why
        self.signal("KILL")

    def signal(self, name: str) -> bool:
        """
        Send signal C{name} (to the process's whole group, if it is
        contained); C{False} if the process has exited already.
        """
        try:
            if self._signals is None:
                self._process.signalProcess(name)
            else:
                self._signals(self._process, name)
        except ProcessExitedAlready:
            return False
        except OSError as e:  # pragma: no cover - a race with exit
            if e.errno != errno.ESRCH:
                raise
            return False
        return True

    def closePipes(self) -> None:
        """
        Close our ends of the process's pipes, so that the render can end
        even if a process it started holds them open.
        """
        if not self.ended.called:
            self._process.loseConnection()

    def processExited(self, reason: Failure) -> None:
        self.exited.callback(None)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.ended.callback(
            ExitStatus(
                exitCode=getattr(value, "exitCode", None),
                signal=getattr(value, "signal", None),
                stderrTail=self._stderr.lines(),
                protocolError=self._protocolError,
                stopReason=self.stopReason,
            )
        )


@attrs.frozen
class GroupSignals:
    """
    Signals a contained render: the whole process group its supervisor
    (L{twistedsse._launcher}) leads, whose id is the supervisor's pid, so
    that a stop reaches every process the render started.

    C{KILL} spares the supervisor: it KILLs every other process of the
    group, then wakes the supervisor (C{SIGCONT}, in case the render
    stopped its group), which collects them and exits as the render did.
    Killed with them, the supervisor would leave the render's process for
    init to collect, which in a container may never happen. Where there
    is no C{/proc} to find the group's processes in, the whole group is
    KILLed.

    A group id is only used while the supervisor has not been collected
    (the transport still has its pid): until then the id cannot name
    another group. Before the supervisor has made its group (the first
    milliseconds of its life) there is no such group; it alone exists
    then, and is signalled alone.

    @ivar killpg: C{os.killpg}, or a fake in tests.
    @ivar kill: C{os.kill}, or a fake in tests.
    @ivar killMembers: L{twistedsse._launcher.killGroupMembers}, or a
        fake in tests.
    """

    killpg: Callable[[int, int], None] = os.killpg
    kill: Callable[[int, int], None] = os.kill
    killMembers: Callable[[int, int], object] = killGroupMembers

    def __call__(self, transport: IProcessTransport, name: str | int) -> None:
        """
        @raise ProcessExitedAlready: the supervisor has exited and been
            collected.
        """
        pid = transport.pid
        if pid is None:
            raise ProcessExitedAlready()
        number = int(getattr(_signal, f"SIG{name}")) if isinstance(name, str) else int(name)
        try:
            if number == _signal.SIGKILL:
                self.killpg(pid, 0)
                try:
                    self.killMembers(pid, pid)
                except OSError:
                    self.killpg(pid, number)
                else:
                    self.kill(pid, _signal.SIGCONT)
            else:
                self.killpg(pid, number)
        except ProcessLookupError:
            self.kill(pid, number)


def launcherArgv(argv: Sequence[str], servicePID: int, python: str | None = None) -> list[str]:
    """
    The argv that runs C{argv} contained, under L{twistedsse._launcher}:
    the interpreter isolated from the environment (C{-I}, so the render's
    C{PYTHONPATH} and friends do not touch it) and without site packages
    (C{-S}, the fastest start), then C{argv} exactly as given.
    """
    return [python or sys.executable, "-I", "-S", LAUNCHER, str(servicePID), *argv]


def _makeWorkDir(parent: Path) -> Path:
    """
    A fresh private directory (0700) for one render, under
    C{parent/.work}; absolute, as it becomes the render's C{HOME}.
    """
    root = parent.absolute() / WORK_DIR
    for _ in range(3):
        root.mkdir(mode=0o700, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(prefix="render-", dir=root))
        except FileNotFoundError:
            # The last render out removed the parent between the two
            # calls: a render of another process sharing the directory
            # (Redis mode's workers).
            continue
    root.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="render-", dir=root))


def removeWorkDirs(parent: Path) -> None:
    """
    Remove every render working directory under C{parent}: at start,
    those a service that died left behind.
    """
    _removeTree(Path(parent) / WORK_DIR)


def _removeWorkDir(path: Path) -> None:
    _removeTree(path)
    try:
        # The last one out removes the parent too, so that the output
        # directory holds outputs only.
        path.parent.rmdir()
    except OSError:
        pass


def _removeTree(path: Path) -> None:
    """
    Remove C{path} and everything in it, whatever a render did to it: a
    directory it made unreadable or unwritable is opened up first, through
    a descriptor that refuses to follow a symlink, so nothing outside the
    tree is ever touched.
    """
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    for root, dirs, files in os.walk(path, topdown=True):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.fchmod(fd, 0o700)
            except OSError:
                pass
            finally:
                os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _log.warn("could not remove the render directory {path}", path=path)


@attrs.define
class RunningRender:
    """
    A render process that has been started.

    @ivar workDir: its private working directory, removed when it ends.
    """

    protocol: RenderProtocol
    _clock: IReactorTime
    killGrace: float
    workDir: Path | None = None
    _killer: IDelayedCall | None = None
    _drainer: IDelayedCall | None = None

    def whenEnded(self) -> Deferred[ExitStatus]:
        """
        A new Deferred that fires with the L{ExitStatus}.
        """
        d: Deferred[ExitStatus] = Deferred()

        def relay(status: ExitStatus) -> ExitStatus:
            d.callback(status)
            return status

        self.protocol.ended.addCallback(relay)
        return d

    def __attrs_post_init__(self) -> None:
        self.protocol.exited.addCallback(self._exited)
        self.protocol.ended.addBoth(self._cancelTimers)
        self.protocol.ended.addBoth(self._removeWorkDir)

    def stop(self, reason: str) -> Deferred[ExitStatus]:
        """
        Ask the process to stop (TERM), and KILL it if it has not exited
        C{killGrace} seconds later (procmon's C{murder} pattern), closing
        its pipes then too. If it has exited already, only its pipes are
        left, held open by a process it started: they are closed at once.
        The first reason given is the one recorded.
        """
        if self.protocol.stopReason is None:
            self.protocol.stopReason = reason
        if self._killer is None and not self.protocol.ended.called:
            if self.protocol.signal("TERM"):
                self._killer = self._clock.callLater(self.killGrace, self._kill)
            else:
                self.protocol.closePipes()
        return self.whenEnded()

    def _kill(self) -> None:
        self.protocol.signal("KILL")
        self.protocol.closePipes()

    def _exited(self, result: None) -> None:
        # The process is gone: what is still in its pipes arrives at once,
        # and anything later comes from a process it left behind.
        if not self.protocol.ended.called:
            self._drainer = self._clock.callLater(self.killGrace, self.protocol.closePipes)

    def _cancelTimers(self, result: object) -> object:
        for timer in (self._killer, self._drainer):
            if timer is not None and timer.active():
                timer.cancel()
        return result

    def _removeWorkDir(self, result: object) -> object:
        # Before anyone hears that the render ended: a service stopping
        # leaves no directory behind once its renders have ended.
        if self.workDir is not None:
            _removeWorkDir(self.workDir)
        return result


def _goodPayloads(error: RenderProtocolError) -> Sequence[JSONObject]:
    """
    The payloads of the good lines that came before the broken one in the
    same chunk, which a parser may attach to its error (as
    C{twistedsse._command.BrokenOutput} does).
    """
    payloads: Sequence[JSONObject] = getattr(error, "payloads", ())
    return payloads


def _findExecutable(name: str, env: Mapping[str, str], cwd: str | None) -> None:
    """
    Check that C{name} can be executed the way the child will look for it
    (C{os.execvpe}: a name with a slash as it is, from the child's working
    directory; any other along the C{PATH} of the child's environment).

    A real reactor forks and execs when the child gets a working directory
    (it always does here), so a missing binary is only found out in the
    forked child, which prints a Python traceback naming server paths on
    its stderr and exits 1: a render failure that looks like the
    renderer's own, and leaks the paths to clients through
    C{stderr_tail}. Checked first, it is an C{OSError} from L{launch}, as
    C{posix_spawn} (and L{twistedsse.testing.FakeSpawner}) would report it.

    @raise OSError: with the errno C{exec} would give: C{ENOENT} (no
        such file), C{EACCES} (not an executable file), or the error of a
        path that cannot be looked at (C{ENOTDIR}, ...).
    """

    def check(path: str) -> int | None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return e.errno or errno.ENOENT
        if not stat.S_ISREG(mode) or not os.access(path, os.X_OK):
            return errno.EACCES
        return None

    base = cwd or os.curdir
    if os.sep in name:
        problem = check(os.path.join(base, name))
    else:
        problem = errno.ENOENT
        for folder in env.get("PATH", os.defpath).split(os.pathsep):
            found = check(os.path.join(base, folder, name))
            if found is None:
                return
            if found == errno.EACCES:
                # execvp goes on looking, and reports EACCES if nothing
                # better turns up.
                problem = errno.EACCES
    if problem is not None:
        raise OSError(problem, os.strerror(problem), name)


def launch(
    spawner: IReactorProcess,
    clock: IReactorTime,
    plan: RenderPlan,
    onProgress: Callable[[list[JSONObject]], None],
    killGrace: float = 5.0,
    path: str | None = None,
    extraEnv: Mapping[str, str] | None = None,
    contain: bool | None = None,
    signals: Callable[[IProcessTransport, str], None] | None = None,
) -> RunningRender:
    """
    Start C{plan}'s process.

    @param path: the directory in which the render gets its private
        working directory (under C{.work}); C{None} runs it in ours.
    @param extraEnv: the operator's additions to every render's
        environment, over the plan's own and C{HOME}/C{TMPDIR}.
    @param contain: run it under the L{twistedsse._launcher} supervisor,
        in its own process group, and stop it by signalling the group; by
        default when C{spawner} is a real reactor (a fake one runs no
        process: its fake stands for the whole group) and knows its
        interpreter (C{sys.executable}) to run the supervisor with.
    @param signals: how the group is signalled (L{GroupSignals} by
        default), for tests.
    @raise OSError: it could not be started (missing or non-executable
        binary, too many processes).
    """
    real = isinstance(spawner, ReactorBase)
    if contain is None:
        # An embedded interpreter may not know its own executable: then
        # there is no supervisor to run.
        contain = real and bool(sys.executable)
    argv = list(plan.argv)
    env = dict(plan.env)
    workDir = None
    if path is not None:
        workDir = _makeWorkDir(Path(path))
        env["HOME"] = env["TMPDIR"] = str(workDir)
    env.update(extraEnv or {})
    try:
        if real:
            # Only a real reactor runs real binaries; a fake spawner's are
            # names, and it reports a failed start itself.
            _findExecutable(argv[0], env, None if workDir is None else str(workDir))
        if contain:
            protocol = RenderProtocol(plan, onProgress, signals or GroupSignals())
            argv = launcherArgv(argv, os.getpid())
        else:
            protocol = RenderProtocol(plan, onProgress)
        spawner.spawnProcess(
            protocol, argv[0], argv, env=env, path=None if workDir is None else str(workDir)
        )
    except BaseException:
        if workDir is not None:
            _removeWorkDir(workDir)
        raise
    return RunningRender(protocol, clock, killGrace, workDir)

"""
A bounded server launcher: start a process, wait for the line that says it
listens (with a deadline: a process that says nothing fails the test with
its output instead of hanging it), and stop exactly that process, by PID,
at teardown.

L{Launched} and L{Server} block (for synchronous tests: browsers, load,
the Procfile); L{spawnService} runs on the reactor (for trial TestCases).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from .waiting import PipeReader, TimedOut

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
TICKER = str(ROOT / "tests" / "integration" / "ticker.py")
TWISTD = str(Path(sys.executable).with_name("twistd"))

#: How long a server may take to say it listens.
START_TIMEOUT = 30.0


def childEnv(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """
    C{base} (this process's environment by default) with the checkout on
    C{PYTHONPATH}, so a child can import C{twistedsse} and C{tests}.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Launched:
    """
    A child process whose stdout is a pipe read with a deadline
    (L{PipeReader}).

    @param stderr: where its stderr goes (C{subprocess.STDOUT}: into the
        same pipe).
    @param newSession: start it in a session (and process group) of its
        own, and signal the whole group when stopping it (for a shell
        command and what it starts).
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | Path = ROOT,
        stderr: IO[bytes] | int | None = None,
        stdin: int | None = subprocess.DEVNULL,
        newSession: bool = False,
    ) -> None:
        self.newSession = newSession
        self.process = subprocess.Popen(
            list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, env=env if env is not None else childEnv(),
            cwd=cwd, start_new_session=newSession,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.pid = self.process.pid
        self.reader = PipeReader(self.process.stdout)

    @property
    def output(self) -> bytes:
        return self.reader.output

    def readUntil(self, found: Callable[[bytes], T], timeout: float) -> T | None:
        """
        See L{PipeReader.readUntil}: C{None} if its output closed or the time
        ran out first.
        """
        return self.reader.readUntil(found, timeout)

    def waitFor(self, found: Callable[[bytes], T], timeout: float, what: str, log: Callable[[], str] = str) -> T:
        """
        L{readUntil}, which stops the process and fails with its output if
        C{found} never holds.

        @param log: more of what it said (its stderr, if that went to a file).
        @raise TimedOut: C{timeout} seconds passed first.
        @raise AssertionError: it closed its output (ended) first.
        """
        value = self.readUntil(found, timeout)
        if value:
            return value
        why = "ended" if self.reader.closed else f"said nothing of it within {timeout:g} s"
        output = self.output.decode(errors="replace")[-4000:] + log()
        self.stop()
        raise (AssertionError if self.reader.closed else TimedOut)(f"{what}: the process {why}; its output:\n{output}")

    def send(self, number: int) -> None:
        if self.newSession:
            os.killpg(self.pid, number)
        else:
            self.process.send_signal(number)

    def stop(self, number: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """
        Signal it (SIGTERM by default, as an operator's supervisor would),
        and KILL it if it is still there after C{timeout} seconds.

        @return: its exit status.
        @raise AssertionError: it ignored the signal and had to be killed.
        """
        try:
            if self.process.poll() is None:
                self.send(number)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.send(signal.SIGKILL)
                    self.process.wait()
                    raise AssertionError(f"process {self.pid} ignored signal {number} for {timeout:g} s")
        finally:
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
        return self.process.returncode


class Server:
    """
    A twistedsse server process (L{tests._support.serve}) with the ticker
    renderers C{tickers}: started with a deadline, stopped by PID.

    @ivar ports: the port of each C{--listen}, in order.
    """

    def __init__(self, *args: str, tickers: Sequence[str] = ("ticks",), netns: str | None = None,
                 timeout: float = 20.0) -> None:  # fmt: skip
        argv = [sys.executable, "-m", "tests._support.serve", *args]
        for name in tickers:
            argv += ["--renderer", f"{name}={sys.executable} -u {TICKER}"]
        if not any(a.startswith("--listen") or a == "-l" for a in args):
            argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.log = tempfile.TemporaryFile(prefix="twistedsse-server-", suffix=".log")
        try:
            self.launched = Launched(argv, stderr=self.log)
        except BaseException:
            self.log.close()
            raise
        self.process = self.launched.process
        self.launched.waitFor(lambda out: re.search(rb"^READY$", out, re.M), timeout, "server start", self.logText)
        self.ports = [int(port) for port in re.findall(rb"^LISTENING .* (\d+)$", self.launched.output, re.M)]

    @property
    def port(self) -> int:
        return self.ports[0]

    def logText(self) -> str:
        """
        The end of what it logged (its stderr).
        """
        if self.log.closed:
            return ""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")[-4000:]
        self.log.seek(0, os.SEEK_END)
        return text

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM, as an operator's supervisor would; KILL if it hangs.
        """
        try:
            return self.launched.stop(signal.SIGTERM, timeout)
        finally:
            self.log.close()


class ServiceProcess(ProcessProtocol):
    """
    A twistedsse service process (twistd, or C{python -m twistedsse}) as
    the tests see it: its output so far, C{listening} (fires with the port
    once it logs that its site is listening; errbacks with its output if it
    ends first, or with L{TimedOut} if L{spawnService}'s deadline passes)
    and C{ended} (fires with how it ended).
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        found = re.search(rb"Site starting on (\d+)", self.output)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

    def processEnded(self, reason: Any) -> None:
        self.notListening(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)

    def notListening(self, error: Exception) -> None:
        if not self.listening.called:
            self.listening.errback(error)

    def kill(self) -> Deferred[Any]:
        """
        SIGKILL it, unless it has ended: C{ended}. For a test's cleanup.
        """
        if not self.ended.called:
            try:
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]
            except Exception:
                pass
        return self.ended


def spawnService(
    argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = START_TIMEOUT, reactor: Any = None
) -> tuple[Any, ServiceProcess]:
    """
    Spawn C{argv} on the reactor as a L{ServiceProcess} whose C{listening}
    fails with L{TimedOut} (and its output) if the service does not say it
    listens within C{timeout} seconds. Register C{protocol.kill} as the
    test's cleanup.
    """
    if reactor is None:
        from twisted.internet import reactor
    protocol = ServiceProcess()
    process = reactor.spawnProcess(protocol, argv[0], list(argv), env=env if env is not None else childEnv())
    deadline = reactor.callLater(
        timeout,
        lambda: protocol.notListening(
            TimedOut(f"not listening within {timeout:g} s: {protocol.output.decode(errors='replace')[-4000:]}")
        ),
    )
    protocol.listening.addBoth(lambda result: (deadline.cancel() if deadline.active() else None, result)[1])
    return process, protocol


def twistdArgv(*options: str, logfile: str = "-") -> list[str]:
    """
    C{twistd -n twistedsse} on an ephemeral 127.0.0.1 port with the C{ticks}
    renderer, and C{options}, logging to C{logfile} (stdout by default).
    """
    return [
        TWISTD, "--nodaemon", "--pidfile=", f"--logfile={logfile}", "twistedsse",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--renderer", f"ticks={sys.executable} -u {TICKER}",
        "--kill-grace", "2", *options,
    ]  # fmt: skip


def startTwistd(*options: str, timeout: float = START_TIMEOUT) -> tuple[Any, ServiceProcess]:
    """
    L{twistdArgv}'s twistd, spawned on the reactor (L{spawnService}).
    """
    return spawnService(twistdArgv(*options), timeout=timeout)


class TwistdMixin:
    """
    For trial TestCases: L{startTwistd}, failing if there is no twistd,
    with the process killed at cleanup (if it has not ended).
    """

    def startTwistd(self, *options: str) -> tuple[Any, ServiceProcess]:
        if not os.path.exists(TWISTD):
            self.fail(f"no twistd next to {sys.executable}")  # type: ignore[attr-defined]
        process, protocol = startTwistd(*options)
        self.addCleanup(protocol.kill)  # type: ignore[attr-defined]
        return process, protocol


def _twistdExitsOnUsageError() -> bool:
    from twisted import version

    return (version.major, version.minor) >= (26, 10)


#: Whether twistd exits non-zero when the plugin's options refuse to start
#: (a C{UsageError}). Before Twisted 26.10 it printed the error and exited
#: 0 (twisted#12656); the tests check the status where Twisted sets it,
#: and the message everywhere.
TWISTD_EXITS_ON_USAGE_ERROR = _twistdExitsOnUsageError()

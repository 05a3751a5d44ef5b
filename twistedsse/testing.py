"""
Test helpers for code that uses twistedsse: a spawner whose processes the
test drives by hand, on a L{Clock}.

The fake validates its arguments as C{reactor.spawnProcess} and C{exec}
do (strings without NUL, a working directory that exists) and hands the
test the protocol, so the real L{RenderProtocol} and L{RenderService} run
unchanged (the shape of Twisted's own C{DummyProcessReactor}).

A render started through a fake spawner is not contained (no process runs,
so no supervisor either): its L{FakeProcess} stands for the render's whole
process group, and the signals it records are those the group got.
"""

from __future__ import annotations

import errno
import os
from typing import AnyStr, Iterable, Mapping, Sequence

import attrs
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IAddress, IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.python.failure import Failure
from zope.interface import implementer

_SIGNALS = {"TERM": 15, "KILL": 9, "INT": 2, "HUP": 1}


@implementer(IProcessTransport)
@attrs.define(eq=False)
class FakeProcess:
    """
    A started fake process: what was written to its stdin, the signals it
    got, and methods to make it print and exit.
    """

    protocol: IProcessProtocol
    executable: str | bytes
    args: Sequence[str | bytes]
    env: Mapping[str, str] | Mapping[bytes, bytes]
    path: str | bytes | None
    pid: int | None = 4242
    stdin: bytes = b""
    stdinClosed: bool = False
    signals: list[str] = attrs.Factory(list)

    # -- IProcessTransport ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self.stdinClosed:
            raise RuntimeError("write to a closed stdin")
        self.stdin += data

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        for data in seq:
            self.write(data)

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.write(data)

    def loseConnection(self) -> None:
        self.closeStdin()

    # Typing note: a process has no address. The fake answers None, as it
    # always has (Twisted's own Process raises NotImplementedError).
    def getPeer(self) -> IAddress | None:  # type: ignore[override]
        return None

    def getHost(self) -> IAddress | None:  # type: ignore[override]
        return None

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(str(signalID))

    # -- driving it ----------------------------------------------------

    def stdout(self, data: bytes) -> None:
        self.protocol.childDataReceived(1, data)

    def stderr(self, data: bytes) -> None:
        self.protocol.childDataReceived(2, data)

    def exit(self, code: int | None = 0, signal: str | None = None) -> None:
        """
        End the process with exit C{code}, or by C{signal} (e.g. C{"KILL"}).
        """
        if self.pid is None:
            raise RuntimeError("the process has exited already")
        self.pid = None
        for fd in (0, 1, 2):
            self.protocol.childConnectionLost(fd)
        if signal is None and code == 0:
            reason = Failure(ProcessDone(0))
        else:
            number = None if signal is None else _SIGNALS[signal]
            reason = Failure(ProcessTerminated(exitCode=None if signal else code, signal=number))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)


@implementer(IReactorProcess)
@attrs.define
class FakeSpawner:
    """
    Records every spawn; C{processes[-1]} is the latest.

    @ivar failWith: if set, C{spawnProcess} raises it (a missing binary).
    """

    processes: list[FakeProcess] = attrs.Factory(list)
    failWith: Exception | None = None

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: str | bytes,
        args: Sequence[str | bytes] = (),
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: str | bytes | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcess:
        if not IProcessProtocol.providedBy(processProtocol):
            raise TypeError(f"{processProtocol!r} does not provide IProcessProtocol")
        if not isinstance(executable, (str, bytes)) or not args:
            raise TypeError("executable must be a string and args a non-empty list")
        if any(not isinstance(arg, (str, bytes)) for arg in args):
            raise TypeError(f"every argument must be a string: {args!r}")
        # object: the checks are for callers the type checker never saw.
        texts: list[object] = [executable, *args, *(env or {}).keys(), *(env or {}).values()]
        for text in texts:
            if not isinstance(text, (str, bytes)):
                raise TypeError(f"the environment must map strings to strings: {env!r}")
            if (isinstance(text, str) and "\0" in text) or (isinstance(text, bytes) and b"\0" in text):
                raise ValueError(f"embedded null byte in {text!r}")
        if path is not None and not os.path.isdir(path):
            # The real child cannot chdir there, and cannot start.
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if self.failWith is not None:
            raise self.failWith
        process = FakeProcess(processProtocol, executable, list(args), dict(env or {}), path)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process

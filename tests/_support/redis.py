"""
A real C{redis-server} (Debian's, 7.0) for the tests: started on a free
loopback port in a directory of its own, stopped by its PID, restartable
on the same port and directory (to test a restart with or without AOF).

Missing on a developer's machine, the tests that need it skip; in CI
(C{CI=true}) they fail (L{tests._support.need}).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .need import need
from .ports import freePort
from .waiting import TimedOut

#: Seconds redis-server may take to answer PING after it starts.
START_TIMEOUT = 10.0


def redisServerPath() -> str:
    path = shutil.which("redis-server")
    need(path is not None, "no redis-server on PATH")
    return path  # type: ignore[return-value]


def ping(port: int, timeout: float = 0.5) -> bool:
    """
    Whether a Redis server on 127.0.0.1:C{port} answers C{PING} now.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """
    One C{redis-server} process. Call L{stop} (or use it as a context
    manager / C{addCleanup(server.stop)}): nothing is left running.

    @param appendOnly: with AOF persistence (C{appendfsync always}): a
        restart loses nothing written before it.
    @param password: C{requirepass}, for the password-file tests.
    """

    def __init__(self, appendOnly: bool = False, password: str | None = None) -> None:
        self.executable = redisServerPath()
        self.port = freePort()
        self.directory = Path(tempfile.mkdtemp(prefix="twistedsse-redis-"))
        self.appendOnly = appendOnly
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendOnly else "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.appendOnly:
            argv += ["--appendfsync", "always"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> None:
        """
        Start it (again: same port, same directory) and wait until it
        answers, or fail with its log.
        """
        assert self.process is None, "already running"
        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._answers():
                return
            time.sleep(0.02)
        log = self.log()
        self.stop()
        raise TimedOut(f"redis-server did not start on port {self.port}: {log}")

    def _answers(self) -> bool:
        if self.password is None:
            return ping(self.port)
        # With requirepass, PING answers -NOAUTH: the server is up.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return bool(s.recv(64))
        except OSError:
            return False

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """
        Stop it abruptly (SIGKILL): Redis "machine gone". The directory
        (and any AOF) stays for L{start}.
        """
        self._end(signal.SIGKILL)

    def stop(self, remove: bool = True) -> None:
        """
        Stop it (SIGTERM, then SIGKILL after 5 s); with C{remove}, delete
        its directory too.
        """
        self._end(signal.SIGTERM)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def startedService(
    case: Any, server: RedisServer, outputDir: Path, role: str, renderers: list[Any], **options: Any
) -> Any:
    """
    A L{twistedsse.RedisRenderService} on C{server} (the global reactor,
    as trial runs it), started, and stopped at C{case}'s clean-up.
    """
    from twisted.internet import reactor

    from twistedsse._build import buildService
    from twistedsse._redis import RedisEndpoint
    from twistedsse._redisservice import RedisRenderService

    service = buildService(
        reactor,
        renderers=renderers,
        outputDir=outputDir,
        redis=RedisEndpoint.fromURL(server.url),
        role=role,
        minFreeBytes=0,
        **options,
    )
    assert isinstance(service, RedisRenderService)
    service.startService()
    case.addCleanup(service.stopService)
    return service

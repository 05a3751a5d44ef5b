"""
Starting what the browser, proxy and network tests need, in processes of
their own, and stopping exactly those processes (by PID) afterwards.

These tests drive browsers through blocking WebDriver calls, so they are
synchronous (trial C{SynchronousTestCase}); the server runs in its own
process (L{tests.browsers.serve}).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from twisted.trial.unittest import SkipTest

ROOT = Path(__file__).resolve().parents[2]
TICKER = str(ROOT / "tests" / "integration" / "ticker.py")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str) -> None:
    """
    A part the test needs (a browser, nginx, network namespaces) is
    missing: skip on a developer's machine, fail in CI, where
    C{scripts/test} installs everything.
    """
    if condition:
        return
    if IN_CI:
        raise AssertionError(f"missing in CI: {what} (scripts/system-deps should have installed it)")
    raise SkipTest(f"{what}; run scripts/system-deps as root to install it")


def needProgram(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"no {name} on PATH")
    return path  # type: ignore[return-value]


class Server:
    """
    A twistedsse server process (tests/browsers/serve.py).

    @ivar ports: the port of each C{--listen}, in order.
    """

    def __init__(self, *args: str, tickers: Sequence[str] = ("ticks",), netns: str | None = None,
                 timeout: float = 20.0) -> None:
        argv = [sys.executable, "-m", "tests.browsers.serve", *args]
        for name in tickers:
            argv += ["--renderer", f"{name}={sys.executable} -u {TICKER}"]
        if not any(a.startswith("--listen") or a == "-l" for a in args):
            argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.log = tempfile.TemporaryFile(prefix="twistedsse-server-", suffix=".log")
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=ROOT)
        self.ports: list[int] = []
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline().decode()
            if line.startswith("LISTENING "):
                self.ports.append(int(line.split()[-1]))
            elif line.strip() == "READY":
                break
            elif not line or time.monotonic() > deadline:
                log = self.logText()
                self.stop()
                raise AssertionError(f"server did not start: {log}")

    @property
    def port(self) -> int:
        return self.ports[0]

    def logText(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM, as an operator's supervisor would; KILL if it hangs.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout} s")
        if self.process.stdout:
            self.process.stdout.close()
        self.log.close()
        return self.process.returncode


def postJSON(url: str, body: Any, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def getJSON(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)

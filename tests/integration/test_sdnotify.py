"""
The real C{twistd -n twistedsse} started as systemd starts it: by
C{systemd-socket-activate} (Debian's systemd package), which holds the
listening socket, execs twistd on the first connection with the socket as
fd 3 (C{LISTEN_FDS}, C{LISTEN_FDNAMES}), and passes C{$NOTIFY_SOCKET}, here
a datagram socket the test binds, as systemd's own would be. Also its
C{--log-format json} lines, as journald and log shippers read them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests._support.jsonhttp import postJSON
from tests._support.launcher import ROOT, TICKER, TWISTD, Launched, childEnv
from tests._support.need import needProgram
from tests._support.ports import freePort

CLIENT = str(ROOT / "tests" / "_support" / "sseclient.py")

#: How long twistd may take to start and answer its first request (it
#: starts on that request), on a loaded machine.
START = 30.0


class ActivatedTwistd:
    """
    C{systemd-socket-activate -l 127.0.0.1:PORT --fdname=web} running
    C{twistd -n twistedsse --listen systemd:domain=INET:name=web ...}, with
    C{$NOTIFY_SOCKET} a socket of the test's, stopped by PID at cleanup.

    @ivar launched: the process (the activator, then twistd: it execs).
    @ivar notify: the notify socket, as the service manager's.
    """

    def __init__(self, case: SynchronousTestCase, *options: str) -> None:
        activate = needProgram("systemd-socket-activate")
        # (A UNIX socket's path is at most 107 bytes: mktemp's are long.)
        directory = tempfile.mkdtemp(prefix="sdn")
        case.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        case.addCleanup(os.unlink, path)
        case.addCleanup(self.notify.close)
        self.stderr = Path(case.mktemp()).absolute()
        for attempt in range(3):
            self.port = freePort()
            # The activator passes on only what -E names (and PATH, HOME).
            argv = [
                activate, "-l", f"127.0.0.1:{self.port}", "--fdname=web",
                "-E", f"NOTIFY_SOCKET={path}", "-E", f"PYTHONPATH={childEnv()['PYTHONPATH']}",
                TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "twistedsse",
                "--listen", "systemd:domain=INET:name=web",
                "--renderer", f"ticks={sys.executable} -u {TICKER}",
                "--output-dir", os.path.abspath(case.mktemp()), "--kill-grace", "2", *options,
            ]  # fmt: skip
            with self.stderr.open("wb") as stderr:
                self.launched = Launched(argv, stderr=stderr)
            case.addCleanup(self.launched.stop)
            if self.waitForActivator():
                return
            self.launched.stop()
        raise AssertionError(f"systemd-socket-activate could not listen: {self.stderr.read_text()}")

    def waitForActivator(self) -> bool:
        """
        Whether the activator listens (it says so on stderr), or could not
        (the free port was taken meanwhile).
        """
        for _ in range(200):
            said = self.stderr.read_text()
            if f"Listening on 127.0.0.1:{self.port}" in said:
                return True
            if "Failed" in said or self.launched.process.poll() is not None:
                return False
            self.launched.readUntil(lambda output: False, 0.05)
        raise AssertionError(f"systemd-socket-activate said nothing: {self.stderr.read_text()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, timeout: float) -> bytes | None:
        """
        The next notification, or C{None} if none comes within C{timeout}
        seconds.
        """
        self.notify.settimeout(timeout)
        try:
            return self.notify.recv(4096)
        except (TimeoutError, BlockingIOError):
            # (A timeout of 0: no waiting, and none there.)
            return None

    def events(self, path: str) -> list[dict[str, Any]]:
        """
        The event stream at C{path} as the test toolkit's client process
        reads it (until its terminal event), one dict per event.
        """
        result = subprocess.run(
            [sys.executable, CLIENT, self.url(path)], env=childEnv(), capture_output=True, timeout=START
        )
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert lines and lines[0].get("status") == 200, (result.stdout, result.stderr, self.stderr.read_text())
        return lines[1:]

    def stop(self) -> tuple[int, str]:
        """
        SIGTERM, as systemd stops a unit; read its output until it ends.

        @return: its exit status and its whole output.
        """
        self.launched.send(signal.SIGTERM)
        self.launched.readUntil(lambda output: False, 20)
        if not self.launched.reader.closed:
            raise AssertionError(f"twistd still running 20 s after SIGTERM: {self.launched.output[-4000:]!r}")
        return self.launched.stop(), self.launched.output.decode()


class SocketActivationTests(SynchronousTestCase):
    def test_notifiedAndServedOnThePassedSocket(self) -> None:
        """
        twistd started on the first connection serves a render and its
        event stream on the socket it was passed; C{READY=1} (naming that
        socket's address) was sent before that first answer, C{STOPPING=1}
        comes on SIGTERM, and twistd then exits as systemd counts a clean
        stop.
        """
        twistd = ActivatedTwistd(self)
        self.assertIsNone(twistd.received(0.2), "nothing before it starts")
        code, job = postJSON(
            twistd.url("/renders"), {"renderer": "ticks", "params": {"count": 3, "interval": 0.01}}, timeout=START
        )
        self.assertEqual(code, 202, job)
        # Already there when the first answer came: sent before it served.
        self.assertEqual(twistd.received(0), f"READY=1\nSTATUS=serving on 127.0.0.1:{twistd.port}".encode())
        events = twistd.events(job["events_url"])
        self.assertEqual([e["event"] for e in events][-1], "complete")
        self.assertEqual([json.loads(e["data"])["i"] for e in events if e["event"] == "progress"][-1], 3)
        self.assertIsNone(twistd.received(0), "one READY=1, nothing else while it runs")

        code, output = twistd.stop()
        self.assertEqual(twistd.received(5), b"STOPPING=1\nSTATUS=stopping: draining renders and streams")
        # twistd ends itself with the signal that stopped it, which systemd
        # counts as a clean stop.
        self.assertIn(code, (0, -signal.SIGTERM), output[-4000:])
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)

    def test_redisMode(self) -> None:
        """
        In Redis mode (a web instance and a worker in one process), C{READY=1}
        comes once its Redis connections answer, and the render it then
        takes runs; C{STOPPING=1} on SIGTERM.
        """
        from tests._support.redis import RedisServer

        redis = RedisServer()
        self.addCleanup(redis.stop)
        twistd = ActivatedTwistd(self, "--redis", redis.url, "--role", "all")
        code, job = postJSON(
            twistd.url("/renders"), {"renderer": "ticks", "params": {"count": 3, "interval": 0.01}}, timeout=START
        )
        self.assertEqual(code, 202, job)
        ready = twistd.received(10)
        self.assertEqual(ready, f"READY=1\nSTATUS=serving on 127.0.0.1:{twistd.port}".encode())
        self.assertEqual(twistd.events(job["events_url"])[-1]["event"], "complete")
        code, output = twistd.stop()
        self.assertEqual(twistd.received(5), b"STOPPING=1\nSTATUS=stopping: draining renders and streams")
        self.assertIn(code, (0, -signal.SIGTERM), output[-4000:])

    def test_jsonLogs(self) -> None:
        """
        With C{--log-format json} every line twistd writes is one JSON
        object (its own start-up lines too); the render's lines carry its
        C{jobID}; the operator's token appears nowhere.
        """
        token = "sekrit-token-" + os.urandom(8).hex()
        tokens = Path(self.mktemp()).absolute()
        tokens.write_text(token + "\n")
        twistd = ActivatedTwistd(self, "--log-format", "json", "--auth-token-file", str(tokens))
        request = {"renderer": "ticks", "params": {"count": 3, "interval": 0.01}}
        code, refused = postJSON(twistd.url("/renders"), request, timeout=START)
        self.assertEqual(code, 401, refused)
        authorized = urllib.request.Request(
            twistd.url("/renders"), data=json.dumps(request).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )  # fmt: skip
        with urllib.request.urlopen(authorized, timeout=START) as response:
            job = json.load(response)
        self.assertEqual(twistd.events(job["events_url"])[-1]["event"], "complete")
        # (Logged once the render's end is recorded, which its stream's end
        # may beat by a moment.)
        twistd.launched.readUntil(lambda output: f"render {job['id']} ended".encode() in output, 10)
        code, output = twistd.stop()

        records = []
        for line in output.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                self.fail(f"not a JSON line: {line!r}")
        texts = [r["log_text"] for r in records]
        self.assertIn("Server Shut Down.", texts)
        ours = [r for r in records if r.get("jobID") == job["id"]]
        self.assertLessEqual({"submitted", "started:", "ended"}, {r["log_text"].split(" ")[2] for r in ours}, texts)
        self.assertTrue(all(r["log_namespace"].startswith("twistedsse.") for r in ours))
        self.assertNotIn(token, output + twistd.stderr.read_text())

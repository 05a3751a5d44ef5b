"""
The Procfile, run as Procfile runners run it: its C{web:} command through
C{sh -c}, with C{PORT} and the documented variables in the environment.
It listens on every interface, so it must take its authentication from the
environment, and refuse to start without any.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests._support.launcher import TWISTD_EXITS_ON_USAGE_ERROR, Launched
from tests._support.waiting import TimedOut

from twistedsse import mintToken

ROOT = Path(__file__).resolve().parents[2]


def webCommand() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line[len("web:") :].strip()
    raise AssertionError("no web: line in the Procfile")


def request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


class ProcfileTests(SynchronousTestCase):
    def run_(self, **env: str) -> tuple[subprocess.Popen[bytes], int | None, str]:
        """
        Start the Procfile's web command with C{env} added (PORT=0): the
        process, the port it listens on (None if it exited), its output.
        """
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TWISTEDSSE_")}
        environ.update(
            PORT="0",
            PATH=os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")]),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")])),
            **env,
        )
        cwd = self.mktemp()
        os.mkdir(cwd)
        launched = Launched(["sh", "-c", webCommand()], environ, cwd, stderr=subprocess.STDOUT, newSession=True)
        self.addCleanup(launched.stop)
        found = launched.readUntil(lambda out: re.search(rb"Site starting on (\d+)", out), 30)
        if found:
            return launched.process, int(found.group(1)), launched.output.decode(errors="replace")
        if not launched.reader.closed:
            raise TimedOut(f"the Procfile command neither started nor ended: {launched.output!r}")
        launched.process.wait(15)
        return launched.process, None, launched.output.decode(errors="replace")

    def test_refusesWithoutAuthentication(self) -> None:
        """
        With none of the variables set, the command exits with an error
        instead of serving every interface without a token.
        """
        process, port, output = self.run_()
        self.assertIsNone(port, output)
        status = process.wait(10)
        if TWISTD_EXITS_ON_USAGE_ERROR:
            self.assertNotEqual(status, 0)
        self.assertIn("--auth-token-file", output)

    def test_tokenFileFromTheEnvironment(self) -> None:
        """
        C{TWISTEDSSE_TOKEN_FILE} names the operator tokens: creating then
        needs one; C{TWISTEDSSE_PUBLIC_NAME} is a name served without one.
        """
        tokens = Path(self.mktemp())
        tokens.write_text("procfile-token\n")
        _, port, output = self.run_(TWISTEDSSE_TOKEN_FILE=str(tokens.absolute()),
                                    TWISTEDSSE_PUBLIC_NAME="app.example")  # fmt: skip
        self.assertIsNotNone(port, output)
        base = f"http://127.0.0.1:{port}"
        json_ = {"Content-Type": "application/json"}
        self.assertEqual(request(f"{base}/healthz"), 200)
        self.assertEqual(request(f"{base}/healthz", headers={"Host": "app.example"}), 200)
        self.assertEqual(request(f"{base}/healthz", headers={"Host": "evil.example"}), 421)
        self.assertEqual(request(f"{base}/renders", "POST", {"renderer": "nope"}, json_), 401)
        authorized = {**json_, "Authorization": "Bearer procfile-token"}
        self.assertEqual(request(f"{base}/renders", "POST", {"renderer": "nope"}, authorized), 422)

    def test_authOptionsFromTheEnvironment(self) -> None:
        """
        C{TWISTEDSSE_AUTH} carries any authentication options: C{--no-auth}
        for an operator whose own authentication stands in front (no token
        is then asked for), or several options at once.
        """
        _, port, output = self.run_(TWISTEDSSE_AUTH="--no-auth")
        self.assertIsNotNone(port, output)
        json_ = {"Content-Type": "application/json"}
        self.assertEqual(request(f"http://127.0.0.1:{port}/renders", "POST", {"renderer": "nope"}, json_), 422)
        # Several options, split by the shell as the comment says.
        tokens, secret = Path(self.mktemp()).absolute(), Path(self.mktemp()).absolute()
        tokens.write_text("procfile-token\n")
        secret.write_bytes(b"s" * 32)
        _, port, output = self.run_(TWISTEDSSE_AUTH=f"--auth-token-file={tokens} --jwt-secret-file={secret}")
        self.assertIsNotNone(port, output)
        scoped = {**json_, "Authorization": "Bearer " + mintToken(b"s" * 32, ["create:nope"])}
        self.assertEqual(request(f"http://127.0.0.1:{port}/renders", "POST", {"renderer": "nope"}, json_), 401)
        self.assertEqual(request(f"http://127.0.0.1:{port}/renders", "POST", {"renderer": "nope"}, scoped), 422)

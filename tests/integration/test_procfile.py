"""
The Procfile, run as Procfile runners run it: each entry's command through
C{sh -c} in the Procfile's directory, with C{PORT} and the documented
variables in the environment. Its C{redis} entry starts the Redis the
C{web} and C{worker} entries use (Redis mode, docs/deployment.md); a render
created through C{web} is run by C{worker} and served by C{web}. The web
entry listens on every interface, so it must take its authentication from
the environment, and refuse to start without any.
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

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests._support.launcher import TWISTD_EXITS_ON_USAGE_ERROR, Launched
from tests._support.need import needProgram
from tests._support.ports import freePort
from tests._support.redis import RedisServer, ping
from tests._support.waiting import TimedOut, waitUntil

from twistedsse import mintToken

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]


def command(entry: str) -> str:
    """
    The Procfile's command for C{entry} (C{web}, C{worker}, C{redis}).
    """
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(entry + ":"):
            return line[len(entry) + 1 :].strip()
    raise AssertionError(f"no {entry}: line in the Procfile")


def request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> int:
    return fetch(url, method, body, headers)[0]


def fetch(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ProcfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        """
        The Procfile's directory (where a runner runs every entry) and the
        Redis port of this test.
        """
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()
        self.redisPort = freePort()

    def environment(self, **env: str) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("TWISTEDSSE_", "REDIS_"))}
        environ.update(
            PORT="0",
            REDIS_PORT=str(self.redisPort),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")]),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")])),
            **env,
        )
        return environ

    def startRedis(self) -> None:
        """
        Run the C{redis} entry, and wait until it answers on C{REDIS_PORT}.
        """
        needProgram("redis-server")
        launched = Launched(["sh", "-c", command("redis")], self.environment(), self.directory,
                            stderr=subprocess.STDOUT, newSession=True)  # fmt: skip
        self.addCleanup(launched.stop)
        waitUntil(lambda: ping(self.redisPort) or launched.process.poll() is not None, 10, "redis-server")
        self.assertTrue(ping(self.redisPort), launched.output.decode(errors="replace"))

    def run_(self, entry: str = "web", **env: str) -> tuple[subprocess.Popen[bytes], int | None, str]:
        """
        Start the Procfile's C{entry} command with C{env} added (PORT=0):
        the process, the port it listens on (None if it exited), its output.
        """
        launched = Launched(["sh", "-c", command(entry)], self.environment(**env), self.directory,
                            stderr=subprocess.STDOUT, newSession=True)  # fmt: skip
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
        With none of the variables set, the web command exits with an error
        instead of serving every interface without a token.
        """
        self.startRedis()
        process, port, output = self.run_()
        self.assertIsNone(port, output)
        status = process.wait(10)
        if TWISTD_EXITS_ON_USAGE_ERROR:
            self.assertNotEqual(status, 0)
        # The refusal itself, not the list of options twistd prints before it.
        self.assertIn("--auth-token-file: no file named", output.splitlines()[-1])

    def test_tokenFileFromTheEnvironment(self) -> None:
        """
        C{TWISTEDSSE_TOKEN_FILE} names the operator tokens: creating then
        needs one; C{TWISTEDSSE_PUBLIC_NAME} is a name served without one.
        """
        self.startRedis()
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
        self.startRedis()
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

    def test_webAndWorkerShareRedisAndOutputs(self) -> None:
        """
        The three entries together, as a runner starts them: Redis keeps an
        append-only file in C{REDIS_DIR} (C{redis-data}); a render created
        through C{web} is run by C{worker} (which serves only C{/healthz},
        on loopback) and its output is served by C{web} from the shared
        C{outputs/}.
        """
        self.startRedis()
        _, web, output = self.run_("web", TWISTEDSSE_AUTH="--no-auth")
        self.assertIsNotNone(web, output)
        _, worker, output = self.run_("worker")
        self.assertIsNotNone(worker, output)
        # Redis' append-only file (Redis 7: a directory of them) is there.
        self.assertTrue((self.directory / "redis-data" / "appendonlydir").is_dir())

        status, body = fetch(f"http://127.0.0.1:{worker}/healthz")
        self.assertEqual(status, 200, body)
        health = json.loads(body)
        self.assertEqual((health["role"], health["redis"]["connected"]), ("worker", True))
        self.assertEqual(health["redis"]["url"], f"redis://127.0.0.1:{self.redisPort}/0")
        self.assertEqual(fetch(f"http://127.0.0.1:{worker}/renderers")[0], 404)
        status, body = fetch(f"http://127.0.0.1:{web}/healthz")
        self.assertEqual((status, json.loads(body)["role"]), (200, "web"))

        params = {"title": "Procfile", "duration": 1, "size": "64x64", "fps": 5}
        status, body = fetch(f"http://127.0.0.1:{web}/renders", "POST", {"renderer": "card", "params": params},
                             {"Content-Type": "application/json"})  # fmt: skip
        self.assertEqual(status, 202, body)
        created = json.loads(body)

        def finished() -> dict[str, Any] | None:
            state = json.loads(fetch(f"http://127.0.0.1:{web}{created['status_url']}")[1])
            return state if state["state"] not in ("queued", "running") else None

        state = waitUntil(finished, 60, "the render to finish")
        self.assertEqual(state["state"], "succeeded", state)
        status, video = fetch(f"http://127.0.0.1:{web}{created['output_url']}")
        self.assertEqual(status, 200)
        self.assertEqual(video[4:8], b"ftyp")
        self.assertIn(video, [path.read_bytes() for path in (self.directory / "outputs").rglob("*") if path.is_file()])

    def test_redisPasswordFile(self) -> None:
        """
        With a Redis elsewhere (C{TWISTEDSSE_REDIS}) that needs a password,
        C{TWISTEDSSE_REDIS_PASSWORD_FILE} names the file that holds it, for
        the web and worker entries alike.
        """
        redis = RedisServer(password="procfile-secret")
        self.addCleanup(redis.stop)
        password = Path(self.mktemp()).absolute()
        password.write_text("procfile-secret\n")
        env = {"TWISTEDSSE_REDIS": redis.url, "TWISTEDSSE_REDIS_PASSWORD_FILE": str(password)}
        for entry in ("web", "worker"):
            _, port, output = self.run_(entry, TWISTEDSSE_AUTH="--no-auth", **env)
            self.assertIsNotNone(port, output)
            health = json.loads(fetch(f"http://127.0.0.1:{port}/healthz")[1])
            self.assertEqual((health["role"], health["redis"]), (entry, {"url": redis.url, "connected": True}))
            self.assertNotIn("procfile-secret", output)

"""
The deployment files of Redis mode (docs/deployment.md), run for real:
nginx with docs/nginx-upstream.conf and docs/nginx-location.conf in front
of two web instances and a worker; and the systemd units' command lines,
expanded as systemd expands them, against a redis-server with a password.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from twisted.trial.unittest import SynchronousTestCase

from tests._support.launcher import ROOT, TICKER, TWISTD, Launched
from tests._support.need import needProgram
from tests._support.ports import accepts, freePort
from tests._support.redis import RedisServer
from tests._support.units import PREFIX, UNITS, environment, execStart, seconds, setting
from tests._support.waiting import poll
from twistedsse._decoder import EventStreamDecoder
from twistedsse._frames import Event

UPSTREAM = ROOT / "docs" / "nginx-upstream.conf"
LOCATION = ROOT / "docs" / "nginx-location.conf"

CONFIG = """\
{user}
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {upstream};
    server {{
        listen 127.0.0.1:{port};
        include {location};
    }}
}}
"""


def upstreamFor(ports: list[int]) -> str:
    """
    docs/nginx-upstream.conf as shipped, with its C{server} lines naming
    C{ports} on 127.0.0.1 instead.
    """
    text = UPSTREAM.read_text()
    servers = re.findall(r"^ *server [^;]+;\n", text, re.M)
    assert len(servers) == len(ports), servers
    for line, port in zip(servers, ports):
        text = text.replace(line, f"    server 127.0.0.1:{port};\n", 1)
    return text


class Nginx:
    """
    nginx (one process, C{master_process off}, in the foreground) with the
    shipped upstream and location files, on a free 127.0.0.1 port; stopped
    by its PID.
    """

    def __init__(self, upstream: str | None) -> None:
        self.executable = needProgram("nginx")
        self.prefix = Path(tempfile.mkdtemp(prefix="twistedsse-nginx-"))
        self.process: subprocess.Popen[bytes] | None = None
        upstreamFile = UPSTREAM
        if upstream is not None:
            upstreamFile = self.prefix / "upstream.conf"
            upstreamFile.write_text(upstream)
        self.port = freePort()
        self.config = self.prefix / "nginx.conf"
        self.config.write_text(
            CONFIG.format(user="user root;" if os.geteuid() == 0 else "", prefix=self.prefix,
                          upstream=upstreamFile, location=LOCATION, port=self.port)  # fmt: skip
        )

    def command(self, *extra: str) -> list[str]:
        return [self.executable, "-p", str(self.prefix), "-c", str(self.config), "-e", str(self.prefix / "error.log"),
                *extra]  # fmt: skip

    def check(self) -> subprocess.CompletedProcess[str]:
        """
        C{nginx -t}: the configuration as nginx reads it.
        """
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        with open(self.prefix / "output.log", "ab") as output:
            self.process = subprocess.Popen(self.command("-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=output)  # fmt: skip
        process = self.process
        state = poll(lambda: "ended" if process.poll() is not None else accepts(self.port), 10, 0.01)
        if state != True:  # noqa: E712 (the poll's value is True, "ended" or False)
            raise AssertionError(f"nginx did not start: {(self.prefix / 'error.log').read_text(errors='replace')}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


def fetch(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """
    A JSON request: its status and decoded JSON body.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Stream:
    """
    An event stream, open once the response head has arrived (so the
    proxy has it on an upstream connection); iterate for its events as
    they arrive, until it ends.
    """

    def __init__(self, url: str, lastEventID: str | None = None) -> None:
        headers = {"Accept": "text/event-stream"}
        if lastEventID is not None:
            headers["Last-Event-ID"] = lastEventID
        self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
        assert self.response.status == 200, self.response.status
        self.decoder = EventStreamDecoder()

    def __iter__(self) -> Iterator[Event]:
        while True:
            line = self.response.readline()
            if not line:
                return
            yield from self.decoder.feed(line)

    def close(self) -> None:
        self.response.close()


class Deployment(SynchronousTestCase):
    """
    A redis-server, two web instances and a worker sharing one output
    directory, each a process of its own, stopped at cleanup.
    """

    def twistd(self, *options: str) -> tuple[Launched, int]:
        """
        C{twistd -n twistedsse} with C{options}: it, and the port its site
        listens on.
        """
        launched = Launched([TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "twistedsse", *options],
                            stderr=subprocess.STDOUT)  # fmt: skip
        self.addCleanup(launched.stop)
        found = launched.waitFor(lambda out: re.search(rb"Site starting on (\d+)", out), 30, "twistd start")
        return launched, int(found.group(1))

    def startDeployment(self) -> None:
        self.redis = RedisServer()
        self.addCleanup(self.redis.stop)
        outputs = Path(self.mktemp()).absolute()
        common = ["--redis", self.redis.url, "--output-dir", str(outputs),
                  "--renderer", f"ticks={sys.executable} -u {TICKER}", "--listen", "tcp:0:interface=127.0.0.1"]  # fmt: skip
        self.webA, self.portA = self.twistd("--role", "web", *common)
        self.webB, self.portB = self.twistd("--role", "web", *common)
        self.worker, _ = self.twistd("--role", "worker", *common)
        self.nginx = Nginx(upstreamFor([self.portA, self.portB]))
        self.addCleanup(self.nginx.stop)
        self.nginx.start()


class NginxUpstreamTests(Deployment):
    def test_shippedFilesAreValid(self) -> None:
        """
        nginx accepts docs/nginx-upstream.conf (in C{http}) with
        docs/nginx-location.conf (in C{server}) as they are.
        """
        result = Nginx(None).check()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("test is successful", result.stderr)

    def test_shippedUpstream(self) -> None:
        """
        The upstream has what streaming over several instances needs: two
        servers, least connections (streams are long), idle HTTP/1.1
        connections kept, no sticky sessions (C{ip_hash}, C{hash},
        C{sticky}).
        """
        text = "\n".join(line.split("#")[0] for line in UPSTREAM.read_text().splitlines())
        self.assertEqual(len(re.findall(r"^\s*server\s", text, re.M)), 2)
        self.assertRegex(text, r"(?m)^\s*least_conn;")
        self.assertRegex(text, r"(?m)^\s*keepalive \d+;")
        self.assertLess(text.index("least_conn"), text.index("keepalive"))
        for sticky in ("ip_hash", "hash ", "sticky"):
            self.assertNotIn(sticky, text)

    def create(self, params: dict[str, Any]) -> dict[str, Any]:
        status, created = fetch(f"{self.nginx.url}/renders", "POST", {"renderer": "ticks", "params": params})
        self.assertEqual(status, 202, created)
        return created

    def test_streamsOverBothInstances(self) -> None:
        """
        Through nginx with the shipped files: a second stream of a render,
        opened while the first is open, goes to the other instance (least
        connections) over HTTP/1.1, and both get every event once, in
        order; nginx then keeps an idle connection to each instance.
        """
        self.startDeployment()
        start = Path(self.mktemp()).absolute()
        created = self.create({"count": 20, "interval": 0.01, "start_file": str(start)})
        url = f"{self.nginx.url}{created['events_url']}"
        first = Stream(url)
        second = Stream(url)
        start.touch()
        received = [list(first), list(second)]
        self.assertEqual(received[0], received[1])
        ids = [event.id for event in received[0]]
        self.assertEqual(ids, [f"0-{n}" for n in range(1, len(ids) + 1)])
        self.assertEqual([e.event for e in received[0]], ["progress"] * 20 + ["complete"])

        # Each instance logs the stream it served (when it ends).
        path = re.escape(created["events_url"])
        line = re.compile(rf'"GET {path} HTTP/1\.1" 200'.encode())
        for instance in (self.webA, self.webB):
            instance.waitFor(line.search, 10, "the stream in the access log")

        # Asked directly, each instance has this request's connection and
        # the one nginx keeps.
        for port in (self.portA, self.portB):
            status, health = fetch(f"http://127.0.0.1:{port}/healthz")
            self.assertEqual((status, health["role"]), (200, "web"))
            self.assertGreaterEqual(health["connections"]["open"], 2, health)

    def test_resumeThroughNginx(self) -> None:
        """
        A stream left mid-render and resumed through nginx with
        C{Last-Event-ID}, on whichever instance nginx picks, gets exactly
        the events after that id.
        """
        self.startDeployment()
        created = self.create({"count": 20, "interval": 0.2})
        url = f"{self.nginx.url}{created['events_url']}"
        stream = Stream(url)
        before = []
        for event in stream:
            before.append(event)
            if event.id == "0-5":
                break
        stream.close()
        after = list(Stream(url, lastEventID="0-5"))
        self.assertEqual([e.id for e in before + after], [f"0-{n}" for n in range(1, 22)])
        self.assertEqual([e.event for e in before + after], ["progress"] * 20 + ["complete"])


class UnitCommandTests(SynchronousTestCase):
    """
    The Redis-mode units' C{ExecStart=}, expanded as systemd does (their
    C{Environment=}, C{/etc/twistedsse/redis.env} and
    C{$CREDENTIALS_DIRECTORY}), run against a redis-server that needs the
    password. Only what is particular to an installation changes: the
    install prefix (this virtualenv), the output directory (a temporary
    one) and the ports (free ones).
    """

    def run_(self, unit: Path, env: dict[str, str]) -> tuple[Launched, dict[str, Any]]:
        """
        Start C{unit}'s command: it and its C{/healthz}.
        """
        self.redis = RedisServer(password="unit-secret")
        self.addCleanup(self.redis.stop)
        credentials = Path(self.mktemp()).absolute()
        credentials.mkdir()
        (credentials / "redis-password").write_text("unit-secret\n")
        outputs = Path(self.mktemp()).absolute()
        files = {"/etc/twistedsse/redis.env": {"TWISTEDSSE_REDIS": self.redis.url, **env}}
        argv = execStart(unit, {**environment(unit, files), "CREDENTIALS_DIRECTORY": str(credentials)})
        self.assertEqual(argv[0], PREFIX + "twistd")
        argv[0] = TWISTD
        argv[argv.index("/srv/twistedsse/outputs")] = str(outputs)
        argv = [re.sub(r"^tcp:\d+:", "tcp:0:", word) for word in argv]
        launched = Launched(argv, stderr=subprocess.STDOUT)
        self.addCleanup(launched.stop)
        found = launched.waitFor(lambda out: re.search(rb"Site starting on (\d+)", out), 30, f"{unit.name}")
        status, health = fetch(f"http://127.0.0.1:{int(found.group(1))}/healthz")
        self.assertEqual(status, 200, health)
        self.assertNotIn(b"unit-secret", launched.output)
        return launched, health

    def assertStopsWithin(self, launched: Launched, unit: Path) -> None:
        """
        SIGTERM (the unit's C{KillSignal}) ends it well within the unit's
        C{TimeoutStopSec}, idle as it is.
        """
        self.assertEqual(setting(unit, "Service.KillSignal"), "SIGTERM")
        began = time.monotonic()
        launched.stop(signal.SIGTERM, timeout=seconds(setting(unit, "Service.TimeoutStopSec")))
        self.assertLess(time.monotonic() - began, 10)

    def test_worker(self) -> None:
        """
        twistedsse-worker.service's command starts a worker connected to
        Redis with the password from the credential.
        """
        launched, health = self.run_(UNITS / "twistedsse-worker.service", {})
        self.assertEqual((health["role"], health["redis"]), ("worker", {"url": self.redis.url, "connected": True}))
        self.assertStopsWithin(launched, UNITS / "twistedsse-worker.service")

    def test_web(self) -> None:
        """
        twistedsse-web.service's command starts a web instance connected to
        Redis with the password from the credential, on loopback by default.
        """
        launched, health = self.run_(UNITS / "twistedsse-web.service", {})
        self.assertEqual((health["role"], health["redis"]), ("web", {"url": self.redis.url, "connected": True}))
        self.assertStopsWithin(launched, UNITS / "twistedsse-web.service")

    def test_webBeyondLoopback(self) -> None:
        """
        Listening on every interface, the web unit's command needs
        C{TWISTEDSSE_AUTH} from the environment file, and takes any
        authentication options from it.
        """
        tokens = Path(self.mktemp()).absolute()
        tokens.write_text("unit-token\n")
        env = {"TWISTEDSSE_LISTEN": "tcp:0", "TWISTEDSSE_AUTH": f"--auth-token-file={tokens}"}
        launched, health = self.run_(UNITS / "twistedsse-web.service", env)
        self.assertEqual(health["role"], "web")

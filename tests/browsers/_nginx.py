"""
A real nginx in front of the test server: its own temporary prefix
directory, a generated configuration, a free 127.0.0.1 port; run in the
foreground (C{daemon off}) and stopped by its PID.

It runs with C{master_process off}: one process, the one we started, so
SIGQUIT (and KILL if it hangs) to that PID stops everything and no worker
can be orphaned. Proxying and buffering are the same code either way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from tests._support.launcher import ROOT
from tests._support.ports import accepts, freePort
from tests._support.waiting import poll
from tests._support.need import needProgram

#: The location block users put in their server (README, "Behind nginx").
LOCATION = ROOT / "docs" / "nginx-location.conf"

#: The shipped snippet, included as it is.
SNIPPET = f"include {LOCATION};"

#: nginx's defaults: HTTP/1.0 to the upstream, C{proxy_buffering on}.
DEFAULTS = "location / {\n    proxy_pass http://twistedsse;\n}"

CONFIG = """\
{user}
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
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
    upstream twistedsse {{
        {servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        {locations}
    }}
}}
"""


class Nginx:
    """
    nginx proxying C{127.0.0.1:PORT} to C{upstream} with C{locations} (the
    body of its one C{server} block) and the upstream named C{twistedsse}.
    Several upstreams (a sequence of C{HOST:PORT}) are balanced round-robin,
    nginx's default.

    @ivar port: where it listens.
    @ivar url: C{http://127.0.0.1:PORT}.
    """

    def __init__(self, upstream: str | Sequence[str], locations: str, timeout: float = 10.0) -> None:
        upstreams = [upstream] if isinstance(upstream, str) else list(upstream)
        self.executable = needProgram("nginx")
        self.prefix = Path(tempfile.mkdtemp(prefix="twistedsse-nginx-"))
        self.process: subprocess.Popen[bytes] | None = None
        try:
            # The port is free when chosen, and may be taken before nginx
            # binds it: try another then.
            for attempt in range(3):
                self.port = freePort()
                self.url = f"http://127.0.0.1:{self.port}"
                self.config = self.prefix / "nginx.conf"
                self.config.write_text(
                    CONFIG.format(
                        user="user root;" if os.geteuid() == 0 else "",
                        prefix=self.prefix,
                        servers="\n        ".join(f"server {u};" for u in upstreams),
                        port=self.port,
                        locations=locations,
                    )
                )
                if self._start(timeout):
                    return
            raise AssertionError(f"nginx did not start:\n{self.errorLog()}")
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> bool:
        errors = self.prefix / "error.log"
        with open(self.prefix / "output.log", "ab") as output:
            self.process = subprocess.Popen(
                [self.executable, "-p", str(self.prefix), "-c", str(self.config), "-e", str(errors),
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            )
        process = self.process
        state = poll(lambda: "ended" if process.poll() is not None else "accepts" if accepts(self.port) else "", timeout, 0.01)
        if not state:
            raise AssertionError(f"nginx did not accept within {timeout} s:\n{self.errorLog()}")
        return state == "accepts"

    def errorLog(self) -> str:
        texts = []
        for name in ("output.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "".join(texts)[-4000:]

    def accessLog(self) -> str:
        return (self.prefix / "access.log").read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGQUIT (graceful) to its PID, KILL if it is still there after
        C{timeout}; then remove the prefix.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                shutil.rmtree(self.prefix, ignore_errors=True)
                raise AssertionError(f"nginx ignored SIGQUIT for {timeout} s")
        shutil.rmtree(self.prefix, ignore_errors=True)

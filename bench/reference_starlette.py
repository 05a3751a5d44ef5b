"""
The benchmark's reference server: the same API shape as twistedsse, built
the way sse-starlette's documentation shows (Starlette routes, an
C{EventSourceResponse} per stream, and its broadcasting example's fan-out:
one C{ServerSentEvent} per event put into one C{asyncio.Queue} per
subscriber), run by uvicorn with one worker.

    POST /renders            {"renderer": NAME, "params": {...}} -> 202 {id, events_url, ...}
    GET  /renders/{id}       the job
    GET  /renders/{id}/events  the stream: history after Last-Event-ID, then live
                             "progress" events, then "complete" (or "failed"), then the end
    GET  /renderers, /healthz

Renderers are commands (C{--renderer NAME=COMMAND}), run as asyncio
subprocesses with the params as JSON on stdin, printing one JSON object per
line on stdout; each line is parsed and re-serialized (as twistedsse does)
and becomes a C{progress} event. Jobs live in memory.

usage: python bench/reference_starlette.py --port P --renderer NAME=COMMAND [--host H] [--backlog B]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shlex
import tempfile
import time
from typing import Any, AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TERMINAL = frozenset({"complete", "failed", "cancelled"})


class Job:
    """
    One render: its state, its history (for late subscribers and
    Last-Event-ID), and one queue per subscriber.
    """

    def __init__(self, renderer: str, params: dict[str, Any]) -> None:
        self.id = secrets.token_urlsafe(24)
        self.renderer = renderer
        self.params = params
        self.state = "running"
        self.created = time.time()
        self.history: list[ServerSentEvent] = []
        self.subscribers: set[asyncio.Queue[ServerSentEvent]] = set()
        self.progress: Any = None

    def publish(self, name: str, data: Any) -> None:
        # One event object, put into every subscriber's queue; each
        # EventSourceResponse encodes it for its own client.
        event = ServerSentEvent(data=json.dumps(data, separators=(",", ":")), event=name, id=str(len(self.history) + 1))
        self.history.append(event)
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a client this far behind is dropped
                self.subscribers.discard(queue)

    async def stream(self, after: int) -> AsyncIterator[ServerSentEvent]:
        queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue(maxsize=1000)
        # Snapshot and subscribe with no await in between: nothing is missed
        # and nothing comes twice.
        backlog = self.history[after:]
        if not (backlog and backlog[-1].event in TERMINAL):
            self.subscribers.add(queue)
        try:
            for event in backlog:
                yield event
                if event.event in TERMINAL:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.event in TERMINAL:
                    return
        finally:
            self.subscribers.discard(queue)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "renderer": self.renderer,
            "state": self.state,
            "progress": self.progress,
            "created_at": self.created,
            "status_url": f"/renders/{self.id}",
            "events_url": f"/renders/{self.id}/events",
            "output_url": f"/renders/{self.id}/output",
        }


class Renders:
    def __init__(self, renderers: dict[str, list[str]]) -> None:
        self.renderers = renderers
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.workdir = tempfile.mkdtemp(prefix="reference-starlette-")

    def start(self, renderer: str, params: dict[str, Any]) -> Job:
        job = Job(renderer, params)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self.run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    async def run(self, job: Job) -> None:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self.renderers[job.renderer],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=self.workdir,
            limit=64 * 1024,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(job.params).encode() + b"\n")
        await process.stdin.drain()
        process.stdin.close()
        problem = None
        async for line in process.stdout:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                problem = f"stdout line is not a JSON object: {line[:200]!r}"
                process.kill()
                break
            job.progress = data
            job.publish("progress", data)
        code = await process.wait()
        if problem is None and code == 0:
            job.state = "succeeded"
            job.publish("complete", {"output_url": f"/renders/{job.id}/output", "elapsed": time.monotonic() - started})
        else:
            job.state = "failed"
            job.publish("failed", {"message": problem or f"exit code {code}", "exit_code": code})


def error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def buildApp(renders: Renders) -> Starlette:
    async def create(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "malformed_json", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("params", {}), dict):
            return error(422, "invalid_body", "expected {renderer, params}")
        name = body.get("renderer")
        if name not in renders.renderers:
            return error(422, "unknown_renderer", f"no renderer {name!r}")
        job = renders.start(name, body.get("params") or {})
        description = job.describe()
        return JSONResponse(description, status_code=202, headers={"Location": description["status_url"]})

    def find(request: Request) -> Job | None:
        return renders.jobs.get(request.path_params["id"])

    async def status(request: Request) -> Response:
        job = find(request)
        if job is None:
            return error(404, "unknown_job", "no such render")
        return JSONResponse(job.describe())

    async def events(request: Request) -> Response:
        job = find(request)
        if job is None:
            return error(404, "unknown_job", "no such render")
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.isdigit() and len(last) < 18 else 0
        if job.history and job.history[-1].event in TERMINAL and after >= len(job.history):
            return Response(status_code=204)
        return EventSourceResponse(job.stream(after), ping=15)

    async def renderers(request: Request) -> Response:
        return JSONResponse({"renderers": [{"name": name} for name in renders.renderers]})

    async def healthz(request: Request) -> Response:
        subscribers = sum(len(job.subscribers) for job in renders.jobs.values())
        return JSONResponse({"status": "ok", "renders": len(renders.jobs), "subscribers": subscribers})

    return Starlette(
        routes=[
            Route("/renders", create, methods=["POST"]),
            Route("/renders/{id}", status, methods=["GET"]),
            Route("/renders/{id}/events", events, methods=["GET"]),
            Route("/renderers", renderers, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="sse-starlette reference server for bench/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backlog", type=int, default=2048)
    parser.add_argument("--renderer", action="append", default=[], metavar="NAME=COMMAND")
    options = parser.parse_args()
    renderers = {}
    for spec in options.renderer:
        name, _, command = spec.partition("=")
        renderers[name.strip()] = shlex.split(command)
    app = buildApp(Renders(renderers))
    # One worker; uvicorn's defaults otherwise (uvloop and httptools when
    # installed, as with uvicorn[standard]; access log on, as twistd's is).
    uvicorn.run(app, host=options.host, port=options.port, backlog=options.backlog, workers=1)


if __name__ == "__main__":
    main()

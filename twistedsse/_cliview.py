"""
What C{twistedsse render} shows while a render runs: a live progress bar
on a terminal (L{BarView}, the C{rich} library), or one plain line per
event otherwise (L{PlainView}), for logs and scripts.

The plain lines are a stable, greppable format (a script may parse them)::

    created JOBID RENDERER
    progress JOBID percent=42.0[ speed=2.1][ eta=2.1]
    complete JOBID DATA-JSON
    failed JOBID DATA-JSON
    cancelled JOBID DATA-JSON
    EVENT JOBID DATA-JSON                 (any other event, e.g. retrying)
    saved PATH BYTES

A render's progress is read from its C{progress} events: C{percent}
(0-100, the card renderer's) or C{progress} (a fraction 0-1, a command
renderer's convention); C{speed} and C{eta} (seconds) where the renderer
gives them. Where it does not, the bar estimates them from the percent's
own pace.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any, Mapping

import attrs
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import Interface, implementer

from ._frames import Event

#: How often the bar is redrawn between events (its speed, ETA and
#: elapsed time move on without them).
REFRESH = 0.1


def percentOf(data: Mapping[str, Any]) -> float | None:
    """
    A progress event's percent (0-100), from C{percent} or a C{progress}
    fraction; C{None} if it has neither as a number.
    """
    value = data.get("percent")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(0.0, min(100.0, float(value)))
    value = data.get("progress")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(0.0, min(100.0, float(value) * 100))
    return None


def _number(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _data(event: Event) -> Any:
    try:
        return json.loads(event.data)
    except ValueError:
        return None


#: Control characters (C0, DEL, C1) shown escaped: text from a server
#: must not move the cursor or retitle the user's terminal.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def oneLine(text: str) -> str:
    """
    C{text} on one line, control characters escaped: an event's data may
    span several lines, and a server's text must not drive the terminal.
    """
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class IRenderView(Interface):
    """
    Shows one render's life to the person (or script) that started it.
    """

    def created(jobID: str, renderer: str) -> None:
        """
        The render was accepted.
        """

    def event(jobID: str, event: Event) -> None:
        """
        An event of its stream arrived.
        """

    def saved(path: str, size: int) -> None:
        """
        Its output was written to C{path}.
        """

    def stop() -> None:
        """
        Nothing more will be shown (the render ended, or the command stops):
        restore the terminal.
        """


@implementer(IRenderView)
@attrs.define
class PlainView:
    """
    One line per event on C{out}, flushed at once (see the module
    docstring for the format).
    """

    _out: IO[str]

    def _line(self, *parts: object) -> None:
        self._out.write(" ".join(str(p) for p in parts) + "\n")
        self._out.flush()

    def created(self, jobID: str, renderer: str) -> None:
        self._line("created", jobID, renderer)

    def event(self, jobID: str, event: Event) -> None:
        data = _data(event)
        if event.event == "progress" and isinstance(data, dict):
            percent = percentOf(data)
            if percent is not None:
                extra = [f"{name}={value:g}" for name in ("speed", "eta") if (value := _number(data, name)) is not None]
                self._line("progress", jobID, f"percent={percent:.1f}", *extra)
                return
        self._line(oneLine(event.event or "message"), jobID, oneLine(event.data))

    def saved(self, path: str, size: int) -> None:
        self._line("saved", path, size)

    def stop(self) -> None:
        pass


class _Speed(ProgressColumn):
    """
    The renderer's own speed (C{speed}: times real time, for the card), or
    the percent's pace.
    """

    def render(self, task: Task) -> Text:
        speed = task.fields.get("speed")
        if isinstance(speed, float):
            return Text(f"{speed:.2f}x", style="progress.data.speed")
        if task.speed is not None and not task.finished:
            return Text(f"{task.speed:.1f} %/s", style="progress.data.speed")
        return Text("", style="progress.data.speed")


class _ETA(ProgressColumn):
    """
    The renderer's own estimate (C{eta}, seconds), or the bar's, from the
    percent's pace.
    """

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("ETA 0:00:00", style="progress.remaining")
        eta = task.fields.get("eta")
        remaining = eta if isinstance(eta, float) else task.time_remaining
        if remaining is None:
            return Text("ETA -:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(remaining + 0.5), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"ETA {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


@implementer(IRenderView)
@attrs.define
class BarView:
    """
    A live progress bar (percent, speed, ETA, elapsed time) on a terminal,
    redrawn on each event and every L{REFRESH} seconds of C{clock}; the
    outcome and the saved file are printed under it.
    """

    _console: Console
    _clock: IReactorTime
    _progress: Progress = attrs.field(init=False)
    _task: Any = attrs.field(default=None, init=False)
    _refresh: LoopingCall | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _Speed(), _ETA(),
            TimeElapsedColumn(), console=self._console, auto_refresh=False, get_time=self._clock.seconds,
        )  # fmt: skip

    @classmethod
    def forTerminal(cls, out: IO[str], clock: IReactorTime) -> BarView:
        return cls(Console(file=out), clock)

    def created(self, jobID: str, renderer: str) -> None:
        self._console.print(Text.assemble("render ", (jobID, "bold"), f" ({renderer})"))
        self._task = self._progress.add_task(renderer, total=100.0, speed=None, eta=None)
        self._progress.start()
        self._refresh = LoopingCall(self._progress.refresh)
        self._refresh.clock = self._clock
        self._refresh.start(REFRESH)

    def event(self, jobID: str, event: Event) -> None:
        data = _data(event)
        fields = data if isinstance(data, dict) else {}
        if event.event == "progress":
            percent = percentOf(fields)
            self._progress.update(
                self._task, completed=percent if percent is not None else None,
                speed=_number(fields, "speed"), eta=_number(fields, "eta"),
            )  # fmt: skip
            self._progress.refresh()
            return
        if event.event == "complete":
            self._progress.update(self._task, completed=100.0, eta=0.0)
            self._stopBar()
            self._console.print(Text("complete", "green"))
        elif event.event in ("failed", "cancelled"):
            self._stopBar()
            message = oneLine(str(fields.get("message") or event.data))
            style = "red" if event.event == "failed" else "yellow"
            # Text, not markup: the server's message is printed as it is.
            self._console.print(Text.assemble((event.event, style), f": {message}"))
        else:
            self._console.print(Text(oneLine(f"{event.event or 'message'}: {event.data}")))

    def saved(self, path: str, size: int) -> None:
        self._console.print(f"saved {path} ({size} bytes)", markup=False, highlight=False)

    def _stopBar(self) -> None:
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._progress.refresh()
        self._progress.stop()

    def stop(self) -> None:
        self._stopBar()

"""
Fixtures of the unit tests: a started service with a fake renderer, a job
snapshot, a subscriber that records what it is given.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
from zope.interface import implementer

from twistedsse._frames import Event
from twistedsse._interfaces import ISubscriber
from twistedsse._job import JobSnapshot, JobState


def ticksService(clock: Any, spawner: Any, outputDir: Any, *, also: Any = (), **options: Any) -> Any:
    """
    A started L{RenderService} whose renderer C{ticks} is a command run by
    the fake C{spawner}; C{also}, more renderers beside it.
    """
    from pathlib import Path

    from twistedsse._broker import MemoryBroker
    from twistedsse._command import CommandRenderer
    from twistedsse._service import RenderService

    service = RenderService(
        clock=clock,
        spawner=spawner,
        broker=MemoryBroker(),
        renderers={"ticks": CommandRenderer("ticks", ["/bin/ticks"]), **{r.name: r for r in also}},
        outputDir=Path(outputDir),
        **options,
    )
    service.startService()
    return service


def snapshot(jobID: str = "job1", renderer: str = "card") -> JobSnapshot:
    return JobSnapshot(id=jobID, renderer=renderer, params={}, state=JobState.QUEUED, createdAt=0.0)


@implementer(ISubscriber)
@attrs.define
class Recorder:
    """
    A subscriber that records what it is given, and may unsubscribe itself
    on a given event.
    """

    got: list[tuple[Event, bytes]] = attrs.Factory(list)
    batches: list[bytes] = attrs.Factory(list)

    def deliver(self, event: Event, frame: bytes) -> None:
        self.got.append((event, frame))

    def deliverMany(self, events: Sequence[Event], frames: Sequence[bytes], joined: bytes) -> None:
        self.batches.append(joined)
        for event, frame in zip(events, frames):
            self.deliver(event, frame)

    @property
    def ids(self) -> list[str | None]:
        return [event.id for event, _ in self.got]

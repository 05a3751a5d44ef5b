"""
The seams that have more than one implementation: renderers (the built-in
ffmpeg C{card} and operator-registered commands), job brokers and stores,
and the queue and ledger a worker runs renders through (in one process, or
across processes joined by Redis).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import attrs
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from ._frames import Event
    from ._job import JobSnapshot
    from twisted.internet.defer import Deferred

    from ._json import JSON, JSONObject
    from ._outcome import Outcome
    from ._store import StoredEvent


class IProgressParser(Interface):
    """
    Turns a render process's stdout, in chunks of any size, into progress
    event payloads. Pure: no I/O, no clock.
    """

    def feed(data: bytes) -> list[JSONObject]:
        """
        Take the next chunk of stdout; return the payloads (JSON-ready
        dicts) of every progress report it completed, in order. Partial
        lines are kept for the next call.

        @raise twistedsse._errors.RenderProtocolError: the output breaks
            the renderer's protocol (for instance a line over the limit);
            the render is failed.
        """

    def end() -> list[JSONObject]:
        """
        Stdout was closed: return payloads for anything still buffered.
        """


@attrs.frozen
class RenderPlan:
    """
    Everything needed to run one render, decided before the process starts.

    @ivar argv: the full argument vector, C{argv[0]} the executable. Run
        without a shell, ever.
    @ivar env: the child's complete environment.
    @ivar stdin: bytes written to the child's stdin, which is then closed;
        C{None} closes stdin at once.
    @ivar parser: turns stdout into progress payloads.
    @ivar output: where a successful render leaves its output file, or
        C{None} if this renderer makes no file.
    @ivar scratch: files made for the render (text files, partial outputs)
        that are deleted when it ends, whatever the outcome.
    @ivar mediaDuration: the output's duration in seconds, if known.
    @ivar finalize: called after a successful exit to move partial output
        into place (and check it); raises to fail the render.
    """

    argv: Sequence[str]
    env: Mapping[str, str]
    stdin: bytes | None
    parser: IProgressParser
    output: Path | None = None
    scratch: Sequence[Path] = ()
    mediaDuration: float | None = None
    finalize: Callable[[], None] | None = None


class IRenderer(Interface):
    """
    A kind of render a client may ask for by name. Clients never supply a
    command, a path or a flag: only C{params}, which C{validate} checks.
    """

    name = Attribute("The renderer's public name, e.g. C{'card'}.")

    def validate(params: object) -> JSONObject:
        """
        Check client-supplied C{params} (decoded JSON, any type) and return
        them normalized (defaults filled in), JSON-ready.

        @raise twistedsse._errors.InvalidParams: naming the field and the
            limit it broke.
        """

    def plan(params: JSONObject, workdir: Path, stem: str) -> RenderPlan:
        """
        Build the plan for one render of already validated C{params}.
        Files it writes go in C{workdir}, named from C{stem} (the job id,
        which is URL-safe base64).
        """


class ISubscriber(Interface):
    """
    Something that receives a job's events: an open event stream.
    """

    def deliver(event: Event, frame: bytes) -> None:
        """
        Take one event (a L{twistedsse._frames.Event}) and its wire bytes,
        encoded once for every subscriber. A terminal event is the last one
        a subscriber ever gets.
        """

    def deliverMany(events: Sequence[Event], frames: Sequence[bytes], joined: bytes) -> None:
        """
        Take consecutive non-terminal events, their wire bytes, and those
        bytes joined (once for every subscriber): the same as C{deliver} of
        each in order, which a subscriber that keeps up can write as one.
        """


class IJobBroker(Interface):
    """
    Holds jobs and their event histories and fans events out to
    subscribers. L{twistedsse.MemoryBroker} keeps all of it in this
    process; a Redis-backed broker is planned.

    Event ids are opaque to clients; each broker decides their form and
    parses the C{Last-Event-ID} it is given back (garbage counts as none).
    """

    def create(snapshot: JobSnapshot) -> None:
        """
        Add a new job (a L{twistedsse._job.JobSnapshot}).
        """

    def get(jobID: str) -> JobSnapshot:
        """
        The job's current L{twistedsse._job.JobSnapshot}.

        @raise twistedsse._errors.UnknownJob: no such job.
        """

    def update(snapshot: JobSnapshot) -> None:
        """
        Replace a job's snapshot with a newer one.
        """

    def publish(jobID: str, name: str, data: JSON) -> Event:
        """
        Number, encode (once), record and fan out a new event named C{name}
        whose data is C{data} as JSON; return the L{Event}. After a
        terminal event (C{complete}, C{failed}, C{cancelled}) the job's
        subscribers are dropped: each got it as its last event.
        """

    def publishMany(jobID: str, name: str, datas: Sequence[JSON]) -> list[Event]:
        """
        C{publish} each of C{datas} in order (non-terminal events only),
        fanned out together (L{ISubscriber.deliverMany}); return the
        L{Event}s.
        """

    def flush() -> None:
        """
        Deliver every published event to every subscriber now (a broker
        may spread a fan-out over several reactor turns): at shutdown,
        before connections are closed.
        """

    def subscribe(jobID: str, lastEventID: str | None, subscriber: ISubscriber) -> Callable[[], None]:
        """
        Deliver the job's retained events after C{lastEventID}, then every
        new one as it is published, with nothing missed or repeated in
        between. Returns the idempotent unsubscribe function.

        C{lastEventID} is C{None}, an id this broker issued for the job, or
        anything a client sent. C{None}, C{"0"} (before the job's first
        event: C{/render-stream} names a render with C{JOBID:0} before it
        has any), an id the broker cannot parse and an id ahead of the
        job's last event all mean the same: the whole retained history.
        (Filtering on an id from ahead would hold back every event, the
        terminal one too, and the stream would never end.) If events after
        C{lastEventID} were dropped from the history, a C{reset} event
        (the job's state, and how many were missed) comes first.

        The retained events are delivered synchronously, in this call, and
        the subscriber need not write them all: a stream whose client stops
        reading part-way keeps the id of the last event it wrote,
        unsubscribes, and subscribes again with that id when the client
        reads again (L{twistedsse._stream}). So the history is the only
        buffer a slow client's replay needs, and a subscribe must cost
        about what the events it delivers cost.

        @raise twistedsse._errors.UnknownJob: no such job.
        """

    def restore(snapshot: JobSnapshot, events: Iterable[tuple[int, str, str]]) -> None:
        """
        Add a job read back from storage, with its stored events as
        C{(seq, name, data)} (C{data} is JSON text), keeping their ids.
        """

    def finalEvents(jobID: str) -> list[tuple[int, str, str]]:
        """
        The events of a finished job worth storing, as C{(seq, name,
        data)}: its latest C{progress} and its terminal event.
        """

    def caughtUp(jobID: str, lastEventID: str | None) -> bool:
        """
        Whether a client that has seen up to C{lastEventID} has seen the
        job's terminal event: there is nothing more it could ever receive.
        True for an id at or after a finished job's terminal event (the
        stream answers C{204}); never for a job still running, whatever the
        id.
        """

    def subscriberCount() -> int:
        """
        How many subscriptions are open, over all jobs (for leak checks and
        health).
        """

    def remove(jobID: str) -> None:
        """
        Forget a job as if it had never been (one that could not even be
        stored): its id is unknown from now on.
        """

    def expire(jobID: str) -> None:
        """
        Delete a finished job and remember its id as expired: the per-job
        methods raise L{twistedsse._errors.JobExpired} for it until
        C{forget}.
        """

    def forget(jobID: str) -> None:
        """
        Stop remembering an expired id: it is unknown from now on.
        """


class IJobStore(Interface):
    """
    Where jobs are kept across restarts: each job's snapshot, written when
    it is created, starts and ends, and a finished job's final events.
    L{twistedsse._store.SQLiteJobStore} keeps them in a file;
    L{twistedsse._store.NullJobStore} keeps nothing (jobs live in memory
    only), so the service always has a store and never asks whether it has
    one.

    A write that fails raises C{sqlite3.Error} or C{OSError} (see
    L{twistedsse._store.STORE_ERRORS}); a store on another backend raises
    its failures as C{OSError}. Called in the reactor thread.
    """

    def save(snapshot: JobSnapshot) -> None:
        """
        Write (or overwrite) a job's L{twistedsse._job.JobSnapshot}.
        """

    def finish(snapshot: JobSnapshot, events: Iterable[StoredEvent]) -> None:
        """
        Write a finished job's snapshot and its final events (an iterable
        of L{twistedsse._store.StoredEvent}), together.
        """

    def load() -> list[tuple[JobSnapshot, list[StoredEvent]]]:
        """
        Every job, oldest first, as C{(snapshot, [StoredEvent, ...])}.
        """

    def expire(jobID: str, forgetAt: float) -> None:
        """
        Delete a job and its events, and remember its id as expired until
        C{forgetAt}.
        """

    def delete(jobID: str) -> None:
        """
        Delete a job and its events, remembering nothing.
        """

    def forget(jobID: str) -> None:
        """
        Stop remembering an expired id.
        """

    def expired(now: float) -> list[tuple[str, float]]:
        """
        Drop the expired ids whose time to be forgotten has come; return the
        others as C{(id, forgetAt)}.
        """

    def close() -> None:
        """
        Release the store (at the service's stop).
        """


@attrs.frozen
class QueuedRender:
    """
    A job waiting for a worker: what the worker needs besides the job's
    snapshot (which the broker holds).

    @ivar outputURL: the URL clients fetch the output from, opaque to the
        service: the C{complete} event's C{output_url} if a file is made.
    @ivar attempt: 1; more when a worker runs it again after the one that
        held it died (Redis mode: the claim's delivery count).
    """

    jobID: str
    outputURL: str | None = None
    attempt: int = 1


class IQueueConsumer(Interface):
    """
    What runs queued renders (L{twistedsse._runner.RenderRunner}), as its
    queue sees it.
    """

    def rendersWaiting() -> None:
        """
        A render was queued: take what there are free slots for.
        """

    def cancel(jobID: str) -> None:
        """
        Stop a render this consumer took (TERM, then KILL); it ends
        C{cancelled} once its process has exited. Nothing if it runs no
        such render.
        """

    def busy() -> bool:
        """
        Whether every slot is taken (a new render would wait).
        """

    def abandon(jobID: str) -> None:
        """
        The render is no longer this consumer's (Redis: handed back at a
        warm shutdown, or taken over by another worker): stop it and record
        nothing.
        """

    def refusal() -> str | None:
        """
        Why no render could start now (the output filesystem is nearly
        full), or C{None}.
        """


class IRenderSource(Interface):
    """
    Where a worker (L{twistedsse._runner.RenderRunner}) takes its renders
    from: the in-process L{twistedsse._queue.MemoryQueue}, or the renders a
    Redis worker has claimed (L{twistedsse._redisrunner.ClaimedRenders}).
    """

    def attach(consumer: IQueueConsumer) -> None:
        """
        Give the source the consumer that takes its renders.
        """

    def take() -> QueuedRender | None:
        """
        The first waiting render, removed; C{None} if none waits.
        """

    def finished(jobID: str) -> None:
        """
        A render taken from here has ended, and its end is recorded (its
        terminal event published): a queue shared across processes may
        now forget it.
        """


class IRenderLedger(Interface):
    """
    Where a worker records a render's life: L{twistedsse._ledger.JobLedger}
    in one process, L{twistedsse._redisledger.RedisLedger} in Redis.
    """

    def began(render: QueuedRender) -> Deferred[JobSnapshot | None]:
        """
        Mark the job C{running} (again, when a worker runs it anew:
        C{retrying} first); fires with its snapshot, or C{None} if it must
        not run (it ended meanwhile: cancelled, or its start could not be
        recorded).
        """

    def progress(jobID: str, payloads: Sequence[JSONObject]) -> None:
        """
        Publish progress reports, in order, several at once when the
        render printed faster than they could be sent.
        """

    def finish(jobID: str, outcome: Outcome) -> Deferred[None]:
        """
        Record the render's end (its final state and terminal event, after
        every progress report before it); fires once recorded.
        """

    def abandon(jobID: str) -> None:
        """
        The render is no longer this worker's (Redis: taken over, or handed
        back): drop what of it is not recorded yet.
        """


class IRenderQueue(Interface):
    """
    Renders waiting for a worker, first come first served: in memory
    (L{twistedsse._queue.MemoryQueue}), or across processes.
    """

    def attach(consumer: IQueueConsumer) -> None:
        """
        Give the queue the consumer that takes its renders.
        """

    def enqueue(render: QueuedRender) -> None:
        """
        Add a render at the end, and tell the consumer.
        """

    def withdraw(jobID: str) -> bool:
        """
        Remove a render if it is still waiting; whether it was.
        """

    def take() -> QueuedRender | None:
        """
        The first waiting render, removed; C{None} if none waits.
        """

    def __len__() -> int:
        """
        How many renders wait.
        """

    def cancelRunning(jobID: str) -> None:
        """
        Ask the consumer that took the render to stop it
        (L{IQueueConsumer.cancel}).
        """

    def busy() -> bool:
        """
        Whether a new render would wait (L{IQueueConsumer.busy}).
        """

    def refusal() -> str | None:
        """
        Why a new render would be refused now (L{IQueueConsumer.refusal}).
        """

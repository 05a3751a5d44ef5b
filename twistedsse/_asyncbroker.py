"""
The asynchronous job broker contract (issue 11): L{IJobBroker}'s semantics
with Deferreds where a broker backed by Redis needs a round trip, and
L{AsyncMemoryBroker}, the in-memory broker behind it at no cost on the
fan-out path.

Which methods are asynchronous: every one that reads or writes the job's
state or history (C{create}, C{get}, C{update}, C{publish},
C{publishMany}, C{subscribe}, C{caughtUp}, C{expire}, C{forget},
C{remove}). C{flush} and C{subscriberCount} stay synchronous: they are
about this process' own subscribers. C{restore} and C{finalEvents} are the
in-memory broker's dealings with its C{IJobStore} (Redis keeps the
events itself), so they are not part of this contract; the wrapped
L{MemoryBroker} keeps them (L{AsyncMemoryBroker.broker}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import Interface, implementer


if TYPE_CHECKING:
    from ._frames import Event
    from ._interfaces import IJobBroker, ISubscriber
    from ._job import JobSnapshot
    from ._json import JSON


class IAsyncJobBroker(Interface):
    """
    L{twistedsse._interfaces.IJobBroker} with Deferreds: the same rules, in
    the same words where they do not change.

    Event ids are opaque to clients; each broker decides their form
    (L{AsyncMemoryBroker}: C{"1"}, C{"2"}...; the Redis broker: the stream
    entry ids C{"0-1"}, C{"0-2"}...) and parses the C{Last-Event-ID} it is
    given back (garbage counts as none).

    A failure is the Deferred's: L{twistedsse._errors.UnknownJob} (or
    L{twistedsse._errors.JobExpired}) for a job that does not exist, and,
    for a broker with a server behind it, an error of that server's (for
    Redis L{twistedsse._errors.RedisUnavailable}, a 503).
    """

    def create(snapshot: JobSnapshot) -> Deferred[None]:
        """
        Add a new job. Fails with C{ValueError} if the id is taken (by a
        job or an expired id).
        """

    def get(jobID: str) -> Deferred[JobSnapshot]:
        """
        The job's current snapshot.
        """

    def update(snapshot: JobSnapshot) -> Deferred[None]:
        """
        Replace a job's snapshot with a newer one.
        """

    def publish(jobID: str, name: str, data: JSON) -> Deferred[Event]:
        """
        Number, encode (once), record and fan out a new event; fires with
        the L{Event} (its id as subscribers get it). After a terminal event
        (C{complete}, C{failed}, C{cancelled}) the job's subscribers are
        dropped: each got it as its last event.

        The event may reach subscribers after the Deferred fires (a broker
        whose events come back from a server delivers them when they do),
        in publish order, each once.
        """

    def publishMany(jobID: str, name: str, datas: Sequence[JSON]) -> Deferred[list[Event]]:
        """
        C{publish} each of C{datas} in order (non-terminal events only),
        fanned out together; fires with the L{Event}s.
        """

    def flush() -> None:
        """
        Deliver every event this process has received to every local
        subscriber now (at shutdown, before connections are closed).
        """

    def subscribe(
        jobID: str, lastEventID: str | None, subscriber: ISubscriber
    ) -> Deferred[Callable[[], None]]:
        """
        Deliver the job's retained events after C{lastEventID}, then every
        new one, with nothing missed or repeated in between; fires with the
        idempotent unsubscribe function.

        The retained events are delivered before the Deferred fires, in one
        reactor turn (the memory broker: in this call). Cancelling the
        Deferred before it fires (the client went away) subscribes nothing
        and delivers nothing.

        C{lastEventID} rules as L{IJobBroker.subscribe}: C{None}, C{"0"}, an
        id the broker cannot parse and an id ahead of the job's last event
        all mean the whole retained history; if events after C{lastEventID}
        were dropped from the history, a C{reset} event (the job's state,
        progress and how many were missed) comes first.
        """

    def caughtUp(jobID: str, lastEventID: str | None) -> Deferred[bool]:
        """
        Whether a client that has seen up to C{lastEventID} has seen the
        job's terminal event (the stream answers C{204}); never for a job
        still running.
        """

    def subscriberCount() -> int:
        """
        How many subscriptions are open in this process, over all jobs.
        """

    def remove(jobID: str) -> Deferred[None]:
        """
        Forget a job as if it had never been: its id is unknown from now on.
        """

    def expire(jobID: str) -> Deferred[None]:
        """
        Delete a finished job and remember its id as expired: the per-job
        methods fail with L{twistedsse._errors.JobExpired} for it until
        C{forget}.
        """

    def forget(jobID: str) -> Deferred[None]:
        """
        Stop remembering an expired id: it is unknown from now on.
        """


@implementer(IAsyncJobBroker)
@attrs.frozen
class AsyncMemoryBroker:
    """
    L{IAsyncJobBroker} over a L{MemoryBroker}: each call is the memory
    broker's, its result (or exception) in an already-fired Deferred. The
    fan-out is the memory broker's own: C{publish} reaches the first slice
    of subscribers in the call, as before; a subscribe's history is
    delivered in the call.
    """

    broker: IJobBroker

    def create(self, snapshot: JobSnapshot) -> Deferred[None]:
        return maybeDeferred(self.broker.create, snapshot)

    def get(self, jobID: str) -> Deferred[JobSnapshot]:
        return maybeDeferred(self.broker.get, jobID)

    def update(self, snapshot: JobSnapshot) -> Deferred[None]:
        return maybeDeferred(self.broker.update, snapshot)

    def publish(self, jobID: str, name: str, data: JSON) -> Deferred[Event]:
        return maybeDeferred(self.broker.publish, jobID, name, data)

    def publishMany(self, jobID: str, name: str, datas: Sequence[JSON]) -> Deferred[list[Event]]:
        return maybeDeferred(self.broker.publishMany, jobID, name, datas)

    def flush(self) -> None:
        self.broker.flush()

    def subscribe(
        self, jobID: str, lastEventID: str | None, subscriber: ISubscriber
    ) -> Deferred[Callable[[], None]]:
        return maybeDeferred(self.broker.subscribe, jobID, lastEventID, subscriber)

    def caughtUp(self, jobID: str, lastEventID: str | None) -> Deferred[bool]:
        return maybeDeferred(self.broker.caughtUp, jobID, lastEventID)

    def subscriberCount(self) -> int:
        return self.broker.subscriberCount()

    def remove(self, jobID: str) -> Deferred[None]:
        return maybeDeferred(self.broker.remove, jobID)

    def expire(self, jobID: str) -> Deferred[None]:
        return maybeDeferred(self.broker.expire, jobID)

    def forget(self, jobID: str) -> Deferred[None]:
        return maybeDeferred(self.broker.forget, jobID)

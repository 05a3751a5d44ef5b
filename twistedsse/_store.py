"""
The job stores (L{IJobStore}): L{SQLiteJobStore}, what survives a restart,
and L{NullJobStore}, nothing does.

L{SQLiteJobStore}: Each job's snapshot is written
when it is created, starts and ends; when it ends, its final events (the
latest progress and the terminal event) are written too. On start the
service reads them back: finished renders keep their status, their final
events and their output; renders that were queued or running when the
process went away (even by SIGKILL) end as C{failed}, "interrupted".

A finished job is deleted (its rows) when it expires; its id is then kept
in C{expired}, with the time to forget it, so that a restart still answers
410 for it, not 404, for as long as the service would have (one more
expiry period): nothing is kept forever.

stdlib C{sqlite3}, in WAL mode: each write is one small transaction, done
in the reactor thread (a job has a handful in its life; events are not
written as they stream).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping

import attrs
from zope.interface import implementer

from . import _json
from ._interfaces import IJobStore
from ._job import JobSnapshot, JobState

_SCHEMA = """
create table if not exists jobs (
    id text primary key,
    snapshot text not null,
    created_at real not null
);
create table if not exists events (
    job_id text not null references jobs(id) on delete cascade,
    seq integer not null,
    name text not null,
    data text not null,
    primary key (job_id, seq)
);
create table if not exists expired (
    id text primary key,
    forget_at real not null
);
"""


def snapshotToRecord(snapshot: JobSnapshot) -> dict[str, Any]:
    record = snapshot.toJSON()
    record["state"] = snapshot.state.value
    return record


def snapshotFromRecord(record: Mapping[str, Any]) -> JobSnapshot:
    return JobSnapshot(
        id=record["id"],
        renderer=record["renderer"],
        params=record["params"],
        state=JobState(record["state"]),
        createdAt=record["created_at"],
        startedAt=record["started_at"],
        endedAt=record["ended_at"],
        progress=record["progress"],
        result=record["result"],
        error=record["error"],
        # (Absent from the records of earlier versions.)
        callbackURL=record.get("callback_url"),
    )


@attrs.frozen
class StoredEvent:
    seq: int
    name: str
    data: str


#: What a store's writes raise when they fail (a full disk, a locked file).
STORE_ERRORS = (sqlite3.Error, OSError)


@implementer(IJobStore)
@attrs.define
class SQLiteJobStore:
    """
    Jobs and their final events in one SQLite file.
    """

    path: Path
    _db: sqlite3.Connection = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute("pragma foreign_keys=on")
        self._db.executescript(_SCHEMA)

    def save(self, snapshot: JobSnapshot) -> None:
        """
        Write (or overwrite) a job's snapshot.
        """
        self._db.execute(
            "insert into jobs (id, snapshot, created_at) values (?, ?, ?) "
            "on conflict (id) do update set snapshot = excluded.snapshot",
            (snapshot.id, _json.dumps(snapshotToRecord(snapshot)), snapshot.createdAt),
        )

    def finish(self, snapshot: JobSnapshot, events: Iterable[StoredEvent]) -> None:
        """
        Write a finished job's snapshot and final events, in one
        transaction.
        """
        with self._db:
            self._db.execute("begin")
            self.save(snapshot)
            self._db.execute("delete from events where job_id = ?", (snapshot.id,))
            self._db.executemany(
                "insert into events (job_id, seq, name, data) values (?, ?, ?, ?)",
                [(snapshot.id, e.seq, e.name, e.data) for e in events],
            )

    def load(self) -> list[tuple[JobSnapshot, list[StoredEvent]]]:
        """
        Every job, oldest first, with its stored events in order.
        """
        events: dict[str, list[StoredEvent]] = {}
        for jobID, seq, name, data in self._db.execute(
            "select job_id, seq, name, data from events order by job_id, seq"
        ):
            events.setdefault(jobID, []).append(StoredEvent(seq, name, data))
        return [
            (snapshotFromRecord(_json.loads(text)), events.get(jobID, []))
            for jobID, text in self._db.execute("select id, snapshot from jobs order by created_at")
        ]

    def expire(self, jobID: str, forgetAt: float) -> None:
        """
        Delete a job (and its events), and remember its id as expired until
        C{forgetAt}.
        """
        with self._db:
            self._db.execute("begin")
            self._db.execute("delete from jobs where id = ?", (jobID,))
            self._db.execute(
                "insert or replace into expired (id, forget_at) values (?, ?)", (jobID, forgetAt)
            )

    def delete(self, jobID: str) -> None:
        """
        Delete a job and its events, remembering nothing.
        """
        self._db.execute("delete from jobs where id = ?", (jobID,))

    def forget(self, jobID: str) -> None:
        """
        Stop remembering an expired id.
        """
        self._db.execute("delete from expired where id = ?", (jobID,))

    def expired(self, now: float) -> list[tuple[str, float]]:
        """
        Delete the expired ids whose time to be forgotten has come; return
        the others as C{(id, forgetAt)}.
        """
        rows = list(
            self._db.execute("select id, forget_at from expired where forget_at > ? order by forget_at", (now,))
        )
        try:
            self._db.execute("delete from expired where forget_at <= ?", (now,))
        except sqlite3.Error:
            pass  # (a full disk) deleted at a later start; they are not returned
        return rows

    def close(self) -> None:
        self._db.close()


@implementer(IJobStore)
@attrs.frozen
class NullJobStore:
    """
    A store that keeps nothing: jobs live in the broker only and are gone
    after a restart (no C{--state-dir}).
    """

    def save(self, snapshot: JobSnapshot) -> None:
        pass

    def finish(self, snapshot: JobSnapshot, events: Iterable[StoredEvent]) -> None:
        pass

    def load(self) -> list[tuple[JobSnapshot, list[StoredEvent]]]:
        return []

    def expire(self, jobID: str, forgetAt: float) -> None:
        pass

    def delete(self, jobID: str) -> None:
        pass

    def forget(self, jobID: str) -> None:
        pass

    def expired(self, now: float) -> list[tuple[str, float]]:
        return []

    def close(self) -> None:
        pass

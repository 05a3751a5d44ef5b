"""
L{OutputDisk}: the finished outputs on disk, and the bounds on them: the
total budget (C{--max-output-bytes}), each running render's equal share of
it, and the free space the output filesystem must keep
(C{--min-free-bytes}).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.logger import Logger

from ._outcome import clientReason

_log = Logger()


@attrs.define
class OutputDisk:
    """
    @ivar directory: where outputs (C{JOBID.mp4}) and scratch files go.
    @ivar maxBytes: the total size of outputs on disk, or C{None}.
    """

    directory: Path
    maxRenders: int
    maxBytes: int | None = None
    minFreeBytes: int = 0
    statvfs: Callable[[str], Any] = os.statvfs
    # Finished outputs on disk, oldest first, with their sizes.
    _sizes: dict[str, int] = attrs.field(factory=dict, init=False)

    def pathOf(self, jobID: str) -> Path:
        return self.directory / f"{jobID}.mp4"

    def lacks(self) -> str | None:
        """
        Why the output filesystem cannot take a new render (less than
        C{minFreeBytes} free), or C{None}.
        """
        if self.minFreeBytes <= 0:
            return None
        where = self.directory
        while not where.exists() and where.parent != where:
            where = where.parent
        try:
            stat = self.statvfs(str(where))
        except OSError as e:
            return f"the output filesystem cannot be examined ({clientReason(e)})"
        free = stat.f_bavail * stat.f_frsize
        if free < self.minFreeBytes:
            return f"the output filesystem is nearly full: {free} bytes free, {self.minFreeBytes} needed"
        return None

    def share(self) -> int | None:
        """
        What one render may write, and reserves while it runs.
        """
        if self.maxBytes is None:
            return None
        return self.maxBytes // self.maxRenders

    def evict(self, renders: int) -> None:
        """
        Delete the oldest finished outputs until they and the shares of
        C{renders} renders fit in C{maxBytes}. Their jobs stay; their
        C{/output} answers L{twistedsse._errors.OutputExpired}.
        """
        share = self.share()
        if share is None or self.maxBytes is None:
            return
        budget = self.maxBytes - renders * share
        total = sum(self._sizes.values())
        while self._sizes and total > budget:
            jobID = next(iter(self._sizes))
            total -= self._sizes.pop(jobID)
            _log.info("deleting the output of render {jobID} to make room", jobID=jobID)
            unlink(self.pathOf(jobID))

    def add(self, jobID: str, size: int) -> None:
        """
        Count a finished output, the newest.
        """
        self._sizes[jobID] = size

    def delete(self, jobID: str) -> None:
        """
        Delete every file of a job (its output, any leftover).
        """
        self._sizes.pop(jobID, None)
        if self.directory.is_dir():
            for path in self.directory.glob(f"{jobID}.*"):
                unlink(path)

    def total(self) -> int:
        """
        The total size of the finished outputs on disk.
        """
        return sum(self._sizes.values())


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("could not remove {path}: {e}", path=path, e=e)

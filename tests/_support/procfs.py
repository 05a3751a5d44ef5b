"""
Readings from C{/proc} (Linux): a process's memory, descriptors, CPU time,
state, and the process tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def vmRSS(pid: int | str = "self") -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def fdCount(pid: int | str = "self") -> int:
    """
    How many file descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def openCount(path: Path, pid: int | str = "self") -> int:
    """
    How many of process C{pid}'s descriptors are open on C{path}.
    """
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def cpuSeconds(pid: int | str = "self") -> float:
    """
    The CPU time (user + system) process C{pid} has used, in seconds.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def statFields(pid: int) -> list[bytes] | None:
    """
    The fields of C{/proc/PID/stat} after the command name (state first:
    parent PID at 1, process group at 2, start time at 19), or C{None} for
    a process that is gone or a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else fields


def procStat(pid: int) -> tuple[int, int] | None:
    """
    (parent PID, start time) of a live process, or None (gone, or a
    zombie).
    """
    fields = statFields(pid)
    return None if fields is None else (int(fields[1]), int(fields[19]))


def alive(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie.
    """
    return procStat(pid) is not None


def allPIDs() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """
    Live descendants of C{root} (not C{root} itself): PID -> start time.
    """
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in allPIDs():
        stat = procStat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append((pid, stat[1]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found

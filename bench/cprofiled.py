"""
twistd under cProfile, for a window the harness chooses: the benchmark's
stand-in for py-spy where py-spy cannot attach (it needs ptrace and a
Python it recognises). Run as

    python bench/cprofiled.py OUTPUT [twistd arguments...]

it runs twistd's own entry point with the arguments given. The first
C{SIGUSR2} starts a C{cProfile.Profile} on the reactor's thread (Python
runs signal handlers on the main thread, where twistd runs the reactor),
the next one stops it and writes its C{pstats} to C{OUTPUT} (through a
temporary name, renamed: the harness never reads half a file). So the
profile covers the event window only, not start-up or the connects.

cProfile's hooks cost every Python call: the profiled run's latency and
CPU are inflated (the harness reports them only to say by how much); the
split of the time between functions is what to read. The render and its
supervisor are other processes, never profiled.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from types import FrameType


def main() -> None:
    output = sys.argv[1]
    sys.argv = ["twistd", *sys.argv[2:]]
    running: list[cProfile.Profile] = []

    def toggle(signum: int, frame: FrameType | None) -> None:
        if not running:
            profiler = cProfile.Profile()
            running.append(profiler)
            profiler.enable()
            return
        profiler = running.pop()
        profiler.disable()
        profiler.dump_stats(output + ".part")
        os.replace(output + ".part", output)

    signal.signal(signal.SIGUSR2, toggle)
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()

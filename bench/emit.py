"""
The benchmark's stand-in renderer: prints C{count} lines
C{{"progress": i/count, "t_ns": time.time_ns()}}, C{interval} seconds
apart, the first at once, then exits 0 (the servers then send
C{complete}).

It is registered as a command renderer (C{--renderer emit=...}) with both
servers, which give it the render's params as JSON on stdin. Params (each
overrides the option of the same name on the command line):

    count          events (default 50)
    interval       seconds between them (default 0.05: 20 events/s)
    start_file     wait until this file exists before the first event, so
                   that every subscriber is connected first; the harness
                   creates it once the load client reports them all
    start_timeout  give up waiting after this many seconds and exit 3
                   (default 300): an orphan never lingers

C{t_ns} is taken just before the line is written: the latency the harness
reports runs from here to the load client's C{read} of the event.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--start-file", default=None)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    options = parser.parse_args()
    text = "" if sys.stdin.isatty() else sys.stdin.read()
    params = json.loads(text) if text.strip() else {}
    count = int(params.get("count", options.count))
    interval = float(params.get("interval", options.interval))
    startFile = params.get("start_file", options.start_file)
    startTimeout = float(params.get("start_timeout", options.start_timeout))

    if startFile:
        deadline = time.monotonic() + startTimeout
        while not os.path.exists(startFile):
            if time.monotonic() > deadline:
                print(f"emit: no start file {startFile} after {startTimeout} s", file=sys.stderr)
                sys.exit(3)
            time.sleep(0.002)

    out = sys.stdout
    start = time.monotonic()
    for i in range(1, count + 1):
        out.write(json.dumps({"progress": i / count, "t_ns": time.time_ns()}) + "\n")
        out.flush()
        if i < count:
            # A steady cadence, whatever printing (or a busy core) cost.
            time.sleep(max(0.0, start + i * interval - time.monotonic()))


if __name__ == "__main__":
    main()

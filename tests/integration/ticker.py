"""
A command renderer for the tests: reads its params as JSON on stdin and
prints one timestamped JSON progress line every C{interval} seconds.

params: count (50), interval (0.02 s), delay (0 s before the first line),
start_file (wait, up to 30 s, until this file exists: the test creates
it once its clients are connected), exit (exit code, 0), ignore_term (ignore SIGTERM), output (bytes to write
to $TWISTEDSSE_OUTPUT), garbage (print a non-JSON line at this index),
pad (add a "pad" field of this many "x" characters to every line, for
load tests that need big events; absent or 0: no such field).
"""

import json
import os
import signal
import sys
import time


def main() -> None:
    params = json.loads(sys.stdin.read() or "{}")
    if params.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    count = int(params.get("count", 50))
    interval = float(params.get("interval", 0.02))
    time.sleep(float(params.get("delay", 0)))
    if params.get("start_file"):
        deadline = time.monotonic() + 30
        while not os.path.exists(params["start_file"]) and time.monotonic() < deadline:
            time.sleep(0.005)
    pad = "x" * int(params.get("pad", 0))
    start = time.monotonic()
    for i in range(1, count + 1):
        if params.get("garbage") == i:
            print("this is not json", flush=True)
        line = {"progress": i / count, "i": i, "t_ns": time.time_ns(), "pid": os.getpid(), "cwd": os.getcwd()}
        if pad:
            line["pad"] = pad
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        # Keep a steady cadence, independent of how long printing took.
        time.sleep(max(0.0, start + i * interval - time.monotonic()))
    if params.get("output"):
        with open(os.environ["TWISTEDSSE_OUTPUT"], "wb") as f:
            f.write(params["output"].encode())
    sys.exit(int(params.get("exit", 0)))


if __name__ == "__main__":
    main()

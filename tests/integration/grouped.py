"""
A command renderer for the containment tests: it reads its params as JSON
on stdin, starts two grandchildren that hold none of its pipes (a plain
C{sleep}, and one that ignores SIGTERM), and prints one JSON progress line
with what the test checks: its own pid, theirs, its environment and its
working directory (and whether it could write there). Then, by C{mode}:

  - C{hang} (the default): sleep (C{seconds}, default 30; bounded, so a
    server that fails to stop it cannot leave it running for ever).
  - C{exit}: exit with C{code} (0) at once, leaving the grandchildren
    running.

With C{ignore_term}, the renderer itself ignores SIGTERM too. The
grandchildren sleep C{seconds} too, so that whatever happens they end.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time


def main() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    params = json.loads(sys.stdin.read() or "{}")
    if params.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seconds = float(params.get("seconds", 30))
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    plain = subprocess.Popen(["sleep", f"{seconds:g}"], **quiet)
    # trap '' makes the shell ignore TERM, and an ignored signal stays
    # ignored across exec: this sleep survives SIGTERM.
    stubborn = subprocess.Popen(["sh", "-c", f"trap '' TERM; exec sleep {seconds:g}"], **quiet)
    scratch = os.path.join(os.getcwd(), "scratch.txt")
    try:
        with open(scratch, "w") as f:
            f.write("scratch")
        wrote = True
    except OSError:
        wrote = False
    payload = {
        "pid": os.getpid(),
        "grandchildren": [plain.pid, stubborn.pid],
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "wrote": wrote,
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
    }
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()
    if params.get("mode", "hang") == "exit":
        os._exit(int(params.get("code", 0)))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)


if __name__ == "__main__":
    main()

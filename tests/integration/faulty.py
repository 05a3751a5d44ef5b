"""
A command renderer for the fault tests that misbehaves on request: it reads
its params as JSON on stdin, prints one JSON progress line carrying its pid
(so the test can check afterwards that the process is gone), then does what
C{mode} says:

  - C{exit}: print C{stderr} (a list of lines) to stderr, write
    C{partial} bytes to C{$TWISTEDSSE_OUTPUT} if given, exit with C{code}.
  - C{signal}: kill itself with signal number C{signal}.
  - C{hang}: sleep (C{seconds}, default 30), ignoring SIGTERM if
    C{ignore_term}; the server must stop it.
  - C{garbage}: print C{line} (a string, or a list of byte values) as a
    line of stdout, then hang.
  - C{longline}: print one line of C{mib} MiB (default 10) in one write,
    then hang.
  - C{stderr}: write C{mib} MiB to stderr in 64 KiB chunks (C{newlines}:
    as lines of 100 bytes, else one endless line), then the line
    C{"last words"}, then exit with C{code}.
  - C{exiting}: on SIGTERM, say so on stderr, take C{cleanup} seconds to
    exit (exit 0); until then, hang.
  - C{echo}: print C{{"text": text}} as a second progress line, exit 0.
  - C{orphan}: start a grandchild that inherits stdout and stderr and
    sleeps C{seconds}, print its pid as a second progress line, exit
    C{code} at once: the child is gone but its pipes stay open. The line
    carries its parent's pid too (the supervisor of a contained render). With
    C{escape}, the grandchild leaves the render's process group (a session
    of its own), out of the service's reach.

With C{gate} (a path), it waits after its first line until that file
exists (at most 30 s), so that the test can subscribe first.

Core dumps are switched off first, so that a signal leaves no C{core} file
in the output directory (its working directory).
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time


def emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def hang(seconds: float = 30.0) -> None:
    # Bounded, so that a server that fails to stop us cannot leave us
    # running for ever; exit 0 then, which the tests would see as
    # "complete" instead of the failure they expect.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)


def main() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    params = json.loads(sys.stdin.read() or "{}")
    mode = params.get("mode", "exit")
    if params.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    emit({"progress": 0.1, "pid": os.getpid(), "mode": mode})
    if params.get("gate"):
        # Wait (bounded) until the test has subscribed: a finished job keeps
        # only its latest progress and terminal event, and the test needs
        # the line above.
        deadline = time.monotonic() + 30
        while not os.path.exists(params["gate"]) and time.monotonic() < deadline:
            time.sleep(0.01)

    if mode == "exit":
        for line in params.get("stderr", []):
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if "partial" in params:
            with open(os.environ["TWISTEDSSE_OUTPUT"], "wb") as f:
                f.write(params["partial"].encode())
        sys.exit(int(params.get("code", 0)))

    if mode == "signal":
        os.kill(os.getpid(), int(params["signal"]))
        time.sleep(5)  # the signal is delivered before this ends
        sys.exit(99)

    if mode == "hang":
        hang(float(params.get("seconds", 30)))

    if mode == "garbage":
        line = params["line"]
        data = line.encode("utf-8") if isinstance(line, str) else bytes(line)
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
        hang()

    if mode == "longline":
        size = int(float(params.get("mib", 10)) * 1024 * 1024)
        try:
            sys.stdout.buffer.write(b"x" * size + b"\n")
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        hang()

    if mode == "stderr":
        chunk = (b"e" * 99 + b"\n") * 655 + b"e" * 36 if params.get("newlines") else b"e" * 65536
        for _ in range(int(float(params.get("mib", 50)) * 16)):
            sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.write(b"\nlast words\n")
        sys.stderr.flush()
        sys.exit(int(params.get("code", 0)))

    if mode == "exiting":
        def cleanup(signum: int, frame: object) -> None:
            sys.stderr.write("TERM received, cleaning up\n")
            sys.stderr.flush()
            time.sleep(float(params.get("cleanup", 0.5)))
            sys.exit(0)

        signal.signal(signal.SIGTERM, cleanup)
        hang()

    if mode == "echo":
        emit({"text": params["text"]})
        sys.exit(0)

    if mode == "orphan":
        grandchild = subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep({float(params.get('seconds', 30))})"],
            stdin=subprocess.DEVNULL,
            start_new_session=bool(params.get("escape")),
        )
        emit({"progress": 0.2, "grandchild": grandchild.pid, "parent": os.getppid()})
        os._exit(int(params.get("code", 0)))

    sys.stderr.write(f"unknown mode {mode!r}\n")
    sys.exit(2)


if __name__ == "__main__":
    main()

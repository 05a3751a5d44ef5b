"""
How a render ended, as clients see it: from an L{ExitStatus} and the facts
of its plan to the job's final state, its terminal event's name and that
event's payload (an L{Outcome}).

Pure: no I/O, no clock, no broker. Whoever ran the render (in this process
today, a worker elsewhere later) decides the outcome here and reports it;
so every payload a client can get at the end of a render is built in this
one module, and its fields are a public contract (C{message}, C{reason},
C{exit_code}, C{signal}, C{stderr_tail} for a failure; C{output_url},
C{duration}, C{size}, C{elapsed} for C{complete}).
"""

from __future__ import annotations


import attrs

from ._errors import RenderProtocolError, UnknownRenderer
from ._job import JobState
from ._json import JSON, JSONObject
from ._render import ExitStatus

#: What stands for the output directory in a client's stderr lines.
OUTPUT_PLACEHOLDER = "<output>"


@attrs.frozen
class Outcome:
    """
    A job's end: its final C{state}, and the C{event} (C{complete},
    C{failed} or C{cancelled}) published with C{payload}.
    """

    state: JobState
    event: str
    payload: JSONObject


class OverShare(Exception):
    """
    A render wrote more than its share of C{--max-output-bytes}.
    """


def failurePayload(message: str, reason: str, status: ExitStatus | None = None) -> dict[str, JSON]:
    """
    The payload of a C{failed} event: why, as text and as a stable
    C{reason} word, and the process's exit facts when there was a process.
    """
    return {
        "message": message,
        "reason": reason,
        "exit_code": None if status is None else status.exitCode,
        "signal": None if status is None else status.signal,
        "stderr_tail": [] if status is None else list(status.stderrTail),
    }


def failed(message: str, reason: str, status: ExitStatus | None = None) -> Outcome:
    return Outcome(JobState.FAILED, "failed", failurePayload(message, reason, status))


def clientReason(error: Exception) -> str:
    """
    What went wrong, without the paths an C{OSError} carries.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, (RenderProtocolError, OverShare, UnknownRenderer)):
        return str(error)
    return type(error).__name__


def scrubPaths(status: ExitStatus, outputDir: str) -> ExitStatus:
    """
    The status with C{outputDir} (the resolved output directory) taken out
    of its stderr lines (ffmpeg names the file it cannot open): clients do
    not need to know the server's paths.
    """
    if not any(outputDir in line for line in status.stderrTail):
        return status
    return attrs.evolve(
        status, stderrTail=tuple(line.replace(outputDir, OUTPUT_PLACEHOLDER) for line in status.stderrTail)
    )


def exitFailure(status: ExitStatus, timeout: float) -> dict[str, JSON]:
    """
    The payload of a render whose process ended without success (and that
    nobody stopped on purpose, but for its timeout).
    """
    if status.stopReason == "timeout":
        return failurePayload(f"timed out after {timeout:g} s", reason="timeout", status=status)
    if status.protocolError is not None:
        return failurePayload(
            f"the renderer broke its output protocol: {status.protocolError}",
            reason="protocol",
            status=status,
        )
    if status.signal is not None:
        return failurePayload(f"the renderer was killed by signal {status.signal}", "signal", status)
    last = status.stderrTail[-1] if status.stderrTail else "no message on stderr"
    return failurePayload(f"the renderer exited with code {status.exitCode}: {last}", "exit", status)


def interrupted(status: ExitStatus | None = None) -> Outcome:
    """
    A job the service's shutdown (or an earlier run's end) interrupted,
    queued (no C{status}) or running.
    """
    return failed("interrupted: the server shut down", reason="interrupted", status=status)


CANCELLED_QUEUED = Outcome(JobState.CANCELLED, "cancelled", {"message": "cancelled before it started"})
CANCELLED_RUNNING = Outcome(JobState.CANCELLED, "cancelled", {"message": "cancelled by request"})


def workerLost(attempts: int) -> Outcome:
    """
    Redis mode: the workers that ran the render died (or vanished)
    C{attempts} times, the most it may take (C{--max-attempts}).
    """
    return failed(f"the worker running it was lost {attempts} times", reason="worker_lost")


def retrying(attempt: int, maxAttempts: int, reason: str) -> dict[str, JSON]:
    """
    The data of the non-terminal C{retrying} event (Redis mode): the render
    runs again from the start, on another worker.

    @param reason: C{worker_lost} (the worker holding it died) or
        C{handed_back} (it stopped at a warm shutdown before the render
        ended).
    """
    why = "the worker running it was lost" if reason == "worker_lost" else "its worker shut down"
    return {
        "attempt": attempt,
        "max_attempts": maxAttempts,
        "reason": reason,
        "message": f"{why}; starting again (attempt {attempt} of at most {maxAttempts})",
    }


def spawnFailed(error: Exception) -> Outcome:
    """
    The renderer could not be started; the client gets the kind of error
    only.
    """
    return failed(f"could not start the renderer ({clientReason(error)})", reason="spawn")


def storageFailed(message: str) -> Outcome:
    """
    The job store or the output filesystem could not take the job.
    """
    return failed(message, reason="storage")


def ofExit(status: ExitStatus, *, timeout: float, outputDir: str) -> Outcome | None:
    """
    The outcome of a render's exit, or C{None} if it succeeded (then its
    output decides: L{completed} or L{outputUnusable}).

    @param timeout: the render timeout, in seconds, named in the message.
    @param outputDir: the resolved output directory, scrubbed from stderr.
    """
    if status.stopReason == "cancel":
        return CANCELLED_RUNNING
    if status.stopReason == "shutdown":
        return interrupted(status)
    if not status.succeeded:
        return Outcome(JobState.FAILED, "failed", exitFailure(scrubPaths(status, outputDir), timeout))
    return None


def outputUnusable(error: Exception, status: ExitStatus) -> Outcome:
    """
    The render exited 0 but its output could not be finalized, or is over
    its share.
    """
    return failed(f"the render's output is unusable ({clientReason(error)})", reason="output", status=status)


def completed(
    *, size: int | None, outputURL: str | None, mediaDuration: float | None, startedAt: float, now: float
) -> Outcome:
    """
    A successful render: C{output_url} is the client's URL for the output
    only if a file was made (C{size} is not C{None}).
    """
    return Outcome(
        JobState.SUCCEEDED,
        "complete",
        {
            "output_url": outputURL if size is not None else None,
            "duration": mediaDuration,
            "size": size,
            "elapsed": round(now - startedAt, 3),
        },
    )

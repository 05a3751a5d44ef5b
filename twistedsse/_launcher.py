"""
The child side of a contained render: a small supervisor that the service
spawns instead of the render's command, run as a script
(C{python -I -S _launcher.py SERVICE_PID ARGV...}): an interpreter that
ignores C{PYTHON*} variables (they are the render's) and imports nothing
but the standard library (no site packages: it does not even import
C{twistedsse}), for the cheapest start: about twice the CPU of a bare
C{python -I -S -c pass} per render, and more wall time on a loaded
machine (the measured figures: docs/performance.md, "Figures cited by
the code").

Twisted's C{spawnProcess} has no hook to run code in the child before
C{exec}, and Linux gives no way to tie a whole process tree to its parent's
life (C{PR_SET_PDEATHSIG} signals the direct child only). So this
supervisor, the process the service knows:

  1. makes a new session, so that it leads a process group of its own
     (its pid is the group id) that the render and everything the render
     starts belong to: the service signals the whole group
     (C{os.killpg}) to stop a render (TERM, then KILL);
  2. asks the kernel for a signal (C{SIGUSR1}) when the service dies, then
     checks that the service is still its parent (it may have died
     already); on that signal, with the service gone, it KILLs the whole
     group, itself included: a SIGKILLed service leaves no render behind;
  3. forks the render, which gets every signal disposition back to the
     default (as Twisted gives its children), the kernel's promise of a
     SIGKILL if the supervisor dies, and exactly the environment the
     service gave the supervisor (read back from C{/proc/self/environ}: the interpreter adds
     C{LC_CTYPE} to its own when the locale is C), and execs the argv
     as given: never a shell;
  4. lets go of the render's pipes (so that their end is the render's),
     waits for it, then KILLs whatever it left running in the group,
     collects them, and ends the way the render ended: the same exit code,
     or the same signal raised on itself, so that the service reports the
     render's own exit status.

It is also the group's "child subreaper": a process the render started is
handed to it, not to init, when its parent dies, so that it collects every
process of the render. That matters where init collects nothing (a
container whose first process does not reap, or the service itself as pid
1): a zombie holds its pid for ever. For the same reason the service's KILL
spares the supervisor (L{killGroupMembers}): it collects the render and
reports, instead of dying with it.

A SIGTERM to the group reaches the supervisor too: it ignores it once the
render has started (the render got the same signal) and dies of it before
(so that a render stopped while it starts still ends by SIGTERM).

A render that leaves its group (C{setsid}, C{setpgid}) escapes all this:
that needs a cgroup (systemd's C{KillMode=control-group}).
"""

from __future__ import annotations

import os
import sys
import time

# Typing note: true for mypy only, without importing typing (a cost at
# start, like enum's below).
TYPE_CHECKING = False
if TYPE_CHECKING:
    # _signal has no stubs; signal's are the same names.
    import signal
else:
    # The C module: "signal" would import enum too, a fifth of our start.
    import _signal as signal

#: The signal the kernel sends the supervisor when the service dies.
DEATH_SIGNAL = signal.SIGUSR1

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: How long the supervisor waits to collect the processes it KILLed.
REAP_WITHIN = 1.0

#: Exit codes when the command cannot be run at all, as a shell uses them.
_CANNOT_EXECUTE, _NOT_FOUND = 126, 127


def _setParentDeathSignal(signum: int) -> None:
    """
    Ask the kernel to send C{signum} when our parent (the thread that
    forked us) dies. Linux only; elsewhere nothing happens.
    """
    _prctl(_PR_SET_PDEATHSIG, signum)


def _prctl(option: int, value: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not Linux
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(option, value, 0, 0, 0) != 0:  # pragma: no cover
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _environment() -> dict[bytes, bytes] | os._Environ[bytes]:
    """
    The environment this process was started with, exactly: the
    interpreter may have added to C{os.environ} (PEP 538 sets
    C{LC_CTYPE=C.UTF-8} when the locale is C), while the kernel's copy of
    the initial environment is untouched.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            data = f.read()
    except OSError:  # pragma: no cover - no /proc
        return os.environb
    env = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[name] = value
    return env


def _groupMembers(pgid: int, me: int, zombies: bool = False) -> list[int]:
    """
    The live processes of group C{pgid} other than C{me}, from C{/proc};
    with C{zombies}, the dead ones that wait to be collected too.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold anything, even
        # ")", so the fields are counted from the last ")".
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 2 and (zombies or fields[0] not in (b"Z", b"X")) and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def killGroupMembers(pgid: int, spare: int) -> set[int]:
    """
    SIGKILL every live process of group C{pgid} but C{spare}: what a render
    left running, for the supervisor; the render and all it started, for
    the service (which spares the supervisor). A KILLed process cannot
    fork any more, so repeating until a pass finds nothing new ends.

    @return: the pids KILLed.
    @raise OSError: there is no C{/proc} to look in.
    """
    killed: set[int] = set()
    for _ in range(100):
        fresh = [pid for pid in _groupMembers(pgid, spare) if pid not in killed]
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            killed.add(pid)
    return killed


def _reap(pgid: int, me: int, within: float = REAP_WITHIN) -> None:
    """
    Collect the dead of our group, until none is left but us, for at most
    C{within} seconds. As the subreaper we are handed each of them when
    its own parent dies (the render's children when it dies, theirs when
    they do), so they are all ours to collect in the end.
    """
    deadline = time.monotonic() + within
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if not pid:
                break
        if not _groupMembers(pgid, me, zombies=True) or time.monotonic() > deadline:
            return
        time.sleep(0.002)


def _endLike(status: int) -> None:
    """
    End this process the way the render ended (C{status} from C{waitpid}).
    """
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        # No core file of ours: the render made its own if it was allowed.
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        except (ImportError, ValueError, OSError):  # pragma: no cover
            pass
        try:
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        except (OSError, ValueError):
            pass  # SIGKILL: neither handled nor blocked in the first place
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # pragma: no cover - a signal that does not kill
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _resetSignals() -> None:
    """
    Every disposition back to the default, as Twisted's own children get
    them: the interpreter ignores SIGPIPE and SIGXFSZ, and an ignored
    signal would stay ignored across C{exec}.
    """
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) not in (signal.SIG_DFL, None):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def _run(argv: list[str], env: object, supervisor: int) -> None:
    """
    In the forked child: become the render.
    """
    try:
        _resetSignals()
        _setParentDeathSignal(signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(_CANNOT_EXECUTE)
        os.execvpe(argv[0], argv, env)  # type: ignore[arg-type]
    except BaseException as e:
        # No path in the message: it reaches clients in stderr_tail.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        try:
            os.write(2, f"twistedsse: cannot run the renderer: {reason}\n".encode())
        finally:
            os._exit(_NOT_FOUND if isinstance(e, FileNotFoundError) else _CANNOT_EXECUTE)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or not argv[1].isdigit():
        os.write(2, b"usage: _launcher.py SERVICE_PID ARGV...\n")
        os._exit(2)
    service = int(argv[1])
    command = argv[2:]
    me = os.getpid()
    started = False

    def terminated(signum: int, frame: object) -> None:
        # Before the render exists, a stop is ours to obey; after, the
        # render got it too (it went to the whole group), and we wait to
        # report how it ends.
        if not started or os.getpid() != me:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def orphaned(signum: int, frame: object) -> None:
        if os.getppid() != service and os.getpid() == me:
            os.killpg(me, signal.SIGKILL)

    signal.signal(signal.SIGTERM, terminated)
    os.setsid()
    signal.signal(DEATH_SIGNAL, orphaned)
    _setParentDeathSignal(DEATH_SIGNAL)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != service:
        # The service died before the kernel could be asked to tell us.
        os._exit(_CANNOT_EXECUTE)
    env = _environment()
    child = os.fork()
    if child == 0:
        _run(command, env, me)
    started = True
    # Signals the render sends its own group (kill 0) are not for us: we
    # wait to report how it ends.
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGALRM,
                   signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):  # fmt: skip
        signal.signal(signum, signal.SIG_IGN)
    # The render holds its pipes; we must not keep them open after it.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        pid, status = os.waitpid(child, 0)
        if pid == child and not os.WIFSTOPPED(status) and not os.WIFCONTINUED(status):
            break
    try:
        killGroupMembers(me, me)
        _reap(me, me)
    except OSError:  # pragma: no cover - no /proc
        pass
    _endLike(status)


if __name__ == "__main__":
    main(sys.argv)

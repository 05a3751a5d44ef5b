"""
Whether a C{--listen} description can be reached only from this machine:
what decides if the service may start without authentication.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping

#: systemd passes its sockets from this file descriptor on (sd_listen_fds).
SD_LISTEN_FDS_START = 3


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    """
    A strports description's positional and keyword arguments, with
    C{\\:} escapes, as twisted.internet.endpoints parses them.
    """
    pieces: list[str] = []
    current = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    args: list[str] = []
    kw: dict[str, str] = {}
    for piece in pieces:
        name, sep, value = piece.partition("=")
        if sep:
            kw[name] = value
        else:
            args.append(piece)
    return args, kw


def _loopbackAddress(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every interface), or a name: not provably loopback


def _systemdSocket(kw: Mapping[str, str], environ: Mapping[str, str], firstFD: int) -> bool:
    """
    The socket systemd passed is bound to a loopback address (or is a Unix
    socket).
    """
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        index = names.index(kw["name"]) if "name" in kw else int(kw.get("index", "0"))
    except ValueError:
        return False
    if not 0 <= index < count:
        return False
    try:
        fd = os.dup(firstFD + index)
    except OSError:
        return False
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return False
    with probe:
        if probe.family == socket.AF_UNIX:
            return True
        if probe.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        return _loopbackAddress(probe.getsockname()[0])


def systemdEnvironment() -> Mapping[str, str]:
    """
    C{LISTEN_FDS} and C{LISTEN_FDNAMES} as systemd passed them to this
    process. Twisted's C{systemd:} endpoint parser takes them (and
    C{LISTEN_PID}) out of C{os.environ} when
    C{twisted.internet.endpoints} is first imported (as sd_listen_fds does
    with C{unset_environment}), which is before any option is read: they
    are read back from the sockets it holds, the ones a C{systemd:}
    endpoint adopts.
    """
    if "LISTEN_FDS" in os.environ:
        return os.environ
    # (Private: the parser's copy is the only one left.)
    from twisted.internet.endpoints import _SystemdParser

    inherited = _SystemdParser._sddaemon
    descriptors = inherited.inheritedDescriptors()
    if not descriptors:
        return {}
    names = {fd: name for name, fd in inherited.inheritedNamedDescriptors().items()}
    return {
        "LISTEN_FDS": str(len(descriptors)),
        "LISTEN_FDNAMES": ":".join(names.get(fd, "unknown") for fd in descriptors),
    }


def loopbackOnly(
    description: str, environ: Mapping[str, str] | None = None, firstFD: int = SD_LISTEN_FDS_START
) -> bool:
    """
    C{description} (strports) listens only where no other machine can
    connect: a TCP or TLS port on a loopback interface (C{127.0.0.0/8},
    C{::1}), a Unix socket, or a systemd socket bound to one of those.
    No interface means every interface; an endpoint type we cannot read
    counts as reachable.
    """
    args, kw = _split(description)
    kind = args[0] if args else ""
    if kind.isdigit():
        return False  # the old "8080" form: TCP on every interface
    if kind in ("tcp", "tcp6"):
        # (tcp:PORT:INTERFACE is the positional form.)
        return _loopbackAddress(kw.get("interface", args[2] if len(args) > 2 else ""))
    if kind == "ssl":
        return _loopbackAddress(kw.get("interface", ""))
    if kind == "unix":
        return True
    if kind == "systemd":
        return _systemdSocket(kw, systemdEnvironment() if environ is None else environ, firstFD)
    return False

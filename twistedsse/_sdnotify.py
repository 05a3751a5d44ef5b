"""
L{Notifier}: the service manager's notify socket (C{sd_notify(3)}), from
scratch: one datagram of C{NAME=VALUE} lines to the C{AF_UNIX} socket named
by C{$NOTIFY_SOCKET}, for C{Type=notify} units (C{READY=1}, C{STOPPING=1},
C{STATUS=...}).

Intentional divergences from libsystemd's C{sd_notify}:
 - no C{vsock:} addresses (systemd >= 254, for VMs): a value that is not a
   path or an abstract name (C{@...}) is reported once and ignored;
 - no file descriptors passed (C{FDSTORE=1}), no watchdog: twistedsse
   sends only the three messages above.

Sending never raises into the service: the manager may be gone (a unit
stopped by force), or the socket full; the first failure is logged, the
rest are not (a service that cannot notify says so once, not at every
status).
"""

from __future__ import annotations

import os
import socket
from typing import MutableMapping

import attrs
from twisted.logger import Logger

_log = Logger()

#: The variable systemd names its notify socket in.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes | None:
    """
    The C{AF_UNIX} address C{$NOTIFY_SOCKET} names: a path, or for a
    leading C{@} a name in the abstract namespace (a leading NUL byte);
    C{None} for anything else.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8")
    return None


@attrs.define
class Notifier:
    """
    Sends C{sd_notify} messages to one notify socket.

    @ivar address: the socket's C{AF_UNIX} address (a path, or C{bytes}
        beginning with NUL for an abstract name); C{None} sends nothing
        (C{$NOTIFY_SOCKET} was not usable: said once, at the first send).
    @ivar description: C{$NOTIFY_SOCKET} as given, for the log.
    """

    address: str | bytes | None
    description: str
    _failed: bool = attrs.field(default=False, init=False)

    @classmethod
    def fromEnvironment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier | None:
        """
        The notifier C{$NOTIFY_SOCKET} names, or C{None} when it is unset
        (not started by a service manager, or not as C{Type=notify}).

        The variable is removed from C{environ} (by default
        C{os.environ}), as C{sd_notify}'s C{unset_environment} does: no
        child process (a render) inherits it and notifies in our name.
        """
        if environ is None:
            environ = os.environ
        value = environ.pop(NOTIFY_SOCKET, "")
        if not value:
            return None
        return cls(_address(value), value)

    def notify(self, **fields: str) -> None:
        """
        Send one message: each C{NAME=value} on a line of its own (the
        names as given: C{READY="1"}, C{STATUS="..."}). A value with a
        newline is cut at it (a line each, says the protocol).
        """
        lines = [f"{name}={str(value).splitlines()[0] if value else ''}" for name, value in fields.items()]
        message = "\n".join(lines).encode("utf-8")
        if self._failed:
            return
        if self.address is None:
            self._fail(f"${NOTIFY_SOCKET} is neither a path nor an abstract name (@...)")
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A full socket (a manager that does not read) must not
                # block the reactor: the message is dropped instead.
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as e:
            self._fail(e.strerror or repr(e))

    def _fail(self, why: str) -> None:
        self._failed = True
        _log.warn(
            "cannot notify the service manager at {socket}: {why} (no more notifications are sent)",
            socket=self.description,
            why=why,
        )

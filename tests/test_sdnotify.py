"""
L{twistedsse._sdnotify}: sd_notify messages on a real datagram socket.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistedsse._sdnotify import Notifier


class NotifierTests(SynchronousTestCase):
    def bound(self, address: str | bytes) -> socket.socket:
        """
        A datagram socket bound to C{address}, as the service manager's.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.settimeout(5)
        return sock

    def shortDirectory(self) -> str:
        # (A UNIX socket's path is at most 107 bytes: mktemp's are long.)
        directory = tempfile.mkdtemp(prefix="sdn")
        self.addCleanup(os.rmdir, directory)
        return directory

    def logged(self) -> list[dict[str, object]]:
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_path(self) -> None:
        """
        C{$NOTIFY_SOCKET} a path: each message is one datagram there, a
        C{NAME=value} line per field; the variable leaves the environment.
        """
        path = os.path.join(self.shortDirectory(), "notify")
        receiver = self.bound(path)
        self.addCleanup(os.unlink, path)
        environ = {"NOTIFY_SOCKET": path, "OTHER": "x"}
        notifier = Notifier.fromEnvironment(environ)
        assert notifier is not None
        self.assertEqual(environ, {"OTHER": "x"})
        notifier.notify(READY="1", STATUS="serving on 127.0.0.1:8080")
        notifier.notify(STOPPING="1")
        self.assertEqual(receiver.recv(4096), b"READY=1\nSTATUS=serving on 127.0.0.1:8080")
        self.assertEqual(receiver.recv(4096), b"STOPPING=1")

    def test_abstract(self) -> None:
        """
        A leading C{@} names a socket in the abstract namespace.
        """
        name = f"twistedsse-test-{os.getpid()}-{id(self)}"
        receiver = self.bound(b"\0" + name.encode())
        notifier = Notifier.fromEnvironment({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        notifier.notify(READY="1")
        self.assertEqual(receiver.recv(4096), b"READY=1")

    def test_unset(self) -> None:
        """
        No C{$NOTIFY_SOCKET} (or an empty one): no notifier at all.
        """
        self.assertIsNone(Notifier.fromEnvironment({}))
        self.assertIsNone(Notifier.fromEnvironment({"NOTIFY_SOCKET": ""}))

    def test_newlineCut(self) -> None:
        """
        A value is one line: what follows a newline is not sent (it would
        be read as another field).
        """
        path = os.path.join(self.shortDirectory(), "notify")
        receiver = self.bound(path)
        self.addCleanup(os.unlink, path)
        Notifier(path, path).notify(STATUS="one\nREADY=1")
        self.assertEqual(receiver.recv(4096), b"STATUS=one")

    def test_failureLoggedOnce(self) -> None:
        """
        A socket that is not there: no exception reaches the caller, one
        warning is logged, and later messages are dropped silently.
        """
        events = self.logged()
        path = os.path.join(self.shortDirectory(), "gone")
        notifier = Notifier(path, path)
        notifier.notify(READY="1")
        notifier.notify(STOPPING="1")
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["socket"], path)

    def test_unusableAddress(self) -> None:
        """
        A value that is neither a path nor C{@name} (systemd's C{vsock:},
        which we do not speak) is said once, and nothing is sent.
        """
        events = self.logged()
        notifier = Notifier.fromEnvironment({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert notifier is not None
        notifier.notify(READY="1")
        notifier.notify(READY="1")
        self.assertEqual([e["socket"] for e in events if e.get("log_level") == LogLevel.warn], ["vsock:2:1234"])

    def test_fullSocketDoesNotBlock(self) -> None:
        """
        A manager that reads nothing: once its socket's queue is full the
        send fails at once (it would block the reactor) and is logged.
        """
        path = os.path.join(self.shortDirectory(), "notify")
        self.bound(path)
        self.addCleanup(os.unlink, path)
        events = self.logged()
        notifier = Notifier(path, path)
        for _ in range(10_000):
            notifier.notify(STATUS="x" * 1000)
            if notifier._failed:
                break
        self.assertTrue(notifier._failed)
        self.assertEqual(len([e for e in events if e.get("log_level") == LogLevel.warn]), 1)

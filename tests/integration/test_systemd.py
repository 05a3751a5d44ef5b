"""
The systemd units we ship (docs/systemd/), checked by systemd itself
(C{systemd-analyze verify}: every key known, every value parsed, the
dependencies there) and against what the worker's shutdown needs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests._support.need import needProgram
from tests._support.units import PREFIX, UNITS, execStart, seconds, setting, settings

WORKER = UNITS / "twistedsse-worker.service"
WEB = UNITS / "twistedsse-web.service"
SINGLE = UNITS / "twistedsse.service"
SERVICES = (SINGLE, WEB, WORKER)

#: The highest C{systemd-analyze security} exposure each service may have:
#: what the units reach (measured with systemd 252, Debian 12: 1.4 "OK"
#: for each; 8.5 "EXPOSED" before the hardening). What is left is the
#: network (they serve it), the syscall groups they need (@resources for
#: setrlimit), and the options each unit's comments say it leaves out.
EXPOSURE = 1.4

#: Hardening every service sets, as these values.
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}

#: What the units' C{EnvironmentFile=} (/etc/twistedsse/redis.env) and
#: systemd give their command lines, for reading them.
ENVIRONMENT = {
    "TWISTEDSSE_REDIS": "redis://redis.internal:6379/0",
    "CREDENTIALS_DIRECTORY": "/run/credentials/twistedsse-worker.service",
    "TWISTEDSSE_LISTEN": "tcp:8080:interface=127.0.0.1",
    "TWISTEDSSE_AUTH": "",
}


def option(argv: list[str], name: str) -> str:
    """
    The value of C{name} (C{--name VALUE} or C{--name=VALUE}) in C{argv}.
    """
    for index, word in enumerate(argv):
        if word == name:
            return argv[index + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1 :]
    raise AssertionError(f"no {name} in {argv}")


class VerifyTests(SynchronousTestCase):
    def verify(self, *names: str) -> None:
        """
        C{systemd-analyze verify} the units C{names} together, copied into a
        directory of their own with the install prefix (C{/opt/...}, which
        it checks exists) made this checkout's virtualenv: it says nothing
        and exits 0. (It exits 0 after warnings such as an unknown key, so
        the silence is what is asserted.)
        """
        self.assertTrue(any(PREFIX in (UNITS / name).read_text() for name in names), "nothing to run?")
        analyze = needProgram("systemd-analyze")
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in names:
            text = (UNITS / name).read_text()
            (directory / name).write_text(text.replace(PREFIX, str(Path(sys.executable).parent) + "/"))
        result = subprocess.run(
            [analyze, "verify", "--man=no", *(str(directory / name) for name in names)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_everyUnitIsVerified(self) -> None:
        """
        Each unit in docs/systemd/ has a test below that verifies it.
        """
        self.assertEqual(
            sorted(p.name for p in UNITS.iterdir()),
            sorted(["twistedsse.service", "twistedsse.socket", "twistedsse-web.service", "twistedsse-worker.service"]),
        )

    def test_singleMachine(self) -> None:
        """
        twistedsse.service with its socket (socket activation) verifies.
        """
        self.verify("twistedsse.service", "twistedsse.socket")

    def test_worker(self) -> None:
        """
        twistedsse-worker.service verifies.
        """
        self.verify("twistedsse-worker.service")

    def test_web(self) -> None:
        """
        twistedsse-web.service verifies.
        """
        self.verify("twistedsse-web.service")

    def test_verifyFindsAnUnknownKey(self) -> None:
        """
        The check above fails on a unit systemd only warns about: a key it
        does not know (here misspelt), which it ignores and exits 0 for.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        broken = directory / "broken.service"
        text = WORKER.read_text().replace("KillMode=", "KilMode=")
        broken.write_text(text.replace(PREFIX, str(Path(sys.executable).parent) + "/"))
        result = subprocess.run([needProgram("systemd-analyze"), "verify", "--man=no", str(broken)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        self.assertEqual(result.returncode, 0)
        self.assertIn("Unknown key 'KilMode'", result.stderr)


def installed(case: SynchronousTestCase, *names: str) -> Path:
    """
    A directory with the units C{names}, their install prefix made this
    checkout's virtualenv (C{systemd-analyze} checks the binary exists).
    """
    directory = Path(case.mktemp())
    directory.mkdir()
    for name in names:
        text = (UNITS / name).read_text()
        (directory / name).write_text(text.replace(PREFIX, str(Path(sys.executable).parent) + "/"))
    return directory


class NotifyAndHardeningTests(SynchronousTestCase):
    def test_notify(self) -> None:
        """
        Every service is C{Type=notify}, and only its main process (twistd)
        may notify.
        """
        for unit in SERVICES:
            self.assertEqual(setting(unit, "Service.Type"), "notify", unit.name)
            self.assertEqual(setting(unit, "Service.NotifyAccess"), "main", unit.name)

    def test_hardening(self) -> None:
        """
        Every service sets the same hardening, and none denies writable
        executable memory (libffi closures, a render's JIT may need it).
        """
        for unit in SERVICES:
            found = {key: setting(unit, f"Service.{key}") for key in HARDENING}
            self.assertEqual(found, HARDENING, unit.name)
            self.assertEqual(settings(unit)["Service.SystemCallFilter"], ["@system-service", "~@privileged"])
            self.assertNotIn("Service.MemoryDenyWriteExecute", settings(unit), unit.name)
            self.assertEqual(setting(unit, "Service.LimitNOFILE"), "65536", unit.name)

    def test_singleMachine(self) -> None:
        """
        The single-machine service runs as a dynamic user whose state
        directory (systemd's, made for it) keeps the jobs, and serves the
        socket its socket unit passes by name.
        """
        argv = execStart(SINGLE, {})
        self.assertEqual(setting(SINGLE, "Service.DynamicUser"), "yes")
        self.assertEqual(setting(SINGLE, "Service.StateDirectory"), "twistedsse")
        self.assertEqual(option(argv, "--state-dir"), "/var/lib/twistedsse")
        name = setting(UNITS / "twistedsse.socket", "Socket.FileDescriptorName")
        self.assertEqual(option(argv, "--listen"), f"systemd:domain=INET:name={name}")
        self.assertEqual(setting(SINGLE, "Unit.Requires"), "twistedsse.socket")

    def test_exposure(self) -> None:
        """
        C{systemd-analyze security --offline} rates each service at most
        L{EXPOSURE}.
        """
        analyze = needProgram("systemd-analyze")
        directory = installed(self, *(unit.name for unit in SERVICES), "twistedsse.socket")
        for unit in SERVICES:
            result = subprocess.run(
                [analyze, "security", "--offline=yes", "--no-pager", str(directory / unit.name)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
            self.assertIsNotNone(match, result.stdout + result.stderr)
            assert match is not None
            self.assertLessEqual(float(match.group(1)), EXPOSURE, unit.name)


class RedisModeUnitTests(SynchronousTestCase):
    def test_stopWaitsForTheDrain(self) -> None:
        """
        systemd waits longer than the worker's warm shutdown may take
        (C{--drain-timeout}, then C{--kill-grace} for a render stopped
        after it) before it KILLs everything.
        """
        argv = execStart(WORKER, ENVIRONMENT)
        drain = float(option(argv, "--drain-timeout"))
        grace = float(option(argv, "--kill-grace"))
        self.assertEqual(setting(WORKER, "Service.KillSignal"), "SIGTERM")
        self.assertGreater(seconds(setting(WORKER, "Service.TimeoutStopSec")), drain + grace)

    def test_signalsTwistdAlone(self) -> None:
        """
        The stop signal goes to twistd only (C{KillMode=mixed}), not to the
        renders it is letting finish.
        """
        self.assertEqual(setting(WORKER, "Service.KillMode"), "mixed")

    def test_redisPasswordFromACredential(self) -> None:
        """
        Both Redis-mode units read the password from the file systemd
        passes as a credential, never from the command line or the
        environment.
        """
        for unit in (WORKER, WEB):
            argv = execStart(unit, ENVIRONMENT)
            name, _, source = setting(unit, "Service.LoadCredential").partition(":")
            self.assertEqual(option(argv, "--redis-password-file"), f"{ENVIRONMENT['CREDENTIALS_DIRECTORY']}/{name}")
            self.assertEqual(source, "/etc/twistedsse/redis-password")
            self.assertEqual(option(argv, "--redis"), ENVIRONMENT["TWISTEDSSE_REDIS"])

    def test_sharedOutputs(self) -> None:
        """
        Web instance and worker use the same output directory, which the
        units may write under C{ProtectSystem=strict} and which must be
        mounted before they start.
        """
        for unit in (WORKER, WEB):
            argv = execStart(unit, ENVIRONMENT)
            self.assertEqual(option(argv, "--output-dir"), "/srv/twistedsse/outputs")
            self.assertEqual(setting(unit, "Service.ProtectSystem"), "strict")
            self.assertEqual(setting(unit, "Service.ReadWritePaths"), "/srv/twistedsse/outputs")
            self.assertEqual(setting(unit, "Unit.RequiresMountsFor"), "/srv/twistedsse/outputs")
            self.assertEqual(setting(unit, "Service.User"), "twistedsse")
            self.assertNotIn("Service.DynamicUser", settings(unit))

    def test_restartsBelowTheStartLimit(self) -> None:
        """
        A Redis-mode unit that fails to start (Redis down or loading) is
        started again every C{RestartSec} without reaching systemd's
        default start limit (5 starts in 10 s), whatever its start takes:
        it keeps trying until Redis answers.
        """
        for unit in (WORKER, WEB):
            self.assertEqual(setting(unit, "Service.Restart"), "on-failure")
            self.assertNotIn("Unit.StartLimitBurst", settings(unit))
            self.assertNotIn("Unit.StartLimitIntervalSec", settings(unit))
            # Starts at 0, R, 2R, ...: fewer than 5 within any 10 s.
            self.assertGreaterEqual(seconds(setting(unit, "Service.RestartSec")) * 4, 10)

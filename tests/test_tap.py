"""
The twistd plugin: options parsing, the service tree, and discovery.
"""

from __future__ import annotations

import gc
import os
import signal

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from twistedsse import tap
from twistedsse._service import RenderService


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        With no options: listen on 127.0.0.1:8080, keepalive 15 s, no
        command renderers, a temporary output directory.
        """
        options = self.parse()
        self.assertEqual(options["listen"], ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(options["keepalive"], 15.0)
        self.assertEqual(options["renderers"], [])
        self.assertIsNone(options["output-dir"])
        self.assertGreaterEqual(options["max-renders"], 1)

    def test_everyOption(self) -> None:
        """
        Every option is parsed and converted; --listen and --renderer repeat.
        """
        options = self.parse(
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp6:0:interface=\\:\\:1",
            "--renderer", "ticks=python3 -u 'my script.py' --n 3",
            "--renderer", "other=/bin/true",
            "--output-dir", "/srv/out",
            "--keepalive", "2.5",
            "--max-renders", "3",
            "--history", "50",
            "--ffmpeg", "/usr/bin/ffmpeg",
            "--render-timeout", "90",
            "--kill-grace", "1",
            "--retry", "500",
        )  # fmt: skip
        self.assertEqual(len(options["listen"]), 2)
        self.assertEqual(
            [(r.name, r.argv) for r in options["renderers"]],
            [("ticks", ("python3", "-u", "my script.py", "--n", "3")), ("other", ("/bin/true",))],
        )
        self.assertEqual(
            (options["keepalive"], options["max-renders"], options["history"], options["retry"]), (2.5, 3, 50, 500)
        )

    def test_refusals(self) -> None:
        """
        Bad values are usage errors that say what is wrong.
        """
        for argv, words in [
            (["--keepalive", "0"], "--keepalive must be at least"),
            (["--keepalive", "soon"], "--keepalive must be a float"),
            (["--max-renders", "0"], "--max-renders must be at least 1"),
            (["--history", "1"], "--history must be at least 2"),
            (["--renderer", "nocommand"], "expected NAME=COMMAND"),
            (["--renderer", "Bad Name=/bin/true"], "renderer name must be"),
            (["--renderer", "x=echo 'unbalanced"], "--renderer"),
            (["--renderer", "x="], "empty command"),
            (["--renderer", "card=/bin/true"], "taken"),
            (["--renderer", "a=/bin/true", "--renderer", "a=/bin/false"], "taken"),
            (["--render-threads", "0"], "--render-threads must be at least 1"),
            (["--render-env", "A-B"], "--render-env: expected NAME or NAME=VALUE"),
            (["--render-env", "TWISTEDSSE_OUTPUT=/x"], "set by twistedsse itself"),
            (["--role", "boss"], "--role must be one of web, worker, all"),
            (["--role", "worker"], "--role worker needs --redis"),
            (["--redis-password-file", "/p"], "--redis-password-file needs --redis"),
            (["--redis", "redis://127.0.0.1:1/0"], "--redis needs --output-dir"),
            (["--redis", "redis://127.0.0.1:1/0", "--output-dir", "/o", "--state-dir", "/s"], "--state-dir keeps"),
            (["--redis", "redis://:pw@127.0.0.1:1/0", "--output-dir", "/o"], "password"),
            (["--redis", "redis://127.0.0.1:1/0", "--output-dir", "/o", "--max-attempts", "0"], "--max-attempts must be at least 1"),
            (["--redis", "redis://127.0.0.1:1/0", "--output-dir", "/o", "--claim-timeout", "0.5"], "--claim-timeout must be at least 1"),
            # Checked at start: nothing listens on port 1.
            (["--redis", "redis://127.0.0.1:1/0", "--output-dir", "/o"], "Redis at redis://127.0.0.1:1/0 cannot be reached"),
        ]:
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertIn(words, str(caught.exception), argv)

    def test_renderContainment(self) -> None:
        """
        --render-threads caps a render's threads (default: the CPUs this
        process may use); --render-env repeats, and reaches every render's
        environment with the thread budget.
        """
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)
        self.assertIsNone(self.parse()["render-threads"])
        options = self.parse("--render-threads", "2", "--render-env", "TOKEN", "--render-env", "MODE=fast",
                             "--output-dir", self.mktemp())  # fmt: skip
        self.assertEqual((options["render-threads"], options["render-env"]), (2, ["TOKEN", "MODE=fast"]))
        self.patch(tap.os, "environ", {"TOKEN": "t", "SECRET": "s"})
        render = list(tap.makeService(options, MemoryReactorClock()))[0]
        self.assertEqual(render.renderEnv, {"TWISTEDSSE_THREADS": "2", "TOKEN": "t", "MODE": "fast"})
        self.assertEqual(render.renderers["card"]._threads, 2)
        default = tap.makeService(self.parse("--output-dir", self.mktemp()), MemoryReactorClock())
        self.assertEqual(list(default)[0].renderEnv["TWISTEDSSE_THREADS"], str(len(os.sched_getaffinity(0))))

    def test_systemdWithoutSocket(self) -> None:
        """
        A systemd listen description with no socket passed is a clear usage
        error, not an IndexError at start-up.
        """
        self.patch(tap.os, "environ", {})
        with self.assertRaises(UsageError) as caught:
            self.parse("--listen", "systemd:domain=INET:index=0")
        self.assertIn("no socket passed by systemd", str(caught.exception))


class LoggingOptionsTests(SynchronousTestCase):
    def twistd(self, *argv: str) -> tap.Options:
        """
        The plugin's options as twistd parses them (its own options first).
        """
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions([*argv[: argv.index("twistedsse")], *argv[argv.index("twistedsse") :]])
        options: tap.Options = config.subOptions
        return options

    def test_defaultsAndValues(self) -> None:
        """
        --log-format is text and --log-level info by default; bad values
        are usage errors.
        """
        options = OptionsTests.parse(self)
        self.assertEqual((options["log-format"], options["log-level"]), ("text", "info"))
        options = OptionsTests.parse(self, "--log-format", "json", "--log-level", "debug")
        self.assertEqual((options["log-format"], options["log-level"]), ("json", "debug"))
        for argv in (["--log-format", "xml"], ["--log-level", "loud"]):
            self.assertRaises(UsageError, OptionsTests.parse, self, *argv)

    def test_twistdDestination(self) -> None:
        """
        Under twistd, the observer writes where twistd's would: stdout for
        --nodaemon without --logfile or with --logfile=-, else the file
        (rotated on SIGUSR1).
        """
        for argv in (["-n"], ["-n", "--logfile=-"]):
            observer = tap.twistdLogObserver(self.twistd(*argv, "twistedsse", "--log-format", "json"))
            self.assertIsNotNone(observer, argv)
        path = self.mktemp()
        options = self.twistd("-n", f"--logfile={path}", "twistedsse", "--log-format", "json")
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        observer = tap.twistdLogObserver(options)
        # (SIGUSR1 rotates the file, as with twistd's own observer.)
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))
        assert observer is not None
        observer({"log_format": "hello {who}", "who": "file", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
        self.assertIn('"log_text": "hello file"', open(path).read())
        self.assertIsNone(tap.twistdLogObserver(OptionsTests.parse(self)), "outside twistd")

    def test_twistdLoggerWins(self) -> None:
        """
        twistd's --logger or --syslog make their own observer: ours is not
        made, and asking for a format or level with them is refused.
        """
        options = self.twistd("-n", "--logger", "twisted.logger.textFileLogObserver", "twistedsse")
        self.assertIsNone(tap.twistdLogObserver(options))
        with self.assertRaises(UsageError) as caught:
            self.twistd("-n", "--syslog", "twistedsse", "--log-format", "json")
        self.assertIn("do not go with twistd's --logger or --syslog", str(caught.exception))
        with self.assertRaises(UsageError):
            self.twistd("--logfile=-", "twistedsse")


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        thresholds = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*thresholds)

        self.addCleanup(restore)

    def test_garbageCollectorTuned(self) -> None:
        """
        The service process freezes what it built at startup out of the
        cycle collector and raises the young-generation threshold (see
        L{tap.tuneGarbageCollector}).
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--output-dir", self.mktemp()])
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        tap.makeService(options, MemoryReactorClock())
        self.assertEqual(gc.get_threshold(), tap.GC_THRESHOLDS)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_serviceTree(self) -> None:
        """
        makeService builds the render service and one listening service per
        --listen, without touching the global reactor.
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:1:interface=127.0.0.1", "--output-dir", self.mktemp()])
        top = tap.makeService(options, MemoryReactorClock())
        children = list(top)
        self.assertIsInstance(children[0], RenderService)
        self.assertEqual([type(c) for c in children[1:]], [StreamServerEndpointService] * 2)

    def test_noEagerSend(self) -> None:
        """
        --no-eager-send (off by default) listens through the reactor
        itself, whose TCP connections are Twisted's own; by default the
        listening goes through L{EagerSendReactor}, which does not call the
        reactor's listenTCP.
        """
        parse = OptionsTests.parse
        self.assertFalse(parse(self, "--output-dir", self.mktemp())["no-eager-send"])
        for argv, plain in [((), False), (("--no-eager-send",), True)]:
            reactor = MemoryReactorClock()
            options = parse(self, "--listen", "tcp:0:interface=127.0.0.1", "--output-dir", self.mktemp(), *argv)
            self.assertEqual(bool(options["no-eager-send"]), plain)
            top = tap.makeService(options, reactor)
            listener = list(top)[1]
            listener.startService()
            self.addCleanup(listener.stopService)
            self.assertEqual(len(reactor.tcpServers), 1 if plain else 0, argv)
            if plain:
                self.assertIs(reactor.tcpServers[0][1], top.site)

    def test_notifySocketTaken(self) -> None:
        """
        makeService takes C{$NOTIFY_SOCKET} out of the environment (for its
        L{ServerService}): no render, whose environment is built from the
        service's, can notify systemd in its name.
        """
        self.patch(os, "environ", {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/usr/bin"})
        options = OptionsTests.parse(self, "--output-dir", self.mktemp(), "--render-env", "NOTIFY_SOCKET")
        top = tap.makeService(options, MemoryReactorClock())
        self.assertEqual(os.environ, {"PATH": "/usr/bin"})
        self.assertIsNotNone(top._notify)
        self.assertNotIn("NOTIFY_SOCKET", list(top)[0].renderEnv)

    def test_pluginDiscovered(self) -> None:
        """
        twistd finds the plugin by its tap name.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "twistedsse"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, tap.Options)

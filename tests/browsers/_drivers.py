"""
Real browsers for the tests: one way to start Chromium, Firefox and WebKit
headless, load a page and evaluate JavaScript in it, and one way to make
sure nothing they started outlives them.

    with browser("firefox") as b:
        b.open(url)
        events = b.evaluate("window.twistedsse.done.then(() => window.twistedsse.events)")

Each engine is driven the way that works as root, with no display and no
network (checked on Debian bookworm with Chromium 156, Firefox 153 ESR and
WebKitGTK 2.50.6; the comments below say what each one needs): Chromium
through chromedriver (selenium), Firefox through Marionette (no
geckodriver), WebKit through WebKitWebDriver and MiniBrowser under an Xvfb
of its own. Every browser gets a fresh profile and a
throw-away C{HOME}/C{XDG_*}, and a warm-up page (an EventSource stream from
a small local server) is loaded before L{browser} hands it over, so the
first page a test judges is not a cold start.

Cleanup is by PID: every process started here carries a tag in its
environment (C{TWISTEDSSE_BROWSER_TAG}); on exit the driver quits the
browser, then every process that descends from the driver, or carries the
tag, is killed. That catches helpers that daemonize (reparent away from the
driver), and never touches anyone else's browser.

Intentional divergence from WebDriver: L{Browser.evaluate} takes an
I{expression}, not a script body, and always returns it through
C{JSON.stringify}, so every engine hands back the same plain values
(C{undefined} becomes C{None}).
"""

from __future__ import annotations

import contextlib
import glob
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from twisted.trial.unittest import SynchronousTestCase

from tests._support.ports import freePort
from tests._support.procfs import allPIDs, descendants, procStat
from tests._support.waiting import PipeReader, poll

from tests._support.need import need

ENGINES = ("chromium", "firefox", "webkit")
_ENGINE_NAMES = {"chromium": "Chromium", "firefox": "Firefox", "webkit": "WebKit"}

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FIREFOX = "/usr/bin/firefox-esr"
WEBKITDRIVER = "/usr/bin/WebKitWebDriver"
XVFB = "/usr/bin/Xvfb"
MINIBROWSER_GLOBS = (
    "/usr/lib/*/webkit2gtk-4.*/MiniBrowser",
    "/usr/libexec/webkit2gtk-4.*/MiniBrowser",
    "/usr/lib/webkit2gtk-4.*/MiniBrowser",
)
XVFB_SCREEN = "1280x1024x24"
TAG_VARIABLE = "TWISTEDSSE_BROWSER_TAG"
STARTUP_TIMEOUT = 60.0
PAGE_LOAD_TIMEOUT = 60.0


class JavaScriptError(Exception):
    """
    The evaluated expression threw, or its promise rejected, or it did not
    parse; the message is the page's error (with its stack when it has one).
    """


class Browser:
    """
    One running browser with one page.

    @ivar engine: one of L{ENGINES}.
    """

    engine: str

    def open(self, url: str) -> None:
        """
        Navigate the page to C{url} and return once it has loaded (its
        C{load} event has fired).
        """
        raise NotImplementedError

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """
        Evaluate the JavaScript C{expression} in the page's own context (its
        globals, e.g. C{window.twistedsse}, are reachable), await it if it is
        a promise, and return the result as JSON would carry it.

        @raise JavaScriptError: it threw, rejected or did not parse.
        @raise TimeoutError: it had not settled after C{timeout} seconds.
        """
        raise NotImplementedError

    def _quit(self) -> None:
        raise NotImplementedError


def _wrap(expression: str) -> str:
    """
    An async-script body that settles C{expression} and calls back with one
    JSON string: C{{"value": ...}} or C{{"error": ...}}. The expression is
    pasted into the script text, not C{eval}ed: the page's CSP forbids eval.
    """
    return (
        "var settle = arguments[arguments.length - 1];\n"
        "function fail(e) {\n"
        "  var text = e && e.stack ? String(e) + '\\n' + e.stack : String(e);\n"
        "  settle(JSON.stringify({error: text}));\n"
        "}\n"
        "Promise.resolve().then(function () { return (\n"
        f"{expression}\n"
        "); }).then(function (v) {\n"
        "  try { settle(JSON.stringify({value: v === undefined ? null : v})); } catch (e) { fail(e); }\n"
        "}, fail);\n"
    )


def _unwrap(answer: Any, expression: str) -> Any:
    if not isinstance(answer, str):
        raise JavaScriptError(f"unexpected answer {answer!r} to {expression!r}")
    result = json.loads(answer)
    if "error" in result:
        raise JavaScriptError(f"{result['error']}\n  while evaluating: {expression}")
    return result["value"]


# --------------------------------------------------------------- processes


def _tagged(tag: str) -> dict[int, int]:
    """
    Live processes whose environment carries C{tag}: PID -> start time.
    """
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found: dict[int, int] = {}
    for pid in allPIDs():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            stat = procStat(pid)
            if stat is not None:
                found[pid] = stat[1]
    return found


def _killAll(processes: dict[int, int], grace: float = 5.0) -> None:
    """
    SIGKILL each process that is still the one we recorded (same start
    time, so a reused PID is left alone) and wait until they are gone.
    """
    for pid, started in processes.items():
        stat = procStat(pid)
        if stat is not None and stat[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    poll(lambda: not any((procStat(pid) or (0, -1))[1] == started for pid, started in processes.items()), grace)


class _Scratch:
    """
    A temporary directory holding the browser's HOME, XDG dirs, profile and
    logs, and the environment that points there.
    """

    def __init__(self, engine: str) -> None:
        self.tag = f"{engine}-{os.getpid()}-{uuid.uuid4().hex}"
        self.path = Path(tempfile.mkdtemp(prefix=f"twistedsse-{engine}-"))
        dirs = {
            "HOME": "home",
            "XDG_CONFIG_HOME": "config",
            "XDG_CACHE_HOME": "cache",
            "XDG_DATA_HOME": "data",
            "XDG_STATE_HOME": "state",
            "XDG_RUNTIME_DIR": "runtime",
            "TMPDIR": "tmp",
        }
        self.env = dict(os.environ)
        for variable, name in dirs.items():
            (self.path / name).mkdir(mode=0o700)
            self.env[variable] = str(self.path / name)
        self.env[TAG_VARIABLE] = self.tag
        self.env["SE_OFFLINE"] = "true"
        self.env.pop("DISPLAY", None)
        self.env.pop("WAYLAND_DISPLAY", None)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------- selenium engines


class _SeleniumBrowser(Browser):
    def __init__(self, engine: str, driver: Any) -> None:
        self.engine = engine
        self._driver = driver
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)

    def open(self, url: str) -> None:
        self._driver.get(url)

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        from selenium.common.exceptions import JavascriptException, TimeoutException

        self._driver.set_script_timeout(timeout)
        try:
            answer = self._driver.execute_async_script(_wrap(expression))
        except TimeoutException as e:
            raise TimeoutError(f"{self.engine}: not settled after {timeout} s: {expression}") from e
        except JavascriptException as e:
            raise JavaScriptError(f"{e.msg}\n  while evaluating: {expression}") from e
        return _unwrap(answer, expression)

    def _quit(self) -> None:
        self._driver.quit()


def _chromium(scratch: _Scratch, insecureTLS: bool) -> tuple[_SeleniumBrowser, int]:
    need(os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM}")
    need(os.access(CHROMEDRIVER, os.X_OK), f"no chromedriver at {CHROMEDRIVER}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need(False, "selenium is not installed (the test extras)")
        raise
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={scratch.path / 'profile'}",
    ):
        options.add_argument(flag)
    if insecureTLS:
        options.add_argument("--ignore-certificate-errors")
        options.accept_insecure_certs = True
    service = Service(
        CHROMEDRIVER, port=freePort(), env=scratch.env, log_output=str(scratch.path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    return _SeleniumBrowser("chromium", driver), driver.service.process.pid


def _miniBrowser() -> str | None:
    for pattern in MINIBROWSER_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.X_OK):
                return path
    return None


class _Xvfb:
    """
    An Xvfb on a display it picks itself (C{-displayfd}), so parallel runs
    never race for a display number.
    """

    def __init__(self, env: dict[str, str]) -> None:
        read, write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [XVFB, "-displayfd", str(write), "-screen", "0", XVFB_SCREEN, "-nolisten", "tcp"],
                pass_fds=(write,),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(write)
        try:
            number = PipeReader(read).readLine(20) or b""
        finally:
            os.close(read)
        if not number.strip().isdigit():
            self.stop()
            raise AssertionError("Xvfb did not report a display")
        self.display = f":{int(number)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _webkit(scratch: _Scratch, insecureTLS: bool, onExit: list[Callable[[], None]]) -> tuple[_SeleniumBrowser, int]:
    need(os.access(WEBKITDRIVER, os.X_OK), f"no WebKitWebDriver at {WEBKITDRIVER}")
    miniBrowser = _miniBrowser()
    need(miniBrowser is not None, "no WebKitGTK MiniBrowser (package libwebkit2gtk-4.1-0)")
    need(os.access(XVFB, os.X_OK), f"no Xvfb at {XVFB} (MiniBrowser has no headless mode)")
    try:
        from selenium import webdriver
        from selenium.webdriver.webkitgtk.options import Options
        from selenium.webdriver.webkitgtk.service import Service
    except ImportError:
        need(False, "selenium is not installed (the test extras)")
        raise
    # Not tagged: it is stopped gracefully (TERM, so it removes its lock
    # file and socket), after the browser, not killed with the browser's.
    xvfb = _Xvfb({k: v for k, v in scratch.env.items() if k != TAG_VARIABLE})
    onExit.append(xvfb.stop)
    # Without a display WebKitWebDriver does not fail, it hangs.
    scratch.env["DISPLAY"] = xvfb.display
    options = Options()
    options.binary_location = miniBrowser  # type: ignore[assignment]
    # Without --automation: "Failed to match capabilities".
    options.add_argument("--automation")
    if insecureTLS:
        options.accept_insecure_certs = True
    service = Service(
        WEBKITDRIVER, port=freePort(), env=scratch.env, log_output=str(scratch.path / "webkitdriver.log")
    )
    driver = webdriver.WebKitGTK(service=service, options=options)
    return _SeleniumBrowser("webkit", driver), driver.service.process.pid


# ----------------------------------------------------------------- Firefox


class _FirefoxBrowser(Browser):
    engine = "firefox"

    def __init__(self, marionette: Any) -> None:
        self._marionette = marionette
        marionette.timeout.page_load = PAGE_LOAD_TIMEOUT

    def open(self, url: str) -> None:
        self._marionette.navigate(url)

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        from marionette_driver import errors

        try:
            # sandbox=None: WebDriver's behaviour, the script runs against the
            # page's own window (no Xray wrappers, page globals as they are),
            # not in Marionette's default sandbox, where the page's globals
            # are only on window.wrappedJSObject.
            answer = self._marionette.execute_async_script(
                _wrap(expression), sandbox=None, new_sandbox=True, script_timeout=int(timeout * 1000)
            )
        except errors.ScriptTimeoutException as e:
            raise TimeoutError(f"firefox: not settled after {timeout} s: {expression}") from e
        except errors.JavascriptException as e:
            raise JavaScriptError(f"{e}\n  while evaluating: {expression}") from e
        return _unwrap(answer, expression)

    def _quit(self) -> None:
        instance = self._marionette.instance
        runner = instance.runner
        try:
            self._marionette.cleanup()
        finally:
            # Profiles are in the scratch directory, removed with it. Left
            # alone, the runner's profile, and the blank one that
            # GeckoInstance.close(clean=True) makes, remove themselves in
            # __del__ at interpreter exit, printing a traceback.
            for profile in (getattr(runner, "profile", None), getattr(instance, "_profile", None)):
                if profile is not None:
                    profile.restore = False


def _firefox(scratch: _Scratch, insecureTLS: bool) -> tuple[_FirefoxBrowser, int]:
    need(os.access(FIREFOX, os.X_OK), f"no Firefox at {FIREFOX}")
    try:
        from marionette_driver.geckoinstance import DesktopInstance
        from marionette_driver.marionette import Marionette
    except ImportError:
        need(False, "marionette-driver is not installed (the test extras)")
        raise

    env = scratch.env

    class Instance(DesktopInstance):  # type: ignore[misc]
        # GeckoInstance copies os.environ; give Firefox the scratch HOME/XDG.
        def _get_runner_args(self) -> dict[str, Any]:
            args = super()._get_runner_args()
            args["env"].update({k: v for k, v in env.items() if k.startswith(("XDG_", "HOME", "TMPDIR", TAG_VARIABLE))})
            return args

    port = freePort()
    # Not the default 2828: parallel runs would collide.
    marionette = Marionette(host="127.0.0.1", port=port, startup_timeout=int(STARTUP_TIMEOUT))
    marionette.bin = FIREFOX
    marionette.instance = Instance(
        host="127.0.0.1",
        port=port,
        bin=FIREFOX,
        headless=True,
        workspace=str(scratch.path),
        gecko_log=str(scratch.path / "gecko.log"),
    )
    try:
        marionette.start_binary(STARTUP_TIMEOUT)
        capabilities: dict[str, Any] = {"strictFileInteractability": True}
        if insecureTLS:
            capabilities["acceptInsecureCerts"] = True
        marionette.start_session(capabilities)
    except BaseException:
        with contextlib.suppress(Exception):
            marionette.cleanup()
        raise
    return _FirefoxBrowser(marionette), marionette.instance.runner.process_handler.pid


# ------------------------------------------------------------------ warm-up


WARMUP_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>warm-up</title>
<link rel="icon" href="data:,"></head><body><p id="p">warm-up</p></body></html>"""


class _WarmupHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/events"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for i in range(1, 4):
                self.wfile.write(f"id: {i}\nevent: progress\ndata: {{\"t\": {time.time_ns()}}}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(WARMUP_PAGE)))
            self.end_headers()
            self.wfile.write(WARMUP_PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _warmUp(b: Browser) -> None:
    """
    One unjudged page with an EventSource and a painted frame: a fresh
    browser's first page can be tens of ms late (Firefox), or hundreds
    (WebKit), and no test should judge that.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WarmupHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="browser-warm-up", daemon=True)
    thread.start()
    try:
        b.open(f"http://127.0.0.1:{server.server_address[1]}/")
        got = b.evaluate(
            "new Promise(function (resolve, reject) {"
            "  var es = new EventSource('/events'), n = 0;"
            "  es.addEventListener('progress', function () { if (++n === 3) { es.close(); resolve(n); } });"
            "  es.onerror = function () { if (n < 3) { es.close(); reject(new Error('warm-up stream failed')); } };"
            "}).then(function (n) {"
            # And a painted frame: WebKitGTK under Xvfb takes seconds over
            # its first one, busy enough meanwhile to delay a page's events.
            "  return new Promise(function (resolve) {"
            "    requestAnimationFrame(function () { requestAnimationFrame(function () { resolve(n); }); });"
            "  });"
            "})",
            timeout=30,
        )
        if got != 3:
            raise AssertionError(f"{b.engine}: warm-up page got {got!r}")
        b.open("about:blank")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------- browser()


@contextlib.contextmanager
def browser(engine: str, insecureTLS: bool = False) -> Iterator[Browser]:
    """
    Start C{engine} headless with a fresh profile and throw-away HOME/XDG
    dirs, warm it up, and yield a L{Browser}; on exit quit it and kill, by
    PID, every process it started (and its Xvfb).

    @param insecureTLS: accept self-signed certificates (for HTTPS tests).
    @raise SkipTest: the engine is missing, on a developer's machine
        (L{need}); in CI that is a failure.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    scratch = _Scratch(engine)
    onExit: list[Callable[[], None]] = []
    driverPID: int | None = None
    started: Browser | None = None
    try:
        if engine == "chromium":
            started, driverPID = _chromium(scratch, insecureTLS)
        elif engine == "firefox":
            started, driverPID = _firefox(scratch, insecureTLS)
        else:
            started, driverPID = _webkit(scratch, insecureTLS, onExit)
        _warmUp(started)
        yield started
    finally:
        ours = _tagged(scratch.tag)
        if driverPID is not None:
            ours.update(descendants(driverPID))
            stat = procStat(driverPID)
            if stat is not None:
                ours[driverPID] = stat[1]
        ours.pop(os.getpid(), None)
        try:
            if started is not None:
                with contextlib.suppress(Exception):
                    started._quit()
        finally:
            ours.update(_tagged(scratch.tag))
            ours.pop(os.getpid(), None)
            _killAll(ours)
            for stop in reversed(onExit):
                with contextlib.suppress(Exception):
                    stop()
            _killAll(_tagged(scratch.tag))
            scratch.remove()


class OneBrowserPerClass:
    """
    A test class (a mixin, before C{SynchronousTestCase}) that drives one
    browser engine, C{engine}, started once for the whole class.
    """

    engine: ClassVar[str]
    browser: ClassVar[Browser]
    _resources: ClassVar[contextlib.ExitStack]

    @classmethod
    def setUpClass(cls) -> None:
        cls._resources = contextlib.ExitStack()
        try:
            cls.browser = cls._resources.enter_context(browser(cls.engine))
        except BaseException:
            cls._resources.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls._resources.close()


def inEveryEngine(
    mixin: type, name: str, extra: dict[str, type] | None = None
) -> tuple[type[SynchronousTestCase], ...]:
    """
    The one way to say "this test class runs in Chromium, Firefox and
    WebKit": a C{SynchronousTestCase} per engine of L{ENGINES}, in that
    order, named C{ChromiumI{name}Tests} and so on, made from C{mixin} (the
    tests, reading C{self.engine}; usually a L{OneBrowserPerClass}). Bind
    the result to those names in the test module, so pytest collects them
    under them:

        ChromiumXTests, FirefoxXTests, WebKitXTests = inEveryEngine(XMixin, "X")

    @param extra: an engine to a further mixin whose tests only that
        engine's class runs.
    """
    extra = extra or {}
    unknown = set(extra) - set(ENGINES)
    if unknown:
        raise ValueError(f"extra names unknown engines: {sorted(unknown)}")
    classes = []
    for engine in ENGINES:
        className = f"{_ENGINE_NAMES[engine]}{name}Tests"
        bases = (extra[engine], mixin) if engine in extra else (mixin,)
        namespace = {"engine": engine, "__module__": mixin.__module__, "__qualname__": className}
        classes.append(type(className, (*bases, SynchronousTestCase), namespace))
    return tuple(classes)


def pollInPage(value: str, ready: str, settle: str, failure: str, seconds: int, every: int = 10) -> str:
    """
    A JavaScript promise that polls inside the page, every C{every} ms,
    until C{ready} holds, then runs C{settle} (which calls C{resolve}); after
    C{seconds} it rejects with the message C{failure}. Polling from the
    driver instead stalls Firefox, and a deadline in the page names what
    it saw, where a driver timeout says nothing.

    @param value: an expression for what is read on every poll, bound to
        C{v} for C{ready}, C{settle} and C{failure}.
    @param failure: a JavaScript string expression.
    """
    return f"""new Promise(function (resolve, reject) {{
  var deadline = Date.now() + {seconds * 1000};
  (function check() {{
    var v = {value};
    if ({ready}) {{
      {settle};
    }} else if (Date.now() > deadline) reject(new Error({failure}));
    else setTimeout(check, {every});
  }})();
}})"""

"""
The demo page when the server asks for tokens, in real browsers: a
short-lived scoped token handed over in the URL fragment (never sent to
the server, removed from the address at once), or the operator token
typed into the page's field (kept in sessionStorage, sent in the
C{Authorization} header); in neither case does the token reach a URL the
server sees or its log, and the page's CSP stays the strict one.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from twistedsse import mintToken
from twistedsse._app import CSP

from ._drivers import OneBrowserPerClass, inEveryEngine
from tests._support.launcher import Server
from .test_direct import FINISHED, SUBSCRIBED, pageURL

OPERATOR = "operator-token-for-the-page"
SECRET = b"a-secret-of-at-least-32-bytes-for-hs256"

# Starts a render from the page's API, and reports how it went.
START = """window.twistedsse.start("ticks", %s).then(function (job) {
  return {started: job.id};
}, function (e) {
  var field = document.getElementById("token");
  return {status: e.status, code: e.code, tokenInvalid: field.getAttribute("aria-invalid"),
          error: document.getElementById("form-error").textContent};
})"""

# Types a token into the page's field, as a user would.
TYPE_TOKEN = """(function () {
  var field = document.getElementById("token");
  field.value = %s;
  field.dispatchEvent(new Event("input", {bubbles: true}));
  return sessionStorage.getItem("twistedsse.access_token");
})()"""

WHERE = """({href: location.href, hash: location.hash, field: document.getElementById("token").value,
  kept: sessionStorage.getItem("twistedsse.access_token")})"""


class AuthPageMixin(OneBrowserPerClass):
    def startServer(self: Any) -> Server:
        tokens, secret = Path(self.mktemp()).absolute(), Path(self.mktemp()).absolute()
        tokens.write_text(OPERATOR + "\n")
        secret.write_bytes(SECRET)
        server = Server("--auth-token-file", str(tokens), "--jwt-secret-file", str(secret))
        self.addCleanup(server.stop)
        return server

    def assertNotLogged(self: Any, server: Server, *secrets: str) -> None:
        log = server.logText()
        self.assertIn('"POST /renders HTTP/1.1" 202', log)
        for secret in secrets:
            self.assertNotIn(secret, log)

    def test_scopedTokenInTheFragment(self: Any) -> None:
        """
        A page opened with C{#access_token=JWT} (create:ticks, as an app's
        backend mints it) starts its render and streams it to the end; the
        fragment is gone from the address, the token is in the field and
        this tab's storage, and neither the server's log nor any URL it saw
        holds it. The page is served with the strict CSP.
        """
        server = self.startServer()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as response:
            self.assertEqual(response.headers["Content-Security-Policy"], CSP.decode())
        token = mintToken(SECRET, ["create:ticks"], ttl=300)
        go = Path(self.mktemp()).absolute()
        self.browser.open(pageURL(server.port, "ticks", {"count": 5, "start_file": str(go)}) + "#access_token=" + token)
        self.browser.evaluate(SUBSCRIBED, timeout=30)
        go.touch()
        result = self.browser.evaluate(FINISHED, timeout=30)
        self.assertEqual((result["terminal"]["type"], result["state"]), ("complete", "succeeded"), server.logText())
        where = self.browser.evaluate(WHERE)
        self.assertEqual((where["hash"], where["field"], where["kept"]), ("", token, token))
        self.assertNotIn(token, where["href"])
        self.assertNotLogged(server, token)

    def test_operatorTokenTypedIntoTheField(self: Any) -> None:
        """
        Without a token the page's start is a 401 shown at the token field;
        with the operator token typed in, it starts and cancels a render
        (the token in the header of the POST and the DELETE, never in a
        URL or the log).
        """
        server = self.startServer()
        self.browser.open(f"http://127.0.0.1:{server.port}/")
        self.browser.evaluate(TYPE_TOKEN % json.dumps(""))
        params = json.dumps({"count": 5, "start_file": str(Path(self.mktemp()).absolute())})
        refused = self.browser.evaluate(START % params)
        self.assertEqual((refused["status"], refused["code"], refused["tokenInvalid"]), (401, "unauthorized", "true"))
        self.assertEqual(self.browser.evaluate(TYPE_TOKEN % json.dumps(OPERATOR)), OPERATOR)
        started = self.browser.evaluate(START % params)
        self.assertIn("started", started, started)
        self.browser.evaluate(SUBSCRIBED, timeout=30)
        self.browser.evaluate("window.twistedsse.cancel().then(function () { return null; })")
        result = self.browser.evaluate(FINISHED, timeout=30)
        self.assertEqual((result["terminal"]["type"], result["state"]), ("cancelled", "cancelled"))
        self.assertNotIn(OPERATOR, self.browser.evaluate(WHERE)["href"])
        self.assertNotLogged(server, OPERATOR)
        self.assertIn('"DELETE /renders/', server.logText())


ChromiumAuthPageTests, FirefoxAuthPageTests, WebKitAuthPageTests = inEveryEngine(AuthPageMixin, "AuthPage")

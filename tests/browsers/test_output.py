"""
A render's output opened directly in each browser (not in the demo page's
C{<video>}): served with C{X-Content-Type-Options: nosniff} and its
C{Content-Security-Policy}, the browser's own viewer still loads the video.
This is why the policy has no C{sandbox}: under it, Chromium's and
WebKit's viewers load nothing (see L{twistedsse._output}).
"""

from __future__ import annotations

from typing import Any

from ._drivers import OneBrowserPerClass, inEveryEngine
from tests._support.jsonhttp import getJSON, postJSON
from tests._support.waiting import waitUntil
from tests._support.launcher import Server

#: The viewer's video element, once it has metadata (or 15 s).
VIEWER = """new Promise(function (resolve) {
  var deadline = Date.now() + 15000;
  (function poll() {
    var v = document.querySelector("video");
    if (v && (v.readyState >= 1 || v.error || Date.now() > deadline)) {
      resolve({readyState: v.readyState, width: v.videoWidth, error: v.error && v.error.code});
    } else if (!v && Date.now() > deadline) {
      resolve({readyState: -1, width: 0, error: "no video element"});
    } else {
      setTimeout(poll, 50);
    }
  })();
})"""


class OutputViewerMixin(OneBrowserPerClass):
    def test_outputOpensInTheBrowser(self: Any) -> None:
        """
        A finished card opened at its C{output_url} loads in the browser's
        viewer (metadata: 1280 pixels wide), its security headers notwithstanding.
        """
        server = Server()
        self.addCleanup(server.stop)
        base = f"http://127.0.0.1:{server.port}"
        status, job = postJSON(base + "/renders", {"renderer": "card", "params": {"duration": 1}})
        self.assertEqual(status, 202, job)
        waitUntil(lambda: getJSON(base + job["status_url"])[1]["state"] not in ("queued", "running"), 60,
                  "the card to finish", 0.1)  # fmt: skip
        self.assertEqual(getJSON(base + job["status_url"])[1]["state"], "succeeded")
        self.browser.open(base + job["output_url"])
        video = self.browser.evaluate(VIEWER, timeout=30)
        self.assertEqual((video["error"], video["width"]), (None, 1280), f"{self.engine}: {video}")
        self.assertGreaterEqual(video["readyState"], 1, f"{self.engine}: {video}")


ChromiumOutputTests, FirefoxOutputTests, WebKitOutputTests = inEveryEngine(OutputViewerMixin, "Output")

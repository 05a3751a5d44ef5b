"""
Across a real network hop, as between containers: the server in one
network namespace, listening only on its end of a veth pair, and the
clients (the socket client, and Chromium with the demo page) in another.
Every progress event must arrive within 100 ms of the render printing it.

The veth address is not loopback, so the server needs authentication to
start at all: it has operator tokens and a JWT secret, and each client
starts its render with a short-lived scoped token (C{access_token} for the
socket client, as an EventSource sends it; the URL fragment for the page).

What this cannot show is whether C{TCP_NODELAY} matters: the hop has
almost no round-trip time, so Nagle never waits. Even on loopback, with
Nagle on only a stream's first event was late, by 20-26 ms in every engine
(Chromium 156, Firefox 153 ESR, WebKitGTK 2.50.6 on Debian bookworm):
within any 100 ms bound. The socket option is asserted elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twistedsse import mintToken

from ._netns import SERVER_ADDRESS, Measuring, NamespacePair, browserClient
from tests._support.launcher import Server

SECRET = b"the-netns-test-secret-of-32-bytes-or-more"


class NetworkNamespaceTests(Measuring, SynchronousTestCase):
    def setUp(self) -> None:
        self.namespaces = NamespacePair()
        self.addCleanup(self.namespaces.remove)
        tokens, secret = Path(self.mktemp()).absolute(), Path(self.mktemp()).absolute()
        tokens.write_text("operator-token\n")
        secret.write_bytes(SECRET)
        self.listen = f"tcp:0:interface={SERVER_ADDRESS}"
        self.server = Server("--listen", self.listen, "--auth-token-file", str(tokens), "--jwt-secret-file",
                             str(secret), netns=self.namespaces.server)  # fmt: skip
        self.addCleanup(self.server.stop)
        self.base = f"http://{SERVER_ADDRESS}:{self.server.port}"

    def test_refusesTheHopWithoutAuthentication(self) -> None:
        """
        Without any authentication, a server told to listen on the veth
        address (reachable from the other namespace) does not start, and
        says why, naming C{--no-auth}.
        """
        with self.assertRaises(AssertionError) as caught:
            Server("--listen", self.listen, netns=self.namespaces.server)
        self.assertIn("--no-auth", str(caught.exception))

    def test_socketClientAcrossTheHop(self) -> None:
        """
        A socket client in the other namespace, connected to the server's
        veth address (not loopback), gets each of 50 events within 100 ms of
        its being printed, in order, then C{complete}; the bytes crossed the
        veth.
        """
        before = self.namespaces.receivedBytes()
        token = mintToken(SECRET, ["create:ticks"], ttl=120)
        _, latencies = self.stream(self.base, "veth hop, socket client", token=token, netns=self.namespaces.client)
        self.assertGreater(self.namespaces.receivedBytes() - before, self.COUNT * 100)
        self.assertOnTime(latencies)
        self.assertNotIn(token, self.server.logText())

    def test_chromiumAcrossTheHop(self) -> None:
        """
        Chromium, running inside the client namespace (it and its driver),
        loads the demo page from the server's veth address; the page starts
        a 50-event render and receives every event, in order, within 100 ms.
        """
        before = self.namespaces.receivedBytes()
        token = mintToken(SECRET, ["create:ticks"], ttl=120)
        seen = browserClient(
            "chromium", self.base, self.COUNT, str(Path(self.mktemp()).absolute()), netns=self.namespaces.client,
            token=token,
        )  # fmt: skip
        latencies = self.page(seen, "veth hop, Chromium in the client namespace")
        self.assertGreater(self.namespaces.receivedBytes() - before, self.COUNT * 100)
        self.assertEqual(seen["netns"], [self.namespaces.identity(self.namespaces.client)])
        self.assertOnTime(latencies)
        self.assertNotIn(token, self.server.logText())

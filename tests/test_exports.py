"""
The public API is a small set of re-exports of the private modules.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import twistedsse
from twistedsse import _broker, _build, _connections, _frames, _stream


class ExportTests(SynchronousTestCase):
    def test_identity(self) -> None:
        """
        The public names are the private objects, not copies.
        """
        self.assertIs(twistedsse.EventStreamResource, _stream.EventStreamResource)
        self.assertIs(twistedsse.MemoryBroker, _broker.MemoryBroker)
        self.assertIs(twistedsse.Event, _frames.Event)
        self.assertIs(twistedsse.buildSite, _build.buildSite)
        self.assertIs(twistedsse.ConnectionLimits, _connections.ConnectionLimits)

    def test_all(self) -> None:
        """
        C{__all__} lists exactly what the package exports, each of it real.
        """
        for name in twistedsse.__all__:
            self.assertTrue(hasattr(twistedsse, name), name)
        self.assertEqual(sorted(twistedsse.__all__), sorted(set(twistedsse.__all__)))

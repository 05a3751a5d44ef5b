"""
L{twistedsse._responses}: the one writer of JSON response bodies.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twistedsse._responses import errorBody, jsonBody


class BodyTests(SynchronousTestCase):
    def test_errorBytes(self) -> None:
        """
        An error body is the bytes every writer has always sent: a space
        after each C{,} and C{:}, non-ASCII as UTF-8, a trailing newline.
        """
        self.assertEqual(
            errorBody("misdirected", "no name 'caf\u00e9'"),
            b'{"error": "misdirected", "detail": "no name \'caf\xc3\xa9\'"}\n',
        )

    def test_strict(self) -> None:
        """
        A float that JSON cannot hold is refused, not written as C{NaN}.
        """
        self.assertRaises(ValueError, jsonBody, {"progress": float("nan")})
        self.assertEqual(jsonBody({"a": [1, 2.5]}), b'{"a": [1, 2.5]}\n')

"""
C{--redis} URLs and password files (no Redis needed: parsing only).
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twistedsse._redis import RedisConfigError, RedisEndpoint, readPassword


class URLTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        Host, port (6379 by default), database (0 by default), TLS for
        C{rediss://}, a user name for ACLs.
        """
        cases = {
            "redis://127.0.0.1:6380/2": ("127.0.0.1", 6380, 2, False, None),
            "redis://cache.internal": ("cache.internal", 6379, 0, False, None),
            "redis://cache.internal/": ("cache.internal", 6379, 0, False, None),
            "rediss://cache.internal:6390/1": ("cache.internal", 6390, 1, True, None),
            "redis://app@[::1]:7000/3": ("::1", 7000, 3, False, "app"),
        }
        for url, (host, port, db, tls, user) in cases.items():
            endpoint = RedisEndpoint.fromURL(url)
            self.assertEqual((endpoint.host, endpoint.port, endpoint.db, endpoint.tls, endpoint.username),
                             (host, port, db, tls, user), url)  # fmt: skip

    def test_refused(self) -> None:
        """
        What cannot be used is refused, saying what is wrong; a password in
        the URL is refused (it would show in C{ps}), pointing at the file
        option.
        """
        cases = {
            "http://127.0.0.1/0": "scheme",
            "redis://:secret@127.0.0.1/0": "--redis-password-file",
            "redis://user:secret@127.0.0.1/0": "--redis-password-file",
            "redis:///0": "no host",
            "redis://127.0.0.1:99999/0": "port",
            "redis://127.0.0.1:abc/0": "port",
            "redis://127.0.0.1/db1": "database number",
            "redis://127.0.0.1/0?timeout=1": "query",
            "redis://127.0.0.1/١": "database number",  # a non-ASCII digit
        }
        for url, fragment in cases.items():
            error = self.assertRaises(RedisConfigError, RedisEndpoint.fromURL, url)
            self.assertIn(fragment, str(error), url)
            self.assertNotIn("secret", str(error))

    def test_passwordFromAFile(self) -> None:
        """
        The first line of the file, stripped; never shown by C{repr} or
        L{RedisEndpoint.describe}.
        """
        path = Path(self.mktemp())
        path.write_text("  s3cret-Pass  \nignored\n")
        endpoint = RedisEndpoint.fromURL("redis://u@127.0.0.1:6379/0", path)
        self.assertEqual(endpoint.password, "s3cret-Pass")
        self.assertNotIn("s3cret", repr(endpoint))
        self.assertEqual(endpoint.describe(), "redis://u@127.0.0.1:6379/0")

    def test_badPasswordFiles(self) -> None:
        """
        A missing, empty or binary file is refused with the file's name.
        """
        missing = Path(self.mktemp())
        empty = Path(self.mktemp())
        empty.write_text("\n")
        binary = Path(self.mktemp())
        binary.write_bytes(b"\xff\xfe\x00")
        for path, why in ((missing, "No such file"), (empty, "empty"), (binary, str(binary))):
            error = self.assertRaises(RedisConfigError, readPassword, path)
            self.assertIn(str(path), str(error))
            self.assertIn(why, str(error))

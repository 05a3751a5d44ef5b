"""
What the browser, proxy and network tests need that they may not have: a
missing part skips the test on a developer's machine and fails it in CI.
The server process itself is L{tests._support.launcher.Server}.

These tests drive browsers through blocking WebDriver calls, so they are
synchronous (trial C{SynchronousTestCase}).
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str) -> None:
    """
    A part the test needs (a browser, nginx, network namespaces) is
    missing: skip on a developer's machine, fail in CI, where
    C{scripts/test} installs everything.
    """
    if condition:
        return
    if IN_CI:
        raise AssertionError(f"missing in CI: {what} (scripts/system-deps should have installed it)")
    raise SkipTest(f"{what}; run scripts/system-deps as root to install it")


def needProgram(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"no {name} on PATH")
    return path  # type: ignore[return-value]

"""
What the browser, proxy, network and Redis tests need that a developer's
machine may not have: a missing part skips the test there and fails it in
CI (C{CI=true}), where C{scripts/test} installs everything.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str) -> None:
    """
    A part the test needs (a browser, nginx, network namespaces, Redis) is
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

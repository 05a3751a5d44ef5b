"""
Every test in this tree is marked C{load}: they drive a server process under load (about a minute), so the
quick loop leaves them out: C{scripts/test -m "not browsers and not load"}.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.load)

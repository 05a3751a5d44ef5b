"""
Every test in this tree is marked C{browsers}: they drive real browsers, nginx and network namespaces (about 3 minutes), so the
quick loop leaves them out: C{scripts/test -m "not browsers and not load"}.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.browsers)

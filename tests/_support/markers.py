"""
Marking a whole test tree, for the slow trees' conftest.py files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


def markTree(here: Path, marker: str) -> Callable[[pytest.Config, list[pytest.Item]], None]:
    """
    A C{pytest_collection_modifyitems} hook that marks C{marker} every test
    collected below C{here} (a conftest's hook sees the whole session's
    items, not only its tree's).
    """

    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        for item in items:
            if here in item.path.parents:
                item.add_marker(getattr(pytest.mark, marker))

    return pytest_collection_modifyitems

"""
pytest runs trial TestCases, whose C{mktemp()} makes directories relative
to the working directory: run from a temporary one, not the checkout.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _inTemporaryDirectory(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.chdir(tmp_path_factory.mktemp("trial"))

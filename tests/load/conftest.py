"""
Every test in this tree is marked C{load} (they drive a server process under load), so the quick
loop leaves them out: C{scripts/test -m "not browsers and not load"}.
"""

from pathlib import Path

from tests._support.markers import markTree

pytest_collection_modifyitems = markTree(Path(__file__).parent, "load")

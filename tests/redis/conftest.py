"""
Every test in this tree is marked C{redis}: it runs a real redis-server
(tests/_support/redis.py), which CI installs (scripts/system-deps).
"""

from pathlib import Path

from tests._support.markers import markTree

pytest_collection_modifyitems = markTree(Path(__file__).parent, "redis")

"""
The shipped systemd units (docs/systemd/) read as systemd reads them, for
the tests: their settings, and an C{ExecStart=} command line expanded with
given environment variables into the argv systemd would run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .launcher import ROOT

#: Where the shipped units are.
UNITS = ROOT / "docs" / "systemd"

#: The install prefix the units' commands use (their comments say how to
#: make it).
PREFIX = "/opt/twistedsse/venv/bin/"


def logicalLines(text: str) -> list[str]:
    """
    The lines of a unit file with comments dropped and backslash
    continuations joined (as systemd.syntax(7) says).
    """
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def settings(unit: Path) -> dict[str, list[str]]:
    """
    Every C{Section.Key}'s values, in order (a key may repeat).
    """
    found: dict[str, list[str]] = {}
    section = ""
    for line in logicalLines(unit.read_text()):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def setting(unit: Path, key: str) -> str:
    """
    The last value of C{Section.Key} (the one in force).

    @raise AssertionError: the unit does not set it.
    """
    values = settings(unit).get(key)
    if not values:
        raise AssertionError(f"{unit.name} has no {key}=")
    return values[-1]


def environment(unit: Path, files: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """
    The variables the unit sets: its C{Environment=} lines, then its
    C{EnvironmentFile=}s' contents (which override them), given as
    C{files}, a mapping from each file's path to its variables.
    """
    env: dict[str, str] = {}
    for line in settings(unit).get("Service.Environment", []):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = value
    for path in settings(unit).get("Service.EnvironmentFile", []):
        env.update((files or {})[path.lstrip("-")])
    return env


def execStart(unit: Path, env: dict[str, str]) -> list[str]:
    """
    The unit's C{ExecStart=} as the argv systemd runs (systemd.service(5),
    "Command lines"): C{${NAME}} replaced by the value as it is, a word
    that is C{$NAME} alone by the value split at whitespace (zero or more
    words).

    @raise KeyError: a variable that C{env} does not have.
    """
    argv: list[str] = []
    for word in shlex.split(setting(unit, "Service.ExecStart")):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env[alone.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def seconds(value: str) -> float:
    """
    A systemd time span (C{90}, C{90s}, C{1min 30s}) in seconds.
    """
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total

"""
The README is the configuration reference: every option the service takes
has a row in its options table, so an option added without documentation
fails here rather than surprising an operator.
"""

from __future__ import annotations

import re
from pathlib import Path

from twistedsse.tap import Options

README = Path(__file__).resolve().parent.parent / "README.md"


def _longOptions() -> set[str]:
    options = Options()
    names = {row[0] for row in options.optParameters} | {row[0] for row in options.optFlags}
    names |= {name[4:].replace("_", "-") for name in dir(options) if name.startswith("opt_") and len(name) > 5}
    # usage.Options' own.
    return names - {"help", "version"}


def _tableRows() -> str:
    """
    The rows of the table under "## Configuration reference": lines starting C{| `--}.
    """
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("| `--"))


def test_everyOptionIsInTheTable() -> None:
    rows = _tableRows()
    documented = set(re.findall(r"`--([a-z0-9-]+)", rows))
    missing = _longOptions() - documented
    assert not missing, f"options without a row in README's options table: {sorted(missing)}"


def test_theTableNamesNoOptionThatDoesNotExist() -> None:
    documented = set(re.findall(r"^\| `--([a-z0-9-]+)", _tableRows(), re.M))
    assert documented <= _longOptions(), sorted(documented - _longOptions())


def test_helpReadsAsText() -> None:
    """
    C{--help} wraps each option's text without runs of spaces in it (an
    C{opt_} method's docstring is printed as it is, line-break indentation
    and all, unless made one line).
    """
    for line in str(Options()).splitlines():
        text = line.strip()
        if text.startswith("-"):
            # "--name=    the text": the text after the option's column.
            text = re.split(r"\s{2,}", text, maxsplit=1)[-1]
        assert not re.search(r"\S {3,}\S", text), line

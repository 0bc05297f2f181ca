"""The deployment guide's settings table names every setting, so an operator never has to read
code."""

from __future__ import annotations

import re
from pathlib import Path

from aicredits.settings import Settings

README = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
HEADING = "## Every setting"
# Listed in the table for operators, but set by `python -m aicredits prod`, not settings.
LAUNCHER_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR"}


def _table_variables() -> set[str]:
    text = README.read_text()
    assert HEADING in text, f"README has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def _setting_variables() -> set[str]:
    return {(field.alias or name).upper() for name, field in Settings.model_fields.items()}


def test_every_setting_is_in_the_readme_table() -> None:
    missing = sorted(_setting_variables() - _table_variables())
    assert not missing, f"add a row to docs/deployment.md '{HEADING}' for: {', '.join(missing)}"


def test_the_table_names_no_setting_that_does_not_exist() -> None:
    unknown = sorted(_table_variables() - _setting_variables() - LAUNCHER_VARIABLES)
    assert not unknown, f"docs/deployment.md '{HEADING}' lists unknown settings: {unknown}"

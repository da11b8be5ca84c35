"""The docs state what the code does: the HMTConfig table in docs/method.md is the fields' own metadata."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from hmt import HMTConfig

ROOT = Path(__file__).resolve().parents[1]


def _config_rows() -> dict[str, tuple[str, str, str]]:
    text = (ROOT / "docs" / "method.md").read_text().split("## `HMTConfig`", 1)[1]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            name, default, paper, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 3))
            rows[name.strip("`")] = (default, paper, meaning)
    return rows


def _shown(value: object) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_the_config_table_matches_the_fields():
    rows = _config_rows()
    assert list(rows) == [f.name for f in fields(HMTConfig)]
    paper = HMTConfig.paper()
    for f in fields(HMTConfig):
        assert rows[f.name] == (_shown(f.default), _shown(getattr(paper, f.name)), f.metadata["help"]), f.name


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("docs/method.md", "docs/cli.md", "docs/results.md", "docs/lab-notebook.md"):
        assert page in readme and (ROOT / page).is_file(), page

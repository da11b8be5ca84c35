"""`pip install hmt-lm` must bring everything the package imports: every third-party import is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    requirements += project["optional-dependencies"]["datasets"]  # imported only for hf: data sources
    requirements += project["optional-dependencies"]["serve"]  # imported only by hmt serve
    requirements += project["optional-dependencies"]["eval"]  # imported only by hmt lm-eval / hmt.harness
    return {_normalise(re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0]) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "src" / "hmt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"hmt", "__future__"}


def test_every_third_party_import_is_a_declared_dependency():
    distributions = packages_distributions()
    declared = _declared()
    missing = {
        module: distributions.get(module, [module])
        for module in _imported_modules()
        if not {_normalise(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"imported by src/hmt but not declared in pyproject.toml: {missing}"

"""Adapters shipped inside the package: trained HMT parameters (+ LoRA) for the default backbone.

`hmt eval` and `make demo` use the one for SmolLM2-135M when no `--adapter` is given with the
default backbone; how it was trained and what it measures is in the README ("Does memory help?").
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from hmt.io import CONFIG_NAME

DEFAULT_ADAPTER_NAME = "smollm2-135m-hmt"


def default_adapter() -> Path | None:
    """The shipped adapter for the default backbone, or None if this installation has none."""
    path = Path(str(files("hmt.adapters") / DEFAULT_ADAPTER_NAME))
    return path if (path / CONFIG_NAME).is_file() else None

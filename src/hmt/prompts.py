"""The bundled short chat prompts: `train` for distillation toward the untouched backbone, `test` (held
out from every training run) for measuring that memory takes nothing away (`hmt voice`)."""

from __future__ import annotations

import json
from importlib import resources

PROMPTS_FILE = "chat_prompts.json"


def chat_prompts(split: str) -> list[str]:
    """The prompts of `split` (train or test)."""
    data = json.loads(resources.files("hmt.data").joinpath(PROMPTS_FILE).read_text(encoding="utf-8"))
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    return list(data[split])

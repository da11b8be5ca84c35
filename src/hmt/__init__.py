"""hmt: the Hierarchical Memory Transformer for any Hugging Face causal LM (arXiv 2405.06067).

Importing hmt is cheap: torch and transformers load when a model class is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["HMTConfig", "HMTForCausalLM", "HMTOutput", "MemoryState", "__version__", "load_backbone"]

_LAZY = {
    "HMTConfig": "hmt.config",
    "HMTForCausalLM": "hmt.model",
    "HMTOutput": "hmt.model",
    "MemoryState": "hmt.memory",
    "load_backbone": "hmt.backbone",
}

if TYPE_CHECKING:
    from hmt.backbone import load_backbone
    from hmt.config import HMTConfig
    from hmt.memory import MemoryState
    from hmt.model import HMTForCausalLM, HMTOutput


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hmt' has no attribute {name!r}")

"""hmt: the Hierarchical Memory Transformer for any Hugging Face causal LM (arXiv 2405.06067).

Importing hmt is cheap: torch and transformers load when a model class is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hmt.version import __version__

__all__ = [
    "HMTConfig", "HMTForCausalLM", "HMTOutput", "LoadedModel", "MemoryState", "Sampling", "__version__",
    "load_backbone", "load_model",
]  # fmt: skip

_LAZY = {
    "HMTConfig": "hmt.config",
    "HMTForCausalLM": "hmt.model",
    "HMTOutput": "hmt.model",
    "MemoryState": "hmt.memory",
    "load_backbone": "hmt.backbone",
    "load_model": "hmt.loading",
    "LoadedModel": "hmt.loading",
    "Sampling": "hmt.sampling",
}

if TYPE_CHECKING:
    from hmt.backbone import load_backbone
    from hmt.config import HMTConfig
    from hmt.loading import LoadedModel, load_model
    from hmt.memory import MemoryState
    from hmt.model import HMTForCausalLM, HMTOutput
    from hmt.sampling import Sampling


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hmt' has no attribute {name!r}")

"""How the backbone takes part in training: frozen, LoRA adapters (peft), or full fine-tuning.

LoRA files are PEFT's own (`adapter_config.json`, `adapter_model.safetensors`), written beside HMT's
`hmt_config.json` and `hmt_adapter.safetensors` in one adapter folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

FINETUNE_MODES: tuple[str, ...] = ("frozen", "lora", "full")
LORA_CONFIG_NAME = "adapter_config.json"
BACKBONE_DIR = "backbone"  # full fine-tuning: the whole backbone, as save_pretrained writes it


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def prepare_backbone(
    backbone: Any,
    finetune: str,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_targets: list[str] | None = None,
) -> Any:
    """Set which backbone weights train. Returns the backbone, wrapped by peft for `lora`.

    lora_targets None lets peft choose the usual modules for the architecture (q_proj, v_proj for Llama).
    """
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    if finetune == "full":
        backbone.requires_grad_(True)
        return backbone
    if finetune == "frozen" or is_peft_model(backbone):
        if finetune == "frozen":
            backbone.requires_grad_(False)
        return backbone
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs the peft package: pip install peft==0.21.2") from err
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_targets, lora_dropout=0.0)
    try:
        return get_peft_model(backbone, config)
    except ValueError as err:
        raise ValueError(
            f"cannot add LoRA to this backbone ({err}); name the modules with --lora-targets"
        ) from err


def save_lora(backbone: Any, directory: Path) -> None:
    """Write the LoRA weights of a peft-wrapped backbone into `directory`, each file replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", dir=directory))
    try:
        # hmt never resizes the vocabulary, so peft need not look the base model up (on the Hub)
        backbone.save_pretrained(staging, save_embedding_layers=False)
        for item in staging.iterdir():
            if item.is_file():
                os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_lora(directory: Path) -> bool:
    return (directory / LORA_CONFIG_NAME).is_file()


def load_lora(backbone: Any, directory: Path, trainable: bool) -> Any:
    """Attach the LoRA weights in `directory` to `backbone`.

    For inference (trainable=False) they are merged into the backbone's weights, in place, which makes
    evaluation as fast as the plain backbone (unmerged LoRA ran 1.5-3x slower).
    """
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(
            f"{directory} holds LoRA weights, which need the peft package: pip install peft"
        ) from err
    try:
        model = PeftModel.from_pretrained(backbone, str(directory), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"the LoRA weights in {directory} do not fit this backbone: {err}") from err
    return model if trainable else model.merge_and_unload()

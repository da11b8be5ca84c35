"""An adapter's files: HMT's parameters and config (and LoRA weights) saved beside an untouched backbone,
and loaded back from a folder or a Hugging Face Hub repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hmt.backbone import BACKBONE_DIR, attach_lora, has_lora, is_peft_model, save_lora, saved_backbone
from hmt.config import GAINED_FIELDS, READING_FIELDS, HMTConfig
from hmt.finite import check_finite_weights
from hmt.io import ADAPTER_NAME, load_adapter_files, save_adapter_files
from hmt.version import __version__

# The parameters each of GAINED_FIELDS adds: they start fresh when an adapter gains the field.
GAINED_PARAMETERS: dict[str, tuple[str, ...]] = {"recall_temperature": ("recall_log_temperature",)}


def save_adapter(
    model: Any, directory: Path, *, save_backbone: bool = False, lora_dtype: torch.dtype | None = None
) -> None:
    """`HMTForCausalLM.save_pretrained`: LoRA (as trained, or in `lora_dtype`) and the backbone if asked,
    then HMT's float32 parameters and config, each file written atomically."""
    if is_peft_model(model.backbone):
        save_lora(model.backbone, directory, lora_dtype)
    if save_backbone:
        model.backbone.save_pretrained(directory / BACKBONE_DIR)
    tensors = {name: p.detach().float() for name, p in model.memory.state_dict().items()}
    save_adapter_files(directory, model.config.replace(hmt_version=__version__), tensors)


def adapter_folder(location: str | Path) -> Path:
    """A local adapter folder as given, or a Hub repo id ("owner/name") fetched with huggingface_hub
    (offline: from its cache). Neither is a FileNotFoundError saying what was looked for."""
    path = Path(location)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file: an adapter is a folder written by save_pretrained")
        return path
    text = str(location)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or "\\" in text:
        raise FileNotFoundError(
            f"no adapter folder {path}: not an HMT adapter folder (written by save_pretrained), nor a Hub "
            "repo id like owner/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"no adapter folder {path}, and the Hub repo {text} could not be fetched "
            f"({type(err).__name__}; offline, it must be in the Hugging Face cache already)"
        ) from None


def load_adapter(
    cls: type, location: str | Path, backbone: Any, *, merge_lora: bool, trainable_lora: bool, mode: str,
    query_batch_size: int, settings: dict[str, Any],
) -> Any:  # fmt: skip
    """`HMTForCausalLM.from_pretrained` (see there)."""
    directory = adapter_folder(location)
    config, tensors = load_adapter_files(directory)
    check_finite_weights(tensors.items(), directory / ADAPTER_NAME)
    given = dict(settings)  # None is a value too (e.g. sharpen_recall_after=None: recall as trained)
    # A field that adds parameters may be switched on for an adapter saved without it (fine-tuning).
    gained = [k for k in given if k in GAINED_FIELDS and getattr(config, k) is None]
    tied = sorted(
        k
        for k, v in given.items()
        if k not in READING_FIELDS and k not in gained and getattr(config, k, v) != v
    )
    if tied:
        raise ValueError(
            f"{', '.join(tied)} differ from the adapter in {directory} and are tied to the parameters: "
            "leave them out, or start a fresh model"
        )
    config = config.replace(**given)
    _check_adapter_fits(directory, config, backbone)
    if has_lora(directory):
        backbone = attach_lora(backbone, directory, trainable=trainable_lora, in_place=merge_lora)
    model = cls(backbone, config, mode=mode, query_batch_size=query_batch_size)
    expected = model.memory.state_dict()
    fresh = {name for field_name in gained for name in GAINED_PARAMETERS[field_name]}
    missing = sorted(set(expected) - set(tensors) - fresh)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory} holds HMT parameters that do not match this model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, this backbone needs "
                f"{tuple(expected[name].shape)}"
            )
    model.memory.load_state_dict({k: t.to(torch.float32) for k, t in tensors.items()}, strict=not fresh)
    return model


def _check_adapter_fits(directory: Path, config: HMTConfig, backbone: Any) -> None:
    """Refuse a backbone of another kind or width, or the plain backbone for a fully fine-tuned adapter."""
    kind = backbone.config.model_type
    if config.backbone_type is not None and config.backbone_type != kind:
        raise ValueError(
            f"adapter in {directory} was made for a {config.backbone_type} backbone "
            f"({config.backbone or 'unnamed'}), but this backbone is {kind}; load it onto the backbone it "
            "was trained with"
        )
    embedding_dim = backbone.get_input_embeddings().embedding_dim
    if config.embedding_dim is not None and config.embedding_dim != embedding_dim:
        raise ValueError(
            f"adapter in {directory} was made for embedding width {config.embedding_dim}, but this "
            f"backbone has width {embedding_dim}; load it onto the backbone it was trained with"
        )
    saved = saved_backbone(directory)
    if saved is not None:
        given = getattr(backbone, "name_or_path", None) or getattr(backbone.config, "_name_or_path", "")
        if not given or Path(given).resolve() != Path(saved).resolve():
            raise ValueError(
                f"adapter in {directory} was trained with the whole backbone fine-tuned; its backbone is "
                f"{saved}: load that one (load_backbone('{saved}'), or hmt eval loads it for you)"
            )

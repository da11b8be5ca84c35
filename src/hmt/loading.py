"""One call from a backbone, an adapter and reading settings to a ready model (`load_model`).

Every command, the server and the lm-eval model load through it, so an adapter, a reading setting or a
device means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hmt.backbone import Backbone
from hmt.model import HMTForCausalLM

UNTRAINED = "none"  # adapter= value: untrained memory parameters, seeded


@dataclass
class LoadedModel:
    """A model ready to read, with its tokenizer and where its weights came from."""

    model: HMTForCausalLM
    backbone: Backbone  # the untouched backbone (for an adapter with a fine-tuned backbone: the original)
    adapter: Path | None  # the adapter folder; None: untrained memory parameters
    reference: HMTForCausalLM | None = None  # baseline rows on the untouched backbone, where it differs
    weights: dict[str, str] = field(default_factory=dict)  # labels: adapter, model, reference

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def identity(self) -> dict[str, Any]:
        """What a saved memory records of the model it belongs to (see `hmt.sessions`)."""
        from hmt.sessions import model_identity

        return model_identity(self.model, self.backbone.name, self.adapter)

    def encode(self, text: str) -> torch.Tensor:
        """`text` as a 1-D tensor of token ids on the model's device (no special tokens added)."""
        from hmt.ask import encode

        return encode(self.tokenizer, text, self.model.device)


def resolve_adapter(adapter: str | Path | None, backbone: str | None) -> Path | None:
    """The adapter folder to load: `adapter` as given; "none": untrained memory (None); not given: the
    adapter shipped for the default backbone, when the default backbone is used and this install has it."""
    from hmt.io import shipped_adapter

    if adapter is not None:
        return None if str(adapter).lower() == UNTRAINED else Path(adapter)
    return shipped_adapter() if backbone is None else None


def load_model(
    backbone: str | None = None,
    *,
    adapter: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    lora_baselines: bool = False,
) -> LoadedModel:
    """Load `backbone` (default SmolLM2-135M-Instruct) with an HMT adapter on it, in eval mode.

    adapter: a folder (`save_pretrained`); None: the shipped adapter for the default backbone, none for
    others; "none": untrained memory parameters (drawn with `seed`). settings: reading settings
    (`hmt.config.READING_FIELDS`, e.g. {"cache_size": 100}) over the adapter's; for untrained memory,
    any `HMTConfig` field. An adapter whose whole backbone was fine-tuned loads that backbone; its
    `reference` then reads the untouched one (or the tuned one too, with `lora_baselines`)."""
    from hmt.backbone import has_lora, load_backbone, quiet_transformers, resolve_device, saved_backbone
    from hmt.config import HMTConfig
    from hmt.io import CONFIG_NAME, shipped_adapter

    resolve_device(device)  # a bad device is an error before anything loads
    quiet_transformers()
    settings = dict(settings or {})
    folder = resolve_adapter(adapter, backbone)
    if folder is None:
        plain = load_backbone(backbone, dtype=dtype, device=device)
        torch.manual_seed(seed)
        model = HMTForCausalLM(plain.model, HMTConfig(**settings))
        note = f"none: the memory rows use untrained memory parameters (seed {seed})"
        loaded = LoadedModel(model, plain, None, weights={"adapter": note, "model": "untouched backbone"})
        return _ready(loaded)
    shipped = folder == shipped_adapter()
    note = f"{'the shipped' if shipped else 'trained'} adapter {folder.name if shipped else folder}"
    tuned_folder = saved_backbone(folder)
    if tuned_folder is not None:  # the whole backbone was fine-tuned: it is in the adapter
        original = backbone or HMTConfig.from_json_file(folder / CONFIG_NAME).backbone
        tuned = load_backbone(tuned_folder, dtype=dtype, device=device)
        model = HMTForCausalLM.from_pretrained(folder, tuned.model, **settings)
        plain = load_backbone(original, dtype=dtype, device=device) if not lora_baselines else tuned
        own = "the adapter's fine-tuned backbone"
    else:
        plain = load_backbone(backbone, dtype=dtype, device=device)
        model = HMTForCausalLM.from_pretrained(folder, plain.model, **settings)
        own = "backbone + the adapter's LoRA" if has_lora(folder) else "untouched backbone"
    reference = None
    if model.backbone is not plain.model and not lora_baselines:
        reference = HMTForCausalLM(plain.model, model.config)  # baseline rows read no HMT parameter
    weights = {"adapter": note, "model": own, "reference": "untouched backbone"}
    return _ready(LoadedModel(model, plain, folder, reference, weights))


def _ready(loaded: LoadedModel) -> LoadedModel:
    loaded.model.eval()
    if loaded.reference is not None:
        loaded.reference.eval()
    return loaded

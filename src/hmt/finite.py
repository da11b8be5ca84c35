"""Refusing weights that hold NaN or inf: an adapter written by a diverged training loads without error,
then every answer is the same garbage token ("!!!"), so hmt checks the tensors where it loads them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "adapter_model.safetensors"  # peft's LoRA weights, beside HMT's in an adapter folder


def non_finite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors in `named` that hold NaN or inf."""
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


ADAPTER_FIX = "train it again with a lower --lr / --memory-lr, or use another adapter"


def check_finite_weights(
    named: Iterable[tuple[str, torch.Tensor]], path: str | Path, fix: str = ADAPTER_FIX
) -> None:
    """Raise a ValueError naming `path` (the file the tensors came from) and `fix` if any tensor holds
    NaN or inf."""
    bad = non_finite_names(named)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"{path} holds NaN or inf weights ({', '.join(bad[:3])}{more}): the training that wrote it "
            f"diverged; {fix}"
        )


def check_lora_file(directory: str | Path) -> None:
    """Refuse an adapter folder whose LoRA weights (peft's safetensors file) hold NaN or inf. A file that
    cannot be read is left to the loader, which names it."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / LORA_WEIGHTS_NAME
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = [(name, handle.get_tensor(name)) for name in handle.keys()]  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        return
    check_finite_weights(tensors, path)

"""Training checkpoints as safetensors + JSON: weights, optimizer, RNG, data position and carried memory.

Nothing here reads a pickle: a checkpoint folder from elsewhere can hold wrong numbers, never code.
A checkpoint appears only when complete (written to a staging folder, then renamed), so a kill mid-save
leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from hmt.finite import check_finite_weights
from hmt.io import load_tensors, read_json, save_tensors, write_text_atomic
from hmt.memory import MemoryState

WEIGHTS_FORMAT = "hmt-checkpoint"
OPTIMIZER_FORMAT = "hmt-optimizer"
RNG_FORMAT = "hmt-rng"
DONE_FILE = "trainer.json"  # written last: its presence marks a complete checkpoint


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / DONE_FILE).is_file())


def save_checkpoint(
    run_dir: Path,
    step: int,
    tokens: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: Any,
    state: MemoryState | None,
    keep: int,
    accelerator: Any,
) -> Path:
    """Write a checkpoint of `step` (each process its own RNG, data position and memory); keep the last
    `keep` checkpoints."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    staging = root / f".staging-step-{step:07d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trainable = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
        save_tensors(staging / "trainable.safetensors", trainable, {"format": WEIGHTS_FORMAT})
        _save_optimizer(optimizer, staging)
    accelerator.wait_for_everyone()
    save_tensors(
        staging / f"rng-{rank}.safetensors", {"torch": torch.get_rng_state()}, {"format": RNG_FORMAT}
    )
    process = {
        "python_random": _jsonable(random.getstate()),
        "source": source.state_dict() if hasattr(source, "state_dict") else {},
    }
    write_text_atomic(staging / f"rng-{rank}.json", json.dumps(process) + "\n")
    if state is not None:
        state.save(staging / f"memory-{rank}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(staging / DONE_FILE, json.dumps({"step": step, "tokens": tokens}) + "\n")
        os.replace(staging, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: Any, accelerator: Any
) -> tuple[int, int, MemoryState | None]:
    """Restore the newest checkpoint; returns (step, tokens seen, carried memory). No checkpoint: step 0."""
    found = checkpoint_dirs(run_dir)
    if not found:
        return 0, 0, None
    folder = found[-1]
    info = read_json(folder / DONE_FILE)
    tensors, _ = load_tensors(folder / "trainable.safetensors", WEIGHTS_FORMAT)
    check_finite_weights(
        tensors.items(),
        folder / "trainable.safetensors",
        f"delete {folder} to resume from the checkpoint before it, or start a new run",
    )
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(
            f"checkpoint {folder} trains other parameters than this run (missing "
            f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}); "
            "resume with the settings it was started with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    _load_optimizer(optimizer, folder, accelerator.device)
    rank = accelerator.process_index
    rng, _ = load_tensors(folder / f"rng-{rank}.safetensors", RNG_FORMAT)
    torch.set_rng_state(rng["torch"])
    process = read_json(folder / f"rng-{rank}.json")
    version, internal, gauss = process["python_random"]
    random.setstate((version, tuple(internal), gauss))
    if hasattr(source, "load_state_dict"):
        source.load_state_dict(process["source"])
    memory_file = folder / f"memory-{rank}.safetensors"
    state = MemoryState.load(memory_file, device=accelerator.device) if memory_file.is_file() else None
    return int(info["step"]), int(info["tokens"]), state


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's tensors (per-parameter moments and steps) as safetensors, the rest as JSON."""
    state_dict = optimizer.state_dict()
    tensors, values = {}, {}
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                values[f"{index}.{key}"] = value
    save_tensors(folder / "optimizer.safetensors", tensors, {"format": OPTIMIZER_FORMAT})
    record = {"param_groups": _jsonable(state_dict["param_groups"]), "values": _jsonable(values)}
    write_text_atomic(folder / "optimizer.json", json.dumps(record) + "\n")


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, device: torch.device) -> None:
    tensors, _ = load_tensors(folder / "optimizer.safetensors", OPTIMIZER_FORMAT)
    record = read_json(folder / "optimizer.json")
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *record["values"].items()]:
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the optimizer state in {folder} does not fit this run: {err}") from err


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (JSON has no tuples)."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value

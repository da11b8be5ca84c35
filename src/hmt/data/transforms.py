"""The paper's long-context probes as edits of token streams: topic switching and dilation.

All functions take and return 1-D integer tensors (returned as int64, on the device of the first stream).
"""

from __future__ import annotations

import torch


def interleave(first: torch.Tensor, second: torch.Tensor, every: int) -> torch.Tensor:
    """Topic switching: blocks of `every` tokens taken in turn, first[0:m], second[0:m], first[m:2m], ...

    Stops after the last complete pair of blocks, so neither topic ever runs on alone or ends mid-block;
    the result has 2 * every * (min(len(first), len(second)) // every) tokens.
    """
    _require_ids("first", first)
    _require_ids("second", second)
    _require_int("every", every, minimum=1)
    pairs = min(first.numel(), second.numel()) // every
    blocks = [
        first[: pairs * every].reshape(pairs, every),
        second[: pairs * every].to(first.device).reshape(pairs, every),
    ]
    return torch.cat(blocks, dim=1).reshape(-1).long()


def dilate(stream: torch.Tensor, filler: torch.Tensor, every: int, length: int) -> torch.Tensor:
    """Dilation: after each `every` tokens of text, a run of `length` filler tokens (filler repeated or cut).

    No run follows the final block, complete or not, so the text ends the result; `filler_mask` tells
    which positions are filler (to score text only).
    """
    _require_ids("stream", stream)
    _require_ids("filler", filler)
    _require_int("every", every, minimum=1)
    _require_int("length", length, minimum=0)
    if length > 0 and filler.numel() == 0:
        raise ValueError("filler must hold at least one token when length > 0")
    mask = filler_mask(stream.numel(), every, length).to(stream.device)
    runs = int(mask.sum()) // length if length else 0
    out = torch.empty(mask.numel(), dtype=torch.long, device=stream.device)
    out[~mask] = stream.long()
    if runs:
        run = filler.to(stream.device).long().repeat(-(-length // filler.numel()))[:length]
        out[mask] = run.repeat(runs)
    return out


def filler_mask(text_length: int, every: int, length: int) -> torch.Tensor:
    """Which positions of `dilate`'s output (for a stream of `text_length` tokens) are filler: a bool tensor."""
    _require_int("text_length", text_length, minimum=0)
    _require_int("every", every, minimum=1)
    _require_int("length", length, minimum=0)
    runs = max(0, -(-text_length // every) - 1)
    positions = torch.arange(text_length + runs * length)
    # The output repeats (every text, length filler); the tail after the last run is all text.
    return positions % (every + length) >= every


def _require_ids(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D tensor of token ids, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {value.dtype}")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

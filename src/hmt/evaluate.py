"""Perplexity of one long token stream under several modes that all score exactly the same tokens.

Modes: `backbone` (independent windows of L tokens), `sliding` (windows that reread the previous k
tokens), `memory_off`, `rmt` (memory recurrence), `hmt` (the full memory hierarchy), and `full` (the
plain backbone on windows of its whole context: the upper reference).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hmt.backbone import context_length
from hmt.config import IGNORE_INDEX, WRITING_MODES
from hmt.io import write_text_atomic
from hmt.model import HMTForCausalLM

EVAL_MODES: tuple[str, ...] = ("backbone", "sliding", "memory_off", "rmt", "hmt", "full")
# Rows that read no HMT parameter: what a user would run instead of HMT.
BASELINE_MODES: tuple[str, ...] = ("backbone", "full")

Progress = Callable[[str, int, int], None]  # (mode, tokens done, tokens in all)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; the memory settings (L, k, j, N) are the model's own config."""

    modes: tuple[str, ...] = EVAL_MODES
    full_window: int | None = None  # None: the backbone's maximum positions
    segments_per_call: int = 8  # segments per forward call: only the progress granularity changes
    reset_every: int | None = None  # empty the memory cache every this many segments (None: carry it)

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError(f"give at least one mode of {', '.join(EVAL_MODES)}")
        unknown = [m for m in self.modes if m not in EVAL_MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}: use {', '.join(EVAL_MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {', '.join(self.modes)}")
        if self.full_window is not None and self.full_window < 1:
            raise ValueError(f"full_window must be >= 1, got {self.full_window}")
        if self.reset_every is not None and self.reset_every < 1:
            raise ValueError(f"reset_every must be >= 1 segment, got {self.reset_every}")
        if self.segments_per_call < 1:
            raise ValueError(f"segments_per_call must be >= 1, got {self.segments_per_call}")


@dataclass
class RecallStats:
    """Where recall looked: the strongest weight's distance back (1 = the previous segment) and spread."""

    distance_histogram: dict[int, int]
    mean_entropy: float  # nats; log(cache length) would be uniform
    mean_max_weight: float
    segments: int  # segments that recalled from a non-empty cache
    # Share of the segments recalling from two or more entries whose strongest weight was on the oldest
    # entry held: near 1 when recall has frozen on the stream's first memory.
    oldest_share: float = 0.0

    def most_common_distance(self) -> tuple[int, float]:
        """The distance back recall's strongest weight fell at most often, and its share of segments."""
        distance, count = max(self.distance_histogram.items(), key=lambda kv: kv[1])
        return distance, count / self.segments


@dataclass
class ModeResult:
    mode: str
    window: int  # tokens per segment (L), or the full context for `full`
    ppl: float
    nll: float  # mean negative log-likelihood (nats per token)
    tokens_scored: int
    seconds: float
    tokens_per_second: float
    segment_ppl: list[float | None]  # per bin of L stream tokens (same bins for every mode)
    # Per eighth of a segment (positions 0..L/8-1 of every segment, then the next eighth, ...): where in
    # a segment the loss falls; the first eighth is what the sensory tokens and memory are there for.
    offset_ppl: list[float | None] = field(default_factory=list)
    recall: RecallStats | None = None
    memory_norm: float | None = None  # mean L2 norm of the cached memories at the end
    embedding_norm: float | None = None  # mean L2 norm of the backbone's token embeddings (the target scale)
    # Which weights read this row: "model" (with the adapter's LoRA, if any) or "reference" (run_eval's).
    weights: str = "model"
    token_losses: torch.Tensor | None = field(default=None, repr=False)  # (stream_len,), for further analysis
    token_mask: torch.Tensor | None = field(default=None, repr=False)  # (stream_len,) bool: scored tokens

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("token_losses")
        data.pop("token_mask")
        return data


def run_eval(
    model: HMTForCausalLM,
    stream: torch.Tensor,
    config: EvalConfig | None = None,
    score_mask: torch.Tensor | None = None,
    progress: Progress | None = None,
    reference: HMTForCausalLM | None = None,
) -> dict[str, ModeResult]:
    """Score `stream` (1-D token ids) under each mode; positions where `score_mask` is False are not scored.

    The model's memory parameters serve every memory mode. `reference`, if given, reads the `backbone`
    and `full` rows instead (e.g. the untouched backbone, when the model's carries an adapter's LoRA).
    Neither model's settings change.
    """
    config = config or EvalConfig()
    if reference is not None and reference.config.segment_length != model.config.segment_length:
        raise ValueError(
            f"the reference reads segments of {reference.config.segment_length} tokens, the model of "
            f"{model.config.segment_length}: rows compare only on the same windows"
        )
    stream = _check_stream(stream, model)
    labels = stream.clone()
    if score_mask is not None:
        if score_mask.shape != stream.shape:
            raise ValueError(f"score_mask shape {tuple(score_mask.shape)} does not match the stream's")
        labels[~score_mask.to(stream.device)] = IGNORE_INDEX
    results: dict[str, ModeResult] = {}
    bin_size = model.config.segment_length  # every row's per-segment bins: the model's segments
    for mode in config.modes:
        reader = reference if reference is not None and mode in BASELINE_MODES else model
        read = {
            "name": mode,
            "bin_size": bin_size,
            "weights": "reference" if reader is reference else "model",
        }
        if mode == "full":
            window = config.full_window or _max_positions(reader)
            with reader.reading(segment_length=window, num_sensory=0, summary_length=None):
                results[mode] = _score_stream(
                    reader, stream, labels, "backbone", window, None, progress, **read
                )
        else:
            reset = config.reset_every if mode in WRITING_MODES else None
            chunk = bin_size * (reset or config.segments_per_call)
            results[mode] = _score_stream(reader, stream, labels, mode, chunk, reset, progress, **read)
    _check_same_tokens(results)
    return results


def _score_stream(
    model: HMTForCausalLM,
    stream: torch.Tensor,
    labels: torch.Tensor,
    mode: str,
    chunk: int,
    reset: int | None,
    progress: Progress | None,
    *,
    name: str,
    bin_size: int,
    weights: str,
) -> ModeResult:
    """Read the stream in calls of `chunk` tokens, the state carried (emptied of memories every call when
    `reset`); `name` is the row's mode as reported, `bin_size` the width of its per-segment bins, `weights`
    which model read it (ModeResult.weights)."""
    total = stream.shape[0]
    state, losses, masks, recalled = None, [], [], []
    if progress is not None:
        progress(name, 0, total)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, total, chunk):
            if reset and state is not None:
                state = state.forget()
            ids = stream[None, start : start + chunk]
            out = model(ids, labels=labels[None, start : start + chunk], state=state, mode=mode, num_logits=0)
            state = out.state
            losses.append(out.token_losses[0])
            masks.append(out.token_mask[0])
            recalled.extend(w[0] for w in out.recall_weights or [])
            if progress is not None:
                progress(name, min(start + chunk, total), total)
    seconds = time.perf_counter() - started
    token_losses, token_mask = torch.cat(losses).float().cpu(), torch.cat(masks).cpu()
    scored = int(token_mask.sum())
    nll = float(token_losses[token_mask].sum()) / max(scored, 1)
    memory_norm = embedding_norm = None
    if mode in WRITING_MODES:
        embedding_norm = float(model.memory.embedding_norm)
        if state.memory_mask.any():
            memory_norm = model.memory.mean_norm(state.memories[state.memory_mask])
    return ModeResult(
        mode=name,
        window=model.config.segment_length,
        ppl=math.exp(nll),
        nll=nll,
        tokens_scored=scored,
        seconds=seconds,
        tokens_per_second=total / seconds,
        segment_ppl=segment_perplexities(token_losses, token_mask, bin_size),
        offset_ppl=offset_perplexities(token_losses, token_mask, bin_size),
        recall=recall_stats(recalled) if mode == "hmt" else None,
        memory_norm=memory_norm,
        embedding_norm=embedding_norm,
        weights=weights,
        token_losses=token_losses,
        token_mask=token_mask,
    )


def segment_perplexities(
    token_losses: torch.Tensor, token_mask: torch.Tensor, bin_size: int
) -> list[float | None]:
    """Perplexity per consecutive bin of `bin_size` positions (None for a bin with nothing scored)."""
    positions = torch.arange(token_losses.shape[0], device=token_losses.device)
    bins = math.ceil(token_losses.shape[0] / bin_size)
    return _group_perplexities(token_losses, token_mask, positions // bin_size, bins)


OFFSET_BINS = 8


def offset_perplexities(
    token_losses: torch.Tensor, token_mask: torch.Tensor, segment_length: int, bins: int = OFFSET_BINS
) -> list[float | None]:
    """Perplexity by position within the segment: `bins` equal stretches of the L positions of every
    segment (positions counted from the stream's start), None for a stretch with nothing scored."""
    positions = torch.arange(token_losses.shape[0], device=token_losses.device)
    group = positions % segment_length * bins // segment_length
    return _group_perplexities(token_losses, token_mask, group, bins)


def _group_perplexities(
    token_losses: torch.Tensor, token_mask: torch.Tensor, group: torch.Tensor, groups: int
) -> list[float | None]:
    """Perplexity of the scored positions in each group 0..groups-1 (None for a group with none scored)."""
    losses = torch.zeros(groups, device=token_losses.device).index_add_(
        0, group[token_mask], token_losses[token_mask].float()
    )
    counts = torch.bincount(group[token_mask], minlength=groups)
    return [math.exp(float(loss) / int(n)) if n else None for loss, n in zip(losses, counts, strict=True)]


def recall_stats(weights: list[torch.Tensor]) -> RecallStats:
    """Summarise per-segment recall weights (each (cache_len,), newest memory last)."""
    distances: Counter[int] = Counter()
    entropies, maxima, on_oldest = [], [], []
    for w in weights:
        w = w.float().cpu()
        if w.numel() == 0 or float(w.sum()) == 0:
            continue
        strongest = int(w.argmax())
        distances[w.numel() - strongest] += 1
        if w.numel() > 1:
            on_oldest.append(strongest == 0)
        entropies.append(float(-(w * w.clamp_min(1e-30).log()).sum()))
        maxima.append(float(w.max()))
    count = len(entropies)
    return RecallStats(
        distance_histogram=dict(sorted(distances.items())),
        mean_entropy=sum(entropies) / count if count else 0.0,
        mean_max_weight=sum(maxima) / count if count else 0.0,
        segments=count,
        oldest_share=sum(on_oldest) / len(on_oldest) if on_oldest else 0.0,
    )


def _check_stream(stream: torch.Tensor, model: HMTForCausalLM) -> torch.Tensor:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise ValueError("the token stream must be a 1-D tensor of token ids")
    if stream.shape[0] <= model.config.segment_length:
        raise ValueError(
            f"the text has {stream.shape[0]} tokens, not more than one segment ({model.config.segment_length}): "
            "give a longer text or a smaller --segment-length"
        )
    return stream.to(model.device)


def _max_positions(model: HMTForCausalLM) -> int:
    limit = context_length(model.backbone.config)
    if limit is None:
        raise ValueError("the backbone does not state its context length; give full_window (--full-window)")
    return int(limit)


def _check_same_tokens(results: dict[str, ModeResult]) -> None:
    counts = {mode: r.tokens_scored for mode, r in results.items()}
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"modes scored different numbers of tokens {counts}; this is a bug in hmt")


def make_report(
    results: dict[str, ModeResult],
    *,
    model_config: dict[str, Any],
    backbone: dict[str, Any],
    data: dict[str, Any],
    adapter: str | None,
    adapter_note: str,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-ready record of an evaluation: what was run, on what, and every mode's numbers."""
    import platform

    from hmt.version import __version__

    return {
        "hmt_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "backbone": backbone,
        "data": data,
        "adapter": adapter,
        "adapter_note": adapter_note,
        "config": {**model_config, **(settings or {})},
        "modes": {mode: result.to_dict() for mode, result in results.items()},
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path

"""Needle-in-a-haystack evaluation: context lengths x depths x trials, one row per way of reading.

Each trial reads a held-out `RecallSample`'s context (haystack, facts, question), then the answer's segment
once per candidate answer, and records greedy exact match (the argmax at every answer token is the true
token: the same event as greedy decoding producing the answer), the rank of the true answer among the
candidates by total log-probability (1 = best; chance puts it first 1 time in `NUM_CANDIDATES`), and the
model's first choice at every answer token (given the true tokens before it; equal to the greedy answer
whenever it is exact), so a report can show what each row answered.

Rows: `full`, the untouched backbone reading the whole context in one window (past its maximum context it
reads the last `window` tokens, so facts further back are out of its sight); `sliding`, `rmt`, `hmt`: the
HMT model in that mode (the windowed controls read with the adapter's weights too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from hmt.config import IGNORE_INDEX
from hmt.tasks import TASKS, RecallSample, RecallTasks

NEEDLE_ROWS: tuple[str, ...] = ("full", "sliding", "rmt", "hmt")


@dataclass(frozen=True)
class NeedleConfig:
    """The grid: which task, context lengths (tokens), depths (0-1), trials per cell, rows."""

    task: str = "passkey"
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 3
    rows: tuple[str, ...] = NEEDLE_ROWS
    num_keys: int = 2  # multikey only
    seed: int = 0
    full_window: int | None = None  # the full row's window; None: the backbone's maximum context

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        unknown = sorted(set(self.rows) - set(NEEDLE_ROWS))
        if not self.rows or unknown:
            raise ValueError(f"rows must be among {', '.join(NEEDLE_ROWS)}, got {list(self.rows)}")
        if not self.lengths or any(length < 64 for length in self.lengths):
            raise ValueError(f"give context lengths of at least 64 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths are fractions between 0 and 1, got {list(self.depths)}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")

    def samples(self, tasks: RecallTasks) -> dict[tuple[int, float], list[RecallSample]]:
        """The grid's samples, the same for every row: a fixed seed per (length, depth, trial)."""
        grid = {}
        for length in self.lengths:
            for depth in self.depths:
                cell = []
                for trial in range(self.trials):
                    seed = ((self.seed * 1_000_003 + length) * 1009 + round(depth * 1000)) * 101 + trial
                    g = torch.Generator().manual_seed(seed)
                    cell.append(tasks.sample(self.task, length, depth, g, self.num_keys))
                grid[length, depth] = cell
        return grid


class TrialScore(NamedTuple):
    """One trial of one row: exact match, rank of the truth among the candidates, and the first-choice
    token at every answer position (given the true tokens before it)."""

    exact: bool
    rank: int
    predicted: torch.Tensor


@dataclass
class Cell:
    """One (length, depth) cell of one row."""

    length: int
    depth: float
    exact: list[bool] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, score: TrialScore, sample: RecallSample, tokenizer: Any) -> None:
        self.exact.append(score.exact)
        self.ranks.append(score.rank)
        self.answers.append(
            {
                "expected": tokenizer.decode(sample.answer.tolist()),
                "answer": tokenizer.decode(score.predicted.tolist()),
                "exact": score.exact,
                "rank": score.rank,
                "fact_token": sample.asked_span[0],
            }
        )

    def summary(self) -> dict[str, Any]:
        n = len(self.exact)
        return {
            "length": self.length,
            "depth": self.depth,
            "trials": n,
            "exact_match": sum(self.exact) / n,
            "top1": sum(r == 1 for r in self.ranks) / n,
            "mean_rank": sum(self.ranks) / n,
            "seconds_per_trial": self.seconds / n,
            "answers": self.answers,
        }


def score_memory_row(model: Any, sample: RecallSample, mode: str) -> TrialScore:
    """Exact match and rank of the true answer for the HMT model read in `mode` (sliding, rmt, hmt):
    the context in one call (its last, short segment closes it), then the answer's segment once per
    candidate, each continuing a copy of the context's state."""
    return score_answer(model, sample, read_context(model, sample, mode), mode)


def read_context(model: Any, sample: RecallSample, mode: str) -> Any:
    """The `MemoryState` after reading a sample's context in `mode` (its last segment closed)."""
    with torch.no_grad():
        return model(sample.context[None].to(model.device), mode=mode, end_segment=True, score=False).state


def score_answer(model: Any, sample: RecallSample, state: Any, mode: str) -> TrialScore:
    """Score every candidate answer's segment from `state` (a context read by `read_context`), batched."""
    with torch.no_grad():
        ids, labels, mask = _candidate_rows(sample, model.device)
        rows = state.select([0] * ids.shape[0])
        out = model(ids, attention_mask=mask, labels=labels, state=rows, mode=mode, return_logits=True)
    start = len(sample.prompt)  # the prompt's last position predicts the answer's first token
    answer_logits = out.logits[sample.answer_index, start - 1 : start - 1 + len(sample.answer)]
    return _trial_score(answer_logits, out.token_losses.sum(dim=1), sample)


def score_full_row(backbone: Any, sample: RecallSample, window: int) -> TrialScore:
    """Exact match and rank for the plain backbone reading the last `window` tokens of context + prompt +
    answer: the context once (its KV cache), then every candidate continuing it."""
    device = next(backbone.parameters()).device
    longest = max(len(c) for c in sample.candidates)
    prefix = torch.cat([sample.context, sample.prompt])[-(window - longest) :].to(device)
    with torch.no_grad():
        first = backbone(prefix[None], use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(sample.candidates))
        ids, labels, mask = _padded(sample.candidates, device)
        full_mask = torch.cat([mask.new_ones(len(ids), len(prefix)), mask], dim=1)
        out = backbone(ids, attention_mask=full_mask, cache=cache, use_cache=True)
    # Position i of the candidates predicts token i + 1; the prefix's last position predicts token 0.
    logits = torch.cat([first.logits[:, -1:].expand(len(ids), -1, -1), out.logits[:, :-1]], dim=1).float()
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return _trial_score(logits[sample.answer_index, : len(sample.answer)], losses.sum(dim=1), sample)


def run_needle(
    model: Any,
    backbone: Any,
    tasks: RecallTasks,
    config: NeedleConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """The whole grid for every row of `config`; returns per-row cells (see `Cell.summary`) and means.

    `model` is the HMTForCausalLM (sliding, rmt, hmt rows); `backbone` the untouched causal LM (full row).
    """
    from hmt.backbone import context_length

    window = config.full_window or context_length(backbone.config) or max(config.lengths)
    grid = config.samples(tasks)
    rows: dict[str, list[dict[str, Any]]] = {}
    total = len(grid) * config.trials
    for row in config.rows:
        cells = []
        done = 0
        if progress is not None:
            progress(row, 0, total)  # the row's clock starts now, not when its first trial is done
        for (length, depth), samples in grid.items():
            cell = Cell(length, depth)
            for sample in samples:
                started = time.perf_counter()
                if row == "full":
                    score = score_full_row(backbone, sample, window)
                else:
                    score = score_memory_row(model, sample, row)
                cell.seconds += time.perf_counter() - started
                cell.add(score, sample, tasks.tokenizer)
                done += 1
                if progress is not None:
                    progress(row, done, total)
            cells.append(cell.summary())
        rows[row] = cells
    return {
        "config": asdict(config),
        "full_window": window,
        "rows": rows,
        "means": {row: _means(cells) for row, cells in rows.items()},
    }


def _means(cells: list[dict[str, Any]]) -> dict[str, float]:
    return {key: sum(c[key] for c in cells) / len(cells) for key in ("exact_match", "top1", "mean_rank")}


def _candidate_rows(sample: RecallSample, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, attention mask): prompt + candidate per row, right-padded; labels on the candidate."""
    rows = [torch.cat([sample.prompt, c]) for c in sample.candidates]
    ids, _, mask = _padded(rows, device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, c in enumerate(sample.candidates):
        labels[row, len(sample.prompt) : len(sample.prompt) + len(c)] = c.to(device)
    return ids, labels, mask


def _padded(rows: list[torch.Tensor], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], labels[i, : len(r)], mask[i, : len(r)] = r.to(device), r.to(device), 1
    return ids, labels, mask


def _trial_score(answer_logits: torch.Tensor, nll: torch.Tensor, sample: RecallSample) -> TrialScore:
    """answer_logits: (answer length, vocab), the true candidate's logits predicting each answer token;
    nll: (candidates,) each candidate's total negative log-likelihood."""
    predicted = answer_logits.argmax(-1)
    exact = bool((predicted == sample.answer.to(predicted.device)).all())
    return TrialScore(exact, _rank(nll, sample.answer_index), predicted.cpu())


def _rank(nll: torch.Tensor, truth: int) -> int:
    """1 + how many candidates are strictly more likely than the truth (ties favour the truth)."""
    return 1 + int((nll < nll[truth]).sum())

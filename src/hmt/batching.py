"""Continuous batching: many generations over one model, each with its own memory and settings.

`hmt serve` decodes every request it is answering in one batch, one token per row per step: a row
joins between steps (its prompt read on its own first, its KV cache merged into the batch's) and leaves
when it stops (end of text, a stop string, its max_new_tokens, or its client gone). On a CPU a step of
eight rows costs little more than a step of one, so concurrent clients wait far less than in a queue.

A row decodes exactly as `HMTForCausalLM.generate` would alone — the same processors (transformers'
repetition penalty, temperature, top-k, top-p), stop strings, end-of-text tokens and state transitions
— and sampling draws from the row's own generator, so a seeded request gives the same text whatever
else is in the batch. Tested against `generate` row by row.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hmt.backbone import eval_mode
from hmt.generation import (
    SegmentCache,
    _choose,
    _close_segments,
    _generation_config,
    _processors,
    _stop_strings,
    _token_set,
)

if TYPE_CHECKING:
    from transformers import StopStringCriteria
    from transformers.generation import LogitsProcessorList

    from hmt.memory import MemoryState
    from hmt.model import HMTForCausalLM


@dataclass
class Row:
    """One generation in the batch: its settings going in, its tokens, state and finish coming out."""

    prompt_ids: torch.Tensor  # (1, p): the text read last (repetition penalty and stop strings see it)
    settings: dict[str, Any]  # transformers' generation settings (max_new_tokens, do_sample, ...)
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    streamer: Any = None  # put(ids) / end(), as transformers' streamers
    cancel: threading.Event | None = None  # set: the row leaves at the next step, finish "cancelled"
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled"
    state: MemoryState | None = None  # the row's memory after its last token, once finished
    # filled in when the row joins:
    history: torch.Tensor | None = None
    processors: LogitsProcessorList | None = None
    stop: StopStringCriteria | None = None
    generator: torch.Generator | None = None
    max_new_tokens: int = 0
    do_sample: bool = False
    eos: set[int] = field(default_factory=set)


class Batch:
    """Rows decoded together over one model (see the module's docstring). Not thread-safe: one thread
    runs `add` and `step`.

    The KV cache over the rows' open segments covers the first `cached` rows: a row whose segment closes
    (or that joins without a cache) is read by the model's forward pass alone with the other such rows,
    and its cache rebuilt and merged back, while the rest step through theirs."""

    def __init__(self, model: HMTForCausalLM, tokenizer: Any = None, mode: str | None = None) -> None:
        self.model, self.tokenizer, self.mode = model, tokenizer, mode or model.mode
        self.rows: list[Row] = []
        self.state: MemoryState | None = None
        self.cache: SegmentCache | None = None
        self.cached = 0  # rows[:cached] are in self.cache
        self._stops: dict[tuple[str, ...], StopStringCriteria | None] = {}

    def start(self, ids: torch.Tensor, state: MemoryState | None, end_segment: bool = False) -> MemoryState:
        """Read a row's prompt `ids` (1-D) after `state`: the state it joins the batch with."""
        with torch.no_grad(), eval_mode(self.model):
            return self.model(
                ids[None].to(self.model.device), state=state, mode=self.mode, end_segment=end_segment,
                score=False,
            ).state  # fmt: skip

    def start_many(
        self, prompts: list[torch.Tensor], states: list[MemoryState | None], end_segment: bool = False
    ) -> list[MemoryState]:
        """`start` for several rows in one forward pass (right-padded; each row's state as if alone)."""
        if len(prompts) == 1:
            return [self.start(prompts[0], states[0], end_segment)]
        from hmt.memory import MemoryState

        device = self.model.device
        stacked = MemoryState.stack(
            [s.to(device) if s is not None else self.model.empty_state(1) for s in states]
        )
        width = max(len(ids) for ids in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt.to(device), 1
        with torch.no_grad(), eval_mode(self.model):
            out = self.model(ids, attention_mask=mask, state=stacked, mode=self.mode, end_segment=end_segment,
                             score=False).state  # fmt: skip
        return [out.select([i]).compact() for i in range(len(prompts))]

    def add(self, row: Row, state: MemoryState) -> None:
        """Let `row` join, with `state` (batch 1) after its prompt (`start`)."""
        config = _generation_config(self.model, None, dict(row.settings))
        row.max_new_tokens, row.do_sample = config.max_new_tokens or 20, bool(config.do_sample)
        row.processors = _processors(config, prompt_length=row.prompt_ids.reshape(1, -1).shape[1])
        row.eos = _token_set(config.eos_token_id)
        if row.stop_strings not in self._stops:
            self._stops[row.stop_strings] = _stop_strings(self.tokenizer, list(row.stop_strings))
        row.stop = self._stops[row.stop_strings]
        if row.do_sample:
            row.generator = torch.Generator(device=self.model.device)
            row.generator.manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
        row.history = row.prompt_ids.to(self.model.device).reshape(1, -1)
        if row.streamer is not None:
            row.streamer.put(row.history.cpu())
        with torch.no_grad(), eval_mode(self.model):
            own = SegmentCache.build(self.model, state, self.mode)
        position = len(self.rows)
        if own is not None and self._take_cache(own):
            position = self.cached
            self.cached += 1
        self.rows.insert(position, row)
        if self.state is None:
            self.state = state
        else:
            before, after = list(range(position)), list(range(position, self.state.batch_size))
            parts = [self.state.select(before)] if before else []
            parts += [state] + ([self.state.select(after)] if after else [])
            self.state = type(state).stack(parts)

    def step(self) -> list[Row]:
        """One token for every row; returns the rows that finished (they have left the batch)."""
        done = [i for i, row in enumerate(self.rows) if row.cancel is not None and row.cancel.is_set()]
        for i in done:
            self.rows[i].finish = "cancelled"
        finished = self._leave(done)
        if not self.rows:
            return finished
        with torch.no_grad(), eval_mode(self.model):
            token, scores = self._choose()
            self._read(token)
            ended = []
            for i, row in enumerate(self.rows):
                row.tokens.append(int(token[id(row)]))
                row.history = torch.cat([row.history, token[id(row)].view(1, 1)], dim=1)
                if row.streamer is not None:
                    row.streamer.put(token[id(row)].view(1).cpu())
                stopped = int(token[id(row)]) in row.eos or (
                    row.stop is not None and bool(row.stop(row.history, scores[id(row)]).any())
                )
                if stopped or len(row.tokens) >= row.max_new_tokens:
                    row.finish = "stop" if stopped else "length"
                    ended.append(i)
            finished += self._leave(ended)
        return finished

    def _choose(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Each row's next token and its scores, by its own processors and generator (keyed by row)."""
        tokens, scores = {}, {}
        for i, row in enumerate(self.rows):
            row_scores = row.processors(row.history, self.state.next_token_logits[i : i + 1].clone())
            tokens[id(row)] = _choose(row_scores, row.do_sample, row.generator)[0]
            scores[id(row)] = row_scores
        return tokens, scores

    def _read(self, token: dict[int, torch.Tensor]) -> None:
        """Read each row's token: through the cache, where rows whose segment it fills also close it
        (writing their memory) and then get a fresh cache; rows without a cache are read by the forward
        pass (and then get one). Rows that keep their cache come first."""
        model, state = self.model, self.state
        closes = state.num_pending[: self.cached] + 1 >= model.config.segment_length  # the cached rows'
        cached = list(range(self.cached))
        kept = [i for i, close in enumerate(closes.tolist()) if not close]
        closed = [i for i in cached if i not in set(kept)]
        uncached = list(range(self.cached, len(self.rows)))
        parts, renewed = [], []  # renewed: states of the rows that need a fresh cache
        if cached:
            ids = torch.stack([token[id(self.rows[i])] for i in cached])
            active = torch.ones_like(ids, dtype=torch.bool)
            sub = state.select(cached) if uncached else state
            if closed:
                sub = _close_segments(model, sub, self.cache, ids, active, closes)
                renewed.append(sub.select(closed))
                if kept:
                    self.cache.select(kept)
                    parts.append(sub.select(kept))
            else:
                parts.append(sub.with_token_pending(ids, self.cache.step(ids, active), active))
        if not kept:
            self.cache = None
        self.cached = len(kept)
        if uncached:
            ids = torch.stack([token[id(self.rows[i])] for i in uncached])
            sub = state.select(uncached) if cached else state
            renewed.append(model(ids[:, None], state=sub, mode=self.mode, score=False).state)
        self.rows = [self.rows[i] for i in kept + closed + uncached]
        if renewed:
            renewed_state = renewed[0] if len(renewed) == 1 else type(state).stack(renewed)
            parts.append(renewed_state)
        self.state = parts[0] if len(parts) == 1 else type(state).stack(parts)
        if renewed:
            fresh = SegmentCache.build(model, renewed_state, self.mode)
            if fresh is not None and self._take_cache(fresh):
                self.cached += renewed_state.batch_size
            elif fresh is not None:  # caches that cannot merge: rebuild one over every row
                self.cache = SegmentCache.build(model, self.state, self.mode)
                self.cached = len(self.rows) if self.cache is not None else 0

    def _take_cache(self, cache: SegmentCache) -> bool:
        """Append `cache`'s rows after the cached ones; False when the caches cannot be merged."""
        if self.cache is None or self.cached == 0:
            self.cache = cache
            return True
        return self.cache.merge(cache)

    def _leave(self, indices: list[int]) -> list[Row]:
        """Take rows out of the batch, each with its own state."""
        if not indices:
            return []
        leaving = [self.rows[i] for i in indices]
        for i, row in zip(indices, leaving, strict=True):
            row.state = self.state.select([i]).compact()
            if row.streamer is not None:
                row.streamer.end()
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        kept_cached = [i for i in keep if i < self.cached]
        self.rows = [self.rows[i] for i in keep]
        if kept_cached and self.cache is not None:
            self.cache.select(kept_cached)
        else:
            self.cache = None
        self.cached = len(kept_cached) if self.cache is not None else 0
        self.state = self.state.select(keep) if keep else None
        return leaving

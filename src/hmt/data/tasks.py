"""A synthetic long-range recall task (in the spirit of BABILong), generated offline from a seed.

A sample is `num_segments` segments of random filler tokens. Facts "FACT key value" sit in some of the
first segments; the last segment asks "ASK key ... ANS" and the model must produce the value. Only that
answer token is scored. The question's key lies inside the first j tokens of its segment (where HMT
forms its recall query) and the answer after them, so the query never sees the answer. Facts sit in
the first half of their segment, so sensory memory (the last k tokens) never carries one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hmt.model import IGNORE_INDEX

PAD, FACT, ASK, ANS = 0, 1, 2, 3
FIRST_KEY = 4


@dataclass(frozen=True)
class RecallTask:
    segment_length: int = 16
    num_segments: int = 6  # per sample; the question is in the last one
    num_facts: int = 1  # facts per sample, each in its own segment, with distinct keys
    min_distance: int = 4  # the asked fact lies at least this many segments before the question
    num_keys: int = 16
    num_values: int = 16
    vocab_size: int = 96

    def __post_init__(self) -> None:
        if self.segment_length < 8:
            raise ValueError(f"segment_length must be >= 8, got {self.segment_length}")
        if self.num_segments < 2 or not 1 <= self.min_distance <= self.num_segments - 1:
            raise ValueError("need num_segments >= 2 and 1 <= min_distance <= num_segments - 1")
        if not 1 <= self.num_facts <= self.num_segments - 1 or self.num_facts > self.num_keys:
            raise ValueError("num_facts must be between 1 and min(num_segments - 1, num_keys)")
        if self.first_filler >= self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no filler tokens; raise it")

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.num_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.num_values

    @property
    def query_length(self) -> int:
        """j: the question's key ends here, the answer follows."""
        return self.segment_length // 2

    @property
    def answer_position(self) -> int:
        """Position (in the sample) of the answer token."""
        return (self.num_segments - 1) * self.segment_length + self.query_length + 1

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
        """One sample: token ids (num_segments * L,), the answer, and the segment holding the asked fact."""
        L, S = self.segment_length, self.num_segments
        ids = torch.randint(self.first_filler, self.vocab_size, (S * L,), generator=generator)
        latest_asked = S - 1 - self.min_distance
        asked_segment = int(torch.randint(0, latest_asked + 1, (1,), generator=generator))
        others = [s for s in range(S - 1) if s != asked_segment]
        order = torch.randperm(len(others), generator=generator)[: self.num_facts - 1].tolist()
        fact_segments = [asked_segment, *(others[i] for i in order)]
        keys = (torch.randperm(self.num_keys, generator=generator)[: self.num_facts] + FIRST_KEY).tolist()
        values = torch.randint(
            self.first_value, self.first_filler, (self.num_facts,), generator=generator
        ).tolist()
        for segment, key, value in zip(fact_segments, keys, values, strict=True):
            offset = int(torch.randint(0, L // 2 - 2, (1,), generator=generator))
            start = segment * L + offset
            ids[start : start + 3] = torch.tensor([FACT, key, value])
        question = (S - 1) * L + self.query_length - 2
        ids[question : question + 4] = torch.tensor([ASK, keys[0], ANS, values[0]])
        return ids, values[0], asked_segment

    def resized(self, window: int) -> RecallTask:
        """The same task with `window` tokens per sample (distances and fact counts capped to fit)."""
        if window % self.segment_length or window < 2 * self.segment_length:
            raise ValueError(
                f"recall task samples are whole segments of {self.segment_length} tokens, at least 2; got a "
                f"window of {window} tokens: train with segment_length={self.segment_length}"
            )
        segments = window // self.segment_length
        if segments == self.num_segments:
            return self
        return replace(
            self,
            num_segments=segments,
            min_distance=min(self.min_distance, segments - 1),
            num_facts=min(self.num_facts, segments - 1),
        )

    def batch(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, asked segment) for `batch_size` samples; labels score only the answers."""
        generator = torch.Generator().manual_seed(seed)
        samples = [self.sample(generator) for _ in range(batch_size)]
        ids = torch.stack([s[0] for s in samples])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, self.answer_position] = ids[:, self.answer_position]
        return ids, labels, torch.tensor([s[2] for s in samples])


class RecallTaskBatches:
    """Training batches of the recall task for `hmt.train.train` (independent samples, seeded by index)."""

    streaming = False

    def __init__(self, task: RecallTask, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.task, self.batch_size, self.seed, self.rank, self.world = task, batch_size, seed, rank, world

    def batch(self, index: int, window: int):
        """Samples as long as `window`, so an unroll curriculum also shortens the distances early on."""
        from hmt.train import Batch

        task = self.task.resized(window)
        ids, labels, _ = task.batch(
            self.batch_size, ((self.seed * 1_000_003) + index) * self.world + self.rank
        )
        return Batch(ids, labels, torch.ones(self.batch_size, dtype=torch.bool))

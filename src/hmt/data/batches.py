"""Training batches: independent random windows, or lanes of a long stream read in order (memory carried).

Which tokens a batch holds is a pure function of the batch index (and a lane position that checkpoints
save), so a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, window)
    labels: torch.Tensor  # (batch, window), -100 where not scored
    reset: torch.Tensor  # (batch,) bool: rows starting a new pass (their carried memory is emptied)
    attention_mask: torch.Tensor | None = None  # (batch, window): rows of different lengths, right-padded
    grad_segments: torch.Tensor | None = None  # (batch, segments) bool: the gradient shortcut (model.forward)
    answer_ids: torch.Tensor | None = None  # (batch, answer) recall tasks: the answer's tokens, -100 padded
    fact_segments: torch.Tensor | None = None  # (batch,) recall tasks: the segment that wrote the asked fact


class BatchSource(Protocol):
    streaming: bool  # True: consecutive batches continue the same texts, so memory is carried

    def batch(self, index: int, window: int) -> Batch: ...


def batch_seed(seed: int, index: int, rank: int = 0, world: int = 1) -> int:
    """The seed of batch `index` on process `rank` of `world`: distinct for every (seed, index, rank)."""
    return ((seed * 1_000_003) + index) * world + rank


class RandomWindows:
    """Independent windows at random places of a token stream; which ones is a function of (seed, index)."""

    streaming = False

    def __init__(
        self, stream: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.stream, self.batch_size, self.seed, self.rank, self.world = stream, batch_size, seed, rank, world

    def batch(self, index: int, window: int) -> Batch:
        if self.stream.shape[0] < window:
            raise ValueError(
                f"the training text has {self.stream.shape[0]} tokens, fewer than one sample ({window}): "
                "give more text or fewer/shorter segments"
            )
        generator = torch.Generator().manual_seed(batch_seed(self.seed, index, self.rank, self.world))
        starts = torch.randint(0, self.stream.shape[0] - window + 1, (self.batch_size,), generator=generator)
        ids = torch.stack([self.stream[s : s + window] for s in starts.tolist()])
        return Batch(ids, ids.clone(), torch.ones(self.batch_size, dtype=torch.bool))


class StreamLanes:
    """The stream cut into batch_size x world lanes, each read in order, one window per micro-batch.

    A lane that cannot fill the next window starts over from its beginning, with its memory reset.
    """

    streaming = True

    def __init__(self, stream: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.lane_length = stream.shape[0] // (batch_size * world)
        first = rank * batch_size
        self.lanes = [
            stream[(first + b) * self.lane_length : (first + b + 1) * self.lane_length]
            for b in range(batch_size)
        ]
        self.position = 0  # shared by all lanes: they advance together

    def batch(self, index: int, window: int) -> Batch:
        if self.lane_length < window:
            raise ValueError(
                f"the training text gives each of {len(self.lanes)} lanes {self.lane_length} tokens, fewer "
                f"than one sample ({window}): give more text, a smaller batch or fewer/shorter segments"
            )
        reset = self.position == 0 or self.position + window > self.lane_length
        if self.position + window > self.lane_length:
            self.position = 0
        ids = torch.stack([lane[self.position : self.position + window] for lane in self.lanes])
        self.position += window
        return Batch(ids, ids.clone(), torch.full((len(self.lanes),), reset))

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

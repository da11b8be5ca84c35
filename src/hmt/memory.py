"""`MemoryState`: everything HMT carries from one call to the next, held outside the model.

The model keeps weights only; a document's memory lives here, so callers can save, fork, reset or
batch it, and `model(chunk2, state=out1.state)` continues exactly where `chunk1` ended, wherever that
was: the tokens of an unfinished segment are carried (`pending_ids`) and read again with the next call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from hmt.io import load_tensors, save_tensors
from hmt.version import __version__

STATE_FORMAT = "hmt-memory-state"


@dataclass(frozen=True)
class MemoryState:
    """Memory of a batch of texts after some segments were read.

    Per-row quantities are right-aligned: the newest memory is `memories[:, -1]`, the last token of the
    closed segments is `recent_ids[:, -1]`; masks say which slots hold something (rows may have read
    different amounts). A segment is closed (its memory written, its tokens moved to `recent_ids`) when
    it holds L tokens; until then its tokens are pending.
    """

    memories: torch.Tensor  # (batch, slots, r * d) float32, slots <= cache_size: long-term memory cache
    memory_mask: torch.Tensor  # (batch, slots) bool: which slots hold a memory
    recent_ids: torch.Tensor  # (batch, t) long: the last t tokens of closed segments (sensory, causal query)
    recent_mask: torch.Tensor  # (batch, t) bool
    segments: torch.Tensor  # (batch,) long: segments closed so far
    tokens: torch.Tensor  # (batch,) long: tokens read so far, pending ones included
    next_token_logits: (
        torch.Tensor
    )  # (batch, vocab) float32: prediction for the next token (rows with tokens > 0)
    pending_ids: torch.Tensor | None = None  # (batch, p) long, p < L: the unfinished segment's tokens
    pending_mask: torch.Tensor | None = None  # (batch, p) bool

    def __post_init__(self) -> None:
        if self.pending_ids is None:  # no unfinished segment (also: a state saved before they were carried)
            batch, device = self.segments.shape[0], self.segments.device
            object.__setattr__(self, "pending_ids", torch.zeros(batch, 0, dtype=torch.long, device=device))
            object.__setattr__(self, "pending_mask", torch.zeros(batch, 0, dtype=torch.bool, device=device))

    @classmethod
    def empty(
        cls,
        batch_size: int,
        memory_width: int,
        tokens_kept: int,
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> MemoryState:
        """The state of a fresh document: nothing read, nothing remembered."""
        return cls(
            memories=torch.zeros(batch_size, 0, memory_width, device=device),
            memory_mask=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            recent_ids=torch.zeros(batch_size, tokens_kept, dtype=torch.long, device=device),
            recent_mask=torch.zeros(batch_size, tokens_kept, dtype=torch.bool, device=device),
            segments=torch.zeros(batch_size, dtype=torch.long, device=device),
            tokens=torch.zeros(batch_size, dtype=torch.long, device=device),
            next_token_logits=torch.zeros(batch_size, vocab_size, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.segments.shape[0]

    @property
    def num_pending(self) -> torch.Tensor:
        """(batch,) long: tokens of the unfinished segment per row."""
        return self.pending_mask.sum(dim=1)

    def pending_tokens(self, row: int) -> torch.Tensor:
        """The unfinished segment's tokens of one row (1-D)."""
        return self.pending_ids[row][self.pending_mask[row]]

    @property
    def num_memories(self) -> torch.Tensor:
        """(batch,) long: memories held in the cache per row."""
        return self.memory_mask.sum(dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (truncated backpropagation across calls)."""
        return MemoryState(**{name: t.detach() for name, t in self.tensors().items()})

    def to(self, device: torch.device | str) -> MemoryState:
        return MemoryState(**{name: t.to(device) for name, t in self.tensors().items()})

    def floating_as(self, dtype: torch.dtype) -> MemoryState:
        """The same state with its floating tensors (memories, carried logits) in `dtype`."""
        return MemoryState(
            **{name: t.to(dtype) if t.is_floating_point() else t for name, t in self.tensors().items()}
        )

    def select(self, rows: torch.Tensor | list[int]) -> MemoryState:
        """The state of some rows of the batch (e.g. to continue one document of several)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.segments.device)
        return MemoryState(**{name: t.index_select(0, index) for name, t in self.tensors().items()})

    @classmethod
    def stack(cls, states: list[MemoryState]) -> MemoryState:
        """The rows of several states as one batch (right-aligned per-row quantities left-padded)."""

        def left_padded(name: str) -> torch.Tensor:
            tensors = [getattr(s, name) for s in states]
            width = max(t.shape[1] for t in tensors)
            return torch.cat([torch.cat([t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:]), t], 1)
                              for t in tensors])  # fmt: skip

        aligned = ("memories", "memory_mask", "recent_ids", "recent_mask", "pending_ids", "pending_mask")
        return cls(
            **{name: left_padded(name) for name in aligned},
            **{name: torch.cat([getattr(s, name) for s in states]) for name in ("segments", "tokens",
                                                                                 "next_token_logits")},
        )  # fmt: skip

    def compact(self) -> MemoryState:
        """The same state without columns that are empty in every row (a row taken out of a batch)."""
        state = self._trimmed()
        empty = int((~state.pending_mask.any(dim=0)).long().cumprod(dim=0).sum())
        return replace(
            state, pending_ids=state.pending_ids[:, empty:], pending_mask=state.pending_mask[:, empty:]
        )

    def reset(self, rows: torch.Tensor) -> MemoryState:
        """The same state with the rows where `rows` (batch,) bool is True emptied (a new document starts)."""
        keep = ~rows.to(self.segments.device)
        state = MemoryState(
            memories=self.memories * keep[:, None, None],
            memory_mask=self.memory_mask & keep[:, None],
            recent_ids=self.recent_ids * keep[:, None],
            recent_mask=self.recent_mask & keep[:, None],
            segments=self.segments * keep,
            tokens=self.tokens * keep,
            next_token_logits=self.next_token_logits * keep[:, None],
            pending_ids=self.pending_ids * keep[:, None],
            pending_mask=self.pending_mask & keep[:, None],
        )
        return state._trimmed()

    def forget(self) -> MemoryState:
        """The same state with an empty memory cache: the text read so far (recent tokens, the carried
        prediction) is kept, the memories are not. Used to evaluate memory reset every few segments."""
        return replace(self, memories=self.memories[:, :0], memory_mask=self.memory_mask[:, :0])

    def _trimmed(self) -> MemoryState:
        """Drop cache slots that are empty in every row (they sit on the left)."""
        first = 0
        while first < self.memory_mask.shape[1] and not bool(self.memory_mask[:, first].any()):
            first += 1
        return replace(self, memories=self.memories[:, first:], memory_mask=self.memory_mask[:, first:])

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (atomically), e.g. to resume a document later."""
        save_tensors(path, self.tensors(), {"format": STATE_FORMAT, "hmt_version": __version__})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> MemoryState:
        tensors, _ = load_tensors(path, STATE_FORMAT)
        names = {f.name for f in fields(cls)}
        if not set(tensors) & PENDING_FIELDS:
            names -= PENDING_FIELDS  # saved before unfinished segments were carried: it has none
        if set(tensors) != names:
            raise ValueError(
                f"{path} does not hold a complete memory state: missing {sorted(names - set(tensors))}, "
                f"unexpected {sorted(set(tensors) - names)}"
            )
        state = cls(**tensors)
        try:
            state.check_contents()
        except ValueError as err:
            raise ValueError(f"{path} is not a usable memory state: {err}") from None
        return state.to(device) if device is not None else state

    def check_contents(self) -> None:
        """Refuse a state whose tensors disagree in shape or type, or hold NaN or infinite memories: such a
        state would read as garbage. (`load` checks this; `check_vocabulary` what needs the model.)"""
        batch = self.segments.shape[0]
        expected = {
            "memories": (3, True), "memory_mask": (2, False), "recent_ids": (2, False),
            "recent_mask": (2, False), "segments": (1, False), "tokens": (1, False),
            "next_token_logits": (2, True), "pending_ids": (2, False), "pending_mask": (2, False),
        }  # fmt: skip
        for name, (dims, floating) in expected.items():
            tensor = getattr(self, name)
            if tensor.dim() != dims or tensor.shape[0] != batch or tensor.is_floating_point() != floating:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, which does not fit a "
                    f"state of {batch} rows"
                )
        if any(m.dtype != torch.bool for m in (self.memory_mask, self.recent_mask, self.pending_mask)):
            raise ValueError("memory_mask, recent_mask and pending_mask must be boolean")
        if (
            self.memory_mask.shape != self.memories.shape[:2]
            or self.recent_mask.shape != self.recent_ids.shape
            or self.pending_mask.shape != self.pending_ids.shape
        ):
            raise ValueError("the masks do not match the memories and recent tokens they describe")
        if not bool(torch.isfinite(self.memories[self.memory_mask]).all()):
            raise ValueError("it holds NaN or infinite memories")
        if not bool(torch.isfinite(self.next_token_logits).all()):
            raise ValueError("its carried prediction holds NaN or infinite logits")
        if bool((self.segments < 0).any()) or bool((self.tokens < 0).any()):
            raise ValueError("it counts a negative number of segments or tokens")

    def check_fits(
        self, memory_width: int, tokens_kept: int, vocab_size: int, cache_size: int, segment_length: int
    ) -> None:
        """Refuse a state another model made: memory width, recent tokens kept, vocabulary, more memories
        than the cache holds, an unfinished segment the model's segments would have closed."""
        if self.memories.shape[2] != memory_width or self.recent_ids.shape[1] != tokens_kept:
            raise ValueError(
                f"state was made by a model with memory width {self.memories.shape[2]} that keeps "
                f"{self.recent_ids.shape[1]} recent tokens; this model has {memory_width} and keeps "
                f"{tokens_kept} (num_sensory and the causal query's summary_length)"
            )
        if self.next_token_logits.shape[1] != vocab_size:
            raise ValueError(
                f"state was made for a vocabulary of {self.next_token_logits.shape[1]}, this backbone has "
                f"{vocab_size}"
            )
        if self.memories.shape[1] > cache_size:
            raise ValueError(
                f"state holds {self.memories.shape[1]} memories, over this model's cache_size of "
                f"{cache_size}: it was made with another configuration"
            )
        if self.pending_ids.shape[1] >= segment_length:
            raise ValueError(
                f"state holds {self.pending_ids.shape[1]} tokens of an unfinished segment, which this "
                f"model's segments of {segment_length} would have closed"
            )
        self.check_vocabulary(vocab_size)  # the rest of its contents is checked when it is loaded

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse recent token ids outside [0, vocab_size): the state was made with another backbone."""
        ids = torch.cat([self.recent_ids[self.recent_mask], self.pending_ids[self.pending_mask]])
        if bool(((ids < 0) | (ids >= vocab_size)).any()):
            raise ValueError(
                f"the state's recent tokens hold ids outside this backbone's vocabulary [0, {vocab_size}): "
                "it was made with another backbone"
            )

    # ---- transitions used by the model after each segment; each returns a new state ----

    def with_memory(self, new_memories: torch.Tensor, active: torch.Tensor, cache_size: int) -> MemoryState:
        """Append `new_memories` (batch, r * d) for the `active` rows; evict the oldest beyond `cache_size`.

        Inactive rows (no tokens in this segment) keep their cache; to stay right-aligned they gain an
        empty slot on the left instead.
        """
        batch = self.memories.shape[0]
        empty_slot = self.memories.new_zeros(batch, 1, self.memories.shape[2])
        no_slot = self.memory_mask.new_zeros(batch, 1)
        appended = torch.cat([self.memories, new_memories[:, None, :].to(self.memories.dtype)], dim=1)
        shifted = torch.cat([empty_slot, self.memories], dim=1)
        memories = torch.where(active[:, None, None], appended, shifted)
        mask = torch.where(
            active[:, None],
            torch.cat([self.memory_mask, active[:, None]], dim=1),
            torch.cat([no_slot, self.memory_mask], dim=1),
        )
        keep_from = max(memories.shape[1] - cache_size, 0)  # evict the oldest beyond the cache size
        return replace(self, memories=memories[:, keep_from:], memory_mask=mask[:, keep_from:])._trimmed()

    def with_segment_read(
        self, segment_ids: torch.Tensor, segment_lengths: torch.Tensor, closed: torch.Tensor
    ) -> MemoryState:
        """Account for a segment of `segment_lengths` tokens per row (right-padded `segment_ids`, the
        unfinished segment's tokens included): rows where `closed` (batch,) bool is set close it (its
        tokens become recent, nothing is pending); the other rows with tokens keep them pending."""
        width = segment_ids.shape[1]
        positions = torch.arange(width, device=segment_ids.device)
        valid = positions[None, :] < segment_lengths[:, None]
        recent_ids, recent_mask = _last_valid(
            torch.cat([self.recent_ids, segment_ids], dim=1), self.recent_mask, valid & closed[:, None]
        )
        opened = (segment_lengths > 0) & ~closed
        pending_ids, pending_mask = _last_valid(  # right-aligned, as every per-row quantity here
            torch.cat([torch.zeros_like(segment_ids), segment_ids], dim=1),
            valid.new_zeros(valid.shape),
            valid & opened[:, None],
        )
        untouched = segment_lengths == 0  # rows whose text ended at an earlier step keep what they had
        pending_ids, pending_mask = _merge_rows(
            untouched, (self.pending_ids, self.pending_mask), (pending_ids, pending_mask)
        )
        return replace(
            self,
            recent_ids=recent_ids,
            recent_mask=recent_mask,
            segments=self.segments + closed.long(),
            pending_ids=pending_ids,
            pending_mask=pending_mask,
        )

    def with_token_pending(
        self, token: torch.Tensor, logits: torch.Tensor, active: torch.Tensor
    ) -> MemoryState:
        """One more token (batch,) added to the unfinished segment of the `active` rows, with the prediction
        that follows it (batch, vocab): generation's step within a segment, read through a KV cache."""
        batch, width = self.pending_ids.shape
        zeros = self.pending_mask.new_zeros(batch, width + 1)
        ids, mask = _last_valid(
            torch.cat(
                [self.pending_ids.new_zeros(batch, width + 1), self.pending_ids, token[:, None]], dim=1
            ),
            zeros,
            torch.cat([self.pending_mask, active[:, None]], dim=1),
        )
        empty_columns = int((~mask.any(dim=0)).long().cumprod(dim=0).sum())
        return replace(
            self,
            pending_ids=ids[:, empty_columns:],
            pending_mask=mask[:, empty_columns:],
            tokens=self.tokens + active.long(),
            next_token_logits=torch.where(active[:, None], logits.float(), self.next_token_logits),
        )

    def with_tokens_counted(self, new_tokens: torch.Tensor) -> MemoryState:
        """The state after `new_tokens` (batch,) more tokens were read."""
        return replace(self, tokens=self.tokens + new_tokens)


PENDING_FIELDS = {"pending_ids", "pending_mask"}


def _merge_rows(
    take_first: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned (ids, mask) pairs of two widths merged row-wise: `first` where `take_first`."""
    width = max(first[0].shape[1], second[0].shape[1])
    first, second = (tuple(_left_pad(t, width) for t in pair) for pair in (first, second))
    ids = torch.where(take_first[:, None], first[0], second[0])
    mask = torch.where(take_first[:, None], first[1], second[1])
    empty_columns = int((~mask.any(dim=0)).long().cumprod(dim=0).sum())  # all-empty columns on the left
    return ids[:, empty_columns:], mask[:, empty_columns:]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0))


def _last_valid(
    ids: torch.Tensor, old_mask: torch.Tensor, new_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align the valid entries of `ids` per row and keep the last `old_mask.shape[1]` of them."""
    width = old_mask.shape[1]
    mask = torch.cat([old_mask, new_mask], dim=1)  # (batch, k + L)
    if width == 0:
        return ids[:, :0], mask[:, :0]
    count = mask.sum(dim=1, keepdim=True)
    rank = mask.long().cumsum(dim=1) - 1  # position among the valid entries of the row
    target = rank - count + width  # column in the right-aligned result; < 0 falls off the left
    keep = mask & (target >= 0)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    out_ids = ids.new_zeros(ids.shape[0], width)
    out_mask = mask.new_zeros(ids.shape[0], width)
    out_ids[rows[keep], target[keep]] = ids[keep]
    out_mask[rows[keep], target[keep]] = True
    return out_ids, out_mask

"""The inputs of a forward call, checked and packed: each row's tokens moved to the left (right padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmt.config import IGNORE_INDEX


@dataclass(frozen=True)
class PackedInputs:
    """Inputs with each row's tokens moved to the left (right padding), as the segment loop reads them."""

    ids: torch.Tensor  # (batch, seq_len) long, 0 after each row's tokens
    targets: torch.Tensor  # (batch, seq_len) long, IGNORE_INDEX after each row's tokens
    lengths: torch.Tensor  # (batch,) long: tokens per row
    offsets: torch.Tensor  # (batch,) long: input position = offset + packed position (< 0: pending tokens)
    pending: torch.Tensor | None = None  # (batch,) long: the unfinished segment's tokens put first, unscored

    @property
    def new_tokens(self) -> torch.Tensor:
        """(batch,) long: tokens of this call per row (the carried pending ones excluded)."""
        return self.lengths if self.pending is None else self.lengths - self.pending

    def after_pending(self, pending_ids: torch.Tensor, pending_mask: torch.Tensor) -> PackedInputs:
        """These inputs continuing an unfinished segment: each row's pending tokens (right-aligned
        `pending_ids`, `pending_mask`) are put first, unscored, so segments are cut where they would be
        in one call over the whole stream."""
        counts = pending_mask.sum(dim=1)
        if not bool(counts.any()):
            return self
        batch, width = self.ids.shape[0], self.ids.shape[1] + int(counts.max())
        ids = self.ids.new_zeros(batch, width)
        targets = self.targets.new_full((batch, width), IGNORE_INDEX)
        for row in range(batch):
            before, count, length = (
                pending_ids[row][pending_mask[row]],
                int(counts[row]),
                int(self.lengths[row]),
            )
            ids[row, :count] = before
            ids[row, count : count + length] = self.ids[row, :length]
            targets[row, count : count + length] = self.targets[row, :length]
        return PackedInputs(ids, targets, self.lengths + counts, self.offsets - counts, counts)

    def segment(self, step: int, segment_length: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Segment `step`: its first packed position, its ids (batch, <= L) and valid tokens per row (batch,)."""
        start = step * segment_length
        lengths = (self.lengths - start).clamp(0, segment_length)
        return start, self.ids[:, start : start + segment_length], lengths


def pack_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab_size: int,
) -> PackedInputs:
    """Validate the inputs of a forward call and move each row's tokens to the left."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a 2-D tensor (batch, seq_len), got {shape}; add a batch dimension"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(
            f"empty input: input_ids has shape {tuple(input_ids.shape)}; give at least one token"
        )
    device = input_ids.device
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        mask = attention_mask.to(device).bool()
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    lengths = mask.sum(dim=1)
    if int(lengths.sum()) == 0:
        raise ValueError("empty input: attention_mask marks no tokens")
    starts = mask.long().argmax(dim=1)  # first token of each row (0 for empty rows)
    positions = torch.arange(seq_len, device=device)
    expected = (positions[None, :] >= starts[:, None]) & (positions[None, :] < (starts + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError(
            "attention_mask must mark one contiguous run of tokens per row (left or right padding); "
            "split texts with gaps into separate rows"
        )
    vocab = vocab_size
    real = input_ids[mask]
    if bool(((real < 0) | (real >= vocab)).any()):
        bad = real[(real < 0) | (real >= vocab)][0].item()
        raise ValueError(
            f"token id {bad} is outside the backbone's vocabulary [0, {vocab}); "
            "was the text tokenized with another model's tokenizer?"
        )
    targets = input_ids if labels is None else labels.to(device)
    if labels is not None:
        real_labels = targets[mask]
        bad_labels = (real_labels != IGNORE_INDEX) & ((real_labels < 0) | (real_labels >= vocab))
        if bool(bad_labels.any()):
            raise ValueError(
                f"label {real_labels[bad_labels][0].item()} is outside the vocabulary [0, {vocab}) "
                f"and is not the ignore index {IGNORE_INDEX}"
            )
    # Gather each row's tokens to the front: packed position p reads input position start + p.
    source = (starts[:, None] + positions[None, :]).clamp(max=seq_len - 1)
    inside = positions[None, :] < lengths[:, None]
    ids = torch.where(inside, input_ids.gather(1, source), 0).long()
    packed_targets = torch.where(inside, targets.gather(1, source), IGNORE_INDEX).long()
    return PackedInputs(ids=ids, targets=packed_targets, lengths=lengths, offsets=starts)


def logits_kept(seq_len: int, segment_length: int, return_logits: bool, num_logits: int | None) -> int:
    """How many of the last input positions get their logits returned."""
    if return_logits:
        return seq_len
    if num_logits is None:
        return min(seq_len, segment_length)
    if isinstance(num_logits, int) and not isinstance(num_logits, bool) and num_logits >= 0:
        return min(seq_len, num_logits)
    raise ValueError(f"num_logits must be a non-negative integer or None, got {num_logits!r}")


def recorded_steps(grad_segments: torch.Tensor | None, batch: int, num_steps: int) -> list[bool]:
    """Per segment step: whether it is recorded for backward (grad enabled and marked in some row)."""
    enabled = torch.is_grad_enabled()
    if grad_segments is None:
        return [enabled] * num_steps
    if (
        not isinstance(grad_segments, torch.Tensor)
        or grad_segments.dtype != torch.bool
        or tuple(grad_segments.shape) != (batch, num_steps)
    ):
        raise ValueError(
            f"grad_segments must be a bool tensor of shape (batch, segments) = ({batch}, {num_steps}), got "
            f"{getattr(grad_segments, 'shape', grad_segments)!r}"
        )
    return [enabled and bool(marked) for marked in grad_segments.any(dim=0).tolist()]


def padding_mask(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of right-padded rows, or None when no row is padded."""
    positions = torch.arange(inputs.shape[1], device=inputs.device)
    mask = (positions[None, :] < lengths[:, None]).long()
    return None if bool(mask.all()) else mask

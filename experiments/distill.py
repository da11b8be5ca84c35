"""Context distillation: a dense training target for what memory should carry, as a training term.

The language-model loss tells memory little about the previous segments: the next token is mostly
predictable from the segment itself. Here the teacher is the same model's backbone (with its LoRA, no
memory) reading the training window as one plain long window, after up to `context` raw tokens read
before it; the student is the model as trained (memory, sensory tokens, or neither, by mode), reading
segment by segment. The KL divergence from teacher to student, position by position, asks the student
to predict as if it still saw the text that its memory has read. Every arm of a comparison gets the
same teacher, so the soft targets themselves cannot pass for a gain of memory.

It measured no gain on SmolLM2-135M (docs/lab-notebook.md), so it lives here, outside the library, and
plugs into `hmt.train.train` (or `hmt.runs.train_run`) as its `auxiliary` term: `Distillation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hmt.backbone import eval_mode
from hmt.config import IGNORE_INDEX
from hmt.data import Batch

if TYPE_CHECKING:
    from hmt.model import HMTForCausalLM, HMTOutput

KL_BLOCK = 64  # positions per float32 block (x batch x vocab): 64 x 2 x 49,152 floats = 25 MB


class Distillation:
    """`hmt.train.AuxiliaryLoss`: KL(teacher || student) per micro-batch, added to the loss `weight` times.

    The teacher reads, before each window, the tail (at most `context` tokens) of what the row's carried
    memory has read: the windows since its last reset. The history is kept here, per row: a row whose
    `batch.reset` is set starts empty, then every window is appended after use. Random windows (reset
    every batch) therefore get no history. `positions`: distil only the first this many positions of
    each segment (None: all).

    The training log's `distill_kl` is the KL itself (unweighted), as in the lab notebook. A resumed run
    starts with empty histories (they are not in the checkpoints), so its first windows' teacher reads
    less than an uninterrupted run's would.
    """

    name = "distill_kl"
    needs_logits = True

    def __init__(self, weight: float, context: int = 768, positions: int | None = None) -> None:
        if not weight >= 0:  # NaN fails too
            raise ValueError(f"distill_weight must be >= 0, got {weight}")
        if context < 1:
            raise ValueError(f"distill_context must be >= 1 token, got {context}")
        if positions is not None and positions < 1:
            raise ValueError(f"distill_positions must be >= 1 or None (all), got {positions}")
        self.weight, self.context, self.positions = float(weight), int(context), positions
        self.tails: list[torch.Tensor] = []  # per row: the last <= context tokens its memory has read

    def history(self, batch: Batch) -> torch.Tensor:
        """(batch, h): the tokens just before each row's window that its memory has read, the same number
        h for every row (the shortest row's), so that one teacher pass reads them all."""
        rows = batch.input_ids.shape[0]
        empty = batch.input_ids.new_zeros(0).cpu()
        tails = self.tails if len(self.tails) == rows else [empty] * rows
        tails = [empty if bool(reset) else tail for tail, reset in zip(tails, batch.reset, strict=True)]
        kept = min(len(tail) for tail in tails)
        return torch.stack([tail[len(tail) - kept :] for tail in tails])

    def remember(self, batch: Batch) -> None:
        """Append each row's window to its history (emptied first where the row was reset)."""
        windows = batch.input_ids.cpu()
        carried = len(self.tails) == len(windows)
        self.tails = [
            torch.cat([self.tails[row], window] if carried and not bool(reset) else [window])[-self.context :]
            for row, (window, reset) in enumerate(zip(windows, batch.reset, strict=True))
        ]

    def __call__(
        self, model: HMTForCausalLM, batch: Batch, labels: torch.Tensor, out: HMTOutput
    ) -> torch.Tensor | None:
        """The KL of one micro-batch (None when no position is scored); then the window is remembered."""
        history = self.history(batch)
        self.remember(batch)
        ids = batch.input_ids.to(labels.device)
        kl = distillation_loss(
            model.backbone,
            ids,
            history.to(ids.device),
            labels,
            out.logits,
            model.config.segment_length,
            self.positions,
        )
        return kl


def distilled_positions(labels: torch.Tensor, segment_length: int, positions: int | None) -> torch.Tensor:
    """Input positions distilled: the first `positions` of each segment (None: all), except the last
    input position (it predicts past the input), where some row's target is scored in `labels`."""
    seq_len = labels.shape[1]
    offsets = torch.arange(seq_len - 1, device=labels.device)
    if positions is not None:
        offsets = offsets[offsets % segment_length < positions]
    return offsets[(labels[:, offsets + 1] != IGNORE_INDEX).any(dim=0)]


def distillation_loss(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    history: torch.Tensor,
    labels: torch.Tensor,
    student_logits: torch.Tensor,
    segment_length: int,
    positions: int | None = None,
) -> torch.Tensor | None:
    """Mean KL(teacher || student) over the distilled positions of `input_ids`.

    input_ids, labels: (batch, seq_len), segments from position 0, no padding. history: (batch, h) the
    tokens just before input_ids that the student's memory has read (h may be 0). student_logits:
    (batch, seq_len, vocab), position t predicting token t + 1. The teacher reads history and input in
    one causal pass with gradients off and dropout off, so a position of segment n sees the h history
    tokens and every input token before it. `positions`: distil only the first this many positions of
    each segment (None: all). A position counts in a row where its target (the next input token) is
    scored in `labels`. Returns None when no position counts.
    """
    batch, seq_len = input_ids.shape
    if history.shape[0] != batch or student_logits.shape[:2] != (batch, seq_len):
        raise ValueError(
            f"history {tuple(history.shape)} and student logits {tuple(student_logits.shape)} must match "
            f"input_ids {tuple(input_ids.shape)} (history: batch first; logits: one row per input position)"
        )
    kept = distilled_positions(labels, segment_length, positions)
    if len(kept) == 0:
        return None
    offset = history.shape[1]
    with torch.no_grad(), eval_mode(backbone):
        teacher = backbone(
            input_ids=torch.cat([history.to(input_ids.device), input_ids], dim=1),
            logits_to_keep=offset + kept,
            use_cache=False,
        ).logits  # (batch, len(kept), vocab)
    scored = labels[:, kept + 1] != IGNORE_INDEX
    weights = scored.float() / scored.sum()
    return _BlockwiseKL.apply(student_logits, teacher, kept, weights)


class _BlockwiseKL(torch.autograd.Function):
    """sum over (row, j) of weights[row, j] * KL(softmax(teacher[row, j]) || softmax(student[row, kept[j]])),
    in float32 blocks of positions, with the gradient (softmax(student) - softmax(teacher)) * weight
    made in the same pass. Done by autograd, the (batch, positions, vocab) intermediates cost several
    times the time of the teacher's own forward pass on a 2-core CPU."""

    @staticmethod
    def forward(ctx, student, teacher, kept, weights):
        grad = torch.zeros_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for block in range(0, len(kept), KL_BLOCK):
            index = kept[block : block + KL_BLOCK]
            w = weights[:, block : block + KL_BLOCK, None]
            student_log_probs = F.log_softmax(student[:, index].float(), dim=-1)
            teacher_log_probs = F.log_softmax(teacher[:, block : block + KL_BLOCK].float(), dim=-1)
            teacher_probs = teacher_log_probs.exp()
            total += (w * teacher_probs * (teacher_log_probs - student_log_probs)).sum()
            grad[:, index] = (w * (student_log_probs.exp() - teacher_probs)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None

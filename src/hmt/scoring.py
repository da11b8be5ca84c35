"""Scoring: every token of the input against the prediction before it, without keeping all logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmt.config import IGNORE_INDEX
from hmt.inputs import PackedInputs
from hmt.memory import MemoryState

CE_BLOCK = 2048  # rows of logits turned into float32 at once when scoring


class TokenScores:
    """Turns per-segment logits into token losses, the returned logits and the carried prediction.

    Logits at packed position p predict the token at p + 1; the last position of a row predicts past
    the input and is carried in the state to score the first token of the next call.
    """

    def __init__(
        self, packed: PackedInputs, state: MemoryState, keep_logits: int, seq_len: int, score: bool = True
    ) -> None:
        self.packed = packed
        self.keep_logits = keep_logits
        self.seq_len = seq_len
        self.rows: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []  # packed positions of the scored tokens
        self.losses: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None
        self.next_logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The first token of a continuing row is scored with the prediction carried in the state (unless an
        # unfinished segment is read again first: its last token predicts it afresh).
        pending = packed.pending if packed.pending is not None else torch.zeros_like(packed.lengths)
        continuing = torch.nonzero((state.tokens > 0) & (packed.lengths > 0) & (pending == 0)).flatten()
        if score and len(continuing):
            self._score(continuing, torch.zeros_like(continuing), state.next_token_logits[continuing])

    def _score(self, rows: torch.Tensor, target_positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Score the tokens at (rows, target_positions) against `logits`; positions past a row are skipped."""
        inside = target_positions < self.packed.lengths[rows]
        targets = torch.where(
            inside,
            self.packed.targets[rows, target_positions.clamp(max=self.packed.ids.shape[1] - 1)],
            IGNORE_INDEX,
        )
        scored = targets != IGNORE_INDEX
        if not bool(scored.any()):
            return
        # In float32 for accuracy, a block of rows at a time: no copy of the logits beyond one fp32 block.
        losses = torch.cat(
            [
                F.cross_entropy(logits[i : i + CE_BLOCK].float(), targets[i : i + CE_BLOCK], reduction="none")
                for i in range(0, len(targets), CE_BLOCK)
            ]
        )
        self.rows.append(rows[scored])
        self.positions.append(target_positions[scored])
        self.losses.append(losses[scored])

    def add_segment(
        self, start: int, seg_lengths: torch.Tensor, logits: torch.Tensor, ending: torch.Tensor | None = None
    ) -> None:
        """logits: (sum(seg_lengths), vocab) for the active rows' segment positions, row by row; or, given
        `ending` (rows whose input ends in this segment, read without scoring), each such row's last one."""
        active = torch.nonzero(seg_lengths > 0).flatten()
        if ending is not None:
            ended = active[ending[active]]
            if len(ended):
                self.next_logits.append((ended, logits))
            return
        counts = seg_lengths[active]
        rows = torch.repeat_interleave(active, counts)
        offsets = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        positions = start + offsets  # packed position of each logit
        self._score(rows, positions + 1, logits)
        last = positions + 1 == self.packed.lengths[rows]  # each row's last token predicts past the input
        if bool(last.any()):
            self.next_logits.append((rows[last], logits[last]))
        self._keep_logits(rows, positions, logits)

    def _keep_logits(self, rows: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        input_positions = self.packed.offsets[rows] + positions
        first_kept = self.seq_len - self.keep_logits
        kept = input_positions >= first_kept
        if self.keep_logits == 0 or not bool(kept.any()):
            return
        if self.logits is None:
            self.logits = logits.new_zeros(self.packed.ids.shape[0], self.keep_logits, logits.shape[1])
        self.logits = self.logits.index_put((rows[kept], input_positions[kept] - first_kept), logits[kept])

    def carry_prediction(self, state: MemoryState) -> MemoryState:
        """The state with each row's prediction for the token after its input."""
        if not self.next_logits:
            return state
        rows = torch.cat([r for r, _ in self.next_logits])
        logits = torch.cat([v for _, v in self.next_logits]).float()
        carried = state.next_token_logits.index_put((rows,), logits)
        return MemoryState(**{**state.tensors(), "next_token_logits": carried})

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch, width = self.packed.ids.shape
        device = self.packed.ids.device
        packed_losses = torch.zeros(batch, width, device=device)
        packed_mask = torch.zeros(batch, width, dtype=torch.bool, device=device)
        loss = None
        if self.losses:
            rows, positions = torch.cat(self.rows), torch.cat(self.positions)
            losses = torch.cat(self.losses)
            packed_losses = packed_losses.index_put((rows, positions), losses)
            packed_mask[rows, positions] = True
            loss = losses.mean()
        # Back to input positions: packed position p of row b is input position offsets[b] + p.
        positions = torch.arange(self.seq_len, device=device)
        source = (positions[None, :] - self.packed.offsets[:, None]).clamp(0, width - 1)
        in_row = positions[None, :] >= self.packed.offsets[:, None]
        token_losses = torch.where(in_row, packed_losses.gather(1, source), 0.0)
        token_mask = in_row & packed_mask.gather(1, source)
        return loss, token_losses, token_mask, self.logits

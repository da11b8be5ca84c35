"""The parameters HMT adds to a backbone, and the recall that turns a query into a mix of memories."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hmt.config import MAX_RECALL_TEMPERATURE


class MemoryParameters(nn.Module):
    """T (summary prompt), m0 (initial memory), W_q and W_k; kept in float32 whatever the backbone runs in.

    `output_dim` is the width of the backbone's final hidden states. When it differs from the embedding
    width d, a projection (`output_proj`) brings written memories into embedding space.
    A memory is a group of `memory_tokens` (r) embeddings, held flat: width r * d (m0 included).
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        output_dim: int,
        recall_dim: int,
        embedding_std: float,
        memory_tokens: int = 1,
        memory_norm: str = "learned",
        recall_norm: bool = True,
        recall_init: str = "similarity",
        recall_temperature: float | None = None,
        sink_init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.memory_tokens = memory_tokens
        self.recall_dim = recall_dim
        self.memory_norm = memory_norm
        self.recall_norm = recall_norm
        # T and m0 look like token embeddings: normal, scaled by the backbone's embedding spread.
        self.summary_prompt = nn.Parameter(torch.randn(embedding_dim) * embedding_std)
        self.initial_memory = nn.Parameter(torch.randn(memory_tokens * embedding_dim) * embedding_std)
        if sink_init is not None:  # the fixed first position (HMTConfig.attention_sink)
            self.sink = nn.Parameter(sink_init.detach().float().clone())
        self.query_proj = nn.Linear(output_dim, recall_dim, bias=False)
        self.key_proj = nn.Linear(embedding_dim, recall_dim, bias=False)
        if recall_init == "similarity" and output_dim == embedding_dim:
            with torch.no_grad():  # (S W_q)(M W_q)^T ~ S . M: recall starts by similarity
                self.key_proj.weight.copy_(self.query_proj.weight)
        self.output_proj = (
            nn.Linear(output_dim, embedding_dim, bias=False) if output_dim != embedding_dim else None
        )
        # Mean norm of the backbone's token embeddings: the scale memories are brought to. Measured
        # again from the backbone whenever the model is built, so not saved.
        self.register_buffer("embedding_norm", torch.tensor(1.0), persistent=False)
        if memory_norm == "learned":
            self.memory_scale = nn.Parameter(torch.tensor(1.0))
        if recall_temperature is not None:  # bounded scores (HMTConfig.recall_temperature)
            self.recall_log_temperature = nn.Parameter(torch.tensor(math.log(recall_temperature)))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden state (..., output_dim) -> embedding width (..., d), float32, before any rescaling."""
        hidden = hidden.to(self.key_proj.weight.dtype)
        return self.output_proj(hidden) if self.output_proj is not None else hidden

    def calibrate(self, embedding_norm: float, hidden_norm: float) -> None:
        """Record the measured norms; the learned scale starts at their ratio (memory at embedding scale)."""
        with torch.no_grad():
            self.embedding_norm.fill_(embedding_norm)
            if self.memory_norm == "learned":
                self.memory_scale.fill_(embedding_norm / hidden_norm)

    @property
    def memory_width(self) -> int:
        """Width of one cached memory: r embeddings held flat."""
        return self.memory_tokens * self.embedding_dim

    def to_memory(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states at the r write slots (..., r, output_dim) -> one memory (..., r * d), float32."""
        memory = self.project(hidden)
        if self.memory_norm == "learned":
            memory = memory * self.memory_scale
        return memory.flatten(-2)

    def as_tokens(self, memory: torch.Tensor) -> torch.Tensor:
        """One memory (..., r * d) -> its r embeddings (..., r, d), as the backbone reads them."""
        return memory.unflatten(-1, (self.memory_tokens, self.embedding_dim))

    def mean_norm(self, memories: torch.Tensor) -> float:
        """Mean L2 norm of the embeddings in some memories (..., r * d): comparable to token embeddings."""
        return float(self.as_tokens(memories.detach()).norm(dim=-1).mean())

    def recall(
        self,
        query: torch.Tensor,
        memories: torch.Tensor,
        memory_mask: torch.Tensor,
        sharpen_after: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft attention of each row's query over its cached memories.

        query: (batch, output_dim); memories: (batch, slots, r * d); memory_mask: (batch, slots) bool.
        `sharpen_after` n0: a row with n > n0 memories has its scores multiplied by ln(n) / ln(n0)
        (HMTConfig.sharpen_recall_after). Returns the recalled memory (batch, r * d), equal to m0 for rows
        with an empty cache, and the recall weights (batch, slots), a distribution over the valid slots
        (zeros for empty rows).
        """
        scores = self.scores(query, memories)
        if sharpen_after is not None:
            cached = memory_mask.sum(dim=1, keepdim=True).clamp_min(1).to(scores.dtype)
            scores = scores * (cached.log() / math.log(sharpen_after)).clamp_min(1.0)
        scores = scores.masked_fill(~memory_mask, float("-inf"))
        has_memory = memory_mask.any(dim=1, keepdim=True)  # (batch, 1)
        # Rows without memories would softmax over nothing (NaN); give them a harmless zero score row.
        weights = torch.softmax(torch.where(has_memory, scores, torch.zeros_like(scores)), dim=-1)
        weights = torch.where(has_memory, weights, torch.zeros_like(weights))
        recalled = torch.einsum("bs,bsd->bd", weights, memories)
        return torch.where(has_memory, recalled, self.initial_memory.expand_as(recalled)), weights

    @property
    def recall_temperature(self) -> torch.Tensor | None:
        """The bounded scores' current temperature (kept <= 100), or None for the paper's dot product."""
        if not hasattr(self, "recall_log_temperature"):
            return None
        return self.recall_log_temperature.clamp(max=math.log(MAX_RECALL_TEMPERATURE)).exp()

    def scores(self, query: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
        """Recall's scores before the softmax, (batch, slots): (W_q S) . (W_k key(M)) / sqrt(d_h), or with
        a recall temperature t, cos(W_q S, W_k key(M)) * t. A memory's key is the mean of its r embeddings
        (each RMS-normalised first if recall_norm)."""
        query = query.to(self.query_proj.weight.dtype)
        embeddings = self.as_tokens(memories)  # (batch, slots, r, d)
        if self.recall_norm:
            query, embeddings = _rms_normalise(query), _rms_normalise(embeddings)
        q = self.query_proj(query)  # (batch, d_h)
        k = self.key_proj(embeddings.mean(dim=-2))  # (batch, slots, d_h)
        temperature = self.recall_temperature
        if temperature is not None:
            return torch.einsum("bh,bsh->bs", F.normalize(q, dim=-1), F.normalize(k, dim=-1)) * temperature
        return torch.einsum("bh,bsh->bs", q, k) / math.sqrt(self.recall_dim)

    def last_memory(self, memories: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """RMT's read: the newest memory M_{n-1} per row, or m0 where nothing was written yet."""
        batch, _, width = memories.shape
        initial = self.initial_memory.expand(batch, width)
        if memories.shape[1] == 0:
            return initial
        newest_valid = memory_mask[:, -1:]  # right-aligned: the last slot is the newest
        return torch.where(newest_valid, memories[:, -1], initial)


def _rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over the last dimension: unit mean square, whatever the scale x comes at."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-12)

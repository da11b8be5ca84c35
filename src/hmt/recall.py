"""The parameters HMT adds to a backbone, and the recall that turns a query into a mix of memories."""

from __future__ import annotations

import math

import torch
from torch import nn


class MemoryParameters(nn.Module):
    """T (summary prompt), m0 (initial memory), W_q and W_k; kept in float32 whatever the backbone runs in.

    `output_dim` is the width of the backbone's final hidden states. When it differs from the embedding
    width d, a projection (`output_proj`) brings written memories into embedding space.
    """

    def __init__(self, embedding_dim: int, output_dim: int, recall_dim: int, embedding_std: float) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.recall_dim = recall_dim
        # T and m0 look like token embeddings: normal, scaled by the backbone's embedding spread.
        self.summary_prompt = nn.Parameter(torch.randn(embedding_dim) * embedding_std)
        self.initial_memory = nn.Parameter(torch.randn(embedding_dim) * embedding_std)
        self.query_proj = nn.Linear(output_dim, recall_dim, bias=False)
        self.key_proj = nn.Linear(embedding_dim, recall_dim, bias=False)
        self.output_proj = (
            nn.Linear(output_dim, embedding_dim, bias=False) if output_dim != embedding_dim else None
        )

    def to_memory(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden state at the write slot (..., output_dim) -> memory embedding (..., d), float32."""
        hidden = hidden.to(self.key_proj.weight.dtype)
        return self.output_proj(hidden) if self.output_proj is not None else hidden

    def recall(
        self, query: torch.Tensor, memories: torch.Tensor, memory_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft attention of each row's query over its cached memories.

        query: (batch, output_dim); memories: (batch, slots, d); memory_mask: (batch, slots) bool.
        Returns the recalled memory (batch, d), equal to m0 for rows with an empty cache, and the
        recall weights (batch, slots), a distribution over the valid slots (zeros for empty rows).
        """
        q = self.query_proj(query.to(self.query_proj.weight.dtype))  # (batch, d_h)
        k = self.key_proj(memories)  # (batch, slots, d_h)
        scores = torch.einsum("bh,bsh->bs", q, k) / math.sqrt(self.recall_dim)
        scores = scores.masked_fill(~memory_mask, float("-inf"))
        has_memory = memory_mask.any(dim=1, keepdim=True)  # (batch, 1)
        # Rows without memories would softmax over nothing (NaN); give them a harmless zero score row.
        weights = torch.softmax(torch.where(has_memory, scores, torch.zeros_like(scores)), dim=-1)
        weights = torch.where(has_memory, weights, torch.zeros_like(weights))
        recalled = torch.einsum("bs,bsd->bd", weights, memories)
        recalled = torch.where(has_memory, recalled, self.initial_memory.expand_as(recalled))
        return recalled, weights

    def last_memory(self, memories: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """RMT's read: the newest memory M_{n-1} per row, or m0 where nothing was written yet."""
        batch, _, width = memories.shape
        if memories.shape[1] == 0:
            return self.initial_memory.expand(batch, width)
        newest_valid = memory_mask[:, -1:]  # right-aligned: the last slot is the newest
        return torch.where(newest_valid, memories[:, -1], self.initial_memory.expand(batch, width))

"""Reading a long text into memory a chunk per model call: the memory equals one call on the whole text
(segments are cut every L tokens of the stream), and the caller may report progress or stop between chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

READ_CHUNK = 4096  # tokens per model call: bounds activation memory, not results


def read_steps(
    model: Any, ids: torch.Tensor, state: Any = None, *, chunk: int | None = None
) -> Iterator[tuple[int, Any]]:
    """Read 1-D `ids` after `state` (None: an empty memory) without scoring, `chunk` tokens (default
    READ_CHUNK) per model call; after each chunk, yield (tokens read so far, the state)."""
    chunk = READ_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ids = ids.to(model.device)
    with torch.no_grad():
        for start in range(0, ids.numel(), chunk):
            state = model(ids[None, start : start + chunk], state=state, score=False).state
            yield min(start + chunk, ids.numel()), state


def read(model: Any, ids: torch.Tensor, state: Any = None, *, chunk: int | None = None) -> Any:
    """`ids` read into memory after `state`: the state after them (`state` itself if `ids` is empty)."""
    for _, after in read_steps(model, ids, state, chunk=chunk):
        state = after
    return state

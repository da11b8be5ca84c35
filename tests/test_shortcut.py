"""HMT's gradient shortcut: only marked segments are recorded for backward, and the answer's gradient
still reaches the segment that wrote the fact, through recall alone."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, VOCAB, tiny_hmt

LENGTH, SEGMENTS = 8, 6
# Segment 0 holds the fact, 1-3 are haystack (forward-only), 4 the question, 5 the answer.
MARKED = torch.tensor([[True, False, False, False, True, True]])


def unique_ids() -> torch.Tensor:
    """Every token id appears once, so an embedding row's gradient says which segment it came from."""
    return (
        torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0))[: LENGTH * SEGMENTS][None] + 3
    )


def answer_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -LENGTH:] = ids[:, -LENGTH:]
    return labels


def embedding_grad(
    mode: str, grad_segments: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = tiny_hmt("llama", mode=mode, segment_length=LENGTH, num_sensory=2, summary_length=4, cache_size=8)
    ids = unique_ids()
    out = model(ids, labels=answer_labels(ids), grad_segments=grad_segments)
    out.loss.backward()
    return model.backbone.get_input_embeddings().weight.grad, ids[0], out.loss.detach()


def rows_touched(grad: torch.Tensor, tokens: torch.Tensor) -> bool:
    return bool(grad[tokens].abs().sum() > 0)


def test_answer_gradient_reaches_the_fact_segment_through_recall_only():
    grad, ids, _ = embedding_grad("hmt", MARKED)
    fact = ids[: LENGTH - 4]  # segment 0 before the tokens segment 1's query reads
    between = ids[LENGTH : 4 * LENGTH - 4]  # segments 1-3, except what segment 4's query and sensory read
    assert rows_touched(grad, fact), "no gradient reached the fact segment"
    assert not rows_touched(grad, between), "forward-only segments were recorded"


def test_without_recall_the_chain_is_cut():
    """rmt reads only the newest memory: the fact's influence passes through forward-only segments, so
    no gradient reaches it (the contrast that makes the test above mean something)."""
    grad, ids, _ = embedding_grad("rmt", MARKED)
    assert not rows_touched(grad, ids[: LENGTH - 4])


def test_the_shortcut_changes_no_forward_result():
    _, _, shortcut = embedding_grad("hmt", MARKED)
    _, _, full = embedding_grad("hmt", None)
    torch.testing.assert_close(shortcut, full, atol=ATOL, rtol=0)


def test_grad_segments_must_fit_the_input():
    model = tiny_hmt("llama", segment_length=LENGTH)
    with pytest.raises(ValueError, match=r"grad_segments must be a bool tensor of shape \(batch, segments\)"):
        model(unique_ids(), grad_segments=torch.ones(1, 3, dtype=torch.bool))

"""Bounded recall scores (HMTConfig.recall_temperature): cosine times a learned temperature."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_ids, tiny_backbone, tiny_hmt
from hmt import HMTForCausalLM
from hmt.recall import MemoryParameters


def test_scores_stay_within_the_temperature_whatever_the_scale():
    torch.manual_seed(0)
    params = MemoryParameters(
        embedding_dim=16,
        output_dim=16,
        recall_dim=8,
        embedding_std=0.02,
        recall_norm=False,
        recall_temperature=5.0,
    )
    query, memories = torch.randn(3, 16), torch.randn(3, 7, 16)
    for scale in (1.0, 1e3):
        scores = params.scores(scale * query, scale * memories)
        assert scores.abs().max() <= 5.0 + 1e-4
        assert scores.abs().max() > 0.5  # a cosine times 5, not a collapsed score
    dot = MemoryParameters(
        embedding_dim=16, output_dim=16, recall_dim=8, embedding_std=0.02, recall_norm=False
    )
    dot.load_state_dict({k: v for k, v in params.state_dict().items() if k != "recall_log_temperature"})
    assert dot.scores(1e3 * query, 1e3 * memories).abs().max() > 1e3  # the paper's scores are unbounded


def test_temperature_is_learned_and_capped():
    params = MemoryParameters(
        embedding_dim=16, output_dim=16, recall_dim=8, embedding_std=0.02, recall_temperature=2.0
    )
    query, memories = torch.randn(2, 16), torch.randn(2, 4, 16)
    params.scores(query, memories).pow(2).sum().backward()
    assert params.recall_log_temperature.grad is not None and params.recall_log_temperature.grad.abs() > 0
    with torch.no_grad():
        params.recall_log_temperature.fill_(math.log(1e4))
    assert params.recall_temperature.item() == pytest.approx(100.0)
    assert params.scores(query, memories).abs().max() <= 100.0 + 1e-3


def test_an_adapter_gains_a_temperature_and_keeps_it_on_save(tmp_path):
    plain = tiny_hmt("llama")
    plain.save_pretrained(tmp_path / "plain")
    gained = HMTForCausalLM.from_pretrained(
        tmp_path / "plain", tiny_backbone("llama"), recall_temperature=3.0
    )
    assert gained.config.recall_temperature == 3.0
    assert gained.memory.recall_temperature.item() == pytest.approx(3.0)
    torch.testing.assert_close(gained.memory.query_proj.weight, plain.memory.query_proj.weight)
    gained.save_pretrained(tmp_path / "gained")
    again = HMTForCausalLM.from_pretrained(tmp_path / "gained", tiny_backbone("llama"))
    ids = random_ids(1, 40)
    torch.testing.assert_close(again(ids).logits, gained(ids).logits)
    with pytest.raises(ValueError, match="recall_temperature differ from the adapter"):
        HMTForCausalLM.from_pretrained(tmp_path / "gained", tiny_backbone("llama"), recall_temperature=4.0)

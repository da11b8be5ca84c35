"""HMTConfig.recall_recency: a fixed recency prior on recall scores (nats per segment of age)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ATOL, random_ids, read_in_chunks, tiny_hmt
from hmt import HMTConfig
from hmt.recall import MemoryParameters, entry_ages


def test_entry_ages_count_each_rows_own_writes_from_the_newest():
    mask = torch.tensor([[False, True, True, True], [False, False, False, True], [False] * 4])
    ages = entry_ages(mask)
    assert ages[0, 1:].tolist() == [2, 1, 0]
    assert ages[1, 3].item() == 0


def test_recency_multiplies_each_weight_by_exp_minus_recency_times_age():
    torch.manual_seed(0)
    params = MemoryParameters(16, 16, 8, 0.02, memory_tokens=2)
    query, memories = torch.randn(2, 16), torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    _, plain = params.recall(query, memories, mask)
    recalled, weights = params.recall(query, memories, mask, recency=0.7)
    ages = torch.tensor([[4, 3, 2, 1, 0], [0, 0, 2, 1, 0]], dtype=torch.float32)
    expected = plain * torch.exp(-0.7 * ages) * mask
    expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(recalled, torch.einsum("bs,bsd->bd", weights, memories))
    assert weights[0, -1] > plain[0, -1]  # the newest entry gains, the oldest loses
    assert weights[0, 0] < plain[0, 0]


def test_an_overwhelming_recency_prior_turns_hmt_into_rmt():
    hmt = tiny_hmt("llama", mode="hmt", recall_recency=1e4)
    ids = random_ids(2, 53)
    with torch.no_grad():
        got = hmt(ids)
        hmt.reconfigure(mode="rmt")
        rmt = hmt(ids)
    torch.testing.assert_close(got.token_losses, rmt.token_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.state.memories, rmt.state.memories, atol=ATOL, rtol=0)
    assert all(w[:, -1].eq(1).all() for w in got.recall_weights[1:])  # always the newest entry


def test_chunked_calls_and_batches_keep_the_ages_of_one_call_alone():
    model = tiny_hmt("qwen2", recall_recency=0.5)
    ids = random_ids(2, 45)
    with torch.no_grad():
        whole = model(ids)
        losses, _ = read_in_chunks(model, ids, [(0, 16), (16, 24), (24, 45)])
        torch.testing.assert_close(losses, whole.token_losses, atol=ATOL, rtol=0)
        # A short row padded on the left: its entries' ages are its own, not the long row's.
        short = random_ids(1, 21, seed=6)
        padded = torch.cat([torch.zeros(1, 24, dtype=torch.long), short], dim=1)
        mask = torch.cat([torch.zeros(1, 24), torch.ones(1, 21)], dim=1).long()
        batch = model(torch.cat([ids, padded]), attention_mask=torch.cat([torch.ones(2, 45).long(), mask]))
        alone = model(short)
    torch.testing.assert_close(batch.token_losses[2, 24:], alone.token_losses[0], atol=ATOL, rtol=0)


def test_recency_is_a_setting_not_a_parameter():
    model = tiny_hmt("llama")
    assert model.config.recall_recency == 0.0
    model.reconfigure(recall_recency=0.25)  # no new parameters: an adapter may be read with another prior
    assert model.config.recall_recency == 0.25
    assert HMTConfig.from_dict({"segment_length": 64}).recall_recency == 0.0  # files written before it
    config = HMTConfig(recall_recency=1)
    assert config.recall_recency == 1.0 and HMTConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.5"])
def test_invalid_recency_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="recall_recency"):
        HMTConfig(recall_recency=bad)

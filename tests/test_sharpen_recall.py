"""Recall sharpened by the size of the cache (HMTConfig.sharpen_recall_after): scalable softmax over memories."""

from __future__ import annotations

import math

import torch

from conftest import ATOL, random_ids, tiny_backbone, tiny_hmt
from hmt import HMTForCausalLM
from hmt.recall import MemoryParameters


def test_scores_scale_by_log_cached_over_log_n0_only_past_n0():
    torch.manual_seed(0)
    params = MemoryParameters(
        embedding_dim=16, output_dim=16, recall_dim=8, embedding_std=0.02, recall_temperature=5.0
    )
    query, memories = torch.randn(3, 16), torch.randn(3, 9, 16)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, -2:], mask[1, -4:], mask[2, :] = True, True, True  # 2, 4 and 9 memories, right-aligned
    _, plain = params.recall(query, memories, mask)
    _, sharp = params.recall(query, memories, mask, sharpen_after=4)
    torch.testing.assert_close(sharp[:2], plain[:2])  # n <= n0: unchanged
    scores = params.scores(query, memories)[2] * (math.log(9) / math.log(4))
    torch.testing.assert_close(sharp[2], scores.softmax(-1))
    assert sharp[2].max() > plain[2].max()  # the leading memory gains weight


def test_a_model_reads_the_same_until_the_cache_passes_n0_and_sharper_after(tmp_path):
    ids = random_ids(1, 8 * 7)  # 7 segments: the last recalls over 6 memories (cache_size 8)
    model = tiny_hmt("llama", cache_size=8, recall_temperature=5.0)
    with torch.no_grad():
        plain = model(ids)
        with model.reading(sharpen_recall_after=6):
            same = model(ids)
        with model.reading(sharpen_recall_after=3):
            sharp = model(ids)
    torch.testing.assert_close(same.logits, plain.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(sharp.recall_weights[3], plain.recall_weights[3])  # 3 memories: n <= n0
    assert not torch.allclose(sharp.recall_weights[6], plain.recall_weights[6])
    assert model.config.sharpen_recall_after is None  # the block restores the config

    # A reading setting: saved with the adapter, and given to any adapter when it is loaded.
    model.config = model.config.replace(sharpen_recall_after=3)
    model.save_pretrained(tmp_path)
    again = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))
    assert again.config.sharpen_recall_after == 3
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, sharp.logits, atol=ATOL, rtol=0)
    off = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"), sharpen_recall_after=100)
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, plain.logits, atol=ATOL, rtol=0)

"""HMTConfig.memory_offset: every memory read from the cache is m0 plus that memory."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, random_ids, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM
from hmt.recall import MemoryParameters


def test_reads_add_m0_to_the_memory_and_empty_rows_read_m0_alone():
    torch.manual_seed(0)
    plain = MemoryParameters(16, 16, 8, 0.02, memory_tokens=2)
    offset = MemoryParameters(16, 16, 8, 0.02, memory_tokens=2, memory_offset=True)
    offset.load_state_dict(plain.state_dict())
    query, memories = torch.randn(3, 16), torch.randn(3, 4, 32)
    mask = torch.tensor([[True] * 4, [False, False, True, True], [False] * 4])
    m0 = plain.initial_memory
    recalled, weights = offset.recall(query, memories, mask, recency=0.3)
    expected, expected_weights = plain.recall(query, memories, mask, recency=0.3)
    torch.testing.assert_close(weights, expected_weights)  # recall itself is unchanged
    torch.testing.assert_close(recalled[:2], expected[:2] + m0)
    torch.testing.assert_close(recalled[2], m0)  # nothing written yet: m0, not 2 * m0
    newest = offset.last_memory(memories, mask)
    torch.testing.assert_close(newest[:2], memories[:2, -1] + m0)
    torch.testing.assert_close(newest[2], m0)


@pytest.mark.parametrize("mode", ["rmt", "hmt"])
def test_memory_that_adds_nothing_reads_exactly_as_memory_off(mode):
    model = tiny_hmt("llama", mode=mode, memory_offset=True, memory_tokens=2, attention_sink=True)
    ids = random_ids(2, 37)
    with torch.no_grad():
        model.memory.memory_scale.zero_()  # every written memory is zero: reads are m0 alone
        got = model(ids)
        model.reconfigure(mode="memory_off")
        control = model(ids)
    torch.testing.assert_close(got.token_losses, control.token_losses, atol=ATOL, rtol=0)


@pytest.mark.parametrize("offset", [True, False])
def test_later_segments_train_m0_only_with_the_offset(offset):
    model = tiny_hmt("qwen2", mode="hmt", memory_offset=offset)
    with torch.no_grad():
        model.memory.memory_scale.zero_()  # written memories are zero: m0 reaches later segments only as offset
    ids = random_ids(1, 29)
    labels = ids.clone()
    labels[:, :9] = -100  # score nothing the first segment (which reads m0 in every setting) predicts
    model(ids, labels=labels).loss.backward()
    assert bool(model.memory.initial_memory.grad.abs().sum() > 0) == offset
    assert model.memory.memory_scale.grad.abs() > 0  # the memories written still get gradient


def test_offset_is_tied_to_the_parameters_and_saved(tmp_path):
    model = tiny_hmt("llama", memory_offset=True)
    with pytest.raises(ValueError, match="memory_offset"):
        model.reconfigure(memory_offset=False)
    model.save_pretrained(tmp_path / "adapter")
    loaded = HMTForCausalLM.from_pretrained(tmp_path / "adapter", tiny_backbone("llama", seed=0))
    assert loaded.config.memory_offset is True
    ids = random_ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=ATOL, rtol=0)
    assert HMTConfig.from_dict({"segment_length": 64}).memory_offset is False  # files written before it
    with pytest.raises(ValueError, match="memory_offset"):
        HMTConfig(memory_offset="yes")

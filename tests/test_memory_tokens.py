"""Several memory embeddings per segment (HMTConfig.memory_tokens = r > 1)."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, capture_main_inputs, random_ids, read_in_chunks, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM

R = 3


def test_segments_read_r_slots_at_both_ends_and_write_the_outputs_at_the_last_r():
    model = tiny_hmt("gpt_neox", mode="rmt", memory_tokens=R, memory_norm="none", attention_sink=True)
    d = model.embedding_dim
    calls = capture_main_inputs(model)
    ids = random_ids(1, 24)  # 3 segments of 8
    with torch.no_grad():
        out = model(ids)
        m0 = model.memory.initial_memory.view(R, d)
        torch.testing.assert_close(calls[0][0, 1 : 1 + R], m0, atol=0, rtol=0)  # after the sink
        for step, inputs in enumerate(calls):
            read = inputs[0, 1 : 1 + R]
            torch.testing.assert_close(inputs[0, 0], model.memory.sink, atol=0, rtol=0)
            torch.testing.assert_close(inputs[0, -R:], read, atol=0, rtol=0)  # the same r slots close it
            final = model.backbone(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1]
            written = out.state.memories[0, step]
            assert written.shape == (R * d,)
            torch.testing.assert_close(written.view(R, d), final[0, -R:], atol=ATOL, rtol=0)
            if step:  # rmt reads the previous segment's r memories
                torch.testing.assert_close(
                    read, out.state.memories[0, step - 1].view(R, d), atol=ATOL, rtol=0
                )
    assert calls[0].shape[1] == 1 + R + 8 + R  # the first segment has no sensory tokens yet
    assert calls[1].shape[1] == 1 + R + 2 + 8 + R


@pytest.mark.parametrize("mode", ["hmt", "rmt", "memory_off"])
def test_chunked_calls_equal_one_call_with_several_memory_tokens(mode):
    model = tiny_hmt("llama", mode=mode, memory_tokens=R, attention_sink=True)
    ids = random_ids(2, 45)
    with torch.no_grad():
        whole = model(ids)
        losses, state = read_in_chunks(model, ids, [(0, 16), (16, 24), (24, 45)])
    torch.testing.assert_close(losses, whole.token_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.memories, whole.state.memories, atol=ATOL, rtol=0)


def test_batch_equals_each_text_alone_with_several_memory_tokens():
    model = tiny_hmt("qwen2", memory_tokens=R)
    long_text, short_text = random_ids(1, 37, seed=5)[0], random_ids(1, 21, seed=6)[0]
    ids = torch.stack([long_text, torch.cat([short_text, torch.zeros(16, dtype=torch.long)])])
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        alone = model(short_text[None])
    torch.testing.assert_close(batch.token_losses[1, :21], alone.token_losses[0], atol=ATOL, rtol=0)
    got = batch.state.select([1])
    torch.testing.assert_close(
        got.memories[0, got.memory_mask[0]], alone.state.memories[0], atol=ATOL, rtol=0
    )


def test_recall_mixes_whole_groups_keyed_by_their_mean():
    from hmt.recall import MemoryParameters

    torch.manual_seed(0)
    params = MemoryParameters(
        embedding_dim=16, output_dim=16, recall_dim=8, embedding_std=0.02, memory_tokens=R
    )
    query, memories = torch.randn(2, 16), torch.randn(2, 5, R * 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    recalled, weights = params.recall(query, memories, mask)
    assert recalled.shape == (2, R * 16) and params.initial_memory.shape == (R * 16,)
    torch.testing.assert_close(recalled, torch.einsum("bs,bsd->bd", weights, memories))
    # Permuting the r embeddings inside every memory permutes the recalled ones and leaves the weights.
    permuted = memories.view(2, 5, R, 16)[:, :, [2, 0, 1]].reshape(2, 5, R * 16)
    recalled_p, weights_p = params.recall(query, permuted, mask)
    torch.testing.assert_close(weights_p, weights)
    torch.testing.assert_close(recalled_p.view(2, R, 16), recalled.view(2, R, 16)[:, [2, 0, 1]])


def test_every_memory_token_gets_gradient():
    model = tiny_hmt("llama", mode="rmt", memory_tokens=R)
    model.train()
    model(random_ids(2, 24)).loss.backward()
    grad = model.memory.initial_memory.grad.view(R, -1)
    assert (grad.abs().sum(dim=1) > 0).all()


def test_save_then_load_keeps_the_memory_tokens(tmp_path):
    model = tiny_hmt("opt", memory_tokens=R, seed=0)  # OPT: hidden states wider than embeddings
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    loaded = HMTForCausalLM.from_pretrained(tmp_path / "adapter", tiny_backbone("opt", seed=0))
    assert loaded.config.memory_tokens == R
    ids = random_ids(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tied to the parameters"), loaded.reading(memory_tokens=1):
        pass


def test_a_state_from_another_memory_width_is_refused():
    one, many = tiny_hmt("llama"), tiny_hmt("llama", memory_tokens=R)
    with torch.no_grad():
        state = one(random_ids(1, 16)).state
        with pytest.raises(ValueError, match="memory width 32"):
            many(random_ids(1, 8), state=state)


def test_memory_tokens_are_validated_and_count_against_the_position_range():
    with pytest.raises(ValueError, match="memory_tokens must be >= 1"):
        HMTConfig(memory_tokens=0)
    # The tiny backbones have 256 positions: 240 + 2 + 2 * 7 + 1 = 257 does not fit, 6 tokens do.
    settings = {"segment_length": 240, "num_sensory": 2, "attention_sink": True}
    with pytest.raises(ValueError, match="15 memory and sink slots"):
        HMTForCausalLM(tiny_backbone("llama"), HMTConfig(memory_tokens=7, **settings))
    HMTForCausalLM(tiny_backbone("llama"), HMTConfig(memory_tokens=6, **settings))

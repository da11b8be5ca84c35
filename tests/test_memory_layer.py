"""HMTConfig.memory_layer: a segment writes the residual stream after a chosen layer as its memory."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, random_ids, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["rmt", "hmt"])
def test_the_last_layer_writes_what_the_default_writes(arch, mode):
    default = tiny_hmt(arch, mode=mode, memory_tokens=2, attention_sink=True)
    last = tiny_hmt(arch, mode=mode, memory_tokens=2, attention_sink=True, memory_layer=2)
    last.memory.load_state_dict(default.memory.state_dict())  # calibration differs; the parameters do not
    ids = random_ids(2, 37)
    with torch.no_grad():
        expected, got = default(ids), last(ids)
    torch.testing.assert_close(got.token_losses, expected.token_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.state.memories, expected.state.memories, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_middle_layer_writes_that_layers_output_at_the_write_slots(arch):
    model = tiny_hmt(arch, mode="rmt", memory_tokens=2, memory_layer=1)
    captured: list[torch.Tensor] = []
    first_layer = model.backbone.model.layers[0]
    first_layer.register_forward_hook(
        lambda _m, _a, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())
    )
    with torch.no_grad():
        out = model(random_ids(1, 8))  # one segment: one main pass, whose last 2 positions are write slots
    assert len(captured) == 1
    expected = model.memory.to_memory(captured[0][0, -2:])
    torch.testing.assert_close(out.state.memories[0, -1], expected, atol=ATOL, rtol=0)
    default = tiny_hmt(arch, mode="rmt", memory_tokens=2)
    default.memory.load_state_dict(model.memory.state_dict())
    with torch.no_grad():
        assert not torch.allclose(default(random_ids(1, 8)).state.memories[0, -1], expected)


def test_calibration_brings_a_middle_layer_to_embedding_scale():
    model = tiny_hmt("llama", memory_layer=1)
    with torch.no_grad():
        written = model(random_ids(1, 40)).state
    norm = model.memory.mean_norm(written.memories[written.memory_mask])
    # Calibrated on the final (normed) states instead, layer 1's memories would be ~50x off here.
    assert norm == pytest.approx(float(model.memory.embedding_norm), rel=0.5)


def test_layer_is_tied_to_the_parameters_checked_and_saved(tmp_path):
    model = tiny_hmt("llama", memory_layer=1)
    with pytest.raises(ValueError, match="memory_layer"), model.reading(memory_layer=2):
        pass
    model.save_pretrained(tmp_path / "adapter")
    loaded = HMTForCausalLM.from_pretrained(tmp_path / "adapter", tiny_backbone("llama", seed=0))
    assert loaded.config.memory_layer == 1
    ids = random_ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=ATOL, rtol=0)
    assert HMTConfig.from_dict({"segment_length": 64}).memory_layer is None  # files written before it
    with pytest.raises(ValueError, match="memory_layer must be >= 1"):
        HMTConfig(memory_layer=0)
    with pytest.raises(ValueError, match="memory_layer must be an integer"):
        HMTConfig(memory_layer=1.5)
    with pytest.raises(ValueError, match="the backbone has 2 layers"):
        tiny_hmt("llama", memory_layer=3)
    with pytest.raises(ValueError, match="leave memory_layer unset"):
        tiny_hmt("opt", memory_layer=1)  # OPT's layers are wider than its projected output

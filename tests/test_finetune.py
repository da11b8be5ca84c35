"""Which backbone weights train, and LoRA weights saved beside the HMT adapter."""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_backbone
from hmt import HMTConfig, HMTForCausalLM
from hmt.backbone import is_peft_model, prepare_backbone

CONFIG = HMTConfig(segment_length=8, num_sensory=2, cache_size=4)


def trainable(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_frozen_full_and_lora():
    assert not trainable(prepare_backbone(tiny_backbone("llama"), "frozen"))
    assert trainable(prepare_backbone(tiny_backbone("llama"), "full")) == trainable(tiny_backbone("llama"))
    lora = prepare_backbone(tiny_backbone("llama"), "lora", lora_rank=4)
    assert is_peft_model(lora)
    names = trainable(lora)
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    with pytest.raises(ValueError, match="finetune must be one of frozen, lora, full"):
        prepare_backbone(tiny_backbone("llama"), "half")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_lora_adapter_round_trip(tmp_path, arch):
    model = HMTForCausalLM(prepare_backbone(tiny_backbone(arch), "lora", lora_rank=4), CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA starts as a no-op; make it matter
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in tmp_path.iterdir()}
    ids = random_ids(2, 30)
    with torch.no_grad():
        expected = model(ids).token_losses
        plain = HMTForCausalLM(tiny_backbone(arch), CONFIG)
        plain.memory.load_state_dict(model.memory.state_dict())
        assert not torch.allclose(plain(ids).token_losses, expected, atol=1e-3)
        merged = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone(arch))
        assert not is_peft_model(merged.backbone)
        torch.testing.assert_close(merged(ids).token_losses, expected, atol=1e-4, rtol=0)
    attached = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone(arch), trainable_lora=True)
    assert is_peft_model(attached.backbone) and all("lora_" in n for n in trainable(attached.backbone))


def test_full_finetune_saves_the_backbone(tmp_path):
    model = HMTForCausalLM(prepare_backbone(tiny_backbone("llama"), "full"), CONFIG)
    model.save_pretrained(tmp_path, save_backbone=True)
    assert (tmp_path / "backbone" / "config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()

"""Which backbone weights train, and LoRA weights saved beside the HMT adapter."""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_backbone, tiny_tokenizer
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
        mine = tiny_backbone(arch)
        before = mine(ids).logits
        merged = HMTForCausalLM.from_pretrained(tmp_path, mine)
        assert not is_peft_model(merged.backbone)
        torch.testing.assert_close(merged(ids).token_losses, expected, atol=1e-4, rtol=0)
        # The caller's backbone is left as it was: the LoRA went into a copy.
        assert merged.backbone is not mine and not is_peft_model(mine)
        torch.testing.assert_close(mine(ids).logits, before, atol=0, rtol=0)
        # Unless merging into it was asked for (no copy: for backbones too large to hold twice).
        in_place = HMTForCausalLM.from_pretrained(tmp_path, mine, merge_lora=True)
        assert in_place.backbone is mine and not torch.allclose(mine(ids).logits, before, atol=1e-3)
        torch.testing.assert_close(in_place(ids).token_losses, expected, atol=1e-4, rtol=0)
    attached = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone(arch), trainable_lora=True)
    assert is_peft_model(attached.backbone) and all("lora_" in n for n in trainable(attached.backbone))


def test_full_finetune_saves_the_backbone_and_refuses_the_untrained_one(tmp_path):
    from hmt.backbone import load_backbone

    model = HMTForCausalLM(prepare_backbone(tiny_backbone("llama"), "full"), CONFIG)
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.5)  # fine-tuned: no longer the backbone it started from
    model.save_pretrained(tmp_path, save_backbone=True)
    assert (tmp_path / "backbone" / "config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="whole backbone fine-tuned"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))
    tiny_tokenizer().save_pretrained(tmp_path / "backbone")  # as hmt train saves it beside the weights
    tuned = load_backbone(str(tmp_path / "backbone"), dtype="fp32", device="cpu")
    loaded = HMTForCausalLM.from_pretrained(tmp_path, tuned.model)
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=1e-5, rtol=0)


def test_a_truncated_lora_file_is_a_clear_error(tmp_path):
    model = HMTForCausalLM(prepare_backbone(tiny_backbone("llama"), "lora", lora_rank=4), CONFIG)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"LoRA weights in .* cannot be read"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))


def test_lora_weights_holding_nan_are_refused_before_the_backbone_changes(tmp_path):
    model = HMTForCausalLM(prepare_backbone(tiny_backbone("llama"), "lora", lora_rank=4), CONFIG)
    with torch.no_grad():
        next(p for n, p in model.backbone.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_pretrained(tmp_path)
    backbone = tiny_backbone("llama")
    before = {n: p.clone() for n, p in backbone.state_dict().items()}
    for merge_lora in (False, True):
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors holds NaN or inf weights .*lora_B"):
            HMTForCausalLM.from_pretrained(tmp_path, backbone, merge_lora=merge_lora)
    assert not is_peft_model(backbone)
    assert all(torch.equal(p, before[n]) for n, p in backbone.state_dict().items())

"""Bad inputs and bad files raise errors whose messages name the problem."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, random_ids, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM, MemoryState


@pytest.fixture(scope="module")
def model():
    return tiny_hmt("llama")


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), None, "empty input"),
        (torch.zeros(0, 5, dtype=torch.long), None, "empty input"),
        (torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5), "attention_mask marks no tokens"),
        (torch.tensor([[3, 4, VOCAB]]), None, f"token id {VOCAB} is outside the backbone's vocabulary"),
        (torch.tensor([[3, -1, 4]]), None, "token id -1 is outside"),
        (torch.tensor([3, 4, 5]), None, "2-D tensor"),
        (torch.tensor([[3.0, 4.0]]), None, "integer token ids"),
        (torch.ones(1, 5, dtype=torch.long), torch.tensor([[1, 0, 1, 1, 1]]), "one contiguous run"),
        (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4), "does not match input_ids"),
    ],
)
def test_bad_inputs(model, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)


def test_ids_outside_the_vocabulary_in_padding_are_ignored(model):
    ids = torch.tensor([[5, 6, 7, -1]])
    out = model(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    assert out.token_mask.sum() == 2


def test_bad_labels(model):
    with pytest.raises(ValueError, match="label 500 is outside the vocabulary"):
        model(random_ids(1, 4), labels=torch.tensor([[1, 2, 500, 3]]))
    with pytest.raises(ValueError, match="labels shape"):
        model(random_ids(1, 4), labels=random_ids(1, 5))


def test_state_of_another_batch_or_model(model):
    state = model(random_ids(2, 10)).state
    with pytest.raises(ValueError, match="state holds 2 rows but input_ids has 1"):
        model(random_ids(1, 10), state=state)
    other = tiny_hmt("llama", num_sensory=6)  # keeps 6 recent tokens, the state 4 (the causal query's j)
    with pytest.raises(ValueError, match="keeps 6"):
        other(random_ids(2, 10), state=state)
    with pytest.raises(TypeError, match="MemoryState"):
        model(random_ids(2, 10), state={"memories": 1})


def test_segments_longer_than_the_backbone_positions():
    with pytest.raises(ValueError, match="backbone supports 256"):
        HMTForCausalLM(tiny_backbone("llama"), HMTConfig(segment_length=250, num_sensory=8))


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="transformers causal LM"):
        HMTForCausalLM(torch.nn.Linear(3, 3), HMTConfig())


# ---- adapter files -------------------------------------------------------------------------------


def test_load_refuses_backbone_of_another_kind_or_width(tmp_path):
    tiny_hmt("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"made for a llama backbone .* this backbone is gpt2"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("gpt2"))
    with pytest.raises(ValueError, match="embedding width 32, but this backbone has width 16"):
        tiny_opt = tiny_backbone("opt")
        tiny_opt.config.model_type = "llama"  # same kind on paper, other width
        HMTForCausalLM.from_pretrained(tmp_path, tiny_opt)


def test_load_refuses_missing_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="not an HMT adapter folder"):
        HMTForCausalLM.from_pretrained(tmp_path / "nowhere", tiny_backbone("llama"))
    tiny_hmt("llama").save_pretrained(tmp_path)
    adapter = tmp_path / "hmt_adapter.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))
    adapter.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))
    save_file({"lora_A": torch.zeros(2, 2)}, str(adapter))  # e.g. somebody else's adapter
    with pytest.raises(ValueError, match="is not an hmt-adapter file"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))
    save_file({"summary_prompt": torch.zeros(32)}, str(adapter), metadata={"format": "hmt-adapter"})
    with pytest.raises(ValueError, match=r"missing \['initial_memory'"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))


def test_load_refuses_tensors_of_the_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    model = tiny_hmt("llama")
    model.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in model.memory.state_dict().items()}
    tensors["key_proj.weight"] = torch.zeros(7, 32)
    save_file(tensors, str(tmp_path / "hmt_adapter.safetensors"), metadata={"format": "hmt-adapter"})
    with pytest.raises(ValueError, match=r"key_proj\.weight has shape"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_refuses_an_adapter_holding_nan_or_inf(tmp_path, value):
    model = tiny_hmt("llama")
    with torch.no_grad():
        model.memory.initial_memory.view(-1)[0] = value  # what a diverged training leaves
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"hmt_adapter\.safetensors holds NaN or inf weights \(initial_memory\)"
    ):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))


def test_corrupt_config_file(tmp_path):
    tiny_hmt("llama").save_pretrained(tmp_path)
    (tmp_path / "hmt_config.json").write_text('{"segment_length": -1}')
    with pytest.raises(ValueError, match="segment_length must be >= 1"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"))


def test_memory_state_file_checks(tmp_path):
    with pytest.raises(FileNotFoundError):
        MemoryState.load(tmp_path / "missing.safetensors")
    tiny_hmt("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an hmt-memory-state file"):
        MemoryState.load(tmp_path / "hmt_adapter.safetensors")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    model = tiny_hmt("llama")
    model.save_pretrained(tmp_path)
    before = (tmp_path / "hmt_adapter.safetensors").read_bytes()
    import safetensors.torch

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        model.memory.initial_memory.add_(1)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "hmt_adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmt_adapter.safetensors", "hmt_config.json"]


def test_a_saved_state_whose_contents_are_wrong_is_refused(tmp_path, model):
    from dataclasses import replace

    state = model(random_ids(1, 30)).state
    nan = replace(state, memories=torch.full_like(state.memories, float("nan")))
    nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors is not a usable memory state: .*NaN"):
        MemoryState.load(tmp_path / "nan.safetensors")
    ids = state.recent_ids.clone()
    ids[0, -1] = VOCAB + 5  # a token this backbone does not have: the state came from another one
    replace(state, recent_ids=ids).save(tmp_path / "foreign.safetensors")
    foreign = MemoryState.load(tmp_path / "foreign.safetensors")  # the file alone cannot know the vocabulary
    with pytest.raises(ValueError, match="outside this backbone's vocabulary"):
        model(random_ids(1, 8), state=foreign)
    replace(state, memory_mask=state.memory_mask[:, :0]).save(tmp_path / "mask.safetensors")
    with pytest.raises(ValueError, match="masks do not match"):
        MemoryState.load(tmp_path / "mask.safetensors")


def test_load_takes_tied_settings_only_with_the_adapters_values(tmp_path):
    tiny_hmt("llama", memory_tokens=2).save_pretrained(tmp_path)
    loaded = HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"), memory_tokens=2, cache_size=3)
    assert (loaded.config.memory_tokens, loaded.config.cache_size) == (
        2,
        3,
    )  # cache_size is a reading setting
    with pytest.raises(ValueError, match=r"memory_tokens differ from the adapter .* tied to the parameters"):
        HMTForCausalLM.from_pretrained(tmp_path, tiny_backbone("llama"), memory_tokens=1)

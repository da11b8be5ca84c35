"""The library below the CLI: one loading function, adapters from a folder or the Hub (offline, from its
cache), LoRA stored smaller on request, the GGUF cache keyed by content, `hmt train --config`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ATOL, random_ids, run_cli, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM


def test_load_model_builds_untrained_memory_with_the_settings_given(tiny_model_dir):
    from hmt.loading import load_model

    loaded = load_model(str(tiny_model_dir), adapter="none", settings={"segment_length": 16, "num_sensory": 4},
                        dtype="fp32", device="cpu", seed=3)  # fmt: skip
    assert loaded.adapter is None and loaded.reference is None and not loaded.model.training
    assert (loaded.model.config.segment_length, loaded.model.config.num_sensory) == (16, 4)
    assert loaded.encode("hello world").dim() == 1 and loaded.tokenizer is loaded.backbone.tokenizer
    assert loaded.identity["adapter"] is None and loaded.identity["hmt_config"]["segment_length"] == 16
    again = load_model(str(tiny_model_dir), adapter="none", settings={"segment_length": 16, "num_sensory": 4},
                       dtype="fp32", device="cpu", seed=3)  # fmt: skip
    torch.testing.assert_close(again.model.memory.state_dict(), loaded.model.memory.state_dict())  # seeded


def test_load_model_reads_an_adapter_with_reading_settings_over_its_own(tiny_model_dir, tmp_path):
    from hmt.backbone import load_backbone
    from hmt.loading import load_model

    torch.manual_seed(0)
    HMTForCausalLM(load_backbone(str(tiny_model_dir)).model, HMTConfig(segment_length=16, num_sensory=4)
                   ).save_pretrained(tmp_path / "adapter")  # fmt: skip
    loaded = load_model(str(tiny_model_dir), adapter=tmp_path / "adapter", settings={"cache_size": 5})
    assert loaded.adapter == tmp_path / "adapter" and loaded.model.config.cache_size == 5
    assert loaded.model.config.segment_length == 16 and loaded.model.config.summary_length == 32
    unset = load_model(str(tiny_model_dir), adapter=tmp_path / "adapter",
                       settings={"summary_length": None, "sharpen_recall_after": None})  # fmt: skip
    assert (unset.model.config.summary_length, unset.model.config.sharpen_recall_after) == (None, None)
    assert unset.model.config.query_length == 8  # unset: half a segment
    with pytest.raises(ValueError, match="memory_tokens differ from the adapter"):
        load_model(str(tiny_model_dir), adapter=tmp_path / "adapter", settings={"memory_tokens": 3})


def _hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """`folder` laid out as huggingface_hub caches a snapshot of model repo `repo`."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    cached = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, cached / "snapshots" / revision)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(revision)
    return cached / "snapshots" / revision


def test_from_pretrained_takes_a_hub_id_found_in_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    model = tiny_hmt("llama", memory_tokens=2)
    model.save_pretrained(tmp_path / "adapter")
    snapshot = _hub_cache(tmp_path / "hub", "someone/tiny-hmt", tmp_path / "adapter")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = HMTForCausalLM.from_pretrained("someone/tiny-hmt", tiny_backbone("llama"))
    ids = random_ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=ATOL, rtol=0)
    from hmt.pretrained import adapter_folder

    assert adapter_folder("someone/tiny-hmt") == snapshot
    with pytest.raises(FileNotFoundError, match="Hub repo someone/absent could not be fetched"):
        HMTForCausalLM.from_pretrained("someone/absent", tiny_backbone("llama"))
    with pytest.raises(FileNotFoundError, match=r"not an HMT adapter folder .*nor a Hub repo id"):
        HMTForCausalLM.from_pretrained(tmp_path / "nowhere" / "at-all", tiny_backbone("llama"))


def test_lora_is_saved_as_trained_or_in_bfloat16_when_asked(tmp_path):
    from safetensors import safe_open

    from hmt.backbone import prepare_backbone

    model = HMTForCausalLM(prepare_backbone(tiny_backbone("llama"), "lora", lora_rank=4),
                           HMTConfig(segment_length=8, num_sensory=2))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "exact")
    model.save_pretrained(tmp_path / "small", lora_dtype=torch.bfloat16)
    dtypes = {}
    for name in ("exact", "small"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), framework="pt") as stored:
            dtypes[name] = {stored.get_tensor(k).dtype for k in stored.keys()}  # noqa: SIM118
    assert dtypes == {"exact": {torch.float32}, "small": {torch.bfloat16}}
    sizes = {n: (tmp_path / n / "adapter_model.safetensors").stat().st_size for n in ("exact", "small")}
    assert sizes["small"] < sizes["exact"]  # (a tiny file: the header is much of it)
    ids = random_ids(2, 30)
    with torch.no_grad():
        trained = model(ids).token_losses
        exact = HMTForCausalLM.from_pretrained(tmp_path / "exact", tiny_backbone("llama"))(ids).token_losses
        small = HMTForCausalLM.from_pretrained(tmp_path / "small", tiny_backbone("llama"))(ids).token_losses
    torch.testing.assert_close(exact, trained, atol=ATOL, rtol=0)
    torch.testing.assert_close(small, trained, atol=2e-2, rtol=0)  # bf16 rounding of the LoRA weights only


def test_the_gguf_cache_key_is_the_files_content_hashed_once(tmp_path, monkeypatch):
    import hashlib

    from hmt.backbone import gguf_content_key

    first, second = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(200)) * 50)
    index = tmp_path / "cache"
    key = gguf_content_key(first, index)
    assert gguf_content_key(second, index) == key  # a copy in another environment: the same cache folder
    hashed = []
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or hashlib.new("sha256", *a))
    assert gguf_content_key(first, index) == key and not hashed  # remembered by path, size and time
    second.write_bytes(b"GGUF" + bytes(range(200)) * 49 + b"x")
    assert gguf_content_key(second, index) != key


def test_generation_config_is_the_backbones(tiny_model_dir):
    from hmt.backbone import load_backbone

    backbone = load_backbone(str(tiny_model_dir)).model
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=16, num_sensory=4))
    assert model.generation_config is backbone.generation_config


def test_train_starts_from_an_earlier_runs_settings(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    common = ("--backbone", str(tiny_model_dir), "--data", str(corpus), "--validation-data", str(corpus),
              "--validation-tokens", "64", "--dtype", "fp32", "--device", "cpu", "--batch-size", "1")  # fmt: skip
    first = tmp_path / "first"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", str(first), "--mode", "rmt", "--max-steps", "2",
                           "--unroll", "2", "--segment-length", "16", "--num-sensory", "4", "--lora-rank", "2",
                           "--set", "attention_sink=false", *common)  # fmt: skip
    assert code == 0, err
    again = tmp_path / "again"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(first / "run.json"), "--out", str(again),
                           "--max-steps", "1")  # fmt: skip
    assert code == 0, err
    before = json.loads((first / "run.json").read_text())["settings"]
    after = json.loads((again / "run.json").read_text())["settings"]
    assert after["train"].pop("max_steps") == 1 and before["train"].pop("max_steps") == 2
    assert after == before  # everything else as recorded: backbone, data, LoRA rank, model settings
    assert json.loads((again / "final" / "hmt_config.json").read_text())["attention_sink"] is False
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(tmp_path / "none.json"), "--out",
                           str(tmp_path / "x"))  # fmt: skip
    assert code == 1 and "no run file" in err
    (tmp_path / "bad.json").write_text(json.dumps({"settings": {"nope": 1, "train": {}}}))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(tmp_path / "bad.json"), "--out",
                           str(tmp_path / "y"))  # fmt: skip
    assert code == 1 and "unknown settings ['nope']" in err


def test_train_checks_its_data_before_loading_any_model(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", str(tmp_path / "run"), "--mode", "rmt",
                           "--data", str(tmp_path / "nope-data.txt"), "--backbone", str(tmp_path / "nope-model"),
                           "--device", "cpu")  # fmt: skip
    assert code == 1 and "nope-data" in err and "nope-model" not in err, err

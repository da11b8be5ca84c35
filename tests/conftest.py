"""Tiny randomly initialised backbones of several architectures (no downloads, milliseconds each)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 96
ATOL = 1e-5  # fp32 equivalences on the tiny backbones
ARCHS = ("llama", "gpt2", "opt", "qwen2", "gpt_neox")


def tiny_backbone(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer causal LM of the given architecture. OPT's embedding width (16) differs from its hidden size."""
    import transformers as tf

    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    configs = {
        "llama": lambda: tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        ),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common),
        "opt": lambda: tf.OPTConfig(
            hidden_size=32,
            word_embed_proj_dim=16,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        ),
        "qwen2": lambda: tf.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        ),
    }
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[arch]())
    return model.to(dtype).eval()


TINY_SETTINGS = {
    "segment_length": 8, "num_sensory": 2, "cache_size": 4, "attention_sink": False, "memory_tokens": 1, "summary_length": None,
    "recall_temperature": None, "sharpen_recall_after": None,
}  # fmt: skip


def tiny_hmt(arch: str = "llama", seed: int = 0, mode: str = "hmt", **config):
    """An HMTForCausalLM on a tiny backbone, reading in `mode` by default; small segments so a few dozen
    tokens span several. The paper's layout (no attention sink), one memory token and dot-product recall
    unless asked (the defaults before HMTConfig() became the shipped recipe): many tests pin that layout's
    slot positions."""
    from hmt import HMTConfig, HMTForCausalLM

    settings = {**TINY_SETTINGS, **config}
    return HMTForCausalLM(tiny_backbone(arch, seed), HMTConfig(**settings), mode=mode)


def capture_main_inputs(model) -> list[torch.Tensor]:
    """Record the inputs_embeds of every backbone call that computes logits (main passes, not queries)."""
    calls: list[torch.Tensor] = []

    def hook(_module, _args, kwargs):
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor) and bool(keep.any()):
            calls.append(kwargs["inputs_embeds"].detach().clone())

    model.backbone.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def read_in_chunks(model, ids: torch.Tensor, bounds: list[tuple[int, int]]):
    """Read `ids` in calls over [start, stop) column ranges, carrying the state: (token losses joined, state)."""
    state, losses = None, []
    for start, stop in bounds:
        part = model(ids[:, start:stop], state=state)
        state = part.state
        losses.append(part.token_losses)
    return torch.cat(losses, 1), state


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


WORDS = ("the", "memory", "segment", "recall", "token", "long", "context", "model", "reads", "a", "of", "and")


def word_text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture
def corpus(tmp_path):
    """A folder of 10 word documents: 8 train, 1 validation, 1 test by the fixed split rule."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i:02d}.txt").write_text(word_text(i, 400))
    return folder


def tiny_tokenizer():
    """A byte-level BPE trained in memory in milliseconds (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([word_text(i, 200) for i in range(10)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="the")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama and its tokenizer, as save_pretrained writes them."""
    import transformers as tf

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `hmt ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from hmt.cli import main

    return run_main(monkeypatch, capsys, main, *args)


def run_main(monkeypatch, capsys, main, *args: str) -> tuple[int, str, str]:
    """Call an entry point `main` with ARGS as its command line; returns (exit code, stdout, stderr)."""
    import sys

    monkeypatch.setattr(sys, "argv", ["hmt", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err

"""The ask path's training (experiments/train_ask.py) on a tiny Llama with a chat template: a few steps,
the log, the checkpoint, resuming, which weights each `--train` moves, and the gradient shortcut."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_main, tiny_tokenizer, word_text
from experiments.train_ask import cli, end_of_turn, main, student_answer_logits, tool
from hmt.ask import encode

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Small enough to run in seconds, large enough that 2-4 facts of the tiny byte-level vocabulary fit.
SMALL = {"segment_length": 128, "num_sensory": 8, "memory_tokens": 2}
FAST = {"min_segments": 3, "max_segments": 3, "max_new_tokens": 3}


def options(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama with the tiny tokenizer given a chat template (no <|im_end|>: EOS ends turns)."""
    import transformers as tf

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("chat-llama")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    """A text file of short sentences (the facts go in at sentence ends)."""
    path = tmp_path_factory.mktemp("haystack") / "text.txt"
    path.write_text(" ".join(f"{word_text(i, 10)}." for i in range(200)))
    return path


@pytest.fixture(scope="module")
def plain_adapter(chat_model_dir, tmp_path_factory):
    """An adapter of fresh HMT parameters on the tiny backbone, with no LoRA."""
    from hmt import HMTConfig, HMTForCausalLM
    from hmt.backbone import load_backbone

    torch.manual_seed(1)
    model = HMTForCausalLM(load_backbone(str(chat_model_dir)).model, HMTConfig(**SMALL))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder


def run(chat_model_dir, haystack, out, adapter, train: str, steps: int):
    """main() called as a function: returns the trained model."""
    return main(
        out=out, steps=steps, train=train, adapter=str(adapter), backbone=str(chat_model_dir),
        data=str(haystack), **SMALL, **FAST,
    )  # fmt: skip


def backbone_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def base_weights(backbone) -> dict[str, torch.Tensor]:
    """The backbone's own weights by their plain names (peft's wrapping names undone, LoRA left out)."""
    weights = {}
    for name, tensor in backbone.state_dict().items():
        if "lora_" in name:
            continue
        weights[name.removeprefix("base_model.model.").replace(".base_layer", "")] = tensor
    return weights


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from hmt.io import load_adapter_files

    return load_adapter_files(folder)[1]


def test_steps_are_logged_saved_and_resumed(chat_model_dir, haystack, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ask"
    command = [
        "--out", str(out), "--backbone", str(chat_model_dir), "--data", str(haystack), "--adapter", "none",
        *options(SMALL), *options(FAST),
    ]  # fmt: skip
    code, stdout, _ = run_main(monkeypatch, capsys, tool, *command, "--steps", "2")
    assert code == 0 and "start step 0" in stdout and "done" in stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["recall_kl"]) and record["voice_kl"] >= 0
        assert math.isfinite(record["grad_norm"]) and record["segments"] == 3
    assert json.loads((out / "step.json").read_text()) == {"step": 2}
    assert (out / "optimizer.pt").is_file()

    from hmt import HMTForCausalLM
    from hmt.backbone import load_backbone

    saved = HMTForCausalLM.from_pretrained(out / "last", load_backbone(str(chat_model_dir)).model)
    assert saved.config.segment_length == SMALL["segment_length"]
    assert saved.config.memory_tokens == SMALL["memory_tokens"]
    assert (out / "last" / "adapter_config.json").is_file()  # --train lora gave the fresh adapter a LoRA

    # The same command with more steps continues from OUT/last at step 2.
    code, stdout, _ = run_main(monkeypatch, capsys, tool, *command, "--steps", "3")
    assert code == 0 and f"start step 2 from {out / 'last'}" in stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads((out / "step.json").read_text()) == {"step": 3}


def test_train_memory_moves_only_hmt_parameters(chat_model_dir, haystack, plain_adapter, tmp_path):
    model = run(chat_model_dir, haystack, tmp_path / "ask", plain_adapter, "memory", steps=2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = backbone_weights(chat_model_dir)
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    start, trained = adapter_tensors(plain_adapter), adapter_tensors(tmp_path / "ask" / "last")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert not (tmp_path / "ask" / "last" / "adapter_config.json").exists()  # no LoRA


def test_train_lora_moves_lora_and_hmt_parameters_not_the_backbone(
    chat_model_dir, haystack, plain_adapter, tmp_path
):
    # The adapter has no LoRA: training starts a fresh one (its B is zero) around the frozen backbone.
    model = run(chat_model_dir, haystack, tmp_path / "ask", plain_adapter, "lora", steps=2)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = backbone_weights(chat_model_dir)
    after = base_weights(model.backbone)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)

    last = tmp_path / "ask" / "last"
    assert (last / "adapter_config.json").is_file()
    start, trained = adapter_tensors(plain_adapter), adapter_tensors(last)
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_an_unknown_train_mode_is_refused(chat_model_dir, haystack, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(
        monkeypatch, capsys, tool, "--out", str(tmp_path / "ask"), "--train", "full",
        "--backbone", str(chat_model_dir), "--data", str(haystack), "--adapter", "none",
    )  # fmt: skip
    assert code != 0 and "--train is lora or memory" in err


def test_learning_rates_must_be_finite_and_positive(tmp_path, monkeypatch, capsys):
    for option, value in (("--lr", "nan"), ("--memory-lr", "0"), ("--memory-lr", "inf")):
        code, _, err = run_main(monkeypatch, capsys, cli, "--out", str(tmp_path / "ask"), option, value)
        assert code == 1 and f"error: {option} must be a finite number > 0" in err, err
    assert not (tmp_path / "ask").exists()  # refused before anything was loaded or written


def test_a_nan_loss_stops_training_in_one_line_and_keeps_the_last_adapter(
    chat_model_dir, haystack, tmp_path, monkeypatch, capsys
):
    import experiments.train_ask as train_ask

    calls, real_kl = [], train_ask.kl

    def kl_nan_from_step_2(teacher, student):  # two KL terms a step: recall, voice
        calls.append(1)
        value = real_kl(teacher, student)
        return value * float("nan") if len(calls) > 2 else value

    monkeypatch.setattr(train_ask, "kl", kl_nan_from_step_2)
    out = tmp_path / "ask"
    command = [
        "--out", str(out), "--backbone", str(chat_model_dir), "--data", str(haystack), "--adapter", "none",
        "--save-every", "1", "--steps", "3", *options(SMALL), *options(FAST),
    ]  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, cli, *command)
    assert code == 1 and "error: training stopped at step 2: the loss is nan (try a lower --lr" in err, err
    assert "Traceback" not in err
    assert json.loads((out / "step.json").read_text()) == {"step": 1}
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "last").values())


def test_the_teacher_ends_turns_at_im_end_else_at_eos():
    tokenizer = tiny_tokenizer()
    assert end_of_turn(tokenizer) == tokenizer.eos_token_id
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id


@pytest.mark.parametrize("recorded", [[], [0]])
def test_unrecorded_context_segments_pass_no_gradient_through_their_memory(
    chat_model_dir, monkeypatch, recorded
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hmt import HMTConfig, HMTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=64, num_sensory=4, memory_tokens=2)).train()
    written: list[torch.Tensor] = []
    to_memory = model.memory.to_memory

    def spy(hidden):
        memory = to_memory(hidden)
        if memory.requires_grad:
            memory.retain_grad()
        written.append(memory)
        return memory

    monkeypatch.setattr(model.memory, "to_memory", spy)
    context = encode(tokenizer, word_text(3, 200))[:192]  # three whole segments
    assert len(context) == 192
    answer = encode(tokenizer, " the memory")
    logits, _, closed = student_answer_logits(model, tokenizer, context, "what reads?", answer, recorded)
    assert logits.shape == (len(answer), len(tokenizer)) and closed > 3  # the context's and the question's
    logits.logsumexp(-1).sum().backward()
    first, later = written[0], written[1]  # the memories of context segments 0 and 1
    assert not later.requires_grad  # never recorded
    if recorded:
        assert first.grad is not None and bool(first.grad.abs().sum() > 0)  # reached through recall
    else:
        assert not first.requires_grad

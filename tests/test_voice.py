"""What memory must not take away (hmt.voice): helpers, and voice_report on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_tokenizer, word_text
from hmt.ask import answer_logits, ask, ask_turn, encode
from hmt.qa import read_into_memory
from hmt.voice import BackboneAnswers, first_sentence, new_digit_runs, voice_report

PROMPTS = ["What is the capital of France?", "Name three colours."]
MAX_NEW = 4


def test_first_sentence():
    assert first_sentence("Paris is the capital. It is in France.") == "Paris is the capital."
    assert first_sentence("  Yes!  It   is. ") == "Yes!"
    assert first_sentence("Really? Yes.") == "Really?"
    assert first_sentence("It  is\tPi, 3.14 or so. More.") == "It is Pi, 3.14 or so."  # 3.14 ends nothing
    assert first_sentence("no end at all") == "no end at all"
    assert first_sentence("Paris\nIt is the capital.") == "Paris"  # a line break ends it too
    assert first_sentence("\n\n  Paris is big.\nMore") == "Paris is big."
    assert first_sentence("") == ""


def test_new_digit_runs():
    assert new_digit_runs("Call 12345 or 99 or 2024.", "It was 2024.") == ["12345"]
    assert new_digit_runs("no digits", "") == []
    assert new_digit_runs("4321 and 4321", "") == ["4321", "4321"]
    assert new_digit_runs("the year 1999", "in 1999") == []


@pytest.fixture(scope="module")
def setup():
    """The tiny tokenizer, a tiny random Llama over its vocabulary and HMT around it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    backbone = LlamaForCausalLM(config).eval()
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=32, num_sensory=4, cache_size=16)).eval()
    return tokenizer, model, backbone


@torch.no_grad()
def _kl_by_hand(model, backbone, tokenizer, prompt, state) -> float:
    """KL(backbone || hmt) per token on the backbone's greedy answer; the backbone's logits taken from
    generation itself (with its KV cache), the hmt model's from the ask path teacher-forced."""
    ids = encode(tokenizer, ask_turn(tokenizer, prompt).text)
    out = backbone.generate(
        ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    answer = out.sequences[0, len(ids) :]
    teacher = torch.cat(out.logits).float()
    assert teacher.shape[0] == len(answer) > 0
    student, _ = answer_logits(model, tokenizer, prompt, answer, state)
    kl = F.kl_div(student.float().log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
    return float(kl.sum(-1).mean())


def test_voice_report_after_reading_matches_kl_and_answers_by_hand(setup):
    tokenizer, model, backbone = setup
    context = torch.tensor(tokenizer(word_text(3, 60), add_special_tokens=False)["input_ids"])[:100]
    state = read_into_memory(model, context)
    memories_before = state.memories.clone()
    calls = []
    report = voice_report(
        model, backbone, tokenizer, PROMPTS, MAX_NEW, {"read": state}, progress=lambda *a: calls.append(a)
    )
    assert calls == [("read", 1, 2), ("read", 2, 2)]
    assert (
        report["prompts"] == 2
        and report["max_new_tokens"] == MAX_NEW
        and list(report["memories"]) == ["read"]
    )
    assert torch.equal(state.memories, memories_before)  # asking does not change the memory asked from
    memory = report["memories"]["read"]
    rows = memory["rows"]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    assert memory["mean_kl"] == pytest.approx(sum(r["kl"] for r in rows) / 2)
    assert 0 <= memory["same_first_sentence"] <= 1
    assert memory["same_first_sentence"] == sum(r["same_first_sentence"] for r in rows) / 2
    assert memory["answers_with_new_digit_runs"] == sum(bool(r["new_digit_runs"]) for r in rows)
    assert memory["seconds"] >= 0
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert row["same_first_sentence"] == (first_sentence(row["hmt"]) == first_sentence(row["backbone"]))
        assert row["new_digit_runs"] == new_digit_runs(row["hmt"], row["backbone"])
        expected = _kl_by_hand(model, backbone, tokenizer, prompt, state)
        assert row["kl"] == pytest.approx(expected, rel=1e-3, abs=1e-7), prompt
    # the last prompt's answer is ask's after the same reading (the earlier asks left the state as it was)
    reply = ask(model, tokenizer, PROMPTS[-1], state, max_new_tokens=MAX_NEW, do_sample=False)
    assert rows[-1]["hmt"] == reply.text


def test_voice_report_with_an_empty_memory(setup):
    """By default one memory, empty; the reference is the backbone's own greedy answer to the ask turn."""
    tokenizer, model, backbone = setup
    report = voice_report(model, backbone, tokenizer, PROMPTS[:1], MAX_NEW)
    assert list(report["memories"]) == ["empty"]
    (row,) = report["memories"]["empty"]["rows"]
    assert row["kl"] == pytest.approx(
        _kl_by_hand(model, backbone, tokenizer, PROMPTS[0], None), rel=1e-3, abs=1e-7
    )
    ids = encode(tokenizer, ask_turn(tokenizer, PROMPTS[0]).text)
    out = backbone.generate(
        ids[None],
        attention_mask=torch.ones_like(ids[None]),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).split("\nQuestion:")[0].strip()
    assert row["backbone"] == text


def test_the_backbone_answers_each_prompt_once(setup, monkeypatch):
    tokenizer, _, backbone = setup
    reference = BackboneAnswers(backbone, tokenizer, MAX_NEW)
    calls = []
    generate = backbone.generate
    monkeypatch.setattr(backbone, "generate", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    first = reference(PROMPTS[0])
    again = reference(PROMPTS[0])
    assert len(calls) == 1 and again is first
    answer, logits, _ = first
    assert logits.dtype == torch.float32 and logits.shape == (len(answer), len(tokenizer))
    assert torch.equal(logits.argmax(-1), answer)  # greedy: each answer token is its logits' argmax


def test_no_prompts_is_an_error(setup):
    tokenizer, model, backbone = setup
    with pytest.raises(ValueError, match="no prompts"):
        voice_report(model, backbone, tokenizer, [])


# --- `hmt voice` ------------------------------------------------------------------------------------------


def voice_args(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    (tmp_path / "text.txt").write_text(word_text(5, 200))  # one file: read whole (it has no test split)
    (tmp_path / "prompts.txt").write_text(
        "What is the capital of France?\n\nName a colour.\nCount to three.\n"
    )
    return [
        "voice", "--backbone", str(tiny_model_dir), "--adapter", "none", "--prompts", str(tmp_path / "prompts.txt"),
        "--limit", "1", "--context-tokens", "128", "--data", str(tmp_path / "text.txt"), "--max-new-tokens", "3",
        "--segment-length", "32", "--num-sensory", "4", "--dtype", "fp32", "--device", "cpu",
        "--out", str(tmp_path / "voice"), *extra,
    ]  # fmt: skip


def test_voice_command_writes_results_and_a_table(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, stdout, err = run_cli(monkeypatch, capsys, *voice_args(tiny_model_dir, tmp_path, "--answers"))
    assert code == 0, err
    flat = "".join(stdout.split())  # rich wraps the title and folds long paths to the console's width
    assert "shortchatsagainsttheuntouchedbackbone" in flat and "results.json" in flat
    report = json.loads((tmp_path / "voice" / "results.json").read_text())
    assert report["prompts"] == 1 and report["max_new_tokens"] == 3  # --limit 1: the first prompt only
    assert report["prompts_source"] == str(tmp_path / "prompts.txt") and report["adapter"] is None
    assert list(report["memories"]) == ["empty", "after 128 tokens of " + str(tmp_path / "text.txt")]
    for memory in report["memories"].values():
        assert [r["prompt"] for r in memory["rows"]] == ["What is the capital of France?"]
        assert math.isfinite(memory["mean_kl"]) and memory["mean_kl"] >= 0
        assert 0 <= memory["same_first_sentence"] <= 1 and memory["answers_with_new_digit_runs"] in (0, 1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--limit", "-1"), "--limit and --context-tokens must be >= 0"),
        (("--prompts", "no-such-file.txt"), "no-such-file.txt is not a file"),
    ],
)
def test_voice_command_errors_are_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, extra, message):
    code, _, err = run_cli(monkeypatch, capsys, *voice_args(tiny_model_dir, tmp_path, *extra))
    assert code == 1 and err.startswith("error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "voice" / "results.json").exists()

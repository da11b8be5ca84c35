"""Recall tasks (hmt.tasks) and the needle evaluation (hmt.needle, `hmt needle`) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ATOL, run_cli, tiny_tokenizer
from hmt.needle import NeedleConfig, run_needle, score_full_row, score_memory_row
from hmt.tasks import NUM_CANDIDATES, TASKS, RecallTasks, TaskBatches

SENTENCES = " ".join(
    f"the model reads a long context {i % 7}. memory of the segment recall token." for i in range(60)
)


@pytest.fixture(scope="module")
def tasks() -> RecallTasks:
    tokenizer = tiny_tokenizer()
    haystack = torch.tensor(tokenizer(SENTENCES)["input_ids"])
    return RecallTasks(tokenizer, haystack)


def make(tasks: RecallTasks, task: str, length: int = 300, depth: float = 0.5, seed: int = 0, **kw):
    return tasks.sample(task, length, depth, torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("task", TASKS)
def test_a_sample_holds_its_fact_and_asks_it_at_the_end(tasks, task):
    sample = make(tasks, task, length=400, num_keys=3)
    decode = tasks.tokenizer.decode
    assert sample.context.numel() == 400
    assert len(sample.candidates) == NUM_CANDIDATES
    assert len({tuple(c.tolist()) for c in sample.candidates}) == NUM_CANDIDATES  # distinct
    start, end = sample.asked_span
    assert decode(sample.answer).strip() in decode(sample.context[start:end])
    assert "?" in decode(sample.context[-12:])  # the question closes the context
    assert len(sample.prompt) > 0
    ids, labels = sample.sequence()
    assert torch.equal(ids[labels != -100], sample.answer)
    if task == "multikey":
        assert len(sample.fact_spans) == 3
        others = [decode(sample.context[a:b]) for (a, b) in sample.fact_spans if (a, b) != sample.asked_span]
        assert all(decode(sample.answer).strip() not in text for text in others)


def test_facts_ask_the_last_place_a_person_went(tasks):
    for seed in range(5):
        sample = make(tasks, "facts", seed=seed)
        decode = tasks.tokenizer.decode
        person = decode(sample.prompt).split()[0]
        moves = sorted(
            (a, decode(sample.context[a:b]))
            for a, b in sample.fact_spans
            if decode(sample.context[a:b]).split()[0] == person
        )
        assert len(moves) == 2
        assert moves[-1][0] == sample.asked_span[0]  # the asked fact is the person's last move
        assert moves[-1][1].rstrip(".").endswith(decode(sample.answer).strip())


def test_samples_are_reproducible_and_depth_places_the_fact(tasks):
    a, b = make(tasks, "needle", seed=3), make(tasks, "needle", seed=3)
    assert torch.equal(a.context, b.context) and a.answer_index == b.answer_index
    assert not torch.equal(make(tasks, "needle", seed=4).context, a.context)
    early, late = make(tasks, "passkey", 400, 0.1), make(tasks, "passkey", 400, 0.9)
    assert early.asked_span[0] < 120 < 250 < late.asked_span[0]


def test_a_short_haystack_repeats_to_fill_the_context(tasks):
    sample = make(tasks, "passkey", length=3 * tasks.haystack.numel())
    assert sample.context.numel() == 3 * tasks.haystack.numel()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "trivia"}, "task must be one of"),
        ({"depth": 1.5}, "depth must be between 0 and 1"),
        ({"length": 10}, "too short"),
        ({"task": "multikey", "num_keys": 5}, "multikey takes 2 to 4 keys"),
    ],
)
def test_bad_task_requests_are_refused(tasks, kwargs, message):
    request = {"task": "passkey", "length": 200, "depth": 0.5, **kwargs}
    task, length, depth = request.pop("task"), request.pop("length"), request.pop("depth")
    with pytest.raises(ValueError, match=message):
        make(tasks, task, length, depth, **request)


def test_task_batches_score_the_answer_and_record_fact_question_and_answer(tasks):
    source = TaskBatches(tasks, ("passkey", "needle"), segment_length=32, batch_size=3, seed=0)
    batch = source.batch(0, 128)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.grad_segments.shape == (3, -(-batch.input_ids.shape[1] // 32))
    for row in range(3):
        scored = (batch.labels[row] != -100).nonzero().flatten()
        assert scored.min() > 128  # after the context and the answer's prompt
        assert batch.grad_segments[row, 3:].all()  # the question's segment and the answer's
    assert torch.equal(source.batch(0, 128).input_ids, batch.input_ids)  # a function of the index
    assert not batch.grad_segments.all()  # some haystack segment runs forward-only


def test_max_depth_keeps_facts_out_of_the_questions_segment(tasks):
    """Depths in [0, 0.4] of an 8-segment context put every asked fact in its first half."""
    source = TaskBatches(tasks, ("passkey",), segment_length=64, batch_size=4, seed=3, max_depth=0.4)
    for index in range(3):
        batch = source.batch(index, 512)
        assert bool((batch.fact_segments <= 3).all())
    with pytest.raises(ValueError, match="max_depth"):
        TaskBatches(tasks, ("passkey",), 32, 2, 0, max_depth=0.0)


def test_task_batches_mix_in_plain_text(tasks):
    from hmt.data import RandomWindows

    text = RandomWindows(tasks.haystack, 2, seed=0)
    source = TaskBatches(tasks, ("passkey",), 32, 2, 0, text=text, text_every=2)
    assert source.batch(0, 128).grad_segments is not None
    plain = source.batch(1, 128)
    assert plain.grad_segments is None and bool((plain.labels != -100).all())


# ---- the needle evaluation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tasks):
    """A tiny random Llama over the tiny tokenizer's vocabulary, and HMT around it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tasks.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    backbone = LlamaForCausalLM(config).eval()
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=32, num_sensory=4, cache_size=16)).eval()
    return model, backbone


def test_memory_row_scores_the_answer_as_one_call_would(tasks, pair):
    """A context of whole segments read in one call with prompt and answer gives the same exact-match
    event as the two-call scoring (the answer's segment starts after the question either way)."""
    model, _ = pair
    sample = make(tasks, "passkey", length=160)
    exact, rank, predicted = score_memory_row(model, sample, "hmt")
    ids, _ = sample.sequence()
    with torch.no_grad():
        logits = model(ids[None], return_logits=True).logits[0]
    start = len(sample.context) + len(sample.prompt)
    first_choice = logits[start - 1 : start - 1 + len(sample.answer)].argmax(-1)
    assert exact == bool((first_choice == sample.answer).all())
    assert torch.equal(predicted, first_choice)
    assert 1 <= rank <= NUM_CANDIDATES


def test_full_row_with_a_kv_cache_equals_one_pass_per_candidate(tasks, pair):
    _, backbone = pair
    sample = make(tasks, "needle", length=200)
    exact, rank, predicted = score_full_row(backbone, sample, window=128)
    nll = []
    with torch.no_grad():
        for i, candidate in enumerate(sample.candidates):
            ids = torch.cat([sample.context, sample.prompt, candidate])[-128:]
            logits = backbone(ids[None]).logits[0, -len(candidate) - 1 : -1]
            nll.append(float(torch.nn.functional.cross_entropy(logits, candidate, reduction="sum")))
            if i == sample.answer_index:
                assert exact == bool((logits.argmax(-1) == candidate).all())
                assert torch.equal(predicted, logits.argmax(-1))
    truth = nll[sample.answer_index]
    assert rank == 1 + sum(v < truth - ATOL for v in nll)


def test_run_needle_fills_the_grid(tasks, pair):
    model, backbone = pair
    config = NeedleConfig(task="passkey", lengths=(128, 192), depths=(0.0, 1.0), trials=2, full_window=128)
    report = run_needle(model, backbone, tasks, config)
    assert set(report["rows"]) == {"full", "sliding", "rmt", "hmt"}
    for cells in report["rows"].values():
        assert [(c["length"], c["depth"]) for c in cells] == [(128, 0.0), (128, 1.0), (192, 0.0), (192, 1.0)]
        assert all(
            c["trials"] == 2 and 0 <= c["exact_match"] <= 1 and 1 <= c["mean_rank"] <= 10 for c in cells
        )
        for cell in cells:  # every trial's answer, recorded alike in every row
            assert [a["exact"] for a in cell["answers"]] == [
                a["answer"] == a["expected"] for a in cell["answers"]
            ]
    truths = [[a["expected"] for c in cells for a in c["answers"]] for cells in report["rows"].values()]
    assert all(t == truths[0] for t in truths) and all(len(t.strip()) == 5 for t in truths[0])


def test_needle_command_writes_results_heatmaps_and_a_table(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "hay.txt").write_text(SENTENCES)
    out = tmp_path / "needle"
    args = [
        "needle", "--backbone", str(tiny_model_dir), "--adapter", "none", "--data", str(tmp_path / "hay.txt"),
        "--split", "all", "--lengths", "128,192", "--depths", "0,100", "--trials", "1", "--segment-length", "16",
        "--num-sensory", "4", "--dtype", "fp32", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--answers")
    assert code == 0, err
    assert "what each row answered" in stdout
    report = json.loads((out / "results.json").read_text())
    assert set(report["means"]) == {"full", "sliding", "rmt", "hmt"}
    for row in report["means"]:
        assert (out / f"needle_{row}.png").stat().st_size > 0
    assert "exact match" in stdout and "hmt" in stdout
    code, _, err = run_cli(monkeypatch, capsys, *args)  # refuses to overwrite
    assert code == 1 and "overwrite" in err


def test_needle_config_errors():
    with pytest.raises(ValueError, match="rows must be among"):
        NeedleConfig(rows=("hmt", "oracle"))
    with pytest.raises(ValueError, match="depths are fractions"):
        NeedleConfig(depths=(50,))


def test_answer_in_memory_reads_the_fact_segments_memory_with_the_lm_head(tasks, pair):
    from hmt import HMTConfig, HMTForCausalLM
    from hmt.tasks import RecallSupervision

    _, backbone = pair
    model = HMTForCausalLM(
        backbone, HMTConfig(segment_length=32, num_sensory=4, cache_size=16, memory_tokens=3)
    )
    source = TaskBatches(tasks, ("passkey",), segment_length=32, batch_size=2, seed=1)
    batch = source.batch(0, 160)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                grad_segments=batch.grad_segments)  # fmt: skip
    supervision = RecallSupervision(1.0)
    term = supervision(model, batch, batch.labels, out)
    rows = torch.arange(2)
    written = out.state.memories[rows, batch.fact_segments].view(2, 3, -1) / model.memory.memory_scale
    logits = backbone.get_output_embeddings()(written)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.answer_ids[:, :3].flatten())
    torch.testing.assert_close(term, expected)
    logged = supervision.drain_terms()  # each term apart in the training log, then emptied
    assert logged == pytest.approx({"answer_loss": float(out.loss), "answer_in_memory": float(expected)})
    assert supervision.drain_terms() == {}
    term.backward()
    assert model.memory.memory_scale.grad is not None and model.memory.memory_scale.grad != 0
    from hmt.data import RandomWindows

    plain = RandomWindows(tasks.haystack, 2, seed=0).batch(0, 64)  # plain text carries no answer
    assert RecallSupervision(0.5)(model, plain, plain.labels, model(plain.input_ids)) is None


def test_recall_loss_pulls_the_answer_segments_recall_toward_the_fact(tasks, pair):
    from hmt import HMTConfig, HMTForCausalLM
    from hmt.tasks import RecallSupervision

    _, backbone = pair
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=32, num_sensory=4, cache_size=16))
    batch = TaskBatches(tasks, ("needle",), segment_length=32, batch_size=2, seed=2).batch(0, 192)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    supervision = RecallSupervision(0.0, recall_weight=1.0)
    term = supervision(model, batch, batch.labels, out)
    weights = out.recall_weights[-1]  # over the memories of segments 0 .. answer - 1, oldest first
    expected = -weights[torch.arange(2), batch.fact_segments].log().mean()
    torch.testing.assert_close(term, expected)
    assert supervision.drain_terms()["recall_ce"] == pytest.approx(float(expected))
    term.backward()
    assert model.memory.query_proj.weight.grad.abs().sum() > 0

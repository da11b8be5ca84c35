"""The synthetic recall task: generation is exact; and (marked `recall`) memory really learns it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_main as run_tool
from experiments.recall_task import (
    ANS,
    ASK,
    FACT,
    RecallExperiment,
    RecallTask,
    RecallTaskBatches,
    build_model,
    main,
    run_recall_experiment,
)
from hmt.config import IGNORE_INDEX


def test_samples_put_the_fact_far_back_and_the_answer_after_the_query():
    task = RecallTask(segment_length=16, num_segments=6, num_facts=3, min_distance=4)
    ids, labels, asked = task.batch(64, seed=3)
    L, j = task.segment_length, task.query_length
    for row in range(64):
        sample = ids[row].reshape(6, L)
        # "ASK key" ends the fifth segment (the causal query of the last one reads it); "ANS value" opens
        # the last, so the value is predicted inside the segment that recalled with the question.
        assert sample[-2, -2] == ASK and sample[-1, 0] == ANS
        key, answer = int(sample[-2, -1]), int(sample[-1, 1])
        assert j <= L and task.answer_position == 5 * L + 1
        facts = [(s, int(p)) for s in range(5) for p in torch.nonzero(sample[s] == FACT).flatten()]
        assert len(facts) == 3 and len({s for s, _ in facts}) == 3  # each fact in its own segment
        assert all(p + 2 < L // 2 for _, p in facts)  # first half: never in the sensory tokens
        (home,) = [s for s, p in facts if int(sample[s, p + 1]) == key]
        assert int(sample[home, next(p for s, p in facts if s == home) + 2]) == answer
        assert home == asked[row] and 5 - home >= 4
    assert (labels != IGNORE_INDEX).sum(1).eq(1).all()  # only the answer is scored
    assert torch.equal(labels[:, task.answer_position], ids[:, task.answer_position])
    assert torch.equal(task.batch(4, seed=3)[0], ids[:4])  # seeded


def test_batches_follow_the_unroll_curriculum():
    source = RecallTaskBatches(RecallTask(num_segments=6, min_distance=4), batch_size=2, seed=0)
    short = source.batch(0, 32)  # 2 segments: the distance shrinks to fit
    assert short.input_ids.shape == (2, 32)
    assert short.reset.all()  # independent samples: memory starts empty every time
    assert source.batch(0, 96).input_ids.shape == (2, 96)
    with pytest.raises(ValueError, match="whole segments"):
        source.batch(0, 40)


def test_every_arm_starts_from_the_same_weights_and_reads_in_its_own_mode():
    experiment = RecallExperiment(task=RecallTask(num_segments=3, min_distance=2), steps=3)
    models = {arm: build_model(experiment, arm) for arm in ("backbone", "rmt", "hmt")}
    assert {arm: model.mode for arm, model in models.items()} == {
        "backbone": "backbone",
        "rmt": "rmt",
        "hmt": "hmt",
    }
    first = dict(models["backbone"].named_parameters())
    for model in models.values():
        assert all(torch.equal(p, first[name]) for name, p in model.named_parameters())
    assert experiment.unroll == "2:1,3"


@pytest.mark.recall
@pytest.mark.slow
def test_memory_learns_to_recall_a_fact_four_segments_back(tmp_path):
    """Trained from scratch, equal budgets: the windowed backbone stays at chance, rmt and hmt answer."""
    task = RecallTask(segment_length=16, num_segments=5, num_facts=1, min_distance=4)
    experiment = RecallExperiment(task=task, steps=700, curriculum="2:250,5")
    results = run_recall_experiment(experiment, tmp_path)
    chance = 1 / task.num_values
    assert results["backbone"].accuracy < 2.5 * chance, results["backbone"]
    assert results["rmt"].accuracy >= 0.9, results["rmt"]
    assert results["hmt"].accuracy >= 0.9, results["hmt"]


def test_recall_task_command_writes_results(tmp_path, monkeypatch, capsys):
    args = [
        "--segments",
        "3",
        "--distance",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "run"),
    ]
    code, _, err = run_tool(monkeypatch, capsys, main, *args)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(report["arms"]) == {"backbone", "rmt", "hmt"}
    assert {"accuracy", "chance", "recall_hit_rate", "recall_distance"} <= set(report["arms"]["hmt"])
    assert report["experiment"]["unroll"] == "2:1,3"
    trained = [json.loads(line)["step"] for line in (tmp_path / "run" / "hmt" / "train_log.jsonl").open()]
    assert trained[-1] == 3
    assert (tmp_path / "run" / "recall_at_question.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_tool(monkeypatch, capsys, main, *args, "--arms", "hmt")
    assert code == 1 and "results.json exists" in err
    code, _, err = run_tool(
        monkeypatch, capsys, main, *args[:-2], "--out", str(tmp_path / "other"), "--arms", "lstm"
    )
    assert code == 1 and "arms must be among backbone, rmt, hmt" in err

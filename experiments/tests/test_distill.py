"""Context distillation: the teacher reads what the student's memory has read, aligned position by position."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import random_ids, tiny_hmt
from experiments.distill import Distillation, distillation_loss, distilled_positions
from hmt.config import IGNORE_INDEX
from hmt.data import Batch, RandomWindows, StreamLanes
from hmt.train import TrainConfig, train

ATOL_KL = 1e-5  # nats per position: a student that sees exactly the teacher's tokens


def _kl(model, ids, history, labels=None, positions=None):
    labels = ids if labels is None else labels
    return distillation_loss(
        model.backbone,
        ids,
        history,
        labels,
        model(ids, labels=labels, return_logits=True).logits,
        model.config.segment_length,
        positions,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_sliding_student_that_sees_the_teachers_tokens_matches_it_across_streamed_windows(arch):
    # One segment per window and k = context: the student reads [k previous tokens | segment], exactly
    # what the teacher reads. Streaming carries the sensory tokens across calls and the distillation
    # term keeps the history, both emptied when the lanes start over (at batch 4), so any misalignment
    # (history, positions, the last position, the reset) shows as a positive KL.
    model = tiny_hmt(arch, segment_length=8, num_sensory=5, mode="sliding")
    source = StreamLanes(random_ids(1, 64)[0], batch_size=2)  # lanes of 32 tokens: 4 windows each
    distillation = Distillation(1.0, context=5)
    state, kls = None, []
    for index in range(8):
        batch = source.batch(index, 8)
        if state is not None:
            state = state.reset(batch.reset)
        out = model(batch.input_ids, state=state, return_logits=True)
        state = out.state
        kls.append(float(distillation(model, batch, batch.input_ids, out).detach()))
    assert max(kls) < ATOL_KL
    # The check has teeth: a student with fewer sensory tokens than the teacher's history differs.
    ids = random_ids(2, 8)
    with model.reading(num_sensory=2):
        assert float(_kl(model, ids, random_ids(2, 5, seed=2)).detach()) > 1e-3


def test_the_teacher_reads_history_and_window_in_one_causal_pass():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2, mode="backbone")
    ids, history = random_ids(2, 24), random_ids(2, 6, seed=3)
    student = model(ids, return_logits=True).logits.detach()
    # A student given exactly the teacher's logits has KL 0; given the logits without history, not.
    with torch.no_grad():
        teacher = model.backbone(input_ids=torch.cat([history, ids], 1)).logits[:, 6:]
    assert float(distillation_loss(model.backbone, ids, history, ids, teacher, 8)) < ATOL_KL
    assert float(distillation_loss(model.backbone, ids, history, ids, student, 8)) > 1e-3
    no_history = model.backbone(input_ids=ids).logits.detach()
    assert float(distillation_loss(model.backbone, ids, ids[:, :0], ids, no_history, 8)) < ATOL_KL


def test_distilled_positions_follow_segments_and_labels():
    labels = torch.arange(24)[None].repeat(2, 1)
    assert distilled_positions(labels, 8, None).tolist() == list(
        range(23)
    )  # the last predicts past the input
    assert distilled_positions(labels, 8, 3).tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]
    labels[:, :17] = IGNORE_INDEX  # loss on the last segment only: position 15 predicts token 16, ignored
    assert distilled_positions(labels, 8, 3).tolist() == [16, 17, 18]
    labels[0, 17:] = IGNORE_INDEX  # one row scores nothing: still distilled for the other
    assert distilled_positions(labels, 8, None).tolist() == list(range(16, 23))
    labels[:] = IGNORE_INDEX
    model = tiny_hmt("llama", mode="sliding")
    ids = random_ids(2, 24)
    assert _kl(model, ids, ids[:, :0], labels) is None
    out = model(ids, labels=labels, return_logits=True)
    batch = Batch(ids, labels, torch.ones(2, dtype=torch.bool))
    assert Distillation(1.0)(model, batch, labels, out) is None  # nothing scored: no term


def test_kl_and_its_gradient_match_autograd_and_reach_the_memory():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2, mode="hmt", cache_size=4)
    ids, history = random_ids(2, 24), random_ids(2, 7, seed=4)
    labels = ids.clone()
    labels[1, 10:] = IGNORE_INDEX
    student = model(ids, labels=labels, return_logits=True).logits
    leaf = student.detach().requires_grad_(True)
    kl = distillation_loss(model.backbone, ids, history, labels, leaf, 8, positions=3)
    kl.backward()
    # The same by autograd on the whole tensors.
    kept = distilled_positions(labels, 8, 3)
    with torch.no_grad():
        teacher = torch.log_softmax(model.backbone(input_ids=torch.cat([history, ids], 1)).logits[:, 7:], -1)
    reference_leaf = student.detach().requires_grad_(True)
    log_q = torch.log_softmax(reference_leaf[:, kept], -1)
    per_position = (teacher[:, kept].exp() * (teacher[:, kept] - log_q)).sum(-1)
    scored = labels[:, kept + 1] != IGNORE_INDEX
    reference = (per_position * scored).sum() / scored.sum()
    reference.backward()
    assert torch.allclose(kl, reference, atol=1e-6)
    assert torch.allclose(leaf.grad, reference_leaf.grad, atol=1e-7)
    # Through the student's forward pass the term reaches the memory's own parameters.
    model.zero_grad()
    _kl(model, ids, history, labels).backward()
    for name in ("initial_memory", "summary_prompt", "query_proj.weight"):
        grad = dict(model.memory.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_the_term_is_the_kl_and_the_teacher_is_left_as_it_was():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2, mode="rmt")
    model.train()
    ids = random_ids(2, 16)
    out = model(ids, return_logits=True)
    batch = Batch(ids, ids.clone(), torch.ones(2, dtype=torch.bool))
    distillation = Distillation(0.25)
    term = distillation(model, batch, ids, out)
    assert torch.allclose(term, _kl(model, ids, ids[:, :0]), atol=1e-6)  # train() adds weight x term
    assert distillation.weight == 0.25
    assert model.backbone.training  # the teacher read in eval mode, then gave the mode back


def test_the_history_is_what_each_rows_memory_has_read_since_its_reset():
    source = StreamLanes(torch.arange(80), batch_size=2)  # lanes of 40 tokens: 4 windows of 10, then over
    distillation = Distillation(1.0, context=15)
    histories = []
    for index in range(6):
        batch = source.batch(index, 10)
        histories.append(distillation.history(batch))
        distillation.remember(batch)
    assert [h.shape[1] for h in histories] == [0, 10, 15, 15, 0, 10]  # emptied with the memory
    assert histories[2][0].tolist() == list(range(5, 20))
    assert histories[2][1].tolist() == list(range(45, 60))
    assert histories[5][1].tolist() == list(range(40, 50))
    # One row reset alone: every row reads as much history as the shortest (one teacher pass).
    ids = torch.arange(100, 120).reshape(2, 10)
    alone = Batch(ids, ids.clone(), torch.tensor([False, True]))
    assert distillation.history(alone).shape == (2, 0)
    distillation.remember(alone)
    after = Batch(ids + 20, ids + 20, torch.tensor([False, False]))
    assert distillation.history(after).tolist() == [list(range(100, 110)), list(range(110, 120))]
    # Random windows start with an empty memory every batch: no history.
    windows, fresh = RandomWindows(torch.arange(200), batch_size=2, seed=0), Distillation(1.0, context=15)
    for index in range(3):
        batch = windows.batch(index, 10)
        assert fresh.history(batch).shape == (2, 0)
        fresh.remember(batch)


def test_training_with_distillation_logs_the_kl_and_resumes(tmp_path):
    model = tiny_hmt("llama", segment_length=8, num_sensory=2, mode="hmt", cache_size=4)
    model.backbone.requires_grad_(True)
    stream = random_ids(1, 400)[0]
    config = TrainConfig(
        mode="hmt", unroll="2", batch_size=2, streaming=True, max_steps=4, log_every=2, save_every=2,
        eval_every=0,
    )  # fmt: skip
    summary = train(model, StreamLanes(stream, 2), config, tmp_path, auxiliary=Distillation(0.5, context=12))
    kls = [r["distill_kl"] for r in summary.history]
    assert len(kls) == 2 and all(k > 0 for k in kls)
    resumed = train(
        tiny_hmt("llama", segment_length=8, num_sensory=2, mode="hmt", cache_size=4),
        StreamLanes(stream, 2),
        replace(config, max_steps=6),
        tmp_path,
        resume=True,
        auxiliary=Distillation(0.5, context=12),
    )
    assert resumed.steps == 6 and "distill_kl" in resumed.history[-1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weight": -1.0}, "distill_weight must be >= 0"),
        ({"weight": float("nan")}, "distill_weight must be >= 0"),
        ({"weight": 1.0, "context": 0}, "distill_context must be >= 1"),
        ({"weight": 1.0, "positions": 0}, "distill_positions must be >= 1"),
    ],
)
def test_distillation_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**settings)

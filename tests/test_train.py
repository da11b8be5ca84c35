"""The trainer: schedules, data order, loss placement, checkpoints and resume (tiny random backbones)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_ids, tiny_hmt
from hmt.backbone import prepare_backbone
from hmt.checkpoints import checkpoint_dirs
from hmt.config import IGNORE_INDEX
from hmt.data import RandomWindows, StreamLanes
from hmt.train import (
    TrainConfig,
    TrainingDiverged,
    _loss_labels,
    lr_factor,
    parse_unroll,
    set_trainable_memory,
    train,
)


def quiet(**changes) -> TrainConfig:
    base = {
        "max_steps": 6,
        "log_every": 2,
        "eval_every": 0,
        "save_every": 100,
        "warmup_steps": 2,
        "batch_size": 2,
    }
    return TrainConfig(**{**base, **changes})


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- settings -------------------------------------------------------------------------------------


def test_unroll_curriculum():
    assert parse_unroll("4") == [(4, None)]
    assert parse_unroll("2:100,4:300,8") == [(2, 100), (4, 300), (8, None)]
    config = TrainConfig(unroll="2:3,4:5,8")
    assert [config.unroll_at(s) for s in range(7)] == [2, 2, 2, 4, 4, 8, 8]
    assert config.max_unroll == 8
    for bad in ("", "0", "2:100", "2,4", "4:10,2:5,8", "x"):
        with pytest.raises(ValueError, match="unroll"):
            parse_unroll(bad)


def test_learning_rate_warms_up_then_decays_in_steps():
    config = TrainConfig(warmup_steps=4, decay_every=10, decay_factor=0.5)
    assert [lr_factor(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(13, config) == 1.0 and lr_factor(14, config) == 0.5 and lr_factor(34, config) == 0.125


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "full"}, "mode must be one of"),
        ({"loss_on": "first"}, "loss_on must be all or last"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"bptt_depth": 0}, "bptt_depth must be >= 1"),
        ({"decay_factor": 1.5}, "decay_factor"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"memory_lr": float("inf")}, "memory_lr must be a finite number > 0, got inf"),
        ({"memory_lr": 0.0}, "memory_lr must be a finite number > 0, got 0.0"),
        ({"lr": -1e-4}, "lr must be a finite number > 0"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number >= 0"),
    ],
)
def test_train_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_loss_on_the_last_segment_only():
    labels = torch.arange(20).reshape(1, 20)
    assert torch.equal(_loss_labels(labels, TrainConfig(loss_on="all"), 8), labels)
    last = _loss_labels(labels, TrainConfig(loss_on="last"), 8)
    assert (last[0, :16] == IGNORE_INDEX).all() and torch.equal(last[0, 16:], labels[0, 16:])


def test_rmt_trains_only_the_parameters_it_uses():
    model = tiny_hmt("llama")
    set_trainable_memory(model, "rmt")
    assert {n for n, p in model.memory.named_parameters() if p.requires_grad} == {
        "initial_memory",
        "memory_scale",
    }
    set_trainable_memory(model, "hmt")
    assert all(p.requires_grad for p in model.memory.parameters())
    set_trainable_memory(model, "memory_off")
    assert [n for n, p in model.memory.named_parameters() if p.requires_grad] == ["initial_memory"]
    for control in ("backbone", "sliding"):
        set_trainable_memory(model, control)
        assert not any(p.requires_grad for p in model.memory.parameters())
    with_sink = tiny_hmt("llama", attention_sink=True)
    for mode, expected in (
        ("rmt", {"initial_memory", "sink", "memory_scale"}),
        ("memory_off", {"initial_memory", "sink"}),
    ):
        set_trainable_memory(with_sink, mode)
        assert {n for n, p in with_sink.memory.named_parameters() if p.requires_grad} == expected


# ---- data ----------------------------------------------------------------------------------------


def test_random_windows_are_a_function_of_the_index():
    stream = torch.arange(1000)
    source = RandomWindows(stream, batch_size=3, seed=7)
    a, b = source.batch(5, 40), source.batch(5, 40)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(
        a.input_ids, source.batch(6, 40).input_ids
    )
    assert (a.input_ids[:, 1:] - a.input_ids[:, :-1] == 1).all()  # contiguous windows of the stream
    other_rank = RandomWindows(stream, batch_size=3, seed=7, rank=1, world=2).batch(5, 40)
    assert not torch.equal(other_rank.input_ids, RandomWindows(stream, 3, 7, 0, 2).batch(5, 40).input_ids)
    with pytest.raises(ValueError, match="fewer than one sample"):
        RandomWindows(torch.arange(30), 1, 0).batch(0, 40)


def test_stream_lanes_read_in_order_and_start_over():
    source = StreamLanes(torch.arange(100), batch_size=2)  # lanes [0, 50) and [50, 100)
    first, second = source.batch(0, 20), source.batch(1, 20)
    assert first.input_ids[:, 0].tolist() == [0, 50] and first.reset.all()
    assert second.input_ids[:, 0].tolist() == [20, 70] and not second.reset.any()
    third = source.batch(2, 20)  # 40 + 20 > 50: back to the start, memory reset
    assert third.input_ids[:, 0].tolist() == [0, 50] and third.reset.all()
    saved = source.state_dict()
    replay = StreamLanes(torch.arange(100), batch_size=2)
    replay.load_state_dict(saved)
    assert torch.equal(replay.batch(3, 20).input_ids, source.batch(3, 20).input_ids)
    with pytest.raises(ValueError, match="fewer than one sample"):
        StreamLanes(torch.arange(30), batch_size=2).batch(0, 20)


# ---- the loop ------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_logs(tmp_path):
    model = tiny_hmt("llama", segment_length=8, num_sensory=2)
    model.backbone.requires_grad_(True)
    pattern = torch.tensor([5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45])
    stream = pattern.repeat(200)
    config = quiet(max_steps=30, log_every=10, lr=3e-3, memory_lr=3e-3, unroll="2", eval_every=30)
    summary = train(model, RandomWindows(stream, 4, 0), config, tmp_path, validation=stream[:200])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert {"tokens_per_second", "lr", "grad_norm", "memory_norm", "embedding_norm", "recall_entropy"} <= set(
        log[-1]
    )
    assert summary.validation["val_ppl"] < 3 and summary.steps == 30


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_exactly(tmp_path, streaming):
    """Killed after a checkpoint and resumed == trained straight through (same data order, same state)."""
    stream = random_ids(1, 3000)[0]

    def run(run_dir, max_steps, resume=False):
        torch.manual_seed(0)
        model = tiny_hmt("llama", segment_length=8, num_sensory=2)
        model.backbone = prepare_backbone(model.backbone, "lora", lora_rank=2)
        source = StreamLanes(stream, 2) if streaming else RandomWindows(stream, 2, 0)
        config = quiet(max_steps=max_steps, save_every=3, streaming=streaming, unroll="2:2,3")
        train(model, source, config, run_dir, resume=resume)
        return model

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)  # "killed" after step 3 (its checkpoint)
    resumed = run(tmp_path / "b", 6, resume=True)
    for name, value in trainable_state(straight).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value, atol=1e-6, rtol=0, msg=name)
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-0000003", "step-0000006"]


def test_checkpoints_are_pruned_and_half_written_ones_ignored(tmp_path):
    model = tiny_hmt("llama")
    train(
        model, RandomWindows(random_ids(1, 500)[0], 2, 0), quiet(save_every=1, keep_checkpoints=2), tmp_path
    )
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000005", "step-0000006"]
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # a folder without trainer.json: not complete
    assert checkpoint_dirs(tmp_path)[-1].name == "step-0000006"


def test_nothing_to_train_is_an_error(tmp_path):
    model = tiny_hmt("llama", mode="backbone")
    model.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, RandomWindows(random_ids(1, 500)[0], 2, 0), quiet(mode="backbone"), tmp_path)


def test_training_stops_on_a_non_finite_loss_before_updating_or_saving(tmp_path):
    model = tiny_hmt("llama")
    with torch.no_grad():
        model.memory.initial_memory.view(-1)[0] = float("nan")
    with pytest.raises(
        TrainingDiverged, match=r"^training stopped at step 1: the loss is nan \(try a lower --lr"
    ):
        train(model, RandomWindows(random_ids(1, 500)[0], 2, 0), quiet(save_every=1), tmp_path)
    assert checkpoint_dirs(tmp_path) == []


class FailsAt:
    """An auxiliary loss that is 0 until its `at`-th call, then NaN (`bad="loss"`) or 0 with a NaN
    gradient (`bad="gradient"`: d sqrt(x)/dx at 0 is inf, times 0)."""

    name, weight, needs_logits = "probe", 1.0, False

    def __init__(self, at: int, bad: str) -> None:
        self.at, self.bad, self.calls = at, bad, 0

    def __call__(self, model, batch, labels, out):
        self.calls += 1
        x = model.memory.initial_memory.sum() * 0
        if self.calls < self.at:
            return x
        return x + float("nan") if self.bad == "loss" else x.sqrt()


@pytest.mark.parametrize(
    ("bad", "problem"), [("loss", "the probe is nan"), ("gradient", "the gradient norm is nan")]
)
def test_training_stops_mid_run_and_keeps_the_last_good_checkpoint(tmp_path, bad, problem):
    model = tiny_hmt("llama")
    config = quiet(save_every=1, grad_accum=2)
    with pytest.raises(TrainingDiverged, match=f"training stopped at step 3: {problem}"):
        train(model, RandomWindows(random_ids(1, 500)[0], 2, 0), config, tmp_path, auxiliary=FailsAt(5, bad))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000001", "step-0000002"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the optimizer never stepped on it


def test_resuming_from_a_checkpoint_holding_nan_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    stream = random_ids(1, 500)[0]
    train(tiny_hmt("llama"), RandomWindows(stream, 2, 0), quiet(max_steps=2, save_every=2), tmp_path)
    weights = checkpoint_dirs(tmp_path)[-1] / "trainable.safetensors"
    tensors = load_file(weights)
    tensors["memory.initial_memory"].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "hmt-checkpoint"})
    with pytest.raises(
        ValueError, match=r"trainable\.safetensors holds NaN or inf .*memory\.initial_memory.*delete"
    ):
        train(tiny_hmt("llama"), RandomWindows(stream, 2, 0), quiet(max_steps=4), tmp_path, resume=True)


def test_training_flushes_subnormal_floats(tmp_path):
    """On CPU every operation on a subnormal float is many times slower, and a saturated recall softmax
    (with Adam's moments of its near-zero gradients) makes plenty: a collapsed run fell from ~200 to ~13
    tokens/s before training flushed them."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    subnormal = torch.tensor([1e-39])
    assert subnormal.mul(1.0).item() > 0
    try:
        model = tiny_hmt("llama", segment_length=8, num_sensory=2)
        train(model, RandomWindows(random_ids(1, 500)[0], 2, 0), quiet(max_steps=1), tmp_path)
        assert subnormal.mul(1.0).item() == 0
    finally:
        torch.set_flush_denormal(False)


def test_gradient_checkpointing_and_bptt_reach_the_model(tmp_path, monkeypatch):
    stream = random_ids(1, 800)[0]
    seen = []

    def run(run_dir, **changes):
        torch.manual_seed(0)
        model = tiny_hmt("llama")
        model.backbone.requires_grad_(True)
        original = model.forward

        def spy(*args, **kwargs):
            seen.append(kwargs.get("bptt_depth"))
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "forward", spy)
        train(model, RandomWindows(stream, 2, 0), quiet(max_steps=2, unroll="3", **changes), run_dir)
        return trainable_state(model)

    plain = run(tmp_path / "a")
    checkpointed = run(tmp_path / "b", gradient_checkpointing=True, bptt_depth=2)
    assert seen[-1] == 2 and seen[0] is None
    with_bptt = run(tmp_path / "c", bptt_depth=2)
    for name, value in with_bptt.items():  # recomputing activations changes nothing
        torch.testing.assert_close(checkpointed[name], value, atol=1e-5, rtol=0, msg=name)
    assert any(not torch.equal(plain[n], with_bptt[n]) for n in plain)  # the cut changes the gradients


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_in_a_checkpoint_is_never_read(tmp_path):
    stream = random_ids(1, 500)[0]
    train(tiny_hmt("llama"), RandomWindows(stream, 2, 0), quiet(max_steps=2, save_every=2), tmp_path)
    folder = checkpoint_dirs(tmp_path)[-1]
    marker = tmp_path / "code-ran"
    for name in ("optimizer.pt", "rng-0.pt", "trainable.pt"):  # what older checkpoints held
        torch.save({"state": _Payload(marker)}, folder / name)
    train(
        tiny_hmt("llama"),
        RandomWindows(stream, 2, 0),
        quiet(max_steps=4, save_every=2),
        tmp_path,
        resume=True,
    )
    assert not marker.exists()
    assert not any(p.suffix == ".pt" for p in checkpoint_dirs(tmp_path)[-1].iterdir())


@pytest.mark.parametrize(
    "name", ["optimizer.safetensors", "optimizer.json", "rng-0.safetensors", "trainer.json"]
)
def test_a_truncated_checkpoint_file_is_named(tmp_path, name):
    stream = random_ids(1, 500)[0]
    train(tiny_hmt("llama"), RandomWindows(stream, 2, 0), quiet(max_steps=2, save_every=2), tmp_path)
    path = checkpoint_dirs(tmp_path)[-1] / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        train(tiny_hmt("llama"), RandomWindows(stream, 2, 0), quiet(max_steps=4), tmp_path, resume=True)

"""Proof that memory learns: train small models from scratch on the synthetic recall task, arm by arm.

Every arm (windowed backbone, rmt, hmt) gets the same backbone shape, initialisation, data, steps and
optimiser, through the same trainer as real runs; only the mode differs. Accuracy is measured on
held-out samples; for hmt we also record where its recall looked when the question came.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hmt.data.tasks import RecallTask, RecallTaskBatches

ARMS: tuple[str, ...] = ("backbone", "rmt", "hmt")


@dataclass(frozen=True)
class RecallExperiment:
    task: RecallTask = field(default_factory=RecallTask)
    arms: tuple[str, ...] = ARMS
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_sensory: int = 4
    cache_size: int = 16
    steps: int = 900
    batch_size: int = 32
    lr: float = 1e-3
    curriculum: str | None = None  # unroll curriculum; default: 2 segments, then half, then all
    eval_samples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms must be among {', '.join(ARMS)}, got {', '.join(self.arms) or 'none'}")
        if self.num_sensory > self.task.segment_length // 2:
            raise ValueError("num_sensory must be <= half a segment, or sensory memory could carry the facts")
        if self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ValueError("steps, batch_size and eval_samples must be >= 1")

    @property
    def unroll(self) -> str:
        if self.curriculum:
            return self.curriculum
        segments = self.task.num_segments
        if segments <= 2 or self.steps < 3:
            return str(segments)
        middle = max(2, segments // 2)
        stages = (
            [(2, self.steps // 3), (middle, 2 * self.steps // 3)] if middle > 2 else [(2, self.steps // 2)]
        )
        return ",".join(f"{s}:{u}" for s, u in stages) + f",{segments}"


@dataclass
class ArmResult:
    arm: str
    accuracy: float
    chance: float
    final_loss: float | None
    seconds: float
    recall_hit_rate: float | None = None  # hmt: strongest recall weight on the asked fact's segment
    recall_distance: dict[int, int] | None = (
        None  # hmt: segments back of the strongest recall, at the question
    )
    fact_distance: dict[int, int] | None = None  # segments back of the asked fact


def build_model(experiment: RecallExperiment, arm: str):
    """A small Llama from scratch with HMT around it, identical across arms for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt.config import HMTConfig
    from hmt.model import HMTForCausalLM

    task = experiment.task
    torch.manual_seed(experiment.seed)
    config = LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=experiment.hidden_size,
        intermediate_size=2 * experiment.hidden_size,
        num_hidden_layers=experiment.num_layers,
        num_attention_heads=experiment.num_heads,
        num_key_value_heads=experiment.num_heads,
        max_position_embeddings=task.segment_length + experiment.num_sensory + 2,
    )
    backbone = LlamaForCausalLM(config)
    hmt_config = HMTConfig(
        segment_length=task.segment_length,
        num_sensory=experiment.num_sensory,
        summary_length=task.query_length,
        cache_size=experiment.cache_size,
        mode=arm,
        attention_sink=False,  # trained from scratch: no first-position habit to protect
    )
    return HMTForCausalLM(backbone, hmt_config)


def evaluate_arm(model, task: RecallTask, samples: int, seed: int) -> dict[str, Any]:
    """Answer accuracy on fresh samples; for hmt, where the question's recall looked."""
    ids, labels, asked = task.batch(samples, seed)
    model.eval()
    with torch.no_grad():
        out = model(ids.to(model.device), labels=labels.to(model.device), return_logits=True)
    predicted = out.logits[:, task.answer_position - 1].argmax(-1).cpu()
    result: dict[str, Any] = {"accuracy": float((predicted == ids[:, task.answer_position]).float().mean())}
    if out.recall_weights:
        weights = out.recall_weights[-1].cpu()  # the question segment's recall over its cache
        strongest_back = weights.shape[1] - weights.argmax(-1)
        fact_back = (task.num_segments - 1) - asked
        result["recall_hit_rate"] = float((strongest_back == fact_back).float().mean())
        result["recall_distance"] = dict(sorted(Counter(strongest_back.tolist()).items()))
        result["fact_distance"] = dict(sorted(Counter(fact_back.tolist()).items()))
    return result


def run_recall_experiment(
    experiment: RecallExperiment, run_dir: str | Path, progress: Any = None
) -> dict[str, ArmResult]:
    """Train every arm from scratch and measure it; each arm's run folder is run_dir/<arm>."""
    from hmt.train import TrainConfig, train

    run_dir = Path(run_dir)
    results: dict[str, ArmResult] = {}
    for arm in experiment.arms:
        model = build_model(experiment, arm)
        model.backbone.requires_grad_(True)  # trained from scratch, with the memory
        config = TrainConfig(
            mode=arm,
            unroll=experiment.unroll,
            batch_size=experiment.batch_size,
            max_steps=experiment.steps,
            lr=experiment.lr,
            memory_lr=experiment.lr,
            warmup_steps=min(20, experiment.steps // 10),
            decay_every=max(experiment.steps, 1),
            log_every=max(1, experiment.steps // 20),
            eval_every=0,
            save_every=experiment.steps,
            keep_checkpoints=1,
            seed=experiment.seed,
        )
        source = RecallTaskBatches(experiment.task, experiment.batch_size, experiment.seed)
        started = time.perf_counter()
        summary = train(
            model,
            source,
            config,
            run_dir / arm,
            progress=(lambda step, total, record, arm=arm: progress(arm, step, total, record))
            if progress
            else None,
        )
        measured = evaluate_arm(model, experiment.task, experiment.eval_samples, seed=10**9 + experiment.seed)
        results[arm] = ArmResult(
            arm=arm,
            chance=1 / experiment.task.num_values,
            final_loss=summary.final_loss,
            seconds=time.perf_counter() - started,
            **measured,
        )
    return results


def report(experiment: RecallExperiment, results: dict[str, ArmResult]) -> dict[str, Any]:
    from hmt import __version__

    return {
        "hmt_version": __version__,
        "experiment": {**asdict(experiment), "unroll": experiment.unroll},
        "arms": {arm: asdict(result) for arm, result in results.items()},
    }

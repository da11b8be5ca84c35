"""Training HMT on accelerate: stage 1 (rmt), stage 2 (hmt), resumable, with memory diagnostics.

One loop, read top to bottom: set the learning rate, take a batch (independent windows, or the next
window of each lane of a long stream with the memory carried), forward over the unrolled segments,
backward, clip, step; log, validate and checkpoint at intervals. Which data comes at which step is a
pure function of the step (and the lanes' saved positions), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from hmt.backbone import flush_denormals
from hmt.checkpoints import load_latest_checkpoint, save_checkpoint
from hmt.config import IGNORE_INDEX, MODES
from hmt.data.batches import Batch, BatchSource
from hmt.evaluate import EvalConfig, recall_stats, run_eval
from hmt.finite import non_finite_names
from hmt.model import HMTForCausalLM, HMTOutput

MEMORY_ONLY_IN_HMT = (
    "summary_prompt",
    "query_proj",
    "key_proj",
    "recall_log_temperature",
)  # unused in rmt mode: not trained there


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the model's own settings (L, k, N, ...) are its HMTConfig."""

    mode: str = field(
        default="hmt",
        metadata={
            "help": "Mode trained: rmt (stage 1), hmt (stage 2), or a control: backbone, sliding, memory_off."
        },
    )
    unroll: str = field(
        default="4",
        metadata={"help": "Segments per sample, or a curriculum like 2:100,4:300,8 (segments until step)."},
    )
    batch_size: int = field(default=1, metadata={"help": "Samples per micro-batch (per process)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the stream in order in parallel lanes, carrying memory across steps (detached)."
        },
    )
    loss_on: str = field(default="all", metadata={"help": "Loss on all segments, or on the last one only."})
    bptt_depth: int | None = field(
        default=None,
        metadata={"help": "Cut gradients through memory every this many segments (None: never)."},
    )
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate of the backbone or its LoRA weights."})
    memory_lr: float = field(default=1e-3, metadata={"help": "Learning rate of HMT's own parameters."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (backbone/LoRA only)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps."})
    decay_every: int = field(
        default=100, metadata={"help": "Step decay: multiply the rates every this many steps."}
    )
    decay_factor: float = field(default=0.8, metadata={"help": "Step decay factor."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward."}
    )
    log_every: int = field(default=10, metadata={"help": "Steps between log records."})
    eval_every: int = field(default=50, metadata={"help": "Steps between validations (0: only at the end)."})
    save_every: int = field(default=50, metadata={"help": "Steps between checkpoints."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.loss_on not in ("all", "last"):
            raise ValueError(f"loss_on must be all or last, got {self.loss_on!r}")
        parse_unroll(self.unroll)
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decay_every < 1 or not 0 < self.decay_factor <= 1:
            raise ValueError("decay_every must be >= 1 and decay_factor in (0, 1]")
        if self.bptt_depth is not None and self.bptt_depth < 1:
            raise ValueError(f"bptt_depth must be >= 1, got {self.bptt_depth}")
        check_learning_rate("lr", self.lr)
        check_learning_rate("memory_lr", self.memory_lr)
        for name in ("weight_decay", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    def unroll_at(self, step: int) -> int:
        """Segments per sample at an optimizer step (the curriculum)."""
        for segments, until in parse_unroll(self.unroll):
            if until is None or step < until:
                return segments
        raise AssertionError("parse_unroll ends with an open stage")

    @property
    def max_unroll(self) -> int:
        return max(segments for segments, _ in parse_unroll(self.unroll))

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def check_learning_rate(option: str, value: float) -> float:
    """`value` if it is a finite number > 0, else a one-line ValueError naming `option` (NaN would train
    every weight to NaN; 0 would train nothing)."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{option} must be a finite number > 0, got {value}: give e.g. 1e-4")
    return value


class TrainingDiverged(ValueError):
    """Training met a non-finite loss or gradient norm and stopped before a non-finite weight was saved."""


DIVERGED_ADVICE = "try a lower --lr or --memory-lr, or clip the gradients with --max-grad-norm"


def diverged(step: int, problem: str, advice: str = DIVERGED_ADVICE) -> TrainingDiverged:
    """The error for optimizer step `step` (counted from 1), `problem` saying what, e.g. "the loss is nan"."""
    return TrainingDiverged(
        f"training stopped at step {step}: {problem} ({advice}); nothing non-finite was saved"
    )


def non_finite(values: dict[str, float]) -> str | None:
    """What is wrong with `values` (name -> value), e.g. "the loss is nan", or None if all are finite."""
    return next((f"the {name} is {v}" for name, v in values.items() if not math.isfinite(v)), None)


def check_finite_parameters(model: torch.nn.Module, step: int, advice: str = DIVERGED_ADVICE) -> None:
    """Raise `diverged` if a trainable parameter holds NaN or inf (checked before anything is saved)."""
    bad = non_finite_names((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    if bad:
        raise diverged(step, f"the trained weight {bad[0]} holds nan or inf", advice)


def parse_unroll(text: str) -> list[tuple[int, int | None]]:
    """'2:100,4:300,8' -> [(2, 100), (4, 300), (8, None)]: segments, and the step where the stage ends."""
    stages: list[tuple[int, int | None]] = []
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        for i, part in enumerate(parts):
            segments, _, until = part.partition(":")
            last = i == len(parts) - 1
            if last and until:
                raise ValueError("the last stage takes no end step")
            if not last and not until:
                raise ValueError("every stage but the last needs :END_STEP")
            stages.append((int(segments), int(until) if until else None))
    except ValueError as err:
        raise ValueError(f"unroll must look like 4 or 2:100,4:300,8 ({err}), got {text!r}") from None
    if not stages or any(s < 1 for s, _ in stages):
        raise ValueError(f"unroll needs at least one stage of >= 1 segments, got {text!r}")
    ends = [u for _, u in stages if u is not None]
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        raise ValueError(f"unroll stage ends must increase, got {text!r}")
    return stages


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then step decay: the multiplier of every base learning rate at `step`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return config.decay_factor ** ((step - config.warmup_steps) // config.decay_every)


# ---- the loop -----------------------------------------------------------------------------------------


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    tokens: int
    final_loss: float | None
    validation: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)


Progress = Callable[[int, int, dict[str, Any] | None], None]  # (step done, max steps, log record or None)


class AuxiliaryLoss(Protocol):
    """An extra training term (research tools plug in here, e.g. experiments/distill.py).

    Called after each forward pass with the model, the micro-batch, its labels and the output; returns a
    scalar, of which `weight` times is added to the loss (None: nothing this time). `needs_logits`: the
    forward keeps every logit. `name` keys the mean of its (unweighted) values in the training log."""

    name: str
    weight: float
    needs_logits: bool

    def __call__(
        self, model: HMTForCausalLM, batch: Batch, labels: torch.Tensor, out: HMTOutput
    ) -> torch.Tensor | None: ...


def train(
    model: HMTForCausalLM,
    source: BatchSource,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    validation: torch.Tensor | None = None,
    accelerator: Any = None,
    resume: bool = False,
    progress: Progress | None = None,
    auxiliary: AuxiliaryLoss | None = None,
    on_stage_end: Callable[[int, int], None] | None = None,
) -> TrainSummary:
    """Train `model` in `config.mode` on batches from `source`; checkpoints and logs go to `run_dir`.
    `on_stage_end(step, segments)` is called (main process) after the last step of each curriculum stage
    but the final one, e.g. to keep that stage's adapter: checkpoints are pruned, stages are not.
    Flushes subnormal floats to zero for the rest of the process (see `flush_denormals`)."""
    from accelerate import Accelerator

    # Setup: which parameters train, the optimizer, accelerate, and where a resumed run left off.
    flush_denormals()
    run_dir = Path(run_dir)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=config.grad_accum)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_trainable_memory(model, config.mode)
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = make_optimizer(model, config)
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    step, tokens_seen, state = 0, 0, None
    if resume:
        step, tokens_seen, state = load_latest_checkpoint(run_dir, model, optimizer, source, accelerator)
    log_path = run_dir / "train_log.jsonl"
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    extra: list[float] = []
    started = interval_start = time.perf_counter()
    interval_tokens = 0
    out, grad_norm = None, None

    while step < config.max_steps:
        problem: str | None = None  # a non-finite loss met in this step's micro-batches
        # Learning rates for this step: warmup, then step decay, for every parameter group.
        factor = lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        window = config.unroll_at(step) * model.config.segment_length

        # Forward over the unrolled segments, backward, clip, step (accelerate accumulates micro-batches).
        for micro in range(config.grad_accum):
            batch = source.batch(step * config.grad_accum + micro, window)
            if source.streaming and state is not None and bool(batch.reset.any()):
                state = state.reset(batch.reset)
            ids = batch.input_ids.to(accelerator.device)
            labels = _loss_labels(batch.labels, config, model.config.segment_length).to(accelerator.device)
            with accelerator.accumulate(wrapped):
                out = wrapped(
                    ids,
                    attention_mask=_on(batch.attention_mask, accelerator.device),
                    grad_segments=_on(batch.grad_segments, accelerator.device),
                    labels=labels,
                    state=state if source.streaming else None,
                    mode=config.mode,
                    num_logits=0,
                    return_logits=bool(auxiliary and auxiliary.needs_logits),
                    bptt_depth=config.bptt_depth,
                )
                if out.loss is None:
                    raise ValueError(
                        "a training sample had no scored token; check the labels of the data source"
                    )
                loss, values = out.loss, {"loss": float(out.loss.detach())}
                term = auxiliary(model, batch, labels, out) if auxiliary is not None else None
                if term is not None:
                    loss = loss + auxiliary.weight * term
                    values[auxiliary.name] = float(term.detach())
                    extra.append(values[auxiliary.name])
                problem = problem or non_finite(values)
                out["logits"] = None  # (batch, window, vocab) when kept: not past this step
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if config.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
                        )
                    _stop_if_diverged(accelerator, step + 1, problem, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if source.streaming:
                state = out.state.detach()
            losses.append(values["loss"])
            read = int(batch.input_ids.numel()) * accelerator.num_processes
            interval_tokens += read
            tokens_seen += read
        step += 1

        # Log, validate and checkpoint at their intervals.
        record = None
        if step % config.log_every == 0 or step == config.max_steps:
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_second": interval_tokens / max(now - interval_start, 1e-9),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "unroll": config.unroll_at(step - 1),
                **({auxiliary.name: sum(extra) / len(extra)} if auxiliary and extra else {}),
                **(auxiliary.drain_terms() if hasattr(auxiliary, "drain_terms") else {}),
                **memory_diagnostics(model, out),
            }
            losses, extra, interval_start, interval_tokens = [], [], now, 0
        if validation is not None and (
            (config.eval_every and step % config.eval_every == 0) or step == config.max_steps
        ):
            record = {**(record or {"step": step}), **validate(model, validation, config.mode, accelerator)}
            model.train()
        if record is not None:
            history.append(record)
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
        stage_ends = step < config.max_steps and config.unroll_at(step) != config.unroll_at(step - 1)
        saving = step % config.save_every == 0 or step == config.max_steps
        if saving or (stage_ends and on_stage_end is not None):
            check_finite_parameters(model, step)
        if saving:
            save_checkpoint(
                run_dir,
                step,
                tokens_seen,
                model,
                optimizer,
                source,
                state,
                config.keep_checkpoints,
                accelerator,
            )
        if on_stage_end is not None and stage_ends:
            if accelerator.is_main_process:
                on_stage_end(step, config.unroll_at(step - 1))
            accelerator.wait_for_everyone()
        if progress is not None:
            progress(step, config.max_steps, record)

    return TrainSummary(
        steps=step,
        seconds=time.perf_counter() - started,
        tokens=tokens_seen,
        final_loss=next((r["loss"] for r in reversed(history) if "loss" in r), None),
        validation=next((r for r in reversed(history) if "val_ppl" in r), None),
        history=history,
    )


def _stop_if_diverged(accelerator: Any, step: int, problem: str | None, grad_norm: Any) -> None:
    """Before the optimizer step: raise `diverged` if this process met a non-finite loss, the gradient
    norm is not finite, or (with several processes, which must all stop) another process met one."""
    if problem is None and grad_norm is not None:
        problem = non_finite({"gradient norm": float(grad_norm)})
    if accelerator.num_processes > 1:  # every process takes part in the reduction
        flag = torch.tensor([float(problem is not None)], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum")) > 0 and problem is None:
            problem = "the loss on another process is not finite"
    if problem is not None:
        raise diverged(step, problem)


def _on(tensor: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None


def _loss_labels(labels: torch.Tensor, config: TrainConfig, segment_length: int) -> torch.Tensor:
    """Labels with everything before the last segment ignored when the loss is on the last segment only."""
    if config.loss_on == "all":
        return labels
    labels = labels.clone()
    last_start = (labels.shape[1] - 1) // segment_length * segment_length
    labels[:, :last_start] = IGNORE_INDEX
    return labels


def set_trainable_memory(model: HMTForCausalLM, mode: str) -> None:
    """HMT parameters train only in the modes that use them (rmt never uses the recall parameters,
    memory_off only m0, the controls backbone and sliding none)."""
    for name, param in model.memory.named_parameters():
        used = (
            mode == "hmt"
            or (mode == "rmt" and not name.startswith(MEMORY_ONLY_IN_HMT))
            or (mode == "memory_off" and name in ("initial_memory", "sink"))
        )
        param.requires_grad_(used)


def make_optimizer(model: HMTForCausalLM, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: HMT's parameters (memory_lr, no decay) and the backbone or LoRA (lr)."""
    memory = [p for p in model.memory.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = []
    if memory:
        groups.append(
            {"params": memory, "lr": config.memory_lr, "base_lr": config.memory_lr, "weight_decay": 0.0}
        )
    if backbone:
        groups.append(
            {"params": backbone, "lr": config.lr, "base_lr": config.lr, "weight_decay": config.weight_decay}
        )
    if not groups:
        raise ValueError("nothing to train: the backbone is frozen and the mode uses no HMT parameters")
    return torch.optim.AdamW(groups)


def memory_diagnostics(model: HMTForCausalLM, out: Any) -> dict[str, Any]:
    """Norms of memories and embeddings, and where recall looked, from the last forward output."""
    record: dict[str, Any] = {"embedding_norm": float(model.memory.embedding_norm)}
    if hasattr(model.memory, "memory_scale"):
        record["memory_scale"] = float(model.memory.memory_scale.detach())
    if out is None or out.state is None:
        return record
    state = out.state.detach()
    if state.memory_mask.any():
        record["memory_norm"] = model.memory.mean_norm(state.memories[state.memory_mask])
    if out.recall_weights:
        stats = recall_stats([w[row].detach() for w in out.recall_weights for row in range(w.shape[0])])
        if stats.segments:
            record.update(
                recall_entropy=stats.mean_entropy,
                recall_max_weight=stats.mean_max_weight,
                recall_distance=stats.most_common_distance()[0],
            )
    return record


def validate(model: HMTForCausalLM, stream: torch.Tensor, mode: str, accelerator: Any) -> dict[str, Any]:
    """Validation perplexity in the trained mode (on the main process; the others wait)."""
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        model.eval()
        r = run_eval(model, stream, EvalConfig(modes=(mode,)))[mode]
        result = {"val_ppl": r.ppl, "val_tokens": r.tokens_scored}
        if r.recall is not None and r.recall.segments:
            result.update(
                val_recall_entropy=r.recall.mean_entropy, val_recall_max_weight=r.recall.mean_max_weight
            )
        if r.memory_norm is not None:
            result["val_memory_norm"] = r.memory_norm
    accelerator.wait_for_everyone()
    return result

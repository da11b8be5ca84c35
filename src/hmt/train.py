"""Training HMT on accelerate: stage 1 (rmt), stage 2 (hmt), resumable, with memory diagnostics.

One loop, read top to bottom: set the learning rate, take a batch (independent windows, or the next
window of each lane of a long stream with the memory carried), forward over the unrolled segments,
backward, clip, step; log, validate and checkpoint at intervals. Which data comes at which step is a
pure function of the step (and the lanes' saved positions), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from hmt.config import MODES
from hmt.distill import distillation_loss
from hmt.evaluate import EvalConfig, recall_stats, run_eval
from hmt.io import load_tensors, save_tensors, write_text_atomic
from hmt.memory import MemoryState
from hmt.model import IGNORE_INDEX, HMTForCausalLM

CHECKPOINT_FORMAT = "hmt-checkpoint"
MEMORY_ONLY_IN_HMT = ("summary_prompt", "query_proj", "key_proj")  # unused in rmt mode: not trained there


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
    reset_every: int | None = field(
        default=None,
        metadata={
            "help": "Streaming: empty each lane's memory once it has been carried this many segments (at the "
            "next sample), so training caches are as long as the texts evaluated and always hold a memory "
            "written from m0, as evaluation's do; None: memory is carried through the whole text."
        },
    )
    loss_on: str = field(default="all", metadata={"help": "Loss on all segments, or on the last one only."})
    bptt_depth: int | None = field(
        default=None,
        metadata={"help": "Cut gradients through memory every this many segments (None: never)."},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of context distillation added to the LM loss: KL from the same model reading "
            "the training window as one long window after distill_context raw tokens before it (no memory, "
            "no gradient) to the model as trained. A dense target for what memory should carry; 0: off."
        },
    )
    distill_context: int = field(
        default=768,
        metadata={
            "help": "Raw tokens before each training window the distillation teacher reads (at most "
            "what the carried memory has read since it was last emptied; none for random windows)."
        },
    )
    distill_positions: int | None = field(
        default=None,
        metadata={"help": "Distil only the first this many positions of each segment (None: all)."},
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
        if self.reset_every is not None and self.reset_every < 1:
            raise ValueError(f"reset_every must be >= 1, got {self.reset_every}")
        if self.reset_every is not None and not self.streaming:
            raise ValueError("reset_every needs streaming (random windows start with an empty memory anyway)")
        if self.bptt_depth is not None and self.bptt_depth < 1:
            raise ValueError(f"bptt_depth must be >= 1, got {self.bptt_depth}")
        if self.lr < 0 or self.memory_lr < 0 or self.max_grad_norm < 0:
            raise ValueError("learning rates and max_grad_norm must be >= 0")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_context < 1:
            raise ValueError(f"distill_context must be >= 1 token, got {self.distill_context}")
        if self.distill_positions is not None and self.distill_positions < 1:
            raise ValueError(f"distill_positions must be >= 1 or None (all), got {self.distill_positions}")

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


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, window)
    labels: torch.Tensor  # (batch, window), IGNORE_INDEX where not scored
    reset: torch.Tensor  # (batch,) bool: rows starting a new pass (their carried memory is emptied)
    # (batch, h): the tokens just before the window that the carried memory has read, for a distillation
    # teacher; None where memory starts empty with every window.
    history: torch.Tensor | None = None


class BatchSource(Protocol):
    streaming: bool

    def batch(self, index: int, window: int) -> Batch: ...


class RandomWindows:
    """Independent windows at random places of a token stream; which ones is a function of (seed, index)."""

    streaming = False

    def __init__(
        self, stream: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.stream, self.batch_size, self.seed, self.rank, self.world = stream, batch_size, seed, rank, world

    def batch(self, index: int, window: int) -> Batch:
        if self.stream.shape[0] < window:
            raise ValueError(
                f"the training text has {self.stream.shape[0]} tokens, fewer than one sample ({window}): "
                "give more text or fewer/shorter segments"
            )
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003) + index) * self.world + self.rank)
        starts = torch.randint(0, self.stream.shape[0] - window + 1, (self.batch_size,), generator=generator)
        ids = torch.stack([self.stream[s : s + window] for s in starts.tolist()])
        return Batch(ids, ids.clone(), torch.ones(self.batch_size, dtype=torch.bool))


class StreamLanes:
    """The stream cut into batch_size x world lanes, each read in order, one window per micro-batch.

    A lane that cannot fill the next window starts over from its beginning, with its memory reset; with
    `reset_tokens`, a lane's memory is also reset once it has been carried through that many tokens.
    Each batch's `history` holds up to `history_tokens` tokens before the window, read since the reset.
    """

    streaming = True

    def __init__(
        self,
        stream: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        reset_tokens: int | None = None,
        history_tokens: int = 0,
    ) -> None:
        lanes = batch_size * world
        self.lane_length = stream.shape[0] // lanes
        self.lanes = [
            stream[
                (rank * batch_size + b) * self.lane_length : (rank * batch_size + b + 1) * self.lane_length
            ]
            for b in range(batch_size)
        ]
        self.position = 0  # shared by all lanes: they advance together
        self.reset_tokens = reset_tokens
        self.history_tokens = history_tokens
        self.carried = 0  # tokens read since the lanes' memory was last emptied

    def batch(self, index: int, window: int) -> Batch:
        if self.lane_length < window:
            raise ValueError(
                f"the training text gives each of {len(self.lanes)} lanes {self.lane_length} tokens, fewer "
                f"than one sample ({window}): give more text, a smaller batch or fewer/shorter segments"
            )
        reset = (
            self.position == 0
            or self.position + window > self.lane_length
            or (self.reset_tokens is not None and self.carried >= self.reset_tokens)
        )
        if self.position + window > self.lane_length:
            self.position = 0
        ids = torch.stack([lane[self.position : self.position + window] for lane in self.lanes])
        seen = 0 if reset else min(self.history_tokens, self.carried)
        history = torch.stack([lane[self.position - seen : self.position] for lane in self.lanes])
        self.position += window
        self.carried = window if reset else self.carried + window
        return Batch(ids, ids.clone(), torch.full((len(self.lanes),), reset), history)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "carried": self.carried}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
        self.carried = int(state.get("carried", self.position))  # checkpoints from before resets existed


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


def flush_denormals() -> None:
    """Treat floats below ~1.2e-38 as zero in this process, as GPU kernels do. On CPU, a saturated recall
    softmax and Adam's second moments of near-zero gradients make subnormal numbers, and every operation
    on them is many times slower: a training run whose recall collapsed fell from ~200 to ~13 tokens/s."""
    torch.set_flush_denormal(True)


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
) -> TrainSummary:
    """Train `model` in `config.mode` on batches from `source`; checkpoints and logs go to `run_dir`.
    Flushes subnormal floats to zero for the rest of the process (see `flush_denormals`)."""
    from accelerate import Accelerator

    flush_denormals()

    run_dir = Path(run_dir)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=config.grad_accum)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    model.reconfigure(mode=config.mode)
    set_trainable_memory(model, config.mode)
    if config.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, config)
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    step, tokens_seen, state = 0, 0, None
    if resume:
        step, tokens_seen, state = load_latest_checkpoint(run_dir, model, optimizer, source, accelerator)
    log_path = run_dir / "train_log.jsonl"
    history: list[dict[str, Any]] = []
    window_losses: list[float] = []
    window_kls: list[float] = []
    started, interval_start, interval_tokens = time.perf_counter(), time.perf_counter(), 0
    out = None
    while step < config.max_steps:
        # Learning rates for this step: warmup, then step decay, for every parameter group.
        factor = lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        window = config.unroll_at(step) * model.config.segment_length
        for micro in range(config.grad_accum):
            batch = source.batch(step * config.grad_accum + micro, window)
            labels = _loss_labels(batch.labels, config, model.config.segment_length)
            if source.streaming and state is not None and bool(batch.reset.any()):
                state = state.reset(batch.reset)
            with accelerator.accumulate(wrapped):
                ids, labels = batch.input_ids.to(accelerator.device), labels.to(accelerator.device)
                out = wrapped(
                    ids,
                    labels=labels,
                    state=state if source.streaming else None,
                    num_logits=0,
                    return_logits=config.distill_weight > 0,
                    bptt_depth=config.bptt_depth,
                )
                if out.loss is None:
                    raise ValueError(
                        "a training sample had no scored token; check the labels of the data source"
                    )
                loss = out.loss
                if config.distill_weight > 0:
                    kl = _distill(model, ids, batch.history, labels, out.logits, config)
                    if kl is not None:
                        loss = loss + config.distill_weight * kl
                        window_kls.append(float(kl.detach()))
                    out["logits"] = None  # (batch, window, vocab): not kept past this step
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if source.streaming:
                state = out.state.detach()
            window_losses.append(float(out.loss.detach()))
            read = int(batch.input_ids.numel()) * accelerator.num_processes
            interval_tokens += read
            tokens_seen += read
        step += 1

        record = None
        if step % config.log_every == 0 or step == config.max_steps:
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": sum(window_losses) / len(window_losses),
                "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_second": interval_tokens / max(now - interval_start, 1e-9),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "unroll": config.unroll_at(step - 1),
                **({"distill_kl": sum(window_kls) / len(window_kls)} if window_kls else {}),
                **memory_diagnostics(model, out),
            }
            window_losses, window_kls, interval_start, interval_tokens = [], [], now, 0
        if validation is not None and (
            (config.eval_every and step % config.eval_every == 0) or step == config.max_steps
        ):
            record = {**(record or {"step": step}), **validate(model, validation, config, accelerator)}
            model.train()
        if record is not None:
            history.append(record)
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
        if step % config.save_every == 0 or step == config.max_steps:
            save_checkpoint(run_dir, step, tokens_seen, model, optimizer, source, state, config, accelerator)
        if progress is not None:
            progress(step, config.max_steps, record)

    final_validation = next((r for r in reversed(history) if "val_ppl" in r), None)
    return TrainSummary(
        steps=step,
        seconds=time.perf_counter() - started,
        tokens=tokens_seen,
        final_loss=next((r["loss"] for r in reversed(history) if "loss" in r), None),
        validation=final_validation,
        history=history,
    )


def _distill(
    model: HMTForCausalLM,
    ids: torch.Tensor,
    history: torch.Tensor | None,
    labels: torch.Tensor,
    student_logits: torch.Tensor,
    config: TrainConfig,
) -> torch.Tensor | None:
    """The distillation term of one micro-batch (see `hmt.distill`)."""
    history = ids[:, :0] if history is None else history.to(ids.device)
    return distillation_loss(
        model.backbone,
        ids,
        history,
        labels,
        student_logits,
        model.config.segment_length,
        config.distill_positions,
    )


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


def validate(
    model: HMTForCausalLM, stream: torch.Tensor, config: TrainConfig, accelerator: Any
) -> dict[str, Any]:
    """Validation perplexity in the trained mode (on the main process; the others wait)."""
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        model.eval()
        r = run_eval(model, stream, EvalConfig(modes=(config.mode,)))[config.mode]
        result = {"val_ppl": r.ppl, "val_tokens": r.tokens_scored}
        if r.recall is not None and r.recall.segments:
            result.update(
                val_recall_entropy=r.recall.mean_entropy, val_recall_max_weight=r.recall.mean_max_weight
            )
        if r.memory_norm is not None:
            result["val_memory_norm"] = r.memory_norm
        model.reconfigure(mode=config.mode)
    accelerator.wait_for_everyone()
    return result


# ---- checkpoints --------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint folder appears only when fully written)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "trainer.json").is_file())


def save_checkpoint(
    run_dir: Path,
    step: int,
    tokens: int,
    model: HMTForCausalLM,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    state: MemoryState | None,
    config: TrainConfig,
    accelerator: Any,
) -> Path:
    """Trainable weights, optimizer, RNG, lanes and carried memory, written to a temporary folder that
    is renamed into place: a kill mid-save leaves the previous checkpoint intact."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    staging = root / f".staging-step-{step:07d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trainable = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
        save_tensors(
            staging / "trainable.safetensors", trainable, {"format": CHECKPOINT_FORMAT, "step": str(step)}
        )
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    accelerator.wait_for_everyone()
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "source": getattr(source, "state_dict", dict)(),
        },
        staging / f"rng-{rank}.pt",
    )
    if state is not None:
        state.save(staging / f"memory-{rank}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(staging / "trainer.json", json.dumps({"step": step, "tokens": tokens}) + "\n")
        os.replace(staging, final)
        for old in checkpoint_dirs(run_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(
    run_dir: Path,
    model: HMTForCausalLM,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    accelerator: Any,
) -> tuple[int, int, MemoryState | None]:
    """Restore the newest checkpoint; returns (step, tokens seen, carried memory). No checkpoint: step 0."""
    found = checkpoint_dirs(run_dir)
    if not found:
        return 0, 0, None
    folder = found[-1]
    info = json.loads((folder / "trainer.json").read_text())
    tensors, _ = load_tensors(folder / "trainable.safetensors", CHECKPOINT_FORMAT)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(
            f"checkpoint {folder} trains other parameters than this run (missing "
            f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}); "
            "resume with the settings it was started with"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", map_location=accelerator.device, weights_only=False)
    )
    rank = accelerator.process_index
    rng = torch.load(folder / f"rng-{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if hasattr(source, "load_state_dict"):
        source.load_state_dict(rng["source"])
    memory_file = folder / f"memory-{rank}.safetensors"
    state = MemoryState.load(memory_file, device=accelerator.device) if memory_file.is_file() else None
    return int(info["step"]), int(info["tokens"]), state

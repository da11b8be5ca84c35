"""A training run in a folder: settings recorded once, resumed only with the same settings, a final adapter.

`train_run` is the whole job of `hmt train` (and of each arm of experiments/compare.py): load the
backbone, build the model (fresh, or from a stage-1 adapter), read the training text, train, and save
`final/` (the adapter) and `summary.json`. The folder holds `run.json` (the settings), the training log
and the checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hmt.config import HMTConfig
from hmt.io import CONFIG_NAME, read_json, write_text_atomic
from hmt.train import AuxiliaryLoss, Progress, TrainConfig, TrainSummary
from hmt.version import __version__

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
STAGES_DIR = "stages"  # the adapter at the end of each curriculum stage: stages/step-N-unroll-U/
STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: {"mode": "rmt", "unroll": "2", "max_steps": 200},
    2: {"mode": "hmt", "unroll": "4", "max_steps": 500},
}
# Settings a resumed run may change: how long it runs, how it reports, where it runs.
RESUMABLE = {"max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "device"}


@dataclass(frozen=True)
class RunSettings:
    """What a run trains on, besides how (TrainConfig): backbone, text, backbone weights, model settings."""

    backbone: str | None = None  # None: the default backbone (or a stage-1 run's fine-tuned one)
    dtype: str = "auto"
    device: str | None = None
    data: tuple[str, ...] = ("essays", "plays")  # training texts (their train split)
    max_train_tokens: int | None = None  # per source
    validation_data: str = "essays"  # its validation split
    validation_tokens: int = 4096  # 0: no validation
    finetune: str = "lora"  # frozen | lora | full
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: peft's choice for the architecture
    model: dict[str, Any] = field(default_factory=dict)  # HMTConfig fields to set (else defaults / init's)
    init_from: Path | None = None  # a stage-1 run folder or an adapter folder
    tasks: tuple[str, ...] = ()  # recall tasks (hmt.tasks) trained on, haystacks from `data`; () = plain text
    text_every: int = 0  # with tasks: every this-many-th batch is plain text (0: never)
    answer_in_memory: float = 0.0  # with tasks: answer-in-memory loss weight (hmt.tasks.RecallSupervision)
    recall_loss: float = 0.0  # with tasks: weight of the recall cross-entropy toward the fact's memory
    max_depth: float = 1.0  # with tasks: facts at depths uniform in [0, max_depth]

    def __post_init__(self) -> None:
        from hmt.backbone import FINETUNE_MODES, resolve_device

        resolve_device(self.device)  # a bad device fails now, not after accelerate has picked another
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {self.finetune!r}")
        if not self.data:
            raise ValueError("give at least one training text")
        HMTConfig(**self.model)  # a bad model setting fails now, not after loading
        from hmt.tasks import TASKS

        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown recall tasks {unknown}; choose among {', '.join(TASKS)}")
        if self.text_every < 0 or (self.text_every and not self.tasks):
            raise ValueError("text_every must be >= 0 and is used only with recall tasks")
        if not 0 < self.max_depth <= 1 or (self.max_depth != 1 and not self.tasks):
            raise ValueError("max_depth is a fraction in (0, 1] and is used only with recall tasks")
        for name in ("answer_in_memory", "recall_loss"):
            if getattr(self, name) < 0 or (getattr(self, name) and not self.tasks):
                raise ValueError(f"{name} must be >= 0 and is used only with recall tasks")


def read_run_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings a `run.json` records, as (RunSettings fields, TrainConfig fields): what `hmt train
    --config` starts from. Unknown keys, or a file that is not a run record, are a ValueError."""
    from dataclasses import fields

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no run file {path}: give the run.json of an earlier run (hmt train writes one)"
        )
    record = read_json(path)
    data = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise ValueError(
            f"{path} is not a run record: it has no settings.train (see a run folder's run.json)"
        )
    run = {k: v for k, v in data.items() if k != "train"}
    known, train_known = {f.name for f in fields(RunSettings)}, {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(run) - known) + sorted(f"train.{k}" for k in set(data["train"]) - train_known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown} (written by another hmt version?)")
    for name in ("data", "lora_targets", "tasks"):  # JSON lists back to the tuples RunSettings holds
        if isinstance(run.get(name), list):
            run[name] = tuple(run[name])
    if run.get("init_from") is not None:
        run["init_from"] = Path(run["init_from"])
    return run, dict(data["train"])


def train_run(
    out: Path,
    settings: RunSettings,
    config: TrainConfig,
    *,
    resume: bool = False,
    accelerator: Any = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] | None = None,
    auxiliary: AuxiliaryLoss | None = None,
) -> dict[str, Any]:
    """Train in `out` (a new folder, or with `resume` the same run continued) and save the final adapter;
    returns the summary also written to `out/summary.json`. `auxiliary`: an extra loss term (train())."""
    from accelerate import Accelerator

    from hmt.backbone import BACKBONE_DIR, load_backbone, saved_backbone
    from hmt.data import RandomWindows, StreamLanes, training_text
    from hmt.data.corpus import training_documents
    from hmt.train import set_trainable_memory, train

    init_adapter = resolve_init(settings.init_from) if settings.init_from is not None else None
    accelerator = accelerator or Accelerator(
        gradient_accumulation_steps=config.grad_accum, cpu=settings.device == "cpu"
    )
    start_run(out, settings, config, resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    documents = training_documents(settings.data, settings.validation_data, settings.validation_tokens)
    spec = settings.backbone
    if spec is None and init_adapter is not None:
        spec = saved_backbone(init_adapter)  # stage 1 fine-tuned the whole backbone, or None: the default
    backbone = load_backbone(spec, dtype=settings.dtype, device=accelerator.device)
    model = training_model(backbone.model, settings, init_adapter, config.seed)
    train_stream, val_stream, data_info = training_text(
        backbone.tokenizer, settings.data, settings.max_train_tokens, settings.validation_data,
        settings.validation_tokens, documents,
    )  # fmt: skip
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.streaming and settings.tasks:
        raise ValueError("recall tasks are independent samples: train them without --streaming")
    if config.streaming:
        source = StreamLanes(train_stream, config.batch_size, rank, world)
        source.batch(0, config.max_unroll * model.config.segment_length)  # too little text fails now
        source.load_state_dict({"position": 0})
    else:
        source = RandomWindows(train_stream, config.batch_size, config.seed, rank, world)
        source.batch(0, config.max_unroll * model.config.segment_length)
    if settings.tasks:
        from hmt.tasks import RecallSupervision, RecallTasks, TaskBatches

        if settings.answer_in_memory or settings.recall_loss:
            if auxiliary is not None:
                raise ValueError("give either an auxiliary loss or answer_in_memory / recall_loss, not both")
            auxiliary = RecallSupervision(settings.answer_in_memory, settings.recall_loss)

        source = TaskBatches(
            RecallTasks(backbone.tokenizer, train_stream), settings.tasks, model.config.segment_length,
            config.batch_size, config.seed, text=source if settings.text_every else None,
            text_every=settings.text_every, rank=rank, world=world, max_depth=settings.max_depth,
        )  # fmt: skip
        source.batch(0, config.max_unroll * model.config.segment_length)
    set_trainable_memory(model, config.mode)
    if announce is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        announce(
            f"training [bold]{config.mode}[/] · backbone {backbone.name} ({backbone.dtype}, {settings.finetune}) · "
            f"{trainable:,} trainable parameters · {data_info['train_tokens']:,} training tokens · "
            f"{'resuming' if resume else 'new run'} in {out}"
        )

    def save_adapter(folder: Path) -> None:
        model.save_pretrained(folder, save_backbone=settings.finetune == "full")
        if settings.finetune == "full":
            backbone.tokenizer.save_pretrained(folder / BACKBONE_DIR)

    def keep_stage(step: int, segments: int) -> None:
        save_adapter(out / STAGES_DIR / f"step-{step}-unroll-{segments}")

    summary = train(
        model, source, config, out, validation=val_stream, accelerator=accelerator, resume=resume,
        progress=progress, auxiliary=auxiliary, on_stage_end=keep_stage,
    )  # fmt: skip
    result = _summary(summary, config, model.config, data_info)
    if accelerator.is_main_process:
        save_adapter(out / FINAL_DIR)
        write_text_atomic(out / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return result


def training_model(backbone: Any, settings: RunSettings, init_adapter: Path | None, seed: int):
    """The model to train: from the stage-1 adapter (its LoRA trainable) or fresh, seeded; with the
    backbone's weights set to train as `settings.finetune` says."""
    from hmt.backbone import has_lora, prepare_backbone
    from hmt.model import HMTForCausalLM

    targets = list(settings.lora_targets) if settings.lora_targets else None
    if init_adapter is None:
        torch.manual_seed(seed)
        backbone = prepare_backbone(
            backbone, settings.finetune, settings.lora_rank, settings.lora_alpha, targets
        )
        return HMTForCausalLM(backbone, HMTConfig(**settings.model))
    trainable_lora = settings.finetune == "lora" and has_lora(init_adapter)
    # Stage 2 repeats stage 1's model settings; from_pretrained refuses those tied to the weights if they differ.
    model = HMTForCausalLM.from_pretrained(
        init_adapter, backbone, trainable_lora=trainable_lora, **settings.model
    )
    prepared = prepare_backbone(
        model.backbone, settings.finetune, settings.lora_rank, settings.lora_alpha, targets
    )
    if prepared is model.backbone:
        return model
    fresh = HMTForCausalLM(prepared, model.config)  # the same memory parameters around a LoRA backbone
    fresh.memory.load_state_dict(model.memory.state_dict())
    return fresh


def resolve_init(path: Path) -> Path:
    """A stage-1 run folder (its final adapter) or an adapter folder; refuses anything else."""
    if not path.exists():
        raise FileNotFoundError(
            f"--init-from {path} does not exist: point it at a finished stage-1 run folder"
        )
    for candidate in (path / FINAL_DIR, path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if (path / RUN_FILE).is_file():
        raise ValueError(
            f"the run in {path} has not finished (no {FINAL_DIR}/ adapter): finish or resume it first"
        )
    raise ValueError(f"{path} is neither a training run folder nor an HMT adapter folder")


def start_run(out: Path, settings: RunSettings, config: TrainConfig, resume: bool, is_main: bool) -> None:
    """A new run needs an unused folder; a resumed one must have the same settings and steps left to run."""
    run_file = out / RUN_FILE
    record = _record(settings, config)
    if resume:
        if not run_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {out} holds no run ({RUN_FILE} missing)")
        saved = read_json(run_file).get("settings", {})
        # A setting added since the run began is missing from its record: the run had its default.
        defaults = _record(RunSettings(data=settings.data), TrainConfig())["settings"]
        saved = defaults | saved | {"train": defaults["train"] | saved.get("train", {})}
        differences = _differences(saved, record["settings"])
        if differences:
            raise ValueError(
                f"{out} was started with other settings ({'; '.join(differences)}); resume with the "
                "same settings, or start a new run in another --out"
            )
        summary = out / SUMMARY_FILE
        if summary.is_file() and read_json(summary).get("steps", 0) >= config.max_steps:
            raise ValueError(
                f"the run in {out} has finished its {config.max_steps} steps (its adapter is in "
                f"{out / FINAL_DIR}); nothing to resume: pass a larger --max-steps to train further"
            )
        return
    if run_file.is_file():
        raise FileExistsError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if is_main:
        write_text_atomic(run_file, json.dumps(record, indent=2) + "\n")


def _record(settings: RunSettings, config: TrainConfig) -> dict[str, Any]:
    data = asdict(settings) | {"train": asdict(config)}
    return {"hmt_version": __version__, "settings": json.loads(json.dumps(data, default=str))}


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        if key in RESUMABLE:
            continue
        if key == "train":
            out += _differences(before.get(key) or {}, now.get(key) or {})
        elif before.get(key) != now.get(key):
            out.append(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now")
    return out


def _summary(
    summary: TrainSummary, config: TrainConfig, model_config: HMTConfig, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "steps": summary.steps,
        "seconds": summary.seconds,
        "tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "validation": summary.validation,
        "data": data,
        "train_config": asdict(config),
        "model_config": model_config.to_dict(),
    }

"""`hmt train`: the two-stage recipe on real text, with a run folder that can be resumed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from hmt import __version__
from hmt.commands import prepare_command
from hmt.config import HMTConfig
from hmt.train import TrainConfig

RUN_FILE = "run.json"
FINAL_DIR = "final"
STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: {"mode": "rmt", "unroll": "2", "max_steps": 200},
    2: {"mode": "hmt", "unroll": "4", "max_steps": 500},
}
# Settings a resumed run may change: how long it runs and how it reports.
RESUMABLE_CHANGES = {
    "max_steps",
    "log_every",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "resume",
    "device",
}


@dataclass(frozen=True)
class TrainRequest:
    """`hmt train` as typed values; `train` fields left None take the stage's preset."""

    out: Path
    stage: int | None = None
    init_from: Path | None = None
    backbone: str | None = None
    dtype: str = "auto"
    device: str | None = None
    data: tuple[str, ...] = ("essays", "plays")
    max_train_tokens: int | None = None
    validation_data: str = "essays"
    validation_tokens: int = 4096
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] | None = None
    model: dict[str, Any] = field(default_factory=dict)  # HMTConfig fields given on the command line
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields given on the command line
    resume: bool = False

    def train_config(self) -> TrainConfig:
        preset = STAGE_PRESETS.get(self.stage or 0, {})
        return TrainConfig(**{**preset, **self.train})


def run_train_command(request: TrainRequest, console: Console | None = None) -> dict[str, Any]:
    """Check the run folder, build model and data, train, save the final adapter; returns the summary."""
    from accelerate import Accelerator

    from hmt.train import RandomWindows, StreamLanes, set_trainable_memory, train

    console = console or Console()
    config = request.train_config()  # validates before anything heavy happens
    if request.stage == 2 and request.init_from is None:
        raise ValueError("stage 2 starts from a stage-1 run: pass --init-from RUN_DIR (or an adapter folder)")
    init_adapter = resolve_init(request.init_from) if request.init_from else None
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=request.device == "cpu")
    prepare_run_dir(request, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    with console.status("loading the backbone"):
        backbone = _load(request, init_adapter, accelerator.device)
    model = build_training_model(request, backbone.model, init_adapter, config)
    train_stream, val_stream, data_info = build_streams(request, backbone.tokenizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.streaming:
        reset_tokens = config.reset_every * model.config.segment_length if config.reset_every else None
        history = config.distill_context if config.distill_weight > 0 else 0
        source = StreamLanes(train_stream, config.batch_size, rank, world, reset_tokens, history)
    else:
        source = RandomWindows(train_stream, config.batch_size, config.seed, rank, world)
    source.batch(
        0, config.max_unroll * model.config.segment_length
    )  # a corpus smaller than one sample fails now
    if config.streaming:
        source.load_state_dict({"position": 0, "carried": 0})
    set_trainable_memory(model, config.mode)  # train() does it too; here so that the count is right
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(
        f"training [bold]{config.mode}[/] · backbone {backbone.name} ({backbone.dtype}, {request.finetune}) · "
        f"{trainable:,} trainable parameters · {data_info['train_tokens']:,} training tokens · "
        f"{'resuming' if request.resume else 'new run'} in {request.out}"
    )
    with _StepProgress(console, config.max_steps, enabled=accelerator.is_main_process) as progress:
        summary = train(
            model,
            source,
            config,
            request.out,
            validation=val_stream,
            accelerator=accelerator,
            resume=request.resume,
            progress=progress,
        )
    result = {
        "steps": summary.steps,
        "seconds": summary.seconds,
        "tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "validation": summary.validation,
        "data": data_info,
        "train_config": asdict(config),
        "model_config": model.config.to_dict(),
    }
    if accelerator.is_main_process:
        final = request.out / FINAL_DIR
        model.save_pretrained(final, save_backbone=request.finetune == "full")
        if request.finetune == "full":
            backbone.tokenizer.save_pretrained(final / "backbone")
        (request.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        console.print(summary_table(summary, config, final))
    accelerator.wait_for_everyone()
    return result


def resolve_init(path: Path) -> Path:
    """A stage-1 run folder (its final adapter) or an adapter folder; refuses anything else."""
    from hmt.io import CONFIG_NAME

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


def prepare_run_dir(request: TrainRequest, is_main: bool) -> None:
    """A new run needs an unused folder; a resumed one must have been started with the same settings."""
    run_file = request.out / RUN_FILE
    record = _run_record(request)
    if request.resume:
        if not run_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {request.out} holds no run ({RUN_FILE} missing)")
        started = json.loads(run_file.read_text())
        differences = _differences(started.get("request", {}), record["request"])
        if differences:
            raise ValueError(
                f"{request.out} was started with other settings ({'; '.join(differences)}); resume with the "
                "same settings, or start a new run in another --out"
            )
        return
    if run_file.is_file():
        raise FileExistsError(
            f"{request.out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if is_main:
        from hmt.io import write_text_atomic

        request.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_file, json.dumps(record, indent=2) + "\n")


def _run_record(request: TrainRequest) -> dict[str, Any]:
    data = asdict(request)
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
    data["data"] = list(request.data)
    data["lora_targets"] = list(request.lora_targets) if request.lora_targets else None
    data["train"] = asdict(request.train_config())
    return {"hmt_version": __version__, "request": json.loads(json.dumps(data))}


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        if key in RESUMABLE_CHANGES or key == "out":
            continue
        if key == "train":
            out += _differences(before.get(key) or {}, now.get(key) or {})
        elif key == "model":
            # A setting missing on either side is HMTConfig's default: older runs lack newer settings.
            defaults = {f.name: f.default for f in fields(HMTConfig)}
            out += _differences(defaults | (before.get(key) or {}), defaults | (now.get(key) or {}))
        elif before.get(key) != now.get(key):
            out.append(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now")
    return out


def _load(request: TrainRequest, init_adapter: Path | None, device: torch.device):
    from hmt.backbone import load_backbone
    from hmt.finetune import BACKBONE_DIR

    spec = request.backbone
    if spec is None and init_adapter is not None and (init_adapter / BACKBONE_DIR).is_dir():
        spec = str(init_adapter / BACKBONE_DIR)  # stage 1 fine-tuned the whole backbone
    prepare_command()
    return load_backbone(spec, dtype=request.dtype, device=device)


def build_training_model(
    request: TrainRequest, backbone: Any, init_adapter: Path | None, config: TrainConfig
):
    """The model to train: from the stage-1 adapter (with its LoRA, trainable) or fresh, seeded."""
    from hmt.finetune import has_lora, prepare_backbone
    from hmt.model import HMTForCausalLM

    if init_adapter is not None:
        trainable_lora = request.finetune == "lora" and has_lora(init_adapter)
        model = HMTForCausalLM.from_pretrained(init_adapter, backbone, trainable_lora=trainable_lora)
        changes = {k: v for k, v in request.model.items() if getattr(model.config, k) != v}
        if changes:  # only what differs: settings tied to the parameters must match the adapter
            model.reconfigure(**changes)
        backbone = prepare_backbone(
            model.backbone, request.finetune, request.lora_rank, request.lora_alpha, _targets(request)
        )
        if backbone is not model.backbone:
            model = _rewrap(model, backbone)
        return model
    torch.manual_seed(config.seed)
    backbone = prepare_backbone(
        backbone, request.finetune, request.lora_rank, request.lora_alpha, _targets(request)
    )
    return HMTForCausalLM(backbone, HMTConfig(**request.model))


def _rewrap(model, backbone):
    """The same memory parameters around a newly wrapped (LoRA) backbone."""
    from hmt.model import HMTForCausalLM

    fresh = HMTForCausalLM(backbone, model.config)
    fresh.memory.load_state_dict(model.memory.state_dict())
    return fresh


def _targets(request: TrainRequest) -> list[str] | None:
    return list(request.lora_targets) if request.lora_targets else None


def build_streams(
    request: TrainRequest, tokenizer
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Training tokens (the train split of every data source, joined) and validation tokens."""
    from hmt.data import load_documents, token_stream

    parts, documents = [], 0
    for spec in request.data:
        docs = load_documents(spec, "train")
        documents += len(docs)
        parts.append(token_stream(docs, tokenizer, request.max_train_tokens))
    train_stream = torch.cat(parts)
    if request.max_train_tokens is not None:
        train_stream = train_stream[: request.max_train_tokens]
    val_stream = None
    if request.validation_tokens > 0:
        val_docs = load_documents(request.validation_data, "validation")
        val_stream = token_stream(val_docs, tokenizer, request.validation_tokens)
    info = {
        "train": list(request.data),
        "train_documents": documents,
        "train_tokens": int(train_stream.shape[0]),
        "validation": request.validation_data,
        "validation_tokens": int(val_stream.shape[0]) if val_stream is not None else 0,
    }
    return train_stream, val_stream, info


def summary_table(summary, config: TrainConfig, final: Path) -> Table:
    table = Table(title=f"Training ({config.mode})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("steps", str(summary.steps))
    table.add_row("tokens", f"{summary.tokens:,}")
    table.add_row("time", f"{summary.seconds / 60:.1f} min")
    if summary.final_loss is not None:
        table.add_row("final loss", f"{summary.final_loss:.3f}")
    if summary.validation:
        table.add_row("validation ppl", f"{summary.validation['val_ppl']:.2f}")
    table.add_row("adapter", str(final))
    return table


class _StepProgress:
    """A rich progress bar over optimizer steps showing the latest loss, tokens/s and validation ppl."""

    def __init__(self, console: Console, total: int, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("step"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.total = total
        self.task = None

    def __enter__(self) -> _StepProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, step: int, total: int, record: dict[str, Any] | None) -> None:
        info = None
        if record and "loss" in record:
            info = f"loss {record['loss']:.3f} · {record['tokens_per_second']:.0f} tok/s"
            if "val_ppl" in record:
                info += f" · val ppl {record['val_ppl']:.2f}"
        self.bar.update(self.task, completed=step, **({"info": info} if info else {}))

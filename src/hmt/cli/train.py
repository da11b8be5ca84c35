"""`hmt train`: the two-stage recipe on real text, in a run folder that can be resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hmt.cli.options import (
    BackboneOpt,
    CacheSizeOpt,
    DeviceOpt,
    NumSensoryOpt,
    SegmentLengthOpt,
    config_help,
    given,
    reading_settings,
    split_list,
    train_help,
)


def train_command(
    out: Annotated[Path, typer.Option(help="Run folder: run.json, train_log.jsonl, checkpoints/, final/.")],
    stage: Annotated[
        int | None,
        typer.Option(
            help="1: rmt + sensory memory, 2 segments, 200 steps. 2: hmt (recall on), 4 segments, "
            "500 steps, from --init-from. Options below override the preset."
        ),
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Stage-1 run folder (or adapter folder) that stage 2 starts from.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Start from the settings of an earlier run (its run.json); the options given override them.",
        ),
    ] = None,
    backbone: BackboneOpt = None,
    dtype: Annotated[str | None, typer.Option(help="auto | bf16 | fp32; default auto.")] = None,
    device: DeviceOpt = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Training text (its train split); repeat for several. Default: essays, plays."),
    ] = None,
    max_train_tokens: Annotated[
        int | None, typer.Option(help="Use at most this many training tokens.")
    ] = None,
    validation_data: Annotated[
        str | None, typer.Option(help="Validation text (its validation split); default essays.")
    ] = None,
    validation_tokens: Annotated[
        int | None, typer.Option(help="Validation tokens (0: no validation); default 4096.")
    ] = None,
    finetune: Annotated[
        str | None, typer.Option(help="Backbone weights: frozen | lora | full; default lora.")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank; default 8.")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha; default 16.")] = None,
    lora_targets: Annotated[
        list[str] | None,
        typer.Option(help="Modules to adapt (repeat); default: peft's choice for the architecture."),
    ] = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    memory_tokens: Annotated[
        int | None, typer.Option(help=config_help("memory_tokens") + " Default: the adapter's, else 8.")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Any HMTConfig field of the model trained (repeatable; VALUE as JSON), e.g. --set "
            "recall_temperature=null --set attention_sink=false (docs/method.md lists them).",
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            help="Train on a long-range recall task (repeat for several): passkey, needle, multikey, facts; "
            "haystacks from --data, loss on the answer only, HMT's gradient shortcut. Default: plain text."
        ),
    ] = None,
    text_every: Annotated[
        int | None,
        typer.Option(help="With --task: every this-many-th batch is plain text (0: never; the default)."),
    ] = None,
    answer_in_memory: Annotated[
        float | None,
        typer.Option(
            help="With --task: weight of the answer-in-memory loss — the memory written where the asked fact "
            "is must predict the answer's tokens through the backbone's LM head (needs --memory-tokens at "
            "least the answer's length to cover it all). 0: off (the default)."
        ),
    ] = None,
    recall_loss: Annotated[
        float | None,
        typer.Option(
            help="With --task: weight of the cross-entropy between the answer segment's recall weights and "
            "the fact's memory (reaches a saturated recall, where the answer's loss cannot). 0: off (the default)."
        ),
    ] = None,
    max_depth: Annotated[
        float | None,
        typer.Option(
            help="With --task: facts sit at depths drawn uniformly in [0, max_depth] of the haystack; below 1 "
            "they stay out of the question's own segment (where the window reads them) more often. Default 1."
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option(help=train_help("mode"))] = None,
    unroll: Annotated[str | None, typer.Option(help=train_help("unroll"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=train_help("batch_size"))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=train_help("grad_accum"))] = None,
    streaming: Annotated[bool | None, typer.Option(help=train_help("streaming"))] = None,
    loss_on: Annotated[str | None, typer.Option(help=train_help("loss_on"))] = None,
    bptt_depth: Annotated[int | None, typer.Option(help=train_help("bptt_depth"))] = None,
    max_steps: Annotated[int | None, typer.Option(help=train_help("max_steps"))] = None,
    lr: Annotated[float | None, typer.Option(help=train_help("lr"))] = None,
    memory_lr: Annotated[float | None, typer.Option(help=train_help("memory_lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=train_help("weight_decay"))] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=train_help("warmup_steps"))] = None,
    decay_every: Annotated[int | None, typer.Option(help=train_help("decay_every"))] = None,
    decay_factor: Annotated[float | None, typer.Option(help=train_help("decay_factor"))] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help=train_help("max_grad_norm"))] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help=train_help("gradient_checkpointing"))
    ] = None,
    log_every: Annotated[int | None, typer.Option(help=train_help("log_every"))] = None,
    eval_every: Annotated[int | None, typer.Option(help=train_help("eval_every"))] = None,
    save_every: Annotated[int | None, typer.Option(help=train_help("save_every"))] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help=train_help("keep_checkpoints"))] = None,
    seed: Annotated[int | None, typer.Option(help=train_help("seed"))] = None,
) -> None:
    """Train HMT's memory (and LoRA or the backbone) on long text: stage 1 (rmt), then stage 2 (hmt)."""
    from rich.console import Console

    from hmt.backbone import quiet_transformers
    from hmt.cli.console import StepProgress
    from hmt.runs import FINAL_DIR, STAGE_PRESETS, RunSettings, read_run_file, train_run
    from hmt.train import TrainConfig, check_learning_rate

    for option, rate in (("--lr", lr), ("--memory-lr", memory_lr)):
        if rate is not None:
            check_learning_rate(option, rate)
    recorded, recorded_train = read_run_file(config_file) if config_file is not None else ({}, {})
    _check_what_to_train(stage, mode, init_from, recorded, recorded_train)
    how = given(
        mode=mode, unroll=unroll, batch_size=batch_size, grad_accum=grad_accum, streaming=streaming,
        loss_on=loss_on, bptt_depth=bptt_depth, max_steps=max_steps, lr=lr, memory_lr=memory_lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, decay_every=decay_every, decay_factor=decay_factor,
        max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing, log_every=log_every,
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed,
    )  # fmt: skip
    config = TrainConfig(**{**recorded_train, **STAGE_PRESETS.get(stage or 0, {}), **how})
    model_settings = reading_settings(settings, segment_length=segment_length, num_sensory=num_sensory,
                                      cache_size=cache_size, memory_tokens=memory_tokens)  # fmt: skip
    run = given(
        backbone=backbone, dtype=dtype, device=device, data=tuple(data) if data else None,
        max_train_tokens=max_train_tokens, validation_data=validation_data,
        validation_tokens=validation_tokens, finetune=finetune, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=tuple(lora_targets) if lora_targets else None, init_from=init_from,
        tasks=tuple(split_list(",".join(task))) if task else None, text_every=text_every,
        answer_in_memory=answer_in_memory, recall_loss=recall_loss, max_depth=max_depth,
    )  # fmt: skip
    model = {**recorded.get("model", {}), **model_settings}
    run_settings = RunSettings(**{**recorded, **run, "model": model})
    from accelerate import Accelerator

    console = Console()
    quiet_transformers()
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=device == "cpu")
    main = accelerator.is_main_process
    with StepProgress(console, config.max_steps, enabled=main) as progress:
        summary = train_run(
            out, run_settings, config, resume=resume, accelerator=accelerator, progress=progress,
            announce=console.print if main else None,
        )  # fmt: skip
    if not main:
        return
    console.print(summary_table(summary, config.mode, out / FINAL_DIR))


def _check_what_to_train(stage, mode, init_from, recorded: dict, recorded_train: dict) -> None:
    if stage is None and mode is None and not recorded_train:
        raise ValueError(
            "say what to train: --stage 1, --stage 2 (with --init-from), --mode rmt|hmt|backbone, or "
            "--config RUN.json"
        )
    if stage not in (None, 1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {stage}")
    if stage == 2 and init_from is None and recorded.get("init_from") is None:
        raise ValueError("stage 2 starts from a stage-1 run: pass --init-from RUN_DIR (or an adapter folder)")


def summary_table(summary: dict, mode: str, adapter: Path):
    """The table printed when a run ends."""
    from rich.table import Table

    table = Table(title=f"Training ({mode})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("tokens", f"{summary['tokens']:,}")
    table.add_row("time", f"{summary['seconds'] / 60:.1f} min")
    if summary["final_loss"] is not None:
        table.add_row("final loss", f"{summary['final_loss']:.3f}")
    if summary["validation"]:
        table.add_row("validation ppl", f"{summary['validation']['val_ppl']:.2f}")
    table.add_row("adapter", str(adapter))
    return table

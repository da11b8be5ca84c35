"""The controlled comparison: does memory help on real text? Every arm trained alike, scored alike.

Arms (each with its own LoRA, the same data order, steps, batch, unroll and learning rates):

- windowed: independent windows of L tokens;
- sliding: windows of L tokens that also reread the previous k tokens (a sliding window of L + k);
- memory_off: the hmt layout with memory slots that always hold the learned m0 (P = m0);
- rmt: memory recurrence (stage 1 and stage 2 in rmt mode);
- hmt: stage 1 in rmt mode, stage 2 with recall.

Stage 1 samples random windows; stage 2 reads the training text in order, carrying memory across steps
(both through `hmt.runs.train_run`, optionally with context distillation from experiments/distill.py).
Each arm is scored on the test split of every evaluation text, memory carried through the whole stream
and (rmt, hmt) reset at the stage-2 unroll; the untouched backbone at its full context is the
reference. A comparison folder can be resumed: finished runs are kept, interrupted ones continue, and
every evaluation's results.json is reused.

    .venv/bin/python -m experiments.compare --out runs/compare --seeds 0,1
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer

from experiments.cli import run, tool
from experiments.distill import Distillation
from hmt.cli.console import ModeProgress, StepProgress
from hmt.cli.options import BackboneOpt, DeviceOpt, DtypeOpt, split_ints, split_list
from hmt.config import MEMORY_MODES, READING_FIELDS, WRITING_MODES, HMTConfig
from hmt.io import CONFIG_NAME, read_json, write_text_atomic
from hmt.runs import FINAL_DIR, RUN_FILE, SUMMARY_FILE, RunSettings, train_run
from hmt.train import TrainConfig, check_learning_rate

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from hmt.backbone import Backbone
    from hmt.model import HMTForCausalLM

# arm -> (stage-1 mode, stage-2 mode, mode evaluated)
ARMS: dict[str, tuple[str, str, str]] = {
    "windowed": ("backbone", "backbone", "backbone"),
    "sliding": ("sliding", "sliding", "sliding"),
    "memory_off": ("memory_off", "memory_off", "memory_off"),
    "rmt": ("rmt", "rmt", "rmt"),
    "hmt": ("rmt", "hmt", "hmt"),
}
RESULTS_NAME = "comparison.json"
TABLE_NAME = "comparison.md"
SETTINGS_NAME = "settings.json"
EVAL_RESULTS_NAME = "results.json"
# Request fields that may differ between calls on one folder: they add to it or say how it runs.
NOT_SETTINGS = ("out", "arms", "seeds", "device", "train")


@dataclass(frozen=True)
class CompareRequest:
    """One comparison as typed values (the command's options)."""

    out: Path
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0,)
    segment_length: int = 256
    num_sensory: int = 32
    cache_size: int = 300
    attention_sink: bool = True
    memory_tokens: int = 1
    stage1_steps: int = 40
    stage2_steps: int = 60
    stage1_unroll: int = 2
    stage2_unroll: int = 4
    distill_weight: float = 0.0
    distill_context: int = 768
    distill_positions: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    memory_lr: float = 1e-3
    finetune: str = "lora"
    train_data: tuple[str, ...] = ("essays", "plays")
    eval_data: tuple[str, ...] = ("essays", "plays")
    eval_tokens: int = 16384
    backbone: str | None = None
    dtype: str = "auto"
    device: str | None = None
    train: bool = True  # False: train nothing, report the arms already trained (and score any not yet scored)

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arm(s) {', '.join(unknown) or '(none)'}: use {', '.join(ARMS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("stage1_steps", "stage2_steps", "stage1_unroll", "stage2_unroll", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.train_data or not self.eval_data:
            raise ValueError("give at least one training text and one evaluation text")
        check_learning_rate("--lr", self.lr)
        check_learning_rate("--memory-lr", self.memory_lr)
        # Checked now by the objects that will use them, not after a first arm has trained.
        try:
            self.distillation()
        except ValueError as err:
            raise ValueError(f"--distill-weight, --distill-context, --distill-positions: {err}") from None
        HMTConfig(**self.model_settings)

    @property
    def model_settings(self) -> dict[str, Any]:
        """The HMTConfig fields every arm's model is built with."""
        return {
            "segment_length": self.segment_length,
            "num_sensory": self.num_sensory,
            "cache_size": self.cache_size,
            "attention_sink": self.attention_sink,
            "memory_tokens": self.memory_tokens,
            # the comparison's recipe predates bounded, sharpened recall becoming HMTConfig's default
            "recall_temperature": None,
            "sharpen_recall_after": None,
        }

    @property
    def reading(self) -> dict[str, Any]:
        """The settings every evaluation reads with (those of model_settings not tied to the weights)."""
        return {k: v for k, v in self.model_settings.items() if k in READING_FIELDS}

    @property
    def tokens_per_arm(self) -> int:
        per_step = self.batch_size * self.segment_length
        return per_step * (self.stage1_steps * self.stage1_unroll + self.stage2_steps * self.stage2_unroll)

    def distillation(self) -> Distillation | None:
        """A fresh distillation term (its own history) for one training run; None when the weight is 0."""
        term = Distillation(self.distill_weight, self.distill_context, self.distill_positions)
        return term if self.distill_weight > 0 else None


def run_compare(request: CompareRequest, console: Console | None = None) -> dict[str, Any]:
    """Train every arm for every seed (keeping finished runs), score them, write the comparison."""
    from rich.console import Console

    from hmt.backbone import quiet_transformers

    console = console or Console()
    request.out.mkdir(parents=True, exist_ok=True)
    check_same_settings(request)
    quiet_transformers()
    scorer = Scorer(request, console)
    runs: dict[str, dict[str, Any]] = {}
    for seed in request.seeds:
        for arm in request.arms:
            if (
                not request.train
                and not nothing_to_train(request, arm)
                and not _is_finished(request.out / f"seed-{seed}" / arm)
            ):
                console.print(f"[dim]seed {seed}, {arm}: not trained, left out[/]")
                continue
            adapter, training = train_arm(request, arm, seed, console)
            runs.setdefault(str(seed), {})[arm] = {
                "training": training,
                "eval": evaluate_arm(request, scorer, arm, seed, adapter),
            }
    if not runs:
        raise ValueError(f"no trained arm in {request.out}: run without --no-train first")
    reference = {data: scorer.reference(data) for data in request.eval_data}
    report = {
        "settings": json.loads(json.dumps(asdict(request), default=str))
        | {"tokens_per_arm": request.tokens_per_arm},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "runs": runs,
        "reference_full_context": reference,
        "summary": summarise(runs, reference, request.eval_data),
    }
    write_text_atomic(request.out / RESULTS_NAME, json.dumps(report, indent=2) + "\n")
    write_text_atomic(request.out / TABLE_NAME, markdown_table(report) + "\n")
    console.print(comparison_table(report))
    console.print(f"wrote {request.out / RESULTS_NAME} and {request.out / TABLE_NAME}")
    return report


def check_same_settings(request: CompareRequest) -> None:
    """A comparison folder holds one experiment: refuse to mix settings (seeds and arms may be added)."""
    path = request.out / SETTINGS_NAME
    now = {k: v for k, v in asdict(request).items() if k not in NOT_SETTINGS}
    now = json.loads(json.dumps(now, default=str))
    if not path.is_file():
        write_text_atomic(path, json.dumps(now, indent=2) + "\n")
        return
    before = read_json(path)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"{request.out} holds a comparison with other settings ({', '.join(changed)}); "
            "use the same settings to continue it, or another --out"
        )


# ---- training -----------------------------------------------------------------------------------


def nothing_to_train(request: CompareRequest, arm: str) -> bool:
    """A control arm (no memory slots, so no HMT parameters) on a frozen backbone: it is scored untrained."""
    return request.finetune == "frozen" and ARMS[arm][2] not in MEMORY_MODES


def _is_finished(run_dir: Path) -> bool:
    return (run_dir / FINAL_DIR / CONFIG_NAME).is_file()


def train_arm(
    request: CompareRequest, arm: str, seed: int, console: Console
) -> tuple[Path | None, dict[str, Any]]:
    """Both stages of one arm (stage 1 shared by the arms that train it in the same mode); returns the
    final adapter (None: nothing to train) and the training totals."""
    stage1_mode, stage2_mode, _ = ARMS[arm]
    if nothing_to_train(request, arm):
        console.print(f"[dim]seed {seed}, {arm}: frozen backbone and no HMT parameters, nothing to train[/]")
        return None, {"tokens": 0, "seconds": 0.0, "final_loss": None}
    seed_dir = request.out / f"seed-{seed}"
    stage1 = seed_dir / f"stage1-{stage1_mode}"  # rmt and hmt share their stage 1
    stage2 = seed_dir / arm
    train_stage(
        request, stage1, stage1_mode, request.stage1_unroll, request.stage1_steps, seed, None, console
    )
    train_stage(
        request, stage2, stage2_mode, request.stage2_unroll, request.stage2_steps, seed, stage1, console
    )
    summaries = [read_json(folder / SUMMARY_FILE) for folder in (stage1, stage2)]
    training = {
        "tokens": sum(s["tokens"] for s in summaries),
        "seconds": sum(s["seconds"] for s in summaries),
        "final_loss": summaries[1]["final_loss"],
    }
    return stage2 / FINAL_DIR, training


def train_stage(
    request: CompareRequest,
    out: Path,
    mode: str,
    unroll: int,
    steps: int,
    seed: int,
    init_from: Path | None,
    console: Console,
) -> None:
    """One training run: stage 1 (no `init_from`) on random windows, stage 2 on the text in order with
    memory carried. A finished run is kept, an interrupted one resumed."""
    if _is_finished(out):
        console.print(f"[dim]{out}: finished, kept[/]")
        return
    stage2 = init_from is not None
    settings = RunSettings(
        # A stage 1 that fine-tuned the whole backbone saved it in its adapter: stage 2 loads that one.
        backbone=None if stage2 and request.finetune == "full" else request.backbone,
        dtype=request.dtype,
        device=request.device,
        data=request.train_data,
        validation_data=request.train_data[0],
        validation_tokens=2048,
        finetune=request.finetune,
        model=request.model_settings,
        init_from=init_from,
    )
    config = TrainConfig(
        mode=mode,
        unroll=str(unroll),
        max_steps=steps,
        batch_size=request.batch_size,
        streaming=stage2,
        lr=request.lr,
        memory_lr=request.memory_lr,
        seed=seed,
        eval_every=0,
        save_every=10,
        log_every=5,
    )
    with StepProgress(console, steps, label=out.name) as progress:
        train_run(
            out,
            settings,
            config,
            resume=(out / RUN_FILE).is_file(),
            progress=progress,
            announce=console.print,
            auxiliary=request.distillation(),
        )


# ---- evaluation ---------------------------------------------------------------------------------


class Scorer:
    """The comparison's evaluations: the backbone loaded once, each test text tokenized once, and each
    result kept in its folder's results.json (reused when it exists)."""

    def __init__(self, request: CompareRequest, console: Console) -> None:
        self.request, self.console = request, console
        self._backbone: Backbone | None = None
        self._streams: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}

    @property
    def backbone(self) -> Backbone:
        """The untouched backbone (`hmt.backbone.Backbone`)."""
        from hmt.backbone import load_backbone

        if self._backbone is None:
            with self.console.status("loading the backbone"):
                self._backbone = load_backbone(
                    self.request.backbone, dtype=self.request.dtype, device=self.request.device
                )
        return self._backbone

    def stream(self, data: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first eval_tokens tokens of the test split of `data`, and a description of them."""
        from hmt.data import load_documents, token_stream

        if data not in self._streams:
            documents = load_documents(data, "test")
            stream = token_stream(documents, self.backbone.tokenizer, self.request.eval_tokens)
            self._streams[data] = (
                stream,
                {
                    "spec": data,
                    "split": "test",
                    "documents": len(documents),
                    "document_names": [d.name for d in documents],
                    "tokens": int(stream.shape[0]),
                    "requested_tokens": self.request.eval_tokens,
                },
            )
        return self._streams[data]

    def model(self, mode: str, adapter: Path | None) -> HMTForCausalLM:
        """The trained adapter on the backbone (its LoRA merged into a copy), or, without one, untrained
        memory parameters around the untouched backbone (for rows that read none of them)."""
        from hmt.backbone import load_backbone, saved_backbone
        from hmt.model import HMTForCausalLM

        if adapter is None:
            torch.manual_seed(0)
            return HMTForCausalLM(self.backbone.model, HMTConfig(**self.request.model_settings), mode=mode)
        backbone = self.backbone.model
        saved = saved_backbone(adapter)
        if saved is not None:  # the whole backbone was fine-tuned: it is in the adapter
            backbone = load_backbone(saved, dtype=self.request.dtype, device=self.request.device).model
        return HMTForCausalLM.from_pretrained(adapter, backbone, mode=mode, **self.request.reading)

    def evaluate(
        self, folder: Path, mode: str, data: str, adapter: Path | None, reset_every: int | None = None
    ) -> dict[str, Any]:
        """`mode`'s perplexity on `data` (a report as `hmt eval` writes it), from folder/results.json if
        it is there, else measured and written there."""
        from hmt.evaluate import EvalConfig, make_report, run_eval, write_report

        path = folder / EVAL_RESULTS_NAME
        if path.is_file():
            return read_json(path)
        config = EvalConfig(modes=(mode,), reset_every=reset_every)
        model = self.model("backbone" if mode == "full" else mode, adapter)
        stream, info = self.stream(data)
        with ModeProgress(self.console, config.modes, info["tokens"]) as progress:
            results = run_eval(model, stream, config, progress=progress)
        report = make_report(
            results,
            model_config=model.config.to_dict(),
            backbone=self.backbone.describe(),
            data=info,
            adapter=str(adapter) if adapter else None,
            adapter_note=f"trained adapter {adapter}" if adapter else "none: the untouched backbone",
            settings={
                "max_tokens": self.request.eval_tokens,
                "full_window": results["full"].window if "full" in results else None,
                "reset_every": reset_every,
            },
        )
        write_report(report, path)
        return report

    def reference(self, data: str) -> float:
        """The untouched backbone's perplexity on `data` at its full context."""
        folder = self.request.out / "eval-full" / slug(data)
        return self.evaluate(folder, "full", data, None)["modes"]["full"]["ppl"]


def evaluate_arm(
    request: CompareRequest, scorer: Scorer, arm: str, seed: int, adapter: Path | None
) -> dict[str, dict[str, Any]]:
    """Per evaluation text: perplexity with memory carried through the stream and (rmt, hmt) reset every
    stage-2 unroll, each with its perplexity at segment starts and hmt's recall statistics."""
    mode = ARMS[arm][2]
    variants: dict[str, int | None] = {"carried": None}
    if mode in WRITING_MODES:
        variants["reset"] = request.stage2_unroll
    out: dict[str, dict[str, Any]] = {}
    for data in request.eval_data:
        for variant, reset_every in variants.items():
            folder = request.out / f"seed-{seed}" / "eval" / f"{arm}-{slug(data)}-{variant}"
            result = scorer.evaluate(folder, mode, data, adapter, reset_every)["modes"][mode]
            out.setdefault(data, {})[variant] = result["ppl"]
            starts = result["offset_ppl"][0] if result["offset_ppl"] else None
            if starts is not None:
                out[data][f"{variant}_starts"] = starts
            if result.get("recall"):
                out[data][f"{variant}_recall"] = result["recall"]
    return out


def slug(data: str) -> str:
    """A folder name for a data spec (a corpus name, a path, hf:NAME:SPLIT)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", Path(data).name or data).strip("_") or "data"


# ---- the report ---------------------------------------------------------------------------------


def summarise(
    runs: dict[str, dict[str, Any]], reference: dict[str, float], eval_data: tuple[str, ...]
) -> dict[str, Any]:
    """Per arm and corpus: mean perplexity over seeds, its spread (max - min), the share of the gap
    between the sliding window and the full-context backbone that the arm closes, and the mean
    perplexity at segment starts (the first eighth of a segment's positions) where every seed has it."""
    arms = sorted({arm for seed_runs in runs.values() for arm in seed_runs}, key=list(ARMS).index)
    out: dict[str, Any] = {}
    for arm in arms:
        for variant in ("carried", "reset"):
            for data in eval_data:
                scored = [
                    r[arm]["eval"][data]
                    for r in runs.values()
                    if arm in r and variant in r[arm]["eval"].get(data, {})
                ]
                if not scored:
                    continue
                values = [e[variant] for e in scored]
                entry = out.setdefault(f"{arm}/{variant}", {})
                entry[data] = {
                    "ppl": statistics.fmean(values),
                    "spread": max(values) - min(values),
                    "seeds": len(values),
                }
                starts = [e[f"{variant}_starts"] for e in scored if f"{variant}_starts" in e]
                if len(starts) == len(values):  # every seed's, or the mean would mix seeds
                    entry[data]["segment_starts"] = statistics.fmean(starts)
    for data in eval_data:
        sliding = out.get("sliding/carried", {}).get(data)
        if sliding is None:
            continue
        gap = sliding["ppl"] - reference[data]
        for entry in out.values():
            if data in entry and gap > 0:
                entry[data]["gap_closed"] = (sliding["ppl"] - entry[data]["ppl"]) / gap
    return out


def _rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per evaluation text) for every summary entry, then the reference."""
    eval_data = report["settings"]["eval_data"]
    rows = []
    for name, entry in report["summary"].items():
        cells = []
        for data in eval_data:
            e = entry.get(data)
            if e is None:
                cells.append("-")
                continue
            text = f"{e['ppl']:.2f}" + (f" ± {e['spread'] / 2:.2f}" if e["seeds"] > 1 else "")
            if "gap_closed" in e:
                text += f" ({100 * e['gap_closed']:+.0f}%)"
            if "segment_starts" in e:
                text += f" · starts {e['segment_starts']:.2f}"
            cells.append(text)
        arm, variant = name.split("/")
        reset = report["settings"]["stage2_unroll"]
        rows.append((arm if variant == "carried" else f"{arm}, memory reset every {reset} segments", cells))
    full = [f"{report['reference_full_context'][d]:.2f}" for d in eval_data]
    rows.append(("untouched backbone, full context", full))
    return rows


def comparison_table(report: dict[str, Any]) -> Table:
    from rich.table import Table

    settings = report["settings"]
    table = Table(
        title="Held-out perplexity, every arm trained on the same tokens",
        caption=f"{settings['tokens_per_arm']:,} training tokens per arm · seeds {settings['seeds']} · "
        "mean ± half the spread over seeds (share of the sliding → full-context gap closed) · starts: "
        "perplexity on the first eighth of every segment's positions",
    )
    table.add_column("arm", no_wrap=True)
    for data in settings["eval_data"]:
        table.add_column(f"{data} (test)", justify="right")
    for name, cells in _rows(report):
        table.add_row(name, *cells)
    return table


def markdown_table(report: dict[str, Any]) -> str:
    eval_data = report["settings"]["eval_data"]
    lines = [
        "| arm | " + " | ".join(f"{d} (test) ppl" for d in eval_data) + " |",
        "|---" * (len(eval_data) + 1) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in _rows(report)]
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------

app = tool("Does memory help on real text? Windowed, sliding window, memory off, rmt and hmt, trained alike.")


def _help(name: str) -> str:
    return HMTConfig.help(name)


@app.command()
def compare(
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
    attention_sink: Annotated[bool, typer.Option(help=_help("attention_sink"))] = True,
    memory_tokens: Annotated[int, typer.Option(help=_help("memory_tokens"))] = 1,
    stage1_steps: Annotated[int, typer.Option(help="Stage-1 steps (random windows).")] = 40,
    stage2_steps: Annotated[
        int, typer.Option(help="Stage-2 steps (the text in order, memory carried).")
    ] = 60,
    stage1_unroll: Annotated[int, typer.Option(help="Segments per stage-1 sample.")] = 2,
    stage2_unroll: Annotated[int, typer.Option(help="Segments per stage-2 sample.")] = 4,
    distill_weight: Annotated[
        float,
        typer.Option(
            help="Weight of context distillation added to the LM loss (experiments/distill.py): KL from "
            "the backbone reading the window after up to --distill-context tokens its memory has read. "
            "Both stages, every arm (the same teacher); 0: off."
        ),
    ] = 0.0,
    distill_context: Annotated[
        int, typer.Option(help="Raw tokens before each window the distillation teacher reads (at most).")
    ] = 768,
    distill_positions: Annotated[
        int | None,
        typer.Option(help="Distil only the first this many positions of each segment (default: all)."),
    ] = None,
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
    run_compare(
        CompareRequest(
            out=out,
            arms=split_list(arms),
            seeds=split_ints(seeds, "--seeds"),
            segment_length=segment_length,
            num_sensory=num_sensory,
            cache_size=cache_size,
            attention_sink=attention_sink,
            memory_tokens=memory_tokens,
            stage1_steps=stage1_steps,
            stage2_steps=stage2_steps,
            stage1_unroll=stage1_unroll,
            stage2_unroll=stage2_unroll,
            distill_weight=distill_weight,
            distill_context=distill_context,
            distill_positions=distill_positions,
            batch_size=batch_size,
            lr=lr,
            memory_lr=memory_lr,
            finetune=finetune,
            train_data=split_list(train_data),
            eval_data=split_list(eval_data),
            eval_tokens=eval_tokens,
            backbone=backbone,
            dtype=dtype,
            device=device,
            train=train,
        )
    )


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()

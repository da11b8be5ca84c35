"""`hmt compare`: does memory help on real text? Every arm trained alike, every arm scored alike.

Arms (each with its own LoRA, the same data order, steps, batch, unroll and learning rates):

- windowed: independent windows of L tokens;
- sliding: windows of L tokens that also reread the previous k tokens (a sliding window of L + k);
- memory_off: the hmt layout with memory slots that always hold the learned m0 (P = m0);
- rmt: memory recurrence (stage 1 and stage 2 in rmt mode);
- hmt: stage 1 in rmt mode, stage 2 with recall.

Stage 1 samples random windows; stage 2 reads the training text in order, carrying memory across steps.
Each arm is scored on the held-out split of every evaluation corpus, memory carried through the whole
stream and (rmt, hmt) reset at the stage-2 unroll; the untouched backbone at its full context is the
reference. A run folder can be resumed: finished runs are skipped, interrupted ones continue.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from hmt.commands.evaluation import EvalRequest, run_eval_command
from hmt.commands.training import FINAL_DIR, RUN_FILE, TrainRequest, run_train_command
from hmt.config import MEMORY_MODES, WRITING_MODES, HMTConfig
from hmt.io import CONFIG_NAME, write_text_atomic
from hmt.train import TrainConfig

# arm -> (stage-1 mode, stage-2 mode, mode evaluated)
ARMS: dict[str, tuple[str, str, str]] = {
    "windowed": ("backbone", "backbone", "backbone"),
    "sliding": ("sliding", "sliding", "sliding"),
    "memory_off": ("memory_off", "memory_off", "memory_off"),
    "rmt": ("rmt", "rmt", "rmt"),
    "hmt": ("rmt", "hmt", "hmt"),
}
RESULTS_NAME = "comparison.json"
# Settings added after comparison folders were first written, with the value those folders used.
SETTINGS_ADDED_LATER: dict[str, Any] = {
    "memory_tokens": 1, "memory_offset": False, "memory_layer": None, "recall_recency": 0.0,
    "stage2_reset_every": None, "distill_weight": 0.0, "distill_context": 768, "distill_positions": None,
}  # fmt: skip


@dataclass(frozen=True)
class CompareRequest:
    """`hmt compare` as typed values."""

    out: Path
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0,)
    segment_length: int = 256
    num_sensory: int = 32
    cache_size: int = 300
    attention_sink: bool = True
    memory_tokens: int = 1
    memory_offset: bool = False
    memory_layer: int | None = None
    recall_recency: float = 0.0
    stage1_steps: int = 40
    stage2_steps: int = 60
    stage1_unroll: int = 2
    stage2_unroll: int = 4
    stage2_reset_every: int | None = None
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
        # Checked now by the configs that will use them, not after a first arm has trained.
        for option, check in (
            ("recall-recency", lambda: HMTConfig(recall_recency=self.recall_recency)),
            ("stage2-reset-every", lambda: TrainConfig(streaming=True, reset_every=self.stage2_reset_every)),
            (
                "distill-weight, --distill-context, --distill-positions",
                lambda: TrainConfig(**self.distill_settings),
            ),
        ):
            try:
                check()
            except ValueError as err:
                raise ValueError(f"--{option}: {err}") from None
        for name in ("stage1_steps", "stage2_steps", "stage1_unroll", "stage2_unroll", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def distill_settings(self) -> dict[str, Any]:
        return {
            "distill_weight": self.distill_weight,
            "distill_context": self.distill_context,
            "distill_positions": self.distill_positions,
        }

    @property
    def tokens_per_arm(self) -> int:
        per_step = self.batch_size * self.segment_length
        return per_step * (self.stage1_steps * self.stage1_unroll + self.stage2_steps * self.stage2_unroll)


def run_compare_command(request: CompareRequest, console: Console | None = None) -> dict[str, Any]:
    """Train every arm for every seed (skipping finished runs), score them, write the comparison."""
    console = console or Console()
    request.out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(request)
    runs: dict[str, dict[str, Any]] = {}
    for seed in request.seeds:
        for arm in request.arms:
            if (
                not request.train
                and not _nothing_to_train(request, arm)
                and not (request.out / f"seed-{seed}" / arm / FINAL_DIR / CONFIG_NAME).is_file()
            ):
                console.print(f"[dim]seed {seed}, {arm}: not trained, left out[/]")
                continue
            adapter, training = _train_arm(request, arm, seed, console)
            runs.setdefault(str(seed), {})[arm] = {
                "training": training,
                "eval": _evaluate_arm(request, arm, seed, adapter, console),
            }
    if not runs:
        raise ValueError(f"no trained arm in {request.out}: run without --no-train first")
    reference = {data: _evaluate_reference(request, data, console) for data in request.eval_data}
    report = {
        "settings": asdict(request) | {"out": str(request.out), "tokens_per_arm": request.tokens_per_arm},
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
    write_text_atomic(request.out / "comparison.md", markdown_table(report) + "\n")
    console.print(comparison_table(report))
    console.print(f"wrote {request.out / RESULTS_NAME} and {request.out / 'comparison.md'}")
    return report


def _check_same_settings(request: CompareRequest) -> None:
    """A comparison folder holds one experiment: refuse to mix settings (seeds and arms may be added)."""
    path = request.out / "settings.json"
    now = {k: v for k, v in asdict(request).items() if k not in ("out", "arms", "seeds", "device", "train")}
    now = json.loads(json.dumps(now))
    if path.is_file():
        before = SETTINGS_ADDED_LATER | json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise ValueError(
                f"{request.out} holds a comparison with other settings ({', '.join(changed)}); "
                "use the same settings to continue it, or another --out"
            )
    else:
        write_text_atomic(path, json.dumps(now, indent=2) + "\n")


def _nothing_to_train(request: CompareRequest, arm: str) -> bool:
    """A control arm (no memory slots, so no HMT parameters) on a frozen backbone: it is scored untrained."""
    return request.finetune == "frozen" and ARMS[arm][2] not in MEMORY_MODES


def _train_arm(
    request: CompareRequest, arm: str, seed: int, console: Console
) -> tuple[Path | None, dict[str, Any]]:
    stage1_mode, stage2_mode, _ = ARMS[arm]
    if _nothing_to_train(request, arm):
        console.print(f"[dim]seed {seed}, {arm}: frozen backbone and no HMT parameters, nothing to train[/]")
        return None, {"tokens": 0, "seconds": 0.0, "final_loss": None}
    seed_dir = request.out / f"seed-{seed}"
    stage1 = seed_dir / f"stage1-{stage1_mode}"  # rmt and hmt share their stage 1
    stage2 = seed_dir / arm
    _train_once(
        request, stage1, stage1_mode, request.stage1_unroll, request.stage1_steps, seed, None, False, console
    )
    _train_once(
        request, stage2, stage2_mode, request.stage2_unroll, request.stage2_steps, seed, stage1, True, console
    )
    summaries = [json.loads((d / "summary.json").read_text()) for d in (stage1, stage2)]
    training = {
        "tokens": sum(s["tokens"] for s in summaries),
        "seconds": sum(s["seconds"] for s in summaries),
        "final_loss": summaries[1]["final_loss"],
    }
    return stage2 / FINAL_DIR, training


def _train_once(
    request: CompareRequest,
    out: Path,
    mode: str,
    unroll: int,
    steps: int,
    seed: int,
    init_from: Path | None,
    streaming: bool,
    console: Console,
) -> None:
    if (out / FINAL_DIR / CONFIG_NAME).is_file():
        console.print(f"[dim]{out}: finished, kept[/]")
        return
    run_train_command(
        TrainRequest(
            out=out,
            init_from=init_from,
            backbone=request.backbone,
            dtype=request.dtype,
            device=request.device,
            data=request.train_data,
            validation_data=request.train_data[0],
            validation_tokens=2048,
            finetune=request.finetune,
            model={
                "segment_length": request.segment_length,
                "num_sensory": request.num_sensory,
                "cache_size": request.cache_size,
                "attention_sink": request.attention_sink,
                "memory_tokens": request.memory_tokens,
                "memory_offset": request.memory_offset,
                "memory_layer": request.memory_layer,
                "recall_recency": request.recall_recency,
            },
            train={
                "mode": mode,
                "unroll": str(unroll),
                "max_steps": steps,
                "batch_size": request.batch_size,
                "streaming": streaming,
                "reset_every": request.stage2_reset_every if streaming else None,
                "lr": request.lr,
                "memory_lr": request.memory_lr,
                **request.distill_settings,
                "seed": seed,
                "eval_every": 0,
                "save_every": 10,
                "log_every": 5,
            },
            resume=(out / RUN_FILE).is_file(),
        ),
        console,
    )


def _evaluate_arm(
    request: CompareRequest, arm: str, seed: int, adapter: Path | None, console: Console
) -> dict[str, dict[str, float]]:
    mode = ARMS[arm][2]
    variants: dict[str, int | None] = {"carried": None}
    if mode in WRITING_MODES:
        variants["reset"] = request.stage2_unroll
    out: dict[str, dict[str, float]] = {}
    for data in request.eval_data:
        for variant, reset_every in variants.items():
            folder = request.out / f"seed-{seed}" / "eval" / f"{arm}-{_slug(data)}-{variant}"
            report = _eval_once(request, folder, (mode,), data, adapter, reset_every, console)
            result = report["modes"][mode]
            out.setdefault(data, {})[variant] = result["ppl"]
            starts = (result.get("offset_ppl") or [None])[0]  # absent in results written before it
            if starts is not None:
                out[data][f"{variant}_starts"] = starts
            if result.get("recall"):
                out[data][f"{variant}_recall"] = result["recall"]
    return out


def _evaluate_reference(request: CompareRequest, data: str, console: Console) -> float:
    report = _eval_once(
        request, request.out / "eval-full" / _slug(data), ("full",), data, None, None, console
    )
    return report["modes"]["full"]["ppl"]


def _slug(data: str) -> str:
    """A folder name for a data spec (a corpus name, a path, hf:NAME:SPLIT)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", Path(data).name or data).strip("_") or "data"


def _eval_once(
    request: CompareRequest,
    folder: Path,
    modes: tuple[str, ...],
    data: str,
    adapter: Path | None,
    reset_every: int | None,
    console: Console,
) -> dict[str, Any]:
    results = folder / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    return run_eval_command(
        EvalRequest(
            modes=modes,
            segment_length=request.segment_length,
            num_sensory=request.num_sensory,
            cache_size=request.cache_size,
            max_tokens=request.eval_tokens,
            data=data,
            split="test",
            backbone=request.backbone,
            adapter=adapter
            or Path("none"),  # the reference is the untouched backbone, never the shipped adapter
            out=folder,
            dtype=request.dtype,
            device=request.device,
            reset_every=reset_every,
        ),
        console,
    )


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

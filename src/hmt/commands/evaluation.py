"""`hmt eval`: build the token stream and the model, score every mode, print a table, write JSON and plots."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
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

from hmt.backbone import Backbone, load_backbone
from hmt.commands import prepare_command, refuse_existing
from hmt.config import HMTConfig
from hmt.evaluate import EvalConfig, ModeResult, make_report, run_eval, write_report
from hmt.model import HMTForCausalLM


@dataclass(frozen=True)
class EvalRequest:
    """The command line of `hmt eval`, as typed values (None: the adapter's or the default setting)."""

    modes: tuple[str, ...]
    segment_length: int | None = None
    num_sensory: int | None = None
    cache_size: int | None = None
    summary_length: int | None = None
    recall_recency: float | None = None
    max_tokens: int = 16384
    data: str = "essays"
    split: str | None = None
    backbone: str | None = None
    adapter: Path | None = None
    out: Path | None = None
    dtype: str = "auto"
    device: str | None = None
    full_window: int | None = None
    reset_every: int | None = None
    interleave: str | None = None
    dilate: str | None = None
    filler: str = "$"
    seed: int = 0
    overwrite: bool = False


def run_eval_command(request: EvalRequest, console: Console | None = None) -> dict[str, Any]:
    """Run the evaluation the request describes; returns the report that was written."""
    console = console or Console()
    eval_config = EvalConfig(  # fails before anything is loaded
        modes=request.modes, full_window=request.full_window, reset_every=request.reset_every
    )
    if request.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {request.max_tokens}")
    request = replace(request, adapter=resolve_adapter(request.adapter, request.backbone))
    out_dir = request.out or Path("runs") / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = out_dir / "results.json"
    refuse_existing(results_path, request.overwrite)

    with console.status("loading the backbone (the first use of a .gguf file converts it, ~30 s)"):
        backbone = _quiet_load(request)
    stream, score_mask, data_info = build_stream(request, backbone.tokenizer)
    model, adapter_note = build_model(request, backbone)
    console.print(
        f"backbone [bold]{backbone.name}[/] ({backbone.dtype}, {model.device}) · data [bold]{data_info['spec']}[/] "
        f"split {data_info['split']}, {data_info['documents']} documents, {data_info['tokens']:,} tokens"
    )
    if data_info["tokens"] < request.max_tokens:
        console.print(
            f"[yellow]note:[/] the text has only {data_info['tokens']:,} tokens (asked for {request.max_tokens:,})"
        )
    console.print(f"adapter: {adapter_note}")

    with _ModeProgress(console, eval_config.modes, data_info["tokens"]) as progress:
        results = run_eval(model, stream, eval_config, score_mask, progress=progress)
    report = make_report(
        results,
        model_config={k: v for k, v in model.config.to_dict().items() if k != "mode"},
        backbone={
            "name": backbone.name,
            "source": backbone.source,
            "dtype": str(backbone.dtype).removeprefix("torch."),
            "device": str(model.device),
            "max_positions": backbone.max_positions,
        },
        data=data_info,
        adapter=str(request.adapter) if request.adapter else None,
        adapter_note=adapter_note,
        settings={
            "max_tokens": request.max_tokens,
            "full_window": results["full"].window if "full" in results else None,
            "reset_every": request.reset_every,
            "seed": request.seed,
        },
    )
    written = [write_report(report, results_path)]
    written += _plots(report, out_dir)
    console.print(results_table(results, adapter_note))
    for line in diagnostics(results):
        console.print(line)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return report


def _quiet_load(request: EvalRequest) -> Backbone:
    prepare_command()
    return load_backbone(request.backbone, dtype=request.dtype, device=request.device)


def build_stream(request: EvalRequest, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The token stream to score, which of its positions to score (None: all) and a description of it."""
    from hmt.data import dilate, filler_mask, interleave, load_documents, resolve_split, token_stream

    documents = load_documents(request.data, request.split)
    stream = token_stream(documents, tokenizer, request.max_tokens)
    info: dict[str, Any] = {
        "spec": request.data,
        "split": resolve_split(request.data, request.split),
        "documents": len(documents),
        "document_names": [d.name for d in documents],
        "transforms": {},
    }
    score_mask = None
    if request.interleave:
        other, every = _split_spec(request.interleave, "--interleave", "DATA:M")
        other_docs = load_documents(other, request.split)
        stream = interleave(stream, token_stream(other_docs, tokenizer, request.max_tokens), every)
        info["transforms"]["interleave"] = {"with": other, "every": every, "documents": len(other_docs)}
    if request.dilate:
        every_text, length_text = (
            request.dilate.split(":", 1) if ":" in request.dilate else (request.dilate, "")
        )
        every, length = (
            _positive_int(every_text, "--dilate", "EVERY:LENGTH"),
            _positive_int(length_text, "--dilate", "EVERY:LENGTH"),
        )
        filler = torch.tensor(tokenizer(request.filler, add_special_tokens=False).input_ids, dtype=torch.long)
        text_length = stream.shape[0]
        stream = dilate(stream, filler, every, length)
        score_mask = ~filler_mask(text_length, every, length)
        info["transforms"]["dilate"] = {"every": every, "length": length, "filler": request.filler}
    if stream.shape[0] > request.max_tokens:
        stream = stream[: request.max_tokens]
        score_mask = score_mask[: request.max_tokens] if score_mask is not None else None
    info["tokens"] = int(stream.shape[0])
    info["requested_tokens"] = request.max_tokens
    return stream, score_mask, info


def resolve_adapter(adapter: Path | None, backbone: str | None) -> Path | None:
    """`--adapter none` means untrained memory; no `--adapter` with the default backbone means the
    adapter shipped for it (if this installation has one)."""
    from hmt.adapters import default_adapter

    if adapter is not None:
        return None if str(adapter).lower() == "none" else adapter
    return default_adapter() if backbone is None else None


def build_model(request: EvalRequest, backbone: Backbone) -> tuple[HMTForCausalLM, str]:
    """The adapter on the backbone, or fresh (untrained, seeded) memory parameters; and a note saying which."""
    overrides = {
        name: value
        for name, value in {
            "segment_length": request.segment_length,
            "num_sensory": request.num_sensory,
            "cache_size": request.cache_size,
            "summary_length": request.summary_length,
            "recall_recency": request.recall_recency,
        }.items()
        if value is not None
    }
    if request.adapter is not None:
        model = HMTForCausalLM.from_pretrained(request.adapter, backbone.model)
        if overrides:
            model.reconfigure(**overrides)
        from hmt.adapters import default_adapter
        from hmt.finetune import has_lora

        shipped = request.adapter == default_adapter()
        note = f"{'the shipped' if shipped else 'trained'} adapter {request.adapter.name if shipped else request.adapter}"
        if has_lora(request.adapter):
            note += " (its LoRA weights apply to every row, backbone and full included)"
        return model, note
    torch.manual_seed(request.seed)
    model = HMTForCausalLM(backbone.model, HMTConfig(**overrides))
    return model, f"none: the rmt and hmt rows use untrained memory parameters (seed {request.seed})"


def results_table(results: dict[str, ModeResult], adapter_note: str) -> Table:
    caption = f"adapter: {adapter_note}\nsegment starts: the first eighth of every segment's positions"
    table = Table(title="Perplexity on the same tokens", caption=caption)
    columns = (
        "mode",
        "window",
        "ppl",
        "vs backbone",
        "segment starts",
        "tokens scored",
        "seconds",
        "tokens/s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=column == "mode")
    reference = results.get("backbone")
    for mode, r in results.items():
        relative = f"{100 * (r.ppl / reference.ppl - 1):+.1f}%" if reference else "-"
        start = f"{r.offset_ppl[0]:.2f}" if r.offset_ppl and r.offset_ppl[0] is not None else "-"
        table.add_row(
            mode, str(r.window), f"{r.ppl:.2f}", relative, start, str(r.tokens_scored), f"{r.seconds:.0f}",
            f"{r.tokens_per_second:.0f}",
        )  # fmt: skip
    return table


def diagnostics(results: dict[str, ModeResult]) -> list[str]:
    """One line per memory mode: memory vs embedding scale, and how sharply recall chose."""
    lines = []
    for mode, r in results.items():
        if r.embedding_norm is None:
            continue
        line = f"{mode}: memory norm {r.memory_norm or 0:.2f} (token embeddings {r.embedding_norm:.2f})"
        if r.recall is not None and r.recall.segments:
            top, share = r.recall.most_common_distance()
            line += (
                f"; recall entropy {r.recall.mean_entropy:.2f} nats, strongest weight "
                f"{r.recall.mean_max_weight:.2f}, most often {top} segment(s) back "
                f"({share:.0%} of segments), on the oldest entry held in "
                f"{r.recall.oldest_share:.0%}"
            )
        lines.append(line)
    return lines


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from hmt.plots import plot_ppl_by_position, plot_recall_distances

    paths = [plot_ppl_by_position(report, out_dir / "ppl_by_position.png")]
    if "hmt" in report["modes"] and report["modes"]["hmt"]["recall"]["segments"]:
        paths.append(plot_recall_distances(report, out_dir / "recall_distance.png"))
    return paths


class _ModeProgress:
    """A rich progress bar with one task per mode, usable as run_eval's progress callback."""

    def __init__(self, console: Console, modes: tuple[str, ...], total: int) -> None:
        self.bar = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.modes, self.total = modes, total
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ModeProgress:
        self.bar.__enter__()
        self.tasks = {mode: self.bar.add_task(mode, total=self.total, start=False) for mode in self.modes}
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, mode: str, done: int, total: int) -> None:
        task = self.tasks[mode]
        self.bar.start_task(task)  # the clock of a mode starts with its first chunk, not with the bar
        self.bar.update(task, completed=done, total=total)


def _split_spec(value: str, option: str, form: str) -> tuple[str, int]:
    if ":" not in value:
        raise ValueError(f"{option} takes {form}, got {value!r}")
    head, tail = value.rsplit(":", 1)
    return head, _positive_int(tail, option, form)


def _positive_int(text: str, option: str, form: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{option} takes {form} with whole numbers, got {text!r}") from None
    if number < 1:
        raise ValueError(f"{option}: numbers in {form} must be >= 1, got {number}")
    return number

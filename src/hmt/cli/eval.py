"""`hmt eval`: perplexity of every mode on the same tokens of one long text; a table, results.json, plots."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FullWindowOpt,
    NumSensoryOpt,
    OverwriteOpt,
    SegmentLengthOpt,
    SetOpt,
    SplitOpt,
    reading_settings,
    split_list,
)

RESULTS_NAME = "results.json"


def eval_command(
    modes: Annotated[
        str, typer.Option(help="Comma-separated modes: backbone, sliding, memory_off, rmt, hmt, full.")
    ] = "backbone,rmt,hmt,full",
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Read the first this many tokens of the text.")] = 16384,
    data: DataOpt = "essays",
    split: SplitOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    lora_baselines: Annotated[
        bool,
        typer.Option(
            help="Read the backbone and full rows with the adapter's LoRA too (default: the untouched "
            "backbone, what you would run instead of HMT)."
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and plots; default runs/eval-<time>.")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    full_window: FullWindowOpt = None,
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
    overwrite: OverwriteOpt = False,
) -> None:
    """Perplexity of HMT against the windowed, sliding-window and full-context backbone on one long text."""
    from rich.console import Console

    from hmt.backbone import resolve_device
    from hmt.cli.console import ModeProgress
    from hmt.data.streams import EvalText
    from hmt.evaluate import EvalConfig, make_report, run_eval, write_report
    from hmt.io import check_output
    from hmt.loading import load_model

    console = Console()
    eval_config = EvalConfig(modes=split_list(modes), full_window=full_window, reset_every=reset_every)
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
    resolve_device(device)
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    out = out or Path("runs") / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = check_output(out, RESULTS_NAME, overwrite)  # before anything long
    text = EvalText.load(data, split, interleave=interleave, dilate=dilate, filler=filler)  # before the model

    with console.status("loading the backbone (the first use of a .gguf file converts it, ~30 s)"):
        loaded = load_model(backbone, adapter=adapter, settings=reading, dtype=dtype, device=device, seed=seed,
                            lora_baselines=lora_baselines)  # fmt: skip
    model, reference, plain, labels, adapter = (
        loaded.model,
        loaded.reference,
        loaded.backbone,
        loaded.weights,
        loaded.adapter,
    )
    stream, score_mask, data_info = text.tokens(plain.tokenizer, max_tokens)
    console.print(
        f"backbone [bold]{plain.name}[/] ({plain.dtype}, {model.device}) · data [bold]{data_info['spec']}[/] "
        f"split {data_info['split']}, {data_info['documents']} documents, {data_info['tokens']:,} tokens"
    )
    if data_info["tokens"] < max_tokens:
        console.print(
            f"[yellow]note:[/] the text has only {data_info['tokens']:,} tokens (asked for {max_tokens:,})"
        )
    console.print(f"adapter: {labels['adapter']}")

    with ModeProgress(console, eval_config.modes, data_info["tokens"]) as progress:
        results = run_eval(model, stream, eval_config, score_mask, progress=progress, reference=reference)
    weights = {mode: labels[r.weights] for mode, r in results.items()}
    report = make_report(
        results,
        model_config=model.config.to_dict(),
        backbone=plain.describe(),
        data=data_info,
        adapter=str(adapter) if adapter else None,
        adapter_note=labels["adapter"],
        settings={
            "max_tokens": max_tokens,
            "full_window": results["full"].window if "full" in results else None,
            "reset_every": reset_every,
            "seed": seed,
            "weights": weights,
        },
    )
    written = [write_report(report, results_path), *_plots(report, out)]
    console.print(results_table(results, weights, labels["adapter"]))
    for line in diagnostics(results):
        console.print(line)
    console.print("wrote " + ", ".join(str(p) for p in written))


SHORT_WEIGHTS = {
    "untouched backbone": "plain",
    "backbone + the adapter's LoRA": "+LoRA",
    "the adapter's fine-tuned backbone": "tuned",
}


def results_table(results, weights: dict[str, str], adapter_note: str):
    from rich.table import Table

    caption = (
        f"adapter: {adapter_note}\nweights: plain = the untouched backbone, +LoRA = with the adapter's LoRA, "
        "tuned = the adapter's fine-tuned backbone\nsegment starts: the first eighth of every segment's positions"
    )
    table = Table(title="Perplexity on the same tokens", caption=caption)
    columns = (
        "mode",
        "weights",
        "window",
        "ppl",
        "vs backbone",
        "segment starts",
        "tokens scored",
        "seconds",
        "tokens/s",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("mode", "weights") else "right", no_wrap=column == "mode"
        )
    reference = results.get("backbone")
    for mode, r in results.items():
        relative = f"{100 * (r.ppl / reference.ppl - 1):+.1f}%" if reference else "-"
        start = f"{r.offset_ppl[0]:.2f}" if r.offset_ppl and r.offset_ppl[0] is not None else "-"
        table.add_row(
            mode, SHORT_WEIGHTS[weights[mode]], str(r.window), f"{r.ppl:.2f}", relative, start, str(r.tokens_scored),
            f"{r.seconds:.0f}", f"{r.tokens_per_second:.0f}",
        )  # fmt: skip
    return table


def diagnostics(results) -> list[str]:
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
                f"({share:.0%} of segments), on the oldest entry held in {r.recall.oldest_share:.0%}"
            )
        lines.append(line)
    return lines


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from hmt.plots import plot_ppl_by_position, plot_recall_distances

    paths = [plot_ppl_by_position(report, out_dir / "ppl_by_position.png")]
    if "hmt" in report["modes"] and report["modes"]["hmt"]["recall"]["segments"]:
        paths.append(plot_recall_distances(report, out_dir / "recall_distance.png"))
    return paths

"""`hmt bench`: speed and peak memory per mode and stream length; a table, bench.json and bench.png."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FullWindowOpt,
    NumSensoryOpt,
    OverwriteOpt,
    SegmentLengthOpt,
    SetOpt,
    reading_settings,
    split_ints,
    split_list,
)

RESULTS_NAME = "bench.json"
GENERATE_NAME = "generate.json"
PLOT_NAME = "bench.png"


def bench_command(
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png.")] = Path("runs/bench"),
    modes: Annotated[
        str, typer.Option(help="Comma-separated: backbone, sliding, memory_off, rmt, hmt, full.")
    ] = "backbone,sliding,hmt,full",
    lengths: Annotated[
        str, typer.Option(help="Comma-separated stream lengths in tokens.")
    ] = "1024,4096,16384",
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    full_window: FullWindowOpt = None,
    repeats: Annotated[
        int, typer.Option(help="Measure each row this many times; the fastest run and highest peak count.")
    ] = 1,
    generate: Annotated[
        bool,
        typer.Option(
            help="Measure generation instead: hmt's tokens/s against transformers' generate on the plain "
            "backbone (a one-window prompt), and the seconds to read --read-tokens into a memory, against "
            "the backbone's body alone over the same tokens."
        ),
    ] = False,
    new_tokens: Annotated[int, typer.Option(help="With --generate: tokens generated per run.")] = 256,
    read_tokens: Annotated[
        int, typer.Option(help="With --generate: tokens read into a memory (0: skip).")
    ] = 65536,
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Speed and peak memory of reading streams of growing length, each mode in a fresh process (or,
    with --generate, the speed of generation and of reading a long text into a memory)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hmt.backbone import resolve_device
    from hmt.bench import BenchConfig, run_bench
    from hmt.io import check_output, write_text_atomic
    from hmt.plots import plot_bench

    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    model = {
        "adapter": str(adapter) if adapter is not None else None,
        "settings": reading,
        "backbone": backbone,
    }
    if generate:
        generate_bench(out, new_tokens, read_tokens, repeats, model, dtype, device, overwrite)
        return
    config = BenchConfig(
        modes=split_list(modes),
        lengths=split_ints(lengths, "--lengths"),
        adapter=model["adapter"],
        settings=reading,
        full_window=full_window,
        repeats=repeats,
        backbone=backbone,
        dtype=dtype,
        device=device,
    )
    resolve_device(device)  # a bad --device fails here, not in the first measuring process
    results_path = check_output(out, RESULTS_NAME, overwrite)
    console = Console()
    total = len(config.lengths) * len(config.modes) * config.repeats
    bar = Progress(
        TextColumn("{task.description:>22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip
    with bar:
        task = bar.add_task("starting", total=total)

        def progress(mode: str, tokens: int, done: int) -> None:
            bar.update(task, completed=done, description=f"{mode} · {tokens:,} tokens")

        measurements = run_bench(config, progress)
        bar.update(task, completed=total, description="done")
    report = bench_report(config, measurements)
    write_text_atomic(results_path, json.dumps(report, indent=2) + "\n")
    written = [results_path, plot_bench(report, out / PLOT_NAME)]
    console.print(bench_table(report))
    console.print("wrote " + ", ".join(str(p) for p in written))


def generate_bench(out, new_tokens, read_tokens, repeats, model, dtype, device, overwrite) -> None:
    """`hmt bench --generate`: generation and long-read speed, a table and generate.json."""
    from rich.console import Console
    from rich.table import Table

    from hmt.backbone import resolve_device
    from hmt.bench import GenerationBenchConfig, run_generation_bench
    from hmt.io import check_output, write_text_atomic

    config = GenerationBenchConfig(
        new_tokens=new_tokens, read_tokens=read_tokens, repeats=repeats, **model, dtype=dtype, device=device,
    )  # fmt: skip
    resolve_device(device)
    results_path = check_output(out, GENERATE_NAME, overwrite)
    console = Console()
    with console.status("measuring") as status:
        result = run_generation_bench(
            config,
            lambda what, tokens, repeat: status.update(f"{what} · {tokens:,} tokens · run {repeat + 1}"),
        )
    report = bench_report(config, []) | {"generation": result}
    del report["rows"]
    write_text_atomic(results_path, json.dumps(report, indent=2) + "\n")
    table = Table(
        title=f"Generating {result['new_tokens']} tokens after a {result['prompt_tokens']}-token prompt (greedy)",
        caption=f"fastest of {config.repeats} interleaved run(s) each",
    )
    for name in ("generator", "tokens/s", "vs transformers"):
        table.add_column(name, justify="left" if name == "generator" else "right")
    for name, speed in result["tokens_per_second"].items():
        ratio = speed / result["tokens_per_second"]["transformers"]
        table.add_row(name, f"{speed:,.1f}", f"{ratio:.2f}×")
    console.print(table)
    if "read" in result:
        read = result["read"]
        console.print(
            f"read {read['tokens']:,} tokens into a memory in {read['seconds']:.1f} s ({read['tokens_per_second']:,.0f} tok/s): "
            f"{read['vs_backbone_body']:.2f}× the {read['backbone_body_seconds']:.1f} s of the backbone's body alone "
            "(no LM head, windows of L), the floor under any read"
        )
    console.print(f"wrote {results_path}")


def bench_report(config, measurements) -> dict[str, Any]:
    """The JSON-ready report: settings, machine, and one row per (tokens, mode) with its speed relative to
    the windowed backbone on the same length (when it was measured)."""
    import torch

    backbone_speed = {m.tokens: m.tokens_per_second for m in measurements if m.mode == "backbone"}
    rows = []
    for m in sorted(measurements, key=lambda m: (m.tokens, config.modes.index(m.mode))):
        row = m.to_dict()
        if m.tokens in backbone_speed:
            row["speed_vs_backbone"] = m.tokens_per_second / backbone_speed[m.tokens]
        rows.append(row)
    return {
        "settings": asdict(config),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "created": datetime.now().isoformat(timespec="seconds"),
        "rows": rows,
    }


def bench_table(report: dict[str, Any]):
    from rich.table import Table

    settings = report["settings"]
    memory = (
        "GPU memory allocated" if report["rows"] and report["rows"][0]["memory"] == "cuda" else "process RSS"
    )
    read = report["rows"][0]["model_config"] if report["rows"] else {}
    adapter = settings["adapter"] or "the shipped adapter (default backbone)"
    table = Table(
        title="Reading a stream: speed and peak memory",
        caption=f"{adapter} · L={read.get('segment_length')}, k={read.get('num_sensory')}, "
        f"r={read.get('memory_tokens')}, N={read.get('cache_size')} · memory: {memory} · fastest of "
        f"{settings['repeats']} run(s) per row",
    )
    for name in ("tokens", "mode", "tokens/s", "vs backbone", "peak MB", "above model MB"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for row in report["rows"]:
        ratio = row.get("speed_vs_backbone")
        table.add_row(
            f"{row['tokens']:,}",
            row["mode"],
            f"{row['tokens_per_second']:,.0f}",
            "-" if ratio is None else f"{ratio:.2f}×",
            f"{row['peak_mb']:,.0f}",
            f"{row['growth_mb']:,.0f}",
        )
    return table

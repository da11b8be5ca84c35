"""`hmt needle`: find a fact far back — context lengths x depths, one heatmap per way of reading."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DeviceOpt,
    DtypeOpt,
    NumSensoryOpt,
    OverwriteOpt,
    SegmentLengthOpt,
    SetOpt,
    reading_settings,
    split_ints,
    split_list,
)

RESULTS_NAME = "results.json"


def needle_command(
    task: Annotated[
        str, typer.Option(help="passkey, needle (RULER), multikey or facts (bAbI qa1).")
    ] = "passkey",
    lengths: Annotated[
        str, typer.Option(help="Context lengths in tokens, comma-separated.")
    ] = "1024,4096,16384",
    depths: Annotated[
        str, typer.Option(help="Depths of the fact, percent of the haystack, comma-separated.")
    ] = "0,50,100",
    trials: Annotated[int, typer.Option(help="Samples per (length, depth) cell.")] = 3,
    rows: Annotated[
        str, typer.Option(help="Ways of reading: full, sliding, rmt, hmt.")
    ] = "full,sliding,rmt,hmt",
    num_keys: Annotated[int, typer.Option(help="Needles per sample for multikey (2-4), one asked.")] = 2,
    data: Annotated[
        str,
        typer.Option(
            help="Haystack text (bundled name, file, folder, .jsonl or hf:...); a short one repeats."
        ),
    ] = "essays",
    split: Annotated[str, typer.Option(help="Split of --data read as haystack (held out: test).")] = "test",
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and heatmaps; default runs/needle-<time>.")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the samples (the same for every row).")] = 0,
    answers: Annotated[
        bool,
        typer.Option(
            help="Also print every trial: where the fact was, the true answer and what each row answered "
            "(its first choice at each answer token)."
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Needle in a haystack: greedy exact match and rank among 10 candidates, per length x depth."""
    import json

    from rich.console import Console

    from hmt.backbone import resolve_device
    from hmt.cli.console import ModeProgress
    from hmt.data.corpus import load_documents, token_stream
    from hmt.io import check_output, write_text_atomic
    from hmt.loading import load_model
    from hmt.needle import NeedleConfig, run_needle
    from hmt.plots import plot_needle
    from hmt.tasks import RecallTasks

    console = Console()
    try:
        depth_values = tuple(float(d) / 100 for d in split_list(depths))
    except ValueError:
        raise ValueError(f"--depths takes comma-separated percentages, got {depths!r}") from None
    config = NeedleConfig(
        task=task, lengths=split_ints(lengths, "--lengths"), depths=depth_values, trials=trials,
        rows=split_list(rows), num_keys=num_keys, seed=seed,
    )  # fmt: skip
    resolve_device(device)
    # Always the causal query: the paper's would put each candidate answer in its own recall query.
    reading = reading_settings(settings, segment_length=segment_length, num_sensory=num_sensory,
                               cache_size=cache_size) | {"recall_query": "causal"}  # fmt: skip
    out = out or Path("runs") / f"needle-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = check_output(out, RESULTS_NAME, overwrite)
    documents = load_documents(data, split)  # before the model loads
    with console.status("loading the backbone"):
        loaded = load_model(
            backbone, adapter=adapter, settings=reading, dtype=dtype, device=device, seed=seed
        )
        model, plain, labels, adapter = loaded.model, loaded.backbone, loaded.weights, loaded.adapter
        haystack = token_stream(documents, plain.tokenizer)
    if haystack.numel() == 0:
        raise ValueError(f"{data} ({split} split) holds no text to make a haystack from")
    longest = max(config.lengths)
    console.print(
        f"backbone [bold]{plain.name}[/] · adapter: {labels['adapter']} · haystack {data} ({split}), "
        f"{haystack.numel():,} tokens"
        + (" (repeats to fill the longest context)" if haystack.numel() < longest else "")
    )
    cells = len(config.lengths) * len(config.depths) * config.trials
    with ModeProgress(console, config.rows, cells, unit="trials") as progress:
        report = run_needle(
            model, plain.model, RecallTasks(plain.tokenizer, haystack), config, progress=progress
        )
    report.update(
        backbone=plain.describe(), adapter=str(adapter) if adapter else None, adapter_note=labels["adapter"],
        data={"spec": data, "split": split, "tokens": int(haystack.numel())},
        model_config=model.config.to_dict(),
    )  # fmt: skip
    write_text_atomic(results_path, json.dumps(report, indent=2) + "\n")
    written = [results_path, *(plot_needle(report, row, out / f"needle_{row}.png") for row in config.rows)]
    if answers:
        console.print(answers_table(report))
    console.print(needle_table(report))
    if "full" in config.rows and longest > report["full_window"]:
        console.print(
            f"full reads at most the last {report['full_window']:,} tokens: a fact further back is out of its sight"
        )
    console.print("wrote " + ", ".join(str(p) for p in written))


def needle_table(report: dict[str, Any]) -> Table:
    """Rows x context lengths: exact match over all depths, and top-1 among the candidates."""
    from rich.table import Table

    lengths = sorted({c["length"] for cells in report["rows"].values() for c in cells})
    table = Table(title=f"{report['config']['task']}: greedy exact match % (top-1 of 10 candidates %)")
    table.add_column("row")
    for length in lengths:
        table.add_column(f"{length:,}", justify="right")
    table.add_column("s / trial", justify="right")
    for row, cells in report["rows"].items():
        values = []
        for length in lengths:
            at = [c for c in cells if c["length"] == length]
            exact = sum(c["exact_match"] for c in at) / len(at)
            top1 = sum(c["top1"] for c in at) / len(at)
            values.append(f"{100 * exact:.0f} ({100 * top1:.0f})")
        seconds = sum(c["seconds_per_trial"] for c in cells) / len(cells)
        table.add_row(row, *values, f"{seconds:.1f}")
    return table


def answers_table(report: dict[str, Any]) -> Table:
    """One line per trial: context length, the fact's position, the true answer, each row's answer."""
    from rich.table import Table

    table = Table(title="what each row answered (✓ exact)")
    for name in ("tokens", "fact at token", "true answer"):
        table.add_column(name, justify="right")
    rows = list(report["rows"])
    for row in rows:
        table.add_column(row, justify="right")
    first = report["rows"][rows[0]]
    for index, cell in enumerate(first):
        for trial, truth in enumerate(cell["answers"]):
            given = [report["rows"][row][index]["answers"][trial] for row in rows]
            table.add_row(
                f"{cell['length']:,}", f"{truth['fact_token']:,}", truth["expected"].strip(),
                *(f"{a['answer'].strip() or a['answer']!r} {'✓' if a['exact'] else '✗'}" for a in given),
            )  # fmt: skip
    return table

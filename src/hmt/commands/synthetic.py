"""`hmt recall-task`: train windowed, rmt and hmt models from scratch on the synthetic recall task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hmt.io import write_text_atomic
from hmt.synthetic import ArmResult, RecallExperiment, report, run_recall_experiment


def run_recall_command(
    experiment: RecallExperiment, out: Path, console: Console | None = None
) -> dict[str, Any]:
    console = console or Console()
    if (out / "results.json").exists():
        raise FileExistsError(f"{out / 'results.json'} exists: choose another --out")
    task = experiment.task
    console.print(
        f"recall task: {task.num_segments} segments of {task.segment_length} tokens, {task.num_facts} fact(s), "
        f"asked fact >= {task.min_distance} segments back, {task.num_values} values (chance "
        f"{1 / task.num_values:.3f}); {experiment.steps} steps per arm, unroll {experiment.unroll}"
    )
    bar = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TextColumn(
        "{task.fields[loss]}"), TimeElapsedColumn(), console=console)  # fmt: skip
    with bar:
        tasks = {
            arm: bar.add_task(arm, total=experiment.steps, loss="", start=False) for arm in experiment.arms
        }

        def progress(arm: str, step: int, total: int, record: dict[str, Any] | None) -> None:
            bar.start_task(tasks[arm])
            bar.update(
                tasks[arm], completed=step, **({"loss": f"loss {record['loss']:.3f}"} if record else {})
            )

        results = run_recall_experiment(experiment, out, progress)
    data = report(experiment, results)
    write_text_atomic(out / "results.json", json.dumps(data, indent=2) + "\n")
    written = [out / "results.json"]
    if "hmt" in results and results["hmt"].recall_distance:
        written.append(plot_recall(results["hmt"], out / "recall_at_question.png"))
    console.print(results_table(results))
    console.print("wrote " + ", ".join(str(p) for p in written))
    return data


def results_table(results: dict[str, ArmResult]) -> Table:
    table = Table(title="Answer accuracy on held-out samples")
    for column in ("arm", "accuracy", "chance", "final loss", "recall on the fact", "minutes"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, r in results.items():
        hit = f"{r.recall_hit_rate:.0%}" if r.recall_hit_rate is not None else ""
        loss = f"{r.final_loss:.3f}" if r.final_loss is not None else ""
        table.add_row(arm, f"{r.accuracy:.1%}", f"{r.chance:.1%}", loss, hit, f"{r.seconds / 60:.1f}")
    return table


def plot_recall(result: ArmResult, path: Path) -> Path:
    """Where the asked fact was, against where hmt's strongest recall weight pointed, at the question."""
    from hmt.plots import _pyplot, _save

    plt = _pyplot()
    distances = sorted(set(result.fact_distance) | set(result.recall_distance))
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(distances))
    ax.bar(
        [x - 0.2 for x in xs], [result.fact_distance.get(d, 0) for d in distances], 0.4, label="asked fact"
    )
    ax.bar([x + 0.2 for x in xs], [result.recall_distance.get(d, 0) for d in distances], 0.4,
           label="strongest recall weight")  # fmt: skip
    ax.set_xticks(list(xs), [str(d) for d in distances])
    ax.set_xlabel("segments back from the question")
    ax.set_ylabel("samples")
    ax.set_title(f"hmt recall at the question: on the asked fact in {result.recall_hit_rate:.0%} of samples")
    ax.legend()
    return _save(fig, plt, path)

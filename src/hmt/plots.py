"""PNG figures from saved reports (the JSON-ready dicts that `hmt eval` and `hmt bench` write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hmt.io import atomic_path

MODE_COLOURS = {
    "backbone": "tab:gray",
    "sliding": "tab:brown",
    "memory_off": "tab:purple",
    "rmt": "tab:orange",
    "hmt": "tab:blue",
    "full": "tab:green",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_by_position(report: dict[str, Any], path: str | Path) -> Path:
    """Perplexity per segment of the stream, one line per mode (with a moving average over 4 segments)."""
    plt = _pyplot()
    bin_size = report["config"]["segment_length"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for mode, result in report["modes"].items():
        values = result["segment_ppl"]
        xs = [(i + 0.5) * bin_size for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        colour = MODE_COLOURS.get(mode)
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(
            xs, _moving_average(ys, 4), color=colour, linewidth=1.8, label=f"{mode} (ppl {result['ppl']:.2f})"
        )
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel(f"perplexity per {bin_size}-token segment")
    ax.set_yscale("log")
    ax.set_title(
        f"{report['backbone']['name']} on {report['data']['spec']} ({report['data']['tokens']:,} tokens)"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_recall_distances(report: dict[str, Any], path: str | Path) -> Path:
    """Histogram of how many segments back the strongest recalled memory lies (hmt mode)."""
    plt = _pyplot()
    recall = report["modes"]["hmt"]["recall"]
    histogram = {int(k): v for k, v in recall["distance_histogram"].items()}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(histogram), list(histogram.values()), color=MODE_COLOURS["hmt"])
    ax.set_xlabel("segments back of the strongest recall weight (1 = previous segment)")
    ax.set_ylabel("segments")
    ax.set_title(
        f"hmt recall: mean max weight {recall['mean_max_weight']:.2f}, mean entropy {recall['mean_entropy']:.2f} nats"
    )
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def plot_needle(report: dict[str, Any], row: str, path: str | Path) -> Path:
    """Heatmap of greedy exact match over context length (x) and fact depth (y) for one row of `hmt needle`."""
    plt = _pyplot()
    cells = report["rows"][row]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    value = {(c["length"], c["depth"]): c["exact_match"] for c in cells}
    grid = [[value[length, depth] for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for y, depth_row in enumerate(grid):
        for x, v in enumerate(depth_row):
            ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [_tokens(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the fact")
    config = report["config"]
    ax.set_title(
        f"{row}: {config['task']} exact match % ({config['trials']} trials per cell, "
        f"mean {100 * report['means'][row]['exact_match']:.0f}%)"
    )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, plt, path)


def _tokens(count: int) -> str:
    return f"{count // 1024}K" if count % 1024 == 0 else str(count)


def plot_bench(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels over stream length: tokens per second, and memory above the loaded model, per mode."""
    plt = _pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in report["settings"]["modes"]:
        rows = [r for r in report["rows"] if r["mode"] == mode]
        tokens = [r["tokens"] for r in rows]
        colour = MODE_COLOURS.get(mode)
        speed.plot(tokens, [r["tokens_per_second"] for r in rows], marker="o", label=mode, color=colour)
        memory.plot(tokens, [r["growth_mb"] for r in rows], marker="o", label=mode, color=colour)
    for ax, label in ((speed, "tokens per second"), (memory, "peak memory above the loaded model (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"hmt bench · {report['machine']['cuda'] or report['machine']['platform']}")
    return _save(fig, plt, path)


def _moving_average(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path

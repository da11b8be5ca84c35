"""Proof that memory learns: small models trained from scratch on a synthetic long-range recall task.

The task (in the spirit of BABILong), generated offline from a seed: a sample is `num_segments`
segments of random filler tokens. Facts "FACT key value" sit in some of the first segments; the last
segment asks "ASK key ANS" and the model must produce the value. Only that answer token is scored. The
question "ASK key" ends the segment before the last, so HMT's causal recall query (the last j tokens read
before a segment) holds it; the last segment starts with "ANS value", so the value is predicted inside
the segment that recalled with the question, and never enters a query. Facts sit in the first half of their segment, so
sensory memory (the last k tokens) never carries one.

The experiment: every arm (windowed backbone, rmt, hmt) gets the same backbone shape, initialisation,
data, steps and optimiser, through the library's trainer; only the mode differs. Accuracy is measured
on held-out samples; for hmt, also where its recall looked when the question came.

    .venv/bin/python -m experiments.recall_task --out runs/recall
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer

from experiments.cli import run, tool
from hmt.cli.options import split_list
from hmt.config import IGNORE_INDEX
from hmt.data import Batch
from hmt.data.batches import batch_seed

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.table import Table

    from hmt.model import HMTForCausalLM

PAD, FACT, ASK, ANS = 0, 1, 2, 3
FIRST_KEY = 4
ARMS: tuple[str, ...] = ("backbone", "rmt", "hmt")
RESULTS_NAME = "results.json"
PLOT_NAME = "recall_at_question.png"


# ---- the task -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallTask:
    """Sizes of the task; token ids: specials, then keys, then values, then filler up to `vocab_size`."""

    segment_length: int = 16
    num_segments: int = 6  # per sample; the question is in the last one
    num_facts: int = 1  # facts per sample, each in its own segment, with distinct keys
    min_distance: int = 4  # the asked fact lies at least this many segments before the question
    num_keys: int = 16
    num_values: int = 16
    vocab_size: int = 96

    def __post_init__(self) -> None:
        if self.segment_length < 8:
            raise ValueError(f"segment_length must be >= 8, got {self.segment_length}")
        if self.num_segments < 2 or not 1 <= self.min_distance <= self.num_segments - 1:
            raise ValueError("need num_segments >= 2 and 1 <= min_distance <= num_segments - 1")
        if not 1 <= self.num_facts <= self.num_segments - 1 or self.num_facts > self.num_keys:
            raise ValueError("num_facts must be between 1 and min(num_segments - 1, num_keys)")
        if self.first_filler >= self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no filler tokens; raise it")

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.num_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.num_values

    @property
    def query_length(self) -> int:
        """j: the recall query reads the last j tokens before a segment (the question's among them)."""
        return self.segment_length // 2

    @property
    def answer_position(self) -> int:
        """Position (in the sample) of the answer token."""
        return (self.num_segments - 1) * self.segment_length + 1

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
        """One sample: token ids (num_segments * L,), the answer, and the segment holding the asked fact."""
        length, segments = self.segment_length, self.num_segments
        ids = torch.randint(self.first_filler, self.vocab_size, (segments * length,), generator=generator)
        latest_asked = segments - 1 - self.min_distance
        asked_segment = int(torch.randint(0, latest_asked + 1, (1,), generator=generator))
        others = [s for s in range(segments - 1) if s != asked_segment]
        order = torch.randperm(len(others), generator=generator)[: self.num_facts - 1].tolist()
        fact_segments = [asked_segment, *(others[i] for i in order)]
        keys = (torch.randperm(self.num_keys, generator=generator)[: self.num_facts] + FIRST_KEY).tolist()
        values = torch.randint(
            self.first_value, self.first_filler, (self.num_facts,), generator=generator
        ).tolist()
        for segment, key, value in zip(fact_segments, keys, values, strict=True):
            offset = int(torch.randint(0, length // 2 - 2, (1,), generator=generator))
            start = segment * length + offset
            ids[start : start + 3] = torch.tensor([FACT, key, value])
        question = (segments - 1) * length - 2
        ids[question : question + 4] = torch.tensor([ASK, keys[0], ANS, values[0]])
        return ids, values[0], asked_segment

    def resized(self, window: int) -> RecallTask:
        """The same task with `window` tokens per sample (distances and fact counts capped to fit)."""
        if window % self.segment_length or window < 2 * self.segment_length:
            raise ValueError(
                f"recall task samples are whole segments of {self.segment_length} tokens, at least 2; got a "
                f"window of {window} tokens: train with segment_length={self.segment_length}"
            )
        segments = window // self.segment_length
        if segments == self.num_segments:
            return self
        return replace(
            self,
            num_segments=segments,
            min_distance=min(self.min_distance, segments - 1),
            num_facts=min(self.num_facts, segments - 1),
        )

    def batch(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, asked segment) for `batch_size` samples; labels score only the answers."""
        generator = torch.Generator().manual_seed(seed)
        samples = [self.sample(generator) for _ in range(batch_size)]
        ids = torch.stack([s[0] for s in samples])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, self.answer_position] = ids[:, self.answer_position]
        return ids, labels, torch.tensor([s[2] for s in samples])


class RecallTaskBatches:
    """Training batches of the recall task for `hmt.train.train` (independent samples, seeded by index)."""

    streaming = False

    def __init__(self, task: RecallTask, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.task, self.batch_size, self.seed, self.rank, self.world = task, batch_size, seed, rank, world

    def batch(self, index: int, window: int) -> Batch:
        """Samples as long as `window`, so an unroll curriculum also shortens the distances early on."""
        task = self.task.resized(window)
        ids, labels, _ = task.batch(self.batch_size, batch_seed(self.seed, index, self.rank, self.world))
        return Batch(ids, labels, torch.ones(self.batch_size, dtype=torch.bool))


# ---- the experiment -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallExperiment:
    """The arms, the small backbone trained from scratch, and the training budget every arm gets."""

    task: RecallTask = field(default_factory=RecallTask)
    arms: tuple[str, ...] = ARMS
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_sensory: int = 4
    cache_size: int = 16
    steps: int = 900
    batch_size: int = 32
    lr: float = 1e-3
    curriculum: str | None = None  # unroll curriculum; default: 2 segments, then half, then all
    eval_samples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms must be among {', '.join(ARMS)}, got {', '.join(self.arms) or 'none'}")
        if self.num_sensory > self.task.segment_length // 2:
            raise ValueError("num_sensory must be <= half a segment, or sensory memory could carry the facts")
        if self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ValueError("steps, batch_size and eval_samples must be >= 1")
        from hmt.train import check_learning_rate

        check_learning_rate("--lr", self.lr)

    @property
    def unroll(self) -> str:
        """The curriculum given, or 2 segments for a third of the steps, half the sample, then all of it."""
        if self.curriculum:
            return self.curriculum
        segments = self.task.num_segments
        if segments <= 2 or self.steps < 3:
            return str(segments)
        middle = max(2, segments // 2)
        stages = (
            [(2, self.steps // 3), (middle, 2 * self.steps // 3)] if middle > 2 else [(2, self.steps // 2)]
        )
        return ",".join(f"{s}:{u}" for s, u in stages) + f",{segments}"


@dataclass
class ArmResult:
    arm: str
    accuracy: float
    chance: float
    final_loss: float | None
    seconds: float
    recall_hit_rate: float | None = None  # hmt: strongest recall weight on the asked fact's segment
    recall_distance: dict[int, int] | None = None  # hmt: segments back of the strongest recall weight
    fact_distance: dict[int, int] | None = None  # segments back of the asked fact


def build_model(experiment: RecallExperiment, arm: str) -> HMTForCausalLM:
    """A small Llama from scratch with HMT around it reading in `arm`'s mode, identical across arms for
    the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    task = experiment.task
    torch.manual_seed(experiment.seed)
    config = LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=experiment.hidden_size,
        intermediate_size=2 * experiment.hidden_size,
        num_hidden_layers=experiment.num_layers,
        num_attention_heads=experiment.num_heads,
        num_key_value_heads=experiment.num_heads,
        max_position_embeddings=task.segment_length + experiment.num_sensory + 2,
    )
    hmt_config = HMTConfig(
        segment_length=task.segment_length,
        num_sensory=experiment.num_sensory,
        summary_length=task.query_length,
        cache_size=experiment.cache_size,
        attention_sink=False,  # trained from scratch: no first-position habit to protect
        memory_tokens=1,  # the task's recipe: one memory token, the paper's dot-product recall
        recall_temperature=None,
        sharpen_recall_after=None,
    )
    return HMTForCausalLM(LlamaForCausalLM(config), hmt_config, mode=arm)


def evaluate_arm(model: HMTForCausalLM, task: RecallTask, samples: int, seed: int) -> dict[str, Any]:
    """Answer accuracy on fresh samples in the model's mode; for hmt, where the question's recall looked."""
    ids, labels, asked = task.batch(samples, seed)
    model.eval()
    with torch.no_grad():
        out = model(ids.to(model.device), labels=labels.to(model.device), return_logits=True)
    predicted = out.logits[:, task.answer_position - 1].argmax(-1).cpu()
    result: dict[str, Any] = {"accuracy": float((predicted == ids[:, task.answer_position]).float().mean())}
    if out.recall_weights:
        weights = out.recall_weights[-1].cpu()  # the question segment's recall over its cache
        strongest_back = weights.shape[1] - weights.argmax(-1)
        fact_back = (task.num_segments - 1) - asked
        result["recall_hit_rate"] = float((strongest_back == fact_back).float().mean())
        result["recall_distance"] = dict(sorted(Counter(strongest_back.tolist()).items()))
        result["fact_distance"] = dict(sorted(Counter(fact_back.tolist()).items()))
    return result


def run_recall_experiment(
    experiment: RecallExperiment,
    run_dir: str | Path,
    progress: Callable[[str, int, int, dict[str, Any] | None], None] | None = None,
) -> dict[str, ArmResult]:
    """Train every arm from scratch and measure it; each arm's run folder is run_dir/<arm>.
    `progress(arm, step, total, record)` is called after every step."""
    from hmt.train import TrainConfig, train

    run_dir = Path(run_dir)
    results: dict[str, ArmResult] = {}
    for arm in experiment.arms:
        model = build_model(experiment, arm)
        model.backbone.requires_grad_(True)  # trained from scratch, with the memory
        config = TrainConfig(
            mode=arm,
            unroll=experiment.unroll,
            batch_size=experiment.batch_size,
            max_steps=experiment.steps,
            lr=experiment.lr,
            memory_lr=experiment.lr,
            warmup_steps=min(20, experiment.steps // 10),
            decay_every=max(experiment.steps, 1),
            log_every=max(1, experiment.steps // 20),
            eval_every=0,
            save_every=experiment.steps,
            keep_checkpoints=1,
            seed=experiment.seed,
        )
        source = RecallTaskBatches(experiment.task, experiment.batch_size, experiment.seed)
        step_progress = partial(progress, arm) if progress is not None else None
        started = time.perf_counter()
        summary = train(model, source, config, run_dir / arm, progress=step_progress)
        measured = evaluate_arm(model, experiment.task, experiment.eval_samples, seed=10**9 + experiment.seed)
        results[arm] = ArmResult(
            arm=arm,
            chance=1 / experiment.task.num_values,
            final_loss=summary.final_loss,
            seconds=time.perf_counter() - started,
            **measured,
        )
    return results


# ---- the report ---------------------------------------------------------------------------------


def report(experiment: RecallExperiment, results: dict[str, ArmResult]) -> dict[str, Any]:
    """The JSON-ready record: the experiment's settings (with the unroll used) and every arm's numbers."""
    from hmt import __version__

    return {
        "hmt_version": __version__,
        "experiment": {**asdict(experiment), "unroll": experiment.unroll},
        "arms": {arm: asdict(result) for arm, result in results.items()},
    }


def results_table(results: dict[str, ArmResult]) -> Table:
    from rich.table import Table

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
    fact, recalled = result.fact_distance or {}, result.recall_distance or {}
    distances = sorted(set(fact) | set(recalled))
    xs = range(len(distances))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x - 0.2 for x in xs], [fact.get(d, 0) for d in distances], 0.4, label="asked fact")
    ax.bar(
        [x + 0.2 for x in xs], [recalled.get(d, 0) for d in distances], 0.4, label="strongest recall weight"
    )
    ax.set_xticks(list(xs), [str(d) for d in distances])
    ax.set_xlabel("segments back from the question")
    ax.set_ylabel("samples")
    ax.set_title(f"hmt recall at the question: on the asked fact in {result.recall_hit_rate:.0%} of samples")
    ax.legend()
    return _save(fig, plt, path)


def run_recall_command(
    experiment: RecallExperiment, out: Path, console: Console | None = None
) -> dict[str, Any]:
    """Train and measure every arm with progress bars; write results.json (and the recall plot)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hmt.backbone import quiet_transformers
    from hmt.io import write_text_atomic

    console = console or Console()
    if (out / RESULTS_NAME).exists():
        raise FileExistsError(f"{out / RESULTS_NAME} exists: choose another --out")
    quiet_transformers()
    task = experiment.task
    console.print(
        f"recall task: {task.num_segments} segments of {task.segment_length} tokens, {task.num_facts} fact(s), "
        f"asked fact >= {task.min_distance} segments back, {task.num_values} values (chance "
        f"{1 / task.num_values:.3f}); {experiment.steps} steps per arm, unroll {experiment.unroll}"
    )
    bar = Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        bars = {
            arm: bar.add_task(arm, total=experiment.steps, loss="", start=False) for arm in experiment.arms
        }

        def progress(arm: str, step: int, total: int, record: dict[str, Any] | None) -> None:
            bar.start_task(bars[arm])
            loss = {"loss": f"loss {record['loss']:.3f}"} if record and "loss" in record else {}
            bar.update(bars[arm], completed=step, **loss)

        results = run_recall_experiment(experiment, out, progress)
    data = report(experiment, results)
    write_text_atomic(out / RESULTS_NAME, json.dumps(data, indent=2) + "\n")
    written = [out / RESULTS_NAME]
    if "hmt" in results and results["hmt"].recall_distance:
        written.append(plot_recall(results["hmt"], out / PLOT_NAME))
    console.print(results_table(results))
    console.print("wrote " + ", ".join(str(p) for p in written))
    return data


# ---- the command --------------------------------------------------------------------------------

app = tool(
    "Proof that memory learns: windowed backbone vs rmt vs hmt, trained from scratch, recalling facts."
)


@app.command()
def recall_task(
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
    task = RecallTask(
        segment_length=segment_length, num_segments=segments, num_facts=facts, min_distance=distance,
        num_values=values, num_keys=max(16, facts),
    )  # fmt: skip
    experiment = RecallExperiment(
        task=task, arms=split_list(arms), hidden_size=hidden_size, num_layers=layers, steps=steps,
        batch_size=batch_size, lr=lr, curriculum=curriculum, seed=seed,
    )  # fmt: skip
    run_recall_command(experiment, out)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()

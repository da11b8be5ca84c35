"""Ask-path evaluation: facts hidden far back in held-out text, asked as a user asks (`hmt qa`).

Every hmt answer goes through `hmt.ask.ask` — the chat template, the question read as its own segment
and again before the answer, free greedy generation — exactly as `hmt ask`, `hmt chat` and the server
answer. A trial counts when every value asked appears whole in the generated answer (`answer_found`).
Rows, each on the same samples:

- hmt: the adapter reads the context into memory, then answers from it;
- sliding: the same weights reading windows of L + k tokens without memory (the control);
- full: the untouched backbone with the context inside its own window (the user turn holds the last
  tokens of the context that fit, then the question), the upper reference where the fact is in sight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hmt.ask import ask, ask_turn, encode
from hmt.facts import STORY_TASKS, FactMaker, FactSample, answer_found

QA_TASKS: tuple[str, ...] = ("fact", "multikey", *STORY_TASKS)
QA_ROWS: tuple[str, ...] = ("full", "sliding", "hmt")


@dataclass(frozen=True)
class QAConfig:
    """The grid: tasks x context lengths x depths x trials, and the rows that read each sample."""

    tasks: tuple[str, ...] = ("fact",)
    lengths: tuple[int, ...] = (4096, 16384)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    trials: int = 2
    rows: tuple[str, ...] = QA_ROWS
    num_facts: int = 4  # facts in a multikey sample
    asked: int = 1  # of which this many are asked
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(QA_TASKS))
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be among {', '.join(QA_TASKS)}, got {list(self.tasks)}")
        bad_rows = sorted(set(self.rows) - set(QA_ROWS))
        if not self.rows or bad_rows:
            raise ValueError(f"rows must be among {', '.join(QA_ROWS)}, got {list(self.rows)}")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be >= 64 tokens, got {list(self.lengths)}")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths are fractions in [0, 1], got {list(self.depths)}")
        if self.trials < 1 or self.max_new_tokens < 1:
            raise ValueError("trials and max_new_tokens must be >= 1")
        if not 2 <= self.num_facts <= 8 or not 1 <= self.asked <= self.num_facts:
            raise ValueError(
                f"num_facts must be 2-8 and asked 1..num_facts, got {self.num_facts}, {self.asked}"
            )

    def samples(self, maker: FactMaker) -> dict[tuple[str, int, float], list[FactSample]]:
        """The same samples for every row, one seed per cell."""
        grid = {}
        for t, task in enumerate(self.tasks):
            for length in self.lengths:
                for d, depth in enumerate(self.depths):
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + t * 10_007 + length * 31 + d)
                    grid[task, length, depth] = [
                        maker.sample(task, length, depth, g, num_facts=self.num_facts, asked=self.asked)
                        for _ in range(self.trials)
                    ]
        return grid


@contextmanager
def reading_mode(model: Any, mode: str) -> Iterator[Any]:
    """The model with `mode` as its default for the duration (ask and generate use the default)."""
    previous = model.mode
    model.mode = mode
    try:
        yield model
    finally:
        model.mode = previous


def read_into_memory(model: Any, context: torch.Tensor, state: Any = None) -> Any:
    """Read `context` (1-D ids) into memory without scoring, in chunks; the state after it."""
    from hmt.reading import read

    return read(model, context, state)


def ask_memory_row(model: Any, tokenizer: Any, sample: FactSample, mode: str, max_new_tokens: int) -> str:
    """What the model answers through the ask path after reading the sample's context in `mode`."""
    with reading_mode(model, mode):
        state = read_into_memory(model, sample.context)
        reply = ask(model, tokenizer, sample.question, state, max_new_tokens=max_new_tokens, do_sample=False)
    return reply.text


def ask_full_row(backbone: Any, tokenizer: Any, sample: FactSample, window: int, max_new_tokens: int) -> str:
    """The untouched backbone answering with the context in its window: one user turn holding the last
    context tokens that fit, then the question (a user pasting the document into the chat)."""
    empty = ask_turn(tokenizer, [{"role": "user", "content": f"\n\n{sample.question}"}]).text
    room = window - len(encode(tokenizer, empty)) - max_new_tokens - 8
    if room < 1:
        raise ValueError(f"the backbone's window of {window} tokens leaves no room for the context")
    text = tokenizer.decode(sample.context[-room:], skip_special_tokens=True)
    turn = ask_turn(tokenizer, [{"role": "user", "content": f"{text}\n\n{sample.question}"}])
    ids = encode(tokenizer, turn.text, backbone.device)[-(window - max_new_tokens) :]
    with torch.no_grad():  # an explicit mask: a pad token the prompt holds (pad = eos here) is never masked
        out = backbone.generate(
            ids[None],
            attention_mask=torch.ones_like(ids[None]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    for stop in turn.stops:
        answer = answer.split(stop)[0]
    return answer.strip()


def run_qa(
    model: Any,
    backbone: Any,
    tokenizer: Any,
    maker: FactMaker,
    config: QAConfig,
    window: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Score every row on every cell; `progress(row, trials done, trials in all)` if given."""
    grid = config.samples(maker)
    total = sum(len(samples) for samples in grid.values())
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in config.rows:
        cells, done = [], 0
        for (task, length, depth), samples in grid.items():
            started, trials = time.perf_counter(), []
            for sample in samples:
                if row == "full":
                    answer = ask_full_row(backbone, tokenizer, sample, window, config.max_new_tokens)
                else:
                    answer = ask_memory_row(model, tokenizer, sample, row, config.max_new_tokens)
                trials.append(
                    {
                        "question": sample.question,
                        "expected": list(sample.values),
                        "answer": answer,
                        "correct": answer_found(answer, sample.values),
                        "distance": sample.distance,
                        "depth": round(sample.depth, 3),
                        "in_full_window": sample.distance + 64 < window,
                    }
                )
                done += 1
                if progress is not None:
                    progress(row, done, total)
            cells.append(
                {
                    "task": task, "length": length, "depth": depth,
                    "accuracy": sum(t["correct"] for t in trials) / len(trials),
                    "seconds_per_trial": (time.perf_counter() - started) / len(trials),
                    "trials": trials,
                }
            )  # fmt: skip
        rows[row] = cells
    return {"config": asdict(config), "full_window": window, "rows": rows, "summary": summarize(rows)}


def summarize(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Accuracy per row, per task and length (all depths and trials together)."""
    summary: dict[str, dict[str, float]] = {}
    for row, cells in rows.items():
        groups: dict[str, list[bool]] = {}
        for cell in cells:
            groups.setdefault(f"{cell['task']}@{cell['length']}", []).extend(
                t["correct"] for t in cell["trials"]
            )
        summary[row] = {key: sum(v) / len(v) for key, v in groups.items()}
    return summary

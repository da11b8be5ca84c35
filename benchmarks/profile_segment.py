"""Where a segment's time goes: the same tokens read by the windowed backbone and by hmt (the eval path,
every token scored, and the read path, nothing scored), with each step of hmt timed apart.

    python -m benchmarks.profile_segment --tokens 4096 --repeats 3

Steps: the query pass (`_query`: building [T | j tokens | T] and the backbone over it), recall
(`_recall`), the augment pass split into the transformer body, the LM head and the rest (embedding and
packing the segment, padding), the write (`_write`), scoring (`TokenScores`), and what is left (Python
around them, the state's bookkeeping). Times are the fastest of `--repeats` runs; the table's shares are
of that run's total. One process, one machine: ratios, not absolute times, are what carries over.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

app = typer.Typer(add_completion=False)


class StepClock:
    """Seconds spent in each step of one model call, nested steps subtracted from the outer one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [name, started, seconds of nested steps]

    @contextmanager
    def step(self, name: str):
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            label, started, nested = self.stack.pop()
            spent = time.perf_counter() - started
            self.seconds[label] += spent - nested
            if self.stack:
                self.stack[-1][2] += spent

    def current(self) -> str | None:
        return self.stack[-1][0] if self.stack else None


def instrument(model: Any, clock: StepClock) -> None:
    """Time the model's steps (instance attributes wrap its methods) and the backbone's body and head."""

    def wrap(owner: Any, method: str, name: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            with clock.step(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)

    wrap(model, "_query", "query pass")
    wrap(model, "_recall", "recall")
    wrap(model, "_augment", "augment: packing")
    wrap(model, "_write", "write")
    import hmt.scoring

    for method in ("add_segment", "finish", "carry_prediction"):
        original = getattr(hmt.scoring.TokenScores, method)

        def timed(self, *args, _original=original, **kwargs):
            with clock.step("scoring"):
                return _original(self, *args, **kwargs)

        setattr(hmt.scoring.TokenScores, method, timed)
    backbone = model.backbone
    body, head = backbone.get_decoder(), backbone.get_output_embeddings()
    for module, part in ((body, "body"), (head, "LM head")):
        contexts: list[Any] = []

        def before(_module, _args, _part=part, _contexts=contexts):
            outer = clock.current()
            where = "augment" if outer and outer.startswith("augment") else (outer or "backbone")
            manager = clock.step(f"{where}: {_part}" if where != "query pass" else f"query pass: {_part}")
            manager.__enter__()
            _contexts.append(manager)

        def after(_module, _args, _output, _contexts=contexts):
            _contexts.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


def measure(
    model: Any, clock: StepClock, ids: torch.Tensor, mode: str, score: bool, chunk: int
) -> tuple[float, dict[str, float]]:
    clock.seconds.clear()
    state = None
    started = time.perf_counter()
    with torch.no_grad(), clock.step("rest (Python, state)"):
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            if score:
                state = model(piece, state=state, mode=mode, num_logits=0).state
            else:
                state = model(piece, state=state, mode=mode, score=False).state
    return time.perf_counter() - started, dict(clock.seconds)


@app.command()
def main(
    tokens: Annotated[int, typer.Option(help="Tokens of the essays' test split read per run.")] = 4096,
    repeats: Annotated[int, typer.Option(help="Runs per row; the fastest counts.")] = 3,
    chunk: Annotated[int, typer.Option(help="Tokens per model call (as hmt eval and hmt read).")] = 4096,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    adapter: Annotated[str | None, typer.Option(help="Adapter (default: the shipped one).")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Reading settings KEY=VALUE.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the table as JSON here.")] = None,
) -> None:
    from hmt.config import parse_settings
    from hmt.data import load_documents, token_stream
    from hmt.loading import load_model

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(adapter=adapter, settings=parse_settings(settings or []), dtype="fp32")
    ids = token_stream(load_documents("essays", "test"), loaded.tokenizer, tokens)[None]
    clock = StepClock()
    instrument(loaded.model, clock)
    kinds = (("windowed, scored", "backbone", True), ("hmt, scored (eval)", "hmt", True),
             ("hmt, read (no scores)", "hmt", False))  # fmt: skip
    for _, mode, score in kinds:  # warm up every path
        measure(loaded.model, clock, ids[:, : 2 * loaded.model.config.segment_length], mode, score, chunk)
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for _ in range(repeats):  # the rows interleaved: each sees the same minutes of a shared machine
        for name, mode, score in kinds:
            total, parts = measure(loaded.model, clock, ids, mode, score, chunk)
            if name not in best or total < best[name][0]:
                best[name] = (total, parts)
    rows = {
        name: {"seconds": total, "tokens_per_second": ids.shape[1] / total, "parts": parts}
        for name, (total, parts) in best.items()
    }
    base = rows["windowed, scored"]["tokens_per_second"]
    config = loaded.model.config
    print(f"L={config.segment_length} k={config.num_sensory} j={config.query_length} r={config.memory_tokens}, "
          f"{tokens} tokens, threads {torch.get_num_threads()}")  # fmt: skip
    for name, row in rows.items():
        print(
            f"\n{name}: {row['tokens_per_second']:.0f} tokens/s ({row['tokens_per_second'] / base:.2f}x windowed)"
        )
        for part, seconds in sorted(row["parts"].items(), key=lambda kv: -kv[1]):
            print(f"  {part:28s} {seconds:7.2f} s  {100 * seconds / row['seconds']:5.1f}%")
    if out is not None:
        out.write_text(
            json.dumps({"config": config.to_dict(), "tokens": tokens, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    app()

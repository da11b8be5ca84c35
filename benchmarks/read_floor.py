"""The floor under a long read on this machine: every token must pass once through the backbone's body, so
the body alone (no LM head, windows of L tokens, nothing carried) over the same tokens is as fast as any
read into a memory can be without a smaller or lower-precision model. Timed against hmt reading those
tokens into a memory the way `hmt bench --generate` does (4,096-token calls, nothing scored).

    python -m benchmarks.read_floor --tokens 65536

Random token ids, as `hmt bench`. One process: the two rows' ratio is what carries over to another
machine, not their seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    tokens: Annotated[int, typer.Option(help="Tokens read by each row.")] = 65536,
    adapter: Annotated[str | None, typer.Option(help="Adapter (default: the shipped one).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the two rows as JSON here.")] = None,
) -> None:
    from hmt.loading import load_model

    loaded = load_model(adapter=adapter, dtype="fp32")
    model = loaded.model
    length = model.config.segment_length
    stream = torch.randint(0, model.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    body = model.backbone.get_decoder()  # the transformer without its LM head
    seconds = {}
    with torch.no_grad():
        started = time.perf_counter()
        for start in range(0, tokens, length):
            body(input_ids=stream[:, start : start + length], use_cache=False)
        seconds[f"backbone body, windows of {length}"] = time.perf_counter() - started
        state, started = None, time.perf_counter()
        for start in range(0, tokens, 4096):
            state = model(stream[:, start : start + 4096], state=state, score=False).state
        seconds["hmt read into a memory"] = time.perf_counter() - started
    floor = next(iter(seconds.values()))
    for name, spent in seconds.items():
        print(f"{name:36s} {spent:7.1f} s  {tokens / spent:6.0f} tokens/s  {spent / floor:.2f}x the floor")
    if out is not None:
        out.write_text(
            json.dumps({"tokens": tokens, "config": model.config.to_dict(), "seconds": seconds}) + "\n"
        )


if __name__ == "__main__":
    app()

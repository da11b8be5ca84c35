"""Where are far facts lost: in the answer's recall or in the fact's memory? Recall weights and re-scored answers.

For each needle sample (the `hmt needle` grid: same seeds, same samples) the context is read once; then the
answer's segment is scored several ways from that one state, changing only the answer's own recall:

- `adapter`: the adapter as configured, its `sharpen_recall_after` included (equal to `hmt needle`'s hmt row;
  `--sharpen-recall-after 1000` reads as trained);
- `x2`, `x4`: the trained recall scores times 2 or 4, not sharpened further (a sharper softmax over the same
  ranking);
- `top1`: all weight on the slot the adapter ranks first;
- `oracle`: all weight on the fact's own memory (the segment holding the fact's end). Exact here but
  not under `adapter` means the memory holds the answer and recall blurs it; wrong here means the write
  (or the read of one memory) loses it.

It also records the answer recall's weights: on the fact's memory, its rank among the slots, the largest
weight and the effective number of slots read (exp of the weights' entropy).

    .venv/bin/python -m experiments.recall_sharpness --task passkey --lengths 16384 --depths 50 --out runs/sharp
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer

from experiments.cli import run, tool
from hmt.backbone import flush_denormals, load_backbone
from hmt.data.corpus import load_documents, token_stream
from hmt.io import shipped_adapter, write_text_atomic
from hmt.model import HMTForCausalLM
from hmt.needle import NeedleConfig, read_context, score_answer
from hmt.tasks import RecallSample, RecallTasks

VARIANTS: tuple[str, ...] = ("adapter", "x2", "x4", "top1", "oracle")


@contextmanager
def answer_recall(model: HMTForCausalLM, variant: str, fact_slot: int, seen: list):
    """Inside the block the model's recall follows `variant`; the weights it used are appended to `seen`."""
    memory = model.memory
    original = memory.recall
    scale = {"x2": 2.0, "x4": 4.0}.get(variant)

    def recall(query, memories, mask, sharpen_after=None):
        if variant == "adapter":
            recalled, weights = original(query, memories, mask, sharpen_after)
            seen.append(weights.detach())
            return recalled, weights
        if scale is not None:
            scores = memory.scores(query, memories).masked_fill(~mask, float("-inf")) * scale
            weights = scores.softmax(-1)
        else:
            pick = memory.scores(query, memories).masked_fill(~mask, float("-inf")).argmax(-1)
            if variant == "oracle":
                pick = torch.full_like(pick, fact_slot)
            weights = torch.nn.functional.one_hot(pick, memories.shape[1]).to(memories.dtype)
        seen.append(weights.detach())
        return torch.einsum("bs,bsd->bd", weights, memories), weights

    memory.recall = recall
    try:
        yield
    finally:
        del memory.recall  # the instance attribute goes; the method shows again


def recall_stats(weights: torch.Tensor, mask: torch.Tensor, slot: int) -> dict[str, float]:
    """The answer recall's weights (slots,) seen from the fact's slot."""
    w = weights[mask]
    first_valid = int((~mask).sum())
    fact = slot - first_valid
    entropy = -(w.clamp_min(1e-30).log() * w).sum()
    return {
        "fact_weight": float(w[fact]),
        "fact_rank": 1 + int((w > w[fact]).sum()),
        "max_weight": float(w.max()),
        "top_slot_distance": int(len(w) - 1 - int(w.argmax())),  # 0: the newest memory
        "fact_distance": int(len(w) - 1 - fact),
        "effective_slots": float(entropy.exp()),
        "slots": len(w),
    }


def probe_sample(model: HMTForCausalLM, sample: RecallSample, tokenizer) -> dict:
    state = read_context(model, sample, "hmt")
    mask = state.memory_mask[0]
    slots = mask.shape[0]
    slot = slots - int(mask.sum()) + (sample.asked_span[1] - 1) // model.config.segment_length
    if not 0 <= slot < slots or not mask[slot]:
        raise ValueError("the fact's memory is no longer cached: use lengths within cache_size segments")
    result: dict = {"expected": tokenizer.decode(sample.answer.tolist())}
    for variant in VARIANTS:
        seen: list[torch.Tensor] = []
        with answer_recall(model, variant, slot, seen):
            score = score_answer(model, sample, state, "hmt")
        result[variant] = {
            "exact": score.exact,
            "rank": score.rank,
            "answer": tokenizer.decode(score.predicted.tolist()),
        }
        if variant == "adapter":
            result["recall"] = recall_stats(seen[0][0].float(), mask, slot)
    return result


def summarise(trials: list[dict]) -> dict:
    n = len(trials)
    out = {v: {"exact": sum(t[v]["exact"] for t in trials) / n, "top1": sum(t[v]["rank"] == 1 for t in trials) / n}
           for v in VARIANTS}  # fmt: skip
    for key in ("fact_weight", "max_weight", "effective_slots"):
        out[key] = sum(t["recall"][key] for t in trials) / n
    out["fact_ranked_first"] = sum(t["recall"]["fact_rank"] == 1 for t in trials) / n
    return out


app = tool(__doc__.splitlines()[0])


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder for results.json.")],
    adapter: Annotated[str, typer.Option(help="HMT adapter folder; default: the shipped adapter.")] = "",
    backbone: Annotated[str, typer.Option()] = "smollm2-135m",
    task: Annotated[str, typer.Option(help="passkey, needle, multikey or facts.")] = "passkey",
    lengths: Annotated[str, typer.Option(help="Context lengths, comma-separated.")] = "16384",
    depths: Annotated[str, typer.Option(help="Depths in percent, comma-separated.")] = "50",
    trials: Annotated[int, typer.Option()] = 4,
    seed: Annotated[int, typer.Option(help="As `hmt needle --seed`: the same samples.")] = 0,
    threads: Annotated[int, typer.Option()] = 2,
    sharpen_recall_after: Annotated[
        int | None, typer.Option(help="As `hmt needle`; default: the adapter's. 1000: recall as trained.")
    ] = None,
) -> None:
    torch.set_num_threads(threads)
    flush_denormals()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_backbone(backbone)
    model = HMTForCausalLM.from_pretrained(
        adapter or shipped_adapter(), loaded.model, sharpen_recall_after=sharpen_recall_after
    ).eval()
    config = NeedleConfig(
        task=task,
        lengths=tuple(int(x) for x in lengths.split(",")),
        depths=tuple(float(x) / 100 for x in depths.split(",")),
        trials=trials,
        rows=("hmt",),
        seed=seed,
    )
    haystack = token_stream(load_documents("essays", "test"), loaded.tokenizer)
    tasks = RecallTasks(loaded.tokenizer, haystack)
    cells = []
    for (length, depth), samples in config.samples(tasks).items():
        started = time.time()
        found = [probe_sample(model, s, loaded.tokenizer) for s in samples]
        cell = {"length": length, "depth": depth, "trials": found, "summary": summarise(found)}
        cells.append(cell)
        s = cell["summary"]
        print(
            f"{task} {length} d{depth:.0%}: "
            + " ".join(f"{v} {s[v]['exact']:.0%}" for v in VARIANTS)
            + f" | fact first {s['fact_ranked_first']:.0%} fact w {s['fact_weight']:.2f}"
            f" max w {s['max_weight']:.2f} eff slots {s['effective_slots']:.1f}"
            f" | {(time.time() - started) / len(samples):.0f}s/trial",
            flush=True,
        )
        record = {
            "config": asdict(config),
            "sharpen_recall_after": model.config.sharpen_recall_after,
            "cells": cells,
        }
        write_text_atomic(out / "results.json", json.dumps(record, indent=2))


if __name__ == "__main__":
    run(app)

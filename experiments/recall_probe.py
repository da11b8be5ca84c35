"""Where is recall's signal lost? Fit W_q, W_k offline on the queries and memories a model really makes.

The model (an adapter, forward only) reads pass-key samples of `--segments` segments; for each one we keep
the answer segment's recall query, the cached memories and which slot holds the asked fact. Then:

- `adapter`: how often the adapter's own recall puts its largest weight on the fact's memory;
- `cosine`: the raw similarity of query and memory (no projections);
- `fit`: W_q, W_k trained from the adapter's values by cross-entropy toward the fact's slot on the
  training samples, measured on held-out ones (test-split haystacks): can a linear recall find the fact
  in these features at all?
- `write`: does the fact's memory spell the answer through the LM head (first segment vs later ones)?

    .venv/bin/python -m experiments.recall_probe --adapter runs/recall-hmt/final --out runs/recall-probe
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from experiments.cli import run, tool
from hmt.backbone import flush_denormals, load_backbone
from hmt.data.corpus import load_documents, token_stream
from hmt.io import write_text_atomic
from hmt.model import HMTForCausalLM
from hmt.recall import MemoryParameters
from hmt.tasks import RecallTasks, memory_as_tokens
from hmt.train import check_learning_rate


def collect(model: HMTForCausalLM, tasks: RecallTasks, count: int, segments: int, seed: int) -> dict:
    """Queries (n, d), memories (n, slots, r*d) and fact slots (n,) of `count` pass-key samples."""
    length = model.config.segment_length
    recorded: list[tuple] = []
    original = model.memory.recall

    def spy(query, memories, mask, *rest):
        recorded.append((query.detach(), memories.detach(), mask.detach()))
        return original(query, memories, mask, *rest)

    model.memory.recall = spy
    queries, memories, facts, answers = [], [], [], []
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for _ in range(count):
                sample = tasks.sample("passkey", segments * length, float(torch.rand(1, generator=g)), g)
                ids, _ = sample.sequence()
                recorded.clear()
                model(ids[None], mode="hmt")
                query, cache, mask = recorded[-1]  # the answer's segment
                queries.append(query[0])
                memories.append(cache[0, mask[0]])
                facts.append((sample.asked_span[1] - 1) // length)
                answers.append(sample.answer)
    finally:
        model.memory.recall = original
    slots = min(m.shape[0] for m in memories)
    return {
        "queries": torch.stack(queries),
        "memories": torch.stack([m[-slots:] for m in memories]),
        "facts": torch.tensor(facts) - (torch.tensor([m.shape[0] for m in memories]) - slots),
        "answers": answers,
    }


def write_accuracy(model: HMTForCausalLM, data: dict) -> dict[str, float]:
    """Does the fact's memory hold the answer? The LM head on its slots (answer-in-memory read-out)."""
    r = model.config.memory_tokens
    rows = torch.arange(len(data["facts"]))
    predicted = memory_as_tokens(model, data["memories"][rows, data["facts"]]).argmax(-1)
    tokens, exact = [], []
    for row, answer in enumerate(data["answers"]):
        n = min(r, len(answer))
        hits = predicted[row, :n] == answer[:n]
        tokens.append(float(hits.float().mean()))
        exact.append(bool(hits.all()))
    first = [bool(f == 0) for f in data["facts"]]  # the first segment reads m0 and no sensory tokens
    result = {"token_accuracy": sum(tokens) / len(tokens), "exact": sum(exact) / len(exact)}
    for name, where in (("first_segment", True), ("later_segments", False)):
        picked = [e for e, f in zip(exact, first, strict=True) if f == where]
        result[f"exact_{name}"] = sum(picked) / len(picked) if picked else None
        result[f"samples_{name}"] = len(picked)
    return result


def accuracy(logits: torch.Tensor, facts: torch.Tensor) -> dict[str, float]:
    weights = logits.softmax(-1)
    return {
        "top1": float((logits.argmax(-1) == facts).float().mean()),
        "fact_weight": float(weights[torch.arange(len(facts)), facts].mean()),
        "chance": 1.0 / logits.shape[1],
    }


def cosine_scores(memory: MemoryParameters, data: dict) -> torch.Tensor:
    """Raw similarity of each query to each memory's mean embedding, no projections (scaled by 20)."""
    q = torch.nn.functional.normalize(data["queries"], dim=-1)
    k = torch.nn.functional.normalize(memory.as_tokens(data["memories"]).mean(dim=-2), dim=-1)
    return torch.einsum("nh,nsh->ns", q, k) * 20


def fit(memory: MemoryParameters, train: dict, test: dict, steps: int, lr: float) -> dict:
    """Train a copy's W_q, W_k (from the adapter's values) toward the fact's slot; curve on `test`."""
    memory = copy.deepcopy(memory)
    projections = [*memory.query_proj.parameters(), *memory.key_proj.parameters()]
    optimiser = torch.optim.AdamW(projections, lr=lr, weight_decay=0.0)
    curve = []
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(
            memory.scores(train["queries"], train["memories"]), train["facts"]
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % max(1, steps // 10) == 0:
            with torch.no_grad():
                held_out = accuracy(memory.scores(test["queries"], test["memories"]), test["facts"])
            curve.append({"step": step, "train_loss": float(loss)} | held_out)
    return {"curve": curve, "final": curve[-1]}


app = tool(__doc__.splitlines()[0])


@app.command()
def main(
    adapter: Annotated[Path, typer.Option(help="HMT adapter folder (HMT parameters + LoRA).")],
    out: Annotated[Path, typer.Option(help="Folder for results.json.")],
    backbone: Annotated[str, typer.Option()] = "smollm2-135m",
    segments: Annotated[int, typer.Option(help="Segments per sample (context + answer).")] = 8,
    train_samples: Annotated[int, typer.Option()] = 96,
    test_samples: Annotated[int, typer.Option()] = 48,
    steps: Annotated[int, typer.Option(help="Steps of the offline fit.")] = 300,
    lr: Annotated[float, typer.Option()] = 1e-3,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    check_learning_rate("--lr", lr)
    torch.set_num_threads(threads)
    flush_denormals()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_backbone(backbone)
    model = HMTForCausalLM.from_pretrained(adapter, loaded.model).eval()
    started = time.time()
    data = {}
    for split, count, seed in (("train", train_samples, 1), ("test", test_samples, 2)):
        haystack = token_stream(load_documents("essays", split), loaded.tokenizer)
        data[split] = collect(model, RecallTasks(loaded.tokenizer, haystack), count, segments, seed)
        print(f"collected {count} {split} samples in {time.time() - started:.0f}s", flush=True)
    memory, test = model.memory, data["test"]
    results = {"segments": segments, "slots": int(test["memories"].shape[1])}
    with torch.no_grad():
        results["adapter"] = accuracy(memory.scores(test["queries"], test["memories"]), test["facts"])
        results["cosine"] = accuracy(cosine_scores(memory, test), test["facts"])
        results["write"] = write_accuracy(model, test)
    print(json.dumps({k: results[k] for k in ("adapter", "cosine", "write")}), flush=True)
    results["fit"] = fit(memory, data["train"], test, steps, lr)
    print("fit", json.dumps(results["fit"]["final"]), flush=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    run(app)

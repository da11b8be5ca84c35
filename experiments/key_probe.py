"""Can one segment's memory carry a 5-digit pass key? The diagnostic issue 19 starts from.

A sample is two segments read in rmt mode: segment 0 is 256 tokens of essay text with "The pass key is
NNNNN. Remember it. NNNNN is the pass key." inserted before the last sensory window (so only the memory
can carry it), segment 1 asks "What is the pass key? The pass key is" and only the 5 digits are scored.
Held-out samples come from the test split. Variants change what can carry the key: memory tokens per
write, the layer written from, LoRA targets and rank, learning rates.

    .venv/bin/python -m experiments.key_probe --out runs/key-probe-a --memory-tokens 8 --memory-layer 20
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from experiments.cli import run, tool
from hmt.backbone import flush_denormals, load_backbone
from hmt.config import IGNORE_INDEX, HMTConfig
from hmt.data.corpus import load_documents, token_stream
from hmt.model import HMTForCausalLM
from hmt.tasks import memory_as_tokens
from hmt.train import check_learning_rate, diverged, non_finite

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_sample(tok, stream: torch.Tensor, generator: torch.Generator, length: int, sensory: int):
    """(ids, labels): segment 0 with the key, segment 1 with the question and the scored answer."""
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (5,), generator=generator))
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False)[
        "input_ids"
    ]
    question = tok("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    answer = tok(f" {key}", add_special_tokens=False)["input_ids"]
    filler = length - len(needle)
    start = int(torch.randint(0, stream.shape[0] - filler, (1,), generator=generator))
    text = stream[start : start + filler].tolist()
    at = int(torch.randint(0, filler - sensory, (1,), generator=generator))
    first = text[:at] + needle + text[at:]
    ids = torch.tensor(first + question + answer)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-len(answer) :] = ids[-len(answer) :]
    return ids, labels


def evaluate(model, tok, stream, samples: int, length: int, sensory: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(12345)
    exact, loss = 0, 0.0
    model.eval()
    with torch.no_grad():
        for _ in range(samples):
            ids, labels = make_sample(tok, stream, generator, length, sensory)
            out = model(ids[None], labels=labels[None], mode="rmt", return_logits=True)
            answer = labels != IGNORE_INDEX
            predicted = out.logits[0, :-1].argmax(-1)
            targets = ids[1:]
            correct = (predicted == targets)[answer[1:]]
            exact += int(correct.all())
            loss += float(out.loss)
    model.train()
    return {"exact": exact / samples, "answer_loss": loss / samples}


app = tool(__doc__.splitlines()[0])


@app.command()
def key_probe(
    out: Annotated[Path, typer.Option()],
    memory_tokens: int = 1,
    lora_rank: int = 16,
    lora_targets: str = ",".join(ALL_LINEAR),
    lr: float = 1e-3,
    memory_lr: float = 3e-3,
    steps: int = 400,
    batch_size: int = 4,
    eval_every: int = 50,
    eval_samples: int = 32,
    threads: int = 0,
    seed: int = 0,
    write_loss: float = 0.0,
) -> None:
    """`write_loss` > 0 adds the answer-in-memory loss: the backbone's own LM head applied to segment 0's
    written memory (brought back to hidden-state scale) must predict the answer's tokens, slot i token i
    (needs memory_tokens >= the answer's 6 tokens). It teaches the write to gather the key directly."""
    from peft import LoraConfig, get_peft_model

    check_learning_rate("--lr", lr)
    check_learning_rate("--memory-lr", memory_lr)
    if threads:
        torch.set_num_threads(threads)
    flush_denormals()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_backbone(None)
    tok = loaded.tokenizer
    backbone = get_peft_model(
        loaded.model,
        LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, target_modules=lora_targets.split(","), lora_dropout=0.0
        ),
    )
    config = HMTConfig(
        segment_length=256,
        num_sensory=32,
        memory_tokens=memory_tokens,
        recall_temperature=None,  # the probe's recipe (rmt: recall unused)
        sharpen_recall_after=None,
    )
    model = HMTForCausalLM(backbone, config, mode="rmt")
    train_stream = token_stream(load_documents("essays", "train"), tok)
    test_stream = token_stream(load_documents("essays", "test"), tok)
    lora = [p for n, p in model.backbone.named_parameters() if p.requires_grad]
    memory = [
        p
        for n, p in model.memory.named_parameters()
        if not n.startswith(("summary_prompt", "query_proj", "key_proj"))
    ]
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": lr}, {"params": memory, "lr": memory_lr}], weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(seed)
    log = (out / "log.jsonl").open("a")
    started = time.perf_counter()
    losses, write_losses = [], []
    for step in range(1, steps + 1):
        batch = [make_sample(tok, train_stream, generator, 256, 32) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        if any(len(ids) != width for ids, _ in batch):
            raise AssertionError("samples differ in length")
        ids = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        out_ = model(ids, labels=labels, mode="rmt", num_logits=0)
        loss = out_.loss
        if write_loss > 0:
            answer = ids[:, -6:]  # " " and the 5 digits
            logits = memory_as_tokens(model, out_.state.memories[:, -2])[:, :6]
            term = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answer.flatten())
            loss = loss + write_loss * term
            write_losses.append(float(term.detach()))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(lora + memory, 1.0)
        problem = non_finite({"loss": float(loss.detach()), "gradient norm": float(norm)})
        if problem is not None:
            raise diverged(step, problem, "try a lower --lr or --memory-lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out_.loss.detach()))
        if step % eval_every == 0 or step == steps:
            record = {
                "step": step,
                "train_answer_loss": sum(losses) / len(losses),
                "write_loss": sum(write_losses) / len(write_losses) if write_losses else None,
                "seconds": round(time.perf_counter() - started),
                **evaluate(model, tok, test_stream, eval_samples, 256, 32),
            }
            losses, write_losses = [], []
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)


if __name__ == "__main__":
    run(app)

"""Train the ask path: recall and voice with one loss, distillation toward the untouched backbone.

Each step has two samples, both laid out as `hmt.ask` reads them (the chat turn read as its own segment,
then again opening the answer's segment, then the answer):

- recall: a fact (or several, or a bAbI story) hidden in real text of the train split, `segments` x L
  tokens, asked in a chat turn. The teacher is the untouched backbone shown the supporting facts and the
  question in one short turn ("Context: ... Question: ..."); its greedy answer is the answer read, and
  KL(teacher || student) over the answer's tokens is the loss: the student must say, from memory, what
  the backbone says with the evidence in view, in the backbone's own words. Segments that hold neither
  the asked facts nor the question run forward-only (HMT's gradient shortcut). Optionally the fact's
  memory must spell the value through the LM head (the answer-in-memory term, `--write-weight`).
- voice: a short chat prompt (train half of hmt/data/chat_prompts.json), after 0-3 segments of unrelated
  text or none; teacher and target are the untouched backbone's own greedy answer. KL keeps the voice.

`--train lora` continues the adapter's LoRA and HMT parameters (the teacher is the same backbone with
the LoRA switched off; an adapter without LoRA, or `--adapter none`, gets a fresh one: rank 8, peft's
usual modules); `--train memory` freezes the backbone and trains HMT's parameters only (the LoRA is
dropped: the teacher is the backbone itself). `--adapter none` starts from fresh HMT parameters
(`--segment-length`, `--num-sensory`, `--memory-tokens`; the defaults are the shipped adapter's). The
haystack is `--data` (bundled corpora: their train split; a file or folder: read whole). Checkpoints (the
adapter, the step, the optimizer) every `--save-every` steps into OUT/last; rerun the same command to
resume (with a larger `--steps` to train on).

    python -m experiments.train_ask --out runs/ask --steps 300
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

from experiments.cli import run
from hmt.ask import answer_logits, ask_turn, encode
from hmt.backbone import flush_denormals, has_lora, load_backbone, prepare_backbone, quiet_transformers
from hmt.config import HMTConfig
from hmt.data.corpus import BUNDLED_CORPORA, load_documents, token_stream
from hmt.facts import FactMaker, answer_found, teacher_messages
from hmt.finite import check_finite_weights
from hmt.io import ADAPTER_NAME, load_adapter_files, shipped_adapter, write_text_atomic
from hmt.model import HMTForCausalLM
from hmt.prompts import chat_prompts
from hmt.tasks import memory_as_tokens
from hmt.train import check_finite_parameters, check_learning_rate, diverged, non_finite

tool = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
ADVICE = "try a lower --lr or --memory-lr"


class Teacher:
    """The untouched backbone: greedy answers and their logits, with the LoRA switched off if there is one."""

    def __init__(self, model: HMTForCausalLM, tokenizer, max_new_tokens: int) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.eos = end_of_turn(tokenizer)

    def _backbone(self):
        backbone = self.model.backbone
        return backbone.disable_adapter() if hasattr(backbone, "disable_adapter") else _null()

    @torch.no_grad()
    def answer(self, messages) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer ids ending with the end-of-turn token, teacher logits predicting each of them)."""
        ids = encode(self.tokenizer, ask_turn(self.tokenizer, messages).text)[None]
        with self._backbone():
            backbone = self.model.backbone
            was = backbone.training
            backbone.eval()
            out = backbone.generate(
                ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.eos,
            )
            answer = out[0, ids.shape[1] :]
            logits = backbone(torch.cat([ids[0], answer])[None], use_cache=False).logits[0]
            backbone.train(was)
        return answer, logits[ids.shape[1] - 1 : -1].float()


def end_of_turn(tokenizer) -> int:
    """The token that ends an assistant's turn: ChatML's `<|im_end|>` if the tokenizer has it, else EOS."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an EOS token to end the teacher's answers")
    return tokenizer.eos_token_id


def training_model(backbone, start_from: Path | None, train: str, fresh: HMTConfig) -> HMTForCausalLM:
    """The model to train on `backbone`: from the adapter `start_from`, or with fresh HMT parameters
    (`fresh`) if None. lora: the adapter's LoRA trainable, or a fresh one if it has none; memory: the
    backbone frozen, any LoRA dropped."""
    if train == "lora":
        if start_from is not None and has_lora(start_from):
            return HMTForCausalLM.from_pretrained(
                start_from, backbone, trainable_lora=True, recall_query="causal"
            )
        if start_from is None:
            return HMTForCausalLM(prepare_backbone(backbone, "lora"), fresh.replace(recall_query="causal"))
        model = HMTForCausalLM.from_pretrained(start_from, backbone, recall_query="causal")
        lora = HMTForCausalLM(prepare_backbone(model.backbone, "lora"), model.config)
        lora.memory.load_state_dict(model.memory.state_dict())
        return lora
    if train == "memory":
        backbone.requires_grad_(False)
        if start_from is None:
            return HMTForCausalLM(backbone, fresh.replace(recall_query="causal"))
        config, tensors = load_adapter_files(start_from)
        check_finite_weights(tensors.items(), start_from / ADAPTER_NAME)
        model = HMTForCausalLM(backbone, config.replace(recall_query="causal"))
        model.memory.load_state_dict(tensors)
        return model
    raise typer.BadParameter("--train is lora or memory")


def haystack_documents(data: str) -> list:
    """The documents of the comma-separated sources in `data`: a bundled corpus's train split, anything
    else (a file, a folder) read whole, as the loader reads it by default."""
    documents = []
    for spec in (s.strip() for s in data.split(",") if s.strip()):
        documents += load_documents(spec, "train" if spec in BUNDLED_CORPORA else None)
    if not documents:
        raise typer.BadParameter("--data names no source")
    return documents


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def student_answer_logits(model, tokenizer, context, question_messages, answer, record_segments):
    """The ask path after reading `context`, teacher-forced on `answer`: logits predicting each answer
    token, the state after the question's segment and how many segments are closed by then. Of the
    context's segments only `record_segments` keep a graph (HMT's gradient shortcut); the question's
    segment and the answer's always do."""
    state = None
    L = model.config.segment_length
    if len(context):
        grad = torch.zeros(1, -(-len(context) // L), dtype=torch.bool)
        for s in record_segments:
            grad[0, min(s, grad.shape[1] - 1)] = True
        state = model(context[None], score=False, grad_segments=grad).state
    logits, state = answer_logits(model, tokenizer, question_messages, answer, state)
    return logits.float(), state, int(state.segments.max())


def kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    t = F.log_softmax(teacher_logits, dim=-1)
    s = F.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@tool.command()
def main(
    out: Annotated[Path, typer.Option(help="Run folder (resumes from OUT/last).")],
    steps: int = 300,
    train: Annotated[
        str, typer.Option(help="lora (LoRA + HMT params) or memory (HMT params only).")
    ] = "lora",
    adapter: Annotated[
        str | None,
        typer.Option(help="Adapter to start from (default: the shipped one; none: fresh HMT parameters)."),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone (default: the default backbone, as load_backbone reads it).")
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="Haystack sources, comma-separated (bundled: train split; a file or folder: whole)."
        ),
    ] = "essays,plays",
    segment_length: Annotated[int, typer.Option(help="With --adapter none: tokens per segment.")] = 256,
    num_sensory: Annotated[int, typer.Option(help="With --adapter none: sensory tokens.")] = 32,
    memory_tokens: Annotated[int, typer.Option(help="With --adapter none: memories per segment.")] = 8,
    min_segments: int = 2,
    max_segments: int = 4,
    lr: float = 1e-4,
    memory_lr: float = 3e-4,
    write_weight: float = 0.1,
    voice_weight: float = 1.0,
    max_new_tokens: int = 40,
    save_every: int = 10,
    seed: int = 0,
) -> HMTForCausalLM:
    """Train; returns the model as trained (for tests and notebooks)."""
    flush_denormals()
    quiet_transformers()
    if train not in ("lora", "memory"):
        raise typer.BadParameter("--train is lora or memory")
    check_learning_rate("--lr", lr)
    check_learning_rate("--memory-lr", memory_lr)
    torch.manual_seed(seed)
    plain = load_backbone(backbone, dtype="float32")
    tokenizer = plain.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last"
    if (last / "hmt_config.json").is_file():
        start_from = last
    elif adapter is None:
        start_from = shipped_adapter()
        if start_from is None:
            raise typer.BadParameter("no shipped adapter in this installation: give --adapter (or none)")
    else:
        start_from = None if adapter.lower() == "none" else Path(adapter)
    step = json.loads((out / "step.json").read_text())["step"] if (out / "step.json").is_file() else 0
    fresh = HMTConfig(segment_length=segment_length, num_sensory=num_sensory, memory_tokens=memory_tokens)
    model = training_model(plain.model, start_from, train, fresh)
    model.train()
    teacher = Teacher(model, tokenizer, max_new_tokens)
    L = model.config.segment_length

    documents = haystack_documents(data)
    haystack = token_stream(documents, tokenizer, None)
    maker = FactMaker(tokenizer, haystack, "train")
    voice_prompts = chat_prompts("train")

    memory_params = [p for p in model.memory.parameters() if p.requires_grad]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": memory_params, "lr": memory_lr, "weight_decay": 0.0}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    if (out / "optimizer.pt").is_file() and start_from == last:
        optimizer.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    print(
        f"start step {step} from {start_from}; trainable: memory {sum(p.numel() for p in memory_params):,}, "
        f"backbone {sum(p.numel() for p in backbone_params):,}",
        flush=True,
    )
    log = (out / "log.jsonl").open("a")
    rng = random.Random(seed * 100_003 + step)
    window: list[dict] = []
    while step < steps:
        started = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        segments = rng.randint(min_segments, max_segments)
        task = rng.choices(["fact", "multikey", "qa1"], weights=[0.6, 0.25, 0.15])[0]
        question_probe = 48  # room for the turn so that context + turn fill whole segments (roughly)
        sample = maker.sample(
            task, segments * L - question_probe, rng.uniform(0.0, 0.9), g, num_facts=rng.randint(2, 4)
        )
        answer, teacher_logits = teacher.answer(teacher_messages(sample))
        fact_end = len(sample.context) - sample.distance
        fact_segment = max(0, fact_end - 1) // L
        student_logits, state, num_segments = student_answer_logits(
            model, tokenizer, sample.context, sample.question, answer, [fact_segment]
        )
        found = answer_found(tokenizer.decode(answer, skip_special_tokens=True), sample.values)
        recall_kl = kl(teacher_logits, student_logits)
        # A teacher that misses the value even with the evidence in view is no target for recall.
        loss = recall_kl if found else recall_kl.detach() * 0
        write = torch.zeros(())
        if write_weight and task != "qa1":
            back = num_segments - fact_segment
            memories = state.memories[0]
            if back <= memories.shape[0]:
                value = encode(tokenizer, " " + sample.values[0])[: model.config.memory_tokens]
                logits = memory_as_tokens(model, memories[-back][None])[0, : len(value)]
                write = F.cross_entropy(logits, value)
                loss = loss + write_weight * write

        prompt = voice_prompts[rng.randrange(len(voice_prompts))]
        voice_answer, voice_teacher = teacher.answer(prompt)
        before = rng.choice([0, 0, 1, 2, 3])
        start = rng.randrange(len(haystack) - 4 * L)
        context = haystack[start : start + before * L - rng.randrange(L // 2)] if before else haystack[:0]
        voice_student, _, _ = student_answer_logits(model, tokenizer, context, prompt, voice_answer, [])
        voice_kl = kl(voice_teacher, voice_student)
        loss = loss + voice_weight * voice_kl

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(memory_params + backbone_params, 1.0)
        problem = non_finite({"loss": float(loss.detach()), "gradient norm": float(norm)})
        if problem is not None:  # before the step: the weights (and OUT/last) stay finite
            raise diverged(step + 1, problem, ADVICE)
        optimizer.step()
        step += 1
        record = {
            "step": step, "task": task, "segments": segments, "recall_kl": float(recall_kl.detach()),
            "write": float(write.detach()), "voice_kl": float(voice_kl.detach()), "teacher_found": found,
            "grad_norm": float(norm), "seconds": round(time.perf_counter() - started, 2),
        }  # fmt: skip
        log.write(json.dumps(record) + "\n")
        log.flush()
        window.append(record)
        if step % 5 == 0:
            mean = {
                k: sum(r[k] for r in window) / len(window)
                for k in ("recall_kl", "write", "voice_kl", "seconds")
            }
            print(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in mean.items()), flush=True)
            window = []
        if step % save_every == 0 or step == steps:
            check_finite_parameters(model, step, ADVICE)
            model.save_pretrained(last)
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            write_text_atomic(out / "step.json", json.dumps({"step": step}))
            if step % 100 == 0:
                model.save_pretrained(out / f"step-{step}")
    log.close()
    print("done", flush=True)
    return model


def cli() -> None:
    """The command line: a known error (e.g. a diverged training) is one line, as `hmt` prints it."""
    run(tool)


if __name__ == "__main__":
    cli()

"""What memory must not take away: short chats answered as the untouched backbone answers (`hmt voice`).

For each held-out prompt (`hmt.prompts.chat_prompts("test")`, never trained on) the untouched backbone
answers greedily through its chat template. The hmt model is then measured on the ask path (`hmt.ask`):

- KL(backbone || hmt) per token, teacher-forced on the backbone's own answer (nats; 0 = the same
  next-token distributions at every step of that answer);
- whether hmt's own greedy answer agrees with the backbone's in its first sentence;
- digit runs (3+ digits) in hmt's answer that the backbone's answer does not have, and among them
  runs of 7+ digits ("The capital of Egypt is 47196895678000…": the failure, not a year).

Each prompt is asked with an empty memory and, with a document read first, after reading that much unrelated
text (a user who read a document and then asks something else).
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
import torch.nn.functional as F

from hmt.ask import answer_logits, ask, ask_turn, encode

DIGIT_RUN = re.compile(r"\d{3,}")
LONG_DIGIT_RUN = 7  # digits: a run this long the backbone did not write is the failure mode, not a year


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (. ! ? or a line break), whitespace normalised."""
    text = " ".join(text.strip().split("\n", 1)[0].split())  # a line break ends the sentence too
    match = re.search(r"[.!?](\s|$)", text)
    return (text[: match.end()] if match else text).strip()


def new_digit_runs(answer: str, reference: str) -> list[str]:
    """Runs of 3+ digits in `answer` that `reference` does not contain."""
    return [run for run in DIGIT_RUN.findall(answer) if run not in reference]


class BackboneAnswers:
    """The untouched backbone's greedy answers and its logits on them, per prompt (computed once)."""

    def __init__(self, backbone: Any, tokenizer: Any, max_new_tokens: int) -> None:
        self.backbone, self.tokenizer, self.max_new_tokens = backbone, tokenizer, max_new_tokens
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(answer ids, logits predicting each answer id (float32), answer text)."""
        if prompt not in self._cache:
            turn = ask_turn(self.tokenizer, prompt)
            ids = encode(self.tokenizer, turn.text, self.backbone.device)
            # an explicit mask: a pad token the prompt holds (pad = eos here) is never masked out
            out = self.backbone.generate(
                ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=self.max_new_tokens,
                do_sample=False, pad_token_id=self.tokenizer.eos_token_id,
            )  # fmt: skip
            answer = out[0, len(ids) :]
            logits = self.backbone(torch.cat([ids, answer])[None], use_cache=False).logits[0]
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            for stop in turn.stops:
                text = text.split(stop)[0]
            self._cache[prompt] = (answer, logits[len(ids) - 1 : -1].float(), text.strip())
        return self._cache[prompt]


@torch.no_grad()
def voice_report(
    model: Any,
    backbone: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 48,
    contexts: dict[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Per prompt and per memory (`contexts`: name -> a state to ask after, None for an empty memory;
    default {"empty": None}), the KL, first-sentence agreement and new digit runs; means per memory."""
    if not prompts:
        raise ValueError("no prompts to measure")
    contexts = contexts if contexts is not None else {"empty": None}
    reference = BackboneAnswers(backbone, tokenizer, max_new_tokens)
    report: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "memories": {}}
    for name, state in contexts.items():
        rows, started = [], time.perf_counter()
        for prompt in prompts:
            answer, teacher, backbone_text = reference(prompt)
            student, _ = answer_logits(model, tokenizer, prompt, answer, state)
            t = F.log_softmax(teacher, dim=-1)
            s = F.log_softmax(student.float(), dim=-1)
            kl = float((t.exp() * (t - s)).sum(-1).mean()) if len(answer) else 0.0
            reply = ask(model, tokenizer, prompt, state, max_new_tokens=max_new_tokens, do_sample=False).text
            runs = new_digit_runs(reply, backbone_text)
            rows.append(
                {
                    "prompt": prompt, "backbone": backbone_text, "hmt": reply, "kl": kl,
                    "same_first_sentence": first_sentence(reply) == first_sentence(backbone_text),
                    "new_digit_runs": runs,
                }
            )  # fmt: skip
            if progress is not None:
                progress(name, len(rows), len(prompts))
        report["memories"][name] = {
            "mean_kl": sum(r["kl"] for r in rows) / len(rows),
            "same_first_sentence": sum(r["same_first_sentence"] for r in rows) / len(rows),
            "answers_with_new_digit_runs": sum(bool(r["new_digit_runs"]) for r in rows),
            "answers_with_new_long_digit_runs": sum(
                any(len(run) >= LONG_DIGIT_RUN for run in r["new_digit_runs"]) for r in rows
            ),
            "seconds": time.perf_counter() - started,
            "rows": rows,
        }
    return report

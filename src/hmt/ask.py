"""The ask path: one question (or chat turn) answered from memory, the way the adapter is trained.

`hmt ask`, `hmt chat`, the server's chat completions and session asks, and `HMTForCausalLM.ask` all
answer through `ask`. A turn is read in two pieces:

1. the turn as its own segment (`end_segment=True`), closed after the user's message: under the causal
   recall query the answer's segment then recalls with the question as its query, so a fact read far
   back is fetched by what is asked;
2. the turn again, opening the answer's segment: the answer sees the question whole inside its own
   window (not only through the k sensory tokens), then the assistant's reply is generated freely.

With a chat template (instruct models) the turn is the template's prompt for the messages (system
prompt, user turn, the assistant's header); without one, plain-text `Question: ... Answer:` turns.
`hmt train-ask` (experiments/train_ask.py) trains exactly this layout against the untouched backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from hmt.generation import GenerationOutput
    from hmt.memory import MemoryState

# Without a chat template (base models): plain-text turns, ended by the next turn's label.
PLAIN_TURN = "\n\nQuestion: {message}\nAnswer:"
PLAIN_STOPS = ("\nQuestion:",)


@dataclass(frozen=True)
class AskTurn:
    """A turn as the ask path reads it: `text` twice (as its own segment, then opening the answer's)."""

    text: str  # the prompt: the chat template's, or a plain-text turn
    stops: tuple[str, ...]  # strings that end the answer (none with a chat template: its end-of-turn token)


@dataclass
class AskAnswer:
    """What `ask` returns: the answer's text, its token ids and the state after it."""

    text: str
    sequences: torch.Tensor  # (1, new) generated ids
    state: MemoryState  # memory after the question and the answer: continue a conversation with it
    output: GenerationOutput


def ask_turn(tokenizer: Any, messages: str | list[dict[str, str]]) -> AskTurn:
    """The prompt for `messages` (a question, or chat messages with roles), with the stop strings."""
    if isinstance(messages, str):
        if not messages.strip():
            raise ValueError("the question is empty: give a question")
        messages = [{"role": "user", "content": messages.strip()}]
    if not messages or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return AskTurn("\n" + text, ())
    turns = "".join(PLAIN_TURN.format(message=m["content"]) for m in messages if m.get("role") != "assistant")
    return AskTurn(turns, PLAIN_STOPS)


def encode(tokenizer: Any, text: str, device: Any = None) -> torch.Tensor:
    """Token ids of `text` (1-D, no special tokens added: the template writes its own)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=device)


def read_question(model: nn.Module, ids: torch.Tensor, state: MemoryState | None) -> MemoryState:
    """Step 1: read the turn `ids` (1-D) and close its segment, so the next segment recalls with it."""
    with torch.no_grad():
        return model(ids[None], state=state, end_segment=True, score=False).state


def ask(
    model: nn.Module,
    tokenizer: Any,
    messages: str | list[dict[str, str]],
    state: MemoryState | None = None,
    *,
    streamer: Any = None,
    stop_strings: list[str] | tuple[str, ...] = (),
    **generation: Any,
) -> AskAnswer:
    """Answer `messages` (a question, or chat messages) from the memory in `state` (None: empty).

    `generation`: transformers' generation settings (max_new_tokens, do_sample, temperature, ...);
    `stop_strings` add to the turn's own. The answer's text is cut at the first stop string."""
    turn = ask_turn(tokenizer, messages)
    ids = encode(tokenizer, turn.text, model.device)
    state = read_question(model, ids, state)
    stops = [*turn.stops, *stop_strings]
    out = model.generate(
        ids[None],
        state=state,
        tokenizer=tokenizer,
        stop_strings=stops or None,
        streamer=streamer,
        **generation,
    )
    text = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    for stop in stops:  # a stop string ends the answer; it is not part of it
        text = text.split(stop)[0]
    return AskAnswer(text=text.strip(), sequences=out.sequences, state=out.state, output=out)


def answer_logits(
    model: nn.Module,
    tokenizer: Any,
    messages: str | list[dict[str, str]],
    answer: torch.Tensor,
    state: MemoryState | None = None,
    grad_segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """The ask path's logits for a given `answer` (1-D ids): (len(answer), vocab), row i predicting
    answer[i], and the state after the question's segment. What training distils and `hmt voice`
    compares with the backbone; the same reads as `ask`, teacher-forced. `grad_segments` marks which
    segments of reading the turn after `state` keep a graph (HMT's gradient shortcut; None: all)."""
    turn = encode(tokenizer, ask_turn(tokenizer, messages).text, model.device)
    state = model(turn[None], state=state, end_segment=True, score=False, grad_segments=grad_segments).state
    ids = torch.cat([turn, answer.to(turn.device)])
    out = model(ids[None], state=state, num_logits=len(answer) + 1)
    return out.logits[0, :-1], state

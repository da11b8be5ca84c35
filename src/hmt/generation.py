"""Generation: HMT reads its own output one token at a time, across segment boundaries without limit.

Within a segment each new token runs through the backbone's KV cache over the open segment
([sink | P | sensory | tokens so far]). The token that fills a segment closes it: it is read through the
cache too, followed by the r write slots P, whose final states are the segment's memory — the positions
the forward pass would read after the segment, without reading the segment again. The cache is then
rebuilt for the next segment from the state. The state is the only thing carried, so generation
continues any state a forward call returned, and its result equals reading the prompt and the generated
tokens in one call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from hmt.backbone import eval_mode
from hmt.config import WRITING_MODES, check_mode
from hmt.memory import MemoryState

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default length, as new tokens (the context has no length)


@dataclass
class GenerationOutput(ModelOutput):
    """What `HMTForCausalLM.generate` returns."""

    sequences: torch.Tensor | None = None  # (batch, new): the generated ids, pad_token_id after a row stopped
    state: MemoryState | None = None  # memory after the prompt and every generated token: continue with it


class SegmentCache:
    """The backbone's KV cache over each row's open segment, left-padded; built from a state."""

    def __init__(
        self, model: nn.Module, sequences: list[torch.Tensor], slots: torch.Tensor | None = None
    ) -> None:
        lengths = torch.tensor([len(s) for s in sequences], device=model.device)
        width = int(lengths.max())
        positions = torch.arange(width, device=model.device)
        self.mask = positions[None, :] >= (width - lengths)[:, None]  # (batch, width) bool, left padding
        inputs = sequences[0].new_zeros(len(sequences), width, sequences[0].shape[-1])
        for row, sequence in enumerate(sequences):
            inputs[row, width - len(sequence) :] = sequence
        self.model = model
        self.slots = slots  # (batch, r, d): the memory the open segments read, read again to write theirs
        self.next_position = lengths.clone()
        out = model.backbone(
            inputs_embeds=inputs,
            attention_mask=self.mask.long(),
            position_ids=(self.mask.long().cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache

    @classmethod
    def build(cls, model: nn.Module, state: MemoryState, mode: str) -> SegmentCache | None:
        """The cache over each row's open segment, or None while some row's is empty (nothing to attend
        to: the backbone mode right after a segment closed); the next token is then read by a forward."""
        sequences, slots = model._open_segments(state, mode)
        if min(len(s) for s in sequences) == 0:
            return None
        return cls(model, sequences, slots if mode in WRITING_MODES else None)

    def merge(self, other: SegmentCache) -> bool:
        """Append `other`'s rows (left-padding the shorter cache): rows join a batch being generated
        without re-reading the others. False (nothing changed) for caches other than plain growing
        key/value layers."""
        from transformers.cache_utils import DynamicLayer

        layers = [*self.cache.layers, *other.cache.layers]
        if (
            len(self.cache.layers) != len(other.cache.layers)
            or any(type(x) is not DynamicLayer for x in layers)
            or (self.slots is None) != (other.slots is None)
        ):
            return False
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = width - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.slots = None if self.slots is None else torch.cat([self.slots, other.slots])
        return True

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch (rows that finished leave)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        self.slots = None if self.slots is None else self.slots[index]

    def step(self, token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Read one token per row (ignored for inactive rows); the logits after it (batch, vocab)."""
        return self._read(token, active)[0]

    def close(
        self, token: torch.Tensor, active: torch.Tensor, closing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read one token per active row and, after it, for the `closing` rows (whose segment it fills) the
        r write slots (writing modes): the logits after the token (batch, vocab) and the slots' final
        states (batch, r, dim; None without memory), what the forward pass writes as the segment's memory.
        The closing rows' cache is spent after this (`select` the others: theirs goes on)."""
        return self._read(token, active, slot_rows=closing if self.slots is not None else None)

    def _read(
        self, token: torch.Tensor, active: torch.Tensor, slot_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = self.model.backbone.get_input_embeddings()(token[:, None])
        mask = active[:, None]
        if slot_rows is not None:
            inputs = torch.cat([inputs, self.slots.to(inputs.dtype)], dim=1)
            mask = torch.cat([mask, slot_rows[:, None].expand(-1, self.slots.shape[1])], dim=1)
        width = inputs.shape[1]
        self.mask = torch.cat([self.mask, mask], dim=1)
        out = self.model.backbone(
            inputs_embeds=inputs,
            attention_mask=self.mask.long(),
            position_ids=self.next_position[:, None] + torch.arange(width, device=self.mask.device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=torch.zeros(1, dtype=torch.long, device=self.mask.device),  # the token's only
            output_hidden_states=[-1] if slot_rows is not None else False,
        )
        self.cache = out.cache
        self.next_position = self.next_position + active.long()  # closing rows' cache is spent: not counted
        return out.logits[:, 0], out.hidden_states[-1][:, 1:] if slot_rows is not None else None


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    state: MemoryState | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    mode: str | None = None,
    streamer: Any = None,
    tokenizer: Any = None,
    stop_strings: str | list[str] | None = None,
    end_segment: bool = False,
    **kwargs: Any,
) -> GenerationOutput:
    """See `HMTForCausalLM.generate`."""
    config = _generation_config(model, generation_config, kwargs)
    mode = check_mode(mode or model.mode)
    stop_strings = stop_strings or config.stop_strings
    stop = _stop_strings(tokenizer, stop_strings)
    processors = _processors(config, prompt_length=input_ids.shape[1])
    eos = _token_set(config.eos_token_id)
    pad = _pad_id(config, eos)
    length = model.config.segment_length
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("a streamer shows one text: give input_ids of batch size 1")
    with torch.no_grad(), eval_mode(model), model.remembering_queries():
        state = model(
            input_ids,
            attention_mask=attention_mask,
            state=state,
            mode=mode,
            end_segment=end_segment,
            score=False,
        ).state
        batch = input_ids.shape[0]
        history = input_ids.to(model.device)
        active = torch.ones(batch, dtype=torch.bool, device=model.device)
        cache, new_tokens = SegmentCache.build(model, state, mode), []
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for _ in range(config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS):  # GenerationConfig refuses 0
            scores = processors(history, state.next_token_logits.clone())
            token = _choose(scores, config.do_sample)
            token = torch.where(active, token, torch.full_like(token, pad))
            new_tokens.append(token)
            history = torch.cat([history, token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            closing = active & (state.num_pending + 1 >= length)
            if cache is None:  # nothing open to attend to (backbone mode): the forward pass reads the token
                state = model(
                    token[:, None], attention_mask=active[:, None].long(), state=state, mode=mode, score=False
                ).state
            elif bool(closing.any()):
                state = _close_segments(model, state, cache, token, active, closing)
                cache = None
            else:
                state = state.with_token_pending(token, cache.step(token, active), active)
            finished = torch.isin(token, torch.tensor(sorted(eos), device=token.device, dtype=token.dtype))
            if stop is not None:
                finished |= stop(history, scores).to(finished.device)
            active = active & ~finished
            if not bool(active.any()):
                break
            if cache is None:
                cache = SegmentCache.build(model, state, mode)
    if streamer is not None:
        streamer.end()
    sequences = torch.stack(new_tokens, dim=1) if new_tokens else history[:, :0]
    return GenerationOutput(sequences=sequences, state=state)


def _close_segments(
    model: nn.Module,
    state: MemoryState,
    cache: SegmentCache,
    token: torch.Tensor,
    active: torch.Tensor,
    closing: torch.Tensor,
) -> MemoryState:
    """The state after `token` (batch,) was read by the `active` rows, filling the segments of the `closing`
    ones: their memory written and their tokens made recent, as the forward pass leaves them."""
    logits, slots = cache.close(token, active, closing)
    state = state.with_token_pending(token, logits, active)
    if slots is not None:
        state = model._write(state, slots, closing, recorded=False)
    length = model.config.segment_length  # a closing row now holds exactly L pending tokens, right-aligned
    return state.with_segment_read(state.pending_ids[:, -length:], closing.long() * length, closing)


# The generation settings `generate` carries out; any other GenerationConfig field asked for is refused
# (ValueError naming it), never silently ignored. The backbone's own config may hold others: they are
# its defaults, not a request.
SUPPORTED_SETTINGS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "no_repeat_ngram_size", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings", "num_beams",
    "num_return_sequences", "use_cache",
})  # fmt: skip


def _generation_config(model: nn.Module, given: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """The backbone's generation config (or the one given), updated with the keyword arguments."""
    default = GenerationConfig()
    asked = {k for k in kwargs if hasattr(default, k)}  # unknown names are named by `update` below
    if given is not None:
        asked |= {k for k in given.to_diff_dict() if hasattr(default, k) and k != "transformers_version"}
    refused = sorted(asked - SUPPORTED_SETTINGS)
    if refused:
        hint = " (use max_new_tokens: the context has no length)" if "max_length" in refused else ""
        raise ValueError(
            f"generation settings not supported by HMT's generate: {refused}{hint}; supported: "
            f"{sorted(SUPPORTED_SETTINGS)}. It returns GenerationOutput(sequences, state): no scores."
        )
    base = given if given is not None else getattr(model.backbone, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(f"unknown generation arguments {sorted(unused)}")
    if config.max_new_tokens is not None and config.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {config.max_new_tokens}")
    if config.num_beams not in (None, 1):
        raise ValueError("beam search is not supported: use greedy decoding or sampling (num_beams=1)")
    if config.num_return_sequences not in (None, 1):
        raise ValueError("num_return_sequences > 1 is not supported: repeat the prompt's row instead")
    return config


def _processors(config: GenerationConfig, prompt_length: int = 0) -> LogitsProcessorList:
    """transformers' own processors for the settings asked: repetition penalty, n-grams not repeated,
    no end of text before min_new_tokens (after the `prompt_length` tokens given), and when sampling
    temperature, top-k and top-p."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    eos = sorted(_token_set(config.eos_token_id))
    if config.min_new_tokens and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def _choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probabilities = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator)[:, 0]


def _stop_strings(tokenizer: Any, stop_strings: str | list[str] | None) -> StopStringCriteria | None:
    if not stop_strings:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=...")
    return StopStringCriteria(tokenizer, stop_strings)


def _token_set(ids: int | list[int] | None) -> set[int]:
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def _pad_id(config: GenerationConfig, eos: set[int]) -> int:
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    return min(eos) if eos else 0

"""`HMTForCausalLM`: any Hugging Face causal LM reading unbounded text segment by segment with memory.

Per segment n (docs/method.md): (1) query S_n from [T | the last j tokens before the segment | T] (the
paper's query reads the segment's own first j tokens instead); (2) recall P_n from the cache;
(3) augment: the main pass over [sink | P_n | sensory tokens | x_n | P_n]; (4) write M_n, the output at
the last slot, into the cache. Queries do not depend on memory, so those of all segments run in batched
backbone calls up front.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from hmt.backbone import (
    bos_embedding,
    check_positions,
    context_length,
    embedding_and_head,
    embedding_std,
    eval_mode,
)
from hmt.config import IGNORE_INDEX, MEMORY_MODES, READING_FIELDS, WRITING_MODES, HMTConfig, check_mode
from hmt.inputs import PackedInputs, logits_kept, pack_inputs, padding_mask, recorded_steps
from hmt.memory import MemoryState
from hmt.recall import MemoryParameters
from hmt.scoring import TokenScores

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from hmt.ask import AskAnswer
    from hmt.generation import GenerationOutput

__all__ = ["IGNORE_INDEX", "HMTForCausalLM", "HMTOutput"]


@dataclass
class HMTOutput(ModelOutput):
    """What `HMTForCausalLM.forward` returns. Index it by name, never by position."""

    loss: torch.Tensor | None = None  # scalar: mean NLL over scored tokens (None if none was scored)
    token_losses: torch.Tensor | None = None  # (batch, seq_len): NLL of each input token, 0 where unscored
    token_mask: torch.Tensor | None = None  # (batch, seq_len) bool: which tokens were scored
    logits: torch.Tensor | None = None  # (batch, n, vocab): the last n = min(seq_len, L) input positions
    state: MemoryState | None = None  # memory after the last segment; pass it to the next call
    recall_weights: list[torch.Tensor] | None = None  # per segment (batch, slots); slot -1 is the newest


class HMTForCausalLM(nn.Module):
    """Wraps a transformers causal LM (left unchanged) with HMT's memory.

    >>> model = HMTForCausalLM(backbone, HMTConfig(segment_length=512, num_sensory=32))
    >>> out = model(input_ids)                         # any length
    >>> out2 = model(more_ids, state=out.state)        # continues where input_ids ended
    >>> model(input_ids, mode="rmt")                   # the same weights read as a control

    `mode` is the default of every call; `query_batch_size` segments share one batched query call
    (bounds peak memory on long inputs without changing results). Neither is part of the saved config.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        config: HMTConfig | None = None,
        *,
        mode: str = "hmt",
        query_batch_size: int = 32,
    ) -> None:
        super().__init__()
        config = config or HMTConfig()
        embeddings, head = embedding_and_head(backbone)
        embedding_dim = embeddings.embedding_dim
        output_dim = head.weight.shape[1]
        if config.embedding_dim is not None and config.embedding_dim != embedding_dim:
            raise ValueError(
                f"config was made for embedding width {config.embedding_dim}, but this backbone has "
                f"{embedding_dim}; use a config made for this backbone"
            )
        if (
            isinstance(query_batch_size, bool)
            or not isinstance(query_batch_size, int)
            or query_batch_size < 1
        ):
            raise ValueError(f"query_batch_size must be an integer >= 1, got {query_batch_size!r}")
        self.mode = check_mode(mode)
        check_positions(backbone, config, self.mode)
        self._query_memo: dict[tuple, torch.Tensor] | None = None  # see `remembering_queries`
        self.backbone = backbone
        self.query_batch_size = query_batch_size
        self.config = config.replace(
            recall_dim=config.recall_dim or embedding_dim,
            embedding_dim=embedding_dim,
            backbone_type=backbone.config.model_type,
            backbone=config.backbone or getattr(backbone.config, "_name_or_path", None) or None,
        )
        self.memory = MemoryParameters(  # T, m0, W_q, W_k, the sink and the memory scale: what HMT adds
            embedding_dim=embedding_dim,
            output_dim=output_dim,
            recall_dim=self.config.recall_dim,
            embedding_std=embedding_std(embeddings),
            memory_tokens=self.config.memory_tokens,
            memory_norm=self.config.memory_norm,
            recall_norm=self.config.recall_norm,
            recall_init=self.config.recall_init,
            recall_temperature=self.config.recall_temperature,
            sink_init=bos_embedding(backbone, embeddings) if self.config.attention_sink else None,
        ).to(device=embeddings.weight.device, dtype=torch.float32)
        self.memory.calibrate(*self._measure_norms())

    # ---- properties -------------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.memory.embedding_dim

    @property
    def memory_width(self) -> int:
        """Width of one cached memory: memory_tokens embeddings held flat."""
        return self.memory.memory_width

    @property
    def vocab_size(self) -> int:
        return self.backbone.get_input_embeddings().num_embeddings

    @property
    def device(self) -> torch.device:
        return self.memory.summary_prompt.device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's dtype (HMT's own parameters stay float32 whatever it is)."""
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def generation_config(self) -> GenerationConfig | None:
        """The backbone's generation defaults (eos and pad ids, ...), which `generate` starts from."""
        return getattr(self.backbone, "generation_config", None)

    def _apply(self, fn: Any, recurse: bool = True) -> HMTForCausalLM:
        """`.to(dtype/device)`, `.half()`, `.cuda()` ... as on any module, except that HMT's own parameters
        only move device: they stay float32 (`recall.MemoryParameters`), never rounded through the
        backbone's dtype."""
        memory = self._modules.pop("memory")
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["memory"] = memory
        target = fn(torch.zeros((), device=self.device))  # where and in what the conversion puts a tensor
        memory._apply(lambda t: t.to(device=target.device), recurse)
        return self

    @contextmanager
    def reading(self, **changes: int | None) -> Iterator[HMTForCausalLM]:
        """Read with other reading settings (READING_FIELDS: segment_length, num_sensory, cache_size, ...) inside the block;
        the config is restored after it. Settings tied to the parameters cannot change this way."""
        tied = sorted(set(changes) - set(READING_FIELDS))
        if tied:
            raise ValueError(f"{tied} are tied to the parameters; build a new HMTForCausalLM instead")
        original = self.config
        self.config = original.replace(**changes)  # forward checks the positions for the mode it reads in
        try:
            yield self
        finally:
            self.config = original

    @contextmanager
    def remembering_queries(self) -> Iterator[None]:
        """Inside the block, recall queries computed without a graph are reused for the same tokens
        (generation needs each open segment's twice); exact while no parameter changes inside it."""
        outer = self._query_memo
        self._query_memo = {} if outer is None else outer
        try:
            yield
        finally:
            self._query_memo = outer

    def empty_state(self, batch_size: int = 1) -> MemoryState:
        return MemoryState.empty(
            batch_size, self.memory_width, self.config.tokens_kept, self.vocab_size, device=self.device
        )

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        state: MemoryState | None = None,
        mode: str | None = None,
        return_logits: bool = False,
        num_logits: int | None = None,
        bptt_depth: int | None = None,
        grad_segments: torch.Tensor | None = None,
        end_segment: bool = False,
        score: bool = True,
    ) -> HMTOutput:
        """Read `input_ids` (batch, seq_len) of any length segment by segment.

        Each token is scored against the prediction before it (targets: `labels` if given, else the
        input ids; -100 is ignored), including the first token of a call that continues a `state`.
        Segments are cut every L tokens of the whole stream: a segment closes (its memory is written)
        when it holds L tokens, and a shorter last one stays pending in the returned state, read again
        with the next call. So calls on any split of a text equal one call on the concatenation (with the
        causal query; the paper's query reads a segment's first j tokens, so only splits at segment
        boundaries are exact with it). `end_segment=True` closes each row's last segment however short
        (e.g. a question read as its own segment, so that the answer's segment recalls with it).
        `score=False` only reads (into memory, say): no token losses and no logits, only each row's
        prediction for the token after its input (carried in the state), so the LM head runs on one position
        per row rather than on every token; the returned state equals the scoring call's.
        `attention_mask` marks each row's tokens as one contiguous run (left or right padding).
        `mode` (default: the model's) is hmt, rmt, memory_off, sliding or backbone (see HMTConfig docs).
        Logits are returned for the last `num_logits` input positions (default: one segment's worth;
        0: none, for scoring long texts cheaply); `return_logits=True` returns them all.
        `bptt_depth=k` cuts the graph through memory every k segments (truncated backpropagation).
        `grad_segments` (batch, segments) bool: HMT's gradient shortcut for training on long inputs — only
        segments marked in some row are recorded for backward; the others run forward-only and their
        memories enter the cache detached, so gradient reaches a marked early segment through recall alone.
        """
        mode = check_mode(mode or self.mode)
        check_positions(self.backbone, self.config, mode)
        if not score and (labels is not None or return_logits or num_logits):
            raise ValueError("score=False reads without scoring: pass no labels, return_logits or num_logits")
        if bptt_depth is not None and (not isinstance(bptt_depth, int) or bptt_depth < 1):
            raise ValueError(f"bptt_depth must be a positive integer or None, got {bptt_depth!r}")
        packed = pack_inputs(input_ids, attention_mask, labels, self.vocab_size)
        batch, seq_len = input_ids.shape
        state = self._check_state(state, batch)
        packed = packed.after_pending(state.pending_ids, state.pending_mask)
        length = self.config.segment_length
        num_steps = math.ceil(int(packed.lengths.max()) / length)
        kept = logits_kept(seq_len, length, return_logits, num_logits) if score else 0
        scores = TokenScores(packed, state, kept, seq_len, score)
        recorded = recorded_steps(grad_segments, batch, num_steps)
        queries = self._query(packed, state, num_steps, recorded) if mode == "hmt" else None

        recall_weights: list[torch.Tensor] = []
        for step in range(num_steps):
            if bptt_depth is not None and step > 0 and step % bptt_depth == 0:
                state = state.detach()
            start, seg_ids, seg_lengths = packed.segment(step, length)
            with torch.set_grad_enabled(recorded[step]):
                read, weights = self._recall(mode, state, queries[:, step] if queries is not None else None)
                if weights is not None:
                    recall_weights.append(weights)
                ending = None if score else start + seg_lengths == packed.lengths
                logits, slots = self._augment(seg_ids, seg_lengths, state, read, mode != "backbone", ending)
                scores.add_segment(start, seg_lengths, logits, ending)
            closed = (seg_lengths == length) | (
                end_segment & (seg_lengths > 0) & (start + seg_lengths == packed.lengths)
            )
            if mode in WRITING_MODES:
                state = self._write(state, slots, closed, recorded[step])
            state = state.with_segment_read(seg_ids, seg_lengths, closed)
        state = scores.carry_prediction(state.with_tokens_counted(packed.new_tokens))
        loss, token_losses, token_mask, logits = scores.finish()
        return HMTOutput(
            loss=loss,
            token_losses=token_losses,
            token_mask=token_mask,
            logits=logits,
            state=state,
            recall_weights=recall_weights if mode == "hmt" else None,
        )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        state: MemoryState | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> GenerationOutput:
        """Read `input_ids` (continuing `state`), then generate: a `GenerationOutput` with the new tokens
        only (not the prompt) and the state after them. Arguments follow transformers: a GenerationConfig
        (default `self.generation_config`) and/or max_new_tokens, min_new_tokens, do_sample, temperature,
        top_k, top_p, repetition_penalty, no_repeat_ngram_size, eos_token_id, pad_token_id; any other
        field asked for is refused, never ignored (`generation.SUPPORTED_SETTINGS`). Also `stop_strings`
        (with `tokenizer=`), `streamer` (batch 1), `mode`, `end_segment=True` (close the prompt's last
        segment first). Rows may be left-padded; output has no length limit."""
        from hmt.generation import generate

        return generate(self, input_ids, attention_mask, state, generation_config, **kwargs)

    def ask(
        self,
        tokenizer: Any,
        messages: str | list[dict[str, str]],
        *,
        state: MemoryState | None = None,
        **generation: Any,
    ) -> AskAnswer:
        """Answer a question (or chat messages with roles) from the memory in `state` (None: empty),
        through the ask path of `hmt ask`, `hmt chat` and the server (`hmt.ask.ask`); `generation` as for
        `generate`. Returns the answer's text, its ids and the state after it."""
        from hmt.ask import ask

        return ask(self, tokenizer, messages, state, **generation)

    # ---- the four steps: query, recall, augment, write ---------------------------------------------

    def _query(
        self, packed: PackedInputs, state: MemoryState, num_steps: int, recorded: list[bool] | None = None
    ) -> torch.Tensor:
        """(1) S_n for every segment of every row: last output of [T | j tokens | T], batched. The j tokens
        are the last ones read before the segment (causal; from the state at a call's start), or the
        segment's own first ones (the paper's query).

        Returns (batch, num_steps, output_dim); rows hold zeros for segments they do not have, and for a
        causal query before anything was read (the cache is empty then, so recall reads m0). Queries of
        steps not `recorded` (gradient shortcut) run without a graph.
        """
        cfg = self.config
        length, j = cfg.segment_length, cfg.query_length
        embed = self.backbone.get_input_embeddings()
        prompt = self.memory.summary_prompt.to(embed.weight.dtype)[None, :]
        batch = packed.ids.shape[0]
        jobs = []  # (row, step, the query's token ids)
        for row in range(batch):
            row_length = int(packed.lengths[row])
            text = packed.ids[row, :row_length]
            earlier = state.recent_ids[row][state.recent_mask[row]] if cfg.recall_query == "causal" else None
            for step in range(math.ceil(row_length / length)):
                if earlier is None:
                    tokens = text[step * length : step * length + j]
                else:
                    before = torch.cat([earlier, text[: step * length]])
                    tokens = before[max(0, len(before) - j) :]
                if len(tokens):
                    jobs.append((row, step, tokens))
        recorded = recorded or [torch.is_grad_enabled()] * num_steps
        queries = prompt.new_zeros(batch, num_steps, self.memory.query_proj.in_features, dtype=torch.float32)
        if not jobs:
            return queries
        # Rows that read the same tokens (candidate answers after one context, a shared prompt) share one
        # query: each distinct (tokens, recorded) is run once.
        distinct: dict[tuple, int] = {}
        which = [
            distinct.setdefault((recorded[step], *tokens.tolist()), len(distinct)) for _, step, tokens in jobs
        ]
        unique = [None] * len(distinct)
        for (_, step, tokens), index in zip(jobs, which, strict=True):
            unique[index] = (step, tokens)
        keys = list(distinct)
        memo = self._query_memo if self._query_memo is not None and not self.training else {}
        found = [memo.get(key) if not key[0] else None for key in keys]  # recorded queries: never reused
        missing = [i for i in range(len(unique)) if found[i] is None]
        order = sorted(missing, key=lambda i: not recorded[unique[i][0]])  # recorded first
        for first in range(0, len(order), self.query_batch_size):
            indices = order[first : first + self.query_batch_size]
            chunk = [unique[i] for i in indices]
            sequences = [torch.cat([prompt, embed(tokens), prompt]) for _, tokens in chunk]
            lengths = torch.tensor([len(tokens) + 2 for _, tokens in chunk], device=prompt.device)
            with torch.set_grad_enabled(any(recorded[step] for step, _ in chunk)):
                final = self._backbone_states(sequences, lengths)
            outputs = final[torch.arange(len(chunk), device=final.device), lengths - 1].float()
            for i, output in zip(indices, outputs, strict=True):
                found[i] = output
                if self._query_memo is not None and not keys[i][0]:
                    self._query_memo[keys[i]] = output
        flat = torch.stack([found[i] for i in which])  # (jobs, output_dim)
        rows = torch.tensor([row for row, _, _ in jobs], device=flat.device)
        steps = torch.tensor([step for _, step, _ in jobs], device=flat.device)
        return queries.index_put((rows, steps), flat)

    def _recall(
        self, mode: str, state: MemoryState, query: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(2) The memory a segment reads (batch, r * d), by mode, and hmt's recall weights (batch, slots)."""
        if mode not in MEMORY_MODES:
            return None, None
        if mode == "memory_off":
            return self.memory.initial_memory.expand(state.batch_size, -1), None
        if mode == "rmt":
            return self.memory.last_memory(state.memories, state.memory_mask), None
        return self.memory.recall(query, state.memories, state.memory_mask, self.config.sharpen_recall_after)

    def _augment(
        self,
        seg_ids: torch.Tensor,
        seg_lengths: torch.Tensor,
        state: MemoryState,
        read: torch.Tensor | None,
        use_sensory: bool,
        ending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3) One backbone call over the active rows: [sink | P | sensory | segment | P] (memory modes),
        [sensory | segment] (sliding) or the segment alone (backbone); P is r embeddings.

        Returns the logits at every segment position of the active rows, flattened row by row
        (sum(seg_lengths), vocab) — or, given `ending` (batch,) bool, only at the last position of the
        active rows marked in it — and the final hidden states at the r write slots (batch, r,
        output_dim), zeros for inactive rows (None without memory): what `_write` turns into M_n.
        """
        dtype = self.backbone.get_input_embeddings().weight.dtype
        rows = torch.nonzero(seg_lengths > 0).flatten().tolist()
        read_slots = self.memory.as_tokens(read).to(dtype) if read is not None else None  # (batch, r, d)
        use_sensory = use_sensory and self.config.num_sensory > 0
        sequences, text_starts = [], []
        for row in rows:
            tokens = seg_ids[row, : int(seg_lengths[row])]
            slots = read_slots[row] if read_slots is not None else None
            pieces, text_start = self._segment_embeddings(tokens, state, row, slots, use_sensory, write=True)
            sequences.append(pieces)
            text_starts.append(text_start)
        lengths = torch.tensor([len(s) for s in sequences], device=seg_ids.device)
        starts = torch.tensor(text_starts, device=seg_ids.device)
        positions = torch.arange(int(lengths.max()), device=seg_ids.device)
        ends = starts + seg_lengths[rows]
        if ending is None:
            keep = (positions[None, :] >= starts[:, None]) & (positions[None, :] < ends[:, None])
        else:
            keep = (positions[None, :] == ends[:, None] - 1) & ending[rows][:, None]
        if read is None:
            return self._backbone_logits(sequences, lengths, keep), None
        logits, states = self._backbone_logits(sequences, lengths, keep, with_states=True)
        # The write slots: the last r positions of each row.
        r = self.config.memory_tokens
        write_positions = lengths[:, None] - r + torch.arange(r, device=states.device)
        row_index = torch.arange(len(rows), device=states.device)[:, None]
        slots = states.new_zeros(seg_ids.shape[0], r, states.shape[-1])
        slots[torch.tensor(rows, device=states.device)] = states[row_index, write_positions]
        return logits, slots

    def _write(
        self, state: MemoryState, slots: torch.Tensor, closed: torch.Tensor, recorded: bool
    ) -> MemoryState:
        """(4) M_n: the write slots' final states (batch, r, output_dim) brought to embedding scale
        (`MemoryParameters.to_memory`), appended to the cache of the rows whose segment `closed`."""
        with torch.set_grad_enabled(recorded):
            memory = self.memory.to_memory(slots)
        # Appended with grad as it is: a forward-only step must not detach the cache written before it.
        return state.with_memory(memory, closed, self.config.cache_size)

    def _segment_embeddings(
        self,
        tokens: torch.Tensor,
        state: MemoryState,
        row: int,
        slots: torch.Tensor | None,
        use_sensory: bool,
        write: bool,
    ) -> tuple[torch.Tensor, int]:
        """One row's segment as the backbone reads it: [sink | P | sensory | tokens | P] (the sink and P
        with memory, the last P only if `write`), and where `tokens` start in it."""
        dtype = self.backbone.get_input_embeddings().weight.dtype
        if use_sensory:
            recent = state.recent_ids[row][state.recent_mask[row]]
            tokens = torch.cat([recent[max(0, len(recent) - self.config.num_sensory) :], tokens])
            num_sensory = min(len(recent), self.config.num_sensory)
        else:
            num_sensory = 0
        pieces, prefix = self.backbone.get_input_embeddings()(tokens), 0
        if slots is not None:
            pieces = torch.cat([slots, pieces, slots] if write else [slots, pieces])
            prefix = len(slots)
            if self.config.attention_sink:
                pieces = torch.cat([self.memory.sink.to(dtype)[None, :], pieces])
                prefix += 1
        return pieces, prefix + num_sensory

    def _open_segments(self, state: MemoryState, mode: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each row's unfinished segment as the backbone has read it so far, [sink | P | sensory | pending]
        (the read from the state alone: the causal query is the text before the segment), and the P read
        (batch, r, d; None without memory), which closing the segment writes through. For generation."""
        read = None
        if mode == "hmt":
            if self.config.recall_query != "causal":
                raise ValueError(
                    "generation needs the causal recall query (the paper's reads tokens not yet generated); "
                    "load the adapter with recall_query='causal'"
                )
            batch = state.batch_size
            ones = torch.ones(batch, dtype=torch.long, device=self.device)
            probe = PackedInputs(  # one token per row: step 0's causal query is the text before it
                ids=ones[:, None] * 0, targets=ones[:, None] * IGNORE_INDEX, lengths=ones, offsets=ones * 0
            )
            read, _ = self._recall(mode, state, self._query(probe, state, 1)[:, 0])
        elif mode in MEMORY_MODES:
            read, _ = self._recall(mode, state, None)
        dtype = self.backbone.get_input_embeddings().weight.dtype
        slots = self.memory.as_tokens(read).to(dtype) if read is not None else None
        use_sensory = mode != "backbone" and self.config.num_sensory > 0
        return [
            self._segment_embeddings(
                state.pending_tokens(row), state, row, slots[row] if slots is not None else None,
                use_sensory, write=False,
            )[0]
            for row in range(state.batch_size)
        ], slots  # fmt: skip

    # ---- backbone calls ---------------------------------------------------------------------

    def _backbone_states(self, sequences: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states of right-padded embedding sequences, no logits: (rows, width, dim)."""
        return self._backbone_logits(sequences, lengths, None, with_states=True)[1]

    def _backbone_logits(
        self, sequences: list[torch.Tensor], lengths: torch.Tensor, keep: torch.Tensor | None, *,
        with_states: bool = False,
    ):  # fmt: skip
        """Logits at the `keep` positions (flattened; None: none), plus the final hidden states if asked."""
        inputs = pad_sequence(sequences, batch_first=True)
        if keep is None:
            keep = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
        out = self.backbone(
            inputs_embeds=inputs,
            attention_mask=padding_mask(inputs, lengths),
            logits_to_keep=keep,
            output_hidden_states=[-1] if with_states else False,
            use_cache=False,
        )
        return (out.logits, out.hidden_states[-1]) if with_states else out.logits

    def _measure_norms(self) -> tuple[float, float]:
        """Mean norms of token embeddings and of the (projected) hidden states segments write, on a fixed
        probe input."""
        embeddings = self.backbone.get_input_embeddings()
        length = min(64, context_length(self.backbone.config) or 64)
        step = max(1, embeddings.num_embeddings // length)
        ids = torch.arange(length, device=embeddings.weight.device) * step
        with torch.no_grad(), eval_mode(self.backbone):  # no dropout in the probe
            inputs = embeddings(ids)
            hidden = self.memory.project(
                self._backbone_states([inputs], torch.tensor([length], device=ids.device))
            )
        return float(inputs.float().norm(dim=-1).mean()), float(hidden.norm(dim=-1).mean())

    # ---- state checks ---------------------------------------------------------------------------

    def _check_state(self, state: MemoryState | None, batch: int) -> MemoryState:
        if state is None:
            return self.empty_state(batch)
        if not isinstance(state, MemoryState):
            raise TypeError(
                f"state must be a MemoryState (from a previous output's .state), got {type(state)}"
            )
        if state.batch_size != batch:
            raise ValueError(
                f"state holds {state.batch_size} rows but input_ids has {batch}; use state.select(rows)"
            )
        return self.fit_state(state)

    def fit_state(self, state: MemoryState) -> MemoryState:
        """`state` checked against this model (`MemoryState.check_fits`) and put on its device, in float32
        (a state saved from another dtype reads the same)."""
        cfg = self.config
        state.check_fits(
            self.memory_width, cfg.tokens_kept, self.vocab_size, cfg.cache_size, cfg.segment_length
        )
        return state.to(self.device).floating_as(torch.float32)

    # ---- save / load --------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | Path, *, save_backbone: bool = False, lora_dtype: torch.dtype | None = None
    ) -> None:
        """Write HMT's own parameters (safetensors, float32) and config (JSON), plus LoRA weights if the
        backbone has them (peft's files; as trained, or in `lora_dtype`, e.g. torch.bfloat16 for half the
        size). The backbone itself is written (to `backbone/`) only if asked, e.g. after full fine-tuning."""
        from hmt.pretrained import save_adapter

        save_adapter(self, Path(directory), save_backbone=save_backbone, lora_dtype=lora_dtype)

    @classmethod
    def from_pretrained(
        cls,
        location: str | Path,
        backbone: PreTrainedModel,
        *,
        merge_lora: bool = False,
        trainable_lora: bool = False,
        mode: str = "hmt",
        query_batch_size: int = 32,
        **settings: object,
    ) -> HMTForCausalLM:
        """Restore an adapter (a folder written by `save_pretrained`, or a Hub repo id) onto `backbone`,
        refusing one that does not fit. Its LoRA is merged into a copy of `backbone` (`merge_lora=True`: into
        `backbone` itself; `trainable_lora=True`: attached for training). `settings` may override the
        reading settings (READING_FIELDS); other fields only with the adapter's own values. docs/method.md
        says more."""
        from hmt.pretrained import load_adapter

        return load_adapter(
            cls, location, backbone, merge_lora=merge_lora, trainable_lora=trainable_lora, mode=mode,
            query_batch_size=query_batch_size, settings=settings,
        )  # fmt: skip
